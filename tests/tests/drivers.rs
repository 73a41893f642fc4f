//! Real drivers through signalbox, compared with a direct connection to the
//! primary: node-pg with Sequelize, psycopg 3 (text and binary), tokio-postgres.

use std::process::Command;

use signalbox_tests::root;
use signalbox_tests::service::{self, connect, port_of, replica_ports, start};

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what}: {e}. `cargo xtask setup` installs it; this test does not skip.")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequelize_without_replication_config() {
    let server = start("").await;
    let drivers = root().join("tests/drivers");
    assert!(
        drivers.join("node_modules/sequelize").is_dir(),
        "node packages missing: run `cargo xtask setup` (or `npm ci --prefix tests/drivers`)"
    );
    let ports: Vec<String> = replica_ports().iter().map(u16::to_string).collect();
    let out = tokio::task::block_in_place(|| {
        run(
            Command::new("node")
                .arg(drivers.join("sequelize.js"))
                .env(
                    "SB_URL",
                    format!(
                        "postgres://postgres@127.0.0.1:{}/postgres",
                        server.addr.port()
                    ),
                )
                .env(
                    "DIRECT_URL",
                    format!(
                        "postgres://postgres@127.0.0.1:{}/postgres",
                        port_of("primary")
                    ),
                )
                .env("REPLICA_PORTS", ports.join(",")),
            "node sequelize.js",
        )
    });
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["same"], true, "{out}");
    assert_eq!(v["rows"], 3);
    assert_eq!(v["readOnReplica"], true, "{out}");
    assert_eq!(v["rawShipped"], 1);
    assert_eq!(v["sample"]["status"], "shipped");
    assert_eq!(v["sample"]["meta"]["carrier"], "dhl");
    // The model's DDL and writes went to the primary, reads to replicas.
    let m = &server.shared.metrics;
    assert!(m.routed.value("primary") >= 5);
    assert!(m.routed.value("replica-1") + m.routed.value("replica-2") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_text_and_binary_round_trip() {
    let server = start("").await;
    let script = root().join("tests/drivers/psycopg_roundtrip.py");
    let dsn = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let out = tokio::task::block_in_place(|| {
        run(
            Command::new("python3")
                .arg(&script)
                .env("SB_DSN", dsn(server.addr.port()))
                .env("DIRECT_DSN", dsn(port_of("primary"))),
            "python3 psycopg_roundtrip.py (needs psycopg 3: `cargo xtask setup`)",
        )
    });
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for mode in ["text", "binary"] {
        assert_eq!(v[mode]["same"], true, "{mode}: {out}");
        assert_eq!(
            v[mode]["replica"], true,
            "{mode} read should run on a replica"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_round_trip_matches_direct() {
    let server = start("").await;
    let via = connect(server.addr.port(), "postgres").await;
    let direct = connect(port_of("primary"), "postgres").await;
    let sql = "SELECT $1::int2, $2::int4, $3::int8, $4::float4, $5::float8, $6::text, $7::bool, \
               $8::bytea, $9::int4[], $10::text[], $11::int4, pg_is_in_recovery()";
    let bytes: Vec<u8> = vec![0, 1, 2, 255];
    let ints = vec![1i32, -2, 3];
    let texts = vec!["a".to_string(), "ü".to_string(), String::new()];
    let none: Option<i32> = None;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
        &7i16,
        &-42i32,
        &9_000_000_000i64,
        &1.5f32,
        &-2.25e100f64,
        &"héllo\n\"quoted\"",
        &true,
        &bytes,
        &ints,
        &texts,
        &none,
    ];
    let describe = |r: &tokio_postgres::Row| {
        format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            r.get::<_, i16>(0),
            r.get::<_, i32>(1),
            r.get::<_, i64>(2),
            r.get::<_, f32>(3),
            r.get::<_, f64>(4),
            r.get::<_, String>(5),
            r.get::<_, bool>(6),
            r.get::<_, Vec<u8>>(7),
            r.get::<_, Vec<i32>>(8),
            r.get::<_, Vec<String>>(9),
            r.get::<_, Option<i32>>(10),
        )
    };
    let a = via.query_one(sql, &params).await.unwrap();
    let b = direct.query_one(sql, &params).await.unwrap();
    assert_eq!(describe(&a), describe(&b));
    assert!(a.get::<_, bool>(11), "ran on a replica");
    assert!(!b.get::<_, bool>(11));
    // Text-format results of the same query (simple protocol) match too.
    let q = "SELECT now()::date, '{\"k\": [1,2]}'::jsonb, interval '1 day 2 hours', int4range(1, 10), 1.50::numeric(10,3), 'x'::varchar(3)";
    let text = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL").to_owned())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        text(via.simple_query(q).await.unwrap()),
        text(direct.simple_query(q).await.unwrap())
    );
    let _ = service::cluster();
}

/// node-pg: a pg-cursor stream that fails mid-stream (Execute + Flush, no
/// Sync) and the same connection afterwards; a pooled client whose server
/// connection is terminated while idle is discarded by node-pg's pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_failing_cursor_and_terminated_pool_client() {
    let server = start("").await;
    let session = start("[pool]\nmode = \"session\"\n").await;
    let drivers = root().join("tests/drivers");
    let url = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let out = tokio::task::block_in_place(|| {
        run(
            Command::new("node")
                .arg(drivers.join("pg_protocol.js"))
                .env("SB_URL", url(server.addr.port()))
                .env("SB_SESSION_URL", url(session.addr.port()))
                .env("DIRECT_URL", url(port_of("primary"))),
            "node pg_protocol.js (needs the node packages: `cargo xtask setup`)",
        )
    });
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    // Three rounds of 40 rows, each ended by division by zero.
    assert_eq!(v["cursor"]["error"], "22012", "{out}");
    assert_eq!(v["cursor"]["rows"], 120, "{out}");
    assert_eq!(v["cursor"]["after"], "after", "{out}");
    assert_eq!(v["cursor"]["streamed"], 25, "{out}");
    // The pool saw the termination while idle and replaced the client.
    assert_eq!(v["pool"]["errors"][0], "57P01", "{out}");
    assert_ne!(v["pool"]["first"], v["pool"]["second"], "{out}");
}

/// psycopg 3: pipeline mode with an aborted statement followed by more
/// work, an idle LISTENing connection receiving a NOTIFY, and a LATIN9
/// client inserting and reading 'é€'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_pipeline_listen_and_latin9() {
    let server = start("").await;
    let c = service::cluster();
    c.psql(
        c.primary.port,
        "CREATE TABLE IF NOT EXISTS psycopg_latin9 (id serial, v text)",
    )
    .unwrap();
    c.wait_replayed().unwrap();
    let script = root().join("tests/drivers/psycopg_protocol.py");
    let out = tokio::task::block_in_place(|| {
        run(
            Command::new("python3").arg(&script).env(
                "SB_DSN",
                format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres",
                    server.addr.port()
                ),
            ),
            "python3 psycopg_protocol.py (needs psycopg 3: `cargo xtask setup`)",
        )
    });
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["pipeline_error"], "42P01", "{out}");
    assert_eq!(v["before"], "before", "{out}");
    assert_eq!(
        v["after_pipeline"],
        serde_json::json!([0, 2, 4, 6, 8]),
        "{out}"
    );
    assert_eq!(v["after_plain"], "plain", "{out}");
    assert_eq!(v["notified"], serde_json::json!(["while idle"]), "{out}");
    assert!(v["notify_seconds"].as_f64().unwrap() < 5.0, "{out}");
    assert_eq!(v["client_encoding"], "LATIN9", "{out}");
    assert_eq!(v["inserted"], "é€", "{out}");
    assert_eq!(v["read"], "é€", "{out}");
    // Stored as 'é€' (UTF-8 on the server), not as mojibake.
    let n = c
        .psql(
            c.primary.port,
            "SELECT count(*) FROM psycopg_latin9 WHERE v = 'é€'",
        )
        .unwrap();
    assert!(n.trim().parse::<u32>().unwrap() >= 1, "{n}");
}
