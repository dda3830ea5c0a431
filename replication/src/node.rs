//! One node's replication runtime for one namespace: its shared Raft log, its engine, and a
//! partition group ([`Group`]) for every partition the placement gives it, each with its Raft
//! and its engine state machine. It starts the groups, bootstraps those it is the preferred
//! leader of, proposes expiry and eviction through the groups it leads, and stops them.
//!
//! Timers are slow on purpose ([`RaftTimers`]): thousands of groups share two cores (see
//! `docs/ARCHITECTURE.md`, "replication"). Safety never depends on them.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use openraft::BasicNode;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{InitializeError, RaftError};
use openraft::network::NetSnapshot;
use openraft::network::RaftNetworkFactory;
use peregrine_engine::{Engine, MaintenanceMode, PartitionId};

use crate::control::{ControlMessage, ControlSender};
use crate::group::{Group, GroupSettings, PartitionRaft, WriteError};
use crate::hibernate::driver::observe;
use crate::hibernate::{Action, SleepConfig};
use crate::liveness::{Liveness, LivenessEvent};
use crate::log::SharedLog;
use crate::placement::Placement;
use crate::state_machine::{PartitionSnapshot, PartitionStateMachine, SmOptions};
use crate::types::TypeConfig;

/// Heartbeat interval of a group's leader, in milliseconds.
pub const HEARTBEAT_MS_DEFAULT: u64 = 1_000;
/// Shortest election timeout, in milliseconds (the longest is twice this).
pub const ELECTION_TIMEOUT_MS_DEFAULT: u64 = 3_000;
/// How long a full snapshot transfer may take, in milliseconds.
pub const INSTALL_SNAPSHOT_TIMEOUT_MS_DEFAULT: u64 = 600_000;
/// Default entries a group keeps in its log after a snapshot, for followers slightly behind.
pub const LOG_KEPT_AFTER_SNAPSHOT: u64 = 1_000;
/// Most entries a group purges at once (a shared log purges logically, so batching is cheap);
/// never more than a snapshot interval, or a small interval would keep its whole log.
const PURGE_BATCH_ENTRIES_MAX: u64 = 256;
/// Groups opened at once by [`ReplicaNode::open`].
const OPEN_CONCURRENCY: usize = 64;
/// Groups initialized at once by [`ReplicaNode::bootstrap`].
const BOOTSTRAP_CONCURRENCY: usize = 256;
/// Groups stopped at once by [`ReplicaNode::shutdown`].
const SHUTDOWN_CONCURRENCY: usize = 256;
/// Expired (or evictable) records proposed for removal per background round.
const EXPIRY_BATCH_RECORDS: usize = 1_000;
/// Entries in one append request: bounds a fabric frame (see `fabric::wire`) at 32 of the
/// largest records.
pub const APPEND_ENTRIES_MAX: u64 = 32;
/// Leaderships a node hands back to their preferred leaders per background round.
const REBALANCE_PER_ROUND: usize = 256;
/// Default entries appended to a group's log between two snapshots it builds on its own.
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 20_000;

/// Raft timers (and log limits) of every group of a node.
#[derive(Clone, Copy, Debug)]
pub struct RaftTimers {
    /// Leader heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Shortest election timeout, ms (the longest is twice this).
    pub election_timeout_ms: u64,
    /// Full snapshot transfer timeout, ms.
    pub install_snapshot_timeout_ms: u64,
    /// Entries appended to a group's log between two snapshots it builds on its own.
    pub snapshot_every_entries: u64,
    /// Entries a group keeps in its log after a snapshot, for followers slightly behind.
    pub log_kept_after_snapshot: u64,
}

impl Default for RaftTimers {
    fn default() -> RaftTimers {
        RaftTimers {
            heartbeat_ms: HEARTBEAT_MS_DEFAULT,
            election_timeout_ms: ELECTION_TIMEOUT_MS_DEFAULT,
            install_snapshot_timeout_ms: INSTALL_SNAPSHOT_TIMEOUT_MS_DEFAULT,
            snapshot_every_entries: SNAPSHOT_EVERY_ENTRIES,
            log_kept_after_snapshot: LOG_KEPT_AFTER_SNAPSHOT,
        }
    }
}

impl RaftTimers {
    /// The openraft configuration of a group: these timers, textbook leader ids (from the type
    /// configuration), pre-vote on, leader restore off (our apply is not durable on its own:
    /// the applied id is persisted lazily), batched purges.
    pub fn config(&self) -> io::Result<Arc<openraft::Config>> {
        let c = openraft::Config {
            cluster_name: "peregrine".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms,
            election_timeout_max: self.election_timeout_ms * 2,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            enable_pre_vote: Some(true),
            enable_leader_restore: Some(false),
            max_in_snapshot_log_to_keep: self.log_kept_after_snapshot,
            purge_batch_size: PURGE_BATCH_ENTRIES_MAX.min(self.snapshot_every_entries.max(1)),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries.max(1)),
            max_payload_entries: APPEND_ENTRIES_MAX,
            ..Default::default()
        };
        c.validate().map(Arc::new).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("raft timers: {e}")))
    }
}

/// What a node's replication runtime is made of.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// This node's id (unique, never reused).
    pub node_id: u64,
    /// The placement of every partition over the cluster's nodes.
    pub placement: Placement,
    /// The partitions of the namespace (all 4096 in service; tests may use fewer).
    pub partitions: Vec<PartitionId>,
    /// Directory of the state machines' side files.
    pub sm_dir: PathBuf,
    /// State machine tunables.
    pub sm: SmOptions,
    /// Raft timers.
    pub timers: RaftTimers,
    /// How long a write waits for its proposal to be applied before answering "in doubt".
    pub proposal_timeout: Duration,
    /// Hibernation of idle groups (`None`: their timers always run).
    pub hibernation: Option<SleepConfig>,
    /// A peer node not heard from for this long is reported down (wakes the groups it led).
    pub peer_timeout: Duration,
}

/// How a node's groups stand (see [`ReplicaNode::role_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleCounts {
    /// Groups this node leads.
    pub leaders: usize,
    /// Groups another node leads.
    pub followers: usize,
    /// Groups with no leader known here.
    pub leaderless: usize,
    /// Groups not caught up (installing, replaying, or without a leader).
    pub lagging: usize,
}

/// One node's partition groups of one namespace (a cheap handle: clones share the node).
#[derive(Clone)]
#[allow(missing_debug_implementations)] // engine, log and thousands of groups: nothing useful to print
pub struct ReplicaNode {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    id: u64,
    engine: Engine,
    log: SharedLog<TypeConfig>,
    placement: Placement,
    groups: BTreeMap<u16, Group>,
    liveness: Mutex<Liveness>,
    control: Arc<dyn ControlSender>,
    stopping: AtomicBool,
    /// Set by [`ReplicaNode::begin_leaving`]: peers are told this node is leaving. Read and
    /// set under the lock, so no `Alive` decided before the change is sent after a `Leaving`.
    leaving: std::sync::Mutex<bool>,
}

impl ReplicaNode {
    /// Opens a group for every partition of `options.partitions` that the placement gives this
    /// node, on `engine` (which must run its maintenance externally: expiry and eviction go
    /// through the log) and `log`; `network(pid)` makes the transport of group `pid`, and
    /// `control` carries liveness and hibernation messages to peers.
    pub async fn open<F, N>(
        options: NodeOptions,
        engine: Engine,
        log: SharedLog<TypeConfig>,
        mut network: F,
        control: Arc<dyn ControlSender>,
    ) -> io::Result<ReplicaNode>
    where
        F: FnMut(PartitionId) -> N,
        N: RaftNetworkFactory<TypeConfig>,
        N::Network: NetSnapshot<TypeConfig, SnapshotData = PartitionSnapshot>,
    {
        if engine.config().maintenance != MaintenanceMode::External {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "namespace {}: a replicated engine must run with external maintenance (expiry and eviction go through the log)",
                    engine.namespace()
                ),
            ));
        }
        let config = options.timers.config()?;
        let settings = GroupSettings {
            proposal_timeout: options.proposal_timeout,
            sleep: options.hibernation,
            control: control.clone(),
        };
        // Groups open concurrently: a restarted group reads its log ids and re-applies its
        // committed tail from the device, and one at a time left the device idle between reads.
        let held: Vec<(PartitionId, N)> = options
            .partitions
            .iter()
            .filter(|&&pid| options.placement.holds(options.node_id, pid))
            .map(|&pid| (pid, network(pid)))
            .collect();
        let mut opening = futures_util::stream::iter(held.into_iter().map(|(pid, net)| {
            let (engine, config, log, settings, sm_dir) =
                (engine.clone(), config.clone(), log.clone(), settings.clone(), &options.sm_dir);
            async move {
                let sm = PartitionStateMachine::open(engine.clone(), pid, sm_dir, options.sm)?;
                let raft =
                    PartitionRaft::new(options.node_id, config, net, log.group(u32::from(pid.get())), sm.clone())
                        .await
                        .map_err(|e| io::Error::other(format!("partition {}: starting its raft: {e}", pid.get())))?;
                io::Result::Ok(Group::new(options.node_id, pid, engine, raft, sm, settings))
            }
        }))
        .buffer_unordered(OPEN_CONCURRENCY);
        let mut groups = BTreeMap::new();
        while let Some(group) = opening.next().await {
            let group = group?;
            groups.insert(group.partition().get(), group);
        }
        drop(opening);
        let peers = options.placement.nodes().iter().copied().filter(|&n| n != options.node_id);
        let liveness = Mutex::new(Liveness::new(options.node_id, peers, options.peer_timeout, Instant::now()));
        Ok(ReplicaNode {
            inner: Arc::new(NodeInner {
                id: options.node_id,
                engine,
                log,
                placement: options.placement,
                groups,
                liveness,
                control,
                stopping: AtomicBool::new(false),
                leaving: std::sync::Mutex::new(false),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The namespace engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The shared log.
    pub fn log(&self) -> &SharedLog<TypeConfig> {
        &self.inner.log
    }

    /// The placement.
    pub fn placement(&self) -> &Placement {
        &self.inner.placement
    }

    /// This node's group of partition `pid`, if it holds a replica.
    pub fn group(&self, pid: PartitionId) -> Option<&Group> {
        self.inner.groups.get(&pid.get())
    }

    /// Every group of this node, by partition.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.inner.groups.values()
    }

    /// Initializes every group this node is the preferred leader of and that has no
    /// membership yet (a first start), with the placement's voters; the node that initializes
    /// a group stands for election at once, so leaders start where the placement wants them.
    /// Safe to call on every start: returns how many groups it initialized.
    pub async fn bootstrap(&self) -> io::Result<usize> {
        let mine: Vec<&Group> =
            self.groups().filter(|g| self.inner.placement.preferred_leader(g.partition()) == self.inner.id).collect();
        let mut initialized = 0;
        // Concurrently, a bounded number at a time: each initialization waits for its
        // membership entry to be flushed, and the shared log commits them together.
        for chunk in mine.chunks(BOOTSTRAP_CONCURRENCY) {
            let results = futures_util::future::join_all(chunk.iter().map(|group| {
                let members: BTreeMap<u64, BasicNode> = self
                    .inner
                    .placement
                    .replicas(group.partition())
                    .into_iter()
                    .map(|id| (id, BasicNode::new(id)))
                    .collect();
                async move { (group.partition(), group.raft().initialize(members).await) }
            }))
            .await;
            for (pid, result) in results {
                match result {
                    Ok(()) => initialized += 1,
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {} // already has a log or a vote
                    Err(e) => {
                        return Err(io::Error::other(format!("partition {}: initializing its group: {e}", pid.get())));
                    }
                }
            }
        }
        Ok(initialized)
    }

    /// On a restart: every group this node is the preferred leader of that knows no leader
    /// stands for election now (pre-vote first, so a live leader with a valid lease keeps its
    /// group, and a replica whose log is behind is refused). Without it, thousands of groups
    /// restarted together elect on their random timers, in one contended burst. Returns how
    /// many elections it started.
    pub async fn campaign_preferred(&self) -> usize {
        let mine: Vec<&Group> = self
            .groups()
            .filter(|g| self.inner.placement.preferred_leader(g.partition()) == self.inner.id && g.leader().is_none())
            .collect();
        for chunk in mine.chunks(BOOTSTRAP_CONCURRENCY) {
            futures_util::future::join_all(chunk.iter().map(|g| async move {
                if let Err(e) = g.raft().trigger().elect(true).await {
                    tracing::debug!(partition = g.partition().get(), "election not triggered: {e}");
                }
            }))
            .await;
        }
        mine.len()
    }

    /// Groups this node leads and that are ready to decide.
    pub fn ready_leaders(&self) -> usize {
        self.groups().filter(|g| g.is_ready_leader()).count()
    }

    /// Groups of this node that sleep.
    pub fn asleep(&self) -> usize {
        self.groups().filter(|g| g.is_asleep()).count()
    }

    /// Whether liveness reports peer `id` up.
    pub fn is_peer_up(&self, id: u64) -> bool {
        self.lock_liveness().is_up(id)
    }

    fn lock_liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.inner.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transport lost its connection to `peer`: liveness reports it down at the next
    /// round, so the groups it led elect without waiting for the liveness timeout.
    pub fn peer_disconnected(&self, peer: u64) {
        self.lock_liveness().mark_down(peer, Instant::now());
    }

    /// Sends the node-level liveness heartbeat to every peer.
    pub fn send_alive(&self) {
        let leaving = self.inner.leaving.lock().unwrap_or_else(|p| p.into_inner());
        self.send_liveness(*leaving);
    }

    fn send_liveness(&self, leaving: bool) {
        let message = if leaving { ControlMessage::Leaving } else { ControlMessage::Alive };
        for &peer in self.inner.placement.nodes().iter().filter(|&&n| n != self.inner.id) {
            self.inner.control.send(self.inner.id, peer, message);
        }
    }

    /// Before a planned stop: from now on this node's liveness heartbeats tell its peers it is
    /// leaving (one goes out at once), and they hand it no leadership.
    pub fn begin_leaving(&self) {
        let mut leaving = self.inner.leaving.lock().unwrap_or_else(|p| p.into_inner());
        if !*leaving {
            *leaving = true;
            self.send_liveness(true);
        }
    }

    /// A control message from peer `from` (delivered by the transport).
    pub async fn on_control(&self, from: u64, message: ControlMessage) {
        match message {
            ControlMessage::Alive => {
                self.lock_liveness().heartbeat_from(from, Instant::now());
            }
            ControlMessage::Leaving => {
                self.lock_liveness().leaving_from(from, Instant::now());
            }
            ControlMessage::Sleep { partition, term } => {
                let Some(group) = self.inner.groups.get(&partition) else { return };
                let role = observe(group.raft(), |_| true).role;
                if let Some(action) = group.with_sleep(|s| s.on_sleep_request(from, term, role)) {
                    group.execute(action).await;
                }
            }
            ControlMessage::Wake { partition } => {
                let Some(group) = self.inner.groups.get(&partition) else { return };
                if let Some(action) = group.with_sleep(|s| s.on_wake_request(Instant::now())) {
                    group.execute(action).await;
                }
            }
        }
    }

    /// One round of the node's hibernation loop: liveness events first (a lost leader wakes
    /// and re-elects its groups), then every group's idle check.
    pub async fn step(&self) {
        let now = Instant::now();
        let events = self.lock_liveness().tick(now);
        let liveness = self.lock_liveness().clone();
        let is_up = |p: u64| liveness.is_up(p);
        for event in events {
            tracing::info!(node = self.inner.id, "liveness: {event:?}");
            for group in self.groups() {
                let obs = observe(group.raft(), is_up);
                let action = group.with_sleep(|s| match event {
                    LivenessEvent::PeerDown(p) => s.on_peer_down(now, p, &obs, is_up),
                    LivenessEvent::PeerUp(p) => s.on_peer_up(now, p, &obs),
                });
                group.execute(action.unwrap_or(Action::None)).await;
            }
        }
        for group in self.groups() {
            let obs = observe(group.raft(), is_up);
            if let Some(action) = group.with_sleep(|s| s.on_tick(now, &obs, is_up)) {
                group.execute(action).await;
            }
        }
    }

    /// Runs the node's background work until [`ReplicaNode::shutdown`]: every `period` a
    /// liveness heartbeat to each peer and a hibernation round; every `expiry_every` an expiry
    /// and an eviction round through the groups this node leads, and a rebalancing round
    /// ([`ReplicaNode::rebalance_once`]) when `rebalance` is on.
    pub fn spawn_background(
        &self,
        period: Duration,
        expiry_every: Duration,
        rebalance: bool,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut last_expiry = Instant::now();
            while !node.inner.stopping.load(Ordering::Acquire) {
                node.send_alive();
                node.step().await;
                if last_expiry.elapsed() >= expiry_every {
                    last_expiry = Instant::now();
                    node.expire_once(EXPIRY_BATCH_RECORDS).await;
                    node.evict_once(EXPIRY_BATCH_RECORDS).await;
                    if rebalance {
                        node.rebalance_once(REBALANCE_PER_ROUND).await;
                    }
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// The voter `group`'s leader (this node) could hand its leadership to: `preferred` if
    /// given, else any; it must be up, not leaving, and have matched the leader's last log
    /// index.
    fn handover_target(&self, group: &Group, preferred: Option<u64>) -> Option<u64> {
        let m = group.raft().metrics();
        let m = m.borrow_watched();
        if m.current_leader != Some(self.inner.id) {
            return None;
        }
        let last = m.last_log_index;
        let matched = m.replication.as_ref()?;
        let liveness = self.lock_liveness();
        let ok = |id: &u64| {
            *id != self.inner.id
                && liveness.is_up_to_stay(*id)
                && m.membership_config.voter_ids().any(|v| v == *id)
                && matched.get(id).is_some_and(|l| l.map(|l| l.index) == last)
        };
        match preferred {
            Some(p) => ok(&p).then_some(p),
            None => matched.keys().copied().find(|id| ok(id)),
        }
    }

    /// Asks `group` (led here) to transfer its leadership to `to`, waking it first.
    async fn transfer(&self, group: &Group, to: u64) {
        if let Some(action) = group.with_sleep(|s| s.on_activity(Instant::now())) {
            group.execute(action).await;
        }
        if let Err(e) = group.raft().trigger().transfer_leader(to).await {
            tracing::debug!(partition = group.partition().get(), "transfer not triggered: {e}");
        }
    }

    /// Hands leaderships back to their preferred leaders (the placement's), up to `limit`
    /// groups: each group this node leads whose preferred leader is another node that is up
    /// and has matched the whole log. So leadership spreads evenly again after a node
    /// restarts. Returns how many transfers were started.
    pub async fn rebalance_once(&self, limit: usize) -> usize {
        let mut started = 0;
        for group in self.groups() {
            if started >= limit {
                break;
            }
            let preferred = self.inner.placement.preferred_leader(group.partition());
            if preferred == self.inner.id || !group.is_ready_leader() {
                continue;
            }
            if let Some(to) = self.handover_target(group, Some(preferred)) {
                self.transfer(group, to).await;
                started += 1;
            }
        }
        started
    }

    /// Before a planned stop: [`ReplicaNode::begin_leaving`], then transfers the leadership of
    /// every group this node leads to an up-to-date follower, and waits (at most `timeout`)
    /// until it leads none. Returns how many groups it still leads. Call it again to hand over
    /// a leadership that came back meanwhile (a peer's transfer decided before it heard this
    /// node leave).
    pub async fn hand_over_leaderships(&self, timeout: Duration) -> usize {
        self.begin_leaving();
        let deadline = Instant::now() + timeout;
        loop {
            let led: Vec<&Group> = self.groups().filter(|g| g.leader() == Some(self.inner.id)).collect();
            if led.is_empty() || Instant::now() >= deadline {
                return led.len();
            }
            for group in led {
                let preferred =
                    self.inner.placement.replicas(group.partition()).into_iter().find(|&n| n != self.inner.id);
                let target = self.handover_target(group, preferred).or_else(|| self.handover_target(group, None));
                if let Some(to) = target {
                    self.transfer(group, to).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The groups of this node: how many it leads (ready), follows, and how many are behind
    /// (not caught up: installing, replaying, or without a known leader).
    pub fn role_counts(&self) -> RoleCounts {
        let mut c = RoleCounts::default();
        for g in self.groups() {
            match g.leader() {
                Some(l) if l == self.inner.id => c.leaders += 1,
                Some(_) => c.followers += 1,
                None => c.leaderless += 1,
            }
            if !g.is_caught_up() {
                c.lagging += 1;
            }
        }
        c
    }

    /// Proposes, through the groups this node leads, the removal of up to `limit` expired
    /// records; returns how many were removed. (A follower's expired records stay until its
    /// leader's tombstone reaches it; its reads hide them by their void time meanwhile.)
    pub async fn expire_once(&self, limit: usize) -> usize {
        let mut removed = 0;
        for (digest, meta) in self.inner.engine.expiry_candidates(limit) {
            let Some(group) = self.inner.groups.get(&digest.partition().get()) else { continue };
            if !group.is_ready_leader() {
                continue;
            }
            match group.expire(&digest, meta).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::debug!(partition = digest.partition().get(), "expiry not proposed: {e}"),
            }
        }
        removed
    }

    /// Proposes, through the groups this node leads, the eviction of up to `limit` records the
    /// engine's eviction would remove now (none below its high-water marks); returns how many
    /// were deleted. A record written since it was chosen is kept.
    pub async fn evict_once(&self, limit: usize) -> usize {
        let mut evicted = 0;
        for (digest, meta) in self.inner.engine.eviction_candidates(limit) {
            let Some(group) = self.inner.groups.get(&digest.partition().get()) else { continue };
            if !group.is_ready_leader() {
                continue;
            }
            let outcome = group
                .write(&digest, false, |existing| {
                    Ok(match existing {
                        Some(e) if e.meta == meta => peregrine_engine::Change::Delete,
                        _ => peregrine_engine::Change::Nothing,
                    })
                })
                .await;
            match outcome {
                Ok(peregrine_engine::Applied::Deleted) => evicted += 1,
                Ok(_) => {}
                Err(WriteError::Refused(e)) => tracing::debug!("eviction refused: {e}"),
                Err(e) => tracing::debug!(partition = digest.partition().get(), "eviction not proposed: {e}"),
            }
        }
        evicted
    }

    /// Stops the background work and every group, and makes each state machine's applied id
    /// durable; the engine and the log stay open for the caller to close.
    pub async fn shutdown(&self) -> io::Result<()> {
        self.inner.stopping.store(true, Ordering::Release);
        let groups: Vec<&Group> = self.groups().collect();
        for chunk in groups.chunks(SHUTDOWN_CONCURRENCY) {
            let results = futures_util::future::join_all(
                chunk.iter().map(|g| async move { (g.partition(), g.raft().shutdown().await) }),
            )
            .await;
            for (pid, result) in results {
                result.map_err(|e| io::Error::other(format!("partition {}: stopping: {e}", pid.get())))?;
            }
        }
        let machines: Vec<PartitionStateMachine> = self.groups().map(|g| g.state_machine().clone()).collect();
        PartitionStateMachine::persist_all(&machines).await
    }
}
