//! The client-facing side: accept connections, negotiate startup (SSL
//! refusal, cancel requests, startup parameters), then hand the connection
//! to a [`session::Session`].

pub mod auth;
pub mod encoding;
pub mod message;
pub mod relay;
pub mod session;
pub mod state;
pub mod statements;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::cluster::NodeCounters;
use crate::live::Live;
use crate::lock;
use crate::router::Router;
use crate::sql::classify::Classifier;
use crate::tls::BoxStream;
use crate::wire::{self, Fields, WireError};

/// Everything sessions share.
pub struct Shared {
    /// The configuration and cluster in force (a config reload swaps them).
    pub live: arc_swap::ArcSwap<Live>,
    pub router: Arc<Router>,
    pub classifier: Classifier,
    pub cancel: CancelMap,
    pub metrics: Metrics,
    /// Server parameters reported at login, by (user, database): later
    /// sessions are greeted without taking a pooled connection.
    pub server_params: Mutex<HashMap<(String, String), ServerParams>>,
    /// TLS for clients, and whether it is required.
    pub tls: Option<crate::tls::ClientTls>,
    /// Set once when signalbox begins to shut down: no new clients, and
    /// sessions end at their next moment outside a transaction.
    /// Set only through [`Shared::begin_shutdown`], which also tells the
    /// sessions.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Each serving session's own stop signal, so that a session waits on
    /// nothing shared between statements (see [`Shared::stop_signal`]).
    stops: Mutex<rustc_hash::FxHashMap<u64, Arc<tokio::sync::Notify>>>,
    /// Shared by every client's partly received large messages.
    pub message_budget: Arc<relay::MessageBudget>,
    /// Catalog facts per database, for read-only verdicts.
    pub catalogs: Arc<crate::catalog::Catalogs>,
    /// Read-your-writes: WAL position and time of the last committed write
    /// per shared scope (`user:…`, `application:…`, `database:…`).
    pub writes: Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// Connected clients (past the TCP accept), for `max_connections`.
    clients: AtomicU64,
    next_session: AtomicU64,
}

impl Shared {
    pub fn new(
        live: Live,
        router: Arc<Router>,
        tls: Option<crate::tls::ClientTls>,
        routed: Arc<NodeCounters>,
    ) -> Arc<Self> {
        let message_budget = Arc::new(relay::MessageBudget::new(
            live.config.clients.buffer_budget_mb << 20,
        ));
        Arc::new(Self {
            tls,
            live: arc_swap::ArcSwap::from_pointee(live),
            router,
            classifier: Classifier::default(),
            cancel: CancelMap::default(),
            metrics: Metrics::new(routed),
            server_params: Mutex::default(),
            shutdown: tokio::sync::watch::channel(false).0,
            stops: Mutex::default(),
            message_budget,
            catalogs: Arc::default(),
            writes: Mutex::default(),
            clients: AtomicU64::new(0),
            next_session: AtomicU64::new(1),
        })
    }
}

impl Shared {
    /// The configuration and cluster in force now.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Register the data path's families: counts read at scrape time and
    /// the per-node histograms.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut crate::telemetry::Registry) {
        self.metrics.routed.register(registry);
        registry.register_collector(Box::new(DataPath(self.clone())));
    }
}

/// The data path's counters, read at scrape time.
struct DataPath(Arc<Shared>);

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataPath")
    }
}

impl prometheus_client::collector::Collector for DataPath {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        use crate::telemetry::{by, one};
        let m = &self.0.metrics;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut r = crate::telemetry::Rows::new(&mut encoder);
        r.gauge(
            "signalbox_sessions_active",
            "Client sessions connected.",
            one(n(&m.sessions_active) as i64),
        )?;
        r.counter(
            "signalbox_sessions",
            "Client sessions accepted.",
            one(n(&m.sessions_total)),
        )?;
        r.counter(
            "signalbox_routed",
            "Statements or transactions routed, by node.",
            by("node", m.routed.snapshot()),
        )?;
        r.counter(
            "signalbox_routed_read_only",
            "Routed statements classified read-only.",
            one(n(&m.routed_read_only)),
        )?;
        r.counter(
            "signalbox_rejected",
            "Statements rejected by the policy.",
            one(n(&m.rejected)),
        )?;
        r.counter(
            "signalbox_ryw_unrecorded",
            "Committed write transactions whose WAL position neither their connection nor the control plane could tell (read-your-writes cannot cover them).",
            one(n(&m.ryw_unrecorded)),
        )?;
        r.counter(
            "signalbox_standby_retries",
            "Reads judged safe that a standby refused (25006, or recovery), run again on the primary before the client saw anything.",
            one(n(&m.standby_retries)),
        )?;
        r.counter(
            "signalbox_conflict_retries",
            "Reads a standby cancelled for a conflict with recovery (40001), run again on another node before the client saw anything.",
            one(n(&m.conflict_retries)),
        )?;
        r.counter(
            "signalbox_cancel_requests",
            "Cancel requests forwarded.",
            one(n(&m.cancels)),
        )?;
        let reasons = m.reasons.snapshot();
        r.counter(
            "signalbox_policy_reasons",
            "Policy decisions by the reason the policy gave (the first 64 distinct reasons; the rest as \"other\").",
            by("reason", reasons),
        )?;
        let catalogs = &self.0.catalogs;
        r.counter(
            "signalbox_catalog_fetches",
            "Catalog fact fetches (first use of a database, DDL, interval).",
            one(n(&catalogs.fetches)),
        )?;
        r.counter(
            "signalbox_catalog_fetch_errors",
            "Catalog fact fetches that failed (verdicts stay as they were).",
            one(n(&catalogs.fetch_errors)),
        )?;
        r.counter(
            "signalbox_accept_errors",
            "Failed accepts of client connections (e.g. out of file descriptors); accepting goes on.",
            one(n(&m.accept_errors)),
        )?;
        r.counter(
            "signalbox_refused_connections",
            "Clients refused by [clients] max_connections (53300).",
            one(n(&m.refused_connections)),
        )?;
        r.counter(
            "signalbox_stalled_clients",
            "Clients disconnected (their statement cancelled) for taking none of an answer for [clients] write_timeout_s while it held a server connection.",
            one(n(&m.stalled_clients)),
        )?;
        r.counter(
            "signalbox_prepared_evicted",
            "Server-side prepared statements closed to keep a server connection within [pool] max_prepared_statements.",
            one(n(&m.prepared_evicted)),
        )?;
        r.counter(
            "signalbox_protocol_errors",
            "Connections closed for protocol violations at startup.",
            one(n(&m.protocol_errors)),
        )
    }
}

/// ParameterStatus name/value pairs a server reported.
pub type ServerParams = Vec<(String, String)>;

/// A cancel key: process id and secret.
pub type CancelKey = (i32, i32);

/// Where one session's queries run now: the backend (address, key) a
/// cancel request for it goes to. The session updates it on every checkout
/// and release without touching the shared map.
#[derive(Default)]
pub struct CancelTarget(Mutex<Aim>);

#[derive(Default)]
struct Aim {
    backend: Option<(Arc<str>, CancelKey)>,
    /// Cancels sent to the backend that its server has not yet confirmed
    /// (by closing the cancel connection once the signal is delivered).
    in_flight: u32,
    /// A cancel went unconfirmed (timed out or failed): it may still land.
    doubt: bool,
}

impl CancelTarget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Aim> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, addr: Arc<str>, backend_key: CancelKey) {
        self.lock().backend = Some((addr, backend_key));
    }

    /// Cancels no longer go to the current backend. True when one sent to
    /// it may still arrive: its connection must then serve nobody else, or
    /// the late cancel would stop another client's statement.
    pub fn clear(&self) -> bool {
        let mut aim = self.lock();
        aim.backend = None;
        aim.in_flight > 0 || std::mem::take(&mut aim.doubt)
    }

    /// The backend to cancel, counted in flight until [`Self::done`].
    fn start(&self) -> Option<(Arc<str>, CancelKey)> {
        let mut aim = self.lock();
        let backend = aim.backend.clone()?;
        aim.in_flight += 1;
        Some(backend)
    }

    /// A cancel from [`Self::start`] ended; `confirmed`: the server took it.
    fn done(&self, confirmed: bool) {
        let mut aim = self.lock();
        aim.in_flight = aim.in_flight.saturating_sub(1);
        aim.doubt |= !confirmed;
    }
}

/// Our cancel keys → each session's [`CancelTarget`]. Written once when a
/// session starts (or takes its server's key) and once when it ends.
#[derive(Default)]
pub struct CancelMap(Mutex<HashMap<CancelKey, Arc<CancelTarget>>>);

impl CancelMap {
    pub fn register(&self, key: CancelKey, target: Arc<CancelTarget>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, target);
    }

    pub fn forget(&self, key: CancelKey) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    fn lookup(&self, key: CancelKey) -> Option<Arc<CancelTarget>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
    }
}

/// Data-path counters for `/metrics`.
pub struct Metrics {
    pub sessions_total: AtomicU64,
    pub sessions_active: AtomicU64,
    /// Statements (or transactions) routed, per node name (each cluster
    /// holds its nodes' counters for the data path).
    pub routed: Arc<NodeCounters>,
    pub routed_read_only: AtomicU64,
    pub rejected: AtomicU64,
    /// Committed write transactions whose position could not be learned.
    pub ryw_unrecorded: AtomicU64,
    /// Reads a standby refused, run again on the primary.
    pub standby_retries: AtomicU64,
    /// Reads a standby cancelled for a conflict with recovery, run again
    /// on another node.
    pub conflict_retries: AtomicU64,
    pub cancels: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// accept() failures (e.g. out of file descriptors); the loop goes on.
    pub accept_errors: AtomicU64,
    /// Clients turned away by `[clients] max_connections`.
    pub refused_connections: AtomicU64,
    /// Clients disconnected for taking none of an answer while it held a
    /// server connection (`[clients] write_timeout_s`).
    pub stalled_clients: AtomicU64,
    /// Server statements closed by `[pool] max_prepared_statements`.
    pub prepared_evicted: AtomicU64,
    /// Decisions by the policy's reason: the first [`REASONS`] distinct
    /// reasons get their own count, the rest count as `other`.
    pub reasons: Reasons,
}

/// Decisions by reason. Counting a known reason reads a shared map and
/// bumps its counter, without a lock; only a reason seen for the first
/// time takes the lock and publishes a new map (at most [`REASONS`] times).
#[derive(Default)]
pub struct Reasons {
    // Fx: hashed on every statement; the keys are the policy's own
    // reasons, at most REASONS of them.
    map: arc_swap::ArcSwap<HashMap<String, Arc<AtomicU64>, rustc_hash::FxBuildHasher>>,
    adding: Mutex<()>,
}

impl Reasons {
    pub fn count(&self, reason: &str) {
        if let Some(c) = self.map.load().get(reason) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _one = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let map = self.map.load_full();
        let key = if map.contains_key(reason) || map.len() < REASONS {
            reason
        } else {
            "other"
        };
        if let Some(c) = map.get(key) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut grown = HashMap::clone(&map);
        grown.insert(key.to_owned(), Arc::new(AtomicU64::new(1)));
        self.map.store(Arc::new(grown));
    }

    /// (reason, count), sorted by reason.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut rows: Vec<(String, u64)> = self
            .map
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        rows
    }
}

/// Distinct policy reasons counted by name (bounded label cardinality).
pub const REASONS: usize = 64;

impl Metrics {
    fn new(routed: Arc<NodeCounters>) -> Self {
        Self {
            sessions_total: AtomicU64::new(0),
            sessions_active: AtomicU64::new(0),
            routed,
            routed_read_only: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            ryw_unrecorded: AtomicU64::new(0),
            standby_retries: AtomicU64::new(0),
            conflict_retries: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            refused_connections: AtomicU64::new(0),
            stalled_clients: AtomicU64::new(0),
            prepared_evicted: AtomicU64::new(0),
            reasons: Reasons::default(),
        }
    }

    /// Count a decision's reason.
    pub fn reason(&self, reason: &str) {
        self.reasons.count(reason);
    }

    pub fn routed(&self, counter: Option<&AtomicU64>, read_only: bool) {
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if read_only {
            self.routed_read_only.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn standby_retried(&self) {
        self.standby_retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ryw_unrecorded(&self) {
        self.ryw_unrecorded.fetch_add(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Begin shutting down: refuse new clients and tell every serving
    /// session to end at its next moment outside a transaction.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        // Woken outside the lock: sessions starting and ending take it.
        let stops: Vec<_> = lock(&self.stops).values().cloned().collect();
        for stop in stops {
            // A session inside a transaction keeps the permit until it is
            // between transactions again.
            stop.notify_one();
        }
    }

    /// Sessions registered for the shutdown signal (ended ones deregister).
    pub fn stop_signals(&self) -> usize {
        lock(&self.stops).len()
    }

    /// The stop signal of session `id`, which [`Self::begin_shutdown`]
    /// fires, until the returned guard drops. A watch channel shared by
    /// every session would take its shared lock twice per statement.
    pub fn stop_signal(self: &Arc<Self>, id: u64) -> StopSignal {
        let notify = Arc::new(tokio::sync::Notify::new());
        lock(&self.stops).insert(id, notify.clone());
        // After registering: a shutdown that began before it is seen here,
        // one that begins after it finds the signal registered.
        if *self.shutdown.borrow() {
            notify.notify_one();
        }
        StopSignal {
            shared: self.clone(),
            id,
            notify,
        }
    }
}

/// A session's registration for shutdown; fires once shutdown begins.
pub struct StopSignal {
    shared: Arc<Shared>,
    id: u64,
    notify: Arc<tokio::sync::Notify>,
}

impl StopSignal {
    /// Completes once shutdown has begun (at once if it already has).
    pub async fn stopped(&self) {
        self.notify.notified().await;
        // Keep the permit: a caller that polls again must see it too.
        self.notify.notify_one();
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        lock(&self.shared.stops).remove(&self.id);
    }
}

/// Accept clients until shutdown begins. An accept error (out of file
/// descriptors, a connection reset before accept) is logged and counted, and
/// the loop backs off and goes on: it never ends by itself.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, shared).await {
                        tracing::debug!(error = %e, "connection ended during startup");
                    }
                });
            }
            Err(e) => {
                shared.metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot accept a client connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Counts a connected client for as long as it lives.
struct ClientSlot<'a>(&'a AtomicU64);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cancel key no PostgreSQL backend can have: the process id lies above
/// Linux's largest possible pid (2^22), so `pg_terminate_backend(pid)` by a
/// client can never hit an unrelated server process; both halves come from
/// the operating system's CSPRNG.
fn cancel_key() -> (i32, i32) {
    const PID_MAX_LIMIT: u32 = 1 << 22;
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No OS randomness: still unguessable enough to not collide, and
        // still outside the pid range.
        bytes = fastrand::u64(..).to_be_bytes();
    }
    let r = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let pid = PID_MAX_LIMIT + 1 + r % (i32::MAX as u32 - PID_MAX_LIMIT);
    let secret = i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (pid as i32, secret)
}

async fn handle(tcp: TcpStream, shared: Arc<Shared>) -> Result<(), WireError> {
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let _slot = ClientSlot(&shared.clients);
    let peer = tcp
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut stream: BoxStream = Box::new(tcp);
    let (login_timeout_s, max_connections) = {
        let live = shared.live.load();
        let c = &live.config.clients;
        (c.login_timeout_s, c.max_connections)
    };
    let login_deadline = tokio::time::Instant::now() + Duration::from_secs(login_timeout_s.max(1));
    // Startup negotiation, bounded in time: a silent client cannot hold us.
    let (params, encrypted) =
        match tokio::time::timeout_at(login_deadline, negotiate(&mut stream, &shared)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => {
                shared
                    .metrics
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                refuse(&mut stream, "08P01", &e.to_string()).await;
                return Err(e);
            }
            Err(_) => return Ok(()),
        };
    if shared.clients.load(Ordering::Relaxed) > max_connections as u64 {
        shared
            .metrics
            .refused_connections
            .fetch_add(1, Ordering::Relaxed);
        refuse(&mut stream, "53300", "sorry, too many clients already").await;
        return Ok(());
    }
    if *shared.shutdown.borrow() {
        refuse(&mut stream, "57P03", "the database system is shutting down").await;
        return Ok(());
    }
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let key = cancel_key();
    shared
        .metrics
        .sessions_total
        .fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .sessions_active
        .fetch_add(1, Ordering::Relaxed);
    let accepted = session::Accepted {
        stream,
        peer,
        params,
        tls: encrypted,
        key,
        id,
        login_deadline,
    };
    // With debug logging, every line of this client carries its session
    // id, peer and user, so one client's story can be followed. (A debug
    // span: disabled at the default level, it costs nothing per poll.)
    let span = tracing::debug_span!(
        "session",
        id = accepted.id,
        peer = %accepted.peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty
    );
    for (k, v) in &accepted.params {
        match k.as_str() {
            "user" => {
                span.record("user", v.as_str());
            }
            "database" => {
                span.record("database", v.as_str());
            }
            _ => {}
        }
    }
    tracing::Instrument::instrument(session::Session::run(shared.clone(), accepted), span).await;
    shared
        .metrics
        .sessions_active
        .fetch_sub(1, Ordering::Relaxed);
    Ok(())
}

/// Turn a client away after its startup packet, as PostgreSQL does: one
/// FATAL, then the connection closes.
async fn refuse(stream: &mut BoxStream, code: &str, message: &str) {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, "FATAL", code, message);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// Read startup packets until a StartupMessage: its parameters, and whether
/// the connection is now TLS; `None` for a cancel request. An `SSLRequest`
/// upgrades `stream` to TLS when configured.
async fn negotiate(
    stream: &mut BoxStream,
    shared: &Shared,
) -> Result<Option<(Vec<(String, String)>, bool)>, WireError> {
    let mut encrypted = false;
    loop {
        let body = wire::read_startup(stream).await?;
        if body.len() < 4 {
            return Err(WireError::Protocol("startup packet too short".into()));
        }
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        match code {
            wire::SSL_REQUEST if !encrypted && shared.tls.is_some() => {
                stream.write_all(b"S").await?;
                let Some(tls) = shared.tls.as_ref() else {
                    continue;
                };
                // Take the plain stream out (leaving an inert one) to wrap it.
                let plain = std::mem::replace(stream, Box::new(tokio::io::duplex(1).0));
                *stream = Box::new(tls.acceptor.accept(plain).await?);
                encrypted = true;
            }
            wire::SSL_REQUEST | wire::GSSENC_REQUEST => {
                // No TLS configured (or asked twice): the client may continue
                // in plain text, or give up if it requires TLS.
                stream.write_all(b"N").await?;
            }
            wire::CANCEL_REQUEST if body.len() >= 12 => {
                let pid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                let secret = i32::from_be_bytes([body[8], body[9], body[10], body[11]]);
                cancel(shared, (pid, secret)).await;
                return Ok(None);
            }
            wire::PROTOCOL_V3 => {
                let mut fields = Fields::new(&body[4..]);
                let mut params = Vec::new();
                loop {
                    let k = fields.cstr()?;
                    if k.is_empty() {
                        break;
                    }
                    params.push((k.to_owned(), fields.cstr()?.to_owned()));
                }
                if !params.iter().any(|(k, _)| k == "user") {
                    return Err(WireError::Protocol("no user in startup packet".into()));
                }
                if !encrypted && shared.tls.as_ref().is_some_and(|t| t.required) {
                    return Err(WireError::Protocol(
                        "signalbox requires TLS: connect with sslmode=require".into(),
                    ));
                }
                return Ok(Some((params, encrypted)));
            }
            other => {
                return Err(WireError::Protocol(format!(
                    "unsupported frontend protocol {}.{}",
                    other >> 16,
                    other & 0xffff
                )))
            }
        }
    }
}

/// Forward a cancel request to the backend running the session's query.
async fn cancel(shared: &Shared, key: (i32, i32)) {
    let Some(target) = shared.cancel.lookup(key) else {
        return;
    };
    let Some((addr, backend_key)) = target.start() else {
        return;
    };
    shared.metrics.cancels.fetch_add(1, Ordering::Relaxed);
    // On a task of its own: the request counts as in flight until the
    // server confirms it, even if this connection's handler is dropped.
    let confirm = tokio::spawn(async move {
        let ok = crate::cluster::cancel::send(addr, backend_key).await;
        target.done(ok);
    });
    let _ = confirm.await;
}
