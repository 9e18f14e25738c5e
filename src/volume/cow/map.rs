//! The volume's stripe map: map pages (stripe -> generation and Merkle leaves), loaded on demand into a bounded
//! cache and written out as uncommitted objects when dirty pages must leave it.

use crate::error::{Error, Result};
use crate::format::volume::*;
use crate::location::LocationExt;

use super::*;

impl CowVolume {
    pub(super) fn page_of(st: &State, stripe: u64) -> (u32, usize) {
        let per = st.sb.entries_per_page as u64;
        ((stripe / per) as u32, (stripe % per) as usize)
    }

    pub(super) fn load_page(&self, st: &mut State, page: u32) -> Result<()> {
        if st.pages.contains_key(&page) {
            return Ok(());
        }
        let r = *st.sb.pages.get(page as usize).ok_or_else(|| Error::internal("page out of range"))?;
        let p = if r.gen == 0 {
            MapPage::empty(self.id, page, st.sb.entries_per_page)
        } else {
            let key = page_key(&self.id, page, r.gen);
            let mut last = None;
            let mut found = None;
            for loc in self.store.locations() {
                let what = format!("map page {key} on {}", loc.name());
                match loc.get(&key).and_then(|b| MapPage::decode(&b, &r, &st.sb, page, &what)) {
                    Ok(p) => {
                        found = Some(p);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            found.ok_or_else(|| {
                last.unwrap_or_else(|| Error::corrupt(format!("map page {page}"), "no copy on any location"))
            })?
        };
        st.tick += 1;
        let tick = st.tick;
        st.pages.insert(page, CachedPage { page: p, dirty: false, last_use: tick });
        self.evict_pages(st)
    }

    pub(super) fn entry(&self, st: &mut State, stripe: u64) -> Result<StripeEntry> {
        let (page, idx) = Self::page_of(st, stripe);
        self.load_page(st, page)?;
        let p = st.pages.get(&page).ok_or_else(|| Error::internal("page vanished"))?;
        Ok(p.page.entries[idx].clone())
    }

    pub(super) fn set_entry(&self, st: &mut State, stripe: u64, e: StripeEntry) -> Result<()> {
        let (page, idx) = Self::page_of(st, stripe);
        self.load_page(st, page)?;
        let tick = st.tick;
        let p = st.pages.get_mut(&page).ok_or_else(|| Error::internal("page vanished"))?;
        let old = std::mem::replace(&mut p.page.entries[idx], e);
        p.dirty = true;
        p.last_use = tick;
        if old.gen != 0 {
            let width = st.sb.k as usize + st.sb.m as usize;
            for i in 0..width {
                st.superseded.push(stripe_shard_key(&self.id, stripe, old.gen, i));
            }
        }
        Ok(())
    }

    /// Writes a dirty map page as a new object (uncommitted until the next superblock).
    pub(super) fn write_page(&self, st: &mut State, page: u32) -> Result<()> {
        let gen = st.sb.next_gen;
        st.sb.next_gen += 1;
        let bytes = {
            let p = st.pages.get_mut(&page).ok_or_else(|| Error::internal("page vanished"))?;
            p.page.gen = gen;
            p.page.encode()
        };
        let key = page_key(&self.id, page, gen);
        self.store.put_replicated(&key, &bytes, "a volume map page")?;
        let old =
            std::mem::replace(&mut st.sb.pages[page as usize], PageRef { gen, hash: *blake3::hash(&bytes).as_bytes() });
        if old.gen != 0 {
            st.superseded.push(page_key(&self.id, page, old.gen));
        }
        if let Some(p) = st.pages.get_mut(&page) {
            p.dirty = false;
        }
        st.sb_dirty = true;
        Ok(())
    }

    pub(super) fn evict_pages(&self, st: &mut State) -> Result<()> {
        while st.pages.len() > PAGE_CACHE_LIMIT {
            let Some((&victim, _)) = st.pages.iter().min_by_key(|(_, p)| p.last_use) else { break };
            if st.pages.get(&victim).is_some_and(|p| p.dirty) {
                self.write_page(st, victim)?;
            }
            st.pages.remove(&victim);
        }
        Ok(())
    }
}
