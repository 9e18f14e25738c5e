//! Test support, compiled only for tests and with the `testing` feature: fault injection ([`fault`]), an
//! in-memory location and store ([`mem`]), the location conformance suite ([`conformance`]) and test data
//! ([`data`]).

pub mod conformance;
pub mod data;
pub mod fault;
pub mod mem;

pub use data::{files_under, test_bytes};
pub use mem::{mem_store, MemLocation, MemStore};
