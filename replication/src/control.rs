//! Node-to-node messages that are not Raft's: the node-level liveness heartbeat (one per peer
//! pair, standing in for thousands of per-group heartbeats while groups sleep; "leaving" when
//! the sender is stopping) and the
//! hibernation requests of one group (sleep, wake); and [`ControlSender`], what a transport
//! implements to carry them (the loopback here, the server's fabric between processes).
//!
//! Delivery is best effort: a lost `Sleep` leaves a follower ticking (it re-elects, safely), a
//! lost `Wake` is repeated by the next activity, a lost `Alive` counts toward the timeout.
//! None of them touches what Raft decides.

use serde::{Deserialize, Serialize};

/// A control message from one node to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// The sender is alive (sent every liveness interval to every peer).
    Alive,
    /// The sender leads `partition` in `term` and puts the group to sleep.
    Sleep {
        /// The partition group.
        partition: u16,
        /// The leader's term.
        term: u64,
    },
    /// The sender saw activity in `partition`'s group: wake up.
    Wake {
        /// The partition group.
        partition: u16,
    },
    /// The sender is alive and stopping (a planned stop): hand it no leadership. Sent
    /// instead of [`ControlMessage::Alive`] while it hands its own leaderships over.
    Leaving,
}

/// Carries control messages to peers, fire and forget (never blocks, never fails loudly).
pub trait ControlSender: Send + Sync + 'static {
    /// Sends `message` from node `from` to node `to`.
    fn send(&self, from: u64, to: u64, message: ControlMessage);
}

/// A sender that drops everything (a single node, or hibernation off).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoControl;

impl ControlSender for NoControl {
    fn send(&self, _from: u64, _to: u64, _message: ControlMessage) {}
}
