//! Object names listed from a location (which anyone with access to it may have put there) and names given
//! by users: the parsers never panic.
#![no_main]

use blockframe::files::catalog;
use blockframe::format::{self, log, manifest, volume};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = format::catalog::parse_name(s);
    let _ = manifest::parse_manifest_name(s);
    let _ = log::parse_page_name(s);
    let _ = log::parse_stripe_name(s);
    let _ = log::parse_stripe_dir(s);
    let _ = volume::parse_shard_name(s);
    let _ = volume::parse_page_name(s);
    let _ = blockframe::store::parse_shard_dir(s);
    let _ = blockframe::store::parse_shard_name(s);
    let _ = catalog::validate_name(s);
});
