//! End-to-end tests of the `bf` binary.
