//! Memory for direct I/O: buffers aligned to [`IO_ALIGN_BYTES`] whose length is a multiple of
//! it, owned by whoever holds them (and by the in-flight operation while the kernel uses them).
//!
//! [`SharedBuf`] is a write block's buffer, shared between the appender (which writes records
//! past the filled mark under the device's writer lock), readers (which copy records that are
//! already indexed) and the device writer (which hands already-filled ranges to the kernel).

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::cell::UnsafeCell;
use std::ptr::NonNull;

/// Alignment of every device offset, I/O length and buffer address.
pub const IO_ALIGN_BYTES: usize = 4096;

/// Rounds `n` up to a multiple of `align` (a power of two).
pub fn align_up(n: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (n + align - 1) & !(align - 1)
}

/// Rounds `n` down to a multiple of `align` (a power of two).
pub fn align_down(n: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    n & !(align - 1)
}

/// A zero-initialised heap buffer aligned to 4096 bytes, of a length that is a multiple of 4096.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, rounded up to a multiple of 4096 (at least 4096).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = (align_up(len as u64, IO_ALIGN_BYTES as u64) as usize).max(IO_ALIGN_BYTES);
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { handle_alloc_error(layout) };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, IO_ALIGN_BYTES) {
            Ok(l) => l,
            Err(_) => panic!("buffer length {len} overflows a layout"),
        }
    }

    /// Length in bytes (a multiple of 4096).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers hold at least 4096 bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes and initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this same layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// A write block's buffer, shared between the appender, readers and the device writer.
///
/// Discipline (upheld by the writer module, which is the only code that mutates it):
/// bytes below the block's fill mark are never modified again, except the 64-byte block header
/// at offset 0 (which no reader or record spans); bytes at and above the fill mark are written
/// only by the appender holding the device's writer lock. Readers only read ranges of records
/// already published through the index. The kernel may read any range handed to it while the
/// appender writes beyond the fill mark; those bytes are rewritten by a later flush.
pub struct SharedBuf {
    cell: UnsafeCell<AlignedBuf>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: see the discipline above; all mutation goes through `write_at` under the writer lock
// and never overlaps ranges that readers or the kernel rely on.
unsafe impl Send for SharedBuf {}
// SAFETY: as above.
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    /// Wraps an owned buffer.
    pub fn new(mut buf: AlignedBuf) -> SharedBuf {
        let ptr = buf.as_mut_ptr();
        let len = buf.len();
        SharedBuf { cell: UnsafeCell::new(buf), ptr, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len, "read past the end of a block buffer");
        // SAFETY: in bounds; the range is not being mutated (discipline above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` into the buffer at `offset`.
    ///
    /// # Safety
    /// The caller holds the device's writer lock and the range is at or above the fill mark
    /// (or is the block header), so nobody else reads it as record bytes.
    pub unsafe fn write_at(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len, "write past the end of a block buffer");
        // SAFETY: in bounds; exclusivity is the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) }
    }

    /// Pointer to `offset`, for handing a filled range to the kernel.
    pub fn ptr_at(&self, offset: usize) -> *const u8 {
        assert!(offset <= self.len);
        // SAFETY: in bounds.
        unsafe { self.ptr.add(offset) }
    }

    /// Takes the buffer back once no one else holds it.
    pub fn into_inner(self) -> AlignedBuf {
        self.cell.into_inner()
    }
}

impl std::fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN_BYTES, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        assert_eq!(AlignedBuf::zeroed(0).len(), 4096);
    }

    #[test]
    fn shared_buf_round_trip() {
        let s = SharedBuf::new(AlignedBuf::zeroed(4096));
        // SAFETY: single-threaded test, no other users.
        unsafe { s.write_at(100, b"hello") };
        let mut out = [0u8; 5];
        s.read_at(100, &mut out);
        assert_eq!(&out, b"hello");
        assert_eq!(&s.into_inner().as_slice()[100..105], b"hello");
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(1, 4096), 4096);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_down(8191, 4096), 4096);
        assert_eq!(align_up(0, 16), 0);
    }
}
