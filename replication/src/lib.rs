//! Peregrine's replication layer. Today it holds the shared Raft log ([`log`]): one log per
//! node that every Raft group appends to, group-committed, with per-group openraft storage
//! views. The Raft groups, the engine as state machine and snapshots come next (issue 10).
//!
//! Architecture invariant: all log bytes reach a device through the engine's `DeviceIo` seam
//! (`peregrine_engine::io`), so the same code runs on io_uring, the blocking pool and the
//! simulated device used by the crash tests.

pub mod log;
