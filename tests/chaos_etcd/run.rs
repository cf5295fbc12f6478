//! One seeded etcd-nemesis run: a 3-member etcd, 3 cluster-mode nodes each
//! behind its own proxies to etcd, a verifying client per volume, faults at
//! random moments, and the checks (see `tests/chaos_etcd.rs`).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::etcd::{health, Etcd};
use crate::common::{require, DLSM};
use crate::node::ENode;
use crate::proxy::{Mode, Proxy};
use crate::worker::{Ack, NodeStat, Nodes, Shared, Worker};

const MIB: u64 = 1 << 20;
/// An acknowledged write's request left the harness at least this long
/// after the node's lease deadline before it counts as a violation (the
/// harness notes a fault's time only after it took effect; this covers
/// its own scheduling).
const SLACK: Duration = Duration::from_millis(300);
/// An etcd leader cut from its quorum may renew leases until it notices
/// (CheckQuorum: within two election timeouts, 1 s each by default).
const LEADER_GRACE: Duration = Duration::from_secs(2);
/// Writes to a volume must be acknowledged again this long after the last
/// fault that could stop them healed.
const RESUME: Duration = Duration::from_secs(15);

pub struct Config {
    pub seed: u64,
    pub steps: u64,
    pub vols: usize,
    pub vol_mib: u64,
    pub ttl: u64,
    /// Fault kinds not to use (`DLSM_CHAOS_NO=etcd-all-down,node-kill`).
    pub no: Vec<String>,
    pub verbose: bool,
    /// `model`, `owner` or `lease`: break one check on purpose.
    pub sabotage: Option<String>,
}

#[derive(Default)]
pub struct Stats {
    pub steps: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub acked: u64,
    pub refused: BTreeMap<u32, u64>,
    pub lost: u64,
    pub reads: u64,
    pub flushes: u64,
    pub probes: u64,
    pub bytes_checked: u64,
    pub resume_max: Duration,
    pub record_checks: u64,
    /// Migrations the harness started, handed off, completed, cancelled
    /// (or that never started).
    pub migrations: [u64; 4],
    /// Windows in which a node could hold no lease that lasted past their
    /// start (so writes had to be refused), and their total length.
    pub lease_windows: u64,
    pub window_time: Duration,
    /// Refused writes by what explains them: a fault that takes the
    /// owner's lease away (or the owner itself down), one that only
    /// degrades etcd (a member, one link), or none.
    pub refused_why: BTreeMap<&'static str, u64>,
    pub violations: Vec<String>,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.acked += o.acked;
        for (k, v) in &o.refused {
            *self.refused.entry(*k).or_default() += v;
        }
        self.lost += o.lost;
        self.reads += o.reads;
        self.flushes += o.flushes;
        self.probes += o.probes;
        self.bytes_checked += o.bytes_checked;
        self.resume_max = self.resume_max.max(o.resume_max);
        self.record_checks += o.record_checks;
        for i in 0..4 {
            self.migrations[i] += o.migrations[i];
        }
        self.lease_windows += o.lease_windows;
        self.window_time += o.window_time;
        for (k, v) in &o.refused_why {
            *self.refused_why.entry(k).or_default() += v;
        }
        self.violations.extend(o.violations.iter().cloned());
    }

    pub fn line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(e, n)| format!("errno{e}:{n}"))
            .collect();
        format!(
            "steps={} faults={} writes=acked:{},refused:{}[{}][{}],unanswered:{} reads={} flushes={} probes={} record_checks={} migrations=started:{},handed_off:{},completed:{},cancelled:{} lease_windows={}({:.0}s) resume_max_ms={} bytes_checked={} violations={}",
            self.steps,
            faults.join(","),
            self.acked,
            self.refused.values().sum::<u64>(),
            refused.join(","),
            self.refused_why
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(","),
            self.lost,
            self.reads,
            self.flushes,
            self.probes,
            self.record_checks,
            self.migrations[0],
            self.migrations[1],
            self.migrations[2],
            self.migrations[3],
            self.lease_windows,
            self.window_time.as_secs_f64(),
            self.resume_max.as_millis(),
            self.bytes_checked,
            self.violations.len()
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    EtcdFreeze(usize),
    EtcdKill(usize),
    EtcdAllDown,
    /// Two members frozen: the one left has no quorum.
    EtcdQuorumFreeze(usize),
    NodeCut(usize, Mode),
    NodeCutOne(usize, usize),
    NodeFreeze(usize),
    NodeKill(usize),
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::EtcdFreeze(_) => "etcd-freeze",
            Fault::EtcdKill(_) => "etcd-kill",
            Fault::EtcdAllDown => "etcd-all-down",
            Fault::EtcdQuorumFreeze(_) => "etcd-quorum-freeze",
            Fault::NodeCut(_, Mode::Reset) => "node-cut-reset",
            Fault::NodeCut(..) => "node-cut-blackhole",
            Fault::NodeCutOne(..) => "node-cut-one",
            Fault::NodeFreeze(_) => "node-freeze",
            Fault::NodeKill(_) => "node-kill",
        }
    }

    fn node(&self) -> Option<usize> {
        match self {
            Fault::NodeCut(n, _)
            | Fault::NodeCutOne(n, _)
            | Fault::NodeFreeze(n)
            | Fault::NodeKill(n) => Some(*n),
            _ => None,
        }
    }
}

/// Whether a fault only degrades etcd (a member or one link gone, the
/// quorum whole): writes may go on through it.
fn degrades(f: &Fault) -> bool {
    matches!(
        f,
        Fault::EtcdFreeze(_) | Fault::EtcdKill(_) | Fault::NodeCutOne(..)
    )
}

/// Fault kinds the nemesis picks from (evenly, then a target).
const KINDS: &[&str] = &[
    "etcd-freeze",
    "etcd-kill",
    "etcd-all-down",
    "etcd-quorum-freeze",
    "lease-revoke",
    "node-cut-blackhole",
    "node-cut-reset",
    "node-cut-one",
    "node-freeze",
    "node-kill",
    "migrate",
];

/// A migration the harness started.
#[derive(Clone, Copy, Debug)]
struct Mig {
    from: usize,
    to: usize,
    /// The client follows it (its first write at `to` hands off).
    switched: bool,
    /// To be cancelled (chosen, or the migrate call failed).
    cancel: bool,
    /// A cancel was answered with success.
    cancelled: bool,
    since: Instant,
}

/// A time during which a node cannot hold a valid lease: from the last
/// moment its deadline can reach, to when the fault healed.
struct Window {
    node: Option<usize>,
    from: Instant,
    to: Option<Instant>,
    why: String,
    /// A violation in it was reported (one is enough).
    reported: bool,
}

struct Vol {
    name: String,
    owner: usize,
    generation: u64,
    /// Since when no fault that could stop its writes is active.
    clear_since: Option<Instant>,
    /// A heal whose first acknowledged write has not been seen yet.
    resume_pending: Option<Instant>,
    /// The owner's node: the latest acknowledgement's end, per node.
    last_acked: Vec<Option<Instant>>,
    /// The migration in progress, if any.
    mig: Option<Mig>,
}

impl Vol {
    /// Whether node `n` can stop its writes: the owner, or either end of
    /// its migration until it completes.
    fn involves(&self, n: usize) -> bool {
        self.owner == n || self.mig.is_some_and(|m| m.from == n || m.to == n)
    }

    fn hit_by(&self, f: &Fault) -> bool {
        f.node().is_none_or(|n| self.involves(n))
    }
}

pub struct Run {
    cfg: Config,
    rng: StdRng,
    pub stats: Stats,
    trust: Duration,
    etcd: Etcd,
    etcd_down: Vec<bool>,
    etcd_frozen: Vec<bool>,
    nodes: Vec<ENode>,
    stat: Nodes,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    vols: Vec<Vol>,
    workers: Vec<tokio::task::JoinHandle<Worker>>,
    /// Active faults: since when, and the first step they may heal at.
    active: Vec<(Fault, Instant, u64)>,
    /// Healed faults (and lease revocations): what, since, until.
    past: Vec<(Option<Fault>, Option<usize>, Instant, Instant)>,
    windows: Vec<Window>,
    acks_checked: usize,
    worker_violations_seen: usize,
    step: u64,
    history: Vec<String>,
    t0: Instant,
    dir: Option<tempfile::TempDir>,
    // Last: proxies and clients die before their runtime.
    rt: tokio::runtime::Runtime,
}

impl Run {
    pub fn new(cfg: Config) -> Run {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("dlsm-chaos-etcd-{}-", cfg.seed))
            .tempdir()
            .unwrap();
        require("etcdctl");
        let etcd = Etcd::start_members(3);
        let t = cfg.ttl;
        let m = (t / 5).max(1);
        let trust = Duration::from_secs(t - m);
        let mut nodes = Vec::new();
        for i in 0..3 {
            let proxies = etcd
                .urls
                .iter()
                .map(|u| rt.block_on(Proxy::start(u.trim_start_matches("http://").to_owned())))
                .collect();
            let mut n = ENode::new(
                i,
                dir.path().join(format!("n{i}")),
                dir.path().join(format!("n{i}.log")),
                proxies,
                t,
            );
            let mut attempt = 0;
            loop {
                attempt += 1;
                match n.start(true) {
                    Ok(()) => break,
                    Err(e) if attempt < 4 => eprintln!("n{i} did not start ({e}); new ports"),
                    Err(e) => panic!("n{i} did not start: {e}"),
                }
            }
            nodes.push(n);
        }
        let stat = Arc::new(Mutex::new(
            nodes
                .iter()
                .map(|n| NodeStat {
                    inc: 0,
                    running: true,
                    since: Instant::now(),
                    nbd: n.nbd.clone(),
                })
                .collect(),
        ));
        Run {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            stats: Stats::default(),
            trust,
            etcd,
            etcd_down: vec![false; 3],
            etcd_frozen: vec![false; 3],
            nodes,
            stat,
            shared: Arc::new(Mutex::new(Shared::default())),
            stop: Arc::new(AtomicBool::new(false)),
            vols: Vec::new(),
            workers: Vec::new(),
            active: Vec::new(),
            past: Vec::new(),
            windows: Vec::new(),
            acks_checked: 0,
            worker_violations_seen: 0,
            step: 0,
            history: Vec::new(),
            t0: Instant::now(),
            dir: Some(dir),
            rt,
        }
    }

    fn log(&mut self, s: String) {
        let line = format!(
            "[{:7.2}s step {}] {s}",
            self.t0.elapsed().as_secs_f64(),
            self.step
        );
        if self.cfg.verbose {
            eprintln!("{line}");
        }
        if let Some(d) = &self.dir {
            crate::common::append_event(d.path(), &line);
        }
        self.history.push(line);
    }

    fn violation(&mut self, kind: &str, msg: String) {
        let s = format!("seed={} step={} {kind}: {msg}", self.cfg.seed, self.step);
        self.log(format!("VIOLATION {s}"));
        // The first 20 are enough to read; the rest go to events.log.
        if self.stats.violations.len() < 20 {
            eprintln!("CHAOS VIOLATION {s}");
            self.stats.violations.push(s);
        }
    }

    pub fn failed(&self) -> bool {
        !self.stats.violations.is_empty()
    }

    // ---------------------------------------------------------------
    // etcd, as the harness sees it (directly, not through the proxies)

    /// `etcdctl ARGS` against the members that are up; stdout.
    fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let eps: Vec<&str> = (0..3)
            .filter(|&i| !self.etcd_down[i] && !self.etcd_frozen[i])
            .map(|i| self.etcd.urls[i].as_str())
            .collect();
        if eps.is_empty() {
            return Err("no member up".into());
        }
        let o = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).trim().to_owned())
        }
    }

    /// Every key under `/dlsm/v1/`, by key (without the prefix): the value
    /// (JSON) and the lease.
    fn etcd_keys(&self) -> Result<BTreeMap<String, (Value, i64)>, String> {
        let out = self.etcdctl(&["get", "--prefix", "/dlsm/v1/", "-w", "json"])?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut keys = BTreeMap::new();
        for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
            let k = b64.decode(kv["key"].as_str().unwrap_or("")).unwrap();
            let k = String::from_utf8_lossy(&k)
                .trim_start_matches("/dlsm/v1/")
                .to_owned();
            let val = b64.decode(kv["value"].as_str().unwrap_or("")).unwrap();
            let val = serde_json::from_slice(&val).unwrap_or(Value::Null);
            keys.insert(k, (val, kv["lease"].as_i64().unwrap_or(0)));
        }
        Ok(keys)
    }

    fn etcd_fault_active(&self) -> bool {
        self.active.iter().any(|(f, ..)| f.node().is_none())
    }

    fn wait_members_healthy(&mut self, which: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for &i in which {
            while !health(&self.etcd.health[i]) {
                if let Ok(Some(st)) = self.etcd.members[i].try_wait() {
                    self.violation("etcd", format!("member m{i} exited at restart ({st})"));
                    return;
                }
                if Instant::now() > deadline {
                    self.violation(
                        "etcd",
                        format!("member m{i} not healthy 30 s after restart"),
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn etcd_spawn(&mut self, i: usize) {
        self.etcd.members[i] = self.etcd.commands[i].spawn().expect("spawn etcd");
        self.etcd_down[i] = false;
    }

    // ---------------------------------------------------------------
    // Setup

    pub fn setup(&mut self) {
        for v in 0..self.cfg.vols {
            let name = format!("v{v}");
            let owner = v % 3;
            let at = self.rng.gen_range(0..3);
            let o = Command::new(DLSM)
                .args(["--api", &self.nodes[at].api, "volume", "create", &name])
                .args(["--size", &format!("{}M", self.cfg.vol_mib)])
                .args(["--on", &format!("n{owner}")])
                .env("RUST_LOG", "error")
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "volume create {name} --on n{owner} at n{at}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            self.vols.push(Vol {
                name,
                owner,
                generation: 0,
                clear_since: Some(Instant::now()),
                resume_pending: None,
                last_acked: vec![None; 3],
                mig: None,
            });
        }
        let keys = self.etcd_keys().expect("read the directory");
        for vol in &mut self.vols {
            let (rec, _) = &keys[&format!("volumes/{}", vol.name)];
            assert_eq!(rec["owner"], format!("n{}", vol.owner).as_str(), "{rec}");
            vol.generation = rec["generation"].as_u64().unwrap();
        }
        {
            let mut sh = self.shared.lock().unwrap();
            sh.stats = vec![Default::default(); self.vols.len()];
            sh.route = self.vols.iter().map(|v| v.owner).collect();
            sh.no_probe = vec![None; self.vols.len()];
        }
        for (v, vol) in self.vols.iter().enumerate() {
            let w = Worker::new(
                v,
                vol.name.clone(),
                vol.owner,
                self.cfg.vol_mib * MIB,
                self.cfg.seed.wrapping_mul(31).wrapping_add(v as u64 + 1),
                self.stat.clone(),
                self.shared.clone(),
                self.stop.clone(),
            );
            self.workers.push(self.rt.spawn(w.run()));
        }
        self.log(format!(
            "setup: etcd {}, nodes {}, volumes {}",
            self.etcd.url,
            self.nodes
                .iter()
                .map(|n| format!("n{} nbd={} api={}", n.idx, n.nbd, n.api))
                .collect::<Vec<_>>()
                .join("; "),
            self.vols
                .iter()
                .map(|v| format!("{} on n{} gen {}", v.name, v.owner, v.generation))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // ---------------------------------------------------------------
    // The nemesis

    fn node_busy(&self, n: usize) -> bool {
        self.active.iter().any(|(f, ..)| f.node() == Some(n))
    }

    /// A fault of `kind` that can start now, with its target.
    fn candidate(&mut self, kind: &str) -> Option<Fault> {
        let etcd_free = !self.etcd_fault_active();
        let free_nodes: Vec<usize> = (0..3).filter(|&n| !self.node_busy(n)).collect();
        let member = self.rng.gen_range(0..3);
        let node =
            (!free_nodes.is_empty()).then(|| free_nodes[self.rng.gen_range(0..free_nodes.len())]);
        match kind {
            "etcd-freeze" if etcd_free => Some(Fault::EtcdFreeze(member)),
            "etcd-kill" if etcd_free => Some(Fault::EtcdKill(member)),
            "etcd-all-down" if etcd_free => Some(Fault::EtcdAllDown),
            "etcd-quorum-freeze" if etcd_free => Some(Fault::EtcdQuorumFreeze(member)),
            "node-cut-blackhole" => node.map(|n| Fault::NodeCut(n, Mode::Blackhole)),
            "node-cut-reset" => node.map(|n| Fault::NodeCut(n, Mode::Reset)),
            "node-cut-one" => node.map(|n| Fault::NodeCutOne(n, member)),
            "node-freeze" => node.map(Fault::NodeFreeze),
            "node-kill" => node.map(Fault::NodeKill),
            _ => None,
        }
    }

    fn allowed(&self, kind: &str) -> bool {
        !self.cfg.no.iter().any(|s| s == kind)
    }

    fn act(&mut self) {
        let r = self.rng.gen_range(0..100);
        let n = self.active.len();
        // Faults that may heal now (a dead node restarts only while etcd
        // has a quorum: it must join; one member frozen or dead is fine).
        let no_quorum = self
            .active
            .iter()
            .any(|(f, ..)| matches!(f, Fault::EtcdAllDown | Fault::EtcdQuorumFreeze(_)));
        let due: Vec<usize> = (0..n)
            .filter(|&i| {
                let (f, _, until) = self.active[i];
                self.step >= until && !(matches!(f, Fault::NodeKill(_)) && no_quorum)
            })
            .collect();
        if !due.is_empty() && (r < 60 || n >= 2) {
            let i = due[self.rng.gen_range(0..due.len())];
            self.heal(i);
            return;
        }
        if n >= 2 {
            self.log("quiet (two faults active)".into());
            return;
        }
        if r >= 85 {
            self.log("quiet".into());
            return;
        }
        let kinds: Vec<&str> = KINDS.iter().copied().filter(|k| self.allowed(k)).collect();
        for _ in 0..6 {
            let kind = kinds[self.rng.gen_range(0..kinds.len())];
            if kind == "lease-revoke" {
                if self.lease_revoke() {
                    return;
                }
                continue;
            }
            if kind == "migrate" {
                if self.migrate() {
                    return;
                }
                continue;
            }
            if let Some(f) = self.candidate(kind) {
                self.start(f);
                return;
            }
        }
    }

    fn window(&mut self, node: Option<usize>, from: Instant, why: String) {
        self.windows.push(Window {
            node,
            from,
            to: None,
            why,
            reported: false,
        });
    }

    fn close_windows(&mut self, node: Option<usize>) {
        let now = Instant::now();
        for w in &mut self.windows {
            if w.node == node && w.to.is_none() {
                w.to = Some(now);
                if now > w.from {
                    self.stats.lease_windows += 1;
                    self.stats.window_time += now - w.from;
                }
            }
        }
    }

    fn set_stat(&self, n: usize, f: impl FnOnce(&mut NodeStat)) {
        f(&mut self.stat.lock().unwrap()[n]);
    }

    fn start(&mut self, f: Fault) {
        // Before it takes effect: a write sent just before it may still be
        // refused because of it.
        let begun = Instant::now();
        *self.stats.faults.entry(f.kind()).or_default() += 1;
        match f {
            Fault::EtcdFreeze(i) => {
                self.etcd.signal(i, Signal::SIGSTOP);
                self.etcd_frozen[i] = true;
            }
            Fault::EtcdKill(i) => {
                self.etcd.kill(i);
                self.etcd_down[i] = true;
            }
            Fault::EtcdAllDown => {
                for i in 0..3 {
                    self.etcd.kill(i);
                    self.etcd_down[i] = true;
                }
                let from = Instant::now() + self.trust + SLACK;
                self.window(None, from, "every etcd member killed".into());
            }
            Fault::EtcdQuorumFreeze(keep) => {
                for i in (0..3).filter(|&i| i != keep) {
                    self.etcd.signal(i, Signal::SIGSTOP);
                    self.etcd_frozen[i] = true;
                }
                let from = Instant::now() + self.trust + LEADER_GRACE + SLACK;
                self.window(
                    None,
                    from,
                    format!("two etcd members frozen (m{keep} left)"),
                );
            }
            Fault::NodeCut(n, m) => {
                self.nodes[n].set_links(m);
                let from = Instant::now() + self.trust + SLACK;
                self.window(Some(n), from, format!("n{n} cut from etcd ({m:?})"));
            }
            Fault::NodeCutOne(n, m) => self.nodes[n].proxies[m].set(Mode::Blackhole),
            Fault::NodeFreeze(n) => {
                self.nodes[n].signal(Signal::SIGSTOP);
                self.set_stat(n, |s| s.running = false);
            }
            Fault::NodeKill(n) => {
                self.nodes[n].kill9();
                self.set_stat(n, |s| {
                    s.running = false;
                    s.inc += 1;
                });
            }
        }
        // How many steps it lasts at least: the ones that take the lease
        // away longer, so that many outlast the lease (T - m).
        let steps = match f {
            Fault::NodeCut(..) | Fault::EtcdAllDown | Fault::EtcdQuorumFreeze(_) => {
                self.rng.gen_range(1..=6)
            }
            _ => self.rng.gen_range(1..=4),
        };
        self.active.push((f, begun, self.step + steps));
        for vol in &mut self.vols {
            if vol.hit_by(&f) {
                vol.clear_since = None;
            }
        }
        self.log(format!("fault {f:?} starts"));
    }

    fn heal(&mut self, i: usize) {
        let (f, since, _) = self.active.remove(i);
        self.past.push((Some(f), f.node(), since, Instant::now()));
        match f {
            Fault::EtcdFreeze(m) => {
                self.etcd.signal(m, Signal::SIGCONT);
                self.etcd_frozen[m] = false;
            }
            Fault::EtcdKill(m) => {
                self.etcd_spawn(m);
                self.wait_members_healthy(&[m]);
            }
            Fault::EtcdAllDown => {
                self.close_windows(None);
                for m in 0..3 {
                    self.etcd_spawn(m);
                }
                self.wait_members_healthy(&[0, 1, 2]);
            }
            Fault::EtcdQuorumFreeze(_) => {
                self.close_windows(None);
                for m in 0..3 {
                    if self.etcd_frozen[m] {
                        self.etcd.signal(m, Signal::SIGCONT);
                        self.etcd_frozen[m] = false;
                    }
                }
            }
            Fault::NodeCut(n, _) => {
                self.close_windows(Some(n));
                self.nodes[n].set_links(Mode::Up);
            }
            Fault::NodeCutOne(n, m) => self.nodes[n].proxies[m].set(Mode::Up),
            Fault::NodeFreeze(n) => {
                self.nodes[n].signal(Signal::SIGCONT);
                self.set_stat(n, |s| {
                    s.running = true;
                    s.since = Instant::now();
                });
            }
            Fault::NodeKill(n) => {
                let mut ok = false;
                for attempt in 0..3 {
                    match self.nodes[n].start(attempt > 0) {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(e) => self.log(format!("n{n} restart failed: {e}")),
                    }
                }
                if !ok {
                    let msg = format!(
                        "n{n} did not restart (3 tries); see {}",
                        self.nodes[n].log.display()
                    );
                    self.violation("restart", msg);
                    return;
                }
                let nbd = self.nodes[n].nbd.clone();
                self.set_stat(n, |s| {
                    s.running = true;
                    s.since = Instant::now();
                    s.nbd = nbd;
                });
            }
        }
        self.log(format!(
            "fault {f:?} healed after {:.1} s",
            since.elapsed().as_secs_f64()
        ));
        self.update_clear();
    }

    /// Marks every volume no active fault may stop as clear (from now).
    fn update_clear(&mut self) {
        let now = Instant::now();
        for v in 0..self.vols.len() {
            let affected = self.active.iter().any(|(f, ..)| self.vols[v].hit_by(f));
            let vol = &mut self.vols[v];
            if !affected && vol.clear_since.is_none() {
                vol.clear_since = Some(now);
                vol.resume_pending = Some(now);
            }
        }
    }

    /// `etcdctl lease revoke` of a node's lease (the one `nodes/NAME` is
    /// under). The node learns of it at its next renewal and re-registers.
    fn lease_revoke(&mut self) -> bool {
        if self.etcd_fault_active() {
            return false;
        }
        let n = self.rng.gen_range(0..3);
        if self.node_busy(n) {
            return false;
        }
        let Ok(keys) = self.etcd_keys() else {
            return false;
        };
        let Some((_, lease)) = keys.get(&format!("nodes/n{n}")) else {
            return false;
        };
        let lease = *lease;
        *self.stats.faults.entry("lease-revoke").or_default() += 1;
        let begun = Instant::now();
        match self.etcdctl(&["lease", "revoke", &format!("{lease:x}")]) {
            Ok(_) => self.log(format!("lease {lease:x} of n{n} revoked")),
            Err(e) => self.log(format!("lease {lease:x} of n{n}: revoke failed: {e}")),
        }
        let now = Instant::now();
        self.past.push((None, Some(n), begun, now));
        for v in 0..self.vols.len() {
            // (Another fault may still stop it: its other migration end.)
            let hit = self.active.iter().any(|(f, ..)| self.vols[v].hit_by(f));
            let vol = &mut self.vols[v];
            if vol.involves(n) && !hit {
                vol.clear_since = Some(now);
                vol.resume_pending = Some(now);
            }
        }
        true
    }

    // ---------------------------------------------------------------
    // Checks

    /// The harness's own check that what it froze stays frozen: a stopped
    /// process continued by someone else would make the lease windows
    /// wrong. (The kernel does it: SIGHUP and SIGCONT to every process of
    /// a stopped process group that becomes orphaned, e.g. when the shell
    /// that started the test in the background exits. Start it from a
    /// shell that waits, or under `setsid`.)
    fn check_frozen(&mut self) {
        let state = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().chars().next()))
                .flatten()
        };
        let mut running = Vec::new();
        for m in 0..3 {
            if self.etcd_frozen[m] {
                let st = state(self.etcd.members[m].id());
                if st.is_some_and(|c| c != 'T' && c != 't') {
                    running.push(format!("etcd member m{m} (state {st:?})"));
                }
            }
        }
        for (f, ..) in &self.active {
            if let Fault::NodeFreeze(n) = f {
                let st = self.nodes[*n].pid().and_then(|p| state(p.as_raw() as u32));
                if st.is_some_and(|c| c != 'T' && c != 't') {
                    running.push(format!("n{n} (state {st:?})"));
                }
            }
        }
        if !running.is_empty() {
            let msg = format!(
                "{} should be stopped (SIGSTOP) but run: something else sent SIGCONT (an orphaned process group? see check_frozen); this run proves nothing",
                running.join(", ")
            );
            self.violation("harness", msg);
        }
    }

    fn check_processes(&mut self) {
        self.check_frozen();
        for n in 0..3 {
            if let Some(p) = self.nodes[n].new_panics().first() {
                self.violation("panic", format!("n{n}: {p}"));
            }
            if let Some(st) = self.nodes[n].exited() {
                self.violation("node-exited", format!("n{n} exited by itself ({st})"));
            }
        }
        for m in 0..3 {
            if !self.etcd_down[m] {
                if let Ok(Some(st)) = self.etcd.members[m].try_wait() {
                    self.etcd_down[m] = true;
                    self.violation("etcd", format!("member m{m} exited by itself ({st})"));
                }
            }
        }
    }

    /// Every acknowledgement since the last look: from the owner only, in
    /// no other node's interval, outside every window in which its node
    /// could not hold a lease; and the first after a heal (resume time).
    fn check_acks(&mut self) {
        let (acks, wv): (Vec<Ack>, Vec<String>) = {
            let sh = self.shared.lock().unwrap();
            (
                sh.acks[self.acks_checked..].to_vec(),
                sh.violations[self.worker_violations_seen..].to_vec(),
            )
        };
        self.acks_checked += acks.len();
        self.worker_violations_seen += wv.len();
        for v in wv {
            let (kind, msg) = v.split_once(": ").unwrap_or(("worker", &v));
            self.violation(kind, msg.to_owned());
        }
        for a in acks {
            let (name, owner) = (self.vols[a.vol].name.clone(), self.vols[a.vol].owner);
            let handoff = self.vols[a.vol]
                .mig
                .is_some_and(|m| m.switched && m.from == owner && m.to == a.node);
            if handoff {
                self.handed_off(a.vol, format!("a write acknowledged at n{}", a.node));
            } else if a.node != owner {
                let msg = format!(
                    "{name}: n{} acknowledged a write of [{}, +{}) but the directory names n{}",
                    a.node, a.off, a.len, owner
                );
                self.violation("non-owner-ack", msg);
            }
            let last_acked = self.vols[a.vol].last_acked.clone();
            for (b, end) in last_acked.iter().enumerate() {
                if b != a.node && end.is_some_and(|e| e > a.sent) {
                    let msg = format!(
                        "{name}: n{} acknowledged a write in [{:.3}, {:.3}] s while n{b} acknowledged one until {:.3} s",
                        a.node,
                        (a.sent - self.t0).as_secs_f64(),
                        (a.acked - self.t0).as_secs_f64(),
                        (end.unwrap() - self.t0).as_secs_f64()
                    );
                    self.violation("two-writers", msg);
                }
            }
            let e = &mut self.vols[a.vol].last_acked[a.node];
            *e = Some(e.map_or(a.acked, |x| x.max(a.acked)));
            for wi in 0..self.windows.len() {
                let w = &self.windows[wi];
                if w.reported || w.node.is_some_and(|n| n != a.node) {
                    continue;
                }
                // Sent once the lease could no longer be valid and
                // acknowledged before the fault healed. A write sent in the
                // window may wait for the lease (up to a TTL) and be
                // acknowledged after the heal and a renewal: legitimate.
                if a.sent > w.from && w.to.is_none_or(|t| a.acked < t) {
                    let msg = format!(
                        "{name}: n{} acknowledged a write of [{}, +{}) sent at {:.3} s, {:.3} s after its lease could last ({}; window [{:.3}, {}])",
                        a.node,
                        a.off,
                        a.len,
                        (a.sent - self.t0).as_secs_f64(),
                        (a.sent - w.from + SLACK).as_secs_f64(),
                        w.why,
                        (w.from - self.t0).as_secs_f64(),
                        w.to.map_or("open".into(), |t| format!("{:.3}", (t - self.t0).as_secs_f64()))
                    );
                    self.windows[wi].reported = true;
                    self.violation("ack-without-lease", msg);
                    break;
                }
            }
            let vol = &mut self.vols[a.vol];
            if let Some(t) = vol.resume_pending {
                if a.sent >= t {
                    let took = a.acked - t;
                    vol.resume_pending = None;
                    self.stats.resume_max = self.stats.resume_max.max(took);
                }
            }
        }
    }

    /// Writes flow again within [`RESUME`] after the faults that could stop
    /// them healed.
    fn check_resume(&mut self) {
        for v in 0..self.vols.len() {
            let Some(since) = self.vols[v].clear_since else {
                continue;
            };
            if since.elapsed() < RESUME {
                continue;
            }
            let last = self.shared.lock().unwrap().stats[v].last_ack;
            if last.is_none_or(|l| l < since) {
                let msg = format!(
                    "{}: no write acknowledged at n{} in the {} s since the last fault that could stop it healed (at {:.3} s)",
                    self.vols[v].name,
                    self.vols[v].owner,
                    RESUME.as_secs(),
                    (since - self.t0).as_secs_f64()
                );
                self.violation("no-resume", msg);
            }
        }
    }

    /// etcd's record of each volume names its owner at the generation it
    /// was created with; once no fault stopped the owner for [`RESUME`]
    /// (and with `strict`, at the end), it is bound to the owner's current
    /// lease; with `strict`, every node is up.
    fn check_records(&mut self, strict: bool) {
        if self.etcd_fault_active() {
            return;
        }
        let keys = match self.etcd_keys() {
            Ok(k) => k,
            Err(e) => {
                if strict {
                    self.violation("etcd", format!("cannot read the directory: {e}"));
                } else {
                    self.log(format!("directory not read: {e}"));
                }
                return;
            }
        };
        self.stats.record_checks += 1;
        for v in 0..self.vols.len() {
            let name = self.vols[v].name.clone();
            let Some((rec, _)) = keys.get(&format!("volumes/{name}")) else {
                self.violation("record", format!("{name}: no record in etcd"));
                continue;
            };
            let names = |n: usize, g: u64| {
                rec["owner"] == format!("n{n}").as_str() && rec["generation"].as_u64() == Some(g)
            };
            let (owner, generation) = (self.vols[v].owner, self.vols[v].generation);
            let mig = self.vols[v].mig;
            // Handed off (the first write at the destination may not have
            // been acknowledged): the destination, one generation later.
            if mig.is_some_and(|m| m.switched && m.from == owner && names(m.to, generation + 1)) {
                self.handed_off(v, "the record".into());
            } else if !names(owner, generation) {
                let msg = format!("{name}: the record changed: {rec} (the harness expects n{owner} at generation {generation}; its migration: {mig:?})");
                self.violation("record", msg);
                continue;
            }
            let (owner, generation) = (self.vols[v].owner, self.vols[v].generation);
            let rm = &rec["migration"];
            match mig {
                None if !rm.is_null() => {
                    let msg = format!("{name}: a migration the harness did not start: {rec}");
                    self.violation("record", msg);
                    continue;
                }
                Some(m)
                    if !rm.is_null()
                        && (rm["from"] != format!("n{}", m.from).as_str()
                            || rm["to"] != format!("n{}", m.to).as_str()) =>
                {
                    let msg = format!("{name}: the record's migration is not the one the harness started ({m:?}): {rec}");
                    self.violation("record", msg);
                    continue;
                }
                None => {}
                // In progress.
                Some(_) if !rm.is_null() => {}
                Some(m) if owner == m.to => {
                    self.stats.migrations[2] += 1;
                    self.end_migration(
                        v,
                        format!(
                            "n{} -> n{} complete (generation {generation}) after {:.1} s",
                            m.from,
                            m.to,
                            m.since.elapsed().as_secs_f64()
                        ),
                    );
                }
                // Cancelled, or the migrate call failed before it recorded
                // anything (given time to be sure).
                Some(m)
                    if !m.switched
                        && (m.cancelled || m.since.elapsed() > Duration::from_secs(30)) =>
                {
                    self.stats.migrations[3] += 1;
                    self.end_migration(
                        v,
                        format!(
                            "n{} -> n{} not in the record: cancelled or never started",
                            m.from, m.to
                        ),
                    );
                }
                Some(m) if !m.switched => {}
                Some(m) => {
                    let msg = format!("{name}: the migration n{} -> n{} the client follows left the record before its handoff: {rec}", m.from, m.to);
                    self.violation("record", msg);
                    continue;
                }
            }
            // Bound to the owner's lease once nothing stops the owner
            // for a while (a lost lease replaced, the records rebound).
            let settled = self.vols[v]
                .clear_since
                .is_some_and(|t| t.elapsed() > RESUME);
            if strict || settled {
                let node = keys.get(&format!("nodes/n{owner}"));
                let lease = node.map(|n| n.1);
                if lease != rec["owner_lease"].as_i64() {
                    let msg = format!(
                        "{name}: owner_lease {} but nodes/n{owner} is under lease {lease:?} (records not rebound)",
                        rec["owner_lease"]
                    );
                    self.violation("record", msg);
                }
            }
        }
        if strict {
            for n in 0..3 {
                if !keys.contains_key(&format!("nodes/n{n}")) {
                    self.violation("record", format!("nodes/n{n} missing: n{n} not up"));
                }
            }
            // The owner holds the only copy: every migration's source
            // released its own.
            for v in 0..self.vols.len() {
                let owner = self.vols[v].owner;
                for n in (0..3).filter(|&n| n != owner) {
                    let name = &self.vols[v].name;
                    let table = self.nodes[n]
                        .data_dir
                        .join("volumes")
                        .join(name)
                        .join("table.json");
                    if table.exists() {
                        let msg = format!(
                            "{name}: n{n} still holds a copy (the owner is n{})",
                            self.vols[v].owner
                        );
                        self.violation("copy-left", msg);
                    }
                }
            }
        }
    }

    /// A migration's handoff seen (by `how`): the destination owns the
    /// volume, one generation later.
    fn handed_off(&mut self, v: usize, how: String) {
        let vol = &mut self.vols[v];
        let m = vol.mig.expect("a migration");
        vol.owner = m.to;
        vol.generation += 1;
        let msg = format!(
            "{}: handed off n{} -> n{} (generation {}), seen by {how}",
            vol.name, m.from, m.to, vol.generation
        );
        self.stats.migrations[1] += 1;
        self.log(msg);
    }

    fn end_migration(&mut self, v: usize, msg: String) {
        self.vols[v].mig = None;
        self.shared.lock().unwrap().no_probe[v] = None;
        let msg = format!("{}: migration {msg}", self.vols[v].name);
        self.log(msg);
        self.update_clear();
    }

    /// `dlsm --api (node at) ARGS`, given 20 s.
    fn cli(&self, at: usize, args: &[&str]) -> Result<String, String> {
        let o = Command::new("timeout")
            .args(["20", DLSM, "--api", &self.nodes[at].api])
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// Migrates a volume with no migration in progress to another node, by
    /// name, asked of any node: then the client follows it (its first write
    /// hands off), or (one in four) the harness cancels it at the source.
    fn migrate(&mut self) -> bool {
        let free: Vec<usize> = (0..self.vols.len())
            .filter(|&v| self.vols[v].mig.is_none() && !self.node_busy(self.vols[v].owner))
            .collect();
        if free.is_empty() {
            return false;
        }
        let v = free[self.rng.gen_range(0..free.len())];
        let from = self.vols[v].owner;
        let to = (from + self.rng.gen_range(1..3)) % 3;
        if self.node_busy(to) {
            return false;
        }
        let ups: Vec<usize> = (0..3).filter(|&n| !self.node_busy(n)).collect();
        let at = ups[self.rng.gen_range(0..ups.len())];
        let cancel = self.rng.gen_bool(0.25);
        let slow = self.rng.gen_bool(0.5);
        let name = self.vols[v].name.clone();
        *self.stats.faults.entry("migrate").or_default() += 1;
        self.stats.migrations[0] += 1;
        self.shared.lock().unwrap().no_probe[v] = Some(to);
        self.vols[v].mig = Some(Mig {
            from,
            to,
            switched: false,
            cancel: true,
            cancelled: false,
            since: Instant::now(),
        });
        let dest = format!("n{to}");
        let mut args = vec!["migrate", &name, "--to", &dest];
        if slow {
            args.extend(["--rate", "1M"]);
        }
        match self.cli(at, &args) {
            Ok(_) if !cancel => {
                self.shared.lock().unwrap().route[v] = to;
                let m = self.vols[v].mig.as_mut().unwrap();
                m.switched = true;
                m.cancel = false;
                self.log(format!(
                    "{name}: migrate n{from} -> n{to} (asked of n{at}{}) prepared; the client follows",
                    if slow { ", 1M/s" } else { "" }
                ));
            }
            Ok(_) => {
                *self.stats.faults.entry("migrate-cancel").or_default() += 1;
                self.log(format!(
                    "{name}: migrate n{from} -> n{to} (asked of n{at}) prepared; cancelling it"
                ));
                self.cancel_migration(v);
            }
            Err(e) => {
                self.log(format!(
                    "{name}: migrate n{from} -> n{to} (asked of n{at}) failed: {e}; cancelling it"
                ));
                self.cancel_migration(v);
            }
        }
        true
    }

    /// `migration cancel` at the source of a migration the client does not
    /// follow.
    fn cancel_migration(&mut self, v: usize) {
        let Some(m) = self.vols[v].mig else { return };
        if m.switched || m.cancelled {
            return;
        }
        let name = self.vols[v].name.clone();
        match self.cli(m.from, &["migration", "cancel", &name]) {
            Ok(_) => {
                self.vols[v].mig.as_mut().unwrap().cancelled = true;
                self.log(format!(
                    "{name}: migration n{} -> n{} cancelled",
                    m.from, m.to
                ));
            }
            // The source knows of no migration: nothing to cancel (the
            // record then shows none, or the check says what it shows).
            Err(e) if e.contains("(HTTP 404)") => {
                self.vols[v].mig.as_mut().unwrap().cancelled = true;
                self.log(format!(
                    "{name}: migration cancel at n{}: {e}; nothing to cancel",
                    m.from
                ));
            }
            Err(e) => self.log(format!("{name}: migration cancel at n{}: {e}", m.from)),
        }
    }

    /// Cancels what is to be cancelled, when its nodes and etcd are whole.
    fn tend_migrations(&mut self) {
        if self.etcd_fault_active() {
            return;
        }
        for v in 0..self.vols.len() {
            if let Some(m) = self.vols[v].mig {
                if m.cancel && !m.cancelled && !self.node_busy(m.from) && !self.node_busy(m.to) {
                    self.cancel_migration(v);
                }
            }
        }
    }

    /// Sorts the refused writes by what explains them (see
    /// [`Stats::refused_why`]): a fault on the owner or on etcd's quorum,
    /// or a lease revocation, up to [`EXPLAINS`] after it ended; else one
    /// that only degrades etcd; else nothing (logged).
    fn classify_refusals(&mut self) {
        const EXPLAINS: Duration = Duration::from_secs(8);
        let refusals = self.shared.lock().unwrap().refusals.clone();
        let now = Instant::now();
        let mut spans: Vec<(bool, Option<usize>, Instant, Instant)> = self
            .past
            .iter()
            .map(|(f, n, a, b)| (f.is_some_and(|f| degrades(&f)), *n, *a, *b))
            .collect();
        spans.extend(
            self.active
                .iter()
                .map(|(f, a, _)| (degrades(f), f.node(), *a, now)),
        );
        let mut why = BTreeMap::new();
        let mut unexplained = Vec::new();
        let mut degraded: Vec<(usize, usize, Instant)> = Vec::new();
        for (v, node, t) in refusals {
            let covers = |deg: bool| {
                // A write sent just before a fault began may be refused
                // because of it.
                spans.iter().any(|(d, n, a, b)| {
                    *d == deg
                        && n.is_none_or(|n| n == node)
                        && t + Duration::from_millis(500) >= *a
                        && t <= *b + EXPLAINS
                })
            };
            let k = if covers(false) {
                "lease-fault"
            } else if covers(true) {
                degraded.push((v, node, t));
                "etcd-degraded"
            } else {
                unexplained.push((v, node, t));
                "unexplained"
            };
            *why.entry(k).or_default() += 1;
        }
        self.stats.refused_why = why;
        for (what, list) in [
            ("with no fault to explain them", &unexplained),
            ("while etcd only had a member or a link down", &degraded),
        ] {
            // Each run of refusals (a gap of 1 s ends one): where and when.
            let mut runs: Vec<String> = Vec::new();
            let mut last: Option<Instant> = None;
            for (v, n, t) in list.iter() {
                if last.is_none_or(|l| *t > l + Duration::from_secs(1)) {
                    runs.push(format!(
                        "{} at n{n} from {:.3} s",
                        self.vols[*v].name,
                        (*t - self.t0).as_secs_f64()
                    ));
                }
                last = Some(*t);
            }
            if !list.is_empty() {
                let msg = format!("{} writes refused {what}: {}", list.len(), runs.join("; "));
                eprintln!("chaos_etcd seed {}: {msg}", self.cfg.seed);
                self.log(msg);
            }
        }
    }

    fn collect_worker_stats(&mut self) {
        let sh = self.shared.lock().unwrap();
        let mut s = Stats::default();
        for v in &sh.stats {
            s.acked += v.acked;
            for (k, n) in &v.refused {
                *s.refused.entry(*k).or_default() += n;
            }
            s.lost += v.lost;
            s.reads += v.reads;
            s.flushes += v.flushes;
            s.probes += v.probes;
            s.bytes_checked += v.bytes_read_checked;
        }
        drop(sh);
        self.stats.acked = s.acked;
        self.stats.refused = s.refused;
        self.stats.lost = s.lost;
        self.stats.reads = s.reads;
        self.stats.flushes = s.flushes;
        self.stats.probes = s.probes;
        self.stats.bytes_checked = s.bytes_checked;
    }

    pub fn step(&mut self, step: u64) {
        self.step = step;
        self.act();
        let ms = self.rng.gen_range(800..3500);
        std::thread::sleep(Duration::from_millis(ms));
        self.check_processes();
        self.check_acks();
        self.check_resume();
        self.check_records(false);
        self.tend_migrations();
        self.collect_worker_stats();
        self.stats.steps += 1;
    }

    // ---------------------------------------------------------------
    // The end: every fault heals, writes resume, every byte matches.

    pub fn settle_and_check(&mut self) {
        self.step = self.cfg.steps;
        self.log("end: healing every fault".into());
        // etcd first: a dead node restarts only with etcd whole.
        while let Some(i) = self
            .active
            .iter()
            .position(|(f, ..)| f.node().is_none())
            .or((!self.active.is_empty()).then_some(0))
        {
            self.heal(i);
        }
        let healed = Instant::now();
        match self.cfg.sabotage.as_deref() {
            Some("owner") => {
                // A write "acknowledged" by another node inside the last
                // real acknowledgement's interval.
                let mut sh = self.shared.lock().unwrap();
                if let Some(a) = sh.acks.last().cloned() {
                    sh.acks.push(Ack {
                        node: (a.node + 1) % 3,
                        ..a
                    });
                }
            }
            Some("lease") => {
                let owner = self.vols[0].owner;
                self.windows.push(Window {
                    node: Some(owner),
                    from: healed,
                    to: None,
                    why: "sabotage: a made-up window".into(),
                    reported: false,
                });
            }
            _ => {}
        }
        // Writes resume.
        let deadline = healed + Duration::from_secs(30);
        loop {
            self.check_acks();
            let sh = self.shared.lock().unwrap();
            let waiting: Vec<usize> = (0..self.vols.len())
                .filter(|&v| sh.stats[v].last_ack.is_none_or(|l| l < healed))
                .collect();
            drop(sh);
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for v in waiting {
                    let msg = format!(
                        "{}: no write acknowledged at n{} within 30 s after every fault healed",
                        self.vols[v].name, self.vols[v].owner
                    );
                    self.violation("no-resume", msg);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Every migration completes (or is cancelled) with the faults healed.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_acks();
            self.check_records(false);
            self.tend_migrations();
            if self.vols.iter().all(|v| v.mig.is_none()) || self.failed() {
                break;
            }
            if Instant::now() > deadline {
                for v in 0..self.vols.len() {
                    if let Some(m) = self.vols[v].mig {
                        let msg = format!(
                            "{}: migration {m:?} not finished 60 s after every fault healed",
                            self.vols[v].name
                        );
                        self.violation("migration-pending", msg);
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // A little more traffic with everything healed, then the workers stop.
        std::thread::sleep(Duration::from_secs(2));
        self.stop.store(true, Ordering::Relaxed);
        let handles = std::mem::take(&mut self.workers);
        let mut workers: Vec<Worker> = handles
            .into_iter()
            .map(|h| self.rt.block_on(h).expect("worker task"))
            .collect();
        self.check_acks();
        self.check_processes();
        // Records: rebound to the owner's current lease within RESUME.
        let deadline = Instant::now() + RESUME;
        loop {
            let before = self.stats.violations.len();
            self.check_records(true);
            if self.stats.violations.len() == before || Instant::now() > deadline {
                break;
            }
            // Not yet: drop what this look found and look again.
            self.stats.violations.truncate(before);
            std::thread::sleep(Duration::from_millis(500));
        }
        if self.cfg.sabotage.as_deref() == Some("model") {
            if let Some(p) = workers[0].model.sabotage() {
                self.log(format!("sabotage: v0's model byte {p} flipped"));
            }
        }
        // Every byte of every volume, at its owner.
        let mut checked = 0;
        for w in &mut workers {
            let owner = self.vols[w.vol].owner;
            if w.owner != owner {
                let msg = format!(
                    "{}: the client is at n{} but n{owner} owns it",
                    w.name, w.owner
                );
                self.violation("harness", msg);
            }
            let w_owner = owner;
            let addr = self.nodes[w_owner].nbd.clone();
            match self.rt.block_on(w.final_check(&addr)) {
                Ok(n) => checked += n,
                Err(e) => {
                    let kind = if e.starts_with("byte ") {
                        "final-mismatch"
                    } else {
                        "final-read"
                    };
                    let msg = format!("{} at n{w_owner}: {e}", w.name);
                    self.violation(kind, msg);
                }
            }
        }
        self.collect_worker_stats();
        self.classify_refusals();
        self.stats.bytes_checked += checked;
        self.check_processes();
    }

    /// Keeps the run's directory (node logs, data, events, etcd's logs) and
    /// returns its path.
    pub fn keep_dir(&mut self) -> String {
        let Some(d) = self.dir.take() else {
            return String::new();
        };
        let etcd_logs = d.path().join("etcd");
        let _ = std::fs::create_dir_all(&etcd_logs);
        for m in 0..3 {
            let _ = std::fs::copy(
                self.etcd._dir.path().join(format!("m{m}.log")),
                etcd_logs.join(format!("m{m}.log")),
            );
        }
        d.keep().display().to_string()
    }

    pub fn history_tail(&self, n: usize) -> String {
        let s = self.history.len().saturating_sub(n);
        self.history[s..].join("\n")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for m in 0..3 {
            if self.etcd_frozen[m] {
                self.etcd.signal(m, Signal::SIGCONT);
            }
        }
    }
}
