//! The migration engine (DLSM): a volume switches node at once, its blocks
//! follow on demand and in the background.
//!
//! * [`region_map`] — which regions are present at the destination; durable
//!   and crash-consistent, commits cost what changed.
//! * [`clone`] — the `clone` target: origin (`remote`) + local file + region
//!   map; passthrough before handoff, on-demand fetch and the background
//!   hydrator after it.
//! * [`RegionLocks`] — exclusion between fetches and client writes, per
//!   region range (invariant 3: no fetch lands over newer local data).
//! * [`RateLimiter`] — paces the background copier.
//!
//! The node ([`crate::node::migration`]) owns the orchestration between
//! nodes (prepare, fencing, release); this module owns what happens to
//! bytes, and never talks HTTP.

pub mod clone;
pub mod region_map;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

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

/// Range locks over region numbers: holders of overlapping ranges exclude
/// each other; acquisition is all-or-nothing, so there is no lock order and
/// no deadlock.
#[derive(Clone, Default)]
pub struct RegionLocks {
    inner: Arc<LocksInner>,
}

#[derive(Default)]
struct LocksInner {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// Holds regions `first..=last` until dropped.
pub struct RegionGuard {
    inner: Arc<LocksInner>,
    range: (u64, u64),
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        let mut held = self.inner.held.lock().unwrap();
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.inner.released.notify_waiters();
    }
}

impl RegionLocks {
    fn try_take(&self, first: u64, last: u64) -> Option<RegionGuard> {
        let mut held = self.inner.held.lock().unwrap();
        if held.iter().any(|&(a, b)| a <= last && first <= b) {
            return None;
        }
        held.push((first, last));
        Some(RegionGuard {
            inner: self.inner.clone(),
            range: (first, last),
        })
    }

    /// Locks `first..=last`, waiting for overlapping holders.
    pub async fn lock(&self, first: u64, last: u64) -> RegionGuard {
        loop {
            let released = self.inner.released.notified();
            if let Some(g) = self.try_take(first, last) {
                return g;
            }
            released.await;
        }
    }

    /// Locks `first..=last` only if no one holds any of it.
    pub fn try_lock(&self, first: u64, last: u64) -> Option<RegionGuard> {
        self.try_take(first, last)
    }
}

/// Paces byte transfers to at most `rate` bytes per second (0: no limit).
pub struct RateLimiter {
    rate: std::sync::atomic::AtomicU64,
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.into(),
            next_free: Mutex::new(Instant::now()),
        }
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, std::sync::atomic::Ordering::Relaxed);
        *self.next_free.lock().unwrap() = Instant::now();
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `bytes` may be sent.
    pub async fn acquire(&self, bytes: u64) {
        if let Some(start) = self.reserve(bytes) {
            tokio::time::sleep_until(start.into()).await;
        }
    }

    /// Books `bytes` and says when they may be sent (`None`: no limit). A
    /// caller that gives up its turn leaves it booked: pacing only gets
    /// slower, never faster.
    pub fn reserve(&self, bytes: u64) -> Option<Instant> {
        let rate = self.rate();
        if rate == 0 {
            return None;
        }
        let mut next = self.next_free.lock().unwrap();
        let now = Instant::now();
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        Some(start)
    }
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
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
    }

    #[tokio::test]
    async fn overlapping_ranges_exclude_each_other() {
        let locks = RegionLocks::default();
        let g = locks.lock(10, 20).await;
        assert!(locks.try_lock(20, 30).is_none());
        assert!(locks.try_lock(0, 10).is_none());
        let other = locks.try_lock(21, 30).expect("disjoint range");
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(15, 25).await.range });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "still blocked by 21..=30");
        drop(other);
        assert_eq!(waiter.await.unwrap(), (15, 25));
    }

    #[tokio::test]
    async fn rate_limiter_paces() {
        let l = RateLimiter::new(10 << 20);
        let t = Instant::now();
        for _ in 0..5 {
            l.acquire(1 << 20).await;
        }
        // 5 MiB at 10 MiB/s: the fifth may start after 0.4 s.
        assert!(
            t.elapsed() >= Duration::from_millis(390),
            "{:?}",
            t.elapsed()
        );
        l.set_rate(0);
        let t = Instant::now();
        l.acquire(1 << 30).await;
        assert!(t.elapsed() < Duration::from_millis(50));
    }
}
