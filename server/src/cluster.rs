//! The node's cluster (when `[cluster]` is configured): its membership (discovered from the
//! seeds at first start, then saved in `<data_dir>/cluster-members`), the fabric, one
//! replication runtime per namespace (every namespace is replicated, 4096 partition groups
//! each, one shared Raft log per namespace under `<data_dir>/raft/<ns>`), and what the info
//! answers say about it: which partitions this node leads and holds (`replicas`), the
//! partition generation (bumped on every local role change), the peers clients should tend.
//!
//! Start-up runs in the background: the node answers info at once, with partition generation
//! -1 (clients do not use it) until its groups are open.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use peregrine_engine::{Engine, PartitionId};
use peregrine_replication::fabric::{Fabric, FabricConfig};
use peregrine_replication::hibernate::SleepConfig;
use peregrine_replication::log::{LogOptions, SharedLog};
use peregrine_replication::node::{NodeOptions, RaftTimers, ReplicaNode};
use peregrine_replication::placement::Placement;
use peregrine_replication::state_machine::SmOptions;

use crate::config::ClusterConfig;

/// Partitions per namespace.
pub const PARTITIONS: u16 = 4096;
/// How often the role watcher looks for role changes.
const ROLE_WATCH_EVERY: Duration = Duration::from_millis(250);
/// How often the shared logs reclaim space.
const RECLAIM_EVERY: Duration = Duration::from_secs(30);
/// How long a write waits for its proposal to apply before answering "in doubt".
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a planned stop waits for this node's leaderships to move.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping node keeps serving after its leaderships moved: clients re-read the
/// partition map every second.
const HANDOVER_LINGER: Duration = Duration::from_millis(1_500);
/// How often a stopping node looks for leaderships that came back while it lingers.
const HANDOVER_RECHECK_EVERY: Duration = Duration::from_millis(100);
/// How often expiry and eviction (and rebalancing) run through the groups led here.
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
/// The membership file in the data directory.
const MEMBERS_FILE: &str = "cluster-members";

/// One replicated namespace on this node.
pub struct ReplicatedNamespace {
    /// Its groups.
    pub replicas: ReplicaNode,
}

/// What exists once the cluster is up on this node.
pub struct Ready {
    /// Every node of the cluster (this one included) and its fabric address.
    pub members: BTreeMap<u64, SocketAddr>,
    /// The placement of partitions over the members.
    pub placement: Placement,
    /// Replicated namespaces by name.
    pub namespaces: BTreeMap<String, ReplicatedNamespace>,
}

/// The node's cluster.
pub struct Cluster {
    /// This node's id.
    pub node_id: u64,
    /// The `[cluster]` table.
    pub config: ClusterConfig,
    /// The node-to-node transport.
    pub fabric: Fabric,
    ready: OnceLock<Ready>,
    /// -1 until ready, then bumped on every local role change.
    partition_generation: AtomicI64,
    /// Bumped when the set of reachable peers (or their addresses) changes.
    peers_generation: AtomicU64,
    /// The peers clients should tend: (node id, client address), as of `peers_generation`.
    peers: std::sync::Mutex<Vec<(u64, String)>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// The node name clients see for node `id` (uppercase hex).
pub fn node_name(id: u64) -> String {
    format!("{id:X}")
}

impl Cluster {
    /// Binds the fabric and starts the cluster in the background: discovery (or the saved
    /// membership), then every namespace's groups. `engines` must run external maintenance.
    pub async fn start(
        config: ClusterConfig,
        cluster_name: String,
        service: String,
        data_dir: PathBuf,
        engines: Vec<(String, Engine)>,
    ) -> Result<Arc<Cluster>, String> {
        let listener = tokio::net::TcpListener::bind(config.fabric_listen)
            .await
            .map_err(|e| format!("cannot listen for the fabric on {}: {e}", config.fabric_listen))?;
        let fabric = Fabric::new(FabricConfig {
            node_id: config.node_id,
            cluster_name,
            peers: BTreeMap::new(),
            service,
            namespaces: engines.iter().map(|(n, _)| n.clone()).collect(),
            snapshot_mb_per_s: config.snapshot_mb_per_s,
        });
        fabric.start(listener);
        let cluster = Arc::new(Cluster {
            node_id: config.node_id,
            config,
            fabric,
            ready: OnceLock::new(),
            partition_generation: AtomicI64::new(-1),
            peers_generation: AtomicU64::new(1),
            peers: std::sync::Mutex::new(Vec::new()),
        });
        let c = cluster.clone();
        tokio::spawn(async move {
            match c.come_up(&data_dir, engines).await {
                Ok(()) => tracing::info!(node = c.node_id, "cluster: every partition group is open"),
                Err(e) => {
                    // Not recoverable without an operator: say why and stop the process.
                    tracing::error!("cluster: cannot start: {e}");
                    eprintln!("peregrine: cluster: {e}");
                    std::process::exit(2);
                }
            }
        });
        Ok(cluster)
    }

    async fn come_up(self: &Arc<Cluster>, data_dir: &Path, engines: Vec<(String, Engine)>) -> Result<(), String> {
        let members = self.membership(data_dir).await?;
        let peers: BTreeMap<u64, SocketAddr> =
            members.iter().filter(|(id, _)| **id != self.node_id).map(|(id, (addr, _))| (*id, *addr)).collect();
        let services: BTreeMap<u64, String> =
            members.iter().filter(|(id, _)| **id != self.node_id).map(|(id, (_, s))| (*id, s.clone())).collect();
        self.fabric.set_peers(peers, services);
        let ids: Vec<u64> = members.keys().copied().collect();
        let placement = Placement::new(&ids, self.config.replication_factor).map_err(|e| e.to_string())?;
        let c = &self.config;
        let timers = RaftTimers {
            heartbeat_ms: c.heartbeat_ms,
            election_timeout_ms: c.election_timeout_ms,
            snapshot_every_entries: c.snapshot_every_entries,
            log_kept_after_snapshot: c.log_kept_after_snapshot,
            ..RaftTimers::default()
        };
        let hibernation = c.hibernate.then(|| SleepConfig {
            idle_after: Duration::from_millis(c.idle_after_ms),
            elect_hold_after_wake: Duration::from_millis(c.election_timeout_ms * 2),
            elect_retry_every: Duration::from_millis(c.heartbeat_ms),
        });
        let period = Duration::from_millis(c.heartbeat_ms);
        let mut namespaces = BTreeMap::new();
        for (index, (name, engine)) in engines.into_iter().enumerate() {
            let index = u16::try_from(index).map_err(|_| "too many namespaces".to_string())?;
            let dir = data_dir.join("raft").join(&name);
            let (log, report) = SharedLog::open(log_options(dir.join("log"), &engine))
                .map_err(|e| format!("namespace {name}: opening its raft log: {e}"))?;
            tracing::info!(namespace = %name, ?report, "raft log recovered");
            let options = NodeOptions {
                node_id: self.node_id,
                placement: placement.clone(),
                partitions: (0..PARTITIONS).filter_map(PartitionId::new).collect(),
                sm_dir: dir.join("sm"),
                sm: SmOptions { snapshot_mb_per_s: c.snapshot_mb_per_s, ..SmOptions::default() },
                timers,
                proposal_timeout: PROPOSAL_TIMEOUT,
                hibernation,
                peer_timeout: period * 4,
            };
            let fabric = self.fabric.clone();
            let replicas =
                ReplicaNode::open(options, engine, log, |pid| fabric.factory(index, pid), fabric.control(index))
                    .await
                    .map_err(|e| format!("namespace {name}: opening its partition groups: {e}"))?;
            self.fabric.register_namespace(index, &replicas);
            let bootstrapped =
                replicas.bootstrap().await.map_err(|e| format!("namespace {name}: bootstrapping: {e}"))?;
            let campaigns = if bootstrapped == 0 { replicas.campaign_preferred().await } else { 0 };
            tracing::info!(namespace = %name, groups = replicas.groups().count(), bootstrapped, campaigns, "partition groups open");
            replicas.spawn_background(period, EXPIRY_EVERY, true);
            spawn_reclaim(name.clone(), replicas.clone());
            namespaces.insert(name, ReplicatedNamespace { replicas });
        }
        let members: BTreeMap<u64, SocketAddr> = members.into_iter().map(|(id, (a, _))| (id, a)).collect();
        if self.ready.set(Ready { members, placement, namespaces }).is_err() {
            return Err("the cluster came up twice".into());
        }
        self.partition_generation.store(1, Ordering::Release);
        let c = self.clone();
        tokio::spawn(async move { c.watch_roles().await });
        Ok(())
    }

    /// The saved membership, or (first start) the one discovered from the seeds, saved.
    async fn membership(&self, data_dir: &Path) -> Result<Members, String> {
        let path = data_dir.join(MEMBERS_FILE);
        let seeds: std::collections::BTreeSet<SocketAddr> = self.config.seeds.iter().copied().collect();
        if let Some(saved) = read_members(&path)? {
            let addrs: std::collections::BTreeSet<SocketAddr> = saved.values().map(|(a, _)| *a).collect();
            let self_ok = saved.get(&self.node_id).is_some_and(|(a, _)| self.config.is_self(*a));
            if addrs != seeds || !self_ok {
                return Err(format!(
                    "{} records members {:?}, but [cluster] node_id {} with seeds {:?} differs: membership changes are not supported yet (start with a new data directory to form a new cluster)",
                    path.display(),
                    saved.iter().map(|(id, (a, _))| format!("{id}@{a}")).collect::<Vec<_>>(),
                    self.node_id,
                    self.config.seeds
                ));
            }
            tracing::info!(members = saved.len(), "cluster: membership from {}", path.display());
            return Ok(saved);
        }
        let config = &self.config;
        let mut found = self.fabric.discover(&config.seeds, |a| config.is_self(a)).await?;
        let own = config.seeds.iter().copied().find(|a| config.is_self(*a)).unwrap_or(config.fabric_listen);
        found.insert(self.node_id, (own, String::new()));
        write_members(&path, &found)?;
        tracing::info!(members = found.len(), "cluster: membership discovered and saved");
        Ok(found)
    }

    /// The cluster, once this node's groups are open.
    pub fn ready(&self) -> Option<&Ready> {
        self.ready.get()
    }

    /// `partition-generation`: -1 until ready.
    pub fn partition_generation(&self) -> i64 {
        self.partition_generation.load(Ordering::Acquire)
    }

    /// `peers-generation`.
    pub fn peers_generation(&self) -> u64 {
        self.peers_generation.load(Ordering::Acquire)
    }

    /// The peers clients should tend (reachable over the fabric), with their client addresses.
    pub fn peers(&self) -> Vec<(u64, String)> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bumps the partition generation whenever the groups this node leads or follows change,
    /// and the peers generation whenever the reachable peers do.
    async fn watch_roles(self: Arc<Cluster>) {
        let mut last_roles = 0u64;
        loop {
            let roles = self.role_fingerprint();
            if roles != last_roles {
                last_roles = roles;
                self.partition_generation.fetch_add(1, Ordering::AcqRel);
            }
            let services = self.fabric.services();
            let peers: Vec<(u64, String)> = self
                .fabric
                .peers()
                .keys()
                .filter(|id| self.fabric.is_connected(**id))
                .filter_map(|id| services.get(id).filter(|s| !s.is_empty()).map(|s| (*id, s.clone())))
                .collect();
            {
                let mut current = self.peers.lock().unwrap_or_else(|p| p.into_inner());
                if *current != peers {
                    *current = peers;
                    self.peers_generation.fetch_add(1, Ordering::AcqRel);
                }
            }
            tokio::time::sleep(ROLE_WATCH_EVERY).await;
        }
    }

    fn role_fingerprint(&self) -> u64 {
        let Some(ready) = self.ready() else { return 0 };
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for ns in ready.namespaces.values() {
            for g in ns.replicas.groups() {
                h.update(&g.partition().get().to_le_bytes());
                h.update(&g.leader().unwrap_or(0).to_le_bytes());
            }
        }
        h.digest()
    }

    /// Before a planned stop: hands every leadership this node holds to an up-to-date
    /// follower (at most [`HANDOVER_TIMEOUT`]), then keeps serving [`HANDOVER_LINGER`] so
    /// clients read the new map, handing over again any leadership that comes back meanwhile.
    pub async fn hand_over(&self) {
        let Some(ready) = self.ready() else { return };
        let started = tokio::time::Instant::now();
        for ns in ready.namespaces.values() {
            ns.replicas.begin_leaving();
        }
        for (name, ns) in &ready.namespaces {
            let left = ns.replicas.hand_over_leaderships(HANDOVER_TIMEOUT).await;
            if left > 0 {
                tracing::warn!(namespace = %name, left, "leaderships not handed over in time");
            } else {
                tracing::info!(namespace = %name, elapsed_ms = started.elapsed().as_millis() as u64, "leaderships handed over");
            }
        }
        let linger_until = tokio::time::Instant::now() + HANDOVER_LINGER;
        while tokio::time::Instant::now() < linger_until {
            for ns in ready.namespaces.values() {
                let left = linger_until.saturating_duration_since(tokio::time::Instant::now());
                ns.replicas.hand_over_leaderships(left).await;
            }
            tokio::time::sleep(HANDOVER_RECHECK_EVERY).await;
        }
    }

    /// Stops the groups (their applied ids made durable) and the fabric. The engines stay
    /// open for the caller.
    pub async fn shutdown(&self) {
        if let Some(ready) = self.ready() {
            for (name, ns) in &ready.namespaces {
                let started = tokio::time::Instant::now();
                if let Err(e) = ns.replicas.shutdown().await {
                    tracing::error!(namespace = %name, "stopping the partition groups: {e}");
                }
                if let Err(e) = ns.replicas.log().flush_blocking() {
                    tracing::error!(namespace = %name, "flushing the raft log: {e}");
                }
                tracing::info!(namespace = %name, elapsed_ms = started.elapsed().as_millis() as u64, "partition groups stopped");
            }
        }
        self.fabric.shutdown();
    }
}

/// The shared log's options for a namespace: a batch holds at least one entry of the
/// largest record the engine stores (its log encoding is a little larger than the device's).
fn log_options(dir: PathBuf, engine: &Engine) -> LogOptions {
    let mut o = LogOptions::new(dir);
    let entry_max = engine.config().effective_max_record_bytes() * 2 + (64 << 10);
    let batch = entry_max.next_multiple_of(4096).max(o.batch_bytes_max);
    o.batch_bytes_max = batch;
    o.segment_bytes = o.segment_bytes.max(8 * batch as u64);
    o
}

fn spawn_reclaim(name: String, replicas: ReplicaNode) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RECLAIM_EVERY).await;
            let log = replicas.log().clone();
            match tokio::task::spawn_blocking(move || log.reclaim()).await {
                Ok(Ok(report)) => tracing::debug!(namespace = %name, ?report, "raft log reclaimed"),
                Ok(Err(e)) => tracing::warn!(namespace = %name, "raft log reclaim failed: {e}"),
                Err(_) => return, // shutting down
            }
        }
    });
}

/// Members by node id: fabric address and client address.
type Members = BTreeMap<u64, (SocketAddr, String)>;

/// The membership file: one line per node, `<id> <fabric address> <client address>`.
fn read_members(path: &Path) -> Result<Option<Members>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let mut members = BTreeMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
        let bad = || format!("{} line {}: expected `<id> <fabric address> [client address]`", path.display(), n + 1);
        let mut parts = line.split_whitespace();
        let id: u64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let addr: SocketAddr = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let service = parts.next().unwrap_or("").to_owned();
        members.insert(id, (addr, service));
    }
    Ok(Some(members))
}

fn write_members(path: &Path, members: &Members) -> Result<(), String> {
    let mut text =
        String::from("# Cluster membership, written at the first start: <node id> <fabric address> <client address>\n");
    for (id, (addr, service)) in members {
        text.push_str(&format!("{id} {addr} {service}\n"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_membership_file_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMBERS_FILE);
        assert_eq!(read_members(&path).unwrap(), None);
        let mut m = BTreeMap::new();
        m.insert(1, ("127.0.0.1:3001".parse().unwrap(), "127.0.0.1:3000".to_owned()));
        m.insert(2, ("127.0.0.1:3011".parse().unwrap(), String::new()));
        write_members(&path, &m).unwrap();
        assert_eq!(read_members(&path).unwrap(), Some(m));
        std::fs::write(&path, "1 not-an-address\n").unwrap();
        assert!(read_members(&path).unwrap_err().contains("line 1"));
    }
}
