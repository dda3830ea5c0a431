//! Namespace maintenance on one background thread: expiry (expired records leave the index and
//! release their space; where older copies may still be on the device a tombstone is written
//! first, so they cannot come back at cold start), eviction (records closest to expiry, never
//! records without TTL, in small steps while a high-water mark is exceeded), and the tomb raider
//! (drops tombstones once no older live copy of their record is left on the device or in
//! memory).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use peregrine_index::{Digest, Entry, EntryFlags, PartitionId};

use crate::blocks::{Purpose, Stream};
use crate::clock::is_expired;
use crate::defrag::StopSignal;
use crate::engine::{Engine, Inner};
use crate::error::Result;
use crate::format::block_header::BlockHeader;
use crate::io::{AlignedBuf, wait_io};
use crate::ops::Expect;
use crate::record::{RecordMeta, RecordVersion, next_generation};
use crate::recovery::{RecoveryTarget, block_read_len, read_block_headers, scan_block};

/// The maintenance thread wakes at least this often.
const TICK: Duration = Duration::from_secs(1);
/// Void times sampled to choose an eviction cutoff.
const EVICT_SAMPLE_MAX: usize = 1_000_000;
/// The tomb raider runs early only when there are at least this many tombstones.
const RAID_TOMBSTONES_MIN: u64 = 1000;

impl Engine {
    /// Removes every expired record from the index and releases its space; returns how many.
    pub fn reap_expired(&self) -> u64 {
        let now = self.inner.config.clock.now_void_s();
        let mut reaped = 0;
        for pid in PartitionId::all() {
            let expired: Vec<Entry> = self
                .inner
                .index
                .read(pid)
                .iter()
                .filter(|e| !e.is_tombstone() && is_expired(e.void_time, now))
                .collect();
            for e in expired {
                if self.remove_expired(&e).unwrap_or(false) {
                    reaped += 1;
                }
            }
        }
        self.inner.counters.expired.fetch_add(reaped, Ordering::Relaxed);
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
                last_update_ms: self.inner.config.clock.now_unix_ms().max(e.last_update_ms + 1),
            };
            let v = RecordVersion::Tombstone { digest: e.digest, set_name: self.inner.sets.name(e.set_id), meta };
            return Ok(self.commit(&v, Expect::Exactly(Some(*e)), false, Purpose::Delete)?.is_some());
        }
        let mut table = self.inner.index.write(e.digest.partition());
        if table.get(&e.digest) != Some(*e) {
            return Ok(false);
        }
        table.remove(&e.digest);
        drop(table);
        // The copy on the device is expired: recovery discards it, so its space is free at once.
        self.release(e, Stream::Client, 0);
        self.inner.counters.records.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// One eviction step if a high-water mark is exceeded; returns how many records it evicted.
    pub fn evict_if_needed(&self) -> u64 {
        let c = &self.inner.config;
        let stats = self.stats();
        let total: u64 = stats.devices.iter().map(|d| d.blocks_total * u64::from(d.block_bytes)).sum();
        let live: u64 = stats.devices.iter().map(|d| d.blocks.live_bytes).sum();
        let over_device = c.evict_used_pct > 0 && live * 100 > total * u64::from(c.evict_used_pct);
        let over_index = c.evict_index_bytes > 0 && stats.index_bytes > c.evict_index_bytes;
        if !over_device && !over_index {
            return 0;
        }
        let now = c.clock.now_void_s();
        let evictable = |e: &Entry| !e.is_tombstone() && e.void_time != 0 && !is_expired(e.void_time, now);
        let mut sample: Vec<u32> = Vec::new();
        let count: usize = PartitionId::all().map(|p| self.inner.index.read(p).iter().filter(evictable).count()).sum();
        if count == 0 {
            tracing::warn!(namespace = %c.namespace, "over an eviction high-water mark, but no record has a TTL to evict by");
            return 0;
        }
        let stride = count.div_ceil(EVICT_SAMPLE_MAX).max(1);
        let mut i = 0usize;
        for pid in PartitionId::all() {
            for e in self.inner.index.read(pid).iter().filter(evictable) {
                if i.is_multiple_of(stride) {
                    sample.push(e.void_time);
                }
                i += 1;
            }
        }
        sample.sort_unstable();
        let at = (sample.len() * c.evict_step_tenths_pct as usize / 1000).min(sample.len() - 1);
        let cutoff = sample[at];
        let mut evicted = 0;
        for pid in PartitionId::all() {
            let victims: Vec<Entry> =
                self.inner.index.read(pid).iter().filter(|e| evictable(e) && e.void_time <= cutoff).collect();
            for e in victims {
                if self.remove_expired(&e).unwrap_or(false) {
                    evicted += 1;
                }
            }
        }
        self.inner.counters.evicted.fetch_add(evicted, Ordering::Relaxed);
        tracing::info!(namespace = %c.namespace, evicted, cutoff_void_time = cutoff, over_device, over_index, "evicted records closest to expiry");
        evicted
    }

    /// Drops tombstones whose record has no older live copy left on the devices or in memory;
    /// returns how many it dropped.
    pub fn raid_tombstones(&self) -> Result<u64> {
        let mut candidates: HashMap<Digest, Entry> = HashMap::new();
        for pid in PartitionId::all() {
            candidates.extend(self.inner.index.read(pid).iter().filter(Entry::is_tombstone).map(|e| (e.digest, e)));
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
        for dev in &self.inner.devices {
            // Blocks still in memory first (open, waiting, cached: possibly not on the device).
            let in_memory: Vec<_> = dev.mem.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
            for m in in_memory {
                let mut bytes = vec![0u8; m.buf.len()];
                m.buf.read_at(0, &mut bytes);
                if let Some(h) = BlockHeader::decode(&bytes) {
                    scan_block(&bytes, &h, |_, v| needed(v.digest(), v.meta().last_update_ms, v.is_tombstone()));
                }
            }
            let g = *dev.writer.geometry();
            let target = RecoveryTarget {
                label: &dev.label,
                io: &dev.io,
                geometry: g,
                block_count: dev.blocks.len(),
                device_count: self.inner.devices.len(),
                blocks: &dev.blocks,
            };
            for (block, header) in read_block_headers(&target)? {
                let len = block_read_len(&header, g.block_bytes);
                let buf = wait_io(dev.io.read(g.block_offset(block), AlignedBuf::zeroed(len), len)).map_err(|e| {
                    crate::error::Error::io(format!("tomb raider reading block {block} of {}", dev.label), e)
                })?;
                scan_block(&buf.as_slice()[..len], &header, |_, v| {
                    needed(v.digest(), v.meta().last_update_ms, v.is_tombstone())
                });
                if self.inner.maintenance_stop.sleep(self.inner.config.pace_per_block(len)) {
                    return Ok(0);
                }
            }
        }
        let mut dropped = 0;
        for (digest, t) in candidates {
            let mut table = self.inner.index.write(digest.partition());
            if table.get(&digest) != Some(t) {
                continue;
            }
            table.remove(&digest);
            drop(table);
            self.release(&t, Stream::Client, 0);
            self.inner.counters.tombstones.fetch_sub(1, Ordering::Relaxed);
            dropped += 1;
        }
        self.inner.counters.tombstones_dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::info!(namespace = %self.inner.config.namespace, dropped, seconds = started.elapsed().as_secs_f64(), "tomb raider finished");
        Ok(dropped)
    }
}

/// The maintenance thread: expiry every `expiry_period_s`, eviction checks with it, the tomb
/// raider every `tomb_raider_period_s` or when tombstones pile up. Holds only a weak reference,
/// so it never keeps the engine alive.
pub(crate) fn run(engine: Weak<Inner>, stop: Arc<StopSignal>) {
    let mut last_expiry = Instant::now();
    let mut last_raid = Instant::now();
    loop {
        if stop.sleep(TICK) {
            return;
        }
        let Some(inner) = engine.upgrade() else { return };
        let e = Engine { inner };
        let c = e.inner.config.clone();
        if c.expiry_period_s > 0 && last_expiry.elapsed() >= Duration::from_secs(c.expiry_period_s) {
            let n = e.reap_expired();
            if n > 0 {
                tracing::debug!(namespace = %c.namespace, expired = n, "expired records removed");
            }
            e.evict_if_needed();
            last_expiry = Instant::now();
        }
        let tombstones = e.inner.counters.tombstones.load(Ordering::Relaxed).max(0) as u64;
        let records = e.inner.counters.records.load(Ordering::Relaxed).max(0) as u64;
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
