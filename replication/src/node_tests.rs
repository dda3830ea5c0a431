//! In-process cluster tests of the node runtime: 3 [`ReplicaNode`]s, each with its own engine,
//! shared log and side files on real files, over the loopback transport. The leader's rules
//! (chained same-key writes, rising last-update times whatever the clocks, policy failures
//! never logged, expiry through the log), all 4096 groups, and a seeded randomized run of
//! writes, node restarts, isolations and snapshots, with byte-identical replicas at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use peregrine_engine::clock::{Clock, ManualClock};
use peregrine_engine::{
    Applied, Bin, BinSelection, Change, Digest, Engine, EngineConfig, Error, KeyRef, PartitionId, Value,
};

use crate::group::{Group, WriteError};
use crate::hibernate::SleepConfig;
use crate::log::SharedLog;
use crate::loopback::Loopback;
use crate::node::{NodeOptions, RaftTimers, ReplicaNode};
use crate::placement::Placement;
use crate::sm_tests::{engine_config, log_options, tempdir};
use crate::state_machine::SmOptions;

/// Held by every in-process cluster test of the crate for its whole run: they are sensitive to
/// timing (elections, leases, hibernation), and one of them runs 12,288 Raft replicas, so they
/// run one at a time while the cheap tests run beside them.
static CLUSTER_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the other cluster tests of the crate to finish (see [`CLUSTER_TESTS`]).
pub(crate) async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    CLUSTER_TESTS.lock().await
}

/// Start of the test clocks (2027-01-15).
const T0_MS: u64 = 1_800_000_000_000;

pub(crate) struct Cluster {
    pub loopback: Loopback,
    pub placement: Placement,
    pub partitions: Vec<PartitionId>,
    pub timers: RaftTimers,
    pub dirs: BTreeMap<u64, PathBuf>,
    pub clocks: BTreeMap<u64, Arc<ManualClock>>,
    pub nodes: BTreeMap<u64, ReplicaNode>,
    pub engine_bytes: u64,
    pub hibernation: Option<SleepConfig>,
    pub background: BTreeMap<u64, tokio::task::JoinHandle<()>>,
    _guards: Vec<tempfile::TempDir>,
}

pub(crate) fn fast_timers() -> RaftTimers {
    RaftTimers {
        heartbeat_ms: 100,
        election_timeout_ms: 600,
        install_snapshot_timeout_ms: 60_000,
        ..RaftTimers::default()
    }
}

impl Cluster {
    /// Three nodes (ids 1, 2, 3) at RF 3 over `partitions`; node `n`'s clock starts
    /// `clock_offsets_ms[n-1]` after `T0_MS`.
    pub async fn start(partitions: Vec<PartitionId>, timers: RaftTimers, clock_offsets_ms: [u64; 3]) -> Cluster {
        Cluster::start_with(partitions, timers, clock_offsets_ms, None).await
    }

    /// [`Cluster::start`] with hibernation (`Some`) and each node's background loop running.
    pub async fn start_with(
        partitions: Vec<PartitionId>,
        timers: RaftTimers,
        clock_offsets_ms: [u64; 3],
        hibernation: Option<SleepConfig>,
    ) -> Cluster {
        let guards: Vec<tempfile::TempDir> = (0..3).map(|_| tempdir()).collect();
        let mut c = Cluster {
            loopback: Loopback::new(),
            placement: Placement::new(&[1, 2, 3], 3).unwrap(),
            partitions,
            timers,
            dirs: (1..=3u64).zip(guards.iter().map(|g| g.path().to_path_buf())).collect(),
            clocks: (1..=3u64)
                .map(|n| (n, Arc::new(ManualClock::new(T0_MS + clock_offsets_ms[n as usize - 1]))))
                .collect(),
            nodes: BTreeMap::new(),
            engine_bytes: 16 << 20,
            hibernation,
            background: BTreeMap::new(),
            _guards: guards,
        };
        // Every node's groups exist before any stands for election, as in a cluster whose
        // nodes start together.
        for id in 1..=3 {
            c.open_node(id).await;
        }
        for id in 1..=3 {
            let t = Instant::now();
            let n = c.nodes[&id].bootstrap().await.unwrap();
            if n > 100 {
                eprintln!("node {id}: {n} groups bootstrapped in {:?}", t.elapsed());
            }
        }
        c
    }

    fn engine_config(&self, id: u64) -> EngineConfig {
        let dir = &self.dirs[&id];
        let mut e = engine_config(dir);
        e.devices[0].file_size_bytes = Some(self.engine_bytes);
        e.clock = self.clocks[&id].clone();
        e
    }

    /// Opens node `id` and bootstraps the groups it is the preferred leader of.
    pub async fn start_node(&mut self, id: u64) {
        self.open_node(id).await;
        self.nodes[&id].bootstrap().await.unwrap();
    }

    /// Opens node `id` (and its background loop when hibernating), without bootstrapping.
    pub async fn open_node(&mut self, id: u64) {
        let dir = self.dirs[&id].clone();
        let engine = Engine::open(self.engine_config(id)).unwrap();
        let (log, _) = SharedLog::open(log_options(&dir)).unwrap();
        let options = NodeOptions {
            node_id: id,
            placement: self.placement.clone(),
            partitions: self.partitions.clone(),
            sm_dir: dir.join("sm"),
            sm: SmOptions { persist_every: 16, ..SmOptions::default() },
            timers: self.timers,
            proposal_timeout: Duration::from_secs(3),
            hibernation: self.hibernation,
            peer_timeout: Duration::from_millis(self.timers.heartbeat_ms * 6),
        };
        let lb = self.loopback.clone();
        let t = Instant::now();
        let node = ReplicaNode::open(options, engine, log, |pid| lb.factory(id, pid), lb.control()).await.unwrap();
        let opened = t.elapsed();
        self.loopback.register_node(&node);
        if self.hibernation.is_some() {
            let period = Duration::from_millis(self.timers.heartbeat_ms);
            self.background.insert(id, node.spawn_background(period, Duration::from_secs(3600), false));
        }
        if node.groups().count() > 100 {
            eprintln!("node {id}: {} groups opened in {opened:?}", node.groups().count());
        }
        self.nodes.insert(id, node);
    }

    pub async fn stop_node(&mut self, id: u64) {
        let node = self.nodes.remove(&id).unwrap();
        self.loopback.unregister_node(id);
        node.shutdown().await.unwrap();
        if let Some(b) = self.background.remove(&id) {
            b.await.unwrap();
        }
        node.engine().close().unwrap();
    }

    /// Stops every node at once (one by one, the survivors would re-elect thousands of groups
    /// each time).
    pub async fn stop_all(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        for id in nodes.keys() {
            self.loopback.unregister_node(*id);
        }
        let results = futures_util::future::join_all(nodes.values().map(|n| n.shutdown())).await;
        for r in results {
            r.unwrap();
        }
        for (id, node) in nodes {
            if let Some(b) = self.background.remove(&id) {
                b.await.unwrap();
            }
            node.engine().close().unwrap();
        }
    }

    /// The ready leader of `pid` among running nodes, waiting up to `timeout`.
    pub async fn leader(&self, pid: PartitionId, timeout: Duration) -> Option<Group> {
        let start = Instant::now();
        loop {
            for node in self.nodes.values() {
                if let Some(g) = node.group(pid).filter(|g| g.is_ready_leader()) {
                    return Some(g.clone());
                }
            }
            if start.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running replica of `pid` has applied what its leader has.
    pub async fn converge(&self, pid: PartitionId) {
        // A leader that a quorum confirms (an isolated old leader may still think it leads).
        let start = Instant::now();
        let leader = loop {
            let l = self.leader(pid, Duration::from_secs(60)).await.expect("a leader");
            if l.raft().ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex).await.is_ok() {
                break l;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "partition {}: no confirmed leader", pid.get());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let target = leader.raft().metrics().borrow_watched().last_log_index;
        for node in self.nodes.values() {
            let g = node.group(pid).unwrap();
            g.raft()
                .wait(Some(Duration::from_secs(60)))
                .applied_index_at_least(target, "converge")
                .await
                .unwrap_or_else(|e| {
                    let lm = leader.raft().metrics().borrow_watched().clone();
                    panic!("node {} partition {}: {e}\nleader: {lm:?}", node.id(), pid.get())
                });
        }
    }

    /// Each running node's partition digest of `pid` (xxh3 over the snapshot stream).
    pub async fn partition_digests(&self, pid: PartitionId) -> BTreeMap<u64, (usize, u64)> {
        let mut out = BTreeMap::new();
        for (id, node) in &self.nodes {
            out.insert(*id, partition_digest(node.engine(), pid).await);
        }
        out
    }
}

/// Count and xxh3 of a partition's versions as the snapshot stream yields them.
pub(crate) async fn partition_digest(engine: &Engine, pid: PartitionId) -> (usize, u64) {
    let versions = engine.partition_versions_async(pid).await.unwrap();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for v in &versions {
        h.update(format!("{:?}", crate::types::Version::from(v)).as_bytes());
    }
    (versions.len(), h.digest())
}

/// A digest of key `k` that lands in partition `pid`.
pub(crate) fn digest_in(pid: PartitionId, k: u32) -> Digest {
    let mut d = Digest::of_key(b"s", KeyRef::Int(i64::from(k))).0;
    let p = pid.get();
    d[0] = (p & 0xFF) as u8;
    d[1] = (d[1] & 0xF0) | (p >> 8) as u8;
    let d = Digest(d);
    assert_eq!(d.partition(), pid);
    d
}

/// Put of bin "v" = `value` (and "n" = `n`).
pub(crate) fn put(value: &[u8], n: i64) -> Change {
    Change::Put {
        set_name: b"s".to_vec(),
        key: None,
        bins: vec![Bin::new("v", Value::Blob(value.to_vec())).unwrap(), Bin::new("n", Value::Int(n)).unwrap()],
        void_time: 0,
    }
}

fn counter_of(existing: Option<peregrine_engine::Existing<'_>>) -> i64 {
    existing
        .and_then(|e| e.record)
        .and_then(|r| r.bins.iter().find(|b| b.name.as_bytes() == b"n").map(|b| b.value.clone()))
        .map_or(0, |v| match v {
            Value::Int(i) => i,
            _ => panic!("bin n is not an integer"),
        })
}

/// Read-modify-write increment of the key's counter bin through `g`.
pub(crate) async fn increment(g: &Group, d: &Digest, tag: &str) -> Result<Applied, WriteError> {
    let tag = tag.as_bytes().to_vec();
    g.write(d, true, move |existing| Ok(put(&tag, counter_of(existing) + 1))).await
}

pub(crate) fn pids(n: u16) -> Vec<PartitionId> {
    (0..n).map(|p| PartitionId::new(p).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_rules_chain_same_key_writes_rise_luts_and_never_log_refusals() {
    let _serial = serial().await;
    // Node 2's clock is an hour behind node 1's: leadership moving there must not make
    // last-update times go back.
    let mut c = Cluster::start(pids(4), fast_timers(), [3_600_000, 0, 1_800_000]).await;
    let pid = PartitionId::new(1).unwrap();
    let d = digest_in(pid, 7);
    let leader = c.leader(pid, Duration::from_secs(20)).await.expect("a leader");

    // 40 concurrent increments of one key: each one is applied once, chained over the
    // pending ones (no lost update), or refused as key busy past the pending limit.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let g = leader.clone();
            tokio::spawn(async move { increment(&g, &d, &format!("w{i}")).await })
        })
        .collect();
    let mut ok = 0i64;
    let mut busy = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Applied::Written(_)) => ok += 1,
            Err(WriteError::Refused(Error::KeyBusy)) => busy += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert!(ok >= 20, "at least the pending limit went through: {ok} ok, {busy} busy");
    assert_eq!(ok + busy, 40);
    c.converge(pid).await;
    for node in c.nodes.values() {
        let r = node.engine().get(&d, &BinSelection::All).unwrap();
        assert_eq!(r.meta.generation as i64, ok, "node {}: one generation per applied write", node.id());
        assert_eq!(counter_of(Some(peregrine_engine::Existing { meta: r.meta, record: Some(&r) })), ok);
    }

    // A refused decision (a create-only write of an existing record) is answered without touching the log.
    let before = leader.raft().metrics().borrow_watched().last_log_index;
    let refused = leader.write(&d, false, |_| Err(Error::RecordExists)).await;
    assert!(matches!(refused, Err(WriteError::Refused(Error::RecordExists))), "{refused:?}");
    let unchanged = leader.write(&d, false, |_| Ok(Change::Nothing)).await.unwrap();
    assert_eq!(unchanged, Applied::Unchanged);
    assert_eq!(leader.raft().metrics().borrow_watched().last_log_index, before, "refusals are not logged");

    // A follower refuses with the leader's id.
    let follower = c.nodes.values().filter_map(|n| n.group(pid)).find(|g| !g.is_ready_leader()).unwrap();
    match increment(follower, &d, "f").await {
        Err(WriteError::NotLeader { leader: Some(_) }) => {}
        other => panic!("a follower answered {other:?}"),
    }

    // Move leadership to every node in turn (clocks 1 h apart): last-update times of the
    // partition rise in log order regardless.
    let mut luts = Vec::new();
    for target in [2u64, 3, 1, 2] {
        let g = c.nodes[&target].group(pid).unwrap().clone();
        if !g.is_ready_leader() {
            let l = c.leader(pid, Duration::from_secs(20)).await.unwrap();
            l.raft().trigger().transfer_leader(target).await.unwrap();
        }
        let start = Instant::now();
        while !g.is_ready_leader() {
            assert!(start.elapsed() < Duration::from_secs(20), "leadership did not move to {target}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for k in 0..3 {
            let dk = digest_in(pid, 100 + k);
            match g.write(&dk, false, |_| Ok(put(b"x", 0))).await.unwrap() {
                Applied::Written(m) => luts.push(m.last_update_ms),
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(luts.windows(2).all(|w| w[0] < w[1]), "last-update times rise in log order: {luts:?}");

    // Expiry goes through the log: a record expired by the leader's clock becomes a tombstone
    // on every replica.
    let l = c.leader(pid, Duration::from_secs(20)).await.unwrap();
    let de = digest_in(pid, 500);
    let void = c.clocks[&1].now_void_s().max(c.clocks[&2].now_void_s()).max(c.clocks[&3].now_void_s()) + 10;
    l.write(&de, false, |_| {
        Ok(Change::Put {
            set_name: b"s".to_vec(),
            key: None,
            bins: vec![Bin::new("v", Value::Int(1)).unwrap()],
            void_time: void,
        })
    })
    .await
    .unwrap();
    for clock in c.clocks.values() {
        clock.advance_ms(3_700_000 + 20_000);
    }
    let mut removed = 0;
    for node in c.nodes.values() {
        removed += node.expire_once(1000).await;
    }
    assert_eq!(removed, 1, "exactly the one expired record, by its leader");
    c.converge(pid).await;
    for node in c.nodes.values() {
        let e = node.engine().index().get(&de).unwrap();
        assert!(e.is_tombstone(), "node {}: the expiry reached this replica", node.id());
    }
    let digests = c.partition_digests(pid).await;
    assert!(digests.values().all(|d| *d == digests[&1]), "replicas differ: {digests:?}");
    c.stop_all().await;
}

/// Every replica of every partition in `c` holds the same versions.
pub(crate) async fn assert_identical(c: &Cluster) {
    for &pid in &c.partitions {
        c.converge(pid).await;
        let digests = c.partition_digests(pid).await;
        let first = digests.values().next().unwrap();
        assert!(digests.values().all(|d| d == first), "partition {}: replicas differ: {digests:?}", pid.get());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_change_with_writes_in_flight_applies_each_write_once_or_reports_it() {
    let _serial = serial().await;
    let mut c = Cluster::start(pids(2), fast_timers(), [0, 0, 0]).await;
    let pid = PartitionId::new(0).unwrap();
    let d = digest_in(pid, 1);
    let leader = c.leader(pid, Duration::from_secs(20)).await.unwrap();
    let leader_id = c.nodes.iter().find(|(_, n)| n.group(pid).unwrap().is_ready_leader()).map(|(id, _)| *id).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let g = leader.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i as u64)).await;
                increment(&g, &d, "in-flight").await
            })
        })
        .collect();
    // Isolate the leader while writes are in flight: the others elect a new one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.loopback.set_down(leader_id, true);
    let (mut ok, mut failed, mut in_doubt) = (0i64, 0i64, 0i64);
    // The generation each acknowledged write was given: a failure names the missing one.
    let mut acked_generations = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(applied) => {
                ok += 1;
                if let Applied::Written(meta) = applied {
                    acked_generations.push(meta.generation);
                }
            }
            Err(WriteError::Refused(_) | WriteError::NotLeader { .. } | WriteError::NotReady) => failed += 1,
            Err(WriteError::InDoubt(_) | WriteError::Fatal(_)) => in_doubt += 1,
        }
    }
    c.loopback.heal();
    assert_identical(&c).await;
    let r = c.nodes[&1].engine().get(&d, &BinSelection::All).unwrap();
    let applied = counter_of(Some(peregrine_engine::Existing { meta: r.meta, record: Some(&r) }));
    eprintln!("in flight across a leader change: {ok} ok, {failed} failed, {in_doubt} in doubt; {applied} applied");
    assert_eq!(i64::from(r.meta.generation), applied, "each applied write is one version");
    acked_generations.sort_unstable();
    assert!(
        applied >= ok,
        "every acknowledged write is applied ({applied} < {ok}); acknowledged generations {acked_generations:?}"
    );
    assert!(applied <= ok + in_doubt, "no failed write is applied ({applied} > {ok} + {in_doubt})");
    c.stop_all().await;
}

/// Ready leaders per node, and how many partitions have one.
fn leader_counts(c: &Cluster) -> (BTreeMap<u64, usize>, usize) {
    let per_node: BTreeMap<u64, usize> = c.nodes.iter().map(|(id, n)| (*id, n.ready_leaders())).collect();
    let led = c
        .partitions
        .iter()
        .filter(|&&pid| c.nodes.values().any(|n| n.group(pid).is_some_and(|g| g.is_ready_leader())))
        .count();
    (per_node, led)
}

/// Writes one record per partition through its leader, `parallel` at a time; returns the
/// digests written.
async fn write_everywhere(c: &Cluster, round: u32, parallel: usize) -> Vec<Digest> {
    let mut written = Vec::new();
    for chunk in c.partitions.chunks(parallel) {
        let mut tasks = Vec::new();
        for &pid in chunk {
            let leader = c.leader(pid, Duration::from_secs(60)).await.expect("a leader");
            let d = digest_in(pid, round);
            written.push(d);
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    match increment(&leader, &d, "everywhere").await {
                        Ok(_) => return,
                        Err(WriteError::NotReady | WriteError::NotLeader { .. }) => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(e) => panic!("partition {}: {e}", pid.get()),
                    }
                }
                panic!("partition {}: no write succeeded", pid.get());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_4096_groups_elect_replicate_and_a_restarted_node_catches_up() {
    let _serial = serial().await;
    let start = Instant::now();
    let sleep = SleepConfig { idle_after: Duration::from_secs(5), ..SleepConfig::default() };
    let mut c = Cluster::start_with(PartitionId::all().collect(), RaftTimers::default(), [0, 0, 0], Some(sleep)).await;
    let started = start.elapsed();
    loop {
        let (per_node, led) = leader_counts(&c);
        if led == 4096 {
            eprintln!(
                "4096 groups x 3: started in {started:?}, every group led after {:?}: {per_node:?}",
                start.elapsed()
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "only {led} of 4096 groups have a leader: {per_node:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = Instant::now();
    write_everywhere(&c, 1, 64).await;
    eprintln!("one write per partition through its leader: {:?}", t.elapsed());
    c.stop_node(3).await;
    write_everywhere(&c, 2, 64).await;
    c.start_node(3).await;
    write_everywhere(&c, 3, 64).await;
    let t = Instant::now();
    assert_identical(&c).await;
    eprintln!("all 4096 partitions identical on the 3 replicas (checked in {:?})", t.elapsed());
    c.stop_all().await;
}

pub(crate) fn quick_sleep() -> SleepConfig {
    SleepConfig {
        idle_after: Duration::from_secs(1),
        elect_hold_after_wake: Duration::from_millis(1_000),
        elect_retry_every: Duration::from_millis(200),
    }
}

async fn wait_all_asleep(c: &Cluster, within: Duration) {
    let start = Instant::now();
    let want = c.partitions.len() * c.nodes.len();
    loop {
        let asleep: usize = c.nodes.values().map(|n| n.asleep()).sum();
        if asleep == want {
            return;
        }
        assert!(start.elapsed() < within, "only {asleep} of {want} replicas asleep after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_sleep_wake_on_a_write_and_re_elect_when_their_leaders_node_is_lost() {
    let _serial = serial().await;
    let mut c = Cluster::start_with(pids(6), fast_timers(), [0, 0, 0], Some(quick_sleep())).await;
    for &pid in &c.partitions.clone() {
        let l = c.leader(pid, Duration::from_secs(20)).await.unwrap();
        increment(&l, &digest_in(pid, 1), "before sleep").await.unwrap();
    }
    wait_all_asleep(&c, Duration::from_secs(20)).await;
    // Asleep means silent: no append (heartbeat) and no vote for a while.
    let before = c.loopback.counts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = c.loopback.counts();
    assert_eq!((after.appends, after.votes), (before.appends, before.votes), "sleeping groups sent Raft messages");
    assert!(after.controls > before.controls, "the node-level liveness heartbeat goes on");

    // A write wakes its group (and only it) and succeeds.
    let pid = c.partitions[2];
    let l = c.leader(pid, Duration::from_secs(5)).await.unwrap();
    increment(&l, &digest_in(pid, 1), "wakes").await.unwrap();
    assert!(!l.is_asleep());
    let other = c.partitions[3];
    assert!(c.nodes.values().all(|n| n.group(other).unwrap().is_asleep()), "an untouched group stayed asleep");

    // Losing a leader's node wakes its groups on the survivors, which elect new leaders.
    wait_all_asleep(&c, Duration::from_secs(20)).await;
    let lost = 1u64;
    let led: Vec<PartitionId> =
        c.partitions.iter().copied().filter(|&p| c.nodes[&lost].group(p).unwrap().is_ready_leader()).collect();
    assert!(!led.is_empty(), "node 1 leads some of the groups");
    c.loopback.set_down(lost, true);
    let down_at = Instant::now();
    for &pid in &led {
        let start = Instant::now();
        loop {
            let new = [2u64, 3].iter().any(|n| c.nodes[n].group(pid).unwrap().is_ready_leader());
            if new {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "partition {}: no new leader on the survivors",
                pid.get()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("groups led by the lost node re-elected {:?} after it went down", down_at.elapsed());
    for &pid in &led {
        let g = [2u64, 3].iter().map(|n| c.nodes[n].group(pid).unwrap()).find(|g| g.is_ready_leader()).unwrap().clone();
        increment(&g, &digest_in(pid, 1), "after loss").await.unwrap();
    }
    c.loopback.heal();
    assert_identical(&c).await;
    c.stop_all().await;
}

/// A group never needs more entries than its snapshot interval to start purging: with a purge
/// batch above the interval, a group snapshotting every 64 entries kept its whole log and a
/// follower back from a crash was never sent a snapshot.
#[test]
fn the_purge_batch_never_exceeds_the_snapshot_interval() {
    for every in [1, 16, 64, 255, 256, 257, 20_000] {
        let timers = RaftTimers { snapshot_every_entries: every, log_kept_after_snapshot: 16, ..RaftTimers::default() };
        let config = timers.config().unwrap();
        assert!(config.purge_batch_size <= every, "interval {every}: purge batch {}", config.purge_batch_size);
        assert!(config.purge_batch_size >= 1);
    }
}

/// A node handing its leaderships over before a planned stop tells its peers it is leaving:
/// their rebalancing hands it none back (it is every other group's preferred leader), until a
/// restart of it sends plain liveness heartbeats again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_handing_over_its_leaderships_gets_none_back_until_it_restarts() {
    let _serial = serial().await;
    let mut c = Cluster::start_with(pids(6), fast_timers(), [0, 0, 0], Some(quick_sleep())).await;
    for pid in c.partitions.clone() {
        c.leader(pid, Duration::from_secs(10)).await.expect("every group elects");
    }
    let led_by_1 = |c: &Cluster| c.nodes[&1].role_counts().leaders;
    assert!(led_by_1(&c) > 0, "node 1 leads the groups it is the preferred leader of");
    assert_eq!(c.nodes[&1].hand_over_leaderships(Duration::from_secs(10)).await, 0);
    assert_eq!(led_by_1(&c), 0);
    // Rebalancing rounds on the peers, as their background loops run them.
    for _ in 0..10 {
        for id in [2, 3] {
            c.nodes[&id].rebalance_once(100).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(led_by_1(&c), 0, "a leadership went back to the leaving node");
    }
    c.stop_node(1).await;
    c.start_node(1).await;
    let start = Instant::now();
    while led_by_1(&c) == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the restarted node got no leadership back");
        for id in [2, 3] {
            c.nodes[&id].rebalance_once(100).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop_all().await;
}

/// A write lease renewal on a leader that loses its leadership meanwhile ends with
/// `NotLeader` as soon as it hears of the new leader, not after its whole timeout: the writer
/// then forwards to the new leader instead of answering "timeout" (seen during SIGTERM
/// hand-overs, where a fresh leader's first write met the transfer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewal_ends_when_the_leader_is_deposed() {
    use crate::hibernate::driver::{LeaseError, renew_write_lease};
    let _serial = serial().await;
    let mut c = Cluster::start(pids(1), fast_timers(), [0, 0, 0]).await;
    let pid = c.partitions[0];
    let leader = c.leader(pid, Duration::from_secs(10)).await.expect("the group elects");
    let old = leader.raft().metrics().borrow_watched().id;
    assert_eq!(leader.leader(), Some(old), "the replica found leading still leads");
    // The leader's messages are lost; it still hears the others. The followers elect a new
    // leader, whose messages depose the old one.
    for other in [1, 2, 3].into_iter().filter(|&n| n != old) {
        c.loopback.set_cut(old, other, true);
    }
    let timeout = Duration::from_secs(30);
    let start = Instant::now();
    let result = renew_write_lease(leader.raft(), timeout).await;
    let took = start.elapsed();
    assert!(matches!(result, Err(LeaseError::NotLeader)), "{result:?} after {took:?}");
    assert!(took < Duration::from_secs(10), "the renewal waited {took:?} after the leader was deposed");
    c.loopback.heal();
    c.stop_all().await;
}
