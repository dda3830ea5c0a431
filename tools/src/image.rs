//! Reading a device offline: the header, block headers, blocks and every record copy, without
//! the engine and without writing. A shared lock is held while reading, so no engine can take
//! the device meanwhile; a device an engine holds is refused with a clear message.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use peregrine_engine::format::block_header::BlockHeader;
use peregrine_engine::format::device_header::{self, DeviceHeader};
use peregrine_engine::format::metadata::{self, MetadataImage};
use peregrine_engine::format::record::{self, RecordView};
use peregrine_engine::scan::{BlockScan, VersionKey, belongs_on, block_read_len, scan_block};
use peregrine_index::Digest;

/// An opened device image.
#[derive(Debug)]
pub struct DeviceImage {
    /// Path it was opened by.
    pub path: PathBuf,
    /// The valid header.
    pub header: DeviceHeader,
    file: File,
}

/// One used block.
#[derive(Clone, Copy, Debug)]
pub struct BlockInfo {
    /// Block index.
    pub index: u32,
    /// Its header.
    pub header: BlockHeader,
}

impl DeviceImage {
    /// Opens read-only under a shared lock; refuses devices an engine holds.
    pub fn open(path: &Path) -> Result<DeviceImage, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; shared, so it conflicts only with an engine.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!("{} is in use by a running Peregrine engine or server; stop it first", path.display())
            } else {
                format!("locking {}: {e}", path.display())
            });
        }
        let mut slots = vec![0u8; device_header::SLOT_BYTES * device_header::SLOT_COUNT];
        file.read_exact_at(&mut slots, 0).map_err(|e| format!("reading the header of {}: {e}", path.display()))?;
        let header = match device_header::choose_slot(&slots) {
            Ok((h, _)) => h,
            Err(defects) => {
                return Err(format!("{} is not a Peregrine device (header slots: {defects:?})", path.display()));
            }
        };
        Ok(DeviceImage { path: path.to_path_buf(), header, file })
    }

    /// The newest valid metadata slot of this device (format 2), if any.
    pub fn metadata(&self) -> Option<MetadataImage> {
        let mut best: Option<MetadataImage> = None;
        for slot in 0..metadata::SLOT_COUNT {
            let mut buf = vec![0u8; metadata::SLOT_BYTES];
            if self.file.read_exact_at(&mut buf, metadata::slot_offset(slot)).is_err() {
                continue;
            }
            if let Some(img) = MetadataImage::decode(&buf)
                && img.device_set_id == self.header.device_set_id
                && best.as_ref().is_none_or(|b| img.generation > b.generation)
            {
                best = Some(img);
            }
        }
        best
    }

    /// Device offset of `block`.
    pub fn block_offset(&self, block: u32) -> u64 {
        self.header.data_offset + u64::from(block) * u64::from(self.header.write_block_bytes)
    }

    /// The header of `block` if it is a valid block of this device set.
    pub fn block_header(&self, block: u32) -> Option<BlockHeader> {
        let mut buf = [0u8; 64];
        self.file.read_exact_at(&mut buf, self.block_offset(block)).ok()?;
        BlockHeader::decode(&buf).filter(|h| {
            h.device_set_id == self.header.device_set_id
                && h.block_index == block
                && h.device_index == self.header.device_index
        })
    }

    /// Every used block (valid header), in index order.
    pub fn used_blocks(&self) -> Vec<BlockInfo> {
        (0..self.header.block_count)
            .filter_map(|b| self.block_header(b).map(|header| BlockInfo { index: b, header }))
            .collect()
    }

    /// The bytes of a block worth reading (up to its recorded fill when sealed).
    pub fn read_block(&self, info: &BlockInfo) -> Result<Vec<u8>, String> {
        let len = block_read_len(&info.header, self.header.write_block_bytes);
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, self.block_offset(info.index))
            .map_err(|e| format!("reading block {} of {}: {e}", info.index, self.path.display()))?;
        Ok(buf)
    }

    /// Scans a block, handing each verified record and its block-relative offset to `visit`.
    pub fn scan(
        &self,
        info: &BlockInfo,
        visit: impl FnMut(u32, &RecordView<'_>),
    ) -> Result<(BlockScan, Vec<u8>), String> {
        let bytes = self.read_block(info)?;
        let scan = scan_block(&bytes, &info.header, visit);
        Ok((scan, bytes))
    }
}

/// Where a record copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyAt {
    /// Device number in the namespace.
    pub device: usize,
    /// Block index.
    pub block: u32,
    /// Block-relative offset.
    pub offset: u32,
    /// Block sequence.
    pub sequence: u64,
    /// Last-update time of the copy.
    pub last_update_ms: u64,
    /// Extent in bytes.
    pub extent: u32,
    /// Whether it is a tombstone.
    pub tombstone: bool,
    /// Expiry (0 = never).
    pub void_time: u32,
}

/// The metadata in force for a namespace's devices: the newest valid slot over all of them
/// (empty — nothing truncated — for format-1 devices).
pub fn namespace_metadata(devices: &[DeviceImage]) -> MetadataImage {
    let mut best: Option<MetadataImage> = None;
    for dev in devices {
        if let Some(img) = dev.metadata()
            && best.as_ref().is_none_or(|b| img.generation > b.generation)
        {
            best = Some(img);
        }
    }
    best.unwrap_or_else(|| MetadataImage::empty(devices.first().map_or(0, |d| d.header.device_set_id)))
}

/// The newest copy of every record over a namespace's devices, as recovery picks it (the
/// engine's own rule: [`VersionKey`] among copies on the device their digest selects, minus
/// copies a truncation covers).
pub fn newest_copies(devices: &[DeviceImage], mut progress: impl FnMut()) -> Result<HashMap<Digest, CopyAt>, String> {
    let meta = namespace_metadata(devices);
    let mut newest: HashMap<Digest, CopyAt> = HashMap::new();
    for (d, dev) in devices.iter().enumerate() {
        let device_index = dev.header.device_index as u8;
        let device_count = dev.header.device_count as usize;
        for info in dev.used_blocks() {
            dev.scan(&info, |offset, v| {
                let digest = v.digest();
                if !belongs_on(&digest, device_index, device_count)
                    || meta.truncates(
                        digest.partition().index(),
                        v.partition_epoch(),
                        v.set_name(),
                        v.meta().last_update_ms,
                    )
                {
                    return;
                }
                let c = CopyAt {
                    device: d,
                    block: info.index,
                    offset,
                    sequence: info.header.sequence,
                    last_update_ms: v.meta().last_update_ms,
                    extent: v.extent() as u32,
                    tombstone: v.is_tombstone(),
                    void_time: v.meta().void_time,
                };
                let key = |c: &CopyAt| VersionKey {
                    last_update_ms: c.last_update_ms,
                    sequence: c.sequence,
                    offset: c.offset,
                };
                match newest.get(&digest) {
                    Some(old) if key(old) >= key(&c) => {}
                    _ => {
                        newest.insert(digest, c);
                    }
                }
            })?;
            progress();
        }
    }
    Ok(newest)
}

/// Opens every path as one namespace's devices, ordered by device index and checked to be one
/// device set.
pub fn open_namespace(paths: &[PathBuf]) -> Result<Vec<DeviceImage>, String> {
    let mut devices: Vec<DeviceImage> = paths.iter().map(|p| DeviceImage::open(p)).collect::<Result<_, _>>()?;
    devices.sort_by_key(|d| d.header.device_index);
    if let Some(first) = devices.first() {
        for d in &devices {
            if d.header.device_set_id != first.header.device_set_id {
                return Err(format!(
                    "{} and {} belong to different device sets",
                    first.path.display(),
                    d.path.display()
                ));
            }
        }
    }
    Ok(devices)
}

/// A progress bar on a terminal, nothing when output is piped.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})") {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// The record at `offset` of a block's bytes, verified.
pub fn record_at(bytes: &[u8], offset: u32, seed: u64) -> Option<RecordView<'_>> {
    record::parse(bytes.get(offset as usize..)?, seed).ok()
}
