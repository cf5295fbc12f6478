//! The region map: which regions of a migrating volume are present locally.
//!
//! One bit per region, kept in memory and in a file (`regions.map`):
//!
//! ```text
//!   page 0        header: magic "DLSMRMAP", version, region size, regions, volume size
//!   page 1..      the bitmap, 4 KiB pages, bit r = region r is present
//! ```
//!
//! **What is written in which order.** A bit only ever goes from 0 (absent)
//! to 1 (present). A commit ([`RegionMap::snapshot`] then
//! [`CommitBatch::write`]) is:
//!
//! 1. under the map lock, copy the bitmap pages changed since the last commit
//!    (the *snapshot*); bits are set only after their region's data was
//!    written to the data file, so every bit in the snapshot has its data
//!    already in the page cache, or (a background copy's direct write)
//!    already handed to the disk, though maybe only to its volatile cache;
//! 2. `fdatasync` the data file — the caller does this, between snapshot and
//!    write — so every region the snapshot calls present is durable (it
//!    writes back cached pages, commits the allocation of directly written
//!    blocks, and flushes the disk's cache, for both kinds alike);
//! 3. `pwrite` the snapshot's pages, then `fdatasync` the map file.
//!
//! Commits are serialised by the caller, so an older snapshot never lands
//! after a newer one. A commit writes only the pages that changed: a guest
//! `fsync` on a 1 TiB volume rewrites a few KiB, not the 2 MiB bitmap.
//!
//! **Recovery.** After a crash at any point, the file holds, for every page,
//! the last committed content or (torn write) a mix of old and new sectors;
//! since bits only go 0 → 1 and step 2 precedes step 3, any such mix marks
//! present only regions whose data is durable. Regions set in memory but not
//! committed are absent after restart and are fetched again: that is the
//! re-fetch DESIGN.md allows, and it only happens to regions whose writes
//! were never flushed, which NBD lets a crash lose.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::unistd::{lseek, Whence};

/// `lseek` on a file (ENXIO past the last data becomes an error).
fn seek(file: &File, pos: u64, whence: Whence) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    lseek(file.as_raw_fd(), pos as i64, whence)
        .map(|p| p as u64)
        .map_err(io::Error::from)
}

const MAGIC: &[u8; 8] = b"DLSMRMAP";
const VERSION: u32 = 1;
const PAGE: u64 = 4096;
const BITS_PER_PAGE: u64 = PAGE * 8;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;

/// A bitmap kept as 4 KiB pages, each allocated when its first bit is set:
/// a fresh map costs no memory and no zeroing whatever the volume size, and
/// memory follows the present regions.
struct PagedBits {
    pages: Vec<Option<Box<[u64; WORDS_PER_PAGE]>>>,
}

impl PagedBits {
    fn new(pages: usize) -> Self {
        Self {
            pages: (0..pages).map(|_| None).collect(),
        }
    }
    fn word(&self, i: usize) -> u64 {
        self.pages[i / WORDS_PER_PAGE]
            .as_ref()
            .map_or(0, |p| p[i % WORDS_PER_PAGE])
    }
    fn word_mut(&mut self, i: usize) -> &mut u64 {
        let page =
            self.pages[i / WORDS_PER_PAGE].get_or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
        &mut page[i % WORDS_PER_PAGE]
    }
    fn page_bytes(&self, p: usize) -> Vec<u8> {
        match &self.pages[p] {
            Some(words) => words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            None => vec![0; PAGE as usize],
        }
    }
    fn allocated_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.is_some()).count()
    }
}

/// The in-memory map plus its file.
///
/// **Who keeps the commit order.** The map only copies pages out
/// ([`RegionMap::snapshot`]) and writes them ([`CommitBatch::write`]); the
/// clone target (`CloneTarget::commit`) is the one place that runs the
/// steps in order (snapshot, sync data, write, sync map), one commit at a
/// time, and gives the snapshot's pages back ([`RegionMap::redirty`]) when
/// a commit stops before its write is durable.
pub struct RegionMap {
    file: File,
    region_size: u64,
    regions: u64,
    volume_size: u64,
    words: PagedBits,
    /// Bitmap pages changed since the last snapshot.
    dirty: std::collections::BTreeSet<u64>,
    present: u64,
}

/// Pages copied out of the map, to be written by [`CommitBatch::write`].
pub struct CommitBatch {
    pages: Vec<(u64, Vec<u8>)>,
}

impl CommitBatch {
    /// Number of 4 KiB pages this commit writes.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Which bitmap pages this commit writes (to mark them dirty again if
    /// it does not finish: see [`RegionMap::redirty`]).
    pub fn page_numbers(&self) -> Vec<u64> {
        self.pages.iter().map(|(p, _)| *p).collect()
    }

    /// Writes the pages and syncs the map file. Call only after the data
    /// file has been synced (step 2 above).
    pub fn write(&self, file: &File) -> io::Result<()> {
        if self.pages.is_empty() {
            return Ok(());
        }
        for (page, bytes) in &self.pages {
            file.write_all_at(bytes, PAGE * (1 + page))?;
        }
        file.sync_data()
    }
}

impl RegionMap {
    /// Number of regions for a volume.
    pub fn region_count(volume_size: u64, region_size: u64) -> u64 {
        volume_size.div_ceil(region_size)
    }

    /// Creates a map with every region absent. Constant time in practice:
    /// the bitmap starts as a hole.
    pub fn create(path: &Path, volume_size: u64, region_size: u64) -> io::Result<Self> {
        if region_size < 4096 || !region_size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("region size {region_size} must be a power of two of at least 4 KiB"),
            ));
        }
        let regions = Self::region_count(volume_size, region_size);
        let pages = regions.div_ceil(BITS_PER_PAGE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut header = vec![0u8; PAGE as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&region_size.to_le_bytes());
        header[24..32].copy_from_slice(&regions.to_le_bytes());
        header[32..40].copy_from_slice(&volume_size.to_le_bytes());
        file.write_all_at(&header, 0)?;
        file.set_len(PAGE * (1 + pages))?;
        // Reserve the bitmap's blocks now (2 MiB for a 1 TiB volume at 64K
        // regions): a commit must never fail for lack of space, or a full
        // disk would stop the map from recording what the data file holds.
        // The blocks stay unwritten, so they still read as zero (absent).
        match nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            PAGE as i64,
            (PAGE * pages) as i64,
        ) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
        file.sync_all()?;
        Ok(Self {
            file,
            region_size,
            regions,
            volume_size,
            words: PagedBits::new(pages as usize),
            dirty: Default::default(),
            present: 0,
        })
    }

    /// Opens a map written by [`RegionMap::create`] and later commits.
    pub fn open(path: &Path) -> io::Result<Self> {
        let bad = |m: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {m}", path.display()),
            )
        };
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut header = vec![0u8; PAGE as usize];
        file.read_exact_at(&mut header, 0)?;
        if &header[..8] != MAGIC {
            return Err(bad("not a dlsm region map".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(bad(format!("unsupported version {version}")));
        }
        let region_size = u64::from_le_bytes(header[16..24].try_into().unwrap());
        let regions = u64::from_le_bytes(header[24..32].try_into().unwrap());
        let volume_size = u64::from_le_bytes(header[32..40].try_into().unwrap());
        if region_size == 0 || regions != Self::region_count(volume_size, region_size) {
            return Err(bad("inconsistent header".into()));
        }
        let pages = regions.div_ceil(BITS_PER_PAGE);
        let mut words = PagedBits::new(pages as usize);
        // Read only the allocated parts: a fresh map is one big hole, so
        // opening it costs nothing whatever the volume size.
        let end = PAGE * (1 + pages);
        let mut pos = PAGE;
        let mut page = vec![0u8; PAGE as usize];
        let mut present = 0u64;
        while pos < end {
            let data = match seek(&file, pos, Whence::SeekData) {
                Ok(d) if d < end => d & !(PAGE - 1),
                _ => break,
            };
            let hole = seek(&file, data, Whence::SeekHole).unwrap_or(end).min(end);
            let mut p = data.max(PAGE);
            while p < hole {
                file.read_exact_at(&mut page, p)?;
                let w0 = ((p - PAGE) / 8) as usize;
                for (i, c) in page.chunks_exact(8).enumerate() {
                    let w = u64::from_le_bytes(c.try_into().unwrap());
                    // Bits past the last region are meaningless; keep them clear.
                    let first_bit = (w0 + i) as u64 * 64;
                    let w = if first_bit >= regions {
                        0
                    } else if first_bit + 64 > regions {
                        w & ((1u64 << (regions - first_bit)) - 1)
                    } else {
                        w
                    };
                    present += w.count_ones() as u64;
                    if w != 0 {
                        *words.word_mut(w0 + i) = w;
                    }
                }
                p += PAGE;
            }
            pos = hole.max(data + PAGE);
        }
        Ok(Self {
            file,
            region_size,
            regions,
            volume_size,
            words,
            dirty: Default::default(),
            present,
        })
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }
    pub fn regions(&self) -> u64 {
        self.regions
    }
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }
    pub fn present_count(&self) -> u64 {
        self.present
    }
    pub fn is_complete(&self) -> bool {
        self.present == self.regions
    }
    /// The map file (for [`CommitBatch::write`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_present(&self, r: u64) -> bool {
        r < self.regions && self.words.word((r / 64) as usize) & (1 << (r % 64)) != 0
    }

    /// Whether every region in `first..=last` is present.
    pub fn all_present(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|r| self.is_present(r))
    }

    /// How many regions of `first..end` are present. Word at a time
    /// (popcount), and a bitmap page never allocated counts as absent
    /// without being read: counting a 1 TiB volume's 16 Mi regions reads
    /// at most its 256 Ki words, and none of a fresh map's.
    pub fn count_present(&self, first: u64, end: u64) -> u64 {
        let end = end.min(self.regions);
        let mut n = 0u64;
        let mut r = first;
        while r < end {
            let page = (r / BITS_PER_PAGE) as usize;
            if self.words.pages[page].is_none() {
                r = ((page as u64 + 1) * BITS_PER_PAGE).min(end);
                continue;
            }
            let bit = r % 64;
            let take = (64 - bit).min(end - r);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            n += (self.words.word((r / 64) as usize) & mask).count_ones() as u64;
            r += take;
        }
        n
    }

    /// Marks a region present (its data must already be written locally).
    pub fn mark_present(&mut self, r: u64) {
        assert!(r < self.regions, "region {r} out of range");
        let w = self.words.word_mut((r / 64) as usize);
        let bit = 1 << (r % 64);
        if *w & bit == 0 {
            *w |= bit;
            self.present += 1;
            self.dirty.insert(r / BITS_PER_PAGE);
        }
    }

    /// Marks every region in `first..=last` present; returns how many were
    /// absent. Word at a time: marking a 1 TiB volume's zero ranges at
    /// handoff costs well under a millisecond.
    pub fn mark_range(&mut self, first: u64, last: u64) -> u64 {
        assert!(
            first <= last && last < self.regions,
            "regions {first}..={last} out of range"
        );
        let mut newly = 0u64;
        let mut r = first;
        while r <= last {
            let bit = r % 64;
            let n = (64 - bit).min(last - r + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = self.words.word_mut((r / 64) as usize);
            let add = mask & !*w;
            if add != 0 {
                *w |= add;
                newly += add.count_ones() as u64;
                self.dirty.insert(r / BITS_PER_PAGE);
            }
            r += n;
        }
        self.present += newly;
        newly
    }

    /// The first run of absent regions in `from..end`, at most `max` long:
    /// `(start, len)`, with `len` 0 when every region there is present.
    pub fn absent_run(&self, from: u64, end: u64, max: u64) -> (u64, u64) {
        let mut r = from;
        while r < end && self.is_present(r) {
            r += 1;
        }
        let start = r;
        while r < end && !self.is_present(r) && r - start < max {
            r += 1;
        }
        (start, r - start)
    }

    /// Every run of present regions, as `(first, count)`, in order. Skips
    /// empty words (and unallocated pages) at a time, so a sparse map of a
    /// large volume is cheap to walk.
    pub fn present_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let words = self.regions.div_ceil(64) as usize;
        for i in 0..words {
            let w = self.words.word(i);
            if w == 0 {
                continue;
            }
            for b in 0..64 {
                if w & (1 << b) == 0 {
                    continue;
                }
                let r = i as u64 * 64 + b;
                if r >= self.regions {
                    break;
                }
                match runs.last_mut() {
                    Some((start, n)) if *start + *n == r => *n += 1,
                    _ => runs.push((r, 1)),
                }
            }
        }
        runs
    }

    /// First absent region at or after `from`, wrapping around; `None` when
    /// every region is present.
    pub fn next_absent(&self, from: u64) -> Option<u64> {
        if self.is_complete() {
            return None;
        }
        let scan = |lo: u64, hi: u64| -> Option<u64> {
            let mut r = lo;
            while r < hi {
                let w = self.words.word((r / 64) as usize);
                if w == u64::MAX && r.is_multiple_of(64) {
                    r += 64;
                    continue;
                }
                if w & (1 << (r % 64)) == 0 {
                    return Some(r);
                }
                r += 1;
            }
            None
        };
        let from = from.min(self.regions);
        scan(from, self.regions).or_else(|| scan(0, from))
    }

    /// Copies the pages changed since the last snapshot (commit step 1).
    pub fn snapshot(&mut self) -> CommitBatch {
        let pages = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|p| {
                let bytes = self.words.page_bytes(p as usize);
                (p, bytes)
            })
            .collect();
        CommitBatch { pages }
    }

    /// Marks `pages` dirty again: a commit that took them in its snapshot
    /// did not finish (an error, or its future was dropped), so what they
    /// say may not be on disk. A bit dirties its page only when it changes,
    /// so without this those pages would never be written again.
    pub fn redirty(&mut self, pages: impl IntoIterator<Item = u64>) {
        self.dirty.extend(pages);
    }

    /// Whether anything changed since the last snapshot.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Bytes of memory the bitmap uses.
    pub fn memory_bytes(&self) -> usize {
        self.words.allocated_pages() * PAGE as usize + self.words.pages.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(m: &mut RegionMap) -> usize {
        let b = m.snapshot();
        b.write(m.file()).unwrap();
        b.pages()
    }

    #[test]
    fn committed_bits_survive_and_uncommitted_do_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("regions.map");
        let mut m = RegionMap::create(&p, (10 << 20) + 1, 65536).unwrap();
        assert_eq!(m.regions(), 161);
        m.mark_present(0);
        m.mark_present(160);
        assert_eq!(commit(&mut m), 1);
        m.mark_present(5); // never committed: a crash loses it
        drop(m);
        let m = RegionMap::open(&p).unwrap();
        assert!(m.is_present(0) && m.is_present(160) && !m.is_present(5));
        assert_eq!(m.present_count(), 2);
    }

    #[test]
    fn commit_cost_follows_change_not_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("regions.map");
        // 1 TiB in 64 KiB regions: 16 Mi regions, a 2 MiB bitmap.
        let mut m = RegionMap::create(&p, 1 << 40, 65536).unwrap();
        // Memory follows present regions, not the volume size.
        assert!(m.memory_bytes() <= 8 << 10, "{}", m.memory_bytes());
        m.mark_present(12345);
        m.mark_present(12346);
        assert!(m.memory_bytes() <= 12 << 10, "{}", m.memory_bytes());
        assert_eq!(commit(&mut m), 1, "two nearby bits must cost one page");
        assert_eq!(commit(&mut m), 0, "nothing changed, nothing written");
        m.mark_present((1 << 24) - 1);
        assert_eq!(commit(&mut m), 1);
        drop(m);
        // Reopening reads the written pages back.
        let m = RegionMap::open(&p).unwrap();
        assert_eq!(m.present_count(), 3);
        assert!(m.is_present(12345) && m.is_present(12346) && m.is_present((1 << 24) - 1));
        assert!(!m.is_present(12347) && !m.is_present(0));
        // The bitmap's blocks are reserved at creation, so a commit never
        // needs new space (a full disk cannot stop the map).
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 >= 2 << 20);
    }

    #[test]
    fn torn_page_write_only_loses_new_bits() {
        // Simulate a crash in the middle of writing one bitmap page: the
        // first sector holds new bits, the rest old. Because bits only go
        // 0 -> 1, the result is a state between the two commits.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("regions.map");
        let mut m = RegionMap::create(&p, 64 << 20, 4096).unwrap();
        for r in 0..100 {
            m.mark_present(r);
        }
        commit(&mut m);
        for r in 100..16384 {
            m.mark_present(r);
        }
        let batch = m.snapshot();
        let (page, bytes) = &batch.pages[0];
        m.file()
            .write_all_at(&bytes[..512], PAGE * (1 + page))
            .unwrap();
        drop(m);
        let m = RegionMap::open(&p).unwrap();
        assert!((0..100).all(|r| m.is_present(r)), "committed bits lost");
        assert!((0..4096).all(|r| m.is_present(r)), "first sector's bits");
        assert!(!m.is_present(4096));
    }

    #[test]
    fn mark_range_matches_single_marks() {
        let d = tempfile::tempdir().unwrap();
        let mut a = RegionMap::create(&d.path().join("a"), 1000 * 4096, 4096).unwrap();
        let mut b = RegionMap::create(&d.path().join("b"), 1000 * 4096, 4096).unwrap();
        a.mark_present(70);
        b.mark_present(70);
        for (f, l) in [(3, 3), (10, 200), (63, 64), (500, 999), (0, 5)] {
            let before = a.present_count();
            let newly = a.mark_range(f, l);
            for r in f..=l {
                b.mark_present(r);
            }
            assert_eq!(a.present_count(), before + newly);
            assert_eq!(a.present_count(), b.present_count());
        }
        assert!((0..1000).all(|r| a.is_present(r) == b.is_present(r)));
        commit(&mut a);
        drop(a);
        let a = RegionMap::open(&d.path().join("a")).unwrap();
        assert_eq!(a.present_count(), b.present_count());
    }

    #[test]
    fn next_absent_wraps_and_ends() {
        let d = tempfile::tempdir().unwrap();
        let mut m = RegionMap::create(&d.path().join("m"), 200 * 4096, 4096).unwrap();
        for r in 0..200 {
            if r != 3 && r != 150 {
                m.mark_present(r);
            }
        }
        assert_eq!(m.next_absent(0), Some(3));
        assert_eq!(m.next_absent(4), Some(150));
        assert_eq!(m.next_absent(151), Some(3));
        m.mark_present(3);
        m.mark_present(150);
        assert!(m.is_complete());
        assert_eq!(m.next_absent(0), None);
    }

    #[test]
    fn count_present_matches_a_naive_count() {
        let d = tempfile::tempdir().unwrap();
        // Three bitmap pages and a bit: ranges cross words and pages, and
        // the middle page is never allocated.
        let regions = 3 * BITS_PER_PAGE + 70;
        let mut m = RegionMap::create(&d.path().join("m"), regions * 4096, 4096).unwrap();
        let mut x = 12345u64;
        for _ in 0..3000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (x >> 33) % regions;
            if r / BITS_PER_PAGE != 1 {
                m.mark_present(r);
            }
        }
        m.mark_range(2 * BITS_PER_PAGE + 10, 2 * BITS_PER_PAGE + 500);
        let naive = |a: u64, b: u64| (a..b).filter(|r| m.is_present(*r)).count() as u64;
        for (a, b) in [
            (0, regions),
            (0, 0),
            (5, 6),
            (63, 65),
            (64, 128),
            (100, BITS_PER_PAGE + 7),
            (BITS_PER_PAGE, 2 * BITS_PER_PAGE),
            (2 * BITS_PER_PAGE + 3, regions),
            (regions - 1, regions + 100),
        ] {
            assert_eq!(m.count_present(a, b), naive(a, b.min(regions)), "{a}..{b}");
        }
        assert_eq!(m.count_present(0, regions), m.present_count());
    }

    #[test]
    fn bad_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert!(RegionMap::open(&p).is_err());
        assert!(RegionMap::create(&d.path().join("x"), 1 << 20, 1000).is_err());
    }
}
