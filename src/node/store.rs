//! The volume store: every volume this node owns, persisted in its data
//! directory.
//!
//! ```text
//! DATA_DIR/
//!   volumes/
//!     NAME/
//!       table.json     the volume's mapping table (which targets, how stacked)
//!       data.raw       the local target's sparse file
//!     .tmp-NAME-*/     a volume being created (removed at startup)
//! ```
//!
//! Crash story: a volume is created in a `.tmp-` directory (data file
//! allocated, table written and fsynced) and then renamed into place, and the
//! parent directory fsynced; so after a crash at any point a volume either
//! exists whole or not at all, and leftovers are swept at startup. Table
//! changes are written to `table.json.tmp`, fsynced, renamed over
//! `table.json`, and the directory fsynced. Removal renames the volume
//! directory to a `.tmp-` name first, so a half-deleted volume never comes
//! back.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::fence::{Fence, FenceGate};
use crate::migrate::clone::{CloneConfig, CloneTarget, MigrationHooks};
use crate::migrate::region_map::RegionMap;
use crate::nbd::client::NbdAddr;
use crate::target::{BlockError, BlockTarget, LocalTarget, RemoteTarget};

/// Errors of the store boundary; mapped to HTTP statuses in the API.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "invalid volume name {0:?}: use 1-64 of A-Z a-z 0-9 . _ - and do not start with '.' or '-'"
    )]
    InvalidName(String),
    #[error("invalid size: {0}")]
    InvalidSize(String),
    #[error("volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("no volume named {0:?}")]
    NotFound(String),
    #[error("volume {0:?} is in use by {1} NBD connection(s)")]
    Busy(String, usize),
    #[error("{0}")]
    Migrating(String),
    #[error("volume {name:?} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    #[error(
        "data directory {dir} is in use by another dlsm node ({holder}); two nodes on one \
         directory would both write its volumes"
    )]
    DirLocked { dir: PathBuf, holder: String },
    #[error("storage error: {0}")]
    Block(#[from] BlockError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A size the data directory's filesystem cannot hold in one file (ext4
/// stops just short of 16 TiB) is the caller's to fix, not a storage fault.
fn too_large(e: BlockError, size: u64) -> StoreError {
    match &e {
        BlockError::Io(io) if io.raw_os_error() == Some(nix::libc::EFBIG) => {
            StoreError::InvalidSize(format!(
                "{size} bytes: larger than the data directory's filesystem allows for one file"
            ))
        }
        _ => e.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One layer of a volume's mapping table. Layers stack by nesting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetSpec {
    /// A sparse raw file inside the volume's directory.
    Local { file: String },
    /// Another node's export (a migration's origin).
    Remote {
        /// The origin node's NBD address (`HOST:PORT`).
        nbd: String,
        export: String,
        /// The origin node's control API (for fencing and release).
        api: String,
    },
    /// Origin + local file + region map: a volume migrating in.
    Clone {
        origin: Box<TargetSpec>,
        local: Box<TargetSpec>,
        map: String,
        region_size: u64,
        handed_off: bool,
        /// Handed off by force; the source not fenced since.
        #[serde(default)]
        source_unfenced: bool,
        #[serde(default)]
        rate: u64,
        /// The migration's identity (see [`Outgoing::id`]).
        #[serde(default)]
        migration: String,
        /// Set when this clone rolls back an earlier migration of the
        /// volume away from this node: the local file is the copy this
        /// node was fenced with (see `migrate::clone::rollback`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollback_of: Option<RollbackBase>,
    },
}

/// What a rollback clone keeps of the migration it rolls back, so that a
/// rollback cancelled before its handoff can put the table back as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackBase {
    /// The migration rolled back.
    pub id: String,
    /// Where it took the volume (the node now rolling it back here).
    pub to: String,
    /// Whether that migration was to keep this copy after completion.
    #[serde(default)]
    pub keep_source: bool,
}

/// The written map of a clone: regions clients wrote since its handoff.
pub const WRITTEN_MAP: &str = "written.map";

/// An outgoing migration, recorded on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The destination node's API.
    pub to: String,
    pub keep_source: bool,
    /// The migration's identity: made by the source when the migration
    /// starts, persisted on both sides, carried by every node-to-node call
    /// (prepare, fence, handoff, release, the origin link's export name).
    /// A call naming any other identity is refused, so a late or
    /// duplicated message can never act on a later incarnation of the
    /// volume (DESIGN invariant 7).
    #[serde(default)]
    pub id: String,
    /// An operator's cancel is under way (recorded before the destination
    /// is asked to drop its clone): the source refuses to fence for this
    /// migration from then on, so the destination can never take the
    /// volume, and a restarted source that finds the destination has no
    /// record of the migration knows the cancel got that far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelling: bool,
    /// This outgoing migration rolls back migration `rollback_of`, which
    /// brought the volume here from `to` (this node's clone of it then
    /// holds completion and keeps recording writes until the handoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
}

/// A migration identity: 64 random bits, as 16 hex digits.
pub fn new_migration_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A source copy the destination still has to release (persisted, so a
/// restart or a long outage of the source does not leak the copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRelease {
    /// The source node's API.
    pub api: String,
    /// The migration whose source copy it is.
    pub id: String,
}

/// How many identities of migrations that handed off to this node a
/// volume remembers (so a source returning after a long outage learns
/// that it lost the volume).
pub const ARRIVED_KEPT: usize = 32;

/// The persisted description of a volume (`table.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeTable {
    pub name: String,
    pub size: u64,
    pub target: TargetSpec,
    /// Set once this node handed the volume off: writes are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_to: Option<String>,
    /// The migration this node was fenced for (with `fenced_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_for: Option<String>,
    /// Set while the volume migrates away from this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<Outgoing>,
    /// Identities of the migrations that handed the volume off to this
    /// node, newest last (at most [`ARRIVED_KEPT`]). A table is made anew
    /// for every incoming migration, so in practice this is the one that
    /// brought the volume here: what a source returning after a long
    /// outage asks about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arrived: Vec<String>,
    /// The source copy this node must still tell to release itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_pending: Option<PendingRelease>,
    /// Cluster mode: the generation of the directory record this copy was
    /// made under (0: made in peer mode, no record). A copy with a
    /// generation whose record names another node is stale.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Set (in memory only) when the volume is removed: a task still
    /// holding it must not write its table into a new volume that took
    /// its name and directory.
    #[serde(skip)]
    pub removed: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A live volume: its table and the stacked target that serves it.
pub struct Volume {
    pub name: String,
    pub size: u64,
    table: Arc<Mutex<VolumeTable>>,
    /// The top target. Connections read it per request ([`LiveTarget`]),
    /// so a change of table (collapse, rollback) reaches every connection
    /// at once, old ones included.
    target: Arc<std::sync::RwLock<Arc<dyn BlockTarget>>>,
    clone: Mutex<Option<Arc<CloneTarget>>>,
    pub fence: Arc<Fence>,
    /// Held for the whole of every change of who owns the volume on this
    /// node (migrate, fence, release, cancel, the restart reconcile), so
    /// none of them interleaves with another at an await.
    pub ownership: tokio::sync::Mutex<()>,
    connections: Arc<tokio::sync::watch::Sender<usize>>,
    dir: PathBuf,
}

impl Volume {
    /// Open NBD connections to this volume.
    pub fn connections(&self) -> usize {
        *self.connections.borrow()
    }

    /// Wakes on every change of [`Volume::connections`].
    pub fn watch_connections(&self) -> tokio::sync::watch::Receiver<usize> {
        self.connections.subscribe()
    }

    /// A guard counting one connection until dropped.
    pub fn connection_guard(&self) -> ConnectionGuard {
        self.connections.send_modify(|n| *n += 1);
        ConnectionGuard(self.connections.clone())
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current table (a copy).
    pub fn table(&self) -> VolumeTable {
        self.table.lock().unwrap().clone()
    }

    /// The current top target.
    pub fn target(&self) -> Arc<dyn BlockTarget> {
        self.target.read().unwrap().clone()
    }

    /// The target an NBD connection gets: the top target behind the fence.
    pub fn gated_target(&self) -> Arc<dyn BlockTarget> {
        let live: Arc<dyn BlockTarget> = Arc::new(LiveTarget(self.target.clone()));
        Arc::new(FenceGate::new(live, self.fence.clone()))
    }

    /// The migration clone, while this volume migrates in.
    pub fn clone_target(&self) -> Option<Arc<CloneTarget>> {
        self.clone.lock().unwrap().clone()
    }

    /// Changes the table durably, then in memory.
    pub fn update_table(
        &self,
        f: impl FnOnce(&mut VolumeTable),
    ) -> Result<VolumeTable, StoreError> {
        update_table(&self.dir, &self.table, f)
    }

    /// Collapses a completed clone to its local target: table first
    /// (durable, with the source copy still to release in the same write),
    /// then the live target; finally the map file goes.
    pub fn collapse_to_local(&self, release: Option<PendingRelease>) -> Result<(), StoreError> {
        let Some(clone) = self.clone_target() else {
            return Ok(());
        };
        let TargetSpec::Clone { local, map, .. } = self.table().target else {
            return Ok(());
        };
        self.update_table(|t| {
            t.target = *local.clone();
            t.release_pending = release;
        })?;
        *self.target.write().unwrap() = clone.local();
        *self.clone.lock().unwrap() = None;
        let map_path = self.dir.join(map);
        let _ = fs::remove_file(&map_path);
        let _ = fs::remove_file(self.dir.join(WRITTEN_MAP));
        Ok(())
    }
}

/// Who removes a volume, which decides what is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// `volume rm`: refused while clients are attached or while a
    /// migration needs the copy (source or destination), unless `force`.
    Operator { force: bool },
    /// The destination of a completed migration released this source
    /// copy: clients still attached keep reading the unlinked file.
    Released,
    /// The source cancelled a migration before handoff: this clone goes.
    Cancelled,
}

/// What [`VolumeStore::create_clone`] makes a destination's clone of.
pub struct NewClone<'a> {
    /// The source, reached over NBD (and its API).
    pub origin: TargetSpec,
    pub region_size: u64,
    /// Background copy limit, bytes/s (0: none).
    pub rate: u64,
    /// The migration's identity.
    pub migration: &'a str,
    /// Cluster mode: the migration's starting generation and the node's
    /// lease, which the copy's writes are bound to from the start.
    pub cluster: Option<(u64, Arc<crate::cluster::LeaseClock>)>,
}

/// Makes a clone's hooks from its volume directory and live table.
pub type HooksFactory =
    Arc<dyn Fn(&Path, Arc<Mutex<VolumeTable>>) -> Arc<dyn MigrationHooks> + Send + Sync>;

/// Settings the store needs to rebuild migrating volumes.
#[derive(Clone)]
pub struct CloneEnv {
    /// How long a request waits for an unreachable origin before EIO.
    pub source_timeout: std::time::Duration,
    /// NBD connections to an origin.
    pub origin_connections: usize,
    /// Fault injection for tests: latency added to every origin read.
    pub origin_read_delay: std::time::Duration,
    /// TLS for connections to origins (when the node runs with TLS).
    pub origin_tls: Option<tokio_rustls::TlsConnector>,
    /// Builds the hooks a clone uses to reach its source; they get the
    /// volume's directory and live table (to persist the handoff).
    pub hooks: HooksFactory,
}

/// Counts a connection while alive (and wakes whoever watches the count).
pub struct ConnectionGuard(Arc<tokio::sync::watch::Sender<usize>>);
impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Checks a volume name (it is also the NBD export name and a directory name).
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_owned()))
    }
}

/// Marks the read-only origin link a migration destination uses:
/// `vm1@origin:ID`, where ID is the migration's identity (`@` cannot
/// appear in a volume name). The source serves it only while that
/// migration is its outgoing one.
pub const ORIGIN_MARK: &str = "@origin:";

/// The export name of `volume`'s origin link for migration `id`; in
/// cluster mode with the destination's `generation` (the fencing token:
/// the source refuses a link whose generation is behind its copy's).
pub fn origin_export(volume: &str, id: &str, generation: u64) -> String {
    if generation > 0 {
        format!("{volume}{ORIGIN_MARK}{id}:{generation}")
    } else {
        format!("{volume}{ORIGIN_MARK}{id}")
    }
}

/// The migration id and generation (if any) of an origin link's name,
/// the part after [`ORIGIN_MARK`] (see [`origin_export`]).
pub fn parse_origin(rest: &str) -> (&str, Option<u64>) {
    match rest.split_once(':') {
        Some((id, g)) => (id, g.parse().ok()),
        None => (rest, None),
    }
}

/// Refuses a size no volume can have (checked before anything is made, in
/// the store or in the cluster's directory).
pub fn validate_size(size: u64) -> Result<(), StoreError> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_VOLUME_SIZE {
        return Err(StoreError::InvalidSize(format!(
            "{size} bytes: a volume must be a non-zero multiple of 512 bytes, at most 4 EiB"
        )));
    }
    Ok(())
}

/// Largest volume: 2^63 bytes keeps every offset computation in range.
pub const MAX_VOLUME_SIZE: u64 = 1 << 62;

/// Every volume of a node.
pub struct VolumeStore {
    /// Held for the store's life: one node per data directory.
    _lock: DirLock,
    root: PathBuf,
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
    env: CloneEnv,
    /// Bumped whenever a volume appears or goes (exports that follow the
    /// set of volumes, such as vhost-user sockets, watch it).
    changes: tokio::sync::watch::Sender<u64>,
}

impl VolumeStore {
    /// Opens (creating if needed) the store under `data_dir`, loading every
    /// volume and sweeping unfinished creations and removals.
    pub fn open(data_dir: &Path, env: CloneEnv) -> Result<Self, StoreError> {
        // Before anything is read or swept: a second node on this
        // directory would delete the first one's volumes in creation and
        // serve the same files as a second writer.
        let lock = DirLock::take(data_dir)?;
        let root = data_dir.join("volumes");
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let mut volumes = BTreeMap::new();
        for entry in fs::read_dir(&root).map_err(io_err(&root))? {
            let entry = entry.map_err(io_err(&root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".tmp-") {
                tracing::info!(path = %path.display(), "removing unfinished volume directory");
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
                continue;
            }
            if validate_name(&name).is_err() || !path.is_dir() {
                tracing::warn!(path = %path.display(), "ignoring stray entry in volumes directory");
                continue;
            }
            let vol = load_volume(&path, &name, &env)?;
            volumes.insert(name, Arc::new(vol));
        }
        tracing::info!(count = volumes.len(), root = %root.display(), "volume store opened");
        Ok(Self {
            _lock: lock,
            root,
            volumes: Mutex::new(volumes),
            env,
            changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// Creates an empty (all-zero, sparse) volume.
    pub fn create(&self, name: &str, size: u64) -> Result<Arc<Volume>, StoreError> {
        self.create_local(name, size, 0, None)
    }

    /// Creates an empty volume under the cluster's directory record of
    /// `generation`: the generation is in its first table, and its fence is
    /// bound to the node's `lease` before any client can open it.
    pub fn create_in_cluster(
        &self,
        name: &str,
        size: u64,
        generation: u64,
        lease: Arc<crate::cluster::LeaseClock>,
    ) -> Result<Arc<Volume>, StoreError> {
        self.create_local(name, size, generation, Some(lease))
    }

    fn create_local(
        &self,
        name: &str,
        size: u64,
        generation: u64,
        lease: Option<Arc<crate::cluster::LeaseClock>>,
    ) -> Result<Arc<Volume>, StoreError> {
        let table = VolumeTable {
            name: name.to_owned(),
            size,
            target: TargetSpec::Local {
                file: "data.raw".into(),
            },
            fenced_to: None,
            fenced_for: None,
            outgoing: None,
            arrived: Vec::new(),
            release_pending: None,
            generation,
            removed: false,
        };
        self.create_with(table, |_| Ok(()), lease)
    }

    /// Creates the destination volume of a migration: a sparse data file,
    /// an all-absent region map and a clone table, in constant time. In
    /// cluster mode (`cluster`: the migration's starting generation and
    /// the node's lease) the copy carries the generation and its writes are
    /// bound to the lease from the start.
    pub fn create_clone(
        &self,
        name: &str,
        size: u64,
        spec: NewClone<'_>,
    ) -> Result<Arc<Volume>, StoreError> {
        let NewClone {
            origin,
            region_size,
            rate,
            migration,
            cluster,
        } = spec;
        let (generation, lease) = cluster.map_or((0, None), |(g, l)| (g, Some(l)));
        let table = VolumeTable {
            name: name.to_owned(),
            size,
            target: TargetSpec::Clone {
                origin: Box::new(origin),
                local: Box::new(TargetSpec::Local {
                    file: "data.raw".into(),
                }),
                map: "regions.map".into(),
                region_size,
                handed_off: false,
                source_unfenced: false,
                rate,
                migration: migration.to_owned(),
                rollback_of: None,
            },
            fenced_to: None,
            fenced_for: None,
            outgoing: None,
            arrived: Vec::new(),
            release_pending: None,
            generation,
            removed: false,
        };
        self.create_with(
            table,
            |dir| {
                RegionMap::create(&dir.join("regions.map"), size, region_size)
                    .and_then(|_| RegionMap::create(&dir.join(WRITTEN_MAP), size, region_size))
                    .map(drop)
                    .map_err(map_create_error)
            },
            lease,
        )
    }

    fn create_with(
        &self,
        table: VolumeTable,
        extra: impl FnOnce(&Path) -> Result<(), StoreError>,
        lease: Option<Arc<crate::cluster::LeaseClock>>,
    ) -> Result<Arc<Volume>, StoreError> {
        let (name, size) = (table.name.as_str(), table.size);
        validate_name(name)?;
        validate_size(size)?;
        let mut vols = self.volumes.lock().unwrap();
        if vols.contains_key(name) {
            return Err(StoreError::AlreadyExists(name.to_owned()));
        }
        let tmp = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let built = (|| {
            drop(LocalTarget::create(&tmp.join("data.raw"), size).map_err(|e| too_large(e, size))?);
            extra(&tmp)?;
            write_table(&tmp, &table)?;
            let dir = self.root.join(name);
            fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            sync_dir(&self.root)?;
            load_volume(&dir, name, &self.env)
        })();
        let vol = match built {
            Ok(v) => Arc::new(v),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if let Some(l) = lease {
            vol.fence.bind_lease(l);
        }
        vols.insert(name.to_owned(), vol.clone());
        drop(vols);
        self.changes.send_modify(|n| *n += 1);
        tracing::info!(volume = name, size, "volume created");
        Ok(vol)
    }

    /// Wakes whenever a volume appears or goes.
    pub fn watch_volumes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The volume called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Volume>, StoreError> {
        self.volumes
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))
    }

    /// Every volume, by name.
    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes.lock().unwrap().values().cloned().collect()
    }

    /// Deletes a volume and its data, as `mode` allows (see [`RemoveMode`]).
    pub fn remove(&self, name: &str, mode: RemoveMode) -> Result<(), StoreError> {
        self.remove_checked(name, None, mode)
    }

    /// Deletes exactly `vol` (not a newer volume that took its name after
    /// the caller looked it up), as `mode` allows.
    pub fn remove_volume(&self, vol: &Arc<Volume>, mode: RemoveMode) -> Result<(), StoreError> {
        self.remove_checked(&vol.name, Some(vol), mode)
    }

    fn remove_checked(
        &self,
        name: &str,
        expected: Option<&Arc<Volume>>,
        mode: RemoveMode,
    ) -> Result<(), StoreError> {
        let mut vols = self.volumes.lock().unwrap();
        let vol = vols
            .get(name)
            .filter(|v| expected.is_none_or(|e| Arc::ptr_eq(v, e)))
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        // The table lock is held from the check to the rename, so a
        // migration cannot start in between: it records itself with
        // `update_table`, which either comes first (and is seen here) or
        // finds the directory gone.
        let table = vol.table.lock().unwrap();
        Self::refuse_removal(vol, &table, mode)?;
        if let Some(c) = vol.clone_target() {
            c.stop();
        }
        let doomed = self.root.join(format!(".tmp-rm-{name}"));
        fs::rename(vol.dir(), &doomed).map_err(io_err(vol.dir()))?;
        let mut table = table;
        table.removed = true;
        drop(table);
        sync_dir(&self.root)?;
        vols.remove(name);
        drop(vols);
        self.changes.send_modify(|n| *n += 1);
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))?;
        tracing::info!(volume = name, ?mode, "volume removed");
        Ok(())
    }

    /// Whether `volume rm` (without `--force`) would be refused for `vol`,
    /// and why: checked before the cluster's record is deleted, so a
    /// refusal leaves both the record and the copy. The removal itself
    /// checks again under its own lock.
    pub fn check_removable(&self, vol: &Volume, mode: RemoveMode) -> Result<(), StoreError> {
        let table = vol.table.lock().unwrap();
        Self::refuse_removal(vol, &table, mode)
    }

    /// What `mode` refuses about removing `vol` whose table is `table`.
    fn refuse_removal(
        vol: &Volume,
        table: &VolumeTable,
        mode: RemoveMode,
    ) -> Result<(), StoreError> {
        let name = vol.name.as_str();
        if mode == (RemoveMode::Operator { force: false }) {
            let n = vol.connections();
            if n > 0 {
                return Err(StoreError::Busy(name.to_owned(), n));
            }
            if let Some(o) = &table.outgoing {
                return Err(StoreError::Migrating(format!(
                    "volume {name:?} is migrating to {} (migration {}): the destination still \
                     needs this copy{}; it is released by the migration when the destination \
                     has everything (or give --force, losing every region the destination has \
                     not copied yet)",
                    o.to,
                    o.id,
                    if vol.fence.is_fenced() {
                        " for the regions it has not copied"
                    } else {
                        ", and it is still the volume's only writable copy"
                    }
                )));
            }
            if let Some(p) = &table.release_pending {
                return Err(StoreError::Migrating(format!(
                    "volume {name:?} still has to tell its migration source {} to release \
                     the source copy (it retries until the source answers); removing it now \
                     would leave that copy behind, fenced (give --force to remove it anyway)",
                    p.api
                )));
            }
            if let TargetSpec::Clone {
                rollback_of: Some(base),
                handed_off: false,
                ..
            } = &table.target
            {
                return Err(StoreError::Migrating(format!(
                    "volume {name:?} is being rolled back here (migration {} back from {}, not \
                     handed off yet): this node's copy is the only copy of every region {} has \
                     not fetched; cancel the rollback (`dlsm migration cancel`) instead. \
                     --force removes it anyway, losing those regions",
                    base.id, base.to, base.to
                )));
            }
            if let TargetSpec::Clone {
                origin, handed_off, ..
            } = &table.target
            {
                let from = match origin.as_ref() {
                    TargetSpec::Remote { api, .. } => api.as_str(),
                    _ => "?",
                };
                return Err(StoreError::Migrating(if *handed_off {
                    format!(
                        "volume {name:?} is migrating here from {from} and was handed off: this \
                         node owns it and the source is fenced; removing it would lose every \
                         write made here (give --force to remove it anyway)"
                    )
                } else {
                    format!(
                        "volume {name:?} is migrating here from {from} (not handed off yet): \
                         cancel the migration on the source (`dlsm migration cancel`), or give \
                         --force to drop this copy (the source keeps the volume, but its \
                         migration is then stuck until cancelled there)"
                    )
                }));
            }
        }
        Ok(())
    }

    /// Source of a rolled-back migration: turns `vol`, fenced with the copy
    /// it handed off in migration `base.id`, into the clone of rollback
    /// migration `id` from `origin` (the node it went to). Every region is
    /// absent until the handoff, which marks present all but the regions
    /// written there (`migrate::clone::rollback`). The table changes
    /// durably first, then the live target; the fence of `base.id` opens
    /// last, so writes reach the clone (which hands off before taking
    /// any), never the file underneath.
    pub fn make_rollback_clone(
        &self,
        vol: &Arc<Volume>,
        origin: TargetSpec,
        region_size: u64,
        rate: u64,
        id: &str,
        base: RollbackBase,
    ) -> Result<Arc<CloneTarget>, StoreError> {
        let t = vol.table();
        let TargetSpec::Local { .. } = &t.target else {
            return Err(StoreError::Migrating(format!(
                "volume {:?} is not a plain local volume here: it cannot be the base of a \
                 rollback",
                vol.name
            )));
        };
        // No written map: a rollback is never rolled back itself (its
        // origin keeps no plain copy to reuse), so recording writes here
        // would only cost a sync per first write.
        for f in ["regions.map", WRITTEN_MAP] {
            let p = vol.dir.join(f);
            if p.exists() {
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        RegionMap::create(&vol.dir.join("regions.map"), vol.size, region_size)
            .map_err(map_create_error)?;
        let mut new = t.clone();
        new.target = TargetSpec::Clone {
            origin: Box::new(origin),
            local: Box::new(t.target.clone()),
            map: "regions.map".into(),
            region_size,
            handed_off: false,
            source_unfenced: false,
            rate,
            migration: id.to_owned(),
            rollback_of: Some(base.clone()),
        };
        new.outgoing = None;
        new.fenced_to = None;
        new.fenced_for = None;
        let (target, clone) = open_target(&vol.dir, &vol.name, &new, &self.env, &vol.table)?;
        let clone = clone.expect("a clone table opens a clone");
        vol.update_table(|t| {
            t.target = new.target.clone();
            t.outgoing = None;
            t.fenced_to = None;
            t.fenced_for = None;
        })?;
        *vol.target.write().unwrap() = target;
        *vol.clone.lock().unwrap() = Some(clone.clone());
        vol.fence.reopen(&base.id);
        tracing::info!(volume = %vol.name, migration = id, rolls_back = %base.id, "volume is the rollback clone of its own copy");
        Ok(clone)
    }

    /// Undoes [`Self::make_rollback_clone`] for a rollback that never
    /// handed off: the volume is again the fenced source of `base.id`,
    /// with the same copy. The caller has made sure the clone never hands
    /// off (`cancel_before_handoff`). The fence closes first, so no write
    /// reaches the file once the clone is gone.
    pub async fn revert_rollback_clone(&self, vol: &Arc<Volume>) -> Result<(), StoreError> {
        let Some(c) = vol.clone_target() else {
            return Ok(());
        };
        let TargetSpec::Clone {
            local,
            rollback_of: Some(base),
            ..
        } = vol.table().target
        else {
            return Err(StoreError::Migrating(format!(
                "volume {:?} is not a rollback clone",
                vol.name
            )));
        };
        vol.fence
            .fence(&base.to, &base.id, &*c.local())
            .await
            .map_err(StoreError::Block)?;
        vol.update_table(|t| {
            t.target = *local.clone();
            t.outgoing = Some(Outgoing {
                to: base.to.clone(),
                keep_source: base.keep_source,
                id: base.id.clone(),
                cancelling: false,
                rollback_of: None,
            });
            t.fenced_to = Some(base.to.clone());
            t.fenced_for = Some(base.id.clone());
        })?;
        c.stop();
        *vol.target.write().unwrap() = c.local();
        *vol.clone.lock().unwrap() = None;
        for f in ["regions.map", WRITTEN_MAP] {
            let _ = fs::remove_file(vol.dir.join(f));
        }
        tracing::info!(volume = %vol.name, migration = %base.id, "rollback undone: the volume is again the fenced source");
        Ok(())
    }

    /// Flushes every volume (used at shutdown).
    pub async fn flush_all(&self) {
        for v in self.list() {
            if let Some(c) = v.clone_target() {
                c.stop();
            }
            if let Err(e) = v.target().flush().await {
                tracing::error!(volume = %v.name, "flush at shutdown failed: {e}");
            }
        }
    }
}

/// An exclusive `flock` on `DATA_DIR/lock`, released when the process
/// exits however it exits (the kernel drops it with the descriptor), so a
/// crashed node never leaves a stale lock behind. The file holds the pid of
/// the holder, for the error message only.
struct DirLock(#[allow(dead_code)] nix::fcntl::Flock<fs::File>);

impl DirLock {
    fn take(data_dir: &Path) -> Result<Self, StoreError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = data_dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut held) => {
                held.set_len(0).map_err(io_err(&path))?;
                let _ = held.write_all(format!("{}\n", std::process::id()).as_bytes());
                Ok(Self(held))
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"));
                Err(StoreError::DirLocked {
                    dir: data_dir.to_owned(),
                    holder,
                })
            }
            Err((_, e)) => Err(StoreError::Io {
                path,
                source: e.into(),
            }),
        }
    }
}

/// A region map that could not be made: a bad region size is the
/// caller's mistake, anything else the disk's.
fn map_create_error(e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::InvalidInput => StoreError::InvalidSize(e.to_string()),
        _ => StoreError::Block(BlockError::from_io(e)),
    }
}

/// A volume's top target, and its clone if it is migrating in.
type OpenedTarget = (Arc<dyn BlockTarget>, Option<Arc<CloneTarget>>);

/// Opens the targets a table describes: the top target, and the clone if
/// the volume is migrating in. `shared` is the live table the clone's
/// hooks persist into.
fn open_target(
    dir: &Path,
    name: &str,
    table: &VolumeTable,
    env: &CloneEnv,
    shared: &Arc<Mutex<VolumeTable>>,
) -> Result<OpenedTarget, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        name: name.to_owned(),
        reason,
    };
    let open_local = |spec: &TargetSpec| -> Result<Arc<LocalTarget>, StoreError> {
        let TargetSpec::Local { file } = spec else {
            return Err(corrupt(format!("expected a local target, found {spec:?}")));
        };
        let t = LocalTarget::open(&dir.join(file), false)?;
        if t.size() != table.size {
            return Err(corrupt(format!(
                "data file is {} bytes, table says {}",
                t.size(),
                table.size
            )));
        }
        Ok(Arc::new(t))
    };
    let mut clone = None;
    let target: Arc<dyn BlockTarget> = match &table.target {
        TargetSpec::Local { .. } => open_local(&table.target)?,
        TargetSpec::Remote { .. } => {
            return Err(corrupt("a bare remote volume is not supported".into()))
        }
        TargetSpec::Clone {
            origin,
            local,
            map,
            handed_off,
            source_unfenced,
            rate,
            migration,
            rollback_of,
            ..
        } => {
            let TargetSpec::Remote { nbd, export, api } = origin.as_ref() else {
                return Err(corrupt("clone origin must be remote".into()));
            };
            let addr: NbdAddr = nbd.parse().map_err(corrupt)?;
            let origin = Arc::new(
                RemoteTarget::lazy(
                    addr,
                    &origin_export(export, migration, table.generation),
                    table.size,
                    env.origin_connections,
                    env.source_timeout,
                )
                .with_read_delay(env.origin_read_delay)
                .with_tls(env.origin_tls.clone()),
            );
            let map =
                RegionMap::open(&dir.join(map)).map_err(|e| corrupt(format!("region map: {e}")))?;
            let cfg = CloneConfig {
                rate: *rate,
                ..CloneConfig::default()
            };
            let c = CloneTarget::new(
                name,
                api,
                migration,
                origin,
                open_local(local)?,
                map,
                *handed_off,
                (env.hooks)(dir, shared.clone()),
                cfg,
            )
            .map_err(BlockError::from_io)?;
            if *source_unfenced {
                c.mark_source_unfenced();
            }
            c.keep_counters_in(dir.join("counters.json"));
            let written = dir.join(WRITTEN_MAP);
            if written.exists() {
                let w =
                    RegionMap::open(&written).map_err(|e| corrupt(format!("written map: {e}")))?;
                c.track_writes(w).map_err(BlockError::from_io)?;
            }
            if let Some(base) = rollback_of {
                c.set_rollback_of(&base.id);
            }
            // Rolling this clone's migration back: it must not complete
            // before the rollback hands off (see `clone::rollback`).
            if table
                .outgoing
                .as_ref()
                .is_some_and(|o| o.rollback_of.as_deref() == Some(migration.as_str()))
            {
                c.hold_completion(true);
            }
            clone = Some(c.clone());
            c
        }
    };
    Ok((target, clone))
}

fn load_volume(dir: &Path, name: &str, env: &CloneEnv) -> Result<Volume, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        name: name.to_owned(),
        reason,
    };
    let table_path = dir.join("table.json");
    let bytes = fs::read(&table_path).map_err(io_err(&table_path))?;
    let table: VolumeTable =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("table.json: {e}")))?;
    if table.name != name {
        return Err(corrupt(format!("table names volume {:?}", table.name)));
    }
    let shared = Arc::new(Mutex::new(table.clone()));
    let (target, clone) = open_target(dir, name, &table, env, &shared)?;
    let fence = match &table.fenced_to {
        Some(to) => Fence::closed(to, table.fenced_for.as_deref().unwrap_or("")),
        None => Fence::default(),
    };
    // A volume that was migrating away and is not fenced: while this node
    // was down the destination may have been handed it by force. Writes
    // wait, from before any listener opens, until the destination says
    // who owns it (`node::migration::resume_all`).
    // Not for a rollback: its handoff cannot be forced, and it fences this
    // node durably before the other node takes a write, so unfenced here
    // means not handed off: this node is still the writer.
    let held = table.fenced_to.is_none();
    if let Some(out) = table
        .outgoing
        .as_ref()
        .filter(|o| held && o.rollback_of.is_none())
    {
        fence.hold(format!(
            "writes held: this node restarted while migrating the volume to {} (migration {}); \
             waiting to learn from it who owns the volume",
            out.to, out.id
        ));
    }
    Ok(Volume {
        name: table.name.clone(),
        size: table.size,
        table: shared,
        target: Arc::new(std::sync::RwLock::new(target)),
        clone: Mutex::new(clone),
        fence: Arc::new(fence),
        ownership: Default::default(),
        connections: Arc::new(tokio::sync::watch::channel(0).0),
        dir: dir.to_owned(),
    })
}

/// A volume's top target as it is now: each request reads the volume's
/// target slot, so every connection follows a change of table.
struct LiveTarget(Arc<std::sync::RwLock<Arc<dyn BlockTarget>>>);

impl LiveTarget {
    fn now(&self) -> Arc<dyn BlockTarget> {
        self.0.read().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BlockTarget for LiveTarget {
    fn size(&self) -> u64 {
        self.now().size()
    }
    fn capabilities(&self) -> crate::target::Capabilities {
        self.now().capabilities()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> crate::target::BlockResult<()> {
        self.now().read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::target::BlockResult<()> {
        self.now().write(offset, data, fua).await
    }
    async fn flush(&self) -> crate::target::BlockResult<()> {
        self.now().flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::target::BlockResult<()> {
        self.now().trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: crate::target::ZeroFlags,
    ) -> crate::target::BlockResult<()> {
        self.now().write_zeroes(offset, len, flags).await
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::target::BlockResult<Vec<crate::target::Extent>> {
        self.now().block_status(offset, len).await
    }
    async fn cache(&self, offset: u64, len: u64) -> crate::target::BlockResult<()> {
        self.now().cache(offset, len).await
    }
    fn allocated_bytes(&self) -> u64 {
        self.now().allocated_bytes()
    }
}

/// Changes a volume's table durably (`table.json`), then in memory.
pub fn update_table(
    dir: &Path,
    table: &Mutex<VolumeTable>,
    f: impl FnOnce(&mut VolumeTable),
) -> Result<VolumeTable, StoreError> {
    let mut t = table.lock().unwrap();
    if t.removed {
        return Err(StoreError::NotFound(t.name.clone()));
    }
    let mut new = t.clone();
    f(&mut new);
    write_table(dir, &new)?;
    *t = new.clone();
    Ok(new)
}

/// This node's identity: 64 random bits made the first time the data
/// directory is used, kept in `DATA_DIR/node-id` (call with the directory
/// locked, as `VolumeStore::open` leaves it).
pub fn node_id(data_dir: &Path) -> Result<String, StoreError> {
    let path = data_dir.join("node-id");
    match fs::read_to_string(&path) {
        Ok(s) if s.trim().len() == 16 && s.trim().chars().all(|c| c.is_ascii_hexdigit()) => {
            return Ok(s.trim().to_owned())
        }
        Ok(_) => tracing::warn!(path = %path.display(), "unreadable node id; making a new one"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let id = new_migration_id();
    write_atomic(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// The cluster this data directory joined first (`DATA_DIR/cluster-id`),
/// if it ever joined one; see `cluster::ClusterIdentity`.
pub fn cluster_id(data_dir: &Path) -> Result<Option<String>, StoreError> {
    let path = data_dir.join(CLUSTER_ID);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Records, durably, that this data directory is in cluster `id`.
pub fn set_cluster_id(data_dir: &Path, id: &str) -> Result<(), StoreError> {
    write_atomic(&data_dir.join(CLUSTER_ID), format!("{id}\n").as_bytes())
}

/// The file [`cluster_id`] reads.
pub const CLUSTER_ID: &str = "cluster-id";

/// Writes `table.json` atomically and durably.
pub fn write_table(dir: &Path, table: &VolumeTable) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(table).expect("table serialises");
    write_atomic(&dir.join("table.json"), &bytes)
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_link_name_carries_the_generation_in_cluster_mode() {
        assert_eq!(origin_export("vm1", "ab12", 0), "vm1@origin:ab12");
        assert_eq!(origin_export("vm1", "ab12", 7), "vm1@origin:ab12:7");
        let rest = |n: &str| n.split_once(ORIGIN_MARK).unwrap().1.to_owned();
        assert_eq!(parse_origin(&rest("vm1@origin:ab12")), ("ab12", None));
        assert_eq!(parse_origin(&rest("vm1@origin:ab12:7")), ("ab12", Some(7)));
    }

    struct NoHooks;
    #[async_trait::async_trait]
    impl MigrationHooks for NoHooks {
        async fn fence_source(&self) -> Result<(), crate::migrate::clone::FenceError> {
            Err(crate::migrate::clone::FenceError::Unreachable(
                "no source in this test".into(),
            ))
        }
        fn persist_handoff(&self, _: bool) -> Result<(), String> {
            Ok(())
        }
    }

    fn test_env() -> CloneEnv {
        CloneEnv {
            source_timeout: std::time::Duration::from_secs(1),
            origin_connections: 1,
            origin_read_delay: std::time::Duration::ZERO,
            origin_tls: None,
            hooks: Arc::new(|_, _| Arc::new(NoHooks) as Arc<dyn MigrationHooks>),
        }
    }

    #[test]
    fn a_second_store_on_one_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = VolumeStore::open(dir.path(), test_env()).unwrap();
        first.create("vm1", 4096).unwrap();
        let e = VolumeStore::open(dir.path(), test_env()).err().unwrap();
        assert!(matches!(e, StoreError::DirLocked { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        // Released with the first store (as with the process at exit).
        let again = VolumeStore::open(dir.path(), test_env()).unwrap();
        assert_eq!(again.list().len(), 1);
    }

    #[test]
    fn a_removed_volume_never_writes_into_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(dir.path(), test_env()).unwrap();
        let old = s.create("vm1", 1 << 20).unwrap();
        s.remove_volume(&old, RemoveMode::Released).unwrap();
        let new = s.create("vm1", 2 << 20).unwrap();
        // A task that still held the old volume tries to record something.
        let e = old
            .update_table(|t| t.fenced_to = Some("elsewhere".into()))
            .unwrap_err();
        assert!(matches!(e, StoreError::NotFound(_)), "{e}");
        // Removing the old handle again must not touch the new volume.
        assert!(s.remove_volume(&old, RemoveMode::Released).is_err());
        assert!(new.table().fenced_to.is_none());
        drop(s);
        let s = VolumeStore::open(dir.path(), test_env()).unwrap();
        assert_eq!(s.get("vm1").unwrap().size, 2 << 20);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["vm1", "a", "disk-0.raw", "A_b"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn volumes_survive_reopen_and_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = VolumeStore::open(dir.path(), test_env()).unwrap();
            let v = s.create("vm1", 1 << 20).unwrap();
            v.target().write(4096, b"hello", true).await.unwrap();
            s.create("vm2", 4096).unwrap();
            assert!(matches!(
                s.create("vm1", 4096),
                Err(StoreError::AlreadyExists(_))
            ));
            assert!(matches!(
                s.create("vm3", 1000),
                Err(StoreError::InvalidSize(_))
            ));
            assert!(matches!(
                s.create("vm3", 0),
                Err(StoreError::InvalidSize(_))
            ));
            s.remove("vm2", RemoveMode::Operator { force: false })
                .unwrap();
            assert!(matches!(
                s.remove("vm2", RemoveMode::Operator { force: false }),
                Err(StoreError::NotFound(_))
            ));
        }
        // A crash mid-create leaves a .tmp- directory behind.
        fs::create_dir(dir.path().join("volumes/.tmp-vm9-1")).unwrap();
        let s = VolumeStore::open(dir.path(), test_env()).unwrap();
        let names: Vec<_> = s.list().iter().map(|v| v.name.clone()).collect();
        assert_eq!(names, ["vm1"]);
        assert!(!dir.path().join("volumes/.tmp-vm9-1").exists());
        let mut b = [0u8; 5];
        s.get("vm1")
            .unwrap()
            .target()
            .read(4096, &mut b)
            .await
            .unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn busy_volume_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(dir.path(), test_env()).unwrap();
        let v = s.create("vm1", 4096).unwrap();
        let g = v.connection_guard();
        assert!(matches!(
            s.remove("vm1", RemoveMode::Operator { force: false }),
            Err(StoreError::Busy(_, 1))
        ));
        drop(g);
        s.remove("vm1", RemoveMode::Operator { force: false })
            .unwrap();
    }

    #[test]
    fn corrupt_table_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        VolumeStore::open(dir.path(), test_env())
            .unwrap()
            .create("vm1", 4096)
            .unwrap();
        fs::write(dir.path().join("volumes/vm1/table.json"), b"{nope").unwrap();
        let e = VolumeStore::open(dir.path(), test_env()).err().unwrap();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
