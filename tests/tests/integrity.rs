//! Integrity of the data path against a real primary + streaming replicas:
//! a client that vanishes (mid-result, mid-COPY, mid-pipeline, inside a
//! transaction) never leaves its rows, its transaction or its session state
//! for the next client; pooled connections that died are never handed out.
//! Pool size 1 everywhere, so the next client gets the very connection the
//! previous one left.

use std::time::Duration;

use signalbox_tests::raw::{self, data_row, sqlstate, Msg, Raw};
use signalbox_tests::service::{cluster, connect, database, port_of, start};

const POOL1: &str = "[pool]\nsize = 1\ncheckout_timeout_ms = 20000\n";

/// What a fresh client must get for `SELECT 'mine', 42`, and nothing else.
fn assert_exactly_mine(msgs: &[Msg], context: &str) {
    let tags: Vec<char> = msgs.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(tags, ['T', 'D', 'C', 'Z'], "{context}: got {msgs:?}");
    assert_eq!(
        data_row(&msgs[1].1),
        [Some("mine".to_string()), Some("42".to_string())],
        "{context}"
    );
    assert_eq!(msgs[3].1, b"I", "{context}: not idle");
}

/// The next client's three reads (spread over the replicas) get exactly
/// their own result.
async fn next_client_sees_only_its_own(port: u16, context: &str) {
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    for _ in 0..3 {
        let msgs = c.simple("SELECT 'mine', 42").await;
        assert_exactly_mine(&msgs, context);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_result_leaves_nothing_for_the_next() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    for i in 0..200 {
        let mut a = Raw::connect(port, "postgres", "postgres").await;
        a.send(&raw::query(
            "SELECT repeat('x', 50) || g FROM generate_series(1, 300000) g",
        ))
        .await;
        a.read_some(1024).await;
        a.reset();
        next_client_sees_only_its_own(port, &format!("iteration {i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_pipeline_leaves_nothing_for_the_next() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    for i in 0..200 {
        let mut a = Raw::connect(port, "postgres", "postgres").await;
        // Extended protocol ended by Flush: no Sync will ever come.
        let mut batch = raw::parse(
            "",
            "SELECT repeat('y', 50) || g FROM generate_series(1, 300000) g",
        );
        batch.extend(raw::bind("", ""));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::flush());
        a.send(&batch).await;
        a.read_some(1024).await;
        a.reset();
        next_client_sees_only_its_own(port, &format!("iteration {i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_copy_leaves_nothing_for_the_next() {
    database("integrity_copy");
    let server = start(POOL1).await;
    let port = server.addr.port();
    let setup = connect(port, "integrity_copy").await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS copied (x int)")
        .await
        .unwrap();
    for i in 0..200 {
        let mut a = Raw::connect(port, "postgres", "integrity_copy").await;
        a.send(&raw::query("COPY copied FROM STDIN")).await;
        let (tag, _) = a.next().await;
        assert_eq!(tag, b'G', "CopyInResponse expected");
        a.send(&raw::copy_data(b"1\n")).await;
        a.reset();
        let b = connect(port, "integrity_copy").await;
        b.batch_execute("INSERT INTO copied VALUES (2)")
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: next client's write failed: {e}"));
        let row = b.query_one("SELECT 'mine', 42", &[]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), "mine", "iteration {i}");
    }
    // No half-finished COPY ever committed a row.
    let direct = connect(port_of("primary"), "integrity_copy").await;
    let ones: i64 = direct
        .query_one("SELECT count(*) FROM copied WHERE x = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ones, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_inside_a_transaction_never_lends_it_out() {
    database("integrity_tx");
    let server = start(POOL1).await;
    let port = server.addr.port();
    let setup = connect(port, "integrity_tx").await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS txrows (x int)")
        .await
        .unwrap();
    let direct = connect(port_of("primary"), "integrity_tx").await;
    for i in 0..200 {
        let mut a = Raw::connect(port, "postgres", "integrity_tx").await;
        let msgs = a.simple("BEGIN; INSERT INTO txrows VALUES (-1)").await;
        assert_eq!(msgs.last().unwrap().1, b"T", "inside a transaction");
        a.reset();
        // The next client's autocommit write must commit on its own, not
        // join the vanished client's transaction.
        let b = connect(port, "integrity_tx").await;
        b.batch_execute(&format!("INSERT INTO txrows VALUES ({i})"))
            .await
            .unwrap();
        drop(b);
        let seen: i64 = direct
            .query_one("SELECT count(*) FROM txrows WHERE x = $1", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            seen, 1,
            "iteration {i}: the next client's insert is not committed"
        );
    }
    let leaked: i64 = direct
        .query_one("SELECT count(*) FROM txrows WHERE x = -1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "a vanished client's transaction was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_while_the_server_works_frees_its_connection() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    for i in 0..3 {
        let mut a = Raw::connect(port, "postgres", "postgres").await;
        // Outside any transaction, on a replica; then on the primary, inside one.
        let sql = if i < 2 {
            "SELECT pg_sleep(60), 'vanishing-reader'"
        } else {
            "BEGIN; SELECT txid_current(), pg_sleep(60), 'vanishing-writer'"
        };
        a.send(&raw::query(sql)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.reset();
        // The server stops the query at once, not after a minute ...
        let c = cluster();
        let stopped = tokio::task::block_in_place(|| {
            signalbox_tests::wait_until(Duration::from_secs(5), || {
                c.all_nodes().all(|n| {
                    c.psql(
                        n.port,
                        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%vanishing-%' \
                         AND pid <> pg_backend_pid()",
                    )
                    .map(|v| v.trim() == "0")
                    .unwrap_or(false)
                })
            })
        });
        assert!(stopped, "round {i}: the vanished client's query still runs");
        // ... and the next client gets the (only) connection right away.
        let started = std::time::Instant::now();
        next_client_sees_only_its_own(port, &format!("round {i}")).await;
        let mut w = Raw::connect(port, "postgres", "postgres").await;
        let msgs = w.simple("SELECT txid_current() * 0 + 42, 'x'").await;
        assert_eq!(msgs.last().unwrap().1, b"I", "round {i}: {msgs:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

/// Create a role on the primary and wait until the replicas have it.
fn role(name: &str) {
    let c = cluster();
    c.psql(
        c.primary.port,
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') \
             THEN CREATE ROLE {name}; END IF; END $$"
        ),
    )
    .expect("create role");
    c.wait_replayed().expect("replicas replay");
}

async fn current_users(port: u16) -> Vec<String> {
    let b = connect(port, "postgres").await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let row = b
            .query_one(
                "SELECT current_user::text || '/' || session_user::text",
                &[],
            )
            .await
            .unwrap();
        seen.push(row.get::<_, String>(0));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_and_session_authorization_never_reach_another_client() {
    role("sb_tenant_a");
    let server = start(POOL1).await;
    let port = server.addr.port();
    for stmt in [
        "SET ROLE sb_tenant_a",
        "SET SESSION AUTHORIZATION sb_tenant_a",
        "SELECT set_config('role', 'sb_tenant_a', false)",
    ] {
        let a = connect(port, "postgres").await;
        a.batch_execute(stmt).await.unwrap();
        // The client itself keeps what it set, on every connection it gets.
        for _ in 0..4 {
            let me: String = a
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(me, "sb_tenant_a", "{stmt}: the client lost its own role");
        }
        drop(a);
        for seen in current_users(port).await {
            assert_eq!(
                seen, "postgres/postgres",
                "after `{stmt}` by another client"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_is_tracked_like_set_and_never_leaks() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    let a = connect(port, "postgres").await;
    a.batch_execute("SELECT set_config('statement_timeout', '1', false)")
        .await
        .unwrap();
    for _ in 0..4 {
        let v: String = a
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "1ms", "the client's own set_config must follow it");
    }
    // Transaction-local set_config dies with the transaction.
    a.batch_execute("BEGIN; SELECT set_config('work_mem', '7MB', true); COMMIT")
        .await
        .unwrap();
    let wm: String = a.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_ne!(wm, "7MB");
    drop(a);
    let b = connect(port, "postgres").await;
    for _ in 0..4 {
        b.batch_execute("SELECT pg_sleep(0.01)")
            .await
            .expect("another client's statement_timeout leaked");
        let v: String = b
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_and_discard_act_on_the_client_own_statements() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    let a = connect(port, "postgres").await;
    let other = connect(port, "postgres").await;
    let stmt = a.prepare("SELECT $1::int + 1").await.unwrap();
    let shared_sql = other.prepare("SELECT $1::int + 1").await.unwrap();
    for _ in 0..3 {
        let v: i32 = a.query_one(&stmt, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, 2);
    }
    a.batch_execute("DEALLOCATE ALL").await.unwrap();
    // PostgreSQL forgets the client's statements; the other client's
    // statement (same SQL, same server connection) still works.
    for _ in 0..3 {
        let v: i32 = other
            .query_one(&shared_sql, &[&41i32])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 42, "another client's statement was destroyed");
    }
    let err = a.query_one(&stmt, &[&1i32]).await.unwrap_err();
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("26000"),
        "a deallocated statement must be gone, as on PostgreSQL: {err}"
    );
    // DEALLOCATE <name> of a protocol-level statement, by the client's name.
    let mut r = Raw::connect(port, "postgres", "postgres").await;
    let mut batch = raw::parse("stmt_a", "SELECT 'named'");
    batch.extend(raw::bind("", "stmt_a"));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    r.send(&batch).await;
    let msgs = r.until_ready().await;
    assert!(msgs.iter().all(|(t, _)| *t != b'E'), "{msgs:?}");
    let msgs = r.simple("DEALLOCATE stmt_a").await;
    assert_eq!(
        msgs[0].0, b'C',
        "DEALLOCATE of the client's own statement: {msgs:?}"
    );
    let mut batch = raw::bind("", "stmt_a");
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    r.send(&batch).await;
    let msgs = r.until_ready().await;
    assert_eq!(msgs[0].0, b'E', "{msgs:?}");
    assert_eq!(sqlstate(&msgs[0].1), "26000");
    // Re-preparing after DEALLOCATE works.
    let again = a.prepare("SELECT $1::int + 1").await.unwrap();
    let v: i32 = a.query_one(&again, &[&5i32]).await.unwrap().get(0);
    assert_eq!(v, 6);
    // DISCARD ALL resets the client's own state and statements.
    a.batch_execute("SET application_name = 'before_discard'")
        .await
        .unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    let app: String = a
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "");
    let err = a.query_one(&again, &[&1i32]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err}");
    for _ in 0..3 {
        let v: i32 = other.query_one(&shared_sql, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, 2, "DISCARD ALL of one client broke another");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connections_are_replaced_not_handed_out() {
    database("integrity_dead");
    let server = start(POOL1).await;
    let port = server.addr.port();
    let c = cluster();
    for round in 0..3 {
        // Fill the pools: one connection per node to integrity_dead.
        let a = connect(port, "integrity_dead").await;
        for _ in 0..4 {
            a.batch_execute("SELECT 1").await.unwrap();
        }
        a.batch_execute("CREATE TABLE IF NOT EXISTS t (x int)")
            .await
            .unwrap();
        drop(a);
        // Kill every backend of that database behind signalbox's back.
        for node in c.all_nodes() {
            c.psql(
                node.port,
                // (With a timeout, each call returns once its backend has
                // exited: none is half-dead when the next client comes.)
                "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity \
                 WHERE datname = 'integrity_dead' AND pid <> pg_backend_pid()",
            )
            .expect("terminate backends");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = connect(port, "integrity_dead").await;
        for i in 0..4 {
            b.batch_execute("SELECT 1").await.unwrap_or_else(|e| {
                panic!("round {round}, read {i}: a dead pooled connection was handed out: {e}")
            });
        }
        b.batch_execute("INSERT INTO t VALUES (1)")
            .await
            .unwrap_or_else(|e| panic!("round {round}: write on a dead connection: {e}"));
    }
    // Dropped and re-created directly on the server.
    let a = connect(port, "integrity_dead").await;
    a.batch_execute("SELECT 1").await.unwrap();
    drop(a);
    c.psql(c.primary.port, "DROP DATABASE integrity_dead WITH (FORCE)")
        .expect("drop database");
    database("integrity_dead");
    let b = connect(port, "integrity_dead").await;
    for i in 0..4 {
        b.batch_execute("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("read {i} after re-creating the database: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_postgres_answers_and_others_are_unaffected() {
    let server =
        start("[pool]\nsize = 4\n[clients]\nmessage_timeout_s = 1\nmax_message_mb = 1\n").await;
    let port = server.addr.port();
    let polite = tokio::spawn(async move {
        let c = connect(port, "postgres").await;
        let mut failures = 0;
        for _ in 0..200 {
            if c.query_one("SELECT 1", &[]).await.is_err() {
                failures += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failures
    });

    // Invalid UTF-8 in a Query: PostgreSQL's own ERROR 22021, session kept.
    let mut a = Raw::connect(port, "postgres", "postgres").await;
    a.send(&raw::query_bytes(b"SELECT '\xff\xfe'")).await;
    let msgs = a.until_ready().await;
    let err = msgs.iter().find(|(t, _)| *t == b'E').expect("an error");
    assert_eq!(sqlstate(&err.1), "22021", "{msgs:?}");
    let msgs = a.simple("SELECT 'mine', 42").await;
    assert_exactly_mine(&msgs, "after invalid UTF-8");

    // A second StartupMessage after login: 08P01 at once, not a hang.
    let mut b = Raw::connect(port, "postgres", "postgres").await;
    b.send(&raw::startup("postgres", "postgres")).await;
    let (tag, body) = b
        .next_within(Duration::from_secs(3))
        .await
        .expect("an answer to a second startup packet within 3 s");
    assert_eq!(tag, b'E');
    assert_eq!(sqlstate(&body), "08P01");
    let message = raw::field(&body, b'M');
    assert!(
        !message.contains("protocol violation: protocol violation"),
        "{message}"
    );

    // An unknown message type: 08P01, connection closed.
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    c.send(&[b'!', 0, 0, 0, 4]).await;
    let (tag, body) = c.next().await;
    assert_eq!((tag, sqlstate(&body).as_str()), (b'E', "08P01"));
    assert!(c.try_next().await.is_none(), "connection must close");

    assert_eq!(
        polite.await.unwrap(),
        0,
        "a well-behaved client saw failures"
    );
}

/// A replica killed (`pg_ctl stop -m immediate`) under a read load that goes
/// on after errors: reads in flight on it, and reads routed to it before the
/// health check bans it, are retried elsewhere; none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_fails_no_read() {
    // A cluster of its own: this test kills a replica.
    let cluster = tokio::task::block_in_place(|| signalbox::local::LocalCluster::start(2)).unwrap();
    let mut text = String::from("listen = \"127.0.0.1:0\"\n[pool]\nsize = 4\n");
    text.push_str(&cluster.nodes_toml());
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let port = server.addr.port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(port, "postgres").await;
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.query_one("SELECT inet_server_port()", &[]).await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed.push(match e.as_db_error() {
                            Some(d) => format!("{} {}", d.code().code(), d.message()),
                            None => e.to_string(),
                        });
                        if c.is_closed() {
                            c = connect(port, "postgres").await;
                        }
                    }
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tokio::task::block_in_place(|| cluster.kill(&cluster.replicas[0])).unwrap();
    tokio::time::sleep(Duration::from_millis(4000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!(
        "replica killed under load: {ok} reads succeeded, {} failed",
        failed.len()
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} reads failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// A function that SETs (without LOCAL) changes the session invisibly to
/// signalbox. By default the client is pinned to that connection (it keeps
/// the setting, as on PostgreSQL); with `untracked_state = "reset"` the
/// connection is fully reset before its next use. Either way no other
/// client ever sees the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_made_inside_functions_never_reach_another_client() {
    let c = cluster();
    c.psql(
        c.primary.port,
        "CREATE OR REPLACE FUNCTION sb_set_path() RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM set_config('search_path', 'sb_from_fn', false); RETURN 1; END $$",
    )
    .expect("create function");
    c.wait_replayed().unwrap();
    let on_primary = "SELECT txid_current() * 0 + 1, current_setting('search_path')";
    for (mode, keeps) in [("pin", true), ("reset", false)] {
        let server = start(&format!("{POOL1}untracked_state = \"{mode}\"\n")).await;
        let port = server.addr.port();
        let a = connect(port, "postgres").await;
        a.batch_execute("SELECT sb_set_path()").await.unwrap();
        let path: String = a.query_one(on_primary, &[]).await.unwrap().get(1);
        assert_eq!(
            path == "sb_from_fn",
            keeps,
            "{mode}: the client's own setting"
        );
        drop(a);
        let b = connect(port, "postgres").await;
        for _ in 0..3 {
            let path: String = b
                .query_one(on_primary, &[])
                .await
                .unwrap_or_else(|e| panic!("{mode}: {e:?}"))
                .get(1);
            assert_ne!(
                path, "sb_from_fn",
                "{mode}: another client's function setting leaked"
            );
        }
    }
}
