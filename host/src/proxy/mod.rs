//! The client-facing side: accept connections, negotiate startup (SSL
//! refusal, cancel requests, startup parameters), then hand the connection
//! to a [`session::Session`].

pub mod auth;
pub mod relay;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::cluster::Cluster;
use crate::config::Config;
use crate::route::NodeId;
use crate::router::Router;
use crate::sql::classify::Classifier;
use crate::tls::BoxStream;
use crate::wire::{self, Fields, WireError};

/// Everything sessions share.
pub struct Shared {
    pub config: Arc<Config>,
    pub cluster: Arc<Cluster>,
    pub router: Arc<Router>,
    pub classifier: Classifier,
    pub cancel: CancelMap,
    pub metrics: Metrics,
    /// Server parameters reported at login, by (user, database): later
    /// sessions are greeted without taking a pooled connection.
    pub server_params: Mutex<HashMap<(String, String), ServerParams>>,
    /// TLS for clients, and whether it is required.
    pub tls: Option<(crate::tls::TlsAcceptor, bool)>,
    next_session: AtomicU64,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        cluster: Arc<Cluster>,
        router: Arc<Router>,
        tls: Option<(crate::tls::TlsAcceptor, bool)>,
    ) -> Arc<Self> {
        let nodes = cluster.nodes.len();
        Arc::new(Self {
            tls,
            config,
            cluster,
            router,
            classifier: Classifier::default(),
            cancel: CancelMap::default(),
            metrics: Metrics::new(nodes),
            server_params: Mutex::default(),
            next_session: AtomicU64::new(1),
        })
    }
}

/// ParameterStatus name/value pairs a server reported.
pub type ServerParams = Vec<(String, String)>;

/// A cancel key: process id and secret.
pub type CancelKey = (i32, i32);

/// Our cancel keys → the backend (address, key) running that session's query.
#[derive(Default)]
pub struct CancelMap(Mutex<HashMap<CancelKey, (String, CancelKey)>>);

impl CancelMap {
    pub fn set(&self, key: (i32, i32), addr: String, backend_key: (i32, i32)) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (addr, backend_key));
    }

    pub fn clear(&self, key: (i32, i32)) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    pub fn forget(&self, key: (i32, i32)) {
        self.clear(key);
    }

    fn lookup(&self, key: (i32, i32)) -> Option<(String, (i32, i32))> {
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
    /// Statements (or transactions) routed, per node.
    pub routed: Vec<AtomicU64>,
    pub routed_read_only: AtomicU64,
    pub rejected: AtomicU64,
    pub cancels: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub exchange_us_total: AtomicU64,
}

impl Metrics {
    fn new(nodes: usize) -> Self {
        Self {
            sessions_total: AtomicU64::new(0),
            sessions_active: AtomicU64::new(0),
            routed: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            routed_read_only: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            exchange_us_total: AtomicU64::new(0),
        }
    }

    pub fn routed(&self, node: NodeId, read_only: bool) {
        if let Some(c) = self.routed.get(node as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if read_only {
            self.routed_read_only.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency(&self, d: Duration) {
        self.exchange_us_total
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Accept clients until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, shared).await {
                tracing::debug!(error = %e, "connection ended during startup");
            }
        });
    }
}

async fn handle(tcp: TcpStream, shared: Arc<Shared>) -> Result<(), WireError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut stream: BoxStream = Box::new(tcp);
    // Startup negotiation, bounded in time: a silent client cannot hold us.
    let params = match tokio::time::timeout(
        Duration::from_secs(10),
        negotiate(&mut stream, &shared),
    )
    .await
    {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            shared
                .metrics
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            let mut out = BytesMut::new();
            wire::error_response(&mut out, "FATAL", "08P01", &format!("{e}"));
            let _ = stream.write_all(&out).await;
            return Err(e);
        }
        Err(_) => return Ok(()),
    };
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let key = ((id & 0x7fff_ffff) as i32, fastrand::i32(..));
    shared
        .metrics
        .sessions_total
        .fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .sessions_active
        .fetch_add(1, Ordering::Relaxed);
    session::Session::run(shared.clone(), stream, peer, params, key, id).await;
    shared
        .metrics
        .sessions_active
        .fetch_sub(1, Ordering::Relaxed);
    Ok(())
}

/// Read startup packets until a StartupMessage; `None` for a cancel request.
/// An `SSLRequest` upgrades `stream` to TLS when configured.
async fn negotiate(
    stream: &mut BoxStream,
    shared: &Shared,
) -> Result<Option<Vec<(String, String)>>, WireError> {
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
                let Some((acceptor, _)) = shared.tls.as_ref() else {
                    continue;
                };
                // Take the plain stream out (leaving an inert one) to wrap it.
                let plain = std::mem::replace(stream, Box::new(tokio::io::duplex(1).0));
                *stream = Box::new(acceptor.accept(plain).await?);
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
                if !encrypted && shared.tls.as_ref().is_some_and(|(_, required)| *required) {
                    return Err(WireError::Protocol(
                        "signalbox requires TLS: connect with sslmode=require".into(),
                    ));
                }
                return Ok(Some(params));
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
    let Some((addr, backend_key)) = shared.cancel.lookup(key) else {
        return;
    };
    shared.metrics.cancels.fetch_add(1, Ordering::Relaxed);
    crate::cluster::cancel::send(addr, backend_key).await;
}
