//! Opening a device: a block device (size from BLKGETSIZE64, sector sizes from BLKSSZGET and
//! BLKPBSZGET) or a regular file (created at its configured size and written through with zeros
//! once). Devices are opened with O_DIRECT and locked exclusively with flock, so a second
//! process gets a clear "device in use" error.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, DeviceIo, IO_ALIGN_BYTES, SharedBuf, WriteSource, wait_io};

/// Bytes per write while zero-filling a new file.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;
/// Smallest direct-I/O granule used, even where a device reports less.
const GRANULE_MIN: usize = 512;
/// Zero-fill writes in flight.
const ZERO_FILL_DEPTH: usize = 4;

/// What kind of device a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A block device.
    Block,
    /// A regular file.
    File,
}

/// An opened, exclusively locked device.
#[derive(Debug)]
pub struct OpenedDevice {
    /// Block device or file.
    pub kind: DeviceKind,
    /// Usable size in bytes.
    pub size_bytes: u64,
    /// Whether this open created the file (it is blank).
    pub created: bool,
    /// Direct-I/O granule for offsets and lengths (512 to 4096).
    pub granule: usize,
    /// The open descriptor (O_DIRECT, flock held).
    pub file: File,
}

const BLKGETSIZE64: libc::Ioctl = 0x8008_1272; // _IOR(0x12, 114, u64)

fn io_err(path: &Path, what: &str, e: io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

/// Opens (creating a file device if needed) and locks a device. If another process holds the
/// lock, retries for up to `lock_wait_ms`: a process that was just killed releases its devices
/// a few milliseconds after it is reaped.
pub fn open_device(path: &Path, file_size_bytes: Option<u64>, lock_wait_ms: u64) -> Result<OpenedDevice> {
    let exists = path.exists();
    if !exists && file_size_bytes.is_none() {
        return Err(Error::Device {
            path: path.to_path_buf(),
            detail: "does not exist, and no file size is configured to create it with".into(),
        });
    }
    if !exists && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, "creating directory", e))?;
    }
    let is_block = exists && std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if is_block {
        // For block devices O_EXCL means "fail if mounted or held exclusively elsewhere".
        flags |= libc::O_EXCL;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!exists)
        .truncate(false)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => Error::Device {
                path: path.to_path_buf(),
                detail: "the filesystem does not support O_DIRECT (tmpfs?); put the device file on ext4, XFS or a block device".into(),
            },
            Some(libc::EBUSY) => Error::DeviceInUse { path: path.to_path_buf() },
            _ => io_err(path, "opening", e),
        })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(lock_wait_ms);
    loop {
        match lock_exclusive(&file, path) {
            Err(Error::DeviceInUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other?,
        }
    }
    let (kind, size_bytes, granule) = if is_block {
        let granule = check_block_sectors(&file, path)?;
        let size = block_device_size(&file).map_err(|e| io_err(path, "reading the size of", e))?;
        (DeviceKind::Block, size, granule)
    } else {
        let granule = check_file_alignment(&file, path)?;
        let current = file.metadata().map_err(|e| io_err(path, "stat of", e))?.len();
        (DeviceKind::File, current, granule)
    };
    Ok(OpenedDevice { kind, size_bytes, created: !exists, granule, file })
}

/// Takes the exclusive advisory lock, failing fast when someone else holds it.
/// Releases the exclusive lock (at close: the I/O threads may still hold the descriptor a
/// little longer, but another engine may take the device at once).
pub fn unlock(file: &File) {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    if rc != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "releasing a device lock failed");
    }
}

pub fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Error::DeviceInUse { path: path.to_path_buf() }
        } else {
            io_err(path, "locking", e)
        });
    }
    Ok(())
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn ioctl_int(file: &File, request: libc::Ioctl) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &raw mut v) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

/// Checks the sector sizes; returns the direct-I/O granule (the logical sector, at least 512).
fn check_block_sectors(file: &File, path: &Path) -> Result<usize> {
    let logical = ioctl_int(file, libc::BLKSSZGET).map_err(|e| io_err(path, "BLKSSZGET on", e))?;
    let physical = ioctl_int(file, libc::BLKPBSZGET).map_err(|e| io_err(path, "BLKPBSZGET on", e))?;
    tracing::info!(device = %path.display(), logical_sector = logical, physical_sector = physical, "block device");
    if logical as usize > IO_ALIGN_BYTES {
        return Err(Error::Device {
            path: path.to_path_buf(),
            detail: format!("logical sector size {logical} exceeds the supported {IO_ALIGN_BYTES} bytes"),
        });
    }
    Ok((logical as usize).clamp(GRANULE_MIN, IO_ALIGN_BYTES).next_power_of_two())
}

/// Checks direct-I/O support; returns the granule statx reports (4096 when it reports none).
fn check_file_alignment(file: &File, path: &Path) -> Result<usize> {
    // SAFETY: statx fills the zeroed struct; we only read it on success.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        let (mem, off) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
        if off == 0 {
            return Err(Error::Device {
                path: path.to_path_buf(),
                detail: "the filesystem reports no direct I/O support for this file".into(),
            });
        }
        if off as usize > IO_ALIGN_BYTES || mem as usize > IO_ALIGN_BYTES {
            return Err(Error::Device {
                path: path.to_path_buf(),
                detail: format!("direct I/O alignment {off}/{mem} exceeds the supported {IO_ALIGN_BYTES} bytes"),
            });
        }
        return Ok((off as usize).clamp(GRANULE_MIN, IO_ALIGN_BYTES).next_power_of_two());
    }
    Ok(IO_ALIGN_BYTES)
}

/// Writes zeros over `[from, size)` of a file device (already sized) through the I/O backend,
/// so later writes overwrite allocated blocks instead of converting unwritten extents.
pub fn zero_fill(io: &Arc<dyn DeviceIo>, path: &Path, from: u64, size: u64) -> Result<()> {
    let zeros = Arc::new(SharedBuf::new(AlignedBuf::zeroed(ZERO_FILL_CHUNK_BYTES)));
    let mut in_flight = std::collections::VecDeque::new();
    let mut offset = from;
    while offset < size {
        let len = (size - offset).min(ZERO_FILL_CHUNK_BYTES as u64) as usize;
        in_flight.push_back(io.write(offset, WriteSource { buf: zeros.clone(), start: 0, len }));
        offset += len as u64;
        if in_flight.len() >= ZERO_FILL_DEPTH
            && let Some(c) = in_flight.pop_front()
        {
            wait_io(c).map_err(|e| io_err(path, "zero-filling", e))?;
        }
    }
    for c in in_flight {
        wait_io(c).map_err(|e| io_err(path, "zero-filling", e))?;
    }
    wait_io(io.sync()).map_err(|e| io_err(path, "syncing", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_reports_device_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.dat");
        let first = open_device(&path, Some(8 << 20), 0).unwrap();
        assert!(first.created);
        assert_eq!(first.kind, DeviceKind::File);
        let started = std::time::Instant::now();
        let second = open_device(&path, Some(8 << 20), 100).unwrap_err();
        assert!(started.elapsed() >= std::time::Duration::from_millis(100), "did not wait for the lock");
        assert!(matches!(second, Error::DeviceInUse { .. }), "{second}");
        assert!(second.to_string().contains("in use"));
        drop(first);
        assert!(!open_device(&path, None, 0).unwrap().created, "the lock goes with the handle");
    }

    #[test]
    fn missing_device_without_size_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_device(&dir.path().join("nope"), None, 0).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
