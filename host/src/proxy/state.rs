//! A session's client-visible state (settings from startup parameters and
//! SETs) and the SQL that gives any server connection exactly that state.
//! Pure: table-tested here, used by the session on every checkout.

use std::hash::{Hash, Hasher};

use crate::sql::classify::SessionEffect;

/// Client-visible session state that must follow the session to every
/// backend connection.
#[derive(Clone, Debug, Default)]
pub struct SessionState {
    /// Startup parameters turned into SETs, then the client's SETs, by name.
    sets: Vec<(String, String)>,
    pub key: u64,
}

impl SessionState {
    /// The state a session starts with: its startup settings.
    pub fn new(startup: &[(String, String)]) -> Self {
        let mut s = Self::default();
        s.apply(&[SessionEffect::ResetAll], startup);
        s
    }

    pub fn apply(&mut self, effects: &[SessionEffect], startup: &[(String, String)]) {
        for e in effects {
            match e {
                SessionEffect::Set { name, sql } => {
                    self.sets.retain(|(n, _)| n != name);
                    self.sets.push((name.clone(), sql.clone()));
                }
                SessionEffect::Reset { name } => {
                    self.sets.retain(|(n, _)| n != name);
                    // A RESET returns to the startup value, as in PostgreSQL.
                    if let Some(s) = startup.iter().find(|(n, _)| n == name) {
                        self.sets.push(s.clone());
                    }
                }
                SessionEffect::ResetAll | SessionEffect::DiscardAll => {
                    self.sets = startup.to_vec();
                }
                _ => {}
            }
        }
        self.rekey();
    }

    fn rekey(&mut self) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.sets.hash(&mut h);
        // 0 means "fresh connection, nothing applied": never use it.
        self.key = h.finish() | 1;
    }

    /// The reset and SETs that give a connection this session's state.
    /// `RESET ALL` leaves the role and session authorization alone;
    /// `SET SESSION AUTHORIZATION DEFAULT` restores both. A `full` reset also
    /// undoes what untracked code (functions, procedures) may have left:
    /// PostgreSQL's `DISCARD ALL` minus the prepared statements signalbox
    /// manages itself.
    pub fn replay_sql(&self, full: bool) -> String {
        let mut sql = String::from(if full { FULL_RESET } else { BASE_RESET });
        for (_, s) in &self.sets {
            sql.push_str(s);
            sql.push(';');
        }
        sql
    }
}

const BASE_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;";
const FULL_RESET: &str = "CLOSE ALL;SET SESSION AUTHORIZATION DEFAULT;RESET ALL;UNLISTEN *;\
    SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP;";

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The settings a client asked for at startup, by name: its startup
/// parameters and the `-c name=value` pairs of `options` (as PostgreSQL
/// reads them).
fn startup_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let mut words = v.split_whitespace();
                while let Some(w) = words.next() {
                    let kv = if w == "-c" {
                        words.next()
                    } else {
                        w.strip_prefix("-c").or_else(|| w.strip_prefix("--"))
                    };
                    if let Some((name, value)) = kv.and_then(|kv| kv.split_once('=')) {
                        out.push((
                            name.replace('-', "_").to_ascii_lowercase(),
                            value.to_owned(),
                        ));
                    }
                }
            }
            name => out.push((name.to_ascii_lowercase(), v.clone())),
        }
    }
    out
}

/// The value a client asked for at startup for setting `name` (a startup
/// parameter or `options=-c name=value`; the last one wins, as in PostgreSQL).
pub fn startup_value(params: &[(String, String)], name: &str) -> Option<String> {
    startup_settings(params)
        .into_iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

/// Startup settings as the SETs that recreate them on any connection.
pub fn startup_sets(params: &[(String, String)]) -> Vec<(String, String)> {
    startup_settings(params)
        .into_iter()
        .map(|(name, value)| {
            let sql = format!("SET {} = {}", quote_ident(&name), quote_literal(&value));
            (name, sql)
        })
        .collect()
}

/// `-c signalbox.zone=eu-1a` (or a `signalbox.zone` startup parameter)
/// becomes the policy-visible session attribute `zone`.
pub fn attribute_values(params: &[(String, String)]) -> Vec<(String, String)> {
    startup_settings(params)
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("signalbox.").map(|a| (a.to_owned(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn startup_settings_expand_options() {
        let p = pairs(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "web"),
            (
                "options",
                "-c search_path=app -csignalbox.zone=eu-1a --statement-timeout=5s",
            ),
        ]);
        assert_eq!(
            startup_settings(&p),
            pairs(&[
                ("application_name", "web"),
                ("search_path", "app"),
                ("signalbox.zone", "eu-1a"),
                ("statement_timeout", "5s"),
            ])
        );
        assert_eq!(attribute_values(&p), pairs(&[("zone", "eu-1a")]));
        assert_eq!(startup_sets(&p)[1].1, "SET \"search_path\" = 'app'");
        assert_eq!(
            startup_sets(&pairs(&[("application_name", "it's")]))[0].1,
            "SET \"application_name\" = 'it''s'"
        );
    }

    fn set(name: &str, value: &str) -> SessionEffect {
        SessionEffect::Set {
            name: name.into(),
            sql: format!("SET {name} = '{value}'"),
        }
    }

    #[test]
    fn state_table() {
        let startup = startup_sets(&pairs(&[("application_name", "web")]));
        // (effects, SETs the state must replay, in any order)
        let cases: Vec<(Vec<SessionEffect>, Vec<&str>)> = vec![
            (vec![], vec!["SET \"application_name\" = 'web'"]),
            (
                vec![set("role", "a")],
                vec!["SET \"application_name\" = 'web'", "SET role = 'a'"],
            ),
            (
                vec![
                    set("role", "a"),
                    SessionEffect::Reset {
                        name: "role".into(),
                    },
                ],
                vec!["SET \"application_name\" = 'web'"],
            ),
            (
                vec![
                    set("application_name", "x"),
                    SessionEffect::Reset {
                        name: "application_name".into(),
                    },
                ],
                vec!["SET \"application_name\" = 'web'"],
            ),
            (
                vec![set("work_mem", "1MB"), SessionEffect::DiscardAll],
                vec!["SET \"application_name\" = 'web'"],
            ),
            (
                vec![set("work_mem", "1MB"), set("work_mem", "2MB")],
                vec!["SET \"application_name\" = 'web'", "SET work_mem = '2MB'"],
            ),
        ];
        for (i, (effects, want)) in cases.into_iter().enumerate() {
            let mut st = SessionState::new(&startup);
            st.apply(&effects, &startup);
            let mut got: Vec<&str> = st.sets.iter().map(|(_, s)| s.as_str()).collect();
            got.sort();
            let mut want = want;
            want.sort();
            assert_eq!(got, want, "case {i}");
            let base = st.replay_sql(false);
            assert!(
                base.starts_with("SET SESSION AUTHORIZATION DEFAULT;RESET ALL;"),
                "{base}"
            );
            let full = st.replay_sql(true);
            assert!(full.contains("pg_advisory_unlock_all()") && full.contains("DISCARD TEMP"));
            for w in &want {
                assert!(base.contains(w) && full.contains(w), "case {i}: {base}");
            }
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        fn effect() -> impl Strategy<Value = SessionEffect> {
            let name =
                prop::sample::select(vec!["role", "search_path", "work_mem", "application_name"]);
            let value = prop::sample::select(vec!["a", "b", "c"]);
            prop_oneof![
                (name.clone(), value).prop_map(|(n, v)| set(n, v)),
                name.prop_map(|n| SessionEffect::Reset { name: n.into() }),
                Just(SessionEffect::ResetAll),
                Just(SessionEffect::DiscardAll),
            ]
        }

        /// What the session's settings are, as PostgreSQL would have them.
        fn model(
            effects: &[SessionEffect],
            startup: &[(String, String)],
        ) -> BTreeMap<String, String> {
            let initial: BTreeMap<String, String> = startup.iter().cloned().collect();
            let mut m = initial.clone();
            for e in effects {
                match e {
                    SessionEffect::Set { name, sql } => {
                        m.insert(name.clone(), sql.clone());
                    }
                    SessionEffect::Reset { name } => match initial.get(name) {
                        Some(v) => {
                            m.insert(name.clone(), v.clone());
                        }
                        None => {
                            m.remove(name);
                        }
                    },
                    SessionEffect::ResetAll | SessionEffect::DiscardAll => m = initial.clone(),
                    _ => {}
                }
            }
            m
        }

        /// A client statement, as (SQL, what it means: name and value;
        /// `None` value = back to the startup value, "*" = everything).
        fn statement() -> impl Strategy<Value = (String, Option<(String, Option<String>)>)> {
            let name =
                prop::sample::select(vec!["role", "search_path", "work_mem", "application_name"]);
            let value = prop::sample::select(vec!["a", "b", "c"]);
            prop_oneof![
                (name.clone(), value.clone()).prop_map(|(n, v)| (
                    format!("SET {n} = '{v}'"),
                    Some((n.to_string(), Some(v.to_string())))
                )),
                (name.clone(), value.clone()).prop_map(|(n, v)| (
                    format!("SELECT set_config('{n}', '{v}', false)"),
                    Some((n.to_string(), Some(v.to_string())))
                )),
                (name.clone(), value).prop_map(|(n, v)| (format!("SET LOCAL {n} = '{v}'"), None)),
                name.clone()
                    .prop_map(|n| (format!("RESET {n}"), Some((n.to_string(), None)))),
                name.prop_map(|n| (format!("SET {n} TO DEFAULT"), Some((n.to_string(), None)))),
                Just(("RESET ALL".to_string(), Some(("*".to_string(), None)))),
                Just(("DISCARD ALL".to_string(), Some(("*".to_string(), None)))),
                Just(("SELECT 1".to_string(), None)),
            ]
        }

        proptest! {
            /// Whatever a client does, the state replays exactly its
            /// settings; and two sessions share a state key only when their
            /// settings are the same — a connection is never skipped over
            /// for a reset it needed.
            #[test]
            fn tracked_state_matches_postgres(
                a in prop::collection::vec(effect(), 0..12),
                b in prop::collection::vec(effect(), 0..12),
            ) {
                let startup = startup_sets(&pairs(&[("application_name", "web")]));
                let mut sa = SessionState::new(&startup);
                let mut sb = SessionState::new(&startup);
                for e in &a { sa.apply(std::slice::from_ref(e), &startup); }
                sb.apply(&b, &startup);
                let (ma, mb) = (model(&a, &startup), model(&b, &startup));
                let got: BTreeMap<String, String> = sa.sets.iter().cloned().collect();
                prop_assert_eq!(&got, &ma);
                prop_assert_eq!(sa.sets.len(), ma.len(), "a setting is replayed twice");
                if sa.key == sb.key {
                    prop_assert_eq!(ma, mb);
                }
            }

            /// The same from SQL text: a stream of client statements,
            /// classified as the proxy does, leaves exactly the settings
            /// PostgreSQL would have, each replayed with its last value.
            #[test]
            fn statements_leave_the_settings_postgres_has(
                stream in prop::collection::vec(statement(), 0..16),
            ) {
                let startup = startup_sets(&pairs(&[("application_name", "web")]));
                let mut st = SessionState::new(&startup);
                let mut want: BTreeMap<String, Option<String>> = BTreeMap::new();
                for (sql, meaning) in &stream {
                    let class = crate::sql::classify::classify(sql);
                    st.apply(&class.effects, &startup);
                    match meaning {
                        Some((n, _)) if n == "*" => want.clear(),
                        Some((n, v)) => { want.insert(n.clone(), v.clone()); }
                        None => {}
                    }
                }
                let replay = st.replay_sql(false);
                for (name, value) in &want {
                    let line = st.sets.iter().find(|(n, _)| n == name);
                    match (value, line) {
                        (Some(v), Some((_, sql))) => prop_assert!(sql.contains(&format!("'{v}'")), "{}: {}", name, sql),
                        (None, Some((_, sql))) => {
                            prop_assert_eq!(name.as_str(), "application_name");
                            prop_assert!(sql.contains("'web'"), "{}", sql);
                        }
                        (None, None) => {}
                        (Some(v), None) => prop_assert!(false, "{} = {} is not replayed: {}", name, v, replay),
                    }
                }
                for (n, sql) in &st.sets {
                    let wanted = matches!(want.get(n), Some(Some(_)));
                    prop_assert!(wanted || n == "application_name", "{} is replayed but not set: {}", n, sql);
                }
                prop_assert_eq!(st.sets.len(), st.sets.iter().map(|(n, _)| n).collect::<std::collections::HashSet<_>>().len());
            }
        }
    }
}
