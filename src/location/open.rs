//! The factory: opens the backend a location spec names.

use std::path::Path;
use std::sync::Arc;

use super::s3::S3Location;
use super::spec::{self, LocationSpec};
use super::{LocalDir, Location};
use crate::error::Result;

/// Opens the location a spec names (see [`crate::location::spec`]); relative paths are inside `store_dir`. Object-store
/// locations take their connection settings from [`spec::configure`] and the environment.
pub fn open_location(store_dir: &Path, spec: &str) -> Result<Arc<dyn Location>> {
    match spec::parse(spec)? {
        LocationSpec::Local(p) => {
            let p = if p.is_absolute() { p } else { store_dir.join(p) };
            Ok(Arc::new(LocalDir::new(p)))
        }
        LocationSpec::S3(s) => {
            let table = spec::configured(&s.url);
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let cfg = spec::resolve_s3(&s, table.as_ref(), &env);
            Ok(Arc::new(S3Location::new(&cfg)?))
        }
    }
}
