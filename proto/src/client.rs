//! A small async client for the Aerospike wire protocol (the bench tool's `--hosts` mode and
//! the restore tool): discovers the cluster from seed nodes, keeps its view current with a
//! background tend (`tend.rs`: peers and partition maps re-read when their generations change,
//! new nodes connected, dead ones dropped), routes each key to the node that holds its
//! partition (`cluster.rs`: the partition tables, regimes, the info answers' parsers), pools
//! connections per node, and bounds every command by a time budget.
//!
//! Retries, within the budget: a read answered "partition unavailable" (11), failing on its
//! connection, or timing out goes again to the next replica (AP namespaces) or to the master
//! after a map refresh (strong consistency: reads go to the master only). A write is retried
//! only when it provably never reached a server (the connection could not be opened, or the
//! request could not be written whole); once sent, a lost connection or a timeout leaves it in
//! doubt and is reported, as is a write's 11. Every failure asks the tender for a refresh.
//!
//! Commands read the cluster view through one `RwLock<Arc<View>>`, held only to look up the
//! node: no other lock on the data path but the node's connection pool, as before.

mod cluster;
mod tend;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::consts::{PROTO_BODY_BYTES_MAX, TTL_NEVER_EXPIRE, field, info1, info2, info3, msg_type, op, result};
use crate::decode::{MsgHeader, ProtoHeader, decode_message};
use crate::encode::{begin_frame, end_frame, put_field, put_msg_header, put_op};
use crate::info::parse_request;
use cluster::PartitionTable;
use tend::Tender;

/// A bin as the client sees it: name, particle type, value bytes.
pub type WireBin = (Vec<u8>, u8, Vec<u8>);

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-zero result code.
    #[error("server result code {0}")]
    Result(u8),
    /// The operation did not finish in time (for a write: it may or may not have been applied).
    #[error("timed out")]
    Timeout,
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The reply could not be understood, or the cluster could not be discovered.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No known node holds the key's partition (the client-side "partition unavailable").
    #[error("no node holds partition {partition} of namespace {namespace}")]
    NoNode {
        /// The namespace.
        namespace: String,
        /// The partition.
        partition: u16,
    },
}

/// The outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Create or merge bins (UPDATE).
    Update,
    /// Create or replace all bins.
    Replace,
}

/// Time between tends (the C client's default).
pub const TEND_INTERVAL: Duration = Duration::from_secs(1);
/// Budget of one node's info request during a tend (the C client's default).
pub const TEND_TIMEOUT: Duration = Duration::from_secs(1);
/// By default a read attempt gets this share of the command's budget, so a stalled node
/// leaves time to ask a replica.
const READ_ATTEMPTS_PER_BUDGET: u32 = 2;
/// First wait before a command tries the same node again (the map needs a tend to change).
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two attempts on the same node.
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Read buffer of a data connection: a reply usually takes one system call.
const CONN_BUFFER_BYTES: usize = 16 * 1024;
/// Offset of the result code in an AS_MSG header (header size, info1..info4, result code).
const RESULT_CODE_OFFSET: usize = 5;

/// How a client times commands and tends the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Budget of one command, retries included (and of a whole batch).
    pub total_timeout: Duration,
    /// Longest one read attempt may take before it is tried again (capped by what remains of
    /// the budget). A write attempt gets all that remains: a write that times out is in doubt
    /// and is not retried.
    pub read_attempt_timeout: Duration,
    /// Time between tends.
    pub tend_interval: Duration,
    /// Budget of one node's info request during a tend.
    pub tend_timeout: Duration,
}

impl ClientOptions {
    /// Commands bounded by `total_timeout`, reads attempted for half of it, tends every
    /// [`TEND_INTERVAL`].
    pub fn new(total_timeout: Duration) -> ClientOptions {
        ClientOptions {
            total_timeout,
            read_attempt_timeout: total_timeout / READ_ATTEMPTS_PER_BUDGET,
            tend_interval: TEND_INTERVAL,
            tend_timeout: TEND_TIMEOUT,
        }
    }
}

/// A node of the cluster: its name, address, data connections and tend connection.
#[derive(Debug)]
struct Node {
    name: String,
    addr: SocketAddr,
    pool: Mutex<Vec<Conn>>,
    tend_conn: Mutex<Option<Conn>>,
}

impl Node {
    fn new(name: String, addr: SocketAddr) -> Node {
        Node { name, addr, pool: Mutex::new(Vec::new()), tend_conn: Mutex::new(None) }
    }
}

/// The cluster as commands see it; the tender publishes a new one when anything changes.
#[derive(Debug, Default)]
struct View {
    /// Partition table per namespace.
    tables: HashMap<String, PartitionTable>,
    /// The nodes known.
    nodes: Vec<Arc<Node>>,
}

/// What the client and its tender share.
#[derive(Debug)]
struct Shared {
    options: ClientOptions,
    seeds: Vec<SocketAddr>,
    view: RwLock<Arc<View>>,
    /// Commands that failed in a way a newer map might fix ask for an early tend here.
    refresh: Notify,
    /// Tends completed.
    tends: AtomicU64,
}

/// A connected client. Dropping it stops its tender.
#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    tender: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.tender.abort();
    }
}

/// A pooled connection: buffered reads, so a reply usually takes one system call.
type Conn = tokio::io::BufReader<TcpStream>;

async fn open(addr: SocketAddr) -> Result<Conn, ClientError> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(tokio::io::BufReader::with_capacity(CONN_BUFFER_BYTES, s))
}

async fn send(stream: &mut Conn, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
    stream.get_mut().write_all(frame).await?;
    read_frame(stream).await
}

async fn read_frame(stream: &mut Conn) -> Result<Vec<u8>, ClientError> {
    let mut h = [0u8; 8];
    stream.read_exact(&mut h).await?;
    let header = ProtoHeader::decode(h, PROTO_BODY_BYTES_MAX).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; header.size as usize];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

async fn info_on(stream: &mut Conn, commands: &[&str]) -> Result<HashMap<String, String>, ClientError> {
    let mut body = commands.join("\n");
    body.push('\n');
    let mut frame = ProtoHeader::encode(msg_type::INFO, body.len() as u64).to_vec();
    frame.extend_from_slice(body.as_bytes());
    let reply = send(stream, &frame).await?;
    Ok(parse_request(&reply)
        .into_iter()
        .filter_map(|line| line.split_once('\t').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect())
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim().as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in chunk {
            n = (n << 6) | if c == b'=' { 0 } else { val(c)? };
        }
        n <<= 6 * (4 - chunk.len() as u32);
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&got[..3 - pad.min(3)]);
    }
    Some(out)
}

/// The partition of a digest: `(digest[0] | digest[1] << 8) & 4095`.
fn partition_of(digest: &[u8; 20]) -> usize {
    usize::from((u16::from(digest[0]) | (u16::from(digest[1]) << 8)) & 0xFFF)
}

/// Why one attempt failed, and whether the request may have reached the server.
#[derive(Debug)]
struct Failure {
    error: ClientError,
    /// False only when the request provably was not delivered whole (connect or write failed).
    sent: bool,
}

/// One attempt on one node, bounded by `limit`. A connection that failed or timed out is
/// dropped, never reused mid-reply; an I/O failure also empties the node's pool (its other
/// idle connections most likely died with it).
async fn attempt_on(node: &Node, frame: &[u8], limit: Duration) -> Result<Vec<u8>, Failure> {
    let pooled = node.pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let run = async {
        let mut s = match pooled {
            Some(s) => s,
            None => open(node.addr).await.map_err(|error| Failure { error, sent: false })?,
        };
        if let Err(e) = s.get_mut().write_all(frame).await {
            return Err(Failure { error: e.into(), sent: false });
        }
        let reply = read_frame(&mut s).await.map_err(|error| Failure { error, sent: true })?;
        Ok((s, reply))
    };
    match tokio::time::timeout(limit, run).await {
        Err(_) => Err(Failure { error: ClientError::Timeout, sent: true }),
        Ok(Err(f)) => {
            if matches!(f.error, ClientError::Io(_)) {
                node.pool.lock().unwrap_or_else(PoisonError::into_inner).clear();
            }
            Err(f)
        }
        Ok(Ok((s, reply))) => {
            node.pool.lock().unwrap_or_else(PoisonError::into_inner).push(s);
            Ok(reply)
        }
    }
}

impl Client {
    /// Discovers the cluster through `seeds`; commands are bounded by `timeout`.
    pub async fn connect(seeds: &[SocketAddr], timeout: Duration) -> Result<Client, ClientError> {
        Self::connect_with(seeds, ClientOptions::new(timeout)).await
    }

    /// Discovers the cluster through `seeds` (one full tend: every node reachable through the
    /// peer lists, their partition maps) and starts the background tender on the current
    /// tokio runtime.
    pub async fn connect_with(seeds: &[SocketAddr], options: ClientOptions) -> Result<Client, ClientError> {
        let shared = Arc::new(Shared {
            options,
            seeds: seeds.to_vec(),
            view: RwLock::new(Arc::new(View::default())),
            refresh: Notify::new(),
            tends: AtomicU64::new(0),
        });
        let mut tender = Tender::default();
        tender.tend(&shared).await;
        if shared.view.read().unwrap_or_else(PoisonError::into_inner).nodes.is_empty() {
            return Err(ClientError::Protocol(format!("no seed answered: {seeds:?}")));
        }
        let tender = tokio::spawn(tender.run(shared.clone()));
        Ok(Client { shared, tender })
    }

    /// Number of nodes known.
    pub fn node_count(&self) -> usize {
        self.view().nodes.len()
    }

    /// Names of the nodes known.
    pub fn node_names(&self) -> Vec<String> {
        self.view().nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn view(&self) -> Arc<View> {
        self.shared.view.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Asks the tender for an early tend (it coalesces requests and keeps them
    /// [`tend::REFRESH_GAP_MIN`] apart).
    fn request_refresh(&self) {
        self.shared.refresh.notify_one();
    }

    /// The node for attempt `attempt` on partition `p`: the master when `master_only` (writes)
    /// and for every command on a strong-consistency namespace, otherwise the replicas in turn.
    fn route(&self, namespace: &str, p: usize, attempt: u32, master_only: bool) -> Result<Arc<Node>, ClientError> {
        let view = self.shared.view.read().unwrap_or_else(PoisonError::into_inner);
        let table = view.tables.get(namespace).ok_or(ClientError::Result(result::NAMESPACE_NOT_FOUND))?;
        table
            .route(p, attempt, master_only || table.sc)
            .cloned()
            .ok_or_else(|| ClientError::NoNode { namespace: namespace.to_string(), partition: p as u16 })
    }

    /// Runs a single-record command within the budget, retrying where that is safe (see the
    /// module doc). Returns the reply body, whatever its result code.
    async fn execute(
        &self,
        namespace: &str,
        digest: &[u8; 20],
        frame: &[u8],
        write: bool,
    ) -> Result<Vec<u8>, ClientError> {
        let options = &self.shared.options;
        let deadline = Instant::now() + options.total_timeout;
        let p = partition_of(digest);
        let mut attempt: u32 = 0;
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            let (error, failed) = match self.route(namespace, p, attempt, write) {
                Err(e @ ClientError::NoNode { .. }) => (e, None),
                Err(e) => return Err(e),
                Ok(node) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let limit = if write { remaining } else { remaining.min(options.read_attempt_timeout) };
                    match attempt_on(&node, frame, limit).await {
                        Ok(reply) => match reply.get(RESULT_CODE_OFFSET) {
                            Some(&code) if code == result::PARTITION_UNAVAILABLE && !write => {
                                (ClientError::Result(code), Some(node))
                            }
                            _ => return Ok(reply),
                        },
                        Err(f) if write && f.sent => return Err(f.error),
                        Err(f) => (f.error, Some(node)),
                    }
                }
            };
            self.request_refresh();
            attempt = attempt.wrapping_add(1);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(error);
            }
            // Another node is tried at once; the same node again only after a wait, in which
            // a tend may move the partition.
            let same = match (&failed, self.route(namespace, p, attempt, write)) {
                (Some(a), Ok(b)) => Arc::ptr_eq(a, &b),
                _ => true,
            };
            if same {
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                if Instant::now() >= deadline {
                    return Err(error);
                }
            }
        }
    }

    fn request(
        header: &MsgHeader,
        namespace: &str,
        set: &str,
        digest: &[u8; 20],
        key: Option<(u8, &[u8])>,
        bins: &[WireBin],
        op_type: u8,
    ) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64 + bins.iter().map(|b| b.2.len() + 24).sum::<usize>());
        let start = begin_frame(&mut buf, msg_type::MESSAGE);
        let n_fields = 3 + u16::from(key.is_some());
        put_msg_header(&mut buf, &MsgHeader { n_fields, n_ops: bins.len() as u16, ..*header });
        put_field(&mut buf, field::NAMESPACE, namespace.as_bytes());
        put_field(&mut buf, field::SET, set.as_bytes());
        put_field(&mut buf, field::DIGEST, digest);
        if let Some((pt, bytes)) = key {
            let mut data = Vec::with_capacity(bytes.len() + 1);
            data.push(pt);
            data.extend_from_slice(bytes);
            put_field(&mut buf, field::KEY, &data);
        }
        for (name, pt, value) in bins {
            put_op(&mut buf, op_type, *pt, name, value);
        }
        end_frame(&mut buf, start);
        buf
    }

    /// Writes bins; `ttl_s` None means the namespace default.
    pub async fn put(
        &self,
        namespace: &str,
        set: &str,
        digest: &[u8; 20],
        bins: &[WireBin],
        mode: WriteMode,
        ttl_s: Option<u32>,
    ) -> Result<(), ClientError> {
        self.put_with_key(namespace, set, digest, None, bins, mode, ttl_s).await
    }

    /// Writes bins and stores the user key (particle type, bytes) with the record, on the
    /// partition's master. Retried (within the budget) only while the request provably never
    /// reached a server; [`ClientError::Timeout`] or an I/O error after sending means the write
    /// may or may not have been applied.
    #[allow(clippy::too_many_arguments, reason = "one write's parts")]
    pub async fn put_with_key(
        &self,
        namespace: &str,
        set: &str,
        digest: &[u8; 20],
        key: Option<(u8, &[u8])>,
        bins: &[WireBin],
        mode: WriteMode,
        ttl_s: Option<u32>,
    ) -> Result<(), ClientError> {
        let header = MsgHeader {
            info2: info2::WRITE,
            info3: if mode == WriteMode::Replace { info3::CREATE_OR_REPLACE } else { 0 },
            record_ttl: ttl_s.map_or(0, |t| if t == 0 { TTL_NEVER_EXPIRE } else { t }),
            ..MsgHeader::default()
        };
        let frame = Self::request(&header, namespace, set, digest, key, bins, op::WRITE);
        let reply = self.execute(namespace, digest, &frame, true).await?;
        let (m, _) = decode_message(&reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match m.header.result_code {
            0 => Ok(()),
            code => Err(ClientError::Result(code)),
        }
    }

    /// Reads all bins; `Ok(None)` when the record does not exist. Tried again on the next
    /// replica (or, for strong consistency, on the master after a map refresh) after result 11,
    /// a connection error or an attempt's timeout, within the budget.
    pub async fn get(
        &self,
        namespace: &str,
        set: &str,
        digest: &[u8; 20],
    ) -> Result<Option<Vec<WireBin>>, ClientError> {
        let header = MsgHeader { info1: info1::READ | info1::GET_ALL, ..MsgHeader::default() };
        let frame = Self::request(&header, namespace, set, digest, None, &[], op::READ);
        let reply = self.execute(namespace, digest, &frame, false).await?;
        let (m, _) = decode_message(&reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match m.header.result_code {
            0 => Ok(Some(m.ops.iter().map(|o| (o.name.to_vec(), o.particle_type, o.value.to_vec())).collect())),
            result::KEY_NOT_FOUND => Ok(None),
            code => Err(ClientError::Result(code)),
        }
    }

    /// Reads several records with batch requests (one per master node); results in key order.
    /// Not retried: a failure is reported (and asks for a map refresh).
    pub async fn batch_get(
        &self,
        namespace: &str,
        set: &str,
        digests: &[[u8; 20]],
    ) -> Result<Vec<Option<Vec<WireBin>>>, ClientError> {
        let mut by_node: HashMap<SocketAddr, (Arc<Node>, Vec<usize>)> = HashMap::new();
        for (i, d) in digests.iter().enumerate() {
            let node = self.route(namespace, partition_of(d), 0, true)?;
            by_node.entry(node.addr).or_insert_with(|| (node.clone(), Vec::new())).1.push(i);
        }
        let mut out: Vec<Option<Vec<WireBin>>> = digests.iter().map(|_| None).collect();
        for (_, (node, rows)) in by_node {
            let mut data = Vec::new();
            data.extend_from_slice(&(rows.len() as u32).to_be_bytes());
            data.push(0x0d);
            for (n, &i) in rows.iter().enumerate() {
                data.extend_from_slice(&(i as u32).to_be_bytes());
                data.extend_from_slice(&digests[i]);
                if n == 0 {
                    data.push(0);
                    data.push(info1::READ | info1::GET_ALL);
                    data.extend_from_slice(&2u16.to_be_bytes());
                    data.extend_from_slice(&0u16.to_be_bytes());
                    put_field(&mut data, field::NAMESPACE, namespace.as_bytes());
                    put_field(&mut data, field::SET, set.as_bytes());
                } else {
                    data.push(crate::batch::ROW_REPEAT);
                }
            }
            let mut buf = Vec::new();
            let start = begin_frame(&mut buf, msg_type::MESSAGE);
            put_msg_header(&mut buf, &MsgHeader { info1: info1::BATCH, n_fields: 1, ..MsgHeader::default() });
            put_field(&mut buf, field::BATCH_INDEX, &data);
            end_frame(&mut buf, start);
            if let Err(e) = self.batch_call(&node, &buf, &mut out).await {
                self.request_refresh();
                return Err(e);
            }
        }
        Ok(out)
    }

    async fn batch_call(&self, node: &Node, frame: &[u8], out: &mut [Option<Vec<WireBin>>]) -> Result<(), ClientError> {
        let pooled = node.pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let run = async {
            let mut s = match pooled {
                Some(s) => s,
                None => open(node.addr).await?,
            };
            s.get_mut().write_all(frame).await?;
            loop {
                let body = read_frame(&mut s).await?;
                let mut rest: &[u8] = &body;
                while !rest.is_empty() {
                    let (m, used) = decode_message(rest).map_err(|e| ClientError::Protocol(e.to_string()))?;
                    rest = &rest[used.max(1)..];
                    if m.header.info3 & info3::LAST != 0 {
                        return match m.header.result_code {
                            0 => Ok(s),
                            code => Err(ClientError::Result(code)),
                        };
                    }
                    let i = m.header.transaction_ttl as usize;
                    if m.header.result_code == 0
                        && let Some(slot) = out.get_mut(i)
                    {
                        *slot =
                            Some(m.ops.iter().map(|o| (o.name.to_vec(), o.particle_type, o.value.to_vec())).collect());
                    }
                }
            }
        };
        match tokio::time::timeout(self.shared.options.total_timeout, run).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok(s)) => {
                node.pool.lock().unwrap_or_else(PoisonError::into_inner).push(s);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
