//! The cases a hostile review found (issue 10), each reproduced against
//! real nodes: a stale node-to-node message acting on a later incarnation
//! of a volume, a fence from a caller that is not the destination, a forced
//! handoff that never fences, operator commands that destroy a copy a
//! migration needs, two nodes on one data directory, names that escape the
//! API path, and the loose ends of release, keep-source, pause and the
//! rate limit. Every test here failed before its fix.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, errno_of, pattern, wait_until, NodeProc, Tmpfs, DLSM};
use dlsm::api_client::{status_of, Api};
use dlsm::nbd::client::{NbdAddr, NbdClient};

const MIB: u64 = 1 << 20;

/// A node on a fresh directory with extra `serve` flags.
fn node_with(flags: &[&str]) -> NodeProc {
    let tmp = tempfile::tempdir().unwrap().keep();
    NodeProc::start_with(&tmp, "127.0.0.1:0", "127.0.0.1:0", flags)
}

/// `vm1` of `mib` MiB on `node`, filled with a seeded pattern and flushed.
async fn filled_vm1(node: &NodeProc, mib: u64, seed: u64) -> Vec<u8> {
    node.create("vm1", &format!("{mib}M"));
    let c = client(node, "vm1").await;
    let data = pattern((mib * MIB) as usize, seed);
    for (i, piece) in data.chunks(8 << 20).enumerate() {
        c.write((i << 23) as u64, piece, false).await.unwrap();
    }
    c.flush().await.unwrap();
    data
}

async fn check_all(c: &NbdClient, want: &[u8]) {
    for (i, w) in want.chunks(8 << 20).enumerate() {
        let got = c.read((i << 23) as u64, w.len() as u32).await.unwrap();
        if got != w {
            let at = got.iter().zip(w).position(|(a, b)| a != b).unwrap();
            panic!("byte {} differs", (i << 23) + at);
        }
    }
}

fn migrate(a: &NodeProc, b: &NodeProc, vol: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", vol, "--to", &b.api, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&a.cli_ok(&args)).unwrap()
}

/// Prepares a clone of `vm1` on `node` for migration `id` from `origin`,
/// as a `migrate` whose answer was lost (and was then retried elsewhere,
/// or cancelled) leaves one behind.
fn stray_prepare(node: &NodeProc, origin: &NodeProc, id: &str, size: u64) {
    post(
        node,
        "/v1/migrations",
        serde_json::json!({
            "name": "vm1", "id": id, "size": size,
            "origin_nbd": origin.nbd, "origin_api": origin.api, "region_size": 65536,
        }),
    )
    .unwrap();
}

/// POSTs `body` to `path` on `node`'s API, as a stale or forged message
/// from another node would; returns the HTTP status of a refusal.
fn post(node: &NodeProc, path: &str, body: serde_json::Value) -> Result<(), u16> {
    Api::new(&node.api)
        .post::<serde_json::Value>(path, &body)
        .map(drop)
        .map_err(|e| status_of(&e).unwrap_or_else(|| panic!("{path}: no answer: {e:#}")))
}

fn signal(node: &NodeProc, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(node.pid()), sig).unwrap();
}

/// Case 1: `vm1` went A→C, then C→A, and A→B while A still hydrates from
/// C. A release left over from the first migration then reaches A: it
/// must be refused, not delete A's current copy (the middle of the chain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_release_never_deletes_a_later_incarnation() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let c = NodeProc::start();
    let mut data = filled_vm1(&a, 24, 1).await;
    let first = migrate(&a, &c, "vm1", &[]);
    let stale_id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(stale_id.len(), 16, "{first}");
    c.cli_ok(&["migration", "handoff", "vm1"]);
    c.wait_phase("vm1", "complete", 60);
    wait_until("A released after the first migration", 15, || {
        !a.has_volume("vm1")
    });

    // Back to A, slowly, and on to B while A still hydrates from C.
    migrate(&c, &a, "vm1", &["--rate", "1M"]);
    let ca = client(&a, "vm1").await;
    ca.write(MIB, b"written at A", true).await.unwrap();
    data[MIB as usize..MIB as usize + 12].copy_from_slice(b"written at A");
    drop(ca);
    migrate(&a, &b, "vm1", &[]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    assert_eq!(a.status("vm1")["phase"], "hydrating");

    // The first migration's release, retried late.
    let r = post(
        &a,
        "/v1/volumes/vm1/release",
        serde_json::json!({ "id": stale_id }),
    );
    assert_eq!(r, Err(409), "a stale release was accepted");
    assert!(a.has_volume("vm1"), "the stale release deleted A's copy");
    // So was one with no identity at all (the old wire format).
    assert!(post(&a, "/v1/volumes/vm1/release", serde_json::json!({})).is_err());

    a.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    check_all(&client(&b, "vm1").await, &data).await;
}

/// Case 2: a clone left on a third node by a `migrate` whose answer was
/// lost (then retried elsewhere) asks the source to fence for it: refused,
/// so it can neither take the volume nor read it; the real migration goes
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_prepared_destination_can_fence_the_source() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let stray = node_with(&["--source-timeout", "2"]);
    let data = filled_vm1(&a, 8, 2).await;
    // The stray prepare, as the lost attempt left it at `stray`.
    stray_prepare(&stray, &a, "00000000deadbeef", 8 * MIB);
    migrate(&a, &b, "vm1", &[]);

    // A forged fence for that migration, and one for no migration.
    for id in ["00000000deadbeef", ""] {
        let r = post(
            &a,
            "/v1/volumes/vm1/fence",
            serde_json::json!({ "to": stray.api, "id": id }),
        );
        assert_eq!(r, Err(409), "fence for {id:?} accepted");
    }
    // The stray clone's first write tries to hand off, and cannot.
    let cs = client(&stray, "vm1").await;
    assert!(cs.write(0, b"second writer", true).await.is_err());
    assert!(cs.read(0, 4096).await.is_err(), "stray clone read A's data");
    // A still owns the volume and takes writes.
    let ca = client(&a, "vm1").await;
    ca.write(0, &data[..4096], true).await.unwrap();
    drop(ca);
    // The real destination hands off and completes.
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "complete", 60);
    check_all(&client(&b, "vm1").await, &data).await;
}

/// Case 3: with A dead, a forced handoff at B, and every region written
/// whole at B: the clone completes without fetching anything. When A comes
/// back with a client attached, it takes no write from the first moment,
/// learns that B owns the volume, and is fenced and released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_returning_after_a_forced_handoff_takes_no_write() {
    let mut a = NodeProc::start();
    let b = node_with(&["--source-timeout", "2"]);
    filled_vm1(&a, 4, 3).await;
    migrate(&a, &b, "vm1", &[]);
    a.kill();
    b.cli_ok(&["migration", "handoff", "vm1", "--force"]);
    let cb = client(&b, "vm1").await;
    let fresh = pattern(4 * MIB as usize, 33);
    cb.write(0, &fresh, false).await.unwrap();
    cb.flush().await.unwrap();
    b.wait_phase("vm1", "complete", 30);

    // A returns. Its client tries to write at once, and keeps trying.
    a.restart();
    let ca = client(&a, "vm1").await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let e = ca.write(0, b"zombie", true).await.unwrap_err();
        assert_eq!(errno_of(e), 1, "the returning source took a write");
    }
    drop(ca);
    // B's release (owed since completion) fences and removes A's copy.
    wait_until("the returning source released", 30, || !a.has_volume("vm1"));
    check_all(&cb, &fresh).await;
}

/// Case 3, the normal forced path: the restarted source takes no write
/// from its first moment (it used to for seconds), and after a forced
/// handoff the zeros of the source are not copied once it is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_handoff_copies_no_zeros_once_the_source_is_fenced() {
    let mut a = NodeProc::start();
    let b = node_with(&["--source-timeout", "2"]);
    a.create("vm1", "64M");
    let ca = client(&a, "vm1").await;
    let data = pattern(MIB as usize, 4);
    ca.write(10 * MIB, &data, true).await.unwrap();
    drop(ca);
    migrate(&a, &b, "vm1", &[]);
    a.kill();
    b.cli_ok(&["migration", "handoff", "vm1", "--force"]);
    a.restart();
    let ca = client(&a, "vm1").await;
    assert_eq!(
        errno_of(ca.write(0, b"zombie", true).await.unwrap_err()),
        1,
        "the restarted source took a write before learning who owns the volume"
    );
    drop(ca);
    let s = b.wait_phase("vm1", "complete", 60);
    let copied = s["bytes_background"].as_u64().unwrap() + s["bytes_on_demand"].as_u64().unwrap();
    // The 1 MiB of data, and at most the batches that were waiting on the
    // source when it was fenced (64 MiB before the fix).
    assert!(copied <= 8 * MIB, "zeros crossed the network: {s}");
    assert!(s["bytes_skipped"].as_u64().unwrap() >= 56 * MIB, "{s}");
    let cb = client(&b, "vm1").await;
    assert_eq!(cb.read(10 * MIB, MIB as u32).await.unwrap(), data);
    assert_eq!(cb.read(0, 4096).await.unwrap(), vec![0; 4096]);
}

/// Case 4: `volume rm` of a copy a migration needs is refused on the
/// source while the destination hydrates (its fetch links are no clients),
/// and on the destination before and after handoff; `--force` says what
/// it destroys and does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_rm_refuses_copies_a_migration_needs() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let data = filled_vm1(&a, 16, 5).await;
    migrate(&a, &b, "vm1", &["--rate", "1M"]);
    // Destination in passthrough.
    let o = b.cli(&["volume", "rm", "vm1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not handed off") && err.contains("--force"),
        "{err}"
    );
    b.cli_ok(&["migration", "handoff", "vm1"]);
    // Source while the destination hydrates from it.
    let o = a.cli(&["volume", "rm", "vm1"]);
    assert!(
        !o.status.success(),
        "the source copy was removed mid-migration"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("migrating to") && err.contains("HTTP 409"),
        "{err}"
    );
    // Destination after handoff.
    let o = b.cli(&["volume", "rm", "vm1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("handed off"));
    b.cli_ok(&["migration", "set-rate", "vm1", "0"]);
    b.wait_phase("vm1", "complete", 60);
    check_all(&client(&b, "vm1").await, &data).await;

    // A passthrough clone can be dropped by force, and the source then
    // cancels its migration and writes again.
    let c = NodeProc::start();
    migrate(&b, &c, "vm1", &[]);
    c.cli_ok(&["volume", "rm", "vm1", "--force"]);
    let o = b.cli(&["migrate", "vm1", "--to", &c.api]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already migrating"));
    b.cli_ok(&["migration", "cancel", "vm1"]);
    let cb = client(&b, "vm1").await;
    cb.write(0, b"still mine", true).await.unwrap();
}

/// Case 5: a second node on the same data directory exits with a clear
/// error instead of serving (and sweeping) the first one's volumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_one_data_directory_exits() {
    let a = NodeProc::start();
    let data = filled_vm1(&a, 2, 6).await;
    let mut second = Command::new(DLSM)
        .args(["serve", "--data-dir"])
        .arg(&a.data_dir)
        .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            second.kill().unwrap();
            panic!("a second node started on one data directory and kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = second.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a second node started on one directory"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another dlsm node") && err.contains(&format!("pid {}", a.pid())),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    check_all(&client(&a, "vm1").await, &data).await;
}

/// Case 8: names are checked and encoded, so no name reaches another
/// volume (`x?y` used to delete `x`, `nothere/../z` to delete `z`).
#[test]
fn volume_names_cannot_escape_their_path() {
    let a = NodeProc::start();
    for v in ["x", "z"] {
        a.create(v, "1M");
    }
    for name in ["x?y", "nothere/../z", "..", "x#", "x%3Fy"] {
        let o = a.cli(&["volume", "rm", name]);
        assert!(!o.status.success(), "rm {name:?} succeeded");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("invalid volume name"),
            "{name:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(a.has_volume("x") && a.has_volume("z"));
    // The API itself refuses them, however a client encodes them.
    for path in [
        "/v1/volumes/x%3Fy",
        "/v1/volumes/..%2Fz",
        "/v1/volumes/%2E%2E",
    ] {
        let e = Api::new(&a.api).delete(path).unwrap_err();
        assert!(matches!(status_of(&e), Some(400 | 404)), "{path}: {e:#}");
    }
    assert!(a.has_volume("x") && a.has_volume("z"));
}

/// Case 9: a release owed by a destination survives its restart, and is
/// delivered when the source answers again (it used to be given up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_owed_survives_a_restart_of_the_destination() {
    let mut a = NodeProc::start();
    let mut b = node_with(&["--source-timeout", "1"]);
    filled_vm1(&a, 2, 7).await;
    migrate(&a, &b, "vm1", &["--rate", "64K"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    // A goes down; B gets every region by whole writes and completes,
    // and cannot deliver its release.
    a.kill();
    let cb = client(&b, "vm1").await;
    let fresh = pattern(2 * MIB as usize, 77);
    cb.write(0, &fresh, false).await.unwrap();
    cb.flush().await.unwrap();
    drop(cb);
    b.wait_phase("vm1", "complete", 30);
    std::thread::sleep(Duration::from_secs(1));
    // B restarts before A returns: the obligation must outlive it.
    b.restart();
    a.restart();
    wait_until("the source copy released after B's restart", 40, || {
        !a.has_volume("vm1")
    });
    check_all(&client(&b, "vm1").await, &fresh).await;
}

/// Case 9: `--keep-source` on the middle node of a chain does not keep an
/// incomplete copy (B still hydrating from A when C completes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_source_on_a_hydrating_middle_node_keeps_nothing_incomplete() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    let c = NodeProc::start();
    let data = filled_vm1(&a, 16, 8).await;
    migrate(&a, &b, "vm1", &["--rate", "1M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    migrate(&b, &c, "vm1", &["--keep-source"]);
    c.cli_ok(&["migration", "handoff", "vm1"]);
    c.wait_phase("vm1", "complete", 60);
    check_all(&client(&c, "vm1").await, &data).await;
    wait_until("the chain released", 30, || {
        !b.has_volume("vm1") && !a.has_volume("vm1")
    });
}

/// Case 9: the fence call gives up after `--source-timeout`, not after the
/// HTTP client's two minutes, when the source is frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_source_fails_the_handoff_within_the_source_timeout() {
    let a = NodeProc::start();
    let b = node_with(&["--source-timeout", "2"]);
    filled_vm1(&a, 2, 9).await;
    migrate(&a, &b, "vm1", &[]);
    signal(&a, nix::sys::signal::Signal::SIGSTOP);
    let cb = client(&b, "vm1").await;
    let t = Instant::now();
    assert!(cb.write(0, b"x", true).await.is_err());
    let took = t.elapsed();
    signal(&a, nix::sys::signal::Signal::SIGCONT);
    assert!(took < Duration::from_secs(30), "handoff waited {took:?}");
}

/// Case 9: pause stops the copy at once (a batch waiting for the rate
/// limit used to go through after it), and a source that was away does
/// not let a burst through above the rate when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_is_immediate_and_an_outage_banks_no_credit() {
    let a = NodeProc::start();
    let b = node_with(&["--source-timeout", "30"]);
    filled_vm1(&a, 64, 10).await;
    migrate(&a, &b, "vm1", &["--rate", "1M"]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    std::thread::sleep(Duration::from_millis(1500));
    b.cli_ok(&["migration", "pause", "vm1"]);
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = b.status("vm1")["bytes_background"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let later = b.status("vm1")["bytes_background"].as_u64().unwrap();
    assert_eq!(paused_at, later, "bytes copied while paused");
    b.cli_ok(&["migration", "resume", "vm1"]);

    // The source freezes for 6 s, then returns: at 1 MiB/s, the next 3 s
    // may carry about 3 MiB plus one batch in flight, not everything
    // scheduled while it was away.
    signal(&a, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    let before = b.status("vm1")["bytes_background"].as_u64().unwrap();
    signal(&a, nix::sys::signal::Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(3));
    let after = b.status("vm1")["bytes_background"].as_u64().unwrap();
    assert!(
        after - before <= 12 * MIB,
        "{} MiB in 3 s after the outage at 1 MiB/s",
        (after - before) / MIB
    );
}

async fn unix_client(node: &NodeProc, vol: &str) -> NbdClient {
    NbdClient::connect(&NbdAddr::Unix(node.data_dir.join("nbd.sock")), vol)
        .await
        .unwrap()
}

/// Review finding: a forced handoff while A is cut off (not restarted), B
/// completes by a full overwrite and collapses; the link comes back and
/// an operator runs a plain `migration cancel` on A. B must say the
/// migration was handed off (it used to answer 404 once collapsed, and A
/// then took writes beside B): A is fenced, and then released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_a_forced_handoff_completed_cannot_make_two_writers() {
    let hosts = common::Hosts::new("ca");
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--insecure-api", "--source-timeout", "1"];
    let (a_ip, b_ip) = ("10.77.0.1", "10.77.0.2");
    let a = NodeProc::start_netns_with(
        &hosts.a,
        &tmp.path().join("a"),
        &format!("{a_ip}:10809"),
        &format!("{a_ip}:7450"),
        &flags,
    );
    let b = NodeProc::start_netns_with(
        &hosts.b,
        &tmp.path().join("b"),
        &format!("{b_ip}:10809"),
        &format!("{b_ip}:7450"),
        &flags,
    );
    a.create("vm1", "4M");
    a.cli_ok(&["migrate", "vm1", "--to", &b.api, "--json"]);
    hosts.set_link(false);
    b.cli_ok(&["migration", "handoff", "vm1", "--force"]);
    let cb = unix_client(&b, "vm1").await;
    let fresh = pattern(4 * MIB as usize, 2);
    cb.write(0, &fresh, false).await.unwrap();
    cb.flush().await.unwrap();
    b.wait_phase("vm1", "complete", 30);
    hosts.set_link(true);
    // B's release, retried since the completion, may reach A first: then
    // A's copy is gone already, which is as good.
    let o = a.cli(&["migration", "cancel", "vm1"]);
    assert!(!o.status.success(), "cancel accepted after the handoff");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("handed off") || err.contains("no volume named"),
        "{err}"
    );
    match NbdClient::connect(&NbdAddr::Unix(a.data_dir.join("nbd.sock")), "vm1").await {
        Ok(ca) => assert_eq!(
            errno_of(ca.write(0, b"written at A", true).await.unwrap_err()),
            1,
            "A took a write while B owns the volume"
        ),
        Err(e) => assert!(e.to_string().contains("no volume named"), "{e}"),
    }
    cb.write(0, b"written at B", true).await.unwrap();
    wait_until("A's copy released", 45, || !a.has_volume("vm1"));
}

/// Review finding: B's handoff fences A and then fails (B's disk is full,
/// so the handoff cannot be persisted) while an operator cancels the
/// migration on A. B drops its clone (it was never handed off), so A must
/// end writable again, not fenced with no migration left to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_overlapping_a_failed_handoff_leaves_the_source_writable() {
    let mnt = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(mnt.path(), "16m");
    let a = node_with(&["--source-timeout", "20"]);
    let b = NodeProc::start_with(
        &mnt.path().join("b"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--source-timeout", "20"],
    );
    filled_vm1(&a, 4, 12).await;
    migrate(&a, &b, "vm1", &[]);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mnt.path().join("filler")).unwrap();
        let chunk = vec![1u8; 65536];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // A hangs a moment: the operator's cancel reaches it first, then B's
    // handoff (a write at B) asks it to fence.
    signal(&a, nix::sys::signal::Signal::SIGSTOP);
    let cancel = {
        let api = a.api.clone();
        std::thread::spawn(move || {
            Command::new(DLSM)
                .args(["--api", &api, "migration", "cancel", "vm1"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let cb = client(&b, "vm1").await;
    let first_write = tokio::spawn(async move { cb.write(0, b"first write at B", true).await });
    std::thread::sleep(Duration::from_millis(1000));
    signal(&a, nix::sys::signal::Signal::SIGCONT);
    assert!(
        first_write.await.unwrap().is_err(),
        "B handed off on a full disk"
    );
    let o = cancel.join().unwrap();
    std::fs::remove_file(mnt.path().join("filler")).unwrap();
    assert!(
        o.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!b.has_volume("vm1"));
    let ca = client(&a, "vm1").await;
    ca.write(0, b"A again", true).await.unwrap();
    assert_eq!(ca.read(0, 7).await.unwrap(), b"A again");
}

/// Review finding: a forced handoff whose source is alive and refuses the
/// migration (a clone left by a lost prepare, then cancelled) is refused:
/// force only means "go ahead if the source cannot be reached".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_handoff_is_refused_when_the_source_disowns_the_migration() {
    let a = NodeProc::start();
    let b = node_with(&["--source-timeout", "2"]);
    filled_vm1(&a, 2, 13).await;
    stray_prepare(&b, &a, "00000000feedf00d", 2 * MIB);
    let o = b.cli(&["migration", "handoff", "vm1", "--force"]);
    assert!(!o.status.success(), "forced handoff against a live source");
    assert!(String::from_utf8_lossy(&o.stderr).contains("refused"));
    let ca = client(&a, "vm1").await;
    ca.write(0, b"A owns it", true).await.unwrap();
}

/// Review finding: once a migration completed, the destination answers a
/// drop of it with 409 (handed off), not 404 (no clone any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_migration_cannot_be_dropped() {
    let a = NodeProc::start();
    let b = NodeProc::start();
    filled_vm1(&a, 2, 14).await;
    let s = migrate(&a, &b, "vm1", &[]);
    b.cli_ok(&["migration", "handoff", "vm1"]);
    b.wait_phase("vm1", "complete", 30);
    let id = s["id"].as_str().unwrap();
    let r = post(
        &b,
        "/v1/migrations/vm1/drop",
        serde_json::json!({ "id": id }),
    );
    assert_eq!(r, Err(409));
    assert!(b.has_volume("vm1"));
}

/// Second review: a restarted source holds its writes because the
/// destination may own the volume (a forced handoff while it was down);
/// `migration cancel --force` must not lift that hold when the destination
/// cannot be asked (it used to: two writers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_force_cannot_lift_the_hold_of_a_restarted_source() {
    let mut a = NodeProc::start();
    let mut b = node_with(&["--source-timeout", "2"]);
    filled_vm1(&a, 2, 15).await;
    migrate(&a, &b, "vm1", &[]);
    a.kill();
    b.cli_ok(&["migration", "handoff", "vm1", "--force"]);
    let cb = client(&b, "vm1").await;
    cb.write(0, &[9u8; 65536], true).await.unwrap();
    drop(cb);
    b.kill(); // B is away when A comes back
    a.restart();
    let o = a.cli(&["migration", "cancel", "vm1", "--force"]);
    assert!(!o.status.success(), "cancel --force lifted the hold");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("writes are held"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ca = client(&a, "vm1").await;
    assert_eq!(errno_of(ca.write(0, b"zombie", true).await.unwrap_err()), 1);
    drop(ca);
    // B returns: A learns it lost the volume and is fenced, then released.
    b.restart();
    wait_until("A's copy released once B is back", 40, || {
        !a.has_volume("vm1")
    });
    let cb = client(&b, "vm1").await;
    assert_eq!(cb.read(0, 65536).await.unwrap(), vec![9u8; 65536]);
}

/// Case 9: a prepare whose caller goes away mid-way (the HTTP handler's
/// future dropped) still gets its clone a hydrator and a supervisor; it
/// used to leave a clone that never hydrated nor completed until a
/// restart. The source here is unreachable, so the handoff is forced and
/// the volume written whole at the destination: only a running hydrator
/// notices that every region is present and completes the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_whose_caller_vanishes_still_hydrates_and_completes() {
    use std::io::Write;
    let b = node_with(&["--source-timeout", "1"]);
    let body = serde_json::json!({
        "name": "vm1", "id": "00000000c0ffee00", "size": MIB,
        "origin_nbd": "127.0.0.1:1", "origin_api": "127.0.0.1:1", "region_size": 65536,
    })
    .to_string();
    // The caller sends the whole request and is gone before the answer.
    // If it is gone before the node even read the body, nothing is made
    // (as it should be); then the caller tries again.
    for attempt in 0u64..40 {
        let mut s = std::net::TcpStream::connect(&b.api).unwrap();
        write!(
            s,
            "POST /v1/migrations HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(attempt % 4));
        drop(s);
        let t = Instant::now();
        while !b.has_volume("vm1") && t.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if b.has_volume("vm1") {
            break;
        }
    }
    assert!(b.has_volume("vm1"), "no prepare got as far as the clone");
    b.cli_ok(&["migration", "handoff", "vm1", "--force"]);
    let cb = client(&b, "vm1").await;
    cb.write(0, &pattern(MIB as usize, 16), true).await.unwrap();
    b.wait_phase("vm1", "complete", 20);
    let v: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["volume", "show", "vm1", "--json"])).unwrap();
    assert_eq!(v["table"]["kind"], "local", "{v}");
}

/// Chaos seed 1018: a cancel got the destination to drop its clone, then
/// could not record it on the source (its disk was full), and the source
/// restarted. The source had recorded that the cancel was under way
/// before asking (and fenced for nobody since), so when the destination
/// has no record of the migration the restarted source finishes the
/// cancel and takes writes again, instead of holding them until an
/// operator comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_interrupted_after_the_drop_completes_on_restart() {
    let mut a = NodeProc::start();
    let b = NodeProc::start();
    let data = filled_vm1(&a, 2, 17).await;
    migrate(&a, &b, "vm1", &[]);
    a.kill();
    // What the interrupted cancel left: the mark on the source, the clone
    // gone at the destination.
    let table = a.data_dir.join("volumes/vm1/table.json");
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&table).unwrap()).unwrap();
    t["outgoing"]["cancelling"] = true.into();
    std::fs::write(&table, serde_json::to_vec_pretty(&t).unwrap()).unwrap();
    b.cli_ok(&["volume", "rm", "vm1", "--force"]);
    a.restart();
    let ca = client(&a, "vm1").await;
    let t = Instant::now();
    loop {
        match ca.write(0, b"mine again", true).await {
            Ok(()) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "still refused: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["volume", "show", "vm1", "--json"])).unwrap();
    assert!(v["fenced_to"].is_null(), "{v}");
    assert_eq!(ca.read(4096, 4096).await.unwrap(), data[4096..8192]);
}
