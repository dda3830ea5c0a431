//! Writes in two steps, so a replication layer can put the decision in its log:
//!
//! - **prepare** reads the current version, runs the caller's decision (policies, generation
//!   checks, merges) and returns the version it would write — generation, void time and
//!   last-update time all fixed — with the index entry it expects to replace;
//! - **apply** commits a prepared version if the index still holds what it expected.
//!
//! [`Engine::modify_async`] is prepare + apply, retried when the record changed meanwhile. A
//! replica applies versions decided elsewhere with [`Engine::apply_versions_async`]: monotonic
//! (a version not newer than the indexed one is skipped as stale, so replaying a log changes
//! nothing), validated before any byte is appended, async, with durability chosen per call, and
//! allowed into the space below stop-writes a peer may already have used.

use std::sync::atomic::Ordering;

use peregrine_index::{Digest, Entry};

use crate::blocks::Purpose;
use crate::completion::Completion;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::ops::{Applied, Change, Existing};
use crate::policy::BinSelection;
use crate::record::{Record, RecordMeta, RecordVersion, next_generation};
use crate::store::meta_of;
use crate::store::{Commit, Expect};

/// How often a write re-decides because the record changed under it.
const WRITE_ATTEMPTS_MAX: usize = 16;

/// What a prepare step sees of the record: its live version (if any) and the newest
/// last-update time of whatever is indexed for it (tombstones and expired versions included).
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    /// The live version, with its bins when they were read.
    pub live: Option<Existing<'a>>,
    /// Set name of the live version (a delete's tombstone keeps it).
    pub set_name: &'a [u8],
    /// Last-update time of the indexed version, live or not (0 when there is none).
    pub newest_lut_ms: u64,
}

/// A decided version, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The version to store, or `None` when the decision changes nothing.
    pub version: Option<RecordVersion>,
    /// What applying it reports.
    pub applied: Applied,
    /// The index entry the decision was made against; applying locally requires it unchanged.
    pub expected: Option<Entry>,
}

/// What the read half of a prepare saw ([`Engine::read_current_async`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentRead {
    /// The record's index entry (live, tombstone or expired), if any.
    pub entry: Option<Entry>,
    /// The live version's bins, when they were asked for.
    pub record: Option<Record>,
}

/// Whether an apply waits for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Return once the version is in the write buffer and indexed (durable within
    /// `flush_interval_ms`, or at the next [`Engine::barrier`]).
    Buffered,
    /// Return once the version is on the device and synced.
    Device,
}

/// What a replica apply did with one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Stored and indexed.
    Applied,
    /// Skipped: the index holds this version or a newer one (a replayed entry).
    Stale,
    /// Skipped: a truncation covers it (its last-update time is at or before the cutoff).
    Truncated,
}

impl Engine {
    /// Decides the version a write would store given `current` and the caller's `change`,
    /// without I/O. The last-update time is above the record's indexed one, above any
    /// truncation cutoff of its set, at least `lut_floor_ms`, and otherwise the clock's.
    pub fn decide(
        &self,
        digest: &Digest,
        current: &Current<'_>,
        change: Change,
        lut_floor_ms: u64,
    ) -> Result<(Option<RecordVersion>, Applied)> {
        let live = current.live;
        let lut = self.inner.config.clock.now_unix_ms().max(current.newest_lut_ms + 1).max(lut_floor_ms);
        let generation = live.map_or(1, |e| next_generation(e.meta.generation));
        let meta = RecordMeta { generation, void_time: 0, last_update_ms: lut };
        Ok(match change {
            Change::Nothing => (None, Applied::Unchanged),
            Change::Put { bins, .. } if bins.is_empty() && live.is_none() => (None, Applied::Unchanged),
            Change::Delete if live.is_none() => (None, Applied::Unchanged),
            Change::Put { set_name, bins, .. } if bins.is_empty() => {
                (Some(RecordVersion::Tombstone { digest: *digest, set_name, meta }), Applied::Deleted)
            }
            Change::Delete => {
                let set_name = current.set_name.to_vec();
                (Some(RecordVersion::Tombstone { digest: *digest, set_name, meta }), Applied::Deleted)
            }
            Change::Put { set_name, key, bins, void_time } => {
                let meta = RecordMeta { void_time, ..meta };
                let r = Record { digest: *digest, set_name, key, meta, bins };
                (Some(RecordVersion::Live(r)), Applied::Written(meta))
            }
        })
    }

    /// Checks that this engine can store `version` (its encoding within the record size limit,
    /// a valid set name with a set id available): a replication leader checks every version
    /// it decided before proposing it, so no replica's apply refuses it. Costs one encoding.
    pub fn check_storable(&self, version: &RecordVersion) -> Result<()> {
        self.inner.encode(version).map(drop)
    }

    /// Prepare step: reads the record (its bins when `read_existing`), lets `decide` say what
    /// to store, and returns the decided version with the index entry it was decided against.
    /// `lut_floor_ms` is the lowest last-update time the version may get (a leader passes its
    /// partition's highest, so versions rise in log order whatever its clock says).
    pub async fn prepare_async<F>(
        &self,
        digest: &Digest,
        read_existing: bool,
        lut_floor_ms: u64,
        mut decide: F,
    ) -> Result<Prepared>
    where
        F: FnMut(Option<Existing<'_>>) -> Result<Change>,
    {
        let read = self.read_current_async(digest, read_existing).await?;
        self.prepare_over(digest, &read, lut_floor_ms, &mut decide)
    }

    /// The read half of a prepare: the record's index entry and, when `read_existing` and the
    /// record is live, its bins. A leader reads here without holding its partition's state,
    /// then decides with [`Engine::prepare_over`] under it, after checking that
    /// [`Engine::index`] still holds `read.entry`.
    pub async fn read_current_async(&self, digest: &Digest, read_existing: bool) -> Result<CurrentRead> {
        self.inner.ensure_open()?;
        for _ in 0..WRITE_ATTEMPTS_MAX {
            let raw = self.inner.index.get(digest);
            let now = self.inner.now_void();
            let live = raw.filter(|e| self.inner.is_live(e, now));
            let record = match (&live, read_existing) {
                (Some(e), true) => match self.read_entry_async(e, &BinSelection::All).await {
                    Ok(r) => Some(r),
                    Err(Error::NotFound) => continue, // changed under the read: look again
                    Err(e) => return Err(e),
                },
                _ => None,
            };
            return Ok(CurrentRead { entry: raw, record });
        }
        Err(Error::KeyBusy)
    }

    /// The decision half of a prepare, without I/O: what `decide` makes of the record as
    /// `read` saw it. The version's last-update time is above the indexed one and the set's
    /// truncation cutoff, and at least `lut_floor_ms`.
    pub fn prepare_over<F>(&self, digest: &Digest, read: &CurrentRead, lut_floor_ms: u64, decide: F) -> Result<Prepared>
    where
        F: FnOnce(Option<Existing<'_>>) -> Result<Change>,
    {
        let raw = read.entry;
        let now = self.inner.now_void();
        let live = raw.filter(|e| self.inner.is_live(e, now));
        let record = live.and(read.record.as_ref());
        let existing = live.map(|e| Existing { meta: meta_of(&e), record });
        let change = decide(existing)?;
        // Only a delete needs the live version's set name (its tombstone keeps it).
        let set_name = match (&change, record, &live) {
            (Change::Delete, Some(r), _) => r.set_name.clone(),
            (Change::Delete, None, Some(e)) => self.inner.sets.name(e.set_id),
            _ => Vec::new(),
        };
        let current = Current {
            live: existing,
            set_name: &set_name,
            newest_lut_ms: raw.map_or(0, |e| e.last_update_ms.max(self.inner.metadata.cutoff_ms(e.set_id))),
        };
        let floor = lut_floor_ms.max(self.truncation_floor(&change));
        let (version, applied) = self.decide(digest, &current, change, floor)?;
        Ok(Prepared { version, applied, expected: raw })
    }

    /// Name of the set with id `set_id` (empty when unknown).
    pub fn set_name_of(&self, set_id: u16) -> Vec<u8> {
        self.inner.sets.name(set_id)
    }

    /// A new version of a set must be newer than the set's truncation cutoff.
    fn truncation_floor(&self, change: &Change) -> u64 {
        let meta = &self.inner.metadata;
        let set = match change {
            Change::Put { set_name, .. } if meta.any_set_cutoff() => self.inner.sets.lookup(set_name),
            _ => None,
        };
        match set {
            Some(id) => meta.cutoff_ms(id),
            None => meta.namespace_cutoff_ms(),
        }
        .saturating_add(1)
    }

    /// Apply step for a locally prepared version: commits it if the index entry is still the
    /// one it was decided against. `Ok(None)` means the record changed: prepare again.
    pub async fn apply_prepared_async(&self, prepared: &Prepared, durability: Durability) -> Result<Option<Applied>> {
        self.inner.ensure_open()?;
        let Some(version) = &prepared.version else {
            return Ok(Some(prepared.applied));
        };
        let purpose = purpose_of(version, Purpose::Write);
        let durable = durability == Durability::Device;
        match self.inner.commit(version, Expect::Exactly(prepared.expected), durable, purpose).await? {
            Commit::Done(wait) => {
                await_durable(wait).await?;
                Ok(Some(prepared.applied))
            }
            Commit::Conflict | Commit::Truncated => Ok(None),
            Commit::Stale | Commit::NeedSpace(_) => Err(Error::KeyBusy),
        }
    }

    /// General read-modify-write: `decide` sees the current version (with its bins when
    /// `read_existing` is set) and says what to store. It may run more than once if the record
    /// changes concurrently, so it must not have side effects beyond its return value.
    /// Durable before returning when the namespace has `commit_to_device`.
    pub async fn modify_async<F>(&self, digest: &Digest, read_existing: bool, mut decide: F) -> Result<Applied>
    where
        F: FnMut(Option<Existing<'_>>) -> Result<Change>,
    {
        let durability = if self.inner.config.commit_to_device { Durability::Device } else { Durability::Buffered };
        for attempt in 0..WRITE_ATTEMPTS_MAX {
            if attempt > 0 {
                self.inner.counters.write_retries.fetch_add(1, Ordering::Relaxed);
            }
            let prepared = self.prepare_async(digest, read_existing, 0, &mut decide).await?;
            if let Some(applied) = self.apply_prepared_async(&prepared, durability).await? {
                return Ok(applied);
            }
        }
        Err(Error::KeyBusy)
    }

    /// Replica apply: stores versions decided elsewhere (replication log entries, a snapshot, a
    /// restore), each exactly as given, in order. A version whose last-update time is not above
    /// the indexed one is skipped as [`ApplyOutcome::Stale`]; one a truncation covers as
    /// [`ApplyOutcome::Truncated`]. Every version is validated (encoded) before any is appended:
    /// an invalid one fails the call and nothing of it is written.
    ///
    /// Space: replicated versions may use the free blocks below stop-writes (a peer may have
    /// taken the entry already). When even those are gone and defrag cannot free more within
    /// `defrag_wait_ms`, the call fails with "device full", the refusal is counted, and
    /// [`Engine::replica_full`] turns true: the replica must stop voting (its log and its state
    /// would otherwise diverge from its peers'), never skip the entry silently.
    pub async fn apply_versions_async(
        &self,
        versions: &[RecordVersion],
        durability: Durability,
    ) -> Result<Vec<ApplyOutcome>> {
        self.inner.ensure_open()?;
        let encoded: Vec<(Vec<u8>, u16)> = versions.iter().map(|v| self.inner.encode(v)).collect::<Result<_>>()?;
        let durable = durability == Durability::Device;
        let mut waits = Vec::new();
        let mut outcomes = Vec::with_capacity(versions.len());
        for (version, (mut bytes, set_id)) in versions.iter().zip(encoded) {
            let purpose = purpose_of(version, Purpose::Replica);
            let outcome = loop {
                let attempt = self.inner.commit_once(version, &mut bytes, set_id, Expect::Older, durable, purpose);
                match attempt {
                    Ok(Commit::Done(wait)) => {
                        waits.extend(wait);
                        break ApplyOutcome::Applied;
                    }
                    Ok(Commit::Stale | Commit::Conflict) => break ApplyOutcome::Stale,
                    Ok(Commit::Truncated) => break ApplyOutcome::Truncated,
                    Ok(Commit::NeedSpace(_)) => {
                        // Wait for defrag as an ordinary write would, through the common path.
                        match self.inner.commit(version, Expect::Older, durable, purpose).await {
                            Ok(Commit::Done(wait)) => {
                                waits.extend(wait);
                                break ApplyOutcome::Applied;
                            }
                            Ok(Commit::Stale | Commit::Conflict) => break ApplyOutcome::Stale,
                            Ok(Commit::Truncated) => break ApplyOutcome::Truncated,
                            Ok(Commit::NeedSpace(_)) => continue,
                            Err(e) => return Err(self.replica_refused(e)),
                        }
                    }
                    Err(e) => return Err(self.replica_refused(e)),
                }
            };
            let counter = match outcome {
                ApplyOutcome::Applied => &self.inner.counters.replica_applied,
                ApplyOutcome::Stale | ApplyOutcome::Truncated => &self.inner.counters.replica_stale,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            outcomes.push(outcome);
        }
        for w in waits {
            await_durable(Some(w)).await?;
        }
        Ok(outcomes)
    }

    fn replica_refused(&self, e: Error) -> Error {
        if matches!(e, Error::DeviceFull(_) | Error::DeviceOverload(_)) {
            self.inner.counters.replica_refused_full.fetch_add(1, Ordering::Relaxed);
            if !self.inner.replica_full.swap(true, Ordering::SeqCst) {
                tracing::error!(namespace = %self.inner.config.namespace, error = %e,
                    "a replicated version was refused for want of space: this replica must stop voting");
            }
            return Error::DeviceFull(format!("replicated version refused: {e}"));
        }
        e
    }

    /// Whether a replicated version was refused for want of space since the engine opened: the
    /// replica's state lags its log, so it must not vote until space is freed and it catches up.
    pub fn replica_full(&self) -> bool {
        self.inner.replica_full.load(Ordering::SeqCst)
    }

    /// Whether a client write would be refused with "device full" on some device now (a
    /// leader checks this before putting a write in its log).
    pub fn stop_writes(&self) -> bool {
        self.inner.devices.iter().any(|d| !d.blocks.can_allocate(Purpose::Write) && !d.blocks.space_is_reclaimable())
    }

    /// Stores a version decided elsewhere (a restore), replacing an older indexed version;
    /// blocks the calling thread. Stale versions are skipped.
    pub fn apply_version(&self, version: &RecordVersion) -> Result<ApplyOutcome> {
        let durability = if self.inner.config.commit_to_device { Durability::Device } else { Durability::Buffered };
        let out = crate::completion::block_on(self.apply_versions_async(std::slice::from_ref(version), durability))?;
        Ok(out.first().copied().unwrap_or(ApplyOutcome::Stale))
    }

    /// Durability barrier: completes once everything appended before the call, on every device
    /// of the namespace (client, replicated and defrag streams), is on the device and synced.
    pub async fn barrier(&self) -> Result<()> {
        self.inner.ensure_open()?;
        for w in self.inner.barrier_waits() {
            w.await.unwrap_or(Err(Error::Shutdown))?;
        }
        Ok(())
    }
}

fn purpose_of(version: &RecordVersion, live: Purpose) -> Purpose {
    if matches!(version, RecordVersion::Tombstone { .. }) { Purpose::Delete } else { live }
}

async fn await_durable(wait: Option<Completion<Result<()>>>) -> Result<()> {
    match wait {
        Some(c) => c.await.unwrap_or(Err(Error::Shutdown)),
        None => Ok(()),
    }
}
