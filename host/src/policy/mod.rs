//! The policy runtime: WebAssembly routing policies, sandboxed and hot-reloadable.
//!
//! - [`abi`]: the contract versions the host speaks and how a file becomes a component;
//! - [`contract`]: one module per contract version: bindings, host imports, conversions;
//! - [`engine`]: the process-wide wasmtime engine and the epoch ticker for deadlines;
//! - [`instance`]: one sandboxed instance and the host side of the contract;
//! - [`loaded`]: a compiled version with its pool of ready instances;
//! - [`reload`]: the live version, validated hot reload, rollback, file watching;
//! - [`fixtures`]: running a policy against fixture cases;
//! - [`kv`]: the per-policy key/value store.

pub mod abi;
pub mod build;
pub mod contract;
pub mod engine;
pub mod fixtures;
pub mod instance;
pub mod kv;
pub mod loaded;
pub mod reload;

pub use instance::{CallFailure, PolicyDecision};
pub use loaded::{Limits, LoadError, LoadSpec, LoadedPolicy, Stage};
pub use reload::{
    Fallback, Outcome, PolicyManager, PolicySettings, PolicyStatus, RollbackSettings,
};
