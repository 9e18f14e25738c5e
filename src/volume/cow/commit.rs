//! Making a volume durable: a flush writes back dirty stripes and map pages, then commits a new superblock on
//! every location, then collects what the old superblock referenced and the new one does not.

use crate::error::{Error, Result};
use crate::format::volume::*;

use super::*;

impl CowVolume {
    pub(super) fn check_poisoned(st: &State) -> Result<()> {
        match &st.poisoned {
            Some(p) => Err(Error::ReadOnly(format!("the volume (after a failed write-back: {p})"))),
            None => Ok(()),
        }
    }

    pub(super) fn commit(&self, st: &mut State) -> Result<()> {
        let dirty: Vec<u64> = st.stripes.iter().filter(|(_, c)| c.dirty).map(|(s, _)| *s).collect();
        for stripe in dirty {
            self.write_back(st, stripe)?;
        }
        let dirty_pages: Vec<u32> = st.pages.iter().filter(|(_, p)| p.dirty).map(|(i, _)| *i).collect();
        if dirty_pages.is_empty() && st.superseded.is_empty() && !st.sb_dirty {
            return Ok(());
        }
        for p in dirty_pages {
            self.write_page(st, p)?;
        }
        for loc in self.store.locations() {
            loc.sync()?;
        }
        st.sb.generation += 1;
        publish_superblock(&self.store, &st.sb)?;
        st.sb_dirty = false;
        // Superseded shards become recyclable (bounded); map pages and the excess are deleted.
        let n = self.store.locations().len();
        st.recycle.resize(n, Vec::new());
        for key in std::mem::take(&mut st.superseded) {
            let home = parse_shard_name(key.rsplit('/').next().unwrap_or(""))
                .map(|(stripe, _, i)| self.store.cow_home(&self.id, stripe, i));
            match home {
                Some(h) if st.recycle[h].len() < RECYCLE_LIMIT && self.store.locations()[h].cheap_rename() => {
                    st.recycle[h].push(key)
                }
                _ => {
                    for loc in self.store.locations() {
                        let _ = loc.delete(&key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes objects not referenced by the committed superblock (left by a crash or an interrupted GC).
    pub(super) fn collect_garbage(&self) -> Result<()> {
        let mut st = self.lock()?;
        let prefix = volume_prefix(&self.id);
        let mut doomed: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for loc in self.store.locations() {
            for name in loc.list(&format!("{prefix}/map")).unwrap_or_default() {
                if let Some((page, gen)) = parse_page_name(&name) {
                    let live = st.sb.pages.get(page as usize).is_some_and(|r| r.gen == gen);
                    let key = format!("{prefix}/map/{name}");
                    if !live && seen.insert(key.clone()) {
                        doomed.push(key);
                    }
                }
            }
            for dir in loc.list(&format!("{prefix}/s")).unwrap_or_default() {
                for name in loc.list(&format!("{prefix}/s/{dir}")).unwrap_or_default() {
                    let Some((stripe, gen, _)) = parse_shard_name(&name) else { continue };
                    let live = stripe < st.sb.stripes() && self.entry(&mut st, stripe)?.gen == gen;
                    let key = format!("{prefix}/s/{dir}/{name}");
                    if !live && seen.insert(key.clone()) {
                        doomed.push(key);
                    }
                }
            }
        }
        if !doomed.is_empty() {
            tracing::info!(volume = %self.name, objects = doomed.len(), "deleting uncommitted or superseded objects");
        }
        for key in doomed {
            for loc in self.store.locations() {
                let _ = loc.delete(&key);
            }
        }
        Ok(())
    }
}
