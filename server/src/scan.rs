//! Partition scans (and queries without a secondary index): records of the requested partitions
//! in digest order, resumable after a digest per partition, with selected bins or none, a
//! maximum record count and a records-per-second limit; streamed in ~128 KiB frames.

use std::time::{Duration, Instant};

use peregrine_engine::completion::join_all;
use peregrine_engine::{BinName, BinSelection, Engine, Error, PartitionId};
use peregrine_proto::consts::{field, info1, info2, msg_type, op, result};
use peregrine_proto::decode::{digests, partition_ids, u64_field};
use peregrine_proto::encode::{put_field, put_msg_header};
use peregrine_proto::{Message, MsgHeader};

use crate::frames::FrameWriter;
use crate::node::Node;
use crate::values::to_wire;

/// Records read from the device concurrently within a partition.
const SCAN_READS_IN_FLIGHT: usize = 32;

/// Runs a scan and writes its records; returns the scan's result code.
pub async fn execute_scan<W: tokio::io::AsyncWrite + Unpin>(
    node: &Node,
    msg: &Message<'_>,
    out: &mut FrameWriter<W>,
) -> std::io::Result<u8> {
    let code = match plan(node, msg) {
        Ok(plan) => stream(node, &plan, out).await?,
        Err(code) => code,
    };
    out.last(msg_type::MESSAGE, code);
    Ok(code)
}

struct Plan<'a> {
    engine: &'a Engine,
    namespace: &'a [u8],
    set_id: Option<Option<u16>>,
    partitions: Vec<(PartitionId, Option<peregrine_engine::Digest>)>,
    selection: BinSelection,
    no_bins: bool,
    max_records: u64,
    records_per_second: u32,
}

fn plan<'a>(node: &'a Node, msg: &Message<'a>) -> Result<Plan<'a>, u8> {
    let namespace = msg.field(field::NAMESPACE).unwrap_or(b"");
    let engine =
        std::str::from_utf8(namespace).ok().and_then(|n| node.namespaces.get(n)).ok_or(result::NAMESPACE_NOT_FOUND)?;
    if [field::INDEX_NAME, field::INDEX_RANGE, field::INDEX_CONTEXT, field::INDEX_EXPRESSION, field::INDEX_TYPE]
        .iter()
        .any(|f| msg.has_field(*f))
    {
        return Err(result::INDEX_NOT_FOUND);
    }
    if msg.header.info2 & info2::WRITE != 0
        || [field::UDF_PACKAGE, field::UDF_OP, field::FILTER_EXPRESSION, field::TXN_ID]
            .iter()
            .any(|f| msg.has_field(*f))
    {
        return Err(result::UNSUPPORTED_FEATURE);
    }
    // A set the namespace has never seen has no records: Some(None).
    let set_id = msg.field(field::SET).filter(|s| !s.is_empty()).map(|s| engine.set_id(s));
    let mut partitions: Vec<(PartitionId, Option<peregrine_engine::Digest>)> = match msg.field(field::PARTITION_ARRAY) {
        Some(data) => partition_ids(data)
            .map_err(|_| result::PARAMETER)?
            .into_iter()
            .map(|p| PartitionId::new(p).map(|p| (p, None)).ok_or(result::PARAMETER))
            .collect::<Result<_, _>>()?,
        None if msg.has_field(field::DIGEST_ARRAY) => Vec::new(),
        None => PartitionId::all().map(|p| (p, None)).collect(),
    };
    if let Some(data) = msg.field(field::DIGEST_ARRAY) {
        for d in digests(data).map_err(|_| result::PARAMETER)? {
            let digest = peregrine_engine::Digest(d);
            let pid = digest.partition();
            match partitions.iter_mut().find(|(p, _)| *p == pid) {
                Some(slot) => slot.1 = Some(digest),
                None => partitions.push((pid, Some(digest))),
            }
        }
    }
    let no_bins = msg.header.info1 & info1::NOBINDATA != 0;
    let names: Vec<BinName> = msg
        .ops
        .iter()
        .filter(|o| o.op_type == op::READ && !o.name.is_empty())
        .map(|o| BinName::new(o.name).map_err(|_| result::BIN_NAME))
        .collect::<Result<_, _>>()?;
    if msg.ops.iter().any(|o| o.op_type != op::READ) {
        return Err(result::UNSUPPORTED_FEATURE);
    }
    let selection = if no_bins {
        BinSelection::None
    } else if names.is_empty() {
        BinSelection::All
    } else {
        BinSelection::Only(names)
    };
    let max_records =
        msg.field(field::MAX_RECORDS).map(u64_field).transpose().map_err(|_| result::PARAMETER)?.unwrap_or(0);
    let records_per_second =
        msg.field(field::RECORDS_PER_SECOND).and_then(|d| <[u8; 4]>::try_from(d).ok()).map_or(0, u32::from_be_bytes);
    Ok(Plan { engine, namespace, set_id, partitions, selection, no_bins, max_records, records_per_second })
}

async fn stream<W: tokio::io::AsyncWrite + Unpin>(
    node: &Node,
    plan: &Plan<'_>,
    out: &mut FrameWriter<W>,
) -> std::io::Result<u8> {
    let started = Instant::now();
    let mut sent: u64 = 0;
    let ns = std::str::from_utf8(plan.namespace).unwrap_or("");
    for (pid, after) in &plan.partitions {
        if let Some(cluster) = &node.cluster
            && !crate::route::leads(cluster, ns, *pid)
        {
            // Not led here: the client retries this partition on the node that leads it.
            out.partition_done(msg_type::MESSAGE, pid.get(), result::PARTITION_UNAVAILABLE);
            continue;
        }
        let mut entries = plan.engine.partition_entries(*pid, after.as_ref());
        match plan.set_id {
            Some(None) => entries.clear(),
            Some(Some(id)) => entries.retain(|e| e.set_id == id),
            None => {}
        }
        for chunk in entries.chunks(SCAN_READS_IN_FLIGHT) {
            let records =
                join_all(chunk.iter().map(|e| plan.engine.read_entry_async(e, &plan.selection)).collect()).await;
            for record in records {
                let record = match record {
                    Ok(r) => r,
                    // Deleted or expired since it was listed.
                    Err(Error::NotFound) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "scan stopped by a read error");
                        return Ok(crate::values::result_code(&e));
                    }
                };
                if matches!(plan.selection, BinSelection::Only(_)) && record.bins.is_empty() {
                    continue;
                }
                put_record(out.message(msg_type::MESSAGE), plan, &record);
                sent += 1;
                if plan.max_records > 0 && sent >= plan.max_records {
                    return Ok(result::OK);
                }
                if plan.records_per_second > 0 {
                    let due = started + Duration::from_secs_f64(sent as f64 / f64::from(plan.records_per_second));
                    out.flush().await?;
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            out.flush_if_full().await?;
        }
    }
    Ok(result::OK)
}

fn put_record(buf: &mut Vec<u8>, plan: &Plan<'_>, r: &peregrine_engine::Record) {
    let mut n_fields = 2;
    if !r.set_name.is_empty() {
        n_fields += 1;
    }
    if r.key.is_some() {
        n_fields += 1;
    }
    put_msg_header(
        buf,
        &MsgHeader {
            info1: if plan.no_bins { info1::NOBINDATA } else { 0 },
            generation: u32::from(r.meta.generation),
            record_ttl: r.meta.void_time,
            n_fields,
            n_ops: r.bins.len() as u16,
            ..MsgHeader::default()
        },
    );
    put_field(buf, field::NAMESPACE, plan.namespace);
    put_field(buf, field::DIGEST, &r.digest.0);
    if !r.set_name.is_empty() {
        put_field(buf, field::SET, &r.set_name);
    }
    if let Some(k) = &r.key {
        buf.extend_from_slice(&(k.bytes.len() as u32 + 2).to_be_bytes());
        buf.push(field::KEY);
        buf.push(k.particle_type);
        buf.extend_from_slice(&k.bytes);
    }
    for b in &r.bins {
        let name = b.name.as_bytes();
        let len = b.value.encoded_len();
        buf.extend_from_slice(&((4 + name.len() + len) as u32).to_be_bytes());
        buf.extend_from_slice(&[op::READ, b.value.particle_type(), 0, name.len() as u8]);
        buf.extend_from_slice(name);
        to_wire(&b.value, buf);
    }
}
