//! Tests of the engine as state machine: openraft's storage Suite on the shared log's
//! `GroupLog` and a `PartitionStateMachine` over a real engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use peregrine_engine::{Engine, EngineConfig, MaintenanceMode, PartitionId};

use crate::log::{GroupLog, LogOptions, SharedLog};
use crate::state_machine::{PartitionStateMachine, SmOptions};
use crate::types::TypeConfig;

/// A directory on a filesystem with O_DIRECT (not tmpfs).
pub(crate) fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("peregrine-sm-").tempdir_in("/var/tmp").unwrap()
}

/// A small engine for tests: one 16 MiB file, 128 KiB write blocks, external maintenance.
pub(crate) fn engine_config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::single_file("test", dir.join("engine.dat"), 16 << 20);
    c.write_block_bytes = 128 * 1024;
    c.maintenance = MaintenanceMode::External;
    c
}

pub(crate) fn log_options(dir: &Path) -> LogOptions {
    let mut o = LogOptions::new(dir.join("raft-log"));
    o.segment_bytes = 1 << 20;
    o.batch_bytes_max = 256 * 1024;
    o
}

/// A fresh engine, shared log and side directory per build; group = partition 5.
struct EngineStoreBuilder;

type Guard = (tempfile::TempDir, SharedLog<TypeConfig>, Engine);

impl StoreBuilder<TypeConfig, GroupLog<TypeConfig>, PartitionStateMachine, Guard> for EngineStoreBuilder {
    async fn build(&self) -> Result<(Guard, GroupLog<TypeConfig>, PartitionStateMachine), StorageError<TypeConfig>> {
        let dir = tempdir();
        let engine = Engine::open(engine_config(dir.path())).unwrap();
        let (log, _) = SharedLog::<TypeConfig>::open(log_options(dir.path())).unwrap();
        let pid = PartitionId::new(5).unwrap();
        let sm =
            PartitionStateMachine::open(engine.clone(), pid, &dir.path().join("sm"), SmOptions::default()).unwrap();
        let g = log.group(u32::from(pid.get()));
        Ok(((dir, log, engine), g, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_the_shared_log_and_the_engine_state_machine() {
    Suite::test_all(EngineStoreBuilder).await.unwrap();
}

// ---------------------------------------------------------------- restart and install

use openraft::entry::RaftEntry;
use openraft::storage::RaftStateMachine;
use openraft::{Membership, RaftSnapshotBuilder};
use peregrine_engine::{Bin, Digest, Record, RecordMeta, RecordVersion, Value};

use crate::types::{Command, Entry, LogId, StoredMembership};

const T0: u64 = 1_800_000_000_000;

fn pid5() -> PartitionId {
    PartitionId::new(5).unwrap()
}

fn version(k: u8, lut: u64, tag: &str) -> RecordVersion {
    let mut d = [0u8; 20];
    d[0] = 5; // partition 5
    d[3] = k;
    RecordVersion::Live(Record {
        digest: Digest(d),
        set_name: b"s".to_vec(),
        key: None,
        meta: RecordMeta { generation: 1, void_time: 0, last_update_ms: T0 + lut },
        bins: vec![Bin::new("v", Value::String(tag.as_bytes().to_vec())).unwrap()],
    })
}

fn lid(term: u64, index: u64) -> LogId {
    LogId::new_term_index(term, index)
}

fn normal(index: u64, versions: &[RecordVersion]) -> Entry {
    Entry::new_normal(lid(1, index), Command::from_versions(versions))
}

fn voters() -> Membership<u64, openraft::BasicNode> {
    Membership::new_with_defaults(vec![[1u64, 2, 3].into_iter().collect()], [])
}

async fn apply(sm: &mut PartitionStateMachine, entries: Vec<Entry>) {
    let items = entries.into_iter().map(|e| Ok((e, None)));
    sm.apply(futures_util::stream::iter(items)).await.unwrap();
}

fn open_sm(dir: &Path, persist_every: u64) -> (Engine, PartitionStateMachine) {
    let engine = Engine::open(engine_config(dir)).unwrap();
    let opts = SmOptions { persist_every, ..SmOptions::default() };
    let sm = PartitionStateMachine::open(engine.clone(), pid5(), &dir.join("sm"), opts).unwrap();
    (engine, sm)
}

fn close(engine: Engine, sm: PartitionStateMachine) {
    drop(sm);
    engine.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reports_only_the_durable_applied_id_and_membership() {
    let dir = tempdir();
    let entries = vec![
        Entry::new_membership(lid(1, 1), voters()),
        normal(2, &[version(1, 1, "a"), version(2, 2, "b")]),
        normal(3, &[version(1, 3, "a2")]),
    ];
    let (engine, mut sm) = open_sm(dir.path(), 1000);
    apply(&mut sm, entries.clone()).await;
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(lid(1, 3)));
    assert_eq!(membership, StoredMembership::new(Some(lid(1, 1)), voters()));
    assert_eq!(sm.applied_ids().await, (Some(lid(1, 3)), None), "below persist_every: nothing persisted yet");
    let before = engine.partition_versions_async(pid5()).await.unwrap();
    assert_eq!(before.len(), 2);
    close(engine, sm);

    // Nothing was persisted: the restarted state machine says so, and openraft's re-apply of
    // the same entries changes nothing (stale versions are skipped).
    let (engine, mut sm) = open_sm(dir.path(), 1000);
    assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));
    apply(&mut sm, entries).await;
    assert_eq!(engine.partition_versions_async(pid5()).await.unwrap(), before);
    sm.persist().await.unwrap();
    close(engine, sm);

    let (engine, mut sm) = open_sm(dir.path(), 1000);
    assert_eq!(sm.applied_state().await.unwrap(), (Some(lid(1, 3)), StoredMembership::new(Some(lid(1, 1)), voters())));
    assert!(sm.get_current_snapshot().await.unwrap().is_none());

    // Building a snapshot makes its applied id durable before reporting it (purge is bounded
    // by the snapshot, so never passes the durable applied id).
    apply(&mut sm, vec![normal(4, &[version(3, 4, "c")])]).await;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(lid(1, 4)));
    assert_eq!(sm.applied_ids().await, (Some(lid(1, 4)), Some(lid(1, 4))));
    close(engine, sm);
    let (engine, mut sm) = open_sm(dir.path(), 1000);
    assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(1, 4)));
    assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);

    // Every `persist_every` entries the applied id is persisted on its own.
    let (engine, sm) = {
        close(engine, sm);
        open_sm(dir.path(), 2)
    };
    let mut sm = sm;
    apply(&mut sm, vec![normal(5, &[version(4, 5, "d")]), normal(6, &[version(4, 6, "d2")])]).await;
    assert_eq!(sm.applied_ids().await, (Some(lid(1, 6)), Some(lid(1, 6))));

    // An interrupted install is refused at open, not reported as applied.
    engine.set_partition_values(vec![(pid5(), vec![2])]).await.unwrap();
    close(engine, sm);
    let engine = Engine::open(engine_config(dir.path())).unwrap();
    let err =
        PartitionStateMachine::open(engine.clone(), pid5(), &dir.path().join("sm"), SmOptions::default()).unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    engine.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_replaces_the_partition_and_survives_a_restart() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let (engine_a, mut a) = open_sm(dir_a.path(), 1000);
    apply(
        &mut a,
        vec![
            Entry::new_membership(lid(1, 1), voters()),
            normal(2, &[version(1, 10, "a"), version(2, 11, "b"), version(3, 12, "c")]),
        ],
    )
    .await;
    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();

    // B holds other versions of the partition (one newer than A's): install wipes them all.
    let (engine_b, mut b) = open_sm(dir_b.path(), 1000);
    apply(&mut b, vec![normal(1, &[version(1, 99, "newer-but-divergent"), version(9, 1, "gone")])]).await;
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    let want = engine_a.partition_versions_async(pid5()).await.unwrap();
    assert_eq!(engine_b.partition_versions_async(pid5()).await.unwrap(), want);
    assert_eq!(b.applied_state().await.unwrap(), (Some(lid(1, 2)), StoredMembership::new(Some(lid(1, 1)), voters())));
    assert_eq!(b.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    // A state machine refuses to install its own snapshot (it would wipe the source).
    assert!(a.install_snapshot(&snap.meta, snap.snapshot).await.is_err());
    close(engine_b, b);

    let (engine_b, mut b) = open_sm(dir_b.path(), 1000);
    assert_eq!(b.applied_state().await.unwrap(), (Some(lid(1, 2)), StoredMembership::new(Some(lid(1, 1)), voters())));
    assert_eq!(engine_b.partition_versions_async(pid5()).await.unwrap(), want);
    close(engine_b, b);
    close(engine_a, a);
}

// ---------------------------------------------------------------- snapshot transfer

use std::time::{Duration, Instant};

use crate::snapshot_transfer::CancelToken;

/// A version of key `k` (distinct from [`version`]'s keys) whose one bin holds `bytes` bytes.
fn big_version(k: u16, bytes: usize) -> RecordVersion {
    let mut d = [0u8; 20];
    d[0] = 5; // partition 5
    d[4..6].copy_from_slice(&k.to_le_bytes());
    d[6] = 1;
    RecordVersion::Live(Record {
        digest: Digest(d),
        set_name: b"s".to_vec(),
        key: None,
        meta: RecordMeta { generation: 1, void_time: 0, last_update_ms: T0 + u64::from(k) },
        bins: vec![Bin::new("v", Value::Blob(vec![k as u8; bytes])).unwrap()],
    })
}

/// A source state machine holding `count` versions of `bytes` bytes each (8 per entry, after a
/// membership entry at index 1), and its snapshot.
async fn source(dir: &Path, opts: SmOptions, count: u16, bytes: usize) -> (Engine, PartitionStateMachine, Snapshot) {
    let engine = Engine::open(engine_config(dir)).unwrap();
    let mut sm = PartitionStateMachine::open(engine.clone(), pid5(), &dir.join("sm"), opts).unwrap();
    let mut entries = vec![Entry::new_membership(lid(1, 1), voters())];
    let versions: Vec<RecordVersion> = (0..count).map(|k| big_version(k, bytes)).collect();
    for (i, chunk) in versions.chunks(8).enumerate() {
        entries.push(normal(2 + i as u64, chunk));
    }
    apply(&mut sm, entries).await;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    (engine, sm, snap)
}

fn receiver(dir: &Path, mb_per_s: u64) -> (Engine, PartitionStateMachine) {
    let engine = Engine::open(engine_config(dir)).unwrap();
    let opts = SmOptions { snapshot_mb_per_s: mb_per_s, ..SmOptions::default() };
    let sm = PartitionStateMachine::open(engine.clone(), pid5(), &dir.join("sm"), opts).unwrap();
    (engine, sm)
}

use crate::state_machine::Snapshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_install_takes_at_least_bytes_over_rate() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    // 128 values of 16 KiB: 2 MiB, so at least 0.25 s at 8 MB/s (less at most 50 ms of burst).
    let (engine_a, a, snap) = source(dir_a.path(), SmOptions::default(), 128, 16 * 1024).await;
    let (engine_b, mut b) = receiver(dir_b.path(), 8);
    let started = Instant::now();
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200), "2 MiB at 8 MB/s took only {took:?}");
    assert_eq!(
        engine_b.partition_versions_async(pid5()).await.unwrap(),
        engine_a.partition_versions_async(pid5()).await.unwrap()
    );
    assert!(b.readable());
    close(engine_b, b);
    close(engine_a, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_install_leaves_the_mark_and_a_later_install_completes() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    // 2 MiB at 1 MB/s: about 2 s, cancelled after 0.2 s.
    let (engine_a, a, snap) = source(dir_a.path(), SmOptions::default(), 128, 16 * 1024).await;
    let want = engine_a.partition_versions_async(pid5()).await.unwrap();
    let (engine_b, mut b) = receiver(dir_b.path(), 1);
    apply(&mut b, vec![normal(1, &[version(1, 99, "divergent")])]).await;
    assert!(b.readable());

    let token = CancelToken::new();
    let (meta, data) = (snap.meta.clone(), snap.snapshot.with_cancel(token.clone()));
    let mut b2 = b.clone();
    let install = tokio::spawn(async move { b2.install_snapshot(&meta, data).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!b.readable(), "not readable while installing");
    token.cancel();
    let cancelled_at = Instant::now();
    let err = install.await.unwrap().unwrap_err();
    let took = cancelled_at.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "{err}");
    assert!(err.to_string().contains("partition 5"), "the error names the partition: {err}");
    // Promptly: well before the ~1.8 s the rest of the transfer would take.
    assert!(took < Duration::from_millis(1500), "the install stopped {took:?} after the cancel");

    // The partition is incomplete and says so: mark kept, not readable, no state reported.
    assert_eq!(engine_b.partition_value(pid5()), vec![2]);
    assert!(!b.readable());
    let partial = engine_b.partition_versions_async(pid5()).await.unwrap();
    assert!(partial.len() < want.len(), "only part was streamed: {} of {}", partial.len(), want.len());
    assert!(b.applied_state().await.is_err());
    assert!(b.get_current_snapshot().await.is_err());
    let items = vec![Ok((normal(2, &[version(2, 1, "x")]), None))];
    assert!(b.apply(futures_util::stream::iter(items)).await.is_err());
    b.persist().await.unwrap();
    assert_eq!(engine_b.partition_value(pid5()), vec![2], "persist keeps the mark");

    // A later install (no cancel) completes normally.
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    assert_eq!(engine_b.partition_versions_async(pid5()).await.unwrap(), want);
    assert!(b.readable());
    assert_eq!(b.applied_state().await.unwrap(), (snap.meta.last_log_id, snap.meta.last_membership.clone()));
    close(engine_b, b);
    let (engine_b, b) = receiver(dir_b.path(), 1);
    assert!(b.readable());
    assert_eq!(engine_b.partition_versions_async(pid5()).await.unwrap(), want);
    close(engine_b, b);
    close(engine_a, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_stream_holds_one_batch_of_at_most_batch_records() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let opts = SmOptions { snapshot_batch_records: 16, ..SmOptions::default() };
    let (engine_a, a, snap) = source(dir_a.path(), opts, 100, 64).await;
    let mut stream = snap.snapshot.stream(0);
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    while let Some(batch) = stream.next_batch().await.unwrap() {
        assert!(batch.len() <= 16, "a batch of {} versions", batch.len());
        sizes.push(batch.len());
        got.extend(batch);
    }
    assert_eq!(sizes, [16, 16, 16, 16, 16, 16, 4]);
    let stats = stream.stats();
    assert_eq!((stats.batches, stats.versions, stats.batch_versions_max), (7, 100, 16));
    assert_eq!(got, engine_a.partition_versions_async(pid5()).await.unwrap());
    assert!(stream.next_batch().await.unwrap().is_none());

    // A cancelled handle's stream fails at once.
    let token = CancelToken::new();
    token.cancel();
    let err = snap.snapshot.with_cancel(token).stream(0).next_batch().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);

    // A stream of a partition that an install then replaces fails instead of mixing the two.
    let (engine_b, mut b) = receiver(dir_b.path(), 0);
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    let served = b.get_current_snapshot().await.unwrap().unwrap();
    let mut from_b = served.snapshot.stream(0);
    assert!(from_b.next_batch().await.unwrap().is_some());
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    let err = from_b.next_batch().await.unwrap_err();
    assert!(err.to_string().contains("install replaced"), "{err}");
    close(engine_b, b);
    close(engine_a, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_partition_is_readable_once_applied_past_what_the_stream_read() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let (engine_a, mut a, snap) = source(dir_a.path(), SmOptions::default(), 8, 64).await;
    assert_eq!(snap.meta.last_log_id, Some(lid(1, 2)));
    // The source moves on after the snapshot; the stream reads its live partition, so it
    // hands out versions of entries 3 and 4 although the snapshot ends at 2.
    let later = vec![normal(3, &[version(1, 3, "a")]), normal(4, &[version(2, 4, "b"), version(1, 5, "a2")])];
    apply(&mut a, later.clone()).await;
    let (engine_b, mut b) = receiver(dir_b.path(), 0);
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    assert_eq!(b.applied_state().await.unwrap().0, Some(lid(1, 2)));
    assert!(!b.readable(), "applied 2, but the partition holds versions of entry 4");
    apply(&mut b, later[..1].to_vec()).await;
    assert!(!b.readable());
    apply(&mut b, later[1..].to_vec()).await;
    assert!(b.readable());
    assert_eq!(
        engine_b.partition_versions_async(pid5()).await.unwrap(),
        engine_a.partition_versions_async(pid5()).await.unwrap()
    );
    close(engine_b, b);
    close(engine_a, a);
}
