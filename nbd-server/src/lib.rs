//! nbd-server adapter (not yet implemented).
