//! One seeded chaos run: nodes, volumes that wander among them, a client
//! that follows each volume, stale writers, faults and operator actions at
//! random moments, and the checks (see `tests/chaos.rs`).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use dlsm::nbd::client::{ClientError, NbdAddr, NbdClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{cli, free_port, Node, Out, State};
use super::proxy::{Mode, Proxy};
use crate::common::pattern;
use crate::common::Tmpfs;

const MIB: u64 = 1 << 20;
/// The tail of every volume only stale writers write.
const STALE: u64 = 512 << 10;
/// Longest one NBD request of the harness may take.
const OP_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest an ordinary CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// A destination fences a returning source within this after its restart.
const ZOMBIE_GRACE: Duration = Duration::from_secs(10);

pub struct Config {
    pub seed: u64,
    pub steps: u64,
    pub nodes: usize,
    pub vols: usize,
    pub vol_mib: u64,
    /// Action kinds not to use (`DLSM_CHAOS_NO=rm,second-serve`).
    pub no: Vec<String>,
    pub verbose: bool,
    /// Deliberately break the two-writers check: every stale write counts
    /// as acknowledged after a later owner's write (the run must fail).
    pub sabotage_owner: bool,
}

#[derive(Default)]
pub struct Stats {
    pub steps: u64,
    pub faults: BTreeMap<&'static str, u64>,
    /// Operator actions: (accepted, refused).
    pub operator: BTreeMap<&'static str, (u64, u64)>,
    pub mig_started: u64,
    pub mig_completed: u64,
    /// Cancels after handoff that started a rollback.
    pub rollbacks: u64,
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub bytes_checked: u64,
    pub stale_refused: u64,
    pub stale_acked_legit: u64,
    pub zombie_acks: u64,
    pub violations: Vec<String>,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        for (k, (a, r)) in &o.operator {
            let e = self.operator.entry(k).or_default();
            e.0 += a;
            e.1 += r;
        }
        self.mig_started += o.mig_started;
        self.mig_completed += o.mig_completed;
        self.rollbacks += o.rollbacks;
        self.writes_acked += o.writes_acked;
        self.reads_checked += o.reads_checked;
        self.bytes_checked += o.bytes_checked;
        self.stale_refused += o.stale_refused;
        self.stale_acked_legit += o.stale_acked_legit;
        self.zombie_acks += o.zombie_acks;
        self.violations.extend(o.violations.iter().cloned());
    }

    pub fn line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let ops: Vec<String> = self
            .operator
            .iter()
            .map(|(k, (a, r))| format!("{k}:{}(refused {r})", a + r))
            .collect();
        format!(
            "steps={} faults={} operator={} migrations=started:{},completed:{},rollbacks:{} writes_acked={} reads_checked={} stale=refused:{},legit:{},zombie:{} bytes_checked={} violations={}",
            self.steps,
            faults.join(","),
            ops.join(","),
            self.mig_started,
            self.mig_completed,
            self.rollbacks,
            self.writes_acked,
            self.reads_checked,
            self.stale_refused,
            self.stale_acked_legit,
            self.zombie_acks,
            self.bytes_checked,
            self.violations.len()
        )
    }
}

struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn set(&mut self, off: u64, d: &[u8]) {
        let o = off as usize;
        self.data[o..o + d.len()].copy_from_slice(d);
        self.known[o..o + d.len()].fill(true);
    }
    fn forget(&mut self, off: u64, len: u64) {
        self.known[off as usize..(off + len) as usize].fill(false);
    }
}

struct Unflushed {
    off: u64,
    len: u64,
    node: usize,
    epoch: u64,
}

/// A write whose outcome the client never learnt (timed out): the node
/// may still apply it later, so nothing overwrites its range until that
/// node died or has run unfrozen for a while.
struct InDoubt {
    off: u64,
    len: u64,
    node: usize,
    at: Instant,
}

/// A client still attached to (or reattached to) a node that held the
/// volume at `epoch`.
struct Stale {
    node: usize,
    epoch: u64,
    c: NbdClient,
}

struct Mig {
    src: usize,
    dst: usize,
    epoch: u64,
    forced: bool,
}

struct Follower {
    node: usize,
    epoch: u64,
    c: NbdClient,
}

struct Vol {
    name: String,
    size: u64,
    model: Model,
    /// Bumped by every migration the harness starts.
    epoch: u64,
    owner: usize,
    /// Per node: the latest epoch at which it became the volume's owner.
    owner_epoch: Vec<Option<u64>>,
    /// Highest epoch at which the follower had a write acknowledged.
    acked_epoch: u64,
    acked_node: usize,
    mig: Option<Mig>,
    follower: Option<Follower>,
    stale: Vec<Stale>,
    unflushed: Vec<Unflushed>,
    in_doubt: Vec<InDoubt>,
    /// Sources of forced handoffs: (node, epoch of the forced migration,
    /// when the node last restarted).
    zombies: Vec<(usize, u64, Option<Instant>)>,
    /// Steps the VM is still migrating its memory after a migration
    /// started: it only reads at the destination, so the handoff waits and
    /// the old owner's writers are still legitimate.
    quiet: u64,
}

impl Vol {
    fn stale_range(&self) -> (u64, u64) {
        (self.size - STALE, STALE)
    }
    fn doubt_overlaps(&self, off: u64, len: u64) -> bool {
        self.in_doubt
            .iter()
            .any(|d| off < d.off + d.len && d.off < off + len)
    }
}

pub struct Run {
    cfg: Config,
    rng: StdRng,
    pub stats: Stats,
    nodes: Vec<Node>,
    vols: Vec<Vol>,
    step: u64,
    history: Vec<String>,
    dir: Option<tempfile::TempDir>,
    // Last: proxies and clients die before their runtime.
    rt: tokio::runtime::Runtime,
}

fn conn_broken(e: &ClientError) -> bool {
    !matches!(e, ClientError::Server { .. })
}

impl Run {
    pub fn new(cfg: Config) -> Run {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("dlsm-chaos-{}-", cfg.seed))
            .tempdir()
            .unwrap();
        let mut nodes = Vec::new();
        for i in 0..cfg.nodes {
            // A port picked free may be taken by someone else before the
            // node binds it: try again on other ports.
            let mut attempt = 0;
            let n = loop {
                attempt += 1;
                let nbd = format!("127.0.0.1:{}", free_port());
                let api = format!("127.0.0.1:{}", free_port());
                let pnbd = rt.block_on(Proxy::start(nbd.clone()));
                let papi = rt.block_on(Proxy::start(api.clone()));
                let data = dir.path().join(format!("n{i}"));
                std::fs::create_dir_all(&data).unwrap();
                let mut n = Node::new(
                    i,
                    data,
                    dir.path().join(format!("n{i}.log")),
                    pnbd,
                    papi,
                    nbd,
                    api,
                );
                // The last node keeps its data on a small tmpfs that the
                // harness fills now and then (a full disk).
                if i == cfg.nodes - 1 && !cfg.no.iter().any(|s| s == "disk") {
                    let size = cfg.vol_mib * cfg.vols as u64 * 2 + 16;
                    n.tmpfs = Some(Tmpfs::mount(&n.data_dir, &format!("{size}m")));
                }
                match n.start() {
                    Ok(()) => break n,
                    Err(e) if attempt < 4 => eprintln!("node {i} did not start ({e}); new ports"),
                    Err(e) => panic!("node {i} did not start: {e}"),
                }
            };
            nodes.push(n);
        }
        Run {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            stats: Stats::default(),
            nodes,
            vols: Vec::new(),
            step: 0,
            history: Vec::new(),
            dir: Some(dir),
            rt,
        }
    }

    fn allowed(&self, kind: &str) -> bool {
        !self.cfg.no.iter().any(|s| s == kind)
    }

    fn log(&mut self, s: String) {
        let line = format!("[step {}] {s}", self.step);
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
        eprintln!("CHAOS VIOLATION {s}");
        self.stats.violations.push(s);
    }

    fn failed(&self) -> bool {
        !self.stats.violations.is_empty()
    }

    fn fault(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_default() += 1;
    }

    fn operator(&mut self, kind: &'static str, accepted: bool) {
        let e = self.stats.operator.entry(kind).or_default();
        if accepted {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<Result<T, ClientError>, ()> {
        self.rt
            .block_on(async { tokio::time::timeout(OP_TIMEOUT, f).await })
            .map_err(|_| ())
    }

    fn connect(&self, node: usize, vol: &str) -> Option<NbdClient> {
        if self.nodes[node].state != State::Running {
            return None;
        }
        let addr = NbdAddr::Tcp(self.nodes[node].nbd.clone());
        match self.timed(NbdClient::connect(&addr, vol)) {
            Ok(Ok(c)) => Some(c),
            _ => None,
        }
    }

    fn cli(&self, node: usize, args: &[&str]) -> Out {
        cli(&self.nodes[node].api, args, CLI_TIMEOUT)
    }

    // ---------------------------------------------------------------
    // Setup

    pub fn setup(&mut self) {
        for i in 0..self.cfg.vols {
            let name = format!("v{i}");
            let size = self.cfg.vol_mib * MIB;
            let home = i % self.cfg.nodes;
            let o = self.cli(
                home,
                &[
                    "volume",
                    "create",
                    &name,
                    "--size",
                    &format!("{}M", self.cfg.vol_mib),
                ],
            );
            assert!(o.ok, "create {name}: {}", o.why());
            let c = self.connect(home, &name).expect("connect to a new volume");
            let mut data = vec![0u8; size as usize];
            for chunk in 0..size / MIB {
                if self.rng.gen_bool(0.5) {
                    let p = pattern(MIB as usize, self.rng.gen());
                    self.rt.block_on(c.write(chunk * MIB, &p, false)).unwrap();
                    data[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize].copy_from_slice(&p);
                }
            }
            self.rt.block_on(c.flush()).unwrap();
            let mut owner_epoch = vec![None; self.cfg.nodes];
            owner_epoch[home] = Some(0);
            self.vols.push(Vol {
                name,
                size,
                model: Model {
                    data,
                    known: vec![true; size as usize],
                },
                epoch: 0,
                owner: home,
                owner_epoch,
                acked_epoch: 0,
                acked_node: home,
                mig: None,
                follower: Some(Follower {
                    node: home,
                    epoch: 0,
                    c,
                }),
                stale: Vec::new(),
                unflushed: Vec::new(),
                in_doubt: Vec::new(),
                zombies: Vec::new(),
                quiet: 0,
            });
        }
    }

    // ---------------------------------------------------------------
    // The follower: a VM's disk client, always on the volume's owner.

    fn ensure_follower(&mut self, v: usize) -> bool {
        let (owner, epoch) = (self.vols[v].owner, self.vols[v].epoch);
        if let Some(f) = &self.vols[v].follower {
            if f.node == owner && f.epoch == epoch && !f.c.is_dead() {
                return true;
            }
        }
        self.vols[v].follower = None;
        let name = self.vols[v].name.clone();
        match self.connect(owner, &name) {
            Some(c) => {
                self.vols[v].follower = Some(Follower {
                    node: owner,
                    epoch,
                    c,
                });
                true
            }
            None => false,
        }
    }

    fn follower_write(&mut self, v: usize) {
        if !self.ensure_follower(v) {
            return;
        }
        let size = self.vols[v].size - STALE;
        let (off, len) = match self.rng.gen_range(0..4) {
            // Whole aligned 64 KiB pieces (whole regions at every size).
            0 => {
                let n = self.rng.gen_range(1..=4u64);
                let off = self.rng.gen_range(0..(size >> 16) - n) << 16;
                (off, n << 16)
            }
            // Unaligned, spanning regions.
            1 => {
                let len = self.rng.gen_range(1..=200_000u64);
                (self.rng.gen_range(0..size - len), len)
            }
            // Small.
            _ => {
                let len = self.rng.gen_range(1..=8192u64);
                (self.rng.gen_range(0..size - len), len)
            }
        };
        if self.vols[v].doubt_overlaps(off, len) {
            return;
        }
        let data = pattern(len as usize, self.rng.gen());
        let fua = self.rng.gen_bool(0.15);
        let f = self.vols[v].follower.as_ref().unwrap();
        let (node, epoch, c) = (f.node, f.epoch, f.c.clone());
        let r = self.timed(c.write(off, &data, fua));
        let vol = &mut self.vols[v];
        match r {
            Ok(Ok(())) => {
                vol.model.set(off, &data);
                self.stats.writes_acked += 1;
                if !fua {
                    vol.unflushed.push(Unflushed {
                        off,
                        len,
                        node,
                        epoch,
                    });
                }
                // A write acknowledged at this epoch means the handoff
                // happened: every earlier owner fenced and flushed.
                vol.unflushed.retain(|u| u.epoch >= epoch);
                if epoch > vol.acked_epoch {
                    vol.acked_epoch = epoch;
                    vol.acked_node = node;
                }
            }
            Ok(Err(e)) => {
                vol.model.forget(off, len);
                if conn_broken(&e) {
                    vol.follower = None;
                }
            }
            Err(()) => {
                vol.model.forget(off, len);
                vol.in_doubt.push(InDoubt {
                    off,
                    len,
                    node,
                    at: Instant::now(),
                });
                vol.follower = None;
                let name = vol.name.clone();
                self.log(format!("{name}: write at n{node} timed out (in doubt)"));
            }
        }
    }

    fn follower_flush(&mut self, v: usize) {
        if !self.ensure_follower(v) {
            return;
        }
        let f = self.vols[v].follower.as_ref().unwrap();
        let (node, epoch, c) = (f.node, f.epoch, f.c.clone());
        match self.timed(c.flush()) {
            Ok(Ok(())) => self.vols[v]
                .unflushed
                .retain(|u| !(u.node == node && u.epoch == epoch)),
            Ok(Err(e)) if !conn_broken(&e) => {}
            _ => self.vols[v].follower = None,
        }
    }

    fn follower_read(&mut self, v: usize) {
        if !self.ensure_follower(v) {
            return;
        }
        let size = self.vols[v].size;
        let len = self.rng.gen_range(1..=256 << 10u64);
        let off = if self.rng.gen_bool(0.1) {
            // The stale writers' tail.
            self.rng.gen_range(size - STALE..size - 1)
        } else {
            self.rng.gen_range(0..size - 1)
        };
        let len = len.min(size - off);
        let f = self.vols[v].follower.as_ref().unwrap();
        let (node, epoch, c) = (f.node, f.epoch, f.c.clone());
        match self.timed(c.read(off, len as u32)) {
            Ok(Ok(got)) => {
                self.stats.reads_checked += 1;
                let vol = &self.vols[v];
                let m = &vol.model;
                let mut checked = 0;
                for (i, g) in got.iter().enumerate() {
                    let p = off as usize + i;
                    if m.known[p] {
                        checked += 1;
                        if m.data[p] != *g {
                            let msg = format!(
                                "{}: read at n{node} (epoch {epoch}, owner since epoch {}) of [{off}, +{len}): byte {p} is {g:#04x}, the model says {:#04x} (a lost write or a stale read)",
                                vol.name, vol.epoch, m.data[p]
                            );
                            self.violation("wrong-read", msg);
                            return;
                        }
                    }
                }
                self.stats.bytes_checked += checked;
            }
            Ok(Err(e)) if !conn_broken(&e) => {}
            _ => self.vols[v].follower = None,
        }
    }

    fn follower_ops(&mut self, v: usize) {
        let owner = self.vols[v].owner;
        if self.nodes[owner].state != State::Running {
            return; // the VM's host is down or hung
        }
        let quiet = self.vols[v].quiet > 0;
        self.vols[v].quiet = self.vols[v].quiet.saturating_sub(1);
        for _ in 0..self.rng.gen_range(1..=3) {
            if quiet {
                self.follower_read(v);
                continue;
            }
            match self.rng.gen_range(0..10) {
                0..=4 => self.follower_write(v),
                5 => self.follower_flush(v),
                _ => self.follower_read(v),
            }
            if self.failed() {
                return;
            }
        }
    }

    // ---------------------------------------------------------------
    // Stale writers: clients of nodes that held the volume before.

    fn stale_attempt(&mut self, v: usize, si: usize) {
        let (soff, slen) = self.vols[v].stale_range();
        let len = self.rng.gen_range(1..=16384u64);
        let off = soff + self.rng.gen_range(0..slen - len);
        let data = pattern(len as usize, self.rng.gen());
        let s = &self.vols[v].stale[si];
        let (node, epoch, c) = (s.node, s.epoch, s.c.clone());
        let r = self.timed(c.write(off, &data, true));
        let name = self.vols[v].name.clone();
        match r {
            Ok(Ok(())) => {
                let (acked, acked_node) = (self.vols[v].acked_epoch, self.vols[v].acked_node);
                let acked = acked + self.cfg.sabotage_owner as u64;
                if acked <= epoch {
                    // Still the owner: a legitimate, durable (FUA) write.
                    self.stats.stale_acked_legit += 1;
                    self.vols[v].model.set(off, &data);
                    self.log(format!(
                        "{name}: stale writer at n{node} (epoch {epoch}) wrote legitimately"
                    ));
                    return;
                }
                let zombie = self.vols[v]
                    .zombies
                    .iter()
                    .find(|z| z.0 == node)
                    .map(|z| z.2);
                // A source restarted after a forced handoff holds every
                // write until the new owner tells it who owns the volume
                // (DESIGN: "a restarted source holds writes"): no grace.
                self.vols[v].model.forget(off, len);
                let msg = format!(
                    "{name}: n{node}, owner at epoch {epoch}, acknowledged a write after n{acked_node} acknowledged writes at epoch {acked}{}",
                    if zombie.is_some() { " (a source restarted after a forced handoff)" } else { "" }
                );
                self.violation("two-writers", msg);
            }
            Ok(Err(e)) => {
                self.stats.stale_refused += 1;
                if conn_broken(&e) {
                    self.vols[v].stale.remove(si);
                }
            }
            Err(()) => {
                self.vols[v].model.forget(off, len);
                self.vols[v].stale.remove(si);
            }
        }
    }

    fn stale_reconnect(&mut self, v: usize) -> bool {
        let vol = &self.vols[v];
        let cands: Vec<(usize, u64)> = (0..self.cfg.nodes)
            .filter(|&n| n != vol.owner && self.nodes[n].state == State::Running)
            .filter_map(|n| vol.owner_epoch[n].map(|e| (n, e)))
            .collect();
        if cands.is_empty() || vol.stale.len() >= 4 {
            return false;
        }
        let (node, epoch) = cands[self.rng.gen_range(0..cands.len())];
        let name = vol.name.clone();
        if let Some(c) = self.connect(node, &name) {
            self.log(format!(
                "{name}: stale writer attached to n{node} (epoch {epoch})"
            ));
            self.vols[v].stale.push(Stale { node, epoch, c });
            let si = self.vols[v].stale.len() - 1;
            self.stale_attempt(v, si);
        }
        true
    }

    // ---------------------------------------------------------------
    // Faults

    fn on_killed(&mut self, node: usize) {
        for vol in &mut self.vols {
            let mut forget = Vec::new();
            vol.unflushed.retain(|u| {
                if u.node == node {
                    forget.push((u.off, u.len));
                    false
                } else {
                    true
                }
            });
            for (o, l) in forget {
                vol.model.forget(o, l);
            }
            vol.in_doubt.retain(|d| d.node != node);
            if vol.follower.as_ref().is_some_and(|f| f.node == node) {
                vol.follower = None;
            }
            vol.stale.retain(|s| s.node != node);
        }
    }

    fn pick_node(&mut self, f: impl Fn(&Node) -> bool) -> Option<usize> {
        let c: Vec<usize> = self.nodes.iter().filter(|n| f(n)).map(|n| n.idx).collect();
        (!c.is_empty()).then(|| c[self.rng.gen_range(0..c.len())])
    }

    fn restart(&mut self, n: usize) -> bool {
        match self.nodes[n].start() {
            Ok(()) => {}
            Err(e) => {
                // A node on a full disk may not come up; free it and retry.
                if self.nodes[n].free_disk() {
                    self.log(format!("n{n} did not start on a full disk ({e}); freed it"));
                }
                if let Err(e2) = self.nodes[n].start() {
                    self.violation(
                        "restart-failed",
                        format!("n{n} does not start again: {e}; then {e2}"),
                    );
                    return false;
                }
            }
        }
        for vol in &mut self.vols {
            for z in &mut vol.zombies {
                if z.0 == n {
                    z.2 = Some(Instant::now());
                }
            }
        }
        true
    }

    /// One fault or operator action.
    fn event(&mut self) -> bool {
        let n = self.cfg.nodes;
        let dead = self.nodes.iter().filter(|x| x.state == State::Dead).count();
        let frozen = self
            .nodes
            .iter()
            .filter(|x| x.state == State::Frozen)
            .count();
        const KINDS: &[(&str, u32)] = &[
            ("migrate", 22),
            ("pause", 3),
            ("resume", 3),
            ("set-rate", 4),
            ("handoff", 2),
            ("kill", 6),
            ("restart", 8),
            ("freeze", 3),
            ("thaw", 6),
            ("cut", 5),
            ("restore", 7),
            ("slow", 3),
            ("unslow", 3),
            ("disk", 2),
            ("undisk", 3),
            ("rm", 3),
            ("force", 6),
            ("cancel", 3),
            ("kill-source", 2),
            ("second-serve", 1),
            ("stale", 10),
            ("stale-attach", 4),
            ("quiet", 6),
        ];
        let total: u32 = KINDS.iter().map(|k| k.1).sum();
        let mut x = self.rng.gen_range(0..total);
        let kind = KINDS
            .iter()
            .find(|k| {
                if x < k.1 {
                    true
                } else {
                    x -= k.1;
                    false
                }
            })
            .unwrap()
            .0;
        if !self.allowed(kind) {
            return false;
        }
        let v = self.rng.gen_range(0..self.vols.len());
        match kind {
            "migrate" => return self.op_migrate(v),
            "pause" | "resume" | "set-rate" | "handoff" => {
                let Some(m) = &self.vols[v].mig else {
                    return false;
                };
                let dst = m.dst;
                if self.nodes[dst].state != State::Running {
                    return false;
                }
                let name = self.vols[v].name.clone();
                let rate = ["0", "256K", "1M", "4M", "16M"][self.rng.gen_range(0..5)];
                let args: Vec<&str> = match kind {
                    "set-rate" => vec!["migration", "set-rate", &name, rate],
                    k => vec!["migration", k, &name],
                };
                let o = self.cli(dst, &args);
                let k: &'static str = match kind {
                    "pause" => "pause",
                    "resume" => "resume",
                    "set-rate" => "set-rate",
                    _ => "handoff",
                };
                self.operator(k, o.ok);
                self.log(format!(
                    "{name}: {args:?} at n{dst}: {}",
                    if o.ok { "ok".into() } else { o.why() }
                ));
            }
            "kill" => {
                if dead + 1 >= n {
                    return false;
                }
                let Some(k) = self.pick_node(|x| x.state != State::Dead) else {
                    return false;
                };
                self.nodes[k].kill9();
                self.on_killed(k);
                self.fault("kill");
                self.log(format!("kill -9 n{k}"));
            }
            "restart" => {
                let Some(k) = self.pick_node(|x| x.state == State::Dead) else {
                    return false;
                };
                if self.restart(k) {
                    self.fault("restart");
                    self.log(format!("restarted n{k}"));
                }
            }
            "freeze" => {
                if frozen > 0 {
                    return false;
                }
                let Some(k) = self.pick_node(|x| x.state == State::Running) else {
                    return false;
                };
                self.nodes[k].freeze();
                self.fault("freeze");
                self.log(format!("SIGSTOP n{k}"));
            }
            "thaw" => {
                let Some(k) = self.pick_node(|x| x.state == State::Frozen) else {
                    return false;
                };
                self.nodes[k].thaw();
                self.log(format!("SIGCONT n{k}"));
            }
            "cut" => {
                let k = self.rng.gen_range(0..n);
                let mode = if self.rng.gen_bool(0.5) {
                    Mode::Reset
                } else {
                    Mode::Blackhole
                };
                let which = self.rng.gen_range(0..3);
                if which != 1 {
                    self.nodes[k].pnbd.set(mode);
                }
                if which != 0 {
                    self.nodes[k].papi.set(mode);
                }
                self.fault(if mode == Mode::Reset {
                    "cut-reset"
                } else {
                    "cut-blackhole"
                });
                self.log(format!(
                    "cut n{k} {} ({mode:?})",
                    ["nbd", "api", "nbd+api"][which]
                ));
            }
            "restore" => {
                let Some(k) =
                    self.pick_node(|x| x.pnbd.mode() != Mode::Up || x.papi.mode() != Mode::Up)
                else {
                    return false;
                };
                self.nodes[k].pnbd.set(Mode::Up);
                self.nodes[k].papi.set(Mode::Up);
                self.log(format!("restored links of n{k}"));
            }
            "slow" => {
                let k = self.rng.gen_range(0..n);
                let ms = self.rng.gen_range(2..40);
                self.nodes[k].pnbd.set_delay(ms);
                self.fault("slow");
                self.log(format!("slow source n{k}: {ms} ms per chunk"));
            }
            "unslow" => {
                let Some(k) = self.pick_node(|x| x.pnbd.delay() > 0) else {
                    return false;
                };
                self.nodes[k].pnbd.set_delay(0);
                self.log(format!("n{k} fast again"));
            }
            "disk" => {
                let slack = [0, 128 << 10, 2 << 20][self.rng.gen_range(0..3)];
                let k = n - 1;
                if !self.nodes[k].fill_disk(slack) {
                    return false;
                }
                self.fault("disk-full");
                self.log(format!("disk of n{k} full (slack {slack})"));
            }
            "undisk" => {
                if !self.nodes[n - 1].free_disk() {
                    return false;
                }
                self.log(format!("disk of n{} freed", n - 1));
            }
            // The source dies while the VM is still on its way (before the
            // handoff): the case an operator forces the handoff for.
            "kill-source" => {
                let Some(m) = &self.vols[v].mig else {
                    return false;
                };
                let src = m.src;
                if self.vols[v].quiet == 0 || dead + 1 >= n || self.nodes[src].state == State::Dead
                {
                    return false;
                }
                self.nodes[src].kill9();
                self.on_killed(src);
                self.fault("kill");
                let name = self.vols[v].name.clone();
                self.log(format!(
                    "kill -9 n{src} ({name}'s source, before the handoff)"
                ));
            }
            "rm" => return self.op_rm(v),
            "force" => return self.op_force(v),
            "cancel" => return self.op_cancel(v),
            "second-serve" => {
                let Some(k) = self.pick_node(|x| x.state != State::Dead) else {
                    return false;
                };
                match self.nodes[k].second_serve() {
                    Ok(mut child) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        self.operator("second-serve", true);
                        self.violation(
                            "second-serve",
                            format!("a second `dlsm serve` on n{k}'s data directory (n{k} {:?}) started and served", self.nodes[k].state),
                        );
                    }
                    Err(e) => {
                        self.operator("second-serve", false);
                        self.log(format!("second serve on n{k} refused: {e}"));
                    }
                }
            }
            "stale" => {
                if self.vols[v].stale.is_empty() {
                    return false;
                }
                let si = self.rng.gen_range(0..self.vols[v].stale.len());
                self.stale_attempt(v, si);
            }
            "stale-attach" => return self.stale_reconnect(v),
            _ => {}
        }
        true
    }

    fn op_migrate(&mut self, v: usize) -> bool {
        let src = self.vols[v].owner;
        if self.nodes[src].state != State::Running {
            return false;
        }
        let dst = (src + self.rng.gen_range(1..self.cfg.nodes)) % self.cfg.nodes;
        // An operator does not migrate to a node that hangs (its API would
        // not answer the source for minutes).
        if self.nodes[dst].state == State::Frozen || self.nodes[dst].papi.mode() == Mode::Blackhole
        {
            return false;
        }
        let name = self.vols[v].name.clone();
        let to = self.nodes[dst].papi.addr.clone();
        let mut args = vec![
            "migrate".to_string(),
            name.clone(),
            "--to".into(),
            to,
            "--json".into(),
        ];
        let rs = ["16K", "32K", "64K"][self.rng.gen_range(0..3)];
        args.extend(["--region-size".into(), rs.into()]);
        if self.rng.gen_bool(0.7) {
            let rate = ["512K", "2M", "8M", "32M"][self.rng.gen_range(0..4)];
            args.extend(["--rate".into(), rate.into()]);
        }
        if self.rng.gen_bool(0.1) {
            args.push("--keep-source".into());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = cli(&self.nodes[src].api, &a, Duration::from_secs(150));
        self.operator("migrate", o.ok);
        if !o.ok {
            self.log(format!(
                "{name}: migrate n{src} -> n{dst} refused: {}",
                o.why()
            ));
            // A copy kept (--keep-source) or not yet released blocks the
            // way back: once the migration is complete, an operator removes
            // it (dropping the stale clients there first).
            if o.why().contains("already exists")
                && self.vols[v].mig.is_none()
                && self.allowed("cleanup")
                && self.nodes[dst].state == State::Running
                && self.rng.gen_bool(0.7)
            {
                self.vols[v].stale.retain(|s| s.node != dst);
                let o = self.cli(dst, &["volume", "rm", &name]);
                self.operator("rm-leftover", o.ok);
                self.log(format!(
                    "{name}: volume rm of the leftover copy at n{dst}: {}",
                    if o.ok { "ok".into() } else { o.why() }
                ));
                if o.ok {
                    self.vols[v].owner_epoch[dst] = None;
                }
            }
            return true;
        }
        self.migration_started(v, src, dst, &format!("migrate {:?}", &a[5..]));
        true
    }

    /// A migration `src -> dst` of volume `v` was accepted (an operator's
    /// migrate, or the rollback a cancel after handoff starts): a new
    /// epoch, owned by `dst`; the VM moves at once.
    fn migration_started(&mut self, v: usize, src: usize, dst: usize, what: &str) {
        let name = self.vols[v].name.clone();
        let vol = &mut self.vols[v];
        vol.epoch += 1;
        let epoch = vol.epoch;
        vol.owner = dst;
        vol.owner_epoch[dst] = Some(epoch);
        vol.quiet = [0, 0, 1, 2, 4][self.rng.gen_range(0..5)];
        vol.mig = Some(Mig {
            src,
            dst,
            epoch,
            forced: false,
        });
        self.stats.mig_started += 1;
        self.log(format!(
            "{name}: {what} n{src} -> n{dst} accepted (epoch {epoch})"
        ));
        // The VM moves at once: QEMU flushes on the source (usually), the
        // old connection goes away or lingers as a stale writer.
        if let Some(f) = self.vols[v].follower.take() {
            if self.rng.gen_bool(0.6) {
                if let Ok(Ok(())) = self.timed(f.c.flush()) {
                    self.vols[v]
                        .unflushed
                        .retain(|u| !(u.node == f.node && u.epoch == f.epoch));
                }
            }
            if self.rng.gen_bool(0.5) && self.vols[v].stale.len() < 4 {
                self.vols[v].stale.push(Stale {
                    node: f.node,
                    epoch: f.epoch,
                    c: f.c,
                });
            }
        }
    }

    fn op_rm(&mut self, v: usize) -> bool {
        let Some(k) = self.pick_node(|x| x.state == State::Running) else {
            return false;
        };
        let name = self.vols[v].name.clone();
        let owner = self.vols[v].owner;
        if k == owner && !self.ensure_follower(v) {
            // Only with the VM attached: removing an idle volume is allowed.
            return false;
        }
        let migrating = self.vols[v].mig.is_some();
        let o = self.cli(k, &["volume", "rm", &name]);
        self.operator("rm", o.ok);
        if !o.ok {
            self.log(format!("{name}: volume rm at n{k} refused: {}", o.why()));
            return true;
        }
        self.log(format!("{name}: volume rm at n{k} ACCEPTED"));
        if k == owner {
            self.violation(
                "rm-accepted",
                format!("{name}: `volume rm` at its owner n{k} accepted with the client attached"),
            );
        } else if migrating
            && self.vols[v]
                .mig
                .as_ref()
                .is_some_and(|m| m.src == k || m.dst == k)
        {
            // A node outside the migration may hold a copy kept by an
            // earlier one (`--keep-source`): whether a chain still reads
            // from it only that node knows (its outgoing migration), and
            // it refuses if so; were that wrong, the byte model's checks
            // would see the loss.
            let m = self.vols[v].mig.as_ref().unwrap();
            let msg = format!(
                "{name}: `volume rm` at n{k} accepted while the volume migrates n{} -> n{} (not complete): a copy the migration needs",
                m.src, m.dst
            );
            self.violation("rm-accepted", msg);
        }
        // Otherwise: a leftover copy (kept source, unreleased) — fine.
        self.vols[v].owner_epoch[k] = if k == owner {
            self.vols[v].owner_epoch[k]
        } else {
            None
        };
        true
    }

    fn op_force(&mut self, v: usize) -> bool {
        let Some(m) = &self.vols[v].mig else {
            return false;
        };
        let (src, dst, forced) = (m.src, m.dst, m.forced);
        if forced || self.nodes[src].state != State::Dead || self.nodes[dst].state != State::Running
        {
            return false;
        }
        let name = self.vols[v].name.clone();
        // Only while the destination waits for the source (passthrough).
        let st = self.cli(dst, &["migration", "status", &name, "--json"]);
        if st.json().is_none_or(|s| s["phase"] != "passthrough") {
            return false;
        }
        let o = self.cli(dst, &["migration", "handoff", &name, "--force"]);
        self.operator("force-handoff", o.ok);
        if o.ok {
            let vol = &mut self.vols[v];
            let epoch = vol.epoch;
            vol.mig.as_mut().unwrap().forced = true;
            vol.zombies.push((src, epoch, None));
            self.log(format!("{name}: forced handoff at n{dst} (n{src} dead)"));
        } else {
            self.log(format!(
                "{name}: forced handoff at n{dst} refused: {}",
                o.why()
            ));
        }
        true
    }

    /// `migration cancel` on the source of the volume's migration, as an
    /// operator who changed their mind. Before handoff the destination
    /// never took a write: the volume is the source's again (a new epoch),
    /// and the VM goes back to it. After handoff the answer is a rollback:
    /// a migration back to the source, modelled as one.
    fn op_cancel(&mut self, v: usize) -> bool {
        let Some(m) = &self.vols[v].mig else {
            return false;
        };
        let (src, dst, epoch) = (m.src, m.dst, m.epoch);
        if epoch != self.vols[v].epoch || self.nodes[src].state != State::Running {
            return false;
        }
        let name = self.vols[v].name.clone();
        let o = self.cli(src, &["migration", "cancel", &name, "--json"]);
        self.operator("cancel", o.ok);
        if !o.ok {
            self.log(format!("{name}: cancel at n{src} refused: {}", o.why()));
            return true;
        }
        if o.json().is_some_and(|j| j.get("rolled_back").is_some()) {
            // Handed off already: the cancel is a rollback, a migration
            // back to the source over its old copy.
            self.stats.rollbacks += 1;
            // The volume returns to `src` over its old copy: clients left
            // there (fenced so far) reach the rollback and may hand it
            // off, as the VM coming back does; they belong to the owner
            // again, as after a cancel before handoff.
            self.vols[v].stale.retain(|s| s.node != src);
            self.migration_started(v, dst, src, "rollback");
            return true;
        }
        if self.vols[v].acked_epoch >= epoch {
            let msg = format!(
                "{name}: cancel at n{src} accepted after n{dst} acknowledged writes at epoch {}",
                self.vols[v].acked_epoch
            );
            self.violation("cancel-after-handoff", msg);
            return true;
        }
        let vol = &mut self.vols[v];
        vol.epoch += 1;
        let back = vol.epoch;
        vol.owner = src;
        vol.owner_epoch[src] = Some(back);
        vol.owner_epoch[dst] = None;
        vol.mig = None;
        // Clients left at the source belong to its owner again.
        vol.stale.retain(|s| s.node != src);
        vol.follower = None;
        self.log(format!(
            "{name}: migration n{src} -> n{dst} cancelled; the volume is n{src}'s again (epoch {back})"
        ));
        true
    }

    // ---------------------------------------------------------------
    // Checks after every step

    fn poll_migrations(&mut self) {
        for v in 0..self.vols.len() {
            let Some(m) = &self.vols[v].mig else { continue };
            let (dst, epoch) = (m.dst, m.epoch);
            if self.nodes[dst].state != State::Running || epoch != self.vols[v].epoch {
                continue;
            }
            let name = self.vols[v].name.clone();
            let o = self.cli(dst, &["migration", "status", &name, "--json"]);
            let Some(s) = o.json() else { continue };
            if s["phase"] == "complete" {
                self.stats.mig_completed += 1;
                self.vols[v].mig = None;
                self.log(format!("{name}: migration to n{dst} complete"));
            } else if s["phase"] == "failed" {
                self.violation(
                    "migration-failed",
                    format!("{name}: migration to n{dst} failed: {s}"),
                );
            }
        }
    }

    fn volume_lists(&self) -> Vec<Option<Vec<serde_json::Value>>> {
        (0..self.cfg.nodes)
            .map(|n| {
                if self.nodes[n].state != State::Running {
                    return None;
                }
                let o = self.cli(n, &["volume", "list", "--json"]);
                o.json().and_then(|j| j.as_array().cloned())
            })
            .collect()
    }

    /// No node that held a volume before the epoch its follower wrote at
    /// last may still hold it unfenced.
    fn check_ownership(&mut self, strict: bool) {
        let lists = self.volume_lists();
        for v in 0..self.vols.len() {
            let vol = &self.vols[v];
            for (n, list) in lists.iter().enumerate() {
                let Some(list) = list else { continue };
                let Some(info) = list.iter().find(|i| i["name"] == vol.name.as_str()) else {
                    continue;
                };
                if n == vol.owner {
                    continue;
                }
                let Some(e) = vol.owner_epoch[n] else {
                    if strict && info["fenced_to"].is_null() {
                        let msg = format!(
                            "{}: n{n} never owned it but holds an unfenced copy ({}) at the end",
                            vol.name, info["table"]["kind"]
                        );
                        self.violation("stray-copy", msg);
                        return;
                    }
                    continue;
                };
                if e >= vol.acked_epoch || !info["fenced_to"].is_null() {
                    continue;
                }
                let zombie = vol.zombies.iter().find(|z| z.0 == n);
                if !strict && zombie.is_some_and(|z| z.2.is_none_or(|t| t.elapsed() < ZOMBIE_GRACE))
                {
                    continue;
                }
                let msg = format!(
                    "{}: n{n} (owner at epoch {e}) holds an unfenced {} copy although n{} took writes at epoch {}{}",
                    vol.name,
                    info["table"]["kind"],
                    vol.acked_node,
                    vol.acked_epoch,
                    if zombie.is_some() { " (source of a forced handoff)" } else { "" }
                );
                self.violation("unfenced-old-owner", msg);
                return;
            }
        }
    }

    fn check_processes(&mut self) {
        for n in 0..self.cfg.nodes {
            let panics = self.nodes[n].new_panics();
            if let Some(p) = panics.first() {
                self.violation("panic", format!("n{n}: {p}"));
            }
            if let Some(st) = self.nodes[n].exited() {
                self.on_killed(n);
                self.violation("node-exited", format!("n{n} exited by itself ({st})"));
            }
        }
    }

    /// A write in doubt may still be held by its node, e.g. behind a
    /// handoff waiting on a frozen or blackholed source (a node's API
    /// calls give up after 120 s): its range is left alone until its node
    /// died or 130 s have passed.
    fn retire_doubts(&mut self) {
        for vol in &mut self.vols {
            vol.in_doubt
                .retain(|d| d.at.elapsed() < Duration::from_secs(130));
        }
    }

    pub fn step(&mut self, step: u64) {
        let t = Instant::now();
        self.step_inner(step);
        if t.elapsed() > Duration::from_secs(5) {
            self.log(format!("(step took {:.1} s)", t.elapsed().as_secs_f64()));
        }
    }

    fn step_inner(&mut self, step: u64) {
        self.step = step;
        // A few tries to find an applicable event.
        for _ in 0..6 {
            if self.event() {
                break;
            }
        }
        if self.failed() {
            return;
        }
        for v in 0..self.vols.len() {
            self.follower_ops(v);
            if self.failed() {
                return;
            }
        }
        self.poll_migrations();
        self.check_processes();
        self.check_ownership(false);
        self.retire_doubts();
        self.stats.steps += 1;
    }

    // ---------------------------------------------------------------
    // End of the run: faults stop, everything must settle and match.

    pub fn settle_and_check(&mut self) {
        self.step = self.cfg.steps;
        self.log("end: healing every fault".into());
        for n in 0..self.cfg.nodes {
            if self.nodes[n].state == State::Frozen {
                self.nodes[n].thaw();
            }
            self.nodes[n].pnbd.set(Mode::Up);
            self.nodes[n].papi.set(Mode::Up);
            self.nodes[n].pnbd.set_delay(0);
            self.nodes[n].free_disk();
        }
        for n in 0..self.cfg.nodes {
            if self.nodes[n].state == State::Dead && !self.restart(n) {
                return;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        for v in 0..self.vols.len() {
            let name = self.vols[v].name.clone();
            let owner = self.vols[v].owner;
            // The VM writes (a handoff, if none happened yet) and flushes.
            let mut wrote = false;
            while Instant::now() < deadline {
                let before = self.stats.writes_acked;
                self.follower_write(v);
                if self.stats.writes_acked > before {
                    wrote = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !wrote {
                self.violation("no-progress", format!("{name}: no write accepted at its owner n{owner} within 120 s after faults stopped"));
                return;
            }
            self.follower_flush(v);
            let _ = self.cli(owner, &["migration", "resume", &name]);
            let _ = self.cli(owner, &["migration", "set-rate", &name, "0"]);
        }
        // Every migration completes: each owner's table is local.
        for v in 0..self.vols.len() {
            let name = self.vols[v].name.clone();
            let owner = self.vols[v].owner;
            loop {
                let o = self.cli(owner, &["volume", "show", &name, "--json"]);
                let kind = o.json().map(|j| j["table"]["kind"].clone());
                if kind.as_ref().is_some_and(|k| k == "local") {
                    if self.vols[v].mig.take().is_some() {
                        self.stats.mig_completed += 1;
                    }
                    break;
                }
                if Instant::now() > deadline {
                    let st = self.cli(owner, &["migration", "status", &name, "--json"]);
                    let msg = format!(
                        "{name}: not complete at n{owner} 120 s after faults stopped: table {kind:?}, status {} {}",
                        st.stdout.trim(),
                        st.why()
                    );
                    self.violation("never-completes", msg);
                    return;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        // Sources are released (or kept fenced): no other node holds a
        // writable copy. Releases retry with a backoff up to 10 s.
        let release_deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let lists = self.volume_lists();
            let pending = self.vols.iter().any(|vol| {
                lists.iter().enumerate().any(|(n, l)| {
                    n != vol.owner
                        && l.as_ref().is_some_and(|l| {
                            l.iter()
                                .any(|i| i["name"] == vol.name.as_str() && i["fenced_to"].is_null())
                        })
                })
            });
            if !pending || Instant::now() > release_deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.check_ownership(true);
        if self.failed() {
            return;
        }
        // Every stale copy refuses writes; then every byte matches.
        for v in 0..self.vols.len() {
            let name = self.vols[v].name.clone();
            let owner = self.vols[v].owner;
            for n in 0..self.cfg.nodes {
                if n == owner {
                    continue;
                }
                if let Some(c) = self.connect(n, &name) {
                    let e = self.vols[v].owner_epoch[n].unwrap_or(0);
                    self.vols[v].stale.push(Stale {
                        node: n,
                        epoch: e,
                        c,
                    });
                    let si = self.vols[v].stale.len() - 1;
                    self.stale_attempt(v, si);
                    if self.failed() {
                        return;
                    }
                }
            }
            self.vols[v].stale.clear();
            self.vols[v].follower = None;
            let Some(c) = self.connect(owner, &name) else {
                self.violation(
                    "final-read",
                    format!("{name}: cannot attach at its owner n{owner}"),
                );
                return;
            };
            let size = self.vols[v].size;
            for start in (0..size).step_by(MIB as usize) {
                let got = match self.timed(c.read(start, MIB as u32)) {
                    Ok(Ok(g)) => g,
                    r => {
                        let msg = format!(
                            "{name}: final read at n{owner} of [{start}, +1M) failed: {:?}",
                            r.map(|r| r.err())
                        );
                        self.violation("final-read", msg);
                        return;
                    }
                };
                let m = &self.vols[v].model;
                let mut checked = 0;
                for (i, g) in got.iter().enumerate() {
                    let p = start as usize + i;
                    if m.known[p] {
                        checked += 1;
                        if m.data[p] != *g {
                            let msg = format!(
                                "{name}: at the end, byte {p} at n{owner} is {g:#04x}, the model says {:#04x} (lost write)",
                                m.data[p]
                            );
                            self.violation("final-mismatch", msg);
                            return;
                        }
                    }
                }
                self.stats.bytes_checked += checked;
            }
        }
        self.check_processes();
    }

    /// Corrupts one known model byte (to prove the checks fire).
    pub fn sabotage(&mut self) {
        let m = &mut self.vols[0].model;
        if let Some(p) = m.known.iter().position(|k| *k) {
            m.data[p] ^= 0x5a;
        }
    }

    /// Keeps the run's directory (logs, data) and returns its path.
    pub fn keep_dir(&mut self) -> String {
        match self.dir.take() {
            Some(d) => d.keep().display().to_string(),
            None => String::new(),
        }
    }

    pub fn history_tail(&self, n: usize) -> String {
        let s = self.history.len().saturating_sub(n);
        self.history[s..].join("\n")
    }
}
