//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peregrine_engine::clock::Clock;
use peregrine_engine::io::{IoBackendChoice, IoOptions};
use peregrine_engine::{Bin, Digest, EngineConfig, KeyRef, StoredKey, Value};

/// Both I/O backends; every behaviour test runs on each.
pub const BACKENDS: [IoBackendChoice; 2] = [IoBackendChoice::Uring, IoBackendChoice::Blocking];

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
