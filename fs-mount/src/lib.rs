//! fs-mount adapter (not yet implemented).
