//! A migration of a cluster volume: the directory's part of each step, so
//! that `node::migration` (the peer-to-peer protocol, unchanged) stays one
//! flow for both modes.
//!
//! | step (`node::migration`) | here | directory |
//! |---|---|---|
//! | `migrate` at the source | [`start`] | `migration {id, from, to}` recorded, by the owner |
//! | `prepare` at the destination | [`check_prepare`] | read: this migration, to this node, at this generation |
//! | the clone's handoff | `NodeHooks::claim_ownership` | owner := destination, generation + 1 |
//! | a takeover (source gone) | `NodeHooks::may_take_over` | the source's lease checked, then as handoff |
//! | completion (the release loop) | [`complete`] | `migration: null` |
//! | `cancel` at the source | [`forget`] | `migration: null`, before the destination is asked |
//!
//! What this module must never do: let a node act as owner of a cluster
//! volume on anything but the directory's word, or skip the directory for
//! a cluster volume because etcd is slow (a step that cannot reach it
//! fails, and is retried or refused; it never goes ahead without it).
//! A peer-mode volume (generation 0) never gets here.

use std::sync::Arc;

use super::migration::MigrationError;
use super::store::Volume;
use super::NodeState;
use crate::api::types::PrepareRequest;

/// The caller of a node-to-node call about a cluster volume is behind:
/// it names an older generation than this node's copy has (a clone of an
/// earlier migration, a node that was deposed). The generation is the
/// fencing token: such a call is refused whatever its migration id.
pub fn check_generation(vol: &Volume, caller: Option<u64>) -> Result<(), MigrationError> {
    let mine = vol.table().generation;
    match caller {
        Some(g) if g < mine => Err(MigrationError::Conflict(format!(
            "volume {:?}: the call names generation {g}, this copy is at generation {mine}: \
             the caller is stale",
            vol.name
        ))),
        _ => Ok(()),
    }
}

/// Whether `vol` is a cluster volume on a node in a cluster (its
/// migrations go through the directory).
pub fn is_cluster_volume(state: &NodeState, vol: &Volume) -> bool {
    cluster_of(state).is_some() && vol.table().generation > 0
}

#[cfg(feature = "cluster")]
fn cluster_of(state: &NodeState) -> Option<&Arc<crate::cluster::Cluster>> {
    state.cluster.as_ref()
}

#[cfg(not(feature = "cluster"))]
fn cluster_of(_state: &NodeState) -> Option<&std::convert::Infallible> {
    None
}

/// Source: records migration `id` of `name` to node `to` in the directory
/// (this node must own the record under its lease). Returns the record's
/// generation, the token the migration's calls carry.
#[cfg(feature = "cluster")]
pub async fn start(
    state: &NodeState,
    name: &str,
    id: &str,
    to: &str,
    keep_source: bool,
) -> Result<u64, MigrationError> {
    let c = cluster_of(state).ok_or_else(|| not_in_cluster(name))?;
    Ok(c.start_migration(name, id, to, keep_source).await?)
}

#[cfg(not(feature = "cluster"))]
pub async fn start(
    _state: &NodeState,
    name: &str,
    _id: &str,
    _to: &str,
    _keep_source: bool,
) -> Result<u64, MigrationError> {
    Err(not_in_cluster(name))
}

/// The owner: clears migration `id` of `name` from the directory. `true`:
/// cleared (or not there); `false`: the directory names another owner now
/// (the volume was handed off). Peer mode: `true`.
#[cfg(feature = "cluster")]
pub async fn forget(state: &NodeState, name: &str, id: &str) -> Result<bool, MigrationError> {
    match cluster_of(state) {
        Some(c) => Ok(c.clear_migration(name, id).await?),
        None => Ok(true),
    }
}

#[cfg(not(feature = "cluster"))]
pub async fn forget(_state: &NodeState, _name: &str, _id: &str) -> Result<bool, MigrationError> {
    Ok(true)
}

/// Destination, after completion: the directory stops recording the
/// migration (before the source copy is released). Nothing for a
/// peer-mode volume.
pub async fn complete(state: &NodeState, vol: &Volume, id: &str) -> Result<(), MigrationError> {
    if !is_cluster_volume(state, vol) {
        return Ok(());
    }
    if forget(state, &vol.name, id).await? {
        Ok(())
    } else {
        Err(MigrationError::Conflict(format!(
            "volume {:?}: the cluster's directory names another owner than this node, which \
             completed migration {id}",
            vol.name
        )))
    }
}

/// Destination: a prepare for a cluster volume at generation `g` is
/// accepted only if the directory records this very migration to this
/// node, from the record's owner at `g`. Returns what the clone is made
/// with: the generation and the node's lease.
#[cfg(feature = "cluster")]
pub async fn check_prepare(
    state: &NodeState,
    req: &PrepareRequest,
    g: u64,
) -> Result<(u64, Arc<crate::cluster::LeaseClock>), MigrationError> {
    let c = cluster_of(state).ok_or_else(|| {
        MigrationError::Invalid(format!(
            "volume {:?} is a cluster volume: its destination must be a node of the same \
             cluster (this node was started without --cluster-etcd)",
            req.name
        ))
    })?;
    let rec = c.record(&req.name).await?;
    match rec {
        Some((r, _))
            if r.generation == g
                && r.migration
                    .as_ref()
                    .is_some_and(|m| m.id == req.id && m.to == c.name && m.from == r.owner) =>
        {
            Ok((g, c.clock()))
        }
        Some((r, _)) => Err(MigrationError::Conflict(format!(
            "volume {:?}: the cluster's directory does not record migration {} to this node \
             ({}) at generation {g}: it names owner {} at generation {}, migration {}",
            req.name,
            req.id,
            c.name,
            r.owner,
            r.generation,
            r.migration
                .as_ref()
                .map_or("none".to_owned(), |m| format!("{} to {}", m.id, m.to))
        ))),
        None => Err(crate::cluster::ClusterError::NoSuchVolume(req.name.clone()).into()),
    }
}

#[cfg(not(feature = "cluster"))]
pub async fn check_prepare(
    _state: &NodeState,
    req: &PrepareRequest,
    _g: u64,
) -> Result<(u64, Arc<crate::cluster::LeaseClock>), MigrationError> {
    Err(MigrationError::Invalid(format!(
        "volume {:?} is a cluster volume: {}",
        req.name,
        crate::cluster::NO_CLUSTER_BUILD
    )))
}

fn not_in_cluster(name: &str) -> MigrationError {
    MigrationError::Invalid(format!(
        "volume {name:?}: migrating by node name needs this node in a cluster"
    ))
}
