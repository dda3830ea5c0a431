//! The store: what one namespace's storage is made of once it is open — the index, the set
//! registry, the devices with their writers and block tables, the metadata, the counters — and
//! the one commit path every write goes through (append the version, repoint the index under
//! the partition lock if the entry is as expected, release the old copy's space). Record
//! operations, maintenance and snapshots work on a `&Store`; opening and closing live in
//! `engine.rs`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peregrine_index::{Entry, EntryFlags, Index};

use crate::blocks::{BlockTable, Purpose, Stream, WritePos};
use crate::clock::is_expired;
use crate::completion::Completion;
use crate::config::EngineConfig;
use crate::defrag::{DefragCounters, StopSignal};
use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::format::device_header::DeviceHeader;
use crate::format::record as codec;
use crate::geometry::device_for;
use crate::io::DeviceIo;
use crate::metadata::Metadata;
use crate::poison::Poison;
use crate::record::{RecordMeta, RecordVersion};
use crate::recovery::DeviceRecovery;
use crate::sets::SetRegistry;
use crate::writer::{ReadActivity, Writer};

/// One device of the namespace.
pub(crate) struct Device {
    pub(crate) label: String,
    pub(crate) kind: DeviceKind,
    pub(crate) io: Arc<dyn DeviceIo>,
    /// Client and replicated writes.
    pub(crate) writer: Arc<Writer>,
    /// Defrag moves (never mixed with client writes).
    pub(crate) defrag_writer: Arc<Writer>,
    pub(crate) blocks: Arc<BlockTable>,
    pub(crate) reads: Arc<ReadActivity>,
    pub(crate) defrag: Arc<DefragCounters>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) header: Mutex<(DeviceHeader, usize)>,
    /// A descriptor of the device whose lock is released at close.
    pub(crate) control: std::fs::File,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) device_reads: AtomicU64,
    pub(crate) device_read_bytes: AtomicU64,
    pub(crate) memory_reads: AtomicU64,
    pub(crate) record_reads_from_device: AtomicU64,
    pub(crate) corruption_errors: AtomicU64,
    pub(crate) read_retries: AtomicU64,
    pub(crate) write_retries: AtomicU64,
    pub(crate) records: AtomicI64,
    pub(crate) tombstones: AtomicI64,
    pub(crate) expired: AtomicU64,
    pub(crate) evicted: AtomicU64,
    pub(crate) tombstones_dropped: AtomicU64,
    pub(crate) replica_applied: AtomicU64,
    pub(crate) replica_stale: AtomicU64,
    pub(crate) replica_refused_full: AtomicU64,
    pub(crate) truncated: AtomicU64,
}

/// One namespace's open storage.
pub(crate) struct Store {
    pub(crate) config: EngineConfig,
    pub(crate) index: Arc<Index>,
    pub(crate) sets: SetRegistry,
    pub(crate) devices: Vec<Device>,
    pub(crate) counters: Counters,
    pub(crate) metadata: Arc<Metadata>,
    pub(crate) poison: Arc<Poison>,
    pub(crate) recovery: Vec<DeviceRecovery>,
    pub(crate) closed: AtomicBool,
    /// Set once a replicated version was refused for want of space (see
    /// [`crate::Engine::replica_full`]).
    pub(crate) replica_full: AtomicBool,
    /// Stops the defragmenters and the maintenance thread.
    pub(crate) maintenance_stop: Arc<StopSignal>,
    pub(crate) maintenance: Mutex<Option<JoinHandle<()>>>,
}

/// What the index entry must be for a commit to go ahead.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Expect {
    /// Exactly this (an optimistic write's snapshot, or a maintenance decision).
    Exactly(Option<Entry>),
    /// Anything older than the version: the version's last-update time must be above the
    /// indexed one (replicated versions; a restore).
    Older,
}

/// What one commit attempt did.
#[derive(Debug)]
pub(crate) enum Commit {
    /// Appended and indexed; the durability wait when one was asked for.
    Done(Option<Completion<Result<()>>>),
    /// The entry was not as expected (`Expect::Exactly`); nothing written.
    Conflict,
    /// The indexed version is as new or newer (`Expect::Older`); nothing written.
    Stale,
    /// A truncation covers the version (its last-update time is at or before the cutoff).
    Truncated,
    /// No free block now, but defrag is reclaiming space: await this, then try again.
    NeedSpace(Completion<()>),
}

impl Store {
    /// Fails when the engine is closed or poisoned.
    pub(crate) fn ensure_open(&self) -> Result<()> {
        if let Some(reason) = self.poison.reason() {
            return Err(Error::Poisoned(reason.to_string()));
        }
        if self.closed.load(Ordering::SeqCst) { Err(Error::Shutdown) } else { Ok(()) }
    }

    pub(crate) fn now_void(&self) -> u32 {
        self.config.clock.now_void_s()
    }

    /// Whether an indexed entry reads as a record: not a tombstone, not expired, not truncated.
    pub(crate) fn is_live(&self, e: &Entry, now_void: u32) -> bool {
        !e.is_tombstone() && !is_expired(e.void_time, now_void) && !self.is_truncated(e)
    }

    /// Whether a truncation covers the entry (it is swept from the index soon after).
    pub(crate) fn is_truncated(&self, e: &Entry) -> bool {
        e.last_update_ms <= self.metadata.cutoff_ms(e.set_id)
    }

    /// The live entry of `digest`.
    pub(crate) fn live_entry(&self, digest: &peregrine_index::Digest) -> Option<Entry> {
        let e = self.index.get(digest)?;
        self.is_live(&e, self.now_void()).then_some(e)
    }

    /// One attempt to append `version` and repoint the index if the entry is as `expect`ed.
    /// `bytes` holds the version's encoding (see [`Store::encode`]); its partition epoch is
    /// stamped here, under the partition lock truncation also takes.
    pub(crate) fn commit_once(
        &self,
        version: &RecordVersion,
        bytes: &mut [u8],
        set_id: u16,
        expect: Expect,
        durable: bool,
        purpose: Purpose,
    ) -> Result<Commit> {
        let digest = *version.digest();
        let meta = *version.meta();
        let tombstone = matches!(version, RecordVersion::Tombstone { .. });
        let key_stored = matches!(version, RecordVersion::Live(r) if r.key.is_some());
        let pid = digest.partition();
        let dev = &self.devices[device_for(&digest, self.devices.len())];
        let mut table = self.index.write(pid);
        let (current, hint) = table.lookup(&digest);
        match expect {
            Expect::Exactly(expected) if current != expected => return Ok(Commit::Conflict),
            Expect::Older if current.is_some_and(|c| c.last_update_ms >= meta.last_update_ms) => {
                return Ok(Commit::Stale);
            }
            _ => {}
        }
        if meta.last_update_ms <= self.metadata.cutoff_ms(set_id) {
            return Ok(Commit::Truncated);
        }
        codec::stamp_epoch(bytes, self.metadata.epoch(pid));
        let appended = match dev.writer.append(bytes, durable, purpose) {
            Ok(a) => a,
            // Out of free blocks while defrag reclaims dead space (not a full write queue,
            // which fails fast): wait for a block outside the partition lock.
            Err(e @ Error::DeviceOverload(_))
                if !dev.blocks.can_allocate(purpose) && dev.blocks.space_is_reclaimable() =>
            {
                drop(table);
                tracing::trace!(error = %e, "waiting for defrag to free a block");
                return Ok(Commit::NeedSpace(dev.blocks.space_wait(purpose)));
            }
            Err(e) => return Err(e),
        };
        let entry = Entry {
            digest,
            set_id,
            location: appended.location,
            generation: meta.generation,
            void_time: meta.void_time,
            last_update_ms: meta.last_update_ms,
            flags: EntryFlags::empty()
                .with(EntryFlags::TOMBSTONE, tombstone)
                .with(EntryFlags::KEY_STORED, key_stored)
                .with(EntryFlags::OLDER_COPIES, current.is_some()),
        };
        table.insert_hinted(entry, hint);
        if let Some(old) = &current {
            self.release(old, Stream::Client, appended.pos);
        }
        drop(table);
        self.count_transition(current.as_ref(), &entry);
        Ok(Commit::Done(appended.durable))
    }

    /// Encodes `version` (validated, size-checked) and finds its set id, before any lock.
    pub(crate) fn encode(&self, version: &RecordVersion) -> Result<(Vec<u8>, u16)> {
        let mut bytes = Vec::with_capacity(256);
        codec::encode(version, &mut bytes)?;
        let max = self.config.effective_max_record_bytes();
        if bytes.len() > max {
            return Err(Error::RecordTooBig { size: bytes.len(), max });
        }
        let set_name = match version {
            RecordVersion::Live(r) => &r.set_name,
            RecordVersion::Tombstone { set_name, .. } => set_name,
        };
        let (set_id, new) = self.sets.id_for_noting(set_name)?;
        if new {
            self.metadata.note_set_id(set_id, set_name);
        }
        Ok((bytes, set_id))
    }

    /// Commits `version`, waiting (without parking a thread) up to `defrag_wait_ms` for space
    /// defrag is reclaiming. Conflicts, stale and truncated versions are returned, not retried.
    pub(crate) async fn commit(
        &self,
        version: &RecordVersion,
        expect: Expect,
        durable: bool,
        purpose: Purpose,
    ) -> Result<Commit> {
        let (mut bytes, set_id) = self.encode(version)?;
        let mut deadline: Option<Instant> = None; // set by the first refusal only
        loop {
            match self.commit_once(version, &mut bytes, set_id, expect, durable, purpose)? {
                Commit::NeedSpace(wait) => {
                    let now = Instant::now();
                    let until = *deadline.get_or_insert(now + Duration::from_millis(self.config.defrag_wait_ms));
                    if now >= until {
                        let dev = &self.devices[device_for(version.digest(), self.devices.len())];
                        return Err(Error::DeviceOverload(format!(
                            "{}: {} of {} write blocks free and defrag is still reclaiming dead space; retry",
                            dev.label,
                            dev.blocks.free_count(),
                            dev.blocks.len()
                        )));
                    }
                    let _ = wait.await;
                }
                other => return Ok(other),
            }
        }
    }

    /// The old version at `old` died because of the write at `killer` in `stream`.
    pub(crate) fn release(&self, old: &Entry, stream: Stream, killer: WritePos) {
        if let Some(dev) = self.devices.get(usize::from(old.location.device)) {
            let (block, _) = dev.writer.geometry().split(old.location.offset);
            dev.blocks.remove_live(block, u64::from(old.location.size), stream, killer);
        }
    }

    pub(crate) fn count_transition(&self, old: Option<&Entry>, new: &Entry) {
        let c = &self.counters;
        match old {
            Some(o) if o.is_tombstone() => c.tombstones.fetch_sub(1, Ordering::Relaxed),
            Some(_) => c.records.fetch_sub(1, Ordering::Relaxed),
            None => 0,
        };
        if new.is_tombstone() {
            c.tombstones.fetch_add(1, Ordering::Relaxed);
        } else {
            c.records.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An entry left the index without a successor.
    pub(crate) fn count_removal(&self, old: &Entry) {
        let c = &self.counters;
        if old.is_tombstone() {
            c.tombstones.fetch_sub(1, Ordering::Relaxed);
        } else {
            c.records.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Completions that settle once everything appended so far, on every device and stream,
    /// is on the device and synced.
    pub(crate) fn barrier_waits(&self) -> Vec<Completion<Result<()>>> {
        self.devices.iter().flat_map(|d| [d.writer.flush(), d.defrag_writer.flush()]).collect()
    }
}

/// The metadata an index entry carries.
pub(crate) fn meta_of(e: &Entry) -> RecordMeta {
    RecordMeta { generation: e.generation, void_time: e.void_time, last_update_ms: e.last_update_ms }
}
