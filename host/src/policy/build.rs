//! `signalbox policy build`: compile a policy crate for `wasm32-unknown-unknown`,
//! encode it as a component, stamp the contract version on it and check that
//! it loads — so policy authors need no tool besides cargo and signalbox.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::abi;
use super::loaded::{LoadSpec, LoadedPolicy};

pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run cargo: {0}")]
    Spawn(std::io::Error),
    #[error("cargo build failed for {manifest} (exit {status}); is the wasm target installed? `rustup target add {WASM_TARGET}`")]
    Cargo { manifest: PathBuf, status: String },
    #[error("cargo produced no .wasm for {0}: is the crate's `crate-type` [\"cdylib\"]?")]
    NoArtifact(PathBuf),
    #[error("{0}")]
    Abi(#[from] abi::AbiError),
    #[error("the built policy does not load: {0}")]
    Check(super::loaded::LoadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the built component was written, and what it is.
#[derive(Debug)]
pub struct Built {
    pub crate_name: String,
    pub path: PathBuf,
    pub size: usize,
}

/// Options of [`build_policy`].
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Output file (default `<dir>/<crate>.wasm`).
    pub out: Option<PathBuf>,
    /// Cargo target directory (default: cargo's choice).
    pub target_dir: Option<PathBuf>,
    /// Cargo features to enable.
    pub features: Vec<String>,
    /// Capture cargo's diagnostics (printed only on failure).
    pub quiet: bool,
}

/// Build the policy crate in `dir` and write the component.
pub fn build_policy(dir: &Path, opts: &BuildOptions) -> Result<Built, BuildError> {
    let (out, target_dir, quiet) = (opts.out.as_deref(), opts.target_dir.as_deref(), opts.quiet);
    let manifest = dir.join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--target")
        .arg(WASM_TARGET)
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(if quiet {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
    if let Some(t) = target_dir {
        cmd.arg("--target-dir").arg(t);
    }
    if !opts.features.is_empty() {
        cmd.arg("--features").arg(opts.features.join(","));
    }
    // Flags meant for the outer (native) build must not leak into the wasm one.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().map_err(BuildError::Spawn)?;
    if !output.status.success() {
        if quiet {
            eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        }
        return Err(BuildError::Cargo {
            manifest,
            status: output.status.to_string(),
        });
    }
    let (crate_name, wasm) = find_artifact(&output.stdout, &manifest)
        .ok_or_else(|| BuildError::NoArtifact(manifest.clone()))?;
    let module = std::fs::read(&wasm).map_err(|source| BuildError::Io {
        path: wasm.clone(),
        source,
    })?;
    let mut component = abi::to_component(&module)?;
    let version = abi::read_version(&module)?;
    abi::check_version(version)?;
    abi::stamp_version(&mut component, &version.to_string());
    match LoadedPolicy::load(&component, LoadSpec::new(&crate_name)) {
        Ok(_) => {}
        // `init` may legitimately refuse an empty config (a required key);
        // every stage before it must pass.
        Err(e) if e.stage == super::loaded::Stage::Init => {}
        Err(e) => return Err(BuildError::Check(e)),
    }
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join(format!("{}.wasm", crate_name.replace('-', "_"))));
    std::fs::write(&path, &component).map_err(|source| BuildError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(Built {
        crate_name,
        size: component.len(),
        path,
    })
}

/// The cdylib `.wasm` cargo built for `manifest`, from its JSON messages.
fn find_artifact(stdout: &[u8], manifest: &Path) -> Option<(String, PathBuf)> {
    let manifest = manifest.canonicalize().ok()?;
    let mut found = None;
    for line in stdout.lines().map_while(Result::ok) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let same = msg["manifest_path"]
            .as_str()
            .and_then(|p| Path::new(p).canonicalize().ok())
            .is_some_and(|p| p == manifest);
        if !same {
            continue;
        }
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or("policy")
            .to_owned();
        if let Some(files) = msg["filenames"].as_array() {
            for f in files.iter().filter_map(|f| f.as_str()) {
                if f.ends_with(".wasm") {
                    found = Some((name.clone(), PathBuf::from(f)));
                }
            }
        }
    }
    found
}
