//! Protocol constants: message types, flag bits, field and op types, particle types and result
//! codes, as the official clients use them (see `docs/` and the wire reference).

/// Protocol version in every frame header.
pub const PROTO_VERSION: u8 = 2;
/// Frame header size.
pub const PROTO_HEADER_BYTES: usize = 8;
/// AS_MSG header size.
pub const MSG_HEADER_BYTES: usize = 22;
/// Largest body the protocol can express (the 48-bit size field is capped here by Aerospike).
pub const PROTO_BODY_BYTES_MAX: u64 = 128 * 1024 * 1024;

/// Message types (byte 1 of the frame header).
pub mod msg_type {
    /// Info commands (text).
    pub const INFO: u8 = 1;
    /// Security / admin.
    pub const ADMIN: u8 = 2;
    /// AS_MSG.
    pub const MESSAGE: u8 = 3;
    /// zlib-compressed AS_MSG.
    pub const COMPRESSED: u8 = 4;
}

/// info1 bits.
pub mod info1 {
    /// Read.
    pub const READ: u8 = 0x01;
    /// Read all bins.
    pub const GET_ALL: u8 = 0x02;
    /// Short query.
    pub const SHORT_QUERY: u8 = 0x04;
    /// Batch.
    pub const BATCH: u8 = 0x08;
    /// XDR.
    pub const XDR: u8 = 0x10;
    /// Metadata only.
    pub const NOBINDATA: u8 = 0x20;
    /// AP read mode all.
    pub const READ_MODE_AP_ALL: u8 = 0x40;
    /// Client accepts compressed replies.
    pub const COMPRESS_RESPONSE: u8 = 0x80;
}

/// info2 bits.
pub mod info2 {
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Delete.
    pub const DELETE: u8 = 0x02;
    /// Apply only if the generation is equal.
    pub const GENERATION: u8 = 0x04;
    /// Apply only if the request's generation is greater.
    pub const GENERATION_GT: u8 = 0x08;
    /// Durable delete.
    pub const DURABLE_DELETE: u8 = 0x10;
    /// Create only.
    pub const CREATE_ONLY: u8 = 0x20;
    /// Relax AP long query.
    pub const RELAX_AP_LONG_QUERY: u8 = 0x40;
    /// Respond with one op per request op.
    pub const RESPOND_ALL_OPS: u8 = 0x80;
}

/// info3 bits.
pub mod info3 {
    /// Last message of a stream.
    pub const LAST: u8 = 0x01;
    /// Commit on the master only.
    pub const COMMIT_MASTER: u8 = 0x02;
    /// Partition done (scans).
    pub const PARTITION_DONE: u8 = 0x04;
    /// Update only.
    pub const UPDATE_ONLY: u8 = 0x08;
    /// Create or replace.
    pub const CREATE_OR_REPLACE: u8 = 0x10;
    /// Replace only.
    pub const REPLACE_ONLY: u8 = 0x20;
    /// SC read type.
    pub const SC_READ_TYPE: u8 = 0x40;
    /// SC read relax.
    pub const SC_READ_RELAX: u8 = 0x80;
}

/// Field types.
pub mod field {
    /// Namespace.
    pub const NAMESPACE: u8 = 0;
    /// Set name.
    pub const SET: u8 = 1;
    /// User key (particle type + bytes).
    pub const KEY: u8 = 2;
    /// Record version (transactions).
    pub const RECORD_VERSION: u8 = 3;
    /// Digest (20 bytes).
    pub const DIGEST: u8 = 4;
    /// Transaction id.
    pub const TXN_ID: u8 = 5;
    /// Transaction deadline.
    pub const TXN_DEADLINE: u8 = 6;
    /// Scan/query task id.
    pub const TASK_ID: u8 = 7;
    /// Socket timeout (scan/query).
    pub const SOCKET_TIMEOUT: u8 = 9;
    /// Records per second.
    pub const RECORDS_PER_SECOND: u8 = 10;
    /// Partition ids (u16 little-endian each).
    pub const PARTITION_ARRAY: u8 = 11;
    /// Resume digests.
    pub const DIGEST_ARRAY: u8 = 12;
    /// Max records.
    pub const MAX_RECORDS: u8 = 13;
    /// Secondary-index resume values.
    pub const BVAL_ARRAY: u8 = 15;
    /// Secondary index name.
    pub const INDEX_NAME: u8 = 21;
    /// Secondary index range.
    pub const INDEX_RANGE: u8 = 22;
    /// Secondary index context.
    pub const INDEX_CONTEXT: u8 = 23;
    /// Secondary index expression.
    pub const INDEX_EXPRESSION: u8 = 24;
    /// Secondary index type.
    pub const INDEX_TYPE: u8 = 26;
    /// UDF package.
    pub const UDF_PACKAGE: u8 = 30;
    /// UDF function.
    pub const UDF_FUNCTION: u8 = 31;
    /// UDF argument list.
    pub const UDF_ARGLIST: u8 = 32;
    /// UDF op.
    pub const UDF_OP: u8 = 33;
    /// Query bin list (old servers).
    pub const QUERY_BINS: u8 = 40;
    /// Batch index.
    pub const BATCH_INDEX: u8 = 41;
    /// Batch index with set (old).
    pub const BATCH_INDEX_WITH_SET: u8 = 42;
    /// Filter expression.
    pub const FILTER_EXPRESSION: u8 = 43;
}

/// Op types.
pub mod op {
    /// Read a bin (empty name: all bins).
    pub const READ: u8 = 1;
    /// Write a bin (null value deletes it).
    pub const WRITE: u8 = 2;
    /// List/map read.
    pub const CDT_READ: u8 = 3;
    /// List/map modify.
    pub const CDT_MODIFY: u8 = 4;
    /// Add to an integer or float bin.
    pub const INCR: u8 = 5;
    /// Expression read.
    pub const EXP_READ: u8 = 7;
    /// Expression modify.
    pub const EXP_MODIFY: u8 = 8;
    /// Append to a string or blob bin.
    pub const APPEND: u8 = 9;
    /// Prepend to a string or blob bin.
    pub const PREPEND: u8 = 10;
    /// Touch the record.
    pub const TOUCH: u8 = 11;
    /// Bit read.
    pub const BIT_READ: u8 = 12;
    /// Bit modify.
    pub const BIT_MODIFY: u8 = 13;
    /// Delete the record.
    pub const DELETE: u8 = 14;
    /// HyperLogLog read.
    pub const HLL_READ: u8 = 15;
    /// HyperLogLog modify.
    pub const HLL_MODIFY: u8 = 16;
}

/// Particle types (defined once, in `peregrine_index::particle`).
pub use peregrine_index::particle;

/// Result codes.
pub mod result {
    /// Success.
    pub const OK: u8 = 0;
    /// Unknown server error.
    pub const SERVER_ERROR: u8 = 1;
    /// Key not found.
    pub const KEY_NOT_FOUND: u8 = 2;
    /// Generation mismatch.
    pub const GENERATION: u8 = 3;
    /// Bad parameter / malformed request.
    pub const PARAMETER: u8 = 4;
    /// Key exists.
    pub const KEY_EXISTS: u8 = 5;
    /// Bin exists.
    pub const BIN_EXISTS: u8 = 6;
    /// Cluster key mismatch.
    pub const CLUSTER_KEY_MISMATCH: u8 = 7;
    /// Server full (device or memory).
    pub const SERVER_FULL: u8 = 8;
    /// Server-side timeout.
    pub const TIMEOUT: u8 = 9;
    /// Partition unavailable.
    pub const PARTITION_UNAVAILABLE: u8 = 11;
    /// Incompatible bin type.
    pub const BIN_TYPE: u8 = 12;
    /// Record too big.
    pub const RECORD_TOO_BIG: u8 = 13;
    /// Key busy.
    pub const KEY_BUSY: u8 = 14;
    /// Unsupported feature.
    pub const UNSUPPORTED_FEATURE: u8 = 16;
    /// Bin not found.
    pub const BIN_NOT_FOUND: u8 = 17;
    /// Device overload.
    pub const DEVICE_OVERLOAD: u8 = 18;
    /// Key mismatch.
    pub const KEY_MISMATCH: u8 = 19;
    /// Namespace not found.
    pub const NAMESPACE_NOT_FOUND: u8 = 20;
    /// Bin name too long or too many bins.
    pub const BIN_NAME: u8 = 21;
    /// Forbidden.
    pub const FORBIDDEN: u8 = 22;
    /// Secondary index not found.
    pub const INDEX_NOT_FOUND: u8 = 201;
}

/// TTL in a write: never expire.
pub const TTL_NEVER_EXPIRE: u32 = 0xFFFF_FFFF;
/// TTL in a write: keep the current expiry.
pub const TTL_DONT_UPDATE: u32 = 0xFFFF_FFFE;
/// TTL in a write: the client's default (clients replace it; treated as the namespace default).
pub const TTL_CLIENT_DEFAULT: u32 = 0xFFFF_FFFD;
