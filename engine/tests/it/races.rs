//! What the device is handed while appenders keep writing: only bytes nobody writes any more.

use peregrine_engine::completion::block_on;
use peregrine_engine::io::{IoBackendChoice, sim};
use peregrine_engine::{Engine, WritePolicy};

use crate::common::*;

/// Before: a flush of the open block handed the device the whole last sector, including bytes
/// past the fill mark that appenders were writing at that moment (a data race; the blocking
/// backend even built a `&[u8]` over them). Now the partly filled sector goes from a private
/// copy: a record appended while the flush is in flight is not in what the device receives.
#[test]
fn a_flush_never_hands_the_device_bytes_past_the_fill_mark() {
    let dir = test_dir();
    let mut cfg = config(dir.path(), IoBackendChoice::Simulated, 16 << 20);
    cfg.writer.flush_interval_ms = 0; // flushes only when asked
    let e = Engine::open(cfg).unwrap();
    let dev = sim::lookup(device_path(dir.path())).unwrap();
    for k in 0..3 {
        e.put(&digest(k), b"s", None, bins(k, 0, 1000), &WritePolicy::default()).unwrap();
    }
    let last = e.index().get(&digest(2)).unwrap().location;
    let fill = last.offset + u64::from(last.size);
    assert!(!fill.is_multiple_of(4096), "the fill mark must sit inside a sector for this test");
    let sector = fill / 4096 * 4096;
    let pause = dev.pause_write_covering(sector);
    std::thread::scope(|s| {
        let flusher = s.spawn(|| block_on(e.barrier()));
        assert!(pause.wait_reached(std::time::Duration::from_secs(10)), "the flush never wrote the last sector");
        // The device is about to copy the sector: append behind the fill mark now.
        e.put(&digest(3), b"s", None, bins(3, 0, 1000), &WritePolicy::default()).unwrap();
        assert_eq!(e.index().get(&digest(3)).unwrap().location.offset, fill, "appended right at the fill mark");
        pause.release();
        flusher.join().unwrap().unwrap();
    });
    let image = dev.live_image();
    let past_fill = &image[fill as usize..(sector + 4096) as usize];
    assert!(past_fill.iter().all(|&b| b == 0), "the device received bytes appended during the flush");
    // And the record appended meanwhile reaches the device with the next flush.
    block_on(e.barrier()).unwrap();
    assert!(dev.live_image()[fill as usize..(sector + 4096) as usize].iter().any(|&b| b != 0));
    drop(e);
    sim::remove(device_path(dir.path()));
}
