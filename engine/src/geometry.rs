//! Where records live: a device's block geometry (block offsets, splitting a device offset into
//! block and offset) and the placement of a digest's records on one device of the namespace.

use peregrine_index::Digest;

/// Where blocks sit on a device.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// The device's index in the namespace.
    pub device_index: u8,
    /// Offset of block 0.
    pub data_offset: u64,
    /// Write block size.
    pub block_bytes: u32,
    /// The device set id (written into block headers).
    pub device_set_id: u64,
}

impl Geometry {
    /// Device offset of `block`.
    pub fn block_offset(&self, block: u32) -> u64 {
        self.data_offset + u64::from(block) * u64::from(self.block_bytes)
    }

    /// (block, offset within block) of a device offset inside the block area.
    pub fn split(&self, offset: u64) -> (u32, u32) {
        debug_assert!(offset >= self.data_offset, "offset {offset} is before the block area");
        let rel = offset - self.data_offset;
        ((rel / u64::from(self.block_bytes)) as u32, (rel % u64::from(self.block_bytes)) as u32)
    }
}

/// The device a digest's records live on: LE u32 of digest bytes 8..12, mod the device count.
pub fn device_for(digest: &Digest, device_count: usize) -> usize {
    let d = &digest.0;
    u32::from_le_bytes([d[8], d[9], d[10], d[11]]) as usize % device_count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choice_uses_digest_bytes_8_to_12() {
        // Bytes 8..12 decide; every other byte is irrelevant.
        let mut d = Digest([0xAB; 20]);
        d.0[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(device_for(&d, 3), 1);
        assert_eq!(device_for(&d, 4), 3);
        assert_eq!(device_for(&d, 7), 0);
        d.0[8..12].copy_from_slice(&(256u32 * 5 + 2).to_le_bytes());
        assert_eq!(device_for(&d, 1000), 282, "little-endian u32 of bytes 8..12");
        for i in (0..8).chain(12..20) {
            let mut other = d;
            other.0[i] ^= 0xFF;
            assert_eq!(device_for(&other, 1000), 282, "byte {i} must not affect placement");
        }
        assert_eq!(device_for(&d, 1), 0);
    }

    #[test]
    fn split_inverts_block_offset() {
        let g = Geometry { device_index: 0, data_offset: 1 << 20, block_bytes: 128 * 1024, device_set_id: 1 };
        assert_eq!(g.split(g.block_offset(5) + 4096), (5, 4096));
        assert_eq!(g.split(g.block_offset(0)), (0, 0));
    }
}
