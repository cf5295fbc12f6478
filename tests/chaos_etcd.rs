//! Randomized etcd nemesis for cluster mode (issue 13): real processes,
//! real sockets, faults at random moments, a checker.
//!
//! A 3-member etcd (`tests/common/etcd.rs`) and 3 `dlsm serve` nodes in
//! cluster mode with a short lease (`--cluster-lease-ttl 4`), each reaching
//! etcd only through its own fault-injecting TCP proxies, one per member
//! (`tests/chaos/proxy.rs`), so one node's link to etcd can be cut while
//! its clients still reach it. A few cluster volumes spread over the nodes
//! (`volume create --on`), and per volume a verifying client
//! (`tests/chaos_etcd/worker.rs`) writing random data at random offsets
//! through the owner, reading back, flushing, and now and then probing
//! the volume at a node that does not own it.
//!
//! The nemesis (`tests/chaos_etcd/run.rs`), at random moments: SIGSTOP and
//! SIGCONT one etcd member; kill -9 one member and start it again on its
//! data directory; kill every member, then start them again; freeze two
//! members (no quorum); `etcdctl lease revoke` a node's lease (the one its
//! `nodes/NAME` key is under); blackhole or reset all of a node's etcd
//! proxies, or blackhole one; SIGSTOP/SIGCONT a node; kill -9 a node and
//! restart it; and `migrate` a volume with no migration in progress to
//! another node by name (`dlsm --api ANY migrate VOL --to NODE`, half of
//! them at `--rate 1M` so that faults meet them hydrating), its source and
//! destination up at that moment. When the call returns, the volume's
//! client follows it as a VM would: it reconnects at the destination, and
//! its first write there hands off. One migration in four is cancelled
//! instead (`migration cancel` at the source) before the client moves; a
//! migrate call that fails is cancelled too, again at later steps until
//! the cancel succeeds (or, 30 s on, the record shows it never started).
//! The worker's model follows its writes per node (what a killed node had
//! not made durable is forgotten, whichever end of a migration it was).
//!
//! Checked while it runs and at the end with every fault healed:
//! - every read matches the byte model of acknowledged writes (a write
//!   answered with an error, or not at all, may or may not have happened:
//!   both are allowed until a read or a later write settles it); at the
//!   end every byte of every volume is read and checked, at its owner
//!   (where its last migration went);
//! - only the owner the directory names acknowledges writes for a volume
//!   (the probes at other nodes must not be), and no two nodes acknowledge
//!   writes for one volume in overlapping intervals (every acknowledgement
//!   is logged with node, volume, and the interval it happened in). The
//!   harness follows the owner and generation: they change only when a
//!   write is acknowledged at the destination of a migration the client
//!   follows, or the record shows that handoff (destination, generation +
//!   1); from then on the old owner must acknowledge nothing (probes go to
//!   it once the client saw its first acknowledgement at the destination,
//!   never to a destination the client does not follow yet);
//! - no write is acknowledged when the node cannot hold a lease: a write
//!   sent more than `T - m` (+ 0.3 s of the harness's own slack) after the
//!   node was cut from etcd, after every member died, or (+ 2 s for an
//!   isolated leader) after two members froze, and acknowledged before
//!   that fault healed (a write that waited for the lease may be
//!   acknowledged after the heal, once the node renewed);
//! - writes resume by themselves: within 15 s after the last fault that
//!   could stop a volume's writes healed (one on its owner, or on either
//!   end of its migration until it completes, or on etcd), and within 30 s
//!   at the end;
//! - etcd's record of each volume names the owner at the generation the
//!   harness expects (created with, + 1 per handoff), and a migration
//!   only while one the harness started is in progress, with its source
//!   and destination; a migration the client follows does not leave the
//!   record before its handoff. At the end, with every fault healed,
//!   every migration completes (or is cancelled) within 60 s, each record
//!   is bound to the owner's current lease (rebound after a lost lease),
//!   names no migration, and only the owner holds a copy (the sources
//!   released theirs); every node is up;
//! - no panic in any node's log, no node or etcd member exiting by itself;
//! - (the harness itself) what it froze stays frozen: the kernel sends
//!   SIGCONT to a stopped process group that becomes orphaned, e.g. when
//!   the shell that started the test in the background exits, which
//!   would make the lease windows wrong. Run it from a shell that waits,
//!   or under `setsid`.
//!
//! One line per seed sums it up: faults by kind; writes acknowledged,
//! refused (by errno, and by what explains the refusal: `lease-fault`, a
//! fault that takes the owner's lease away or the owner down;
//! `etcd-degraded`, one that only took a member or one link away, which
//! the events log and stderr then date; `unexplained`), unanswered; reads,
//! flushes, probes; record checks; migrations started, handed off,
//! completed, cancelled (or never started); the lease-less windows that
//! outlasted `T - m` and their length; the longest time writes took to resume;
//! bytes checked; violations. A failing seed prints its last events,
//! keeps its directory (node and etcd logs, events.log) and prints the
//! command that reruns it.
//!
//! Env: `DLSM_CHAOS_SEED` (one seed; random if unset), `DLSM_CHAOS_RUNS`
//! (seeds from it), `DLSM_CHAOS_STEPS` (steps per seed; 60 by default),
//! `DLSM_CHAOS_BUDGET_SECS` (end a seed's fault phase after this long; 100
//! in a debug build given no STEPS), `DLSM_CHAOS_TTL` (lease TTL, 4),
//! `DLSM_CHAOS_VOLS` (4), `DLSM_CHAOS_NO=etcd-all-down,node-kill,migrate,...`
//! (fault kinds to leave out), `DLSM_CHAOS_VERBOSE=1` (print every event),
//! `DLSM_CHAOS_KEEP=1` (keep the run's directory even if it passed),
//! `DLSM_CHAOS_SABOTAGE=model` (flip a byte of the model), `=owner` (log a
//! made-up acknowledgement by another node) or `=lease` (a made-up window
//! without a lease at the end): the run must then fail, which
//! `sabotaged_checks_fail` shows (`-- --ignored sabotaged --nocapture`,
//! about a minute).
//!
//! Rerun a seed:
//! `DLSM_CHAOS_SEED=S DLSM_CHAOS_STEPS=N cargo test --features cluster --test chaos_etcd -- --nocapture`

#![cfg(feature = "cluster")]

mod common;

#[path = "chaos_etcd/node.rs"]
mod node;
// Its slow-link delay is not used here.
#[allow(dead_code)]
#[path = "chaos/proxy.rs"]
mod proxy;
#[path = "chaos_etcd/run.rs"]
mod run;
#[path = "chaos_etcd/worker.rs"]
mod worker;

use run::{Config, Run, Stats};

fn env<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok().and_then(|s| s.parse().ok())
}

fn list(k: &str) -> Vec<String> {
    std::env::var(k)
        .map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn rerun_cmd(seed: u64, steps: u64, no: &[String], sabotage: Option<&str>) -> String {
    let mut s = format!("DLSM_CHAOS_SEED={seed} DLSM_CHAOS_STEPS={steps} ");
    if !no.is_empty() {
        s += &format!("DLSM_CHAOS_NO={} ", no.join(","));
    }
    if let Some(t) = env::<u64>("DLSM_CHAOS_TTL") {
        s += &format!("DLSM_CHAOS_TTL={t} ");
    }
    if let Some(x) = sabotage {
        s += &format!("DLSM_CHAOS_SABOTAGE={x} ");
    }
    s + "cargo test --features cluster --test chaos_etcd -- --nocapture"
}

/// Runs one seed; its stats.
fn one(seed: u64, steps: u64, budget: Option<u64>, no: &[String], sabotage: Option<&str>) -> Stats {
    let t = std::time::Instant::now();
    let mut r = Run::new(Config {
        seed,
        steps,
        vols: env("DLSM_CHAOS_VOLS").unwrap_or(4),
        vol_mib: 4,
        ttl: env("DLSM_CHAOS_TTL").unwrap_or(4),
        no: no.to_vec(),
        verbose: env::<u8>("DLSM_CHAOS_VERBOSE").unwrap_or(0) > 0,
        sabotage: sabotage.map(str::to_owned),
    });
    r.setup();
    for step in 0..steps {
        r.step(step);
        if r.failed() {
            break;
        }
        if budget.is_some_and(|b| t.elapsed().as_secs() >= b) {
            eprintln!(
                "chaos_etcd seed {seed}: time budget spent after {} steps",
                step + 1
            );
            break;
        }
    }
    r.settle_and_check();
    let line = format!(
        "CHAOS-ETCD seed={seed} {} secs={:.0}",
        r.stats.line(),
        t.elapsed().as_secs_f64()
    );
    println!("{line}");
    if !r.failed() && env::<u8>("DLSM_CHAOS_KEEP").unwrap_or(0) > 0 {
        eprintln!("--- seed {seed}: logs and data kept in {}", r.keep_dir());
    }
    if r.failed() {
        let dir = r.keep_dir();
        eprintln!(
            "--- seed {seed}: last events ---\n{}\n--- logs and data kept in {dir}\n--- rerun: {}",
            r.history_tail(40),
            rerun_cmd(seed, steps, no, sabotage)
        );
    }
    std::mem::take(&mut r.stats)
}

fn steps_and_budget() -> (u64, Option<u64>) {
    let steps: u64 = env("DLSM_CHAOS_STEPS").unwrap_or(60);
    // The default run (CI: a debug build, no STEPS given) stays within
    // about three minutes: setup, this fault phase, the settling and the
    // final reads.
    let budget: Option<u64> = env("DLSM_CHAOS_BUDGET_SECS")
        .or((cfg!(debug_assertions) && std::env::var("DLSM_CHAOS_STEPS").is_err()).then_some(100));
    (steps, budget)
}

#[test]
fn chaos_etcd() {
    let (steps, budget) = steps_and_budget();
    let no = list("DLSM_CHAOS_NO");
    let sabotage = std::env::var("DLSM_CHAOS_SABOTAGE").ok();
    let first = env::<u64>("DLSM_CHAOS_SEED").unwrap_or_else(|| rand::random::<u32>() as u64);
    let seeds: Vec<u64> = (first..first + env("DLSM_CHAOS_RUNS").unwrap_or(1)).collect();
    let mut total = Stats::default();
    for &seed in &seeds {
        eprintln!(
            "chaos_etcd seed {seed} (rerun: {})",
            rerun_cmd(seed, steps, &no, sabotage.as_deref())
        );
        total.add(&one(seed, steps, budget, &no, sabotage.as_deref()));
    }
    println!(
        "CHAOS-ETCD TOTAL seeds={}..={} {}",
        seeds[0],
        seeds[seeds.len() - 1],
        total.line()
    );
    if !total.violations.is_empty() {
        let mut msg = String::from("etcd nemesis found violations:\n");
        for v in &total.violations {
            let seed = common::seed_of(v);
            msg += &format!(
                "  {v}\n    rerun: {}\n",
                rerun_cmd(seed, steps, &no, sabotage.as_deref())
            );
        }
        panic!("{msg}");
    }
}

/// Each sabotage must make a short run fail with the violation it aims
/// at: the checks can fail. (`cargo test --features cluster --test
/// chaos_etcd -- --ignored sabotaged --nocapture`; about a minute.)
#[test]
#[ignore]
fn sabotaged_checks_fail() {
    for (sabotage, kind) in [
        ("model", "final-mismatch"),
        ("owner", "non-owner-ack"),
        ("lease", "ack-without-lease"),
    ] {
        let s = one(7, 5, None, &[], Some(sabotage));
        assert!(
            s.violations.iter().any(|v| v.contains(kind)),
            "sabotage {sabotage}: no {kind} violation in {:?}",
            s.violations
        );
        eprintln!("sabotage {sabotage}: failed as it must: {:?}", s.violations);
    }
}

/// What the nemesis found about etcd itself (seeds 303 and 304: "etcd no
/// longer knows this node's lease" within 0.5 s after a frozen member was
/// continued, with only that member ever frozen): etcd 3.4.23 (Debian's
/// `etcd-server`) revokes live leases when a leader that was stopped while
/// the others elected a new one comes back (here: in 2 runs of up to 5
/// rounds, at rounds 5 and 3; the lease had 3 s of its TTL left). The
/// likely mechanism, not traced in etcd's source: its lessor still counts
/// itself primary for a moment, finds every lease "expired" by its stale
/// clock, and proposes their revocation, which reaches the new leader once
/// it has stepped down and is applied. A lease renewed well within its TTL is then gone
/// early, so DESIGN's "etcd expires a lease no earlier than r + T" does not
/// hold on this etcd: a takeover must wait `T` after it first sees the
/// owner's lease gone, whatever removed it (as for a lease revoked by hand).
/// dlsm copes: the node refuses writes for a moment, registers again and
/// rebinds its records. Ignored because it fails (reproduces) on 3.4.23:
/// `cargo test --features cluster --test chaos_etcd -- --ignored a_thawed --nocapture`.
#[test]
#[ignore]
fn a_thawed_stale_etcd_leader_does_not_revoke_live_leases() {
    use nix::sys::signal::Signal;
    use serde_json::Value;
    use std::time::Duration;

    let etcd = common::etcd::Etcd::start_members(3);
    let tmp = tempfile::tempdir().unwrap();
    let flags = etcd.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _nodes: Vec<common::NodeProc> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| common::NodeProc::start_named(&tmp.path().join(n), n, &flags))
        .collect();
    let etcdctl = common::require("etcdctl");
    let ctl = |urls: &str, args: &[&str]| -> Value {
        let out = common::run_ok(
            std::process::Command::new(&etcdctl)
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={urls}"))
                .args(["--dial-timeout=2s", "--command-timeout=3s", "-w", "json"])
                .args(args),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    // A race (the stale leader's lease sweep against its stepping down):
    // a few rounds, each freezing the leader of the moment.
    for round in 0..5 {
        let leader = (0..3)
            .find(|&i| {
                let s = ctl(&etcd.urls[i], &["endpoint", "status"]);
                s[0]["Status"]["leader"] == s[0]["Status"]["header"]["member_id"]
            })
            .expect("a leader");
        let others: Vec<&str> = (0..3)
            .filter(|&i| i != leader)
            .map(|i| etcd.urls[i].as_str())
            .collect();
        let others = others.join(",");
        let lease_of_n1 =
            || ctl(&others, &["get", "/dlsm/v1/nodes/n1"])["kvs"][0]["lease"].as_i64();

        // The other two elect a leader, which n1 renews its lease at.
        etcd.signal(leader, Signal::SIGSTOP);
        std::thread::sleep(Duration::from_secs(10));
        let before = lease_of_n1().expect("n1 is up");
        let ttl = ctl(&others, &["lease", "timetolive", &format!("{before:x}")]);
        eprintln!("round {round}: before m{leader} is continued: n1's lease {before:x}: {ttl}");
        etcd.signal(leader, Signal::SIGCONT);
        std::thread::sleep(Duration::from_secs(3));
        let after = lease_of_n1();
        assert_eq!(
            after,
            Some(before),
            "round {round}: n1's live lease {before:x} ({ttl}) was revoked when the old leader m{leader} was continued; nodes/n1 is now under {after:x?}"
        );
    }
}
