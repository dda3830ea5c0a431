//! The metadata region (format version 2): two slots in the reserved area before write block 0,
//! each holding the whole namespace metadata — per partition a truncation epoch and an opaque
//! value the caller owns, the namespace truncation cutoff, and per-set truncation cutoffs.
//! Updates write the slot the current one is not in, with a higher generation, on every device
//! of the namespace; opening takes the valid slot with the highest generation over all devices,
//! so a torn update leaves the previous state intact.

use peregrine_index::PARTITION_COUNT as PARTITIONS;

use super::{Field, checksum, get_u32, get_u64, put_u32, put_u64};
use crate::record::SET_NAME_BYTES_MAX;

/// Offset of slot 0 (slot 1 follows it).
pub const OFFSET_BYTES: u64 = 256 * 1024;
/// Size of one slot.
pub const SLOT_BYTES: usize = 256 * 1024;
/// Number of slots.
pub const SLOT_COUNT: usize = 2;
/// "PEREMETA" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PEREMETA");
/// Longest opaque per-partition value.
pub const PARTITION_VALUE_BYTES_MAX: usize = 27;
/// Most sets that can carry a truncation cutoff at once.
pub const SET_TRUNCATIONS_MAX: usize = 1024;

/// xxh3-64 (seed 0) of bytes 8..[`SLOT_BYTES`] of the slot.
pub const CHECKSUM: Field = Field::first("checksum", 8);
/// [`MAGIC`].
pub const MAGIC_FIELD: Field = Field::after(CHECKSUM, "magic", 8);
/// [`SLOT_BYTES`].
pub const SLOT_SIZE: Field = Field::after(MAGIC_FIELD, "slot_bytes", 4);
/// Number of partition entries (4096).
pub const PARTITION_COUNT: Field = Field::after(SLOT_SIZE, "partition_count", 4);
/// Increases by one on every metadata write; the higher valid slot wins.
pub const GENERATION: Field = Field::after(PARTITION_COUNT, "generation", 8);
/// The namespace's device set id (a slot of another namespace never verifies).
pub const DEVICE_SET_ID: Field = Field::after(GENERATION, "device_set_id", 8);
/// Records (of any set) last updated at or before this time are truncated; 0 = none.
pub const NAMESPACE_CUTOFF: Field = Field::after(DEVICE_SET_ID, "namespace_truncate_lut_ms", 8);
/// Entries used in the set truncation table.
pub const SET_TRUNCATION_COUNT: Field = Field::after(NAMESPACE_CUTOFF, "set_truncation_count", 4);
/// Zero.
pub const RESERVED: Field = Field::after(SET_TRUNCATION_COUNT, "reserved", 12);

/// The slot header fields in order.
pub const FIELDS: &[Field] = &[
    CHECKSUM,
    MAGIC_FIELD,
    SLOT_SIZE,
    PARTITION_COUNT,
    GENERATION,
    DEVICE_SET_ID,
    NAMESPACE_CUTOFF,
    SET_TRUNCATION_COUNT,
    RESERVED,
];
/// Bytes of the slot header.
pub const HEADER_BYTES: usize = 64;

/// Partition `p`'s truncation epoch (offsets relative to its entry).
pub const PARTITION_EPOCH: Field = Field::first("epoch", 4);
/// Length of the partition's opaque value.
pub const PARTITION_VALUE_LEN: Field = Field::after(PARTITION_EPOCH, "value_len", 1);
/// The opaque value, zero padded.
pub const PARTITION_VALUE: Field = Field::after(PARTITION_VALUE_LEN, "value", PARTITION_VALUE_BYTES_MAX);
/// The partition entry fields in order.
pub const PARTITION_FIELDS: &[Field] = &[PARTITION_EPOCH, PARTITION_VALUE_LEN, PARTITION_VALUE];
/// Bytes of one partition entry; entry `p` starts at [`PARTITIONS_OFFSET`] + p × this.
pub const PARTITION_ENTRY_BYTES: usize = 32;
/// Offset of partition entry 0.
pub const PARTITIONS_OFFSET: usize = HEADER_BYTES;

/// A set truncation entry: records of the set last updated at or before the cutoff are dead.
pub const SET_CUTOFF: Field = Field::first("truncate_lut_ms", 8);
/// Length of the set name.
pub const SET_NAME_LEN: Field = Field::after(SET_CUTOFF, "set_name_len", 1);
/// The set name, zero padded.
pub const SET_NAME: Field = Field::after(SET_NAME_LEN, "set_name", SET_NAME_BYTES_MAX);
/// The set truncation entry fields in order.
pub const SET_FIELDS: &[Field] = &[SET_CUTOFF, SET_NAME_LEN, SET_NAME];
/// Bytes of one set truncation entry.
pub const SET_ENTRY_BYTES: usize = 72;
/// Offset of set truncation entry 0.
pub const SETS_OFFSET: usize = PARTITIONS_OFFSET + PARTITIONS * PARTITION_ENTRY_BYTES;

const _: () = assert!(RESERVED.end() == HEADER_BYTES);
const _: () = assert!(PARTITION_VALUE.end() == PARTITION_ENTRY_BYTES);
const _: () = assert!(SET_NAME.end() == SET_ENTRY_BYTES);
const _: () = assert!(SETS_OFFSET + SET_TRUNCATIONS_MAX * SET_ENTRY_BYTES <= SLOT_BYTES);
const _: () = assert!(OFFSET_BYTES + (SLOT_COUNT * SLOT_BYTES) as u64 <= super::DATA_OFFSET_BYTES);
const _: () = assert!(OFFSET_BYTES >= (super::device_header::SLOT_BYTES * super::device_header::SLOT_COUNT) as u64);

/// One partition's durable metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionMeta {
    /// Truncation epoch: versions written in an earlier epoch are dead.
    pub epoch: u32,
    /// The caller's opaque value (at most [`PARTITION_VALUE_BYTES_MAX`] bytes).
    pub value: Vec<u8>,
}

/// The decoded contents of a metadata slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataImage {
    /// Write counter.
    pub generation: u64,
    /// Device set id of the namespace.
    pub device_set_id: u64,
    /// Namespace truncation cutoff (0 = none).
    pub namespace_cutoff_ms: u64,
    /// Per partition, indexed by partition id.
    pub partitions: Vec<PartitionMeta>,
    /// Set name → truncation cutoff, sorted by name.
    pub sets: Vec<(Vec<u8>, u64)>,
}

impl MetadataImage {
    /// Empty metadata (nothing truncated, no values) for a device set.
    pub fn empty(device_set_id: u64) -> MetadataImage {
        MetadataImage {
            generation: 0,
            device_set_id,
            namespace_cutoff_ms: 0,
            partitions: vec![PartitionMeta::default(); PARTITIONS],
            sets: Vec::new(),
        }
    }

    /// Encodes into one slot.
    pub fn encode(&self) -> Vec<u8> {
        assert_eq!(self.partitions.len(), PARTITIONS, "metadata must cover every partition");
        assert!(self.sets.len() <= SET_TRUNCATIONS_MAX, "too many set truncations");
        let mut s = vec![0u8; SLOT_BYTES];
        put_u64(&mut s, MAGIC_FIELD, MAGIC);
        put_u32(&mut s, SLOT_SIZE, SLOT_BYTES as u32);
        put_u32(&mut s, PARTITION_COUNT, PARTITIONS as u32);
        put_u64(&mut s, GENERATION, self.generation);
        put_u64(&mut s, DEVICE_SET_ID, self.device_set_id);
        put_u64(&mut s, NAMESPACE_CUTOFF, self.namespace_cutoff_ms);
        put_u32(&mut s, SET_TRUNCATION_COUNT, self.sets.len() as u32);
        for (p, meta) in self.partitions.iter().enumerate() {
            assert!(meta.value.len() <= PARTITION_VALUE_BYTES_MAX, "partition value too long");
            let e = &mut s[PARTITIONS_OFFSET + p * PARTITION_ENTRY_BYTES..][..PARTITION_ENTRY_BYTES];
            put_u32(e, PARTITION_EPOCH, meta.epoch);
            e[PARTITION_VALUE_LEN.offset] = meta.value.len() as u8;
            e[PARTITION_VALUE.offset..PARTITION_VALUE.offset + meta.value.len()].copy_from_slice(&meta.value);
        }
        for (i, (name, cutoff)) in self.sets.iter().enumerate() {
            assert!(name.len() <= SET_NAME_BYTES_MAX && !name.is_empty(), "bad set name in metadata");
            let e = &mut s[SETS_OFFSET + i * SET_ENTRY_BYTES..][..SET_ENTRY_BYTES];
            put_u64(e, SET_CUTOFF, *cutoff);
            e[SET_NAME_LEN.offset] = name.len() as u8;
            e[SET_NAME.offset..SET_NAME.offset + name.len()].copy_from_slice(name);
        }
        let sum = checksum(&s[CHECKSUM.end()..], 0);
        put_u64(&mut s, CHECKSUM, sum);
        s
    }

    /// Decodes a slot; `None` when it is blank, damaged or not a metadata slot.
    pub fn decode(s: &[u8]) -> Option<MetadataImage> {
        let s = s.get(..SLOT_BYTES)?;
        if get_u64(s, MAGIC_FIELD) != MAGIC || get_u64(s, CHECKSUM) != checksum(&s[CHECKSUM.end()..], 0) {
            return None;
        }
        if get_u32(s, SLOT_SIZE) as usize != SLOT_BYTES || get_u32(s, PARTITION_COUNT) as usize != PARTITIONS {
            return None;
        }
        let set_count = get_u32(s, SET_TRUNCATION_COUNT) as usize;
        if set_count > SET_TRUNCATIONS_MAX {
            return None;
        }
        let mut partitions = Vec::with_capacity(PARTITIONS);
        for p in 0..PARTITIONS {
            let e = &s[PARTITIONS_OFFSET + p * PARTITION_ENTRY_BYTES..][..PARTITION_ENTRY_BYTES];
            let len = usize::from(e[PARTITION_VALUE_LEN.offset]);
            if len > PARTITION_VALUE_BYTES_MAX {
                return None;
            }
            let value = e[PARTITION_VALUE.offset..PARTITION_VALUE.offset + len].to_vec();
            partitions.push(PartitionMeta { epoch: get_u32(e, PARTITION_EPOCH), value });
        }
        let mut sets = Vec::with_capacity(set_count);
        for i in 0..set_count {
            let e = &s[SETS_OFFSET + i * SET_ENTRY_BYTES..][..SET_ENTRY_BYTES];
            let len = usize::from(e[SET_NAME_LEN.offset]);
            if len == 0 || len > SET_NAME_BYTES_MAX {
                return None;
            }
            sets.push((e[SET_NAME.offset..SET_NAME.offset + len].to_vec(), get_u64(e, SET_CUTOFF)));
        }
        Some(MetadataImage {
            generation: get_u64(s, GENERATION),
            device_set_id: get_u64(s, DEVICE_SET_ID),
            namespace_cutoff_ms: get_u64(s, NAMESPACE_CUTOFF),
            partitions,
            sets,
        })
    }

    /// The truncation cutoff of `set_name` (0 when none).
    pub fn set_cutoff(&self, set_name: &[u8]) -> u64 {
        self.sets.iter().find(|(n, _)| n == set_name).map_or(0, |(_, c)| *c)
    }

    /// Whether a version of partition `pid` (written in `epoch`, last updated at `lut_ms`, in
    /// set `set_name`) is covered by a truncation: dead whatever else the device holds.
    pub fn truncates(&self, pid: usize, epoch: u32, set_name: &[u8], lut_ms: u64) -> bool {
        epoch < self.partitions[pid].epoch
            || lut_ms <= self.namespace_cutoff_ms
            || (!set_name.is_empty() && lut_ms <= self.set_cutoff(set_name))
    }
}

/// Device offset of slot `slot`.
pub fn slot_offset(slot: usize) -> u64 {
    OFFSET_BYTES + (slot * SLOT_BYTES) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut m = MetadataImage::empty(42);
        m.generation = 7;
        m.namespace_cutoff_ms = 123;
        m.partitions[5] = PartitionMeta { epoch: 3, value: vec![9; PARTITION_VALUE_BYTES_MAX] };
        m.partitions[4095] = PartitionMeta { epoch: u32::MAX, value: vec![1] };
        m.sets = vec![(b"users".to_vec(), 1000), (vec![b'x'; SET_NAME_BYTES_MAX], 5)];
        let bytes = m.encode();
        assert_eq!(MetadataImage::decode(&bytes), Some(m.clone()));
        for i in [0, 9, 40, PARTITIONS_OFFSET + 5 * PARTITION_ENTRY_BYTES, SETS_OFFSET + 3, SLOT_BYTES - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert_eq!(MetadataImage::decode(&bad), None, "flip at {i} went unnoticed");
        }
        assert_eq!(MetadataImage::decode(&vec![0u8; SLOT_BYTES]), None);
        assert!(m.truncates(5, 2, b"", 9999));
        assert!(!m.truncates(5, 3, b"", 9999));
        assert!(m.truncates(0, 0, b"", 123));
        assert!(m.truncates(0, 0, b"users", 1000));
        assert!(!m.truncates(0, 0, b"users", 1001));
        assert!(!m.truncates(0, 0, b"other", 1000));
    }
}
