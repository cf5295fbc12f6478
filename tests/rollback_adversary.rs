//! The rollback under attack: what an adversarial review of it found (each
//! failed before its fix). Each test states the
//! sequence it drives and the invariant it expects to hold.

mod common;

use std::time::{Duration, Instant};

use common::{client, pattern, NodeProc};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const RS: u64 = 64 * 1024;

/// A write at the destination whose written bit became durable but whose
/// data never landed (a partial write to an absent region whose fetch
/// failed: the source was down) leaves a region that is *written* in
/// written.map but *absent* in the destination's region map. The rollback
/// then asks the destination for that region; the destination must fetch
/// it from the old source's `vol@@M` export, which the old source refuses
/// once the rollback handed off (and the destination's urgent origin
/// connection died with the source). Expected: the rollback completes and
/// the region reads as the source's copy (the failed write never landed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_written_but_absent_region_does_not_wedge_the_rollback() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = NodeProc::start_with(
        da.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--source-timeout", "3"],
    );
    let b = NodeProc::start_with(
        db.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--source-timeout", "3"],
    );
    a.create("vm1", "16M");
    let base = pattern(SIZE as usize, 7);
    {
        let ca = client(&a, "vm1").await;
        for (i, piece) in base.chunks(4 * MIB as usize).enumerate() {
            ca.write(i as u64 * 4 * MIB, piece, false).await.unwrap();
        }
        ca.flush().await.unwrap();
    }
    a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--rate", "64K"]);
    let cb = client(&b, "vm1").await;
    // Hand off with a whole-region write (no fetch), then stop the copier.
    let mut model = base.clone();
    let w = pattern(RS as usize, 9);
    cb.write(8 * MIB, &w, false).await.unwrap();
    model[(8 * MIB) as usize..(8 * MIB + RS) as usize].copy_from_slice(&w);
    cb.flush().await.unwrap();
    b.cli_ok(&["migration", "pause", "vm1"]);
    // The source dies; a partial write of an absent region near the end
    // records its bit durably, then fails fetching the region.
    a.kill();
    let r = cb.write(15 * MIB + 4096, b"never lands", false).await;
    assert!(
        r.is_err(),
        "a partial write of an absent region succeeded with the source down"
    );
    a.restart();
    // Roll back, from the source, and hand off the rollback.
    a.cli_ok(&["migration", "cancel", "vm1"]);
    drop(cb);
    a.cli_ok(&["migration", "handoff", "vm1"]);
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let s = a.status("vm1");
        if s["phase"] == "complete" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollback never completes (the written-but-absent region cannot be fetched \
             back): {s}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let ca = client(&a, "vm1").await;
    let got = ca.read(15 * MIB, RS as u32).await.unwrap();
    assert!(got == model[(15 * MIB) as usize..(15 * MIB + RS) as usize]);
    let got = ca.read(8 * MIB, RS as u32).await.unwrap();
    assert!(got == model[(8 * MIB) as usize..(8 * MIB + RS) as usize]);
}

/// `migration cancel` forwarded from a destination to its source carries
/// no migration identity, and the source's `cancel_anywhere` rolls back
/// whatever it holds that was handed off. X -> S (M0, handed off, S still
/// hydrating), S -> D (M1, not handed off); D is down while the operator
/// cancels M1 on S with --force, so D comes back with an orphan clone of
/// M1. Cancelling that orphan on D asks S to "cancel", and S rolls back
/// M0 (an unrelated migration) to X. Expected: the orphan clone at D is
/// dropped, and M0 is left alone (X stays M0's fenced source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_forwarded_cancel_never_rolls_back_another_migration() {
    let x = NodeProc::start();
    let s = NodeProc::start();
    let mut d = NodeProc::start();
    x.create("vm1", "16M");
    {
        let cx = client(&x, "vm1").await;
        cx.write(0, &pattern(SIZE as usize, 5), false)
            .await
            .unwrap();
        cx.flush().await.unwrap();
    }
    x.cli_ok(&["migrate", "vm1", "--to", &s.api, "--rate", "64K"]);
    {
        // Hand M0 off with a whole-region write at S.
        let cs = client(&s, "vm1").await;
        cs.write(0, &pattern(RS as usize, 6), false).await.unwrap();
        cs.flush().await.unwrap();
    }
    let m0 = s.status("vm1")["id"].as_str().unwrap().to_owned();
    s.cli_ok(&["migrate", "vm1", "--to", &d.api]);
    d.kill();
    s.cli_ok(&["migration", "cancel", "vm1", "--force"]);
    d.restart();
    // The operator drops the orphan at D.
    let o = d.cli(&["migration", "cancel", "vm1", "--json"]);
    println!(
        "cancel at D: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::thread::sleep(Duration::from_secs(1));
    let xs = x.cli(&["migration", "status", "vm1", "--json"]);
    let xs = String::from_utf8_lossy(&xs.stdout).to_string();
    assert!(
        !xs.contains("rollback_of"),
        "cancelling M1's orphan clone at D rolled back M0 ({m0}) from S to X: {xs}"
    );
}

/// A rollback is never handed off by force, and its handoff fences the
/// destination durably first: a destination that restarts *unfenced* with
/// an outgoing rollback knows the rollback did not hand off. Yet it holds
/// writes until the old source answers, and `cancel --force` is refused
/// while writes are held: with the old source dead, the one node holding
/// the newest data can never take a write again. Sequence: S -> D handed
/// off with writes at D; cancel (rollback R prepared at S); S dies for
/// good; D is killed and restarts. Expected: D takes writes (or at least
/// `migration cancel --force` on D gives them back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_dead_old_source_does_not_hold_the_destination_forever() {
    let mut s = NodeProc::start();
    let mut d = NodeProc::start();
    s.create("vm1", "16M");
    {
        let c = client(&s, "vm1").await;
        c.write(0, &pattern(SIZE as usize, 5), false).await.unwrap();
        c.flush().await.unwrap();
    }
    s.cli_ok(&["migrate", "vm1", "--to", &d.api, "--rate", "64K"]);
    {
        let c = client(&d, "vm1").await;
        c.write(0, &pattern(RS as usize, 6), false).await.unwrap();
        c.flush().await.unwrap();
    }
    s.cli_ok(&["migration", "cancel", "vm1"]);
    s.kill();
    d.restart();
    let c = client(&d, "vm1").await;
    std::thread::sleep(Duration::from_secs(2));
    if c.write(RS, b"after the restart", false).await.is_ok() {
        return;
    }
    let o = d.cli(&["migration", "cancel", "vm1", "--force"]);
    let r = c.write(RS, b"after the restart", false).await;
    assert!(
        r.is_ok(),
        "the destination, sole holder of the volume, cannot take writes while the old \
         source is down, and cancel --force does not help: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
