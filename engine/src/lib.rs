//! Peregrine's storage engine: one namespace's records, kept log-structured on raw devices
//! (block devices or preallocated files) through io_uring, located by the RAM primary index.
//!
//! Architecture invariant: the engine knows nothing of Raft or of the wire protocol. It exposes
//! record versions (generation, last-update time) so a replication layer can apply a version
//! decided elsewhere identically on every replica.

pub mod completion;
pub mod error;
pub mod format;
pub mod io;
pub mod record;
