//! What a rollback needs from a clone, on both of its nodes.
//!
//! A migration M from S to D is rolled back after handoff by migrating
//! the volume back, D to S, as migration R, with one difference: S still
//! has the copy it was fenced with at M's handoff, and since then only the
//! regions clients wrote on D changed. So:
//!
//! * **On D (the clone of M)**, every region a client writes after handoff
//!   is recorded in the *written map* (`written.map`, a [`RegionMap`] whose
//!   bits mean "written here"), durably **before** the write is applied
//!   ([`CloneTarget::note_written`]). A crash can then only leave a bit
//!   set for a write that never landed (the region crosses back for
//!   nothing), never a region changed here that the map does not name.
//!   First writes to a region wait for one map sync, shared by every write
//!   that arrives meanwhile (a group commit, as dm-era does); later writes
//!   to it cost nothing.
//! * **On S (the clone of R, made over S's old copy)**, the handoff marks
//!   present every region D did *not* write, asked of D once D is fenced
//!   for R (so the set is final), instead of scanning the source for zeros
//!   ([`CloneTarget::mark_base_present`]). Only the written regions are
//!   fetched. A forced handoff is refused: without D's answer nothing says
//!   which regions are stale.
//! * While R has not handed off, D's clone of M must not complete
//!   ([`CloneTarget::hold_completion`]): a completed clone collapses to a
//!   plain volume and stops recording writes, but D still takes writes
//!   until R hands off.

use super::*;

impl CloneTarget {
    /// Starts recording client writes in `map` (a written map: see the
    /// module docs), kept in its own file.
    pub fn track_writes(&self, map: RegionMap) -> std::io::Result<()> {
        let file = map.file().try_clone()?;
        *self.written_file.lock().unwrap() = Some(file);
        *self.written.lock().unwrap() = Some(map);
        Ok(())
    }

    /// Whether client writes are recorded (clones made before writes were
    /// tracked are not, and cannot be rolled back).
    pub fn tracks_writes(&self) -> bool {
        self.written.lock().unwrap().is_some()
    }

    /// Records durably that regions `first..=last` are written here, before
    /// the write is applied. A no-op before handoff (a write hands off
    /// first) and for regions already recorded.
    pub(super) async fn note_written(&self, first: u64, last: u64) -> BlockResult<()> {
        {
            let mut w = self.written.lock().unwrap();
            let Some(w) = w.as_mut() else {
                return Ok(());
            };
            if w.all_present(first, last) {
                // Recorded; durable unless a commit holding it is still
                // writing (its lock is held) or it is still dirty.
                if !w.is_dirty() && self.written_commit.try_lock().is_ok() {
                    return Ok(());
                }
            } else {
                w.mark_range(first, last);
            }
        }
        // Group commit: whoever takes the lock writes every page dirty by
        // then; a writer whose bits an earlier commit covered finds
        // nothing left to write.
        let _c = self.written_commit.lock().await;
        let batch = match self.written.lock().unwrap().as_mut() {
            Some(w) => w.snapshot(),
            None => return Ok(()),
        };
        if batch.pages() == 0 {
            return Ok(());
        }
        // Unless the write below finishes, the pages go back to the dirty
        // set (an error, or this future dropped at the await).
        let mut pending = PendingWritten {
            map: &self.written,
            pages: batch.page_numbers(),
        };
        let file = self
            .written_file
            .lock()
            .unwrap()
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(BlockError::from_io)?;
        let Some(file) = file else { return Ok(()) };
        tokio::task::spawn_blocking(move || batch.write(&file))
            .await
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?
            .map_err(BlockError::from_io)?;
        pending.pages.clear();
        Ok(())
    }

    /// The regions clients wrote here since handoff, as runs
    /// `(first, count)`; `None` if writes are not tracked.
    pub fn written_runs(&self) -> Option<Vec<(u64, u64)>> {
        self.written
            .lock()
            .unwrap()
            .as_ref()
            .map(|w| w.present_runs())
    }

    /// The regions written here since handoff that are present here, as
    /// runs: what a rollback must copy back (a written region that is
    /// absent never got its data, so the old source's copy is current).
    pub fn written_present_runs(&self) -> Option<Vec<(u64, u64)>> {
        let runs = self.written_runs()?;
        let map = self.map.lock().unwrap();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (first, count) in runs {
            for r in first..first + count {
                if !map.is_present(r) {
                    continue;
                }
                match out.last_mut() {
                    Some((s, n)) if *s + *n == r => *n += 1,
                    _ => out.push((r, 1)),
                }
            }
        }
        Some(out)
    }

    /// Whether a forced handoff left the source unfenced so far.
    pub fn source_unfenced(&self) -> bool {
        self.source_unfenced.load(Ordering::SeqCst)
    }

    /// How many regions clients wrote here since handoff.
    pub fn written_regions(&self) -> u64 {
        self.written
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |w| w.present_count())
    }

    /// Bytes of the regions written here since handoff.
    pub fn written_bytes(&self) -> u64 {
        self.written_regions() * self.region_size
    }

    /// Makes this clone the rollback of migration `of` (see the module
    /// docs): its local file is this node's copy from that migration's
    /// handoff.
    pub fn set_rollback_of(&self, of: &str) {
        *self.rollback_of.lock().unwrap() = Some(of.to_owned());
    }

    /// The migration this clone rolls back, if it is a rollback.
    pub fn rollback_of(&self) -> Option<String> {
        self.rollback_of.lock().unwrap().clone()
    }

    /// Holds (or lets) completion: see the module docs.
    pub fn hold_completion(&self, hold: bool) {
        self.hold_complete.store(hold, Ordering::SeqCst);
        self.wake.notify_waiters();
        if !hold {
            self.completed.notify_waiters();
        }
    }

    pub(super) fn completion_held(&self) -> bool {
        self.hold_complete.load(Ordering::SeqCst)
    }

    /// Rollback handoff: with the source fenced, marks present every
    /// region it did not write since its own handoff (this node's copy of
    /// those is current). The map is committed by the caller.
    pub(super) async fn mark_base_present(&self) -> BlockResult<()> {
        let written =
            self.hooks.written_at_source().await.map_err(|e| {
                BlockError::Unavailable(format!("cannot roll back {}: {e}", self.name))
            })?;
        let regions = self.regions();
        let mut map = self.map.lock().unwrap();
        let mut next = 0u64;
        for (first, count) in written {
            if first > regions || count > regions - first {
                return Err(BlockError::Unavailable(format!(
                    "cannot roll back {}: the source named regions {first}+{count} of {regions}",
                    self.name
                )));
            }
            if first > next {
                map.mark_range(next, first - 1);
            }
            next = next.max(first + count);
        }
        if next < regions {
            map.mark_range(next, regions - 1);
        }
        Ok(())
    }
}

/// A written-map commit in progress: see [`CloneTarget::note_written`].
struct PendingWritten<'a> {
    map: &'a Mutex<Option<RegionMap>>,
    pages: Vec<u64>,
}

impl Drop for PendingWritten<'_> {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            if let Some(w) = self.map.lock().unwrap().as_mut() {
                w.redirty(std::mem::take(&mut self.pages));
            }
        }
    }
}
