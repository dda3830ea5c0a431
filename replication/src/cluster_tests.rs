//! In-process cluster test: 3 nodes, each with its own engine, shared log and side files in a
//! temporary directory, 4 partition groups over a function-call network; elections, writes
//! through each leader, identical replica contents, a snapshot and purge while one node is
//! down, and that node restarted from its log and engine catching up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, OptionalSend, ServerState};
use peregrine_engine::{Bin, Digest, Engine, PartitionId, Record, RecordMeta, RecordVersion, Value};

use crate::log::SharedLog;
use crate::sm_tests::{engine_config, log_options, tempdir};
use crate::snapshot_transfer::{CancelToken, cancel_on_close};
use crate::state_machine::{PartitionSnapshot, PartitionStateMachine, SmOptions, Snapshot};
use crate::types::{Command, Outcome, TypeConfig};

type Raft = openraft::Raft<TypeConfig, PartitionStateMachine>;
type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

const GROUPS: u16 = 4;
const T0: u64 = 1_800_000_000_000;

#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<(u64, u16), Raft>>>,
}

impl Router {
    fn get(&self, node: u64, group: u16) -> Result<Raft, Unreachable<TypeConfig>> {
        self.nodes
            .lock()
            .unwrap()
            .get(&(node, group))
            .cloned()
            .ok_or_else(|| Unreachable::from_string(format!("no node {node} group {group}")))
    }
}

struct Net {
    router: Router,
    target: u64,
    group: u16,
}

fn unreachable<E: std::error::Error + 'static>(e: E) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetworkV2<TypeConfig> for Net {
    type SnapshotData = PartitionSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.append_entries(rpc).await.map_err(unreachable)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.vote(rpc).await.map_err(unreachable)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.pre_vote(rpc).await.map_err(unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let raft = self.router.get(self.target, self.group)?;
        // The target streams the partition itself; the stream it reads stops once replication
        // to it closes.
        let token = CancelToken::new();
        let snapshot = Snapshot { meta: snapshot.meta, snapshot: snapshot.snapshot.with_cancel(token.clone()) };
        cancel_on_close(cancel, &token, raft.install_full_snapshot(vote, snapshot))
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
    }
}

struct NetFactory {
    router: Router,
    group: u16,
}

impl RaftNetworkFactory<TypeConfig> for NetFactory {
    type Network = Net;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Net {
        Net { router: self.router.clone(), target, group: self.group }
    }
}

fn config() -> Arc<openraft::Config> {
    let c = openraft::Config {
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        install_snapshot_timeout: 10_000,
        enable_pre_vote: Some(true),
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    Arc::new(c.validate().unwrap())
}

struct Node {
    engine: Engine,
    sms: BTreeMap<u16, PartitionStateMachine>,
    _log: SharedLog<TypeConfig>,
}

fn pid(g: u16) -> PartitionId {
    PartitionId::new(g).unwrap()
}

async fn start_node(router: &Router, id: u64, dir: &Path) -> Node {
    let engine = Engine::open(engine_config(dir)).unwrap();
    let (log, _) = SharedLog::<TypeConfig>::open(log_options(dir)).unwrap();
    let mut sms = BTreeMap::new();
    let opts = SmOptions { persist_every: 8, ..SmOptions::default() };
    for g in 0..GROUPS {
        let sm = PartitionStateMachine::open(engine.clone(), pid(g), &dir.join("sm"), opts).unwrap();
        let net = NetFactory { router: router.clone(), group: g };
        let raft = Raft::new(id, config(), net, log.group(u32::from(g)), sm.clone()).await.unwrap();
        router.nodes.lock().unwrap().insert((id, g), raft);
        sms.insert(g, sm);
    }
    Node { engine, sms, _log: log }
}

/// Stops node `id`: shuts its groups down, closes its engine, drops its log.
async fn stop_node(router: &Router, id: u64, node: Node) {
    for g in 0..GROUPS {
        let raft = router.nodes.lock().unwrap().remove(&(id, g)).unwrap();
        raft.shutdown().await.unwrap();
    }
    drop(node.sms);
    node.engine.close().unwrap();
}

/// A version of key `k` in partition `g` (the digest's first two bytes pick the partition).
fn version(g: u16, k: u8, seq: u64) -> RecordVersion {
    let mut d = [0u8; 20];
    d[0] = g as u8;
    d[2] = k;
    d[19] = 0xAB;
    RecordVersion::Live(Record {
        digest: Digest(d),
        set_name: b"s".to_vec(),
        key: None,
        meta: RecordMeta { generation: (seq % 1000) as u16 + 1, void_time: 0, last_update_ms: T0 + seq },
        bins: vec![Bin::new("v", Value::Blob(format!("g{g}-k{k}-s{seq}").into_bytes())).unwrap()],
    })
}

/// The current leader of group `g` among the running nodes (waits for one).
async fn leader(router: &Router, g: u16) -> Raft {
    for _ in 0..300 {
        let rafts: Vec<Raft> =
            router.nodes.lock().unwrap().iter().filter(|((_, gg), _)| *gg == g).map(|(_, r)| r.clone()).collect();
        for r in rafts {
            let m = r.metrics().borrow_watched().clone();
            if m.state == ServerState::Leader {
                return r;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader for group {g}");
}

/// Writes `versions` through group `g`'s leader, retrying across leader changes; returns the
/// entry's index.
async fn write(router: &Router, g: u16, versions: &[RecordVersion]) -> u64 {
    for _ in 0..50 {
        let l = leader(router, g).await;
        match l.client_write(Command::from_versions(versions)).await {
            Ok(resp) => {
                assert!(resp.data.outcomes.iter().all(|o| *o == Outcome::Applied), "{:?}", resp.data);
                return resp.log_id.index;
            }
            Err(e) => {
                eprintln!("group {g}: write failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("group {g}: no write succeeded");
}

async fn wait_applied(router: &Router, nodes: &[u64], g: u16, index: u64) {
    for &n in nodes {
        let r = router.get(n, g).unwrap();
        r.wait(Some(Duration::from_secs(20))).applied_index_at_least(Some(index), "applied").await.unwrap();
    }
}

async fn contents(node: &Node, g: u16) -> Vec<RecordVersion> {
    node.engine.partition_versions_async(pid(g)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_four_groups_replicate_and_a_restarted_node_catches_up() {
    let _serial = crate::node_tests::serial().await;
    let router = Router::default();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempdir()).collect();
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    for id in 1..=3u64 {
        nodes.insert(id, start_node(&router, id, &paths[id as usize - 1]).await);
    }
    let members: BTreeMap<u64, BasicNode> = (1..=3).map(|n| (n, BasicNode::new(format!("n{n}")))).collect();
    for g in 0..GROUPS {
        router.get(1, g).unwrap().initialize(members.clone()).await.unwrap();
    }

    // Writes through each leader: 20 entries of 3 versions over 7 keys (overwrites included).
    let mut seq = 0u64;
    let mut last = BTreeMap::new();
    for round in 0..20u64 {
        for g in 0..GROUPS {
            let vs: Vec<RecordVersion> = (0..3)
                .map(|j| {
                    seq += 1;
                    version(g, ((round * 3 + j) % 7) as u8, seq)
                })
                .collect();
            last.insert(g, write(&router, g, &vs).await);
        }
    }
    for g in 0..GROUPS {
        wait_applied(&router, &[1, 2, 3], g, last[&g]).await;
        let reference = contents(&nodes[&1], g).await;
        assert_eq!(reference.len(), 7, "group {g}: 7 keys");
        for n in [2u64, 3] {
            assert_eq!(contents(&nodes[&n], g).await, reference, "group {g}: node {n} differs from node 1");
        }
    }

    // Node 3 goes away; writes go on (leaders move if node 3 led), group 0 snapshots and
    // purges its log so node 3 must catch up by snapshot there, by log elsewhere.
    let n3 = nodes.remove(&3).unwrap();
    stop_node(&router, 3, n3).await;
    for round in 0..10u64 {
        for g in 0..GROUPS {
            seq += 1;
            let vs = vec![version(g, (round % 9) as u8, seq)];
            last.insert(g, write(&router, g, &vs).await);
        }
    }
    let l0 = leader(&router, 0).await;
    l0.trigger().snapshot().await.unwrap();
    l0.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= last[&0]), "snapshot built")
        .await
        .unwrap();
    l0.trigger().purge_log(last[&0]).await.unwrap();
    let purged = l0
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last[&0]), "purged")
        .await
        .is_ok();
    eprintln!("group 0 leader purged its log up to {}: {purged}", last[&0]);

    let n3 = start_node(&router, 3, &paths[2]).await;
    nodes.insert(3, n3);
    // One more write per group after the restart.
    for g in 0..GROUPS {
        seq += 1;
        last.insert(g, write(&router, g, &[version(g, 20, seq)]).await);
    }
    for g in 0..GROUPS {
        wait_applied(&router, &[1, 2, 3], g, last[&g]).await;
        let reference = contents(&nodes[&1], g).await;
        assert_eq!(reference.len(), 10, "group {g}: 10 keys");
        for n in [2u64, 3] {
            assert_eq!(contents(&nodes[&n], g).await, reference, "group {g}: node {n} differs after the restart");
        }
    }
    let m3 = router.get(3, 0).unwrap().metrics().borrow_watched().clone();
    eprintln!("node 3 group 0 after restart: snapshot {:?}, purged {:?}", m3.snapshot, m3.purged);
    if purged {
        assert!(m3.snapshot.is_some(), "node 3 caught up group 0 by snapshot");
    }
    // Purge never passed the durable applied id, on any replica.
    for (id, node) in &nodes {
        for (g, sm) in &node.sms {
            let purged = router.get(*id, *g).unwrap().metrics().borrow_watched().purged;
            let (applied, durable) = sm.applied_ids().await;
            assert!(purged <= durable, "node {id} group {g}: purged {purged:?} beyond durable {durable:?}");
            assert!(durable <= applied);
            assert!(sm.readable(), "node {id} group {g}: caught up, so readable");
        }
    }

    for (id, node) in std::mem::take(&mut nodes) {
        stop_node(&router, id, node).await;
    }
}
