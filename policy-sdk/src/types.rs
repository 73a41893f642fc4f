//! The plain Rust values a policy reads and returns.
//!
//! Inside the wasm sandbox, everything of variable size (SQL text, names, tags,
//! per-backend state) is fetched from the host on first use and cached for the
//! rest of the call, so a policy pays only for what it reads. In native tests the
//! same types are built directly with the builder methods below.

use std::cell::OnceCell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

/// What kind of statement is being routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatementKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Ddl,
    Transaction,
    Session,
    Copy,
    Call,
    Explain,
    Show,
    Utility,
}

impl StatementKind {
    /// The WIT name, also used in fixtures and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Select => "select",
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Merge => "merge",
            Self::Ddl => "ddl",
            Self::Transaction => "transaction",
            Self::Session => "session",
            Self::Copy => "copy",
            Self::Call => "call",
            Self::Explain => "explain",
            Self::Show => "show",
            Self::Utility => "utility",
        }
    }
}

/// Transaction state of the session when the statement arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxState {
    #[default]
    Idle,
    InTransaction,
    Failed,
}

/// The role a node currently reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    #[default]
    Replica,
    Unknown,
}

/// Log level for [`crate::host::log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

pub type Pairs = Vec<(String, String)>;

fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// A lazily fetched value: pre-filled in tests, fetched from the host in wasm.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lazy<T>(OnceCell<T>);

impl<T> Lazy<T> {
    pub(crate) fn filled(value: T) -> Self {
        let cell = OnceCell::new();
        let _ = cell.set(value);
        Self(cell)
    }

    pub(crate) fn get(&self, fetch: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(fetch)
    }

    pub(crate) fn get_mut_or_default(&mut self) -> &mut T
    where
        T: Default,
    {
        if self.0.get().is_none() {
            let _ = self.0.set(T::default());
        }
        self.0.get_mut().expect("just filled")
    }
}

/// The statement being routed.
#[derive(Clone, Debug)]
pub struct Statement {
    pub kind: StatementKind,
    /// Proven safe to run on a hot standby. The host enforces this regardless
    /// of the decision, so a policy cannot misroute a write.
    pub read_only: bool,
    pub fingerprint: u64,
    pub sql_len: u32,
    pub(crate) hint_count: u32,
    pub(crate) sql: Lazy<String>,
    pub(crate) tables: Lazy<Vec<String>>,
    pub(crate) functions: Lazy<Vec<String>>,
    pub(crate) hints: Lazy<Pairs>,
}

impl Statement {
    /// A statement of the given kind; `read_only` as the classifier would say.
    pub fn new(kind: StatementKind, read_only: bool) -> Self {
        Self {
            kind,
            read_only,
            fingerprint: 0,
            sql_len: 0,
            hint_count: 0,
            sql: Lazy::filled(String::new()),
            tables: Lazy::filled(Vec::new()),
            functions: Lazy::filled(Vec::new()),
            hints: Lazy::filled(Vec::new()),
        }
    }

    /// A read-only `SELECT` with this text.
    pub fn read(sql: &str) -> Self {
        Self::new(StatementKind::Select, true).with_sql(sql)
    }

    /// A write of the given kind with this text.
    pub fn write(kind: StatementKind, sql: &str) -> Self {
        Self::new(kind, false).with_sql(sql)
    }

    pub fn with_sql(mut self, sql: &str) -> Self {
        self.sql_len = sql.len() as u32;
        self.sql = Lazy::filled(sql.to_owned());
        self
    }

    pub fn with_table(mut self, table: &str) -> Self {
        self.tables.get_mut_or_default().push(table.to_owned());
        self
    }

    pub fn with_function(mut self, function: &str) -> Self {
        self.functions
            .get_mut_or_default()
            .push(function.to_owned());
        self
    }

    pub fn with_hint(mut self, key: &str, value: &str) -> Self {
        self.hints
            .get_mut_or_default()
            .push((key.to_owned(), value.to_owned()));
        self.hint_count += 1;
        self
    }

    pub fn with_fingerprint(mut self, fingerprint: u64) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// The SQL text (the host may cap very long statements).
    pub fn sql(&self) -> &str {
        self.sql.get(crate::host::fetch::statement_sql)
    }

    /// Tables the statement touches, schema-qualified when the query was.
    pub fn tables(&self) -> &[String] {
        self.tables.get(crate::host::fetch::statement_tables)
    }

    /// Functions the statement calls, lower-cased.
    pub fn functions(&self) -> &[String] {
        self.functions.get(crate::host::fetch::statement_functions)
    }

    /// All `key=value` hints from a leading `/* signalbox: ... */` comment.
    pub fn hints(&self) -> &[(String, String)] {
        if self.hint_count == 0 {
            return &[];
        }
        self.hints.get(crate::host::fetch::statement_hints)
    }

    /// One hint by key (case-insensitive).
    pub fn hint(&self, key: &str) -> Option<&str> {
        lookup(self.hints(), key)
    }
}

/// The client session the statement came from.
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub id: u64,
    pub tx_state: TxState,
    pub read_only_tx: bool,
    pub ms_since_last_write: Option<u64>,
    /// The WAL position this session's reads must see (its scopes' last
    /// committed write, or a `signalbox.min_lsn` token); none if nothing.
    pub write_lsn: Option<u64>,
    pub(crate) user: Lazy<String>,
    pub(crate) database: Lazy<String>,
    pub(crate) application_name: Lazy<String>,
    pub(crate) client_addr: Lazy<String>,
    pub(crate) attributes: Lazy<Pairs>,
}

impl Session {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            user: Lazy::filled(String::new()),
            database: Lazy::filled(String::new()),
            application_name: Lazy::filled(String::new()),
            client_addr: Lazy::filled(String::new()),
            attributes: Lazy::filled(Vec::new()),
            ..Self::default()
        }
    }

    pub fn with_user(mut self, user: &str) -> Self {
        self.user = Lazy::filled(user.to_owned());
        self
    }

    pub fn with_database(mut self, database: &str) -> Self {
        self.database = Lazy::filled(database.to_owned());
        self
    }

    pub fn with_application_name(mut self, name: &str) -> Self {
        self.application_name = Lazy::filled(name.to_owned());
        self
    }

    pub fn with_client_addr(mut self, addr: &str) -> Self {
        self.client_addr = Lazy::filled(addr.to_owned());
        self
    }

    pub fn with_attribute(mut self, key: &str, value: &str) -> Self {
        self.attributes
            .get_mut_or_default()
            .push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn with_tx_state(mut self, state: TxState) -> Self {
        self.tx_state = state;
        self
    }

    pub fn with_last_write_ms_ago(mut self, ms: u64) -> Self {
        self.ms_since_last_write = Some(ms);
        self.write_lsn = self.write_lsn.or(Some(1));
        self
    }

    pub fn user(&self) -> &str {
        self.user.get(crate::host::fetch::session_user)
    }

    pub fn database(&self) -> &str {
        self.database.get(crate::host::fetch::session_database)
    }

    pub fn application_name(&self) -> &str {
        self.application_name
            .get(crate::host::fetch::session_application_name)
    }

    pub fn client_addr(&self) -> &str {
        self.client_addr
            .get(crate::host::fetch::session_client_addr)
    }

    /// Extra session attributes (startup `options`, set by the host; forward compatible).
    pub fn attributes(&self) -> &[(String, String)] {
        self.attributes.get(crate::host::fetch::session_attributes)
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        lookup(self.attributes(), key)
    }

    /// Inside an explicit transaction (healthy or failed).
    pub fn in_transaction(&self) -> bool {
        self.tx_state != TxState::Idle
    }
}

/// The static part of a node: changes only with the configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub id: u32,
    pub name: String,
    pub weight: u32,
    pub tags: Pairs,
}

/// One backend node: its static description plus its live state.
#[derive(Clone, Debug)]
pub struct Backend {
    pub id: u32,
    pub role: Role,
    pub healthy: bool,
    pub lag_ms: Option<u32>,
    pub lag_bytes: u64,
    pub replayed_last_write: bool,
    pub in_flight: u32,
    pub idle: u32,
    pub latency_us: u32,
    pub(crate) info: Rc<NodeInfo>,
    /// [`crate::select::stable_hash`] of the name, which the hashing
    /// helpers mix per call: computed once per node, not per statement.
    pub(crate) name_hash: u64,
}

impl Backend {
    fn with_role(id: u32, name: &str, role: Role) -> Self {
        Self {
            id,
            role,
            healthy: true,
            lag_ms: if role == Role::Replica { Some(0) } else { None },
            lag_bytes: 0,
            replayed_last_write: true,
            in_flight: 0,
            idle: 0,
            latency_us: 0,
            info: Rc::new(NodeInfo {
                id,
                name: name.to_owned(),
                weight: 1,
                tags: Vec::new(),
            }),
            name_hash: crate::select::stable_hash(name.as_bytes()),
        }
    }

    /// A healthy primary with no load.
    pub fn primary(id: u32, name: &str) -> Self {
        Self::with_role(id, name, Role::Primary)
    }

    /// A healthy, caught-up replica with no load.
    pub fn replica(id: u32, name: &str) -> Self {
        Self::with_role(id, name, Role::Replica)
    }

    pub fn with_lag_ms(mut self, ms: u32) -> Self {
        self.lag_ms = Some(ms);
        self
    }

    pub fn with_in_flight(mut self, n: u32) -> Self {
        self.in_flight = n;
        self
    }

    pub fn unhealthy(mut self) -> Self {
        self.healthy = false;
        self
    }

    pub fn behind_last_write(mut self) -> Self {
        self.replayed_last_write = false;
        self
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        Rc::make_mut(&mut self.info).weight = weight;
        self
    }

    pub fn with_tag(mut self, key: &str, value: &str) -> Self {
        Rc::make_mut(&mut self.info)
            .tags
            .push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn weight(&self) -> u32 {
        self.info.weight
    }

    pub fn tags(&self) -> &[(String, String)] {
        &self.info.tags
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        lookup(&self.info.tags, key)
    }

    pub fn is_replica(&self) -> bool {
        self.role == Role::Replica
    }
}

/// Every backend node, in id order. Fetched from the host on first use.
#[derive(Clone, Debug, Default)]
pub struct Backends(pub(crate) Lazy<Vec<Backend>>);

impl Backends {
    pub fn new(backends: Vec<Backend>) -> Self {
        Self(Lazy::filled(backends))
    }

    pub fn all(&self) -> &[Backend] {
        self.0.get(crate::host::fetch::backends)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Backend> {
        self.all().iter()
    }

    pub fn by_id(&self, id: u32) -> Option<&Backend> {
        self.iter().find(|b| b.id == id)
    }

    pub fn by_name(&self, name: &str) -> Option<&Backend> {
        self.iter().find(|b| b.name() == name)
    }

    /// The node currently reporting itself primary.
    pub fn primary(&self) -> Option<&Backend> {
        self.iter().find(|b| b.role == Role::Primary)
    }

    /// Replicas that are up (whatever their lag).
    pub fn healthy_replicas(&self) -> impl Iterator<Item = &Backend> + Clone {
        self.iter().filter(|b| b.is_replica() && b.healthy)
    }
}

impl<'a> IntoIterator for &'a Backends {
    type Item = &'a Backend;
    type IntoIter = std::slice::Iter<'a, Backend>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Where the statement should go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Primary,
    Replica(u32),
    AnyReplica,
    /// A healthy replica that replayed the session's `write_lsn`; if none
    /// has, wait up to this many milliseconds for one, then the primary.
    CaughtUpReplica(u32),
    Default,
    Reject(String),
}

/// A policy's answer: a target and an optional short reason for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub reason: Option<String>,
}

impl Decision {
    pub fn primary() -> Self {
        Self::to(Target::Primary)
    }

    pub fn replica(id: u32) -> Self {
        Self::to(Target::Replica(id))
    }

    pub fn any_replica() -> Self {
        Self::to(Target::AnyReplica)
    }

    /// A replica that has replayed this session's last write, waiting up to
    /// `wait_ms` for one to catch up (the host watches the replicas'
    /// positions), else the primary. Without a write it is any replica.
    pub fn caught_up_replica(wait_ms: u32) -> Self {
        Self::to(Target::CaughtUpReplica(wait_ms))
    }

    /// Let the host's built-in routing decide.
    pub fn builtin() -> Self {
        Self::to(Target::Default)
    }

    pub fn reject(message: impl Into<String>) -> Self {
        Self::to(Target::Reject(message.into()))
    }

    /// `replica(b.id)` when a backend was picked, otherwise the primary.
    pub fn replica_or_primary(picked: Option<&Backend>) -> Self {
        match picked {
            Some(b) => Self::replica(b.id),
            None => Self::primary(),
        }
    }

    pub fn to(target: Target) -> Self {
        Self {
            target,
            reason: None,
        }
    }

    /// Attach a short reason (keep it low-cardinality: it becomes a metrics label).
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}
