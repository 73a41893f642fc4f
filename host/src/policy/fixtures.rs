//! Running a real `.wasm` policy against fixture cases (the same files the
//! SDK's native tests use), for reload validation and `signalbox policy test`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signalbox_policy::fixture::{Case, FixtureFile};

use super::instance::{CallFailure, Determinism, PolicyDecision};
use super::loaded::LoadedPolicy;
use crate::route::{
    ClusterView, NodeInfo, NodeState, Role, RouteInput, Session, Statement, StatementKind,
};

/// Outcome of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub decision: Result<PolicyDecision, CallFailure>,
    /// `Err` explains why the decision does not match the expectation.
    pub verdict: Result<(), String>,
    pub elapsed: Duration,
    pub fuel: Option<u64>,
}

/// The cluster view a fixture case describes.
pub fn cluster_for(file: &FixtureFile, case: Option<&Case>) -> ClusterView {
    let nodes = file
        .nodes
        .iter()
        .map(|n| NodeInfo::new(&n.name, n.weight, &n.tags))
        .collect();
    let states = file
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let s = match case {
                Some(case) => file.node_state(case, i),
                None => n.state.clone(),
            };
            let base = NodeState::up(n.role);
            NodeState {
                role: n.role,
                healthy: s.healthy.unwrap_or(true),
                lag_ms: s.lag_ms.or(base.lag_ms),
                lag_bytes: s.lag_bytes.unwrap_or(0),
                // Encode "replayed the last write" as a replay position
                // below or above the session's last write (see `input_for`).
                replay_lsn: if s.replayed_last_write.unwrap_or(true) {
                    u64::MAX
                } else {
                    0
                },
                in_flight: s.in_flight.unwrap_or(0),
                idle: s.idle.unwrap_or(0),
                latency_us: s.latency_us.unwrap_or(0),
            }
        })
        .collect();
    ClusterView {
        live: None,
        generation: crate::route::next_generation(),
        nodes: Arc::new(nodes),
        states,
    }
}

/// The router's input for a fixture case.
pub fn input_for(file: &FixtureFile, case: &Case) -> RouteInput {
    let mut statement = Statement::new(case.kind(), case.read_only(), &case.sql);
    statement.tables = case.tables.clone().into();
    statement.functions = case.functions.clone().into();
    statement.hints = case
        .hints
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let s = &case.session;
    let session = Session {
        id: s.id,
        user: s.user.clone(),
        database: s.database.clone(),
        application_name: s.application_name.clone(),
        client_addr: s.client_addr.clone(),
        attributes: s
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        tx_state: s.tx_state,
        read_only_tx: s.read_only_tx,
        ms_since_last_write: s.ms_since_last_write,
        // As natively: a position when the case says the session wrote.
        last_write_lsn: s.write_lsn.or(s.ms_since_last_write.map(|_| 1)),
        pinned: None,
    };
    RouteInput {
        statement: Arc::new(statement),
        session: Arc::new(session),
        cluster: Arc::new(cluster_for(file, Some(case))),
    }
}

/// Run every case in order on one dedicated instance (so stateful policies
/// behave as in the native tests).
pub fn run(policy: &LoadedPolicy, file: &FixtureFile) -> Result<Vec<CaseResult>, String> {
    let mut inst = policy.fresh(Determinism::default())?;
    let mut results = Vec::with_capacity(file.cases.len());
    for case in &file.cases {
        inst.state_mut().determinism = Determinism {
            random: case.random,
            now_ms: case.now_ms,
        };
        let input = input_for(file, case);
        let started = Instant::now();
        let decision = inst.route(&input);
        let elapsed = started.elapsed();
        let verdict = match &decision {
            Ok(d) => file.check(case, &d.target, d.reason.as_deref()),
            Err(f) => Err(format!("case `{}`: {f}", case.name)),
        };
        let failed = decision.is_err();
        results.push(CaseResult {
            name: case.name.clone(),
            decision,
            verdict,
            elapsed,
            fuel: inst.last_fuel,
        });
        if failed {
            // The instance is unusable after a trap; continue on a fresh one.
            inst = policy.fresh(Determinism::default())?;
        }
    }
    Ok(results)
}

/// Fixture files shipped next to a policy: `<stem>.fixtures.toml`, or
/// `fixtures.toml` in the same directory.
pub fn shipped_with(policy_path: &Path) -> Option<PathBuf> {
    let dir = policy_path.parent()?;
    let stem = policy_path.file_stem()?.to_string_lossy();
    [
        dir.join(format!("{stem}.fixtures.toml")),
        dir.join("fixtures.toml"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// A minimal cluster (primary + two replicas) for the smoke stage.
pub fn smoke_inputs() -> Vec<RouteInput> {
    let cluster = Arc::new(ClusterView {
        live: None,
        generation: crate::route::next_generation(),
        nodes: Arc::new(
            ["primary", "replica-1", "replica-2"]
                .iter()
                .map(|n| NodeInfo {
                    name: (*n).to_owned(),
                    weight: 1,
                    tags: vec![],
                })
                .collect(),
        ),
        states: vec![
            NodeState::up(Role::Primary),
            NodeState::up(Role::Replica),
            NodeState::up(Role::Replica),
        ],
    });
    let session = Arc::new(Session {
        id: 1,
        user: "smoke".into(),
        database: "smoke".into(),
        ..Session::default()
    });
    [
        Statement::new(crate::route::StatementKind::Select, true, "SELECT 1"),
        Statement::new(
            crate::route::StatementKind::Insert,
            false,
            "INSERT INTO t VALUES (1)",
        ),
    ]
    .into_iter()
    .map(|s| RouteInput {
        statement: Arc::new(s),
        session: session.clone(),
        cluster: cluster.clone(),
    })
    .collect()
}

/// The "realistic" routing input used by `policy bench` and the criterion
/// benches: 8 backends with two tags each and a ~200-character statement.
pub fn realistic_input() -> RouteInput {
    let zones = ["eu-1a", "eu-1b", "eu-1c"];
    let nodes = (0..8)
        .map(|i| NodeInfo {
            name: if i == 0 {
                "primary".into()
            } else {
                format!("replica-{i}")
            },
            weight: 1 + (i % 3),
            tags: vec![
                ("zone".into(), zones[i as usize % 3].into()),
                (
                    "class".into(),
                    if i % 2 == 0 {
                        "r6g.xlarge"
                    } else {
                        "r6g.2xlarge"
                    }
                    .into(),
                ),
            ],
        })
        .collect();
    let states = (0..8)
        .map(|i| NodeState {
            in_flight: (i * 7) % 5,
            lag_ms: (i > 0).then_some(i * 15),
            latency_us: 300 + i * 10,
            ..NodeState::up(if i == 0 { Role::Primary } else { Role::Replica })
        })
        .collect();
    let sql = "SELECT o.id, o.status, o.total_cents, c.email FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.tenant_id = $1 AND o.created_at > now() - interval '7 days' ORDER BY o.created_at DESC LIMIT 50";
    let mut statement = Statement::new(StatementKind::Select, true, sql);
    statement.tables = vec!["orders".into(), "customers".into()].into();
    let session = Session {
        id: 42,
        user: "app".into(),
        database: "shop".into(),
        application_name: "checkout".into(),
        client_addr: "10.0.0.7".into(),
        attributes: vec![("zone".into(), "eu-1b".into())],
        ms_since_last_write: Some(1500),
        last_write_lsn: Some(100),
        ..Session::default()
    };
    RouteInput {
        statement: Arc::new(statement),
        session: Arc::new(session),
        cluster: Arc::new(ClusterView {
            live: None,
            generation: crate::route::next_generation(),
            nodes: Arc::new(nodes),
            states,
        }),
    }
}
