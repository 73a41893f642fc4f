//! `signalbox policy ...`: check, test, bench, build and scaffold policies.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use signalbox_policy::fixture::FixtureFile;

use crate::policy::engine::EngineKind;
use crate::policy::instance::Determinism;
use crate::policy::{abi, build, fixtures, LoadSpec, LoadedPolicy};
use crate::route::{ClusterView, RouteInput, Session, Statement, StatementKind};
use crate::sql::hints;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Show a policy's contract version, imports, exports and size, and check it loads.
    Check {
        file: PathBuf,
        /// Policy config (JSON) to run `init` with.
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Run a policy on fixture cases, or on one statement, and show the decisions.
    Test(TestArgs),
    /// Measure the cost of one routing call.
    Bench {
        file: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        iterations: u32,
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Build a policy crate to a ready-to-load component.
    Build {
        /// The policy crate (default: current directory).
        dir: Option<PathBuf>,
        /// Output file (default: `<dir>/<crate>.wasm`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Cargo features to enable (comma-separated).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
    },
    /// Create a new policy crate that builds and tests out of the box.
    New {
        name: String,
        /// Parent directory (default: current directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path to the signalbox-policy SDK (default: the one this binary was built with, if present).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct TestArgs {
    file: PathBuf,
    /// Fixture file (nodes + cases with expected decisions).
    #[arg(long, conflicts_with = "sql")]
    fixtures: Option<PathBuf>,
    /// One statement to route.
    #[arg(long)]
    sql: Option<String>,
    /// Statement kind (default: from the first keyword).
    #[arg(long, value_parser = parse_kind)]
    kind: Option<StatementKind>,
    /// Treat the statement as read-only (default: true for select/show/explain).
    #[arg(long)]
    read_only: Option<bool>,
    /// Cluster to route against: a fixture file's `[[nodes]]` (default: primary, replica-1, replica-2).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Policy config (JSON); default: the fixture file's `[config]`, else `{}`.
    #[arg(long)]
    config: Option<String>,
    #[arg(long, default_value = "app")]
    user: String,
    #[arg(long, default_value = "")]
    application_name: String,
    /// Session attribute `key=value` (repeatable).
    #[arg(long = "attr", value_parser = parse_pair)]
    attributes: Vec<(String, String)>,
    /// Milliseconds since the session last wrote.
    #[arg(long)]
    last_write_ms: Option<u64>,
}

fn parse_kind(s: &str) -> Result<StatementKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("unknown statement kind `{s}`"))
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got `{s}`"))
}

pub fn run(cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { file, config } => check(&file, &config),
        PolicyCommand::Test(args) => test(args),
        PolicyCommand::Bench {
            file,
            iterations,
            config,
        } => bench(&file, iterations, &config),
        PolicyCommand::Build { dir, out, features } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            let opts = build::BuildOptions {
                out,
                features,
                ..Default::default()
            };
            let built = build::build_policy(&dir, &opts)?;
            println!(
                "built {} → {} ({} bytes)",
                built.crate_name,
                built.path.display(),
                built.size
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::New { name, dir, sdk } => {
            let created = super::scaffold::new_policy(&name, dir.as_deref(), sdk.as_deref())?;
            println!("created {}", created.display());
            println!(
                "next: cd {} && cargo test && signalbox policy build",
                created.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

fn load(file: &Path, config: &str, engine: EngineKind) -> Result<LoadedPolicy> {
    let bytes = read(file)?;
    let mut spec = LoadSpec::new(
        &file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    spec.config_json = config.to_owned();
    spec.path = Some(file.to_owned());
    spec.engine = engine;
    LoadedPolicy::load(&bytes, spec).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn check(file: &Path, config: &str) -> Result<ExitCode> {
    let bytes = read(file)?;
    let version =
        abi::read_version(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let supported = abi::check_version(version);
    let component = abi::to_component(&bytes)?;
    println!("file:        {}", file.display());
    println!(
        "format:      {}",
        if abi::is_core_module(&bytes) {
            "core module (encoded to a component at load)"
        } else {
            "component"
        }
    );
    println!("size:        {} bytes", bytes.len());
    println!(
        "contract:    signalbox:policy@{version} ({})",
        if supported.is_ok() {
            "supported"
        } else {
            "NOT supported"
        }
    );
    let (imports, exports) = interface(&component)?;
    println!("imports:     {}", imports.join(", "));
    println!("exports:     {}", exports.join(", "));
    if let Err(e) = supported {
        println!("load:        FAILED: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let started = Instant::now();
    match load(file, config, EngineKind::Service) {
        Ok(p) => {
            println!(
                "load:        ok (compile + init in {:.1} ms), sha256 {}",
                started.elapsed().as_secs_f64() * 1000.0,
                p.info.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("load:        FAILED: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Top-level import and export names of a component.
fn interface(component: &[u8]) -> Result<(Vec<String>, Vec<String>)> {
    use wasmparser::{Parser, Payload};
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(component) {
        match payload? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(s) if depth == 0 => {
                for i in s {
                    imports.push(i?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(s) if depth == 0 => {
                for e in s {
                    exports.push(e?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

fn default_cluster() -> FixtureFile {
    FixtureFile::parse(
        "[[nodes]]\nname = \"primary\"\nrole = \"primary\"\n[[nodes]]\nname = \"replica-1\"\n[[nodes]]\nname = \"replica-2\"\n",
    )
    .unwrap_or_default()
}

fn test(args: TestArgs) -> Result<ExitCode> {
    if let Some(path) = &args.fixtures {
        let file = FixtureFile::load(path)?;
        let config = args.config.clone().unwrap_or_else(|| file.config_json());
        let policy = load(&args.file, &config, EngineKind::Metered)?;
        let results = fixtures::run(&policy, &file).map_err(anyhow::Error::msg)?;
        let mut failed = 0;
        for r in &results {
            let shown = match &r.decision {
                Ok(d) => format!(
                    "{}{}",
                    file.describe(&d.target),
                    d.reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                Err(f) => format!("FAILURE: {f}"),
            };
            let mark = if r.verdict.is_ok() { "ok  " } else { "FAIL" };
            failed += usize::from(r.verdict.is_err());
            println!(
                "{mark} {:<50} → {shown}  [{} instr, {:.1} µs]",
                r.name,
                r.fuel.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
                r.elapsed.as_secs_f64() * 1e6
            );
            if let Err(why) = &r.verdict {
                println!("     {why}");
            }
        }
        println!("{} passed, {} failed", results.len() - failed, failed);
        return Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let Some(sql) = &args.sql else {
        bail!("give --fixtures FILE or --sql \"STATEMENT\"");
    };
    let cluster_file = match &args.cluster {
        Some(p) => FixtureFile::load(p)?,
        None => default_cluster(),
    };
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| cluster_file.config_json());
    let policy = load(&args.file, &config, EngineKind::Metered)?;
    let input = sql_input(&args, sql, &cluster_file);
    let mut inst = policy
        .fresh(Determinism::default())
        .map_err(anyhow::Error::msg)?;
    inst.state_mut().captured_logs = Some(Vec::new());
    let started = Instant::now();
    let decision = inst.route(&input);
    let elapsed = started.elapsed();
    println!(
        "statement:   {} ({}, {})",
        input.statement.sql,
        input.statement.kind.as_str(),
        if input.statement.read_only {
            "read-only"
        } else {
            "not read-only"
        }
    );
    match decision {
        Ok(d) => {
            println!("decision:    {}", cluster_file.describe(&d.target));
            println!("reason:      {}", d.reason.as_deref().unwrap_or("-"));
            let enforced = crate::route::guardrails::enforce(
                &d.target,
                &input.statement,
                &input.session,
                &input.cluster,
                0,
            );
            println!(
                "after guardrails: {:?}{}",
                enforced.routed,
                enforced
                    .overridden
                    .map(|o| format!(" (override: {})", o.as_str()))
                    .unwrap_or_default()
            );
        }
        Err(f) => println!("decision:    FAILED: {f} (the host would use the fallback)"),
    }
    println!(
        "instructions: {}",
        inst.last_fuel
            .map(|f| f.to_string())
            .unwrap_or_else(|| "?".into())
    );
    println!(
        "time:        {:.1} µs (metered engine; see `policy bench` for real cost)",
        elapsed.as_secs_f64() * 1e6
    );
    for (level, line) in inst.state_mut().captured_logs.take().unwrap_or_default() {
        println!("log[{level}]: {line}");
    }
    Ok(ExitCode::SUCCESS)
}

fn sql_input(args: &TestArgs, sql: &str, cluster_file: &FixtureFile) -> RouteInput {
    let kind = args.kind.unwrap_or_else(|| guess_kind(sql));
    let read_only = args.read_only.unwrap_or(matches!(
        kind,
        StatementKind::Select | StatementKind::Show | StatementKind::Explain
    ));
    let mut statement = Statement::new(kind, read_only, sql);
    statement.hints = hints::parse(sql).into();
    let session = Session {
        id: 1,
        user: args.user.clone(),
        database: "app".into(),
        application_name: args.application_name.clone(),
        client_addr: "127.0.0.1".into(),
        attributes: args.attributes.clone(),
        ms_since_last_write: args.last_write_ms,
        last_write_lsn: args.last_write_ms.map(|_| 1),
        ..Session::default()
    };
    let cluster: ClusterView = fixtures::cluster_for(cluster_file, None);
    RouteInput {
        statement: Arc::new(statement),
        session: Arc::new(session),
        cluster: Arc::new(cluster),
    }
}

/// The statement kind from the first keyword — a convenience for trying a
/// policy by hand; the router itself classifies with the PostgreSQL grammar.
fn guess_kind(sql: &str) -> StatementKind {
    let body = hints::strip_leading_comments(sql);
    let word = body
        .split(|c: char| !c.is_ascii_alphabetic())
        .find(|w| !w.is_empty())
        .unwrap_or("")
        .to_ascii_lowercase();
    match word.as_str() {
        "select" | "values" | "table" | "with" => StatementKind::Select,
        "insert" => StatementKind::Insert,
        "update" => StatementKind::Update,
        "delete" => StatementKind::Delete,
        "merge" => StatementKind::Merge,
        "create" | "alter" | "drop" | "truncate" | "comment" | "grant" | "revoke" => {
            StatementKind::Ddl
        }
        "begin" | "start" | "commit" | "rollback" | "savepoint" | "release" | "end" => {
            StatementKind::Transaction
        }
        "set" | "reset" | "discard" => StatementKind::Session,
        "copy" => StatementKind::Copy,
        "call" => StatementKind::Call,
        "explain" => StatementKind::Explain,
        "show" => StatementKind::Show,
        _ => StatementKind::Utility,
    }
}

fn bench(file: &Path, iterations: u32, config: &str) -> Result<ExitCode> {
    let policy = load(file, config, EngineKind::Service)?;
    let input = fixtures::realistic_input();
    // Warm up (instance creation, caches).
    for _ in 0..1000 {
        let _ = policy.call(&input);
    }
    let mut samples = Vec::with_capacity(iterations as usize);
    let mut failures = 0u32;
    let total = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        failures += u32::from(policy.call(&input).is_err());
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let total = total.elapsed();
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    println!("policy:     {}", file.display());
    println!("input:      8 backends with 2 tags each, a 200-character SELECT");
    println!("calls:      {iterations} ({failures} failed)");
    println!(
        "mean:       {} ns",
        total.as_nanos() / u128::from(iterations.max(1))
    );
    println!("p50:        {} ns", pct(0.50));
    println!("p99:        {} ns", pct(0.99));
    println!("max:        {} ns", pct(1.0));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_kinds_past_comments() {
        assert_eq!(
            guess_kind("/* signalbox: route=primary */ select 1"),
            StatementKind::Select
        );
        assert_eq!(
            guess_kind("  INSERT INTO t VALUES (1)"),
            StatementKind::Insert
        );
        assert_eq!(guess_kind("-- hi\nDROP TABLE t"), StatementKind::Ddl);
        assert_eq!(guess_kind("vacuum"), StatementKind::Utility);
    }
}
