//! A seeded randomized run of the in-process cluster (issue 10, deliverable 6): writes through
//! each leader — read-modify-write increments, plain puts and deletes, puts that expire — many
//! in flight at once, while nodes stop and restart from their log and engine, nodes are
//! isolated or one direction of a link is cut then healed, leadership moves, leaders snapshot
//! and purge their log (so a lagging replica catches up by snapshot), and the clocks advance
//! for expiry through the log.
//!
//! The seed fixes the sequence of events (which write, where, when; which fault), not the
//! interleaving of the Raft tasks: a failing seed is a strong lead, not an exact replay. It is
//! printed at the start and again when the run panics; `PEREGRINE_SEED=N` replays it and
//! `PEREGRINE_STEPS=N` sets the length of the run.
//!
//! The model, checked once everything is healed and every replica converged:
//! - every replica of every partition holds the same versions;
//! - a counter key (bin "n", only ever incremented) holds one generation per applied
//!   increment, at least every acknowledged increment, and none beyond the acknowledged and the
//!   in-doubt ones ("in doubt" or "fatal": proposed, outcome unknown; a failed write — not
//!   the leader, not ready, refused — proposed nothing);
//! - a put/delete key has one operation at a time, so its operations are ordered; it ends as
//!   its last acknowledged operation left it (absent if none), or as one of the in-doubt
//!   operations issued after that. This is stronger than "skip the key when any write is in
//!   doubt": the leader decides every version of a key over the newest proposed one with a
//!   rising last-update time, and newest-wins applies, so an older in-doubt version that
//!   commits late loses to the acknowledged one decided after it;
//! - after the clocks pass every expiring put's void time and each leader runs expiry, no
//!   replica holds any of those records live.
//!
//! At the end every partition must also accept a write again. The report line of a run counts
//! the events, the results (by whether the write went to a ready leader), the snapshots sent,
//! and how many in-doubt writes turned out applied (how much of the model's slack was used).
//! The two runs (hibernation off, on) take the two cores one after the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use peregrine_engine::{Applied, Bin, BinSelection, Change, PartitionId, Value};

use crate::group::{Group, WriteError};
use crate::hibernate::SleepConfig;
use crate::node::ReplicaNode;
use crate::node_tests::{Cluster, assert_identical, digest_in, fast_timers, increment, pids, put, quick_sleep, serial};

/// Partitions of a run.
const PARTITIONS: u16 = 8;
/// Steps of a run unless `PEREGRINE_STEPS` says otherwise.
const STEPS_DEFAULT: usize = 60;
/// Counter keys per partition (keys `0..`).
const COUNTER_KEYS: u32 = 4;
/// Put/delete keys per partition (keys `100..`).
const PD_KEY_FIRST: u32 = 100;
const PD_KEYS: u32 = 2;
/// Expiring keys per partition (keys `200..`).
const EXPIRING_KEY_FIRST: u32 = 200;
const EXPIRING_KEYS: u32 = 1;
/// Longest time to live of an expiring put, seconds.
const TTL_S_MAX: u64 = 60;
/// Attempts of one write that found no ready leader (nothing proposed), 150 ms apart.
const ATTEMPTS_MAX: usize = 3;
/// How long the end of a run may wait for the writes still in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// splitmix64: a small deterministic generator, enough to pick events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The seed of this run: `PEREGRINE_SEED`, else the clock.
fn seed() -> u64 {
    match std::env::var("PEREGRINE_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("PEREGRINE_SEED={s}: {e}")),
        Err(_) => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            Rng(nanos as u64).next() >> 1 // small enough to paste anywhere
        }
    }
}

fn steps() -> usize {
    std::env::var("PEREGRINE_STEPS").map_or(STEPS_DEFAULT, |s| s.trim().parse().expect("PEREGRINE_STEPS"))
}

/// Prints the seed again if the run panics (on the test thread, or a panic that reached it).
struct SeedGuard {
    seed: u64,
    name: &'static str,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} FAILED with seed = {} (re-run with PEREGRINE_SEED={})", self.name, self.seed, self.seed);
        }
    }
}

/// What a write's result says about its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Acknowledged: applied.
    Ok,
    /// Nothing was proposed: not applied.
    Failed,
    /// Proposed, outcome unknown: applied or not.
    InDoubt,
}

fn classify(r: &Result<Applied, WriteError>) -> Class {
    match r {
        Ok(_) => Class::Ok,
        Err(WriteError::NotLeader { .. } | WriteError::NotReady | WriteError::Refused(_)) => Class::Failed,
        Err(WriteError::InDoubt(_) | WriteError::Fatal(_)) => Class::InDoubt,
    }
}

fn variant(r: &Result<Applied, WriteError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(WriteError::NotLeader { .. }) => "not leader",
        Err(WriteError::NotReady) => "not ready",
        Err(WriteError::Refused(_)) => "refused",
        Err(WriteError::InDoubt(_)) => "in doubt",
        Err(WriteError::Fatal(_)) => "fatal",
    }
}

/// The state a put/delete key is left in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    Absent,
    Value(i64),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Increment,
    Put(i64),
    Delete,
    /// A put that expires `ttl_s` after the deciding leader's clock.
    PutExpiring {
        ttl_s: u64,
    },
}

#[derive(Clone, Debug, Default)]
struct Tally {
    ok: i64,
    failed: i64,
    in_doubt: i64,
}

#[derive(Clone, Debug, Default)]
struct PdKey {
    /// Operations in the order they ran (one at a time), with what their result said.
    history: Vec<(Effect, Class)>,
    /// An operation of this key is running.
    busy: bool,
}

impl PdKey {
    /// The states the key may end in: what its last acknowledged operation left, or what an
    /// in-doubt operation after it would leave.
    fn allowed(&self) -> Vec<Effect> {
        let last_ok = self.history.iter().rposition(|(_, c)| *c == Class::Ok);
        let mut allowed = vec![last_ok.map_or(Effect::Absent, |i| self.history[i].0)];
        let after = last_ok.map_or(0, |i| i + 1);
        allowed.extend(self.history[after..].iter().filter(|(_, c)| *c == Class::InDoubt).map(|(e, _)| *e));
        allowed
    }
}

/// Every key's writes and their outcomes.
#[derive(Default)]
struct Model {
    counters: BTreeMap<(u16, u32), Tally>,
    pd: BTreeMap<(u16, u32), PdKey>,
    /// Results by kind and by whether the write went to a ready leader.
    results: BTreeMap<String, u64>,
    /// In-doubt and fatal messages (digits blanked), with how often each came.
    doubts: BTreeMap<String, u64>,
}

impl Model {
    fn record(&mut self, key: (u16, u32), op: Op, via_leader: bool, r: &Result<Applied, WriteError>) {
        let route = if via_leader { "leader" } else { "other replica" };
        *self.results.entry(format!("{} via {route}", variant(r))).or_default() += 1;
        let class = classify(r);
        if let Err(e @ (WriteError::InDoubt(_) | WriteError::Fatal(_))) = r {
            let text: String = format!("{}: {e}", variant(r)).chars().filter(|c| !c.is_ascii_digit()).collect();
            *self.doubts.entry(text).or_default() += 1;
        }
        match op {
            Op::Increment => {
                let t = self.counters.entry(key).or_default();
                match class {
                    Class::Ok => t.ok += 1,
                    Class::Failed => t.failed += 1,
                    Class::InDoubt => t.in_doubt += 1,
                }
            }
            Op::Put(v) => self.pd.entry(key).or_default().history.push((Effect::Value(v), class)),
            // A delete of an absent record is answered "unchanged" and proposes nothing: it
            // still tells the key was absent when decided.
            Op::Delete => self.pd.entry(key).or_default().history.push((Effect::Absent, class)),
            Op::PutExpiring { .. } => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running nodes, as the write tasks see them.
type Registry = Arc<Mutex<BTreeMap<u64, ReplicaNode>>>;

/// The group a write goes to: the ready leader among running nodes, else (or when
/// `any_replica`) the replica `pick` selects; and whether it was the ready leader.
fn choose(registry: &Registry, pid: PartitionId, pick: u64, any_replica: bool) -> Option<(Group, bool)> {
    let nodes = lock(registry);
    let groups: Vec<&Group> = nodes.values().filter_map(|n| n.group(pid)).collect();
    if groups.is_empty() {
        return None;
    }
    if let Some(leader) = groups.iter().find(|g| g.is_ready_leader()).filter(|_| !any_replica) {
        return Some(((*leader).clone(), true));
    }
    Some((groups[(pick % groups.len() as u64) as usize].clone(), false))
}

async fn apply_op(g: &Group, k: u32, op: Op) -> Result<Applied, WriteError> {
    let d = digest_in(g.partition(), k);
    match op {
        Op::Increment => increment(g, &d, "random").await,
        Op::Put(v) => g.write(&d, false, move |_| Ok(put(b"pd", v))).await,
        Op::Delete => g.write(&d, false, |_| Ok(Change::Delete)).await,
        Op::PutExpiring { ttl_s } => {
            let void_time = g.engine().config().clock.now_void_s() + ttl_s as u32;
            g.write(&d, false, move |_| {
                Ok(Change::Put {
                    set_name: b"s".to_vec(),
                    key: None,
                    bins: vec![Bin::new("v", Value::Int(1)).unwrap()],
                    void_time,
                })
            })
            .await
        }
    }
}

/// One write as a task: after `delay`, through the group [`choose`] finds; again (up to
/// [`ATTEMPTS_MAX`]) while no ready leader took it. Each attempt is recorded.
struct WriteTask {
    registry: Registry,
    model: Arc<Mutex<Model>>,
    pid: PartitionId,
    k: u32,
    op: Op,
    delay: Duration,
    pick: u64,
    any_replica: bool,
}

impl WriteTask {
    async fn run(self) {
        tokio::time::sleep(self.delay).await;
        let key = (self.pid.get(), self.k);
        for attempt in 0..ATTEMPTS_MAX {
            let Some((g, via_leader)) =
                choose(&self.registry, self.pid, self.pick + attempt as u64, self.any_replica && attempt == 0)
            else {
                tokio::time::sleep(Duration::from_millis(150)).await;
                continue;
            };
            let r = apply_op(&g, self.k, self.op).await;
            drop(g);
            lock(&self.model).record(key, self.op, via_leader, &r);
            let retry = matches!(r, Err(WriteError::NotLeader { .. } | WriteError::NotReady));
            if !retry {
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        if let Some(pd) = lock(&self.model).pd.get_mut(&key) {
            pd.busy = false;
        }
    }
}

/// A fault in force, and the step it ends at.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Stopped(u64),
    Down(u64),
    /// Messages `from → to` are dropped.
    Cut(u64, u64),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Stopped(n) => write!(f, "node {n} stopped"),
            Fault::Down(n) => write!(f, "node {n} isolated"),
            Fault::Cut(a, b) => write!(f, "link {a} -> {b} cut"),
        }
    }
}

/// One randomized run.
struct Run {
    seed: u64,
    rng: Rng,
    c: Cluster,
    registry: Registry,
    model: Arc<Mutex<Model>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    fault: Option<(Fault, usize)>,
    next_value: i64,
    events: BTreeMap<&'static str, u64>,
}

impl Run {
    fn sync_registry(&self) {
        *lock(&self.registry) = self.c.nodes.clone();
    }

    /// The node whose replica of `pid` is a ready leader, if any.
    fn leader_of(&self, pid: PartitionId) -> Option<(u64, Group)> {
        self.c.nodes.iter().find_map(|(id, n)| n.group(pid).filter(|g| g.is_ready_leader()).map(|g| (*id, g.clone())))
    }

    fn event(&mut self, name: &'static str) {
        *self.events.entry(name).or_default() += 1;
    }

    /// Spawns a burst of writes, spread over the next 300 ms.
    fn spawn_writes(&mut self) {
        let n = 6 + self.rng.below(25);
        for _ in 0..n {
            // Each write draws from its own generator, so the sequence of the run's draws
            // does not depend on which writes the cluster's state lets through.
            let mut r = Rng(self.rng.next());
            let pid = PartitionId::new(r.below(u64::from(PARTITIONS)) as u16).unwrap();
            let kind = r.below(100);
            let (k, op) = if kind < 60 {
                (r.below(u64::from(COUNTER_KEYS)) as u32, Op::Increment)
            } else if kind < 88 {
                let k = PD_KEY_FIRST + r.below(u64::from(PD_KEYS)) as u32;
                let op = if r.chance(35) {
                    Op::Delete
                } else {
                    self.next_value += 1;
                    Op::Put(self.next_value)
                };
                let mut model = lock(&self.model);
                let pd = model.pd.entry((pid.get(), k)).or_default();
                if pd.busy {
                    continue; // one operation of a put/delete key at a time
                }
                pd.busy = true;
                (k, op)
            } else {
                (
                    EXPIRING_KEY_FIRST + r.below(u64::from(EXPIRING_KEYS)) as u32,
                    Op::PutExpiring { ttl_s: 1 + r.below(TTL_S_MAX) },
                )
            };
            let task = WriteTask {
                registry: self.registry.clone(),
                model: self.model.clone(),
                pid,
                k,
                op,
                delay: Duration::from_millis(r.below(300)),
                pick: r.next(),
                any_replica: r.chance(10),
            };
            self.tasks.push(tokio::spawn(task.run()));
        }
    }

    async fn end_fault(&mut self) {
        let Some((fault, _)) = self.fault.take() else { return };
        eprintln!("  end: {fault}");
        match fault {
            Fault::Stopped(n) => {
                self.c.start_node(n).await;
                self.sync_registry();
            }
            Fault::Down(n) => self.c.loopback.set_down(n, false),
            Fault::Cut(a, b) => self.c.loopback.set_cut(a, b, false),
        }
    }

    async fn start_fault(&mut self, step: usize, r: &mut Rng) {
        let node = 1 + r.below(3);
        let fault = match r.below(10) {
            0..=3 => Fault::Stopped(node),
            4..=6 => Fault::Down(node),
            _ => Fault::Cut(node, 1 + (node + r.below(2)) % 3),
        };
        let until = step + 2 + r.below(5) as usize;
        eprintln!("  start: {fault} until step {until}");
        match fault {
            Fault::Stopped(n) => {
                lock(&self.registry).remove(&n);
                self.c.stop_node(n).await;
            }
            Fault::Down(n) => self.c.loopback.set_down(n, true),
            Fault::Cut(a, b) => self.c.loopback.set_cut(a, b, true),
        }
        self.event(match fault {
            Fault::Stopped(_) => "stop and restart",
            Fault::Down(_) => "isolate",
            Fault::Cut(..) => "one-way cut",
        });
        self.fault = Some((fault, until));
    }

    async fn transfer_leader(&mut self, r: &mut Rng) {
        let pid = PartitionId::new(r.below(u64::from(PARTITIONS)) as u16).unwrap();
        let Some((from, g)) = self.leader_of(pid) else { return };
        let others: Vec<u64> = self.c.nodes.keys().copied().filter(|&n| n != from).collect();
        if others.is_empty() {
            return;
        }
        let to = r.pick(&others);
        eprintln!("  transfer leadership of partition {} from {from} to {to}", pid.get());
        g.raft()
            .trigger()
            .transfer_leader(to)
            .await
            .unwrap_or_else(|e| panic!("seed {}: partition {}: transfer_leader: {e}", self.seed, pid.get()));
        self.event("transfer leader");
    }

    /// Snapshot and purge on a leader, so that a replica behind must catch up by snapshot.
    async fn snapshot_and_purge(&mut self, r: &mut Rng) {
        let pid = PartitionId::new(r.below(u64::from(PARTITIONS)) as u16).unwrap();
        let Some((id, g)) = self.leader_of(pid) else { return };
        let applied = g.raft().metrics().borrow_watched().last_applied.map_or(0, |l| l.index);
        g.raft().trigger().snapshot().await.unwrap_or_else(|e| panic!("seed {}: snapshot: {e}", self.seed));
        let m = g
            .raft()
            .wait(Some(Duration::from_secs(20)))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot built")
            .await
            .unwrap_or_else(|e| {
                panic!("seed {}: node {id} partition {}: no snapshot at {applied}: {e}", self.seed, pid.get())
            });
        let upto = m.snapshot.map_or(0, |s| s.index);
        g.raft().trigger().purge_log(upto).await.unwrap_or_else(|e| panic!("seed {}: purge: {e}", self.seed));
        let purged = g
            .raft()
            .wait(Some(Duration::from_millis(500)))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= upto), "purged")
            .await
            .is_ok();
        eprintln!("  node {id} partition {}: snapshot at {upto}, purged: {purged}", pid.get());
        self.event("snapshot and purge");
    }

    /// Advances every clock (by slightly different amounts) and runs expiry on every node,
    /// in the background.
    fn expire(&mut self, r: &mut Rng) {
        let base_ms = 1_000 + r.below(TTL_S_MAX * 1_000);
        for clock in self.c.clocks.values() {
            clock.advance_ms(base_ms + r.below(2_000));
        }
        eprintln!("  clocks advanced ~{base_ms} ms, expiry on every node");
        for node in self.c.nodes.values() {
            let node = node.clone();
            self.tasks.push(tokio::spawn(async move {
                node.expire_once(1_000).await;
            }));
        }
        self.event("expiry");
    }

    async fn step(&mut self, step: usize) {
        if self.fault.is_some_and(|(_, until)| step >= until) {
            self.end_fault().await;
        }
        self.spawn_writes();
        tokio::time::sleep(Duration::from_millis(self.rng.below(200))).await;
        let mut r = Rng(self.rng.next());
        match self.rng.below(10) {
            0 | 1 => self.event("writes only"),
            2..=4 if self.fault.is_none() => self.start_fault(step, &mut r).await,
            // While a replica is out, snapshots and purges leave it to catch up by snapshot.
            2..=4 => self.snapshot_and_purge(&mut r).await,
            5..=7 => self.transfer_leader(&mut r).await,
            8 => self.snapshot_and_purge(&mut r).await,
            _ => self.expire(&mut r),
        }
        tokio::time::sleep(Duration::from_millis(100 + self.rng.below(200))).await;
    }

    /// Waits for every write and expiry still running.
    async fn drain(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        let all = futures_util::future::join_all(tasks);
        let results = tokio::time::timeout(DRAIN_TIMEOUT, all)
            .await
            .unwrap_or_else(|_| panic!("seed {}: writes still running {DRAIN_TIMEOUT:?} after the run", self.seed));
        for r in results {
            r.unwrap_or_else(|e| panic!("seed {}: a write task failed: {e}", self.seed));
        }
    }

    /// One increment per partition must go through once everything is healed.
    async fn write_everywhere(&mut self) {
        for p in 0..PARTITIONS {
            let pid = PartitionId::new(p).unwrap();
            let start = Instant::now();
            loop {
                let l = self.c.leader(pid, Duration::from_secs(20)).await;
                let l = l.unwrap_or_else(|| panic!("seed {}: partition {p}: no leader after the heal", self.seed));
                let r = increment(&l, &digest_in(pid, 0), "healed").await;
                lock(&self.model).record((p, 0), Op::Increment, true, &r);
                match r {
                    Ok(_) => break,
                    Err(e) => assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "seed {}: partition {p}: no write accepted after the heal: {e}",
                        self.seed
                    ),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The model's checks on every key of every running replica.
    async fn check(&self) -> Coverage {
        let mut coverage = Coverage::default();
        let (counters, pds) = {
            let model = lock(&self.model);
            (model.counters.clone(), model.pd.clone())
        };
        for p in 0..PARTITIONS {
            let pid = PartitionId::new(p).unwrap();
            for (id, node) in &self.c.nodes {
                for k in 0..COUNTER_KEYS {
                    let (generation, counter) = read_counter(node, pid, k).await;
                    let t = counters.get(&(p, k)).map_or((0, 0), |t| (t.ok, t.in_doubt));
                    let at =
                        format!("seed {}: node {id} partition {p} counter key {k} ({t:?} ok, in doubt)", self.seed);
                    assert_eq!(generation, counter, "{at}: one generation per applied increment");
                    assert!(counter >= t.0, "{at}: an acknowledged increment is missing: counter {counter}");
                    assert!(counter <= t.0 + t.1, "{at}: a failed increment was applied: counter {counter}");
                    if *id == 1 {
                        coverage.in_doubt += t.1;
                        coverage.in_doubt_applied += counter - t.0;
                    }
                }
                for k in PD_KEY_FIRST..PD_KEY_FIRST + PD_KEYS {
                    let Some(pd) = pds.get(&(p, k)) else { continue };
                    let state = read_effect(node, pid, k).await;
                    let allowed = pd.allowed();
                    assert!(
                        allowed.contains(&state),
                        "seed {}: node {id} partition {p} key {k}: holds {state:?}, allowed {allowed:?}, history {:?}",
                        self.seed,
                        pd.history
                    );
                    if *id == 1 && state != allowed[0] {
                        coverage.in_doubt_applied += 1;
                    }
                }
            }
        }
        coverage
    }
}

/// How much of the model's room for doubt a run used (on node 1).
#[derive(Debug, Default)]
struct Coverage {
    /// In-doubt increments.
    in_doubt: i64,
    /// In-doubt increments applied, plus put/delete keys left by an in-doubt operation.
    in_doubt_applied: i64,
}

/// Generation and counter of a counter key on `node` (0, 0 when absent).
async fn read_counter(node: &ReplicaNode, pid: PartitionId, k: u32) -> (i64, i64) {
    let d = digest_in(pid, k);
    let e = node.engine().index().get(&d);
    if e.is_none_or(|e| e.is_tombstone()) {
        return (0, 0);
    }
    let r = node.engine().get_async(&d, &BinSelection::All).await.unwrap();
    let n = r.bins.iter().find(|b| b.name.as_bytes() == b"n").map(|b| b.value.clone());
    match n {
        Some(Value::Int(n)) => (i64::from(r.meta.generation), n),
        other => panic!("node {} partition {}: counter key {k} has bin n = {other:?}", node.id(), pid.get()),
    }
}

/// What a put/delete key holds on `node`.
async fn read_effect(node: &ReplicaNode, pid: PartitionId, k: u32) -> Effect {
    let d = digest_in(pid, k);
    if node.engine().index().get(&d).is_none_or(|e| e.is_tombstone()) {
        return Effect::Absent;
    }
    Effect::Value(read_counter(node, pid, k).await.1)
}

/// Whether any running replica holds an expiring key live.
fn live_expiring(c: &Cluster) -> Vec<(u64, u16, u32)> {
    let mut out = Vec::new();
    for (id, node) in &c.nodes {
        for &pid in &c.partitions {
            for k in EXPIRING_KEY_FIRST..EXPIRING_KEY_FIRST + EXPIRING_KEYS {
                if node.engine().index().get(&digest_in(pid, k)).is_some_and(|e| !e.is_tombstone()) {
                    out.push((*id, pid.get(), k));
                }
            }
        }
    }
    out
}

async fn run(name: &'static str, hibernation: Option<SleepConfig>) {
    let seed = seed();
    let _guard = SeedGuard { seed, name };
    let steps = steps();
    eprintln!("{name}: seed = {seed} (re-run with PEREGRINE_SEED={seed}), {steps} steps");
    let start = Instant::now();
    let c = Cluster::start_with(pids(PARTITIONS), fast_timers(), [0, 0, 0], hibernation).await;
    for &pid in &c.partitions {
        c.leader(pid, Duration::from_secs(20)).await.unwrap_or_else(|| panic!("seed {seed}: no first leader"));
    }
    let mut run = Run {
        seed,
        rng: Rng(seed),
        registry: Arc::new(Mutex::new(c.nodes.clone())),
        c,
        model: Arc::new(Mutex::new(Model::default())),
        tasks: Vec::new(),
        fault: None,
        next_value: 0,
        events: BTreeMap::new(),
    };
    for step in 0..steps {
        let led = run.c.partitions.iter().filter(|&&pid| run.leader_of(pid).is_some()).count();
        eprintln!("step {step} ({:?}): {led} of {PARTITIONS} partitions have a ready leader", start.elapsed());
        run.step(step).await;
    }
    run.end_fault().await;
    run.c.loopback.heal();
    run.drain().await;
    let ran = start.elapsed();
    run.write_everywhere().await;
    assert_identical(&run.c).await;
    let coverage = run.check().await;

    // Expiry: past every void time, each leader removes what expired, through the log.
    for clock in run.c.clocks.values() {
        clock.advance_ms(2 * TTL_S_MAX * 1_000 + 10_000);
    }
    let expiry_start = Instant::now();
    loop {
        for node in run.c.nodes.values() {
            node.expire_once(1_000).await;
        }
        assert_identical(&run.c).await;
        let live = live_expiring(&run.c);
        if live.is_empty() {
            break;
        }
        assert!(
            expiry_start.elapsed() < Duration::from_secs(20),
            "seed {seed}: expired records still live (node, partition, key): {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.check().await;

    {
        let model = lock(&run.model);
        let acked: i64 = model.counters.values().map(|t| t.ok).sum();
        assert!(acked > 0, "seed {seed}: no increment was acknowledged");
        eprintln!(
            "{name}: seed {seed}: {steps} steps in {ran:?}, checked after {:?}; events {:?}; results {:?}; \
             {} snapshots sent; {coverage:?}; in doubt or fatal: {:#?}",
            start.elapsed(),
            run.events,
            model.results,
            run.c.loopback.counts().snapshots,
            model.doubts
        );
    }
    run.c.stop_all().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// Both runs take the crate's cluster-test lock: they run one at a time, and never beside
// another in-process cluster test.

#[test]
fn seeded_writes_restarts_isolations_transfers_snapshots_and_expiry_keep_the_model() {
    let rt = runtime();
    let _serial = rt.block_on(serial());
    rt.block_on(run("random run", None));
}

#[test]
fn seeded_run_with_hibernation_keeps_the_model() {
    let rt = runtime();
    let _serial = rt.block_on(serial());
    rt.block_on(run("random run, hibernation on", Some(quick_sleep())));
}
