//! A bounded cache of decrypted, verified segments, shared by every reader of a mount.
//!
//! Capacity is in bytes and covers loads in progress too (each reserves its expected size first), so decoded
//! segments never take more than the capacity. The least recently used segments are evicted first, but a
//! segment read within the last [`HOT`] is not evicted for a new load: the load waits (up to [`MAX_WAIT`],
//! then evicts anyway) until one goes cold. So many sequential readers sharing a small cache take turns instead
//! of evicting each other's segments before they are read through (which made every read decode a whole
//! segment again); read-ahead that finds no cold room is skipped. A segment being loaded is marked so that
//! concurrent readers of the same segment wait for that one load instead of decoding it again (sequential
//! readers and read-ahead meet there). Keys include the file id, which is new for every commit, so a replaced
//! file can never be served from an older version's entries.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::Result;

/// A segment read this recently is not evicted to make room for another (unless a load waited [`MAX_WAIT`]);
/// a segment read to its end cools down at once (see [`SegmentCache::read_through`]).
pub const HOT: Duration = Duration::from_millis(500);

/// Longest a load waits for a hot segment to cool down before evicting the least recently used anyway.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// A segment's plaintext, shared with readers.
pub type Bytes = Arc<Vec<u8>>;

enum Slot {
    Ready {
        data: Bytes,
        tick: u64,
        touched: Instant,
    },
    /// Being loaded, with the bytes it reserved.
    Loading(usize),
}

struct Inner<K> {
    map: HashMap<K, Slot>,
    /// Recency order of ready entries: tick → key.
    order: BTreeMap<u64, K>,
    tick: u64,
    /// Bytes of ready segments plus those reserved by loads in progress.
    used_bytes: usize,
    /// The buffer of the last evicted segment when no reader held it: the next load fills it instead of a new
    /// allocation (a fresh 32 MiB buffer costs a page fault and zeroing per 4 KiB, about a sixth of a cold
    /// read's time here). Not counted in `used_bytes`: it stands in for the buffer that load would allocate.
    spare: Option<Vec<u8>>,
}

impl<K: Hash + Eq + Clone> Inner<K> {
    /// Evicts until `need` more bytes fit in `capacity`: the least recently used cold segments, or any when
    /// `force`. Returns whether they fit. `for_load`: room for a load about to start, which can take an
    /// evicted buffer as [`Inner::spare`] (other evictions free theirs: nothing would take it).
    fn make_room(&mut self, need: usize, capacity: usize, hot: Duration, force: bool, for_load: bool) -> bool {
        while self.used_bytes + need > capacity {
            let victim = self.order.iter().find_map(|(_, k)| match self.map.get(k) {
                Some(Slot::Ready { touched, .. }) if force || touched.elapsed() >= hot => Some(k.clone()),
                _ => None,
            });
            let Some(victim) = victim else { return false };
            if let Some(Slot::Ready { data, tick, .. }) = self.map.remove(&victim) {
                self.order.remove(&tick);
                self.used_bytes -= data.len();
                if let (true, Ok(buf)) = (for_load, Arc::try_unwrap(data)) {
                    self.spare = Some(buf);
                }
            }
        }
        true
    }
}

/// What the cache did, for metrics: reads answered from it, reads that loaded, loads by read-ahead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads ([`SegmentCache::get_or_load`]) that found the segment cached or being loaded by another reader.
    pub hits: u64,
    /// Reads that loaded the segment themselves.
    pub misses: u64,
    /// Segments loaded by read-ahead ([`SegmentCache::prefetch`]).
    pub read_ahead_loads: u64,
    /// Bytes held now.
    pub used_bytes: u64,
    /// The capacity.
    pub capacity_bytes: u64,
}

/// The cache. `K` identifies a segment (file id and index).
pub struct SegmentCache<K> {
    inner: Mutex<Inner<K>>,
    loaded: Condvar,
    capacity_bytes: usize,
    hot: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    read_ahead_loads: AtomicU64,
}

impl<K> std::fmt::Debug for SegmentCache<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentCache").field("capacity_bytes", &self.capacity_bytes).finish()
    }
}

/// Clears a `Loading` mark however the load ends (error or panic), so waiters never hang.
struct LoadGuard<'a, K: Hash + Eq + Clone> {
    cache: &'a SegmentCache<K>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Drop for LoadGuard<'_, K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut inner = self.cache.lock();
            if let Some(Slot::Loading(reserved)) = inner.map.get(&key) {
                inner.used_bytes -= *reserved;
                inner.map.remove(&key);
            }
            drop(inner);
            self.cache.loaded.notify_all();
        }
    }
}

/// Capacity lent by [`SegmentCache::lend`], given back on drop.
pub struct Lent<'a, K: Hash + Eq + Clone> {
    cache: &'a SegmentCache<K>,
    bytes: usize,
}

impl<K: Hash + Eq + Clone> Drop for Lent<'_, K> {
    fn drop(&mut self) {
        self.cache.lock().used_bytes -= self.bytes;
        self.cache.loaded.notify_all();
    }
}

impl<K: Hash + Eq + Clone> SegmentCache<K> {
    /// A cache holding at most `capacity_bytes` of segment data.
    pub fn new(capacity_bytes: usize) -> Self {
        Self::with_hot(capacity_bytes, HOT)
    }

    /// A cache that keeps segments read within `hot` (instead of [`HOT`]).
    pub fn with_hot(capacity_bytes: usize, hot: Duration) -> Self {
        SegmentCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                used_bytes: 0,
                spare: None,
            }),
            loaded: Condvar::new(),
            capacity_bytes,
            hot,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            read_ahead_loads: AtomicU64::new(0),
        }
    }

    /// The counters since the cache was made, and its fill.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            read_ahead_loads: self.read_ahead_loads.load(Ordering::Relaxed),
            used_bytes: self.used_bytes() as u64,
            capacity_bytes: self.capacity_bytes as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> usize {
        self.lock().used_bytes
    }

    /// A reader read segment `key` to its end: it may be evicted soon (a little later than at once, as the
    /// kernel's read-ahead reorders reads a little), so sequential readers sharing a small cache hand their
    /// room on quickly.
    pub fn read_through(&self, key: &K) {
        let soon = Instant::now().checked_sub(self.hot.saturating_sub(Duration::from_millis(20)));
        if let (Some(Slot::Ready { touched, .. }), Some(soon)) = (self.lock().map.get_mut(key), soon) {
            *touched = soon;
        }
    }

    /// The most [`SegmentCache::lend`] lends: three quarters of the capacity, so that reads go on meanwhile.
    pub fn lendable(&self) -> usize {
        self.capacity_bytes / 4 * 3
    }

    /// Lends `bytes` of the capacity (at most [`SegmentCache::lendable`]) to other work, such as a commit of a large
    /// file, evicting what it must: until the guard is dropped, segments and loads fit in the rest, so the two
    /// together stay within the capacity.
    pub fn lend(&self, bytes: usize) -> Lent<'_, K> {
        let bytes = bytes.min(self.lendable());
        let mut inner = self.lock();
        // The spare buffer is outside the count: the borrower would otherwise use its memory twice over.
        inner.spare = None;
        inner.make_room(bytes, self.capacity_bytes, self.hot, true, false);
        inner.used_bytes += bytes;
        Lent { cache: self, bytes }
    }

    /// The buffer of a segment evicted for room (empty, without capacity, when there is none): for a load to
    /// fill instead of allocating.
    pub fn take_spare(&self) -> Vec<u8> {
        self.lock().spare.take().unwrap_or_default()
    }

    /// Frees the spare buffer (when reading pauses).
    pub fn trim(&self) {
        self.lock().spare = None;
    }

    /// True when `key` is cached or being loaded.
    pub fn contains(&self, key: &K) -> bool {
        self.lock().map.contains_key(key)
    }

    /// The segment `key`, loading it with `load` when absent (`len`: its expected size, reserved during the
    /// load). Concurrent callers for the same key share one load; a failed load is not cached (the next caller
    /// tries again).
    pub fn get_or_load(&self, key: &K, len: usize, load: impl FnOnce() -> Result<Vec<u8>>) -> Result<Bytes> {
        self.fetch(key, len, true, load).unwrap_or_else(|| Err(crate::Error::internal("cache load refused")))
    }

    /// Like [`SegmentCache::get_or_load`] for read-ahead: `None`, loading nothing, when the segment is being
    /// loaded already or room could only be made by evicting a hot segment.
    pub fn prefetch(&self, key: &K, len: usize, load: impl FnOnce() -> Result<Vec<u8>>) -> Option<Result<Bytes>> {
        self.fetch(key, len, false, load)
    }

    fn fetch(&self, key: &K, len: usize, wait: bool, load: impl FnOnce() -> Result<Vec<u8>>) -> Option<Result<Bytes>> {
        let mut inner = self.lock();
        let started = Instant::now();
        let reserve = if len <= self.capacity_bytes { len } else { 0 };
        let mut counted = false;
        loop {
            let found = inner.map.contains_key(key);
            if wait && found && !counted {
                self.hits.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            match inner.map.get_mut(key) {
                Some(Slot::Ready { data, tick, touched }) => {
                    let data = data.clone();
                    let old = *tick;
                    *touched = Instant::now();
                    inner.tick += 1;
                    let now = inner.tick;
                    if let Some(Slot::Ready { tick, .. }) = inner.map.get_mut(key) {
                        *tick = now;
                    }
                    inner.order.remove(&old);
                    inner.order.insert(now, key.clone());
                    return Some(Ok(data));
                }
                Some(Slot::Loading(_)) if !wait => return None,
                Some(Slot::Loading(_)) => {
                    inner = self.loaded.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
                None => {
                    let waited = started.elapsed();
                    if inner.make_room(reserve, self.capacity_bytes, self.hot, waited >= MAX_WAIT, true) {
                        break;
                    }
                    if !wait {
                        return None;
                    }
                    let pause = (self.hot / 2).clamp(Duration::from_millis(1), MAX_WAIT);
                    let (g, _) = self.loaded.wait_timeout(inner, pause).unwrap_or_else(|e| e.into_inner());
                    inner = g;
                }
            }
        }
        inner.map.insert(key.clone(), Slot::Loading(reserve));
        inner.used_bytes += reserve;
        drop(inner);
        // A read that waited for another reader's load which then failed loads itself: counted once, as a hit.
        match (wait, counted) {
            (true, false) => self.misses.fetch_add(1, Ordering::Relaxed),
            (false, _) => self.read_ahead_loads.fetch_add(1, Ordering::Relaxed),
            (true, true) => 0,
        };
        let mut guard = LoadGuard { cache: self, key: Some(key.clone()) };
        let data: Bytes = match load() {
            Ok(d) => Arc::new(d),
            Err(e) => return Some(Err(e)),
        };
        let mut inner = self.lock();
        inner.map.remove(key);
        inner.used_bytes -= reserve;
        if data.len() <= self.capacity_bytes && inner.make_room(data.len(), self.capacity_bytes, self.hot, true, false)
        {
            inner.tick += 1;
            let tick = inner.tick;
            inner.order.insert(tick, key.clone());
            inner.used_bytes += data.len();
            inner.map.insert(key.clone(), Slot::Ready { data: data.clone(), tick, touched: Instant::now() });
        }
        drop(inner);
        guard.key = None;
        self.loaded.notify_all();
        Some(Ok(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn stats_count_hits_misses_and_read_ahead() {
        let c = SegmentCache::new(100);
        c.get_or_load(&1u32, 10, || Ok(vec![1; 10])).unwrap();
        c.get_or_load(&1u32, 10, || unreachable!("cached")).unwrap();
        c.get_or_load(&1u32, 10, || unreachable!("cached")).unwrap();
        assert!(c.prefetch(&2, 10, || Ok(vec![2; 10])).is_some());
        c.get_or_load(&2u32, 10, || unreachable!("read ahead")).unwrap();
        assert!(c.get_or_load(&3u32, 10, || Err(crate::Error::internal("unreadable"))).is_err());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.read_ahead_loads), (3, 2, 1));
        assert_eq!((s.used_bytes, s.capacity_bytes), (20, 100));
    }

    #[test]
    fn hot_segments_are_kept_from_read_ahead_and_loads_wait_for_them() {
        let c = SegmentCache::with_hot(20, Duration::from_secs(3600));
        c.get_or_load(&1u32, 10, || Ok(vec![1; 10])).unwrap();
        c.get_or_load(&2u32, 10, || Ok(vec![2; 10])).unwrap();
        // Read-ahead finds no cold room: skipped, nothing loaded or evicted.
        assert!(c.prefetch(&3, 10, || Ok(vec![3; 10])).is_none());
        assert!(c.contains(&1) && c.contains(&2) && !c.contains(&3));
        // A read waits for a segment to cool; past MAX_WAIT it evicts the least recently used anyway.
        c.get_or_load(&2, 10, || unreachable!("cached")).unwrap();
        let t = Instant::now();
        assert_eq!(*c.get_or_load(&3, 10, || Ok(vec![3; 10])).unwrap(), vec![3; 10]);
        assert!(t.elapsed() >= MAX_WAIT);
        assert!(!c.contains(&1) && c.contains(&2) && c.contains(&3));
        assert_eq!(c.used_bytes(), 20);
        // Lending capacity evicts, and loads fit in the rest until it is given back.
        {
            let _lent = c.lend(10);
            assert_eq!(c.used_bytes(), 20);
            assert!(!c.contains(&2) || !c.contains(&3), "room was made for the loan");
        }
        assert_eq!(c.used_bytes(), 10);
        // With a cold segment, read-ahead makes room from it.
        let cold = SegmentCache::with_hot(20, Duration::ZERO);
        cold.get_or_load(&1u32, 10, || Ok(vec![1; 10])).unwrap();
        cold.get_or_load(&2u32, 10, || Ok(vec![2; 10])).unwrap();
        assert!(cold.prefetch(&3, 10, || Ok(vec![3; 10])).is_some_and(|r| r.is_ok()));
        assert!(!cold.contains(&1) && cold.contains(&3));
    }

    #[test]
    fn an_evicted_buffer_no_reader_holds_is_handed_to_the_next_load() {
        let c = SegmentCache::with_hot(20, Duration::ZERO);
        let held = c.get_or_load(&1u32, 10, || Ok(vec![1; 10])).unwrap();
        let ptr2 = c.get_or_load(&2u32, 10, || Ok(vec![2; 10])).unwrap().as_ptr();
        // 1 is evicted while a reader holds it: no spare (its buffer lives on with the reader).
        c.get_or_load(&3u32, 10, || {
            assert_eq!(c.take_spare().capacity(), 0);
            Ok(vec![3; 10])
        })
        .unwrap();
        assert_eq!(*held, vec![1; 10]);
        // 2 is evicted with no reader: the load that made room gets its buffer, allocation and all.
        c.get_or_load(&4u32, 10, || {
            let mut b = c.take_spare();
            assert_eq!((b.as_ptr(), b.capacity() >= 10), (ptr2, true), "the evicted buffer of 2");
            b.clear();
            b.extend_from_slice(&[4; 10]);
            Ok(b)
        })
        .unwrap();
        assert!(!c.contains(&2) && c.contains(&3));
        assert_eq!(*c.get_or_load(&4u32, 10, || unreachable!("cached")).unwrap(), vec![4; 10]);
        // A spare nobody took is freed by trim.
        c.get_or_load(&5u32, 10, || Ok(vec![5; 10])).unwrap();
        c.trim();
        assert_eq!(c.take_spare().capacity(), 0, "trim frees the spare");
        // A loan frees the spare even when it evicts nothing: the borrower counts on that memory.
        c.get_or_load(&6u32, 10, || Ok(vec![6; 10])).unwrap();
        drop(c.lend(0));
        assert_eq!(c.take_spare().capacity(), 0, "a loan frees the spare");
        // Room made for a loan keeps no spare (nothing would take it).
        drop(c.lend(20));
        assert_eq!(c.take_spare().capacity(), 0, "a loan's evictions are freed");
    }

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let c = SegmentCache::with_hot(30, Duration::ZERO);
        let loads = AtomicUsize::new(0);
        let get = |k: u32| {
            c.get_or_load(&k, 10, || {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(vec![k as u8; 10])
            })
            .unwrap()
        };
        get(1);
        get(2);
        get(3);
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        get(1); // 1 is now the most recent; 2 is the oldest
        get(4); // evicts 2
        assert_eq!(c.used_bytes(), 30);
        assert!(c.contains(&1) && c.contains(&3) && c.contains(&4) && !c.contains(&2));
        assert_eq!(loads.load(Ordering::SeqCst), 4);
        assert_eq!(*get(2), vec![2u8; 10]);
        assert_eq!(loads.load(Ordering::SeqCst), 5);
        assert!(!c.contains(&3), "3 was the least recently used");
    }

    #[test]
    fn oversized_and_failed_loads_are_not_kept() {
        let c = SegmentCache::new(5);
        assert_eq!(c.get_or_load(&1u8, 6, || Ok(vec![0; 6])).unwrap().len(), 6);
        assert!(!c.contains(&1));
        assert!(c.get_or_load(&2u8, 1, || Err(crate::Error::Config("bad".into()))).is_err());
        assert!(!c.contains(&2));
        assert_eq!(c.used_bytes(), 0);
    }

    #[test]
    fn concurrent_readers_share_one_load() {
        let c = SegmentCache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let d = c
                        .get_or_load(&7u32, 100, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![7; 100])
                        })
                        .unwrap();
                    assert_eq!(d.len(), 100);
                });
            }
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_load_does_not_block_others() {
        let c = SegmentCache::new(100);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = c.get_or_load(&1u8, 1, || panic!("boom"));
        }));
        assert!(r.is_err());
        assert_eq!(*c.get_or_load(&1u8, 1, || Ok(vec![1])).unwrap(), vec![1]);
        assert_eq!(c.used_bytes(), 1, "the reservation of the failed load was given back");
    }
}
