//! What the API reports about this clone.

use super::*;

impl CloneTarget {
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
            paused: self.paused.load(Ordering::SeqCst),
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
            last_error: self
                .failed
                .lock()
                .unwrap()
                .clone()
                .or_else(|| self.stats.last_error.lock().unwrap().clone()),
        }
    }
}
