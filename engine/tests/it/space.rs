//! Space management: defragmentation under overwrite churn, device full and recovery from it,
//! expiry and eviction, tombstones that do not pile up, back-pressure. Both backends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use peregrine_engine::clock::{CITRUSLEAF_EPOCH_UNIX_S, ManualClock};
use peregrine_engine::{BinSelection, Engine, EngineConfig, Error, GenerationPolicy, Ttl, WritePolicy};

use crate::common::*;

/// Writes, retrying while the device is full or overloaded (defrag is catching up); returns
/// how many retries it took.
fn put_retrying(e: &Engine, k: i64, v: u64, len: usize) -> u64 {
    let started = Instant::now();
    let mut retries = 0;
    loop {
        match e.put(&digest(k), b"s", None, bins(k, v, len), &WritePolicy::default()) {
            Ok(_) => return retries,
            Err(Error::DeviceFull(_) | Error::DeviceOverload(_)) => {
                retries += 1;
                assert!(started.elapsed() < Duration::from_secs(30), "writes never resumed");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(err) => panic!("put failed: {err}"),
        }
    }
}

/// The whole device as it is now (the file, or the simulated device's live image).
fn device_image(dir: &std::path::Path, backend: peregrine_engine::io::IoBackendChoice) -> Vec<u8> {
    match backend {
        peregrine_engine::io::IoBackendChoice::Simulated => {
            peregrine_engine::io::sim::lookup(device_path(dir)).unwrap().live_image()
        }
        _ => std::fs::read(device_path(dir)).unwrap(),
    }
}

/// For every digest with a live (not tombstone) copy anywhere on the device image, the oldest
/// such copy's last-update time: what recovery could still find.
fn older_live_copies(image: &[u8]) -> std::collections::HashMap<peregrine_engine::Digest, u64> {
    use peregrine_engine::format::block_header::BlockHeader;
    use peregrine_engine::format::{DATA_OFFSET_BYTES, device_header};
    let (header, _) = device_header::choose_slot(&image[..8192]).unwrap();
    let mut out = std::collections::HashMap::new();
    for b in 0..u64::from(header.block_count) {
        let start = (DATA_OFFSET_BYTES + b * u64::from(header.write_block_bytes)) as usize;
        let bytes = &image[start..start + header.write_block_bytes as usize];
        let Some(h) = BlockHeader::decode(bytes).filter(|h| h.device_set_id == header.device_set_id) else {
            continue;
        };
        peregrine_engine::scan::scan_block(bytes, &h, |_, v| {
            if !v.is_tombstone() {
                let lut = v.meta().last_update_ms;
                let slot = out.entry(v.digest()).or_insert(lut);
                *slot = (*slot).min(lut);
            }
        });
    }
    out
}

fn small(dir: &std::path::Path, backend: peregrine_engine::io::IoBackendChoice, size: u64) -> EngineConfig {
    let mut c = config(dir, backend, size);
    c.defrag_sleep_us = 0;
    c
}

/// Overwrite a key set filling half the device, for ten times the device size: space stays
/// bounded, every key keeps its latest value (also after a restart), and defrag's extra writes
/// stay near the theoretical 1 / (1 - lwm).
#[test]
fn overwrite_churn_at_half_fill_stays_bounded() {
    overwrite_churn(50, 10, 3.0);
}

/// The same (for four times the device size) at three-quarters fill, where no block falls below the 50 % low-water mark before
/// free space runs out: urgent defrag must take fuller blocks, or writes would stop for good.
#[test]
fn overwrite_churn_at_three_quarters_fill_keeps_writing() {
    overwrite_churn(75, 4, 5.0);
}

/// Overwrites `device_passes` times the device size at `fill_pct`.
fn overwrite_churn(fill_pct: u64, device_passes: u64, max_record_write_amplification: f64) {
    for backend in BACKENDS {
        let dir = test_dir();
        let size: u64 = 16 << 20;
        let cfg = small(dir.path(), backend, size);
        let e = Engine::open(cfg.clone()).unwrap();
        let value_len = 1000;
        let keys = (size * fill_pct / 100 / 1100) as i64;
        let mut latest = vec![0u64; keys as usize];
        let mut rng = Rng(3);
        let mut retries = 0;
        for k in 0..keys {
            retries += put_retrying(&e, k, 0, value_len);
        }
        let writes = device_passes * size / 1100;
        for v in 1..=writes {
            let k = rng.below(keys as u64) as i64;
            retries += put_retrying(&e, k, v, value_len);
            latest[k as usize] = v;
        }
        e.flush().unwrap();
        let s = e.stats();
        let d = &s.devices[0];
        assert!(d.defrag_blocks > 0 && d.defrag_records_moved > 0, "{backend:?}: defrag never ran: {d:?}");
        let device_bytes = d.write_bytes + d.defrag_device_write_bytes;
        let wa = device_bytes as f64 / d.appended_bytes as f64;
        let defrag_wa = (d.appended_bytes + d.defrag_bytes_written) as f64 / d.appended_bytes as f64;
        eprintln!(
            "{backend:?} at {fill_pct}% fill: {writes} overwrites, write amplification {wa:.2} (record bytes \
             {defrag_wa:.2}), {retries} retries, {} urgent defrag blocks, {:?}",
            d.defrag_urgent_blocks, d.blocks
        );
        assert!(
            defrag_wa < max_record_write_amplification,
            "defrag rewrote too much at {fill_pct}% fill: {defrag_wa:.2}"
        );
        for k in 0..keys {
            assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, latest[k as usize], value_len));
        }
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        assert!(e.recovery_report()[0].damaged.is_empty());
        for k in 0..keys {
            assert_eq!(
                e.get(&digest(k), &BinSelection::All).unwrap().bins,
                bins(k, latest[k as usize], value_len),
                "after restart"
            );
        }
        assert_eq!(e.stats().records, keys as u64);
        e.close().unwrap();
    }
}

/// Filling the device gives a clear "device full" error; reads keep working; deletes free
/// space; writes resume; a restart is clean.
#[test]
fn device_full_then_recovery() {
    for backend in BACKENDS {
        let dir = test_dir();
        let cfg = small(dir.path(), backend, 8 << 20);
        let e = Engine::open(cfg.clone()).unwrap();
        let mut written = 0i64;
        let full = loop {
            match e.put(&digest(written), b"s", None, bins(written, 1, 1000), &WritePolicy::default()) {
                Ok(_) => written += 1,
                Err(Error::DeviceOverload(_)) => std::thread::sleep(Duration::from_millis(1)),
                Err(err) => break err,
            }
        };
        assert!(matches!(full, Error::DeviceFull(_)), "{full}");
        assert!(full.to_string().contains("stop_writes_avail_pct"), "{full}");
        assert!(e.stats().stop_writes);
        assert!(written > 4000, "{written}");
        for k in (0..written).step_by(97) {
            assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, 1, 1000));
        }
        // Deletes work at stop-writes and free space once defrag has moved the survivors. On a
        // device this small a burst of tombstones can briefly reach the defrag reserve: then a
        // delete waits for freed blocks, which must come within seconds.
        let mut delete_waits = 0;
        for k in 0..written {
            if k % 4 == 0 {
                continue;
            }
            let started = Instant::now();
            loop {
                match e.delete(&digest(k), GenerationPolicy::None) {
                    Ok(()) => break,
                    Err(Error::DeviceFull(_) | Error::DeviceOverload(_)) => {
                        delete_waits += 1;
                        assert!(started.elapsed() < Duration::from_secs(10), "deletes stayed blocked");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(err) => panic!("delete failed: {err}"),
                }
            }
        }
        eprintln!("{backend:?}: {delete_waits} delete retries while defrag freed space");
        let started = Instant::now();
        while e.stats().stop_writes {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "space never came back: {:?}",
                e.stats().devices[0].blocks
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for k in written..written + 500 {
            put_retrying(&e, k, 2, 1000);
        }
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        assert!(e.recovery_report()[0].damaged.is_empty());
        for k in 0..written + 500 {
            let got = e.get(&digest(k), &BinSelection::All);
            if k >= written {
                assert_eq!(got.unwrap().bins, bins(k, 2, 1000));
            } else if k % 4 == 0 {
                assert_eq!(got.unwrap().bins, bins(k, 1, 1000));
            } else {
                assert!(matches!(got, Err(Error::NotFound)), "deleted key {k} came back");
            }
        }
        e.close().unwrap();
    }
}

/// Expired records read as not found at once; the reaper removes them and their space comes
/// back; a record whose older version had no TTL gets a tombstone, so it stays gone after a
/// restart.
#[test]
fn expiry_releases_space_and_nothing_comes_back() {
    for backend in BACKENDS {
        let dir = test_dir();
        let clock = Arc::new(ManualClock::new((CITRUSLEAF_EPOCH_UNIX_S + 5_000_000) * 1000));
        let mut cfg = small(dir.path(), backend, 16 << 20);
        cfg.clock = clock.clone();
        cfg.expiry_period_s = 0;
        let e = Engine::open(cfg.clone()).unwrap();
        let ttl = |s| WritePolicy { ttl: Ttl::Seconds(s), ..WritePolicy::default() };
        for k in 0..3000 {
            e.put(&digest(k), b"s", None, bins(k, 0, 1000), &ttl(10)).unwrap();
        }
        for k in 3000..3500 {
            e.put(&digest(k), b"s", None, bins(k, 0, 1000), &WritePolicy::default()).unwrap();
        }
        // Key 3100 first had no TTL, then got one: its older copy must not come back.
        e.put(&digest(3100), b"s", None, bins(3100, 1, 1000), &ttl(10)).unwrap();
        e.flush().unwrap();
        let live_before = e.stats().devices[0].blocks.live_bytes;
        clock.advance_ms(20_000);
        assert!(matches!(e.get(&digest(5), &BinSelection::All), Err(Error::NotFound)));
        let reaped = e.reap_expired();
        assert_eq!(reaped, 3001);
        let s = e.stats();
        assert_eq!(s.records, 499);
        assert_eq!(s.tombstones, 1, "only the record with an older copy needs a tombstone");
        assert_eq!(s.expired, 3001);
        assert!(s.devices[0].blocks.live_bytes < live_before / 4, "{:?}", s.devices[0].blocks);
        let started = Instant::now();
        while e.stats().devices[0].blocks.free < 80 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "space did not come back: {:?}",
                e.stats().devices[0].blocks
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        assert!(matches!(e.get(&digest(3100), &BinSelection::All), Err(Error::NotFound)), "an older copy came back");
        assert!(matches!(e.get(&digest(7), &BinSelection::All), Err(Error::NotFound)));
        assert!(e.get(&digest(3200), &BinSelection::All).is_ok());
        e.close().unwrap();
    }
}

/// Over the high-water mark, the records closest to expiry go first; records without TTL never.
#[test]
fn eviction_takes_the_soonest_to_expire_and_never_records_without_ttl() {
    let dir = test_dir();
    let clock = Arc::new(ManualClock::new((CITRUSLEAF_EPOCH_UNIX_S + 5_000_000) * 1000));
    let mut cfg = small(dir.path(), BACKENDS[0], 16 << 20);
    cfg.clock = clock.clone();
    cfg.expiry_period_s = 0;
    cfg.evict_used_pct = 10;
    cfg.evict_step_tenths_pct = 100;
    let e = Engine::open(cfg).unwrap();
    for k in 0..2000i64 {
        let ttl = if k < 500 { Ttl::Never } else { Ttl::Seconds(1000 + k as u32) };
        e.put(&digest(k), b"s", None, bins(k, 0, 1000), &WritePolicy { ttl, ..WritePolicy::default() }).unwrap();
    }
    let mut total = 0;
    for _ in 0..50 {
        let n = e.evict_if_needed();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total > 0);
    assert_eq!(e.stats().evicted, total);
    let live = e.stats().devices[0].blocks.live_bytes;
    assert!(live * 100 <= (16 << 20) * 10 + 1_200_000, "still over the mark: {live}");
    for k in 0..500 {
        assert!(e.get(&digest(k), &BinSelection::All).is_ok(), "record {k} without TTL was evicted");
    }
    // Evicted records are the soonest to expire: every survivor with a TTL outlives every victim.
    let survivors: Vec<i64> = (500..2000).filter(|k| e.get(&digest(*k), &BinSelection::All).is_ok()).collect();
    let victims: Vec<i64> = (500..2000).filter(|k| e.get(&digest(*k), &BinSelection::All).is_err()).collect();
    assert!(!victims.is_empty() && !survivors.is_empty());
    assert!(victims.iter().max() < survivors.iter().min(), "eviction order is wrong");
    e.close().unwrap();
}

/// Under delete churn, the tomb raider drops tombstones once no older copy is left, so they do
/// not pile up; deleted records still stay deleted after a restart.
#[test]
fn tombstones_do_not_pile_up_under_delete_churn() {
    for backend in BACKENDS {
        let dir = test_dir();
        let mut cfg = small(dir.path(), backend, 16 << 20);
        cfg.tomb_raider_period_s = 0;
        cfg.tomb_raider_tombstone_pct = 100;
        let e = Engine::open(cfg.clone()).unwrap();
        let keys = 2000i64;
        let mut alive = vec![false; keys as usize];
        let mut rng = Rng(11);
        let mut peak = 0;
        for round in 0..30u64 {
            for _ in 0..3000 {
                let k = rng.below(keys as u64) as i64;
                if alive[k as usize] && rng.below(2) == 0 {
                    e.delete(&digest(k), GenerationPolicy::None).unwrap();
                    alive[k as usize] = false;
                } else {
                    put_retrying(&e, k, round, 1000);
                    alive[k as usize] = true;
                }
            }
            if round % 5 == 4 {
                e.flush().unwrap();
                e.raid_tombstones().unwrap();
            }
            peak = peak.max(e.stats().tombstones);
        }
        let s = e.stats();
        assert!(s.tombstones_dropped > 0, "{backend:?}: the tomb raider dropped nothing: {s:?}");
        assert!(peak < keys as u64, "tombstones piled up: peak {peak}");
        // The property itself: once the device is quiet, every tombstone a raid keeps is
        // needed — an older live copy of its record is still on the device.
        let mut moved = u64::MAX;
        while e.stats().devices[0].defrag_blocks != moved {
            moved = e.stats().devices[0].defrag_blocks;
            std::thread::sleep(Duration::from_millis(400));
        }
        e.flush().unwrap();
        e.raid_tombstones().unwrap();
        let kept: Vec<peregrine_engine::Entry> = peregrine_engine::PartitionId::all()
            .flat_map(|p| e.index().read(p).iter().filter(|x| x.is_tombstone()).collect::<Vec<_>>())
            .collect();
        let image = device_image(dir.path(), backend);
        let older_live = older_live_copies(&image);
        for t in &kept {
            assert!(
                older_live.get(&t.digest).is_some_and(|lut| *lut < t.last_update_ms),
                "{backend:?}: a tombstone the raid kept has no older copy on the device: {t:?}"
            );
        }
        assert_eq!(kept.len() as u64, e.stats().tombstones);
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        for k in 0..keys {
            let got = e.get(&digest(k), &BinSelection::All);
            assert_eq!(
                got.is_ok(),
                alive[k as usize],
                "{backend:?}: key {k} alive={} after restart",
                alive[k as usize]
            );
        }
        e.close().unwrap();
    }
}

/// Writes faster than the device absorbs them fail fast with "device overload" instead of
/// queueing without bound.
#[test]
fn write_queue_limit_fails_fast() {
    for backend in BACKENDS {
        let dir = test_dir();
        let mut cfg = small(dir.path(), backend, 64 << 20);
        cfg.writer.max_write_queue_bytes = u64::from(TEST_BLOCK_BYTES);
        // A write waiting for space would take this long to be refused; fail-fast ones far less.
        cfg.defrag_wait_ms = 2000;
        let e = Engine::open(cfg).unwrap();
        // Dead space defrag could reclaim: a refusal for a full queue must not wait for it.
        for round in 0..2 {
            for k in 0..20 {
                if round == 0 || k % 2 == 0 {
                    // One block of queue: even a single writer may outrun the device here.
                    while let Err(err) =
                        e.put(&digest(-k - 1), b"s", None, bins(k, round, 60_000), &WritePolicy::default())
                    {
                        assert!(matches!(err, Error::DeviceOverload(_)), "{err}");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            e.flush().unwrap();
        }
        let overloads_before = e.stats().devices[0].overloads;
        let overloads = std::sync::atomic::AtomicU64::new(0);
        let slowest_refusal_us = std::sync::atomic::AtomicU64::new(0);
        let deepest_queue = std::sync::atomic::AtomicU64::new(0);
        let writing = std::sync::atomic::AtomicBool::new(true);
        std::thread::scope(|s| {
            // The bound holds while the writers run, not only once the queue drained.
            s.spawn(|| {
                while writing.load(std::sync::atomic::Ordering::Relaxed) {
                    let q = e.stats().devices[0].write_queue_bytes;
                    deepest_queue.fetch_max(q, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            let writers: Vec<_> = (0..4i64)
                .map(|t| {
                    let (e, overloads, slowest) = (&e, &overloads, &slowest_refusal_us);
                    s.spawn(move || {
                        for i in 0..400 {
                            let k = t * 1000 + i;
                            let started = Instant::now();
                            match e.put(&digest(k), b"s", None, bins(k, 0, 60_000), &WritePolicy::default()) {
                                Ok(_) => {}
                                Err(Error::DeviceOverload(msg)) => {
                                    let us = started.elapsed().as_micros() as u64;
                                    slowest.fetch_max(us, std::sync::atomic::Ordering::Relaxed);
                                    assert!(msg.contains("max_write_queue_bytes"), "{msg}");
                                    overloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                Err(Error::DeviceFull(_)) => break,
                                Err(err) => panic!("{err}"),
                            }
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            writing.store(false, std::sync::atomic::Ordering::Relaxed);
        });
        let n = overloads.into_inner();
        assert!(n > 0, "{backend:?}: no write was refused as overloaded");
        assert_eq!(e.stats().devices[0].overloads - overloads_before, n);
        // Refused at once: no waiting for space (a refusal after the defrag_wait_ms wait, 2 s
        // here, would take at least that) or for the device; the margin is for scheduling on a
        // busy 2-core machine.
        let slowest = slowest_refusal_us.into_inner();
        assert!(slowest < 1_000_000, "{backend:?}: an overloaded write took {slowest} µs to be refused");
        // One queued block beyond the limit at most (the open block seals into the queue).
        let deepest = deepest_queue.into_inner();
        assert!(deepest <= 2 * u64::from(TEST_BLOCK_BYTES), "{backend:?}: the write queue reached {deepest} bytes");
        e.close().unwrap();
    }
}
