//! The shared Raft log: one log per node for every Raft group, in the shape of raft-engine.
//!
//! This module owns the log's public API ([`SharedLog`], [`GroupLog`], options, statistics and
//! reports) and the state shared by its parts: the per-group indexes ([`index`]), the submission
//! queue the writer thread drains ([`writer`]: group commit, one batch and one fdatasync for
//! everything queued, completions in submission order), recovery ([`recovery`]), segment
//! reclaim ([`reclaim`]) and the openraft storage traits ([`storage`]). Every byte goes through
//! the engine's `DeviceIo` seam ([`segment`]), so io_uring, the blocking pool and the simulated
//! device all work; [`format`] is the on-disk layout, documented in `docs/FORMAT.md`.
//!
//! Lock order: the one state mutex is never held across device I/O, except by reclaim's
//! bookkeeping, which reads nothing while holding it.

pub mod format;
mod index;
mod reclaim;
mod recovery;
mod segment;
mod storage;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use openraft::RaftTypeConfig;
use openraft::storage::IOFlushed;

use peregrine_engine::io::IoOptions;

pub use index::Loc;
pub use reclaim::ReclaimReport;
pub use recovery::{RecoveryCut, RecoveryReport};
pub use storage::GroupLog;

use format::ItemKind;
use index::GroupIndex;
use segment::Segment;

/// Default size of a segment file.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default cap on one batch (header and items); larger submissions are split over batches.
pub const BATCH_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default number of recent durable entries per group kept decoded in memory.
pub const CACHE_ENTRIES_PER_GROUP_DEFAULT: usize = 256;
/// Groups with more live entries than this are not copied forward by reclaim; they are
/// reported as pinning instead (the caller should snapshot and purge them).
pub const REWRITE_ENTRIES_MAX_DEFAULT: usize = 4096;

/// Called before every device write with the segment path, offset and length (tests use it
/// to cut the power at the Nth write across all segment devices).
pub type WriteHook = Arc<dyn Fn(&Path, u64, usize) + Send + Sync>;

/// How to open a shared log.
#[derive(Clone)]
pub struct LogOptions {
    /// The log directory (created if missing). Must be on a filesystem with O_DIRECT.
    pub dir: PathBuf,
    /// Size of each segment file, a multiple of 4096.
    pub segment_bytes: u64,
    /// Cap on one batch in bytes, a multiple of 4096, at most `segment_bytes - 4096`.
    pub batch_bytes_max: usize,
    /// Recent durable entries per group kept decoded in memory.
    pub cache_entries_per_group: usize,
    /// Live entries per group above which reclaim reports instead of copying.
    pub rewrite_entries_max: usize,
    /// The I/O backend (io_uring, blocking, simulated).
    pub io: IoOptions,
    /// Test hook run before every device write.
    pub write_hook: Option<WriteHook>,
}

impl std::fmt::Debug for LogOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogOptions")
            .field("dir", &self.dir)
            .field("segment_bytes", &self.segment_bytes)
            .field("batch_bytes_max", &self.batch_bytes_max)
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl LogOptions {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> LogOptions {
        LogOptions {
            dir: dir.into(),
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            cache_entries_per_group: CACHE_ENTRIES_PER_GROUP_DEFAULT,
            rewrite_entries_max: REWRITE_ENTRIES_MAX_DEFAULT,
            io: IoOptions::default(),
            write_hook: None,
        }
    }

    fn validate(&self) -> io::Result<()> {
        let a = format::ALIGN_BYTES as u64;
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if !self.segment_bytes.is_multiple_of(a) || self.segment_bytes < 4 * a {
            return bad(format!("segment_bytes {} must be a multiple of 4096, at least 16 KiB", self.segment_bytes));
        }
        if !(self.batch_bytes_max as u64).is_multiple_of(a)
            || (self.batch_bytes_max as u64) < a
            || self.batch_bytes_max as u64 > self.segment_bytes - format::SEGMENT_HEADER_BYTES as u64
            || self.batch_bytes_max > format::BATCH_BYTES_LIMIT
        {
            return bad(format!(
                "batch_bytes_max {} must be a multiple of 4096, at most segment_bytes - 4096 and {}",
                self.batch_bytes_max,
                format::BATCH_BYTES_LIMIT
            ));
        }
        Ok(())
    }

    /// Largest item (header and body) a batch can carry.
    fn item_bytes_max(&self) -> usize {
        self.batch_bytes_max - format::BATCH_HEADER_BYTES
    }
}

/// Counters of the writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// fdatasyncs issued for batches.
    pub fsyncs: u64,
    /// Batches written.
    pub batches: u64,
    /// Bytes written in batches (aligned sizes).
    pub bytes: u64,
    /// Log entries written (rewrites included).
    pub entries: u64,
    /// Items written.
    pub items: u64,
    /// Submissions queued (appends, votes, committed marks, truncations, purges).
    pub submissions: u64,
    /// Segments rolled into.
    pub rolls: u64,
    /// Segments deleted by reclaim.
    pub segments_deleted: u64,
    /// Entries copied forward by reclaim.
    pub entries_rewritten: u64,
}

#[derive(Default)]
struct Counters {
    fsyncs: AtomicU64,
    batches: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
    items: AtomicU64,
    submissions: AtomicU64,
    rolls: AtomicU64,
    segments_deleted: AtomicU64,
    entries_rewritten: AtomicU64,
}

/// What to do when a queued submission is durable (or failed).
pub(crate) enum Waiter<C: RaftTypeConfig> {
    /// Nothing.
    None,
    /// openraft's flush callback (a watermark: completed in submission order).
    Flushed(IOFlushed<C>),
    /// Any callback.
    Call(Box<dyn FnOnce(io::Result<()>) + Send>),
}

impl<C: RaftTypeConfig> Waiter<C> {
    fn complete(self, r: io::Result<()>) {
        match self {
            Waiter::None => {}
            Waiter::Flushed(cb) => cb.io_completed(r),
            Waiter::Call(f) => f(r),
        }
    }
}

/// An entry inside a queued Entries item: its index, the write's identity, and where its
/// encoded bytes sit within the item.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueuedEntry {
    index: u64,
    append_id: u64,
    rel_offset: u32,
    len: u32,
}

/// One submission waiting for the writer.
pub(crate) struct Queued<C: RaftTypeConfig> {
    group: u32,
    /// The encoded item (header and body); empty for a pure barrier.
    item: Vec<u8>,
    kind: ItemKind,
    entries: Vec<QueuedEntry>,
    waiter: Waiter<C>,
}

pub(crate) struct State<C: RaftTypeConfig> {
    groups: HashMap<u32, GroupIndex<C>>,
    queue: VecDeque<Queued<C>>,
    segments: BTreeMap<u64, Arc<Segment>>,
    head_seq: u64,
    spare_seq: Option<u64>,
    next_append_id: u64,
    /// Sticky failure: after a device error nothing more is accepted until reopened.
    failed: Option<String>,
    shutdown: bool,
}

pub(crate) struct Shared<C: RaftTypeConfig> {
    options: LogOptions,
    state: Mutex<State<C>>,
    wake: Condvar,
    counters: Counters,
}

impl<C: RaftTypeConfig> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn failed_error(msg: &str) -> io::Error {
    io::Error::other(format!("the shared Raft log failed earlier and must be reopened: {msg}"))
}

/// Stops the writer when the last handle goes.
struct Owner<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<C: RaftTypeConfig> Drop for Owner<C> {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take()
            && t.join().is_err()
        {
            tracing::error!("the shared log writer thread panicked");
        }
    }
}

/// One node's shared Raft log (cheap to clone). [`SharedLog::group`] gives the per-group
/// openraft storage view.
pub struct SharedLog<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
    owner: Arc<Owner<C>>,
}

impl<C: RaftTypeConfig> Clone for SharedLog<C> {
    fn clone(&self) -> Self {
        SharedLog { shared: self.shared.clone(), owner: self.owner.clone() }
    }
}

impl<C: RaftTypeConfig> std::fmt::Debug for SharedLog<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLog").field("dir", &self.shared.options.dir).finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> SharedLog<C>
where
    C::Entry: Clone,
{
    /// Opens (recovering) or creates the log in `options.dir` and starts its writer thread.
    /// Refuses a log with a damaged batch followed by valid ones; cuts a torn tail and says so
    /// in the report.
    pub fn open(options: LogOptions) -> io::Result<(SharedLog<C>, RecoveryReport)> {
        options.validate()?;
        std::fs::create_dir_all(&options.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating log directory {}: {e}", options.dir.display())))?;
        let rec = recovery::recover::<C>(&options)?;
        let state = State {
            groups: rec.groups,
            queue: VecDeque::new(),
            segments: rec.segments,
            head_seq: rec.head.seg.seq,
            spare_seq: rec.spare.as_ref().map(|s| s.seq),
            next_append_id: 1,
            failed: None,
            shutdown: false,
        };
        let shared =
            Arc::new(Shared { options, state: Mutex::new(state), wake: Condvar::new(), counters: Counters::default() });
        let w = writer::Writer {
            shared: shared.clone(),
            head: rec.head.seg,
            head_offset: rec.head.offset,
            spare: rec.spare,
            next_batch_seq: rec.next_batch_seq,
            next_segment_seq: rec.next_segment_seq,
            log_id: rec.log_id,
        };
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || w.run())
            .map_err(|e| io::Error::new(e.kind(), format!("starting the log writer thread: {e}")))?;
        let owner = Arc::new(Owner { shared: shared.clone(), thread: Mutex::new(Some(thread)) });
        Ok((SharedLog { shared, owner }, rec.report))
    }

    /// The storage view of group `group` (created empty on first use).
    pub fn group(&self, group: u32) -> GroupLog<C> {
        GroupLog::new(self.clone(), group)
    }

    /// Groups that hold any state, sorted.
    pub fn groups(&self) -> Vec<u32> {
        let st = self.shared.lock();
        let mut g: Vec<u32> = st.groups.keys().copied().collect();
        g.sort_unstable();
        g
    }

    /// Writer counters.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LogStats {
            fsyncs: l(&c.fsyncs),
            batches: l(&c.batches),
            bytes: l(&c.bytes),
            entries: l(&c.entries),
            items: l(&c.items),
            submissions: l(&c.submissions),
            rolls: l(&c.rolls),
            segments_deleted: l(&c.segments_deleted),
            entries_rewritten: l(&c.entries_rewritten),
        }
    }

    /// Sequences of the segment files in use, oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.shared.lock().segments.keys().copied().collect()
    }

    /// Waits until everything submitted so far is durable (blocking; not from an async task).
    pub fn flush_blocking(&self) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit_barrier(Waiter::Call(Box::new(move |r| {
            let _ = tx.send(r);
        })))?;
        rx.recv().unwrap_or_else(|_| Err(io::Error::other("the log writer stopped")))
    }

    /// Queues a submission that writes nothing and completes once everything before it has.
    fn submit_barrier(&self, waiter: Waiter<C>) -> io::Result<()> {
        let mut st = self.shared.lock();
        if let Some(f) = &st.failed {
            return Err(failed_error(f));
        }
        st.queue.push_back(Queued { group: 0, item: Vec::new(), kind: ItemKind::Vote, entries: Vec::new(), waiter });
        drop(st);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Deletes every segment no group needs any more, copying the few live records of
    /// laggard groups forward first (blocking; not from an async task). See [`ReclaimReport`].
    pub fn reclaim(&self) -> io::Result<ReclaimReport> {
        reclaim::reclaim(self)
    }
}
