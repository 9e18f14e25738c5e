//! The served tree: a snapshot of the catalog as files and directories by name, re-read at most once per
//! `max_age` (a file committed by another process appears within that time, as with the mount).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockframe::files::catalog::{self, Entry};
use blockframe::format::manifest::EntryKind;
use blockframe::store::Store;

use crate::error::ServeError;
use crate::listing::Item;

/// The catalog at one moment: files by name and each directory's children.
#[derive(Default)]
pub struct Snapshot {
    files: BTreeMap<String, Arc<Entry>>,
    dirs: BTreeMap<String, BTreeMap<String, Item>>,
}

impl Snapshot {
    /// Builds the tree from catalog entries. Directories are those named by a directory entry (made through
    /// the mount) and every parent of a name; symbolic links are left out (HTTP has no way to show them).
    pub fn build(entries: Vec<Entry>) -> Self {
        let mut s = Snapshot::default();
        s.dirs.insert(String::new(), BTreeMap::new());
        for e in entries {
            let Some(meta) = &e.meta else { continue };
            let name = meta.name.clone();
            let mtime = Some(meta.mtime_unix_ns.div_euclid(1_000_000_000));
            let item = match meta.kind {
                EntryKind::File => Item {
                    name: leaf(&name).to_string(),
                    is_dir: false,
                    size: meta.size,
                    mtime,
                    root: Some(e.manifest.body.root_hex()),
                },
                EntryKind::Dir => Item { name: leaf(&name).to_string(), is_dir: true, size: 0, mtime, root: None },
                EntryKind::Symlink { .. } => continue,
            };
            s.add_parents(&name);
            let is_dir = item.is_dir;
            s.dirs.entry(parent(&name).to_string()).or_default().insert(child_key(&item), item);
            if is_dir {
                s.dirs.entry(name).or_default();
            } else {
                s.files.insert(name, Arc::new(e));
            }
        }
        s
    }

    /// Makes every parent directory of `name` known, each listed in its own parent.
    fn add_parents(&mut self, name: &str) {
        let mut p = parent(name);
        while !p.is_empty() {
            let up = parent(p).to_string();
            let item = Item { name: leaf(p).to_string(), is_dir: true, size: 0, mtime: None, root: None };
            let siblings = self.dirs.entry(up).or_default();
            // A directory entry of its own (with its times) wins over an implied one.
            siblings.entry(child_key(&item)).or_insert(item);
            self.dirs.entry(p.to_string()).or_default();
            p = parent(p);
        }
    }

    /// The file named `name`.
    pub fn file(&self, name: &str) -> Option<&Arc<Entry>> {
        self.files.get(name)
    }

    /// The entries of directory `name` (`""` is the root), directories first, each group by name; `None`
    /// when there is no such directory.
    pub fn list(&self, name: &str) -> Option<Vec<Item>> {
        self.dirs.get(name).map(|c| c.values().cloned().collect())
    }

    /// Whether `name` is a directory.
    pub fn is_dir(&self, name: &str) -> bool {
        self.dirs.contains_key(name)
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no file is served.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The sort key of a child: directories before files, then by name (a file and a directory may share a name).
fn child_key(item: &Item) -> String {
    format!("{}{}", if item.is_dir { '0' } else { '1' }, item.name)
}

fn parent(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(p, _)| p)
}

fn leaf(name: &str) -> &str {
    name.rsplit_once('/').map_or(name, |(_, l)| l)
}

/// The catalog as the server sees it: a snapshot refreshed on demand, at most once per `max_age`.
pub struct Catalog {
    store: Arc<Store>,
    max_age: Duration,
    current: tokio::sync::Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl Catalog {
    /// A catalog view of `store`, re-read when older than `max_age`.
    pub fn new(store: Arc<Store>, max_age: Duration) -> Self {
        Catalog { store, max_age, current: tokio::sync::Mutex::new(None) }
    }

    /// Forgets the snapshot, so the next request re-reads the catalog (after a write of this server).
    pub async fn invalidate(&self) {
        *self.current.lock().await = None;
    }

    /// The current snapshot; re-reads the catalog (on a blocking thread, one reader at a time) when it is older
    /// than `max_age`. When re-reading fails, the last good snapshot is kept and the error logged.
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, ServeError> {
        let mut cur = self.current.lock().await;
        if let Some((at, snap)) = cur.as_ref() {
            if at.elapsed() < self.max_age {
                return Ok(snap.clone());
            }
        }
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || catalog::list(&store)).await?;
        match read {
            Ok((entries, bad)) => {
                for e in bad {
                    tracing::warn!(error = %e, "a catalog entry cannot be read; it is not served");
                }
                let snap = Arc::new(Snapshot::build(entries));
                *cur = Some((Instant::now(), snap.clone()));
                Ok(snap)
            }
            Err(e) => match cur.as_ref() {
                Some((_, snap)) => {
                    tracing::warn!(error = %e, "re-reading the catalog failed; serving the last snapshot");
                    Ok(snap.clone())
                }
                None => Err(e.into()),
            },
        }
    }
}
