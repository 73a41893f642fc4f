//! Every example policy, built to a real component, gives its fixture
//! decisions when run by the host (the same files its native tests use).

use signalbox::policy::{fixtures, LoadSpec, LoadedPolicy};
use signalbox_policy::fixture::FixtureFile;
use signalbox_tests::{example, root};

fn check_example(name: &str) {
    let fixture_path = root().join("policies").join(name).join("fixtures.toml");
    check(
        name,
        &example(name),
        &fixture_path,
        signalbox_policy::ABI_VERSION,
    );
}

/// Run the fixtures of `fixture_path` against the policy file `wasm`,
/// which must target contract `version`.
fn check(name: &str, wasm: &std::path::Path, fixture_path: &std::path::Path, version: &str) {
    let file = FixtureFile::load(fixture_path).expect("fixture file");
    let bytes = std::fs::read(wasm).expect("read wasm");
    let mut spec = LoadSpec::new(name);
    spec.config_json = file.config_json();
    let policy = LoadedPolicy::load(&bytes, spec).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(policy.info.abi_version, version);
    let results = fixtures::run(&policy, &file).expect("run fixtures");
    assert_eq!(results.len(), file.cases.len());
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.verdict.err())
        .collect();
    assert!(failures.is_empty(), "{name}: {failures:#?}");
}

#[test]
fn rw_split_fixtures_in_wasm() {
    check_example("rw-split");
}

#[test]
fn lag_aware_fixtures_in_wasm() {
    check_example("lag-aware");
}

#[test]
fn read_your_writes_fixtures_in_wasm() {
    check_example("read-your-writes");
}

#[test]
fn zone_affinity_fixtures_in_wasm() {
    check_example("zone-affinity");
}

#[test]
fn canary_fixtures_in_wasm() {
    check_example("canary");
}

/// Policies built with the 0.1.0 SDK (kept as built, in
/// `tests/fixtures/contract-0.1.0`) still load and decide as they did.
#[test]
fn contract_0_1_0_policies_still_load_and_decide() {
    let dir = root().join("tests/fixtures/contract-0.1.0");
    check(
        "lag-aware-0.1.0",
        &dir.join("lag-aware.wasm"),
        &dir.join("lag-aware.fixtures.toml"),
        "0.1.0",
    );
    check(
        "zone-affinity-0.1.0",
        &dir.join("zone-affinity.wasm"),
        &root().join("policies/zone-affinity/fixtures.toml"),
        "0.1.0",
    );
}

#[test]
fn a_fixture_mismatch_is_reported() {
    // Run rw-split against lag-aware's fixtures: its reasons differ, so the
    // check must fail (guards against a runner that passes everything).
    let wasm = example("rw-split");
    let file = FixtureFile::load(&root().join("policies/lag-aware/fixtures.toml")).unwrap();
    let policy = LoadedPolicy::load(&std::fs::read(wasm).unwrap(), LoadSpec::new("rw")).unwrap();
    let results = fixtures::run(&policy, &file).unwrap();
    assert!(results.iter().any(|r| r.verdict.is_err()));
}
