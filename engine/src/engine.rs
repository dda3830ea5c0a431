//! The engine handle: opening a namespace's devices (verify, format or upgrade their headers,
//! read the metadata region, recover the index), the per-device writers and background
//! threads, clean shutdown, and stats. Record operations are in `ops`, `write`, `snapshot`
//! and `truncate`; the state they share is the [`Store`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use peregrine_index::{DEVICE_BYTES_MAX, Index};

use crate::blocks::{BlockCounts, BlockTable, Purpose, Stream};
use crate::config::{BLOCKS_PER_DEVICE_MIN, EngineConfig};
use crate::defrag::{DefragCounters, Defragmenter, StopSignal};
use crate::device::{self, DeviceKind};
use crate::error::{Error, Result};
use crate::format::DATA_OFFSET_BYTES;
use crate::format::device_header::{self, DeviceHeader, SlotDefect};
use crate::format::metadata::MetadataImage;
use crate::geometry::Geometry;
use crate::io::{self, AlignedBuf, DeviceIo, IoBackendKind, SharedBuf, WriteSource, wait_io};
use crate::metadata::{self, Metadata, MetadataTarget};
use crate::poison::{self, Poison};
use crate::recovery::{self, DeviceRecovery, RecoveryShared, RecoveryTarget};
use crate::scan::BlockSource;
use crate::sets::SetRegistry;
use crate::store::{Counters, Device, Store};
use crate::writer::{MemBlocks, ReadActivity, Writer};

/// A thread-safe handle to one namespace's storage. Clones share the engine; the devices are
/// flushed and marked clean when [`Engine::close`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Store>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("namespace", &self.inner.config.namespace).finish()
    }
}

/// Engine-wide statistics.
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    /// Namespace name.
    pub namespace: String,
    /// Live records in the index (including expired ones not yet removed).
    pub records: u64,
    /// Tombstones in the index.
    pub tombstones: u64,
    /// Bytes of RAM held by the primary index.
    pub index_bytes: u64,
    /// Device read I/Os issued by record reads (retries included).
    pub device_reads: u64,
    /// Bytes read by record reads.
    pub device_read_bytes: u64,
    /// Record reads served from a write block in memory.
    pub memory_reads: u64,
    /// Record reads that completed with bytes from the device (each should cost one read).
    pub record_reads_from_device: u64,
    /// Reads that found corrupt bytes (an error was returned).
    pub corruption_errors: u64,
    /// Reads retried because the record moved while being read.
    pub read_retries: u64,
    /// Expired records removed by the reaper.
    pub expired: u64,
    /// Records evicted.
    pub evicted: u64,
    /// Tombstones dropped by the tomb raider.
    pub tombstones_dropped: u64,
    /// Ordinary writes are refused on at least one device (free space at the stop-writes level).
    pub stop_writes: bool,
    /// Writes retried because the record changed meanwhile.
    pub write_retries: u64,
    /// Replicated versions applied.
    pub replica_applied: u64,
    /// Replicated versions skipped because the index held the same or a newer version.
    pub replica_stale: u64,
    /// Replicated versions refused because the device was full (see [`Engine::replica_full`]).
    pub replica_refused_full: u64,
    /// Whether a replicated version was ever refused for want of space since open.
    pub replica_full: bool,
    /// Index entries removed by truncations.
    pub truncated: u64,
    /// Set when a background thread failed; every call fails with this reason.
    pub poisoned: Option<String>,
    /// Per-device figures.
    pub devices: Vec<DeviceStats>,
}

/// Per-device statistics.
#[derive(Clone, Debug, Default)]
pub struct DeviceStats {
    /// Device path.
    pub path: String,
    /// I/O backend in use.
    pub backend: String,
    /// "file" or "block device".
    pub kind: String,
    /// Write block size.
    pub block_bytes: u32,
    /// Blocks on the device.
    pub blocks_total: u64,
    /// Blocks by state, and live bytes.
    pub blocks: BlockCounts,
    /// Device write operations.
    pub writes: u64,
    /// Bytes written to the device.
    pub write_bytes: u64,
    /// fdatasync calls.
    pub syncs: u64,
    /// Record bytes appended.
    pub appended_bytes: u64,
    /// Bytes of full blocks waiting for the device.
    pub write_queue_bytes: u64,
    /// Writes refused with "device overload".
    pub overloads: u64,
    /// Blocks defragmented.
    pub defrag_blocks: u64,
    /// Of those, blocks defragmented without pacing because free space was low.
    pub defrag_urgent_blocks: u64,
    /// Bytes read by defrag.
    pub defrag_read_bytes: u64,
    /// Records moved by defrag.
    pub defrag_records_moved: u64,
    /// Record bytes written by defrag.
    pub defrag_bytes_written: u64,
    /// Device bytes written by the defrag stream.
    pub defrag_device_write_bytes: u64,
    /// Ordinary writes are refused (free blocks at the stop-writes level).
    pub stop_writes: bool,
    /// Set when a device write failed (the device refuses writes).
    pub failure: Option<String>,
}

enum Probe {
    Formatted(DeviceHeader, usize),
    Blank,
    Foreign([SlotDefect; 2]),
}

struct Opened {
    path: PathBuf,
    label: String,
    kind: DeviceKind,
    size_bytes: u64,
    created: bool,
    control: std::fs::File,
    io: Arc<dyn DeviceIo>,
    probe: Probe,
}

/// 64 random bits (device set ids, block nonce seeds); never 0.
fn new_device_set_id() -> u64 {
    let mut bytes = [0u8; 8];
    let got = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    let mixed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64);
    let seed = if got.is_ok() { u64::from_le_bytes(bytes) } else { 0 };
    (seed ^ mixed.unwrap_or(0) ^ u64::from(std::process::id()).rotate_left(32)).max(1)
}

fn write_header_slot(io: &Arc<dyn DeviceIo>, label: &str, header: &DeviceHeader, slot: usize) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(device_header::SLOT_BYTES);
    buf.as_mut_slice().copy_from_slice(&header.encode());
    let src = WriteSource { buf: Arc::new(SharedBuf::new(buf)), start: 0, len: device_header::SLOT_BYTES };
    let offset = (slot * device_header::SLOT_BYTES) as u64;
    wait_io(io.write(offset, src)).map_err(|e| Error::io(format!("writing the header of {label}"), e))?;
    wait_io(io.sync()).map_err(|e| Error::io(format!("syncing the header of {label}"), e))
}

fn probe_header(io: &Arc<dyn DeviceIo>, label: &str, size: u64) -> Result<Probe> {
    let len = device_header::SLOT_BYTES * device_header::SLOT_COUNT;
    if size < len as u64 {
        return Ok(Probe::Blank);
    }
    let buf = wait_io(io.read(0, AlignedBuf::zeroed(len), len))
        .map_err(|e| Error::io(format!("reading the header of {label}"), e))?;
    Ok(match device_header::choose_slot(buf.as_slice()) {
        Ok((h, slot)) => Probe::Formatted(h, slot),
        Err([SlotDefect::Blank, SlotDefect::Blank]) => Probe::Blank,
        Err(defects) => Probe::Foreign(defects),
    })
}

impl Engine {
    /// Opens (formatting blank devices, upgrading format-1 devices) the namespace's devices and
    /// recovers the index from them.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let started = Instant::now();
        let mut opened = Self::open_devices(&config)?;
        let (headers, formatted) = Self::verify_or_format(&config, &mut opened)?;
        let index = Arc::new(Index::new());
        let sets = SetRegistry::default();
        let mut tables = Vec::new();
        let mut geometries = Vec::new();
        for (i, (h, _)) in headers.iter().enumerate() {
            tables.push(Arc::new(BlockTable::new(
                h.block_count,
                h.write_block_bytes,
                1,
                config.reserves(h.block_count),
                config.defrag_lwm_pct,
            )));
            geometries.push(Geometry {
                device_index: i as u8,
                data_offset: h.data_offset,
                block_bytes: h.write_block_bytes,
                device_set_id: h.device_set_id,
            });
        }
        let targets: Vec<MetadataTarget> =
            opened.iter().map(|o| MetadataTarget { label: o.label.clone(), io: o.io.clone() }).collect();
        let set_id = headers[0].0.device_set_id;
        let image = match metadata::read_newest(&targets, set_id)? {
            Some(img) => img,
            None => {
                // Format 1 devices (and devices formatted by format 1 tools) have no metadata
                // region yet: write an empty one before the headers say format 2.
                let mut img = MetadataImage::empty(set_id);
                img.generation = 1;
                if !formatted {
                    tracing::info!(namespace = %config.namespace, "upgrading the devices to format 2 (adding the metadata region)");
                }
                metadata::write_image(&targets, &img)?;
                img
            }
        };
        let recovery = if formatted {
            Vec::new()
        } else {
            Self::recover(&opened, &headers, &geometries, &tables, &index, &sets, &image)?
        };
        let poison = Arc::new(Poison::default());
        let meta = Metadata::start(image, targets, &config.namespace)?;
        let stop = Arc::new(StopSignal::default());
        let mut devices = Vec::new();
        for (i, (o, (header, slot))) in opened.into_iter().zip(headers).enumerate() {
            let mut header = header;
            let was_clean = header.clean_shutdown;
            header.clean_shutdown = false;
            header.generation += 1;
            header.format_version = device_header::FORMAT_VERSION;
            let dirty_slot = 1 - slot;
            write_header_slot(&o.io, &o.label, &header, dirty_slot)?;
            if !was_clean && !o.created {
                tracing::warn!(device = %o.label, "device was not shut down cleanly; recovered from its contents");
            }
            let mem: Arc<MemBlocks> = Arc::default();
            let reads: Arc<ReadActivity> = Arc::default();
            let new_writer = |stream: Stream, cfg: crate::writer::WriterConfig| {
                Arc::new(Writer::new(
                    o.label.clone(),
                    stream,
                    geometries[i],
                    cfg,
                    o.io.clone(),
                    tables[i].clone(),
                    config.clock.clone(),
                    mem.clone(),
                    reads.clone(),
                    poison.clone(),
                    new_device_set_id() ^ (stream as u64),
                ))
            };
            let writer = new_writer(Stream::Client, config.writer.clone());
            // Moved records are cold: the defrag stream keeps no post-write cache.
            let defrag_writer = new_writer(
                Stream::Defrag,
                crate::writer::WriterConfig { post_write_cache_bytes: 0, ..config.writer.clone() },
            );
            let defrag = Arc::new(DefragCounters::default());
            let defragmenter = Defragmenter {
                label: o.label.clone(),
                geometry: geometries[i],
                index: index.clone(),
                blocks: tables[i].clone(),
                io: o.io.clone(),
                mem: mem.clone(),
                writer: defrag_writer.clone(),
                sleep_per_mib: Duration::from_micros(config.defrag_sleep_us),
                counters: defrag.clone(),
                stop: stop.clone(),
            };
            let mut threads = Vec::new();
            for (role, w) in [("flusher", writer.clone()), ("defrag-flusher", defrag_writer.clone())] {
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("{role} {}", o.label))
                        .spawn(move || w.run_flusher())
                        .map_err(|e| Error::io("starting a flusher thread", e))?,
                );
            }
            let defrag_poison = poison.clone();
            let what = format!("the defragmenter of {}", o.label);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("defrag {}", o.label))
                    .spawn(move || {
                        poison::guard(&defrag_poison, &what, || defragmenter.run());
                    })
                    .map_err(|e| Error::io("starting a defrag thread", e))?,
            );
            devices.push(Device {
                label: o.label,
                kind: o.kind,
                io: o.io,
                writer,
                defrag_writer,
                blocks: tables[i].clone(),
                reads,
                defrag,
                threads: Mutex::new(threads),
                header: Mutex::new((header, dirty_slot)),
                control: o.control,
            });
        }
        let inner = Store {
            config,
            index,
            sets,
            devices,
            counters: Counters::default(),
            metadata: meta,
            poison,
            recovery,
            closed: AtomicBool::new(false),
            replica_full: AtomicBool::new(false),
            maintenance_stop: stop.clone(),
            maintenance: Mutex::new(None),
        };
        let engine = Engine { inner: Arc::new(inner) };
        engine.recount();
        let weak = Arc::downgrade(&engine.inner);
        let maintenance_poison = engine.inner.poison.clone();
        let handle = std::thread::Builder::new()
            .name(format!("maintenance {}", engine.inner.config.namespace))
            .spawn(move || {
                poison::guard(&maintenance_poison, "the maintenance thread", || crate::maintenance::run(weak, stop));
            })
            .map_err(|e| Error::io("starting the maintenance thread", e))?;
        *engine.inner.maintenance.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        tracing::info!(
            namespace = %engine.inner.config.namespace,
            devices = engine.inner.devices.len(),
            backend = %engine.inner.devices[0].io.kind(),
            records = engine.inner.counters.records.load(Ordering::Relaxed),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine open"
        );
        Ok(engine)
    }

    /// Returns each device's header and slot, and whether the devices were just formatted.
    fn verify_or_format(config: &EngineConfig, opened: &mut [Opened]) -> Result<(Vec<(DeviceHeader, usize)>, bool)> {
        let count = opened.len();
        let reference = opened.iter().find_map(|o| match &o.probe {
            Probe::Formatted(h, _) => Some(h.clone()),
            _ => None,
        });
        let mut problems: Vec<(PathBuf, String)> = Vec::new();
        for o in opened.iter() {
            if let Probe::Foreign(d) = &o.probe {
                problems.push((
                    o.path.clone(),
                    format!("holds data that is not a Peregrine device, or its header is damaged (slots: {d:?})"),
                ));
            }
        }
        if let Some(reference) = &reference {
            for (i, o) in opened.iter().enumerate() {
                match &o.probe {
                    Probe::Foreign(_) => {}
                    Probe::Blank => problems.push((
                        o.path.clone(),
                        "is blank while the other devices of the namespace are formatted (the device set is incomplete)".into(),
                    )),
                    Probe::Formatted(h, _) => {
                        let mut why = Vec::new();
                        if h.namespace != config.namespace {
                            why.push(format!("belongs to namespace '{}', not '{}'", h.namespace, config.namespace));
                        }
                        if h.device_count as usize != count || h.device_index as usize != i {
                            why.push(format!(
                                "is device {} of {} but is configured as device {i} of {count}",
                                h.device_index, h.device_count
                            ));
                        }
                        if h.device_set_id != reference.device_set_id {
                            why.push("belongs to a different device set than the other devices".into());
                        }
                        if h.write_block_bytes != config.write_block_bytes {
                            why.push(format!(
                                "was formatted with write_block_bytes {}, configured {}",
                                h.write_block_bytes, config.write_block_bytes
                            ));
                        }
                        if !why.is_empty() {
                            problems.push((o.path.clone(), why.join("; ")));
                        }
                    }
                }
            }
        }
        let all_blank = opened.iter().all(|o| matches!(o.probe, Probe::Blank));
        let format_all = all_blank || (!problems.is_empty() && config.format_foreign_devices);
        if !format_all {
            if let Some((path, detail)) = problems.into_iter().next() {
                return Err(Error::Device {
                    path,
                    detail: format!(
                        "{detail}; refusing to use it (set format_foreign_devices to reformat, destroying its data)"
                    ),
                });
            }
            let headers = opened
                .iter()
                .filter_map(|o| match &o.probe {
                    Probe::Formatted(h, slot) => Some((h.clone(), *slot)),
                    _ => None,
                })
                .collect();
            return Ok((headers, false));
        }
        if reference.is_some() {
            for (path, detail) in &problems {
                tracing::warn!(device = %path.display(), %detail, "reformatting device as configured");
            }
        }
        Ok((Self::format_devices(config, opened)?, true))
    }

    /// Writes fresh headers (a new device set) on every device, sizing and zero-filling new
    /// files. Everything the devices held is gone afterwards.
    fn format_devices(config: &EngineConfig, opened: &mut [Opened]) -> Result<Vec<(DeviceHeader, usize)>> {
        let count = opened.len();
        let set_id = new_device_set_id();
        let now = config.clock.now_unix_ms();
        let mut out = Vec::new();
        for (i, o) in opened.iter_mut().enumerate() {
            let configured = config.devices[i].file_size_bytes;
            let mut size = o.size_bytes;
            if o.kind == DeviceKind::File
                && let Some(want) = configured
                && (o.created || size < want)
            {
                o.control.set_len(want).map_err(|e| Error::io(format!("sizing {}", o.label), e))?;
                device::zero_fill(&o.io, &o.path, if o.created { 0 } else { size.min(want) }, want)?;
                size = want;
            }
            let size = size.min(DEVICE_BYTES_MAX);
            let blocks = size.saturating_sub(DATA_OFFSET_BYTES) / u64::from(config.write_block_bytes);
            if blocks < BLOCKS_PER_DEVICE_MIN {
                return Err(Error::Device {
                    path: o.path.clone(),
                    detail: format!(
                        "{size} bytes is too small: at least {BLOCKS_PER_DEVICE_MIN} write blocks plus 1 MiB are needed"
                    ),
                });
            }
            let header = DeviceHeader {
                generation: 1,
                device_set_id: set_id,
                device_index: i as u32,
                device_count: count as u32,
                write_block_bytes: config.write_block_bytes,
                clean_shutdown: true,
                device_bytes: size,
                data_offset: DATA_OFFSET_BYTES,
                block_count: blocks as u32,
                created_unix_ms: now,
                namespace: config.namespace.clone(),
                format_version: device_header::FORMAT_VERSION,
            };
            // Clear the other slot first so an older header there cannot win.
            let zero = DeviceHeader { generation: 0, ..header.clone() };
            write_header_slot(&o.io, &o.label, &zero, 1)?;
            write_header_slot(&o.io, &o.label, &header, 0)?;
            tracing::info!(device = %o.label, size, blocks, "formatted device");
            out.push((header, 0));
        }
        Ok(out)
    }

    /// Formats the configured devices as a new, empty namespace, whatever they held (used by
    /// `peregrine-tool format`). Fails if a device is in use.
    pub fn format(config: &EngineConfig) -> Result<()> {
        config.validate()?;
        let mut opened = Self::open_devices(config)?;
        Self::format_devices(config, &mut opened)?;
        Ok(())
    }

    fn open_devices(config: &EngineConfig) -> Result<Vec<Opened>> {
        let mut opened = Vec::new();
        for (i, spec) in config.devices.iter().enumerate() {
            let dev = device::open_device(&spec.path, spec.file_size_bytes, config.device_lock_wait_ms)?;
            let label = spec.path.display().to_string();
            let control = dev.file.try_clone().map_err(|e| Error::io(format!("duplicating {label}"), e))?;
            let cpus = &config.io.io_thread_cpus;
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let io = io::open_backend(dev.file, &config.io, &label, dev.granule, cpu)
                .map_err(|e| Error::io(format!("starting I/O for {label}"), e))?;
            let probe = probe_header(&io, &label, dev.size_bytes)?;
            opened.push(Opened {
                path: spec.path.clone(),
                label,
                kind: dev.kind,
                size_bytes: dev.size_bytes,
                created: dev.created,
                control,
                io,
                probe,
            });
        }
        Ok(opened)
    }

    #[allow(clippy::too_many_arguments, reason = "the parts of a namespace being recovered")]
    fn recover(
        opened: &[Opened],
        headers: &[(DeviceHeader, usize)],
        geometries: &[Geometry],
        tables: &[Arc<BlockTable>],
        index: &Index,
        sets: &SetRegistry,
        image: &MetadataImage,
    ) -> Result<Vec<DeviceRecovery>> {
        let started = Instant::now();
        let shared = RecoveryShared { index, sets, metadata: image, set_gate: RwLock::new(()) };
        let results: Vec<Result<DeviceRecovery>> = std::thread::scope(|s| {
            let handles: Vec<_> = opened
                .iter()
                .enumerate()
                .map(|(i, o)| {
                    let target = RecoveryTarget {
                        source: BlockSource {
                            label: &o.label,
                            io: &o.io,
                            geometry: geometries[i],
                            block_count: headers[i].0.block_count,
                        },
                        device_count: opened.len(),
                        blocks: &tables[i],
                    };
                    let shared = &shared;
                    s.spawn(move || recovery::recover_device(&target, shared))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::Config("recovery thread panicked".into()))))
                .collect()
        });
        let reports = results.into_iter().collect::<Result<Vec<_>>>()?;
        // Names seen only in superseded copies keep no id once the scan is done.
        recovery::reclaim_set_ids(&shared);
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        let records: u64 = reports.iter().map(|r| r.records_scanned).sum();
        let bytes: u64 = reports.iter().map(|r| r.bytes_read).sum();
        let damaged: usize = reports.iter().map(|r| r.damaged.len()).sum();
        tracing::info!(
            records_scanned = records,
            mb_read = bytes / 1_000_000,
            seconds = format!("{secs:.3}"),
            records_per_s = (records as f64 / secs) as u64,
            mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / secs),
            damaged_regions = damaged,
            "cold start scan finished"
        );
        Ok(reports)
    }

    fn recount(&self) {
        let (mut records, mut tombstones) = (0i64, 0i64);
        for pid in peregrine_index::PartitionId::all() {
            for e in self.inner.index.read(pid).iter() {
                if e.is_tombstone() { tombstones += 1 } else { records += 1 }
            }
        }
        self.inner.counters.records.store(records, Ordering::Relaxed);
        self.inner.counters.tombstones.store(tombstones, Ordering::Relaxed);
    }

    /// Whether `other` is a handle on this same open engine.
    pub fn same_as(&self, other: &Engine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The namespace name.
    pub fn namespace(&self) -> &str {
        &self.inner.config.namespace
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// What the cold start found on each device (empty for freshly formatted devices).
    pub fn recovery_report(&self) -> &[DeviceRecovery] {
        &self.inner.recovery
    }

    /// The I/O backend the devices use.
    pub fn io_backend(&self) -> IoBackendKind {
        self.inner.devices[0].io.kind()
    }

    /// The primary index (read-only use: stats, tools).
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// Current statistics.
    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        let devices: Vec<DeviceStats> = self
            .inner
            .devices
            .iter()
            .map(|d| {
                let w = &d.writer.counters;
                let dw = &d.defrag_writer.counters;
                DeviceStats {
                    path: d.label.clone(),
                    backend: d.io.kind().to_string(),
                    kind: match d.kind {
                        DeviceKind::File => "file".into(),
                        DeviceKind::Block => "block device".into(),
                    },
                    block_bytes: d.writer.geometry().block_bytes,
                    blocks_total: u64::from(d.blocks.len()),
                    blocks: d.blocks.counts(),
                    writes: w.writes.load(Ordering::Relaxed),
                    write_bytes: w.write_bytes.load(Ordering::Relaxed),
                    syncs: w.syncs.load(Ordering::Relaxed),
                    appended_bytes: w.appended_bytes.load(Ordering::Relaxed),
                    write_queue_bytes: d.writer.queued_bytes(),
                    overloads: w.overloads.load(Ordering::Relaxed),
                    defrag_blocks: d.defrag.blocks.load(Ordering::Relaxed),
                    defrag_urgent_blocks: d.defrag.urgent_blocks.load(Ordering::Relaxed),
                    defrag_read_bytes: d.defrag.read_bytes.load(Ordering::Relaxed),
                    defrag_records_moved: d.defrag.records_moved.load(Ordering::Relaxed),
                    defrag_bytes_written: d.defrag.bytes_moved.load(Ordering::Relaxed),
                    defrag_device_write_bytes: dw.write_bytes.load(Ordering::Relaxed),
                    stop_writes: !d.blocks.can_allocate(Purpose::Write),
                    failure: d.writer.failure().or_else(|| d.defrag_writer.failure()),
                }
            })
            .collect();
        EngineStats {
            namespace: self.inner.config.namespace.clone(),
            records: c.records.load(Ordering::Relaxed).max(0) as u64,
            tombstones: c.tombstones.load(Ordering::Relaxed).max(0) as u64,
            index_bytes: self.inner.index.memory_bytes(),
            device_reads: c.device_reads.load(Ordering::Relaxed),
            device_read_bytes: c.device_read_bytes.load(Ordering::Relaxed),
            memory_reads: c.memory_reads.load(Ordering::Relaxed),
            record_reads_from_device: c.record_reads_from_device.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            tombstones_dropped: c.tombstones_dropped.load(Ordering::Relaxed),
            stop_writes: devices.iter().any(|d: &DeviceStats| d.stop_writes),
            corruption_errors: c.corruption_errors.load(Ordering::Relaxed),
            read_retries: c.read_retries.load(Ordering::Relaxed),
            write_retries: c.write_retries.load(Ordering::Relaxed),
            replica_applied: c.replica_applied.load(Ordering::Relaxed),
            replica_stale: c.replica_stale.load(Ordering::Relaxed),
            replica_refused_full: c.replica_refused_full.load(Ordering::Relaxed),
            replica_full: self.inner.replica_full.load(Ordering::Relaxed),
            truncated: c.truncated.load(Ordering::Relaxed),
            poisoned: self.inner.poison.reason().map(str::to_string),
            devices,
        }
    }

    /// Waits until every record written so far is on the devices and synced.
    pub fn flush(&self) -> Result<()> {
        let waits: Vec<_> =
            self.inner.devices.iter().flat_map(|d| [d.writer.flush(), d.defrag_writer.flush()]).collect();
        for w in waits {
            w.wait().unwrap_or(Err(Error::Shutdown))?;
        }
        Ok(())
    }

    /// Flushes every write block, waits for the device writes, and marks the devices clean.
    /// Later calls on any handle fail with [`Error::Shutdown`].
    pub fn close(&self) -> Result<()> {
        self.inner.shutdown()
    }
}

impl Store {
    fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut first_error = None;
        // Background work first (it may still write), then the writers, then the headers.
        self.maintenance_stop.stop();
        if let Some(h) = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner).take() {
            // The maintenance thread may itself be dropping the last handle: never join self.
            if h.thread().id() != std::thread::current().id() && h.join().is_err() {
                first_error.get_or_insert(Error::Config("the maintenance thread panicked".into()));
            }
        }
        // Updates already queued reach the devices before the headers are marked clean.
        self.metadata.stop();
        for d in &self.devices {
            let threads = std::mem::take(&mut *d.threads.lock().unwrap_or_else(PoisonError::into_inner));
            let (flushers, others): (Vec<_>, Vec<_>) =
                threads.into_iter().partition(|t| t.thread().name().is_some_and(|n| n.contains("flusher")));
            for t in others {
                if t.join().is_err() {
                    first_error.get_or_insert(Error::Config(format!("defrag thread of {} panicked", d.label)));
                }
            }
            d.defrag_writer.stop();
            d.writer.stop();
            for t in flushers {
                if t.join().is_err() {
                    first_error.get_or_insert(Error::Config(format!("flusher of {} panicked", d.label)));
                }
            }
            if let Some(reason) = d.writer.failure().or_else(|| d.defrag_writer.failure()) {
                first_error.get_or_insert(Error::Failed { device: d.label.clone(), reason });
                continue;
            }
            let mut guard = d.header.lock().unwrap_or_else(PoisonError::into_inner);
            let (header, slot) = &mut *guard;
            header.clean_shutdown = true;
            header.generation += 1;
            let next = 1 - *slot;
            match write_header_slot(&d.io, &d.label, header, next) {
                Ok(()) => *slot = next,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Nothing writes any more: another engine may take the devices now.
        for d in &self.devices {
            device::unlock(&d.control);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "engine shutdown failed");
        }
    }
}
