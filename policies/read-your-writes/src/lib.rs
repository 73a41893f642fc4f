//! `read-your-writes`: after a session (or its configured scope: user,
//! application, database) writes, its reads go only to replicas that have
//! replayed that write; if none has, to the primary. The host tracks the WAL
//! position of each scope's last commit and tells the policy, per replica,
//! whether it is past it.

use serde::Deserialize;
use signalbox_policy::prelude::*;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RywConfig {
    /// Only enforce for this long after the write (ms); none = always.
    pub window_ms: Option<u64>,
    /// Additionally bound lag for reads outside the window.
    pub max_lag_ms: Option<u32>,
    /// When no replica has replayed the write yet, wait up to this long
    /// (ms) for one to before using the primary; 0 = use the primary at once.
    pub wait_ms: u32,
}

pub struct ReadYourWrites(RywConfig);

impl Policy for ReadYourWrites {
    fn new(config: &Config) -> Result<Self, String> {
        Ok(Self(config.parse()?))
    }

    fn route(&mut self, stmt: &Statement, session: &Session, backends: &Backends) -> Decision {
        if !stmt.read_only {
            return Decision::primary().because("write");
        }
        let max_lag = self.0.max_lag_ms.unwrap_or(u32::MAX);
        let recent = match (session.ms_since_last_write, self.0.window_ms) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(ago), Some(window)) => ago <= window,
        };
        if !recent {
            let pick = backends
                .healthy_replicas()
                .max_lag_ms(max_lag)
                .least_outstanding();
            return Decision::replica_or_primary(pick).because("no recent write");
        }
        match backends
            .healthy_replicas()
            .replayed_last_write()
            .least_outstanding()
        {
            Some(b) => Decision::replica(b.id).because("caught up"),
            None if self.0.wait_ms > 0 => {
                Decision::caught_up_replica(self.0.wait_ms).because("waiting for replay")
            }
            None => Decision::primary().because("not replayed yet"),
        }
    }
}

signalbox_policy::export!(ReadYourWrites);

#[cfg(test)]
mod tests {
    use super::*;
    use signalbox_policy::testing;

    fn cluster() -> Backends {
        Backends::new(vec![
            Backend::primary(0, "p"),
            Backend::replica(1, "r1").behind_last_write(),
            Backend::replica(2, "r2").with_in_flight(3),
        ])
    }

    #[test]
    fn after_a_write_only_caught_up_replicas() {
        let mut p = ReadYourWrites::new(&Config::new("")).unwrap();
        let s = testing::session().with_last_write_ms_ago(5);
        let d = p.route(&Statement::read("SELECT 1"), &s, &cluster());
        assert_eq!(d.target, Target::Replica(2));
    }

    #[test]
    fn nobody_caught_up_means_primary() {
        let mut p = ReadYourWrites::new(&Config::new("")).unwrap();
        let b = Backends::new(vec![
            Backend::primary(0, "p"),
            Backend::replica(1, "r1").behind_last_write(),
        ]);
        let s = testing::session().with_last_write_ms_ago(5);
        let d = p.route(&Statement::read("SELECT 1"), &s, &b);
        assert_eq!(d, Decision::primary().because("not replayed yet"));
    }

    #[test]
    fn nobody_caught_up_can_wait_for_replay() {
        let mut p = ReadYourWrites::new(&Config::new(r#"{"wait_ms": 50}"#)).unwrap();
        let b = Backends::new(vec![
            Backend::primary(0, "p"),
            Backend::replica(1, "r1").behind_last_write(),
        ]);
        let s = testing::session().with_last_write_ms_ago(5);
        let d = p.route(&Statement::read("SELECT 1"), &s, &b);
        assert_eq!(d.target, Target::CaughtUpReplica(50));
    }

    #[test]
    fn outside_the_window_any_replica() {
        let mut p = ReadYourWrites::new(&Config::new(r#"{"window_ms": 2000}"#)).unwrap();
        let s = testing::session().with_last_write_ms_ago(2500);
        let d = p.route(&Statement::read("SELECT 1"), &s, &cluster());
        assert_eq!(d.target, Target::Replica(1));
    }

    #[test]
    fn fixtures() {
        testing::run_fixtures::<ReadYourWrites>(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures.toml"
        ));
    }
}
