//! The block map in memory: logical block → (log stripe, slot), in pages that are loaded on demand and kept in a
//! bounded cache. Dirty pages stay until a checkpoint has written them; clean ones are evicted least recently
//! used first. Pure bookkeeping: loading and writing pages is the caller's I/O.

use std::collections::HashMap;

use crate::format::log::MapEntry;

/// One cached page.
struct Page {
    entries: Vec<MapEntry>,
    /// 0 when the page equals its object in the current checkpoint; else the change counter of its last change.
    version: u64,
    last_use: u64,
}

/// The cached pages of one volume's block map.
pub(super) struct BlockMap {
    per_page: u32,
    limit: usize,
    pages: HashMap<u32, Page>,
    tick: u64,
    changes: u64,
}

impl BlockMap {
    /// An empty cache of at most about `limit` clean pages of `per_page` entries.
    pub(super) fn new(per_page: u32, limit: usize) -> Self {
        BlockMap { per_page, limit: limit.max(1), pages: HashMap::new(), tick: 0, changes: 0 }
    }

    /// Page and index of a block.
    pub(super) fn locate(&self, lba: u64) -> (u32, usize) {
        ((lba / self.per_page as u64) as u32, (lba % self.per_page as u64) as usize)
    }

    /// Blocks per page.
    pub(super) fn per_page(&self) -> u32 {
        self.per_page
    }

    /// True when the page of `lba` is cached.
    pub(super) fn has_page(&self, page: u32) -> bool {
        self.pages.contains_key(&page)
    }

    /// Adds a page read from its object (or an all-hole page).
    pub(super) fn insert_page(&mut self, page: u32, entries: Vec<MapEntry>) {
        self.tick += 1;
        self.pages.insert(page, Page { entries, version: 0, last_use: self.tick });
    }

    /// The entry of `lba`; `None` when its page is not cached.
    pub(super) fn get(&mut self, lba: u64) -> Option<MapEntry> {
        let (page, i) = self.locate(lba);
        self.tick += 1;
        let p = self.pages.get_mut(&page)?;
        p.last_use = self.tick;
        p.entries.get(i).copied()
    }

    /// Sets the entry of `lba` and returns the old one; `None` (and no change) when its page is not cached.
    pub(super) fn set(&mut self, lba: u64, entry: MapEntry) -> Option<MapEntry> {
        let (page, i) = self.locate(lba);
        self.tick += 1;
        self.changes += 1;
        let p = self.pages.get_mut(&page)?;
        p.last_use = self.tick;
        p.version = self.changes;
        let slot = p.entries.get_mut(i)?;
        Some(std::mem::replace(slot, entry))
    }

    /// Every dirty page with its version, for a checkpoint.
    pub(super) fn dirty(&self) -> Vec<(u32, u64, Vec<MapEntry>)> {
        let mut v: Vec<_> = self
            .pages
            .iter()
            .filter(|(_, p)| p.version != 0)
            .map(|(n, p)| (*n, p.version, p.entries.clone()))
            .collect();
        v.sort_by_key(|(n, _, _)| *n);
        v
    }

    /// Number of dirty pages.
    pub(super) fn dirty_count(&self) -> usize {
        self.pages.values().filter(|p| p.version != 0).count()
    }

    /// Marks a page clean when it has not changed since `version` (a checkpoint wrote that version).
    pub(super) fn written(&mut self, page: u32, version: u64) {
        if let Some(p) = self.pages.get_mut(&page) {
            if p.version == version {
                p.version = 0;
            }
        }
    }

    /// Drops clean pages, least recently used first, until at most `limit` pages are cached (dirty pages stay).
    pub(super) fn evict(&mut self) {
        if self.pages.len() <= self.limit {
            return;
        }
        let mut clean: Vec<(u64, u32)> =
            self.pages.iter().filter(|(_, p)| p.version == 0).map(|(n, p)| (p.last_use, *n)).collect();
        clean.sort_unstable();
        let excess = self.pages.len() - self.limit;
        for (_, n) in clean.into_iter().take(excess) {
            self.pages.remove(&n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64) -> MapEntry {
        MapEntry { seq, slot: 1 }
    }

    #[test]
    fn pages_track_changes_and_evict_only_clean_ones() {
        let mut m = BlockMap::new(4, 2);
        assert_eq!(m.get(5), None);
        assert_eq!(m.set(5, e(1)), None, "no change to an uncached page");
        m.insert_page(1, vec![MapEntry::HOLE; 4]);
        assert_eq!(m.set(5, e(1)), Some(MapEntry::HOLE));
        assert_eq!(m.get(5), Some(e(1)));
        let dirty = m.dirty();
        assert_eq!(dirty.len(), 1);
        let (page, version, entries) = &dirty[0];
        assert_eq!((*page, entries[1]), (1, e(1)));
        m.set(6, e(2));
        m.written(1, *version);
        assert_eq!(m.dirty_count(), 1, "changed again after the snapshot: still dirty");
        m.written(1, m.dirty()[0].1);
        assert_eq!(m.dirty_count(), 0);
        m.insert_page(2, vec![MapEntry::HOLE; 4]);
        m.insert_page(3, vec![MapEntry::HOLE; 4]);
        m.set(12, e(3));
        m.get(8);
        m.evict();
        assert!(m.has_page(3) && m.has_page(2) && !m.has_page(1), "the least recently used clean page goes");
        m.insert_page(0, vec![MapEntry::HOLE; 4]);
        m.set(0, e(4));
        m.evict();
        assert!(m.has_page(0) && m.has_page(3), "dirty pages are never evicted");
    }
}
