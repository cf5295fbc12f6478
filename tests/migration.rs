//! Live migration between real nodes: the six invariants of DESIGN.md, the
//! handoff triggers, hydration control, crash and source loss, chains, and
//! interop with real clients during hydration.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, errno_of, pattern, require, run_ok, wait_until, Model, NodeProc};
use dlsm::nbd::client::{ClientError, NbdClient};

const MIB: u64 = 1 << 20;

/// Creates `vm1` of `mib` MiB on `node`, written all over with a seeded
/// pattern and flushed; returns its model.
async fn filled_vm1(node: &NodeProc, mib: u64, seed: u64) -> Model {
    node.create("vm1", &format!("{mib}M"));
    let c = client(node, "vm1").await;
    let mut model = Model::new(mib * MIB);
    model
        .write(&c, 0, &pattern((mib * MIB) as usize, seed))
        .await;
    c.flush().await.unwrap();
    model
}

/// Writes 1 MiB of data every 10 MiB: a 10%-allocated volume.
async fn fill_sparse(c: &NbdClient, m: &mut Model, seed: u64) -> u64 {
    let mut allocated = 0;
    let size = m.0.len() as u64;
    let mut off = 0;
    while off + MIB <= size {
        m.write(c, off, &pattern(MIB as usize, seed + off)).await;
        allocated += MIB;
        off += 10 * MIB;
    }
    c.flush().await.unwrap();
    allocated
}

fn migrate(a: &NodeProc, b: &NodeProc, vol: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", vol, "--to", &b.api, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&a.cli_ok(&args)).unwrap()
}

/// The end of a fault test: lifts `vm1`'s rate limit on destination `b`,
/// waits for completion, checks every byte against `model`, and prints the
/// test's `FAULTS` line (collected by `scripts/fault-figures.sh`).
async fn complete_and_report(
    b: &NodeProc,
    cb: &NbdClient,
    model: &Model,
    name: &str,
    injected: u32,
    writes_checked: u32,
) {
    // Lifts a rate limit if the copy is still running (an unlimited one
    // may have completed already: then there is no rate to set).
    let _ = b.cli(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    model.check(cb).await;
    println!(
        "FAULTS {name}: injected={injected} writes_checked={writes_checked} bytes_checked={} bytes_lost=0",
        model.0.len()
    );
}

/// A destination that gives up on an unreachable source after 2 s.
fn impatient_node() -> NodeProc {
    let tmp = tempfile::tempdir().unwrap().keep();
    NodeProc::start_with(
        &tmp,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--source-timeout", "2"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_fencing_no_stale_reads_and_release() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "100M");
    let ca = client(&a, "vm1").await;
    let mut model = Model::new(100 * MIB);
    let allocated = fill_sparse(&ca, &mut model, 1).await;

    let s = migrate(&a, &b, "vm1", &[]);
    assert_eq!(s["phase"], "passthrough");
    assert_eq!(s["role"], "source");
    let cb = client(&b, "vm1").await;

    // Passthrough: B serves A's bytes and keeps nothing (invariant 2).
    assert_eq!(cb.read(0, 4096).await.unwrap(), model.0[..4096]);
    model.write(&ca, 0, &[0xab; 4096]).await; // A is still the writer
    assert_eq!(
        cb.read(0, 4096).await.unwrap(),
        vec![0xab; 4096],
        "stale read at B"
    );
    assert_eq!(b.status("vm1")["regions_present"], 0);

    // The first write at B hands off; from then on A refuses writes (invariant 1).
    model.write(&cb, 5 * MIB + 100, b"written at B").await;
    let e = ca.write(0, b"late write at A", false).await.unwrap_err();
    assert_eq!(
        errno_of(e),
        1,
        "a write at the source after handoff must fail with EPERM"
    );
    let e = ca.trim(0, 4096).await.unwrap_err();
    assert_eq!(errno_of(e), 1);
    assert!(a
        .cli_ok(&["volume", "show", "vm1", "--json"])
        .contains(&b.api));

    let done = b.wait_phase("vm1", "complete", 60);
    // Holes never cross the wire; allocated bytes cross once (invariant 5).
    let wire =
        done["bytes_on_demand"].as_u64().unwrap() + done["bytes_background"].as_u64().unwrap();
    assert!(
        wire as f64 <= allocated as f64 * 1.01 + 65536.0,
        "{wire} bytes moved for {allocated} allocated: {done}"
    );
    assert!(
        done["bytes_skipped"].as_u64().unwrap() >= 80 * MIB,
        "{done}"
    );
    // The source copy is released, the destination is plain local.
    wait_until("source copy not released", 10, || !a.has_volume("vm1"));
    let v: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["volume", "show", "vm1", "--json"])).unwrap();
    assert_eq!(v["table"]["kind"], "local");
    drop(cb);
    model.check(&client(&b, "vm1").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_when_the_last_source_writer_leaves() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "32M");
    let ca = client(&a, "vm1").await;
    let mut model = Model::new(32 * MIB);
    fill_sparse(&ca, &mut model, 2).await;
    migrate(&a, &b, "vm1", &["--keep-source"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.status("vm1")["phase"],
        "passthrough",
        "handoff before the writer left"
    );
    ca.disconnect().await.unwrap();
    drop(ca);
    b.wait_phase("vm1", "complete", 60);
    // --keep-source: A keeps its copy, fenced.
    std::thread::sleep(Duration::from_millis(500));
    let v: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["volume", "show", "vm1", "--json"])).unwrap();
    assert_eq!(v["fenced_to"].as_str(), Some(b.api.as_str()));
    let ca = client(&a, "vm1").await;
    assert_eq!(errno_of(ca.write(0, b"x", false).await.unwrap_err()), 1);
    model.check(&client(&b, "vm1").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_handoff_pause_resume_and_rate() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "64M");
    let ca = client(&a, "vm1").await;
    let mut model = Model::new(64 * MIB);
    for i in 0..32 {
        model
            .write(&ca, i * 2 * MIB, &pattern(MIB as usize, i))
            .await;
    }
    ca.flush().await.unwrap();
    drop(ca);
    migrate(&a, &b, "vm1", &["--rate", "4M"]);
    let s: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["migration", "handoff", "vm1", "--json"])).unwrap();
    assert_eq!(s["phase"], "hydrating");
    assert_eq!(s["rate_limit"], 4 * MIB);
    b.cli_ok(&["migration", "pause", "vm1"]);
    std::thread::sleep(Duration::from_millis(600));
    let p1 = b.status("vm1")["regions_present"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let s2 = b.status("vm1");
    assert_eq!(s2["paused"], true);
    assert_eq!(
        s2["regions_present"].as_u64().unwrap(),
        p1,
        "copying while paused"
    );
    assert!(p1 < 1024, "finished before pause: rate limit ignored");
    // On-demand reads go on while paused.
    let cb = client(&b, "vm1").await;
    assert_eq!(
        cb.read(62 * MIB, 4096).await.unwrap(),
        model.0[62 * MIB as usize..][..4096]
    );
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.cli_ok(&["migration", "resume", "vm1"]);
    let done = b.wait_phase("vm1", "complete", 60);
    assert!(done["bytes_on_demand"].as_u64().unwrap() >= 65536, "{done}");
    model.check(&cb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_never_lose_to_fetches() {
    // Invariant 3 under concurrency: many clients write partial regions that
    // are still absent while the hydrator and on-demand fetches run.
    let a = NodeProc::start();
    let b = NodeProc::start();
    let mut model = filled_vm1(&a, 32, 9).await;
    migrate(&a, &b, "vm1", &["--rate", "8M", "--region-size", "16K"]);
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let c = client(&b, "vm1").await;
        tasks.push(tokio::spawn(async move {
            let mut writes = Vec::new();
            for i in 0..200u64 {
                // Client t owns bytes [t*4M, (t+1)*4M); writes are unaligned
                // and span regions.
                let off = t * 4 * MIB + (i * 20_011) % (4 * MIB - 5000);
                let data = pattern(1000 + (i as usize * 37) % 3000, t * 1000 + i);
                c.write(off, &data, i % 50 == 0).await.unwrap();
                writes.push((off, data));
                let r = c.read(off, 10).await.unwrap();
                assert_eq!(r, writes.last().unwrap().1[..10]);
            }
            c.flush().await.unwrap();
            writes
        }));
    }
    for t in tasks {
        for (off, data) in t.await.unwrap() {
            model.0[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    // On a loaded machine the copy may have completed meanwhile.
    let _ = b.cli(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    model.check(&client(&b, "vm1").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_and_restarted_resumes_without_loss() {
    let a = NodeProc::start();
    let mut b = NodeProc::start();
    let mut model = filled_vm1(&a, 48, 5).await;
    migrate(&a, &b, "vm1", &["--rate", "6M"]);
    let mut written = Vec::new();
    for round in 0..3u64 {
        let cb = client(&b, "vm1").await;
        // Flushed writes, some on absent regions, must survive kill -9.
        for i in 0..20u64 {
            let off = (round * 7 + i * 2_399_999) % (48 * MIB - 9000);
            model.write(&cb, off, &pattern(9000, round * 100 + i)).await;
            written.push(off);
        }
        cb.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300 + round * 200)).await;
        drop(cb);
        b.restart();
        let s = b.status("vm1");
        assert_eq!(s["phase"], "hydrating", "round {round}: {s}");
        // Every flushed write so far is there (reading only those ranges,
        // so that most of the volume stays absent for the next round).
        let cb = client(&b, "vm1").await;
        for &off in &written {
            let got = cb.read(off, 9000).await.unwrap();
            assert!(
                got == model.0[off as usize..off as usize + 9000],
                "round {round}: write at {off} lost"
            );
        }
    }
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    model.check(&client(&b, "vm1").await).await;
    // The completed migration's status survives a restart.
    b.restart();
    let s = b.status("vm1");
    assert_eq!(s["phase"], "complete", "{s}");
    assert_eq!(s["role"], "destination", "{s}");
    println!(
        "FAULTS destination-kill: injected=3 writes_checked={} bytes_checked={} bytes_lost=0",
        written.len(),
        model.0.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_loss_is_contained_and_migration_resumes() {
    let mut a = NodeProc::start();
    let b = impatient_node();
    let mut model = filled_vm1(&a, 32, 7).await;
    migrate(&a, &b, "vm1", &["--rate", "1M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    let cb = client(&b, "vm1").await;
    // Make the first MiB present, then lose the source.
    assert_eq!(
        cb.read(0, MIB as u32).await.unwrap(),
        model.0[..MIB as usize]
    );
    a.kill();
    let t = Instant::now();
    assert_eq!(
        cb.read(4096, 4096).await.unwrap(),
        model.0[4096..8192],
        "present region failed"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "present region waited for the source"
    );
    let t = Instant::now();
    let e = cb.read(30 * MIB, 4096).await.unwrap_err();
    assert_eq!(errno_of(e), 5, "absent region must fail with EIO");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // Writes to present regions still work without the source.
    model.write(&cb, 100, b"still writable").await;
    cb.flush().await.unwrap();
    // The source returns: everything resumes by itself.
    a.restart();
    assert_eq!(
        cb.read(30 * MIB, 4096).await.unwrap(),
        model.0[30 * MIB as usize..][..4096]
    );
    complete_and_report(&b, &cb, &model, "source-kill", 1, 1).await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_a_to_b_to_c_while_b_still_hydrates() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let c = NodeProc::start();
    let mut model = filled_vm1(&a, 40, 11).await;
    migrate(&a, &b, "vm1", &["--rate", "2M"]);
    let cb = client(&b, "vm1").await;
    model.write(&cb, 3 * MIB, b"written at B").await;
    cb.flush().await.unwrap();
    drop(cb);
    assert_eq!(b.status("vm1")["phase"], "hydrating");
    migrate(&b, &c, "vm1", &[]);
    let cc = client(&c, "vm1").await;
    model.write(&cc, 7 * MIB, b"written at C").await;
    c.wait_phase("vm1", "complete", 60);
    model.check(&cc).await;
    // B released (and, as it no longer needs A, released A too).
    wait_until("chain sources not released", 15, || {
        !(b.has_volume("vm1") || a.has_volume("vm1"))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_read_the_destination_during_hydration() {
    require("qemu-img");
    require("nbdcopy");
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "32M");
    let ca = client(&a, "vm1").await;
    let mut model = Model::new(32 * MIB);
    fill_sparse(&ca, &mut model, 3).await;
    model
        .write(&ca, 15 * MIB, &pattern(3 * MIB as usize, 4))
        .await;
    ca.flush().await.unwrap();
    drop(ca);
    migrate(&a, &b, "vm1", &["--rate", "1M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    let s = b.status("vm1");
    assert_eq!(s["phase"], "hydrating", "{s}");
    assert!(
        s["regions_present"].as_u64() < s["regions_total"].as_u64(),
        "{s}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let expect = tmp.path().join("expect.raw");
    std::fs::write(&expect, &model.0).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&expect)
            .arg(b.uri("vm1")),
    );
    let copy = tmp.path().join("copy.raw");
    run_ok(Command::new("nbdcopy").arg(b.uri("vm1")).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == model.0,
        "nbdcopy read wrong bytes"
    );
    let s = b.status("vm1");
    assert!(
        s["bytes_on_demand"].as_u64().unwrap() > 0,
        "reads were not served on demand: {s}"
    );
}

#[test]
fn one_tib_sparse_volume_migrates_in_constant_time_and_small_memory() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("big", "1T");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 7 512G 1M", &a.uri("big")]));
    let t = Instant::now();
    migrate(&a, &b, "big", &[]);
    let prepare = t.elapsed();
    assert!(prepare < Duration::from_secs(5), "prepare took {prepare:?}");
    b.cli_ok(&["migration", "handoff", "big"]);
    let done = b.wait_phase("big", "complete", 120);
    assert_eq!(
        done["bytes_background"].as_u64().unwrap() + done["bytes_on_demand"].as_u64().unwrap(),
        MIB,
        "{done}"
    );
    let rss = b.rss();
    assert!(
        rss < 100 << 20,
        "destination RSS {rss} during a 1 TiB migration"
    );
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 7 512G 1M",
        "-c",
        "read -P 0 0 1M",
        &b.uri("big"),
    ]));
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn bad_migration_requests_get_clear_errors() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "8M");
    let err = |n: &NodeProc, args: &[&str]| {
        let o = n.cli(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8(o.stderr).unwrap()
    };
    assert!(err(&a, &["migrate", "nope", "--to", &b.api]).contains("HTTP 404"));
    assert!(err(&a, &["migrate", "vm1", "--to", "127.0.0.1:1"]).contains("HTTP 502"));
    assert!(a
        .cli_ok(&["volume", "show", "vm1", "--json"])
        .contains("\"fenced_to\": null"));
    assert!(err(
        &a,
        &["migrate", "vm1", "--to", &b.api, "--region-size", "1000"]
    )
    .contains("power of two"));
    b.create("vm1", "8M");
    assert!(err(&a, &["migrate", "vm1", "--to", &b.api]).contains("already exists"));
    assert!(err(&b, &["migration", "status", "vm1"]).contains("not migrating"));
    assert!(err(&b, &["migration", "pause", "vm2"]).contains("HTTP 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_region_writes_fetch_nothing_and_sequential_reads_prefetch() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let mut model = filled_vm1(&a, 16, 21).await;
    migrate(&a, &b, "vm1", &[]);
    b.cli_ok(&["migration", "pause", "vm1"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    let cb = client(&b, "vm1").await;
    // A write covering two whole 64 KiB regions needs no fetch.
    model.write(&cb, 4 * MIB, &pattern(128 << 10, 22)).await;
    let s = b.status("vm1");
    assert_eq!(s["bytes_on_demand"], 0, "whole-region write fetched: {s}");
    assert_eq!(s["regions_present"], 2, "{s}");
    // A partial write to an absent region fetches that region first.
    model.write(&cb, 6 * MIB + 1000, b"partial").await;
    let s = b.status("vm1");
    assert_eq!(s["bytes_on_demand"], 65536, "{s}");
    // Two sequential on-demand reads make the node read ahead, even paused.
    assert_eq!(
        cb.read(8 * MIB, 65536).await.unwrap(),
        model.0[8 * MIB as usize..][..65536]
    );
    assert_eq!(
        cb.read(8 * MIB + 65536, 65536).await.unwrap(),
        model.0[8 * MIB as usize + 65536..][..65536]
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = b.status("vm1");
        if s["regions_present"].as_u64().unwrap() >= 3 + 2 + 16 {
            assert!(s["bytes_background"].as_u64().unwrap() >= 16 * 65536, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "no read-ahead: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.cli_ok(&["migration", "resume", "vm1"]);
    b.wait_phase("vm1", "complete", 60);
    model.check(&cb).await;
}

/// The source dies before handoff. The destination cannot fence it, so it
/// takes no write (single writer): a write there waits, then fails with EIO
/// and changes nothing; reads (passed through) fail the same way. When the
/// source returns, the next write hands off, fences it, and the migration
/// completes with every byte right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_lost_before_handoff_takes_no_write_until_it_returns() {
    let mut a = NodeProc::start();
    let b = impatient_node();
    let mut model = filled_vm1(&a, 16, 21).await;
    migrate(&a, &b, "vm1", &[]);
    let cb = client(&b, "vm1").await;
    assert_eq!(cb.read(0, 4096).await.unwrap(), model.0[..4096]);
    assert_eq!(b.status("vm1")["phase"], "passthrough");

    a.kill();
    let t = Instant::now();
    let e = cb.write(MIB, &[0xab; 65536], true).await.unwrap_err();
    assert_eq!(
        errno_of(e),
        5,
        "a write without fencing the source must fail"
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert_eq!(errno_of(cb.read(0, 4096).await.unwrap_err()), 5);
    assert_eq!(b.status("vm1")["phase"], "passthrough");

    // The source returns with its data. It holds writes until the
    // destination says it never took the volume (one round trip); then its
    // clients may write there until the handoff.
    a.restart();
    let ca = client(&a, "vm1").await;
    let held_until = Instant::now() + Duration::from_secs(10);
    loop {
        match ca.write(2 * MIB, b"probe", true).await {
            Ok(()) => break,
            Err(ClientError::Server { errno: 1, message }) if message.contains("writes held") => {
                assert!(Instant::now() < held_until, "A held its writes for 10 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("write at the restarted source: {e}"),
        }
    }
    model
        .write(&ca, 2 * MIB, b"written at A after its restart")
        .await;
    ca.flush().await.unwrap();
    // The next write at B hands off; A is fenced.
    model.write(&cb, MIB, &[0xab; 65536]).await;
    cb.flush().await.unwrap();
    assert_eq!(errno_of(ca.write(0, b"late", true).await.unwrap_err()), 1);
    complete_and_report(&b, &cb, &model, "source-lost-before-handoff", 1, 4).await;
}

/// The source dies before handoff and the operator forces it (`migration
/// handoff --force`: the source is gone and its VM with it). The
/// destination takes ownership: writes covering whole regions need nothing
/// from the source and succeed, reads of what they wrote are right, reads
/// of absent regions fail with EIO after the timeout. If the source comes
/// back after all, the destination fences it before reading anything more
/// from it (a client still attached there cannot write behind its back),
/// and the copy resumes and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_handoff_with_the_source_dead() {
    let mut a = NodeProc::start();
    let mut b = impatient_node();
    let mut model = filled_vm1(&a, 16, 22).await;
    migrate(&a, &b, "vm1", &[]);
    a.kill();

    // Without --force the handoff is refused: the source cannot be fenced.
    let o = b.cli(&["migration", "handoff", "vm1"]);
    assert!(!o.status.success(), "handoff without fencing the source");
    b.cli_ok(&["migration", "handoff", "vm1", "--force"]);
    let s = b.status("vm1");
    assert_eq!(s["phase"], "hydrating", "{s}");
    assert!(s["stalled"].as_str().unwrap().contains("fenced"), "{s}");
    let cb = client(&b, "vm1").await;
    // A whole 64 KiB region: nothing to fetch.
    model.write(&cb, 4 * MIB, &[0x77; 65536]).await;
    cb.flush().await.unwrap();
    assert_eq!(cb.read(4 * MIB, 65536).await.unwrap(), vec![0x77; 65536]);
    // Part of an absent region needs the source: EIO, nothing changed.
    assert_eq!(
        errno_of(cb.write(6 * MIB + 100, b"partial", true).await.unwrap_err()),
        5
    );
    assert_eq!(errno_of(cb.read(8 * MIB, 4096).await.unwrap_err()), 5);

    // The destination restarts meanwhile: it remembers that the source
    // still has to be fenced (the table says so), and what was written.
    drop(cb);
    b.restart();
    let cb = client(&b, "vm1").await;
    assert_eq!(cb.read(4 * MIB, 65536).await.unwrap(), vec![0x77; 65536]);

    // The source comes back after all. The destination fences it first.
    b.cli_ok(&["migration", "set-rate", "vm1", "1M"]);
    a.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&a.cli_ok(&["volume", "show", "vm1", "--json"])).unwrap();
        if v["fenced_to"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the returning source was never fenced: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ca = client(&a, "vm1").await;
    assert_eq!(
        errno_of(ca.write(0, b"zombie", true).await.unwrap_err()),
        1,
        "the returning source took a write"
    );
    drop(ca);
    // Then the copy resumes (no longer stalled, once B has its answer) and
    // completes.
    wait_until("the copy resumes once the source is fenced", 10, || {
        b.status("vm1")["stalled"].is_null()
    });
    complete_and_report(&b, &cb, &model, "forced-handoff", 2, 3).await;
    drop(a);
}

/// The bulk data path (source reads and destination writes around the
/// page cache, `O_DIRECT`) keeps every guarantee of the buffered one:
/// guest writes mixed with the copy read back right during hydration;
/// right after a kill -9 of the destination mid-copy, every region its
/// on-disk map calls present holds the right bytes in its data file;
/// after the restart and completion, and after another restart, every
/// byte reads back through NBD (buffered reads of directly written data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_copy_reads_back_during_after_and_across_kill() {
    const RS: u64 = 64 << 10;
    let a = NodeProc::start();
    let mut b = NodeProc::start();
    let mut model = filled_vm1(&a, 128, 41).await;
    // Slow enough to be mid-copy when killed, fast enough to copy a lot.
    migrate(&a, &b, "vm1", &["--rate", "12M"]);
    let cb = client(&b, "vm1").await;
    let mut i = 0u64;
    while i < 60 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Whole regions (no fetch), partial ones (fetch first), spans.
        let (off, len) = match i % 3 {
            0 => ((i * 13 % 2048) * RS, RS as usize),
            1 => ((i * 29 % 2000) * RS + 5000, 9000),
            _ => ((i * 37 % 1990) * RS + RS / 2, 2 * RS as usize),
        };
        model.write(&cb, off, &pattern(len, 500 + i)).await;
        // What was just written, and somewhere the copier may be at.
        let got = cb.read(off, len as u32).await.unwrap();
        assert!(
            got == model.0[off as usize..off as usize + len],
            "write {i} at {off}"
        );
        let far = (i * 7919 % 2040) * RS;
        let got = cb.read(far, 3 * RS as u32).await.unwrap();
        assert!(
            got == model.0[far as usize..(far + 3 * RS) as usize],
            "read {i} at {far}"
        );
        if i.is_multiple_of(8) {
            cb.flush().await.unwrap();
        }
        i += 1;
    }
    cb.flush().await.unwrap();
    drop(cb);
    let s = b.status("vm1");
    assert_eq!(s["phase"], "hydrating", "{s}");
    assert!(s["bytes_background"].as_u64().unwrap() > 0, "{s}");
    b.kill();

    // Straight after the crash: the on-disk map against the data file.
    let dir = b.data_dir.join("volumes/vm1");
    let map = dlsm::migrate::region_map::RegionMap::open(&dir.join("regions.map")).unwrap();
    let data = std::fs::read(dir.join("data.raw")).unwrap();
    let mut present = 0;
    for r in 0..map.regions() {
        if map.is_present(r) {
            present += 1;
            let (s, e) = ((r * RS) as usize, ((r + 1) * RS) as usize);
            assert!(
                data[s..e] == model.0[s..e],
                "region {r} marked present without its data"
            );
        }
    }
    assert!(
        present > 0 && present < map.regions(),
        "killed mid-copy: {present} of {} regions present",
        map.regions()
    );
    drop(data);

    b.restart();
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    model
        .check_as(&client(&b, "vm1").await, "after completion")
        .await;
    b.restart();
    model
        .check_as(&client(&b, "vm1").await, "after a restart")
        .await;
    println!(
        "direct-io: {i} writes mixed with the copy, {present} regions present at the kill, all checked"
    );
}
