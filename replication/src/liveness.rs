//! Node-level liveness: [`Liveness`] keeps one up/down signal per peer node, fed by one
//! heartbeat per peer pair (whatever the number of Raft groups the two nodes share), and
//! reports transitions as [`LivenessEvent`]s. It is what wakes sleeping groups
//! (`crate::hibernate`) when a peer is lost or comes back.
//!
//! Architecture invariant: pure, like `crate::hibernate`: no clock, no I/O. The node fabric
//! sends and receives the heartbeats and calls [`Liveness::heartbeat_from`] and
//! [`Liveness::tick`] with the time.
//!
//! **Rules.** A peer is up while the last heartbeat from it is younger than the timeout, and
//! down from then on. A new [`Liveness`] counts every peer as heard at its creation, so a peer
//! never heard from is reported down one timeout later. [`Liveness::is_up`] and the events
//! change only in [`Liveness::tick`]: a heartbeat from a down peer brings it up at the next
//! tick. Liveness decides nothing about Raft: it only wakes groups and picks who elects first.
//!
//! A peer that announces a planned stop ([`Liveness::leaving_from`], its heartbeats while it
//! hands its leaderships over) is *leaving*: still up, but no leadership is handed to it. It
//! stops leaving with its next plain heartbeat (a restarted process sends those).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::hibernate::NodeId;

/// Default interval between two liveness heartbeats to a peer (sent by the fabric).
pub const PEER_HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// Default time without a heartbeat after which a peer is reported down: three missed
/// heartbeats.
pub const PEER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);

const _: () = assert!(PEER_TIMEOUT_DEFAULT.as_millis() > 2 * PEER_HEARTBEAT_INTERVAL_DEFAULT.as_millis());

/// A change of a peer's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessEvent {
    /// No heartbeat from this peer for the timeout.
    PeerDown(NodeId),
    /// A heartbeat from this peer arrived after it was reported down.
    PeerUp(NodeId),
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    last_heard: Instant,
    up: bool,
    leaving: bool,
}

/// The liveness of every peer of node `self_id`. See the module docs for the rules.
#[derive(Clone, Debug)]
pub struct Liveness {
    self_id: NodeId,
    timeout: Duration,
    peers: BTreeMap<NodeId, Peer>,
}

impl Liveness {
    /// Liveness of `peers` (`self_id` among them is ignored), all counted as heard at `now`.
    pub fn new(self_id: NodeId, peers: impl IntoIterator<Item = NodeId>, timeout: Duration, now: Instant) -> Liveness {
        let mut l = Liveness { self_id, timeout, peers: BTreeMap::new() };
        for p in peers {
            l.add_peer(p, now);
        }
        l
    }

    /// The timeout after which a silent peer is reported down.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts watching `peer`, counted as heard at `now` (no-op for a known peer or self).
    pub fn add_peer(&mut self, peer: NodeId, now: Instant) {
        if peer != self.self_id {
            self.peers.entry(peer).or_insert(Peer { last_heard: now, up: true, leaving: false });
        }
    }

    /// Stops watching `peer` (no event).
    pub fn remove_peer(&mut self, peer: NodeId) {
        self.peers.remove(&peer);
    }

    /// A liveness heartbeat from `peer` arrived at `now`. Returns false (and records nothing)
    /// for a node this liveness does not watch.
    pub fn heartbeat_from(&mut self, peer: NodeId, now: Instant) -> bool {
        self.heard(peer, now, false)
    }

    /// A heartbeat from `peer` saying it is stopping (a planned stop) arrived at `now`: it
    /// counts as a heartbeat, and the peer is leaving until a plain one arrives.
    pub fn leaving_from(&mut self, peer: NodeId, now: Instant) -> bool {
        self.heard(peer, now, true)
    }

    fn heard(&mut self, peer: NodeId, now: Instant, leaving: bool) -> bool {
        match self.peers.get_mut(&peer) {
            Some(p) => {
                p.last_heard = p.last_heard.max(now);
                p.leaving = leaving;
                true
            }
            None => false,
        }
    }

    /// The transport saw `peer` go away (its connection closed): the next [`Liveness::tick`]
    /// reports it down without waiting for the timeout; a later heartbeat brings it back.
    pub fn mark_down(&mut self, peer: NodeId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            let long_ago = now.checked_sub(self.timeout + Duration::from_millis(1)).unwrap_or(p.last_heard);
            p.last_heard = p.last_heard.min(long_ago);
        }
    }

    /// Re-evaluates every peer at `now`; returns the transitions, in peer id order.
    pub fn tick(&mut self, now: Instant) -> Vec<LivenessEvent> {
        let mut events = Vec::new();
        for (&id, p) in &mut self.peers {
            let up = now.saturating_duration_since(p.last_heard) < self.timeout;
            if up != p.up {
                p.up = up;
                events.push(if up { LivenessEvent::PeerUp(id) } else { LivenessEvent::PeerDown(id) });
            }
        }
        events
    }

    /// Whether `peer` is up as of the last [`Liveness::tick`]. This node is always up; a node
    /// this liveness does not watch is not.
    pub fn is_up(&self, peer: NodeId) -> bool {
        peer == self.self_id || self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// Whether `peer` is up and not leaving: a node leadership may be handed to.
    pub fn is_up_to_stay(&self, peer: NodeId) -> bool {
        peer == self.self_id || self.peers.get(&peer).is_some_and(|p| p.up && !p.leaving)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(500);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_silent_peer_goes_down_after_the_timeout_and_a_heartbeat_brings_it_back() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1, [1, 2, 3], TIMEOUT, t0);
        assert!(l.is_up(1) && l.is_up(2) && l.is_up(3), "everyone starts up");
        assert!(l.heartbeat_from(2, ms(t0, 300)));
        assert_eq!(l.tick(ms(t0, 499)), vec![]);
        assert_eq!(l.tick(ms(t0, 500)), vec![LivenessEvent::PeerDown(3)], "3 was never heard from");
        assert!(!l.is_up(3));
        assert!(l.is_up(2));
        assert_eq!(l.tick(ms(t0, 700)), vec![], "events only on transitions");
        assert_eq!(l.tick(ms(t0, 800)), vec![LivenessEvent::PeerDown(2)]);
        // Recovery: reported at the next tick, once.
        assert!(l.heartbeat_from(3, ms(t0, 900)));
        assert!(!l.is_up(3), "is_up changes only at a tick");
        assert_eq!(l.tick(ms(t0, 901)), vec![LivenessEvent::PeerUp(3)]);
        assert!(l.is_up(3));
        assert_eq!(l.tick(ms(t0, 950)), vec![]);
        // Both go down together: one event each, in id order.
        assert!(l.heartbeat_from(2, ms(t0, 1000)));
        assert_eq!(l.tick(ms(t0, 1000)), vec![LivenessEvent::PeerUp(2)]);
        assert_eq!(l.tick(ms(t0, 2000)), vec![LivenessEvent::PeerDown(2), LivenessEvent::PeerDown(3)]);
    }

    #[test]
    fn regular_heartbeats_keep_a_peer_up_and_late_stamps_do_not_move_time_back() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1, [2], TIMEOUT, t0);
        for i in 1..=20 {
            assert!(l.heartbeat_from(2, ms(t0, i * 200)));
            assert_eq!(l.tick(ms(t0, i * 200 + 100)), vec![]);
        }
        assert!(l.heartbeat_from(2, ms(t0, 100)), "an old stamp is accepted but ignored");
        assert_eq!(l.tick(ms(t0, 4400)), vec![]);
        assert_eq!(l.tick(ms(t0, 4500)), vec![LivenessEvent::PeerDown(2)]);
    }

    #[test]
    fn unknown_peers_and_self() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1, [2], TIMEOUT, t0);
        assert!(!l.heartbeat_from(9, t0), "not watched");
        assert!(!l.is_up(9));
        assert!(!l.heartbeat_from(1, t0), "self is not a peer");
        assert_eq!(l.tick(ms(t0, 10_000)), vec![LivenessEvent::PeerDown(2)], "self never goes down");
        assert!(l.is_up(1));
        l.add_peer(9, ms(t0, 10_000));
        assert!(l.is_up(9));
        l.add_peer(9, ms(t0, 20_000));
        assert_eq!(l.tick(ms(t0, 10_500)), vec![LivenessEvent::PeerDown(9)], "adding twice keeps the first");
        l.remove_peer(2);
        assert!(!l.is_up(2));
        assert_eq!(l.tick(ms(t0, 30_000)), vec![]);
        assert_eq!(l.timeout(), TIMEOUT);
    }

    #[test]
    fn a_leaving_peer_is_up_but_gets_no_leadership_until_a_plain_heartbeat() {
        let t0 = Instant::now();
        let mut l = Liveness::new(1, [1, 2, 3], TIMEOUT, t0);
        assert!(l.is_up_to_stay(2));
        assert!(l.leaving_from(2, ms(t0, 100)));
        assert!(l.tick(ms(t0, 400)).is_empty());
        assert!(l.is_up(2) && !l.is_up_to_stay(2) && l.is_up_to_stay(3));
        // Leaving heartbeats keep it up past the timeout.
        assert!(l.leaving_from(2, ms(t0, 500)));
        l.heartbeat_from(3, ms(t0, 500));
        assert!(l.tick(ms(t0, 700)).is_empty());
        assert!(l.is_up(2) && !l.is_up_to_stay(2));
        // The restarted process sends plain heartbeats.
        l.heartbeat_from(2, ms(t0, 800));
        assert!(l.is_up_to_stay(2));
        assert!(!l.leaving_from(9, ms(t0, 800)), "an unknown node is not recorded");
    }
}
