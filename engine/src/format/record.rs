//! Records as stored in a write block: a 64-byte header, the set name, the optional user key and
//! the bins, padded to 16 bytes. The checksum (xxh3-64 seeded with the block's sequence number)
//! covers every byte after itself, so a torn, flipped or stale record never verifies.
//!
//! After the header: `set_name_len` bytes of set name; `key_len` bytes of key (a particle-type
//! byte, then the key bytes) when the KEY_STORED flag is set; then `bin_count` bins, each
//! `name_len: u8, name, particle_type: u8, value_len: u32, value`.

use peregrine_index::{DIGEST_LEN, Digest};

use super::{Field, RECORD_ALIGN_BYTES, checksum, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::error::{Error, Result};
use crate::record::{
    BIN_NAME_BYTES_MAX, BINS_PER_RECORD_MAX, Bin, BinName, Record, RecordMeta, RecordVersion, SET_NAME_BYTES_MAX,
    StoredKey, Value,
};

/// Size of the fixed record header.
pub const HEADER_BYTES: usize = 64;
/// "PREC" as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PREC");
/// Flag: the record is a tombstone (a delete); it has no bins.
pub const FLAG_TOMBSTONE: u8 = 1;
/// Flag: the user key follows the set name.
pub const FLAG_KEY_STORED: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_TOMBSTONE | FLAG_KEY_STORED;

/// xxh3-64 of bytes 8..length, seeded with the block sequence.
pub const CHECKSUM: Field = Field::first("checksum", 8);
/// [`MAGIC`].
pub const MAGIC_FIELD: Field = Field::after(CHECKSUM, "magic", 4);
/// Record length in bytes, header included, padding excluded.
pub const LENGTH: Field = Field::after(MAGIC_FIELD, "length", 4);
/// The record's digest.
pub const DIGEST: Field = Field::after(LENGTH, "digest", DIGEST_LEN);
/// Generation.
pub const GENERATION: Field = Field::after(DIGEST, "generation", 2);
/// Flags.
pub const FLAGS: Field = Field::after(GENERATION, "flags", 1);
/// Length of the set name.
pub const SET_NAME_LEN: Field = Field::after(FLAGS, "set_name_len", 1);
/// Last-update time, ms since the Unix epoch.
pub const LAST_UPDATE: Field = Field::after(SET_NAME_LEN, "last_update_ms", 8);
/// Void time, seconds since 2010-01-01 UTC (0 = never expires).
pub const VOID_TIME: Field = Field::after(LAST_UPDATE, "void_time", 4);
/// Length of the stored key including its particle-type byte (0 = none).
pub const KEY_LEN: Field = Field::after(VOID_TIME, "key_len", 4);
/// Number of bins.
pub const BIN_COUNT: Field = Field::after(KEY_LEN, "bin_count", 2);
/// The partition's truncation epoch when the version was written (format 2; zero in format 1
/// records). A version older than its partition's epoch in the metadata region is dead.
pub const PARTITION_EPOCH: Field = Field::after(BIN_COUNT, "partition_epoch", 4);
/// Zero.
pub const RESERVED: Field = Field::after(PARTITION_EPOCH, "reserved", 2);

/// The header fields in order.
pub const HEADER_FIELDS: &[Field] = &[
    CHECKSUM,
    MAGIC_FIELD,
    LENGTH,
    DIGEST,
    GENERATION,
    FLAGS,
    SET_NAME_LEN,
    LAST_UPDATE,
    VOID_TIME,
    KEY_LEN,
    BIN_COUNT,
    PARTITION_EPOCH,
    RESERVED,
];

/// Bytes a record of `len` bytes occupies in its block (rounded up to 16).
pub fn extent(len: usize) -> usize {
    len.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}

/// Serializes a record version (checksum left zero, partition epoch 0; see [`seal`] and
/// [`stamp_epoch`]). Refuses exactly what [`parse`] would refuse, before anything is written:
/// generation 0, a last-update time the index cannot hold, names and counts out of range, and
/// values whose bytes do not fit their particle type. Debug builds check that the bytes parse.
pub fn encode(version: &RecordVersion, out: &mut Vec<u8>) -> Result<()> {
    encode_unchecked(version, out)?;
    #[cfg(debug_assertions)]
    {
        let mut sealed = out.clone();
        seal(&mut sealed, 1);
        if let Err(d) = parse(&sealed, 1) {
            panic!("encode accepted a version the parser refuses ({d}): {version:?}");
        }
    }
    Ok(())
}

fn validate_meta(meta: &RecordMeta) -> Result<()> {
    if meta.generation == 0 {
        return Err(Error::Parameter("generation 0 is not a valid record generation".into()));
    }
    if meta.last_update_ms > peregrine_index::LAST_UPDATE_MS_MAX {
        return Err(Error::Parameter(format!(
            "last-update time {} ms is beyond the largest the index holds ({})",
            meta.last_update_ms,
            peregrine_index::LAST_UPDATE_MS_MAX
        )));
    }
    Ok(())
}

fn encode_unchecked(version: &RecordVersion, out: &mut Vec<u8>) -> Result<()> {
    validate_meta(version.meta())?;
    out.clear();
    out.resize(HEADER_BYTES, 0);
    let (set_name, meta, flags) = match version {
        RecordVersion::Live(r) => (&r.set_name, &r.meta, if r.key.is_some() { FLAG_KEY_STORED } else { 0 }),
        RecordVersion::Tombstone { set_name, meta, .. } => (set_name, meta, FLAG_TOMBSTONE),
    };
    if set_name.len() > SET_NAME_BYTES_MAX {
        return Err(Error::SetName { len: set_name.len(), max: SET_NAME_BYTES_MAX });
    }
    out.extend_from_slice(set_name);
    let mut key_len = 0u32;
    let mut bin_count = 0u16;
    if let RecordVersion::Live(r) = version {
        if let Some(key) = &r.key {
            out.push(key.particle_type);
            out.extend_from_slice(&key.bytes);
            key_len = u32::try_from(1 + key.bytes.len()).map_err(|_| Error::Parameter("user key too long".into()))?;
        }
        if r.bins.len() > BINS_PER_RECORD_MAX {
            return Err(Error::TooManyBins { count: r.bins.len(), max: BINS_PER_RECORD_MAX });
        }
        bin_count = r.bins.len() as u16;
        for bin in &r.bins {
            let name = bin.name.as_bytes();
            if let Value::Other { particle_type, bytes } = &bin.value
                && Value::decode(*particle_type, bytes).is_none()
            {
                return Err(Error::Parameter(format!(
                    "bin {:?}: {} bytes are not a valid value of particle type {particle_type}",
                    bin.name,
                    bytes.len()
                )));
            }
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.push(bin.value.particle_type());
            let len =
                u32::try_from(bin.value.encoded_len()).map_err(|_| Error::Parameter("bin value too long".into()))?;
            out.extend_from_slice(&len.to_le_bytes());
            bin.value.encode_into(out);
        }
    }
    let len = u32::try_from(out.len()).map_err(|_| Error::RecordTooBig { size: out.len(), max: u32::MAX as usize })?;
    let h = &mut out[..HEADER_BYTES];
    put_u32(h, MAGIC_FIELD, MAGIC);
    put_u32(h, LENGTH, len);
    h[DIGEST.offset..DIGEST.end()].copy_from_slice(&version.digest().0);
    put_u16(h, GENERATION, meta.generation);
    h[FLAGS.offset] = flags;
    h[SET_NAME_LEN.offset] = set_name.len() as u8;
    put_u64(h, LAST_UPDATE, meta.last_update_ms);
    put_u32(h, VOID_TIME, meta.void_time);
    put_u32(h, KEY_LEN, key_len);
    put_u16(h, BIN_COUNT, bin_count);
    Ok(())
}

/// Writes the partition epoch into an encoded record (before [`seal`]).
pub fn stamp_epoch(record: &mut [u8], epoch: u32) {
    put_u32(record, PARTITION_EPOCH, epoch);
}

/// Writes the checksum of an encoded record for the block with sequence `block_sequence`.
pub fn seal(record: &mut [u8], block_sequence: u64) {
    let sum = checksum(&record[CHECKSUM.end()..], block_sequence);
    put_u64(record, CHECKSUM, sum);
}

/// Why bytes are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    /// Too few bytes for a header, or the length runs past the available bytes.
    Truncated,
    /// The magic number is wrong (not the start of a record).
    Magic,
    /// The checksum does not match (damaged, torn, or left over from an earlier use of the block).
    Checksum,
    /// The checksum matches but the contents are inconsistent.
    Structure(&'static str),
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Defect::Truncated => f.write_str("record truncated"),
            Defect::Magic => f.write_str("bad record magic"),
            Defect::Checksum => f.write_str("record checksum mismatch"),
            Defect::Structure(what) => write!(f, "malformed record: {what}"),
        }
    }
}

/// What can still be read from the header of a record that failed verification: enough to
/// name it in a report. `None` when the bytes do not even start with the record magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DamagedHeader {
    /// The digest the header claims.
    pub digest: Digest,
    /// The length the header claims.
    pub length: u32,
}

/// Reads the claimed digest and length of a record that may be damaged (no verification).
pub fn damaged_header(bytes: &[u8]) -> Option<DamagedHeader> {
    let h = bytes.get(..HEADER_BYTES)?;
    if get_u32(h, MAGIC_FIELD) != MAGIC {
        return None;
    }
    let mut d = [0u8; DIGEST_LEN];
    d.copy_from_slice(&h[DIGEST.offset..DIGEST.end()]);
    Some(DamagedHeader { digest: Digest(d), length: get_u32(h, LENGTH) })
}

/// A verified record in a byte buffer, decoded lazily.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    bytes: &'a [u8],
    bins_offset: usize,
}

/// Verifies the record starting at `bytes[0]` (which may extend past it).
pub fn parse(bytes: &[u8], block_sequence: u64) -> Result<RecordView<'_>, Defect> {
    if bytes.len() < HEADER_BYTES {
        return Err(Defect::Truncated);
    }
    if get_u32(bytes, MAGIC_FIELD) != MAGIC {
        return Err(Defect::Magic);
    }
    let len = get_u32(bytes, LENGTH) as usize;
    if len < HEADER_BYTES {
        return Err(Defect::Structure("length shorter than the header"));
    }
    let Some(rec) = bytes.get(..len) else {
        return Err(Defect::Truncated);
    };
    if get_u64(rec, CHECKSUM) != checksum(&rec[CHECKSUM.end()..], block_sequence) {
        return Err(Defect::Checksum);
    }
    let flags = rec[FLAGS.offset];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(Defect::Structure("unknown flags"));
    }
    if get_u16(rec, GENERATION) == 0 {
        return Err(Defect::Structure("generation 0"));
    }
    let set_len = usize::from(rec[SET_NAME_LEN.offset]);
    let key_len = get_u32(rec, KEY_LEN) as usize;
    if set_len > SET_NAME_BYTES_MAX {
        return Err(Defect::Structure("set name too long"));
    }
    if (flags & FLAG_KEY_STORED != 0) != (key_len > 0) {
        return Err(Defect::Structure("key flag disagrees with key length"));
    }
    let bins_offset = HEADER_BYTES
        .checked_add(set_len)
        .and_then(|n| n.checked_add(key_len))
        .filter(|&n| n <= len)
        .ok_or(Defect::Structure("set name and key run past the record"))?;
    let view = RecordView { bytes: rec, bins_offset };
    if view.is_tombstone() && view.bin_count() != 0 {
        return Err(Defect::Structure("tombstone with bins"));
    }
    // Walk the bins once so later decoding cannot fail.
    let mut pos = bins_offset;
    for _ in 0..view.bin_count() {
        let (_, _, _, next) = bin_at(rec, pos).ok_or(Defect::Structure("bin runs past the record"))?;
        pos = next;
    }
    if pos != len {
        return Err(Defect::Structure("bytes after the last bin"));
    }
    Ok(view)
}

/// Decodes the bin at `pos`: (name, particle type, value bytes, next position).
fn bin_at(rec: &[u8], pos: usize) -> Option<(&[u8], u8, &[u8], usize)> {
    let name_len = usize::from(*rec.get(pos)?);
    if name_len == 0 || name_len > BIN_NAME_BYTES_MAX {
        return None;
    }
    let name = rec.get(pos + 1..pos + 1 + name_len)?;
    let p = pos + 1 + name_len;
    let particle_type = *rec.get(p)?;
    let vlen = u32::from_le_bytes(rec.get(p + 1..p + 5)?.try_into().ok()?) as usize;
    let value = rec.get(p + 5..(p + 5).checked_add(vlen)?)?;
    Value::decode(particle_type, value)?;
    Some((name, particle_type, value, p + 5 + vlen))
}

impl<'a> RecordView<'a> {
    /// Record length (header included, padding excluded).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a record has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes the record occupies in its block.
    pub fn extent(&self) -> usize {
        extent(self.bytes.len())
    }

    /// The digest.
    pub fn digest(&self) -> Digest {
        let mut d = [0u8; DIGEST_LEN];
        d.copy_from_slice(&self.bytes[DIGEST.offset..DIGEST.end()]);
        Digest(d)
    }

    /// Generation, void time and last-update time.
    pub fn meta(&self) -> RecordMeta {
        RecordMeta {
            generation: get_u16(self.bytes, GENERATION),
            void_time: get_u32(self.bytes, VOID_TIME),
            last_update_ms: get_u64(self.bytes, LAST_UPDATE),
        }
    }

    /// The partition's truncation epoch the version was written in.
    pub fn partition_epoch(&self) -> u32 {
        get_u32(self.bytes, PARTITION_EPOCH)
    }

    /// Whether this is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.bytes[FLAGS.offset] & FLAG_TOMBSTONE != 0
    }

    /// Whether the user key is stored.
    pub fn has_key(&self) -> bool {
        self.bytes[FLAGS.offset] & FLAG_KEY_STORED != 0
    }

    /// Set name bytes (empty = no set).
    pub fn set_name(&self) -> &'a [u8] {
        let n = usize::from(self.bytes[SET_NAME_LEN.offset]);
        &self.bytes[HEADER_BYTES..HEADER_BYTES + n]
    }

    /// The stored key: (particle type, bytes).
    pub fn key(&self) -> Option<(u8, &'a [u8])> {
        let key_len = get_u32(self.bytes, KEY_LEN) as usize;
        if key_len == 0 {
            return None;
        }
        let start = HEADER_BYTES + self.set_name().len();
        Some((self.bytes[start], &self.bytes[start + 1..start + key_len]))
    }

    /// Number of bins.
    pub fn bin_count(&self) -> usize {
        usize::from(get_u16(self.bytes, BIN_COUNT))
    }

    /// The bins as (name, particle type, value bytes).
    pub fn raw_bins(&self) -> impl Iterator<Item = (&'a [u8], u8, &'a [u8])> + 'a {
        let rec = self.bytes;
        let mut pos = self.bins_offset;
        (0..self.bin_count()).filter_map(move |_| {
            let (name, pt, value, next) = bin_at(rec, pos)?;
            pos = next;
            Some((name, pt, value))
        })
    }

    /// Decodes the bins selected by `keep` (all when it returns true for every name).
    pub fn bins_where(&self, mut keep: impl FnMut(&[u8]) -> bool) -> Vec<Bin> {
        self.raw_bins()
            .filter(|(name, _, _)| keep(name))
            .filter_map(|(name, pt, value)| {
                Some(Bin { name: BinName::new(name).ok()?, value: Value::decode(pt, value)? })
            })
            .collect()
    }

    /// The whole version, owned.
    pub fn to_version(&self) -> RecordVersion {
        if self.is_tombstone() {
            return RecordVersion::Tombstone {
                digest: self.digest(),
                set_name: self.set_name().to_vec(),
                meta: self.meta(),
            };
        }
        RecordVersion::Live(self.to_record(|_| true))
    }

    /// The record with the bins selected by `keep`.
    pub fn to_record(&self, keep: impl FnMut(&[u8]) -> bool) -> Record {
        Record {
            digest: self.digest(),
            set_name: self.set_name().to_vec(),
            key: self.key().map(|(particle_type, bytes)| StoredKey { particle_type, bytes: bytes.to_vec() }),
            meta: self.meta(),
            bins: self.bins_where(keep),
        }
    }

    /// The raw record bytes (header included).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peregrine_index::KeyRef;

    fn sample() -> RecordVersion {
        RecordVersion::Live(Record {
            digest: Digest::of_key(b"users", KeyRef::String(b"alice")),
            set_name: b"users".to_vec(),
            key: Some(StoredKey { particle_type: 3, bytes: b"alice".to_vec() }),
            meta: RecordMeta { generation: 3, void_time: 12345, last_update_ms: 1_700_000_000_123 },
            bins: vec![
                Bin::new("age", Value::Int(42)).unwrap(),
                Bin::new("name", Value::String(b"Alice".to_vec())).unwrap(),
                Bin::new("tags", Value::List(vec![0x91, 0xa1, 0x78])).unwrap(),
            ],
        })
    }

    #[test]
    fn encode_parse_round_trip() {
        let v = sample();
        let mut buf = Vec::new();
        encode(&v, &mut buf).unwrap();
        seal(&mut buf, 77);
        let view = parse(&buf, 77).unwrap();
        assert_eq!(view.to_version(), v);
        assert_eq!(view.extent() % 16, 0);
        let only_age = view.bins_where(|n| n == b"age");
        assert_eq!(only_age.len(), 1);
    }

    #[test]
    fn tombstone_round_trip() {
        let v = RecordVersion::Tombstone {
            digest: Digest::of_key(b"", KeyRef::Int(5)),
            set_name: vec![],
            meta: RecordMeta { generation: 9, void_time: 0, last_update_ms: 1 },
        };
        let mut buf = Vec::new();
        encode(&v, &mut buf).unwrap();
        assert_eq!(buf.len(), HEADER_BYTES);
        seal(&mut buf, 1);
        assert_eq!(parse(&buf, 1).unwrap().to_version(), v);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf).unwrap();
        seal(&mut buf, 5);
        for i in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(parse(&bad, 5).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn wrong_block_sequence_fails() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf).unwrap();
        seal(&mut buf, 5);
        assert_eq!(parse(&buf, 6).unwrap_err(), Defect::Checksum);
        assert_eq!(parse(&buf[..buf.len() - 1], 5).unwrap_err(), Defect::Truncated);
        assert_eq!(parse(&[0u8; 100], 5).unwrap_err(), Defect::Magic);
    }

    /// Arbitrary bytes with a correct checksum must not panic the parser, and whatever it
    /// accepts must be exactly what `encode` writes for the version it decodes to (encode and
    /// parse accept the same set).
    #[test]
    fn garbage_with_valid_checksum_is_rejected_or_canonical() {
        let mut state = 0x1234_5678_u64;
        let (mut accepted, mut rejected) = (0, 0);
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            encode(&sample(), &mut buf).unwrap();
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let i = HEADER_BYTES + (state >> 33) as usize % (buf.len() - HEADER_BYTES);
            buf[i] = (state >> 20) as u8;
            if state.is_multiple_of(7) {
                buf[BIN_COUNT.offset] = (state >> 40) as u8;
            }
            seal(&mut buf, 0);
            match parse(&buf, 0) {
                Ok(view) => {
                    accepted += 1;
                    let mut again = Vec::new();
                    encode(&view.to_version(), &mut again).unwrap();
                    seal(&mut again, 0);
                    assert_eq!(again, buf, "parse accepted bytes that encode would not produce");
                }
                Err(_) => rejected += 1,
            }
        }
        assert!(accepted > 1000 && rejected > 1000, "accepted {accepted}, rejected {rejected}");
    }

    /// What the parser refuses, encode refuses too, before writing anything.
    #[test]
    fn encode_refuses_what_parse_refuses() {
        let mut out = Vec::new();
        let with = |f: &dyn Fn(&mut Record)| {
            let RecordVersion::Live(mut r) = sample() else { unreachable!() };
            f(&mut r);
            RecordVersion::Live(r)
        };
        let bad = [
            with(&|r| r.meta.generation = 0),
            with(&|r| r.meta.last_update_ms = peregrine_index::LAST_UPDATE_MS_MAX + 1),
            with(&|r| {
                r.bins[0].value = Value::Other { particle_type: crate::record::particle::INTEGER, bytes: vec![1, 2, 3] }
            }),
            with(&|r| r.bins[0].value = Value::Other { particle_type: crate::record::particle::NULL, bytes: vec![] }),
            with(&|r| r.bins[0].value = Value::Other { particle_type: crate::record::particle::BOOL, bytes: vec![7] }),
            with(&|r| r.set_name = vec![b's'; SET_NAME_BYTES_MAX + 1]),
        ];
        for v in bad {
            assert!(encode(&v, &mut out).is_err(), "encode accepted {v:?}");
        }
        let tomb = RecordVersion::Tombstone {
            digest: Digest([1; 20]),
            set_name: vec![],
            meta: RecordMeta { generation: 0, void_time: 0, last_update_ms: 5 },
        };
        assert!(encode(&tomb, &mut out).is_err());
    }

    #[test]
    fn partition_epoch_is_stamped_and_read_back() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf).unwrap();
        stamp_epoch(&mut buf, 0xDEAD_BEEF);
        seal(&mut buf, 3);
        assert_eq!(parse(&buf, 3).unwrap().partition_epoch(), 0xDEAD_BEEF);
    }
}
