//! Routing correctness against a real primary + streaming replicas: every
//! statement that needs the primary gets there (the client never sees
//! 25006/0A000 from a standby), and statements a standby can run go to one.

use std::sync::atomic::Ordering;

use signalbox_tests::raw::{data_row, sqlstate, Raw};
use signalbox_tests::service::{cluster, connect, start};

/// Run `sql`; the values of the first row (an error fails the test).
async fn row(c: &mut Raw, sql: &str) -> Vec<Option<String>> {
    let msgs = c.simple(sql).await;
    if let Some(e) = msgs.iter().find(|m| m.0 == b'E') {
        panic!(
            "{sql}: {} {}",
            sqlstate(&e.1),
            signalbox_tests::raw::field(&e.1, b'M')
        );
    }
    msgs.iter()
        .find(|m| m.0 == b'D')
        .map(|m| data_row(&m.1))
        .unwrap_or_default()
}

/// Objects the tests use, created once per test binary.
fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(create_objects);
}

fn create_objects() {
    let c = cluster();
    c.psql(
        c.primary.port,
        "CREATE SEQUENCE IF NOT EXISTS routing_seq; \
         CREATE TABLE IF NOT EXISTS routing_log (n int); \
         CREATE OR REPLACE FUNCTION routing_writer() RETURNS int LANGUAGE plpgsql AS \
         $$BEGIN INSERT INTO routing_log VALUES (1); RETURN 1; END$$; \
         CREATE OR REPLACE FUNCTION routing_set_tenant(t text) RETURNS void LANGUAGE plpgsql AS \
         $$BEGIN PERFORM set_config('app.tenant', t, false); END$$; \
         CREATE UNLOGGED TABLE IF NOT EXISTS routing_unlogged_nocat (n int); \
         INSERT INTO routing_unlogged_nocat SELECT 1 \
         WHERE NOT EXISTS (SELECT FROM routing_unlogged_nocat);",
    )
    .unwrap();
    c.wait_replayed().unwrap();
}

/// Writing calls in every corner of a read reach the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_calls_hidden_in_reads_reach_the_primary() {
    setup();
    let server = start("").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    for sql in [
        "VALUES (nextval('routing_seq'), pg_is_in_recovery())",
        "VALUES (routing_writer(), pg_is_in_recovery())",
        "SELECT ARRAY[nextval('routing_seq')], pg_is_in_recovery()",
        "SELECT 1, pg_is_in_recovery() LIMIT (SELECT nextval('routing_seq'))",
        "SELECT count(*) FILTER (WHERE routing_writer() > 0), bool_or(pg_is_in_recovery()) \
         FROM generate_series(1, 2)",
        "SELECT (SELECT max(x) FROM (VALUES (nextval('routing_seq'))) v(x)), pg_is_in_recovery()",
        "SELECT row_number() OVER (ORDER BY routing_writer()), pg_is_in_recovery()",
    ] {
        let r = row(&mut c, sql).await;
        assert_eq!(r[1].as_deref(), Some("f"), "{sql} ran on a standby");
    }
}

/// Settings that a standby would refuse for later transactions take the
/// session to the primary, and its later statements keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_and_read_write_settings_route_to_the_primary() {
    let server = start("").await;
    for set in [
        "SET default_transaction_isolation = 'serializable'",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT set_config('default_transaction_isolation', 'serializable', false)",
    ] {
        let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
        row(&mut c, set).await;
        for _ in 0..3 {
            let r = row(
                &mut c,
                "SELECT pg_is_in_recovery(), current_setting('transaction_isolation')",
            )
            .await;
            assert_eq!(r[0].as_deref(), Some("f"), "after {set}");
            assert_eq!(r[1].as_deref(), Some("serializable"), "after {set}");
        }
    }
    // Read-write settings: a standby refuses `transaction_read_only = off`
    // ("cannot set transaction read-write mode during recovery"), and a
    // session that asks for read-write transactions gets them.
    for set in [
        "SET transaction_read_only = off",
        "SELECT set_config('transaction_read_only', 'off', false)",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET default_transaction_read_only = off",
    ] {
        let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
        row(&mut c, set).await;
        for _ in 0..3 {
            let r = row(
                &mut c,
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
            )
            .await;
            assert_eq!(r[0].as_deref(), Some("f"), "after {set}");
            assert_eq!(r[1].as_deref(), Some("off"), "after {set}");
        }
    }
}

/// Statements a standby can run are offloaded: EXPLAIN (without ANALYZE)
/// of anything, a one-message read-only transaction, UNLISTEN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_statements_are_offloaded_to_replicas() {
    setup();
    let server = start("").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let r = row(
        &mut c,
        "BEGIN; SELECT pg_is_in_recovery(), inet_server_port(); COMMIT;",
    )
    .await;
    assert_eq!(r[0].as_deref(), Some("t"));
    let m = &server.shared.metrics;
    let replicas = || m.routed.value("replica-1") + m.routed.value("replica-2");
    for sql in [
        "EXPLAIN SELECT * FROM routing_log",
        "EXPLAIN INSERT INTO routing_log VALUES (nextval('routing_seq'))",
        "EXPLAIN (COSTS OFF) UPDATE routing_log SET n = 2",
        "UNLISTEN *",
    ] {
        let before = replicas();
        let msgs = c.simple(sql).await;
        assert!(msgs.iter().all(|m| m.0 != b'E'), "{sql}: {msgs:?}");
        assert_eq!(replicas(), before + 1, "{sql} was not offloaded");
    }
}

fn catalog_setup() {
    setup();
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(create_catalog_objects);
}

fn create_catalog_objects() {
    let c = cluster();
    c.psql(
        c.primary.port,
        "CREATE UNLOGGED TABLE IF NOT EXISTS routing_unlogged (n int); \
         CREATE OR REPLACE VIEW routing_noisy AS SELECT routing_writer() AS w; \
         CREATE OR REPLACE VIEW routing_calm AS SELECT n FROM routing_log; \
         CREATE OR REPLACE FUNCTION routing_bump() RETURNS bigint LANGUAGE sql \
           AS 'SELECT nextval(''routing_seq'')'; \
         CREATE OR REPLACE FUNCTION routing_total() RETURNS bigint LANGUAGE sql STABLE \
           AS 'SELECT count(*) FROM routing_log'; \
         CREATE OR REPLACE FUNCTION routing_report() RETURNS bigint LANGUAGE plpgsql STABLE \
           AS $$BEGIN RETURN (SELECT count(*) FROM routing_log); END$$; \
         CREATE OR REPLACE FUNCTION routing_op_writer(int, int) RETURNS int LANGUAGE plpgsql \
           AS $$BEGIN INSERT INTO routing_log VALUES ($1); RETURN $2; END$$; \
         CREATE OR REPLACE FUNCTION routing_op_reader(int, int) RETURNS int LANGUAGE sql \
           IMMUTABLE AS 'SELECT $1 + $2'; \
         DO $$BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_operator WHERE oprname = '###') THEN \
             CREATE OPERATOR ### (LEFTARG = int, RIGHTARG = int, FUNCTION = routing_op_writer); \
           END IF; \
           IF NOT EXISTS (SELECT 1 FROM pg_operator WHERE oprname = '=+=') THEN \
             CREATE OPERATOR =+= (LEFTARG = int, RIGHTARG = int, FUNCTION = routing_op_reader); \
           END IF; \
         END$$;",
    )
    .unwrap();
    c.wait_replayed().unwrap();
}

/// Catalog facts: relations a standby refuses, views over writing
/// functions, SQL function bodies, plpgsql (primary unless listed),
/// user operators — each read runs where it can, never fails on a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_facts_route_what_text_cannot_show() {
    catalog_setup();
    let server = start("[classifier]\nread_only_functions = [\"routing_report\"]\n").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    for (sql, on_replica) in [
        (
            "SELECT count(*), pg_is_in_recovery() FROM routing_unlogged",
            false,
        ),
        (
            "SELECT count(*), pg_is_in_recovery() FROM routing_noisy",
            false,
        ),
        (
            "SELECT count(*), pg_is_in_recovery() FROM routing_calm",
            true,
        ),
        ("SELECT routing_bump(), pg_is_in_recovery()", false),
        ("SELECT routing_total(), pg_is_in_recovery()", true),
        ("SELECT routing_report(), pg_is_in_recovery()", true),
        ("SELECT 1 ### 2, pg_is_in_recovery()", false),
        ("SELECT 1 =+= 2, pg_is_in_recovery()", true),
        (
            "SELECT count(*), pg_is_in_recovery() FROM routing_log",
            true,
        ),
    ] {
        let r = row(&mut c, sql).await;
        let expected = if on_replica { "t" } else { "f" };
        assert_eq!(r[1].as_deref(), Some(expected), "{sql}");
    }
    // EXPLAIN and COPY of an unlogged table are refused by a standby too.
    for sql in [
        "EXPLAIN SELECT * FROM routing_unlogged",
        "COPY routing_unlogged TO STDOUT",
    ] {
        let msgs = c.simple(sql).await;
        assert!(msgs.iter().all(|m| m.0 != b'E'), "{sql}: {msgs:?}");
    }
}

/// `CREATE OR REPLACE FUNCTION` through signalbox changes the verdict of
/// the very next statement, on this connection and on any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_signalbox_refreshes_the_catalog_at_once() {
    setup();
    let server = start("").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let mut other = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    row(
        &mut c,
        "CREATE OR REPLACE FUNCTION routing_flip() RETURNS bigint LANGUAGE sql AS 'SELECT 1::bigint'",
    )
    .await;
    cluster().wait_replayed().unwrap();
    let r = row(&mut c, "SELECT routing_flip(), pg_is_in_recovery()").await;
    assert_eq!(
        r[1].as_deref(),
        Some("t"),
        "a reading SQL function runs on a replica"
    );
    for _ in 0..5 {
        row(
            &mut c,
            "CREATE OR REPLACE FUNCTION routing_flip() RETURNS bigint LANGUAGE sql \
             AS 'SELECT nextval(''routing_seq'')'",
        )
        .await;
        // Sent the moment the DDL's reply arrived, on another connection.
        let r = row(&mut other, "SELECT routing_flip(), pg_is_in_recovery()").await;
        assert_eq!(
            r[1].as_deref(),
            Some("f"),
            "now it writes: the primary, for every connection"
        );
        let r = row(&mut c, "SELECT routing_flip(), pg_is_in_recovery()").await;
        assert_eq!(r[1].as_deref(), Some("f"), "now it writes: the primary");
        row(
            &mut c,
            "CREATE OR REPLACE FUNCTION routing_flip() RETURNS bigint LANGUAGE sql AS 'SELECT 1::bigint'",
        )
        .await;
        cluster().wait_replayed().unwrap();
        let r = row(&mut c, "SELECT routing_flip(), pg_is_in_recovery()").await;
        assert_eq!(r[1].as_deref(), Some("t"));
    }
    let fetched = server.shared.catalogs.fetches.load(Ordering::Relaxed);
    assert!(
        fetched >= 11,
        "one fetch at login and one per DDL: {fetched}"
    );
}

/// Session mode keeps one primary connection per client and still sends
/// its reads outside transactions to replicas, with its settings; a
/// temporary table pins the session to its primary connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reads_land_on_replicas_until_pinned() {
    setup();
    let server = start("[pool]\nmode = \"session\"\n").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let own = row(&mut c, "SELECT inet_server_port(), pg_is_in_recovery()").await;
    assert_eq!(own[1].as_deref(), Some("t"), "a read goes to a replica");
    row(&mut c, "SET work_mem = '5MB'").await;
    for _ in 0..3 {
        let r = row(
            &mut c,
            "SELECT current_setting('work_mem'), pg_is_in_recovery()",
        )
        .await;
        assert_eq!(r, [Some("5MB".into()), Some("t".into())]);
    }
    let r = row(
        &mut c,
        "INSERT INTO routing_log VALUES (7) RETURNING pg_is_in_recovery()",
    )
    .await;
    assert_eq!(r[0].as_deref(), Some("f"));
    // Inside a transaction: the session's own connection.
    row(&mut c, "BEGIN").await;
    let r = row(&mut c, "SELECT pg_is_in_recovery()").await;
    assert_eq!(r[0].as_deref(), Some("f"));
    row(&mut c, "COMMIT").await;
    // The session's primary connection is the one it was told about (a
    // read asking for its own backend stays there too).
    let (_, body) = c.login.iter().find(|(t, _)| *t == b'K').unwrap();
    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let r = row(&mut c, "SELECT pg_backend_pid(), txid_current()").await;
    assert_eq!(r[0].as_deref(), Some(pid.to_string().as_str()));
    let r = row(&mut c, "SELECT pg_backend_pid()").await;
    assert_eq!(r[0].as_deref(), Some(pid.to_string().as_str()));
    // A temporary table pins: reads of it (and everything else) stay there.
    row(&mut c, "CREATE TEMP TABLE routing_tmp (x int)").await;
    for _ in 0..3 {
        let r = row(
            &mut c,
            "SELECT count(*), pg_is_in_recovery() FROM routing_tmp",
        )
        .await;
        assert_eq!(r[1].as_deref(), Some("f"));
        let r = row(&mut c, "SELECT pg_is_in_recovery()").await;
        assert_eq!(r[0].as_deref(), Some("f"));
    }
}

/// Session mode: once code ran that may set state signalbox cannot see (a
/// function that calls set_config), the session's reads stay on its own
/// connection, where that state lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reads_stay_home_after_untracked_state() {
    setup();
    let server = start("[pool]\nmode = \"session\"\n").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let r = row(&mut c, "SELECT pg_is_in_recovery()").await;
    assert_eq!(r[0].as_deref(), Some("t"));
    row(&mut c, "SELECT routing_set_tenant('42')").await;
    for _ in 0..3 {
        let r = row(
            &mut c,
            "SELECT current_setting('app.tenant', true), pg_is_in_recovery()",
        )
        .await;
        assert_eq!(r, [Some("42".to_string()), Some("f".to_string())]);
    }
}

/// Without catalog facts (`catalog = false`, or a fetch that failed) a read
/// of an UNLOGGED table looks safe and goes to a standby, which refuses it.
/// Nothing reached the client yet: the read runs on the primary instead,
/// the client gets its rows, and the retry is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_a_standby_refuses_runs_on_the_primary() {
    setup();
    let server = start("[classifier]\ncatalog = false\n").await;
    let mut raw = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    for _ in 0..3 {
        let r = row(
            &mut raw,
            "SELECT count(*), pg_is_in_recovery() FROM routing_unlogged_nocat",
        )
        .await;
        assert_eq!(r, [Some("1".into()), Some("f".into())]);
    }
    let retried = server
        .shared
        .metrics
        .standby_retries
        .load(Ordering::Relaxed);
    assert_eq!(
        retried, 3,
        "each read was refused by a standby, then retried"
    );
    // Extended protocol (what drivers use) too.
    let client = connect(server.addr.port(), "postgres").await;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM routing_unlogged_nocat WHERE n = $1",
            &[&1i32],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(
        server
            .shared
            .metrics
            .standby_retries
            .load(Ordering::Relaxed),
        4
    );
}

/// A refused read whose message also changed the standby connection (a SET
/// committed before the refused statement, in an earlier Sync of the same
/// pipeline) must not hand that connection to anyone else: the next
/// clients' reads never see the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_read_leaves_no_connection_state_behind() {
    use signalbox_tests::raw;
    setup();
    let server = start("[classifier]\ncatalog = false\n").await;
    let port = server.addr.port();
    for _ in 0..4 {
        let mut a = Raw::connect(port, "postgres", "postgres").await;
        a.send(
            &[
                raw::parse("", "SET application_name = 'leaked-by-a-refused-read'"),
                raw::bind("", ""),
                raw::execute("", 0),
                raw::sync(),
                raw::parse("", "SELECT count(*) FROM routing_unlogged_nocat"),
                raw::bind("", ""),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        let mut zs = 0;
        while zs < 2 {
            let m = a.next().await;
            assert_ne!(m.0, b'E', "{}", raw::field(&m.1, b'M'));
            zs += usize::from(m.0 == b'Z');
        }
    }
    for _ in 0..20 {
        let mut b = Raw::connect(port, "postgres", "postgres").await;
        let r = row(
            &mut b,
            "SELECT current_setting('application_name'), pg_is_in_recovery()",
        )
        .await;
        assert_ne!(
            r[0].as_deref(),
            Some("leaked-by-a-refused-read"),
            "another client's setting reached this one (on a standby: {:?})",
            r[1]
        );
    }
}
