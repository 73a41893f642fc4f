//! Hot reload with real files on disk and a real watcher: new versions go live,
//! bad candidates never do, misbehaving live versions are rolled back, and
//! callers never see a failure while all of this happens.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use signalbox::policy::{Outcome, PolicyManager, PolicySettings, Stage};
use signalbox::route::guardrails::{Override, Routed};
use signalbox::route::{ClusterView, RouteInput, StatementKind};
use signalbox::router::Router;
use signalbox_tests::{
    cluster, example, faulty, input, read, replace_by_rename, wait_until, write,
};

const LIMIT: Duration = Duration::from_secs(15);

/// A policy directory holding `policy.wasm`, a manager on it and its watcher.
struct Live {
    _dir: tempfile::TempDir,
    path: PathBuf,
    manager: Arc<PolicyManager>,
    _watcher: signalbox::policy::reload::Watcher,
}

fn settings(path: &Path) -> PolicySettings {
    let mut s = PolicySettings::new(path);
    // Events only: the poll would hide a watcher that misses events.
    s.poll = None;
    s.debounce = Duration::from_millis(50);
    s
}

fn start_with(initial: &Path) -> Live {
    start_with_settings(initial, settings(Path::new("")))
}

/// [`start_with`], with `s` (its path replaced by the live file's).
fn start_with_settings(initial: &Path, mut s: PolicySettings) -> Live {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.wasm");
    std::fs::copy(initial, &path).unwrap();
    s.path = path.clone();
    let manager = PolicyManager::start(s).expect("initial policy loads");
    let watcher = manager.watch().expect("watch");
    Live {
        _dir: dir,
        path,
        manager,
        _watcher: watcher,
    }
}

fn reason(manager: &PolicyManager, input: &RouteInput) -> Option<String> {
    manager.decide(input).reason
}

fn last_outcome(manager: &PolicyManager) -> Option<Outcome> {
    manager.status().last_reload.map(|e| e.outcome)
}

#[test]
fn new_version_is_served_after_rename_into_place() {
    let live = start_with(&example("rw-split"));
    let c = cluster();
    assert_eq!(reason(&live.manager, &read(&c)).as_deref(), Some("read"));
    replace_by_rename(&example("lag-aware"), &live.path);
    assert!(
        wait_until(LIMIT, || reason(&live.manager, &read(&c)).as_deref()
            == Some("fresh replica")),
        "lag-aware never went live: {:?}",
        live.manager.status()
    );
    let status = live.manager.status();
    let event = status.last_reload.unwrap();
    assert_eq!(event.trigger, "watch");
    assert!(matches!(event.outcome, Outcome::Activated { .. }));
    assert_eq!(status.reloads_ok, 2); // startup + watch
    assert!(status.last_known_good.is_some());
}

#[test]
fn in_place_overwrite_is_picked_up() {
    let live = start_with(&example("rw-split"));
    let c = cluster();
    std::fs::write(&live.path, std::fs::read(example("lag-aware")).unwrap()).unwrap();
    assert!(wait_until(LIMIT, || {
        reason(&live.manager, &read(&c)).as_deref() == Some("fresh replica")
    }));
}

#[test]
fn a_relative_policy_path_is_watched() {
    // `path = "policy.wasm"` next to a config given as a relative path:
    // the watcher reports absolute paths, which must still be recognised.
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let mut relative = PathBuf::new();
    for _ in cwd.components().skip(1) {
        relative.push("..");
    }
    relative.push(dir.path().strip_prefix("/").unwrap());
    relative.push("policy.wasm");
    assert!(relative.is_relative());
    std::fs::copy(example("rw-split"), &relative).unwrap();
    let manager = PolicyManager::start(settings(&relative)).unwrap();
    let _w = manager.watch().unwrap();
    let c = cluster();
    assert_eq!(reason(&manager, &read(&c)).as_deref(), Some("read"));
    replace_by_rename(&example("lag-aware"), &relative);
    assert!(
        wait_until(LIMIT, || reason(&manager, &read(&c)).as_deref()
            == Some("fresh replica")),
        "{:?}",
        manager.status()
    );
}

#[test]
fn kubernetes_configmap_symlink_swap() {
    // ConfigMap layout: policy.wasm -> ..data/policy.wasm, ..data -> ..v1
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::copy(example("rw-split"), d.join("..v1/policy.wasm")).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.wasm", d.join("policy.wasm")).unwrap();
    let manager = PolicyManager::start(settings(&d.join("policy.wasm"))).unwrap();
    let _w = manager.watch().unwrap();
    let c = cluster();
    assert_eq!(reason(&manager, &read(&c)).as_deref(), Some("read"));
    // The kubelet writes ..v2, points a temp link at it, renames it over ..data.
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::copy(example("lag-aware"), d.join("..v2/policy.wasm")).unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    assert!(
        wait_until(LIMIT, || reason(&manager, &read(&c)).as_deref()
            == Some("fresh replica")),
        "{:?}",
        manager.status()
    );
}

#[test]
fn symlinked_directory_swap() {
    // policies/current -> v1 ; configured path policies/current/policy.wasm
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (v, src) in [("v1", example("rw-split")), ("v2", example("lag-aware"))] {
        std::fs::create_dir(d.join(v)).unwrap();
        std::fs::copy(src, d.join(v).join("policy.wasm")).unwrap();
    }
    std::os::unix::fs::symlink("v1", d.join("current")).unwrap();
    let manager = PolicyManager::start(settings(&d.join("current/policy.wasm"))).unwrap();
    let _w = manager.watch().unwrap();
    let c = cluster();
    assert_eq!(reason(&manager, &read(&c)).as_deref(), Some("read"));
    std::os::unix::fs::symlink("v2", d.join("current.tmp")).unwrap();
    std::fs::rename(d.join("current.tmp"), d.join("current")).unwrap();
    assert!(
        wait_until(LIMIT, || reason(&manager, &read(&c)).as_deref()
            == Some("fresh replica")),
        "{:?}",
        manager.status()
    );
}

/// Replace the live rw-split by `bad`; wait for the watcher to reject it at
/// `stage`; meanwhile and afterwards every decision is still rw-split's.
fn rejected_candidate(bad: &[u8], stage: Stage, message_part: &str) {
    let live = start_with(&example("rw-split"));
    let good_sha = live.manager.status().active.unwrap().sha256;
    let c = cluster();
    let bad_file = live.path.with_file_name("candidate.bin");
    std::fs::write(&bad_file, bad).unwrap();
    replace_by_rename(&bad_file, &live.path);
    let rejected = wait_until(LIMIT, || {
        // Keep serving while we wait; every answer must be the old policy's.
        assert_eq!(reason(&live.manager, &read(&c)).as_deref(), Some("read"));
        assert_eq!(reason(&live.manager, &write(&c)).as_deref(), Some("write"));
        matches!(last_outcome(&live.manager), Some(Outcome::Rejected { .. }))
    });
    let status = live.manager.status();
    assert!(rejected, "candidate was not rejected: {status:?}");
    match status.last_reload.unwrap().outcome {
        Outcome::Rejected {
            stage: s, message, ..
        } => {
            assert_eq!(s, stage, "{message}");
            assert!(message.contains(message_part), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(status.active.unwrap().sha256, good_sha);
    assert_eq!(status.reloads_failed, 1);
    assert_eq!(status.fallbacks.trap + status.fallbacks.timeout, 0);
    // The refused file is not retried by the watcher on further events.
    std::fs::write(live.path.with_file_name("unrelated"), b"x").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(live.manager.status().reloads_failed, 1);
}

#[test]
fn a_not_wasm_is_rejected() {
    rejected_candidate(
        b"#!/bin/sh\necho not a policy\n",
        Stage::Version,
        "not a WebAssembly file",
    );
}

#[test]
fn b_wrong_version_marker_is_rejected() {
    let mut bytes = std::fs::read(example("rw-split")).unwrap();
    let marker = format!("signalbox-policy-abi{}", signalbox_policy::ABI_VERSION);
    let marker = marker.as_bytes();
    let mut replaced = 0;
    let mut i = 0;
    while i + marker.len() <= bytes.len() {
        if &bytes[i..i + marker.len()] == marker {
            bytes[i + marker.len() - 5] = b'9';
            replaced += 1;
        }
        i += 1;
    }
    assert!(replaced >= 1, "marker not found in the component");
    let wrong = format!("signalbox:policy@9{}", &signalbox_policy::ABI_VERSION[1..]);
    rejected_candidate(&bytes, Stage::Version, &wrong);
}

#[test]
fn c_init_failure_is_rejected() {
    let bytes = std::fs::read(faulty(&["init-fail"])).unwrap();
    rejected_candidate(&bytes, Stage::Init, "refuses to start");
}

#[test]
fn d_trap_on_every_call_is_rejected() {
    let bytes = std::fs::read(faulty(&["trap"])).unwrap();
    rejected_candidate(&bytes, Stage::Smoke, "trapped");
}

#[test]
fn e_infinite_loop_is_rejected() {
    let bytes = std::fs::read(faulty(&["spin"])).unwrap();
    rejected_candidate(&bytes, Stage::Smoke, "time limit");
}

#[test]
fn f_unbounded_allocation_is_rejected() {
    let bytes = std::fs::read(faulty(&["hog"])).unwrap();
    rejected_candidate(&bytes, Stage::Smoke, "memory limit");
}

#[test]
fn shipped_fixtures_gate_a_candidate() {
    // lag-aware next to rw-split's fixtures: it loads, but its decisions do
    // not match the shipped expectations, so it must not go live.
    let live = start_with(&example("rw-split"));
    std::fs::copy(
        signalbox_tests::root().join("policies/rw-split/fixtures.toml"),
        live.path.with_file_name("fixtures.toml"),
    )
    .unwrap();
    replace_by_rename(&example("lag-aware"), &live.path);
    assert!(wait_until(LIMIT, || matches!(
        last_outcome(&live.manager),
        Some(Outcome::Rejected {
            stage: Stage::Fixtures,
            ..
        })
    )));
    let c = cluster();
    assert_eq!(reason(&live.manager, &read(&c)).as_deref(), Some("read"));
    // The matching policy passes the same gate.
    replace_by_rename(&example("rw-split"), &live.path);
    let _ = live.manager.reload("api");
    assert!(matches!(
        last_outcome(&live.manager),
        Some(Outcome::Unchanged { .. })
    ));
}

#[test]
fn g_unknown_replica_id_is_overridden_by_the_guardrails() {
    let live = start_with(&example("rw-split"));
    replace_by_rename(&faulty(&["bad-id"]), &live.path);
    let c = cluster();
    assert!(wait_until(LIMIT, || {
        reason(&live.manager, &read(&c)).as_deref() == Some("no such node")
    }));
    let router = Router::new(live.manager.clone());
    for _ in 0..20 {
        let r = router.route(&read(&c));
        assert!(
            matches!(r.enforced.routed, Routed::Node(1) | Routed::Node(2)),
            "{r:?}"
        );
        assert_eq!(r.enforced.overridden, Some(Override::UnknownReplica));
        let w = router.route(&write(&c));
        assert_eq!(w.enforced.routed, Routed::Node(0));
    }
    assert_eq!(router.stats.overrides(Override::UnknownReplica), 20);
}

#[test]
fn misbehaving_new_version_is_rolled_back() {
    let live = start_with(&example("rw-split"));
    let rw_sha = live.manager.status().active.unwrap().sha256;
    replace_by_rename(&faulty(&["trap-on-hint"]), &live.path);
    let c = cluster();
    assert!(wait_until(LIMIT, || {
        reason(&live.manager, &read(&c)).as_deref() == Some("faulty-ok")
    }));
    let router = Router::new(live.manager.clone());
    let boom = input(
        StatementKind::Select,
        true,
        "/* signalbox: boom=1 */ SELECT 1",
        &c,
    );
    // Every statement is still routed (fallback = built-in) while it fails.
    for _ in 0..30 {
        let r = router.route(&boom);
        assert!(matches!(r.enforced.routed, Routed::Node(_)), "{r:?}");
    }
    let status = live.manager.status();
    assert_eq!(status.rollbacks, 1, "{status:?}");
    assert_eq!(status.active.as_ref().unwrap().sha256, rw_sha);
    assert!(matches!(
        status.last_reload.as_ref().unwrap().outcome,
        Outcome::RolledBack { .. }
    ));
    // It failed until the rollback, and not after: all 30 would trap without it.
    assert!((1..30).contains(&status.fallbacks.trap), "{status:?}");
    assert_eq!(reason(&live.manager, &read(&c)).as_deref(), Some("read"));
    // The watcher does not bring the rolled-back file back on its own.
    std::fs::write(live.path.with_file_name("unrelated"), b"x").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(live.manager.status().active.unwrap().sha256, rw_sha);
}

#[test]
fn fifty_reloads_under_concurrent_load_fail_no_call() {
    // What fails a call here must be the reload, not the clock: on a
    // starved two-core machine (four callers, fifty compilations, a test
    // suite beside them) one call once spent more than the default 2 ms
    // deadline's share of its own CPU time and fell back
    // ("fallback:timeout"). Deadlines have tests of their own.
    let mut s = settings(Path::new(""));
    s.limits.deadline = Duration::from_millis(500);
    let live = start_with_settings(&example("rw-split"), s);
    let router = Arc::new(Router::new(live.manager.clone()));
    let c: Arc<ClusterView> = cluster();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (router, c, stop, calls) = (router.clone(), c.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let is_read = i % 2 == 0;
                    let inp = if is_read { read(&c) } else { write(&c) };
                    let r = router.route(&inp);
                    calls.fetch_add(1, Ordering::Relaxed);
                    let ok = r.failure.is_none()
                        && match r.enforced.routed {
                            Routed::Node(0) => !is_read,
                            Routed::Node(_) => is_read,
                            _ => false,
                        };
                    if !ok {
                        bad.push(format!("{r:?}"));
                    }
                }
                bad
            })
        })
        .collect();
    let versions = [example("lag-aware"), example("rw-split")];
    for i in 0..50 {
        replace_by_rename(&versions[i % 2], &live.path);
        // Explicit reloads race with the watcher's; both must be safe.
        let _ = live.manager.reload("api");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let bad: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker panicked"))
        .collect();
    let status = live.manager.status();
    assert!(
        bad.is_empty(),
        "{} bad calls, first: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(
        calls.load(Ordering::Relaxed) > 1000,
        "too few calls to mean anything"
    );
    // startup + 50 swaps (the watcher may find some already applied).
    assert!(status.reloads_ok >= 51, "{status:?}");
    assert_eq!(status.reloads_failed, 0);
    assert_eq!(status.fallbacks.trap + status.fallbacks.instantiate, 0);
    eprintln!(
        "{} calls during 50 reloads, none failed",
        calls.load(Ordering::Relaxed)
    );
}
