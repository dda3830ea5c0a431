//! Device handling: exclusive use, foreign and mismatched devices, several devices, and a real
//! block device (a loop device).

use std::io::Write;
use std::process::Command;

use peregrine_engine::io::IoBackendKind;
use peregrine_engine::{BinSelection, DeviceSpec, Engine, EngineConfig, Error, WritePolicy};

use crate::common::*;

/// Within one process; the simulated backend opens and locks the device file too.
#[test]
fn a_device_is_held_exclusively() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        let err = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap_err();
        assert!(matches!(err, Error::DeviceInUse { .. }), "{backend:?}: {err}");
        assert!(err.to_string().contains("in use"), "{err}");
        e.close().unwrap();
        drop(e);
        Engine::open(config(dir.path(), backend, 16 << 20)).unwrap().close().unwrap();
    }
}

#[test]
fn backend_choice_is_honoured() {
    for (backend, kind) in
        BACKENDS.into_iter().zip([IoBackendKind::Uring, IoBackendKind::Blocking, IoBackendKind::Simulated])
    {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        assert_eq!(e.io_backend(), kind);
        assert_eq!(e.stats().devices[0].backend, kind.to_string());
    }
}

/// Real backends only: the foreign bytes are written into the device file with `std::fs`, which
/// a simulated device never reads.
#[test]
fn foreign_devices_are_refused_unless_formatting_is_asked_for() {
    let dir = test_dir();
    let path = device_path(dir.path());
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0xAB; 16 << 20]).unwrap();
    drop(f);
    let err = Engine::open(config(dir.path(), REAL_BACKENDS[0], 16 << 20)).unwrap_err();
    assert!(matches!(err, Error::Device { .. }), "{err}");
    assert!(err.to_string().contains("not a Peregrine device"), "{err}");
    assert!(err.to_string().contains("format_foreign_devices"), "{err}");
    let mut cfg = config(dir.path(), REAL_BACKENDS[0], 16 << 20);
    cfg.format_foreign_devices = true;
    let e = Engine::open(cfg).unwrap();
    e.put(&digest(1), b"s", None, bins(1, 0, 10), &WritePolicy::default()).unwrap();
    e.close().unwrap();
}

#[test]
fn mismatched_devices_are_refused_with_the_reason() {
    for backend in BACKENDS {
        let dir = test_dir();
        Engine::open(config(dir.path(), backend, 16 << 20)).unwrap().close().unwrap();
        let mut other_ns = config(dir.path(), backend, 16 << 20);
        other_ns.namespace = "other".into();
        let err = Engine::open(other_ns).unwrap_err().to_string();
        assert!(err.contains("belongs to namespace 'test'"), "{backend:?}: {err}");
        let mut other_block = config(dir.path(), backend, 16 << 20);
        other_block.write_block_bytes = 256 * 1024;
        let err = Engine::open(other_block).unwrap_err().to_string();
        assert!(err.contains("write_block_bytes"), "{backend:?}: {err}");
    }
}

fn two_device_config(dir: &std::path::Path, backend: peregrine_engine::io::IoBackendChoice) -> EngineConfig {
    let mut c = config(dir, backend, 16 << 20);
    c.devices =
        (0..2).map(|i| DeviceSpec { path: dir.join(format!("dev{i}.dat")), file_size_bytes: Some(16 << 20) }).collect();
    c
}

#[test]
fn two_device_namespace_round_trip_and_restart() {
    for backend in BACKENDS {
        let dir = test_dir();
        {
            let e = Engine::open(two_device_config(dir.path(), backend)).unwrap();
            for k in 0..2000 {
                e.put(&digest(k), b"s", Some(key(k)), bins(k, 1, 300), &WritePolicy::default()).unwrap();
            }
            let s = e.stats();
            assert_eq!(s.devices.len(), 2);
            assert!(s.devices.iter().all(|d| d.appended_bytes > 100_000), "records not spread: {s:?}");
            e.close().unwrap();
        }
        let e = Engine::open(two_device_config(dir.path(), backend)).unwrap();
        assert_eq!(e.recovery_report().len(), 2);
        for k in 0..2000 {
            assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, 1, 300));
        }
        e.close().unwrap();
        drop(e);
        // Swapping the devices' order is refused.
        let mut swapped = two_device_config(dir.path(), backend);
        swapped.devices.reverse();
        let err = Engine::open(swapped).unwrap_err().to_string();
        assert!(err.contains("configured as device"), "{err}");
    }
}

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The block-device path (BLKGETSIZE64, BLKSSZGET, O_EXCL) on a real loop device. Needs root
/// and losetup; set PEREGRINE_SKIP_LOOP_DEVICE=1 to skip it explicitly where neither exists.
/// Real backends only: the point is the kernel's block device.
#[test]
fn loop_device_round_trip() {
    if std::env::var_os("PEREGRINE_SKIP_LOOP_DEVICE").is_some() {
        eprintln!("loop device test skipped by PEREGRINE_SKIP_LOOP_DEVICE");
        return;
    }
    let dir = test_dir();
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing).unwrap().set_len(32 << 20).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&backing)
        .output()
        .expect("losetup must be installed (util-linux) and the test run as root");
    assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    let dev = LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string());
    for (round, backend) in REAL_BACKENDS.into_iter().enumerate() {
        let mut cfg = config(dir.path(), backend, 16 << 20);
        cfg.devices = vec![DeviceSpec { path: dev.0.clone().into(), file_size_bytes: None }];
        cfg.format_foreign_devices = true;
        // Each backend starts from an empty namespace and writes values of its own, so what it
        // reads back can only be what it wrote.
        Engine::format(&cfg).unwrap();
        let v = 2 + round as u64;
        {
            let e = Engine::open(cfg.clone()).unwrap();
            assert_eq!(e.stats().devices[0].kind, "block device");
            assert_eq!(e.stats().devices[0].blocks_total, (32 - 1) * 8);
            let err = Engine::open(cfg.clone()).unwrap_err();
            assert!(matches!(err, Error::DeviceInUse { .. }), "{err}");
            assert_eq!(e.stats().records, 0, "{backend:?}: the formatted device is empty");
            for k in 0..1000 {
                e.put(&digest(k), b"s", None, bins(k, v, 500), &WritePolicy::default()).unwrap();
            }
            e.close().unwrap();
        }
        cfg.format_foreign_devices = false;
        let e = Engine::open(cfg).unwrap();
        for k in 0..1000 {
            assert_eq!(e.get(&digest(k), &BinSelection::All).unwrap().bins, bins(k, v, 500), "{backend:?}");
        }
        e.close().unwrap();
    }
}
