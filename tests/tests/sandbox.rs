//! The sandbox's limits and failure handling on real components: deadline,
//! memory cap, traps, invalid decisions, no WASI, the key/value store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use signalbox::policy::kv::KvStore;
use signalbox::policy::{CallFailure, LoadSpec, LoadedPolicy, Stage};
use signalbox_tests::{cluster, faulty, read, write};

fn load(features: &[&str], spec: LoadSpec) -> Result<LoadedPolicy, signalbox::policy::LoadError> {
    LoadedPolicy::load(&std::fs::read(faulty(features)).unwrap(), spec)
}

/// Call `p` on a thread of its own; `None` if no answer came within 5 s
/// (a runaway nothing stopped), so a broken deadline fails the test
/// instead of hanging it.
fn call_bounded(
    p: &std::sync::Arc<LoadedPolicy>,
    input: signalbox::route::RouteInput,
) -> Option<Result<signalbox::policy::PolicyDecision, CallFailure>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = p.clone();
    std::thread::spawn(move || {
        let _ = tx.send(p.call(&input));
    });
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

#[test]
fn runaway_policy_is_stopped_by_the_deadline() {
    let mut spec = LoadSpec::new("spin");
    spec.limits.deadline = Duration::from_millis(2);
    let p = std::sync::Arc::new(load(&["spin"], spec).unwrap());
    let c = cluster();
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            call_bounded(&p, read(&c)),
            Some(Err(CallFailure::Timeout)),
            "a runaway call must be stopped"
        );
        // Reported, not asserted on (timing belongs to benches).
        eprintln!("runaway stopped after {:?}", t.elapsed());
    }
    assert_eq!(p.stats.snapshot().failures.timeout, 5);

    // Idle, the epoch ticker parks (no timer wakes an idle signalbox); the
    // next call wakes it, so a runaway is still stopped.
    // (Other tests of this process call policies too: wait for a lull.)
    use signalbox::policy::engine::{ticker_parked, EngineKind, TICKER_LINGER};
    std::thread::sleep(TICKER_LINGER * 2);
    assert!(
        signalbox_tests::wait_until(Duration::from_secs(20), || ticker_parked(
            EngineKind::Service
        )),
        "an idle ticker parks"
    );
    assert_eq!(
        call_bounded(&p, read(&c)),
        Some(Err(CallFailure::Timeout)),
        "a runaway call after an idle spell must still be stopped"
    );
    assert!(!ticker_parked(EngineKind::Service));

    // A deadline longer than the ticker's linger: the ticker must keep
    // ticking while the call runs, not park 50 ms after it started.
    let mut spec = LoadSpec::new("spin-long");
    spec.limits.deadline = TICKER_LINGER * 6;
    let long = std::sync::Arc::new(load(&["spin"], spec).unwrap());
    assert!(
        signalbox_tests::wait_until(Duration::from_secs(20), || ticker_parked(
            EngineKind::Service
        )),
        "an idle ticker parks"
    );
    assert_eq!(
        call_bounded(&long, read(&c)),
        Some(Err(CallFailure::Timeout)),
        "a runaway with a deadline beyond the linger must be stopped"
    );
}

#[test]
fn memory_cap_is_enforced_and_configurable() {
    let mut spec = LoadSpec::new("hog");
    spec.limits.memory_bytes = 4 << 20;
    let p = load(&["hog"], spec).unwrap();
    assert_eq!(p.call(&read(&cluster())), Err(CallFailure::OutOfMemory));
    assert_eq!(p.stats.snapshot().failures.out_of_memory, 1);
}

#[test]
fn trap_recycles_the_instance_and_is_counted() {
    let p = load(&["trap-on-hint"], LoadSpec::new("t")).unwrap();
    let c = cluster();
    let boom = signalbox_tests::input(
        signalbox::route::StatementKind::Select,
        true,
        "/* signalbox: boom=1 */ SELECT 1",
        &c,
    );
    for _ in 0..3 {
        assert!(matches!(p.call(&boom), Err(CallFailure::Trap(_))));
        // The next call works: a fresh instance replaced the trapped one.
        assert!(p.call(&read(&c)).is_ok());
    }
    let s = p.stats.snapshot();
    assert_eq!((s.calls, s.failures.trap), (6, 3));
}

#[test]
fn invalid_decision_is_a_failure() {
    let p = load(&["garbage"], LoadSpec::new("g")).unwrap();
    assert!(matches!(
        p.call(&write(&cluster())),
        Err(CallFailure::Invalid(_))
    ));
    assert_eq!(p.stats.snapshot().failures.invalid, 1);
}

#[test]
fn init_refusal_is_a_load_error() {
    let err = load(&["init-fail"], LoadSpec::new("i")).unwrap_err();
    assert_eq!(err.stage, Stage::Init);
    assert!(err.message.contains("refuses to start"), "{}", err.message);
}

#[test]
fn log_flood_is_capped_per_call() {
    // A thousand log calls in a debug build can outlast the default 2 ms
    // on a busy machine: this test is about the cap, not the deadline.
    let mut spec = LoadSpec::new("l");
    spec.limits.deadline = Duration::from_millis(200);
    let p = load(&["log-flood"], spec).unwrap();
    let mut inst = p.fresh(Default::default()).unwrap();
    inst.state_mut().captured_logs = Some(Vec::new());
    assert!(inst.route(&read(&cluster())).is_ok());
    let logs = inst.state_mut().captured_logs.take().unwrap();
    assert_eq!(logs.len(), 16, "only the first lines of a call are kept");
}

#[test]
fn kv_store_outlives_instances_and_versions() {
    let kv = Arc::new(KvStore::default());
    let mut spec = LoadSpec::new("kv");
    spec.kv = kv.clone();
    let v1 = load(&["kv"], spec.clone()).unwrap();
    let c = cluster();
    let reasons: Vec<String> = (0..3)
        .map(|_| v1.call(&read(&c)).unwrap().reason.unwrap())
        .collect();
    assert_eq!(reasons, ["n=0", "n=1", "n=2"]);
    // A fresh instance of the same version sees the store.
    let mut fresh = v1.fresh(Default::default()).unwrap();
    assert_eq!(
        fresh.route(&read(&c)).unwrap().reason.as_deref(),
        Some("n=3")
    );
    // So does a new version sharing the policy's store.
    let v2 = load(&["kv", "v2"], spec).unwrap();
    assert_eq!(
        v2.call(&read(&c)).unwrap().reason.as_deref(),
        Some("v2 n=4")
    );
    assert_eq!(kv.get("n", 0).as_deref(), Some("5"));
}

/// A component that imports a WASI interface (made from WIT with a dummy
/// implementation, stamped with our version marker) must be refused at the
/// imports stage with a message naming the import.
#[test]
fn wasi_policies_are_refused_before_instantiation() {
    const WIT: &str = r#"
        package wasi:cli@0.2.0;
        interface environment {
            get-environment: func() -> list<tuple<string, string>>;
        }
        world sneaky {
            import environment;
            export init: func(config: string) -> result<_, string>;
        }
    "#;
    let mut resolve = wit_parser::Resolve::default();
    let pkg = resolve.push_str("sneaky.wit", WIT).unwrap();
    let world = resolve.select_world(&[pkg], Some("sneaky")).unwrap();
    let mut module =
        wit_component::dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .unwrap();
    let mut component = wit_component::ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .encode()
        .unwrap();
    signalbox::policy::abi::stamp_version(&mut component, "0.1.0");
    let err = LoadedPolicy::load(&component, LoadSpec::new("sneaky")).unwrap_err();
    assert_eq!(err.stage, Stage::Imports, "{err}");
    assert!(err.message.contains("wasi:cli/environment@0.2.0"), "{err}");
    // The real policies import nothing but the contract.
    let ours = std::fs::read(faulty(&[])).unwrap();
    assert!(signalbox::policy::abi::foreign_imports(&ours)
        .unwrap()
        .is_empty());
}
