//! The engine as a replication state machine: prepare and apply apart, the monotonic and
//! validated replica apply, durability per call and the barrier, space a replica is entitled
//! to, snapshot cursors, and maintenance the caller drives.

use std::sync::Arc;

use peregrine_engine::clock::{CITRUSLEAF_EPOCH_UNIX_S, ManualClock};
use peregrine_engine::completion::block_on;
use peregrine_engine::io::{IoBackendChoice, sim};
use peregrine_engine::{
    Applied, ApplyOutcome, BinSelection, Change, Digest, Durability, Engine, Error, MaintenanceMode, Record,
    RecordMeta, RecordVersion, SnapshotCursor, Ttl, Value, WritePolicy,
};

use crate::common::*;

fn live(k: i64, v: u64, generation: u16, lut: u64) -> RecordVersion {
    RecordVersion::Live(Record {
        digest: digest(k),
        set_name: b"s".to_vec(),
        key: Some(key(k)),
        meta: RecordMeta { generation, void_time: 0, last_update_ms: lut },
        bins: bins(k, v, 100),
    })
}

fn tombstone(k: i64, generation: u16, lut: u64) -> RecordVersion {
    RecordVersion::Tombstone {
        digest: digest(k),
        set_name: b"s".to_vec(),
        meta: RecordMeta { generation, void_time: 0, last_update_ms: lut },
    }
}

fn value_of(e: &Engine, k: i64) -> Option<Vec<u8>> {
    match e.get(&digest(k), &BinSelection::All) {
        Ok(r) => match r.bin("v") {
            Some(Value::Blob(b)) => Some(b.clone()),
            other => panic!("unexpected bin {other:?}"),
        },
        Err(Error::NotFound) => None,
        Err(e) => panic!("read failed: {e}"),
    }
}

const T0: u64 = 1_800_000_000_000;

#[test]
fn prepare_then_apply_is_what_modify_does() {
    for backend in BACKENDS {
        let dir = test_dir();
        let clock = Arc::new(ManualClock::new(T0));
        let e = Engine::open(config_with_clock(dir.path(), backend, 16 << 20, clock.clone())).unwrap();
        let put = |existing: Option<peregrine_engine::Existing<'_>>| {
            let generation = existing.map_or(0, |x| x.meta.generation);
            Ok(Change::Put {
                set_name: b"s".to_vec(),
                key: Some(key(1)),
                bins: bins(1, u64::from(generation), 50),
                void_time: 0,
            })
        };
        let prepared = block_on(e.prepare_async(&digest(1), false, 0, put)).unwrap();
        let Some(RecordVersion::Live(r)) = &prepared.version else { panic!("{prepared:?}") };
        assert_eq!(r.meta, RecordMeta { generation: 1, void_time: 0, last_update_ms: T0 });
        assert_eq!(prepared.applied, Applied::Written(r.meta));
        assert_eq!(prepared.expected, None);
        // Nothing is stored before the apply step.
        assert_eq!(value_of(&e, 1), None);
        let applied = block_on(e.apply_prepared_async(&prepared, Durability::Buffered)).unwrap();
        assert_eq!(applied, Some(prepared.applied));
        assert_eq!(value_of(&e, 1), Some(value_bytes(1, 0, 50)));
        // The same decision applied again finds the record changed: prepare again.
        assert_eq!(block_on(e.apply_prepared_async(&prepared, Durability::Buffered)).unwrap(), None);
        // A floor above the clock lifts the last-update time (the leader keeps versions of a
        // partition rising in log order whatever its clock says); the generation follows.
        let floored = block_on(e.prepare_async(&digest(1), false, T0 + 5_000, put)).unwrap();
        assert_eq!(floored.version.as_ref().unwrap().meta().last_update_ms, T0 + 5_000);
        assert_eq!(floored.version.as_ref().unwrap().meta().generation, 2);
        // The clock going backwards never makes a version older than the one indexed.
        let behind = block_on(e.prepare_async(&digest(1), false, 0, put)).unwrap();
        assert_eq!(behind.version.as_ref().unwrap().meta().last_update_ms, T0 + 1);
        // A policy failure is the prepare step's answer; nothing to log.
        let refused =
            block_on(e.prepare_async(&digest(1), false, 0, |_| Err::<Change, _>(Error::RecordExists))).unwrap_err();
        assert!(matches!(refused, Error::RecordExists));
        // modify_async (prepare + apply) behaves as before.
        let out = block_on(e.modify_async(&digest(1), false, |_| Ok(Change::Delete))).unwrap();
        assert_eq!(out, Applied::Deleted);
        assert_eq!(value_of(&e, 1), None);
        e.close().unwrap();
    }
}

/// Before: `apply_version` replaced whatever the index held, so an older version applied after
/// a newer one won in the index while a cold start brought the newer one back.
#[test]
fn replica_apply_is_monotonic_and_replaying_it_changes_nothing() {
    for backend in BACKENDS {
        let dir = test_dir();
        let cfg = config(dir.path(), backend, 16 << 20);
        let e = Engine::open(cfg.clone()).unwrap();
        let log = vec![live(1, 1, 1, T0), live(2, 1, 1, T0 + 1), live(1, 2, 2, T0 + 2), tombstone(2, 2, T0 + 3)];
        let out = block_on(e.apply_versions_async(&log, Durability::Buffered)).unwrap();
        assert_eq!(out, vec![ApplyOutcome::Applied; 4]);
        // An older version arriving late is stale and changes nothing.
        let late = block_on(e.apply_versions_async(&[live(1, 1, 1, T0), live(2, 9, 1, T0 + 1)], Durability::Buffered))
            .unwrap();
        assert_eq!(late, vec![ApplyOutcome::Stale, ApplyOutcome::Stale]);
        assert_eq!(value_of(&e, 1), Some(value_bytes(1, 2, 100)));
        assert_eq!(value_of(&e, 2), None);
        let appended = e.stats().devices[0].appended_bytes;
        assert_eq!(e.stats().replica_stale, 2);
        e.close().unwrap();
        let e = Engine::open(cfg.clone()).unwrap();
        assert_eq!(value_of(&e, 1), Some(value_bytes(1, 2, 100)), "{backend:?}: newest survives restart");
        assert_eq!(value_of(&e, 2), None, "{backend:?}: the delete survives restart");
        // Replaying the whole log after a restart: every entry is stale, nothing is appended.
        let replay = block_on(e.apply_versions_async(&log, Durability::Buffered)).unwrap();
        assert_eq!(replay, vec![ApplyOutcome::Stale; 4]);
        assert_eq!(e.stats().devices[0].appended_bytes, 0, "a replay appends nothing (was {appended} before)");
        e.close().unwrap();
    }
}

/// Before: encode accepted versions the parser refuses (generation 0, an integer that is not
/// 8 bytes), and `apply_version` appended them before the index's assertion panicked.
#[test]
fn invalid_replicated_versions_are_refused_before_any_byte_is_appended() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        let RecordVersion::Live(mut bad_int) = live(3, 1, 1, T0) else { unreachable!() };
        bad_int.bins[0].value = Value::Other { particle_type: 1, bytes: vec![1, 2, 3] };
        for bad in [live(2, 1, 0, T0), tombstone(2, 0, T0), RecordVersion::Live(bad_int)] {
            let batch = [live(1, 1, 1, T0), bad];
            let err = block_on(e.apply_versions_async(&batch, Durability::Buffered)).unwrap_err();
            assert!(matches!(err, Error::Parameter(_)), "{err}");
            assert_eq!(e.stats().devices[0].appended_bytes, 0, "{backend:?}: nothing of a refused batch is written");
            assert_eq!(value_of(&e, 1), None);
        }
        e.close().unwrap();
    }
}

/// Durability is chosen per call, not per namespace (this engine has no commit_to_device):
/// what a `Durability::Device` apply or a barrier covered survives a power cut.
#[test]
fn durability_per_call_and_the_barrier_survive_a_power_cut() {
    let dir = test_dir();
    let mut cfg = config(dir.path(), IoBackendChoice::Simulated, 16 << 20);
    cfg.writer.flush_interval_ms = 0; // nothing reaches the device unless asked
    assert!(!cfg.commit_to_device);
    let e = Engine::open(cfg.clone()).unwrap();
    let dev = sim::lookup(device_path(dir.path())).unwrap();
    block_on(e.apply_versions_async(&[live(1, 1, 1, T0)], Durability::Device)).unwrap();
    block_on(e.apply_versions_async(&[live(2, 1, 1, T0)], Durability::Buffered)).unwrap();
    block_on(e.apply_versions_async(&[live(3, 1, 1, T0)], Durability::Buffered)).unwrap();
    block_on(e.barrier()).unwrap();
    block_on(e.apply_versions_async(&[live(4, 1, 1, T0)], Durability::Buffered)).unwrap();
    let image = dev.crash_image_synced_only();
    drop(e); // a clean close would flush key 4: the crash image was taken before
    dev.restore_from(&image);
    let e = Engine::open(cfg).unwrap();
    for k in 1..=3 {
        assert_eq!(value_of(&e, k), Some(value_bytes(k, 1, 100)), "key {k} was covered by a durability point");
    }
    assert_eq!(value_of(&e, 4), None, "key 4 was never made durable before the cut");
    e.close().unwrap();
    sim::remove(device_path(dir.path()));
}

/// A replica takes committed entries into the space below stop-writes (its peers may have taken
/// them already); only a truly full device refuses, loudly.
#[test]
fn replicas_write_below_stop_writes_and_refuse_loudly_when_truly_full() {
    for backend in BACKENDS {
        let dir = test_dir();
        let mut cfg = config(dir.path(), backend, (1 << 20) + 40 * u64::from(TEST_BLOCK_BYTES));
        cfg.stop_writes_avail_pct = 25;
        cfg.defrag_wait_ms = 50;
        let e = Engine::open(cfg).unwrap();
        let put = |k: i64| e.put(&digest(k), b"s", None, bins(k, 0, 21_000), &WritePolicy::default());
        let mut k = 0;
        let stopped_at = loop {
            match put(k) {
                Ok(_) => k += 1,
                Err(Error::DeviceFull(_)) => break k,
                Err(other) => panic!("{other}"),
            }
        };
        assert!(e.stop_writes());
        // Replicated versions keep going past stop-writes...
        let mut lut = T0;
        let mut applied = 0;
        let refusal = loop {
            lut += 1;
            let v = RecordVersion::Live(Record {
                digest: digest(100_000 + applied),
                set_name: b"s".to_vec(),
                key: None,
                meta: RecordMeta { generation: 1, void_time: 0, last_update_ms: lut },
                bins: bins(applied, 0, 21_000),
            });
            match block_on(e.apply_versions_async(&[v], Durability::Buffered)) {
                Ok(out) => {
                    assert_eq!(out, vec![ApplyOutcome::Applied]);
                    applied += 1;
                }
                Err(err) => break err,
            }
        };
        assert!(applied > 20, "{backend:?}: only {applied} replicated versions after stop-writes at {stopped_at}");
        // ... until the device is truly full: refused, counted, and the replica says so.
        assert!(matches!(refusal, Error::DeviceFull(_)), "{refusal}");
        assert!(e.replica_full());
        let stats = e.stats();
        assert!(stats.replica_full && stats.replica_refused_full >= 1);
        assert_eq!(stats.replica_applied, applied as u64);
        drop(e);
    }
}

#[test]
fn snapshot_cursor_streams_a_partition_in_digest_order_with_tombstones_and_resumes() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 64 << 20)).unwrap();
        let pid = digest(0).partition();
        let mine: Vec<i64> = (0..400_000).filter(|k| digest(*k).partition() == pid).take(60).collect();
        let mut lut = T0;
        for (i, k) in mine.iter().enumerate() {
            lut += 1;
            let v = if i % 5 == 0 { tombstone(*k, 1, lut) } else { live(*k, 1, 1, lut) };
            block_on(e.apply_versions_async(&[v], Durability::Buffered)).unwrap();
        }
        // Another partition's records never appear.
        e.put(&digest(-1), b"s", None, bins(-1, 0, 10), &WritePolicy::default()).unwrap();
        let mut expected: Vec<Digest> = mine.iter().map(|k| digest(*k)).collect();
        expected.sort();
        let mut cursor = SnapshotCursor::new(pid, 7);
        let mut seen = Vec::new();
        let mut tombstones = 0;
        while let Some(batch) = block_on(e.snapshot_next(&mut cursor)).unwrap() {
            assert!(batch.len() <= 7);
            for v in batch {
                tombstones += usize::from(matches!(v, RecordVersion::Tombstone { .. }));
                seen.push(*v.digest());
            }
            if seen.len() == 21 {
                // Resume from the saved position with a fresh cursor.
                cursor = SnapshotCursor::resume(pid, cursor.after, 7);
            }
        }
        assert!(cursor.is_done());
        assert_eq!(seen, expected, "{backend:?}: every version once, in digest order");
        assert_eq!(tombstones, 12);
        let all = block_on(e.partition_versions_async(pid)).unwrap();
        assert_eq!(all.len(), 60);
        e.close().unwrap();
    }
}

/// In external mode expiry and eviction write nothing: candidates go to the caller, which
/// deletes them through its log; expired records still read as not found.
#[test]
fn external_maintenance_hands_candidates_to_the_caller_and_writes_nothing() {
    for backend in BACKENDS {
        let dir = test_dir();
        let clock = Arc::new(ManualClock::new((CITRUSLEAF_EPOCH_UNIX_S + 1_000_000) * 1000));
        let mut cfg = config_with_clock(dir.path(), backend, 16 << 20, clock.clone());
        cfg.maintenance = MaintenanceMode::External;
        cfg.expiry_period_s = 1;
        cfg.evict_used_pct = 1;
        let e = Engine::open(cfg).unwrap();
        for k in 0..50 {
            let ttl = if k < 20 {
                Ttl::Seconds(10)
            } else if k < 40 {
                Ttl::Seconds(1000)
            } else {
                Ttl::Never
            };
            e.put(&digest(k), b"s", None, bins(k, 0, 5000), &WritePolicy { ttl, ..WritePolicy::default() }).unwrap();
        }
        clock.advance_ms(20_000);
        std::thread::sleep(std::time::Duration::from_millis(2500)); // two maintenance ticks
        let stats = e.stats();
        assert_eq!(stats.records, 50, "{backend:?}: nothing removed by the engine");
        assert_eq!(stats.expired + stats.evicted, 0);
        assert_eq!(value_of(&e, 3), None, "expired reads as not found");
        let mut expired: Vec<Digest> = e.expiry_candidates(1000).into_iter().map(|(d, _)| d).collect();
        expired.sort();
        let mut want: Vec<Digest> = (0..20).map(digest).collect();
        want.sort();
        assert_eq!(expired, want);
        assert_eq!(e.expiry_candidates(5).len(), 5);
        // Over the eviction mark: the soonest-to-expire live records, never those without TTL.
        let evict = e.eviction_candidates(1000);
        assert!(!evict.is_empty());
        for (d, meta) in &evict {
            assert!(meta.void_time != 0 && (20..40).any(|k| digest(k) == *d), "{d}");
        }
        // The caller deletes a candidate through its own (here: direct) apply.
        let gone = block_on(e.modify_async(&digest(25), false, |_| Ok(Change::Delete))).unwrap();
        assert_eq!(gone, Applied::Deleted);
        e.close().unwrap();
    }
}

/// Before: a panicking flusher left `close` waiting forever for it, and later calls ran
/// against a device nobody flushed.
#[test]
fn a_dying_flusher_poisons_the_engine_and_close_returns() {
    let dir = test_dir();
    let cfg = config(dir.path(), IoBackendChoice::Simulated, 16 << 20);
    let e = Engine::open(cfg).unwrap();
    e.put(&digest(1), b"s", None, bins(1, 0, 100), &WritePolicy::default()).unwrap();
    let dev = sim::lookup(device_path(dir.path())).unwrap();
    dev.arm(sim::At::Write(0), sim::Fault::Panic);
    let flushed = e.flush();
    assert!(flushed.is_err(), "a flush through a dead flusher cannot succeed");
    let err = e.get(&digest(1), &BinSelection::All).unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)), "{err}");
    assert!(err.to_string().contains("flusher"), "{err}");
    assert!(e.stats().poisoned.is_some());
    let started = std::time::Instant::now();
    let closed = e.close();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(closed.is_err(), "close reports the failure");
    sim::remove(device_path(dir.path()));
}

/// Before: every set name met during the cold start took an id, even names only superseded
/// copies carried, so more than 4095 names over a device's history failed the open.
#[test]
fn set_names_beyond_the_id_space_over_history_still_open() {
    let dir = test_dir();
    let cfg = config(dir.path(), IoBackendChoice::Uring, 64 << 20);
    let d = |k: i64| Digest::of_key(b"x", peregrine_engine::KeyRef::Int(k));
    let e = Engine::open(cfg.clone()).unwrap();
    // 3000 names, each then superseded by a version in set "z" (replicated versions carry
    // their own set name).
    let mut lut = T0;
    for k in 0..3000 {
        lut += 1;
        let mut v = live(0, 0, 1, lut);
        if let RecordVersion::Live(r) = &mut v {
            r.digest = d(k);
            r.set_name = format!("a{k}").into_bytes();
        }
        block_on(e.apply_versions_async(&[v], Durability::Buffered)).unwrap();
    }
    for k in 0..3000 {
        lut += 1;
        let mut v = live(0, 1, 2, lut);
        if let RecordVersion::Live(r) = &mut v {
            r.digest = d(k);
            r.set_name = b"z".to_vec();
        }
        block_on(e.apply_versions_async(&[v], Durability::Buffered)).unwrap();
    }
    e.close().unwrap();
    // After the restart only "z" is in use, so 2000 new names fit.
    let e = Engine::open(cfg.clone()).unwrap();
    assert_eq!(e.sets().len(), 1, "ids of superseded names are given back at open");
    for k in 0..2000 {
        let name = format!("b{k}").into_bytes();
        e.put(&d(10_000 + k), &name, None, bins(k, 0, 10), &WritePolicy::default()).unwrap();
    }
    e.close().unwrap();
    // The device's history now holds 5001 names; the open reclaims as it goes.
    let e = Engine::open(cfg).unwrap();
    assert_eq!(e.sets().len(), 2001);
    assert_eq!(e.get(&d(7), &BinSelection::All).unwrap().set_name, b"z");
    assert_eq!(e.get(&d(10_007), &BinSelection::All).unwrap().set_name, b"b7");
    e.close().unwrap();
}
