//! The write-back stripe cache: stripes are loaded (verified, rebuilt from parity, decrypted) on demand, written
//! in place in memory, and written back as a new generation of shards when evicted or flushed.

use crate::codec::xts::SECTOR;
use crate::error::{Error, Result};
use crate::format::volume::*;
use crate::stripe::{read_stripe, write_stripe, HomeRule, StripeAddr, StripeError};

use super::*;

impl CowVolume {
    /// Reads `[within, within + out.len())` of a stripe from just the data shards that hold it.
    pub(super) fn read_partial(
        &self,
        stripe: u64,
        entry: &StripeEntry,
        sl: usize,
        stripe_size: usize,
        within: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let a = within / SECTOR * SECTOR;
        let b = (within + out.len()).div_ceil(SECTOR) * SECTOR;
        let b = b.min(stripe_size);
        let mut plain = vec![0u8; b - a];
        let mut io = Vec::new();
        let id = self.id;
        let gen = entry.gen;
        let key_of = move |i: usize| stripe_shard_key(&id, stripe, gen, i);
        let addr = StripeAddr {
            file_id: &self.id,
            segment: stripe,
            rule: HomeRule::CowVolume,
            shard_len: sl,
            key_of: &key_of,
            deferred: true,
        };
        for i in a / sl..=(b - 1) / sl {
            let leaf = entry.leaves.get(i).ok_or_else(|| Error::corrupt("stripe map entry", "missing leaf"))?;
            let (r, _) = match crate::stripe::fetch_shard(&self.store, &addr, i, leaf, &mut io) {
                (Ok(x), _) => x,
                (Err(p), _) => return Err(Error::corrupt(format!("shard {i} of stripe {stripe}"), p.to_string())),
            };
            let shard = &io[r];
            // Overlap of shard i ([i*sl, (i+1)*sl)) with [a, b), in stripe coordinates.
            let lo = a.max(i * sl);
            let hi = b.min((i + 1) * sl);
            plain[lo - a..hi - a].copy_from_slice(&shard[lo - i * sl..hi - i * sl]);
        }
        self.xts.decrypt(&mut plain, stripe * (stripe_size / SECTOR) as u64 + (a / SECTOR) as u64);
        out.copy_from_slice(&plain[within - a..within - a + out.len()]);
        Ok(())
    }

    pub(super) fn stripe_addr<'a>(
        &'a self,
        st: &State,
        stripe: u64,
        key_of: &'a (dyn Fn(usize) -> String + Sync),
    ) -> StripeAddr<'a> {
        StripeAddr {
            file_id: &self.id,
            segment: stripe,
            rule: HomeRule::CowVolume,
            shard_len: st.sb.shard_len(),
            key_of,
            deferred: true,
        }
    }

    /// Reads, verifies and decrypts a stripe into the cache (clean).
    pub(super) fn load_stripe(&self, st: &mut State, stripe: u64) -> Result<()> {
        let e = self.entry(st, stripe)?;
        let ss = st.sb.stripe_size as usize;
        let mut data = vec![0u8; ss];
        if e.gen != 0 {
            let id = self.id;
            let key_of = move |i: usize| stripe_shard_key(&id, stripe, e.gen, i);
            let addr = self.stripe_addr(st, stripe, &key_of);
            let State { codec, bufs, .. } = st;
            match read_stripe(&self.store, codec, &addr, &e.leaves, bufs) {
                Ok(()) => {}
                Err(StripeError::Lost { have, bad }) => {
                    return Err(Error::TooManyLost {
                        file: format!("volume {}", self.name),
                        segment: stripe,
                        have,
                        need: st.sb.k as usize,
                        bad: bad.join(", "),
                    })
                }
                Err(StripeError::Mismatch) => {
                    return Err(Error::Authentication { file: format!("volume {}", self.name), segment: stripe })
                }
                Err(StripeError::Other(e)) => return Err(e),
            }
            data.copy_from_slice(&st.bufs.data[..ss]);
            self.xts.decrypt(&mut data, stripe * (ss / SECTOR) as u64);
        }
        st.tick += 1;
        let tick = st.tick;
        st.stripes.insert(stripe, CachedStripe { data, dirty: false, last_use: tick });
        Ok(())
    }

    pub(super) fn stripe_for_write<'s>(
        &self,
        st: &'s mut State,
        stripe: u64,
        whole: bool,
    ) -> Result<&'s mut CachedStripe> {
        if !st.stripes.contains_key(&stripe) {
            if whole {
                let ss = st.sb.stripe_size as usize;
                st.stripes.insert(stripe, CachedStripe { data: vec![0u8; ss], dirty: false, last_use: 0 });
            } else {
                self.load_stripe(st, stripe)?;
            }
        }
        st.tick += 1;
        let tick = st.tick;
        let c = st.stripes.get_mut(&stripe).ok_or_else(|| Error::internal("stripe vanished"))?;
        c.dirty = true;
        c.last_use = tick;
        Ok(c)
    }

    /// Writes a dirty stripe's shards under a new generation and points the map at them (uncommitted).
    pub(super) fn write_back(&self, st: &mut State, stripe: u64) -> Result<()> {
        let ss = st.sb.stripe_size as usize;
        let k = st.sb.k as usize;
        let sl = st.sb.shard_len();
        let gen = st.sb.next_gen;
        st.sb.next_gen += 1;
        let mut enc = std::mem::take(&mut st.enc);
        enc.clear();
        enc.resize(k * sl, 0);
        {
            let c = st.stripes.get(&stripe).ok_or_else(|| Error::internal("stripe vanished"))?;
            enc[..ss].copy_from_slice(&c.data);
        }
        self.xts.encrypt(&mut enc[..ss], stripe * (ss / SECTOR) as u64);
        let id = self.id;
        let key_of = move |i: usize| stripe_shard_key(&id, stripe, gen, i);
        let addr = self.stripe_addr(st, stripe, &key_of);
        let n = self.store.locations().len();
        st.recycle.resize(n, Vec::new());
        for i in 0..k + st.sb.m as usize {
            let home = addr.home(&self.store, i);
            if let Some(old) = st.recycle[home].pop() {
                // Best effort: a recycled file that vanished (repair, manual cleanup) just means a fresh create.
                let _ = self.store.locations()[home].rename(&old, &key_of(i));
            }
        }
        let leaves = write_stripe(&self.store, &mut st.codec, &addr, &enc);
        st.enc = enc;
        let written = leaves?;
        if !written.missing.is_empty() {
            let first = st.shortfall == 0;
            st.shortfall += written.missing.len() as u64;
            // Recorded once per open (and again on the next open): scrub finds every missing shard anyway.
            if first {
                if let Err(e) = crate::pending::record(&self.store, &self.id, st.shortfall) {
                    tracing::warn!(volume = %self.name, error = %e, "could not record the pending repair");
                }
            }
        }
        let leaves = written.leaves;
        self.set_entry(st, stripe, StripeEntry { gen, leaves })?;
        if let Some(c) = st.stripes.get_mut(&stripe) {
            c.dirty = false;
        }
        Ok(())
    }

    pub(super) fn evict(&self, st: &mut State) -> Result<()> {
        while st.stripes.len() > self.cache_stripes {
            let Some((&victim, _)) = st.stripes.iter().min_by_key(|(_, c)| c.last_use) else { break };
            if st.stripes.get(&victim).is_some_and(|c| c.dirty) {
                if let Err(e) = self.write_back(st, victim) {
                    st.poisoned = Some(e.to_string());
                    return Err(e);
                }
            }
            st.stripes.remove(&victim);
        }
        self.evict_pages(st)
    }
}
