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
pub fn choose_replica_where(
    cluster: &ClusterView,
    tiebreak: u64,
    keep: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    let candidates = || {
        cluster
            .states
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.role == Role::Replica
                    && s.healthy
                    && keep(*i as NodeId)
                    && cluster.nodes.get(*i).is_some_and(|n| n.weight > 0)
            })
            .map(|(i, s)| {
                (
                    i as NodeId,
                    u64::from(s.in_flight),
                    u64::from(cluster.nodes[i].weight),
                )
            })
    };
    // Minimal in_flight/weight, compared without floats.
    let (best_f, best_w) = candidates()
        .map(|(_, f, w)| (f, w))
        .min_by(|(f1, w1), (f2, w2)| (f1 * w2).cmp(&(f2 * w1)))?;
    let tied: Vec<NodeId> = candidates()
        .filter(|(_, f, w)| f * best_w == best_f * w)
        .map(|(id, _, _)| id)
        .collect();
    tied.get((tiebreak % tied.len() as u64) as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{NodeInfo, NodeState};
    use std::sync::Arc;

    fn view(states: Vec<(Role, bool, u32, u32)>) -> ClusterView {
        ClusterView {
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
        assert_eq!(choose_replica(&v, 0), Some(1));
        assert_eq!(choose_replica(&v, 1), Some(2));
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
