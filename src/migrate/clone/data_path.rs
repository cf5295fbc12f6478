//! The data path: what a client's read, write, trim, zero, flush and
//! block status do before handoff (passthrough) and after it (on-demand
//! fetch under region locks).

use super::*;

/// Background runs of data at least this long are written around the page
/// cache; shorter ones (data between zero regions) are written buffered
/// with write-behind, where many small writes cost a memory copy each
/// instead of a disk round trip each.
const DIRECT_WRITE_MIN: usize = 256 << 10;

impl CloneTarget {
    /// Fetches regions `first..first+count`, which the caller holds locked,
    /// skipping any already present. Data is written (or, if all zero,
    /// punched) locally before the regions are marked present.
    pub(super) async fn fetch_locked(
        &self,
        first: u64,
        count: u64,
        kind: FetchKind,
    ) -> BlockResult<()> {
        if self.ensure_source_fenced().await? {
            self.scan_source_zeroes(first, first + count, true).await?;
        }
        let mut r = first;
        let end = first + count;
        while r < end {
            // Find the next run of absent regions, bounded by the batch size.
            let max = (self.cfg.batch_bytes / self.region_size).max(1);
            let (run_start, run_len) = self.map.lock().unwrap().absent_run(r, end, max);
            r = run_start + run_len;
            if run_len == 0 {
                break;
            }
            let (off, _) = self.region_span(run_start);
            let (_, stop) = self.region_span(run_start + run_len - 1);
            let (bulk, timed) = match kind {
                FetchKind::Background => (true, OriginRead::Background),
                FetchKind::OnDemand => (false, OriginRead::OnDemand),
            };
            let buf = if stop - off <= crate::nbd::server::MAX_PAYLOAD as u64 {
                let read = self.origin.read_vec(off, (stop - off) as u32, bulk);
                self.timed_read(timed, read).await?
            } else {
                let mut b = crate::bufpool::IoBuf::aligned((stop - off) as usize, 0);
                self.timed_read(timed, self.origin.read_into(off, &mut b))
                    .await?;
                b
            };
            // Write runs of data regions in one call each; punch runs of
            // all-zero regions. The local range of an absent region is
            // normally a hole already; punching also clears data whose
            // present bit a crash lost before any flush.
            let rs = self.region_size as usize;
            let zero: Vec<bool> = buf.chunks(rs).map(|c| c.iter().all(|b| *b == 0)).collect();
            let mut i = 0;
            while i < zero.len() {
                let mut j = i + 1;
                while j < zero.len() && zero[j] == zero[i] {
                    j += 1;
                }
                let (a, b) = (i * rs, (j * rs).min(buf.len()));
                if zero[i] {
                    self.local
                        .trim(off + a as u64, (b - a) as u64, false)
                        .await?;
                } else if kind == FetchKind::Background
                    && b - a >= DIRECT_WRITE_MIN
                    && self
                        .local
                        .writes_direct(off + a as u64, b - a, buf[a..b].as_ptr())
                {
                    // Around the page cache (O_DIRECT): no copy into it, no
                    // writeback to chase, nothing to drop. Durable, like a
                    // buffered write, at the next commit's data sync, which
                    // comes before the map marks these regions present on
                    // disk. Direct writes need no turns: the kernel
                    // serialises what it must without spinning.
                    self.local.write_bulk(off + a as u64, &buf[a..b])?;
                } else {
                    // Buffered background copies take turns at the file:
                    // concurrent buffered writes to one inode only spin on
                    // its lock.
                    let _turn = self.write_turn.lock().await;
                    self.local.write(off + a as u64, &buf[a..b], false).await?;
                    if kind == FetchKind::Background {
                        self.write_behind(off + a as u64, (b - a) as u64).await?;
                    }
                }
                i = j;
            }
            buf.give();
            {
                let mut map = self.map.lock().unwrap();
                for reg in run_start..run_start + run_len {
                    map.mark_present(reg);
                }
            }
            if kind == FetchKind::OnDemand {
                self.note_fetched_on_demand(run_start, run_start + run_len - 1);
            }
            let bytes = stop - off;
            match kind {
                FetchKind::OnDemand => self.stats.on_demand.fetch_add(bytes, Ordering::Relaxed),
                FetchKind::Background => self.stats.background.fetch_add(bytes, Ordering::Relaxed),
            };
        }
        Ok(())
    }

    /// Reads without making anything present (the destination's disk is
    /// full): present regions from the local file, absent ones straight
    /// from the origin, under the regions' locks so that none changes
    /// state mid-read.
    pub(super) async fn read_through(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.ensure_source_fenced().await?;
        let end = offset + buf.len() as u64;
        let (first, last) = (self.region_of(offset), self.region_of(end - 1));
        let _g = self.locks.lock(first, last).await;
        for r in first..=last {
            let (rs, re) = self.region_span(r);
            let (a, b) = (rs.max(offset), re.min(end));
            let part = &mut buf[(a - offset) as usize..(b - offset) as usize];
            if self.map.lock().unwrap().is_present(r) {
                self.local.read(a, part).await?;
            } else {
                self.timed_read(OriginRead::Passthrough, self.origin.read_into(a, part))
                    .await?;
            }
        }
        Ok(())
    }

    /// Makes regions `first..=last` present, fetching what is absent.
    pub(super) async fn ensure_present(
        &self,
        first: u64,
        last: u64,
        kind: FetchKind,
    ) -> BlockResult<()> {
        if self.map.lock().unwrap().all_present(first, last) {
            return Ok(());
        }
        if kind == FetchKind::OnDemand {
            self.note_on_demand();
        }
        let _g = self.locks.lock(first, last).await;
        self.fetch_locked(first, last - first + 1, kind).await
    }

    /// A write-like change to `[offset, offset+len)`: hands off if needed,
    /// fetches partially covered absent regions, applies `op` locally and
    /// marks every touched region present.
    async fn modify<'a>(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        op: LocalOp<'a>,
    ) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        self.handoff(false).await?;
        let (first, last) = (self.region_of(offset), self.region_of(offset + len - 1));
        // Durably recorded before the data lands (see `rollback`).
        self.note_written(first, last).await?;
        if self.map.lock().unwrap().all_present(first, last) {
            op.apply(&self.local, offset, len).await?;
        } else {
            let _g = self.locks.lock(first, last).await;
            for r in [first, last] {
                let (a, b) = self.region_span(r);
                let covered = offset <= a && offset + len >= b;
                if !covered && !self.map.lock().unwrap().is_present(r) {
                    self.note_on_demand();
                    self.fetch_locked(r, 1, FetchKind::OnDemand).await?;
                }
            }
            op.apply(&self.local, offset, len).await?;
            let mut map = self.map.lock().unwrap();
            for r in first..=last {
                map.mark_present(r);
            }
        }
        self.note_written_for_view(first, last);
        if fua {
            self.commit().await?;
        }
        if self.map.lock().unwrap().is_complete() {
            self.wake.notify_waiters();
        }
        Ok(())
    }
}

/// The local half of a write-like operation.
enum LocalOp<'a> {
    Write(&'a [u8]),
    Trim,
    Zero(ZeroFlags),
}

impl LocalOp<'_> {
    async fn apply(&self, local: &LocalTarget, offset: u64, len: u64) -> BlockResult<()> {
        match self {
            LocalOp::Write(d) => local.write(offset, d, false).await,
            LocalOp::Trim => local.trim(offset, len, false).await,
            LocalOp::Zero(f) => {
                let f = ZeroFlags { fua: false, ..*f };
                local.write_zeroes(offset, len, f).await
            }
        }
    }
}

#[async_trait]
impl BlockTarget for CloneTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            trim: true,
            write_zeroes: true,
            fast_zero: false,
            block_status: true,
            cache: true,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self.is_handed_off() {
            // Passthrough: nothing read before handoff is kept.
            let read = self.origin.read_into(offset, buf);
            return self.timed_read(OriginRead::Passthrough, read).await;
        }
        let end = offset + buf.len() as u64;
        let (first, last) = (self.region_of(offset), self.region_of(end - 1));
        if !self.map.lock().unwrap().all_present(first, last) {
            match self.ensure_present(first, last, FetchKind::OnDemand).await {
                Ok(()) => {}
                // No room to keep the fetched data: serve it anyway.
                Err(BlockError::NoSpace) => return self.read_through(offset, buf).await,
                Err(e) => return Err(e),
            }
            // Sequential on-demand reads: ask the hydrator for what follows.
            let prev = self.last_on_demand_end.swap(last + 1, Ordering::Relaxed);
            if prev == first && self.cfg.prefetch_regions > 0 {
                let regions = self.map.lock().unwrap().regions();
                let start = last + 1;
                if start < regions {
                    let n = self.cfg.prefetch_regions.min(regions - start);
                    let mut h = self.hints.lock().unwrap();
                    if h.len() < 64 {
                        h.push_back((start, n));
                    }
                }
                self.wake.notify_waiters();
            }
        }
        self.local.read(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> BlockResult<()> {
        self.modify(offset, data.len() as u64, fua, LocalOp::Write(data))
            .await
    }

    async fn flush(&self) -> BlockResult<()> {
        if !self.is_handed_off() {
            return Ok(());
        }
        self.commit().await.map(drop)
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        self.modify(offset, len, fua, LocalOp::Trim).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        // A fast zero must fail rather than wait: this target does not
        // offer it, but a connection opened on the local volume this clone
        // replaced (a rollback) may still ask. A handoff or a fetch is
        // slow, so refuse when one would be needed.
        if flags.fast && len > 0 {
            check_range(offset, len, self.size)?;
            if !self.is_handed_off() {
                return Err(BlockError::NotSupported);
            }
            let (first, last) = (self.region_of(offset), self.region_of(offset + len - 1));
            let map = self.map.lock().unwrap();
            for r in [first, last] {
                let (a, b) = self.region_span(r);
                let covered = offset <= a && offset + len >= b;
                if !covered && !map.is_present(r) {
                    return Err(BlockError::NotSupported);
                }
            }
        }
        self.modify(offset, len, flags.fua, LocalOp::Zero(flags))
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        if !self.is_handed_off() {
            return self.origin.block_status(offset, len).await;
        }
        // One run of same-state regions: present runs as the local file
        // sees them, absent runs as data (their content is the origin's).
        let end = offset + len;
        let first = self.region_of(offset);
        // One look at the map: `present` and the run it starts must come
        // from the same state, or a region marked present in between
        // would end the run before it began (a zero-length extent).
        let (present, r) = {
            let map = self.map.lock().unwrap();
            let present = map.is_present(first);
            let mut r = first + 1;
            while r * self.region_size < end && map.is_present(r) == present {
                r += 1;
            }
            (present, r)
        };
        let run_end = (r * self.region_size).min(end);
        if present {
            self.local.extents(offset, run_end - offset)
        } else {
            Ok(vec![Extent {
                len: (run_end - offset).min(u32::MAX as u64 & !4095) as u32,
                flags: 0,
            }])
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        if self.is_handed_off() && len > 0 {
            self.ensure_present(
                self.region_of(offset),
                self.region_of(offset + len - 1),
                FetchKind::OnDemand,
            )
            .await?;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.local.allocated_bytes()
    }
}
