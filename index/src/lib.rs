//! Peregrine's primary index: for every record of a namespace, where its newest version lives
//! on the devices, plus the metadata needed without a device read (generation, void time,
//! last-update time, set id, flags).
//!
//! Architecture invariant: this crate does no I/O. It is split into 4096 partition tables, each
//! behind its own reader-writer lock, so readers and writers of different partitions never
//! contend and there is no global lock.

mod digest;
mod entry;
pub mod particle;
mod slots;
mod table;

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use digest::{DIGEST_LEN, Digest, KeyRef, PARTITION_COUNT, PartitionId};
pub use entry::{
    DEVICE_BYTES_MAX, DEVICES_MAX, Entry, EntryFlags, LAST_UPDATE_MS_MAX, LOCATION_ALIGN_BYTES, Location,
    PACKED_ENTRY_LEN, RECORD_EXTENT_BYTES_MAX, SET_ID_MAX,
};
pub use table::{LOAD_PERCENT_MAX, LOAD_PERCENT_MIN, PartitionTable, SlotHint};

/// The primary index of one namespace.
#[derive(Debug)]
pub struct Index {
    partitions: Box<[RwLock<PartitionTable>]>,
}

impl Default for Index {
    fn default() -> Self {
        Index::new()
    }
}

impl Index {
    /// An empty index (4096 empty partition tables).
    pub fn new() -> Index {
        Index { partitions: PartitionId::all().map(|p| RwLock::new(PartitionTable::new(p))).collect() }
    }

    /// Shared access to one partition's table.
    pub fn read(&self, pid: PartitionId) -> RwLockReadGuard<'_, PartitionTable> {
        self.partitions[pid.index()].read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Exclusive access to one partition's table.
    pub fn write(&self, pid: PartitionId) -> RwLockWriteGuard<'_, PartitionTable> {
        self.partitions[pid.index()].write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry for `digest`, if present (tombstones included).
    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.read(digest.partition()).get(digest)
    }

    /// Number of entries (tombstones included), summed over partitions.
    pub fn len(&self) -> u64 {
        PartitionId::all().map(|p| self.read(p).len() as u64).sum()
    }

    /// Whether the index holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the index holds: slot arrays plus the fixed partition array.
    pub fn memory_bytes(&self) -> u64 {
        let fixed = std::mem::size_of_val(&*self.partitions) as u64;
        fixed + PartitionId::all().map(|p| self.read(p).heap_bytes() as u64).sum::<u64>()
    }

    /// Entries of one partition with digest greater than `after`, sorted by digest.
    pub fn sorted_entries(&self, pid: PartitionId, after: Option<&Digest>) -> Vec<Entry> {
        self.read(pid).sorted_after(after)
    }

    /// At most `limit` entries of partition `pid` with digest greater than `after`, in digest
    /// order (memory bounded by `limit`; see [`PartitionTable::sorted_batch_after`]).
    pub fn sorted_batch(&self, pid: PartitionId, after: Option<&Digest>, limit: usize) -> Vec<Entry> {
        self.read(pid).sorted_batch_after(after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: i64) -> Entry {
        Entry {
            digest: Digest::of_key(b"", KeyRef::Int(i)),
            set_id: 0,
            location: Location { device: 0, offset: 1 << 20, size: 1040 },
            generation: 1,
            void_time: 0,
            last_update_ms: 1,
            flags: EntryFlags::empty(),
        }
    }

    #[test]
    fn concurrent_writers_and_readers() {
        let index = Index::new();
        std::thread::scope(|s| {
            for t in 0..4i64 {
                let index = &index;
                s.spawn(move || {
                    for i in (t * 50_000)..((t + 1) * 50_000) {
                        let e = entry(i);
                        index.write(e.digest.partition()).insert(e);
                        assert!(index.get(&e.digest).is_some());
                    }
                });
            }
        });
        assert_eq!(index.len(), 200_000);
        let per_record = index.memory_bytes() as f64 / 200_000.0;
        assert!(per_record < 64.0, "index uses {per_record:.1} bytes per record");
        let total: usize = PartitionId::all().map(|p| index.sorted_entries(p, None).len()).sum();
        assert_eq!(total, 200_000);
    }
}
