//! Shard locations: the small storage trait every backend implements ([`Location`]), the backends (a local
//! directory, [`local`]; an S3-compatible object store, [`s3`]), location specs ([`spec`]) and the factory that
//! opens a spec ([`open_location`]).
//!
//! A location stores opaque objects under `/`-separated keys. `put` is atomic (readers see the old object or the
//! new one, never a mix) and the object's bytes are durable when it returns; the *name* becomes durable after
//! [`Location::sync`], which batches the directory fsyncs of many puts. `put_new` is the create-only form: it
//! never replaces an object, even when several writers race for one key.

pub mod local;
mod open;
pub mod s3;
pub mod spec;
pub(crate) mod uring;

pub use local::{sync_dir, IoEngine, LocalDir};
pub use open::open_location;

use crate::error::{Error, Result};

/// One place shards and manifest copies are kept (a disk, a node, an object store).
pub trait Location: Send + Sync + std::fmt::Debug {
    /// Human-readable name used in messages (a path or URL, never credentials).
    fn name(&self) -> &str;
    /// Atomically stores `parts` concatenated under `key`, replacing any previous object. The bytes are durable
    /// when this returns; the name after [`Location::sync`].
    fn put(&self, key: &str, parts: &[&[u8]]) -> Result<()>;
    /// Like [`Location::put`] (atomic; the bytes durable when this returns, the name after [`Location::sync`])
    /// but create-only: when an object with this key exists already, it is left untouched and the call fails
    /// with an error whose [`Error::kind`] is [`crate::ErrorKind::AlreadyExists`] (see
    /// [`Error::already_exists_object`]). Of concurrent callers for one absent key, one succeeds and the
    /// others get that error (barring other failures).
    fn put_new(&self, key: &str, parts: &[&[u8]]) -> Result<()>;
    /// Like [`Location::put`] but durability of the bytes, too, is deferred to the next [`Location::sync`]
    /// (for data nothing references until a later commit point).
    fn put_deferred(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        self.put(key, parts)
    }
    /// Reads the whole object into `buf` (cleared first).
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()>;
    /// Reads the whole object into `head` and then `body`, and returns its length. Both are filled only when the
    /// object is exactly `head.len() + body.len()` bytes long; otherwise their contents are unspecified. Shards
    /// are read so, their payload straight into the stripe buffer. The default reads into a temporary buffer.
    fn get_split_into(&self, key: &str, head: &mut [u8], body: &mut [u8]) -> Result<u64> {
        let mut buf = Vec::new();
        self.get_into(key, &mut buf)?;
        if buf.len() == head.len() + body.len() {
            let (h, b) = buf.split_at(head.len());
            head.copy_from_slice(h);
            body.copy_from_slice(b);
        }
        Ok(buf.len() as u64)
    }
    /// Reads `len` bytes at `offset` (fewer at the end of the object).
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Names (not full keys) of the objects directly under the `prefix` directory; empty when it does not exist.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Deletes one object; deleting a missing object succeeds.
    fn delete(&self, key: &str) -> Result<()>;
    /// Renames an object (the target is replaced). Used to recycle the files of superseded objects: on local
    /// disks a rename is far cheaper than an unlink (which may trigger a discard) plus a create.
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let mut bytes = Vec::new();
        self.get_into(from, &mut bytes)?;
        self.put(to, &[&bytes])?;
        self.delete(from)
    }
    /// True when [`Location::rename`] is cheaper than writing a new object and deleting the old one (local
    /// disks); object stores copy on rename, so recycling objects by renaming them does not pay there.
    fn cheap_rename(&self) -> bool {
        false
    }
    /// True for locations behind a network round trip (object stores): readers then fetch the shards of a
    /// stripe concurrently instead of one after another.
    fn remote(&self) -> bool {
        false
    }
    /// Makes `key` an object of exactly `len` bytes that [`Location::write_at`] can overwrite in place (a
    /// journal ring), keeping its bytes when it has that length already; the object and its name are durable
    /// when this returns. `Ok(false)` when this backend cannot overwrite objects in place (object stores):
    /// callers then write whole objects instead.
    fn preallocate(&self, key: &str, len: u64) -> Result<bool> {
        let _ = (key, len);
        Ok(false)
    }
    /// Overwrites `parts`, concatenated, at `offset` of an object made by [`Location::preallocate`], durably
    /// when this returns. Never changes the object's length or name, so one data sync suffices.
    fn write_at(&self, key: &str, offset: u64, parts: &[&[u8]]) -> Result<()> {
        let _ = (offset, parts);
        Err(Error::InvalidArgument(format!("{}: {key} cannot be overwritten in place", self.name())))
    }
    /// Deletes every object under the `prefix` directory.
    fn delete_prefix(&self, prefix: &str) -> Result<()>;
    /// Makes all completed puts (with their bytes, for deferred ones) and deletes durable.
    fn sync(&self) -> Result<()>;
    /// Checks that the location is present and holds the expected marker; returns a reason when unusable.
    fn probe(&self) -> Result<()>;
    /// Last modification time of an object or of a `prefix` directory (the newest change among its direct
    /// entries on backends that track it); `None` when the backend does not know. Scrub uses it to leave alone
    /// the shards of a commit that may still be in progress.
    fn modified(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        let _ = key;
        Ok(None)
    }
}

/// Convenience wrappers over [`Location`].
pub trait LocationExt: Location {
    /// Reads a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.get_into(key, &mut v)?;
        Ok(v)
    }
}
impl<T: Location + ?Sized> LocationExt for T {}

/// Checks that an object key is a clean relative `/`-separated path (no empty, `.` or `..` parts).
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() || key.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(Error::InvalidArgument(format!("invalid object key {key:?}")));
    }
    Ok(())
}
