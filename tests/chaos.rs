//! Randomized fault-and-operator harness (a nemesis and a checker).
//!
//! Three real `dlsm serve` processes, each behind fault-injecting proxies
//! for node-to-node traffic (`tests/chaos/proxy.rs`); volumes that wander
//! among them (migrations at random moments with random region sizes,
//! rates, `--keep-source`; chains started while the previous hop hydrates;
//! migrations back to nodes the volume left); a client per volume that
//! follows it as a VM would, with a byte model of every acknowledged write;
//! stale writers on nodes the volume left. At random moments: kill -9 and
//! restart, SIGSTOP/SIGCONT, link cuts (RST or blackhole), a slow source
//! link, a full disk (tmpfs), pause/resume/set-rate/handoff, `volume rm`,
//! a forced handoff when the source is dead, and a second `dlsm serve` on
//! a live data directory.
//!
//! Checked after every step: every read against the model (no lost write,
//! no stale read); no write acknowledged by a node that no longer owns the
//! volume; no old owner left unfenced; no panic in any node's log; no node
//! exiting by itself. At the end, with every fault healed: every migration
//! completes, no other node holds a writable copy, stale copies refuse
//! writes, and every known byte matches the model.
//!
//! Env: `DLSM_CHAOS_SEED` (one seed), `DLSM_CHAOS_STEPS` (steps per seed),
//! `DLSM_CHAOS_RUNS` (seeds), `DLSM_CHAOS_BUDGET_SECS` (end a seed's fault
//! phase after this long; 120 in a debug build given no STEPS), `DLSM_CHAOS_NO=rm,second-serve,...` (action
//! kinds to leave out), `DLSM_CHAOS_VERBOSE=1` (print every event),
//! `DLSM_CHAOS_SABOTAGE=model` (flip a model byte) or `=owner` (count every
//! stale write as a second writer): the run must fail.
//! Long runs: `scripts/chaos.sh FIRST LAST STEPS`.

mod common;

#[path = "chaos/cluster.rs"]
mod cluster;
#[path = "chaos/proxy.rs"]
mod proxy;
#[path = "chaos/run.rs"]
mod run;

use run::{Config, Run, Stats};

fn env<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok().and_then(|s| s.parse().ok())
}

fn rerun_cmd(seed: u64, steps: u64, no: &[String]) -> String {
    let mut s = format!("DLSM_CHAOS_SEED={seed} DLSM_CHAOS_STEPS={steps} ");
    if !no.is_empty() {
        s += &format!("DLSM_CHAOS_NO={} ", no.join(","));
    }
    s + "cargo test --release --test chaos -- --nocapture"
}

/// Runs one seed; returns its stats.
fn one(seed: u64, steps: u64, budget: Option<u64>, no: &[String]) -> Stats {
    let t = std::time::Instant::now();
    let mut r = Run::new(Config {
        seed,
        steps,
        nodes: env("DLSM_CHAOS_NODES").unwrap_or(3),
        vols: env("DLSM_CHAOS_VOLS").unwrap_or(2),
        vol_mib: 16,
        no: no.to_vec(),
        verbose: env::<u8>("DLSM_CHAOS_VERBOSE").unwrap_or(0) > 0,
        sabotage_owner: std::env::var("DLSM_CHAOS_SABOTAGE").is_ok_and(|s| s == "owner"),
    });
    r.setup();
    if std::env::var("DLSM_CHAOS_SABOTAGE").is_ok_and(|s| s == "model") {
        r.sabotage();
    }
    for step in 0..steps {
        r.step(step);
        if !r.stats.violations.is_empty() {
            break;
        }
        if budget.is_some_and(|b| t.elapsed().as_secs() >= b) {
            eprintln!(
                "chaos seed {seed}: time budget spent after {} steps",
                step + 1
            );
            break;
        }
    }
    if r.stats.violations.is_empty() {
        r.settle_and_check();
    }
    let line = format!(
        "CHAOS seed={seed} {} secs={:.0}",
        r.stats.line(),
        t.elapsed().as_secs_f64()
    );
    println!("{line}");
    if !r.stats.violations.is_empty() {
        let dir = r.keep_dir();
        eprintln!(
            "--- seed {seed}: last events ---\n{}\n--- logs and data kept in {dir}\n--- rerun: {}",
            r.history_tail(40),
            rerun_cmd(seed, steps, no)
        );
    }
    std::mem::take(&mut r.stats)
}

#[test]
fn chaos() {
    let steps: u64 =
        env("DLSM_CHAOS_STEPS").unwrap_or(if cfg!(debug_assertions) { 60 } else { 150 });
    // The fault phase of a seed stops after this many seconds. The default
    // run (CI: `cargo test`, a debug build, no STEPS given) stays within a
    // few minutes: a seed whose faults keep requests waiting can take
    // minutes per 100 steps.
    let budget: Option<u64> = env("DLSM_CHAOS_BUDGET_SECS")
        .or((cfg!(debug_assertions) && std::env::var("DLSM_CHAOS_STEPS").is_err()).then_some(120));
    let no: Vec<String> = std::env::var("DLSM_CHAOS_NO")
        .map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let seeds: Vec<u64> = match env::<u64>("DLSM_CHAOS_SEED") {
        Some(s) => {
            let runs: u64 = env("DLSM_CHAOS_RUNS").unwrap_or(1);
            (s..s + runs).collect()
        }
        None => {
            let first: u64 = rand::random::<u32>() as u64;
            (first..first + env("DLSM_CHAOS_RUNS").unwrap_or(1)).collect()
        }
    };
    let mut total = Stats::default();
    for &seed in &seeds {
        eprintln!("chaos seed {seed} (rerun: {})", rerun_cmd(seed, steps, &no));
        total.add(&one(seed, steps, budget, &no));
    }
    println!(
        "CHAOS TOTAL seeds={}..={} {}",
        seeds[0],
        seeds[seeds.len() - 1],
        total.line()
    );
    if !total.violations.is_empty() {
        let mut msg = String::from("chaos harness found violations:\n");
        for v in &total.violations {
            let seed = common::seed_of(v);
            msg += &format!("  {v}\n    rerun: {}\n", rerun_cmd(seed, steps, &no));
        }
        panic!("{msg}");
    }
}
