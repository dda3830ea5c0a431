//! Real `peregrine` processes forming one cluster on loopback, for tests: configs written by
//! the server's own `local_cluster` module, nodes started, killed (SIGKILL), stopped (SIGTERM)
//! and restarted by pid, readiness read from the nodes' `replicas` answers.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use peregrine_server::local_cluster::{self, LocalCluster, NodePorts};

/// A cluster of node processes.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub lc: LocalCluster,
    pub ports: Vec<NodePorts>,
    configs: Vec<PathBuf>,
    pub nodes: Vec<Option<Child>>,
}

/// The `peregrine` the nodes run: `PEREGRINE_NODE_BIN` when set (`.ci/run` builds a release
/// binary: 3 processes of 4096 Raft groups each are too slow unoptimized on 2 cores), else
/// this build's own.
fn node_binary() -> PathBuf {
    match std::env::var_os("PEREGRINE_NODE_BIN") {
        // Relative to the workspace root, where `cargo test` is run from (tests run in `server/`).
        Some(p) => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_peregrine")),
    }
}

/// A base port from which the 3 ports of each of `n` nodes are free now.
fn free_base(n: usize) -> u16 {
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for attempt in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_mul(7919) + attempt * 4099) % 3_000) as u16 * 10;
        let all_free =
            (0..n).all(|i| (0..3).all(|k| TcpListener::bind(("127.0.0.1", base + 10 * i as u16 + k)).is_ok()));
        if all_free {
            return base;
        }
    }
    panic!("no free port range");
}

impl TestCluster {
    /// Starts `n` nodes (each `[cluster]` table gets `extra`) and waits until every partition
    /// has a leader.
    pub fn start(n: usize, extra: &str) -> TestCluster {
        let dir = tempfile::Builder::new().prefix("peregrine-cluster-").tempdir_in("/var/tmp").unwrap();
        let lc = LocalCluster {
            nodes: n,
            data_dir: dir.path().to_owned(),
            base_port: free_base(n),
            binary: node_binary(),
            extra_cluster_config: extra.to_owned(),
        };
        let ports = lc.ports().unwrap();
        let configs: Vec<PathBuf> = ports.iter().map(|p| lc.write_config(&ports, p).unwrap()).collect();
        let mut c = TestCluster { dir, lc, ports, configs, nodes: Vec::new() };
        for i in 0..n {
            let child = c.spawn(i);
            c.nodes.push(Some(child));
        }
        let started = Instant::now();
        c.wait_ready(Duration::from_secs(180));
        println!("test cluster of {n} nodes ready {:?} after the start", started.elapsed());
        c
    }

    fn spawn(&self, i: usize) -> Child {
        let log = self.log_path(i);
        // Append across restarts: the log of a killed run stays readable.
        let previous = std::fs::read(&log).unwrap_or_default();
        let child = local_cluster::spawn_node(&self.lc.binary, &self.configs[i], &log).unwrap();
        if !previous.is_empty() {
            let _ = std::fs::write(self.dir.path().join(format!("node-{}.previous.log", i + 1)), previous);
        }
        child
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}.log", i + 1))
    }

    /// Every node's log (for failure messages), the tail of each.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.ports.len() {
            let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- node {} (last 40 lines)\n", i + 1));
            for l in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Client addresses of the nodes running now.
    pub fn live_clients(&self) -> Vec<SocketAddr> {
        self.ports.iter().zip(&self.nodes).filter(|(_, n)| n.is_some()).map(|(p, _)| p.client).collect()
    }

    /// Client addresses of every node.
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.ports.iter().map(|p| p.client).collect()
    }

    /// Waits until the running nodes lead every partition between them.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            for (i, n) in self.nodes.iter_mut().enumerate() {
                if let Some(child) = n
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!("node {} exited with {status}\n{}", i + 1, self.logs_now());
                }
            }
            if local_cluster::masters_covered(&self.live_clients()) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the cluster did not get a leader for every partition\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs_now(&self) -> String {
        self.logs()
    }

    /// SIGKILL node `i` (0-based).
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i].take().expect("node running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM node `i` and wait for it to exit.
    pub fn terminate(&mut self, i: usize) -> ExitStatus {
        let mut child = self.nodes[i].take().expect("node running");
        // SAFETY: a signal to our own child, by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "node {} ignored SIGTERM", i + 1);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `i` again with its config and data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {} still runs", i + 1);
        self.nodes[i] = Some(self.spawn(i));
    }

    /// One info value of node `i`.
    pub fn info(&self, i: usize, command: &str) -> Option<String> {
        local_cluster::info(self.ports[i].client, command)
    }

    /// `key=value` of node `i`'s `namespace/test`.
    pub fn ns_stat(&self, i: usize, key: &str) -> Option<u64> {
        let text = self.info(i, "namespace/test")?;
        text.split(';').find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok())
    }

    /// The node (0-based) whose `replicas` claims the mastership of partition `pid`.
    pub fn leader_of(&self, pid: u16) -> Option<usize> {
        (0..self.ports.len()).filter(|&i| self.nodes[i].is_some()).find(|&i| {
            let Some(replicas) = self.info(i, "replicas") else { return false };
            let Some(master) = replicas.split_once(':').and_then(|(_, r)| r.split(',').nth(2)) else { return false };
            let Some(bits) = local_cluster::decode_base64(master) else { return false };
            bits.get(usize::from(pid >> 3)).is_some_and(|b| b & (0x80 >> (pid & 7)) != 0)
        })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Keep the nodes' data and full logs of a failed test for a post-mortem (no second
        // panic while unwinding: without a placeholder dir the data is simply removed).
        if std::thread::panicking()
            && let Ok(placeholder) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.dir, placeholder).keep();
            eprintln!("test cluster kept for inspection at {}", kept.display());
        }
    }
}
