//! A compiled, validated policy version and its pool of ready instances.
//!
//! Many threads call [`LoadedPolicy::call`] at once. Each call takes an idle
//! instance from a lock-free queue (or instantiates one), uses it exclusively,
//! and puts it back; an instance that trapped, timed out or ran out of memory
//! is dropped instead, so the next call starts from a clean one.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::abi;
use super::contract::{self, Pre};
use super::engine::{self, EngineKind};
use super::instance::{CallFailure, Determinism, HostState, Instance, PolicyDecision};
use super::kv::KvStore;
use crate::route::RouteInput;

/// Resource limits of a policy (from `[policy.limits]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Wall-clock budget per call.
    #[serde(with = "crate::config::duration_ms")]
    pub deadline: Duration,
    /// Linear-memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// Ready instances kept per version.
    pub max_idle_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(2),
            memory_bytes: 16 << 20,
            max_idle_instances: 64,
        }
    }
}

/// The step of loading where a candidate failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Read,
    Version,
    Compile,
    Imports,
    Init,
    Smoke,
    Fixtures,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Version => "version",
            Stage::Compile => "compile",
            Stage::Imports => "imports",
            Stage::Init => "init",
            Stage::Smoke => "smoke",
            Stage::Fixtures => "fixtures",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{} failed: {message}", stage.as_str())]
pub struct LoadError {
    pub stage: Stage,
    pub message: String,
}

impl LoadError {
    pub fn new(stage: Stage, message: impl Into<String>) -> Self {
        Self {
            stage,
            message: message.into(),
        }
    }
}

/// Identity of a loaded version (what the status API shows).
#[derive(Clone, Debug, Serialize)]
pub struct PolicyInfo {
    pub name: String,
    /// SHA-256 of the policy file, hex.
    pub sha256: String,
    pub abi_version: String,
    pub size_bytes: usize,
    pub path: Option<PathBuf>,
    /// Unix ms when this version went live or was loaded.
    pub loaded_at_ms: u64,
}

/// How to load a policy.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub name: String,
    /// The operator's config table, as JSON, passed to `init`.
    pub config_json: String,
    pub limits: Limits,
    pub kv: Arc<KvStore>,
    pub path: Option<PathBuf>,
    pub engine: EngineKind,
}

impl LoadSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            config_json: "{}".into(),
            limits: Limits::default(),
            kv: Arc::default(),
            path: None,
            engine: EngineKind::Service,
        }
    }
}

/// Calls and failures of one version, by kind.
#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub failures: super::instance::FailureCounters,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub calls: u64,
    #[serde(flatten)]
    pub failures: super::instance::FailureCounts,
}

impl StatsSnapshot {
    pub fn failures(&self) -> u64 {
        self.failures.total()
    }
}

impl Stats {
    fn record(&self, failure: &CallFailure) {
        self.failures.record(failure);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.snapshot(),
        }
    }
}

/// Compiled components by engine and file hash: reloading a version seen
/// recently (a rollback, a flip-flopping deploy) skips compilation.
fn compiled(
    kind: EngineKind,
    sha256: &str,
    compile: impl FnOnce() -> wasmtime::Result<Component>,
) -> wasmtime::Result<Component> {
    const KEEP: usize = 16;
    static CACHE: Mutex<VecDeque<(EngineKind, String, Component)>> = Mutex::new(VecDeque::new());
    let lookup = |cache: &VecDeque<(EngineKind, String, Component)>| {
        cache
            .iter()
            .find(|(k, h, _)| *k == kind && h == sha256)
            .map(|(_, _, c)| c.clone())
    };
    if let Some(c) = lookup(&CACHE.lock().unwrap_or_else(|p| p.into_inner())) {
        return Ok(c);
    }
    // Compile without holding the lock.
    let component = compile()?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if lookup(&cache).is_none() {
        if cache.len() == KEEP {
            cache.pop_front();
        }
        cache.push_back((kind, sha256.to_owned(), component.clone()));
    }
    Ok(component)
}

pub struct LoadedPolicy {
    pub info: PolicyInfo,
    pre: Pre,
    spec: LoadSpec,
    idle: ArrayQueue<Instance>,
    pub stats: Stats,
    pub(crate) went_live: Instant,
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("info", &self.info)
            .finish()
    }
}

impl LoadedPolicy {
    /// Check, compile and initialise a policy from its file bytes. Runs the
    /// version, compile, imports and init stages; a ready instance is kept.
    pub fn load(bytes: &[u8], spec: LoadSpec) -> Result<Self, LoadError> {
        let version = abi::read_version(bytes)
            .and_then(|v| abi::check_version(v).map(|_| v))
            .map_err(|e| LoadError::new(Stage::Version, e.to_string()))?;
        let component_bytes =
            abi::to_component(bytes).map_err(|e| LoadError::new(Stage::Compile, e.to_string()))?;
        let foreign = abi::foreign_imports(&component_bytes)
            .map_err(|e| LoadError::new(Stage::Compile, e.to_string()))?;
        if !foreign.is_empty() {
            return Err(LoadError::new(
                Stage::Imports,
                format!(
                    "imports {} which signalbox does not provide (policies get no WASI; build for wasm32-unknown-unknown)",
                    foreign.join(", ")
                ),
            ));
        }
        if spec.limits.memory_bytes > engine::MAX_MEMORY_CAP {
            return Err(LoadError::new(
                Stage::Compile,
                format!(
                    "memory limit exceeds the maximum of {} bytes",
                    engine::MAX_MEMORY_CAP
                ),
            ));
        }
        let engine = engine::engine(spec.engine)
            .map_err(|e| LoadError::new(Stage::Compile, format!("engine: {e:#}")))?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component = compiled(spec.engine, &sha256, || {
            Component::new(&engine, &component_bytes)
        })
        .map_err(|e| LoadError::new(Stage::Compile, format!("{e:#}")))?;
        let pre = contract::linker(&engine)
            .and_then(|l| l.instantiate_pre(&component))
            .and_then(|pre| Pre::new(version, pre))
            .map_err(|e| LoadError::new(Stage::Imports, format!("{e:#}")))?;
        let info = PolicyInfo {
            name: spec.name.clone(),
            sha256,
            abi_version: version.to_string(),
            size_bytes: bytes.len(),
            path: spec.path.clone(),
            loaded_at_ms: super::kv::now_ms(),
        };
        let policy = Self {
            info,
            pre,
            idle: ArrayQueue::new(spec.limits.max_idle_instances.max(1)),
            spec,
            stats: Stats::default(),
            went_live: Instant::now(),
        };
        let ready = policy
            .fresh(Determinism::default())
            .map_err(|e| LoadError::new(Stage::Init, e))?;
        let _ = policy.idle.push(ready);
        Ok(policy)
    }

    /// A new instance with `init` already run. The error is a readable message.
    pub fn fresh(&self, determinism: Determinism) -> Result<Instance, String> {
        let mut state = HostState::new(
            Arc::from(self.spec.name.as_str()),
            self.spec.kv.clone(),
            self.spec.limits.memory_bytes,
        );
        state.determinism = determinism;
        let metered = self.spec.engine == EngineKind::Metered;
        let mut inst = Instance::new(&self.pre, state, self.spec.limits.deadline, metered)
            .map_err(|e| e.to_string())?;
        match inst.init(&self.spec.config_json) {
            Ok(Ok(())) => Ok(inst),
            Ok(Err(refusal)) => Err(format!("init refused the config: {refusal}")),
            Err(failure) => Err(format!("init: {failure}")),
        }
    }

    /// Ask this version for a decision (hot path).
    pub fn call(&self, input: &RouteInput) -> Result<PolicyDecision, CallFailure> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let result = self.call_inner(input);
        if let Err(failure) = &result {
            self.stats.record(failure);
        }
        result
    }

    fn call_inner(&self, input: &RouteInput) -> Result<PolicyDecision, CallFailure> {
        let mut inst = match self.idle.pop() {
            Some(inst) => inst,
            None => self
                .fresh(Determinism::default())
                .map_err(CallFailure::Instantiate)?,
        };
        let result = inst.route(input);
        match &result {
            // The instance answered (possibly garbage): it is still sound.
            Ok(_) | Err(CallFailure::Invalid(_)) => {
                let _ = self.idle.push(inst);
            }
            // Traps leave the instance unusable; drop it.
            Err(_) => {}
        }
        result
    }

    /// Make a validated version ready for live traffic with nothing of its
    /// validation left: the instances that answered smoke and fixture calls
    /// (their memory, caches and the made-up clusters they saw) are dropped,
    /// the key/value store becomes `kv` (validation wrote to a scratch one),
    /// and stats and age count from now. One fresh instance is initialised
    /// against the live store before the swap.
    pub(crate) fn reset_for_live(&mut self, kv: Arc<KvStore>) -> Result<(), LoadError> {
        while self.idle.pop().is_some() {}
        self.spec.kv = kv;
        let ready = self
            .fresh(Determinism::default())
            .map_err(|e| LoadError::new(Stage::Init, e))?;
        let _ = self.idle.push(ready);
        self.stats = Stats::default();
        self.went_live = Instant::now();
        Ok(())
    }

    pub fn spec(&self) -> &LoadSpec {
        &self.spec
    }

    /// How long this version has been live.
    pub fn age(&self) -> Duration {
        self.went_live.elapsed()
    }

    pub fn idle_instances(&self) -> usize {
        self.idle.len()
    }
}
