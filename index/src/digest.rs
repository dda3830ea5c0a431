//! Record identity: the 20-byte Aerospike digest and the partition it falls in.
//!
//! digest = RIPEMD-160(set name bytes, key particle-type byte, key bytes); the namespace is
//! not hashed. Partition id = (digest[0] | digest[1] << 8) & 0xFFF, over 4096 partitions.

use std::fmt;

use ripemd::{Digest as _, Ripemd160};

use crate::particle;

/// Length of a record digest in bytes.
pub const DIGEST_LEN: usize = 20;
/// Number of partitions a namespace is split into.
pub const PARTITION_COUNT: usize = 4096;

/// The 20-byte RIPEMD-160 digest that identifies a record within a namespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; DIGEST_LEN]);

/// A partition number in `0..PARTITION_COUNT`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PartitionId(u16);

impl PartitionId {
    /// Returns the partition id for `value`, or `None` when it is out of range.
    pub fn new(value: u16) -> Option<PartitionId> {
        (usize::from(value) < PARTITION_COUNT).then_some(PartitionId(value))
    }

    /// The partition number as an integer in `0..4096`.
    pub fn get(self) -> u16 {
        self.0
    }

    /// The partition number as an index.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// All partitions in ascending order.
    pub fn all() -> impl Iterator<Item = PartitionId> {
        (0..PARTITION_COUNT as u16).map(PartitionId)
    }
}

/// A user key, as hashed into a digest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeyRef<'a> {
    /// A 64-bit signed integer key.
    Int(i64),
    /// A float key (rarely used; Aerospike clients allow it).
    Float(f64),
    /// A string key (bytes are hashed as given, normally UTF-8).
    String(&'a [u8]),
    /// A blob key.
    Blob(&'a [u8]),
}

impl KeyRef<'_> {
    /// The particle-type byte hashed in front of the key bytes.
    pub fn particle_type(&self) -> u8 {
        match self {
            KeyRef::Int(_) => particle::INTEGER,
            KeyRef::Float(_) => particle::FLOAT,
            KeyRef::String(_) => particle::STRING,
            KeyRef::Blob(_) => particle::BLOB,
        }
    }
}

impl Digest {
    /// Computes the digest of `key` in `set` (an empty set name means "no set").
    pub fn of_key(set: &[u8], key: KeyRef<'_>) -> Digest {
        let mut hasher = Ripemd160::new();
        hasher.update(set);
        hasher.update([key.particle_type()]);
        match key {
            KeyRef::Int(v) => hasher.update(v.to_be_bytes()),
            KeyRef::Float(v) => hasher.update(v.to_bits().to_be_bytes()),
            KeyRef::String(bytes) | KeyRef::Blob(bytes) => hasher.update(bytes),
        }
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(&hasher.finalize());
        Digest(out)
    }

    /// The partition this digest belongs to.
    pub fn partition(&self) -> PartitionId {
        PartitionId((u16::from(self.0[0]) | (u16::from(self.0[1]) << 8)) & 0x0FFF)
    }

    /// The digest as lowercase hex (40 characters).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(DIGEST_LEN * 2);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xF)]));
        }
        s
    }

    /// Parses 40 hex characters (either case).
    pub fn from_hex(text: &str) -> Option<Digest> {
        let bytes = text.as_bytes();
        if bytes.len() != DIGEST_LEN * 2 {
            return None;
        }
        let mut out = [0u8; DIGEST_LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0])?;
            let lo = hex_value(pair[1])?;
            out[i] = (hi << 4) | lo;
        }
        Some(Digest(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the wire reference, checked against `aerospike.calc_digest`.
    #[test]
    fn string_key_digest_matches_aerospike() {
        let d = Digest::of_key(b"demo", KeyRef::String(b"k1"));
        assert_eq!(d.to_hex(), "b747f5854d0b33259928d0cfab7fad81d6abfbf6");
    }

    /// More vectors, produced by the official Python client 19.3 (`aerospike.calc_digest`).
    #[test]
    fn digests_match_official_client() {
        let cases: [(&[u8], KeyRef<'_>, &str); 5] = [
            (b"demo", KeyRef::Int(1), "b7f4b83889e2da67de683e1df6919a1eacc446c8"),
            (b"", KeyRef::Int(1), "a443f05d05d962202b59abb402afae1737dbf66a"),
            (b"users", KeyRef::Int(-5), "6c247220cafdcbb35b1fb96d90e256e710c96809"),
            (b"s", KeyRef::Blob(&[1, 2]), "fde5aa3349c0054f4301a5cf43ed250bd04bdfcd"),
            (b"demo", KeyRef::String(b""), "6253653507ba82c3f57c87af2f86d39033149e0c"),
        ];
        for (set, key, hex) in cases {
            assert_eq!(Digest::of_key(set, key).to_hex(), hex, "set {set:?} key {key:?}");
        }
    }

    #[test]
    fn partition_uses_low_twelve_bits_little_endian() {
        let mut raw = [0u8; DIGEST_LEN];
        raw[0] = 0xAB;
        raw[1] = 0xCD;
        assert_eq!(Digest(raw).partition().get(), 0xDAB);
        let d = Digest::of_key(b"demo", KeyRef::String(b"k1"));
        assert_eq!(d.partition().get(), 0x47b7 & 0xFFF);
    }

    #[test]
    fn hex_round_trip_and_rejects_bad_input() {
        let d = Digest::of_key(b"", KeyRef::Int(42));
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&"zz".repeat(20)), None);
    }

    #[test]
    fn partition_id_bounds() {
        assert!(PartitionId::new(4095).is_some());
        assert!(PartitionId::new(4096).is_none());
        assert_eq!(PartitionId::all().count(), PARTITION_COUNT);
    }
}
