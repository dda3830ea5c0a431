//! Per-device write block accounting: each block's state, sequence number and live bytes, the
//! free list, blocks waiting to be freed, the device's block sequence counter, and how far
//! each write stream (client writes, defrag moves) is durable.
//!
//! Invariant: a block is freed only when it holds no live record *and* every write that made
//! its records dead (overwrites, deletes, defrag moves) is durable in its stream. Until then a
//! crash could leave the older copy as the only one, so its bytes must stay on the device.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::completion::{Completer, Completion, completion};

/// A position in one stream's write order: the block sequence in the high
/// [`SEQUENCE_BITS`] bits, the byte offset within the block (in 16-byte record units) in the
/// low [`OFFSET_BITS`]. Later writes of a stream have larger positions.
pub type WritePos = u64;

/// Bits of a [`WritePos`] holding the offset within the block, in 16-byte units (an 8 MiB
/// block has 2^19 of them; the all-ones value means "the end of the block").
pub const OFFSET_BITS: u32 = 20;
/// Bits of a [`WritePos`] holding the block sequence: 2^44 blocks is 17 years of 128 KiB
/// blocks written at 4 GB/s.
pub const SEQUENCE_BITS: u32 = 64 - OFFSET_BITS;
/// Block sequences must stay below this (checked in release builds: positions would stop
/// ordering writes, and a block could be freed while a crash still needs it).
pub const SEQUENCE_LIMIT: u64 = 1 << SEQUENCE_BITS;
const OFFSET_END: u64 = (1 << OFFSET_BITS) - 1;

/// Builds a [`WritePos`]. `offset_in_block` is a multiple of 16, or `u32::MAX` for the end of
/// the block.
pub fn write_pos(sequence: u64, offset_in_block: u32) -> WritePos {
    assert!(sequence < SEQUENCE_LIMIT, "block sequence {sequence} reached 2^{SEQUENCE_BITS}");
    let units = if offset_in_block == u32::MAX {
        OFFSET_END
    } else {
        debug_assert!(
            offset_in_block.is_multiple_of(16),
            "write position offset {offset_in_block} is not record aligned"
        );
        u64::from(offset_in_block / 16)
    };
    debug_assert!(units <= OFFSET_END, "offset {offset_in_block} does not fit a write position");
    (sequence << OFFSET_BITS) | units
}

/// The write streams of a device, each with its own open block and flusher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Client (and replicated) writes.
    Client = 0,
    /// Live records moved out of blocks being defragmented.
    Defrag = 1,
}

const STREAMS: usize = 2;

/// What an allocation is for, in order of priority when space runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Ordinary writes: refused once free blocks fall to the stop-writes level.
    Write,
    /// Tombstones: allowed below stop-writes (deletes free space), not into the defrag reserve.
    Delete,
    /// Versions decided elsewhere (a replication log entry another replica may already hold):
    /// allowed below stop-writes like deletes, so one replica does not refuse an entry its
    /// peers took; not into the defrag reserve.
    Replica,
    /// Defrag moves: may use every free block.
    Defrag,
}

/// Lifecycle of a write block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// On the free list.
    Free = 0,
    /// Being filled by a writer.
    Open = 1,
    /// Full, waiting for (or undergoing) its device write.
    Sealed = 2,
    /// On the device.
    Used = 3,
    /// Holds no live record; freed once the writes that emptied it are durable.
    PendingFree = 4,
    /// Its live records are being moved out.
    Defrag = 5,
}

impl BlockState {
    fn from_u8(v: u8) -> BlockState {
        match v {
            1 => BlockState::Open,
            2 => BlockState::Sealed,
            3 => BlockState::Used,
            4 => BlockState::PendingFree,
            5 => BlockState::Defrag,
            _ => BlockState::Free,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    state: AtomicU8,
    sequence: AtomicU64,
    /// Seed of the record checksums of the block's current incarnation.
    seed: AtomicU64,
    live_bytes: AtomicU64,
    /// Per stream: the largest write position that killed a record of this block.
    killed_at: [AtomicU64; STREAMS],
}

#[derive(Debug, Default)]
struct FreeLists {
    free: Vec<u32>,
    pending: Vec<u32>,
    /// Async writers waiting for a block to be freed (see [`BlockTable::space_wait`]).
    waiters: Vec<Completer<()>>,
}

/// Counts by state, for stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Free blocks.
    pub free: u64,
    /// Blocks being filled.
    pub open: u64,
    /// Full blocks waiting for the device.
    pub sealed: u64,
    /// Blocks on the device.
    pub used: u64,
    /// Empty blocks waiting for durability before they are freed.
    pub pending_free: u64,
    /// Blocks being defragmented.
    pub defrag: u64,
    /// Used blocks below the defrag low-water mark (defrag candidates).
    pub defrag_eligible: u64,
    /// Live bytes over all blocks.
    pub live_bytes: u64,
}

/// Free blocks kept back from each purpose.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reserves {
    /// Ordinary writes need more free blocks than this (the stop-writes level).
    pub stop_writes_blocks: u32,
    /// Deletes need more free blocks than this (the defrag reserve).
    pub defrag_reserve_blocks: u32,
    /// At or below this many free blocks defrag is urgent: it ignores the low-water mark
    /// (taking the emptiest block up to [`URGENT_DEFRAG_MAX_LIVE_PCT`] live) and its pacing.
    pub defrag_urgent_blocks: u32,
}

/// Under urgent defrag, blocks fuller than this percentage are left alone: moving them would
/// cost a block read and most of a block written to gain less than a tenth of a block.
pub const URGENT_DEFRAG_MAX_LIVE_PCT: u64 = 90;

/// The block table of one device.
#[derive(Debug)]
pub struct BlockTable {
    slots: Box<[Slot]>,
    lists: Mutex<FreeLists>,
    /// Signalled whenever blocks return to the free list.
    freed: Condvar,
    next_sequence: AtomicU64,
    durable: [AtomicU64; STREAMS],
    reserves: Reserves,
    block_bytes: u32,
    defrag_lwm_bytes: u64,
    urgent_max_live_bytes: u64,
}

impl BlockTable {
    /// A table of `count` blocks, all free; the next block opened gets `next_sequence`.
    pub fn new(
        count: u32,
        block_bytes: u32,
        next_sequence: u64,
        reserves: Reserves,
        defrag_lwm_pct: u32,
    ) -> BlockTable {
        BlockTable {
            slots: (0..count).map(|_| Slot::default()).collect(),
            lists: Mutex::new(FreeLists { free: (0..count).rev().collect(), pending: Vec::new(), waiters: Vec::new() }),
            freed: Condvar::new(),
            next_sequence: AtomicU64::new(next_sequence.max(1)),
            durable: std::array::from_fn(|_| AtomicU64::new(0)),
            reserves,
            block_bytes,
            defrag_lwm_bytes: u64::from(block_bytes) * u64::from(defrag_lwm_pct) / 100,
            urgent_max_live_bytes: (u64::from(block_bytes) * URGENT_DEFRAG_MAX_LIVE_PCT / 100)
                .max(u64::from(block_bytes) * u64::from(defrag_lwm_pct) / 100),
        }
    }

    fn lists(&self) -> MutexGuard<'_, FreeLists> {
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of blocks.
    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Whether the table has no blocks.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Block size in bytes.
    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    /// The stop-writes and defrag reserve levels.
    pub fn reserves(&self) -> Reserves {
        self.reserves
    }

    /// Takes a free block for `purpose` and gives it the next sequence number; `None` when
    /// the free blocks left are reserved for higher-priority purposes.
    pub fn allocate(&self, purpose: Purpose) -> Option<(u32, u64)> {
        let mut lists = self.lists();
        if lists.free.len() as u32 <= self.keep_for(purpose) {
            return None;
        }
        let block = lists.free.pop()?;
        let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
        let s = &self.slots[block as usize];
        debug_assert_eq!(self.state(block), BlockState::Free);
        s.sequence.store(sequence, Ordering::SeqCst);
        s.live_bytes.store(0, Ordering::SeqCst);
        for k in &s.killed_at {
            k.store(0, Ordering::SeqCst);
        }
        s.state.store(BlockState::Open as u8, Ordering::SeqCst);
        Some((block, sequence))
    }

    /// Whether an allocation for `purpose` would succeed now.
    pub fn can_allocate(&self, purpose: Purpose) -> bool {
        self.free_count() as u32 > self.keep_for(purpose)
    }

    /// Number of free blocks.
    pub fn free_count(&self) -> usize {
        self.lists().free.len()
    }

    /// The block's state.
    pub fn state(&self, block: u32) -> BlockState {
        BlockState::from_u8(self.slots[block as usize].state.load(Ordering::SeqCst))
    }

    /// The block's current sequence number (meaningful unless Free).
    pub fn sequence(&self, block: u32) -> u64 {
        self.slots[block as usize].sequence.load(Ordering::SeqCst)
    }

    /// The checksum seed of the block's records (meaningful unless Free).
    pub fn seed(&self, block: u32) -> u64 {
        self.slots[block as usize].seed.load(Ordering::SeqCst)
    }

    /// Sets the checksum seed of the block's current incarnation (when opened, or at recovery).
    pub fn set_seed(&self, block: u32, seed: u64) {
        self.slots[block as usize].seed.store(seed, Ordering::SeqCst);
    }

    /// Live bytes in the block.
    pub fn live_bytes(&self, block: u32) -> u64 {
        self.slots[block as usize].live_bytes.load(Ordering::SeqCst)
    }

    /// A record of `bytes` was placed in the block.
    pub fn add_live(&self, block: u32, bytes: u64) {
        self.slots[block as usize].live_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    /// A record of `bytes` in the block died because of the write at `killer` in `stream`.
    pub fn remove_live(&self, block: u32, bytes: u64, stream: Stream, killer: WritePos) {
        let s = &self.slots[block as usize];
        s.killed_at[stream as usize].fetch_max(killer, Ordering::SeqCst);
        let before = s.live_bytes.fetch_sub(bytes, Ordering::SeqCst);
        assert!(before >= bytes, "block {block} live bytes would go negative ({before} - {bytes})");
        if before == bytes {
            self.retire_if_empty(block);
        }
    }

    /// The open block was sealed (it waits for its device write).
    pub fn mark_sealed(&self, block: u32) {
        self.slots[block as usize].state.store(BlockState::Sealed as u8, Ordering::SeqCst);
    }

    /// The block's contents reached the device.
    pub fn mark_used(&self, block: u32) {
        self.slots[block as usize].state.store(BlockState::Used as u8, Ordering::SeqCst);
        self.retire_if_empty(block);
    }

    fn retire_if_empty(&self, block: u32) {
        let mut lists = self.lists();
        let s = &self.slots[block as usize];
        if self.state(block) == BlockState::Used && s.live_bytes.load(Ordering::SeqCst) == 0 {
            s.state.store(BlockState::PendingFree as u8, Ordering::SeqCst);
            lists.pending.push(block);
        }
    }

    /// Whether free space is low enough that defrag must run flat out (see
    /// [`Reserves::defrag_urgent_blocks`]).
    pub fn defrag_is_urgent(&self) -> bool {
        self.free_count() as u32 <= self.reserves.defrag_urgent_blocks
    }

    /// Takes the emptiest used block below the defrag low-water mark (below
    /// [`URGENT_DEFRAG_MAX_LIVE_PCT`] when defrag is urgent), marking it Defrag.
    pub fn take_defrag_candidate(&self) -> Option<u32> {
        let lists = self.lists();
        let urgent = lists.free.len() as u32 <= self.reserves.defrag_urgent_blocks;
        let below = if urgent { self.urgent_max_live_bytes } else { self.defrag_lwm_bytes };
        let (_, block) = self.emptiest_used_below(below)?;
        self.slots[block as usize].state.store(BlockState::Defrag as u8, Ordering::SeqCst);
        Some(block)
    }

    fn emptiest_used_below(&self, below: u64) -> Option<(u64, u32)> {
        let mut best: Option<(u64, u32)> = None;
        for b in 0..self.len() {
            if self.state(b) != BlockState::Used {
                continue;
            }
            let live = self.live_bytes(b);
            if live > 0 && live < below && best.is_none_or(|(l, _)| live < l) {
                best = Some((live, b));
            }
        }
        best
    }

    /// Waits up to `timeout` until an allocation for `purpose` would succeed, as long as space
    /// is on its way back (see [`BlockTable::space_is_reclaimable`], checked once: a reclaim
    /// that stalls costs the caller at most `timeout`). Returns whether space is free. Callers
    /// must hold no lock the defragmenter or the flushers take.
    pub fn wait_for_space(&self, purpose: Purpose, timeout: Duration) -> bool {
        if self.can_allocate(purpose) {
            return true;
        }
        if !self.space_is_reclaimable() {
            return false;
        }
        let keep = self.keep_for(purpose);
        let lists = self.lists();
        // Checked under the lock a release takes, so a wakeup cannot slip by.
        let (lists, _) = self
            .freed
            .wait_timeout_while(lists, timeout, |l| l.free.len() as u32 <= keep)
            .unwrap_or_else(PoisonError::into_inner);
        lists.free.len() as u32 > keep
    }

    /// A completion that settles when blocks are next freed, or at the latest at the next
    /// [`BlockTable::wake_space_waiters`] (the maintenance thread calls it every second), so
    /// an async writer can wait for space without parking a thread.
    pub fn space_wait(&self, purpose: Purpose) -> Completion<()> {
        let (tx, rx) = completion();
        let mut lists = self.lists();
        if lists.free.len() as u32 > self.keep_for(purpose) {
            drop(lists);
            tx.complete(());
        } else {
            lists.waiters.push(tx);
        }
        rx
    }

    /// Settles every [`BlockTable::space_wait`] completion (they check their deadlines).
    pub fn wake_space_waiters(&self) {
        let waiters = std::mem::take(&mut self.lists().waiters);
        for w in waiters {
            w.complete(());
        }
    }

    fn keep_for(&self, purpose: Purpose) -> u32 {
        match purpose {
            Purpose::Write => self.reserves.stop_writes_blocks,
            Purpose::Delete | Purpose::Replica => self.reserves.defrag_reserve_blocks,
            Purpose::Defrag => 0,
        }
    }

    /// Whether space the writers cannot use yet is on its way back: blocks waiting for their
    /// killers to be durable, blocks under defrag, or blocks urgent defrag would take. When
    /// writes are refused for want of free blocks, this tells "defrag is behind" (retry) from
    /// "the device is full of live data".
    pub fn space_is_reclaimable(&self) -> bool {
        if !self.lists().pending.is_empty() {
            return true;
        }
        // The block states are atomics: no need to hold the free-list lock for the scan.
        (0..self.len()).any(|b| self.state(b) == BlockState::Defrag)
            || self.emptiest_used_below(self.urgent_max_live_bytes).is_some()
    }

    /// Defrag of the block ended: empty blocks wait for their killers to be durable, others
    /// (a move was refused) go back to Used.
    pub fn finish_defrag(&self, block: u32) {
        // Under the lists lock, like retire_if_empty: a record dying concurrently either sees
        // Defrag (and leaves the block to us) or Used (and retires it itself).
        let mut lists = self.lists();
        let s = &self.slots[block as usize];
        if s.live_bytes.load(Ordering::SeqCst) == 0 {
            s.state.store(BlockState::PendingFree as u8, Ordering::SeqCst);
            lists.pending.push(block);
        } else {
            s.state.store(BlockState::Used as u8, Ordering::SeqCst);
        }
    }

    /// Everything `stream` wrote up to `pos` is durable; frees blocks this makes safe.
    pub fn set_durable(&self, stream: Stream, pos: WritePos) -> usize {
        self.durable[stream as usize].fetch_max(pos, Ordering::SeqCst);
        self.release_pending()
    }

    /// How far `stream` is durable.
    pub fn durable(&self, stream: Stream) -> WritePos {
        self.durable[stream as usize].load(Ordering::SeqCst)
    }

    fn release_pending(&self) -> usize {
        let durable: [WritePos; STREAMS] = std::array::from_fn(|i| self.durable[i].load(Ordering::SeqCst));
        let mut lists = self.lists();
        let FreeLists { free, pending, .. } = &mut *lists;
        let before = free.len();
        pending.retain(|&block| {
            let s = &self.slots[block as usize];
            let safe = (0..STREAMS).all(|i| s.killed_at[i].load(Ordering::SeqCst) <= durable[i]);
            if safe {
                s.state.store(BlockState::Free as u8, Ordering::SeqCst);
                free.push(block);
            }
            !safe
        });
        let released = free.len() - before;
        let waiters = if released > 0 { std::mem::take(&mut lists.waiters) } else { Vec::new() };
        drop(lists);
        for w in waiters {
            w.complete(());
        }
        if released > 0 {
            self.freed.notify_all();
        }
        released
    }

    /// Installs the state found by recovery: `used` blocks with their sequence and live bytes
    /// (live bytes may be zero, then the block is free); every other block is free. The next
    /// block opened gets a sequence above all of them.
    pub fn restore(&self, used: &[(u32, u64)]) {
        let mut lists = self.lists();
        for s in self.slots.iter() {
            s.state.store(BlockState::Free as u8, Ordering::SeqCst);
            for k in &s.killed_at {
                k.store(0, Ordering::SeqCst);
            }
        }
        for &(block, sequence) in used {
            let s = &self.slots[block as usize];
            s.sequence.store(sequence, Ordering::SeqCst);
            self.next_sequence.fetch_max(sequence + 1, Ordering::SeqCst);
            if s.live_bytes.load(Ordering::SeqCst) > 0 {
                s.state.store(BlockState::Used as u8, Ordering::SeqCst);
            }
        }
        lists.pending.clear();
        lists.free = (0..self.len()).rev().filter(|&b| self.state(b) == BlockState::Free).collect();
        for b in &lists.free {
            self.slots[*b as usize].live_bytes.store(0, Ordering::SeqCst);
        }
    }

    /// Sets the sequence of a block during recovery (before [`BlockTable::restore`]).
    pub fn set_sequence(&self, block: u32, sequence: u64) {
        self.slots[block as usize].sequence.store(sequence, Ordering::SeqCst);
    }

    /// The sequence the next opened block will get.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence.load(Ordering::SeqCst)
    }

    /// Counts blocks by state.
    pub fn counts(&self) -> BlockCounts {
        let mut c = BlockCounts::default();
        for b in 0..self.len() {
            let live = self.live_bytes(b);
            match self.state(b) {
                BlockState::Free => c.free += 1,
                BlockState::Open => c.open += 1,
                BlockState::Sealed => c.sealed += 1,
                BlockState::Used => {
                    c.used += 1;
                    if live < self.defrag_lwm_bytes {
                        c.defrag_eligible += 1;
                    }
                }
                BlockState::PendingFree => c.pending_free += 1,
                BlockState::Defrag => c.defrag += 1,
            }
            c.live_bytes += live;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn table(n: u32) -> BlockTable {
        BlockTable::new(n, 1 << 20, 1, Reserves::default(), 50)
    }

    /// Sequences past 2^32 used to wrap in release builds (shifted out of a u64), so a later
    /// write could compare as older and a block be freed while a crash still needed it.
    #[test]
    fn write_positions_order_past_32_bit_sequences() {
        let big = 1u64 << 32;
        assert!(write_pos(big, 64) > write_pos(big - 1, u32::MAX));
        assert!(write_pos(big + 1, 0) > write_pos(big, 8 * 1024 * 1024));
        assert!(write_pos(SEQUENCE_LIMIT - 1, 16) > write_pos(SEQUENCE_LIMIT - 2, u32::MAX));
        assert!(write_pos(5, 8 * 1024 * 1024) < write_pos(5, u32::MAX));
        let t = BlockTable::new(4, 1 << 20, big + 7, Reserves::default(), 50);
        let (_, seq) = t.allocate(Purpose::Write).unwrap();
        assert_eq!(seq, big + 7);
    }

    #[test]
    #[should_panic(expected = "reached 2^44")]
    fn a_sequence_beyond_the_limit_is_refused_loudly() {
        let _ = write_pos(SEQUENCE_LIMIT, 0);
    }

    #[test]
    fn block_is_freed_only_after_its_killers_are_durable_in_every_stream() {
        let t = table(4);
        let (b, seq) = t.allocate(Purpose::Write).unwrap();
        assert_eq!(seq, 1);
        t.add_live(b, 100);
        t.mark_sealed(b);
        t.mark_used(b);
        t.remove_live(b, 60, Stream::Client, write_pos(2, 496));
        t.remove_live(b, 40, Stream::Defrag, write_pos(3, 64));
        assert_eq!(t.state(b), BlockState::PendingFree);
        assert_eq!(t.set_durable(Stream::Client, write_pos(2, 496)), 0, "defrag stream not yet durable");
        assert_eq!(t.set_durable(Stream::Defrag, write_pos(3, 48)), 0);
        assert_eq!(t.set_durable(Stream::Defrag, write_pos(3, 64)), 1);
        assert_eq!(t.state(b), BlockState::Free);
    }

    #[test]
    fn an_emptied_block_waits_for_its_own_flush() {
        let t = table(2);
        let (b, _) = t.allocate(Purpose::Write).unwrap();
        t.add_live(b, 64);
        t.remove_live(b, 64, Stream::Client, write_pos(1, 128));
        assert_eq!(t.state(b), BlockState::Open, "an open block is never retired");
        t.mark_sealed(b);
        t.mark_used(b);
        assert_eq!(t.state(b), BlockState::PendingFree);
        assert_eq!(t.set_durable(Stream::Client, write_pos(1, 128)), 1);
    }

    #[test]
    fn reserves_keep_blocks_for_deletes_and_defrag() {
        let t = BlockTable::new(
            6,
            1 << 20,
            1,
            Reserves { stop_writes_blocks: 3, defrag_reserve_blocks: 1, defrag_urgent_blocks: 3 },
            50,
        );
        assert!(t.allocate(Purpose::Write).is_some());
        assert!(t.allocate(Purpose::Write).is_some());
        assert!(t.allocate(Purpose::Write).is_some());
        assert!(t.allocate(Purpose::Write).is_none(), "stop-writes level reached");
        assert!(t.allocate(Purpose::Delete).is_some());
        assert!(t.allocate(Purpose::Delete).is_some());
        assert!(t.allocate(Purpose::Delete).is_none(), "the defrag reserve is not for deletes");
        assert!(t.allocate(Purpose::Defrag).is_some());
        assert!(t.allocate(Purpose::Defrag).is_none());
    }

    fn used_block(t: &BlockTable, live: u64) -> u32 {
        let (b, _) = t.allocate(Purpose::Defrag).unwrap();
        t.add_live(b, live);
        t.mark_sealed(b);
        t.mark_used(b);
        b
    }

    #[test]
    fn urgent_defrag_takes_the_emptiest_block_above_the_mark_but_not_a_nearly_full_one() {
        let reserves = Reserves { stop_writes_blocks: 2, defrag_reserve_blocks: 1, defrag_urgent_blocks: 3 };
        let t = BlockTable::new(7, 1 << 20, 1, reserves, 50);
        let nearly_full = used_block(&t, 1_000_000);
        used_block(&t, 800_000);
        let emptiest = used_block(&t, 700_000);
        assert!(!t.defrag_is_urgent(), "4 free blocks");
        assert_eq!(t.take_defrag_candidate(), None, "nothing is below the low-water mark");
        used_block(&t, 950_000);
        assert!(t.defrag_is_urgent(), "3 free blocks");
        assert_eq!(t.take_defrag_candidate(), Some(emptiest));
        assert_eq!(t.take_defrag_candidate().map(|b| t.live_bytes(b)), Some(800_000));
        assert_eq!(t.take_defrag_candidate(), None, "over 90 % live is not worth moving");
        assert_eq!(t.state(nearly_full), BlockState::Used);
    }

    #[test]
    fn writers_wait_for_reclaimable_space_but_not_for_a_full_device() {
        let reserves = Reserves { stop_writes_blocks: 1, defrag_reserve_blocks: 0, defrag_urgent_blocks: 1 };
        let t = std::sync::Arc::new(BlockTable::new(3, 1 << 20, 1, reserves, 50));
        let full = used_block(&t, 1 << 20);
        let dying = used_block(&t, 1_000_000);
        let started = Instant::now();
        assert!(!t.wait_for_space(Purpose::Write, Duration::from_secs(5)), "both blocks are nearly all live");
        assert!(started.elapsed() < Duration::from_secs(1), "nothing reclaimable: no wait");
        assert_eq!(t.state(full), BlockState::Used);
        t.remove_live(dying, 1_000_000, Stream::Client, write_pos(9, 64));
        assert!(t.space_is_reclaimable(), "the emptied block waits for its killer");
        let releaser = {
            let t = t.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                t.set_durable(Stream::Client, write_pos(9, 64))
            })
        };
        assert!(t.wait_for_space(Purpose::Write, Duration::from_secs(5)));
        assert_eq!(releaser.join().unwrap(), 1);
        assert!(t.can_allocate(Purpose::Write));
    }

    #[test]
    fn the_emptiest_block_below_the_mark_is_defragmented_first() {
        let t = table(4);
        for live in [600_000u64, 300_000, 100_000] {
            let (b, _) = t.allocate(Purpose::Write).unwrap();
            t.add_live(b, live);
            t.mark_sealed(b);
            t.mark_used(b);
        }
        assert_eq!(t.counts().defrag_eligible, 2);
        let first = t.take_defrag_candidate().unwrap();
        assert_eq!(t.live_bytes(first), 100_000);
        assert_eq!(t.state(first), BlockState::Defrag);
        let second = t.take_defrag_candidate().unwrap();
        assert_eq!(t.live_bytes(second), 300_000);
        assert_eq!(t.take_defrag_candidate(), None, "the 60 % block stays");
        t.remove_live(first, 100_000, Stream::Defrag, write_pos(9, 96));
        t.finish_defrag(first);
        assert_eq!(t.state(first), BlockState::PendingFree);
        t.finish_defrag(second);
        assert_eq!(t.state(second), BlockState::Used, "a block with live records goes back");
    }

    #[test]
    fn restore_marks_empty_blocks_free_and_continues_sequences() {
        let t = table(3);
        t.add_live(0, 10);
        t.restore(&[(0, 5), (1, 6)]);
        assert_eq!(t.state(0), BlockState::Used);
        assert_eq!(t.sequence(0), 5);
        assert_eq!(t.state(1), BlockState::Free);
        assert_eq!(t.free_count(), 2);
        assert_eq!(t.allocate(Purpose::Write), Some((1, 7)));
    }
}
