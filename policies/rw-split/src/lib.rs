//! `rw-split`: the read/write split Sequelize's `replication: { read, write }`
//! gives you, moved out of the application. Writes (anything not proven
//! read-only) go to the primary; reads keep each client session on one
//! replica (`spread = "session"`, the default: a session's reads never go
//! back in time between replicas that lag differently, and its server
//! connections stay warm) or rotate round-robin per statement
//! (`spread = "statement"`, Sequelize's own way).
//!
//! Unlike the ORM, it skips replicas that are down, and a statement carrying
//! `/* signalbox: route=primary */` is sent to the primary.

use serde::Deserialize;
use signalbox_policy::prelude::*;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RwSplitConfig {
    /// Restrict reads to these replicas (by node name), like Sequelize's
    /// `replication.read` list. Empty means every replica.
    pub read: Vec<String>,
    /// Also rotate reads over the primary (Sequelize does so when the write
    /// host is listed under `read` too).
    pub primary_reads: bool,
    /// How reads spread over the replicas.
    pub spread: Spread,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// Round-robin per statement, as Sequelize does.
    Statement,
    /// One replica per client session while it stays healthy.
    #[default]
    Session,
}

pub struct RwSplit {
    config: RwSplitConfig,
    next: usize,
}

impl Policy for RwSplit {
    fn new(config: &Config) -> Result<Self, String> {
        Ok(Self {
            config: config.parse()?,
            next: 0,
        })
    }

    fn route(&mut self, stmt: &Statement, session: &Session, backends: &Backends) -> Decision {
        if !stmt.read_only {
            return Decision::primary().because("write");
        }
        if stmt.hint("route") == Some("primary") {
            return Decision::primary().because("hint");
        }
        let readable = |b: &&Backend| {
            b.healthy
                && match b.role {
                    Role::Replica => {
                        self.config.read.is_empty()
                            || self.config.read.iter().any(|n| n == b.name())
                    }
                    Role::Primary => self.config.primary_reads,
                    Role::Unknown => false,
                }
        };
        let pool = || backends.iter().filter(readable);
        let pick = match self.config.spread {
            // `sticky` skips nodes of weight 0; with only those, the first readable one.
            Spread::Session => pool().sticky(session).or_else(|| pool().next()),
            Spread::Statement => {
                let count = pool().count();
                let pick = pool().nth(self.next % count.max(1));
                if pick.is_some() {
                    self.next = self.next.wrapping_add(1);
                }
                pick
            }
        };
        let Some(pick) = pick else {
            return Decision::primary().because("no replica");
        };
        match pick.role {
            Role::Primary => Decision::primary().because("read"),
            _ => Decision::replica(pick.id).because("read"),
        }
    }
}

signalbox_policy::export!(RwSplit);

#[cfg(test)]
mod tests {
    use super::*;
    use signalbox_policy::testing;

    fn policy(config: &str) -> RwSplit {
        RwSplit::new(&Config::new(config)).unwrap()
    }

    #[test]
    fn writes_go_to_primary() {
        let mut p = policy("");
        let stmt = Statement::write(StatementKind::Insert, "INSERT INTO t VALUES (1)");
        let d = p.route(&stmt, &testing::session(), &testing::cluster());
        assert_eq!(d.target, Target::Primary);
    }

    #[test]
    fn reads_rotate_over_healthy_replicas() {
        let mut p = policy(r#"{"spread": "statement"}"#);
        let stmt = Statement::read("SELECT 1");
        let b = testing::cluster();
        let seq: Vec<Target> = (0..4)
            .map(|_| p.route(&stmt, &testing::session(), &b).target)
            .collect();
        assert_eq!(
            seq,
            vec![
                Target::Replica(1),
                Target::Replica(2),
                Target::Replica(1),
                Target::Replica(2)
            ]
        );
        let down = Backends::new(vec![
            Backend::primary(0, "primary"),
            Backend::replica(1, "replica-1").unhealthy(),
            Backend::replica(2, "replica-2"),
        ]);
        for _ in 0..3 {
            assert_eq!(
                p.route(&stmt, &testing::session(), &down).target,
                Target::Replica(2)
            );
        }
    }

    #[test]
    fn session_spread_keeps_each_session_on_one_replica() {
        let mut p = policy("");
        let stmt = Statement::read("SELECT 1");
        let b = testing::cluster();
        let mut used = std::collections::HashSet::new();
        for id in 0..50 {
            let s = Session::new(id);
            let first = p.route(&stmt, &s, &b).target;
            for _ in 0..5 {
                assert_eq!(p.route(&stmt, &s, &b).target, first);
            }
            used.insert(format!("{first:?}"));
        }
        assert_eq!(used.len(), 2, "sessions spread over both replicas");
        // Its replica down: the session moves, reads keep working.
        let down = Backends::new(vec![
            Backend::primary(0, "primary"),
            Backend::replica(1, "replica-1").unhealthy(),
            Backend::replica(2, "replica-2"),
        ]);
        for id in 0..10 {
            assert_eq!(
                p.route(&stmt, &Session::new(id), &down).target,
                Target::Replica(2)
            );
        }
    }

    #[test]
    fn read_list_and_primary_reads() {
        let mut p =
            policy(r#"{"read": ["replica-2"], "primary_reads": true, "spread": "statement"}"#);
        let stmt = Statement::read("SELECT 1");
        let b = testing::cluster();
        let seq: Vec<Target> = (0..2)
            .map(|_| p.route(&stmt, &testing::session(), &b).target)
            .collect();
        assert_eq!(seq, vec![Target::Primary, Target::Replica(2)]);
    }

    #[test]
    fn bad_config_is_an_error() {
        let err = RwSplit::new(&Config::new(r#"{"reed": []}"#)).err().unwrap();
        assert!(err.contains("reed"), "{err}");
    }

    #[test]
    fn fixtures() {
        testing::run_fixtures::<RwSplit>(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures.toml"));
    }
}
