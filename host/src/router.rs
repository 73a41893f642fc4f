//! One statement's routing decision, end to end: ask the live policy, apply
//! the guardrails, count what happened. This is the call the proxy makes once
//! per statement.
//!
//! A shadow policy, when configured, is asked the same question on the same
//! input; its answer goes through the same guardrails (with the same random
//! draw) and is only compared, never used: disagreements are counted by
//! (active node, shadow node), with a few recent samples kept and logged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;

use crate::lock;
use crate::policy::{CallFailure, PolicyManager};
use crate::route::guardrails::{self, Enforced, Override, Routed};
use crate::route::{ClusterView, RouteInput, Target};

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

/// Recent disagreements kept for `/status`.
const SAMPLES: usize = 20;

/// How the shadow policy's answers compare with the active one's.
#[derive(Default)]
pub struct ShadowStats {
    compared: AtomicU64,
    disagreements: AtomicU64,
    /// Disagreements about the kind of node (primary, replica, refusal),
    /// not only which replica.
    role_disagreements: AtomicU64,
    /// Shadow calls that failed (trap, timeout, ...): not compared.
    failures: AtomicU64,
    pairs: Mutex<HashMap<(String, String), u64>>,
    samples: Mutex<VecDeque<ShadowSample>>,
    last_logged_ms: AtomicU64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShadowSample {
    pub at_ms: u64,
    pub sql: String,
    pub active: String,
    pub shadow: String,
    pub shadow_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShadowPair {
    pub active: String,
    pub shadow: String,
    pub count: u64,
}

/// `/status` and `/metrics`: the shadow policy and how often it disagreed.
#[derive(Clone, Debug, Serialize)]
pub struct ShadowStatus {
    pub name: Option<String>,
    pub sha256: Option<String>,
    pub compared: u64,
    pub disagreements: u64,
    /// Disagreements per compared decision (0 before any).
    pub rate: f64,
    /// Disagreements about the kind of place: primary vs replica vs
    /// refused (the part that is not just another replica).
    pub role_disagreements: u64,
    pub role_rate: f64,
    /// Shadow calls that failed and were not compared.
    pub failures: u64,
    /// The shadow has a live version (none: it was rolled back or never
    /// loaded, and nothing is compared).
    pub active: bool,
    pub pairs: Vec<ShadowPair>,
    pub samples: Vec<ShadowSample>,
}

pub struct Router {
    policy: ArcSwap<PolicyManager>,
    shadow: ArcSwapOption<PolicyManager>,
    pub stats: RouterStats,
    shadow_stats: ArcSwap<ShadowStats>,
    /// Time the active policy took to decide (sandbox call included).
    call_seconds: crate::telemetry::Histogram,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Router")
    }
}

impl Router {
    pub fn new(policy: Arc<PolicyManager>) -> Self {
        Self {
            policy: ArcSwap::new(policy),
            shadow: ArcSwapOption::empty(),
            stats: RouterStats::default(),
            shadow_stats: ArcSwap::default(),
            call_seconds: crate::telemetry::seconds_buckets(),
        }
    }

    /// Register the router's families: the policy-call histogram, and
    /// decisions, overrides, policy failures, reloads and shadow counts
    /// read at scrape time.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut crate::telemetry::Registry) {
        registry.register(
            "signalbox_policy_call_seconds",
            "Time the active policy took to decide one statement (sandboxed call included).",
            self.call_seconds.clone(),
        );
        registry.register_collector(Box::new(self.clone()));
    }

    /// The active policy's manager.
    pub fn policy(&self) -> Arc<PolicyManager> {
        self.policy.load_full()
    }

    /// A config reload replaced the active policy's manager.
    pub fn set_policy(&self, manager: Arc<PolicyManager>) {
        self.policy.store(manager);
    }

    /// The shadow policy's manager, if one is configured.
    pub fn shadow(&self) -> Option<Arc<PolicyManager>> {
        self.shadow.load_full()
    }

    /// Configure (or remove) the shadow policy; its counts start over.
    pub fn set_shadow(&self, manager: Option<Arc<PolicyManager>>) {
        self.shadow.store(manager);
        self.shadow_stats.store(Arc::default());
    }

    pub fn route(&self, input: &RouteInput) -> Routing {
        let started = std::time::Instant::now();
        let outcome = self.policy.load().decide(input);
        self.call_seconds.observe(started.elapsed().as_secs_f64());
        let draw = fastrand::u64(..);
        let enforced = guardrails::enforce(
            &outcome.target,
            &input.statement,
            &input.session,
            &input.cluster,
            draw,
        );
        self.stats.decisions.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = enforced.overridden {
            self.stats.overrides[index(kind)].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(override = kind.as_str(), target = ?outcome.target, "guardrail overrode the policy");
        }
        if let Some(shadow) = self.shadow.load().as_ref() {
            self.compare(shadow, input, &enforced.routed, draw);
        }
        Routing {
            enforced,
            reason: outcome.reason,
            failure: outcome.failure,
            target: outcome.target,
        }
    }

    /// Ask the shadow policy and count whether it would have sent the
    /// statement to the same place.
    fn compare(&self, shadow: &PolicyManager, input: &RouteInput, active: &Routed, draw: u64) {
        if !shadow.has_active() {
            return;
        }
        let outcome = shadow.decide(input);
        if outcome.failure.is_some() {
            self.shadow_stats
                .load()
                .failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let theirs = guardrails::enforce(
            &outcome.target,
            &input.statement,
            &input.session,
            &input.cluster,
            draw,
        )
        .routed;
        let stats = self.shadow_stats.load();
        stats.compared.fetch_add(1, Ordering::Relaxed);
        if theirs == *active {
            return;
        }
        stats.disagreements.fetch_add(1, Ordering::Relaxed);
        if kind(active, &input.cluster) != kind(&theirs, &input.cluster) {
            stats.role_disagreements.fetch_add(1, Ordering::Relaxed);
        }
        let (a, s) = (
            place(active, &input.cluster),
            place(&theirs, &input.cluster),
        );
        *lock(&stats.pairs)
            .entry((a.clone(), s.clone()))
            .or_default() += 1;
        let sample = ShadowSample {
            at_ms: crate::policy::kv::now_ms(),
            sql: input.statement.sql.chars().take(200).collect(),
            active: a,
            shadow: s,
            shadow_reason: outcome.reason,
        };
        // At most one log line a second: a shadow that disagrees on every
        // statement must not flood the log.
        let last = stats.last_logged_ms.load(Ordering::Relaxed);
        if sample.at_ms >= last + 1000
            && stats
                .last_logged_ms
                .compare_exchange(last, sample.at_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(active = %sample.active, shadow = %sample.shadow, reason = ?sample.shadow_reason, sql = %sample.sql, "shadow policy disagrees");
        }
        let mut samples = lock(&stats.samples);
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The shadow policy's comparison so far (none configured: `None`).
    pub fn shadow_status(&self) -> Option<ShadowStatus> {
        let manager = self.shadow.load_full()?;
        let active = manager.active();
        let stats = self.shadow_stats.load();
        let compared = stats.compared.load(Ordering::Relaxed);
        let disagreements = stats.disagreements.load(Ordering::Relaxed);
        let role_disagreements = stats.role_disagreements.load(Ordering::Relaxed);
        let per = |n: u64| {
            if compared == 0 {
                0.0
            } else {
                n as f64 / compared as f64
            }
        };
        let mut pairs: Vec<ShadowPair> = lock(&stats.pairs)
            .iter()
            .map(|((a, s), n)| ShadowPair {
                active: a.clone(),
                shadow: s.clone(),
                count: *n,
            })
            .collect();
        pairs.sort_by(|x, y| y.count.cmp(&x.count).then(x.active.cmp(&y.active)));
        let samples = lock(&stats.samples).iter().cloned().collect();
        Some(ShadowStatus {
            name: active.as_ref().map(|p| p.info.name.clone()),
            sha256: active.as_ref().map(|p| p.info.sha256.clone()),
            compared,
            disagreements,
            rate: per(disagreements),
            role_disagreements,
            role_rate: per(role_disagreements),
            failures: stats.failures.load(Ordering::Relaxed),
            active: active.is_some(),
            pairs,
            samples,
        })
    }
}

/// The kind of place a decision sends a statement to.
fn kind(routed: &Routed, cluster: &ClusterView) -> &'static str {
    match routed {
        Routed::Node(n) => match cluster.state(*n).map(|s| s.role) {
            Some(crate::route::Role::Primary) => "primary",
            Some(crate::route::Role::Replica) => "replica",
            _ => "unknown",
        },
        Routed::Reject(_) => "rejected",
        Routed::Unavailable(_) => "unavailable",
    }
}

/// A routed place as an operator reads it: the node's name, or why none.
fn place(routed: &Routed, cluster: &ClusterView) -> String {
    match routed {
        Routed::Node(n) => cluster
            .nodes
            .get(*n as usize)
            .map_or_else(|| format!("node {n}"), |i| i.name.clone()),
        Routed::Reject(_) => "rejected".into(),
        Routed::Unavailable(_) => "unavailable".into(),
    }
}

impl prometheus_client::collector::Collector for Router {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        use crate::telemetry::{by, one};
        let p = self.policy().status();
        let mut r = crate::telemetry::Rows::new(&mut encoder);
        r.counter(
            "signalbox_policy_decisions",
            "Routing decisions made.",
            one(self.stats.decisions.load(Ordering::Relaxed)),
        )?;
        r.counter(
            "signalbox_guardrail_overrides",
            "Policy decisions changed by the host's guardrails, by kind.",
            by(
                "kind",
                Override::ALL
                    .iter()
                    .map(|k| (k.as_str().to_owned(), self.stats.overrides(*k))),
            ),
        )?;
        r.counter(
            "signalbox_policy_fallbacks",
            "Policy calls that failed and used the fallback, by kind.",
            by(
                "kind",
                p.fallbacks.by_kind().map(|(k, v)| (k.to_owned(), v)),
            ),
        )?;
        r.counter(
            "signalbox_policy_reloads",
            "Policy reload attempts by result.",
            by(
                "result",
                [
                    ("ok".to_owned(), p.reloads_ok),
                    ("failed".to_owned(), p.reloads_failed),
                ],
            ),
        )?;
        r.counter(
            "signalbox_policy_rollbacks",
            "Rollbacks of a policy version (automatic or by an operator).",
            one(p.rollbacks),
        )?;
        let shadow = self.shadow_status();
        let (compared, disagreed, role, failed) = shadow.map_or((0, 0, 0, 0), |s| {
            (
                s.compared,
                s.disagreements,
                s.role_disagreements,
                s.failures,
            )
        });
        r.counter(
            "signalbox_shadow_decisions",
            "Decisions the shadow policy was also asked about.",
            one(compared),
        )?;
        r.counter(
            "signalbox_shadow_disagreements",
            "Decisions where the shadow policy would have routed elsewhere.",
            one(disagreed),
        )?;
        r.counter(
            "signalbox_shadow_role_disagreements",
            "Disagreements about the kind of node (primary, replica, refused), not only which replica.",
            one(role),
        )?;
        r.counter(
            "signalbox_shadow_failures",
            "Shadow policy calls that failed (not compared).",
            one(failed),
        )
    }
}
