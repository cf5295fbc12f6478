//! Steering and counters that act on, or report, the wrong
//! migration. Each test states the invariant it checks; a failure was a
//! finding of an adversarial review (fixed).

mod common;

use common::{client, pattern, wait_until, NodeProc};
use dlsm::api::types::MigrationStatus;
use dlsm::api_client::{status_of, Api};

const MIB: u64 = 1 << 20;

async fn filled(node: &NodeProc, mib: u64, seed: u64) {
    let c = client(node, "vm1").await;
    let data = pattern((mib * MIB) as usize, seed);
    for (i, piece) in data.chunks(8 << 20).enumerate() {
        c.write((i << 23) as u64, piece, false).await.unwrap();
    }
    c.flush().await.unwrap();
}

fn migrate(a: &NodeProc, b: &NodeProc, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", "vm1", "--to", &b.api, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&a.cli_ok(&args)).unwrap()
}

/// `?id=` given to a pure source is "the migration meant; refused (409) if
/// the node holds another". The source ignores it and forwards its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_refuses_to_steer_another_migration() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "16M");
    filled(&a, 16, 1).await;
    let _m = migrate(&a, &b, &["--rate", "256K"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    let r = Api::new(&a.api).post::<MigrationStatus>(
        "/v1/migrations/vm1/pause?id=0123456789abcdef",
        &serde_json::Value::Null,
    );
    let paused = b.status("vm1")["paused"].clone();
    assert_eq!(
        r.as_ref().err().and_then(status_of),
        Some(409),
        "pause?id=<another migration> on the source: {:?}; destination paused={paused}",
        r.map(|s| (s.id, s.paused))
    );
}

/// What a source with a stale outgoing M1 forwards (`pause?id=M1`) to its
/// destination B, once B completed M1 and moved the volume on (M2, B -> C):
/// B must refuse it, not pause M2 at C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_steer_never_acts_on_the_next_migration() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let c = NodeProc::start();
    a.create("vm1", "16M");
    // Empty: the handoff marks every region present, M1 completes at once.
    let m1 = migrate(&a, &b, &[]);
    let m1 = m1["id"].as_str().unwrap().to_owned();
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "complete", 30);
    wait_until("a released", 30, || !a.has_volume("vm1"));
    filled(&b, 16, 2).await;
    let m2 = migrate(&b, &c, &["--rate", "256K"]);
    c.cli_ok(&["migration", "handoff", "vm1"]);
    assert_eq!(c.status("vm1")["paused"], false);
    let r = Api::new(&b.api).post::<MigrationStatus>(
        &format!("/v1/migrations/vm1/pause?id={m1}"),
        &serde_json::Value::Null,
    );
    let at_c = c.status("vm1");
    assert!(
        r.is_err() && at_c["paused"] == false,
        "pause?id={m1} (the completed M1) paused migration {} at C: answer {:?}, C: {at_c}",
        m2["id"],
        r.map(|s| (s.id, s.paused))
    );
}

/// A rollback clone is made in the volume's own directory, where an earlier
/// incoming migration left `counters.json`: the rollback must not report
/// the earlier migration's bytes as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_clone_does_not_inherit_old_counters() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    a.create("vm1", "8M");
    filled(&a, 8, 3).await;
    // M1: A -> B, all 8 MiB cross and B completes (its counters.json stays).
    migrate(&a, &b, &[]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    let done = b.wait_phase("vm1", "complete", 60);
    assert!(
        done["bytes_background"].as_u64().unwrap() + done["bytes_on_demand"].as_u64().unwrap()
            >= 8 * MIB
    );
    wait_until("a released", 30, || !a.has_volume("vm1"));
    // M2: B -> A, slowly; handed off at A.
    migrate(&b, &a, &["--rate", "64K"]);
    a.cli_ok(&["migration", "handoff", "vm1"]);
    // Cancel after handoff: rollback R, whose clone is B's own directory.
    let r: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["migration", "cancel", "vm1", "--json"])).unwrap();
    let s = b.status("vm1");
    assert!(!s["rollback_of"].is_null(), "{s} {r}");
    assert_eq!(s["phase"], "passthrough", "{s}");
    let moved = s["bytes_background"].as_u64().unwrap() + s["bytes_on_demand"].as_u64().unwrap();
    assert_eq!(
        moved, 0,
        "rollback {} not handed off, nothing fetched, yet reports {moved} bytes copied: {s}",
        r["migration"]
    );
}
