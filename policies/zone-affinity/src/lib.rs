//! `zone-affinity`: reads prefer replicas in the client's zone (cheaper, faster
//! cross-AZ traffic), falling back to any healthy replica, then the primary.
//!
//! The client's zone comes from a session attribute (e.g. a startup option
//! `-c signalbox.zone=eu-1a`, exposed as attribute `zone`), or else from the
//! application name through a configured map.

use std::collections::BTreeMap;

use serde::Deserialize;
use signalbox_policy::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZoneConfig {
    /// Session attribute holding the client's zone.
    pub attribute: String,
    /// Node tag holding the replica's zone.
    pub tag: String,
    /// Application name → zone, for clients that cannot set an attribute.
    pub applications: BTreeMap<String, String>,
    /// Replicas over this lag (ms) are not used.
    pub max_lag_ms: Option<u32>,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        Self {
            attribute: "zone".into(),
            tag: "zone".into(),
            applications: BTreeMap::new(),
            max_lag_ms: None,
        }
    }
}

pub struct ZoneAffinity(ZoneConfig);

impl ZoneAffinity {
    fn client_zone<'s>(&'s self, session: &'s Session) -> Option<&'s str> {
        session.attribute(&self.0.attribute).or_else(|| {
            self.0
                .applications
                .get(session.application_name())
                .map(String::as_str)
        })
    }
}

impl Policy for ZoneAffinity {
    fn new(config: &Config) -> Result<Self, String> {
        Ok(Self(config.parse()?))
    }

    fn route(&mut self, stmt: &Statement, session: &Session, backends: &Backends) -> Decision {
        if !stmt.read_only {
            return Decision::primary().because("write");
        }
        let max_lag = self.0.max_lag_ms.unwrap_or(u32::MAX);
        let usable = || backends.healthy_replicas().max_lag_ms(max_lag);
        if let Some(zone) = self.client_zone(session) {
            let local = usable()
                .filter(|b| b.tag(&self.0.tag) == Some(zone))
                .least_outstanding();
            if let Some(b) = local {
                return Decision::replica(b.id).because("same zone");
            }
        }
        match usable().least_outstanding() {
            Some(b) => Decision::replica(b.id).because("other zone"),
            None => Decision::primary().because("no replica"),
        }
    }
}

signalbox_policy::export!(ZoneAffinity);

#[cfg(test)]
mod tests {
    use super::*;
    use signalbox_policy::testing;

    fn cluster() -> Backends {
        Backends::new(vec![
            Backend::primary(0, "p").with_tag("zone", "a"),
            Backend::replica(1, "ra")
                .with_tag("zone", "a")
                .with_in_flight(9),
            Backend::replica(2, "rb").with_tag("zone", "b"),
        ])
    }

    #[test]
    fn attribute_zone_wins_even_when_busier() {
        let mut p = ZoneAffinity::new(&Config::new("")).unwrap();
        let s = testing::session().with_attribute("zone", "a");
        let d = p.route(&Statement::read("SELECT 1"), &s, &cluster());
        assert_eq!(d, Decision::replica(1).because("same zone"));
    }

    #[test]
    fn application_map_and_fallback() {
        let cfg = r#"{"applications": {"web-b": "b", "web-c": "c"}}"#;
        let mut p = ZoneAffinity::new(&Config::new(cfg)).unwrap();
        let s = testing::session().with_application_name("web-b");
        assert_eq!(
            p.route(&Statement::read("SELECT 1"), &s, &cluster()).target,
            Target::Replica(2)
        );
        let s = testing::session().with_application_name("web-c");
        assert_eq!(
            p.route(&Statement::read("SELECT 1"), &s, &cluster()),
            Decision::replica(2).because("other zone")
        );
    }

    #[test]
    fn fixtures() {
        testing::run_fixtures::<ZoneAffinity>(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures.toml"
        ));
    }
}
