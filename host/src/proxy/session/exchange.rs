//! Running work on a server connection: route and hold one (another node
//! for a read whose node refuses), give it the session's state, send, relay
//! the answers, retry a read that failed before the client saw anything, and
//! keep transaction and session state up to date afterwards.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::{Session, SessionError};
use crate::cluster::pool::Lease;
use crate::config::UntrackedState;
use crate::proxy::message::{Kind, Message};
use crate::proxy::relay::{self, LastTag, Outcome, RelayError, Step};
use crate::proxy::statements::{
    failed_messages, is_server_name, translate_into, Prepared, Translated, Uses,
};
use crate::route::guardrails::Routed;
use crate::route::{NodeId, RouteInput, Statement, Target, TxState};
use crate::sql::classify::{Classified, SessionEffect};
use crate::wire::{self, Frame, WireError};

/// The longest a policy can make a read wait for a replica to replay.
const MAX_REPLAY_WAIT_MS: u32 = 10_000;

/// What a routed exchange sends: a simple Query as the client sent it, or
/// extended-protocol messages to rewrite for the connection.
#[derive(Clone, Copy)]
pub(super) enum Work<'a> {
    Query(&'a Frame),
    /// A batch, with the statement each message names.
    Batch(&'a [Message], &'a Uses),
}

/// The buffers a statement uses while it runs: lent by a per-thread pool
/// and given back when it is done, so the common path allocates nothing
/// and an idle session holds none of them.
#[derive(Default)]
pub(super) struct Scratch {
    translated: Translated,
    plan: VecDeque<Step>,
    /// A batch's messages, the statement each names and the verdicts it
    /// runs under (see `Session::run_batch`).
    pub batch: Vec<Message>,
    pub uses: Vec<Option<Arc<Prepared>>>,
    pub classes: Vec<Arc<Classified>>,
}

/// Scratch buffers kept per thread: as many as statements ran at once on
/// it, up to this.
const POOLED: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Scratch>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// Buffers from this thread's pool (or new ones).
    pub(super) fn lend() -> Scratch {
        POOL.try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// An empty vector for a batch's messages, from the pool when it has one.
    pub(super) fn batch_vec() -> Vec<Message> {
        POOL.try_with(|p| {
            p.borrow_mut()
                .last_mut()
                .map(|s| std::mem::take(&mut s.batch))
        })
        .ok()
        .flatten()
        .unwrap_or_default()
    }

    /// Back to the pool, emptied (nothing of the statement stays: its
    /// messages hold the client's read buffer), unless it grew large.
    pub(super) fn give_back(mut self) {
        const LARGE: usize = 16 << 10;
        const MANY: usize = 256;
        let t = &mut self.translated;
        t.bytes.clear();
        t.plan.clear();
        t.slots.clear();
        t.owners.clear();
        self.plan.clear();
        self.batch.clear();
        self.uses.clear();
        self.classes.clear();
        if t.bytes.capacity() > LARGE
            || [
                t.plan.capacity(),
                self.plan.capacity(),
                t.slots.capacity(),
                t.owners.capacity(),
            ]
            .into_iter()
            .chain([
                self.batch.capacity(),
                self.uses.capacity(),
                self.classes.capacity(),
            ])
            .any(|c| c > MANY)
        {
            return;
        }
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOLED {
                p.push(self);
            }
        });
    }
}

/// How an exchange lost its server connection.
#[derive(Debug)]
pub(super) enum Lost {
    /// The connection failed or closed.
    Io(WireError),
    /// The server said why with a FATAL error, then closed.
    Fatal(Frame),
}

impl Session {
    /// Take up the configuration in force (between transactions, holding
    /// no connection): node numbers may have changed, so the pool handles
    /// kept by node go too.
    pub(super) fn refresh_live(&mut self) {
        if !self.live_is_current() {
            self.live = self.shared.live();
            self.pools.clear();
        }
    }

    pub(super) fn live_is_current(&self) -> bool {
        Arc::ptr_eq(&self.live, &*self.shared.live.load())
    }

    pub(super) async fn checkout(&mut self, node: NodeId) -> Result<Lease, (String, String)> {
        let i = node as usize;
        if self.pools.len() <= i {
            self.pools.resize(i + 1, None);
        }
        if self.pools[i].is_none() {
            self.pools[i] = Some(self.new_pool(node));
        }
        let pool = self.pools[i].clone().expect("just filled");
        let started = Instant::now();
        let leased = self.live.cluster.pools.checkout_from(&pool, node).await;
        if let Some(m) = self.live.cluster.metrics.get(i) {
            m.checkout_wait.observe(started.elapsed().as_secs_f64());
        }
        leased.map_err(|e| {
            if e.node_unreachable() {
                // Banned now, not at the next failed probes.
                self.live.cluster.report_down(node, &e.to_string());
            }
            (e.sqlstate().to_owned(), format!("signalbox: {e}"))
        })
    }

    pub(super) fn new_pool(&self, node: NodeId) -> crate::cluster::pool::Pool {
        let password = self
            .live
            .config
            .password_for(&self.user)
            .map(str::to_owned)
            .or_else(|| {
                let a = &self.live.cluster.addrs[node as usize];
                (a.user == self.user).then(|| a.password.clone()).flatten()
            });
        self.live
            .cluster
            .pools
            .pool(node, &self.user, password.as_deref(), &self.database)
    }

    /// Make the leased connection carry this session's state (and nothing
    /// a previous client left on it).
    pub(super) async fn sync_state(&mut self) -> Result<Option<(String, String)>, SessionError> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(None);
        };
        if lease.conn().carries(self.state.key) {
            return Ok(None);
        }
        Box::pin(self.replay_state()).await
    }

    /// [`Self::sync_state`]'s slow path: the connection carries other state.
    async fn replay_state(&mut self) -> Result<Option<(String, String)>, SessionError> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(None);
        };
        let conn = lease.conn();
        let sql = self.state.replay_sql(conn.needs_full_reset());
        if !sql.is_ascii() {
            // The server converts a whole Query from the connection's
            // client_encoding, which the previous client may have changed:
            // make it UTF-8 first, so non-ASCII values arrive intact.
            if let Some(failed) = conn
                .execute_silently("SET client_encoding = 'UTF8'")
                .await
                .map_err(SessionError::Backend)?
            {
                return Ok(Some(failed));
            }
        }
        let failed = conn
            .execute_silently(&sql)
            .await
            .map_err(SessionError::Backend)?;
        if failed.is_none() {
            conn.state_applied(self.state.key);
        }
        Ok(failed)
    }

    /// Decide where a statement runs and hold a connection there.
    /// `Ok(false)` means an error was already sent to the client.
    /// `avoid`: a node whose connection just failed this read; the read
    /// goes elsewhere if it can. A config reload that retires the pools
    /// between the decision and the checkout sends the statement through
    /// routing again, under the new configuration (nothing ran yet).
    pub(super) async fn acquire(
        &mut self,
        class: &Classified,
        judged: bool,
        sql: &Arc<str>,
        avoid: Option<NodeId>,
    ) -> Result<bool, SessionError> {
        for _ in 0..3 {
            if let Some(done) = self.acquire_under_live(class, judged, sql, avoid).await? {
                return Ok(done);
            }
            tracing::debug!(
                session = self.id,
                "configuration changed during checkout; routing again"
            );
        }
        self.error(
            "08006",
            "signalbox: the configuration changed three times while this statement waited for a connection; nothing ran",
        )
        .await?;
        Ok(false)
    }

    /// [`Self::acquire`] under one configuration: `None` when it was
    /// replaced before a connection could be held.
    async fn acquire_under_live(
        &mut self,
        class: &Classified,
        judged: bool,
        sql: &Arc<str>,
        avoid: Option<NodeId>,
    ) -> Result<Option<bool>, SessionError> {
        if self.lease.as_mut().is_some_and(|l| l.conn().is_broken()) {
            // A held connection that may still owe answers to something
            // else: nothing more may be sent on it, and what the session
            // relied on (its transaction, its pin) is gone with it.
            return Err(self.lost_held_connection().await);
        }
        if let Some(lease) = &self.lease {
            if self.trace {
                let node = lease.node();
                self.trace_held(node, class, judged);
            }
            return Ok(Some(true));
        }
        if !self.offloading {
            self.refresh_live();
        }
        let mut read_only = judged;
        if class.tables.iter().any(|t| self.temp_tables.contains(t)) {
            read_only = false;
        }
        if self.pin_reason.is_some() || (self.session_pooling && !self.offloading) {
            // One connection for the rest of the session: it must be the primary's.
            read_only = false;
        }
        self.statement_lsn =
            Self::hinted_lsn(&class.hints).map(|lsn| (lsn, std::time::Instant::now()));
        let ryw = &self.live.config.read_your_writes;
        if !ryw.scopes.is_empty() || self.min_lsn.is_some() || self.statement_lsn.is_some() {
            if read_only && ryw.wait_for_replay_ms > 0 && self.tx == TxState::Idle {
                if let Some((lsn, _)) = self.write_position() {
                    let limit = std::time::Duration::from_millis(ryw.wait_for_replay_ms);
                    Box::pin(self.live.cluster.wait_for_replay(lsn, limit)).await;
                }
            }
            self.refresh_route_session();
        }
        let statement = Statement {
            kind: class.kind,
            read_only,
            fingerprint: class.fingerprint,
            sql: sql.clone(),
            tables: class.tables.clone(),
            functions: class.functions.clone(),
            hints: class.hints.clone(),
        };
        // The last statement's allocation is reused: nothing keeps the
        // routing input once routed (a shadow sample copies what it needs).
        let statement = match Arc::get_mut(&mut self.route_statement) {
            Some(slot) => {
                *slot = statement;
                self.route_statement.clone()
            }
            None => Arc::new(statement),
        };
        let input = RouteInput {
            statement,
            session: self.route_session.clone(),
            cluster: self.live.cluster.view(),
        };
        let mut routing = self.shared.router.route(&input);
        if matches!(routing.target, Target::CaughtUpReplica(_)) {
            Box::pin(self.wait_if_asked(&mut routing, &input)).await;
        }
        if self.statement_lsn.take().is_some() {
            self.refresh_route_session();
        }
        if let Some(reason) = &routing.reason {
            self.shared.metrics.reason(reason);
            tracing::debug!(session = self.id, %reason, "policy decision");
        }
        let node = match routing.enforced.routed {
            Routed::Node(n) => n,
            Routed::Reject(msg) => {
                self.shared.metrics.rejected();
                self.error(
                    "42501",
                    &format!("signalbox: statement rejected by routing policy: {msg}"),
                )
                .await?;
                return Ok(Some(false));
            }
            Routed::Unavailable(msg) => {
                let msg = match self.live.cluster.fence_reason() {
                    Some(f) => format!("signalbox: {msg} ({f})"),
                    None => format!("signalbox: {msg}"),
                };
                self.error("57P03", &msg).await?;
                return Ok(Some(false));
            }
        };
        let reroutable = read_only && self.tx == TxState::Idle;
        let mut node = node;
        if reroutable && avoid == Some(node) {
            node = self.other_node_for_read(&input, node).unwrap_or(node);
        }
        for attempt in 0..2 {
            let (mut checked_out, mut own) = self.lease_for(node).await;
            if checked_out.is_err() && reroutable {
                // A read outside a transaction may run anywhere else that is
                // eligible: another healthy replica, else the primary.
                if let Some(other) = self.other_node_for_read(&input, node) {
                    tracing::debug!(failed = node, retry = other, "read retried on another node");
                    (checked_out, own) = self.lease_for(other).await;
                }
            }
            match checked_out {
                Ok(lease) => {
                    node = lease.node();
                    self.cancel.set(lease.addr(), lease.key());
                    self.client.pid_alias = Some((lease.key().0, self.key.0));
                    self.lease = Some(lease);
                }
                Err(_) if !self.live_is_current() => return Ok(None),
                Err((code, msg)) => {
                    self.error(&code, &msg).await?;
                    return Ok(Some(false));
                }
            }
            let synced = self.sync_state().await;
            if own && !matches!(synced, Ok(None)) {
                // The session's own connection failed: what it held (the
                // session) is gone, as when it fails running a statement.
                return Err(self.lost_held_connection().await);
            }
            match synced {
                Ok(None) => {
                    let counter = self.live.cluster.metrics.get(node as usize);
                    self.shared
                        .metrics
                        .routed(counter.map(|c| &*c.routed), read_only);
                    if self.trace {
                        self.trace_decision(node, &routing, class, read_only);
                    }
                    let sample = self.live.config.logging.decision_sample;
                    if sample > 0.0 && fastrand::f64() < sample {
                        self.log_decision(node, &routing, class, read_only);
                    }
                    return Ok(Some(true));
                }
                Ok(Some((code, msg))) => {
                    self.release(true);
                    self.error(
                        &code,
                        &format!("signalbox: cannot restore session settings: {msg}"),
                    )
                    .await?;
                    return Ok(Some(false));
                }
                // The connection died before the client's work was sent on
                // it (e.g. its node was just stopped): nothing ran, so any
                // statement may try once more on a fresh connection — a read
                // on another node.
                Err(e) => {
                    self.release(true);
                    if reroutable {
                        node = self.other_node_for_read(&input, node).unwrap_or(node);
                    }
                    if attempt > 0 {
                        self.error(
                            "08006",
                            &format!("signalbox: lost the connection to the node: {e}"),
                        )
                        .await?;
                        return Ok(Some(false));
                    }
                }
            }
        }
        Ok(Some(false))
    }

    /// The connection that held this session is gone: discard it and end
    /// the session with `08006`.
    async fn lost_held_connection(&mut self) -> SessionError {
        self.release(true);
        self.fatal(
            "08006",
            "terminating connection: signalbox lost the server connection that held this session",
        )
        .await;
        SessionError::Backend(WireError::Closed)
    }

    /// A connection to `node`: the session's own, when a read offloaded in
    /// session mode is routed to its node after all (a second connection
    /// there would take a pool slot for nothing, and wait for one when
    /// session clients hold them all), else one from the pool. `true`: the
    /// session's own.
    async fn lease_for(&mut self, node: NodeId) -> (Result<Lease, (String, String)>, bool) {
        match self.parked.take_if(|own| own.node() == node) {
            Some(own) => {
                self.offloading = false;
                (Ok(own), true)
            }
            None => (self.checkout(node).await, false),
        }
    }

    /// The policy asked for a replica that has replayed the session's
    /// writes, waiting a bounded time, and none has yet: wait for one
    /// (signalbox watches the replicas' positions), then decide again on
    /// the fresh view — the primary if none caught up in time.
    async fn wait_if_asked(&mut self, routing: &mut crate::router::Routing, input: &RouteInput) {
        let Target::CaughtUpReplica(ms) = routing.target else {
            return;
        };
        let Some(lsn) = input.session.last_write_lsn else {
            return;
        };
        let on_primary = matches!(routing.enforced.routed, Routed::Node(n) if input.cluster.primary() == Some(n));
        if ms == 0 || !on_primary || !input.statement.read_only || self.tx != TxState::Idle {
            return;
        }
        let limit = std::time::Duration::from_millis(u64::from(ms.min(MAX_REPLAY_WAIT_MS)));
        if Box::pin(self.live.cluster.wait_for_replay(lsn, limit)).await {
            let cluster = self.live.cluster.view();
            routing.enforced = crate::route::guardrails::enforce(
                &routing.target,
                &input.statement,
                &input.session,
                &cluster,
                fastrand::u64(..),
            );
        }
    }

    /// For a read whose node failed: the built-in choice among the other
    /// healthy replicas, else a healthy primary. A replica qualifies only
    /// if it has replayed the session's last write (read-your-writes holds
    /// on this path too), as seen now.
    pub(super) fn other_node_for_read(&self, input: &RouteInput, failed: NodeId) -> Option<NodeId> {
        let mut view = (*self.live.cluster.view()).clone();
        if let Some(s) = view.states.get_mut(failed as usize) {
            s.healthy = false;
        }
        let session = &input.session;
        crate::route::builtin::choose_replica_where(&view, fastrand::u64(..), |id| {
            view.replayed(id, session)
        })
        .or_else(|| view.primary().filter(|p| *p != failed))
    }

    /// Route `class`, hold a connection, send `work` and relay the answers.
    /// A read outside a transaction whose connection fails before any byte
    /// reached the client is tried once more (a fresh connection, or another
    /// node); anything else that loses its connection is reported.
    pub(super) async fn run_routed(
        &mut self,
        class: &Classified,
        sql: &Arc<str>,
        work: Work<'_>,
    ) -> Result<(), SessionError> {
        let judged = self.judged_read_only(class);
        if !self.offloadable(class, judged) {
            return self.run_routed_here(class, judged, sql, work).await;
        }
        // Session mode: a read outside a transaction runs on a pooled
        // connection the policy chooses (a replica), while the session's own
        // primary connection waits; it comes back for everything else.
        self.parked = self.lease.take();
        self.offloading = true;
        let result = self.run_routed_here(class, judged, sql, work).await;
        self.offloading = false;
        // Unless the read ran on the session's own connection after all
        // (then it is the lease, or was lost as the session's).
        if let Some(own) = self.parked.take() {
            if self.lease.is_some() {
                let idle = self.tx == TxState::Idle;
                self.release(!idle);
            }
            self.cancel.set(own.addr(), own.key());
            self.client.pid_alias = Some((own.key().0, self.key.0));
            self.lease = Some(own);
        }
        result
    }

    /// Whether a session-mode client's statement may run on a replica: a
    /// read (judged with the catalog) outside any transaction, ending in
    /// Sync, from a session nothing pins to its connection, that does not
    /// ask about its own backend (`pg_backend_pid()` names the connection
    /// the client was told about).
    fn offloadable(&self, class: &Classified, judged: bool) -> bool {
        let asks_own_backend = class
            .facts
            .calls
            .iter()
            .any(|f| f.name.eq_ignore_ascii_case("pg_backend_pid"));
        self.session_pooling
            && self.live.config.pool.session_reads_on_replicas
            // Its replicas' pools are gone once a reload retired them.
            && self.live_is_current()
            && self.pin_reason.is_none()
            && self.tx == TxState::Idle
            && self.owes_ready
            && !self.skipping
            && !class.begins
            && class.effects.is_empty()
            && !class.touches_session
            && !self.untracked_state
            && class.kind != crate::route::StatementKind::Session
            && !asks_own_backend
            && judged
    }

    async fn run_routed_here(
        &mut self,
        class: &Classified,
        judged: bool,
        sql: &Arc<str>,
        work: Work<'_>,
    ) -> Result<(), SessionError> {
        let mut scratch = Scratch::lend();
        let ran = self
            .run_routed_with(class, judged, sql, work, &mut scratch)
            .await;
        scratch.give_back();
        ran
    }

    async fn run_routed_with(
        &mut self,
        class: &Classified,
        mut judged: bool,
        sql: &Arc<str>,
        work: Work<'_>,
        scratch: &mut Scratch,
    ) -> Result<(), SessionError> {
        let mut failed_node = None;
        // A connection held from earlier work (a transaction, a pin, a
        // Flush-ended exchange) carries what the client relies on.
        let held = self.lease.is_some();
        for attempt in 0..2 {
            let retriable = attempt == 0 && self.lease.is_none() && self.tx == TxState::Idle;
            if !self.acquire(class, judged, sql, failed_node).await? {
                // The error went out; the rest of the work is dropped.
                return Ok(());
            }
            let read_only = self.lease_is_read_only(judged);
            // A batch is rewritten for each connection it lands on.
            let Scratch {
                translated, plan, ..
            } = scratch;
            plan.clear();
            let (bytes, slots, owners): (&[u8], &[Option<String>], &[u32]) = match work {
                Work::Query(frame) => {
                    translated.bytes.clear();
                    frame.encode_into(&mut translated.bytes);
                    plan.push_back(Step::Query);
                    (&translated.bytes[..], &[], &[])
                }
                Work::Batch(batch, uses) => {
                    // With SQL PREPARE the session is pinned: only then can
                    // its connection hold statements of the client's naming.
                    let pinned = self.pin_reason.is_some();
                    let conn = self.lease.as_mut().expect("acquired").conn();
                    let cap = self.live.config.pool.max_prepared_statements;
                    let on_server = conn.prepared_mut();
                    let t = &mut *translated;
                    match translate_into(t, batch, uses, &self.refused, on_server, cap, pinned) {
                        Ok(()) => {
                            if t.evicted > 0 {
                                self.shared.metrics.prepared_evicted.fetch_add(
                                    t.evicted as u64,
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                            }
                        }
                        Err(e) => {
                            self.fatal("08P01", &e.to_string()).await;
                            return Err(SessionError::Client(e));
                        }
                    };
                    std::mem::swap(plan, &mut t.plan);
                    (&t.bytes[..], &t.slots[..], &t.owners[..])
                }
            };
            let plan_len = plan.len();
            let mark = self.client.sent;
            let hold = retriable && read_only;
            failed_node = self.lease.as_ref().map(Lease::node);
            // A lone BEGIN/COMMIT writes nothing: a read-only transaction
            // on the primary records no position.
            let lone_control =
                class.statements == 1 && class.kind == crate::route::StatementKind::Transaction;
            let writes = !judged && class.statements > 0 && !lone_control;
            let ryw = !self.live.config.read_your_writes.scopes.is_empty();
            // A commit's position is recorded, and committed DDL's catalog
            // facts fetched, before the client learns of the commit: what
            // it sends next, on any connection, is routed knowing them.
            self.client.defer_ready = (ryw && (self.tx_wrote || writes || class.commits_prepared))
                || class.changes_catalog
                || self.catalog_dirty;
            // The position is asked in the same write, behind the client's
            // work, when that work ends the transaction and nothing of ours
            // can be mistaken for client data (COPY FROM STDIN) or skipped
            // (an error in a batch not ended by Sync): its answer follows
            // the client's ReadyForQuery with no round trip of its own.
            let ends_with_sync = match work {
                Work::Query(_) => true,
                Work::Batch(b, _) => b.last().is_some_and(|m| m.kind == Kind::Sync),
            };
            let pipelined = ryw
                && (self.tx_wrote || writes)
                && ends_with_sync
                && !class.copies_in
                && binds_what_it_executes(&work)
                && ((self.tx == TxState::Idle && !class.begins)
                    || (lone_control && class.ends_transaction));
            let joined;
            let bytes = if pipelined {
                let mut b = bytes::BytesMut::with_capacity(bytes.len() + 96);
                b.extend_from_slice(bytes);
                wire::query(&mut b, super::ryw::POSITION_SQL);
                joined = b;
                &joined[..]
            } else {
                bytes
            };
            let exchanged = self.exchange(bytes, plan, hold).await;
            self.client.defer_ready = false;
            match exchanged? {
                Ok(outcome) if outcome.standby_refused && self.may_run_again(hold, mark) => {
                    // A standby refused a read judged safe (catalog facts
                    // stale or missing, DDL made outside signalbox): nothing
                    // ran and nothing reached the client, so it runs on the
                    // primary instead, as a write would.
                    self.client.out.clear();
                    // Discarded, not pooled: what the refused work did to it
                    // (statements prepared, settings) was never accounted.
                    self.release(true);
                    self.shared.metrics.standby_retried();
                    tracing::info!(
                        session = self.id,
                        fingerprint = format_args!("{:016x}", class.fingerprint),
                        "a standby refused a read judged safe; it runs on the primary"
                    );
                    judged = false;
                }
                Ok(outcome) if outcome.recovery_conflict && self.may_run_again(hold, mark) => {
                    // The standby replayed a change the read could not
                    // coexist with (its grace period spent, as after a
                    // pause or lag): nothing reached the client, so the
                    // read runs again, avoiding that node. Discarded, as
                    // above: what the cancelled work did was not accounted.
                    self.client.out.clear();
                    self.release(true);
                    self.shared
                        .metrics
                        .conflict_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        session = self.id,
                        node = failed_node,
                        "a standby cancelled a read for a conflict with recovery; it runs again elsewhere"
                    );
                }
                Ok(outcome) => {
                    self.failed_messages = failed_messages(owners, plan_len, &outcome.errors_left);
                    self.batch_answered = true;
                    if let Some(lease) = self.lease.as_mut() {
                        if outcome.closes_unknown {
                            // Never reused: its statements are not known.
                            lease.conn().mark_retiring();
                        }
                        for slot in &outcome.failed_parses {
                            if let Some(Some(name)) = slots.get(*slot as usize) {
                                lease.conn().prepared_mut().remove(name);
                            }
                        }
                    }
                    if let Some(e) = outcome.client_encoding.as_deref() {
                        if let Some(e) = crate::proxy::encoding::ClientEncoding::lookup(e) {
                            self.encoding = e;
                        }
                    }
                    if ryw {
                        self.tx_wrote |= writes;
                        // A transaction that wrote is over: record its
                        // position even when it may have rolled back (an
                        // error after a COMMIT in the same message can
                        // hide a commit; a needless record costs a wait).
                        // (`COMMIT AND CHAIN` commits and opens the next.)
                        let chained = outcome.status == Some(b'T')
                            && outcome.last_tag == Some(LastTag::Commit);
                        // (`COMMIT PREPARED` makes a prepared transaction's
                        // writes visible now, whoever wrote them.)
                        let prepared = outcome.status == Some(b'I') && class.commits_prepared;
                        let ended = (self.tx_wrote && (outcome.status == Some(b'I') || chained))
                            || prepared;
                        // A pipelined answer is read whatever happened.
                        if pipelined || ended {
                            // (Boxed, like every rare path here: the
                            // future of each statement stays small.)
                            let lsn = Box::pin(self.write_lsn_after(pipelined)).await;
                            if let (true, Some(node)) = (ended, failed_node) {
                                Box::pin(self.commit_recorded(lsn, node)).await;
                            }
                        }
                    }
                    if outcome.status == Some(b'I') || outcome.last_tag == Some(LastTag::Commit) {
                        self.tx_wrote = false;
                    }
                    // An error with no Sync after it: the server skips to
                    // the client's Sync.
                    self.skipping = outcome.error && outcome.status.is_none();
                    self.after_exchange(class, &outcome);
                    // In session mode, what such code set lives on the
                    // session's own connection: its reads stay there.
                    if class.touches_session && self.session_pooling {
                        self.untracked_state = true;
                    }
                    // (Such a statement is never read-only: the pin is on the primary.)
                    if class.touches_session
                        && !class.read_only
                        && self.live.config.pool.untracked_state == UntrackedState::Pin
                    {
                        self.pin_reason = Some("function that may change session state");
                    }
                    self.finish(&outcome, class.effects.clone(), class.begins_read_only);
                    if class.changes_catalog {
                        self.catalog_dirty = true;
                    }
                    if self.catalog_dirty && self.tx == TxState::Idle {
                        self.catalog_dirty = false;
                        Box::pin(self.refresh_catalog()).await;
                    }
                    // The end of the answer, now that the connection is
                    // back in its pool (a client slow to read it holds no
                    // server connection), or a deferred ending. Inside a
                    // transaction the connection is still held: a client
                    // that takes none of it is given up on, as mid-answer.
                    let flushed = if self.lease.is_some() {
                        self.client.flush_holding().await
                    } else {
                        self.client.flush().await
                    };
                    flushed.map_err(SessionError::Client)?;
                    return Ok(());
                }
                Err((e, _)) if hold && !self.client.progressed_since(mark) => {
                    // Held-back partial answers are dropped with the attempt.
                    self.client.out.clear();
                    tracing::debug!(error = ?e, "read retried on a fresh connection");
                }
                Err((e, so_far)) => {
                    // What the server answered before the loss reaches the
                    // client (flushed with the error): the statements it
                    // prepared or closed stand, as the client was told; the
                    // first unanswered message failed, the rest were skipped.
                    let mut errors_left = so_far.errors_left;
                    errors_left.push(plan.len());
                    self.failed_messages = failed_messages(owners, plan_len, &errors_left);
                    self.batch_answered = true;
                    // The connection died after the work was sent: it may
                    // have committed (a COMMIT answered, then a FATAL).
                    if let (true, Some(node)) = (ryw && (self.tx_wrote || writes), failed_node) {
                        Box::pin(self.commit_recorded(None, node)).await;
                    }
                    return Box::pin(self.lost_backend(e, held)).await;
                }
            }
        }
        Ok(())
    }

    /// Whether an attempt that a standby refused or cancelled may run again:
    /// a read outside a transaction, of which the client saw nothing, that
    /// ran on a standby. (Session mode's own connection is not where this
    /// ran.) A batch is translated afresh for the next connection.
    fn may_run_again(&self, hold: bool, mark: u64) -> bool {
        hold && !self.client.progressed_since(mark)
            && !self.offloading
            && self
                .lease
                .as_ref()
                .is_some_and(|l| self.live.cluster.view().primary() != Some(l.node()))
    }

    /// Whether the statement was routed as a read (so a retry is harmless).
    pub(super) fn lease_is_read_only(&self, read_only: bool) -> bool {
        read_only && self.pin_reason.is_none() && (!self.session_pooling || self.offloading)
    }

    /// May `class` run on a standby? With this database's catalog facts,
    /// the catalog decides for statements whose text is clean (unlogged
    /// and temporary relations, views, function volatility and bodies);
    /// without them, the text alone.
    pub(super) fn judged_read_only(&self, class: &Classified) -> bool {
        if !class.facts.catalog_candidate {
            return class.read_only;
        }
        match self.shared.catalogs.get(&self.database) {
            Some(cat) => {
                let read_only = cat.read_only(&class.facts);
                if (!read_only || class.read_only != read_only)
                    && tracing::enabled!(tracing::Level::DEBUG)
                {
                    let j = cat.judge(&class.facts);
                    tracing::debug!(
                        session = self.id,
                        read_only = j.read_only,
                        reasons = ?j.reasons,
                        "catalog verdict"
                    );
                }
                read_only
            }
            None => class.read_only,
        }
    }

    /// The first session of a database fetches its catalog facts.
    pub(super) async fn load_catalog(&mut self) {
        let (shared, live) = (self.shared.clone(), self.live.clone());
        if live.config.classifier.catalog && shared.catalogs.get(&self.database).is_none() {
            let _ = shared
                .catalogs
                .ensure(&live.cluster, &live.config.classifier, &self.database)
                .await;
        }
    }

    /// After DDL committed: this session's next statement is judged with
    /// facts that include it.
    pub(super) async fn refresh_catalog(&mut self) {
        let (shared, live) = (self.shared.clone(), self.live.clone());
        if live.config.classifier.catalog {
            let _ = shared
                .catalogs
                .refresh(&live.cluster, &live.config.classifier, &self.database)
                .await;
        }
    }

    /// Send `bytes` on the leased connection and relay the answers. A failed
    /// node connection is discarded and returned as the inner error, for the
    /// caller to retry or report, with what the answers before the loss
    /// showed (`plan` then starts at the first step left unanswered).
    pub(super) async fn exchange(
        &mut self,
        bytes: &[u8],
        plan: &mut VecDeque<Step>,
        hold: bool,
    ) -> Result<Result<Outcome, (Lost, Outcome)>, SessionError> {
        let started = Instant::now();
        let lease = self.lease.as_mut().expect("exchange needs a lease");
        let conn = lease.conn();
        let mut outcome = Outcome::default();
        let result = match conn.send_batch(bytes).await {
            Ok(()) => relay::relay(conn, &mut self.client, plan, hold, &mut outcome).await,
            Err(e) => Err(RelayError::Backend(e)),
        };
        if let Some(l) = self.lease.as_ref() {
            self.live
                .cluster
                .observe_latency(l.node(), started.elapsed());
        }
        match result {
            Ok(()) => Ok(Ok(outcome)),
            Err(RelayError::Backend(e)) => {
                self.release(true);
                Ok(Err((Lost::Io(e), outcome)))
            }
            Err(RelayError::Terminated(frame)) => {
                self.release(true);
                Ok(Err((Lost::Fatal(frame), outcome)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Tell the client its node connection was lost. A server that ended
    /// the connection with a FATAL error ends the session the same way, as
    /// PostgreSQL would: its error is forwarded and the client connection
    /// closed, so drivers' pools discard it. A lost connection that held
    /// the client's transaction or its whole session (pinned, session mode)
    /// ends the session too, with `08006`: what the client relied on is
    /// gone. Only a transaction-pooled client between transactions goes on,
    /// with an error for the statement that was running.
    pub(super) async fn lost_backend(
        &mut self,
        lost: Lost,
        held: bool,
    ) -> Result<(), SessionError> {
        let held_session = held
            || self.tx != TxState::Idle
            || self.pin_reason.is_some()
            || (self.session_pooling && !self.offloading)
            || self.lease.is_some();
        self.release(true);
        let e = match lost {
            Lost::Fatal(frame) => {
                frame.encode_into(&mut self.client.out);
                let _ = self.client.flush().await;
                return Err(SessionError::Backend(WireError::Closed));
            }
            Lost::Io(e) if held_session => {
                let what = if self.tx != TxState::Idle {
                    "during a transaction (if it was committing, whether it committed is unknown; otherwise it was rolled back)"
                } else {
                    "that held this session"
                };
                let msg = format!(
                    "terminating connection: signalbox lost the server connection {what}: {e}"
                );
                self.fatal("08006", &msg).await;
                return Err(SessionError::Backend(e));
            }
            Lost::Io(e) => e,
        };
        self.pending_effects.clear();
        self.refresh_route_session();
        self.error(
            "08006",
            &format!("signalbox: lost the connection to the node: {e}"),
        )
        .await
    }

    /// The held server connection spoke (or closed) while the client was
    /// idle. Notifications, notices and parameter changes go to the client
    /// now, as PostgreSQL sends them; a connection that died ends the
    /// session the way a direct connection would end.
    pub(super) async fn backend_spoke(
        &mut self,
        filled: Result<(), WireError>,
    ) -> Result<(), SessionError> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let conn = lease.conn();
        let mut lost = filled.err().map(Lost::Io);
        while lost.is_none() {
            match conn.take_frame() {
                Ok(None) => break,
                Ok(Some(f)) if f.tag == b'E' && wire::is_fatal(&f.body) => {
                    lost = Some(Lost::Fatal(f))
                }
                Ok(Some(f)) if matches!(f.tag, b'A' | b'N' | b'S') => {
                    relay::forward(&f, self.client.pid_alias, &mut self.client.out)
                }
                Ok(Some(f)) => {
                    let msg = format!("unexpected message '{}' from an idle server", f.tag as char);
                    lost = Some(Lost::Io(WireError::Protocol(msg)));
                }
                Err(e) => lost = Some(Lost::Io(e)),
            }
        }
        match lost {
            None => self.client.flush().await.map_err(SessionError::Client),
            Some(lost) => {
                // An idle client is between statements: even a transaction-
                // pooled one learns of it only if the connection was its own.
                let _ = self.client.flush().await;
                Box::pin(self.lost_backend(lost, true)).await
            }
        }
    }

    /// What a statement did to the connection beyond its result.
    pub(super) fn after_exchange(&mut self, class: &Classified, outcome: &Outcome) {
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let conn = lease.conn();
        // Untracked changes, or tracked ones that may have half-applied.
        if class.touches_session || (outcome.error && !class.effects.is_empty()) {
            conn.mark_needs_reset();
        }
        // Whether a DEALLOCATE / DISCARD ALL in failed work ran is unknown,
        // and so are the connection's statements: a statement believed
        // gone but still there would fail the next Parse of it (42P05).
        let drops = |e: &SessionEffect| {
            matches!(e, SessionEffect::Deallocate(_) | SessionEffect::DiscardAll)
        };
        if outcome.error && class.effects.iter().any(drops) {
            conn.mark_retiring();
        }
        for e in &class.effects {
            match e {
                // The server dropped every statement, ours included (and
                // DISCARD ALL its settings too).
                SessionEffect::Deallocate(None) | SessionEffect::DiscardAll => {
                    if matches!(e, SessionEffect::DiscardAll) {
                        conn.forget_session();
                    } else {
                        conn.prepared_mut().clear();
                    }
                    if !outcome.error {
                        self.statements.clear();
                        if matches!(e, SessionEffect::DiscardAll) {
                            self.min_lsn = None;
                            self.trace = false;
                        }
                    }
                }
                // A statement of the session's own, or a shared one (then
                // the connection no longer has it).
                SessionEffect::Deallocate(Some(name)) => conn.prepared_mut().remove(name),
                _ => {}
            }
        }
    }

    /// `DEALLOCATE` of the client's own protocol-level statements, and
    /// `DEALLOCATE ALL` / `DISCARD ALL` of a session that holds no connection,
    /// concern this client alone: answer them here, as PostgreSQL would,
    /// without touching a shared connection. Returns whether it answered.
    pub(super) async fn answer_locally(
        &mut self,
        class: &Classified,
    ) -> Result<bool, SessionError> {
        if class.statements != 1 || self.tx == TxState::Failed {
            return Ok(false);
        }
        if let Some(SessionEffect::Own(setting)) = class.effects.first() {
            let setting = setting.clone();
            self.own_setting(&setting, true);
            let status = self.tx_status();
            wire::ready_for_query(&mut self.client.out, status);
            self.client.flush().await.map_err(SessionError::Client)?;
            return Ok(true);
        }
        let holds_connection = self.lease.is_some();
        let tag = match class.effects.first() {
            Some(SessionEffect::Deallocate(Some(name))) if self.statements.forget(name) => {
                "DEALLOCATE"
            }
            // The name of a statement signalbox shares between clients:
            // this client never prepared it (else it would be pinned).
            Some(SessionEffect::Deallocate(Some(name)))
                if is_server_name(name)
                    && self.pin_reason.is_none()
                    && self.tx == TxState::Idle =>
            {
                let message = format!("prepared statement \"{name}\" does not exist");
                self.error("26000", &message).await?;
                return Ok(true);
            }
            Some(SessionEffect::Deallocate(None)) if !holds_connection => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Some(SessionEffect::DiscardAll) if !holds_connection && self.tx == TxState::Idle => {
                self.statements.clear();
                self.pending_effects.clear();
                self.min_lsn = None;
                self.trace = false;
                self.encoding = self.startup_encoding;
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

    /// After an exchange: keep or return the connection, track transactions
    /// and session state.
    pub(super) fn finish(
        &mut self,
        outcome: &Outcome,
        effects: Vec<SessionEffect>,
        class_begins_ro: bool,
    ) {
        // What neither a rollback nor an error undoes pins the session at
        // once: its connection must never serve another client.
        if let Some(reason) = effects.iter().find_map(SessionEffect::lasting_pin) {
            self.pin_reason = Some(reason);
        }
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
            let committed = outcome.last_tag != Some(LastTag::Rollback);
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
                l.conn().state_followed(before, self.state.key);
            }
        }
        if self.tx == TxState::Idle {
            self.read_only_tx = false;
            if self.pin_reason.is_none() && (!self.session_pooling || self.offloading) {
                self.release(false);
            }
        }
        self.refresh_route_session();
    }

    pub(super) fn release(&mut self, discard: bool) {
        if let Some(lease) = self.lease.take() {
            if self.cancel.clear() || discard {
                lease.discard();
            }
        }
    }
}

/// Every portal the work executes was bound in the work itself (by name),
/// so its statement was classified here: a portal bound earlier might be
/// a `COPY ... FROM STDIN`, and then nothing of signalbox's own may follow.
fn binds_what_it_executes(work: &Work<'_>) -> bool {
    let Work::Batch(batch, _) = work else {
        return true;
    };
    let mut bound: Vec<&str> = Vec::new();
    for m in batch.iter() {
        match &m.kind {
            Kind::Bind { portal, .. } => bound.push(portal),
            Kind::Execute { portal } if !bound.contains(&portal.as_str()) => return false,
            _ => {}
        }
    }
    true
}
