//! What the demo and the tests need from the machine, how to tell whether it
//! is there (by trying the thing itself, not by globbing for files), and how
//! to install it when it is not.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Which job the machine is being prepared for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Demo,
    Test,
}

/// Install what is missing, or only report it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Install,
    Check,
}

/// How a missing need is installed.
enum Fix {
    /// Debian packages.
    Apt(&'static [&'static str]),
    /// `rustup target add`.
    RustTarget(&'static str),
    /// `npm ci` in tests/drivers.
    NpmCi,
    /// A Python package from PyPI (Debian's package when pip refuses).
    Pip {
        requirement: &'static str,
        debian: &'static str,
    },
}

/// One thing a job needs.
struct Need {
    what: &'static str,
    why: &'static str,
    /// Needed by the demo as well as by the tests.
    demo: bool,
    present: fn(&Path) -> bool,
    fix: Fix,
}

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// In install order: the tools a later check or fix relies on come first.
const NEEDS: &[Need] = &[
    Need {
        what: "a C compiler and make",
        why:
            "libpg_query (the SQL classifier) and jemalloc (the allocator) are built from C sources",
        demo: true,
        present: |_| runs("cc", &["--version"]) && runs("make", &["--version"]),
        fix: Fix::Apt(&["gcc", "make"]),
    },
    Need {
        what: "libclang",
        why: "the SQL classifier's build (pg_query) generates its bindings with libclang",
        demo: true,
        present: |_| libclang_loads(),
        fix: Fix::Apt(&["libclang-dev"]),
    },
    Need {
        what: "the wasm32-unknown-unknown Rust target",
        why: "routing policies are compiled to WebAssembly",
        demo: true,
        present: |_| wasm_target_installed(),
        fix: Fix::RustTarget(WASM_TARGET),
    },
    Need {
        what: "PostgreSQL server binaries",
        why: "the demo and the tests start a real primary and streaming replicas",
        demo: true,
        present: |_| pg_server_bin().is_some(),
        fix: Fix::Apt(&["postgresql"]),
    },
    Need {
        what: "psql",
        why: "to talk to the demo, and the tests drive signalbox with it",
        demo: true,
        present: |_| runs("psql", &["--version"]),
        fix: Fix::Apt(&["postgresql-client"]),
    },
    Need {
        what: "pgbench",
        why: "the tests run pgbench through signalbox",
        demo: false,
        present: |_| runs("pgbench", &["--version"]),
        fix: Fix::Apt(&["postgresql-contrib"]),
    },
    Need {
        what: "curl",
        why: "the tests read the admin API with it",
        demo: false,
        present: |_| runs("curl", &["--version"]),
        fix: Fix::Apt(&["curl"]),
    },
    Need {
        what: "node and npm",
        why: "the driver tests run Sequelize on node-pg",
        demo: false,
        present: |_| runs("node", &["--version"]) && runs("npm", &["--version"]),
        fix: Fix::Apt(&["nodejs", "npm"]),
    },
    Need {
        what: "the node packages of tests/drivers",
        why: "Sequelize and node-pg for the driver tests",
        demo: false,
        present: node_modules_current,
        fix: Fix::NpmCi,
    },
    Need {
        what: "python3 with pip",
        why: "the driver tests run psycopg 3",
        demo: false,
        present: |_| runs("python3", &["-m", "pip", "--version"]),
        fix: Fix::Apt(&["python3", "python3-pip"]),
    },
    Need {
        what: "psycopg 3",
        why: "the driver tests run psycopg 3 against signalbox",
        demo: false,
        present: |_| runs("python3", &["-c", "import psycopg"]),
        fix: Fix::Pip {
            requirement: "psycopg[binary]>=3.1",
            debian: "python3-psycopg",
        },
    },
    Need {
        what: "prometheus_client (Python)",
        why: "a test parses /metrics with the Prometheus project's own text parser",
        demo: false,
        present: |_| runs("python3", &["-c", "import prometheus_client.parser"]),
        fix: Fix::Pip {
            requirement: "prometheus-client>=0.16",
            debian: "python3-prometheus-client",
        },
    },
    Need {
        what: "chromium",
        why: "a test loads the admin status page in headless Chromium",
        demo: false,
        present: |_| runs("chromium", &["--version"]),
        fix: Fix::Apt(&["chromium"]),
    },
];

/// Make sure everything `job` needs is there; returns how many needs were
/// missing (in `Check` mode nothing is installed).
pub fn ensure(job: Job, root: &Path, mode: Mode) -> Result<usize> {
    let mut apt = Apt::default();
    let mut missing = 0;
    for need in NEEDS.iter().filter(|n| job == Job::Test || n.demo) {
        if (need.present)(root) {
            continue;
        }
        missing += 1;
        if mode == Mode::Check {
            eprintln!("xtask: missing {} ({})", need.what, need.why);
            continue;
        }
        eprintln!("xtask: installing {}: {}", need.what, need.why);
        install(&need.fix, root, &mut apt).with_context(|| format!("installing {}", need.what))?;
        if !(need.present)(root) {
            bail!(
                "{} is still missing after installing it; install it by hand ({})",
                need.what,
                need.why
            );
        }
    }
    Ok(missing)
}

fn install(fix: &Fix, root: &Path, apt: &mut Apt) -> Result<()> {
    match fix {
        Fix::Apt(pkgs) => apt.install(pkgs),
        Fix::RustTarget(t) => run(Command::new("rustup").args(["target", "add", t])),
        Fix::NpmCi => run(Command::new("npm").args([
            "ci",
            "--prefix",
            &root.join("tests/drivers").to_string_lossy(),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])),
        Fix::Pip {
            requirement,
            debian,
        } => {
            let pip =
                run(Command::new("python3").args(["-m", "pip", "install", "-q", requirement]));
            match pip {
                Ok(()) => Ok(()),
                // A distribution's python may refuse pip installs (PEP 668).
                Err(e) => {
                    eprintln!("xtask: pip refused ({e:#}); trying Debian's {debian}");
                    apt.install(&[debian])
                }
            }
        }
    }
}

/// apt-get, updated at most once per run, through sudo when not root.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, pkgs: &[&str]) -> Result<()> {
        if !runs("apt-get", &["--version"]) {
            bail!(
                "apt-get is not available; install {} with this system's package manager",
                pkgs.join(" ")
            );
        }
        if !self.updated {
            run(privileged("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        run(privileged("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(pkgs))
    }
}

/// `program` as root: directly when we are root, else through `sudo`.
fn privileged(program: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// Run to completion; an error names the command and its exit status.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Whether `program args` runs and exits 0.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Load libclang exactly the way pg_query's bindgen will: through clang-sys's
/// own search (LIBCLANG_PATH, llvm-config, the usual directories), then
/// dlopen. A file that merely looks like libclang (libclang-cpp) fails here.
fn libclang_loads() -> bool {
    let loaded = clang_sys::load().is_ok();
    if loaded {
        let _ = clang_sys::unload();
    }
    loaded
}

/// The target's standard library is in the active toolchain's sysroot.
fn wasm_target_installed() -> bool {
    let Ok(out) = Command::new("rustc").args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let lib = sysroot.join("lib/rustlib").join(WASM_TARGET).join("lib");
    std::fs::read_dir(lib)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false)
}

/// A directory with PostgreSQL's server programs that actually run (the
/// same places signalbox's local cluster looks: SIGNALBOX_PG_BIN, then
/// /usr/lib/postgresql/*/bin).
fn pg_server_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = match std::env::var_os("SIGNALBOX_PG_BIN") {
        Some(d) => vec![PathBuf::from(d)],
        None => std::fs::read_dir("/usr/lib/postgresql")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path().join("bin"))
                    .collect()
            })
            .unwrap_or_default(),
    };
    dirs.retain(|d| {
        ["initdb", "pg_ctl", "pg_basebackup", "postgres"]
            .iter()
            .all(|p| runs(&d.join(p).to_string_lossy(), &["--version"]))
    });
    dirs.pop()
}

/// `npm ci` has run since package-lock.json last changed.
fn node_modules_current(root: &Path) -> bool {
    let drivers = root.join("tests/drivers");
    let modified = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (
        modified(drivers.join("node_modules/.package-lock.json")),
        modified(drivers.join("package-lock.json")),
    ) {
        (Some(installed), Some(lock)) => installed >= lock,
        _ => false,
    }
}
