//! Serving a BlockFrame store's volumes: [`VolumeBackend`] adapts a [`Volume`] to [`BlockBackend`], and
//! [`StoreRegistry`] lists the store's volumes as exports, opening each at most once so that every connection
//! to a volume shares one write-back cache (which is what makes FLUSH coherent across connections).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use blockframe::store::Store;
use blockframe::volume::{self, Volume, VolumeOptions};
use blockframe::{Error, ErrorKind};

use crate::backend::{BlockBackend, ExportInfo, ExportRegistry, Extent};

/// Maps a core error to the `io::Error` whose errno the NBD client should see, by the error's class (never its
/// text): an I/O error keeps its own errno.
pub fn to_io(e: Error) -> io::Error {
    let own = match &e {
        Error::Io { source, .. } => source.raw_os_error(),
        _ => None,
    };
    let errno = own.unwrap_or(match e.kind() {
        ErrorKind::NoSpace => libc::ENOSPC,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => libc::EINVAL,
        ErrorKind::ReadOnly => libc::EROFS,
        _ => libc::EIO,
    });
    tracing::warn!(error = %e, errno, "volume request failed");
    io::Error::from_raw_os_error(errno)
}

/// One volume as an NBD export.
pub struct VolumeBackend {
    volume: Volume,
    read_only: bool,
}

impl VolumeBackend {
    /// Wraps an open volume.
    pub fn new(volume: Volume, read_only: bool) -> Self {
        VolumeBackend { volume, read_only }
    }
}

impl BlockBackend for VolumeBackend {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.volume.read(offset, buf).map_err(to_io)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.volume.write(offset, data, fua).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        self.volume.flush().map_err(to_io)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.volume.zero(offset, len, false, fua).map_err(to_io)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.volume.zero(offset, len, !may_trim, fua).map_err(to_io)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self
            .volume
            .block_status(offset, len)
            .map_err(to_io)?
            .into_iter()
            .map(|(offset, length, allocated)| Extent { offset, length, hole: !allocated, zero: !allocated })
            .collect())
    }

    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn min_block_size(&self) -> u32 {
        // The volume does its own read-modify-write, so any byte range works (nbdfuse, nbdcopy need this).
        1
    }
}

/// The volumes of a store, opened on first use and shared by all connections.
pub struct StoreRegistry {
    store: Arc<Store>,
    only: Option<String>,
    read_only: bool,
    options: VolumeOptions,
    open: Mutex<HashMap<String, Arc<VolumeBackend>>>,
}

impl StoreRegistry {
    /// Exports every volume of `store` (or only `only`); all read-only if `read_only`.
    pub fn new(store: Arc<Store>, only: Option<String>, read_only: bool, options: VolumeOptions) -> Self {
        StoreRegistry { store, only, read_only, options, open: Mutex::new(HashMap::new()) }
    }

    /// Opens (or reuses) a volume now, so that errors show before serving.
    pub fn preopen(&self, name: &str) -> Result<(), Error> {
        self.get(name).map(|_| ())
    }

    fn get(&self, name: &str) -> Result<Arc<VolumeBackend>, Error> {
        let mut open = self.open.lock().map_err(|_| Error::internal("registry poisoned"))?;
        if let Some(b) = open.get(name) {
            return Ok(b.clone());
        }
        let v = Volume::open(self.store.clone(), name, self.options)?;
        let b = Arc::new(VolumeBackend::new(v, self.read_only));
        open.insert(name.to_string(), b.clone());
        Ok(b)
    }

    /// Flushes every open volume (used at shutdown).
    pub fn flush_all(&self) -> Vec<(String, Error)> {
        let open: Vec<(String, Arc<VolumeBackend>)> = match self.open.lock() {
            Ok(o) => o.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => return vec![],
        };
        open.into_iter().filter_map(|(n, b)| b.volume.flush().err().map(|e| (n, e))).collect()
    }
}

impl ExportRegistry for StoreRegistry {
    fn list(&self) -> Vec<ExportInfo> {
        match volume::list(&self.store) {
            Ok(v) => v
                .into_iter()
                .filter(|v| self.only.as_ref().is_none_or(|o| *o == v.name))
                .map(|v| ExportInfo {
                    description: format!(
                        "BlockFrame volume, {} bytes, {} KiB stripes{}",
                        v.size,
                        v.stripe_size >> 10,
                        if self.read_only { ", read-only" } else { "" }
                    ),
                    name: v.name,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list volumes");
                vec![]
            }
        }
    }

    fn open(&self, name: &str) -> Option<io::Result<Arc<dyn BlockBackend>>> {
        let name = if name.is_empty() { self.only.as_deref()? } else { name };
        if self.only.as_ref().is_some_and(|o| o != name) {
            return None;
        }
        match self.get(name) {
            Ok(b) => Some(Ok(b as Arc<dyn BlockBackend>)),
            Err(Error::NotFound(_)) => None,
            Err(e) => Some(Err(to_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockframe::error::LocationFailure;

    fn errno(e: Error) -> Option<i32> {
        to_io(e).raw_os_error()
    }

    #[test]
    fn errors_map_to_errno_by_class() {
        let full = Error::io("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        let quorum = Error::write_quorum("stripe 1", 4, 5, vec![LocationFailure::new("loc", full)]);
        assert_eq!(errno(quorum), Some(libc::ENOSPC));
        let range = Error::OutOfRange { what: "the volume".into(), offset: 1 << 30, len: 4096, size: 1 << 20 };
        assert_eq!(errno(range), Some(libc::EINVAL));
        assert_eq!(errno(Error::ReadOnly("the volume".into())), Some(libc::EROFS));
        assert_eq!(errno(Error::io("reading", io::Error::from_raw_os_error(libc::EBADF))), Some(libc::EBADF));
        assert_eq!(errno(Error::internal("poisoned")), Some(libc::EIO));
        assert_eq!(errno(Error::corrupt("shard", "bad hash")), Some(libc::EIO));
    }
}
