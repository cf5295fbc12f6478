//! The region map as a picture: a downsampled view of which regions are
//! present, and where clients made the clone fetch on demand or wrote,
//! for `GET /v1/migrations/{name}/regions` and the dashboard
//! ([`crate::node::dashboard`]).
//!
//! ```text
//!   regions  0 ............................................ R-1
//!   cells    [   0   |   1   |   2   | ... |  N-1  ]   cell i covers i*R/N .. (i+1)*R/N
//!   code     state (absent / partial / present) | ON_DEMAND | WRITTEN
//! ```
//!
//! **What the data path pays.** Present/absent comes from the region map,
//! which the data path keeps anyway. The two flags live in [`Activity`]: a
//! fixed array of at most [`TRACK_CELLS`] atomic bytes, sized when the clone
//! is built whatever the volume size. A client request that lands sets
//! its flag with one relaxed atomic per tracking cell it covers (almost
//! always one, none when already set): no lock, no allocation.
//!
//! **What a view costs.** Only a reader pays, when it asks: one popcount
//! per bitmap word ([`RegionMap::count_present`]; pages never allocated are
//! skipped), the map's lock taken once per cell and never across cells, so
//! the data path, which takes that lock too, waits at most one cell's
//! count. A 1 TiB volume at 64 KiB regions is 256 Ki words per view.
//!
//! The flags are in memory only: after a restart they start afresh (the
//! picture shows this run's fetches and writes); present/absent is the
//! durable map's.

use super::*;
use std::sync::atomic::AtomicU8;

/// Cell codes: the low two bits are the state, the others flags.
pub mod cell {
    /// No region of the cell is present.
    pub const ABSENT: u8 = 0;
    /// Some regions of the cell are present, not all.
    pub const PARTIAL: u8 = 1;
    /// Every region of the cell is present.
    pub const PRESENT: u8 = 2;
    /// Mask of the state bits.
    pub const STATE: u8 = 3;
    /// A client read made the clone fetch some region here on demand.
    pub const ON_DEMAND: u8 = 4;
    /// A client wrote (or trimmed, or zeroed) some region here since the
    /// handoff.
    pub const WRITTEN: u8 = 8;
}

/// Tracking cells for the flags, at most (fewer for a volume of fewer
/// regions: one region each).
pub const TRACK_CELLS: u64 = 1024;
/// Most cells a view may ask for.
pub const MAX_VIEW_CELLS: usize = 4096;

/// A downsampled picture of a clone's regions (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionView {
    pub volume: String,
    /// The migration's identity.
    pub id: String,
    pub region_size: u64,
    pub regions_total: u64,
    /// Present regions, counted cell by cell with the cells below.
    pub regions_present: u64,
    /// One code per cell ([`cell`]); cell `i` covers regions
    /// `i*R/N .. (i+1)*R/N` (R regions, N cells: N never exceeds R).
    pub cells: Vec<u8>,
    pub counts: CellCounts,
}

/// How many cells are in each state, and carry each flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CellCounts {
    pub present: u64,
    pub partial: u64,
    pub absent: u64,
    pub on_demand: u64,
    pub written: u64,
}

impl CellCounts {
    fn of(cells: &[u8]) -> Self {
        let mut c = Self::default();
        for &code in cells {
            match code & cell::STATE {
                cell::PRESENT => c.present += 1,
                cell::PARTIAL => c.partial += 1,
                _ => c.absent += 1,
            }
            c.on_demand += u64::from(code & cell::ON_DEMAND != 0);
            c.written += u64::from(code & cell::WRITTEN != 0);
        }
        c
    }
}

/// Where clients fetched on demand and wrote: one atomic byte of flags
/// per tracking cell (see the module doc).
pub(super) struct Activity {
    regions: u64,
    cells: Box<[AtomicU8]>,
}

impl Activity {
    pub(super) fn new(regions: u64) -> Self {
        let n = regions.clamp(1, TRACK_CELLS) as usize;
        Self {
            regions: regions.max(1),
            cells: (0..n).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// The tracking cell of region `r`. In `u64`: regions are at least
    /// 4 KiB, so there are fewer than 2^51, times at most 2^10 cells.
    fn cell_of(&self, r: u64) -> usize {
        let n = self.cells.len() as u64;
        ((r * n / self.regions) as usize).min(self.cells.len() - 1)
    }

    /// Sets `flag` on the cells of regions `first..=last`. Lock-free; a
    /// cell already flagged costs a load.
    pub(super) fn note(&self, first: u64, last: u64, flag: u8) {
        for c in &self.cells[self.cell_of(first)..=self.cell_of(last)] {
            if c.load(Ordering::Relaxed) & flag == 0 {
                c.fetch_or(flag, Ordering::Relaxed);
            }
        }
    }

    /// The flags of regions `first..end` (`end > first`): those of every
    /// tracking cell that overlaps them.
    fn flags(&self, first: u64, end: u64) -> u8 {
        self.cells[self.cell_of(first)..=self.cell_of(end - 1)]
            .iter()
            .fold(0, |f, c| f | c.load(Ordering::Relaxed))
    }
}

/// The cells of a view of `regions` regions in `cells` cells (clamped to
/// `1..=MAX_VIEW_CELLS` and to `regions`), with the total present:
/// `present(a, b)` counts present regions of `a..b`, `flags(a, b)` says
/// what happened there.
pub(crate) fn downsample(
    regions: u64,
    cells: usize,
    mut present: impl FnMut(u64, u64) -> u64,
    flags: impl Fn(u64, u64) -> u8,
) -> (Vec<u8>, u64) {
    let n = (cells.clamp(1, MAX_VIEW_CELLS) as u64).min(regions);
    let bound = |i: u64| (i as u128 * regions as u128 / n.max(1) as u128) as u64;
    let mut total = 0;
    let out = (0..n)
        .map(|i| {
            let (a, b) = (bound(i), bound(i + 1));
            let p = present(a, b);
            total += p;
            let state = if p == b - a {
                cell::PRESENT
            } else if p == 0 {
                cell::ABSENT
            } else {
                cell::PARTIAL
            };
            state | (flags(a, b) & (cell::ON_DEMAND | cell::WRITTEN))
        })
        .collect();
    (out, total)
}

impl CloneTarget {
    /// A picture of the regions in about `cells` cells (see the module
    /// doc for what it costs and what it never holds).
    pub fn region_view(&self, cells: usize) -> RegionView {
        let regions = self.map.lock().unwrap().regions();
        let (cells, present) = downsample(
            regions,
            cells,
            |a, b| self.map.lock().unwrap().count_present(a, b),
            |a, b| self.activity.flags(a, b),
        );
        RegionView {
            volume: self.name.clone(),
            id: self.migration.clone(),
            region_size: self.region_size,
            regions_total: regions,
            regions_present: present,
            counts: CellCounts::of(&cells),
            cells,
        }
    }

    /// Records that a client's read fetched regions `first..=last`.
    pub(super) fn note_fetched_on_demand(&self, first: u64, last: u64) {
        self.activity.note(first, last, cell::ON_DEMAND);
    }

    /// Records (for the view) that a client changed regions
    /// `first..=last`. The durable record a rollback needs is
    /// `rollback::note_written`'s.
    pub(super) fn note_written_for_view(&self, first: u64, last: u64) {
        self.activity.note(first, last, cell::WRITTEN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map as a bool per region, and flags at given regions.
    fn view(present: &[bool], flagged: &[(u64, u8)], cells: usize) -> (Vec<u8>, u64) {
        let regions = present.len() as u64;
        let act = Activity::new(regions);
        for &(r, f) in flagged {
            act.note(r, r, f);
        }
        downsample(
            regions,
            cells,
            |a, b| (a..b).filter(|r| present[*r as usize]).count() as u64,
            |a, b| act.flags(a, b),
        )
    }

    #[test]
    fn cells_are_present_partial_or_absent() {
        // 16 regions in 4 cells of 4: all, some, none, all-but-one.
        let p: Vec<bool> = (0..16)
            .map(|r| r < 4 || r == 5 || (12..15).contains(&r))
            .collect();
        let (cells, total) = view(&p, &[], 4);
        assert_eq!(
            cells,
            [cell::PRESENT, cell::PARTIAL, cell::ABSENT, cell::PARTIAL]
        );
        assert_eq!(total, 8);
        // One cell per region when asked for as many.
        let (cells, _) = view(&p, &[], 16);
        assert_eq!(cells.len(), 16);
        assert!(cells
            .iter()
            .zip(&p)
            .all(|(c, p)| (*c == cell::PRESENT) == *p));
    }

    #[test]
    fn cell_count_is_clamped_to_regions_and_the_maximum() {
        let p = vec![true; 10];
        assert_eq!(
            view(&p, &[], 1000).0.len(),
            10,
            "never more cells than regions"
        );
        assert_eq!(view(&p, &[], 0).0, [cell::PRESENT], "at least one cell");
        let many = vec![false; 10_000];
        assert_eq!(view(&many, &[], 1 << 20).0.len(), MAX_VIEW_CELLS);
        assert!(
            view(&[], &[], 10).0.is_empty(),
            "an empty volume has no cells"
        );
    }

    #[test]
    fn uneven_cells_cover_every_region_once() {
        // 10 regions in 3 cells: 3, 3, 4 (i*R/N bounds). Each region is
        // counted in exactly one cell.
        let mut calls = Vec::new();
        let (cells, total) = downsample(
            10,
            3,
            |a, b| {
                calls.push((a, b));
                b - a
            },
            |_, _| 0,
        );
        assert_eq!(calls, [(0, 3), (3, 6), (6, 10)]);
        assert_eq!(total, 10);
        assert_eq!(cells, [cell::PRESENT; 3]);
    }

    #[test]
    fn flags_land_in_the_cell_of_their_region() {
        // 64 regions tracked one per region, viewed in 8 cells of 8.
        let p = vec![false; 64];
        let (cells, _) = view(&p, &[(3, cell::ON_DEMAND), (42, cell::WRITTEN)], 8);
        for (i, c) in cells.iter().enumerate() {
            assert_eq!(c & cell::ON_DEMAND != 0, i == 0, "cell {i}: {c}");
            assert_eq!(c & cell::WRITTEN != 0, i == 5, "cell {i}: {c}");
        }
        let counts = CellCounts::of(&cells);
        assert_eq!((counts.on_demand, counts.written, counts.absent), (1, 1, 8));
    }

    #[test]
    fn a_huge_volume_tracks_in_a_fixed_array() {
        // 1 TiB at 64 KiB: 16 Mi regions in TRACK_CELLS bytes of flags.
        let regions = 1u64 << 24;
        let act = Activity::new(regions);
        assert_eq!(act.cells.len() as u64, TRACK_CELLS);
        act.note(regions - 1, regions - 1, cell::WRITTEN);
        act.note(0, 100, cell::ON_DEMAND);
        assert_eq!(act.flags(regions - 10, regions), cell::WRITTEN);
        assert_eq!(act.flags(0, 1), cell::ON_DEMAND);
        assert_eq!(act.flags(regions / 2, regions / 2 + 1), 0);
        // A view as wide as the tracking is exact: flags in their cells only.
        let (cells, _) = downsample(
            regions,
            TRACK_CELLS as usize,
            |_, _| 0,
            |a, b| act.flags(a, b),
        );
        assert_eq!(cells[0], cell::ON_DEMAND);
        assert_eq!(cells[TRACK_CELLS as usize - 1], cell::WRITTEN);
        assert!(cells[1..TRACK_CELLS as usize - 1].iter().all(|c| *c == 0));
    }

    #[test]
    fn a_huge_map_is_viewed_without_touching_absent_pages() {
        let d = tempfile::tempdir().unwrap();
        let mut m = RegionMap::create(&d.path().join("m"), 1 << 40, 65536).unwrap();
        m.mark_range(0, (1 << 20) - 1);
        m.mark_present((1 << 24) - 1);
        let t = Instant::now();
        let (cells, total) = downsample(m.regions(), 1024, |a, b| m.count_present(a, b), |_, _| 0);
        assert_eq!(total, (1 << 20) + 1);
        assert!(cells[..64].iter().all(|c| *c == cell::PRESENT));
        assert_eq!(cells[64], cell::ABSENT);
        assert_eq!(cells[1023], cell::PARTIAL);
        // Debug build, a shared machine: generous, but far from a
        // region-at-a-time scan of 16 Mi regions.
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}
