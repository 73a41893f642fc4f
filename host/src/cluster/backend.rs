//! One authenticated connection to a node (the data path). Authentication
//! (trust, cleartext, MD5, SCRAM-SHA-256) uses `postgres-protocol`; after
//! that, messages are forwarded as raw frames.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::{BoxStream, NodeTls};

use crate::route::NodeId;
use crate::wire::{self, Frame, WireError};

/// Why a backend connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to node {node} ({addr}): {source}")]
    Connect {
        node: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to node {node} ({addr})")]
    ConnectTimeout { node: String, addr: String },
    /// PostgreSQL refused us (wrong password, unknown database, ...).
    #[error("node {node}: {message}")]
    Server {
        node: String,
        code: String,
        message: String,
    },
    #[error("node {node}: {detail}")]
    Protocol { node: String, detail: String },
    #[error("node {node}: {source}")]
    Wire { node: String, source: WireError },
}

impl BackendError {
    /// The SQLSTATE a client should see for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Server { code, .. } => code,
            // connection_failure / cannot_connect_now
            _ => "08006",
        }
    }
}

/// What a caller needs to log in.
#[derive(Clone, Debug)]
pub struct LoginSpec {
    pub node_name: String,
    pub addr: String,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub connect_timeout: Duration,
    /// TLS towards the node: connector, server name, and whether it is required.
    pub tls: Option<NodeTls>,
}

/// The statements prepared on one server connection, by server name, each
/// with the batch that last used it: when their number is capped, the least
/// recently used are closed first.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<String, u64>,
    batch: u64,
}

impl ServerStatements {
    /// A batch starts: what it uses from now on is marked as its own.
    pub fn start_batch(&mut self) {
        self.batch += 1;
    }

    /// Whether `name` is prepared here; if so, it counts as used now.
    pub fn has(&mut self, name: &str) -> bool {
        match self.used.get_mut(name) {
            Some(b) => {
                *b = self.batch;
                true
            }
            None => false,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.used.contains_key(name)
    }

    pub fn insert(&mut self, name: String) {
        self.used.insert(name, self.batch);
    }

    pub fn remove(&mut self, name: &str) {
        self.used.remove(name);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The statements to close so that at most `cap` remain (0: no cap),
    /// least recently used first, never one the current batch uses; they
    /// are forgotten here at once.
    pub fn evict(&mut self, cap: usize) -> Vec<String> {
        if cap == 0 || self.used.len() <= cap {
            return Vec::new();
        }
        let mut old: Vec<(u64, &String)> = self
            .used
            .iter()
            .filter(|(_, b)| **b < self.batch)
            .map(|(n, b)| (*b, n))
            .collect();
        old.sort_unstable();
        let victims: Vec<String> = old
            .into_iter()
            .take(self.used.len() - cap)
            .map(|(_, n)| n.clone())
            .collect();
        for v in &victims {
            self.used.remove(v);
        }
        victims
    }
}

/// One authenticated server connection. Every byte sent and every message
/// received goes through its methods, so it always knows whether the server
/// still owes answers: only a connection that has answered everything, is
/// outside a transaction and is not in COPY counts as idle ([`is_idle`]), and
/// only an idle one may go back to a pool.
///
/// [`is_idle`]: BackendConn::is_idle
pub struct BackendConn {
    node: NodeId,
    stream: BoxStream,
    /// Bytes read past the last frame.
    rbuf: BytesMut,
    /// The tail of a client's batch the socket could not take yet: it goes
    /// out while the answers are read ([`BackendConn::fill`]), because the
    /// server stops reading once its answers fill the socket.
    unsent: BytesMut,
    /// A TLS stream may still hold written bytes in its own buffer.
    unflushed: bool,
    /// ParameterStatus values the server reported at startup.
    params: Vec<(String, String)>,
    /// Process id and secret, for cancel requests.
    key: (i32, i32),
    addr: std::sync::Arc<str>,
    /// Server-side names of statements prepared on this connection.
    prepared: ServerStatements,
    /// Fingerprint of the session state (SETs) last applied here; 0: unknown.
    state_key: u64,
    /// Something a client ran may have changed session state signalbox does
    /// not track (a function call): reset everything before the next use.
    needs_reset: bool,
    /// ReadyForQuery messages the server still owes (one per Query or Sync).
    owed: u32,
    /// Nothing was sent since the server last became ready.
    quiet: bool,
    /// Transaction status of the last ReadyForQuery (`I`, `T`, `E`).
    status: u8,
    /// The server is waiting for COPY data.
    copy_in: bool,
    /// A protocol error or I/O failure happened: never reuse.
    broken: bool,
    /// Serves its holder on, but goes back to no pool.
    retiring: bool,
    created: Instant,
}

impl BackendConn {
    pub async fn connect(node: NodeId, spec: &LoginSpec) -> Result<Self, BackendError> {
        let stream = tokio::time::timeout(spec.connect_timeout, TcpStream::connect(&spec.addr))
            .await
            .map_err(|_| BackendError::ConnectTimeout {
                node: spec.node_name.clone(),
                addr: spec.addr.clone(),
            })?
            .map_err(|source| BackendError::Connect {
                node: spec.node_name.clone(),
                addr: spec.addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let stream = tokio::time::timeout(spec.connect_timeout, negotiate_tls(stream, spec))
            .await
            .map_err(|_| BackendError::ConnectTimeout {
                node: spec.node_name.clone(),
                addr: spec.addr.clone(),
            })??;
        let mut conn = Self {
            node,
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            unsent: BytesMut::new(),
            unflushed: false,
            params: Vec::new(),
            key: (0, 0),
            addr: spec.addr.as_str().into(),
            prepared: ServerStatements::default(),
            state_key: 0,
            needs_reset: false,
            owed: 0,
            quiet: false,
            status: b'I',
            copy_in: false,
            broken: false,
            retiring: false,
            created: Instant::now(),
        };
        tokio::time::timeout(spec.connect_timeout, conn.startup(spec))
            .await
            .map_err(|_| BackendError::ConnectTimeout {
                node: spec.node_name.clone(),
                addr: spec.addr.clone(),
            })??;
        Ok(conn)
    }

    async fn startup(&mut self, spec: &LoginSpec) -> Result<(), BackendError> {
        self.startup_inner(spec).await
    }

    async fn startup_inner(&mut self, spec: &LoginSpec) -> Result<(), BackendError> {
        let node = || spec.node_name.clone();
        let proto = |detail: String| BackendError::Protocol {
            node: spec.node_name.clone(),
            detail,
        };
        let mut out = BytesMut::new();
        let params = [
            ("user", spec.user.as_str()),
            ("database", spec.database.as_str()),
            // No application_name: a session that never set one must see ''
            // as with PostgreSQL (RESET ALL returns to the startup value).
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params, &mut out).map_err(|e| proto(e.to_string()))?;
        self.send(&out, &spec.node_name).await?;
        let password = || {
            spec.password.clone().ok_or_else(|| BackendError::Server {
                node: node(),
                code: "28P01".into(),
                message: format!(
                    "node asks for a password for user \"{}\" and none is configured",
                    spec.user
                ),
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.next(&spec.node_name).await?;
            let mut raw = BytesMut::new();
            frame.encode_into(&mut raw);
            let msg = backend::Message::parse(&mut raw)
                .map_err(|e| proto(e.to_string()))?
                .ok_or_else(|| proto("truncated message".into()))?;
            let mut out = BytesMut::new();
            match msg {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut out)
                        .map_err(|e| proto(e.to_string()))?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        spec.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| proto(e.to_string()))?;
                }
                backend::Message::AuthenticationSasl(_) => {
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .map_err(|e| proto(e.to_string()))?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| proto("unexpected SASL continue".into()))?;
                    s.update(body.data()).map_err(|e| proto(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| proto(e.to_string()))?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| proto("unexpected SASL final".into()))?;
                    s.finish(body.data()).map_err(|e| proto(e.to_string()))?;
                }
                backend::Message::ParameterStatus(body) => {
                    let name = body.name().map_err(|e| proto(e.to_string()))?;
                    let value = body.value().map_err(|e| proto(e.to_string()))?;
                    self.params.push((name.to_owned(), value.to_owned()));
                }
                backend::Message::BackendKeyData(body) => {
                    self.key = (body.process_id(), body.secret_key());
                }
                // `next` has recorded it: the connection is now idle.
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(_) => {
                    let (code, message) = wire::error_fields(&frame.body);
                    return Err(BackendError::Server {
                        node: node(),
                        code,
                        message,
                    });
                }
                backend::Message::NoticeResponse(_) => {}
                _ => {
                    return Err(proto(format!(
                        "unexpected message '{}' during startup",
                        frame.tag as char
                    )))
                }
            }
            if !out.is_empty() {
                self.send(&out, &spec.node_name).await?;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8], node: &str) -> Result<(), BackendError> {
        self.write_flushed(bytes)
            .await
            .map_err(|e| BackendError::Wire {
                node: node.to_owned(),
                source: e.into(),
            })
    }

    async fn next(&mut self, node: &str) -> Result<Frame, BackendError> {
        self.next_frame()
            .await
            .map_err(|source| BackendError::Wire {
                node: node.to_owned(),
                source,
            })
    }

    /// Run a simple query whose results nobody sees (state replay, resets).
    /// Returns the first error's (SQLSTATE, message), if any.
    pub async fn execute_silently(
        &mut self,
        sql: &str,
    ) -> Result<Option<(String, String)>, WireError> {
        Ok(self.simple(sql).await?.0)
    }

    /// The first column of the first row of `sql` as text (None: no row,
    /// NULL, or an error, which is swallowed like `execute_silently`'s).
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>, WireError> {
        Ok(self.simple(sql).await?.1)
    }

    /// Run a simple query of signalbox's own to its ReadyForQuery: the
    /// first error's (SQLSTATE, message) and the first row's first value.
    async fn simple(
        &mut self,
        sql: &str,
    ) -> Result<(Option<(String, String)>, Option<String>), WireError> {
        let mut out = BytesMut::new();
        wire::query(&mut out, sql);
        self.send_frames(&out).await?;
        self.simple_reply(|_| {}).await
    }

    /// Read the answer to a simple query of signalbox's own that was sent
    /// after everything else now owed (pipelined behind a client's work):
    /// the first error's (SQLSTATE, message) and the first row's first value.
    /// What the server sends on its own meanwhile (notifications, notices,
    /// parameter changes) goes to `unsolicited`, for the client.
    pub async fn simple_reply(
        &mut self,
        mut unsolicited: impl FnMut(&Frame),
    ) -> Result<(Option<(String, String)>, Option<String>), WireError> {
        let (mut error, mut value) = (None, None);
        loop {
            let f = self.next_frame().await?;
            match f.tag {
                b'E' if error.is_none() => error = Some(wire::error_fields(&f.body)),
                b'D' if value.is_none() => value = first_value(&f.body),
                b'Z' if self.owed == 0 => return Ok((error, value)),
                b'A' | b'N' | b'S' => unsolicited(&f),
                _ => {}
            }
        }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Server-side names of the statements prepared here.
    pub fn prepared_mut(&mut self) -> &mut ServerStatements {
        &mut self.prepared
    }

    /// The connection has exactly the session state `key` stands for.
    pub fn carries(&self, key: u64) -> bool {
        self.state_key == key && !self.needs_reset
    }

    /// Whether the next reset must undo untracked changes too.
    pub fn needs_full_reset(&self) -> bool {
        self.needs_reset
    }

    /// The session state `key` stands for was just applied (after a reset).
    pub fn state_applied(&mut self, key: u64) {
        self.state_key = key;
        self.needs_reset = false;
    }

    /// The client changed its tracked state from `from` to `to` by running
    /// the SETs on this very connection.
    pub fn state_followed(&mut self, from: u64, to: u64) {
        if self.state_key == from {
            self.state_key = to;
        }
    }

    /// Something ran that may have changed state signalbox cannot see.
    pub fn mark_needs_reset(&mut self) {
        self.needs_reset = true;
    }

    /// The server reset the session itself (`DISCARD ALL`): its state is no
    /// longer any client's, and its prepared statements are gone.
    pub fn forget_session(&mut self) {
        self.state_key = 0;
        self.prepared.clear();
    }

    /// The backend's cancel key.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }

    pub fn addr(&self) -> &std::sync::Arc<str> {
        &self.addr
    }

    /// ParameterStatus values reported at login.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Never reuse this connection.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Let the session holding it finish, then close it: what it holds is
    /// no longer known (statements a failed DEALLOCATE may have left).
    pub fn mark_retiring(&mut self) {
        self.retiring = true;
    }

    /// Transaction status of the last ReadyForQuery.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The server answered everything sent, is outside any transaction and
    /// holds no unread bytes: the only state in which a pool may take it back.
    pub fn is_idle(&self) -> bool {
        !self.broken
            && !self.retiring
            && self.quiet
            && self.owed == 0
            && self.status == b'I'
            && !self.copy_in
            && self.rbuf.is_empty()
            && self.unsent.is_empty()
            && !self.unflushed
    }

    /// Results may still be on their way (a cancel would stop them).
    pub fn is_busy(&self) -> bool {
        !self.quiet || self.owed > 0 || self.copy_in || !self.unsent.is_empty()
    }

    /// Send whole protocol messages. Every Query and Sync makes the server
    /// owe one more ReadyForQuery; a CopyDone/CopyFail ends COPY IN.
    pub async fn send_frames(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.count(bytes);
        self.write(bytes).await
    }

    /// Send a client's batch for the answers to be read next: what the
    /// socket does not take at once is sent by [`fill`](Self::fill) as it
    /// reads. A batch larger than the socket's buffers would otherwise
    /// deadlock: PostgreSQL answers each message as it reads it and stops
    /// reading while its answers cannot be written, and signalbox would
    /// not read them before the whole batch was written.
    pub async fn send_batch(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.count(bytes);
        if let Err(e) = self.send_what_fits(bytes).await {
            self.broken = true;
            return Err(e.into());
        }
        Ok(())
    }

    fn count(&mut self, bytes: &[u8]) {
        for (tag, _) in wire::frames(bytes) {
            match tag {
                b'Q' | b'S' => self.owed += 1,
                b'c' | b'f' => self.copy_in = false,
                _ => {}
            }
        }
        self.quiet = false;
    }

    async fn send_what_fits(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.drain().await?;
        let mut sent = 0;
        std::future::poll_fn(|cx| {
            while sent < bytes.len() {
                match Pin::new(&mut self.stream).poll_write(cx, &bytes[sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            self.unsent.extend_from_slice(&bytes[sent..]);
            self.unflushed = true;
            match self.poll_send_unsent(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(())),
            }
        })
        .await
    }

    /// Push out the batch's unsent tail, then flush (TLS). Ready once
    /// everything is out; written bytes leave `unsent` at once, so a caller
    /// that stops polling (a `select!`) loses nothing.
    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.unsent.is_empty() {
            match tokio_util::io::poll_write_buf(Pin::new(&mut self.stream), cx, &mut self.unsent) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(write_zero())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unsent.capacity() > 64 * 1024 {
            // A pooled connection keeps no large batch's buffer.
            self.unsent = BytesMut::new();
        }
        if self.unflushed {
            std::task::ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Finish sending an earlier batch, reading the server's answers
    /// meanwhile (they are kept for the relay), so that what is sent next
    /// goes out after it.
    async fn drain(&mut self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| loop {
            if let Poll::Ready(r) = self.poll_send_unsent(cx) {
                return Poll::Ready(r);
            }
            self.rbuf.reserve(16 * 1024);
            match std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.stream),
                cx,
                &mut self.rbuf
            )) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// TLS keeps what the socket cannot take yet in a buffer of its own
    /// and sends it only on the next write or a flush: without the flush,
    /// the end of a large message could wait there while the server waits
    /// for it. (A plain socket's flush does nothing.)
    async fn write_flushed(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.drain().await?;
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if let Err(e) = self.write_flushed(bytes).await {
            self.broken = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Send the client's Sync that ends an extended-protocol COPY IN. The
    /// Sync sent after the COPY's Execute was ignored by the server (it
    /// was reading COPY data) but counted as owed: this one is answered
    /// in its place, so it is not counted again.
    pub async fn send_in_place_of_ignored_sync(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.write(bytes).await
    }

    /// The next complete message already buffered, if any.
    pub fn take_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match wire::take_frame(&mut self.rbuf, usize::MAX >> 1) {
            Ok(Some(f)) => {
                self.observe(&f);
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Read more bytes from the server (at least one, or an error).
    /// Bytes from the server not yet taken as frames.
    pub fn has_buffered(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// Also sends the unsent tail of the last batch: the server may be
    /// waiting for it before it answers more. Cancel-safe.
    pub async fn fill(&mut self) -> Result<(), WireError> {
        self.rbuf.reserve(16 * 1024);
        let read = std::future::poll_fn(|cx| {
            let sent = self.poll_send_unsent(cx);
            // What the server said first (a FATAL before it closed) says
            // more than the failed write.
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf) {
                Poll::Pending => match sent {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Pending,
                },
                read => read,
            }
        });
        match read.await {
            Ok(0) => {
                self.broken = true;
                Err(WireError::Closed)
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }

    /// The next message from the server.
    pub async fn next_frame(&mut self) -> Result<Frame, WireError> {
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    fn observe(&mut self, f: &Frame) {
        match f.tag {
            b'Z' => {
                self.owed = self.owed.saturating_sub(1);
                self.status = f.body.first().copied().unwrap_or(b'E');
                self.copy_in = false;
                if self.owed == 0 {
                    self.quiet = true;
                }
            }
            b'G' => self.copy_in = true,
            _ => {}
        }
    }

    /// Without waiting: the server has not closed the connection and has
    /// sent nothing unsolicited (a FATAL before closing, a notification).
    /// Used before handing out a pooled connection, so it costs no round trip.
    pub fn still_usable(&mut self) -> bool {
        use futures::FutureExt;
        if !self.is_idle() {
            return false;
        }
        self.rbuf.reserve(1024);
        match self.stream.read_buf(&mut self.rbuf).now_or_never() {
            None => true,
            Some(_) => {
                self.broken = true;
                false
            }
        }
    }
}

fn write_zero() -> std::io::Error {
    std::io::ErrorKind::WriteZero.into()
}

/// Ask for TLS if the node's `sslmode` says so; PostgreSQL answers one byte.
async fn negotiate_tls(mut tcp: TcpStream, spec: &LoginSpec) -> Result<BoxStream, BackendError> {
    let Some(NodeTls {
        connector,
        name,
        required,
    }) = &spec.tls
    else {
        return Ok(Box::new(tcp));
    };
    let io = |e: std::io::Error| BackendError::Wire {
        node: spec.node_name.clone(),
        source: e.into(),
    };
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&wire::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&request).await.map_err(io)?;
    match tcp.read_u8().await.map_err(io)? {
        b'S' => {
            let tls =
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| BackendError::Protocol {
                        node: spec.node_name.clone(),
                        detail: format!("TLS handshake failed: {e}"),
                    })?;
            Ok(Box::new(tls))
        }
        b'N' if !*required => Ok(Box::new(tcp)),
        b'N' => Err(BackendError::Protocol {
            node: spec.node_name.clone(),
            detail: "the node does not accept TLS, but its sslmode requires it".into(),
        }),
        other => Err(BackendError::Protocol {
            node: spec.node_name.clone(),
            detail: format!("unexpected answer {other:#x} to SSLRequest"),
        }),
    }
}

/// The first column of a DataRow body as text (None for NULL or a short row).
fn first_value(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let v = body.get(6..6 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(v).into_owned())
}
