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

use tokio::sync::Notify;

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
