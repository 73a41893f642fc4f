//! Configuration (TOML, strict: unknown keys are errors).
//!
//! One file describes the listener, the nodes, the pools, health checking,
//! client authentication, the admin API and the policy. Errors name the file,
//! the key (and line, for syntax and type errors) and the reason. Credentials
//! are never required in the file: any string may use `${ENV_VAR}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole `signalbox.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to, e.g. `127.0.0.1:6432`.
    pub listen: SocketAddr,
    /// Admin HTTP API (`/health`, `/status`, `/metrics`, `POST /policy/reload`,
    /// `POST /policy/rollback`).
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token of the admin API (use `${ENV_VAR}`). Required when
    /// `admin_listen` is not a loopback address, and then asked of every
    /// request; on loopback it guards the endpoints that change something.
    pub admin_token: Option<String>,
    /// Threads serving clients (default: half the cores, at least one).
    pub workers: Option<usize>,
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub clients: ClientsConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub classifier: ClassifierConfig,
    #[serde(default)]
    pub read_your_writes: RywConfig,
    /// TLS for clients connecting to signalbox.
    pub tls: Option<TlsConfig>,
    /// Without a policy, built-in routing applies.
    pub policy: Option<PolicyConfig>,
    /// A candidate policy asked the same questions as `[policy]` on live
    /// traffic without deciding anything: disagreements are counted and
    /// shown on `/status`. Same keys as `[policy]`.
    pub shadow_policy: Option<PolicyConfig>,
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Where the file was read from (relative policy paths start there).
    #[serde(skip)]
    pub origin: PathBuf,
}

/// `scheme://user:password@host` → `scheme://user:***@host`, everywhere in
/// `text`.
pub fn redact_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '/'))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(a), Some(c)) if c < a => {
                out.push_str(&authority[..=c]);
                out.push_str("***");
                out.push_str(&authority[a..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `[logging]`: structured events beyond the level set by `SIGNALBOX_LOG`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Fraction of routing decisions (0.0–1.0) logged as one structured
    /// `debug` event each (target `signalbox::decision`): node, policy
    /// version, reason, guardrail override, classifier verdict.
    pub decision_sample: f64,
}

/// Limits towards clients, like PostgreSQL's and PgBouncer's.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientsConfig {
    /// Beyond this many connected clients, new ones get 53300.
    pub max_connections: usize,
    /// From TCP accept to the end of authentication (PostgreSQL: 60 s).
    pub login_timeout_s: u64,
    /// Once a message has started arriving, the rest must follow within this.
    pub message_timeout_s: u64,
    /// While a client's statement holds a server connection, the client
    /// must take some of its answer within this; one that takes nothing is
    /// disconnected and its statement cancelled, so a client that stops
    /// reading cannot keep a pooled connection from everyone else.
    pub write_timeout_s: u64,
    /// Largest single message a client may send.
    pub max_message_mb: usize,
    /// All clients' partly received large (> 64 KiB) messages together; a
    /// message that does not fit is refused with 53200.
    pub buffer_budget_mb: usize,
    /// On SIGTERM/SIGINT, how long clients may finish their transaction.
    pub shutdown_drain_s: u64,
    /// What one client's prepared statements may hold in signalbox (about
    /// twice their text); a Parse beyond it fails with 53400 (0: no limit).
    pub statement_memory_mb: usize,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            login_timeout_s: 60,
            message_timeout_s: 60,
            write_timeout_s: 60,
            max_message_mb: 64,
            buffer_budget_mb: 256,
            shutdown_drain_s: 30,
            statement_memory_mb: 64,
        }
    }
}

/// Configured role of a node; `auto` asks the node (`pg_is_in_recovery()`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Primary,
    Replica,
    #[default]
    Auto,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// `postgres://user:password@host:port/database`; the control plane logs in
    /// with it, and its host/port are where client sessions are forwarded.
    pub url: String,
    #[serde(default)]
    pub role: NodeRole,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// Pooling mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A backend connection per transaction (or single statement).
    #[default]
    Transaction,
    /// A backend connection per client session.
    Session,
}

/// What happens after a statement that may change session state signalbox
/// cannot see (a user-defined function, a procedure, a `DO` block).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UntrackedState {
    /// Keep the client on that connection for the rest of its session, so
    /// what the function set stays the client's, as on PostgreSQL.
    Pin,
    /// Keep transaction pooling: the connection is fully reset before its
    /// next use, and the client loses what the function set. The default:
    /// without catalog facts every `DO` block and non-listed built-in counts
    /// (Sequelize creates ENUM types in a `DO` block), and pinning those
    /// would keep ordinary ORM sessions off the replicas.
    #[default]
    Reset,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Connections per node and (user, database).
    pub size: usize,
    pub checkout_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub idle_timeout_s: u64,
    /// Connections older than this are closed when they come back idle.
    pub max_lifetime_s: u64,
    pub mode: PoolMode,
    pub untracked_state: UntrackedState,
    /// Databases whose clients get session pooling.
    pub session_databases: Vec<String>,
    /// Users whose clients get session pooling.
    pub session_users: Vec<String>,
    /// In session mode, reads outside transactions still go where the
    /// policy sends them (replicas), on pooled connections; the session's
    /// own primary connection serves everything else.
    pub session_reads_on_replicas: bool,
    /// Prepared statements kept on one server connection; beyond it, the
    /// least recently used are closed (PostgreSQL keeps each one's plan in
    /// the backend's memory for as long as the connection lives). 0: no cap.
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 20,
            checkout_timeout_ms: 5000,
            connect_timeout_ms: 5000,
            idle_timeout_s: 300,
            max_lifetime_s: 3600,
            session_reads_on_replicas: true,
            max_prepared_statements: 500,
            mode: PoolMode::Transaction,
            untracked_state: UntrackedState::Reset,
            session_databases: Vec::new(),
            session_users: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Probe (health, role, WAL position) every this many ms.
    pub interval_ms: u64,
    /// Consecutive failed probes before a node is banned.
    pub failures_to_ban: u32,
    pub probe_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 500,
            failures_to_ban: 2,
            probe_timeout_ms: 2000,
        }
    }
}

/// `[read_your_writes]`: after a transaction that wrote commits, its WAL
/// position is recorded under these scopes, and the policy sees, per
/// replica, whether it has replayed past the position of the statement's
/// scopes (`replayed-last-write`) and how long ago they wrote.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RywConfig {
    /// Any of `session`, `user`, `application`, `database`. Empty: off.
    pub scopes: Vec<RywScope>,
    /// A read whose scope wrote and that no replica has replayed yet waits
    /// up to this long (ms) for one to catch up, probing the replicas
    /// meanwhile; then the policy decides (0: decide at once).
    pub wait_for_replay_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RywScope {
    Session,
    User,
    Application,
    Database,
}

/// `[classifier]`: catalog facts behind read-only verdicts.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Fetch catalog facts (relation persistence, views, function
    /// volatility and bodies) from the primary for each database served.
    pub catalog: bool,
    /// Refresh every database's facts this often (DDL seen through
    /// signalbox refreshes them at once).
    pub refresh_s: u64,
    /// How long one fetch may take.
    pub fetch_timeout_ms: u64,
    /// Functions (`name` or `schema.name`) the operator vouches never
    /// write, whatever their language: they may run on replicas.
    pub read_only_functions: Vec<String>,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            catalog: true,
            refresh_s: 30,
            fetch_timeout_ms: 5000,
            read_only_functions: Vec::new(),
        }
    }
}

/// `[tls]`: certificate and key (PEM) signalbox presents to clients.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Refuse clients that do not ask for TLS.
    #[serde(default)]
    pub require: bool,
}

/// How clients authenticate to signalbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// No password (local development).
    #[default]
    Trust,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub method: AuthMethod,
    pub users: Vec<UserConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// The user's password: clients authenticate with it, and signalbox logs
    /// in to the nodes as this user with it. Use `${ENV_VAR}`.
    pub password: Option<String>,
}

impl Config {
    /// Read, parse, interpolate `${ENV}` and check a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        // Errors quote the offending line; a node URL there may carry a
        // password, and errors reach logs and /status.
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message: redact_passwords(&message),
        };
        let mut c: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        c.origin = origin.to_owned();
        if let Some(t) = &c.admin_token {
            c.admin_token = Some(interpolate(t).map_err(|e| invalid(format!("admin_token: {e}")))?);
        }
        for (i, n) in c.nodes.iter_mut().enumerate() {
            n.url = interpolate(&n.url).map_err(|e| invalid(format!("nodes[{i}].url: {e}")))?;
        }
        for (i, u) in c.auth.users.iter_mut().enumerate() {
            if let Some(p) = &u.password {
                u.password = Some(
                    interpolate(p)
                        .map_err(|e| invalid(format!("auth.users[{i}].password: {e}")))?,
                );
            }
        }
        c.check().map_err(invalid)?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().len() < 16)
        {
            return Err("admin_token: too short (at least 16 characters)".into());
        }
        if let Some(a) = self.admin_listen {
            if !a.ip().is_loopback() && self.admin_token.is_none() {
                return Err(format!(
                    "admin_listen: {a} is not a loopback address, so the admin API needs admin_token (e.g. admin_token = \"${{SIGNALBOX_ADMIN_TOKEN}}\"); without one it binds only to 127.0.0.1 or ::1"
                ));
            }
        }
        if self.nodes.is_empty() {
            return Err("nodes: at least one [[nodes]] entry is required".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !names.insert(n.name.as_str()) {
                return Err(format!("nodes[{i}].name: duplicate node name `{}`", n.name));
            }
            crate::cluster::NodeAddr::parse(&n.url).map_err(|e| format!("nodes[{i}].url: {e}"))?;
        }
        if self
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Primary)
            .count()
            > 1
        {
            return Err("nodes: more than one node has role = \"primary\"".into());
        }
        if self.pool.size == 0 {
            return Err("pool.size: must be at least 1".into());
        }
        if self.auth.method == AuthMethod::ScramSha256 {
            if let Some(u) = self.auth.users.iter().find(|u| u.password.is_none()) {
                return Err(format!(
                    "auth.users: `{}` has no password but auth.method is scram-sha-256",
                    u.name
                ));
            }
        }
        for (key, section) in [
            ("policy", &self.policy),
            ("shadow_policy", &self.shadow_policy),
        ] {
            if let Some(p) = section {
                p.check(&self.origin).map_err(|e| match e {
                    ConfigError::Invalid { message, .. } => format!("{key}: {message}"),
                    other => other.to_string(),
                })?;
            }
        }
        if !(0.0..=1.0).contains(&self.logging.decision_sample) {
            return Err("logging.decision_sample: must be between 0.0 and 1.0".into());
        }
        Ok(())
    }

    /// The directory relative paths in this file start from.
    pub fn base_dir(&self) -> PathBuf {
        self.origin
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    pub fn password_for(&self, user: &str) -> Option<&str> {
        self.auth
            .users
            .iter()
            .find(|u| u.name == user)
            .and_then(|u| u.password.as_deref())
    }

    /// Whether a client of `user` on `database` gets session pooling.
    pub fn session_pooling(&self, user: &str, database: &str) -> bool {
        self.pool.mode == PoolMode::Session
            || self.pool.session_users.iter().any(|u| u == user)
            || self.pool.session_databases.iter().any(|d| d == database)
    }
}

/// Replace `${NAME}` with the environment variable's value; a missing
/// variable is an error naming it. `$${` writes a literal `${`.
pub fn interpolate(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = t;
        } else if let Some(t) = tail.strip_prefix("${") {
            let end = t
                .find('}')
                .ok_or_else(|| "unterminated `${` (write `$${` for a literal)".to_string())?;
            let name = &t[..end];
            let value = std::env::var(name)
                .map_err(|_| format!("environment variable `{name}` is not set"))?;
            out.push_str(&value);
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

use crate::policy::{Fallback, Limits, PolicySettings, RollbackSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `[policy]`: which policy runs and how it is sandboxed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The `.wasm` file (relative paths are relative to the config file).
    pub path: PathBuf,
    /// Name used in logs and metrics; defaults to the file stem.
    pub name: Option<String>,
    /// The policy's own settings, passed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    #[serde(default)]
    pub fallback: Fallback,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rollback: RollbackConfig,
    #[serde(default)]
    pub watch: WatchConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time budget per call, milliseconds (fractions allowed).
    pub deadline_ms: f64,
    pub memory_mb: u32,
    pub max_idle_instances: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = Limits::default();
        Self {
            deadline_ms: d.deadline.as_secs_f64() * 1000.0,
            memory_mb: (d.memory_bytes >> 20) as u32,
            max_idle_instances: d.max_idle_instances,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RollbackConfig {
    pub window_s: u64,
    pub max_error_rate: f64,
    pub min_calls: u64,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        let d = RollbackSettings::default();
        Self {
            window_s: d.window.as_secs(),
            max_error_rate: d.max_error_rate,
            min_calls: d.min_calls,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    pub enabled: bool,
    pub debounce_ms: u64,
    /// 0 disables polling.
    pub poll_ms: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            debounce_ms: 100,
            poll_ms: 2000,
        }
    }
}

impl PolicyConfig {
    /// Parse a `[policy]` table from TOML text (errors carry line and key).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wrapper {
            policy: PolicyConfig,
        }
        let w: Wrapper = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        w.policy.check(origin)?;
        Ok(w.policy)
    }

    pub(crate) fn check(&self, origin: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| ConfigError::Invalid {
            path: origin.to_owned(),
            message: format!("policy.{key}: {why}"),
        };
        if !(self.limits.deadline_ms > 0.0 && self.limits.deadline_ms <= 1000.0) {
            return Err(bad("limits.deadline_ms", "must be in (0, 1000]"));
        }
        let max_mb = crate::policy::engine::MAX_MEMORY_CAP >> 20;
        if self.limits.memory_mb == 0 || self.limits.memory_mb as usize > max_mb {
            return Err(bad("limits.memory_mb", &format!("must be 1 to {max_mb}")));
        }
        if !(0.0..=1.0).contains(&self.rollback.max_error_rate) {
            return Err(bad("rollback.max_error_rate", "must be between 0 and 1"));
        }
        Ok(())
    }

    /// Runtime settings; `base` is the directory relative paths start from.
    pub fn settings(&self, base: &Path) -> PolicySettings {
        let path = if self.path.is_absolute() {
            self.path.clone()
        } else {
            base.join(&self.path)
        };
        let mut s = PolicySettings::new(path);
        if let Some(name) = &self.name {
            s.name = name.clone();
        }
        s.config_json = serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into());
        s.fallback = self.fallback;
        s.limits = Limits {
            deadline: Duration::from_secs_f64(self.limits.deadline_ms / 1000.0),
            memory_bytes: (self.limits.memory_mb as usize) << 20,
            max_idle_instances: self.limits.max_idle_instances.max(1),
        };
        s.rollback = RollbackSettings {
            window: Duration::from_secs(self.rollback.window_s),
            max_error_rate: self.rollback.max_error_rate,
            min_calls: self.rollback.min_calls,
        };
        s.debounce = Duration::from_millis(self.watch.debounce_ms);
        s.poll = (self.watch.poll_ms > 0).then(|| Duration::from_millis(self.watch.poll_ms));
        s
    }
}

/// Serialize a `Duration` as integer milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn passwords_in_errors_are_redacted() {
        assert_eq!(
            redact_passwords("url = \"postgres://app:s3cr3t@db:5432/x\" and http://h/ and x://u@h"),
            "url = \"postgres://app:***@db:5432/x\" and http://h/ and x://u@h"
        );
        let e = Config::parse(
            "listen = \"127.0.0.1:6432\"\n[[nodes]]\nname = \"p\"\nurl = \"postgres://app:s3cr3t@127.0.0.1/x\nrole = \"primary\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cr3t") && e.contains("***"), "{e}");
    }

    use super::*;

    const FULL: &str = r#"
        listen = "127.0.0.1:6432"
        admin_listen = "127.0.0.1:9930"
        [[nodes]]
        name = "primary"
        url = "postgres://postgres:${SB_TEST_PW}@127.0.0.1:5433/postgres"
        role = "primary"
        [[nodes]]
        name = "replica-1"
        url = "postgres://postgres@127.0.0.1:5434/postgres"
        tags = { zone = "eu-1a" }
        [pool]
        size = 5
        session_databases = ["analytics"]
        [auth]
        method = "scram-sha-256"
        [[auth.users]]
        name = "app"
        password = "${SB_TEST_PW}"
    "#;

    #[test]
    fn full_config_with_env() {
        std::env::set_var("SB_TEST_PW", "s3cret");
        let c = Config::parse(FULL, Path::new("sb.toml")).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert!(c.nodes[0].url.contains(":s3cret@"));
        assert_eq!(c.nodes[1].role, NodeRole::Auto);
        assert_eq!(c.password_for("app"), Some("s3cret"));
        assert!(c.session_pooling("app", "analytics"));
        assert!(!c.session_pooling("app", "shop"));
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        // Every test of FULL sets the same value: they run at once.
        std::env::set_var("SB_TEST_PW", "s3cret");
        let e = Config::parse(&FULL.replace("size = 5", "sise = 5"), Path::new("sb.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sb.toml") && e.contains("sise") && e.contains("line"),
            "{e}"
        );
        let e = Config::parse(
            &FULL.replace("SB_TEST_PW}@", "SB_NOPE_PW}@"),
            Path::new("sb.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nodes[0].url") && e.contains("SB_NOPE_PW"),
            "{e}"
        );
        let e = Config::parse(
            &FULL.replace("127.0.0.1:5434", "127.0.0.1:notaport"),
            Path::new("sb.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nodes[1].url"), "{e}");
    }

    #[test]
    fn a_public_admin_api_needs_a_token() {
        // Every test of FULL sets the same value: they run at once.
        std::env::set_var("SB_TEST_PW", "s3cret");
        let public = FULL.replace("127.0.0.1:9930", "0.0.0.0:9930");
        let e = Config::parse(&public, Path::new("sb.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sb.toml") && e.contains("admin_listen") && e.contains("admin_token"),
            "{e}"
        );
        std::env::set_var("SB_TEST_ADMIN", "0123456789abcdef-token");
        let with_token = public.replace(
            "admin_listen = \"0.0.0.0:9930\"",
            "admin_listen = \"0.0.0.0:9930\"\nadmin_token = \"${SB_TEST_ADMIN}\"",
        );
        let c = Config::parse(&with_token, Path::new("sb.toml")).unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("0123456789abcdef-token"));
        let short = with_token.replace("${SB_TEST_ADMIN}", "short");
        let e = Config::parse(&short, Path::new("sb.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin_token"), "{e}");
    }

    #[test]
    fn the_kubernetes_config_is_valid() {
        // The TOML block of the ConfigMap in deploy/kubernetes/signalbox.yaml.
        let yaml = include_str!("../../deploy/kubernetes/signalbox.yaml");
        let toml: String = yaml
            .lines()
            .skip_while(|l| !l.contains("signalbox.toml: |"))
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        std::env::set_var("SIGNALBOX_ADMIN_TOKEN", "0123456789abcdef0123");
        std::env::set_var("DB_PASSWORD", "x");
        let c = Config::parse(&toml, Path::new("signalbox.yaml")).unwrap();
        assert_eq!(c.nodes.len(), 3);
        assert!(c.admin_token.is_some());
    }

    #[test]
    fn the_example_config_is_valid() {
        std::env::set_var("DB_PASSWORD", "x");
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../signalbox.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.nodes.len(), 3);
        assert!(c.policy.is_some());
    }

    #[test]
    fn interpolation() {
        std::env::set_var("SB_TEST_X", "v");
        assert_eq!(interpolate("a${SB_TEST_X}b$${c}$d").unwrap(), "avb${c}$d");
        assert!(interpolate("${SB_TEST_X").is_err());
    }

    #[test]
    fn parses_and_maps() {
        let text = r#"
            [policy]
            path = "p/rw.wasm"
            fallback = "primary"
            [policy.config]
            max_lag_ms = 200
            [policy.limits]
            deadline_ms = 0.5
            memory_mb = 8
        "#;
        let c = PolicyConfig::from_toml(text, Path::new("x.toml")).unwrap();
        let s = c.settings(Path::new("/etc/sb"));
        assert_eq!(s.path, PathBuf::from("/etc/sb/p/rw.wasm"));
        assert_eq!(s.name, "rw");
        assert_eq!(s.config_json, r#"{"max_lag_ms":200}"#);
        assert_eq!(s.fallback, Fallback::Primary);
        assert_eq!(s.limits.deadline, Duration::from_micros(500));
        assert_eq!(s.limits.memory_bytes, 8 << 20);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = PolicyConfig::from_toml(
            "[policy]\npath = \"a.wasm\"\n[policy.limits]\ndeadline = 3\n",
            Path::new("sb.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sb.toml") && e.contains("deadline") && e.contains("line 4"),
            "{e}"
        );
        let e = PolicyConfig::from_toml(
            "[policy]\npath = \"a.wasm\"\n[policy.limits]\nmemory_mb = 0\n",
            Path::new("sb.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("policy.limits.memory_mb"), "{e}");
    }
}
