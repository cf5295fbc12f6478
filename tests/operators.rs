//! What an operator sees of and does to migrations, against real nodes:
//! `GET /v1/migrations` in every role with the persisted history, steering
//! from either node, and a status that tells the truth (paused copies have
//! no rate, errors clear on recovery, counters survive a restart, a removed
//! destination is named as such).

mod common;

use std::time::Duration;

use common::{client, pattern, wait_until, NodeProc};
use dlsm::api::types::MigrationStatus;
use dlsm::api_client::Api;

const MIB: u64 = 1 << 20;

fn list(node: &NodeProc) -> Vec<MigrationStatus> {
    Api::new(&node.api).get("/v1/migrations").unwrap()
}

fn status(node: &NodeProc, vol: &str) -> serde_json::Value {
    node.status(vol)
}

/// `vm1` of `mib` MiB on `node`, written all over (so every region has to
/// cross the network).
async fn filled(node: &NodeProc, mib: u64) -> Vec<u8> {
    node.create("vm1", &format!("{mib}M"));
    let c = client(node, "vm1").await;
    let data = pattern((mib * MIB) as usize, 5);
    for (i, piece) in data.chunks(8 << 20).enumerate() {
        c.write((i << 23) as u64, piece, false).await.unwrap();
    }
    c.flush().await.unwrap();
    data
}

fn migrate(a: &NodeProc, b: &NodeProc, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", "vm1", "--to", &b.api, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&a.cli_ok(&args)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_every_role_and_the_history_outlives_restarts_and_releases() {
    let mut a = NodeProc::start();
    let mut b = NodeProc::start();
    let c = NodeProc::start();
    let data = filled(&a, 16).await;
    let ab = migrate(&a, &b, &["--rate", "1M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    // A is the source, B the destination.
    let la = list(&a);
    assert_eq!(la.len(), 1, "{la:?}");
    assert_eq!(
        (la[0].role.as_str(), la[0].id.as_str()),
        ("source", ab["id"].as_str().unwrap())
    );
    assert_eq!(la[0].peer, b.api);
    // B, still hydrating, migrates on to C: B is both.
    let bc = migrate(&b, &c, &["--rate", "1M"]);
    let lb = list(&b);
    let roles: Vec<_> = lb
        .iter()
        .map(|s| (s.role.as_str(), s.id.as_str()))
        .collect();
    assert_eq!(
        roles,
        [
            ("destination", ab["id"].as_str().unwrap()),
            ("source", bc["id"].as_str().unwrap())
        ],
        "{lb:?}"
    );
    assert!(lb.iter().all(|s| s.ended.is_none()));
    // `status --role` picks the side of the middle node.
    let src: MigrationStatus = Api::new(&b.api)
        .get("/v1/migrations/vm1?role=source")
        .unwrap();
    assert_eq!(src.id, bc["id"].as_str().unwrap());
    assert_eq!(src.peer, c.api);
    // And `migration status` on the middle node shows both sides.
    let text = b.cli_ok(&["migration", "status", "vm1"]);
    assert!(
        text.contains("destination of the migration") && text.contains("source of the migration"),
        "{text}"
    );
    let bad = Api::new(&b.api).get::<MigrationStatus>("/v1/migrations/vm1?role=both");
    assert_eq!(dlsm::api_client::status_of(&bad.unwrap_err()), Some(400));
    // Finish it: C hands off and copies everything; B and A are released.
    c.cli_ok(&["migration", "handoff", "vm1"]);
    c.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    c.wait_phase("vm1", "complete", 60);
    wait_until("chain sources released", 30, || {
        !(b.has_volume("vm1") || a.has_volume("vm1"))
    });
    let cc = client(&c, "vm1").await;
    assert!(cc.read(0, 16 * MIB as u32).await.unwrap() == data);
    drop(cc);
    // A's volume is gone, yet its migration is listed, ended, after a
    // restart too; and `status` still answers.
    a.restart();
    b.restart();
    let la = list(&a);
    assert_eq!(la.len(), 1, "{la:?}");
    assert_eq!(la[0].role, "source");
    assert_eq!(la[0].phase.as_str(), "complete");
    assert!(
        la[0].ended.as_deref().unwrap().contains("released"),
        "{la:?}"
    );
    assert!(la[0].ended_at.is_some());
    let sa = status(&a, "vm1");
    assert_eq!(sa["phase"], "complete", "{sa}");
    assert_eq!(sa["role"], "source", "{sa}");
    // B took part twice: destination of one, source of the other.
    let lb = list(&b);
    let mut roles: Vec<_> = lb
        .iter()
        .map(|s| (s.role.clone(), s.id.clone(), s.phase.as_str()))
        .collect();
    roles.sort();
    assert_eq!(
        roles,
        [
            (
                "destination".into(),
                ab["id"].as_str().unwrap().into(),
                "complete"
            ),
            (
                "source".into(),
                bc["id"].as_str().unwrap().into(),
                "complete"
            ),
        ],
        "{lb:?}"
    );
    // The destination's final counters reached the source's history.
    let src = lb.iter().find(|s| s.role == "source").unwrap();
    assert_eq!(src.regions_total, 16 * MIB / src.region_size, "{src:?}");
    // C: the destination, complete, with the copy's byte counters.
    let lc = list(&c);
    assert_eq!(lc.len(), 1, "{lc:?}");
    assert_eq!(lc[0].phase.as_str(), "complete");
    assert!(lc[0].last_error.is_none());
    assert!(
        lc[0].bytes_background + lc[0].bytes_on_demand >= 15 * MIB,
        "{lc:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_rate_and_resume_work_from_the_source_and_paused_shows_no_rate() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let data = filled(&a, 32).await;
    let m = migrate(&a, &b, &["--rate", "2M"]);
    let id = m["id"].as_str().unwrap();
    // Handoff asked of the source is done by the destination; a forced
    // one is refused there with where to run it.
    let o = a.cli(&["migration", "handoff", "vm1", "--force"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("run it on the destination"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    a.cli_ok(&["migration", "handoff", "vm1"]);
    assert_eq!(status(&b, "vm1")["phase"], "hydrating");
    wait_until("a measured rate", 20, || {
        status(&b, "vm1")["rate"].as_u64().unwrap() > 0
    });
    // Asked of the source, done at the destination.
    a.cli_ok(&["migration", "pause", "vm1"]);
    let s = status(&b, "vm1");
    assert_eq!(s["paused"], true, "{s}");
    let s = status(&a, "vm1");
    assert_eq!(s["paused"], true, "{s}");
    assert_eq!(s["role"], "source", "{s}");
    assert_eq!(s["rate"], 0, "a paused copy has no rate: {s}");
    assert!(s["eta_seconds"].is_null(), "a paused copy has no ETA: {s}");
    a.cli_ok(&["migration", "set-rate", "vm1", "3M"]);
    assert_eq!(status(&b, "vm1")["rate_limit"], 3 * MIB);
    // Steering another migration than the one held is refused.
    let wrong = Api::new(&b.api).post::<MigrationStatus>(
        "/v1/migrations/vm1/pause?id=0123456789abcdef",
        &serde_json::Value::Null,
    );
    assert_eq!(dlsm::api_client::status_of(&wrong.unwrap_err()), Some(409));
    let right = Api::new(&b.api).post::<MigrationStatus>(
        &format!("/v1/migrations/vm1/resume?id={id}"),
        &serde_json::Value::Null,
    );
    assert!(!right.unwrap().paused);
    a.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    let cb = client(&b, "vm1").await;
    assert!(cb.read(0, 32 * MIB as u32).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_survive_a_destination_restart() {
    let a = NodeProc::start();
    let mut b = NodeProc::start();
    filled(&a, 32).await;
    migrate(&a, &b, &["--rate", "4M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    wait_until("some background bytes", 20, || {
        status(&b, "vm1")["bytes_background"].as_u64().unwrap() >= 2 * MIB
    });
    b.cli_ok(&["migration", "pause", "vm1"]);
    let before = status(&b, "vm1")["bytes_background"].as_u64().unwrap();
    // Counters are kept at each periodic commit (1 s).
    std::thread::sleep(Duration::from_millis(2500));
    b.kill();
    b.restart();
    let after = status(&b, "vm1");
    assert!(
        after["bytes_background"].as_u64().unwrap() >= before,
        "counters lost in the restart: {before} before, {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_error_clears_when_the_source_comes_back() {
    let mut a = NodeProc::start();
    let tmp = tempfile::tempdir().unwrap().keep();
    let b = NodeProc::start_with(
        &tmp,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--source-timeout", "2"],
    );
    filled(&a, 16).await;
    migrate(&a, &b, &["--rate", "1M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    a.kill();
    wait_until("an error while the source is away", 30, || {
        !status(&b, "vm1")["last_error"].is_null()
    });
    a.restart();
    wait_until("the error cleared after the source came back", 30, || {
        let s = status(&b, "vm1");
        s["last_error"].is_null() && s["bytes_background"].as_u64().unwrap() > 0
    });
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    let done = b.wait_phase("vm1", "complete", 60);
    assert!(done["last_error"].is_null(), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_removal_are_recorded_and_a_removed_destination_is_named() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    filled(&a, 8).await;
    // Cancelled before handoff: both nodes list it as cancelled.
    let m = migrate(&a, &b, &[]);
    a.cli_ok(&["migration", "cancel", "vm1"]);
    let sa = status(&a, "vm1");
    assert_eq!(sa["phase"], "cancelled", "{sa}");
    assert_eq!(sa["id"], m["id"], "{sa}");
    let lb = list(&b);
    assert_eq!(lb.len(), 1, "{lb:?}");
    assert_eq!(lb[0].phase.as_str(), "cancelled");
    assert!(!b.has_volume("vm1"));
    // The destination removed with --force before handoff: the source's
    // status names that, not "0/0 regions" of a destination that answers.
    migrate(&a, &b, &[]);
    b.cli_ok(&["volume", "rm", "vm1", "--force"]);
    let sa = status(&a, "vm1");
    let why = sa["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("removed"), "{sa}");
    assert!(sa["ended"].is_null(), "not ended at the source: {sa}");
    assert_eq!(sa["role"], "source", "{sa}");
    let sb = status(&b, "vm1");
    assert_eq!(sb["phase"], "failed", "{sb}");
    assert!(sb["ended"].as_str().unwrap().contains("removed"), "{sb}");
    // The source ends it with a cancel; its volume is writable again.
    a.cli_ok(&["migration", "cancel", "vm1", "--force"]);
    let ca = client(&a, "vm1").await;
    ca.write(0, b"mine again", true).await.unwrap();
}

/// The events of a JSON log: `(event, migration)` of each line that has
/// an `event`, after checking every line is one JSON object.
fn events(log: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if let Some(ev) = v["event"].as_str() {
            out.push((
                ev.to_owned(),
                v["migration"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_every_step_of_a_migration_with_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (la, lb) = (dir.path().join("a.log"), dir.path().join("b.log"));
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let a = NodeProc::start_logging_to(&dir.path().join("a"), &["--log-format", "json"], &la);
    let b = NodeProc::start_logging_to(&dir.path().join("b"), &["--log-format", "json"], &lb);
    filled(&a, 8).await;
    let m = migrate(&a, &b, &[]);
    let id = m["id"].as_str().unwrap().to_owned();
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "complete", 60);
    wait_until("source released", 30, || !a.has_volume("vm1"));
    // `migration list` as people and scripts read it.
    let table = b.cli_ok(&["migration", "list"]);
    assert!(
        table.contains("vm1") && table.contains("complete"),
        "{table}"
    );
    let listed: Vec<MigrationStatus> =
        serde_json::from_str(&a.cli_ok(&["migration", "list", "--json"])).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    let want = |log: &std::path::Path, names: &[&str]| {
        wait_until("events logged", 10, || {
            let got = events(log);
            names
                .iter()
                .all(|n| got.iter().any(|(e, mig)| e == n && *mig == id))
        });
    };
    want(&la, &["prepared", "fenced", "released"]);
    want(&lb, &["prepared", "handoff", "hydrated", "complete"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_migrate_to_itself_by_any_address() {
    let a = NodeProc::start();
    a.create("vm1", "4M");
    let port = a.api.rsplit(':').next().unwrap();
    // Past the CLI's own check: straight to the API, naming itself as
    // `localhost`, which no address comparison on the source catches.
    let r = Api::new(&a.api).post::<serde_json::Value>(
        "/v1/volumes/vm1/migrate",
        &serde_json::json!({ "to": format!("localhost:{port}") }),
    );
    let e = r.unwrap_err();
    assert!(format!("{e:#}").contains("on this node already"), "{e:#}");
    // Nothing was left behind: the volume is writable and not migrating.
    assert!(a.cli(&["migration", "status", "vm1"]).status.code() != Some(0));
    let c = client(&a, "vm1").await;
    c.write(0, b"still mine", true).await.unwrap();
    let info: serde_json::Value = Api::new(&a.api).get("/v1/node").unwrap();
    assert_eq!(info["id"].as_str().unwrap().len(), 16, "{info}");
    assert_eq!(info["api"], a.api);
}
