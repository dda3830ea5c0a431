//! Segment reclaim, driven by the slowest group: the oldest segment is deleted once no group
//! needs a record in it (its entries all purged or truncated, its votes, committed marks and
//! purge points superseded by later records). A laggard group pinning it with few live entries
//! has its whole state (purge point, vote, committed mark, every live entry) copied forward into
//! the head as a rewrite; groups with more live entries than `rewrite_entries_max` are reported
//! instead, for the caller to snapshot and purge. Only a prefix of segments is ever deleted, so
//! replaying what remains gives every group the state it had.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use openraft::RaftTypeConfig;
use openraft::type_config::alias::LogIdOf;

use super::index::Loc;
use super::segment::{self, Segment};
use super::storage::read_entry;
use super::{SharedLog, Waiter};

/// Segments examined per [`SharedLog::reclaim`] call, at most.
const RECLAIM_SEGMENTS_PER_CALL_MAX: usize = 1024;

/// What one reclaim pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Segments deleted, oldest first.
    pub deleted: Vec<u64>,
    /// Groups whose live state was copied forward.
    pub rewritten_groups: Vec<u32>,
    /// Entries copied forward.
    pub rewritten_entries: u64,
    /// The oldest segment still in use (other than the head and the spare) and the groups that
    /// pin it; empty when everything before the head was reclaimed.
    pub pinned: Option<(u64, Vec<u32>)>,
}

enum Source<C: RaftTypeConfig> {
    Mem(C::Entry),
    Disk(Arc<Segment>, Loc, LogIdOf<C>),
}

pub(crate) fn reclaim<C: RaftTypeConfig>(log: &SharedLog<C>) -> io::Result<ReclaimReport>
where
    C::Entry: Clone,
{
    let shared = &log.shared;
    let mut report = ReclaimReport::default();
    let mut rewritten_for: Option<u64> = None;
    for _ in 0..RECLAIM_SEGMENTS_PER_CALL_MAX {
        let (oldest, pinning) = {
            let st = shared.lock();
            if let Some(f) = &st.failed {
                return Err(super::failed_error(f));
            }
            let Some((&oldest, _)) = st.segments.iter().next() else { break };
            if oldest == st.head_seq || Some(oldest) == st.spare_seq {
                break;
            }
            let mut pinning: Vec<u32> =
                st.groups.iter().filter(|(_, g)| g.needs_segment(oldest)).map(|(&id, _)| id).collect();
            pinning.sort_unstable();
            (oldest, pinning)
        };
        if pinning.is_empty() {
            let seg = shared.lock().segments.remove(&oldest);
            if let Some(seg) = seg {
                seg.delete()?;
                segment::sync_dir(&shared.options.dir)?;
                shared.counters.segments_deleted.fetch_add(1, Ordering::Relaxed);
                report.deleted.push(oldest);
            }
            continue;
        }
        if rewritten_for == Some(oldest) {
            report.pinned = Some((oldest, pinning));
            break;
        }
        rewritten_for = Some(oldest);
        let mut all_rewritten = true;
        for &g in &pinning {
            match rewrite_group(log, g)? {
                Some(n) => {
                    report.rewritten_groups.push(g);
                    report.rewritten_entries += n;
                }
                None => all_rewritten = false,
            }
        }
        if !all_rewritten {
            // Some pinning groups are too big to copy (or changed while we copied): report the
            // current pinning set.
            let st = shared.lock();
            let mut still: Vec<u32> =
                st.groups.iter().filter(|(_, g)| g.needs_segment(oldest)).map(|(&id, _)| id).collect();
            still.sort_unstable();
            drop(st);
            if !still.is_empty() {
                report.pinned = Some((oldest, still));
                break;
            }
        }
    }
    Ok(report)
}

/// Copies group `group`'s whole live state into the head; waits until it is durable. Returns
/// the entries copied, or `None` if the group is too big or changed meanwhile.
fn rewrite_group<C: RaftTypeConfig>(log: &SharedLog<C>, group: u32) -> io::Result<Option<u64>>
where
    C::Entry: Clone,
{
    let shared = &log.shared;
    let (version, sources, purged, vote, committed) = {
        let st = shared.lock();
        let Some(g) = st.groups.get(&group) else { return Ok(Some(0)) };
        if g.slots.len() > shared.options.rewrite_entries_max {
            return Ok(None);
        }
        let mut sources = Vec::with_capacity(g.slots.len());
        for s in &g.slots {
            if let Some(e) = &s.cached {
                sources.push(Source::<C>::Mem(e.clone()));
            } else if let Some(loc) = s.loc {
                let seg = st.segments.get(&loc.seg).cloned().ok_or_else(|| io::Error::other("segment gone"))?;
                sources.push(Source::Disk(seg, loc, s.log_id.clone()));
            }
        }
        (g.version, sources, g.last_purged.clone(), g.vote.clone(), g.committed.clone())
    };
    // Read outside the lock.
    let mut entries = Vec::with_capacity(sources.len());
    for s in sources {
        entries.push(match s {
            Source::Mem(e) => e,
            Source::Disk(seg, loc, id) => read_entry::<C>(&seg, loc, &id)?,
        });
    }
    let n = entries.len() as u64;
    let (tx, rx) = std::sync::mpsc::channel();
    let done = Waiter::Call(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    if !log.group(group).rewrite_with(version, purged, vote, committed, entries, done)? {
        return Ok(None);
    }
    rx.recv().unwrap_or_else(|_| Err(io::Error::other("the log writer stopped during a rewrite")))?;
    shared.counters.entries_rewritten.fetch_add(n, Ordering::Relaxed);
    Ok(Some(n))
}
