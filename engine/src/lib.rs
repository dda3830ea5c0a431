//! Peregrine's storage engine: one namespace's records, kept log-structured on raw devices
//! (block devices or preallocated files) through io_uring, located by the RAM primary index.
//!
//! Architecture invariant: the engine knows nothing of Raft or of the wire protocol. It exposes
//! record versions (generation, last-update time) so a replication layer can apply a version
//! decided elsewhere identically on every replica.

pub mod affinity;
pub mod blocks;
pub mod clock;
pub mod completion;
pub mod config;
pub mod defrag;
pub mod device;
mod engine;
pub mod error;
pub mod format;
pub mod io;
mod maintenance;
mod ops;
pub mod policy;
mod read;
pub mod record;
pub mod recovery;
mod sets;
pub mod writer;

pub use config::{DeviceSpec, EngineConfig};
pub use engine::{DeviceStats, Engine, EngineStats, device_for};
pub use error::{Error, Result};
pub use ops::{Applied, Change, Existing, TTL_SECONDS_MAX};
pub use peregrine_index::{Digest, Entry, KeyRef, PartitionId};
pub use policy::{BinSelection, GenerationPolicy, RecordExists, Ttl, WritePolicy};
pub use record::{Bin, BinName, Record, RecordMeta, RecordVersion, StoredKey, Value};
