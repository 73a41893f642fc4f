//! One client session: startup, then every statement classified, routed
//! through the policy and the guardrails, and run on a pooled backend
//! connection (transaction pooling by default).
//!
//! - this file: the session, its serve loop and how each message is handled;
//! - `login`: authentication and the greeting;
//! - `exchange`: holding a connection, replaying state, sending, retrying;
//! - `super::state`, `super::statements`: session settings and prepared
//!   statements, pure and table-tested.

mod exchange;
mod login;
mod ryw;

pub use ryw::{format_lsn, parse_lsn};
mod trace;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::encoding::ClientEncoding;
use super::message::{Kind, Message};
use super::relay::{ClientIo, RelayError};
use super::state::{attribute_values, startup_sets, SessionState};
use super::statements::{Change, Prepared, Refusal, Statements, Uses};
use super::Shared;
use crate::cluster::pool::Lease;
use crate::route::{Session as RouteSession, TxState};
use crate::sql::classify::{Classified, SessionEffect};
use crate::wire::{self, Frame, WireError};

use exchange::Work;

pub struct Session {
    shared: Arc<Shared>,
    /// The configuration and cluster this session works under: taken up
    /// again whenever it holds no connection (see [`crate::live`]).
    live: Arc<crate::live::Live>,
    /// Where a cancel request for this session goes now.
    cancel: Arc<super::CancelTarget>,
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
    statements: Statements,
    /// What the batch in hand changed in `statements`, until its answers
    /// show which of its messages ran.
    changes: Vec<Change>,
    /// The messages of the batch in hand at which the server failed, in
    /// order, once an answer to it came (`batch_answered`).
    failed_messages: Vec<usize>,
    batch_answered: bool,
    /// The Parses of the batch in hand that fail, and how.
    refused: Vec<(usize, Refusal)>,
    batch: Vec<Message>,
    /// An error ended an exchange that had no Sync: the server now ignores
    /// every message up to the next Sync, and so does signalbox (no reply
    /// is owed for them).
    skipping: bool,
    /// The work in hand ends with Sync or is a simple Query: a
    /// ReadyForQuery is owed when it is done.
    owes_ready: bool,
    /// DDL ran: refresh the catalog facts once its transaction is over.
    catalog_dirty: bool,
    /// Session mode, running a read on a pooled replica connection while
    /// the session's own connection waits.
    offloading: bool,
    /// The session's own connection while a read is offloaded; taken back
    /// for the read when the read is routed to its node after all.
    parked: Option<Lease>,
    /// Read-your-writes: the open transaction wrote.
    tx_wrote: bool,
    /// Read-your-writes: this session's last committed write position.
    own_write: Option<(u64, std::time::Instant)>,
    /// Read-your-writes: keys of the shared scopes it writes under.
    ryw_keys: Vec<String>,
    /// Read-your-writes: a position the client presented
    /// (`SET signalbox.min_lsn`), and when.
    min_lsn: Option<(u64, std::time::Instant)>,
    /// Read-your-writes: the `min_lsn` hint of the statement being routed.
    statement_lsn: Option<(u64, std::time::Instant)>,
    /// `SET signalbox.trace = on`: a NOTICE per routed statement.
    trace: bool,
    /// Session mode: code ran that may have set state signalbox cannot
    /// see (a function, procedure or DO block): no more reads elsewhere.
    untracked_state: bool,
    route_session: Arc<RouteSession>,
    /// The policy-visible statement: one allocation per session, refilled
    /// for each statement routed.
    route_statement: Arc<crate::route::Statement>,
    /// Pool handles by node, looked up once per session.
    pools: Vec<Option<crate::cluster::pool::Pool>>,
    application_name: String,
    startup_params: Vec<(String, String)>,
    client_addr: String,
    attributes: Vec<(String, String)>,
    /// The client connection is TLS (channel binding can be offered).
    tls: bool,
    /// The session's `client_encoding`, as the server last reported it.
    encoding: ClientEncoding,
    /// The one asked for at startup (what `RESET ALL`/`DISCARD ALL` restore).
    startup_encoding: ClientEncoding,
}

/// What ended the serve loop's wait.
enum Wake {
    Client(Result<Frame, WireError>),
    Shutdown,
    Backend(Result<(), WireError>),
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

/// A client connection past its startup packet.
pub struct Accepted {
    pub stream: crate::tls::BoxStream,
    pub peer: String,
    pub params: Vec<(String, String)>,
    /// The connection is TLS.
    pub tls: bool,
    /// The cancel key issued to it (session mode replaces it with the
    /// server's own).
    pub key: (i32, i32),
    pub id: u64,
    pub login_deadline: tokio::time::Instant,
}

impl Session {
    /// Run a session on an accepted connection until the client leaves.
    pub async fn run(shared: Arc<Shared>, accepted: Accepted) {
        let Accepted {
            stream,
            peer,
            params,
            tls,
            key,
            id,
            login_deadline,
        } = accepted;
        let live = shared.live();
        let client = ClientIo::new(
            stream,
            super::relay::ClientLimits::from_config(
                &live.config.clients,
                shared.message_budget.clone(),
            ),
        );
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let user = get("user").unwrap_or_default();
        let database = get("database").unwrap_or_else(|| user.clone());
        let application_name = get("application_name").unwrap_or_default();
        let attributes = attribute_values(&params);
        let startup = startup_sets(&params);
        let state = SessionState::new(&startup);
        let session_pooling = live.config.session_pooling(&user, &database);
        let statements = Statements::new(live.config.clients.statement_memory_mb << 20);
        let cancel = Arc::new(super::CancelTarget::default());
        shared.cancel.register(key, cancel.clone());
        let mut s = Session {
            live,
            cancel,
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
            statements,
            changes: Vec::new(),
            failed_messages: Vec::new(),
            batch_answered: false,
            refused: Vec::new(),
            batch: Vec::new(),
            skipping: false,
            owes_ready: true,
            catalog_dirty: false,
            offloading: false,
            parked: None,
            tx_wrote: false,
            own_write: None,
            ryw_keys: Vec::new(),
            min_lsn: None,
            statement_lsn: None,
            trace: false,
            untracked_state: false,
            route_session: Arc::default(),
            route_statement: Arc::new(crate::route::Statement::new(
                crate::route::StatementKind::Utility,
                false,
                "",
            )),
            pools: Vec::new(),
            application_name,
            client_addr: peer,
            attributes,
            tls,
            encoding: super::encoding::UTF8,
            startup_encoding: super::encoding::UTF8,
            startup_params: params.clone(),
            shared,
        };
        // A standby refuses serializable transactions: a session that
        // starts with them by default keeps a primary connection.
        let isolation =
            super::state::startup_value(&s.startup_params, "default_transaction_isolation");
        if isolation.is_some_and(|v| v.eq_ignore_ascii_case("serializable")) {
            s.pin_reason = Some("serializable default isolation");
        }
        s.ryw_keys = s.scope_keys();
        s.refresh_route_session();
        match s.serve(login_deadline).await {
            Err(SessionError::Client(e @ WireError::Stalled(_))) => {
                s.shared
                    .metrics
                    .stalled_clients
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(session = s.id, peer = %s.client_addr, error = %e, "client disconnected and its statement cancelled");
            }
            Err(e) => tracing::debug!(session = s.id, error = %e, "session ended"),
            Ok(()) => {}
        }
        s.shared.cancel.forget(s.key);
        let cancelling = s.cancel.clear();
        if let Some(lease) = s.lease.take() {
            // A connection mid-transaction cannot be reused, nor one whose
            // real cancel key a session-mode client was told, nor one a
            // cancel of this session may still reach.
            if s.tx != TxState::Idle || s.pin_reason.is_some() || s.session_pooling || cancelling {
                lease.discard();
            }
        }
        if let Some(own) = s.parked.take() {
            own.discard();
        }
    }

    /// Rebuild the policy-visible session when what it says changed (after
    /// most statements nothing did: the clones are not worth repeating).
    fn refresh_route_session(&mut self) {
        let pinned = self.lease.as_ref().map(Lease::node);
        let written = self.write_position();
        let last_write_lsn = written.map(|(lsn, _)| lsn);
        let ms_since_last_write = written.map(|(_, at)| at.elapsed().as_millis() as u64);
        let current = &self.route_session;
        if current.id == self.id
            && current.tx_state == self.tx
            && current.read_only_tx == self.read_only_tx
            && current.pinned == pinned
            && current.last_write_lsn == last_write_lsn
            && current.ms_since_last_write == ms_since_last_write
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
            ms_since_last_write,
            last_write_lsn,
            pinned,
        });
    }

    async fn serve(&mut self, login_deadline: tokio::time::Instant) -> Result<(), SessionError> {
        match tokio::time::timeout_at(login_deadline, Box::pin(self.startup())).await {
            Ok(r) => r?,
            Err(_) => {
                self.fatal("08P01", "canceling authentication due to timeout")
                    .await;
                return Ok(());
            }
        }
        Box::pin(self.load_catalog()).await;
        let stop = self.shared.stop_signal(self.id);
        // The statement paths are boxed: the future of an idle session
        // then holds only this loop's state, not the largest of theirs.
        loop {
            // Between transactions, a shutdown ends the session the way
            // PostgreSQL's own shutdown does; inside one, it waits. A held
            // server connection (a transaction, a pinned or session-mode
            // client) is watched too: what it says while the client is idle
            // (notifications, its death) reaches the client at once.
            let idle = self.tx == TxState::Idle && self.batch.is_empty();
            if self.batch.is_empty() {
                // Every message read so far has been run or dropped.
                self.client.release_held();
                if let Some(slot) = Arc::get_mut(&mut self.route_statement) {
                    // An idle session keeps nothing of its last statement.
                    slot.forget();
                }
            }
            // What the held connection sent along with its last answer
            // (a notification of the client's own NOTIFY) goes out first.
            if self.lease.as_mut().is_some_and(|l| l.conn().has_buffered()) {
                Box::pin(self.backend_spoke(Ok(()))).await?;
            }
            let wake = {
                let held = self.lease.as_mut().map(Lease::conn);
                let watch = held.is_some();
                let backend = async move {
                    match held {
                        Some(conn) => conn.fill().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    f = self.client.next() => Wake::Client(f),
                    _ = stop.stopped(), if idle => Wake::Shutdown,
                    r = backend, if watch => Wake::Backend(r),
                }
            };
            let next = match wake {
                Wake::Client(f) => f,
                Wake::Shutdown => {
                    self.fatal(
                        "57P01",
                        "terminating connection due to administrator command",
                    )
                    .await;
                    return Ok(());
                }
                Wake::Backend(r) => {
                    Box::pin(self.backend_spoke(r)).await?;
                    continue;
                }
            };
            let frame = match next {
                Ok(f) => f,
                Err(WireError::Closed) => return Ok(()),
                Err(e @ WireError::Protocol(_)) => {
                    self.fatal("08P01", &e.to_string()).await;
                    return Err(SessionError::Client(e));
                }
                Err(e @ WireError::OutOfMemory(_)) => {
                    self.fatal("53200", &e.to_string()).await;
                    return Err(SessionError::Client(e));
                }
                Err(e) => return Err(SessionError::Client(e)),
            };
            let msg = match Message::decode(frame) {
                Ok(m) => m,
                Err(e) => {
                    self.fatal("08P01", &e.to_string()).await;
                    return Err(SessionError::Client(e));
                }
            };
            if self.skipping && !matches!(msg.kind, Kind::Sync | Kind::Terminate) {
                // Discarded up to the Sync, simple queries included, as the
                // server discards them.
                continue;
            }
            match msg.kind {
                Kind::Query => {
                    // The bytes go through untouched (the server reads them
                    // in the client encoding); the classifier reads UTF-8.
                    let (sql, readable) = self.readable(msg.query_text());
                    Box::pin(self.simple_query(&msg.frame, &sql, readable)).await?
                }
                Kind::Parse { .. }
                | Kind::Bind { .. }
                | Kind::Describe { .. }
                | Kind::Execute { .. }
                | Kind::Close { .. } => {
                    if self.batch.len() >= 10_000 {
                        self.fatal(
                            "08P01",
                            "protocol violation: too many messages without Sync",
                        )
                        .await;
                        return Ok(());
                    }
                    if self.batch.capacity() == 0 {
                        self.batch = exchange::Scratch::batch_vec();
                    }
                    self.batch.push(msg);
                }
                Kind::Flush | Kind::Sync => {
                    if self.batch.capacity() == 0 {
                        self.batch = exchange::Scratch::batch_vec();
                    }
                    self.batch.push(msg);
                    Box::pin(self.run_batch()).await?;
                }
                Kind::Terminate => return Ok(()),
                // CopyData/Done/Fail outside COPY are ignored, like PostgreSQL does.
                Kind::Copy => {}
                Kind::Other => {
                    let msg = format!(
                        "protocol violation: unexpected message type '{}'",
                        msg.frame.tag as char
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

    /// An error of signalbox's own for the work in hand. Work that ends in
    /// Sync (or a simple Query) gets its ReadyForQuery; a Flush-ended batch
    /// does not, and the session then skips to the client's Sync, as the
    /// server would have.
    async fn error(&mut self, code: &str, message: &str) -> Result<(), SessionError> {
        wire::error_response(&mut self.client.out, "ERROR", code, message);
        if self.owes_ready {
            let status = self.tx_status();
            wire::ready_for_query(&mut self.client.out, status);
        } else {
            self.skipping = true;
        }
        self.client.flush().await.map_err(SessionError::Client)
    }

    fn tx_status(&self) -> u8 {
        match self.tx {
            TxState::Idle => b'I',
            TxState::InTransaction => b'T',
            TxState::Failed => b'E',
        }
    }

    /// Statement text in the client encoding as UTF-8, and whether it could
    /// be read; if not, the text is a lossy copy, good for nothing but the
    /// primary.
    fn readable<'a>(&self, text: &'a [u8]) -> (std::borrow::Cow<'a, str>, bool) {
        match self.encoding.decode(text) {
            Some(sql) => (sql, true),
            None => (String::from_utf8_lossy(text), false),
        }
    }

    /// Classify statement text; text that could not be read is never
    /// judged read-only.
    fn classify(&self, sql: &str, readable: bool) -> Arc<Classified> {
        let class = self.shared.classifier.classify(sql);
        if readable || (!class.read_only && !class.facts.catalog_candidate) {
            return class;
        }
        let mut c = (*class).clone();
        c.read_only = false;
        c.facts.catalog_candidate = false;
        Arc::new(c)
    }

    async fn simple_query(
        &mut self,
        frame: &Frame,
        sql: &str,
        readable: bool,
    ) -> Result<(), SessionError> {
        self.owes_ready = true;
        // As in PostgreSQL, a simple query ends the unnamed statement.
        self.statements.forget("");
        let class = self.classify(sql, readable);
        self.free_database(&class);
        if self.answer_locally(&class).await? {
            return Ok(());
        }
        let sql: Arc<str> = Arc::from(sql);
        self.run_routed(&class, &sql, Work::Query(frame)).await
    }

    /// Our idle connections must not block DROP DATABASE, CREATE DATABASE
    /// from a template, or renaming a database: close them first.
    fn free_database(&self, class: &Classified) {
        if let Some(db) = &class.needs_database_alone {
            self.live.cluster.pools.drop_idle(|_, d| d == db);
        }
    }

    /// Route and run the extended-protocol messages received up to Sync/Flush.
    async fn run_batch(&mut self) -> Result<(), SessionError> {
        let mut scratch = exchange::Scratch::lend();
        scratch.batch = std::mem::take(&mut self.batch);
        let exchange::Scratch {
            batch,
            uses,
            classes,
            ..
        } = &mut scratch;
        let ran = self.run_batch_of(batch, uses, classes).await;
        scratch.give_back();
        ran
    }

    async fn run_batch_of(
        &mut self,
        batch: &mut Vec<Message>,
        uses: &mut Vec<Option<Arc<Prepared>>>,
        classes: &mut Vec<Arc<Classified>>,
    ) -> Result<(), SessionError> {
        if self.skipping {
            // Only the Sync counts (PostgreSQL discards the rest unanswered);
            // a Flush-ended batch has nothing to send at all.
            batch.retain(|m| m.kind == Kind::Sync);
            if batch.is_empty() {
                return Ok(());
            }
            self.skipping = false;
        }
        // Apply the batch to the client's statements in order (a name can
        // change meaning within it) and classify what it prepares/executes.
        let mut first_sql: Option<Arc<str>> = None;
        let mut effects = Vec::new();
        self.changes.clear();
        self.failed_messages.clear();
        self.batch_answered = false;
        self.refused.clear();
        for (i, m) in batch.iter().enumerate() {
            let parsed = match &m.kind {
                Kind::Parse {
                    name,
                    text,
                    param_types,
                } => {
                    let (sql, readable) = self.readable(text);
                    let class = self.classify(&sql, readable);
                    let sql: Arc<str> = Arc::from(sql);
                    first_sql.get_or_insert_with(|| sql.clone());
                    classes.push(class.clone());
                    let (text, types) = (text.clone(), param_types.clone());
                    Some(Prepared::new(
                        name,
                        sql,
                        text,
                        types,
                        class,
                        self.encoding.name,
                    ))
                }
                _ => None,
            };
            let used = match self.statements.apply(i, m, parsed, &mut self.changes) {
                Ok(used) => used,
                Err(refusal) => {
                    self.refused.push((i, refusal));
                    None
                }
            };
            if let (Kind::Bind { .. }, Some(p)) = (&m.kind, &used) {
                first_sql.get_or_insert_with(|| p.sql.clone());
                classes.push(p.class.clone());
                effects.extend(p.class.effects.iter().cloned());
            }
            uses.push(used);
        }
        if self.own_batch(batch, uses, classes).await? {
            self.settle_statements(batch, uses);
            return Ok(());
        }
        for class in classes.iter() {
            self.free_database(class);
        }
        self.owes_ready = batch.last().is_some_and(|m| m.kind == Kind::Sync);
        // Most batches prepare and run one statement (or run it again):
        // that statement's verdict, not a merged copy of it.
        let merged;
        let class = match classes.split_first() {
            Some((first, rest))
                if rest.iter().all(|c| Arc::ptr_eq(c, first)) && first.effects == effects =>
            {
                &**first
            }
            _ => {
                let mut m = merge(classes);
                m.effects = effects;
                merged = m;
                &merged
            }
        };
        let sql = first_sql.unwrap_or_else(|| Arc::from(""));
        let ran = self.run_routed(class, &sql, Work::Batch(batch, uses)).await;
        self.settle_statements(batch, uses);
        ran
    }

    /// The client's statements after a batch ran: what the server skipped
    /// or refused (`failed_messages`) did not happen, and nothing did if
    /// no answer came (no node, the policy refused). A connection lost
    /// part-way leaves what was answered before the loss.
    fn settle_statements(&mut self, batch: &[Message], uses: &Uses) {
        let failed = std::mem::take(&mut self.failed_messages);
        let ran = self.batch_answered.then_some(&failed[..]);
        self.statements.settle(batch, uses, &mut self.changes, ran);
        self.changes.clear();
        self.failed_messages = failed;
    }
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
        m.statements += c.statements;
        m.changes_catalog |= c.changes_catalog;
        m.begins |= c.begins;
        m.begins_serializable |= c.begins_serializable;
        m.parse_error |= c.parse_error;
        m.facts.catalog_candidate &= c.facts.catalog_candidate;
        m.facts.explain_only &= c.facts.explain_only;
        m.facts.calls.extend(c.facts.calls.iter().cloned());
        m.facts.relations.extend(c.facts.relations.iter().cloned());
        m.facts.operators.extend(c.facts.operators.iter().cloned());
        m.facts.types.extend(c.facts.types.iter().cloned());
        m.facts
            .attributes
            .extend(c.facts.attributes.iter().cloned());
        m.touches_session |= c.touches_session;
        m.copies_in |= c.copies_in;
        m.ends_transaction |= c.ends_transaction;
        m.commits_prepared |= c.commits_prepared;
        m.begins_read_only &= c.begins_read_only;
        m.tables = m.tables.iter().chain(c.tables.iter()).cloned().collect();
        m.functions = m
            .functions
            .iter()
            .chain(c.functions.iter())
            .cloned()
            .collect();
    }
    m
}
