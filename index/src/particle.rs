//! Aerospike particle types: the type byte in front of every value, on the wire (op and key
//! fields), on the device (bins and stored keys), and hashed into a record's digest in front of
//! the key bytes. Defined here once; `peregrine_proto::consts::particle` and
//! `peregrine_engine::record::particle` re-export this module.

/// No value (on the wire, a write of null deletes the bin).
pub const NULL: u8 = 0;
/// 64-bit signed integer (8 bytes, big-endian).
pub const INTEGER: u8 = 1;
/// 64-bit IEEE-754 float (8 bytes, big-endian).
pub const FLOAT: u8 = 2;
/// String (UTF-8 bytes, not validated).
pub const STRING: u8 = 3;
/// Blob (raw bytes).
pub const BLOB: u8 = 4;
/// Boolean (1 byte).
pub const BOOL: u8 = 17;
/// HyperLogLog (opaque).
pub const HLL: u8 = 18;
/// Map (msgpack, opaque).
pub const MAP: u8 = 19;
/// List (msgpack, opaque).
pub const LIST: u8 = 20;
/// GeoJSON (opaque).
pub const GEOJSON: u8 = 23;
