//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// BlockFrame: keeps files safe on disks it does not trust. Files are encrypted (AES-256-GCM), cut into
/// segments, erasure-coded into k data + m parity shards spread over several locations, and every shard is
/// hashed into a BLAKE3 Merkle tree, so any m lost or corrupted locations lose nothing.
#[derive(Parser, Debug)]
#[command(name = "bf", version, propagate_version = true)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Store directory [env: BF_STORE; config: archive_directory; default: $XDG_DATA_HOME/blockframe or
    /// ~/.local/share/blockframe]
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Configuration file [env: BF_CONFIG; default: $XDG_CONFIG_HOME/blockframe/config.toml if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Master key file [env: BF_KEY_FILE; config: encryption_key_path; default: <store>/master.key]
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace [env: BF_LOG or RUST_LOG; config: log_level; default: warn]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Worker threads for commit and get [config: workers; default: number of CPUs, at most 4]
    #[arg(long, global = true, value_name = "N")]
    pub workers: Option<usize>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new store with its locations and key.
    Init(InitArgs),
    /// Store files (encrypt, erasure-code, distribute). Prints each file's Merkle root.
    Commit(CommitArgs),
    /// Rebuild a committed file byte-exact, repairing around missing or corrupt shards.
    Get(GetArgs),
    /// List committed files with size, segments, root and health.
    Ls(LsArgs),
    /// Remove committed files: all in one catalog record, then their shards (mostly empty packs are compacted).
    Rm(RmArgs),
    /// Check every shard of files against their Merkle roots without writing output. Needs no key when
    /// files are named by root.
    Verify(VerifyArgs),
    /// Mount the store as a filesystem (FUSE): committed files appear under their names; files written there
    /// are committed when closed. Unmount with `bf umount DIR`, `fusermount3 -u DIR`, or SIGINT/SIGTERM.
    Mount(MountArgs),
    /// Unmount a filesystem mounted with `bf mount`.
    Umount(UmountArgs),
    /// Read and check every shard and manifest copy (no key needed); with --repair rebuild what is bad.
    /// Exit status: 0 healthy, 3 damage found (repaired with --repair: a second scrub then returns 0),
    /// 4 data lost.
    Scrub(ScrubArgs),
    /// Show the store, its locations, the last scrub's result and the data at risk.
    Status(StatusArgs),
    /// Rebuild a lost or damaged store descriptor (store.bf) from the locations and the key file.
    Recover(RecoverArgs),
    /// Files whose shards are whole but that no catalog entry names (scrub reports them as data lost and never
    /// deletes them): list them, restore them as lost+found/<file id> (needs the key), or discard them.
    LostFound(LostFoundArgs),
    /// Show or replace the store's locations (directories and object stores).
    #[command(subcommand)]
    Location(LocationCommand),
    /// Move every shard to its home location under the current list of locations (after `bf location add`,
    /// or shards a repair put elsewhere while their home was away). No key needed; safe beside commits, the
    /// mount and the NBD server; resumable. Exit status 3 when some shard could not be moved.
    Rebalance(RebalanceArgs),
    /// Manage block volumes (virtual disks served over NBD).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Serve volumes as network block devices.
    #[command(subcommand)]
    Nbd(NbdCommand),
    /// Serve the store's files over HTTP (GET/HEAD with byte ranges, directory listings, bearer tokens,
    /// TLS) until SIGINT/SIGTERM; `bf serve token new` makes an access token.
    Serve(HttpServeArgs),
}

/// `bf serve`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HttpServeArgs {
    /// Token management instead of serving.
    #[command(subcommand)]
    pub action: Option<HttpServeAction>,
    /// TCP address to listen on; without --token-file only a loopback address is allowed (or --insecure)
    /// [default: 127.0.0.1:8080]. Under systemd socket activation (LISTEN_FDS, LISTEN_PID) the TCP socket passed
    /// as fd 3 is used instead.
    #[arg(long)]
    pub listen: Option<String>,
    /// TLS certificate chain (PEM); needs --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Clients must present a TLS certificate signed by a CA in this PEM file (client certificate
    /// authentication; needs --tls-cert); with --token-file too, they need both
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Clients must send one of these tokens: a file of `blake3:<hex>` lines (`bf serve token new` prints one)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback address without tokens (anyone who can reach it can read every file)
    #[arg(long)]
    pub insecure: bool,
    /// Serve read-only (the default)
    #[arg(long, conflicts_with = "writable")]
    pub read_only: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (no authentication: loopback only unless --insecure)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Also serve PUT (commit the body as the file, all-or-nothing, replacing one of that name) and DELETE
    #[arg(long)]
    pub writable: bool,
    /// Most client connections at once; one over the limit is closed at once (and logged)
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and to finish a TLS handshake), e.g. 30s
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub header_timeout: String,
    /// Close a connection on which nothing moved for this long (idle keep-alive, a client that stopped
    /// reading), e.g. 2m
    #[arg(long, value_name = "DURATION", default_value = "2m")]
    pub idle_timeout: String,
    /// Most segment buffers (about 1.3 segment sizes each) in use across all requests; more requests wait
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub segment_buffers: usize,
}

/// `bf serve ...` subcommands.
#[derive(Subcommand, Debug)]
pub enum HttpServeAction {
    /// Access tokens for `bf serve --token-file`.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `bf serve token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a new random token: prints the token (give it to the client) and its hash line (for the tokens
    /// file); with --add-to, appends the hash line to that file and prints only the token.
    New {
        /// Append the hash line to this tokens file (created with mode 0600 if missing).
        #[arg(long, value_name = "FILE")]
        add_to: Option<PathBuf>,
    },
}

/// `bf location ...`.
#[derive(Subcommand, Debug)]
pub enum LocationCommand {
    /// List the locations with their state (reachable, marker, unavailable).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put a location into a failure domain (a machine, rack or site it shares with others), so that `bf status`
    /// reports how many domains may be lost; an empty ZONE takes it out of any.
    Zone {
        /// The location: its spec as `bf location ls` shows it, or its number.
        location: String,
        /// The zone name (at most 64 characters).
        zone: String,
    },
    /// Add a new, empty location: shards are moved onto it by a rebalance, then a repairing scrub writes the
    /// copies of replicated objects (manifests, catalog, volume metadata) it lacks. No other bf process may have
    /// the store open while the location list changes; the rebalance and the scrub may run beside anything.
    Add {
        /// The new location: a directory, file:///path or s3://bucket/prefix.
        location: String,
        /// Its failure domain (machine, rack, site).
        #[arg(long, value_name = "ZONE", default_value = "")]
        zone: String,
        /// Only add it; run `bf rebalance` and `bf scrub --repair` later.
        #[arg(long)]
        no_rebalance: bool,
        #[command(flatten)]
        moves: MoveArgs,
    },
    /// Remove a location after draining it: it stops receiving anything new, every shard it holds moves to its
    /// home elsewhere, a repairing scrub restores every copy of replicated objects on the others, and only then
    /// is it forgotten. Resumable: run it again after an interruption.
    Remove {
        /// The location: its spec as `bf location ls` shows it, or its number.
        location: String,
        #[command(flatten)]
        moves: MoveArgs,
    },
    /// Replace a lost or retired location by a new, empty one and rebuild onto it everything the old one held
    /// (a repairing scrub; no key needed).
    Replace {
        /// The location to replace: its spec as `bf location ls` shows it, or its number.
        old: String,
        /// The new location: a directory, file:///path or s3://bucket/prefix.
        new: String,
        /// Only switch the descriptor to the new location; run `bf scrub --repair` later.
        #[arg(long)]
        no_repair: bool,
        /// Print the repair report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How shards are moved (`bf rebalance`, `bf location add` and `remove`).
#[derive(Args, Debug, Clone)]
pub struct MoveArgs {
    /// Move at most this many MB of shards per second
    #[arg(long, value_name = "MB_PER_SEC")]
    pub rate: Option<f64>,
    /// Shards moved in parallel
    #[arg(long = "movers", value_name = "N", default_value_t = 4)]
    pub movers: usize,
    /// Print the reports as JSON
    #[arg(long)]
    pub json: bool,
}

/// `bf rebalance`.
#[derive(Args, Debug)]
pub struct RebalanceArgs {
    /// Only count the shards that are away from their home
    #[arg(long)]
    pub dry_run: bool,
    /// First reorder the locations so each stripe's shards span as many zones as possible (after zones were
    /// set with `bf location zone`; no other bf process may have the store open), then move shards to match
    #[arg(long, conflicts_with = "dry_run")]
    pub spread_zones: bool,
    #[command(flatten)]
    pub moves: MoveArgs,
}

/// `bf volume ...`.
#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a thin-provisioned volume (nothing is stored until written).
    Create {
        /// Volume name (the NBD export name).
        name: String,
        /// Size, e.g. 20G, 512M (a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// Most data per log stripe (a multiple of 4K, at most 64M; a FLUSH seals shorter ones) [default: 4M]
        #[arg(long)]
        stripe_size: Option<String>,
    },
    /// List volumes.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and all its data.
    Rm {
        /// Volume name.
        name: String,
    },
}

/// `bf nbd ...`.
#[derive(Subcommand, Debug)]
pub enum NbdCommand {
    /// Serve volumes over NBD until SIGINT/SIGTERM (then in-flight requests finish and everything is flushed).
    Serve(ServeArgs),
}

/// `bf nbd serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Serve only this volume (also the default export) [default: every volume]
    #[arg(long)]
    pub volume: Option<String>,
    /// TCP address to listen on (NBD has no authentication without TLS) [default: 127.0.0.1:10809]. Under
    /// systemd socket activation (LISTEN_FDS, LISTEN_PID) the socket passed as fd 3 is used instead.
    #[arg(long, conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Listen on a Unix socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Cache per volume in MiB (map pages and stripe records) [config: volume_cache_mb; default 64]
    #[arg(long)]
    pub cache_mb: Option<usize>,
    /// Close a connection that has not chosen an export this long after connecting, TLS handshake included
    /// (e.g. 30s, 2m)
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub handshake_timeout: String,
    /// Close a connection that sent no request for this long while none of its requests was in flight
    /// [default: never, as qemu keeps its connection open however long the guest leaves the disk alone]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Most client connections at once; a connection over the limit is closed at once (and logged)
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_connections: usize,
    /// TLS (NBD_OPT_STARTTLS), as nbdkit: off; on (clients choose); require (plaintext clients are refused)
    #[arg(long, value_enum, default_value_t = TlsArg::Off)]
    pub tls: TlsArg,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (nbdkit's and qemu's layout; an optional
    /// ca-crl.pem revokes client certificates); needed with --tls on/require
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Clients must present a certificate signed by the CA in ca-cert.pem (client authentication)
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (requests, bytes, latencies, connections; no
    /// authentication, so a loopback address only)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// `bf nbd serve --tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsArg {
    /// No TLS: STARTTLS is refused.
    Off,
    /// TLS for clients that ask for it; plaintext clients are served too.
    On,
    /// Only TLS clients are served.
    Require,
}

/// `bf init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Data shards per segment (k) [config: data_shards; default 4]
    #[arg(long, short = 'k')]
    pub data_shards: Option<u16>,
    /// Parity shards per segment (m): how many locations may be lost [config: parity_shards; default 2]
    #[arg(long, short = 'm')]
    pub parity_shards: Option<u16>,
    /// Segment size in MiB (fractions allowed, at least 0.0625 = 64 KiB) [config: segment_size_mb; default 32]
    #[arg(long)]
    pub segment_size_mb: Option<f64>,
    /// A location: a directory, file:///path or s3://bucket/prefix (repeat for each disk or object store; at
    /// least k+m for full protection) [config: locations; default: k+m directories inside the store]
    #[arg(long = "location", value_name = "LOCATION")]
    pub locations: Vec<String>,
    /// The failure domain (machine, rack, site) of each --location, in the same order: one per location, or
    /// none. The locations are then ordered so that each segment's shards fall into as many zones as possible.
    #[arg(long = "zone", value_name = "ZONE")]
    pub zones: Vec<String>,
    /// Derive the key from a passphrase (Argon2id) instead of writing a key file; read from BF_PASSPHRASE or
    /// asked for on the terminal.
    #[arg(long)]
    pub passphrase: bool,
}

/// `bf commit`.
#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Files to store (`-` reads standard input and needs --name). With -r, directories are walked.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Name in the store (only with a single input) [default: the path as given, or its file name if absolute]
    #[arg(long)]
    pub name: Option<String>,
    /// Commit directories recursively, keeping relative paths as names.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Replace an existing file of the same name (the old version is removed after the new one is stored).
    #[arg(long)]
    pub replace: bool,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

/// `bf get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// Name or Merkle root (64 hex digits) of the file.
    pub name: String,
    /// Output path (`-` for standard output) [default: the file name in the current directory]
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Overwrite the output if it exists.
    #[arg(short, long)]
    pub force: bool,
}

/// `bf ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bf rm`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// Names or roots to remove.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `bf verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Names or roots to check [default: every file]
    pub names: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bf mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// Mount point: an existing empty directory.
    pub dir: PathBuf,
    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (logging to stderr) until unmounted; without it `bf mount` returns once the
    /// filesystem is mounted and the server logs to <store>/mount.log.
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Let other users access the mount (non-root mounts need user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Decrypted segment cache in MiB [config: mount_cache_mb; default 128]
    #[arg(long)]
    pub cache_mb: Option<usize>,
    /// Make every write wait for the server instead of letting the kernel cache writes (FUSE writeback cache,
    /// on by default: the kernel sends cached writes on before a close or fsync returns).
    #[arg(long)]
    pub no_writeback_cache: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (segment cache hits and misses, segments decoded; no
    /// authentication, so a loopback address only)
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// `bf umount`.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Mount point.
    pub dir: PathBuf,
}

/// `bf scrub`.
#[derive(Args, Debug)]
pub struct ScrubArgs {
    /// Names or roots of the files to check [default: every file, and orphaned shards]
    pub names: Vec<String>,
    /// Rebuild bad or missing shards and manifest copies (each rebuilt shard is checked against its Merkle
    /// leaf before it is written) and delete orphaned shards older than the grace period.
    #[arg(long)]
    pub repair: bool,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
    /// Read at most this many MB of shards per second [config: scrub_rate_mb; default: unlimited]
    #[arg(long, value_name = "MB/s")]
    pub rate: Option<f64>,
    /// Continue an interrupted scrub where it stopped (a full scrub when none was interrupted).
    #[arg(long)]
    pub resume: bool,
    /// Stop after the file during which this much time has passed (e.g. 2h); continue with --resume.
    #[arg(long, value_name = "DURATION")]
    pub max_duration: Option<String>,
    /// Keep running: scrub (resuming an interrupted run), sleep --interval, repeat.
    #[arg(long)]
    pub watch: bool,
    /// Pause between scrubs with --watch (s, m, h, d or w suffix).
    #[arg(long, value_name = "DURATION", default_value = "7d")]
    pub interval: String,
    /// Orphaned shards younger than this are never deleted, so a commit in progress is not touched
    /// [config: orphan_grace_hours; default: 24]
    #[arg(long, value_name = "HOURS")]
    pub orphan_grace_hours: Option<f64>,
}

/// `bf status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `bf lost-found`.
#[derive(Args, Debug)]
pub struct LostFoundArgs {
    /// Publish every restorable one again, as lost+found/<file id> (one catalog record)
    #[arg(long, conflicts_with = "discard")]
    pub restore: bool,
    /// Delete the shards of this lost file for good (repeatable)
    #[arg(long, value_name = "FILE_ID")]
    pub discard: Vec<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// `bf recover`.
#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// Every location of the store (directories, file:///path or s3://bucket/prefix), in any order (an empty
    /// directory or bucket for each lost one).
    #[arg(long = "location", value_name = "LOCATION", required = true)]
    pub locations: Vec<String>,
    /// Data shards, only needed when no manifest is left.
    #[arg(long, short = 'k')]
    pub data_shards: Option<u16>,
    /// Parity shards, only needed when no manifest is left.
    #[arg(long, short = 'm')]
    pub parity_shards: Option<u16>,
    /// Segment size in MiB, only needed when no manifest is left.
    #[arg(long)]
    pub segment_size_mb: Option<f64>,
}
