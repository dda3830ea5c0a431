//! The data model seen by callers: bins (name ≤ 15 bytes → value), values by particle type,
//! the optional stored user key, and a record version with its generation, void time and
//! last-update time.

use peregrine_index::Digest;

use crate::error::{Error, Result};

/// Longest bin name, in bytes.
pub const BIN_NAME_BYTES_MAX: usize = 15;
/// Most bins a record may have.
pub const BINS_PER_RECORD_MAX: usize = 32767;
/// Longest set name, in bytes.
pub const SET_NAME_BYTES_MAX: usize = 63;

/// Aerospike particle types (the type byte of every value on the wire and on the device).
pub use peregrine_index::particle;

/// A bin name: 1 to 15 bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinName {
    len: u8,
    bytes: [u8; BIN_NAME_BYTES_MAX],
}

impl BinName {
    /// Validates and copies a bin name.
    pub fn new(name: &[u8]) -> Result<BinName> {
        if name.is_empty() || name.len() > BIN_NAME_BYTES_MAX {
            return Err(Error::BinName { len: name.len() });
        }
        let mut bytes = [0u8; BIN_NAME_BYTES_MAX];
        bytes[..name.len()].copy_from_slice(name);
        Ok(BinName { len: name.len() as u8, bytes })
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for BinName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// A bin value. Lists, maps and other structured types are kept as the client's bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// String bytes.
    String(Vec<u8>),
    /// Blob bytes.
    Blob(Vec<u8>),
    /// Msgpack-encoded list.
    List(Vec<u8>),
    /// Msgpack-encoded map.
    Map(Vec<u8>),
    /// Any other particle type (GeoJSON, HLL, language blobs), kept verbatim.
    Other {
        /// The particle type byte.
        particle_type: u8,
        /// The value bytes.
        bytes: Vec<u8>,
    },
}

impl Value {
    /// The particle type byte of this value.
    pub fn particle_type(&self) -> u8 {
        match self {
            Value::Int(_) => particle::INTEGER,
            Value::Float(_) => particle::FLOAT,
            Value::Bool(_) => particle::BOOL,
            Value::String(_) => particle::STRING,
            Value::Blob(_) => particle::BLOB,
            Value::List(_) => particle::LIST,
            Value::Map(_) => particle::MAP,
            Value::Other { particle_type, .. } => *particle_type,
        }
    }

    /// Bytes the value occupies on the device (not counting its type and length prefix).
    pub fn encoded_len(&self) -> usize {
        match self {
            Value::Int(_) | Value::Float(_) => 8,
            Value::Bool(_) => 1,
            Value::String(b) | Value::Blob(b) | Value::List(b) | Value::Map(b) | Value::Other { bytes: b, .. } => {
                b.len()
            }
        }
    }

    /// Appends the value bytes as stored on the device (integers and floats little-endian).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Float(v) => out.extend_from_slice(&v.to_bits().to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(b) | Value::Blob(b) | Value::List(b) | Value::Map(b) | Value::Other { bytes: b, .. } => {
                out.extend_from_slice(b)
            }
        }
    }

    /// Decodes a value stored on the device. `None` when the bytes do not fit the type.
    pub fn decode(particle_type: u8, bytes: &[u8]) -> Option<Value> {
        Some(match particle_type {
            particle::INTEGER => Value::Int(i64::from_le_bytes(bytes.try_into().ok()?)),
            particle::FLOAT => Value::Float(f64::from_bits(u64::from_le_bytes(bytes.try_into().ok()?))),
            particle::BOOL => match bytes {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                _ => return None,
            },
            particle::STRING => Value::String(bytes.to_vec()),
            particle::BLOB => Value::Blob(bytes.to_vec()),
            particle::LIST => Value::List(bytes.to_vec()),
            particle::MAP => Value::Map(bytes.to_vec()),
            particle::NULL => return None,
            other => Value::Other { particle_type: other, bytes: bytes.to_vec() },
        })
    }
}

/// One named value.
#[derive(Clone, Debug, PartialEq)]
pub struct Bin {
    /// The bin's name.
    pub name: BinName,
    /// The bin's value.
    pub value: Value,
}

impl Bin {
    /// A bin from a name and value; fails when the name is empty or longer than 15 bytes.
    pub fn new(name: &str, value: Value) -> Result<Bin> {
        Ok(Bin { name: BinName::new(name.as_bytes())?, value })
    }
}

/// The user key stored with a record (when the client sent it): its particle type and bytes,
/// kept exactly as received so it can be returned verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    /// Particle type byte of the key (1 integer, 3 string, 4 blob, ...).
    pub particle_type: u8,
    /// The key bytes (an integer key is 8 bytes big-endian, as hashed).
    pub bytes: Vec<u8>,
}

/// Record metadata, known from the index without a device read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// 1 on create, +1 per write, never 0.
    pub generation: u16,
    /// Expiry in seconds since 2010-01-01 UTC; 0 = never.
    pub void_time: u32,
    /// Last update, milliseconds since the Unix epoch.
    pub last_update_ms: u64,
}

/// One version of a record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The record's identity.
    pub digest: Digest,
    /// Set name; empty when the record has no set.
    pub set_name: Vec<u8>,
    /// The user key, when stored.
    pub key: Option<StoredKey>,
    /// Generation, void time and last-update time.
    pub meta: RecordMeta,
    /// The bins, in stored order.
    pub bins: Vec<Bin>,
}

impl Record {
    /// The bin called `name`, if any.
    pub fn bin(&self, name: &str) -> Option<&Value> {
        self.bin_named(name.as_bytes())
    }

    /// The bin whose name is these bytes, if any.
    pub fn bin_named(&self, name: &[u8]) -> Option<&Value> {
        self.bins.iter().find(|b| b.name.as_bytes() == name).map(|b| &b.value)
    }
}

/// A record version as decided by whoever orders writes (the engine itself, or a replication
/// layer): applying it stores exactly these bytes on every replica.
#[derive(Clone, Debug, PartialEq)]
pub enum RecordVersion {
    /// A live record.
    Live(Record),
    /// A deletion: a tombstone that keeps older copies from coming back.
    Tombstone {
        /// The deleted record's identity.
        digest: Digest,
        /// Set name of the deleted record (kept for scans and per-set accounting).
        set_name: Vec<u8>,
        /// The tombstone's generation and last-update time (void time 0).
        meta: RecordMeta,
    },
}

impl RecordVersion {
    /// The record's digest.
    pub fn digest(&self) -> &Digest {
        match self {
            RecordVersion::Live(r) => &r.digest,
            RecordVersion::Tombstone { digest, .. } => digest,
        }
    }

    /// The version's metadata.
    pub fn meta(&self) -> &RecordMeta {
        match self {
            RecordVersion::Live(r) => &r.meta,
            RecordVersion::Tombstone { meta, .. } => meta,
        }
    }
}

/// Next generation after `g`: +1, wrapping from 65535 to 1 (0 is never used).
pub fn next_generation(g: u16) -> u16 {
    if g == u16::MAX { 1 } else { g + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_names_are_bounded() {
        assert!(BinName::new(b"a").is_ok());
        assert!(BinName::new(&[b'x'; 15]).is_ok());
        assert!(matches!(BinName::new(&[b'x'; 16]), Err(Error::BinName { len: 16 })));
        assert!(matches!(BinName::new(b""), Err(Error::BinName { len: 0 })));
    }

    #[test]
    fn values_round_trip_through_device_encoding() {
        let values = [
            Value::Int(i64::MIN),
            Value::Float(-0.5),
            Value::Bool(true),
            Value::Bool(false),
            Value::String(b"hello".to_vec()),
            Value::Blob(vec![0, 255]),
            Value::List(vec![0x92, 1, 2]),
            Value::Map(vec![0x80]),
            Value::Other { particle_type: particle::GEOJSON, bytes: b"{}".to_vec() },
        ];
        for v in values {
            let mut out = Vec::new();
            v.encode_into(&mut out);
            assert_eq!(out.len(), v.encoded_len());
            assert_eq!(Value::decode(v.particle_type(), &out), Some(v));
        }
        assert_eq!(Value::decode(particle::INTEGER, &[1, 2, 3]), None);
        assert_eq!(Value::decode(particle::BOOL, &[2]), None);
        assert_eq!(Value::decode(particle::NULL, &[]), None);
    }

    #[test]
    fn generation_wraps_past_zero() {
        assert_eq!(next_generation(1), 2);
        assert_eq!(next_generation(u16::MAX), 1);
    }
}
