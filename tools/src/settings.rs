//! Settings: `config.toml`, environment and flags, merged with precedence flags > env > config > defaults.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::cli::GlobalArgs;

/// Keys of `config.toml` (see `config.example.toml`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Store directory.
    pub archive_directory: Option<PathBuf>,
    /// Log level.
    pub log_level: Option<String>,
    /// Master key file.
    pub encryption_key_path: Option<PathBuf>,
    /// Segment size for new stores, MiB.
    pub segment_size_mb: Option<f64>,
    /// Data shards for new stores.
    pub data_shards: Option<u16>,
    /// Parity shards for new stores.
    pub parity_shards: Option<u16>,
    /// Locations for new stores (paths or URLs), and connection settings of object-store locations.
    pub locations: Option<Vec<LocationEntry>>,
    /// Shards of each stripe that must be stored for a write to succeed (k+1..=k+m; default k+1).
    pub min_shards_written: Option<usize>,
    /// Worker threads for commit and get.
    pub workers: Option<usize>,
    /// Stripe cache per served volume, MiB.
    pub volume_cache_mb: Option<usize>,
    /// Decrypted segment cache of `bf mount`, MiB.
    pub mount_cache_mb: Option<usize>,
    /// Scrub read throttle, MB/s.
    pub scrub_rate_mb: Option<f64>,
    /// Age in hours before scrub --repair deletes orphaned shards.
    pub orphan_grace_hours: Option<f64>,
    /// Local location I/O: auto, uring or std.
    pub io_engine: Option<String>,
}

/// One `locations` entry: a bare path or URL, or a `[[locations]]` table with connection settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LocationEntry {
    /// A path, `file:///path` or `s3://bucket/prefix`.
    Spec(String),
    /// An object-store location with endpoint, region and credentials.
    Table(blockframe::location::spec::S3Settings),
}

impl LocationEntry {
    /// The location spec.
    pub fn spec(&self) -> &str {
        match self {
            LocationEntry::Spec(s) => s,
            LocationEntry::Table(t) => &t.url,
        }
    }
}

/// Resolved settings.
#[derive(Debug)]
pub struct Settings {
    /// Store directory.
    pub store: PathBuf,
    /// Whether the store path is the built-in default (which is created on first use).
    pub store_is_default: bool,
    /// Explicit key file, if any (else the store's default).
    pub key_file: Option<PathBuf>,
    /// Log filter.
    pub log_level: String,
    /// Worker threads.
    pub workers: usize,
    /// The parsed config file.
    pub file: ConfigFile,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    env_path(var).or_else(|| env_path("HOME").map(|h| h.join(fallback)))
}

/// Default store directory: `$XDG_DATA_HOME/blockframe`, else `~/.local/share/blockframe`, else `./bf-data`.
pub fn default_store() -> PathBuf {
    xdg_dir("XDG_DATA_HOME", ".local/share").map(|d| d.join("blockframe")).unwrap_or_else(|| "bf-data".into())
}

fn load_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

impl Settings {
    /// Merges flags, environment, config file and defaults.
    pub fn resolve(g: &GlobalArgs) -> Result<Settings> {
        let config_path = g.config.clone().or_else(|| env_path("BF_CONFIG"));
        let file = match config_path {
            Some(p) => load_config(&p)?,
            None => match xdg_dir("XDG_CONFIG_HOME", ".config").map(|d| d.join("blockframe/config.toml")) {
                Some(p) if p.is_file() => load_config(&p)?,
                _ => ConfigFile::default(),
            },
        };
        let explicit_store =
            g.store.clone().or_else(|| env_path("BF_STORE")).or_else(|| file.archive_directory.clone());
        let store_is_default = explicit_store.is_none();
        let store = explicit_store.unwrap_or_else(default_store);
        let key_file =
            g.key_file.clone().or_else(|| env_path("BF_KEY_FILE")).or_else(|| file.encryption_key_path.clone());
        let log_level = g
            .log_level
            .clone()
            .or_else(|| std::env::var("BF_LOG").ok())
            .or_else(|| std::env::var("RUST_LOG").ok())
            .or_else(|| file.log_level.clone())
            .unwrap_or_else(|| "warn".into());
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let workers = g.workers.or(file.workers).unwrap_or(cpus.min(4)).max(1);
        let engine =
            std::env::var("BF_IO_ENGINE").ok().or_else(|| file.io_engine.clone()).unwrap_or_else(|| "auto".into());
        blockframe::location::IoEngine::set_default(blockframe::location::IoEngine::parse(&engine)?);
        let tables = file.locations.iter().flatten().filter_map(|l| match l {
            LocationEntry::Table(t) => Some(t.clone()),
            LocationEntry::Spec(_) => None,
        });
        blockframe::location::spec::configure(tables.collect());
        Ok(Settings { store, store_is_default, key_file, log_level, workers, file })
    }

    /// The key file to use for this store.
    pub fn key_path(&self) -> PathBuf {
        self.key_file.clone().unwrap_or_else(|| blockframe::store::Store::default_key_path(&self.store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_with_every_key() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config.example.toml")).unwrap();
        let c: ConfigFile = toml::from_str(&text).unwrap();
        assert!(c.archive_directory.is_some() && c.log_level.is_some() && c.encryption_key_path.is_some());
        assert!(c.segment_size_mb.is_some() && c.data_shards.is_some() && c.parity_shards.is_some());
        assert!(c.locations.is_some() && c.workers.is_some() && c.volume_cache_mb.is_some());
        assert!(c.mount_cache_mb.is_some());
        assert!(c.scrub_rate_mb.is_some() && c.orphan_grace_hours.is_some());
        assert!(c.io_engine.is_some() && c.min_shards_written.is_some());
        let locs = c.locations.unwrap();
        assert!(locs.iter().any(|l| l.spec().starts_with('/')));
        assert!(locs.iter().any(|l| matches!(l, LocationEntry::Table(t) if t.endpoint.is_some())));
    }

    #[test]
    fn location_tables_parse_and_keep_secrets_out_of_debug() {
        let text = r#"
            [[locations]]
            url = "s3://bkt/a"
            endpoint = "http://127.0.0.1:9001"
            access_key_id = "AKIDTEST"
            secret_access_key = "verysecretvalue"
            timeout_secs = 2

            [[locations]]
            url = "/mnt/disk2/bf"
        "#;
        let c: ConfigFile = toml::from_str(text).unwrap();
        let locs = c.locations.unwrap();
        assert_eq!(locs.iter().map(|l| l.spec()).collect::<Vec<_>>(), ["s3://bkt/a", "/mnt/disk2/bf"]);
        let dbg = format!("{locs:?}");
        assert!(!dbg.contains("verysecretvalue") && !dbg.contains("AKIDTEST"), "{dbg}");
        assert!(toml::from_str::<ConfigFile>("[[locations]]\nurl = \"s3://b\"\nsecret = \"x\"").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<ConfigFile>("segment_size = 3").is_err());
    }
}
