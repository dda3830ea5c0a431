//! The one seam through which every byte reaches a device: the [`DeviceIo`] trait, with an
//! io_uring implementation (a dedicated thread that owns its ring) and a blocking pread/pwrite
//! thread pool used only where io_uring is denied or when forced by configuration, plus an
//! in-memory simulated device for crash tests ([`sim`]).
//!
//! Buffers are passed by value into an operation and handed back with its result, so the kernel
//! never writes into memory that someone else has freed.

mod blocking;
mod buf;
pub mod sim;
mod uring;

use std::fs::File;
use std::io;
use std::sync::Arc;

pub use buf::{AlignedBuf, IO_ALIGN_BYTES, SharedBuf, align_down, align_up};

use crate::completion::Completion;

/// Which implementation of [`DeviceIo`] to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoBackendChoice {
    /// io_uring when the kernel allows it, else the blocking pool (with a log line saying why).
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// The blocking pread/pwrite pool.
    Blocking,
    /// The in-memory simulated device registered for the device's path ([`sim::device_for_path`]),
    /// for crash tests; the device file is opened and locked but never written.
    Simulated,
}

/// Which implementation a device actually uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackendKind {
    /// io_uring, one ring per device owned by the device's I/O thread.
    Uring,
    /// pread/pwrite on a thread pool.
    Blocking,
    /// An in-memory [`sim::SimDevice`].
    Simulated,
}

impl std::fmt::Display for IoBackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoBackendKind::Uring => "io_uring",
            IoBackendKind::Blocking => "blocking",
            IoBackendKind::Simulated => "simulated",
        })
    }
}

/// Tunables of the I/O backends.
#[derive(Clone, Debug)]
pub struct IoOptions {
    /// Which backend to use.
    pub backend: IoBackendChoice,
    /// Submission-queue entries of each ring (and the cap on operations in flight per device).
    pub ring_entries: u32,
    /// Threads serving reads in the blocking backend (its effective queue depth).
    pub blocking_read_threads: usize,
    /// CPUs for the device I/O threads (device i uses `io_thread_cpus[i % len]`); empty = not
    /// pinned.
    pub io_thread_cpus: Vec<usize>,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            backend: IoBackendChoice::Auto,
            ring_entries: 256,
            blocking_read_threads: 16,
            io_thread_cpus: Vec::new(),
        }
    }
}

/// Bytes to write: a range of a shared buffer, kept alive until the write completes.
#[derive(Debug, Clone)]
pub struct WriteSource {
    /// The buffer holding the bytes.
    pub buf: Arc<SharedBuf>,
    /// Start of the range within `buf` (a multiple of 4096).
    pub start: usize,
    /// Length of the range (a multiple of 4096).
    pub len: usize,
}

/// Positioned, direct I/O on one device. Buffer addresses are multiples of [`IO_ALIGN_BYTES`];
/// offsets and lengths are multiples of the device's direct-I/O granule ([`DeviceIo::granule`],
/// 512 to 4096 bytes). Short transfers are completed internally; errors are returned as is.
pub trait DeviceIo: Send + Sync + std::fmt::Debug {
    /// Which implementation this is.
    fn kind(&self) -> IoBackendKind;

    /// The device's direct-I/O granule for offsets and lengths (512 to 4096, a power of two).
    fn granule(&self) -> usize;

    /// Reads `len` bytes at `offset` into the start of `buf`; hands the buffer back.
    fn read(&self, offset: u64, buf: AlignedBuf, len: usize) -> Completion<io::Result<AlignedBuf>>;

    /// Writes `src` at `offset`.
    fn write(&self, offset: u64, src: WriteSource) -> Completion<io::Result<()>>;

    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> Completion<io::Result<()>>;
}

/// Opens the I/O backend for an already opened (O_DIRECT) device file whose direct-I/O granule
/// is `granule` bytes (512 to 4096).
///
/// With [`IoBackendChoice::Simulated`], `label` must be the device's path (as the engine passes
/// it): the backend is the simulated device registered under that path
/// ([`sim::device_for_path`]), created with the file's current length and `granule` if there is
/// none, else grown to the file's length if it is shorter. `file` is not used for I/O.
pub fn open_backend(
    file: File,
    options: &IoOptions,
    label: &str,
    granule: usize,
    cpu: Option<usize>,
) -> io::Result<Arc<dyn DeviceIo>> {
    assert!(granule.is_power_of_two() && (512..=IO_ALIGN_BYTES).contains(&granule), "granule {granule}");
    let file = Arc::new(file);
    let blocking = |file| -> io::Result<Arc<dyn DeviceIo>> {
        Ok(Arc::new(blocking::BlockingIo::new(file, options.blocking_read_threads, label, granule)?))
    };
    match options.backend {
        IoBackendChoice::Blocking => {
            tracing::info!(device = label, "blocking pread/pwrite I/O forced by configuration");
            blocking(file)
        }
        IoBackendChoice::Simulated => open_simulated(&file, label, granule),
        IoBackendChoice::Uring => Ok(Arc::new(uring::UringIo::new(file, options.ring_entries, label, granule, cpu)?)),
        IoBackendChoice::Auto => match uring::UringIo::new(file.clone(), options.ring_entries, label, granule, cpu) {
            Ok(io) => Ok(Arc::new(io)),
            Err(e) if uring::is_denied(&e) => {
                tracing::warn!(
                    device = label,
                    error = %e,
                    "io_uring is not available here (denied by the kernel or a seccomp filter); \
                     falling back to blocking pread/pwrite I/O"
                );
                blocking(file)
            }
            Err(e) => Err(e),
        },
    }
}

/// The simulated device registered under the path `label`, sized from `file` (see
/// [`open_backend`]).
fn open_simulated(file: &File, label: &str, granule: usize) -> io::Result<Arc<dyn DeviceIo>> {
    let mut size = file.metadata()?.len();
    if size == 0 {
        // A block device reports a zero length in its metadata.
        size = io::Seek::seek(&mut &*file, io::SeekFrom::End(0))?;
    }
    let dev = sim::device_for_path(label, size, granule);
    tracing::info!(device = label, size, granule = dev.granule(), "simulated device I/O");
    Ok(dev)
}

/// Rejects an operation whose offset or length is not a multiple of the device granule: some
/// filesystems silently fall back to buffered I/O for misaligned direct I/O instead of failing.
pub(crate) fn check_alignment(offset: u64, len: usize, granule: usize) -> io::Result<()> {
    if !offset.is_multiple_of(granule as u64) || !len.is_multiple_of(granule) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("direct I/O of {len} bytes at offset {offset} is not aligned to {granule} bytes"),
        ));
    }
    Ok(())
}

/// Checks a read request before it is queued (both backends).
pub(crate) fn check_read(offset: u64, buf: &AlignedBuf, len: usize, granule: usize) -> io::Result<()> {
    assert!(len <= buf.len(), "read of {len} bytes into a {}-byte buffer", buf.len());
    check_alignment(offset, len, granule)
}

/// Checks a write request before it is queued (both backends).
pub(crate) fn check_write(offset: u64, src: &WriteSource, granule: usize) -> io::Result<()> {
    assert!(src.start + src.len <= src.buf.len(), "write range outside its buffer");
    check_alignment(offset, src.len, granule).and(check_alignment(0, src.start, IO_ALIGN_BYTES))
}

fn canceled_error() -> io::Error {
    io::Error::other("the device I/O thread stopped before completing the operation")
}

/// Waits for a completion from a blocking context, mapping cancellation to an I/O error.
pub fn wait_io<T>(c: Completion<io::Result<T>>) -> io::Result<T> {
    c.wait().unwrap_or_else(|_| Err(canceled_error()))
}

/// Awaits a completion, mapping cancellation to an I/O error.
pub async fn await_io<T>(c: Completion<io::Result<T>>) -> io::Result<T> {
    c.await.unwrap_or_else(|_| Err(canceled_error()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn open_direct(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap()
    }

    /// The same write-then-read check on every backend (foyer's habit).
    #[test]
    fn write_read_sync_on_every_backend() {
        for backend in [IoBackendChoice::Uring, IoBackendChoice::Blocking] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dev");
            let file = open_direct(&path);
            file.set_len(1 << 20).unwrap();
            let io = open_backend(file, &IoOptions { backend, ..IoOptions::default() }, "test", 512, None).unwrap();
            let mut data = AlignedBuf::zeroed(64 * 1024);
            for (i, b) in data.as_mut_slice().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let src = WriteSource { buf: Arc::new(SharedBuf::new(data)), start: 4096, len: 32 * 1024 };
            wait_io(io.write(8192, src)).unwrap();
            wait_io(io.sync()).unwrap();
            let back = wait_io(io.read(8192, AlignedBuf::zeroed(32 * 1024), 32 * 1024)).unwrap();
            for (i, b) in back.as_slice().iter().enumerate() {
                assert_eq!(*b, ((i + 4096) % 251) as u8, "{backend:?} byte {i}");
            }
            // Many concurrent reads complete, each with its own buffer.
            let pending: Vec<_> = (0..64).map(|_| io.read(8192, AlignedBuf::zeroed(4096), 4096)).collect();
            for p in pending {
                assert_eq!(wait_io(p).unwrap().as_slice()[0], (4096 % 251) as u8);
            }
            // A read past the end of the file is an error, not silent zeros.
            assert!(wait_io(io.read(2 << 20, AlignedBuf::zeroed(4096), 4096)).is_err());
        }
    }

    #[test]
    fn misaligned_io_is_an_error() {
        for backend in [IoBackendChoice::Uring, IoBackendChoice::Blocking] {
            let dir = tempfile::tempdir().unwrap();
            let file = open_direct(&dir.path().join("dev"));
            file.set_len(1 << 20).unwrap();
            let io = open_backend(file, &IoOptions { backend, ..IoOptions::default() }, "test", 512, None).unwrap();
            // With a 512-byte granule a 512-byte read at offset 512 is fine.
            assert!(wait_io(io.read(512, AlignedBuf::zeroed(4096), 512)).is_ok());
            let r = wait_io(io.read(100, AlignedBuf::zeroed(4096), 4096));
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidInput, "{backend:?} offset");
            let r = wait_io(io.read(0, AlignedBuf::zeroed(4096), 1000));
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidInput, "{backend:?} length");
            let buf = Arc::new(SharedBuf::new(AlignedBuf::zeroed(8192)));
            let r = wait_io(io.write(0, WriteSource { buf, start: 512, len: 4096 }));
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidInput, "{backend:?} buffer");
        }
    }
}
