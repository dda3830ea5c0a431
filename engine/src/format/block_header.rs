//! The 64-byte header at the start of every used write block. It names the block (device set,
//! device index, block index), its sequence number, which orders blocks in time, and a random
//! nonce: record checksums in the block are seeded with `sequence ^ nonce`, so a record left
//! over from an earlier use of the block fails verification — even one whose block was lost in
//! a crash together with its header, and whose sequence a later incarnation reuses.

use super::{Field, checksum, get_u32, get_u64, put_u16, put_u32, put_u64};

/// Size of the block header; records start right after it.
pub const BYTES: usize = 64;
/// "PBLK" as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PBLK");
/// Flag: the block is full and `fill_end` is final.
pub const FLAG_SEALED: u32 = 1;

/// xxh3-64 (seed 0) of bytes 8..64.
pub const CHECKSUM: Field = Field::first("checksum", 8);
/// [`MAGIC`].
pub const MAGIC_FIELD: Field = Field::after(CHECKSUM, "magic", 4);
/// Format version the block was written with (blocks of format 1 and 2 are read alike).
pub const VERSION: Field = Field::after(MAGIC_FIELD, "format_version", 2);
/// [`BYTES`].
pub const HEADER_SIZE: Field = Field::after(VERSION, "header_bytes", 2);
/// Monotonic per device; seeds record checksums.
pub const SEQUENCE: Field = Field::after(HEADER_SIZE, "sequence", 8);
/// The device set this block belongs to.
pub const DEVICE_SET_ID: Field = Field::after(SEQUENCE, "device_set_id", 8);
/// This block's index on the device.
pub const BLOCK_INDEX: Field = Field::after(DEVICE_SET_ID, "block_index", 4);
/// Block-relative offset where the records known to be complete end (0 = none recorded yet).
pub const FILL_END: Field = Field::after(BLOCK_INDEX, "fill_end", 4);
/// Flags ([`FLAG_SEALED`]).
pub const FLAGS: Field = Field::after(FILL_END, "flags", 4);
/// The device's index in its namespace.
pub const DEVICE_INDEX: Field = Field::after(FLAGS, "device_index", 4);
/// When the block was opened for writing, ms since the Unix epoch.
pub const OPENED: Field = Field::after(DEVICE_INDEX, "opened_unix_ms", 8);
/// Random per block incarnation (0 in format-1 blocks); mixed into the checksum seed.
pub const NONCE: Field = Field::after(OPENED, "nonce", 8);

/// The fields in order.
pub const FIELDS: &[Field] = &[
    CHECKSUM,
    MAGIC_FIELD,
    VERSION,
    HEADER_SIZE,
    SEQUENCE,
    DEVICE_SET_ID,
    BLOCK_INDEX,
    FILL_END,
    FLAGS,
    DEVICE_INDEX,
    OPENED,
    NONCE,
];

/// A decoded write-block header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// Block sequence number.
    pub sequence: u64,
    /// Device set id.
    pub device_set_id: u64,
    /// Block index on the device.
    pub block_index: u32,
    /// Where complete records end (block-relative), 0 = unknown.
    pub fill_end: u32,
    /// Whether the block was sealed (full).
    pub sealed: bool,
    /// Device index.
    pub device_index: u32,
    /// When the block was opened.
    pub opened_unix_ms: u64,
    /// Random per incarnation of the block (0 in format-1 blocks).
    pub nonce: u64,
}

/// The seed of the record checksums of a block with `sequence` and `nonce`.
pub fn checksum_seed(sequence: u64, nonce: u64) -> u64 {
    sequence ^ nonce
}

impl BlockHeader {
    /// The seed of the block's record checksums.
    pub fn checksum_seed(&self) -> u64 {
        checksum_seed(self.sequence, self.nonce)
    }

    /// A header to scan a block's in-memory copy with (only the checksum seed and the fill
    /// matter to the scan).
    pub fn for_scan(sequence: u64, nonce: u64, block_index: u32, fill_end: u32) -> BlockHeader {
        BlockHeader {
            sequence,
            nonce,
            device_set_id: 0,
            block_index,
            fill_end,
            sealed: true,
            device_index: 0,
            opened_unix_ms: 0,
        }
    }

    /// Encodes into the first 64 bytes of `out`.
    pub fn encode_into(&self, out: &mut [u8]) {
        let h = &mut out[..BYTES];
        h.fill(0);
        put_u32(h, MAGIC_FIELD, MAGIC);
        put_u16(h, VERSION, super::device_header::FORMAT_VERSION as u16);
        put_u16(h, HEADER_SIZE, BYTES as u16);
        put_u64(h, SEQUENCE, self.sequence);
        put_u64(h, DEVICE_SET_ID, self.device_set_id);
        put_u32(h, BLOCK_INDEX, self.block_index);
        put_u32(h, FILL_END, self.fill_end);
        put_u32(h, FLAGS, if self.sealed { FLAG_SEALED } else { 0 });
        put_u32(h, DEVICE_INDEX, self.device_index);
        put_u64(h, OPENED, self.opened_unix_ms);
        put_u64(h, NONCE, self.nonce);
        let sum = checksum(&h[CHECKSUM.end()..], 0);
        put_u64(h, CHECKSUM, sum);
    }

    /// Decodes and verifies a block header; `None` when the bytes are not a valid header.
    pub fn decode(bytes: &[u8]) -> Option<BlockHeader> {
        let h = bytes.get(..BYTES)?;
        if get_u32(h, MAGIC_FIELD) != MAGIC || get_u64(h, CHECKSUM) != checksum(&h[CHECKSUM.end()..], 0) {
            return None;
        }
        let version = u32::from(super::get_u16(h, VERSION));
        if !(super::device_header::FORMAT_VERSION_MIN..=super::device_header::FORMAT_VERSION).contains(&version) {
            return None;
        }
        Some(BlockHeader {
            sequence: get_u64(h, SEQUENCE),
            device_set_id: get_u64(h, DEVICE_SET_ID),
            block_index: get_u32(h, BLOCK_INDEX),
            fill_end: get_u32(h, FILL_END),
            sealed: get_u32(h, FLAGS) & FLAG_SEALED != 0,
            device_index: get_u32(h, DEVICE_INDEX),
            opened_unix_ms: get_u64(h, OPENED),
            nonce: get_u64(h, NONCE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let h = BlockHeader {
            sequence: 42,
            device_set_id: 9,
            block_index: 3,
            fill_end: 4096,
            sealed: true,
            device_index: 0,
            opened_unix_ms: 5,
            nonce: 0xABCD,
        };
        let mut buf = [0u8; 64];
        h.encode_into(&mut buf);
        assert_eq!(BlockHeader::decode(&buf), Some(h));
        buf[20] ^= 4;
        assert_eq!(BlockHeader::decode(&buf), None);
        assert_eq!(BlockHeader::decode(&[0u8; 64]), None);
        assert_eq!(BlockHeader::decode(&[0u8; 10]), None);
    }
}
