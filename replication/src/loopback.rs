//! The in-process transport: every partition group of every node in one process, messages
//! delivered by function call. It serves the in-process cluster tests and the replication
//! benchmark; the server's fabric (next issue) replaces it between processes.
//!
//! Faults it can inject: a node *down* (every message to or from it is unreachable) and a
//! directed *cut* between two nodes (messages from one to the other are unreachable, the
//! other way still flows). It counts the messages it delivers, so tests can see whether idle
//! groups are silent. It carries the nodes' control messages (liveness, sleep, wake) too, each
//! delivered on its own task.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use peregrine_engine::PartitionId;

use crate::control::{ControlMessage, ControlSender};
use crate::group::PartitionRaft;
use crate::node::ReplicaNode;
use crate::snapshot_transfer::{CancelToken, cancel_on_close};
use crate::state_machine::{PartitionSnapshot, Snapshot};
use crate::types::TypeConfig;

type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

/// Messages delivered, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// Append-entries requests (heartbeats included).
    pub appends: u64,
    /// Vote and pre-vote requests.
    pub votes: u64,
    /// Full snapshots.
    pub snapshots: u64,
    /// Control messages (liveness, sleep, wake).
    pub controls: u64,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    votes: AtomicU64,
    snapshots: AtomicU64,
    controls: AtomicU64,
}

#[derive(Default)]
struct Shared {
    rafts: Mutex<BTreeMap<(u64, u16), PartitionRaft>>,
    down: Mutex<BTreeSet<u64>>,
    cuts: Mutex<BTreeSet<(u64, u64)>>,
    nodes: Mutex<BTreeMap<u64, ReplicaNode>>,
    counters: Counters,
}

/// The registry of every group replica in the process and the faults between them.
#[derive(Clone, Default)]
#[allow(missing_debug_implementations)] // a registry of Rafts: nothing useful to print
pub struct Loopback {
    shared: Arc<Shared>,
}

impl Loopback {
    /// An empty transport.
    pub fn new() -> Loopback {
        Loopback::default()
    }

    /// Registers node `node`'s replica of group `pid`.
    pub fn register(&self, node: u64, pid: PartitionId, raft: PartitionRaft) {
        self.lock_rafts().insert((node, pid.get()), raft);
    }

    /// Registers a node: its groups' Rafts, and the node itself for control messages.
    pub fn register_node(&self, node: &ReplicaNode) {
        for g in node.groups() {
            self.register(node.id(), g.partition(), g.raft().clone());
        }
        self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).insert(node.id(), node.clone());
    }

    /// Removes every replica of node `node` (it stopped).
    pub fn unregister_node(&self, node: u64) {
        self.lock_rafts().retain(|(n, _), _| *n != node);
        self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
    }

    /// This transport as the control sender of a node.
    pub fn control(&self) -> Arc<dyn ControlSender> {
        Arc::new(self.clone())
    }

    /// Node `node`'s replica of group `pid`, if registered.
    pub fn raft(&self, node: u64, pid: PartitionId) -> Option<PartitionRaft> {
        self.lock_rafts().get(&(node, pid.get())).cloned()
    }

    /// Makes `node` unreachable (both ways) or reachable again.
    pub fn set_down(&self, node: u64, down: bool) {
        let mut d = self.shared.down.lock().unwrap_or_else(|p| p.into_inner());
        if down {
            d.insert(node);
        } else {
            d.remove(&node);
        }
    }

    /// Cuts (or restores) the direction `from → to`.
    pub fn set_cut(&self, from: u64, to: u64, cut: bool) {
        let mut c = self.shared.cuts.lock().unwrap_or_else(|p| p.into_inner());
        if cut {
            c.insert((from, to));
        } else {
            c.remove(&(from, to));
        }
    }

    /// Restores every link and node.
    pub fn heal(&self) {
        self.shared.down.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.shared.cuts.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Messages delivered so far.
    pub fn counts(&self) -> MessageCounts {
        let c = &self.shared.counters;
        MessageCounts {
            appends: c.appends.load(Ordering::Relaxed),
            votes: c.votes.load(Ordering::Relaxed),
            snapshots: c.snapshots.load(Ordering::Relaxed),
            controls: c.controls.load(Ordering::Relaxed),
        }
    }

    /// The network factory node `from` gives group `pid`'s Raft.
    pub fn factory(&self, from: u64, pid: PartitionId) -> LoopbackFactory {
        LoopbackFactory { loopback: self.clone(), from, pid }
    }

    fn lock_rafts(&self) -> std::sync::MutexGuard<'_, BTreeMap<(u64, u16), PartitionRaft>> {
        self.shared.rafts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the link `from → to` drops messages.
    fn blocked(&self, from: u64, to: u64) -> bool {
        let down = self.shared.down.lock().unwrap_or_else(|p| p.into_inner());
        let cuts = self.shared.cuts.lock().unwrap_or_else(|p| p.into_inner());
        down.contains(&from) || down.contains(&to) || cuts.contains(&(from, to))
    }

    /// The target replica, if the link `from → to` delivers.
    fn route(&self, from: u64, to: u64, pid: PartitionId) -> Result<PartitionRaft, Unreachable<TypeConfig>> {
        if self.blocked(from, to) {
            return Err(Unreachable::from_string(format!("link {from} -> {to} is down")));
        }
        self.raft(to, pid).ok_or_else(|| Unreachable::from_string(format!("node {to} has no group {}", pid.get())))
    }
}

impl ControlSender for Loopback {
    fn send(&self, from: u64, to: u64, message: ControlMessage) {
        if self.blocked(from, to) {
            return;
        }
        let Some(node) = self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner()).get(&to).cloned() else {
            return;
        };
        self.shared.counters.controls.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move { node.on_control(from, message).await });
    }
}

/// Makes the clients of one group replica.
#[allow(missing_debug_implementations)]
pub struct LoopbackFactory {
    loopback: Loopback,
    from: u64,
    pid: PartitionId,
}

impl RaftNetworkFactory<TypeConfig> for LoopbackFactory {
    type Network = LoopbackClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> LoopbackClient {
        LoopbackClient { loopback: self.loopback.clone(), from: self.from, to: target, pid: self.pid }
    }
}

/// One group replica's client of one peer replica.
#[allow(missing_debug_implementations)]
pub struct LoopbackClient {
    loopback: Loopback,
    from: u64,
    to: u64,
    pid: PartitionId,
}

fn unreachable<E: std::error::Error + 'static>(e: E) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetworkV2<TypeConfig> for LoopbackClient {
    type SnapshotData = PartitionSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.loopback.route(self.from, self.to, self.pid)?;
        self.loopback.shared.counters.appends.fetch_add(1, Ordering::Relaxed);
        raft.append_entries(rpc).await.map_err(unreachable)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.loopback.route(self.from, self.to, self.pid)?;
        self.loopback.shared.counters.votes.fetch_add(1, Ordering::Relaxed);
        raft.vote(rpc).await.map_err(unreachable)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.loopback.route(self.from, self.to, self.pid)?;
        self.loopback.shared.counters.votes.fetch_add(1, Ordering::Relaxed);
        raft.pre_vote(rpc).await.map_err(unreachable)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.loopback.route(self.from, self.to, self.pid)?;
        self.loopback.shared.counters.votes.fetch_add(1, Ordering::Relaxed);
        raft.handle_transfer_leader(req).await.map_err(unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let raft = self.loopback.route(self.from, self.to, self.pid).map_err(StreamingError::Unreachable)?;
        self.loopback.shared.counters.snapshots.fetch_add(1, Ordering::Relaxed);
        // The target streams the partition itself; its stream stops once replication to it
        // closes (a leader change, a shutdown).
        let token = CancelToken::new();
        let snapshot = Snapshot { meta: snapshot.meta, snapshot: snapshot.snapshot.with_cancel(token.clone()) };
        cancel_on_close(cancel, &token, raft.install_full_snapshot(vote, snapshot))
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
    }
}
