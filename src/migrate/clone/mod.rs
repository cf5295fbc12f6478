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
//! **Where things are**: `data_path` (client I/O, passthrough, on-demand
//! fetch), `handoff` (the ownership change, fencing a source a forced
//! handoff could not reach, the zero scan), `hydrator` (the background
//! copier and its pacing), `commit` (the one owner of the region-map
//! commit order), `status`, `view` (the downsampled picture of the regions
//! the dashboard draws, and the lock-free flags the data path sets for
//! it), and the unit tests against an in-memory origin.
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

mod commit;
mod data_path;
mod handoff;
mod hydrator;
mod rollback;
mod status;
#[cfg(test)]
mod tests;
mod view;

pub use view::{cell, CellCounts, RegionView, MAX_VIEW_CELLS};

use super::region_map::RegionMap;
use super::{RateLimiter, RegionLocks};
use crate::api::types::{MigrationStatus, Phase};
use crate::nbd::proto::alloc_flags;
use crate::node::metrics::{FetchMetrics, OriginRead};
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
    /// For a rollback (see `rollback`): the regions clients wrote on the
    /// (now fenced) source since it was handed the volume, as runs
    /// `(first, count)`. Only those hold anything newer than this node's
    /// copy.
    async fn written_at_source(&self) -> Result<Vec<(u64, u64)>, FenceError> {
        Err(FenceError::Refused(
            "not a rollback: the source's writes are not tracked".into(),
        ))
    }
    /// Cluster mode: whether the source, unreachable, is certainly gone
    /// (its cluster lease expired, and waited out), so the handoff may go
    /// ahead without it: a takeover, needing no operator's `--force`.
    /// Peer mode: never.
    async fn may_take_over(&self) -> Result<bool, FenceError> {
        Ok(false)
    }
    /// Cluster mode: moves ownership in the cluster's directory (one
    /// compare-and-swap), after the source was fenced or, `takeover`,
    /// found gone; before the handoff is persisted. Peer mode: nothing.
    async fn claim_ownership(&self, _takeover: bool) -> Result<(), FenceError> {
        Ok(())
    }
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
    /// Where the byte counters are kept across restarts (see
    /// [`CloneTarget::keep_counters_in`]).
    counters_file: Mutex<Option<std::path::PathBuf>>,
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
    /// Regions clients wrote since handoff, durable before each first
    /// write to a region (`rollback::note_written`); `None` for clones
    /// made before writes were tracked (those cannot be rolled back).
    written: Mutex<Option<RegionMap>>,
    written_file: Mutex<Option<File>>,
    written_commit: tokio::sync::Mutex<()>,
    /// This clone rolls back migration `rollback_of` (its local file is
    /// the copy this node had when it handed that migration off).
    rollback_of: Mutex<Option<String>>,
    /// Completion waits while set: a rollback of this clone's migration
    /// is under way, and the written set must keep growing until it hands
    /// off (a completed clone collapses and stops tracking).
    hold_complete: AtomicBool,
    /// Where clients fetched on demand and wrote, for [`RegionView`].
    activity: view::Activity,
    /// How long reads from the origin take, and whether the last one
    /// succeeded (read by `GET /metrics` at scrape time).
    fetch_metrics: Arc<FetchMetrics>,
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
        let activity = view::Activity::new(map.regions());
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
            written: Mutex::new(None),
            written_file: Mutex::new(None),
            written_commit: Default::default(),
            rollback_of: Mutex::new(None),
            hold_complete: AtomicBool::new(false),
            activity,
            fetch_metrics: Default::default(),
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

    /// The source's API address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bytes per region of this clone's maps.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn is_handed_off(&self) -> bool {
        self.handed_off.load(Ordering::SeqCst)
    }

    /// Records (from the table, at open) that the handoff was forced and the
    /// source has not been fenced since.
    pub fn mark_source_unfenced(&self) {
        self.source_unfenced.store(true, Ordering::SeqCst);
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst) && !self.completion_held()
    }

    /// Resolves once every region is present and committed.
    /// Resolves once every region is present and committed, or once the
    /// clone is stopped (removed, cancelled, released, failed): it will
    /// never complete then.
    pub async fn wait_complete(&self) {
        loop {
            let n = self.completed.notified();
            if self.is_complete() || self.is_stopped() {
                return;
            }
            n.await;
        }
    }

    /// Whether [`Self::stop`] (or a failure) ended the clone.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The local data target (what the volume becomes on completion).
    pub fn local(&self) -> Arc<LocalTarget> {
        self.local.clone()
    }

    /// Reads from the origin so far: their times and the last outcome.
    pub fn fetch_metrics(&self) -> Arc<FetchMetrics> {
        self.fetch_metrics.clone()
    }

    /// Awaits `read` of the origin, recording its time and outcome.
    async fn timed_read<T>(
        &self,
        kind: OriginRead,
        read: impl std::future::Future<Output = BlockResult<T>>,
    ) -> BlockResult<T> {
        let t = Instant::now();
        let r = read.await;
        self.fetch_metrics.record(kind, t.elapsed(), r.is_ok());
        r
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

    /// Ends the clone for good (volume released, removed, cancelled, or
    /// a rollback undone): the hydrator stops, waiters on completion are
    /// let go, and the origin link closes, so the source's connections
    /// (and its connection slots) are given back.
    pub fn stop(&self) {
        self.halt();
        self.origin.close();
    }

    /// Stops the hydrator and lets completion waiters go, keeping the
    /// origin link (a failed clone still serves absent regions from it).
    fn halt(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // No counter writes after this (see `save_counters`).
        self.stats.counters_file.lock().unwrap().take();
        self.wake.notify_waiters();
        self.completed.notify_waiters();
    }

    /// Marks the migration failed for good because the local copy cannot
    /// be trusted (a failed data sync): the copier stops and every later
    /// flush and commit fails.
    fn fail(&self, why: String) {
        self.data_lost.store(true, Ordering::SeqCst);
        *self.failed.lock().unwrap() = Some(why);
        self.halt();
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

    /// What failed before works again: the last error no longer describes
    /// the migration, so status stops showing it.
    fn note_recovered(&self) {
        if let Some(was) = self.stats.last_error.lock().unwrap().take() {
            info!(volume = %self.name, migration = %self.migration, event = "recovered", "recovered from: {was}");
        }
    }
}
