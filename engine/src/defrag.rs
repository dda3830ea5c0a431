//! Defragmentation of one device: take the emptiest used block below the low-water mark (or,
//! when free space runs low, the emptiest block worth moving, without pacing), read
//! it with one large read (or from memory when it is still cached), and move every record the
//! index still points at into the device's defrag write stream, which never mixes with client
//! writes. A record is repointed only if its index entry did not change meanwhile (checked
//! under the partition lock). The source block is freed by the block table once the moves that
//! emptied it are durable, so a crash at any point loses nothing and resurrects nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use peregrine_index::{Index, Location};

use crate::blocks::{BlockTable, Purpose};
use crate::error::Error;
use crate::format::block_header::BlockHeader;
use crate::geometry::Geometry;
use crate::io::{AlignedBuf, DeviceIo, wait_io};
use crate::scan::{block_read_len, scan_block};
use crate::writer::{MemBlocks, Writer};

/// How long an idle defragmenter sleeps before looking for candidates again.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// How long a move that met a full write queue waits before trying again.
const OVERLOAD_WAIT: Duration = Duration::from_millis(10);

/// Defrag counters of one device.
#[derive(Debug, Default)]
pub struct DefragCounters {
    /// Blocks processed.
    pub blocks: AtomicU64,
    /// Bytes read from the device for defrag.
    pub read_bytes: AtomicU64,
    /// Records moved.
    pub records_moved: AtomicU64,
    /// Record bytes moved (written again through the defrag stream).
    pub bytes_moved: AtomicU64,
    /// Blocks processed without pacing because free space was low.
    pub urgent_blocks: AtomicU64,
}

/// A flag the background threads wait on; set once at shutdown.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    /// Sets the flag and wakes every waiter.
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Whether the flag is set.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps up to `d`; returns true if stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) =
            self.wake.wait_timeout_while(guard, d, |stopped| !*stopped).unwrap_or_else(PoisonError::into_inner);
        *guard
    }
}

/// What a device's defragmenter works with.
#[derive(Debug)]
pub struct Defragmenter {
    /// Device path, for messages.
    pub label: String,
    /// Where blocks are.
    pub geometry: Geometry,
    /// The namespace's index.
    pub index: Arc<Index>,
    /// The device's block table.
    pub blocks: Arc<BlockTable>,
    /// The device's I/O.
    pub io: Arc<dyn DeviceIo>,
    /// Blocks still in memory.
    pub mem: Arc<MemBlocks>,
    /// The defrag write stream.
    pub writer: Arc<Writer>,
    /// Pause per MiB processed.
    pub sleep_per_mib: Duration,
    /// Counters.
    pub counters: Arc<DefragCounters>,
    /// Shutdown.
    pub stop: Arc<StopSignal>,
}

impl Defragmenter {
    /// The thread's loop.
    pub fn run(&self) {
        while !self.stop.is_stopped() {
            let Some(block) = self.blocks.take_defrag_candidate() else {
                if self.stop.sleep(IDLE_WAIT) {
                    return;
                }
                continue;
            };
            let processed = self.defrag_block(block);
            self.blocks.finish_defrag(block);
            self.counters.blocks.fetch_add(1, Ordering::Relaxed);
            // Paced against client I/O, unless free space is running out: then the moves are
            // made durable at once, so the source block is freed now rather than when the
            // defrag stream's open block next fills or times out.
            if self.blocks.defrag_is_urgent() {
                self.counters.urgent_blocks.fetch_add(1, Ordering::Relaxed);
                if let Ok(Err(e)) = self.writer.flush().wait() {
                    tracing::error!(device = %self.label, error = %e, "defrag could not flush its moves");
                }
                continue;
            }
            let pause = self.sleep_per_mib * (processed.div_ceil(1 << 20) as u32).max(1);
            if self.stop.sleep(pause) {
                return;
            }
        }
    }

    /// Moves the live records out of `block`; returns the bytes it read.
    fn defrag_block(&self, block: u32) -> usize {
        let g = self.geometry;
        let cached = self.mem.read().unwrap_or_else(PoisonError::into_inner).get(&block).cloned();
        let bytes: Vec<u8>;
        let data: &[u8] = match &cached {
            Some(m) => {
                let mut v = vec![0u8; g.block_bytes as usize];
                m.buf.read_at(0, &mut v);
                bytes = v;
                &bytes
            }
            None => {
                let header = match wait_io(self.io.read(g.block_offset(block), AlignedBuf::zeroed(4096), 4096)) {
                    Ok(h) => BlockHeader::decode(h.as_slice()),
                    Err(e) => {
                        tracing::error!(device = %self.label, block, error = %e, "defrag could not read a block header");
                        return 0;
                    }
                };
                let len = header.map_or(g.block_bytes as usize, |h| block_read_len(&h, g.block_bytes));
                match wait_io(self.io.read(g.block_offset(block), AlignedBuf::zeroed(len), len)) {
                    Ok(buf) => {
                        self.counters.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        bytes = buf.as_slice()[..len].to_vec();
                        &bytes
                    }
                    Err(e) => {
                        tracing::error!(device = %self.label, block, error = %e, "defrag could not read a block");
                        return 0;
                    }
                }
            }
        };
        let Some(header) = BlockHeader::decode(data) else {
            tracing::error!(device = %self.label, block, "a used block has no valid header; not defragmented");
            return data.len();
        };
        let mut refused = false;
        scan_block(data, &header, |offset, view| {
            if refused {
                return;
            }
            let location = Location {
                device: g.device_index,
                offset: g.block_offset(block) + u64::from(offset),
                size: view.extent() as u32,
            };
            let digest = view.digest();
            // Cheap check first: most records of a defrag candidate are dead.
            if self.index.get(&digest).is_none_or(|e| e.location != location) {
                return;
            }
            let mut record = view.as_bytes().to_vec();
            loop {
                match self.move_record(block, &location, &digest, &mut record) {
                    Ok(()) => return,
                    Err(Error::DeviceOverload(_)) if !self.stop.is_stopped() => std::thread::sleep(OVERLOAD_WAIT),
                    Err(e) => {
                        tracing::warn!(device = %self.label, block, error = %e, "defrag stopped moving records out of a block");
                        refused = true;
                        return;
                    }
                }
            }
        });
        data.len()
    }

    fn move_record(
        &self,
        block: u32,
        from: &Location,
        digest: &peregrine_index::Digest,
        record: &mut [u8],
    ) -> Result<(), Error> {
        let mut table = self.index.write(digest.partition());
        let (current, hint) = table.lookup(digest);
        let Some(mut entry) = current.filter(|e| e.location == *from) else {
            return Ok(()); // overwritten or deleted meanwhile: nothing to move
        };
        let appended = self.writer.append(record, false, Purpose::Defrag)?;
        entry.location = appended.location;
        table.insert_hinted(entry, hint);
        drop(table);
        self.blocks.remove_live(block, u64::from(from.size), self.writer.stream(), appended.pos);
        self.counters.records_moved.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_moved.fetch_add(u64::from(from.size), Ordering::Relaxed);
        Ok(())
    }
}
