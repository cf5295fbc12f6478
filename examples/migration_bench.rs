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
        Node::start_in(DLSM, tempfile::tempdir_in("/var/tmp").unwrap())
    }

    /// The same node (data directory) run by another `dlsm` binary.
    fn restart(mut self, bin: &str) -> Node {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir_in("/var/tmp").unwrap());
        Node::start_in(bin, dir)
    }

    fn start_in(bin: &str, dir: tempfile::TempDir) -> Node {
        let mut child = Command::new(bin)
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
    /// User + system CPU time of the node so far.
    fn cpu_seconds(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat(5), counted from 1
        // with pid and comm (USER_HZ = 100).
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
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

/// A placeholder while a node is being restarted.
fn dummy() -> Node {
    Node {
        child: Command::new("true").spawn().unwrap(),
        nbd: String::new(),
        api: String::new(),
        _dir: tempfile::tempdir_in("/var/tmp").unwrap(),
    }
}

/// Migrates vm1 from `a` to a fresh node run by `bin`, from a cold cache;
/// returns the hydration rate (handoff to complete, as the destination
/// measured it) and the final status.
fn hydrate_once(
    a: &Node,
    bin: &str,
    size: u64,
    round: usize,
    tag: &str,
) -> (f64, serde_json::Value) {
    drop_caches();
    let b = Node::start_in(bin, tempfile::tempdir_in(dest_dir()).unwrap());
    a.cli(&["migrate", "vm1", "--to", &b.api, "--keep-source"]);
    let perf = Perf::start(
        &[(&format!("a-{tag}"), a), (&format!("b-{tag}"), &b)],
        round,
    );
    let (ca, cb) = (a.cpu_seconds(), b.cpu_seconds());
    b.cli(&["migration", "handoff", "vm1"]);
    let s = b.wait_complete("vm1");
    let gib = size as f64 / (1u64 << 30) as f64;
    eprintln!(
        "         {tag}: CPU per GiB hydrated: source {:.2} s, destination {:.2} s",
        (a.cpu_seconds() - ca) / gib,
        (b.cpu_seconds() - cb) / gib
    );
    drop(perf);
    (size as f64 / s["hydrate_seconds"].as_f64().unwrap(), s)
}

/// Where destination nodes keep their data (and where the destination
/// write limit and nbdcopy's output are measured): `DLSM_BENCH_DEST_DIR`,
/// default /var/tmp, the source's filesystem.
fn dest_dir() -> std::path::PathBuf {
    std::env::var_os("DLSM_BENCH_DEST_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/var/tmp".into())
}

/// Makes `a` the owner of a freshly filled vm1 again.
fn reset(a: &Node, gib: u64, size: u64) {
    a.cli(&["volume", "rm", "vm1"]);
    a.cli(&["volume", "create", "vm1", "--size", &format!("{gib}G")]);
    fill(&a.client("vm1"), size, 1);
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

    // 1. Hydration of a fully allocated volume vs nbdcopy of the same
    //    export, and the three hardware limits it runs against, measured
    //    in the same round (see `limits`).
    let rounds: usize = std::env::var("DLSM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let base = std::env::var("DLSM_BENCH_BASE").ok();
    let mut a = Node::start();
    a.cli(&["volume", "create", "vm1", "--size", &format!("{gib}G")]);
    fill(&a.client("vm1"), size, 1);
    let tmp = tempfile::tempdir_in(dest_dir()).unwrap();
    let mut nbdcopy = Vec::new();
    let mut hydrate = Vec::new();
    let mut hydrate_base = Vec::new();
    let mut lims: Vec<Limits> = Vec::new();
    let gibs = |x: f64| x / (1u64 << 30) as f64;
    for round in 0..rounds {
        let src_file = a._dir.path().join("volumes/vm1/data.raw");
        let l = Limits::measure(&src_file, tmp.path(), size);
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

        // The same hydration by another build, same round, same state
        // (`DLSM_BENCH_BASE=PATH` to a `dlsm` binary): before/after figures
        // under the same load.
        if let Some(base) = &base {
            let a2 = std::mem::replace(&mut a, dummy());
            let a2 = a2.restart(base);
            let (rate, _) = hydrate_once(&a2, base, size, round, "base");
            hydrate_base.push(rate);
            a = a2.restart(DLSM);
            reset(&a, gib, size);
        }
        let (rate, s) = hydrate_once(&a, DLSM, size, round, "new");
        hydrate.push(rate);
        eprintln!(
            "round {round}: source read {:.2} GiB/s, destination write {:.2} GiB/s, link {:.2} GiB/s, \
             same-disk copy {:.2} GiB/s; dlsm {:.2} GiB/s ({:.2}x of the slowest, {:.2}x of the copy){}; \
             nbdcopy {:.2} GiB/s ({:.2}x, {:.2}x)",
            gibs(l.src_read),
            gibs(l.dst_write),
            gibs(l.link),
            gibs(l.copy),
            gibs(rate),
            rate / l.min(),
            rate / l.copy,
            match hydrate_base.get(round) {
                Some(b) => format!(" [base build {:.2} GiB/s, {:.2}x]", gibs(*b), b / l.min()),
                None => String::new(),
            },
            gibs(nbdcopy[round]),
            nbdcopy[round] / l.min(),
            nbdcopy[round] / l.copy,
        );
        eprintln!("         {}", l.detail);
        lims.push(l);
        let moved =
            s["bytes_background"].as_u64().unwrap() + s["bytes_on_demand"].as_u64().unwrap();
        assert_eq!(moved, size, "round {round}: {s}");
        reset(&a, gib, size);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = hydrate
        .iter()
        .zip(&lims)
        .map(|(h, l)| h / l.min())
        .collect();
    let nratios: Vec<f64> = nbdcopy
        .iter()
        .zip(&lims)
        .map(|(n, l)| n / l.min())
        .collect();
    let (mut sr, mut dw, mut ln, mut cp): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = (
        lims.iter().map(|l| l.src_read).collect(),
        lims.iter().map(|l| l.dst_write).collect(),
        lims.iter().map(|l| l.link).collect(),
        lims.iter().map(|l| l.copy).collect(),
    );
    println!(
        "limits ({gib} GiB, median of {rounds}): source disk read {:.2} GiB/s, destination disk write {:.2} GiB/s, loopback link {:.2} GiB/s; same-disk copy {:.2} GiB/s",
        gibs(med(&mut sr)),
        gibs(med(&mut dw)),
        gibs(med(&mut ln)),
        gibs(med(&mut cp)),
    );
    let cratios: Vec<f64> = hydrate.iter().zip(&lims).map(|(h, l)| h / l.copy).collect();
    let ncratios: Vec<f64> = nbdcopy.iter().zip(&lims).map(|(n, l)| n / l.copy).collect();
    println!(
        "hydration / same-disk copy: dlsm {:.2}x, nbdcopy {:.2}x (median of per-round ratios)",
        med(&mut cratios.clone()),
        med(&mut ncratios.clone())
    );
    if !hydrate_base.is_empty() {
        let bratios: Vec<f64> = hydrate_base
            .iter()
            .zip(&lims)
            .map(|(h, l)| h / l.min())
            .collect();
        println!(
            "base build: {:.2} GiB/s, {:.2}x of the slowest limit (median)",
            gibs(med(&mut hydrate_base.clone())),
            med(&mut bratios.clone())
        );
    }
    let (h, n) = (med(&mut hydrate.clone()), med(&mut nbdcopy.clone()));
    println!(
        "hydration / slowest limit: dlsm {:.2}x, nbdcopy {:.2}x (median of per-round ratios)",
        med(&mut ratios.clone()),
        med(&mut nratios.clone())
    );
    let only_hydration = std::env::args().nth(2).as_deref() == Some("hydration");
    println!("hydration of {gib} GiB fully allocated: dlsm {:.2} GiB/s, nbdcopy {:.2} GiB/s, ratio {:.2}x (median of {rounds}, cold cache)", h / (1u64 << 30) as f64, n / (1u64 << 30) as f64, h / n);
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

/// The three hardware limits a hydration runs against, each measured the
/// way it is best served, so the ratio is against what the machine can do
/// and not against a weak probe: for the disks, sequential O_DIRECT with
/// 4 MiB requests at queue depth 1 and 4 (the better one counts); for the
/// link, loopback TCP with 4 MiB writes on 1 and 3 streams (the copier
/// uses 3 bulk connections; the better one counts).
struct Limits {
    /// Bytes/s: cold O_DIRECT read of the source volume's own data file.
    src_read: f64,
    /// Bytes/s: O_DIRECT write of a same-size new file on the
    /// destination's filesystem, fsync included.
    dst_write: f64,
    /// Bytes/s: loopback TCP, sender to receiver.
    link: f64,
    /// Bytes/s: the source file read and a new file written at the same
    /// time, both O_DIRECT at queue depth 1 (the ceiling of a copy when
    /// source and destination share one disk, as on a one-disk test VM).
    copy: f64,
    detail: String,
}

const CHUNK: usize = 4 << 20;

impl Limits {
    fn measure(src: &std::path::Path, dir: &std::path::Path, size: u64) -> Limits {
        drop_caches();
        let r1 = direct_io(src, size, 1, false);
        let r4 = direct_io(src, size, 4, false);
        let dst = dir.join("limit-write.raw");
        let w1 = direct_io(&dst, size, 1, true);
        std::fs::remove_file(&dst).unwrap();
        let w4 = direct_io(&dst, size, 4, true);
        std::fs::remove_file(&dst).unwrap();
        let l1 = tcp_loopback(size, 1);
        let l3 = tcp_loopback(size, 3);
        drop_caches();
        let t = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| direct_io(src, size, 1, false));
            s.spawn(|| direct_io(&dst, size, 1, true));
        });
        let copy = size as f64 / t.elapsed().as_secs_f64();
        std::fs::remove_file(&dst).unwrap();
        let g = |x: f64| x / (1u64 << 30) as f64;
        Limits {
            src_read: r1.max(r4),
            dst_write: w1.max(w4),
            link: l1.max(l3),
            copy,
            detail: format!(
                "(read qd1 {:.2} qd4 {:.2}; write qd1 {:.2} qd4 {:.2}; link 1 stream {:.2}, 3 streams {:.2} GiB/s)",
                g(r1),
                g(r4),
                g(w1),
                g(w4),
                g(l1),
                g(l3)
            ),
        }
    }

    fn min(&self) -> f64 {
        self.src_read.min(self.dst_write).min(self.link)
    }
}

/// Sequential O_DIRECT read (or write of a new file, then fsync) of
/// `size` bytes in 4 MiB requests, `qd` threads each taking every
/// `qd`-th chunk. Bytes/s.
fn direct_io(path: &std::path::Path, size: u64, qd: usize, write: bool) -> f64 {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap();
    let t = Instant::now();
    std::thread::scope(|s| {
        for q in 0..qd {
            let f = &f;
            s.spawn(move || {
                let mut v = vec![0u8; CHUNK + 4096];
                let at = v.as_ptr().align_offset(4096);
                let buf = &mut v[at..at + CHUNK];
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = i as u8 | 1);
                let mut i = q as u64;
                while i * (CHUNK as u64) < size {
                    let off = i * CHUNK as u64;
                    if write {
                        f.write_all_at(buf, off).unwrap();
                    } else {
                        f.read_exact_at(buf, off).unwrap();
                    }
                    i += qd as u64;
                }
            });
        }
    });
    if write {
        f.sync_all().unwrap();
    }
    size as f64 / t.elapsed().as_secs_f64()
}

/// Loopback TCP throughput: `streams` sender/receiver pairs move `size`
/// bytes in all, 4 MiB writes and reads, 8 MiB socket buffers. Bytes/s.
fn tcp_loopback(size: u64, streams: usize) -> f64 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let per = size / streams as u64;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..streams {
            s.spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                let buf = vec![0x5au8; CHUNK];
                let mut sent = 0u64;
                while sent < per {
                    let n = (per - sent).min(CHUNK as u64) as usize;
                    c.write_all(&buf[..n]).unwrap();
                    sent += n as u64;
                }
            });
        }
        for _ in 0..streams {
            let (mut c, _) = l.accept().unwrap();
            s.spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let mut got = 0u64;
                while got < per {
                    let n = c.read(&mut buf).unwrap();
                    assert!(n > 0);
                    got += n as u64;
                }
            });
        }
    });
    (per * streams as u64) as f64 / t.elapsed().as_secs_f64()
}

/// `perf record -g` on the node processes while it lives, when
/// `DLSM_BENCH_PERF=DIR` is set (output `DIR/NAME-ROUND.data`).
struct Perf(Vec<Child>);

impl Perf {
    fn start(nodes: &[(&String, &Node)], round: usize) -> Perf {
        let Some(dir) = std::env::var_os("DLSM_BENCH_PERF") else {
            return Perf(Vec::new());
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kids = nodes
            .iter()
            .map(|(name, n)| {
                Command::new("perf")
                    .args(["record", "-g", "-q", "-o"])
                    .arg(dir.join(format!("{name}-{round}.data")))
                    .arg("-p")
                    .arg(n.child.id().to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        Perf(kids)
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        for k in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = k.wait();
        }
    }
}

fn chrono_like_now() -> String {
    let o = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}
