//! What the client knows of a cluster, and the info answers it learns it from: `replicas`
//! (which node holds each partition, per replica index, with the namespace's regime),
//! `peers-clear-std` (the other nodes and their addresses), and the partition table the tender
//! merges every node's claims into. Malformed answers are errors, never panics.
//!
//! The merge follows the official C and Java clients: a claim is taken only when its regime is
//! at least the highest regime already seen for the partition (strong-consistency namespaces
//! report a non-zero regime; AP namespaces always 0, so every claim is taken), and a node that
//! stops claiming a partition keeps it until another node claims it.

use std::sync::Arc;

use peregrine_index::PARTITION_COUNT;

use super::{ClientError, Node, base64_decode};

/// Bytes of one replica bitmap: a bit per partition.
pub(super) const BITMAP_BYTES: usize = PARTITION_COUNT / 8;
/// Base64 characters of one bitmap (512 bytes, padded); the C client rejects other lengths.
pub(super) const BITMAP_B64_CHARS: usize = BITMAP_BYTES.div_ceil(3) * 4;
/// Most replica indices a namespace may report (a larger count is a malformed answer).
pub(super) const REPLICA_COUNT_MAX: usize = 16;

fn malformed(what: &str, detail: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(format!("malformed {what} answer: {detail}"))
}

/// One namespace of a `replicas` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NamespaceReplicas {
    /// Namespace name.
    pub namespace: String,
    /// The node's regime for the namespace (0 = AP).
    pub regime: u32,
    /// One bitmap of [`BITMAP_BYTES`] per replica index (0 = master).
    pub bitmaps: Vec<Vec<u8>>,
}

/// Whether `bitmap` has partition `p`'s bit (byte `p >> 3`, mask `0x80 >> (p & 7)`).
pub(super) fn bit(bitmap: &[u8], p: usize) -> bool {
    bitmap.get(p >> 3).is_some_and(|b| b & (0x80 >> (p & 7)) != 0)
}

/// Parses `replicas`: `<ns>:<regime>,<replica count>,<b64 bitmap>...` per namespace, `;`-joined.
/// Any malformed namespace fails the whole answer (the caller keeps its old map and asks
/// again at the next tend).
pub(super) fn parse_replicas(value: &str) -> Result<Vec<NamespaceReplicas>, ClientError> {
    let value = value.trim();
    if value.starts_with("ERROR") {
        return Err(malformed("replicas", value));
    }
    let mut out = Vec::new();
    for part in value.split(';').filter(|s| !s.is_empty()) {
        let (namespace, rest) =
            part.split_once(':').ok_or_else(|| malformed("replicas", "no ':' after a namespace"))?;
        if namespace.is_empty() {
            return Err(malformed("replicas", "empty namespace name"));
        }
        let mut fields = rest.split(',');
        let regime = fields
            .next()
            .and_then(|f| f.parse::<u32>().ok())
            .ok_or_else(|| malformed("replicas", format!("{namespace}: regime is not a number")))?;
        let count = fields
            .next()
            .and_then(|f| f.parse::<usize>().ok())
            .filter(|c| (1..=REPLICA_COUNT_MAX).contains(c))
            .ok_or_else(|| {
                malformed("replicas", format!("{namespace}: replica count is not a number in 1..={REPLICA_COUNT_MAX}"))
            })?;
        let mut bitmaps = Vec::with_capacity(count);
        for index in 0..count {
            let b64 = fields
                .next()
                .ok_or_else(|| malformed("replicas", format!("{namespace}: {count} replicas but {index} bitmaps")))?;
            if b64.len() != BITMAP_B64_CHARS {
                return Err(malformed(
                    "replicas",
                    format!("{namespace}: bitmap {index} has {} characters, not {BITMAP_B64_CHARS}", b64.len()),
                ));
            }
            let bitmap = base64_decode(b64).filter(|b| b.len() == BITMAP_BYTES).ok_or_else(|| {
                malformed("replicas", format!("{namespace}: bitmap {index} is not base64 of 512 bytes"))
            })?;
            bitmaps.push(bitmap);
        }
        if fields.next().is_some() {
            return Err(malformed("replicas", format!("{namespace}: more bitmaps than its {count} replicas")));
        }
        out.push(NamespaceReplicas { namespace: namespace.to_string(), regime, bitmaps });
    }
    Ok(out)
}

/// One node of a `peers-clear-std` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Peer {
    /// Node name.
    pub name: String,
    /// TLS name (empty on clear-text ports).
    pub tls_name: String,
    /// `host:port` addresses (the default port filled in; IPv6 hosts in brackets).
    pub addrs: Vec<String>,
}

/// A `peers-clear-std` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Peers {
    /// The node's peers generation when it answered.
    pub generation: i64,
    /// The other nodes (the answering node excluded).
    pub peers: Vec<Peer>,
}

/// A cursor over an info value, for the bracketed `peers-*` lists.
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), ClientError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(malformed("peers", format!("expected '{}' at byte {} of {:?}", char::from(c), self.pos, self.text)))
        }
    }

    /// Everything up to (not including) the next byte of `stops`, or to the end.
    fn until(&mut self, stops: &[u8]) -> &'a str {
        let rest = self.text.get(self.pos..).unwrap_or("");
        let len = rest.bytes().position(|b| stops.contains(&b)).unwrap_or(rest.len());
        self.pos += len;
        rest.get(..len).unwrap_or("")
    }

    /// A `[item,item,...]` list (possibly empty), each item read by `item`.
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T, ClientError>) -> Result<Vec<T>, ClientError> {
        self.expect(b'[')?;
        let mut out = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(out);
        }
        loop {
            out.push(item(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(out);
                }
                _ => return Err(malformed("peers", format!("unterminated list in {:?}", self.text))),
            }
        }
    }
}

/// One address: `host`, `host:port`, `[v6]` or `[v6]:port`; a bare IPv6 host gets brackets.
fn address(c: &mut Cursor<'_>, default_port: u16) -> Result<String, ClientError> {
    let (host, port) = if c.peek() == Some(b'[') {
        c.expect(b'[')?;
        let host = c.until(b"]");
        c.expect(b']')?;
        let port = if c.peek() == Some(b':') {
            c.expect(b':')?;
            Some(c.until(b",]"))
        } else {
            None
        };
        (format!("[{host}]"), port)
    } else {
        let token = c.until(b",]");
        match token.matches(':').count() {
            0 => (token.to_string(), None),
            1 => token.split_once(':').map_or((token.to_string(), None), |(h, p)| (h.to_string(), Some(p))),
            _ => (format!("[{token}]"), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(malformed("peers", "an empty host"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().map_err(|_| malformed("peers", format!("port {p:?} of {host}")))?,
    };
    Ok(format!("{host}:{port}"))
}

/// Parses `peers-clear-std`: `<gen>,<default port>,[[<name>,<tls name>,[<host:port>,...]],...]`
/// (a port may be omitted when it equals the default).
pub(super) fn parse_peers(value: &str) -> Result<Peers, ClientError> {
    let value = value.trim();
    if value.starts_with("ERROR") {
        return Err(malformed("peers", value));
    }
    let mut c = Cursor { text: value, pos: 0 };
    let generation = c.until(b",");
    let generation = generation.parse::<i64>().map_err(|_| malformed("peers", format!("generation {generation:?}")))?;
    c.expect(b',')?;
    let port = c.until(b",");
    let default_port = port.parse::<u16>().map_err(|_| malformed("peers", format!("default port {port:?}")))?;
    c.expect(b',')?;
    let peers = c.list(|c| {
        c.expect(b'[')?;
        let name = c.until(b",]").to_string();
        if name.is_empty() {
            return Err(malformed("peers", "a peer without a name"));
        }
        c.expect(b',')?;
        let tls_name = c.until(b",]").to_string();
        c.expect(b',')?;
        let addrs = c.list(|c| address(c, default_port))?;
        c.expect(b']')?;
        Ok(Peer { name, tls_name, addrs })
    })?;
    if c.pos != value.len() {
        return Err(malformed("peers", format!("trailing bytes after byte {} of {value:?}", c.pos)));
    }
    Ok(Peers { generation, peers })
}

/// What merging one node's claims changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Merged {
    /// Partition slots that now name this node.
    pub changed: usize,
    /// Claims refused because their regime was below the one seen for the partition.
    pub refused: usize,
}

/// One namespace's partition map: per replica index and partition, the node that holds it.
#[derive(Debug, Clone)]
pub(super) struct PartitionTable {
    /// Strong consistency, decided once when the table is created (regime != 0), as the
    /// official clients do.
    pub sc: bool,
    /// Highest regime seen per partition.
    regimes: Vec<u32>,
    /// `replicas[index][partition]`.
    replicas: Vec<Vec<Option<Arc<Node>>>>,
}

impl PartitionTable {
    /// An empty table.
    pub fn new(sc: bool) -> PartitionTable {
        PartitionTable { sc, regimes: vec![0; PARTITION_COUNT], replicas: Vec::new() }
    }

    /// Takes `node`'s claims: every claimed slot with a regime at least the partition's highest
    /// regime seen. Unclaimed slots keep their node.
    pub fn merge(&mut self, node: &Arc<Node>, claims: &NamespaceReplicas) -> Merged {
        let mut merged = Merged::default();
        while self.replicas.len() < claims.bitmaps.len() {
            self.replicas.push(vec![None; PARTITION_COUNT]);
        }
        for (bitmap, slots) in claims.bitmaps.iter().zip(self.replicas.iter_mut()) {
            for (p, (slot, regime)) in slots.iter_mut().zip(self.regimes.iter_mut()).enumerate() {
                if !bit(bitmap, p) {
                    continue;
                }
                if claims.regime < *regime {
                    merged.refused += 1;
                    continue;
                }
                *regime = claims.regime;
                if !slot.as_ref().is_some_and(|n| Arc::ptr_eq(n, node)) {
                    *slot = Some(node.clone());
                    merged.changed += 1;
                }
            }
        }
        merged
    }

    /// Clears every slot of a node the client dropped; true when it held any.
    pub fn forget(&mut self, node: &Arc<Node>) -> bool {
        let mut any = false;
        for slot in self.replicas.iter_mut().flatten() {
            if slot.as_ref().is_some_and(|n| Arc::ptr_eq(n, node)) {
                *slot = None;
                any = true;
            }
        }
        any
    }

    /// Whether `node` holds any slot.
    pub fn holds_any(&self, node: &Arc<Node>) -> bool {
        self.replicas.iter().flatten().any(|slot| slot.as_ref().is_some_and(|n| Arc::ptr_eq(n, node)))
    }

    /// The node at `index` for partition `p`.
    pub fn node(&self, index: usize, p: usize) -> Option<&Arc<Node>> {
        self.replicas.get(index).and_then(|slots| slots.get(p)).and_then(Option::as_ref)
    }

    /// The node for attempt `attempt` of a command on partition `p`: the master when
    /// `master_only`, otherwise the replica indices in turn starting at `attempt` (skipping
    /// empty slots), as the C client's "sequence" replica policy does.
    pub fn route(&self, p: usize, attempt: u32, master_only: bool) -> Option<&Arc<Node>> {
        if master_only {
            return self.node(0, p);
        }
        let n = self.replicas.len();
        (0..n).find_map(|k| self.node((attempt as usize + k) % n, p))
    }

    /// The highest regime seen for partition `p`.
    #[cfg(test)]
    pub fn regime(&self, p: usize) -> u32 {
        self.regimes.get(p).copied().unwrap_or(0)
    }
}
