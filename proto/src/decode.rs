//! Decoding frames and AS_MSG messages without copying: fields and ops borrow from the frame
//! body. Every count is checked against the bytes that remain before anything is allocated for
//! it, so a hostile count cannot make the decoder allocate or loop beyond the frame.

use crate::consts::{MSG_HEADER_BYTES, PROTO_VERSION, field, msg_type};
use crate::error::DecodeError;

/// The 8-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoHeader {
    /// Message type (1 info, 2 admin, 3 message, 4 compressed).
    pub msg_type: u8,
    /// Body length in bytes.
    pub size: u64,
}

impl ProtoHeader {
    /// Decodes and checks a frame header; `max_body` bounds the size before any allocation.
    pub fn decode(bytes: [u8; 8], max_body: u64) -> Result<ProtoHeader, DecodeError> {
        let word = u64::from_be_bytes(bytes);
        let version = (word >> 56) as u8;
        if version != PROTO_VERSION {
            return Err(DecodeError::Version(version));
        }
        let t = ((word >> 48) & 0xFF) as u8;
        if !(msg_type::INFO..=msg_type::COMPRESSED).contains(&t) {
            return Err(DecodeError::MessageType(t));
        }
        let size = word & 0xFFFF_FFFF_FFFF;
        if size > max_body {
            return Err(DecodeError::TooLarge { size, max: max_body });
        }
        Ok(ProtoHeader { msg_type: t, size })
    }

    /// Encodes a frame header.
    pub fn encode(msg_type: u8, size: u64) -> [u8; 8] {
        ((u64::from(PROTO_VERSION) << 56) | (u64::from(msg_type) << 48) | (size & 0xFFFF_FFFF_FFFF)).to_be_bytes()
    }
}

/// The 22-byte AS_MSG header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsgHeader {
    /// info1 bits.
    pub info1: u8,
    /// info2 bits.
    pub info2: u8,
    /// info3 bits.
    pub info3: u8,
    /// info4 bits.
    pub info4: u8,
    /// Result code (replies).
    pub result_code: u8,
    /// Generation (expected, or the record's).
    pub generation: u32,
    /// TTL (requests) or void time (replies).
    pub record_ttl: u32,
    /// Server-side timeout (requests) or batch row index (batch replies).
    pub transaction_ttl: u32,
    /// Number of fields.
    pub n_fields: u16,
    /// Number of ops.
    pub n_ops: u16,
}

/// A field: type and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    /// Field type.
    pub field_type: u8,
    /// Field data.
    pub data: &'a [u8],
}

/// An operation on a bin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op<'a> {
    /// Op type.
    pub op_type: u8,
    /// Particle type of the value.
    pub particle_type: u8,
    /// Op flags.
    pub flags: u8,
    /// Bin name (may be empty).
    pub name: &'a [u8],
    /// Value bytes.
    pub value: &'a [u8],
}

/// A decoded AS_MSG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// The header.
    pub header: MsgHeader,
    /// The fields, in order.
    pub fields: Vec<Field<'a>>,
    /// The ops, in order.
    pub ops: Vec<Op<'a>>,
}

/// A bounds-checked reader over a byte slice.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(DecodeError::Truncated(what))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Decodes the AS_MSG header.
pub(crate) fn read_header(r: &mut Reader<'_>) -> Result<MsgHeader, DecodeError> {
    let header_size = r.u8("message header")?;
    if usize::from(header_size) < MSG_HEADER_BYTES {
        return Err(DecodeError::Malformed("message header size"));
    }
    let h = MsgHeader {
        info1: r.u8("message header")?,
        info2: r.u8("message header")?,
        info3: r.u8("message header")?,
        info4: r.u8("message header")?,
        result_code: r.u8("message header")?,
        generation: r.u32("message header")?,
        record_ttl: r.u32("message header")?,
        transaction_ttl: r.u32("message header")?,
        n_fields: r.u16("message header")?,
        n_ops: r.u16("message header")?,
    };
    // Skip any header bytes beyond the 22 this decoder knows.
    r.bytes(usize::from(header_size) - MSG_HEADER_BYTES, "message header")?;
    Ok(h)
}

/// Decodes `n` fields.
pub(crate) fn read_fields<'a>(r: &mut Reader<'a>, n: u16) -> Result<Vec<Field<'a>>, DecodeError> {
    // A field takes at least 5 bytes: never reserve more than the bytes left can hold.
    let mut out = Vec::with_capacity(usize::from(n).min(r.remaining() / 5));
    for _ in 0..n {
        let size = r.u32("field size")? as usize;
        if size == 0 {
            return Err(DecodeError::Malformed("field of size 0"));
        }
        let field_type = r.u8("field type")?;
        let data = r.bytes(size - 1, "field data")?;
        out.push(Field { field_type, data });
    }
    Ok(out)
}

/// Decodes `n` ops.
pub(crate) fn read_ops<'a>(r: &mut Reader<'a>, n: u16) -> Result<Vec<Op<'a>>, DecodeError> {
    // An op takes at least 8 bytes.
    let mut out = Vec::with_capacity(usize::from(n).min(r.remaining() / 8));
    for _ in 0..n {
        let size = r.u32("op size")? as usize;
        if size < 4 {
            return Err(DecodeError::Malformed("op size below 4"));
        }
        let op_type = r.u8("op")?;
        let particle_type = r.u8("op")?;
        let flags = r.u8("op")?;
        let name_len = usize::from(r.u8("op")?);
        if name_len > size - 4 {
            return Err(DecodeError::Malformed("op bin name longer than the op"));
        }
        let name = r.bytes(name_len, "op bin name")?;
        let value = r.bytes(size - 4 - name_len, "op value")?;
        out.push(Op { op_type, particle_type, flags, name, value });
    }
    Ok(out)
}

/// Decodes one AS_MSG from the start of `body`; returns it and the bytes it took.
pub fn decode_message(body: &[u8]) -> Result<(Message<'_>, usize), DecodeError> {
    let mut r = Reader::new(body);
    let header = read_header(&mut r)?;
    let fields = read_fields(&mut r, header.n_fields)?;
    let ops = read_ops(&mut r, header.n_ops)?;
    Ok((Message { header, fields, ops }, r.position()))
}

impl<'a> Message<'a> {
    /// The data of the first field of type `field_type`.
    pub fn field(&self, field_type: u8) -> Option<&'a [u8]> {
        self.fields.iter().find(|f| f.field_type == field_type).map(|f| f.data)
    }

    /// Whether a field of this type is present.
    pub fn has_field(&self, field_type: u8) -> bool {
        self.fields.iter().any(|f| f.field_type == field_type)
    }

    /// The digest field, which must be exactly 20 bytes.
    pub fn digest(&self) -> Result<Option<[u8; 20]>, DecodeError> {
        self.field(field::DIGEST).map(digest_of).transpose()
    }
}

/// A 20-byte digest from field data.
pub fn digest_of(data: &[u8]) -> Result<[u8; 20], DecodeError> {
    data.try_into().map_err(|_| DecodeError::Malformed("digest field is not 20 bytes"))
}

/// Partition ids from a partition-array field (u16 little-endian each).
pub fn partition_ids(data: &[u8]) -> Result<Vec<u16>, DecodeError> {
    if !data.len().is_multiple_of(2) {
        return Err(DecodeError::Malformed("partition id array of odd length"));
    }
    Ok(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

/// Digests from a digest-array field.
pub fn digests(data: &[u8]) -> Result<Vec<[u8; 20]>, DecodeError> {
    if !data.len().is_multiple_of(20) {
        return Err(DecodeError::Malformed("digest array length is not a multiple of 20"));
    }
    data.chunks_exact(20).map(digest_of).collect()
}

/// A big-endian u64 field (max records).
pub fn u64_field(data: &[u8]) -> Result<u64, DecodeError> {
    let b: [u8; 8] = data.try_into().map_err(|_| DecodeError::Malformed("u64 field is not 8 bytes"))?;
    Ok(u64::from_be_bytes(b))
}
