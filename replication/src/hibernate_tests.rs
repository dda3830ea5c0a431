//! In-process hibernation test: 3 nodes × 3 partition groups on real engines and shared logs,
//! over a function-call network that counts Raft RPCs per group. Each node runs the
//! hibernation loop a node would: one `GroupSleep` per replica, one `Liveness` per node fed
//! by node-level heartbeats, and a sleep/wake fabric of direct calls. Idle groups park every
//! replica's ticker and go silent while keeping their leader; a write wakes its group (and
//! only it) and succeeds after one heartbeat round; losing a leader's node wakes and
//! re-elects, within an election timeout of the liveness report, the groups it led on the
//! survivors, whose data stay identical.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ForwardReason, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, ServerState};
use peregrine_engine::{Bin, Digest, Engine, PartitionId, Record, RecordMeta, RecordVersion, Value};
use tokio::task::JoinHandle;

use crate::hibernate::driver::{apply, observe, renew_write_lease};
use crate::hibernate::{Action, GroupSleep, NodeId, Observation, SleepConfig};
use crate::liveness::{Liveness, LivenessEvent};
use crate::log::SharedLog;
use crate::sm_tests::{engine_config, log_options, tempdir};
use crate::state_machine::{PartitionSnapshot, PartitionStateMachine, SmOptions, Snapshot};
use crate::types::{Command, Outcome, TypeConfig};

type Raft = openraft::Raft<TypeConfig, PartitionStateMachine>;
type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

const GROUPS: u16 = 3;
const T0: u64 = 1_800_000_000_000;
const HEARTBEAT_MS: u64 = 100;
const ELECTION_MIN_MS: u64 = 500;
const ELECTION_MAX_MS: u64 = 1000;
const IDLE_AFTER: Duration = Duration::from_secs(1);
const ELECT_HOLD: Duration = Duration::from_millis(ELECTION_MAX_MS);
const ELECT_RETRY: Duration = Duration::from_millis(HEARTBEAT_MS);
const PEER_TIMEOUT: Duration = Duration::from_millis(600);
/// Period of each node's hibernation loop (liveness heartbeats, liveness tick, group ticks).
const LOOP_PERIOD: Duration = Duration::from_millis(50);
/// How long the test watches a sleeping cluster for RPCs.
const QUIET_WINDOW: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- network (counts RPCs)

#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<(u64, u16), Raft>>>,
    /// Raft RPCs delivered per group.
    rpcs: Arc<Mutex<BTreeMap<u16, u64>>>,
    /// Raft RPCs attempted to a node that is not running, per group.
    unreachable: Arc<Mutex<BTreeMap<u16, u64>>>,
}

impl Router {
    fn get(&self, node: u64, group: u16) -> Result<Raft, Unreachable<TypeConfig>> {
        let raft = self.nodes.lock().unwrap().get(&(node, group)).cloned();
        let counter = if raft.is_some() { &self.rpcs } else { &self.unreachable };
        *counter.lock().unwrap().entry(group).or_default() += 1;
        raft.ok_or_else(|| Unreachable::from_string(format!("no node {node} group {group}")))
    }

    /// A group's replica without counting an RPC.
    fn peek(&self, node: u64, group: u16) -> Option<Raft> {
        self.nodes.lock().unwrap().get(&(node, group)).cloned()
    }

    fn rpcs(&self) -> BTreeMap<u16, u64> {
        self.rpcs.lock().unwrap().clone()
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

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.handle_transfer_leader(req).await.map_err(unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.install_full_snapshot(vote, snapshot).await.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
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
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_MIN_MS,
        election_timeout_max: ELECTION_MAX_MS,
        install_snapshot_timeout: 10_000,
        enable_pre_vote: Some(true),
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    Arc::new(c.validate().unwrap())
}

// ---------------------------------------------------------------- nodes and the hibernation hub

struct Node {
    engine: Engine,
    sms: BTreeMap<u16, PartitionStateMachine>,
    _log: SharedLog<TypeConfig>,
    hibernation: Option<JoinHandle<()>>,
}

fn pid(g: u16) -> PartitionId {
    PartitionId::new(g).unwrap()
}

/// What every node's hibernation loop shares in this test: the groups, each replica's sleep
/// state, each node's liveness, and the peer-down reports seen.
#[derive(Default)]
struct Hub {
    router: Router,
    sleep: Mutex<BTreeMap<(u64, u16), GroupSleep>>,
    liveness: Mutex<BTreeMap<u64, Liveness>>,
    /// (observer, lost peer, when) for every `PeerDown` event.
    peer_down: Mutex<Vec<(u64, u64, Instant)>>,
}

impl Hub {
    /// Node `node`'s current view of its peers.
    fn is_up(&self, node: u64) -> impl Fn(NodeId) -> bool + use<> {
        let l = self.liveness.lock().unwrap().get(&node).cloned();
        move |p| l.as_ref().is_some_and(|l| l.is_up(p))
    }

    fn with_sleep<R>(&self, node: u64, g: u16, f: impl FnOnce(&mut GroupSleep) -> R) -> R {
        f(self.sleep.lock().unwrap().get_mut(&(node, g)).unwrap())
    }

    fn asleep(&self, node: u64, g: u16) -> bool {
        self.with_sleep(node, g, |s| s.is_asleep())
    }

    /// Applies `action` of replica (node, g) and sends the messages it asks for.
    async fn execute(&self, node: u64, g: u16, action: Action, obs: &Observation) {
        let Some(raft) = self.router.peek(node, g) else { return };
        if apply(&raft, action).await.is_err() {
            return; // shutting down
        }
        let peers = obs.voters.iter().copied().filter(|&v| v != node);
        match action {
            Action::SendSleep { term } => {
                for p in peers {
                    self.deliver_sleep(p, g, node, term).await;
                }
            }
            Action::WakeLeader { notify_peers: true } | Action::WakeFollower { notify_peers: true } => {
                for p in peers {
                    self.deliver_wake(p, g).await;
                }
            }
            _ => {}
        }
    }

    async fn deliver_sleep(&self, to: u64, g: u16, from: u64, term: u64) {
        let Some(raft) = self.router.peek(to, g) else { return };
        let role = observe(&raft, self.is_up(to)).role;
        let action = self.with_sleep(to, g, |s| s.on_sleep_request(from, term, role));
        assert!(matches!(action, Action::None | Action::Park), "{action:?}");
        let _ = apply(&raft, action).await;
    }

    async fn deliver_wake(&self, to: u64, g: u16) {
        let Some(raft) = self.router.peek(to, g) else { return };
        let action = self.with_sleep(to, g, |s| s.on_wake_request(Instant::now()));
        assert!(
            matches!(
                action,
                Action::None
                    | Action::WakeLeader { notify_peers: false }
                    | Action::WakeFollower { notify_peers: false }
            ),
            "{action:?}"
        );
        let _ = apply(&raft, action).await;
    }

    /// One round of node `node`'s hibernation loop.
    async fn step(&self, node: u64) {
        let now = Instant::now();
        // The fabric: one liveness heartbeat to every peer node (not one per group).
        for (&id, l) in self.liveness.lock().unwrap().iter_mut() {
            if id != node {
                l.heartbeat_from(node, now);
            }
        }
        let events = self.liveness.lock().unwrap().get_mut(&node).map(|l| l.tick(now)).unwrap_or_default();
        for ev in events {
            if let LivenessEvent::PeerDown(p) = ev {
                self.peer_down.lock().unwrap().push((node, p, now));
            }
            for g in 0..GROUPS {
                let Some(raft) = self.router.peek(node, g) else { continue };
                let is_up = self.is_up(node);
                let obs = observe(&raft, &is_up);
                let action = self.with_sleep(node, g, |s| match ev {
                    LivenessEvent::PeerDown(p) => s.on_peer_down(now, p, &obs, &is_up),
                    LivenessEvent::PeerUp(p) => s.on_peer_up(now, p, &obs),
                });
                self.execute(node, g, action, &obs).await;
            }
        }
        for g in 0..GROUPS {
            let Some(raft) = self.router.peek(node, g) else { continue };
            let is_up = self.is_up(node);
            let obs = observe(&raft, &is_up);
            let action = self.with_sleep(node, g, |s| s.on_tick(now, &obs, &is_up));
            self.execute(node, g, action, &obs).await;
        }
    }
}

async fn start_node(hub: &Arc<Hub>, id: u64, dir: &Path) -> Node {
    let engine = Engine::open(engine_config(dir)).unwrap();
    let (log, _) = SharedLog::<TypeConfig>::open(log_options(dir)).unwrap();
    let mut sms = BTreeMap::new();
    let opts = SmOptions { persist_every: 8, ..SmOptions::default() };
    let now = Instant::now();
    let sleep_config =
        SleepConfig { idle_after: IDLE_AFTER, elect_hold_after_wake: ELECT_HOLD, elect_retry_every: ELECT_RETRY };
    for g in 0..GROUPS {
        let sm = PartitionStateMachine::open(engine.clone(), pid(g), &dir.join("sm"), opts).unwrap();
        let net = NetFactory { router: hub.router.clone(), group: g };
        let raft = Raft::new(id, config(), net, log.group(u32::from(g)), sm.clone()).await.unwrap();
        hub.sleep.lock().unwrap().insert((id, g), GroupSleep::new(id, sleep_config, now));
        hub.router.nodes.lock().unwrap().insert((id, g), raft);
        sms.insert(g, sm);
    }
    hub.liveness.lock().unwrap().insert(id, Liveness::new(id, 1..=3, PEER_TIMEOUT, now));
    let h = hub.clone();
    let hibernation = tokio::spawn(async move {
        let mut every = tokio::time::interval(LOOP_PERIOD);
        loop {
            every.tick().await;
            h.step(id).await;
        }
    });
    Node { engine, sms, _log: log, hibernation: Some(hibernation) }
}

/// Stops node `id`: its hibernation loop (so its liveness heartbeats), then its groups and
/// its engine.
async fn stop_node(hub: &Hub, id: u64, mut node: Node) {
    if let Some(h) = node.hibernation.take() {
        h.abort();
        let _ = h.await;
    }
    hub.liveness.lock().unwrap().remove(&id);
    for g in 0..GROUPS {
        let raft = hub.router.nodes.lock().unwrap().remove(&(id, g)).unwrap();
        raft.shutdown().await.unwrap();
    }
    drop(node.sms);
    node.engine.close().unwrap();
}

// ---------------------------------------------------------------- helpers

/// A version of key `k` in partition `g` (the digest's first two bytes pick the partition).
fn version(g: u16, k: u8, seq: u64) -> RecordVersion {
    let mut d = [0u8; 20];
    d[0] = g as u8;
    d[2] = k;
    d[19] = 0xCD;
    RecordVersion::Live(Record {
        digest: Digest(d),
        set_name: b"s".to_vec(),
        key: None,
        meta: RecordMeta { generation: (seq % 1000) as u16 + 1, void_time: 0, last_update_ms: T0 + seq },
        bins: vec![Bin::new("v", Value::Blob(format!("g{g}-k{k}-s{seq}").into_bytes())).unwrap()],
    })
}

/// The leader of group `g` among the running nodes, if any.
fn current_leader(router: &Router, g: u16) -> Option<(u64, Raft)> {
    let rafts: Vec<((u64, u16), Raft)> =
        router.nodes.lock().unwrap().iter().filter(|((_, gg), _)| *gg == g).map(|(k, r)| (*k, r.clone())).collect();
    rafts.into_iter().find(|(_, r)| r.metrics().borrow_watched().state == ServerState::Leader).map(|((n, _), r)| (n, r))
}

async fn leader(router: &Router, g: u16) -> (u64, Raft) {
    for _ in 0..300 {
        if let Some(l) = current_leader(router, g) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no leader for group {g}");
}

/// Writes through group `g`'s leader as the node's write path would: activity first (waking
/// the group), one heartbeat round if the leader slept, then the proposal. Returns the index.
async fn write(hub: &Hub, g: u16, versions: &[RecordVersion]) -> u64 {
    for _ in 0..50 {
        let (id, raft) = leader(&hub.router, g).await;
        let action = hub.with_sleep(id, g, |s| s.on_activity(Instant::now()));
        let obs = observe(&raft, hub.is_up(id));
        hub.execute(id, g, action, &obs).await;
        if hub.with_sleep(id, g, |s| s.needs_heartbeat_before_write()) {
            match renew_write_lease(&raft, Duration::from_secs(2)).await {
                Ok(()) => hub.with_sleep(id, g, |s| s.on_write_lease_renewed()),
                Err(e) => {
                    eprintln!("group {g}: {e}, retrying");
                    continue;
                }
            }
        }
        match raft.client_write(Command::from_versions(versions)).await {
            Ok(resp) => {
                assert!(resp.data.outcomes.iter().all(|o| *o == Outcome::Applied), "{:?}", resp.data);
                return resp.log_id.index;
            }
            Err(e) => {
                let reason = e.forward_to_leader().map(|f| f.reason);
                eprintln!("group {g}: write on node {id} failed ({reason:?}), retrying: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("group {g}: no write succeeded");
}

async fn wait_applied(router: &Router, nodes: &[u64], g: u16, index: u64) {
    for &n in nodes {
        let r = router.peek(n, g).unwrap();
        r.wait(Some(Duration::from_secs(20))).applied_index_at_least(Some(index), "applied").await.unwrap();
    }
}

/// Waits until every replica of every group on `nodes` is asleep.
async fn wait_all_asleep(hub: &Hub, nodes: &[u64], within: Duration) {
    let start = Instant::now();
    loop {
        let awake: Vec<(u64, u16)> =
            nodes.iter().flat_map(|&n| (0..GROUPS).map(move |g| (n, g))).filter(|&(n, g)| !hub.asleep(n, g)).collect();
        if awake.is_empty() {
            return;
        }
        assert!(start.elapsed() < within, "replicas still awake after {within:?}: {awake:?}");
        tokio::time::sleep(LOOP_PERIOD).await;
    }
}

/// Each group's leader, and every replica on `nodes` agreeing about it.
fn leaders(router: &Router, nodes: &[u64]) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for g in 0..GROUPS {
        let (l, _) = current_leader(router, g).expect("a leader");
        for &n in nodes {
            let m = router.peek(n, g).unwrap().metrics().borrow_watched().clone();
            assert_eq!(m.current_leader, Some(l), "node {n} group {g} follows {:?}", m.current_leader);
        }
        out.insert(g, l);
    }
    out
}

async fn contents(node: &Node, g: u16) -> Vec<RecordVersion> {
    node.engine.partition_versions_async(pid(g)).await.unwrap()
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_park_every_ticker_wake_on_writes_and_re_elect_when_their_leader_node_dies() {
    let _serial = crate::node_tests::serial().await;
    let hub = Arc::new(Hub::default());
    let router = hub.router.clone();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempdir()).collect();
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    for id in 1..=3u64 {
        nodes.insert(id, start_node(&hub, id, &paths[id as usize - 1]).await);
    }
    let members: BTreeMap<u64, BasicNode> = (1..=3).map(|n| (n, BasicNode::new(format!("n{n}")))).collect();
    for g in 0..GROUPS {
        router.peek(1, g).unwrap().initialize(members.clone()).await.unwrap();
    }
    let mut seq = 0u64;
    let mut keys: BTreeMap<u16, u8> = BTreeMap::new();
    let mut last = BTreeMap::new();
    for g in 0..GROUPS {
        for k in 0..3u8 {
            seq += 1;
            last.insert(g, write(&hub, g, &[version(g, k, seq)]).await);
        }
        keys.insert(g, 3);
        wait_applied(&router, &[1, 2, 3], g, last[&g]).await;
    }
    // The last group gets a leader other than group 0's, so the node that dies below leads
    // some groups and only follows in another.
    let (l0, _) = leader(&router, 0).await;
    let (lg, raft) = leader(&router, GROUPS - 1).await;
    if lg == l0 {
        let to = l0 % 3 + 1;
        raft.trigger().transfer_leader(to).await.unwrap();
        let r = router.peek(to, GROUPS - 1).unwrap();
        r.wait(Some(Duration::from_secs(10))).state(ServerState::Leader, "transferred").await.unwrap();
    }

    // 1. Idle: every replica of every group falls asleep, and the groups go silent while
    //    keeping their leaders.
    wait_all_asleep(&hub, &[1, 2, 3], IDLE_AFTER * 6).await;
    let before = leaders(&router, &[1, 2, 3]);
    tokio::time::sleep(Duration::from_millis(300)).await; // in-flight replies land
    let quiet_start = router.rpcs();
    tokio::time::sleep(QUIET_WINDOW).await;
    let quiet_end = router.rpcs();
    eprintln!("RPCs per group over {QUIET_WINDOW:?} asleep: {quiet_start:?} -> {quiet_end:?}");
    assert_eq!(quiet_start, quiet_end, "a sleeping cluster sends no Raft RPC (no heartbeat, no append, no vote)");
    assert_eq!(leaders(&router, &[1, 2, 3]), before, "sleeping groups keep their leaders");
    for n in 1..=3 {
        for g in 0..GROUPS {
            assert!(hub.asleep(n, g), "node {n} group {g} still asleep");
        }
    }
    // The lease lapsed while asleep: a write that skipped the wake-up protocol is refused.
    let l0 = router.peek(before[&0], 0).unwrap();
    seq += 1;
    let refused = l0.client_write(Command::from_versions(&[version(0, 50, seq)])).await.unwrap_err();
    let reason = refused.forward_to_leader().map(|f| f.reason);
    assert_eq!(reason, Some(ForwardReason::LeaseExpired), "{refused}");
    assert_eq!(router.rpcs(), quiet_end, "a refused write sends nothing");

    // 2. A write wakes its group (only that one) and succeeds.
    seq += 1;
    let t = Instant::now();
    last.insert(0, write(&hub, 0, &[version(0, 3, seq)]).await);
    *keys.get_mut(&0).unwrap() += 1;
    eprintln!("write on a sleeping group took {:?}", t.elapsed());
    wait_applied(&router, &[1, 2, 3], 0, last[&0]).await;
    let after_write = router.rpcs();
    assert!(after_write[&0] > quiet_end[&0], "group 0 woke");
    for g in 1..GROUPS {
        assert_eq!(after_write[&g], quiet_end[&g], "group {g} stayed asleep");
        for n in 1..=3 {
            assert!(hub.asleep(n, g));
        }
    }
    assert_eq!(leaders(&router, &[1, 2, 3]), before, "waking kept the leader");
    wait_all_asleep(&hub, &[1, 2, 3], IDLE_AFTER * 6).await;

    // 3. The node leading group 0 dies. Its sleeping groups' survivors hear of it only from
    //    liveness; the groups it led get a new leader within an election timeout of the report.
    let dead = before[&0];
    let led: Vec<u16> = (0..GROUPS).filter(|g| before[g] == dead).collect();
    let survivors: Vec<u64> = (1..=3).filter(|&n| n != dead).collect();
    eprintln!("stopping node {dead}, leader of groups {led:?}");
    let n = nodes.remove(&dead).unwrap();
    stop_node(&hub, dead, n).await;
    let stopped = Instant::now();
    let mut reported = None;
    let mut new_leaders = BTreeMap::new();
    while new_leaders.len() < led.len() {
        assert!(stopped.elapsed() < Duration::from_secs(10), "no failover: {new_leaders:?}");
        if reported.is_none() {
            reported = hub.peer_down.lock().unwrap().iter().filter(|e| e.1 == dead).map(|e| e.2).min();
        }
        for &g in &led {
            if let Some((l, _)) = current_leader(&router, g)
                && !new_leaders.contains_key(&g)
            {
                new_leaders.insert(g, (l, Instant::now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reported = reported.expect("liveness reported the dead node");
    for (g, (l, at)) in &new_leaders {
        let after_report = at.saturating_duration_since(reported);
        eprintln!(
            "group {g}: node {l} leads {:?} after the stop, {after_report:?} after the liveness report",
            at.duration_since(stopped)
        );
        assert!(survivors.contains(l));
        assert!(
            after_report < Duration::from_millis(ELECTION_MAX_MS),
            "group {g}: elected {after_report:?} after the report"
        );
    }
    // Groups the dead node only followed in: their leader keeps leading, and they sleep on.
    assert!(led.len() < usize::from(GROUPS));
    for g in (0..GROUPS).filter(|g| !led.contains(g)) {
        assert_eq!(current_leader(&router, g).map(|l| l.0), Some(before[&g]), "group {g}");
        for &n in &survivors {
            assert!(hub.asleep(n, g), "node {n} group {g}: losing a follower does not wake the group");
        }
    }

    // 4. Writes everywhere on the survivors; data identical there; and the groups sleep again
    //    with the dead node still down (it does not keep them awake).
    for g in 0..GROUPS {
        seq += 1;
        let k = keys[&g];
        last.insert(g, write(&hub, g, &[version(g, k, seq)]).await);
        *keys.get_mut(&g).unwrap() += 1;
    }
    for g in 0..GROUPS {
        wait_applied(&router, &survivors, g, last[&g]).await;
        let a = contents(&nodes[&survivors[0]], g).await;
        let b = contents(&nodes[&survivors[1]], g).await;
        assert_eq!(a.len(), usize::from(keys[&g]), "group {g}: every key written");
        assert_eq!(a, b, "group {g}: survivors identical");
    }
    wait_all_asleep(&hub, &survivors, IDLE_AFTER * 6).await;
    let u0 = router.unreachable.lock().unwrap().clone();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let u1 = router.unreachable.lock().unwrap().clone();
    eprintln!("RPC attempts to the dead node while asleep, over 1 s: {u0:?} -> {u1:?}");

    for (id, node) in std::mem::take(&mut nodes) {
        stop_node(&hub, id, node).await;
    }
}
