//! One statement's routing decision, end to end: ask the live policy, apply
//! the guardrails, count what happened. This is the call the proxy makes once
//! per statement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::policy::{CallFailure, PolicyManager};
use crate::route::guardrails::{self, Enforced, Override};
use crate::route::{RouteInput, Target};

/// The decision for one statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    pub enforced: Enforced,
    /// The policy's reason (or `fallback:<kind>`).
    pub reason: Option<String>,
    pub failure: Option<CallFailure>,
    /// The policy's target (before the guardrails).
    pub target: Target,
}

/// Counters of guardrail overrides by kind.
#[derive(Debug, Default)]
pub struct RouterStats {
    pub decisions: AtomicU64,
    overrides: [AtomicU64; 4],
}

impl RouterStats {
    pub fn overrides(&self, kind: Override) -> u64 {
        self.overrides[index(kind)].load(Ordering::Relaxed)
    }
}

fn index(kind: Override) -> usize {
    Override::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

pub struct Router {
    pub policy: Arc<PolicyManager>,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(policy: Arc<PolicyManager>) -> Self {
        Self {
            policy,
            stats: RouterStats::default(),
        }
    }

    pub fn route(&self, input: &RouteInput) -> Routing {
        let outcome = self.policy.decide(input);
        let enforced = guardrails::enforce(
            &outcome.target,
            &input.statement,
            &input.session,
            &input.cluster,
            fastrand::u64(..),
        );
        self.stats.decisions.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = enforced.overridden {
            self.stats.overrides[index(kind)].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(override = kind.as_str(), target = ?outcome.target, "guardrail overrode the policy");
        }
        Routing {
            enforced,
            reason: outcome.reason,
            failure: outcome.failure,
            target: outcome.target,
        }
    }
}
