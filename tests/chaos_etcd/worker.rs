//! The verifying client of one volume: NBD writes of random data at random
//! offsets through the volume's owner, reads checked against a byte model,
//! flushes, and now and then a probe at a node that does not own the
//! volume. Runs as a task beside the nemesis until told to stop. It
//! follows the volume as a VM would: when the nemesis migrates it and
//! points [`Shared::route`] at the destination, the worker drops its
//! connection and goes on there (its first write hands off).
//!
//! The model ([`Model`]) keeps, per byte, the last acknowledged value. A
//! write answered with an error, or never answered, is *unknown*: the byte
//! may hold the old or the new value, so the write is kept as a candidate
//! until a later acknowledged write (or a read, which settles the byte)
//! makes it moot. A write never answered may still land later, while its
//! node process lives: no write overlaps its range until that process is
//! gone or has run unfrozen for [`DOUBT_SETTLE`]. An acknowledged write that
//! no flush (and no FUA) made durable is forgotten when its node is killed
//! (NBD promises nothing more).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dlsm::nbd::client::{ClientError, NbdAddr, NbdClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::pattern;

/// Longest one NBD request (or connect) of the harness may take.
pub const OP_TIMEOUT: Duration = Duration::from_secs(8);
/// See the module comment.
const DOUBT_SETTLE: Duration = Duration::from_secs(10);

/// What a worker knows of a node (the nemesis updates it).
#[derive(Clone)]
pub struct NodeStat {
    /// Bumped each time the process is killed (a new process, a new
    /// incarnation).
    pub inc: u64,
    /// Alive and not frozen.
    pub running: bool,
    /// When it last started or was thawed.
    pub since: Instant,
    pub nbd: String,
}

pub type Nodes = Arc<Mutex<Vec<NodeStat>>>;

/// One acknowledged write: who acknowledged it, and the interval in which
/// the node must have done so.
#[derive(Clone, Debug)]
pub struct Ack {
    pub vol: usize,
    pub node: usize,
    pub sent: Instant,
    pub acked: Instant,
    pub off: u64,
    pub len: u64,
}

#[derive(Default, Clone)]
pub struct VolStats {
    pub acked: u64,
    /// Answered with an errno, by errno.
    pub refused: std::collections::BTreeMap<u32, u64>,
    /// Never answered (timed out) or the connection broke.
    pub lost: u64,
    pub flushes: u64,
    pub reads: u64,
    pub bytes_read_checked: u64,
    pub probes: u64,
    pub last_ack: Option<Instant>,
}

#[derive(Default)]
pub struct Shared {
    pub acks: Vec<Ack>,
    /// Per volume: the node its client writes through (the nemesis moves
    /// it to a migration's destination).
    pub route: Vec<usize>,
    /// Per volume: a node not to probe (a migration's destination while
    /// the nemesis has not pointed the client there: a write there would
    /// hand off).
    pub no_probe: Vec<Option<usize>>,
    /// Writes answered with an error: volume, node, when sent.
    pub refusals: Vec<(usize, usize, Instant)>,
    pub stats: Vec<VolStats>,
    pub violations: Vec<String>,
}

impl Shared {
    pub fn violation(&mut self, kind: &str, msg: String) {
        let s = format!("{kind}: {msg}");
        eprintln!("CHAOS VIOLATION {s}");
        self.violations.push(s);
    }
}

struct Unknown {
    seq: u32,
    off: u64,
    data: Vec<u8>,
}

/// The bytes a volume may hold.
pub struct Model {
    data: Vec<u8>,
    /// False: any value will do (an unflushed write lost with its node).
    known: Vec<bool>,
    /// The sequence number of the write (or read) that set `data`.
    seq_of: Vec<u32>,
    /// Writes that may or may not have happened, later than `seq_of` of the
    /// bytes they may have changed.
    unknown: Vec<Unknown>,
    next: u32,
}

impl Model {
    /// A new volume: zeros.
    pub fn new(size: u64) -> Model {
        Model {
            data: vec![0; size as usize],
            known: vec![true; size as usize],
            seq_of: vec![0; size as usize],
            unknown: Vec::new(),
            next: 1,
        }
    }

    fn bump(&mut self) -> u32 {
        let s = self.next;
        self.next += 1;
        s
    }

    fn ack(&mut self, off: u64, d: &[u8]) -> u32 {
        let s = self.bump();
        let r = off as usize..off as usize + d.len();
        self.data[r.clone()].copy_from_slice(d);
        self.known[r.clone()].fill(true);
        self.seq_of[r].fill(s);
        s
    }

    fn unknown(&mut self, off: u64, d: Vec<u8>) {
        let seq = self.bump();
        self.unknown.push(Unknown { seq, off, data: d });
    }

    fn forget(&mut self, off: u64, len: u64) {
        self.known[off as usize..(off + len) as usize].fill(false);
    }

    /// Whether byte `p` may read as `g`.
    fn possible(&self, p: usize, g: u8) -> bool {
        !self.known[p]
            || self.data[p] == g
            || self.unknown.iter().any(|u| {
                u.seq > self.seq_of[p]
                    && p >= u.off as usize
                    && p < u.off as usize + u.data.len()
                    && u.data[p - u.off as usize] == g
            })
    }

    /// Checks `got`, read at `off`; on a byte that cannot be there, the
    /// description. Else settles every byte read (it is what the volume
    /// holds now: an unknown write that shows has happened, one that does
    /// not show never will) but those `in_doubt` says may still change, and
    /// returns the range of bytes whose value the read decided (they are no
    /// more durable than the write they came from) and the bytes checked.
    pub fn check(
        &mut self,
        off: u64,
        got: &[u8],
        in_doubt: impl Fn(usize) -> bool,
    ) -> Result<(Option<(u64, u64)>, u64), String> {
        let mut checked = 0;
        for (i, g) in got.iter().enumerate() {
            let p = off as usize + i;
            if !self.possible(p, *g) {
                let cands: Vec<String> = self
                    .unknown
                    .iter()
                    .filter(|u| p >= u.off as usize && p < u.off as usize + u.data.len())
                    .map(|u| format!("{:#04x}@seq{}", u.data[p - u.off as usize], u.seq))
                    .collect();
                return Err(format!(
                    "byte {p} reads {g:#04x}; the model says {:#04x} (acknowledged at seq {}; unknown writes there: [{}])",
                    self.data[p],
                    self.seq_of[p],
                    cands.join(", ")
                ));
            }
            if self.known[p] {
                checked += 1;
            }
        }
        let last = self.next - 1;
        let (mut lo, mut hi) = (usize::MAX, 0);
        for (i, g) in got.iter().enumerate() {
            let p = off as usize + i;
            if in_doubt(p) {
                continue;
            }
            if !self.known[p] || self.data[p] != *g {
                lo = lo.min(p);
                hi = hi.max(p + 1);
                self.data[p] = *g;
                self.known[p] = true;
            }
            self.seq_of[p] = last;
        }
        let decided = (lo < hi).then(|| (lo as u64, (hi - lo) as u64));
        Ok((decided, checked))
    }

    /// Drops unknown writes no byte can show any more.
    fn gc(&mut self) {
        let seq_of = &self.seq_of;
        self.unknown.retain(|u| {
            let r = u.off as usize..u.off as usize + u.data.len();
            seq_of[r].iter().any(|s| *s < u.seq)
        });
    }

    /// Flips one acknowledged byte (the checker must then fail).
    pub fn sabotage(&mut self) -> Option<usize> {
        let p = (0..self.data.len()).find(|&p| self.known[p] && self.seq_of[p] > 0)?;
        self.data[p] ^= 0x5a;
        Some(p)
    }
}

struct Unflushed {
    node: usize,
    off: u64,
    len: u64,
    inc: u64,
    seq: u32,
}

struct Doubt {
    node: usize,
    off: u64,
    len: u64,
    inc: u64,
    at: Instant,
}

pub struct Worker {
    pub vol: usize,
    pub name: String,
    pub owner: usize,
    pub size: u64,
    pub model: Model,
    rng: StdRng,
    nodes: Nodes,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    /// The connection, the incarnation of its node it reached.
    client: Option<(NbdClient, u64)>,
    unflushed: Vec<Unflushed>,
    doubts: Vec<Doubt>,
    /// Per node: the incarnation last seen.
    seen_inc: Vec<u64>,
    /// The node the volume was routed to before the current one, until
    /// the first write acknowledged at the current one (the handoff
    /// happened): not probed meanwhile (it is still the owner).
    prev: Option<usize>,
    /// Recently acknowledged ranges (read back now and then).
    recent: Vec<(u64, u64)>,
    ops: u64,
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<Result<T, ClientError>, ()> {
    tokio::time::timeout(OP_TIMEOUT, f).await.map_err(|_| ())
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vol: usize,
        name: String,
        owner: usize,
        size: u64,
        seed: u64,
        nodes: Nodes,
        shared: Arc<Mutex<Shared>>,
        stop: Arc<AtomicBool>,
    ) -> Worker {
        let seen_inc = nodes.lock().unwrap().iter().map(|n| n.inc).collect();
        Worker {
            vol,
            name,
            owner,
            size,
            model: Model::new(size),
            rng: StdRng::seed_from_u64(seed),
            nodes,
            shared,
            stop,
            client: None,
            unflushed: Vec::new(),
            doubts: Vec::new(),
            seen_inc,
            prev: None,
            recent: Vec::new(),
            ops: 0,
        }
    }

    pub async fn run(mut self) -> Worker {
        while !self.stop.load(Ordering::Relaxed) {
            self.one().await;
            let ms = self.rng.gen_range(5..30);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.client = None;
        self
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap()
    }

    fn violation(&self, kind: &str, msg: String) {
        self.stats().violation(
            kind,
            format!("{} (owner n{}): {msg}", self.name, self.owner),
        );
    }

    /// Node `node` was killed since we last looked: what it had not made
    /// durable is forgotten, and what it never answered can no longer land.
    fn on_restart(&mut self, node: usize, inc: u64) {
        let mut forget = Vec::new();
        self.unflushed.retain(|u| {
            if u.node == node && u.inc < inc {
                forget.push((u.off, u.len));
                false
            } else {
                true
            }
        });
        for (o, l) in forget {
            self.model.forget(o, l);
        }
        self.doubts.retain(|d| d.node != node || d.inc >= inc);
        if node == self.owner && self.client.as_ref().is_some_and(|c| c.1 < inc) {
            self.client = None;
        }
        self.seen_inc[node] = inc;
    }

    fn overlaps_doubt(&self, off: u64, len: u64) -> bool {
        self.doubts
            .iter()
            .any(|d| off < d.off + d.len && d.off < off + len)
    }

    async fn one(&mut self) {
        let route = self.stats().route[self.vol];
        if route != self.owner {
            // Migrated: follow it (the first write there hands off).
            self.prev = Some(self.owner);
            self.owner = route;
            self.client = None;
        }
        let all = self.nodes.lock().unwrap().clone();
        for (n, s) in all.iter().enumerate() {
            if s.inc != self.seen_inc[n] {
                self.on_restart(n, s.inc);
            }
        }
        self.doubts.retain(|d| {
            let s = &all[d.node];
            !(s.running && d.at.max(s.since).elapsed() >= DOUBT_SETTLE)
        });
        let st = all[self.owner].clone();
        self.ops += 1;
        if self.ops.is_multiple_of(97) {
            self.model.gc();
        }
        let pick = self.rng.gen_range(0..100);
        if pick >= 97 {
            return self.probe().await;
        }
        if self.client.is_none() {
            if !st.running {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            let addr = NbdAddr::Tcp(st.nbd.clone());
            match timed(NbdClient::connect(&addr, &self.name)).await {
                Ok(Ok(c)) => self.client = Some((c, st.inc)),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
            }
        }
        match pick {
            0..=64 => self.write().await,
            65..=79 => {
                let len = self.rng.gen_range(1..=256u64 << 10);
                let off = self.rng.gen_range(0..self.size - len);
                self.read(off, len).await
            }
            80..=91 => {
                if self.recent.is_empty() {
                    return;
                }
                let (off, len) = self.recent[self.rng.gen_range(0..self.recent.len())];
                self.read(off, len).await
            }
            _ => self.flush().await,
        }
    }

    async fn write(&mut self) {
        let (c, inc) = self.client.clone().unwrap();
        let mut range = None;
        for _ in 0..5 {
            let (off, len) = match self.rng.gen_range(0..3) {
                0 => {
                    let n = self.rng.gen_range(1..=2u64);
                    (self.rng.gen_range(0..(self.size >> 16) - n) << 16, n << 16)
                }
                1 => {
                    let len = self.rng.gen_range(1..=100_000u64);
                    (self.rng.gen_range(0..self.size - len), len)
                }
                _ => {
                    let len = self.rng.gen_range(1..=8192u64);
                    (self.rng.gen_range(0..self.size - len), len)
                }
            };
            if !self.overlaps_doubt(off, len) {
                range = Some((off, len));
                break;
            }
        }
        let Some((off, len)) = range else { return };
        let data = pattern(len as usize, self.rng.gen());
        let fua = self.rng.gen_bool(0.25);
        let sent = Instant::now();
        let r = timed(c.write(off, &data, fua)).await;
        let acked = Instant::now();
        match r {
            Ok(Ok(())) => {
                let seq = self.model.ack(off, &data);
                if !fua {
                    self.unflushed.push(Unflushed {
                        node: self.owner,
                        off,
                        len,
                        inc,
                        seq,
                    });
                }
                self.prev = None;
                self.recent.push((off, len));
                if self.recent.len() > 16 {
                    self.recent.remove(0);
                }
                let mut sh = self.stats();
                sh.acks.push(Ack {
                    vol: self.vol,
                    node: self.owner,
                    sent,
                    acked,
                    off,
                    len,
                });
                let s = &mut sh.stats[self.vol];
                s.acked += 1;
                s.last_ack = Some(acked);
            }
            Ok(Err(ClientError::Server { errno, .. })) => {
                self.model.unknown(off, data);
                let mut sh = self.stats();
                sh.refusals.push((self.vol, self.owner, sent));
                *sh.stats[self.vol].refused.entry(errno).or_default() += 1;
            }
            Ok(Err(_)) | Err(()) => {
                // Never answered: it may land later, while this process lives.
                self.model.unknown(off, data);
                self.doubts.push(Doubt {
                    node: self.owner,
                    off,
                    len,
                    inc,
                    at: Instant::now(),
                });
                self.client = None;
                self.stats().stats[self.vol].lost += 1;
            }
        }
    }

    async fn read(&mut self, off: u64, len: u64) {
        let (c, inc) = self.client.clone().unwrap();
        match timed(c.read(off, len as u32)).await {
            Ok(Ok(got)) => {
                let doubts = &self.doubts;
                let in_doubt = |p: usize| {
                    doubts
                        .iter()
                        .any(|d| p as u64 >= d.off && (p as u64) < d.off + d.len)
                };
                match self.model.check(off, &got, in_doubt) {
                    Ok((decided, checked)) => {
                        if let Some((o, l)) = decided {
                            let seq = self.model.next - 1;
                            self.unflushed.push(Unflushed {
                                node: self.owner,
                                off: o,
                                len: l,
                                inc,
                                seq,
                            });
                        }
                        let mut sh = self.stats();
                        let s = &mut sh.stats[self.vol];
                        s.reads += 1;
                        s.bytes_read_checked += checked;
                    }
                    Err(e) => self.violation(
                        "stale-or-lost",
                        format!("read [{off}, +{len}) at n{}: {e}", self.owner),
                    ),
                }
            }
            Ok(Err(ClientError::Server { .. })) => {}
            _ => self.client = None,
        }
    }

    async fn flush(&mut self) {
        let (c, inc) = self.client.clone().unwrap();
        let before = self.model.next;
        if let Ok(Ok(())) = timed(c.flush()).await {
            let node = self.owner;
            self.unflushed
                .retain(|u| !(u.node == node && u.inc == inc && u.seq < before));
            self.stats().stats[self.vol].flushes += 1;
        }
    }

    /// Attaches to the volume at a node that does not own it: there is no
    /// copy there, so the attach must fail; if it does not, a write there
    /// (of the bytes the model has) must not be acknowledged.
    async fn probe(&mut self) {
        let n = self.nodes.lock().unwrap().len();
        let other = (self.owner + self.rng.gen_range(1..n)) % n;
        let st = self.nodes.lock().unwrap()[other].clone();
        if !st.running || self.prev == Some(other) || self.stats().no_probe[self.vol] == Some(other)
        {
            return;
        }
        self.stats().stats[self.vol].probes += 1;
        let addr = NbdAddr::Tcp(st.nbd.clone());
        let Ok(Ok(c)) = timed(NbdClient::connect(&addr, &self.name)).await else {
            return;
        };
        let data = self.model.data[..512].to_vec();
        let sent = Instant::now();
        if let Ok(Ok(())) = timed(c.write(0, &data, true)).await {
            let acked = Instant::now();
            self.stats().acks.push(Ack {
                vol: self.vol,
                node: other,
                sent,
                acked,
                off: 0,
                len: 512,
            });
        }
    }
    /// Reads the whole volume at `addr` (its owner) and checks every byte;
    /// the number of bytes whose value the model knew.
    pub async fn final_check(&mut self, addr: &str) -> Result<u64, String> {
        let c = timed(NbdClient::connect(&NbdAddr::Tcp(addr.into()), &self.name))
            .await
            .map_err(|_| "attach timed out".to_string())?
            .map_err(|e| format!("attach: {e}"))?;
        let mib = 1u64 << 20;
        let mut checked = 0;
        for start in (0..self.size).step_by(mib as usize) {
            let len = mib.min(self.size - start);
            let got = timed(c.read(start, len as u32))
                .await
                .map_err(|_| format!("read of [{start}, +{len}) timed out"))?
                .map_err(|e| format!("read of [{start}, +{len}): {e}"))?;
            let doubts = &self.doubts;
            let in_doubt = |p: usize| {
                doubts
                    .iter()
                    .any(|d| p as u64 >= d.off && (p as u64) < d.off + d.len)
            };
            checked += self.model.check(start, &got, in_doubt)?.1;
        }
        Ok(checked)
    }
}
