//! An in-memory [`Location`] and a store built over such locations, for tests.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::fault::FaultyLocation;
use crate::error::{Error, Result};
use crate::location::Location;

#[derive(Clone, Debug)]
struct MemObject {
    bytes: Vec<u8>,
    modified: SystemTime,
}

/// A location kept in memory: a map from key to bytes. Puts are atomic by construction.
#[derive(Debug)]
pub struct MemLocation {
    name: String,
    objects: Mutex<BTreeMap<String, MemObject>>,
}

impl MemLocation {
    /// An empty location called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        MemLocation { name: name.into(), objects: Mutex::new(BTreeMap::new()) }
    }

    fn objects(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, MemObject>>> {
        self.objects.lock().map_err(|_| Error::internal(format!("location {} poisoned", self.name)))
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Result<Vec<String>> {
        Ok(self.objects()?.keys().cloned().collect())
    }

    /// Makes every object look `by` older (to test grace periods).
    pub fn age_all(&self, by: Duration) -> Result<()> {
        for o in self.objects()?.values_mut() {
            o.modified = o.modified.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH);
        }
        Ok(())
    }
}

fn dir_prefix(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
}

impl Location for MemLocation {
    fn name(&self) -> &str {
        &self.name
    }

    /// Reported as remote, so the library tests over in-memory stores exercise the concurrent shard fetches
    /// (directory-backed tests cover the sequential ones).
    fn remote(&self) -> bool {
        true
    }

    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        crate::location::validate_key(key)?;
        let bytes = parts.concat();
        self.objects()?.insert(key.to_string(), MemObject { bytes, modified: SystemTime::now() });
        Ok(())
    }

    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        crate::location::validate_key(key)?;
        // One lock covers the check and the insert, so racing creators cannot both win.
        match self.objects()?.entry(key.to_string()) {
            Entry::Occupied(_) => Err(Error::already_exists_object(format!("{}: {key}", self.name))),
            Entry::Vacant(slot) => {
                slot.insert(MemObject { bytes: parts.concat(), modified: SystemTime::now() });
                Ok(())
            }
        }
    }

    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        let objects = self.objects()?;
        let o = objects.get(key).ok_or_else(|| Error::object_not_found(format!("{}: {key}", self.name)))?;
        buf.extend_from_slice(&o.bytes);
        Ok(())
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let objects = self.objects()?;
        let o = objects.get(key).ok_or_else(|| Error::object_not_found(format!("{}: {key}", self.name)))?;
        let start = (offset.min(o.bytes.len() as u64)) as usize;
        let end = start.saturating_add(len).min(o.bytes.len());
        Ok(o.bytes[start..end].to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = dir_prefix(prefix);
        let mut names: Vec<String> = self
            .objects()?
            .range(p.clone()..)
            .take_while(|(k, _)| k.starts_with(&p))
            .filter_map(|(k, _)| k[p.len()..].split('/').next().map(str::to_string))
            .collect();
        names.dedup();
        Ok(names)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.objects()?.remove(key);
        Ok(())
    }

    fn preallocate(&self, key: &str, len: u64) -> Result<bool> {
        crate::location::validate_key(key)?;
        let mut objects = self.objects()?;
        let o = objects.entry(key.to_string()).or_insert(MemObject { bytes: Vec::new(), modified: SystemTime::now() });
        if o.bytes.len() as u64 != len {
            o.bytes = vec![0; len as usize];
        }
        Ok(true)
    }

    fn write_at(&self, key: &str, offset: u64, parts: &[&[u8]]) -> Result<()> {
        let mut objects = self.objects()?;
        let o = objects.get_mut(key).ok_or_else(|| Error::object_not_found(format!("{}: {key}", self.name)))?;
        let bytes = parts.concat();
        let end = offset.checked_add(bytes.len() as u64).filter(|e| *e <= o.bytes.len() as u64);
        let Some(end) = end else {
            return Err(Error::InvalidArgument(format!("{}: write beyond the end of {key}", self.name)));
        };
        o.bytes[offset as usize..end as usize].copy_from_slice(&bytes);
        o.modified = SystemTime::now();
        Ok(())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let p = dir_prefix(prefix);
        self.objects()?.retain(|k, _| !k.starts_with(&p));
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn probe(&self) -> Result<()> {
        Ok(())
    }

    fn modified(&self, key: &str) -> Result<Option<SystemTime>> {
        let objects = self.objects()?;
        if let Some(o) = objects.get(key) {
            return Ok(Some(o.modified));
        }
        let p = dir_prefix(key);
        let newest = objects.range(p.clone()..).take_while(|(k, _)| k.starts_with(&p)).map(|(_, o)| o.modified).max();
        newest.map(Some).ok_or_else(|| Error::object_not_found(format!("{}: {key}", self.name)))
    }
}

/// A store over in-memory locations, for tests.
pub struct MemStore {
    /// The store (unlocked).
    pub store: crate::store::Store,
    /// Its locations as the store sees them.
    pub faulty: Vec<Arc<FaultyLocation>>,
    /// The in-memory maps under the wrappers.
    pub mem: Vec<Arc<MemLocation>>,
}

/// Creates a store in `dir` (descriptor and key file on disk) whose `n` locations are in-memory maps wrapped in
/// [`FaultyLocation`]s.
pub fn mem_store(dir: &std::path::Path, k: u16, m: u16, n: usize, segment_size: u64) -> Result<MemStore> {
    use crate::store::{InitOptions, KeySource, Store};
    let opts = InitOptions {
        k,
        m,
        segment_size,
        locations: (0..n).map(|i| dir.join(format!("unused-{i}")).display().to_string()).collect(),
        zones: vec![],
        key: KeySource::NewKeyFile(dir.join("master.key")),
    };
    let mut store = Store::init(dir, opts)?;
    let mem: Vec<Arc<MemLocation>> = (0..n).map(|i| Arc::new(MemLocation::new(format!("mem-{i:02}")))).collect();
    let faulty: Vec<Arc<FaultyLocation>> =
        mem.iter().map(|m| Arc::new(FaultyLocation::new(m.clone() as Arc<dyn Location>))).collect();
    for (i, l) in faulty.iter().enumerate() {
        crate::store::write_marker(l.as_ref(), store.descriptor(), i)?;
    }
    store.set_locations(faulty.iter().map(|l| l.clone() as Arc<dyn Location>).collect())?;
    Ok(MemStore { store, faulty, mem })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::LocationExt;

    #[test]
    fn mem_location_behaves_like_a_directory() {
        let l = MemLocation::new("mem");
        l.put("a/b/c", &[b"hello ", b"world"]).unwrap();
        l.put("a/b/d", &[b"x"]).unwrap();
        l.put("a/e", &[b"y"]).unwrap();
        assert_eq!(l.get("a/b/c").unwrap(), b"hello world");
        assert_eq!(l.get_range("a/b/c", 6, 100).unwrap(), b"world");
        assert_eq!(l.get_range("a/b/c", 600, 1).unwrap(), b"");
        assert_eq!(l.list("a").unwrap(), vec!["b".to_string(), "e".to_string()]);
        assert_eq!(l.list("a/b").unwrap(), vec!["c".to_string(), "d".to_string()]);
        assert!(l.list("zz").unwrap().is_empty());
        assert!(l.get("nope").unwrap_err().is_not_found());
        let t = l.modified("a/b").unwrap().unwrap();
        l.age_all(Duration::from_secs(3600)).unwrap();
        assert!(l.modified("a/b").unwrap().unwrap() < t);
        l.delete_prefix("a/b").unwrap();
        assert_eq!(l.keys().unwrap(), vec!["a/e".to_string()]);
        l.delete("a/e").unwrap();
        l.delete("a/e").unwrap();
    }
}
