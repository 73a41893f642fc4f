//! Fixture files: a described cluster plus statements and the decision each must
//! get. The same file drives the policy's native `cargo test`
//! ([`crate::testing::run_fixtures`]), `signalbox policy test --fixtures`, and
//! the host's validation of a reloaded policy (a `fixtures.toml` shipped next to
//! the `.wasm` must pass before the new version goes live).
//!
//! ```toml
//! [config]                  # the policy's config table (optional)
//! max_lag_ms = 200
//!
//! [[nodes]]                 # ids are assigned in order, from 0
//! name = "primary"
//! role = "primary"
//! [[nodes]]
//! name = "replica-a"
//! tags = { zone = "eu-1a" }
//! lag_ms = 10
//!
//! [[cases]]
//! name = "reads go to a replica"
//! sql = "SELECT * FROM users"
//! expect = "replica-a"      # a node name, "primary", "any-replica", "caught-up-replica", "default",
//!                           # "reject", or a list of node names (any of them)
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::types::{Role, StatementKind, Target, TxState};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    /// The policy's configuration (turned into JSON for `init`).
    #[serde(default)]
    pub config: toml::Table,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub cases: Vec<Case>,
}

/// A node and its default live state; cases may override the live state.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(flatten)]
    pub state: NodeState,
}

fn one() -> u32 {
    1
}

/// Live state of a node; every field optional so a case can override a few.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    pub healthy: Option<bool>,
    pub lag_ms: Option<u32>,
    pub lag_bytes: Option<u64>,
    pub replayed_last_write: Option<bool>,
    pub in_flight: Option<u32>,
    pub idle: Option<u32>,
    pub latency_us: Option<u32>,
}

impl NodeState {
    /// `self` with every field `over` sets replaced.
    pub fn overlay(&self, over: &NodeState) -> NodeState {
        NodeState {
            healthy: over.healthy.or(self.healthy),
            lag_ms: over.lag_ms.or(self.lag_ms),
            lag_bytes: over.lag_bytes.or(self.lag_bytes),
            replayed_last_write: over.replayed_last_write.or(self.replayed_last_write),
            in_flight: over.in_flight.or(self.in_flight),
            idle: over.idle.or(self.idle),
            latency_us: over.latency_us.or(self.latency_us),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    #[serde(default)]
    pub id: u64,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub database: String,
    #[serde(default)]
    pub application_name: String,
    #[serde(default)]
    pub client_addr: String,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub tx_state: TxState,
    #[serde(default)]
    pub read_only_tx: bool,
    pub ms_since_last_write: Option<u64>,
    /// Defaults to a position when `ms_since_last_write` is set.
    pub write_lsn: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub sql: String,
    /// Defaults to `select`.
    pub kind: Option<StatementKind>,
    /// Defaults to true for `select`, `show` and `explain`, false otherwise.
    pub read_only: Option<bool>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub functions: Vec<String>,
    #[serde(default)]
    pub hints: BTreeMap<String, String>,
    #[serde(default)]
    pub session: SessionSpec,
    /// Live-state overrides by node name.
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeState>,
    /// What `random()` returns during this case (every call).
    pub random: Option<u64>,
    /// What `now_ms()` returns during this case.
    pub now_ms: Option<u64>,
    pub expect: Expect,
    /// If set, the decision's reason must equal it.
    pub expect_reason: Option<String>,
}

impl Case {
    pub fn kind(&self) -> StatementKind {
        self.kind.unwrap_or(StatementKind::Select)
    }

    pub fn read_only(&self) -> bool {
        self.read_only.unwrap_or(matches!(
            self.kind(),
            StatementKind::Select | StatementKind::Show | StatementKind::Explain
        ))
    }
}

/// The expected target: a keyword, one node name, or any of several names.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Expect {
    One(String),
    AnyOf(Vec<String>),
}

/// Why a fixture file could not be used.
#[derive(Debug)]
pub struct FixtureError(pub String);

impl std::fmt::Display for FixtureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FixtureError {}

impl FixtureFile {
    pub fn load(path: &Path) -> Result<Self, FixtureError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FixtureError(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| FixtureError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn parse(text: &str) -> Result<Self, FixtureError> {
        let file: FixtureFile = toml::from_str(text).map_err(|e| FixtureError(e.to_string()))?;
        for case in &file.cases {
            for name in case.nodes.keys() {
                if file.node_id(name).is_none() {
                    return Err(FixtureError(format!(
                        "case `{}` overrides unknown node `{name}`",
                        case.name
                    )));
                }
            }
        }
        Ok(file)
    }

    /// The policy config as the JSON text `init` receives.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }

    pub fn node_id(&self, name: &str) -> Option<u32> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .map(|i| i as u32)
    }

    /// Effective live state of node `id` in `case`.
    pub fn node_state(&self, case: &Case, id: usize) -> NodeState {
        let node = &self.nodes[id];
        match case.nodes.get(&node.name) {
            Some(over) => node.state.overlay(over),
            None => node.state.clone(),
        }
    }

    /// Check a decision's target against the case; `Err` explains the mismatch.
    pub fn check(&self, case: &Case, target: &Target, reason: Option<&str>) -> Result<(), String> {
        let ok = match &case.expect {
            Expect::One(e) => self.matches(e, target),
            Expect::AnyOf(names) => names.iter().any(|e| self.matches(e, target)),
        };
        if !ok {
            return Err(format!(
                "case `{}`: expected {:?}, got {}",
                case.name,
                case.expect,
                self.describe(target)
            ));
        }
        if let Some(want) = &case.expect_reason {
            if reason != Some(want.as_str()) {
                return Err(format!(
                    "case `{}`: expected reason {want:?}, got {reason:?}",
                    case.name
                ));
            }
        }
        Ok(())
    }

    fn matches(&self, expect: &str, target: &Target) -> bool {
        match (expect, target) {
            ("primary", Target::Primary) => true,
            ("any-replica", Target::AnyReplica) => true,
            ("caught-up-replica", Target::CaughtUpReplica(_)) => true,
            ("default", Target::Default) => true,
            ("reject", Target::Reject(_)) => true,
            (name, Target::Replica(id)) => self.node_id(name) == Some(*id),
            _ => false,
        }
    }

    /// A target in fixture vocabulary (node names instead of ids).
    pub fn describe(&self, target: &Target) -> String {
        match target {
            Target::Primary => "primary".into(),
            Target::AnyReplica => "any-replica".into(),
            Target::CaughtUpReplica(ms) => format!("caught-up-replica (waiting up to {ms} ms)"),
            Target::Default => "default".into(),
            Target::Reject(m) => format!("reject({m:?})"),
            Target::Replica(id) => match self.nodes.get(*id as usize) {
                Some(n) => format!("replica {}", n.name),
                None => format!("replica #{id} (no such node)"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [config]
        max_lag_ms = 200
        [[nodes]]
        name = "p"
        role = "primary"
        [[nodes]]
        name = "r1"
        lag_ms = 5
        [[cases]]
        name = "one"
        sql = "SELECT 1"
        nodes = { r1 = { lag_ms = 900 } }
        expect = ["r1", "p"]
    "#;

    #[test]
    fn parses_and_overlays() {
        let f = FixtureFile::parse(SAMPLE).unwrap();
        assert_eq!(f.config_json(), r#"{"max_lag_ms":200}"#);
        let case = &f.cases[0];
        assert!(case.read_only());
        assert_eq!(f.node_state(case, 1).lag_ms, Some(900));
        assert!(f.check(case, &Target::Replica(1), None).is_ok());
        assert!(f.check(case, &Target::Primary, None).is_err());
    }

    #[test]
    fn rejects_unknown_keys_and_nodes() {
        let bad = SAMPLE.replace("lag_ms = 5", "lagms = 5");
        assert!(FixtureFile::parse(&bad).is_err());
        let bad = SAMPLE.replace("r1 = { lag_ms = 900 }", "r9 = { lag_ms = 900 }");
        let err = FixtureFile::parse(&bad).unwrap_err();
        assert!(err.0.contains("unknown node `r9`"), "{err}");
    }
}
