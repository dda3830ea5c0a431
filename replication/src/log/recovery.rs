//! Opening a log: scan every segment in order, verify each batch (header checksum, segment,
//! contiguous global batch sequence, payload checksum), replay its items into every group's
//! index, and stop at the first bad batch. A bad batch is a torn tail only if nothing valid
//! follows it: a valid later batch (in the same segment or a later one with a gap in the
//! sequence) means acknowledged data would be dropped, so the log refuses to open.
//!
//! Policy for what follows the head (the last segment holding a batch): batchless segments
//! after it (spares, or a spare whose creation a crash interrupted) are deleted and a fresh
//! spare is created; segment sequences are never reused.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use openraft::RaftTypeConfig;
use openraft::type_config::alias::{LogIdOf, VoteOf};

use peregrine_engine::io::AlignedBuf;

use super::LogOptions;
use super::format::{
    self, ALIGN_BYTES, BATCH_HEADER_BYTES, BatchHeader, ItemKind, SEGMENT_HEADER_BYTES, SegmentHeader, corrupt,
};
use super::index::{GroupIndex, Loc, Slot};
use super::segment::{self, Segment};

/// Bytes read at a time when checking what follows a bad batch.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// Where recovery stopped reading a segment because the bytes there were not a valid batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryCut {
    /// Segment sequence.
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Why the batch there was rejected.
    pub reason: String,
}

/// What opening the log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments scanned.
    pub segments: usize,
    /// Valid batches replayed.
    pub batches: u64,
    /// Items replayed.
    pub items: u64,
    /// Entry records replayed.
    pub entries: u64,
    /// Groups with state after replay.
    pub groups: usize,
    /// Torn tails cut (bytes that were not blank where the next batch would be).
    pub cuts: Vec<RecoveryCut>,
    /// Batchless segments after the head that were deleted.
    pub deleted_segments: Vec<u64>,
    /// Whether the log was created by this open.
    pub created: bool,
}

pub(crate) struct Head {
    pub seg: Arc<Segment>,
    pub offset: u64,
}

pub(crate) struct Recovered<C: RaftTypeConfig> {
    pub groups: HashMap<u32, GroupIndex<C>>,
    pub segments: BTreeMap<u64, Arc<Segment>>,
    pub head: Head,
    pub spare: Option<Arc<Segment>>,
    pub next_batch_seq: u64,
    pub next_segment_seq: u64,
    pub log_id: [u8; 16],
    pub report: RecoveryReport,
}

fn new_log_id() -> [u8; 16] {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut seed = Vec::new();
    seed.extend_from_slice(&now.to_le_bytes());
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    let local = 0u8;
    seed.extend_from_slice(&(&local as *const u8 as usize as u64).to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&seed).to_le_bytes()
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str, at: &str) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(format!("{at}: {what} does not decode: {e}")))
}

/// Scans the log directory and rebuilds every group (see the module documentation).
pub(crate) fn recover<C: RaftTypeConfig>(options: &LogOptions) -> io::Result<Recovered<C>> {
    let files = segment::list(&options.dir)?;
    let mut report = RecoveryReport::default();
    if files.is_empty() {
        let log_id = new_log_id();
        let head = Arc::new(Segment::create(&options.dir, 1, log_id, options)?);
        let spare = Arc::new(Segment::create(&options.dir, 2, log_id, options)?);
        let segments = BTreeMap::from([(1, head.clone()), (2, spare.clone())]);
        report.created = true;
        return Ok(Recovered {
            groups: HashMap::new(),
            segments,
            head: Head { seg: head, offset: SEGMENT_HEADER_BYTES as u64 },
            spare: Some(spare),
            next_batch_seq: 1,
            next_segment_seq: 3,
            log_id,
            report,
        });
    }
    let next_segment_seq = files.last().map_or(1, |f| f.0 + 1);
    // Open every segment and read its header.
    let mut segs: Vec<(Arc<Segment>, Result<SegmentHeader, String>)> = Vec::new();
    let mut log_id: Option<[u8; 16]> = None;
    for (seq, path) in files {
        let seg = Arc::new(Segment::open(path, seq, options)?);
        let header = if seg.bytes < SEGMENT_HEADER_BYTES as u64 {
            Err(format!("file of {} bytes is shorter than a segment header", seg.bytes))
        } else {
            SegmentHeader::parse(seg.read(0, SEGMENT_HEADER_BYTES)?.as_slice())
        };
        if let Ok(h) = &header {
            let at = seg.path.display();
            if h.sequence != seq {
                return Err(corrupt(format!("{at}: header says segment {}, the file name says {seq}", h.sequence)));
            }
            if h.segment_bytes != seg.bytes || !seg.bytes.is_multiple_of(ALIGN_BYTES as u64) {
                return Err(corrupt(format!(
                    "{at}: header says {} bytes, the file has {}",
                    h.segment_bytes, seg.bytes
                )));
            }
            match log_id {
                None => log_id = Some(h.log_id),
                Some(id) if id != h.log_id => {
                    return Err(corrupt(format!("{at} belongs to another log (log id differs from earlier segments)")));
                }
                Some(_) => {}
            }
        }
        segs.push((seg, header));
    }

    let mut groups: HashMap<u32, GroupIndex<C>> = HashMap::new();
    let mut last_batch: Option<(u64, u64, u64)> = None; // (batch seq, segment, offset)
    let mut ends: Vec<(u64, bool)> = Vec::with_capacity(segs.len()); // (end offset, holds batches)
    for (seg, header) in &segs {
        if let Err(reason) = header {
            ends.push((0, false));
            // An unreadable header is tolerated only after the last batch (checked below).
            tracing::warn!(segment = seg.seq, reason = %reason, "log segment header is not valid");
            continue;
        }
        report.segments += 1;
        let (end, held, cut) = scan_segment(seg, &mut groups, &mut last_batch, &mut report)?;
        if let Some(cut) = cut {
            report.cuts.push(cut);
        }
        ends.push((end, held));
    }
    let head_pos = match ends.iter().rposition(|&(_, held)| held) {
        Some(h) => h,
        None => match segs.iter().position(|(_, h)| h.is_ok()) {
            Some(h) => h,
            None if segs.iter().all(|(_, h)| h.as_ref().is_err_and(|r| r.contains("blank"))) => {
                // Only blank headers: the log's creation was interrupted. Start afresh.
                for (seg, _) in &segs {
                    seg.delete()?;
                }
                segment::sync_dir(&options.dir)?;
                return recover(options);
            }
            None => {
                return Err(corrupt(format!("no segment of the log in {} has a valid header", options.dir.display())));
            }
        },
    };
    // Every segment up to the head must have a valid header (it may have held batches).
    for (seg, header) in segs.iter().take(head_pos) {
        if let Err(reason) = header {
            return Err(corrupt(format!(
                "log segment {} ({}) has no valid header but later segments hold the log: {reason}",
                seg.seq,
                seg.path.display()
            )));
        }
    }
    let log_id = log_id.ok_or_else(|| corrupt("no segment has a valid header"))?;
    let mut segments = BTreeMap::new();
    for (i, (seg, _)) in segs.iter().enumerate() {
        if i > head_pos {
            seg.delete()?;
            report.deleted_segments.push(seg.seq);
        } else {
            segments.insert(seg.seq, seg.clone());
        }
    }
    if !report.deleted_segments.is_empty() {
        segment::sync_dir(&options.dir)?;
    }
    let head_seg = segs[head_pos].0.clone();
    let head_offset = ends[head_pos].0.max(SEGMENT_HEADER_BYTES as u64);
    // Clear what a torn batch left where the next batch goes, so no remnant of it is ever
    // mistaken for data (a torn batch is at most one batch long).
    if report.cuts.iter().any(|c| c.segment == head_seg.seq && c.offset == head_offset) {
        let len = (options.batch_bytes_max as u64).min(head_seg.bytes - head_offset) as usize;
        if len > 0 {
            head_seg.write(head_offset, AlignedBuf::zeroed(len), len)?;
            head_seg.sync()?;
        }
    }
    let spare = Arc::new(Segment::create(&options.dir, next_segment_seq, log_id, options)?);
    segments.insert(spare.seq, spare.clone());
    report.groups = groups.len();
    Ok(Recovered {
        groups,
        segments,
        head: Head { seg: head_seg, offset: head_offset },
        spare: Some(spare),
        next_batch_seq: last_batch.map_or(1, |b| b.0 + 1),
        next_segment_seq: next_segment_seq + 1,
        log_id,
        report,
    })
}

/// Reads a segment's batches in order, replaying them. Returns the end of the last valid batch,
/// whether it held any, and the cut if the next bytes were neither blank nor a batch.
fn scan_segment<C: RaftTypeConfig>(
    seg: &Segment,
    groups: &mut HashMap<u32, GroupIndex<C>>,
    last_batch: &mut Option<(u64, u64, u64)>,
    report: &mut RecoveryReport,
) -> io::Result<(u64, bool, Option<RecoveryCut>)> {
    let mut off = SEGMENT_HEADER_BYTES as u64;
    let mut held = false;
    let bad = loop {
        if off + ALIGN_BYTES as u64 > seg.bytes {
            break None;
        }
        let block = seg.read(off, ALIGN_BYTES)?;
        let h = match BatchHeader::parse(block.as_slice(), seg.seq) {
            Ok(h) => h,
            Err(reason) => break Some(reason),
        };
        if let Some((prev, pseg, poff)) = *last_batch
            && h.batch_sequence != prev + 1
        {
            if h.batch_sequence > prev + 1 {
                return Err(corrupt(format!(
                    "log segment {} offset {off}: batch {} follows batch {prev} (segment {pseg} offset {poff}); \
                     batches in between are missing or damaged",
                    seg.seq, h.batch_sequence
                )));
            }
            break Some(format!("stale batch {} (expected {})", h.batch_sequence, prev + 1));
        }
        if off + u64::from(h.batch_bytes) > seg.bytes {
            break Some(format!("batch of {} bytes overruns the segment", h.batch_bytes));
        }
        let batch = if h.batch_bytes as usize == ALIGN_BYTES { block } else { seg.read(off, h.batch_bytes as usize)? };
        if let Err(reason) = h.verify_payload(batch.as_slice()) {
            break Some(reason);
        }
        let at = format!("log segment {} batch {} at offset {off}", seg.seq, h.batch_sequence);
        let payload = &batch.as_slice()[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + h.payload_bytes as usize];
        replay(payload, h.item_count, seg.seq, off + BATCH_HEADER_BYTES as u64, groups, report, &at)?;
        report.batches += 1;
        *last_batch = Some((h.batch_sequence, seg.seq, off));
        held = true;
        off += u64::from(h.batch_bytes);
    };
    let Some(reason) = bad else { return Ok((off, held, None)) };
    // Nothing valid may follow a bad batch in this segment.
    let after = last_batch.map_or(0, |b| b.0);
    if let Some(found) = find_valid_batch(seg, off + ALIGN_BYTES as u64, after)? {
        return Err(corrupt(format!(
            "log segment {} ({}) is damaged at offset {off} ({reason}) but holds a valid later batch {} at offset {}; \
             refusing to open rather than drop acknowledged data",
            seg.seq,
            seg.path.display(),
            found.0,
            found.1
        )));
    }
    let blank = reason.starts_with("blank");
    let cut = (!blank).then_some(RecoveryCut { segment: seg.seq, offset: off, reason });
    Ok((off, held, cut))
}

/// The first batch at or after `from` that fully verifies and is newer than `after`.
fn find_valid_batch(seg: &Segment, from: u64, after: u64) -> io::Result<Option<(u64, u64)>> {
    let mut chunk_at = from;
    while chunk_at + ALIGN_BYTES as u64 <= seg.bytes {
        let len = ((seg.bytes - chunk_at) as usize).min(SCAN_CHUNK_BYTES);
        let buf = seg.read(chunk_at, len)?;
        for rel in (0..len).step_by(ALIGN_BYTES) {
            let bytes = &buf.as_slice()[rel..];
            let Ok(h) = BatchHeader::parse(bytes, seg.seq) else { continue };
            if h.batch_sequence <= after {
                continue;
            }
            let at = chunk_at + rel as u64;
            if at + u64::from(h.batch_bytes) > seg.bytes {
                continue;
            }
            let whole = if rel + h.batch_bytes as usize <= len {
                h.verify_payload(&bytes[..h.batch_bytes as usize])
            } else {
                h.verify_payload(seg.read(at, h.batch_bytes as usize)?.as_slice())
            };
            if whole.is_ok() {
                return Ok(Some((h.batch_sequence, at)));
            }
        }
        chunk_at += len as u64;
    }
    Ok(None)
}

/// Replays a verified batch payload into the group indexes.
fn replay<C: RaftTypeConfig>(
    payload: &[u8],
    count: u32,
    seg: u64,
    payload_offset: u64,
    groups: &mut HashMap<u32, GroupIndex<C>>,
    report: &mut RecoveryReport,
    at: &str,
) -> io::Result<()> {
    let items = format::parse_items(payload, count)
        .map_err(|e| corrupt(format!("{at}: the batch verifies but its items do not parse: {e}")))?;
    for it in items {
        report.items += 1;
        let body = &payload[it.body.0..it.body.1];
        let g = groups.entry(it.group).or_default();
        match it.kind {
            ItemKind::Entries => {
                let recs = format::parse_entries(body).map_err(|e| corrupt(format!("{at}: {e}")))?;
                for r in recs {
                    let log_id: LogIdOf<C> = decode(&body[r.log_id.0..r.log_id.1], "a log id", at)?;
                    if log_id.index != r.index {
                        return Err(corrupt(format!("{at}: entry record {} holds log id {log_id:?}", r.index)));
                    }
                    let loc = Loc {
                        seg,
                        offset: payload_offset + (it.body.0 + r.entry.0) as u64,
                        len: (r.entry.1 - r.entry.0) as u32,
                    };
                    g.push(Slot { log_id, append_id: 0, loc: Some(loc), cached: None });
                    report.entries += 1;
                }
            }
            ItemKind::Vote => {
                let v: VoteOf<C> = decode(body, "a vote", at)?;
                g.vote = Some(v);
                g.vote_seg = Some(seg);
            }
            ItemKind::Committed => {
                g.committed = decode(body, "a committed log id", at)?;
                g.committed_seg = Some(seg);
            }
            ItemKind::TruncateAfter => {
                let last: Option<LogIdOf<C>> = decode(body, "a truncation point", at)?;
                g.truncate_after(last.map(|l| l.index));
            }
            ItemKind::Purge => {
                let p: LogIdOf<C> = decode(body, "a purge point", at)?;
                if g.purge(p) {
                    g.purge_seg = Some(seg);
                }
            }
        }
    }
    Ok(())
}
