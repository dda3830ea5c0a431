//! The openraft type configuration of Peregrine's partition groups, and what a log entry
//! carries: a [`Command`] is a batch of record versions decided once by the leader (with the
//! engine's prepare step), so every replica applies identical versions with the engine's
//! monotonic apply; a [`Response`] is what the apply did with each version.
//!
//! `peregrine_engine::RecordVersion` is not serde, so [`Version`] mirrors it field for field
//! (digest, set name, stored key, metadata, bins with typed values). Conversion from the engine
//! type is total; the way back is `TryFrom` only because bin names are validated again
//! (1 to 15 bytes), which every name that came from the engine passes: the round trip is exact.

use std::fmt;
use std::io;

use peregrine_engine::{ApplyOutcome, Bin, BinName, Digest, Record, RecordMeta, RecordVersion, StoredKey, Value};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The type configuration of every partition group: textbook leader ids (one leader per
    /// term), node ids `u64`, `BasicNode` addresses.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// A log id of a partition group.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A stored membership of a partition group.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata of a partition group.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A log entry of a partition group.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;

/// What a normal log entry carries: record versions decided by the leader, applied in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The versions, in the order the leader decided them.
    pub versions: Vec<Version>,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} version(s)", self.versions.len())
    }
}

impl Command {
    /// A command carrying `versions`.
    pub fn from_versions(versions: &[RecordVersion]) -> Command {
        Command { versions: versions.iter().map(Version::from).collect() }
    }

    /// The engine versions this command carries (fails on a bin name the engine refuses).
    pub fn to_versions(&self) -> io::Result<Vec<RecordVersion>> {
        self.versions.iter().map(|v| RecordVersion::try_from(v.clone())).collect()
    }
}

/// What applying one version did (the serde mirror of `peregrine_engine::ApplyOutcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Stored and indexed.
    Applied,
    /// Skipped: the replica holds this version or a newer one.
    Stale,
    /// Skipped: a truncation covers it.
    Truncated,
}

impl From<ApplyOutcome> for Outcome {
    fn from(o: ApplyOutcome) -> Outcome {
        match o {
            ApplyOutcome::Applied => Outcome::Applied,
            ApplyOutcome::Stale => Outcome::Stale,
            ApplyOutcome::Truncated => Outcome::Truncated,
        }
    }
}

impl From<Outcome> for ApplyOutcome {
    fn from(o: Outcome) -> ApplyOutcome {
        match o {
            Outcome::Applied => ApplyOutcome::Applied,
            Outcome::Stale => ApplyOutcome::Stale,
            Outcome::Truncated => ApplyOutcome::Truncated,
        }
    }
}

/// What applying an entry did: one outcome per version of a [`Command`], none for blank and
/// membership entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Per version, in command order.
    pub outcomes: Vec<Outcome>,
}

/// Record metadata (mirror of `RecordMeta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Generation (1 on create, never 0).
    pub generation: u16,
    /// Expiry, seconds since 2010-01-01 (0 = never).
    pub void_time: u32,
    /// Last update, milliseconds since the Unix epoch.
    pub last_update_ms: u64,
}

/// A typed bin value (mirror of `peregrine_engine::Value`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireValue {
    /// Integer.
    Int(i64),
    /// Float (carried as its bits, so every value, NaNs included, survives).
    Float(u64),
    /// Boolean.
    Bool(bool),
    /// String bytes.
    String(Vec<u8>),
    /// Blob bytes.
    Blob(Vec<u8>),
    /// Msgpack list.
    List(Vec<u8>),
    /// Msgpack map.
    Map(Vec<u8>),
    /// Any other particle type, verbatim.
    Other(u8, Vec<u8>),
}

/// One bin (name bytes and value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireBin {
    /// Bin name bytes (1 to 15).
    pub name: Vec<u8>,
    /// The value.
    pub value: WireValue,
}

/// One record version as a log entry carries it (mirror of `RecordVersion`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Version {
    /// A live record.
    Live {
        /// Record digest.
        digest: [u8; 20],
        /// Set name (empty = none).
        set_name: Vec<u8>,
        /// Stored user key: particle type and bytes.
        key: Option<(u8, Vec<u8>)>,
        /// Metadata.
        meta: Meta,
        /// Bins in stored order.
        bins: Vec<WireBin>,
    },
    /// A tombstone.
    Tombstone {
        /// Record digest.
        digest: [u8; 20],
        /// Set name of the deleted record.
        set_name: Vec<u8>,
        /// Metadata.
        meta: Meta,
    },
}

impl From<RecordMeta> for Meta {
    fn from(m: RecordMeta) -> Meta {
        Meta { generation: m.generation, void_time: m.void_time, last_update_ms: m.last_update_ms }
    }
}

impl From<Meta> for RecordMeta {
    fn from(m: Meta) -> RecordMeta {
        RecordMeta { generation: m.generation, void_time: m.void_time, last_update_ms: m.last_update_ms }
    }
}

impl From<Value> for WireValue {
    fn from(v: Value) -> WireValue {
        match v {
            Value::Int(i) => WireValue::Int(i),
            Value::Float(f) => WireValue::Float(f.to_bits()),
            Value::Bool(b) => WireValue::Bool(b),
            Value::String(b) => WireValue::String(b),
            Value::Blob(b) => WireValue::Blob(b),
            Value::List(b) => WireValue::List(b),
            Value::Map(b) => WireValue::Map(b),
            Value::Other { particle_type, bytes } => WireValue::Other(particle_type, bytes),
        }
    }
}

impl From<WireValue> for Value {
    fn from(v: WireValue) -> Value {
        match v {
            WireValue::Int(i) => Value::Int(i),
            WireValue::Float(bits) => Value::Float(f64::from_bits(bits)),
            WireValue::Bool(b) => Value::Bool(b),
            WireValue::String(b) => Value::String(b),
            WireValue::Blob(b) => Value::Blob(b),
            WireValue::List(b) => Value::List(b),
            WireValue::Map(b) => Value::Map(b),
            WireValue::Other(particle_type, bytes) => Value::Other { particle_type, bytes },
        }
    }
}

impl From<&RecordVersion> for Version {
    fn from(v: &RecordVersion) -> Version {
        Version::from(v.clone())
    }
}

impl From<RecordVersion> for Version {
    fn from(v: RecordVersion) -> Version {
        match v {
            RecordVersion::Live(r) => Version::Live {
                digest: r.digest.0,
                set_name: r.set_name,
                key: r.key.map(|k| (k.particle_type, k.bytes)),
                meta: r.meta.into(),
                bins: r
                    .bins
                    .into_iter()
                    .map(|b| WireBin { name: b.name.as_bytes().to_vec(), value: b.value.into() })
                    .collect(),
            },
            RecordVersion::Tombstone { digest, set_name, meta } => {
                Version::Tombstone { digest: digest.0, set_name, meta: meta.into() }
            }
        }
    }
}

impl TryFrom<Version> for RecordVersion {
    type Error = io::Error;

    fn try_from(v: Version) -> io::Result<RecordVersion> {
        Ok(match v {
            Version::Live { digest, set_name, key, meta, bins } => {
                let bins = bins
                    .into_iter()
                    .map(|b| {
                        let name = BinName::new(&b.name).map_err(|e| {
                            io::Error::new(io::ErrorKind::InvalidData, format!("a logged bin name: {e}"))
                        })?;
                        Ok(Bin { name, value: b.value.into() })
                    })
                    .collect::<io::Result<Vec<Bin>>>()?;
                RecordVersion::Live(Record {
                    digest: Digest(digest),
                    set_name,
                    key: key.map(|(particle_type, bytes)| StoredKey { particle_type, bytes }),
                    meta: meta.into(),
                    bins,
                })
            }
            Version::Tombstone { digest, set_name, meta } => {
                RecordVersion::Tombstone { digest: Digest(digest), set_name, meta: meta.into() }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample() -> Vec<RecordVersion> {
        let meta = RecordMeta { generation: 7, void_time: 12345, last_update_ms: 1_800_000_000_123 };
        let bins = vec![
            Bin::new("i", Value::Int(i64::MIN)).unwrap(),
            Bin::new("f", Value::Float(f64::from_bits(0x7ff8_0000_0000_0001))).unwrap(), // a NaN payload
            Bin::new("b", Value::Bool(true)).unwrap(),
            Bin::new("s", Value::String(b"hello".to_vec())).unwrap(),
            Bin::new("blob", Value::Blob(vec![0, 255, 7])).unwrap(),
            Bin::new("l", Value::List(vec![0x92, 1, 2])).unwrap(),
            Bin::new("m", Value::Map(vec![0x80])).unwrap(),
            Bin::new("fifteen-bytes-x", Value::Other { particle_type: 23, bytes: b"{}".to_vec() }).unwrap(),
        ];
        vec![
            RecordVersion::Live(Record {
                digest: Digest([3; 20]),
                set_name: b"set".to_vec(),
                key: Some(StoredKey { particle_type: 3, bytes: b"k".to_vec() }),
                meta,
                bins,
            }),
            RecordVersion::Live(Record {
                digest: Digest([4; 20]),
                set_name: Vec::new(),
                key: None,
                meta,
                bins: vec![Bin::new("x", Value::Float(-0.5)).unwrap()],
            }),
            RecordVersion::Tombstone { digest: Digest([5; 20]), set_name: b"s".to_vec(), meta },
        ]
    }

    /// Compares through the engine's Debug form of floats' bits (NaN != NaN under PartialEq).
    fn same(a: &[RecordVersion], b: &[RecordVersion]) -> bool {
        let bits = |v: &[RecordVersion]| -> Vec<Version> { v.iter().map(Version::from).collect() };
        bits(a) == bits(b)
    }

    #[test]
    fn versions_round_trip_through_the_command_and_postcard() {
        let versions = sample();
        let cmd = Command::from_versions(&versions);
        let bytes = postcard::to_allocvec(&cmd).unwrap();
        let back: Command = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, cmd);
        let restored = back.to_versions().unwrap();
        assert!(same(&restored, &versions));
        // Apart from the NaN, plain equality holds too.
        assert_eq!(restored[1..], versions[1..]);
        assert_eq!(format!("{cmd}"), "3 version(s)");
    }

    #[test]
    fn a_bad_bin_name_is_refused_not_mangled() {
        let v = Version::Live {
            digest: [1; 20],
            set_name: Vec::new(),
            key: None,
            meta: Meta { generation: 1, void_time: 0, last_update_ms: 1 },
            bins: vec![WireBin { name: vec![b'x'; 16], value: WireValue::Int(1) }],
        };
        assert!(RecordVersion::try_from(v).is_err());
    }

    #[test]
    fn outcomes_convert_both_ways() {
        for o in [ApplyOutcome::Applied, ApplyOutcome::Stale, ApplyOutcome::Truncated] {
            assert_eq!(ApplyOutcome::from(Outcome::from(o)), o);
        }
    }
}
