//! A complete, fail-closed walk over the parse tree of one statement: every
//! function call, operator, relation and cast target anywhere in it, in
//! every clause (targets, FROM, WHERE, GROUP BY, HAVING, WINDOW, ORDER BY,
//! LIMIT/OFFSET, VALUES, CTEs, RETURNING, ON CONFLICT, MERGE actions, …)
//! and every expression kind (casts, row and array constructors, CASE,
//! sublinks, aggregate FILTER/ORDER BY, window frames, …).
//!
//! Each node kind the walker knows is destructured field by field with no
//! `..`, so a field added to the parser's tree fails to compile here rather
//! than being skipped. A node kind it does not know is recorded in
//! [`Walk::unknown`]: the classifier then cannot vouch for the statement and
//! sends it to the primary.

use pg_query::protobuf::{self, Node};
use pg_query::NodeEnum;

/// A possibly schema-qualified name, lower-cased as the parser left it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name {
    pub schema: Option<String>,
    pub name: String,
}

impl Name {
    fn from_parts(parts: &[Node]) -> Option<Name> {
        let strings: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p.node.as_ref() {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        match strings.as_slice() {
            [name] => Some(Name {
                schema: None,
                name: (*name).to_owned(),
            }),
            [.., schema, name] => Some(Name {
                schema: Some((*schema).to_owned()),
                name: (*name).to_owned(),
            }),
            [] => None,
        }
    }

    /// `schema.name`, or `name`.
    pub fn display(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// What one statement contains.
#[derive(Debug, Default)]
pub struct Walk {
    /// Functions called (including aggregates and window functions).
    pub calls: Vec<Name>,
    /// Operators used by name (`=`, `||`, `~~` for LIKE, …).
    pub operators: Vec<Name>,
    /// Relations read (CTE names excluded).
    pub relations: Vec<Name>,
    /// Types cast to.
    pub types: Vec<Name>,
    /// Names used as `x.name` / `(row).name`: a column, or a call of
    /// function `name(x)` (PostgreSQL's attribute notation).
    pub attributes: Vec<String>,
    /// The statement writes or locks, whatever it calls: why.
    pub writes: Option<&'static str>,
    /// The first node kind the walker does not know.
    pub unknown: Option<String>,
    /// Names of the CTEs in scope (not relations).
    ctes: Vec<String>,
}

/// Walk one statement.
pub fn walk(stmt: &NodeEnum) -> Walk {
    let mut w = Walk::default();
    w.statement(stmt);
    w
}

impl Walk {
    fn write(&mut self, why: &'static str) {
        self.writes.get_or_insert(why);
    }

    fn unknown(&mut self, n: &NodeEnum) {
        if self.unknown.is_none() {
            let debug = format!("{n:?}");
            let kind = debug.split('(').next().unwrap_or("node").to_owned();
            self.unknown = Some(kind);
        }
    }

    fn statement(&mut self, n: &NodeEnum) {
        match n {
            NodeEnum::SelectStmt(s) => self.select(s),
            NodeEnum::InsertStmt(s) => self.insert(s),
            NodeEnum::UpdateStmt(s) => self.update(s),
            NodeEnum::DeleteStmt(s) => self.delete(s),
            NodeEnum::MergeStmt(s) => self.merge(s),
            other => self.unknown(other),
        }
    }

    fn all(&mut self, nodes: &[Node]) {
        for n in nodes {
            self.node(n);
        }
    }

    fn opt(&mut self, n: &Option<Box<Node>>) {
        if let Some(n) = n {
            self.node(n);
        }
    }

    fn node(&mut self, n: &Node) {
        let Some(n) = n.node.as_ref() else {
            return;
        };
        self.expr(n);
    }

    fn with(&mut self, w: &Option<protobuf::WithClause>) -> usize {
        let scope = self.ctes.len();
        let Some(protobuf::WithClause {
            ctes,
            recursive,
            location: _,
        }) = w
        else {
            return scope;
        };
        // In WITH RECURSIVE every name is in scope in every body; otherwise
        // a CTE is in scope only after its own body (inside it, and in the
        // ones before it, the same name is the table).
        if *recursive {
            for c in ctes {
                if let Some(NodeEnum::CommonTableExpr(c)) = c.node.as_ref() {
                    self.ctes.push(c.ctename.clone());
                }
            }
        }
        for c in ctes {
            match c.node.as_ref() {
                Some(NodeEnum::CommonTableExpr(c)) => {
                    self.cte(c);
                    if !*recursive {
                        self.ctes.push(c.ctename.clone());
                    }
                }
                Some(other) => self.unknown(other),
                None => {}
            }
        }
        scope
    }

    fn cte(&mut self, c: &protobuf::CommonTableExpr) {
        let protobuf::CommonTableExpr {
            ctename: _,
            aliascolnames: _,
            ctematerialized: _,
            ctequery,
            search_clause: _,
            cycle_clause,
            location: _,
            cterecursive: _,
            cterefcount: _,
            ctecolnames: _,
            ctecoltypes: _,
            ctecoltypmods: _,
            ctecolcollations: _,
        } = c;
        match ctequery.as_deref().and_then(|q| q.node.as_ref()) {
            Some(NodeEnum::SelectStmt(s)) => self.select(s),
            Some(other) => {
                self.write("data-modifying statement in WITH");
                self.statement(other);
            }
            None => {}
        }
        if let Some(cycle) = cycle_clause {
            let protobuf::CteCycleClause {
                cycle_col_list: _,
                cycle_mark_column: _,
                cycle_mark_value,
                cycle_mark_default,
                cycle_path_column: _,
                location: _,
                cycle_mark_type: _,
                cycle_mark_typmod: _,
                cycle_mark_collation: _,
                cycle_mark_neop: _,
            } = cycle.as_ref();
            self.opt(cycle_mark_value);
            self.opt(cycle_mark_default);
        }
    }

    fn select(&mut self, s: &protobuf::SelectStmt) {
        let protobuf::SelectStmt {
            distinct_clause,
            into_clause,
            target_list,
            from_clause,
            where_clause,
            group_clause,
            group_distinct: _,
            having_clause,
            window_clause,
            values_lists,
            sort_clause,
            limit_offset,
            limit_count,
            limit_option: _,
            locking_clause,
            with_clause,
            op: _,
            all: _,
            larg,
            rarg,
        } = s;
        let scope = self.with(with_clause);
        if into_clause.is_some() {
            self.write("SELECT INTO creates a table");
        }
        if !locking_clause.is_empty() {
            self.write("row-locking clause (FOR UPDATE/SHARE)");
        }
        self.all(distinct_clause);
        self.all(target_list);
        self.all(from_clause);
        self.opt(where_clause);
        self.all(group_clause);
        self.opt(having_clause);
        self.all(window_clause);
        self.all(values_lists);
        self.all(sort_clause);
        self.opt(limit_offset);
        self.opt(limit_count);
        if let Some(l) = larg {
            self.select(l);
        }
        if let Some(r) = rarg {
            self.select(r);
        }
        self.ctes.truncate(scope);
    }

    fn returning(&mut self, r: &Option<protobuf::ReturningClause>) {
        if let Some(protobuf::ReturningClause { options: _, exprs }) = r {
            self.all(exprs);
        }
    }

    fn target(&mut self, r: &Option<protobuf::RangeVar>) {
        if let Some(r) = r {
            self.range_var(r);
        }
    }

    fn insert(&mut self, s: &protobuf::InsertStmt) {
        let protobuf::InsertStmt {
            relation,
            cols,
            select_stmt,
            on_conflict_clause,
            returning_clause,
            with_clause,
            r#override: _,
        } = s;
        self.write("INSERT");
        let scope = self.with(with_clause);
        self.target(relation);
        self.all(cols);
        self.opt(select_stmt);
        if let Some(c) = on_conflict_clause {
            let protobuf::OnConflictClause {
                action: _,
                infer,
                target_list,
                where_clause,
                location: _,
            } = c.as_ref();
            if let Some(i) = infer {
                let protobuf::InferClause {
                    index_elems,
                    where_clause,
                    conname: _,
                    location: _,
                } = i.as_ref();
                self.all(index_elems);
                self.opt(where_clause);
            }
            self.all(target_list);
            self.opt(where_clause);
        }
        self.returning(returning_clause);
        self.ctes.truncate(scope);
    }

    fn update(&mut self, s: &protobuf::UpdateStmt) {
        let protobuf::UpdateStmt {
            relation,
            target_list,
            where_clause,
            from_clause,
            returning_clause,
            with_clause,
        } = s;
        self.write("UPDATE");
        let scope = self.with(with_clause);
        self.target(relation);
        self.all(target_list);
        self.opt(where_clause);
        self.all(from_clause);
        self.returning(returning_clause);
        self.ctes.truncate(scope);
    }

    fn delete(&mut self, s: &protobuf::DeleteStmt) {
        let protobuf::DeleteStmt {
            relation,
            using_clause,
            where_clause,
            returning_clause,
            with_clause,
        } = s;
        self.write("DELETE");
        let scope = self.with(with_clause);
        self.target(relation);
        self.all(using_clause);
        self.opt(where_clause);
        self.returning(returning_clause);
        self.ctes.truncate(scope);
    }

    fn merge(&mut self, s: &protobuf::MergeStmt) {
        let protobuf::MergeStmt {
            relation,
            source_relation,
            join_condition,
            merge_when_clauses,
            returning_clause,
            with_clause,
        } = s;
        self.write("MERGE");
        let scope = self.with(with_clause);
        self.target(relation);
        self.opt(source_relation);
        self.opt(join_condition);
        for c in merge_when_clauses {
            match c.node.as_ref() {
                Some(NodeEnum::MergeWhenClause(m)) => {
                    let protobuf::MergeWhenClause {
                        match_kind: _,
                        command_type: _,
                        condition,
                        target_list,
                        values,
                        r#override: _,
                    } = m.as_ref();
                    self.opt(condition);
                    self.all(target_list);
                    self.all(values);
                }
                Some(other) => self.unknown(other),
                None => {}
            }
        }
        self.returning(returning_clause);
        self.ctes.truncate(scope);
    }

    fn range_var(&mut self, r: &protobuf::RangeVar) {
        let protobuf::RangeVar {
            catalogname: _,
            schemaname,
            relname,
            inh: _,
            relpersistence: _,
            alias: _,
            location: _,
        } = r;
        if schemaname.is_empty() && self.ctes.iter().any(|c| c == relname) {
            return;
        }
        self.relations.push(Name {
            schema: (!schemaname.is_empty()).then(|| schemaname.clone()),
            name: relname.clone(),
        });
    }

    fn type_name(&mut self, t: &Option<protobuf::TypeName>) {
        let Some(protobuf::TypeName {
            names,
            type_oid: _,
            setof: _,
            pct_type: _,
            typmods,
            typemod: _,
            array_bounds,
            location: _,
        }) = t
        else {
            return;
        };
        if let Some(n) = Name::from_parts(names) {
            self.types.push(n);
        }
        self.all(typmods);
        self.all(array_bounds);
    }

    fn window(&mut self, w: &protobuf::WindowDef) {
        let protobuf::WindowDef {
            name: _,
            refname: _,
            partition_clause,
            order_clause,
            frame_options: _,
            start_offset,
            end_offset,
            location: _,
        } = w;
        self.all(partition_clause);
        self.all(order_clause);
        self.opt(start_offset);
        self.opt(end_offset);
    }

    fn operator(&mut self, name: &[Node]) {
        if let Some(n) = Name::from_parts(name) {
            self.operators.push(n);
        }
    }

    fn call(&mut self, f: &protobuf::FuncCall) {
        let protobuf::FuncCall {
            funcname,
            args,
            agg_order,
            agg_filter,
            over,
            agg_within_group: _,
            agg_star: _,
            agg_distinct: _,
            func_variadic: _,
            funcformat: _,
            location: _,
        } = f;
        if let Some(n) = Name::from_parts(funcname) {
            self.calls.push(n);
        }
        self.all(args);
        self.all(agg_order);
        self.opt(agg_filter);
        if let Some(w) = over {
            self.window(w);
        }
    }

    /// Expressions and FROM items.
    fn expr(&mut self, n: &NodeEnum) {
        use NodeEnum as N;
        match n {
            // Leaves.
            N::AConst(_)
            | N::ParamRef(_)
            | N::String(_)
            | N::Integer(_)
            | N::Float(_)
            | N::Boolean(_)
            | N::BitString(_)
            | N::SetToDefault(_) => {}
            N::SqlvalueFunction(f) => {
                let protobuf::SqlValueFunction {
                    xpr,
                    op: _,
                    r#type: _,
                    typmod: _,
                    location: _,
                } = f.as_ref();
                self.opt(xpr);
            }
            N::ColumnRef(c) => {
                let protobuf::ColumnRef {
                    fields,
                    location: _,
                } = c;
                if fields.len() > 1 {
                    if let Some(NodeEnum::String(s)) = fields.last().and_then(|f| f.node.as_ref()) {
                        self.attributes.push(s.sval.clone());
                    }
                }
                self.all(fields);
            }
            N::AStar(_) => {}
            N::List(l) => self.all(&l.items),
            N::ResTarget(r) => {
                let protobuf::ResTarget {
                    name: _,
                    indirection,
                    val,
                    location: _,
                } = r.as_ref();
                self.all(indirection);
                self.opt(val);
            }
            N::MultiAssignRef(m) => {
                let protobuf::MultiAssignRef {
                    source,
                    colno: _,
                    ncolumns: _,
                } = m.as_ref();
                self.opt(source);
            }
            N::AExpr(e) => {
                let protobuf::AExpr {
                    kind: _,
                    name,
                    lexpr,
                    rexpr,
                    rexpr_list_start: _,
                    rexpr_list_end: _,
                    location: _,
                } = e.as_ref();
                self.operator(name);
                self.opt(lexpr);
                self.opt(rexpr);
            }
            N::BoolExpr(b) => {
                let protobuf::BoolExpr {
                    xpr,
                    boolop: _,
                    args,
                    location: _,
                } = b.as_ref();
                self.opt(xpr);
                self.all(args);
            }
            N::NullTest(t) => {
                let protobuf::NullTest {
                    xpr,
                    arg,
                    nulltesttype: _,
                    argisrow: _,
                    location: _,
                } = t.as_ref();
                self.opt(xpr);
                self.opt(arg);
            }
            N::BooleanTest(t) => {
                let protobuf::BooleanTest {
                    xpr,
                    arg,
                    booltesttype: _,
                    location: _,
                } = t.as_ref();
                self.opt(xpr);
                self.opt(arg);
            }
            N::FuncCall(f) => self.call(f),
            N::NamedArgExpr(a) => {
                let protobuf::NamedArgExpr {
                    xpr,
                    arg,
                    name: _,
                    argnumber: _,
                    location: _,
                } = a.as_ref();
                self.opt(xpr);
                self.opt(arg);
            }
            N::TypeCast(c) => {
                let protobuf::TypeCast {
                    arg,
                    type_name,
                    location: _,
                } = c.as_ref();
                self.opt(arg);
                self.type_name(type_name);
            }
            N::CollateClause(c) => {
                let protobuf::CollateClause {
                    arg,
                    collname: _,
                    location: _,
                } = c.as_ref();
                self.opt(arg);
            }
            N::SubLink(s) => {
                let protobuf::SubLink {
                    xpr,
                    sub_link_type: _,
                    sub_link_id: _,
                    testexpr,
                    oper_name,
                    subselect,
                    location: _,
                } = s.as_ref();
                self.opt(xpr);
                self.opt(testexpr);
                self.operator(oper_name);
                self.opt(subselect);
            }
            N::SelectStmt(s) => self.select(s),
            N::CaseExpr(c) => {
                let protobuf::CaseExpr {
                    xpr,
                    casetype: _,
                    casecollid: _,
                    arg,
                    args,
                    defresult,
                    location: _,
                } = c.as_ref();
                self.opt(xpr);
                self.opt(arg);
                self.all(args);
                self.opt(defresult);
            }
            N::CaseWhen(c) => {
                let protobuf::CaseWhen {
                    xpr,
                    expr,
                    result,
                    location: _,
                } = c.as_ref();
                self.opt(xpr);
                self.opt(expr);
                self.opt(result);
            }
            N::CoalesceExpr(c) => {
                let protobuf::CoalesceExpr {
                    xpr,
                    coalescetype: _,
                    coalescecollid: _,
                    args,
                    location: _,
                } = c.as_ref();
                self.opt(xpr);
                self.all(args);
            }
            N::MinMaxExpr(m) => {
                let protobuf::MinMaxExpr {
                    xpr,
                    minmaxtype: _,
                    minmaxcollid: _,
                    inputcollid: _,
                    op: _,
                    args,
                    location: _,
                } = m.as_ref();
                self.opt(xpr);
                self.all(args);
            }
            N::RowExpr(r) => {
                let protobuf::RowExpr {
                    xpr,
                    args,
                    row_typeid: _,
                    row_format: _,
                    colnames: _,
                    location: _,
                } = r.as_ref();
                self.opt(xpr);
                self.all(args);
            }
            N::AArrayExpr(a) => {
                let protobuf::AArrayExpr {
                    elements,
                    list_start: _,
                    list_end: _,
                    location: _,
                } = a;
                self.all(elements);
            }
            N::AIndirection(a) => {
                let protobuf::AIndirection { arg, indirection } = a.as_ref();
                self.opt(arg);
                for i in indirection {
                    if let Some(NodeEnum::String(s)) = i.node.as_ref() {
                        self.attributes.push(s.sval.clone());
                    }
                }
                self.all(indirection);
            }
            N::AIndices(a) => {
                let protobuf::AIndices {
                    is_slice: _,
                    lidx,
                    uidx,
                } = a.as_ref();
                self.opt(lidx);
                self.opt(uidx);
            }
            N::GroupingSet(g) => {
                let protobuf::GroupingSet {
                    kind: _,
                    content,
                    location: _,
                } = g;
                self.all(content);
            }
            N::GroupingFunc(g) => {
                let protobuf::GroupingFunc {
                    xpr,
                    args,
                    refs,
                    agglevelsup: _,
                    location: _,
                } = g.as_ref();
                self.opt(xpr);
                self.all(args);
                self.all(refs);
            }
            N::SortBy(s) => {
                let protobuf::SortBy {
                    node,
                    sortby_dir: _,
                    sortby_nulls: _,
                    use_op,
                    location: _,
                } = s.as_ref();
                self.opt(node);
                self.operator(use_op);
            }
            N::WindowDef(w) => self.window(w),
            N::RangeVar(r) => self.range_var(r),
            N::RangeSubselect(r) => {
                let protobuf::RangeSubselect {
                    lateral: _,
                    subquery,
                    alias: _,
                } = r.as_ref();
                self.opt(subquery);
            }
            N::RangeFunction(r) => {
                let protobuf::RangeFunction {
                    lateral: _,
                    ordinality: _,
                    is_rowsfrom: _,
                    functions,
                    alias: _,
                    coldeflist,
                } = r;
                self.all(functions);
                self.all(coldeflist);
            }
            N::ColumnDef(c) => {
                // Only as a column definition list of a function in FROM.
                let protobuf::ColumnDef {
                    colname: _,
                    type_name,
                    compression: _,
                    inhcount: _,
                    is_local: _,
                    is_not_null: _,
                    is_from_type: _,
                    storage: _,
                    storage_name: _,
                    raw_default,
                    cooked_default,
                    identity: _,
                    identity_sequence: _,
                    generated: _,
                    coll_clause: _,
                    coll_oid: _,
                    constraints,
                    fdwoptions: _,
                    location: _,
                } = c.as_ref();
                self.type_name(type_name);
                self.opt(raw_default);
                self.opt(cooked_default);
                if !constraints.is_empty() {
                    self.unknown(n);
                }
            }
            N::JoinExpr(j) => {
                let protobuf::JoinExpr {
                    jointype: _,
                    is_natural: _,
                    larg,
                    rarg,
                    using_clause: _,
                    join_using_alias: _,
                    quals,
                    alias: _,
                    rtindex: _,
                } = j.as_ref();
                self.opt(larg);
                self.opt(rarg);
                self.opt(quals);
            }
            N::RangeTableSample(r) => {
                let protobuf::RangeTableSample {
                    relation,
                    method,
                    args,
                    repeatable,
                    location: _,
                } = r.as_ref();
                self.opt(relation);
                // The sampling method is a function too (`tsm_system_rows`).
                if let Some(m) = Name::from_parts(method) {
                    self.calls.push(m);
                }
                self.all(args);
                self.opt(repeatable);
            }
            N::IndexElem(e) => {
                let protobuf::IndexElem {
                    name: _,
                    expr,
                    indexcolname: _,
                    collation: _,
                    opclass: _,
                    opclassopts: _,
                    ordering: _,
                    nulls_ordering: _,
                } = e.as_ref();
                self.opt(expr);
            }
            N::LockingClause(_) => self.write("row-locking clause (FOR UPDATE/SHARE)"),
            // XML, JSON constructors, XMLTABLE, JSON_TABLE and anything
            // else: not vouched for.
            other => self.unknown(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walked(sql: &str) -> Walk {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).unwrap();
        let stmt = parsed.protobuf.stmts[0].stmt.as_ref().unwrap();
        walk(stmt.node.as_ref().unwrap())
    }

    fn calls(sql: &str) -> Vec<String> {
        walked(sql).calls.iter().map(Name::display).collect()
    }

    #[test]
    fn finds_calls_everywhere() {
        for sql in [
            "VALUES (nextval('s'))",
            "SELECT ARRAY[nextval('s')]",
            "SELECT 1 LIMIT (SELECT nextval('s'))",
            "SELECT count(*) FILTER (WHERE nextval('s') > 0) FROM t",
            "SELECT sum(x ORDER BY nextval('s')) FROM t",
            "SELECT row_number() OVER (PARTITION BY nextval('s')) FROM t",
            "SELECT (nextval('s'))::text",
            "SELECT ROW(1, nextval('s'))",
            "SELECT CASE WHEN true THEN nextval('s') END",
            "SELECT * FROM t WHERE x IN (SELECT nextval('s'))",
            "SELECT * FROM t JOIN u ON nextval('s') > 0",
            "SELECT * FROM nextval('s')",
            "WITH a AS (SELECT nextval('s')) SELECT * FROM a",
            "SELECT x FROM t GROUP BY x HAVING max(nextval('s')) > 0",
            "SELECT x FROM t ORDER BY nextval('s')",
            "SELECT coalesce(null, nextval('s'))",
            "SELECT greatest(1, nextval('s'))",
            "SELECT (ARRAY[1,2])[nextval('s')]",
            "SELECT 1 OFFSET nextval('s')",
            "SELECT * FROM t TABLESAMPLE system (nextval('s'))",
            "SELECT nextval('s') IS NULL",
            "SELECT x FROM t WINDOW w AS (ORDER BY nextval('s'))",
            "SELECT 1 UNION SELECT nextval('s')",
            "SELECT * FROM LATERAL (SELECT nextval('s')) x",
            "SELECT 'a' COLLATE \"C\" || nextval('s')::text",
        ] {
            let w = walked(sql);
            assert!(
                calls(sql).contains(&"nextval".to_string()),
                "{sql}: {:?}",
                w
            );
        }
    }

    #[test]
    fn writes_and_unknowns() {
        assert_eq!(walked("SELECT 1").writes, None);
        assert!(walked("SELECT * FROM t FOR UPDATE").writes.is_some());
        assert!(walked("SELECT 1 INTO x").writes.is_some());
        assert!(
            walked("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
                .writes
                .is_some()
        );
        assert!(walked("INSERT INTO t VALUES (1)").writes.is_some());
        let w = walked("SELECT xmlelement(name a, 'b')");
        assert!(w.unknown.is_some(), "{w:?}");
        let w = walked("SELECT JSON_OBJECT('a': 1)");
        assert!(w.unknown.is_some(), "{w:?}");
    }

    #[test]
    fn relations_exclude_ctes() {
        let w = walked("WITH t AS (SELECT 1) SELECT * FROM t, public.u, v");
        let rels: Vec<String> = w.relations.iter().map(Name::display).collect();
        assert_eq!(rels, ["public.u", "v"]);
        // Inside its own body (not recursive), the name is the table.
        let w = walked("WITH scratch AS (SELECT * FROM scratch) SELECT * FROM scratch");
        let rels: Vec<String> = w.relations.iter().map(Name::display).collect();
        assert_eq!(rels, ["scratch"]);
        let w = walked("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b");
        let rels: Vec<String> = w.relations.iter().map(Name::display).collect();
        assert_eq!(rels, ["b"]);
        let w = walked("WITH RECURSIVE r AS (SELECT 1 UNION SELECT * FROM r) SELECT * FROM r");
        assert!(w.relations.is_empty());
        let w = walked("SELECT 1::my_type, 'x'::text");
        let types: Vec<String> = w.types.iter().map(Name::display).collect();
        assert_eq!(types, ["my_type", "text"]);
        let w = walked("SELECT a OPERATOR(public.###) b, c || d");
        let ops: Vec<String> = w.operators.iter().map(Name::display).collect();
        assert_eq!(ops, ["public.###", "||"]);
    }
}
