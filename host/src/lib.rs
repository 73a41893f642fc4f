//! signalbox: a PostgreSQL routing service whose routing decisions come from
//! hot-reloadable, sandboxed WebAssembly policies.
//!
//! Modules, one concern each:
//! - [`config`]: the TOML configuration;
//! - [`policy`]: the wasm policy runtime (engine, instances, reload);
//! - [`route`]: routing inputs, built-in routing and the guardrails;
//! - [`router`]: one statement's full decision (policy + guardrails + metrics);
//! - [`sql`]: SQL text handling (routing hints);
//! - [`cli`]: the `signalbox` command line.

pub mod admin;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod live;
pub mod local;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod router;
pub mod server;
pub mod sql;
pub mod telemetry;
pub mod tls;
pub mod wire;

/// Lock a mutex, taking over one that a panicking holder poisoned: one
/// failed task must not stop every other one that uses the same state.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
