//! Cluster mode (issue 13, `dlsm serve --node NAME --cluster-etcd URL,...`):
//! etcd decides who owns a volume; the data never goes through etcd.
//!
//! What this module owns:
//! - the node's membership: one etcd lease per node, `members/NAME`
//!   (permanent) and `nodes/NAME` (under the lease: present = up), the
//!   lease's renewal and its deadline on the node's own monotonic clock
//!   ([`LeaseClock`], [`Cluster::lease_valid_now`]);
//! - the directory: one record per volume at `volumes/NAME` (owner, size,
//!   generation) and its index `by-node/NODE/NAME`, changed only by
//!   compare-and-swap transactions;
//! - the one etcd client of the node ([`etcd`]): a client per endpoint,
//!   pinned to the last one that answered, every call under its own
//!   deadline.
//!
//! What it must never do: put a volume's bytes, or anything on the data
//! path, through etcd; block a request thread on etcd without a deadline;
//! let a change of ownership happen except by a transaction that compares
//! what it read (a record's `mod_revision`, a node's lease), since that
//! comparison is what makes two owners impossible. Peer mode (no
//! `--cluster-etcd`) never reaches this module: nothing here runs, and a
//! build without the `cluster` feature (no `protoc` needed) keeps every
//! type of this file but none of the etcd code.
//!
//! Keys, all under [`PREFIX`]: `members/NAME` ([`MemberRecord`]),
//! `nodes/NAME` ([`NodeRecord`], under the node's lease), `volumes/NAME`
//! ([`VolumeRecord`]), `by-node/NODE/NAME` (the generation, as text).
//! Layout and reasoning: DESIGN.md, "A cluster on etcd (issue 13)".

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "cluster")]
pub mod directory;
#[cfg(feature = "cluster")]
pub mod etcd;
#[cfg(feature = "cluster")]
pub mod member;
#[cfg(feature = "cluster")]
pub mod ownership;

#[cfg(feature = "cluster")]
pub use member::Cluster;

/// Every key dlsm writes in etcd starts with this (a versioned layout, so a
/// later one can live beside it).
pub const PREFIX: &str = "/dlsm/v1/";

/// `cluster`: the cluster's identity, made once by the first node to join.
pub fn cluster_key() -> String {
    format!("{PREFIX}cluster")
}

/// `members/NAME`.
pub fn member_key(name: &str) -> String {
    format!("{PREFIX}members/{name}")
}

/// `nodes/NAME` (under the node's lease).
pub fn node_key(name: &str) -> String {
    format!("{PREFIX}nodes/{name}")
}

/// `volumes/NAME`.
pub fn volume_key(name: &str) -> String {
    format!("{PREFIX}volumes/{name}")
}

/// `by-node/NODE/NAME`: the index of the volumes a node owns.
pub fn by_node_key(node: &str, volume: &str) -> String {
    format!("{PREFIX}by-node/{node}/{volume}")
}

/// `by-node/NODE/`: the prefix counted by `node list`.
pub fn by_node_prefix(node: &str) -> String {
    format!("{PREFIX}by-node/{node}/")
}

/// How a node joins a cluster (`serve --cluster-etcd`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://HOST:PORT`, `https://...`, or `HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The lease TTL asked for (`--cluster-lease-ttl`); etcd may grant
    /// more (never less than 2 s), and the granted TTL is what counts.
    pub lease_ttl: Duration,
    /// For `https://` endpoints: `ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem` (the node's `--tls-dir`).
    pub tls_dir: Option<PathBuf>,
}

/// What a build without the `cluster` feature says when asked to join.
pub const NO_CLUSTER_BUILD: &str = "this dlsm was built without cluster support: \
     --cluster-etcd needs a build with `--features cluster` (cargo build --release \
     --features cluster; its etcd client needs protoc: apt-get install protobuf-compiler \
     libprotobuf-dev)";

/// The default `--cluster-lease-ttl`, seconds.
pub const DEFAULT_LEASE_TTL: u64 = 10;

/// Errors of the cluster boundary; mapped to HTTP statuses once, in
/// `node::api`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// Peer mode, or a build without the `cluster` feature.
    #[error("{0}")]
    NotInCluster(String),
    /// No etcd endpoint answered in time.
    #[error("cluster state unavailable: {0}")]
    Unavailable(String),
    /// Another live process holds the node name.
    #[error(
        "node name {name:?} is already up in the cluster, held by another dlsm process \
         (data directory id {holder}, ours is {ours}; API {api}): stop that node or pick \
         another --node"
    )]
    NameTaken {
        name: String,
        holder: String,
        ours: String,
        api: String,
    },
    /// The member was made by another data directory, which still owns volumes.
    #[error(
        "node name {name:?} belongs to another data directory (id {holder}, ours is {ours}) \
         that owns {volumes} volume(s) in the cluster: start that directory under this \
         name, or pick another --node"
    )]
    MemberOfAnotherDir {
        name: String,
        holder: String,
        ours: String,
        volumes: i64,
    },
    #[error("volume {name:?} already exists in the cluster (on node {owner})")]
    VolumeExists { name: String, owner: String },
    #[error("no volume named {0:?} in the cluster")]
    NoSuchVolume(String),
    #[error("no node named {0:?} in the cluster")]
    NoSuchNode(String),
    #[error("node {0:?} is down (no live lease in etcd)")]
    NodeDown(String),
    /// This node's lease is not (or no longer) the one in etcd.
    #[error("this node's cluster lease is not current (lost or being renewed): try again")]
    LeaseLost,
    /// A record changed between its read and the transaction.
    #[error("{0}: changed concurrently, try again")]
    Conflict(String),
    /// A record that does not parse.
    #[error("bad record at {key}: {why}")]
    Corrupt { key: String, why: String },
    /// The request names the wrong node (a stale address, a mistake).
    #[error("{0}")]
    WrongNode(String),
    /// The data directory was made in another cluster (its `cluster-id`
    /// file names another id than this etcd's `cluster` key).
    #[error(
        "this data directory belongs to dlsm cluster {ours}, but the etcd at the given \
         endpoints holds cluster {theirs}"
    )]
    OtherCluster { ours: String, theirs: String },
    /// The data directory was made in a cluster, and this etcd holds none
    /// (empty, or restored without dlsm's keys).
    #[error(
        "this data directory belongs to dlsm cluster {ours}, but the etcd at the given \
         endpoints holds no dlsm cluster (empty, or not the cluster's etcd)"
    )]
    NoCluster { ours: String },
    /// A call forwarded to another node failed there (its status kept).
    #[error("node {node}: {message}")]
    Forwarded {
        node: String,
        status: Option<u16>,
        message: String,
    },
}

/// `cluster`: which cluster this etcd holds. A node records the id in its
/// data directory at its first join and refuses, from then on, an etcd
/// holding another one: pointed at the wrong etcd (or a fresh one after a
/// disaster) it would find none of its records and hold every copy as an
/// orphan, one `volume rm` away from deleting them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub v: u32,
    /// 64 random bits, hex.
    pub id: String,
    pub created: String,
}

/// `members/NAME`: the node exists in the cluster (up or down). Written at
/// every start; never under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub v: u32,
    pub name: String,
    /// The data directory's id (`DATA_DIR/node-id`).
    pub dir_id: String,
    pub nbd: Option<String>,
    pub api: String,
    #[serde(default)]
    pub vhost_user_dir: Option<String>,
    /// When it first joined (RFC 3339, UTC).
    pub joined: String,
    /// The lease TTL this node was granted, seconds (0: unknown, an older
    /// record). A takeover waits at least this long after the node's lease
    /// is gone (see `Cluster::source_lease_gone`).
    #[serde(default)]
    pub lease_ttl: u64,
}

/// `nodes/NAME`: the node is up, and where to reach it. Under its lease, so
/// it disappears when the node stops renewing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub v: u32,
    pub name: String,
    pub dir_id: String,
    pub nbd: Option<String>,
    pub api: String,
    #[serde(default)]
    pub vhost_user_dir: Option<String>,
    pub version: String,
    /// The host and the (canonical) data directory path of the process
    /// holding the name: a key with our `dir_id` is our previous run only
    /// if these are ours too (the directory's lock then proves that run is
    /// gone); a copied directory elsewhere is another live process.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub data_dir: String,
}

/// `volumes/NAME`: the directory record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub v: u32,
    pub name: String,
    pub size: u64,
    /// The node that owns the volume (holds its data and answers writes).
    pub owner: String,
    /// The owner's lease when the record last named it.
    pub owner_lease: i64,
    /// 1 at create; one more at every change of owner (the fencing token).
    pub generation: u64,
    /// This incarnation of the name (random, 16 hex digits): tells a
    /// create whose answer was lost, found on a retry, from someone
    /// else's.
    pub id: String,
    /// The migration in progress, if any (set by its source when it
    /// starts, moved on by its destination's handoff, cleared at
    /// completion or by a cancel).
    #[serde(default)]
    pub migration: Option<MigrationRecord>,
    /// What the owner's table is, in short (the stack itself stays on the
    /// node): written at create, handoff and completion.
    #[serde(default)]
    pub table: Option<TableSummary>,
    pub created: String,
    pub changed: String,
}

/// [`VolumeRecord::table`]: the kind of the owner's top target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSummary {
    /// `local` (a file on the owner) or `clone` (hydrating from the
    /// migration's source).
    pub kind: String,
    /// A clone's region size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_size: Option<u64>,
}

impl TableSummary {
    pub fn local() -> Self {
        TableSummary {
            kind: "local".into(),
            region_size: None,
        }
    }
}

/// The `migration` of a [`VolumeRecord`]: the one migration of the volume
/// the directory knows, with its identity. Only a destination named here,
/// for this `id`, can take the volume (the handoff's compare-and-swap
/// checks it), so clearing it (a cancel) disarms any clone of it for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The migration's identity (the same id the nodes' calls carry).
    pub id: String,
    /// Source node.
    pub from: String,
    /// Destination node.
    pub to: String,
    /// `passthrough` (the source owns the volume) or `hydrating` (handed
    /// off: the destination owns it and copies the rest).
    pub phase: String,
    /// The record's generation when the migration started: the handoff
    /// moves it to `started_gen + 1`.
    pub started_gen: u64,
    #[serde(default)]
    pub keep_source: bool,
    /// False after a takeover (the source's lease had expired; it is
    /// fenced when it returns, before anything is read from it).
    #[serde(default = "yes")]
    pub source_fenced: bool,
}

fn yes() -> bool {
    true
}

/// Now, RFC 3339 in UTC with seconds (`2026-11-26T11:00:00Z`): enough for
/// records people read; nothing compares these times.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `CLOCK_BOOTTIME`, nanoseconds: monotonic (a wall-clock step does not
/// move it), and unlike `Instant`'s `CLOCK_MONOTONIC` it counts a host
/// suspend, so a suspended node cannot believe its lease younger than
/// etcd does.
pub fn boottime_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    let t = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME is always readable");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The node's lease as the node itself may rely on it: valid until a
/// deadline on its own [`boottime_ns`] clock, `s + T - m`, where `s` was
/// read before the grant or renewal request left and `T` is the granted
/// TTL. etcd keeps the lease at least until `r + T` on its leader's clock
/// (`r` ≥ `s` the arrival of the request), so the node's deadline comes
/// first unless the clocks' rates differ by more than `m / T` (DESIGN.md,
/// "The ownership lease"). Lock-free: read on every fenced write.
#[derive(Debug)]
pub struct LeaseClock {
    /// Deadline, boottime nanoseconds; 0 = not valid.
    deadline: std::sync::atomic::AtomicU64,
    ttl: Duration,
    margin: Duration,
}

impl LeaseClock {
    /// A clock for a granted TTL; not valid until [`Self::confirmed`].
    pub fn new(ttl: Duration) -> Self {
        LeaseClock {
            deadline: 0.into(),
            ttl,
            margin: Self::margin_for(ttl),
        }
    }

    /// `m = max(1 s, T / 5)`: covers an old etcd leader renewing for one
    /// election timeout (1 s) and clock-rate differences of up to 20%.
    pub fn margin_for(ttl: Duration) -> Duration {
        (ttl / 5).max(Duration::from_secs(1)).min(ttl)
    }

    /// How often to renew: four tries fit in the lease's trusted life.
    pub fn renew_every(&self) -> Duration {
        ((self.ttl - self.margin) / 4).max(Duration::from_millis(250))
    }

    /// How long one renewal may take before the next endpoint is tried.
    pub fn attempt_timeout(&self) -> Duration {
        self.renew_every().min(Duration::from_millis(1500))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// etcd confirmed the lease for a request sent at `sent_at`
    /// (boottime ns). A late answer to an older request never moves the
    /// deadline back, nor forward past what its own send time allows.
    pub fn confirmed(&self, sent_at: u64) {
        let d = sent_at + (self.ttl - self.margin).as_nanos() as u64;
        self.deadline
            .fetch_max(d, std::sync::atomic::Ordering::AcqRel);
    }

    /// The lease is gone (etcd said so, or the node is leaving).
    pub fn invalidate(&self) {
        self.deadline.store(0, std::sync::atomic::Ordering::Release);
    }

    /// Whether the node may act as the lease's holder now.
    pub fn valid_at(&self, now: u64) -> bool {
        now < self.deadline.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn valid_now(&self) -> bool {
        self.valid_at(boottime_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_counts_from_before_the_request() {
        let c = LeaseClock::new(Duration::from_secs(10));
        assert!(!c.valid_at(0), "valid before any confirmation");
        let s = 5_000_000_000;
        c.confirmed(s);
        // s + T - m = 5 + 10 - 2 = 13 s.
        assert!(c.valid_at(12_999_999_999));
        assert!(!c.valid_at(13_000_000_000));
        // An answer to an older request does not shorten it.
        c.confirmed(1_000_000_000);
        assert!(c.valid_at(12_999_999_999));
        c.invalidate();
        assert!(!c.valid_at(s));
    }

    #[test]
    fn margin_and_period_follow_the_ttl() {
        let c = LeaseClock::new(Duration::from_secs(10));
        assert_eq!(
            LeaseClock::margin_for(Duration::from_secs(10)),
            Duration::from_secs(2)
        );
        assert_eq!(c.renew_every(), Duration::from_secs(2));
        assert_eq!(c.attempt_timeout(), Duration::from_millis(1500));
        assert_eq!(
            LeaseClock::margin_for(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            LeaseClock::margin_for(Duration::from_secs(60)),
            Duration::from_secs(12)
        );
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_ns();
        std::thread::sleep(Duration::from_millis(5));
        assert!(boottime_ns() >= a + 5_000_000);
    }

    #[test]
    fn dates_are_rfc3339() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && s.as_bytes()[10] == b'T');
    }
}
