//! `clone`: the destination side of a migration.
//!
//! ```text
//!   CloneTarget
//!     origin: RemoteTarget  ──NBD──►  source node's export
//!     local:  LocalTarget   (sparse data file, same size)
//!     map:    RegionMap     (present regions, durable)
//!     locks:  RegionLocks   (fetch vs client write, per region)
//! ```
//!
//! **Before handoff** (passthrough) reads go to the origin and nothing is
//! kept: the source may still change those blocks (invariant 2). The first
//! write triggers the handoff: [`MigrationHooks::fence_source`] makes the
//! source refuse writes and flush; then the source's zero ranges are marked
//! present (they never cross the network), the map is committed and the
//! handoff persisted ([`MigrationHooks::persist_handoff`]) before the write
//! proceeds. A write that cannot hand off (source unreachable) fails: this
//! node never accepts a write while another might (invariant 1).
//!
//! **After handoff** (hydrating): a read of absent regions fetches them on
//! demand under their region lock; a write covering whole regions needs no
//! fetch; a partial write to an absent region fetches it first; the
//! background hydrator copies the rest in large batches, several at once,
//! paced by the rate limit, skipping ranges a client holds. Every fetch
//! checks, under the lock, that the region is still absent, so fetched data
//! never lands over a client's write (invariant 3). Regions are marked
//! present only after their data is written locally; FLUSH and FUA commit
//! the map after syncing the data (invariant 4).
//!
//! **Cancellation**: dropping an operation's future at an await releases its
//! region lock; a region is marked present only after its data is fully
//! written, so a dropped fetch leaves the region absent, to be fetched again.
//!
//! The hydrator is a task owned by the target (spawned by
//! [`CloneTarget::start`]); it stops when the volume completes or
//! [`CloneTarget::stop`] is called, leaving on disk at most uncommitted
//! regions, which are fetched again later.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::region_map::RegionMap;
use super::{MigrationStatus, Phase, RateLimiter, RegionLocks};
use crate::nbd::proto::alloc_flags;
use crate::target::{
    check_range, BlockError, BlockResult, BlockTarget, Capabilities, Extent, LocalTarget, Origin,
    ZeroFlags,
};

/// What the clone needs from the node: talking to the source, and
/// persisting its own table. Implemented in `node::migration`.
#[async_trait]
pub trait MigrationHooks: Send + Sync + 'static {
    /// Asks the source to refuse writes from now on and make the ones it
    /// accepted durable. Returns once it has.
    async fn fence_source(&self) -> Result<(), FenceError>;
    /// Records durably that this node now owns the volume, and whether the
    /// source is known to be fenced (false after a forced handoff, until
    /// the source has been reached and fenced).
    fn persist_handoff(&self, source_fenced: bool) -> Result<(), String>;
}

/// Why the source was not fenced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FenceError {
    /// The source answered and refused: this migration is not (or no
    /// longer) its outgoing one. It is alive and owns its copy, so even a
    /// forced handoff must not go ahead.
    #[error("{0}")]
    Refused(String),
    /// The source could not be reached within the timeout.
    #[error("{0}")]
    Unreachable(String),
}

/// Tunables of a clone.
#[derive(Debug, Clone)]
pub struct CloneConfig {
    /// Largest background fetch, bytes.
    pub batch_bytes: u64,
    /// Background fetches in flight.
    pub parallel: usize,
    /// Background copy limit, bytes/s (0: none).
    pub rate: u64,
    /// How often the hydrator commits the map.
    pub commit_interval: Duration,
    /// Regions prefetched after a sequential on-demand read.
    pub prefetch_regions: u64,
}

impl Default for CloneConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 4 << 20,
            parallel: 8,
            rate: 0,
            commit_interval: Duration::from_secs(1),
            prefetch_regions: 16,
        }
    }
}

/// Background-copied bytes allowed in writeback before the oldest are
/// waited for and dropped from the page cache.
const WRITE_BEHIND: u64 = 32 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum FetchKind {
    OnDemand,
    Background,
}

#[derive(Default)]
struct Stats {
    on_demand: AtomicU64,
    background: AtomicU64,
    skipped: AtomicU64,
    last_error: Mutex<Option<String>>,
    handoff_at: Mutex<Option<Instant>>,
    completed_at: Mutex<Option<Instant>>,
    /// (time, background bytes) samples for the measured rate.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// The migration target. See the module docs.
pub struct CloneTarget {
    name: String,
    peer: String,
    /// The migration's identity (see `node::store::Outgoing::id`).
    migration: String,
    size: u64,
    region_size: u64,
    origin: Arc<dyn Origin>,
    local: Arc<LocalTarget>,
    map: Mutex<RegionMap>,
    map_file: Mutex<File>,
    commit_lock: tokio::sync::Mutex<()>,
    write_turn: tokio::sync::Mutex<()>,
    /// Background writes whose writeback was started: ranges, total bytes.
    behind: Mutex<(VecDeque<(u64, u64)>, u64)>,
    locks: RegionLocks,
    handed_off: AtomicBool,
    handoff_lock: tokio::sync::Mutex<()>,
    /// Handed off by force, and the source not fenced since: it must be
    /// before anything more is read from it ([`Self::ensure_source_fenced`]).
    source_unfenced: AtomicBool,
    /// The last failed attempt to fence the source after a forced handoff.
    fence_failed: Mutex<Option<(Instant, String)>>,
    hooks: Arc<dyn MigrationHooks>,
    cfg: CloneConfig,
    limiter: RateLimiter,
    paused: AtomicBool,
    /// The last background fetch failed with ENOSPC (see `background_failed`).
    no_space: AtomicBool,
    stopped: AtomicBool,
    failed: Mutex<Option<String>>,
    /// A sync of the local data file failed: see [`CloneTarget::commit`].
    data_lost: AtomicBool,
    wake: Notify,
    complete: AtomicBool,
    completed: Notify,
    hints: Mutex<VecDeque<(u64, u64)>>,
    last_on_demand_end: AtomicU64,
    /// When a client last waited on a fetch (ms since `started`; 0: never).
    last_on_demand_ms: AtomicU64,
    started: Instant,
    stats: Stats,
}

impl CloneTarget {
    /// Builds a clone over an existing data file and region map.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        peer: &str,
        migration: &str,
        origin: Arc<dyn Origin>,
        local: Arc<LocalTarget>,
        map: RegionMap,
        handed_off: bool,
        hooks: Arc<dyn MigrationHooks>,
        cfg: CloneConfig,
    ) -> std::io::Result<Arc<Self>> {
        let map_file = map.file().try_clone()?;
        let complete = handed_off && map.is_complete();
        Ok(Arc::new(Self {
            name: name.to_owned(),
            peer: peer.to_owned(),
            migration: migration.to_owned(),
            size: local.size(),
            region_size: map.region_size(),
            origin,
            local,
            map_file: Mutex::new(map_file),
            map: Mutex::new(map),
            commit_lock: Default::default(),
            write_turn: Default::default(),
            behind: Default::default(),
            locks: RegionLocks::default(),
            handed_off: AtomicBool::new(handed_off),
            handoff_lock: Default::default(),
            source_unfenced: AtomicBool::new(false),
            fence_failed: Mutex::new(None),
            hooks,
            limiter: RateLimiter::new(cfg.rate),
            cfg,
            paused: AtomicBool::new(false),
            no_space: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            failed: Mutex::new(None),
            data_lost: AtomicBool::new(false),
            wake: Notify::new(),
            complete: AtomicBool::new(complete),
            completed: Notify::new(),
            hints: Mutex::new(VecDeque::new()),
            last_on_demand_end: AtomicU64::new(u64::MAX),
            last_on_demand_ms: AtomicU64::new(0),
            started: Instant::now(),
            stats: Stats::default(),
        }))
    }

    /// Spawns the hydrator. It waits for handoff, copies, and returns when
    /// every region is present (or on [`CloneTarget::stop`]).
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.hydrate().await })
    }

    /// The migration's identity.
    pub fn migration_id(&self) -> &str {
        &self.migration
    }

    pub fn is_handed_off(&self) -> bool {
        self.handed_off.load(Ordering::SeqCst)
    }

    /// Records (from the table, at open) that the handoff was forced and the
    /// source has not been fenced since.
    pub fn mark_source_unfenced(&self) {
        self.source_unfenced.store(true, Ordering::SeqCst);
    }

    /// After a forced handoff the source was never fenced. If it comes back,
    /// it must refuse writes before anything more is read from it, or a
    /// client still attached there could write what this node never sees
    /// (two writers). One attempt at a time; callers that waited behind a
    /// failed attempt get its error instead of starting another, so no
    /// request waits longer than one `--source-timeout`.
    ///
    /// Returns whether the source was unfenced when called: a caller that
    /// holds regions locked then checks them for zeros itself (the scan
    /// made at fencing time leaves locked regions alone).
    async fn ensure_source_fenced(&self) -> BlockResult<bool> {
        if !self.source_unfenced.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let asked = Instant::now();
        let _h = self.handoff_lock.lock().await;
        if !self.source_unfenced.load(Ordering::SeqCst) {
            return Ok(true);
        }
        if let Some((at, why)) = self.fence_failed.lock().unwrap().clone() {
            if at >= asked {
                return Err(BlockError::Unavailable(why));
            }
        }
        if let Err(e) = self.hooks.fence_source().await {
            if matches!(e, FenceError::Refused(_)) {
                // Alive, and it says this is not its migration: nothing
                // more may ever be read from it for this clone.
                warn!(volume = %self.name, "the source of the forced handoff refuses this migration: {e}");
            }
            let why = format!(
                "{}: the source of a forced handoff is not fenced yet: {e}",
                self.name
            );
            *self.fence_failed.lock().unwrap() = Some((Instant::now(), why.clone()));
            return Err(BlockError::Unavailable(why));
        }
        self.hooks
            .persist_handoff(true)
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        self.source_unfenced.store(false, Ordering::SeqCst);
        info!(volume = %self.name, "source reached and fenced after the forced handoff");
        // Its zeros need not cross the network now (a crash before the
        // next commit only means they are fetched after all).
        if let Err(e) = self.mark_source_zeroes().await {
            warn!(volume = %self.name, "zero scan after the forced handoff failed; zeros are copied: {e}");
        }
        self.wake.notify_waiters();
        Ok(true)
    }
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }
    /// Resolves once every region is present and committed.
    pub async fn wait_complete(&self) {
        loop {
            let n = self.completed.notified();
            if self.is_complete() {
                return;
            }
            n.await;
        }
    }
    /// The local data target (what the volume becomes on completion).
    pub fn local(&self) -> Arc<LocalTarget> {
        self.local.clone()
    }
    /// The origin link (dropped on completion).
    pub fn origin(&self) -> Arc<dyn Origin> {
        self.origin.clone()
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }
    pub fn resume(&self) {
        // Turns booked before the pause were given up: start afresh.
        self.limiter.set_rate(self.limiter.rate());
        self.paused.store(false, Ordering::SeqCst);
        self.wake.notify_waiters();
    }
    pub fn set_rate(&self, rate: u64) {
        self.limiter.set_rate(rate);
    }
    /// Stops the hydrator (volume released or removed).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }
    /// Marks the migration failed for good because the local copy cannot
    /// be trusted (a failed data sync): the copier stops and every later
    /// flush and commit fails.
    fn fail(&self, why: String) {
        self.data_lost.store(true, Ordering::SeqCst);
        *self.failed.lock().unwrap() = Some(why);
        self.stop();
    }

    fn region_of(&self, offset: u64) -> u64 {
        offset / self.region_size
    }

    /// Byte range of region `r` (the last one may be short).
    fn region_span(&self, r: u64) -> (u64, u64) {
        let start = r * self.region_size;
        (start, (start + self.region_size).min(self.size))
    }

    /// Records that a client is waiting on a fetch; the copier yields the
    /// link for a while (see [`CloneTarget::hydrate`]).
    fn note_on_demand(&self) {
        self.last_on_demand_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether a client fetched on demand within the last `ms` milliseconds.
    fn on_demand_recently(&self, ms: u64) -> bool {
        let last = self.last_on_demand_ms.load(Ordering::Relaxed);
        last != 0 && (self.started.elapsed().as_millis() as u64).saturating_sub(last) < ms
    }

    fn note_error(&self, e: &dyn std::fmt::Display) {
        *self.stats.last_error.lock().unwrap() = Some(e.to_string());
    }

    /// A background fetch failed: records why and says how long the copier
    /// waits before the next attempt. A full destination disk stalls the
    /// copy (probing once a second) instead of failing the migration: the
    /// regions stay absent, so reads keep going to the source and nothing
    /// is lost, and the copy resumes by itself once space is freed.
    fn background_failed(&self, e: &BlockError, backoff: &mut Duration) -> Duration {
        if matches!(e, BlockError::NoSpace) {
            let was = self.no_space.swap(true, Ordering::SeqCst);
            if !was {
                warn!(volume = %self.name, "destination disk full: background copy stalled until space is freed");
            }
            self.note_error(&"destination disk full (ENOSPC)");
            return Duration::from_secs(1);
        }
        warn!(volume = %self.name, "background fetch failed: {e}");
        self.note_error(e);
        let wait = *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        wait
    }

    /// A background fetch succeeded: clears a disk-full stall.
    fn background_succeeded(&self, backoff: &mut Duration) {
        *backoff = Duration::from_millis(100);
        if self.no_space.swap(false, Ordering::SeqCst) {
            info!(volume = %self.name, "destination has space again: background copy resumed");
        }
    }

    /// Fetches regions `first..first+count`, which the caller holds locked,
    /// skipping any already present. Data is written (or, if all zero,
    /// punched) locally before the regions are marked present.
    async fn fetch_locked(&self, first: u64, count: u64, kind: FetchKind) -> BlockResult<()> {
        if self.ensure_source_fenced().await? {
            self.scan_source_zeroes(first, first + count, true).await?;
        }
        let mut r = first;
        let end = first + count;
        while r < end {
            // Find the next run of absent regions, bounded by the batch size.
            let (run_start, run_len) = {
                let map = self.map.lock().unwrap();
                while r < end && map.is_present(r) {
                    r += 1;
                }
                let start = r;
                let max = (self.cfg.batch_bytes / self.region_size).max(1);
                while r < end && !map.is_present(r) && r - start < max {
                    r += 1;
                }
                (start, r - start)
            };
            if run_len == 0 {
                break;
            }
            let (off, _) = self.region_span(run_start);
            let (_, stop) = self.region_span(run_start + run_len - 1);
            let buf = if stop - off <= crate::nbd::server::MAX_PAYLOAD as u64 {
                let bulk = kind == FetchKind::Background;
                self.origin.read_vec(off, (stop - off) as u32, bulk).await?
            } else {
                let mut b = vec![0u8; (stop - off) as usize];
                self.origin.read_into(off, &mut b).await?;
                b
            };
            // Write runs of data regions in one call each; punch runs of
            // all-zero regions. The local range of an absent region is
            // normally a hole already; punching also clears data whose
            // present bit a crash lost before any flush.
            let rs = self.region_size as usize;
            let zero: Vec<bool> = buf.chunks(rs).map(|c| c.iter().all(|b| *b == 0)).collect();
            let mut i = 0;
            while i < zero.len() {
                let mut j = i + 1;
                while j < zero.len() && zero[j] == zero[i] {
                    j += 1;
                }
                let (a, b) = (i * rs, (j * rs).min(buf.len()));
                if zero[i] {
                    self.local
                        .trim(off + a as u64, (b - a) as u64, false)
                        .await?;
                } else {
                    // Background copies take turns at the file: concurrent
                    // buffered writes to one inode only spin on its lock.
                    let _turn = self.write_turn.lock().await;
                    self.local.write(off + a as u64, &buf[a..b], false).await?;
                    if kind == FetchKind::Background {
                        self.write_behind(off + a as u64, (b - a) as u64).await?;
                    }
                }
                i = j;
            }
            crate::bufpool::give(buf);
            {
                let mut map = self.map.lock().unwrap();
                for reg in run_start..run_start + run_len {
                    map.mark_present(reg);
                }
            }
            let bytes = stop - off;
            match kind {
                FetchKind::OnDemand => self.stats.on_demand.fetch_add(bytes, Ordering::Relaxed),
                FetchKind::Background => self.stats.background.fetch_add(bytes, Ordering::Relaxed),
            };
        }
        Ok(())
    }

    /// Write-behind for background copies: start writeback of what was just
    /// written, and once more than [`WRITE_BEHIND`] bytes are in flight,
    /// wait for the oldest and drop it from the page cache (as nbdcopy
    /// does). Reads of those regions later come from disk.
    async fn write_behind(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.local.start_writeback(offset, len)?;
        let done = {
            let mut q = self.behind.lock().unwrap();
            q.0.push_back((offset, len));
            q.1 += len;
            let mut done = Vec::new();
            while q.1 > WRITE_BEHIND {
                let (o, l) = q.0.pop_front().expect("non-empty");
                q.1 -= l;
                done.push((o, l));
            }
            done
        };
        if done.is_empty() {
            return Ok(());
        }
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || {
            for (o, l) in done {
                local.finish_writeback_and_drop(o, l)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| BlockError::Io(std::io::Error::other(e)))?
    }

    /// Reads without making anything present (the destination's disk is
    /// full): present regions from the local file, absent ones straight
    /// from the origin, under the regions' locks so that none changes
    /// state mid-read.
    async fn read_through(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.ensure_source_fenced().await?;
        let end = offset + buf.len() as u64;
        let (first, last) = (self.region_of(offset), self.region_of(end - 1));
        let _g = self.locks.lock(first, last).await;
        for r in first..=last {
            let (rs, re) = self.region_span(r);
            let (a, b) = (rs.max(offset), re.min(end));
            let part = &mut buf[(a - offset) as usize..(b - offset) as usize];
            if self.map.lock().unwrap().is_present(r) {
                self.local.read(a, part).await?;
            } else {
                self.origin.read_into(a, part).await?;
            }
        }
        Ok(())
    }

    /// Makes regions `first..=last` present, fetching what is absent.
    async fn ensure_present(&self, first: u64, last: u64, kind: FetchKind) -> BlockResult<()> {
        if self.map.lock().unwrap().all_present(first, last) {
            return Ok(());
        }
        if kind == FetchKind::OnDemand {
            self.note_on_demand();
        }
        let _g = self.locks.lock(first, last).await;
        self.fetch_locked(first, last - first + 1, kind).await
    }

    /// Commits the region map: snapshot, sync data, write changed pages,
    /// sync map (see `region_map`). Serialised by `commit_lock`.
    ///
    /// A commit that does not finish (any error, or its future dropped at
    /// an await, e.g. by an API caller that went away) gives its snapshot's
    /// pages back to the dirty set, so the next commit writes them.
    /// A failed sync of the *data* file is fatal for the clone: the kernel
    /// may have dropped the unwritten pages and a later sync would report
    /// success over the hole (PostgreSQL's fsync lesson), so the migration
    /// is marked failed and every later flush fails too.
    pub async fn commit(&self) -> BlockResult<usize> {
        let _c = self.commit_lock.lock().await;
        self.check_data_intact()?;
        let batch = self.map.lock().unwrap().snapshot();
        let mut pending = PendingCommit {
            map: &self.map,
            pages: batch.page_numbers(),
        };
        if let Err(e) = self.local.flush().await {
            let why = format!(
                "{}: syncing the local data file failed ({e}); data written since the last \
                 sync may be lost, so this copy can no longer be trusted",
                self.name
            );
            tracing::error!(volume = %self.name, "{why}");
            self.fail(why);
            return Err(e);
        }
        let pages = batch.pages();
        if pages == 0 {
            return Ok(0);
        }
        let file = self
            .map_file
            .lock()
            .unwrap()
            .try_clone()
            .map_err(BlockError::from_io)?;
        tokio::task::spawn_blocking(move || batch.write(&file))
            .await
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?
            .map_err(BlockError::from_io)?;
        pending.pages.clear();
        Ok(pages)
    }

    #[cfg(test)]
    fn map_file_for_test(&self) -> std::sync::MutexGuard<'_, File> {
        self.map_file.lock().unwrap()
    }

    /// Fails if a sync of the data file ever failed (see [`Self::commit`]).
    fn check_data_intact(&self) -> BlockResult<()> {
        match &*self.failed.lock().unwrap() {
            Some(why) if self.data_lost.load(Ordering::SeqCst) => {
                Err(BlockError::Io(std::io::Error::other(why.clone())))
            }
            _ => Ok(()),
        }
    }

    /// Makes sure this clone is never handed off (its migration was
    /// cancelled at the source): false if it already was.
    pub async fn cancel_before_handoff(&self) -> bool {
        let _h = self.handoff_lock.lock().await;
        if self.is_handed_off() {
            return false;
        }
        *self.failed.lock().unwrap() = Some("migration cancelled at the source".into());
        self.stop();
        true
    }

    /// The handoff (see module docs). Idempotent; `force` skips fencing the
    /// source (an operator's decision that the source is dead).
    pub async fn handoff(&self, force: bool) -> BlockResult<()> {
        if self.is_handed_off() {
            return Ok(());
        }
        let _h = self.handoff_lock.lock().await;
        if self.is_handed_off() {
            return Ok(());
        }
        if let Some(why) = self.failed.lock().unwrap().clone() {
            return Err(BlockError::Unavailable(why));
        }
        // Even when forced, the source is asked first: `force` only means
        // "go ahead if it cannot be reached". A source that answers and
        // refuses is alive and has disowned this migration (cancelled, or
        // a clone left by a lost prepare): taking the volume then would
        // make two writers.
        let force = match self.hooks.fence_source().await {
            Ok(()) => false,
            Err(FenceError::Unreachable(e)) if force => {
                warn!(volume = %self.name, "forced handoff: the source cannot be reached ({e}); it will be fenced before anything more is read from it");
                self.source_unfenced.store(true, Ordering::SeqCst);
                true
            }
            Err(e) => {
                self.note_error(&e);
                return Err(BlockError::Unavailable(format!(
                    "cannot hand off {}: {e}",
                    self.name
                )));
            }
        };
        if self.stopped.load(Ordering::SeqCst) {
            return Err(BlockError::Unavailable(format!(
                "{}: the clone was stopped (removed or cancelled)",
                self.name
            )));
        }
        if !force {
            // Only a fenced source's block status is final. After a forced
            // handoff the scan waits until the source has been reached and
            // fenced (`ensure_source_fenced`).
            self.mark_source_zeroes().await?;
        }
        self.commit().await?;
        self.hooks
            .persist_handoff(!force)
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        self.handed_off.store(true, Ordering::SeqCst);
        *self.stats.handoff_at.lock().unwrap() = Some(Instant::now());
        info!(volume = %self.name, skipped = self.stats.skipped.load(Ordering::Relaxed), "handoff complete: hydrating");
        self.wake.notify_waiters();
        Ok(())
    }

    /// Marks present every region the (fenced) source reports as reading
    /// zero: those bytes never cross the network.
    async fn mark_source_zeroes(&self) -> BlockResult<()> {
        self.scan_source_zeroes(0, self.regions(), false).await
    }

    fn regions(&self) -> u64 {
        self.size.div_ceil(self.region_size)
    }

    /// Marks present the regions of `first..end` that the (fenced) source
    /// reads as zero. `locked`: the caller holds those regions' lock.
    async fn scan_source_zeroes(&self, first: u64, end: u64, locked: bool) -> BlockResult<()> {
        let stop = (end * self.region_size).min(self.size);
        let mut pos = first * self.region_size;
        while pos < stop {
            let len = (stop - pos).min(1 << 30);
            let ext = self.origin.block_status(pos, len).await?;
            if ext.is_empty() {
                break;
            }
            for e in ext {
                let (start, end) = (pos, (pos + e.len as u64).min(stop));
                if e.flags & alloc_flags::ZERO != 0 {
                    // Regions wholly inside the zero extent (the last
                    // region may be short and end with the volume).
                    let first = start.div_ceil(self.region_size);
                    let end_region = if end == self.size {
                        self.regions()
                    } else {
                        end / self.region_size
                    };
                    if first < end_region {
                        if locked {
                            self.mark_zero_locked(first, end_region).await?;
                        } else {
                            self.mark_zero_run(first, end_region).await?;
                        }
                    }
                }
                pos = end;
                if pos >= stop {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Marks the absent regions of `first..end` present as zeros (the
    /// fenced source reads them as zero), punching their local range first
    /// (a crash may have lost the bit of data fetched there before).
    /// Regions a fetch holds are left to it: it copies what it needs.
    async fn mark_zero_run(&self, first: u64, end: u64) -> BlockResult<()> {
        const CHUNK: u64 = 1024;
        let mut c = first;
        while c < end {
            let stop = (c + CHUNK).min(end);
            if let Some(_g) = self.locks.try_lock(c, stop - 1) {
                self.mark_zero_locked(c, stop).await?;
            } else {
                for r in c..stop {
                    if let Some(_g) = self.locks.try_lock(r, r) {
                        self.mark_zero_locked(r, r + 1).await?;
                    }
                }
            }
            c = stop;
        }
        Ok(())
    }

    /// [`Self::mark_zero_run`] for regions the caller holds locked.
    async fn mark_zero_locked(&self, first: u64, end: u64) -> BlockResult<()> {
        let mut r = first;
        while r < end {
            let (a, b) = {
                let map = self.map.lock().unwrap();
                while r < end && map.is_present(r) {
                    r += 1;
                }
                let a = r;
                while r < end && !map.is_present(r) {
                    r += 1;
                }
                (a, r)
            };
            if a == b {
                break;
            }
            let (off, _) = self.region_span(a);
            let (_, stop) = self.region_span(b - 1);
            self.local.trim(off, stop - off, false).await?;
            let newly = self.map.lock().unwrap().mark_range(a, b - 1);
            self.stats
                .skipped
                .fetch_add(newly * self.region_size, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A write-like change to `[offset, offset+len)`: hands off if needed,
    /// fetches partially covered absent regions, applies `op` locally and
    /// marks every touched region present.
    async fn modify<'a>(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        op: LocalOp<'a>,
    ) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.handoff(false).await?;
        let (first, last) = (self.region_of(offset), self.region_of(offset + len - 1));
        if self.map.lock().unwrap().all_present(first, last) {
            op.apply(&self.local, offset, len).await?;
        } else {
            let _g = self.locks.lock(first, last).await;
            for r in [first, last] {
                let (a, b) = self.region_span(r);
                let covered = offset <= a && offset + len >= b;
                if !covered && !self.map.lock().unwrap().is_present(r) {
                    self.note_on_demand();
                    self.fetch_locked(r, 1, FetchKind::OnDemand).await?;
                }
            }
            op.apply(&self.local, offset, len).await?;
            let mut map = self.map.lock().unwrap();
            for r in first..=last {
                map.mark_present(r);
            }
        }
        if fua {
            self.commit().await?;
        }
        if self.map.lock().unwrap().is_complete() {
            self.wake.notify_waiters();
        }
        Ok(())
    }

    /// The hydrator loop.
    async fn hydrate(self: Arc<Self>) {
        // Wait for handoff.
        while !self.is_handed_off() {
            let n = self.wake.notified();
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            if self.is_handed_off() {
                break;
            }
            n.await;
        }
        let mut cursor = 0u64;
        let mut inflight: JoinSet<BlockResult<()>> = JoinSet::new();
        let mut last_commit = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let batch_regions = (self.cfg.batch_bytes / self.region_size).max(1);
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                break;
            }
            if last_commit.elapsed() >= self.cfg.commit_interval {
                if let Err(e) = self.commit().await {
                    warn!(volume = %self.name, "map commit failed: {e}");
                    self.note_error(&e);
                }
                last_commit = Instant::now();
            }
            while let Some(done) = inflight.try_join_next() {
                match done {
                    Ok(Ok(())) => self.background_succeeded(&mut backoff),
                    Ok(Err(e)) => {
                        let wait = self.background_failed(&e, &mut backoff);
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => warn!("fetch task failed: {e}"),
                }
            }
            // Read-ahead hints serve a guest's sequential reads: they go
            // first, and neither pause nor the rate limit holds them back.
            let has_hint = !self.hints.lock().unwrap().is_empty();
            if self.paused.load(Ordering::SeqCst) && !has_hint {
                let n = self.wake.notified();
                if self.paused.load(Ordering::SeqCst)
                    && !self.stopped.load(Ordering::SeqCst)
                    && self.hints.lock().unwrap().is_empty()
                {
                    let _ = tokio::time::timeout(self.cfg.commit_interval, n).await;
                }
                continue;
            }
            // While clients wait on fetches, the copier keeps one small batch
            // in flight, so their fetches do not queue behind megabytes of
            // background data on a saturated link.
            let busy = self.on_demand_recently(250);
            // After a failed fetch, one batch at a time until one succeeds:
            // batches paced while the source was away would otherwise all
            // land at once when it returns, far above the rate limit.
            let degraded = backoff > Duration::from_millis(100);
            let parallel = if busy || degraded {
                1
            } else {
                self.cfg.parallel
            };
            let batch_regions = if busy {
                ((256 << 10) / self.region_size).max(1)
            } else {
                batch_regions
            };
            if inflight.len() >= parallel {
                let done = tokio::time::timeout(Duration::from_millis(200), inflight.join_next());
                match done.await {
                    Ok(Some(Ok(Ok(())))) => self.background_succeeded(&mut backoff),
                    Ok(Some(Ok(Err(e)))) => {
                        let wait = self.background_failed(&e, &mut backoff);
                        tokio::time::sleep(wait).await;
                    }
                    _ => {}
                }
                continue;
            }
            // Prefetch hints first, then the next absent run from the cursor.
            let hint = self.hints.lock().unwrap().pop_front();
            let next = hint.or_else(|| {
                let map = self.map.lock().unwrap();
                let start = map.next_absent(cursor)?;
                let mut n = 1;
                while n < batch_regions && start + n < map.regions() && !map.is_present(start + n) {
                    n += 1;
                }
                cursor = start + n;
                Some((start, n))
            });
            let Some((first, count)) = next else {
                if inflight.is_empty() {
                    break;
                }
                let _ = inflight.join_next().await;
                continue;
            };
            // Pace before locking: a region lock is never held while the
            // copier sleeps, so on-demand fetches never wait for the limit.
            if hint.is_none() && !self.wait_turn(count * self.region_size).await {
                // Paused, stopped or complete while waiting for the limit:
                // this batch does not go; the cursor comes back to it.
                cursor = first;
                continue;
            }
            let Some(guard) = self.locks.try_lock(first, first + count - 1) else {
                // A client holds part of it; its own fetch covers it, and
                // the cursor comes back around for anything left.
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            let me = self.clone();
            inflight.spawn(async move {
                let r = me.fetch_locked(first, count, FetchKind::Background).await;
                drop(guard);
                me.sample_rate();
                r
            });
        }
        while inflight.join_next().await.is_some() {}
        if self.stopped.load(Ordering::SeqCst) {
            let _ = self.commit().await;
            debug!(volume = %self.name, "hydrator stopped");
            return;
        }
        // Every region present: commit, then announce completion.
        loop {
            match self.commit().await {
                Ok(_) => break,
                Err(e) => {
                    warn!(volume = %self.name, "final commit failed, retrying: {e}");
                    self.note_error(&e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        *self.stats.completed_at.lock().unwrap() = Some(Instant::now());
        self.complete.store(true, Ordering::SeqCst);
        self.completed.notify_waiters();
        info!(volume = %self.name, "hydration complete");
    }

    /// Waits for the rate limit's turn for `bytes`, looking up every
    /// quarter second: false if the copier was paused or stopped, or every
    /// region became present (clients wrote them), meanwhile. A slow limit
    /// must not hold back a pause, or a completion, by a whole batch.
    async fn wait_turn(&self, bytes: u64) -> bool {
        let Some(start) = self.limiter.reserve(bytes) else {
            return true;
        };
        loop {
            let give_up = self.paused.load(Ordering::SeqCst)
                || self.stopped.load(Ordering::SeqCst)
                || self.map.lock().unwrap().is_complete();
            if give_up {
                return false;
            }
            let now = Instant::now();
            if now >= start {
                return true;
            }
            tokio::time::sleep((start - now).min(Duration::from_millis(250))).await;
        }
    }

    fn sample_rate(&self) {
        let mut s = self.stats.samples.lock().unwrap();
        let now = Instant::now();
        s.push_back((now, self.stats.background.load(Ordering::Relaxed)));
        while s.len() > 2 && now.duration_since(s.front().unwrap().0) > Duration::from_secs(3) {
            s.pop_front();
        }
    }

    /// Status for the API.
    pub fn status(&self) -> MigrationStatus {
        let (total, present) = {
            let m = self.map.lock().unwrap();
            (m.regions(), m.present_count())
        };
        let rate = {
            let s = self.stats.samples.lock().unwrap();
            match (s.front(), s.back()) {
                (Some(a), Some(b)) if b.0 > a.0 => {
                    ((b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64()) as u64
                }
                _ => 0,
            }
        };
        let phase = if self.failed.lock().unwrap().is_some() {
            Phase::Failed
        } else if self.is_complete() {
            Phase::Complete
        } else if self.is_handed_off() {
            Phase::Hydrating
        } else {
            Phase::Passthrough
        };
        let remaining = (total - present) * self.region_size;
        let handoff_at = *self.stats.handoff_at.lock().unwrap();
        let completed_at = *self.stats.completed_at.lock().unwrap();
        MigrationStatus {
            volume: self.name.clone(),
            id: self.migration.clone(),
            phase,
            role: "destination".into(),
            peer: self.peer.clone(),
            region_size: self.region_size,
            regions_total: total,
            regions_present: present,
            bytes_on_demand: self.stats.on_demand.load(Ordering::Relaxed),
            bytes_background: self.stats.background.load(Ordering::Relaxed),
            bytes_skipped: self.stats.skipped.load(Ordering::Relaxed),
            rate_limit: self.limiter.rate(),
            rate,
            eta_seconds: (rate > 0 && phase == Phase::Hydrating)
                .then(|| remaining as f64 / rate as f64),
            paused: self.paused.load(Ordering::SeqCst),
            stalled: if self.no_space.load(Ordering::SeqCst) {
                Some("destination disk full: background copy waits for free space".into())
            } else if self.source_unfenced.load(Ordering::SeqCst) {
                Some(
                    "forced handoff: the copy waits until the source can be reached and fenced"
                        .into(),
                )
            } else {
                None
            },
            handoff_after_seconds: handoff_at.map(|h| h.duration_since(self.started).as_secs_f64()),
            hydrate_seconds: match (handoff_at, completed_at) {
                (Some(h), Some(c)) => Some(c.duration_since(h).as_secs_f64()),
                _ => None,
            },
            last_error: self
                .failed
                .lock()
                .unwrap()
                .clone()
                .or_else(|| self.stats.last_error.lock().unwrap().clone()),
        }
    }
}

/// A commit in progress: unless it reaches its end (and clears `pages`),
/// dropping it marks the snapshot's pages dirty again.
struct PendingCommit<'a> {
    map: &'a Mutex<RegionMap>,
    pages: Vec<u64>,
}

impl Drop for PendingCommit<'_> {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            let pages = std::mem::take(&mut self.pages);
            self.map.lock().unwrap().redirty(pages);
        }
    }
}

/// The local half of a write-like operation.
enum LocalOp<'a> {
    Write(&'a [u8]),
    Trim,
    Zero(ZeroFlags),
}

impl LocalOp<'_> {
    async fn apply(&self, local: &LocalTarget, offset: u64, len: u64) -> BlockResult<()> {
        match self {
            LocalOp::Write(d) => local.write(offset, d, false).await,
            LocalOp::Trim => local.trim(offset, len, false).await,
            LocalOp::Zero(f) => {
                let f = ZeroFlags { fua: false, ..*f };
                local.write_zeroes(offset, len, f).await
            }
        }
    }
}

#[async_trait]
impl BlockTarget for CloneTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            trim: true,
            write_zeroes: true,
            fast_zero: false,
            block_status: true,
            cache: true,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self.is_handed_off() {
            // Passthrough: nothing read before handoff is kept.
            return self.origin.read_into(offset, buf).await;
        }
        let end = offset + buf.len() as u64;
        let (first, last) = (self.region_of(offset), self.region_of(end - 1));
        if !self.map.lock().unwrap().all_present(first, last) {
            match self.ensure_present(first, last, FetchKind::OnDemand).await {
                Ok(()) => {}
                // No room to keep the fetched data: serve it anyway.
                Err(BlockError::NoSpace) => return self.read_through(offset, buf).await,
                Err(e) => return Err(e),
            }
            // Sequential on-demand reads: ask the hydrator for what follows.
            let prev = self.last_on_demand_end.swap(last + 1, Ordering::Relaxed);
            if prev == first && self.cfg.prefetch_regions > 0 {
                let regions = self.map.lock().unwrap().regions();
                let start = last + 1;
                if start < regions {
                    let n = self.cfg.prefetch_regions.min(regions - start);
                    let mut h = self.hints.lock().unwrap();
                    if h.len() < 64 {
                        h.push_back((start, n));
                    }
                }
                self.wake.notify_waiters();
            }
        }
        self.local.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        self.modify(offset, data.len() as u64, fua, LocalOp::Write(data))
            .await
    }

    async fn flush(&self) -> BlockResult<()> {
        if !self.is_handed_off() {
            return Ok(());
        }
        self.commit().await.map(drop)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.modify(offset, len, fua, LocalOp::Trim).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.modify(offset, len, flags.fua, LocalOp::Zero(flags))
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        if !self.is_handed_off() {
            return self.origin.block_status(offset, len).await;
        }
        // One run of same-state regions: present runs as the local file
        // sees them, absent runs as data (their content is the origin's).
        let end = offset + len;
        let first = self.region_of(offset);
        // One look at the map: `present` and the run it starts must come
        // from the same state, or a region marked present in between
        // would end the run before it began (a zero-length extent).
        let (present, r) = {
            let map = self.map.lock().unwrap();
            let present = map.is_present(first);
            let mut r = first + 1;
            while r * self.region_size < end && map.is_present(r) == present {
                r += 1;
            }
            (present, r)
        };
        let run_end = (r * self.region_size).min(end);
        if present {
            self.local.extents(offset, run_end - offset)
        } else {
            Ok(vec![Extent {
                len: (run_end - offset).min(u32::MAX as u64 & !4095) as u32,
                flags: 0,
            }])
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if self.is_handed_off() && len > 0 {
            self.ensure_present(
                self.region_of(offset),
                self.region_of(offset + len - 1),
                FetchKind::OnDemand,
            )
            .await?;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.local.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Hooks whose fence answer a test sets.
    struct Hooks {
        fence: Mutex<Result<(), FenceError>>,
        fenced: AtomicU32,
    }
    impl Hooks {
        fn answering(r: Result<(), FenceError>) -> Arc<Self> {
            Arc::new(Self {
                fence: Mutex::new(r),
                fenced: AtomicU32::new(0),
            })
        }
    }
    #[async_trait]
    impl MigrationHooks for Hooks {
        async fn fence_source(&self) -> Result<(), FenceError> {
            let r = self.fence.lock().unwrap().clone();
            if r.is_ok() {
                self.fenced.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn persist_handoff(&self, _: bool) -> Result<(), String> {
            Ok(())
        }
    }

    /// An origin in memory that can be slowed down and made to fail.
    struct MemOrigin {
        data: Mutex<Vec<u8>>,
        delay_ms: AtomicU64,
        down: AtomicBool,
        reads: AtomicU64,
    }
    impl MemOrigin {
        fn new(data: Vec<u8>) -> Arc<Self> {
            Arc::new(Self {
                data: Mutex::new(data),
                delay_ms: AtomicU64::new(0),
                down: AtomicBool::new(false),
                reads: AtomicU64::new(0),
            })
        }
        async fn pause(&self) -> BlockResult<()> {
            let d = self.delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(BlockError::Unavailable("origin down".into()));
            }
            Ok(())
        }
    }
    #[async_trait]
    impl Origin for MemOrigin {
        async fn read_into(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
            self.pause().await?;
            self.reads.fetch_add(1, Ordering::SeqCst);
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        async fn read_vec(&self, offset: u64, len: u32, _bulk: bool) -> BlockResult<Vec<u8>> {
            let mut b = vec![0; len as usize];
            self.read_into(offset, &mut b).await?;
            Ok(b)
        }
        async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
            self.pause().await?;
            let d = self.data.lock().unwrap();
            let mut out: Vec<Extent> = Vec::new();
            let end = (offset + len).min(d.len() as u64);
            let mut pos = offset;
            while pos < end {
                let stop = ((pos / 4096 + 1) * 4096).min(end);
                let zero = d[pos as usize..stop as usize].iter().all(|b| *b == 0);
                let flags = if zero { alloc_flags::ZERO } else { 0 };
                match out.last_mut() {
                    Some(e) if e.flags == flags => e.len += (stop - pos) as u32,
                    _ => out.push(Extent {
                        len: (stop - pos) as u32,
                        flags,
                    }),
                }
                pos = stop;
            }
            Ok(out)
        }
        fn close(&self) {}
    }

    const RS: u64 = 4096;

    fn clone_over(
        dir: &std::path::Path,
        origin: Arc<dyn Origin>,
        regions: u64,
        handed_off: bool,
        hooks: Arc<Hooks>,
    ) -> Arc<CloneTarget> {
        let size = regions * RS;
        let local = Arc::new(LocalTarget::create(&dir.join("data.raw"), size).unwrap());
        let map = RegionMap::create(&dir.join("regions.map"), size, RS).unwrap();
        let cfg = CloneConfig {
            batch_bytes: 4 * RS,
            ..CloneConfig::default()
        };
        CloneTarget::new(
            "vm",
            "peer",
            "0123456789abcdef",
            origin,
            local,
            map,
            handed_off,
            hooks,
            cfg,
        )
        .unwrap()
    }

    /// A handed-off clone of 16 regions whose origin is down (the tests
    /// write whole regions, which fetch nothing).
    fn handed_off_clone(dir: &std::path::Path) -> Arc<CloneTarget> {
        let origin = MemOrigin::new(vec![0; 16 * RS as usize]);
        origin.down.store(true, Ordering::SeqCst);
        clone_over(dir, origin, 16, true, Hooks::answering(Ok(())))
    }

    /// Every other 4 KiB region holds data, the rest are zero.
    fn half_data(regions: u64) -> Vec<u8> {
        let mut d = Vec::with_capacity((regions * RS) as usize);
        for r in 0..regions {
            let fill = if r % 2 == 0 { (r % 251) as u8 + 1 } else { 0 };
            d.extend(std::iter::repeat_n(fill, RS as usize));
        }
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_never_answers_an_empty_extent_while_regions_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let origin = MemOrigin::new(half_data(4096));
        let c = clone_over(dir.path(), origin, 4096, true, Hooks::answering(Ok(())));
        let _h = c.start();
        let mut calls = 0u64;
        while !c.is_complete() || calls < 2000 {
            // Where the copier is about to land: the region whose state is
            // most likely to change between two looks at the map.
            let next = c.map.lock().unwrap().next_absent(0);
            let off = next.unwrap_or(calls * 7919 % 4096) * RS;
            let ext = c.block_status(off, 4096 * RS - off).await.unwrap();
            assert!(!ext.is_empty(), "no extent at {off}");
            assert!(
                ext.iter().all(|e| e.len > 0),
                "empty extent at {off}: {ext:?}"
            );
            calls += 1;
            if calls > 200_000 {
                panic!("never completed");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_fetch_never_lands_over_a_client_write() {
        let dir = tempfile::tempdir().unwrap();
        let origin = MemOrigin::new(vec![0xAA; 64 * RS as usize]);
        origin.delay_ms.store(100, Ordering::SeqCst);
        let c = clone_over(
            dir.path(),
            origin.clone(),
            64,
            true,
            Hooks::answering(Ok(())),
        );
        // A read of region 5 fetches it (slowly); meanwhile a client writes
        // region 5 whole, and part of region 6 (which must fetch first).
        let reader = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut b = vec![0; RS as usize];
                c.read(5 * RS, &mut b).await.map(|_| b)
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write(5 * RS, &[0x55; RS as usize], false).await.unwrap();
        c.write(6 * RS + 100, &[0x66; 50], false).await.unwrap();
        let read = reader.await.unwrap().unwrap();
        // The read saw the region either before or after the write, whole.
        assert!(read == vec![0xAA; RS as usize] || read == vec![0x55; RS as usize]);
        let mut b = vec![0; RS as usize];
        c.read(5 * RS, &mut b).await.unwrap();
        assert_eq!(
            b,
            vec![0x55; RS as usize],
            "the fetch landed over the write"
        );
        c.read(6 * RS, &mut b).await.unwrap();
        assert_eq!(&b[..100], &[0xAA; 100]);
        assert_eq!(&b[100..150], &[0x66; 50]);
        assert_eq!(&b[150..], &[0xAA; RS as usize - 150]);
    }

    #[tokio::test]
    async fn a_handoff_fences_first_and_a_forced_one_only_when_the_source_is_unreachable() {
        for (answer, force, handed_off, unfenced) in [
            (Ok(()), false, true, false),
            (Ok(()), true, true, false),
            (
                Err(FenceError::Unreachable("down".into())),
                false,
                false,
                false,
            ),
            (
                Err(FenceError::Unreachable("down".into())),
                true,
                true,
                true,
            ),
            (
                Err(FenceError::Refused("not mine".into())),
                true,
                false,
                false,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let origin = MemOrigin::new(half_data(8));
            let hooks = Hooks::answering(answer.clone());
            let c = clone_over(dir.path(), origin, 8, false, hooks.clone());
            let r = c.handoff(force).await;
            assert_eq!(r.is_ok(), handed_off, "{answer:?} force={force}: {r:?}");
            assert_eq!(c.is_handed_off(), handed_off);
            assert_eq!(c.source_unfenced.load(Ordering::SeqCst), unfenced);
            // Zeros are skipped only once the source was fenced.
            let skipped = c.stats.skipped.load(Ordering::Relaxed);
            assert_eq!(
                skipped > 0,
                handed_off && !unfenced,
                "{answer:?} force={force}"
            );
            if !handed_off {
                // Nothing may be written before a handoff.
                assert!(c.write(0, &[1; RS as usize], false).await.is_err());
            }
        }
    }

    #[tokio::test]
    async fn pause_holds_the_copy_and_resume_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let origin = MemOrigin::new(half_data(64));
        let c = clone_over(
            dir.path(),
            origin.clone(),
            64,
            true,
            Hooks::answering(Ok(())),
        );
        c.pause();
        let _h = c.start();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            origin.reads.load(Ordering::SeqCst),
            0,
            "copied while paused"
        );
        c.resume();
        tokio::time::timeout(Duration::from_secs(10), c.wait_complete())
            .await
            .unwrap();
        let mut b = vec![0; 64 * RS as usize];
        c.read(0, &mut b).await.unwrap();
        assert_eq!(b, half_data(64));
    }

    fn present_on_disk(dir: &std::path::Path, r: u64) -> bool {
        RegionMap::open(&dir.join("regions.map"))
            .unwrap()
            .is_present(r)
    }

    #[tokio::test]
    async fn a_commit_dropped_mid_way_gives_its_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let c = handed_off_clone(dir.path());
        c.write(0, &[7u8; RS as usize], false).await.unwrap();
        // The commit's caller goes away while the data sync is in progress
        // (an HTTP handler whose client disconnected).
        c.local()
            .sync_faults()
            .delay_ms
            .store(300, Ordering::SeqCst);
        let dropped = tokio::time::timeout(Duration::from_millis(50), c.commit()).await;
        assert!(dropped.is_err(), "the commit should still be syncing");
        c.local().sync_faults().delay_ms.store(0, Ordering::SeqCst);
        assert!(
            c.commit().await.unwrap() > 0,
            "the next commit rewrites the page"
        );
        assert!(present_on_disk(dir.path(), 0));
    }

    #[tokio::test]
    async fn a_failed_map_write_keeps_its_pages_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let c = handed_off_clone(dir.path());
        c.write(RS, &[7u8; RS as usize], false).await.unwrap();
        // The map file cannot be written: make it read-only underneath.
        let map_path = dir.path().join("regions.map");
        let good = std::mem::replace(
            &mut *(c.map_file_for_test()),
            std::fs::File::open(&map_path).unwrap(),
        );
        assert!(c.commit().await.is_err());
        *c.map_file_for_test() = good;
        assert!(c.commit().await.unwrap() > 0);
        assert!(present_on_disk(dir.path(), 1));
    }

    #[tokio::test]
    async fn a_failed_data_sync_fails_the_migration_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let c = handed_off_clone(dir.path());
        c.write(0, &[7u8; RS as usize], false).await.unwrap();
        c.local().sync_faults().fail_next.store(1, Ordering::SeqCst);
        assert!(c.flush().await.is_err());
        // The disk "recovered": a second sync would succeed, but the pages
        // it lost are gone, so nothing may report success any more.
        assert!(c.flush().await.is_err(), "a later flush must not succeed");
        assert!(c.write(RS, &[1u8; RS as usize], true).await.is_err());
        let s = c.status();
        assert_eq!(s.phase, Phase::Failed);
        assert!(s
            .last_error
            .unwrap()
            .contains("syncing the local data file failed"));
        assert!(!present_on_disk(dir.path(), 0));
    }
}
