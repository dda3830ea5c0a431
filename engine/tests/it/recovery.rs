//! Cold start: torn final blocks, flipped bits, and what recovery reports.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use peregrine_engine::format::block_header::BlockHeader;
use peregrine_engine::format::{DATA_OFFSET_BYTES, record};
use peregrine_engine::scan::scan_block;
use peregrine_engine::{BinSelection, Digest, Engine, Error, WritePolicy};

use crate::common::*;

/// Reads block `b` of a test device (outside the engine).
fn read_block(path: &Path, b: u32) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; TEST_BLOCK_BYTES as usize];
    f.read_exact_at(&mut buf, DATA_OFFSET_BYTES + u64::from(b) * u64::from(TEST_BLOCK_BYTES)).unwrap();
    buf
}

/// The block with the highest sequence (the last one written).
fn last_block(path: &Path) -> (u32, BlockHeader) {
    let blocks = ((std::fs::metadata(path).unwrap().len() - DATA_OFFSET_BYTES) / u64::from(TEST_BLOCK_BYTES)) as u32;
    (0..blocks)
        .filter_map(|b| BlockHeader::decode(&read_block(path, b)).map(|h| (b, h)))
        .max_by_key(|(_, h)| h.sequence)
        .unwrap()
}

/// Overwrites bytes of the device file in place (through O_DIRECT, as the engine reads).
fn patch(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
    let start = offset & !4095;
    let mut buf = peregrine_engine::io::AlignedBuf::zeroed(8192);
    file.read_exact_at(buf.as_mut_slice(), start).unwrap();
    f(&mut buf.as_mut_slice()[(offset - start) as usize..]);
    file.write_all_at(buf.as_slice(), start).unwrap();
}

/// A torn last block (cut at a sector boundary, zeros or garbage after it) is detected and
/// reported; every record before the cut survives, and the engine accepts writes afterwards.
/// Real backends only: the tear is made in the device file on disk.
#[test]
fn torn_final_block_is_detected_and_everything_before_it_survives() {
    for backend in REAL_BACKENDS {
        for garbage in [false, true] {
            let dir = test_dir();
            let path = device_path(dir.path());
            let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
            for k in 0..600 {
                e.put(&digest(k), b"s", Some(key(k)), bins(k, 0, 700), &WritePolicy::default()).unwrap();
            }
            e.close().unwrap();
            drop(e);
            let (block, header) = last_block(&path);
            assert!(header.fill_end > 16 * 1024, "last block too small for the test: {}", header.fill_end);
            let bytes = read_block(&path, block);
            let mut in_block: Vec<(u32, Digest)> = Vec::new();
            scan_block(&bytes, &header, |off, v| in_block.push((off, v.digest())));
            let cut = 8192u32; // a sector boundary inside the recorded fill
            let block_start = DATA_OFFSET_BYTES + u64::from(block) * u64::from(TEST_BLOCK_BYTES);
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            let tail: Vec<u8> =
                (0..header.fill_end - cut).map(|i| if garbage { (i * 31 + 7) as u8 } else { 0 }).collect();
            file.write_all_at(&tail, block_start + u64::from(cut)).unwrap();
            file.sync_all().unwrap();
            drop(file);

            let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
            let damaged = &e.recovery_report()[0].damaged;
            assert_eq!(damaged.len(), 1, "{backend:?} garbage={garbage}: {damaged:?}");
            assert_eq!(damaged[0].block, block);
            assert!(damaged[0].start <= cut && damaged[0].start + 1024 > cut, "{damaged:?}");
            let lost: Vec<Digest> = in_block.iter().filter(|(off, _)| *off + 700 > cut).map(|(_, d)| *d).collect();
            assert!(!lost.is_empty());
            for k in 0..600 {
                let got = e.get(&digest(k), &BinSelection::All);
                if lost.contains(&digest(k)) {
                    assert!(matches!(got, Err(Error::NotFound)), "torn record {k} returned: {got:?}");
                } else {
                    assert_eq!(got.unwrap().bins, bins(k, 0, 700), "record {k} before the tear was lost");
                }
            }
            e.put(&digest(10_000), b"s", None, bins(1, 1, 10), &WritePolicy::default()).unwrap();
            e.close().unwrap();
        }
    }
}

/// A flipped bit in a record on the device is a corruption error on read (never wrong bytes),
/// counted in stats; after a restart recovery reports the damage and the record is gone.
/// Real backends only: the bit is flipped in the device file on disk.
#[test]
fn flipped_bits_are_reported_as_corruption() {
    for backend in REAL_BACKENDS {
        let dir = test_dir();
        let path = device_path(dir.path());
        let mut cfg = config(dir.path(), backend, 16 << 20);
        cfg.writer.post_write_cache_bytes = 0;
        let e = Engine::open(cfg.clone()).unwrap();
        for k in 0..400 {
            e.put(&digest(k), b"s", None, bins(k, 0, 900), &WritePolicy::default()).unwrap();
        }
        e.flush().unwrap();
        let victim = e.index().get(&digest(3)).unwrap();
        // Flip one bit in the value, well inside the record.
        patch(&path, victim.location.offset + record::HEADER_BYTES as u64 + 40, |b| b[0] ^= 0x10);
        match e.get(&digest(3), &BinSelection::All) {
            Err(Error::Corruption { offset, detail, .. }) => {
                assert_eq!(offset, victim.location.offset);
                assert!(detail.contains("checksum"), "{detail}");
            }
            other => panic!("{backend:?}: expected corruption, got {other:?}"),
        }
        assert_eq!(e.stats().corruption_errors, 1);
        assert_eq!(e.get(&digest(4), &BinSelection::All).unwrap().bins, bins(4, 0, 900));
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        let damaged = &e.recovery_report()[0].damaged;
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert!(matches!(e.get(&digest(3), &BinSelection::All), Err(Error::NotFound)));
        for k in (0..400).filter(|&k| k != 3) {
            assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, 0, 900), "record {k}");
        }
        e.close().unwrap();
    }
}

/// Reads that miss the write cache cost exactly one device read each.
#[test]
fn one_device_read_per_record_read() {
    for backend in BACKENDS {
        let dir = test_dir();
        let mut cfg = config(dir.path(), backend, 16 << 20);
        cfg.writer.post_write_cache_bytes = 0;
        // Keep defrag from moving the partly filled last block into memory mid-test.
        cfg.defrag_lwm_pct = 1;
        let e = Engine::open(cfg.clone()).unwrap();
        for k in 0..500 {
            e.put(&digest(k), b"s", None, bins(k, 0, 1000), &WritePolicy::default()).unwrap();
        }
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        for k in 0..500 {
            e.get(&digest(k), &BinSelection::All).unwrap();
        }
        let s = e.stats();
        assert_eq!(s.device_reads, 500, "{backend:?}: {s:?}");
        assert_eq!(s.memory_reads, 0);
        assert!(s.device_read_bytes <= 500 * 8192);
    }
}

/// Recovery after many overwrites keeps the newest version and exact live-byte accounting.
#[test]
fn recovery_rebuilds_live_bytes_exactly() {
    for backend in BACKENDS {
        let dir = test_dir();
        let cfg = config(dir.path(), backend, 16 << 20);
        let e = Engine::open(cfg.clone()).unwrap();
        let mut rng = Rng(7);
        for i in 0..3000u64 {
            let k = rng.below(200) as i64;
            e.put(&digest(k), b"s", None, bins(k, i, 100 + (i % 300) as usize), &WritePolicy::default()).unwrap();
        }
        let before = e.stats().devices[0].blocks.live_bytes;
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        assert_eq!(e.stats().devices[0].blocks.live_bytes, before);
        assert_eq!(e.stats().records, 200);
    }
}
