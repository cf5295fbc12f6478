//! The control API's request and response types: the one definition the
//! server (`node::api`, `node::migration`), the CLI, the peer client, the
//! fuzz targets and the tests all use. Changing a field here changes the
//! wire format; every field added later is `#[serde(default)]` so that
//! nodes of different versions still understand each other.

use serde::{Deserialize, Serialize};

use crate::node::store::{Outgoing, PendingRelease, TargetSpec};

// ---- node and volumes -------------------------------------------------

/// What the API says about a node.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// This node's identity: random, made once per data directory. Two
    /// addresses that answer with the same id are the same node.
    #[serde(default)]
    pub id: String,
    /// The API address other nodes reach this node by.
    #[serde(default)]
    pub api: String,
    pub version: String,
    pub nbd: Option<String>,
    pub nbd_unix: Option<String>,
    /// Dashboard event streams open now (`GET /v1/events`).
    #[serde(default)]
    pub dashboard_subscribers: usize,
    /// Where the vhost-user-blk sockets are (`--vhost-user-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user_dir: Option<String>,
    /// Cluster mode: the node's place in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<NodeClusterInfo>,
}

/// What `node info` says of a node in a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeClusterInfo {
    /// The cluster's id (etcd's `cluster` key, also in `DATA_DIR/cluster-id`).
    #[serde(default)]
    pub id: String,
    /// The etcd endpoint the node uses now (the last that answered).
    pub etcd: String,
    /// Its lease (0: none, being replaced).
    pub lease: i64,
    /// The lease's granted TTL, seconds.
    pub lease_ttl_seconds: u64,
    /// Whether the node may acknowledge writes to its cluster volumes now.
    pub lease_valid: bool,
}

/// What the API says about a volume.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub table: TargetSpec,
    pub allocated_bytes: u64,
    pub connections: usize,
    /// `nbd://HOST:PORT/NAME`, when the node listens on TCP.
    pub uri: Option<String>,
    /// The volume's vhost-user-blk socket, when the node serves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user_socket: Option<String>,
    /// Set when this node handed the volume off (writes refused).
    #[serde(default)]
    pub fenced_to: Option<String>,
    /// The migration it was handed off in (with `fenced_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_for: Option<String>,
    /// The migration taking the volume away from this node, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<Outgoing>,
    /// The source copy this node still has to tell to release itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_pending: Option<PendingRelease>,
    /// Cluster mode: the node that owns the volume (its directory record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Cluster mode: the record's generation (1 at create, one more at
    /// every change of owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    /// Cluster mode: the node to create it on (any node forwards the
    /// request there); default: the node asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
}

/// `node list` (`GET /v1/cluster/nodes`): one member of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: String,
    /// `up` (its lease is alive) or `down`.
    pub state: String,
    pub nbd: Option<String>,
    pub api: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user_dir: Option<String>,
    /// The running version (up nodes only).
    #[serde(default)]
    pub version: Option<String>,
    /// Volumes it owns.
    pub volumes: u64,
    /// When it first joined.
    pub joined: String,
}

/// `volume list` in cluster mode (`GET /v1/cluster/volumes`): one volume
/// of the directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterVolume {
    pub name: String,
    pub size: u64,
    /// The node that owns it.
    pub node: String,
    pub generation: u64,
    /// `ok` (its node is up under the lease the record names),
    /// `migrating` (up, with a migration recorded) or `unavailable` (that
    /// lease is gone: the node is down, or has not re-confirmed it yet).
    pub state: String,
    #[serde(default)]
    pub migration: Option<serde_json::Value>,
}

/// Query of `DELETE /v1/volumes/{name}`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Remove even what clients or a migration still need.
    #[serde(default)]
    pub force: bool,
}

// ---- migrations: status --------------------------------------------

/// Where a migration is, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    Passthrough,
    Hydrating,
    Complete,
    Failed,
    /// Cancelled before handoff: the source kept the volume.
    Cancelled,
}

impl Phase {
    /// The name the API, the CLI and the docs use (`passthrough`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Passthrough => "passthrough",
            Phase::Hydrating => "hydrating",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Whether the migration is over (it is then only in the history).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Complete | Phase::Failed | Phase::Cancelled)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `dlsm migration status`: what either node reports about a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub volume: String,
    /// The migration's identity (16 hex digits; empty for migrations
    /// started before identities existed).
    #[serde(default)]
    pub id: String,
    pub phase: Phase,
    /// `destination` or `source`: which node answered.
    pub role: String,
    /// The other node's API address.
    pub peer: String,
    pub region_size: u64,
    pub regions_total: u64,
    pub regions_present: u64,
    pub bytes_on_demand: u64,
    pub bytes_background: u64,
    pub bytes_skipped: u64,
    /// Background copy limit, bytes/s (0: unlimited).
    pub rate_limit: u64,
    /// Measured background copy rate over the last seconds, bytes/s.
    pub rate: u64,
    pub eta_seconds: Option<f64>,
    pub paused: bool,
    /// Why the background copy is waiting on its own (not paused by an
    /// operator), e.g. the destination's disk is full. It resumes by itself
    /// when the cause goes away.
    #[serde(default)]
    pub stalled: Option<String>,
    /// Seconds from prepare to handoff, once handed off.
    pub handoff_after_seconds: Option<f64>,
    /// Seconds from handoff to completion, once complete.
    pub hydrate_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// How the migration ended, for one that did (from the node's history:
    /// "complete", "cancelled by the operator", "volume removed"...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// When it ended, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// This migration rolls back that one (it brings the volume back to
    /// the node it left, and only what was written meanwhile crosses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
}

impl MigrationStatus {
    /// A status with nothing known but the volume and the migration
    /// (counters zero, phase `preparing`): the base of what a source
    /// reports when its destination cannot tell it more.
    pub fn unknown(volume: &str, id: &str) -> Self {
        Self {
            volume: volume.to_owned(),
            id: id.to_owned(),
            phase: Phase::Preparing,
            role: String::new(),
            peer: String::new(),
            region_size: 0,
            regions_total: 0,
            regions_present: 0,
            bytes_on_demand: 0,
            bytes_background: 0,
            bytes_skipped: 0,
            rate_limit: 0,
            rate: 0,
            eta_seconds: None,
            paused: false,
            stalled: None,
            handoff_after_seconds: None,
            hydrate_seconds: None,
            last_error: None,
            ended: None,
            ended_at: None,
            rollback_of: None,
        }
    }
}

/// Query of `GET /v1/migrations/{name}`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// `source` or `destination`: which side of a node that is both (the
    /// middle of a chain); by default the destination's.
    #[serde(default)]
    pub role: Option<String>,
}

/// Query of the steering calls (`pause`, `resume`, `rate`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerQuery {
    /// The migration meant; refused (409) if the node holds another.
    #[serde(default)]
    pub id: Option<String>,
}

/// What a destination knows of one migration (`GET
/// /v1/migrations/{name}/state?id=ID`): how a source that restarted, or
/// lost track, learns whether it still owns the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// The destination holds the clone of this migration, not handed off:
    /// the source still owns the volume.
    Passthrough,
    /// The volume was handed off to the destination in this migration
    /// (hydrating, complete, or moved on from there): the source must
    /// refuse writes.
    HandedOff,
    /// The destination has no record of this migration.
    Unknown,
}

/// Query of `GET /v1/migrations/{name}/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateQuery {
    pub id: String,
}

// ---- migrations: operator and node-to-node calls --------------------

/// Body of `POST /v1/volumes/{name}/migrate` (to the source).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination node's API address; in cluster mode, for a cluster
    /// volume, the destination node's name.
    pub to: String,
    #[serde(default)]
    pub region_size: Option<u64>,
    #[serde(default)]
    pub rate: Option<u64>,
    #[serde(default)]
    pub keep_source: bool,
}

/// Body of `POST /v1/migrations` (source to destination).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    pub name: String,
    /// The migration's identity, made by the source.
    pub id: String,
    pub size: u64,
    pub origin_nbd: String,
    pub origin_api: String,
    pub region_size: u64,
    #[serde(default)]
    pub rate: u64,
    /// A rollback: the destination already has the volume from migration
    /// `rollback_of` (it was that migration's source, and is fenced with
    /// its copy); only the regions written since cross back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
    /// The source node's identity ([`NodeInfo::id`]): a node refuses to
    /// prepare a migration from itself, whatever address it was named by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_node: Option<String>,
    /// Cluster mode: the directory record's generation when the migration
    /// started (the fencing token); absent for a peer-mode volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// Body of `POST /v1/migrations/{name}/rollback` (to the destination of
/// a handed-off migration; from its source's cancel, or an operator).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The migration to roll back; any other is refused (409).
    #[serde(default)]
    pub id: Option<String>,
}

/// What the destination sends a rollback's new destination (the old
/// source) at its handoff: the regions written since the first handoff.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrittenSet {
    pub region_size: u64,
    /// Runs `[first, count]` of written regions, in order.
    pub runs: Vec<(u64, u64)>,
}

/// Body of `POST /v1/volumes/{name}/fence` (destination to source).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FenceRequest {
    /// The destination's API address (recorded as who the volume went to).
    pub to: String,
    /// The migration the destination holds; the source fences only for
    /// its own outgoing migration.
    pub id: String,
    /// Cluster mode: the caller's generation of the volume (the fencing
    /// token); a caller behind the callee's is refused as stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// Body of `POST /v1/volumes/{name}/release` (destination to source).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The migration that completed; the source releases only the copy
    /// it handed off in that migration.
    pub id: String,
    /// The destination's final status of that migration, for the
    /// source's history (absent from older nodes and from a middle node
    /// of a chain releasing its origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<MigrationStatus>>,
    /// Cluster mode: the caller's generation (see [`FenceRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// Body of `POST /v1/migrations/{name}/handoff`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandoffRequest {
    #[serde(default)]
    pub force: bool,
    /// Set by a source (its last writer left): the migration it means.
    #[serde(default)]
    pub id: Option<String>,
}

/// Body of `POST /v1/migrations/{name}/cancel` (operator, on either node;
/// or a destination passing it on to its source).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The destination cannot be reached: forget the migration anyway.
    #[serde(default)]
    pub force: bool,
    /// Set when a destination passes an operator's cancel on to its
    /// source: cancel only this node's outgoing migration `id` (404 if it
    /// has none), never anything else of the volume here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Body of `POST /v1/migrations/{name}/drop` (source to destination: a
/// cancelled migration's clone, before handoff).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropRequest {
    pub id: String,
    /// Cluster mode: the caller's generation (see [`FenceRequest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// Body of `POST /v1/migrations/{name}/rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateRequest {
    pub rate: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_print_as_serde_spells_them() {
        for p in [
            Phase::Preparing,
            Phase::Passthrough,
            Phase::Hydrating,
            Phase::Complete,
            Phase::Failed,
            Phase::Cancelled,
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
    }
}
