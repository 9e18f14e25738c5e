//! End-to-end tests of the `bf` binary: real processes, real directories.

mod files;
mod mount;
mod nbd;
mod s3;
mod scrub;
mod util;
