//! Contract 0.2.0 (`policy-sdk/wit/v0.2.0`). Backend states are a flat
//! `list<u64>` (one copy to lower), the session carries its write position,
//! and a policy can ask for a caught-up replica with a bounded wait.

wasmtime::component::bindgen!({
    path: "../policy-sdk/wit/v0.2.0",
    world: "policy",
});

use wasmtime::Store;

use self::signalbox::policy::{host, types as wit};
use crate::policy::instance::HostState;
use crate::route::{RouteInput, Target};

impl wit::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: wit::Level, message: String) {
        let level = match level {
            wit::Level::Trace => signalbox_policy::Level::Trace,
            wit::Level::Debug => signalbox_policy::Level::Debug,
            wit::Level::Info => signalbox_policy::Level::Info,
            wit::Level::Warn => signalbox_policy::Level::Warn,
            wit::Level::Error => signalbox_policy::Level::Error,
        };
        self.log_line(level, message);
    }
    fn now_ms(&mut self) -> u64 {
        self.now()
    }
    fn random(&mut self) -> u64 {
        self.random_u64()
    }
    fn kv_get(&mut self, key: String) -> Option<String> {
        self.kv_get_value(&key)
    }
    fn kv_set(&mut self, key: String, value: String, ttl_ms: Option<u64>) {
        self.kv_set_value(&key, &value, ttl_ms);
    }
    fn kv_delete(&mut self, key: String) {
        self.kv_delete_key(&key);
    }
    fn statement_sql(&mut self) -> String {
        self.sql_text()
    }
    fn statement_tables(&mut self) -> Vec<String> {
        self.with_input(|i| i.statement.tables.to_vec())
    }
    fn statement_functions(&mut self) -> Vec<String> {
        self.with_input(|i| i.statement.functions.to_vec())
    }
    fn statement_hints(&mut self) -> Vec<(String, String)> {
        self.with_input(|i| i.statement.hints.to_vec())
    }
    fn session_user(&mut self) -> String {
        self.with_input(|i| i.session.user.clone())
    }
    fn session_database(&mut self) -> String {
        self.with_input(|i| i.session.database.clone())
    }
    fn session_application_name(&mut self) -> String {
        self.with_input(|i| i.session.application_name.clone())
    }
    fn session_client_addr(&mut self) -> String {
        self.with_input(|i| i.session.client_addr.clone())
    }
    fn session_attributes(&mut self) -> Vec<(String, String)> {
        self.with_input(|i| i.session.attributes.clone())
    }
    fn backend_states(&mut self) -> Vec<u64> {
        use signalbox_policy::packed;
        self.with_input(|input| {
            let cluster = &input.cluster;
            let mut words = Vec::with_capacity(cluster.states.len() * packed::WORDS);
            cluster.each_contract_state(&input.session, |s| {
                words.extend_from_slice(&packed::encode(&s));
            });
            words
        })
    }
    fn cluster_generation(&mut self) -> u64 {
        self.with_input(|i| i.cluster.generation)
    }
    fn nodes(&mut self) -> Vec<wit::NodeInfo> {
        self.with_input(|input| {
            input
                .cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| wit::NodeInfo {
                    id: i as u32,
                    name: n.name.clone(),
                    weight: n.weight,
                    tags: n.tags.clone(),
                })
                .collect()
        })
    }
}

pub fn route(
    bindings: &Policy,
    store: &mut Store<HostState>,
    input: &RouteInput,
) -> wasmtime::Result<(Target, Option<String>)> {
    let statement = wit::StatementInfo {
        kind: super::by_kind(input.statement.kind, &KINDS),
        read_only: input.statement.read_only,
        fingerprint: input.statement.fingerprint,
        sql_len: input.statement.sql.len() as u32,
        hint_count: input.statement.hints.len() as u32,
    };
    let s = &input.session;
    let session = wit::SessionInfo {
        id: s.id,
        tx_state: match s.tx_state {
            crate::route::TxState::Idle => wit::TxState::Idle,
            crate::route::TxState::InTransaction => wit::TxState::InTransaction,
            crate::route::TxState::Failed => wit::TxState::Failed,
        },
        read_only_tx: s.read_only_tx,
        ms_since_last_write: s.ms_since_last_write,
        write_lsn: s.last_write_lsn,
    };
    let d = bindings.call_route(store, statement, session)?;
    let target = match d.target {
        wit::Target::Primary => Target::Primary,
        wit::Target::Replica(id) => Target::Replica(id),
        wit::Target::AnyReplica => Target::AnyReplica,
        wit::Target::CaughtUpReplica(ms) => Target::CaughtUpReplica(ms),
        wit::Target::Default => Target::Default,
        wit::Target::Reject(message) => Target::Reject(message),
    };
    Ok((target, d.reason))
}

/// Statement kinds in the host's order.
const KINDS: [wit::StatementKind; 13] = [
    wit::StatementKind::Select,
    wit::StatementKind::Insert,
    wit::StatementKind::Update,
    wit::StatementKind::Delete,
    wit::StatementKind::Merge,
    wit::StatementKind::Ddl,
    wit::StatementKind::Transaction,
    wit::StatementKind::Session,
    wit::StatementKind::Copy,
    wit::StatementKind::Call,
    wit::StatementKind::Explain,
    wit::StatementKind::Show,
    wit::StatementKind::Utility,
];
