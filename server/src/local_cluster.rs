//! `peregrine local-cluster`: N real node processes of one cluster on loopback, for trying the
//! cluster out and for tests. It writes each node's configuration (client port
//! `base + 10 i`, fabric port +1, metrics port +2, data under `<dir>/node-<id>`), starts the
//! processes (logs in `<dir>/node-<id>.log`), waits until every partition of every node's
//! namespaces has a leader, prints how to connect, and stops them all (SIGTERM, so each hands
//! its leaderships over and flushes) on Ctrl-C or SIGTERM. A node that exits on its own stops
//! the rest and makes the command fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peregrine_proto::ProtoHeader;
use peregrine_proto::consts::msg_type;

/// How long the nodes get to elect a leader for every partition.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long stopped nodes get to exit before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Port distance between two nodes.
const PORT_STRIDE: u16 = 10;

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    /// Number of nodes.
    pub nodes: usize,
    /// Where configs, data and logs go.
    pub data_dir: PathBuf,
    /// Client port of the first node.
    pub base_port: u16,
    /// The `peregrine` binary to run.
    pub binary: PathBuf,
    /// Lines appended to every node's `[cluster]` table (tests: smaller log limits).
    pub extra_cluster_config: String,
}

/// One node's addresses.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    /// Node id (1-based).
    pub id: u64,
    /// Client address.
    pub client: SocketAddr,
    /// Fabric address.
    pub fabric: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
}

impl LocalCluster {
    /// The addresses of every node.
    pub fn ports(&self) -> Result<Vec<NodePorts>, String> {
        (0..self.nodes)
            .map(|i| {
                let offset = u16::try_from(i).ok().and_then(|i| i.checked_mul(PORT_STRIDE));
                let port = offset
                    .and_then(|o| self.base_port.checked_add(o))
                    .filter(|p| p.checked_add(2).is_some())
                    .ok_or_else(|| format!("--base-port {} leaves no room for {} nodes", self.base_port, self.nodes))?;
                let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
                Ok(NodePorts { id: i as u64 + 1, client: at(port), fabric: at(port + 1), metrics: at(port + 2) })
            })
            .collect()
    }

    /// Writes node `n`'s configuration file; returns its path.
    pub fn write_config(&self, all: &[NodePorts], n: &NodePorts) -> Result<PathBuf, String> {
        let seeds: Vec<String> = all.iter().map(|p| format!("\"{}\"", p.fabric)).collect();
        let dir = self.data_dir.join(format!("node-{}", n.id));
        let text = format!(
            "# Written by `peregrine local-cluster`.\n[server]\nlisten = \"{}\"\ndata_dir = \"{}\"\nmetrics_listen = \"{}\"\npin_io_threads = false\n\n[cluster]\nnode_id = {}\nfabric_listen = \"{}\"\nseeds = [{}]\nreplication_factor = {}\n{}\n",
            n.client,
            dir.display(),
            n.metrics,
            n.id,
            n.fabric,
            seeds.join(", "),
            all.len().min(3),
            self.extra_cluster_config,
        );
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = self.data_dir.join(format!("node-{}.toml", n.id));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }

    /// Starts the nodes, waits until they are ready, then until `stop` resolves (or a node
    /// exits), and stops them.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
        if self.nodes == 0 {
            return Err("--nodes must be at least 1".into());
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| format!("creating {}: {e}", self.data_dir.display()))?;
        let ports = self.ports()?;
        let mut children: Vec<(u64, Child)> = Vec::new();
        for n in &ports {
            let config = self.write_config(&ports, n)?;
            match spawn_node(&self.binary, &config, &self.data_dir.join(format!("node-{}.log", n.id))) {
                Ok(child) => children.push((n.id, child)),
                Err(e) => {
                    stop_all(&mut children);
                    return Err(e);
                }
            }
        }
        let started = Instant::now();
        let clients: Vec<SocketAddr> = ports.iter().map(|p| p.client).collect();
        let mut stop = std::pin::pin!(stop);
        let wait_ready = async {
            loop {
                if let Some(id) = exited(&mut children) {
                    return Err(format!(
                        "node {id} exited during start; see {}/node-{id}.log",
                        self.data_dir.display()
                    ));
                }
                let c = clients.clone();
                if tokio::task::spawn_blocking(move || masters_covered(&c)).await.unwrap_or(false) {
                    return Ok(true);
                }
                if started.elapsed() > READY_TIMEOUT {
                    return Err(format!("the partitions did not all get a leader within {READY_TIMEOUT:?}"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        let ready = tokio::select! {
            r = wait_ready => r,
            () = &mut stop => Ok(false),
        };
        match ready {
            Ok(true) => {}
            Ok(false) => {
                stop_all(&mut children);
                return Ok(());
            }
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
        let hosts: Vec<String> = clients.iter().map(|c| format!("(\"{}\", {})", c.ip(), c.port())).collect();
        println!("peregrine local-cluster: {} nodes ready in {:.1} s", ports.len(), started.elapsed().as_secs_f64());
        for p in &ports {
            println!(
                "  node {}: clients {}, fabric {}, metrics http://{}/metrics",
                p.id, p.client, p.fabric, p.metrics
            );
        }
        println!("  data, configs and logs under {}", self.data_dir.display());
        println!("connect with any Aerospike client, e.g. Python:");
        println!("  import aerospike");
        println!("  c = aerospike.client({{\"hosts\": [{}]}}).connect()", hosts.join(", "));
        println!("stop with Ctrl-C");
        let failed = loop {
            tokio::select! {
                () = &mut stop => break None,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    if let Some(id) = exited(&mut children) {
                        break Some(id);
                    }
                }
            }
        };
        stop_all(&mut children);
        match failed {
            Some(id) => Err(format!("node {id} exited; see {}/node-{id}.log", self.data_dir.display())),
            None => Ok(()),
        }
    }
}

/// Starts one node process with `config`, its output to `log`.
pub fn spawn_node(binary: &Path, config: &Path, log: &Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))
}

/// The first node that has exited, if any.
fn exited(children: &mut [(u64, Child)]) -> Option<u64> {
    children.iter_mut().find_map(|(id, c)| matches!(c.try_wait(), Ok(Some(_))).then_some(*id))
}

/// SIGTERM to every node still running, then waits; kills the ones that do not exit in time.
fn stop_all(children: &mut Vec<(u64, Child)>) {
    for (_, c) in children.iter_mut() {
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on a pid this process started and has not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for (id, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("node {id} did not stop in time: killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    children.clear();
}

/// One info command on a node (blocking, short timeouts).
pub fn info(addr: SocketAddr, command: &str) -> Option<String> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let body = format!("{command}\n");
    s.write_all(&ProtoHeader::encode(msg_type::INFO, body.len() as u64)).ok()?;
    s.write_all(body.as_bytes()).ok()?;
    let mut header = [0u8; 8];
    s.read_exact(&mut header).ok()?;
    let size = usize::try_from(u64::from_be_bytes(header) & 0xFFFF_FFFF_FFFF).ok()?;
    if size > 16 << 20 {
        return None;
    }
    let mut answer = vec![0u8; size];
    s.read_exact(&mut answer).ok()?;
    let text = String::from_utf8(answer).ok()?;
    let line = text.lines().next()?;
    line.split_once('\t').map(|(_, v)| v.to_owned())
}

/// Whether the nodes' `replicas` master bitmaps together cover every partition of every
/// namespace.
pub fn masters_covered(clients: &[SocketAddr]) -> bool {
    let mut union: std::collections::BTreeMap<String, Vec<u8>> = std::collections::BTreeMap::new();
    for &c in clients {
        let Some(replicas) = info(c, "replicas") else { return false };
        for ns in replicas.split(';').filter(|s| !s.is_empty()) {
            let Some((name, rest)) = ns.split_once(':') else { return false };
            let Some(master) = rest.split(',').nth(2).and_then(decode_base64) else { return false };
            let u = union.entry(name.to_owned()).or_insert_with(|| vec![0; 512]);
            for (a, b) in u.iter_mut().zip(master) {
                *a |= b;
            }
        }
    }
    !union.is_empty() && union.values().all(|m| m.iter().all(|&b| b == 0xFF))
}

/// Standard base64 with padding (`None` on a bad character).
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let take = chunk.len().saturating_sub(1);
        for i in 0..take {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn base64_decodes_what_the_node_encodes() {
        for len in [0usize, 1, 2, 3, 4, 512] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            assert_eq!(decode_base64(&crate::node::base64(&bytes)).unwrap(), bytes);
        }
        assert_eq!(decode_base64("a$"), None);
    }

    #[test]
    fn ports_follow_the_stride_and_configs_parse() {
        let dir = tempfile::tempdir().unwrap();
        let lc = LocalCluster {
            nodes: 3,
            data_dir: dir.path().to_owned(),
            base_port: 3000,
            binary: "x".into(),
            extra_cluster_config: String::new(),
        };
        let ports = lc.ports().unwrap();
        assert_eq!(ports[2].client.port(), 3020);
        assert_eq!(ports[2].fabric.port(), 3021);
        let path = lc.write_config(&ports, &ports[1]).unwrap();
        let config = crate::config::Config::load(&path).unwrap();
        let c = config.cluster.unwrap();
        assert_eq!((c.node_id, c.seeds.len(), c.replication_factor), (2, 3, 3));
        let tight = LocalCluster { base_port: 65530, ..lc };
        assert!(tight.ports().is_err());
    }
}
