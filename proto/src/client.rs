//! A small async client for the Aerospike wire protocol (the bench tool's `--hosts` mode):
//! discovers the cluster from seed nodes (`node`, `peers-clear-std`, `replicas`), routes each key
//! to the node that masters its partition, pools connections per node, and bounds every
//! operation by a timeout (a timed-out connection is dropped, never reused mid-reply).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::consts::{PROTO_BODY_BYTES_MAX, TTL_NEVER_EXPIRE, field, info1, info2, info3, msg_type, op, result};
use crate::decode::{MsgHeader, ProtoHeader, decode_message};
use crate::encode::{begin_frame, end_frame, put_field, put_msg_header, put_op};
use crate::info::parse_request;

/// A bin as the client sees it: name, particle type, value bytes.
pub type WireBin = (Vec<u8>, u8, Vec<u8>);

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-zero result code.
    #[error("server result code {0}")]
    Result(u8),
    /// The operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The reply could not be understood, or the cluster could not be discovered.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Create or merge bins (UPDATE).
    Update,
    /// Create or replace all bins.
    Replace,
}

#[derive(Debug)]
struct Node {
    addr: SocketAddr,
    pool: Mutex<Vec<Conn>>,
}

/// A connected client.
#[derive(Debug)]
pub struct Client {
    nodes: Vec<Arc<Node>>,
    /// namespace → node index per partition.
    partitions: HashMap<String, Vec<u16>>,
    timeout: Duration,
}

/// A pooled connection: buffered reads, so a reply usually takes one system call.
type Conn = tokio::io::BufReader<TcpStream>;

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

/// Parses the peers list of `peers-clear-std`: `gen,port,[[id,tls,[host:port,...]],...]`.
fn parse_peers(value: &str) -> Vec<String> {
    let Some((_, rest)) = value.split_once(',') else { return Vec::new() };
    let Some((default_port, list)) = rest.split_once(',') else { return Vec::new() };
    let mut out = Vec::new();
    // Each peer's address list is the innermost bracketed group.
    for group in list.split('[').filter_map(|g| g.split_once(']').map(|(inner, _)| inner)) {
        if group.contains(',') && !group.contains(':') {
            continue;
        }
        for addr in group.split(',').filter(|a| !a.is_empty()) {
            if addr.contains(':') { out.push(addr.to_string()) } else { out.push(format!("{addr}:{default_port}")) }
        }
    }
    out
}

impl Client {
    /// Discovers the cluster through `seeds`.
    pub async fn connect(seeds: &[SocketAddr], timeout: Duration) -> Result<Client, ClientError> {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let mut queue: Vec<SocketAddr> = seeds.to_vec();
        let mut ids: HashMap<String, SocketAddr> = HashMap::new();
        let mut replicas: Vec<(SocketAddr, String)> = Vec::new();
        while let Some(addr) = queue.pop() {
            if addrs.contains(&addr) {
                continue;
            }
            let Ok(Ok(s)) = tokio::time::timeout(timeout, TcpStream::connect(addr)).await else { continue };
            let mut s = tokio::io::BufReader::new(s);
            let answers = tokio::time::timeout(timeout, info_on(&mut s, &["node", "peers-clear-std", "replicas"]))
                .await
                .map_err(|_| ClientError::Timeout)??;
            let id = answers.get("node").cloned().unwrap_or_default();
            if ids.insert(id, addr).is_some() {
                continue;
            }
            addrs.push(addr);
            for peer in parse_peers(answers.get("peers-clear-std").map_or("", String::as_str)) {
                if let Ok(a) = peer.parse() {
                    queue.push(a);
                }
            }
            replicas.push((addr, answers.get("replicas").cloned().unwrap_or_default()));
        }
        if addrs.is_empty() {
            return Err(ClientError::Protocol(format!("no seed answered: {seeds:?}")));
        }
        let mut partitions: HashMap<String, Vec<u16>> = HashMap::new();
        for (node_index, (_, text)) in replicas.iter().enumerate() {
            for ns_part in text.split(';').filter(|s| !s.is_empty()) {
                let Some((ns, rest)) = ns_part.split_once(':') else { continue };
                // `<regime>,<replica count>,<master bitmap>,...`
                let Some(master) = rest.split(',').nth(2).and_then(base64_decode) else { continue };
                let map = partitions.entry(ns.to_string()).or_insert_with(|| vec![u16::MAX; 4096]);
                for (p, slot) in map.iter_mut().enumerate() {
                    if master.get(p >> 3).is_some_and(|b| b & (0x80 >> (p & 7)) != 0) {
                        *slot = node_index as u16;
                    }
                }
            }
        }
        let nodes = addrs.into_iter().map(|addr| Arc::new(Node { addr, pool: Mutex::new(Vec::new()) })).collect();
        Ok(Client { nodes, partitions, timeout })
    }

    /// Number of nodes found.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn node_for(&self, namespace: &str, digest: &[u8; 20]) -> Result<Arc<Node>, ClientError> {
        let pid = usize::from((u16::from(digest[0]) | (u16::from(digest[1]) << 8)) & 0xFFF);
        let map = self.partitions.get(namespace).ok_or(ClientError::Result(result::NAMESPACE_NOT_FOUND))?;
        let i = map[pid];
        self.nodes.get(usize::from(i)).cloned().ok_or(ClientError::Protocol(format!("no node owns partition {pid}")))
    }

    async fn call(&self, node: &Node, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
        let pooled = node.pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let run = async {
            let mut s = match pooled {
                Some(s) => s,
                None => {
                    let s = TcpStream::connect(node.addr).await?;
                    s.set_nodelay(true)?;
                    tokio::io::BufReader::with_capacity(16 * 1024, s)
                }
            };
            let reply = send(&mut s, frame).await?;
            Ok::<_, ClientError>((s, reply))
        };
        match tokio::time::timeout(self.timeout, run).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok((s, reply))) => {
                node.pool.lock().unwrap_or_else(PoisonError::into_inner).push(s);
                Ok(reply)
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

    /// Writes bins and stores the user key (particle type, bytes) with the record.
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
        let reply = self.call(&*self.node_for(namespace, digest)?, &frame).await?;
        let (m, _) = decode_message(&reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match m.header.result_code {
            0 => Ok(()),
            code => Err(ClientError::Result(code)),
        }
    }

    /// Reads all bins; `Ok(None)` when the record does not exist.
    pub async fn get(
        &self,
        namespace: &str,
        set: &str,
        digest: &[u8; 20],
    ) -> Result<Option<Vec<WireBin>>, ClientError> {
        let header = MsgHeader { info1: info1::READ | info1::GET_ALL, ..MsgHeader::default() };
        let frame = Self::request(&header, namespace, set, digest, None, &[], op::READ);
        let reply = self.call(&*self.node_for(namespace, digest)?, &frame).await?;
        let (m, _) = decode_message(&reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match m.header.result_code {
            0 => Ok(Some(m.ops.iter().map(|o| (o.name.to_vec(), o.particle_type, o.value.to_vec())).collect())),
            result::KEY_NOT_FOUND => Ok(None),
            code => Err(ClientError::Result(code)),
        }
    }

    /// Reads several records with batch requests (one per node); results in key order.
    pub async fn batch_get(
        &self,
        namespace: &str,
        set: &str,
        digests: &[[u8; 20]],
    ) -> Result<Vec<Option<Vec<WireBin>>>, ClientError> {
        let mut by_node: HashMap<SocketAddr, (Arc<Node>, Vec<usize>)> = HashMap::new();
        for (i, d) in digests.iter().enumerate() {
            let node = self.node_for(namespace, d)?;
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
            self.batch_call(&node, &buf, &mut out).await?;
        }
        Ok(out)
    }

    async fn batch_call(&self, node: &Node, frame: &[u8], out: &mut [Option<Vec<WireBin>>]) -> Result<(), ClientError> {
        let pooled = node.pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let run = async {
            let mut s = match pooled {
                Some(s) => s,
                None => tokio::io::BufReader::with_capacity(16 * 1024, TcpStream::connect(node.addr).await?),
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
        match tokio::time::timeout(self.timeout, run).await {
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
mod tests {
    use super::*;

    #[test]
    fn peers_and_base64() {
        assert!(parse_peers("1,3000,[]").is_empty());
        assert_eq!(
            parse_peers("3,3000,[[BB9,,[10.0.0.2:3001]],[BB8,,[10.0.0.3]]]"),
            vec!["10.0.0.2:3001".to_string(), "10.0.0.3:3000".to_string()]
        );
        assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        // A full 4096-partition bitmap: 512 bytes of 0xFF is 684 characters with one pad.
        let full = format!("{}//8=", "////".repeat(170));
        assert_eq!(full.len(), 684);
        assert_eq!(base64_decode(&full).unwrap(), vec![0xFF; 512]);
    }
}
