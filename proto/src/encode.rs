//! Encoding frames, AS_MSG headers, fields and ops into a byte buffer, exactly as the official
//! clients parse them (replies carry no fields outside scans: the C client does not skip them).

use crate::consts::{MSG_HEADER_BYTES, PROTO_HEADER_BYTES};
use crate::decode::{MsgHeader, ProtoHeader};

/// Starts a frame of `msg_type` at the end of `buf`; returns its start for [`end_frame`].
pub fn begin_frame(buf: &mut Vec<u8>, msg_type: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&ProtoHeader::encode(msg_type, 0));
    start
}

/// Patches the size of the frame started at `start` to cover everything after its header.
pub fn end_frame(buf: &mut [u8], start: usize) {
    let size = (buf.len() - start - PROTO_HEADER_BYTES) as u64;
    let msg_type = buf[start + 1];
    buf[start..start + PROTO_HEADER_BYTES].copy_from_slice(&ProtoHeader::encode(msg_type, size));
}

/// Appends an AS_MSG header.
pub fn put_msg_header(buf: &mut Vec<u8>, h: &MsgHeader) {
    buf.push(MSG_HEADER_BYTES as u8);
    buf.extend_from_slice(&[h.info1, h.info2, h.info3, h.info4, h.result_code]);
    buf.extend_from_slice(&h.generation.to_be_bytes());
    buf.extend_from_slice(&h.record_ttl.to_be_bytes());
    buf.extend_from_slice(&h.transaction_ttl.to_be_bytes());
    buf.extend_from_slice(&h.n_fields.to_be_bytes());
    buf.extend_from_slice(&h.n_ops.to_be_bytes());
}

/// Appends a field.
pub fn put_field(buf: &mut Vec<u8>, field_type: u8, data: &[u8]) {
    buf.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    buf.push(field_type);
    buf.extend_from_slice(data);
}

/// Appends an op. The name must be at most 255 bytes (bin names are at most 15).
pub fn put_op(buf: &mut Vec<u8>, op_type: u8, particle_type: u8, name: &[u8], value: &[u8]) {
    debug_assert!(name.len() <= 255);
    buf.extend_from_slice(&((4 + name.len() + value.len()) as u32).to_be_bytes());
    buf.extend_from_slice(&[op_type, particle_type, 0, name.len() as u8]);
    buf.extend_from_slice(name);
    buf.extend_from_slice(value);
}
