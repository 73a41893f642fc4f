//! Catalog facts the classifier cannot read from SQL text, per database:
//! which relations a standby refuses (UNLOGGED, temporary), what a view
//! reads, and whether a function may write. The control plane fetches them
//! from the primary (`pg_class`, `pg_proc`, `pg_operator`), when a database
//! is first used, after DDL seen through signalbox and on an interval.
//!
//! Verdicts are computed once per fetch, so judging a statement is a few
//! hash lookups. Anything the catalog does not know (a relation or function
//! created since the last fetch) is judged not read-only: a stale catalog
//! costs offload, never correctness.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};

use crate::sql::classify::{classify, Facts, Name};

/// Whether something may run on a standby, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub safe: bool,
    pub why: Arc<str>,
}

impl Verdict {
    fn safe(why: impl Into<Arc<str>>) -> Self {
        Self {
            safe: true,
            why: why.into(),
        }
    }

    fn unsafe_(why: impl Into<Arc<str>>) -> Self {
        Self {
            safe: false,
            why: why.into(),
        }
    }
}

/// A statement's verdict with the catalog, and how each name was judged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    pub read_only: bool,
    pub reasons: Vec<String>,
}

/// Rows as fetched.
#[derive(Debug, Default)]
pub struct Rows {
    /// (schema, name, relpersistence, relkind, view definition for user views)
    pub relations: Vec<(String, String, String, String, Option<String>)>,
    /// (schema, name, provolatile, language, SQL body for LANGUAGE sql)
    pub functions: Vec<(String, String, String, String, Option<String>)>,
    /// User operators: (schema, name, function schema, function name)
    pub operators: Vec<(String, String, String, String)>,
}

/// One database's facts.
#[derive(Debug, Default)]
pub struct DbCatalog {
    relations: HashMap<String, Vec<(String, Verdict)>>,
    functions: HashMap<String, Vec<(String, Verdict)>>,
    operators: HashMap<String, Vec<(String, Verdict)>>,
    pub fetched: Option<Instant>,
}

/// Built-ins that write, lock, signal or run SQL text: never on a standby.
const DENY: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_notify",
    "set_config",
    "setseed",
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_logical_emit_message",
    "pg_import_system_collations",
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    "pg_nextoid",
    "lowrite",
    "loread",
    "pg_log_backend_memory_contexts",
    // Refused during recovery.
    "pg_walfile_name",
    "pg_walfile_name_offset",
    "pg_split_walfile_name",
];

/// Prefixes of built-in families that write or lock.
const DENY_PREFIXES: &[&str] = &[
    "pg_advisory_",
    "pg_try_advisory_",
    "lo_",
    "pg_stat_reset",
    "pg_replication_origin_",
    "pg_create_",
    "pg_drop_",
    "pg_copy_",
    "pg_replication_slot_advance",
    "pg_wal_replay_",
];

/// VOLATILE built-ins reviewed as not writing (they read clocks, random
/// numbers, statistics, sizes or recovery state).
const VOLATILE_READS: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "timeofday",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "gen_random_uuid",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_database_size",
    "pg_tablespace_size",
    "pg_relation_filenode",
    "pg_relation_filepath",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_tablespace_databases",
    "pg_get_keywords",
    "pg_get_catalog_foreign_keys",
    "txid_current_snapshot",
    "pg_current_snapshot",
    "txid_current_if_assigned",
    "pg_current_xact_id_if_assigned",
    "pg_xact_status",
    "txid_status",
    "pg_control_checkpoint",
    "pg_control_system",
    "pg_control_init",
    "pg_control_recovery",
    "pg_show_all_settings",
    "pg_show_all_file_settings",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_get_backend_memory_contexts",
    "pg_lock_status",
    "pg_prepared_xact",
    "pg_cursor",
    "pg_prepared_statement",
    "pg_timezone_names",
    "pg_available_extensions",
    "pg_available_extension_versions",
    "pg_get_replication_slots",
    "pg_get_shmem_allocations",
];

fn judge_builtin(name: &str, volatility: &str) -> Verdict {
    if DENY.contains(&name) || DENY_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Verdict::unsafe_(format!("{name}: built-in that writes, locks or runs SQL"));
    }
    match volatility {
        "i" => Verdict::safe(format!("{name}: built-in, IMMUTABLE")),
        "s" => Verdict::safe(format!("{name}: built-in, STABLE")),
        _ if VOLATILE_READS.contains(&name) || name.starts_with("pg_stat_get_") => {
            Verdict::safe(format!("{name}: built-in VOLATILE reviewed as read-only"))
        }
        _ => Verdict::unsafe_(format!("{name}: built-in VOLATILE")),
    }
}

/// Builds a catalog: verdicts of SQL functions and views need the
/// verdicts of what they call, so they are computed on demand, once.
struct Builder<'a> {
    rows: &'a Rows,
    allow: &'a HashSet<String>,
    /// Verdicts by row index (overloads are separate rows).
    functions: HashMap<usize, Verdict>,
    relations: HashMap<usize, Verdict>,
    /// Rows being judged (a cycle is not read-only): (is a relation, row).
    busy: HashSet<(bool, usize)>,
    /// Nesting of bodies and views being judged: bounded, so a long chain
    /// of functions calling functions cannot exhaust the stack.
    depth: usize,
}

/// Deeper chains of SQL functions and views than this are not judged
/// read-only.
const MAX_DEPTH: usize = 16;

impl<'a> Builder<'a> {
    fn function(&mut self, i: usize) -> Verdict {
        if let Some(v) = self.functions.get(&i) {
            return v.clone();
        }
        let (schema, name, volatility, language, body) = &self.rows.functions[i];
        let v = self.judge_function(i, schema, name, volatility, language, body.as_deref());
        self.functions.insert(i, v.clone());
        v
    }

    fn judge_function(
        &mut self,
        row: usize,
        schema: &str,
        name: &str,
        volatility: &str,
        language: &str,
        body: Option<&str>,
    ) -> Verdict {
        let qualified = format!("{schema}.{name}");
        if self.allow.contains(&qualified) || self.allow.contains(name) {
            return Verdict::safe(format!("{qualified}: listed in read_only_functions"));
        }
        if schema == "pg_catalog" {
            return judge_builtin(name, volatility);
        }
        if language == "aggregate" {
            return Verdict::unsafe_(format!(
                "{qualified}: user aggregate (its support functions are not judged; list it in read_only_functions if they never write)"
            ));
        }
        match (language, body) {
            ("sql", Some(body)) => {
                let key = (false, row);
                if !self.busy.insert(key) {
                    return Verdict::unsafe_(format!("{qualified}: recursive"));
                }
                let inner = self.text(body);
                self.busy.remove(&key);
                if inner.safe {
                    Verdict::safe(format!("{qualified}: LANGUAGE sql whose body only reads"))
                } else {
                    Verdict::unsafe_(format!("{qualified}: LANGUAGE sql body: {}", inner.why))
                }
            }
            ("c" | "internal", _) if volatility != "v" => Verdict::safe(format!(
                "{qualified}: {language} function declared {}",
                if volatility == "i" { "IMMUTABLE" } else { "STABLE" }
            )),
            _ => Verdict::unsafe_(format!(
                "{qualified}: LANGUAGE {language} may write (list it in [classifier] read_only_functions if it never does)"
            )),
        }
    }

    /// The verdict of SQL text (a function body, a view definition).
    fn text(&mut self, sql: &str) -> Verdict {
        if self.depth >= MAX_DEPTH {
            return Verdict::unsafe_(format!("nested more than {MAX_DEPTH} levels deep"));
        }
        self.depth += 1;
        let v = self.text_inner(sql);
        self.depth -= 1;
        v
    }

    fn text_inner(&mut self, sql: &str) -> Verdict {
        let c = classify(sql);
        if !c.facts.catalog_candidate || c.parse_error {
            return Verdict::unsafe_("writes or is not understood");
        }
        let j = self.facts(&c.facts);
        if j.read_only {
            Verdict::safe("reads only")
        } else {
            Verdict::unsafe_(j.reasons.join("; "))
        }
    }

    fn relation(&mut self, i: usize) -> Verdict {
        if let Some(v) = self.relations.get(&i) {
            return v.clone();
        }
        let (schema, name, persistence, kind, viewdef) = &self.rows.relations[i];
        let qualified = format!("{schema}.{name}");
        let v = match (persistence.as_str(), kind.as_str(), viewdef) {
            ("u", _, _) => {
                Verdict::unsafe_(format!("{qualified}: UNLOGGED (a standby refuses it)"))
            }
            ("t", _, _) => Verdict::unsafe_(format!("{qualified}: temporary")),
            (_, "v", Some(def)) => {
                let busy = (true, i);
                if !self.busy.insert(busy) {
                    Verdict::unsafe_(format!("{qualified}: recursive view"))
                } else {
                    let inner = self.text(def);
                    self.busy.remove(&busy);
                    if inner.safe {
                        Verdict::safe(format!("{qualified}: view that only reads"))
                    } else {
                        Verdict::unsafe_(format!("{qualified}: view: {}", inner.why))
                    }
                }
            }
            _ => Verdict::safe(format!("{qualified}: table")),
        };
        self.relations.insert(i, v.clone());
        v
    }

    fn facts(&mut self, facts: &Facts) -> Judgement {
        let mut j = Judgement {
            read_only: true,
            reasons: Vec::new(),
        };
        let note = |v: Verdict, j: &mut Judgement| {
            j.read_only &= v.safe;
            j.reasons.push(v.why.to_string());
        };
        for f in &facts.calls {
            let idx: Vec<usize> = candidates(&self.rows.functions, f, |r| (&r.0, &r.1));
            if idx.is_empty() {
                note(
                    Verdict::unsafe_(format!("{}: not in the catalog", f.display())),
                    &mut j,
                );
            }
            for i in idx {
                let v = self.function(i);
                note(v, &mut j);
            }
        }
        for r in &facts.relations {
            let idx: Vec<usize> = candidates(&self.rows.relations, r, |r| (&r.0, &r.1));
            if idx.is_empty() {
                note(
                    Verdict::unsafe_(format!("{}: not in the catalog", r.display())),
                    &mut j,
                );
            }
            for i in idx {
                let v = self.relation(i);
                note(v, &mut j);
            }
        }
        for op in &facts.operators {
            for (schema, name, fschema, fname) in &self.rows.operators {
                let matches = name == &op.name && op.schema.as_ref().is_none_or(|s| s == schema);
                if !matches {
                    continue;
                }
                let f = Name {
                    schema: Some(fschema.clone()),
                    name: fname.clone(),
                };
                for i in candidates(&self.rows.functions, &f, |r| (&r.0, &r.1)) {
                    let v = self.function(i);
                    note(
                        Verdict {
                            safe: v.safe,
                            why: format!("operator {schema}.{name}: {}", v.why).into(),
                        },
                        &mut j,
                    );
                }
            }
        }
        j
    }
}

/// Rows matching a possibly unqualified name: every schema's object of
/// that name (the client's search_path is not known).
fn candidates<T>(rows: &[T], name: &Name, key: impl Fn(&T) -> (&String, &String)) -> Vec<usize> {
    let matching = |schema: Option<&str>| -> Vec<usize> {
        rows.iter()
            .enumerate()
            .filter(|(_, r)| {
                let (s, n) = key(r);
                n == &name.name && schema.is_none_or(|want| s == want)
            })
            .map(|(i, _)| i)
            .collect()
    };
    match &name.schema {
        Some(s) => matching(Some(s)),
        None => matching(None),
    }
}

impl DbCatalog {
    /// Compute every verdict from fetched rows.
    pub fn build(rows: &Rows, read_only_functions: &[String]) -> DbCatalog {
        let allow: HashSet<String> = read_only_functions.iter().cloned().collect();
        let mut b = Builder {
            rows,
            allow: &allow,
            functions: HashMap::new(),
            relations: HashMap::new(),
            busy: HashSet::new(),
            depth: 0,
        };
        let mut cat = DbCatalog {
            fetched: Some(Instant::now()),
            ..DbCatalog::default()
        };
        for i in 0..rows.functions.len() {
            let v = b.function(i);
            let (schema, name, ..) = &rows.functions[i];
            push_unique(cat.functions.entry(name.clone()).or_default(), schema, v);
        }
        for i in 0..rows.relations.len() {
            let v = b.relation(i);
            let (schema, name, ..) = &rows.relations[i];
            push_unique(cat.relations.entry(name.clone()).or_default(), schema, v);
        }
        for (schema, name, fschema, fname) in &rows.operators {
            let f = Name {
                schema: Some(fschema.clone()),
                name: fname.clone(),
            };
            // Any overload that may write makes the operator unsafe.
            let verdicts: Vec<Verdict> = candidates(&rows.functions, &f, |r| (&r.0, &r.1))
                .into_iter()
                .map(|i| b.function(i))
                .collect();
            let v = verdicts
                .iter()
                .find(|v| !v.safe)
                .or(verdicts.first())
                .cloned()
                .unwrap_or_else(|| Verdict::unsafe_("its function is not in the catalog"));
            let v = Verdict {
                safe: v.safe,
                why: format!("operator {schema}.{name}: {}", v.why).into(),
            };
            push_unique(cat.operators.entry(name.clone()).or_default(), schema, v);
        }
        cat
    }

    /// Judge a statement's facts: every call, relation and user operator
    /// must be known and safe.
    pub fn judge(&self, facts: &Facts) -> Judgement {
        let mut j = Judgement {
            read_only: true,
            reasons: Vec::new(),
        };
        self.visit(facts, &mut |v| {
            j.read_only &= v.safe;
            j.reasons.push(v.why.to_string());
            true
        });
        j
    }

    /// Whether a statement's facts are read-only: [`Self::judge`] without
    /// the reasons (it runs on every routed statement): allocates nothing
    /// unless a name is missing from the catalog.
    pub fn read_only(&self, facts: &Facts) -> bool {
        let mut safe = true;
        self.visit(facts, &mut |v| {
            safe &= v.safe;
            safe
        });
        safe
    }

    /// Every verdict that bears on `facts`, in order, until `note` says stop.
    fn visit(&self, facts: &Facts, note: &mut dyn FnMut(&Verdict) -> bool) {
        let missing = |what: std::fmt::Arguments<'_>, note: &mut dyn FnMut(&Verdict) -> bool| {
            note(&Verdict::unsafe_(format!("{what}: not in the catalog")))
        };
        // A call or relation must be in the catalog, and every object it may
        // mean safe.
        let known = |map, name: &Name, note: &mut dyn FnMut(&Verdict) -> bool| {
            let mut found = lookup(map, name).peekable();
            match found.peek() {
                None => missing(format_args!("{}", name.display()), note),
                Some(_) => found.all(|(_, v)| note(v)),
            }
        };
        for f in &facts.calls {
            if !known(&self.functions, f, note) {
                return;
            }
        }
        // `t.name` is a column unless a function of that name exists; then
        // it may be a call `name(t)`, judged like one.
        for a in &facts.attributes {
            if !self
                .functions
                .get(a)
                .into_iter()
                .flatten()
                .all(|(_, v)| note(v))
            {
                return;
            }
        }
        for r in &facts.relations {
            if !known(&self.relations, r, note) {
                return;
            }
        }
        for op in &facts.operators {
            for (schema, v) in self.operators.get(&op.name).into_iter().flatten() {
                if op.schema.as_ref().is_none_or(|s| s == schema) && !note(v) {
                    return;
                }
            }
            // A qualified operator outside pg_catalog must exist as a user one.
            if op.schema.as_deref().is_some_and(|s| s != "pg_catalog")
                && !self
                    .operators
                    .get(&op.name)
                    .is_some_and(|v| v.iter().any(|(s, _)| Some(s) == op.schema.as_ref()))
                && !missing(format_args!("operator {}", op.display()), note)
            {
                return;
            }
        }
    }
}

fn push_unique(list: &mut Vec<(String, Verdict)>, schema: &str, v: Verdict) {
    match list.iter_mut().find(|(s, _)| s == schema) {
        Some((_, old)) if old.safe && !v.safe => *old = v,
        Some(_) => {}
        None => list.push((schema.to_owned(), v)),
    }
}

/// The verdicts of the objects `name` may mean.
fn lookup<'a>(
    map: &'a HashMap<String, Vec<(String, Verdict)>>,
    name: &'a Name,
) -> impl Iterator<Item = &'a (String, Verdict)> + 'a {
    // The client's search_path is not known: an unqualified name may be
    // any schema's object of that name (a user overload of a built-in too).
    map.get(&name.name)
        .into_iter()
        .flatten()
        .filter(move |(schema, _)| name.schema.as_ref().is_none_or(|s| s == schema))
}

/// A relation whose partitions or inheritance children include an
/// UNLOGGED or temporary one counts as UNLOGGED (a standby refuses the scan).
const RELATIONS: &str = "WITH RECURSIVE d(root, child) AS ( \
      SELECT inhparent, inhrelid FROM pg_catalog.pg_inherits \
      UNION SELECT d.root, i.inhrelid FROM d JOIN pg_catalog.pg_inherits i ON i.inhparent = d.child), \
    impure AS (SELECT DISTINCT d.root FROM d JOIN pg_catalog.pg_class ch ON ch.oid = d.child \
      WHERE ch.relpersistence <> 'p') \
    SELECT n.nspname::text, c.relname::text, \
    CASE WHEN c.oid IN (SELECT root FROM impure) THEN 'u' ELSE c.relpersistence::text END, \
    c.relkind::text, CASE WHEN c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
    THEN pg_catalog.pg_get_viewdef(c.oid) END \
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND n.nspname NOT LIKE 'pg\\_toast%' \
    AND n.nspname NOT LIKE 'pg\\_temp%'";

/// User aggregates show as language `aggregate`.
const FUNCTIONS: &str = "SELECT n.nspname::text, p.proname::text, p.provolatile::text, \
    CASE WHEN p.prokind = 'a' THEN 'aggregate' ELSE l.lanname::text END, \
    CASE WHEN l.lanname = 'sql' THEN coalesce(pg_catalog.pg_get_function_sqlbody(p.oid), p.prosrc) END \
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
    JOIN pg_catalog.pg_language l ON l.oid = p.prolang";

const OPERATORS: &str = "SELECT n.nspname::text, o.oprname::text, pn.nspname::text, p.proname::text \
    FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
    JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace \
    WHERE n.nspname <> 'pg_catalog'";

/// Fetch one database's rows.
pub async fn fetch(options: PgConnectOptions, timeout: Duration) -> Result<Rows, String> {
    let work = async {
        let mut conn = options
            .disable_statement_logging()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut rows = Rows::default();
        for r in sqlx::query(RELATIONS)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?
        {
            rows.relations
                .push((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)));
        }
        for r in sqlx::query(FUNCTIONS)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?
        {
            rows.functions
                .push((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)));
        }
        for r in sqlx::query(OPERATORS)
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?
        {
            rows.operators
                .push((r.get(0), r.get(1), r.get(2), r.get(3)));
        }
        let _ = conn.close().await;
        Ok(rows)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// The catalogs of every database signalbox serves.
#[derive(Default)]
pub struct Catalogs {
    /// Read by every statement, replaced after a fetch: no lock to read.
    dbs: arc_swap::ArcSwap<HashMap<String, Arc<DbCatalog>>>,
    /// One fetch at a time per database. A caller waits for its own
    /// fetch: one already running may have started before its DDL.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub fetches: std::sync::atomic::AtomicU64,
    pub fetch_errors: std::sync::atomic::AtomicU64,
}

impl Catalogs {
    /// Fetch `database`'s facts from the primary (or, without one, a
    /// healthy node: a standby's catalog is the primary's, replayed) and
    /// swap them in. A fetch already running for it is not repeated.
    pub async fn refresh(
        &self,
        cluster: &crate::cluster::Cluster,
        config: &crate::config::ClassifierConfig,
        database: &str,
    ) -> Result<(), String> {
        self.refresh_inner(cluster, config, database, false).await
    }

    /// Fetch `database`'s facts unless some session already did.
    pub async fn ensure(
        &self,
        cluster: &crate::cluster::Cluster,
        config: &crate::config::ClassifierConfig,
        database: &str,
    ) -> Result<(), String> {
        self.refresh_inner(cluster, config, database, true).await
    }

    async fn refresh_inner(
        &self,
        cluster: &crate::cluster::Cluster,
        config: &crate::config::ClassifierConfig,
        database: &str,
        only_if_missing: bool,
    ) -> Result<(), String> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(database.to_owned())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        if only_if_missing && self.get(database).is_some() {
            return Ok(());
        }
        self.fetch_once(cluster, config, database).await
    }

    async fn fetch_once(
        &self,
        cluster: &crate::cluster::Cluster,
        config: &crate::config::ClassifierConfig,
        database: &str,
    ) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let view = cluster.view();
        let node = view.primary().or_else(|| {
            view.states
                .iter()
                .position(|s| s.healthy)
                .map(|i| i as crate::route::NodeId)
        });
        let result = match node.and_then(|n| cluster.control_options(n, database)) {
            Some(options) => fetch(options, Duration::from_millis(config.fetch_timeout_ms)).await,
            None => Err("no healthy node".into()),
        };
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(rows) => {
                let cat = DbCatalog::build(&rows, &config.read_only_functions);
                self.put(database, cat);
                Ok(())
            }
            Err(e) => {
                self.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(database, error = %e, "catalog fetch failed; verdicts stay as they were");
                Err(e)
            }
        }
    }

    pub fn get(&self, database: &str) -> Option<Arc<DbCatalog>> {
        self.dbs.load().get(database).cloned()
    }

    pub fn put(&self, database: &str, cat: DbCatalog) {
        let cat = Arc::new(cat);
        self.dbs.rcu(|dbs| {
            let mut dbs = HashMap::clone(dbs);
            dbs.insert(database.to_owned(), cat.clone());
            dbs
        });
    }

    pub fn databases(&self) -> Vec<String> {
        self.dbs.load().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> String {
        v.to_owned()
    }

    fn rows() -> Rows {
        Rows {
            relations: vec![
                (s("public"), s("orders"), s("p"), s("r"), None),
                (s("public"), s("scratch"), s("u"), s("r"), None),
                (
                    s("public"),
                    s("calm"),
                    s("p"),
                    s("v"),
                    Some(s("SELECT * FROM orders")),
                ),
                (
                    s("public"),
                    s("noisy"),
                    s("p"),
                    s("v"),
                    Some(s("SELECT audit() FROM orders")),
                ),
                (
                    s("public"),
                    s("unlogged_view"),
                    s("p"),
                    s("v"),
                    Some(s("SELECT * FROM scratch")),
                ),
                (s("pg_catalog"), s("pg_class"), s("p"), s("r"), None),
            ],
            functions: vec![
                (s("pg_catalog"), s("lower"), s("i"), s("internal"), None),
                (s("pg_catalog"), s("sum"), s("i"), s("internal"), None),
                (s("pg_catalog"), s("nextval"), s("v"), s("internal"), None),
                (
                    s("pg_catalog"),
                    s("jsonb_path_query_array"),
                    s("i"),
                    s("internal"),
                    None,
                ),
                (
                    s("pg_catalog"),
                    s("pg_current_wal_lsn"),
                    s("v"),
                    s("internal"),
                    None,
                ),
                (s("public"), s("audit"), s("v"), s("plpgsql"), None),
                (
                    s("public"),
                    s("total"),
                    s("s"),
                    s("sql"),
                    Some(s("SELECT sum(1) FROM orders")),
                ),
                (
                    s("public"),
                    s("bump"),
                    s("v"),
                    s("sql"),
                    Some(s("SELECT nextval('s')")),
                ),
                (
                    s("public"),
                    s("indirect"),
                    s("s"),
                    s("sql"),
                    Some(s("SELECT bump()")),
                ),
                (
                    s("public"),
                    s("loop_a"),
                    s("s"),
                    s("sql"),
                    Some(s("SELECT loop_b()")),
                ),
                (
                    s("public"),
                    s("loop_b"),
                    s("s"),
                    s("sql"),
                    Some(s("SELECT loop_a()")),
                ),
                (s("public"), s("report"), s("s"), s("plpgsql"), None),
                (s("public"), s("writer_op"), s("v"), s("plpgsql"), None),
            ],
            operators: vec![(s("public"), s("###"), s("public"), s("writer_op"))],
        }
    }

    fn judge(cat: &DbCatalog, sql: &str) -> Judgement {
        let c = classify(sql);
        assert!(c.facts.catalog_candidate, "{sql}");
        let j = cat.judge(&c.facts);
        // The routing path's verdict, which stops at the first unsafe fact
        // and keeps no reasons, is the same.
        assert_eq!(cat.read_only(&c.facts), j.read_only, "{sql}");
        j
    }

    #[test]
    fn verdicts_from_the_catalog() {
        let cat = DbCatalog::build(&rows(), &[s("public.report")]);
        for (sql, read_only, why) in [
            ("SELECT * FROM orders", true, "public.orders: table"),
            ("SELECT * FROM scratch", false, "UNLOGGED"),
            ("SELECT * FROM calm", true, "view that only reads"),
            (
                "SELECT * FROM noisy",
                false,
                "public.audit: LANGUAGE plpgsql",
            ),
            ("SELECT * FROM unlogged_view", false, "UNLOGGED"),
            ("SELECT total()", true, "LANGUAGE sql whose body only reads"),
            ("SELECT bump()", false, "nextval: built-in that writes"),
            ("SELECT indirect()", false, "nextval"),
            ("SELECT loop_a()", false, "recursive"),
            ("SELECT report()", true, "listed in read_only_functions"),
            ("SELECT audit()", false, "plpgsql"),
            (
                "SELECT jsonb_path_query_array('{}', '$')",
                true,
                "IMMUTABLE",
            ),
            ("SELECT pg_current_wal_lsn()", false, "writes"),
            (
                "SELECT * FROM created_after_fetch",
                false,
                "not in the catalog",
            ),
            ("SELECT unknown_fn()", false, "not in the catalog"),
            ("SELECT 1 ### 2", false, "operator public.###"),
            (
                "SELECT lower('A') FROM orders",
                true,
                "lower: built-in, IMMUTABLE",
            ),
        ] {
            let j = judge(&cat, sql);
            assert_eq!(j.read_only, read_only, "{sql}: {j:?}");
            assert!(j.reasons.iter().any(|r| r.contains(why)), "{sql}: {j:?}");
        }
    }

    #[test]
    fn attribute_calls_overloads_depth_and_aggregates() {
        let mut rows = rows();
        rows.functions.extend([
            (
                s("pg_catalog"),
                s("pg_walfile_name"),
                s("i"),
                s("internal"),
                None,
            ),
            (s("public"), s("my_agg"), s("i"), s("aggregate"), None),
        ]);
        for i in 0..40 {
            let body = format!("SELECT chain_{}()", i + 1);
            rows.functions.push((
                s("public"),
                format!("chain_{i}"),
                s("s"),
                s("sql"),
                Some(body),
            ));
        }
        rows.functions.push((
            s("public"),
            s("chain_40"),
            s("s"),
            s("sql"),
            Some(s("SELECT 1")),
        ));
        let cat = DbCatalog::build(&rows, &[]);
        for (sql, read_only, why) in [
            (
                "SELECT o.audit FROM orders o",
                false,
                "public.audit: LANGUAGE plpgsql",
            ),
            ("SELECT o.id FROM orders o", true, "public.orders: table"),
            ("SELECT chain_0()", false, "levels deep"),
            ("SELECT pg_walfile_name('0/0')", false, "writes, locks"),
            ("SELECT my_agg(1)", false, "user aggregate"),
            (
                "WITH scratch AS (SELECT * FROM scratch) SELECT * FROM scratch",
                false,
                "UNLOGGED",
            ),
        ] {
            let j = judge(&cat, sql);
            assert_eq!(j.read_only, read_only, "{sql}: {j:?}");
            assert!(j.reasons.iter().any(|r| r.contains(why)), "{sql}: {j:?}");
        }
        // A user overload of a built-in name counts too.
        let mut overloaded = super::tests::rows();
        overloaded
            .functions
            .push((s("public"), s("lower"), s("v"), s("plpgsql"), None));
        let cat = DbCatalog::build(&overloaded, &[]);
        let j = judge(&cat, "SELECT lower('A')");
        assert!(!j.read_only, "{j:?}");
    }
}
