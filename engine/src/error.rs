//! The engine's typed errors. Each says what happened and, where it helps, what to do.

use std::io;
use std::path::PathBuf;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an engine call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No live record with this digest.
    #[error("record not found")]
    NotFound,
    /// A generation-checked write found another generation.
    #[error("generation mismatch: the record is at generation {actual}, the write required {required}")]
    Generation {
        /// What the policy required (equal to, or less than, this value).
        required: u16,
        /// The record's generation.
        actual: u16,
    },
    /// A create-only write found the record.
    #[error("record already exists")]
    RecordExists,
    /// The serialized record is larger than `max_record_bytes`.
    #[error("record of {size} bytes exceeds max_record_bytes ({max})")]
    RecordTooBig {
        /// Serialized size in bytes.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// A bin name is empty or longer than 15 bytes.
    #[error("bin name must be 1 to 15 bytes long, got {len}")]
    BinName {
        /// Length of the offending name.
        len: usize,
    },
    /// More bins than a record may hold.
    #[error("record has {count} bins, more than the {max} allowed")]
    TooManyBins {
        /// Bins in the write.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A set name is too long.
    #[error("set name of {len} bytes is longer than {max}")]
    SetName {
        /// Length of the offending name.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The namespace already has the maximum number of sets.
    #[error("namespace already has {max} sets; no more can be created")]
    TooManySets {
        /// The limit.
        max: usize,
    },
    /// An operation met a bin of a type it cannot work on.
    #[error("incompatible bin type: {0}")]
    BinIncompatible(String),
    /// A request parameter is out of range.
    #[error("invalid parameter: {0}")]
    Parameter(String),
    /// Too many concurrent writers kept changing the record; the write gave up.
    #[error("record is busy: concurrent writes kept changing it, try again")]
    KeyBusy,
    /// Free space is below the stop-writes threshold (or no free write block is left).
    #[error("device full: {0}")]
    DeviceFull(String),
    /// Write blocks are queued faster than the device absorbs them.
    #[error("device overload: {0}")]
    DeviceOverload(String),
    /// Bytes read from a device failed verification; nothing is returned.
    #[error("corrupt record on device {device} at offset {offset}: {detail}")]
    Corruption {
        /// Device path.
        device: String,
        /// Byte offset of the record.
        offset: u64,
        /// What failed.
        detail: String,
    },
    /// An operating-system I/O error.
    #[error("I/O error {context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another process (or another engine in this process) holds the device.
    #[error("device {} is in use by another process (it is locked exclusively)", path.display())]
    DeviceInUse {
        /// The device path.
        path: PathBuf,
    },
    /// A device cannot be used as configured (foreign content, mismatched set, too small...).
    #[error("device {}: {detail}", path.display())]
    Device {
        /// The device path.
        path: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A device write failed earlier; the engine refuses writes until it is reopened.
    #[error("device {device} failed and refuses writes until the engine is reopened: {reason}")]
    Failed {
        /// Device path.
        device: String,
        /// The first error.
        reason: String,
    },
    /// The engine is shutting down.
    #[error("the engine is shut down")]
    Shutdown,
    /// A background thread failed; the engine refuses every call until it is reopened.
    #[error("the engine stopped working and must be reopened: {0}")]
    Poisoned(String),
}

impl Error {
    /// Wraps an I/O error with what the engine was doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}
