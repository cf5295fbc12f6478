//! Migration orchestration between nodes: what each node does, and says to
//! the other, for `dlsm migrate`.
//!
//! ```text
//!  CLI ──migrate──► source A ──POST /v1/migrations──► destination B   (prepare: constant time)
//!                   A records `outgoing`, watches its writers
//!  first write at B, A's last writer leaving, or `migration handoff`:
//!                   B ──POST /v1/volumes/N/fence──► A: refuse writes, finish admitted ones, flush
//!                   B: mark A's zero ranges present, commit map, persist handed_off, hydrate
//!  all regions present at B:
//!                   B: table := local, drop origin link
//!                   B ──POST /v1/volumes/N/release──► A: delete (or keep, fenced)
//! ```
//!
//! Every step that changes ownership is persisted by the node that makes it
//! before it acts on it, so a restart of either node keeps one writer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::store::{
    update_table, HooksFactory, Outgoing, StoreError, TargetSpec, Volume, VolumeTable,
};
use super::NodeState;
use crate::api_client::{Api, ApiAuth};
use crate::migrate::clone::MigrationHooks;
use crate::migrate::{MigrationStatus, Phase};
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
    #[error("peer node: {0}")]
    Peer(String),
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// Body of `POST /v1/volumes/{name}/migrate` (to the source).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination node's API address.
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
    pub size: u64,
    pub origin_nbd: String,
    pub origin_api: String,
    pub region_size: u64,
    #[serde(default)]
    pub rate: u64,
}

/// Body of `POST /v1/volumes/{name}/fence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FenceRequest {
    pub to: String,
}

/// Body of `POST /v1/migrations/{name}/handoff`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandoffRequest {
    #[serde(default)]
    pub force: bool,
}

/// Body of `POST /v1/migrations/{name}/rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateRequest {
    pub rate: u64,
}

/// Runs a blocking API call off the async workers.
async fn call<T, F>(f: F) -> Result<T, MigrationError>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MigrationError::Peer(e.to_string()))?
        .map_err(|e| MigrationError::Peer(format!("{e:#}")))
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
}

#[async_trait]
impl MigrationHooks for NodeHooks {
    async fn fence_source(&self) -> Result<(), String> {
        let (name, api) = {
            let t = self.table.lock().unwrap();
            match &t.target {
                TargetSpec::Clone { origin, .. } => match origin.as_ref() {
                    TargetSpec::Remote { api, .. } => (t.name.clone(), api.clone()),
                    _ => return Err("clone origin is not remote".into()),
                },
                _ => return Err("volume is not a clone".into()),
            }
        };
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            let (api2, name2, me) = (api.clone(), name.clone(), self.me.clone());
            let auth = self.auth.clone();
            let r = call(move || {
                Api::with_auth(&api2, &auth).post::<serde_json::Value>(
                    &format!("/v1/volumes/{name2}/fence"),
                    &FenceRequest { to: me },
                )
            })
            .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() + backoff > deadline => {
                    return Err(format!(
                        "source {api} did not fence within {:?}: {e}",
                        self.timeout
                    ))
                }
                Err(e) => {
                    warn!(volume = %name, "fencing the source failed, retrying: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn persist_handoff(&self, source_fenced: bool) -> Result<(), String> {
        update_table(&self.dir, &self.table, |t| {
            if let TargetSpec::Clone {
                handed_off,
                source_unfenced,
                ..
            } = &mut t.target
            {
                *handed_off = true;
                *source_unfenced = !source_fenced;
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }
}

/// Builds the hooks for the store (see [`super::store::CloneEnv`]).
pub fn hooks_factory(me: String, timeout: Duration, auth: ApiAuth) -> HooksFactory {
    Arc::new(move |dir, table| {
        Arc::new(NodeHooks {
            dir: dir.to_owned(),
            table,
            me: me.clone(),
            timeout,
            auth: auth.clone(),
        }) as Arc<dyn MigrationHooks>
    })
}

/// After the store opened: start hydrators and watchers of every volume
/// that was migrating when the node stopped.
pub fn resume_all(state: &Arc<NodeState>) {
    for v in state.store.list() {
        if let Some(c) = v.clone_target() {
            c.start();
            spawn_supervisor(state.clone(), v.clone());
        }
        if v.table().outgoing.is_some() && !v.fence.is_fenced() {
            spawn_writer_watch(state.clone(), v.name.clone());
        }
    }
}

/// Source: starts migrating `name` to `req.to`.
pub async fn migrate(
    state: &Arc<NodeState>,
    name: &str,
    req: MigrateRequest,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    if vol.fence.is_fenced() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} was already handed off from this node"
        )));
    }
    if let Some(o) = vol.table().outgoing {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} is already migrating to {}",
            o.to
        )));
    }
    if let Some(c) = vol.clone_target() {
        if !c.is_handed_off() {
            return Err(MigrationError::Conflict(format!(
                "volume {name:?} has not been handed off to this node yet"
            )));
        }
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
    vol.update_table(|t| {
        t.outgoing = Some(Outgoing {
            to: req.to.clone(),
            keep_source: req.keep_source,
        })
    })?;
    let prep = PrepareRequest {
        name: name.to_owned(),
        size: vol.size,
        origin_nbd: nbd,
        origin_api: state.advertised_api.clone(),
        region_size,
        rate: req.rate.unwrap_or(0),
    };
    let (to, auth) = (req.to.clone(), state.peer_auth.clone());
    let r =
        call(move || Api::with_auth(&to, &auth).post::<MigrationStatus>("/v1/migrations", &prep))
            .await;
    match r {
        Ok(mut status) => {
            info!(volume = name, to = %req.to, "migration prepared");
            spawn_writer_watch(state.clone(), name.to_owned());
            status.role = "source".into();
            status.peer = req.to.clone();
            Ok(status)
        }
        Err(e) => {
            // Nothing was created at the destination: forget the attempt.
            let _ = vol.update_table(|t| t.outgoing = None);
            Err(e)
        }
    }
}

/// Destination: creates the clone volume and exports it at once.
pub async fn prepare(
    state: &Arc<NodeState>,
    req: PrepareRequest,
) -> Result<MigrationStatus, MigrationError> {
    let origin = TargetSpec::Remote {
        nbd: req.origin_nbd.clone(),
        export: req.name.clone(),
        api: req.origin_api.clone(),
    };
    let store = state.store.clone();
    let r = req.clone();
    let vol = tokio::task::spawn_blocking(move || {
        store.create_clone(&r.name, r.size, origin, r.region_size, r.rate)
    })
    .await
    .map_err(|e| MigrationError::Peer(e.to_string()))??;
    let clone = vol.clone_target().expect("a clone volume");
    clone.start();
    spawn_supervisor(state.clone(), vol);
    info!(volume = %req.name, from = %req.origin_api, "migration prepared: passthrough");
    Ok(clone.status())
}

/// Source: fences the volume (writes refused from now on) and flushes.
pub async fn fence(state: &Arc<NodeState>, name: &str, to: &str) -> Result<(), MigrationError> {
    let vol = state.store.get(name)?;
    vol.fence.fence(to, &*vol.target()).await?;
    if let Some(c) = vol.clone_target() {
        // A clone that is itself a source: its map must be durable too.
        c.commit().await?;
    }
    vol.update_table(|t| t.fenced_to = Some(to.to_owned()))?;
    info!(volume = name, to, "fenced: writes now refused here");
    Ok(())
}

/// Source: the destination has everything; delete (or keep) our copy.
pub async fn release(state: &Arc<NodeState>, name: &str) -> Result<(), MigrationError> {
    let vol = state.store.get(name)?;
    if !vol.fence.is_fenced() {
        return Err(MigrationError::Conflict(format!(
            "volume {name:?} was never handed off; refusing to release it"
        )));
    }
    // A clone that still pulls from its own origin (B in A -> B -> C) does
    // not need it any more: release that too.
    if let Some(c) = vol.clone_target() {
        c.stop();
        if let Some(TargetSpec::Clone { origin, .. }) = Some(vol.table().target) {
            if let TargetSpec::Remote { api, .. } = *origin {
                spawn_release(api, name.to_owned(), state.peer_auth.clone());
            }
        }
    }
    let keep = vol.table().outgoing.is_some_and(|o| o.keep_source);
    if keep {
        vol.update_table(|t| t.outgoing = None)?;
        info!(volume = name, "released: kept (fenced) as asked");
    } else {
        let store = state.store.clone();
        let n = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove(&n, true))
            .await
            .map_err(|e| MigrationError::Peer(e.to_string()))??;
        info!(volume = name, "released: deleted");
    }
    Ok(())
}

/// Destination: handoff on request (source's last writer left, or operator).
pub async fn handoff(
    state: &Arc<NodeState>,
    name: &str,
    force: bool,
) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    let c = vol
        .clone_target()
        .ok_or_else(|| MigrationError::NotMigrating(name.to_owned()))?;
    c.handoff(force).await?;
    Ok(c.status())
}

/// Status, on either node. The source asks the destination.
pub async fn status(state: &Arc<NodeState>, name: &str) -> Result<MigrationStatus, MigrationError> {
    let vol = state.store.get(name)?;
    if let Some(c) = vol.clone_target() {
        return Ok(c.status());
    }
    let Some(out) = vol.table().outgoing else {
        return Err(MigrationError::NotMigrating(name.to_owned()));
    };
    let (to, n, auth) = (out.to.clone(), name.to_owned(), state.peer_auth.clone());
    let get =
        move || Api::with_auth(&to, &auth).get::<MigrationStatus>(&format!("/v1/migrations/{n}"));
    match call(get).await {
        Ok(mut s) => {
            s.role = "source".into();
            s.peer = out.to;
            Ok(s)
        }
        Err(e) => Ok(MigrationStatus {
            volume: name.to_owned(),
            phase: if vol.fence.is_fenced() {
                Phase::Hydrating
            } else {
                Phase::Passthrough
            },
            role: "source".into(),
            peer: out.to,
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
            last_error: Some(format!("destination unreachable: {e}")),
        }),
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

/// Destination: when the clone completes, collapse the table to `local`,
/// drop the origin link and release the source.
fn spawn_supervisor(state: Arc<NodeState>, vol: Arc<Volume>) {
    tokio::spawn(async move {
        let Some(c) = vol.clone_target() else { return };
        c.wait_complete().await;
        let status = c.status();
        let origin_api = match vol.table().target {
            TargetSpec::Clone { origin, .. } => match *origin {
                TargetSpec::Remote { api, .. } => Some(api),
                _ => None,
            },
            _ => None,
        };
        // Kept beside the table, so `migration status` still answers after
        // a restart (the in-memory record below is lost then).
        if let Err(e) = write_completed(vol.dir(), &status) {
            warn!(volume = %vol.name, "cannot record the completed migration: {e}");
        }
        loop {
            match vol.collapse_to_local() {
                Ok(()) => break,
                Err(e) => {
                    warn!(volume = %vol.name, "cannot collapse table, retrying: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        c.origin().close();
        state
            .completed
            .lock()
            .unwrap()
            .insert(vol.name.clone(), status);
        info!(volume = %vol.name, "migration complete: volume is local");
        if let Some(api) = origin_api {
            spawn_release(api, vol.name.clone(), state.peer_auth.clone());
        }
    });
}

/// File in a volume's directory holding the status of the migration that
/// brought it here, once complete.
const COMPLETED_FILE: &str = "last-migration.json";

fn write_completed(dir: &std::path::Path, status: &MigrationStatus) -> std::io::Result<()> {
    let tmp = dir.join(format!("{COMPLETED_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(COMPLETED_FILE))
}

/// The completed migration that brought `name` here, if it is a plain
/// local volume now: from memory, or from its directory after a restart.
pub fn completed_status(state: &NodeState, name: &str) -> Option<MigrationStatus> {
    let vol = state.store.get(name).ok()?;
    // Migrating again (in or out): the newer migration is the answer.
    if vol.clone_target().is_some() || vol.table().outgoing.is_some() {
        return None;
    }
    if let Some(s) = state.completed.lock().unwrap().get(name) {
        return Some(s.clone());
    }
    let text = std::fs::read(vol.dir().join(COMPLETED_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Tells a source it may release `name`, retrying for a while.
fn spawn_release(api: String, name: String, auth: ApiAuth) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        for _ in 0..30 {
            let (a, n, auth) = (api.clone(), name.clone(), auth.clone());
            let r = call(move || {
                Api::with_auth(&a, &auth)
                    .post::<serde_json::Value>(&format!("/v1/volumes/{n}/release"), &())
            })
            .await;
            match r {
                Ok(_) => return,
                Err(e) if e.to_string().contains("HTTP 404") => return,
                Err(e) => {
                    warn!(volume = %name, source = %api, "release failed, retrying: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        warn!(volume = %name, source = %api, "gave up releasing the source copy; release it by hand");
    });
}

/// Source: hands off when the last client (a hypervisor, typically) that
/// was attached since the migration started disconnects. The destination's
/// own origin links (`NAME@origin`) are not clients.
fn spawn_writer_watch(state: Arc<NodeState>, name: String) {
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
            let Some(out) = vol.table().outgoing else {
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
            info!(volume = %name, to = %out.to, "last client left: handing off");
            if let Err(e) = fence(&state, &name, &out.to).await {
                warn!(volume = %name, "self-fence failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let (to, n, auth) = (out.to.clone(), name.clone(), state.peer_auth.clone());
            let r = call(move || {
                Api::with_auth(&to, &auth).post::<serde_json::Value>(
                    &format!("/v1/migrations/{n}/handoff"),
                    &HandoffRequest::default(),
                )
            })
            .await;
            if let Err(e) = r {
                // Fenced already; the destination hands off on its first write.
                warn!(volume = %name, "telling the destination failed: {e}");
            }
            return;
        }
    });
}
