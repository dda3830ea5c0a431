//! Truncation and the per-partition values the caller keeps in the metadata region. Each
//! truncation is one metadata write, never a rewrite of data: a partition truncation starts a
//! new partition epoch (versions of older epochs are dead), a namespace or set truncation
//! records a last-update-time cutoff (versions at or before it are dead). Cold start honours
//! both, so nothing truncated comes back, defrag-moved copies included; versions written after
//! the call are kept. The space of truncated versions is released once the truncation is
//! durable and reclaimed by defrag as usual.

use std::sync::atomic::Ordering;

use peregrine_index::{Entry, PartitionId};

use crate::blocks::Stream;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::format::metadata::{PARTITION_VALUE_BYTES_MAX, SET_TRUNCATIONS_MAX};
use crate::record::SET_NAME_BYTES_MAX;

impl Engine {
    /// Removes every version of partition `pid` (live records and tombstones): one metadata
    /// write that starts a new epoch for the partition. Returns how many index entries went.
    /// Versions applied after the call returns belong to the new epoch and are kept.
    pub async fn truncate_partition(&self, pid: PartitionId) -> Result<u64> {
        self.inner.ensure_open()?;
        let removed: Vec<Entry> = {
            let mut table = self.inner.index.write(pid);
            let entries: Vec<Entry> = table.iter().collect();
            for e in &entries {
                table.remove(&e.digest);
            }
            self.inner.metadata.bump_epoch(pid)?;
            entries
        };
        if let Err(e) = self.inner.metadata.persist_epochs().await.unwrap_or(Err(Error::Shutdown)) {
            self.untruncate_partition(pid, &removed);
            return Err(e);
        }
        Ok(self.forget(&removed))
    }

    /// Aerospike's truncate: removes the records of `set` (all sets when `None`) last updated
    /// at or before `before_lut_ms` (now when `None`), tombstones included, with one metadata
    /// write. Returns how many index entries went. Writes after the call are kept: their
    /// last-update times are above the cutoff.
    pub async fn truncate(&self, set: Option<&[u8]>, before_lut_ms: Option<u64>) -> Result<u64> {
        self.inner.ensure_open()?;
        let now = self.inner.config.clock.now_unix_ms();
        let cutoff = before_lut_ms.unwrap_or(now);
        if cutoff > now {
            return Err(Error::Parameter(format!("truncate cutoff {cutoff} ms is in the future (now {now} ms)")));
        }
        if cutoff == 0 {
            return Err(Error::Parameter("truncate cutoff must be after the epoch".into()));
        }
        if let Some(name) = set
            && (name.is_empty() || name.len() > SET_NAME_BYTES_MAX)
        {
            return Err(Error::SetName { len: name.len(), max: SET_NAME_BYTES_MAX });
        }
        let meta = &self.inner.metadata;
        let target = set.map(|n| (n, self.inner.sets.lookup(n)));
        let before = meta.raise_cutoff(target, cutoff);
        let name = set.map(<[u8]>::to_vec);
        let durable = meta.persist(move |img| {
            match name {
                None => img.namespace_cutoff_ms = img.namespace_cutoff_ms.max(cutoff),
                Some(name) => {
                    let full = img.sets.len() >= SET_TRUNCATIONS_MAX;
                    match img.sets.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, c)) => *c = (*c).max(cutoff),
                        None if full => {
                            return Err(Error::Parameter(format!(
                                "at most {SET_TRUNCATIONS_MAX} sets can carry a truncation; truncate the namespace instead"
                            )));
                        }
                        None => {
                            img.sets.push((name, cutoff));
                            img.sets.sort();
                        }
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = durable.await.unwrap_or(Err(Error::Shutdown)) {
            // Not durable: the truncation did not happen, and the records it hid read again.
            meta.restore_cutoff(target, cutoff.max(before), before);
            return Err(e);
        }
        let mut removed = 0;
        for pid in PartitionId::all() {
            let gone: Vec<Entry> = {
                let mut table = self.inner.index.write(pid);
                let covered: Vec<Entry> = table.iter().filter(|e| self.inner.is_truncated(e)).collect();
                for e in &covered {
                    table.remove(&e.digest);
                }
                covered
            };
            removed += self.forget(&gone);
        }
        Ok(removed)
    }

    /// Undoes a partition truncation whose metadata write failed, so the session shows what a
    /// restart would: the removed versions go back where nothing newer was written meanwhile
    /// (a newer version supersedes its old copy at the next cold start too), and the epoch goes
    /// back unless another truncation moved it on.
    fn untruncate_partition(&self, pid: PartitionId, removed: &[Entry]) {
        let mut table = self.inner.index.write(pid);
        self.inner.metadata.unbump_epoch(pid);
        for e in removed {
            let (current, hint) = table.lookup(&e.digest);
            if current.is_none() {
                table.insert_hinted(*e, hint);
            }
        }
    }

    /// Releases the space of entries a durable truncation removed from the index.
    fn forget(&self, removed: &[Entry]) -> u64 {
        for e in removed {
            self.inner.release(e, Stream::Client, 0);
            self.inner.count_removal(e);
        }
        self.inner.counters.truncated.fetch_add(removed.len() as u64, Ordering::Relaxed);
        removed.len() as u64
    }

    /// Stores the caller's opaque value for each partition (at most 27 bytes each; the
    /// replication layer keeps its applied log id there). The values become durable only after
    /// everything appended before the call is durable, so a value never describes writes a
    /// crash could take back.
    pub async fn set_partition_values(&self, values: Vec<(PartitionId, Vec<u8>)>) -> Result<()> {
        self.inner.ensure_open()?;
        if let Some((pid, v)) = values.iter().find(|(_, v)| v.len() > PARTITION_VALUE_BYTES_MAX) {
            return Err(Error::Parameter(format!(
                "partition {} value of {} bytes exceeds {PARTITION_VALUE_BYTES_MAX}",
                pid.get(),
                v.len()
            )));
        }
        self.barrier().await?;
        let durable = self.inner.metadata.persist(move |img| {
            for (pid, v) in values {
                img.partitions[pid.index()].value = v;
            }
            Ok(())
        });
        durable.await.unwrap_or(Err(Error::Shutdown))
    }

    /// Partition `pid`'s opaque value as last made durable (empty when never set).
    pub fn partition_value(&self, pid: PartitionId) -> Vec<u8> {
        self.inner.metadata.partition_value(pid)
    }

    /// Partition `pid`'s truncation epoch.
    pub fn partition_epoch(&self, pid: PartitionId) -> u32 {
        self.inner.metadata.epoch(pid)
    }
}
