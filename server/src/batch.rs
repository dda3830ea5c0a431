//! Batch requests: every row is executed as a single-record command (reads, writes, deletes),
//! up to `BATCH_ROWS_IN_FLIGHT` at a time so device reads overlap; replies carry the row index and
//! may stream over several frames, then a LAST message.

use peregrine_engine::completion::join_all;
use peregrine_proto::consts::{field, msg_type, result};
use peregrine_proto::{Batch, Message};

use crate::frames::FrameWriter;
use crate::node::Node;
use crate::record::{RecordCommand, execute};

/// Rows executed concurrently.
const BATCH_ROWS_IN_FLIGHT: usize = 64;

/// Runs a batch and writes its replies; returns the result code of the batch as a whole.
pub async fn execute_batch<W: tokio::io::AsyncWrite + Unpin>(
    node: &Node,
    msg: &Message<'_>,
    out: &mut FrameWriter<W>,
) -> std::io::Result<u8> {
    if msg.has_field(field::FILTER_EXPRESSION) || msg.has_field(field::TXN_ID) {
        out.last(msg_type::MESSAGE, result::UNSUPPORTED_FEATURE);
        return Ok(result::UNSUPPORTED_FEATURE);
    }
    let Some(data) = msg.field(field::BATCH_INDEX) else {
        out.last(msg_type::MESSAGE, result::PARAMETER);
        return Ok(result::PARAMETER);
    };
    let batch = match Batch::decode(data) {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "malformed batch");
            out.last(msg_type::MESSAGE, result::PARAMETER);
            return Ok(result::PARAMETER);
        }
    };
    let commands: Vec<RecordCommand<'_>> = batch
        .rows
        .iter()
        .map(|row| {
            let c = &batch.commands[row.command];
            let unsupported = c.fields.iter().any(|f| {
                matches!(f.field_type, field::FILTER_EXPRESSION | field::TXN_ID | field::UDF_PACKAGE | field::UDF_OP)
            });
            RecordCommand {
                info1: c.info1,
                info2: c.info2,
                info3: c.info3,
                generation: u32::from(c.generation),
                record_ttl: c.record_ttl,
                namespace: c.field(field::NAMESPACE).unwrap_or(b""),
                set: c.field(field::SET).unwrap_or(b""),
                key: c.field(field::KEY),
                digest: row.digest,
                ops: &c.ops,
                unsupported,
                timeout_ms: msg.header.transaction_ttl,
            }
        })
        .collect();
    for (rows, cmds) in batch.rows.chunks(BATCH_ROWS_IN_FLIGHT).zip(commands.chunks(BATCH_ROWS_IN_FLIGHT)) {
        let replies = join_all(cmds.iter().map(|c| execute(node, c)).collect()).await;
        for (row, reply) in rows.iter().zip(replies) {
            out.record(msg_type::MESSAGE, &reply, row.index);
        }
        out.flush_if_full().await?;
    }
    out.last(msg_type::MESSAGE, result::OK);
    Ok(result::OK)
}
