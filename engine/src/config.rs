//! Engine configuration: the namespace, its devices, and every tunable, with units in the names
//! and the defaults a user gets without configuring anything.

use std::path::PathBuf;
use std::sync::Arc;

use peregrine_index::{DEVICE_BYTES_MAX, DEVICES_MAX};

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::format::{DATA_OFFSET_BYTES, WRITE_BLOCK_BYTES_MAX, WRITE_BLOCK_BYTES_MIN, block_header, device_header};
use crate::io::IoOptions;
pub use crate::writer::WriterConfig;

/// Default record size limit (Aerospike's `max-record-size` default).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Fewest write blocks a device may have.
pub const BLOCKS_PER_DEVICE_MIN: u64 = 4;
/// Upper bound of `defrag_wait_ms`: a write should fail long before a client times out.
pub const MAX_DEFRAG_WAIT_MS: u64 = 10_000;

/// Who removes expired records and evicts: the engine itself, or the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaintenanceMode {
    /// A stand-alone namespace: the maintenance thread removes expired records and evicts,
    /// writing tombstones stamped with the local clock.
    #[default]
    Standalone,
    /// A replicated namespace: the engine writes nothing on its own; it hands expiry and
    /// eviction candidates to the caller ([`crate::Engine::expiry_candidates`],
    /// [`crate::Engine::eviction_candidates`]), which proposes the deletions through its log so
    /// every replica applies the same ones. Expired records still read as not found.
    External,
}

/// One device of the namespace.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    /// A block device or a regular file.
    pub path: PathBuf,
    /// For files: the size to create the file with when it does not exist (it is written
    /// through with zeros once). Ignored for block devices, which are used whole.
    pub file_size_bytes: Option<u64>,
}

/// Configuration of one namespace's engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Namespace name (1 to 31 bytes).
    pub namespace: String,
    /// The namespace's devices, in a fixed order (records are spread by digest).
    pub devices: Vec<DeviceSpec>,
    /// Write block size: a power of two from 128 KiB to 8 MiB.
    pub write_block_bytes: u32,
    /// Largest record accepted (serialized size). 0 means the default: 1 MiB (as Aerospike), or
    /// the write block minus its header if that is smaller.
    pub max_record_bytes: u32,
    /// `put` returns only once the record is durable (group commit with fdatasync).
    pub commit_to_device: bool,
    /// How each device's writers fill, flush and pace write blocks.
    pub writer: WriterConfig,
    /// TTL applied when a write asks for the namespace default (0 = never expire).
    pub default_ttl_s: u32,
    /// Reformat devices that hold foreign or mismatched data (destroys it). Blank devices are
    /// always formatted.
    pub format_foreign_devices: bool,
    /// A used block whose live bytes fall below this percentage is defragmented.
    pub defrag_lwm_pct: u32,
    /// Defrag pauses this long per MiB of block it has processed (pacing against client I/O).
    pub defrag_sleep_us: u64,
    /// A write that finds no free block while defrag is still reclaiming dead space waits up
    /// to this long for one (blocking the caller), then fails with "device overload".
    pub defrag_wait_ms: u64,
    /// Ordinary writes fail with "device full" once free blocks fall to this percentage.
    pub stop_writes_avail_pct: u32,
    /// Free blocks kept for defragmentation alone (percentage, at least 2 blocks): deletes may
    /// write tombstones below stop-writes, but not into this reserve.
    pub defrag_reserve_pct: u32,
    /// How often expired records are removed from the index and their space released
    /// (0 = never; expired records read as not found either way).
    pub expiry_period_s: u64,
    /// Evict records closest to expiry (never those without TTL) while live data exceeds this
    /// percentage of the device (0 = off).
    pub evict_used_pct: u32,
    /// Evict likewise while the index uses more than this many bytes (0 = off).
    pub evict_index_bytes: u64,
    /// Each eviction step removes about this many tenths of a percent of evictable records.
    pub evict_step_tenths_pct: u32,
    /// How often the tomb raider drops tombstones no older copy needs (0 = only when
    /// tombstones exceed `tomb_raider_tombstone_pct`).
    pub tomb_raider_period_s: u64,
    /// Run the tomb raider early once tombstones exceed this percentage of index entries.
    pub tomb_raider_tombstone_pct: u32,
    /// Who runs expiry and eviction (see [`MaintenanceMode`]).
    pub maintenance: MaintenanceMode,
    /// How long to wait for a device held by another process before failing with "device in
    /// use" (a killed process releases its devices a few milliseconds after it dies).
    pub device_lock_wait_ms: u64,
    /// I/O backend choice and tunables.
    pub io: IoOptions,
    /// Time source.
    pub clock: Arc<dyn Clock>,
}

impl EngineConfig {
    /// Defaults for a namespace stored on `devices`.
    pub fn new(namespace: impl Into<String>, devices: Vec<DeviceSpec>) -> EngineConfig {
        EngineConfig {
            namespace: namespace.into(),
            devices,
            write_block_bytes: WRITE_BLOCK_BYTES_MAX,
            max_record_bytes: 0,
            commit_to_device: false,
            writer: WriterConfig::default(),
            default_ttl_s: 0,
            format_foreign_devices: false,
            defrag_lwm_pct: 50,
            defrag_sleep_us: 1000,
            defrag_wait_ms: 200,
            stop_writes_avail_pct: 5,
            defrag_reserve_pct: 1,
            expiry_period_s: 60,
            evict_used_pct: 0,
            evict_index_bytes: 0,
            evict_step_tenths_pct: 5,
            tomb_raider_period_s: 3600,
            tomb_raider_tombstone_pct: 10,
            maintenance: MaintenanceMode::Standalone,
            device_lock_wait_ms: 2000,
            io: IoOptions::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// A single file device of `size_bytes` at `path`.
    pub fn single_file(namespace: impl Into<String>, path: impl Into<PathBuf>, size_bytes: u64) -> EngineConfig {
        EngineConfig::new(namespace, vec![DeviceSpec { path: path.into(), file_size_bytes: Some(size_bytes) }])
    }

    /// The pause background scans take after processing `bytes` (see `defrag_sleep_us`).
    pub fn pace_per_block(&self, bytes: usize) -> std::time::Duration {
        std::time::Duration::from_micros(self.defrag_sleep_us * (bytes.div_ceil(1 << 20) as u64).max(1))
    }

    /// The free-space reserves for a device of `blocks` blocks.
    pub fn reserves(&self, blocks: u32) -> crate::blocks::Reserves {
        let pct = |p: u32| (u64::from(blocks) * u64::from(p)).div_ceil(100) as u32;
        let defrag = pct(self.defrag_reserve_pct).max(2).min(blocks / 4);
        // Deletes (tombstones) get at least two blocks between stop-writes and the defrag reserve.
        let stop_writes = pct(self.stop_writes_avail_pct).max(defrag + 2);
        crate::blocks::Reserves {
            stop_writes_blocks: stop_writes,
            defrag_reserve_blocks: defrag,
            // Defrag goes flat out before writes stop, with room to catch up in between.
            defrag_urgent_blocks: stop_writes * 2,
        }
    }

    /// The record size limit in force (see [`EngineConfig::max_record_bytes`]).
    pub fn effective_max_record_bytes(&self) -> usize {
        match self.max_record_bytes {
            0 => DEFAULT_MAX_RECORD_BYTES.min(self.write_block_bytes as usize - block_header::BYTES),
            n => n as usize,
        }
    }

    /// Checks every limit; returns a message naming the offending setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.namespace.is_empty() || self.namespace.len() > device_header::NAMESPACE_BYTES_MAX {
            return bad(format!("namespace name must be 1 to {} bytes", device_header::NAMESPACE_BYTES_MAX));
        }
        if self.devices.is_empty() || self.devices.len() > DEVICES_MAX {
            return bad(format!("a namespace needs 1 to {DEVICES_MAX} devices, got {}", self.devices.len()));
        }
        let wbs = self.write_block_bytes;
        if !(WRITE_BLOCK_BYTES_MIN..=WRITE_BLOCK_BYTES_MAX).contains(&wbs) || !wbs.is_power_of_two() {
            return bad(format!(
                "write_block_bytes must be a power of two from {WRITE_BLOCK_BYTES_MIN} to {WRITE_BLOCK_BYTES_MAX}, got {wbs}"
            ));
        }
        let record_max = wbs as usize - block_header::BYTES;
        if self.max_record_bytes != 0 && (self.max_record_bytes < 1024 || self.max_record_bytes as usize > record_max) {
            return bad(format!(
                "max_record_bytes must be from 1024 to write_block_bytes - {} = {record_max}, got {}",
                block_header::BYTES,
                self.max_record_bytes
            ));
        }
        let w = &self.writer;
        for (name, chunk) in
            [("write_chunk_bytes", w.write_chunk_bytes), ("bulk_write_chunk_bytes", w.bulk_write_chunk_bytes)]
        {
            if !chunk.is_power_of_two() || chunk < 4096 {
                return bad(format!("{name} must be a power of two of at least 4096, got {chunk}"));
            }
        }
        for (name, depth) in
            [("write_queue_depth", w.write_queue_depth), ("bulk_write_queue_depth", w.bulk_write_queue_depth)]
        {
            if depth == 0 || depth > 64 {
                return bad(format!("{name} must be 1 to 64, got {depth}"));
            }
        }
        if self.defrag_wait_ms > MAX_DEFRAG_WAIT_MS {
            return bad(format!("defrag_wait_ms must be at most {MAX_DEFRAG_WAIT_MS}, got {}", self.defrag_wait_ms));
        }
        if self.defrag_lwm_pct == 0 || self.defrag_lwm_pct > 90 {
            return bad(format!("defrag_lwm_pct must be 1 to 90, got {}", self.defrag_lwm_pct));
        }
        if self.stop_writes_avail_pct > 50 || self.defrag_reserve_pct > 20 {
            return bad("stop_writes_avail_pct must be at most 50 and defrag_reserve_pct at most 20".into());
        }
        if self.evict_used_pct > 100 || self.evict_step_tenths_pct == 0 || self.evict_step_tenths_pct > 1000 {
            return bad("evict_used_pct must be 0 to 100 and evict_step_tenths_pct 1 to 1000".into());
        }
        if w.max_write_queue_bytes < u64::from(wbs) {
            return bad("max_write_queue_bytes must hold at least one write block".into());
        }
        for d in &self.devices {
            if let Some(size) = d.file_size_bytes {
                let min = DATA_OFFSET_BYTES + BLOCKS_PER_DEVICE_MIN * u64::from(wbs);
                if size < min || size > DEVICE_BYTES_MAX {
                    return bad(format!(
                        "device {} size {size} must be from {min} ({BLOCKS_PER_DEVICE_MIN} write blocks plus the 1 MiB header) to {DEVICE_BYTES_MAX} bytes",
                        d.path.display()
                    ));
                }
            }
        }
        Ok(())
    }
}
