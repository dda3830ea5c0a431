//! Peregrine's replication layer: the shared Raft log ([`log`]): one log per node that every
//! Raft group appends to, group-committed, with per-group openraft storage views; the type
//! configuration and log payloads of the partition groups ([`types`]); and the engine as the
//! state machine of one partition group ([`state_machine`]), snapshots included. The group
//! runtime (placement, hibernation, the transport) comes next (issue 10).
//!
//! Architecture invariant: all log bytes reach a device through the engine's `DeviceIo` seam
//! (`peregrine_engine::io`), so the same code runs on io_uring, the blocking pool and the
//! simulated device used by the crash tests.

pub mod control;
pub mod fabric;
pub mod group;
pub mod hibernate;
pub mod liveness;
pub mod log;
pub mod loopback;
pub mod node;
pub mod placement;
pub mod snapshot_transfer;
pub mod state_machine;
pub mod types;

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod hibernate_tests;
#[cfg(test)]
mod node_tests;
#[cfg(test)]
mod random_tests;
#[cfg(test)]
mod sm_tests;
