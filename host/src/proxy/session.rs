//! One client session: startup, then every statement classified, routed
//! through the policy and the guardrails, and run on a pooled backend
//! connection (transaction pooling by default). Session state (SETs, startup
//! parameters) is replayed on whatever connection the session gets; client
//! statement names are mapped to per-SQL server names and re-prepared on
//! demand.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::relay::{self, ClientIo, Outcome, RelayError, Step};
use super::Shared;
use crate::cluster::pool::Lease;
use crate::route::guardrails::Routed;
use crate::route::{NodeId, RouteInput, Session as RouteSession, Statement, TxState};
use crate::sql::classify::{Classified, SessionEffect};
use crate::wire::{self, Fields, Frame, WireError};

/// A batch rewritten for one connection.
struct Translated<'a> {
    bytes: BytesMut,
    plan: VecDeque<Step>,
    /// Server statement names prepared by each Parse slot.
    slots: Vec<Option<String>>,
    /// Sent as is instead of `bytes` (a simple Query needs no rewriting).
    raw: Option<&'a [u8]>,
}

/// What a routed exchange sends: a simple Query as the client sent it, or
/// extended-protocol messages to rewrite for the connection.
#[derive(Clone, Copy)]
enum Work<'a> {
    Query(&'a [u8]),
    Batch(&'a [Frame]),
}

/// A statement the client prepared (extended protocol).
#[derive(Clone, Debug)]
struct Prepared {
    sql: Arc<str>,
    param_types: Bytes,
    server_name: String,
    class: Arc<Classified>,
}

/// Client-visible session state that must follow the session to every
/// backend connection.
#[derive(Clone, Debug, Default)]
struct SessionState {
    /// Startup parameters turned into SETs, then the client's SETs, by name.
    sets: Vec<(String, String)>,
    key: u64,
}

impl SessionState {
    fn apply(&mut self, effects: &[SessionEffect], startup: &[(String, String)]) {
        for e in effects {
            match e {
                SessionEffect::Set { name, sql } => {
                    self.sets.retain(|(n, _)| n != name);
                    self.sets.push((name.clone(), sql.clone()));
                }
                SessionEffect::Reset { name } => {
                    self.sets.retain(|(n, _)| n != name);
                    // A RESET returns to the startup value, as in PostgreSQL.
                    if let Some(s) = startup.iter().find(|(n, _)| n == name) {
                        self.sets.push(s.clone());
                    }
                }
                SessionEffect::ResetAll | SessionEffect::DiscardAll => {
                    self.sets = startup.to_vec();
                }
                _ => {}
            }
        }
        self.rekey();
    }

    fn rekey(&mut self) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.sets.hash(&mut h);
        // 0 means "fresh connection, nothing applied": never use it.
        self.key = h.finish() | 1;
    }

    /// The reset and SETs that give a connection this session's state.
    /// `RESET ALL` leaves the role and session authorization alone;
    /// `SET SESSION AUTHORIZATION DEFAULT` restores both. A `full` reset also
    /// undoes what untracked code (functions, procedures) may have left:
    /// PostgreSQL's `DISCARD ALL` minus the prepared statements signalbox
    /// manages itself.
    fn replay_sql(&self, full: bool) -> String {
        let mut sql = String::from(if full { FULL_RESET } else { BASE_RESET });
        for (_, s) in &self.sets {
            sql.push_str(s);
            sql.push(';');
        }
        sql
    }
}

const BASE_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;";
const FULL_RESET: &str = "CLOSE ALL;SET SESSION AUTHORIZATION DEFAULT;RESET ALL;UNLISTEN *;\
    SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP;";

pub struct Session {
    shared: Arc<Shared>,
    id: u64,
    key: (i32, i32),
    user: String,
    database: String,
    client: ClientIo,
    startup_sets: Vec<(String, String)>,
    state: SessionState,
    pending_effects: Vec<SessionEffect>,
    tx: TxState,
    read_only_tx: bool,
    lease: Option<Lease>,
    pin_reason: Option<&'static str>,
    session_pooling: bool,
    temp_tables: HashSet<String>,
    statements: HashMap<String, Prepared>,
    unnamed: Option<Prepared>,
    batch: Vec<Frame>,
    route_session: Arc<RouteSession>,
    /// Pool handles by node, looked up once per session.
    pools: Vec<Option<crate::cluster::pool::Pool>>,
    application_name: String,
    startup_params: Vec<(String, String)>,
    client_addr: String,
    attributes: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Client(WireError),
    #[error("{0}")]
    Backend(WireError),
}

impl From<RelayError> for SessionError {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::Backend(w) => SessionError::Backend(w),
            RelayError::Client(w) => SessionError::Client(w),
            RelayError::Terminated(_) => SessionError::Backend(WireError::Closed),
        }
    }
}

/// How an exchange lost its server connection.
#[derive(Debug)]
enum Lost {
    /// The connection failed or closed.
    Io(WireError),
    /// The server said why with a FATAL error, then closed.
    Fatal(Frame),
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The settings a client asked for at startup, by name: its startup
/// parameters and the `-c name=value` pairs of `options` (as PostgreSQL
/// reads them).
fn startup_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let mut words = v.split_whitespace();
                while let Some(w) = words.next() {
                    let kv = if w == "-c" {
                        words.next()
                    } else {
                        w.strip_prefix("-c").or_else(|| w.strip_prefix("--"))
                    };
                    if let Some((name, value)) = kv.and_then(|kv| kv.split_once('=')) {
                        out.push((
                            name.replace('-', "_").to_ascii_lowercase(),
                            value.to_owned(),
                        ));
                    }
                }
            }
            name => out.push((name.to_ascii_lowercase(), v.clone())),
        }
    }
    out
}

/// Startup settings as the SETs that recreate them on any connection.
fn startup_sets(params: &[(String, String)]) -> Vec<(String, String)> {
    startup_settings(params)
        .into_iter()
        .map(|(name, value)| {
            let sql = format!("SET {} = {}", quote_ident(&name), quote_literal(&value));
            (name, sql)
        })
        .collect()
}

/// `-c signalbox.zone=eu-1a` (or a `signalbox.zone` startup parameter)
/// becomes the policy-visible session attribute `zone`.
fn attribute_values(params: &[(String, String)]) -> Vec<(String, String)> {
    startup_settings(params)
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("signalbox.").map(|a| (a.to_owned(), v)))
        .collect()
}

impl Session {
    /// Run a session on an accepted connection until the client leaves.
    pub async fn run(
        shared: Arc<Shared>,
        stream: crate::tls::BoxStream,
        peer: String,
        params: Vec<(String, String)>,
        key: (i32, i32),
        id: u64,
        login_deadline: tokio::time::Instant,
    ) {
        let (read, write) = tokio::io::split(stream);
        let client = ClientIo {
            read,
            write,
            rbuf: BytesMut::with_capacity(8 * 1024),
            out: BytesMut::with_capacity(16 * 1024),
            sent: 0,
            limits: super::relay::ClientLimits::from_config(&shared.config.clients),
        };
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = get("user").unwrap_or_default();
        let database = get("database").unwrap_or_else(|| user.clone());
        let application_name = get("application_name").unwrap_or_default();
        let attributes = attribute_values(&params);
        let startup = startup_sets(&params);
        let mut state = SessionState::default();
        state.apply(&[SessionEffect::ResetAll], &startup);
        let session_pooling = shared.config.session_pooling(&user, &database);
        let mut s = Session {
            id,
            key,
            user,
            database,
            client,
            startup_sets: startup,
            state,
            pending_effects: Vec::new(),
            tx: TxState::Idle,
            read_only_tx: false,
            lease: None,
            pin_reason: None,
            session_pooling,
            temp_tables: HashSet::new(),
            statements: HashMap::new(),
            unnamed: None,
            batch: Vec::new(),
            route_session: Arc::default(),
            pools: Vec::new(),
            application_name,
            client_addr: peer,
            attributes,
            startup_params: params.clone(),
            shared,
        };
        s.refresh_route_session();
        if let Err(e) = s.serve(login_deadline).await {
            tracing::debug!(session = s.id, error = %e, "session ended");
        }
        s.shared.cancel.forget(s.key);
        if let Some(lease) = s.lease.take() {
            // A connection mid-transaction cannot be reused.
            if s.tx != TxState::Idle || s.pin_reason.is_some() {
                lease.discard();
            }
        }
    }

    /// Rebuild the policy-visible session when what it says changed (after
    /// most statements nothing did: the clones are not worth repeating).
    fn refresh_route_session(&mut self) {
        let pinned = self.lease.as_ref().map(Lease::node);
        let current = &self.route_session;
        if current.id == self.id
            && current.tx_state == self.tx
            && current.read_only_tx == self.read_only_tx
            && current.pinned == pinned
        {
            return;
        }
        self.route_session = Arc::new(RouteSession {
            id: self.id,
            user: self.user.clone(),
            database: self.database.clone(),
            application_name: self.application_name.clone(),
            client_addr: self.client_addr.clone(),
            attributes: self.attributes.clone(),
            tx_state: self.tx,
            read_only_tx: self.read_only_tx,
            ms_since_last_write: None,
            last_write_lsn: None,
            pinned,
        });
    }

    async fn serve(&mut self, login_deadline: tokio::time::Instant) -> Result<(), SessionError> {
        match tokio::time::timeout_at(login_deadline, self.startup()).await {
            Ok(r) => r?,
            Err(_) => {
                self.fatal("08P01", "canceling authentication due to timeout")
                    .await;
                return Ok(());
            }
        }
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            // Between transactions, a shutdown ends the session the way
            // PostgreSQL's own shutdown does; inside one, it waits.
            let idle = self.tx == TxState::Idle && self.batch.is_empty();
            let next = tokio::select! {
                f = self.client.next() => Some(f),
                _ = shutdown.wait_for(|stop| *stop), if idle => None,
            };
            let Some(next) = next else {
                self.fatal(
                    "57P01",
                    "terminating connection due to administrator command",
                )
                .await;
                return Ok(());
            };
            let frame = match next {
                Ok(f) => f,
                Err(WireError::Closed) => return Ok(()),
                Err(e @ WireError::Protocol(_)) => {
                    self.fatal("08P01", &e.to_string()).await;
                    return Err(SessionError::Client(e));
                }
                Err(e) => return Err(SessionError::Client(e)),
            };
            match frame.tag {
                b'Q' => {
                    let Some(end) = frame.body.iter().position(|&b| b == 0) else {
                        let e = WireError::Protocol("Query without a terminating NUL".into());
                        self.fatal("08P01", &e.to_string()).await;
                        return Err(SessionError::Client(e));
                    };
                    // Bytes that are not UTF-8 go through untouched (the
                    // server judges them by client_encoding) and to the primary.
                    match std::str::from_utf8(&frame.body[..end]) {
                        Ok(sql) => {
                            let sql = sql.to_owned();
                            self.simple_query(frame, &sql, true).await?
                        }
                        Err(_) => {
                            let sql = String::from_utf8_lossy(&frame.body[..end]).into_owned();
                            self.simple_query(frame, &sql, false).await?
                        }
                    }
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    if self.batch.len() >= 10_000 {
                        self.fatal(
                            "08P01",
                            "protocol violation: too many messages without Sync",
                        )
                        .await;
                        return Ok(());
                    }
                    self.batch.push(frame);
                }
                b'H' | b'S' => {
                    self.batch.push(frame);
                    self.run_batch().await?;
                }
                b'X' => return Ok(()),
                // CopyData/Done/Fail outside COPY are ignored, like PostgreSQL does.
                b'd' | b'c' | b'f' => {}
                other => {
                    let msg = format!(
                        "protocol violation: unexpected message type '{}'",
                        other as char
                    );
                    self.fatal("08P01", &msg).await;
                    return Ok(());
                }
            }
        }
    }

    async fn fatal(&mut self, code: &str, message: &str) {
        wire::error_response(&mut self.client.out, "FATAL", code, message);
        let _ = self.client.flush().await;
    }

    async fn error(&mut self, code: &str, message: &str) -> Result<(), SessionError> {
        wire::error_response(&mut self.client.out, "ERROR", code, message);
        let status = self.tx_status();
        wire::ready_for_query(&mut self.client.out, status);
        self.client.flush().await.map_err(SessionError::Client)
    }

    /// Authenticate, report server parameters, issue our cancel key.
    async fn startup(&mut self) -> Result<(), SessionError> {
        if self.shared.config.auth.method == crate::config::AuthMethod::ScramSha256 {
            let password = self
                .shared
                .config
                .password_for(&self.user)
                .map(str::to_owned);
            let verdict = super::auth::scram(&mut self.client, &self.user, password.as_deref())
                .await
                .map_err(SessionError::Client)?;
            if let super::auth::Verdict::Refused(code, msg) = verdict {
                self.fatal(code, &msg).await;
                return Err(SessionError::Client(WireError::Closed));
            }
        }
        let cache_key = (self.user.clone(), self.database.clone());
        let cached = self
            .shared
            .server_params
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
            .cloned();
        let params = match cached {
            Some(p) => p,
            None => {
                let p = self.first_login().await?;
                self.shared
                    .server_params
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cache_key, p.clone());
                p
            }
        };
        self.greet(&params).await
    }

    /// The first session of a (user, database) logs in to a node for real:
    /// PostgreSQL checks the user and database and reports its parameters.
    async fn first_login(&mut self) -> Result<Vec<(String, String)>, SessionError> {
        let view = self.shared.cluster.view();
        let node = view.primary().or_else(|| {
            view.states
                .iter()
                .position(|s| s.healthy)
                .map(|i| i as NodeId)
        });
        let Some(node) = node else {
            self.fatal("57P03", "signalbox: no healthy node to serve this session")
                .await;
            return Err(SessionError::Backend(WireError::Closed));
        };
        let lease = match self.checkout(node).await {
            Ok(l) => l,
            Err((code, msg)) => {
                self.fatal(&code, &msg).await;
                return Err(SessionError::Backend(WireError::Closed));
            }
        };
        let mut lease = lease;
        Ok(lease.conn().params().to_vec())
    }

    async fn greet(&mut self, params: &[(String, String)]) -> Result<(), SessionError> {
        let out = &mut self.client.out;
        wire::auth_ok(out);
        for (name, value) in params {
            // What the client asked for at startup is what PostgreSQL would report.
            let asked = self
                .startup_params
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            wire::parameter_status(out, name, asked.unwrap_or(value));
        }
        wire::backend_key_data(out, self.key.0, self.key.1);
        wire::ready_for_query(out, b'I');
        self.client.flush().await.map_err(SessionError::Client)
    }

    async fn checkout(&mut self, node: NodeId) -> Result<Lease, (String, String)> {
        let i = node as usize;
        if self.pools.len() <= i {
            self.pools.resize(i + 1, None);
        }
        if self.pools[i].is_none() {
            self.pools[i] = Some(self.new_pool(node));
        }
        let pool = self.pools[i].clone().expect("just filled");
        self.shared
            .cluster
            .pools
            .checkout_from(&pool, node)
            .await
            .map_err(|e| (e.sqlstate().to_owned(), format!("signalbox: {e}")))
    }

    fn new_pool(&self, node: NodeId) -> crate::cluster::pool::Pool {
        let password = self
            .shared
            .config
            .password_for(&self.user)
            .map(str::to_owned)
            .or_else(|| {
                let a = &self.shared.cluster.addrs[node as usize];
                (a.user == self.user).then(|| a.password.clone()).flatten()
            });
        self.shared
            .cluster
            .pools
            .pool(node, &self.user, password.as_deref(), &self.database)
    }

    /// Make the leased connection carry this session's state (and nothing
    /// a previous client left on it).
    async fn sync_state(&mut self) -> Result<Option<(String, String)>, SessionError> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(None);
        };
        let conn = lease.conn();
        if conn.state_key == self.state.key && !conn.needs_reset {
            return Ok(None);
        }
        let sql = self.state.replay_sql(conn.needs_reset);
        let failed = conn
            .execute_silently(&sql)
            .await
            .map_err(SessionError::Backend)?;
        if failed.is_none() {
            conn.state_key = self.state.key;
            conn.needs_reset = false;
        }
        Ok(failed)
    }

    /// Decide where a statement runs and hold a connection there.
    /// `Ok(false)` means an error was already sent to the client.
    async fn acquire(&mut self, class: &Classified, sql: &Arc<str>) -> Result<bool, SessionError> {
        if self.lease.is_some() {
            return Ok(true);
        }
        let mut read_only = class.read_only;
        if class.tables.iter().any(|t| self.temp_tables.contains(t)) {
            read_only = false;
        }
        if self.pin_reason.is_some() || self.session_pooling {
            // One connection for the rest of the session: it must be the primary's.
            read_only = false;
        }
        let statement = Statement {
            kind: class.kind,
            read_only,
            fingerprint: 0,
            sql: sql.clone(),
            tables: class.tables.clone(),
            functions: class.functions.clone(),
            hints: class.hints.clone(),
        };
        let input = RouteInput {
            statement: Arc::new(statement),
            session: self.route_session.clone(),
            cluster: self.shared.cluster.view(),
        };
        let routing = self.shared.router.route(&input);
        let node = match routing.enforced.routed {
            Routed::Node(n) => n,
            Routed::Reject(msg) => {
                self.shared.metrics.rejected();
                self.error(
                    "42501",
                    &format!("signalbox: statement rejected by routing policy: {msg}"),
                )
                .await?;
                return Ok(false);
            }
            Routed::Unavailable(msg) => {
                self.error("57P03", &format!("signalbox: {msg}")).await?;
                return Ok(false);
            }
        };
        let mut checked_out = self.checkout(node).await;
        if checked_out.is_err() && read_only && self.tx == TxState::Idle {
            // A read outside a transaction may run anywhere else that is
            // eligible: another healthy replica, else the primary.
            if let Some(other) = self.other_node_for_read(&input, node) {
                tracing::debug!(failed = node, retry = other, "read retried on another node");
                checked_out = self.checkout(other).await;
            }
        }
        match checked_out {
            Ok(lease) => {
                let node = lease.node();
                self.shared.cancel.set(self.key, lease.addr(), lease.key());
                self.lease = Some(lease);
                self.shared.metrics.routed(node, read_only);
            }
            Err((code, msg)) => {
                self.error(&code, &msg).await?;
                return Ok(false);
            }
        }
        if let Some((code, msg)) = self.sync_state().await? {
            self.release(true);
            self.error(
                &code,
                &format!("signalbox: cannot restore session settings: {msg}"),
            )
            .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// For a read whose node failed: the built-in choice among the other
    /// healthy replicas, else a healthy primary.
    fn other_node_for_read(&self, input: &RouteInput, failed: NodeId) -> Option<NodeId> {
        let mut view = (*input.cluster).clone();
        if let Some(s) = view.states.get_mut(failed as usize) {
            s.healthy = false;
        }
        crate::route::builtin::choose_replica(&view, fastrand::u64(..))
            .or_else(|| view.primary().filter(|p| *p != failed))
    }

    /// After an exchange: keep or return the connection, track transactions
    /// and session state.
    fn finish(&mut self, outcome: &Outcome, effects: Vec<SessionEffect>, class_begins_ro: bool) {
        let Some(status) = outcome.status else {
            return; // Flush without Sync: the exchange continues.
        };
        let before = self.tx;
        self.tx = match status {
            b'T' => TxState::InTransaction,
            b'E' => TxState::Failed,
            _ => TxState::Idle,
        };
        if before == TxState::Idle && self.tx != TxState::Idle {
            self.read_only_tx = class_begins_ro;
        }
        let mut effects = effects;
        if outcome.error {
            effects.clear();
            if self.tx == TxState::Idle {
                self.pending_effects.clear();
            }
        }
        let mut new_state = None;
        if self.tx == TxState::Idle {
            // A transaction that ended in ROLLBACK undoes its SETs, including
            // those sent in the same message as the ROLLBACK.
            let committed = outcome.last_tag.as_deref() != Some("ROLLBACK");
            let mut all = std::mem::take(&mut self.pending_effects);
            all.extend(effects);
            if !committed {
                all.clear();
            }
            new_state = Some(all);
        } else {
            self.pending_effects.extend(effects);
        }
        if let Some(all) = new_state {
            for e in &all {
                match e {
                    SessionEffect::Pin(reason) => self.pin_reason = Some(reason),
                    SessionEffect::TempTable(t) => {
                        self.temp_tables.insert(t.clone());
                        self.pin_reason = Some("temporary table");
                    }
                    _ => {}
                }
            }
            let before = self.state.key;
            self.state.apply(&all, &self.startup_sets);
            if let Some(l) = self.lease.as_mut() {
                // The connection ran the SETs itself.
                if l.conn().state_key == before {
                    l.conn().state_key = self.state.key;
                }
            }
        }
        if self.tx == TxState::Idle {
            self.read_only_tx = false;
            if self.pin_reason.is_none() && !self.session_pooling {
                self.release(false);
            }
        }
        self.refresh_route_session();
    }

    fn release(&mut self, discard: bool) {
        if let Some(lease) = self.lease.take() {
            self.shared.cancel.clear(self.key);
            if discard {
                lease.discard();
            }
        }
    }

    /// `utf8`: the text is what the client sent; otherwise it was not UTF-8
    /// and `sql` is a lossy copy, good for nothing but the primary.
    async fn simple_query(
        &mut self,
        frame: Frame,
        sql: &str,
        utf8: bool,
    ) -> Result<(), SessionError> {
        let mut class = self.shared.classifier.classify(sql);
        if !utf8 {
            let mut c = (*class).clone();
            c.read_only = false;
            class = Arc::new(c);
        }
        if let Some(db) = &class.drops_database {
            // Our idle connections must not block DROP DATABASE.
            self.shared.cluster.pools.drop_idle(|_, d| d == db);
        }
        if self.answer_locally(&class).await? {
            return Ok(());
        }
        let sql: Arc<str> = Arc::from(sql);
        let bytes = frame_bytes(&frame);
        self.run_routed(&class, &sql, Work::Query(&bytes)).await
    }

    /// Route `class`, hold a connection, send `work` and relay the answers.
    /// A read outside a transaction whose connection fails before any byte
    /// reached the client is tried once more (a fresh connection, or another
    /// node); anything else that loses its connection is reported.
    async fn run_routed(
        &mut self,
        class: &Classified,
        sql: &Arc<str>,
        work: Work<'_>,
    ) -> Result<(), SessionError> {
        for attempt in 0..2 {
            let retriable = attempt == 0 && self.lease.is_none() && self.tx == TxState::Idle;
            if !self.acquire(class, sql).await? {
                // The error went out; the rest of the work is dropped.
                return Ok(());
            }
            let read_only = self.lease_is_read_only(class);
            // A batch is rewritten for each connection it lands on.
            let translated = match work {
                Work::Query(bytes) => Translated {
                    bytes: BytesMut::new(),
                    plan: VecDeque::from([Step::Query]),
                    slots: Vec::new(),
                    raw: Some(bytes),
                },
                Work::Batch(frames) => match self.translate(frames) {
                    Ok(t) => t,
                    Err(e) => {
                        self.fatal("08P01", &e.to_string()).await;
                        return Err(SessionError::Client(e));
                    }
                },
            };
            let Translated {
                bytes,
                mut plan,
                slots,
                raw,
            } = translated;
            let mark = self.client.sent;
            match self.exchange(raw.unwrap_or(&bytes), &mut plan).await? {
                Ok(outcome) => {
                    if let Some(lease) = self.lease.as_mut() {
                        for slot in &outcome.failed_parses {
                            if let Some(Some(name)) = slots.get(*slot as usize) {
                                lease.conn().prepared.remove(name);
                            }
                        }
                    }
                    self.after_exchange(class, &outcome);
                    self.finish(&outcome, class.effects.clone(), class.begins_read_only);
                    return Ok(());
                }
                Err(e) if retriable && read_only && !self.client.progressed_since(mark) => {
                    tracing::debug!(error = ?e, "read retried on a fresh connection");
                }
                Err(e) => return self.lost_backend(e).await,
            }
        }
        Ok(())
    }

    /// Whether the statement was routed as a read (so a retry is harmless).
    fn lease_is_read_only(&self, class: &Classified) -> bool {
        class.read_only && self.pin_reason.is_none() && !self.session_pooling
    }

    /// What a statement did to the connection beyond its result.
    fn after_exchange(&mut self, class: &Classified, outcome: &Outcome) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let conn = lease.conn();
        // Untracked changes, or tracked ones that may have half-applied.
        if class.touches_session || (outcome.error && !class.effects.is_empty()) {
            conn.needs_reset = true;
        }
        for e in &class.effects {
            match e {
                // The server dropped every statement, ours included (and
                // DISCARD ALL its settings too).
                SessionEffect::Deallocate(None) | SessionEffect::DiscardAll => {
                    conn.prepared.clear();
                    if matches!(e, SessionEffect::DiscardAll) {
                        conn.state_key = 0;
                    }
                    if !outcome.error {
                        self.statements.clear();
                        self.unnamed = None;
                    }
                }
                _ => {}
            }
        }
    }

    /// `DEALLOCATE` of the client's own protocol-level statements, and
    /// `DEALLOCATE ALL` / `DISCARD ALL` of a session that holds no connection,
    /// concern this client alone: answer them here, as PostgreSQL would,
    /// without touching a shared connection. Returns whether it answered.
    async fn answer_locally(&mut self, class: &Classified) -> Result<bool, SessionError> {
        if class.statements != 1 || self.tx == TxState::Failed {
            return Ok(false);
        }
        let holds_connection = self.lease.is_some();
        let tag = match class.effects.first() {
            Some(SessionEffect::Deallocate(Some(name))) if self.statements.contains_key(name) => {
                self.statements.remove(name);
                "DEALLOCATE"
            }
            Some(SessionEffect::Deallocate(None)) if !holds_connection => {
                self.statements.clear();
                self.unnamed = None;
                "DEALLOCATE ALL"
            }
            Some(SessionEffect::DiscardAll) if !holds_connection && self.tx == TxState::Idle => {
                self.statements.clear();
                self.unnamed = None;
                self.pending_effects.clear();
                self.state
                    .apply(&[SessionEffect::DiscardAll], &self.startup_sets);
                "DISCARD ALL"
            }
            _ => return Ok(false),
        };
        wire::command_complete(&mut self.client.out, tag);
        let status = self.tx_status();
        wire::ready_for_query(&mut self.client.out, status);
        self.client.flush().await.map_err(SessionError::Client)?;
        Ok(true)
    }

    fn tx_status(&self) -> u8 {
        match self.tx {
            TxState::Idle => b'I',
            TxState::InTransaction => b'T',
            TxState::Failed => b'E',
        }
    }

    /// Send `bytes` on the leased connection and relay the answers. A failed
    /// node connection is discarded and returned as the inner error, for the
    /// caller to retry or report.
    async fn exchange(
        &mut self,
        bytes: &[u8],
        plan: &mut VecDeque<Step>,
    ) -> Result<Result<Outcome, Lost>, SessionError> {
        let started = Instant::now();
        let lease = self.lease.as_mut().expect("exchange needs a lease");
        let conn = lease.conn();
        let result = match conn.send_frames(bytes).await {
            Ok(()) => relay::relay(conn, &mut self.client, plan).await,
            Err(e) => Err(RelayError::Backend(e)),
        };
        self.shared.metrics.latency(started.elapsed());
        match result {
            Ok(o) => Ok(Ok(o)),
            Err(RelayError::Backend(e)) => {
                self.release(true);
                Ok(Err(Lost::Io(e)))
            }
            Err(RelayError::Terminated(frame)) => {
                self.release(true);
                Ok(Err(Lost::Fatal(frame)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Tell the client its node connection was lost (the transaction, if
    /// any, is gone with it). A server that ended the connection with a
    /// FATAL error ends the session the same way, as PostgreSQL would: its
    /// error is forwarded and the client connection closed, so drivers'
    /// pools discard it.
    async fn lost_backend(&mut self, lost: Lost) -> Result<(), SessionError> {
        let e = match lost {
            Lost::Io(e) => e,
            Lost::Fatal(frame) => {
                frame.encode_into(&mut self.client.out);
                let _ = self.client.flush().await;
                return Err(SessionError::Backend(WireError::Closed));
            }
        };
        let was = self.tx;
        self.tx = TxState::Idle;
        self.pending_effects.clear();
        let msg = if was == TxState::Idle {
            format!("signalbox: lost the connection to the node: {e}")
        } else {
            format!("signalbox: lost the connection to the node during a transaction (it was rolled back): {e}")
        };
        self.refresh_route_session();
        self.error("08006", &msg).await
    }

    /// Route and run the extended-protocol messages received up to Sync/Flush.
    async fn run_batch(&mut self) -> Result<(), SessionError> {
        let batch = std::mem::take(&mut self.batch);
        // Register statements and classify what this batch prepares/executes.
        let mut classes: Vec<Arc<Classified>> = Vec::new();
        let mut first_sql: Option<Arc<str>> = None;
        let mut effects = Vec::new();
        for f in &batch {
            match f.tag {
                b'P' => {
                    let mut fields = Fields::new(&f.body);
                    let (name, sql) = match (fields.cstr(), fields.cstr()) {
                        (Ok(n), Ok(s)) => (n.to_owned(), s.to_owned()),
                        _ => {
                            self.fatal("08P01", "protocol violation: malformed Parse")
                                .await;
                            return Err(SessionError::Client(WireError::Protocol(
                                "malformed Parse".into(),
                            )));
                        }
                    };
                    let types = Bytes::copy_from_slice(fields.rest());
                    let class = self.shared.classifier.classify(&sql);
                    let p = Prepared {
                        server_name: if name.is_empty() {
                            String::new()
                        } else {
                            server_name(&sql, &types)
                        },
                        sql: Arc::from(sql.as_str()),
                        param_types: types,
                        class: class.clone(),
                    };
                    first_sql.get_or_insert_with(|| p.sql.clone());
                    classes.push(class);
                    if name.is_empty() {
                        self.unnamed = Some(p);
                    } else {
                        self.statements.insert(name, p);
                    }
                }
                b'B' => {
                    let mut fields = Fields::new(&f.body);
                    let _portal = fields.cstr();
                    if let Ok(stmt) = fields.cstr() {
                        let p = if stmt.is_empty() {
                            self.unnamed.as_ref()
                        } else {
                            self.statements.get(stmt)
                        };
                        if let Some(p) = p {
                            first_sql.get_or_insert_with(|| p.sql.clone());
                            classes.push(p.class.clone());
                            effects.extend(p.class.effects.iter().cloned());
                        }
                    }
                }
                _ => {}
            }
        }
        let mut merged = merge(&classes);
        merged.effects = effects;
        let sql = first_sql.unwrap_or_else(|| Arc::from(""));
        self.run_routed(&merged, &sql, Work::Batch(&batch)).await
    }

    /// Rewrite a batch for the leased connection: map statement names,
    /// re-prepare what the connection lacks, answer what it already has.
    fn translate(&mut self, batch: &[Frame]) -> Result<Translated<'static>, WireError> {
        let mut out = BytesMut::new();
        let mut plan = VecDeque::new();
        // Server names this batch prepares, by Parse slot.
        let mut slots: Vec<Option<String>> = Vec::new();
        let mut parse = |plan: &mut VecDeque<Step>, forward: bool, name: Option<String>| {
            plan.push_back(Step::Parse {
                forward,
                slot: slots.len() as u32,
            });
            slots.push(name);
        };
        let lease = self.lease.as_mut().expect("translate needs a lease");
        let conn = lease.conn();
        let mut unnamed_parsed = false;
        for f in batch {
            match f.tag {
                b'P' => {
                    let mut fields = Fields::new(&f.body);
                    let name = fields.cstr()?;
                    if name.is_empty() {
                        unnamed_parsed = true;
                        f.encode_into(&mut out);
                        parse(&mut plan, true, None);
                    } else if let Some(p) = self.statements.get(name) {
                        if conn.prepared.contains(&p.server_name) {
                            plan.push_back(Step::SynthParse);
                        } else {
                            wire::parse(&mut out, &p.server_name, &p.sql, &p.param_types);
                            conn.prepared.insert(p.server_name.clone());
                            parse(&mut plan, true, Some(p.server_name.clone()));
                        }
                    }
                }
                b'B' | b'D' => {
                    let mut fields = Fields::new(&f.body);
                    let (is_bind, kind, stmt) = if f.tag == b'B' {
                        let _portal = fields.cstr()?;
                        (true, b'S', fields.cstr()?)
                    } else {
                        let kind = fields.u8()?;
                        (false, kind, fields.cstr()?)
                    };
                    let target = if kind != b'S' {
                        None
                    } else if stmt.is_empty() {
                        if !unnamed_parsed {
                            if let Some(p) = &self.unnamed {
                                wire::parse(&mut out, "", &p.sql, &p.param_types);
                                parse(&mut plan, false, None);
                                unnamed_parsed = true;
                            }
                        }
                        None
                    } else {
                        self.statements.get(stmt).map(|p| {
                            if !conn.prepared.contains(&p.server_name) {
                                wire::parse(&mut out, &p.server_name, &p.sql, &p.param_types);
                                conn.prepared.insert(p.server_name.clone());
                                parse(&mut plan, false, Some(p.server_name.clone()));
                            }
                            p.server_name.clone()
                        })
                    };
                    match (is_bind, target) {
                        (true, Some(server)) => wire::bind_renamed(&mut out, &f.body, &server)?,
                        (false, Some(server)) => wire::describe(&mut out, b'S', &server),
                        _ => f.encode_into(&mut out),
                    }
                    plan.push_back(match (is_bind, kind) {
                        (true, _) => Step::Bind,
                        (false, b'S') => Step::DescribeStatement,
                        _ => Step::DescribePortal,
                    });
                }
                b'C' => {
                    let mut fields = Fields::new(&f.body);
                    let kind = fields.u8()?;
                    let name = fields.cstr()?;
                    if kind == b'S' && !name.is_empty() {
                        // Server statements are shared by SQL text: keep it
                        // prepared for others, just forget the client's name.
                        self.statements.remove(name);
                        plan.push_back(Step::SynthClose);
                    } else {
                        f.encode_into(&mut out);
                        plan.push_back(Step::Close);
                    }
                }
                b'E' => {
                    f.encode_into(&mut out);
                    plan.push_back(Step::Execute);
                }
                b'S' => {
                    f.encode_into(&mut out);
                    plan.push_back(Step::Sync);
                }
                b'H' => f.encode_into(&mut out),
                _ => {}
            }
        }
        Ok(Translated {
            bytes: out,
            plan,
            slots,
            raw: None,
        })
    }
}

fn frame_bytes(f: &Frame) -> BytesMut {
    let mut b = BytesMut::with_capacity(f.body.len() + 5);
    f.encode_into(&mut b);
    b
}

/// Server-side statement name: the same SQL and parameter types share one
/// prepared statement per backend connection, whichever client prepared it.
fn server_name(sql: &str, types: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut h);
    types.hash(&mut h);
    format!("sb_{:016x}", h.finish())
}

/// The verdict for a batch: read-only only if every statement is.
fn merge(classes: &[Arc<Classified>]) -> Classified {
    let mut it = classes.iter();
    let Some(first) = it.next() else {
        // Describe/Close/Sync only: harmless anywhere.
        return Classified::nothing();
    };
    let mut m = (**first).clone();
    for c in it {
        m.read_only &= c.read_only;
        m.touches_session |= c.touches_session;
        m.begins_read_only &= c.begins_read_only;
        m.tables.extend(c.tables.iter().cloned());
        m.functions.extend(c.functions.iter().cloned());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn startup_settings_expand_options() {
        let p = pairs(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "web"),
            (
                "options",
                "-c search_path=app -csignalbox.zone=eu-1a --statement-timeout=5s",
            ),
        ]);
        assert_eq!(
            startup_settings(&p),
            pairs(&[
                ("application_name", "web"),
                ("search_path", "app"),
                ("signalbox.zone", "eu-1a"),
                ("statement_timeout", "5s"),
            ])
        );
        assert_eq!(attribute_values(&p), pairs(&[("zone", "eu-1a")]));
        assert_eq!(startup_sets(&p)[1].1, "SET \"search_path\" = 'app'");
        assert_eq!(
            startup_sets(&pairs(&[("application_name", "it's")]))[0].1,
            "SET \"application_name\" = 'it''s'"
        );
    }
}
