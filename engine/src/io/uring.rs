//! io_uring backend: one thread per device owns the ring (so SINGLE_ISSUER holds) and serves a
//! request queue, reads before writes. The thread sleeps in `io_uring_enter` with a read armed
//! on an eventfd; producers write the eventfd only when the thread says it is about to sleep,
//! and the thread re-checks the queue after saying so, so no wake-up is lost.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use io_uring::{IoUring, Probe, opcode, squeue, types};

use super::{AlignedBuf, DeviceIo, IoBackendKind, WriteSource};
use crate::completion::{Completer, Completion, completion};

const EVENTFD_TAG: u64 = u64::MAX;

enum Op {
    Read { offset: u64, buf: AlignedBuf, len: usize, done: usize, reply: Completer<io::Result<AlignedBuf>> },
    Write { offset: u64, src: WriteSource, done: usize, reply: Completer<io::Result<()>> },
    Sync { reply: Completer<io::Result<()>> },
}

#[derive(Default)]
struct Queues {
    reads: VecDeque<Op>,
    others: VecDeque<Op>,
}

impl Queues {
    fn pop(&mut self) -> Option<Op> {
        self.reads.pop_front().or_else(|| self.others.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.others.is_empty()
    }
}

struct Shared {
    file: Arc<File>,
    queues: Mutex<Queues>,
    sleeping: AtomicBool,
    stopping: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        let n = unsafe { libc::write(self.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
        debug_assert!(n == 8 || io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN));
    }
}

/// io_uring implementation of [`DeviceIo`].
pub struct UringIo {
    granule: usize,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringIo")
    }
}

/// Whether a setup error means "io_uring is not allowed here" (fall back) rather than a bug.
pub fn is_denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS | libc::EACCES | libc::EOPNOTSUPP))
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    match IoUring::builder().setup_single_issuer().setup_coop_taskrun().build(entries) {
        Ok(ring) => Ok(ring),
        // Kernels before 6.0 reject SINGLE_ISSUER (and before 5.19 COOP_TASKRUN) with EINVAL.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        Err(e) => Err(e),
    }
}

fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [(opcode::Read::CODE, "READ"), (opcode::Write::CODE, "WRITE"), (opcode::Fsync::CODE, "FSYNC")] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring opcode {name} not supported")));
        }
    }
    Ok(())
}

impl UringIo {
    /// Starts the device's I/O thread and its ring. Fails (with the kernel's error) when
    /// io_uring cannot be set up.
    pub fn new(
        file: Arc<File>,
        ring_entries: u32,
        label: &str,
        granule: usize,
        cpu: Option<usize>,
    ) -> io::Result<UringIo> {
        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            file,
            queues: Mutex::new(Queues::default()),
            sleeping: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            eventfd,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        let entries = ring_entries.max(8);
        let thread = std::thread::Builder::new().name(format!("io-uring {label}")).spawn(move || {
            if let Some(cpu) = cpu
                && let Err(e) = crate::affinity::pin_current_thread(&[cpu])
            {
                tracing::warn!(cpu, error = %e, "could not pin the I/O thread");
            }
            let ring = build_ring(entries).and_then(|ring| check_opcodes(&ring).map(|()| ring));
            match ring {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    IoThread::new(thread_shared, ring, entries as usize).run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(UringIo { granule, shared, thread: Mutex::new(Some(thread)) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("io_uring thread exited during setup")),
        }
    }

    fn enqueue(&self, op: Op) {
        {
            let mut q = self.shared.queues.lock().unwrap_or_else(PoisonError::into_inner);
            match op {
                Op::Read { .. } => q.reads.push_back(op),
                _ => q.others.push_back(op),
            }
        }
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
    }
}

impl DeviceIo for UringIo {
    fn kind(&self) -> IoBackendKind {
        IoBackendKind::Uring
    }

    fn granule(&self) -> usize {
        self.granule
    }

    fn read(&self, offset: u64, buf: AlignedBuf, len: usize) -> Completion<io::Result<AlignedBuf>> {
        if let Err(e) = super::check_read(offset, &buf, len, self.granule) {
            return Completion::ready(Err(e));
        }
        let (reply, c) = completion();
        self.enqueue(Op::Read { offset, buf, len, done: 0, reply });
        c
    }

    fn write(&self, offset: u64, src: WriteSource) -> Completion<io::Result<()>> {
        if let Err(e) = super::check_write(offset, &src, self.granule) {
            return Completion::ready(Err(e));
        }
        let (reply, c) = completion();
        self.enqueue(Op::Write { offset, src, done: 0, reply });
        c
    }

    fn sync(&self) -> Completion<io::Result<()>> {
        let (reply, c) = completion();
        self.enqueue(Op::Sync { reply });
        c
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake();
        let handle = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("io_uring thread panicked");
        }
    }
}

struct IoThread {
    shared: Arc<Shared>,
    ring: IoUring,
    fd: RawFd,
    /// In-flight operations; the slot index is the SQE's user_data.
    slots: Vec<Option<Op>>,
    free_slots: Vec<usize>,
    eventfd_buf: Box<u64>,
}

impl IoThread {
    fn new(shared: Arc<Shared>, ring: IoUring, depth: usize) -> IoThread {
        let fd = shared.file.as_raw_fd();
        IoThread {
            shared,
            ring,
            fd,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            eventfd_buf: Box::new(0),
        }
    }

    fn run(mut self) {
        self.arm_eventfd();
        loop {
            self.fill_submission_queue();
            let in_flight = self.slots.len() - self.free_slots.len();
            if self.shared.stopping.load(Ordering::SeqCst) && in_flight == 0 && self.queue_is_empty() {
                return;
            }
            // Announce sleep, then re-check: a producer that pushed before seeing the flag
            // is picked up here; one that pushes after will write the eventfd.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let wait = if self.queue_is_empty() && !self.shared.stopping.load(Ordering::SeqCst) { 1 } else { 0 };
            if let Err(e) = self.ring.submit_and_wait(wait) {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                    _ => tracing::error!(error = %e, "io_uring_enter failed"),
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    fn queue_is_empty(&self) -> bool {
        self.shared.queues.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    fn arm_eventfd(&mut self) {
        let ptr = (&raw mut *self.eventfd_buf).cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), ptr, 8).build().user_data(EVENTFD_TAG);
        self.push(sqe);
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every pointer in the SQE stays valid until its CQE is reaped: buffers are
            // owned by the op parked in `slots` (or by `eventfd_buf`).
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                return;
            }
            // Submission queue full: hand what we have to the kernel and try again.
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed while the queue was full");
            }
        }
    }

    fn fill_submission_queue(&mut self) {
        while !self.free_slots.is_empty() {
            let op = self.shared.queues.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some(op) = op else { break };
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            self.slots[slot] = Some(op);
            self.submit_slot(slot);
        }
    }

    fn submit_slot(&mut self, slot: usize) {
        let fd = types::Fd(self.fd);
        let sqe = match &mut self.slots[slot] {
            Some(Op::Read { offset, buf, len, done, .. }) => {
                // SAFETY: done < len <= buf.len(), so the pointer stays inside the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(*done) };
                opcode::Read::new(fd, ptr, (*len - *done) as u32).offset(*offset + *done as u64).build()
            }
            Some(Op::Write { offset, src, done, .. }) => {
                let ptr = src.buf.ptr_at(src.start + *done);
                opcode::Write::new(fd, ptr, (src.len - *done) as u32).offset(*offset + *done as u64).build()
            }
            Some(Op::Sync { .. }) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            None => return,
        };
        self.push(sqe.user_data(slot as u64));
    }

    fn reap(&mut self) {
        let completed: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (tag, result) in completed {
            if tag == EVENTFD_TAG {
                self.arm_eventfd();
                continue;
            }
            self.complete_slot(tag as usize, result);
        }
    }

    fn complete_slot(&mut self, slot: usize, result: i32) {
        if result == -libc::EAGAIN || result == -libc::EINTR {
            self.submit_slot(slot);
            return;
        }
        let Some(op) = self.slots.get_mut(slot).and_then(Option::take) else {
            tracing::error!(slot, "completion for an unknown io_uring slot");
            return;
        };
        let outcome = if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as usize) };
        match op {
            Op::Read { offset, buf, len, done, reply } => match outcome {
                Ok(0) => reply.complete(Err(unexpected_eof(offset, len))),
                Ok(n) if done + n < len => {
                    self.slots[slot] = Some(Op::Read { offset, buf, len, done: done + n, reply });
                    return self.submit_slot(slot);
                }
                Ok(_) => reply.complete(Ok(buf)),
                Err(e) => reply.complete(Err(e)),
            },
            Op::Write { offset, src, done, reply } => match outcome {
                Ok(0) => reply.complete(Err(io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes"))),
                Ok(n) if done + n < src.len => {
                    self.slots[slot] = Some(Op::Write { offset, src, done: done + n, reply });
                    return self.submit_slot(slot);
                }
                Ok(_) => reply.complete(Ok(())),
                Err(e) => reply.complete(Err(e)),
            },
            Op::Sync { reply } => reply.complete(outcome.map(|_| ())),
        }
        self.free_slots.push(slot);
    }
}

pub(super) fn unexpected_eof(offset: u64, len: usize) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("read of {len} bytes at offset {offset} ran past the end"))
}
