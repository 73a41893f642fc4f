//! The process-wide wasmtime engine: one per process (compiled code and the
//! instance pool are shared by every policy version), plus the epoch ticker
//! that enforces per-call deadlines. The ticker runs only while policies are
//! being called: after [`TICKER_LINGER`] without a call it parks, and the
//! next call wakes it, so an idle signalbox has no timer waking it up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are whole ticks of this. Each
/// tick wakes a thread, which competes with the data path on small machines:
/// 1 ms is coarse enough to be cheap, and the CPU-time check that follows a
/// missed deadline makes the stop precise.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How long the ticker keeps ticking after the last call started. Under
/// load it never parks (no wake-up syscalls on the hot path); idle, it
/// stops within this.
pub const TICKER_LINGER: Duration = Duration::from_millis(50);

/// The largest memory cap a policy may be configured with.
pub const MAX_MEMORY_CAP: usize = 256 << 20;

/// Pool capacity: instances alive at once across every loaded policy version.
const POOL_INSTANCES: u32 = 512;

/// Which engine: the service's, or the CLI's with fuel metering on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Pooling allocator, epoch deadlines; what `serve` uses.
    Service,
    /// Also counts instructions (fuel) per call; slower, for `policy test`.
    Metered,
}

/// The engine of `kind`, created on first use with its epoch ticker.
pub fn engine(kind: EngineKind) -> Result<Engine, wasmtime::Error> {
    static SERVICE: OnceLock<Engine> = OnceLock::new();
    static METERED: OnceLock<Engine> = OnceLock::new();
    let cell = match kind {
        EngineKind::Service => &SERVICE,
        EngineKind::Metered => &METERED,
    };
    if let Some(engine) = cell.get() {
        return Ok(engine.clone());
    }
    let engine = build(kind)?;
    // Another thread may have won the race; use whichever got stored.
    let stored = cell.get_or_init(|| {
        start_ticker(engine.clone(), kind);
        engine
    });
    Ok(stored.clone())
}

fn build(kind: EngineKind) -> Result<Engine, wasmtime::Error> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Names guest functions for `perf` (writes /tmp/perf-PID.map).
    if std::env::var_os("SIGNALBOX_PERF_MAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    match kind {
        EngineKind::Service => {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(POOL_INSTANCES)
                .total_core_instances(POOL_INSTANCES)
                .total_memories(POOL_INSTANCES)
                .total_tables(POOL_INSTANCES)
                .max_memory_size(MAX_MEMORY_CAP);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        EngineKind::Metered => {
            config.consume_fuel(true);
        }
    }
    Engine::new(&config)
}

/// The ticker of one engine: calls count themselves in `calls` when they
/// start and in `running` while they run; the ticker parks when a linger
/// period saw no call start and none is running, after announcing it in
/// `parked` (a call longer than the linger still needs its deadline).
struct Ticker {
    calls: AtomicU64,
    running: AtomicU64,
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

static TICKERS: [Ticker; 2] = [Ticker::new(), Ticker::new()];

impl Ticker {
    const fn new() -> Self {
        Self {
            calls: AtomicU64::new(0),
            running: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            thread: OnceLock::new(),
        }
    }

    fn of(kind: EngineKind) -> &'static Ticker {
        &TICKERS[kind as usize]
    }
}

/// A policy call on an engine of `kind` is about to start: make sure its
/// deadline will be enforced (wakes the ticker if it parked) until the
/// returned guard drops. SeqCst on both sides: either the ticker sees this
/// call, or this call sees it parked.
pub fn call_starting(kind: EngineKind) -> Running {
    let t = Ticker::of(kind);
    t.running.fetch_add(1, Ordering::SeqCst);
    t.calls.fetch_add(1, Ordering::SeqCst);
    if t.parked.load(Ordering::SeqCst) {
        if let Some(thread) = t.thread.get() {
            thread.unpark();
        }
    }
    Running(t)
}

/// A policy call in progress: the ticker keeps ticking while one exists.
#[must_use = "the call counts as running only while this lives"]
pub struct Running(&'static Ticker);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether the ticker of `kind` is parked (nothing called a policy lately).
pub fn ticker_parked(kind: EngineKind) -> bool {
    Ticker::of(kind).parked.load(Ordering::SeqCst)
}

fn start_ticker(engine: Engine, kind: EngineKind) {
    let ticker = Ticker::of(kind);
    let linger_ticks = (TICKER_LINGER.as_micros() / EPOCH_TICK.as_micros()).max(1) as u32;
    let spawned = std::thread::Builder::new()
        .name("signalbox-epoch".into())
        .spawn(move || {
            let mut seen = ticker.calls.load(Ordering::SeqCst);
            let mut quiet = 0u32;
            loop {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
                let now = ticker.calls.load(Ordering::SeqCst);
                if now != seen || ticker.running.load(Ordering::SeqCst) > 0 {
                    (seen, quiet) = (now, 0);
                    continue;
                }
                quiet += 1;
                if quiet < linger_ticks {
                    continue;
                }
                ticker.parked.store(true, Ordering::SeqCst);
                // A call that started after the last look finds `parked`
                // set and unparks us (an unpark before park is kept).
                while ticker.calls.load(Ordering::SeqCst) == seen
                    && ticker.running.load(Ordering::SeqCst) == 0
                {
                    std::thread::park();
                }
                ticker.parked.store(false, Ordering::SeqCst);
                quiet = 0;
            }
        });
    match spawned {
        Ok(handle) => {
            let _ = ticker.thread.set(handle.thread().clone());
        }
        // Without the ticker, deadlines never fire; say so loudly.
        Err(e) => {
            tracing::error!(error = %e, "cannot start the policy epoch ticker: policy deadlines are not enforced")
        }
    }
}

/// Epoch ticks for a deadline, at least one. The ticker oversleeps a little,
/// so this errs short; the CPU-time check on the slow path does the rest.
pub fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
}
