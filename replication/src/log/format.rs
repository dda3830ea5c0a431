//! The shared log's on-disk format: the segment header, the batch header, and the items inside a
//! batch, with every field's offset derived from the previous field. All integers are
//! little-endian; checksums are xxh3-64. `docs/FORMAT.md` ("Raft log ..." sections) documents the
//! same tables and a test checks it against these constants.
//!
//! Everything here is pure: encoders write into byte slices, parsers return `Err` (never panic)
//! on any bytes.

use std::io;

/// One field of an on-disk structure (the engine's: offsets derive from the previous field).
pub use peregrine_engine::format::Field;

/// Alignment of every segment offset and length (and of every batch).
pub const ALIGN_BYTES: usize = 4096;

/// Format version written into every segment header.
pub const FORMAT_VERSION: u32 = 1;

// ---------------------------------------------------------------- segment header

/// Segment header magic: the bytes "PRGNRLG1".
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"PRGNRLG1");
/// Bytes reserved for the segment header; the first batch starts here.
pub const SEGMENT_HEADER_BYTES: usize = 4096;

pub const SEG_CHECKSUM: Field = Field::first("checksum", 8);
pub const SEG_MAGIC: Field = Field::after(SEG_CHECKSUM, "magic", 8);
pub const SEG_VERSION: Field = Field::after(SEG_MAGIC, "format_version", 4);
pub const SEG_HEADER_BYTES: Field = Field::after(SEG_VERSION, "header_bytes", 4);
pub const SEG_SEQUENCE: Field = Field::after(SEG_HEADER_BYTES, "segment_sequence", 8);
pub const SEG_LOG_ID: Field = Field::after(SEG_SEQUENCE, "log_id", 16);
pub const SEG_BYTES: Field = Field::after(SEG_LOG_ID, "segment_bytes", 8);
pub const SEG_CREATED: Field = Field::after(SEG_BYTES, "created_unix_ms", 8);
/// The segment header's fields, in order.
pub const SEGMENT_FIELDS: &[Field] =
    &[SEG_CHECKSUM, SEG_MAGIC, SEG_VERSION, SEG_HEADER_BYTES, SEG_SEQUENCE, SEG_LOG_ID, SEG_BYTES, SEG_CREATED];

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's sequence (also in its file name); never reused within a log.
    pub sequence: u64,
    /// The log's identity, chosen when the log was created; the same in every segment.
    pub log_id: [u8; 16],
    /// The segment file's size in bytes.
    pub segment_bytes: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
}

impl SegmentHeader {
    /// Writes the header into the first [`SEGMENT_HEADER_BYTES`] of `buf` (the rest of those
    /// bytes are zeroed).
    pub fn encode(&self, buf: &mut [u8]) {
        assert!(buf.len() >= SEGMENT_HEADER_BYTES);
        buf[..SEGMENT_HEADER_BYTES].fill(0);
        put_u64(buf, SEG_MAGIC, SEGMENT_MAGIC);
        put_u32(buf, SEG_VERSION, FORMAT_VERSION);
        put_u32(buf, SEG_HEADER_BYTES, SEGMENT_HEADER_BYTES as u32);
        put_u64(buf, SEG_SEQUENCE, self.sequence);
        buf[SEG_LOG_ID.offset..SEG_LOG_ID.end()].copy_from_slice(&self.log_id);
        put_u64(buf, SEG_BYTES, self.segment_bytes);
        put_u64(buf, SEG_CREATED, self.created_unix_ms);
        let sum = checksum(&buf[SEG_CHECKSUM.end()..SEGMENT_HEADER_BYTES], 0);
        put_u64(buf, SEG_CHECKSUM, sum);
    }

    /// Parses and verifies a segment header.
    pub fn parse(buf: &[u8]) -> Result<SegmentHeader, String> {
        if buf.len() < SEGMENT_HEADER_BYTES {
            return Err(format!("segment header needs {SEGMENT_HEADER_BYTES} bytes, got {}", buf.len()));
        }
        if buf[..SEGMENT_HEADER_BYTES].iter().all(|&b| b == 0) {
            return Err("segment header is blank (all zero)".into());
        }
        let stored = get_u64(buf, SEG_CHECKSUM);
        let actual = checksum(&buf[SEG_CHECKSUM.end()..SEGMENT_HEADER_BYTES], 0);
        if stored != actual {
            return Err(format!("segment header checksum mismatch (stored {stored:#x}, computed {actual:#x})"));
        }
        let magic = get_u64(buf, SEG_MAGIC);
        if magic != SEGMENT_MAGIC {
            return Err(format!("bad segment magic {magic:#x}"));
        }
        let version = get_u32(buf, SEG_VERSION);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported log format version {version} (this build reads {FORMAT_VERSION})"));
        }
        let header_bytes = get_u32(buf, SEG_HEADER_BYTES);
        if header_bytes as usize != SEGMENT_HEADER_BYTES {
            return Err(format!("segment header_bytes {header_bytes}, expected {SEGMENT_HEADER_BYTES}"));
        }
        let mut log_id = [0u8; 16];
        log_id.copy_from_slice(&buf[SEG_LOG_ID.offset..SEG_LOG_ID.end()]);
        Ok(SegmentHeader {
            sequence: get_u64(buf, SEG_SEQUENCE),
            log_id,
            segment_bytes: get_u64(buf, SEG_BYTES),
            created_unix_ms: get_u64(buf, SEG_CREATED),
        })
    }
}

// ---------------------------------------------------------------- batch header

/// Batch header magic: the bytes "PRLB".
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"PRLB");
/// Size of the batch header; the batch's payload (its items) follows it.
pub const BATCH_HEADER_BYTES: usize = 64;
/// Hard cap on one batch's size, whatever the configuration (a sanity bound for parsing).
pub const BATCH_BYTES_LIMIT: usize = 16 << 20;

pub const BATCH_HEADER_CHECKSUM: Field = Field::first("header_checksum", 8);
pub const BATCH_MAGIC_F: Field = Field::after(BATCH_HEADER_CHECKSUM, "magic", 4);
pub const BATCH_ITEM_COUNT: Field = Field::after(BATCH_MAGIC_F, "item_count", 4);
pub const BATCH_SEQUENCE: Field = Field::after(BATCH_ITEM_COUNT, "batch_sequence", 8);
pub const BATCH_SEGMENT: Field = Field::after(BATCH_SEQUENCE, "segment_sequence", 8);
pub const BATCH_PAYLOAD_BYTES: Field = Field::after(BATCH_SEGMENT, "payload_bytes", 4);
pub const BATCH_BYTES: Field = Field::after(BATCH_PAYLOAD_BYTES, "batch_bytes", 4);
pub const BATCH_PAYLOAD_CHECKSUM: Field = Field::after(BATCH_BYTES, "payload_checksum", 8);
pub const BATCH_RESERVED: Field = Field::after(BATCH_PAYLOAD_CHECKSUM, "reserved", 16);
/// The batch header's fields, in order.
pub const BATCH_FIELDS: &[Field] = &[
    BATCH_HEADER_CHECKSUM,
    BATCH_MAGIC_F,
    BATCH_ITEM_COUNT,
    BATCH_SEQUENCE,
    BATCH_SEGMENT,
    BATCH_PAYLOAD_BYTES,
    BATCH_BYTES,
    BATCH_PAYLOAD_CHECKSUM,
    BATCH_RESERVED,
];
const _: () = assert!(BATCH_RESERVED.end() == BATCH_HEADER_BYTES);
const _: () = assert!(SEG_CREATED.end() <= SEGMENT_HEADER_BYTES);

/// The seed of a batch's payload checksum: the batch sequence mixed with the segment sequence,
/// so a batch left in a file from an earlier use (or copied into another segment) never
/// verifies.
pub fn payload_seed(batch_sequence: u64, segment_sequence: u64) -> u64 {
    batch_sequence ^ segment_sequence.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15
}

/// A decoded batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Items in the payload.
    pub item_count: u32,
    /// Global batch sequence: +1 for every batch written to the log.
    pub batch_sequence: u64,
    /// Sequence of the segment the batch was written into.
    pub segment_sequence: u64,
    /// Bytes of items after the header.
    pub payload_bytes: u32,
    /// The batch's size on disk: header plus payload rounded up to [`ALIGN_BYTES`].
    pub batch_bytes: u32,
    /// xxh3-64 of the payload, seeded with [`payload_seed`].
    pub payload_checksum: u64,
}

/// Size on disk of a batch carrying `payload_bytes`.
pub fn batch_bytes_for(payload_bytes: usize) -> usize {
    (BATCH_HEADER_BYTES + payload_bytes).div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

impl BatchHeader {
    /// Writes the header (with its own checksum) into the first 64 bytes of `buf`.
    pub fn encode(&self, buf: &mut [u8]) {
        assert!(buf.len() >= BATCH_HEADER_BYTES);
        buf[..BATCH_HEADER_BYTES].fill(0);
        put_u32(buf, BATCH_MAGIC_F, BATCH_MAGIC);
        put_u32(buf, BATCH_ITEM_COUNT, self.item_count);
        put_u64(buf, BATCH_SEQUENCE, self.batch_sequence);
        put_u64(buf, BATCH_SEGMENT, self.segment_sequence);
        put_u32(buf, BATCH_PAYLOAD_BYTES, self.payload_bytes);
        put_u32(buf, BATCH_BYTES, self.batch_bytes);
        put_u64(buf, BATCH_PAYLOAD_CHECKSUM, self.payload_checksum);
        let sum = checksum(&buf[BATCH_HEADER_CHECKSUM.end()..BATCH_HEADER_BYTES], 0);
        put_u64(buf, BATCH_HEADER_CHECKSUM, sum);
    }

    /// Parses a batch header and checks it against its own checksum and the segment it was read
    /// from (the payload is verified separately with [`BatchHeader::verify_payload`]).
    pub fn parse(buf: &[u8], segment_sequence: u64) -> Result<BatchHeader, String> {
        if buf.len() < BATCH_HEADER_BYTES {
            return Err("short batch header".into());
        }
        if buf[..BATCH_HEADER_BYTES].iter().all(|&b| b == 0) {
            return Err("blank (never written)".into());
        }
        let stored = get_u64(buf, BATCH_HEADER_CHECKSUM);
        let actual = checksum(&buf[BATCH_HEADER_CHECKSUM.end()..BATCH_HEADER_BYTES], 0);
        if stored != actual {
            return Err("batch header checksum mismatch".into());
        }
        if get_u32(buf, BATCH_MAGIC_F) != BATCH_MAGIC {
            return Err("bad batch magic".into());
        }
        let h = BatchHeader {
            item_count: get_u32(buf, BATCH_ITEM_COUNT),
            batch_sequence: get_u64(buf, BATCH_SEQUENCE),
            segment_sequence: get_u64(buf, BATCH_SEGMENT),
            payload_bytes: get_u32(buf, BATCH_PAYLOAD_BYTES),
            batch_bytes: get_u32(buf, BATCH_BYTES),
            payload_checksum: get_u64(buf, BATCH_PAYLOAD_CHECKSUM),
        };
        if h.segment_sequence != segment_sequence {
            return Err(format!(
                "batch belongs to segment {} (stale or misplaced), read from segment {segment_sequence}",
                h.segment_sequence
            ));
        }
        if h.batch_bytes as usize > BATCH_BYTES_LIMIT
            || h.batch_bytes as usize != batch_bytes_for(h.payload_bytes as usize)
        {
            return Err(format!("inconsistent batch size {} for payload {}", h.batch_bytes, h.payload_bytes));
        }
        Ok(h)
    }

    /// Checks `batch` (the whole batch, header included) against the payload checksum.
    pub fn verify_payload(&self, batch: &[u8]) -> Result<(), String> {
        let end = BATCH_HEADER_BYTES + self.payload_bytes as usize;
        let payload = batch.get(BATCH_HEADER_BYTES..end).ok_or("batch shorter than its payload")?;
        let actual = checksum(payload, payload_seed(self.batch_sequence, self.segment_sequence));
        if actual != self.payload_checksum {
            return Err("batch payload checksum mismatch".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- items

/// Bytes of an item header.
pub const ITEM_HEADER_BYTES: usize = 12;
pub const ITEM_GROUP: Field = Field::first("group", 4);
pub const ITEM_KIND: Field = Field::after(ITEM_GROUP, "kind", 1);
pub const ITEM_RESERVED: Field = Field::after(ITEM_KIND, "reserved", 3);
pub const ITEM_BODY_BYTES: Field = Field::after(ITEM_RESERVED, "body_bytes", 4);
/// The item header's fields, in order.
pub const ITEM_FIELDS: &[Field] = &[ITEM_GROUP, ITEM_KIND, ITEM_RESERVED, ITEM_BODY_BYTES];
const _: () = assert!(ITEM_BODY_BYTES.end() == ITEM_HEADER_BYTES);

/// Bytes of the count that starts an Entries body.
pub const ENTRIES_COUNT_BYTES: usize = 4;
/// Bytes of an entry record header inside an Entries body.
pub const ENTRY_HEADER_BYTES: usize = 16;
pub const ENTRY_INDEX: Field = Field::first("index", 8);
pub const ENTRY_LOG_ID_BYTES: Field = Field::after(ENTRY_INDEX, "log_id_bytes", 4);
pub const ENTRY_BYTES: Field = Field::after(ENTRY_LOG_ID_BYTES, "entry_bytes", 4);
/// The entry record header's fields, in order.
pub const ENTRY_FIELDS: &[Field] = &[ENTRY_INDEX, ENTRY_LOG_ID_BYTES, ENTRY_BYTES];
const _: () = assert!(ENTRY_BYTES.end() == ENTRY_HEADER_BYTES);

/// What an item records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// A run of consecutive entries of one group.
    Entries = 1,
    /// The group's vote (postcard).
    Vote = 2,
    /// The group's committed log id (postcard `Option<LogId>`).
    Committed = 3,
    /// Delete the group's entries after a log id (postcard `Option<LogId>`; none = all).
    TruncateAfter = 4,
    /// Delete the group's entries up to and including a log id (postcard `LogId`).
    Purge = 5,
}

impl ItemKind {
    /// The kind for a byte read from disk.
    pub fn from_byte(b: u8) -> Option<ItemKind> {
        Some(match b {
            1 => ItemKind::Entries,
            2 => ItemKind::Vote,
            3 => ItemKind::Committed,
            4 => ItemKind::TruncateAfter,
            5 => ItemKind::Purge,
            _ => return None,
        })
    }
}

/// Appends an item header and body to `out`.
pub fn encode_item(out: &mut Vec<u8>, group: u32, kind: ItemKind, body: &[u8]) {
    let start = out.len();
    out.resize(start + ITEM_HEADER_BYTES, 0);
    let h = &mut out[start..];
    put_u32(h, ITEM_GROUP, group);
    h[ITEM_KIND.offset] = kind as u8;
    put_u32(h, ITEM_BODY_BYTES, body.len() as u32);
    out.extend_from_slice(body);
}

/// An entry record inside an Entries item: where its parts sit relative to the item body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRecord {
    /// The entry's log index.
    pub index: u64,
    /// Range of the postcard-encoded log id within the body.
    pub log_id: (usize, usize),
    /// Range of the postcard-encoded entry within the body.
    pub entry: (usize, usize),
}

/// Appends one entry record (header, log id bytes, entry bytes) to an Entries body.
pub fn encode_entry(body: &mut Vec<u8>, index: u64, log_id: &[u8], entry: &[u8]) {
    let start = body.len();
    body.resize(start + ENTRY_HEADER_BYTES, 0);
    let h = &mut body[start..];
    put_u64(h, ENTRY_INDEX, index);
    put_u32(h, ENTRY_LOG_ID_BYTES, log_id.len() as u32);
    put_u32(h, ENTRY_BYTES, entry.len() as u32);
    body.extend_from_slice(log_id);
    body.extend_from_slice(entry);
}

/// Bytes an entry record takes in an Entries body.
pub fn entry_record_bytes(log_id: usize, entry: usize) -> usize {
    ENTRY_HEADER_BYTES + log_id + entry
}

/// Splits an Entries body into its records (ranges relative to the body).
pub fn parse_entries(body: &[u8]) -> Result<Vec<EntryRecord>, String> {
    let count_bytes = body.get(..ENTRIES_COUNT_BYTES).ok_or("Entries body has no count")?;
    let mut w = [0u8; 4];
    w.copy_from_slice(count_bytes);
    let count = u32::from_le_bytes(w) as usize;
    if count > body.len() / ENTRY_HEADER_BYTES {
        return Err(format!("Entries count {count} is impossible in {} bytes", body.len()));
    }
    let mut out = Vec::with_capacity(count);
    let mut at = ENTRIES_COUNT_BYTES;
    for i in 0..count {
        let h = body.get(at..at + ENTRY_HEADER_BYTES).ok_or_else(|| format!("entry {i} header truncated"))?;
        let index = get_u64(h, ENTRY_INDEX);
        let lid = get_u32(h, ENTRY_LOG_ID_BYTES) as usize;
        let ent = get_u32(h, ENTRY_BYTES) as usize;
        let lid_start = at + ENTRY_HEADER_BYTES;
        let ent_start = lid_start.checked_add(lid).ok_or("entry length overflow")?;
        let end = ent_start.checked_add(ent).ok_or("entry length overflow")?;
        if end > body.len() {
            return Err(format!("entry {i} overruns its item ({end} > {})", body.len()));
        }
        out.push(EntryRecord { index, log_id: (lid_start, ent_start), entry: (ent_start, end) });
        at = end;
    }
    if at != body.len() {
        return Err(format!("Entries body has {} trailing bytes", body.len() - at));
    }
    Ok(out)
}

/// One item as found in a batch payload: its header and the range of its body within the
/// payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawItem {
    /// The group it belongs to.
    pub group: u32,
    /// What it records.
    pub kind: ItemKind,
    /// Range of the body within the payload.
    pub body: (usize, usize),
}

/// Splits a verified payload into `count` items.
pub fn parse_items(payload: &[u8], count: u32) -> Result<Vec<RawItem>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        let h = payload.get(at..at + ITEM_HEADER_BYTES).ok_or_else(|| format!("item {i} header truncated"))?;
        let group = get_u32(h, ITEM_GROUP);
        let kind = ItemKind::from_byte(h[ITEM_KIND.offset]).ok_or_else(|| format!("item {i}: unknown kind"))?;
        let len = get_u32(h, ITEM_BODY_BYTES) as usize;
        let start = at + ITEM_HEADER_BYTES;
        let end = start.checked_add(len).ok_or("item length overflow")?;
        if end > payload.len() {
            return Err(format!("item {i} overruns the payload"));
        }
        out.push(RawItem { group, kind, body: (start, end) });
        at = end;
    }
    if at != payload.len() {
        return Err(format!("payload has {} bytes after its {count} items", payload.len() - at));
    }
    Ok(out)
}

// ---------------------------------------------------------------- helpers (the engine's)

/// xxh3-64 with a seed (the engine's).
pub use peregrine_engine::format::checksum;
pub(crate) use peregrine_engine::format::{get_u32, get_u64, put_u32, put_u64};

/// An `InvalidData` error with context.
pub(crate) fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Every documented structure, for the documentation test.
pub fn documented_structures() -> [(&'static str, &'static [Field], usize); 4] {
    [
        ("Raft log segment header", SEGMENT_FIELDS, SEGMENT_HEADER_BYTES),
        ("Raft log batch header", BATCH_FIELDS, BATCH_HEADER_BYTES),
        ("Raft log item header", ITEM_FIELDS, ITEM_HEADER_BYTES),
        ("Raft log entry record", ENTRY_FIELDS, ENTRY_HEADER_BYTES),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Parses the markdown tables of docs/FORMAT.md (`| offset | size | name | ... |` rows) and
    /// checks them against the constants, like the engine's `format_doc_matches_constants`.
    #[test]
    fn format_doc_matches_constants() {
        let doc = include_str!("../../../docs/FORMAT.md");
        for (title, fields, total) in documented_structures() {
            let section = doc
                .split("\n## ")
                .find(|s| s.starts_with(title))
                .unwrap_or_else(|| panic!("docs/FORMAT.md has no section '## {title}'"));
            let rows: Vec<(usize, usize, String)> = section
                .lines()
                .filter(|l| l.starts_with('|'))
                .filter_map(|l| {
                    let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                    let offset = cells.first()?.parse().ok()?;
                    let size = cells.get(1)?.parse().ok()?;
                    Some((offset, size, cells.get(2)?.trim_matches('`').to_string()))
                })
                .collect();
            let expected: Vec<(usize, usize, String)> =
                fields.iter().map(|f| (f.offset, f.size, f.name.to_string())).collect();
            assert_eq!(rows, expected, "section '{title}' of docs/FORMAT.md disagrees with the code");
            assert!(fields.last().unwrap().end() <= total, "{title}: fields overrun the structure");
            assert!(section.contains(&format!("{total} bytes")), "section '{title}' must state {total} bytes");
        }
        for (name, value) in [
            ("SEGMENT_MAGIC", SEGMENT_MAGIC),
            ("BATCH_MAGIC", u64::from(BATCH_MAGIC)),
            ("LOG_FORMAT_VERSION", u64::from(FORMAT_VERSION)),
            ("BATCH_BYTES_LIMIT", BATCH_BYTES_LIMIT as u64),
            ("ItemKind::Entries", ItemKind::Entries as u64),
            ("ItemKind::Vote", ItemKind::Vote as u64),
            ("ItemKind::Committed", ItemKind::Committed as u64),
            ("ItemKind::TruncateAfter", ItemKind::TruncateAfter as u64),
            ("ItemKind::Purge", ItemKind::Purge as u64),
        ] {
            let needle = format!("`{name}` = {value:#x}");
            let alt = format!("`{name}` = {value}");
            assert!(doc.contains(&needle) || doc.contains(&alt), "docs/FORMAT.md must state {alt} (or hex)");
        }
    }

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let mut buf = vec![0u8; 4096];
        let s = SegmentHeader { sequence: 7, log_id: [3; 16], segment_bytes: 1 << 20, created_unix_ms: 9 };
        s.encode(&mut buf);
        assert_eq!(SegmentHeader::parse(&buf).unwrap(), s);
        buf[40] ^= 1;
        assert!(SegmentHeader::parse(&buf).is_err());

        let mut b = vec![0u8; 8192];
        let payload = b"hello items";
        b[64..64 + payload.len()].copy_from_slice(payload);
        let h = BatchHeader {
            item_count: 0,
            batch_sequence: 5,
            segment_sequence: 7,
            payload_bytes: payload.len() as u32,
            batch_bytes: batch_bytes_for(payload.len()) as u32,
            payload_checksum: checksum(payload, payload_seed(5, 7)),
        };
        h.encode(&mut b);
        let p = BatchHeader::parse(&b, 7).unwrap();
        assert_eq!(p, h);
        p.verify_payload(&b).unwrap();
        assert!(BatchHeader::parse(&b, 8).is_err(), "a batch read from another segment is refused");
        b[70] ^= 0xff;
        assert!(p.verify_payload(&b).is_err());
    }

    #[test]
    fn item_parsers_never_panic_on_garbage() {
        let mut seed = 1u64;
        for len in 0..300usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = parse_items(&bytes, (seed % 5) as u32);
            let _ = parse_entries(&bytes);
        }
        let mut body = 2u32.to_le_bytes().to_vec();
        encode_entry(&mut body, 4, b"ab", b"cde");
        encode_entry(&mut body, 5, b"x", b"");
        let r = parse_entries(&body).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(&body[r[0].entry.0..r[0].entry.1], b"cde");
        assert_eq!(r[1].index, 5);
    }
}
