//! The openraft side of hibernation: [`apply`] performs a [`GroupSleep`](super::GroupSleep)
//! action on a real group (ticker, elections, heartbeat, election trigger), [`observe`] turns
//! the group's metrics into the [`Observation`] the state machine consumes, and
//! [`renew_write_lease`] runs the heartbeat round a woken leader owes before its next write.
//!
//! Messages to peers (`Sleep`, `Wake`) are not sent here: they are the node fabric's.

use std::fmt;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::Fatal;
use openraft::metrics::{RaftMetrics, WaitError};
use openraft::storage::RaftStateMachine;
use openraft::type_config::alias::InstantOf;
use openraft::{Instant as _, LogIdOptionExt, Raft, ServerState};

use super::{Action, NodeId, Observation, Role};
use crate::types::TypeConfig;

/// Performs the openraft part of `action` on `raft`:
/// - `SendSleep`, `Park`: ticker off (no ticks, so no heartbeats and no elections);
/// - `WakeLeader`: elections on, ticker on, one heartbeat now;
/// - `WakeFollower`: elections off (held), ticker on;
/// - `ResumeElect`: elections on;
/// - `WakeAndElect`: elections on, ticker on, an election now (with a pre-vote round, so a
///   leader that is in fact alive and acked by a quorum is not deposed, and no replica's
///   valid lease is cut short);
/// - `Elect`: an election now (pre-vote first).
///
/// Fails only when the group is shut down or hit a fatal storage error.
pub async fn apply<SM>(raft: &Raft<TypeConfig, SM>, action: Action) -> Result<(), Fatal<TypeConfig>>
where
    SM: RaftStateMachine<TypeConfig>,
{
    match action {
        Action::None => {}
        Action::SendSleep { .. } | Action::Park => raft.runtime_config().tick(false),
        Action::WakeLeader { .. } => {
            raft.runtime_config().elect(true);
            raft.runtime_config().tick(true);
            raft.trigger().heartbeat().await?;
        }
        Action::WakeFollower { .. } => {
            raft.runtime_config().elect(false);
            raft.runtime_config().tick(true);
        }
        Action::ResumeElect => raft.runtime_config().elect(true),
        Action::WakeAndElect => {
            raft.runtime_config().elect(true);
            raft.runtime_config().tick(true);
            raft.trigger().elect(true).await?;
        }
        Action::Elect => raft.trigger().elect(true).await?,
    }
    Ok(())
}

/// The group as the state machine sees it now; `is_up` is liveness's view of a peer.
pub fn observe<SM>(raft: &Raft<TypeConfig, SM>, is_up: impl Fn(NodeId) -> bool) -> Observation
where
    SM: RaftStateMachine<TypeConfig>,
{
    let rx = raft.metrics();
    let m = rx.borrow_watched();
    observation(&m, is_up)
}

/// [`observe`] on metrics already at hand. `followers_caught_up` holds on a leader whose
/// commit index is its last log index and whose every replication target (voters and
/// learners) that `is_up` reports up has matched the last log index. Followers reported down
/// do not keep a group awake: when they come back, `on_peer_up` wakes the leader, which
/// catches them up.
pub fn observation(m: &RaftMetrics<TypeConfig>, is_up: impl Fn(NodeId) -> bool) -> Observation {
    let me = m.id;
    let role = match (m.state, m.current_leader) {
        (ServerState::Leader, Some(l)) if l == me => Role::Leader { term: m.current_term },
        (ServerState::Follower, Some(l)) if l != me => Role::Follower { leader: l, term: m.current_term },
        _ => Role::Other,
    };
    let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
    let followers_caught_up = matches!(role, Role::Leader { .. })
        && m.last_log_index.is_some_and(|last| {
            let settled = |n: NodeId, matched: Option<u64>| n == me || !is_up(n) || matched == Some(last);
            m.local_committed.index() == Some(last)
                && m.replication.as_ref().is_some_and(|r| {
                    voters.iter().all(|&v| settled(v, r.get(&v).and_then(|x| x.index())))
                        && r.iter().all(|(&n, matched)| settled(n, matched.index()))
                })
        });
    Observation { role, followers_caught_up, voters }
}

/// Why a lease renewal failed.
#[derive(Debug)]
pub enum LeaseError {
    /// The group is shut down or failed.
    Fatal(Fatal<TypeConfig>),
    /// No quorum acknowledged a heartbeat in time (or the group is shutting down).
    Wait(WaitError),
    /// This replica stopped leading while it waited (a leadership transfer, an election).
    NotLeader,
}

impl fmt::Display for LeaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseError::Fatal(e) => write!(f, "renewing the write lease: {e}"),
            LeaseError::Wait(e) => write!(f, "renewing the write lease: {e}"),
            LeaseError::NotLeader => write!(f, "renewing the write lease: no longer the leader"),
        }
    }
}

impl std::error::Error for LeaseError {}

/// Runs one heartbeat round on a (woken) leader and waits up to `timeout` until a quorum
/// acknowledged it, so the leader lease that lapsed while the group slept is valid again and
/// the next write is not refused with `LeaseExpired`. Call
/// [`GroupSleep::on_write_lease_renewed`](super::GroupSleep::on_write_lease_renewed) after.
pub async fn renew_write_lease<SM>(raft: &Raft<TypeConfig, SM>, timeout: Duration) -> Result<(), LeaseError>
where
    SM: RaftStateMachine<TypeConfig>,
{
    let before = InstantOf::<TypeConfig>::now();
    raft.trigger().heartbeat().await.map_err(LeaseError::Fatal)?;
    // Also ends when this replica stops leading: a lost leadership acks no more heartbeats,
    // and the writer should look for the new leader now, not after the whole timeout.
    let m = raft
        .wait(Some(timeout))
        .metrics(
            |m| m.last_quorum_acked.is_some_and(|t| *t >= before) || m.current_leader != Some(m.id),
            "a quorum acked a heartbeat, or another replica leads",
        )
        .await
        .map_err(LeaseError::Wait)?;
    if m.current_leader != Some(m.id) {
        return Err(LeaseError::NotLeader);
    }
    Ok(())
}
