//! The `signalbox policy` commands, run as a user would: scaffold a policy,
//! test it natively, build it, check it, test the `.wasm`, benchmark it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn signalbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_signalbox"))
        .args(args)
        .output()
        .expect("run signalbox")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Shared target dir for the crates these tests build (keeps reruns fast).
fn target_dir() -> PathBuf {
    root().join("target").join("cli-test-builds")
}

fn build(dir: &Path, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_signalbox"))
        .args(["policy", "build"])
        .arg(dir)
        .arg("--out")
        .arg(out)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("run signalbox policy build");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("built"), "{}", text(&o));
}

#[test]
fn scaffold_test_build_check_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let o = signalbox(&[
        "policy",
        "new",
        "my-router",
        "--dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let crate_dir = tmp.path().join("my-router");
    for f in ["Cargo.toml", "src/lib.rs", "fixtures.toml", "README.md"] {
        assert!(crate_dir.join(f).is_file(), "missing {f}");
    }
    // Native tests of the scaffold pass out of the box.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Command::new(cargo)
        .arg("test")
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", text(&t));
    assert!(
        text(&t).contains("test result: ok. 2 passed"),
        "{}",
        text(&t)
    );

    let wasm = tmp.path().join("my_router.wasm");
    build(&crate_dir, &wasm);

    let c = signalbox(&["policy", "check", wasm.to_str().unwrap()]);
    let out = text(&c);
    assert!(c.status.success(), "{out}");
    assert!(out.contains("signalbox:policy@0.2.0 (supported)"), "{out}");
    assert!(out.contains("exports:     init, route"), "{out}");
    assert!(out.contains("signalbox:policy/host@0.2.0"), "{out}");
    assert!(!out.contains("wasi"), "{out}");
    // Piped into a reader that is already gone, the report ends quietly
    // (no panic on EPIPE).
    let piped = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} policy check {} | true",
            env!("CARGO_BIN_EXE_signalbox"),
            wasm.display()
        ))
        .output()
        .unwrap();
    assert!(!text(&piped).contains("panicked"), "{}", text(&piped));

    let fixtures = crate_dir.join("fixtures.toml");
    let r = signalbox(&[
        "policy",
        "test",
        wasm.to_str().unwrap(),
        "--fixtures",
        fixtures.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(text(&r).contains("3 passed, 0 failed"), "{}", text(&r));
    assert!(text(&r).contains(" instr,"), "{}", text(&r));

    // Break an expectation: the command must fail and say which case.
    let broken = std::fs::read_to_string(&fixtures)
        .unwrap()
        .replace("expect = \"replica-2\"", "expect = \"replica-1\"");
    std::fs::write(&fixtures, broken).unwrap();
    let r = signalbox(&[
        "policy",
        "test",
        wasm.to_str().unwrap(),
        "--fixtures",
        fixtures.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(
        text(&r).contains("FAIL reads go to the least loaded"),
        "{}",
        text(&r)
    );
    assert!(text(&r).contains("2 passed, 1 failed"), "{}", text(&r));
}

#[test]
fn sql_mode_bench_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = tmp.path().join("rw.wasm");
    build(&root().join("policies/rw-split"), &wasm);
    let w = wasm.to_str().unwrap();

    let r = signalbox(&[
        "policy",
        "test",
        w,
        "--sql",
        "SELECT * FROM users WHERE id = 1",
    ]);
    let out = text(&r);
    assert!(r.status.success(), "{out}");
    assert!(out.contains("decision:    replica replica-1"), "{out}");
    assert!(out.contains("reason:      read"), "{out}");
    assert!(out.contains("instructions: "), "{out}");

    let r = signalbox(&[
        "policy",
        "test",
        w,
        "--sql",
        "/* signalbox: route=primary */ SELECT 1",
    ]);
    assert!(text(&r).contains("reason:      hint"), "{}", text(&r));

    // A write the policy would send anywhere still lands on the primary.
    let r = signalbox(&["policy", "test", w, "--sql", "UPDATE t SET a = 1"]);
    assert!(
        text(&r).contains("after guardrails: Node(0)"),
        "{}",
        text(&r)
    );

    let b = signalbox(&["policy", "bench", w, "--iterations", "2000"]);
    let out = text(&b);
    assert!(b.status.success(), "{out}");
    assert!(out.contains("(0 failed)") && out.contains("p99:"), "{out}");

    let junk = tmp.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").unwrap();
    let c = signalbox(&["policy", "check", junk.to_str().unwrap()]);
    assert!(!c.status.success());
    assert!(text(&c).contains("not a WebAssembly file"), "{}", text(&c));

    let n = signalbox(&["policy", "new", "Bad Name"]);
    assert!(!n.status.success());
    assert!(text(&n).contains("must be lower-case"), "{}", text(&n));
}
