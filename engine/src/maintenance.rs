//! Namespace maintenance on one background thread (in [`MaintenanceMode::Standalone`]): expiry (expired records leave the index and
//! release their space; where older copies may still be on the device a tombstone is written
//! first, so they cannot come back at cold start), eviction (records closest to expiry, never
//! records without TTL, in small steps while a high-water mark is exceeded), and the tomb raider
//! (drops tombstones once no older live copy of their record is left on the device or in
//! memory). In [`MaintenanceMode::External`] the engine removes nothing by itself: the caller
//! asks for expiry and eviction candidates and deletes them through its own log.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use peregrine_index::{Digest, Entry, EntryFlags, PartitionId};

use crate::blocks::{Purpose, Stream};
use crate::clock::is_expired;
use crate::completion::block_on;
use crate::config::MaintenanceMode;
use crate::defrag::StopSignal;
use crate::error::Result;
use crate::format::block_header::BlockHeader;
use crate::io::{AlignedBuf, wait_io};
use crate::record::{RecordMeta, RecordVersion, next_generation};
use crate::scan::{BlockSource, block_read_len, read_block_headers, scan_block};
use crate::store::{Commit, Expect, Store};

/// The maintenance thread wakes at least this often.
const TICK: Duration = Duration::from_secs(1);
/// Void times sampled to choose an eviction cutoff.
const EVICT_SAMPLE_MAX: usize = 1_000_000;
/// The tomb raider runs early only when there are at least this many tombstones.
const RAID_TOMBSTONES_MIN: u64 = 1000;

impl Store {
    /// Removes every expired record from the index and releases its space; returns how many.
    pub(crate) fn reap_expired(&self) -> u64 {
        let now = self.config.clock.now_void_s();
        let mut reaped = 0;
        for pid in PartitionId::all() {
            let expired: Vec<Entry> =
                self.index.read(pid).iter().filter(|e| !e.is_tombstone() && is_expired(e.void_time, now)).collect();
            for e in expired {
                if self.remove_expired(&e).unwrap_or(false) {
                    reaped += 1;
                }
            }
        }
        self.counters.expired.fetch_add(reaped, Ordering::Relaxed);
        reaped
    }

    /// Removes one expired (or evicted) record if its index entry is still `e`.
    fn remove_expired(&self, e: &Entry) -> Result<bool> {
        if e.flags.contains(EntryFlags::OLDER_COPIES) {
            // An older copy may have a later void time (a touch shortened the TTL) or none:
            // a tombstone keeps it dead.
            let meta = RecordMeta {
                generation: next_generation(e.generation),
                void_time: 0,
                last_update_ms: self.config.clock.now_unix_ms().max(e.last_update_ms + 1),
            };
            let v = RecordVersion::Tombstone { digest: e.digest, set_name: self.sets.name(e.set_id), meta };
            let done = block_on(self.commit(&v, Expect::Exactly(Some(*e)), false, Purpose::Delete))?;
            return Ok(matches!(done, Commit::Done(_)));
        }
        let mut table = self.index.write(e.digest.partition());
        if table.get(&e.digest) != Some(*e) {
            return Ok(false);
        }
        table.remove(&e.digest);
        drop(table);
        // The copy on the device is expired: recovery discards it, so its space is free at once.
        self.release(e, Stream::Client, 0);
        self.counters.records.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether live data or the index is over an eviction high-water mark: (device, index).
    fn over_eviction_marks(&self) -> (bool, bool) {
        let c = &self.config;
        let (mut total, mut live) = (0u64, 0u64);
        for d in &self.devices {
            total += u64::from(d.blocks.len()) * u64::from(d.blocks.block_bytes());
            live += d.blocks.counts().live_bytes;
        }
        let over_device = c.evict_used_pct > 0 && live * 100 > total * u64::from(c.evict_used_pct);
        let over_index = c.evict_index_bytes > 0 && self.index.memory_bytes() > c.evict_index_bytes;
        (over_device, over_index)
    }

    /// The void time at or below which one eviction step removes records (the soonest to
    /// expire, about `evict_step_tenths_pct` of those with a TTL); `None` when none has one.
    fn eviction_cutoff(&self, now: u32) -> Option<u32> {
        let evictable = |e: &Entry| !e.is_tombstone() && e.void_time != 0 && !is_expired(e.void_time, now);
        let count: usize = PartitionId::all().map(|p| self.index.read(p).iter().filter(evictable).count()).sum();
        let stride = count.div_ceil(EVICT_SAMPLE_MAX).max(1);
        let mut sample: Vec<u32> = Vec::new();
        let mut i = 0usize;
        for pid in PartitionId::all() {
            for e in self.index.read(pid).iter().filter(evictable) {
                if i.is_multiple_of(stride) {
                    sample.push(e.void_time);
                }
                i += 1;
            }
        }
        choose_eviction_cutoff(sample, self.config.evict_step_tenths_pct)
    }

    /// One eviction step if a high-water mark is exceeded; returns how many records it evicted.
    pub(crate) fn evict_if_needed(&self) -> u64 {
        let c = &self.config;
        let (over_device, over_index) = self.over_eviction_marks();
        if !over_device && !over_index {
            return 0;
        }
        let now = c.clock.now_void_s();
        let evictable = |e: &Entry| !e.is_tombstone() && e.void_time != 0 && !is_expired(e.void_time, now);
        let Some(cutoff) = self.eviction_cutoff(now) else {
            tracing::warn!(namespace = %c.namespace, "over an eviction high-water mark, but no record has a TTL to evict by");
            return 0;
        };
        let mut evicted = 0;
        for pid in PartitionId::all() {
            let victims: Vec<Entry> =
                self.index.read(pid).iter().filter(|e| evictable(e) && e.void_time <= cutoff).collect();
            for e in victims {
                if self.remove_expired(&e).unwrap_or(false) {
                    evicted += 1;
                }
            }
        }
        self.counters.evicted.fetch_add(evicted, Ordering::Relaxed);
        tracing::info!(namespace = %c.namespace, evicted, cutoff_void_time = cutoff, over_device, over_index, "evicted records closest to expiry");
        evicted
    }

    /// Up to `limit` expired records (digest and indexed metadata), for a caller that deletes
    /// them itself ([`MaintenanceMode::External`]).
    pub(crate) fn expiry_candidates(&self, limit: usize) -> Vec<(peregrine_index::Digest, RecordMeta)> {
        let now = self.config.clock.now_void_s();
        let mut out = Vec::new();
        for pid in PartitionId::all() {
            for e in self.index.read(pid).iter() {
                if out.len() >= limit {
                    return out;
                }
                if !e.is_tombstone() && is_expired(e.void_time, now) {
                    out.push((e.digest, crate::store::meta_of(&e)));
                }
            }
        }
        out
    }

    /// Up to `limit` records one eviction step would remove now (none unless a high-water mark
    /// is exceeded), for a caller that deletes them itself ([`MaintenanceMode::External`]).
    pub(crate) fn eviction_candidates(&self, limit: usize) -> Vec<(peregrine_index::Digest, RecordMeta)> {
        let (over_device, over_index) = self.over_eviction_marks();
        if !over_device && !over_index {
            return Vec::new();
        }
        let now = self.config.clock.now_void_s();
        let Some(cutoff) = self.eviction_cutoff(now) else { return Vec::new() };
        let mut out = Vec::new();
        for pid in PartitionId::all() {
            for e in self.index.read(pid).iter() {
                if out.len() >= limit {
                    return out;
                }
                if !e.is_tombstone() && e.void_time != 0 && !is_expired(e.void_time, now) && e.void_time <= cutoff {
                    out.push((e.digest, crate::store::meta_of(&e)));
                }
            }
        }
        out
    }

    /// Drops tombstones whose record has no older live copy left on the devices or in memory;
    /// returns how many it dropped.
    pub(crate) fn raid_tombstones(&self) -> Result<u64> {
        let mut candidates: HashMap<Digest, Entry> = HashMap::new();
        for pid in PartitionId::all() {
            candidates.extend(self.index.read(pid).iter().filter(Entry::is_tombstone).map(|e| (e.digest, e)));
        }
        if candidates.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut needed = |digest: Digest, lut: u64, tombstone: bool| {
            // An older live copy keeps the tombstone; older tombstones resurrect nothing.
            if !tombstone && candidates.get(&digest).is_some_and(|t| lut < t.last_update_ms) {
                candidates.remove(&digest);
            }
        };
        for dev in &self.devices {
            // Blocks still in memory first (open, waiting, cached: possibly not on the device),
            // copied up to their fill mark only: appenders are writing past it.
            for w in [&dev.writer, &dev.defrag_writer] {
                for block in w.blocks_in_memory() {
                    let Some((bytes, seed, fill)) = w.copy_filled(block) else { continue };
                    let header = BlockHeader::for_scan(seed, 0, block, fill);
                    scan_block(&bytes, &header, |_, v| needed(v.digest(), v.meta().last_update_ms, v.is_tombstone()));
                }
            }
            let g = *dev.writer.geometry();
            let target = BlockSource { label: &dev.label, io: &dev.io, geometry: g, block_count: dev.blocks.len() };
            for (block, header) in read_block_headers(&target)? {
                let len = block_read_len(&header, g.block_bytes);
                let buf = wait_io(dev.io.read(g.block_offset(block), AlignedBuf::zeroed(len), len)).map_err(|e| {
                    crate::error::Error::io(format!("tomb raider reading block {block} of {}", dev.label), e)
                })?;
                scan_block(&buf.as_slice()[..len], &header, |_, v| {
                    needed(v.digest(), v.meta().last_update_ms, v.is_tombstone())
                });
                if self.maintenance_stop.sleep(self.config.pace_per_block(len)) {
                    return Ok(0);
                }
            }
        }
        let mut dropped = 0;
        for (digest, t) in candidates {
            let mut table = self.index.write(digest.partition());
            if table.get(&digest) != Some(t) {
                continue;
            }
            table.remove(&digest);
            drop(table);
            self.release(&t, Stream::Client, 0);
            self.counters.tombstones.fetch_sub(1, Ordering::Relaxed);
            dropped += 1;
        }
        self.counters.tombstones_dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::info!(namespace = %self.config.namespace, dropped, seconds = started.elapsed().as_secs_f64(), "tomb raider finished");
        Ok(dropped)
    }
}

/// The void time below which `step_tenths_pct` tenths of a percent of the sampled void times
/// lie. The sample alone decides: records vanish (or appear) between the counting pass and the
/// sampling pass, so it may be empty although records were counted (that once indexed past the
/// end of an empty sample and killed the maintenance thread).
fn choose_eviction_cutoff(mut sample: Vec<u32>, step_tenths_pct: u32) -> Option<u32> {
    if sample.is_empty() {
        return None;
    }
    sample.sort_unstable();
    let at = (sample.len() * step_tenths_pct as usize / 1000).min(sample.len() - 1);
    sample.get(at).copied()
}

/// The maintenance thread: expiry every `expiry_period_s`, eviction checks with it, the tomb
/// raider every `tomb_raider_period_s` or when tombstones pile up. Holds only a weak reference,
/// so it never keeps the engine alive.
pub(crate) fn run(engine: Weak<Store>, stop: Arc<StopSignal>) {
    let mut last_expiry = Instant::now();
    let mut last_raid = Instant::now();
    loop {
        if stop.sleep(TICK) {
            return;
        }
        let Some(e) = engine.upgrade() else { return };
        for d in &e.devices {
            // Async writers waiting for space re-check their deadlines at least every tick.
            d.blocks.wake_space_waiters();
        }
        let c = e.config.clone();
        let standalone = c.maintenance == MaintenanceMode::Standalone;
        if standalone && c.expiry_period_s > 0 && last_expiry.elapsed() >= Duration::from_secs(c.expiry_period_s) {
            let n = e.reap_expired();
            if n > 0 {
                tracing::debug!(namespace = %c.namespace, expired = n, "expired records removed");
            }
            e.evict_if_needed();
            last_expiry = Instant::now();
        }
        let tombstones = e.counters.tombstones.load(Ordering::Relaxed).max(0) as u64;
        let records = e.counters.records.load(Ordering::Relaxed).max(0) as u64;
        let piled_up = tombstones >= RAID_TOMBSTONES_MIN
            && tombstones * 100 > (tombstones + records) * u64::from(c.tomb_raider_tombstone_pct);
        let due = c.tomb_raider_period_s > 0 && last_raid.elapsed() >= Duration::from_secs(c.tomb_raider_period_s);
        if (due || piled_up) && tombstones > 0 {
            if let Err(err) = e.raid_tombstones() {
                tracing::warn!(namespace = %c.namespace, error = %err, "tomb raider failed");
            }
            last_raid = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::choose_eviction_cutoff;

    #[test]
    fn eviction_cutoff_of_an_emptied_sample_is_none() {
        assert_eq!(choose_eviction_cutoff(Vec::new(), 5), None);
        assert_eq!(choose_eviction_cutoff(vec![30, 10, 20], 5), Some(10));
        assert_eq!(choose_eviction_cutoff(vec![30, 10, 20], 1000), Some(30));
        let sample: Vec<u32> = (0..1000).rev().collect();
        assert_eq!(choose_eviction_cutoff(sample, 100), Some(100));
    }
}
