//! Run a policy natively in `cargo test`, with a mock host.
//!
//! The mock host is per test thread: a settable clock, a settable random
//! source, a key/value store that honours TTLs against the mock clock, and a
//! log capture.
//!
//! ```
//! use signalbox_policy::prelude::*;
//! use signalbox_policy::testing;
//!
//! testing::reset();
//! testing::set_now_ms(1_000);
//! kv::set("k", "v", Some(50));
//! testing::advance_ms(60);
//! assert_eq!(kv::get("k"), None);
//! ```

use std::path::Path;

use crate::fixture::FixtureFile;
use crate::types::{Backend, Backends, Level, Session, Statement};
use crate::{Config, Policy};

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod mock {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use crate::types::Level;

    pub(crate) struct MockHost {
        pub now_ms: u64,
        pub fixed_random: Option<u64>,
        pub rng_state: u64,
        pub kv: HashMap<String, (String, Option<u64>)>,
        pub logs: Vec<(Level, String)>,
    }

    impl Default for MockHost {
        fn default() -> Self {
            Self {
                now_ms: 1_700_000_000_000,
                fixed_random: None,
                rng_state: 0x9e37_79b9_7f4a_7c15,
                kv: HashMap::new(),
                logs: Vec::new(),
            }
        }
    }

    thread_local! {
        pub(crate) static HOST: RefCell<MockHost> = RefCell::new(MockHost::default());
    }

    pub(crate) fn with<R>(f: impl FnOnce(&mut MockHost) -> R) -> R {
        HOST.with(|h| f(&mut h.borrow_mut()))
    }

    pub(crate) fn log(level: Level, message: &str) {
        with(|h| h.logs.push((level, message.to_owned())));
    }

    pub(crate) fn now_ms() -> u64 {
        with(|h| h.now_ms)
    }

    pub(crate) fn random() -> u64 {
        with(|h| {
            if let Some(v) = h.fixed_random {
                return v;
            }
            // splitmix64: deterministic per seed, good enough for tests.
            h.rng_state = h.rng_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = h.rng_state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }

    pub(crate) fn kv_get(key: &str) -> Option<String> {
        with(|h| {
            let now = h.now_ms;
            match h.kv.get(key) {
                Some((_, Some(expires))) if *expires <= now => {
                    h.kv.remove(key);
                    None
                }
                Some((v, _)) => Some(v.clone()),
                None => None,
            }
        })
    }

    pub(crate) fn kv_set(key: &str, value: &str, ttl_ms: Option<u64>) {
        with(|h| {
            let expires = ttl_ms.map(|t| h.now_ms.saturating_add(t));
            h.kv.insert(key.to_owned(), (value.to_owned(), expires));
        });
    }

    pub(crate) fn kv_delete(key: &str) {
        with(|h| {
            h.kv.remove(key);
        });
    }
}

/// Reset this thread's mock host: clock, random, key/value store and logs.
#[cfg(not(target_arch = "wasm32"))]
pub fn reset() {
    mock::with(|h| *h = mock::MockHost::default());
}

/// Set the mock clock (milliseconds since the Unix epoch).
#[cfg(not(target_arch = "wasm32"))]
pub fn set_now_ms(ms: u64) {
    mock::with(|h| h.now_ms = ms);
}

/// Move the mock clock forward.
#[cfg(not(target_arch = "wasm32"))]
pub fn advance_ms(ms: u64) {
    mock::with(|h| h.now_ms = h.now_ms.saturating_add(ms));
}

/// Make `host::random()` return `value` on every call.
#[cfg(not(target_arch = "wasm32"))]
pub fn set_random(value: u64) {
    mock::with(|h| h.fixed_random = Some(value));
}

/// Make `host::random()` a deterministic pseudo-random sequence from `seed`.
#[cfg(not(target_arch = "wasm32"))]
pub fn seed_random(seed: u64) {
    mock::with(|h| {
        h.fixed_random = None;
        h.rng_state = seed;
    });
}

/// Everything the policy logged on this thread since the last reset/take.
#[cfg(not(target_arch = "wasm32"))]
pub fn take_logs() -> Vec<(Level, String)> {
    mock::with(|h| std::mem::take(&mut h.logs))
}

/// A typical cluster: `primary` (id 0) and replicas `replica-1`, `replica-2`.
pub fn cluster() -> Backends {
    Backends::new(vec![
        Backend::primary(0, "primary"),
        Backend::replica(1, "replica-1"),
        Backend::replica(2, "replica-2"),
    ])
}

/// An idle session with an id and nothing else set.
pub fn session() -> Session {
    Session::new(1)
}

/// Build the inputs of one fixture case as the SDK's plain types.
pub fn case_inputs(
    file: &FixtureFile,
    case: &crate::fixture::Case,
) -> (Statement, Session, Backends) {
    let mut stmt = Statement::new(case.kind(), case.read_only()).with_sql(&case.sql);
    for t in &case.tables {
        stmt = stmt.with_table(t);
    }
    for f in &case.functions {
        stmt = stmt.with_function(f);
    }
    for (k, v) in &case.hints {
        stmt = stmt.with_hint(k, v);
    }
    let s = &case.session;
    let mut session = Session::new(s.id)
        .with_user(&s.user)
        .with_database(&s.database)
        .with_application_name(&s.application_name)
        .with_client_addr(&s.client_addr)
        .with_tx_state(s.tx_state);
    session.read_only_tx = s.read_only_tx;
    session.ms_since_last_write = s.ms_since_last_write;
    session.write_lsn = s.write_lsn.or(s.ms_since_last_write.map(|_| 1));
    for (k, v) in &s.attributes {
        session = session.with_attribute(k, v);
    }
    let backends = file
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let state = file.node_state(case, i);
            let mut b = match node.role {
                crate::Role::Primary => Backend::primary(i as u32, &node.name),
                _ => Backend::replica(i as u32, &node.name),
            };
            b.role = node.role;
            b = b.with_weight(node.weight);
            for (k, v) in &node.tags {
                b = b.with_tag(k, v);
            }
            b.healthy = state.healthy.unwrap_or(true);
            b.lag_ms = state.lag_ms.or(b.lag_ms);
            b.lag_bytes = state.lag_bytes.unwrap_or(0);
            // As in the host: without a write position, every node is past it.
            b.replayed_last_write =
                state.replayed_last_write.unwrap_or(true) || session.write_lsn.is_none();
            b.in_flight = state.in_flight.unwrap_or(0);
            b.idle = state.idle.unwrap_or(0);
            b.latency_us = state.latency_us.unwrap_or(0);
            b
        })
        .collect();
    (stmt, session, Backends::new(backends))
}

/// Run every case of a fixture file against policy `P` natively, in order, on
/// one policy value (so stateful policies such as round-robin can be checked
/// as a sequence). Panics listing every failing case.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_fixtures<P: Policy>(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let file = FixtureFile::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!file.cases.is_empty(), "{}: no cases", path.display());
    reset();
    let mut policy = P::new(&Config::new(file.config_json()))
        .unwrap_or_else(|e| panic!("{}: init failed: {e}", path.display()));
    let mut failures = Vec::new();
    for case in &file.cases {
        mock::with(|h| {
            h.fixed_random = case.random;
            if let Some(now) = case.now_ms {
                h.now_ms = now;
            }
        });
        let (stmt, session, backends) = case_inputs(&file, case);
        let decision = policy.route(&stmt, &session, &backends);
        if let Err(e) = file.check(case, &decision.target, decision.reason.as_deref()) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} of {} cases failed:\n  {}",
        path.display(),
        failures.len(),
        file.cases.len(),
        failures.join("\n  ")
    );
}
