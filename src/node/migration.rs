//! Migration orchestration between nodes: what each node does, and says to
//! the other, for `dlsm migrate`.
//!
//! ```text
//!  CLI ──migrate──► source A: id := random; persist outgoing{to: B, id}
//!                   A ──POST /v1/migrations {id}──► destination B   (prepare: constant time)
//!  first write at B, A's last writer leaving (A asks B), or `migration handoff`:
//!                   B ──POST /v1/volumes/N/fence {id}──► A: refuse writes, finish admitted ones,
//!                                                         flush, persist fenced_for = id
//!                   B: mark A's zero ranges present, commit map, persist handed_off, hydrate
//!  all regions present at B:
//!                   B: table := local + release_pending{A, id} (one durable write)
//!                   B ──POST /v1/volumes/N/release {id}──► A: delete (or keep, fenced); until done
//! ```
//!
//! Every call between nodes names the migration (`id`); a node refuses a
//! call for any migration but its own (DESIGN invariant 7). Every step that
//! changes ownership is persisted by the node that makes it before it acts
//! on it, so a restart of either node keeps one writer; a source that
//! restarts unfenced holds writes until the destination tells it who owns
//! the volume ([`resume_all`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::{info, warn};

use super::store::{
    new_migration_id, update_table, HooksFactory, Outgoing, PendingRelease, RemoveMode, StoreError,
    TargetSpec, Volume, VolumeTable, ARRIVED_KEPT,
};
use super::NodeState;
use crate::api::peer::{Peer, PeerError};
use crate::api::types::{
    CancelRequest, DropRequest, FenceRequest, HandoffRequest, MigrateRequest, MigrationState,
    MigrationStatus, Phase, PrepareRequest, ReleaseRequest, RollbackRequest, WrittenSet,
};
use crate::api_client::{encode_segment, ApiAuth};
use crate::migrate::clone::{FenceError, MigrationHooks};
use crate::retry::Backoff;
use crate::target::BlockError;

/// Default region size: 64 KiB.
pub const DEFAULT_REGION_SIZE: u64 = 64 << 10;

/// Errors of migration orchestration; mapped to HTTP statuses in the API.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("volume {0:?} is not migrating on this node")]
    NotMigrating(String),
    #[error("{0}")]
    Conflict(String),
    /// A request that can never succeed as asked (bad argument).
    #[error("{0}")]
    Invalid(String),
    #[error("peer node: {0}")]
    Peer(String),
    /// The cluster's directory refused or could not be reached.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Block(#[from] BlockError),
}

impl From<PeerError> for MigrationError {
    fn from(e: PeerError) -> Self {
        MigrationError::Peer(e.to_string())
    }
}

/// The hooks a destination clone uses: fence the source over its API, and
/// persist the handoff in the volume's table.
pub struct NodeHooks {
    pub dir: PathBuf,
    pub table: Arc<Mutex<VolumeTable>>,
    /// This node's API address (the source records who it handed off to).
    pub me: String,
    pub timeout: Duration,
    /// Credentials for the source's API.
    pub auth: ApiAuth,
    /// Cluster mode: the node's membership, once joined (the directory's
    /// compare-and-swap at handoff, the takeover's lease check).
    pub cluster: super::ClusterSlot,
}

/// What the directory's steps of a clone's handoff need to know of it.
#[cfg(feature = "cluster")]
struct ClusterClone {
    cluster: Arc<crate::cluster::Cluster>,
    name: String,
    migration: String,
    region_size: u64,
}

impl NodeHooks {
    /// Cluster mode, a cluster volume: the node's membership, and the
    /// volume's name, migration and generation (0: a peer-mode volume,
    /// which never touches the directory).
    #[cfg(feature = "cluster")]
    fn cluster_clone(&self) -> Option<ClusterClone> {
        let cluster = self.cluster.get()?.clone();
        let t = self.table.lock().unwrap();
        match &t.target {
            TargetSpec::Clone {
                migration,
                region_size,
                ..
            } if t.generation > 0 => Some(ClusterClone {
                cluster,
                name: t.name.clone(),
                migration: migration.clone(),
                region_size: *region_size,
            }),
            _ => None,
        }
    }
}

#[async_trait]
impl MigrationHooks for NodeHooks {
    async fn fence_source(&self) -> Result<(), FenceError> {
        let (name, api, id) = {
            let t = self.table.lock().unwrap();
            match &t.target {
                TargetSpec::Clone {
                    origin, migration, ..
                } => match origin.as_ref() {
                    TargetSpec::Remote { api, .. } => {
                        (t.name.clone(), api.clone(), migration.clone())
                    }
                    _ => return Err(FenceError::Refused("clone origin is not remote".into())),
                },
                _ => return Err(FenceError::Refused("volume is not a clone".into())),
            }
        };
        let deadline = Instant::now() + self.timeout;
        let mut retry = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let req = FenceRequest {
                to: self.me.clone(),
                id: id.clone(),
                generation: Some(self.table.lock().unwrap().generation).filter(|g| *g > 0),
            };
            let path = format!("/v1/volumes/{}/fence", encode_segment(&name));
            let left = deadline.saturating_duration_since(Instant::now());
            let r = Peer::new(&api, &self.auth, left.max(Duration::from_millis(100)))
                .post::<serde_json::Value>(&path, &req)
                .await;
            match r {
                Ok(_) => return Ok(()),
                // The source answered, and said no: this migration is not
                // (or no longer) its outgoing one. Retrying cannot help.
                Err(e) if e.status() == Some(409) || e.status() == Some(404) => {
                    return Err(FenceError::Refused(format!(
                        "source {api} refused to fence for migration {id}: {e}"
                    )))
                }
                Err(e) if Instant::now() + retry.peek() > deadline => {
                    return Err(FenceError::Unreachable(format!(
                        "source {api} did not fence within {:?}: {e}",
                        self.timeout
                    )))
                }
                Err(e) => {
                    warn!(volume = %name, migration = %id, event = "fault", "fencing the source failed, retrying: {e}");
                    retry.wait().await;
                }
            }
        }
    }

    async fn written_at_source(&self) -> Result<Vec<(u64, u64)>, FenceError> {
        let (name, api, id, region_size) = {
            let t = self.table.lock().unwrap();
            match &t.target {
                TargetSpec::Clone {
                    origin,
                    migration,
                    region_size,
                    ..
                } => match origin.as_ref() {
                    TargetSpec::Remote { api, .. } => {
                        (t.name.clone(), api.clone(), migration.clone(), *region_size)
                    }
                    _ => return Err(FenceError::Refused("clone origin is not remote".into())),
                },
                _ => return Err(FenceError::Refused("volume is not a clone".into())),
            }
        };
        let path = format!(
            "/v1/migrations/{}/written?id={}",
            encode_segment(&name),
            encode_segment(&id)
        );
        let w = Peer::new(&api, &self.auth, self.timeout)
            .get::<WrittenSet>(&path)
            .await
            .map_err(|e| match e.status() {
                Some(404 | 409) => FenceError::Refused(format!(
                    "source {api} will not say what it wrote for migration {id}: {e}"
                )),
                _ => FenceError::Unreachable(format!("source {api}: {e}")),
            })?;
        if w.region_size != region_size {
            return Err(FenceError::Refused(format!(
                "source {api} tracks {}-byte regions, this clone {region_size}",
                w.region_size
            )));
        }
        Ok(w.runs)
    }

    #[cfg(feature = "cluster")]
    async fn may_take_over(&self) -> Result<bool, FenceError> {
        let Some(ClusterClone {
            cluster: c,
            name,
            migration: id,
            ..
        }) = self.cluster_clone()
        else {
            return Ok(false);
        };
        let ask = || async {
            c.source_lease(&name, &id).await.map_err(|e| {
                FenceError::Unreachable(format!(
                    "cannot learn from the cluster whether the source is gone: {e}"
                ))
            })
        };
        // A dead source's lease lapses within its TTL: wait that long
        // (and a second) for it to go; a source whose lease outlives that
        // is alive, only unreachable from here, and is not taken over.
        let first = ask().await?;
        let until = Instant::now() + first.ttl + Duration::from_secs(1);
        let mut now = first;
        while !now.gone {
            if Instant::now() >= until {
                warn!(volume = %name, migration = %id, "the source cannot be reached but its cluster lease is alive: not taking over");
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            now = ask().await?;
        }
        // A lease revoked by hand is gone before its holder's own deadline
        // has passed: wait out a whole TTL more, by this node's clock.
        warn!(volume = %name, migration = %id, "the source's cluster lease is gone: taking over in {:?} if it stays gone", now.ttl);
        tokio::time::sleep(now.ttl).await;
        Ok(ask().await?.gone)
    }

    #[cfg(feature = "cluster")]
    async fn claim_ownership(&self, takeover: bool) -> Result<(), FenceError> {
        let Some(ClusterClone {
            cluster: c,
            name,
            migration: id,
            region_size,
        }) = self.cluster_clone()
        else {
            return Ok(());
        };
        let gen = c
            .claim(&name, &id, takeover, region_size)
            .await
            .map_err(|e| {
                FenceError::Unreachable(format!(
                    "the cluster's directory did not give the volume to this node: {e}"
                ))
            })?;
        crate::crash::point("after-claim");
        // Durable before any write is taken: a restart finds the copy at
        // the record's generation.
        update_table(&self.dir, &self.table, |t| t.generation = gen)
            .map(drop)
            .map_err(|e| FenceError::Unreachable(e.to_string()))
    }

    fn persist_handoff(&self, source_fenced: bool) -> Result<(), String> {
        update_table(&self.dir, &self.table, |t| {
            if let TargetSpec::Clone {
                handed_off,
                source_unfenced,
                migration,
                ..
            } = &mut t.target
            {
                *handed_off = true;
                *source_unfenced = !source_fenced;
                if !t.arrived.contains(migration) {
                    t.arrived.push(migration.clone());
                }
                let extra = t.arrived.len().saturating_sub(ARRIVED_KEPT);
                t.arrived.drain(..extra);
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }
}

/// Builds the hooks for the store (see [`super::store::CloneEnv`]).
pub fn hooks_factory(
    me: String,
    timeout: Duration,
    auth: ApiAuth,
    cluster: super::ClusterSlot,
) -> HooksFactory {
    Arc::new(move |dir, table| {
        Arc::new(NodeHooks {
            dir: dir.to_owned(),
            table,
            me: me.clone(),
            timeout,
            auth: auth.clone(),
            cluster: cluster.clone(),
        }) as Arc<dyn MigrationHooks>
    })
}

/// After the store opened, before any NBD client is served: start the
/// hydrators of volumes migrating in, the release of source copies still
/// owed, and for every volume that was migrating *out* and is not fenced,
/// hold its writes until the destination says who owns it (see
/// [`reconcile_outgoing`]): while this node was down, the destination may
/// have been handed the volume by force.
pub fn resume_all(state: &Arc<NodeState>) {
    for v in state.store.list() {
        if let Some(c) = v.clone_target() {
            c.start();
            spawn_supervisor(state.clone(), v.clone());
        }
        let t = v.table();
        if let Some(out) = &t.outgoing {
            // Held since the store loaded it (before any listener); a
            // rollback is not held (see `store::load_volume`) but is still
            // settled with the node it goes to.
            if v.fence.held_for_migration().is_some()
                || (out.rollback_of.is_some() && !v.fence.is_fenced())
            {
                spawn_reconcile(state.clone(), v.name.clone(), out.id.clone());
            }
        }
        if let Some(p) = t.release_pending {
            spawn_release(state.clone(), v.name.clone(), p);
        }
    }
}

/// Source: starts migrating `name` to `req.to`.
///
/// `to_node`: cluster mode, a cluster volume: the destination's node name
/// (`req.to` is then its API address, resolved from the directory). The
/// migration is recorded in the directory before anything else, and the
/// destination checks it there before it makes its clone.
pub async fn migrate(
    state: &Arc<NodeState>,
    name: &str,
    req: MigrateRequest,
    to_node: Option<String>,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    // Held through the prepare: a cancel or a fence of this volume waits
    // until the migration is recorded on both sides (or forgotten).
    let _own = vol.ownership.lock().await;
    if vol.fence.is_fenced() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} was already handed off from this node"
        )));
    }
    if let Some(why) = vol.fence.held() {
        return Err(MigrationError::Conflict(format!("volume {name:?}: {why}")));
    }
    if let Some(o) = vol.table().outgoing {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} is already migrating to {} (migration {})",
            o.to, o.id
        )));
    }
    if let Some(c) = vol.clone_target() {
        if !c.is_handed_off() {
            return Err(MigrationError::Conflict(format!(
                "volume {name:?} has not been handed off to this node yet"
            )));
        }
        if to_node.is_some() {
            return Err(MigrationError::Conflict(format!(
                "volume {name:?} is still copying in from its previous migration ({}); in \
                 cluster mode it can migrate on once that completes",
                c.migration_id()
            )));
        }
    }
    if req.to == state.advertised_api || req.to == state.api_addr.to_string() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} is on this node already ({}); name another node with --to",
            req.to
        )));
    }
    let nbd = state
        .advertised_nbd
        .clone()
        .ok_or_else(|| MigrationError::Conflict("this node has no TCP NBD listener".into()))?;
    if nbd
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
    {
        return Err(MigrationError::Conflict(
            "this node listens on a wildcard address; the destination cannot reach it by that \
             (give --advertise-nbd)"
                .into(),
        ));
    }
    let region_size = req.region_size.unwrap_or(DEFAULT_REGION_SIZE);
    let id = new_migration_id();
    let generation = match &to_node {
        Some(node) => {
            Some(super::cluster_migration::start(state, name, &id, node, req.keep_source).await?)
        }
        None => None,
    };
    let recorded = vol.update_table(|t| {
        t.outgoing = Some(Outgoing {
            to: req.to.clone(),
            keep_source: req.keep_source,
            id: id.clone(),
            cancelling: false,
            rollback_of: None,
        })
    });
    if let Err(e) = recorded {
        if generation.is_some() {
            // Nobody was asked to prepare: no clone can claim it.
            if let Err(f) = super::cluster_migration::forget(state, name, &id).await {
                warn!(volume = name, migration = %id, "migration left in the directory, with no clone: {f}");
            }
        }
        return Err(e.into());
    }
    let prep = PrepareRequest {
        name: name.to_owned(),
        id: id.clone(),
        size: vol.size,
        origin_nbd: nbd,
        origin_api: state.advertised_api.clone(),
        region_size,
        rate: req.rate.unwrap_or(0),
        rollback_of: None,
        origin_node: Some(state.id.clone()),
        generation,
    };
    let r = Peer::new(&req.to, &state.peer_auth, state.source_timeout)
        .post::<MigrationStatus>("/v1/migrations", &prep)
        .await;
    match r {
        Ok(mut status) => {
            info!(volume = name, to = %req.to, migration = %id, event = "prepared", "migration prepared");
            spawn_writer_watch(state.clone(), name.to_owned(), id);
            status.role = "source".into();
            status.peer = req.to.clone();
            Ok(status)
        }
        Err(e) => {
            // The destination may or may not have made the clone (the
            // answer may be what was lost). Forgetting the migration is
            // safe either way: a clone of this identity is refused the
            // origin link and the fence from now on, so it can never take
            // the volume. In cluster mode the directory forgets it first:
            // while it records the migration, such a clone could take the
            // volume over once this node's lease is gone. If it cannot be
            // told, the migration stays (an operator's `migration cancel`
            // retries).
            if generation.is_some() {
                if let Err(f) = super::cluster_migration::forget(state, name, &id).await {
                    return Err(MigrationError::Peer(format!(
                        "{e}; the migration could not be forgotten in the cluster's directory \
                         ({f}), so it stays recorded: `dlsm migration cancel {name}` ends it"
                    )));
                }
            }
            let _ = vol.update_table(|t| {
                if t.outgoing.as_ref().is_some_and(|o| o.id == id) {
                    t.outgoing = None;
                }
            });
            Err(e.into())
        }
    }
}

/// Destination: creates the clone volume and exports it at once. A
/// repeated prepare of the same migration answers as the first did.
pub async fn prepare(
    state: &Arc<NodeState>,
    req: PrepareRequest,
) -> Result<MigrationStatus, MigrationError> {
    if req.id.is_empty() {
        return Err(MigrationError::Conflict(
            "prepare without a migration identity".into(),
        ));
    }
    if req.origin_node.as_deref() == Some(state.id.as_str()) {
        return Err(MigrationError::Invalid(format!(
            "volume {:?} is on this node already ({} is this node, by another address); name \
             another node as the destination",
            req.name, req.origin_api
        )));
    }
    if let Some(of) = req.rollback_of.clone() {
        return prepare_rollback(state, req, of).await;
    }
    if let Ok(v) = state.store.get(&req.name) {
        if let Some(c) = v.clone_target().filter(|c| c.migration_id() == req.id) {
            return Ok(c.status());
        }
    }
    let cluster = match req.generation {
        Some(g) => Some(super::cluster_migration::check_prepare(state, &req, g).await?),
        None => None,
    };
    if cluster.is_some() {
        drop_stale_clone(state, &req.name, &req.id).await?;
    }
    // Create, start and supervise in a task of its own: if the caller
    // goes away mid-way (its future dropped), the clone still gets its
    // hydrator and supervisor instead of idling until a restart.
    let st = state.clone();
    let task = tokio::spawn(async move {
        let origin = TargetSpec::Remote {
            nbd: req.origin_nbd.clone(),
            export: req.name.clone(),
            api: req.origin_api.clone(),
        };
        let store = st.store.clone();
        let r = req.clone();
        let vol = tokio::task::spawn_blocking(move || {
            store.create_clone(
                &r.name,
                r.size,
                super::store::NewClone {
                    origin,
                    region_size: r.region_size,
                    rate: r.rate,
                    migration: &r.id,
                    cluster,
                },
            )
        })
        .await
        .map_err(|e| MigrationError::Peer(e.to_string()))??;
        let clone = vol.clone_target().expect("a clone volume");
        clone.start();
        spawn_supervisor(st, vol);
        info!(volume = %req.name, from = %req.origin_api, migration = %req.id, event = "prepared", "migration prepared: passthrough");
        Ok::<_, MigrationError>(clone.status())
    });
    task.await
        .map_err(|e| MigrationError::Peer(e.to_string()))?
}

/// Destination, cluster mode, preparing migration `id` that the directory
/// records to this node: a clone here of another migration of the volume,
/// not handed off (a prepare whose answer was lost, a cancel whose drop
/// went unanswered), can never be handed off any more (its claim would
/// fail) and holds nothing the volume needs (it took no write: writes hand
/// off first), so it is dropped instead of blocking the prepare.
async fn drop_stale_clone(
    state: &Arc<NodeState>,
    name: &str,
    id: &str,
) -> Result<(), MigrationError> {
    let Ok(vol) = state.store.get(name) else {
        return Ok(());
    };
    let Some(c) = vol
        .clone_target()
        .filter(|c| c.migration_id() != id && c.rollback_of().is_none())
    else {
        return Ok(());
    };
    if !c.cancel_before_handoff().await {
        return Ok(()); // handed off: the store's refusal says so
    }
    warn!(
        volume = name,
        stale = c.migration_id(),
        migration = id,
        event = "cancelled",
        "dropping a clone of a migration the cluster's directory no longer records"
    );
    let mut ended = c.status();
    ended.phase = Phase::Cancelled;
    state.history.record(
        ended,
        "dropped: the cluster's directory records a newer migration of the volume to this node",
    );
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.remove_volume(&vol, RemoveMode::Cancelled))
        .await
        .map_err(|e| MigrationError::Peer(e.to_string()))??;
    Ok(())
}

/// Source: fences the volume for migration `id` (writes refused from now
/// on) and flushes. Only the destination of this node's outgoing
/// migration may: a fence for any other migration is refused, so a stale
/// clone on some third node can never take the volume. Idempotent for the
/// migration it was fenced for.
///
/// `generation` (cluster mode): the caller's; a caller behind this copy's
/// is refused (see [`super::cluster_migration::check_generation`]).
pub async fn fence(
    state: &Arc<NodeState>,
    name: &str,
    to: &str,
    id: &str,
    generation: Option<u64>,
) -> Result<(), MigrationError> {
    let vol = state.store.get(name)?;
    let _own = vol.ownership.lock().await;
    super::cluster_migration::check_generation(&vol, generation)?;
    fence_locked(&vol, name, to, id).await
}

/// [`fence`] for a caller that holds `vol.ownership`.
async fn fence_locked(vol: &Volume, name: &str, to: &str, id: &str) -> Result<(), MigrationError> {
    let t = vol.table();
    if t.outgoing
        .as_ref()
        .is_some_and(|o| o.id == id && o.cancelling)
    {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: migration {id} is being cancelled on this node"
        )));
    }
    let ours = t.outgoing.as_ref().is_some_and(|o| o.id == id);
    if !ours {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: refusing to fence for migration {id}: {}",
            match (&t.outgoing, &t.fenced_for) {
                (Some(o), _) => format!(
                    "this node is migrating it in migration {} to {}",
                    o.id, o.to
                ),
                (None, Some(f)) if f == id => "that migration is over here".to_owned(),
                _ => "this node has no such migration of it".to_owned(),
            }
        )));
    }
    vol.fence.fence(to, id, &*vol.target()).await?;
    if let Some(c) = vol.clone_target() {
        // A clone that is itself a source: its map must be durable too.
        c.commit().await?;
    }
    vol.update_table(|t| {
        t.fenced_to = Some(to.to_owned());
        t.fenced_for = Some(id.to_owned());
    })?;
    vol.fence.release_hold();
    if t.outgoing.as_ref().is_some_and(|o| o.rollback_of.is_some()) {
        // Rolled back: the copy here has nothing more to gain.
        if let Some(c) = vol.clone_target() {
            c.pause();
        }
    }
    info!(
        volume = name,
        to,
        migration = id,
        event = "fenced",
        "fenced: writes now refused here"
    );
    Ok(())
}

/// Records (durably) whether a cancel of migration `id` is under way.
fn mark_cancelling(vol: &Volume, id: &str, on: bool) -> Result<(), StoreError> {
    vol.update_table(|t| {
        if let Some(o) = t.outgoing.as_mut().filter(|o| o.id == id) {
            o.cancelling = on;
        }
    })
    .map(drop)
}

/// The destination says it owns the volume (migration `id` was handed
/// off, by force while this node was down): fence, even if a cancel was
/// under way here (it cannot win any more).
async fn fence_owned_elsewhere(
    vol: &Volume,
    name: &str,
    to: &str,
    id: &str,
) -> Result<(), MigrationError> {
    let _own = vol.ownership.lock().await;
    mark_cancelling(vol, id, false)?;
    fence_locked(vol, name, to, id).await
}

/// Source: migration `id` completed at its destination; delete (or keep,
/// fenced) this node's copy. Refused for any other migration: a release
/// left over from an earlier migration of the volume must never delete a
/// later incarnation's copy. Idempotent: a repeated release of a copy
/// already released answers as the first did.
pub async fn release(
    state: &Arc<NodeState>,
    name: &str,
    req: &ReleaseRequest,
) -> Result<(), MigrationError> {
    let id = req.id.as_str();
    let vol = state.store.get(name)?;
    let _own = vol.ownership.lock().await;
    super::cluster_migration::check_generation(&vol, req.generation)?;
    // An orphan rollback of that very migration (the node it went to
    // forgot the rollback, then completed): undo it, then release as the
    // migration's source.
    if let Some(c) = vol.clone_target() {
        if c.rollback_of().as_deref() == Some(id) && c.cancel_before_handoff().await {
            warn!(volume = name, migration = id, event = "cancelled", "released by the destination of the migration this node's clone was rolling back: undoing the rollback first");
            state.store.revert_rollback_clone(&vol).await?;
        }
    }
    let t = vol.table();
    let Some(out) = t.outgoing.clone().filter(|o| o.id == id) else {
        if t.outgoing.is_none() && t.fenced_for.as_deref() == Some(id) {
            return Ok(()); // kept as asked by an earlier release
        }
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: refusing to release for migration {id}: it is not this \
             node's outgoing migration of the volume"
        )));
    };
    if !vol.fence.is_fenced() {
        // The destination completed without ever fencing this node (a
        // forced handoff while it was down): it owns the volume, so fence
        // before anything else; a cancel under way here cannot win.
        mark_cancelling(&vol, id, false)?;
        fence_locked(&vol, name, &out.to, id).await?;
    }
    // A clone that still pulls from its own origin (B in A -> B -> C) does
    // not need it any more: that origin is released first (so a failure
    // here leaves this copy, and the destination retries), then this copy.
    let mut keep = out.keep_source;
    if let Some(c) = vol.clone_target() {
        c.stop();
        // This node's own incoming migration ends here too: the volume
        // moved on before its copy completed (B in A -> B -> C).
        if !c.is_complete() {
            let mut s = c.status();
            let how = if out.rollback_of.is_some() {
                s.phase = Phase::Cancelled;
                format!(
                    "rolled back: the volume went back to {} (migration {id}), which now has \
                     everything written here",
                    out.to
                )
            } else {
                s.phase = Phase::Complete;
                format!(
                    "complete: the volume moved on to {} (migration {id}) before this copy \
                     completed; its source is released",
                    out.to
                )
            };
            state.history.record(s, &how);
        }
        if keep && !c.is_complete() {
            warn!(
                volume = name,
                "not keeping the source copy: it is incomplete (this node was still hydrating it)"
            );
            keep = false;
        }
    }
    // Read after the clone stopped: it may have completed and collapsed
    // meanwhile, turning "release my origin" into a release still owed.
    let t = vol.table();
    if let TargetSpec::Clone {
        origin, migration, ..
    } = &t.target
    {
        // Not after a rollback: that origin is the node the volume went
        // back to, and its copy is the volume now.
        let rolled_back = out.rollback_of.as_deref() == Some(migration.as_str());
        if let (TargetSpec::Remote { api, .. }, false) = (origin.as_ref(), rolled_back) {
            release_once(state, api, name, migration).await?;
        }
    }
    // Likewise a release this node still owes its own source: once this
    // copy is gone nobody would remember it.
    if let Some(p) = &t.release_pending {
        release_once(state, &p.api, name, &p.id).await?;
        vol.update_table(|t| t.release_pending = None)?;
    }
    // Recorded before the change: a crash after it leaves nothing to
    // record it again (the retried release finds it done), while an entry
    // of a migration still live is hidden by the live one.
    let ended = source_ended(name, &out, req.status.as_deref(), Phase::Complete);
    if keep {
        state.history.record(
            ended,
            "complete: the destination has the volume; this copy kept, fenced",
        );
        vol.update_table(|t| t.outgoing = None)?;
        info!(
            volume = name,
            migration = id,
            event = "released",
            "released: kept (fenced) as asked"
        );
    } else {
        state.history.record(
            ended,
            "complete: the destination has the volume; this copy released",
        );
        let store = state.store.clone();
        let v = vol.clone();
        tokio::task::spawn_blocking(move || store.remove_volume(&v, RemoveMode::Released))
            .await
            .map_err(|e| MigrationError::Peer(e.to_string()))??;
        info!(
            volume = name,
            migration = id,
            event = "released",
            "released: deleted"
        );
    }
    Ok(())
}

/// Destination: handoff on request (source's last writer left, or operator).
pub async fn handoff(
    state: &Arc<NodeState>,
    name: &str,
    req: HandoffRequest,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    // Asked of the source (or of a middle node, for its onward migration):
    // the destination hands off, for this node's own migration.
    if let Some(out) = vol.table().outgoing {
        if req.force {
            return Err(MigrationError::Invalid(format!(
                "a forced handoff is for a destination whose source is dead; this node is the \
                 source of {name:?}: run it on the destination {}",
                out.to
            )));
        }
        if req.id.as_deref().is_some_and(|id| id != out.id) {
            return Err(MigrationError::Conflict(format!(
                "volume {name:?}: handoff asked for migration {}, but this node's is {}",
                req.id.unwrap_or_default(),
                out.id
            )));
        }
        let path = format!("/v1/migrations/{}/handoff", encode_segment(name));
        let fwd = HandoffRequest {
            force: false,
            id: Some(out.id.clone()),
        };
        return via_destination(
            state,
            out,
            &path,
            &fwd,
            state.source_timeout * 2,
            |to, e| format!("the destination {to} hands off, and asking it failed: {e}"),
        )
        .await;
    }
    let c = vol
        .clone_target()
        .ok_or_else(|| MigrationError::NotMigrating(name.to_owned()))?;
    if let Some(id) = req.id.as_deref().filter(|id| *id != c.migration_id()) {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: handoff asked for migration {id}, but this node holds migration {}",
            c.migration_id()
        )));
    }
    if req.force && super::cluster_migration::is_cluster_volume(state, &vol) {
        return Err(MigrationError::Invalid(format!(
            "volume {name:?} is a cluster volume: --force is refused in cluster mode, where the \
             source's lease is the proof that it is gone; `dlsm migration handoff {name}` takes \
             over by itself once the source's lease has expired"
        )));
    }
    c.handoff(req.force).await?;
    Ok(c.status())
}

/// Destination: what this node knows of migration `id` of `name` (see
/// [`MigrationState`]).
pub fn migration_state(state: &NodeState, name: &str, id: &str) -> MigrationState {
    let Ok(vol) = state.store.get(name) else {
        return MigrationState::Unknown;
    };
    if let Some(c) = vol.clone_target().filter(|c| c.migration_id() == id) {
        return if c.is_handed_off() {
            MigrationState::HandedOff
        } else {
            MigrationState::Passthrough
        };
    }
    if vol.table().arrived.iter().any(|a| a == id) {
        MigrationState::HandedOff
    } else {
        MigrationState::Unknown
    }
}

/// Source: cancels an outgoing migration that was not handed off: the
/// destination drops its clone, this node forgets the migration and takes
/// writes again. The destination's answer decides, never this node's own
/// view: a handoff may have fenced this node and then failed (the clone,
/// dropped, will never hand off, so the fence is opened again), or may
/// have succeeded meanwhile (then this node stays fenced and the cancel is
/// refused; rolling back is not built yet). `force` forgets the migration
/// when the destination cannot be reached, unless this node was fenced for
/// it (the destination may own the volume then).
pub async fn cancel(
    state: &Arc<NodeState>,
    name: &str,
    force: bool,
) -> Result<serde_json::Value, MigrationError> {
    let vol = state.store.get(name)?;
    let Some(out) = vol.table().outgoing else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    if force {
        if let Some(why) = vol.fence.held() {
            return Err(MigrationError::Conflict(format!(
                "volume {name:?}: {why}. --force cannot be used while writes are held: the \
                 destination may own the volume (a forced handoff while this node was down), \
                 and taking writes here could make a second writer; only the destination's \
                 answer can cancel"
            )));
        }
    }
    // Recorded before the destination is asked: from now on this node
    // refuses to fence for the migration, so the destination cannot take
    // the volume however the rest goes, and a restart knows where it was.
    {
        let _own = vol.ownership.lock().await;
        mark_cancelling(&vol, &out.id, true)?;
    }
    // Cluster mode: the directory forgets the migration next, so that no
    // clone of it can take the volume from now on, even by a takeover
    // (false: it was handed off already; the destination says so below).
    if super::cluster_migration::is_cluster_volume(state, &vol) {
        let r = super::cluster_migration::forget(state, name, &out.id).await;
        if let Err(e) = r {
            // The clear may have been applied with its answer lost: then
            // no clone can claim the volume any more, and a fence for it
            // would leave no writer. So the cancel stays recorded (this
            // node refuses that fence) until a retry settles it.
            return Err(MigrationError::Cluster(
                crate::cluster::ClusterError::Unavailable(format!(
                    "{e}; the cancel stays recorded here (this node will not hand the volume \
                     off for this migration): run `dlsm migration cancel {name}` again once \
                     the cluster answers"
                )),
            ));
        }
        if !matches!(r, Ok(true)) {
            let _own = vol.ownership.lock().await;
            mark_cancelling(&vol, &out.id, false)?;
            return Err(r.err().unwrap_or_else(|| {
                MigrationError::Conflict(format!(
                    "volume {name:?}: the cluster's directory gives it to another node now \
                     (migration {} was handed off): it cannot be cancelled; it comes back by                      `dlsm migrate {name} --to NODE`",
                    out.id
                ))
            }));
        }
    }
    let (path, req) = (
        format!("/v1/migrations/{}/drop", encode_segment(name)),
        DropRequest {
            id: out.id.clone(),
            generation: Some(vol.table().generation).filter(|g| *g > 0),
        },
    );
    // Not under the ownership lock: the destination may be in the middle
    // of a handoff that waits for this node's fence (which takes the lock),
    // and its drop waits for that handoff to end. Everything decided from
    // the answer is decided under the lock, against the table as it is then.
    let r = Peer::new(&out.to, &state.peer_auth, state.source_timeout)
        .post::<serde_json::Value>(&path, &req)
        .await;
    let _own = vol.ownership.lock().await;
    if vol.table().outgoing.is_none_or(|o| o.id != out.id) {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: migration {} ended while it was being cancelled",
            out.id
        )));
    }
    let fenced_for_it = || vol.table().fenced_for.as_deref() == Some(out.id.as_str());
    match r {
        // Dropped now, or the destination has no record of it (never
        // prepared, or dropped before): it holds no copy that took writes.
        Ok(_) => {}
        // Only the destination's own "no such migration" counts, not any
        // 404 (an older node without the route, another service there).
        Err(e)
            if e.status() == Some(404)
                && e.to_string().contains("is not migrating on this node") => {}
        Err(e) if e.status() == Some(409) => {
            // Handed off (before the cancel was recorded): the destination
            // owns the volume.
            mark_cancelling(&vol, &out.id, false)?;
            if !vol.fence.is_fenced() {
                fence_locked(&vol, name, &out.to, &out.id).await?;
            }
            if super::cluster_migration::is_cluster_volume(state, &vol) {
                return Err(MigrationError::Conflict(format!(
                    "volume {name:?} was handed off already ({e}): it is on the destination \
                     now; in cluster mode it comes back by `dlsm migrate {name} --to NODE`"
                )));
            }
            // A rollback: the destination migrates it back here. Asked
            // without the lock, which its prepare here takes.
            drop(_own);
            info!(volume = name, migration = %out.id, "handed off already ({e}): asking the destination to roll back");
            return forward_rollback(state, name, &out.to, &out.id).await;
        }
        Err(e)
            if force
                && !vol.fence.is_fenced()
                && !fenced_for_it()
                && vol.fence.held().is_none() =>
        {
            warn!(
                volume = name,
                "cancel --force: destination unreachable ({e}); forgetting the migration"
            );
        }
        Err(e) if super::cluster_migration::is_cluster_volume(state, &vol) => {
            // The directory has forgotten the migration: it can never hand
            // off now, so this node goes on refusing to fence for it (a
            // fence could only leave the volume with no writer).
            return Err(MigrationError::Peer(format!(
                "cannot reach the destination {} to drop its clone: {e}; the cluster's \
                 directory has forgotten the migration, so it cannot hand off: run `dlsm \
                 migration cancel {name}` again to finish once the destination answers",
                out.to
            )));
        }
        Err(e) => {
            // Not cancelled: the migration may go on.
            mark_cancelling(&vol, &out.id, false)?;
            return Err(MigrationError::Peer(format!(
                "cannot reach the destination {} to drop its clone: {e}{}",
                out.to,
                if vol.fence.is_fenced() {
                    "; this node was fenced for this migration, so the destination may own \
                     the volume: only its answer can cancel"
                } else {
                    " (give --force if it is gone for good)"
                }
            )));
        }
    }
    // Recorded first (see `release`).
    state.history.record(
        source_ended(name, &out, None, Phase::Cancelled),
        "cancelled by the operator: the volume stayed here",
    );
    vol.update_table(|t| {
        if t.outgoing.as_ref().is_some_and(|o| o.id == out.id) {
            t.outgoing = None;
        }
        if t.fenced_for.as_deref() == Some(out.id.as_str()) {
            t.fenced_for = None;
            t.fenced_to = None;
        }
    })?;
    // Open only a fence closed for this migration (a handoff that fenced
    // this node and then failed): its clone is gone and cannot use it.
    if vol.fence.reopen(&out.id) {
        info!(volume = name, migration = %out.id, "fence of the cancelled migration opened again");
    }
    vol.fence.release_hold();
    if out.rollback_of.is_some() {
        // The rollback is off: this node's own clone may complete again.
        if let Some(c) = vol.clone_target() {
            c.hold_completion(false);
            c.resume();
        }
    }
    info!(volume = name, migration = %out.id, event = "cancelled", "migration cancelled: the volume stays here");
    Ok(serde_json::json!({ "cancelled": name, "migration": out.id }))
}

/// Destination: drops the clone of a cancelled migration, if it was not
/// handed off (409 if it was, even if it completed since; 404 if there is
/// no record of it).
pub async fn drop_clone(
    state: &Arc<NodeState>,
    name: &str,
    id: &str,
    generation: Option<u64>,
) -> Result<(), MigrationError> {
    if let Ok(vol) = state.store.get(name) {
        super::cluster_migration::check_generation(&vol, generation)?;
    }
    match migration_state(state, name, id) {
        MigrationState::Unknown => return Err(MigrationError::NotMigrating(name.to_owned())),
        MigrationState::HandedOff => {
            return Err(MigrationError::Conflict(format!(
                "volume {name:?} was handed off to this node in migration {id}"
            )))
        }
        MigrationState::Passthrough => {}
    }
    let vol = state.store.get(name)?;
    let c = vol
        .clone_target()
        .filter(|c| c.migration_id() == id)
        .ok_or_else(|| MigrationError::NotMigrating(name.to_owned()))?;
    if !c.cancel_before_handoff().await {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} was handed off to this node in migration {id}"
        )));
    }
    let mut ended = c.status();
    ended.phase = Phase::Cancelled;
    if c.rollback_of().is_some() {
        // The copy under a rollback clone is this node's own: it goes
        // back to being the fenced source of the migration rolled back.
        let _own = vol.ownership.lock().await;
        state.history.record(
            ended,
            "rollback cancelled: this copy is again the fenced source",
        );
        state.store.revert_rollback_clone(&vol).await?;
        info!(
            volume = name,
            migration = id,
            event = "cancelled",
            "rollback cancelled: back to the fenced source copy"
        );
        return Ok(());
    }
    state
        .history
        .record(ended, "cancelled by the source: this clone was dropped");
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.remove_volume(&vol, RemoveMode::Cancelled))
        .await
        .map_err(|e| MigrationError::Peer(e.to_string()))??;
    info!(
        volume = name,
        migration = id,
        event = "cancelled",
        "cancelled by the source: clone dropped"
    );
    Ok(())
}

/// Status, on either node. The source asks the destination.
pub async fn status(state: &Arc<NodeState>, name: &str) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    if let Some(c) = vol.clone_target() {
        return Ok(c.status());
    }
    status_as_source(state, &vol, name).await
}

/// The source's status of its outgoing migration: the destination's,
/// when it answers for the same migration; else what this node knows,
/// with why it knows no more.
async fn status_as_source(
    state: &Arc<NodeState>,
    vol: &Volume,
    name: &str,
) -> Result<MigrationStatus, MigrationError> {
    let Some(out) = vol.table().outgoing else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    // `role=destination`: a middle node of a chain answers for its own
    // clone, not for the migration it is the source of.
    let path = format!("/v1/migrations/{}?role=destination", encode_segment(name));
    let r = Peer::new(&out.to, &state.peer_auth, state.source_timeout)
        .get::<MigrationStatus>(&path)
        .await;
    match r {
        Ok(mut s) if s.id == out.id => {
            // Ended there but not here (the source still holds it): say
            // so as an error of the live migration, not as its end.
            if let Some(how) = s.ended.take().filter(|_| s.phase != Phase::Complete) {
                s.ended_at = None;
                s.last_error = Some(format!(
                    "at the destination {}: {how}; this node still holds the migration \
                     (`dlsm migration cancel {name}` here ends it)",
                    out.to
                ));
            }
            s.role = "source".into();
            s.peer = out.to;
            Ok(s)
        }
        other => {
            let why = match other {
                Ok(s) => format!(
                    "the destination reports migration {:?}, not this node's {}",
                    s.id, out.id
                ),
                Err(e) if e.status() == Some(404) => format!(
                    "the destination {} has no volume {name:?} (removed there, or its \
                     clone was dropped); `dlsm migration cancel {name}` here ends the \
                     migration if it was not handed off",
                    out.to
                ),
                Err(e) => format!("destination unreachable: {e}"),
            };
            let mut s = MigrationStatus::unknown(name, &out.id);
            s.phase = if vol.fence.is_fenced() {
                Phase::Hydrating
            } else {
                Phase::Passthrough
            };
            s.role = "source".into();
            s.peer = out.to;
            s.stalled = vol.fence.held();
            s.last_error = Some(why);
            Ok(s)
        }
    }
}

/// The destination's clone of `name`, for pause/resume/rate.
pub fn clone_of(
    state: &NodeState,
    name: &str,
) -> Result<Arc<crate::migrate::clone::CloneTarget>, MigrationError> {
    state
        .store
        .get(name)?
        .clone_target()
        .ok_or_else(|| MigrationError::NotMigrating(name.to_owned()))
}

/// Destination: when the clone completes, collapse the table to `local`
/// (recording, in the same durable write, that the source copy is still
/// to be released), drop the origin link and release the source.
fn spawn_supervisor(state: Arc<NodeState>, vol: Arc<Volume>) {
    tokio::spawn(async move {
        let Some(c) = vol.clone_target() else { return };
        let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let mut recorded = false;
        let pending = loop {
            c.wait_complete().await;
            if c.is_stopped() && !c.is_complete() {
                return; // removed, cancelled or released before completing
            }
            // Under the ownership lock: a rollback (which holds completion
            // under it) either came first and is seen here, or finds the
            // clone collapsed and refuses.
            let own = vol.ownership.lock().await;
            if !c.is_complete() {
                continue;
            }
            if !state
                .store
                .get(&vol.name)
                .is_ok_and(|v| Arc::ptr_eq(&v, &vol))
            {
                return; // removed meanwhile (and maybe a new one of that name made)
            }
            let pending = match vol.table().target {
                TargetSpec::Clone {
                    origin, migration, ..
                } => match *origin {
                    TargetSpec::Remote { api, .. } => Some(PendingRelease { api, id: migration }),
                    _ => None,
                },
                _ => None,
            };
            // Recorded before the table says local: a crash in between
            // completes again at restart and records it again (replacing).
            if !recorded {
                state
                    .history
                    .record(c.status(), "complete: the volume is local here");
                recorded = true;
            }
            match vol.collapse_to_local(pending.clone()) {
                Ok(()) => break pending,
                Err(e) => {
                    drop(own);
                    warn!(volume = %vol.name, migration = c.migration_id(), event = "fault", "cannot collapse table, retrying: {e}");
                    retry.wait().await;
                }
            }
        };
        c.origin().close();
        info!(volume = %vol.name, migration = c.migration_id(), event = "complete", "migration complete: volume is local");
        if let Some(p) = pending {
            spawn_release(state.clone(), vol.name.clone(), p);
        }
    });
}

/// A migration of `name` that ended, from the history: the newest, in
/// `role` if given. Only when the volume is not migrating now (the live
/// migration is then the answer).
pub fn ended_status(state: &NodeState, name: &str, role: Option<&str>) -> Option<MigrationStatus> {
    if let Ok(vol) = state.store.get(name) {
        let live_dest = vol.clone_target().is_some();
        let live_src = vol.table().outgoing.is_some();
        match role {
            Some("destination") if live_dest => return None,
            Some("source") if live_src => return None,
            None if live_dest || live_src => return None,
            _ => {}
        }
    }
    state.history.latest(name, role)
}

/// The source's history entry of `out`: the destination's final status
/// when it sent one, else what the source itself knows.
fn source_ended(
    name: &str,
    out: &super::store::Outgoing,
    dest: Option<&MigrationStatus>,
    phase: Phase,
) -> MigrationStatus {
    let mut s = dest
        .filter(|d| d.id == out.id && d.volume == name)
        .cloned()
        .unwrap_or_else(|| MigrationStatus::unknown(name, &out.id));
    s.role = "source".into();
    s.peer = out.to.clone();
    s.phase = phase;
    s.ended = None;
    s
}

/// Asks `api` once to release its copy of `name` for migration `id`.
/// Done when it did, when it has no such volume (404) or when it says the
/// copy is not that migration's (409: a later incarnation, never to be
/// touched).
async fn release_once(
    state: &NodeState,
    api: &str,
    name: &str,
    id: &str,
) -> Result<(), MigrationError> {
    let path = format!("/v1/volumes/{}/release", encode_segment(name));
    let req = ReleaseRequest {
        id: id.to_owned(),
        status: state.history.find(name, id, "destination").map(Box::new),
        generation: state
            .store
            .get(name)
            .ok()
            .map(|v| v.table().generation)
            .filter(|g| *g > 0),
    };
    match Peer::new(api, &state.peer_auth, state.source_timeout)
        .post::<serde_json::Value>(&path, &req)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Some(404) => Ok(()),
        Err(e) if e.status() == Some(409) => {
            warn!(
                volume = name,
                source = api,
                migration = id,
                "source refused the release (not that migration's copy): {e}"
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Tells the source of a completed migration to release its copy, until
/// it is done (see [`release_once`]); then forgets the obligation. The
/// obligation is in the table, so a restart resumes it.
fn spawn_release(state: Arc<NodeState>, name: String, p: PendingRelease) {
    tokio::spawn(async move {
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let Ok(vol) = state.store.get(&name) else {
                return;
            };
            if vol.table().release_pending.as_ref() != Some(&p) {
                return;
            }
            // Cluster mode: the directory stops recording the migration
            // before the source copy goes.
            let done = async {
                super::cluster_migration::complete(&state, &vol, &p.id).await?;
                release_once(&state, &p.api, &name, &p.id).await
            };
            match done.await {
                Ok(()) => {
                    let _ = vol.update_table(|t| {
                        if t.release_pending.as_ref() == Some(&p) {
                            t.release_pending = None;
                        }
                    });
                    return;
                }
                Err(e) => {
                    warn!(volume = %name, source = %p.api, migration = %p.id, event = "fault", "release failed, retrying: {e}");
                    retry.wait().await;
                }
            }
        }
    });
}

/// Source that restarted with an outgoing migration it is not fenced for:
/// asks the destination what it knows of that migration, until it says.
/// Passthrough: this node still owns the volume (writes resume, and the
/// writer watch with them). Handed off: this node fences itself. Unknown:
/// writes stay held until an operator runs `migration cancel` here (the
/// destination may have moved the volume on and forgotten it; taking
/// writes again could make a second writer).
fn spawn_reconcile(state: Arc<NodeState>, name: String, id: String) {
    tokio::spawn(async move {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let Ok(vol) = state.store.get(&name) else {
                return;
            };
            let Some(out) = vol.table().outgoing.filter(|o| o.id == id) else {
                return; // cancelled meanwhile
            };
            if vol.fence.is_fenced() {
                vol.fence.release_hold();
                return;
            }
            let path = format!("/v1/migrations/{}/state?id={}", encode_segment(&name), id);
            let r = Peer::new(&out.to, &state.peer_auth, state.source_timeout)
                .get::<MigrationState>(&path)
                .await;
            match r {
                // Cluster mode: only a copy the directory re-confirmed as
                // this node's at startup (bound to its lease by `adopt`)
                // may take writes again; one it gives to another node
                // (a takeover the destination had not recorded yet when
                // it answered) stays held until that node fences it.
                Ok(MigrationState::Passthrough)
                    if super::cluster_migration::is_cluster_volume(&state, &vol)
                        && !vol.fence.is_lease_bound() =>
                {
                    warn!(volume = %name, migration = %id, event = "fault", "the destination says passthrough, but the cluster's directory does not give this copy to this node: writes stay held");
                }
                Ok(MigrationState::Passthrough) => {
                    vol.fence.release_hold();
                    info!(volume = %name, migration = %id, event = "recovered", "destination has not taken the volume: writes resume");
                    spawn_writer_watch(state.clone(), name.clone(), id.clone());
                    return;
                }
                Ok(MigrationState::HandedOff) => {
                    match fence_owned_elsewhere(&vol, &name, &out.to, &id).await {
                        Ok(()) => {
                            info!(volume = %name, migration = %id, event = "fenced", "destination owns the volume: fenced");
                            return;
                        }
                        Err(e) => {
                            warn!(volume = %name, migration = %id, event = "fault", "cannot fence: {e}")
                        }
                    }
                }
                Ok(MigrationState::Unknown) => {
                    let _own = vol.ownership.lock().await;
                    let Some(o) = vol.table().outgoing.filter(|o| o.id == id) else {
                        return; // cancelled while the question was out
                    };
                    let confirmed = !super::cluster_migration::is_cluster_volume(&state, &vol)
                        || vol.fence.is_lease_bound();
                    if confirmed && (o.cancelling || o.rollback_of.is_some()) {
                        // A rollback whose destination (the old source)
                        // never heard of it has not handed off and never
                        // will (this node refuses the fence from now on):
                        // it ends like a cancel. Or: a cancel got as far as
                        // the destination's drop (it
                        // has no clone now, and this node refused to fence
                        // for it since the cancel was recorded): finish it.
                        let done = vol.update_table(|t| {
                            if t.outgoing.as_ref().is_some_and(|o| o.id == id) {
                                t.outgoing = None;
                            }
                            if t.fenced_for.as_deref() == Some(id.as_str()) {
                                t.fenced_for = None;
                                t.fenced_to = None;
                            }
                        });
                        if done.is_ok() {
                            vol.fence.reopen(&id);
                            vol.fence.release_hold();
                            if let Some(c) = vol.clone_target() {
                                c.hold_completion(false);
                            }
                            info!(volume = %name, migration = %id, event = "cancelled", "the cancel interrupted by the restart is complete: the volume stays here");
                            return;
                        }
                    }
                    vol.fence.hold(format!(
                        "writes held: the destination {} has no record of migration {id}; \
                         run `dlsm migration cancel {name}` on this node if the volume is \
                         to stay here",
                        out.to
                    ));
                }
                Err(e) => {
                    warn!(volume = %name, migration = %id, event = "fault", "cannot ask the destination who owns the volume: {e}")
                }
            }
            retry.wait().await;
        }
    });
}

/// Source: when the last client (a hypervisor, typically) that was
/// attached since the migration started disconnects, asks the destination
/// to hand off (it fences this node, for this migration, as part of it).
/// The destination's own origin links are not clients.
fn spawn_writer_watch(state: Arc<NodeState>, name: String, id: String) {
    tokio::spawn(async move {
        let Ok(first) = state.store.get(&name) else {
            return;
        };
        // Woken by every connect and disconnect; the timeout re-checks the
        // table now and then (a migration can also end by other paths).
        let mut count = first.watch_connections();
        drop(first);
        let mut seen_client = false;
        loop {
            let Ok(vol) = state.store.get(&name) else {
                return;
            };
            let Some(out) = vol.table().outgoing.filter(|o| o.id == id) else {
                return;
            };
            if vol.fence.is_fenced() {
                return;
            }
            if vol.connections() > 0 {
                seen_client = true;
            }
            if !seen_client || vol.connections() > 0 {
                drop(vol);
                match tokio::time::timeout(Duration::from_secs(1), count.changed()).await {
                    // The volume this watch was for is gone.
                    Ok(Err(_)) => return,
                    Ok(Ok(())) | Err(_) => continue,
                }
            }
            info!(volume = %name, to = %out.to, migration = %id, event = "handoff_requested", "last client left: asking the destination to hand off");
            let path = format!("/v1/migrations/{}/handoff", encode_segment(&name));
            let req = HandoffRequest {
                force: false,
                id: Some(id.clone()),
            };
            let r = Peer::new(&out.to, &state.peer_auth, state.source_timeout)
                .post::<serde_json::Value>(&path, &req)
                .await;
            if let Err(e) = r {
                // Not fenced: this node still owns the volume; the
                // destination hands off on its first write.
                warn!(volume = %name, migration = %id, event = "fault", "asking the destination to hand off failed: {e}");
            }
            return;
        }
    });
}

/// Every migration this node takes part in, in every role (a middle node
/// of a chain A -> B -> C is B's destination of one and source of the
/// next), then the ended ones from the history that are not live any
/// more. Sources ask their destinations, all at once, each bounded by
/// `--source-timeout`.
pub async fn list(state: &Arc<NodeState>) -> Vec<MigrationStatus> {
    let mut live = Vec::new();
    let mut asks = tokio::task::JoinSet::new();
    for vol in state.store.list() {
        if let Some(c) = vol.clone_target() {
            live.push(c.status());
        }
        if vol.table().outgoing.is_some() {
            let (st, name) = (state.clone(), vol.name.clone());
            asks.spawn(async move { source_status(&st, &name).await });
        }
    }
    while let Some(r) = asks.join_next().await {
        if let Ok(Ok(s)) = r {
            live.push(s);
        }
    }
    live.sort_by(|a, b| (&a.volume, &a.role).cmp(&(&b.volume, &b.role)));
    let mut ended: Vec<MigrationStatus> = state
        .history
        .all()
        .into_iter()
        .rev()
        .filter(|h| {
            !live
                .iter()
                .any(|l| l.volume == h.volume && l.id == h.id && l.role == h.role)
        })
        .collect();
    live.append(&mut ended);
    live
}

/// Status of `name` in `role` (`source` or `destination`; `None`: the
/// destination's if this node is one, else the source's), live or from
/// the history.
pub async fn status_in_role(
    state: &Arc<NodeState>,
    name: &str,
    role: Option<&str>,
) -> Result<MigrationStatus, MigrationError> {
    if let Some(r) = role.filter(|r| !matches!(*r, "source" | "destination")) {
        return Err(MigrationError::Invalid(format!(
            "role {r:?}: expected \"source\" or \"destination\""
        )));
    }
    if let Some(s) = ended_status(state, name, role) {
        return Ok(s);
    }
    let vol = state.store.get(name)?;
    let live = match role {
        Some("source") => source_status(state, name).await,
        Some(_) => vol
            .clone_target()
            .map(|c| c.status())
            .ok_or_else(|| MigrationError::NotMigrating(name.to_owned())),
        None => status(state, name).await,
    };
    match live {
        // It ended between the two looks (a clone collapsing as it
        // completes): its history entry was recorded before the change.
        Err(MigrationError::NotMigrating(_)) => ended_status(state, name, role)
            .ok_or_else(|| MigrationError::NotMigrating(name.to_owned())),
        other => other,
    }
}

/// What an operator can ask of a running migration, on either node.
#[derive(Debug, Clone, Copy)]
pub enum Steer {
    Pause,
    Resume,
    Rate(u64),
}

/// Pauses, resumes or paces the migration of `name`: on its destination
/// directly; on its source by asking the destination for the source's own
/// migration (so a stale clone of another migration is never steered).
/// `id`, when given, must be the migration's.
pub async fn steer(
    state: &Arc<NodeState>,
    name: &str,
    what: Steer,
    id: Option<&str>,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    let out = vol.table().outgoing;
    let clone = vol.clone_target();
    // With an identity, only that migration: this node's clone of it, or
    // its own outgoing one (asked of its destination). Without one, the
    // clone here, else the outgoing migration.
    let (clone, out) = match id {
        Some(id) => match (clone, out) {
            (Some(c), _) if c.migration_id() == id => (Some(c), None),
            (_, Some(o)) if o.id == id => (None, Some(o)),
            _ => {
                return Err(MigrationError::Conflict(format!(
                    "volume {name:?}: asked to steer migration {id}, which this node neither \
                     holds nor migrates"
                )))
            }
        },
        None => (clone, out),
    };
    if let Some(c) = clone {
        match what {
            Steer::Pause => c.pause(),
            Steer::Resume => c.resume(),
            Steer::Rate(r) => c.set_rate(r),
        }
        info!(volume = name, migration = c.migration_id(), event = "steer", action = ?what, "migration steered");
        return Ok(c.status());
    }
    let Some(out) = out else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    let (verb, body) = match what {
        Steer::Pause => ("pause", serde_json::Value::Null),
        Steer::Resume => ("resume", serde_json::Value::Null),
        Steer::Rate(r) => ("rate", serde_json::json!({ "rate": r })),
    };
    let path = format!(
        "/v1/migrations/{}/{verb}?id={}",
        encode_segment(name),
        encode_segment(&out.id)
    );
    via_destination(state, out, &path, &body, state.source_timeout, |to, e| {
        format!("the copy runs on the destination {to}, which could not be asked: {e}")
    })
    .await
}

/// Asks the destination of this node's outgoing migration `out` to act
/// (`path`, with `body`) and answers with its status as this node, the
/// source, reports it; `why` words a failure.
async fn via_destination(
    state: &NodeState,
    out: Outgoing,
    path: &str,
    body: &impl serde::Serialize,
    timeout: Duration,
    why: impl FnOnce(&str, PeerError) -> String,
) -> Result<MigrationStatus, MigrationError> {
    let mut s = Peer::new(&out.to, &state.peer_auth, timeout)
        .post::<MigrationStatus>(path, body)
        .await
        .map_err(|e| MigrationError::Peer(why(&out.to, e)))?;
    s.role = "source".into();
    s.peer = out.to;
    Ok(s)
}

/// The source's view of its outgoing migration of `name` (asks the
/// destination).
async fn source_status(
    state: &Arc<NodeState>,
    name: &str,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    status_as_source(state, &vol, name).await
}

/// Records in the history that `vol`'s migrations (in any role) ended
/// because an operator removed it.
pub fn record_removed(state: &NodeState, live: Vec<MigrationStatus>) {
    for mut s in live {
        s.phase = Phase::Failed;
        state.history.record(
            s,
            "volume removed by the operator (--force) during the migration",
        );
    }
}

/// What `record_removed` will need, read before the removal.
pub fn live_statuses(vol: &Volume) -> Vec<MigrationStatus> {
    let mut v = Vec::new();
    if let Some(c) = vol.clone_target() {
        v.push(c.status());
    }
    if let Some(out) = vol.table().outgoing {
        let mut s = MigrationStatus::unknown(&vol.name, &out.id);
        s.role = "source".into();
        s.peer = out.to;
        v.push(s);
    }
    v
}

/// Source of a handed-off migration: asks its destination to roll it
/// back (see [`rollback`]) and answers with the destination's report.
async fn forward_rollback(
    state: &Arc<NodeState>,
    name: &str,
    to: &str,
    id: &str,
) -> Result<serde_json::Value, MigrationError> {
    let path = format!("/v1/migrations/{}/rollback", encode_segment(name));
    let req = RollbackRequest {
        id: Some(id.to_owned()),
    };
    // The destination calls back here (prepare): give it its own timeout
    // and one of ours.
    let timeout = state.source_timeout * 2;
    Peer::new(to, &state.peer_auth, timeout)
        .post::<serde_json::Value>(&path, &req)
        .await
        .map_err(|e| match e.status() {
            Some(409 | 404) => MigrationError::Conflict(format!(
                "volume {name:?} was handed off to {to}, which refused to roll it back: {e}"
            )),
            _ => MigrationError::Peer(format!(
                "volume {name:?} was handed off to {to} (this node is fenced); asking it to roll \
             back failed: {e}"
            )),
        })
}

/// Destination of a handed-off migration: rolls it back to its source
/// (see `migrate::clone::rollback`). Records the rollback as this node's
/// outgoing migration R, then has the source make its fenced copy the
/// clone R of this node's volume; clients move back the way they came
/// (the handoff comes when the last client here leaves, or by operator),
/// and only regions written here since the first handoff cross back.
/// Idempotent: asked again, answers with the rollback under way.
pub async fn rollback(
    state: &Arc<NodeState>,
    name: &str,
    req: RollbackRequest,
) -> Result<serde_json::Value, MigrationError> {
    let vol = state.store.get(name)?;
    if super::cluster_migration::is_cluster_volume(state, &vol) {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} is a cluster volume: rollback is not built for cluster mode; \
             it goes back by `dlsm migrate {name} --to NODE` once this migration completes"
        )));
    }
    let _own = vol.ownership.lock().await;
    let c = vol
        .clone_target()
        .ok_or_else(|| MigrationError::NotMigrating(name.to_owned()))?;
    let m = c.migration_id().to_owned();
    if let Some(id) = req.id.as_deref().filter(|id| *id != m) {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: asked to roll back migration {id}, but this node holds migration {m}"
        )));
    }
    let report = |to: &str, r: &str| {
        serde_json::json!({
            "rolled_back": name,
            "to": to,
            "migration": r,
            "rolls_back": m,
            "regions_written": c.written_regions(),
            "bytes_written": c.written_bytes(),
        })
    };
    let t = vol.table();
    if let Some(o) = &t.outgoing {
        if o.rollback_of.as_deref() == Some(m.as_str()) {
            return Ok(report(&o.to, &o.id));
        }
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} is migrating on to {} (migration {}): cancel that first",
            o.to, o.id
        )));
    }
    if !c.is_handed_off() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} was not handed off here yet: cancel it on the source {} instead \
             (nothing needs to move back)",
            c.peer()
        )));
    }
    if c.is_complete() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: migration {m} is complete and its source copy released; migrate \
             the volume back instead"
        )));
    }
    if c.rollback_of().is_some() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: migration {m} is itself a rollback, which cannot be rolled back \
             (there is no copy left where it came from to reuse); cancel it before its handoff, \
             or migrate the volume again once it completes"
        )));
    }
    if c.source_unfenced() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: migration {m} was handed off by force and its source has not been \
             fenced since; a rollback needs that source's copy fenced first (it is, as soon as \
             the source can be reached)"
        )));
    }
    if !c.tracks_writes() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: migration {m} began before this node recorded the regions clients \
             write, so it cannot tell what would have to move back; migrate the volume back \
             instead"
        )));
    }
    if let Some(why) = vol.fence.held() {
        return Err(MigrationError::Conflict(format!("volume {name:?}: {why}")));
    }
    let TargetSpec::Clone {
        origin,
        region_size,
        rate,
        ..
    } = &t.target
    else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    let TargetSpec::Remote { api: back_to, .. } = origin.as_ref() else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    let nbd = state
        .advertised_nbd
        .clone()
        .ok_or_else(|| MigrationError::Conflict("this node has no TCP NBD listener".into()))?;
    let r = new_migration_id();
    // Held from before the rollback is recorded: the clone must not
    // complete (and stop recording writes) while it is under way.
    c.hold_completion(true);
    if let Err(e) = vol.update_table(|t| {
        t.outgoing = Some(Outgoing {
            to: back_to.clone(),
            keep_source: false,
            id: r.clone(),
            cancelling: false,
            rollback_of: Some(m.clone()),
        })
    }) {
        c.hold_completion(false);
        return Err(e.into());
    }
    let prep = PrepareRequest {
        name: name.to_owned(),
        id: r.clone(),
        size: vol.size,
        origin_nbd: nbd,
        origin_api: state.advertised_api.clone(),
        region_size: *region_size,
        rate: *rate,
        rollback_of: Some(m.clone()),
        origin_node: Some(state.id.clone()),
        generation: None, // rollbacks are peer mode only
    };
    let peer = back_to.clone();
    let answer = Peer::new(&peer, &state.peer_auth, state.source_timeout)
        .post::<MigrationStatus>("/v1/migrations", &prep)
        .await;
    if let Err(e) = answer {
        if e.status().is_none() {
            // No answer: the source may have made the clone. R stays
            // recorded (this node still takes writes: it is not fenced),
            // and the reconcile asks the source until it knows: prepared,
            // then the rollback goes on; no record, then R is dropped.
            warn!(volume = name, to = %back_to, migration = %r, event = "fault", "the old source did not answer the rollback's prepare ({e}); settling it in the background");
            spawn_reconcile(state.clone(), name.to_owned(), r.clone());
            return Err(MigrationError::Peer(format!(
                "the source {back_to} did not answer ({e}); the rollback (migration {r}) goes \
                 on if it was prepared there, and is dropped if not: `migration status` says \
                 which"
            )));
        }
        // It answered no: forgetting R is safe, since this node refuses
        // it the fence from now on.
        let _ = vol.update_table(|t| {
            if t.outgoing.as_ref().is_some_and(|o| o.id == r) {
                t.outgoing = None;
            }
        });
        c.hold_completion(false);
        return Err(MigrationError::Peer(format!(
            "the source {back_to} could not take the volume back: {e}"
        )));
    }
    info!(volume = name, to = %back_to, migration = %r, rolls_back = %m, bytes_written = c.written_bytes(), event = "rollback", "rollback prepared: the volume goes back when its clients do");
    spawn_writer_watch(state.clone(), name.to_owned(), r.clone());
    Ok(report(back_to, &r))
}

/// Source of a rolled-back migration: makes this node's fenced copy the
/// clone of rollback `req.id` (see [`rollback`]). Only the destination of
/// this node's own outgoing migration `req.rollback_of` may ask.
async fn prepare_rollback(
    state: &Arc<NodeState>,
    req: PrepareRequest,
    of: String,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(&req.name)?;
    let _own = vol.ownership.lock().await;
    if let Some(c) = vol.clone_target() {
        if c.migration_id() == req.id {
            return Ok(c.status());
        }
    }
    let t = vol.table();
    // The node that asks is the one this node was fenced for (it gave
    // its own address then; the operator may have named it otherwise).
    let from_it = |o: &Outgoing| {
        o.to == req.origin_api || t.fenced_to.as_deref() == Some(req.origin_api.as_str())
    };
    let ok = t
        .outgoing
        .as_ref()
        .is_some_and(|o| o.id == of && from_it(o))
        && t.fenced_for.as_deref() == Some(of.as_str())
        && vol.fence.is_fenced();
    if !ok {
        return Err(MigrationError::Conflict(format!(
            "volume {:?}: refusing a rollback of migration {of} from {}: this node is not that \
             migration's fenced source",
            req.name, req.origin_api
        )));
    }
    let out = t.outgoing.expect("checked");
    let origin = TargetSpec::Remote {
        nbd: req.origin_nbd.clone(),
        export: req.name.clone(),
        api: req.origin_api.clone(),
    };
    let base = super::store::RollbackBase {
        id: of.clone(),
        to: out.to.clone(),
        keep_source: out.keep_source,
    };
    let (store, v) = (state.store.clone(), vol.clone());
    let (rs, rate, id) = (req.region_size, req.rate, req.id.clone());
    let c = tokio::task::spawn_blocking(move || {
        store.make_rollback_clone(&v, origin, rs, rate, &id, base)
    })
    .await
    .map_err(|e| MigrationError::Peer(e.to_string()))??;
    c.start();
    spawn_supervisor(state.clone(), vol.clone());
    let mut ended = source_ended(&req.name, &out, None, Phase::Cancelled);
    ended.phase = Phase::Cancelled;
    state.history.record(
        ended,
        &format!(
            "rolled back after handoff: migration {} brings the volume back here",
            req.id
        ),
    );
    info!(volume = %req.name, from = %req.origin_api, migration = %req.id, rolls_back = %of, event = "rollback", "rollback prepared: passthrough, over this node's own copy");
    Ok(c.status())
}

/// Destination of a migration being rolled back, once fenced for the
/// rollback `id`: the regions clients wrote here since handoff.
pub fn written_set(state: &NodeState, name: &str, id: &str) -> Result<WrittenSet, MigrationError> {
    let vol = state.store.get(name)?;
    let t = vol.table();
    let ours = t
        .outgoing
        .as_ref()
        .is_some_and(|o| o.id == id && o.rollback_of.is_some());
    if !ours || t.fenced_for.as_deref() != Some(id) || !vol.fence.is_fenced() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?}: the written set is only given to the rollback this node is \
             fenced for, not migration {id}"
        )));
    }
    let c = vol
        .clone_target()
        .ok_or_else(|| MigrationError::NotMigrating(name.to_owned()))?;
    // Written *and* present: a region whose bit was recorded but whose
    // data never landed (a partial write whose fetch failed; a crash
    // before the region map's commit, which NBD lets lose an unflushed
    // write) is absent here, so it still reads as the old source's copy,
    // which is therefore current for it. Asking this node for it would
    // send it back to that copy, no longer served once R handed off.
    let runs = c.written_present_runs().ok_or_else(|| {
        MigrationError::Conflict(format!("volume {name:?}: writes are not tracked"))
    })?;
    Ok(WrittenSet {
        region_size: c.region_size(),
        runs,
    })
}

/// `migration cancel` on either node: the source cancels (or, after
/// handoff, has the destination roll back); a destination rolls back a
/// handed-off migration itself and passes anything else to the source.
pub async fn cancel_anywhere(
    state: &Arc<NodeState>,
    name: &str,
    req: CancelRequest,
) -> Result<serde_json::Value, MigrationError> {
    let force = req.force;
    let vol = state.store.get(name)?;
    if let Some(id) = &req.id {
        // Passed on by a destination: only this node's outgoing migration
        // of that identity (invariant 7), never a rollback of another.
        if vol.table().outgoing.is_none_or(|o| &o.id != id) {
            return Err(MigrationError::NotMigrating(name.to_owned()));
        }
        return cancel(state, name, force).await;
    }
    if vol.table().outgoing.is_some() {
        return cancel(state, name, force).await;
    }
    let Some(c) = vol.clone_target() else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    if c.is_handed_off() {
        return rollback(
            state,
            name,
            RollbackRequest {
                id: Some(c.migration_id().to_owned()),
            },
        )
        .await;
    }
    // Not handed off: the source decides (it drops this clone).
    let source = c.peer().to_owned();
    let path = format!("/v1/migrations/{}/cancel", encode_segment(name));
    let body = CancelRequest {
        force,
        id: Some(c.migration_id().to_owned()),
    };
    let r = Peer::new(&source, &state.peer_auth, state.source_timeout * 2)
        .post::<serde_json::Value>(&path, &body)
        .await;
    match r {
        Ok(v) => Ok(v),
        // The source has no such outgoing migration (it never recorded
        // it, or forgot it): this clone can never hand off, since the
        // source refuses it the fence. Or the source is gone and the
        // operator says so. Either way it goes (a rollback clone goes back
        // to its fenced copy).
        Err(e)
            if (e.status() == Some(404)
                && e.to_string().contains("is not migrating on this node"))
                || (force && e.status().is_none()) =>
        {
            warn!(
                volume = name,
                migration = c.migration_id(),
                event = "cancelled",
                "the source {source} does not hold this migration ({e}); dropping the clone here"
            );
            drop_clone(state, name, c.migration_id(), None).await?;
            Ok(serde_json::json!({ "cancelled": name, "migration": c.migration_id() }))
        }
        Err(e) => Err(MigrationError::Peer(format!(
            "the migration is not handed off yet, so its source {source} cancels it, and \
             asking it failed: {e} (run `dlsm migration cancel` there)"
        ))),
    }
}
