//! Routing correctness against a real primary + streaming replicas: every
//! statement that needs the primary gets there (the client never sees
//! 25006/0A000 from a standby), and statements a standby can run go to one.

use std::sync::atomic::Ordering;

use signalbox_tests::raw::{data_row, sqlstate, Raw};
use signalbox_tests::service::{cluster, start};

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

fn setup() {
    let c = cluster();
    c.psql(
        c.primary.port,
        "CREATE SEQUENCE IF NOT EXISTS routing_seq; \
         CREATE TABLE IF NOT EXISTS routing_log (n int); \
         CREATE OR REPLACE FUNCTION routing_writer() RETURNS int LANGUAGE plpgsql AS \
         $$BEGIN INSERT INTO routing_log VALUES (1); RETURN 1; END$$;",
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
    let replicas = || m.routed[1].load(Ordering::Relaxed) + m.routed[2].load(Ordering::Relaxed);
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
