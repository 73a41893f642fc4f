//! The client's prepared statements (extended protocol) and the translation
//! of a batch for whichever server connection it lands on. Client names map
//! to server names derived from the SQL, so clients share server statements;
//! a statement the connection lacks is re-prepared in front of its first use
//! (and the server's answer to that injected Parse dropped), and a Parse the
//! connection already has is answered by signalbox. Pure: the caller passes
//! the set of statements the connection has prepared.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::message::{Kind, Message};
use super::relay::Step;
use crate::cluster::backend::ServerStatements;
use crate::sql::classify::Classified;
use crate::wire::{self, WireError};

/// A statement the client prepared.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The text as UTF-8, for the classifier and the policy.
    pub sql: Arc<str>,
    /// The text as the client sent it (its client encoding): what servers get.
    pub text: Bytes,
    pub param_types: Bytes,
    /// Empty for the unnamed statement (never kept across connections).
    pub server_name: String,
    pub class: Arc<Classified>,
}

impl Prepared {
    pub fn new(
        name: &str,
        sql: Arc<str>,
        text: Bytes,
        param_types: Bytes,
        class: Arc<Classified>,
        encoding: &str,
    ) -> Self {
        let server_name = if name.is_empty() {
            String::new()
        } else {
            server_name(&text, &param_types, encoding)
        };
        // Copied out of the client's read buffer, which the statement
        // would otherwise keep alive whole (8 KiB or more for a few bytes,
        // for as long as the name lives) and which could then not be
        // reused for the client's next read.
        Self {
            sql,
            text: Bytes::copy_from_slice(&text),
            param_types: match &param_types[..] {
                // (No parameter types given: the common case.)
                [0, 0] => Bytes::from_static(&[0, 0]),
                types => Bytes::copy_from_slice(types),
            },
            server_name,
            class,
        }
    }
}

/// A batch rewritten for one connection.
#[derive(Debug, Default)]
pub struct Translated {
    pub bytes: BytesMut,
    /// The answers the server owes (or signalbox makes up), in order.
    pub plan: VecDeque<Step>,
    /// Server statement names prepared by each Parse slot.
    pub slots: Vec<Option<String>>,
    /// Server statements closed to stay within the cap.
    pub evicted: usize,
    /// For each step of `plan`, the batch message it answers (`u32::MAX`:
    /// none, a Close of signalbox's own in front of the batch).
    pub owners: Vec<u32>,
}

/// The batch messages at which the server failed, from the
/// [`Outcome::errors_left`](super::relay::Outcome) of an exchange of a
/// batch whose plan had `plan_len` steps, answering messages `owners`
/// ([`Translated::owners`]).
pub fn failed_messages(owners: &[u32], plan_len: usize, errors_left: &[usize]) -> Vec<usize> {
    errors_left
        .iter()
        .filter_map(|left| owners.get(plan_len.checked_sub(*left)?))
        .map(|&m| if m == u32::MAX { BEFORE } else { m as usize })
        .collect()
}

/// In [`failed_messages`]: a Close signalbox put in front of the batch
/// failed, so the server skipped the batch up to its first Sync.
pub const BEFORE: usize = usize::MAX;

/// The client's statements by name ("" is the unnamed statement).
#[derive(Default)]
pub struct Statements {
    named: HashMap<String, Arc<Prepared>>,
    unnamed: Option<Arc<Prepared>>,
    /// What they hold ([`cost`]), and at most how much (0: no limit).
    bytes: usize,
    limit: usize,
    /// Room freed by the batch in hand in its current Sync segment, and in
    /// earlier ones. A Parse may use the first (were what freed it skipped
    /// after an error, so would the Parse), not the second until the
    /// answers show it was freed: a skipped Close is undone. (The session
    /// ends a batch at its first Sync, so today only the first applies.)
    freed: usize,
    held_back: usize,
}

/// What a statement holds in signalbox, near enough.
fn cost(p: &Prepared) -> usize {
    p.sql.len() + p.text.len() + p.param_types.len() + 256
}

/// A Parse refused as PostgreSQL would fail it (its name is taken) or for
/// signalbox's own limit. The server is made to fail at the same point, so
/// that it too skips what follows up to Sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    /// The statement a server runs to fail with this error: an error in
    /// the middle of a batch must be the server's, for it to skip the rest
    /// of the batch and roll back its implicit transaction. (Quote marks
    /// and dollar signs in the message are replaced: it is inside quotes.)
    pub fn raise_sql(&self) -> String {
        let message: String = self
            .message
            .chars()
            .map(|c| match c {
                '$' | '\\' => '?',
                c if c.is_ascii() && !c.is_ascii_control() => c,
                _ => '?',
            })
            .collect();
        format!(
            "DO $sb$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = $m${message}$m$; END$sb$",
            self.code
        )
    }
}

/// A change message `at` of a batch made to the client's statements, kept
/// until the server's answers show whether the message ran (PostgreSQL
/// skips what follows an error up to the next Sync).
#[derive(Debug)]
pub struct Change {
    at: usize,
    before: Option<Arc<Prepared>>,
}

/// The statement each message of a batch names, resolved in the batch's
/// order (what a name means can change within a batch): for a Parse the
/// statement it prepares, for a Bind or statement Describe the one its name
/// meant at that point; `None` for other messages and unknown names.
pub type Uses = [Option<Arc<Prepared>>];

impl Statements {
    /// A client's statements, holding at most `limit` bytes (0: no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Name `p`; what the name held before.
    pub fn define(&mut self, name: &str, p: Arc<Prepared>) -> Option<Arc<Prepared>> {
        self.put(name, Some(p))
    }

    fn put(&mut self, name: &str, p: Option<Arc<Prepared>>) -> Option<Arc<Prepared>> {
        self.bytes += p.as_deref().map_or(0, cost);
        let before = match (name.is_empty(), p) {
            (true, p) => std::mem::replace(&mut self.unnamed, p),
            (false, Some(p)) => self.named.insert(name.to_owned(), p),
            (false, None) => self.named.remove(name),
        };
        self.bytes -= before.as_deref().map_or(0, cost);
        before
    }

    /// Whether a Parse of `p` as `name` fails, and how.
    fn refusal(&self, name: &str, p: &Prepared) -> Option<Refusal> {
        if !name.is_empty() && self.named.contains_key(name) {
            return Some(Refusal {
                code: "42P05",
                message: format!("prepared statement \"{name}\" already exists"),
            });
        }
        let replaced = self.get(name).map_or(0, |old| cost(old));
        if self.limit > 0 && self.bytes + self.held_back - replaced + cost(p) > self.limit {
            return Some(Refusal {
                code: "53400",
                message: format!(
                    "this connection's prepared statements would hold more than clients.statement_memory_mb ({} MB) in signalbox: close some first",
                    self.limit >> 20
                ),
            });
        }
        None
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    /// Forget a statement ("" the unnamed one); whether the client had it.
    pub fn forget(&mut self, name: &str) -> bool {
        self.put(name, None).is_some()
    }

    pub fn clear(&mut self) {
        self.named.clear();
        self.unnamed = None;
        self.bytes = 0;
        self.freed = 0;
        self.held_back = 0;
    }

    /// Apply message `at` of a batch to the client's names, in the batch's
    /// order, noting what it changed in `changes`; the statement the
    /// message names (see [`Uses`]), or why a Parse fails. `parsed`: the
    /// statement a Parse prepares.
    pub fn apply(
        &mut self,
        at: usize,
        m: &Message,
        parsed: Option<Prepared>,
        changes: &mut Vec<Change>,
    ) -> Result<Option<Arc<Prepared>>, Refusal> {
        let (name, p) = match (&m.kind, parsed) {
            (Kind::Parse { name, .. }, Some(p)) => match self.refusal(name, &p) {
                Some(refusal) => {
                    // A failed Parse of the unnamed statement still ends
                    // the one before it.
                    if name.is_empty() {
                        self.note(at, name, None, changes);
                    }
                    return Err(refusal);
                }
                None => (name, Some(Arc::new(p))),
            },
            (
                Kind::Bind {
                    statement: name, ..
                }
                | Kind::Describe { kind: b'S', name },
                _,
            ) => return Ok(self.get(name).cloned()),
            (Kind::Close { kind: b'S', name }, _) => (name, None),
            (Kind::Sync, _) => {
                self.held_back += std::mem::take(&mut self.freed);
                return Ok(None);
            }
            _ => return Ok(None),
        };
        self.note(at, name, p.clone(), changes);
        Ok(p)
    }

    /// Set `name` to `p` for message `at`, noting the change.
    fn note(&mut self, at: usize, name: &str, p: Option<Arc<Prepared>>, changes: &mut Vec<Change>) {
        let defines = p.is_some();
        let before = self.put(name, p);
        self.freed += before.as_deref().map_or(0, cost);
        if defines || before.is_some() {
            changes.push(Change { at, before });
        }
    }

    /// Bring the client's names to what PostgreSQL has after running
    /// `batch` (applied with [`apply`](Self::apply), noting `changes`).
    /// `failed`: the messages at which the server failed (each of them and
    /// what follows it up to the next Sync did not run; a failed Parse of
    /// the unnamed statement still ended the one before it), in order;
    /// `None`: no server answered, so nothing ran.
    pub fn settle(
        &mut self,
        batch: &[Message],
        uses: &Uses,
        changes: &mut Vec<Change>,
        failed: Option<&[usize]>,
    ) {
        const RAN: u8 = 0;
        const SKIPPED: u8 = 1;
        const FAILED: u8 = 2;
        // What is left now stands for what ran.
        self.freed = 0;
        self.held_back = 0;
        let fate = match failed {
            Some([]) => {
                changes.clear();
                return;
            }
            // (Each error is in a segment of its own: linear in all.)
            Some(failed) => {
                let mut fate = vec![RAN; batch.len()];
                for &f in failed {
                    let start = if f == BEFORE { 0 } else { f };
                    let segment = batch.iter().enumerate().skip(start);
                    for (i, _) in segment.take_while(|(_, m)| m.kind != Kind::Sync) {
                        fate[i] = SKIPPED;
                    }
                    if let Some(x) = fate.get_mut(f) {
                        *x = FAILED;
                    }
                }
                fate
            }
            None => vec![SKIPPED; batch.len()],
        };
        if changes.iter().all(|c| fate.get(c.at) == Some(&RAN)) {
            changes.clear();
            return;
        }
        for c in changes.drain(..).rev() {
            if let Some(name) = batch.get(c.at).and_then(named) {
                self.put(name, c.before);
            }
        }
        for (i, (m, used)) in batch.iter().zip(uses).enumerate() {
            match (&m.kind, fate[i]) {
                (Kind::Parse { name, .. }, FAILED) if name.is_empty() => {
                    self.put("", None);
                }
                (_, SKIPPED | FAILED) => {}
                (Kind::Parse { name, .. }, _) => {
                    if let Some(p) = used {
                        self.put(name, Some(p.clone()));
                    }
                }
                (Kind::Close { kind: b'S', name }, _) => {
                    self.put(name, None);
                }
                _ => {}
            }
        }
    }
}

/// The statement name a Parse or statement Close changes.
fn named(m: &Message) -> Option<&str> {
    match &m.kind {
        Kind::Parse { name, .. } | Kind::Close { kind: b'S', name } => Some(name),
        _ => None,
    }
}

/// What the server connection's unnamed statement holds, as far as this
/// batch knows.
enum Unnamed<'a> {
    /// Whatever an earlier batch left, possibly another client's.
    Unknown,
    Empty,
    Holds(&'a Arc<Prepared>),
}

/// Rewrite `batch` (its statements resolved in `uses`) for a connection that
/// has prepared `on_server` (updated with what the rewritten batch
/// prepares). Beyond `cap` statements there (0: no cap), the least recently
/// used are closed in front of the batch. `sql_prepared`: the connection
/// is the session's own and may hold statements it made with SQL `PREPARE`,
/// which a name the client did not prepare here may mean. Leaves the
/// client's statements alone, so the same batch can be translated again
/// for another connection.
pub fn translate(
    batch: &[Message],
    uses: &Uses,
    refused: &[(usize, Refusal)],
    on_server: &mut ServerStatements,
    cap: usize,
    sql_prepared: bool,
) -> Result<Translated, WireError> {
    let mut t = Translated::default();
    translate_into(&mut t, batch, uses, refused, on_server, cap, sql_prepared)?;
    Ok(t)
}

/// [`translate`] into `t`, reusing its buffers (the session keeps one).
pub fn translate_into(
    t: &mut Translated,
    batch: &[Message],
    uses: &Uses,
    refused: &[(usize, Refusal)],
    on_server: &mut ServerStatements,
    cap: usize,
    sql_prepared: bool,
) -> Result<(), WireError> {
    t.bytes.clear();
    t.plan.clear();
    t.slots.clear();
    t.evicted = 0;
    t.owners.clear();
    t.owners.reserve(batch.len() + 2);
    let mut refused = refused.iter().peekable();
    on_server.start_batch();
    let mut unnamed = Unnamed::Unknown;
    for (i, (m, used)) in batch.iter().zip(uses).enumerate() {
        if let Some((_, refusal)) = refused.next_if(|r| r.0 == i) {
            t.raise(refusal);
            // (Holds the statement that raises it.)
            unnamed = Unnamed::Unknown;
            t.owners.resize(t.plan.len(), i as u32);
            continue;
        }
        match (&m.kind, used) {
            (Kind::Parse { name, .. }, Some(p)) if !name.is_empty() => {
                if on_server.has(&p.server_name) {
                    t.plan.push_back(Step::SynthParse);
                } else {
                    t.reparse(p, true, on_server);
                }
            }
            (Kind::Parse { name, .. }, _) if name.is_empty() => {
                m.frame.encode_into(&mut t.bytes);
                t.parse(true, None);
                unnamed = used.as_ref().map_or(Unnamed::Empty, Unnamed::Holds);
            }
            // The session gives every Parse its statement.
            (Kind::Parse { name, .. }, None) => {
                return Err(WireError::Protocol(format!(
                    "internal: statement \"{name}\" was not registered"
                )))
            }
            (Kind::Bind { statement, .. }, _) => {
                match t.target(statement, used, &mut unnamed, on_server, sql_prepared) {
                    Some(server) => wire::bind_renamed(&mut t.bytes, &m.frame.body, server)?,
                    None => m.frame.encode_into(&mut t.bytes),
                }
                t.plan.push_back(Step::Bind);
            }
            (Kind::Describe { kind: b'S', name }, _) => {
                match t.target(name, used, &mut unnamed, on_server, sql_prepared) {
                    Some(server) => wire::describe(&mut t.bytes, b'S', server),
                    None => m.frame.encode_into(&mut t.bytes),
                }
                t.plan.push_back(Step::DescribeStatement);
            }
            (Kind::Describe { .. }, _) => {
                m.frame.encode_into(&mut t.bytes);
                t.plan.push_back(Step::DescribePortal);
            }
            // Server statements are shared by SQL text: keep it prepared
            // for others; the client's name is already forgotten.
            (Kind::Close { kind: b'S', name }, _) if !name.is_empty() => {
                t.plan.push_back(Step::SynthClose);
            }
            (Kind::Close { kind, .. }, _) => {
                if *kind == b'S' {
                    unnamed = Unnamed::Empty;
                }
                m.frame.encode_into(&mut t.bytes);
                t.plan.push_back(Step::Close);
            }
            (Kind::Execute { .. }, _) => {
                m.frame.encode_into(&mut t.bytes);
                t.plan.push_back(Step::Execute);
            }
            (Kind::Sync, _) => {
                m.frame.encode_into(&mut t.bytes);
                t.plan.push_back(Step::Sync);
            }
            (Kind::Flush, _) => m.frame.encode_into(&mut t.bytes),
            _ => {}
        }
        t.owners.resize(t.plan.len(), i as u32);
    }
    // Syncs alone may be ending a server's skip after an error, when it
    // ignores all but the Sync (Closes sent with them would go
    // unanswered): they make no room.
    if batch.iter().any(|m| m.kind != Kind::Sync) {
        t.close_first(on_server.evict(cap));
    }
    Ok(())
}

impl Translated {
    /// A Parse slot; `forward`: the client sent it and awaits its answer.
    fn parse(&mut self, forward: bool, server_name: Option<String>) {
        self.plan.push_back(Step::Parse {
            forward,
            slot: self.slots.len() as u32,
        });
        self.slots.push(server_name);
    }

    /// The server name a Bind/Describe of client statement `name` (resolved
    /// to `used`) uses, re-preparing it first when the connection lacks it.
    /// `None`: send the message unchanged: the unnamed statement (made to
    /// hold the client's), or a name the client does not have, which the
    /// server then reports as PostgreSQL does.
    fn target<'a>(
        &mut self,
        name: &str,
        used: &'a Option<Arc<Prepared>>,
        unnamed: &mut Unnamed<'a>,
        on_server: &mut ServerStatements,
        sql_prepared: bool,
    ) -> Option<&'a str> {
        match (name.is_empty(), used) {
            (false, Some(p)) => {
                if !on_server.has(&p.server_name) {
                    self.reparse(p, false, on_server);
                }
                return Some(&p.server_name);
            }
            (true, Some(p)) => {
                if !matches!(unnamed, Unnamed::Holds(q) if Arc::ptr_eq(p, q)) {
                    wire::parse(&mut self.bytes, "", &p.text, &p.param_types);
                    self.parse(false, None);
                    *unnamed = Unnamed::Holds(p);
                }
            }
            // What the server holds under a name the client lacks is not
            // the client's (another client's unnamed statement, a shared
            // server statement): close it, so the server reports it missing.
            (true, None) if !matches!(unnamed, Unnamed::Empty) => {
                self.close("", Step::Scrub);
                *unnamed = Unnamed::Empty;
            }
            (false, None) if is_server_name(name) => {
                // Tracked: if the server skips this Close after an error,
                // the connection's statements are no longer known.
                self.close(name, Step::CloseQuiet);
                on_server.remove(name);
            }
            (false, None) if !sql_prepared => self.close(name, Step::Scrub),
            (_, None) => {}
        }
        None
    }

    /// Make the server fail here as `refusal` says, with a statement of
    /// signalbox's own in the unnamed statement and portal; only its error
    /// reaches the client.
    fn raise(&mut self, refusal: &Refusal) {
        wire::parse(&mut self.bytes, "", refusal.raise_sql().as_bytes(), &[0, 0]);
        self.parse(false, None);
        wire::bind_plain(&mut self.bytes, "", "");
        self.plan.push_back(Step::BindQuiet);
        wire::execute(&mut self.bytes, "");
        self.plan.push_back(Step::Execute);
    }

    /// A Close of signalbox's own in the middle of the batch.
    fn close(&mut self, name: &str, step: Step) {
        wire::close(&mut self.bytes, b'S', name);
        self.plan.push_back(step);
    }

    fn reparse(&mut self, p: &Prepared, forward: bool, on_server: &mut ServerStatements) {
        wire::parse(&mut self.bytes, &p.server_name, &p.text, &p.param_types);
        on_server.insert(p.server_name.clone());
        self.parse(forward, Some(p.server_name.clone()));
    }

    /// Close `names` on the server before the batch; their CloseComplete
    /// answers are signalbox's, not the client's.
    fn close_first(&mut self, names: Vec<String>) {
        if names.is_empty() {
            return;
        }
        let mut bytes = BytesMut::new();
        for name in &names {
            wire::close(&mut bytes, b'S', name);
            self.plan.push_front(Step::CloseQuiet);
        }
        self.owners.splice(0..0, names.iter().map(|_| u32::MAX));
        bytes.extend_from_slice(&self.bytes);
        self.bytes = bytes;
        self.evicted = names.len();
    }
}

/// Server-side statement name: the same SQL and parameter types share one
/// prepared statement per backend connection, whichever client prepared it.
/// The same bytes in another client encoding are another statement.
pub fn server_name(text: &[u8], types: &[u8], encoding: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    encoding.hash(&mut h);
    types.hash(&mut h);
    format!("sb_{:016x}", h.finish())
}

/// Whether `name` has the shape of a [`server_name`].
pub fn is_server_name(name: &str) -> bool {
    name.len() == 19 && name.starts_with("sb_") && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    fn msg(build: impl FnOnce(&mut BytesMut)) -> Message {
        let mut out = BytesMut::new();
        build(&mut out);
        let frame: Frame = wire::take_frame(&mut out, 1 << 20).unwrap().unwrap();
        Message::decode(frame).unwrap()
    }

    fn parse(name: &str, sql: &str) -> Message {
        msg(|o| wire::parse(o, name, sql.as_bytes(), &[0, 0]))
    }

    fn bind(stmt: &str) -> Message {
        msg(|o| wire::bind_renamed(o, b"\0x\0\0\0\0\0\0\0", stmt).unwrap())
    }

    fn execute() -> Message {
        msg(|o| {
            let f = Frame {
                tag: b'E',
                body: Bytes::from_static(b"\0\0\0\0\0"),
            };
            f.encode_into(o)
        })
    }

    fn sync() -> Message {
        msg(|o| {
            Frame {
                tag: b'S',
                body: Bytes::new(),
            }
            .encode_into(o)
        })
    }

    #[test]
    fn a_statement_keeps_none_of_the_clients_read_buffer() {
        // A Parse decoded from a buffer that holds more than it: what the
        // statement keeps must not point into that buffer, or each name
        // would keep a whole read buffer alive (beyond what the statement
        // memory limit counts) and the buffer could not be reused.
        let mut buffer = BytesMut::new();
        wire::parse(&mut buffer, "s1", b"SELECT $1::int", &[0, 1, 0, 0, 0, 23]);
        buffer.extend_from_slice(&[0; 4096]);
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let frame = wire::take_frame(&mut buffer, 1 << 20).unwrap().unwrap();
        let Kind::Parse {
            name,
            text,
            param_types,
        } = Message::decode(frame).unwrap().kind
        else {
            panic!("not a Parse");
        };
        assert!(
            range.contains(&(text.as_ptr() as usize)),
            "the test's premise"
        );
        let p = Prepared::new(
            &name,
            Arc::from("SELECT $1::int"),
            text,
            param_types,
            Arc::new(Classified::nothing()),
            "UTF8",
        );
        assert_eq!(&p.text[..], b"SELECT $1::int");
        assert_eq!(&p.param_types[..], &[0, 1, 0, 0, 0, 23]);
        assert!(!range.contains(&(p.text.as_ptr() as usize)));
        assert!(!range.contains(&(p.param_types.as_ptr() as usize)));
    }

    /// The client's view of a batch, as the session builds it.
    fn apply(st: &mut Statements, batch: &[Message]) -> Vec<Option<Arc<Prepared>>> {
        let mut changes = Vec::new();
        apply_noting(st, batch, &mut changes)
    }

    fn apply_noting(
        st: &mut Statements,
        batch: &[Message],
        changes: &mut Vec<Change>,
    ) -> Vec<Option<Arc<Prepared>>> {
        let prepared = |m: &Message| match &m.kind {
            Kind::Parse {
                name,
                text,
                param_types,
            } => {
                let class = Arc::new(Classified::nothing());
                let sql = Arc::from(String::from_utf8_lossy(text).as_ref());
                let (text, types) = (text.clone(), param_types.clone());
                Some(Prepared::new(name, sql, text, types, class, "UTF8"))
            }
            _ => None,
        };
        let uses = batch.iter().enumerate();
        uses.map(|(i, m)| st.apply(i, m, prepared(m), changes).unwrap_or(None))
            .collect()
    }

    fn define(st: &mut Statements, batch: &[Message]) {
        apply(st, batch);
    }

    /// Apply `batch` and translate it for a connection that has `on_server`.
    fn run(
        st: &mut Statements,
        batch: &[Message],
        on_server: &mut ServerStatements,
        cap: usize,
    ) -> Result<Translated, WireError> {
        let uses = apply(st, batch);
        translate(batch, &uses, &[], on_server, cap, false)
    }

    /// The (type, statement name) of each message signalbox would send.
    fn sent(t: &Translated) -> Vec<(char, String)> {
        wire::frames(&t.bytes)
            .map(|(tag, body)| {
                let name = match tag {
                    b'P' => body.split(|b| *b == 0).next().unwrap_or_default(),
                    b'B' => body.split(|b| *b == 0).nth(1).unwrap_or_default(),
                    _ => b"",
                };
                (tag as char, String::from_utf8_lossy(name).into_owned())
            })
            .collect()
    }

    #[test]
    fn translation_table() {
        let sql = "SELECT $1";
        let server = server_name(sql.as_bytes(), &[0, 0], "UTF8");
        let p = || Step::Parse {
            forward: true,
            slot: 0,
        };
        let injected = || Step::Parse {
            forward: false,
            slot: 0,
        };
        // (connection already has it, client batch) → (sent, plan)
        type Case = (bool, Vec<Message>, Vec<(char, String)>, Vec<Step>);
        let cases: Vec<Case> = vec![
            // First Parse of a named statement: prepared under the server name.
            (
                false,
                vec![parse("s1", sql), bind("s1"), execute(), sync()],
                vec![
                    ('P', server.clone()),
                    ('B', server.clone()),
                    ('E', "".into()),
                    ('S', "".into()),
                ],
                vec![p(), Step::Bind, Step::Execute, Step::Sync],
            ),
            // The connection has it: the Parse is answered by signalbox.
            (
                true,
                vec![parse("s1", sql), bind("s1"), execute(), sync()],
                vec![('B', server.clone()), ('E', "".into()), ('S', "".into())],
                vec![Step::SynthParse, Step::Bind, Step::Execute, Step::Sync],
            ),
            // Bind on a connection that lacks it: re-prepared, answer dropped.
            (
                false,
                vec![bind("s1"), execute(), sync()],
                vec![
                    ('P', server.clone()),
                    ('B', server.clone()),
                    ('E', "".into()),
                    ('S', "".into()),
                ],
                vec![injected(), Step::Bind, Step::Execute, Step::Sync],
            ),
            // A name the client never prepared goes through as is, after a
            // Close of whatever the server may hold under it (the server
            // answers 26000 as PostgreSQL would).
            (
                false,
                vec![bind("nope"), sync()],
                vec![('C', "".into()), ('B', "nope".into()), ('S', "".into())],
                vec![Step::Scrub, Step::Bind, Step::Sync],
            ),
        ];
        for (i, (has, batch, want_sent, want_plan)) in cases.into_iter().enumerate() {
            let mut st = Statements::default();
            // (A Parse of a name the client has would be refused.)
            let parses_s1 = batch
                .iter()
                .any(|m| matches!(&m.kind, Kind::Parse { name, .. } if name == "s1"));
            if !parses_s1 {
                define(&mut st, &[parse("s1", sql)]);
            }
            let mut on_server = ServerStatements::default();
            if has {
                on_server.insert(server.clone());
            }
            let t = run(&mut st, &batch, &mut on_server, 0).unwrap();
            assert_eq!(sent(&t), want_sent, "case {i}");
            assert_eq!(Vec::from(t.plan.clone()), want_plan, "case {i}");
            assert!(
                on_server.contains(&server) || want_sent.iter().all(|(t, _)| *t != 'P'),
                "case {i}"
            );
        }
    }

    #[test]
    fn unnamed_statement_is_reparsed_once_per_batch_and_close_forgets_the_name() {
        let mut st = Statements::default();
        define(&mut st, &[parse("", "SELECT 1")]);
        let mut on_server = ServerStatements::default();
        let t = run(
            &mut st,
            &[bind(""), execute(), bind(""), execute(), sync()],
            &mut on_server,
            0,
        )
        .unwrap();
        let parses = sent(&t).iter().filter(|(t, _)| *t == 'P').count();
        assert_eq!(parses, 1);
        define(&mut st, &[parse("s2", "SELECT 2")]);
        let close = msg(|o| wire::close(o, b'S', "s2"));
        let t = run(&mut st, &[close, sync()], &mut on_server, 0).unwrap();
        assert_eq!(
            Vec::from(t.plan.clone()),
            vec![Step::SynthClose, Step::Sync]
        );
        assert!(
            sent(&t).iter().all(|(t, _)| *t != 'C'),
            "shared server statement kept"
        );
        assert!(st.get("s2").is_none());
    }

    #[test]
    fn beyond_the_cap_the_least_recently_used_server_statements_are_closed_first() {
        let mut st = Statements::default();
        let names = ["s1", "s2", "s3", "s4"];
        for (i, n) in names.iter().enumerate() {
            define(&mut st, &[parse(n, &format!("SELECT {i}"))]);
        }
        let server = |n: &str| st.get(n).unwrap().server_name.clone();
        let (s1, s2, s3, s4) = (server("s1"), server("s2"), server("s3"), server("s4"));
        let mut on_server = ServerStatements::default();
        // s1, s2, s3 prepared in that order (cap 3: nothing closed yet).
        for n in ["s1", "s2", "s3"] {
            let t = run(&mut st, &[bind(n), execute(), sync()], &mut on_server, 3);
            assert_eq!(t.unwrap().evicted, 0);
        }
        // s1 used again: now s2 is the least recently used.
        run(&mut st, &[bind("s1"), execute(), sync()], &mut on_server, 3).unwrap();
        let t = run(&mut st, &[bind("s4"), execute(), sync()], &mut on_server, 3).unwrap();
        assert_eq!(t.evicted, 1);
        // The Close goes first, and its answer is signalbox's own.
        let closes: Vec<_> = wire::frames(&t.bytes)
            .filter(|(tag, _)| *tag == b'C')
            .map(|(_, body)| String::from_utf8_lossy(&body[1..body.len() - 1]).into_owned())
            .collect();
        assert_eq!(closes, vec![s2.clone()]);
        assert_eq!(
            wire::frames(&t.bytes).next().map(|(tag, _)| tag),
            Some(b'C')
        );
        assert_eq!(t.plan.front(), Some(&Step::CloseQuiet));
        assert!(!on_server.contains(&s2));
        assert!(on_server.contains(&s1) && on_server.contains(&s3) && on_server.contains(&s4));
        // A batch that uses more than the cap keeps all of its own.
        let t = run(
            &mut st,
            &[
                bind("s1"),
                execute(),
                bind("s2"),
                execute(),
                bind("s3"),
                execute(),
                bind("s4"),
                execute(),
                sync(),
            ],
            &mut on_server,
            3,
        )
        .unwrap();
        assert_eq!(t.evicted, 0);
        assert_eq!(on_server.len(), 4);
        // No cap: nothing is ever closed.
        let t = run(&mut st, &[bind("s1"), execute(), sync()], &mut on_server, 0).unwrap();
        assert_eq!(t.evicted, 0);
    }

    fn close(name: &str) -> Message {
        msg(|o| wire::close(o, b'S', name))
    }

    /// The plan of `batch` for a connection that holds nothing of the
    /// client's, and the names its Closes (of signalbox's own) name.
    fn plan_of(
        st: &mut Statements,
        batch: &[Message],
        sql_prepared: bool,
    ) -> (Vec<Step>, Vec<String>) {
        let uses = apply(st, batch);
        let mut on_server = ServerStatements::default();
        let t = translate(batch, &uses, &[], &mut on_server, 0, sql_prepared).unwrap();
        let closes = wire::frames(&t.bytes)
            .filter(|(tag, _)| *tag == b'C')
            .map(|(_, body)| String::from_utf8_lossy(&body[1..body.len() - 1]).into_owned())
            .collect();
        (Vec::from(t.plan), closes)
    }

    #[test]
    fn names_resolve_in_batch_order_and_what_is_not_the_clients_is_closed_first() {
        let injected = |slot| Step::Parse {
            forward: false,
            slot,
        };
        let forwarded = |slot| Step::Parse {
            forward: true,
            slot,
        };
        // Closed and prepared again: each Bind runs the statement its name
        // meant at that point.
        let mut st = Statements::default();
        let batch = [
            parse("s1", "SELECT 'A'"),
            bind("s1"),
            close("s1"),
            parse("s1", "SELECT 'B'"),
            bind("s1"),
            sync(),
        ];
        let uses = apply(&mut st, &batch);
        let a = uses[0].clone().unwrap();
        let b = uses[3].clone().unwrap();
        assert!(Arc::ptr_eq(uses[1].as_ref().unwrap(), &a));
        assert!(Arc::ptr_eq(uses[4].as_ref().unwrap(), &b));
        let mut on_server = ServerStatements::default();
        let t = translate(&batch, &uses, &[], &mut on_server, 0, false).unwrap();
        assert_eq!(
            sent(&t),
            vec![
                ('P', a.server_name.clone()),
                ('B', a.server_name.clone()),
                ('P', b.server_name.clone()),
                ('B', b.server_name.clone()),
                ('S', "".into()),
            ]
        );
        assert!(Arc::ptr_eq(st.get("s1").unwrap(), &b));
        // The unnamed statement from before the batch, then a new one.
        let mut st = Statements::default();
        apply(&mut st, &[parse("", "SELECT 'A'")]);
        let batch = [bind(""), parse("", "SELECT 'B'"), bind(""), sync()];
        let (plan, closes) = plan_of(&mut st, &batch, false);
        assert_eq!(
            plan,
            vec![
                injected(0),
                Step::Bind,
                forwarded(1),
                Step::Bind,
                Step::Sync
            ]
        );
        assert!(closes.is_empty());
        // No unnamed statement of the client's: what the server holds is
        // closed first, once.
        let mut st = Statements::default();
        let (plan, closes) = plan_of(&mut st, &[bind(""), bind(""), sync()], false);
        assert_eq!(plan, vec![Step::Scrub, Step::Bind, Step::Bind, Step::Sync]);
        assert_eq!(closes, vec![String::new()]);
        // A simple query (or a Close) ends the client's unnamed statement.
        st.define(
            "",
            Arc::new(Prepared::new(
                "",
                Arc::from("SELECT 1"),
                Bytes::from_static(b"SELECT 1"),
                Bytes::new(),
                Arc::new(Classified::nothing()),
                "UTF8",
            )),
        );
        assert!(st.forget(""));
        let (plan, _) = plan_of(&mut st, &[bind(""), sync()], false);
        assert_eq!(plan, vec![Step::Scrub, Step::Bind, Step::Sync]);
        // A shared server statement's name: closed and no longer counted.
        let shared = server_name(b"SELECT 'theirs'", &[0, 0], "UTF8");
        let (plan, closes) = plan_of(&mut st, &[bind(&shared), sync()], false);
        assert_eq!(plan, vec![Step::CloseQuiet, Step::Bind, Step::Sync]);
        assert_eq!(closes, vec![shared]);
        // Another name the client lacks: closed, unless the session's own
        // connection may hold it from SQL PREPARE.
        let (plan, closes) = plan_of(&mut st, &[bind("other"), sync()], false);
        assert_eq!(plan, vec![Step::Scrub, Step::Bind, Step::Sync]);
        assert_eq!(closes, vec!["other".to_string()]);
        let (plan, closes) = plan_of(&mut st, &[bind("other"), sync()], true);
        assert_eq!(plan, vec![Step::Bind, Step::Sync]);
        assert!(closes.is_empty());
    }

    /// What the server skipped after an error, or refused, changes no name:
    /// PostgreSQL runs nothing after an error up to the next Sync.
    #[test]
    fn what_follows_an_error_up_to_its_sync_leaves_the_names_alone() {
        let sql = |p: Option<&Arc<Prepared>>| p.map(|p| p.sql.to_string());
        let mut st = Statements::default();
        define(
            &mut st,
            &[parse("s1", "SELECT 'A'"), parse("", "SELECT 'U'")],
        );
        // The Execute fails: the Close and the Parse behind it never ran;
        // the Parse after the Sync did.
        let batch = [
            bind("s1"),
            execute(),
            close("s1"),
            parse("s2", "SELECT 'B'"),
            sync(),
            parse("s3", "SELECT 'C'"),
            sync(),
        ];
        let mut changes = Vec::new();
        let uses = apply_noting(&mut st, &batch, &mut changes);
        st.settle(&batch, &uses, &mut changes, Some(&[1]));
        assert_eq!(sql(st.get("s1")).as_deref(), Some("SELECT 'A'"));
        assert!(st.get("s2").is_none());
        assert_eq!(sql(st.get("s3")).as_deref(), Some("SELECT 'C'"));
        assert!(changes.is_empty());
        // A failed Parse leaves the name as it was; of the unnamed
        // statement, it ends the one before.
        let batch = [parse("s1", "SELEC 'X'"), sync(), parse("", "SELEC"), sync()];
        let uses = apply_noting(&mut st, &batch, &mut changes);
        st.settle(&batch, &uses, &mut changes, Some(&[0, 2]));
        assert_eq!(sql(st.get("s1")).as_deref(), Some("SELECT 'A'"));
        assert!(st.get("").is_none());
        // Without an error everything stands.
        let batch = [close("s1"), parse("", "SELECT 'V'"), sync()];
        let uses = apply_noting(&mut st, &batch, &mut changes);
        st.settle(&batch, &uses, &mut changes, Some(&[]));
        assert!(st.get("s1").is_none());
        assert_eq!(sql(st.get("")).as_deref(), Some("SELECT 'V'"));
        // No server answered (no node, the policy refused): nothing ran.
        let batch = [parse("s9", "SELECT 9"), close(""), sync()];
        let uses = apply_noting(&mut st, &batch, &mut changes);
        st.settle(&batch, &uses, &mut changes, None);
        assert!(st.get("s9").is_none());
        assert_eq!(sql(st.get("")).as_deref(), Some("SELECT 'V'"));
    }

    /// An error is traced back to the client's message its step answers,
    /// whatever signalbox put in front of it.
    #[test]
    fn an_error_is_traced_to_the_message_that_failed() {
        let mut st = Statements::default();
        let batch = [parse("s1", "SELECT 1"), sync()];
        define(&mut st, &batch);
        let batch = [bind("s1"), execute(), sync()];
        let uses = apply(&mut st, &batch);
        let mut on_server = ServerStatements::default();
        let t = translate(&batch, &uses, &[], &mut on_server, 0, false).unwrap();
        // Parse (re-prepared for the Bind), Bind, Execute, Sync.
        assert_eq!(t.owners, vec![0, 0, 1, 2]);
        let n = t.plan.len();
        assert_eq!(failed_messages(&t.owners, n, &[n]), vec![0]);
        assert_eq!(failed_messages(&t.owners, n, &[n - 1]), vec![0]);
        assert_eq!(failed_messages(&t.owners, n, &[2]), vec![1]);
        // Closes made to stay within the cap answer no message of the
        // client's: an error there skips from the batch's start.
        let mut on_server = ServerStatements::default();
        for i in 0..3 {
            let batch = [parse(&format!("c{i}"), &format!("SELECT {i}")), sync()];
            let uses = apply(&mut st, &batch);
            translate(&batch, &uses, &[], &mut on_server, 0, false).unwrap();
        }
        let t = translate(&batch, &uses, &[], &mut on_server, 2, false).unwrap();
        let (n, closed) = (t.plan.len(), t.evicted);
        assert!(closed > 0);
        assert!(
            t.owners[..closed].iter().all(|o| *o == u32::MAX),
            "{:?}",
            t.plan
        );
        assert_eq!(t.owners[closed], 0, "{:?}", t.plan);
        assert_eq!(failed_messages(&t.owners, n, &[n]), vec![BEFORE]);
    }

    /// A Parse of a name the client has fails as in PostgreSQL (42P05), as
    /// does one beyond the memory limit (53400); the server is made to fail
    /// at the same point, and only its error reaches the client.
    #[test]
    fn refused_parses_fail_on_the_server_at_their_place() {
        let mut st = Statements::new(2400);
        let mut changes = Vec::new();
        let first = [parse("s1", "SELECT 1"), sync()];
        apply_noting(&mut st, &first, &mut changes);
        let prepared = |name: &str, sql: &str| {
            let class = Arc::new(Classified::nothing());
            let text = Bytes::copy_from_slice(sql.as_bytes());
            Prepared::new(
                name,
                Arc::from(sql),
                text,
                Bytes::from_static(&[0, 0]),
                class,
                "UTF8",
            )
        };
        let again = parse("s1", "SELECT 2");
        let refused = st
            .apply(0, &again, Some(prepared("s1", "SELECT 2")), &mut changes)
            .unwrap_err();
        assert_eq!(refused.code, "42P05");
        assert_eq!(refused.message, "prepared statement \"s1\" already exists");
        assert_eq!(st.get("s1").map(|p| &*p.sql), Some("SELECT 1"));
        let big = "SELECT '".to_owned() + &"x".repeat(1000) + "'";
        let refused = st
            .apply(
                0,
                &parse("s2", &big),
                Some(prepared("s2", &big)),
                &mut changes,
            )
            .unwrap_err();
        assert_eq!(refused.code, "53400");
        assert!(st.get("s2").is_none());
        // A refused Parse of the unnamed statement ends the one before, as
        // a failed one does in PostgreSQL.
        let small = parse("", "SELECT 'U'");
        st.apply(0, &small, Some(prepared("", "SELECT 'U'")), &mut changes)
            .unwrap();
        assert!(st.get("").is_some());
        let refused = st
            .apply(0, &parse("", &big), Some(prepared("", &big)), &mut changes)
            .unwrap_err();
        assert_eq!(refused.code, "53400");
        assert!(st.get("").is_none());
        // Room a Close frees counts in its own Sync segment only: a Close
        // the server skips after an error is undone, and a Parse after the
        // Sync would then be beyond the limit.
        for (same_segment, fits) in [(false, false), (true, true)] {
            let mut st = Statements::new(2400);
            let mut changes = Vec::new();
            apply_noting(&mut st, &[parse("a", &big), sync()], &mut changes);
            changes.clear();
            let mut batch = vec![close("a"), sync(), parse("b", &big), sync()];
            if same_segment {
                batch.remove(1);
            }
            let last = batch.len() - 2;
            let got: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let parsed = (i == last).then(|| prepared("b", &big));
                    st.apply(i, m, parsed, &mut changes)
                })
                .collect();
            assert_eq!(got[last].is_ok(), fits, "same segment: {same_segment}");
        }
        // Closing makes room again.
        st.forget("s1");
        assert!(st
            .apply(
                0,
                &parse("s2", &big),
                Some(prepared("s2", &big)),
                &mut changes
            )
            .is_ok());

        let batch = [parse("s2", "SELECT 3"), bind("s2"), execute(), sync()];
        let uses = vec![None, st.get("s2").cloned(), None, None];
        let refusals = [(
            0,
            Refusal {
                code: "42P05",
                message: "prepared statement \"s2\" already exists".into(),
            },
        )];
        let mut on_server = ServerStatements::default();
        let t = translate(&batch, &uses, &refusals, &mut on_server, 0, false).unwrap();
        let sent = sent(&t);
        assert_eq!(
            sent[..3],
            [
                ('P', String::new()),
                ('B', String::new()),
                ('E', String::new())
            ]
        );
        let raise = wire::frames(&t.bytes)
            .next()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned());
        assert!(
            raise.as_deref().is_some_and(|r| r.contains("DO $sb$BEGIN RAISE EXCEPTION USING ERRCODE = '42P05', MESSAGE = $m$prepared statement \"s2\" already exists$m$")),
            "{raise:?}"
        );
        let injected = Step::Parse {
            forward: false,
            slot: 0,
        };
        assert_eq!(
            t.plan.iter().take(3).copied().collect::<Vec<_>>(),
            [injected, Step::BindQuiet, Step::Execute]
        );
        assert_eq!(&t.owners[..3], &[0, 0, 0]);
    }
}
