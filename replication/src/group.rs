//! One partition group on one node — its Raft, its state machine — and, while this replica
//! leads, the leader's write path: the rules that make every replica apply identical versions.
//!
//! - **Decided once, by the leader.** A write is decided here with the engine's prepare step
//!   (policies, generation checks, the caller's merge) into a whole record version, which the
//!   log carries; replicas only apply it ([`crate::state_machine`]).
//! - **Policy failures are answered here and never logged**: the caller's decision fails
//!   (generation mismatch, record exists, not found) before anything is proposed, and so does a
//!   version the engine could not store (too big, bad set name): what is logged, every
//!   replica's apply can store.
//! - **Last-update times rise in log order per partition**: each version gets at least
//!   `highest + 1`, where `highest` is the newest last-update time in the partition when this
//!   leader's term became ready, raised by every version it proposed since; so newest-wins by
//!   last-update time (the engine's apply and its cold start) means latest-in-log wins, whatever
//!   the clocks of the nodes do.
//! - **Same-key writes in flight chain**: a pending overlay keeps, per digest, the versions
//!   proposed but not yet applied; the next write of that key decides over the newest of them.
//!   Past [`KEY_PENDING_LIMIT`] in flight, the write is refused as "key busy" (14), as
//!   Aerospike does past its `transaction-pending-limit`.
//! - **The log holds versions in the order they were decided**: deciding and submitting to
//!   Raft happen under one submission lock per group (the engine read before a decision does
//!   not), so a version decided over a pending one is always logged after it.
//! - **A refusal is only reported as such when it is true**: a version Raft refused before
//!   appending it (not leader, lease lapsed) is "not leader" to its writer — unless a later
//!   version of the key was decided over it, whose effect includes it: then "in doubt".
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
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardReason};
use openraft::impls::ProgressResponder;
use openraft::raft::ClientWriteResponse;
use peregrine_engine::clock::is_expired;
use peregrine_engine::record::next_generation;
use peregrine_engine::{
    Applied, Change, Current, Digest, Engine, Existing, PartitionId, Prepared, RecordMeta, RecordVersion,
};

use crate::control::{ControlMessage, ControlSender};
use crate::hibernate::driver::{apply, renew_write_lease};
use crate::hibernate::{Action, GroupSleep, SleepConfig};
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

/// Why a linearizable read could not be confirmed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// This replica does not lead; `leader` is the one it knows of.
    NotLeader {
        /// The leader this replica knows of.
        leader: Option<u64>,
    },
    /// No quorum confirmed the leadership in time.
    Unavailable(String),
    /// The group stopped.
    Fatal(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotLeader { leader: Some(l) } => write!(f, "not the leader (node {l} leads)"),
            ReadError::NotLeader { leader: None } => write!(f, "not the leader (no leader known)"),
            ReadError::Unavailable(m) => write!(f, "leadership not confirmed: {m}"),
            ReadError::Fatal(m) => write!(f, "group stopped: {m}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Readers waiting for a ReadIndex round, and whether one runs.
#[derive(Default)]
struct ReadRounds {
    waiting: Vec<tokio::sync::oneshot::Sender<Result<(), ReadError>>>,
    running: bool,
}

/// How long a write waits for its proposal to be committed and applied before it answers
/// "in doubt" (the proposal itself goes on, and stays in the pending overlay until it resolves).
pub const PROPOSAL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// A version proposed and not yet applied.
struct Pending {
    /// The leader term it was proposed in.
    term: u64,
    version: RecordVersion,
    /// Whether a later version of the key was decided over this one.
    has_successor: bool,
}

/// Held from a version's decision to its submission to Raft.
type SubmitGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

/// Why a proposal did not complete.
enum Refusal {
    /// Refused before it was appended because the leader lease lapsed: worth one renewal.
    LeaseExpired,
    /// Anything else, as the writer gets it.
    Error(WriteError),
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
    /// Serializes decision + submission, so the log order is the decision order.
    submit: tokio::sync::Mutex<()>,
    /// Hibernation of this replica (`None`: it never sleeps).
    sleep: Option<Mutex<GroupSleep>>,
    control: Arc<dyn ControlSender>,
    reads: Mutex<ReadRounds>,
}

/// How a group behaves, beyond its parts.
#[derive(Clone)]
pub struct GroupSettings {
    /// How long a write waits for its proposal to be applied before answering "in doubt".
    pub proposal_timeout: Duration,
    /// Hibernation (`None`: the group's timers always run).
    pub sleep: Option<SleepConfig>,
    /// Carries the group's sleep and wake requests to its peers.
    pub control: Arc<dyn ControlSender>,
}

impl fmt::Debug for GroupSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupSettings")
            .field("proposal_timeout", &self.proposal_timeout)
            .field("sleep", &self.sleep)
            .finish_non_exhaustive()
    }
}

/// Where the write path stands with this replica's role.
enum Role {
    /// Leading and ready in `term`.
    Ready(u64),
    NotLeader(Option<u64>),
    NotReady,
}

impl Group {
    /// The group of partition `pid` on node `node_id`, around its Raft and state machine.
    pub fn new(
        node_id: u64,
        pid: PartitionId,
        engine: Engine,
        raft: PartitionRaft,
        sm: PartitionStateMachine,
        settings: GroupSettings,
    ) -> Group {
        let leader = Mutex::new(LeaderState::default());
        let sleep = settings.sleep.map(|c| Mutex::new(GroupSleep::new(node_id, c, Instant::now())));
        Group {
            inner: Arc::new(GroupInner {
                node_id,
                pid,
                engine,
                raft,
                sm,
                proposal_timeout: settings.proposal_timeout,
                leader,
                submit: tokio::sync::Mutex::new(()),
                sleep,
                control: settings.control,
                reads: Mutex::new(ReadRounds::default()),
            }),
        }
    }

    /// Runs `f` on this replica's hibernation state (`None` when hibernation is off).
    pub fn with_sleep<R>(&self, f: impl FnOnce(&mut GroupSleep) -> R) -> Option<R> {
        self.inner.sleep.as_ref().map(|s| f(&mut s.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// Whether this replica sleeps (its timers parked).
    pub fn is_asleep(&self) -> bool {
        self.with_sleep(|s| s.is_asleep()).unwrap_or(false)
    }

    /// Performs a hibernation action: its openraft side effects on this replica, then the
    /// messages it asks for to the group's other voters.
    pub async fn execute(&self, action: Action) {
        if action == Action::None || apply(&self.inner.raft, action).await.is_err() {
            return; // nothing to do, or the group is shutting down
        }
        let message = match action {
            Action::SendSleep { term } => ControlMessage::Sleep { partition: self.inner.pid.get(), term },
            Action::WakeLeader { notify_peers: true } | Action::WakeFollower { notify_peers: true } => {
                ControlMessage::Wake { partition: self.inner.pid.get() }
            }
            _ => return,
        };
        let voters: Vec<u64> = self.inner.raft.metrics().borrow_watched().membership_config.voter_ids().collect();
        for v in voters.into_iter().filter(|&v| v != self.inner.node_id) {
            self.inner.control.send(self.inner.node_id, v, message);
        }
    }

    /// Activity on this replica: wakes it (and its peers) if it sleeps, and renews a lapsed
    /// leader lease before a write, so the write is not refused for a lease that lapsed while
    /// the group slept.
    async fn wake_for_write(&self) -> Result<(), WriteError> {
        let Some(action) = self.with_sleep(|s| s.on_activity(Instant::now())) else { return Ok(()) };
        self.execute(action).await;
        let needs_lease = self.with_sleep(|s| s.needs_heartbeat_before_write()).unwrap_or(false);
        if needs_lease && self.is_ready_leader() {
            if let Err(e) = renew_write_lease(&self.inner.raft, self.inner.proposal_timeout).await {
                tracing::debug!(partition = self.inner.pid.get(), "lease not renewed: {e}");
                return Err(WriteError::NotReady);
            }
            self.with_sleep(|s| s.on_write_lease_renewed());
        }
        Ok(())
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

    /// The leader this replica knows of (if any) and the term of its vote.
    pub fn leader_and_term(&self) -> (Option<u64>, u64) {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        (m.current_leader, m.vote.leader_id.term)
    }

    /// The leader this replica knows of (itself included), if any.
    pub fn leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow_watched().current_leader
    }

    /// Waits until a read of this replica's engine is linearizable: this replica leads, a
    /// quorum confirmed it (ReadIndex: a heartbeat round, no clock assumption) after the call
    /// began, and everything committed before then is applied here. Concurrent readers share
    /// one round: a reader arriving while a round runs waits for the next one, which starts
    /// after it arrived.
    pub async fn linearizable_read(&self) -> Result<(), ReadError> {
        if let Role::NotLeader(leader) = self.role() {
            return Err(ReadError::NotLeader { leader });
        }
        if let Some(action) = self.with_sleep(|s| s.on_activity(Instant::now())) {
            self.execute(action).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut r = self.inner.reads.lock().unwrap_or_else(|p| p.into_inner());
            r.waiting.push(tx);
            !std::mem::replace(&mut r.running, true)
        };
        if start {
            let group = self.clone();
            tokio::spawn(async move { group.read_rounds().await });
        }
        rx.await.unwrap_or_else(|_| Err(ReadError::Fatal("the read round was dropped".into())))
    }

    /// Runs ReadIndex rounds while readers wait.
    async fn read_rounds(&self) {
        loop {
            let batch = {
                let mut r = self.inner.reads.lock().unwrap_or_else(|p| p.into_inner());
                if r.waiting.is_empty() {
                    r.running = false;
                    return;
                }
                std::mem::take(&mut r.waiting)
            };
            let round = self.inner.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
            let result = match tokio::time::timeout(self.inner.proposal_timeout, round).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(openraft::error::RaftError::APIError(e))) => match e {
                    openraft::error::LinearizableReadError::ForwardToLeader(f) => {
                        Err(ReadError::NotLeader { leader: f.leader_id.filter(|l| *l != self.inner.node_id) })
                    }
                    openraft::error::LinearizableReadError::QuorumNotEnough(q) => {
                        Err(ReadError::Unavailable(q.to_string()))
                    }
                },
                Ok(Err(openraft::error::RaftError::Fatal(f))) => Err(ReadError::Fatal(f.to_string())),
                Err(_) => Err(ReadError::Unavailable(format!(
                    "no quorum within {} ms",
                    self.inner.proposal_timeout.as_millis()
                ))),
            };
            for tx in batch {
                let _ = tx.send(result.clone());
            }
        }
    }

    /// Whether this replica may serve a replica read: its partition is readable (no install
    /// under way or incomplete, caught up past the last one) and it has applied an entry of
    /// the term it knows (so it is not a replica cut off in an old term).
    pub fn is_caught_up(&self) -> bool {
        if !self.inner.sm.readable() {
            return false;
        }
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        m.current_leader.is_some() && m.last_applied.is_some_and(|a| a.leader_id.term == m.vote.leader_id.term)
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
        self.wake_for_write().await?;
        let mut lease_renewed = false;
        loop {
            let (prepared, submit) = self.decide_write(digest, read_existing, &mut decide).await?;
            let Some(version) = prepared.version else {
                return Ok(prepared.applied); // nothing to store: nothing to log
            };
            match self.propose(version, submit).await {
                Ok(()) => return Ok(prepared.applied),
                // The leader's lease lapsed (no append acked for an election timeout: a fresh
                // leader, a quiet group) and nothing was appended: renew it, decide again.
                Err(Refusal::LeaseExpired) if !lease_renewed => {
                    lease_renewed = true;
                    if renew_write_lease(&self.inner.raft, self.inner.proposal_timeout).await.is_err() {
                        return Err(WriteError::NotReady);
                    }
                }
                Err(Refusal::LeaseExpired) => return Err(WriteError::NotReady),
                Err(Refusal::Error(e)) => return Err(e),
            }
        }
    }

    /// Proposes the removal of an expired record (a tombstone version decided here), if the
    /// record is still indexed with `meta` and expired by this leader's clock and no write of
    /// it is in flight. Returns whether a removal was applied.
    pub async fn expire(&self, digest: &Digest, meta: RecordMeta) -> Result<bool, WriteError> {
        assert_eq!(digest.partition(), self.inner.pid, "an expiry routed to the wrong partition group");
        self.wake_for_write().await?;
        let submit = self.inner.submit.lock().await;
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
        match self.propose(version, submit).await {
            Ok(()) => Ok(true),
            Err(Refusal::LeaseExpired) => Err(WriteError::NotReady),
            Err(Refusal::Error(e)) => Err(e),
        }
    }

    /// Decides a write: over the newest pending version of the key if there is one, else over
    /// what the engine holds (read without any lock, decided under them once the index shows
    /// the entry unchanged). The decided version is registered as pending, and the submission
    /// lock is returned held: versions reach the log in the order they were decided.
    async fn decide_write<F>(
        &self,
        digest: &Digest,
        read_existing: bool,
        decide: &mut F,
    ) -> Result<(Prepared, SubmitGuard<'_>), WriteError>
    where
        F: FnMut(Option<Existing<'_>>) -> peregrine_engine::Result<Change>,
    {
        let engine = &self.inner.engine;
        for _ in 0..DECIDE_ATTEMPTS_MAX {
            {
                let submit = self.inner.submit.lock().await;
                let mut state = self.lock_ready()?;
                if let Some(newest) = state.pending.get(digest).and_then(|chain| chain.back()) {
                    let prepared =
                        self.decide_over_pending(digest, &newest.version, state.highest_lut_ms + 1, decide)?;
                    if let Some(v) = &prepared.version {
                        self.inner.engine.check_storable(v).map_err(WriteError::Refused)?;
                        Self::register(&mut state, v)?;
                    }
                    return Ok((prepared, submit));
                }
            }
            let read = engine.read_current_async(digest, read_existing).await.map_err(WriteError::Refused)?;
            let submit = self.inner.submit.lock().await;
            let mut state = self.lock_ready()?;
            if state.pending.contains_key(digest) || engine.index().get(digest) != read.entry {
                continue; // another write of this key got in between: decide again
            }
            let prepared = engine
                .prepare_over(digest, &read, state.highest_lut_ms + 1, &mut *decide)
                .map_err(WriteError::Refused)?;
            if let Some(v) = &prepared.version {
                engine.check_storable(v).map_err(WriteError::Refused)?;
                Self::register(&mut state, v)?;
            }
            return Ok((prepared, submit));
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

    /// Records `version` as pending and raises the partition's highest last-update time. The
    /// versions already pending for the key now have a successor decided over them.
    fn register(state: &mut LeaderState, version: &RecordVersion) -> Result<(), WriteError> {
        let lut = version.meta().last_update_ms;
        assert!(lut > state.highest_lut_ms, "last-update times must rise in log order");
        let term = state.term.unwrap_or_default();
        let chain = state.pending.entry(*version.digest()).or_default();
        if chain.len() >= KEY_PENDING_LIMIT {
            return Err(WriteError::Refused(peregrine_engine::Error::KeyBusy));
        }
        for p in chain.iter_mut() {
            p.has_successor = true;
        }
        chain.push_back(Pending { term, version: version.clone(), has_successor: false });
        state.highest_lut_ms = lut;
        Ok(())
    }

    /// Takes a resolved version out of the pending overlay; returns whether a later version
    /// of the key was decided over it.
    fn unpend(&self, digest: &Digest, term: u64, lut: u64) -> bool {
        let mut state = self.inner.leader.lock().unwrap_or_else(|p| p.into_inner());
        let Some(chain) = state.pending.get_mut(digest) else { return false };
        let mut had_successor = false;
        chain.retain(|p| {
            let this = p.term == term && p.version.meta().last_update_ms == lut;
            had_successor |= this && p.has_successor;
            !this
        });
        if chain.is_empty() {
            state.pending.remove(digest);
        }
        had_successor
    }

    /// Proposes one decided version — submitted to Raft while `submit` is held, so the log
    /// holds versions in the order they were decided — and waits (at most the proposal
    /// timeout) until it is applied here. The wait runs in its own task, which takes the
    /// version out of the pending overlay once it resolves: a version that timed out for its
    /// caller stays in the overlay until then, so no later write of the key is decided
    /// without it.
    async fn propose(&self, version: RecordVersion, submit: SubmitGuard<'_>) -> Result<(), Refusal> {
        let digest = *version.digest();
        let lut = version.meta().last_update_ms;
        let term = self.inner.leader.lock().unwrap_or_else(|p| p.into_inner()).term.unwrap_or_default();
        let (responder, response) = ProgressResponder::complete_only();
        let command = Command::from_versions(std::slice::from_ref(&version));
        // Only in the term the version was decided in: a leader that lost its term and leads
        // again must not append it after the new term's first entry, where the versions
        // decided in the new term, over an engine that does not hold it yet, would race it (two
        // writes decided over the same version, both acknowledged). Refused, it is not appended.
        let submitted = self.inner.raft.write(command).responder(responder).with_leader(term).await;
        drop(submit);
        if let Err(fatal) = submitted {
            self.unpend(&digest, term, lut);
            return Err(Refusal::Error(WriteError::Fatal(fatal.to_string())));
        }
        let group = self.clone();
        let task = tokio::spawn(async move {
            let result = response.await;
            let had_successor = group.unpend(&digest, term, lut);
            group.outcome(result, had_successor)
        });
        match tokio::time::timeout(self.inner.proposal_timeout, task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => Err(Refusal::Error(WriteError::Fatal(format!("the proposal task failed: {join}")))),
            Err(_) => Err(Refusal::Error(WriteError::InDoubt(format!(
                "partition {}: not applied within {} ms",
                self.inner.pid.get(),
                self.inner.proposal_timeout.as_millis()
            )))),
        }
    }

    /// What a proposal's result means for its writer. A version refused before it was
    /// appended is not applied — unless a later version of the key was decided over it and
    /// may be: then its effect may be in the log after all, and the answer is "in doubt".
    fn outcome<E: fmt::Display>(
        &self,
        result: Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError<TypeConfig>>, E>,
        had_successor: bool,
    ) -> Result<(), Refusal> {
        let pid = self.inner.pid.get();
        match result {
            Ok(Ok(resp)) => match resp.data.outcomes.as_slice() {
                [Outcome::Applied] => Ok(()),
                // A truncation that reached the replicas first covers the version: as if the
                // write happened just before the truncation.
                [Outcome::Truncated] => Ok(()),
                other => Err(Refusal::Error(WriteError::Fatal(format!(
                    "partition {pid}: a leader-decided version applied as {other:?}"
                )))),
            },
            Ok(Err(ClientWriteError::ForwardToLeader(_))) if had_successor => Err(Refusal::Error(WriteError::InDoubt(
                format!("partition {pid}: refused, but a later write of the key was decided over it"),
            ))),
            Ok(Err(ClientWriteError::ForwardToLeader(f))) if f.reason == ForwardReason::LeaseExpired => {
                Err(Refusal::LeaseExpired)
            }
            Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                Err(Refusal::Error(WriteError::NotLeader { leader: f.leader_id.filter(|l| *l != self.inner.node_id) }))
            }
            Ok(Err(e)) => Err(Refusal::Error(WriteError::InDoubt(e.to_string()))),
            // The responder was dropped: the group stopped with the entry in flight.
            Err(e) => Err(Refusal::Error(WriteError::Fatal(format!("partition {pid}: no response: {e}")))),
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
