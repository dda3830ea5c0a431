//! Hibernation of idle Raft groups: [`GroupSleep`], a pure per-replica state machine that
//! decides when a group's replica parks its openraft ticker and when it wakes; the openraft
//! side effects of its [`Action`]s live in [`driver`].
//!
//! Why: every replica of a plain openraft group wakes about five times per heartbeat interval,
//! and thousands of idle groups spend a large share of a small node on ticks and heartbeats.
//! Asleep means *no timer at all* (the ticker parked with `runtime_config().tick(false)`); one
//! node-level liveness signal per peer pair (`crate::liveness`) stands in for the per-group
//! heartbeats while a group sleeps.
//!
//! Architecture invariant: this file (all but [`driver`]) makes no openraft call and reads no
//! clock. Every event takes the time (`now`) and what the caller observed of the group
//! ([`Observation`], built from openraft's metrics by [`driver::observe`]) as arguments, so
//! each transition is a plain function that unit tests drive with explicit `Instant`s.
//!
//! **Rules.**
//! - *A leader falls asleep* when it saw no activity (proposal or read on this replica, or a
//!   change of its role) for [`SleepConfig::idle_after`] and its observation says the group is
//!   settled: the commit index is the last log index and every follower that liveness reports
//!   up has matched the last log index. It answers [`Action::SendSleep`]: the caller tells
//!   every follower `Sleep { term }` and parks the leader's ticker.
//! - *A follower falls asleep* only when its current leader, in its current term, asks
//!   ([`GroupSleep::on_sleep_request`]); a request from another node or another term is
//!   ignored. It answers [`Action::Park`]. Responses to peer requests never ask to message
//!   peers, so delivering a request never cascades. A follower that misses the request keeps
//!   ticking, times out and runs a pre-vote that the sleeping replicas (their leases lapsed)
//!   grant: the group re-elects, which is safe, and sleeps again after `idle_after`. Learners
//!   are never asked (the caller sends to voters) and keep ticking.
//! - *A sleep is bound to (leader, term)*: if the observed role changes while asleep (a vote or
//!   an append of a newer term reached the parked replica), the replica wakes.
//! - *Activity wakes the group*: [`GroupSleep::on_activity`] on a sleeping replica wakes it and
//!   asks the caller to tell the other replicas (`notify_peers`). A woken leader heartbeats at
//!   once ([`Action::WakeLeader`]), and must run one heartbeat round before its next write:
//!   openraft's leader lease (CheckQuorum) lapsed while it slept, and a write on a lapsed lease
//!   fails with `LeaseExpired` ([`GroupSleep::needs_heartbeat_before_write`], also set when a
//!   replica is first seen leading: a fresh leader's lease starts with its first append acks).
//! - *A woken follower holds its elections* for [`SleepConfig::elect_hold_after_wake`]
//!   ([`Action::WakeFollower`], then [`Action::ResumeElect`]): its election timer ran out long
//!   ago, and without the hold its first tick would start an election before the woken
//!   leader's heartbeat arrives.
//! - *A lost leader wakes and elects*: when liveness reports down the node that leads a group
//!   this replica sleeps in, holds its elections in, or follows awake, exactly one survivor elects at once
//!   ([`Action::WakeAndElect`]): the lowest-id voter other than the lost leader that liveness
//!   reports up. The others wake with their elections held, so two survivors do not split the
//!   vote; if the chosen one fails, their hold runs out and Raft's own timers elect. The same
//!   check runs on every tick, so a group whose leader is reported down never stays asleep,
//!   even when the report came before the sleep request.
//! - *The chosen survivor retries* ([`Action::Elect`], every [`SleepConfig::elect_retry_every`])
//!   while it still follows the lost leader in the same term and liveness still reports that
//!   leader down. The election runs a pre-vote round, which openraft refuses locally while
//!   this replica's leader lease is valid, and the other survivors refuse while theirs is: a
//!   leader that died just after its group fell asleep leaves leases of up to
//!   `election_timeout_max` behind, and the retry elects as soon as they lapse instead of a
//!   whole election timeout later. Leases are never cut short: liveness may be wrong.
//! - *A sleeping leader that loses a follower stays asleep*: with no writes, a missing follower
//!   misses nothing, and safety never depended on this module. When the peer comes back
//!   ([`GroupSleep::on_peer_up`]), the sleeping leader wakes and heartbeats, so the returning
//!   replica hears from its leader before its own election timer fires and catches up; after
//!   `idle_after` the group sleeps again.
//!
//! Liveness only ever *wakes* groups or starts elections; which node leads, what is committed
//! and what is applied stay entirely with Raft.

pub mod driver;

use std::time::{Duration, Instant};

/// A node id (openraft's `NodeId` of the partition groups).
pub type NodeId = u64;

/// Default time without activity after which a leader puts its group to sleep.
pub const IDLE_AFTER_DEFAULT: Duration = Duration::from_secs(10);

/// Default time a woken follower holds its elections: at least an election timeout of the
/// slow production timers (3–6 s), so a live leader's heartbeat arrives first.
pub const ELECT_HOLD_AFTER_WAKE_DEFAULT: Duration = Duration::from_secs(6);

/// Default interval between two election attempts of the survivor chosen after a leader was
/// lost: one production heartbeat interval. An attempt refused locally sends nothing.
pub const ELECT_RETRY_EVERY_DEFAULT: Duration = Duration::from_secs(1);

/// Timers of hibernation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepConfig {
    /// A leader with no activity for this long puts its (settled) group to sleep.
    pub idle_after: Duration,
    /// A woken follower holds its elections this long (see the module docs).
    pub elect_hold_after_wake: Duration,
    /// The survivor chosen after a leader was lost retries its election this often.
    pub elect_retry_every: Duration,
}

impl Default for SleepConfig {
    fn default() -> Self {
        SleepConfig {
            idle_after: IDLE_AFTER_DEFAULT,
            elect_hold_after_wake: ELECT_HOLD_AFTER_WAKE_DEFAULT,
            elect_retry_every: ELECT_RETRY_EVERY_DEFAULT,
        }
    }
}

/// The role of this replica in its group, as observed from openraft's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This replica leads the group in `term`.
    Leader {
        /// The leader's term.
        term: u64,
    },
    /// This replica follows `leader` in `term`.
    Follower {
        /// The current leader.
        leader: NodeId,
        /// The current term.
        term: u64,
    },
    /// Candidate, learner, a follower with no known leader, or shut down.
    Other,
}

/// What the caller observed of the group at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// This replica's role.
    pub role: Role,
    /// Meaningful on a leader only: the commit index is the last log index, and every follower
    /// that liveness reports up has matched the last log index.
    pub followers_caught_up: bool,
    /// The group's voters (this replica included if it votes).
    pub voters: Vec<NodeId>,
}

/// What the caller must do after an event. [`driver::apply`] performs the openraft part; the
/// messages to peers are the caller's (the node fabric's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "an action left undone leaves the group's ticker in the wrong state"]
pub enum Action {
    /// Nothing.
    None,
    /// This leader falls asleep: send `Sleep { term }` to every other voter, and park this
    /// replica's ticker (`apply` parks; the caller sends).
    SendSleep {
        /// The leader's term, which followers check against their own.
        term: u64,
    },
    /// This follower falls asleep: park the ticker.
    Park,
    /// This leader wakes: ticker on, one heartbeat now. If `notify_peers`, send `Wake` to every
    /// other voter.
    WakeLeader {
        /// Whether the caller must tell the other replicas.
        notify_peers: bool,
    },
    /// This follower wakes: ticker on, elections held until [`Action::ResumeElect`]. If
    /// `notify_peers`, send `Wake` to every other voter.
    WakeFollower {
        /// Whether the caller must tell the other replicas.
        notify_peers: bool,
    },
    /// A woken follower's election hold is over: elections on.
    ResumeElect,
    /// The leader was lost and this replica is the chosen survivor: ticker on, elections on,
    /// start an election now.
    WakeAndElect,
    /// The chosen survivor tries again: start an election now.
    Elect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Awake,
    /// Asleep, bound to the role it fell asleep in (`Leader` or `Follower`).
    Asleep(Role),
}

/// The chosen survivor's pending election after its leader was lost.
#[derive(Clone, Copy, Debug)]
struct Electing {
    /// The role it had under the lost leader; retries stop once the role changes.
    under: Role,
    lost: NodeId,
    last_try: Instant,
}

/// The hibernation state of one replica of one group. See the module docs for the rules.
#[derive(Clone, Debug)]
pub struct GroupSleep {
    self_id: NodeId,
    config: SleepConfig,
    state: State,
    /// The last proposal or read on this replica, or the last change of its role.
    last_activity: Instant,
    /// The role seen by the last [`GroupSleep::on_tick`].
    last_role: Role,
    /// Since when a woken follower holds its elections.
    elect_held_since: Option<Instant>,
    /// Set while this replica is the survivor chosen to elect.
    electing: Option<Electing>,
    needs_heartbeat_before_write: bool,
}

impl GroupSleep {
    /// An awake replica on node `self_id`; its idle clock starts at `now`.
    pub fn new(self_id: NodeId, config: SleepConfig, now: Instant) -> GroupSleep {
        GroupSleep {
            self_id,
            config,
            state: State::Awake,
            last_activity: now,
            last_role: Role::Other,
            elect_held_since: None,
            electing: None,
            needs_heartbeat_before_write: false,
        }
    }

    /// Whether this replica is asleep (its ticker parked).
    pub fn is_asleep(&self) -> bool {
        matches!(self.state, State::Asleep(_))
    }

    /// Whether this replica woke as a follower and still holds its elections.
    pub fn is_elect_held(&self) -> bool {
        self.elect_held_since.is_some()
    }

    /// Whether this replica is the survivor chosen to elect after its leader was lost, and
    /// still retries.
    pub fn is_electing(&self) -> bool {
        self.electing.is_some()
    }

    /// Whether a write on this replica must first run one heartbeat round
    /// ([`driver::renew_write_lease`]): set whenever the leader lease may have lapsed, that is
    /// when a leader falls asleep and when a tick first sees this replica lead (openraft
    /// counts append acks only, not the votes that elected it); cleared by
    /// [`GroupSleep::on_write_lease_renewed`].
    pub fn needs_heartbeat_before_write(&self) -> bool {
        self.needs_heartbeat_before_write
    }

    /// A heartbeat round after waking was acknowledged by a quorum.
    pub fn on_write_lease_renewed(&mut self) {
        self.needs_heartbeat_before_write = false;
    }

    /// A proposal or a read on this replica. Wakes a sleeping replica and asks the caller to
    /// tell the other replicas.
    pub fn on_activity(&mut self, now: Instant) -> Action {
        self.last_activity = now;
        match self.state {
            State::Awake => Action::None,
            State::Asleep(role) => self.wake(now, role, true),
        }
    }

    /// A periodic check (the node's hibernation loop; no openraft timer is involved).
    /// `is_up` is liveness's view of a peer.
    pub fn on_tick(&mut self, now: Instant, obs: &Observation, is_up: impl Fn(NodeId) -> bool) -> Action {
        if obs.role != self.last_role {
            self.last_role = obs.role;
            self.last_activity = now;
            if matches!(obs.role, Role::Leader { .. }) {
                // openraft's lease counts append acks only, not the votes that elected us.
                self.needs_heartbeat_before_write = true;
            }
        }
        match self.state {
            State::Asleep(slept) if slept != obs.role => self.wake(now, obs.role, false),
            State::Asleep(Role::Follower { leader, .. }) if !is_up(leader) => self.lost_leader(now, leader, obs, is_up),
            State::Asleep(_) => Action::None,
            State::Awake => self.tick_awake(now, obs, is_up),
        }
    }

    fn tick_awake(&mut self, now: Instant, obs: &Observation, is_up: impl Fn(NodeId) -> bool) -> Action {
        if let Some(e) = &mut self.electing {
            if obs.role == e.under && !is_up(e.lost) {
                if now.saturating_duration_since(e.last_try) < self.config.elect_retry_every {
                    return Action::None;
                }
                e.last_try = now;
                return Action::Elect;
            }
            self.electing = None;
        }
        if let Some(since) = self.elect_held_since {
            if let Role::Follower { leader, .. } = obs.role
                && !is_up(leader)
                && self.lost_leader(now, leader, obs, &is_up) == Action::WakeAndElect
            {
                return Action::WakeAndElect;
            }
            if now.saturating_duration_since(since) >= self.config.elect_hold_after_wake {
                self.elect_held_since = None;
                return Action::ResumeElect;
            }
            return Action::None;
        }
        match obs.role {
            Role::Leader { term }
                if obs.followers_caught_up
                    && now.saturating_duration_since(self.last_activity) >= self.config.idle_after =>
            {
                self.state = State::Asleep(obs.role);
                self.needs_heartbeat_before_write = true;
                Action::SendSleep { term }
            }
            _ => Action::None,
        }
    }

    /// `from_leader` asked this replica to sleep in `term`; `role` is this replica's role now.
    /// Obeyed only from the current leader in the current term.
    pub fn on_sleep_request(&mut self, from_leader: NodeId, term: u64, role: Role) -> Action {
        let asked = Role::Follower { leader: from_leader, term };
        if role != asked {
            return Action::None;
        }
        if self.state == State::Asleep(asked) {
            return Action::None;
        }
        self.state = State::Asleep(asked);
        self.elect_held_since = None;
        self.electing = None;
        Action::Park
    }

    /// Another replica of the group woke and asks this one to wake. Never asks to notify
    /// further.
    pub fn on_wake_request(&mut self, now: Instant) -> Action {
        match self.state {
            State::Awake => Action::None,
            State::Asleep(role) => {
                self.last_activity = now;
                self.wake(now, role, false)
            }
        }
    }

    /// Liveness reports `peer` down. Wakes this replica if `peer` leads the group and this
    /// replica sleeps (or holds its elections); see the module docs for which survivor
    /// elects. A sleeping leader losing a follower stays asleep.
    pub fn on_peer_down(
        &mut self,
        now: Instant,
        peer: NodeId,
        obs: &Observation,
        is_up: impl Fn(NodeId) -> bool,
    ) -> Action {
        let sleeps_under_peer = match self.state {
            State::Asleep(Role::Follower { leader, .. }) => leader == peer,
            State::Asleep(_) => false,
            // An awake follower of the lost leader elects too (the chosen survivor): without
            // it, a busy group waits for Raft's own election timer.
            State::Awake => matches!(obs.role, Role::Follower { leader, .. } if leader == peer),
        };
        if !sleeps_under_peer {
            return Action::None;
        }
        self.lost_leader(now, peer, obs, |v| v != peer && is_up(v))
    }

    /// Liveness reports `peer` up again. A sleeping leader with `peer` among its voters wakes
    /// (without waking the other followers), so the returning replica hears from it.
    pub fn on_peer_up(&mut self, now: Instant, peer: NodeId, obs: &Observation) -> Action {
        match self.state {
            State::Asleep(role @ Role::Leader { .. }) if obs.voters.contains(&peer) => {
                self.last_activity = now;
                self.wake(now, role, false)
            }
            _ => Action::None,
        }
    }

    fn wake(&mut self, now: Instant, role: Role, notify_peers: bool) -> Action {
        self.state = State::Awake;
        match role {
            Role::Leader { .. } => Action::WakeLeader { notify_peers },
            Role::Follower { .. } | Role::Other => {
                self.elect_held_since = Some(now);
                Action::WakeFollower { notify_peers }
            }
        }
    }

    /// The group's leader `lost` is down: the lowest-id voter other than `lost` that is up
    /// elects now; every other replica wakes with its elections held.
    fn lost_leader(&mut self, now: Instant, lost: NodeId, obs: &Observation, is_up: impl Fn(NodeId) -> bool) -> Action {
        let elector = obs.voters.iter().copied().filter(|&v| v != lost && (v == self.self_id || is_up(v))).min();
        let was_asleep = self.is_asleep();
        self.state = State::Awake;
        self.last_activity = now;
        if elector == Some(self.self_id) {
            self.elect_held_since = None;
            self.electing = Some(Electing { under: obs.role, lost, last_try: now });
            return Action::WakeAndElect;
        }
        if was_asleep {
            self.elect_held_since = Some(now);
            return Action::WakeFollower { notify_peers: false };
        }
        Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(1);
    const HOLD: Duration = Duration::from_millis(800);
    const RETRY: Duration = Duration::from_millis(100);

    fn config() -> SleepConfig {
        SleepConfig { idle_after: IDLE, elect_hold_after_wake: HOLD, elect_retry_every: RETRY }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn leader_obs(term: u64, caught_up: bool) -> Observation {
        Observation { role: Role::Leader { term }, followers_caught_up: caught_up, voters: vec![1, 2, 3] }
    }

    fn follower_obs(leader: NodeId, term: u64) -> Observation {
        Observation { role: Role::Follower { leader, term }, followers_caught_up: false, voters: vec![1, 2, 3] }
    }

    fn all_up(_: NodeId) -> bool {
        true
    }

    /// Node 1, leader in term 5, asleep at t0 + 1 s.
    fn sleeping_leader(t0: Instant) -> GroupSleep {
        let mut g = GroupSleep::new(1, config(), t0);
        assert_eq!(g.on_tick(t0, &leader_obs(5, true), all_up), Action::None);
        assert_eq!(g.on_tick(ms(t0, 1000), &leader_obs(5, true), all_up), Action::SendSleep { term: 5 });
        assert!(g.is_asleep());
        g
    }

    /// Node `id`, follower of node 1 in term 5, asleep at t0.
    fn sleeping_follower(id: NodeId, t0: Instant) -> GroupSleep {
        let mut g = GroupSleep::new(id, config(), t0);
        assert_eq!(g.on_tick(t0, &follower_obs(1, 5), all_up), Action::None);
        assert_eq!(g.on_sleep_request(1, 5, Role::Follower { leader: 1, term: 5 }), Action::Park);
        assert!(g.is_asleep());
        g
    }

    #[test]
    fn leader_sleeps_after_idle_only_when_followers_caught_up() {
        let t0 = Instant::now();
        let mut g = GroupSleep::new(1, config(), t0);
        assert!(!g.needs_heartbeat_before_write());
        assert_eq!(g.on_tick(t0, &leader_obs(5, true), all_up), Action::None);
        assert!(g.needs_heartbeat_before_write(), "a fresh leader's lease starts with append acks");
        g.on_write_lease_renewed();
        assert_eq!(g.on_tick(ms(t0, 999), &leader_obs(5, true), all_up), Action::None, "not idle yet");
        assert_eq!(g.on_tick(ms(t0, 5000), &leader_obs(5, false), all_up), Action::None, "followers lag");
        assert!(!g.is_asleep());
        assert!(!g.needs_heartbeat_before_write());
        assert_eq!(g.on_tick(ms(t0, 5001), &leader_obs(5, true), all_up), Action::SendSleep { term: 5 });
        assert!(g.is_asleep());
        assert!(g.needs_heartbeat_before_write(), "the lease lapses while asleep");
        assert_eq!(g.on_tick(ms(t0, 9000), &leader_obs(5, true), all_up), Action::None, "stays asleep, sends once");
    }

    #[test]
    fn activity_and_role_changes_restart_the_idle_clock() {
        let t0 = Instant::now();
        let mut g = GroupSleep::new(1, config(), t0);
        assert_eq!(g.on_tick(t0, &follower_obs(2, 4), all_up), Action::None);
        assert_eq!(g.on_activity(ms(t0, 600)), Action::None, "activity while awake only records");
        assert_eq!(g.on_tick(ms(t0, 1500), &follower_obs(2, 4), all_up), Action::None, "followers never self-sleep");
        // Elected at 1.5 s: the idle clock restarts there, not at the activity.
        assert_eq!(g.on_tick(ms(t0, 1500), &leader_obs(5, true), all_up), Action::None);
        assert_eq!(g.on_tick(ms(t0, 2400), &leader_obs(5, true), all_up), Action::None);
        assert_eq!(g.on_activity(ms(t0, 2400)), Action::None);
        assert_eq!(g.on_tick(ms(t0, 3399), &leader_obs(5, true), all_up), Action::None);
        assert_eq!(g.on_tick(ms(t0, 3400), &leader_obs(5, true), all_up), Action::SendSleep { term: 5 });
    }

    #[test]
    fn follower_parks_only_for_its_leader_in_its_term() {
        let t0 = Instant::now();
        let mut g = GroupSleep::new(2, config(), t0);
        let role = Role::Follower { leader: 1, term: 5 };
        assert_eq!(g.on_sleep_request(1, 4, role), Action::None, "stale term");
        assert_eq!(g.on_sleep_request(1, 6, role), Action::None, "future term");
        assert_eq!(g.on_sleep_request(3, 5, role), Action::None, "not our leader");
        assert_eq!(g.on_sleep_request(1, 5, Role::Other), Action::None, "no known leader");
        assert_eq!(g.on_sleep_request(2, 5, Role::Leader { term: 5 }), Action::None, "a leader never parks on request");
        assert!(!g.is_asleep());
        assert_eq!(g.on_sleep_request(1, 5, role), Action::Park);
        assert!(g.is_asleep());
        assert_eq!(g.on_sleep_request(1, 5, role), Action::None, "a repeated request is a no-op");
        assert!(!g.needs_heartbeat_before_write(), "a follower has no lease to renew");
    }

    #[test]
    fn activity_wakes_a_sleeping_leader_which_heartbeats_before_writing() {
        let t0 = Instant::now();
        let mut g = sleeping_leader(t0);
        assert_eq!(g.on_activity(ms(t0, 5000)), Action::WakeLeader { notify_peers: true });
        assert!(!g.is_asleep());
        assert!(g.needs_heartbeat_before_write());
        g.on_write_lease_renewed();
        assert!(!g.needs_heartbeat_before_write());
        assert_eq!(g.on_activity(ms(t0, 5100)), Action::None);
        // Idle again for idle_after after the last activity: sleeps again.
        assert_eq!(g.on_tick(ms(t0, 6099), &leader_obs(5, true), all_up), Action::None);
        assert_eq!(g.on_tick(ms(t0, 6100), &leader_obs(5, true), all_up), Action::SendSleep { term: 5 });
    }

    #[test]
    fn activity_wakes_a_sleeping_follower_which_holds_elections_then_resumes() {
        let t0 = Instant::now();
        let mut g = sleeping_follower(2, t0);
        assert_eq!(g.on_activity(ms(t0, 3000)), Action::WakeFollower { notify_peers: true });
        assert!(!g.is_asleep());
        assert!(g.is_elect_held());
        assert_eq!(g.on_tick(ms(t0, 3799), &follower_obs(1, 5), all_up), Action::None);
        assert_eq!(g.on_tick(ms(t0, 3800), &follower_obs(1, 5), all_up), Action::ResumeElect);
        assert!(!g.is_elect_held());
        assert_eq!(g.on_tick(ms(t0, 9000), &follower_obs(1, 5), all_up), Action::None);
    }

    #[test]
    fn wake_request_wakes_without_notifying_and_is_a_noop_when_awake() {
        let t0 = Instant::now();
        let mut l = sleeping_leader(t0);
        assert_eq!(l.on_wake_request(ms(t0, 2000)), Action::WakeLeader { notify_peers: false });
        assert_eq!(l.on_wake_request(ms(t0, 2001)), Action::None);
        let mut f = sleeping_follower(3, t0);
        assert_eq!(f.on_wake_request(ms(t0, 2000)), Action::WakeFollower { notify_peers: false });
        assert!(f.is_elect_held());
        assert_eq!(f.on_wake_request(ms(t0, 2001)), Action::None);
        // A sleep request ends the hold (the ticker is parked again anyway).
        assert_eq!(f.on_sleep_request(1, 5, Role::Follower { leader: 1, term: 5 }), Action::Park);
        assert!(!f.is_elect_held());
    }

    #[test]
    fn a_role_change_while_asleep_wakes() {
        let t0 = Instant::now();
        let mut f = sleeping_follower(2, t0);
        assert_eq!(f.on_tick(ms(t0, 100), &follower_obs(1, 5), all_up), Action::None);
        assert_eq!(f.on_tick(ms(t0, 200), &follower_obs(3, 6), all_up), Action::WakeFollower { notify_peers: false });
        let mut l = sleeping_leader(t0);
        assert_eq!(l.on_tick(ms(t0, 2000), &follower_obs(2, 6), all_up), Action::WakeFollower { notify_peers: false });
        assert!(!l.is_asleep());
    }

    #[test]
    fn peer_down_wakes_and_elects_only_groups_led_by_that_peer_on_one_survivor() {
        let t0 = Instant::now();
        let up_but_1 = |v: NodeId| v != 1;
        // Node 2 (lowest live survivor) elects; node 3 wakes holding its elections.
        let mut f2 = sleeping_follower(2, t0);
        let mut f3 = sleeping_follower(3, t0);
        assert_eq!(f2.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1), Action::WakeAndElect);
        assert!(!f2.is_asleep() && !f2.is_elect_held());
        assert_eq!(
            f3.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1),
            Action::WakeFollower { notify_peers: false }
        );
        assert!(f3.is_elect_held());
        // Node 3 elects once its hold runs out (Raft's timers; the leader is still down).
        assert_eq!(f3.on_tick(ms(t0, 850), &follower_obs(1, 5), up_but_1), Action::None, "still held");
        // ... unless it learns the elector is gone too: then node 3 is the chosen survivor.
        let up_3_only = |v: NodeId| v == 3;
        assert_eq!(f3.on_peer_down(ms(t0, 950), 1, &follower_obs(1, 5), up_3_only), Action::WakeAndElect);

        // A peer that is not our leader: nothing.
        let mut f = sleeping_follower(2, t0);
        assert_eq!(f.on_peer_down(ms(t0, 100), 3, &follower_obs(1, 5), |v| v != 3), Action::None);
        assert!(f.is_asleep());
        // A sleeping leader losing a follower stays asleep.
        let mut l = sleeping_leader(t0);
        assert_eq!(l.on_peer_down(ms(t0, 2000), 2, &leader_obs(5, true), |v| v != 2), Action::None);
        assert!(l.is_asleep());
        // An awake follower of the lost leader: the chosen survivor elects at once (a busy
        // group does not wait for Raft's election timer), the other leaves it to Raft.
        let mut a = GroupSleep::new(2, config(), t0);
        assert_eq!(a.on_tick(t0, &follower_obs(1, 5), all_up), Action::None);
        assert_eq!(a.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1), Action::WakeAndElect);
        let mut b = GroupSleep::new(3, config(), t0);
        assert_eq!(b.on_tick(t0, &follower_obs(1, 5), all_up), Action::None);
        assert_eq!(b.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1), Action::None);
        assert!(!b.is_elect_held());
    }

    #[test]
    fn the_chosen_survivor_skips_voters_reported_down() {
        let t0 = Instant::now();
        let obs = Observation {
            role: Role::Follower { leader: 1, term: 5 },
            followers_caught_up: false,
            voters: vec![1, 2, 3, 4, 5],
        };
        let mut f4 = GroupSleep::new(4, config(), t0);
        assert_eq!(f4.on_sleep_request(1, 5, obs.role), Action::Park);
        // 1 (the leader), 2 and 3 down: 4 is the lowest live voter.
        assert_eq!(f4.on_peer_down(ms(t0, 10), 1, &obs, |v| v >= 4), Action::WakeAndElect);
        let mut f5 = GroupSleep::new(5, config(), t0);
        assert_eq!(f5.on_sleep_request(1, 5, obs.role), Action::Park);
        assert_eq!(f5.on_peer_down(ms(t0, 10), 1, &obs, |v| v >= 4), Action::WakeFollower { notify_peers: false });
    }

    #[test]
    fn a_group_whose_leader_is_reported_down_never_stays_asleep() {
        let t0 = Instant::now();
        // The sleep request arrived after the peer-down report: the next tick catches it.
        let mut f2 = sleeping_follower(2, t0);
        assert_eq!(f2.on_tick(ms(t0, 50), &follower_obs(1, 5), |v| v != 1), Action::WakeAndElect);
        let mut f3 = sleeping_follower(3, t0);
        assert_eq!(
            f3.on_tick(ms(t0, 50), &follower_obs(1, 5), |v| v != 1),
            Action::WakeFollower { notify_peers: false }
        );
        // A follower holding its elections after a wake: the leader's loss ends the hold on
        // the chosen survivor.
        let mut h = sleeping_follower(2, t0);
        assert_eq!(h.on_wake_request(ms(t0, 100)), Action::WakeFollower { notify_peers: false });
        assert_eq!(h.on_peer_down(ms(t0, 200), 1, &follower_obs(1, 5), |v| v != 1), Action::WakeAndElect);
        assert!(!h.is_elect_held());
        let mut h3 = sleeping_follower(3, t0);
        assert_eq!(h3.on_wake_request(ms(t0, 100)), Action::WakeFollower { notify_peers: false });
        assert_eq!(h3.on_tick(ms(t0, 200), &follower_obs(1, 5), |v| v != 1), Action::None, "held, not chosen");
        assert_eq!(h3.on_tick(ms(t0, 900), &follower_obs(1, 5), |v| v != 1), Action::ResumeElect, "hold ends");
    }

    #[test]
    fn peer_up_wakes_a_sleeping_leader_of_that_peer_only() {
        let t0 = Instant::now();
        let mut l = sleeping_leader(t0);
        assert_eq!(l.on_peer_up(ms(t0, 2000), 7, &leader_obs(5, true)), Action::None, "not a member");
        assert!(l.is_asleep());
        assert_eq!(l.on_peer_up(ms(t0, 2000), 3, &leader_obs(5, true)), Action::WakeLeader { notify_peers: false });
        assert!(l.needs_heartbeat_before_write());
        assert_eq!(l.on_tick(ms(t0, 2999), &leader_obs(5, true), all_up), Action::None);
        assert_eq!(l.on_tick(ms(t0, 3000), &leader_obs(5, true), all_up), Action::SendSleep { term: 5 });
        let mut f = sleeping_follower(2, t0);
        assert_eq!(f.on_peer_up(ms(t0, 2000), 3, &follower_obs(1, 5)), Action::None);
        assert!(f.is_asleep());
    }

    #[test]
    fn the_chosen_survivor_retries_until_its_role_changes_or_the_leader_is_back() {
        let t0 = Instant::now();
        let up_but_1 = |v: NodeId| v != 1;
        let mut f = sleeping_follower(2, t0);
        assert_eq!(f.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1), Action::WakeAndElect);
        assert!(f.is_electing());
        // The attempt was refused (a lease still ran): same role, so it tries again.
        assert_eq!(f.on_tick(ms(t0, 199), &follower_obs(1, 5), up_but_1), Action::None);
        assert_eq!(f.on_tick(ms(t0, 200), &follower_obs(1, 5), up_but_1), Action::Elect);
        assert_eq!(f.on_tick(ms(t0, 250), &follower_obs(1, 5), up_but_1), Action::None);
        assert_eq!(f.on_tick(ms(t0, 300), &follower_obs(1, 5), up_but_1), Action::Elect);
        // Elected (or a candidate, or following someone else): no more retries, and a new
        // leader starts its idle clock.
        let obs = leader_obs(6, true);
        assert_eq!(f.on_tick(ms(t0, 350), &obs, up_but_1), Action::None);
        assert!(!f.is_electing());
        assert_eq!(f.on_tick(ms(t0, 1349), &obs, up_but_1), Action::None);
        assert_eq!(f.on_tick(ms(t0, 1350), &obs, up_but_1), Action::SendSleep { term: 6 });

        // The lost leader is reported up again: retries stop, Raft's timers are on.
        let mut g = sleeping_follower(2, t0);
        assert_eq!(g.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1), Action::WakeAndElect);
        assert_eq!(g.on_tick(ms(t0, 300), &follower_obs(1, 5), all_up), Action::None);
        assert!(!g.is_electing());
        assert_eq!(g.on_tick(ms(t0, 500), &follower_obs(1, 5), up_but_1), Action::None, "no retry once stopped");
        // A sleep request from a leader ends them too.
        let mut h = sleeping_follower(2, t0);
        assert_eq!(h.on_peer_down(ms(t0, 100), 1, &follower_obs(1, 5), up_but_1), Action::WakeAndElect);
        assert_eq!(h.on_sleep_request(3, 6, Role::Follower { leader: 3, term: 6 }), Action::Park);
        assert!(!h.is_electing());
    }
}
