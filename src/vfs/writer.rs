//! Writing through the mount: opened files are spooled to disk and committed with the normal all-or-nothing
//! pipeline; metadata changes re-seal the manifest without rewriting data.
//!
//! Write-behind, like a local filesystem: `close` only queues a file; the queued files are committed together
//! (small ones packed, one catalog record for all) by a background flusher about a second later, by `fsync` of
//! any file, and at unmount. Until then the mount serves them from their spools. A crash of the mount process
//! loses what was closed in the last second or so and never fsynced; everything whose `fsync` returned is in
//! the store.

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
            if st.entries.get(&ino).is_some_and(|e| e.target.is_some()) {
                return Err(Error::fs(FsErrorKind::SymlinkLoop, format!("inode {ino} is a symbolic link")));
            }
            let default = Stat::new(0o644, self.shared.default_owner, now_ns());
            let default_owner = self.shared.default_owner;
            let slot = match st.tree.get(ino).map(|n| &n.kind) {
                Some(NodeKind::File(_)) => st.tree.file_mut(ino),
                Some(NodeKind::Dir { .. }) => return Err(Error::fs(FsErrorKind::IsADirectory, format!("inode {ino}"))),
                None => None,
            }
            .ok_or_else(|| Error::fs(FsErrorKind::NotFound, format!("inode {ino}")))?;
            let committed = slot.committed.clone();
            let writer = if mode.write {
                let w = slot.writer.get_or_insert_with(|| {
                    let stat = committed.as_ref().map_or(default, |c| Stat::of(&c.meta, default_owner));
                    Writer::new(committed.clone(), None, stat)
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

    /// Creates and opens (for writing) a new empty file owned by `owner` (`None`: the default owner); it is
    /// committed with the next commit after its close.
    pub fn create(&self, parent: Ino, name: &str, mode: u32, owner: Option<(u32, u32)>) -> Result<(Attr, u64)> {
        self.writable()?;
        check_component(name)?;
        let spool = Spool::create(&self.shared.spool_dir)?;
        let mut st = lock(&self.shared.state);
        let path = st.tree.child_path(parent, name).ok_or_else(|| Error::fs(FsErrorKind::NotFound, name))?;
        check_path(&path)?;
        let w = Writer::new(None, Some(spool), self.shared.new_stat(&st, parent, mode, owner));
        w.writers.fetch_add(1, Ordering::SeqCst);
        let ino = st.tree.create(parent, name, FileSlot { committed: None, writer: Some(w.clone()) })?;
        self.shared.touch_dir(&mut st, parent);
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
        check_size(offset.checked_add(data.len() as u64), "write")?;
        let _op = lock(&w.op);
        let spool = self.shared.ensure_spool(w, &_op, None)?;
        spool.write_at(offset, data)?;
        w.dirty.store(true, Ordering::SeqCst);
        if !w.kernel_times.load(Ordering::SeqCst) {
            lock(&w.stat).modified(now_ns());
        }
        u32::try_from(data.len()).map_err(|_| Error::fs(FsErrorKind::InvalidArgument, "write too large"))
    }

    /// close(2) of a handle: queues the file's changes for the write-behind flusher (nothing waits for them).
    pub fn flush(&self, fh: u64) -> Result<()> {
        let h = self.file_handle(fh)?;
        if let Handle::File(FileHandle { ino, writer: Some(w), writable: true, .. }) = &*h {
            self.shared.queue(*ino, w);
        }
        Ok(())
    }

    /// Commits this file and every other queued one; once it returns, they are durable in the store.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        let h = self.file_handle(fh)?;
        let extra = match &*h {
            Handle::File(FileHandle { ino, writer: Some(w), writable: true, .. }) => vec![(*ino, w.clone())],
            _ => vec![],
        };
        first_error(self.shared.sync_dirty(extra))
    }

    /// Commits everything queued or open (syncfs(2), sync(1)); returns the first failure.
    pub fn sync_all(&self) -> Result<()> {
        first_error(self.flush_all())
    }

    /// Closes a file handle; the last writable handle queues outstanding changes for the flusher.
    pub fn release(&self, fh: u64) -> Result<()> {
        let h = lock(&self.shared.state).handles.remove(fh)?;
        let Handle::File(FileHandle { ino, writer: Some(w), writable: true, .. }) = &*h else {
            return Ok(());
        };
        if w.writers.fetch_sub(1, Ordering::SeqCst) != 1 {
            return Ok(());
        }
        if w.dirty.load(Ordering::SeqCst) && !w.unlinked.load(Ordering::SeqCst) {
            self.shared.queue(*ino, w);
        } else {
            self.shared.retire(*ino, w);
        }
        Ok(())
    }

    /// fallocate(2). The store keeps no preallocation, so: mode 0 makes the file at least `offset + len` long
    /// (the new bytes read as zeros); `FALLOC_FL_KEEP_SIZE` alone changes nothing; `PUNCH_HOLE | KEEP_SIZE` and
    /// `ZERO_RANGE` (with or without `KEEP_SIZE`) make the range read as zeros. Other modes (collapse, insert,
    /// unshare) are unsupported.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        const KEEP_SIZE: i32 = 0x01;
        const PUNCH_HOLE: i32 = 0x02;
        const ZERO_RANGE: i32 = 0x10;
        self.writable()?;
        let end = offset.checked_add(len);
        check_size(end, "fallocate")?;
        let end = end.unwrap_or(0);
        let h = self.file_handle(fh)?;
        let Handle::File(FileHandle { writer: Some(w), writable: true, .. }) = &*h else {
            return Err(Error::fs(FsErrorKind::BadHandle, format!("handle {fh} is not open for writing")));
        };
        let size = match w.spool() {
            Some(s) => s.len(),
            None => lock(&w.op).base.as_ref().map(|c| c.meta.size).unwrap_or(0),
        };
        match mode {
            0 if end > size => self.shared.truncate(w, end),
            0 | KEEP_SIZE => Ok(()),
            m if m == PUNCH_HOLE | KEEP_SIZE || m == ZERO_RANGE | KEEP_SIZE => {
                self.shared.zero_range(w, offset, end.min(size))
            }
            ZERO_RANGE => {
                self.shared.zero_range(w, offset, end.min(size))?;
                if end > size {
                    self.shared.truncate(w, end)?;
                }
                Ok(())
            }
            _ => Err(Error::fs(FsErrorKind::Unsupported, format!("fallocate mode {mode:#x}"))),
        }
    }

    /// Changes size, mode, owner or times (any change sets the ctime). Changes to a file with writes pending
    /// go with its commit; to a directory or link, with the next commit; to a committed file, into a new
    /// catalog record at once.
    pub fn setattr(&self, ino: Ino, fh: Option<u64>, changes: SetAttr) -> Result<Attr> {
        if changes != SetAttr::default() {
            self.writable()?;
        }
        let handle_writer = match fh.map(|f| self.file_handle(f)).transpose()? {
            Some(h) => match &*h {
                Handle::File(FileHandle { writer: Some(w), writable: true, .. }) => Some(w.clone()),
                _ => None,
            },
            None => None,
        };
        // A writer that a commit retires meanwhile (its op lock is held for that) no longer carries changes:
        // they would be lost with it. So the writer is checked again under its op lock, and when it was
        // retired the change goes to what is committed now (pjdfstest's utimensat/06.t lost a chmod so).
        let mut candidate = handle_writer;
        for _ in 0..SETATTR_TRIES {
            match self.setattr_target(ino, &changes, candidate.take())? {
                Target::Done(a) => return Ok(a),
                Target::Writer(None) => self.setattr_committed(ino, &changes)?,
                Target::Writer(Some(w)) => {
                    let op = lock(&w.op);
                    match self.shared.slot_writer(ino) {
                        // Replaced by a newer writer meanwhile: look again.
                        Some(cur) if !Arc::ptr_eq(&cur, &w) => continue,
                        // Retired meanwhile (and not an open handle's): the committed version takes it.
                        None if w.writers.load(Ordering::SeqCst) == 0 => {
                            drop(op);
                            self.setattr_committed(ino, &changes)?;
                        }
                        _ => self.setattr_writer(ino, &w, &op, &changes)?,
                    }
                }
            }
            return self.shared.attr(&lock(&self.shared.state), ino);
        }
        Err(Error::internal(format!("inode {ino}: its writer kept changing")))
    }

    /// Where a change of `ino` goes: a directory or link is changed at once (`Done`); a file, through its
    /// writer (`preferred`, else the one it has), or `None` for its committed version.
    fn setattr_target(&self, ino: Ino, changes: &SetAttr, preferred: Option<Arc<Writer>>) -> Result<Target> {
        let mut st = lock(&self.shared.state);
        match st.tree.get(ino).map(|n| &n.kind) {
            Some(NodeKind::File(slot)) if !st.entries.contains_key(&ino) => {
                Ok(Target::Writer(preferred.or_else(|| slot.writer.clone())))
            }
            Some(kind) => {
                if changes.size.is_some() {
                    let is_dir = matches!(kind, NodeKind::Dir { .. });
                    let e = if is_dir { FsErrorKind::IsADirectory } else { FsErrorKind::InvalidArgument };
                    return Err(Error::fs(e, format!("inode {ino}")));
                }
                if changes.changes_metadata() {
                    self.shared.change_entry(&mut st, ino, changes);
                }
                Ok(Target::Done(self.shared.attr(&st, ino)?))
            }
            // An inode unlinked here (or replaced by a version from elsewhere) that the kernel still holds: it
            // writes back the times it cached (writeback cache), e.g. of the placeholder files `tar x` makes
            // for links. Nothing is left to keep them in; refusing would fail the next syncfs(2) of the whole
            // mount with ENOENT. Other changes of such an inode are refused.
            None if st.tree.was_removed(ino) && changes.times_only() => {
                let owner = self.shared.default_owner;
                let mut a = self.shared.unlinked_attr(&st, ino).unwrap_or(Attr {
                    ino,
                    kind: FileType::File,
                    size: 0,
                    nlink: 0,
                    stat: Stat::new(0o644, owner, self.shared.mount_time_ns),
                });
                a.stat.apply(changes, now_ns());
                Ok(Target::Done(a))
            }
            None => Err(Error::fs(FsErrorKind::NotFound, format!("inode {ino}"))),
        }
    }

    /// A change of a file with no writer: a truncate commits a temporary writer at once; a metadata change
    /// re-seals what is committed now.
    fn setattr_committed(&self, ino: Ino, changes: &SetAttr) -> Result<()> {
        let Some(size) = changes.size else {
            return match changes.changes_metadata() {
                true => self.shared.reseal_meta(ino, *changes, None),
                false => Ok(()),
            };
        };
        let committed = lock(&self.shared.state).tree.file(ino).and_then(|s| s.committed.clone());
        let (_, stat) = self.shared.file_stat(None, committed.as_ref());
        let w = Writer::new(committed, None, stat);
        if changes.changes_metadata() {
            lock(&w.stat).apply(changes, now_ns());
        }
        {
            let op = lock(&w.op);
            self.shared.truncate_locked(&w, &op, size)?;
        }
        self.shared.commit_writer(ino, &w)
    }

    /// A change of a file through its writer `w` (its op lock held, still the file's writer): a closed
    /// writer is queued again, so the change is committed.
    fn setattr_writer(&self, ino: Ino, w: &Arc<Writer>, op: &WriterOp, changes: &SetAttr) -> Result<()> {
        if let Some(size) = changes.size {
            self.shared.truncate_locked(w, op, size)?;
        }
        if changes.changes_metadata() {
            if w.spool().is_some() {
                // A ctime comes only from a kernel that keeps the times (writeback cache): from now on its times
                // win over the arrival time of a write it sent before them.
                if changes.ctime_unix_ns.is_some() {
                    w.kernel_times.store(true, Ordering::SeqCst);
                }
                lock(&w.stat).apply(changes, now_ns());
                w.dirty.store(true, Ordering::SeqCst);
            } else {
                // Open but unchanged: the committed version is re-sealed (and the writer's copy changed too).
                self.shared.reseal_meta(ino, *changes, Some(w))?;
            }
        }
        if w.dirty.load(Ordering::SeqCst) && w.writers.load(Ordering::SeqCst) == 0 {
            self.shared.queue(ino, w);
        }
        Ok(())
    }
}

/// Where [`Vfs::setattr`] applies a change.
enum Target {
    /// A directory or link, changed: its attributes.
    Done(Attr),
    /// A file: its writer, or `None` for the committed version.
    Writer(Option<Arc<Writer>>),
}

/// How often [`Vfs::setattr`] looks again when the file's writer was replaced by a new one meanwhile.
const SETATTR_TRIES: usize = 8;

/// The first of `errors` as the result of an operation that made several commits.
fn first_error(errors: Vec<Error>) -> Result<()> {
    errors.into_iter().next().map_or(Ok(()), Err)
}

/// What the commits of directory and link entries came to, by inode.
type EntryOutcomes = Vec<(Ino, Result<Entry>)>;

/// Queued files that make the flusher commit at once.
const FLUSH_FILES: usize = 2048;

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
            let copy = |c: &Committed| {
                read_to(&self.store, &*c.file(&self.store)?, &mut SpoolWriter { spool: &spool, pos: 0 }, 1, &|_| {})
            };
            // A compaction may have moved a packed base to another pack since it was read.
            copy(base).or_else(|e| self.moved(base).map_or(Err(e), |now| copy(&now)))?;
        }
        let spool = Arc::new(spool);
        *w.spool.write().unwrap_or_else(|e| e.into_inner()) = Some(spool.clone());
        Ok(spool)
    }

    /// Makes bytes `start..end` of the file read as zeros.
    pub(super) fn zero_range(&self, w: &Writer, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let op = lock(&w.op);
        let spool = self.ensure_spool(w, &op, None)?;
        let zeros = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut at = start;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            spool.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        w.dirty.store(true, Ordering::SeqCst);
        lock(&w.stat).modified(now_ns());
        Ok(())
    }

    pub(super) fn truncate(&self, w: &Writer, size: u64) -> Result<()> {
        let op = lock(&w.op);
        self.truncate_locked(w, &op, size)
    }

    /// [`Shared::truncate`] with the writer's op lock held.
    pub(super) fn truncate_locked(&self, w: &Writer, op: &WriterOp, size: u64) -> Result<()> {
        check_size(Some(size), "truncate")?;
        let spool = self.ensure_spool(w, op, Some(size))?;
        spool.set_len(size)?;
        w.dirty.store(true, Ordering::SeqCst);
        lock(&w.stat).modified(now_ns());
        Ok(())
    }

    /// The writer file `ino` has now.
    pub(super) fn slot_writer(&self, ino: Ino) -> Option<Arc<Writer>> {
        lock(&self.state).tree.file(ino).and_then(|s| s.writer.clone())
    }

    /// Commits one writer now (with whatever else is queued); returns its failure.
    pub(super) fn commit_writer(&self, ino: Ino, w: &Arc<Writer>) -> Result<()> {
        first_error(self.sync_dirty(vec![(ino, w.clone())]))
    }

    /// Queues a closed file for the flusher (once).
    pub(super) fn queue(&self, ino: Ino, w: &Arc<Writer>) {
        let mut q = lock(&self.dirty);
        if !q.iter().any(|(_, x, _)| Arc::ptr_eq(x, w)) {
            q.push((ino, w.clone(), Instant::now()));
        }
        if q.len() >= FLUSH_FILES {
            self.flusher_wake.notify_all();
        }
    }

    /// A metadata change of directory or link `ino`.
    pub(super) fn change_entry(&self, st: &mut State, ino: Ino, changes: &SetAttr) {
        let now = now_ns();
        self.edit_entry(st, ino, |s| s.apply(changes, now));
    }

    /// Queues directory or link `ino` for its entry to be written by the next commit.
    pub(super) fn queue_entry(&self, ino: Ino) {
        let mut q = lock(&self.dirty_entries);
        q.push((ino, Instant::now()));
        if q.len() >= FLUSH_FILES {
            self.flusher_wake.notify_all();
        }
    }

    /// Queues the removal of a committed file for the next commit.
    pub(super) fn queue_removal(&self, file: catalog::FileRef) {
        let mut q = lock(&self.removals);
        q.push((file, Instant::now()));
        if q.len() >= FLUSH_FILES {
            self.flusher_wake.notify_all();
        }
    }

    /// The flusher: commits the queue once its oldest file has waited `write_behind` (or it holds
    /// [`FLUSH_FILES`]), until [`Shared::stop_flusher`].
    pub(super) fn flush_loop(&self) {
        loop {
            {
                let stop = lock(&self.flusher_stop);
                let (stop, _) = self
                    .flusher_wake
                    .wait_timeout(
                        stop,
                        (self.opts.write_behind / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
                    )
                    .unwrap_or_else(|e| e.into_inner());
                if *stop {
                    return;
                }
            }
            let wait = self.opts.write_behind;
            let due = {
                let q = lock(&self.dirty);
                q.len() >= FLUSH_FILES || q.first().is_some_and(|(_, _, t)| t.elapsed() >= wait)
            } || {
                let r = lock(&self.removals);
                r.len() >= FLUSH_FILES || r.first().is_some_and(|(_, t)| t.elapsed() >= wait)
            } || {
                let r = lock(&self.dirty_entries);
                r.len() >= FLUSH_FILES || r.first().is_some_and(|(_, t)| t.elapsed() >= wait)
            };
            if due {
                for e in self.sync_dirty(vec![]) {
                    tracing::error!(error = %e, "write-behind commit failed (the data was kept in the spool directory)");
                }
            }
            self.compact_if_due(false);
        }
    }

    pub(super) fn stop_flusher(&self) {
        *lock(&self.flusher_stop) = true;
        self.flusher_wake.notify_all();
    }

    /// Commits the queued files and `extra` (open writers) in one session: one catalog record, small files
    /// packed. Returns the failures; a failed file's data is saved in `<store>/spool/failed-*`.
    pub(super) fn sync_dirty(&self, extra: Vec<(Ino, Arc<Writer>)>) -> Vec<Error> {
        // Lock order: one sync at a time, then the writers' ops, then `heavy` and `ns` (as a write takes its
        // op, then `heavy` to fill a spool).
        let _one = lock(&self.syncing);
        let mut items: Vec<(Ino, Arc<Writer>)> = lock(&self.dirty).drain(..).map(|(i, w, _)| (i, w)).collect();
        for (i, w) in extra {
            if !items.iter().any(|(_, x)| Arc::ptr_eq(x, &w)) {
                items.push((i, w));
            }
        }
        if items.is_empty() && lock(&self.removals).is_empty() && lock(&self.dirty_entries).is_empty() {
            return vec![];
        }
        let mut ops: Vec<_> = items.iter().map(|(_, w)| lock(&w.op)).collect();
        let _heavy = lock(&self.heavy);
        let _room = self.cache.lend(self.commit_memory(&items));
        let mut loaded = lock(&self.ns);
        // Taken off their queues only under the namespace lock: until then a refresh still hides the removed
        // entries (it reads the queue), and after, it waits for this commit.
        let removals: Vec<catalog::FileRef> = lock(&self.removals).drain(..).map(|(f, _)| f).collect();
        let mut entries: Vec<Ino> = lock(&self.dirty_entries).drain(..).map(|(i, _)| i).collect();
        entries.sort_unstable();
        entries.dedup();
        let mut errors = Vec::new();
        let (done, entries_done) = self.commit_items(&items, &removals, &entries, &mut errors);
        for (ino, outcome) in entries_done {
            if let Err(e) = outcome.and_then(|entry| self.entry_committed(ino, entry, &mut loaded)) {
                self.entry_failed(ino);
                errors.push(e);
            }
        }
        for ((ino, w), (op, outcome)) in items.iter().zip(ops.iter_mut().zip(done)) {
            match outcome {
                Some(Ok(entry)) => match self.committed_now(*ino, w, op, entry, &mut loaded) {
                    Ok(()) => {}
                    Err(e) => errors.push(e),
                },
                Some(Err(e)) => {
                    self.save_failed(*ino, w, &e);
                    errors.push(e);
                }
                None => {}
            }
        }
        drop(ops);
        drop(loaded);
        drop(_room);
        drop(_heavy);
        for (ino, w) in &items {
            if w.writers.load(Ordering::SeqCst) == 0 {
                self.retire(*ino, w);
            }
        }
        if !removals.is_empty() {
            *lock(&self.compact_due) = Some(Instant::now());
        }
        errors
    }

    /// Rewrites the packs that committed removals left mostly dead, as `bf rm` does, once no removal came for
    /// a while (so that files a running `rm -r` is about to remove are not moved first), or at once when
    /// `now`. The moved files show where they are now; handles opened before read them there too (see
    /// [`Shared::moved`]). A failure loses nothing: the space is freed after a later removal.
    pub(super) fn compact_if_due(&self, now: bool) {
        let quiet = (self.opts.write_behind * 4).max(Duration::from_secs(2));
        {
            let mut due = lock(&self.compact_due);
            if !due.is_some_and(|t| now || t.elapsed() >= quiet) || !lock(&self.removals).is_empty() {
                return;
            }
            *due = None;
        }
        let mut loaded = lock(&self.ns);
        match crate::files::compact::compact(&self.store, crate::files::compact::MAX_PACKS) {
            Ok(r) if r.packs_dropped > 0 => {
                if let Err(e) = self.refresh_locked(&mut loaded) {
                    tracing::warn!(error = %e, "re-reading the catalog after a compaction failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "compacting packs failed; a later removal tries again"),
        }
    }

    /// Memory the commit of `items` takes beyond packs: for a file too large to pack, its pipeline's segment
    /// buffers and shards (about 1.5 segments per worker and one more), lent by the segment cache meanwhile.
    fn commit_memory(&self, items: &[(Ino, Arc<Writer>)]) -> usize {
        let limit = crate::files::pack::pack_limit(&self.store, crate::files::pack::DEFAULT_PACK_THRESHOLD);
        if !items.iter().any(|(_, w)| w.spool().is_some_and(|s| s.len() > limit)) {
            return 0;
        }
        let segment = self.store.descriptor().segment_size as usize;
        (self.opts.commit_workers.max(1) + 1) * segment / 2 * 3
    }

    /// Commits each item's spool and each dirty directory or link entry in one session; per item, `None` when
    /// it had nothing to commit.
    fn commit_items(
        &self,
        items: &[(Ino, Arc<Writer>)],
        removals: &[catalog::FileRef],
        entries: &[Ino],
        errors: &mut Vec<Error>,
    ) -> (Vec<Option<Result<Entry>>>, EntryOutcomes) {
        let mut out: Vec<Option<Result<Entry>>> = items.iter().map(|_| None).collect();
        let mut session = match Session::new(&self.store, SessionOptions::default()) {
            Ok(s) => s,
            Err(e) => {
                errors.push(e);
                self.requeue_removals(removals);
                let failed = || Error::internal("the commit session could not start");
                let out = items.iter().map(|_| Some(Err(failed()))).collect();
                return (out, entries.iter().map(|i| (*i, Err(failed()))).collect());
            }
        };
        for f in removals {
            session.remove(f.clone());
        }
        let mut queued = Vec::new();
        for (n, (ino, w)) in items.iter().enumerate() {
            if !w.dirty.load(Ordering::SeqCst) || w.unlinked.load(Ordering::SeqCst) {
                continue;
            }
            let Some(name) = lock(&self.state).tree.path(*ino).filter(|p| !p.is_empty()) else { continue };
            let spool = w.spool();
            let req = CommitRequest {
                workers: self.opts.commit_workers.max(1),
                size: Some(spool.as_ref().map(|s| s.len()).unwrap_or(0)),
                ..lock(&w.stat).request(name, EntryKind::File)
            };
            let r = match &spool {
                Some(s) => session.commit(&mut s.reader(), &req, &|_| {}),
                None => session.commit(&mut std::io::empty(), &req, &|_| {}),
            };
            match r {
                Ok(()) => queued.push(n),
                Err(e) => out[n] = Some(Err(e)),
            }
        }
        let (entry_queued, mut entries_out) = self.queue_entries(&mut session, entries);
        let started = Instant::now();
        match session.flush_manifests() {
            Ok(results) => {
                let mut results = results.into_iter();
                for (n, r) in queued.iter().zip(results.by_ref()) {
                    out[*n] = Some(r.and_then(|(_, m)| self.entry_of(m)));
                }
                for (ino, r) in entry_queued.iter().zip(results) {
                    entries_out.push((*ino, r.and_then(|(_, m)| self.entry_of(m))));
                }
                tracing::info!(
                    files = queued.len(),
                    entries = entry_queued.len(),
                    secs = started.elapsed().as_secs_f64(),
                    "committed through the mount"
                );
            }
            Err(e) => {
                let unpublished = || Error::internal(format!("the batch was not published: {e}"));
                for n in &queued {
                    out[*n] = Some(Err(unpublished()));
                }
                entries_out.extend(entry_queued.iter().map(|i| (*i, Err(unpublished()))));
                self.requeue_removals(removals);
                errors.push(e);
            }
        }
        (out, entries_out)
    }

    /// Adds the entries of dirty directories and links to `session` (each marked clean as it is taken; a change
    /// meanwhile queues it again). Returns the inodes queued, in order, and the failures.
    fn queue_entries(&self, session: &mut Session<'_>, inos: &[Ino]) -> (Vec<Ino>, EntryOutcomes) {
        let (mut queued, mut failed) = (Vec::new(), Vec::new());
        for &ino in inos {
            let req = {
                let mut st = lock(&self.state);
                let Some(path) = st.tree.path(ino).filter(|p| !p.is_empty()) else { continue };
                // A file of the same name that this view does not show (a store may hold both `d` and `d/x`):
                // the entry would replace it, so it is not written.
                let hidden = st.known.get(&path).filter(|c| c.meta.kind == EntryKind::File).cloned();
                let Some(e) = st.entries.get_mut(&ino).filter(|e| e.dirty) else { continue };
                e.dirty = false;
                if hidden.is_some_and(|h| !e.committed.as_ref().is_some_and(|c| Arc::ptr_eq(c, &h))) {
                    tracing::warn!(path = %path, "not writing the entry of a directory or link: a file of that name is in the catalog");
                    continue;
                }
                CommitRequest { size: Some(0), ..e.stat.request(path, e.kind()) }
            };
            match session.commit(&mut std::io::empty(), &req, &|_| {}) {
                Ok(()) => queued.push(ino),
                Err(e) => failed.push((ino, Err(e))),
            }
        }
        (queued, failed)
    }

    /// Records the committed entry of directory or link `ino` (when it still exists).
    fn entry_committed(&self, ino: Ino, entry: Entry, loaded: &mut Loaded) -> Result<()> {
        let c = Arc::new(Committed::new(entry)?);
        let mut st = lock(&self.state);
        let Some(e) = st.entries.get_mut(&ino) else { return Ok(()) };
        e.committed = Some(c.clone());
        loaded.by_key.insert(c.key(), c.clone());
        st.known.insert(c.meta.name.clone(), c);
        Ok(())
    }

    /// An entry whose commit failed (or never started) stays dirty and queued, for the next commit to try again.
    fn entry_failed(&self, ino: Ino) {
        if let Some(e) = lock(&self.state).entries.get_mut(&ino) {
            e.dirty = true;
            self.queue_entry(ino);
        }
    }

    /// Puts back removals whose record was not written, for the next commit to try again.
    fn requeue_removals(&self, removals: &[catalog::FileRef]) {
        let mut q = lock(&self.removals);
        for f in removals {
            q.push((f.clone(), Instant::now()));
        }
    }

    fn entry_of(&self, manifest: crate::format::manifest::Manifest) -> Result<Entry> {
        let meta = manifest.meta(self.store.key()?)?;
        let b = &manifest.body;
        let file = catalog::FileRef { name_tag: b.name_tag, file_id: b.file_id, copies: vec![], in_log: true };
        Ok(Entry { file, manifest, meta: Some(meta), bad_copies: vec![] })
    }

    /// Records a writer's new committed version in the tree.
    fn committed_now(&self, ino: Ino, w: &Writer, op: &mut WriterOp, entry: Entry, loaded: &mut Loaded) -> Result<()> {
        w.dirty.store(false, Ordering::SeqCst);
        let name = entry.meta.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        let c = Arc::new(Committed::new(entry)?);
        loaded.by_key.insert(c.key(), c.clone());
        op.base = Some(c.clone());
        let mut st = lock(&self.state);
        st.known.insert(name, c.clone());
        if let Some(slot) = st.tree.file_mut(ino) {
            slot.committed = Some(c);
        }
        Ok(())
    }

    /// Drops a closed writer from its file once nothing is left to commit; a new file that never got committed
    /// (its commit failed) is removed rather than left as an empty ghost.
    pub(super) fn retire(&self, ino: Ino, w: &Arc<Writer>) {
        // Under the op lock, so a change that `setattr` makes to this writer is either in before (and the
        // writer stays, queued) or finds it retired.
        let _op = lock(&w.op);
        if w.dirty.load(Ordering::SeqCst)
            && !w.unlinked.load(Ordering::SeqCst)
            && lock(&self.dirty).iter().any(|(_, x, _)| Arc::ptr_eq(x, w))
        {
            return;
        }
        let mut st = lock(&self.state);
        let orphan = match st.tree.file_mut(ino) {
            Some(slot)
                if slot.writer.as_ref().is_some_and(|x| Arc::ptr_eq(x, w)) && w.writers.load(Ordering::SeqCst) == 0 =>
            {
                slot.writer = None;
                slot.committed.is_none()
            }
            _ => false,
        };
        if orphan {
            let _ = st.tree.remove(ino, true);
        }
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

    /// Re-seals a committed file's manifest with new metadata.
    pub(super) fn reseal_meta(&self, ino: Ino, changes: SetAttr, writer: Option<&Writer>) -> Result<()> {
        let mut loaded = lock(&self.ns);
        let Some(c) = lock(&self.state).tree.file(ino).and_then(|s| s.committed.clone()) else {
            return Ok(());
        };
        let now = now_ns();
        let mut stat = Stat::of(&c.meta, self.default_owner);
        stat.apply(&changes, now);
        let meta = stat.sealed_into(&c.meta);
        let n = Arc::new(Committed::new(catalog::reseal(&self.store, &c.entry, &meta, true)?)?);
        loaded.by_key.remove(&c.key());
        loaded.by_key.insert(n.key(), n.clone());
        let mut st = lock(&self.state);
        st.known.insert(meta.name.clone(), n.clone());
        // Writers opened meanwhile (or before) started from the old metadata: the change applies to them too.
        let current = st.tree.file(ino).and_then(|s| s.writer.clone());
        for w in writer.into_iter().chain(current.as_deref()) {
            lock(&w.stat).apply(&changes, now);
        }
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
    fn new(base: Option<Arc<Committed>>, spool: Option<Spool>, stat: Stat) -> Arc<Writer> {
        let dirty = spool.is_some();
        Arc::new(Writer {
            op: Mutex::new(WriterOp { base }),
            spool: RwLock::new(spool.map(Arc::new)),
            dirty: AtomicBool::new(dirty),
            unlinked: AtomicBool::new(false),
            writers: AtomicUsize::new(0),
            stat: Mutex::new(stat),
            kernel_times: AtomicBool::new(false),
        })
    }

    pub(super) fn spool(&self) -> Option<Arc<Spool>> {
        self.spool.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
