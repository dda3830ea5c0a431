//! `peregrine-bench replicated`: an in-process 3-node cluster (issue 10's benchmark). Three
//! [`ReplicaNode`]s, each with its own file-backed engine (external maintenance) and its own
//! shared Raft log (default options) under `--dir`, over the loopback transport, with the
//! production Raft timers (1 s heartbeat, 3 s election) and every node's background loop.
//!
//! It measures, in this order, on one cluster instance:
//! 1. the time from the first node's open to every partition group having a ready leader;
//! 2. for each `--in-flight` level, that many tasks writing a uniform random key's value
//!    (a `Change::Put` through the key's partition leader, retrying "not leader"/"not ready"):
//!    writes/s, latency percentiles, the logs' fsyncs/s and entries per fsync (group commit
//!    across groups), log bytes per record, and the process CPU per write;
//! 3. idle: writes stop; with hibernation on it waits for every replica to sleep (off: the
//!    same idle time); then process CPU (getrusage, user + sys, in cores), the busiest threads,
//!    Raft messages and log fsyncs per second over `--idle` seconds, and RSS at the end.
//!
//! `--hibernation both` runs two separate cluster instances, on then off, each in its own
//! child process (this binary, `--json`), so the second RSS figure does not inherit the first
//! instance's heap. `--fio` adds the device's fdatasync rate measured by fio in the same
//! sitting, before and after (the jobs of `peers/fio.sh` (g)), so writes/s and fsyncs/s can be
//! given as ratios of it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use peregrine_engine::io::{IoBackendChoice, IoOptions};
use peregrine_engine::{Change, Digest, Engine, EngineConfig, KeyRef, MaintenanceMode, PartitionId};
use peregrine_index::PARTITION_COUNT;
use peregrine_replication::group::WriteError;
use peregrine_replication::hibernate::SleepConfig;
use peregrine_replication::log::{LogOptions, LogStats, SharedLog};
use peregrine_replication::loopback::{Loopback, MessageCounts};
use peregrine_replication::node::{NodeOptions, RaftTimers, ReplicaNode};
use peregrine_replication::placement::Placement;
use peregrine_replication::state_machine::SmOptions;
use peregrine_replication::types::TypeConfig;
use serde_json::{Value, json};

use crate::cli::{SizeRange, parse_size};
use crate::physical::cpu_busy_pct;
use crate::report::{Interval, percentiles};
use crate::workload::{Rng, make_bins};

/// Node ids of the cluster.
const NODES: [u64; 3] = [1, 2, 3];
/// Set name of the written records.
const SET: &[u8] = b"bench";
/// The longest wait for every group to have a ready leader.
const LEADERS_WAIT_MAX: Duration = Duration::from_secs(600);
/// The longest wait for every replica to sleep before the idle window (hibernation on).
const SLEEP_WAIT_MAX: Duration = Duration::from_secs(180);
/// A write that found no ready leader for this long is given up (counted as abandoned).
const RETRY_FOR: Duration = Duration::from_secs(30);
/// Pause before looking for a leader again after "not ready" or "no leader known".
const RETRY_PAUSE: Duration = Duration::from_millis(5);
/// How long a write waits for its proposal to be applied (the node runtime's default).
const PROPOSAL_TIMEOUT: Duration = peregrine_replication::group::PROPOSAL_TIMEOUT_DEFAULT;

/// Hibernation of the cluster's idle groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Hibernation {
    /// Idle groups sleep (default `SleepConfig`: 10 s without activity).
    On,
    /// Every group's timers always run.
    Off,
    /// Two cluster instances, on then off, each in its own process.
    Both,
}

/// Flags of `peregrine-bench replicated`.
#[derive(Args, Debug, Clone)]
pub struct ReplicatedArgs {
    /// Working directory (wiped at the start, removed at the end).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/peregrine-bench-repl")]
    pub dir: PathBuf,
    /// Partition groups (partitions 0..N; keys are mapped onto them).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub partitions: u16,
    /// Writes in flight, one measured phase per level.
    #[arg(long, value_name = "N[,N...]", value_delimiter = ',', default_value = "32,256")]
    pub in_flight: Vec<u32>,
    /// Seconds per in-flight level.
    #[arg(long, value_name = "SECS", default_value_t = 20.0)]
    pub duration: f64,
    /// Value size in bytes (one blob bin).
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "1024")]
    pub value_bytes: u64,
    /// Key space: integer keys 0..N, chosen uniformly.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub keys: u64,
    /// Hibernation of idle groups (for the idle measurement).
    #[arg(long, value_enum, default_value = "on")]
    pub hibernation: Hibernation,
    /// Idle window in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20.0)]
    pub idle: f64,
    /// Size of each node's engine file.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "2G")]
    pub device_size: u64,
    /// I/O backend of the engines and logs: uring, blocking or auto.
    #[arg(long, value_name = "BACKEND", default_value = "uring")]
    pub io_backend: String,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Measure the device's fdatasync rate with fio (before and after) for ratios.
    #[arg(long)]
    pub fio: bool,
    /// No per-second progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Print the results as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

impl ReplicatedArgs {
    fn validate(&self) -> Result<(), String> {
        if self.partitions == 0 || usize::from(self.partitions) > PARTITION_COUNT {
            return Err(format!("--partitions must be 1 to {}", PARTITION_COUNT));
        }
        if self.in_flight.contains(&0) {
            return Err("--in-flight levels must be at least 1".into());
        }
        if !(self.duration > 0.0 && self.idle > 0.0) {
            return Err("--duration and --idle must be positive".into());
        }
        if !(16..=1 << 20).contains(&self.value_bytes) {
            return Err("--value-bytes must be 16 B to 1 MiB".into());
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        self.backend().map(|_| ())
    }

    fn backend(&self) -> Result<IoBackendChoice, String> {
        match self.io_backend.as_str() {
            "uring" => Ok(IoBackendChoice::Uring),
            "blocking" => Ok(IoBackendChoice::Blocking),
            "auto" => Ok(IoBackendChoice::Auto),
            other => Err(format!("--io-backend {other}: use uring, blocking or auto")),
        }
    }

    fn size(&self) -> SizeRange {
        let n = self.value_bytes as usize; // validated: at most 1 MiB
        SizeRange { min: n, max: n }
    }
}

/// Runs the benchmark; returns its results (also printed).
pub fn replicated(args: ReplicatedArgs) -> Result<Value, String> {
    args.validate()?;
    let fio_before = if args.fio { Some(fio_fsync(&args.dir)?) } else { None };
    let instances: Vec<Value> = match args.hibernation {
        Hibernation::Both => {
            let mut out = Vec::new();
            for mode in [Hibernation::On, Hibernation::Off] {
                out.push(child_instance(&args, mode)?);
            }
            out
        }
        mode => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting tokio: {e}"))?;
            let result = rt.block_on(instance(&args, mode == Hibernation::On));
            drop(rt);
            let _ = std::fs::remove_dir_all(&args.dir);
            let v = result?;
            print_instance(&v);
            vec![v]
        }
    };
    let fio_after = if args.fio { Some(fio_fsync(&args.dir)?) } else { None };
    if args.fio {
        let _ = std::fs::remove_dir_all(&args.dir);
    }
    let fio = match (fio_before, fio_after) {
        (Some(b), Some(a)) => Some(json!({"before": b, "after": a})),
        _ => None,
    };
    let result = json!({ "instances": instances, "fio": fio });
    if !args.json {
        for line in summary_lines(&result) {
            println!("{line}");
        }
    }
    Ok(result)
}

/// One instance in a child process of this binary (`--json`); its tables go to our stderr.
fn child_instance(args: &ReplicatedArgs, mode: Hibernation) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let levels: Vec<String> = args.in_flight.iter().map(u32::to_string).collect();
    let mut cmd = Command::new(exe);
    cmd.arg("replicated")
        .arg("--dir")
        .arg(&args.dir)
        .args(["--partitions", &args.partitions.to_string()])
        .args(["--in-flight", &levels.join(",")])
        .args(["--duration", &args.duration.to_string()])
        .args(["--value-bytes", &args.value_bytes.to_string()])
        .args(["--keys", &args.keys.to_string()])
        .args(["--hibernation", if mode == Hibernation::On { "on" } else { "off" }])
        .args(["--idle", &args.idle.to_string()])
        .args(["--device-size", &args.device_size.to_string()])
        .args(["--io-backend", &args.io_backend])
        .args(["--seed", &args.seed.to_string()])
        .arg("--json")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    if args.quiet {
        cmd.arg("--quiet");
    }
    let out = cmd.output().map_err(|e| format!("starting the hibernation-{mode:?} instance: {e}"))?;
    if !out.status.success() {
        return Err(format!("the hibernation-{mode:?} instance failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.starts_with('{')).ok_or("the instance printed no JSON")?;
    let v: Value = serde_json::from_str(last).map_err(|e| format!("the instance's JSON: {e}"))?;
    v.get("instances").and_then(|i| i.get(0)).cloned().ok_or_else(|| "the instance's JSON has no result".to_string())
}

/// The running cluster.
struct Cluster {
    loopback: Loopback,
    nodes: Vec<ReplicaNode>,
    background: Vec<tokio::task::JoinHandle<()>>,
    partitions: Vec<PartitionId>,
}

impl Cluster {
    fn led(&self) -> usize {
        self.partitions.iter().filter(|&&p| self.leader_index(p).is_some()).count()
    }

    /// Index in `nodes` of the ready leader of `pid`, if any.
    fn leader_index(&self, pid: PartitionId) -> Option<usize> {
        self.nodes.iter().position(|n| n.group(pid).is_some_and(|g| g.is_ready_leader()))
    }

    fn log_stats(&self) -> Vec<LogStats> {
        self.nodes.iter().map(|n| n.log().stats()).collect()
    }

    fn asleep(&self) -> usize {
        self.nodes.iter().map(ReplicaNode::asleep).sum()
    }

    /// Stops the three nodes together (one after the other would leave the survivors electing
    /// for minutes), then unregisters them and closes the engines. Every link is cut first, so
    /// messages between stopping groups fail in the transport instead of reaching stopped Rafts
    /// (which openraft reports as errors).
    async fn stop(self) -> Result<(), String> {
        let [a, b, c] = self.nodes.as_slice() else { return Err("the cluster has not 3 nodes".into()) };
        for id in NODES {
            self.loopback.set_down(id, true);
        }
        let (ra, rb, rc) = tokio::join!(a.shutdown(), b.shutdown(), c.shutdown());
        for (node, r) in [(a, ra), (b, rb), (c, rc)] {
            r.map_err(|e| format!("node {}: shutting down: {e}", node.id()))?;
        }
        for node in &self.nodes {
            self.loopback.unregister_node(node.id());
        }
        for b in self.background {
            let _ = b.await;
        }
        for node in &self.nodes {
            node.engine().close().map_err(|e| format!("node {}: closing its engine: {e}", node.id()))?;
        }
        Ok(())
    }
}

/// One cluster instance: start, write phases, idle; the directory is wiped first.
async fn instance(args: &ReplicatedArgs, hibernation: bool) -> Result<Value, String> {
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).map_err(|e| format!("wiping {}: {e}", args.dir.display()))?;
    }
    let busy_start = cpu_busy_pct(2.0);
    eprintln!("# machine CPU busy before: {busy_start:.0?} %");
    let rss_base = rss_kib();
    let start = open_cluster(args, hibernation).await?;
    let cluster = start.cluster;
    let rss_started = rss_kib();
    let mut levels = Vec::new();
    for &n in &args.in_flight {
        eprintln!("# {n} writes in flight, {} s", args.duration);
        levels.push(write_phase(&cluster, args, n).await);
    }
    let idle = idle_phase(&cluster, args, hibernation).await;
    let records: Vec<u64> = cluster.nodes.iter().map(|n| n.engine().stats().records).collect();
    let t = Instant::now();
    cluster.stop().await?;
    let stopped_s = t.elapsed().as_secs_f64();
    let busy_end = cpu_busy_pct(2.0);
    Ok(json!({
        "hibernation": hibernation,
        "partitions": args.partitions,
        "replicas": args.partitions as u64 * NODES.len() as u64,
        "value_bytes": args.value_bytes,
        "keys": args.keys,
        "engines_open_s": start.engines_s,
        "nodes_open_s": start.nodes_s,
        "bootstrap_s": start.bootstrap_s,
        "all_led_s": start.all_led_s,
        "leaders_per_node": start.leaders_per_node,
        "rss_base_kib": rss_base,
        "rss_started_kib": rss_started,
        "writes": levels,
        "idle": idle,
        "records_per_node": records,
        "shutdown_s": stopped_s,
        "busy_start_pct": busy_start,
        "busy_end_pct": busy_end,
    }))
}

struct Started {
    cluster: Cluster,
    engines_s: f64,
    nodes_s: f64,
    bootstrap_s: f64,
    all_led_s: f64,
    leaders_per_node: Vec<usize>,
}

async fn open_cluster(args: &ReplicatedArgs, hibernation: bool) -> Result<Started, String> {
    let backend = args.backend()?;
    let io = IoOptions { backend, ..IoOptions::default() };
    let partitions: Vec<PartitionId> = PartitionId::all().take(usize::from(args.partitions)).collect();
    let placement = Placement::new(&NODES, NODES.len()).map_err(|e| format!("placement: {e}"))?;
    let t = Instant::now();
    eprintln!(
        "# opening 3 engines ({} bytes each, created and zeroed on first use) under {}",
        args.device_size,
        args.dir.display()
    );
    let mut parts = Vec::new();
    for id in NODES {
        let dir = args.dir.join(format!("node{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut config = EngineConfig::single_file("bench", dir.join("engine.dat"), args.device_size);
        config.maintenance = MaintenanceMode::External;
        config.io = io.clone();
        let engine = Engine::open(config).map_err(|e| format!("node {id}: opening its engine: {e}"))?;
        let log_options = LogOptions { io: io.clone(), ..LogOptions::new(dir.join("raft-log")) };
        let (log, _) = SharedLog::<TypeConfig>::open(log_options)
            .map_err(|e| format!("node {id}: opening its shared log: {e}"))?;
        parts.push((id, dir, engine, log));
    }
    let engines_s = t.elapsed().as_secs_f64();

    // The clock of "start to every group led" starts here: engines and logs are open.
    let t0 = Instant::now();
    let loopback = Loopback::new();
    let timers = RaftTimers::default();
    let mut nodes = Vec::new();
    for (id, dir, engine, log) in parts {
        let options = NodeOptions {
            node_id: id,
            placement: placement.clone(),
            partitions: partitions.clone(),
            sm_dir: dir.join("sm"),
            sm: SmOptions::default(),
            timers,
            proposal_timeout: PROPOSAL_TIMEOUT,
            hibernation: hibernation.then(SleepConfig::default),
            peer_timeout: peer_timeout(),
        };
        let lb = loopback.clone();
        let node = ReplicaNode::open(options, engine, log, |pid| lb.factory(id, pid), lb.control())
            .await
            .map_err(|e| format!("node {id}: opening its groups: {e}"))?;
        loopback.register_node(&node);
        nodes.push(node);
    }
    let nodes_s = t0.elapsed().as_secs_f64();
    let background: Vec<_> =
        nodes.iter().map(|n| n.spawn_background(Duration::from_secs(1), Duration::from_secs(3600), false)).collect();
    let t1 = Instant::now();
    let (a, b, c) = tokio::join!(nodes[0].bootstrap(), nodes[1].bootstrap(), nodes[2].bootstrap());
    for r in [a, b, c] {
        r.map_err(|e| format!("bootstrap: {e}"))?;
    }
    let bootstrap_s = t1.elapsed().as_secs_f64();
    let cluster = Cluster { loopback, nodes, background, partitions };
    eprintln!(
        "# {} groups x 3 opened in {nodes_s:.1} s, bootstrapped in {bootstrap_s:.1} s; waiting for leaders",
        args.partitions
    );
    let want = cluster.partitions.len();
    loop {
        let led = cluster.led();
        if led == want {
            break;
        }
        if t0.elapsed() > LEADERS_WAIT_MAX {
            let _ = cluster.stop().await;
            return Err(format!("only {led} of {want} groups have a ready leader after {LEADERS_WAIT_MAX:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_led_s = t0.elapsed().as_secs_f64();
    let leaders_per_node = cluster.nodes.iter().map(ReplicaNode::ready_leaders).collect();
    Ok(Started { cluster, engines_s, nodes_s, bootstrap_s, all_led_s, leaders_per_node })
}

/// A peer not heard from for this long is reported down: the node runtime's default.
fn peer_timeout() -> Duration {
    peregrine_replication::liveness::PEER_TIMEOUT_DEFAULT
}

/// What one writer task counted since the last drain.
#[derive(Clone, Debug, Default)]
struct Tally {
    latency: Interval,
    not_leader: u64,
    not_ready: u64,
    refused: u64,
    in_doubt: u64,
    fatal: u64,
    abandoned: u64,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.latency.merge(&o.latency);
        self.not_leader += o.not_leader;
        self.not_ready += o.not_ready;
        self.refused += o.refused;
        self.in_doubt += o.in_doubt;
        self.fatal += o.fatal;
        self.abandoned += o.abandoned;
    }

    fn errors(&self) -> u64 {
        self.refused + self.in_doubt + self.fatal + self.abandoned
    }
}

struct Writers {
    nodes: Vec<ReplicaNode>,
    /// Per partition: the index in `nodes` of the replica believed to lead.
    leader_of: Vec<AtomicUsize>,
    partitions: u16,
    keys: u64,
    size: SizeRange,
    stop: AtomicBool,
    next_version: AtomicU64,
    first_fatal: Mutex<Option<String>>,
}

impl Writers {
    /// The digest of key `k`, moved into partitions 0..N when fewer than 4096 are in use.
    fn digest_of(&self, k: u64) -> Digest {
        let mut d = Digest::of_key(SET, KeyRef::Int(k as i64));
        if usize::from(self.partitions) < PARTITION_COUNT {
            let p = d.partition().get() % self.partitions;
            d.0[0] = (p & 0xFF) as u8;
            d.0[1] = (d.0[1] & 0xF0) | (p >> 8) as u8;
        }
        d
    }

    fn find_leader(&self, pid: PartitionId) -> Option<usize> {
        self.nodes.iter().position(|n| n.group(pid).is_some_and(|g| g.is_ready_leader()))
    }

    /// One write through the partition's leader, following "not leader" answers and waiting
    /// out "not ready"; records its latency (first attempt to applied) or what went wrong.
    async fn write_one(&self, rng: &mut Rng, tally: &Mutex<Tally>) {
        let k = rng.below(self.keys);
        let digest = self.digest_of(k);
        let pid = digest.partition();
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let change =
            Change::Put { set_name: SET.to_vec(), key: None, bins: make_bins(k, version, self.size, 1), void_time: 0 };
        let slot = &self.leader_of[pid.index()];
        let started = Instant::now();
        let count = |f: &dyn Fn(&mut Tally)| f(&mut tally.lock().unwrap_or_else(PoisonError::into_inner));
        loop {
            let index = slot.load(Ordering::Relaxed);
            let Some(group) = self.nodes.get(index).and_then(|n| n.group(pid)) else {
                count(&|t| t.fatal += 1);
                return;
            };
            let result = group.write(&digest, false, |_| Ok(change.clone())).await;
            match result {
                Ok(_) => {
                    count(&|t| t.latency.write(started.elapsed()));
                    return;
                }
                Err(WriteError::NotLeader { leader: Some(l) }) => {
                    count(&|t| t.not_leader += 1);
                    if let Some(i) = self.nodes.iter().position(|n| n.id() == l) {
                        slot.store(i, Ordering::Relaxed);
                    }
                }
                Err(WriteError::NotLeader { leader: None } | WriteError::NotReady) => {
                    count(&|t| t.not_ready += 1);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    if let Some(i) = self.find_leader(pid) {
                        slot.store(i, Ordering::Relaxed);
                    }
                }
                Err(WriteError::Refused(e)) => {
                    tracing::debug!(partition = pid.get(), "write refused: {e}");
                    count(&|t| t.refused += 1);
                    return;
                }
                Err(WriteError::InDoubt(m)) => {
                    tracing::debug!(partition = pid.get(), "write in doubt: {m}");
                    count(&|t| t.in_doubt += 1);
                    return;
                }
                Err(WriteError::Fatal(m)) => {
                    self.first_fatal.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(m);
                    count(&|t| t.fatal += 1);
                    return;
                }
            }
            if self.stop.load(Ordering::Relaxed) || started.elapsed() > RETRY_FOR {
                count(&|t| t.abandoned += 1);
                return;
            }
        }
    }
}

/// Process CPU time (user + system) so far.
fn process_cpu() -> Option<Duration> {
    // SAFETY: `rusage` is plain integers, so all-zero is a valid value; getrusage writes one
    // into the pointer, which is valid and properly sized for the call's duration.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    if rc != 0 {
        return None;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.clamp(0, 999_999) as u32) * 1000);
    Some(tv(u.ru_utime) + tv(u.ru_stime))
}

fn cpu_cores(before: Option<Duration>, after: Option<Duration>, wall: Duration) -> Option<f64> {
    Some(after?.saturating_sub(before?).as_secs_f64() / wall.as_secs_f64().max(1e-9))
}

/// Whole-machine CPU ticks so far: (all, idle + iowait), from the first line of /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    Some((v.iter().take(8).sum(), v.get(3)? + v.get(4)?))
}

/// CPUs the whole machine kept busy between two samples (all processes, ours included).
fn machine_busy_cores(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((t0, i0), (t1, i1)) = (before?, after?);
    let total = t1.saturating_sub(t0).max(1);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    Some(total.saturating_sub(i1.saturating_sub(i0)) as f64 / total as f64 * cpus)
}

/// CPUs other processes kept busy: the machine's busy CPUs minus ours (never below 0).
fn others_cores(machine: Option<f64>, ours: Option<f64>) -> Option<f64> {
    Some((machine? - ours?).max(0.0))
}

/// Resident set size of this process, KiB (VmRSS).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU ticks (user + system) per thread name, from /proc/self/task.
fn thread_ticks() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit() || c == '-').to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state is field 3, utime field 14, stime field 15.
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        *out.entry(name).or_insert(0) += ticks(11) + ticks(12);
    }
    out
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Sums of the log counters of every node, after minus before.
fn log_delta(before: &[LogStats], after: &[LogStats]) -> LogStats {
    let mut d = LogStats::default();
    for (b, a) in before.iter().zip(after) {
        d.fsyncs += a.fsyncs.saturating_sub(b.fsyncs);
        d.batches += a.batches.saturating_sub(b.batches);
        d.bytes += a.bytes.saturating_sub(b.bytes);
        d.entries += a.entries.saturating_sub(b.entries);
        d.items += a.items.saturating_sub(b.items);
        d.submissions += a.submissions.saturating_sub(b.submissions);
        d.rolls += a.rolls.saturating_sub(b.rolls);
    }
    d
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

async fn write_phase(cluster: &Cluster, args: &ReplicatedArgs, in_flight: u32) -> Value {
    let writers = Arc::new(Writers {
        nodes: cluster.nodes.clone(),
        leader_of: cluster
            .partitions
            .iter()
            .map(|&p| AtomicUsize::new(cluster.leader_index(p).unwrap_or(0)))
            .chain(std::iter::repeat_with(|| AtomicUsize::new(0)))
            .take(PARTITION_COUNT)
            .collect(),
        partitions: args.partitions,
        keys: args.keys,
        size: args.size(),
        stop: AtomicBool::new(false),
        next_version: AtomicU64::new(1),
        first_fatal: Mutex::new(None),
    });
    let logs_before = cluster.log_stats();
    let msgs_before = cluster.loopback.counts();
    let cpu_before = process_cpu();
    let machine_before = machine_ticks();
    let started = Instant::now();
    let mut recorders = Vec::new();
    let mut handles = Vec::new();
    for t in 0..u64::from(in_flight) {
        let tally = Arc::new(Mutex::new(Tally::default()));
        recorders.push(tally.clone());
        let w = writers.clone();
        let mut rng = Rng::new(args.seed ^ (t + 1).wrapping_mul(0x1234_5678_9ABC_DEF1) ^ (u64::from(in_flight) << 40));
        handles.push(tokio::spawn(async move {
            while !w.stop.load(Ordering::Relaxed) {
                w.write_one(&mut rng, &tally).await;
            }
        }));
    }
    let deadline = started + Duration::from_secs_f64(args.duration);
    let drain = |recorders: &[Arc<Mutex<Tally>>]| {
        let mut out = Tally::default();
        for r in recorders {
            out.merge(&std::mem::take(&mut *r.lock().unwrap_or_else(PoisonError::into_inner)));
        }
        out
    };
    let mut total = Tally::default();
    let mut last = started;
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let done = now >= deadline;
        if done {
            writers.stop.store(true, Ordering::SeqCst);
            for h in handles.drain(..) {
                let _ = h.await;
            }
        }
        let now = Instant::now();
        let iv = drain(&recorders);
        if !args.quiet {
            let [p50, p99, p999] = percentiles(&iv.latency.write);
            let secs = now.duration_since(last).as_secs_f64().max(1e-3);
            eprintln!(
                "{:6.1}s  writes/s {:>8.0}  write us p50 {:>6} p99 {:>6} p99.9 {:>6}  retries {}{}",
                now.duration_since(started).as_secs_f64(),
                iv.latency.write.len() as f64 / secs,
                p50,
                p99,
                p999,
                iv.not_leader + iv.not_ready,
                if iv.errors() > 0 { format!("  errors {}", iv.errors()) } else { String::new() }
            );
        }
        total.merge(&iv);
        last = now;
        if done {
            break;
        }
    }
    let elapsed = last.duration_since(started);
    let cpu = cpu_cores(cpu_before, process_cpu(), elapsed);
    let others = others_cores(machine_busy_cores(machine_before, machine_ticks()), cpu);
    let logs = log_delta(&logs_before, &cluster.log_stats());
    let msgs = cluster.loopback.counts();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let writes = total.latency.write.len();
    let [p50, p99, p999] = percentiles(&total.latency.write);
    let n = NODES.len() as f64;
    if let Some(m) = writers.first_fatal.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
        eprintln!("# a group stopped during the phase: {m}");
    }
    json!({
        "in_flight": in_flight,
        "elapsed_s": secs,
        "writes": writes,
        "writes_per_sec": writes as f64 / secs,
        "write_p50_us": p50, "write_p99_us": p99, "write_p999_us": p999,
        "write_max_us": total.latency.write.max(),
        "fsyncs_per_sec": logs.fsyncs as f64 / secs,
        "fsyncs_per_sec_per_node": logs.fsyncs as f64 / secs / n,
        "entries_per_fsync": ratio(logs.entries, logs.fsyncs),
        "items_per_fsync": ratio(logs.items, logs.fsyncs),
        "submissions_per_fsync": ratio(logs.submissions, logs.fsyncs),
        "log_bytes_per_record_per_node": ratio(logs.bytes, writes) / n,
        "log_bytes_per_record_cluster": ratio(logs.bytes, writes),
        "log_bytes_per_fsync": ratio(logs.bytes, logs.fsyncs),
        "log_entries_per_record_per_node": ratio(logs.entries, writes) / n,
        "log_items_per_record_per_node": ratio(logs.items, writes) / n,
        "fsyncs_per_record_per_node": ratio(logs.fsyncs, writes) / n,
        "append_messages_per_record": ratio(msgs.appends.saturating_sub(msgs_before.appends), writes),
        "cpu_cores": cpu,
        "cpu_us_per_write": cpu.map(|c| c * secs * 1e6 / (writes.max(1) as f64)),
        "other_processes_cores": others,
        "retries_not_leader": total.not_leader,
        "retries_not_ready": total.not_ready,
        "refused": total.refused,
        "in_doubt": total.in_doubt,
        "fatal": total.fatal,
        "abandoned": total.abandoned,
    })
}

fn per_sec(after: u64, before: u64, secs: f64) -> f64 {
    after.saturating_sub(before) as f64 / secs.max(1e-9)
}

async fn idle_phase(cluster: &Cluster, args: &ReplicatedArgs, hibernation: bool) -> Value {
    let quiet_since = Instant::now();
    let want = cluster.partitions.len() * NODES.len();
    let idle_after = SleepConfig::default().idle_after;
    let asleep_after_s = if hibernation {
        eprintln!("# idle: waiting for every replica to sleep (idle after {idle_after:?})");
        loop {
            let asleep = cluster.asleep();
            if asleep == want {
                break Some(quiet_since.elapsed().as_secs_f64());
            }
            if quiet_since.elapsed() > SLEEP_WAIT_MAX {
                eprintln!("# idle: only {asleep} of {want} replicas asleep after {SLEEP_WAIT_MAX:?}; measuring anyway");
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        // The same quiet time before the window as a hibernating group gets.
        tokio::time::sleep(idle_after + Duration::from_secs(2)).await;
        None
    };
    eprintln!("# idle: measuring for {} s", args.idle);
    let window = Duration::from_secs_f64(args.idle);
    let msgs0: MessageCounts = cluster.loopback.counts();
    let logs0 = cluster.log_stats();
    let threads0 = thread_ticks();
    let cpu0 = process_cpu();
    let machine0 = machine_ticks();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let cpu1 = process_cpu();
    let machine1 = machine_ticks();
    let wall = t0.elapsed();
    let threads1 = thread_ticks();
    let msgs1 = cluster.loopback.counts();
    let logs = log_delta(&logs0, &cluster.log_stats());
    let rss = rss_kib();
    let secs = wall.as_secs_f64();
    let hz = clock_ticks_per_s();
    let mut by_thread: Vec<(String, f64)> = threads1
        .iter()
        .map(|(name, t)| (name.clone(), t.saturating_sub(threads0.get(name).copied().unwrap_or(0)) as f64 / hz / secs))
        .filter(|(_, c)| *c > 0.0)
        .collect();
    by_thread.sort_by(|a, b| b.1.total_cmp(&a.1));
    by_thread.truncate(6);
    json!({
        "hibernation": hibernation,
        "window_s": secs,
        "quiet_before_window_s": t0.duration_since(quiet_since).as_secs_f64(),
        "all_asleep_after_s": asleep_after_s,
        "asleep_at_end": cluster.asleep(),
        "replicas": want,
        "cpu_cores": cpu_cores(cpu0, cpu1, wall),
        "other_processes_cores": others_cores(machine_busy_cores(machine0, machine1), cpu_cores(cpu0, cpu1, wall)),
        "cpu_by_thread": by_thread.iter().map(|(n, c)| json!({"thread": n, "cores": c})).collect::<Vec<_>>(),
        "rss_kib": rss,
        "raft_appends_per_sec": per_sec(msgs1.appends, msgs0.appends, secs),
        "raft_votes_per_sec": per_sec(msgs1.votes, msgs0.votes, secs),
        "control_messages_per_sec": per_sec(msgs1.controls, msgs0.controls, secs),
        "log_fsyncs_per_sec": logs.fsyncs as f64 / secs,
        "log_bytes_per_sec": logs.bytes as f64 / secs,
    })
}

/// fio's durable small appends, the jobs of `peers/fio.sh` (g): 4 KiB O_DIRECT writes through
/// io_uring with an fdatasync after each, queue depth 1, 22 MiB; once with one job (one log)
/// and once with three jobs at the same time on three files (three logs on one disk).
fn fio_fsync(dir: &Path) -> Result<Value, String> {
    let scratch = dir.join("fio");
    std::fs::create_dir_all(&scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let run = |jobs: u32| -> Result<Value, String> {
        eprintln!("# fio: 4 KiB O_DIRECT write + fdatasync, QD 1, 22 MiB, {jobs} job(s)");
        let mut command = Command::new("fio");
        command
            .args(["--name=w", "--rw=write", "--bs=4k", "--size=22m", "--iodepth=1", "--fdatasync=1"])
            .args(["--ioengine=io_uring", "--direct=1", "--lat_percentiles=1", "--randrepeat=0", "--norandommap"])
            .args(["--group_reporting", "--output-format=json"])
            .arg(format!("--numjobs={jobs}"))
            .arg(format!("--directory={}", scratch.display()));
        let v = crate::physical::fio_json(command)?;
        let job = &v["jobs"][0];
        let sync = &job["sync"]["lat_ns"]["percentile"];
        let us = |k: &str| sync[k].as_f64().unwrap_or(0.0) / 1000.0;
        Ok(json!({
            "jobs": jobs,
            "write_iops": job["write"]["iops"].as_f64().unwrap_or(0.0),
            "fdatasync_p50_us": us("50.000000"),
            "fdatasync_p99_us": us("99.000000"),
        }))
    };
    let one = run(1)?;
    let three = run(3)?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(json!({ "one_job": one, "three_jobs": three }))
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn mib(kib: &Value) -> String {
    kib.as_f64().map_or_else(|| "?".into(), |k| format!("{:.0} MiB", k / 1024.0))
}

fn onoff(v: &Value) -> &'static str {
    if v["hibernation"].as_bool().unwrap_or(false) { "on" } else { "off" }
}

/// The table of one instance (stderr).
fn print_instance(v: &Value) {
    eprintln!(
        "\n== replicated: 3 nodes in-process, {} groups x 3 replicas, {} B values, hibernation {} ==",
        v["partitions"],
        v["value_bytes"],
        onoff(v)
    );
    eprintln!(
        "start        engines + logs {:.1} s; groups opened {:.1} s, bootstrapped {:.1} s; every group led {:.1} s after the first open (leaders per node {})",
        f(v, "engines_open_s"),
        f(v, "nodes_open_s"),
        f(v, "bootstrap_s"),
        f(v, "all_led_s"),
        v["leaders_per_node"]
    );
    eprintln!(
        "{:>9} {:>9} {:>7} {:>7} {:>8} {:>9} {:>8} {:>9} {:>9} {:>6} {:>8} {:>7} {:>6} {:>6}",
        "in flight",
        "writes/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "fsyncs/s",
        "entries/",
        "log B/rec",
        "log B/rec",
        "cpu",
        "cpu us/",
        "retries",
        "errors",
        "others"
    );
    eprintln!(
        "{:>9} {:>9} {:>7} {:>7} {:>8} {:>9} {:>8} {:>9} {:>9} {:>6} {:>8} {:>7} {:>6} {:>6}",
        "", "", "", "", "", "(3 logs)", "fsync", "per node", "cluster", "cores", "write", "", "", "cores"
    );
    for w in v["writes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let errors = ["refused", "in_doubt", "fatal", "abandoned"].iter().map(|k| f(w, k)).sum::<f64>();
        eprintln!(
            "{:>9} {:>9.0} {:>7} {:>7} {:>8} {:>9.0} {:>8.1} {:>9.0} {:>9.0} {:>6.2} {:>8.0} {:>7} {:>6} {:>6.2}",
            u(w, "in_flight"),
            f(w, "writes_per_sec"),
            u(w, "write_p50_us"),
            u(w, "write_p99_us"),
            u(w, "write_p999_us"),
            f(w, "fsyncs_per_sec"),
            f(w, "entries_per_fsync"),
            f(w, "log_bytes_per_record_per_node"),
            f(w, "log_bytes_per_record_cluster"),
            f(w, "cpu_cores"),
            f(w, "cpu_us_per_write"),
            f(w, "retries_not_leader") + f(w, "retries_not_ready"),
            errors,
            f(w, "other_processes_cores")
        );
    }
    let i = &v["idle"];
    let threads: Vec<String> = i["cpu_by_thread"]
        .as_array()
        .map(|a| a.iter().map(|t| format!("{} {:.3}", t["thread"].as_str().unwrap_or("?"), f(t, "cores"))).collect())
        .unwrap_or_default();
    eprintln!(
        "idle         {:.0} s window, {} of {} replicas asleep{}: cpu {:.3} cores (other processes {:.2}), rss {} (after start: {}); raft appends/s {:.0}, votes/s {:.0}, control msgs/s {:.0}, log fsyncs/s {:.1}",
        f(i, "window_s"),
        i["asleep_at_end"],
        i["replicas"],
        i["all_asleep_after_s"].as_f64().map_or(String::new(), |s| format!(" (all after {s:.1} s)")),
        f(i, "cpu_cores"),
        f(i, "other_processes_cores"),
        mib(&i["rss_kib"]),
        mib(&v["rss_started_kib"]),
        f(i, "raft_appends_per_sec"),
        f(i, "raft_votes_per_sec"),
        f(i, "control_messages_per_sec"),
        f(i, "log_fsyncs_per_sec")
    );
    eprintln!(
        "idle cpu     by thread (cores): {}",
        if threads.is_empty() { "none measurable (under one clock tick each)".to_string() } else { threads.join(", ") }
    );
    eprintln!(
        "records      per node {}; shutdown {:.1} s; machine CPU busy before {:.0} %, after {:.0} %",
        v["records_per_node"],
        f(v, "shutdown_s"),
        f(v, "busy_start_pct"),
        f(v, "busy_end_pct")
    );
}

/// One line per figure, over every instance (and fio when measured).
fn summary_lines(result: &Value) -> Vec<String> {
    let instances = result["instances"].as_array().map(Vec::as_slice).unwrap_or_default();
    let fio = &result["fio"];
    let fio_iops = |job: &str| {
        let b = f(&fio["before"][job], "write_iops");
        let a = f(&fio["after"][job], "write_iops");
        (b + a) / 2.0
    };
    let (fio1, fio3) = (fio_iops("one_job"), fio_iops("three_jobs"));
    let mut lines = Vec::new();
    if fio.is_object() {
        lines.push(format!(
            "device fdatasync rate (fio, 4 KiB O_DIRECT write + fdatasync, QD1): 1 job {:.0}/s (before {:.0}, after {:.0}), 3 jobs together {:.0}/s (before {:.0}, after {:.0})",
            fio1,
            f(&fio["before"]["one_job"], "write_iops"),
            f(&fio["after"]["one_job"], "write_iops"),
            fio3,
            f(&fio["before"]["three_jobs"], "write_iops"),
            f(&fio["after"]["three_jobs"], "write_iops"),
        ));
    }
    for v in instances {
        let h = onoff(v);
        lines.push(format!(
            "time to every group led (hibernation {h}): {:.1} s for {} groups x 3",
            f(v, "all_led_s"),
            v["partitions"]
        ));
        for w in v["writes"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let vs_fio = if fio1 > 0.0 {
                format!(
                    " = {:.2}x the device's fdatasync rate; fsyncs/s per node {:.2}x it, all 3 logs {:.2}x fio's 3 jobs",
                    f(w, "writes_per_sec") / fio1,
                    f(w, "fsyncs_per_sec_per_node") / fio1,
                    f(w, "fsyncs_per_sec") / fio3.max(1e-9)
                )
            } else {
                String::new()
            };
            lines.push(format!(
                "replicated writes (hibernation {h}, {} in flight): {:.0}/s, p50 {} us, p99 {} us, p99.9 {} us; {:.0} fsyncs/s over 3 logs, {:.1} entries per fsync, {:.0} log bytes per record per node{vs_fio}",
                w["in_flight"],
                f(w, "writes_per_sec"),
                w["write_p50_us"],
                w["write_p99_us"],
                w["write_p999_us"],
                f(w, "fsyncs_per_sec"),
                f(w, "entries_per_fsync"),
                f(w, "log_bytes_per_record_per_node"),
            ) + &format!(" (other processes used {:.2} cores meanwhile)", f(w, "other_processes_cores")));
        }
        let i = &v["idle"];
        lines.push(format!(
            "idle (hibernation {h}, {} groups x 3): cpu {:.3} cores, rss {}, {:.0} raft appends/s",
            v["partitions"],
            f(i, "cpu_cores"),
            mib(&i["rss_kib"]),
            f(i, "raft_appends_per_sec")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ReplicatedArgs,
    }

    #[test]
    fn defaults_and_validation() {
        let a = T::parse_from(["t"]).a;
        assert_eq!(a.partitions, 4096);
        assert_eq!(a.in_flight, vec![32, 256]);
        assert_eq!(a.value_bytes, 1024);
        assert_eq!(a.keys, 1_000_000);
        assert_eq!(a.hibernation, Hibernation::On);
        assert_eq!(a.dir, PathBuf::from("/var/tmp/peregrine-bench-repl"));
        assert!(a.validate().is_ok());
        let b = T::parse_from(["t", "--in-flight", "1,0"]).a;
        assert!(b.validate().is_err());
        let c = T::parse_from(["t", "--partitions", "5000"]).a;
        assert!(c.validate().is_err());
        let d = T::parse_from(["t", "--io-backend", "magic"]).a;
        assert!(d.validate().is_err());
    }

    #[test]
    fn digests_land_in_the_partitions_in_use() {
        let w = Writers {
            nodes: Vec::new(),
            leader_of: Vec::new(),
            partitions: 7,
            keys: 100,
            size: SizeRange { min: 16, max: 16 },
            stop: AtomicBool::new(false),
            next_version: AtomicU64::new(0),
            first_fatal: Mutex::new(None),
        };
        for k in 0..1000 {
            assert!(w.digest_of(k).partition().get() < 7);
        }
    }

    #[test]
    fn process_figures_read() {
        assert!(process_cpu().is_some());
        assert!(rss_kib().is_some_and(|k| k > 0));
        assert!(!thread_ticks().is_empty());
    }
}
