//! A real QEMU guest live-migrates between two hosts with its disk on dlsm.
//!
//! Two network namespaces joined by a veth pair shaped to 1 Gbit/s with
//! `tbf` stand for two hosts; a dlsm node runs in each. A Linux guest
//! (Debian's kernel, an initramfs of busybox-static, the virtio modules and
//! `tests/vm/workload.c`) boots under TCG with its disk at `nbd://A/vm`.
//! The volume is migrated with `dlsm migrate`, then the VM with QEMU's own
//! live migration (QMP `migrate`) to a QEMU on host B started with
//! `-incoming` and its disk at `nbd://B/vm`. Nothing in QEMU is changed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, run_ok, NodeProc};

/// Two hosts: namespaces `<base>a` and `<base>b`, 10.77.0.1 and 10.77.0.2,
/// joined by a veth pair shaped to 1 Gbit/s each way.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn new(tag: &str) -> Hosts {
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

    /// Bytes sent from A to B so far (A's veth counter).
    fn bytes_a_to_b(&self) -> u64 {
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

/// The guest's kernel and initramfs, built once per test process (the
/// tests run in parallel and must not build over each other).
fn guest() -> PathBuf {
    static GUEST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    GUEST
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-guest");
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/build-initramfs.sh");
            run_ok(Command::new("bash").arg(script).arg(&out));
            out
        })
        .clone()
}

/// A QEMU process with a QMP socket and a serial log.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
    serial: PathBuf,
}

impl Qemu {
    fn start(
        ns: &str,
        dir: &Path,
        name: &str,
        guest: &Path,
        disk: &str,
        params: &str,
        incoming: Option<&str>,
    ) -> Qemu {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
            "-net",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.gz"))
        .args(["-append", &format!("console=ttyS0 quiet {params}")])
        .args([
            "-drive",
            &format!("file={disk},format=raw,if=virtio,cache=none"),
        ])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args(["-display", "none", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        let child = cmd.spawn().expect("start qemu-system-x86_64");
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qemu {
            child,
            qmp: BufReader::new(stream),
            serial,
        };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.cmd("qmp_capabilities", serde_json::json!({}));
        q
    }

    /// Runs a QMP command and returns its `return` value.
    fn cmd(&mut self, execute: &str, arguments: serde_json::Value) -> serde_json::Value {
        let msg = serde_json::json!({ "execute": execute, "arguments": arguments });
        writeln!(self.qmp.get_mut(), "{msg}").unwrap();
        loop {
            let mut line = String::new();
            self.qmp.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "QMP closed during {execute}");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {execute} failed: {e}");
            }
            return v["return"].clone();
        }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial log contains `what`.
    fn wait_serial(&self, what: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.serial();
            if s.contains(what) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "guest never printed {what:?}; serial:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest's block pattern (same as `fill` in workload.c).
fn block_content(b: u64, s: u32) -> Vec<u8> {
    let mut x = (b << 32) ^ s as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(4096);
    for _ in 0..512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Checks a raw volume image against the guest's `REC` lines: recorded
/// blocks hold their last pattern, every other block is zero.
fn check_image(image: &Path, serial: &str) -> usize {
    let data = std::fs::read(image).unwrap();
    let mut recorded = std::collections::HashMap::new();
    for line in serial.lines().filter_map(|l| l.strip_prefix("REC ")) {
        let mut it = line.split_whitespace();
        let b: u64 = it.next().unwrap().parse().unwrap();
        let s: u32 = it.next().unwrap().parse().unwrap();
        recorded.insert(b, s);
    }
    assert!(!recorded.is_empty(), "no REC lines in the guest's log");
    for (i, block) in data.chunks(4096).enumerate() {
        match recorded.get(&(i as u64)) {
            Some(&s) => assert!(
                block == block_content(i as u64, s).as_slice(),
                "block {i} does not hold the guest's write {s}"
            ),
            None => assert!(
                block.iter().all(|b| *b == 0),
                "block {i} was never written but is not zero"
            ),
        }
    }
    recorded.len()
}

fn wait_query_migrate(q: &mut Qemu) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = q.cmd("query-migrate", serde_json::json!({}));
        match s["status"].as_str() {
            Some("completed") => return s,
            Some("failed") | Some("cancelled") => panic!("QEMU migration failed: {s}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "QEMU migration did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the destination QEMU runs the guest.
fn wait_running(q: &mut Qemu) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = q.cmd("query-status", serde_json::json!({}));
        if st["status"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "VM not running on B: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tools() {
    for t in ["qemu-system-x86_64", "ip", "tc", "gcc", "cpio", "busybox"] {
        require(t);
    }
}

#[test]
fn guest_under_load_live_migrates_with_its_disk_on_dlsm() {
    tools();
    let guest = guest();
    let hosts = Hosts::new("w");
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("node-a"), tmp.path().join("node-b"));
    let a = NodeProc::start_netns(&hosts.a, &da, "10.77.0.1:10809", "10.77.0.1:7450");
    let b = NodeProc::start_netns(&hosts.b, &db, "10.77.0.2:10809", "10.77.0.2:7450");
    a.create("vm", "128M");

    let secs = 30;
    let params = format!("dlsm.secs={secs}");
    let mut qa = Qemu::start(
        &hosts.a,
        tmp.path(),
        "qemu-a",
        &guest,
        "nbd://10.77.0.1:10809/vm",
        &params,
        None,
    );
    qa.wait_serial("STAT t=3", 120);
    let t0 = Instant::now();
    a.cli_ok(&["migrate", "vm", "--to", "10.77.0.2:7450"]);
    let prepared = t0.elapsed();
    let mut qb = Qemu::start(
        &hosts.b,
        tmp.path(),
        "qemu-b",
        &guest,
        "nbd://10.77.0.2:10809/vm",
        &params,
        Some("tcp:10.77.0.2:4444"),
    );
    qa.cmd(
        "migrate",
        serde_json::json!({ "uri": "tcp:10.77.0.2:4444" }),
    );
    let m = wait_query_migrate(&mut qa);
    wait_running(&mut qb);
    let switched = t0.elapsed();
    qa.cmd("quit", serde_json::json!({}));
    eprintln!(
        "prepare {prepared:?}, VM on B after {switched:?}, QEMU downtime {} ms",
        m["downtime"]
    );

    // The guest finishes its run on B and checks every block it wrote.
    let serial_b = qb.wait_serial("DONE", secs as u64 + 180);
    let serial_a = qa.serial();
    for log in [&serial_a, &serial_b] {
        assert!(
            !log.contains("MISMATCH") && !log.contains("ERROR"),
            "guest saw bad data:\n{log}"
        );
    }
    assert!(serial_b.contains("FINAL OK"), "{serial_b}");
    assert!(serial_b.contains("STAT"), "the guest did not run on B");

    let done = b.wait_phase("vm", "complete", 120);
    eprintln!("hydration: {done}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.has_volume("vm") {
        assert!(Instant::now() < deadline, "source copy not released");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(qb);
    let blocks = check_image(&db.join("volumes/vm/data.raw"), &serial_b);
    eprintln!(
        "verified {blocks} blocks on B; {} bytes crossed the link A->B",
        hosts.bytes_a_to_b()
    );
}

#[test]
fn idle_guest_hands_off_when_the_source_qemu_quits() {
    tools();
    let guest = guest();
    let hosts = Hosts::new("i");
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("node-a"), tmp.path().join("node-b"));
    let a = NodeProc::start_netns(&hosts.a, &da, "10.77.0.1:10809", "10.77.0.1:7450");
    let b = NodeProc::start_netns(&hosts.b, &db, "10.77.0.2:10809", "10.77.0.2:7450");
    a.create("vm", "64M");
    // Data written before the VM starts, which must reach B.
    run_ok(Command::new("ip").args([
        "netns",
        "exec",
        &hosts.a,
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "write -P 0xa5 40M 1M",
        "nbd://10.77.0.1:10809/vm",
    ]));
    // dlsm.idle=1: the guest boots and does no I/O at all.
    let mut qa = Qemu::start(
        &hosts.a,
        tmp.path(),
        "qemu-a",
        &guest,
        "nbd://10.77.0.1:10809/vm",
        "dlsm.idle=1",
        None,
    );
    qa.wait_serial("GUEST UP", 120);
    a.cli_ok(&["migrate", "vm", "--to", "10.77.0.2:7450"]);
    let mut qb = Qemu::start(
        &hosts.b,
        tmp.path(),
        "qemu-b",
        &guest,
        "nbd://10.77.0.2:10809/vm",
        "dlsm.idle=1",
        Some("tcp:10.77.0.2:4444"),
    );
    qa.cmd(
        "migrate",
        serde_json::json!({ "uri": "tcp:10.77.0.2:4444" }),
    );
    wait_query_migrate(&mut qa);
    wait_running(&mut qb);
    assert_eq!(
        b.status("vm")["phase"],
        "passthrough",
        "handoff before the source QEMU quit"
    );
    qa.cmd("quit", serde_json::json!({}));
    b.wait_phase("vm", "complete", 120);
    drop(qb.cmd("query-status", serde_json::json!({})));
    let out = run_ok(Command::new("ip").args([
        "netns",
        "exec",
        &hosts.b,
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 1M 3M",
        "-c",
        "read -P 0xa5 40M 1M",
        "-c",
        "read -P 0 0 1M",
        "nbd://10.77.0.2:10809/vm",
    ]));
    assert!(!out.contains("verification failed"), "{out}");
}
