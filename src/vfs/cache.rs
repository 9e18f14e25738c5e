//! A bounded cache of decrypted, verified segments, shared by every reader of a mount.
//!
//! Capacity is in bytes; the least recently used segments are evicted first. A segment being loaded is
//! marked so that concurrent readers of the same segment wait for that one load instead of decoding it again
//! (sequential readers and read-ahead meet there). Keys include the file id, which is new for every commit, so
//! a replaced file can never be served from an older version's entries.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::Result;

/// A segment's plaintext, shared with readers.
pub type Bytes = Arc<Vec<u8>>;

enum Slot {
    Ready { data: Bytes, tick: u64 },
    Loading,
}

struct Inner<K> {
    map: HashMap<K, Slot>,
    /// Recency order of ready entries: tick → key.
    order: BTreeMap<u64, K>,
    tick: u64,
    used_bytes: usize,
}

/// The cache. `K` identifies a segment (file id and index).
pub struct SegmentCache<K> {
    inner: Mutex<Inner<K>>,
    loaded: Condvar,
    capacity_bytes: usize,
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
            if matches!(inner.map.get(&key), Some(Slot::Loading)) {
                inner.map.remove(&key);
            }
            drop(inner);
            self.cache.loaded.notify_all();
        }
    }
}

impl<K: Hash + Eq + Clone> SegmentCache<K> {
    /// A cache holding at most `capacity_bytes` of segment data.
    pub fn new(capacity_bytes: usize) -> Self {
        SegmentCache {
            inner: Mutex::new(Inner { map: HashMap::new(), order: BTreeMap::new(), tick: 0, used_bytes: 0 }),
            loaded: Condvar::new(),
            capacity_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> usize {
        self.lock().used_bytes
    }

    /// True when `key` is cached or being loaded.
    pub fn contains(&self, key: &K) -> bool {
        self.lock().map.contains_key(key)
    }

    /// The segment `key`, loading it with `load` when absent. Concurrent callers for the same key share one
    /// load; a failed load is not cached (the next caller tries again).
    pub fn get_or_load(&self, key: &K, load: impl FnOnce() -> Result<Vec<u8>>) -> Result<Bytes> {
        let mut inner = self.lock();
        loop {
            match inner.map.get_mut(key) {
                Some(Slot::Ready { data, tick }) => {
                    let data = data.clone();
                    let old = *tick;
                    inner.tick += 1;
                    let now = inner.tick;
                    if let Some(Slot::Ready { tick, .. }) = inner.map.get_mut(key) {
                        *tick = now;
                    }
                    inner.order.remove(&old);
                    inner.order.insert(now, key.clone());
                    return Ok(data);
                }
                Some(Slot::Loading) => {
                    inner = self.loaded.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
                None => break,
            }
        }
        inner.map.insert(key.clone(), Slot::Loading);
        drop(inner);
        let mut guard = LoadGuard { cache: self, key: Some(key.clone()) };
        let data: Bytes = Arc::new(load()?);
        let mut inner = self.lock();
        inner.map.remove(key);
        if data.len() <= self.capacity_bytes {
            while inner.used_bytes + data.len() > self.capacity_bytes {
                let Some((_, victim)) = inner.order.pop_first() else {
                    break;
                };
                if let Some(Slot::Ready { data, .. }) = inner.map.remove(&victim) {
                    inner.used_bytes -= data.len();
                }
            }
            inner.tick += 1;
            let tick = inner.tick;
            inner.order.insert(tick, key.clone());
            inner.used_bytes += data.len();
            inner.map.insert(key.clone(), Slot::Ready { data: data.clone(), tick });
        }
        drop(inner);
        guard.key = None;
        self.loaded.notify_all();
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let c = SegmentCache::new(30);
        let loads = AtomicUsize::new(0);
        let get = |k: u32| {
            c.get_or_load(&k, || {
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
        assert_eq!(c.get_or_load(&1u8, || Ok(vec![0; 6])).unwrap().len(), 6);
        assert!(!c.contains(&1));
        assert!(c.get_or_load(&2u8, || Err(crate::Error::Config("bad".into()))).is_err());
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
                        .get_or_load(&7u32, || {
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
            let _ = c.get_or_load(&1u8, || panic!("boom"));
        }));
        assert!(r.is_err());
        assert_eq!(*c.get_or_load(&1u8, || Ok(vec![1])).unwrap(), vec![1]);
    }
}
