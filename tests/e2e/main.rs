//! End-to-end tests of the `bf` binary: real processes, real directories.

mod files;
mod mount;
mod nbd;
mod scrub;
mod util;
