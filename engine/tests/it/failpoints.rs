//! Device failures end to end, on the simulated device's failpoints: a device write that fails
//! (an I/O error, a short write) or a failed fdatasync fails the device — every later write is
//! refused with `Error::Failed`, the stats say why — while records already indexed stay
//! readable; after a reopen everything acknowledged as durable is there. A failed metadata
//! write fails its truncation without failing the device.

use std::sync::Arc;

use peregrine_engine::completion::block_on;
use peregrine_engine::io::IoBackendChoice;
use peregrine_engine::io::sim::{self, At, Fault, OpKind, SimDevice};
use peregrine_engine::{BinSelection, Durability, EngineConfig, Error, GenerationPolicy, RecordExists, WritePolicy};
use peregrine_engine::{Change, Engine};

use crate::common::*;

const DEVICE_BYTES: u64 = 16 << 20;

fn sim_config(dir: &TestDir) -> EngineConfig {
    let mut c = config(dir.path(), IoBackendChoice::Simulated, DEVICE_BYTES);
    // Device writes only when a block fills or someone waits for durability.
    c.writer.flush_interval_ms = 0;
    c
}

/// A fresh simulated device for `dir` (registered before the engine opens it).
fn sim_device(dir: &TestDir) -> Arc<SimDevice> {
    sim::device_for_path(device_path(dir.path()), DEVICE_BYTES, sim::DEFAULT_GRANULE)
}

fn put(e: &Engine, k: i64, v: u64, len: usize) -> peregrine_engine::Result<()> {
    let policy = WritePolicy { exists: RecordExists::Replace, ..WritePolicy::default() };
    e.put(&digest(k), b"s", Some(key(k)), bins(k, v, len), &policy).map(|_| ())
}

/// A put that returns once durable (prepare, then apply with `Durability::Device`).
fn durable_put(e: &Engine, k: i64, v: u64, len: usize) -> peregrine_engine::Result<()> {
    let change = Change::Put { set_name: b"s".to_vec(), key: Some(key(k)), bins: bins(k, v, len), void_time: 0 };
    loop {
        let prepared = block_on(e.prepare_async(&digest(k), false, 0, |_| Ok(change.clone())))?;
        if block_on(e.apply_prepared_async(&prepared, Durability::Device))?.is_some() {
            return Ok(());
        }
    }
}

fn assert_failed<T: std::fmt::Debug>(r: peregrine_engine::Result<T>, what: &str) -> String {
    match r {
        Err(Error::Failed { reason, .. }) => reason,
        other => panic!("{what}: expected the device to have failed, got {other:?}"),
    }
}

/// Writes 300 durable records (some on the device, the last ones in the open block) and 20
/// buffered ones; returns the engine.
fn loaded(dir: &TestDir) -> Engine {
    let e = Engine::open(sim_config(dir)).unwrap();
    for k in 0..300 {
        put(&e, k, 1, 900).unwrap();
    }
    block_on(e.barrier()).unwrap();
    for k in 300..320 {
        put(&e, k, 1, 900).unwrap();
    }
    e
}

/// After a failure: the device refuses every write, says why in its stats, serves reads of
/// everything indexed, and closes with the failure; a reopen finds every durable record (and
/// each buffered one whole or not at all), and takes writes again.
fn check_failed_device(dir: &TestDir, e: Engine, reason: &str, what: &str) {
    assert_failed(put(&e, 1000, 1, 100), &format!("{what}: a later put"));
    assert_failed(durable_put(&e, 1001, 1, 100), &format!("{what}: a later durable put"));
    assert_failed(e.delete(&digest(5), GenerationPolicy::None), &format!("{what}: a later delete"));
    assert_failed(block_on(e.barrier()), &format!("{what}: a barrier"));
    let failure = e.stats().devices[0].failure.clone();
    assert!(failure.as_deref().is_some_and(|f| f.contains(reason)), "{what}: stats say {failure:?}");
    for k in 0..320 {
        let got = e.get(&digest(k), &BinSelection::All);
        assert_eq!(got.unwrap().bins, bins(k, 1, 900), "{what}: indexed record {k} unreadable after the failure");
    }
    assert_failed(e.close(), &format!("{what}: close"));
    drop(e);
    let e = Engine::open(sim_config(dir)).unwrap();
    for k in 0..320 {
        match e.get(&digest(k), &BinSelection::All) {
            Ok(r) => assert_eq!(r.bins, bins(k, 1, 900), "{what}: record {k} came back wrong"),
            Err(Error::NotFound) if k >= 300 => {} // buffered, never durable
            other => panic!("{what}: durable record {k} lost: {other:?}"),
        }
    }
    for k in [1000, 1001] {
        assert!(matches!(e.get(&digest(k), &BinSelection::All), Err(Error::NotFound)), "{what}: refused {k} stored");
    }
    durable_put(&e, 2000, 1, 100).unwrap();
    e.close().unwrap();
}

#[test]
fn a_failed_device_write_fails_the_device_but_not_reads_or_durable_data() {
    for (fault, reason) in [(Fault::Error, "simulated I/O error"), (Fault::Short, "simulated short write")] {
        let dir = test_dir();
        let dev = sim_device(&dir);
        let e = loaded(&dir);
        // The next device write is the flush of the open block a durable put waits for.
        dev.arm(At::Write(0), fault);
        let r = durable_put(&e, 320, 1, 900);
        assert!(!dev.is_cut());
        let why = assert_failed(r, &format!("{fault:?}: the durable put"));
        assert!(why.contains(reason), "{fault:?}: {why}");
        check_failed_device(&dir, e, reason, &format!("{fault:?}"));
    }
}

/// The same when the block that fails is a full one written in the background (no caller
/// waiting): the failure is found by the next write that needs the device.
#[test]
fn a_failed_background_block_write_fails_the_device() {
    let dir = test_dir();
    let dev = sim_device(&dir);
    let e = loaded(&dir);
    dev.arm(At::Write(0), Fault::Error);
    let writes = dev.writes();
    // Fill the open block so it is sealed and written by the flusher.
    let mut k = 320;
    while dev.writes() == writes {
        match put(&e, k, 1, 900) {
            Ok(()) => k += 1,
            Err(Error::Failed { .. }) => break, // the flusher was quicker than this check
            Err(err) => panic!("put {k}: {err}"),
        }
        assert!(k < 1000, "the block never filled");
    }
    // The flusher records the failure right after the write returns.
    let started = std::time::Instant::now();
    while e.stats().devices[0].failure.is_none() {
        assert!(started.elapsed().as_secs() < 5, "the failure was not recorded");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    check_failed_device_after_background(&dir, e, k);
}

fn check_failed_device_after_background(dir: &TestDir, e: Engine, written: i64) {
    assert_failed(put(&e, 5000, 1, 100), "a put after the background failure");
    assert_failed(block_on(e.barrier()), "a barrier after the background failure");
    for k in 0..written {
        assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, 1, 900), "record {k}");
    }
    assert_failed(e.close(), "close");
    drop(e);
    let e = Engine::open(sim_config(dir)).unwrap();
    for k in 0..300 {
        assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, 1, 900), "durable record {k}");
    }
    e.close().unwrap();
}

/// A failed fdatasync: the durable put waiting for it fails and the device refuses writes
/// (retrying the sync could report data durable that the kernel dropped).
#[test]
fn a_failed_sync_fails_the_device() {
    // The sync comes after the write(s) of the flush; which operation that is depends on the
    // block's state, so try the next few operations until the failpoint hits a sync.
    for n in 0..6 {
        let dir = test_dir();
        let dev = sim_device(&dir);
        let e = loaded(&dir);
        dev.set_tracing(true);
        dev.arm(At::Op(n), Fault::Error);
        let r = durable_put(&e, 320, 1, 900);
        let trace = dev.trace();
        let Some(hit) = trace.iter().find(|o| o.fault.is_some()) else {
            panic!("op {n} from now was never issued: {trace:?}")
        };
        if hit.kind != OpKind::Sync {
            continue;
        }
        assert_failed(r, "the durable put whose sync failed");
        check_failed_device(&dir, e, "simulated I/O error", "failed sync");
        return;
    }
    panic!("no sync among the first operations of a durable put");
}

/// A failed metadata write fails the truncation that needed it (nothing was removed, and a
/// restart shows everything), without failing the device; a later truncation works.
#[test]
fn a_failed_metadata_write_fails_only_the_truncation() {
    let dir = test_dir();
    let dev = sim_device(&dir);
    let e = loaded(&dir);
    block_on(e.barrier()).unwrap();
    dev.arm(At::Write(0), Fault::Error);
    let r = block_on(e.truncate(Some(b"s"), None));
    assert!(matches!(r, Err(Error::Failed { .. })), "truncate with a failing metadata write: {r:?}");
    assert_eq!(e.stats().devices[0].failure, None, "a metadata write failure failed the data path");
    // The truncation did not happen: the session shows what a restart shows.
    assert_eq!(e.get(&digest(7), &BinSelection::All).unwrap().bins, bins(7, 1, 900), "hidden by a failed truncation");
    let pid = digest(7).partition();
    dev.arm(At::Write(0), Fault::Error);
    assert!(block_on(e.truncate_partition(pid)).is_err());
    assert_eq!(
        e.get(&digest(7), &BinSelection::All).unwrap().bins,
        bins(7, 1, 900),
        "hidden by a failed partition truncation"
    );
    assert_eq!(e.partition_epoch(pid), 0);
    durable_put(&e, 400, 2, 100).unwrap();
    assert_eq!(e.get(&digest(400), &BinSelection::All).unwrap().bins, bins(400, 2, 100));
    e.close().unwrap();
    drop(e);
    let e = Engine::open(sim_config(&dir)).unwrap();
    for k in 0..320 {
        assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, 1, 900), "record {k}");
    }
    assert_eq!(block_on(e.truncate(Some(b"s"), None)).unwrap(), 321);
    e.close().unwrap();
    drop(e);
    let e = Engine::open(sim_config(&dir)).unwrap();
    assert!(matches!(e.get(&digest(7), &BinSelection::All), Err(Error::NotFound)));
    e.close().unwrap();
}
