//! `canary`: send a configured percentage of reads to one named replica (a new
//! PostgreSQL version, a different instance size, new indexes) and the rest to
//! the other replicas, least loaded first.

use serde::Deserialize;
use signalbox_policy::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// Node name of the canary replica.
    pub replica: String,
    /// Share of reads for the canary, 0–100.
    pub percent: u32,
}

pub struct Canary(CanaryConfig);

impl Policy for Canary {
    fn new(config: &Config) -> Result<Self, String> {
        let config: CanaryConfig = config.parse()?;
        if config.percent > 100 {
            return Err(format!("percent must be 0-100, got {}", config.percent));
        }
        Ok(Self(config))
    }

    fn route(&mut self, stmt: &Statement, _session: &Session, backends: &Backends) -> Decision {
        if !stmt.read_only {
            return Decision::primary().because("write");
        }
        let canary = backends
            .healthy_replicas()
            .find(|b| b.name() == self.0.replica);
        if let Some(c) = canary {
            if host::random() % 100 < u64::from(self.0.percent) {
                return Decision::replica(c.id).because("canary");
            }
        }
        let rest = backends
            .healthy_replicas()
            .filter(|b| b.name() != self.0.replica)
            .least_outstanding();
        match (rest, canary) {
            (Some(b), _) => Decision::replica(b.id).because("stable"),
            // Only the canary is left: better it than loading the primary.
            (None, Some(c)) => Decision::replica(c.id).because("canary only"),
            (None, None) => Decision::primary().because("no replica"),
        }
    }
}

signalbox_policy::export!(Canary);

#[cfg(test)]
mod tests {
    use super::*;
    use signalbox_policy::testing;

    #[test]
    fn share_matches_percent() {
        testing::reset();
        testing::seed_random(7);
        let cfg = r#"{"replica": "replica-2", "percent": 10}"#;
        let mut p = Canary::new(&Config::new(cfg)).unwrap();
        let b = testing::cluster();
        let stmt = Statement::read("SELECT 1");
        let hits = (0..10_000)
            .filter(|_| p.route(&stmt, &testing::session(), &b).target == Target::Replica(2))
            .count();
        assert!((800..1200).contains(&hits), "canary got {hits} of 10000");
    }

    #[test]
    fn percent_over_100_is_rejected() {
        let cfg = r#"{"replica": "replica-2", "percent": 150}"#;
        assert!(Canary::new(&Config::new(cfg)).is_err());
        assert!(Canary::new(&Config::new("{}")).is_err());
    }

    #[test]
    fn fixtures() {
        testing::run_fixtures::<Canary>(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures.toml"));
    }
}
