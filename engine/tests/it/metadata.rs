//! The metadata region: per-partition values written after a durability point, truncation of a
//! partition, a set or the namespace that never comes back (defrag-moved copies included), and
//! the format-1 fixture that opens and upgrades.

use std::sync::Arc;

use peregrine_engine::clock::{Clock, ManualClock};
use peregrine_engine::completion::block_on;
use peregrine_engine::format::device_header;
use peregrine_engine::io::{IoBackendChoice, sim};
use peregrine_engine::{BinSelection, Digest, Engine, EngineConfig, Error, KeyRef, Value, WritePolicy};

use crate::common::*;

const T0: u64 = 1_800_000_000_000;

fn present(e: &Engine, d: &Digest) -> bool {
    match e.get(d, &BinSelection::All) {
        Ok(_) => true,
        Err(Error::NotFound) => false,
        Err(err) => panic!("read failed: {err}"),
    }
}

fn put(e: &Engine, k: i64, v: u64) {
    e.put(&digest(k), b"s", Some(key(k)), bins(k, v, 300), &WritePolicy::default()).unwrap();
}

/// A partition value reaches the device only after the writes before it: a power cut right
/// after the value was made durable finds both.
#[test]
fn partition_values_are_durable_after_the_writes_before_them() {
    let dir = test_dir();
    let mut cfg = config(dir.path(), IoBackendChoice::Simulated, 16 << 20);
    cfg.writer.flush_interval_ms = 0;
    let e = Engine::open(cfg.clone()).unwrap();
    let dev = sim::lookup(device_path(dir.path())).unwrap();
    put(&e, 1, 1);
    let pid = digest(1).partition();
    let other = peregrine_engine::PartitionId::new(4095).unwrap();
    block_on(e.set_partition_values(vec![(pid, b"applied=17".to_vec()), (other, vec![0xFF; 27])])).unwrap();
    assert!(block_on(e.set_partition_values(vec![(pid, vec![0; 28])])).is_err(), "values are at most 27 bytes");
    let image = dev.crash_image_synced_only();
    drop(e);
    dev.restore_from(&image);
    let e = Engine::open(cfg.clone()).unwrap();
    assert_eq!(e.partition_value(pid), b"applied=17");
    assert_eq!(e.partition_value(other), vec![0xFF; 27]);
    assert!(present(&e, &digest(1)), "the write before the value is durable with it");
    e.close().unwrap();
    sim::remove(device_path(dir.path()));
}

#[test]
fn truncating_a_partition_removes_it_all_and_keeps_later_writes() {
    for backend in BACKENDS {
        let dir = test_dir();
        let cfg = config(dir.path(), backend, 16 << 20);
        let e = Engine::open(cfg.clone()).unwrap();
        let pid = digest(0).partition();
        let mine: Vec<i64> = (0..400_000).filter(|k| digest(*k).partition() == pid).take(20).collect();
        for &k in &mine {
            put(&e, k, 1);
        }
        e.delete(&digest(mine[0]), peregrine_engine::GenerationPolicy::None).unwrap();
        for k in 0..50 {
            put(&e, -k - 1, 1); // other partitions
        }
        let epoch = e.partition_epoch(pid);
        let removed = block_on(e.truncate_partition(pid)).unwrap();
        assert_eq!(removed, 20, "{backend:?}: 19 records and a tombstone");
        assert_eq!(e.partition_epoch(pid), epoch + 1);
        assert!(mine.iter().all(|k| !present(&e, &digest(*k))));
        put(&e, mine[1], 2); // after the truncation: kept
        e.close().unwrap();
        let e = Engine::open(cfg.clone()).unwrap();
        assert_eq!(
            e.get(&digest(mine[1]), &BinSelection::All).unwrap().bin("v"),
            Some(&Value::Blob(value_bytes(mine[1], 2, 300)))
        );
        for &k in &mine[2..] {
            assert!(!present(&e, &digest(k)), "{backend:?}: truncated key {k} came back");
        }
        for k in 0..50 {
            assert!(present(&e, &digest(-k - 1)), "other partitions are untouched");
        }
        assert_eq!(e.stats().records, 51);
        e.close().unwrap();
    }
}

/// Records defrag moved before the truncation carry the old epoch and stay dead.
#[test]
fn truncated_records_that_defrag_moved_never_come_back() {
    let dir = test_dir();
    let mut cfg = config(dir.path(), IoBackendChoice::Uring, (1 << 20) + 24 * u64::from(TEST_BLOCK_BYTES));
    cfg.defrag_sleep_us = 0;
    let e = Engine::open(cfg.clone()).unwrap();
    let pid = digest(0).partition();
    let mine: Vec<i64> = (0..400_000).filter(|k| digest(*k).partition() == pid).take(10).collect();
    for &k in &mine {
        put(&e, k, 1);
    }
    let location = |k: i64| e.index().get(&digest(k)).unwrap().location;
    let first: Vec<_> = mine.iter().map(|&k| location(k)).collect();
    // Churn other keys so the blocks holding the partition's records go below the low-water
    // mark and defrag moves every one of them.
    let mut round = 0;
    while mine.iter().zip(&first).any(|(&k, at)| location(k) == *at) {
        round += 1;
        assert!(round < 500, "defrag never moved the partition's records");
        for k in 0..100 {
            put(&e, 1_000_000 + k, round);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    e.flush().unwrap();
    block_on(e.truncate_partition(pid)).unwrap();
    e.close().unwrap();
    let e = Engine::open(cfg).unwrap();
    for &k in &mine {
        assert!(!present(&e, &digest(k)), "truncated key {k} came back");
    }
    assert!(e.recovery_report()[0].records_truncated >= mine.len() as u64);
    e.close().unwrap();
}

#[test]
fn truncating_a_set_or_the_namespace_by_last_update_time() {
    for backend in BACKENDS {
        let dir = test_dir();
        let clock = Arc::new(ManualClock::new(T0));
        let cfg = config_with_clock(dir.path(), backend, 16 << 20, clock.clone());
        let e = Engine::open(cfg.clone()).unwrap();
        let da = |k: i64| Digest::of_key(b"a", KeyRef::Int(k));
        let db = |k: i64| Digest::of_key(b"b", KeyRef::Int(k));
        let wa = |k: i64| e.put(&da(k), b"a", None, bins(k, 0, 100), &WritePolicy::default()).unwrap();
        let wb = |k: i64| e.put(&db(k), b"b", None, bins(k, 0, 100), &WritePolicy::default()).unwrap();
        for k in 0..10 {
            wa(k);
            wb(k);
        }
        clock.advance_ms(1000);
        let cutoff = clock.now_unix_ms();
        for k in 10..20 {
            wa(k);
        }
        clock.advance_ms(1000);
        assert!(block_on(e.truncate(Some(b"a"), Some(cutoff + 10_000))).is_err(), "a cutoff in the future");
        let removed = block_on(e.truncate(Some(b"a"), Some(cutoff - 1))).unwrap();
        assert_eq!(removed, 10, "{backend:?}");
        assert!((0..10).all(|k| !present(&e, &da(k))) && (10..20).all(|k| present(&e, &da(k))));
        assert!((0..10).all(|k| present(&e, &db(k))), "set b is untouched");
        // A write at the cutoff's millisecond (the clock is not advanced) is still kept.
        let now_cut = block_on(e.truncate(Some(b"a"), None)).unwrap();
        assert_eq!(now_cut, 10);
        wa(0);
        e.close().unwrap();
        let e = Engine::open(cfg.clone()).unwrap();
        assert!(present(&e, &da(0)), "{backend:?}: written after the truncation");
        assert!((1..20).all(|k| !present(&e, &da(k))), "{backend:?}: truncated records came back");
        assert!((0..10).all(|k| present(&e, &db(k))));
        // The namespace: everything up to now goes; later writes stay.
        clock.advance_ms(5);
        let all = block_on(e.truncate(None, None)).unwrap();
        assert_eq!(all, 11);
        e.put(&db(99), b"b", None, bins(99, 0, 100), &WritePolicy::default()).unwrap();
        e.close().unwrap();
        let e = Engine::open(cfg).unwrap();
        assert_eq!(e.stats().records, 1);
        assert!(present(&e, &db(99)));
        e.close().unwrap();
    }
}

/// A device written by the last format-1 engine opens with today's engine (which upgrades it
/// to format 2 in place) and reads back every record as it was written.
#[test]
fn format_1_fixture_opens_upgrades_and_reads_back() {
    let dir = test_dir();
    let path = dir.path().join("v1.dat");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-v1.dat"), &path).unwrap();
    let header = |p: &std::path::Path| {
        let bytes = std::fs::read(p).unwrap();
        device_header::choose_slot(&bytes[..8192]).unwrap().0
    };
    assert_eq!(header(&path).format_version, 1);
    let mut cfg = EngineConfig::single_file("test", &path, (1 << 20) + 8 * 128 * 1024);
    cfg.write_block_bytes = 128 * 1024;
    cfg.max_record_bytes = 64 * 1024;
    for round in 0..2 {
        let e = Engine::open(cfg.clone()).unwrap();
        for k in 0..100i64 {
            let set: &[u8] = if k % 2 == 0 { b"even" } else { b"odd" };
            let d = Digest::of_key(set, KeyRef::Int(k));
            let got = e.get(&d, &BinSelection::All);
            if k >= 90 {
                assert!(matches!(got, Err(Error::NotFound)), "round {round}: deleted key {k} is back");
                continue;
            }
            let r = got.unwrap_or_else(|err| panic!("round {round}: key {k}: {err}"));
            assert_eq!(r.set_name, set);
            assert_eq!(r.key, Some(key(k)));
            let n = if k < 10 { k + 1000 } else { k };
            assert_eq!(r.bin("n"), Some(&Value::Int(n)));
            assert_eq!(r.bin("s"), Some(&Value::String(format!("value-{k}").into_bytes())));
            assert_eq!(r.meta.generation, if k < 10 { 2 } else { 1 });
            assert_eq!(r.meta.void_time != 0, k % 10 == 0, "key {k} TTL");
        }
        assert_eq!(e.stats().records, 90);
        e.close().unwrap();
        assert_eq!(header(&path).format_version, device_header::FORMAT_VERSION, "upgraded in place");
    }
}
