//! Power cuts at every device write, on the simulated device ([`peregrine_engine::io::sim`]).
//!
//! One scripted, single-threaded workload — puts of sizes from 200 B to 50 KB into 128 KiB
//! blocks, overwrites, deletes, per-write device durability, barriers, clean restarts,
//! defragmentation on a small device under churn, expiry with a manual clock, a set truncation
//! and a partition truncation — is first run uncut to count the N device writes it makes. Then,
//! for every k in 0..N (or an even sample when N is large), it is run again from scratch on a
//! fresh simulated device with a power cut armed at the k-th write, stopped at its first error,
//! and the engine is dropped. Several images of what the power cut may leave (seeded subsets of
//! the unsynced writes, each possibly torn at sector boundaries; only the synced writes; every
//! completed write) are each restored on the device, the engine is reopened on it and every key
//! is checked against a model of what was acknowledged: a durable write is there with its value
//! or a later one; nothing deleted, truncated or expired comes back; nothing never written
//! appears. Every third cut point also writes after recovery and restarts cleanly: what was
//! recovered must not change. Set `PEREGRINE_CRASH_SIM_SEEDS` for more seeded images per cut.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use peregrine_engine::clock::{CITRUSLEAF_EPOCH_UNIX_S, Clock, ManualClock};
use peregrine_engine::completion::block_on;
use peregrine_engine::io::IoBackendChoice;
use peregrine_engine::io::sim::{self, Fault, SimDevice};
use peregrine_engine::{
    Bin, BinSelection, Change, Digest, Durability, Engine, EngineConfig, Error, GenerationPolicy, KeyRef, PartitionId,
    RecordExists, Ttl, Value, WritePolicy,
};

use crate::common::*;

/// 16 blocks of 128 KiB: the workload writes more than the data region, so freed blocks are
/// reused, and defragmentation must run to keep it going. (Small, because checksumming is most
/// of the cost of a run in debug builds.)
const DEVICE_BYTES: u64 = 3 << 20;
/// Keys of set "s" (the first `HOT_KEYS` of them take the churn).
const S_KEYS: i64 = 24;
const HOT_KEYS: u64 = 8;
/// Keys of set "t" (truncated as a set).
const T_KEYS: i64 = 10;
/// Record sizes: many per block, and 50 KB ones that only fit two to a block.
const SIZES: [usize; 6] = [200, 1_000, 3_000, 8_000, 20_000, 50_000];
/// The clock starts here (well after the void-time epoch).
const START_MS: u64 = (CITRUSLEAF_EPOCH_UNIX_S + 10_000_000) * 1000;
/// TTL of the expiring puts; the script advances the clock past it once.
const TTL_S: u32 = 30;
/// At most this many cut points (evenly sampled beyond it) keep the test near a minute in debug.
const MAX_CUTS: u64 = 400;

/// A key of the model: set "s" or "t", and an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    t: bool,
    k: i64,
}

impl Key {
    fn s(k: i64) -> Key {
        Key { t: false, k }
    }

    fn t(k: i64) -> Key {
        Key { t: true, k }
    }

    fn set(self) -> &'static [u8] {
        if self.t { b"t" } else { b"s" }
    }

    fn digest(self) -> Digest {
        Digest::of_key(self.set(), KeyRef::Int(self.k))
    }

    /// The value's seed: distinct between the sets.
    fn seed(self) -> i64 {
        self.k + if self.t { 1 << 32 } else { 0 }
    }
}

/// The bins of `key` at version `ver`: a blob of `len` bytes and the version as an integer.
fn versioned(key: Key, ver: u64, len: usize) -> Vec<Bin> {
    vec![
        Bin::new("v", Value::Blob(value_bytes(key.seed(), ver, len))).unwrap(),
        Bin::new("ver", Value::Int(ver as i64)).unwrap(),
    ]
}

/// One step of the script.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A put (create or replace), expiring after [`TTL_S`] when `expiring`; with `durable` it
    /// returns only once on the device (`Durability::Device`), else once buffered.
    Put { key: Key, len: usize, expiring: bool, durable: bool },
    /// A delete (a tombstone), durable or buffered.
    Delete { key: Key, durable: bool },
    /// `Engine::barrier`: everything acknowledged before it is durable once it returns.
    Barrier,
    /// Moves the manual clock forward.
    Advance { ms: u64 },
    /// `Engine::reap_expired`.
    Reap,
    /// `Engine::truncate(Some("t"), None)`.
    TruncateSet,
    /// `Engine::truncate_partition` of this key's partition.
    TruncatePartition { of: Key },
    /// A clean restart: `Engine::close` (everything acknowledged is durable once it returns)
    /// and `Engine::open` on the same device.
    Restart,
    /// Waits until the defragmenter has taken every block below the low-water mark. Right after
    /// a restart it looks at once (when idle, only every 200 ms), so the moves happen at the same
    /// point of every run.
    Defrag,
}

/// The script, with the bins of every put made once (building large values is slow in debug).
struct Script {
    steps: Vec<Step>,
    /// `bins[i]`: what step `i` puts (empty for other steps); its version is `i + 1`.
    bins: Vec<Vec<Bin>>,
    /// What [`check_reopened`] writes after recovery, with its keys.
    extra: Vec<(Key, Vec<Bin>)>,
}

impl Script {
    fn new() -> Script {
        let steps = steps();
        let bins = steps
            .iter()
            .enumerate()
            .map(|(i, s)| match *s {
                Step::Put { key, len, .. } => versioned(key, i as u64 + 1, len),
                _ => Vec::new(),
            })
            .collect();
        let extra = (0..6).map(|k| (Key::s(1000 + k), versioned(Key::s(1000 + k), 7, SIZES[k as usize]))).collect();
        Script { steps, bins, extra }
    }

    /// The bins version `ver` stored.
    fn bins_of(&self, ver: u64) -> &[Bin] {
        &self.bins[ver as usize - 1]
    }
}

/// The deterministic steps.
fn steps() -> Vec<Step> {
    let mut rng = Rng(0xC0FF_EE15_5EED_0001);
    let mut steps = Vec::new();
    let size = |rng: &mut Rng| SIZES[rng.below(SIZES.len() as u64) as usize];
    // Fill: every key once, a few expiring, some durable, barriers now and then.
    for i in 0..(S_KEYS + T_KEYS) {
        let key = if i < S_KEYS { Key::s(i) } else { Key::t(i - S_KEYS) };
        let len = size(&mut rng);
        steps.push(Step::Put { key, len, expiring: i % 7 == 3, durable: i % 5 == 0 });
        if i % 12 == 11 {
            steps.push(Step::Barrier);
        }
    }
    steps.push(Step::Barrier);
    // Churn on the hot keys: dead space everywhere, defrag and block reuse.
    let churn = |rng: &mut Rng, steps: &mut Vec<Step>, n: u64| {
        for i in 0..n {
            let r = rng.below(100);
            let key =
                if r.is_multiple_of(9) { Key::t(rng.below(4) as i64) } else { Key::s(rng.below(HOT_KEYS) as i64) };
            if r < 10 {
                steps.push(Step::Delete { key, durable: r < 4 });
            } else {
                steps.push(Step::Put { key, len: size(rng), expiring: r.is_multiple_of(13), durable: r < 28 });
            }
            if i % 16 == 15 {
                steps.push(Step::Barrier);
            }
        }
    };
    churn(&mut rng, &mut steps, 100);
    steps.push(Step::Restart);
    steps.push(Step::Defrag);
    steps.push(Step::Barrier);
    // Expiry: the expiring puts die; the reaper removes them (tombstones where older copies are).
    steps.push(Step::Advance { ms: u64::from(TTL_S) * 1000 + 5_000 });
    steps.push(Step::Reap);
    steps.push(Step::Put { key: Key::s(3), len: 9_000, expiring: false, durable: false });
    steps.push(Step::Barrier);
    // Truncations: every earlier version is well before the cutoffs.
    steps.push(Step::Advance { ms: 10_000 });
    steps.push(Step::TruncateSet);
    steps.push(Step::Put { key: Key::t(0), len: 1_500, expiring: false, durable: true });
    steps.push(Step::Put { key: Key::t(1), len: 30_000, expiring: false, durable: false });
    steps.push(Step::TruncatePartition { of: Key::s(20) });
    steps.push(Step::Put { key: Key::s(20), len: 4_000, expiring: false, durable: false });
    steps.push(Step::Barrier);
    churn(&mut rng, &mut steps, 50);
    steps.push(Step::Restart);
    steps.push(Step::Defrag);
    steps.push(Step::Barrier);
    steps
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Acknowledged as durable (returned Ok with device durability, or before a barrier that
    /// returned Ok, or a truncation that returned Ok).
    Durable,
    /// Returned Ok, buffered: a crash may lose it.
    Acked,
    /// Failed (the power was cut around it): it may or may not have happened.
    Maybe,
}

/// What an operation left the key as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Version `ver` (the bins of step `ver - 1`), expiring at `void_time` (0 = never).
    Value { ver: u64, void_time: u32 },
    /// Deleted, truncated (what says which).
    Gone(&'static str),
}

#[derive(Clone, Copy, Debug)]
struct Event {
    step: usize,
    state: State,
    status: Status,
}

/// Per key, every operation that changed (or may have changed) it, in order.
#[derive(Clone, Debug, Default)]
struct Model {
    keys: BTreeMap<Key, Vec<Event>>,
}

impl Model {
    fn push(&mut self, key: Key, step: usize, state: State, status: Status) {
        self.keys.entry(key).or_default().push(Event { step, state, status });
    }

    /// A barrier returned Ok: everything acknowledged before it is durable.
    fn barrier(&mut self) {
        for e in self.keys.values_mut().flat_map(|h| h.iter_mut()) {
            if e.status == Status::Acked {
                e.status = Status::Durable;
            }
        }
    }

    /// What reading `key` may find after a crash, at void time `now`: the state of the last
    /// durable operation or of any later one (absent too when none is durable). Expired values
    /// read as absent.
    fn allowed(&self, key: Key, now: u32) -> Vec<Option<u64>> {
        let history = self.keys.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let from = history.iter().rposition(|e| e.status == Status::Durable);
        let mut out: Vec<Option<u64>> = Vec::new();
        if from.is_none() {
            out.push(None);
        }
        for e in &history[from.unwrap_or(0)..] {
            out.push(match e.state {
                State::Value { ver, void_time } if void_time == 0 || void_time > now => Some(ver),
                _ => None,
            });
        }
        out.dedup();
        out
    }
}

/// The simulated device and engine configuration of one run.
struct Rig {
    dir: TestDir,
    path: PathBuf,
}

impl Rig {
    /// A fresh directory and a fresh simulated device (512-byte sectors) at its device path.
    fn new() -> (Rig, Arc<SimDevice>) {
        let dir = test_dir();
        let path = device_path(dir.path());
        // Sized up front: a device the engine's zero-fill extends write by write is slow in debug.
        let dev = sim::device_for_path(&path, DEVICE_BYTES, sim::DEFAULT_GRANULE);
        (Rig { dir, path }, dev)
    }

    fn config(&self, clock_ms: u64) -> EngineConfig {
        engine_config(self.dir.path(), Arc::new(ManualClock::new(clock_ms)))
    }
}

fn engine_config(dir: &Path, clock: Arc<dyn Clock>) -> EngineConfig {
    let mut c = config(dir, IoBackendChoice::Simulated, DEVICE_BYTES);
    c.clock = clock;
    // Device writes only when a block fills or someone waits for durability: the same script
    // makes (nearly) the same writes every time.
    c.writer.flush_interval_ms = 0;
    c.defrag_sleep_us = 0;
    c.defrag_wait_ms = 2_000;
    c.expiry_period_s = 0;
    c
}

/// What a run of the script did.
struct Run {
    model: Model,
    /// Clock when it stopped.
    clock_ms: u64,
    /// Steps completed (the first error stops the run); `None` when `Engine::open` failed.
    completed: Option<usize>,
    /// The first error, with the step it happened at.
    error: Option<(usize, String)>,
    /// Device writes when `Engine::open` returned.
    writes_at_open: u64,
    /// Over the engines of the run (one per restart): records moved by defrag, blocks it
    /// processed, record bytes appended.
    defrag_moved: u64,
    defrag_blocks: u64,
    appended: u64,
    reaped: u64,
    truncated: u64,
}

impl Run {
    fn tally(&mut self, e: &Engine) {
        let s = e.stats();
        let d = &s.devices[0];
        self.defrag_moved += d.defrag_records_moved;
        self.defrag_blocks += d.defrag_blocks;
        self.appended += d.appended_bytes;
    }
}

/// Prepare + apply with device durability (the per-write durability a replica-less caller gets
/// with `commit_to_device`). `Ok(false)`: nothing to do (a delete of a missing record).
fn durable_change(e: &Engine, digest: &Digest, change: &Change) -> peregrine_engine::Result<bool> {
    for _ in 0..64 {
        let prepared = block_on(e.prepare_async(digest, false, 0, |_| Ok(change.clone())))?;
        if prepared.version.is_none() {
            return Ok(false);
        }
        // `None`: the entry changed since the prepare (defrag moved it): decide again.
        if block_on(e.apply_prepared_async(&prepared, Durability::Device))?.is_some() {
            return Ok(true);
        }
    }
    panic!("a durable write kept conflicting");
}

/// Runs the script against an engine on the rig's device; stops at the first error.
fn run_script(rig: &Rig, script: &Script) -> Run {
    let clock = Arc::new(ManualClock::new(START_MS));
    let dev = sim::lookup(&rig.path).unwrap();
    let mut run = Run {
        model: Model::default(),
        clock_ms: START_MS,
        completed: None,
        error: None,
        writes_at_open: 0,
        defrag_moved: 0,
        defrag_blocks: 0,
        appended: 0,
        reaped: 0,
        truncated: 0,
    };
    let mut e = match Engine::open(engine_config(rig.dir.path(), clock.clone())) {
        Ok(e) => e,
        Err(err) => {
            run.error = Some((0, format!("open: {err}")));
            return run;
        }
    };
    run.writes_at_open = dev.writes();
    let mut done = 0;
    for (i, step) in script.steps.iter().enumerate() {
        let ver = i as u64 + 1;
        let result: peregrine_engine::Result<()> = match *step {
            Step::Put { key, expiring, durable, .. } => {
                let void_time = if expiring { clock.now_void_s() + TTL_S } else { 0 };
                let state = State::Value { ver, void_time };
                let bins = script.bins[i].clone();
                let r = if durable {
                    let change = Change::Put {
                        set_name: key.set().to_vec(),
                        key: Some(crate::common::key(key.k)),
                        bins,
                        void_time,
                    };
                    durable_change(&e, &key.digest(), &change).map(|_| ())
                } else {
                    let ttl = if expiring { Ttl::Seconds(TTL_S) } else { Ttl::Never };
                    let policy = WritePolicy { exists: RecordExists::Replace, ttl, ..WritePolicy::default() };
                    e.put(&key.digest(), key.set(), Some(crate::common::key(key.k)), bins, &policy).map(|m| {
                        assert_eq!(m.void_time, void_time, "void time of step {i}");
                    })
                };
                let status = match (&r, durable) {
                    (Ok(()), true) => Status::Durable,
                    (Ok(()), false) => Status::Acked,
                    (Err(_), _) => Status::Maybe,
                };
                run.model.push(key, i, state, status);
                r
            }
            Step::Delete { key, durable } => {
                let r = if durable {
                    durable_change(&e, &key.digest(), &Change::Delete)
                } else {
                    match e.delete(&key.digest(), GenerationPolicy::None) {
                        Ok(()) => Ok(true),
                        Err(Error::NotFound) => Ok(false),
                        Err(err) => Err(err),
                    }
                };
                match &r {
                    Ok(true) => run.model.push(
                        key,
                        i,
                        State::Gone("deleted"),
                        if durable { Status::Durable } else { Status::Acked },
                    ),
                    Ok(false) => {} // nothing to delete: nothing written
                    Err(_) => run.model.push(key, i, State::Gone("deleted"), Status::Maybe),
                }
                r.map(|_| ())
            }
            Step::Barrier => {
                let r = block_on(e.barrier());
                if r.is_ok() {
                    run.model.barrier();
                }
                r
            }
            Step::Advance { ms } => {
                clock.advance_ms(ms);
                run.clock_ms = clock.now_unix_ms();
                Ok(())
            }
            Step::Restart => {
                run.tally(&e);
                let r = e.close();
                if r.is_ok() {
                    run.model.barrier();
                }
                r.and_then(|()| {
                    drop(std::mem::replace(&mut e, Engine::open(engine_config(rig.dir.path(), clock.clone()))?));
                    Ok(())
                })
            }
            Step::Defrag => {
                let waited = Instant::now();
                loop {
                    let b = e.stats().devices[0].blocks;
                    if (b.defrag_eligible == 0 && b.defrag == 0) || dev.is_cut() || waited.elapsed().as_secs() >= 2 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Ok(())
            }
            Step::Reap => {
                run.reaped += e.reap_expired();
                Ok(())
            }
            Step::TruncateSet => {
                let r = block_on(e.truncate(Some(b"t"), None));
                let status = if r.is_ok() { Status::Durable } else { Status::Maybe };
                let keys: Vec<Key> = run.model.keys.keys().copied().filter(|k| k.t).collect();
                for key in keys {
                    run.model.push(key, i, State::Gone("set truncated"), status);
                }
                r.map(|n| run.truncated += n)
            }
            Step::TruncatePartition { of } => {
                let pid = of.digest().partition();
                let r = block_on(e.truncate_partition(pid));
                let status = if r.is_ok() { Status::Durable } else { Status::Maybe };
                let keys: Vec<Key> = run.model.keys.keys().copied().filter(|k| k.digest().partition() == pid).collect();
                for key in keys {
                    run.model.push(key, i, State::Gone("partition truncated"), status);
                }
                r.map(|n| run.truncated += n)
            }
        };
        if let Err(err) = result {
            run.error = Some((i, format!("{step:?}: {err}")));
            break;
        }
        done = i + 1;
    }
    run.completed = Some(done);
    run.tally(&e);
    run
}

/// Reopens the engine on the rig's device (holding some crash image) and checks every key
/// against the model; with `then_write`, also that the recovered engine takes new durable writes
/// and that a clean restart after them changes nothing. Returns the first violation.
fn check_reopened(rig: &Rig, script: &Script, run: &Run, label: &str, then_write: bool) -> Result<(), String> {
    let cfg = rig.config(run.clock_ms);
    let now = cfg.clock.now_void_s();
    let e = match catch_unwind(AssertUnwindSafe(|| Engine::open(cfg.clone()))) {
        Ok(Ok(e)) => e,
        Ok(Err(err)) => return Err(format!("{label}: the engine did not open: {err}")),
        Err(p) => return Err(format!("{label}: the engine panicked while opening: {}", panic_message(&p))),
    };
    let checked = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let found = check_keys(&e, script, &run.model, now, label)?;
        if !then_write {
            let _ = e.close();
            return Ok(());
        }
        for (key, bins) in &script.extra {
            let change = Change::Put { set_name: b"s".to_vec(), key: None, bins: bins.clone(), void_time: 0 };
            durable_change(&e, &key.digest(), &change)
                .map_err(|err| format!("{label}: a write after recovery failed: {err}"))?;
        }
        e.close().map_err(|err| format!("{label}: close after recovery failed: {err}"))?;
        drop(e);
        let e = Engine::open(cfg.clone()).map_err(|err| format!("{label}: the reopen after that failed: {err}"))?;
        let label = format!("{label}, then writes and a clean restart");
        let again = check_keys(&e, script, &run.model, now, &label)?;
        if again != found {
            return Err(format!("{label}: the restart changed what was recovered: {found:?} became {again:?}"));
        }
        for (key, bins) in &script.extra {
            match e.get(&key.digest(), &BinSelection::All) {
                Ok(r) if r.bins == *bins => {}
                other => return Err(format!("{label}: {key:?}, written durably after recovery, reads {other:?}")),
            }
        }
        let _ = e.close();
        Ok(())
    }));
    checked.unwrap_or_else(|p| Err(format!("{label}: panic while checking: {}", panic_message(&p))))
}

/// Checks every model key, and that no record outside the model (and `script.extra`) is there;
/// returns the version each key held.
fn check_keys(e: &Engine, script: &Script, model: &Model, now: u32, label: &str) -> Result<Vec<Option<u64>>, String> {
    let mut found_all = Vec::new();
    for (&key, history) in &model.keys {
        let found = match e.get(&key.digest(), &BinSelection::All) {
            Ok(r) => match r.bin("ver") {
                Some(Value::Int(ver)) if *ver > 0 && (*ver as usize) <= script.steps.len() => {
                    let ver = *ver as u64;
                    if r.bins != script.bins_of(ver) {
                        return Err(format!("{label}: {key:?} reads as version {ver} WITH WRONG BYTES"));
                    }
                    Some(ver)
                }
                _ => return Err(format!("{label}: {key:?} holds a record that was never written: {r:?}")),
            },
            Err(Error::NotFound) => None,
            Err(err) => return Err(format!("{label}: reading {key:?}: {err}")),
        };
        let allowed = model.allowed(key, now);
        if !allowed.contains(&found) {
            let lines: Vec<String> =
                history.iter().map(|e| format!("step {}: {:?} {:?}", e.step, e.status, e.state)).collect();
            return Err(format!(
                "{label}: {key:?} reads as {found:?} (version, None = absent); allowed from its last durable \
                 operation on: {allowed:?}; void time now {now}; its history:\n  {}",
                lines.join("\n  ")
            ));
        }
        found_all.push(found);
    }
    // Nothing else is indexed (a cheap count first; the listing only to name the intruder).
    let mut known: Vec<Digest> = model.keys.keys().map(|k| k.digest()).collect();
    known.extend(script.extra.iter().map(|(k, _)| k.digest()));
    let indexed = known.iter().filter(|d| e.index().get(d).is_some()).count() as u64;
    if e.index().len() != indexed {
        for pid in PartitionId::all() {
            for entry in e.index().sorted_entries(pid, None) {
                if !known.contains(&entry.digest) {
                    return Err(format!("{label}: a record that was never written appeared: {entry:?}"));
                }
            }
        }
    }
    Ok(found_all)
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The fault armed at cut point `k`: mostly torn writes (half the sectors land), some clean cuts
/// and some writes torn after one sector.
fn fault_for(k: u64) -> Fault {
    match k % 3 {
        0 => Fault::Torn,
        1 => Fault::Cut,
        _ => Fault::TornAfter(1),
    }
}

/// Which crash images to try after cut `k`: a few seeded ones, only-the-synced-writes, and
/// every-completed-write.
#[derive(Clone, Copy, Debug)]
enum Image {
    Seeded(u64),
    SyncedOnly,
    Live,
}

impl std::fmt::Display for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Seeded(seed) => write!(f, "crash_image({seed})"),
            Image::SyncedOnly => f.write_str("crash_image_synced_only()"),
            Image::Live => f.write_str("live_image()"),
        }
    }
}

/// Set to a number of seeded crash images per cut point for a deeper (slower) sweep.
const SEEDS_ENV: &str = "PEREGRINE_CRASH_SIM_SEEDS";

/// The images tried after cut `k`: one seeded image (two for even `k`, or as many as
/// [`SEEDS_ENV`] says), only the synced writes, every completed write.
fn images_for(k: u64) -> Vec<Image> {
    let seeds =
        std::env::var(SEEDS_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(if k.is_multiple_of(2) { 2 } else { 1 });
    let mut v: Vec<Image> = (0..seeds).map(|i| Image::Seeded(k + i * 1_000_003)).collect();
    v.extend([Image::SyncedOnly, Image::Live]);
    v
}

/// One cut point: run the script with a power cut at write `k`, crash, check every image.
/// Returns the violations found, the run, and whether the cut hit write `k` (else the power was
/// cut after the run).
fn cut_at(script: &Script, k: u64) -> (Vec<String>, Run, bool) {
    let (rig, dev) = Rig::new();
    let fault = fault_for(k);
    dev.arm_at_write_index(k, fault);
    let run = run_script(&rig, script);
    let fired = dev.is_cut();
    if !fired {
        // The run made fewer writes this time (defrag timing differs a little): cut at its end.
        dev.cut_now();
    }
    // Whatever happened, the engine was dropped by `run_script` (its close fails: no power).
    let images: Vec<(Image, Vec<u8>)> = images_for(k)
        .into_iter()
        .map(|which| {
            let image = match which {
                Image::Seeded(seed) => dev.crash_image(seed),
                Image::SyncedOnly => dev.crash_image_synced_only(),
                Image::Live => dev.live_image(),
            };
            (which, image)
        })
        .collect();
    let mut failures = Vec::new();
    for (i, (which, image)) in images.into_iter().enumerate() {
        dev.restore_from(&image);
        let label = format!(
            "cut at write {k} ({fault:?}), image {which}; the run stopped at {:?} after {:?} steps",
            run.error, run.completed
        );
        // Every third cut point also checks that the recovered engine keeps working.
        if let Err(msg) = check_reopened(&rig, script, &run, &label, i == 0 && k.is_multiple_of(3)) {
            failures.push(msg);
        }
    }
    (failures, run, fired)
}

/// The cut points for a run of `n` writes: all of them, or an even sample of [`MAX_CUTS`]
/// (always including the first writes, which format the device).
fn cut_points(n: u64) -> Vec<u64> {
    if n <= MAX_CUTS {
        return (0..n).collect();
    }
    let mut v: Vec<u64> = (0..16).collect();
    let rest = MAX_CUTS - 16;
    v.extend((0..rest).map(|i| 16 + i * (n - 16) / rest));
    v.dedup();
    v
}

#[test]
fn power_cut_after_every_write_loses_no_durable_write_and_resurrects_nothing() {
    let started = Instant::now();
    let script = Script::new();
    // Uncut: count the writes, and check the script does what it is meant to.
    let (rig, dev) = Rig::new();
    let uncut = run_script(&rig, &script);
    assert_eq!(uncut.error, None, "the uncut script must not fail");
    let n = dev.writes();
    eprintln!(
        "uncut: {} steps, {n} device writes ({} before the engine opened), {} syncs, {} records moved by defrag \
         over {} blocks, {} record bytes appended, {} reaped, {} truncated",
        script.steps.len(),
        uncut.writes_at_open,
        dev.syncs(),
        uncut.defrag_moved,
        uncut.defrag_blocks,
        uncut.appended,
        uncut.reaped,
        uncut.truncated,
    );
    assert!(uncut.defrag_moved > 0, "defrag never ran");
    assert!(uncut.reaped > 0, "nothing expired");
    assert!(uncut.truncated > 0, "nothing truncated");
    // The final state after a clean shutdown, too.
    dev.cut_now();
    dev.restore_from(&dev.live_image());
    check_reopened(&rig, &script, &uncut, "uncut, clean", true).unwrap();
    let e = Engine::open(rig.config(uncut.clock_ms)).unwrap();
    let r = &e.recovery_report()[0];
    assert!(r.max_sequence > u64::from(r.blocks_total), "the script does not reuse blocks: {r:?}");
    drop(e);
    drop(rig);

    let cuts = cut_points(n);
    let mut failures: Vec<(u64, String)> = Vec::new();
    let (mut stopped_in_open, mut images, mut missed) = (0, 0, 0);
    for &k in &cuts {
        images += images_for(k).len();
        let (f, run, fired) = cut_at(&script, k);
        stopped_in_open += usize::from(run.completed.is_none());
        missed += usize::from(!fired);
        failures.extend(f.into_iter().map(|m| (k, m)));
    }
    eprintln!(
        "{} cut points over {n} writes ({}), {stopped_in_open} of them while the engine was opening, {missed} \
         after the end of a run that wrote less; {images} crash images checked; {:.1} s",
        cuts.len(),
        if cuts.len() as u64 == n { "every write" } else { "an even sample" },
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let mut ks: Vec<u64> = failures.iter().map(|(k, _)| *k).collect();
        ks.dedup();
        panic!("{} violations at {} cut points {ks:?}; the first:\n{}", failures.len(), ks.len(), failures[0].1);
    }
}

/// A crash that keeps the records of a freshly written block but not the sector holding its
/// header leaves bytes that recovery rightly ignores (the block has no valid header). But the
/// engine then hands out the same block with the same sequence again (recovery resumes the
/// sequence after the highest one it saw), and record checksums are seeded with the sequence
/// alone: once the new incarnation's fill ends where a record of the lost one starts (here after
/// one record of the same size, at a 4 KiB boundary, so no zeroed tail covers it), the next cold
/// start reads on into the lost records and they come back. Here a delete that the crash lost,
/// after recovery had shown the record (durable, never deleted since) for a whole session.
#[test]
fn records_of_a_block_lost_in_a_crash_stay_lost_after_its_sequence_is_reused() {
    use peregrine_engine::format::DATA_OFFSET_BYTES;
    let (rig, dev) = Rig::new();
    let cfg = rig.config(START_MS);
    let policy = WritePolicy { exists: RecordExists::Replace, ..WritePolicy::default() };
    let put = |e: &Engine, key: Key, len: usize| e.put(&key.digest(), b"s", None, versioned(key, 1, len), &policy);
    // (block, offset in block, extent) of a key's record.
    let location = |e: &Engine, key: Key| {
        let loc = e.index().get(&key.digest()).unwrap().location;
        let rel = loc.offset - DATA_OFFSET_BYTES;
        (rel / u64::from(TEST_BLOCK_BYTES), rel % u64::from(TEST_BLOCK_BYTES), loc.size)
    };
    let e = Engine::open(cfg.clone()).unwrap();
    let d = Key::s(1);
    let change = Change::Put { set_name: b"s".to_vec(), key: None, bins: versioned(d, 1, 1000), void_time: 0 };
    durable_change(&e, &d.digest(), &change).unwrap();
    // Records of 4032 bytes: the first of a block fills it to 4096 exactly.
    put(&e, Key::s(99), 3900).unwrap();
    let len = 3900 + 4032 - location(&e, Key::s(99)).2 as usize;
    let mut k = 100;
    while location(&e, Key::s(k - 1)).0 < 2 {
        put(&e, Key::s(k), len).unwrap();
        k += 1;
    }
    assert_eq!(location(&e, Key::s(k - 1)), (2, 64, 4032), "the first record of block 2");
    // A buffered delete: its tombstone is the second record of block 2, at 4096.
    e.delete(&d.digest(), GenerationPolicy::None).unwrap();
    assert_eq!(location(&e, d).1, 4096);
    // Fill block 2: it is sealed and written in the background, and not synced.
    while location(&e, Key::s(k - 1)).0 < 3 {
        put(&e, Key::s(k), len).unwrap();
        k += 1;
    }
    let block2 = DATA_OFFSET_BYTES + 2 * u64::from(TEST_BLOCK_BYTES);
    while !dev.unsynced_writes().iter().any(|(offset, _)| *offset == block2) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    dev.cut_now();
    drop(e);
    // The crash keeps every write but the first sector of block 2 (sectors land independently).
    let mut image = dev.live_image();
    let header = block2 as usize..block2 as usize + sim::DEFAULT_GRANULE;
    image[header.clone()].copy_from_slice(&dev.crash_image_synced_only()[header]);
    dev.restore_from(&image);

    let e = Engine::open(cfg.clone()).unwrap();
    assert_eq!(e.get(&d.digest(), &BinSelection::All).unwrap().bins, versioned(d, 1, 1000), "the delete was lost");
    // One record of the same size: block 2 again, with the same sequence, filled to 4096.
    let x = Key::s(5000);
    put(&e, x, len).unwrap();
    assert_eq!(location(&e, x), (2, 64, 4032));
    e.close().unwrap();
    drop(e);
    // A clean restart must not change what the first recovery showed.
    let e = Engine::open(cfg).unwrap();
    let got = e.get(&d.digest(), &BinSelection::All).map(|r| r.bins);
    assert_eq!(got.ok(), Some(versioned(d, 1, 1000)), "the lost delete came back after a clean restart");
    let lost_put = e.get(&Key::s(k - 2).digest(), &BinSelection::All);
    assert!(matches!(lost_put, Err(Error::NotFound)), "a lost put came back");
    e.close().unwrap();
}
