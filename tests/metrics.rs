//! `GET /metrics` against real nodes: NBD I/O from real clients moves the
//! counters, `promtool check metrics` accepts the text, and a real
//! Prometheus server scrapes two nodes through a migration (with the
//! API token in its scrape config) and sees the copied bytes rise.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, errno_of, pattern, require, run_ok, wait_until, NodeProc};

const MIB: u64 = 1 << 20;
const TOKEN: &str = "metrics-test-token-0123456789";

/// A node whose API wants [`TOKEN`] (the CLI calls carry it too).
fn node_with_token(token: &Path) -> NodeProc {
    let dir = tempfile::tempdir().unwrap().keep();
    let t = token.to_str().unwrap();
    NodeProc::start_with(&dir, "127.0.0.1:0", "127.0.0.1:0", &["--api-token-file", t])
        .with_client_flags(&["--api-token-file", t])
}

fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    p
}

/// `GET /metrics` with `token` (if any): (HTTP status, body).
fn scrape_with(node: &NodeProc, token: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(&format!("http://{}/metrics", node.api));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => {
            assert!(
                r.content_type().starts_with("text/plain"),
                "{}",
                r.content_type()
            );
            (r.status(), r.into_string().unwrap())
        }
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("scrape of {} failed: {e}", node.api),
    }
}

fn scrape(node: &NodeProc) -> String {
    let (code, body) = scrape_with(node, Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the series `series` (name and labels exactly as the node
/// writes them), or 0 if absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Sum over every series of `name` whose labels contain all of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let matches = (rest.is_empty() || rest.starts_with('{'))
                && labels.iter().all(|want| rest.contains(want));
            matches.then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Runs `promtool check metrics` on `text`; panics with its findings.
fn promtool_check(text: &str) {
    let promtool = require("promtool");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics failed:\n{}{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_io(node: &NodeProc, vol: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(require("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run_ok(c.arg(node.uri(vol)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_io_moves_the_counters_and_promtool_accepts_the_text() {
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let node = node_with_token(&token);

    // Same middleware as the rest of the API: no token, no metrics.
    let (code, _) = scrape_with(&node, None);
    assert_eq!(code, 401, "/metrics without the token");
    let (code, _) = scrape_with(&node, Some("wrong-token-wrong-token"));
    assert_eq!(code, 401, "/metrics with a wrong token");

    node.create("vol", "64M");
    let before = scrape(&node);
    promtool_check(&before);
    assert_eq!(value(&before, "dlsm_volumes"), 1.0);
    assert_eq!(
        value(&before, "dlsm_nbd_requests_total{command=\"write\"}"),
        0.0
    );

    // qemu-io: 4 MiB written, 1 MiB read, a discard, a zero, a flush.
    qemu_io(
        &node,
        "vol",
        &[
            "write -P 0x5a 0 4M",
            "read -P 0x5a 1M 1M",
            "discard 8M 1M",
            "write -z 16M 2M",
            "flush",
        ],
    );
    // nbdinfo --map asks for block status.
    run_ok(Command::new(require("nbdinfo")).args(["--map", &node.uri("vol")]));
    // dlsm's own client: one read past the end (EINVAL), and a connection
    // held open across a scrape.
    let c = client(&node, "vol").await;
    let e = c.read(64 * MIB, 4096).await.unwrap_err();
    assert_eq!(errno_of(e), 22);
    c.write(0, &pattern(4096, 1), false).await.unwrap();

    let during = scrape(&node);
    promtool_check(&during);
    assert!(value(&during, "dlsm_nbd_connections") >= 1.0, "{during}");
    let req = |t: &str, c: &str| value(t, &format!("dlsm_nbd_requests_total{{command=\"{c}\"}}"));
    let bytes = |t: &str, c: &str| value(t, &format!("dlsm_nbd_bytes_total{{command=\"{c}\"}}"));
    for cmd in [
        "read",
        "write",
        "trim",
        "write_zeroes",
        "flush",
        "block_status",
    ] {
        assert!(
            req(&during, cmd) >= 1.0,
            "no {cmd} request counted:\n{during}"
        );
    }
    assert!(
        bytes(&during, "write") >= (4 * MIB + 4096) as f64,
        "{during}"
    );
    assert!(bytes(&during, "read") >= MIB as f64, "{during}");
    assert!(
        bytes(&during, "write_zeroes") >= (2 * MIB) as f64,
        "{during}"
    );
    assert_eq!(
        value(
            &during,
            "dlsm_nbd_errors_total{command=\"read\",errno=\"EINVAL\"}"
        ),
        1.0,
        "{during}"
    );
    // Latency: every counted read has its observation, in some bucket.
    let reads = req(&during, "read");
    assert_eq!(
        value(
            &during,
            "dlsm_nbd_request_duration_seconds_count{command=\"read\"}"
        ),
        reads - 1.0, // the refused one is not timed
        "{during}"
    );
    assert_eq!(
        value(
            &during,
            "dlsm_nbd_request_duration_seconds_bucket{command=\"write\",le=\"+Inf\"}"
        ),
        req(&during, "write"),
    );
    assert!(value(&during, "process_resident_memory_bytes") > MIB as f64);
    assert!(value(&during, "process_open_fds") >= 3.0);

    drop(c);
    wait_until("connection gauge back to 0", 10, || {
        value(&scrape(&node), "dlsm_nbd_connections") == 0.0
    });
}

/// A `prometheus` server on a free loopback port, with its own storage,
/// scraping `targets`' `/metrics` every second with the API token.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[&str], token: &Path) -> Prometheus {
        let bin = require("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: dlsm\n    authorization:\n      \
                 credentials_file: {}\n    static_configs:\n      - targets: [{list}]\n",
                token.display()
            ),
        )
        .unwrap();
        // A free port: bound and released; a lost race just means a retry.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr = format!("127.0.0.1:{port}");
            let mut child = Command::new(&bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn prometheus");
            // Its log goes to stderr: drain it (kept for a failure report).
            let log = dir.path().join("prometheus.log");
            let stderr = child.stderr.take().unwrap();
            let log2 = log.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(log2).unwrap();
                for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                    use std::io::Write;
                    let _ = writeln!(f, "{l}");
                }
            });
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        text.contains("address already in use"),
                        "prometheus exited ({st}):\n{text}"
                    );
                    break;
                }
                let ready = ureq::get(&format!("http://{addr}/-/ready"))
                    .timeout(Duration::from_secs(2))
                    .call()
                    .is_ok();
                if ready {
                    return Prometheus {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready after 60 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        panic!("no free port for prometheus after 5 tries");
    }

    /// An instant query: every series' labels and value.
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let r: serde_json::Value = ureq::get(&format!("http://{}/api/v1/query", self.addr))
            .query("query", q)
            .timeout(Duration::from_secs(10))
            .call()
            .unwrap_or_else(|e| panic!("query {q:?}: {e}"))
            .into_json()
            .unwrap();
        assert_eq!(r["status"], "success", "{r}");
        r["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let v: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
                (s["metric"].clone(), v)
            })
            .collect()
    }

    /// The single value `q` gives, once it gives exactly one.
    fn one(&self, q: &str) -> Option<f64> {
        match self.query(q).as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_two_nodes_through_a_migration() {
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path());
    let a = node_with_token(&token);
    let b = node_with_token(&token);
    let prom = Prometheus::start(&[&a.api, &b.api], &token);
    // Both nodes scraped, the token accepted.
    wait_until("prometheus scraping both nodes", 60, || {
        prom.query("up{job=\"dlsm\"} == 1").len() == 2
    });

    // 24 MiB of data copied at 1 MiB/s (4 MiB batches): the background
    // copy lasts over 20 s, and the bytes counter steps every 4 s.
    a.create("vm1", "32M");
    qemu_io(&a, "vm1", &["write -P 0x33 0 24M", "flush"]);
    let s: serde_json::Value = serde_json::from_str(
        &a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--rate", "1M", "--json"]),
    )
    .unwrap();
    let id = s["id"].as_str().unwrap().to_owned();
    b.cli_ok(&["migration", "handoff", "vm1"]);

    let dest = format!("volume=\"vm1\",role=\"destination\",id=\"{id}\"");
    // Each node reports its side: hydrating at the destination, handed
    // off (fenced: "hydrating" too) at the source.
    let hydrating = format!("dlsm_migration_phase{{{dest},phase=\"hydrating\"}}");
    wait_until("destination hydrating in prometheus", 30, || {
        prom.one(&hydrating) == Some(1.0)
    });
    let src_phase = format!(
        "dlsm_migration_phase{{volume=\"vm1\",role=\"source\",id=\"{id}\",phase=\"hydrating\"}}"
    );
    wait_until("source's phase in prometheus", 30, || {
        prom.one(&src_phase) == Some(1.0)
    });
    let bg = format!("dlsm_migration_background_bytes_total{{{dest}}}");
    // Two queries, the second after Prometheus has scraped again: the
    // copied bytes rise between them.
    let mut first = 0.0;
    wait_until("background bytes above 0 in prometheus", 60, || {
        first = prom.one(&bg).unwrap_or(0.0);
        first > 0.0
    });
    let mut second = first;
    wait_until("background bytes rising in prometheus", 60, || {
        second = prom.one(&bg).unwrap_or(0.0);
        second > first
    });
    assert!(second <= (24 * MIB) as f64, "{second}");
    println!("background bytes in prometheus: {first} then {second}");
    // What else Prometheus holds for this migration.
    let reachable = format!("dlsm_migration_source_reachable{{{dest}}}");
    wait_until("source reachable in prometheus", 30, || {
        prom.one(&reachable) == Some(1.0)
    });
    let fetches =
        format!("dlsm_migration_fetch_duration_seconds_count{{{dest},kind=\"background\"}}");
    wait_until("fetch latency observations in prometheus", 30, || {
        prom.one(&fetches).is_some_and(|n| n > 0.0)
    });
    let total = format!("dlsm_migration_regions{{{dest}}}");
    assert_eq!(prom.one(&total), Some(512.0), "32 MiB in 64 KiB regions");
    let rate = format!("rate(dlsm_migration_background_bytes_total{{{dest}}}[5s])");
    wait_until("a copy rate in prometheus", 30, || {
        prom.one(&rate).is_some_and(|r| r > 0.0)
    });

    // The destination's own text mid-migration passes promtool too.
    let text = scrape(&b);
    promtool_check(&text);
    assert!(sum(&text, "dlsm_migration_regions_present", &[&dest]) > 0.0);

    // Let it finish: the series stay, in phase complete, with every byte.
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    let complete = format!("dlsm_migration_phase{{{dest},phase=\"complete\"}}");
    wait_until("completion in prometheus", 30, || {
        prom.one(&complete) == Some(1.0)
    });
    let copied = format!(
        "dlsm_migration_background_bytes_total{{{dest}}} + \
         dlsm_migration_on_demand_bytes_total{{{dest}}}"
    );
    wait_until("all 24 MiB accounted for in prometheus", 30, || {
        prom.one(&copied) == Some((24 * MIB) as f64)
    });
}
