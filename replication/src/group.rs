//! One partition group on one node — its Raft, its state machine — and, while this replica
//! leads, the leader's write path: the rules that make every replica apply identical versions.
//!
//! - **Decided once, by the leader.** A write is decided here with the engine's prepare step
//!   (policies, generation checks, the caller's merge) into a whole record version, which the
//!   log carries; replicas only apply it ([`crate::state_machine`]).
//! - **Policy failures are answered here and never logged**: the caller's decision fails
//!   (generation mismatch, record exists, not found, too big) before anything is proposed.
//! - **Last-update times rise in log order per partition**: each version gets at least
//!   `highest + 1`, where `highest` is the newest last-update time in the partition when this
//!   leader's term became ready, raised by every version it proposed since; so newest-wins by
//!   last-update time (the engine's apply and its cold start) means latest-in-log wins, whatever
//!   the clocks of the nodes do.
//! - **Same-key writes in flight chain**: a pending overlay keeps, per digest, the versions
//!   proposed but not yet applied; the next write of that key decides over the newest of them.
//!   Past [`KEY_PENDING_LIMIT`] in flight, the write is refused as "key busy" (14), as
//!   Aerospike does past its `transaction-pending-limit`.
//! - **A new leader decides nothing before its first entry of the term is applied** (the blank
//!   entry openraft appends on election): until then the engine may not hold every committed
//!   version, and the write answers [`WriteError::NotReady`].
//! - **Expiry is proposed through the log** ([`Group::expire`]): the leader turns an expired
//!   record into a tombstone version, so every replica removes the same records.
//!
//! The overlay is reset whenever the leader's term changes: versions of an older term are
//! either applied by now or truncated, and their proposers were told (in doubt or failed).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use peregrine_engine::clock::is_expired;
use peregrine_engine::record::next_generation;
use peregrine_engine::{
    Applied, Change, Current, Digest, Engine, Existing, PartitionId, Prepared, RecordMeta, RecordVersion,
};

use crate::state_machine::PartitionStateMachine;
use crate::types::{Command, Outcome, TypeConfig};

/// The Raft of one partition group.
pub type PartitionRaft = openraft::Raft<TypeConfig, PartitionStateMachine>;

/// Most writes of one key in flight (proposed, not yet applied) on a leader; one more is
/// refused as "key busy". Aerospike's `transaction-pending-limit` default.
pub const KEY_PENDING_LIMIT: usize = 20;

/// How often a leader write decides again because the record changed between its read and
/// its decision (a concurrent write of the same key).
const DECIDE_ATTEMPTS_MAX: usize = 16;

/// Why a replicated write did not happen, or may not have.
#[derive(Debug)]
pub enum WriteError {
    /// This replica does not lead the group; `leader` is the one it knows of, if any. Nothing
    /// was proposed: retrying elsewhere is safe.
    NotLeader {
        /// The leader this replica knows of.
        leader: Option<u64>,
    },
    /// This replica leads, but has not applied its first entry of the term yet. Nothing was
    /// proposed: retry shortly.
    NotReady,
    /// The decision refused the write (generation mismatch, exists, not found, too big, key
    /// busy, ...). Nothing was proposed.
    Refused(peregrine_engine::Error),
    /// The version was proposed but leadership changed before it was known to be committed:
    /// it may or may not be applied. The caller must not assume either.
    InDoubt(String),
    /// The group stopped (shut down or a storage failure); the write may be in doubt.
    Fatal(String),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::NotLeader { leader: Some(l) } => write!(f, "not the leader (node {l} leads)"),
            WriteError::NotLeader { leader: None } => write!(f, "not the leader (no leader known)"),
            WriteError::NotReady => write!(f, "the leader has not applied its first entry of the term yet"),
            WriteError::Refused(e) => write!(f, "refused: {e}"),
            WriteError::InDoubt(m) => write!(f, "outcome unknown: {m}"),
            WriteError::Fatal(m) => write!(f, "group stopped: {m}"),
        }
    }
}

impl std::error::Error for WriteError {}

/// How long a write waits for its proposal to be committed and applied before it answers
/// "in doubt" (the proposal itself goes on, and stays in the pending overlay until it resolves).
pub const PROPOSAL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// A version proposed and not yet applied.
struct Pending {
    /// The leader term it was proposed in.
    term: u64,
    version: RecordVersion,
}

/// What a leader keeps about its own proposals of the current term.
#[derive(Default)]
struct LeaderState {
    /// The term these proposals belong to (`None` before the first write as leader).
    term: Option<u64>,
    /// Newest last-update time in the partition or proposed since the term became ready.
    highest_lut_ms: u64,
    /// Versions proposed and not yet applied, oldest first, per digest.
    pending: HashMap<Digest, VecDeque<Pending>>,
}

/// One partition group on this node.
#[derive(Clone)]
pub struct Group {
    inner: Arc<GroupInner>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group").field("node", &self.inner.node_id).field("partition", &self.inner.pid.get()).finish()
    }
}

struct GroupInner {
    node_id: u64,
    pid: PartitionId,
    engine: Engine,
    raft: PartitionRaft,
    sm: PartitionStateMachine,
    proposal_timeout: Duration,
    leader: Mutex<LeaderState>,
}

/// Where the write path stands with this replica's role.
enum Role {
    /// Leading and ready in `term`.
    Ready(u64),
    NotLeader(Option<u64>),
    NotReady,
}

impl Group {
    /// The group of partition `pid` on node `node_id`, around its Raft and state machine; a
    /// write waits at most `proposal_timeout` for its proposal to be applied.
    pub fn new(
        node_id: u64,
        pid: PartitionId,
        engine: Engine,
        raft: PartitionRaft,
        sm: PartitionStateMachine,
        proposal_timeout: Duration,
    ) -> Group {
        let leader = Mutex::new(LeaderState::default());
        Group { inner: Arc::new(GroupInner { node_id, pid, engine, raft, sm, proposal_timeout, leader }) }
    }

    /// The partition.
    pub fn partition(&self) -> PartitionId {
        self.inner.pid
    }

    /// The group's Raft.
    pub fn raft(&self) -> &PartitionRaft {
        &self.inner.raft
    }

    /// The group's state machine.
    pub fn state_machine(&self) -> &PartitionStateMachine {
        &self.inner.sm
    }

    /// The namespace engine the group applies to.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Whether this replica leads and may decide now (its first entry of the term applied).
    pub fn is_ready_leader(&self) -> bool {
        matches!(self.role(), Role::Ready(_))
    }

    /// Writes through the log: `decide` sees the record as the newest proposed or applied
    /// version (its bins when `read_existing`) and says what to store; the decided version is
    /// proposed, and this returns once it is committed and applied here. `decide` may run
    /// more than once; it must have no side effects beyond its result.
    pub async fn write<F>(&self, digest: &Digest, read_existing: bool, mut decide: F) -> Result<Applied, WriteError>
    where
        F: FnMut(Option<Existing<'_>>) -> peregrine_engine::Result<Change>,
    {
        assert_eq!(digest.partition(), self.inner.pid, "a write routed to the wrong partition group");
        let prepared = self.decide_write(digest, read_existing, &mut decide).await?;
        let Some(version) = prepared.version else {
            return Ok(prepared.applied); // nothing to store: nothing to log
        };
        self.propose(version).await?;
        Ok(prepared.applied)
    }

    /// Proposes the removal of an expired record (a tombstone version decided here), if the
    /// record is still indexed with `meta` and expired by this leader's clock and no write of
    /// it is in flight. Returns whether a removal was applied.
    pub async fn expire(&self, digest: &Digest, meta: RecordMeta) -> Result<bool, WriteError> {
        assert_eq!(digest.partition(), self.inner.pid, "an expiry routed to the wrong partition group");
        let version = {
            let mut state = self.lock_ready()?;
            if state.pending.contains_key(digest) {
                return Ok(false); // a write in flight supersedes the expired version
            }
            let engine = &self.inner.engine;
            let Some(entry) = engine.index().get(digest) else { return Ok(false) };
            let expired = is_expired(entry.void_time, engine.config().clock.now_void_s());
            let same = entry.generation == meta.generation
                && entry.void_time == meta.void_time
                && entry.last_update_ms == meta.last_update_ms;
            if entry.is_tombstone() || !expired || !same {
                return Ok(false);
            }
            let lut = engine.config().clock.now_unix_ms().max(entry.last_update_ms + 1).max(state.highest_lut_ms + 1);
            let meta = RecordMeta { generation: next_generation(entry.generation), void_time: 0, last_update_ms: lut };
            let version =
                RecordVersion::Tombstone { digest: *digest, set_name: engine.set_name_of(entry.set_id), meta };
            Self::register(&mut state, &version)?;
            version
        };
        self.propose(version).await?;
        Ok(true)
    }

    /// Decides a write: over the newest pending version of the key if there is one, else over
    /// what the engine holds (read without the state lock, decided under it once the index
    /// shows the entry unchanged). The decided version is registered as pending.
    async fn decide_write<F>(
        &self,
        digest: &Digest,
        read_existing: bool,
        decide: &mut F,
    ) -> Result<Prepared, WriteError>
    where
        F: FnMut(Option<Existing<'_>>) -> peregrine_engine::Result<Change>,
    {
        let engine = &self.inner.engine;
        for _ in 0..DECIDE_ATTEMPTS_MAX {
            {
                let mut state = self.lock_ready()?;
                if let Some(newest) = state.pending.get(digest).and_then(|chain| chain.back()) {
                    let prepared =
                        self.decide_over_pending(digest, &newest.version, state.highest_lut_ms + 1, decide)?;
                    if let Some(v) = &prepared.version {
                        Self::register(&mut state, v)?;
                    }
                    return Ok(prepared);
                }
            }
            let read = engine.read_current_async(digest, read_existing).await.map_err(WriteError::Refused)?;
            let mut state = self.lock_ready()?;
            if state.pending.contains_key(digest) || engine.index().get(digest) != read.entry {
                continue; // another write of this key got in between: decide again
            }
            let prepared = engine
                .prepare_over(digest, &read, state.highest_lut_ms + 1, &mut *decide)
                .map_err(WriteError::Refused)?;
            if let Some(v) = &prepared.version {
                Self::register(&mut state, v)?;
            }
            return Ok(prepared);
        }
        Err(WriteError::Refused(peregrine_engine::Error::KeyBusy))
    }

    /// Decides over a pending (proposed, not applied) version of the key.
    fn decide_over_pending<F>(
        &self,
        digest: &Digest,
        newest: &RecordVersion,
        floor: u64,
        decide: &mut F,
    ) -> Result<Prepared, WriteError>
    where
        F: FnMut(Option<Existing<'_>>) -> peregrine_engine::Result<Change>,
    {
        let engine = &self.inner.engine;
        let now_void = engine.config().clock.now_void_s();
        let (live, set_name) = match newest {
            RecordVersion::Live(r) if !is_expired(r.meta.void_time, now_void) => {
                (Some(Existing { meta: r.meta, record: Some(r) }), r.set_name.as_slice())
            }
            RecordVersion::Live(r) => (None, r.set_name.as_slice()),
            RecordVersion::Tombstone { set_name, .. } => (None, set_name.as_slice()),
        };
        let change = decide(live).map_err(WriteError::Refused)?;
        let current = Current { live, set_name, newest_lut_ms: newest.meta().last_update_ms };
        let (version, applied) = engine.decide(digest, &current, change, floor).map_err(WriteError::Refused)?;
        Ok(Prepared { version, applied, expected: None })
    }

    /// Records `version` as pending and raises the partition's highest last-update time.
    fn register(state: &mut LeaderState, version: &RecordVersion) -> Result<(), WriteError> {
        let lut = version.meta().last_update_ms;
        assert!(lut > state.highest_lut_ms, "last-update times must rise in log order");
        let chain = state.pending.entry(*version.digest()).or_default();
        if chain.len() >= KEY_PENDING_LIMIT {
            return Err(WriteError::Refused(peregrine_engine::Error::KeyBusy));
        }
        let term = state.term.unwrap_or_default();
        chain.push_back(Pending { term, version: version.clone() });
        state.highest_lut_ms = lut;
        Ok(())
    }

    /// Proposes one decided version and waits (at most the proposal timeout) until it is
    /// applied here. The proposal runs in its own task, which takes the version out of the
    /// pending overlay once it resolves: a version that timed out for its caller stays in the
    /// overlay until then, so no later write of the key is decided without it.
    async fn propose(&self, version: RecordVersion) -> Result<(), WriteError> {
        let group = self.clone();
        let term = self.inner.leader.lock().unwrap_or_else(|p| p.into_inner()).term.unwrap_or_default();
        let task = tokio::spawn(async move {
            let digest = *version.digest();
            let lut = version.meta().last_update_ms;
            let result = group.inner.raft.client_write(Command::from_versions(std::slice::from_ref(&version))).await;
            let mut state = group.inner.leader.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(chain) = state.pending.get_mut(&digest) {
                chain.retain(|p| p.term != term || p.version.meta().last_update_ms != lut);
                if chain.is_empty() {
                    state.pending.remove(&digest);
                }
            }
            drop(state);
            group.outcome(result)
        });
        match tokio::time::timeout(self.inner.proposal_timeout, task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => Err(WriteError::Fatal(format!("the proposal task failed: {join}"))),
            Err(_) => Err(WriteError::InDoubt(format!(
                "partition {}: not applied within {} ms",
                self.inner.pid.get(),
                self.inner.proposal_timeout.as_millis()
            ))),
        }
    }

    /// What a proposal's result means for its writer.
    fn outcome(
        &self,
        result: Result<
            openraft::raft::ClientWriteResponse<TypeConfig>,
            RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
        >,
    ) -> Result<(), WriteError> {
        match result {
            Ok(resp) => match resp.data.outcomes.as_slice() {
                [Outcome::Applied] => Ok(()),
                // A truncation that reached the replicas first covers the version: as if the
                // write happened just before the truncation.
                [Outcome::Truncated] => Ok(()),
                other => Err(WriteError::Fatal(format!(
                    "partition {}: a leader-decided version applied as {other:?}",
                    self.inner.pid.get()
                ))),
            },
            // Refused before anything was appended.
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader { leader: f.leader_id.filter(|l| *l != self.inner.node_id) })
            }
            Err(RaftError::APIError(e)) => Err(WriteError::InDoubt(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(WriteError::Fatal(f.to_string())),
        }
    }

    /// Where this replica stands: leading and ready (in which term), or not.
    fn role(&self) -> Role {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        if m.state != ServerState::Leader || m.current_leader != Some(self.inner.node_id) {
            return Role::NotLeader(m.current_leader.filter(|l| *l != self.inner.node_id));
        }
        let term = m.vote.leader_id.term;
        match m.last_applied {
            Some(applied) if applied.leader_id.term == term => Role::Ready(term),
            _ => Role::NotReady,
        }
    }

    /// The leader state, once this replica is a ready leader; reset when the term changed.
    fn lock_ready(&self) -> Result<MutexGuard<'_, LeaderState>, WriteError> {
        let mut state = self.inner.leader.lock().unwrap_or_else(|p| p.into_inner());
        let term = match self.role() {
            Role::Ready(term) => term,
            Role::NotLeader(leader) => return Err(WriteError::NotLeader { leader }),
            Role::NotReady => return Err(WriteError::NotReady),
        };
        if state.term != Some(term) {
            // Every committed entry is applied (the term's first entry is), so the engine
            // holds the partition's newest version of everything.
            let table = self.inner.engine.index().read(self.inner.pid);
            let highest = table.iter().map(|e| e.last_update_ms).max().unwrap_or(0);
            drop(table);
            *state = LeaderState { term: Some(term), highest_lut_ms: highest, pending: HashMap::new() };
        }
        Ok(state)
    }
}
