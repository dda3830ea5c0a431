//! Storage for a partition table's slots: small arrays on the heap, large ones in their own
//! anonymous memory mapping, so that freeing a table after a resize gives its memory back to
//! the operating system at once (on the heap, freed tables near the allocator's mmap threshold
//! stayed resident and cost ~10 bytes per record at 10 million records).

use std::ops::{Deref, DerefMut};

use memmap2::MmapMut;

use crate::entry::{EMPTY, PACKED_ENTRY_LEN, Packed};

/// Arrays at least this large get their own mapping.
const MAPPED_BYTES_MIN: usize = 64 * 1024;

/// A zero-initialised array of packed slots.
#[derive(Debug)]
pub(crate) enum SlotArray {
    Heap(Vec<Packed>),
    Mapped { map: MmapMut, len: usize },
}

impl SlotArray {
    /// An array of `len` empty slots.
    pub(crate) fn new(len: usize) -> SlotArray {
        let bytes = len * PACKED_ENTRY_LEN;
        if bytes >= MAPPED_BYTES_MIN
            && let Ok(map) = MmapMut::map_anon(bytes)
        {
            // Anonymous mappings are zero-filled, and all-zero slots are empty.
            return SlotArray::Mapped { map, len };
        }
        SlotArray::Heap(vec![EMPTY; len])
    }

    /// Bytes of memory the array holds.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            SlotArray::Heap(v) => v.capacity() * PACKED_ENTRY_LEN,
            SlotArray::Mapped { map, .. } => map.len().div_ceil(4096) * 4096,
        }
    }
}

impl Deref for SlotArray {
    type Target = [Packed];

    fn deref(&self) -> &[Packed] {
        match self {
            SlotArray::Heap(v) => v,
            // SAFETY: the mapping holds `len * 40` bytes, and Packed is [u8; 40] (alignment 1).
            SlotArray::Mapped { map, len } => unsafe { std::slice::from_raw_parts(map.as_ptr().cast(), *len) },
        }
    }
}

impl DerefMut for SlotArray {
    fn deref_mut(&mut self) -> &mut [Packed] {
        match self {
            SlotArray::Heap(v) => v,
            // SAFETY: as above, with exclusive access through &mut self.
            SlotArray::Mapped { map, len } => unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast(), *len) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_arrays_start_empty() {
        for len in [0, 10, 5000] {
            let mut a = SlotArray::new(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|s| *s == EMPTY));
            if len > 0 {
                a[len - 1][0] = 7;
                assert_eq!(a[len - 1][0], 7);
            }
        }
        assert!(matches!(SlotArray::new(5000), SlotArray::Mapped { .. }));
        assert!(matches!(SlotArray::new(10), SlotArray::Heap(_)));
    }
}
