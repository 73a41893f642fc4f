//! Relaying a backend's answers to the client, frame by frame, without
//! decoding rows. A *plan* lists the responses the backend owes for what was
//! sent; it lets the relay drop answers to messages signalbox injected (a
//! re-`Parse` on a connection that lacked the statement), emit answers for
//! messages it did not forward (a `Parse` the connection already had), and
//! know when the exchange is complete.

use std::collections::VecDeque;

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

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
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
    Sync,
    /// Send `ParseComplete` to the client ourselves.
    SynthParse,
    /// Send `CloseComplete` to the client ourselves.
    SynthClose,
}

/// What the exchange ended with.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Transaction status of the last `ReadyForQuery`, if one arrived.
    pub status: Option<u8>,
    pub error: bool,
    /// Tag of the last `CommandComplete`, e.g. `COMMIT`.
    pub last_tag: Option<String>,
    /// Parse slots skipped or failed because of an error: those statements
    /// are not prepared on the connection.
    pub failed_parses: Vec<u32>,
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

/// The client's socket halves and buffers.
pub struct ClientIo {
    pub read: ReadHalf<BoxStream>,
    pub write: WriteHalf<BoxStream>,
    pub rbuf: BytesMut,
    pub out: BytesMut,
    /// Bytes written to the client so far: tells whether a failed exchange
    /// already showed the client anything (then it cannot be retried).
    pub sent: u64,
    pub limits: ClientLimits,
}

/// Bounds on what one client may make signalbox buffer or wait for.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    pub max_message: usize,
    pub message_timeout: std::time::Duration,
}

impl ClientLimits {
    pub fn from_config(c: &crate::config::ClientsConfig) -> Self {
        Self {
            max_message: c.max_message_mb.max(1) << 20,
            message_timeout: std::time::Duration::from_secs(c.message_timeout_s.max(1)),
        }
    }
}

impl ClientIo {
    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.out.is_empty() {
            self.write.write_all(&self.out).await?;
            self.sent += self.out.len() as u64;
            self.out.clear();
        }
        Ok(())
    }

    /// Something was shown to (or queued for) the client since `mark`.
    pub fn progressed_since(&self, mark: u64) -> bool {
        self.sent != mark || !self.out.is_empty()
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
                return Ok(f);
            }
            let started = !self.rbuf.is_empty();
            self.rbuf.reserve(8 * 1024);
            let read = self.read.read_buf(&mut self.rbuf);
            let n = if !started {
                read.await?
            } else {
                tokio::time::timeout(self.limits.message_timeout, read)
                    .await
                    .map_err(|_| {
                        WireError::Protocol("incomplete message: the rest never arrived".into())
                    })??
            };
            if n == 0 {
                return Err(WireError::Closed);
            }
        }
    }
}

/// Relay until the plan is exhausted.
pub async fn relay(
    conn: &mut BackendConn,
    client: &mut ClientIo,
    plan: &mut VecDeque<Step>,
) -> Result<Outcome, RelayError> {
    let mut outcome = Outcome::default();
    loop {
        emit_synthetic(plan, &mut client.out);
        if plan.is_empty() {
            client.flush().await.map_err(RelayError::Client)?;
            return Ok(outcome);
        }
        while let Some(frame) = conn.take_frame().map_err(RelayError::Backend)? {
            if frame.tag == b'E' && wire::is_fatal(&frame.body) {
                conn.mark_broken();
                return Err(RelayError::Terminated(frame));
            }
            emit_synthetic(plan, &mut client.out);
            let copy_in = handle(&frame, plan, &mut outcome, &mut client.out);
            if copy_in {
                client.flush().await.map_err(RelayError::Client)?;
                pump_copy_in(conn, client).await?;
            }
            if plan.is_empty() {
                client.flush().await.map_err(RelayError::Client)?;
                return Ok(outcome);
            }
            if client.out.len() > 64 * 1024 {
                client.flush().await.map_err(RelayError::Client)?;
            }
        }
        client.flush().await.map_err(RelayError::Client)?;
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
            r = client.read.read_buf(&mut client.rbuf), if watch => match r {
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
) -> bool {
    let front = plan.front().copied();
    let mut forward = true;
    match frame.tag {
        b'E' => {
            outcome.error = true;
            // After an error the backend skips to the next Sync; so must we.
            while let Some(s) = plan.front() {
                match s {
                    Step::Sync | Step::Query => break,
                    Step::Parse { slot, .. } => outcome.failed_parses.push(*slot),
                    _ => {}
                }
                plan.pop_front();
            }
        }
        b'Z' => {
            outcome.status = frame.body.first().copied();
            if matches!(front, Some(Step::Sync | Step::Query)) {
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
        b'3' if front == Some(Step::Close) => {
            plan.pop_front();
        }
        b'T' | b'n' if matches!(front, Some(Step::DescribeStatement | Step::DescribePortal)) => {
            plan.pop_front();
        }
        b'C' | b'I' | b's' => {
            if frame.tag == b'C' {
                let tag = frame.body.strip_suffix(&[0]).unwrap_or(&frame.body);
                outcome.last_tag = Some(String::from_utf8_lossy(tag).into_owned());
            }
            if front == Some(Step::Execute) {
                plan.pop_front();
            }
        }
        _ => {}
    }
    if forward {
        frame.encode_into(out);
    }
    frame.tag == b'G'
}

/// Forward the client's COPY data until it ends the COPY.
async fn pump_copy_in(conn: &mut BackendConn, client: &mut ClientIo) -> Result<(), RelayError> {
    let mut chunk = BytesMut::with_capacity(64 * 1024);
    loop {
        let f = client.next().await.map_err(RelayError::Client)?;
        match f.tag {
            b'd' | b'c' | b'f' => {
                f.encode_into(&mut chunk);
                if f.tag != b'd' || chunk.len() >= 64 * 1024 {
                    conn.send_frames(&chunk)
                        .await
                        .map_err(RelayError::Backend)?;
                    chunk.clear();
                }
                if f.tag != b'd' {
                    return Ok(());
                }
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
