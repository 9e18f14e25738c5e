//! Files: committing a stream as an encrypted, erasure-coded file ([`commit`]), the catalog of committed files
//! ([`catalog`]), reading and verifying them ([`read`]) and their quick health ([`health`]).

pub mod catalog;
pub mod catalog_log;
pub mod commit;
pub mod compact;
pub mod health;
pub mod intent;
pub mod lost_found;
pub mod pack;
pub mod read;
pub mod session;

#[cfg(test)]
mod crash_points;
#[cfg(test)]
mod tests;
