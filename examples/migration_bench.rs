//! Migration benchmarks (see BENCHMARKS.md). Run with
//! `cargo run --release --example migration_bench [-- SIZE_GIB]`; needs
//! `nbdcopy` (libnbd-bin). Starts real `dlsm serve` processes on loopback.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dlsm::nbd::client::{NbdAddr, NbdClient};

const DLSM: &str = "target/release/dlsm";

struct Node {
    child: Child,
    nbd: String,
    api: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let mut child = Command::new(DLSM)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let f = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        Node {
            nbd: f("nbd="),
            api: f("api="),
            child,
            _dir: dir,
        }
    }
    fn cli(&self, args: &[&str]) -> String {
        let o = Command::new(DLSM)
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
    fn status(&self, vol: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["migration", "status", vol, "--json"])).unwrap()
    }
    fn wait_complete(&self, vol: &str) -> serde_json::Value {
        loop {
            let s = self.status(vol);
            if s["phase"] == "complete" {
                return s;
            }
            assert!(s["phase"] != "failed", "{s}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }
    fn client(&self, vol: &str) -> NbdClient {
        rt().block_on(NbdClient::connect(&NbdAddr::Tcp(self.nbd.clone()), vol))
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn fill(c: &NbdClient, size: u64, every: u64) {
    rt().block_on(async {
        let mut buf = vec![0u8; 4 << 20];
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut off = 0;
        while off < size {
            if (off / (4 << 20)) % every == 0 {
                for w in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                c.write(off, &buf, false).await.unwrap();
            }
            off += 4 << 20;
        }
        c.flush().await.unwrap();
    })
}

fn drop_caches() {
    if std::env::var_os("DLSM_BENCH_WARM").is_some() {
        return;
    }
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let size = gib << 30;
    println!("# migration benchmarks ({gib} GiB), {}", chrono_like_now());

    // 1. Hydration of a fully allocated volume vs nbdcopy of the same export.
    let a = Node::start();
    a.cli(&["volume", "create", "vm1", "--size", &format!("{gib}G")]);
    fill(&a.client("vm1"), size, 1);
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut nbdcopy = Vec::new();
    let mut hydrate = Vec::new();
    for round in 0..3 {
        drop_caches();
        let out = tmp.path().join("copy.raw");
        let t = Instant::now();
        // --flush: the copy is durable at the end, as a completed hydration is.
        let st = Command::new("nbdcopy")
            .arg("--flush")
            .arg(format!("nbd://{}/vm1", a.nbd))
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        nbdcopy.push(size as f64 / t.elapsed().as_secs_f64());
        std::fs::remove_file(&out).unwrap();

        drop_caches();
        let b = Node::start();
        a.cli(&["migrate", "vm1", "--to", &b.api, "--keep-source"]);
        b.cli(&["migration", "handoff", "vm1"]);
        let s = b.wait_complete("vm1");
        // Handoff to completion, as the destination measured it.
        hydrate.push(size as f64 / s["hydrate_seconds"].as_f64().unwrap());
        eprintln!(
            "round {round}: dlsm {:.2} GiB/s, nbdcopy {:.2} GiB/s",
            hydrate[round] / (1u64 << 30) as f64,
            nbdcopy[round] / (1u64 << 30) as f64
        );
        let moved =
            s["bytes_background"].as_u64().unwrap() + s["bytes_on_demand"].as_u64().unwrap();
        assert_eq!(moved, size, "round {round}: {s}");
        // Make A the owner again for the next round.
        drop(b);
        let table = std::fs::read_dir(a._dir.path().join("volumes/vm1")).is_ok();
        assert!(table);
        a.cli(&["volume", "rm", "vm1"]);
        a.cli(&["volume", "create", "vm1", "--size", &format!("{gib}G")]);
        fill(&a.client("vm1"), size, 1);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        v[v.len() / 2]
    };
    let (h, n) = (med(&mut hydrate), med(&mut nbdcopy));
    let only_hydration = std::env::args().nth(2).as_deref() == Some("hydration");
    println!("hydration of {gib} GiB fully allocated: dlsm {:.2} GiB/s, nbdcopy {:.2} GiB/s, ratio {:.2}x (median of 3, cold cache)", h / (1u64 << 30) as f64, n / (1u64 << 30) as f64, h / n);
    drop(a);
    if only_hydration {
        return;
    }

    // 2. Bytes over the wire for a 10%-allocated volume.
    let a = Node::start();
    let b = Node::start();
    a.cli(&["volume", "create", "vm2", "--size", &format!("{gib}G")]);
    fill(&a.client("vm2"), size, 10);
    let v: serde_json::Value =
        serde_json::from_str(&a.cli(&["volume", "show", "vm2", "--json"])).unwrap();
    let allocated = v["allocated_bytes"].as_u64().unwrap();
    a.cli(&["migrate", "vm2", "--to", &b.api]);
    b.cli(&["migration", "handoff", "vm2"]);
    let s = b.wait_complete("vm2");
    let moved = s["bytes_background"].as_u64().unwrap() + s["bytes_on_demand"].as_u64().unwrap();
    println!("10%-allocated volume: {allocated} bytes allocated, {moved} bytes over the wire, ratio {:.4}x; skipped {}", moved as f64 / allocated as f64, s["bytes_skipped"]);
    drop((a, b));

    // 3. Prepare time, 1 GiB vs 1 TiB sparse (median of 7).
    let a = Node::start();
    let b = Node::start();
    let prep = |size: &str, n: usize| -> f64 {
        let mut v = Vec::new();
        for i in 0..n {
            let name = format!("p{size}{i}");
            a.cli(&["volume", "create", &name, "--size", size]);
            let t = Instant::now();
            a.cli(&["migrate", &name, "--to", &b.api]);
            v.push(t.elapsed().as_secs_f64());
        }
        med(&mut v)
    };
    let (p1g, p1t) = (prep("1G", 7), prep("1T", 7));
    println!(
        "prepare (CLI round trip): 1 GiB {:.1} ms, 1 TiB {:.1} ms, ratio {:.2}",
        p1g * 1e3,
        p1t * 1e3,
        p1t / p1g
    );
    drop((a, b));

    // 4. Cold 4 KiB read at the destination vs a direct 64 KiB read from the
    //    source; warm reads vs a plain local volume.
    let a = Node::start();
    let b = Node::start();
    a.cli(&["volume", "create", "vm3", "--size", "1G"]);
    fill(&a.client("vm3"), 1 << 30, 1);
    a.cli(&["migrate", "vm3", "--to", &b.api, "--rate", "1"]);
    b.cli(&["migration", "handoff", "vm3"]);
    b.cli(&["migration", "pause", "vm3"]);
    let (ca, cb) = (a.client("vm3"), b.client("vm3"));
    let n = 2000u64;
    let time = |c: &NbdClient, len: u32, stride: u64| -> f64 {
        rt().block_on(async {
            let t = Instant::now();
            for i in 0..n {
                c.read((i * stride * 7919) % ((1 << 30) / stride) * stride, len)
                    .await
                    .unwrap();
            }
            t.elapsed().as_secs_f64() / n as f64
        })
    };
    let direct = time(&ca, 65536, 65536);
    let cold = time(&cb, 4096, 65536);
    let warm = time(&cb, 4096, 65536);
    b.cli(&["volume", "create", "plain", "--size", "1G"]);
    let cp = b.client("plain");
    fill(&cp, 1 << 30, 1);
    time(&cp, 4096, 65536);
    let plain = time(&cp, 4096, 65536);
    println!("read latency: cold 4K at destination {:.1} us vs direct 64K from source {:.1} us: ratio {:.2}", cold * 1e6, direct * 1e6, cold / direct);
    println!(
        "read latency: warm 4K at destination {:.1} us vs plain local volume {:.1} us: ratio {:.2}",
        warm * 1e6,
        plain * 1e6,
        warm / plain
    );
    drop((a, b));

    // 5. Node memory during a 1 TiB sparse migration.
    let a = Node::start();
    let b = Node::start();
    a.cli(&["volume", "create", "huge", "--size", "1T"]);
    let c = a.client("huge");
    rt().block_on(async {
        for i in 0..64u64 {
            c.write(i * (16 << 30), &vec![7u8; 1 << 20], false)
                .await
                .unwrap();
        }
        c.flush().await.unwrap();
    });
    a.cli(&["migrate", "huge", "--to", &b.api]);
    b.cli(&["migration", "handoff", "huge"]);
    let s = b.wait_complete("huge");
    println!("1 TiB sparse migration: destination peak RSS {:.1} MiB, source peak RSS {:.1} MiB ({} moved, {} skipped)", b.rss() as f64 / 1048576.0, a.rss() as f64 / 1048576.0, s["bytes_background"], s["bytes_skipped"]);
}

fn chrono_like_now() -> String {
    let o = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}
