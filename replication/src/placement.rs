//! Where each partition's replicas live: the voters of a partition group, first the preferred
//! leader. Deterministic from (node ids, replication factor), so every node computes the same
//! placement without talking.
//!
//! - **Leaders spread exactly**: the preferred leader of partition `p` is the `p mod n`-th node
//!   (ids sorted), so each node leads `4096 / n` partitions, give or take one.
//! - **The other replicas spread evenly and independently**: rendezvous hashing over the
//!   remaining nodes (highest xxh3 of (partition, node) first), so each node holds about
//!   `rf / n` of the partitions, and when a node fails its partitions' next replicas are
//!   spread over all the others rather than all falling on its neighbour.

use std::io;

use peregrine_engine::PartitionId;

/// Replication factor when none is configured.
pub const REPLICATION_FACTOR_DEFAULT: usize = 3;

/// The placement of every partition group over a fixed set of nodes.
#[derive(Clone, Debug)]
pub struct Placement {
    nodes: Vec<u64>,
    replication_factor: usize,
}

impl Placement {
    /// A placement over `nodes` (distinct ids, any order) with `replication_factor` replicas
    /// per partition. Refuses duplicate ids, no nodes, a factor of 0 or one above the node count.
    pub fn new(nodes: &[u64], replication_factor: usize) -> io::Result<Placement> {
        let mut sorted = nodes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if sorted.len() != nodes.len() {
            return Err(invalid(format!("duplicate node ids in {nodes:?}")));
        }
        if sorted.is_empty() {
            return Err(invalid("a placement needs at least one node".to_owned()));
        }
        if replication_factor == 0 || replication_factor > sorted.len() {
            return Err(invalid(format!(
                "replication factor {replication_factor} is not within 1..={} (the node count)",
                sorted.len()
            )));
        }
        Ok(Placement { nodes: sorted, replication_factor })
    }

    /// The node ids, sorted.
    pub fn nodes(&self) -> &[u64] {
        &self.nodes
    }

    /// Replicas per partition.
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// The voters of partition `pid`: the preferred leader first, then the other replicas in
    /// their order of succession.
    pub fn replicas(&self, pid: PartitionId) -> Vec<u64> {
        let n = self.nodes.len();
        let leader = self.nodes[usize::from(pid.get()) % n];
        let mut others: Vec<(u64, u64)> =
            self.nodes.iter().filter(|&&id| id != leader).map(|&id| (rank(pid, id), id)).collect();
        others.sort_unstable_by(|a, b| b.cmp(a));
        let mut replicas = Vec::with_capacity(self.replication_factor);
        replicas.push(leader);
        replicas.extend(others.into_iter().take(self.replication_factor - 1).map(|(_, id)| id));
        replicas
    }

    /// The preferred leader of partition `pid`.
    pub fn preferred_leader(&self, pid: PartitionId) -> u64 {
        self.nodes[usize::from(pid.get()) % self.nodes.len()]
    }

    /// Whether node `id` holds a replica of partition `pid`.
    pub fn holds(&self, id: u64, pid: PartitionId) -> bool {
        self.replicas(pid).contains(&id)
    }
}

/// Rendezvous weight of node `id` for partition `pid`.
fn rank(pid: PartitionId, id: u64) -> u64 {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(&pid.get().to_le_bytes());
    key[2..].copy_from_slice(&id.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use super::*;

    fn counts(p: &Placement) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
        let mut leaders = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for pid in PartitionId::all() {
            let r = p.replicas(pid);
            assert_eq!(r.len(), p.replication_factor());
            let mut distinct = r.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), r.len(), "partition {}: a node twice in {r:?}", pid.get());
            assert_eq!(r[0], p.preferred_leader(pid));
            *leaders.entry(r[0]).or_insert(0) += 1;
            for id in r {
                *replicas.entry(id).or_insert(0) += 1;
            }
        }
        (leaders, replicas)
    }

    #[test]
    fn three_nodes_at_rf3_hold_everything_and_lead_a_third_each() {
        let p = Placement::new(&[30, 10, 20], 3).unwrap();
        let (leaders, replicas) = counts(&p);
        for id in [10, 20, 30] {
            assert!((1365..=1366).contains(&leaders[&id]), "{leaders:?}");
            assert_eq!(replicas[&id], 4096);
        }
    }

    #[test]
    fn leaders_spread_exactly_and_replicas_evenly_on_larger_clusters() {
        for (n, rf) in [(5usize, 3usize), (7, 2), (4, 3), (9, 3)] {
            let nodes: Vec<u64> = (1..=n as u64).map(|i| i * 7 + 1).collect();
            let p = Placement::new(&nodes, rf).unwrap();
            let (leaders, replicas) = counts(&p);
            let lo = 4096 / n;
            for id in &nodes {
                assert!(leaders[id] == lo || leaders[id] == lo + 1, "n={n}: {leaders:?}");
                let mean = 4096.0 * rf as f64 / n as f64;
                let dev = (replicas[id] as f64 - mean).abs() / mean;
                assert!(dev < 0.08, "n={n} rf={rf}: node {id} holds {} replicas, mean {mean}", replicas[id]);
            }
        }
    }

    #[test]
    fn a_failed_nodes_partitions_fall_to_many_successors() {
        let nodes: Vec<u64> = (1..=6).collect();
        let p = Placement::new(&nodes, 3).unwrap();
        let mut successors = BTreeMap::new();
        for pid in PartitionId::all().filter(|&pid| p.preferred_leader(pid) == 1) {
            *successors.entry(p.replicas(pid)[1]).or_insert(0usize) += 1;
        }
        assert_eq!(successors.len(), 5, "{successors:?}");
        assert!(successors.values().all(|&c| c > 683 / 5 / 2), "{successors:?}");
    }

    #[test]
    fn placement_is_deterministic_and_bad_input_is_refused() {
        let a = Placement::new(&[3, 1, 2], 2).unwrap();
        let b = Placement::new(&[1, 2, 3], 2).unwrap();
        for pid in PartitionId::all() {
            assert_eq!(a.replicas(pid), b.replicas(pid));
        }
        assert!(Placement::new(&[1, 1, 2], 2).is_err());
        assert!(Placement::new(&[], 1).is_err());
        assert!(Placement::new(&[1, 2], 3).is_err());
        assert!(Placement::new(&[1, 2], 0).is_err());
        assert!(a.holds(a.preferred_leader(PartitionId::new(9).unwrap()), PartitionId::new(9).unwrap()));
    }
}
