//! How a partition snapshot moves from a source engine to a receiver: the batch stream
//! ([`SnapshotStream`]), its throttle ([`Throttle`], a token bucket on bytes), its cancellation
//! ([`CancelToken`], and [`cancel_on_close`] to drive one from openraft's "replication closed"
//! future), and the install gate (`InstallGate`): the atomics that fence snapshot streams and
//! reads off a partition while an install replaces it.
//!
//! **Memory is bounded by one batch.** A stream holds a cursor, never a version: each
//! [`SnapshotStream::next_batch`] reads at most `snapshot_batch_records` versions (and stops
//! early at the engine's `SNAPSHOT_BATCH_BYTES_MAX`), and hands that batch to the caller, who
//! applies and drops it before asking for the next one. Throttling and cancellation happen
//! between batches, so they add no buffering.
//!
//! **Cancellation** is checked before each batch, after each batch is read, and while the
//! throttle waits; a cancelled stream fails with an [`io::ErrorKind::Interrupted`] error. The
//! receiver's install then stops with its partition still marked "installing", so neither a
//! crash nor a cancel leaves a partially installed partition looking complete.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::ReplicationClosed;
use peregrine_engine::{Engine, PartitionId, RecordVersion, SnapshotCursor};
use tokio::sync::watch;
use tokio::time::Instant;

/// Default snapshot transfer rate, in MB/s, of the streams a receiver reads.
pub const SNAPSHOT_MB_PER_S_DEFAULT: u64 = 64;
/// Bytes in the throttle's MB (binary, like the engine's sizes).
pub const BYTES_PER_MB: u64 = 1 << 20;
/// The most credit an idle throttle saves up, in milliseconds of its rate: a reader that paused
/// may then read this much faster than the rate, never more.
const THROTTLE_BURST_MS: u64 = 50;
/// Fixed per-version part of [`version_bytes_estimate`]: digest (20), meta (14), and the
/// version's headers.
const VERSION_OVERHEAD_BYTES: u64 = 48;
/// Per-bin part of [`version_bytes_estimate`] besides the name and value: type and lengths.
const BIN_OVERHEAD_BYTES: u64 = 4;

/// What the throttle counts for one version: a cheap estimate of its encoded size (fixed
/// overhead + set name + user key + each bin's name, value length and a small header), not the
/// exact device bytes, computed without encoding anything.
pub fn version_bytes_estimate(v: &RecordVersion) -> u64 {
    let len = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    match v {
        RecordVersion::Live(r) => {
            let key = r.key.as_ref().map_or(0, |k| len(k.bytes.len()));
            let bins = r.bins.iter().fold(0u64, |acc, b| {
                acc.saturating_add(len(b.name.as_bytes().len()) + len(b.value.encoded_len()) + BIN_OVERHEAD_BYTES)
            });
            VERSION_OVERHEAD_BYTES.saturating_add(len(r.set_name.len())).saturating_add(key).saturating_add(bins)
        }
        RecordVersion::Tombstone { set_name, .. } => VERSION_OVERHEAD_BYTES.saturating_add(len(set_name.len())),
    }
}

fn interrupted(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, what)
}

// ---------------------------------------------------------------- cancellation

/// A cancellation flag shared by clones: once [`CancelToken::cancel`]led, it stays so, and
/// every [`CancelToken::cancelled`] future resolves.
#[derive(Clone)]
pub struct CancelToken {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for CancelToken {
    fn default() -> CancelToken {
        CancelToken::new()
    }
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken").field("cancelled", &self.is_cancelled()).finish()
    }
}

impl CancelToken {
    /// A token nobody has cancelled.
    pub fn new() -> CancelToken {
        CancelToken { tx: Arc::new(watch::Sender::new(false)) }
    }

    /// Cancels the token (and every clone); idempotent.
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the token was cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the token is cancelled (at once if it already is).
    pub async fn cancelled(&self) {
        let mut rx = self.tx.subscribe();
        if rx.wait_for(|c| *c).await.is_err() {
            // Unreachable: `self` holds the sender. Never report a cancel that did not happen.
            std::future::pending::<()>().await;
        }
    }
}

/// Runs `work` to completion, cancelling `token` if `closed` resolves first: the bridge from
/// openraft's `RaftNetworkV2::full_snapshot(vote, snapshot, cancel, option)` (whose `cancel`
/// resolves when replication to the target closes) to the token a snapshot stream checks. A
/// network implementation gives the target a handle carrying `token`
/// (`PartitionSnapshot::with_cancel`) and passes the send (or the target's install) as `work`.
///
/// `work` is still awaited after the cancel, so the caller gets the receiver's own outcome
/// (an `Interrupted` error once its stream notices) rather than a dropped future. No task is
/// spawned: when this returns, nothing watches `closed` any more.
pub async fn cancel_on_close<T>(
    closed: impl Future<Output = ReplicationClosed>,
    token: &CancelToken,
    work: impl Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        biased;
        out = &mut work => return out,
        why = closed => {
            tracing::info!("snapshot transfer cancelled: {why}");
            token.cancel();
        }
    }
    work.await
}

// ---------------------------------------------------------------- throttle

/// A token bucket on bytes: [`Throttle::take`] charges a batch *after* it was read and waits
/// until the bucket is out of debt, so `N` bytes take at least `N / rate` (less at most
/// `THROTTLE_BURST_MS` of saved-up credit). The bucket starts empty. A rate of 0 is unlimited.
#[derive(Debug)]
pub struct Throttle {
    /// 0 = unlimited.
    bytes_per_s: u64,
    /// Bytes that may be read without waiting; negative = debt.
    credit: f64,
    /// The most credit saved up.
    burst: f64,
    last: Instant,
}

impl Throttle {
    /// A throttle at `mb_per_s` MB/s ([`BYTES_PER_MB`]); 0 = unlimited.
    pub fn new(mb_per_s: u64) -> Throttle {
        let bytes_per_s = mb_per_s.saturating_mul(BYTES_PER_MB);
        let burst = bytes_per_s as f64 * THROTTLE_BURST_MS as f64 / 1000.0;
        Throttle { bytes_per_s, credit: 0.0, burst, last: Instant::now() }
    }

    /// An unlimited throttle.
    pub fn unlimited() -> Throttle {
        Throttle::new(0)
    }

    /// The rate in bytes per second (0 = unlimited).
    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s
    }

    /// Charges `bytes` and waits until they are paid for; fails with `Interrupted` at once if
    /// `cancel` fires meanwhile.
    pub async fn take(&mut self, bytes: u64, cancel: &CancelToken) -> io::Result<()> {
        if self.bytes_per_s == 0 {
            return Ok(());
        }
        let rate = self.bytes_per_s as f64;
        let now = Instant::now();
        let saved = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.credit = (self.credit + saved).min(self.burst) - bytes as f64;
        self.last = now;
        if self.credit >= 0.0 {
            return Ok(());
        }
        let wait = Duration::from_secs_f64(-self.credit / rate);
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            () = cancel.cancelled() => Err(interrupted(format!("cancelled while throttled ({wait:?} left to wait)"))),
        }
    }
}

// ---------------------------------------------------------------- install gate

/// The atomics of one partition state machine that fence readers and snapshot streams off the
/// partition while an install replaces it (read without the state machine's mutex; written
/// only under it).
#[derive(Debug)]
pub(crate) struct InstallGate {
    /// Bumped when an install starts and when it completes: odd while one is under way or was
    /// left incomplete (the partition value holds the "installing" mark).
    epoch: AtomicU64,
    /// 1 + the index of the last applied entry (0: none).
    applied_next: AtomicU64,
    /// 1 + the highest log index whose versions the partition may hold: raised *before* an
    /// entry's versions are applied, so a stream that ends reads an upper bound.
    covers_next: AtomicU64,
    /// 1 + the index the applied id must reach before the partition is readable (0: none).
    catch_up_next: AtomicU64,
}

impl InstallGate {
    /// The gate of a state machine opened with nothing installing, at `applied_next`.
    pub(crate) fn new(applied_next: u64) -> InstallGate {
        InstallGate {
            epoch: AtomicU64::new(0),
            applied_next: AtomicU64::new(applied_next),
            covers_next: AtomicU64::new(applied_next),
            catch_up_next: AtomicU64::new(0),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn is_installing(&self) -> bool {
        self.epoch() % 2 == 1
    }

    /// An install starts: the epoch becomes (or stays) odd, and changes, so a stream of this
    /// partition that started before fails, as does one started while the partition is in
    /// pieces.
    pub(crate) fn begin_install(&self) {
        let step = if self.is_installing() { 2 } else { 1 };
        self.epoch.fetch_add(step, Ordering::AcqRel);
    }

    /// An install completed at `applied_next`; the partition holds versions up to
    /// `catch_up_next` (exclusive) and is readable once the applied id gets there.
    pub(crate) fn end_install(&self, applied_next: u64, catch_up_next: u64) {
        self.applied_next.store(applied_next, Ordering::Release);
        self.covers_next.store(catch_up_next.max(applied_next), Ordering::Release);
        self.catch_up_next.store(catch_up_next, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Entry `index`'s versions are about to be applied.
    pub(crate) fn will_apply(&self, index: u64) {
        self.covers_next.fetch_max(index.saturating_add(1), Ordering::AcqRel);
    }

    /// Entry `index` was applied.
    pub(crate) fn applied(&self, index: u64) {
        self.applied_next.store(index.saturating_add(1), Ordering::Release);
    }

    pub(crate) fn covers_next(&self) -> u64 {
        self.covers_next.load(Ordering::Acquire)
    }

    /// No install under way or left incomplete, and the applied id at the catch-up point.
    pub(crate) fn readable(&self) -> bool {
        !self.is_installing() && self.applied_next.load(Ordering::Acquire) >= self.catch_up_next.load(Ordering::Acquire)
    }
}

// ---------------------------------------------------------------- stream

/// Counters of one stream: what it handed out, and its largest batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Batches handed out.
    pub batches: u64,
    /// Versions handed out.
    pub versions: u64,
    /// Bytes handed out, as [`version_bytes_estimate`] counts them.
    pub bytes: u64,
    /// Versions in the largest batch: never above the cursor's `batch_records`.
    pub batch_versions_max: usize,
    /// Bytes of the largest batch.
    pub batch_bytes_max: u64,
}

/// What a transport delivers for a remote snapshot, in order: batches, then one `End`
/// (or `Failed` when the transfer broke).
#[derive(Debug)]
pub enum RemoteItem {
    /// The next batch of versions.
    Batch(Vec<RecordVersion>),
    /// The source's stream ended; its `covers_next` then (see [`SnapshotStream::end_covers_next`]).
    End {
        /// 1 + the highest log index whose versions the source stream may have read.
        covers_next: u64,
    },
    /// The transfer broke (connection lost, source failed), with why.
    Failed(String),
}

/// The receiving end of a remote snapshot's batches (bounded: the transport waits while the
/// receiver applies, so memory stays at a batch or two).
pub type RemoteBatches = tokio::sync::mpsc::Receiver<RemoteItem>;

/// Where a stream's batches come from.
enum StreamSource {
    /// The source engine in this process, fenced by its install gate.
    Local {
        engine: Engine,
        gate: Arc<InstallGate>,
        /// The source's install epoch when the stream started.
        epoch: u64,
        cursor: SnapshotCursor,
    },
    /// A transport's channel (`None`: already taken by another stream).
    Remote { partition: PartitionId, batches: Option<RemoteBatches> },
}

/// Reads a partition snapshot batch by batch from the source engine (or a transport's
/// channel of a peer's batches): bounded memory (one batch), throttled, cancellable, and
/// fenced off a source whose partition an install is replacing.
pub struct SnapshotStream {
    source: StreamSource,
    throttle: Throttle,
    cancel: CancelToken,
    stats: TransferStats,
    /// Set at the end: the source's `covers_next` then.
    end_covers_next: Option<u64>,
}

impl fmt::Debug for SnapshotStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            StreamSource::Local { cursor, .. } => format!("{cursor:?}"),
            StreamSource::Remote { partition, .. } => format!("remote partition {}", partition.get()),
        };
        f.debug_struct("SnapshotStream")
            .field("source", &source)
            .field("throttle", &self.throttle)
            .field("cancel", &self.cancel)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl SnapshotStream {
    pub(crate) fn new(
        source: Engine,
        source_gate: Arc<InstallGate>,
        partition: PartitionId,
        batch_records: usize,
        throttle: Throttle,
        cancel: CancelToken,
    ) -> SnapshotStream {
        let epoch = source_gate.epoch();
        SnapshotStream {
            source: StreamSource::Local {
                engine: source,
                gate: source_gate,
                epoch,
                cursor: SnapshotCursor::new(partition, batch_records),
            },
            throttle,
            cancel,
            stats: TransferStats::default(),
            end_covers_next: None,
        }
    }

    pub(crate) fn remote(
        partition: PartitionId,
        batches: Option<RemoteBatches>,
        throttle: Throttle,
        cancel: CancelToken,
    ) -> SnapshotStream {
        SnapshotStream {
            source: StreamSource::Remote { partition, batches },
            throttle,
            cancel,
            stats: TransferStats::default(),
            end_covers_next: None,
        }
    }

    fn pid(&self) -> u16 {
        match &self.source {
            StreamSource::Local { cursor, .. } => cursor.partition.get(),
            StreamSource::Remote { partition, .. } => partition.get(),
        }
    }

    fn check_cancel(&self) -> io::Result<()> {
        if self.cancel.is_cancelled() {
            return Err(interrupted(format!(
                "snapshot transfer of partition {} cancelled after {} batches ({} bytes)",
                self.pid(),
                self.stats.batches,
                self.stats.bytes
            )));
        }
        Ok(())
    }

    fn check_source(&self) -> io::Result<()> {
        let StreamSource::Local { gate, epoch, .. } = &self.source else { return Ok(()) };
        if epoch % 2 == 1 || gate.epoch() != *epoch {
            return Err(io::Error::other(format!(
                "snapshot source of partition {}: an install replaced the partition while it was streamed",
                self.pid()
            )));
        }
        Ok(())
    }

    /// Reads the next batch from the source (`None` at the end), before throttling.
    async fn read_batch(&mut self) -> io::Result<Option<Vec<RecordVersion>>> {
        let pid = self.pid();
        match &mut self.source {
            StreamSource::Local { engine, gate, cursor, .. } => {
                let batch = engine
                    .snapshot_next(cursor)
                    .await
                    .map_err(|e| io::Error::other(format!("reading a snapshot batch of partition {pid}: {e}")))?;
                if batch.is_none() {
                    self.end_covers_next.get_or_insert(gate.covers_next());
                }
                Ok(batch)
            }
            StreamSource::Remote { batches, .. } => {
                if self.end_covers_next.is_some() {
                    return Ok(None);
                }
                let Some(rx) = batches else {
                    return Err(io::Error::other(format!(
                        "remote snapshot of partition {pid}: its batches were already streamed"
                    )));
                };
                let cancel = self.cancel.clone();
                let item = tokio::select! {
                    item = rx.recv() => item,
                    () = cancel.cancelled() => return Err(interrupted(format!("remote snapshot of partition {pid}: cancelled"))),
                };
                match item {
                    Some(RemoteItem::Batch(b)) => Ok(Some(b)),
                    Some(RemoteItem::End { covers_next }) => {
                        self.end_covers_next = Some(covers_next);
                        Ok(None)
                    }
                    Some(RemoteItem::Failed(why)) => {
                        Err(io::Error::other(format!("remote snapshot of partition {pid}: {why}")))
                    }
                    None => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("remote snapshot of partition {pid}: the transfer ended before its end marker"),
                    )),
                }
            }
        }
    }

    /// The next batch (at most `batch_records` versions), `None` at the end. Waits on the
    /// throttle for the batch's bytes before handing it out; fails with `Interrupted` once the
    /// stream's token is cancelled.
    pub async fn next_batch(&mut self) -> io::Result<Option<Vec<RecordVersion>>> {
        self.check_cancel()?;
        self.check_source()?;
        let batch = self.read_batch().await?;
        // After the read: an install that started during it may have handed out a mix.
        self.check_source()?;
        self.check_cancel()?;
        let Some(batch) = batch else {
            return Ok(None);
        };
        let bytes = batch.iter().fold(0u64, |acc, v| acc.saturating_add(version_bytes_estimate(v)));
        self.throttle.take(bytes, &self.cancel).await.map_err(|e| {
            interrupted(format!(
                "snapshot transfer of partition {} after {} batches ({} bytes): {e}",
                self.pid(),
                self.stats.batches,
                self.stats.bytes
            ))
        })?;
        let s = &mut self.stats;
        s.batches += 1;
        s.versions += u64::try_from(batch.len()).unwrap_or(u64::MAX);
        s.bytes = s.bytes.saturating_add(bytes);
        s.batch_versions_max = s.batch_versions_max.max(batch.len());
        s.batch_bytes_max = s.batch_bytes_max.max(bytes);
        Ok(Some(batch))
    }

    /// What the stream handed out so far.
    pub fn stats(&self) -> TransferStats {
        self.stats
    }

    /// Once the stream has ended: 1 + the highest log index whose versions it may have read
    /// (the source's applied point when it ended), `None` before the end.
    pub fn end_covers_next(&self) -> Option<u64> {
        self.end_covers_next
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn an_unlimited_throttle_never_waits_and_a_cancelled_token_stops_a_wait() {
        let cancel = CancelToken::new();
        let mut t = Throttle::unlimited();
        t.take(u64::MAX, &cancel).await.unwrap();

        let mut t = Throttle::new(1);
        let started = std::time::Instant::now();
        let c2 = cancel.clone();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c2.cancel();
        });
        // 100 MB at 1 MB/s would wait 100 s.
        let err = t.take(100 * BYTES_PER_MB, &cancel).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert!(started.elapsed() >= Duration::from_millis(40));
        canceller.await.unwrap();
        assert!(cancel.is_cancelled());
        cancel.cancelled().await; // resolves at once now
    }

    #[tokio::test]
    async fn a_throttle_takes_at_least_bytes_over_rate() {
        let cancel = CancelToken::new();
        let mut t = Throttle::new(4);
        let started = std::time::Instant::now();
        for _ in 0..8 {
            t.take(BYTES_PER_MB / 8, &cancel).await.unwrap(); // 1 MB in all, 0.25 s at 4 MB/s
        }
        assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn cancel_on_close_cancels_the_token_and_still_finishes_the_work() {
        let token = CancelToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let closed = async move {
            rx.await.ok();
            ReplicationClosed::new("test: replication closed")
        };
        let t2 = token.clone();
        let work = async move {
            t2.cancelled().await;
            "stopped"
        };
        tx.send(()).unwrap();
        assert_eq!(cancel_on_close(closed, &token, work).await, "stopped");
        assert!(token.is_cancelled());

        // Work that ends first leaves the token alone.
        let token = CancelToken::new();
        let out = cancel_on_close(std::future::pending::<ReplicationClosed>(), &token, async { 7 }).await;
        assert_eq!(out, 7);
        assert!(!token.is_cancelled());
    }

    #[test]
    fn the_install_gate_is_odd_while_installing_and_readable_after_catching_up() {
        let g = InstallGate::new(3);
        assert!(g.readable());
        g.begin_install();
        assert!(g.is_installing() && !g.readable());
        g.begin_install(); // a retry after a failed install: still odd, a new epoch
        assert!(g.is_installing());
        assert_eq!(g.epoch(), 3);
        g.end_install(10, 12);
        assert!(!g.is_installing());
        assert!(!g.readable(), "applied 9 < catch-up 11");
        g.will_apply(10);
        g.applied(10);
        assert!(!g.readable());
        g.applied(11);
        assert!(g.readable());
        assert_eq!(g.covers_next(), 12);
    }
}
