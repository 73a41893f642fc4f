//! The process-wide wasmtime engine: one per process (compiled code and the
//! instance pool are shared by every policy version), plus the epoch ticker
//! that enforces per-call deadlines.

use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are whole ticks of this. Each
/// tick wakes a thread, which competes with the data path on small machines:
/// 1 ms is coarse enough to be cheap, and the CPU-time check that follows a
/// missed deadline makes the stop precise.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

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
        start_ticker(engine.clone());
        engine
    });
    Ok(stored.clone())
}

fn build(kind: EngineKind) -> Result<Engine, wasmtime::Error> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
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

fn start_ticker(engine: Engine) {
    let spawned = std::thread::Builder::new()
        .name("signalbox-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
        });
    if let Err(e) = spawned {
        // Without the ticker, deadlines never fire; say so loudly.
        tracing::error!(error = %e, "cannot start the policy epoch ticker: policy deadlines are not enforced");
    }
}

/// Epoch ticks for a deadline, at least one. The ticker oversleeps a little,
/// so this errs short; the CPU-time check on the slow path does the rest.
pub fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
}
