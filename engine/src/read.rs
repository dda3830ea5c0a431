//! The read path: index entry → the record's bytes from a write block still in memory, or with
//! exactly one aligned device read → verification (checksum seeded by the block's seed,
//! digest, generation, extent). A record that moved while it was being read (overwritten, its
//! block defragmented or reused) is looked up again; bytes that fail verification while the
//! index still points at them are reported as corruption and never returned.

use std::sync::atomic::Ordering;

use peregrine_index::Entry;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::format::record::{self, Defect, RecordView};
use crate::io::{AlignedBuf, align_down, align_up, await_io};

/// How often a read follows a record that keeps moving before giving up.
const READ_ATTEMPTS_MAX: usize = 8;

/// A record's verified bytes.
#[derive(Debug)]
pub(crate) enum RecordBytes {
    Memory { bytes: Vec<u8>, seed: u64 },
    Device { buf: AlignedBuf, start: usize, len: usize, seed: u64 },
}

impl RecordBytes {
    fn bytes_and_seed(&self) -> (&[u8], u64) {
        match self {
            RecordBytes::Memory { bytes, seed } => (bytes, *seed),
            RecordBytes::Device { buf, start, len, seed } => (&buf.as_slice()[*start..*start + *len], *seed),
        }
    }

    /// The verified record view.
    pub(crate) fn view(&self) -> RecordView<'_> {
        let (bytes, seed) = self.bytes_and_seed();
        match record::parse(bytes, seed) {
            Ok(v) => v,
            // Verified in `read_once`; the bytes are immutable since.
            Err(d) => unreachable!("verified record failed to parse again: {d}"),
        }
    }
}

enum Attempt {
    Ok(RecordBytes),
    Defect(String),
}

impl Engine {
    /// Reads and verifies the version `entry` points at, following it if it moves.
    pub(crate) async fn read_entry_bytes(&self, entry: &Entry) -> Result<RecordBytes> {
        let mut entry = *entry;
        for _ in 0..READ_ATTEMPTS_MAX {
            let detail = match self.read_once(&entry).await? {
                Attempt::Ok(bytes) => {
                    if matches!(bytes, RecordBytes::Device { .. }) {
                        self.inner.counters.record_reads_from_device.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(bytes);
                }
                Attempt::Defect(detail) => detail,
            };
            match self.inner.index.get(&entry.digest) {
                Some(now) if now.location == entry.location && now.generation == entry.generation => {
                    self.inner.counters.corruption_errors.fetch_add(1, Ordering::Relaxed);
                    let device = self
                        .inner
                        .devices
                        .get(usize::from(entry.location.device))
                        .map_or_else(|| format!("#{}", entry.location.device), |d| d.label.clone());
                    tracing::error!(%device, offset = entry.location.offset, digest = %entry.digest, %detail, "corrupt record");
                    return Err(Error::Corruption { device, offset: entry.location.offset, detail });
                }
                Some(now) if !now.is_tombstone() => {
                    self.inner.counters.read_retries.fetch_add(1, Ordering::Relaxed);
                    entry = now;
                }
                _ => return Err(Error::NotFound),
            }
        }
        Err(Error::KeyBusy)
    }

    async fn read_once(&self, entry: &Entry) -> Result<Attempt> {
        let loc = entry.location;
        let Some(dev) = self.inner.devices.get(usize::from(loc.device)) else {
            return Ok(Attempt::Defect(format!("index names device {} which does not exist", loc.device)));
        };
        let g = *dev.writer.geometry();
        let (block, offset) = g.split(loc.offset);
        let size = loc.size as usize;
        if let Some(mem) = dev.writer.mem_block(block) {
            let mut bytes = vec![0u8; size];
            mem.buf.read_at(offset as usize, &mut bytes);
            self.inner.counters.memory_reads.fetch_add(1, Ordering::Relaxed);
            let got = RecordBytes::Memory { bytes, seed: mem.seed };
            return Ok(check(got, entry));
        }
        let seed = dev.blocks.seed(block);
        let align = dev.io.granule() as u64;
        let start = align_down(loc.offset, align);
        let end = align_up(loc.offset + loc.size as u64, align);
        let len = (end - start) as usize;
        dev.reads.note();
        let buf = await_io(dev.io.read(start, AlignedBuf::zeroed(len), len))
            .await
            .map_err(|e| Error::io(format!("reading {} at {}", dev.label, loc.offset), e))?;
        self.inner.counters.device_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.counters.device_read_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let got = RecordBytes::Device { buf, start: (loc.offset - start) as usize, len: size, seed };
        Ok(check(got, entry))
    }
}

/// Verifies bytes against the entry that pointed at them.
fn check(got: RecordBytes, entry: &Entry) -> Attempt {
    let (bytes, seed) = got.bytes_and_seed();
    let problem = match record::parse(bytes, seed) {
        Err(Defect::Checksum) => Some("checksum mismatch".to_string()),
        Err(d) => Some(d.to_string()),
        Ok(view) if view.digest() != entry.digest => Some(format!("found digest {} instead", view.digest())),
        Ok(view) if view.meta().generation != entry.generation => {
            Some(format!("found generation {} instead of {}", view.meta().generation, entry.generation))
        }
        Ok(view) if view.extent() != entry.location.size as usize => {
            Some("record extent differs from the index".into())
        }
        Ok(_) => None,
    };
    match problem {
        None => Attempt::Ok(got),
        Some(detail) => Attempt::Defect(detail),
    }
}
