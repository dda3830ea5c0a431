//! The in-memory index of one group: where each of its entries lives (segment, offset, length),
//! the entries not yet durable (and a bounded cache of recent ones), its last purged log id,
//! vote and committed mark, and which segments hold the records it still needs.
//!
//! The same replay rule ([`GroupIndex::push`]) is used for live appends and for recovery, so
//! what a group holds after a restart is what the writes made of it.

use std::collections::VecDeque;

use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::storage::LogState;
use openraft::type_config::alias::{LogIdOf, VoteOf};

/// Where an entry's encoded bytes are on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Segment sequence.
    pub seg: u64,
    /// Byte offset of the encoded entry within the segment file.
    pub offset: u64,
    /// Length of the encoded entry.
    pub len: u32,
}

/// One entry of a group.
pub struct Slot<C: RaftTypeConfig> {
    /// Its log id.
    pub log_id: LogIdOf<C>,
    /// Identity of the write that last put it here (so the writer records a location only for
    /// the write the slot still belongs to).
    pub append_id: u64,
    /// Where it is durable, once written.
    pub loc: Option<Loc>,
    /// The entry itself while not durable, and afterwards while it is recent.
    pub cached: Option<C::Entry>,
}

/// One group's state (see the module documentation).
pub struct GroupIndex<C: RaftTypeConfig> {
    /// Index of `slots[0]`.
    pub first: u64,
    /// Consecutive entries starting at `first`.
    pub slots: VecDeque<Slot<C>>,
    /// The last purged log id.
    pub last_purged: Option<LogIdOf<C>>,
    /// The saved vote.
    pub vote: Option<VoteOf<C>>,
    /// The saved committed log id.
    pub committed: Option<LogIdOf<C>>,
    /// Segment holding the durable record of `vote`.
    pub vote_seg: Option<u64>,
    /// Segment holding the durable record of `committed`.
    pub committed_seg: Option<u64>,
    /// Segment holding the durable record of `last_purged`.
    pub purge_seg: Option<u64>,
    /// +1 on every change made through the API (reclaim checks it did not race a write).
    pub version: u64,
}

impl<C: RaftTypeConfig> Default for GroupIndex<C> {
    fn default() -> Self {
        GroupIndex {
            first: 0,
            slots: VecDeque::new(),
            last_purged: None,
            vote: None,
            committed: None,
            vote_seg: None,
            committed_seg: None,
            purge_seg: None,
            version: 0,
        }
    }
}

impl<C: RaftTypeConfig> GroupIndex<C> {
    /// Index of the last entry present.
    pub fn last_index(&self) -> Option<u64> {
        (!self.slots.is_empty()).then(|| self.first + self.slots.len() as u64 - 1)
    }

    /// openraft's log state: `last_log_id` falls back to `last_purged` when empty.
    pub fn state(&self) -> LogState<C> {
        let last = self.slots.back().map(|s| s.log_id.clone()).or_else(|| self.last_purged.clone());
        LogState { last_purged_log_id: self.last_purged.clone(), last_log_id: last }
    }

    /// Whether an append starting at `index` keeps the log free of holes (it may overwrite a
    /// suffix, which openraft never asks for without truncating first).
    pub fn check_append(&self, index: u64) -> Result<(), String> {
        if let Some(p) = &self.last_purged
            && index <= p.index
        {
            return Err(format!("append at index {index} is at or below the purged index {}", p.index));
        }
        match self.last_index() {
            Some(last) if index > last + 1 => Err(format!("append at index {index} leaves a hole after {last}")),
            Some(_) if index < self.first => {
                Err(format!("append at index {index} is below the first entry {}", self.first))
            }
            None => match &self.last_purged {
                Some(p) if index != p.index + 1 => {
                    Err(format!("append at index {index} after purge at {} leaves a hole", p.index))
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Puts an entry at `slot.log_id.index`: entries at and after it are dropped; if it does
    /// not follow the remaining ones (a record replayed out of its context) the group restarts
    /// at it; entries at or below the purge point are ignored.
    pub fn push(&mut self, slot: Slot<C>) {
        let index = slot.log_id.index;
        if let Some(p) = &self.last_purged
            && index <= p.index
        {
            return;
        }
        if let Some(last) = self.last_index() {
            if index < self.first || index > last + 1 {
                self.slots.clear();
            } else {
                self.slots.truncate((index - self.first) as usize);
            }
        }
        if self.slots.is_empty() {
            self.first = index;
        }
        self.slots.push_back(slot);
        debug_assert_eq!(self.last_index(), Some(index));
    }

    /// Deletes every entry after `last` (all of them for `None`).
    pub fn truncate_after(&mut self, last: Option<u64>) {
        match (last, self.last_index()) {
            (None, _) => self.slots.clear(),
            (Some(l), Some(_)) if l < self.first => self.slots.clear(),
            (Some(l), Some(_)) => self.slots.truncate((l - self.first + 1) as usize),
            (Some(_), None) => {}
        }
    }

    /// Deletes every entry up to and including `log_id` and records it as purged (a purge at or
    /// below the current one is a no-op). Returns whether anything changed.
    pub fn purge(&mut self, log_id: LogIdOf<C>) -> bool {
        if self.last_purged.as_ref().is_some_and(|p| *p >= log_id) {
            return false;
        }
        let upto = log_id.index;
        while self.slots.front().is_some_and(|s| s.log_id.index <= upto) {
            self.slots.pop_front();
            self.first += 1;
        }
        if self.slots.is_empty() {
            self.first = upto + 1;
        }
        self.last_purged = Some(log_id);
        true
    }

    /// The slot for `index`, if present.
    pub fn slot(&self, index: u64) -> Option<&Slot<C>> {
        if index < self.first {
            return None;
        }
        self.slots.get((index - self.first) as usize)
    }

    /// The slot for `index`, mutably.
    pub fn slot_mut(&mut self, index: u64) -> Option<&mut Slot<C>> {
        if index < self.first {
            return None;
        }
        self.slots.get_mut((index - self.first) as usize)
    }

    /// Drops the cached copies of durable entries older than the newest `keep`, scanning only
    /// the `window` positions just below that boundary (amortised: each write trims behind
    /// itself).
    pub fn trim_cache(&mut self, keep: usize, window: usize) {
        let len = self.slots.len();
        let hi = len.saturating_sub(keep);
        let lo = hi.saturating_sub(window);
        for s in self.slots.range_mut(lo..hi) {
            if s.loc.is_some() {
                s.cached = None;
            }
        }
    }

    /// Whether this group still needs a record in segment `seg`.
    pub fn needs_segment(&self, seg: u64) -> bool {
        self.vote_seg == Some(seg)
            || self.committed_seg == Some(seg)
            || (self.last_purged.is_some() && self.purge_seg == Some(seg))
            || self.slots.iter().any(|s| s.loc.is_some_and(|l| l.seg == seg))
    }
}

/// Checks that a run of entries is consecutive.
pub fn check_consecutive<E: RaftEntry>(entries: &[E]) -> Result<(), String> {
    for w in entries.windows(2) {
        if w[1].index() != w[0].index() + 1 {
            return Err(format!("entries not consecutive: {} then {}", w[0].index(), w[1].index()));
        }
    }
    Ok(())
}
