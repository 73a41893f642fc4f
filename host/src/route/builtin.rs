//! Built-in routing: what `default` (and a failed policy, by default) means.
//! Read-only statements outside a transaction go to a healthy replica by least
//! outstanding requests per weight; everything else, and reads when no replica
//! is healthy, go to the primary.

use super::{ClusterView, NodeId, Role};

/// The healthy replica with the fewest in-flight statements per unit of weight.
/// Ties rotate by `tiebreak` (a random number) so equal nodes share the load.
pub fn choose_replica(cluster: &ClusterView, tiebreak: u64) -> Option<NodeId> {
    choose_replica_where(cluster, tiebreak, |_| true)
}

/// [`choose_replica`] among the replicas `keep` accepts.
///
/// One pass, reading each node's live counter once (it changes under our
/// feet): among equally loaded nodes, the k-th replaces the pick with
/// probability 1/k, drawn from `tiebreak`, so each is chosen equally often.
pub fn choose_replica_where(
    cluster: &ClusterView,
    tiebreak: u64,
    keep: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    let mut best: Option<(NodeId, u64, u64)> = None;
    let mut ties = 0u64;
    for (i, s) in cluster.states.iter().enumerate() {
        let id = i as NodeId;
        let weight = cluster.nodes.get(i).map_or(0, |n| u64::from(n.weight));
        if s.role != Role::Replica || !s.healthy || weight == 0 || !keep(id) {
            continue;
        }
        let load = u64::from(cluster.in_flight(id));
        // Minimal load/weight, compared without floats.
        let order = best.map(|(_, f, w)| (load * w).cmp(&(f * weight)));
        match order {
            None | Some(std::cmp::Ordering::Less) => {
                best = Some((id, load, weight));
                ties = 1;
            }
            Some(std::cmp::Ordering::Equal) => {
                ties += 1;
                if mix(tiebreak, ties).is_multiple_of(ties) {
                    best = Some((id, load, weight));
                }
            }
            Some(std::cmp::Ordering::Greater) => {}
        }
    }
    best.map(|(id, _, _)| id)
}

/// A well-spread number from a seed and a counter (splitmix64).
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{NodeInfo, NodeState};
    use std::sync::Arc;

    fn view(states: Vec<(Role, bool, u32, u32)>) -> ClusterView {
        ClusterView {
            live: None,
            generation: crate::route::next_generation(),
            nodes: Arc::new(
                states
                    .iter()
                    .enumerate()
                    .map(|(i, s)| NodeInfo {
                        name: format!("n{i}"),
                        weight: s.3,
                        tags: vec![],
                    })
                    .collect(),
            ),
            states: states
                .iter()
                .map(|&(role, healthy, in_flight, _)| NodeState {
                    healthy,
                    in_flight,
                    ..NodeState::up(role)
                })
                .collect(),
        }
    }

    #[test]
    fn least_outstanding_per_weight() {
        let v = view(vec![
            (Role::Primary, true, 0, 1),
            (Role::Replica, true, 4, 1),
            (Role::Replica, true, 6, 2),
            (Role::Replica, false, 0, 1),
        ]);
        assert_eq!(choose_replica(&v, 0), Some(2));
    }

    #[test]
    fn ties_rotate_and_zero_weight_is_excluded() {
        let v = view(vec![
            (Role::Primary, true, 0, 1),
            (Role::Replica, true, 1, 1),
            (Role::Replica, true, 1, 1),
            (Role::Replica, true, 0, 0),
        ]);
        let mut picked = [0u32; 4];
        for tiebreak in 0..1000u64 {
            let n = choose_replica(&v, tiebreak.wrapping_mul(0x2545_F491_4F6C_DD1D)).unwrap();
            picked[n as usize] += 1;
        }
        assert_eq!(picked[0] + picked[3], 0, "{picked:?}");
        assert!(
            (400..600).contains(&picked[1]),
            "ties share the load: {picked:?}"
        );
    }

    /// Counters read while they change (the live pool counts) never leave
    /// the choice empty.
    #[test]
    fn a_counter_changing_between_reads_still_yields_a_replica() {
        #[derive(Debug, Default)]
        struct Flapping(std::sync::atomic::AtomicU32);
        impl crate::route::LiveCounts for Flapping {
            fn in_flight(&self, node: NodeId) -> u32 {
                let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if node == 1 {
                    n % 3
                } else {
                    (n + 1) % 3
                }
            }
            fn add_idle(&self, _: &mut [u32]) {}
            fn latency_us(&self, _: NodeId) -> u32 {
                0
            }
        }
        let mut v = view(vec![
            (Role::Primary, true, 0, 1),
            (Role::Replica, true, 0, 1),
            (Role::Replica, true, 0, 1),
        ]);
        v.live = Some(Arc::new(Flapping::default()));
        for t in 0..1000 {
            assert!(choose_replica(&v, t).is_some());
        }
    }

    #[test]
    fn no_healthy_replica() {
        let v = view(vec![
            (Role::Primary, true, 0, 1),
            (Role::Replica, false, 0, 1),
        ]);
        assert_eq!(choose_replica(&v, 0), None);
    }
}
