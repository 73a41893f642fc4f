//! The host's services: logging, time, randomness and the policy's key/value store.
//!
//! Inside the sandbox these call into signalbox; in native builds (your
//! `cargo test`) they go to the mock host in [`crate::testing`], so the same
//! policy code runs unchanged in both.

use crate::types::Level;

#[cfg(not(target_arch = "wasm32"))]
use crate::testing::mock;

/// Write a line to signalbox's log (tagged with the policy's name).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::guest::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    mock::log(level, message);
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return crate::guest::bindings::signalbox::policy::host::now_ms();
    #[cfg(not(target_arch = "wasm32"))]
    mock::now_ms()
}

/// A random 64-bit number.
pub fn random() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return crate::guest::bindings::signalbox::policy::host::random();
    #[cfg(not(target_arch = "wasm32"))]
    mock::random()
}

/// The policy's private key/value store. Entries survive instance recycling and
/// policy reloads; the host bounds its size.
pub mod kv {
    #[cfg(not(target_arch = "wasm32"))]
    use crate::testing::mock;

    pub fn get(key: &str) -> Option<String> {
        #[cfg(target_arch = "wasm32")]
        return crate::guest::bindings::signalbox::policy::host::kv_get(key);
        #[cfg(not(target_arch = "wasm32"))]
        mock::kv_get(key)
    }

    /// Store `value` under `key`; it expires after `ttl_ms` if given.
    pub fn set(key: &str, value: &str, ttl_ms: Option<u64>) {
        #[cfg(target_arch = "wasm32")]
        crate::guest::bindings::signalbox::policy::host::kv_set(key, value, ttl_ms);
        #[cfg(not(target_arch = "wasm32"))]
        mock::kv_set(key, value, ttl_ms);
    }

    pub fn delete(key: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::guest::bindings::signalbox::policy::host::kv_delete(key);
        #[cfg(not(target_arch = "wasm32"))]
        mock::kv_delete(key);
    }
}

/// Lazy fetchers behind [`crate::Statement`], [`crate::Session`] and
/// [`crate::Backends`]. Natively, values are always pre-filled by the builders,
/// so these only run in the sandbox.
pub(crate) mod fetch {
    #[cfg(target_arch = "wasm32")]
    pub(crate) use crate::guest::fetch::*;

    #[cfg(not(target_arch = "wasm32"))]
    mod native {
        use crate::types::{Backend, Pairs};
        pub(crate) fn statement_sql() -> String {
            String::new()
        }
        pub(crate) fn statement_tables() -> Vec<String> {
            Vec::new()
        }
        pub(crate) fn statement_functions() -> Vec<String> {
            Vec::new()
        }
        pub(crate) fn statement_hints() -> Pairs {
            Vec::new()
        }
        pub(crate) fn session_user() -> String {
            String::new()
        }
        pub(crate) fn session_database() -> String {
            String::new()
        }
        pub(crate) fn session_application_name() -> String {
            String::new()
        }
        pub(crate) fn session_client_addr() -> String {
            String::new()
        }
        pub(crate) fn session_attributes() -> Pairs {
            Vec::new()
        }
        pub(crate) fn backends() -> Vec<Backend> {
            Vec::new()
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) use native::*;
}
