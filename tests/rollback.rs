//! Cancel after handoff: the rollback (see `migrate::clone::rollback`),
//! against real nodes. The volume goes back to its source, over the copy
//! the source was fenced with; only regions written at the destination
//! since handoff cross back; one writer throughout; kill -9 of either node
//! at any step ends in one consistent state.

mod common;

use std::time::Duration;

use common::{client, errno_of, pattern, wait_until, Model, NodeProc};

const MIB: u64 = 1 << 20;
const SIZE_MIB: u64 = 64;

/// `vm1` on `a`, written all over, migrated to `b` (slowly, so most of it
/// is still absent there) and handed off by a write at `b`; then 8 writes
/// of 96 KiB at `b` (each over two 64 KiB regions). Returns the model, the
/// migration's status and the bytes written at `b`.
async fn handed_off_with_writes(a: &NodeProc, b: &NodeProc) -> (Model, serde_json::Value, u64) {
    a.create("vm1", &format!("{SIZE_MIB}M"));
    let mut model = Model::new(SIZE_MIB * MIB);
    let ca = client(a, "vm1").await;
    model
        .write(&ca, 0, &pattern((SIZE_MIB * MIB) as usize, 3))
        .await;
    ca.flush().await.unwrap();
    drop(ca);
    let m: serde_json::Value = serde_json::from_str(
        &a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--rate", "512K", "--json"]),
    )
    .unwrap();
    let cb = client(b, "vm1").await;
    let mut written = 0;
    for i in 0..8u64 {
        let off = i * 7 * MIB + 32 * 1024;
        model.write(&cb, off, &pattern(96 * 1024, 100 + i)).await;
        written += 96 * 1024;
    }
    cb.flush().await.unwrap();
    // Read back only around the writes: most of the volume must stay
    // absent at `b` (a full read would fetch it all and complete).
    for i in 0..8u64 {
        let off = (i * 7 * MIB) as usize;
        let got = cb.read(off as u64, 192 * 1024).await.unwrap();
        assert!(
            got == model.0[off..off + 192 * 1024],
            "write {i} lost at the destination"
        );
    }
    let s = b.status("vm1");
    assert_eq!(s["phase"], "hydrating", "{s}");
    assert!(s["regions_present"].as_u64().unwrap() < 200, "{s}");
    (model, m, written)
}

/// The rollback under way, as the destination reports it when asked to
/// roll back again (idempotent).
fn cancel_report(node: &NodeProc) -> serde_json::Value {
    dlsm::api_client::Api::new(&node.api)
        .post("/v1/migrations/vm1/rollback", &serde_json::Value::Null)
        .unwrap()
}

fn cancel(node: &NodeProc) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(&["migration", "cancel", "vm1", "--json"])).unwrap()
}

/// Waits until `a` completed the rollback and `b` released its copy.
fn wait_rolled_back(a: &NodeProc, b: &NodeProc) -> serde_json::Value {
    let done = a.wait_phase("vm1", "complete", 90);
    wait_until("the rolled-back destination released", 30, || {
        !b.has_volume("vm1")
    });
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_moves_back_only_what_was_written_and_keeps_one_writer() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let (mut model, m, written) = handed_off_with_writes(&a, &b).await;
    // Cancelled on the source after handoff: a rollback.
    let r = cancel(&a);
    assert_eq!(r["rolls_back"], m["id"], "{r}");
    assert_eq!(r["to"], a.api, "{r}");
    // 8 writes over two regions each.
    assert_eq!(r["regions_written"], 16, "{r}");
    // The source now holds the rollback, not handed off: reads go to the
    // destination, which is still the one writer.
    let s = a.status("vm1");
    assert_eq!(s["phase"], "passthrough", "{s}");
    assert_eq!(s["rollback_of"], m["id"], "{s}");
    let cb = client(&b, "vm1").await;
    model.write(&cb, 40 * MIB, b"still the writer").await;
    cb.flush().await.unwrap();
    let ca = client(&a, "vm1").await;
    model
        .check_as(&ca, "at the source before the rollback's handoff")
        .await;
    drop(ca);
    // The operator hands off (as the hypervisor's move would; a write at
    // the source would too): the destination is fenced, the source is
    // the writer.
    a.cli_ok(&["migration", "handoff", "vm1"]);
    let e = cb.write(4096, b"late", false).await.unwrap_err();
    assert_eq!(
        errno_of(e),
        1,
        "the old destination must refuse writes (EPERM)"
    );
    drop(cb);
    let ca = client(&a, "vm1").await;
    model.write(&ca, 50 * MIB, b"back home").await;
    ca.flush().await.unwrap();
    let done = wait_rolled_back(&a, &b);
    model.check_as(&ca, "after the rollback").await;
    // What crossed back: the regions written at the destination (16 + 1
    // of 64 KiB), not the volume.
    let moved =
        done["bytes_on_demand"].as_u64().unwrap() + done["bytes_background"].as_u64().unwrap();
    let regions_written = 17 * 64 * 1024;
    assert!(
        moved <= regions_written && moved >= written,
        "moved back {moved} bytes for {written} written ({regions_written} in whole regions): {done}"
    );
    assert!(moved < SIZE_MIB * MIB / 20, "{done}");
    println!(
        "ROLLBACK volume={} written={written} moved_back={moved}",
        SIZE_MIB * MIB
    );
    // Both nodes list it.
    let la: Vec<dlsm::api::types::MigrationStatus> = dlsm::api_client::Api::new(&a.api)
        .get("/v1/migrations")
        .unwrap();
    assert!(
        la.iter().any(|s| s.id == m["id"].as_str().unwrap()
            && s.ended.as_deref().unwrap_or("").contains("rolled back")),
        "{la:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_the_destination_rolls_back_when_its_clients_leave() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let (model, _, _) = handed_off_with_writes(&a, &b).await;
    // The client of the handoff above is gone; a new one is the VM here.
    let cb = client(&b, "vm1").await;
    let text = b.cli_ok(&["migration", "cancel", "vm1"]);
    assert!(
        text.contains(&format!("rolling it back to {}", a.api)),
        "{text}"
    );
    // Asked again, the destination answers with the rollback under way.
    let r = cancel_report(&b);
    assert_eq!(r["to"], a.api, "{r}");
    // The VM leaves the destination, as it came: that hands off.
    drop(cb);
    wait_until(
        "the rollback handed off when the last client left",
        30,
        || a.status("vm1")["phase"] != "passthrough",
    );
    wait_rolled_back(&a, &b);
    model
        .check_as(&client(&a, "vm1").await, "after the rollback")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_cancelled_before_its_handoff_leaves_the_migration_as_it_was() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let (mut model, m, _) = handed_off_with_writes(&a, &b).await;
    let cb = client(&b, "vm1").await;
    let r = cancel(&a);
    // Cancel the rollback itself, on the node it goes from.
    let again = cancel(&b);
    assert_eq!(again["migration"], r["migration"], "{again}");
    // The source is again the fenced source of the first migration.
    let s = a.status("vm1");
    assert_eq!(s["role"], "source", "{s}");
    assert_eq!(s["id"], m["id"], "{s}");
    let o = a.cli(&["volume", "show", "vm1", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["fenced_to"], b.api, "{v}");
    // The destination is the writer and completes the first migration.
    model.write(&cb, 9 * MIB, b"writer still").await;
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 90);
    wait_until("source released", 30, || !a.has_volume("vm1"));
    model
        .check_as(&cb, "after the first migration completed")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_either_node_during_a_rollback_and_it_ends_consistent() {
    let mut a = NodeProc::start();
    let mut b = NodeProc::start();
    let (mut model, _, _) = handed_off_with_writes(&a, &b).await;
    cancel(&a);
    // The destination (the rollback's source) dies before the handoff,
    // with the VM still there.
    b.kill();
    b.restart();
    // It holds writes until the old source says it has not taken the
    // volume, then goes on as the writer (the VM reconnected).
    let vm = client(&b, "vm1").await;
    wait_until("the restarted destination takes writes again", 30, || {
        b.status("vm1")["stalled"].is_null()
    });
    model.write(&vm, 20 * MIB + 5, b"after the restart").await;
    vm.flush().await.unwrap();
    // The source (holding the rollback) dies too, before the handoff.
    a.kill();
    a.restart();
    let ca = client(&a, "vm1").await;
    model
        .check_as(&ca, "at the restarted source, in passthrough")
        .await;
    drop(ca);
    // The VM moves back.
    drop(vm);
    a.cli_ok(&["migration", "handoff", "vm1"]);
    a.cli_ok(&["migration", "set-rate", "vm1", "16K"]);
    // And dies again while copying back.
    std::thread::sleep(Duration::from_millis(300));
    a.kill();
    a.restart();
    let ca = client(&a, "vm1").await;
    model
        .write(&ca, 33 * MIB, b"written during the copy back")
        .await;
    ca.flush().await.unwrap();
    // The old destination, restarted now, is fenced: never a second writer.
    b.kill();
    b.restart();
    let cb = client(&b, "vm1").await;
    let e = cb.write(0, b"x", false).await.unwrap_err();
    assert_eq!(errno_of(e), 1, "restarted old destination took a write");
    drop(cb);
    a.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    wait_rolled_back(&a, &b);
    model.check_as(&ca, "after the rollback with crashes").await;
}
