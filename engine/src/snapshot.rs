//! Snapshot cursors: one partition's versions (tombstones included) streamed in digest order,
//! in batches of bounded size, resumable from the last digest handed out. Nothing copies the
//! whole partition: each batch is the next few digests of the partition's index table (one
//! pass with a bounded heap), then one verified read per version.
//!
//! A cursor reads the live index, so versions written while it runs may or may not appear: a
//! receiver that replays the log from the point the stream started, with the engine's
//! monotonic apply, ends with the same contents.

use peregrine_index::{Digest, PartitionId};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::record::RecordVersion;

/// Versions per batch when the caller does not say.
pub const SNAPSHOT_BATCH_RECORDS_DEFAULT: usize = 256;
/// A batch ends once it holds this many encoded bytes (records are at most 8 MiB each).
pub const SNAPSHOT_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A position in one partition's snapshot stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCursor {
    /// The partition streamed.
    pub partition: PartitionId,
    /// The last digest handed out (`None` before the first batch).
    pub after: Option<Digest>,
    /// Versions per batch.
    pub batch_records: usize,
    done: bool,
}

impl SnapshotCursor {
    /// A cursor at the start of `partition`.
    pub fn new(partition: PartitionId, batch_records: usize) -> SnapshotCursor {
        SnapshotCursor { partition, after: None, batch_records: batch_records.max(1), done: false }
    }

    /// A cursor that resumes after `after` (as saved from [`SnapshotCursor::after`]).
    pub fn resume(partition: PartitionId, after: Option<Digest>, batch_records: usize) -> SnapshotCursor {
        SnapshotCursor { after, ..SnapshotCursor::new(partition, batch_records) }
    }

    /// Whether the stream has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl Engine {
    /// The next batch of the cursor's partition, in digest order; `None` once it is done.
    /// Versions deleted or truncated between listing and reading are skipped.
    pub async fn snapshot_next(&self, cursor: &mut SnapshotCursor) -> Result<Option<Vec<RecordVersion>>> {
        self.inner.ensure_open()?;
        if cursor.done {
            return Ok(None);
        }
        let entries = self.inner.index.sorted_batch(cursor.partition, cursor.after.as_ref(), cursor.batch_records);
        let Some(last) = entries.last() else {
            cursor.done = true;
            return Ok(None);
        };
        let mut end = last.digest;
        let mut out = Vec::with_capacity(entries.len());
        let mut bytes = 0usize;
        for entry in &entries {
            if self.inner.is_truncated(entry) {
                continue;
            }
            match self.read_entry_bytes(entry).await {
                Ok(b) => {
                    let view = b.view();
                    bytes += view.len();
                    out.push(view.to_version());
                }
                Err(Error::NotFound) => {}
                Err(e) => return Err(e),
            }
            if bytes >= SNAPSHOT_BATCH_BYTES_MAX {
                end = entry.digest;
                break;
            }
        }
        cursor.after = Some(end);
        Ok(Some(out))
    }

    /// Every version of partition `pid` (tombstones included) in digest order, in one vector:
    /// for tests and small partitions; stream big ones with [`Engine::snapshot_next`].
    pub async fn partition_versions_async(&self, pid: PartitionId) -> Result<Vec<RecordVersion>> {
        let mut cursor = SnapshotCursor::new(pid, SNAPSHOT_BATCH_RECORDS_DEFAULT);
        let mut out = Vec::new();
        while let Some(batch) = self.snapshot_next(&mut cursor).await? {
            out.extend(batch);
        }
        Ok(out)
    }
}
