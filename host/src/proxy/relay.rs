//! Relaying a backend's answers to the client, frame by frame, without
//! decoding rows. A *plan* lists the responses the backend owes for what was
//! sent; it lets the relay drop answers to messages signalbox injected (a
//! re-`Parse` on a connection that lacked the statement), emit answers for
//! messages it did not forward (a `Parse` the connection already had), and
//! know when the exchange is complete.

use std::collections::VecDeque;
use std::task::Poll;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::tls::BoxStream;

use crate::cluster::backend::BackendConn;
use crate::wire::{self, Frame, WireError};

/// One response the backend owes (or signalbox must make up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A simple `Query`: everything up to its `ReadyForQuery`.
    Query,
    /// `slot` numbers the Parses of a batch, to report which never completed.
    Parse {
        forward: bool,
        slot: u32,
    },
    Bind,
    /// A Bind signalbox sent itself: its `BindComplete` is not forwarded.
    BindQuiet,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
    Sync,
    /// Send `ParseComplete` to the client ourselves.
    SynthParse,
    /// Send `CloseComplete` to the client ourselves.
    SynthClose,
    /// A server statement signalbox closed itself: its `CloseComplete`
    /// is not forwarded.
    CloseQuiet,
    /// A Close signalbox sent so that the client's next message finds
    /// nothing that is not the client's: not forwarded, and skipping it
    /// after an error loses nothing (that message is skipped too).
    Scrub,
}

/// The command tag of a `CommandComplete`, as far as the session needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastTag {
    Commit,
    Rollback,
    Other,
}

/// What the exchange ended with.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Transaction status of the last `ReadyForQuery`, if one arrived.
    pub status: Option<u8>,
    pub error: bool,
    /// Tag of the last `CommandComplete`.
    pub last_tag: Option<LastTag>,
    /// Parse slots skipped or failed because of an error: those statements
    /// are not prepared on the connection.
    pub failed_parses: Vec<u32>,
    /// For each error, how many steps the plan still had, the failed one
    /// included: where in the batch the server failed.
    pub errors_left: Vec<usize>,
    /// A Close signalbox sent to make room went unanswered: the
    /// connection's statements are no longer known for sure.
    pub closes_unknown: bool,
    /// The `client_encoding` the server reported (a SET, or its rollback).
    pub client_encoding: Option<String>,
    /// An error a hot standby gives for what only a primary can do
    /// (`25006` read-only transaction, or a `0A000`/`55000` naming
    /// recovery): a read judged safe was not.
    pub standby_refused: bool,
    /// A hot standby cancelled the statement because the WAL it replays
    /// conflicts with it (`40001`, e.g. rows the query could still see were
    /// vacuumed on the primary): nothing is wrong with the statement.
    pub recovery_conflict: bool,
}

/// Whether an ErrorResponse is a hot standby refusing work only a primary
/// can do.
fn refused_by_standby(body: &[u8]) -> bool {
    let (code, message) = wire::error_fields(body);
    match code.as_str() {
        "25006" => true,
        "0A000" | "55000" => message.contains("recovery"),
        _ => false,
    }
}

/// Whether an ErrorResponse is a standby cancelling a query for a conflict
/// with the WAL it replays. A standby gives `40001` for nothing else: it
/// refuses serializable transactions, the other source of that code.
fn cancelled_by_recovery(body: &[u8]) -> bool {
    wire::error_fields(body).0 == "40001"
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("backend: {0}")]
    Backend(WireError),
    #[error("client: {0}")]
    Client(WireError),
    /// The server sent a FATAL error (admin shutdown, terminated backend,
    /// immediate stop) and is closing the connection; the frame was not
    /// forwarded yet.
    #[error("the server ended the connection")]
    Terminated(Frame),
}

/// The client's socket and buffers. One task reads and writes it in turn,
/// so the stream is not split (a split stream takes a lock on every call).
pub struct ClientIo {
    pub stream: BoxStream,
    pub rbuf: BytesMut,
    pub out: BytesMut,
    /// Bytes written to the client so far: tells whether a failed exchange
    /// already showed the client anything (then it cannot be retried).
    pub sent: u64,
    pub limits: ClientLimits,
    /// Bytes of the message now arriving that count against the budget.
    pub reserved: usize,
    /// Bytes of complete large messages the session still holds (a batch
    /// waiting for its Sync): they count against the budget until
    /// [`ClientIo::release_held`].
    pub held: usize,
    /// When the client must have ended the batch holding them (Sync or
    /// Flush): held room is bounded in time like a message still arriving.
    pub held_due: Option<tokio::time::Instant>,
    /// When the message now arriving must be whole: set at its first
    /// read, so a client sending a byte now and then cannot stretch it.
    pub due: Option<tokio::time::Instant>,
    /// (server pid, pid the client was given): a notification the client's
    /// own server connection sent names the pid the client knows.
    pub pid_alias: Option<(i32, i32)>,
    /// Keep the exchange's last answers (its ReadyForQuery) unsent when the
    /// relay ends: the caller has work to finish before the client may
    /// learn that the exchange is over, and flushes itself.
    pub defer_ready: bool,
    /// The read buffer grew past the usual size (a large message): it may
    /// still hold that memory, so it is freed, not kept for reuse, when
    /// the client goes idle.
    pub rbuf_grew: bool,
}

impl ClientIo {
    /// A client connection with nothing read, written or held yet.
    pub fn new(stream: BoxStream, limits: ClientLimits) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            out: BytesMut::with_capacity(4 * 1024),
            sent: 0,
            limits,
            reserved: 0,
            held: 0,
            held_due: None,
            due: None,
            pid_alias: None,
            defer_ready: false,
            rbuf_grew: false,
        }
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        self.limits.budget.give(std::mem::take(&mut self.reserved));
        self.release_held();
    }
}

/// Memory all clients together may hold in large messages, partly received
/// or complete but not yet run (a batch waiting for its Sync): one client
/// cannot make signalbox buffer gigabytes, and many clients together cannot
/// either.
#[derive(Debug)]
pub struct MessageBudget {
    free: std::sync::atomic::AtomicUsize,
}

impl MessageBudget {
    /// Messages up to this size never count: they are bounded by the read
    /// buffer anyway.
    const SMALL: usize = 64 * 1024;

    pub fn new(bytes: usize) -> Self {
        Self {
            free: std::sync::atomic::AtomicUsize::new(bytes),
        }
    }

    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| f.checked_sub(n))
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.free.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// Bytes not reserved by a message in flight.
    pub fn free(&self) -> usize {
        self.free.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Bounds on what one client may make signalbox buffer or wait for.
#[derive(Clone, Debug)]
pub struct ClientLimits {
    pub max_message: usize,
    pub message_timeout: std::time::Duration,
    pub write_timeout: std::time::Duration,
    pub budget: std::sync::Arc<MessageBudget>,
}

impl ClientLimits {
    pub fn from_config(
        c: &crate::config::ClientsConfig,
        budget: std::sync::Arc<MessageBudget>,
    ) -> Self {
        Self {
            max_message: c.max_message_mb.max(1) << 20,
            message_timeout: std::time::Duration::from_secs(c.message_timeout_s.max(1)),
            write_timeout: std::time::Duration::from_secs(c.write_timeout_s.max(1)),
            budget,
        }
    }
}

impl ClientIo {
    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.sent += self.out.len() as u64;
            self.out.clear();
            // TLS keeps what the socket cannot take yet in a buffer of its
            // own and sends it only on the next write or a flush: the end
            // of an answer would wait there while the client waits for it.
            // (A plain socket's flush does nothing.)
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Flush while a server connection waits on this client: a client
    /// that takes no byte of it for the write timeout is given up on (the
    /// caller then cancels the statement and closes the connection). The
    /// limit is on making no progress, so a client that keeps reading,
    /// even slowly, keeps its connection.
    pub async fn flush_holding(&mut self) -> Result<(), WireError> {
        use tokio::io::AsyncWriteExt;
        let limit = self.limits.write_timeout;
        let stalled = || WireError::Stalled(limit.as_secs());
        let mut done = 0;
        while done < self.out.len() {
            let write = self.stream.write(&self.out[done..]);
            let n = tokio::time::timeout(limit, write)
                .await
                .map_err(|_| stalled())??;
            if n == 0 {
                return Err(WireError::Closed);
            }
            done += n;
            self.sent += n as u64;
        }
        self.out.clear();
        tokio::time::timeout(limit, self.stream.flush())
            .await
            .map_err(|_| stalled())??;
        Ok(())
    }

    /// A large message has started: count it against the shared budget
    /// before buffering it (refused with `53200` when there is no room).
    fn reserve_for_message(&mut self) -> Result<(), WireError> {
        if self.reserved > 0 || self.rbuf.len() < 5 {
            return Ok(());
        }
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        let len = usize::try_from(len).unwrap_or(0);
        if len <= MessageBudget::SMALL {
            return Ok(());
        }
        if !self.limits.budget.take(len) {
            return Err(WireError::OutOfMemory(len));
        }
        self.reserved = len;
        Ok(())
    }

    /// Read the first bytes of the client's next message, holding no
    /// buffers while there are none: an idle session keeps only its state,
    /// not 8 KiB to read into and what its last answer grew the output
    /// buffer to. The buffers go only once the client proves idle (its
    /// socket would block), so a client whose next message is already
    /// there reuses them; one that went idle allocates them again.
    async fn read_idle(&mut self) -> std::io::Result<usize> {
        use std::future::Future;
        use tokio::io::AsyncReadExt;
        let n = std::future::poll_fn(|cx| loop {
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let rbuf = std::mem::take(&mut self.rbuf);
                    if !std::mem::take(&mut self.rbuf_grew) {
                        spare::give(rbuf);
                    }
                    if self.out.is_empty() {
                        spare::give(std::mem::take(&mut self.out));
                    }
                    return Poll::Pending;
                }
            }
            spare::fill(&mut self.rbuf);
            let read = std::pin::pin!(self.stream.read_buf(&mut self.rbuf));
            match read.poll(cx) {
                // Readiness was stale (the last read emptied the socket
                // without hearing so); now it is not.
                Poll::Pending if self.stream.waits_unbuffered() => continue,
                other => return other,
            }
        })
        .await?;
        spare::fill(&mut self.out);
        Ok(n)
    }

    /// The session no longer holds any message it read: their room in
    /// the budget is free again.
    pub fn release_held(&mut self) {
        self.release_held_above(0);
    }

    /// Free the room of the messages held beyond `mark` bytes (those read
    /// since `held` was `mark`).
    pub fn release_held_above(&mut self, mark: usize) {
        if self.held > mark {
            self.limits.budget.give(self.held - mark);
            self.held = mark;
        }
        if self.held == 0 {
            self.held_due = None;
        }
    }

    /// Something was shown to the client since `mark`.
    pub fn progressed_since(&self, mark: u64) -> bool {
        self.sent != mark
    }

    /// The next message from the client. A message type PostgreSQL would
    /// not accept is refused at its first byte; a message that has started
    /// must arrive whole within the message timeout (no slowloris).
    pub async fn next(&mut self) -> Result<Frame, WireError> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(&tag) = self.rbuf.first() {
                if !wire::is_frontend_tag(tag) {
                    return Err(WireError::Protocol(format!(
                        "invalid frontend message type {tag}"
                    )));
                }
            }
            if let Some(f) = wire::take_frame(&mut self.rbuf, self.limits.max_message)? {
                // Still held by the session until its batch has gone out,
                // and only while the client keeps adding to the batch.
                if self.reserved > 0 {
                    self.held_due = Some(tokio::time::Instant::now() + self.limits.message_timeout);
                }
                self.held += std::mem::take(&mut self.reserved);
                self.due = None;
                return Ok(f);
            }
            self.reserve_for_message()?;
            let n = if self.rbuf.is_empty() {
                match self.held_due {
                    None => self.read_idle().await?,
                    Some(due) => tokio::time::timeout_at(due, self.read_idle())
                        .await
                        .map_err(|_| {
                            WireError::Protocol(format!(
                                "{} bytes of large messages waited for a Sync or Flush longer than the message timeout",
                                self.held
                            ))
                        })??,
                }
            } else {
                self.rbuf.reserve(8 * 1024);
                let limit = self.limits.message_timeout;
                let due = *self
                    .due
                    .get_or_insert_with(|| tokio::time::Instant::now() + limit);
                let read = self.stream.read_buf(&mut self.rbuf);
                tokio::time::timeout_at(due, read).await.map_err(|_| {
                    WireError::Protocol("incomplete message: the rest never arrived".into())
                })??
            };
            if n == 0 {
                return Err(WireError::Closed);
            }
            if self.rbuf.capacity() > spare::KEEP_MAX {
                self.rbuf_grew = true;
            }
        }
    }
}

/// Buffers of clients that went idle, kept per thread for the next client
/// that speaks: an idle client holds none (its memory is its state alone),
/// and a busy server does not free and allocate two buffers per statement.
mod spare {
    use bytes::BytesMut;
    use std::cell::RefCell;

    /// What one buffer is grown to before a read.
    const SIZE: usize = 8 * 1024;
    /// Buffers kept per thread: enough for the clients a worker serves
    /// between two waits, a bounded amount of memory either way.
    const KEEP: usize = 64;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// The largest buffer kept.
    pub const KEEP_MAX: usize = 2 * SIZE;

    /// Keep an empty buffer of about the usual size for reuse (the caller
    /// does not offer one that a large message grew); one too small to be
    /// worth it is freed.
    pub fn give(mut buf: BytesMut) {
        buf.clear();
        // Takes back the room of the messages split off it, if all are gone.
        if !buf.try_reclaim(SIZE) || buf.capacity() > KEEP_MAX {
            return;
        }
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(buf);
            }
        });
    }

    /// Make room for a read in `buf`, reusing a kept buffer if it has none.
    pub fn fill(buf: &mut BytesMut) {
        if buf.capacity() == 0 {
            if let Some(b) = SPARE.with(|s| s.borrow_mut().pop()) {
                *buf = b;
            }
        }
        buf.reserve(SIZE);
    }
}

/// How long answers may be held back from the client while waiting for the
/// rest of them, so that a retriable exchange that fails can still be retried.
const HOLD: std::time::Duration = std::time::Duration::from_millis(20);

/// Relay until the plan is exhausted. With `hold`, partial answers stay in
/// the client buffer (up to 64 KiB, and at most [`HOLD`] per wait) instead of
/// being flushed before each wait on the server: a small result the server
/// sends in pieces is either shown whole or not at all. The end of the
/// answer is left in the client buffer: the caller returns the server
/// connection first (a client slow to read holds only itself up), unless
/// it must act first (`defer_ready`) or run a refused read elsewhere.
/// `outcome` gathers what the answers showed, also when the connection is
/// lost part-way (`plan` then starts at the first step left unanswered).
pub async fn relay(
    conn: &mut BackendConn,
    client: &mut ClientIo,
    plan: &mut VecDeque<Step>,
    mut hold: bool,
    outcome: &mut Outcome,
) -> Result<(), RelayError> {
    loop {
        emit_synthetic(plan, &mut client.out);
        if plan.is_empty() {
            return Ok(());
        }
        while let Some(frame) = conn.take_frame().map_err(RelayError::Backend)? {
            if frame.tag == b'E' && wire::is_fatal(&frame.body) {
                conn.mark_broken();
                return Err(RelayError::Terminated(frame));
            }
            let alias = client.pid_alias;
            let copy_in = handle(&frame, plan, outcome, &mut client.out, alias);
            // What signalbox answers itself next (a Close or a Parse) goes
            // out now, not when the server speaks again: at the end of a
            // Flush-ended batch the server owes nothing more.
            emit_synthetic(plan, &mut client.out);
            if copy_in {
                // An extended-protocol COPY (its Execute still first, then
                // the batch's Sync): the server ignores that Sync while it
                // reads COPY data, and answers the one the client sends
                // after CopyDone instead.
                let sync_swallowed = matches!(plan.front(), Some(Step::Execute))
                    && plan.iter().any(|s| *s == Step::Sync);
                client.flush_holding().await.map_err(RelayError::Client)?;
                pump_copy_in(conn, client, sync_swallowed).await?;
            }
            if plan.is_empty() {
                return Ok(());
            }
            if client.out.len() > 64 * 1024 {
                client.flush_holding().await.map_err(RelayError::Client)?;
            }
        }
        if hold && !client.out.is_empty() && client.out.len() <= 64 * 1024 {
            match tokio::time::timeout(HOLD, wait_server(conn, client)).await {
                Ok(r) => r?,
                // Slow: show what there is (notices, first rows) and stream.
                Err(_) => hold = false,
            }
            continue;
        }
        if client.defer_ready && client.out.len() <= 64 * 1024 {
            // The caller must act before the client may see the end of this
            // exchange (a commit's CommandComplete as much as its
            // ReadyForQuery): a reply split across reads is not shown early.
            wait_server(conn, client).await?;
            continue;
        }
        client.flush_holding().await.map_err(RelayError::Client)?;
        wait_server(conn, client).await?;
    }
}

/// Wait for more from the server while watching the client: a client that
/// goes away meanwhile ends the exchange at once (its lease then cancels the
/// query and closes the connection) instead of holding a server connection
/// until the query is done. What the client sends meanwhile (pipelined
/// messages) is kept for later, up to one maximum-size message.
async fn wait_server(conn: &mut BackendConn, client: &mut ClientIo) -> Result<(), RelayError> {
    use tokio::io::AsyncReadExt;
    loop {
        let watch = client.rbuf.len() < client.limits.max_message;
        client.rbuf.reserve(if watch { 4096 } else { 0 });
        tokio::select! {
            // The server first: when it has data, the client costs nothing.
            biased;
            r = conn.fill() => return r.map_err(RelayError::Backend),
            r = client.stream.read_buf(&mut client.rbuf), if watch => match r {
                Ok(0) => return Err(RelayError::Client(WireError::Closed)),
                Ok(_) => {}
                Err(e) => return Err(RelayError::Client(e.into())),
            },
        }
    }
}

fn emit_synthetic(plan: &mut VecDeque<Step>, out: &mut BytesMut) {
    while let Some(step) = plan.front() {
        match step {
            Step::SynthParse => wire::parse_complete(out),
            Step::SynthClose => wire::close_complete(out),
            _ => return,
        }
        plan.pop_front();
    }
}

/// Process one backend frame; returns true when the backend now expects COPY
/// data from the client.
fn handle(
    frame: &Frame,
    plan: &mut VecDeque<Step>,
    outcome: &mut Outcome,
    out: &mut BytesMut,
    alias: Option<(i32, i32)>,
) -> bool {
    let front = plan.front().copied();
    let mut forward = true;
    match frame.tag {
        b'E' => {
            outcome.error = true;
            outcome.standby_refused |= refused_by_standby(&frame.body);
            outcome.recovery_conflict |= cancelled_by_recovery(&frame.body);
            outcome.errors_left.push(plan.len());
            // After an error the backend skips to the next Sync; so must we.
            while let Some(s) = plan.front() {
                match s {
                    Step::Sync | Step::Query => break,
                    Step::Parse { slot, .. } => outcome.failed_parses.push(*slot),
                    Step::CloseQuiet => outcome.closes_unknown = true,
                    _ => {}
                }
                plan.pop_front();
            }
        }
        b'S' => {
            let mut f = wire::Fields::new(&frame.body);
            if let (Ok("client_encoding"), Ok(value)) = (f.cstr(), f.cstr()) {
                outcome.client_encoding = Some(value.to_owned());
            }
        }
        b'Z' => {
            outcome.status = frame.body.first().copied();
            // Closes of signalbox's own the server skipped: whether those
            // statements still exist there is unknown.
            while plan.front() == Some(&Step::CloseQuiet) {
                plan.pop_front();
                outcome.closes_unknown = true;
            }
            if matches!(plan.front(), Some(Step::Sync | Step::Query)) {
                plan.pop_front();
            }
        }
        b'1' => {
            if let Some(Step::Parse { forward: f, .. }) = front {
                forward = f;
                plan.pop_front();
            }
        }
        b'2' if front == Some(Step::Bind) => {
            plan.pop_front();
        }
        b'2' if front == Some(Step::BindQuiet) => {
            plan.pop_front();
            forward = false;
        }
        b'3' if front == Some(Step::Close) => {
            plan.pop_front();
        }
        b'3' if matches!(front, Some(Step::CloseQuiet | Step::Scrub)) => {
            plan.pop_front();
            forward = false;
        }
        b'T' | b'n' if matches!(front, Some(Step::DescribeStatement | Step::DescribePortal)) => {
            plan.pop_front();
        }
        b'C' | b'I' | b's' => {
            if frame.tag == b'C' {
                let tag = frame.body.strip_suffix(&[0]).unwrap_or(&frame.body);
                outcome.last_tag = Some(match tag {
                    b"COMMIT" => LastTag::Commit,
                    b"ROLLBACK" => LastTag::Rollback,
                    _ => LastTag::Other,
                });
            }
            if front == Some(Step::Execute) {
                plan.pop_front();
            }
        }
        _ => {}
    }
    if forward {
        self::forward(frame, alias, out);
    }
    frame.tag == b'G'
}

/// Pass a server frame on to the client. A `NotificationResponse` sent by
/// the client's own server connection (it ran `NOTIFY` itself) names the
/// pid the client was given, as drivers compare it with their own.
pub fn forward(frame: &Frame, alias: Option<(i32, i32)>, out: &mut BytesMut) {
    match (frame.tag, alias) {
        (b'A', Some((server, client))) if frame.body.get(..4) == Some(&server.to_be_bytes()) => {
            let mut f = frame.clone();
            let mut body = BytesMut::from(&frame.body[..]);
            body[..4].copy_from_slice(&client.to_be_bytes());
            f.body = body.freeze();
            f.encode_into(out);
        }
        _ => frame.encode_into(out),
    }
}

/// Forward the client's COPY data until it ends the COPY. `sync_swallowed`:
/// the server ignored the Sync that followed the COPY's Execute, so the
/// client's Sync after CopyDone/CopyFail takes its place (it is forwarded
/// here, as the answer the exchange already waits for).
async fn pump_copy_in(
    conn: &mut BackendConn,
    client: &mut ClientIo,
    sync_swallowed: bool,
) -> Result<(), RelayError> {
    // The batch that started the COPY is still the session's; its
    // messages' deadline does not apply while the data flows.
    let held_by_batch = client.held;
    let held_due = client.held_due.take();
    let pumped = pump_copy_data(conn, client, sync_swallowed, held_by_batch).await;
    client.held_due = held_due.filter(|_| client.held > 0);
    pumped
}

async fn pump_copy_data(
    conn: &mut BackendConn,
    client: &mut ClientIo,
    sync_swallowed: bool,
    held_by_batch: usize,
) -> Result<(), RelayError> {
    let mut chunk = BytesMut::with_capacity(64 * 1024);
    let mut ended = false;
    loop {
        let f = client.next().await.map_err(RelayError::Client)?;
        match f.tag {
            b'd' | b'c' | b'f' if !ended => {
                f.encode_into(&mut chunk);
                if f.tag != b'd' || chunk.len() >= 64 * 1024 {
                    conn.send_frames(&chunk)
                        .await
                        .map_err(RelayError::Backend)?;
                    chunk.clear();
                    client.release_held_above(held_by_batch);
                }
                if f.tag != b'd' {
                    if !sync_swallowed {
                        return Ok(());
                    }
                    ended = true;
                }
            }
            b'S' if ended => {
                let mut sync = BytesMut::new();
                f.encode_into(&mut sync);
                conn.send_in_place_of_ignored_sync(&sync)
                    .await
                    .map_err(RelayError::Backend)?;
                return Ok(());
            }
            // Flush and Sync are ignored during COPY IN (protocol rule).
            b'H' | b'S' => {}
            other => {
                return Err(RelayError::Client(WireError::Protocol(format!(
                    "unexpected message '{}' during COPY",
                    other as char
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A client connection over `stream`, with small limits.
    fn client_io(stream: crate::tls::BoxStream) -> ClientIo {
        let limits = ClientLimits {
            max_message: 1 << 20,
            message_timeout: std::time::Duration::from_secs(5),
            write_timeout: std::time::Duration::from_secs(5),
            budget: std::sync::Arc::new(MessageBudget::new(1 << 20)),
        };
        ClientIo::new(stream, limits)
    }

    /// TLS keeps what the socket cannot take yet in a buffer of its own
    /// and sends it on the next write or a flush: a flush must leave
    /// nothing there, or the end of an answer waits while the client waits
    /// for it. (A pipe of 4 KiB stands for a full socket.)
    #[tokio::test]
    async fn a_flush_over_tls_leaves_nothing_behind() -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir()?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem())?;
        std::fs::write(&key, ck.signing_key.serialize_pem())?;
        let tls = crate::tls::client_tls(&cert, &key, false)?;
        let connector = crate::tls::connector(crate::tls::SslMode::Require, None)?
            .ok_or_else(|| anyhow::anyhow!("no connector"))?;
        let name = crate::tls::server_name("localhost").map_err(anyhow::Error::msg)?;
        let (near, far) = tokio::io::duplex(4096);
        let near: crate::tls::BoxStream = Box::new(near);
        let (ours, theirs) = tokio::join!(tls.acceptor.accept(near), connector.connect(name, far));
        let (ours, mut theirs) = (ours?, theirs?);
        let mut client = client_io(Box::new(ours));
        const ANSWER: usize = 100_000;
        let reader = tokio::spawn(async move {
            let (mut got, mut buf) = (0, vec![0u8; 8192]);
            while got < ANSWER {
                let read = theirs.read(&mut buf);
                match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
                    Ok(Ok(n)) if n > 0 => got += n,
                    _ => break,
                }
            }
            got
        });
        client.out.extend_from_slice(&[b'x'; ANSWER]);
        client.flush().await?;
        assert_eq!(reader.await?, ANSWER, "the end stayed in the TLS buffer");
        Ok(())
    }

    /// A session waiting for its client's next message holds no read or
    /// output buffer (thousands of idle clients cost only their state), and
    /// still reads what arrives next, whole.
    #[tokio::test]
    async fn an_idle_client_holds_no_buffers() -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let mut client = client_io(Box::new(server));
        let query = |sql: &str| {
            let mut m = vec![b'Q'];
            m.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
            m.extend_from_slice(sql.as_bytes());
            m.push(0);
            m
        };
        peer.write_all(&query("SELECT 1")).await?;
        let first = client.next().await?;
        assert_eq!(&first.body[..], b"SELECT 1\0");
        drop(first);
        client.out.extend_from_slice(b"an answer");
        client.flush().await?;
        // Idle: the wait for the next message times out.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(100), client.next()).await;
        assert!(waited.is_err(), "nothing was sent, nothing can be read");
        assert_eq!(client.rbuf.capacity(), 0, "read buffer held while idle");
        assert_eq!(client.out.capacity(), 0, "output buffer held while idle");
        // Two messages in one write, the second split across writes.
        let mut more = query("SELECT 2");
        let third = query("SELECT 3");
        more.extend_from_slice(&third[..4]);
        peer.write_all(&more).await?;
        assert_eq!(&client.next().await?.body[..], b"SELECT 2\0");
        peer.write_all(&third[4..]).await?;
        assert_eq!(&client.next().await?.body[..], b"SELECT 3\0");
        Ok(())
    }

    fn frame(tag: u8, body: &[u8]) -> Frame {
        Frame {
            tag,
            body: Bytes::copy_from_slice(body),
        }
    }

    /// Feed server frames through the plan; what reaches the client (types)
    /// and how the exchange ended.
    fn run(plan: &[Step], server: &[Frame]) -> (String, Outcome, usize) {
        let mut plan: VecDeque<Step> = plan.iter().copied().collect();
        let mut outcome = Outcome::default();
        let mut out = BytesMut::new();
        emit_synthetic(&mut plan, &mut out);
        for f in server {
            emit_synthetic(&mut plan, &mut out);
            handle(f, &mut plan, &mut outcome, &mut out, Some((7, 4_200_000)));
        }
        emit_synthetic(&mut plan, &mut out);
        let seen: String = wire::frames(&out).map(|(t, _)| t as char).collect();
        (seen, outcome, plan.len())
    }

    #[test]
    fn response_plan_table() {
        let injected = Step::Parse {
            forward: false,
            slot: 0,
        };
        let parse = Step::Parse {
            forward: true,
            slot: 0,
        };
        let ok = |t| frame(t, b"");
        let tag = frame(b'C', b"SELECT 1\0");
        let ready = frame(b'Z', b"I");
        let error = frame(b'E', b"SERROR\0C42P01\0Mno\0\0");
        // (plan, server frames) → (client sees, error, status, steps left)
        type Case = (Vec<Step>, Vec<Frame>, &'static str, bool, Option<u8>, usize);
        let cases: Vec<Case> = vec![
            // An injected re-Parse's answer is dropped.
            (
                vec![injected, Step::Bind, Step::Execute, Step::Sync],
                vec![
                    ok(b'1'),
                    ok(b'2'),
                    frame(b'D', b"\0\0"),
                    tag.clone(),
                    ready.clone(),
                ],
                "2DCZ",
                false,
                Some(b'I'),
                0,
            ),
            // A Parse the connection had is answered by signalbox.
            (
                vec![Step::SynthParse, Step::Bind, Step::Execute, Step::Sync],
                vec![ok(b'2'), tag.clone(), ready.clone()],
                "12CZ",
                false,
                Some(b'I'),
                0,
            ),
            // After an error the server skips to Sync: so does the plan, and
            // the Parse that never completed is reported.
            (
                vec![parse, Step::Bind, Step::Execute, Step::Sync],
                vec![error.clone(), ready.clone()],
                "EZ",
                true,
                Some(b'I'),
                0,
            ),
            // Flush-ended: answers owed until the client's Sync.
            (
                vec![parse, Step::Bind],
                vec![ok(b'1'), ok(b'2')],
                "12",
                false,
                None,
                0,
            ),
            // A simple query is whole at its ReadyForQuery.
            (
                vec![Step::Query],
                vec![frame(b'T', b"\0\0"), tag.clone(), frame(b'Z', b"T")],
                "TCZ",
                false,
                Some(b'T'),
                0,
            ),
        ];
        for (i, (plan, server, seen, error, status, left)) in cases.into_iter().enumerate() {
            let (got, outcome, rest) = run(&plan, &server);
            assert_eq!(got, seen, "case {i}");
            assert_eq!(outcome.error, error, "case {i}");
            assert_eq!(outcome.status, status, "case {i}");
            assert_eq!(rest, left, "case {i}");
        }
        let (_, outcome, _) = run(
            &[parse, Step::Bind, Step::Execute, Step::Sync],
            &[error, ready],
        );
        assert_eq!(outcome.failed_parses, vec![0]);
        assert_eq!(
            outcome.errors_left,
            vec![4],
            "the error was the first step's"
        );
    }
}
