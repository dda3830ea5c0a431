//! One entry point that runs every decoder over arbitrary bytes, for the cargo-fuzz target and
//! for the seed-corpus test in the normal test run. It must never panic.

use crate::batch::Batch;
use crate::consts::{PROTO_BODY_BYTES_MAX, field, msg_type};
use crate::decode::{ProtoHeader, decode_message, digests, partition_ids, u64_field};
use crate::{compress, info};

/// Decodes `data` as a frame stream the way the server would; returns how many messages decoded.
pub fn decode_everything(data: &[u8]) -> usize {
    let mut decoded = 0;
    let mut rest = data;
    while rest.len() >= 8 {
        let mut header = [0u8; 8];
        header.copy_from_slice(&rest[..8]);
        let Ok(h) = ProtoHeader::decode(header, PROTO_BODY_BYTES_MAX) else { break };
        let end = (8 + h.size as usize).min(rest.len());
        let body = &rest[8..end];
        rest = &rest[end..];
        match h.msg_type {
            msg_type::INFO => decoded += info::parse_request(body).len(),
            msg_type::COMPRESSED => {
                if let Ok(inner) = compress::inflate(body, 1 << 20) {
                    decoded += decode_everything(&inner);
                }
            }
            _ => decoded += decode_messages(body),
        }
    }
    decoded
}

fn decode_messages(mut body: &[u8]) -> usize {
    let mut n = 0;
    while !body.is_empty() {
        let Ok((msg, used)) = decode_message(body) else { break };
        n += 1;
        let _ = msg.digest();
        for f in &msg.fields {
            match f.field_type {
                field::BATCH_INDEX => {
                    if let Ok(b) = Batch::decode(f.data) {
                        n += b.rows.len();
                    }
                }
                field::PARTITION_ARRAY => n += partition_ids(f.data).map_or(0, |v| v.len()),
                field::DIGEST_ARRAY => n += digests(f.data).map_or(0, |v| v.len()),
                field::MAX_RECORDS => n += usize::from(u64_field(f.data).is_ok()),
                _ => {}
            }
        }
        if used == 0 {
            break;
        }
        body = &body[used..];
    }
    n
}
