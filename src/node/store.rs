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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::target::{BlockError, BlockTarget, LocalTarget};

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
    #[error("volume {name:?} is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("storage error: {0}")]
    Block(#[from] BlockError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
}

/// The persisted description of a volume (`table.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeTable {
    pub name: String,
    pub size: u64,
    pub target: TargetSpec,
}

/// A live volume: its table and the stacked target that serves it.
pub struct Volume {
    pub table: VolumeTable,
    pub target: Arc<dyn BlockTarget>,
    connections: Arc<AtomicUsize>,
    dir: PathBuf,
}

impl Volume {
    /// Open NBD connections to this volume.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// A guard counting one connection until dropped.
    pub fn connection_guard(&self) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(self.connections.clone())
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Counts a connection while alive.
pub struct ConnectionGuard(Arc<AtomicUsize>);
impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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

/// Largest volume: 2^63 bytes keeps every offset computation in range.
pub const MAX_VOLUME_SIZE: u64 = 1 << 62;

/// Every volume of a node.
pub struct VolumeStore {
    root: PathBuf,
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
}

impl VolumeStore {
    /// Opens (creating if needed) the store under `data_dir`, loading every
    /// volume and sweeping unfinished creations and removals.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
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
            let vol = load_volume(&path, &name)?;
            volumes.insert(name, Arc::new(vol));
        }
        tracing::info!(count = volumes.len(), root = %root.display(), "volume store opened");
        Ok(Self {
            root,
            volumes: Mutex::new(volumes),
        })
    }

    /// Creates an empty (all-zero, sparse) volume.
    pub fn create(&self, name: &str, size: u64) -> Result<Arc<Volume>, StoreError> {
        validate_name(name)?;
        if size == 0 || !size.is_multiple_of(512) || size > MAX_VOLUME_SIZE {
            return Err(StoreError::InvalidSize(format!(
                "{size} bytes: a volume must be a non-zero multiple of 512 bytes, at most 4 EiB"
            )));
        }
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
            let table = VolumeTable {
                name: name.to_owned(),
                size,
                target: TargetSpec::Local {
                    file: "data.raw".into(),
                },
            };
            drop(LocalTarget::create(&tmp.join("data.raw"), size)?);
            write_table(&tmp, &table)?;
            let dir = self.root.join(name);
            fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            sync_dir(&self.root)?;
            load_volume(&dir, name)
        })();
        let vol = match built {
            Ok(v) => Arc::new(v),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        vols.insert(name.to_owned(), vol.clone());
        tracing::info!(volume = name, size, "volume created");
        Ok(vol)
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

    /// Deletes a volume and its data. Refused while clients are attached.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let mut vols = self.volumes.lock().unwrap();
        let vol = vols
            .get(name)
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        let n = vol.connections();
        if n > 0 {
            return Err(StoreError::Busy(name.to_owned(), n));
        }
        let doomed = self.root.join(format!(".tmp-rm-{name}"));
        fs::rename(vol.dir(), &doomed).map_err(io_err(vol.dir()))?;
        sync_dir(&self.root)?;
        vols.remove(name);
        drop(vols);
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))?;
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// Flushes every volume (used at shutdown).
    pub async fn flush_all(&self) {
        for v in self.list() {
            if let Err(e) = v.target.flush().await {
                tracing::error!(volume = %v.table.name, "flush at shutdown failed: {e}");
            }
        }
    }
}

fn load_volume(dir: &Path, name: &str) -> Result<Volume, StoreError> {
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
    let target: Arc<dyn BlockTarget> = match &table.target {
        TargetSpec::Local { file } => {
            let t = LocalTarget::open(&dir.join(file), false)?;
            if t.size() != table.size {
                return Err(corrupt(format!(
                    "data file is {} bytes, table says {}",
                    t.size(),
                    table.size
                )));
            }
            Arc::new(t)
        }
    };
    Ok(Volume {
        table,
        target,
        connections: Arc::new(AtomicUsize::new(0)),
        dir: dir.to_owned(),
    })
}

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
            let s = VolumeStore::open(dir.path()).unwrap();
            let v = s.create("vm1", 1 << 20).unwrap();
            v.target.write(4096, b"hello", true).await.unwrap();
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
            s.remove("vm2").unwrap();
            assert!(matches!(s.remove("vm2"), Err(StoreError::NotFound(_))));
        }
        // A crash mid-create leaves a .tmp- directory behind.
        fs::create_dir(dir.path().join("volumes/.tmp-vm9-1")).unwrap();
        let s = VolumeStore::open(dir.path()).unwrap();
        let names: Vec<_> = s.list().iter().map(|v| v.table.name.clone()).collect();
        assert_eq!(names, ["vm1"]);
        assert!(!dir.path().join("volumes/.tmp-vm9-1").exists());
        let mut b = [0u8; 5];
        s.get("vm1")
            .unwrap()
            .target
            .read(4096, &mut b)
            .await
            .unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn busy_volume_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(dir.path()).unwrap();
        let v = s.create("vm1", 4096).unwrap();
        let g = v.connection_guard();
        assert!(matches!(s.remove("vm1"), Err(StoreError::Busy(_, 1))));
        drop(g);
        s.remove("vm1").unwrap();
    }

    #[test]
    fn corrupt_table_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        VolumeStore::open(dir.path())
            .unwrap()
            .create("vm1", 4096)
            .unwrap();
        fs::write(dir.path().join("volumes/vm1/table.json"), b"{nope").unwrap();
        let e = VolumeStore::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
