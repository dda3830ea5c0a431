//! Record operations on the engine: reads, writes with Aerospike's policies, deletes that leave
//! tombstones, touch, a general read-modify-write, applying a version decided elsewhere (for
//! replication and restore), and partition listing for scans.
//!
//! Writes are optimistic: read the current version without locks, decide the new version, then
//! under the partition's write lock check that the index entry is unchanged, append to the
//! device's write block and repoint the index. If the entry changed, decide again; after
//! `WRITE_ATTEMPTS_MAX` tries the write fails with "key busy". No lock is held across I/O.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use peregrine_index::{Digest, Entry, EntryFlags, PartitionId};

use crate::blocks::{Purpose, Stream, WritePos};
use crate::clock::is_expired;
use crate::completion::{Completion, block_on};
use crate::engine::{Engine, device_for};
use crate::error::{Error, Result};
use crate::format::record as codec;
use crate::policy::{BinSelection, GenerationPolicy, RecordExists, Ttl, WritePolicy};
use crate::record::{Bin, Record, RecordMeta, RecordVersion, StoredKey, next_generation};

/// How often a write re-decides because the record changed under it.
const WRITE_ATTEMPTS_MAX: usize = 16;
/// Longest TTL accepted (10 years, as Aerospike).
pub const TTL_SECONDS_MAX: u32 = 10 * 365 * 24 * 3600;

/// The current version of a record, as a write's decision function sees it.
#[derive(Debug, Clone, Copy)]
pub struct Existing<'a> {
    /// Generation, void time and last-update time.
    pub meta: RecordMeta,
    /// The full record, when the write asked for it.
    pub record: Option<&'a Record>,
}

/// What a write decides to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Store a new version with these contents (generation and last-update time are assigned).
    Put {
        /// Set name (empty = none).
        set_name: Vec<u8>,
        /// User key to store.
        key: Option<StoredKey>,
        /// All bins of the new version. An empty list deletes the record.
        bins: Vec<Bin>,
        /// Expiry, seconds since 2010-01-01 (0 = never).
        void_time: u32,
    },
    /// Delete the record (a tombstone is written).
    Delete,
    /// Leave the record as it is.
    Nothing,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new version was stored; its metadata.
    Written(RecordMeta),
    /// The record was deleted.
    Deleted,
    /// Nothing changed.
    Unchanged,
}

/// What the index entry must be for a commit to go ahead.
pub(crate) enum Expect {
    /// Whatever it is (replication, restore).
    Any,
    /// Exactly this (an optimistic write's snapshot).
    Exactly(Option<Entry>),
}

impl Engine {
    fn ensure_open(&self) -> Result<()> {
        if self.inner.is_closed() { Err(Error::Shutdown) } else { Ok(()) }
    }

    fn now_void(&self) -> u32 {
        self.inner.config.clock.now_void_s()
    }

    /// The live (not deleted, not expired) entry of `digest`.
    fn live_entry(&self, digest: &Digest) -> Option<Entry> {
        let e = self.inner.index.get(digest)?;
        (!e.is_tombstone() && !is_expired(e.void_time, self.now_void())).then_some(e)
    }

    /// Void time for a write with `ttl`, given the record's current void time.
    pub fn void_time_for(&self, ttl: Ttl, current: Option<u32>) -> Result<u32> {
        let now = self.now_void();
        let relative = |s: u32| -> Result<u32> {
            if s > TTL_SECONDS_MAX {
                return Err(Error::Parameter(format!("TTL {s} s exceeds the maximum of {TTL_SECONDS_MAX} s")));
            }
            Ok(if s == 0 { 0 } else { now.saturating_add(s) })
        };
        match ttl {
            Ttl::Never => Ok(0),
            Ttl::Seconds(s) => relative(s),
            Ttl::NamespaceDefault => relative(self.inner.config.default_ttl_s),
            Ttl::Keep => match current {
                Some(v) => Ok(v),
                None => relative(self.inner.config.default_ttl_s),
            },
        }
    }

    /// Metadata of a live record, from the index alone (no device read).
    pub fn exists(&self, digest: &Digest) -> Result<Option<RecordMeta>> {
        self.ensure_open()?;
        Ok(self.live_entry(digest).map(|e| meta_of(&e)))
    }

    /// Reads a record (blocking the calling thread for the device read).
    pub fn get(&self, digest: &Digest, bins: &BinSelection) -> Result<Record> {
        block_on(self.get_async(digest, bins))
    }

    /// Reads a record. Like every `*_async` method, it completes without suspending when the
    /// record is in memory: an async caller looping over it should yield now and then.
    pub async fn get_async(&self, digest: &Digest, bins: &BinSelection) -> Result<Record> {
        self.ensure_open()?;
        let entry = self.live_entry(digest).ok_or(Error::NotFound)?;
        self.read_entry_async(&entry, bins).await
    }

    /// Reads the version an index entry points at (as listed by [`Engine::partition_entries`]).
    /// With [`BinSelection::None`] no device read is made, and the set name and key are empty.
    pub async fn read_entry_async(&self, entry: &Entry, bins: &BinSelection) -> Result<Record> {
        if matches!(bins, BinSelection::None) {
            return Ok(Record {
                digest: entry.digest,
                set_name: self.inner.sets.name(entry.set_id),
                key: None,
                meta: meta_of(entry),
                bins: Vec::new(),
            });
        }
        let bytes = self.read_entry_bytes(entry).await?;
        let view = bytes.view();
        if view.is_tombstone() {
            return Err(Error::NotFound);
        }
        Ok(view.to_record(|name| bins.wants(name)))
    }

    /// Writes bins with a policy (blocking for durability when `commit_to_device` is set).
    pub fn put(
        &self,
        digest: &Digest,
        set_name: &[u8],
        key: Option<StoredKey>,
        bins: Vec<Bin>,
        policy: &WritePolicy,
    ) -> Result<RecordMeta> {
        block_on(self.put_async(digest, set_name, key, bins, policy))
    }

    /// Writes bins with a policy: create-only, update(-only) merging into the existing bins,
    /// (create-or-)replace, generation conditions and TTL.
    pub async fn put_async(
        &self,
        digest: &Digest,
        set_name: &[u8],
        key: Option<StoredKey>,
        bins: Vec<Bin>,
        policy: &WritePolicy,
    ) -> Result<RecordMeta> {
        let outcome = self
            .modify_async(digest, policy.exists.merges(), |existing| {
                check_generation(policy.generation, existing.as_ref())?;
                match (policy.exists, &existing) {
                    (RecordExists::CreateOnly, Some(_)) => return Err(Error::RecordExists),
                    (RecordExists::UpdateOnly | RecordExists::ReplaceOnly, None) => {
                        return Err(Error::NotFound);
                    }
                    _ => {}
                }
                let current = existing.as_ref().and_then(|e| e.record);
                let merged = match current {
                    Some(old) if policy.exists.merges() => merge_bins(&old.bins, &bins),
                    _ => bins.clone(),
                };
                let stored_key = key.clone().or_else(|| current.and_then(|r| r.key.clone()));
                let void_time = self.void_time_for(policy.ttl, existing.map(|e| e.meta.void_time))?;
                Ok(Change::Put { set_name: set_name.to_vec(), key: stored_key, bins: merged, void_time })
            })
            .await?;
        match outcome {
            Applied::Written(meta) => Ok(meta),
            // Writing no bins to a record that does not exist leaves nothing (as Aerospike).
            Applied::Deleted | Applied::Unchanged => Ok(RecordMeta { generation: 0, void_time: 0, last_update_ms: 0 }),
        }
    }

    /// Deletes a record, leaving a tombstone. Fails with not-found when there is none.
    pub fn delete(&self, digest: &Digest, generation: GenerationPolicy) -> Result<()> {
        block_on(self.delete_async(digest, generation))
    }

    /// Deletes a record, leaving a tombstone. Fails with not-found when there is none.
    pub async fn delete_async(&self, digest: &Digest, generation: GenerationPolicy) -> Result<()> {
        self.modify_async(digest, false, |existing| {
            let Some(e) = existing else {
                return Err(Error::NotFound);
            };
            check_generation(generation, Some(&e))?;
            Ok(Change::Delete)
        })
        .await
        .map(|_| ())
    }

    /// Rewrites a record with a new expiry and generation. Fails with not-found when missing.
    pub fn touch(&self, digest: &Digest, ttl: Ttl, generation: GenerationPolicy) -> Result<RecordMeta> {
        block_on(self.touch_async(digest, ttl, generation))
    }

    /// Rewrites a record with a new expiry and generation. Fails with not-found when missing.
    pub async fn touch_async(&self, digest: &Digest, ttl: Ttl, generation: GenerationPolicy) -> Result<RecordMeta> {
        let outcome = self
            .modify_async(digest, true, |existing| {
                let Some(e) = existing else {
                    return Err(Error::NotFound);
                };
                check_generation(generation, Some(&e))?;
                let Some(r) = e.record else {
                    return Err(Error::NotFound);
                };
                Ok(Change::Put {
                    set_name: r.set_name.clone(),
                    key: r.key.clone(),
                    bins: r.bins.clone(),
                    void_time: self.void_time_for(ttl, Some(e.meta.void_time))?,
                })
            })
            .await?;
        match outcome {
            Applied::Written(meta) => Ok(meta),
            _ => Err(Error::NotFound),
        }
    }

    /// General read-modify-write: `decide` sees the current version (with its bins when
    /// `read_existing` is set) and says what to store. It may run more than once if the record
    /// changes concurrently, so it must not have side effects beyond its return value.
    pub async fn modify_async<F>(&self, digest: &Digest, read_existing: bool, mut decide: F) -> Result<Applied>
    where
        F: FnMut(Option<Existing<'_>>) -> Result<Change>,
    {
        self.ensure_open()?;
        for attempt in 0..WRITE_ATTEMPTS_MAX {
            if attempt > 0 {
                self.inner.counters.write_retries.fetch_add(1, Ordering::Relaxed);
            }
            let raw = self.inner.index.get(digest);
            let live = raw.filter(|e| !e.is_tombstone() && !is_expired(e.void_time, self.now_void()));
            let record = match (&live, read_existing) {
                (Some(e), true) => match self.read_entry_async(e, &BinSelection::All).await {
                    Ok(r) => Some(r),
                    Err(Error::NotFound) => continue,
                    Err(e) => return Err(e),
                },
                _ => None,
            };
            let existing = live.map(|e| Existing { meta: meta_of(&e), record: record.as_ref() });
            let change = decide(existing)?;
            // Last-update times order a record's versions (recovery keeps the latest): strictly
            // above whatever the index holds, tombstones and expired versions included.
            let lut = self.inner.config.clock.now_unix_ms().max(raw.map_or(0, |e| e.last_update_ms + 1));
            let generation = live.map_or(1, |e| next_generation(e.generation));
            let meta = RecordMeta { generation, void_time: 0, last_update_ms: lut };
            let (version, applied) = match change {
                Change::Nothing => return Ok(Applied::Unchanged),
                Change::Put { bins, .. } if bins.is_empty() && live.is_none() => {
                    return Ok(Applied::Unchanged);
                }
                Change::Delete if live.is_none() => return Ok(Applied::Unchanged),
                Change::Put { set_name, bins, .. } if bins.is_empty() => {
                    (RecordVersion::Tombstone { digest: *digest, set_name, meta }, Applied::Deleted)
                }
                Change::Delete => {
                    let set_name = record
                        .as_ref()
                        .map(|r| r.set_name.clone())
                        .unwrap_or_else(|| live.map(|e| self.inner.sets.name(e.set_id)).unwrap_or_default());
                    (RecordVersion::Tombstone { digest: *digest, set_name, meta }, Applied::Deleted)
                }
                Change::Put { set_name, key, bins, void_time } => {
                    let meta = RecordMeta { void_time, ..meta };
                    let r = Record { digest: *digest, set_name, key, meta, bins };
                    (RecordVersion::Live(r), Applied::Written(meta))
                }
            };
            let durable = self.inner.config.commit_to_device;
            let purpose = if matches!(applied, Applied::Deleted) { Purpose::Delete } else { Purpose::Write };
            match self.commit(&version, Expect::Exactly(raw), durable, purpose)? {
                None => continue,
                Some(wait) => {
                    if let Some(c) = wait {
                        c.await.unwrap_or(Err(Error::Shutdown))?;
                    }
                    return Ok(applied);
                }
            }
        }
        Err(Error::KeyBusy)
    }

    /// Stores a version decided elsewhere (a replication log entry, a restore) exactly as given,
    /// replacing whatever the index holds.
    pub fn apply_version(&self, version: &RecordVersion) -> Result<()> {
        self.ensure_open()?;
        let durable = self.inner.config.commit_to_device;
        let purpose = if matches!(version, RecordVersion::Tombstone { .. }) { Purpose::Delete } else { Purpose::Write };
        if let Some(Some(c)) = self.commit(version, Expect::Any, durable, purpose)? {
            c.wait().unwrap_or(Err(Error::Shutdown))?;
        }
        Ok(())
    }

    /// Appends `version` and repoints the index, if the entry is still `expect`. Returns
    /// `None` on a conflict, else the durability wait when one was asked for.
    pub(crate) fn commit(
        &self,
        version: &RecordVersion,
        expect: Expect,
        durable: bool,
        purpose: Purpose,
    ) -> Result<Option<Option<Completion<Result<()>>>>> {
        let digest = *version.digest();
        let mut bytes = Vec::with_capacity(256);
        codec::encode(version, &mut bytes)?;
        let max = self.inner.config.effective_max_record_bytes();
        if bytes.len() > max {
            return Err(Error::RecordTooBig { size: bytes.len(), max });
        }
        let (set_name, tombstone, key_stored) = match version {
            RecordVersion::Live(r) => (&r.set_name, false, r.key.is_some()),
            RecordVersion::Tombstone { set_name, .. } => (set_name, true, false),
        };
        let set_id = self.inner.sets.id_for(set_name)?;
        let meta = *version.meta();
        let dev = &self.inner.devices[device_for(&digest, self.inner.devices.len())];
        let mut wait_deadline: Option<Instant> = None; // set by the first refusal only
        let (mut table, current, hint, appended) = loop {
            let table = self.inner.index.write(digest.partition());
            let (current, hint) = table.lookup(&digest);
            if let Expect::Exactly(expected) = expect
                && current != expected
            {
                return Ok(None);
            }
            match dev.writer.append(&mut bytes, durable, purpose) {
                Ok(appended) => break (table, current, hint, appended),
                // Out of free blocks while defrag reclaims dead space: wait for it (without
                // the partition lock, which defrag needs), then try again.
                Err(e @ Error::DeviceOverload(_)) => {
                    drop(table);
                    let now = Instant::now();
                    let deadline =
                        *wait_deadline.get_or_insert(now + Duration::from_millis(self.inner.config.defrag_wait_ms));
                    let blocks = dev.writer.blocks();
                    if now >= deadline
                        || blocks.can_allocate(purpose)
                        || !blocks.wait_for_space(purpose, deadline - now)
                    {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
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
        Ok(Some(appended.durable))
    }

    /// The old version at `old` died because of the write at `killer` in `stream`.
    pub(crate) fn release(&self, old: &Entry, stream: Stream, killer: WritePos) {
        if let Some(dev) = self.inner.devices.get(usize::from(old.location.device)) {
            let (block, _) = dev.writer.geometry().split(old.location.offset);
            dev.blocks.remove_live(block, u64::from(old.location.size), stream, killer);
        }
    }

    fn count_transition(&self, old: Option<&Entry>, new: &Entry) {
        let c = &self.inner.counters;
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

    /// Live records of partition `pid` with digest greater than `after`, in digest order, from
    /// the index alone. Read each with [`Engine::read_entry_async`]; one that was deleted
    /// meanwhile reads as not found.
    pub fn partition_entries(&self, pid: PartitionId, after: Option<&Digest>) -> Vec<Entry> {
        let now = self.now_void();
        let mut entries = self.inner.index.sorted_entries(pid, after);
        entries.retain(|e| !e.is_tombstone() && !is_expired(e.void_time, now));
        entries
    }

    /// Every version in partition `pid` (tombstones included), in digest order, for streaming a
    /// partition to a replica. Versions that changed meanwhile are skipped.
    pub async fn partition_versions_async(&self, pid: PartitionId) -> Result<Vec<RecordVersion>> {
        let mut out = Vec::new();
        for entry in self.inner.index.sorted_entries(pid, None) {
            match self.read_entry_bytes(&entry).await {
                Ok(bytes) => out.push(bytes.view().to_version()),
                Err(Error::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The id of a set name, if any record used it.
    pub fn set_id(&self, name: &[u8]) -> Option<u16> {
        self.inner.sets.lookup(name)
    }

    /// Every set name the namespace has seen, with its id.
    pub fn sets(&self) -> Vec<(u16, Vec<u8>)> {
        self.inner.sets.all()
    }
}

fn meta_of(e: &Entry) -> RecordMeta {
    RecordMeta { generation: e.generation, void_time: e.void_time, last_update_ms: e.last_update_ms }
}

fn check_generation(policy: GenerationPolicy, existing: Option<&Existing<'_>>) -> Result<()> {
    let Some(e) = existing else { return Ok(()) };
    let actual = e.meta.generation;
    match policy {
        GenerationPolicy::None => Ok(()),
        GenerationPolicy::Equal(required) if required == actual => Ok(()),
        GenerationPolicy::Greater(required) if required > actual => Ok(()),
        GenerationPolicy::Equal(required) | GenerationPolicy::Greater(required) => {
            Err(Error::Generation { required, actual })
        }
    }
}

/// The existing bins with the written ones replacing same-named bins or appended.
fn merge_bins(old: &[Bin], new: &[Bin]) -> Vec<Bin> {
    let mut out = old.to_vec();
    for b in new {
        match out.iter_mut().find(|o| o.name == b.name) {
            Some(slot) => slot.value = b.value.clone(),
            None => out.push(b.clone()),
        }
    }
    out
}
