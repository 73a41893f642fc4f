//! `cargo xtask`: the README's two commands.
//!
//! - `cargo xtask demo` — a throwaway primary + two replicas with signalbox in
//!   front of them;
//! - `cargo xtask test` — every test of the workspace (`cargo test --workspace`);
//! - `cargo xtask setup [--check]` — only the set-up both of them start with.
//!
//! Each first makes sure the machine has what that job needs (libclang for
//! the SQL classifier's build, the wasm target for policies, PostgreSQL's
//! binaries, and for the tests the driver packages), installs what is missing
//! with a one-line note saying why, then runs cargo. People who already have
//! everything can keep running `cargo test --workspace` directly.

mod needs;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use needs::{Job, Mode};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "signalbox's demo and test entry points")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, then run `signalbox demo` (release build).
    Demo {
        /// Passed to `signalbox demo` (e.g. `--port 6433`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what is missing, then run `cargo test --workspace`.
    Test {
        /// Passed to `cargo test` (e.g. `-- --test-threads 1`, a test name).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what the tests and the demo need, and nothing else.
    Setup {
        /// Only report what is missing; exit 1 if anything is.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match cli.command {
        Cmd::Demo { args } => {
            needs::ensure(Job::Demo, &root, Mode::Install)?;
            let mut cmd = cargo();
            cmd.args(["run", "--release", "--package", "signalbox", "--", "demo"]);
            cmd.args(args);
            exec(cmd)
        }
        Cmd::Test { args } => {
            needs::ensure(Job::Test, &root, Mode::Install)?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace"]);
            cmd.args(args);
            exec(cmd)
        }
        Cmd::Setup { check } => {
            let mode = if check { Mode::Check } else { Mode::Install };
            let missing = needs::ensure(Job::Test, &root, mode)?;
            // Installing what was missing is success; only --check reports it.
            Ok(if missing == 0 || mode == Mode::Install {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The workspace root: this crate's parent directory.
fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The cargo that started us (so a toolchain override keeps applying).
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Run `cmd` to completion and exit with its status.
fn exec(mut cmd: Command) -> Result<ExitCode> {
    let status = cmd.status().context("cannot run cargo")?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
