//! What the API reports about this clone.

use super::*;

/// The byte counters as kept in the volume's directory, so that `status`
/// after a restart still says how much crossed the network.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counters {
    /// Whose counts these are: a later clone in the same directory (a
    /// rollback reuses its volume's) must not start from them.
    #[serde(default)]
    migration: String,
    on_demand: u64,
    background: u64,
    skipped: u64,
}

impl CloneTarget {
    /// Keeps the byte counters in `path` (a statistic, not data: written
    /// without sync at each periodic commit, so a crash may lose the last
    /// second's worth), starting from what it holds.
    pub fn keep_counters_in(&self, path: std::path::PathBuf) {
        if let Ok(c) = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Counters>(&b).map_err(|e| e.to_string()))
            .map_err(drop)
            .and_then(|c| {
                if c.migration == self.migration {
                    Ok(c)
                } else {
                    Err(())
                }
            })
        {
            self.stats
                .on_demand
                .fetch_add(c.on_demand, Ordering::Relaxed);
            self.stats
                .background
                .fetch_add(c.background, Ordering::Relaxed);
            self.stats.skipped.fetch_add(c.skipped, Ordering::Relaxed);
        }
        *self.stats.counters_file.lock().unwrap() = Some(path);
    }

    /// Writes the byte counters where [`Self::keep_counters_in`] said.
    pub(super) fn save_counters(&self) {
        // Held while writing: `stop` takes it to end the writes, so a
        // removed volume's clone never writes into a later volume's
        // directory of the same name.
        let file = self.stats.counters_file.lock().unwrap();
        let Some(path) = file.as_ref() else {
            return;
        };
        let c = Counters {
            migration: self.migration.clone(),
            on_demand: self.stats.on_demand.load(Ordering::Relaxed),
            background: self.stats.background.load(Ordering::Relaxed),
            skipped: self.stats.skipped.load(Ordering::Relaxed),
        };
        let tmp = path.with_extension("tmp");
        let r = serde_json::to_vec(&c)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            // The volume's directory is gone (removed) or the disk full:
            // counters are not worth an error.
            debug!(volume = %self.name, "cannot keep the byte counters: {e}");
        }
    }

    /// Status for the API.
    pub fn status(&self) -> MigrationStatus {
        let (total, present) = {
            let m = self.map.lock().unwrap();
            (m.regions(), m.present_count())
        };
        let rate = {
            let s = self.stats.samples.lock().unwrap();
            match (s.front(), s.back()) {
                (Some(a), Some(b)) if b.0 > a.0 => {
                    ((b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64()) as u64
                }
                _ => 0,
            }
        };
        let phase = if self.failed.lock().unwrap().is_some() {
            Phase::Failed
        } else if self.is_complete() {
            Phase::Complete
        } else if self.is_handed_off() {
            Phase::Hydrating
        } else {
            Phase::Passthrough
        };
        let remaining = (total - present) * self.region_size;
        // A paused or finished copy has no rate and no ETA: the last
        // samples would describe a copy that is not running.
        let paused = self.paused.load(Ordering::SeqCst);
        let rate = if paused || phase != Phase::Hydrating {
            0
        } else {
            rate
        };
        let handoff_at = *self.stats.handoff_at.lock().unwrap();
        let completed_at = *self.stats.completed_at.lock().unwrap();
        MigrationStatus {
            volume: self.name.clone(),
            id: self.migration.clone(),
            phase,
            role: "destination".into(),
            peer: self.peer.clone(),
            region_size: self.region_size,
            regions_total: total,
            regions_present: present,
            bytes_on_demand: self.stats.on_demand.load(Ordering::Relaxed),
            bytes_background: self.stats.background.load(Ordering::Relaxed),
            bytes_skipped: self.stats.skipped.load(Ordering::Relaxed),
            rate_limit: self.limiter.rate(),
            rate,
            eta_seconds: (rate > 0 && phase == Phase::Hydrating)
                .then(|| remaining as f64 / rate as f64),
            paused,
            stalled: if self.no_space.load(Ordering::SeqCst) {
                Some("destination disk full: background copy waits for free space".into())
            } else if self.source_unfenced.load(Ordering::SeqCst) {
                Some(
                    "forced handoff: the copy waits until the source can be reached and fenced"
                        .into(),
                )
            } else {
                None
            },
            handoff_after_seconds: handoff_at.map(|h| h.duration_since(self.started).as_secs_f64()),
            hydrate_seconds: match (handoff_at, completed_at) {
                (Some(h), Some(c)) => Some(c.duration_since(h).as_secs_f64()),
                _ => None,
            },
            // A transient error is cleared by the next success (see
            // `note_recovered`); a completed migration has none.
            last_error: self.failed.lock().unwrap().clone().or_else(|| {
                (phase != Phase::Complete)
                    .then(|| self.stats.last_error.lock().unwrap().clone())
                    .flatten()
            }),
            ended: None,
            ended_at: None,
            rollback_of: self.rollback_of(),
        }
    }
}
