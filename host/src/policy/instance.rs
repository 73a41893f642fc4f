//! One sandboxed policy instance: a wasmtime `Store` (single-threaded) with the
//! host side of the contract, its memory cap and per-call deadline. Callers
//! own an instance exclusively for the duration of a call; see
//! [`super::loaded`] for how instances are pooled and recycled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};

use super::contract::{Bindings, Pre};
use super::kv::{self, KvStore};
use crate::route::{RouteInput, Target};

/// The most SQL text a policy can read; longer statements are cut (on a char
/// boundary) — `statement-info.sql-len` still tells the full length.
pub const SQL_CAP: usize = 8 * 1024;
/// Log lines a policy may write per call; more are dropped (and counted).
const LOG_LINES_PER_CALL: u32 = 16;
/// Longest reason accepted in a decision (it becomes a metrics label).
pub const MAX_REASON: usize = 64;
/// Longest reject message accepted.
pub const MAX_REJECT: usize = 1024;

/// Why a call did not produce a usable decision.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    #[error("policy trapped: {0}")]
    Trap(String),
    #[error("policy exceeded its time limit")]
    Timeout,
    #[error("policy exceeded its memory limit")]
    OutOfMemory,
    #[error("policy returned an invalid decision: {0}")]
    Invalid(String),
    #[error("cannot instantiate policy: {0}")]
    Instantiate(String),
}

impl CallFailure {
    /// Every kind, as metrics labels and JSON keys.
    pub const KINDS: [&'static str; 5] =
        ["trap", "timeout", "out_of_memory", "invalid", "instantiate"];

    fn index(&self) -> usize {
        match self {
            CallFailure::Trap(_) => 0,
            CallFailure::Timeout => 1,
            CallFailure::OutOfMemory => 2,
            CallFailure::Invalid(_) => 3,
            CallFailure::Instantiate(_) => 4,
        }
    }

    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.index()]
    }
}

/// Failed policy calls by kind: the one place the kinds are counted (a
/// version's own stats and the manager's fallbacks both use it).
#[derive(Debug, Default)]
pub struct FailureCounters([std::sync::atomic::AtomicU64; 5]);

impl FailureCounters {
    pub fn record(&self, failure: &CallFailure) {
        self.0[failure.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FailureCounts {
        let g = |i: usize| self.0[i].load(std::sync::atomic::Ordering::Relaxed);
        FailureCounts {
            trap: g(0),
            timeout: g(1),
            out_of_memory: g(2),
            invalid: g(3),
            instantiate: g(4),
        }
    }
}

/// A snapshot of [`FailureCounters`].
#[derive(Clone, Copy, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct FailureCounts {
    pub trap: u64,
    pub timeout: u64,
    pub out_of_memory: u64,
    pub invalid: u64,
    pub instantiate: u64,
}

impl FailureCounts {
    pub fn total(&self) -> u64 {
        self.by_kind().iter().map(|(_, n)| n).sum()
    }

    /// (kind, count) in [`CallFailure::KINDS`] order.
    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        let k = CallFailure::KINDS;
        [
            (k[0], self.trap),
            (k[1], self.timeout),
            (k[2], self.out_of_memory),
            (k[3], self.invalid),
            (k[4], self.instantiate),
        ]
    }
}

/// Overrides used by fixtures and the CLI to make a call deterministic.
#[derive(Clone, Copy, Debug, Default)]
pub struct Determinism {
    pub random: Option<u64>,
    pub now_ms: Option<u64>,
}

/// Host state living inside each `Store`.
pub struct HostState {
    input: Option<RouteInput>,
    kv: Arc<KvStore>,
    name: Arc<str>,
    memory_cap: usize,
    memory_exceeded: bool,
    rng: fastrand::Rng,
    pub determinism: Determinism,
    logs_this_call: u32,
    deadline: Duration,
    deadline_ticks: u64,
    /// Set when the current call outlived its wall-clock deadline.
    overtime: Option<Overtime>,
    /// When set, log lines are captured here instead of going to `tracing`.
    pub captured_logs: Option<Vec<(String, String)>>,
}

impl HostState {
    pub fn new(name: Arc<str>, kv: Arc<KvStore>, memory_cap: usize) -> Self {
        Self {
            input: None,
            kv,
            name,
            memory_cap,
            memory_exceeded: false,
            rng: fastrand::Rng::new(),
            determinism: Determinism::default(),
            logs_this_call: 0,
            deadline: Duration::from_millis(2),
            deadline_ticks: 1,
            overtime: None,
            captured_logs: None,
        }
    }

    pub(super) fn now(&self) -> u64 {
        self.determinism.now_ms.unwrap_or_else(kv::now_ms)
    }

    /// The epoch deadline passed. The epoch is wall-clock time, so a call
    /// that was merely preempted (busy machine) looks the same as a runaway.
    /// Tell them apart by the thread's CPU time, read only on this slow path:
    /// from then on, check every tick (see [`runaway`]).
    fn on_deadline(&mut self) -> UpdateDeadline {
        let now = Instant::now();
        let cpu = thread_cpu_ns();
        let Some(first) = self.overtime else {
            self.overtime = Some(Overtime {
                wall: now,
                cpu_ns: cpu,
            });
            return UpdateDeadline::Continue(1);
        };
        let wall = now.duration_since(first.wall);
        // Without a CPU clock, all of the overtime counts as busy: a plain
        // wall-clock deadline.
        let busy = match (cpu, first.cpu_ns) {
            (Some(now), Some(then)) => Duration::from_nanos(now.saturating_sub(then)),
            _ => wall,
        };
        if runaway(self.deadline, wall, busy) {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Continue(1)
        }
    }
}

/// Whether a call past its deadline is to be stopped, given the wall time
/// and the thread's CPU time since the deadline passed. A call that keeps
/// the CPU busy (a quarter deadline of CPU, at least half of the overtime)
/// is stopped at once; on a starved machine, one that has burnt a whole
/// further deadline of CPU. A call that was merely waiting for the CPU is
/// never stopped for it: it finishes in microseconds once it runs again, and
/// failing it then would save no time, only lose the policy's decision.
fn runaway(deadline: Duration, wall: Duration, busy: Duration) -> bool {
    let spinning = busy >= deadline / 4 && busy * 2 >= wall;
    spinning || busy >= deadline
}

#[derive(Clone, Copy, Debug)]
struct Overtime {
    wall: Instant,
    cpu_ns: Option<u64>,
}

/// CPU time consumed by the calling thread, in nanoseconds.
fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some((ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64)
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The host side of the contract, shared by every version's imports
/// (see [`super::contract`]).
impl HostState {
    pub(super) fn log_line(&mut self, level: signalbox_policy::Level, message: String) {
        use signalbox_policy::Level;
        self.logs_this_call += 1;
        if self.logs_this_call > LOG_LINES_PER_CALL {
            return;
        }
        let level_name = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        if let Some(logs) = self.captured_logs.as_mut() {
            logs.push((level_name.to_owned(), message));
            return;
        }
        let policy = &*self.name;
        match level {
            Level::Trace => tracing::trace!(policy, "{message}"),
            Level::Debug => tracing::debug!(policy, "{message}"),
            Level::Info => tracing::info!(policy, "{message}"),
            Level::Warn => tracing::warn!(policy, "{message}"),
            Level::Error => tracing::error!(policy, "{message}"),
        }
    }

    pub(super) fn random_u64(&mut self) -> u64 {
        self.determinism.random.unwrap_or_else(|| self.rng.u64(..))
    }

    pub(super) fn kv_get_value(&mut self, key: &str) -> Option<String> {
        self.kv.get(key, self.now())
    }

    pub(super) fn kv_set_value(&mut self, key: &str, value: &str, ttl_ms: Option<u64>) {
        if !self.kv.set(key, value, ttl_ms, self.now()) {
            tracing::warn!(
                policy = &*self.name,
                key,
                "policy kv-set refused: entry too large or store full"
            );
        }
    }

    pub(super) fn kv_delete_key(&mut self, key: &str) {
        self.kv.delete(key);
    }

    /// `f` of the statement being routed; the default outside `route`.
    pub(super) fn with_input<T: Default>(&self, f: impl FnOnce(&RouteInput) -> T) -> T {
        self.input.as_ref().map(f).unwrap_or_default()
    }

    /// The statement text, cut at [`SQL_CAP`] on a char boundary.
    pub(super) fn sql_text(&self) -> String {
        self.with_input(|input| {
            let sql = &*input.statement.sql;
            let mut end = sql.len().min(SQL_CAP);
            while !sql.is_char_boundary(end) {
                end -= 1;
            }
            sql[..end].to_owned()
        })
    }
}

/// A decision as returned by a policy, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    pub target: Target,
    pub reason: Option<String>,
}

/// One live instance of a policy version.
pub struct Instance {
    store: Store<HostState>,
    bindings: Bindings,
    deadline_ticks: u64,
    metered: bool,
    /// Instructions (fuel) used by the last call, on a metered engine.
    pub last_fuel: Option<u64>,
}

const FUEL_BUDGET: u64 = u64::MAX / 4;

impl Instance {
    /// Instantiate (no `init` yet).
    pub fn new(
        pre: &Pre,
        mut state: HostState,
        deadline: Duration,
        metered: bool,
    ) -> Result<Self, CallFailure> {
        let deadline_ticks = super::engine::deadline_ticks(deadline);
        state.deadline = deadline;
        state.deadline_ticks = deadline_ticks;
        let mut store = Store::new(pre.engine(), state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.epoch_deadline_callback(|mut ctx| Ok(ctx.data_mut().on_deadline()));
        store.set_epoch_deadline(deadline_ticks);
        if metered {
            store
                .set_fuel(FUEL_BUDGET)
                .map_err(|e| CallFailure::Instantiate(format!("{e:#}")))?;
        }
        // Instantiating runs guest code too (start functions): tick.
        let _running = super::engine::call_starting(if metered {
            super::engine::EngineKind::Metered
        } else {
            super::engine::EngineKind::Service
        });
        let bindings = pre.instantiate(&mut store).map_err(|e| {
            classify(&store, e).unwrap_or_else(|e| CallFailure::Instantiate(format!("{e:#}")))
        })?;
        Ok(Self {
            store,
            bindings,
            deadline_ticks,
            metered,
            last_fuel: None,
        })
    }

    /// Ready the store for one call; the guard keeps deadlines ticking
    /// until the call returns.
    fn arm(&mut self) -> super::engine::Running {
        use super::engine::{call_starting, EngineKind};
        let running = call_starting(if self.metered {
            EngineKind::Metered
        } else {
            EngineKind::Service
        });
        self.store.set_epoch_deadline(self.deadline_ticks);
        let state = self.store.data_mut();
        state.logs_this_call = 0;
        state.overtime = None;
        if self.metered {
            let _ = self.store.set_fuel(FUEL_BUDGET);
        }
        running
    }

    fn fuel_used(&mut self) {
        if self.metered {
            self.last_fuel = self.store.get_fuel().ok().map(|left| FUEL_BUDGET - left);
        }
    }

    /// Call the policy's `init(config)`. `Ok(Err(msg))` is the policy refusing.
    pub fn init(&mut self, config: &str) -> Result<Result<(), String>, CallFailure> {
        let _running = self.arm();
        let result = self.bindings.init(&mut self.store, config);
        self.fuel_used();
        result.map_err(|e| self.failure(e))
    }

    /// Ask for a decision. On `Err` the instance must not be reused.
    pub fn route(&mut self, input: &RouteInput) -> Result<PolicyDecision, CallFailure> {
        let _running = self.arm();
        self.store.data_mut().input = Some(input.clone());
        let result = self.bindings.route(&mut self.store, input);
        self.store.data_mut().input = None;
        self.fuel_used();
        let (target, reason) = result.map_err(|e| self.failure(e))?;
        validate(target, reason)
    }

    fn failure(&mut self, e: wasmtime::Error) -> CallFailure {
        classify(&self.store, e).unwrap_or_else(|e| CallFailure::Trap(format!("{e:#}")))
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }
}

/// Map a wasmtime error to the failure kind; `Err` hands back unclassified ones.
fn classify(store: &Store<HostState>, e: wasmtime::Error) -> Result<CallFailure, wasmtime::Error> {
    if store.data().memory_exceeded {
        return Ok(CallFailure::OutOfMemory);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) | Some(Trap::OutOfFuel) => Ok(CallFailure::Timeout),
        _ => Err(e),
    }
}

fn validate(target: Target, reason: Option<String>) -> Result<PolicyDecision, CallFailure> {
    if let Some(reason) = &reason {
        if reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(CallFailure::Invalid(format!(
                "reason must be at most {MAX_REASON} printable bytes"
            )));
        }
    }
    if let Target::Reject(message) = &target {
        if message.trim().is_empty() || message.len() > MAX_REJECT {
            return Err(CallFailure::Invalid(format!(
                "reject message must be 1 to {MAX_REJECT} bytes"
            )));
        }
    }
    Ok(PolicyDecision { target, reason })
}

#[cfg(test)]
mod tests {
    use super::runaway;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_preempted_call_is_never_stopped_for_waiting() {
        // Descheduled for 50× its deadline, then a few microseconds of work.
        for wall in [2 * MS, 17 * MS, 100 * MS, 2000 * MS] {
            assert!(
                !runaway(2 * MS, wall, Duration::from_micros(40)),
                "{wall:?}"
            );
        }
    }

    #[test]
    fn a_spinning_call_is_stopped_soon_after_its_deadline() {
        assert!(runaway(2 * MS, MS, MS));
        assert!(!runaway(2 * MS, MS, Duration::from_micros(400)));
    }

    #[test]
    fn a_starved_runaway_is_stopped_once_it_has_burnt_a_deadline() {
        // A fifth of the CPU: never "spinning", but its CPU adds up.
        assert!(!runaway(2 * MS, 9 * MS, Duration::from_micros(1800)));
        assert!(runaway(2 * MS, 10 * MS, 2 * MS));
    }
}
