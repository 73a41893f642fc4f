//! The wasm side of the contract: generated bindings and the glue that turns
//! them into the SDK's plain types. Compiled only for `wasm32`.

use std::cell::RefCell;
use std::rc::Rc;

use crate::types::{
    Backend, Backends, Lazy, Level, NodeInfo, Session, Statement, StatementKind, Target, TxState,
};
use crate::{Config, Policy};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit/v0.2.0",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "signalbox_policy::__private::bindings",
        runtime_path: "signalbox_policy::__private::wit_bindgen::rt",
    });
}

use bindings::signalbox::policy::host;
use bindings::signalbox::policy::types as wit;

thread_local! {
    static POLICY: RefCell<Option<Box<dyn Policy>>> = const { RefCell::new(None) };
    /// Static node descriptions, refetched only when the cluster generation moves.
    /// Each with the hash of its name (see `Backend::name_hash`).
    static NODES: RefCell<(u64, Vec<(Rc<NodeInfo>, u64)>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

pub(crate) fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => wit::Level::Trace,
        Level::Debug => wit::Level::Debug,
        Level::Info => wit::Level::Info,
        Level::Warn => wit::Level::Warn,
        Level::Error => wit::Level::Error,
    };
    host::log(level, message);
}

/// Called by the `init` export that [`crate::export!`] generates.
pub fn init<P: Policy>(config: String) -> Result<(), String> {
    let policy = P::new(&Config::new(config))?;
    POLICY.with(|p| *p.borrow_mut() = Some(Box::new(policy)));
    Ok(())
}

/// Called by the `route` export that [`crate::export!`] generates.
pub fn route(statement: wit::StatementInfo, session: wit::SessionInfo) -> wit::Decision {
    let statement = Statement {
        kind: kind_from(statement.kind),
        read_only: statement.read_only,
        fingerprint: statement.fingerprint,
        sql_len: statement.sql_len,
        hint_count: statement.hint_count,
        sql: Lazy::default(),
        tables: Lazy::default(),
        functions: Lazy::default(),
        hints: Lazy::default(),
    };
    let session = Session {
        id: session.id,
        tx_state: match session.tx_state {
            wit::TxState::Idle => TxState::Idle,
            wit::TxState::InTransaction => TxState::InTransaction,
            wit::TxState::Failed => TxState::Failed,
        },
        read_only_tx: session.read_only_tx,
        ms_since_last_write: session.ms_since_last_write,
        write_lsn: session.write_lsn,
        ..Session::default()
    };
    let backends = Backends::default();
    let decision = POLICY.with(|p| match p.borrow_mut().as_mut() {
        Some(policy) => policy.route(&statement, &session, &backends),
        None => crate::Decision::builtin().because("policy not initialised"),
    });
    wit::Decision {
        target: match decision.target {
            Target::Primary => wit::Target::Primary,
            Target::Replica(id) => wit::Target::Replica(id),
            Target::AnyReplica => wit::Target::AnyReplica,
            Target::CaughtUpReplica(ms) => wit::Target::CaughtUpReplica(ms),
            Target::Default => wit::Target::Default,
            Target::Reject(message) => wit::Target::Reject(message),
        },
        reason: decision.reason,
    }
}

fn kind_from(kind: wit::StatementKind) -> StatementKind {
    use wit::StatementKind as K;
    match kind {
        K::Select => StatementKind::Select,
        K::Insert => StatementKind::Insert,
        K::Update => StatementKind::Update,
        K::Delete => StatementKind::Delete,
        K::Merge => StatementKind::Merge,
        K::Ddl => StatementKind::Ddl,
        K::Transaction => StatementKind::Transaction,
        K::Session => StatementKind::Session,
        K::Copy => StatementKind::Copy,
        K::Call => StatementKind::Call,
        K::Explain => StatementKind::Explain,
        K::Show => StatementKind::Show,
        K::Utility => StatementKind::Utility,
    }
}

/// `f` of the static node descriptions, refetched only when the cluster
/// generation moved (borrowed: a policy call copies none of them).
fn with_nodes<T>(f: impl FnOnce(&[(Rc<NodeInfo>, u64)]) -> T) -> T {
    let generation = host::cluster_generation();
    NODES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != generation {
            let fresh = host::nodes()
                .into_iter()
                .map(|n| {
                    let hash = crate::select::stable_hash(n.name.as_bytes());
                    let info = NodeInfo {
                        id: n.id,
                        name: n.name,
                        weight: n.weight,
                        tags: n.tags,
                    };
                    (Rc::new(info), hash)
                })
                .collect();
            *cache = (generation, fresh);
        }
        f(&cache.1)
    })
}

pub(crate) mod fetch {
    use super::*;
    use crate::types::Pairs;

    pub(crate) fn statement_sql() -> String {
        host::statement_sql()
    }
    pub(crate) fn statement_tables() -> Vec<String> {
        host::statement_tables()
    }
    pub(crate) fn statement_functions() -> Vec<String> {
        host::statement_functions()
    }
    pub(crate) fn statement_hints() -> Pairs {
        host::statement_hints()
    }
    pub(crate) fn session_user() -> String {
        host::session_user()
    }
    pub(crate) fn session_database() -> String {
        host::session_database()
    }
    pub(crate) fn session_application_name() -> String {
        host::session_application_name()
    }
    pub(crate) fn session_client_addr() -> String {
        host::session_client_addr()
    }
    pub(crate) fn session_attributes() -> Pairs {
        host::session_attributes()
    }

    pub(crate) fn backends() -> Vec<Backend> {
        let words = host::backend_states();
        with_nodes(|nodes| decode(&words, nodes))
    }

    fn decode(words: &[u64], nodes: &[(Rc<NodeInfo>, u64)]) -> Vec<Backend> {
        use crate::packed;
        words
            .chunks_exact(packed::WORDS)
            .map(|w| {
                let mut chunk = [0u64; packed::WORDS];
                chunk.copy_from_slice(w);
                let s = packed::decode(&chunk);
                // Nodes come in id order: the id is the index when it fits.
                let (info, name_hash) = nodes
                    .get(s.id as usize)
                    .filter(|n| n.0.id == s.id)
                    .or_else(|| nodes.iter().find(|n| n.0.id == s.id))
                    .cloned()
                    .unwrap_or_else(|| {
                        let info = NodeInfo {
                            id: s.id,
                            weight: 1,
                            ..NodeInfo::default()
                        };
                        (Rc::new(info), crate::select::stable_hash(b""))
                    });
                Backend {
                    id: s.id,
                    role: s.role,
                    healthy: s.healthy,
                    lag_ms: s.lag_ms,
                    lag_bytes: s.lag_bytes,
                    replayed_last_write: s.replayed_last_write,
                    in_flight: s.in_flight,
                    idle: s.idle,
                    latency_us: s.latency_us,
                    info,
                    name_hash,
                }
            })
            .collect()
    }
}
