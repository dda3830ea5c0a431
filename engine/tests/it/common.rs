//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peregrine_engine::clock::Clock;
use peregrine_engine::io::{IoBackendChoice, IoOptions};
use peregrine_engine::{Bin, Digest, EngineConfig, KeyRef, StoredKey, Value};

/// Every I/O backend; every behaviour test runs on each: io_uring, the blocking pool, and the
/// in-memory simulated device ([`peregrine_engine::io::sim`]). With the simulated backend the
/// device file is created and locked but never written: its contents live in a process-global
/// registry keyed by the device's path, so reopening an engine on the same path (a clean
/// restart) finds the same device, and every test's fresh temp dir gets a fresh device.
pub const BACKENDS: [IoBackendChoice; 3] =
    [IoBackendChoice::Uring, IoBackendChoice::Blocking, IoBackendChoice::Simulated];

/// The backends that write the device file itself, for tests that need the bytes to be in a real
/// file or a real process: a child killed with SIGKILL (the simulated device dies with the
/// process), bytes flipped or torn in the device file on disk or read back with `std::fs`
/// (the simulation never sees them), loop devices, and exclusive-lock tests across processes.
pub const REAL_BACKENDS: [IoBackendChoice; 2] = [IoBackendChoice::Uring, IoBackendChoice::Blocking];

/// Small blocks so tests cross block boundaries often.
pub const TEST_BLOCK_BYTES: u32 = 128 * 1024;

/// A config for one file device of `size` bytes under `dir`.
pub fn config(dir: &Path, backend: IoBackendChoice, size: u64) -> EngineConfig {
    let mut c = EngineConfig::single_file("test", dir.join("dev0.dat"), size);
    c.write_block_bytes = TEST_BLOCK_BYTES;
    c.max_record_bytes = 64 * 1024;
    c.writer.post_write_cache_bytes = 2 * u64::from(TEST_BLOCK_BYTES);
    c.writer.flush_interval_ms = 50;
    c.device_lock_wait_ms = 200;
    c.io = IoOptions { backend, ..IoOptions::default() };
    c
}

/// Same, with a clock.
pub fn config_with_clock(dir: &Path, backend: IoBackendChoice, size: u64, clock: Arc<dyn Clock>) -> EngineConfig {
    let mut c = config(dir, backend, size);
    c.clock = clock;
    c
}

/// The device file of [`config`].
pub fn device_path(dir: &Path) -> PathBuf {
    dir.join("dev0.dat")
}

/// Forgets the simulated devices of the device files in `dir` (see [`BACKENDS`]) so their
/// images (up to twice the file size each) are freed; a no-op for the real backends.
pub fn forget_sim_devices(dir: &Path) {
    for i in 0..8 {
        peregrine_engine::io::sim::remove(dir.join(format!("dev{i}.dat")));
    }
}

/// A fresh temp dir for a test's device files that, when dropped, also forgets the simulated
/// devices registered for them ([`forget_sim_devices`]).
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        forget_sim_devices(self.0.path());
    }
}

/// A [`TestDir`].
pub fn test_dir() -> TestDir {
    TestDir(tempfile::tempdir().unwrap())
}

/// Digest of integer key `k` in set "s".
pub fn digest(k: i64) -> Digest {
    Digest::of_key(b"s", KeyRef::Int(k))
}

/// The stored form of integer key `k`.
pub fn key(k: i64) -> StoredKey {
    StoredKey { particle_type: 1, bytes: k.to_be_bytes().to_vec() }
}

/// A deterministic value for key `k` at version `v`, `len` bytes.
pub fn value_bytes(k: i64, v: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ v.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One blob bin "v" holding [`value_bytes`].
pub fn bins(k: i64, v: u64, len: usize) -> Vec<Bin> {
    vec![Bin::new("v", Value::Blob(value_bytes(k, v, len))).unwrap()]
}

/// A tiny xorshift generator for reproducible workloads.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
