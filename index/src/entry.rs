//! What the index remembers about one record: where its newest version lives and its metadata,
//! and the packed 40-byte form the partition tables store.
//!
//! Packed layout (little-endian within each field):
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..18  | digest[2..20] |
//! | 18..20 | u16: bits 0..4 = digest[1] >> 4, bits 4..16 = set id |
//! | 20..24 | u32 void time (seconds since 2010-01-01 UTC, 0 = never) |
//! | 24..32 | u64 location: bits 0..7 device, 7..44 offset / 16, 44..63 size / 16 - 1 |
//! | 32..34 | u16 generation (never 0; 0 marks an empty slot) |
//! | 34..40 | u48: bits 0..44 last-update time (ms since Unix epoch), bits 44..48 flags |
//!
//! digest[0] and the low nibble of digest[1] are the partition id, which the owning table knows,
//! so they are not stored.

use crate::digest::{DIGEST_LEN, Digest, PartitionId};

/// Size in bytes of one packed index entry.
pub const PACKED_ENTRY_LEN: usize = 40;
/// Records are placed on 16-byte boundaries and their extents are multiples of 16 bytes.
pub const LOCATION_ALIGN_BYTES: u64 = 16;
/// Largest number of devices a namespace can have (7 bits of device number).
pub const DEVICES_MAX: usize = 128;
/// Largest device size the location can address (37 bits of 16-byte units).
pub const DEVICE_BYTES_MAX: u64 = (1 << 37) * LOCATION_ALIGN_BYTES;
/// Largest record extent the location can describe (19 bits of 16-byte units).
pub const RECORD_EXTENT_BYTES_MAX: u32 = (1 << 19) * LOCATION_ALIGN_BYTES as u32;
/// Largest set id (12 bits); 0 means "no set".
pub const SET_ID_MAX: u16 = 4095;
/// Last-update times are kept in 44 bits of milliseconds (until the year 2527).
pub const LAST_UPDATE_MS_MAX: u64 = (1 << 44) - 1;

/// Where a record version lives: which device of the namespace, at which byte offset, and how
/// many bytes it occupies (its length rounded up to 16).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Location {
    /// Device number within the namespace, `< DEVICES_MAX`.
    pub device: u8,
    /// Byte offset on the device, a multiple of 16.
    pub offset: u64,
    /// Extent in bytes, a multiple of 16, `16..=RECORD_EXTENT_BYTES_MAX`.
    pub size: u32,
}

impl Location {
    /// Whether the fields fit the packed form.
    pub fn is_valid(&self) -> bool {
        usize::from(self.device) < DEVICES_MAX
            && self.offset.is_multiple_of(LOCATION_ALIGN_BYTES)
            && self.offset < DEVICE_BYTES_MAX
            && u64::from(self.size) % LOCATION_ALIGN_BYTES == 0
            && self.size >= LOCATION_ALIGN_BYTES as u32
            && self.size <= RECORD_EXTENT_BYTES_MAX
    }

    fn pack(&self) -> u64 {
        assert!(self.is_valid(), "location out of range: {self:?}");
        u64::from(self.device)
            | (self.offset / LOCATION_ALIGN_BYTES) << 7
            | (u64::from(self.size) / LOCATION_ALIGN_BYTES - 1) << 44
    }

    fn unpack(word: u64) -> Location {
        Location {
            device: (word & 0x7F) as u8,
            offset: ((word >> 7) & ((1 << 37) - 1)) * LOCATION_ALIGN_BYTES,
            size: ((((word >> 44) & ((1 << 19) - 1)) + 1) * LOCATION_ALIGN_BYTES) as u32,
        }
    }
}

/// Per-record flags kept in the index (4 bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct EntryFlags(u8);

impl EntryFlags {
    /// The newest version is a tombstone: the record is deleted, but the tombstone must be kept
    /// so that older copies on the device do not come back.
    pub const TOMBSTONE: EntryFlags = EntryFlags(1);
    /// The record carries its user key.
    pub const KEY_STORED: EntryFlags = EntryFlags(2);
    /// Older versions of this record may still be on the device (this version replaced
    /// another, or recovery saw several copies): expiring it needs a tombstone, or an older copy
    /// could come back at the next cold start.
    pub const OLDER_COPIES: EntryFlags = EntryFlags(4);
    /// All four bits.
    const MASK: u8 = 0x0F;

    /// No flags.
    pub const fn empty() -> EntryFlags {
        EntryFlags(0)
    }

    /// Flags from raw bits (bits above the fourth are dropped).
    pub const fn from_bits(bits: u8) -> EntryFlags {
        EntryFlags(bits & Self::MASK)
    }

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: EntryFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the flags of `other` set or cleared.
    pub const fn with(self, other: EntryFlags, on: bool) -> EntryFlags {
        if on { EntryFlags(self.0 | other.0) } else { EntryFlags(self.0 & !other.0) }
    }
}

/// One record's index entry, unpacked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry {
    /// The record's identity.
    pub digest: Digest,
    /// The set the record belongs to (0 = none), an id assigned by the engine.
    pub set_id: u16,
    /// Where the newest version is stored.
    pub location: Location,
    /// 1 on create, +1 per write, wrapping past 65535 to 1; never 0.
    pub generation: u16,
    /// Expiry in seconds since 2010-01-01 UTC; 0 = never.
    pub void_time: u32,
    /// Last update, milliseconds since the Unix epoch (44 bits).
    pub last_update_ms: u64,
    /// Tombstone and key-stored flags.
    pub flags: EntryFlags,
}

impl Entry {
    /// Whether this entry is a tombstone (the record is deleted).
    pub fn is_tombstone(&self) -> bool {
        self.flags.contains(EntryFlags::TOMBSTONE)
    }
}

/// The packed 40-byte form of an [`Entry`]. All zeros is an empty slot.
pub(crate) type Packed = [u8; PACKED_ENTRY_LEN];

pub(crate) const EMPTY: Packed = [0; PACKED_ENTRY_LEN];

/// Packs `entry`. The caller guarantees the digest belongs to the table's partition.
pub(crate) fn pack(entry: &Entry) -> Packed {
    assert!(entry.generation != 0, "generation 0 is reserved for empty slots");
    assert!(entry.set_id <= SET_ID_MAX, "set id {} exceeds 12 bits", entry.set_id);
    let mut out = EMPTY;
    out[0..18].copy_from_slice(&entry.digest.0[2..DIGEST_LEN]);
    let nibble_and_set = u16::from(entry.digest.0[1] >> 4) | (entry.set_id << 4);
    out[18..20].copy_from_slice(&nibble_and_set.to_le_bytes());
    out[20..24].copy_from_slice(&entry.void_time.to_le_bytes());
    out[24..32].copy_from_slice(&entry.location.pack().to_le_bytes());
    out[32..34].copy_from_slice(&entry.generation.to_le_bytes());
    let lut = entry.last_update_ms.min(LAST_UPDATE_MS_MAX);
    let tail = lut | u64::from(entry.flags.bits()) << 44;
    out[34..40].copy_from_slice(&tail.to_le_bytes()[0..6]);
    out
}

/// Unpacks a non-empty slot of partition `pid`.
pub(crate) fn unpack(pid: PartitionId, slot: &Packed) -> Entry {
    let mut digest = [0u8; DIGEST_LEN];
    let p = pid.get();
    let nibble_and_set = u16::from_le_bytes([slot[18], slot[19]]);
    digest[0] = (p & 0xFF) as u8;
    digest[1] = ((p >> 8) & 0x0F) as u8 | (((nibble_and_set & 0x0F) as u8) << 4);
    digest[2..DIGEST_LEN].copy_from_slice(&slot[0..18]);
    let mut tail = [0u8; 8];
    tail[0..6].copy_from_slice(&slot[34..40]);
    let tail = u64::from_le_bytes(tail);
    Entry {
        digest: Digest(digest),
        set_id: nibble_and_set >> 4,
        void_time: u32::from_le_bytes([slot[20], slot[21], slot[22], slot[23]]),
        location: Location::unpack(u64::from_le_bytes(word8(&slot[24..32]))),
        generation: u16::from_le_bytes([slot[32], slot[33]]),
        last_update_ms: tail & LAST_UPDATE_MS_MAX,
        flags: EntryFlags::from_bits((tail >> 44) as u8),
    }
}

/// Whether a slot is empty (generation 0).
pub(crate) fn is_empty(slot: &Packed) -> bool {
    slot[32] == 0 && slot[33] == 0
}

/// The 64-bit ordering hash of a digest within its partition: the bits after the partition id,
/// so ordering by this hash is ordering by digest.
pub(crate) fn order_hash(digest: &Digest) -> u64 {
    let d = &digest.0;
    (u64::from(d[1] >> 4) << 60) | (u64::from_be_bytes(word8(&d[2..10])) >> 4)
}

/// [`order_hash`] of the digest stored in a slot.
pub(crate) fn slot_order_hash(slot: &Packed) -> u64 {
    (u64::from(slot[18] & 0x0F) << 60) | (u64::from_be_bytes(word8(&slot[0..8])) >> 4)
}

/// Whether a slot holds `digest` (the partition bits are implied).
pub(crate) fn slot_matches(slot: &Packed, digest: &Digest) -> bool {
    slot[0..18] == digest.0[2..DIGEST_LEN] && (slot[18] & 0x0F) == digest.0[1] >> 4
}

fn word8(bytes: &[u8]) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::KeyRef;

    fn sample(i: i64) -> Entry {
        Entry {
            digest: Digest::of_key(b"set", KeyRef::Int(i)),
            set_id: 4095,
            location: Location { device: 127, offset: DEVICE_BYTES_MAX - 16, size: RECORD_EXTENT_BYTES_MAX },
            generation: 65535,
            void_time: u32::MAX,
            last_update_ms: LAST_UPDATE_MS_MAX,
            flags: EntryFlags::TOMBSTONE.with(EntryFlags::KEY_STORED, true),
        }
    }

    #[test]
    fn pack_round_trips_extremes() {
        for i in 0..1000 {
            let e = sample(i);
            let packed = pack(&e);
            assert!(!is_empty(&packed));
            assert!(slot_matches(&packed, &e.digest));
            assert_eq!(slot_order_hash(&packed), order_hash(&e.digest));
            assert_eq!(unpack(e.digest.partition(), &packed), e);
        }
    }

    #[test]
    fn pack_round_trips_small_values() {
        let e = Entry {
            digest: Digest::of_key(b"", KeyRef::String(b"x")),
            set_id: 0,
            location: Location { device: 0, offset: 0, size: 16 },
            generation: 1,
            void_time: 0,
            last_update_ms: 0,
            flags: EntryFlags::empty(),
        };
        assert_eq!(unpack(e.digest.partition(), &pack(&e)), e);
    }

    #[test]
    fn location_validity() {
        assert!(!Location { device: 128, offset: 0, size: 16 }.is_valid());
        assert!(!Location { device: 0, offset: 8, size: 16 }.is_valid());
        assert!(!Location { device: 0, offset: 0, size: 0 }.is_valid());
        assert!(!Location { device: 0, offset: 0, size: RECORD_EXTENT_BYTES_MAX + 16 }.is_valid());
        assert!(!Location { device: 0, offset: DEVICE_BYTES_MAX, size: 16 }.is_valid());
    }

    #[test]
    fn order_hash_follows_digest_order_within_a_partition() {
        let mut digests: Vec<Digest> =
            (0..200_000).map(|i| Digest::of_key(b"", KeyRef::Int(i))).filter(|d| d.partition().get() == 7).collect();
        assert!(digests.len() > 1);
        digests.sort();
        for pair in digests.windows(2) {
            assert!(order_hash(&pair[0]) <= order_hash(&pair[1]));
        }
    }
}
