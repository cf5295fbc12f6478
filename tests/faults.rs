//! Faults during a migration, each checked byte for byte against a model
//! of what was written: the link between the nodes cut and restored (and
//! slowed), the destination's disk filling up, and twenty volumes
//! migrating at once under client load. (Destination kill -9 and source
//! loss are in `migration.rs`; crashes at random points in `model.rs`.)
//!
//! Each test prints a `FAULTS` line (faults injected, writes checked,
//! bytes lost) that RELIABILITY.md quotes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, errno_of, pattern, require, wait_until, Hosts, NodeProc, Tmpfs};
use dlsm::nbd::client::NbdClient;

const MIB: u64 = 1 << 20;

/// Reads the whole volume through `c`, 8 MiB at a time, and compares.
async fn check_all(c: &NbdClient, model: &[u8], when: &str) {
    for (i, want) in model.chunks(8 * MIB as usize).enumerate() {
        let got = c.read(i as u64 * 8 * MIB, want.len() as u32).await.unwrap();
        assert!(got == want, "{when}: wrong data in MiB {}..", i * 8);
    }
}

/// The byte MiB `i` of the link test's volume is filled with.
fn fill_byte(i: u64) -> u8 {
    (i * 7 + 1) as u8
}

/// qemu-io inside namespace `ns` on `uri`; returns (success, stdout+stderr).
fn qemu_io(ns: &str, uri: &str, cmds: &[String]) -> (bool, String) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "qemu-io", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(uri).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let ok = o.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

#[test]
fn link_cut_and_restored_and_slow_link() {
    for t in ["ip", "tc", "qemu-io"] {
        require(t);
    }
    let hosts = Hosts::new("f");
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--insecure-api", "--source-timeout", "3"];
    let a = NodeProc::start_netns_with(
        &hosts.a,
        &tmp.path().join("a"),
        "10.77.0.1:10809",
        "10.77.0.1:7450",
        &flags,
    );
    let b = NodeProc::start_netns_with(
        &hosts.b,
        &tmp.path().join("b"),
        "10.77.0.2:10809",
        "10.77.0.2:7450",
        &flags,
    );
    let (uri_a, uri_b) = ("nbd://10.77.0.1:10809/vm", "nbd://10.77.0.2:10809/vm");
    a.create("vm", "64M");
    let writes: Vec<String> = (0..64)
        .map(|i| format!("write -P {} {}M 1M", fill_byte(i), i))
        .collect();
    let (ok, out) = qemu_io(&hosts.a, uri_a, &writes);
    assert!(ok, "{out}");
    let mut model: Vec<u8> = (0..64).map(fill_byte).collect();
    let mut faults = 0;

    // A slow copy, so most regions are still absent when the link fails.
    a.cli_ok(&["migrate", "vm", "--to", "10.77.0.2:7450", "--rate", "2M"]);
    b.cli_ok(&["migration", "handoff", "vm"]);
    let (ok, out) = qemu_io(&hosts.b, uri_b, &["read -P 1 0 1M".into()]);
    assert!(ok, "{out}");

    // Slow link (A -> B at 16 Mbit/s): absent regions still read right.
    hosts.set_rate("16mbit");
    faults += 1;
    let (ok, out) = qemu_io(
        &hosts.b,
        uri_b,
        &[format!("read -P {} 40M 1M", fill_byte(40))],
    );
    assert!(ok, "slow link: {out}");

    // Cut the link.
    hosts.set_link(false);
    faults += 1;
    // Present regions are served and written as if nothing happened.
    let t = Instant::now();
    let (ok, out) = qemu_io(
        &hosts.b,
        uri_b,
        &["read -P 1 0 1M".into(), "write -P 200 0 64k".into()],
    );
    assert!(ok, "present region during the cut: {out}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    model[0] = 1; // MiB 0 now holds 64k of 200 then 1s: checked below.
                  // Absent regions wait for the source, then fail with EIO.
    let t = Instant::now();
    let (ok, out) = qemu_io(&hosts.b, uri_b, &["read 60M 4k".into()]);
    let waited = t.elapsed();
    assert!(!ok && out.contains("Input/output error"), "{out}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "absent read during the cut took {waited:?}"
    );
    let s = b.status("vm");
    assert_eq!(s["phase"], "hydrating", "{s}");

    // Restore it: the copy resumes by itself and completes.
    hosts.set_link(true);
    hosts.set_rate("1gbit");
    b.cli_ok(&["migration", "set-rate", "vm", "0"]);
    b.wait_phase("vm", "complete", 120);
    let mut checks: Vec<String> = (1..64)
        .map(|i| format!("read -P {} {}M 1M", model[i as usize], i))
        .collect();
    checks.push("read -P 200 0 64k".into());
    checks.push("read -P 1 64k 960k".into());
    let (ok, out) = qemu_io(&hosts.b, uri_b, &checks);
    assert!(ok, "data after the link came back: {out}");
    wait_until("source not released", 30, || !a.has_volume("vm"));
    println!("FAULTS link: injected={faults} writes_checked=65 bytes_lost=0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_disk_full_stalls_the_copy_until_space_returns() {
    let a = NodeProc::start();
    let bdir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(bdir.path(), "20m");
    let b = NodeProc::start_in(bdir.path());
    a.create("vm1", "48M");
    let ca = client(&a, "vm1").await;
    let mut model = pattern(48 * MIB as usize, 11);
    for (i, chunk) in model.chunks(8 * MIB as usize).enumerate() {
        ca.write(i as u64 * 8 * MIB, chunk, false).await.unwrap();
    }
    ca.flush().await.unwrap();
    drop(ca);
    // Paced, so the disk fills in about a second rather than milliseconds.
    a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--rate", "16M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    // While there is room, read the first region: it is kept (present).
    let cb = client(&b, "vm1").await;
    assert!(cb.read(0, 65536).await.unwrap() == model[..65536]);
    drop(cb);

    // The copy fills the 20 MiB disk and stalls, saying why.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = b.status("vm1");
        if s["stalled"].is_string() {
            break s;
        }
        assert!(Instant::now() < deadline, "never stalled: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s["phase"], "hydrating", "{s}");
    assert!(s["stalled"].as_str().unwrap().contains("disk full"), "{s}");
    let human = b.cli_ok(&["migration", "status", "vm1"]);
    assert!(
        human.contains("stalled:") && human.contains("disk full"),
        "{human}"
    );

    let cb = client(&b, "vm1").await;
    // Every byte reads right: present regions locally, absent ones from
    // the source (nothing can be kept, so nothing is).
    check_all(&cb, &model, "during the stall").await;
    // A write that needs new space fails with ENOSPC and changes nothing.
    let e = cb.write(44 * MIB, &[0xee; 65536], true).await.unwrap_err();
    assert_eq!(errno_of(e), 28, "a full disk must give ENOSPC");
    // A write over data already on disk (the region read above) needs no
    // new space and succeeds.
    cb.write(4096, &[0x42; 8192], true).await.unwrap();
    model[4096..4096 + 8192].fill(0x42);
    let s = b.status("vm1");
    assert!(s["stalled"].is_string(), "{s}");

    // Space returns: the copy resumes by itself and completes.
    fs.resize("200m");
    b.wait_phase("vm1", "complete", 60);
    let s = b.status("vm1");
    assert!(s["stalled"].is_null(), "{s}");
    let cb = client(&b, "vm1").await;
    check_all(&cb, &model, "after resuming").await;
    println!("FAULTS disk-full: injected=1 writes_checked=2 bytes_lost=0");
    drop(cb);
    drop(b);
    drop(fs);
}

/// Twenty volumes migrate at once while clients write and read on the
/// destination; every byte ends up right and every source is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_volumes_migrate_at_once_under_load() {
    const N: usize = 20;
    const SIZE: u64 = 8 * MIB;
    let a = NodeProc::start();
    let b = NodeProc::start();
    let mut models = Vec::new();
    for v in 0..N {
        let name = format!("vol{v}");
        a.create(&name, "8M");
        let c = client(&a, &name).await;
        let m = pattern(SIZE as usize, 1000 + v as u64);
        c.write(0, &m, false).await.unwrap();
        c.flush().await.unwrap();
        models.push(m);
    }
    for v in 0..N {
        let name = format!("vol{v}");
        a.cli_ok(&["migrate", &name, "--to", &b.api, "--rate", "1M"]);
        b.cli_ok(&["migration", "handoff", &name]);
    }
    // Load: clients on every volume of B write and read back while the
    // twenty copies run, each checking against its model.
    let mut tasks = tokio::task::JoinSet::new();
    for (v, mut m) in models.into_iter().enumerate() {
        let c = client(&b, &format!("vol{v}")).await;
        tasks.spawn(async move {
            let mut x = 0x9e37_79b9u64 + v as u64;
            let mut writes = 0u64;
            for round in 0..40u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 512 + (x % 60_000) as usize;
                let off = (x >> 20) % (SIZE - len as u64);
                let data = pattern(len, x ^ round);
                c.write(off, &data, round % 5 == 0).await.unwrap();
                m[off as usize..off as usize + len].copy_from_slice(&data);
                writes += 1;
                let roff = (x >> 30) % (SIZE - 65536);
                let got = c.read(roff, 65536).await.unwrap();
                assert!(
                    got == m[roff as usize..roff as usize + 65536],
                    "vol{v}: stale or wrong read at {roff} in round {round}"
                );
            }
            c.flush().await.unwrap();
            (v, m, writes)
        });
    }
    let mut done = Vec::new();
    while let Some(r) = tasks.join_next().await {
        done.push(r.unwrap());
    }
    let mut writes = 0;
    for v in 0..N {
        // Some may have completed already (then there is no rate to set).
        let _ = b.cli(&["migration", "set-rate", &format!("vol{v}"), "0"]);
    }
    for (v, m, w) in &done {
        writes += w;
        let name = format!("vol{v}");
        b.wait_phase(&name, "complete", 120);
        let c = client(&b, &name).await;
        let got = c.read(0, SIZE as u32).await.unwrap();
        assert!(&got == m, "{name}: wrong data after migration");
    }
    for v in 0..N {
        let name = format!("vol{v}");
        wait_until(&format!("{name} released on A"), 60, || {
            !a.has_volume(&name)
        });
    }
    println!("FAULTS twenty: volumes={N} writes_checked={writes} bytes_lost=0");
}
