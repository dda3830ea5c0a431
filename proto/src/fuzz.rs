//! One entry point that runs every decoder over arbitrary bytes, for the cargo-fuzz target and
//! for the seed-corpus test in the normal test run. It must never panic.
//!
//! [`decode_everything`] is lenient: it skips whatever does not decode, as a fuzz target must.
//! [`decode_strict`] runs the same decoders but stops at the first error and names it, so the
//! seed-corpus test can insist that real client frames decode completely.

use crate::batch::Batch;
use crate::consts::{PROTO_BODY_BYTES_MAX, field, msg_type};
use crate::decode::{ProtoHeader, decode_message, digests, partition_ids, u64_field};
use crate::error::DecodeError;
use crate::{compress, info};

/// Largest inflated size of a compressed frame the fuzz decoders accept.
const INFLATE_MAX: u64 = 1 << 20;

/// What a decode found, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Info commands.
    pub info_commands: usize,
    /// AS_MSG messages.
    pub messages: usize,
    /// Batch-index rows (field 41).
    pub batch_rows: usize,
    /// Partition ids in partition-array fields.
    pub partition_ids: usize,
    /// Digests in digest-array fields.
    pub digests: usize,
    /// Max-records fields.
    pub max_records: usize,
}

impl Decoded {
    /// Everything counted.
    pub fn total(&self) -> usize {
        self.info_commands + self.messages + self.batch_rows + self.partition_ids + self.digests + self.max_records
    }
}

impl std::ops::AddAssign for Decoded {
    fn add_assign(&mut self, o: Decoded) {
        self.info_commands += o.info_commands;
        self.messages += o.messages;
        self.batch_rows += o.batch_rows;
        self.partition_ids += o.partition_ids;
        self.digests += o.digests;
        self.max_records += o.max_records;
    }
}

/// Decodes `data` as a frame stream the way the server would; returns how many items (info
/// commands, messages, batch rows, partition ids, digests, max-records fields) decoded.
/// Errors are skipped.
pub fn decode_everything(data: &[u8]) -> usize {
    let mut d = Decoded::default();
    // Lenient mode never returns an error.
    let _ = frames(data, Mode::Lenient, &mut d);
    d.total()
}

/// Decodes `data` as a frame stream like [`decode_everything`], but every decoder must succeed:
/// frame headers, message bodies, digest fields, batch-index rows, partition and digest arrays,
/// max-records fields, compressed frames; and the stream must end on a frame boundary. Returns
/// what decoded, or the first error and where it was found.
pub fn decode_strict(data: &[u8]) -> Result<Decoded, String> {
    let mut d = Decoded::default();
    frames(data, Mode::Strict, &mut d)?;
    Ok(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Lenient,
    Strict,
}

impl Mode {
    /// `Ok(Some(v))` on success; on an error, `Ok(None)` when lenient, `Err` naming it when strict.
    fn check<T>(self, r: Result<T, DecodeError>, what: &str) -> Result<Option<T>, String> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if self == Mode::Strict => Err(format!("{what}: {e}")),
            Err(_) => Ok(None),
        }
    }

    /// `Err(what)` when strict, nothing when lenient.
    fn fail(self, what: impl FnOnce() -> String) -> Result<(), String> {
        if self == Mode::Strict { Err(what()) } else { Ok(()) }
    }
}

fn frames(data: &[u8], mode: Mode, d: &mut Decoded) -> Result<(), String> {
    let mut rest = data;
    while rest.len() >= 8 {
        let at = data.len() - rest.len();
        let mut header = [0u8; 8];
        header.copy_from_slice(&rest[..8]);
        let Some(h) = mode.check(ProtoHeader::decode(header, PROTO_BODY_BYTES_MAX), "frame header")? else {
            break;
        };
        let want = 8 + h.size as usize;
        if want > rest.len() {
            mode.fail(|| format!("frame at byte {at} claims {} body bytes, {} present", h.size, rest.len() - 8))?;
        }
        let end = want.min(rest.len());
        let body = &rest[8..end];
        rest = &rest[end..];
        let r = match h.msg_type {
            msg_type::INFO => {
                d.info_commands += info::parse_request(body).len();
                Ok(())
            }
            msg_type::COMPRESSED => match mode.check(compress::inflate(body, INFLATE_MAX), "inflate") {
                Ok(Some(inner)) => frames(&inner, mode, d),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            _ => messages(body, mode, d),
        };
        r.map_err(|e| format!("frame at byte {at}: {e}"))?;
    }
    if !rest.is_empty() {
        mode.fail(|| format!("{} trailing bytes after the last frame", rest.len()))?;
    }
    Ok(())
}

fn messages(mut body: &[u8], mode: Mode, d: &mut Decoded) -> Result<(), String> {
    while !body.is_empty() {
        let Some((msg, used)) = mode.check(decode_message(body), "message")? else { break };
        d.messages += 1;
        mode.check(msg.digest(), "digest field")?;
        for f in &msg.fields {
            match f.field_type {
                field::BATCH_INDEX => {
                    if let Some(b) = mode.check(Batch::decode(f.data), "batch-index field")? {
                        d.batch_rows += b.rows.len();
                    }
                }
                field::PARTITION_ARRAY => {
                    d.partition_ids +=
                        mode.check(partition_ids(f.data), "partition-array field")?.map_or(0, |v| v.len());
                }
                field::DIGEST_ARRAY => {
                    d.digests += mode.check(digests(f.data), "digest-array field")?.map_or(0, |v| v.len());
                }
                field::MAX_RECORDS => {
                    d.max_records += usize::from(mode.check(u64_field(f.data), "max-records field")?.is_some());
                }
                _ => {}
            }
        }
        if used == 0 {
            break;
        }
        body = &body[used..];
    }
    Ok(())
}
