//! Statement classification with PostgreSQL's own grammar (libpg_query):
//! may this run on a hot standby, what kind is it, and what does it do to the
//! session. `read_only` is true only when proven; anything unparsable, any
//! function not known to be safe, any writable CTE or locking clause at any
//! depth makes it false. Never the other way round.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pg_query::protobuf::{self, a_const, TransactionStmtKind, VariableSetKind};
use pg_query::{Context, NodeEnum, NodeRef};

use crate::lock;
use crate::route::StatementKind;
use crate::sql::hints;
pub use crate::sql::walk::Name;
use crate::sql::walk::{walk, Walk};

/// Pin reasons for what neither a rollback nor an error undoes.
const PIN_PREPARE: &str = "SQL-level PREPARE";
const PIN_ADVISORY_LOCK: &str = "session-level advisory lock";

/// What a statement does to the session beyond its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEffect {
    /// `SET name ...` (not LOCAL); `sql` is the statement to replay.
    Set { name: String, sql: String },
    /// `RESET name` / `SET name TO DEFAULT`.
    Reset { name: String },
    /// `RESET ALL` / `DISCARD ALL`.
    ResetAll,
    /// The session must keep its backend connection from now on.
    Pin(&'static str),
    /// A temporary table that lives on one connection only.
    TempTable(String),
    /// SQL `DEALLOCATE name` (`None`: `DEALLOCATE ALL`).
    Deallocate(Option<String>),
    /// `DISCARD ALL`: everything above, for this client only.
    DiscardAll,
    /// `SET`/`RESET`/`SHOW` of one of signalbox's own `signalbox.*`
    /// settings: answered by signalbox, never sent to a node.
    Own(OwnSetting),
}

impl SessionEffect {
    /// The reason of a pin that holds however the transaction ends: a
    /// prepared statement or a session-level advisory lock outlives a
    /// rollback, and an error in a later statement.
    pub fn lasting_pin(&self) -> Option<&'static str> {
        match self {
            SessionEffect::Pin(r) if *r == PIN_PREPARE || *r == PIN_ADVISORY_LOCK => Some(r),
            _ => None,
        }
    }
}

/// A statement about a `signalbox.*` setting (name without the prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnSetting {
    /// `SET` (`Some(value)`) or `RESET` / `SET ... TO DEFAULT` (`None`).
    Set {
        name: String,
        value: Option<String>,
    },
    Show {
        name: String,
    },
}

/// The prefix of signalbox's own settings.
pub const OWN_PREFIX: &str = "signalbox.";

/// Calls, relations, operators and cast types of the read-only statements
/// of a message, for the judgement that needs the database's catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub calls: Vec<Name>,
    pub relations: Vec<Name>,
    pub operators: Vec<Name>,
    pub types: Vec<Name>,
    /// `x.name` that may be a call of a function `name(x)`.
    pub attributes: Vec<String>,
    /// Calls only planned, never run (EXPLAIN without ANALYZE): user
    /// functions still count (the planner folds IMMUTABLE ones), built-in
    /// writers do not.
    pub explain_only: bool,
    /// Every statement is read-only, or would be if the catalog clears its
    /// calls and operators (user functions, user operators): the verdict
    /// with a catalog is `catalog.judge(facts)` instead of `read_only`.
    pub catalog_candidate: bool,
    /// Statements whose walk found nothing but calls and operators to judge.
    clean: usize,
}

/// The classifier's verdict for a whole message (all statements of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    /// Kind of the first statement.
    pub kind: StatementKind,
    /// `pg_query::fingerprint` of the text: the same for statements that
    /// differ only in literals (0 when the text does not parse).
    pub fingerprint: u64,
    pub read_only: bool,
    pub statements: usize,
    pub tables: Arc<[String]>,
    pub functions: Arc<[String]>,
    /// What the fail-closed walk found in statements judged read-only so
    /// far: the catalog judges these per database (see `sql::catalog`).
    pub facts: Facts,
    pub hints: Arc<[(String, String)]>,
    pub effects: Vec<SessionEffect>,
    /// `BEGIN`/`START TRANSACTION` with READ ONLY.
    pub begins_read_only: bool,
    /// `BEGIN`/`START TRANSACTION` (any mode).
    pub begins: bool,
    /// `BEGIN ISOLATION LEVEL SERIALIZABLE` or `BEGIN READ WRITE`: a
    /// standby refuses it.
    pub begins_serializable: bool,
    /// DDL (or code that may run DDL): catalog facts change when it commits.
    pub changes_catalog: bool,
    /// A database no other session may be connected to for this statement
    /// to succeed: `DROP DATABASE name`, the template of `CREATE DATABASE`
    /// (`template1` by default), `ALTER DATABASE name RENAME`/`SET TABLESPACE`.
    pub needs_database_alone: Option<String>,
    /// The parser rejected the text (it will go to the primary and fail there).
    pub parse_error: bool,
    /// It may change session state signalbox cannot track (a function or
    /// procedure whose body may SET, create temp tables, take session locks):
    /// the connection is fully reset before anyone uses it next.
    pub touches_session: bool,
    /// `COPY ... FROM STDIN` (or text that did not parse, which might be):
    /// the server then reads the client's data, so nothing of signalbox's
    /// own may follow the statement on the connection.
    pub copies_in: bool,
    /// `COMMIT`/`END`/`ROLLBACK`/`ABORT` without `AND CHAIN`: the
    /// transaction is over once it has run.
    pub ends_transaction: bool,
    /// `COMMIT PREPARED`: a prepared transaction's writes become visible.
    pub commits_prepared: bool,
}

impl Classified {
    /// The verdict for a message that runs no statement (Describe, Close, Sync).
    pub fn nothing() -> Self {
        Self {
            kind: StatementKind::Utility,
            read_only: true,
            statements: 0,
            parse_error: false,
            touches_session: false,
            copies_in: false,
            facts: Facts {
                catalog_candidate: true,
                ..Facts::default()
            },
            ..Self::unknown("")
        }
    }

    fn unknown(sql: &str) -> Self {
        Self {
            kind: StatementKind::Utility,
            fingerprint: 0,
            read_only: false,
            statements: 1,
            tables: Arc::default(),
            functions: Arc::default(),
            facts: Facts::default(),
            hints: hints::parse(sql).into(),
            effects: Vec::new(),
            begins_read_only: false,
            begins: false,
            begins_serializable: false,
            changes_catalog: false,
            needs_database_alone: None,
            parse_error: true,
            touches_session: true,
            copies_in: true,
            ends_transaction: false,
            commits_prepared: false,
        }
    }
}

/// Built-in functions known to neither write nor be refused by a standby.
/// Anything else (including every user-defined function) is not read-only.
const SAFE_FUNCTIONS: &[&str] = &[
    // aggregates and window functions
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // strings
    "lower",
    "upper",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "substr",
    "substring",
    "concat",
    "concat_ws",
    "replace",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "lpad",
    "rpad",
    "left",
    "right",
    "position",
    "strpos",
    "split_part",
    "initcap",
    "repeat",
    "reverse",
    "format",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "md5",
    "encode",
    "decode",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "starts_with",
    "to_hex",
    "ascii",
    "chr",
    "translate",
    "string_to_array",
    "array_to_string",
    "unaccent",
    // numbers
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "mod",
    "power",
    "sqrt",
    "exp",
    "ln",
    "log",
    "sign",
    "greatest",
    "least",
    "random",
    "width_bucket",
    "div",
    // dates and times
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "date_trunc",
    "date_part",
    "extract",
    "age",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "isfinite",
    "date_bin",
    "timezone",
    // arrays, json, ranges
    "array_length",
    "array_upper",
    "array_lower",
    "array_position",
    "array_positions",
    "array_remove",
    "array_replace",
    "array_append",
    "array_prepend",
    "array_cat",
    "cardinality",
    "unnest",
    "generate_series",
    "generate_subscripts",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "to_json",
    "to_jsonb",
    "row_to_json",
    "json_array_elements",
    "jsonb_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements_text",
    "json_each",
    "jsonb_each",
    "json_each_text",
    "jsonb_each_text",
    "json_object_keys",
    "jsonb_object_keys",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_strip_nulls",
    "jsonb_pretty",
    "json_typeof",
    "jsonb_typeof",
    "jsonb_path_query",
    "jsonb_path_exists",
    "jsonb_path_match",
    "json_extract_path",
    "jsonb_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path_text",
    "jsonb_array_length",
    "json_array_length",
    "lower_inc",
    "upper_inc",
    "isempty",
    "range_merge",
    // misc and catalog introspection (psql, ORMs, drivers)
    "coalesce",
    "nullif",
    "version",
    "current_database",
    "current_schema",
    "current_schemas",
    "current_user",
    "session_user",
    "current_setting",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_backend_pid",
    "pg_postmaster_start_time",
    "pg_typeof",
    "format_type",
    "pg_get_userbyid",
    "pg_get_expr",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "pg_get_viewdef",
    "pg_get_triggerdef",
    "pg_get_functiondef",
    "pg_get_function_arguments",
    "pg_get_function_result",
    "pg_get_function_identity_arguments",
    "pg_get_serial_sequence",
    "pg_get_partkeydef",
    "pg_get_statisticsobjdef_columns",
    "pg_get_ruledef",
    "pg_table_is_visible",
    "pg_type_is_visible",
    "pg_function_is_visible",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_database_size",
    "pg_size_pretty",
    "pg_encoding_to_char",
    "obj_description",
    "col_description",
    "shobj_description",
    "has_table_privilege",
    "has_schema_privilege",
    "has_database_privilege",
    "has_column_privilege",
    "has_function_privilege",
    "pg_has_role",
    "array_to_json",
    "pg_collation_is_visible",
    "pg_relation_is_publishable",
    "pg_get_keywords",
    "pg_char_to_encoding",
    "gen_random_uuid",
    "uuid_generate_v4",
    "row",
    "exists",
    "to_regclass",
    "to_regtype",
    "pg_column_size",
    "pg_tablespace_location",
    "pg_get_partition_constraintdef",
    "inet_server_port",
    "inet_server_addr",
    "inet_client_addr",
    "pg_sleep",
    // TABLESAMPLE methods
    "bernoulli",
    "system",
    // STABLE/IMMUTABLE built-ins ORMs and reports use
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_path_exists",
    "enum_range",
    "enum_first",
    "enum_last",
    "array_dims",
    "array_ndims",
    "array_fill",
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "phraseto_tsquery",
    "websearch_to_tsquery",
    "ts_rank",
    "ts_headline",
    "date_add",
    "date_subtract",
    "num_nonnulls",
    "num_nulls",
    "jsonb_object",
    "json_object",
    "json_strip_nulls",
    "jsonb_agg_strict",
    "array_to_tsvector",
    "any_value",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_substr",
    "string_to_table",
    "trim_array",
    "gcd",
    "lcm",
    "factorial",
    "pi",
    "degrees",
    "radians",
    "sin",
    "cos",
    "tan",
    "cbrt",
    "pg_input_is_valid",
];

fn safe_function(name: &str) -> bool {
    let name = name.strip_prefix("pg_catalog.").unwrap_or(name);
    SAFE_FUNCTIONS.contains(&name)
}

/// Classify a message's SQL (one or more statements).
pub fn classify(sql: &str) -> Classified {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(p) => p,
        Err(_) => return Classified::unknown(sql),
    };
    let mut c = Classified {
        kind: StatementKind::Utility,
        fingerprint: pg_query::fingerprint(
            sql,
            pg_query::ParserOptions::DEFAULT,
            pg_query::FingerprintOptions::FULL_RELNAME,
        )
        .map(|f| f.value)
        .unwrap_or(0),
        read_only: true,
        statements: parsed.protobuf.stmts.len(),
        tables: parsed.tables().into(),
        functions: parsed.functions().into(),
        facts: Facts::default(),
        hints: hints::parse(sql).into(),
        effects: Vec::new(),
        begins_read_only: false,
        begins: false,
        begins_serializable: false,
        changes_catalog: false,
        needs_database_alone: None,
        parse_error: false,
        touches_session: false,
        copies_in: false,
        ends_transaction: false,
        commits_prepared: false,
    };
    let nodes: Vec<&NodeEnum> = parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_ref().and_then(|n| n.node.as_ref()))
        .collect();
    c.facts.catalog_candidate = true;
    c.copies_in = nodes
        .iter()
        .any(|n| matches!(n, NodeEnum::CopyStmt(copy) if copy.is_from));
    c.ends_transaction = nodes.iter().any(|n| match n {
        NodeEnum::TransactionStmt(t) => {
            let kind =
                TransactionStmtKind::try_from(t.kind).unwrap_or(TransactionStmtKind::Undefined);
            !t.chain
                && matches!(
                    kind,
                    TransactionStmtKind::TransStmtCommit | TransactionStmtKind::TransStmtRollback
                )
        }
        _ => false,
    });
    c.commits_prepared = nodes.iter().any(|n| {
        matches!(n, NodeEnum::TransactionStmt(t)
            if TransactionStmtKind::try_from(t.kind) == Ok(TransactionStmtKind::TransStmtCommitPrepared))
    });
    // (TRUNCATE and temporary tables change no fact another session's
    // routing depends on: no catalog fetch for them.)
    let temporary = |n: &NodeEnum| {
        matches!(n, NodeEnum::CreateStmt(t)
            if t.relation.as_ref().is_some_and(|r| r.relpersistence == "t"))
    };
    c.changes_catalog = nodes.iter().any(|n| {
        (is_ddl(n) && !matches!(n, NodeEnum::TruncateStmt(_)))
            || (matches!(
                n,
                NodeEnum::CreateStmt(_)
                    | NodeEnum::CreateTableAsStmt(_)
                    | NodeEnum::DoStmt(_)
                    | NodeEnum::CallStmt(_)
            ) && !temporary(n))
    });
    for (i, raw) in parsed.protobuf.stmts.iter().enumerate() {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let text = statement_text(sql, raw);
        let clean_before = c.facts.clean;
        let (kind, mut ro) = statement(node, text, &mut c);
        if i == 0 {
            c.kind = kind;
            // `BEGIN; <reads>; COMMIT` in one message is a read like any
            // other: the transaction starts and ends on the same node.
            ro |= c.begins && !c.begins_serializable && wrapped_in_commit(&nodes);
        }
        c.read_only &= ro;
        c.facts.catalog_candidate &= ro || c.facts.clean > clean_before;
    }
    if c.statements == 0 {
        // Empty query: answered with EmptyQueryResponse anywhere.
        c.kind = StatementKind::Select;
    }
    // libpg_query labels the relation of `COPY rel TO` with a DML context.
    let copied_out: Vec<String> = parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(
            |raw| match raw.stmt.as_ref().and_then(|n| n.node.as_ref()) {
                Some(NodeEnum::CopyStmt(copy)) if !copy.is_from => {
                    copy.relation.as_ref().map(|r| {
                        if r.schemaname.is_empty() {
                            r.relname.clone()
                        } else {
                            format!("{}.{}", r.schemaname, r.relname)
                        }
                    })
                }
                _ => None,
            },
        )
        .collect();
    let writes = parsed.tables.iter().any(|(t, ctx)| match ctx {
        Context::DDL => true,
        Context::DML => !copied_out.contains(t),
        _ => false,
    });
    // EXPLAIN without ANALYZE was judged by its walk alone: its tables are
    // planned, not written, and its built-in calls are not run.
    let only_planned =
        c.facts.explain_only && nodes.iter().all(|n| matches!(n, NodeEnum::ExplainStmt(_)));
    if writes && !only_planned {
        c.read_only = false;
        c.facts.catalog_candidate = false;
    }
    if !only_planned
        && !c
            .functions
            .iter()
            .all(|f| safe_function(&f.to_ascii_lowercase()))
    {
        c.read_only = false;
    }
    session_calls(&parsed, &mut c);
    c
}

/// Built-ins outside the read-only list that change no session state a later
/// client could observe (beyond what `DISCARD SEQUENCES` would clear, which is
/// what PostgreSQL's own poolers leave too).
const NO_SESSION_STATE: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_notify",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "gen_random_uuid",
    "random",
    "clock_timestamp",
    "timeofday",
];

/// Session-level advisory locks outlive the transaction on one connection.
const SESSION_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// `set_config(name, value, is_local)` is a SET: tracked when its arguments
/// are constants, the session pinned when they are computed. Other calls that
/// may change session state mark the statement `touches_session`.
fn session_calls(parsed: &pg_query::ParseResult, c: &mut Classified) {
    if matches!(c.kind, StatementKind::Call) || has_do_block(parsed) {
        c.touches_session = true;
    }
    for f in c.functions.iter() {
        let name = f.to_ascii_lowercase();
        let name = name.strip_prefix("pg_catalog.").unwrap_or(&name);
        if SESSION_LOCKS.contains(&name) {
            c.effects.push(SessionEffect::Pin(PIN_ADVISORY_LOCK));
        } else if name != "set_config" && !safe_function(name) && !NO_SESSION_STATE.contains(&name)
        {
            c.touches_session = true;
        }
    }
    for (node, _, _, _) in parsed.protobuf.nodes() {
        let NodeRef::FuncCall(call) = node else {
            continue;
        };
        let name: Vec<String> = call
            .funcname
            .iter()
            .filter_map(|n| const_string(Some(n)))
            .collect();
        if !matches!(name.as_slice(), [n] | [_, n] if n == "set_config") {
            continue;
        }
        match set_config_args(&call.args) {
            Some((_, _, true)) => {} // transaction-local: dies with it
            Some((name, value, false)) if serializable_default(&name, &value) => {
                c.effects
                    .push(SessionEffect::Pin("serializable default isolation"));
                c.effects.push(set_config_effect(name, value));
            }
            Some((name, value, false)) if read_write_request(&name, &value) => {
                c.effects
                    .push(SessionEffect::Pin("read-write transactions"));
                c.effects.push(set_config_effect(name, value));
            }
            Some((name, value, false)) => c.effects.push(set_config_effect(name, value)),
            None => c
                .effects
                .push(SessionEffect::Pin("set_config with computed arguments")),
        }
    }
}

/// `transaction_read_only` or `default_transaction_read_only` set to
/// anything but true: a standby refuses the first ("cannot set transaction
/// read-write mode during recovery") and cannot honour the second.
fn read_write_request(name: &str, value: &str) -> bool {
    let truthy = ["on", "true", "yes", "1"]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(value.trim()));
    (name == "transaction_read_only" || name == "default_transaction_read_only") && !truthy
}

fn serializable_default(name: &str, value: &str) -> bool {
    name == "default_transaction_isolation" && value.eq_ignore_ascii_case("serializable")
}

fn set_config_effect(name: String, value: String) -> SessionEffect {
    SessionEffect::Set {
        sql: format!(
            "SELECT pg_catalog.set_config('{}', '{}', false)",
            name.replace('\'', "''"),
            value.replace('\'', "''")
        ),
        name,
    }
}

fn has_do_block(parsed: &pg_query::ParseResult) -> bool {
    parsed.protobuf.stmts.iter().any(|raw| {
        matches!(
            raw.stmt.as_ref().and_then(|n| n.node.as_ref()),
            Some(NodeEnum::DoStmt(_))
        )
    })
}

/// Constant (name, value, is_local) arguments of a `set_config` call.
fn set_config_args(args: &[protobuf::Node]) -> Option<(String, String, bool)> {
    let [name, value, local] = args else {
        return None;
    };
    let exact = |n: &protobuf::Node| match n.node.as_ref() {
        Some(NodeEnum::AConst(a)) => match &a.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        _ => None,
    };
    let local = match local.node.as_ref() {
        Some(NodeEnum::AConst(a)) => match &a.val {
            Some(a_const::Val::Boolval(b)) => b.boolval,
            _ => return None,
        },
        _ => return None,
    };
    Some((exact(name)?.to_ascii_lowercase(), exact(value)?, local))
}

fn statement_text<'a>(sql: &'a str, raw: &protobuf::RawStmt) -> &'a str {
    let start = raw.stmt_location.max(0) as usize;
    let end = if raw.stmt_len > 0 {
        start + raw.stmt_len as usize
    } else {
        sql.len()
    };
    sql.get(start..end.min(sql.len())).unwrap_or(sql).trim()
}

/// Kind and read-only verdict of one statement; records session effects.
fn statement(node: &NodeEnum, text: &str, c: &mut Classified) -> (StatementKind, bool) {
    use StatementKind as K;
    match node {
        NodeEnum::SelectStmt(_) => (K::Select, walked(node, c)),
        NodeEnum::InsertStmt(_) => (K::Insert, walked(node, c)),
        NodeEnum::UpdateStmt(_) => (K::Update, walked(node, c)),
        NodeEnum::DeleteStmt(_) => (K::Delete, walked(node, c)),
        NodeEnum::MergeStmt(_) => (K::Merge, walked(node, c)),
        NodeEnum::UnlistenStmt(_) => (K::Utility, true),
        NodeEnum::VariableShowStmt(v) => {
            let name = v.name.to_ascii_lowercase();
            if let Some(own) = name.strip_prefix(OWN_PREFIX) {
                c.effects.push(SessionEffect::Own(OwnSetting::Show {
                    name: own.to_owned(),
                }));
            }
            (K::Show, true)
        }
        NodeEnum::TransactionStmt(t) => (K::Transaction, transaction(t, c)),
        NodeEnum::VariableSetStmt(v) => (K::Session, variable_set(v, text, c)),
        NodeEnum::DiscardStmt(d) => {
            // DISCARD ALL is answered for the client alone (its statements and
            // settings); PLANS/SEQUENCES/TEMP are harmless on any connection.
            if d.target == protobuf::DiscardMode::DiscardAll as i32 {
                c.effects.push(SessionEffect::DiscardAll);
            }
            (K::Session, true)
        }
        NodeEnum::ExplainStmt(e) => (K::Explain, explain(e, text, c)),
        NodeEnum::CopyStmt(copy) => {
            let ro = !copy.is_from
                && !copy.is_program
                && copy.filename.is_empty()
                && inner(&copy.query, text, c).unwrap_or(true);
            if let Some(r) = copy.relation.as_ref().filter(|_| ro) {
                // Its persistence is the catalog's to judge (UNLOGGED).
                c.facts.relations.push(Name {
                    schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()),
                    name: r.relname.clone(),
                });
            }
            (K::Copy, ro)
        }
        NodeEnum::CallStmt(_) => (K::Call, false),
        NodeEnum::DeclareCursorStmt(d) => {
            // WITH HOLD cursors outlive the transaction, on one connection.
            const CURSOR_OPT_HOLD: i32 = 0x0020;
            if d.options & CURSOR_OPT_HOLD != 0 {
                c.effects.push(SessionEffect::Pin("WITH HOLD cursor"));
                return (K::Utility, false);
            }
            (K::Utility, inner(&d.query, text, c).unwrap_or(false))
        }
        NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => (K::Utility, true),
        NodeEnum::PrepareStmt(_) | NodeEnum::ExecuteStmt(_) => {
            c.effects.push(SessionEffect::Pin(PIN_PREPARE));
            (K::Utility, false)
        }
        NodeEnum::DeallocateStmt(d) => {
            let name = (!d.isall && !d.name.is_empty()).then(|| d.name.clone());
            c.effects.push(SessionEffect::Deallocate(name));
            (K::Utility, false)
        }
        NodeEnum::ListenStmt(_) => {
            c.effects.push(SessionEffect::Pin("LISTEN"));
            (K::Utility, false)
        }
        NodeEnum::CreateStmt(s) => {
            temp_table(s.relation.as_ref(), c);
            (K::Ddl, false)
        }
        NodeEnum::CreateTableAsStmt(s) => {
            temp_table(s.into.as_ref().and_then(|i| i.rel.as_ref()), c);
            (K::Ddl, false)
        }
        NodeEnum::DropdbStmt(d) => {
            c.needs_database_alone = Some(d.dbname.clone());
            (K::Ddl, false)
        }
        NodeEnum::CreatedbStmt(d) => {
            let template = option_string(&d.options, "template");
            c.needs_database_alone = Some(template.unwrap_or_else(|| "template1".into()));
            (K::Ddl, false)
        }
        NodeEnum::RenameStmt(r)
            if r.rename_type() == pg_query::protobuf::ObjectType::ObjectDatabase =>
        {
            c.needs_database_alone = Some(r.subname.clone());
            (K::Ddl, false)
        }
        NodeEnum::AlterDatabaseStmt(d) if option_string(&d.options, "tablespace").is_some() => {
            c.needs_database_alone = Some(d.dbname.clone());
            (K::Ddl, false)
        }
        n if is_ddl(n) => (K::Ddl, false),
        _ => (K::Utility, false),
    }
}

/// Walk a SELECT or DML statement; read-only when nothing in it writes,
/// every node kind is known and every call and operator is safe as far as
/// the text shows (the catalog judges the rest per database).
fn walked(node: &NodeEnum, c: &mut Classified) -> bool {
    let w = walk(node);
    let calls_safe = w
        .calls
        .iter()
        .all(|f| safe_function(&f.display().to_ascii_lowercase()));
    let ops_safe = w.operators.iter().all(builtin_operator);
    let clean = w.writes.is_none() && w.unknown.is_none();
    if clean {
        c.facts.clean += 1;
        record(w, c);
    }
    clean && calls_safe && ops_safe
}

fn record(w: Walk, c: &mut Classified) {
    c.facts.calls.extend(w.calls);
    c.facts.relations.extend(w.relations);
    c.facts.operators.extend(w.operators);
    c.facts.types.extend(w.types);
    c.facts.attributes.extend(w.attributes);
}

/// `EXPLAIN` without `ANALYZE` runs nothing: any statement the walker knows
/// may be explained on a standby (unless it touches relations a standby
/// refuses, which the catalog judges). With `ANALYZE` it runs the statement.
fn explain(e: &protobuf::ExplainStmt, text: &str, c: &mut Classified) -> bool {
    let analyze = e.options.iter().any(|o| match o.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if d.defname == "analyze" => {
            d.arg.is_none() || const_truthy(d.arg.as_deref()) != Some(false)
        }
        _ => false,
    });
    let Some(node) = e.query.as_ref().and_then(|q| q.node.as_ref()) else {
        return false;
    };
    if analyze {
        return statement(node, text, c).1;
    }
    if !matches!(
        node,
        NodeEnum::SelectStmt(_)
            | NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_)
    ) {
        return false;
    }
    let mut w = walk(node);
    if w.unknown.is_some() || !w.operators.iter().all(builtin_operator) {
        return false;
    }
    // Built-ins are only planned; user functions are judged (a function
    // declared IMMUTABLE is run by the planner).
    w.calls.retain(|f| !builtin_name(f));
    if !w.calls.is_empty() {
        return false;
    }
    c.facts.explain_only = true;
    record(w, c);
    true
}

/// A function name known to be PostgreSQL's own (safe or not).
fn builtin_name(f: &Name) -> bool {
    let name = f.name.to_ascii_lowercase();
    let schema_ok = f.schema.as_deref().is_none_or(|s| s == "pg_catalog");
    schema_ok
        && (SAFE_FUNCTIONS.contains(&name.as_str())
            || NO_SESSION_STATE.contains(&name.as_str())
            || SESSION_LOCKS.contains(&name.as_str())
            || name == "set_config")
}

/// Operators of PostgreSQL's built-in types. A user-defined operator (any
/// other name, or one qualified with another schema) runs a user function:
/// not read-only.
fn builtin_operator(op: &Name) -> bool {
    const BUILTIN: &[&str] = &[
        "=",
        "<>",
        "!=",
        "<",
        ">",
        "<=",
        ">=",
        "+",
        "-",
        "*",
        "/",
        "%",
        "^",
        "||",
        "~~",
        "!~~",
        "~~*",
        "!~~*",
        "~",
        "~*",
        "!~",
        "!~*",
        "@>",
        "<@",
        "&&",
        "?",
        "?|",
        "?&",
        "->",
        "->>",
        "#>",
        "#>>",
        "#-",
        "@?",
        "@@",
        "@@@",
        "|/",
        "||/",
        "@",
        "&",
        "|",
        "#",
        "<<",
        ">>",
        "-|-",
        "&<",
        "&>",
        "<<|",
        "|>>",
        "&<|",
        "|&>",
        "<->",
        "<#>",
        "<<=",
        ">>=",
        "!!",
        "<^",
        ">^",
        "?#",
        "?-",
        "?|",
        "?-|",
        "?||",
        "##",
        "<<@",
        "@>>",
        // BETWEEN is spelled as an operator name; it expands to <= and >=.
        "BETWEEN",
        "NOT BETWEEN",
        "BETWEEN SYMMETRIC",
        "NOT BETWEEN SYMMETRIC",
    ];
    op.schema.as_deref().is_none_or(|s| s == "pg_catalog") && BUILTIN.contains(&op.name.as_str())
}

/// Whether the message is `BEGIN; …; COMMIT` with no other transaction
/// control in between.
fn wrapped_in_commit(nodes: &[&NodeEnum]) -> bool {
    let Some((NodeEnum::TransactionStmt(last), middle)) = nodes
        .get(1..)
        .and_then(|rest| rest.split_last())
        .map(|(l, m)| (*l, m))
    else {
        return false;
    };
    let commit = matches!(
        TransactionStmtKind::try_from(last.kind),
        Ok(TransactionStmtKind::TransStmtCommit)
    );
    commit
        && !last.chain
        && middle
            .iter()
            .all(|n| !matches!(n, NodeEnum::TransactionStmt(_)))
}

/// Read-only verdict of a statement nested in another (COPY, DECLARE).
fn inner(query: &Option<Box<protobuf::Node>>, text: &str, c: &mut Classified) -> Option<bool> {
    let node = query.as_ref().and_then(|q| q.node.as_ref())?;
    Some(statement(node, text, c).1)
}

fn temp_table(rel: Option<&protobuf::RangeVar>, c: &mut Classified) {
    if let Some(r) = rel.filter(|r| r.relpersistence == "t") {
        c.effects.push(SessionEffect::TempTable(r.relname.clone()));
    }
}

fn is_ddl(n: &NodeEnum) -> bool {
    matches!(
        n,
        NodeEnum::AlterTableStmt(_)
            | NodeEnum::DropStmt(_)
            | NodeEnum::IndexStmt(_)
            | NodeEnum::CreateSchemaStmt(_)
            | NodeEnum::ViewStmt(_)
            | NodeEnum::CreateFunctionStmt(_)
            | NodeEnum::AlterFunctionStmt(_)
            | NodeEnum::CreateSeqStmt(_)
            | NodeEnum::AlterSeqStmt(_)
            | NodeEnum::RenameStmt(_)
            | NodeEnum::CommentStmt(_)
            | NodeEnum::GrantStmt(_)
            | NodeEnum::GrantRoleStmt(_)
            | NodeEnum::CreateEnumStmt(_)
            | NodeEnum::AlterEnumStmt(_)
            | NodeEnum::CompositeTypeStmt(_)
            | NodeEnum::CreateExtensionStmt(_)
            | NodeEnum::TruncateStmt(_)
            | NodeEnum::CreatedbStmt(_)
            | NodeEnum::CreateRoleStmt(_)
            | NodeEnum::AlterRoleStmt(_)
            | NodeEnum::DropRoleStmt(_)
            | NodeEnum::CreateTrigStmt(_)
            | NodeEnum::RuleStmt(_)
            | NodeEnum::CreateDomainStmt(_)
            | NodeEnum::DefineStmt(_)
            | NodeEnum::AlterDomainStmt(_)
            | NodeEnum::AlterObjectSchemaStmt(_)
            | NodeEnum::AlterExtensionStmt(_)
            | NodeEnum::AlterExtensionContentsStmt(_)
            | NodeEnum::CreateCastStmt(_)
            | NodeEnum::AlterOperatorStmt(_)
            | NodeEnum::CreateForeignTableStmt(_)
            | NodeEnum::AlterOwnerStmt(_)
            | NodeEnum::CreatePolicyStmt(_)
            | NodeEnum::AlterPolicyStmt(_)
            | NodeEnum::CreateOpClassStmt(_)
            | NodeEnum::AlterTypeStmt(_)
    )
}

fn const_truthy(node: Option<&protobuf::Node>) -> Option<bool> {
    match node.and_then(|n| n.node.as_ref()) {
        Some(NodeEnum::AConst(a)) => match &a.val {
            Some(a_const::Val::Ival(i)) => Some(i.ival != 0),
            Some(a_const::Val::Boolval(b)) => Some(b.boolval),
            _ => None,
        },
        _ => None,
    }
}

fn const_string(node: Option<&protobuf::Node>) -> Option<String> {
    match node.and_then(|n| n.node.as_ref()) {
        Some(NodeEnum::AConst(a)) => match &a.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.to_ascii_lowercase()),
            _ => None,
        },
        Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
        _ => None,
    }
}

/// The value of option `name` in a DDL option list, as written (names are
/// case-folded by the parser already).
fn option_string(options: &[protobuf::Node], name: &str) -> Option<String> {
    options.iter().find_map(|o| match o.node.as_ref() {
        Some(NodeEnum::DefElem(d)) if d.defname == name => {
            match d.arg.as_deref().and_then(|n| n.node.as_ref()) {
                Some(NodeEnum::AConst(a)) => match &a.val {
                    Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
                    _ => None,
                },
                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                _ => None,
            }
        }
        _ => None,
    })
}

/// BEGIN READ ONLY may run on a standby; a serializable transaction may not
/// (hot standbys refuse SERIALIZABLE). COMMIT/ROLLBACK follow their
/// transaction (pinned by the guardrails).
fn transaction(t: &protobuf::TransactionStmt, c: &mut Classified) -> bool {
    let kind = TransactionStmtKind::try_from(t.kind).unwrap_or(TransactionStmtKind::Undefined);
    match kind {
        TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => {
            c.begins = true;
            let mut read_only = false;
            let mut serializable = false;
            for opt in &t.options {
                if let Some(NodeEnum::DefElem(d)) = opt.node.as_ref() {
                    let arg = d.arg.as_deref();
                    match d.defname.as_str() {
                        "transaction_read_only" => {
                            read_only = const_truthy(arg) == Some(true);
                            // BEGIN READ WRITE: a standby refuses it.
                            serializable |= const_truthy(arg) == Some(false);
                        }
                        "transaction_isolation" => {
                            serializable = const_string(arg).as_deref() == Some("serializable")
                        }
                        _ => {}
                    }
                }
            }
            c.begins_read_only = read_only && !serializable;
            c.begins_serializable = serializable;
            c.begins_read_only
        }
        TransactionStmtKind::TransStmtPrepare
        | TransactionStmtKind::TransStmtCommitPrepared
        | TransactionStmtKind::TransStmtRollbackPrepared => false,
        _ => true,
    }
}

/// `SET` changes the session (tracked and replayed on every connection the
/// session uses); a standby accepts it, so it is read-only by itself.
/// Settings a standby would refuse for later transactions pin to the primary.
fn variable_set(v: &protobuf::VariableSetStmt, text: &str, c: &mut Classified) -> bool {
    let name = v.name.to_ascii_lowercase();
    if let Some(own) = name.strip_prefix(OWN_PREFIX) {
        let kind = VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined);
        let value = match kind {
            VariableSetKind::VarSetValue => Some(
                v.args
                    .first()
                    .and_then(|a| const_string(Some(a)))
                    .unwrap_or_default(),
            ),
            _ => None,
        };
        c.effects.push(SessionEffect::Own(OwnSetting::Set {
            name: own.to_owned(),
            value,
        }));
        return true;
    }
    if v.is_local {
        return true;
    }
    match VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined) {
        VariableSetKind::VarResetAll => c.effects.push(SessionEffect::ResetAll),
        VariableSetKind::VarReset | VariableSetKind::VarSetDefault => {
            c.effects.push(SessionEffect::Reset { name })
        }
        VariableSetKind::VarSetValue | VariableSetKind::VarSetCurrent => {
            if name == "default_transaction_isolation"
                && v.args
                    .first()
                    .and_then(|a| const_string(Some(a)))
                    .as_deref()
                    == Some("serializable")
            {
                // A standby refuses serializable transactions: the session
                // keeps a primary connection (this SET runs there too).
                c.effects
                    .push(SessionEffect::Pin("serializable default isolation"));
                c.effects.push(SessionEffect::Set {
                    name,
                    sql: text.to_owned(),
                });
                return false;
            }
            // Read-write transactions asked for: the primary, for the rest
            // of the session (a standby refuses or ignores the setting).
            let value = v.args.first().and_then(|a| const_string(Some(a)));
            let read_write = read_write_request(&name, value.as_deref().unwrap_or("off"));
            if read_write {
                c.effects
                    .push(SessionEffect::Pin("read-write transactions"));
            }
            c.effects.push(SessionEffect::Set {
                name,
                sql: text.to_owned(),
            });
            if read_write {
                return false;
            }
        }
        // SET TRANSACTION / SET SESSION CHARACTERISTICS and friends.
        VariableSetKind::VarSetMulti => {
            if name == "session characteristics" {
                c.effects
                    .push(SessionEffect::Pin("SET SESSION CHARACTERISTICS"));
                return false;
            }
            // SET TRANSACTION (READ WRITE, SERIALIZABLE, SNAPSHOT …): the
            // primary, where every mode works.
            if name == "transaction" {
                return false;
            }
        }
        VariableSetKind::Undefined => return false,
    }
    true
}

/// A bounded cache of verdicts by SQL text. Statements with session effects
/// are cached by exact text; the rest also by text with literals masked, so
/// `... WHERE id = 1` and `... WHERE id = 2` share one parse. Every
/// statement of every session looks here, so the maps are split in shards
/// (workers rarely meet on one lock) and keyed with a fast hash.
pub struct Classifier {
    exact: Shards<Box<str>>,
    masked: Shards<String>,
}

const SHARDS: usize = 16;

type Map<K> = HashMap<K, Arc<Classified>, rustc_hash::FxBuildHasher>;

struct Shards<K> {
    maps: [Mutex<Map<K>>; SHARDS],
    /// Entries per shard before it is emptied.
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + std::borrow::Borrow<str>> Shards<K> {
    fn new(capacity: usize) -> Self {
        Self {
            maps: std::array::from_fn(|_| Mutex::default()),
            capacity: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Map<K>> {
        use std::hash::BuildHasher;
        let h = rustc_hash::FxBuildHasher.hash_one(key);
        // Middle bits: the map inside uses the top ones for its own tags.
        &self.maps[(h >> 40) as usize % SHARDS]
    }

    fn get(&self, key: &str) -> Option<Arc<Classified>> {
        lock(self.shard(key)).get(key).cloned()
    }

    fn insert(&self, key: K, value: Arc<Classified>) {
        let mut map = lock(self.shard(key.borrow()));
        if map.len() >= self.capacity {
            // Crude but bounded: ORMs' working sets are far smaller than this.
            map.clear();
        }
        map.insert(key, value);
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new(20_000)
    }
}

thread_local! {
    /// The masked text of the statement being looked up: one buffer per
    /// thread instead of an allocation per statement.
    static MASKED: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Classifier {
    pub fn new(capacity: usize) -> Self {
        Self {
            exact: Shards::new(capacity),
            masked: Shards::new(capacity),
        }
    }

    pub fn classify(&self, sql: &str) -> Arc<Classified> {
        if let Some(c) = self.exact.get(sql) {
            return c;
        }
        let hit = MASKED.with(|buf| {
            let mut buf = buf.borrow_mut();
            let masked = mask_literals_into(sql, &mut buf);
            // (A text the pass gave up on is never looked up: the buffer
            // holds only part of it.)
            let hit = if !masked {
                Err(None)
            } else {
                match self.masked.get(&buf) {
                    Some(c) => Ok(c),
                    None => Err(Some(buf.clone())),
                }
            };
            // A huge statement's buffer is not kept for the thread's life.
            if buf.capacity() > 64 * 1024 {
                *buf = String::new();
            }
            hit
        });
        let masked = match hit {
            Ok(c) => return c,
            Err(masked) => masked,
        };
        let c = Arc::new(classify(sql));
        let maskable = c.effects.is_empty() && c.needs_database_alone.is_none();
        match masked {
            Some(m) if maskable => self.masked.insert(m, c.clone()),
            _ => self.exact.insert(sql.into(), c.clone()),
        }
        c
    }
}

/// The text with numeric and string literals replaced by `?`; `None` when
/// the text has a construct this cheap pass does not understand (then the
/// caller caches by exact text instead). Comments are kept: they carry hints.
pub fn mask_literals(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    mask_literals_into(sql, &mut out).then_some(out)
}

/// [`mask_literals`] into `out` (cleared first); `false` where it gives up.
fn mask_literals_into(sql: &str, out: &mut String) -> bool {
    out.clear();
    mask(sql, out).is_some()
}

fn mask(sql: &str, out: &mut String) -> Option<()> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut last = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // '...' with '' escapes; E'...' backslash escapes: give up.
                if i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e') {
                    return None;
                }
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return None,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                out.push_str(&sql[last..i]);
                out.push('?');
                i = j + 1;
                last = i;
            }
            b'"' => {
                let j = sql[i + 1..].find('"')? + i + 1;
                i = j + 1;
            }
            b'$' if i + 1 < b.len()
                && !b[i + 1].is_ascii_digit()
                && (i == 0 || !ident(b[i - 1])) =>
            {
                // Dollar quoting: leave it to the exact-text cache.
                return None;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map(|n| i + n + 1).unwrap_or(b.len());
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = sql[i..].find("*/").map(|n| i + n + 2)?;
            }
            c if c.is_ascii_digit() && (i == 0 || !ident(b[i - 1])) => {
                let mut j = i;
                while j < b.len()
                    && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'e' || b[j] == b'E')
                {
                    j += 1;
                }
                out.push_str(&sql[last..i]);
                out.push('?');
                i = j;
                last = i;
            }
            c if ident(c) => {
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[last..]);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ro(sql: &str) -> bool {
        classify(sql).read_only
    }

    /// Nothing of signalbox's own may follow these on a connection: the
    /// server reads the client's COPY data next (and unparsed text might
    /// be such a COPY).
    #[test]
    fn copy_from_stdin_is_flagged() {
        for sql in [
            "COPY t FROM STDIN",
            "copy t (a, b) from stdin with (format csv)",
            "INSERT INTO t VALUES (1); COPY t FROM STDIN",
            "this is not sql",
        ] {
            assert!(classify(sql).copies_in, "{sql}");
        }
        for sql in [
            "COPY t TO STDOUT",
            "INSERT INTO t VALUES (1)",
            "SELECT 'COPY t FROM STDIN'",
        ] {
            assert!(!classify(sql).copies_in, "{sql}");
        }
    }

    #[test]
    fn plain_reads_are_read_only() {
        for sql in [
            "SELECT 1",
            "select * from users where id = $1",
            "VALUES (1), (2)",
            "TABLE users",
            "SHOW search_path",
            "EXPLAIN SELECT * FROM t",
            "COPY users TO STDOUT",
            "COPY (SELECT 1) TO STDOUT",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "SELECT count(*), lower(name) FROM users GROUP BY 2",
            "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "SELECT 1; SELECT 2",
            "",
        ] {
            assert!(ro(sql), "{sql} should be read-only");
        }
    }

    #[test]
    fn writes_and_standby_refusals_are_not() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR SHARE",
            "SELECT * FROM (SELECT * FROM t FOR NO KEY UPDATE) s",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "WITH a AS (SELECT 1), b AS (WITH c AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT * FROM c) SELECT * FROM b",
            "SELECT * INTO t2 FROM t",
            "SELECT nextval('s')",
            "SELECT setval('s', 1)",
            "SELECT pg_advisory_lock(1)",
            "SELECT txid_current()",
            "SELECT pg_current_wal_lsn()",
            "SELECT my_function(1)",
            "SELECT public.lower(name) FROM t",
            "COPY t FROM STDIN",
            "COPY t TO STDOUT; DELETE FROM t",
            "CREATE TABLE t (a int)",
            "BEGIN",
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
            "LISTEN chan",
            "CALL proc()",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELECT 1; INSERT INTO t VALUES (1)",
            "EXPLAIN ANALYZE DELETE FROM t",
            "LOCK TABLE t",
            "VACUUM t",
            "this is not sql",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(!ro(sql), "{sql} should not be read-only");
        }
    }

    #[test]
    fn kinds_and_effects() {
        let c = classify("SET search_path = app, public");
        assert_eq!(c.kind, StatementKind::Session);
        assert!(c.read_only);
        assert_eq!(
            c.effects,
            vec![SessionEffect::Set {
                name: "search_path".into(),
                sql: "SET search_path = app, public".into()
            }]
        );
        assert!(classify("SET LOCAL search_path = x").effects.is_empty());
        assert_eq!(classify("RESET ALL").effects, vec![SessionEffect::ResetAll]);
        assert_eq!(
            classify("DISCARD ALL").effects,
            vec![SessionEffect::DiscardAll]
        );
        assert!(classify("DISCARD PLANS").effects.is_empty());
        assert_eq!(
            classify("DEALLOCATE ALL").effects,
            vec![SessionEffect::Deallocate(None)]
        );
        assert_eq!(
            classify("DEALLOCATE s1").effects,
            vec![SessionEffect::Deallocate(Some("s1".into()))]
        );
        // set_config is a SET when its arguments are constants ...
        assert_eq!(
            classify("SELECT set_config('Statement_Timeout', '1', false)").effects,
            vec![SessionEffect::Set {
                name: "statement_timeout".into(),
                sql: "SELECT pg_catalog.set_config('statement_timeout', '1', false)".into()
            }]
        );
        assert!(classify("SELECT set_config('work_mem', '7MB', true)")
            .effects
            .is_empty());
        // ... and pins the session when they are computed.
        assert!(matches!(
            classify("SELECT set_config('role', $1, false)").effects[..],
            [SessionEffect::Pin(_)]
        ));
        assert!(matches!(
            classify("SELECT pg_advisory_lock(1)").effects[..],
            [SessionEffect::Pin(_)]
        ));
        // Calls whose effects on the session cannot be seen.
        assert!(classify("SELECT my_function()").touches_session);
        assert!(classify("CALL my_procedure()").touches_session);
        assert!(classify("DO $$ BEGIN PERFORM 1; END $$").touches_session);
        assert!(!classify("SELECT nextval('s'), now()").touches_session);
        assert!(!classify("INSERT INTO t VALUES (1)").touches_session);
        // A batch that runs no statement (Close, Describe, Sync) touches nothing.
        assert!(!Classified::nothing().touches_session);
        assert!(Classified::nothing().read_only);
        assert_eq!(
            classify("RESET search_path").effects,
            vec![SessionEffect::Reset {
                name: "search_path".into()
            }]
        );
        assert_eq!(
            classify("CREATE TEMP TABLE tt (a int)").effects,
            vec![SessionEffect::TempTable("tt".into())]
        );
        assert!(matches!(
            classify("LISTEN x").effects[0],
            SessionEffect::Pin(_)
        ));
        assert!(matches!(
            classify("SET default_transaction_isolation = 'serializable'").effects[0],
            SessionEffect::Pin(_)
        ));
        assert_eq!(
            classify("DROP DATABASE shop")
                .needs_database_alone
                .as_deref(),
            Some("shop")
        );
        for (sql, db) in [
            ("CREATE DATABASE copy", "template1"),
            ("CREATE DATABASE copy TEMPLATE shop", "shop"),
            (
                "CREATE DATABASE copy WITH TEMPLATE = 'shop' OWNER x",
                "shop",
            ),
            ("ALTER DATABASE shop RENAME TO store", "shop"),
            ("ALTER DATABASE shop SET TABLESPACE fast", "shop"),
        ] {
            assert_eq!(
                classify(sql).needs_database_alone.as_deref(),
                Some(db),
                "{sql}"
            );
        }
        assert_eq!(
            classify("ALTER DATABASE shop SET work_mem = '1MB'").needs_database_alone,
            None
        );
        let b = classify("BEGIN READ ONLY");
        assert!(b.begins && b.begins_read_only);
        let m = classify("SET a = 1; SET b = 2");
        assert_eq!(m.effects.len(), 2);
        assert_eq!(classify("UPDATE t SET a = 1").kind, StatementKind::Update);
        assert_eq!(
            classify("/* signalbox: route=primary */ SELECT 1").hints[0].1,
            "primary"
        );
    }

    #[test]
    fn masking() {
        assert_eq!(
            mask_literals("SELECT abalance FROM pgbench_accounts WHERE aid = 12345").unwrap(),
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?"
        );
        assert_eq!(
            mask_literals("SELECT 'it''s', t1.c2 FROM t1 WHERE x = -1.5e3 /* signalbox: a=1 */")
                .unwrap(),
            "SELECT ?, t1.c2 FROM t1 WHERE x = -? /* signalbox: a=1 */"
        );
        assert_eq!(
            mask_literals("SELECT $1, \"a'b\" FROM t").unwrap(),
            "SELECT $1, \"a'b\" FROM t"
        );
        assert!(mask_literals("SELECT $$x$$").is_none());
        assert!(mask_literals("SELECT E'\\n'").is_none());
        let c = Classifier::new(10);
        let a = c.classify("SELECT * FROM t WHERE id = 1");
        let b = c.classify("SELECT * FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&a, &b));
        // Function names are not literals: a write function never shares a read's verdict.
        assert!(!c.classify("SELECT nextval('s')").read_only);
    }

    #[test]
    fn settings_that_need_the_primary_are_not_reads() {
        for sql in [
            "SET default_transaction_isolation = 'serializable'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET transaction_read_only = off",
            "SELECT set_config('default_transaction_isolation', 'serializable', false)",
        ] {
            assert!(!classify(sql).read_only, "{sql}");
        }
        let c =
            classify("SELECT set_config('default_transaction_isolation', 'serializable', false)");
        assert!(c.effects.iter().any(|e| matches!(e, SessionEffect::Pin(_))));
        assert!(c
            .effects
            .iter()
            .any(|e| matches!(e, SessionEffect::Set { .. })));
        assert!(classify("SET default_transaction_isolation = 'read committed'").read_only);
        assert!(classify("SET work_mem = '64MB'").read_only);
        // Read-write transactions: the session stays on the primary.
        for sql in [
            "SET transaction_read_only = off",
            "SET default_transaction_read_only = false",
            "SELECT set_config('transaction_read_only', 'off', false)",
        ] {
            let c = classify(sql);
            assert!(!c.read_only, "{sql}");
            let pinned = c.effects.iter().any(|e| matches!(e, SessionEffect::Pin(_)));
            assert!(pinned, "{sql}");
        }
        let c = classify("SET default_transaction_read_only = on");
        assert!(!c.effects.iter().any(|e| matches!(e, SessionEffect::Pin(_))));
    }

    #[test]
    fn safe_statements_are_offloaded() {
        for sql in [
            "EXPLAIN SELECT * FROM t",
            "EXPLAIN INSERT INTO t VALUES (nextval('s'))",
            "EXPLAIN (COSTS OFF) UPDATE t SET x = 1",
            "EXPLAIN ANALYZE SELECT * FROM t",
            "BEGIN; SELECT * FROM t; SELECT count(*) FROM u; COMMIT;",
            "START TRANSACTION; SELECT 1; END",
            "UNLISTEN *",
            "UNLISTEN chan",
            "SELECT jsonb_path_query_array('{}'::jsonb, '$.a')",
            "SELECT enum_range(NULL::mood)",
            "SELECT x FROM t WHERE y BETWEEN 1 AND 2",
        ] {
            assert!(classify(sql).read_only, "{sql}");
        }
        for sql in [
            "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
            "EXPLAIN ANALYZE SELECT nextval('s')",
            "EXPLAIN SELECT my_fn()",
            "BEGIN; SELECT 1; UPDATE t SET x = 1; COMMIT;",
            "BEGIN; SELECT 1;",
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1; COMMIT;",
            "BEGIN; SELECT 1; COMMIT; BEGIN; SELECT 2;",
            "BEGIN; SELECT 1; COMMIT AND CHAIN;",
            "SELECT a OPERATOR(public.###) b FROM t",
            "SELECT a ### b FROM t",
            "SELECT xmlelement(name a, 'b')",
            "BEGIN READ WRITE; SELECT 1; COMMIT;",
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1; COMMIT;",
            "SET TRANSACTION READ WRITE",
            "SELECT nextval('s'); EXPLAIN SELECT 1",
        ] {
            assert!(!classify(sql).read_only, "{sql}");
        }
    }

    /// Random read statements built from a small grammar; `writer` (if any)
    /// is planted at one random leaf of one random expression slot.
    struct Gen {
        seed: u64,
    }

    impl Gen {
        fn next(&mut self, n: usize) -> usize {
            self.seed = self
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.seed >> 33) as usize) % n
        }

        /// An expression; when `plant` is set, exactly one leaf is `writer`.
        fn expr(&mut self, depth: u32, plant: Option<&str>) -> String {
            const LEAVES: &[&str] = &["1", "'a'", "x", "t.y", "$1", "NULL", "true", "2.5"];
            if depth == 0 || self.next(3) == 0 {
                return match plant {
                    Some(w) => w.to_owned(),
                    None => LEAVES[self.next(LEAVES.len())].to_owned(),
                };
            }
            const SHAPES: &[&str] = &[
                "({a} + {b})",
                "({a} || {b})",
                "lower({a})",
                "coalesce({a}, {b})",
                "CASE WHEN {a} THEN {b} ELSE 0 END",
                "ARRAY[{a}, {b}]",
                "ROW({a}, {b})",
                "({a})::text",
                "({a} IS NULL)",
                "({a} IN ({b}, 1))",
                "(SELECT {a})",
                "EXISTS (SELECT {a} FROM u WHERE {b})",
                "greatest({a}, {b})",
                "({a} BETWEEN {b} AND 3)",
                "(NOT ({a} = {b}))",
                "(ARRAY[{a}])[{b}]",
                "({a} LIKE {b})",
                "({a} = ANY (ARRAY[{b}]))",
                "(SELECT max({a}) FROM u GROUP BY {b})",
                "(SELECT count(*) FILTER (WHERE {a}) FROM u WHERE {b})",
                "(SELECT sum({a}) OVER (PARTITION BY {b}) FROM u LIMIT 1)",
                "(SELECT string_agg({a}, ',' ORDER BY {b}) FROM u)",
                "({a} COLLATE \"C\")",
                "(SELECT v FROM (VALUES ({a}), ({b})) s(v) LIMIT 1)",
                "(SELECT g FROM generate_series(1, {a}) g WHERE {b} LIMIT 1)",
                "(WITH c AS (SELECT {a} AS v) SELECT v FROM c WHERE {b})",
                "(SELECT 1 UNION ALL SELECT {a} LIMIT {b})",
                "NULLIF({a}, {b})",
                "({a} IS DISTINCT FROM {b})",
            ];
            let shape = SHAPES[self.next(SHAPES.len())];
            let (a_plant, b_plant) = match (plant, self.next(2)) {
                (Some(w), 0) => (Some(w), None),
                (Some(w), _) => (None, Some(w)),
                (None, _) => (None, None),
            };
            // A shape without a B slot takes the plant in A.
            let (a_plant, b_plant) = if shape.contains("{b}") {
                (a_plant, b_plant)
            } else {
                (a_plant.or(b_plant), None)
            };
            let a = self.expr(depth - 1, a_plant);
            let b = self.expr(depth - 1, b_plant);
            shape.replace("{a}", &a).replace("{b}", &b)
        }

        fn statement(&mut self, writer: Option<&str>) -> String {
            const TEMPLATES: &[&str] = &[
                "SELECT {}, {} FROM t WHERE {}",
                "SELECT x FROM t GROUP BY {} HAVING {} ORDER BY {} LIMIT {} OFFSET {}",
                "VALUES ({}, {}), ({}, 1)",
                "WITH c AS (SELECT {} AS a) SELECT a FROM c WHERE {}",
                "SELECT * FROM t JOIN u ON {} LEFT JOIN v ON {}",
                "SELECT {} UNION ALL SELECT {} EXCEPT SELECT {}",
                "SELECT * FROM (SELECT {}) s, LATERAL (SELECT {}) l",
                "SELECT * FROM t WHERE x IN (SELECT {} FROM u WHERE {})",
                "SELECT count(*) FILTER (WHERE {}) FROM t",
                "SELECT sum(x) OVER (PARTITION BY {} ORDER BY {}) FROM t",
                "SELECT * FROM generate_series(1, {}) g WHERE {}",
                "SELECT DISTINCT ON ({}) x FROM t ORDER BY {}",
                "SELECT x FROM t WINDOW w AS (ORDER BY {}) ORDER BY {}",
                "EXPLAIN ANALYZE SELECT {} FROM t WHERE {}",
                "COPY (SELECT {} FROM t WHERE {}) TO STDOUT",
                "DECLARE c CURSOR FOR SELECT {} FROM t WHERE {}",
                "SELECT * FROM t TABLESAMPLE bernoulli ({}) WHERE {}",
            ];
            let template = TEMPLATES[self.next(TEMPLATES.len())];
            let slots = template.matches("{}").count();
            let planted = self.next(slots);
            let mut out = String::new();
            for (i, part) in template.split("{}").enumerate() {
                out.push_str(part);
                if i < slots {
                    let plant = writer.filter(|_| i == planted);
                    let depth = 1 + self.next(4) as u32;
                    out.push_str(&self.expr(depth, plant));
                }
            }
            out
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// A writing call planted anywhere in a read makes it primary-only;
        /// the same statement without it is read-only (so the grammar is
        /// one the walker knows, and the first property means something).
        #[test]
        fn a_planted_writing_call_is_always_found(seed in proptest::prelude::any::<u64>(), w in 0usize..8) {
            const WRITERS: &[&str] = &[
                "nextval('s')",
                "my_writing_fn()",
                "public.audit(1)",
                "setval('s', 1)",
                "pg_advisory_lock(1)",
                "lo_create(0)",
                "txid_current()",
                "x OPERATOR(public.###) 1",
            ];
            let clean = Gen { seed }.statement(None);
            let c = classify(&clean);
            proptest::prop_assert!(!c.parse_error, "does not parse: {}", clean);
            proptest::prop_assert!(c.read_only, "a clean read was not read-only: {}", clean);
            let planted = Gen { seed }.statement(Some(WRITERS[w]));
            let c = classify(&planted);
            proptest::prop_assert!(!c.parse_error, "does not parse: {}", planted);
            proptest::prop_assert!(!c.read_only, "missed the writer: {}", planted);
        }
    }
}
