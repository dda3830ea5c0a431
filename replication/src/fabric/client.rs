//! One group replica's view of the fabric: openraft's network factory and client
//! (`RaftNetworkV2`) for one (namespace, partition), sending each Raft message over the main
//! connection to the target node and each full snapshot over a connection of its own.

use std::future::Future;
use std::sync::atomic::Ordering;

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftTypeConfig};
use peregrine_engine::PartitionId;
use tokio::io::AsyncWriteExt;

use super::link::{Priority, read_frame};
use super::wire::{self, RaftRequest, Reply, Request, SnapshotBegin, SnapshotDone, frame, kind};
use super::{CallError, Fabric, Lane};
use crate::state_machine::{PartitionSnapshot, Snapshot};
use crate::types::{Command, TypeConfig};

type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

/// Makes the clients of one group replica.
#[allow(missing_debug_implementations)]
pub struct FabricFactory {
    fabric: Fabric,
    namespace: u16,
    pid: PartitionId,
}

impl FabricFactory {
    pub(crate) fn new(fabric: Fabric, namespace: u16, pid: PartitionId) -> FabricFactory {
        FabricFactory { fabric, namespace, pid }
    }
}

impl RaftNetworkFactory<TypeConfig> for FabricFactory {
    type Network = FabricClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> FabricClient {
        FabricClient { fabric: self.fabric.clone(), namespace: self.namespace, pid: self.pid, to: target }
    }
}

/// One group replica's client of the same group on one peer.
#[allow(missing_debug_implementations)]
pub struct FabricClient {
    fabric: Fabric,
    namespace: u16,
    pid: PartitionId,
    to: u64,
}

fn rpc_error(e: CallError, option: &RPCOption, to: u64) -> RPCError<TypeConfig> {
    match e {
        CallError::Timeout => RPCError::Timeout(Timeout {
            action: openraft::RPCTypes::AppendEntries,
            id: 0,
            target: to,
            timeout: option.hard_ttl(),
        }),
        other => RPCError::Unreachable(Unreachable::from_string(other.to_string())),
    }
}

impl FabricClient {
    async fn call(
        &self,
        rpc: RaftRequest,
        priority: Priority,
        option: &RPCOption,
    ) -> Result<Reply, RPCError<TypeConfig>> {
        let request = Request::Raft { namespace: self.namespace, partition: self.pid.get(), rpc };
        match self.fabric.call(self.to, &request, priority, option.hard_ttl()).await {
            Ok(Reply::Error(e)) => Err(RPCError::Unreachable(Unreachable::from_string(e))),
            Ok(r) => Ok(r),
            Err(e) => Err(rpc_error(e, option, self.to)),
        }
    }
}

fn unexpected(r: Reply) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(format!("unexpected reply {r:?}")))
}

impl RaftNetworkV2<TypeConfig> for FabricClient {
    type SnapshotData = PartitionSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let priority = if rpc.entries.is_empty() { Priority::Urgent } else { Priority::Bulk };
        match self.call(RaftRequest::Append(rpc), priority, &option).await? {
            Reply::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRequest::Vote(rpc), Priority::Urgent, &option).await? {
            Reply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRequest::PreVote(rpc), Priority::Urgent, &option).await? {
            Reply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRequest::TransferLeader(req), Priority::Urgent, &option).await? {
            Reply::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Streams the partition to the target over a connection of its own, batch by batch. The
    /// transfer is not abandoned when openraft closes replication (a leader change): a
    /// snapshot of committed state stays valid to install, and an install cut short would
    /// leave the receiver's partition incomplete (see `state_machine`). It ends with the
    /// install's answer, a broken connection, or the RPC's hard timeout.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let fabric = self.fabric.clone();
        let c = &fabric.inner.counters;
        c.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        c.snapshots_active.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(option.hard_ttl(), self.send_snapshot(vote, snapshot)).await;
        c.snapshots_active.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(why)) => {
                tracing::warn!(to = self.to, partition = self.pid.get(), "fabric: snapshot not sent: {why}");
                Err(StreamingError::Unreachable(Unreachable::from_string(why)))
            }
            Err(_) => Err(StreamingError::Timeout(Timeout {
                action: openraft::RPCTypes::InstallSnapshot,
                id: 0,
                target: self.to,
                timeout: option.hard_ttl(),
            })),
        }
    }
}

impl FabricClient {
    async fn send_snapshot(&self, vote: Vote, snapshot: Snapshot) -> Result<SnapshotResponse<TypeConfig>, String> {
        let addr = self.fabric.peer_addr(self.to).ok_or_else(|| format!("node {} has no fabric address", self.to))?;
        let stream = self.fabric.dial(self.to, addr, Lane::Snapshot).await.map_err(|e| e.to_string())?;
        let (mut rd, mut wr) = stream.into_split();
        let begin =
            SnapshotBegin { namespace: self.namespace, partition: self.pid.get(), vote, meta: snapshot.meta.clone() };
        let mb_per_s = self.fabric.inner.config.snapshot_mb_per_s;
        let send = async move {
            wr.write_all(&frame(kind::SNAPSHOT_BEGIN, 0, &begin).map_err(|e| e.to_string())?)
                .await
                .map_err(|e| e.to_string())?;
            let mut stream = snapshot.snapshot.stream(mb_per_s);
            while let Some(batch) = stream.next_batch().await.map_err(|e| e.to_string())? {
                let bytes =
                    frame(kind::SNAPSHOT_BATCH, 0, &Command::from_versions(&batch)).map_err(|e| e.to_string())?;
                wr.write_all(&bytes).await.map_err(|e| format!("sending a batch: {e}"))?;
            }
            let end = stream.end_covers_next().unwrap_or(0);
            wr.write_all(&frame(kind::SNAPSHOT_END, 0, &end).map_err(|e| e.to_string())?)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(wr)
        };
        let done = async move {
            match read_frame(&mut rd).await {
                Ok(Some((h, body))) if h.kind == kind::SNAPSHOT_DONE => {
                    wire::decode_body::<SnapshotDone>("snapshot done", &body).map_err(|e| e.to_string())?
                }
                Ok(Some((h, _))) => Err(format!("frame kind {} instead of the install's answer", h.kind)),
                Ok(None) => Err("the receiver closed the transfer".into()),
                Err(e) => Err(e.to_string()),
            }
        };
        tokio::pin!(done);
        // The receiver may answer before reading everything (a newer vote): take its answer.
        tokio::select! {
            answer = &mut done => answer,
            sent = send => {
                let _wr = sent?; // kept open until the answer
                done.await
            }
        }
    }
}

// `RaftTypeConfig` is used in bounds of the imported openraft types.
const _: fn() = || {
    fn assert_config<C: RaftTypeConfig>() {}
    assert_config::<TypeConfig>();
};
