//! Segment files: naming, creating (preallocated, header written and synced), opening, and the
//! one place every byte of the log passes through on its way to or from a device
//! ([`Segment::write`], [`Segment::read`], both on the engine's `DeviceIo`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use peregrine_engine::io::{
    AlignedBuf, DeviceIo, IoBackendChoice, SharedBuf, WriteSource, await_io, open_backend, wait_io,
};

use super::format::{ALIGN_BYTES, SEGMENT_HEADER_BYTES, SegmentHeader};
use super::{LogOptions, WriteHook};

/// Direct-I/O granule we ask the backend for: every offset and length is a multiple of it.
const GRANULE_BYTES: usize = ALIGN_BYTES;

/// The file name of segment `seq`.
pub fn file_name(seq: u64) -> String {
    format!("seg-{seq:016x}.log")
}

/// The sequence in a segment file name, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// One open segment file.
pub struct Segment {
    /// Sequence (also in the header and the file name).
    pub seq: u64,
    /// Path of the file.
    pub path: PathBuf,
    /// File size in bytes.
    pub bytes: u64,
    io: Arc<dyn DeviceIo>,
    hook: Option<WriteHook>,
    simulated: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("seq", &self.seq).field("path", &self.path).finish_non_exhaustive()
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn open_direct(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "opening {} with O_DIRECT: the filesystem does not support direct I/O (tmpfs?); \
                         put the log directory on ext4, XFS or similar",
                        path.display()
                    ),
                )
            } else {
                with_path(e, "opening log segment", path)
            }
        })
}

/// fsyncs a directory so a file created or deleted in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| with_path(e, "syncing log directory", dir))
}

impl Segment {
    fn from_file(file: File, seq: u64, path: PathBuf, bytes: u64, options: &LogOptions) -> io::Result<Segment> {
        let label = path.to_string_lossy().into_owned();
        let io = open_backend(file, &options.io, &label, GRANULE_BYTES, None)
            .map_err(|e| with_path(e, "opening the I/O backend of", &path))?;
        Ok(Segment {
            seq,
            path,
            bytes,
            io,
            hook: options.write_hook.clone(),
            simulated: options.io.backend == IoBackendChoice::Simulated,
        })
    }

    /// Creates segment `seq` in `dir`: the file at its full size (preallocated), its header
    /// written and synced, the directory synced.
    pub fn create(dir: &Path, seq: u64, log_id: [u8; 16], options: &LogOptions) -> io::Result<Segment> {
        let path = dir.join(file_name(seq));
        let file = open_direct(&path, true)?;
        let bytes = options.segment_bytes;
        file.set_len(bytes).map_err(|e| with_path(e, "sizing", &path))?;
        if options.io.backend != IoBackendChoice::Simulated {
            preallocate(&file, bytes).map_err(|e| with_path(e, "preallocating", &path))?;
        }
        sync_dir(dir)?;
        let seg = Segment::from_file(file, seq, path, bytes, options)?;
        let mut buf = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES);
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        SegmentHeader { sequence: seq, log_id, segment_bytes: bytes, created_unix_ms }.encode(buf.as_mut_slice());
        seg.write(0, buf, SEGMENT_HEADER_BYTES)?;
        seg.sync()?;
        Ok(seg)
    }

    /// Opens an existing segment file (the header is not read here).
    pub fn open(path: PathBuf, seq: u64, options: &LogOptions) -> io::Result<Segment> {
        let file = open_direct(&path, false)?;
        let bytes = file.metadata().map_err(|e| with_path(e, "stat", &path))?.len();
        Segment::from_file(file, seq, path, bytes, options)
    }

    /// Writes the first `len` bytes of `buf` at `offset` (both multiples of 4096).
    pub fn write(&self, offset: u64, buf: AlignedBuf, len: usize) -> io::Result<()> {
        assert!(offset.is_multiple_of(ALIGN_BYTES as u64) && len.is_multiple_of(ALIGN_BYTES), "unaligned write");
        assert!(len <= buf.len(), "write longer than its buffer");
        if offset + len as u64 > self.bytes {
            return Err(io::Error::other(format!(
                "write of {len} bytes at {offset} past the end of segment {} ({} bytes)",
                self.seq, self.bytes
            )));
        }
        if let Some(hook) = &self.hook {
            hook(&self.path, offset, len);
        }
        let src = WriteSource { buf: Arc::new(SharedBuf::new(buf)), start: 0, len };
        wait_io(self.io.write(offset, src)).map_err(|e| with_path(e, "writing", &self.path))
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        wait_io(self.io.sync()).map_err(|e| with_path(e, "syncing", &self.path))
    }

    /// Reads `len` bytes at `offset` (aligned) into a new buffer.
    pub fn read(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        assert!(offset.is_multiple_of(ALIGN_BYTES as u64) && len.is_multiple_of(ALIGN_BYTES), "unaligned read");
        wait_io(self.io.read(offset, AlignedBuf::zeroed(len), len)).map_err(|e| with_path(e, "reading", &self.path))
    }

    /// [`Segment::read_range`] without blocking the calling thread (for the Raft cores, which
    /// run on the async runtime's few workers).
    pub async fn read_range_async(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (start, end) = self.aligned_span(offset, len)?;
        let n = (end - start) as usize;
        let buf = await_io(self.io.read(start, AlignedBuf::zeroed(n), n))
            .await
            .map_err(|e| with_path(e, "reading", &self.path))?;
        let rel = (offset - start) as usize;
        Ok(buf.as_slice()[rel..rel + len].to_vec())
    }

    fn aligned_span(&self, offset: u64, len: usize) -> io::Result<(u64, u64)> {
        let start = offset / ALIGN_BYTES as u64 * ALIGN_BYTES as u64;
        let end = (offset + len as u64).div_ceil(ALIGN_BYTES as u64) * ALIGN_BYTES as u64;
        if end > self.bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("entry at {offset}+{len} lies outside segment {} ({} bytes)", self.seq, self.bytes),
            ));
        }
        Ok((start, end))
    }

    /// Reads the bytes `[offset, offset + len)` (any alignment) with one aligned read.
    pub fn read_range(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (start, end) = self.aligned_span(offset, len)?;
        let buf = self.read(start, (end - start) as usize)?;
        let rel = (offset - start) as usize;
        Ok(buf.as_slice()[rel..rel + len].to_vec())
    }

    /// Deletes the file (and forgets its simulated device).
    pub fn delete(&self) -> io::Result<()> {
        std::fs::remove_file(&self.path).map_err(|e| with_path(e, "deleting", &self.path))?;
        if self.simulated {
            peregrine_engine::io::sim::remove(&self.path);
        }
        Ok(())
    }
}

/// Allocates the file's blocks up front so later writes do not allocate.
fn preallocate(file: &File, bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(bytes).map_err(|_| io::Error::other("segment size overflows off_t"))?;
    // SAFETY: posix_fallocate on a descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate: the file is sparse, which is still correct.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The segment files in `dir`, sorted by sequence; other files are ignored.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| with_path(e, "listing", dir))? {
        let e = e.map_err(|e| with_path(e, "listing", dir))?;
        if let Some(seq) = e.file_name().to_str().and_then(parse_file_name) {
            out.push((seq, e.path()));
        }
    }
    out.sort();
    Ok(out)
}
