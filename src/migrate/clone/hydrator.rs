//! The background copier: walks the absent regions in batches, several at
//! once, paced by the rate limit, yielding the link to on-demand fetches.

use super::*;
use crate::retry::Backoff;

impl CloneTarget {
    /// A background fetch failed: records why and says how long the copier
    /// waits before the next attempt. A full destination disk stalls the
    /// copy (probing once a second) instead of failing the migration: the
    /// regions stay absent, so reads keep going to the source and nothing
    /// is lost, and the copy resumes by itself once space is freed.
    pub(super) fn background_failed(&self, e: &BlockError, backoff: &mut Backoff) -> Duration {
        if matches!(e, BlockError::NoSpace) {
            let was = self.no_space.swap(true, Ordering::SeqCst);
            if !was {
                warn!(volume = %self.name, migration = %self.migration, event = "fault", "destination disk full: background copy stalled until space is freed");
            }
            self.note_error(&"destination disk full (ENOSPC)");
            return Duration::from_secs(1);
        }
        warn!(volume = %self.name, migration = %self.migration, event = "fault", "background fetch failed: {e}");
        self.note_error(e);
        backoff.next_wait()
    }

    /// A background fetch succeeded: clears a disk-full stall.
    pub(super) fn background_succeeded(&self, backoff: &mut Backoff) {
        backoff.reset();
        self.note_recovered();
        if self.no_space.swap(false, Ordering::SeqCst) {
            info!(volume = %self.name, migration = %self.migration, event = "recovered", "destination has space again: background copy resumed");
        }
    }

    /// Write-behind for background copies: start writeback of what was just
    /// written, and once more than [`WRITE_BEHIND`] bytes are in flight,
    /// wait for the oldest and drop it from the page cache (as nbdcopy
    /// does). Reads of those regions later come from disk.
    pub(super) async fn write_behind(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.local.start_writeback(offset, len)?;
        let done = {
            let mut q = self.behind.lock().unwrap();
            q.0.push_back((offset, len));
            q.1 += len;
            let mut done = Vec::new();
            while q.1 > WRITE_BEHIND {
                let (o, l) = q.0.pop_front().expect("non-empty");
                q.1 -= l;
                done.push((o, l));
            }
            done
        };
        if done.is_empty() {
            return Ok(());
        }
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || {
            for (o, l) in done {
                local.finish_writeback_and_drop(o, l)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| BlockError::Io(std::io::Error::other(e)))?
    }

    /// The hydrator loop.
    pub(super) async fn hydrate(self: Arc<Self>) {
        // Wait for handoff.
        while !self.is_handed_off() {
            let n = self.wake.notified();
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            if self.is_handed_off() {
                break;
            }
            n.await;
        }
        let mut cursor = 0u64;
        let mut inflight: JoinSet<BlockResult<()>> = JoinSet::new();
        let mut last_commit = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let batch_regions = (self.cfg.batch_bytes / self.region_size).max(1);
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                break;
            }
            if last_commit.elapsed() >= self.cfg.commit_interval {
                if let Err(e) = self.commit().await {
                    warn!(volume = %self.name, migration = %self.migration, event = "fault", "map commit failed: {e}");
                    self.note_error(&e);
                }
                self.save_counters();
                last_commit = Instant::now();
            }
            while let Some(done) = inflight.try_join_next() {
                match done {
                    Ok(Ok(())) => self.background_succeeded(&mut backoff),
                    Ok(Err(e)) => {
                        let wait = self.background_failed(&e, &mut backoff);
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => warn!("fetch task failed: {e}"),
                }
            }
            // Read-ahead hints serve a guest's sequential reads: they go
            // first, and neither pause nor the rate limit holds them back.
            let has_hint = !self.hints.lock().unwrap().is_empty();
            if self.paused.load(Ordering::SeqCst) && !has_hint {
                let n = self.wake.notified();
                if self.paused.load(Ordering::SeqCst)
                    && !self.stopped.load(Ordering::SeqCst)
                    && self.hints.lock().unwrap().is_empty()
                {
                    let _ = tokio::time::timeout(self.cfg.commit_interval, n).await;
                }
                continue;
            }
            // While clients wait on fetches, the copier keeps one small batch
            // in flight, so their fetches do not queue behind megabytes of
            // background data on a saturated link.
            let busy = self.on_demand_recently(250);
            // After a failed fetch, one batch at a time until one succeeds:
            // batches paced while the source was away would otherwise all
            // land at once when it returns, far above the rate limit.
            let degraded = backoff.is_backing_off();
            let parallel = if busy || degraded {
                1
            } else {
                self.cfg.parallel
            };
            let batch_regions = if busy {
                ((256 << 10) / self.region_size).max(1)
            } else {
                batch_regions
            };
            if inflight.len() >= parallel {
                let done = tokio::time::timeout(Duration::from_millis(200), inflight.join_next());
                match done.await {
                    Ok(Some(Ok(Ok(())))) => self.background_succeeded(&mut backoff),
                    Ok(Some(Ok(Err(e)))) => {
                        let wait = self.background_failed(&e, &mut backoff);
                        tokio::time::sleep(wait).await;
                    }
                    _ => {}
                }
                continue;
            }
            // Prefetch hints first, then the next absent run from the cursor.
            let hint = self.hints.lock().unwrap().pop_front();
            let next = hint.or_else(|| {
                let map = self.map.lock().unwrap();
                let start = map.next_absent(cursor)?;
                let mut n = 1;
                while n < batch_regions && start + n < map.regions() && !map.is_present(start + n) {
                    n += 1;
                }
                cursor = start + n;
                Some((start, n))
            });
            let Some((first, count)) = next else {
                if inflight.is_empty() && self.completion_held() {
                    // Every region is here, but a rollback needs this
                    // clone to go on recording writes: wait.
                    let n = self.wake.notified();
                    if self.completion_held() && !self.stopped.load(Ordering::SeqCst) {
                        let _ = tokio::time::timeout(self.cfg.commit_interval, n).await;
                    }
                    continue;
                }
                if inflight.is_empty() {
                    break;
                }
                let _ = inflight.join_next().await;
                continue;
            };
            // Pace before locking: a region lock is never held while the
            // copier sleeps, so on-demand fetches never wait for the limit.
            if hint.is_none() && !self.wait_turn(count * self.region_size).await {
                // Paused, stopped or complete while waiting for the limit:
                // this batch does not go; the cursor comes back to it.
                cursor = first;
                continue;
            }
            let Some(guard) = self.locks.try_lock(first, first + count - 1) else {
                // A client holds part of it; its own fetch covers it, and
                // the cursor comes back around for anything left.
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            };
            let me = self.clone();
            inflight.spawn(async move {
                let r = me.fetch_locked(first, count, FetchKind::Background).await;
                drop(guard);
                me.sample_rate();
                r
            });
        }
        while inflight.join_next().await.is_some() {}
        if self.stopped.load(Ordering::SeqCst) {
            let _ = self.commit().await;
            self.save_counters();
            debug!(volume = %self.name, "hydrator stopped");
            return;
        }
        // Every region present: commit, then announce completion.
        loop {
            match self.commit().await {
                Ok(_) => break,
                Err(e) => {
                    warn!(volume = %self.name, "final commit failed, retrying: {e}");
                    self.note_error(&e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        *self.stats.completed_at.lock().unwrap() = Some(Instant::now());
        self.save_counters();
        self.note_recovered();
        self.complete.store(true, Ordering::SeqCst);
        self.completed.notify_waiters();
        info!(volume = %self.name, migration = %self.migration, event = "hydrated", "hydration complete");
    }

    /// Waits for the rate limit's turn for `bytes`, looking up every
    /// quarter second: false if the copier was paused or stopped, its limit
    /// changed, or every region became present (clients wrote them),
    /// meanwhile. A slow limit
    /// must not hold back a pause, or a completion, by a whole batch.
    pub(super) async fn wait_turn(&self, bytes: u64) -> bool {
        let rate = self.limiter.rate();
        let Some(start) = self.limiter.reserve(bytes) else {
            return true;
        };
        loop {
            // A new limit (`set-rate`) applies now, not after a turn booked
            // under the old one: give the turn up and book again.
            let give_up = self.paused.load(Ordering::SeqCst)
                || self.stopped.load(Ordering::SeqCst)
                || self.limiter.rate() != rate
                || self.map.lock().unwrap().is_complete();
            if give_up {
                return false;
            }
            let now = Instant::now();
            if now >= start {
                return true;
            }
            tokio::time::sleep((start - now).min(Duration::from_millis(250))).await;
        }
    }

    pub(super) fn sample_rate(&self) {
        let mut s = self.stats.samples.lock().unwrap();
        let now = Instant::now();
        s.push_back((now, self.stats.background.load(Ordering::Relaxed)));
        while s.len() > 2 && now.duration_since(s.front().unwrap().0) > Duration::from_secs(3) {
            s.pop_front();
        }
    }
}
