//! BlockFrame core.
