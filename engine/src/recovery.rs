//! Cold start: rebuild the index, the per-block live bytes and the free list from the devices.
//!
//! Per device (devices in parallel): read every block header (4 KiB each, many in flight), then
//! read each used block with one large sequential read (two in flight), verify every record and
//! resolve copies of one digest so the newest version wins. Newest means the latest position in
//! the device's write order: (block sequence, offset within the block). Tombstones take part
//! like any version, so a deleted record never comes back. Damaged or torn regions inside a
//! block's recorded fill are skipped and reported; the scanner resynchronises on the next
//! 16-byte boundary that holds a valid record.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peregrine_index::{Entry, EntryFlags, Index, Location};

use crate::blocks::{BlockTable, Stream};
use crate::error::{Error, Result};
use crate::format::block_header::{self, BlockHeader};
use crate::format::{RECORD_ALIGN_BYTES, record};
use crate::io::{AlignedBuf, DeviceIo, IO_ALIGN_BYTES, align_up, wait_io};
use crate::sets::SetRegistry;
use crate::writer::Geometry;

/// Block header reads in flight during the header pass.
const HEADER_READS_IN_FLIGHT: usize = 64;
/// Whole-block reads in flight during the data pass.
const BLOCK_READS_IN_FLIGHT: usize = 2;

/// A range of a block (block-relative byte offsets) whose bytes did not verify although the
/// block header says records should be there: a torn write or corruption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DamagedRegion {
    /// Block index.
    pub block: u32,
    /// First damaged byte (block-relative).
    pub start: u32,
    /// One past the last damaged byte.
    pub end: u32,
}

/// What the cold start of one device found.
#[derive(Clone, Debug, Default)]
pub struct DeviceRecovery {
    /// Device path.
    pub device: String,
    /// Blocks on the device.
    pub blocks_total: u32,
    /// Blocks with a valid header of this device set.
    pub blocks_with_data: u32,
    /// Bytes read.
    pub bytes_read: u64,
    /// Records that verified (every version, live or not).
    pub records_scanned: u64,
    /// Damaged or torn regions skipped.
    pub damaged: Vec<DamagedRegion>,
    /// Highest block sequence seen.
    pub max_sequence: u64,
    /// Time taken.
    pub elapsed: Duration,
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
        match record::parse(&bytes[pos..], header.sequence) {
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

/// One device to recover.
#[derive(Debug)]
pub struct RecoveryTarget<'a> {
    /// Device path, for messages.
    pub label: &'a str,
    /// The device's I/O.
    pub io: &'a Arc<dyn DeviceIo>,
    /// Where its blocks are.
    pub geometry: Geometry,
    /// Number of blocks.
    pub block_count: u32,
    /// Devices in the namespace (a record belongs to the device its digest selects).
    pub device_count: usize,
    /// The block table to fill in.
    pub blocks: &'a BlockTable,
}

/// Reads every block header; returns the valid ones of this device set.
pub fn read_block_headers(target: &RecoveryTarget<'_>) -> Result<Vec<(u32, BlockHeader)>> {
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

/// Recovers one device into the shared index.
pub fn recover_device(target: &RecoveryTarget<'_>, index: &Index, sets: &SetRegistry) -> Result<DeviceRecovery> {
    let started = Instant::now();
    let g = target.geometry;
    let mut report = DeviceRecovery {
        device: target.label.to_string(),
        blocks_total: target.block_count,
        ..DeviceRecovery::default()
    };
    let mut headers = read_block_headers(target)?;
    headers.sort_by_key(|(b, _)| *b);
    for (block, h) in &headers {
        target.blocks.set_sequence(*block, h.sequence);
        report.max_sequence = report.max_sequence.max(h.sequence);
    }
    report.blocks_with_data = headers.len() as u32;
    report.bytes_read = headers.len() as u64 * IO_ALIGN_BYTES as u64;

    let mut in_flight = VecDeque::new();
    let mut pending = headers.iter();
    let mut spare: Vec<AlignedBuf> = Vec::new();
    loop {
        while in_flight.len() < BLOCK_READS_IN_FLIGHT {
            let Some((block, h)) = pending.next() else {
                break;
            };
            let len = block_read_len(h, g.block_bytes);
            let buf = spare.pop().unwrap_or_else(|| AlignedBuf::zeroed(g.block_bytes as usize));
            in_flight.push_back((*block, *h, len, target.io.read(g.block_offset(*block), buf, len)));
        }
        let Some((block, header, len, c)) = in_flight.pop_front() else {
            break;
        };
        let buf = wait_io(c).map_err(|e| Error::io(format!("reading block {block} of {}", target.label), e))?;
        report.bytes_read += len as u64;
        let mut failure = None;
        let scan = scan_block(&buf.as_slice()[..len], &header, |offset, view| {
            if failure.is_none()
                && let Err(e) = apply(target, index, sets, block, header.sequence, offset, view)
            {
                failure = Some(e);
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        report.records_scanned += scan.records;
        for (start, end) in scan.damaged {
            tracing::warn!(device = target.label, block, start, end, "skipping damaged or torn bytes");
            report.damaged.push(DamagedRegion { block, start, end });
        }
        spare.push(buf);
    }
    let used: Vec<(u32, u64)> = headers.iter().map(|(b, h)| (*b, h.sequence)).collect();
    target.blocks.restore(&used);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Offers one verified record version to the index. The latest last-update time wins (write
/// positions do not order versions: defrag moves land in their own blocks); a tie means the
/// same version copied by defrag, and the later position is kept. A digest seen more than
/// once is flagged as having older copies on the device.
fn apply(
    target: &RecoveryTarget<'_>,
    index: &Index,
    sets: &SetRegistry,
    block: u32,
    sequence: u64,
    offset: u32,
    view: &record::RecordView<'_>,
) -> Result<()> {
    let g = target.geometry;
    let digest = view.digest();
    if crate::engine::device_for(&digest, target.device_count) != usize::from(g.device_index) {
        tracing::warn!(device = target.label, block, offset, %digest, "record belongs to another device; ignored");
        return Ok(());
    }
    let extent = view.extent() as u64;
    let location =
        Location { device: g.device_index, offset: g.block_offset(block) + u64::from(offset), size: extent as u32 };
    let meta = view.meta();
    let mut flags = EntryFlags::empty();
    flags = flags.with(EntryFlags::TOMBSTONE, view.is_tombstone()).with(EntryFlags::KEY_STORED, view.has_key());
    let set_id = sets.id_for(view.set_name())?;
    let candidate = Entry {
        digest,
        set_id,
        location,
        generation: meta.generation,
        void_time: meta.void_time,
        last_update_ms: meta.last_update_ms,
        flags,
    };
    let mut table = index.write(digest.partition());
    let (existing, hint) = table.lookup(&digest);
    match existing {
        None => {
            table.insert_hinted(candidate, hint);
            target.blocks.add_live(block, extent);
        }
        Some(mut existing) => {
            let (old_block, old_offset) = g.split(existing.location.offset);
            let existing_key = (existing.last_update_ms, target.blocks.sequence(old_block), old_offset);
            if (candidate.last_update_ms, sequence, offset) > existing_key {
                let flagged = Entry { flags: candidate.flags.with(EntryFlags::OLDER_COPIES, true), ..candidate };
                table.insert_hinted(flagged, hint);
                target.blocks.add_live(block, extent);
                target.blocks.remove_live(old_block, u64::from(existing.location.size), Stream::Client, 0);
            } else if !existing.flags.contains(EntryFlags::OLDER_COPIES) {
                existing.flags = existing.flags.with(EntryFlags::OLDER_COPIES, true);
                table.insert_hinted(existing, hint);
            }
        }
    }
    Ok(())
}
