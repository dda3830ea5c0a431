//! The load driver: `concurrency` tasks take operation numbers from a shared counter, wait for
//! their scheduled start when a target rate is set, run the operation and record its latency
//! (from the scheduled start, so a stalled target cannot hide queueing: no coordinated
//! omission). A reporter drains the tasks' recorders once a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cli::{RunArgs, SizeRange, Workload};
use crate::report::{Interval, Point, progress_line};
use crate::target::{ErrorKind, Target};
use crate::workload::{Chooser, Op, Rng, check_bins, make_bins};

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Wall time of the measured phase.
    pub elapsed: Duration,
    /// Totals over the run.
    pub total: Interval,
    /// Per-second points (for plots and the JSON series).
    pub points: Vec<Point>,
    /// Per-second histograms (for the interval log).
    pub intervals: Vec<(Duration, Interval)>,
    /// The first few verification failures.
    pub verify_failures: Vec<String>,
}

/// Longest wait between retries of a write the target refused as overloaded.
const OVERLOAD_BACKOFF_MAX: Duration = Duration::from_millis(20);

struct Shared {
    target: Arc<Target>,
    next_seq: AtomicU64,
    stop: AtomicBool,
    started: Instant,
    rate: Option<f64>,
    op_limit: u64,
    size: SizeRange,
    bins: u16,
    verify: bool,
    version_base: u64,
    failures: Mutex<Vec<String>>,
}

/// Runs the workload described by `args` against `target` and returns what it measured.
pub async fn run(args: &RunArgs, target: Arc<Target>) -> Outcome {
    let op_limit = match args.workload {
        Workload::Insert => args.ops.map_or(args.keys, |o| o.min(args.keys)),
        _ => args.ops.unwrap_or(u64::MAX),
    };
    let version_base =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64) << 20;
    let shared = Arc::new(Shared {
        target,
        next_seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        started: Instant::now(),
        rate: args.target_rate.map(|r| r as f64),
        op_limit,
        size: args.object_size,
        bins: args.bins,
        verify: args.verify,
        version_base,
        failures: Mutex::new(Vec::new()),
    });
    let tasks = u64::from(args.concurrency);
    let mut recorders = Vec::new();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mut chooser = Chooser::new(args.keys, args.workload, args.zipf, args.batch_size);
        if args.verify && args.workload != Workload::Insert {
            chooser = chooser.owned_by(t, tasks);
        }
        let recorder = Arc::new(Mutex::new(Interval::default()));
        recorders.push(recorder.clone());
        let shared = shared.clone();
        let rng = Rng::new(args.seed ^ (t + 1).wrapping_mul(0x1234_5678_9ABC_DEF1));
        handles.push(tokio::spawn(worker(shared, chooser, rng, recorder)));
    }

    let deadline = args.duration.map(|d| shared.started + Duration::from_secs_f64(d));
    let mut points = Vec::new();
    let mut intervals = Vec::new();
    let mut total = Interval::default();
    let mut last = shared.started;
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        let finished = handles.iter().all(|h| h.is_finished());
        if !finished {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = wait_all_finished(&handles) => {}
            }
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            shared.stop.store(true, Ordering::SeqCst);
        }
        let done = shared.stop.load(Ordering::SeqCst) || handles.iter().all(|h| h.is_finished());
        if done {
            shared.stop.store(true, Ordering::SeqCst);
            for h in handles.drain(..) {
                let _ = h.await;
            }
        }
        let iv = drain(&recorders);
        let point = Point::of_interval(
            now.duration_since(shared.started).as_secs_f64(),
            now.duration_since(last).as_secs_f64(),
            &iv,
        );
        if !args.quiet && (iv.read.len() + iv.write.len() > 0 || iv.errors.iter().any(|&n| n > 0) || !done) {
            eprintln!("{}", progress_line(&point));
        }
        total.merge(&iv);
        intervals.push((last.duration_since(shared.started), iv));
        points.push(point);
        last = now;
        if done {
            break;
        }
    }
    let failures = std::mem::take(&mut *shared.failures.lock().unwrap_or_else(PoisonError::into_inner));
    Outcome { elapsed: last.duration_since(shared.started), total, points, intervals, verify_failures: failures }
}

async fn wait_all_finished(handles: &[tokio::task::JoinHandle<()>]) {
    while !handles.iter().all(|h| h.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn drain(recorders: &[Arc<Mutex<Interval>>]) -> Interval {
    let mut out = Interval::default();
    for r in recorders {
        let iv = std::mem::take(&mut *r.lock().unwrap_or_else(PoisonError::into_inner));
        out.merge(&iv);
    }
    out
}

async fn worker(shared: Arc<Shared>, chooser: Chooser, mut rng: Rng, recorder: Arc<Mutex<Interval>>) {
    // Versions this task wrote, per key (with --verify each key belongs to one task).
    let mut written: HashMap<u64, u64> = HashMap::new();
    let local = Recorder(recorder);
    while !shared.stop.load(Ordering::Relaxed) {
        // Engine calls served from memory complete without ever suspending; spend tokio's
        // cooperative budget so one task cannot starve the others (or the timer that stops the
        // run).
        tokio::task::consume_budget().await;
        let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
        if seq >= shared.op_limit {
            break;
        }
        let scheduled = match shared.rate {
            Some(rate) => {
                let at = shared.started + Duration::from_secs_f64(seq as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        match chooser.choose(&mut rng, seq) {
            Op::Read(keys) => {
                let result = if keys.len() == 1 {
                    shared.target.read(keys[0]).await.map(|r| vec![r])
                } else {
                    shared.target.read_batch(&keys).await
                };
                match result {
                    Ok(rows) => {
                        local.read(scheduled.elapsed());
                        for (k, row) in keys.iter().zip(rows) {
                            check_read(&shared, &written, *k, row, &local);
                        }
                    }
                    Err(kind) => local.error(kind),
                }
            }
            Op::Write { key, replace } => {
                let version = shared.version_base + seq;
                let bins = make_bins(key, version, shared.size, shared.bins);
                // An overloaded target (a full write queue, or defrag still freeing space) asks
                // clients to back off: count it, wait, try again. "Device full" means full of
                // live data: counted, not retried, so a run can end.
                let mut backoff = Duration::from_micros(200);
                let result = loop {
                    match shared.target.write(key, bins.clone(), replace).await {
                        Err(ErrorKind::Overload) if !shared.stop.load(Ordering::Relaxed) => {
                            local.error(ErrorKind::Overload);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(OVERLOAD_BACKOFF_MAX);
                        }
                        other => break other,
                    }
                };
                match result {
                    Ok(()) => {
                        local.write(scheduled.elapsed());
                        if shared.verify {
                            written.insert(key, version);
                        }
                    }
                    Err(kind) => local.error(kind),
                }
            }
        }
    }
}

/// A task's recorder; the reporter swaps its contents out once a second.
struct Recorder(Arc<Mutex<Interval>>);

impl Recorder {
    fn with(&self, f: impl FnOnce(&mut Interval)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn read(&self, latency: Duration) {
        self.with(|i| i.read(latency));
    }

    fn write(&self, latency: Duration) {
        self.with(|i| i.write(latency));
    }

    fn error(&self, kind: ErrorKind) {
        self.with(|i| i.error(kind));
    }
}

fn check_read(
    shared: &Shared,
    written: &HashMap<u64, u64>,
    k: u64,
    row: Option<Vec<peregrine_engine::Bin>>,
    local: &Recorder,
) {
    let Some(bins) = row else {
        if shared.verify && written.contains_key(&k) {
            fail(shared, local, format!("key {k}: written by this run but not found"));
        } else {
            local.error(ErrorKind::NotFound);
        }
        return;
    };
    if !shared.verify {
        return;
    }
    match check_bins(k, &bins, shared.size, shared.bins) {
        Ok(v) => {
            if let Some(expected) = written.get(&k)
                && *expected != v
            {
                fail(shared, local, format!("key {k}: read version {v}, but this run last wrote {expected}"));
            }
        }
        Err(e) => fail(shared, local, e),
    }
}

fn fail(shared: &Shared, local: &Recorder, message: String) {
    local.error(ErrorKind::Verify);
    let mut f = shared.failures.lock().unwrap_or_else(PoisonError::into_inner);
    if f.len() < 20 {
        f.push(message);
    }
}
