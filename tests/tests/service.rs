//! signalbox in front of a real primary and two streaming replicas: where
//! statements run (asserted from inside PostgreSQL), psql features, pooling,
//! session state, cancel, policy swaps and errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use signalbox_tests::service::{self, connect, port_of, psql, replica_ports, start};
use signalbox_tests::{admin_call, example, faulty, replace_by_rename, wait_until};

fn policy_section(path: &std::path::Path) -> String {
    format!("[policy]\npath = {:?}\n", path.display().to_string())
}

/// `inet_server_port()` of a simple query through `client`.
async fn port(client: &tokio_postgres::Client, sql: &str) -> u16 {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap().parse().unwrap();
        }
    }
    panic!("{sql}: no row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_run_where_they_must() {
    let server = start(&format!(
        "{}[policy.config]\nspread = \"statement\"\n",
        policy_section(&example("rw-split"))
    ))
    .await;
    let p = server.addr.port();
    let c = connect(p, "postgres").await;
    let primary = port_of("primary");
    let replicas = replica_ports();

    // Reads rotate over the replicas.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let got = port(&c, "SELECT inet_server_port()").await;
        assert!(replicas.contains(&got), "read ran on {got}");
        seen.insert(got);
    }
    assert_eq!(seen.len(), 2, "round-robin over both replicas");
    // Extended protocol (tokio-postgres prepares) too.
    let row = c
        .query_one("SELECT inet_server_port()::int4, pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(1));

    // Writes, DDL, locking, writable CTEs, nextval: the primary.
    c.batch_execute("DROP TABLE IF EXISTS routed; CREATE TABLE routed (id serial PRIMARY KEY, v int); CREATE SEQUENCE IF NOT EXISTS routed_seq")
        .await
        .unwrap();
    for sql in [
        "INSERT INTO routed (v) VALUES (1) RETURNING inet_server_port()",
        "SELECT inet_server_port() FROM routed FOR UPDATE",
        "WITH w AS (INSERT INTO routed (v) VALUES (2) RETURNING 1) SELECT inet_server_port() FROM w",
        "SELECT inet_server_port() FROM (SELECT nextval('routed_seq')) s",
        "/* signalbox: route=primary */ SELECT inet_server_port()",
        "UPDATE routed SET v = v + 1 RETURNING inet_server_port()",
    ] {
        assert_eq!(port(&c, sql).await, primary, "{sql}");
    }

    // A read-write transaction is pinned to the primary, start to end.
    c.batch_execute("BEGIN").await.unwrap();
    for _ in 0..3 {
        assert_eq!(port(&c, "SELECT inet_server_port()").await, primary);
    }
    c.batch_execute("COMMIT").await.unwrap();

    // A read-only transaction may use a replica, and stays on it.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let first = port(&c, "SELECT inet_server_port()").await;
    assert!(replicas.contains(&first));
    for _ in 0..3 {
        assert_eq!(port(&c, "SELECT inet_server_port()").await, first);
    }
    c.batch_execute("COMMIT").await.unwrap();

    // The metrics saw both kinds.
    let m = &server.shared.metrics;
    assert!(m.routed.value("primary") >= 7);
    assert!(m.routed.value("replica-1") + m.routed.value("replica-2") >= 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sessions_work_as_with_postgres() {
    let server = start("").await;
    let p = server.addr.port();
    let setup = "DROP TABLE IF EXISTS psql_t; CREATE TABLE psql_t (id int PRIMARY KEY, name text)";
    assert!(psql(p, "postgres", &["-c", setup], None).0);

    let (_, out) = psql(p, "postgres", &["-At", "-c", "SELECT 1; SELECT 2"], None);
    assert_eq!(out.trim(), "1\n2");

    // An error leaves the session usable.
    let (_, out) = psql(
        p,
        "postgres",
        &["-At", "-c", "SELECT nope", "-c", "SELECT 42"],
        None,
    );
    assert!(
        out.contains("column \"nope\" does not exist") && out.contains("42"),
        "{out}"
    );

    // NOTICE from a DO block reaches the client.
    let (ok, out) = psql(
        p,
        "postgres",
        &["-c", "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$"],
        None,
    );
    assert!(ok && out.contains("NOTICE:  hello 42"), "{out}");

    // COPY FROM STDIN and TO STDOUT, in one transaction: outside one, the
    // read may run on a replica that has not replayed the write yet (no
    // read-your-writes here), which failed this test under load.
    let script = "BEGIN;\nCOPY psql_t FROM STDIN;\n1\tada\n2\tgrace\n\\.\nCOPY (SELECT * FROM psql_t ORDER BY id) TO STDOUT;\nCOMMIT;\n";
    let (ok, out) = psql(p, "postgres", &["-At", "-f", "-"], Some(script));
    assert!(ok, "{out}");
    assert!(out.contains("COPY 2") || out.contains("1\tada"), "{out}");
    assert!(out.contains("1\tada\n2\tgrace"), "{out}");
    let c = service::cluster();
    let direct = c
        .psql(
            c.primary.port,
            "SELECT string_agg(name, ',' ORDER BY id) FROM psql_t",
        )
        .unwrap();
    assert_eq!(direct.trim(), "ada,grace");

    // psql's catalog commands (they depend on server_version being reported).
    c.wait_replayed().unwrap();
    let (ok, out) = psql(p, "postgres", &["-c", "\\dt"], None);
    assert!(ok && out.contains("psql_t"), "{out}");
    let (ok, out) = psql(p, "postgres", &["-c", "\\d psql_t"], None);
    assert!(
        ok && out.contains("name") && out.contains("psql_t_pkey"),
        "{out}"
    );
}

fn pgbench(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(args)
        .arg("bench")
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_without_failures_and_reads_land_on_replicas() {
    service::database("bench");
    let server = tokio::task::block_in_place(|| futures_block(start("")));
    let p = server.addr.port();
    tokio::task::block_in_place(|| {
        pgbench(p, &["-i", "-s", "1", "-q"]);
        service::cluster().wait_replayed().unwrap();
        let before: u64 = (1..3)
            .map(|i| server.shared.metrics.routed.value(&format!("replica-{i}")))
            .sum();
        for mode in ["simple", "extended", "prepared"] {
            let out = pgbench(
                p,
                &["-n", "-S", "-c", "4", "-j", "2", "-T", "2", "-M", mode],
            );
            assert!(
                out.contains("number of failed transactions: 0"),
                "{mode}: {out}"
            );
        }
        let out = pgbench(p, &["-n", "-c", "4", "-j", "2", "-T", "2"]);
        assert!(
            out.contains("number of failed transactions: 0"),
            "tpcb: {out}"
        );
        let after: u64 = (1..3)
            .map(|i| server.shared.metrics.routed.value(&format!("replica-{i}")))
            .sum();
        assert!(
            after - before > 1000,
            "the -S load should land on replicas: {}",
            after - before
        );
    });
}

/// Run a future to completion from blocking code inside the test runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepared_statements_survive_transaction_pooling() {
    let server = start("[pool]\nsize = 5\ncheckout_timeout_ms = 20000\n").await;
    let p = server.addr.port();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client_no in 0..50i32 {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(p, "postgres").await;
            let stmt = c
                .prepare("SELECT $1::int4 + 1, pg_is_in_recovery()")
                .await
                .expect("prepare");
            for i in 0..100i32 {
                let row = c
                    .query_one(&stmt, &[&(client_no * 1000 + i)])
                    .await
                    .expect("execute");
                assert_eq!(row.get::<_, i32>(0), client_no * 1000 + i + 1);
                assert!(row.get::<_, bool>(1), "read ran on the primary");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(done.load(Ordering::Relaxed), 5000);
    // 50 clients shared at most 5 connections per node.
    let idle = server.shared.live().cluster.pools.idle();
    assert!(idle.iter().all(|&n| n <= 5), "{idle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_and_never_leak() {
    // One connection per node: both clients must share it.
    let server = start("[pool]\nsize = 1\n").await;
    let p = server.addr.port();
    service::cluster()
        .psql(
            service::cluster().primary.port,
            "CREATE SCHEMA IF NOT EXISTS tenant_a",
        )
        .unwrap();
    service::cluster().wait_replayed().unwrap();
    let a = connect(p, "postgres").await;
    let b = connect(p, "postgres").await;
    a.batch_execute("SET search_path = tenant_a, public")
        .await
        .unwrap();
    a.batch_execute("SET application_name = 'client-a'")
        .await
        .unwrap();
    let show = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> String {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some(r.get(0).unwrap_or("").to_owned())
                }
                _ => None,
            })
            .unwrap()
    };
    for _ in 0..10 {
        assert_eq!(
            show(a.simple_query("SHOW search_path").await.unwrap()),
            "tenant_a, public"
        );
        assert_eq!(
            show(b.simple_query("SHOW search_path").await.unwrap()),
            "\"$user\", public"
        );
        assert_eq!(
            show(a.simple_query("SHOW application_name").await.unwrap()),
            "client-a"
        );
        assert_eq!(
            show(b.simple_query("SHOW application_name").await.unwrap()),
            ""
        );
        // And on the primary too (a write pins nothing but runs there).
        let a_primary = a
            .simple_query(
                "SELECT current_setting('search_path') FROM (SELECT nextval('routed_seq')) s",
            )
            .await;
        if let Ok(rows) = a_primary {
            assert_eq!(show(rows), "tenant_a, public");
        }
    }
    // Startup `options=-c ...` apply on every connection, like any SET.
    let (opt, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={p} user=postgres dbname=postgres options='-c search_path=tenant_a -c statement_timeout=1234'"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        assert_eq!(
            show(opt.simple_query("SHOW search_path").await.unwrap()),
            "tenant_a"
        );
        assert_eq!(
            show(opt.simple_query("SHOW statement_timeout").await.unwrap()),
            "1234ms"
        );
        assert_eq!(
            show(b.simple_query("SHOW statement_timeout").await.unwrap()),
            "0"
        );
    }
    a.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(
        show(a.simple_query("SHOW search_path").await.unwrap()),
        "\"$user\", public"
    );
    // A SET inside a rolled-back transaction does not stick.
    a.batch_execute("BEGIN; SET search_path = tenant_a; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        show(a.simple_query("SHOW search_path").await.unwrap()),
        "\"$user\", public"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_node_running_the_query() {
    let server = start("").await;
    let p = server.addr.port();
    for (label, setup) in [
        ("replica", None),
        ("primary", Some("BEGIN; SELECT txid_current()")),
    ] {
        let c = connect(p, "postgres").await;
        if let Some(s) = setup {
            c.batch_execute(s).await.unwrap();
        }
        let token = c.cancel_token();
        let sql = format!("SELECT pg_sleep(30), 'cancel on the {label}'");
        // Cancel once the sleep runs on its node: a cancel that reaches a
        // server still reading the statement is ignored.
        let running = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query = '{}' AND state = 'active'",
            sql.replace('\'', "''")
        );
        let canceller = tokio::spawn(async move {
            let c = service::cluster();
            let seen = tokio::task::spawn_blocking(move || {
                wait_until(Duration::from_secs(10), || {
                    c.all_nodes()
                        .any(|n| c.psql(n.port, &running).unwrap_or_default().trim() == "1")
                })
            })
            .await
            .unwrap_or(false);
            assert!(seen, "the statement never ran");
            token.cancel_query(tokio_postgres::NoTls).await
        });
        let started = std::time::Instant::now();
        let err = c.simple_query(&sql).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{label}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{label}: cancel took too long"
        );
        canceller.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_swap_under_load_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.wasm");
    std::fs::copy(example("rw-split"), &path).unwrap();
    let extra = format!(
        "{}[policy.watch]\ndebounce_ms = 50\n",
        policy_section(&path)
    );
    let server = start(&extra).await;
    let p = server.addr.port();
    let primary = port_of("primary");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_primary_after = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (stop, total, on_primary_after) =
            (stop.clone(), total.clone(), on_primary_after.clone());
        tasks.push(tokio::spawn(async move {
            let c = connect(p, "postgres").await;
            let mut failures = 0;
            while !stop.load(Ordering::Relaxed) {
                match c.simple_query("SELECT inet_server_port()").await {
                    Ok(rows) => {
                        total.fetch_add(1, Ordering::Relaxed);
                        for m in &rows {
                            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                                if r.get(0).and_then(|v| v.parse::<u16>().ok()) == Some(primary) {
                                    on_primary_after.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    Err(_) => failures += 1,
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_swap = on_primary_after.load(Ordering::Relaxed);
    assert_eq!(before_swap, 0, "rw-split sends no read to the primary");
    tokio::task::block_in_place(|| replace_by_rename(&faulty(&["all-primary"]), &path));
    let swapped = wait_until(Duration::from_secs(15), || {
        on_primary_after.load(Ordering::Relaxed) > 100
    });
    stop.store(true, Ordering::Relaxed);
    let mut failures = 0;
    for t in tasks {
        failures += t.await.unwrap();
    }
    assert!(
        swapped,
        "the new policy's routing never showed: {:?}",
        server.policy().status()
    );
    assert_eq!(failures, 0, "queries failed during the swap");
    assert!(total.load(Ordering::Relaxed) > 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reject_is_an_error_and_the_session_goes_on() {
    let server = start(&policy_section(&faulty(&[]))).await;
    let c = connect(server.addr.port(), "postgres").await;
    let err = c
        .simple_query("/* signalbox: deny=maintenance */ SELECT 1")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42501");
    assert!(
        db.message().contains("denied by policy: maintenance"),
        "{}",
        db.message()
    );
    assert!(port(&c, "SELECT inet_server_port()").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_53300_after_the_checkout_timeout() {
    let server = start("[pool]\nsize = 1\ncheckout_timeout_ms = 300\n").await;
    let p = server.addr.port();
    let holder = connect(p, "postgres").await;
    holder
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let other = connect(p, "postgres").await;
    let started = std::time::Instant::now();
    let err = other
        .simple_query("SELECT txid_current()")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(
        msg.contains("node primary") && msg.contains("300 ms"),
        "{msg}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    // Free again: the waiting client can proceed.
    assert!(other.simple_query("SELECT txid_current()").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_close_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start("").await;
    let p = server.addr.port();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p))
        .await
        .unwrap();
    let mut startup = Vec::new();
    let body = b"user\0postgres\0database\0postgres\0\0";
    startup.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
    startup.extend_from_slice(&196608i32.to_be_bytes());
    startup.extend_from_slice(body);
    s.write_all(&startup).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during startup");
        got.extend_from_slice(&buf[..n]);
    }
    // A query message claiming 2 GB.
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        rest.first() == Some(&b'E') && text.contains("08P01"),
        "{text}"
    );
    // Everyone else is fine.
    let c = connect(p, "postgres").await;
    assert!(port(&c, "SELECT inet_server_port()").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_postgres_own_error() {
    let server = start("").await;
    let err = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=no_such_db",
            server.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("must fail");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reports_nodes_policy_and_metrics() {
    let server = start(&policy_section(&example("rw-split"))).await;
    let admin = server.admin_addr.unwrap();
    let c = connect(server.addr.port(), "postgres").await;
    port(&c, "SELECT inet_server_port()").await;
    let get = |path: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                &format!("http://{admin}{path}"),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let health = tokio::task::block_in_place(|| get("/health"));
    assert!(health.ends_with("200"), "{health}");
    let status = tokio::task::block_in_place(|| get("/status"));
    let json: serde_json::Value =
        serde_json::from_str(status.rsplit_once('\n').unwrap().0).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(json["nodes"][0]["role"], "primary");
    assert_eq!(json["nodes"][1]["healthy"], true);
    assert!(json["policy"]["active"]["sha256"].as_str().unwrap().len() == 64);
    let metrics = tokio::task::block_in_place(|| get("/metrics"));
    assert!(
        metrics.contains("signalbox_node_up{node=\"replica-1\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("signalbox_guardrail_overrides_total{kind=\"write_to_replica\"}"));
    // 100 reads later, the replicas' routed counters rose by exactly 100.
    let on_replicas = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("signalbox_routed_total{node=\"replica-"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = on_replicas(&metrics);
    for _ in 0..100 {
        port(&c, "SELECT inet_server_port()").await;
    }
    let after = on_replicas(&tokio::task::block_in_place(|| get("/metrics")));
    assert_eq!(after - before, 100);
    let reload = tokio::task::block_in_place(|| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-X", "POST", &format!("http://{admin}/policy/reload")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    assert!(reload.contains("\"result\":\"unchanged\""), "{reload}");
}

/// rw-split by default keeps each client session on one replica (warm
/// connections), and spreads sessions over the replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_split_keeps_a_session_on_one_replica() {
    let server = start(&policy_section(&example("rw-split"))).await;
    let replicas = replica_ports();
    let mut used = std::collections::HashSet::new();
    for _ in 0..16 {
        let c = connect(server.addr.port(), "postgres").await;
        let first = port(&c, "SELECT inet_server_port()").await;
        assert!(replicas.contains(&first), "read ran on {first}");
        for _ in 0..4 {
            assert_eq!(port(&c, "SELECT inet_server_port()").await, first);
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 2, "sessions spread over both replicas");
}

/// `SET signalbox.trace = on`: every routed statement comes with a NOTICE
/// naming the node, the policy version and reason, and the classifier's
/// verdict; `off` stops it, and other sessions never see any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_notices_say_where_a_statement_ran_and_why() {
    use signalbox_tests::raw::Raw;
    let server = start(&policy_section(&example("rw-split"))).await;
    let port = server.addr.port();
    let notices = |msgs: &[(u8, Vec<u8>)]| -> Vec<String> {
        msgs.iter()
            .filter(|m| m.0 == b'N')
            .map(|m| signalbox::wire::error_fields(&m.1).1)
            .collect()
    };
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    let mut other = Raw::connect(port, "postgres", "postgres").await;
    assert!(notices(&c.simple("SELECT 1").await).is_empty());
    let set = c.simple("SET signalbox.trace = on").await;
    assert!(set.iter().any(|m| m.0 == b'C'), "{set:?}");
    let read = notices(&c.simple("SELECT 1").await);
    assert_eq!(read.len(), 1, "{read:?}");
    eprintln!("trace of a read: {}", read[0]);
    assert!(
        read[0].contains("ran on replica-") && read[0].contains("(replica)"),
        "{}",
        read[0]
    );
    assert!(read[0].contains("policy rw-split@"), "{}", read[0]);
    assert!(read[0].contains("because \"read\""), "{}", read[0]);
    assert!(read[0].contains("classifier: read-only"), "{}", read[0]);
    let write = notices(&c.simple("SELECT nextval('trace_seq')").await);
    eprintln!("trace of nextval: {}", write[0]);
    // (The sequence does not exist: the statement still ran on the primary.)
    assert!(
        write[0].contains("ran on primary") && write[0].contains("not read-only"),
        "{write:?}"
    );
    assert!(notices(&other.simple("SELECT 1").await).is_empty());
    c.simple("SET signalbox.trace = off").await;
    assert!(notices(&c.simple("SELECT 1").await).is_empty());

    // The same through psql, as an operator would: one NOTICE per
    // statement, on stderr, naming the node and the reason.
    let (ok, out) = tokio::task::block_in_place(|| {
        psql(
            port,
            "postgres",
            &[
                "-c",
                "SET signalbox.trace = on",
                "-c",
                "SELECT 1",
                "-c",
                "BEGIN",
                "-c",
                "SELECT 3",
                "-c",
                "SELECT 4",
                "-c",
                "COMMIT",
                "-c",
                "CREATE TEMP TABLE trace_t (x int)",
                "-c",
                "SELECT 2",
            ],
            None,
        )
    });
    assert!(ok, "{out}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("NOTICE:  signalbox: ran on"))
        .collect();
    // One per statement that ran on a node (SET is answered by signalbox).
    assert_eq!(lines.len(), 7, "{out}");
    assert!(
        lines[0].contains("ran on replica-") && lines[0].contains("because \"read\""),
        "{out}"
    );
    // Statements on the connection a transaction holds say so.
    assert!(lines[3].contains("inside a transaction"), "{out}");
    assert!(
        lines[5].contains("ran on primary") && lines[5].contains("because \"write\""),
        "{out}"
    );
    // The temporary table pins the session to the primary: the read too.
    assert!(
        lines[6].contains("ran on primary") && lines[6].contains("pinned"),
        "{out}"
    );
}

/// With an admin token, reading stays open on loopback but reloading and
/// rolling back need the token; a rollback restores the version that was
/// live before, and the watcher does not bring the newer file back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_changes_and_rollback_restores_the_previous_policy() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("policy.wasm");
    std::fs::copy(example("rw-split"), &live).unwrap();
    let token = "test-admin-token-0123456789";
    let server = start(&format!(
        "admin_token = \"{token}\"\n{}",
        policy_section(&live)
    ))
    .await;
    let admin = server.admin_addr.unwrap();
    let url = |p: &str| format!("http://{admin}{p}");
    let active = |s: &signalbox::server::Server| {
        s.policy()
            .status()
            .active
            .map(|p| p.sha256)
            .unwrap_or_default()
    };
    let first = active(&server);
    tokio::task::block_in_place(|| {
        assert_eq!(admin_call("GET", &url("/status"), None).0, 200);
        assert_eq!(admin_call("GET", &url("/metrics"), None).0, 200);
        let (code, body) = admin_call("POST", &url("/policy/reload"), None);
        assert_eq!(code, 401, "{body}");
        assert_eq!(
            admin_call("POST", &url("/policy/rollback"), Some("wrong")).0,
            401
        );
        // Nothing to roll back to yet.
        let (code, body) = admin_call("POST", &url("/policy/rollback"), Some(token));
        assert_eq!(code, 409, "{body}");
    });
    // A new version, activated through the API.
    signalbox_tests::replace_by_rename(&example("lag-aware"), &live);
    let (code, body) =
        tokio::task::block_in_place(|| admin_call("POST", &url("/policy/reload"), Some(token)));
    assert_eq!(code, 200, "{body}");
    let second = active(&server);
    assert_ne!(second, first);
    let (code, body) =
        tokio::task::block_in_place(|| admin_call("POST", &url("/policy/rollback"), Some(token)));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"result\":\"rolled_back\""), "{body}");
    assert_eq!(active(&server), first);
    // The file on disk is still the newer version: the watcher leaves it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(active(&server), first);
    let (_, status) = tokio::task::block_in_place(|| admin_call("GET", &url("/status"), None));
    assert!(status.contains("rolled_back"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_node_went_down_is_retried_elsewhere_not_a_hang() {
    // A cluster of its own: this test kills a replica.
    let cluster = tokio::task::block_in_place(|| signalbox::local::LocalCluster::start(1)).unwrap();
    let mut text = String::from(
        "listen = \"127.0.0.1:0\"\n[health]\ninterval_ms = 3600000\n[pool]\nconnect_timeout_ms = 2000\n",
    );
    text.push_str(&cluster.nodes_toml());
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let c = connect(server.addr.port(), "postgres").await;
    assert!(port(&c, "SELECT inet_server_port()").await > 0);
    // Kill the replica; the (hour-long) health interval has not noticed yet.
    tokio::task::block_in_place(|| cluster.kill(&cluster.replicas[0])).unwrap();
    server.shared.live().cluster.pools.drop_idle(|_, _| true);
    // The replica refuses the connection before anything was sent: the read
    // runs on the next eligible node (here the primary) instead of failing.
    let started = std::time::Instant::now();
    assert_eq!(
        port(&c, "SELECT inet_server_port()").await,
        cluster.primary.port
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The session and the primary still work; once probed, reads avoid the dead node.
    assert_eq!(
        port(&c, "SELECT txid_current()::int8 * 0 + inet_server_port()").await,
        cluster.primary.port
    );
    server.shared.live().cluster.probe_all().await;
    server.shared.live().cluster.probe_all().await;
    assert_eq!(
        port(&c, "SELECT inet_server_port()").await,
        cluster.primary.port
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_is_not_remembered_as_prepared() {
    // One connection per node, so both attempts land on the same one.
    let server = start("[pool]\nsize = 1\n").await;
    let c = connect(server.addr.port(), "postgres").await;
    for _ in 0..2 {
        let err = c.prepare("SELEC 1").await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::SYNTAX_ERROR),
            "{err:?}"
        );
    }
    // And a good statement after it still prepares and runs.
    let s = c.prepare("SELECT 41 + 1").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_authenticate_with_scram_sha_256() {
    let server = start(
        "[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"postgres\"\npassword = \"s3cret-pässword\"\n",
    )
    .await;
    let p = server.addr.port();
    let conn = |password: &str| {
        let dsn =
            format!("host=127.0.0.1 port={p} user=postgres dbname=postgres password={password}");
        async move { tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await }
    };
    // tokio-postgres speaks SCRAM-SHA-256.
    let (client, c) = conn("s3cret-pässword").await.expect("right password");
    tokio::spawn(c);
    assert!(port(&client, "SELECT inet_server_port()").await > 0);
    let err = conn("wrong").await.err().expect("wrong password must fail");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );
    // psql (libpq) too, with the password from the environment.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtc",
                "SELECT 7",
            ])
            .arg("-p")
            .arg(p.to_string())
            .env("PGPASSWORD", "s3cret-pässword")
            .output()
            .unwrap()
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "7",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtc",
                "SELECT 7",
            ])
            .arg("-p")
            .arg(p.to_string())
            .env("PGPASSWORD", "nope")
            .output()
            .unwrap()
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("password authentication failed for user \"postgres\""),
        "{stderr}"
    );
    // An unknown user fails the same way.
    let err = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={p} user=mallory dbname=postgres password=x"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
    );
}

/// A self-signed certificate for 127.0.0.1/localhost, as PEM files in `dir`.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("generate a certificate");
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_clients_and_towards_nodes() {
    use std::os::unix::fs::PermissionsExt;
    // A primary of its own with TLS on.
    let cluster = tokio::task::block_in_place(|| signalbox::local::LocalCluster::start(0)).unwrap();
    let (cert, key) = self_signed(cluster.dir.path());
    let data = &cluster.primary.data;
    std::fs::copy(&cert, data.join("server.crt")).unwrap();
    std::fs::copy(&key, data.join("server.key")).unwrap();
    let uid = std::fs::metadata(data).unwrap();
    use std::os::unix::fs::MetadataExt;
    for f in ["server.crt", "server.key"] {
        std::os::unix::fs::chown(data.join(f), Some(uid.uid()), Some(uid.gid())).unwrap();
        std::fs::set_permissions(data.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    cluster
        .psql(cluster.primary.port, "ALTER SYSTEM SET ssl = on")
        .unwrap();
    cluster
        .psql(cluster.primary.port, "SELECT pg_reload_conf()")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let text = format!(
        "listen = \"127.0.0.1:0\"\n[tls]\ncert = {cert:?}\nkey = {key:?}\nrequire = true\n\
         [[nodes]]\nname = \"primary\"\nrole = \"primary\"\n\
         url = \"postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}\"\n",
        cluster.primary.port,
        cert.display()
    );
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("tls.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let p = server.addr.port();
    let psql = |conninfo: String| {
        let out = std::process::Command::new("psql")
            .arg(conninfo)
            .args([
                "-XAtc",
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let base = format!("host=127.0.0.1 port={p} user=postgres dbname=postgres");
    // Client verifies signalbox's certificate; signalbox's node connection is TLS too.
    let (ok, out) = tokio::task::block_in_place(|| {
        psql(format!(
            "{base} sslmode=verify-full sslrootcert={}",
            cert.display()
        ))
    });
    assert!(ok && out.trim() == "t", "{out}");
    // Plain-text clients are refused when TLS is required.
    let (ok, out) = tokio::task::block_in_place(|| psql(format!("{base} sslmode=disable")));
    assert!(!ok && out.contains("requires TLS"), "{out}");
}

/// One protocol message from any stream: its tag and body.
async fn message<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let tag = s.read_u8().await?;
    let len = s.read_i32().await?;
    let mut body = vec![0u8; (len as usize).saturating_sub(4)];
    s.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// A TLS client reading large answers slowly gets all of them. TLS takes
/// bytes the socket cannot take yet into a buffer of its own and sends them
/// on the next write or a flush; signalbox did not flush, so when the
/// socket was full as an answer ended, its last bytes could stay there and
/// the client wait forever. That happens only when the socket fills at the
/// very end, so this end-to-end run catches it by chance; the relay's unit
/// test `a_flush_over_tls_leaves_nothing_behind` makes it certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tls_client_gets_the_end_of_a_large_answer() {
    use tokio::io::AsyncWriteExt;
    let cluster = tokio::task::block_in_place(|| signalbox::local::LocalCluster::start(0)).unwrap();
    let (cert, key) = self_signed(cluster.dir.path());
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [[nodes]]\nname = \"primary\"\nrole = \"primary\"\n\
         url = \"postgres://postgres@127.0.0.1:{}/postgres\"\n",
        cluster.primary.port
    );
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("tls.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // SSLRequest; signalbox answers 'S' and the handshake follows.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut answer)
        .await
        .unwrap();
    assert_eq!(answer[0], b'S');
    let connector = signalbox::tls::connector(signalbox::tls::SslMode::Require, None)
        .unwrap()
        .expect("a TLS connector");
    let name = signalbox::tls::server_name("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(&signalbox_tests::raw::startup("postgres", "postgres"))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    while message(&mut tls).await.unwrap().0 != b'Z' {}
    for round in 0..3 {
        tls.write_all(&signalbox_tests::raw::query(
            "SELECT repeat('x', 100000) FROM generate_series(1, 100)",
        ))
        .await
        .unwrap();
        tls.flush().await.unwrap();
        // Slowly: the socket towards the client stays full.
        let mut rows = 0;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), message(&mut tls)).await;
            let (tag, _) = next
                .unwrap_or_else(|_| {
                    panic!("round {round}: the end of the answer never came after {rows} rows")
                })
                .unwrap();
            match tag {
                b'D' => rows += 1,
                b'Z' => break,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        assert_eq!(rows, 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_to_nodes_with_scram_and_md5_passwords() {
    // A primary of its own whose pg_hba.conf demands passwords for two roles.
    let cluster = tokio::task::block_in_place(|| signalbox::local::LocalCluster::start(0)).unwrap();
    let pg = cluster.primary.port;
    cluster
        .psql(pg, "CREATE ROLE app_scram LOGIN PASSWORD 'scram-pw'")
        .unwrap();
    cluster
        .psql(
            pg,
            "SET password_encryption = 'md5'; CREATE ROLE app_md5 LOGIN PASSWORD 'md5-pw'",
        )
        .unwrap();
    let hba = cluster.primary.data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all app_scram 127.0.0.1/32 scram-sha-256\nhost all app_md5 127.0.0.1/32 md5\n{rules}"),
    )
    .unwrap();
    cluster.psql(pg, "SELECT pg_reload_conf()").unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[[auth.users]]\nname = \"app_scram\"\npassword = \"scram-pw\"\n\
         [[auth.users]]\nname = \"app_md5\"\npassword = \"md5-pw\"\n[[auth.users]]\nname = \"nobody\"\npassword = \"x\"\n\
         [[nodes]]\nname = \"primary\"\nrole = \"primary\"\nurl = \"postgres://postgres@127.0.0.1:{pg}/postgres\"\n"
    );
    let config =
        signalbox::config::Config::parse(&text, std::path::Path::new("auth.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    for user in ["app_scram", "app_md5"] {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user={user} dbname=postgres",
                server.addr.port()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
    }
    // A role PostgreSQL does not know: its own error, with its SQLSTATE.
    let err = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=nobody dbname=postgres",
            server.addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("unknown role");
    assert!(err.as_db_error().is_some(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_and_session_pins_keep_one_connection() {
    // Session pooling: one client, one backend connection, on the primary.
    let server = start("[pool]\nmode = \"session\"\n").await;
    let c = connect(server.addr.port(), "postgres").await;
    let pids: std::collections::HashSet<String> = {
        let mut s = std::collections::HashSet::new();
        for _ in 0..5 {
            let rows = c
                .simple_query("SELECT pg_backend_pid(), pg_is_in_recovery()")
                .await
                .unwrap();
            for m in rows {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    assert_eq!(
                        r.get(1),
                        Some("f"),
                        "session pooling serves from the primary"
                    );
                    s.insert(r.get(0).unwrap().to_owned());
                }
            }
        }
        s
    };
    assert_eq!(pids.len(), 1, "{pids:?}");
    // Transaction pooling: a temporary table pins the client to its connection.
    let server = start("").await;
    let c = connect(server.addr.port(), "postgres").await;
    c.batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (1), (2)")
        .await
        .unwrap();
    for _ in 0..5 {
        let row = c
            .query_one("SELECT sum(v)::int8 FROM scratch", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_idle_connections_do_not_block_drop_database() {
    let server = start("").await;
    let p = server.addr.port();
    let admin = connect(p, "postgres").await;
    admin
        .batch_execute("DROP DATABASE IF EXISTS doomed")
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE doomed").await.unwrap();
    tokio::task::block_in_place(|| service::cluster().wait_replayed()).unwrap();
    {
        // Use the database so the pools hold idle connections to it.
        let c = connect(p, "doomed").await;
        c.batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        tokio::task::block_in_place(|| service::cluster().wait_replayed()).unwrap();
        assert!(port(&c, "SELECT inet_server_port() FROM t").await > 0);
    }
    let idle_before: u32 = server.shared.live().cluster.pools.idle().iter().sum();
    assert!(idle_before > 0);
    admin
        .batch_execute("DROP DATABASE doomed")
        .await
        .expect("DROP DATABASE is not blocked by signalbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_stream_rows_across_syncs_inside_a_transaction() {
    let server = start("[pool]\nsize = 2\n").await;
    let mut c = connect(server.addr.port(), "postgres").await;
    let tx = c.transaction().await.unwrap();
    let stmt = tx
        .prepare("SELECT g::int4 FROM generate_series(1, 10) g")
        .await
        .unwrap();
    // Bind once, then fetch 3 rows at a time: each fetch is Execute(3) + Sync.
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let mut got = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 3).await.unwrap();
        if rows.is_empty() {
            break;
        }
        got.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    tx.commit().await.unwrap();
}

/// libpq over TLS with SCRAM: `sslmode=require` logs in (SCRAM-SHA-256-PLUS
/// with `tls-server-end-point` binding), `channel_binding=require` holds,
/// the default `sslmode=prefer` stays encrypted instead of falling back to
/// plain text, and a wrong password still fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_with_channel_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let server = start(&format!(
        "[tls]\ncert = {cert:?}\nkey = {key:?}\n[auth]\nmethod = \"scram-sha-256\"\n\
         [[auth.users]]\nname = \"postgres\"\npassword = \"tls-pw\"\n"
    ))
    .await;
    let p = server.addr.port();
    let psql = |options: &str, password: &str| {
        let out = std::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={p} user=postgres dbname=postgres {options}"
            ))
            .args([
                "-XAt",
                "-c",
                "\\conninfo",
                "-c",
                "SELECT 'through-signalbox'",
            ])
            .env("PGPASSWORD", password)
            .output()
            .expect("run psql");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let verify = format!("sslmode=verify-full sslrootcert={}", cert.display());
    for options in [
        "sslmode=require".to_string(),
        "sslmode=require channel_binding=require".to_string(),
        "sslmode=prefer".to_string(),
        format!("{verify} channel_binding=require"),
    ] {
        let (ok, out) = tokio::task::block_in_place(|| psql(&options, "tls-pw"));
        assert!(
            ok && out.contains("SSL connection") && out.contains("through-signalbox"),
            "{options}: {out}"
        );
    }
    let (ok, out) =
        tokio::task::block_in_place(|| psql("sslmode=require channel_binding=require", "wrong"));
    assert!(
        !ok && out.contains("password authentication failed"),
        "{out}"
    );
    // Plain text: SCRAM without binding works; binding cannot be had.
    let (ok, out) = tokio::task::block_in_place(|| psql("sslmode=disable", "tls-pw"));
    assert!(ok && !out.contains("SSL connection"), "{out}");
    let (ok, out) =
        tokio::task::block_in_place(|| psql("sslmode=disable channel_binding=require", "tls-pw"));
    assert!(!ok && out.contains("channel binding"), "{out}");
}

/// A client that stops in the middle of SCRAM is disconnected at the login
/// deadline with PostgreSQL's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_mid_login_is_timed_out() {
    let server = start(
        "[clients]\nlogin_timeout_s = 2\n[auth]\nmethod = \"scram-sha-256\"\n\
         [[auth.users]]\nname = \"postgres\"\npassword = \"pw\"\n",
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut c,
        &signalbox_tests::raw::startup("postgres", "postgres"),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut c, &mut got);
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("signalbox closes the connection")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("SCRAM-SHA-256"), "SASL was offered: {text}");
    assert!(
        text.contains("canceling authentication due to timeout"),
        "{text}"
    );
}

/// Before a client is authenticated, a message larger than a password or
/// SASL message can be is refused at its header (FATAL 08P01, as
/// PostgreSQL does): a stranger cannot make signalbox wait for, or reserve
/// room for, megabytes. (Before, the whole 64 MB `max_message_mb` was
/// allowed and counted against the shared budget: four such connections
/// took all of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_not_yet_authenticated_cannot_send_a_large_message() {
    use tokio::io::AsyncWriteExt;
    let server = start(
        "[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"postgres\"\npassword = \"pw\"\n",
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    c.write_all(&signalbox_tests::raw::startup("postgres", "postgres"))
        .await
        .unwrap();
    // A SASL initial response announcing 1 MB, of which 100 bytes arrive.
    let mut start_of = vec![b'p'];
    start_of.extend_from_slice(&(1i32 << 20).to_be_bytes());
    start_of.extend_from_slice(&[b'x'; 100]);
    c.write_all(&start_of).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut c, &mut got);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("refused at once, not after a timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("SCRAM-SHA-256"), "SASL was offered: {text}");
    assert!(text.contains("08P01"), "{text}");
}

/// A policy that routes by node name sees the real cluster's names, never
/// the made-up cluster it was validated against: rw-split with `read` set
/// to one real replica (names unlike any example's) sends every read there,
/// after the initial load and after a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_routes_by_the_real_node_names() {
    let c = service::cluster();
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("policy.wasm");
    std::fs::copy(example("rw-split"), &wasm).unwrap();
    let names = ["main-db", "reader-east", "reader-west"];
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}\
         [policy.config]\nread = [\"reader-west\"]\n",
        policy_section(&wasm)
    );
    for (name, node) in names.iter().zip(c.all_nodes()) {
        let role = if node.name == "primary" {
            "primary"
        } else {
            "replica"
        };
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"{name}\"\nurl = \"postgres://postgres@127.0.0.1:{}/postgres\"\nrole = \"{role}\"\n",
            node.port
        ));
    }
    let west = c.all_nodes().nth(2).unwrap().port;
    let config =
        signalbox::config::Config::parse(&text, &dir.path().join("signalbox.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let client = connect(server.addr.port(), "postgres").await;
    for round in 0..2 {
        for _ in 0..6 {
            assert_eq!(
                port(&client, "SELECT inet_server_port()").await,
                west,
                "round {round}: reads go to reader-west only"
            );
        }
        // Reload the policy (validated again against made-up nodes): the
        // same code, made a new version by a trailing custom section.
        let mut bytes = std::fs::read(&wasm).unwrap();
        bytes.extend_from_slice(&[0x00, 0x05, 0x04, b'n', b'e', b'x', b't']);
        std::fs::write(&wasm, &bytes).unwrap();
        let event = server.policy().reload("test");
        assert!(
            matches!(
                event.outcome,
                signalbox::policy::reload::Outcome::Activated { .. }
            ),
            "{:?}",
            event.outcome
        );
    }
}

/// Contract fields as a policy receives them in the running service: the
/// statement's fingerprint (pg_query's, the same for other literals), each
/// node's exchange latency and idle pooled connections; and the policy's
/// reason is recorded (a metric per reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_fields_are_true_in_the_service() {
    let server = start(&policy_section(&faulty(&["echo"]))).await;
    let client = connect(server.addr.port(), "postgres").await;
    for i in 0..5 {
        client
            .simple_query(&format!("SELECT {i} AS n, now()"))
            .await
            .unwrap();
    }
    let reasons = || -> Vec<String> {
        let rows = server.shared.metrics.reasons.snapshot();
        rows.into_iter().map(|(r, _)| r).collect()
    };
    let fp = signalbox::sql::classify::classify("SELECT 1 AS n, now()").fingerprint;
    assert_ne!(fp, 0);
    let mine: Vec<String> = reasons()
        .into_iter()
        .filter(|r| r.starts_with(&format!("fp={fp:016x}")))
        .collect();
    assert!(
        !mine.is_empty(),
        "no reason with fingerprint {fp:016x}: {:?}",
        reasons()
    );
    // "fp=… I lat=<µs>,idle=<n>,fl=<n>": outside a transaction; after the
    // first statement the primary has a latency and an idle pooled
    // connection, and nothing in flight.
    let parse = |r: &str| -> Vec<u32> {
        let p = r.rsplit(' ').next().unwrap();
        p.split(&['=', ','][..])
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    let parsed: Vec<Vec<u32>> = mine
        .iter()
        .map(|r| {
            assert!(r.contains(" I "), "{r}");
            parse(r)
        })
        .collect();
    assert!(
        parsed.iter().any(|v| v[0] > 0 && v[1] >= 1 && v[2] == 0),
        "latency, idle and in-flight as received: {mine:?}"
    );
    // Another client holds a primary connection (an open transaction):
    // the policy sees one in flight on the primary, then none again.
    let other = connect(server.addr.port(), "postgres").await;
    other.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let held = "SELECT 1 AS held";
    client.simple_query(held).await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    // That session gave its connection back before its client heard
    // COMMIT's answer: the next decision sees none in flight.
    let live = server.shared.live();
    let primary = live.cluster.view().primary().expect("a primary");
    assert_eq!(
        live.cluster.pools.in_flight(primary),
        0,
        "released only after the client heard COMMIT"
    );
    let released = "SELECT 1 AS released, 2 AS again";
    client.simple_query(released).await.unwrap();
    for (sql, want) in [(held, 1), (released, 0)] {
        let fp = signalbox::sql::classify::classify(sql).fingerprint;
        let seen: Vec<String> = reasons()
            .into_iter()
            .filter(|r| r.starts_with(&format!("fp={fp:016x}")))
            .collect();
        assert!(
            seen.iter().any(|r| parse(r)[2] == want),
            "{sql}: in-flight on the primary as received, want {want}: {seen:?}"
        );
    }
    // Other literals, same fingerprint: counted under reasons with it.
    let count: u64 = server
        .shared
        .metrics
        .reasons
        .snapshot()
        .iter()
        .filter(|(r, _)| r.starts_with(&format!("fp={fp:016x}")))
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(count, 5);

    // The write position (here a token the client presents) and which
    // nodes have replayed it: every node has replayed 0/10; only the
    // primary counts as past a position far ahead of the cluster.
    let echo = "/* signalbox: echo-lsn=1 */ SELECT 1";
    client.simple_query(echo).await.unwrap();
    client
        .batch_execute("SET signalbox.min_lsn = '0/10'")
        .await
        .unwrap();
    client.simple_query(echo).await.unwrap();
    client
        .batch_execute("SET signalbox.min_lsn = 'FFFFFFFF/0'")
        .await
        .unwrap();
    client.simple_query(echo).await.unwrap();
    let seen = reasons();
    for want in [
        "lsn=0 ago=false replayed=111",
        "lsn=10 ago=true replayed=111",
        "lsn=ffffffff00000000 ago=true replayed=100",
    ] {
        assert!(seen.iter().any(|r| r == want), "{want} not in {seen:?}");
    }
}
