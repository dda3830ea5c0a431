//! Single-record commands in a cluster: where each one executes, and the proxy that carries it
//! there.
//!
//! - **Writes** execute on the partition group's leader ([`Target::Group`]): decided there,
//!   replicated through the log, answered once applied.
//! - **Reads** follow the client's read mode (info3 bits): SESSION and LINEARIZE are served by
//!   the leader after a ReadIndex round (concurrent reads share one); ALLOW_REPLICA by any
//!   caught-up replica; ALLOW_UNAVAILABLE by any copy, even without a quorum.
//! - **A command reaching another node is proxied** over the fabric to the leader it knows of
//!   (at most [`PROXY_HOPS_MAX`] hops), as Aerospike's server does: the Java and Go clients do
//!   not retry "partition unavailable" on single-record commands.
//! - **With no leader known**, the command is held up to min(its timeout, [`HOLD_MAX`]),
//!   looking again every [`HOLD_POLL`]; then it answers timeout (9; for a write, "in doubt"
//!   as far as the client knows), or 11 when fewer than a quorum of the partition's
//!   replicas are reachable.
//!
//! The proxied request (`docs/FORMAT.md`, "Proxied command") is one hop count byte and the
//! command as an AS_MSG; the answer is the reply's result code, generation, void time and ops.

use std::time::Duration;

use peregrine_engine::Digest;
use peregrine_proto::consts::{field, info3, result};
use peregrine_proto::encode::{put_field, put_msg_header, put_op};
use peregrine_proto::{MsgHeader, decode_message};
use peregrine_replication::fabric::{CallError, ProxyHandler};
use peregrine_replication::group::{Group, ReadError, WriteError};
use tokio::time::Instant;

use crate::cluster::{Cluster, Ready};
use crate::node::Node;
use crate::record::{Failure, RecordCommand, RecordReply, Target, code_reply, execute_write, is_write, read};
use crate::values::result_code;

/// Most times one command is forwarded between nodes.
pub const PROXY_HOPS_MAX: u8 = 3;
/// Longest a command waits for its partition to have a leader.
pub const HOLD_MAX: Duration = Duration::from_secs(2);
/// How often a held command looks for a leader again.
const HOLD_POLL: Duration = Duration::from_millis(20);
/// Bytes before the ops in a proxied reply: result (1), generation (4), void time (4), ops (2).
const PROXY_REPLY_HEADER_BYTES: usize = 11;

/// A strong-consistency read mode (info3 bits `SC_READ_TYPE` and `SC_READ_RELAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// The leader, after a ReadIndex round (the default).
    Session,
    /// The leader, after a ReadIndex round.
    Linearize,
    /// Any caught-up replica.
    AllowReplica,
    /// Any copy, even without a quorum.
    AllowUnavailable,
}

impl ReadMode {
    /// The mode of a command's info3.
    pub fn of(info3_bits: u8) -> ReadMode {
        match (info3_bits & info3::SC_READ_TYPE != 0, info3_bits & info3::SC_READ_RELAX != 0) {
            (false, false) => ReadMode::Session,
            (true, false) => ReadMode::Linearize,
            (false, true) => ReadMode::AllowReplica,
            (true, true) => ReadMode::AllowUnavailable,
        }
    }
}

/// What to do with a command at this node.
enum Step {
    /// Answered.
    Done(RecordReply),
    /// Forward to this node.
    Forward(u64),
    /// No leader known (or not ready yet): look again shortly.
    Wait,
}

/// Runs a command in the cluster: here, or proxied to the node that can; `hops` is how many
/// times it was forwarded already.
pub async fn execute(node: &Node, cmd: &RecordCommand<'_>, hops: u8) -> RecordReply {
    let Some(cluster) = node.cluster.as_deref() else { return code_reply(result::SERVER_ERROR) };
    if !std::str::from_utf8(cmd.namespace).is_ok_and(|n| node.namespaces.contains_key(n)) {
        return code_reply(result::NAMESPACE_NOT_FOUND);
    }
    if cmd.unsupported {
        return code_reply(result::UNSUPPORTED_FEATURE);
    }
    let hold = match cmd.timeout_ms {
        0 => HOLD_MAX,
        ms => Duration::from_millis(u64::from(ms)).min(HOLD_MAX),
    };
    let started = Instant::now();
    let deadline = started + hold;
    let mut trace = SlowTrace::default();
    loop {
        let step_started = Instant::now();
        let step = match cluster.ready() {
            None => Step::Wait,
            Some(ready) => step(cluster, ready, cmd, hops).await,
        };
        trace.local += step_started.elapsed();
        let reply = match step {
            Step::Done(reply) => Some(reply),
            Step::Forward(to) if hops < PROXY_HOPS_MAX => {
                trace.forwards += 1;
                let forward_started = Instant::now();
                let reply = forward(cluster, to, cmd, hops, deadline).await;
                trace.proxied += forward_started.elapsed();
                reply
            }
            Step::Forward(_) | Step::Wait => {
                trace.waits += 1;
                None
            }
        };
        let reply = match reply {
            Some(reply) => reply,
            None if Instant::now() + HOLD_POLL > deadline => code_reply(timeout_code(cluster, cmd)),
            None => {
                tokio::time::sleep(HOLD_POLL).await;
                continue;
            }
        };
        trace.report(started.elapsed(), cmd, hops, reply.result_code);
        return reply;
    }
}

/// Commands slower than this are logged (at most one line per [`SLOW_LOG_EVERY`]).
const SLOW_COMMAND: Duration = Duration::from_millis(500);
/// Shortest interval between two slow-command log lines.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(1);

/// Where a command's time went, for the slow-command log.
#[derive(Default)]
struct SlowTrace {
    /// Times it found no leader (or a leader not ready) and waited [`HOLD_POLL`].
    waits: u32,
    /// Times it was forwarded to another node.
    forwards: u32,
    /// Time spent in forwarded calls.
    proxied: Duration,
    /// Time spent deciding here, the replicated write or the read included.
    local: Duration,
}

impl SlowTrace {
    fn report(&self, elapsed: Duration, cmd: &RecordCommand<'_>, hops: u8, result: u8) {
        static LAST_LOGGED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        if elapsed < SLOW_COMMAND {
            return;
        }
        let now_ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + SLOW_LOG_EVERY.as_millis() as u64;
        let last = LAST_LOGGED_MS.load(std::sync::atomic::Ordering::Relaxed);
        if now_ms < last + SLOW_LOG_EVERY.as_millis() as u64
            || LAST_LOGGED_MS
                .compare_exchange(
                    last,
                    now_ms,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        tracing::warn!(
            partition = Digest(cmd.digest).partition().get(),
            write = is_write(cmd),
            hops,
            result,
            elapsed_ms = elapsed.as_millis() as u64,
            waits = self.waits,
            forwards = self.forwards,
            proxied_ms = self.proxied.as_millis() as u64,
            local_ms = self.local.as_millis() as u64,
            "slow command"
        );
    }
}

/// 11 when fewer than a quorum of the partition's replicas are reachable from here, else 9.
fn timeout_code(cluster: &Cluster, cmd: &RecordCommand<'_>) -> u8 {
    let Some(ready) = cluster.ready() else { return result::TIMEOUT };
    let pid = Digest(cmd.digest).partition();
    let replicas = ready.placement.replicas(pid);
    let reachable = replicas.iter().filter(|&&n| n == cluster.node_id || cluster.fabric.is_connected(n)).count();
    if reachable * 2 <= replicas.len() { result::PARTITION_UNAVAILABLE } else { result::TIMEOUT }
}

async fn step(cluster: &Cluster, ready: &Ready, cmd: &RecordCommand<'_>, hops: u8) -> Step {
    let Some(ns) = std::str::from_utf8(cmd.namespace).ok().and_then(|n| ready.namespaces.get(n)) else {
        return Step::Done(code_reply(result::NAMESPACE_NOT_FOUND));
    };
    let pid = Digest(cmd.digest).partition();
    let Some(group) = ns.replicas.group(pid) else {
        // No replica here: the preferred leader knows more.
        return Step::Forward(ready.placement.preferred_leader(pid));
    };
    let me = cluster.node_id;
    let leader = group.leader();
    let elsewhere = |leader: Option<u64>| match leader {
        Some(l) if l != me => Step::Forward(l),
        _ => Step::Wait,
    };
    if is_write(cmd) {
        if leader != Some(me) {
            return elsewhere(leader);
        }
        return match execute_write(Target::Group(group), cmd).await {
            Ok(reply) => Step::Done(reply),
            Err(Failure::Engine(e)) => Step::Done(code_reply(result_code(&e))),
            Err(Failure::Replicated(WriteError::NotLeader { leader })) => elsewhere(leader),
            Err(Failure::Replicated(WriteError::NotReady)) => Step::Wait,
            Err(Failure::Replicated(e @ (WriteError::InDoubt(_) | WriteError::Fatal(_)))) => {
                tracing::debug!(partition = pid.get(), hops, "write in doubt: {e}");
                Step::Done(code_reply(result::TIMEOUT))
            }
            Err(Failure::Replicated(WriteError::Refused(e))) => Step::Done(code_reply(result_code(&e))),
        };
    }
    let local = || async { read(group.engine(), cmd).await.unwrap_or_else(|e| code_reply(result_code(&e))) };
    match ReadMode::of(cmd.info3) {
        ReadMode::AllowUnavailable => Step::Done(local().await),
        ReadMode::AllowReplica if group.is_caught_up() => Step::Done(local().await),
        ReadMode::AllowReplica | ReadMode::Session | ReadMode::Linearize => {
            if leader != Some(me) {
                return elsewhere(leader);
            }
            match group.linearizable_read().await {
                Ok(()) => Step::Done(local().await),
                Err(ReadError::NotLeader { leader }) => elsewhere(leader),
                Err(ReadError::Unavailable(why)) => {
                    tracing::debug!(partition = pid.get(), "read not confirmed: {why}");
                    Step::Wait
                }
                Err(ReadError::Fatal(why)) => {
                    tracing::warn!(partition = pid.get(), "read on a stopped group: {why}");
                    Step::Done(code_reply(result::PARTITION_UNAVAILABLE))
                }
            }
        }
    }
}

/// Proxies `cmd` to node `to`. `None` when it was not sent (no connection): the caller may
/// look again. A request sent whose answer did not come back is answered "timeout".
async fn forward(
    cluster: &Cluster,
    to: u64,
    cmd: &RecordCommand<'_>,
    hops: u8,
    deadline: Instant,
) -> Option<RecordReply> {
    let left = deadline.saturating_duration_since(Instant::now()).max(HOLD_POLL);
    // The target holds the command at most the rest of our time; give the reply room.
    let request = encode_proxied(cmd, hops + 1, left);
    let budget = left + Duration::from_millis(500);
    match cluster.fabric.proxy(to, request, budget).await {
        Ok(answer) => Some(decode_proxied_reply(&answer).unwrap_or_else(|e| {
            tracing::warn!(to, "bad proxied reply: {e}");
            code_reply(result::SERVER_ERROR)
        })),
        Err(CallError::Unreachable(why)) if why.starts_with("no connection") => None,
        Err(e) => {
            tracing::debug!(to, "proxied command failed: {e}");
            Some(code_reply(result::TIMEOUT))
        }
    }
}

/// A proxied command: hop count, then the command as an AS_MSG whose transaction_ttl is the
/// time the target may hold it.
pub fn encode_proxied(cmd: &RecordCommand<'_>, hops: u8, hold: Duration) -> Vec<u8> {
    let mut buf = vec![hops];
    let n_fields = 2 + u16::from(!cmd.set.is_empty()) + u16::from(cmd.key.is_some());
    put_msg_header(
        &mut buf,
        &MsgHeader {
            info1: cmd.info1,
            info2: cmd.info2,
            info3: cmd.info3,
            generation: cmd.generation,
            record_ttl: cmd.record_ttl,
            transaction_ttl: u32::try_from(hold.as_millis()).unwrap_or(u32::MAX).max(1),
            n_fields,
            n_ops: u16::try_from(cmd.ops.len()).unwrap_or(u16::MAX),
            ..MsgHeader::default()
        },
    );
    put_field(&mut buf, field::NAMESPACE, cmd.namespace);
    if !cmd.set.is_empty() {
        put_field(&mut buf, field::SET, cmd.set);
    }
    if let Some(k) = cmd.key {
        put_field(&mut buf, field::KEY, k);
    }
    put_field(&mut buf, field::DIGEST, &cmd.digest);
    for op in cmd.ops {
        put_op(&mut buf, op.op_type, op.particle_type, op.name, op.value);
    }
    buf
}

/// A proxied reply: result, generation (u32 LE), void time (u32 LE), op count (u16 LE), ops.
pub fn encode_proxied_reply(r: &RecordReply) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROXY_REPLY_HEADER_BYTES + r.ops.len());
    out.push(r.result_code);
    out.extend_from_slice(&r.generation.to_le_bytes());
    out.extend_from_slice(&r.void_time.to_le_bytes());
    out.extend_from_slice(&r.n_ops.to_le_bytes());
    out.extend_from_slice(&r.ops);
    out
}

/// Decodes [`encode_proxied_reply`]'s bytes.
pub fn decode_proxied_reply(bytes: &[u8]) -> Result<RecordReply, String> {
    let (head, ops) = bytes
        .split_at_checked(PROXY_REPLY_HEADER_BYTES)
        .ok_or_else(|| format!("{} bytes, shorter than a reply header", bytes.len()))?;
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    Ok(RecordReply {
        result_code: head[0],
        generation: u32_at(1),
        void_time: u32_at(5),
        n_ops: u16::from_le_bytes([head[9], head[10]]),
        ops: ops.to_vec(),
    })
}

/// Executes commands other nodes proxy to this one.
#[derive(Debug)]
pub struct ServerProxy {
    /// The node (weak: the node owns the fabric that owns this).
    pub node: std::sync::Weak<Node>,
}

impl ProxyHandler for ServerProxy {
    fn handle(&self, _from: u64, request: Vec<u8>) -> futures_util::future::BoxFuture<'static, Vec<u8>> {
        let node = self.node.clone();
        Box::pin(async move {
            let Some(node) = node.upgrade() else { return encode_proxied_reply(&code_reply(result::TIMEOUT)) };
            let reply = match request.split_first() {
                Some((&hops, body)) => match decode_message(body) {
                    Ok((msg, _)) => match crate::conn::single(&msg) {
                        Ok(cmd) => execute(&node, &cmd, hops).await,
                        Err(code) => code_reply(code),
                    },
                    Err(_) => code_reply(result::PARAMETER),
                },
                None => code_reply(result::PARAMETER),
            };
            encode_proxied_reply(&reply)
        })
    }
}

/// Whether this node may serve a scan of `pid` in `ns`: it leads the partition's group.
pub fn leads(cluster: &Cluster, ns: &str, pid: peregrine_engine::PartitionId) -> bool {
    cluster
        .ready()
        .and_then(|r| r.namespaces.get(ns))
        .and_then(|n| n.replicas.group(pid))
        .is_some_and(Group::is_ready_leader)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn read_modes_follow_the_info3_bits() {
        assert_eq!(ReadMode::of(0), ReadMode::Session);
        assert_eq!(ReadMode::of(info3::SC_READ_TYPE), ReadMode::Linearize);
        assert_eq!(ReadMode::of(info3::SC_READ_RELAX), ReadMode::AllowReplica);
        assert_eq!(ReadMode::of(info3::SC_READ_TYPE | info3::SC_READ_RELAX), ReadMode::AllowUnavailable);
    }

    #[test]
    fn proxied_commands_and_replies_round_trip() {
        let ops = [peregrine_proto::Op {
            op_type: 2,
            particle_type: 1,
            flags: 0,
            name: b"n",
            value: &[0, 0, 0, 0, 0, 0, 0, 7],
        }];
        let cmd = RecordCommand {
            info1: 0,
            info2: 1,
            info3: 0x40,
            generation: 3,
            record_ttl: 100,
            namespace: b"test",
            set: b"s",
            key: Some(&[3, b'k']),
            digest: [9; 20],
            ops: &ops,
            unsupported: false,
            timeout_ms: 0,
        };
        let bytes = encode_proxied(&cmd, 2, Duration::from_millis(1500));
        assert_eq!(bytes[0], 2);
        let (msg, used) = decode_message(&bytes[1..]).unwrap();
        assert_eq!(used, bytes.len() - 1);
        let back = crate::conn::single(&msg).unwrap();
        assert_eq!((back.info2, back.info3, back.generation, back.record_ttl), (1, 0x40, 3, 100));
        assert_eq!(
            (back.namespace, back.set, back.key, back.digest),
            (&b"test"[..], &b"s"[..], Some(&[3, b'k'][..]), [9; 20])
        );
        assert_eq!(back.ops, &ops[..]);
        assert_eq!(back.timeout_ms, 1500);

        let reply = RecordReply { result_code: 0, generation: 4, void_time: 5, n_ops: 1, ops: vec![1, 2, 3] };
        let r = decode_proxied_reply(&encode_proxied_reply(&reply)).unwrap();
        assert_eq!((r.result_code, r.generation, r.void_time, r.n_ops, r.ops), (0, 4, 5, 1, vec![1, 2, 3]));
        assert!(decode_proxied_reply(&[0; 10]).is_err());
    }
}
