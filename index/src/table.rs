//! One partition's hash table: open addressing with Robin Hood linear probing over packed
//! 40-byte entries, sized to any capacity (not just powers of two) so memory per record stays
//! close to 40 / load factor.
//!
//! The home slot of a digest is `order_hash * capacity >> 64`, which is monotone in the digest,
//! so Robin Hood ordering keeps the slots nearly sorted by digest and removal uses backward
//! shifting (no tombstone slots).

use crate::digest::{Digest, PartitionId};
use crate::entry::{EMPTY, Entry, Packed, is_empty, order_hash, pack, slot_matches, slot_order_hash, unpack};
use crate::slots::SlotArray;

/// The table grows when an insert would push the load above this fraction (percent).
pub const LOAD_PERCENT_MAX: usize = 90;
/// The table shrinks when a removal drops the load below this fraction (percent).
pub const LOAD_PERCENT_MIN: usize = 30;
/// Load right after a resize (percent): growth is by a factor of ~1.25.
const LOAD_PERCENT_AFTER_RESIZE: usize = 72;
/// Smallest non-zero capacity.
const CAPACITY_MIN: usize = 8;

/// Where a looked-up digest sits (or that it is absent), valid until the table is modified.
#[derive(Clone, Copy, Debug)]
pub struct SlotHint {
    index: Option<usize>,
    capacity: usize,
    digest: Digest,
}

/// The hash table of one partition.
#[derive(Debug)]
pub struct PartitionTable {
    pid: PartitionId,
    slots: SlotArray,
    len: usize,
}

impl PartitionTable {
    /// An empty table for partition `pid` (allocates nothing).
    pub fn new(pid: PartitionId) -> PartitionTable {
        PartitionTable { pid, slots: SlotArray::new(0), len: 0 }
    }

    /// The partition this table holds.
    pub fn partition(&self) -> PartitionId {
        self.pid
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of slots (capacity).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Heap bytes used by the slots.
    pub fn heap_bytes(&self) -> usize {
        self.slots.bytes()
    }

    /// The entry for `digest`, if present.
    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.find(digest).map(|i| unpack(self.pid, &self.slots[i]))
    }

    /// Looks `digest` up and returns a hint that lets [`PartitionTable::insert_hinted`] store
    /// the new version without probing again (while the caller holds the table exclusively).
    pub fn lookup(&self, digest: &Digest) -> (Option<Entry>, SlotHint) {
        let index = self.find(digest);
        let hint = SlotHint { index, capacity: self.slots.len(), digest: *digest };
        (index.map(|i| unpack(self.pid, &self.slots[i])), hint)
    }

    /// Inserts or replaces `entry` using a hint from [`PartitionTable::lookup`] on the same
    /// digest; falls back to a full insert if the table changed since. Returns the previous entry.
    pub fn insert_hinted(&mut self, entry: Entry, hint: SlotHint) -> Option<Entry> {
        assert_eq!(hint.digest, entry.digest, "hint belongs to another digest");
        if hint.capacity != self.slots.len() {
            return self.insert(entry);
        }
        match hint.index {
            Some(i) if slot_matches(&self.slots[i], &entry.digest) => {
                let old = unpack(self.pid, &self.slots[i]);
                self.slots[i] = pack(&entry);
                Some(old)
            }
            Some(_) => self.insert(entry),
            None => {
                assert_eq!(entry.digest.partition(), self.pid, "digest belongs to another partition");
                if (self.len + 1) * 100 > self.slots.len() * LOAD_PERCENT_MAX {
                    self.resize(grown_capacity(self.len + 1));
                }
                self.insert_new(pack(&entry));
                self.len += 1;
                None
            }
        }
    }

    /// Inserts or replaces the entry for `entry.digest`; returns the previous entry.
    pub fn insert(&mut self, entry: Entry) -> Option<Entry> {
        assert_eq!(entry.digest.partition(), self.pid, "digest belongs to another partition");
        let packed = pack(&entry);
        if let Some(i) = self.find(&entry.digest) {
            let old = unpack(self.pid, &self.slots[i]);
            self.slots[i] = packed;
            return Some(old);
        }
        if (self.len + 1) * 100 > self.slots.len() * LOAD_PERCENT_MAX {
            self.resize(grown_capacity(self.len + 1));
        }
        self.insert_new(packed);
        self.len += 1;
        None
    }

    /// Removes the entry for `digest`; returns it.
    pub fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        let mut i = self.find(digest)?;
        let old = unpack(self.pid, &self.slots[i]);
        let cap = self.slots.len();
        // Backward shift: pull following displaced entries one slot closer to home.
        loop {
            let next = if i + 1 == cap { 0 } else { i + 1 };
            let follower = self.slots[next];
            if is_empty(&follower) || self.distance(next, &follower) == 0 {
                self.slots[i] = EMPTY;
                break;
            }
            self.slots[i] = follower;
            i = next;
        }
        self.len -= 1;
        if self.len == 0 {
            self.slots = SlotArray::new(0);
        } else if cap > CAPACITY_MIN && self.len * 100 < cap * LOAD_PERCENT_MIN {
            self.resize(grown_capacity(self.len));
        }
        Some(old)
    }

    /// All entries in slot order (nearly digest order).
    pub fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        self.slots.iter().filter(|s| !is_empty(s)).map(|s| unpack(self.pid, s))
    }

    /// All entries whose digest is greater than `after` (all when `None`), sorted by digest.
    pub fn sorted_after(&self, after: Option<&Digest>) -> Vec<Entry> {
        let mut out: Vec<Entry> = match after {
            Some(a) => self.iter().filter(|e| e.digest > *a).collect(),
            None => self.iter().collect(),
        };
        out.sort_unstable_by_key(|a| a.digest);
        out
    }

    /// The `limit` smallest entries whose digest is greater than `after` (all when `None`),
    /// sorted by digest. Memory is bounded by `limit` whatever the partition holds: one pass
    /// over the table keeps the best `limit` in a max-heap.
    pub fn sorted_batch_after(&self, after: Option<&Digest>, limit: usize) -> Vec<Entry> {
        if limit == 0 {
            return Vec::new();
        }
        let mut heap: std::collections::BinaryHeap<ByDigest> = std::collections::BinaryHeap::with_capacity(limit + 1);
        for e in self.iter() {
            if after.is_some_and(|a| e.digest <= *a) {
                continue;
            }
            if heap.len() < limit {
                heap.push(ByDigest(e));
            } else if heap.peek().is_some_and(|top| e.digest < top.0.digest) {
                heap.pop();
                heap.push(ByDigest(e));
            }
        }
        let mut out: Vec<Entry> = heap.into_iter().map(|b| b.0).collect();
        out.sort_unstable_by_key(|a| a.digest);
        out
    }

    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    fn distance(&self, index: usize, slot: &Packed) -> usize {
        let home = self.home(slot_order_hash(slot));
        if index >= home { index - home } else { index + self.slots.len() - home }
    }

    fn find(&self, digest: &Digest) -> Option<usize> {
        let cap = self.slots.len();
        if cap == 0 {
            return None;
        }
        let mut i = self.home(order_hash(digest));
        for dist in 0..cap {
            let slot = &self.slots[i];
            if is_empty(slot) {
                return None;
            }
            if slot_matches(slot, digest) {
                return Some(i);
            }
            if self.distance(i, slot) < dist {
                return None;
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
        }
        None
    }

    /// Places a digest known to be absent; the caller has made room.
    fn insert_new(&mut self, packed: Packed) {
        let cap = self.slots.len();
        debug_assert!(self.len < cap);
        let mut carried = packed;
        let mut i = self.home(slot_order_hash(&carried));
        let mut dist = 0;
        loop {
            let slot = self.slots[i];
            if is_empty(&slot) {
                self.slots[i] = carried;
                return;
            }
            let resident = self.distance(i, &slot);
            if resident < dist {
                self.slots[i] = carried;
                carried = slot;
                dist = resident;
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
            dist += 1;
            assert!(dist <= cap, "robin hood insert ran past capacity");
        }
    }

    fn resize(&mut self, capacity: usize) {
        assert!(capacity >= self.len);
        let old = std::mem::replace(&mut self.slots, SlotArray::new(capacity));
        for slot in old.iter().filter(|s| !is_empty(s)) {
            self.insert_new(*slot);
        }
    }
}

/// Capacity for `len` entries right after a resize.
fn grown_capacity(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    (len * 100 / LOAD_PERCENT_AFTER_RESIZE + 1).max(CAPACITY_MIN)
}

/// Orders entries by digest alone (for the batch heap).
struct ByDigest(Entry);

impl PartialEq for ByDigest {
    fn eq(&self, other: &Self) -> bool {
        self.0.digest == other.0.digest
    }
}

impl Eq for ByDigest {}

impl PartialOrd for ByDigest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByDigest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.digest.cmp(&other.0.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::KeyRef;
    use crate::entry::{EntryFlags, Location};
    use std::collections::BTreeMap;

    fn entry(d: Digest, generation: u16) -> Entry {
        Entry {
            digest: d,
            set_id: 3,
            location: Location { device: 1, offset: 4096, size: 1024 },
            generation,
            void_time: 7,
            last_update_ms: 99,
            flags: EntryFlags::empty(),
        }
    }

    /// Digests that all land in partition `pid`, found by brute force.
    fn digests_in(pid: u16, n: usize) -> Vec<Digest> {
        let mut out = Vec::new();
        let mut raw = [0u8; 20];
        let mut i: u64 = 0;
        while out.len() < n {
            // Build digests directly: partition bits fixed, the rest pseudo-random.
            let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ i;
            raw[0] = (pid & 0xFF) as u8;
            raw[1] = ((pid >> 8) as u8 & 0x0F) | ((x as u8) << 4);
            raw[2..10].copy_from_slice(&x.to_le_bytes());
            raw[10..18].copy_from_slice(&x.rotate_left(29).to_le_bytes());
            out.push(Digest(raw));
            i += 1;
        }
        out
    }

    #[test]
    fn insert_get_remove_against_a_model() {
        let pid = PartitionId::new(77).unwrap();
        let mut table = PartitionTable::new(pid);
        let mut model = BTreeMap::new();
        let keys = digests_in(77, 5000);
        let mut state: u64 = 1;
        for step in 0..60_000u32 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let d = keys[(state >> 33) as usize % keys.len()];
            let generation = (step % 65535 + 1) as u16;
            if (state >> 20).is_multiple_of(3) {
                assert_eq!(table.remove(&d).map(|e| e.generation), model.remove(&d));
            } else {
                assert_eq!(table.insert(entry(d, generation)).map(|e| e.generation), model.insert(d, generation));
            }
            assert_eq!(table.len(), model.len());
        }
        for d in &keys {
            assert_eq!(table.get(d).map(|e| e.generation), model.get(d).copied());
        }
        let sorted: Vec<Digest> = table.sorted_after(None).iter().map(|e| e.digest).collect();
        let expected: Vec<Digest> = model.keys().copied().collect();
        assert_eq!(sorted, expected);
        let pivot = expected[expected.len() / 2];
        let after: Vec<Digest> = table.sorted_after(Some(&pivot)).iter().map(|e| e.digest).collect();
        assert_eq!(after, expected[expected.len() / 2 + 1..].to_vec());
    }

    #[test]
    fn hinted_inserts_match_plain_ones() {
        let pid = PartitionId::new(9).unwrap();
        let mut table = PartitionTable::new(pid);
        let keys = digests_in(9, 3000);
        for (i, d) in keys.iter().enumerate() {
            let (found, hint) = table.lookup(d);
            assert!(found.is_none());
            assert!(table.insert_hinted(entry(*d, 1 + i as u16), hint).is_none());
        }
        for (i, d) in keys.iter().enumerate() {
            let (found, hint) = table.lookup(d);
            assert_eq!(found.map(|e| e.generation), Some(1 + i as u16));
            assert_eq!(table.insert_hinted(entry(*d, 7), hint).map(|e| e.generation), Some(1 + i as u16));
        }
        // A stale hint (the table grew meanwhile) still lands correctly.
        let (_, stale) = table.lookup(&keys[0]);
        for d in digests_in(9, 6000).iter().skip(3000) {
            table.insert(entry(*d, 2));
        }
        assert_eq!(table.insert_hinted(entry(keys[0], 8), stale).map(|e| e.generation), Some(7));
        assert_eq!(table.len(), 6000);
        assert!(keys.iter().all(|d| table.get(d).is_some()));
    }

    #[test]
    fn load_stays_between_bounds() {
        let pid = PartitionId::new(5).unwrap();
        let mut table = PartitionTable::new(pid);
        let keys = digests_in(5, 20_000);
        for (i, d) in keys.iter().enumerate() {
            table.insert(entry(*d, 1));
            assert!(table.len() * 100 <= table.capacity() * LOAD_PERCENT_MAX, "at {i}");
        }
        let load = table.len() as f64 / table.capacity() as f64;
        assert!(load > 0.70, "load {load}");
        for d in &keys[..19_000] {
            assert!(table.remove(d).is_some());
        }
        assert!(table.capacity() < 2000, "table did not shrink: {}", table.capacity());
        for d in &keys[19_000..] {
            assert!(table.get(d).is_some());
        }
        for d in &keys[19_000..] {
            table.remove(d);
        }
        assert!(table.is_empty());
        assert_eq!(table.capacity(), 0);
    }

    #[test]
    fn real_digests_round_trip_through_the_table() {
        let pid = Digest::of_key(b"s", KeyRef::Int(0)).partition();
        let mut table = PartitionTable::new(pid);
        let mine: Vec<Digest> =
            (0..400_000).map(|i| Digest::of_key(b"s", KeyRef::Int(i))).filter(|d| d.partition() == pid).collect();
        for d in &mine {
            assert!(table.insert(entry(*d, 2)).is_none());
        }
        for d in &mine {
            assert_eq!(table.get(d).unwrap().digest, *d);
        }
        let other = Digest::of_key(b"other", KeyRef::Int(1));
        let mut foreign = other;
        foreign.0[0] = pid.get() as u8;
        foreign.0[1] = (foreign.0[1] & 0xF0) | ((pid.get() >> 8) as u8);
        assert!(table.get(&foreign).is_none());
    }

    #[test]
    fn sorted_batches_walk_the_partition_in_digest_order() {
        let pid = Digest::of_key(b"s", KeyRef::Int(0)).partition();
        let mut table = PartitionTable::new(pid);
        let mut mine: Vec<Digest> =
            (0..200_000).map(|i| Digest::of_key(b"s", KeyRef::Int(i))).filter(|d| d.partition() == pid).collect();
        for d in &mine {
            table.insert(entry(*d, 2));
        }
        mine.sort();
        for limit in [1, 7, mine.len(), mine.len() + 5] {
            let mut walked = Vec::new();
            let mut after: Option<Digest> = None;
            loop {
                let batch = table.sorted_batch_after(after.as_ref(), limit);
                assert!(batch.len() <= limit);
                let Some(last) = batch.last() else { break };
                after = Some(last.digest);
                walked.extend(batch.iter().map(|e| e.digest));
            }
            assert_eq!(walked, mine, "limit {limit}");
        }
        assert!(table.sorted_batch_after(None, 0).is_empty());
    }
}
