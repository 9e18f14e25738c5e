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
    /// Not enough locations accepted a write.
    #[error("only {ok} of {need} locations accepted {what}: {detail}")]
    WriteQuorum {
        /// What was written.
        what: String,
        /// Locations that succeeded.
        ok: usize,
        /// Locations needed.
        need: usize,
        /// The failures.
        detail: String,
    },
    /// A location cannot be reached or refuses requests (network, timeouts, server errors, access denied).
    #[error("location {location} is unavailable: {reason}")]
    Unavailable {
        /// Location name (never with credentials).
        location: String,
        /// What failed.
        reason: String,
    },
    /// A configuration value or argument is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    /// The operation is not supported by the store.
    Unsupported,
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
            FsErrorKind::Unsupported => "operation not supported",
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

    /// The filesystem class of this error (what a mount reports to the application).
    pub fn fs_kind(&self) -> FsErrorKind {
        match self {
            Error::Fs { kind, .. } => *kind,
            Error::NotFound(_) => FsErrorKind::NotFound,
            Error::AlreadyExists(_) => FsErrorKind::AlreadyExists,
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => FsErrorKind::NotFound,
                std::io::ErrorKind::StorageFull => FsErrorKind::NoSpace,
                std::io::ErrorKind::ReadOnlyFilesystem => FsErrorKind::ReadOnly,
                _ => FsErrorKind::Io,
            },
            Error::WriteQuorum { detail, .. } if detail.contains("No space left") => FsErrorKind::NoSpace,
            _ => FsErrorKind::Io,
        }
    }

    /// The error a location returns for an object that does not exist (`what` names the object and where).
    pub fn object_not_found(what: impl Into<String>) -> Error {
        Error::io(what.into(), std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"))
    }

    /// True when the error means "the object does not exist" (as opposed to "is damaged").
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
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
