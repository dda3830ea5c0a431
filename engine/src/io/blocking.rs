//! Blocking fallback backend: pread/pwrite/fdatasync on a pool of threads (reads and writes on
//! separate pools, so reads never queue behind block writes). Used only where io_uring is denied
//! or when configuration forces it; the engine's tests run on it too.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::{AlignedBuf, DeviceIo, IoBackendKind, WriteSource};
use crate::completion::{Completer, Completion, completion};

enum Op {
    Read { offset: u64, buf: AlignedBuf, len: usize, reply: Completer<io::Result<AlignedBuf>> },
    Write { offset: u64, src: WriteSource, reply: Completer<io::Result<()>> },
    Sync { reply: Completer<io::Result<()>> },
}

/// Threads serving writes and syncs (block flushes are already paced by the writer).
const WRITE_THREADS: usize = 2;

/// Blocking implementation of [`DeviceIo`].
pub struct BlockingIo {
    granule: usize,
    reads: Option<Sender<Op>>,
    writes: Option<Sender<Op>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for BlockingIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockingIo")
    }
}

impl BlockingIo {
    /// Starts the thread pools.
    pub fn new(file: Arc<File>, read_threads: usize, label: &str, granule: usize) -> io::Result<BlockingIo> {
        let (read_tx, read_rx) = unbounded();
        let (write_tx, write_rx) = unbounded();
        let mut threads = Vec::new();
        for (rx, n, role) in [(read_rx, read_threads.max(1), "read"), (write_rx, WRITE_THREADS, "write")] {
            for i in 0..n {
                let rx: Receiver<Op> = rx.clone();
                let file = file.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("pio-{role}{i} {label}"))
                        .spawn(move || serve(&file, &rx))?,
                );
            }
        }
        Ok(BlockingIo { granule, reads: Some(read_tx), writes: Some(write_tx), threads: Mutex::new(threads) })
    }

    fn send(&self, op: Op) {
        let tx = match op {
            Op::Read { .. } => &self.reads,
            _ => &self.writes,
        };
        if let Some(tx) = tx {
            // If the pool is gone the op (and its completer) is dropped: the waiter sees Canceled.
            let _ = tx.send(op);
        }
    }
}

fn serve(file: &File, rx: &Receiver<Op>) {
    while let Ok(op) = rx.recv() {
        match op {
            Op::Read { offset, mut buf, len, reply } => {
                let r = read_full(file, &mut buf.as_mut_slice()[..len], offset).map(|()| buf);
                reply.complete(r);
            }
            Op::Write { offset, src, reply } => {
                // SAFETY: the range lies inside the shared buffer, which `src` keeps alive, and
                // the writer guarantees nobody mutates a range while it is being written.
                let bytes = unsafe { std::slice::from_raw_parts(src.buf.ptr_at(src.start), src.len) };
                reply.complete(file.write_all_at(bytes, offset));
            }
            Op::Sync { reply } => reply.complete(file.sync_data()),
        }
    }
}

fn read_full(file: &File, mut dst: &mut [u8], mut offset: u64) -> io::Result<()> {
    let total = dst.len();
    while !dst.is_empty() {
        match file.read_at(dst, offset) {
            Ok(0) => return Err(super::uring::unexpected_eof(offset, total)),
            Ok(n) => {
                dst = &mut dst[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl DeviceIo for BlockingIo {
    fn kind(&self) -> IoBackendKind {
        IoBackendKind::Blocking
    }

    fn granule(&self) -> usize {
        self.granule
    }

    fn read(&self, offset: u64, buf: AlignedBuf, len: usize) -> Completion<io::Result<AlignedBuf>> {
        if let Err(e) = super::check_read(offset, &buf, len, self.granule) {
            return Completion::ready(Err(e));
        }
        let (reply, c) = completion();
        self.send(Op::Read { offset, buf, len, reply });
        c
    }

    fn write(&self, offset: u64, src: WriteSource) -> Completion<io::Result<()>> {
        if let Err(e) = super::check_write(offset, &src, self.granule) {
            return Completion::ready(Err(e));
        }
        let (reply, c) = completion();
        self.send(Op::Write { offset, src, reply });
        c
    }

    fn sync(&self) -> Completion<io::Result<()>> {
        let (reply, c) = completion();
        self.send(Op::Sync { reply });
        c
    }
}

impl Drop for BlockingIo {
    fn drop(&mut self) {
        self.reads.take();
        self.writes.take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("blocking I/O thread panicked");
            }
        }
    }
}
