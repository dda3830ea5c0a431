//! The writer thread: group commit for every group of the log. It takes everything queued (up
//! to one batch), writes it as one aligned, checksummed batch at the head of the log, issues
//! one fdatasync, records where each entry landed, and only then completes every covered
//! waiter, in submission order (openraft's `IOFlushed` is a watermark). It rolls to the
//! preallocated spare segment when the head is full and preallocates the next one. After a
//! device error the log fails for good (sticky): every waiter gets the error and later
//! submissions are refused until the log is reopened.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::RaftTypeConfig;

use peregrine_engine::io::AlignedBuf;

use super::format::{self, BatchHeader, ItemKind, SEGMENT_HEADER_BYTES};
use super::index::Loc;
use super::segment::Segment;
use super::{Queued, Shared};

pub(crate) struct Writer<C: RaftTypeConfig> {
    pub shared: Arc<Shared<C>>,
    pub head: Arc<Segment>,
    pub head_offset: u64,
    pub spare: Option<Arc<Segment>>,
    pub next_batch_seq: u64,
    pub next_segment_seq: u64,
    pub log_id: [u8; 16],
}

impl<C: RaftTypeConfig> Writer<C> {
    pub fn run(mut self) {
        loop {
            let Some(batch) = self.take() else { return };
            if let Err(e) = self.write_batch(batch.0, batch.1) {
                tracing::error!(error = %e, "shared Raft log write failed; the log refuses further writes");
            }
        }
    }

    /// Waits for work and takes up to one batch of it. `None` = shut down.
    #[allow(clippy::type_complexity)]
    fn take(&mut self) -> Option<(Vec<Queued<C>>, usize)> {
        let budget = self.shared.options.item_bytes_max();
        let mut st = self.shared.lock();
        loop {
            if let Some(f) = st.failed.clone() {
                let drained: Vec<_> = st.queue.drain(..).collect();
                drop(st);
                for q in drained {
                    q.waiter.complete(Err(super::failed_error(&f)));
                }
                st = self.shared.lock();
                if st.shutdown {
                    return None;
                }
                if st.queue.is_empty() {
                    st = self.shared.wake.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                continue;
            }
            if !st.queue.is_empty() {
                break;
            }
            if st.shutdown {
                return None;
            }
            st = self.shared.wake.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let mut taken = Vec::new();
        let mut bytes = 0usize;
        while let Some(q) = st.queue.front() {
            if !taken.is_empty() && bytes + q.item.len() > budget {
                break;
            }
            assert!(q.item.len() <= budget, "an item larger than a batch was queued");
            bytes += q.item.len();
            if let Some(q) = st.queue.pop_front() {
                taken.push(q);
            }
        }
        Some((taken, bytes))
    }

    fn write_batch(&mut self, taken: Vec<Queued<C>>, payload_bytes: usize) -> io::Result<()> {
        let items = taken.iter().filter(|q| !q.item.is_empty()).count();
        if items == 0 {
            // Barriers only: everything before them completed before they were taken.
            for q in taken {
                q.waiter.complete(Ok(()));
            }
            return Ok(());
        }
        let result = self.write_and_sync(&taken, payload_bytes, items as u32);
        match result {
            Ok((seg, offset)) => {
                self.record(&taken, seg, offset);
                for q in taken {
                    q.waiter.complete(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                let drained: Vec<_> = {
                    let mut st = self.shared.lock();
                    st.failed = Some(msg.clone());
                    st.queue.drain(..).collect()
                };
                for q in taken.into_iter().chain(drained) {
                    q.waiter.complete(Err(io::Error::new(e.kind(), msg.clone())));
                }
                Err(e)
            }
        }
    }

    /// Builds the batch, writes it at the head (rolling if it does not fit) and syncs.
    /// Returns the segment and offset it was written at.
    fn write_and_sync(&mut self, taken: &[Queued<C>], payload_bytes: usize, items: u32) -> io::Result<(u64, u64)> {
        let batch_bytes = format::batch_bytes_for(payload_bytes);
        if self.head_offset + batch_bytes as u64 > self.head.bytes {
            self.roll()?;
        }
        assert!(self.head_offset + batch_bytes as u64 <= self.head.bytes, "a batch larger than a segment");
        let mut buf = AlignedBuf::zeroed(batch_bytes);
        let b = buf.as_mut_slice();
        let mut at = format::BATCH_HEADER_BYTES;
        for q in taken {
            b[at..at + q.item.len()].copy_from_slice(&q.item);
            at += q.item.len();
        }
        debug_assert_eq!(at, format::BATCH_HEADER_BYTES + payload_bytes);
        let seq = self.next_batch_seq;
        let segment_sequence = self.head.seq;
        let payload_checksum =
            format::checksum(&b[format::BATCH_HEADER_BYTES..at], format::payload_seed(seq, segment_sequence));
        BatchHeader {
            item_count: items,
            batch_sequence: seq,
            segment_sequence,
            payload_bytes: payload_bytes as u32,
            batch_bytes: batch_bytes as u32,
            payload_checksum,
        }
        .encode(b);
        let offset = self.head_offset;
        self.head.write(offset, buf, batch_bytes)?;
        self.head.sync()?;
        self.next_batch_seq += 1;
        self.head_offset += batch_bytes as u64;
        let c = &self.shared.counters;
        c.fsyncs.fetch_add(1, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(batch_bytes as u64, Ordering::Relaxed);
        c.items.fetch_add(u64::from(items), Ordering::Relaxed);
        Ok((segment_sequence, offset))
    }

    /// Moves the head to the spare segment (creating it if there is none) and preallocates a
    /// new spare.
    fn roll(&mut self) -> io::Result<()> {
        let next = match self.spare.take() {
            Some(s) => s,
            None => self.create_segment()?,
        };
        self.head = next;
        self.head_offset = SEGMENT_HEADER_BYTES as u64;
        {
            let mut st = self.shared.lock();
            st.head_seq = self.head.seq;
            st.spare_seq = None;
        }
        self.shared.counters.rolls.fetch_add(1, Ordering::Relaxed);
        let spare = self.create_segment()?;
        self.shared.lock().spare_seq = Some(spare.seq);
        self.spare = Some(spare);
        Ok(())
    }

    fn create_segment(&mut self) -> io::Result<Arc<Segment>> {
        let seq = self.next_segment_seq;
        self.next_segment_seq += 1;
        let seg = Arc::new(Segment::create(&self.shared.options.dir, seq, self.log_id, &self.shared.options)?);
        self.shared.lock().segments.insert(seq, seg.clone());
        Ok(seg)
    }

    /// After a batch is durable: entry locations, the segments holding each group's vote,
    /// committed mark and purge point, the entry counter, and the cache trim.
    fn record(&self, taken: &[Queued<C>], seg: u64, batch_offset: u64) {
        let keep = self.shared.options.cache_entries_per_group;
        let mut st = self.shared.lock();
        let mut item_offset = batch_offset + format::BATCH_HEADER_BYTES as u64;
        let mut entries = 0u64;
        for q in taken {
            if q.item.is_empty() {
                continue;
            }
            let g = st.groups.entry(q.group).or_default();
            match q.kind {
                ItemKind::Entries => {
                    for e in &q.entries {
                        entries += 1;
                        if let Some(slot) = g.slot_mut(e.index)
                            && slot.append_id == e.append_id
                        {
                            slot.loc = Some(Loc { seg, offset: item_offset + u64::from(e.rel_offset), len: e.len });
                        }
                    }
                    g.trim_cache(keep, 2 * q.entries.len());
                }
                ItemKind::Vote => g.vote_seg = Some(seg),
                ItemKind::Committed => g.committed_seg = Some(seg),
                ItemKind::Purge => g.purge_seg = Some(seg),
                ItemKind::TruncateAfter => {}
            }
            item_offset += q.item.len() as u64;
        }
        self.shared.counters.entries.fetch_add(entries, Ordering::Relaxed);
    }
}
