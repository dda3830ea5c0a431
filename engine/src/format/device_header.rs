//! The device header: two 4096-byte slots at offsets 0 and 4096. Each update writes the slot
//! the current one is not in, with a higher generation, so a torn header write leaves the other
//! slot intact. Opening reads both and uses the valid slot with the highest generation.

use super::{Field, checksum, get_u32, get_u64, put_u32, put_u64};

/// Size of one header slot.
pub const SLOT_BYTES: usize = 4096;
/// Number of slots.
pub const SLOT_COUNT: usize = 2;
/// "PEREGRN1" as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PEREGRN1");
/// Current format version: 2 adds the metadata region (see `format::metadata`) and the
/// partition epoch in record headers.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest format version that can be opened: a format-1 device is upgraded in place when an
/// engine opens it (the metadata region is written, then the header says 2); the offline tools
/// read it as it is.
pub const FORMAT_VERSION_MIN: u32 = 1;
/// Longest namespace name.
pub const NAMESPACE_BYTES_MAX: usize = 31;
/// Flag: the engine shut down cleanly (every buffer flushed) and no writer has opened it since.
pub const FLAG_CLEAN_SHUTDOWN: u32 = 1;

/// xxh3-64 (seed 0) of bytes 8..4096 of the slot.
pub const CHECKSUM: Field = Field::first("checksum", 8);
/// [`MAGIC`].
pub const MAGIC_FIELD: Field = Field::after(CHECKSUM, "magic", 8);
/// [`FORMAT_VERSION`].
pub const VERSION: Field = Field::after(MAGIC_FIELD, "format_version", 4);
/// [`SLOT_BYTES`].
pub const SLOT_SIZE: Field = Field::after(VERSION, "slot_bytes", 4);
/// Increases by one on every header write; the higher valid slot wins.
pub const GENERATION: Field = Field::after(SLOT_SIZE, "header_generation", 8);
/// Random id shared by every device of the namespace, chosen at format time.
pub const DEVICE_SET_ID: Field = Field::after(GENERATION, "device_set_id", 8);
/// This device's position in the namespace's device list.
pub const DEVICE_INDEX: Field = Field::after(DEVICE_SET_ID, "device_index", 4);
/// Number of devices in the namespace.
pub const DEVICE_COUNT: Field = Field::after(DEVICE_INDEX, "device_count", 4);
/// Write block size in bytes.
pub const WRITE_BLOCK_BYTES: Field = Field::after(DEVICE_COUNT, "write_block_bytes", 4);
/// Flags ([`FLAG_CLEAN_SHUTDOWN`]).
pub const FLAGS: Field = Field::after(WRITE_BLOCK_BYTES, "flags", 4);
/// Bytes of the device covered by the format.
pub const DEVICE_BYTES: Field = Field::after(FLAGS, "device_bytes", 8);
/// Offset of write block 0.
pub const DATA_OFFSET: Field = Field::after(DEVICE_BYTES, "data_offset", 8);
/// Number of write blocks.
pub const BLOCK_COUNT: Field = Field::after(DATA_OFFSET, "block_count", 4);
/// Zero.
pub const RESERVED: Field = Field::after(BLOCK_COUNT, "reserved", 4);
/// When the device was formatted, ms since the Unix epoch.
pub const CREATED: Field = Field::after(RESERVED, "created_unix_ms", 8);
/// Length of the namespace name.
pub const NAMESPACE_LEN: Field = Field::after(CREATED, "namespace_len", 1);
/// Namespace name, zero padded.
pub const NAMESPACE: Field = Field::after(NAMESPACE_LEN, "namespace", NAMESPACE_BYTES_MAX);

/// The fields in order.
pub const FIELDS: &[Field] = &[
    CHECKSUM,
    MAGIC_FIELD,
    VERSION,
    SLOT_SIZE,
    GENERATION,
    DEVICE_SET_ID,
    DEVICE_INDEX,
    DEVICE_COUNT,
    WRITE_BLOCK_BYTES,
    FLAGS,
    DEVICE_BYTES,
    DATA_OFFSET,
    BLOCK_COUNT,
    RESERVED,
    CREATED,
    NAMESPACE_LEN,
    NAMESPACE,
];

/// The decoded device header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHeader {
    /// Header write counter.
    pub generation: u64,
    /// Shared by every device of the namespace.
    pub device_set_id: u64,
    /// This device's index.
    pub device_index: u32,
    /// Devices in the namespace.
    pub device_count: u32,
    /// Write block size.
    pub write_block_bytes: u32,
    /// Whether the last writer shut down cleanly.
    pub clean_shutdown: bool,
    /// Bytes covered by the format.
    pub device_bytes: u64,
    /// Offset of write block 0.
    pub data_offset: u64,
    /// Number of write blocks.
    pub block_count: u32,
    /// Format time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Namespace name.
    pub namespace: String,
    /// Format version the header was written with ([`FORMAT_VERSION_MIN`]..=[`FORMAT_VERSION`]);
    /// encoding always writes [`FORMAT_VERSION`].
    pub format_version: u32,
}

/// Why a header slot could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotDefect {
    /// Every byte is zero: the slot was never written.
    Blank,
    /// Not a Peregrine header.
    Foreign,
    /// A Peregrine header whose checksum fails (torn write or damage).
    Checksum,
    /// A Peregrine header of another format version.
    Version(u32),
    /// A field is out of range.
    Malformed(&'static str),
}

impl DeviceHeader {
    /// Encodes into a 4096-byte slot.
    pub fn encode(&self) -> [u8; SLOT_BYTES] {
        assert!(self.namespace.len() <= NAMESPACE_BYTES_MAX, "namespace name too long");
        let mut s = [0u8; SLOT_BYTES];
        put_u64(&mut s, MAGIC_FIELD, MAGIC);
        put_u32(&mut s, VERSION, FORMAT_VERSION);
        put_u32(&mut s, SLOT_SIZE, SLOT_BYTES as u32);
        put_u64(&mut s, GENERATION, self.generation);
        put_u64(&mut s, DEVICE_SET_ID, self.device_set_id);
        put_u32(&mut s, DEVICE_INDEX, self.device_index);
        put_u32(&mut s, DEVICE_COUNT, self.device_count);
        put_u32(&mut s, WRITE_BLOCK_BYTES, self.write_block_bytes);
        put_u32(&mut s, FLAGS, if self.clean_shutdown { FLAG_CLEAN_SHUTDOWN } else { 0 });
        put_u64(&mut s, DEVICE_BYTES, self.device_bytes);
        put_u64(&mut s, DATA_OFFSET, self.data_offset);
        put_u32(&mut s, BLOCK_COUNT, self.block_count);
        put_u64(&mut s, CREATED, self.created_unix_ms);
        s[NAMESPACE_LEN.offset] = self.namespace.len() as u8;
        s[NAMESPACE.offset..NAMESPACE.offset + self.namespace.len()].copy_from_slice(self.namespace.as_bytes());
        let sum = checksum(&s[CHECKSUM.end()..], 0);
        put_u64(&mut s, CHECKSUM, sum);
        s
    }

    /// Decodes and verifies one slot (at least [`SLOT_BYTES`] bytes).
    pub fn decode(slot: &[u8]) -> Result<DeviceHeader, SlotDefect> {
        let Some(s) = slot.get(..SLOT_BYTES) else {
            return Err(SlotDefect::Malformed("short slot"));
        };
        if s.iter().all(|&b| b == 0) {
            return Err(SlotDefect::Blank);
        }
        if get_u64(s, MAGIC_FIELD) != MAGIC {
            return Err(SlotDefect::Foreign);
        }
        if get_u64(s, CHECKSUM) != checksum(&s[CHECKSUM.end()..], 0) {
            return Err(SlotDefect::Checksum);
        }
        let version = get_u32(s, VERSION);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(SlotDefect::Version(version));
        }
        let ns_len = usize::from(s[NAMESPACE_LEN.offset]);
        if ns_len == 0 || ns_len > NAMESPACE_BYTES_MAX {
            return Err(SlotDefect::Malformed("namespace length"));
        }
        let namespace = std::str::from_utf8(&s[NAMESPACE.offset..NAMESPACE.offset + ns_len])
            .map_err(|_| SlotDefect::Malformed("namespace is not UTF-8"))?
            .to_string();
        let header = DeviceHeader {
            generation: get_u64(s, GENERATION),
            device_set_id: get_u64(s, DEVICE_SET_ID),
            device_index: get_u32(s, DEVICE_INDEX),
            device_count: get_u32(s, DEVICE_COUNT),
            write_block_bytes: get_u32(s, WRITE_BLOCK_BYTES),
            clean_shutdown: get_u32(s, FLAGS) & FLAG_CLEAN_SHUTDOWN != 0,
            device_bytes: get_u64(s, DEVICE_BYTES),
            data_offset: get_u64(s, DATA_OFFSET),
            block_count: get_u32(s, BLOCK_COUNT),
            created_unix_ms: get_u64(s, CREATED),
            namespace,
            format_version: version,
        };
        if header.device_count == 0 || header.device_index >= header.device_count {
            return Err(SlotDefect::Malformed("device index/count"));
        }
        if !(super::WRITE_BLOCK_BYTES_MIN..=super::WRITE_BLOCK_BYTES_MAX).contains(&header.write_block_bytes)
            || !header.write_block_bytes.is_power_of_two()
        {
            return Err(SlotDefect::Malformed("write block size"));
        }
        let blocks_end = header.data_offset + u64::from(header.block_count) * u64::from(header.write_block_bytes);
        if header.data_offset < (SLOT_BYTES * SLOT_COUNT) as u64 || blocks_end > header.device_bytes {
            return Err(SlotDefect::Malformed("block area outside the device"));
        }
        Ok(header)
    }
}

/// Picks the newest valid slot. Returns the header and which slot it came from, or the defects
/// of both slots.
pub fn choose_slot(slots: &[u8]) -> Result<(DeviceHeader, usize), [SlotDefect; SLOT_COUNT]> {
    let a = DeviceHeader::decode(slots.get(..SLOT_BYTES).unwrap_or(&[]));
    let b = DeviceHeader::decode(slots.get(SLOT_BYTES..2 * SLOT_BYTES).unwrap_or(&[]));
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { (b, 1) } else { (a, 0) }),
        (Ok(a), Err(_)) => Ok((a, 0)),
        (Err(_), Ok(b)) => Ok((b, 1)),
        (Err(ea), Err(eb)) => Err([ea, eb]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceHeader {
        DeviceHeader {
            generation: 7,
            device_set_id: 0xDEAD_BEEF,
            device_index: 1,
            device_count: 2,
            write_block_bytes: 1 << 20,
            clean_shutdown: true,
            device_bytes: 64 << 20,
            data_offset: super::super::DATA_OFFSET_BYTES,
            block_count: 63,
            created_unix_ms: 1_700_000_000_000,
            namespace: "test".into(),
            format_version: FORMAT_VERSION,
        }
    }

    #[test]
    fn round_trip_and_defects() {
        let h = sample();
        let mut s = h.encode();
        assert_eq!(DeviceHeader::decode(&s), Ok(h));
        s[100] ^= 1;
        assert_eq!(DeviceHeader::decode(&s), Err(SlotDefect::Checksum));
        assert_eq!(DeviceHeader::decode(&[0u8; SLOT_BYTES]), Err(SlotDefect::Blank));
        assert_eq!(DeviceHeader::decode(&[0xAB; SLOT_BYTES]), Err(SlotDefect::Foreign));
        let mut bad = sample();
        bad.device_index = 2;
        assert_eq!(DeviceHeader::decode(&bad.encode()), Err(SlotDefect::Malformed("device index/count")));
    }

    #[test]
    fn newest_valid_slot_wins() {
        let mut both = vec![0u8; 2 * SLOT_BYTES];
        let mut old = sample();
        old.generation = 1;
        let mut new = sample();
        new.generation = 2;
        both[..SLOT_BYTES].copy_from_slice(&old.encode());
        both[SLOT_BYTES..].copy_from_slice(&new.encode());
        assert_eq!(choose_slot(&both).unwrap().1, 1);
        // A torn newer slot falls back to the older one.
        both[SLOT_BYTES + 200] ^= 0xFF;
        assert_eq!(choose_slot(&both).unwrap(), (old, 0));
        assert!(choose_slot(&[0u8; 2 * SLOT_BYTES]).is_err());
    }
}
