//! Reply framing: AS_MSG messages packed into type-3 frames of at most ~128 KiB, written to the
//! socket as they fill (batch and scan replies stream), or one frame for a single reply.

use peregrine_proto::MsgHeader;
use peregrine_proto::encode::{begin_frame, end_frame, put_msg_header};
use tokio::io::AsyncWriteExt;

use crate::record::RecordReply;

/// Streamed replies are cut into frames of about this size.
pub const STREAM_FRAME_BYTES: usize = 128 * 1024;

/// Buffers reply frames and writes them to the client.
#[derive(Debug)]
pub struct FrameWriter<W> {
    out: W,
    buf: Vec<u8>,
    frame_start: Option<usize>,
}

impl<W: tokio::io::AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> FrameWriter<W> {
        FrameWriter { out, buf: Vec::with_capacity(64 * 1024), frame_start: None }
    }

    /// The buffer to append one message to, inside an open frame of `msg_type`.
    pub fn message(&mut self, msg_type: u8) -> &mut Vec<u8> {
        if self.frame_start.is_none() {
            self.frame_start = Some(begin_frame(&mut self.buf, msg_type));
        }
        &mut self.buf
    }

    /// Appends a record reply (batch rows carry their index in `transaction_ttl`).
    pub fn record(&mut self, msg_type: u8, r: &RecordReply, transaction_ttl: u32) {
        let buf = self.message(msg_type);
        put_msg_header(
            buf,
            &MsgHeader {
                result_code: r.result_code,
                generation: r.generation,
                record_ttl: r.void_time,
                transaction_ttl,
                n_ops: if r.result_code == 0 { r.n_ops } else { 0 },
                ..MsgHeader::default()
            },
        );
        if r.result_code == 0 {
            buf.extend_from_slice(&r.ops);
        }
    }

    /// Appends a "partition done" message: partition `pid` of a scan ended with `result_code`
    /// (non-zero: the client retries the partition).
    pub fn partition_done(&mut self, msg_type: u8, pid: u16, result_code: u8) {
        let buf = self.message(msg_type);
        put_msg_header(
            buf,
            &MsgHeader {
                info3: peregrine_proto::consts::info3::PARTITION_DONE,
                result_code,
                generation: u32::from(pid),
                ..MsgHeader::default()
            },
        );
    }

    /// Appends the message that ends a stream.
    pub fn last(&mut self, msg_type: u8, result_code: u8) {
        let buf = self.message(msg_type);
        put_msg_header(
            buf,
            &MsgHeader { info3: peregrine_proto::consts::info3::LAST, result_code, ..MsgHeader::default() },
        );
    }

    /// Writes the frame out once it has grown past [`STREAM_FRAME_BYTES`].
    pub async fn flush_if_full(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= STREAM_FRAME_BYTES { self.flush().await } else { Ok(()) }
    }

    /// Closes the open frame and writes everything.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if let Some(start) = self.frame_start.take() {
            end_frame(&mut self.buf, start);
        }
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}
