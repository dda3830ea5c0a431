//! Record operations with Aerospike's semantics: reads, writes with Aerospike's policies,
//! deletes that leave tombstones, touch, and partition listing for scans. Writes go through
//! `write.rs` (prepare, then apply): optimistic, no lock held across I/O, re-decided when the
//! record changed meanwhile.

use peregrine_index::{Digest, Entry, PartitionId};

use crate::completion::block_on;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::policy::{BinSelection, GenerationPolicy, RecordExists, Ttl, WritePolicy};
use crate::record::{Bin, Record, RecordMeta, StoredKey};
use crate::store::meta_of;
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

impl Engine {
    /// Void time for a write with `ttl`, given the record's current void time.
    pub fn void_time_for(&self, ttl: Ttl, current: Option<u32>) -> Result<u32> {
        let now = self.inner.now_void();
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
        self.inner.ensure_open()?;
        Ok(self.inner.live_entry(digest).map(|e| meta_of(&e)))
    }

    /// Reads a record (blocking the calling thread for the device read).
    pub fn get(&self, digest: &Digest, bins: &BinSelection) -> Result<Record> {
        block_on(self.get_async(digest, bins))
    }

    /// Reads a record. Like every `*_async` method, it completes without suspending when the
    /// record is in memory: an async caller looping over it should yield now and then.
    pub async fn get_async(&self, digest: &Digest, bins: &BinSelection) -> Result<Record> {
        self.inner.ensure_open()?;
        let entry = self.inner.live_entry(digest).ok_or(Error::NotFound)?;
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

    /// Live records of partition `pid` with digest greater than `after`, in digest order, from
    /// the index alone. Read each with [`Engine::read_entry_async`]; one that was deleted
    /// meanwhile reads as not found.
    pub fn partition_entries(&self, pid: PartitionId, after: Option<&Digest>) -> Vec<Entry> {
        let now = self.inner.now_void();
        let mut entries = self.inner.index.sorted_entries(pid, after);
        entries.retain(|e| self.inner.is_live(e, now));
        entries
    }

    /// Removes every expired record from the index and releases its space; returns how many.
    /// (The maintenance thread does this every `expiry_period_s` in a stand-alone namespace.)
    pub fn reap_expired(&self) -> u64 {
        self.inner.reap_expired()
    }

    /// One eviction step if a high-water mark is exceeded; returns how many records it evicted.
    pub fn evict_if_needed(&self) -> u64 {
        self.inner.evict_if_needed()
    }

    /// Drops tombstones whose record has no older copy left on the devices or in memory;
    /// returns how many it dropped.
    pub fn raid_tombstones(&self) -> Result<u64> {
        self.inner.raid_tombstones()
    }

    /// Up to `limit` expired records not yet removed, with their indexed metadata: in
    /// [`crate::MaintenanceMode::External`] the caller deletes them (a leader proposes the
    /// deletions through its log, so every replica removes the same records).
    pub fn expiry_candidates(&self, limit: usize) -> Vec<(Digest, RecordMeta)> {
        self.inner.expiry_candidates(limit)
    }

    /// Up to `limit` records one eviction step would remove now: none unless an eviction
    /// high-water mark is exceeded on this node (see [`Engine::expiry_candidates`]).
    pub fn eviction_candidates(&self, limit: usize) -> Vec<(Digest, RecordMeta)> {
        self.inner.eviction_candidates(limit)
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
