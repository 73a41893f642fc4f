//! # signalbox-policy
//!
//! Write a signalbox routing policy in plain Rust: implement [`Policy`], call
//! [`export!`], build to WebAssembly with `signalbox policy build`. Test it
//! natively with `cargo test` using [`testing`] — no wasm toolchain needed.
//!
//! ```
//! use signalbox_policy::prelude::*;
//!
//! struct ReadsToReplicas;
//!
//! impl Policy for ReadsToReplicas {
//!     fn new(_config: &Config) -> Result<Self, String> {
//!         Ok(Self)
//!     }
//!
//!     fn route(&mut self, stmt: &Statement, _session: &Session, backends: &Backends) -> Decision {
//!         if !stmt.read_only {
//!             return Decision::primary();
//!         }
//!         Decision::replica_or_primary(backends.healthy_replicas().least_outstanding())
//!     }
//! }
//!
//! signalbox_policy::export!(ReadsToReplicas);
//! ```
//!
//! The host enforces its guardrails after every decision: a statement that is not
//! read-only never reaches a replica, a transaction stays on its connection, and
//! an unknown or unhealthy replica is replaced by the built-in choice. A policy
//! therefore decides *preferences*; it cannot break correctness.

extern crate self as signalbox_policy;

#[cfg(not(target_arch = "wasm32"))]
pub mod fixture;
pub mod host;
pub mod packed;
pub mod select;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

pub use select::{stable_hash, BackendIterExt};
pub use types::{
    Backend, Backends, Decision, Level, NodeInfo, Pairs, Role, Session, Statement, StatementKind,
    Target, TxState,
};

/// The contract version this SDK builds policies for. The host reads it from
/// the policy's `signalbox-policy-abi` custom section before compiling it.
pub const ABI_VERSION: &str = "0.2.0";

/// Everything a policy usually needs, in one `use`.
pub mod prelude {
    pub use crate::host::{self, kv};
    pub use crate::{
        Backend, BackendIterExt, Backends, Config, Decision, Level, Policy, Role, Session,
        Statement, StatementKind, Target, TxState,
    };
}

/// A routing policy. One value lives per sandbox instance; the host may run
/// several instances side by side and recycle them, so keep shared state in
/// [`host::kv`] rather than in `self` when it must be seen by all of them.
pub trait Policy: 'static {
    /// Build the policy from the operator's `[policy.config]` table.
    fn new(config: &Config) -> Result<Self, String>
    where
        Self: Sized;

    /// Decide where one statement runs. Called once per statement, so keep it
    /// cheap: read only what you need (each accessor fetches on first use).
    fn route(&mut self, statement: &Statement, session: &Session, backends: &Backends) -> Decision;
}

/// The operator's policy configuration, as JSON text.
#[derive(Clone, Debug, Default)]
pub struct Config(String);

impl Config {
    pub fn new(json: impl Into<String>) -> Self {
        Self(json.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Deserialize the configuration; an empty config reads as `{}` so that
    /// `#[serde(default)]` structs work without any table.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let text = if self.0.trim().is_empty() {
            "{}"
        } else {
            &self.0
        };
        serde_json::from_str(text).map_err(|e| format!("invalid policy config: {e}"))
    }
}

#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::guest::{self, bindings};
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen;
}

/// Export a [`Policy`] type as the component's `init` and `route`, and stamp
/// the contract version into the module. Does nothing in native builds, so the
/// same crate compiles for `cargo test`.
#[macro_export]
macro_rules! export {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__private::bindings;
            struct __SignalboxPolicy;
            impl bindings::Guest for __SignalboxPolicy {
                fn init(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::guest::init::<$policy>(config)
                }
                fn route(
                    statement: bindings::signalbox::policy::types::StatementInfo,
                    session: bindings::signalbox::policy::types::SessionInfo,
                ) -> bindings::signalbox::policy::types::Decision {
                    $crate::__private::guest::route(statement, session)
                }
            }
    bindings::__export_world!(__SignalboxPolicy with_types_in $crate::__private::bindings);

            #[used]
            #[link_section = "signalbox-policy-abi"]
            static __SIGNALBOX_POLICY_ABI: [u8; 5] = *b"0.2.0";
        };
    };
}
