//! A simulated device for crash tests: an in-memory [`DeviceIo`] that knows which bytes a power
//! cut would keep.
//!
//! A [`SimDevice`] owns two images of the device. The *live* image is what reads see: every
//! completed write. The *durable* image is what survives a power cut: only writes covered by a
//! completed sync. The writes completed since the last sync are kept (offset and bytes), so
//! [`SimDevice::crash_image`] can build what a power cut may leave: the durable image plus a
//! seeded pseudo-random subset of those writes, each possibly torn at sector (granule)
//! boundaries. [`SimDevice::restore_from`] "reboots" the device from such an image.
//!
//! Operations complete synchronously, validated exactly like the real backends (the same
//! `check_read` / `check_write`): misaligned operations fail with `InvalidInput`, reads past the
//! end with `UnexpectedEof`. Writes past the end extend the device with zeros, like `pwrite` on
//! a regular file (the engine sizes a new device file with `set_len` after opening it, which the
//! simulation does not see), up to a size limit ([`SimDevice::set_size_limit`], 4 GiB by
//! default) beyond which they fail with `ENOSPC`.
//!
//! Failpoints ([`SimDevice::arm`]) make the Nth write or Nth operation fail in one of the ways of
//! [`Fault`]; after a power cut ([`Fault::Torn`], [`Fault::Cut`], [`SimDevice::cut_now`]) every
//! operation fails until the device is restored.
//!
//! A process-global registry keyed by (lexically canonicalised) path, [`device_for_path`],
//! lets an engine that is closed and reopened on the same configured path find the same device:
//! that is what [`open_backend`](super::open_backend) does for
//! [`IoBackendChoice::Simulated`](super::IoBackendChoice::Simulated). The real device file is
//! never written by the simulation.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use super::{AlignedBuf, DeviceIo, IO_ALIGN_BYTES, IoBackendKind, WriteSource};
use crate::completion::Completion;

/// Default sector (direct-I/O granule) of a simulated device.
pub const DEFAULT_GRANULE: usize = 512;

/// Default cap on how far writes may extend a simulated device.
pub const DEFAULT_SIZE_LIMIT_BYTES: u64 = 4 << 30;

/// How an armed failpoint makes its operation fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The operation fails with an I/O error; nothing is written (a sync makes nothing durable).
    Error,
    /// A write lands only its first half of sectors (rounded down) in the live image, then fails
    /// with an I/O error. On a read or sync this is the same as [`Fault::Error`].
    Short,
    /// A write lands a prefix of its sectors (half of them, rounded up, so at least one), then the
    /// power is cut: this and every later operation fails and nothing more lands. On a read or
    /// sync this is the same as [`Fault::Cut`].
    Torn,
    /// Like [`Fault::Torn`] with exactly this many leading sectors landing (capped at the
    /// write's length).
    TornAfter(usize),
    /// The power is cut just before this operation: it and every later operation fails.
    Cut,
    /// The calling thread panics before the operation does anything (a bug in the I/O path,
    /// for tests of what a dying background thread leaves behind).
    Panic,
}

/// Which operation an armed failpoint hits, counted from the moment it is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// The Nth write issued after arming (0 = the next write).
    Write(u64),
    /// The Nth operation of any kind (read, write or sync) issued after arming (0 = the next).
    Op(u64),
}

/// The kind of a simulated operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A sync.
    Sync,
}

/// One operation as seen by the device (recorded only while tracing, see
/// [`SimDevice::set_tracing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpRecord {
    /// Index among all operations since the device was created (0-based).
    pub index: u64,
    /// What it was.
    pub kind: OpKind,
    /// Index among operations of the same kind since the device was created (0-based).
    pub kind_index: u64,
    /// Device offset (0 for syncs).
    pub offset: u64,
    /// Length in bytes (0 for syncs).
    pub len: usize,
    /// The fault injected into it, if any.
    pub fault: Option<Fault>,
    /// Whether it succeeded.
    pub ok: bool,
}

/// Why a simulated operation failed (the inner error of the `io::Error`s the device returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimError {
    /// The power was cut; every operation fails until the device is restored.
    PowerCut,
    /// A [`Fault::Error`] failpoint fired.
    Injected,
    /// A [`Fault::Short`] failpoint fired.
    ShortWrite,
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SimError::PowerCut => "simulated power cut",
            SimError::Injected => "simulated I/O error",
            SimError::ShortWrite => "simulated short write",
        })
    }
}

impl std::error::Error for SimError {}

impl SimError {
    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The simulated failure behind `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<SimError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<SimError>()).copied()
    }
}

/// Whether `e` is the error of an operation refused because of a simulated power cut.
pub fn is_power_cut(e: &io::Error) -> bool {
    SimError::of(e) == Some(SimError::PowerCut)
}

#[derive(Clone, Copy, Debug)]
enum Target {
    WriteIndex(u64),
    OpIndex(u64),
}

#[derive(Clone, Copy, Debug)]
struct Armed {
    target: Target,
    fault: Fault,
}

/// A write (or the landed part of one) completed since the last sync.
#[derive(Debug)]
struct Pending {
    offset: usize,
    bytes: Vec<u8>,
}

struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    armed: Vec<Armed>,
    cut: bool,
    limit: u64,
    trace: Option<Vec<OpRecord>>,
}

/// An in-memory device with a live and a durable image, failpoints and crash images (see the
/// module documentation).
pub struct SimDevice {
    granule: usize,
    state: Mutex<State>,
    pause: Mutex<Option<Arc<WritePause>>>,
    ops: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("granule", &self.granule)
            .field("size_bytes", &self.size_bytes())
            .field("reads", &self.reads())
            .field("writes", &self.writes())
            .field("syncs", &self.syncs())
            .finish_non_exhaustive()
    }
}

fn set_len_at_least(image: &mut Vec<u8>, len: usize) {
    if image.len() < len {
        image.resize(len, 0);
    }
}

fn apply(image: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    set_len_at_least(image, offset + bytes.len());
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// SplitMix64: small, seedable, good enough to pick subsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

impl SimDevice {
    /// A zeroed device of `size_bytes` with 512-byte sectors.
    pub fn new(size_bytes: u64) -> SimDevice {
        SimDevice::with_granule(size_bytes, DEFAULT_GRANULE)
    }

    /// A zeroed device of `size_bytes` whose sector (direct-I/O granule) is `granule` bytes
    /// (a power of two, 512 to 4096).
    pub fn with_granule(size_bytes: u64, granule: usize) -> SimDevice {
        assert!(granule.is_power_of_two() && (512..=IO_ALIGN_BYTES).contains(&granule), "granule {granule}");
        let len = usize::try_from(size_bytes).unwrap_or_else(|_| panic!("{size_bytes} bytes do not fit in memory"));
        SimDevice {
            granule,
            state: Mutex::new(State {
                live: vec![0; len],
                durable: vec![0; len],
                pending: Vec::new(),
                armed: Vec::new(),
                cut: false,
                limit: DEFAULT_SIZE_LIMIT_BYTES.max(size_bytes),
                trace: None,
            }),
            pause: Mutex::new(None),
            ops: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds the next write whose range covers byte `offset` before it reads its source bytes,
    /// until [`WritePause::release`]: a test can change memory while the "kernel" is about to
    /// copy it, which shows whether the writer handed over bytes someone else still writes.
    pub fn pause_write_covering(&self, offset: u64) -> Arc<WritePause> {
        let p = Arc::new(WritePause { offset, state: Mutex::new((false, false)), changed: Condvar::new() });
        *self.pause.lock().unwrap_or_else(PoisonError::into_inner) = Some(p.clone());
        p
    }

    fn maybe_pause(&self, offset: u64, len: usize) {
        let hit = {
            let mut slot = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(p) if p.offset >= offset && p.offset < offset + len as u64 => slot.take(),
                _ => None,
            }
        };
        if let Some(p) = hit {
            let mut st = p.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.0 = true;
            p.changed.notify_all();
            while !st.1 {
                st = p.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Current size of the live image in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.lock().live.len() as u64
    }

    /// Grows both images to at least `size_bytes` with zeros (like `set_len` on a file, made
    /// durable); never shrinks.
    pub fn grow_to(&self, size_bytes: u64) {
        let len = usize::try_from(size_bytes).unwrap_or_else(|_| panic!("{size_bytes} bytes do not fit in memory"));
        let mut st = self.lock();
        set_len_at_least(&mut st.live, len);
        set_len_at_least(&mut st.durable, len);
        st.limit = st.limit.max(size_bytes);
    }

    /// Caps how far writes may extend the device; writes ending beyond it fail with `ENOSPC`.
    pub fn set_size_limit(&self, bytes: u64) {
        self.lock().limit = bytes;
    }

    /// Operations of any kind issued so far (after validation), including failed ones.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Reads issued so far (after validation), including failed ones.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes issued so far (after validation), including failed ones.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Syncs issued so far, including failed ones.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Starts (clearing any earlier record) or stops recording every operation.
    pub fn set_tracing(&self, on: bool) {
        self.lock().trace = on.then(Vec::new);
    }

    /// The operations recorded since tracing was turned on.
    pub fn trace(&self) -> Vec<OpRecord> {
        self.lock().trace.clone().unwrap_or_default()
    }

    /// Arms a one-shot failpoint: the operation picked by `at`, counted from now, fails with
    /// `fault`. Several failpoints may be armed at once.
    pub fn arm(&self, at: At, fault: Fault) {
        let mut st = self.lock();
        // Under the lock, so no operation is numbered between reading the counter and arming.
        let target = match at {
            At::Write(n) => Target::WriteIndex(self.writes() + n),
            At::Op(n) => Target::OpIndex(self.ops() + n),
        };
        st.armed.push(Armed { target, fault });
    }

    /// Arms a one-shot failpoint on the write whose index since the device was created is
    /// `index` (see [`SimDevice::writes`]).
    pub fn arm_at_write_index(&self, index: u64, fault: Fault) {
        self.lock().armed.push(Armed { target: Target::WriteIndex(index), fault });
    }

    /// Disarms every failpoint that has not fired yet.
    pub fn disarm(&self) {
        self.lock().armed.clear();
    }

    /// Cuts the power now: every later operation fails until [`SimDevice::restore_from`].
    pub fn cut_now(&self) {
        self.lock().cut = true;
    }

    /// Whether the power has been cut.
    pub fn is_cut(&self) -> bool {
        self.lock().cut
    }

    /// What reads see: every completed write.
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// What a power cut is certain to keep: exactly the writes covered by a completed sync.
    pub fn crash_image_synced_only(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// (offset, length) of each write (or landed part of one) completed since the last sync, in
    /// completion order.
    pub fn unsynced_writes(&self) -> Vec<(u64, usize)> {
        self.lock().pending.iter().map(|p| (p.offset as u64, p.bytes.len())).collect()
    }

    /// What a power cut may leave, chosen by `seed` (the same seed gives the same image): the
    /// durable image plus a pseudo-random subset of the writes completed since the last sync,
    /// applied in completion order, each either lost, kept whole, or torn at sector boundaries
    /// (a prefix, a suffix or a scattered subset of its sectors kept). Sectors are atomic.
    /// Writes that extended the device extend the image only if some of their sectors are kept.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        let st = self.lock();
        let mut image = st.durable.clone();
        let mut rng = Rng(seed ^ 0x5EED_C4A5_11ED_0FF5);
        let g = self.granule;
        for p in &st.pending {
            let sectors = p.bytes.len() / g;
            let keep: Vec<bool> = match rng.below(5) {
                0 => vec![false; sectors],
                1 => vec![true; sectors],
                2 => {
                    let k = rng.below(sectors);
                    (0..sectors).map(|s| s < k).collect()
                }
                3 => {
                    let k = rng.below(sectors);
                    (0..sectors).map(|s| s >= sectors - k).collect()
                }
                _ => (0..sectors).map(|_| rng.next() & 1 == 1).collect(),
            };
            for (s, kept) in keep.into_iter().enumerate() {
                if kept {
                    apply(&mut image, p.offset + s * g, &p.bytes[s * g..(s + 1) * g]);
                }
            }
        }
        image
    }

    /// "Reboots" the device from `image` (usually a crash image): both images become `image`,
    /// and the unsynced writes, the power cut and every armed failpoint are cleared. The
    /// operation counters keep counting.
    pub fn restore_from(&self, image: &[u8]) {
        let mut st = self.lock();
        st.live = image.to_vec();
        st.durable = image.to_vec();
        st.pending.clear();
        st.armed.clear();
        st.cut = false;
        st.limit = st.limit.max(image.len() as u64);
    }

    /// Numbers an operation and takes the failpoint that hits it, if any.
    fn begin(&self, st: &mut State, kind: OpKind) -> (u64, u64, Option<Fault>) {
        let index = self.ops.fetch_add(1, Ordering::Relaxed);
        let counter = match kind {
            OpKind::Read => &self.reads,
            OpKind::Write => &self.writes,
            OpKind::Sync => &self.syncs,
        };
        let kind_index = counter.fetch_add(1, Ordering::Relaxed);
        let hit = st.armed.iter().position(|a| match a.target {
            Target::OpIndex(i) => i == index,
            Target::WriteIndex(i) => kind == OpKind::Write && i == kind_index,
        });
        (index, kind_index, hit.map(|i| st.armed.remove(i).fault))
    }

    fn finish<T>(&self, st: &mut State, op: OpRecord, r: io::Result<T>) -> Completion<io::Result<T>> {
        if let Some(trace) = &mut st.trace {
            trace.push(OpRecord { ok: r.is_ok(), ..op });
        }
        Completion::ready(r)
    }

    fn do_write(&self, st: &mut State, offset: u64, src: &WriteSource, fault: Option<Fault>) -> io::Result<()> {
        if st.cut {
            return Err(SimError::PowerCut.into_io());
        }
        let sectors = src.len / self.granule;
        let (landing, result) = match fault {
            None => (sectors, Ok(())),
            Some(Fault::Error) => (0, Err(SimError::Injected)),
            Some(Fault::Short) => (sectors / 2, Err(SimError::ShortWrite)),
            Some(Fault::Torn) => (sectors.div_ceil(2), Err(SimError::PowerCut)),
            Some(Fault::TornAfter(n)) => (n.min(sectors), Err(SimError::PowerCut)),
            Some(Fault::Cut) => (0, Err(SimError::PowerCut)),
            Some(Fault::Panic) => (0, Err(SimError::Injected)),
        };
        if result == Err(SimError::PowerCut) {
            st.cut = true;
        }
        let bytes = landing * self.granule;
        if bytes > 0 {
            if (offset as u128 + src.len as u128) > u128::from(st.limit) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let offset = offset as usize;
            set_len_at_least(&mut st.live, offset + bytes);
            let dst = &mut st.live[offset..offset + bytes];
            src.buf.read_at(src.start, dst);
            let landed = dst.to_vec();
            st.pending.push(Pending { offset, bytes: landed });
        }
        result.map_err(SimError::into_io)
    }

    fn do_read(
        &self,
        st: &State,
        offset: u64,
        buf: &mut AlignedBuf,
        len: usize,
        fault: Option<Fault>,
    ) -> io::Result<()> {
        if st.cut {
            return Err(SimError::PowerCut.into_io());
        }
        if fault.is_some() {
            return Err(SimError::Injected.into_io());
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= st.live.len() as u64 => {
                let offset = offset as usize;
                buf.as_mut_slice()[..len].copy_from_slice(&st.live[offset..offset + len]);
                Ok(())
            }
            _ => Err(super::uring::unexpected_eof(offset, len)),
        }
    }

    fn do_sync(&self, st: &mut State, fault: Option<Fault>) -> io::Result<()> {
        if st.cut {
            return Err(SimError::PowerCut.into_io());
        }
        if fault.is_some() {
            return Err(SimError::Injected.into_io());
        }
        let State { durable, pending, .. } = st;
        for p in pending.drain(..) {
            apply(durable, p.offset, &p.bytes);
        }
        Ok(())
    }
}

/// A read or sync hit by a power-cutting fault cuts the power before it runs.
fn cuts_before(fault: Option<Fault>) -> bool {
    matches!(fault, Some(Fault::Torn | Fault::TornAfter(_) | Fault::Cut))
}

impl DeviceIo for SimDevice {
    fn kind(&self) -> IoBackendKind {
        IoBackendKind::Simulated
    }

    fn granule(&self) -> usize {
        self.granule
    }

    fn read(&self, offset: u64, mut buf: AlignedBuf, len: usize) -> Completion<io::Result<AlignedBuf>> {
        if let Err(e) = super::check_read(offset, &buf, len, self.granule) {
            return Completion::ready(Err(e));
        }
        let mut st = self.lock();
        let (index, kind_index, fault) = self.begin(&mut st, OpKind::Read);
        if cuts_before(fault) {
            st.cut = true;
        }
        let r = self.do_read(&st, offset, &mut buf, len, fault).map(|()| buf);
        let op = OpRecord { index, kind: OpKind::Read, kind_index, offset, len, fault, ok: false };
        self.finish(&mut st, op, r)
    }

    fn write(&self, offset: u64, src: WriteSource) -> Completion<io::Result<()>> {
        if let Err(e) = super::check_write(offset, &src, self.granule) {
            return Completion::ready(Err(e));
        }
        self.maybe_pause(offset, src.len);
        let mut st = self.lock();
        let (index, kind_index, fault) = self.begin(&mut st, OpKind::Write);
        if fault == Some(Fault::Panic) {
            drop(st);
            panic!("simulated panic in a device write at offset {offset}");
        }
        let r = self.do_write(&mut st, offset, &src, fault);
        let op = OpRecord { index, kind: OpKind::Write, kind_index, offset, len: src.len, fault, ok: false };
        self.finish(&mut st, op, r)
    }

    fn sync(&self) -> Completion<io::Result<()>> {
        let mut st = self.lock();
        let (index, kind_index, fault) = self.begin(&mut st, OpKind::Sync);
        if cuts_before(fault) {
            st.cut = true;
        }
        let r = self.do_sync(&mut st, fault);
        let op = OpRecord { index, kind: OpKind::Sync, kind_index, offset: 0, len: 0, fault, ok: false };
        self.finish(&mut st, op, r)
    }
}

/// A write held by [`SimDevice::pause_write_covering`].
#[derive(Debug)]
pub struct WritePause {
    offset: u64,
    /// (reached, released)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl WritePause {
    /// Waits until the paused write has arrived (or `timeout` passes); returns whether it did.
    pub fn wait_reached(&self, timeout: std::time::Duration) -> bool {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (st, _) = self.changed.wait_timeout_while(st, timeout, |s| !s.0).unwrap_or_else(PoisonError::into_inner);
        st.0
    }

    /// Lets the paused write go on.
    pub fn release(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.changed.notify_all();
    }
}

type Registry = Mutex<HashMap<PathBuf, Arc<SimDevice>>>;

fn registry() -> MutexGuard<'static, HashMap<PathBuf, Arc<SimDevice>>> {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// The registry key of `path`: made absolute against the current directory and normalised
/// lexically (`.` dropped, `..` pops a component); symbolic links are not resolved and the path
/// need not exist.
pub fn canonical_path(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// The simulated device registered for `path`, created (zeroed, `size_bytes`, sectors of
/// `granule` bytes) if there is none. An existing device keeps its contents, state and granule,
/// and is grown with zeros to `size_bytes` if it is smaller (never shrunk).
pub fn device_for_path(path: impl AsRef<Path>, size_bytes: u64, granule: usize) -> Arc<SimDevice> {
    let key = canonical_path(path);
    let mut reg = registry();
    if let Some(dev) = reg.get(&key) {
        dev.grow_to(size_bytes);
        return dev.clone();
    }
    let dev = Arc::new(SimDevice::with_granule(size_bytes, granule));
    reg.insert(key, dev.clone());
    dev
}

/// The simulated device registered for `path`, if any.
pub fn lookup(path: impl AsRef<Path>) -> Option<Arc<SimDevice>> {
    registry().get(&canonical_path(path)).cloned()
}

/// Forgets the simulated device registered for `path` (the next [`device_for_path`] creates a
/// fresh one) and returns it.
pub fn remove(path: impl AsRef<Path>) -> Option<Arc<SimDevice>> {
    registry().remove(&canonical_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{IoBackendChoice, IoOptions, SharedBuf, open_backend, wait_io};

    const G: usize = 512;

    /// A source of `len` bytes, every byte `fill`.
    fn src(fill: u8, len: usize) -> WriteSource {
        let mut b = AlignedBuf::zeroed(len);
        b.as_mut_slice().fill(fill);
        WriteSource { buf: Arc::new(SharedBuf::new(b)), start: 0, len }
    }

    fn write(dev: &SimDevice, offset: u64, fill: u8, len: usize) -> io::Result<()> {
        wait_io(dev.write(offset, src(fill, len)))
    }

    fn read(dev: &SimDevice, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        wait_io(dev.read(offset, AlignedBuf::zeroed(len), len)).map(|b| b.as_slice()[..len].to_vec())
    }

    fn all(bytes: &[u8], v: u8) -> bool {
        bytes.iter().all(|&b| b == v)
    }

    #[test]
    fn write_read_round_trip() {
        let dev = SimDevice::new(1 << 20);
        assert_eq!(dev.granule(), DEFAULT_GRANULE);
        assert_eq!(dev.kind(), IoBackendKind::Simulated);
        let mut data = AlignedBuf::zeroed(64 * 1024);
        for (i, b) in data.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let s = WriteSource { buf: Arc::new(SharedBuf::new(data)), start: 4096, len: 32 * 1024 };
        wait_io(dev.write(8192, s)).unwrap();
        let back = read(&dev, 8192, 32 * 1024).unwrap();
        for (i, b) in back.iter().enumerate() {
            assert_eq!(*b, ((i + 4096) % 251) as u8, "byte {i}");
        }
        assert!(all(&read(&dev, 0, 8192).unwrap(), 0));
        assert_eq!((dev.writes(), dev.reads(), dev.syncs(), dev.ops()), (1, 2, 0, 3));
        wait_io(dev.sync()).unwrap();
        assert_eq!((dev.syncs(), dev.ops()), (1, 4));
    }

    #[test]
    fn unsynced_writes_are_live_but_not_durable() {
        let dev = SimDevice::new(64 * 1024);
        write(&dev, 4096, 0xAA, 4096).unwrap();
        assert!(all(&dev.live_image()[4096..8192], 0xAA));
        assert!(all(&dev.crash_image_synced_only(), 0));
        assert_eq!(dev.unsynced_writes(), vec![(4096, 4096)]);
        wait_io(dev.sync()).unwrap();
        assert!(dev.unsynced_writes().is_empty());
        assert!(all(&dev.crash_image_synced_only()[4096..8192], 0xAA));
        assert_eq!(dev.live_image(), dev.crash_image_synced_only());
        // A later unsynced overwrite: live shows it, durable keeps the synced bytes.
        write(&dev, 4096, 0xBB, 1024).unwrap();
        let live = dev.live_image();
        let durable = dev.crash_image_synced_only();
        assert!(all(&live[4096..5120], 0xBB) && all(&live[5120..8192], 0xAA));
        assert!(all(&durable[4096..8192], 0xAA));
    }

    #[test]
    fn crash_images_pick_seeded_subsets_of_written_bytes() {
        let dev = SimDevice::new(256 * 1024);
        write(&dev, 0, 1, 64 * 1024).unwrap();
        wait_io(dev.sync()).unwrap();
        // 24 unsynced writes of 8 sectors each, some overlapping the synced range and each other.
        // Every value each byte was ever written with.
        let mut written: Vec<Vec<u8>> = vec![Vec::new(); 256 * 1024];
        for v in &mut written[..64 * 1024] {
            v.push(1);
        }
        for i in 0..24u64 {
            let offset = (i * 7 % 40) * 4096;
            let fill = 10 + i as u8;
            write(&dev, offset, fill, 4096).unwrap();
            for v in &mut written[offset as usize..offset as usize + 4096] {
                v.push(fill);
            }
        }
        let durable = dev.crash_image_synced_only();
        let live = dev.live_image();
        let mut distinct = std::collections::HashSet::new();
        for seed in 0..16 {
            let image = dev.crash_image(seed);
            assert_eq!(image, dev.crash_image(seed), "seed {seed} is deterministic");
            assert_eq!(image.len(), durable.len());
            for (i, &b) in image.iter().enumerate() {
                assert!(b == durable[i] || written[i].contains(&b), "seed {seed}: byte {i} = {b} never written");
                if i % G != 0 {
                    // Sectors are atomic: every byte of a sector comes from the same write.
                    assert_eq!(b, image[i - 1], "seed {seed}: sector of byte {i} is mixed");
                }
            }
            distinct.insert(image);
        }
        assert!(distinct.len() > 8, "seeds give differing images ({} distinct)", distinct.len());
        assert!(distinct.iter().any(|i| *i != live && *i != durable), "some images are neither extreme");
        // Once synced there is nothing left to choose from.
        wait_io(dev.sync()).unwrap();
        assert_eq!(dev.crash_image(3), dev.live_image());
        assert_eq!(dev.crash_image(3), dev.crash_image_synced_only());
    }

    #[test]
    fn error_fault_writes_nothing() {
        let dev = SimDevice::new(64 * 1024);
        write(&dev, 0, 1, 4096).unwrap();
        dev.arm(At::Write(1), Fault::Error);
        write(&dev, 4096, 2, 4096).unwrap();
        let e = write(&dev, 8192, 3, 4096).unwrap_err();
        assert_eq!(SimError::of(&e), Some(SimError::Injected));
        assert!(!is_power_cut(&e));
        assert!(all(&dev.live_image()[8192..12288], 0));
        assert_eq!(dev.unsynced_writes(), vec![(0, 4096), (4096, 4096)]);
        // One-shot: the next write works, and so does everything else.
        write(&dev, 8192, 4, 4096).unwrap();
        assert!(all(&read(&dev, 8192, 4096).unwrap(), 4));
        assert!(!dev.is_cut());
    }

    #[test]
    fn short_fault_lands_half_the_sectors() {
        let dev = SimDevice::new(64 * 1024);
        dev.arm(At::Write(0), Fault::Short);
        let e = write(&dev, 4096, 7, 8192).unwrap_err();
        assert_eq!(SimError::of(&e), Some(SimError::ShortWrite));
        let live = dev.live_image();
        assert!(all(&live[4096..8192], 7) && all(&live[8192..12288], 0));
        assert_eq!(dev.unsynced_writes(), vec![(4096, 4096)]);
        assert!(!dev.is_cut());
        wait_io(dev.sync()).unwrap();
        assert!(all(&dev.crash_image_synced_only()[4096..8192], 7));
    }

    #[test]
    fn torn_fault_lands_a_prefix_then_cuts_the_power() {
        let dev = SimDevice::new(64 * 1024);
        write(&dev, 0, 1, 4096).unwrap();
        wait_io(dev.sync()).unwrap();
        dev.arm(At::Write(1), Fault::Torn);
        write(&dev, 4096, 2, 4096).unwrap();
        let e = write(&dev, 8192, 3, 3 * G).unwrap_err();
        assert!(is_power_cut(&e), "{e}");
        assert!(dev.is_cut());
        let live = dev.live_image();
        assert!(all(&live[8192..8192 + 2 * G], 3) && all(&live[8192 + 2 * G..], 0));
        // Everything after the cut fails and lands nothing.
        assert!(is_power_cut(&write(&dev, 16384, 4, 4096).unwrap_err()));
        assert!(is_power_cut(&read(&dev, 0, 4096).unwrap_err()));
        assert!(is_power_cut(&wait_io(dev.sync()).unwrap_err()));
        assert_eq!(dev.live_image(), live);
        assert_eq!(dev.unsynced_writes(), vec![(4096, 4096), (8192, 2 * G)]);
        // The crash image may hold the torn prefix, never the refused write.
        for seed in 0..8 {
            let image = dev.crash_image(seed);
            assert!(all(&image[..4096], 1));
            assert!(all(&image[8192 + 2 * G..], 0));
        }
        // Reboot from the synced image: the device works again.
        dev.restore_from(&dev.crash_image_synced_only());
        assert!(!dev.is_cut());
        assert!(dev.unsynced_writes().is_empty());
        assert!(all(&read(&dev, 0, 4096).unwrap(), 1));
        assert!(all(&read(&dev, 4096, 8192).unwrap(), 0));
        write(&dev, 16384, 5, 4096).unwrap();

        let dev = SimDevice::new(64 * 1024);
        dev.arm(At::Write(0), Fault::TornAfter(1));
        assert!(is_power_cut(&write(&dev, 0, 9, 4096).unwrap_err()));
        let live = dev.live_image();
        assert!(all(&live[..G], 9) && all(&live[G..], 0));
    }

    #[test]
    fn cut_fault_and_cut_now_stop_everything() {
        let dev = SimDevice::new(64 * 1024);
        dev.arm(At::Write(0), Fault::Cut);
        assert!(is_power_cut(&write(&dev, 0, 1, 4096).unwrap_err()));
        assert!(all(&dev.live_image(), 0));
        assert!(dev.unsynced_writes().is_empty());
        assert!(is_power_cut(&read(&dev, 0, 4096).unwrap_err()));

        let dev = SimDevice::new(64 * 1024);
        write(&dev, 0, 1, 4096).unwrap();
        dev.cut_now();
        assert!(is_power_cut(&write(&dev, 4096, 2, 4096).unwrap_err()));
        assert!(is_power_cut(&wait_io(dev.sync()).unwrap_err()));
        assert!(all(&dev.crash_image_synced_only(), 0));
        assert_eq!(dev.unsynced_writes(), vec![(0, 4096)]);
    }

    #[test]
    fn op_failpoints_count_every_kind() {
        let dev = SimDevice::new(64 * 1024);
        dev.set_tracing(true);
        write(&dev, 0, 1, 4096).unwrap();
        // Op 0 from now is a read, op 1 a sync, op 2 a write.
        dev.arm(At::Op(1), Fault::Error);
        dev.arm(At::Op(2), Fault::Cut);
        read(&dev, 0, 4096).unwrap();
        assert_eq!(SimError::of(&wait_io(dev.sync()).unwrap_err()), Some(SimError::Injected));
        assert!(dev.unsynced_writes().len() == 1, "a failed sync makes nothing durable");
        assert!(is_power_cut(&write(&dev, 4096, 2, 4096).unwrap_err()));
        let trace = dev.trace();
        let kinds: Vec<_> = trace.iter().map(|o| (o.index, o.kind, o.kind_index, o.fault, o.ok)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, OpKind::Write, 0, None, true),
                (1, OpKind::Read, 0, None, true),
                (2, OpKind::Sync, 0, Some(Fault::Error), false),
                (3, OpKind::Write, 1, Some(Fault::Cut), false),
            ]
        );
        // An absolute write index.
        let dev = SimDevice::new(64 * 1024);
        dev.arm_at_write_index(2, Fault::Error);
        write(&dev, 0, 1, 4096).unwrap();
        wait_io(dev.sync()).unwrap();
        write(&dev, 0, 1, 4096).unwrap();
        assert!(write(&dev, 0, 1, 4096).is_err());
        dev.arm(At::Write(0), Fault::Error);
        dev.disarm();
        write(&dev, 0, 1, 4096).unwrap();
    }

    #[test]
    fn misaligned_and_out_of_range_io_fail_like_the_real_backends() {
        let dev = SimDevice::new(1 << 20);
        assert!(read(&dev, 512, 512).is_ok());
        assert_eq!(read(&dev, 100, 4096).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(read(&dev, 0, 1000).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let buf = Arc::new(SharedBuf::new(AlignedBuf::zeroed(8192)));
        let e = wait_io(dev.write(0, WriteSource { buf, start: 512, len: 4096 })).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(wait_io(dev.write(100, src(1, 4096))).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A 4096-byte granule rejects 512-byte offsets.
        let dev4k = SimDevice::with_granule(1 << 20, 4096);
        assert_eq!(read(&dev4k, 512, 4096).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // Rejected operations are not counted.
        assert_eq!(dev.reads(), 1);
        assert_eq!(dev.writes(), 0);
        // Reads past the end are errors, not zeros.
        assert_eq!(read(&dev, 2 << 20, 4096).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(read(&dev, (1 << 20) - 512, 4096).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Writes past the end extend the device, like a file, up to the limit.
        write(&dev, 1 << 20, 3, 4096).unwrap();
        assert_eq!(dev.size_bytes(), (1 << 20) + 4096);
        assert!(all(&read(&dev, 1 << 20, 4096).unwrap(), 3));
        assert_eq!(dev.crash_image_synced_only().len(), 1 << 20);
        dev.set_size_limit(2 << 20);
        assert_eq!(write(&dev, 2 << 20, 3, 4096).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn registry_returns_the_same_device_for_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev0.dat");
        let a = device_for_path(&path, 64 * 1024, 512);
        let b = device_for_path(dir.path().join("x/.././dev0.dat"), 1024, 4096);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(b.granule(), 512, "an existing device keeps its granule");
        assert_eq!(b.size_bytes(), 64 * 1024, "and is never shrunk");
        device_for_path(&path, 128 * 1024, 512);
        assert_eq!(a.size_bytes(), 128 * 1024, "but is grown");
        assert!(Arc::ptr_eq(&lookup(&path).unwrap(), &a));
        assert!(!Arc::ptr_eq(&device_for_path(dir.path().join("dev1.dat"), 4096, 512), &a));
        assert!(Arc::ptr_eq(&remove(&path).unwrap(), &a));
        assert!(lookup(&path).is_none());
        assert!(!Arc::ptr_eq(&device_for_path(&path, 4096, 512), &a));
        remove(&path);
        remove(dir.path().join("dev1.dat"));
        assert_eq!(canonical_path("/a/./b/../c"), PathBuf::from("/a/c"));
        assert!(canonical_path("rel").is_absolute());
    }

    #[test]
    fn open_backend_finds_the_registered_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev0.dat");
        let options = IoOptions { backend: IoBackendChoice::Simulated, ..IoOptions::default() };
        let open = || {
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
            let file = file.unwrap();
            open_backend(file, &options, &path.display().to_string(), 4096, None).unwrap()
        };
        // A new, empty file: the device starts empty and grows as it is written, like the file
        // the engine would size with set_len.
        let io = open();
        assert_eq!(io.kind(), IoBackendKind::Simulated);
        assert_eq!(io.kind().to_string(), "simulated");
        assert_eq!(io.granule(), 4096);
        wait_io(io.write(0, src(5, 8192))).unwrap();
        wait_io(io.sync()).unwrap();
        drop(io);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "the real file is not written");
        std::fs::File::options().write(true).open(&path).unwrap().set_len(64 * 1024).unwrap();
        // Reopened: the same device, grown to the file's length.
        let io = open();
        let dev = lookup(&path).unwrap();
        assert_eq!(dev.size_bytes(), 64 * 1024);
        assert!(all(&wait_io(io.read(0, AlignedBuf::zeroed(8192), 8192)).unwrap().as_slice()[..8192], 5));
        assert_eq!(dev.writes(), 1);
        remove(&path);
    }
}
