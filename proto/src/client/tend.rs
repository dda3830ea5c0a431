//! The tender: the background task that keeps the client's view of the cluster current, the
//! way the official C client does. Every tend (once per [`ClientOptions::tend_interval`], or
//! sooner when a command asks for a refresh) asks each known node `node`, `peers-generation`
//! and `partition-generation`; a changed peers generation re-reads that node's
//! `peers-clear-std` and connects to nodes not known yet; a changed partition generation
//! re-reads `partition-generation` and `replicas` and merges them into the partition tables
//! (a generation of -1 means the node is not ready: its map is not taken). A node is dropped
//! after [`NODE_FAILURES_MAX`] failed tends in a row while no answering node lists it as a
//! peer, or when it answers but no node lists it and it holds no partition. With no node
//! left, the next tend starts again from the seeds. The result is published as a new
//! [`View`]: commands read it without waiting for a tend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;

use super::cluster::{PartitionTable, Peer, parse_peers, parse_replicas};
use super::{ClientError, ClientOptions, Node, Shared, View, info_on, open};

/// Failed tends in a row after which a node no answering peer lists is dropped (the C
/// client's figure).
pub(super) const NODE_FAILURES_MAX: u32 = 5;
/// Shortest gap between two tends when commands keep asking for a refresh.
pub(super) const REFRESH_GAP_MIN: Duration = Duration::from_millis(100);
/// Rounds of "connect to newly listed peers, then tend them" within one tend.
const DISCOVERY_ROUNDS_MAX: usize = 8;

/// The generation value meaning "not ready".
const GENERATION_NOT_READY: i64 = -1;

const GENERATIONS: &[&str] = &["node", "peers-generation", "partition-generation"];
const PEERS: &[&str] = &["peers-clear-std"];
const PARTITIONS: &[&str] = &["partition-generation", "replicas"];

/// The tender's record of one node.
#[derive(Debug)]
struct TendNode {
    node: Arc<Node>,
    /// Generation of the last peers list taken (None: never read).
    peers_generation: Option<i64>,
    /// Generation of the last partition map taken (None: never taken).
    partition_generation: Option<i64>,
    /// Failed tends in a row.
    failures: u32,
    /// Names the node's last peers list named.
    peers: Vec<String>,
}

impl TendNode {
    fn new(node: Arc<Node>) -> TendNode {
        TendNode { node, peers_generation: None, partition_generation: None, failures: 0, peers: Vec::new() }
    }
}

/// What the tender owns: the nodes and the partition tables it merges their claims into.
#[derive(Debug, Default)]
pub(super) struct Tender {
    nodes: Vec<TendNode>,
    tables: HashMap<String, PartitionTable>,
    /// Something changed since the last publication.
    dirty: bool,
}

/// Runs `commands` on every node of `nodes` at once, over each node's tend connection.
async fn info_all(
    nodes: Vec<Arc<Node>>,
    commands: &'static [&'static str],
    timeout: Duration,
) -> Vec<Result<HashMap<String, String>, ClientError>> {
    let mut set = JoinSet::new();
    let count = nodes.len();
    for (i, node) in nodes.into_iter().enumerate() {
        set.spawn(async move { (i, node_info(&node, commands, timeout).await) });
    }
    let mut out: Vec<Result<HashMap<String, String>, ClientError>> =
        (0..count).map(|_| Err(ClientError::Protocol("tend task lost".into()))).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, answer)) = joined
            && let Some(slot) = out.get_mut(i)
        {
            *slot = answer;
        }
    }
    out
}

/// Info on a node's tend connection (opened when missing; dropped after any failure).
async fn node_info(node: &Node, commands: &[&str], timeout: Duration) -> Result<HashMap<String, String>, ClientError> {
    let conn = node.tend_conn.lock().unwrap_or_else(PoisonError::into_inner).take();
    let run = async {
        let mut s = match conn {
            Some(s) => s,
            None => open(node.addr).await?,
        };
        let answers = info_on(&mut s, commands).await?;
        Ok::<_, ClientError>((s, answers))
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(ClientError::Timeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok((s, answers))) => {
            *node.tend_conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
            Ok(answers)
        }
    }
}

/// Connects to `addr` and asks its node name; the connection becomes the node's tend
/// connection.
async fn probe(addr: SocketAddr, timeout: Duration) -> Option<Arc<Node>> {
    let run = async {
        let mut s = open(addr).await?;
        let answers = info_on(&mut s, &["node"]).await?;
        Ok::<_, ClientError>((s, answers))
    };
    let (s, answers) = tokio::time::timeout(timeout, run).await.ok()?.ok()?;
    let name = answers.get("node").filter(|n| !n.is_empty() && !n.starts_with("ERROR"))?;
    let node = Node::new(name.clone(), addr);
    *node.tend_conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
    Some(Arc::new(node))
}

fn generation(answers: &HashMap<String, String>, key: &str) -> Option<i64> {
    answers.get(key).and_then(|v| v.trim().parse::<i64>().ok())
}

impl Tender {
    /// The nodes and tables as commands see them.
    fn view(&self) -> View {
        View { tables: self.tables.clone(), nodes: self.nodes.iter().map(|n| n.node.clone()).collect() }
    }

    fn knows(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.node.name == name)
    }

    /// Adds the seeds that answer (one node per name).
    async fn seed(&mut self, seeds: &[SocketAddr], timeout: Duration) {
        for &addr in seeds {
            if let Some(node) = probe(addr, timeout).await
                && !self.knows(&node.name)
            {
                self.nodes.push(TendNode::new(node));
                self.dirty = true;
            }
        }
    }

    /// Connects to a listed peer not known yet, through the first of its addresses whose node
    /// answers with the peer's name.
    async fn connect_peer(&mut self, peer: &Peer, timeout: Duration) {
        for text in &peer.addrs {
            let Ok(Ok(addrs)) = tokio::time::timeout(timeout, tokio::net::lookup_host(text.as_str())).await else {
                continue;
            };
            for addr in addrs {
                if let Some(node) = probe(addr, timeout).await
                    && node.name == peer.name
                {
                    self.nodes.push(TendNode::new(node));
                    self.dirty = true;
                    return;
                }
            }
        }
    }

    /// One tend; publishes the result when anything changed.
    pub async fn tend(&mut self, shared: &Shared) {
        let options = &shared.options;
        if self.nodes.is_empty() {
            self.seed(&shared.seeds, options.tend_timeout).await;
        }
        let mut pending: Vec<usize> = (0..self.nodes.len()).collect();
        let mut answered = vec![false; self.nodes.len()];
        for _ in 0..DISCOVERY_ROUNDS_MAX {
            if pending.is_empty() {
                break;
            }
            let known = self.nodes.len();
            for i in self.refresh(&pending, options).await {
                if let Some(a) = answered.get_mut(i) {
                    *a = true;
                }
            }
            answered.resize(self.nodes.len(), false);
            pending = (known..self.nodes.len()).collect();
        }
        self.drop_nodes(&answered);
        shared.tends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if std::mem::take(&mut self.dirty) {
            *shared.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(self.view());
        }
    }

    /// Tends the nodes at `indices`: generations, then changed peer lists (connecting to new
    /// peers), then changed partition maps. Returns the indices that answered.
    async fn refresh(&mut self, indices: &[usize], options: &ClientOptions) -> Vec<usize> {
        let nodes: Vec<Arc<Node>> = indices.iter().filter_map(|&i| self.nodes.get(i)).map(|n| n.node.clone()).collect();
        let answers = info_all(nodes, GENERATIONS, options.tend_timeout).await;
        let mut answered = Vec::new();
        let mut read_peers = Vec::new();
        let mut read_partitions = Vec::new();
        for (&i, answer) in indices.iter().zip(answers) {
            let Some(n) = self.nodes.get_mut(i) else { continue };
            let generations = answer
                .ok()
                .filter(|a| a.get("node") == Some(&n.node.name))
                .and_then(|a| Some((generation(&a, "peers-generation")?, generation(&a, "partition-generation")?)));
            let Some((peers_generation, partition_generation)) = generations else {
                // No answer, another node at this address, or generations that are not numbers.
                n.failures += 1;
                continue;
            };
            // A node back after failing may have restarted with the same generations.
            let returning = n.failures > 0;
            n.failures = 0;
            answered.push(i);
            if returning || n.peers_generation != Some(peers_generation) {
                read_peers.push(i);
            }
            if partition_generation != GENERATION_NOT_READY
                && (returning || n.partition_generation != Some(partition_generation))
            {
                read_partitions.push(i);
            }
        }
        self.read_peers(&read_peers, options.tend_timeout).await;
        self.read_partitions(&read_partitions, options.tend_timeout).await;
        answered
    }

    async fn read_peers(&mut self, indices: &[usize], timeout: Duration) {
        if indices.is_empty() {
            return;
        }
        let nodes: Vec<Arc<Node>> = indices.iter().filter_map(|&i| self.nodes.get(i)).map(|n| n.node.clone()).collect();
        let answers = info_all(nodes, PEERS, timeout).await;
        let mut listed: Vec<Peer> = Vec::new();
        let mut listers = Vec::new();
        for (&i, answer) in indices.iter().zip(answers) {
            let Some(n) = self.nodes.get_mut(i) else { continue };
            // A failed or malformed answer keeps the old list; the next tend asks again.
            let Some(peers) = answer.ok().and_then(|a| parse_peers(a.get("peers-clear-std")?).ok()) else { continue };
            n.peers_generation = Some(peers.generation);
            n.peers = peers.peers.iter().map(|p| p.name.clone()).collect();
            listed.extend(peers.peers);
            listers.push(i);
        }
        for peer in listed {
            if !self.knows(&peer.name) {
                self.connect_peer(&peer, timeout).await;
            }
        }
        // A list naming a node that could not be reached is read again at the next tend (as
        // the C client does), so the node is retried without waiting for a new generation.
        for i in listers {
            let unreached = self.nodes.get(i).is_some_and(|n| n.peers.iter().any(|name| !self.knows(name)));
            if unreached && let Some(n) = self.nodes.get_mut(i) {
                n.peers_generation = None;
            }
        }
    }

    async fn read_partitions(&mut self, indices: &[usize], timeout: Duration) {
        if indices.is_empty() {
            return;
        }
        let nodes: Vec<Arc<Node>> = indices.iter().filter_map(|&i| self.nodes.get(i)).map(|n| n.node.clone()).collect();
        let answers = info_all(nodes, PARTITIONS, timeout).await;
        for (&i, answer) in indices.iter().zip(answers) {
            let Ok(answer) = answer else { continue };
            let Some(partition_generation) = generation(&answer, "partition-generation") else { continue };
            if partition_generation == GENERATION_NOT_READY {
                continue;
            }
            // A malformed map is not taken and its generation not recorded: asked again next tend.
            let Some(Ok(claims)) = answer.get("replicas").map(|v| parse_replicas(v)) else { continue };
            let Some(n) = self.nodes.get_mut(i) else { continue };
            n.partition_generation = Some(partition_generation);
            for ns in &claims {
                let table = self.tables.entry(ns.namespace.clone()).or_insert_with(|| {
                    self.dirty = true;
                    PartitionTable::new(ns.regime != 0)
                });
                if table.merge(&n.node, ns).changed > 0 {
                    self.dirty = true;
                }
            }
        }
    }

    /// Drops nodes that keep failing while no answering node lists them, and answering nodes
    /// that no node lists and that hold no partition (in a cluster of more than one).
    fn drop_nodes(&mut self, answered: &[bool]) {
        let listed_by_answering = |name: &str| {
            self.nodes
                .iter()
                .zip(answered)
                .any(|(other, ok)| *ok && other.node.name != name && other.peers.iter().any(|p| p == name))
        };
        let several = self.nodes.len() > 1;
        let drop: Vec<bool> = self
            .nodes
            .iter()
            .zip(answered)
            .map(|(n, ok)| {
                if listed_by_answering(&n.node.name) {
                    return false;
                }
                let failing = n.failures >= NODE_FAILURES_MAX;
                let stray = several
                    && *ok
                    && n.peers_generation.is_some()
                    && !self.tables.values().any(|t| t.holds_any(&n.node));
                failing || stray
            })
            .collect();
        if !drop.contains(&true) {
            return;
        }
        let mut keep = drop.iter().map(|d| !d);
        let mut dropped = Vec::new();
        self.nodes.retain(|n| {
            let k = keep.next().unwrap_or(true);
            if !k {
                dropped.push(n.node.clone());
            }
            k
        });
        for node in dropped {
            for table in self.tables.values_mut() {
                table.forget(&node);
            }
            node.pool.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
        self.dirty = true;
    }

    /// Tends forever: every `tend_interval`, or after a refresh request (no sooner than
    /// [`REFRESH_GAP_MIN`] after the previous tend). The task is aborted when the client drops.
    pub async fn run(mut self, shared: Arc<Shared>) {
        loop {
            let since = tokio::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(shared.options.tend_interval) => {}
                _ = shared.refresh.notified() => {
                    tokio::time::sleep_until(since + REFRESH_GAP_MIN).await;
                }
            }
            self.tend(&shared).await;
        }
    }
}
