//! The host's guarantees, applied after every policy decision. A policy states
//! preferences; this function makes them safe:
//!
//! - a statement that is not read-only, or that runs inside a read-write
//!   transaction, never reaches a replica (`write_to_replica`);
//! - inside a transaction every statement goes to the node the transaction
//!   started on (`pinned_transaction`);
//! - a replica target that is unknown or unhealthy is replaced by the built-in
//!   choice (`unknown_replica`, `unhealthy_replica`).
//!
//! It is a pure function of its inputs, so it is tested exhaustively below.

use serde::Serialize;

use super::{builtin, ClusterView, NodeId, Role, Session, Statement, Target, TxState};

/// Where the statement goes after the guardrails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    Node(NodeId),
    /// The policy refused the statement; the client gets this message.
    Reject(String),
    /// Nowhere to run it (e.g. a write while no node reports itself primary).
    Unavailable(String),
}

/// Why the guardrails changed the policy's decision (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Override {
    WriteToReplica,
    PinnedTransaction,
    UnknownReplica,
    UnhealthyReplica,
}

impl Override {
    pub const ALL: [Override; 4] = [
        Override::WriteToReplica,
        Override::PinnedTransaction,
        Override::UnknownReplica,
        Override::UnhealthyReplica,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Override::WriteToReplica => "write_to_replica",
            Override::PinnedTransaction => "pinned_transaction",
            Override::UnknownReplica => "unknown_replica",
            Override::UnhealthyReplica => "unhealthy_replica",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enforced {
    pub routed: Routed,
    pub overridden: Option<Override>,
}

impl Enforced {
    fn keep(routed: Routed) -> Self {
        Self {
            routed,
            overridden: None,
        }
    }

    fn overridden(routed: Routed, why: Override) -> Self {
        Self {
            routed,
            overridden: Some(why),
        }
    }
}

/// Turn a policy target into the node that will run the statement.
/// `tiebreak` is a random number for the built-in replica choice.
pub fn enforce(
    target: &Target,
    statement: &Statement,
    session: &Session,
    cluster: &ClusterView,
    tiebreak: u64,
) -> Enforced {
    if session.tx_state != TxState::Idle {
        if let Some(pin) = session.pinned {
            let agrees = match target {
                Target::Replica(id) => *id == pin,
                Target::Primary => cluster.primary() == Some(pin),
                Target::Default => true,
                Target::AnyReplica | Target::CaughtUpReplica(_) => {
                    cluster.state(pin).is_some_and(|s| s.role == Role::Replica)
                }
                Target::Reject(_) => false,
            };
            let routed = Routed::Node(pin);
            return if agrees {
                Enforced::keep(routed)
            } else {
                Enforced::overridden(routed, Override::PinnedTransaction)
            };
        }
    }
    if let Target::Reject(message) = target {
        return Enforced::keep(Routed::Reject(message.clone()));
    }

    let in_write_tx = session.tx_state != TxState::Idle && !session.read_only_tx;
    if !statement.read_only || in_write_tx {
        let routed = primary(cluster);
        return match target {
            Target::Replica(id) if cluster.state(*id).is_some_and(|s| s.role != Role::Primary) => {
                Enforced::overridden(routed, Override::WriteToReplica)
            }
            Target::AnyReplica | Target::CaughtUpReplica(_) => {
                Enforced::overridden(routed, Override::WriteToReplica)
            }
            _ => Enforced::keep(routed),
        };
    }

    match target {
        Target::Primary => Enforced::keep(primary(cluster)),
        Target::AnyReplica => Enforced::keep(replica_or_primary(cluster, tiebreak)),
        // The built-in choice (a policy's `builtin()`, no policy, or the
        // fallback of a failed call) keeps read-your-writes: a session's
        // read goes only to a replica that has its last write. The wait,
        // when a policy asks for one, is the session's (it is async).
        Target::Default | Target::CaughtUpReplica(_) => {
            Enforced::keep(builtin_read(cluster, session, tiebreak))
        }
        Target::Replica(id) => match cluster.state(*id) {
            None => Enforced::overridden(
                builtin_read(cluster, session, tiebreak),
                Override::UnknownReplica,
            ),
            Some(s) if s.role == Role::Primary && s.healthy => Enforced::keep(Routed::Node(*id)),
            Some(s) if s.healthy && s.role == Role::Replica => Enforced::keep(Routed::Node(*id)),
            Some(_) => Enforced::overridden(
                builtin_read(cluster, session, tiebreak),
                Override::UnhealthyReplica,
            ),
        },
        Target::Reject(_) => unreachable!("handled above"),
    }
}

fn primary(cluster: &ClusterView) -> Routed {
    match cluster.primary() {
        Some(id) => Routed::Node(id),
        None => Routed::Unavailable(format!(
            "no healthy primary is available (nodes: {})",
            cluster
                .nodes
                .iter()
                .zip(&cluster.states)
                .map(|(n, s)| format!(
                    "{} {}",
                    n.name,
                    if !s.healthy {
                        "down"
                    } else if s.role == Role::Replica {
                        "in recovery"
                    } else {
                        "unknown"
                    }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The built-in choice for a read: a healthy replica that has replayed the
/// session's last write (any, without one), else the primary.
fn builtin_read(cluster: &ClusterView, session: &Session, tiebreak: u64) -> Routed {
    let caught_up = |id| cluster.replayed(id, session);
    match builtin::choose_replica_where(cluster, tiebreak, caught_up) {
        Some(id) => Routed::Node(id),
        None => primary(cluster),
    }
}

fn replica_or_primary(cluster: &ClusterView, tiebreak: u64) -> Routed {
    match builtin::choose_replica(cluster, tiebreak) {
        Some(id) => Routed::Node(id),
        None => primary(cluster),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{NodeInfo, NodeState, StatementKind};
    use std::sync::Arc;

    /// primary(0), replica(1) healthy, replica(2) unhealthy, replica(3) healthy
    fn cluster() -> ClusterView {
        let mut states = vec![
            NodeState::up(Role::Primary),
            NodeState::up(Role::Replica),
            NodeState::up(Role::Replica),
            NodeState::up(Role::Replica),
        ];
        states[2].healthy = false;
        states[3].in_flight = 5;
        ClusterView {
            live: None,
            generation: crate::route::next_generation(),
            nodes: Arc::new(
                (0..4)
                    .map(|i| NodeInfo {
                        name: format!("n{i}"),
                        weight: 1,
                        tags: vec![],
                    })
                    .collect(),
            ),
            states,
        }
    }

    fn read() -> Statement {
        Statement::new(StatementKind::Select, true, "SELECT 1")
    }

    fn write() -> Statement {
        Statement::new(StatementKind::Insert, false, "INSERT INTO t VALUES (1)")
    }

    fn idle() -> Session {
        Session::default()
    }

    fn in_tx(pin: NodeId, read_only: bool) -> Session {
        Session {
            tx_state: TxState::InTransaction,
            read_only_tx: read_only,
            pinned: Some(pin),
            ..Session::default()
        }
    }

    fn all_targets() -> Vec<Target> {
        vec![
            Target::Primary,
            Target::Replica(0),
            Target::Replica(1),
            Target::Replica(2),
            Target::Replica(3),
            Target::Replica(99),
            Target::AnyReplica,
            Target::Default,
            Target::Reject("no".into()),
        ]
    }

    fn node(e: &Enforced) -> Option<NodeId> {
        match e.routed {
            Routed::Node(id) => Some(id),
            _ => None,
        }
    }

    #[test]
    fn writes_never_reach_a_replica_whatever_the_target() {
        let c = cluster();
        for t in all_targets() {
            for tb in 0..4 {
                let e = enforce(&t, &write(), &idle(), &c, tb);
                if let Target::Reject(_) = t {
                    assert_eq!(e.routed, Routed::Reject("no".into()));
                    continue;
                }
                assert_eq!(node(&e), Some(0), "target {t:?}");
                let should_flag = matches!(t, Target::Replica(1..=3) | Target::AnyReplica);
                assert_eq!(
                    e.overridden == Some(Override::WriteToReplica),
                    should_flag,
                    "target {t:?}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn read_write_transaction_stays_on_its_node() {
        let c = cluster();
        for t in all_targets() {
            let e = enforce(&t, &read(), &in_tx(0, false), &c, 0);
            assert_eq!(node(&e), Some(0), "target {t:?}");
            let agrees = matches!(t, Target::Primary | Target::Replica(0) | Target::Default);
            assert_eq!(e.overridden.is_none(), agrees, "target {t:?}: {e:?}");
            if !agrees {
                assert_eq!(e.overridden, Some(Override::PinnedTransaction));
            }
        }
    }

    #[test]
    fn read_only_transaction_on_a_replica_stays_there() {
        let c = cluster();
        for t in all_targets() {
            let e = enforce(&t, &read(), &in_tx(3, true), &c, 0);
            assert_eq!(node(&e), Some(3), "target {t:?}");
        }
        let e = enforce(&Target::AnyReplica, &read(), &in_tx(3, true), &c, 0);
        assert_eq!(e.overridden, None);
    }

    #[test]
    fn failed_transaction_also_pinned() {
        let mut s = in_tx(1, true);
        s.tx_state = TxState::Failed;
        let e = enforce(&Target::Primary, &read(), &s, &cluster(), 0);
        assert_eq!(
            e,
            Enforced::overridden(Routed::Node(1), Override::PinnedTransaction)
        );
    }

    #[test]
    fn reads_follow_valid_targets() {
        let c = cluster();
        let e = enforce(&Target::Replica(3), &read(), &idle(), &c, 0);
        assert_eq!(e, Enforced::keep(Routed::Node(3)));
        let e = enforce(&Target::Primary, &read(), &idle(), &c, 0);
        assert_eq!(e, Enforced::keep(Routed::Node(0)));
        // A replica target naming the primary is just the primary.
        let e = enforce(&Target::Replica(0), &read(), &idle(), &c, 0);
        assert_eq!(e, Enforced::keep(Routed::Node(0)));
        // Built-in: least outstanding healthy replica is 1.
        for t in [Target::Default, Target::AnyReplica] {
            assert_eq!(
                enforce(&t, &read(), &idle(), &c, 7),
                Enforced::keep(Routed::Node(1))
            );
        }
    }

    /// Replicas 1 and 3 are healthy; 1 has replayed to 100, 3 to 300. And
    /// a session whose last write is at a given position.
    fn replayed_cluster() -> (ClusterView, fn(u64) -> Session) {
        let mut c = cluster();
        c.states[1].replay_lsn = 100;
        c.states[3].replay_lsn = 300;
        let wrote = |lsn| Session {
            last_write_lsn: Some(lsn),
            ..Session::default()
        };
        (c, wrote)
    }

    #[test]
    fn caught_up_replica_is_a_replica_past_the_write_or_the_primary() {
        let (c, wrote) = replayed_cluster();
        let t = Target::CaughtUpReplica(50);
        assert_eq!(
            enforce(&t, &read(), &wrote(200), &c, 0),
            Enforced::keep(Routed::Node(3))
        );
        assert_eq!(
            enforce(&t, &read(), &wrote(400), &c, 0),
            Enforced::keep(Routed::Node(0)),
            "none caught up: the primary"
        );
        // Without a write it is any replica (least outstanding: 1).
        assert_eq!(
            enforce(&t, &read(), &idle(), &c, 0),
            Enforced::keep(Routed::Node(1))
        );
        // Never a write.
        assert_eq!(
            enforce(&t, &write(), &wrote(200), &c, 0),
            Enforced::overridden(Routed::Node(0), Override::WriteToReplica)
        );
    }

    #[test]
    fn the_builtin_choice_keeps_read_your_writes() {
        let (c, wrote) = replayed_cluster();
        let t = Target::Default;
        assert_eq!(
            enforce(&t, &read(), &wrote(200), &c, 0),
            Enforced::keep(Routed::Node(3))
        );
        assert_eq!(
            enforce(&t, &read(), &wrote(400), &c, 0),
            Enforced::keep(Routed::Node(0)),
            "none has the write: the primary"
        );
        // So does the replacement of a replica target that is unknown or
        // unhealthy (replica 2 is down).
        assert_eq!(
            enforce(&Target::Replica(2), &read(), &wrote(400), &c, 0),
            Enforced::overridden(Routed::Node(0), Override::UnhealthyReplica)
        );
        assert_eq!(
            enforce(&Target::Replica(9), &read(), &wrote(200), &c, 0),
            Enforced::overridden(Routed::Node(3), Override::UnknownReplica)
        );
        // A policy's explicit "any replica" is its own call to make.
        assert_eq!(
            enforce(&Target::AnyReplica, &read(), &wrote(400), &c, 0),
            Enforced::keep(Routed::Node(1))
        );
    }

    #[test]
    fn bad_replica_targets_are_replaced_by_builtin() {
        let c = cluster();
        assert_eq!(
            enforce(&Target::Replica(99), &read(), &idle(), &c, 0),
            Enforced::overridden(Routed::Node(1), Override::UnknownReplica)
        );
        assert_eq!(
            enforce(&Target::Replica(2), &read(), &idle(), &c, 0),
            Enforced::overridden(Routed::Node(1), Override::UnhealthyReplica)
        );
    }

    #[test]
    fn no_healthy_replica_reads_go_to_primary() {
        let mut c = cluster();
        for s in c.states.iter_mut().skip(1) {
            s.healthy = false;
        }
        for t in [Target::Default, Target::AnyReplica, Target::Replica(1)] {
            assert_eq!(node(&enforce(&t, &read(), &idle(), &c, 0)), Some(0));
        }
    }

    #[test]
    fn no_primary_means_unavailable_for_writes_not_reads() {
        let mut c = cluster();
        c.states[0].healthy = false;
        let e = enforce(&Target::Primary, &write(), &idle(), &c, 0);
        assert!(matches!(e.routed, Routed::Unavailable(_)));
        let e = enforce(&Target::Default, &read(), &idle(), &c, 0);
        assert_eq!(node(&e), Some(1));
        // A node that reports recovery is never a write target, even if configured primary.
        c.states[0].healthy = true;
        c.states[0].role = Role::Replica;
        let e = enforce(&Target::Primary, &write(), &idle(), &c, 0);
        assert!(matches!(e.routed, Routed::Unavailable(_)));
    }

    #[test]
    fn in_transaction_without_pin_read_write_goes_to_primary() {
        let s = Session {
            tx_state: TxState::InTransaction,
            ..Session::default()
        };
        let e = enforce(&Target::Replica(1), &read(), &s, &cluster(), 0);
        assert_eq!(
            e,
            Enforced::overridden(Routed::Node(0), Override::WriteToReplica)
        );
    }

    #[test]
    fn reject_is_honoured_outside_transactions_only() {
        let c = cluster();
        let t = Target::Reject("blocked".into());
        assert_eq!(
            enforce(&t, &read(), &idle(), &c, 0).routed,
            Routed::Reject("blocked".into())
        );
        assert_eq!(
            enforce(&t, &read(), &in_tx(1, true), &c, 0),
            Enforced::overridden(Routed::Node(1), Override::PinnedTransaction)
        );
    }
}
