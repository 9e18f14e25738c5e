//! Errors of the core library.
//!
//! Policy: every fallible function returns [`Error`]. Variants are things a caller can act on (a wrong key, a
//! missing name, data beyond repair) and carry the context where it was raised (which file, segment, shard,
//! location). Nothing a user or a disk can influence panics; only the `bf` binary turns these into one-line
//! messages and exit codes.

use std::path::PathBuf;

/// Result alias for the core library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed; `context` says what was being done and where.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (operation and path).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key does not match the store's key check value.
    #[error("wrong key: the key does not match this store")]
    WrongKey,
    /// An operation needs the encryption key but none is available.
    #[error("this operation needs the encryption key: {0}")]
    KeyRequired(String),
    /// No store exists at the given path.
    #[error("no BlockFrame store at {path}; create one with `bf init --store {path}`", path = .path.display())]
    NoStore {
        /// Where a store was expected.
        path: PathBuf,
    },
    /// A store already exists where one was to be created.
    #[error("a store already exists at {}", .0.display())]
    StoreExists(PathBuf),
    /// No committed file has this name or root.
    #[error("no file named {0:?} in the store")]
    NotFound(String),
    /// A file with this name is already committed.
    #[error("a file named {0:?} is already committed (use --replace to store a new version)")]
    AlreadyExists(String),
    /// An on-disk record failed its magic, version, checksum or field checks.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which record (shard header, manifest copy, ...), with its location.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Fewer than k good shards remain for a segment: the data cannot be rebuilt.
    #[error("{file}: segment {segment} is lost: {have} good shards of {need} needed (bad: {bad})")]
    TooManyLost {
        /// File name (or root when the name is not known).
        file: String,
        /// Segment index.
        segment: u64,
        /// Good shards found.
        have: usize,
        /// Shards needed (k).
        need: usize,
        /// Shards that were missing or corrupt, as `shard@location: reason`.
        bad: String,
    },
    /// Authenticated decryption failed although every shard matched its hash.
    #[error("{file}: segment {segment} failed authentication (tampered manifest or shards)")]
    Authentication {
        /// File name.
        file: String,
        /// Segment index.
        segment: u64,
    },
    /// Not enough locations accepted a write; `failures` says why each refusing location did.
    #[error("only {ok} of {need} locations accepted {what}: {}", describe_failures(.failures))]
    WriteQuorum {
        /// What was written.
        what: String,
        /// Locations that succeeded.
        ok: usize,
        /// Locations needed.
        need: usize,
        /// The locations that failed, with their errors.
        failures: Vec<LocationFailure>,
    },
    /// Too few locations could be read to be sure of having seen the newest copy of a replicated object.
    #[error("only {readable} of the {need} locations needed could be read for {what}: {}", describe_failures(.failures))]
    ReadQuorum {
        /// What was read.
        what: String,
        /// Locations read.
        readable: usize,
        /// Locations needed.
        need: usize,
        /// The locations that could not be read, with their errors.
        failures: Vec<LocationFailure>,
    },
    /// A location cannot be reached or refuses requests (network, timeouts, server errors, access denied).
    #[error("location {location} is unavailable: {reason}")]
    Unavailable {
        /// Location name (never with credentials).
        location: String,
        /// What failed.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An argument is invalid (a name, a size, a key of an object).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A byte range lies (partly) outside the object it addresses.
    #[error("range {offset}+{len} is beyond the end of {what} ({size} bytes)")]
    OutOfRange {
        /// What was addressed (a volume, a file).
        what: String,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the object.
        size: u64,
    },
    /// The object refuses writes (opened read-only, or turned read-only after a failed write-back).
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// Another process holds the object (a volume served by `bf nbd serve`, say).
    #[error("{0} is in use by another process")]
    InUse(String),
    /// A broken internal invariant (a panicked worker thread, a poisoned lock): a bug, never bad input.
    #[error("internal error: {0}")]
    Internal(String),
    /// A change failed in a way that leaves it unknown whether it took effect (a catalog record was written to
    /// some locations and could not be taken back from all of them): nothing it names may be deleted.
    #[error("{what} may or may not have been applied: {cause}")]
    OutcomeUnknown {
        /// The change.
        what: String,
        /// Why it failed.
        cause: Box<Error>,
    },
    /// A filesystem operation (the mount layer, [`crate::vfs`]) was refused; `kind` says why.
    #[error("{path}: {}", kind.describe())]
    Fs {
        /// Why, in the terms a filesystem adapter maps to an errno value.
        kind: FsErrorKind,
        /// The path (or handle) concerned.
        path: String,
    },
}

/// Filesystem error classes, platform-neutral: adapters (FUSE, later WinFSP) map them to their own codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsErrorKind {
    /// No such file or directory.
    NotFound,
    /// The name exists already.
    AlreadyExists,
    /// A path component is not a directory.
    NotADirectory,
    /// A directory was used where a file is needed.
    IsADirectory,
    /// The directory is not empty.
    DirectoryNotEmpty,
    /// The mount is read-only.
    ReadOnly,
    /// A name or argument is invalid (empty, `.`/`..`, not UTF-8, moving a directory into itself).
    InvalidArgument,
    /// A name is too long.
    NameTooLong,
    /// Unknown or closed handle, or a handle opened without the needed access.
    BadHandle,
    /// Too many open handles.
    TooManyOpenFiles,
    /// A disk is full.
    NoSpace,
    /// A size or offset beyond the largest file the mount keeps.
    FileTooLarge,
    /// The operation is not supported by the store.
    Unsupported,
    /// A kind of node the store does not keep (hard links, device nodes, FIFOs, sockets): EPERM, as
    /// link(2) and mknod(2) document for filesystems without them.
    NotPermitted,
    /// A symbolic link where a file is needed (opening a link itself).
    SymlinkLoop,
    /// Anything else: an I/O failure or data that cannot be read back verified (never wrong bytes).
    Io,
}

impl FsErrorKind {
    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            FsErrorKind::NotFound => "no such file or directory",
            FsErrorKind::AlreadyExists => "already exists",
            FsErrorKind::NotADirectory => "not a directory",
            FsErrorKind::IsADirectory => "is a directory",
            FsErrorKind::DirectoryNotEmpty => "directory not empty",
            FsErrorKind::ReadOnly => "read-only mount",
            FsErrorKind::InvalidArgument => "invalid argument",
            FsErrorKind::NameTooLong => "name too long",
            FsErrorKind::BadHandle => "bad file handle",
            FsErrorKind::TooManyOpenFiles => "too many open files",
            FsErrorKind::NoSpace => "no space left on a location",
            FsErrorKind::FileTooLarge => "file too large",
            FsErrorKind::Unsupported => "operation not supported",
            FsErrorKind::NotPermitted => "operation not permitted (hard links, device nodes and FIFOs are not kept)",
            FsErrorKind::SymlinkLoop => "is a symbolic link",
            FsErrorKind::Io => "input/output error",
        }
    }
}

impl Error {
    /// Wraps an [`std::io::Error`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// Builds a [`Error::Corrupt`].
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into(), detail: detail.into() }
    }

    /// Builds an [`Error::Fs`].
    pub fn fs(kind: FsErrorKind, path: impl Into<String>) -> Self {
        Error::Fs { kind, path: path.into() }
    }

    /// The class of this error, for adapters that map errors to codes (errno values, exit codes) without
    /// looking at text. A failed write takes the class of its locations' failures: no space when any location
    /// was full, read-only when any refused writes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => io_kind(source),
            Error::WrongKey | Error::KeyRequired(_) => ErrorKind::Key,
            Error::NoStore { .. } | Error::NotFound(_) => ErrorKind::NotFound,
            Error::StoreExists(_) | Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Corrupt { .. } | Error::Authentication { .. } => ErrorKind::Corrupt,
            Error::TooManyLost { .. } => ErrorKind::DataLost,
            Error::WriteQuorum { failures, .. } => {
                let kinds: Vec<ErrorKind> = failures.iter().map(|f| f.error.kind()).collect();
                [ErrorKind::NoSpace, ErrorKind::ReadOnly]
                    .into_iter()
                    .find(|k| kinds.contains(k))
                    .unwrap_or(ErrorKind::Unavailable)
            }
            Error::Unavailable { .. } | Error::ReadQuorum { .. } => ErrorKind::Unavailable,
            Error::Config(_) => ErrorKind::Config,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::ReadOnly(_) => ErrorKind::ReadOnly,
            Error::InUse(_) => ErrorKind::InUse,
            Error::Internal(_) => ErrorKind::Internal,
            Error::OutcomeUnknown { cause, .. } => cause.kind(),
            Error::Fs { kind, .. } => match kind {
                FsErrorKind::NotFound => ErrorKind::NotFound,
                FsErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                FsErrorKind::ReadOnly => ErrorKind::ReadOnly,
                FsErrorKind::NoSpace => ErrorKind::NoSpace,
                FsErrorKind::InvalidArgument | FsErrorKind::NameTooLong => ErrorKind::InvalidArgument,
                _ => ErrorKind::Io,
            },
        }
    }

    /// The filesystem class of this error (what a mount reports to the application).
    pub fn fs_kind(&self) -> FsErrorKind {
        if let Error::Fs { kind, .. } = self {
            return *kind;
        }
        match self.kind() {
            ErrorKind::NotFound => FsErrorKind::NotFound,
            ErrorKind::AlreadyExists => FsErrorKind::AlreadyExists,
            ErrorKind::NoSpace => FsErrorKind::NoSpace,
            ErrorKind::ReadOnly => FsErrorKind::ReadOnly,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => FsErrorKind::InvalidArgument,
            _ => FsErrorKind::Io,
        }
    }

    /// Builds an [`Error::WriteQuorum`].
    pub fn write_quorum(what: impl Into<String>, ok: usize, need: usize, failures: Vec<LocationFailure>) -> Self {
        Error::WriteQuorum { what: what.into(), ok, need, failures }
    }

    /// Builds an [`Error::Internal`].
    pub fn internal(what: impl Into<String>) -> Self {
        Error::Internal(what.into())
    }

    /// The error a location returns for an object that does not exist (`what` names the object and where).
    pub fn object_not_found(what: impl Into<String>) -> Error {
        Error::io(what.into(), std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"))
    }

    /// The error a location returns when a create-only put ([`crate::location::Location::put_new`]) finds an
    /// object under its key already (`what` names the object and where); its [`Error::kind`] is
    /// [`ErrorKind::AlreadyExists`].
    pub fn already_exists_object(what: impl Into<String>) -> Error {
        Error::io(what.into(), std::io::Error::new(std::io::ErrorKind::AlreadyExists, "object already exists"))
    }

    /// True when the error means "the object does not exist" (as opposed to "is damaged").
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Error classes that adapters map to their own codes (see [`Error::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Something named does not exist.
    NotFound,
    /// Something to be created exists.
    AlreadyExists,
    /// A disk or location is full.
    NoSpace,
    /// Writes are refused.
    ReadOnly,
    /// A bad argument.
    InvalidArgument,
    /// A range beyond the end of its object.
    OutOfRange,
    /// Held by another process.
    InUse,
    /// A wrong or missing key.
    Key,
    /// A record or shard failed its checks.
    Corrupt,
    /// Data beyond repair.
    DataLost,
    /// A location cannot be reached, or too few accepted a write.
    Unavailable,
    /// Invalid configuration.
    Config,
    /// An internal invariant broke.
    Internal,
    /// Any other I/O failure.
    Io,
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => return ErrorKind::NoSpace,
        Some(libc::EROFS) => return ErrorKind::ReadOnly,
        _ => {}
    }
    match e.kind() {
        K::NotFound => ErrorKind::NotFound,
        K::AlreadyExists => ErrorKind::AlreadyExists,
        K::StorageFull | K::QuotaExceeded => ErrorKind::NoSpace,
        K::ReadOnlyFilesystem => ErrorKind::ReadOnly,
        K::InvalidInput => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    }
}

/// One location's failure within a replicated or striped write.
#[derive(Debug)]
pub struct LocationFailure {
    /// The location's name.
    pub location: String,
    /// Why it failed.
    pub error: Error,
}

impl LocationFailure {
    /// `error` on `location`.
    pub fn new(location: impl Into<String>, error: Error) -> Self {
        LocationFailure { location: location.into(), error }
    }
}

fn describe_failures(failures: &[LocationFailure]) -> String {
    if failures.is_empty() {
        return "no writable location".into();
    }
    failures.iter().map(|f| format!("{}: {}", f.location, f.error)).collect::<Vec<_>>().join("; ")
}

/// Adds context to `std::io::Result`s.
pub trait IoContext<T> {
    /// Wraps the error with a lazily built context string.
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(code: i32) -> Error {
        Error::io("writing x", std::io::Error::from_raw_os_error(code))
    }

    #[test]
    fn kinds_come_from_structure_not_text() {
        assert_eq!(io(libc::ENOSPC).kind(), ErrorKind::NoSpace);
        assert_eq!(io(libc::EROFS).kind(), ErrorKind::ReadOnly);
        assert_eq!(io(libc::ENOENT).kind(), ErrorKind::NotFound);
        assert_eq!(io(libc::EIO).kind(), ErrorKind::Io);
        let full = Error::write_quorum(
            "stripe 3",
            3,
            5,
            vec![LocationFailure::new("a", io(libc::EIO)), LocationFailure::new("b", io(libc::ENOSPC))],
        );
        assert_eq!(full.kind(), ErrorKind::NoSpace);
        assert_eq!(full.fs_kind(), FsErrorKind::NoSpace);
        let msg = full.to_string();
        assert!(msg.contains("only 3 of 5") && msg.contains("a: writing x") && msg.contains("b: writing x"), "{msg}");
        let rofs = Error::write_quorum("x", 0, 1, vec![LocationFailure::new("a", io(libc::EROFS))]);
        assert_eq!(rofs.kind(), ErrorKind::ReadOnly);
        assert_eq!(Error::write_quorum("x", 0, 1, vec![]).kind(), ErrorKind::Unavailable);
        let range = Error::OutOfRange { what: "volume v".into(), offset: 10, len: 5, size: 12 };
        assert_eq!(range.kind(), ErrorKind::OutOfRange);
        assert_eq!(range.fs_kind(), FsErrorKind::InvalidArgument);
        assert_eq!(Error::ReadOnly("volume v".into()).kind(), ErrorKind::ReadOnly);
        assert_eq!(Error::internal("poisoned").kind(), ErrorKind::Internal);
        assert_eq!(io(libc::EEXIST).kind(), ErrorKind::AlreadyExists);
        assert_eq!(Error::already_exists_object("m: k").kind(), ErrorKind::AlreadyExists);
        assert_eq!(Error::already_exists_object("m: k").fs_kind(), FsErrorKind::AlreadyExists);
    }
}
