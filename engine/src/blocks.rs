//! Per-device write block accounting: each block's state, sequence number and live bytes, the
//! free list, and blocks waiting to be freed.
//!
//! Invariant: a block is freed only when it holds no live record *and* every write that made
//! its records dead (overwrites, deletes, defrag moves) is durable. Until then a crash could
//! leave the older copy as the only one, so its bytes must stay on the device.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A position in a device's write order: block sequence in the high 32 bits, byte offset within
/// the block in the low 32. Later writes have larger positions.
pub type WritePos = u64;

/// Builds a [`WritePos`].
pub fn write_pos(sequence: u64, offset_in_block: u32) -> WritePos {
    debug_assert!(sequence < 1 << 32, "block sequence overflowed 32 bits");
    (sequence << 32) | u64::from(offset_in_block)
}

/// Lifecycle of a write block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// On the free list.
    Free = 0,
    /// Being filled by the writer.
    Open = 1,
    /// Full, waiting for (or undergoing) its device write.
    Sealed = 2,
    /// On the device.
    Used = 3,
    /// Holds no live record; freed once the writes that emptied it are durable.
    PendingFree = 4,
}

impl BlockState {
    fn from_u8(v: u8) -> BlockState {
        match v {
            1 => BlockState::Open,
            2 => BlockState::Sealed,
            3 => BlockState::Used,
            4 => BlockState::PendingFree,
            _ => BlockState::Free,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    state: AtomicU8,
    sequence: AtomicU64,
    live_bytes: AtomicU64,
    /// Largest write position that killed a record of this block.
    killed_at: AtomicU64,
}

#[derive(Debug, Default)]
struct FreeLists {
    free: Vec<u32>,
    pending: Vec<(u32, WritePos)>,
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
    /// Live bytes over all blocks.
    pub live_bytes: u64,
}

/// The block table of one device.
#[derive(Debug)]
pub struct BlockTable {
    slots: Box<[Slot]>,
    lists: Mutex<FreeLists>,
}

impl BlockTable {
    /// A table of `count` blocks, all free.
    pub fn new(count: u32) -> BlockTable {
        BlockTable {
            slots: (0..count).map(|_| Slot::default()).collect(),
            lists: Mutex::new(FreeLists { free: (0..count).rev().collect(), pending: Vec::new() }),
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

    /// Takes a free block for writing with `sequence`; `None` when none is free.
    pub fn allocate(&self, sequence: u64) -> Option<u32> {
        let block = self.lists().free.pop()?;
        let s = &self.slots[block as usize];
        debug_assert_eq!(self.state(block), BlockState::Free);
        s.sequence.store(sequence, Ordering::SeqCst);
        s.live_bytes.store(0, Ordering::SeqCst);
        s.killed_at.store(0, Ordering::SeqCst);
        s.state.store(BlockState::Open as u8, Ordering::SeqCst);
        Some(block)
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

    /// Live bytes in the block.
    pub fn live_bytes(&self, block: u32) -> u64 {
        self.slots[block as usize].live_bytes.load(Ordering::SeqCst)
    }

    /// A record of `bytes` was placed in the block.
    pub fn add_live(&self, block: u32, bytes: u64) {
        self.slots[block as usize].live_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    /// A record of `bytes` in the block died because of the write at `killer`.
    pub fn remove_live(&self, block: u32, bytes: u64, killer: WritePos) {
        let s = &self.slots[block as usize];
        s.killed_at.fetch_max(killer, Ordering::SeqCst);
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
            lists.pending.push((block, s.killed_at.load(Ordering::SeqCst)));
        }
    }

    /// Frees pending blocks whose killing writes are durable up to `durable`. Returns how many.
    pub fn release_pending(&self, durable: WritePos) -> usize {
        let mut lists = self.lists();
        let FreeLists { free, pending } = &mut *lists;
        let before = free.len();
        pending.retain(|&(block, needed)| {
            if needed <= durable {
                self.slots[block as usize].state.store(BlockState::Free as u8, Ordering::SeqCst);
                free.push(block);
                false
            } else {
                true
            }
        });
        free.len() - before
    }

    /// Installs the state found by recovery: `used` blocks with their sequence and live bytes
    /// (live bytes may be zero, then the block is free); every other block is free.
    pub fn restore(&self, used: &[(u32, u64)]) {
        let mut lists = self.lists();
        for s in self.slots.iter() {
            s.state.store(BlockState::Free as u8, Ordering::SeqCst);
            s.killed_at.store(0, Ordering::SeqCst);
        }
        for &(block, sequence) in used {
            let s = &self.slots[block as usize];
            s.sequence.store(sequence, Ordering::SeqCst);
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

    /// Counts blocks by state.
    pub fn counts(&self) -> BlockCounts {
        let mut c = BlockCounts::default();
        for b in 0..self.len() {
            match self.state(b) {
                BlockState::Free => c.free += 1,
                BlockState::Open => c.open += 1,
                BlockState::Sealed => c.sealed += 1,
                BlockState::Used => c.used += 1,
                BlockState::PendingFree => c.pending_free += 1,
            }
            c.live_bytes += self.live_bytes(b);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_is_freed_only_after_its_killers_are_durable() {
        let t = BlockTable::new(4);
        let b = t.allocate(1).unwrap();
        t.add_live(b, 100);
        t.mark_sealed(b);
        t.mark_used(b);
        assert_eq!(t.state(b), BlockState::Used);
        t.remove_live(b, 100, write_pos(2, 500));
        assert_eq!(t.state(b), BlockState::PendingFree);
        assert_eq!(t.release_pending(write_pos(2, 499)), 0);
        assert_eq!(t.free_count(), 3);
        assert_eq!(t.release_pending(write_pos(2, 500)), 1);
        assert_eq!(t.state(b), BlockState::Free);
        assert_eq!(t.free_count(), 4);
    }

    #[test]
    fn an_emptied_block_waits_for_its_own_flush() {
        let t = BlockTable::new(2);
        let b = t.allocate(1).unwrap();
        t.add_live(b, 64);
        t.remove_live(b, 64, write_pos(1, 128));
        assert_eq!(t.state(b), BlockState::Open, "an open block is never retired");
        t.mark_sealed(b);
        t.mark_used(b);
        assert_eq!(t.state(b), BlockState::PendingFree);
        assert_eq!(t.release_pending(write_pos(1, 128)), 1);
    }

    #[test]
    fn restore_marks_empty_blocks_free() {
        let t = BlockTable::new(3);
        t.add_live(0, 10);
        t.restore(&[(0, 5), (1, 6)]);
        assert_eq!(t.state(0), BlockState::Used);
        assert_eq!(t.sequence(0), 5);
        assert_eq!(t.state(1), BlockState::Free);
        assert_eq!(t.free_count(), 2);
        assert_eq!(t.allocate(9), Some(1));
    }
}
