//! The node: its namespaces (one engine each), identity, limits and metrics, and the answers to
//! info commands. One node owns all 4096 partitions of every namespace.

use std::collections::HashMap;
use std::sync::Arc;

use peregrine_engine::Engine;
use peregrine_proto::info::{command_name, put_answer};

use crate::cluster::{Cluster, node_name};
use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// The Aerospike server version we present; clients enable batch-any, partition queries and
/// user-agent-set for builds at or above 8.1.
pub const BUILD: &str = "8.1.0.0";

/// Everything a connection needs.
#[derive(Debug)]
pub struct Node {
    /// Engines by namespace name.
    pub namespaces: HashMap<String, Engine>,
    /// Namespaces in configuration order.
    pub namespace_order: Vec<String>,
    /// Node id (uppercase hex).
    pub node_id: String,
    /// Server settings.
    pub config: ServerConfig,
    /// Address and port clients should use.
    pub service: String,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The cluster this node belongs to (`None`: alone).
    pub cluster: Option<Arc<Cluster>>,
    /// base64 of a 4096-bit map with every partition set (684 characters).
    all_partitions_b64: String,
}

impl Node {
    /// A node serving `engines`.
    pub fn new(
        config: ServerConfig,
        engines: Vec<(String, Engine)>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
    ) -> Node {
        let node_id = match &cluster {
            Some(c) => node_name(c.node_id),
            None => config.node_id.clone().map(|s| s.to_uppercase()).unwrap_or_else(|| derived_node_id(&config)),
        };
        let host = config.advertise.clone().unwrap_or_else(|| {
            if config.listen.ip().is_unspecified() { "127.0.0.1".into() } else { config.listen.ip().to_string() }
        });
        let service = format!("{host}:{}", config.listen.port());
        let namespace_order = engines.iter().map(|(n, _)| n.clone()).collect();
        Node {
            namespaces: engines.into_iter().collect(),
            namespace_order,
            node_id,
            config,
            service,
            metrics,
            cluster,
            all_partitions_b64: base64(&[0xFF; 512]),
        }
    }

    /// The service address clients should use.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Answers an info request (already split into commands).
    pub fn info(&self, commands: &[&str], out: &mut Vec<u8>) {
        for command in commands {
            let value = self.info_value(command);
            put_answer(out, command, &value);
        }
    }

    fn info_value(&self, command: &str) -> String {
        if let Some(cluster) = &self.cluster
            && let Some(value) = self.cluster_info(cluster, command)
        {
            return value;
        }
        let port = self.config.listen.port();
        let nss = &self.namespace_order;
        match command_name(command) {
            "node" => self.node_id.clone(),
            "build" => BUILD.into(),
            "version" => format!("Peregrine {} (Aerospike wire protocol, build {BUILD})", env!("CARGO_PKG_VERSION")),
            "edition" => "Peregrine".into(),
            "status" => "ok".into(),
            "partition-generation" | "peers-generation" | "rebalance-generation" => "1".into(),
            "peers-clear-std" | "peers-clear-alt" | "peers-tls-std" | "peers-tls-alt" | "alumni-clear-std"
            | "alumni-tls-std" => format!("1,{port},[]"),
            "service" | "service-clear-std" | "service-clear-alt" => self.service.clone(),
            "service-tls-std" | "service-tls-alt" | "services" | "services-alternate" | "services-alumni" => String::new(),
            "cluster-name" => self.config.cluster_name.clone().unwrap_or_else(|| "null".into()),
            "cluster-stable" => "1".into(),
            "partitions" => "4096".into(),
            "replicas" => nss.iter().map(|n| format!("{n}:0,1,{}", self.all_partitions_b64)).collect::<Vec<_>>().join(";"),
            "replicas-all" => nss.iter().map(|n| format!("{n}:1,{}", self.all_partitions_b64)).collect::<Vec<_>>().join(";"),
            "replicas-master" => nss.iter().map(|n| format!("{n}:{}", self.all_partitions_b64)).collect::<Vec<_>>().join(";"),
            "rack-ids" => nss.iter().map(|n| format!("{n}:0")).collect::<Vec<_>>().join(";"),
            "namespaces" => nss.join(";"),
            "namespace" => self.namespace_info(command.split_once('/').map_or("", |(_, ns)| ns)),
            "sets" => self.sets_info(command.split_once('/').map_or("", |(_, ns)| ns)),
            "features" => "batch-any;batch-index;blob-bits;float;peers;pipelining;pquery;pscans;replicas;replicas-all;replicas-master".into(),
            "user-agent-set" => "ok".into(),
            "statistics" => self.statistics(),
            _ => "ERROR:4:unrecognized command".into(),
        }
    }

    /// The answers that differ in a cluster (`None`: as for a node alone).
    fn cluster_info(&self, cluster: &Cluster, command: &str) -> Option<String> {
        let port = self.config.listen.port();
        let nss = &self.namespace_order;
        Some(match command_name(command) {
            "partition-generation" => cluster.partition_generation().to_string(),
            "peers-generation" => cluster.peers_generation().to_string(),
            "peers-clear-std" | "peers-clear-alt" => {
                let peers: Vec<String> = cluster
                    .peers()
                    .into_iter()
                    .map(|(id, service)| format!("[{},,[{service}]]", node_name(id)))
                    .collect();
                format!("{},{port},[{}]", cluster.peers_generation(), peers.join(","))
            }
            "peers-tls-std" | "peers-tls-alt" | "alumni-clear-std" | "alumni-tls-std" => {
                format!("{},{port},[]", cluster.peers_generation())
            }
            "cluster-stable" => u8::from(cluster.ready().is_some()).to_string(),
            "replicas" => nss
                .iter()
                .map(|n| {
                    let (regime, maps) = self.replica_maps(cluster, n);
                    let b64: Vec<String> = maps.iter().map(|m| base64(m)).collect();
                    format!("{n}:{regime},{},{}", maps.len(), b64.join(","))
                })
                .collect::<Vec<_>>()
                .join(";"),
            "replicas-all" => nss
                .iter()
                .map(|n| {
                    let (_, maps) = self.replica_maps(cluster, n);
                    let b64: Vec<String> = maps.iter().map(|m| base64(m)).collect();
                    format!("{n}:{},{}", maps.len(), b64.join(","))
                })
                .collect::<Vec<_>>()
                .join(";"),
            "replicas-master" => nss
                .iter()
                .map(|n| format!("{n}:{}", base64(&self.replica_maps(cluster, n).1[0])))
                .collect::<Vec<_>>()
                .join(";"),
            _ => return None,
        })
    }

    /// The regime and the partition bitmaps (512 bytes each) this node claims for namespace
    /// `ns`: index 0 the partitions it leads, index k the partitions where it is the k-th
    /// follower in placement order. The regime (never 0: strong consistency) is the highest
    /// Raft term among its groups, so it rises with every election it sees.
    fn replica_maps(&self, cluster: &Cluster, ns: &str) -> (u64, Vec<[u8; 512]>) {
        let rf = cluster.config.replication_factor.max(1);
        let mut maps = vec![[0u8; 512]; rf];
        let Some(ready) = cluster.ready() else { return (1, maps) };
        let Some(n) = ready.namespaces.get(ns) else { return (1, maps) };
        let me = cluster.node_id;
        let mut regime = 1u64;
        for g in n.replicas.groups() {
            let p = usize::from(g.partition().get());
            let (leader, term) = g.leader_and_term();
            regime = regime.max(term);
            let bit = 0x80u8 >> (p & 7);
            if leader == Some(me) {
                maps[0][p >> 3] |= bit;
            } else if let Some(leader) = leader {
                let followers = ready.placement.replicas(g.partition()).into_iter().filter(|&r| r != leader);
                if let Some(k) = followers.enumerate().find(|(_, r)| *r == me).map(|(k, _)| k + 1)
                    && k < rf
                {
                    maps[k][p >> 3] |= bit;
                }
            }
        }
        (regime.min(u64::from(u32::MAX)), maps)
    }

    /// Cluster lines of `namespace/<ns>`.
    fn namespace_cluster_info(&self, cluster: &Cluster, ns: &str, out: &mut Vec<String>) {
        let rf = cluster.config.replication_factor;
        out.push(format!("replication-factor={rf}"));
        out.push("strong-consistency=true".into());
        let Some(ready) = cluster.ready() else {
            out.push("effective_replication_factor=0".into());
            return;
        };
        let up =
            1 + ready.members.keys().filter(|&&id| id != cluster.node_id && cluster.fabric.is_connected(id)).count();
        out.push(format!("effective_replication_factor={}", rf.min(up)));
        let Some(n) = ready.namespaces.get(ns) else { return };
        let engine = n.replicas.engine();
        let (mut master, mut prole) = (0usize, 0usize);
        for g in n.replicas.groups() {
            let count = engine.index().read(g.partition()).len();
            if g.leader() == Some(cluster.node_id) { master += count } else { prole += count }
        }
        let roles = n.replicas.role_counts();
        out.push(format!("master_objects={master}"));
        out.push(format!("prole_objects={prole}"));
        out.push(format!("partitions_led={}", roles.leaders));
        out.push(format!("partitions_followed={}", roles.followers));
        out.push(format!("partitions_leaderless={}", roles.leaderless));
        out.push(format!("partitions_lagging={}", roles.lagging));
        out.push(format!("partitions_asleep={}", n.replicas.asleep()));
    }

    fn namespace_info(&self, ns: &str) -> String {
        let Some(engine) = self.namespaces.get(ns) else { return format!("ERROR:20:namespace {ns} not found") };
        let s = engine.stats();
        let c = engine.config();
        let total: u64 = s.devices.iter().map(|d| d.blocks_total * u64::from(d.block_bytes)).sum();
        let free: u64 = s.devices.iter().map(|d| d.blocks.free * u64::from(d.block_bytes)).sum();
        let live: u64 = s.devices.iter().map(|d| d.blocks.live_bytes).sum();
        let avail_pct = (free * 100).checked_div(total).unwrap_or(0);
        let mut lines = vec![];
        match &self.cluster {
            Some(cluster) => self.namespace_cluster_info(cluster, ns, &mut lines),
            None => lines.push("replication-factor=1".into()),
        }
        lines.extend([
            format!("objects={}", s.records),
            format!("tombstones={}", s.tombstones),
            format!("index_used_bytes={}", s.index_bytes),
            format!("default-ttl={}", c.default_ttl_s),
            format!("max-record-size={}", c.effective_max_record_bytes()),
            format!("write-block-size={}", c.write_block_bytes),
            format!("commit-to-device={}", c.commit_to_device),
            format!("device_total_bytes={total}"),
            format!("device_used_bytes={live}"),
            format!("device_available_pct={avail_pct}"),
            format!("device_reads={}", s.device_reads),
            format!("corruption_errors={}", s.corruption_errors),
            format!("stop_writes={}", s.stop_writes),
            format!("expired_objects={}", s.expired),
            format!("evicted_objects={}", s.evicted),
            format!("tombstones_dropped={}", s.tombstones_dropped),
            format!("defrag_blocks={}", s.devices.iter().map(|d| d.defrag_blocks).sum::<u64>()),
            format!("defrag_records_moved={}", s.devices.iter().map(|d| d.defrag_records_moved).sum::<u64>()),
            format!("client_write_bytes={}", s.devices.iter().map(|d| d.write_bytes).sum::<u64>()),
            format!("defrag_write_bytes={}", s.devices.iter().map(|d| d.defrag_device_write_bytes).sum::<u64>()),
            format!("io_backend={}", engine.io_backend()),
        ]);
        lines.join(";")
    }

    fn sets_info(&self, ns: &str) -> String {
        let Some(engine) = self.namespaces.get(ns) else { return format!("ERROR:20:namespace {ns} not found") };
        engine
            .sets()
            .iter()
            .map(|(_, name)| format!("ns={ns}:set={}", String::from_utf8_lossy(name)))
            .collect::<Vec<_>>()
            .join(";")
    }

    fn statistics(&self) -> String {
        use std::sync::atomic::Ordering;
        let m = &self.metrics;
        let objects: u64 = self.namespaces.values().map(|e| e.stats().records).sum();
        let mut lines = match &self.cluster {
            None => vec!["cluster_size=1".to_string(), "cluster_integrity=true".into()],
            Some(c) => {
                let f = c.fabric.stats();
                let peers = c.peers().len();
                vec![
                    format!("cluster_size={}", 1 + peers),
                    format!("cluster_integrity={}", c.ready().is_some_and(|r| r.members.len() == 1 + peers)),
                    format!("fabric_connections_made={}", f.connections),
                    format!("fabric_bad_connections={}", f.bad_connections),
                    format!("snapshots_sent={}", f.snapshots_sent),
                    format!("snapshots_received={}", f.snapshots_received),
                    format!("snapshots_active={}", f.snapshots_active),
                    format!("proxied_out={}", f.proxied_out),
                    format!("proxied_in={}", f.proxied_in),
                ]
            }
        };
        lines.extend([
            format!("objects={objects}"),
            format!("client_connections={}", m.connections_open.load(Ordering::Relaxed)),
            format!("client_connections_opened={}", m.connections_accepted.load(Ordering::Relaxed)),
            format!("request_buffer_bytes={}", m.request_buffer_bytes()),
        ]);
        lines.join(";")
    }
}

/// A stable node id from the listen address and data directory (uppercase hex, ≤ 16 chars).
fn derived_node_id(config: &ServerConfig) -> String {
    let seed = format!("{}|{}", config.listen, config.data_dir.display());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    format!("{:X}", h | (1 << 60))
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"M"), "TQ==");
        assert_eq!(base64(&[0xFF; 512]).len(), 684);
    }

    #[test]
    fn node_ids_are_stable_hex() {
        let c = ServerConfig::default();
        let a = derived_node_id(&c);
        assert_eq!(a, derived_node_id(&c));
        assert!(u64::from_str_radix(&a, 16).is_ok() && a.len() <= 16);
    }
}
