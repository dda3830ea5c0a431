//! The batch-index request (field 41): rows of digest + per-row command, with REPEAT rows that
//! reuse the previous full row. Rows borrow from the request.

use crate::decode::{Field, Op, Reader, read_fields, read_ops};
use crate::error::DecodeError;

/// Row flag: reuse the previous row's namespace, set, command and ops.
pub const ROW_REPEAT: u8 = 0x01;
/// Row flag: info2 and info3 follow info1.
pub const ROW_INFO: u8 = 0x02;
/// Row flag: a u16 generation follows.
pub const ROW_GENERATION: u8 = 0x04;
/// Row flag: a u32 TTL follows.
pub const ROW_TTL: u8 = 0x08;
/// Row flag: info4 follows.
pub const ROW_INFO4: u8 = 0x10;
/// Bytes of a row before its command: index, digest, flags.
const ROW_PREFIX_BYTES: usize = 25;

/// The command of a batch row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowCommand<'a> {
    /// info1 bits.
    pub info1: u8,
    /// info2 bits.
    pub info2: u8,
    /// info3 bits.
    pub info3: u8,
    /// info4 bits.
    pub info4: u8,
    /// Expected generation.
    pub generation: u16,
    /// TTL.
    pub record_ttl: u32,
    /// Fields (namespace first, then set, ...).
    pub fields: Vec<Field<'a>>,
    /// Ops.
    pub ops: Vec<Op<'a>>,
}

impl<'a> RowCommand<'a> {
    /// The data of the first field of type `field_type`.
    pub fn field(&self, field_type: u8) -> Option<&'a [u8]> {
        self.fields.iter().find(|f| f.field_type == field_type).map(|f| f.data)
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// The client's row index (echoed in the reply's transaction_ttl).
    pub index: u32,
    /// The record digest.
    pub digest: [u8; 20],
    /// Index into the batch's commands (shared by REPEAT rows).
    pub command: usize,
}

/// A decoded batch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<'a> {
    /// Parent flags.
    pub flags: u8,
    /// Rows in request order.
    pub rows: Vec<BatchRow>,
    /// Distinct commands (REPEAT rows point at the previous one).
    pub commands: Vec<RowCommand<'a>>,
}

impl<'a> Batch<'a> {
    /// Decodes field 41's data.
    pub fn decode(data: &'a [u8]) -> Result<Batch<'a>, DecodeError> {
        let mut r = Reader::new(data);
        let count = r.u32("batch row count")? as usize;
        let flags = r.u8("batch flags")?;
        if count > r.remaining() / ROW_PREFIX_BYTES {
            return Err(DecodeError::Truncated("batch rows"));
        }
        let mut rows = Vec::with_capacity(count);
        let mut commands: Vec<RowCommand<'a>> = Vec::new();
        for _ in 0..count {
            let index = r.u32("batch row index")?;
            let digest_bytes = r.bytes(20, "batch row digest")?;
            let mut digest = [0u8; 20];
            digest.copy_from_slice(digest_bytes);
            let row_flags = r.u8("batch row flags")?;
            if row_flags & ROW_REPEAT != 0 {
                if commands.is_empty() {
                    return Err(DecodeError::Malformed("batch REPEAT row with no row before it"));
                }
                rows.push(BatchRow { index, digest, command: commands.len() - 1 });
                continue;
            }
            let mut c = RowCommand { info1: r.u8("batch row info1")?, ..RowCommand::default() };
            if row_flags & ROW_INFO != 0 {
                c.info2 = r.u8("batch row info2")?;
                c.info3 = r.u8("batch row info3")?;
            }
            if row_flags & ROW_INFO4 != 0 {
                c.info4 = r.u8("batch row info4")?;
            }
            if row_flags & ROW_GENERATION != 0 {
                c.generation = r.u16("batch row generation")?;
            }
            if row_flags & ROW_TTL != 0 {
                c.record_ttl = r.u32("batch row ttl")?;
            }
            let n_fields = r.u16("batch row field count")?;
            let n_ops = r.u16("batch row op count")?;
            c.fields = read_fields(&mut r, n_fields)?;
            c.ops = read_ops(&mut r, n_ops)?;
            commands.push(c);
            rows.push(BatchRow { index, digest, command: commands.len() - 1 });
        }
        Ok(Batch { flags, rows, commands })
    }
}
