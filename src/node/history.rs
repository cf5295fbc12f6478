//! The migration history: how every migration this node took part in
//! ended, kept in `DATA_DIR/history.json` so that `migration status` and
//! `migration list` still answer after a restart, after the volume was
//! removed, and on the source once its copy was released.
//!
//! Each entry is the migration's last [`MigrationStatus`] with `ended` and
//! `ended_at` set; one entry per (volume, migration id, role), the newest
//! [`PER_VOLUME`] per volume. The history is a record for operators, never
//! an input to a decision: nothing that moves or deletes data reads it. So
//! a history that cannot be written is logged and the node goes on, and
//! one that cannot be read at start (a torn file from a crash, a full disk)
//! is set aside as `history.json.bad` and started afresh.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::warn;

use crate::api::types::MigrationStatus;

/// Entries kept per volume (newest first wins).
pub const PER_VOLUME: usize = 8;

/// Entries kept in all (volumes removed long ago go first).
pub const TOTAL: usize = 512;

const FILE: &str = "history.json";

/// See the module docs.
pub struct History {
    path: PathBuf,
    entries: Mutex<Vec<MigrationStatus>>,
    /// Held from snapshot to rename, so an older snapshot never replaces
    /// a newer one.
    write: Mutex<()>,
}

impl History {
    /// Loads `DATA_DIR/history.json` (or starts empty).
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(FILE);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<MigrationStatus>>(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    let bad = data_dir.join(format!("{FILE}.bad"));
                    warn!(path = %path.display(), "unreadable migration history ({e}); set aside as {}", bad.display());
                    let _ = std::fs::rename(&path, &bad);
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(path = %path.display(), "cannot read the migration history: {e}");
                Vec::new()
            }
        };
        Self {
            path,
            entries: Mutex::new(entries),
            write: Mutex::new(()),
        }
    }

    /// An empty history that is never written (tests, fuzzing).
    pub fn in_memory() -> Self {
        Self {
            path: PathBuf::new(),
            entries: Mutex::new(Vec::new()),
            write: Mutex::new(()),
        }
    }

    /// Records that a migration ended: `status` as last seen, `ended`
    /// saying how. Replaces an earlier entry of the same migration and
    /// role (a repeated release, a completion recorded again after a
    /// restart).
    pub fn record(&self, mut status: MigrationStatus, ended: &str) {
        status.ended = Some(ended.to_owned());
        status.ended_at = Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        // A migration that is over neither copies nor waits.
        status.rate = 0;
        status.eta_seconds = None;
        status.stalled = None;
        let _w = self.write.lock().unwrap();
        let snapshot = {
            let mut e = self.entries.lock().unwrap();
            e.retain(|x| !same(x, &status));
            e.push(status.clone());
            let mut n = 0;
            let vol = status.volume.clone();
            // Keep the newest PER_VOLUME of this volume (entries are in
            // the order they ended).
            for i in (0..e.len()).rev() {
                if e[i].volume == vol {
                    n += 1;
                    if n > PER_VOLUME {
                        e.remove(i);
                    }
                }
            }
            let extra = e.len().saturating_sub(TOTAL);
            e.drain(..extra);
            serde_json::to_vec_pretty(&*e).expect("statuses serialise")
        };
        if self.path.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = super::store::write_atomic(&self.path, &snapshot) {
            warn!(volume = %status.volume, "cannot write the migration history: {e}");
        }
    }

    /// The newest entry of `volume`, in `role` if given.
    pub fn latest(&self, volume: &str, role: Option<&str>) -> Option<MigrationStatus> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.volume == volume && role.is_none_or(|r| s.role == r))
            .cloned()
    }

    /// The entry of migration `id` in `role`, if recorded.
    pub fn find(&self, volume: &str, id: &str, role: &str) -> Option<MigrationStatus> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.volume == volume && s.id == id && s.role == role)
            .cloned()
    }

    /// Every entry, oldest first.
    pub fn all(&self) -> Vec<MigrationStatus> {
        self.entries.lock().unwrap().clone()
    }
}

fn same(a: &MigrationStatus, b: &MigrationStatus) -> bool {
    a.volume == b.volume && a.id == b.id && a.role == b.role
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::Phase;

    fn status(volume: &str, id: &str, role: &str) -> MigrationStatus {
        MigrationStatus {
            phase: Phase::Complete,
            role: role.into(),
            peer: "127.0.0.1:1".into(),
            region_size: 65536,
            regions_total: 4,
            regions_present: 4,
            bytes_on_demand: 1,
            bytes_background: 2,
            bytes_skipped: 3,
            rate: 99,
            eta_seconds: Some(1.0),
            ..MigrationStatus::unknown(volume, id)
        }
    }

    #[test]
    fn survives_reopen_and_replaces_the_same_migration() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path());
        h.record(status("vm1", "a", "destination"), "complete");
        h.record(status("vm1", "a", "destination"), "complete again");
        h.record(status("vm1", "a", "source"), "released");
        let h = History::open(dir.path());
        assert_eq!(h.all().len(), 2);
        let d = h.find("vm1", "a", "destination").unwrap();
        assert_eq!(d.ended.as_deref(), Some("complete again"));
        assert_eq!(d.rate, 0, "an ended migration has no rate");
        assert!(d.eta_seconds.is_none());
        assert!(d.ended_at.unwrap() > 1_700_000_000);
        assert_eq!(h.latest("vm1", None).unwrap().role, "source");
        assert_eq!(h.latest("vm1", Some("destination")).unwrap().id, "a");
        assert!(h.latest("vm2", None).is_none());
    }

    #[test]
    fn keeps_the_newest_per_volume() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path());
        for i in 0..PER_VOLUME + 3 {
            h.record(status("vm1", &format!("{i}"), "source"), "complete");
        }
        h.record(status("vm2", "x", "source"), "complete");
        let all = History::open(dir.path()).all();
        let vm1: Vec<_> = all.iter().filter(|s| s.volume == "vm1").collect();
        assert_eq!(vm1.len(), PER_VOLUME);
        assert_eq!(vm1[0].id, "3", "the oldest are dropped");
        assert!(all.iter().any(|s| s.volume == "vm2"));
    }

    #[test]
    fn a_torn_file_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"[{\"volume\": \"vm1\", \"id").unwrap();
        let h = History::open(dir.path());
        assert!(h.all().is_empty());
        assert!(dir.path().join("history.json.bad").exists());
        h.record(status("vm1", "a", "source"), "complete");
        assert_eq!(History::open(dir.path()).all().len(), 1);
    }
}
