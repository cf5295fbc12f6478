//! Region-map commits, in the order `region_map` documents: snapshot,
//! sync data, write changed pages, sync map. This is the one place that
//! runs those steps.

use super::*;

impl CloneTarget {
    /// Commits the region map: snapshot, sync data, write changed pages,
    /// sync map (see `region_map`). Serialised by `commit_lock`.
    ///
    /// A commit that does not finish (any error, or its future dropped at
    /// an await, e.g. by an API caller that went away) gives its snapshot's
    /// pages back to the dirty set, so the next commit writes them.
    /// A failed sync of the *data* file is fatal for the clone: the kernel
    /// may have dropped the unwritten pages and a later sync would report
    /// success over the hole (PostgreSQL's fsync lesson), so the migration
    /// is marked failed and every later flush fails too.
    pub async fn commit(&self) -> BlockResult<usize> {
        let _c = self.commit_lock.lock().await;
        self.check_data_intact()?;
        let batch = self.map.lock().unwrap().snapshot();
        let mut pending = PendingCommit {
            map: &self.map,
            pages: batch.page_numbers(),
        };
        if let Err(e) = self.local.flush().await {
            let why = format!(
                "{}: syncing the local data file failed ({e}); data written since the last \
                 sync may be lost, so this copy can no longer be trusted",
                self.name
            );
            tracing::error!(volume = %self.name, migration = %self.migration, event = "failed", "{why}");
            self.fail(why);
            return Err(e);
        }
        let pages = batch.pages();
        if pages == 0 {
            return Ok(0);
        }
        let file = self
            .map_file
            .lock()
            .unwrap()
            .try_clone()
            .map_err(BlockError::from_io)?;
        tokio::task::spawn_blocking(move || batch.write(&file))
            .await
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?
            .map_err(BlockError::from_io)?;
        pending.pages.clear();
        Ok(pages)
    }

    #[cfg(test)]
    pub(super) fn map_file_for_test(&self) -> std::sync::MutexGuard<'_, File> {
        self.map_file.lock().unwrap()
    }

    /// Fails if a sync of the data file ever failed (see [`Self::commit`]).
    pub(super) fn check_data_intact(&self) -> BlockResult<()> {
        match &*self.failed.lock().unwrap() {
            Some(why) if self.data_lost.load(Ordering::SeqCst) => {
                Err(BlockError::Io(std::io::Error::other(why.clone())))
            }
            _ => Ok(()),
        }
    }
}

/// A commit in progress: unless it reaches its end (and clears `pages`),
/// dropping it marks the snapshot's pages dirty again.
struct PendingCommit<'a> {
    map: &'a Mutex<RegionMap>,
    pages: Vec<u64>,
}

impl Drop for PendingCommit<'_> {
    fn drop(&mut self) {
        if !self.pages.is_empty() {
            let pages = std::mem::take(&mut self.pages);
            self.map.lock().unwrap().redirty(pages);
        }
    }
}
