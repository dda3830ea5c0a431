//! Peregrine's storage engine: one namespace's records, kept log-structured on raw devices
//! (block devices or preallocated files) through io_uring, located by the RAM primary index.
//!
//! Architecture invariant: the engine knows nothing of Raft or of the wire protocol. It exposes
//! what a replication layer needs to use it as a state machine: writes in two steps (prepare a
//! version, apply it), a monotonic replica apply, a durability barrier, per-partition values and
//! truncation in a durable metadata region, snapshot cursors, and expiry/eviction candidates.
//!
//! Module map (no cycles): `engine` opens and closes a [`Store`](store) and owns the background
//! threads; `ops`, `write`, `snapshot`, `truncate` and `read` are the record operations on an
//! open engine; `store` is the shared state and the one commit path; `writer`, `blocks` and
//! `defrag` are a device's write path and space; `scan` and `recovery` read what a device holds;
//! `metadata` keeps the metadata region; `format` is every on-device layout.

pub mod affinity;
mod blocks;
pub mod clock;
pub mod completion;
pub mod config;
mod defrag;
mod device;
mod engine;
pub mod error;
pub mod format;
mod geometry;
pub mod io;
mod maintenance;
mod metadata;
mod ops;
mod poison;
pub mod policy;
mod read;
pub mod record;
pub mod recovery;
pub mod scan;
mod sets;
pub mod snapshot;
mod store;
mod truncate;
mod write;
mod writer;

pub use blocks::BlockCounts;
pub use config::{DeviceSpec, EngineConfig, MaintenanceMode, WriterConfig};
pub use engine::{DeviceStats, Engine, EngineStats};
pub use error::{Error, Result};
pub use geometry::{Geometry, device_for};
pub use ops::{Applied, Change, Existing, TTL_SECONDS_MAX};
pub use peregrine_index::{Digest, Entry, KeyRef, PartitionId};
pub use policy::{BinSelection, GenerationPolicy, RecordExists, Ttl, WritePolicy};
pub use record::{Bin, BinName, Record, RecordMeta, RecordVersion, StoredKey, Value};
pub use snapshot::SnapshotCursor;
pub use write::{ApplyOutcome, Current, CurrentRead, Durability, Prepared};
