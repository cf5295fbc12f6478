//! The clone's invariants against an in-memory origin that delays and
//! fails, and a local file whose syncs fail or stall.

use super::*;
use std::sync::atomic::AtomicU32;

/// Hooks whose fence answer a test sets.
struct Hooks {
    fence: Mutex<Result<(), FenceError>>,
    fenced: AtomicU32,
}
impl Hooks {
    fn answering(r: Result<(), FenceError>) -> Arc<Self> {
        Arc::new(Self {
            fence: Mutex::new(r),
            fenced: AtomicU32::new(0),
        })
    }
}
#[async_trait]
impl MigrationHooks for Hooks {
    async fn fence_source(&self) -> Result<(), FenceError> {
        let r = self.fence.lock().unwrap().clone();
        if r.is_ok() {
            self.fenced.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
    fn persist_handoff(&self, _: bool) -> Result<(), String> {
        Ok(())
    }
}

/// An origin in memory that can be slowed down and made to fail.
struct MemOrigin {
    data: Mutex<Vec<u8>>,
    delay_ms: AtomicU64,
    down: AtomicBool,
    reads: AtomicU64,
}
impl MemOrigin {
    fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(data),
            delay_ms: AtomicU64::new(0),
            down: AtomicBool::new(false),
            reads: AtomicU64::new(0),
        })
    }
    async fn pause(&self) -> BlockResult<()> {
        let d = self.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(BlockError::Unavailable("origin down".into()));
        }
        Ok(())
    }
}
#[async_trait]
impl Origin for MemOrigin {
    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.pause().await?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    async fn read_vec(
        &self,
        offset: u64,
        len: u32,
        _bulk: bool,
    ) -> BlockResult<crate::bufpool::IoBuf> {
        let mut b = crate::bufpool::IoBuf::aligned(len as usize, 0);
        self.read_into(offset, &mut b).await?;
        Ok(b)
    }
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.pause().await?;
        let d = self.data.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let end = (offset + len).min(d.len() as u64);
        let mut pos = offset;
        while pos < end {
            let stop = ((pos / 4096 + 1) * 4096).min(end);
            let zero = d[pos as usize..stop as usize].iter().all(|b| *b == 0);
            let flags = if zero { alloc_flags::ZERO } else { 0 };
            match out.last_mut() {
                Some(e) if e.flags == flags => e.len += (stop - pos) as u32,
                _ => out.push(Extent {
                    len: (stop - pos) as u32,
                    flags,
                }),
            }
            pos = stop;
        }
        Ok(out)
    }
    fn close(&self) {}
}

const RS: u64 = 4096;

fn clone_over(
    dir: &std::path::Path,
    origin: Arc<dyn Origin>,
    regions: u64,
    handed_off: bool,
    hooks: Arc<Hooks>,
) -> Arc<CloneTarget> {
    let size = regions * RS;
    let local = Arc::new(LocalTarget::create(&dir.join("data.raw"), size).unwrap());
    let map = RegionMap::create(&dir.join("regions.map"), size, RS).unwrap();
    let cfg = CloneConfig {
        batch_bytes: 4 * RS,
        ..CloneConfig::default()
    };
    CloneTarget::new(
        "vm",
        "peer",
        "0123456789abcdef",
        origin,
        local,
        map,
        handed_off,
        hooks,
        cfg,
    )
    .unwrap()
}

/// A handed-off clone of 16 regions whose origin is down (the tests
/// write whole regions, which fetch nothing).
fn handed_off_clone(dir: &std::path::Path) -> Arc<CloneTarget> {
    let origin = MemOrigin::new(vec![0; 16 * RS as usize]);
    origin.down.store(true, Ordering::SeqCst);
    clone_over(dir, origin, 16, true, Hooks::answering(Ok(())))
}

/// Every other 4 KiB region holds data, the rest are zero.
fn half_data(regions: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity((regions * RS) as usize);
    for r in 0..regions {
        let fill = if r % 2 == 0 { (r % 251) as u8 + 1 } else { 0 };
        d.extend(std::iter::repeat_n(fill, RS as usize));
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_never_answers_an_empty_extent_while_regions_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MemOrigin::new(half_data(4096));
    let c = clone_over(dir.path(), origin, 4096, true, Hooks::answering(Ok(())));
    let _h = c.start();
    let mut calls = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !c.is_complete() || calls < 2000 {
        // Where the copier is about to land: the region whose state is
        // most likely to change between two looks at the map.
        let next = c.map.lock().unwrap().next_absent(0);
        let off = next.unwrap_or(calls * 7919 % 4096) * RS;
        let ext = c.block_status(off, 4096 * RS - off).await.unwrap();
        assert!(!ext.is_empty(), "no extent at {off}");
        assert!(
            ext.iter().all(|e| e.len > 0),
            "empty extent at {off}: {ext:?}"
        );
        calls += 1;
        // Leave the copier room on a loaded machine: a fixed number of
        // calls was not always enough for it to finish.
        tokio::task::yield_now().await;
        assert!(
            std::time::Instant::now() < deadline,
            "never completed ({calls} calls)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fetch_never_lands_over_a_client_write() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MemOrigin::new(vec![0xAA; 64 * RS as usize]);
    origin.delay_ms.store(100, Ordering::SeqCst);
    let c = clone_over(
        dir.path(),
        origin.clone(),
        64,
        true,
        Hooks::answering(Ok(())),
    );
    // A read of region 5 fetches it (slowly); meanwhile a client writes
    // region 5 whole, and part of region 6 (which must fetch first).
    let reader = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut b = vec![0; RS as usize];
            c.read(5 * RS, &mut b).await.map(|_| b)
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.write(5 * RS, &[0x55; RS as usize], false).await.unwrap();
    c.write(6 * RS + 100, &[0x66; 50], false).await.unwrap();
    let read = reader.await.unwrap().unwrap();
    // The read saw the region either before or after the write, whole.
    assert!(read == vec![0xAA; RS as usize] || read == vec![0x55; RS as usize]);
    let mut b = vec![0; RS as usize];
    c.read(5 * RS, &mut b).await.unwrap();
    assert_eq!(
        b,
        vec![0x55; RS as usize],
        "the fetch landed over the write"
    );
    c.read(6 * RS, &mut b).await.unwrap();
    assert_eq!(&b[..100], &[0xAA; 100]);
    assert_eq!(&b[100..150], &[0x66; 50]);
    assert_eq!(&b[150..], &[0xAA; RS as usize - 150]);
}

#[tokio::test]
async fn a_handoff_fences_first_and_a_forced_one_only_when_the_source_is_unreachable() {
    for (answer, force, handed_off, unfenced) in [
        (Ok(()), false, true, false),
        (Ok(()), true, true, false),
        (
            Err(FenceError::Unreachable("down".into())),
            false,
            false,
            false,
        ),
        (
            Err(FenceError::Unreachable("down".into())),
            true,
            true,
            true,
        ),
        (
            Err(FenceError::Refused("not mine".into())),
            true,
            false,
            false,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let origin = MemOrigin::new(half_data(8));
        let hooks = Hooks::answering(answer.clone());
        let c = clone_over(dir.path(), origin, 8, false, hooks.clone());
        let r = c.handoff(force).await;
        assert_eq!(r.is_ok(), handed_off, "{answer:?} force={force}: {r:?}");
        assert_eq!(c.is_handed_off(), handed_off);
        assert_eq!(c.source_unfenced.load(Ordering::SeqCst), unfenced);
        // Zeros are skipped only once the source was fenced.
        let skipped = c.stats.skipped.load(Ordering::Relaxed);
        assert_eq!(
            skipped > 0,
            handed_off && !unfenced,
            "{answer:?} force={force}"
        );
        if !handed_off {
            // Nothing may be written before a handoff.
            assert!(c.write(0, &[1; RS as usize], false).await.is_err());
        }
    }
}

#[tokio::test]
async fn pause_holds_the_copy_and_resume_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MemOrigin::new(half_data(64));
    let c = clone_over(
        dir.path(),
        origin.clone(),
        64,
        true,
        Hooks::answering(Ok(())),
    );
    c.pause();
    let _h = c.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        origin.reads.load(Ordering::SeqCst),
        0,
        "copied while paused"
    );
    c.resume();
    tokio::time::timeout(Duration::from_secs(10), c.wait_complete())
        .await
        .unwrap();
    let mut b = vec![0; 64 * RS as usize];
    c.read(0, &mut b).await.unwrap();
    assert_eq!(b, half_data(64));
}

fn present_on_disk(dir: &std::path::Path, r: u64) -> bool {
    RegionMap::open(&dir.join("regions.map"))
        .unwrap()
        .is_present(r)
}

#[tokio::test]
async fn a_commit_dropped_mid_way_gives_its_pages_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = handed_off_clone(dir.path());
    c.write(0, &[7u8; RS as usize], false).await.unwrap();
    // The commit's caller goes away while the data sync is in progress
    // (an HTTP handler whose client disconnected).
    c.local()
        .sync_faults()
        .delay_ms
        .store(300, Ordering::SeqCst);
    let dropped = tokio::time::timeout(Duration::from_millis(50), c.commit()).await;
    assert!(dropped.is_err(), "the commit should still be syncing");
    c.local().sync_faults().delay_ms.store(0, Ordering::SeqCst);
    assert!(
        c.commit().await.unwrap() > 0,
        "the next commit rewrites the page"
    );
    assert!(present_on_disk(dir.path(), 0));
}

#[tokio::test]
async fn a_failed_map_write_keeps_its_pages_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let c = handed_off_clone(dir.path());
    c.write(RS, &[7u8; RS as usize], false).await.unwrap();
    // The map file cannot be written: make it read-only underneath.
    let map_path = dir.path().join("regions.map");
    let good = std::mem::replace(
        &mut *(c.map_file_for_test()),
        std::fs::File::open(&map_path).unwrap(),
    );
    assert!(c.commit().await.is_err());
    *c.map_file_for_test() = good;
    assert!(c.commit().await.unwrap() > 0);
    assert!(present_on_disk(dir.path(), 1));
}

#[tokio::test]
async fn a_failed_data_sync_fails_the_migration_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let c = handed_off_clone(dir.path());
    c.write(0, &[7u8; RS as usize], false).await.unwrap();
    c.local().sync_faults().fail_next.store(1, Ordering::SeqCst);
    assert!(c.flush().await.is_err());
    // The disk "recovered": a second sync would succeed, but the pages
    // it lost are gone, so nothing may report success any more.
    assert!(c.flush().await.is_err(), "a later flush must not succeed");
    assert!(c.write(RS, &[1u8; RS as usize], true).await.is_err());
    let s = c.status();
    assert_eq!(s.phase, Phase::Failed);
    assert!(s
        .last_error
        .unwrap()
        .contains("syncing the local data file failed"));
    assert!(!present_on_disk(dir.path(), 0));
}

#[tokio::test]
async fn writes_are_recorded_durably_before_they_land() {
    let dir = tempfile::tempdir().unwrap();
    let c = handed_off_clone(dir.path());
    let wpath = dir.path().join("written.map");
    c.track_writes(RegionMap::create(&wpath, 16 * RS, RS).unwrap())
        .unwrap();
    // Whole regions 2 and 3, part of 9 (partial writes of absent regions
    // fetch, so make 9 present first).
    c.map.lock().unwrap().mark_present(9);
    c.write(2 * RS, &vec![7; 2 * RS as usize], false)
        .await
        .unwrap();
    c.write(9 * RS + 10, b"x", false).await.unwrap();
    // No flush: the bits are on disk already.
    let on_disk = RegionMap::open(&wpath).unwrap();
    assert_eq!(on_disk.present_runs(), vec![(2, 2), (9, 1)]);
    assert_eq!(c.written_runs().unwrap(), vec![(2, 2), (9, 1)]);
    assert_eq!(c.written_bytes(), 3 * RS);
    // A write to a region already recorded writes no map page.
    let before = std::fs::metadata(&wpath).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.write(2 * RS, b"again", false).await.unwrap();
    assert_eq!(
        std::fs::metadata(&wpath).unwrap().modified().unwrap(),
        before
    );
}

/// Hooks of a rollback clone: the source's written set is `written`.
struct RollbackHooks(Vec<(u64, u64)>);
#[async_trait]
impl MigrationHooks for RollbackHooks {
    async fn fence_source(&self) -> Result<(), FenceError> {
        Ok(())
    }
    fn persist_handoff(&self, _: bool) -> Result<(), String> {
        Ok(())
    }
    async fn written_at_source(&self) -> Result<Vec<(u64, u64)>, FenceError> {
        Ok(self.0.clone())
    }
}

#[tokio::test]
async fn a_rollback_handoff_fetches_only_what_the_source_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * RS;
    // This node's old copy (the base) is all 1s; the source changed
    // regions 3 and 10..=11 to 2s.
    let base = vec![1u8; size as usize];
    let mut now = base.clone();
    for r in [3u64, 10, 11] {
        now[(r * RS) as usize..((r + 1) * RS) as usize].fill(2);
    }
    let local = Arc::new(LocalTarget::create(&dir.path().join("data.raw"), size).unwrap());
    local.write(0, &base, false).await.unwrap();
    let map = RegionMap::create(&dir.path().join("regions.map"), size, RS).unwrap();
    let origin = MemOrigin::new(now.clone());
    let c = CloneTarget::new(
        "vm",
        "peer",
        "0123456789abcdef",
        origin.clone(),
        local,
        map,
        false,
        Arc::new(RollbackHooks(vec![(3, 1), (10, 2)])),
        CloneConfig::default(),
    )
    .unwrap();
    c.set_rollback_of("fedcba9876543210");
    c.handoff(false).await.unwrap();
    assert_eq!(c.status().regions_present, 13);
    c.start();
    tokio::time::timeout(Duration::from_secs(10), c.wait_complete())
        .await
        .unwrap();
    let mut got = vec![0; size as usize];
    c.read(0, &mut got).await.unwrap();
    assert!(got == now, "the rollback's copy differs from the source");
    let s = c.status();
    assert_eq!(s.bytes_background + s.bytes_on_demand, 3 * RS, "{s:?}");
    assert_eq!(s.rollback_of.as_deref(), Some("fedcba9876543210"));
    // A rollback is never forced: without the source nothing says which
    // regions are stale.
    let dir2 = tempfile::tempdir().unwrap();
    let c2 = clone_over(
        dir2.path(),
        MemOrigin::new(vec![0; size as usize]),
        16,
        false,
        Hooks::answering(Err(FenceError::Unreachable("gone".into()))),
    );
    c2.set_rollback_of("fedcba9876543210");
    let e = c2.handoff(true).await.unwrap_err();
    assert!(e.to_string().contains("cannot be forced"), "{e}");
    assert!(!c2.is_handed_off());
}

#[tokio::test]
async fn completion_waits_while_held() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MemOrigin::new(vec![5; 8 * RS as usize]);
    let c = clone_over(dir.path(), origin, 8, true, Hooks::answering(Ok(())));
    c.hold_completion(true);
    c.start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.status().regions_present, 8, "copying stops for nothing");
    assert!(!c.is_complete(), "completed while held");
    c.hold_completion(false);
    tokio::time::timeout(Duration::from_secs(10), c.wait_complete())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_view_shows_fetches_and_writes_where_they_happened() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MemOrigin::new(vec![0xAA; 64 * RS as usize]);
    let c = clone_over(dir.path(), origin, 64, true, Hooks::answering(Ok(())));
    // No hydrator: only the client's requests make regions present.
    let v = c.region_view(64);
    assert_eq!((v.counts.absent, v.regions_present), (64, 0));
    let mut b = vec![0; RS as usize];
    c.read(10 * RS, &mut b).await.unwrap();
    // A whole region needs no fetch; a partial one is fetched first.
    c.write(40 * RS, &[1; RS as usize], false).await.unwrap();
    c.write(50 * RS + 10, &[2; 10], false).await.unwrap();
    let v = c.region_view(64);
    assert_eq!(v.cells[10], cell::PRESENT | cell::ON_DEMAND);
    assert_eq!(v.cells[40], cell::PRESENT | cell::WRITTEN);
    assert_eq!(v.cells[50], cell::PRESENT | cell::ON_DEMAND | cell::WRITTEN);
    assert_eq!(v.regions_present, 3);
    assert_eq!(
        (v.counts.present, v.counts.on_demand, v.counts.written),
        (3, 2, 2)
    );
    // Downsampled to 8 cells of 8 regions.
    let v = c.region_view(8);
    assert_eq!(v.cells[0], cell::ABSENT);
    assert_eq!(v.cells[1], cell::PARTIAL | cell::ON_DEMAND);
    assert_eq!(v.cells[5], cell::PARTIAL | cell::WRITTEN);
    assert_eq!(v.cells[6], cell::PARTIAL | cell::ON_DEMAND | cell::WRITTEN);
    assert_eq!(v.regions_present, 3);
}
