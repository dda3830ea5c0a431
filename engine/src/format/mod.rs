//! The on-device format: the device header, write-block headers and records, with every field's
//! offset derived from the previous field's offset and size. All integers are little-endian.
//! `docs/FORMAT.md` documents the same tables; a test checks it against these constants.

pub mod block_header;
pub mod device_header;
pub mod metadata;
pub mod record;

/// One field of an on-device structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Name as written in `docs/FORMAT.md`.
    pub name: &'static str,
    /// Byte offset from the start of the structure.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

impl Field {
    /// The first field of a structure.
    pub const fn first(name: &'static str, size: usize) -> Field {
        Field { name, offset: 0, size }
    }

    /// The field that follows `prev`.
    pub const fn after(prev: Field, name: &'static str, size: usize) -> Field {
        Field { name, offset: prev.offset + prev.size, size }
    }

    /// Offset just past this field.
    pub const fn end(&self) -> usize {
        self.offset + self.size
    }
}

/// Byte range of the device reserved for the header slots and future metadata; write block 0
/// starts here.
pub const DATA_OFFSET_BYTES: u64 = 1 << 20;
/// Records start on multiples of this many bytes within a write block.
pub const RECORD_ALIGN_BYTES: usize = 16;
/// Smallest configurable write block.
pub const WRITE_BLOCK_BYTES_MIN: u32 = 128 * 1024;
/// Largest configurable write block.
pub const WRITE_BLOCK_BYTES_MAX: u32 = 8 * 1024 * 1024;

/// Writes a little-endian u16 into its field.
pub fn put_u16(buf: &mut [u8], f: Field, v: u16) {
    debug_assert_eq!(f.size, 2, "{}", f.name);
    buf[f.offset..f.end()].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u32 into its field.
pub fn put_u32(buf: &mut [u8], f: Field, v: u32) {
    debug_assert_eq!(f.size, 4, "{}", f.name);
    buf[f.offset..f.end()].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian u64 into its field.
pub fn put_u64(buf: &mut [u8], f: Field, v: u64) {
    debug_assert_eq!(f.size, 8, "{}", f.name);
    buf[f.offset..f.end()].copy_from_slice(&v.to_le_bytes());
}

/// Reads fixed-size little-endian integers; the caller has checked `buf` covers the field.
pub fn get_u16(buf: &[u8], f: Field) -> u16 {
    let mut w = [0u8; 2];
    w.copy_from_slice(&buf[f.offset..f.end()]);
    u16::from_le_bytes(w)
}

/// Reads a little-endian u32 field; the caller has checked `buf` covers it.
pub fn get_u32(buf: &[u8], f: Field) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&buf[f.offset..f.end()]);
    u32::from_le_bytes(w)
}

/// Reads a little-endian u64 field; the caller has checked `buf` covers it.
pub fn get_u64(buf: &[u8], f: Field) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[f.offset..f.end()]);
    u64::from_le_bytes(w)
}

/// xxh3-64 with a seed.
pub fn checksum(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

/// Every documented structure, for the documentation test.
pub fn documented_structures() -> [(&'static str, &'static [Field], usize); 6] {
    [
        ("Device header slot", device_header::FIELDS, device_header::SLOT_BYTES),
        ("Write block header", block_header::FIELDS, block_header::BYTES),
        ("Record header", record::HEADER_FIELDS, record::HEADER_BYTES),
        ("Metadata slot", metadata::FIELDS, metadata::SLOT_BYTES),
        ("Metadata partition entry", metadata::PARTITION_FIELDS, metadata::PARTITION_ENTRY_BYTES),
        ("Metadata set entry", metadata::SET_FIELDS, metadata::SET_ENTRY_BYTES),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the markdown tables of docs/FORMAT.md: each structure's table lists
    /// `| offset | size | name | ... |` rows, and must match the code's constants exactly.
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
            let last = fields.last().unwrap();
            assert!(last.end() <= total, "{title}: fields overrun the structure");
            assert!(
                section.contains(&format!("{total} bytes")),
                "section '{title}' must state its total size ({total} bytes)"
            );
        }
        for (name, value) in [
            ("DATA_OFFSET_BYTES", DATA_OFFSET_BYTES),
            ("RECORD_ALIGN_BYTES", RECORD_ALIGN_BYTES as u64),
            ("WRITE_BLOCK_BYTES_MIN", u64::from(WRITE_BLOCK_BYTES_MIN)),
            ("WRITE_BLOCK_BYTES_MAX", u64::from(WRITE_BLOCK_BYTES_MAX)),
            ("device_header::MAGIC", device_header::MAGIC),
            ("block_header::MAGIC", u64::from(block_header::MAGIC)),
            ("record::MAGIC", u64::from(record::MAGIC)),
            ("FORMAT_VERSION", u64::from(device_header::FORMAT_VERSION)),
            ("FORMAT_VERSION_MIN", u64::from(device_header::FORMAT_VERSION_MIN)),
            ("metadata::OFFSET_BYTES", metadata::OFFSET_BYTES),
            ("metadata::MAGIC", metadata::MAGIC),
            ("metadata::HEADER_BYTES", metadata::HEADER_BYTES as u64),
            ("metadata::SETS_OFFSET", metadata::SETS_OFFSET as u64),
            ("SET_TRUNCATIONS_MAX", metadata::SET_TRUNCATIONS_MAX as u64),
            ("PARTITION_VALUE_BYTES_MAX", metadata::PARTITION_VALUE_BYTES_MAX as u64),
        ] {
            let needle = format!("`{name}` = {value:#x}");
            let alt = format!("`{name}` = {value}");
            assert!(doc.contains(&needle) || doc.contains(&alt), "docs/FORMAT.md must state {alt} (or hex)");
        }
    }
}
