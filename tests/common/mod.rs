//! Helpers shared by the integration tests: a real `dlsm serve` process on
//! loopback, and real client tools that must be installed.

#![allow(dead_code)]

pub mod etcd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DLSM: &str = env!("CARGO_BIN_EXE_dlsm");

/// Panics with a clear message if `tool` is not on PATH: a test that needs a
/// tool fails without it, it never skips.
pub fn require(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "required tool `{tool}` is missing: run scripts/test.sh, which installs it"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A `dlsm serve` child process.
pub struct NodeProc {
    pub child: Option<Child>,
    /// Network namespace the node (and its CLI calls) run in.
    pub netns: Option<String>,
    pub data_dir: PathBuf,
    pub nbd: String,
    pub api: String,
    pub unix: PathBuf,
    /// Global flags every CLI call adds (`--tls-dir`, `--api-token-file`).
    pub client_flags: Vec<String>,
    /// The extra `serve` flags it was started with (for [`Self::restart`]).
    serve_flags: Vec<String>,
    /// `--node` (`test` unless started by [`Self::start_named`]).
    pub name: String,
    _tmp: Option<tempfile::TempDir>,
}

impl NodeProc {
    /// Starts a node on a fresh data directory.
    pub fn start() -> NodeProc {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut n = Self::start_in(&dir);
        n._tmp = Some(tmp);
        n
    }

    /// Starts a node on `dir` (which may hold volumes from an earlier run).
    pub fn start_in(dir: &Path) -> NodeProc {
        Self::start_with(dir, "127.0.0.1:0", "127.0.0.1:0", &[])
    }

    /// Starts a node on fixed addresses with extra `serve` flags.
    pub fn start_with(dir: &Path, nbd: &str, api: &str, extra: &[&str]) -> NodeProc {
        Self::spawn(None, dir, nbd, api, extra)
    }

    /// Starts a node named `name` on `dir` with extra `serve` flags.
    pub fn start_named(dir: &Path, name: &str, extra: &[&str]) -> NodeProc {
        Self::spawn_full(None, dir, "127.0.0.1:0", "127.0.0.1:0", name, extra, None)
    }

    /// Starts a node inside network namespace `ns`.
    pub fn start_netns(ns: &str, dir: &Path, nbd: &str, api: &str) -> NodeProc {
        Self::spawn(Some(ns), dir, nbd, api, &[])
    }

    /// Starts a node inside network namespace `ns` with extra flags.
    pub fn start_netns_with(
        ns: &str,
        dir: &Path,
        nbd: &str,
        api: &str,
        extra: &[&str],
    ) -> NodeProc {
        Self::spawn(Some(ns), dir, nbd, api, extra)
    }

    fn command(netns: Option<&str>) -> Command {
        match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, DLSM]);
                c
            }
            None => Command::new(DLSM),
        }
    }

    /// Starts a node whose log (at `info`) goes to `log` instead of the
    /// test's stderr.
    pub fn start_logging_to(dir: &Path, extra: &[&str], log: &Path) -> NodeProc {
        let f = std::fs::File::create(log).unwrap();
        Self::spawn_full(
            None,
            dir,
            "127.0.0.1:0",
            "127.0.0.1:0",
            "test",
            extra,
            Some(f),
        )
    }

    fn spawn(netns: Option<&str>, dir: &Path, nbd: &str, api: &str, extra: &[&str]) -> NodeProc {
        Self::spawn_full(netns, dir, nbd, api, "test", extra, None)
    }

    fn spawn_full(
        netns: Option<&str>,
        dir: &Path,
        nbd: &str,
        api: &str,
        name: &str,
        extra: &[&str],
        log: Option<std::fs::File>,
    ) -> NodeProc {
        let unix = dir.join("nbd.sock");
        let level = if log.is_some() {
            "info,rustls=error".to_string()
        } else {
            std::env::var("DLSM_TEST_LOG").unwrap_or_else(|_| "warn,rustls=error".into())
        };
        let stderr = log.map_or_else(Stdio::inherit, Stdio::from);
        let mut child = Self::command(netns)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", nbd, "--api", api, "--node", name])
            .args(extra)
            .arg("--listen-unix")
            .arg(&unix)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn dlsm serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains(" ready "), "node did not start: {line:?}");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        NodeProc {
            nbd: field("nbd="),
            api: field("api="),
            child: Some(child),
            netns: netns.map(str::to_owned),
            data_dir: dir.to_owned(),
            unix,
            client_flags: Vec::new(),
            serve_flags: extra.iter().map(|s| s.to_string()).collect(),
            name: name.to_owned(),
            _tmp: None,
        }
    }

    /// Kills the node if it runs, and starts it again on the same data
    /// directory, addresses and flags (a crash and a restart, or a host
    /// coming back).
    pub fn restart(&mut self) {
        self.kill();
        let flags: Vec<&str> = self.serve_flags.iter().map(String::as_str).collect();
        let fresh = Self::spawn_full(
            self.netns.as_deref(),
            &self.data_dir,
            &self.nbd,
            &self.api,
            &self.name,
            &flags,
            None,
        );
        self.child = fresh.into_child();
    }

    /// Takes the child out of a `NodeProc` without killing it.
    fn into_child(mut self) -> Option<Child> {
        self.child.take()
    }

    /// Makes every CLI call against this node carry `flags`.
    pub fn with_client_flags(mut self, flags: &[&str]) -> Self {
        self.client_flags = flags.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn uri(&self, vol: &str) -> String {
        format!("nbd://{}/{vol}", self.nbd)
    }

    pub fn unix_uri(&self, vol: &str) -> String {
        format!("nbd+unix:///{vol}?socket={}", self.unix.display())
    }

    /// Runs a `dlsm` CLI command against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Self::command(self.netns.as_deref())
            .arg("--api")
            .arg(&self.api)
            .args(&self.client_flags)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "dlsm {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn create(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    /// Migration status as JSON (from this node's API).
    pub fn status(&self, vol: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["migration", "status", vol, "--json"])).unwrap()
    }

    /// Waits until the migration of `vol` reports `phase` (max `secs`).
    pub fn wait_phase(&self, vol: &str, phase: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let o = self.cli(&["migration", "status", vol, "--json"]);
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                if v["phase"] == phase {
                    return v;
                }
                assert!(v["phase"] != "failed", "migration failed: {v}");
                assert!(
                    Instant::now() < deadline,
                    "no phase {phase} after {secs}s: {v}"
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "status failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the volume exists on this node.
    pub fn has_volume(&self, vol: &str) -> bool {
        self.cli(&["volume", "show", vol]).status.success()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Resident memory of the node process, bytes.
    pub fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kb * 1024
    }

    /// SIGTERM and wait; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.success();
            }
            assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tmpfs mounted on a directory until dropped (needs root): a small
/// filesystem a test can fill, to see what a full disk does.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir.to_owned())
    }

    /// Grows or shrinks it in place.
    pub fn resize(&self, size: &str) {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.0),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An NBD client of `vol` on `node`, over TCP.
pub async fn client(node: &NodeProc, vol: &str) -> dlsm::nbd::client::NbdClient {
    use dlsm::nbd::client::{NbdAddr, NbdClient};
    NbdClient::connect(&NbdAddr::Tcp(node.nbd.clone()), vol)
        .await
        .unwrap()
}

/// The NBD errno of a request the server refused.
pub fn errno_of(e: dlsm::nbd::client::ClientError) -> u32 {
    match e {
        dlsm::nbd::client::ClientError::Server { errno, .. } => errno,
        other => panic!("expected a server error, got {other}"),
    }
}

/// A loopback port free now (the caller binds it soon after; another
/// process may take it in between, which callers that care retry).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up by default): a
    // process binding port 0 can never be handed one of these while the
    // caller is not listening on it (an etcd member being restarted on
    // its old ports). A counter keeps this process's picks apart; cargo
    // runs one test binary at a time.
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n * 7) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// Waits up to `timeout` for `dlsm serve`'s first stdout line, which must
/// say it is ready (returned); then keeps draining its stdout in a thread,
/// so the node never blocks on it. Used by the chaos harnesses, which
/// start nodes on ports they chose.
pub fn ready_line(child: &mut Child, timeout: Duration) -> Result<String, String> {
    use std::io::Read;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    match rx.recv_timeout(timeout) {
        Ok(line) if line.contains(" ready ") => Ok(line),
        Ok(line) => Err(format!("exited without a ready line {line:?}")),
        Err(_) => Err("no ready line in time".into()),
    }
}

/// Appends `line` to a chaos run's `events.log` in `dir` (best effort:
/// the log is for reading after a failure, never a reason for one).
pub fn append_event(dir: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("events.log"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The seed a chaos harness's violation line names (`seed=S ...`; 0 if
/// none), for its rerun command.
pub fn seed_of(violation: &str) -> u64 {
    violation
        .strip_prefix("seed=")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after
/// `secs` seconds. The one deadline-poll loop of the integration tests.
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {secs}s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command, asserting success; returns stdout.
/// Copies the image at `uri` (an NBD URI) to the raw file `out` with
/// qemu-img, replacing it.
pub fn nbd_copy(uri: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        uri,
        out.to_str().unwrap(),
    ]));
}

pub fn run_ok(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes a TLS directory (CA, server certificate for `names`, client
/// certificate) with `tests/tls/make-certs.sh`, which needs `openssl`.
pub fn make_tls_dir(dir: &Path, names: &[&str]) {
    require("openssl");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/make-certs.sh");
    run_ok(Command::new("bash").arg(script).arg(dir).args(names));
}

/// Two hosts: namespaces `<base>a` and `<base>b`, 10.77.0.1 and 10.77.0.2,
/// joined by a veth pair shaped to 1 Gbit/s each way.
pub struct Hosts {
    pub a: String,
    pub b: String,
}

impl Hosts {
    pub fn new(tag: &str) -> Hosts {
        let base = format!("dlsm{tag}{}", std::process::id() % 100_000);
        let (a, b) = (format!("{base}a"), format!("{base}b"));
        let (va, vb) = (format!("{base}va"), format!("{base}vb"));
        let sh = |args: &[&str]| run_ok(Command::new("ip").args(args));
        sh(&["netns", "add", &a]);
        sh(&["netns", "add", &b]);
        let hosts = Hosts {
            a: a.clone(),
            b: b.clone(),
        };
        sh(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        sh(&["link", "set", &va, "netns", &a]);
        sh(&["link", "set", &vb, "netns", &b]);
        for (ns, dev, ip) in [(&a, &va, "10.77.0.1/24"), (&b, &vb, "10.77.0.2/24")] {
            sh(&["-n", ns, "addr", "add", ip, "dev", dev]);
            sh(&["-n", ns, "link", "set", dev, "up"]);
            sh(&["-n", ns, "link", "set", "lo", "up"]);
            run_ok(Command::new("ip").args([
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                "1gbit", "burst", "1mb", "latency", "50ms",
            ]));
        }
        hosts
    }

    /// A's end of the link.
    fn dev_a(&self) -> String {
        format!("{}va", &self.a[..self.a.len() - 1])
    }

    /// Cuts (`false`) or restores (`true`) the link: A's end goes down, so
    /// packets in flight are lost silently and established connections
    /// just stop delivering, as when a cable or switch dies.
    pub fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        run_ok(Command::new("ip").args(["-n", &self.a, "link", "set", &self.dev_a(), state]));
        if up {
            // The route through the device comes back with it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !Command::new("ip")
                .args(["-n", &self.a, "route", "get", "10.77.0.2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success()
            {
                assert!(Instant::now() < deadline, "link did not come back");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Shapes A's sending side of the link to `rate` (tc tbf, e.g. "20mbit").
    pub fn set_rate(&self, rate: &str) {
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.a,
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.dev_a(),
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "256kb",
            "latency",
            "200ms",
        ]));
    }

    /// Bytes sent from A to B so far (A's veth counter).
    pub fn bytes_a_to_b(&self) -> u64 {
        let dev = format!("{}va", &self.a[..self.a.len() - 1]);
        let out = run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.a,
            "cat",
            &format!("/sys/class/net/{dev}/statistics/tx_bytes"),
        ]));
        out.trim().parse().unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A model of a volume's bytes, as clients wrote them.
pub struct Model(pub Vec<u8>);

impl Model {
    pub fn new(size: u64) -> Self {
        Model(vec![0; size as usize])
    }

    /// Writes `data` through `c` (8 MiB at a time) and into the model.
    pub async fn write(&mut self, c: &dlsm::nbd::client::NbdClient, off: u64, data: &[u8]) {
        for (i, piece) in data.chunks(8 << 20).enumerate() {
            c.write(off + (i << 23) as u64, piece, false).await.unwrap();
        }
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    /// Reads the whole volume through `c` and compares.
    pub async fn check(&self, c: &dlsm::nbd::client::NbdClient) {
        self.check_as(c, "model").await
    }

    /// [`Model::check`], naming the moment in the panic (`what`).
    pub async fn check_as(&self, c: &dlsm::nbd::client::NbdClient, what: &str) {
        let chunk = 8 << 20;
        for (i, want) in self.0.chunks(chunk).enumerate() {
            let got = c.read((i * chunk) as u64, want.len() as u32).await.unwrap();
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!("{what}: mismatch at byte {}", i * chunk + at);
            }
        }
    }
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A qemu-storage-daemon exporting the raw file `file` over vhost-user-blk
/// at `sock`, writable, once its socket exists. `file_opts` and
/// `export_opts` are appended to its `--blockdev` and `--export` options
/// (e.g. `locking=off`, `num-queues=2`).
pub fn qsd_vhost_export(
    file: &Path,
    sock: &Path,
    file_opts: &str,
    export_opts: &str,
) -> KillOnDrop {
    let qsd = require("qemu-storage-daemon");
    // QEMU's option syntax takes no empty item (a trailing comma).
    let with = |base: String, extra: &str| match extra {
        "" => base,
        _ => format!("{base},{extra}"),
    };
    let child = Command::new(qsd)
        .arg("--blockdev")
        .arg(with(
            format!("driver=file,node-name=f,filename={}", file.display()),
            file_opts,
        ))
        .arg("--export")
        .arg(with(
            format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
            export_opts,
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "qemu-storage-daemon did not listen on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
