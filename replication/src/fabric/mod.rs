//! The fabric: node-to-node transport of a cluster over TCP. It carries every partition
//! group's Raft messages, the nodes' control messages (liveness, sleep, wake) and requests
//! the server proxies to another node, between the processes of a cluster.
//!
//! - **One multiplexed connection per peer pair** ([`link`]): the node with the smaller id
//!   dials (reconnecting with backoff), the other accepts; requests of both nodes share it,
//!   matched to their replies by id. Frames are packed per write; votes, heartbeats, replies
//!   and control frames go before appends with entries and proxied requests.
//! - **Snapshots on their own connection**, one per transfer, dialled by the sender: its
//!   batches stream one at a time into the receiver's install (memory: a batch or two).
//! - **Hello first**: magic, version, cluster name, both node ids and the namespace list must
//!   match, or the connection is refused with a logged reason.
//! - **Bytes from a peer never panic a node** ([`wire`]): bad frames close the connection.
//! - A main connection that carries nothing for [`LINK_IDLE_TIMEOUT`] is closed (each side
//!   sends a keepalive frame after a second with nothing else to send), so a silently dead
//!   peer is noticed.

pub mod client;
pub mod link;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use peregrine_engine::PartitionId;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use self::client::{FabricClient, FabricFactory};
use self::link::{Link, Priority, read_frame};
use self::wire::{
    Control, FABRIC_VERSION, HELLO_MAGIC, Hello, Lane, RaftRequest, Reply, Request, SnapshotBegin, SnapshotDone,
    WireError, decode_body, frame, kind,
};
use crate::control::{ControlMessage, ControlSender};
use crate::group::PartitionRaft;
use crate::node::ReplicaNode;
use crate::snapshot_transfer::{CancelToken, RemoteItem};
use crate::state_machine::{PartitionSnapshot, Snapshot};

/// A main connection silent this long is closed.
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a hello may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait before redialling a peer; doubles up to [`REDIAL_MAX`].
const REDIAL_MIN: Duration = Duration::from_millis(50);
/// Longest wait before redialling a peer.
const REDIAL_MAX: Duration = Duration::from_secs(1);
/// Refusal reason of a hello from a node this one does not know (yet).
const NOT_YET_MEMBER: &str = "not (yet) in this node's cluster membership";
/// Snapshot batches queued between the receiving socket and the install.
const SNAPSHOT_BATCHES_QUEUED: usize = 2;

/// What the fabric of one node is.
#[derive(Clone, Debug)]
pub struct FabricConfig {
    /// This node's id.
    pub node_id: u64,
    /// The cluster's name (peers must present the same).
    pub cluster_name: String,
    /// Every other node's fabric address (empty until [`Fabric::discover`] or
    /// [`Fabric::set_peers`] fills it).
    pub peers: BTreeMap<u64, SocketAddr>,
    /// This node's client address (host:port), told to peers.
    pub service: String,
    /// The replicated namespaces in configuration order (same on every node).
    pub namespaces: Vec<String>,
    /// Throttle of the snapshots this node sends, in MB/s (0 = unlimited).
    pub snapshot_mb_per_s: u64,
}

/// Executes requests other nodes proxy to this one (the server implements it).
pub trait ProxyHandler: Send + Sync + 'static {
    /// Handles `request` from node `from`; the answer goes back as is.
    fn handle(&self, from: u64, request: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
}

/// Why a request to a peer failed.
#[derive(Debug)]
pub enum CallError {
    /// No connection, or it closed before the reply: the request may or may not have been
    /// handled.
    Unreachable(String),
    /// No reply in time: the request may or may not have been handled.
    Timeout,
    /// The peer answered with an error.
    Remote(String),
    /// The request could not be encoded (too big).
    Encode(WireError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(why) => write!(f, "unreachable: {why}"),
            CallError::Timeout => write!(f, "no reply in time"),
            CallError::Remote(why) => write!(f, "the peer failed: {why}"),
            CallError::Encode(e) => write!(f, "cannot send: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Counters of a node's fabric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FabricStats {
    /// Main connections established (each reconnect counts).
    pub connections: u64,
    /// Connections refused or closed for a protocol error.
    pub bad_connections: u64,
    /// Snapshot transfers this node sent / received, completed or not.
    pub snapshots_sent: u64,
    /// See `snapshots_sent`.
    pub snapshots_received: u64,
    /// Transfers under way now (sending + receiving).
    pub snapshots_active: u64,
    /// Requests proxied to / from other nodes.
    pub proxied_out: u64,
    /// See `proxied_out`.
    pub proxied_in: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bad_connections: AtomicU64,
    snapshots_sent: AtomicU64,
    snapshots_received: AtomicU64,
    snapshots_active: AtomicU64,
    proxied_out: AtomicU64,
    proxied_in: AtomicU64,
    serial: AtomicU64,
}

struct Inner {
    config: FabricConfig,
    peers: RwLock<BTreeMap<u64, SocketAddr>>,
    /// Peers' client addresses, as their hellos last said.
    services: RwLock<BTreeMap<u64, String>>,
    groups: RwLock<HashMap<(u16, u16), PartitionRaft>>,
    nodes: RwLock<HashMap<u16, ReplicaNode>>,
    proxy: RwLock<Option<Arc<dyn ProxyHandler>>>,
    links: Mutex<HashMap<u64, Arc<Link>>>,
    counters: Counters,
    stopping: CancelToken,
}

/// A node's fabric (a cheap handle: clones share it).
#[derive(Clone)]
#[allow(missing_debug_implementations)] // registries of Rafts and connections
pub struct Fabric {
    inner: Arc<Inner>,
}

impl Fabric {
    /// A fabric for `config`; nothing runs until [`Fabric::start`].
    pub fn new(config: FabricConfig) -> Fabric {
        Fabric {
            inner: Arc::new(Inner {
                peers: RwLock::new(config.peers.clone()),
                services: RwLock::new(BTreeMap::new()),
                config,
                groups: RwLock::new(HashMap::new()),
                nodes: RwLock::new(HashMap::new()),
                proxy: RwLock::new(None),
                links: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                stopping: CancelToken::new(),
            }),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.config.node_id
    }

    /// Accepts peers on `listener` until [`Fabric::shutdown`], and dials the known peers this
    /// node connects to (those with a larger id).
    pub fn start(&self, listener: TcpListener) {
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop(listener).await });
        self.start_dialers();
    }

    fn start_dialers(&self) {
        let self_id = self.node_id();
        let peers = self.peers();
        for (&peer, &addr) in peers.iter().filter(|(p, _)| **p > self_id) {
            let me = self.clone();
            tokio::spawn(async move { me.dial_loop(peer, addr).await });
        }
    }

    /// Every other node's fabric address.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.inner.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Peers' client addresses, as their hellos said (peers not heard from yet are missing).
    pub fn services(&self) -> BTreeMap<u64, String> {
        self.inner.services.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the peers (after discovery, or from a saved membership) and dials those this
    /// node connects to. Call once, after [`Fabric::start`].
    pub fn set_peers(&self, peers: BTreeMap<u64, SocketAddr>, services: BTreeMap<u64, String>) {
        *self.inner.peers.write().unwrap_or_else(|p| p.into_inner()) = peers;
        self.inner.services.write().unwrap_or_else(|p| p.into_inner()).extend(services);
        self.start_dialers();
    }

    /// Learns the id and client address of the node at every address of `seeds` but this
    /// node's own (`is_self`), retrying until each has answered (a first start, in any order)
    /// or a hard error: a seed with this node's id, two seeds with one id, or a refusal (other
    /// cluster, other namespaces). Logs which seeds it still waits for.
    pub async fn discover(
        &self,
        seeds: &[SocketAddr],
        is_self: impl Fn(SocketAddr) -> bool,
    ) -> Result<BTreeMap<u64, (SocketAddr, String)>, String> {
        let mut found: BTreeMap<u64, (SocketAddr, String)> = BTreeMap::new();
        let mut waiting: Vec<SocketAddr> = seeds.iter().copied().filter(|s| !is_self(*s)).collect();
        let mut rounds = 0u64;
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for addr in waiting {
                match self.dial_hello(0, addr, Lane::Discover).await {
                    Ok((_, h)) if h.from == self.node_id() => {
                        return Err(format!(
                            "the node at {addr} has this node's id {}: node ids must be unique",
                            h.from
                        ));
                    }
                    Ok((_, h)) => {
                        if let Some((other, _)) = found.get(&h.from) {
                            return Err(format!(
                                "nodes at {other} and {addr} both have id {}: node ids must be unique",
                                h.from
                            ));
                        }
                        tracing::info!(node = h.from, %addr, service = %h.service, "fabric: found a seed");
                        found.insert(h.from, (addr, h.service));
                    }
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(format!("seed {addr}: {e}")),
                    Err(_) => still.push(addr),
                }
            }
            waiting = still;
            if !waiting.is_empty() {
                if rounds.is_multiple_of(20) {
                    tracing::info!(waiting = ?waiting, "fabric: waiting for seeds to answer");
                }
                rounds += 1;
                let stop = self.inner.stopping.clone();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(250)) => {},
                    () = stop.cancelled() => return Err("stopped during discovery".into()),
                }
            }
        }
        Ok(found)
    }

    /// Stops accepting and dialling and closes every connection.
    pub fn shutdown(&self) {
        self.inner.stopping.cancel();
        for (_, link) in self.lock_links().drain() {
            link.close();
        }
    }

    /// Routes messages for namespace number `namespace` to `node`'s groups and control.
    pub fn register_namespace(&self, namespace: u16, node: &ReplicaNode) {
        let mut groups = self.inner.groups.write().unwrap_or_else(|p| p.into_inner());
        for g in node.groups() {
            groups.insert((namespace, g.partition().get()), g.raft().clone());
        }
        drop(groups);
        self.inner.nodes.write().unwrap_or_else(|p| p.into_inner()).insert(namespace, node.clone());
    }

    /// Who executes proxied requests on this node.
    pub fn set_proxy_handler(&self, handler: Arc<dyn ProxyHandler>) {
        *self.inner.proxy.write().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// The network factory of this node's replica of group (`namespace`, `pid`).
    pub fn factory(&self, namespace: u16, pid: PartitionId) -> FabricFactory {
        FabricFactory::new(self.clone(), namespace, pid)
    }

    /// The control sender of namespace number `namespace`.
    pub fn control(&self, namespace: u16) -> Arc<dyn ControlSender> {
        Arc::new(FabricControl { fabric: self.clone(), namespace })
    }

    /// Whether a main connection to `peer` is up.
    pub fn is_connected(&self, peer: u64) -> bool {
        self.link(peer).is_some()
    }

    /// Counters.
    pub fn stats(&self) -> FabricStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FabricStats {
            connections: l(&c.connections),
            bad_connections: l(&c.bad_connections),
            snapshots_sent: l(&c.snapshots_sent),
            snapshots_received: l(&c.snapshots_received),
            snapshots_active: l(&c.snapshots_active),
            proxied_out: l(&c.proxied_out),
            proxied_in: l(&c.proxied_in),
        }
    }

    /// Sends a proxied request to `to` and waits (at most `timeout`) for its answer.
    pub async fn proxy(&self, to: u64, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, CallError> {
        self.inner.counters.proxied_out.fetch_add(1, Ordering::Relaxed);
        match self.call(to, &Request::Proxy(request), Priority::Bulk, timeout).await? {
            Reply::Proxy(answer) => Ok(answer),
            Reply::Error(e) => Err(CallError::Remote(e)),
            other => Err(CallError::Remote(format!("unexpected reply to a proxied request: {other:?}"))),
        }
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Link>>> {
        self.inner.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self, peer: u64) -> Option<Arc<Link>> {
        self.lock_links().get(&peer).filter(|l| !l.is_closed()).cloned()
    }

    fn peer_addr(&self, peer: u64) -> Option<SocketAddr> {
        self.inner.peers.read().unwrap_or_else(|p| p.into_inner()).get(&peer).copied()
    }

    fn raft(&self, namespace: u16, partition: u16) -> Option<PartitionRaft> {
        self.inner.groups.read().unwrap_or_else(|p| p.into_inner()).get(&(namespace, partition)).cloned()
    }

    /// Sends a request to `to` and waits for its reply.
    pub(crate) async fn call(
        &self,
        to: u64,
        request: &Request,
        priority: Priority,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let link = self.link(to).ok_or_else(|| CallError::Unreachable(format!("no connection to node {to}")))?;
        let (id, reply) = link.register();
        let bytes = match frame(kind::REQUEST, id, request) {
            Ok(b) => b,
            Err(e) => {
                link.forget(id);
                return Err(CallError::Encode(e));
            }
        };
        if let Err(e) = link.send(bytes, priority).await {
            link.forget(id);
            return Err(CallError::Unreachable(e.to_string()));
        }
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(CallError::Unreachable(format!("connection to node {to} closed before the reply"))),
            Err(_) => {
                link.forget(id);
                Err(CallError::Timeout)
            }
        }
    }

    fn hello(&self, to: u64, lane: Lane) -> Hello {
        Hello {
            magic: HELLO_MAGIC,
            version: FABRIC_VERSION,
            cluster: self.inner.config.cluster_name.clone(),
            from: self.node_id(),
            to,
            lane,
            namespaces: self.inner.config.namespaces.clone(),
            service: self.inner.config.service.clone(),
            refusal: String::new(),
        }
    }

    /// Why a peer's hello is refused (`None`: accepted).
    fn check_hello(&self, h: &Hello) -> Option<String> {
        let c = &self.inner.config;
        if h.magic != HELLO_MAGIC || h.version != FABRIC_VERSION {
            return Some(format!(
                "fabric magic/version {:#x}/{} (want {HELLO_MAGIC:#x}/{FABRIC_VERSION})",
                h.magic, h.version
            ));
        }
        if h.cluster != c.cluster_name {
            return Some(format!("cluster {:?}, this node is in cluster {:?}", h.cluster, c.cluster_name));
        }
        if h.namespaces != c.namespaces {
            return Some(format!("namespaces {:?}, this node replicates {:?}", h.namespaces, c.namespaces));
        }
        if h.lane == Lane::Discover {
            return None; // the dialler checks ids (it is the one discovering)
        }
        if h.to != c.node_id {
            return Some(format!("dialled node {}, this is node {}", h.to, c.node_id));
        }
        if self.peer_addr(h.from).is_none() {
            return Some(format!("node {} is {NOT_YET_MEMBER}", h.from));
        }
        None
    }

    /// Dials `peer` as long as the fabric runs, keeping one main connection up.
    async fn dial_loop(self, peer: u64, addr: SocketAddr) {
        let mut wait = REDIAL_MIN;
        while !self.inner.stopping.is_cancelled() {
            match self.dial_main(peer, addr).await {
                Ok((rd, link)) => {
                    wait = REDIAL_MIN;
                    self.run_main(rd, link).await;
                }
                Err(e) => {
                    tracing::debug!(peer, %addr, "fabric: cannot connect: {e}");
                    let stop = self.inner.stopping.clone();
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {},
                        () = stop.cancelled() => return,
                    }
                    wait = (wait * 2).min(REDIAL_MAX);
                }
            }
        }
    }

    async fn dial(&self, peer: u64, addr: SocketAddr, lane: Lane) -> io::Result<TcpStream> {
        let (stream, h) = self.dial_hello(peer, addr, lane).await?;
        if h.from != peer {
            return Err(io::Error::other(format!("node {} answered at the address of node {peer}", h.from)));
        }
        self.inner.services.write().unwrap_or_else(|p| p.into_inner()).insert(peer, h.service);
        Ok(stream)
    }

    /// Dials `addr`, exchanges hellos; returns the stream and the peer's hello.
    async fn dial_hello(&self, peer: u64, addr: SocketAddr, lane: Lane) -> io::Result<(TcpStream, Hello)> {
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let hello = frame(kind::HELLO, 0, &self.hello(peer, lane)).map_err(io::Error::other)?;
        stream.write_all(&hello).await?;
        let answer = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello answer"))?
            .map_err(|e| io::Error::other(e.to_string()))?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed during hello"))?;
        if answer.0.kind != kind::HELLO {
            return Err(io::Error::other(format!("frame kind {} instead of a hello", answer.0.kind)));
        }
        let h: Hello = decode_body("hello", &answer.1).map_err(io::Error::other)?;
        if !h.refusal.is_empty() {
            self.inner.counters.bad_connections.fetch_add(1, Ordering::Relaxed);
            if h.refusal.contains(NOT_YET_MEMBER) {
                // The peer is still discovering its cluster: it will know this node shortly.
                tracing::info!(peer, %addr, "fabric: node {peer} does not know this node yet");
                return Err(io::Error::new(io::ErrorKind::NotConnected, h.refusal));
            }
            tracing::error!(peer, %addr, "fabric: node {peer} refused this node: {}", h.refusal);
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, h.refusal));
        }
        Ok((stream, h))
    }

    async fn dial_main(&self, peer: u64, addr: SocketAddr) -> io::Result<(tokio::net::tcp::OwnedReadHalf, Arc<Link>)> {
        let stream = self.dial(peer, addr, Lane::Main).await?;
        let (rd, wr) = stream.into_split();
        Ok((rd, self.install_link(peer, wr)))
    }

    fn install_link<W: AsyncWrite + Unpin + Send + 'static>(&self, peer: u64, wr: W) -> Arc<Link> {
        let serial = self.inner.counters.serial.fetch_add(1, Ordering::Relaxed);
        let link = Link::start(peer, serial, wr);
        self.inner.counters.connections.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.lock_links().insert(peer, link.clone()) {
            old.close();
        }
        tracing::info!(node = self.node_id(), peer, "fabric: connected");
        link
    }

    async fn accept_loop(self, listener: TcpListener) {
        let stop = self.inner.stopping.clone();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((stream, addr)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.serve_inbound(stream, addr).await });
                }
                Err(e) => {
                    tracing::warn!("fabric: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn serve_inbound(self, mut stream: TcpStream, addr: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let first = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                self.inner.counters.bad_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%addr, "fabric: bad hello: {e}");
                return;
            }
            Err(_) => {
                tracing::warn!(%addr, "fabric: no hello in time");
                return;
            }
        };
        let hello = if first.0.kind == kind::HELLO { decode_body::<Hello>("hello", &first.1).ok() } else { None };
        let Some(hello) = hello else {
            self.inner.counters.bad_connections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%addr, kind = first.0.kind, "fabric: the first frame is not a hello");
            return;
        };
        let mut answer = self.hello(hello.from, hello.lane);
        if let Some(why) = self.check_hello(&hello) {
            self.inner.counters.bad_connections.fetch_add(1, Ordering::Relaxed);
            if why.contains(NOT_YET_MEMBER) {
                tracing::info!(%addr, from = hello.from, "fabric: refusing a peer for now: {why}");
            } else {
                tracing::error!(%addr, from = hello.from, "fabric: refusing a peer: {why}");
            }
            answer.refusal = why;
        }
        let refused = !answer.refusal.is_empty();
        let Ok(bytes) = frame(kind::HELLO, 0, &answer) else { return };
        if stream.write_all(&bytes).await.is_err() || refused {
            return;
        }
        if hello.lane != Lane::Discover {
            self.inner.services.write().unwrap_or_else(|p| p.into_inner()).insert(hello.from, hello.service.clone());
        }
        match hello.lane {
            Lane::Discover => {}
            Lane::Main => {
                if hello.from > self.node_id() {
                    // The smaller id dials: a larger one dialling means its config differs.
                    tracing::warn!(from = hello.from, "fabric: accepted a main connection from a larger id");
                }
                let (rd, wr) = stream.into_split();
                let link = self.install_link(hello.from, wr);
                self.run_main(rd, link).await;
            }
            Lane::Snapshot => self.receive_snapshot(stream, hello.from).await,
        }
    }

    /// Reads a main connection's frames until it ends.
    async fn run_main<R: AsyncRead + Unpin>(&self, mut rd: R, link: Arc<Link>) {
        let peer = link.peer;
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout(LINK_IDLE_TIMEOUT, read_frame(&mut rd)) => r,
                () = link.closed() => break,
            };
            let (h, body) = match read {
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::info!(peer, "fabric: connection lost: {e}");
                    break;
                }
                Err(_) => {
                    tracing::warn!(peer, "fabric: nothing heard for {LINK_IDLE_TIMEOUT:?}; closing the connection");
                    break;
                }
            };
            if let Err(e) = self.dispatch(&link, h.kind, h.id, &body) {
                self.inner.counters.bad_connections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer, "fabric: bad frame, closing the connection: {e}");
                break;
            }
        }
        link.close();
        let mut links = self.lock_links();
        let current = links.get(&peer).is_some_and(|l| l.serial == link.serial);
        if current {
            links.remove(&peer);
        }
        drop(links);
        if current && !self.inner.stopping.is_cancelled() {
            let nodes: Vec<ReplicaNode> =
                self.inner.nodes.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            for node in nodes {
                node.peer_disconnected(peer);
            }
        }
        tracing::info!(node = self.node_id(), peer, "fabric: disconnected");
    }

    fn dispatch(&self, link: &Arc<Link>, kind: u8, id: u64, body: &[u8]) -> Result<(), WireError> {
        match kind {
            kind::REQUEST => {
                let request: Request = decode_body("request", body)?;
                let (me, link) = (self.clone(), link.clone());
                tokio::spawn(async move {
                    let reply = me.handle_request(link.peer, request).await;
                    let priority = if matches!(reply, Reply::Proxy(_)) { Priority::Bulk } else { Priority::Urgent };
                    match frame(kind::REPLY, id, &reply) {
                        Ok(bytes) => {
                            let _ = link.send(bytes, priority).await;
                        }
                        Err(e) => {
                            tracing::warn!(peer = link.peer, "fabric: cannot encode a reply: {e}");
                            if let Ok(bytes) = frame(kind::REPLY, id, &Reply::Error(e.to_string())) {
                                let _ = link.send(bytes, Priority::Urgent).await;
                            }
                        }
                    }
                });
            }
            kind::REPLY => link.complete(id, decode_body("reply", body)?),
            kind::KEEPALIVE => {}
            kind::CONTROL => {
                let c: Control = decode_body("control", body)?;
                let node = self.inner.nodes.read().unwrap_or_else(|p| p.into_inner()).get(&c.namespace).cloned();
                if let Some(node) = node {
                    let from = link.peer;
                    tokio::spawn(async move { node.on_control(from, c.message).await });
                }
            }
            other => return Err(WireError::UnknownKind(other)),
        }
        Ok(())
    }

    async fn handle_request(&self, from: u64, request: Request) -> Reply {
        match request {
            Request::Raft { namespace, partition, rpc } => {
                let Some(raft) = self.raft(namespace, partition) else {
                    return Reply::Error(format!("node {} has no group {namespace}/{partition}", self.node_id()));
                };
                let failed = |e: openraft::error::RaftError<crate::types::TypeConfig>| Reply::Error(e.to_string());
                match rpc {
                    RaftRequest::Append(r) => raft.append_entries(r).await.map_or_else(failed, Reply::Append),
                    RaftRequest::Vote(r) => raft.vote(r).await.map_or_else(failed, Reply::Vote),
                    RaftRequest::PreVote(r) => raft.pre_vote(r).await.map_or_else(failed, Reply::Vote),
                    RaftRequest::TransferLeader(r) => match raft.handle_transfer_leader(r).await {
                        Ok(resp) => Reply::TransferLeader(resp),
                        Err(fatal) => Reply::Error(fatal.to_string()),
                    },
                }
            }
            Request::Proxy(bytes) => {
                self.inner.counters.proxied_in.fetch_add(1, Ordering::Relaxed);
                let handler = self.inner.proxy.read().unwrap_or_else(|p| p.into_inner()).clone();
                match handler {
                    Some(h) => Reply::Proxy(h.handle(from, bytes).await),
                    None => Reply::Error("this node does not take proxied requests yet".into()),
                }
            }
        }
    }

    /// Receives one snapshot transfer on its own connection: the batches feed the group's
    /// install as they arrive; the install's result goes back.
    async fn receive_snapshot(&self, stream: TcpStream, from: u64) {
        let c = &self.inner.counters;
        c.snapshots_received.fetch_add(1, Ordering::Relaxed);
        c.snapshots_active.fetch_add(1, Ordering::Relaxed);
        let (mut rd, mut wr) = stream.into_split();
        let done: SnapshotDone = self.install_from(&mut rd, from).await;
        if let Err(e) = &done {
            tracing::warn!(from, "fabric: snapshot from node {from} not installed: {e}");
        }
        if let Ok(bytes) = frame(kind::SNAPSHOT_DONE, 0, &done) {
            let _ = wr.write_all(&bytes).await;
        }
        c.snapshots_active.fetch_sub(1, Ordering::Relaxed);
    }

    async fn install_from<R: AsyncRead + Unpin>(&self, rd: &mut R, from: u64) -> SnapshotDone {
        let begin = match read_frame(rd).await {
            Ok(Some((h, body))) if h.kind == kind::SNAPSHOT_BEGIN => {
                decode_body::<SnapshotBegin>("snapshot begin", &body).map_err(|e| e.to_string())?
            }
            Ok(Some((h, _))) => return Err(format!("frame kind {} instead of a snapshot begin", h.kind)),
            Ok(None) => return Err("closed before the snapshot began".into()),
            Err(e) => return Err(e.to_string()),
        };
        let Some(raft) = self.raft(begin.namespace, begin.partition) else {
            return Err(format!("node {} has no group {}/{}", self.node_id(), begin.namespace, begin.partition));
        };
        let pid =
            PartitionId::new(begin.partition).ok_or_else(|| format!("partition {} out of range", begin.partition))?;
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_BATCHES_QUEUED);
        let snapshot = Snapshot { meta: begin.meta, snapshot: PartitionSnapshot::remote(pid, rx) };
        tracing::info!(from, partition = begin.partition, "fabric: receiving a snapshot");
        let feed = async move {
            loop {
                let item = match read_frame(rd).await {
                    Ok(Some((h, body))) if h.kind == kind::SNAPSHOT_BATCH => {
                        match decode_body::<wire::SnapshotBatch>("snapshot batch", &body)
                            .map_err(|e| e.to_string())
                            .and_then(|c| c.to_versions().map_err(|e| e.to_string()))
                        {
                            Ok(versions) => RemoteItem::Batch(versions),
                            Err(e) => RemoteItem::Failed(e),
                        }
                    }
                    Ok(Some((h, body))) if h.kind == kind::SNAPSHOT_END => match decode_body::<u64>("end", &body) {
                        Ok(covers_next) => RemoteItem::End { covers_next },
                        Err(e) => RemoteItem::Failed(e.to_string()),
                    },
                    Ok(Some((h, _))) => RemoteItem::Failed(format!("unexpected frame kind {} in a snapshot", h.kind)),
                    Ok(None) => RemoteItem::Failed("the sender closed the transfer".into()),
                    Err(e) => RemoteItem::Failed(format!("transfer broke: {e}")),
                };
                let last = !matches!(item, RemoteItem::Batch(_));
                if tx.send(item).await.is_err() || last {
                    return; // the install stopped reading, or the stream ended
                }
            }
        };
        let (installed, ()) = tokio::join!(raft.install_full_snapshot(begin.vote, snapshot), feed);
        installed.map_err(|e| e.to_string())
    }
}

/// Control messages of one namespace over the fabric.
struct FabricControl {
    fabric: Fabric,
    namespace: u16,
}

impl ControlSender for FabricControl {
    fn send(&self, _from: u64, to: u64, message: ControlMessage) {
        let Some(link) = self.fabric.link(to) else { return };
        if let Ok(bytes) = frame(kind::CONTROL, 0, &Control { namespace: self.namespace, message }) {
            link.send_urgent_now(bytes);
        }
    }
}
