//! Cold start: rebuild the index, the per-block live bytes and the free list from the devices.
//!
//! Per device (devices in parallel): read every block header (4 KiB each, many in flight), then
//! read each used block with one large sequential read (two in flight), verify every record and
//! resolve copies of one digest so the newest version wins ([`VersionKey`]: the latest
//! last-update time, then the later position in the device's write order). Tombstones take part
//! like any version, so a deleted record never comes back. Damaged or torn regions inside a
//! block's recorded fill are skipped and reported; the scanner resynchronises on the next
//! 16-byte boundary that holds a valid record. Copies covered by a truncation in the metadata
//! region (an older partition epoch, or a last-update time at or before the namespace's or the
//! set's cutoff) are dead and take no part.

use std::collections::VecDeque;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use peregrine_index::{Entry, EntryFlags, Index, Location, PartitionId};

use crate::blocks::{BlockTable, Stream};
use crate::error::{Error, Result};
use crate::format::metadata::MetadataImage;
use crate::format::record;
use crate::io::{AlignedBuf, wait_io};
use crate::scan::{BlockSource, VersionKey, belongs_on, block_read_len, read_block_headers, scan_block};
use crate::sets::SetRegistry;

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
    /// Of those, copies a truncation covers (dead, their space reclaimed).
    pub records_truncated: u64,
    /// Damaged or torn regions skipped.
    pub damaged: Vec<DamagedRegion>,
    /// Highest block sequence seen.
    pub max_sequence: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// One device to recover.
#[derive(Debug)]
pub struct RecoveryTarget<'a> {
    /// The device's blocks.
    pub source: BlockSource<'a>,
    /// Devices in the namespace (a record belongs to the device its digest selects).
    pub device_count: usize,
    /// The block table to fill in.
    pub blocks: &'a BlockTable,
}

/// What every device's recovery shares: the index and set registry being rebuilt, the durable
/// metadata (truncations), and the gate that lets one thread reclaim set ids no winning version
/// uses while the others wait.
#[derive(Debug)]
pub struct RecoveryShared<'a> {
    /// The index being rebuilt.
    pub index: &'a Index,
    /// Set names seen so far.
    pub sets: &'a SetRegistry,
    /// Truncations in force.
    pub metadata: &'a MetadataImage,
    /// Held shared while a version is offered; exclusively while set ids are reclaimed.
    pub set_gate: RwLock<()>,
}

/// Recovers one device into the shared index.
pub fn recover_device(target: &RecoveryTarget<'_>, shared: &RecoveryShared<'_>) -> Result<DeviceRecovery> {
    let started = Instant::now();
    let g = target.source.geometry;
    let mut report = DeviceRecovery {
        device: target.source.label.to_string(),
        blocks_total: target.source.block_count,
        ..DeviceRecovery::default()
    };
    let mut headers = read_block_headers(&target.source)?;
    headers.sort_by_key(|(b, _)| *b);
    for (block, h) in &headers {
        if h.sequence >= crate::blocks::SEQUENCE_LIMIT {
            return Err(Error::Device {
                path: target.source.label.into(),
                detail: format!("block {block} has sequence {} beyond the supported range", h.sequence),
            });
        }
        target.blocks.set_sequence(*block, h.sequence);
        target.blocks.set_seed(*block, h.checksum_seed());
        report.max_sequence = report.max_sequence.max(h.sequence);
    }
    report.blocks_with_data = headers.len() as u32;
    report.bytes_read = headers.len() as u64 * crate::io::IO_ALIGN_BYTES as u64;

    let io = target.source.io;
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
            in_flight.push_back((*block, *h, len, io.read(g.block_offset(*block), buf, len)));
        }
        let Some((block, header, len, c)) = in_flight.pop_front() else {
            break;
        };
        let buf = wait_io(c).map_err(|e| Error::io(format!("reading block {block} of {}", target.source.label), e))?;
        report.bytes_read += len as u64;
        let mut failure = None;
        let scan = scan_block(&buf.as_slice()[..len], &header, |offset, view| {
            if failure.is_none() {
                match offer(target, shared, block, header.sequence, offset, view) {
                    Ok(Offered::Truncated) => report.records_truncated += 1,
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        report.records_scanned += scan.records;
        for (start, end) in scan.damaged {
            tracing::warn!(device = target.source.label, block, start, end, "skipping damaged or torn bytes");
            report.damaged.push(DamagedRegion { block, start, end });
        }
        spare.push(buf);
    }
    let used: Vec<(u32, u64)> = headers.iter().map(|(b, h)| (*b, h.sequence)).collect();
    target.blocks.restore(&used);
    report.elapsed = started.elapsed();
    Ok(report)
}

enum Offered {
    Indexed,
    Older,
    Truncated,
    Elsewhere,
}

/// Offers one verified copy to the index: the newest copy by [`VersionKey`] wins; copies a
/// truncation covers are dead; a digest seen more than once is flagged as having older copies
/// on the device. Only a winning copy gets a set id, and when the ids run out, ids that no
/// indexed version uses any more (set names only dead versions carried) are reclaimed first.
fn offer(
    target: &RecoveryTarget<'_>,
    shared: &RecoveryShared<'_>,
    block: u32,
    sequence: u64,
    offset: u32,
    view: &record::RecordView<'_>,
) -> Result<Offered> {
    let g = target.source.geometry;
    let digest = view.digest();
    if !belongs_on(&digest, g.device_index, target.device_count) {
        tracing::warn!(device = target.source.label, block, offset, %digest, "record belongs to another device; ignored");
        return Ok(Offered::Elsewhere);
    }
    let meta = view.meta();
    if shared.metadata.truncates(
        digest.partition().index(),
        view.partition_epoch(),
        view.set_name(),
        meta.last_update_ms,
    ) {
        return Ok(Offered::Truncated);
    }
    for attempt in 0..2 {
        let gate = shared.set_gate.read().unwrap_or_else(PoisonError::into_inner);
        match offer_gated(target, shared, block, sequence, offset, view) {
            Err(Error::TooManySets { .. }) if attempt == 0 => {
                drop(gate);
                let _exclusive = shared.set_gate.write().unwrap_or_else(PoisonError::into_inner);
                reclaim_set_ids(shared);
            }
            other => return other,
        }
    }
    Err(Error::TooManySets { max: usize::from(peregrine_index::SET_ID_MAX) })
}

/// Gives back the set ids no indexed version uses (names only superseded copies carried).
pub(crate) fn reclaim_set_ids(shared: &RecoveryShared<'_>) {
    let mut used = vec![false; usize::from(peregrine_index::SET_ID_MAX) + 1];
    for pid in PartitionId::all() {
        for e in shared.index.read(pid).iter() {
            used[usize::from(e.set_id)] = true;
        }
    }
    let freed = shared.sets.retain_ids(|id| used[usize::from(id)]);
    if freed > 0 {
        tracing::info!(freed, "set ids of names only superseded copies carried were reclaimed");
    }
}

fn offer_gated(
    target: &RecoveryTarget<'_>,
    shared: &RecoveryShared<'_>,
    block: u32,
    sequence: u64,
    offset: u32,
    view: &record::RecordView<'_>,
) -> Result<Offered> {
    let g = target.source.geometry;
    let digest = view.digest();
    let extent = view.extent() as u64;
    let meta = view.meta();
    let candidate_key = VersionKey { last_update_ms: meta.last_update_ms, sequence, offset };
    let mut table = shared.index.write(digest.partition());
    let (existing, hint) = table.lookup(&digest);
    if let Some(mut existing) = existing {
        let (old_block, old_offset) = g.split(existing.location.offset);
        let existing_key = VersionKey {
            last_update_ms: existing.last_update_ms,
            sequence: target.blocks.sequence(old_block),
            offset: old_offset,
        };
        if candidate_key <= existing_key {
            if !existing.flags.contains(EntryFlags::OLDER_COPIES) {
                existing.flags = existing.flags.with(EntryFlags::OLDER_COPIES, true);
                table.insert_hinted(existing, hint);
            }
            return Ok(Offered::Older);
        }
    }
    let set_id = shared.sets.id_for(view.set_name())?;
    let location =
        Location { device: g.device_index, offset: g.block_offset(block) + u64::from(offset), size: extent as u32 };
    let flags = EntryFlags::empty()
        .with(EntryFlags::TOMBSTONE, view.is_tombstone())
        .with(EntryFlags::KEY_STORED, view.has_key())
        .with(EntryFlags::OLDER_COPIES, existing.is_some());
    let candidate = Entry {
        digest,
        set_id,
        location,
        generation: meta.generation,
        void_time: meta.void_time,
        last_update_ms: meta.last_update_ms,
        flags,
    };
    table.insert_hinted(candidate, hint);
    target.blocks.add_live(block, extent);
    if let Some(old) = existing {
        let (old_block, _) = g.split(old.location.offset);
        target.blocks.remove_live(old_block, u64::from(old.location.size), Stream::Client, 0);
    }
    Ok(Offered::Indexed)
}
