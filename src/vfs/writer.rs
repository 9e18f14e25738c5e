//! Writing through the mount: opened files are spooled to disk and committed with the normal all-or-nothing
//! pipeline when closed or fsynced; metadata changes re-seal the manifest without rewriting data.

use super::*;

impl Vfs {
    /// Opens file `ino`. Readers see the committed version, or this mount's uncommitted writes when the file
    /// is open for writing here.
    pub fn open(&self, ino: Ino, mode: OpenMode) -> Result<u64> {
        if mode.write {
            self.writable()?;
        }
        let (fh, writer) = {
            let mut st = lock(&self.shared.state);
            let slot = match st.tree.get(ino).map(|n| &n.kind) {
                Some(NodeKind::File(_)) => st.tree.file_mut(ino),
                Some(NodeKind::Dir { .. }) => return Err(Error::fs(FsErrorKind::IsADirectory, format!("inode {ino}"))),
                None => None,
            }
            .ok_or_else(|| Error::fs(FsErrorKind::NotFound, format!("inode {ino}")))?;
            let committed = slot.committed.clone();
            let writer = if mode.write {
                let w = slot.writer.get_or_insert_with(|| {
                    let (mode, mtime) =
                        committed.as_ref().map(|c| (c.meta.mode, c.meta.mtime_unix_ns)).unwrap_or((0o644, now_ns()));
                    Writer::new(committed.clone(), None, mode, mtime)
                });
                w.writers.fetch_add(1, Ordering::SeqCst);
                Some(w.clone())
            } else {
                slot.writer.clone()
            };
            let h = FileHandle {
                ino,
                committed,
                writer: writer.clone(),
                writable: mode.write,
                last_end: AtomicU64::new(0),
            };
            match st.handles.insert(Handle::File(h)) {
                Ok(fh) => (fh, writer),
                Err(e) => {
                    if let (true, Some(w)) = (mode.write, &writer) {
                        w.writers.fetch_sub(1, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            }
        };
        if let (true, Some(w)) = (mode.truncate, writer) {
            if let Err(e) = self.shared.truncate(&w, 0) {
                let _ = self.release(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    /// Creates and opens (for writing) a new empty file; it is committed at the first flush or close.
    pub fn create(&self, parent: Ino, name: &str, mode: u32) -> Result<(Attr, u64)> {
        self.writable()?;
        check_component(name)?;
        let spool = Spool::create(&self.shared.spool_dir)?;
        let w = Writer::new(None, Some(spool), mode & 0o7777, now_ns());
        w.writers.fetch_add(1, Ordering::SeqCst);
        let mut st = lock(&self.shared.state);
        let path = st.tree.child_path(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
        validate_name(&path).map_err(|_| Error::fs(FsErrorKind::InvalidArgument, &path))?;
        let ino = st.tree.create(parent, name, FileSlot { committed: None, writer: Some(w.clone()) })?;
        let h = FileHandle { ino, committed: None, writer: Some(w), writable: true, last_end: AtomicU64::new(0) };
        let fh = match st.handles.insert(Handle::File(h)) {
            Ok(fh) => fh,
            Err(e) => {
                let _ = st.tree.remove(ino, true);
                return Err(e);
            }
        };
        Ok((self.shared.attr(&st, ino)?, fh))
    }

    pub(super) fn file_handle(&self, fh: u64) -> Result<Arc<Handle>> {
        let h = lock(&self.shared.state).handles.get(fh)?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(Error::fs(FsErrorKind::IsADirectory, format!("handle {fh}"))),
        }
    }

    /// Writes `data` at `offset`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.writable()?;
        let h = self.file_handle(fh)?;
        let Handle::File(FileHandle { writer: Some(w), writable: true, .. }) = &*h else {
            return Err(Error::fs(FsErrorKind::BadHandle, format!("handle {fh} is not open for writing")));
        };
        let _op = lock(&w.op);
        let spool = self.shared.ensure_spool(w, &_op, None)?;
        spool.write_at(offset, data)?;
        w.dirty.store(true, Ordering::SeqCst);
        w.mtime_unix_ns.store(now_ns(), Ordering::SeqCst);
        u32::try_from(data.len()).map_err(|_| Error::fs(FsErrorKind::InvalidArgument, "write too large"))
    }

    /// Commits the file's changes when `fh` was opened for writing (close(2) calls this).
    pub fn flush(&self, fh: u64) -> Result<()> {
        let h = self.file_handle(fh)?;
        if let Handle::File(FileHandle { ino, writer: Some(w), writable: true, .. }) = &*h {
            self.shared.commit_writer(*ino, w)?;
        }
        Ok(())
    }

    /// Like [`Vfs::flush`]: once it returns, the file is committed.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        self.flush(fh)
    }

    /// Closes a file handle; the last writable handle commits outstanding changes. When that commit fails,
    /// the written data is saved in `<store>/spool/failed-*` and the error returned.
    pub fn release(&self, fh: u64) -> Result<()> {
        let h = lock(&self.shared.state).handles.remove(fh)?;
        let Handle::File(FileHandle { ino, writer: Some(w), writable: true, .. }) = &*h else {
            return Ok(());
        };
        if w.writers.fetch_sub(1, Ordering::SeqCst) != 1 {
            return Ok(());
        }
        let result = self.shared.commit_writer(*ino, w);
        if let Err(e) = &result {
            self.shared.save_failed(*ino, w, e);
        }
        let mut st = lock(&self.shared.state);
        if w.writers.load(Ordering::SeqCst) == 0 {
            let orphan = match st.tree.file_mut(*ino) {
                Some(slot) if slot.writer.as_ref().is_some_and(|x| Arc::ptr_eq(x, w)) => {
                    slot.writer = None;
                    slot.committed.is_none()
                }
                _ => false,
            };
            // A new file whose commit failed does not exist in the store: do not leave an empty ghost.
            if orphan {
                let _ = st.tree.remove(*ino, true);
            }
        }
        result
    }

    /// Changes size, mode or modification time.
    pub fn setattr(&self, ino: Ino, fh: Option<u64>, changes: SetAttr) -> Result<Attr> {
        if changes.size.is_some() || changes.mode.is_some() || changes.mtime_unix_ns.is_some() {
            self.writable()?;
        }
        let handle_writer = match fh.map(|f| self.file_handle(f)).transpose()? {
            Some(h) => match &*h {
                Handle::File(FileHandle { writer: Some(w), writable: true, .. }) => Some(w.clone()),
                _ => None,
            },
            None => None,
        };
        let (writer, committed) = {
            let st = lock(&self.shared.state);
            match st.tree.get(ino).map(|n| &n.kind) {
                Some(NodeKind::File(slot)) => (handle_writer.or_else(|| slot.writer.clone()), slot.committed.clone()),
                Some(NodeKind::Dir { .. }) => {
                    if changes.size.is_some() {
                        return Err(Error::fs(FsErrorKind::IsADirectory, format!("inode {ino}")));
                    }
                    return self.shared.attr(&st, ino);
                }
                None => return Err(Error::fs(FsErrorKind::NotFound, format!("inode {ino}"))),
            }
        };
        if let Some(size) = changes.size {
            match &writer {
                Some(w) => self.shared.truncate(w, size)?,
                None => {
                    // truncate(2) on a file nobody has open: a temporary writer, committed at once.
                    let base = committed.clone();
                    let (mode, mtime) =
                        base.as_ref().map(|c| (c.meta.mode, c.meta.mtime_unix_ns)).unwrap_or((0o644, 0));
                    let w = Writer::new(base, None, mode, mtime);
                    self.shared.truncate(&w, size)?;
                    self.shared.commit_writer(ino, &w)?;
                }
            }
        }
        if changes.mode.is_some() || changes.mtime_unix_ns.is_some() {
            let pending = writer.as_ref().filter(|w| w.spool().is_some());
            match (pending, &committed) {
                (Some(w), _) => {
                    if let Some(m) = changes.mode {
                        w.mode.store(m & 0o7777, Ordering::SeqCst);
                    }
                    if let Some(t) = changes.mtime_unix_ns {
                        w.mtime_unix_ns.store(t, Ordering::SeqCst);
                    }
                    w.dirty.store(true, Ordering::SeqCst);
                }
                (None, Some(_)) => self.shared.reseal_meta(ino, changes, writer.as_deref())?,
                (None, None) => {}
            }
        }
        let st = lock(&self.shared.state);
        self.shared.attr(&st, ino)
    }
}

impl Shared {
    /// The writer's spool, made at the first change: a copy of the committed version, or empty when the change
    /// truncates to zero.
    pub(super) fn ensure_spool(&self, w: &Writer, op: &WriterOp, truncate_to: Option<u64>) -> Result<Arc<Spool>> {
        if let Some(s) = w.spool() {
            return Ok(s);
        }
        let spool = Spool::create(&self.spool_dir)?;
        if let (Some(base), false) = (&op.base, truncate_to == Some(0)) {
            let _heavy = lock(&self.heavy);
            let file = base.file(&self.store)?;
            read_to(&self.store, &file, &mut SpoolWriter { spool: &spool, pos: 0 }, 1, &|_| {})?;
        }
        let spool = Arc::new(spool);
        *w.spool.write().unwrap_or_else(|e| e.into_inner()) = Some(spool.clone());
        Ok(spool)
    }

    pub(super) fn truncate(&self, w: &Writer, size: u64) -> Result<()> {
        let op = lock(&w.op);
        let spool = self.ensure_spool(w, &op, Some(size))?;
        spool.set_len(size)?;
        w.dirty.store(true, Ordering::SeqCst);
        w.mtime_unix_ns.store(now_ns(), Ordering::SeqCst);
        Ok(())
    }

    /// Commits a writer's spool under the file's current name, replacing the previous version.
    pub(super) fn commit_writer(&self, ino: Ino, w: &Writer) -> Result<()> {
        let mut op = lock(&w.op);
        if !w.dirty.load(Ordering::SeqCst) || w.unlinked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let spool = w.spool();
        let _heavy = lock(&self.heavy);
        let mut loaded = lock(&self.ns);
        let Some(name) = lock(&self.state).tree.path(ino).filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        let req = CommitRequest {
            name: name.clone(),
            mtime_unix_ns: w.mtime_unix_ns.load(Ordering::SeqCst),
            mode: w.mode.load(Ordering::SeqCst),
            replace: true,
            workers: self.opts.commit_workers.max(1),
            size: Some(spool.as_ref().map(|s| s.len()).unwrap_or(0)),
        };
        let started = Instant::now();
        match &spool {
            Some(s) => commit(&self.store, &mut s.reader(), &req, &|_| {})?,
            None => commit(&self.store, &mut std::io::empty(), &req, &|_| {})?,
        };
        tracing::info!(name = %name, bytes = req.size, secs = started.elapsed().as_secs_f64(), "committed through the mount");
        w.dirty.store(false, Ordering::SeqCst);
        let c = Arc::new(Committed::new(catalog::find(&self.store, &name)?)?);
        loaded.by_key.insert(c.key(), c.clone());
        op.base = Some(c.clone());
        let mut st = lock(&self.state);
        st.known.insert(name, c.clone());
        if let Some(slot) = st.tree.file_mut(ino) {
            slot.committed = Some(c);
        }
        Ok(())
    }

    /// Keeps the data of a writer whose commit failed, so nothing written is silently lost.
    pub(super) fn save_failed(&self, ino: Ino, w: &Writer, e: &Error) {
        let Some(spool) = w.spool().filter(|_| w.dirty.load(Ordering::SeqCst) && !w.unlinked.load(Ordering::SeqCst))
        else {
            tracing::error!(error = %e, "commit through the mount failed");
            return;
        };
        let name = lock(&self.state).tree.path(ino).unwrap_or_default().replace('/', "%");
        let dest = self.spool_dir.join(format!("failed-{}-{name}", now_ns()));
        match spool.save_copy(&dest) {
            Ok(_) => {
                tracing::error!(error = %e, saved = %dest.display(), "commit through the mount failed; the written data was saved")
            }
            Err(e2) => {
                tracing::error!(error = %e, save_error = %e2, "commit through the mount failed and the data could not be saved")
            }
        }
    }

    /// Re-seals a committed file's manifest with a new mode or modification time.
    pub(super) fn reseal_meta(&self, ino: Ino, changes: SetAttr, writer: Option<&Writer>) -> Result<()> {
        let mut loaded = lock(&self.ns);
        let Some(c) = lock(&self.state).tree.file(ino).and_then(|s| s.committed.clone()) else {
            return Ok(());
        };
        let meta = FileMeta {
            mode: changes.mode.map(|m| m & 0o7777).unwrap_or(c.meta.mode),
            mtime_unix_ns: changes.mtime_unix_ns.unwrap_or(c.meta.mtime_unix_ns),
            ..c.meta.clone()
        };
        let n = Arc::new(Committed::new(catalog::reseal(&self.store, &c.entry, &meta, true)?)?);
        loaded.by_key.remove(&c.key());
        loaded.by_key.insert(n.key(), n.clone());
        if let Some(w) = writer {
            w.mode.store(meta.mode, Ordering::SeqCst);
            w.mtime_unix_ns.store(meta.mtime_unix_ns, Ordering::SeqCst);
        }
        let mut st = lock(&self.state);
        st.known.insert(meta.name.clone(), n.clone());
        if let Some(slot) = st.tree.file_mut(ino) {
            slot.committed = Some(n);
        }
        Ok(())
    }
}

impl std::io::Write for SpoolWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.spool.write_at(self.pos, buf).map_err(std::io::Error::other)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a stream into a spool sequentially (copying the committed version in).
struct SpoolWriter<'a> {
    spool: &'a Spool,
    pos: u64,
}

impl Writer {
    fn new(base: Option<Arc<Committed>>, spool: Option<Spool>, mode: u32, mtime_unix_ns: i64) -> Arc<Writer> {
        let dirty = spool.is_some();
        Arc::new(Writer {
            op: Mutex::new(WriterOp { base }),
            spool: RwLock::new(spool.map(Arc::new)),
            dirty: AtomicBool::new(dirty),
            unlinked: AtomicBool::new(false),
            writers: AtomicUsize::new(0),
            mode: AtomicU32::new(mode),
            mtime_unix_ns: AtomicI64::new(mtime_unix_ns),
        })
    }

    pub(super) fn spool(&self) -> Option<Arc<Spool>> {
        self.spool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
