//! The write path of one device: records are appended to the open write block's buffer (the
//! index is repointed by the caller as soon as `append` returns), full blocks are sealed and
//! queued, and a flusher thread writes them to the device in bounded pieces at a bounded depth
//! so reads are not starved. A partly filled block is flushed after `flush_interval_ms`, and at
//! once when a `commit_to_device` writer is waiting (group commit: every writer that arrived
//! meanwhile shares the same device write and fdatasync).
//!
//! Only the flusher thread writes to the device and only it rewrites block headers in buffers.
//! Flushed blocks stay in memory as the post-write cache.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use peregrine_index::Location;

use crate::blocks::{BlockTable, Purpose, Stream, WritePos, write_pos};
use crate::clock::Clock;
use crate::completion::{Completer, Completion, completion};
use crate::error::{Error, Result};
use crate::format::{block_header, record};
use crate::geometry::Geometry;
use crate::io::{AlignedBuf, DeviceIo, IO_ALIGN_BYTES, SharedBuf, WriteSource, align_down, align_up, wait_io};
use crate::poison::Poison;

/// When a device last served a record read: its writers yield to reads for a while after.
#[derive(Debug)]
pub struct ReadActivity {
    born: Instant,
    last_read_ms: AtomicU64,
}

impl Default for ReadActivity {
    fn default() -> Self {
        ReadActivity { born: Instant::now(), last_read_ms: AtomicU64::new(0) }
    }
}

impl ReadActivity {
    /// A read is about to go to the device.
    pub fn note(&self) {
        self.last_read_ms.store(self.born.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Whether a read went to the device in the last `window_ms`.
    pub fn recent(&self, window_ms: u64) -> bool {
        let last = self.last_read_ms.load(Ordering::Relaxed);
        last > 0 && (self.born.elapsed().as_millis() as u64 + 1).saturating_sub(last) < window_ms
    }
}

/// Write blocks held in memory, by block index; shared by a device's writers and its readers.
pub type MemBlocks = RwLock<HashMap<u32, Arc<MemBlock>>>;

/// Buffers kept for reuse after leaving the post-write cache.
const BUFFER_POOL_MAX: usize = 4;

/// A write block held in memory: open, sealed and waiting, or in the post-write cache.
#[derive(Debug)]
pub struct MemBlock {
    /// Block index on the device.
    pub index: u32,
    /// The block's sequence number.
    pub sequence: u64,
    /// This incarnation's random nonce (block header).
    pub nonce: u64,
    /// The seed of the block's record checksums (`sequence ^ nonce`).
    pub seed: u64,
    /// The block's bytes (shared with in-flight device writes).
    pub buf: Arc<SharedBuf>,
    /// Bytes `[0, flushed_to)` are on the device.
    flushed_to: AtomicU32,
}

/// Where `append` put a record.
#[derive(Debug)]
pub struct Appended {
    /// The record's location (for the index).
    pub location: Location,
    /// Its position in the device's write order.
    pub pos: WritePos,
    /// Present when the caller asked to wait for durability.
    pub durable: Option<Completion<Result<()>>>,
}

/// How a device's writers fill, flush and pace write blocks (part of [`crate::EngineConfig`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// A partly filled write block is flushed after this long (0 = only when full).
    pub flush_interval_ms: u64,
    /// Recently written blocks kept in memory to serve reads, per device.
    pub post_write_cache_bytes: u64,
    /// While reads are active, device writes are issued in pieces of at most this size, so
    /// reads do not queue behind large writes.
    pub write_chunk_bytes: u32,
    /// While reads are active, at most this many write pieces are in flight per device.
    pub write_queue_depth: u32,
    /// When no read has reached the device for `bulk_write_after_read_quiet_ms`, writes use
    /// pieces of this size (bulk loads run at the device's write bandwidth).
    pub bulk_write_chunk_bytes: u32,
    /// ... and this many pieces in flight.
    pub bulk_write_queue_depth: u32,
    /// How long without device reads before writes switch to bulk pieces.
    pub bulk_write_after_read_quiet_ms: u64,
    /// Full write blocks waiting for the device beyond this many bytes make writes fail fast
    /// with "device overload" instead of growing memory.
    pub max_write_queue_bytes: u64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            flush_interval_ms: 1000,
            post_write_cache_bytes: 64 * 1024 * 1024,
            write_chunk_bytes: 128 * 1024,
            write_queue_depth: 2,
            bulk_write_chunk_bytes: 1024 * 1024,
            bulk_write_queue_depth: 4,
            bulk_write_after_read_quiet_ms: 100,
            max_write_queue_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Device write counters.
#[derive(Debug, Default)]
pub struct WriterCounters {
    /// Device write operations.
    pub writes: AtomicU64,
    /// Bytes written to the device.
    pub write_bytes: AtomicU64,
    /// fdatasync calls.
    pub syncs: AtomicU64,
    /// Record bytes appended (client and replicated writes).
    pub appended_bytes: AtomicU64,
    /// Writes refused because the write queue was full.
    pub overloads: AtomicU64,
}

struct OpenBlock {
    mem: Arc<MemBlock>,
    fill: u32,
    opened_unix_ms: u64,
}

struct State {
    open: Option<OpenBlock>,
    sealed: VecDeque<(Arc<MemBlock>, u32, u64)>,
    waiters: Vec<(WritePos, Completer<Result<()>>)>,
    cache: VecDeque<Arc<MemBlock>>,
    pool: Vec<AlignedBuf>,
    oldest_unflushed: Option<Instant>,
    failed: Option<String>,
    stopping: bool,
    stopped: bool,
}

/// The writer of one device.
pub struct Writer {
    label: String,
    stream: Stream,
    geometry: Geometry,
    config: WriterConfig,
    io: Arc<dyn DeviceIo>,
    blocks: Arc<BlockTable>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    wake: Condvar,
    mem: Arc<MemBlocks>,
    durable: AtomicU64,
    reads: Arc<ReadActivity>,
    poison: Arc<Poison>,
    /// Random per writer (per engine open): block nonces derive from it.
    nonce_seed: u64,
    /// Device write counters.
    pub counters: WriterCounters,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("device", &self.label).finish()
    }
}

enum Job {
    Sealed(Arc<MemBlock>, u32, u64),
    Open { commit: bool },
    Stop,
}

impl Writer {
    /// A writer of `stream`; block sequences come from the block table.
    #[allow(clippy::too_many_arguments, reason = "a constructor wiring a device's shared parts")]
    pub fn new(
        label: String,
        stream: Stream,
        geometry: Geometry,
        config: WriterConfig,
        io: Arc<dyn DeviceIo>,
        blocks: Arc<BlockTable>,
        clock: Arc<dyn Clock>,
        mem: Arc<MemBlocks>,
        reads: Arc<ReadActivity>,
        poison: Arc<Poison>,
        nonce_seed: u64,
    ) -> Writer {
        let durable = write_pos(blocks.next_sequence().saturating_sub(1), u32::MAX);
        blocks.set_durable(stream, durable);
        Writer {
            label,
            stream,
            geometry,
            config,
            io,
            blocks,
            clock,
            state: Mutex::new(State {
                open: None,
                sealed: VecDeque::new(),
                waiters: Vec::new(),
                cache: VecDeque::new(),
                pool: Vec::new(),
                oldest_unflushed: None,
                failed: None,
                stopping: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            mem,
            durable: AtomicU64::new(durable),
            reads,
            poison,
            nonce_seed,
            counters: WriterCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Bytes of full blocks waiting for the device.
    pub fn queued_bytes(&self) -> u64 {
        self.lock().sealed.len() as u64 * u64::from(self.geometry.block_bytes)
    }

    /// The stream this writer appends to.
    pub fn stream(&self) -> Stream {
        self.stream
    }

    /// (piece size, pieces in flight) for the next device write: small and shallow while reads
    /// are active, large and deep otherwise.
    fn write_shape(&self) -> (usize, usize) {
        let reading = self.reads.recent(self.config.bulk_write_after_read_quiet_ms);
        let block = self.geometry.block_bytes as usize;
        if reading {
            ((self.config.write_chunk_bytes as usize).min(block), self.config.write_queue_depth as usize)
        } else {
            ((self.config.bulk_write_chunk_bytes as usize).min(block), self.config.bulk_write_queue_depth as usize)
        }
    }

    /// The block if it is in memory (open, sealed, or cached).
    pub fn mem_block(&self, block: u32) -> Option<Arc<MemBlock>> {
        self.mem.read().unwrap_or_else(PoisonError::into_inner).get(&block).cloned()
    }

    /// Appends an encoded record (checksum not yet sealed) to the open block. `purpose`
    /// decides which free-space reserves a new block may use.
    pub fn append(&self, record_bytes: &mut [u8], want_durable: bool, purpose: Purpose) -> Result<Appended> {
        let len = record_bytes.len();
        let extent = record::extent(len);
        let block_bytes = self.geometry.block_bytes as usize;
        assert!(extent + block_header::BYTES <= block_bytes, "record larger than a write block");
        let mut st = self.lock();
        if let Some(reason) = &st.failed {
            return Err(Error::Failed { device: self.label.clone(), reason: reason.clone() });
        }
        if st.stopping {
            return Err(Error::Shutdown);
        }
        let fits = st.open.as_ref().is_some_and(|o| o.fill as usize + extent <= block_bytes);
        if !fits {
            self.open_new_block(&mut st, purpose)?;
        }
        let Some(open) = st.open.as_mut() else {
            return Err(Error::Shutdown);
        };
        let offset = open.fill as usize;
        record::seal(record_bytes, open.mem.seed);
        // SAFETY: we hold the writer lock and [offset, offset + extent) is at or past the fill
        // mark, so no reader or in-flight device write relies on these bytes yet.
        unsafe {
            open.mem.buf.write_at(offset, record_bytes);
            open.mem.buf.write_at(offset + len, &[0u8; 16][..extent - len]);
        }
        open.fill += extent as u32;
        let block = open.mem.index;
        let pos = write_pos(open.mem.sequence, open.fill);
        self.blocks.add_live(block, extent as u64);
        self.counters.appended_bytes.fetch_add(extent as u64, Ordering::Relaxed);
        if open.fill as usize + record::HEADER_BYTES > block_bytes {
            self.seal_open(&mut st);
        }
        st.oldest_unflushed.get_or_insert_with(Instant::now);
        let durable = want_durable.then(|| {
            let (tx, rx) = completion();
            st.waiters.push((pos, tx));
            rx
        });
        drop(st);
        if durable.is_some() {
            self.wake.notify_all();
        }
        let location = Location {
            device: self.geometry.device_index,
            offset: self.geometry.block_offset(block) + offset as u64,
            size: extent as u32,
        };
        Ok(Appended { location, pos, durable })
    }

    fn seal_open(&self, st: &mut State) {
        if let Some(old) = st.open.take() {
            self.blocks.mark_sealed(old.mem.index);
            st.sealed.push_back((old.mem, old.fill, old.opened_unix_ms));
            self.wake.notify_all();
        }
    }

    fn open_new_block(&self, st: &mut State, purpose: Purpose) -> Result<()> {
        let block_bytes = u64::from(self.geometry.block_bytes);
        let queued = (st.sealed.len() as u64 + u64::from(st.open.is_some())) * block_bytes;
        if queued > self.config.max_write_queue_bytes {
            self.counters.overloads.fetch_add(1, Ordering::Relaxed);
            return Err(Error::DeviceOverload(format!(
                "{} has {queued} bytes of write blocks waiting for the device (max_write_queue_bytes {})",
                self.label, self.config.max_write_queue_bytes
            )));
        }
        if self.blocks.next_sequence() >= crate::blocks::SEQUENCE_LIMIT {
            return Err(Error::Failed {
                device: self.label.clone(),
                reason: "every block sequence number has been used; back up and reformat the device".into(),
            });
        }
        let Some((block, sequence)) = self.blocks.allocate(purpose) else {
            if self.blocks.space_is_reclaimable() {
                self.counters.overloads.fetch_add(1, Ordering::Relaxed);
                return Err(Error::DeviceOverload(format!(
                    "{}: {} of {} write blocks free and defrag is still reclaiming dead space; retry",
                    self.label,
                    self.blocks.free_count(),
                    self.blocks.len()
                )));
            }
            let r = self.blocks.reserves();
            return Err(Error::DeviceFull(format!(
                "{}: {} of {} write blocks free; ordinary writes stop at {} (stop_writes_avail_pct), deletes at {} (the defrag reserve)",
                self.label,
                self.blocks.free_count(),
                self.blocks.len(),
                r.stop_writes_blocks,
                r.defrag_reserve_blocks
            )));
        };
        self.seal_open(st);
        // A reused buffer keeps bytes of its previous block past the fill mark. They reach the
        // device only in the partial last sector of a flush, and never verify there: their
        // checksums are seeded with another block's sequence.
        let mut buf = st.pool.pop().unwrap_or_else(|| AlignedBuf::zeroed(self.geometry.block_bytes as usize));
        let opened_unix_ms = self.clock.now_unix_ms();
        let nonce = self.nonce_for(sequence);
        let header = block_header::BlockHeader {
            sequence,
            device_set_id: self.geometry.device_set_id,
            block_index: block,
            fill_end: 0,
            sealed: false,
            device_index: u32::from(self.geometry.device_index),
            opened_unix_ms,
            nonce,
        };
        let seed = block_header::checksum_seed(sequence, nonce);
        self.blocks.set_seed(block, seed);
        header.encode_into(&mut buf.as_mut_slice()[..block_header::BYTES]);
        let mem = Arc::new(MemBlock {
            index: block,
            sequence,
            nonce,
            seed,
            buf: Arc::new(SharedBuf::new(buf)),
            flushed_to: AtomicU32::new(0),
        });
        self.mem.write().unwrap_or_else(PoisonError::into_inner).insert(block, mem.clone());
        st.open = Some(OpenBlock { mem, fill: block_header::BYTES as u32, opened_unix_ms });
        Ok(())
    }

    /// The flusher thread's loop; returns after `stop` once everything is flushed. If it panics,
    /// the device fails (every waiter and later append gets the reason), the engine is
    /// poisoned, and `stop` returns instead of waiting forever.
    pub fn run_flusher(&self) {
        let _guard = FlusherGuard(self);
        loop {
            match self.next_job() {
                Job::Sealed(mem, fill, opened) => self.flush_sealed(&mem, fill, opened),
                Job::Open { commit } => self.flush_open(commit),
                Job::Stop => {
                    self.flush_open(false);
                    let mut st = self.lock();
                    st.stopped = true;
                    drop(st);
                    self.wake.notify_all();
                    return;
                }
            }
        }
    }

    fn flusher_died(&self) {
        let reason = format!("the flusher thread of {} panicked", self.label);
        self.poison.set(reason.clone());
        let mut st = self.lock();
        self.fail(&mut st, reason);
        st.stopped = true;
        drop(st);
        self.wake.notify_all();
    }

    fn next_job(&self) -> Job {
        let mut st = self.lock();
        loop {
            if st.failed.is_some() {
                let reason = st.failed.clone().unwrap_or_default();
                for (_, w) in st.waiters.drain(..) {
                    w.complete(Err(Error::Failed { device: self.label.clone(), reason: reason.clone() }));
                }
                if st.stopping {
                    return Job::Stop;
                }
            } else if let Some((mem, fill, opened)) = st.sealed.front() {
                return Job::Sealed(mem.clone(), *fill, *opened);
            } else if !st.waiters.is_empty() {
                return Job::Open { commit: true };
            } else if st.stopping {
                return Job::Stop;
            }
            let interval = Duration::from_millis(self.config.flush_interval_ms);
            let timeout = match st.oldest_unflushed {
                Some(t) if self.config.flush_interval_ms > 0 && st.failed.is_none() => {
                    let age = t.elapsed();
                    if age >= interval {
                        return Job::Open { commit: false };
                    }
                    interval - age
                }
                _ => Duration::from_millis(500),
            };
            st = self.wake.wait_timeout(st, timeout).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn flush_sealed(&self, mem: &Arc<MemBlock>, fill: u32, opened_unix_ms: u64) {
        let flushed = mem.flushed_to.load(Ordering::SeqCst) as usize;
        self.write_header(mem, fill, true, opened_unix_ms);
        let from = align_down(flushed as u64, IO_ALIGN_BYTES as u64) as usize;
        let to = align_up(u64::from(fill), IO_ALIGN_BYTES as u64) as usize;
        let pos = write_pos(mem.sequence, fill);
        let wants_sync = self.lock().waiters.iter().any(|(p, _)| *p <= pos);
        let result =
            self.write_range(mem, from, to, from > 0).and_then(|()| if wants_sync { self.sync() } else { Ok(()) });
        let mut st = self.lock();
        if let Err(e) = result {
            self.fail(&mut st, format!("writing block {}: {e}", mem.index));
            return;
        }
        st.sealed.pop_front();
        mem.flushed_to.store(fill, Ordering::SeqCst);
        self.blocks.mark_used(mem.index);
        st.cache.push_back(mem.clone());
        self.evict_cache(&mut st);
        self.advance_durable(&mut st, pos, wants_sync);
    }

    fn flush_open(&self, commit: bool) {
        let snapshot = {
            let mut st = self.lock();
            if !st.sealed.is_empty() {
                // A block was sealed since this job was chosen. Blocks reach the device in
                // sequence order, so the durable position never passes an unwritten block:
                // the sealed one goes first (the next job).
                return;
            }
            st.oldest_unflushed = None;
            st.open.as_ref().map(|o| (o.mem.clone(), o.fill, o.opened_unix_ms))
        };
        let Some((mem, fill, opened_unix_ms)) = snapshot else {
            // No open block: everything appended is written; waiters only need the sync.
            if commit {
                let result = self.sync();
                let mut st = self.lock();
                match result {
                    Ok(()) => {
                        let durable = self.durable.load(Ordering::SeqCst);
                        self.advance_durable(&mut st, durable, true);
                    }
                    Err(e) => self.fail(&mut st, format!("syncing: {e}")),
                }
            }
            return;
        };
        let flushed = mem.flushed_to.load(Ordering::SeqCst);
        if flushed >= fill && !commit {
            return;
        }
        if !commit {
            self.write_header(&mem, fill, false, opened_unix_ms);
        }
        let from = align_down(u64::from(flushed), IO_ALIGN_BYTES as u64) as usize;
        let stable_end = align_down(u64::from(fill), IO_ALIGN_BYTES as u64) as usize;
        let pos = write_pos(mem.sequence, fill);
        // Appenders keep writing past `fill` while this flush runs: only bytes below `fill` are
        // handed to the device from the shared buffer. The last, partly filled sector goes from
        // a private copy of its filled part (the rest zero); the next flush rewrites it.
        // With a rewritten header, its sector goes last, after every piece it describes (when
        // `from` is 0 the header travels in the first piece or the tail copy instead).
        let header_last = !commit && from > 0;
        let result = self
            .write_range(&mem, from, stable_end.max(from), false)
            .and_then(|()| self.write_partial_tail(&mem, stable_end.max(from), fill as usize))
            .and_then(|()| if header_last { self.write_range(&mem, 0, IO_ALIGN_BYTES, false) } else { Ok(()) })
            .and_then(|()| if commit || self.lock().stopping { self.sync() } else { Ok(()) });
        let mut st = self.lock();
        if let Err(e) = result {
            self.fail(&mut st, format!("flushing block {}: {e}", mem.index));
            return;
        }
        mem.flushed_to.fetch_max(fill, Ordering::SeqCst);
        self.advance_durable(&mut st, pos, commit);
    }

    /// Writes the sector holding bytes `[tail_start, fill)` of an open block from a private copy
    /// (`tail_start` is sector aligned; nothing to do when `fill` is).
    fn write_partial_tail(&self, mem: &Arc<MemBlock>, tail_start: usize, fill: usize) -> io::Result<()> {
        if fill <= tail_start {
            return Ok(());
        }
        debug_assert!(fill - tail_start < IO_ALIGN_BYTES, "tail of {} bytes", fill - tail_start);
        let mut stage = AlignedBuf::zeroed(IO_ALIGN_BYTES);
        // Bytes below `fill` are never modified again (the header is only rewritten by this
        // thread), so copying them without the writer lock is race-free.
        mem.buf.read_at(tail_start, &mut stage.as_mut_slice()[..fill - tail_start]);
        let src = WriteSource { buf: Arc::new(SharedBuf::new(stage)), start: 0, len: IO_ALIGN_BYTES };
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(IO_ALIGN_BYTES as u64, Ordering::Relaxed);
        wait_io(self.io.write(self.geometry.block_offset(mem.index) + tail_start as u64, src))
    }

    /// A copy of the filled part of a block held in memory (open, waiting or cached) with the
    /// block's checksum seed and fill, for scanning it: bytes `[0, 64)` (the header, which the flusher
    /// may be rewriting) are zero, and nothing past the fill mark is read.
    pub fn copy_filled(&self, block: u32) -> Option<(Vec<u8>, u64, u32)> {
        let st = self.lock();
        let (mem, fill) = if let Some(o) = st.open.as_ref().filter(|o| o.mem.index == block) {
            (o.mem.clone(), o.fill)
        } else if let Some((m, fill, _)) = st.sealed.iter().find(|(m, _, _)| m.index == block) {
            (m.clone(), *fill)
        } else if let Some(m) = st.cache.iter().find(|m| m.index == block) {
            (m.clone(), m.flushed_to.load(Ordering::SeqCst))
        } else {
            return None;
        };
        drop(st);
        let fill = fill as usize;
        let mut bytes = vec![0u8; fill.max(block_header::BYTES)];
        if fill > block_header::BYTES {
            mem.buf.read_at(block_header::BYTES, &mut bytes[block_header::BYTES..fill]);
        }
        Some((bytes, mem.seed, fill as u32))
    }

    /// Indexes of the blocks this writer holds in memory.
    pub fn blocks_in_memory(&self) -> Vec<u32> {
        let st = self.lock();
        st.open
            .iter()
            .map(|o| o.mem.index)
            .chain(st.sealed.iter().map(|(m, _, _)| m.index))
            .chain(st.cache.iter().map(|m| m.index))
            .collect()
    }

    /// A block incarnation's nonce: never 0 (format-1 blocks have 0), different for the same
    /// sequence in another run of the engine.
    fn nonce_for(&self, sequence: u64) -> u64 {
        let mut z = self.nonce_seed ^ sequence.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) | 1
    }

    /// Rewrites the block header in the buffer (flusher only).
    fn write_header(&self, mem: &MemBlock, fill: u32, sealed: bool, opened_unix_ms: u64) {
        let header = block_header::BlockHeader {
            sequence: mem.sequence,
            device_set_id: self.geometry.device_set_id,
            block_index: mem.index,
            fill_end: fill,
            sealed,
            device_index: u32::from(self.geometry.device_index),
            opened_unix_ms,
            nonce: mem.nonce,
        };
        let mut bytes = [0u8; block_header::BYTES];
        header.encode_into(&mut bytes);
        // SAFETY: only the flusher thread touches header bytes, and no record or reader spans them.
        unsafe { mem.buf.write_at(0, &bytes) };
    }

    fn advance_durable(&self, st: &mut State, pos: WritePos, synced: bool) {
        self.durable.fetch_max(pos, Ordering::SeqCst);
        self.blocks.set_durable(self.stream, pos);
        if synced {
            let durable = self.durable.load(Ordering::SeqCst);
            let mut i = 0;
            while i < st.waiters.len() {
                if st.waiters[i].0 <= durable {
                    let (_, w) = st.waiters.swap_remove(i);
                    w.complete(Ok(()));
                } else {
                    i += 1;
                }
            }
        }
    }

    fn fail(&self, st: &mut State, reason: String) {
        tracing::error!(device = %self.label, %reason, "device write failed; refusing further writes");
        if st.failed.is_none() {
            st.failed = Some(reason.clone());
        }
        for (_, w) in st.waiters.drain(..) {
            w.complete(Err(Error::Failed { device: self.label.clone(), reason: reason.clone() }));
        }
    }

    fn evict_cache(&self, st: &mut State) {
        let block_bytes = u64::from(self.geometry.block_bytes);
        while st.cache.len() as u64 * block_bytes > self.config.post_write_cache_bytes {
            let Some(old) = st.cache.pop_front() else {
                break;
            };
            {
                let mut map = self.mem.write().unwrap_or_else(PoisonError::into_inner);
                if map.get(&old.index).is_some_and(|m| Arc::ptr_eq(m, &old)) {
                    map.remove(&old.index);
                }
            }
            if st.pool.len() < BUFFER_POOL_MAX
                && let Ok(mem) = Arc::try_unwrap(old)
                && let Ok(buf) = Arc::try_unwrap(mem.buf)
            {
                st.pool.push(buf.into_inner());
            }
        }
    }

    fn write_range(&self, mem: &Arc<MemBlock>, from: usize, to: usize, header_sector_last: bool) -> io::Result<()> {
        let base = self.geometry.block_offset(mem.index);
        let mut in_flight = VecDeque::new();
        let mut off = from;
        while off < to {
            // Re-decided for every piece: a read arriving mid-block shrinks the next pieces.
            let (chunk, depth) = self.write_shape();
            while in_flight.len() >= depth {
                if let Some(c) = in_flight.pop_front() {
                    wait_io(c)?;
                }
            }
            let len = chunk.min(to - off);
            in_flight.push_back(self.issue_write(mem, base, off, len));
            off += len;
        }
        // The header sector goes last, after every data piece has landed.
        for c in in_flight {
            wait_io(c)?;
        }
        if header_sector_last {
            wait_io(self.issue_write(mem, base, 0, IO_ALIGN_BYTES))?;
        }
        Ok(())
    }

    fn issue_write(&self, mem: &Arc<MemBlock>, base: u64, off: usize, len: usize) -> Completion<io::Result<()>> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.io.write(base + off as u64, WriteSource { buf: mem.buf.clone(), start: off, len })
    }

    fn sync(&self) -> io::Result<()> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        wait_io(self.io.sync())
    }

    /// A completion that settles once everything appended so far is on the device and synced.
    pub fn flush(&self) -> Completion<Result<()>> {
        let mut st = self.lock();
        if let Some(reason) = &st.failed {
            return Completion::ready(Err(Error::Failed { device: self.label.clone(), reason: reason.clone() }));
        }
        let target = match (&st.open, st.sealed.back()) {
            (Some(o), _) => write_pos(o.mem.sequence, o.fill),
            (None, Some((m, fill, _))) => write_pos(m.sequence, *fill),
            (None, None) => return Completion::ready(Ok(())),
        };
        let (tx, rx) = completion();
        st.waiters.push((target, tx));
        drop(st);
        self.wake.notify_all();
        rx
    }

    /// Asks the flusher to write everything and stop; waits until it has.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stopping = true;
        self.wake.notify_all();
        while !st.stopped {
            st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether a device write has failed.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }
}

/// Marks the device failed and the engine poisoned if the flusher thread unwinds.
struct FlusherGuard<'a>(&'a Writer);

impl Drop for FlusherGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.flusher_died();
        }
    }
}
