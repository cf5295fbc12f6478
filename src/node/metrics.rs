//! Prometheus metrics: what `GET /metrics` on the API port answers, in the
//! Prometheus text exposition format (version 0.0.4).
//!
//! **What this module owns.** The node's [`Registry`] and every instrument
//! in it, and the types of the two handles other modules record into:
//!
//! ```text
//!   NodeMetrics ── registry ──┬── NbdMetrics      (Arc, given to every NBD connection)
//!                             │     connections, requests, bytes, errors, latency by command
//!                             └── ProcessCollector (reads /proc/self at scrape time)
//!   at scrape time:  SnapshotCollector over a Snapshot of the store
//!                    (volumes; per migration: MigrationStatus + the clone's FetchMetrics)
//!   CloneTarget ── Arc<FetchMetrics> (its own; read through the clone at scrape time)
//! ```
//!
//! Per-migration values are not counted twice: phase, regions and bytes are
//! read at scrape time from the same [`MigrationStatus`] the API reports.
//! Only what has no other home is recorded live: NBD request counts and
//! latencies ([`NbdMetrics`]) and the time each read from a migration's
//! source takes ([`FetchMetrics`]).
//!
//! **What it must never do.** Take a lock, allocate or make a syscall on
//! the NBD data path or the clone's fetch path. A request costs two clock
//! reads and four relaxed atomic adds (request count, bytes, one histogram
//! bucket, the histogram's sum); an error one more, plus a one-time
//! registration the first time that (command, errno) pair is seen. This is
//! why the histograms here are [`AtomicHistogram`], not the crate's
//! `Histogram` (which takes a mutex on every observation), and why the
//! per-command instruments are looked up by array index, never through a
//! `Family` (whose lookup takes a read lock). Scrapes take locks (the
//! families', the store's, each clone's region map for its counts), which
//! is what the data path must never wait on, and it does not: the data
//! path only touches atomics.
//!
//! **Who may scrape.** `/metrics` sits behind the same middleware as the
//! rest of the API: with `--api-token-file` a scrape must send
//! `Authorization: Bearer TOKEN` (Prometheus: `authorization: {credentials_file: ...}`
//! in the scrape config), and with `--tls-dir` a client certificate.
//! `docs/OPERATIONS.md` lists every metric and a scrape config.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::NodeState;
use crate::api::types::{MigrationStatus, Phase};
use crate::nbd::proto::{errno, Command};

/// The `Content-Type` of what [`NodeMetrics::render`] produces.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the NBD request latency buckets: 10 µs (a
/// page-cache read) to 10 s (a read waiting on an unreachable source).
pub const NBD_LATENCY_BUCKETS: &[f64] = &[
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) of the fetch latency buckets: 100 µs (one region
/// over loopback) to 30 s (the default `--source-timeout`).
pub const FETCH_LATENCY_BUCKETS: &[f64] = &[
    100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// Why `/metrics` could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// A latency histogram whose observation is lock-free: one relaxed atomic
/// add to its bucket and one to its sum (in nanoseconds). Cloning shares
/// it. A scrape reads the buckets one by one, so it may see an observation
/// in its bucket and not yet in the sum (or the reverse): never off by
/// more than the observations in flight, and the count is always the sum
/// of the buckets read.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    /// Upper bounds, seconds (as exported).
    bounds: &'static [f64],
    /// The same bounds in nanoseconds (as compared).
    bounds_ns: Box<[u64]>,
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram over `bounds` (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        Self(Arc::new(HistogramInner {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9) as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // `le` buckets: the first bound at or above the value.
        let i = self.0.bounds_ns.partition_point(|&b| b < ns);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        // The encoder makes the buckets cumulative.
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The commands counted per command, in index order. A request of a
/// command the server does not know is counted only as an error
/// (`command="unknown"`); `NBD_CMD_DISC` is not counted.
const COMMANDS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

fn command_index(c: Command) -> Option<usize> {
    Some(match c {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        Command::BlockStatus => 5,
        Command::Cache => 6,
        Command::Disc | Command::Unknown(_) => return None,
    })
}

/// The errno values the server sends, by name, in index order; anything
/// else is `other`.
const ERRNOS: [(u32, &str); 8] = [
    (errno::EPERM, "EPERM"),
    (errno::EIO, "EIO"),
    (errno::ENOMEM, "ENOMEM"),
    (errno::EINVAL, "EINVAL"),
    (errno::ENOSPC, "ENOSPC"),
    (errno::EOVERFLOW, "EOVERFLOW"),
    (errno::ENOTSUP, "ENOTSUP"),
    (errno::ESHUTDOWN, "ESHUTDOWN"),
];
/// Error label slots: the known errno values, then `other`.
const ERRNO_SLOTS: usize = ERRNOS.len() + 1;
/// Command label slots for errors: [`COMMANDS`], then `unknown`.
const ERROR_COMMAND_SLOTS: usize = COMMANDS.len() + 1;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    command: &'static str,
    errno: &'static str,
}

/// One command's instruments: clones of the series in the families (a
/// clone shares the atomic), so recording is an index and an add.
#[derive(Debug)]
struct PerCommand {
    requests: Counter,
    bytes: Counter,
    latency: AtomicHistogram,
}

type LatencyFamily = Family<CommandLabels, AtomicHistogram, fn() -> AtomicHistogram>;

/// What the NBD server records: the node's open connections and, per
/// command, requests, bytes, errors by errno and latency. One per node,
/// shared by every connection ([`crate::nbd::server::serve_connection`]).
/// A default one records into instruments no registry exports (tests,
/// fuzzing).
#[derive(Debug)]
pub struct NbdMetrics {
    connections: Gauge,
    requests: Family<CommandLabels, Counter>,
    bytes: Family<CommandLabels, Counter>,
    latency: LatencyFamily,
    errors: Family<ErrorLabels, Counter>,
    per_command: [PerCommand; COMMANDS.len()],
    /// An error counter per (command, errno) slot, made the first time that
    /// pair occurs (so that the export lists only errors that happened).
    error_slots: [[OnceLock<Counter>; ERRNO_SLOTS]; ERROR_COMMAND_SLOTS],
}

impl Default for NbdMetrics {
    fn default() -> Self {
        let requests = Family::<CommandLabels, Counter>::default();
        let bytes = Family::<CommandLabels, Counter>::default();
        let latency: LatencyFamily =
            Family::new_with_constructor(|| AtomicHistogram::new(NBD_LATENCY_BUCKETS));
        let per_command = COMMANDS.map(|command| {
            let l = CommandLabels { command };
            PerCommand {
                requests: requests.get_or_create_owned(&l),
                bytes: bytes.get_or_create_owned(&l),
                latency: latency.get_or_create_owned(&l),
            }
        });
        Self {
            connections: Gauge::default(),
            requests,
            bytes,
            latency,
            errors: Family::default(),
            per_command,
            error_slots: Default::default(),
        }
    }
}

/// Counts one open NBD connection until dropped.
pub struct ConnectionCount(Gauge);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl NbdMetrics {
    /// Counts a connection as open until the guard is dropped.
    pub fn connection(&self) -> ConnectionCount {
        self.connections.inc();
        ConnectionCount(self.connections.clone())
    }

    /// A request was carried out (with or without error): `bytes` is what
    /// it covered (payload of a read or write, range of the others; 0 for
    /// flush) and `took` the time from its arrival to its reply being ready.
    pub fn request_done(&self, command: Command, bytes: u64, took: Duration) {
        if let Some(i) = command_index(command) {
            let m = &self.per_command[i];
            m.requests.inc();
            m.bytes.inc_by(bytes);
            m.latency.observe(took);
        }
    }

    /// A request was refused before reaching the target (it is counted as a
    /// request, with no bytes and no latency; its error via [`Self::error`]).
    pub fn request_refused(&self, command: Command) {
        if let Some(i) = command_index(command) {
            self.per_command[i].requests.inc();
        }
    }

    /// A request was answered with NBD error `code`.
    pub fn error(&self, command: Command, code: u32) {
        let c = command_index(command).unwrap_or(COMMANDS.len());
        let e = ERRNOS
            .iter()
            .position(|(v, _)| *v == code)
            .unwrap_or(ERRNOS.len());
        self.error_slots[c][e]
            .get_or_init(|| {
                self.errors.get_or_create_owned(&ErrorLabels {
                    command: COMMANDS.get(c).copied().unwrap_or("unknown"),
                    errno: ERRNOS.get(e).map_or("other", |x| x.1),
                })
            })
            .inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "nbd_connections",
            "Open NBD connections (TCP and UNIX, handshake included)",
            self.connections.clone(),
        );
        r.register(
            "nbd_requests",
            "NBD requests received, by command (refused ones included)",
            self.requests.clone(),
        );
        r.register(
            "nbd_bytes",
            "Bytes the NBD requests covered, by command: payload of reads and writes, \
             range of trim, write_zeroes, cache and block_status",
            self.bytes.clone(),
        );
        r.register(
            "nbd_errors",
            "NBD requests answered with an error, by command and errno",
            self.errors.clone(),
        );
        r.register(
            "nbd_request_duration_seconds",
            "Time from an NBD request's arrival (header and payload read) to its reply being \
             ready, by command",
            self.latency.clone(),
        );
    }
}

/// How a migration's destination read from its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginRead {
    /// A fetch a client waits on (a read or partial write of absent regions).
    OnDemand,
    /// A background copier batch.
    Background,
    /// A read passed through before handoff (nothing kept), or a read
    /// served from the source without keeping it (destination disk full).
    Passthrough,
}

impl OriginRead {
    const ALL: [OriginRead; 3] = [Self::OnDemand, Self::Background, Self::Passthrough];

    fn label(self) -> &'static str {
        match self {
            Self::OnDemand => "on_demand",
            Self::Background => "background",
            Self::Passthrough => "passthrough",
        }
    }
}

/// What a migration's destination records live about its source: how long
/// each read took, by kind, and whether the last one succeeded. Owned by
/// the clone target, read at scrape time through it; recording is atomic
/// adds and stores only.
#[derive(Debug)]
pub struct FetchMetrics {
    /// By [`OriginRead`] (index order of `OriginRead::ALL`); successful
    /// reads only.
    latency: [AtomicHistogram; 3],
    /// 0: no read yet; 1: the last read succeeded; 2: it failed.
    last_read: AtomicU8,
}

impl Default for FetchMetrics {
    fn default() -> Self {
        Self {
            latency: std::array::from_fn(|_| AtomicHistogram::new(FETCH_LATENCY_BUCKETS)),
            last_read: AtomicU8::new(0),
        }
    }
}

impl FetchMetrics {
    /// Records one read from the source: its time if it succeeded, and
    /// whether it did.
    pub fn record(&self, kind: OriginRead, took: Duration, ok: bool) {
        if ok {
            let i = OriginRead::ALL.iter().position(|k| *k == kind).unwrap_or(0);
            self.latency[i].observe(took);
        }
        self.last_read
            .store(if ok { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Whether the last read from the source succeeded (`None`: no read yet).
    pub fn source_reachable(&self) -> Option<bool> {
        match self.last_read.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v == 1),
        }
    }

    /// Successful reads of `kind` so far.
    pub fn reads(&self, kind: OriginRead) -> u64 {
        let i = OriginRead::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.latency[i].count()
    }
}

/// The process's own figures, read from `/proc/self` at each scrape
/// (prometheus-client has no process collector). Names follow the other
/// Prometheus clients', so existing dashboards work.
#[derive(Debug)]
pub struct ProcessCollector {
    /// `/proc/self` (another directory in tests).
    proc_dir: PathBuf,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self {
            proc_dir: PathBuf::from("/proc/self"),
        }
    }
}

/// Resident and virtual size in bytes from the text of `/proc/PID/statm`
/// (sizes in pages: total, resident, ...).
fn parse_statm(text: &str, page_size: u64) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    let virt = f.next()??;
    let rss = f.next()??;
    Some((rss * page_size, virt * page_size))
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(4096)
}

impl ProcessCollector {
    /// (resident bytes, virtual bytes).
    fn memory(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(self.proc_dir.join("statm")).ok()?;
        parse_statm(&text, page_size())
    }

    /// Open file descriptors, not counting the one that lists them
    /// (`/proc/self/fd` shows the directory handle reading it).
    fn open_fds(&self) -> Option<u64> {
        let n = std::fs::read_dir(self.proc_dir.join("fd")).ok()?.count() as u64;
        Some(n.saturating_sub(1))
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A figure that cannot be read is left out, not reported as 0.
        if let Some((rss, virt)) = self.memory() {
            let g = ConstGauge::new(rss as i64);
            g.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes (/proc/self/statm).",
                None,
                MetricType::Gauge,
            )?)?;
            let g = ConstGauge::new(virt as i64);
            g.encode(encoder.encode_descriptor(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes (/proc/self/statm).",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(n) = self.open_fds() {
            ConstGauge::new(n as i64).encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors (entries of /proc/self/fd).",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            ConstGauge::new(i64::try_from(soft).unwrap_or(i64::MAX)).encode(
                encoder.encode_descriptor(
                    "process_max_fds",
                    "Open file descriptor limit (soft RLIMIT_NOFILE).",
                    None,
                    MetricType::Gauge,
                )?,
            )?;
        }
        Ok(())
    }
}

/// One migration as seen at a scrape.
#[derive(Debug, Clone)]
pub enum MigrationSample {
    /// This node is (or was, for a completed one) the destination: the
    /// clone's status, and its live fetch figures while the clone exists.
    Destination {
        status: Box<MigrationStatus>,
        fetch: Option<Arc<FetchMetrics>>,
    },
    /// This node is the source: it knows only whether it has handed off
    /// (the bytes and regions are the destination's to report).
    Source {
        volume: String,
        id: String,
        phase: Phase,
    },
}

/// What a scrape reads from the node beyond the registry.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub volumes: usize,
    pub migrations: Vec<MigrationSample>,
}

impl Snapshot {
    /// Reads the store: every volume, the migration each is in (as
    /// destination, as source, or both in a chain), and the migrations
    /// completed here (from the history) whose volume has not moved on.
    pub fn of(state: &NodeState) -> Snapshot {
        let volumes = state.store.list();
        let mut migrations = Vec::new();
        for v in &volumes {
            let clone = v.clone_target();
            let outgoing = v.table().outgoing;
            if let Some(c) = &clone {
                migrations.push(MigrationSample::Destination {
                    status: Box::new(c.status()),
                    fetch: Some(c.fetch_metrics()),
                });
            }
            if let Some(out) = &outgoing {
                migrations.push(MigrationSample::Source {
                    volume: v.name.clone(),
                    id: out.id.clone(),
                    // As `migration status` says when the destination is
                    // out of reach: fenced means handed off.
                    phase: if v.fence.is_fenced() {
                        Phase::Hydrating
                    } else {
                        Phase::Passthrough
                    },
                });
            }
            if clone.is_none() && outgoing.is_none() {
                let done = state
                    .history
                    .latest(&v.name, Some("destination"))
                    .filter(|s| s.phase == Phase::Complete);
                if let Some(s) = done {
                    migrations.push(MigrationSample::Destination {
                        status: Box::new(s),
                        fetch: None,
                    });
                }
            }
        }
        Snapshot {
            volumes: volumes.len(),
            migrations,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    volume: String,
    role: &'static str,
    id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    volume: String,
    role: &'static str,
    id: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    volume: String,
    role: &'static str,
    id: String,
    kind: &'static str,
}

const PHASES: [(Phase, &str); 5] = [
    (Phase::Preparing, "preparing"),
    (Phase::Passthrough, "passthrough"),
    (Phase::Hydrating, "hydrating"),
    (Phase::Complete, "complete"),
    (Phase::Failed, "failed"),
];

/// Encodes a [`Snapshot`] (one per scrape).
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// A descriptor followed by one sample per item, left out entirely when
/// there are no items.
fn family<T, L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    items: &[T],
    sample: impl Fn(&T) -> Option<(L, M)>,
) -> Result<(), std::fmt::Error> {
    let samples: Vec<(L, M)> = items.iter().filter_map(sample).collect();
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = encoder.encode_descriptor(name, help, None, ty)?;
    for (labels, metric) in &samples {
        metric.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A per-migration value read from its status: name, help, value.
type StatusField = (&'static str, &'static str, fn(&MigrationStatus) -> u64);

/// A destination's status and fetch figures, with its labels.
type Dest<'a> = (
    MigrationLabels,
    &'a MigrationStatus,
    Option<&'a FetchMetrics>,
);

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        ConstGauge::new(self.0.volumes as i64).encode(e.encode_descriptor(
            "volumes",
            "Volumes on this node.",
            None,
            MetricType::Gauge,
        )?)?;
        // Every migration's phase, as one series per phase (1 for the
        // current one, 0 for the others).
        let mut phases = Vec::new();
        for m in &self.0.migrations {
            let (volume, role, id, now) = match m {
                MigrationSample::Destination { status, .. } => {
                    (&status.volume, "destination", &status.id, status.phase)
                }
                MigrationSample::Source { volume, id, phase } => (volume, "source", id, *phase),
            };
            for (p, name) in PHASES {
                phases.push((
                    PhaseLabels {
                        volume: volume.clone(),
                        role,
                        id: id.clone(),
                        phase: name,
                    },
                    i64::from(p == now),
                ));
            }
        }
        family(
            &mut e,
            "migration_phase",
            "Phase of each migration on this node: 1 for its current phase, 0 for the others.",
            MetricType::Gauge,
            &phases,
            |(l, v)| Some((l.clone(), ConstGauge::new(*v))),
        )?;
        let dests: Vec<Dest> = self
            .0
            .migrations
            .iter()
            .filter_map(|m| match m {
                MigrationSample::Destination { status, fetch } => Some((
                    MigrationLabels {
                        volume: status.volume.clone(),
                        role: "destination",
                        id: status.id.clone(),
                    },
                    &**status,
                    fetch.as_deref(),
                )),
                MigrationSample::Source { .. } => None,
            })
            .collect();
        let gauges: [StatusField; 5] = [
            (
                "migration_regions",
                "Regions of the volume (destination).",
                |s| s.regions_total,
            ),
            (
                "migration_regions_present",
                "Regions present at the destination.",
                |s| s.regions_present,
            ),
            (
                "migration_region_size_bytes",
                "Region size of the migration, bytes.",
                |s| s.region_size,
            ),
            (
                "migration_rate_bytes_per_second",
                "Measured background copy rate over the last seconds, bytes/s.",
                |s| s.rate,
            ),
            (
                "migration_rate_limit_bytes_per_second",
                "Background copy limit, bytes/s (0: unlimited).",
                |s| s.rate_limit,
            ),
        ];
        for (name, help, value) in gauges {
            family(
                &mut e,
                name,
                help,
                MetricType::Gauge,
                &dests,
                |(l, s, _)| Some((l.clone(), ConstGauge::new(value(s) as i64))),
            )?;
        }
        let counters: [StatusField; 3] = [
            (
                "migration_on_demand_bytes",
                "Bytes fetched from the source because a client needed them.",
                |s| s.bytes_on_demand,
            ),
            (
                "migration_background_bytes",
                "Bytes copied from the source by the background copier.",
                |s| s.bytes_background,
            ),
            (
                "migration_skipped_bytes",
                "Bytes never fetched: zero or unallocated at the source.",
                |s| s.bytes_skipped,
            ),
        ];
        for (name, help, value) in counters {
            family(
                &mut e,
                name,
                help,
                MetricType::Counter,
                &dests,
                |(l, s, _)| Some((l.clone(), ConstCounter::new(value(s)))),
            )?;
        }
        family(
            &mut e,
            "migration_source_reachable",
            "1 if the destination's last read from the source succeeded, 0 if it failed \
             (absent before the first read and once the migration is complete).",
            MetricType::Gauge,
            &dests,
            |(l, _, f)| {
                let ok = f.as_ref()?.source_reachable()?;
                Some((l.clone(), ConstGauge::new(i64::from(ok))))
            },
        )?;
        let mut fetches = Vec::new();
        for (l, _, f) in &dests {
            let Some(f) = f else { continue };
            for (i, kind) in OriginRead::ALL.iter().enumerate() {
                fetches.push((
                    FetchLabels {
                        volume: l.volume.clone(),
                        role: l.role,
                        id: l.id.clone(),
                        kind: kind.label(),
                    },
                    f.latency[i].clone(),
                ));
            }
        }
        family(
            &mut e,
            "migration_fetch_duration_seconds",
            "Time of each successful read from the migration's source, by kind \
             (on_demand, background, passthrough).",
            MetricType::Histogram,
            &fetches,
            |(l, h)| Some((l.clone(), h.clone())),
        )
    }
}

/// The node's metrics: the registry and the NBD instruments in it.
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    nbd: Arc<NbdMetrics>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let nbd = Arc::new(NbdMetrics::default());
        nbd.register(registry.sub_registry_with_prefix("dlsm"));
        registry.register_collector(Box::new(ProcessCollector::default()));
        Self { registry, nbd }
    }
}

impl NodeMetrics {
    /// The handle every NBD connection records into.
    pub fn nbd(&self) -> Arc<NbdMetrics> {
        self.nbd.clone()
    }

    /// The whole exposition: the registry, then `snapshot`.
    pub fn render(&self, snapshot: Snapshot) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(16 << 10);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        let mut scrape = Registry::with_prefix("dlsm");
        scrape.register_collector(Box::new(SnapshotCollector(snapshot)));
        prometheus_client::encoding::prometheus_text::encode(&mut out, &scrape)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name{labels}` in `text` (labels as written).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Checks the text is well-formed exposition: every sample belongs to a
    /// family declared once with HELP and TYPE before it, names and labels
    /// are valid, values parse. (`promtool check metrics` does this too, in
    /// the integration test.)
    fn check_exposition(text: &str) {
        let mut declared: Vec<(String, String)> = Vec::new();
        let mut helped: Vec<String> = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!helped.contains(&name.to_owned()), "HELP twice: {name}");
                helped.push(name.to_owned());
                continue;
            }
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let mut w = rest.split(' ');
                let (name, ty) = (w.next().unwrap(), w.next().unwrap());
                assert!(
                    helped.last().is_some_and(|h| h == name),
                    "TYPE without HELP: {l}"
                );
                assert!(!declared.iter().any(|d| d.0 == name), "TYPE twice: {name}");
                declared.push((name.to_owned(), ty.to_owned()));
                continue;
            }
            assert!(!l.starts_with('#'), "stray comment {l:?}");
            let (series, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name {name}"
            );
            let (fam, ty) = declared.last().expect("sample before any TYPE");
            let ok = match ty.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{fam}{s}")),
                _ => name == fam,
            };
            assert!(ok, "sample {name} outside its family {fam}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{l}");
                }
            }
        }
    }

    fn destination(id: &str) -> MigrationStatus {
        MigrationStatus {
            phase: Phase::Hydrating,
            role: "destination".into(),
            peer: "127.0.0.1:1".into(),
            region_size: 65536,
            regions_total: 100,
            regions_present: 40,
            bytes_on_demand: 1 << 20,
            bytes_background: 3 << 20,
            bytes_skipped: 2 << 20,
            rate_limit: 4 << 20,
            rate: 1000,
            handoff_after_seconds: Some(1.0),
            ..MigrationStatus::unknown("vm1", id)
        }
    }

    #[test]
    fn histogram_buckets_are_le_and_cumulative_in_the_text() {
        let m = NodeMetrics::default();
        let nbd = m.nbd();
        // 10 µs is the first bound: counted in it (le), 11 µs in the next.
        nbd.request_done(Command::Read, 4096, Duration::from_micros(10));
        nbd.request_done(Command::Read, 4096, Duration::from_micros(11));
        nbd.request_done(Command::Read, 8192, Duration::from_secs(100));
        let text = m.render(Snapshot::default()).unwrap();
        check_exposition(&text);
        let s = |le: &str| {
            value(
                &text,
                &format!(
                    "dlsm_nbd_request_duration_seconds_bucket{{command=\"read\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(s("1e-05"), Some(1.0), "{text}");
        assert_eq!(s("2.5e-05"), Some(2.0));
        assert_eq!(s("10"), Some(2.0));
        assert_eq!(s("+Inf"), Some(3.0));
        let count = "dlsm_nbd_request_duration_seconds_count{command=\"read\"}";
        assert_eq!(value(&text, count), Some(3.0));
        let sum = value(
            &text,
            "dlsm_nbd_request_duration_seconds_sum{command=\"read\"}",
        )
        .unwrap();
        assert!((sum - 100.000021).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(&text, "dlsm_nbd_requests_total{command=\"read\"}"),
            Some(3.0)
        );
        assert_eq!(
            value(&text, "dlsm_nbd_bytes_total{command=\"read\"}"),
            Some(16384.0)
        );
        // Every command is listed from the start, at zero.
        assert_eq!(
            value(&text, "dlsm_nbd_requests_total{command=\"write_zeroes\"}"),
            Some(0.0)
        );
    }

    #[test]
    fn errors_appear_once_they_happen_and_connections_come_and_go() {
        let m = NodeMetrics::default();
        let nbd = m.nbd();
        let text = m.render(Snapshot::default()).unwrap();
        assert!(!text.contains("dlsm_nbd_errors_total{"), "{text}");
        let c1 = nbd.connection();
        let c2 = nbd.connection();
        nbd.request_refused(Command::Write);
        nbd.error(Command::Write, errno::EPERM);
        nbd.error(Command::Write, errno::EPERM);
        nbd.error(Command::Unknown(99), errno::EINVAL);
        nbd.error(Command::Read, 4242);
        let text = m.render(Snapshot::default()).unwrap();
        check_exposition(&text);
        let err = |c: &str, e: &str| {
            value(
                &text,
                &format!("dlsm_nbd_errors_total{{command=\"{c}\",errno=\"{e}\"}}"),
            )
        };
        assert_eq!(err("write", "EPERM"), Some(2.0), "{text}");
        assert_eq!(err("unknown", "EINVAL"), Some(1.0));
        assert_eq!(err("read", "other"), Some(1.0));
        assert_eq!(
            value(&text, "dlsm_nbd_requests_total{command=\"write\"}"),
            Some(1.0)
        );
        assert_eq!(value(&text, "dlsm_nbd_connections"), Some(2.0));
        drop((c1, c2));
        let text = m.render(Snapshot::default()).unwrap();
        assert_eq!(value(&text, "dlsm_nbd_connections"), Some(0.0));
    }

    #[test]
    fn migrations_render_with_their_phase_counters_and_fetch_latency() {
        let m = NodeMetrics::default();
        let fetch = Arc::new(FetchMetrics::default());
        fetch.record(OriginRead::Background, Duration::from_millis(3), true);
        fetch.record(OriginRead::OnDemand, Duration::from_millis(1), true);
        let snap = Snapshot {
            volumes: 2,
            migrations: vec![
                MigrationSample::Destination {
                    status: Box::new(destination("00aa")),
                    fetch: Some(fetch.clone()),
                },
                MigrationSample::Source {
                    volume: "vm1".into(),
                    id: "00bb".into(),
                    phase: Phase::Passthrough,
                },
            ],
        };
        let text = m.render(snap.clone()).unwrap();
        check_exposition(&text);
        let d = "volume=\"vm1\",role=\"destination\",id=\"00aa\"";
        let s = "volume=\"vm1\",role=\"source\",id=\"00bb\"";
        assert_eq!(value(&text, "dlsm_volumes"), Some(2.0));
        let phase =
            |l: &str, p: &str| value(&text, &format!("dlsm_migration_phase{{{l},phase=\"{p}\"}}"));
        assert_eq!(phase(d, "hydrating"), Some(1.0), "{text}");
        assert_eq!(phase(d, "passthrough"), Some(0.0));
        assert_eq!(phase(s, "passthrough"), Some(1.0));
        assert_eq!(phase(s, "hydrating"), Some(0.0));
        let v = |name: &str| value(&text, &format!("{name}{{{d}}}"));
        assert_eq!(v("dlsm_migration_regions"), Some(100.0));
        assert_eq!(v("dlsm_migration_regions_present"), Some(40.0));
        assert_eq!(
            v("dlsm_migration_background_bytes_total"),
            Some(3.0 * 1048576.0)
        );
        assert_eq!(v("dlsm_migration_on_demand_bytes_total"), Some(1048576.0));
        assert_eq!(
            v("dlsm_migration_skipped_bytes_total"),
            Some(2.0 * 1048576.0)
        );
        assert_eq!(v("dlsm_migration_rate_bytes_per_second"), Some(1000.0));
        assert_eq!(v("dlsm_migration_source_reachable"), Some(1.0));
        // The source reports its phase only.
        assert_eq!(
            value(&text, &format!("dlsm_migration_regions{{{s}}}")),
            None
        );
        let fetched = |k: &str| {
            value(
                &text,
                &format!("dlsm_migration_fetch_duration_seconds_count{{{d},kind=\"{k}\"}}"),
            )
        };
        assert_eq!(fetched("background"), Some(1.0));
        assert_eq!(fetched("on_demand"), Some(1.0));
        assert_eq!(fetched("passthrough"), Some(0.0));

        // A failed read turns the reachability gauge to 0 and is not timed.
        fetch.record(OriginRead::OnDemand, Duration::from_secs(30), false);
        let text = m.render(snap).unwrap();
        assert_eq!(
            value(&text, &format!("dlsm_migration_source_reachable{{{d}}}")),
            Some(0.0)
        );
        assert_eq!(fetch.reads(OriginRead::OnDemand), 1);
    }

    #[test]
    fn a_node_without_migrations_lists_no_migration_families() {
        let text = NodeMetrics::default().render(Snapshot::default()).unwrap();
        check_exposition(&text);
        assert!(!text.contains("dlsm_migration_"), "{text}");
        assert!(text.contains("# TYPE dlsm_volumes gauge"));
    }

    #[test]
    fn statm_is_read_in_pages() {
        assert_eq!(
            parse_statm("1000 250 100 10 0 300 0\n", 4096),
            Some((250 * 4096, 1000 * 4096))
        );
        assert_eq!(parse_statm("", 4096), None);
        assert_eq!(parse_statm("12 x", 4096), None);
    }

    #[test]
    fn process_collector_reads_this_process() {
        let p = ProcessCollector::default();
        let (rss, virt) = p.memory().expect("statm readable");
        assert!(rss > 0 && virt >= rss, "rss {rss} virt {virt}");
        // Files opened here show up one for one (other tests' threads may
        // open files meanwhile, so a few more are tolerated, never fewer).
        let before = p.open_fds().unwrap();
        let files: Vec<std::fs::File> = (0..5)
            .map(|_| std::fs::File::open("/proc/self/statm").unwrap())
            .collect();
        let during = p.open_fds().unwrap();
        drop(files);
        assert!(during >= before + 5, "{before} -> {during}");
        assert!(during < before + 5 + 64, "{before} -> {during}");

        let text = NodeMetrics::default().render(Snapshot::default()).unwrap();
        check_exposition(&text);
        let v = |n: &str| value(&text, n).unwrap_or_else(|| panic!("no {n} in {text}"));
        assert!(v("process_resident_memory_bytes") > 1e6);
        assert!(v("process_open_fds") >= 3.0);
        assert!(v("process_max_fds") >= v("process_open_fds"));
    }

    #[test]
    fn process_collector_leaves_out_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = ProcessCollector {
            proc_dir: dir.path().to_owned(),
        };
        assert_eq!(p.memory(), None);
        assert_eq!(p.open_fds(), None);
        std::fs::write(dir.path().join("statm"), "10 5 0 0 0 0 0\n").unwrap();
        assert_eq!(p.memory(), Some((5 * page_size(), 10 * page_size())));
    }
}
