//! The admin HTTP API: `/` (a live status page), `/health` for load
//! balancers, `/status` (nodes, pools, traffic, the active and shadow
//! policies, policy and config reloads), `/metrics` (Prometheus text),
//! `POST /policy/reload`, `POST /policy/rollback` and `POST /config/reload`.
//!
//! Access: bound to a loopback address it is open, except that with an
//! `admin_token` configured the endpoints that change something ask for it;
//! bound anywhere else (which needs a token) every request must carry
//! `Authorization: Bearer <token>`.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::live::{ConfigStatus, Reloader};
use crate::policy::{Outcome, PolicyStatus};
use crate::proxy::Shared;
use crate::route::guardrails::Override;
use crate::route::Role;
use crate::router::ShadowStatus;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    guard: Option<Arc<Guard>>,
    traffic: Arc<Traffic>,
}

/// How often the traffic chart's counts are sampled, and how many samples
/// it keeps (ten minutes).
const TRAFFIC_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
const TRAFFIC_KEEP: usize = 121;

/// Routed-statement counts per node, sampled for the status page's chart.
#[derive(Default)]
struct Traffic(std::sync::Mutex<std::collections::VecDeque<Vec<(String, u64)>>>);

impl Traffic {
    fn sample(&self, counts: Vec<(String, u64)>) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == TRAFFIC_KEEP {
            q.pop_front();
        }
        q.push_back(counts);
    }

    /// Statements per second per node between consecutive samples, oldest
    /// first; nodes in the order of the newest sample.
    fn rates(&self) -> TrafficStatus {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let nodes: Vec<String> = q
            .back()
            .map(|s| s.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let secs = TRAFFIC_EVERY.as_secs_f64();
        let count =
            |s: &[(String, u64)], n: &str| s.iter().find(|(m, _)| m == n).map_or(0, |(_, c)| *c);
        let rates = q
            .iter()
            .zip(q.iter().skip(1))
            .map(|(a, b)| {
                nodes
                    .iter()
                    .map(|n| count(b, n).saturating_sub(count(a, n)) as f64 / secs)
                    .collect()
            })
            .collect();
        TrafficStatus {
            interval_s: TRAFFIC_EVERY.as_secs(),
            nodes,
            rates,
        }
    }
}

#[derive(Serialize)]
struct TrafficStatus {
    interval_s: u64,
    nodes: Vec<String>,
    rates: Vec<Vec<f64>>,
}

/// Who may call the admin API.
pub struct Guard {
    token: String,
    /// Every request needs the token (not bound to loopback), not only
    /// the ones that change something.
    everything: bool,
}

impl Guard {
    /// The guard for an API bound to `bound` with `token` (none: open,
    /// which the configuration allows on loopback only).
    pub fn new(token: Option<&str>, bound: std::net::SocketAddr) -> Option<Arc<Self>> {
        token.map(|t| {
            Arc::new(Self {
                token: t.trim().to_owned(),
                everything: !bound.ip().is_loopback(),
            })
        })
    }

    fn admits(&self, method: &Method, headers: &axum::http::HeaderMap) -> bool {
        let changes = !matches!(*method, Method::GET | Method::HEAD);
        if !self.everything && !changes {
            return true;
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        crate::proxy::auth::constant_time_eq(presented.trim().as_bytes(), self.token.as_bytes())
    }
}

/// The admin API's routes. Also starts sampling traffic for the status
/// page (the task ends with the runtime).
pub fn router(shared: Arc<Shared>, reloader: Arc<Reloader>, guard: Option<Arc<Guard>>) -> Router {
    let traffic = Arc::new(Traffic::default());
    let weak = Arc::downgrade(&traffic);
    let counts = shared.metrics.routed.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRAFFIC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(t) = weak.upgrade() else { return };
            t.sample(counts.snapshot());
        }
    });
    let state = AppState {
        shared,
        reloader,
        guard,
        traffic,
    };
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/policy/reload", post(reload))
        .route("/policy/rollback", post(rollback))
        .route("/config/reload", post(config_reload))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(guard) = &s.guard {
        if !guard.admits(req.method(), req.headers()) {
            tracing::warn!(method = %req.method(), path = %req.uri().path(), "admin API request refused: missing or wrong bearer token");
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "signalbox admin API: a valid `Authorization: Bearer <admin_token>` is required\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// The status page: one self-contained file that polls `/status`.
async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("admin/status.html"),
    )
        .into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    let live = s.shared.live();
    let view = live.cluster.view();
    let fence = live.cluster.fence_reason();
    match (view.primary(), fence) {
        (Some(_), None) => (StatusCode::OK, "ok\n").into_response(),
        (Some(_), Some(f)) => (StatusCode::OK, format!("ok; {f}\n")).into_response(),
        (None, Some(f)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{f}\n")).into_response(),
        (None, None) => (StatusCode::SERVICE_UNAVAILABLE, "no healthy primary\n").into_response(),
    }
}

#[derive(Serialize)]
struct NodeStatus {
    name: String,
    role: Role,
    healthy: bool,
    lag_ms: Option<u32>,
    lag_bytes: u64,
    in_flight: u32,
    idle: u32,
    routed: u64,
}

#[derive(Serialize)]
struct Status {
    nodes: Vec<NodeStatus>,
    sessions_active: u64,
    policy: PolicyStatus,
    shadow: Option<ShadowStatus>,
    config: ConfigStatus,
    traffic: TrafficStatus,
}

async fn status(State(s): State<AppState>) -> Json<Status> {
    let live = s.shared.live();
    let view = live.cluster.view();
    let idle = live.cluster.pools.idle();
    let nodes = view
        .states
        .iter()
        .enumerate()
        .map(|(i, st)| NodeStatus {
            name: view.nodes[i].name.clone(),
            role: st.role,
            healthy: st.healthy,
            lag_ms: st.lag_ms,
            lag_bytes: st.lag_bytes,
            in_flight: st.in_flight,
            idle: idle[i],
            routed: s.shared.metrics.routed.value(&view.nodes[i].name),
        })
        .collect();
    Json(Status {
        nodes,
        sessions_active: s.shared.metrics.sessions_active.load(Ordering::Relaxed),
        policy: s.shared.router.policy().status(),
        shadow: s.shared.router.shadow_status(),
        config: s.reloader.status(),
        traffic: s.traffic.rates(),
    })
}

async fn metrics(State(s): State<AppState>) -> Response {
    let m = &s.shared.metrics;
    let live = s.shared.live();
    let view = live.cluster.view();
    let p = s.shared.router.policy().status();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let node = |i: usize| format!("{{node=\"{}\"}}", label(&view.nodes[i].name));
    // One row per node, labelled with its name.
    let per_node = |value: &dyn Fn(usize) -> u64| -> Vec<(String, u64)> {
        (0..view.nodes.len()).map(|i| (node(i), value(i))).collect()
    };
    // A single unlabelled row.
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "signalbox_sessions_active",
        "gauge",
        "Client sessions connected.",
        one(m.sessions_active.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_sessions_total",
        "counter",
        "Client sessions accepted.",
        one(m.sessions_total.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_routed_total",
        "counter",
        "Statements or transactions routed, by node.",
        m.routed
            .snapshot()
            .into_iter()
            .map(|(n, v)| (format!("{{node=\"{}\"}}", label(&n)), v))
            .collect(),
    );
    metric(
        "signalbox_routed_read_only_total",
        "counter",
        "Routed statements classified read-only.",
        one(m.routed_read_only.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_rejected_total",
        "counter",
        "Statements rejected by the policy.",
        one(m.rejected.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_cancel_requests_total",
        "counter",
        "Cancel requests forwarded.",
        one(m.cancels.load(Ordering::Relaxed)),
    );
    let reasons: Vec<(String, u64)> = {
        let map = m.reasons.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(String, u64)> = map
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", label(r)), *n))
            .collect();
        rows.sort();
        rows
    };
    metric(
        "signalbox_policy_reasons_total",
        "counter",
        "Policy decisions by the reason the policy gave (the first 64 distinct reasons; the rest as \"other\").",
        reasons,
    );
    metric(
        "signalbox_split_brain_probe_rounds_total",
        "counter",
        "Probe rounds in which more than one node claimed to be the primary.",
        one(live.cluster.split_brain_rounds.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_writes_fenced",
        "gauge",
        "1 while a node claiming to be primary is fenced (former primary, or split brain).",
        one(u64::from(live.cluster.fence_reason().is_some())),
    );
    metric(
        "signalbox_catalog_fetches_total",
        "counter",
        "Catalog fact fetches (first use of a database, DDL, interval).",
        one(s.shared.catalogs.fetches.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_catalog_fetch_errors_total",
        "counter",
        "Catalog fact fetches that failed (verdicts stay as they were).",
        one(s.shared.catalogs.fetch_errors.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_accept_errors_total",
        "counter",
        "Failed accepts of client connections (e.g. out of file descriptors); accepting goes on.",
        one(m.accept_errors.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_refused_connections_total",
        "counter",
        "Clients refused by [clients] max_connections (53300).",
        one(m.refused_connections.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_protocol_errors_total",
        "counter",
        "Connections closed for protocol violations at startup.",
        one(m.protocol_errors.load(Ordering::Relaxed)),
    );
    metric(
        "signalbox_guardrail_overrides_total",
        "counter",
        "Policy decisions changed by the host's guardrails, by kind.",
        Override::ALL
            .iter()
            .map(|k| {
                (
                    format!("{{kind=\"{}\"}}", k.as_str()),
                    s.shared.router.stats.overrides(*k),
                )
            })
            .collect(),
    );
    let f = p.fallbacks;
    metric(
        "signalbox_policy_fallbacks_total",
        "counter",
        "Policy calls that failed and used the fallback, by kind.",
        [
            ("trap", f.trap),
            ("timeout", f.timeout),
            ("out_of_memory", f.out_of_memory),
            ("invalid", f.invalid),
            ("instantiate", f.instantiate),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), v))
        .collect(),
    );
    metric(
        "signalbox_policy_decisions_total",
        "counter",
        "Routing decisions made.",
        vec![(
            String::new(),
            s.shared.router.stats.decisions.load(Ordering::Relaxed),
        )],
    );
    metric(
        "signalbox_policy_reloads_total",
        "counter",
        "Policy reload attempts by result.",
        vec![
            ("{result=\"ok\"}".into(), p.reloads_ok),
            ("{result=\"failed\"}".into(), p.reloads_failed),
        ],
    );
    metric(
        "signalbox_policy_rollbacks_total",
        "counter",
        "Automatic rollbacks of a misbehaving policy version.",
        one(p.rollbacks),
    );
    metric(
        "signalbox_node_up",
        "gauge",
        "1 if the node answers health probes.",
        per_node(&|i| u64::from(view.states[i].healthy)),
    );
    metric(
        "signalbox_node_primary",
        "gauge",
        "1 if the node reports it is a primary.",
        per_node(&|i| u64::from(view.states[i].role == Role::Primary)),
    );
    metric(
        "signalbox_node_lag_bytes",
        "gauge",
        "WAL bytes the node has not replayed yet.",
        per_node(&|i| view.states[i].lag_bytes),
    );
    metric(
        "signalbox_node_lag_ms",
        "gauge",
        "Replay lag in milliseconds.",
        per_node(&|i| u64::from(view.states[i].lag_ms.unwrap_or(0))),
    );
    metric(
        "signalbox_node_in_flight",
        "gauge",
        "Backend connections checked out.",
        per_node(&|i| u64::from(view.states[i].in_flight)),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn reload(State(s): State<AppState>) -> Response {
    let policy = s.shared.router.policy();
    match tokio::task::spawn_blocking(move || policy.reload("api")).await {
        Ok(event) => {
            let code = match event.outcome {
                Outcome::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::OK,
            };
            (code, Json(event)).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn rollback(State(s): State<AppState>) -> Response {
    match s.shared.router.policy().roll_back("api") {
        Ok(event) => (StatusCode::OK, Json(event)).into_response(),
        Err(why) => (StatusCode::CONFLICT, format!("{why}\n")).into_response(),
    }
}

/// Read the config file again: 200 with what changed, or 422 with why the
/// whole file was rejected (nothing applied).
async fn config_reload(State(s): State<AppState>) -> Response {
    let event = s.reloader.reload("api").await;
    let code = if event.error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (code, Json(event)).into_response()
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_guard_asks_for_the_token_where_it_must() {
        let token = "0123456789abcdef-token";
        let ok = format!("Bearer {token}");
        let loopback = Guard::new(Some(token), "127.0.0.1:9930".parse().unwrap()).unwrap();
        assert!(loopback.admits(&Method::GET, &headers(None)));
        assert!(!loopback.admits(&Method::POST, &headers(None)));
        assert!(!loopback.admits(&Method::POST, &headers(Some("Bearer nope"))));
        assert!(loopback.admits(&Method::POST, &headers(Some(&ok))));
        let public = Guard::new(Some(token), "10.1.2.3:9930".parse().unwrap()).unwrap();
        assert!(!public.admits(&Method::GET, &headers(None)));
        assert!(!public.admits(&Method::GET, &headers(Some(token))));
        assert!(public.admits(&Method::GET, &headers(Some(&ok))));
        assert!(Guard::new(None, "127.0.0.1:9930".parse().unwrap()).is_none());
    }
}
