//! Walking what a device holds: every block header of a device set, the bytes of a block worth
//! reading, the verified records of a block, and the rule that picks the newest copy of a record
//! among those found. Shared by cold start, defrag, the tomb raider and the offline tools, so
//! they agree on what a device contains.

use std::collections::VecDeque;
use std::sync::Arc;

use peregrine_index::Digest;

use crate::error::{Error, Result};
use crate::format::block_header::{self, BlockHeader};
use crate::format::{RECORD_ALIGN_BYTES, record};
use crate::geometry::{Geometry, device_for};
use crate::io::{AlignedBuf, DeviceIo, IO_ALIGN_BYTES, align_up, wait_io};

/// Block header reads in flight during a header pass.
const HEADER_READS_IN_FLIGHT: usize = 64;

/// The order of a record's copies: the latest last-update time wins (write positions do not
/// order versions: defrag moves land in their own blocks); on a tie — the same version copied
/// by defrag — the later position (block sequence, offset) wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VersionKey {
    /// The copy's last-update time.
    pub last_update_ms: u64,
    /// Sequence of the block holding it.
    pub sequence: u64,
    /// Its offset within the block.
    pub offset: u32,
}

/// Whether a copy of `digest` found on device `device_index` of a namespace of `device_count`
/// devices counts: a copy on the wrong device (a misdirected write, a reordered device list)
/// is ignored.
pub fn belongs_on(digest: &Digest, device_index: u8, device_count: usize) -> bool {
    device_for(digest, device_count) == usize::from(device_index)
}

/// The result of scanning one block's bytes.
#[derive(Clone, Debug, Default)]
pub struct BlockScan {
    /// Records that verified.
    pub records: u64,
    /// Damaged regions, block-relative (start, end).
    pub damaged: Vec<(u32, u32)>,
    /// Block-relative offset where the last valid record ends.
    pub end: u32,
}

/// Walks the records of one block. `bytes` starts at the block's first byte; `visit` gets each
/// verified record with its block-relative offset.
pub fn scan_block(
    bytes: &[u8],
    header: &BlockHeader,
    mut visit: impl FnMut(u32, &record::RecordView<'_>),
) -> BlockScan {
    let fill = (header.fill_end as usize).max(block_header::BYTES).min(bytes.len());
    let mut scan = BlockScan { end: block_header::BYTES as u32, ..BlockScan::default() };
    let mut pos = block_header::BYTES;
    let mut bad_start: Option<usize> = None;
    while pos + record::HEADER_BYTES <= bytes.len() {
        match record::parse(&bytes[pos..], header.checksum_seed()) {
            Ok(view) => {
                if let Some(start) = bad_start.take() {
                    scan.damaged.push((start as u32, pos as u32));
                }
                visit(pos as u32, &view);
                scan.records += 1;
                pos += view.extent();
                scan.end = pos as u32;
            }
            Err(_) if pos < fill => {
                bad_start.get_or_insert(pos);
                pos += RECORD_ALIGN_BYTES;
            }
            Err(_) => break,
        }
    }
    if let Some(start) = bad_start {
        scan.damaged.push((start as u32, fill.max(start + RECORD_ALIGN_BYTES) as u32));
    }
    scan
}

/// A device whose blocks are read.
#[derive(Debug)]
pub struct BlockSource<'a> {
    /// Device path, for messages.
    pub label: &'a str,
    /// The device's I/O.
    pub io: &'a Arc<dyn DeviceIo>,
    /// Where its blocks are.
    pub geometry: Geometry,
    /// Number of blocks.
    pub block_count: u32,
}

/// Reads every block header; returns the valid ones of this device set.
pub fn read_block_headers(target: &BlockSource<'_>) -> Result<Vec<(u32, BlockHeader)>> {
    let g = target.geometry;
    let mut valid = Vec::new();
    let mut in_flight = VecDeque::new();
    let mut next = 0u32;
    while next < target.block_count || !in_flight.is_empty() {
        while next < target.block_count && in_flight.len() < HEADER_READS_IN_FLIGHT {
            let c = target.io.read(g.block_offset(next), AlignedBuf::zeroed(IO_ALIGN_BYTES), IO_ALIGN_BYTES);
            in_flight.push_back((next, c));
            next += 1;
        }
        let Some((block, c)) = in_flight.pop_front() else {
            break;
        };
        let buf = wait_io(c).map_err(|e| Error::io(format!("reading block {block} header of {}", target.label), e))?;
        if let Some(h) = BlockHeader::decode(buf.as_slice())
            && h.device_set_id == g.device_set_id
            && h.block_index == block
            && h.device_index == u32::from(g.device_index)
        {
            valid.push((block, h));
        }
    }
    Ok(valid)
}

/// Bytes of a block worth reading: up to the recorded fill of a sealed block, else all of it.
pub fn block_read_len(header: &BlockHeader, block_bytes: u32) -> usize {
    if header.sealed && header.fill_end > 0 {
        align_up(u64::from(header.fill_end), IO_ALIGN_BYTES as u64).min(u64::from(block_bytes)) as usize
    } else {
        block_bytes as usize
    }
}
