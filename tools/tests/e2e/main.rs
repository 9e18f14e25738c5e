//! End-to-end tests of the `bf` binary: real processes, real directories.

mod files;
mod garage;
mod locations;
mod mount;
mod nbd;
mod nbd_tls;
mod network;
mod s3;
mod scrub;
mod serve;
mod systemd;
mod util;
