//! `lag-aware`: reads go to the least-loaded healthy replica whose replay lag is
//! within a bound and that has replayed the session's own last write (when
//! read-your-writes or a `signalbox.min_lsn` token gives one); when every
//! replica lags, reads go to the primary rather than return stale data.

use serde::Deserialize;
use signalbox_policy::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LagAwareConfig {
    /// Maximum replay lag in milliseconds for a replica to serve reads.
    pub max_lag_ms: u32,
    /// Optional bound on WAL bytes not yet replayed.
    pub max_lag_bytes: Option<u64>,
}

impl Default for LagAwareConfig {
    fn default() -> Self {
        Self {
            max_lag_ms: 1000,
            max_lag_bytes: None,
        }
    }
}

pub struct LagAware(LagAwareConfig);

impl Policy for LagAware {
    fn new(config: &Config) -> Result<Self, String> {
        Ok(Self(config.parse()?))
    }

    fn route(&mut self, stmt: &Statement, _session: &Session, backends: &Backends) -> Decision {
        if !stmt.read_only {
            return Decision::primary().because("write");
        }
        let max_bytes = self.0.max_lag_bytes.unwrap_or(u64::MAX);
        let pick = backends
            .healthy_replicas()
            .max_lag_ms(self.0.max_lag_ms)
            .max_lag_bytes(max_bytes)
            .replayed_last_write()
            .least_outstanding();
        match pick {
            Some(b) => Decision::replica(b.id).because("fresh replica"),
            None => Decision::primary().because("replicas lagging"),
        }
    }
}

signalbox_policy::export!(LagAware);

#[cfg(test)]
mod tests {
    use super::*;
    use signalbox_policy::testing;

    #[test]
    fn skips_lagging_and_picks_least_loaded() {
        let mut p = LagAware::new(&Config::new(r#"{"max_lag_ms": 200}"#)).unwrap();
        let b = Backends::new(vec![
            Backend::primary(0, "p"),
            Backend::replica(1, "r1").with_lag_ms(900),
            Backend::replica(2, "r2").with_lag_ms(50).with_in_flight(4),
            Backend::replica(3, "r3").with_lag_ms(150).with_in_flight(1),
        ]);
        let d = p.route(&Statement::read("SELECT 1"), &testing::session(), &b);
        assert_eq!(d.target, Target::Replica(3));
    }

    #[test]
    fn all_lagging_reads_go_to_primary() {
        let mut p = LagAware::new(&Config::new(r#"{"max_lag_ms": 10}"#)).unwrap();
        let b = Backends::new(vec![
            Backend::primary(0, "p"),
            Backend::replica(1, "r1").with_lag_ms(11),
        ]);
        let d = p.route(&Statement::read("SELECT 1"), &testing::session(), &b);
        assert_eq!(d, Decision::primary().because("replicas lagging"));
    }

    #[test]
    fn unknown_lag_is_not_fresh() {
        let mut p = LagAware::new(&Config::new("")).unwrap();
        let mut r = Backend::replica(1, "r1");
        r.lag_ms = None;
        let b = Backends::new(vec![Backend::primary(0, "p"), r]);
        let d = p.route(&Statement::read("SELECT 1"), &testing::session(), &b);
        assert_eq!(d.target, Target::Primary);
    }

    #[test]
    fn fixtures() {
        testing::run_fixtures::<LagAware>(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures.toml"));
    }
}
