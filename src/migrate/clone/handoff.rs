//! The handoff: the one moment write ownership moves to this node, and
//! the fencing of a source a forced handoff could not reach; the zero scan
//! that keeps the source's zeros off the network.

use super::*;

impl CloneTarget {
    /// After a forced handoff the source was never fenced. If it comes back,
    /// it must refuse writes before anything more is read from it, or a
    /// client still attached there could write what this node never sees
    /// (two writers). One attempt at a time; callers that waited behind a
    /// failed attempt get its error instead of starting another, so no
    /// request waits longer than one `--source-timeout`.
    ///
    /// Returns whether the source was unfenced when called: a caller that
    /// holds regions locked then checks them for zeros itself (the scan
    /// made at fencing time leaves locked regions alone).
    pub(super) async fn ensure_source_fenced(&self) -> BlockResult<bool> {
        if !self.source_unfenced.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let asked = Instant::now();
        let _h = self.handoff_lock.lock().await;
        if !self.source_unfenced.load(Ordering::SeqCst) {
            return Ok(true);
        }
        if let Some((at, why)) = self.fence_failed.lock().unwrap().clone() {
            if at >= asked {
                return Err(BlockError::Unavailable(why));
            }
        }
        if let Err(e) = self.hooks.fence_source().await {
            if matches!(e, FenceError::Refused(_)) {
                // Alive, and it says this is not its migration: nothing
                // more may ever be read from it for this clone.
                warn!(volume = %self.name, migration = %self.migration, event = "fault", "the source of the forced handoff refuses this migration: {e}");
            }
            let why = format!(
                "{}: the source of a forced handoff is not fenced yet: {e}",
                self.name
            );
            *self.fence_failed.lock().unwrap() = Some((Instant::now(), why.clone()));
            return Err(BlockError::Unavailable(why));
        }
        self.hooks
            .persist_handoff(true)
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        self.source_unfenced.store(false, Ordering::SeqCst);
        info!(volume = %self.name, migration = %self.migration, event = "recovered", "source reached and fenced after the forced handoff");
        // Its zeros need not cross the network now (a crash before the
        // next commit only means they are fetched after all).
        if let Err(e) = self.mark_source_zeroes().await {
            warn!(volume = %self.name, "zero scan after the forced handoff failed; zeros are copied: {e}");
        }
        self.wake.notify_waiters();
        Ok(true)
    }

    /// Makes sure this clone is never handed off (its migration was
    /// cancelled at the source): false if it already was.
    pub async fn cancel_before_handoff(&self) -> bool {
        let _h = self.handoff_lock.lock().await;
        if self.is_handed_off() {
            return false;
        }
        *self.failed.lock().unwrap() = Some("migration cancelled at the source".into());
        self.stop();
        true
    }

    /// The handoff (see module docs). Idempotent; `force` skips fencing the
    /// source (an operator's decision that the source is dead).
    pub async fn handoff(&self, force: bool) -> BlockResult<()> {
        if self.is_handed_off() {
            return Ok(());
        }
        let _h = self.handoff_lock.lock().await;
        if self.is_handed_off() {
            return Ok(());
        }
        if let Some(why) = self.failed.lock().unwrap().clone() {
            return Err(BlockError::Unavailable(why));
        }
        // Even when forced, the source is asked first: `force` only means
        // "go ahead if it cannot be reached". A source that answers and
        // refuses is alive and has disowned this migration (cancelled, or
        // a clone left by a lost prepare): taking the volume then would
        // make two writers.
        let rollback = self.rollback_of().is_some();
        let force = match self.hooks.fence_source().await {
            Ok(()) => false,
            Err(FenceError::Unreachable(e)) if force && rollback => {
                self.note_error(&e);
                return Err(BlockError::Unavailable(format!(
                    "cannot hand off {}: a rollback cannot be forced (only the source knows \
                     which regions it wrote): {e}",
                    self.name
                )));
            }
            Err(FenceError::Unreachable(e)) if force => {
                warn!(volume = %self.name, migration = %self.migration, event = "forced_handoff", "forced handoff: the source cannot be reached ({e}); it will be fenced before anything more is read from it");
                self.source_unfenced.store(true, Ordering::SeqCst);
                true
            }
            Err(FenceError::Unreachable(e)) if !rollback => {
                match self.hooks.may_take_over().await {
                    Ok(true) => {
                        warn!(volume = %self.name, migration = %self.migration, event = "forced_handoff", "takeover: the source cannot be reached ({e}) and its cluster lease is gone; it will be fenced before anything more is read from it");
                        self.source_unfenced.store(true, Ordering::SeqCst);
                        true
                    }
                    Ok(false) => {
                        self.note_error(&e);
                        return Err(BlockError::Unavailable(format!(
                            "cannot hand off {}: {e}",
                            self.name
                        )));
                    }
                    Err(t) => {
                        self.note_error(&t);
                        return Err(BlockError::Unavailable(format!(
                            "cannot hand off {}: {e}; {t}",
                            self.name
                        )));
                    }
                }
            }
            Err(e) => {
                self.note_error(&e);
                return Err(BlockError::Unavailable(format!(
                    "cannot hand off {}: {e}",
                    self.name
                )));
            }
        };
        if self.stopped.load(Ordering::SeqCst) {
            return Err(BlockError::Unavailable(format!(
                "{}: the clone was stopped (removed or cancelled)",
                self.name
            )));
        }
        if rollback {
            // The source is fenced: its written set is final, and the
            // rest of this node's copy is current.
            self.mark_base_present().await?;
        } else if !force {
            // Only a fenced source's block status is final. After a forced
            // handoff the scan waits until the source has been reached and
            // fenced (`ensure_source_fenced`).
            self.mark_source_zeroes().await?;
        }
        self.commit().await?;
        if let Err(e) = self.hooks.claim_ownership(force).await {
            // The source stays fenced (if it was) and this node takes no
            // write: as a handoff that failed. A later handoff retries.
            self.note_error(&e);
            return Err(BlockError::Unavailable(format!(
                "cannot hand off {}: {e}",
                self.name
            )));
        }
        self.hooks
            .persist_handoff(!force)
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        self.handed_off.store(true, Ordering::SeqCst);
        *self.stats.handoff_at.lock().unwrap() = Some(Instant::now());
        self.note_recovered();
        info!(volume = %self.name, migration = %self.migration, event = "handoff", forced = force, skipped = self.stats.skipped.load(Ordering::Relaxed), "handoff complete: hydrating");
        self.wake.notify_waiters();
        Ok(())
    }

    /// Marks present every region the (fenced) source reports as reading
    /// zero: those bytes never cross the network.
    pub(super) async fn mark_source_zeroes(&self) -> BlockResult<()> {
        self.scan_source_zeroes(0, self.regions(), false).await
    }

    pub(super) fn regions(&self) -> u64 {
        self.size.div_ceil(self.region_size)
    }

    /// Marks present the regions of `first..end` that the (fenced) source
    /// reads as zero. `locked`: the caller holds those regions' lock.
    pub(super) async fn scan_source_zeroes(
        &self,
        first: u64,
        end: u64,
        locked: bool,
    ) -> BlockResult<()> {
        let stop = (end * self.region_size).min(self.size);
        let mut pos = first * self.region_size;
        while pos < stop {
            let len = (stop - pos).min(1 << 30);
            let ext = self.origin.block_status(pos, len).await?;
            if ext.is_empty() {
                break;
            }
            for e in ext {
                let (start, end) = (pos, (pos + e.len as u64).min(stop));
                if e.flags & alloc_flags::ZERO != 0 {
                    // Regions wholly inside the zero extent (the last
                    // region may be short and end with the volume).
                    let first = start.div_ceil(self.region_size);
                    let end_region = if end == self.size {
                        self.regions()
                    } else {
                        end / self.region_size
                    };
                    if first < end_region {
                        if locked {
                            self.mark_zero_locked(first, end_region).await?;
                        } else {
                            self.mark_zero_run(first, end_region).await?;
                        }
                    }
                }
                pos = end;
                if pos >= stop {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Marks the absent regions of `first..end` present as zeros (the
    /// fenced source reads them as zero), punching their local range first
    /// (a crash may have lost the bit of data fetched there before).
    /// Regions a fetch holds are left to it: it copies what it needs.
    pub(super) async fn mark_zero_run(&self, first: u64, end: u64) -> BlockResult<()> {
        const CHUNK: u64 = 1024;
        let mut c = first;
        while c < end {
            let stop = (c + CHUNK).min(end);
            if let Some(_g) = self.locks.try_lock(c, stop - 1) {
                self.mark_zero_locked(c, stop).await?;
            } else {
                for r in c..stop {
                    if let Some(_g) = self.locks.try_lock(r, r) {
                        self.mark_zero_locked(r, r + 1).await?;
                    }
                }
            }
            c = stop;
        }
        Ok(())
    }

    /// [`Self::mark_zero_run`] for regions the caller holds locked.
    pub(super) async fn mark_zero_locked(&self, first: u64, end: u64) -> BlockResult<()> {
        let mut r = first;
        while r < end {
            let (a, len) = self.map.lock().unwrap().absent_run(r, end, u64::MAX);
            let b = a + len;
            r = b;
            if a == b {
                break;
            }
            let (off, _) = self.region_span(a);
            let (_, stop) = self.region_span(b - 1);
            self.local.trim(off, stop - off, false).await?;
            let newly = self.map.lock().unwrap().mark_range(a, b - 1);
            self.stats
                .skipped
                .fetch_add(newly * self.region_size, Ordering::Relaxed);
        }
        Ok(())
    }
}
