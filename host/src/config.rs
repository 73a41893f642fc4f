//! Configuration (TOML, strict: unknown keys are errors).
//!
//! This module holds the `[policy]` section; errors name the file, the key
//! and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{Fallback, Limits, PolicySettings, RollbackSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `[policy]`: which policy runs and how it is sandboxed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The `.wasm` file (relative paths are relative to the config file).
    pub path: PathBuf,
    /// Name used in logs and metrics; defaults to the file stem.
    pub name: Option<String>,
    /// The policy's own settings, passed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    #[serde(default)]
    pub fallback: Fallback,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rollback: RollbackConfig,
    #[serde(default)]
    pub watch: WatchConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time budget per call, milliseconds (fractions allowed).
    pub deadline_ms: f64,
    pub memory_mb: u32,
    pub max_idle_instances: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = Limits::default();
        Self {
            deadline_ms: d.deadline.as_secs_f64() * 1000.0,
            memory_mb: (d.memory_bytes >> 20) as u32,
            max_idle_instances: d.max_idle_instances,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RollbackConfig {
    pub window_s: u64,
    pub max_error_rate: f64,
    pub min_calls: u64,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        let d = RollbackSettings::default();
        Self {
            window_s: d.window.as_secs(),
            max_error_rate: d.max_error_rate,
            min_calls: d.min_calls,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    pub enabled: bool,
    pub debounce_ms: u64,
    /// 0 disables polling.
    pub poll_ms: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            debounce_ms: 100,
            poll_ms: 2000,
        }
    }
}

impl PolicyConfig {
    /// Parse a `[policy]` table from TOML text (errors carry line and key).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wrapper {
            policy: PolicyConfig,
        }
        let w: Wrapper = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        w.policy.check(origin)?;
        Ok(w.policy)
    }

    fn check(&self, origin: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| ConfigError::Invalid {
            path: origin.to_owned(),
            message: format!("policy.{key}: {why}"),
        };
        if !(self.limits.deadline_ms > 0.0 && self.limits.deadline_ms <= 1000.0) {
            return Err(bad("limits.deadline_ms", "must be in (0, 1000]"));
        }
        let max_mb = crate::policy::engine::MAX_MEMORY_CAP >> 20;
        if self.limits.memory_mb == 0 || self.limits.memory_mb as usize > max_mb {
            return Err(bad("limits.memory_mb", &format!("must be 1 to {max_mb}")));
        }
        if !(0.0..=1.0).contains(&self.rollback.max_error_rate) {
            return Err(bad("rollback.max_error_rate", "must be between 0 and 1"));
        }
        Ok(())
    }

    /// Runtime settings; `base` is the directory relative paths start from.
    pub fn settings(&self, base: &Path) -> PolicySettings {
        let path = if self.path.is_absolute() {
            self.path.clone()
        } else {
            base.join(&self.path)
        };
        let mut s = PolicySettings::new(path);
        if let Some(name) = &self.name {
            s.name = name.clone();
        }
        s.config_json = serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into());
        s.fallback = self.fallback;
        s.limits = Limits {
            deadline: Duration::from_secs_f64(self.limits.deadline_ms / 1000.0),
            memory_bytes: (self.limits.memory_mb as usize) << 20,
            max_idle_instances: self.limits.max_idle_instances.max(1),
        };
        s.rollback = RollbackSettings {
            window: Duration::from_secs(self.rollback.window_s),
            max_error_rate: self.rollback.max_error_rate,
            min_calls: self.rollback.min_calls,
        };
        s.debounce = Duration::from_millis(self.watch.debounce_ms);
        s.poll = (self.watch.poll_ms > 0).then(|| Duration::from_millis(self.watch.poll_ms));
        s
    }
}

/// Serialize a `Duration` as integer milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_maps() {
        let text = r#"
            [policy]
            path = "p/rw.wasm"
            fallback = "primary"
            [policy.config]
            max_lag_ms = 200
            [policy.limits]
            deadline_ms = 0.5
            memory_mb = 8
        "#;
        let c = PolicyConfig::from_toml(text, Path::new("x.toml")).unwrap();
        let s = c.settings(Path::new("/etc/sb"));
        assert_eq!(s.path, PathBuf::from("/etc/sb/p/rw.wasm"));
        assert_eq!(s.name, "rw");
        assert_eq!(s.config_json, r#"{"max_lag_ms":200}"#);
        assert_eq!(s.fallback, Fallback::Primary);
        assert_eq!(s.limits.deadline, Duration::from_micros(500));
        assert_eq!(s.limits.memory_bytes, 8 << 20);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = PolicyConfig::from_toml(
            "[policy]\npath = \"a.wasm\"\n[policy.limits]\ndeadline = 3\n",
            Path::new("sb.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sb.toml") && e.contains("deadline") && e.contains("line 4"),
            "{e}"
        );
        let e = PolicyConfig::from_toml(
            "[policy]\npath = \"a.wasm\"\n[policy.limits]\nmemory_mb = 0\n",
            Path::new("sb.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("policy.limits.memory_mb"), "{e}");
    }
}
