//! Policy runtime costs: a routing call with a trivial and a realistic policy,
//! a fresh instance, a runaway policy's stop time, and a cold reload
//! (compile + validate + swap). Run: `cargo bench -p signalbox --bench policy`.
//! Results and targets: bench/RESULTS.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use signalbox::policy::build::{build_policy, BuildOptions};
use signalbox::policy::fixtures::realistic_input;
use signalbox::policy::instance::Determinism;
use signalbox::policy::{LoadSpec, LoadedPolicy, PolicyManager, PolicySettings};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn built(dir: &str, key: &str, features: &[&str]) -> Vec<u8> {
    let out = root()
        .join("target/bench-policies")
        .join(format!("{key}.wasm"));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let opts = BuildOptions {
        out: Some(out.clone()),
        target_dir: Some(root().join("target/policy-build")),
        features: features.iter().map(|s| s.to_string()).collect(),
        quiet: true,
    };
    build_policy(&root().join(dir), &opts).expect("build policy");
    std::fs::read(out).unwrap()
}

fn load(bytes: &[u8], config: &str) -> LoadedPolicy {
    let mut spec = LoadSpec::new("bench");
    spec.config_json = config.into();
    LoadedPolicy::load(bytes, spec).expect("load")
}

fn routing(c: &mut Criterion) {
    let trivial = load(&built("tests/policies/faulty", "trivial", &[]), "{}");
    let zone = load(
        &built("policies/zone-affinity", "zone-affinity", &[]),
        r#"{"max_lag_ms": 500}"#,
    );
    let input = realistic_input();
    let mut g = c.benchmark_group("route");
    g.bench_function("trivial", |b| b.iter(|| trivial.call(&input).unwrap()));
    g.bench_function("realistic_zone_affinity_8_backends", |b| {
        b.iter(|| zone.call(&input).unwrap())
    });
    g.finish();
    c.bench_function("instantiate_and_init", |b| {
        b.iter(|| zone.fresh(Determinism::default()).unwrap())
    });
}

fn runaway(c: &mut Criterion) {
    let spin = load(&built("tests/policies/faulty", "spin", &["spin"]), "{}");
    let input = realistic_input();
    let mut g = c.benchmark_group("runaway");
    g.sample_size(20);
    g.bench_function("stopped_after_2ms_deadline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut inst = spin.fresh(Determinism::default()).unwrap();
                let t = Instant::now();
                assert!(inst.route(&input).is_err());
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn reload(c: &mut Criterion) {
    let bytes = built("policies/lag-aware", "lag-aware", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.wasm");
    std::fs::write(&path, &bytes).unwrap();
    let manager = PolicyManager::start(PolicySettings::new(&path)).unwrap();
    let mut g = c.benchmark_group("reload");
    g.sample_size(10);
    // Criterion runs the routine more than once (warm-up, measurement): the
    // nonce must keep counting across runs so every round is a new version.
    let nonce = std::cell::Cell::new(0u64);
    g.bench_function("cold_compile_validate_swap", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A distinct custom section per round: new hash, no compile cache hit.
                nonce.set(nonce.get() + 1);
                let mut v = bytes.clone();
                signalbox::policy::abi::stamp_version(&mut v, "0.1.0");
                v.extend_from_slice(&[0, 10, 5, b'n', b'o', b'n', b'c', b'e']);
                v.extend_from_slice(&(nonce.get() as u32).to_le_bytes());
                std::fs::write(&path, &v).unwrap();
                let t = Instant::now();
                let event = manager.reload("bench");
                total += t.elapsed();
                assert!(
                    matches!(event.outcome, signalbox::policy::Outcome::Activated { .. }),
                    "{event:?}"
                );
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, routing, runaway, reload);
criterion_main!(benches);
