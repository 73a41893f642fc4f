//! The admin HTTP API: `/` (a live status page), `/health` for load
//! balancers, `/status` (nodes, pools, traffic, the active and shadow
//! policies, policy and config reloads), `/metrics` (Prometheus text),
//! `POST /policy/reload`, `POST /policy/rollback` and `POST /config/reload`.
//!
//! Access: bound to a loopback address it is open, except that with an
//! `admin_token` configured the endpoints that change something ask for it;
//! bound anywhere else (which needs a token) every request must carry
//! `Authorization: Bearer <token>`.

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
use crate::route::Role;
use crate::router::ShadowStatus;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    guard: Option<Arc<Guard>>,
    traffic: Arc<Traffic>,
    registry: Arc<crate::telemetry::Registry>,
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
pub fn router(
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    registry: Arc<crate::telemetry::Registry>,
    guard: Option<Arc<Guard>>,
) -> Router {
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
        registry,
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
            in_flight: view.in_flight(i as u32),
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
    let text = crate::telemetry::encode(&s.registry);
    (
        [(header::CONTENT_TYPE, crate::telemetry::CONTENT_TYPE)],
        text,
    )
        .into_response()
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
    // In a task of its own: a client that hangs up must not cancel a reload
    // half way (a policy swapped, the cluster not, nothing journaled).
    let reloader = s.reloader.clone();
    let event = match tokio::spawn(async move { reloader.reload("api").await }).await {
        Ok(event) => event,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let code = if event.error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (code, Json(event)).into_response()
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
