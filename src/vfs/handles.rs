//! The table of open handles: numbers handed to the kernel on open, never reused within a mount, bounded.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, FsErrorKind, Result};

/// Open handles by number. Values are shared (`Arc`) so an operation can use one without holding the table.
#[derive(Debug)]
pub struct HandleTable<T> {
    open: HashMap<u64, Arc<T>>,
    next: u64,
    max_open: usize,
}

impl<T> HandleTable<T> {
    /// An empty table that refuses more than `max_open` handles at once.
    pub fn new(max_open: usize) -> Self {
        HandleTable { open: HashMap::new(), next: 1, max_open }
    }

    /// Registers a handle; returns its number.
    pub fn insert(&mut self, value: T) -> Result<u64> {
        if self.open.len() >= self.max_open {
            return Err(Error::fs(FsErrorKind::TooManyOpenFiles, format!("{} open handles", self.open.len())));
        }
        let fh = self.next;
        self.next += 1;
        self.open.insert(fh, Arc::new(value));
        Ok(fh)
    }

    /// The handle `fh`.
    pub fn get(&self, fh: u64) -> Result<Arc<T>> {
        self.open.get(&fh).cloned().ok_or_else(|| Error::fs(FsErrorKind::BadHandle, format!("handle {fh}")))
    }

    /// Closes `fh`; returns its value.
    pub fn remove(&mut self, fh: u64) -> Result<Arc<T>> {
        self.open.remove(&fh).ok_or_else(|| Error::fs(FsErrorKind::BadHandle, format!("handle {fh}")))
    }

    /// Open handle count.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// True when nothing is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Every open handle.
    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.open.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_the_table_is_bounded() {
        let mut t = HandleTable::new(2);
        let a = t.insert("a").unwrap();
        let b = t.insert("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.insert("c").unwrap_err().fs_kind(), FsErrorKind::TooManyOpenFiles);
        assert_eq!(*t.get(a).unwrap(), "a");
        assert_eq!(*t.remove(a).unwrap(), "a");
        assert_eq!(t.get(a).unwrap_err().fs_kind(), FsErrorKind::BadHandle);
        assert_eq!(t.remove(a).unwrap_err().fs_kind(), FsErrorKind::BadHandle);
        let c = t.insert("c").unwrap();
        assert!(c > b, "numbers are never reused");
        assert_eq!(t.len(), 2);
    }
}
