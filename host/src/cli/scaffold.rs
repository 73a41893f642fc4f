//! `signalbox policy new NAME`: a policy crate that builds and tests as is.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the SDK sat when this binary was built (used when it still exists).
const BUILT_WITH_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-sdk");

pub fn new_policy(name: &str, parent: Option<&Path>, sdk: Option<&Path>) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid {
        bail!("policy name `{name}` must be lower-case letters, digits, `-` or `_`, starting with a letter");
    }
    let dir = parent.unwrap_or(Path::new(".")).join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let sdk_dep = match sdk.map(Path::to_path_buf).or_else(|| {
        Path::new(BUILT_WITH_SDK)
            .is_dir()
            .then(|| PathBuf::from(BUILT_WITH_SDK))
    }) {
        Some(p) => {
            let p = p
                .canonicalize()
                .with_context(|| format!("SDK path {}", p.display()))?;
            format!("{{ path = {:?} }}", p.display().to_string())
        }
        None => "\"0.1\"".to_owned(),
    };
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk_dep)),
        ("src/lib.rs", LIB_RS.to_owned()),
        ("fixtures.toml", FIXTURES.to_owned()),
        ("README.md", readme(name)),
        (".gitignore", "/target\n*.wasm\n".to_owned()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

fn cargo_toml(name: &str, sdk_dep: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
signalbox-policy = {sdk_dep}
serde = {{ version = "1", features = ["derive"] }}

[profile.release]
opt-level = "s"
lto = true

# A standalone crate, not part of an enclosing workspace.
[workspace]
"#
    )
}

const LIB_RS: &str = r#"//! A signalbox routing policy. Edit `route`, then:
//! `cargo test` (native), `signalbox policy build`, `signalbox policy test <file>.wasm --fixtures fixtures.toml`.

use serde::Deserialize;
use signalbox_policy::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Replicas lagging more than this many milliseconds get no reads.
    pub max_lag_ms: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self { max_lag_ms: 1000 }
    }
}

pub struct MyPolicy {
    settings: Settings,
}

impl Policy for MyPolicy {
    fn new(config: &Config) -> Result<Self, String> {
        Ok(Self { settings: config.parse()? })
    }

    fn route(&mut self, stmt: &Statement, _session: &Session, backends: &Backends) -> Decision {
        // The host never lets a write reach a replica; saying so keeps the reason clear.
        if !stmt.read_only {
            return Decision::primary().because("write");
        }
        if stmt.hint("route") == Some("primary") {
            return Decision::primary().because("hint");
        }
        let pick = backends
            .healthy_replicas()
            .max_lag_ms(self.settings.max_lag_ms)
            .least_outstanding();
        Decision::replica_or_primary(pick).because("read")
    }
}

signalbox_policy::export!(MyPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use signalbox_policy::testing;

    #[test]
    fn reads_go_to_a_replica() {
        let mut p = MyPolicy::new(&Config::default()).unwrap();
        let d = p.route(&Statement::read("SELECT 1"), &testing::session(), &testing::cluster());
        assert!(matches!(d.target, Target::Replica(_)));
    }

    #[test]
    fn fixtures() {
        testing::run_fixtures::<MyPolicy>(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures.toml"));
    }
}
"#;

const FIXTURES: &str = r#"[config]
max_lag_ms = 500

[[nodes]]
name = "primary"
role = "primary"

[[nodes]]
name = "replica-1"

[[nodes]]
name = "replica-2"

[[cases]]
name = "writes go to the primary"
sql = "INSERT INTO t VALUES (1)"
kind = "insert"
expect = "primary"

[[cases]]
name = "reads go to the least loaded fresh replica"
sql = "SELECT * FROM t"
nodes = { replica-1 = { in_flight = 4 } }
expect = "replica-2"

[[cases]]
name = "lagging replicas are skipped"
sql = "SELECT * FROM t"
nodes = { replica-1 = { lag_ms = 9000 }, replica-2 = { lag_ms = 9000 } }
expect = "primary"
"#;

fn readme(name: &str) -> String {
    format!(
        "# {name}\n\nA signalbox routing policy.\n\n```sh\ncargo test                       # native unit tests and fixtures\nsignalbox policy build           # → {file}.wasm\nsignalbox policy test {file}.wasm --fixtures fixtures.toml\nsignalbox policy check {file}.wasm\n```\n\nThen point `[policy] path` in signalbox.toml at `{file}.wasm` (or copy it over the\nconfigured file): signalbox validates and hot-swaps it without a restart.\n",
        file = name.replace('-', "_")
    )
}
