//! The storage abstraction the server exports: [`BlockBackend`] (one export)
//! and [`ExportRegistry`] (the set of exports a client may pick from).
//!
//! The API is deliberately small and synchronous, in the spirit of nbdkit's
//! plugin API. The server calls every method from a blocking thread pool
//! (`tokio::task::spawn_blocking`), possibly from many threads at once, so
//! implementations must be internally synchronised.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

/// One contiguous range returned by [`BlockBackend::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Absolute byte offset of the start of the range.
    pub offset: u64,
    /// Length of the range in bytes (zero-length extents are ignored).
    pub length: u64,
    /// The range is not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The range is known to read as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// Name and description of an export, as shown by `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name clients pass to `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.
    pub name: String,
    /// Human readable description (may be empty).
    pub description: String,
}

/// A block device exported over NBD.
///
/// Offsets and lengths passed to the data methods are always validated by the
/// server first: `offset + len` never overflows and never exceeds
/// [`size`](Self::size), and READ/WRITE buffers are at most
/// [`MAX_BLOCK_SIZE`](crate::proto::MAX_BLOCK_SIZE) bytes. Clients that did
/// not negotiate block sizes may send requests that are not aligned to 512
/// bytes, so implementations must accept any byte offset and length
/// (read-modify-write internally where needed). Ranges for `trim`,
/// `write_zeroes`, `block_status` and `cache` may be larger than the maximum
/// block size.
///
/// Errors are reported to the client as NBD errno values, see
/// [`errno_for`].
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the export in bytes. Must not change while connections are open.
    fn size(&self) -> u64;

    /// Whether the export rejects writes (advertised as `NBD_FLAG_READ_ONLY`;
    /// the server then answers writes, trims and zeroing with `NBD_EPERM`
    /// without calling the backend).
    fn is_read_only(&self) -> bool;

    /// Fill `buf` with the bytes at `offset..offset + buf.len()`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Write `data` at `offset`. With `fua`, the data must be durable when
    /// this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// Make every previously completed write durable. Must be coherent across
    /// all connections to the same backend unless
    /// [`can_multi_conn`](Self::can_multi_conn) returns `false`.
    fn flush(&self) -> io::Result<()>;

    /// Discard hint for `offset..offset + len`; contents afterwards are
    /// unspecified until rewritten. May do nothing.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Make `offset..offset + len` read as zeroes. `may_trim` is false when
    /// the client asked for the range to stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;

    /// Extents covering `[offset, offset + len)` at least partially, sorted,
    /// non-overlapping, each with hole/zero flags. The first extent should
    /// contain `offset`; the server clips extents to the request, merges
    /// neighbours with equal flags and stops at the first gap. Returning an
    /// empty list (or extents not covering `offset`) makes the server report
    /// the range as allocated data, which is always safe. Extent boundaries
    /// should be multiples of 512 bytes.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;

    /// Prefetch hint for `offset..offset + len`.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Whether `write_zeroes` is cheaper than writing a buffer of zeroes.
    /// When `false` (the default), requests carrying `NBD_CMD_FLAG_FAST_ZERO`
    /// fail quickly with `NBD_ENOTSUP` as the spec requires.
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// Whether flush and FUA are coherent across connections, so that the
    /// server may advertise `NBD_FLAG_CAN_MULTI_CONN`. Defaults to `true`.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Minimum block size advertised with `NBD_INFO_BLOCK_SIZE` (default
    /// 512). Must be a power of two from 1 to 65536 (invalid values fall
    /// back to the default). Clients that agree to it send aligned requests
    /// only (the server rejects others with `NBD_EINVAL`); clients that do
    /// not negotiate block sizes may still send unaligned requests. Some
    /// clients that do not read-modify-write themselves (e.g. `nbdfuse`)
    /// need 1 for byte-granular access.
    fn min_block_size(&self) -> u32 {
        crate::proto::MIN_BLOCK_SIZE
    }

    /// Preferred block size advertised with `NBD_INFO_BLOCK_SIZE` (default
    /// 4096): a power of two, at least 512 and at least the minimum (invalid
    /// values fall back to the default).
    fn preferred_block_size(&self) -> u32 {
        crate::proto::PREFERRED_BLOCK_SIZE
    }
}

/// The set of exports offered by a server.
pub trait ExportRegistry: Send + Sync + 'static {
    /// All exports, for `NBD_OPT_LIST` (name + description).
    fn list(&self) -> Vec<ExportInfo>;

    /// Open the export `name` (`""` is the default export). `None` means the
    /// export does not exist; `Some(Err(_))` means it exists but could not be
    /// opened. Called once per option that needs the export; the server keeps
    /// the returned handle for the rest of the session.
    fn open(&self, name: &str) -> Option<io::Result<Arc<dyn BlockBackend>>>;

    /// Description of the export `name`, used for `NBD_INFO_DESCRIPTION`.
    /// The default looks the name up in [`list`](Self::list).
    fn description(&self, name: &str) -> Option<String> {
        self.list().into_iter().find(|e| e.name == name).map(|e| e.description)
    }
}

/// A fixed, in-memory table of exports, convenient for tests, demos and
/// simple deployments.
#[derive(Default, Clone)]
pub struct SimpleRegistry {
    exports: BTreeMap<String, (String, Arc<dyn BlockBackend>)>,
    default: Option<String>,
}

impl std::fmt::Debug for SimpleRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimpleRegistry")
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .field("default", &self.default)
            .finish()
    }
}

impl SimpleRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) export `name`. The first export added also becomes
    /// the default export (`""`) unless [`with_default`](Self::with_default)
    /// says otherwise.
    pub fn with_export(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        backend: Arc<dyn BlockBackend>,
    ) -> Self {
        let name = name.into();
        if self.default.is_none() {
            self.default = Some(name.clone());
        }
        self.exports.insert(name, (description.into(), backend));
        self
    }

    /// Make `name` the export served for the empty (default) export name.
    pub fn with_default(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a (String, Arc<dyn BlockBackend>)> {
        if let Some(e) = self.exports.get(name) {
            return Some(e);
        }
        if name.is_empty() {
            return self.default.as_ref().and_then(|d| self.exports.get(d));
        }
        None
    }
}

impl ExportRegistry for SimpleRegistry {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .map(|(name, (description, _))| ExportInfo { name: name.clone(), description: description.clone() })
            .collect()
    }

    fn open(&self, name: &str) -> Option<io::Result<Arc<dyn BlockBackend>>> {
        self.resolve(name).map(|(_, b)| Ok(Arc::clone(b)))
    }

    fn description(&self, name: &str) -> Option<String> {
        self.resolve(name).map(|(d, _)| d.clone())
    }
}

/// Map an I/O error from a backend to the NBD errno sent to the client.
///
/// Uses the raw OS error when present (`EPERM`, `EIO`, `ENOMEM`, `EINVAL`,
/// `ENOSPC`, `EOVERFLOW`, `ENOTSUP`, `ESHUTDOWN`; `EDQUOT` and `EFBIG` map to
/// `ENOSPC` as the spec asks, `EROFS`/`EACCES` to `EPERM`), otherwise the
/// error kind for the few kinds with an obvious equivalent, and `EIO` for
/// everything else.
pub fn errno_for(err: &io::Error) -> u32 {
    use crate::proto::*;
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
            libc::EIO => NBD_EIO,
            libc::ENOMEM => NBD_ENOMEM,
            libc::EINVAL => NBD_EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
            libc::EOVERFLOW => NBD_EOVERFLOW,
            libc::ENOTSUP => NBD_ENOTSUP,
            libc::ESHUTDOWN => NBD_ESHUTDOWN,
            _ => NBD_EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        io::ErrorKind::OutOfMemory => NBD_ENOMEM,
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => NBD_ENOSPC,
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    #[test]
    fn errno_mapping() {
        let e = |c| errno_for(&io::Error::from_raw_os_error(c));
        assert_eq!(e(libc::EPERM), NBD_EPERM);
        assert_eq!(e(libc::EIO), NBD_EIO);
        assert_eq!(e(libc::ENOMEM), NBD_ENOMEM);
        assert_eq!(e(libc::EINVAL), NBD_EINVAL);
        assert_eq!(e(libc::ENOSPC), NBD_ENOSPC);
        assert_eq!(e(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(e(libc::EOVERFLOW), NBD_EOVERFLOW);
        assert_eq!(e(libc::ENOTSUP), NBD_ENOTSUP);
        assert_eq!(e(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(e(libc::ENOENT), NBD_EIO);
        assert_eq!(errno_for(&io::Error::other("x")), NBD_EIO);
        assert_eq!(errno_for(&io::Error::new(io::ErrorKind::InvalidData, "bad mac")), NBD_EIO);
        assert_eq!(errno_for(&io::Error::new(io::ErrorKind::InvalidInput, "x")), NBD_EINVAL);
    }
}
