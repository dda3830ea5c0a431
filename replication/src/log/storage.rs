//! The per-group view of the shared log, [`GroupLog`], implementing openraft's
//! `RaftLogStorage` and `RaftLogReader`. Every write updates the group's in-memory index at once
//! (so reads see it on return) and queues its record for the writer, in submission order;
//! `append` completes its `IOFlushed` and `save_vote` returns only once the batch holding it is
//! durable.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{LogIdOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader, RaftTypeConfig};
use serde::Serialize;

use super::format::{self, ItemKind};
use super::index::{Loc, Slot, check_consecutive};
use super::segment::Segment;
use super::{Queued, QueuedEntry, SharedLog, Waiter, failed_error};

/// Encoded entry items: (item bytes, per entry (index, offset in the item, length)).
type EncodedItems = Vec<(Vec<u8>, Vec<(u64, u32, u32)>)>;

/// One group's openraft log storage on a [`SharedLog`] (cheap to clone; clones share state).
pub struct GroupLog<C: RaftTypeConfig> {
    log: SharedLog<C>,
    group: u32,
}

impl<C: RaftTypeConfig> Clone for GroupLog<C> {
    fn clone(&self) -> Self {
        GroupLog { log: self.log.clone(), group: self.group }
    }
}

impl<C: RaftTypeConfig> Debug for GroupLog<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLog").field("group", &self.group).finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn encode<T: Serialize>(v: &T, what: &str) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("encoding {what}: {e}")))
}

/// An entry to return: either already in memory, or to be read from disk.
enum Fetch<C: RaftTypeConfig> {
    Mem(C::Entry),
    Disk(Arc<Segment>, Loc, LogIdOf<C>),
}

impl<C: RaftTypeConfig> GroupLog<C>
where
    C::Entry: Clone,
{
    pub(crate) fn new(log: SharedLog<C>, group: u32) -> GroupLog<C> {
        GroupLog { log, group }
    }

    /// The group this view writes.
    pub fn group_id(&self) -> u32 {
        self.group
    }

    /// The shared log underneath.
    pub fn shared_log(&self) -> &SharedLog<C> {
        &self.log
    }

    /// Queues a one-item record (vote, committed, truncate, purge) after applying `mutate` to
    /// the group's index, all under the state lock so the index and the queue agree on order.
    fn submit_small(
        &self,
        kind: ItemKind,
        body: Vec<u8>,
        waiter: Waiter<C>,
        mutate: impl FnOnce(&mut super::index::GroupIndex<C>) -> bool,
    ) -> io::Result<()> {
        let shared = &self.log.shared;
        let mut item = Vec::with_capacity(format::ITEM_HEADER_BYTES + body.len());
        format::encode_item(&mut item, self.group, kind, &body);
        if item.len() > shared.options.item_bytes_max() {
            return Err(invalid(format!("a {kind:?} record of {} bytes does not fit a batch", item.len())));
        }
        let mut st = shared.lock();
        if let Some(f) = &st.failed {
            return Err(failed_error(f));
        }
        let g = st.groups.entry(self.group).or_default();
        if !mutate(g) {
            // Nothing changes (a purge at or below the current one): nothing to record.
            drop(st);
            waiter.complete(Ok(()));
            return Ok(());
        }
        g.version += 1;
        st.queue.push_back(Queued { group: self.group, item, kind, entries: Vec::new(), waiter });
        drop(st);
        shared.counters.submissions.fetch_add(1, Ordering::Relaxed);
        shared.wake.notify_all();
        Ok(())
    }

    /// Encodes a run of entries as Entries items that each fit a batch: (item bytes, and for
    /// each entry its index, the offset of its encoded bytes within the item, and their length).
    #[allow(clippy::type_complexity)]
    fn encode_entries(&self, entries: &[C::Entry]) -> io::Result<EncodedItems> {
        let shared = &self.log.shared;
        let max = shared.options.item_bytes_max();
        // Encode outside the lock; split into items that fit a batch.
        let mut items: Vec<(Vec<u8>, Vec<(u64, u32, u32)>)> = Vec::new();
        let mut body = Vec::new();
        let mut recs: Vec<(u64, u32, u32)> = Vec::new();
        let flush = |body: &mut Vec<u8>, recs: &mut Vec<(u64, u32, u32)>, items: &mut Vec<_>| {
            if recs.is_empty() {
                return;
            }
            body[..format::ENTRIES_COUNT_BYTES].copy_from_slice(&(recs.len() as u32).to_le_bytes());
            let mut item = Vec::with_capacity(format::ITEM_HEADER_BYTES + body.len());
            format::encode_item(&mut item, self.group, ItemKind::Entries, body);
            items.push((item, std::mem::take(recs)));
            body.clear();
        };
        for e in entries {
            let lid = encode(&e.log_id(), "a log id")?;
            let bytes = encode(e, "a log entry")?;
            let rec = format::entry_record_bytes(lid.len(), bytes.len());
            if format::ITEM_HEADER_BYTES + format::ENTRIES_COUNT_BYTES + rec > max {
                return Err(invalid(format!(
                    "log entry {} encodes to {} bytes; a batch carries at most {max}",
                    e.index(),
                    bytes.len()
                )));
            }
            if !recs.is_empty() && format::ITEM_HEADER_BYTES + body.len() + rec > max {
                flush(&mut body, &mut recs, &mut items);
            }
            if body.is_empty() {
                body.extend_from_slice(&[0u8; format::ENTRIES_COUNT_BYTES]);
            }
            let rel = (format::ITEM_HEADER_BYTES + body.len() + format::ENTRY_HEADER_BYTES + lid.len()) as u32;
            format::encode_entry(&mut body, e.index(), &lid, &bytes);
            recs.push((e.index(), rel, bytes.len() as u32));
        }
        flush(&mut body, &mut recs, &mut items);

        Ok(items)
    }

    /// Queues a rewrite of the group's whole live state (reclaim), under one lock hold and only
    /// if the group is still at `version`; the slots take the rewrite's locations once durable.
    pub(crate) fn rewrite_with(
        &self,
        version: u64,
        purged: Option<LogIdOf<C>>,
        vote: Option<VoteOf<C>>,
        committed: Option<LogIdOf<C>>,
        entries: Vec<C::Entry>,
        waiter: Waiter<C>,
    ) -> io::Result<bool> {
        let shared = &self.log.shared;
        let mut small = Vec::new();
        if let Some(p) = &purged {
            small.push((ItemKind::Purge, encode(p, "a purge point")?));
        }
        if let Some(v) = &vote {
            small.push((ItemKind::Vote, encode(v, "a vote")?));
        }
        if committed.is_some() {
            small.push((ItemKind::Committed, encode(&committed, "a committed log id")?));
        }
        let items = self.encode_entries(&entries)?;
        let mut st = shared.lock();
        if let Some(f) = &st.failed {
            return Err(failed_error(f));
        }
        if st.groups.get(&self.group).map(|g| g.version) != Some(version) {
            return Ok(false);
        }
        for (kind, body) in small {
            let mut item = Vec::new();
            format::encode_item(&mut item, self.group, kind, &body);
            st.queue.push_back(Queued { group: self.group, item, kind, entries: Vec::new(), waiter: Waiter::None });
        }
        let base_id = st.next_append_id;
        st.next_append_id += entries.len() as u64;
        let first = entries.first().map(|e| e.index()).unwrap_or(0);
        if let Some(g) = st.groups.get_mut(&self.group) {
            for e in &entries {
                if let Some(s) = g.slot_mut(e.index()) {
                    s.append_id = base_id + (e.index() - first);
                }
            }
        }
        if let Some(w) = self.queue_entry_items(&mut st.queue, items, base_id, first, waiter) {
            st.queue.push_back(Queued {
                group: self.group,
                item: Vec::new(),
                kind: ItemKind::Vote,
                entries: Vec::new(),
                waiter: w,
            });
        }
        drop(st);
        shared.wake.notify_all();
        Ok(true)
    }

    /// Queues encoded entry items for the writer; the last carries `waiter`. Returns the waiter
    /// when there were no items.
    fn queue_entry_items(
        &self,
        queue: &mut std::collections::VecDeque<Queued<C>>,
        items: EncodedItems,
        base_id: u64,
        first: u64,
        waiter: Waiter<C>,
    ) -> Option<Waiter<C>> {
        let n_items = items.len();
        let mut waiter = Some(waiter);
        for (k, (item, recs)) in items.into_iter().enumerate() {
            let entries = recs
                .iter()
                .map(|&(index, rel_offset, len)| QueuedEntry {
                    index,
                    append_id: base_id + (index - first),
                    rel_offset,
                    len,
                })
                .collect();
            let w = if k + 1 == n_items { waiter.take().unwrap_or(Waiter::None) } else { Waiter::None };
            queue.push_back(Queued { group: self.group, item, kind: ItemKind::Entries, entries, waiter: w });
        }
        waiter
    }

    /// Appends entries: readable at once, `waiter` completed when durable.
    pub(crate) fn append_with(&self, entries: Vec<C::Entry>, waiter: Waiter<C>) -> io::Result<()> {
        let shared = &self.log.shared;
        if entries.is_empty() {
            return self.log.submit_barrier(waiter);
        }
        check_consecutive(&entries).map_err(invalid)?;
        let items = self.encode_entries(&entries)?;
        let mut st = shared.lock();
        if let Some(f) = &st.failed {
            return Err(failed_error(f));
        }
        let first = entries[0].index();
        {
            let g = st.groups.entry(self.group).or_default();
            g.check_append(first).map_err(|m| invalid(format!("group {}: {m}", self.group)))?;
        }
        let base_id = st.next_append_id;
        st.next_append_id += entries.len() as u64;
        let g = st.groups.entry(self.group).or_default();
        for (i, e) in entries.into_iter().enumerate() {
            g.push(Slot { log_id: e.log_id(), append_id: base_id + i as u64, loc: None, cached: Some(e) });
        }
        g.version += 1;
        // An empty item list cannot happen here (entries is not empty), so nothing is left over.
        let _ = self.queue_entry_items(&mut st.queue, items, base_id, first, waiter);
        drop(st);
        shared.counters.submissions.fetch_add(1, Ordering::Relaxed);
        shared.wake.notify_all();
        Ok(())
    }

    /// Saves the vote; completes `waiter` when durable.
    pub(crate) fn save_vote_with(&self, vote: &VoteOf<C>, waiter: Waiter<C>) -> io::Result<()> {
        let body = encode(vote, "a vote")?;
        let v = vote.clone();
        self.submit_small(ItemKind::Vote, body, waiter, move |g| {
            g.vote = Some(v);
            true
        })
    }

    /// Saves the committed log id (not waited for).
    pub(crate) fn save_committed_now(&self, committed: Option<LogIdOf<C>>) -> io::Result<()> {
        let body = encode(&committed, "a committed log id")?;
        self.submit_small(ItemKind::Committed, body, Waiter::None, move |g| {
            g.committed = committed;
            true
        })
    }

    /// Deletes entries after `last` (all for `None`).
    pub(crate) fn truncate_now(&self, last: Option<LogIdOf<C>>) -> io::Result<()> {
        let body = encode(&last, "a truncation point")?;
        let idx = last.as_ref().map(|l| l.index);
        self.submit_small(ItemKind::TruncateAfter, body, Waiter::None, move |g| {
            g.truncate_after(idx);
            true
        })
    }

    /// Deletes entries up to and including `log_id`.
    pub(crate) fn purge_now(&self, log_id: LogIdOf<C>) -> io::Result<()> {
        let body = encode(&log_id, "a purge point")?;
        self.submit_small(ItemKind::Purge, body, Waiter::None, move |g| g.purge(log_id))
    }

    /// The group's log state.
    pub fn log_state(&self) -> LogState<C> {
        let st = self.log.shared.lock();
        st.groups.get(&self.group).map(|g| g.state()).unwrap_or_default()
    }

    /// The group's vote.
    pub fn vote(&self) -> Option<VoteOf<C>> {
        self.log.shared.lock().groups.get(&self.group).and_then(|g| g.vote.clone())
    }

    /// The group's committed log id.
    pub fn committed(&self) -> Option<LogIdOf<C>> {
        self.log.shared.lock().groups.get(&self.group).and_then(|g| g.committed.clone())
    }

    /// The entries present in `range` (those beyond the ends are simply absent). Entries no
    /// longer cached are read from their segment, one aligned read each.
    pub fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<C::Entry>> {
        let fetch = self.fetch_plan(range)?;
        let mut out = Vec::with_capacity(fetch.len());
        for f in fetch {
            match f {
                Fetch::Mem(e) => out.push(e),
                Fetch::Disk(seg, loc, log_id) => out.push(read_entry::<C>(&seg, loc, &log_id)?),
            }
        }
        Ok(out)
    }

    /// [`GroupLog::entries`] without blocking the calling thread on device reads.
    pub async fn entries_async<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<C::Entry>> {
        let fetch = self.fetch_plan(range)?;
        let mut out = Vec::with_capacity(fetch.len());
        for f in fetch {
            match f {
                Fetch::Mem(e) => out.push(e),
                Fetch::Disk(seg, loc, log_id) => {
                    let bytes = seg.read_range_async(loc.offset, loc.len as usize).await?;
                    out.push(decode_entry::<C>(&bytes, loc, &log_id)?);
                }
            }
        }
        Ok(out)
    }

    /// What `range` needs: entries from the cache, or where they are on the device.
    fn fetch_plan<RB: RangeBounds<u64>>(&self, range: RB) -> io::Result<Vec<Fetch<C>>> {
        let fetch: Vec<Fetch<C>> = {
            let st = self.log.shared.lock();
            let Some(g) = st.groups.get(&self.group) else { return Ok(Vec::new()) };
            let Some(last) = g.last_index() else { return Ok(Vec::new()) };
            let lo = match range.start_bound() {
                Bound::Included(&s) => s,
                Bound::Excluded(&s) => s.saturating_add(1),
                Bound::Unbounded => 0,
            }
            .max(g.first);
            let hi = match range.end_bound() {
                Bound::Included(&e) => e.min(last),
                Bound::Excluded(&0) => return Ok(Vec::new()),
                Bound::Excluded(&e) => (e - 1).min(last),
                Bound::Unbounded => last,
            };
            let mut out = Vec::with_capacity(hi.saturating_sub(lo).saturating_add(1).min(4096) as usize);
            for i in lo..=hi {
                let Some(s) = g.slot(i) else { break };
                if let Some(e) = &s.cached {
                    out.push(Fetch::Mem(e.clone()));
                } else {
                    let loc = s.loc.ok_or_else(|| io::Error::other("entry neither cached nor durable"))?;
                    let seg = st.segments.get(&loc.seg).cloned().ok_or_else(|| {
                        io::Error::other(format!(
                            "group {} entry {i} is in segment {} which is gone",
                            self.group, loc.seg
                        ))
                    })?;
                    out.push(Fetch::Disk(seg, loc, s.log_id.clone()));
                }
            }
            out
        };
        Ok(fetch)
    }
}

/// Reads and decodes one entry, checking it is the one the index expects.
pub(crate) fn read_entry<C: RaftTypeConfig>(seg: &Segment, loc: Loc, log_id: &LogIdOf<C>) -> io::Result<C::Entry> {
    let bytes = seg.read_range(loc.offset, loc.len as usize)?;
    decode_entry::<C>(&bytes, loc, log_id)
}

/// Decodes one entry read from `loc`, checking it is the one the index expects.
fn decode_entry<C: RaftTypeConfig>(bytes: &[u8], loc: Loc, log_id: &LogIdOf<C>) -> io::Result<C::Entry> {
    let e: C::Entry = postcard::from_bytes(bytes).map_err(|err| {
        format::corrupt(format!("entry at segment {} offset {} does not decode: {err}", loc.seg, loc.offset))
    })?;
    if e.log_id() != *log_id {
        return Err(format::corrupt(format!(
            "entry at segment {} offset {} is {:?}, the index expected {:?}",
            loc.seg,
            loc.offset,
            e.log_id(),
            log_id
        )));
    }
    Ok(e)
}

impl<C: RaftTypeConfig> RaftLogReader<C> for GroupLog<C>
where
    C::Entry: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        self.entries_async(range).await
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.vote())
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for GroupLog<C>
where
    C::Entry: Clone,
{
    type LogReader = GroupLog<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let st = self.log.shared.lock();
        if let Some(f) = &st.failed {
            return Err(failed_error(f));
        }
        Ok(st.groups.get(&self.group).map(|g| g.state()).unwrap_or_default())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.save_vote_with(
            vote,
            Waiter::Call(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        )?;
        rx.await.unwrap_or_else(|_| Err(io::Error::other("the log writer stopped before the vote was durable")))
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.save_committed_now(committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.committed())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.append_with(entries.into_iter().collect(), Waiter::Flushed(callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.truncate_now(last_log_id)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        self.purge_now(log_id)
    }
}
