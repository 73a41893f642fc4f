//! Protocol fidelity against a real primary + streaming replicas, with a raw
//! protocol client: extended-protocol errors with and without Sync, servers
//! that end connections, cancel keys, notifications, databases that must be
//! alone, and which pooled connection a client gets.

use std::time::Duration;

use signalbox_tests::raw::{self, data_row, sqlstate, Msg, Raw};
use signalbox_tests::service::{cluster, database, port_of, start};

const POOL1: &str = "[pool]\nsize = 1\ncheckout_timeout_ms = 20000\n";

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// Messages that arrive within `limit` (none expected: the server owes nothing).
async fn quiet_for(c: &mut Raw, limit: Duration) -> Vec<Msg> {
    let mut got = Vec::new();
    while let Some(m) = c.next_within(limit).await {
        got.push(m);
    }
    got
}

/// The pid and secret of the BackendKeyData a client was given at login.
fn backend_key(c: &Raw) -> (i32, i32) {
    let (_, body) = c
        .login
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData at login");
    (
        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
    )
}

/// Server connections (client backends) to `db` on every node.
fn server_connections(db: &str) -> usize {
    let c = cluster();
    c.all_nodes()
        .map(|n| {
            c.psql(
                n.port,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' \
                     AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ),
            )
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX)
        })
        .sum()
}

/// The trace from the issue, byte for byte: Parse/Bind/Describe/Flush, then
/// Execute/Flush sent before the error arrives. The server skips everything
/// up to Sync; so must signalbox, and the session and its server connection
/// must come back to work on the client's Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_in_a_flush_ended_exchange_skips_to_sync() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    let mut bytes = raw::parse("", "SELECT * FROM no_such_table_anywhere");
    bytes.extend(raw::bind("", ""));
    bytes.extend(raw::describe_portal(""));
    bytes.extend(raw::flush());
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::flush());
    c.send(&bytes).await;
    let first = c.next().await;
    assert_eq!(first.0, b'E', "{first:?}");
    assert_eq!(sqlstate(&first.1), "42P01");
    let more = quiet_for(&mut c, Duration::from_millis(500)).await;
    assert!(more.is_empty(), "nothing is owed before Sync: {more:?}");
    c.send(&raw::sync()).await;
    let z = c.next().await;
    assert_eq!((z.0, z.1.as_slice()), (b'Z', &b"I"[..]));
    // The same session and the (only) server connection work on.
    let msgs = c.simple("SELECT 'after', 1").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");

    // An error during Execute of a Flush-driven stream (a cursor fetching
    // in pieces), then more Execute/Flush before the client notices.
    let mut bytes = raw::parse("", "SELECT 10 / (5 - g) FROM generate_series(1, 10) g");
    bytes.extend(raw::bind("", ""));
    bytes.extend(raw::describe_portal(""));
    bytes.extend(raw::execute("", 2));
    bytes.extend(raw::flush());
    c.send(&bytes).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(c.next().await);
    }
    assert_eq!(tags(&got), "12TDDs", "{got:?}");
    let mut bytes = raw::execute("", 4);
    bytes.extend(raw::flush());
    bytes.extend(raw::execute("", 4));
    bytes.extend(raw::flush());
    c.send(&bytes).await;
    let mut got = Vec::new();
    loop {
        let m = c.next().await;
        let err = m.0 == b'E';
        got.push(m);
        if err {
            break;
        }
    }
    assert_eq!(tags(&got), "DDE", "{got:?}");
    assert_eq!(sqlstate(&got[2].1), "22012");
    let more = quiet_for(&mut c, Duration::from_millis(500)).await;
    assert!(more.is_empty(), "nothing is owed before Sync: {more:?}");
    c.send(&raw::sync()).await;
    assert_eq!(c.next().await.0, b'Z');
    assert_eq!(tags(&c.simple("SELECT 2").await), "TDCZ");
}

/// Errors inside pipelines: with a Sync per statement the next one runs;
/// without, everything up to the Sync is skipped and answered by nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_in_pipelines_with_and_without_sync() {
    let server = start(POOL1).await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    let stmt = |sql: &str| {
        let mut b = raw::parse("", sql);
        b.extend(raw::bind("", ""));
        b.extend(raw::execute("", 0));
        b
    };
    // Sync after each: the failing one is alone in its segment.
    let fails = "SELECT * FROM no_such_table_anywhere";
    let mut bytes = stmt(fails);
    bytes.extend(raw::sync());
    bytes.extend(stmt("SELECT 'second'"));
    bytes.extend(raw::sync());
    c.send(&bytes).await;
    let mut got = c.until_ready().await;
    got.extend(c.until_ready().await);
    assert_eq!(tags(&got), "EZ12DCZ", "{got:?}");
    assert_eq!(data_row(&got[4].1), [Some("second".to_string())]);
    // One Sync at the end: the statements after the error never run.
    let mut bytes = stmt("SELECT 'first'");
    bytes.extend(stmt(fails));
    bytes.extend(stmt("SELECT 'skipped'"));
    bytes.extend(raw::sync());
    c.send(&bytes).await;
    let got = c.until_ready().await;
    assert_eq!(tags(&got), "12DCEZ", "{got:?}");
    // The same with a Flush between the statements (pipeline mode in libpq
    // and psycopg sends these), the Sync arriving late.
    let mut bytes = stmt(fails);
    bytes.extend(raw::flush());
    bytes.extend(stmt("SELECT 'skipped'"));
    bytes.extend(raw::flush());
    // A simple query too is discarded until the Sync.
    bytes.extend(raw::query("SELECT 'ignored until Sync'"));
    c.send(&bytes).await;
    let first = c.next().await;
    let got = quiet_for(&mut c, Duration::from_millis(800)).await;
    assert_eq!(
        (first.0, tags(&got).as_str()),
        (b'E', ""),
        "{first:?} {got:?}"
    );
    c.send(&raw::sync()).await;
    assert_eq!(tags(&c.until_ready().await), "Z");
    let got = c.simple("SELECT 'still here'").await;
    assert_eq!(tags(&got), "TDCZ", "{got:?}");
}

/// A server that terminates the connection looks to the client exactly as
/// on PostgreSQL: the FATAL arrives and the connection closes, whether the
/// client was running a statement or idle in a transaction (it learns at
/// once, without sending anything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_server_connection_ends_the_client_connection() {
    let server = start("").await;
    let port = server.addr.port();
    let primary = port_of("primary");
    let c = cluster();
    // Idle inside a transaction.
    let mut a = Raw::connect(port, "postgres", "postgres").await;
    let msgs = a
        .simple("BEGIN; SELECT pg_backend_pid(), txid_current()")
        .await;
    let pid = data_row(&msgs.iter().find(|m| m.0 == b'D').unwrap().1)[0]
        .clone()
        .unwrap();
    c.psql(primary, &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    terminated_while_idle(&mut a).await;

    // Running a statement.
    let mut b = Raw::connect(port, "postgres", "postgres").await;
    b.send(&raw::query(
        "SELECT txid_current(), pg_sleep(30), 'to-be-terminated'",
    ))
    .await;
    let killed = tokio::task::block_in_place(|| {
        signalbox_tests::wait_until(Duration::from_secs(10), || {
            c.psql(
                primary,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query LIKE '%to-be-terminated%' AND pid <> pg_backend_pid()",
            )
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
        })
    });
    assert!(killed);
    // (The row description may come first: the query had started.)
    let fatal = loop {
        let m = b.next().await;
        if m.0 == b'E' {
            break m;
        }
    };
    assert_eq!(raw::field(&fatal.1, b'S'), "FATAL");
    assert_eq!(sqlstate(&fatal.1), "57P01", "{fatal:?}");
    assert!(b.try_next().await.is_none(), "the connection is closed");

    // Between transactions, a transaction-pooled client holds no server
    // connection: terminating pooled backends costs it nothing, once they
    // are gone (the kill waits for that: a backend still dying when the
    // statement reaches it sends its FATAL as the answer, and a write
    // cannot be run again). (A database of its own: other tests'
    // connections are left alone.)
    database("protocol_terminated");
    let mut d = Raw::connect(port, "postgres", "protocol_terminated").await;
    assert_eq!(tags(&d.simple("SELECT txid_current() > 0").await), "TDCZ");
    let killed = c
        .psql(
            primary,
            "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity \
             WHERE datname = 'protocol_terminated'",
        )
        .unwrap();
    assert_eq!(killed.trim(), "1", "the pooled connection was there");
    let msgs = d.simple("SELECT txid_current() > 0").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
}

/// Transaction mode: the pid a client is told can never be a server's pid.
/// Session mode: it is the real backend's, and cancel requests with that
/// key stop the client's query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_is_never_someone_elses_pid() {
    let server = start("").await;
    let port = server.addr.port();
    let mut keys = std::collections::HashSet::new();
    for _ in 0..20 {
        let c = Raw::connect(port, "postgres", "postgres").await;
        let (pid, _) = backend_key(&c);
        assert!(pid > 1 << 22, "pid {pid} is in the kernel's pid range");
        assert!(keys.insert(backend_key(&c)), "a key was handed out twice");
    }
    drop(server);

    let server = start("[pool]\nmode = \"session\"\n").await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    let (pid, secret) = backend_key(&c);
    let msgs = c.simple("SELECT pg_backend_pid()").await;
    let real = data_row(&msgs[1].1)[0].clone().unwrap();
    assert_eq!(real, pid.to_string(), "session mode tells the real pid");

    // A cancel request to signalbox with that key stops the query.
    c.send(&raw::query("SELECT pg_sleep(30), 'cancelled by key'"))
        .await;
    // Cancel once the sleep runs (on whichever node: a read may be
    // offloaded to a replica): a cancel that reaches a server still
    // reading the statement is ignored.
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE query LIKE '%cancelled by key''' AND state = 'active'";
    let seen = || {
        let c = cluster();
        c.all_nodes()
            .any(|n| c.psql(n.port, running).unwrap_or_default().trim() == "1")
    };
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(10),
        seen
    )));
    let mut cancel = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend(80_877_102i32.to_be_bytes());
    packet.extend(pid.to_be_bytes());
    packet.extend(secret.to_be_bytes());
    tokio::io::AsyncWriteExt::write_all(&mut cancel, &packet)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let msgs = c.until_ready().await;
    let err = msgs.iter().find(|m| m.0 == b'E').expect("canceled");
    assert_eq!(sqlstate(&err.1), "57014", "{msgs:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // One backend per session: once this client has left, the next session
    // never gets its backend (whose key this client knows).
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut next = Raw::connect(port, "postgres", "postgres").await;
    assert_ne!(backend_key(&next), (pid, secret));
    let msgs = next.simple("SELECT pg_backend_pid()").await;
    assert_ne!(data_row(&msgs[1].1)[0].clone().unwrap(), real);
}

/// A LISTENing client that sits idle gets notifications as they arrive,
/// the first one included; its own NOTIFY names the pid it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_listener_receives_notifications_at_once() {
    let server = start("").await;
    let port = server.addr.port();
    let mut l = Raw::connect(port, "postgres", "postgres").await;
    let (my_pid, _) = backend_key(&l);
    assert_eq!(tags(&l.simple("LISTEN signalbox_news").await), "CZ");
    let mut n = Raw::connect(port, "postgres", "postgres").await;
    for i in 0..3 {
        n.simple(&format!("NOTIFY signalbox_news, 'hello {i}'"))
            .await;
        let m = l
            .try_next()
            .await
            .expect("the notification arrives while the listener is idle");
        assert_eq!(m.0, b'A', "{m:?}");
        let text = String::from_utf8_lossy(&m.1[4..]).into_owned();
        assert!(text.contains(&format!("hello {i}")), "{text}");
    }
    // Its own notification carries the pid it was told at login.
    let msgs = l.simple("NOTIFY signalbox_news, 'self'").await;
    let a = msgs.iter().find(|m| m.0 == b'A').expect("own notification");
    let pid = i32::from_be_bytes([a.1[0], a.1[1], a.1[2], a.1[3]]);
    assert_eq!(pid, my_pid);
}

/// Pooled idle connections to a template database do not block `CREATE
/// DATABASE … TEMPLATE`, nor renaming a database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_do_not_block_create_database_from_a_template() {
    let server = start("").await;
    let port = server.addr.port();
    database("tmpl_src");
    let c = cluster();
    let _ = c.psql(c.primary.port, "DROP DATABASE IF EXISTS tmpl_copy");
    let _ = c.psql(c.primary.port, "DROP DATABASE IF EXISTS tmpl_moved");
    // Leave idle pooled connections to tmpl_src on the primary.
    for _ in 0..3 {
        let mut a = Raw::connect(port, "postgres", "tmpl_src").await;
        assert_eq!(tags(&a.simple("SELECT txid_current() > 0").await), "TDCZ");
    }
    assert!(
        server_connections("tmpl_src") > 0,
        "the pool kept connections"
    );
    let mut admin = Raw::connect(port, "postgres", "postgres").await;
    let msgs = admin
        .simple("CREATE DATABASE tmpl_copy TEMPLATE tmpl_src")
        .await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    for _ in 0..2 {
        let mut a = Raw::connect(port, "postgres", "tmpl_copy").await;
        assert_eq!(tags(&a.simple("SELECT txid_current() > 0").await), "TDCZ");
    }
    let msgs = admin
        .simple("ALTER DATABASE tmpl_copy RENAME TO tmpl_moved")
        .await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    let msgs = admin.simple("DROP DATABASE tmpl_moved").await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
}

/// One client running one statement at a time stays on one server
/// connection even when the pool holds several idle ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_client_reuses_the_most_recent_connection() {
    let server = start("[pool]\nsize = 4\n").await;
    let port = server.addr.port();
    // Four connections to the primary, all idle afterwards.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut h = Raw::connect(port, "postgres", "postgres").await;
        assert_eq!(
            tags(&h.simple("BEGIN; SELECT txid_current()").await),
            "CTDCZ"
        );
        holders.push(h);
    }
    for h in &mut holders {
        assert_eq!(tags(&h.simple("COMMIT").await), "CZ");
    }
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..20 {
        let msgs = c.simple("SELECT pg_backend_pid(), txid_current()").await;
        pids.insert(data_row(&msgs[1].1)[0].clone().unwrap());
    }
    assert_eq!(pids.len(), 1, "one client, one connection: {pids:?}");
}

/// The `client_encoding` ParameterStatus a client gets at login.
fn reported_encoding(c: &Raw) -> String {
    c.login
        .iter()
        .filter(|(t, _)| *t == b'S')
        .find_map(|(_, body)| {
            let mut parts = body.split(|b| *b == 0);
            (parts.next() == Some(b"client_encoding"))
                .then(|| String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned())
        })
        .expect("client_encoding reported")
}

/// A LATIN9 client: its bytes reach the server untouched (simple and
/// extended protocol), its reads are still classified and offloaded, and
/// names are reported as PostgreSQL reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_clients_are_served_and_classified() {
    let server = start("").await;
    let port = server.addr.port();
    let c = cluster();
    c.psql(
        c.primary.port,
        "CREATE TABLE IF NOT EXISTS enc_latin9 (id serial, v text)",
    )
    .unwrap();
    let utf = Raw::connect_with(port, "postgres", "postgres", &[("client_encoding", "utf8")]).await;
    assert_eq!(reported_encoding(&utf), "UTF8");
    let mut l = Raw::connect_with(
        port,
        "postgres",
        "postgres",
        &[("client_encoding", "iso-8859-15")],
    )
    .await;
    assert_eq!(reported_encoding(&l), "LATIN9");
    let euro = b"'\xe9\xa4'"; // 'é€' in LATIN9
    let mut insert = b"INSERT INTO enc_latin9 (v) VALUES (".to_vec();
    insert.extend_from_slice(euro);
    insert.extend_from_slice(b") RETURNING v, pg_is_in_recovery()");
    l.send(&raw::query_bytes(&insert)).await;
    let msgs = l.until_ready().await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
    let row = raw::data_row_bytes(&msgs[1].1);
    assert_eq!(row[0].as_deref(), Some(&b"\xe9\xa4"[..]));
    assert_eq!(
        row[1].as_deref(),
        Some(&b"f"[..]),
        "the write ran on the primary"
    );
    // The same bytes through Parse/Bind/Execute.
    let mut bytes = raw::parse_bytes("", &insert);
    bytes.extend(raw::bind("", ""));
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::sync());
    l.send(&bytes).await;
    let msgs = l.until_ready().await;
    assert_eq!(tags(&msgs), "12DCZ", "{msgs:?}");
    assert_eq!(
        raw::data_row_bytes(&msgs[2].1)[0].as_deref(),
        Some(&b"\xe9\xa4"[..])
    );
    // The server stored UTF-8 'é€'.
    let stored = c
        .psql(
            c.primary.port,
            "SELECT count(*) FROM enc_latin9 WHERE v = 'é€'",
        )
        .unwrap();
    assert!(stored.trim().parse::<u32>().unwrap() >= 2, "{stored}");
    c.wait_replayed().unwrap();
    // A read with LATIN9 text is classified (read-only) and offloaded.
    let mut read = b"SELECT count(*) > 0, pg_is_in_recovery() FROM enc_latin9 WHERE v = ".to_vec();
    read.extend_from_slice(euro);
    l.send(&raw::query_bytes(&read)).await;
    let msgs = l.until_ready().await;
    let row = data_row(&msgs[1].1);
    assert_eq!(
        row,
        [Some("t".to_string()), Some("t".to_string())],
        "found, on a replica"
    );
    // SET client_encoding mid-session is followed (the server reports it).
    let msgs = l.simple("SET client_encoding = 'UTF8'").await;
    assert_eq!(tags(&msgs), "CSZ", "{msgs:?}");
    let msgs = l
        .simple("SELECT v, pg_is_in_recovery() FROM enc_latin9 WHERE v = 'é€' LIMIT 1")
        .await;
    let row = data_row(&msgs[1].1);
    assert_eq!(row, [Some("é€".to_string()), Some("t".to_string())]);
    // An unknown encoding is refused as PostgreSQL refuses it.
    let mut bad = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut bad,
        &raw::startup_with("postgres", "postgres", &[("client_encoding", "klingon")]),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut bad, &mut got),
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("22023") && text.contains("client_encoding"),
        "{text}"
    );
}

/// 200 clients vanish at random moments of pipelines and streams (mid-row,
/// after a Flush-ended error, idle in a transaction, mid-COPY, while the
/// server sleeps), some with a TCP reset, some with a plain close. Nothing
/// is left behind: no signalbox session, no busy server connection, no
/// leased connection, and no more server connections than the pool allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_disconnects_leave_no_session_or_server_connection_behind() {
    database("protocol_chaos");
    let server = start("[pool]\nsize = 3\ncheckout_timeout_ms = 20000\n").await;
    let port = server.addr.port();
    let metrics = &server.shared.metrics;
    let sessions = || {
        metrics
            .sessions_active
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let big = "SELECT repeat('x', 40) || g FROM generate_series(1, 200000) g";
    let (sessions_before, connections_before) = (sessions(), server_connections("protocol_chaos"));
    let mut seed: u64 = 0x5157_a1b0_c0ff_ee00;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for i in 0..200 {
        let mut c = Raw::connect(port, "postgres", "protocol_chaos").await;
        match next() % 7 {
            0 => {
                c.send(&raw::query(big)).await;
                c.read_some(next() % 4096 + 1).await;
            }
            1 => {
                let mut b = raw::parse("", big);
                b.extend(raw::bind("", ""));
                b.extend(raw::describe_portal(""));
                b.extend(raw::execute("", 1000));
                b.extend(raw::flush());
                c.send(&b).await;
                c.read_some(next() % 4096 + 1).await;
            }
            2 => {
                let mut b = raw::parse("", "SELECT * FROM no_such_table_anywhere");
                b.extend(raw::bind("", ""));
                b.extend(raw::flush());
                b.extend(raw::execute("", 0));
                b.extend(raw::flush());
                c.send(&b).await;
                assert_eq!(c.next().await.0, b'E', "iteration {i}");
            }
            3 => {
                let mut b = Vec::new();
                for n in 0..20 {
                    b.extend(raw::parse("", &format!("SELECT {n}, pg_sleep(0.01)")));
                    b.extend(raw::bind("", ""));
                    b.extend(raw::execute("", 0));
                    if n % 5 == 4 {
                        b.extend(raw::sync());
                    }
                }
                c.send(&b).await;
                c.read_some(next() % 512 + 1).await;
            }
            4 => {
                c.simple("BEGIN; SELECT txid_current()").await;
            }
            5 => {
                c.send(&raw::query(
                    "COPY (SELECT g, repeat('y', 50) FROM generate_series(1, 200000) g) TO STDOUT",
                ))
                .await;
                c.read_some(next() % 8192 + 1).await;
            }
            _ => {
                // Longer than the settle window below: only a cancel ends it.
                c.send(&raw::query("SELECT pg_sleep(60), 'sleeper'")).await;
                tokio::time::sleep(Duration::from_millis(next() as u64 % 50)).await;
            }
        }
        if next() % 2 == 0 {
            c.reset();
        } else {
            drop(c);
        }
    }
    let busy = || busy_in("protocol_chaos");
    let settled = tokio::task::block_in_place(|| {
        signalbox_tests::wait_until(Duration::from_secs(30), || {
            sessions() == sessions_before
                && (0..3).all(|n| server.shared.live().cluster.pools.in_flight(n) == 0)
                && busy() == 0
        })
    });
    assert!(
        settled,
        "left behind: {} sessions, in flight {:?}, {} busy server connections",
        sessions(),
        (0..3)
            .map(|n| server.shared.live().cluster.pools.in_flight(n))
            .collect::<Vec<_>>(),
        busy()
    );
    let total = server_connections("protocol_chaos");
    eprintln!(
        "200 random disconnects: sessions {sessions_before} before, {} after; \
         server connections {connections_before} before, {total} after (all idle)",
        sessions()
    );
    assert!(
        total <= connections_before + 3 * 3,
        "{total} server connections for pools of 3 on 3 nodes"
    );
    // And the next client is served normally.
    let mut last = Raw::connect(port, "postgres", "protocol_chaos").await;
    let msgs = last.simple("SELECT 'mine', 42").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
}

/// An idle client whose server connection was terminated gets what
/// PostgreSQL sends (FATAL 57P01), then the connection closes.
async fn terminated_while_idle(a: &mut Raw) {
    let fatal = a
        .try_next()
        .await
        .expect("the FATAL reaches the idle client");
    assert_eq!(fatal.0, b'E');
    assert_eq!(raw::field(&fatal.1, b'S'), "FATAL");
    assert_eq!(sqlstate(&fatal.1), "57P01");
    assert!(a.try_next().await.is_none(), "the connection is closed");
}

/// A frame built from parts (for names that are not UTF-8).
fn frame(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = parts.concat();
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Flush-ended work that fails before reaching any server (here: the pool
/// is exhausted) gets an error and no ReadyForQuery; what follows up to the
/// client's Sync is skipped, as the server would skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_ended_batch_refused_by_signalbox_skips_to_sync() {
    database("protocol_exhausted");
    let server = start("[pool]\nsize = 1\ncheckout_timeout_ms = 300\n").await;
    let port = server.addr.port();
    let mut holder = Raw::connect(port, "postgres", "protocol_exhausted").await;
    assert_eq!(
        tags(&holder.simple("BEGIN; SELECT txid_current()").await),
        "CTDCZ"
    );
    let mut c = Raw::connect(port, "postgres", "protocol_exhausted").await;
    let mut bytes = raw::parse("", "SELECT txid_current()");
    bytes.extend(raw::bind("", ""));
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::flush());
    c.send(&bytes).await;
    let e = c.next().await;
    assert_eq!((e.0, sqlstate(&e.1).as_str()), (b'E', "53300"), "{e:?}");
    let mut more = raw::execute("", 0);
    more.extend(raw::flush());
    c.send(&more).await;
    let got = quiet_for(&mut c, Duration::from_millis(800)).await;
    assert!(got.is_empty(), "nothing is owed before Sync: {got:?}");
    c.send(&raw::sync()).await;
    assert_eq!(tags(&c.until_ready().await), "Z");
    assert_eq!(tags(&holder.simple("COMMIT").await), "CZ");
    assert_eq!(tags(&c.simple("SELECT 1").await), "TDCZ");
}

/// Clients in different encodings share pooled connections safely: the
/// settings of a UTF-8 client are restored intact on a connection a LATIN9
/// client left; the same statement bytes in two encodings are two
/// statements; names that are not UTF-8 work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_in_different_encodings_share_connections_safely() {
    database("protocol_encodings");
    let server = start(POOL1).await;
    let port = server.addr.port();
    let db = "protocol_encodings";
    let latin9 = [("client_encoding", "LATIN9")];
    // A UTF-8 literal prepared by a UTF-8 client under a name ...
    let text = "SELECT 'é' || $1::text".as_bytes();
    let named = |name: &[u8], portal: &[u8]| {
        let mut b = frame(b'P', &[name, b"\0", text, b"\0", &[0, 0]]);
        b.extend(frame(
            b'B',
            &[
                portal,
                b"\0",
                name,
                b"\0",
                &[0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0],
            ],
        ));
        b.extend(frame(b'E', &[portal, b"\0", &[0, 0, 0, 0]]));
        b.extend(raw::sync());
        b
    };
    let mut u = Raw::connect(port, "postgres", db).await;
    u.send(&named(b"s1", b"")).await;
    let msgs = u.until_ready().await;
    assert_eq!(tags(&msgs), "12DCZ", "{msgs:?}");
    assert_eq!(
        raw::data_row_bytes(&msgs[2].1)[0].as_deref(),
        Some("éx".as_bytes())
    );
    // ... and the same bytes from a LATIN9 client mean 'Ã©': its own statement.
    let mut l = Raw::connect_with(port, "postgres", db, &latin9).await;
    l.send(&named(b"s1\xe9", b"p\xe9")).await;
    let msgs = l.until_ready().await;
    assert_eq!(tags(&msgs), "12DCZ", "{msgs:?}");
    assert_eq!(
        raw::data_row_bytes(&msgs[2].1)[0].as_deref(),
        Some(&b"\xc3\xa9x"[..]),
        "LATIN9 bytes C3 A9 are 'Ã©', returned as C3 A9"
    );
    drop(l);
    // The only connection now had LATIN9; a UTF-8 client's non-ASCII
    // settings are restored on it intact.
    let mut v = Raw::connect_with(port, "postgres", db, &[("myapp.label", "café€")]).await;
    let msgs = v.simple("SELECT current_setting('myapp.label')").await;
    assert_eq!(
        data_row(&msgs[1].1),
        [Some("café€".to_string())],
        "{msgs:?}"
    );
}

/// COPY FROM STDIN through the extended protocol, as libpq and
/// tokio-postgres send it: Parse/Bind/Execute/Sync, the data, then
/// CopyDone (or CopyFail) and a Sync. The server ignores the first Sync
/// while it reads COPY data and answers the second; the client gets
/// CommandComplete and ReadyForQuery (or the error and ReadyForQuery), and
/// the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_copy_in_completes() {
    let server = start("").await;
    let primary = port_of("primary");
    let c = cluster();
    c.psql(
        primary,
        "CREATE TABLE IF NOT EXISTS protocol_copied (v int)",
    )
    .unwrap();
    let mut a = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let start_copy = [
        raw::parse("", "COPY protocol_copied FROM STDIN"),
        raw::bind("", ""),
        raw::execute("", 0),
        raw::sync(),
    ]
    .concat();
    a.send(&start_copy).await;
    assert_eq!(
        tags(&[a.next().await, a.next().await, a.next().await]),
        "12G"
    );
    a.send(&[raw::copy_data(b"7\n8\n"), raw::copy_done(), raw::sync()].concat())
        .await;
    let msgs = a.until_ready().await;
    assert_eq!(tags(&msgs), "CZ", "{msgs:?}");
    // CopyFail: the server's error, then ReadyForQuery; nothing copied.
    a.send(&start_copy).await;
    assert_eq!(
        tags(&[a.next().await, a.next().await, a.next().await]),
        "12G"
    );
    let mut fail = b"client gave up".to_vec();
    fail.push(0);
    let copy_fail = {
        let mut m = vec![b'f'];
        m.extend_from_slice(&((fail.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(&fail);
        m
    };
    a.send(&[raw::copy_data(b"9\n"), copy_fail, raw::sync()].concat())
        .await;
    let msgs = a.until_ready().await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(sqlstate(&msgs[0].1), "57014");
    // The session goes on.
    assert_eq!(tags(&a.simple("SELECT 1").await), "TDCZ");
    let copied = c
        .psql(
            primary,
            "SELECT string_agg(v::text, ',' ORDER BY v) FROM protocol_copied",
        )
        .unwrap();
    assert_eq!(copied.trim(), "7,8");
    c.psql(primary, "DROP TABLE protocol_copied").unwrap();
}

/// A message that starts but never finishes (a slowloris) is bounded: after
/// `message_timeout_s` the client gets FATAL 08P01 and the connection is
/// closed, and the service goes on serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_never_finishes_is_timed_out() {
    let server = start("[clients]\nmessage_timeout_s = 1\n").await;
    let port = server.addr.port();
    let mut a = Raw::connect(port, "postgres", "postgres").await;
    // A Query announcing 100 bytes of which 10 arrive.
    let mut partial = vec![b'Q'];
    partial.extend_from_slice(&104i32.to_be_bytes());
    partial.extend_from_slice(b"SELECT 1; ");
    a.send(&partial).await;
    let started = std::time::Instant::now();
    let fatal = a
        .next_within(Duration::from_secs(5))
        .await
        .expect("an answer within 5 s");
    assert_eq!(fatal.0, b'E', "{fatal:?}");
    assert_eq!(raw::field(&fatal.1, b'S'), "FATAL");
    assert_eq!(sqlstate(&fatal.1), "08P01");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "timed out after {waited:?}, before the 1 s bound"
    );
    assert!(a.try_next().await.is_none(), "the connection is closed");
    let mut b = Raw::connect(port, "postgres", "postgres").await;
    assert_eq!(tags(&b.simple("SELECT 1").await), "TDCZ");
}

/// The message timeout counts from the message's start: a client sending
/// a byte now and then cannot stretch it (each read used to start the
/// timeout over, so a trickle kept the message, and its reserved buffer
/// room, open for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_trickling_in_is_timed_out_from_its_start() {
    let server = start("[clients]\nmessage_timeout_s = 1\n").await;
    let mut a = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let mut partial = vec![b'Q'];
    partial.extend_from_slice(&104i32.to_be_bytes());
    partial.extend_from_slice(b"SELECT 1; ");
    a.send(&partial).await;
    let started = std::time::Instant::now();
    let mut answer = None;
    // One more byte every 300 ms, for up to 6 s: never the whole message.
    for _ in 0..20 {
        answer = a.next_within(Duration::from_millis(300)).await;
        if answer.is_some() {
            break;
        }
        a.send(b" ").await;
    }
    let fatal = answer.expect("the trickle was timed out");
    eprintln!("timed out after {:?}", started.elapsed());
    assert_eq!(fatal.0, b'E', "{fatal:?}");
    assert_eq!(sqlstate(&fatal.1), "08P01");
}

/// A transaction-pooled client pinned to its server connection (LISTEN)
/// and idle between transactions learns at once that the connection was
/// terminated, as it would directly: the FATAL is forwarded and the
/// connection closed, without the client sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_idle_client_learns_its_connection_died() {
    let server = start("").await;
    let primary = port_of("primary");
    let c = cluster();
    let mut a = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    assert_eq!(
        tags(&a.simple("LISTEN protocol_pinned_channel").await),
        "CZ"
    );
    let killed = c
        .psql(
            primary,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE query = 'LISTEN protocol_pinned_channel'",
        )
        .unwrap();
    assert_eq!(killed.trim(), "1");
    terminated_while_idle(&mut a).await;
}

/// Session pooling: a setting from the startup packet that the server
/// refuses, met while the session's connection is being prepared, ends
/// the login with a FATAL naming it (as PostgreSQL would), not a silent
/// close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_settings_cannot_be_applied_gets_a_fatal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start("[pool]\nmode = \"session\"\n").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.addr.port()))
        .await
        .unwrap();
    s.write_all(&raw::startup_with(
        "postgres",
        "postgres",
        &[("options", "-c work_mem=banana")],
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    let read = async {
        while let Ok(tag) = s.read_u8().await {
            let len = s.read_i32().await.unwrap_or(4);
            let mut body = vec![0u8; (len as usize).saturating_sub(4)];
            if s.read_exact(&mut body).await.is_err() {
                break;
            }
            got.push((tag, body));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the connection ends within 10 s");
    let err = got
        .iter()
        .find(|m| m.0 == b'E')
        .unwrap_or_else(|| panic!("no error before the close: {got:?}"));
    assert_eq!(raw::field(&err.1, b'S'), "FATAL");
    assert_eq!(sqlstate(&err.1), "22023");
    assert!(raw::field(&err.1, b'M').contains("work_mem"), "{err:?}");
    assert!(got.iter().all(|m| m.0 != b'Z'), "no ReadyForQuery: {got:?}");
}

/// signalbox in front of the primary alone, with a pool of one connection
/// (`pool` adds to `[pool]` and may open further tables).
async fn one_connection(pool: &str) -> signalbox::server::Server {
    one_connection_to(cluster().primary.port, pool).await
}

/// [`one_connection`] to the primary as reached at `port`.
async fn one_connection_to(port: u16, pool: &str) -> signalbox::server::Server {
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[pool]\nsize = 1\n{pool}\
         [[nodes]]\nname = \"primary\"\nurl = \"postgres://postgres@127.0.0.1:{port}/postgres\"\nrole = \"primary\"\n"
    );
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("test.toml"))
        .expect("test config");
    signalbox::server::Server::start(config)
        .await
        .expect("signalbox starts")
}

/// Server connections to `db`, on every node, that are not idle (a failed
/// query counts as busy, so a broken node fails the check).
fn busy_in(db: &str) -> usize {
    let c = cluster();
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state <> 'idle'");
    c.all_nodes()
        .map(|n| {
            c.psql(n.port, &sql)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(usize::MAX)
        })
        .fold(0usize, usize::saturating_add)
}

/// A client that sends a long statement and vanishes at once leaves nothing
/// running: its connection is closed and the statement cancelled, even when
/// the cancel reaches the server before the statement has started there (a
/// server ignores a cancel that arrives while it is still reading the
/// statement; signalbox asks again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_client_vanished_at_once_does_not_run_on() {
    database("protocol_vanish");
    let server = start("").await;
    let port = server.addr.port();
    for i in 0..100u64 {
        let mut c = Raw::connect(port, "postgres", "protocol_vanish").await;
        c.send(&raw::query("SELECT pg_sleep(60), 'vanished'")).await;
        tokio::time::sleep(Duration::from_micros(i * 50)).await;
        c.reset();
    }
    let busy = || busy_in("protocol_vanish");
    let settled = tokio::task::block_in_place(|| {
        signalbox_tests::wait_until(Duration::from_secs(15), || busy() == 0)
    });
    assert!(settled, "{} statements still run", busy());
}

/// A client that stops reading cannot keep a server connection once the
/// server has finished answering: the connection goes back to the pool
/// before the answer is written to the client, so a client whose socket is
/// full blocks only itself. (Before, its session held the connection until
/// the client read the answer's last bytes: with a pool of one, everyone
/// else waited and got 53300.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_no_server_connection() {
    database("protocol_unread");
    // The primary alone: every statement needs its one pooled connection.
    let server = one_connection("checkout_timeout_ms = 1000\n").await;
    let port = server.addr.port();
    let mut reader = Raw::connect(port, "postgres", "protocol_unread").await;
    let mut other = Raw::connect(port, "postgres", "protocol_unread").await;
    // Reads of ~60 KB each, pipelined and never read: the kernel's buffers
    // fill up and the session blocks writing an answer.
    let one = raw::query("SELECT repeat('x', 60000)");
    reader.send(&one.repeat(400)).await;
    let decisions = || {
        server
            .shared
            .router
            .stats
            .decisions
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut last = decisions();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = decisions();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    assert!(last < 400, "the reader's answers never filled its socket");
    // The blocked session holds no server connection: the other client's
    // statement gets the pool's only one.
    let msgs = other.simple("SELECT 'served'").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
    assert_eq!(data_row(&msgs[1].1)[0].as_deref(), Some("served"));
    drop(reader);
}

/// Inside a transaction the connection stays with the client between
/// statements, so the end of each answer is written while it is held: a
/// client that stops reading there is given up on after the write timeout
/// too, its transaction rolled back, and the connection serves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_inside_a_transaction_is_cut_off() {
    database("protocol_stalled");
    let server =
        one_connection("checkout_timeout_ms = 8000\n[clients]\nwrite_timeout_s = 1\n").await;
    let port = server.addr.port();
    let mut reader = Raw::connect(port, "postgres", "protocol_stalled").await;
    let mut other = Raw::connect(port, "postgres", "protocol_stalled").await;
    // Answers of ~60 KB each (each under the size at which signalbox
    // writes mid-answer), pipelined inside a transaction and never read.
    let mut batch = raw::query("BEGIN");
    batch.extend(raw::query("SELECT repeat('x', 60000)").repeat(400));
    reader.send(&batch).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = other.simple("SELECT 'served'").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
    let stalled = || {
        server
            .shared
            .metrics
            .stalled_clients
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(15),
        || stalled() == 1
    )));
}

/// A client that stops reading in the middle of an answer holds its server
/// connection for `[clients] write_timeout_s` at most: then it is
/// disconnected, its statement cancelled, and the connection serves the
/// others. (Before, it held the connection for as long as it did not read:
/// with a pool of one, everyone else got 53300.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_mid_answer_is_cut_off_after_the_write_timeout() {
    database("protocol_stalled");
    let primary = cluster().primary.port;
    let server =
        one_connection("checkout_timeout_ms = 8000\n[clients]\nwrite_timeout_s = 3\n").await;
    let port = server.addr.port();
    // A client reading slowly but steadily (about 3 s for 15 MB) is never
    // cut off: the limit is on taking nothing, not on the whole answer.
    let mut slow = Raw::connect(port, "postgres", "protocol_stalled").await;
    slow.send(&raw::query(
        "SELECT repeat('x', 100000) FROM generate_series(1, 150)",
    ))
    .await;
    let (mut rows, started) = (0, std::time::Instant::now());
    loop {
        match slow.next().await.0 {
            b'D' => rows += 1,
            b'Z' => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rows, 150);
    eprintln!("the slow reader took {:?}", started.elapsed());
    let mut reader = Raw::connect(port, "postgres", "protocol_stalled").await;
    let mut other = Raw::connect(port, "postgres", "protocol_stalled").await;
    // One answer of about 200 MB, which no buffer on the way can hold.
    reader
        .send(&raw::query(
            "SELECT repeat('x', 100000) FROM generate_series(1, 2000) AS stalled",
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = std::time::Instant::now();
    let msgs = other.simple("SELECT 'served'").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
    eprintln!(
        "the other client was served {:?} after asking",
        asked.elapsed()
    );
    // The stalled statement no longer runs on the server.
    let running = || {
        cluster()
            .psql(
                primary,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query LIKE '%AS stalled%' AND pid <> pg_backend_pid()",
            )
            .unwrap_or_default()
    };
    assert!(
        tokio::task::block_in_place(|| signalbox_tests::wait_until(
            Duration::from_secs(15),
            || { running().trim() == "0" }
        )),
        "the stalled statement still runs"
    );
    // The stalled client reads what was on the way, then the end of its
    // connection: never the end of the answer.
    let mut rows = 0;
    while let Some((tag, _)) = reader.next_within(Duration::from_secs(5)).await {
        assert_ne!(
            tag, b'Z',
            "the stalled answer was completed after {rows} rows"
        );
        rows += 1;
        assert!(rows < 2000, "the stalled client kept receiving rows");
    }
    assert_eq!(
        server
            .shared
            .metrics
            .stalled_clients
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A Bind of `stmt` to the unnamed portal with text parameters.
fn bind_params(stmt: &str, params: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(stmt.as_bytes());
    body.push(0);
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p);
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    frame(b'B', &[&body])
}

/// A pipelined batch whose first statement answers more than the sockets
/// between signalbox and the server can hold, followed by a message larger
/// than they can hold either, completes. The server reads the batch only as
/// fast as its answers are taken: signalbox must read them while it is
/// still sending the rest. (Before, it wrote the whole batch first; both
/// sides then waited on each other for ever, with the pool's connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_sockets_behind_a_large_answer_completes() {
    database("protocol_duplex");
    let server = one_connection("checkout_timeout_ms = 2000\n").await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "protocol_duplex").await;
    // About 40 MB of answer, then a 16 MB parameter.
    let mut batch = raw::parse(
        "",
        "SELECT repeat('x', 1000000) FROM generate_series(1, 40)",
    );
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::parse("big", "SELECT length($1)"));
    let param = vec![b'y'; 16 << 20];
    batch.extend(bind_params("big", &[&param]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    c.send(&batch).await;
    let mut got = String::new();
    let mut last_row = None;
    loop {
        let Some((tag, body)) = c.next_within(Duration::from_secs(20)).await else {
            panic!("the batch's answers stopped after {got:?}");
        };
        if tag == b'D' {
            last_row = data_row(&body)[0].clone();
            if body.len() > 100 {
                // The 1 MB rows: count them by one letter.
                got.push('d');
                continue;
            }
        }
        got.push(tag as char);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(got, format!("12{}C12DCZ", "d".repeat(40)));
    assert_eq!(last_row.as_deref(), Some("16777216"));
    // The pool's only connection came back in step: the next client is
    // served on it.
    let mut other = Raw::connect(port, "postgres", "protocol_duplex").await;
    let msgs = other.simple("SELECT 'served'").await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
}

/// A server connection keeps at most `[pool] max_prepared_statements`
/// prepared statements: beyond it the least recently used are closed (a
/// client closing its own statement leaves the shared server statement, so
/// without a cap every statement any client ever prepared stayed in the
/// backend's memory). A closed statement a client still uses is prepared
/// again when it is next used; the client sees nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_keep_a_bounded_number_of_prepared_statements() {
    database("protocol_prepared");
    let server = one_connection("max_prepared_statements = 3\n").await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "protocol_prepared").await;
    let run = |name: &str| {
        let mut b = raw::bind("", name);
        b.extend(raw::execute("", 0));
        b.extend(raw::sync());
        b
    };
    for i in 0..6 {
        let name = format!("s{i}");
        let mut batch = raw::parse(&name, &format!("SELECT {i} + 100"));
        batch.extend(run(&name));
        c.send(&batch).await;
        let got = c.until_ready().await;
        assert_eq!(tags(&got), "12DCZ", "{got:?}");
        assert_eq!(data_row(&got[2].1)[0], Some((i + 100).to_string()));
    }
    // Every statement still answers, the evicted ones included.
    for i in (0..6).rev() {
        c.send(&run(&format!("s{i}"))).await;
        let got = c.until_ready().await;
        assert_eq!(tags(&got), "2DCZ", "s{i}: {got:?}");
        assert_eq!(data_row(&got[1].1)[0], Some((i + 100).to_string()));
    }
    // The pool's only server connection holds no more than the cap.
    let got = c
        .simple("SELECT count(*) FROM pg_prepared_statements")
        .await;
    assert_eq!(data_row(&got[1].1)[0].as_deref(), Some("3"), "{got:?}");
    let evicted = server
        .shared
        .metrics
        .prepared_evicted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(evicted >= 3, "{evicted} evicted");
}

/// Session mode: a read the policy sends to the primary runs on the
/// session's own primary connection, not on a second one from the pool
/// (with every slot held by session clients, it used to wait out the
/// checkout timeout for one, then run on a replica against the policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_read_routed_to_the_primary_uses_the_sessions_connection() {
    database("protocol_session_own");
    let policy = signalbox_tests::faulty(&["all-primary"]);
    let server = start(&format!(
        "[pool]\nmode = \"session\"\nsize = 1\ncheckout_timeout_ms = 1000\n\
         [policy]\npath = {:?}\n",
        policy.display().to_string()
    ))
    .await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "protocol_session_own").await;
    // The session takes its own primary connection (the pool's only one).
    let got = c.simple("SET application_name = 'own'").await;
    assert_eq!(tags(&got), "CSZ", "{got:?}");
    let got = c.simple("SELECT current_setting('application_name')").await;
    assert_eq!(tags(&got), "TDCZ", "{got:?}");
    assert_eq!(data_row(&got[1].1)[0].as_deref(), Some("own"));
    // Where the policy sent it (a second primary connection would have to
    // wait for the pool, then the read would give up and go to a replica).
    let got = c.simple("SELECT pg_is_in_recovery()").await;
    assert_eq!(data_row(&got[1].1)[0].as_deref(), Some("f"), "{got:?}");
    // The extended protocol too.
    let mut batch = raw::parse("", "SELECT pg_is_in_recovery()");
    batch.extend(raw::bind("", ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    c.send(&batch).await;
    let got = c.until_ready().await;
    assert_eq!(tags(&got), "12DCZ", "{got:?}");
    assert_eq!(data_row(&got[2].1)[0].as_deref(), Some("f"), "{got:?}");
}

/// A Sync that ends the server's skip after an error makes no room for
/// statements: the server ignores everything before that Sync, so Closes
/// sent with it would never be answered (the session waited for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_after_an_error_closes_no_statement() {
    database("protocol_prepared_skip");
    let server = one_connection("max_prepared_statements = 2\n").await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "protocol_prepared_skip").await;
    // One batch uses three statements: all kept, over the cap.
    let mut batch = Vec::new();
    for i in 1..=3 {
        batch.extend(raw::parse(&format!("s{i}"), &format!("SELECT {i}")));
    }
    for i in 1..=3 {
        batch.extend(raw::bind("", &format!("s{i}")));
        batch.extend(raw::execute("", 0));
    }
    batch.extend(raw::sync());
    c.send(&batch).await;
    assert_eq!(tags(&c.until_ready().await), "1112DC2DC2DCZ");
    let backend = |msgs: Vec<raw::Msg>| data_row(&msgs[1].1)[0].clone();
    let before = backend(c.simple("SELECT pg_backend_pid()").await);
    // An error in Flush-ended work that uses all three (nothing to close
    // yet): the server skips to the next Sync.
    let mut bad = Vec::new();
    for i in 1..=3 {
        bad.extend(raw::bind("", &format!("s{i}")));
        bad.extend(raw::execute("", 0));
    }
    bad.extend(raw::parse("", "SELEC nonsense"));
    bad.extend(raw::flush());
    c.send(&bad).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(c.next().await);
    }
    assert_eq!(tags(&got), "2DC2DC2DCE", "{got:?}");
    assert_eq!(sqlstate(&got[9].1), "42601");
    c.send(&raw::sync()).await;
    assert_eq!(tags(&c.until_ready().await), "Z");
    // Every statement still answers.
    for i in 1..=3 {
        let mut run = raw::bind("", &format!("s{i}"));
        run.extend(raw::execute("", 0));
        run.extend(raw::sync());
        c.send(&run).await;
        let got = c.until_ready().await;
        assert_eq!(tags(&got), "2DCZ", "s{i}: {got:?}");
        assert_eq!(data_row(&got[1].1)[0], Some(i.to_string()));
    }
    // On the same server connection: nothing made it unusable.
    let after = backend(c.simple("SELECT pg_backend_pid()").await);
    assert_eq!(before, after);
}

/// What a client can tell apart in an answer: each message's type, with a
/// data row's values, a command tag, an error's SQLSTATE, the transaction
/// status, or a row/parameter description's bytes.
fn answer(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .map(|(tag, body)| match tag {
            b'D' => format!("D {:?}", data_row(body)),
            b'E' => format!("E {}", sqlstate(body)),
            b'C' | b'Z' => format!("{} {}", *tag as char, String::from_utf8_lossy(body)),
            b'T' | b't' => format!("{} {body:?}", *tag as char),
            _ => (*tag as char).to_string(),
        })
        .collect()
}

/// Send each batch (ending in Sync or a Query) and collect the answers.
async fn run_batches(c: &mut Raw, batches: &[Vec<u8>]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        c.send(b).await;
        out.push(answer(&c.until_ready().await));
    }
    out
}

/// Prepared statement names mean what PostgreSQL says they mean at each
/// point of a batch: a name closed and prepared again within one batch, the
/// unnamed statement replaced within one, closed, or ended by a simple
/// query; a Parse or Close that failed, or that the server skipped after an
/// error (up to the next Sync), changes no name. Each scenario runs straight on PostgreSQL and through signalbox,
/// whose one server connection was last used by another client that left
/// its own unnamed statement and shared server statements behind; the
/// answers must be the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_mean_what_postgresql_says_at_each_point_of_a_batch() {
    database("protocol_names");
    let server = one_connection("").await;
    let port = server.addr.port();
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let run = |stmt: &str| cat(&[raw::bind("", stmt), raw::execute("", 0)]);
    // The server name signalbox gives the other client's `SELECT 'theirs'`.
    let theirs = signalbox::proxy::statements::server_name(b"SELECT 'theirs'", &[0, 0], "UTF8");
    let scenarios: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "a name closed and prepared again in one batch",
            vec![cat(&[
                raw::parse("s1", "SELECT 'A'"),
                run("s1"),
                raw::close_statement("s1"),
                raw::parse("s1", "SELECT 'B'"),
                run("s1"),
                raw::describe_statement("s1"),
                raw::sync(),
            ])],
        ),
        (
            "the unnamed statement used, then replaced, in one batch",
            vec![
                cat(&[raw::parse("", "SELECT 'A'"), raw::sync()]),
                cat(&[
                    run(""),
                    raw::parse("", "SELECT 'B', 2"),
                    run(""),
                    raw::sync(),
                ]),
            ],
        ),
        (
            "an unnamed statement the client never prepared",
            vec![cat(&[run(""), raw::sync()])],
        ),
        (
            "the unnamed statement closed",
            vec![
                cat(&[raw::parse("", "SELECT 'A'"), raw::sync()]),
                cat(&[raw::close_statement(""), run(""), raw::sync()]),
            ],
        ),
        (
            "the unnamed statement ended by a simple query",
            vec![
                cat(&[raw::parse("", "SELECT 'A'"), raw::sync()]),
                raw::query("SELECT 1"),
                cat(&[run(""), raw::sync()]),
            ],
        ),
        (
            "a closed name used in a later batch",
            vec![
                cat(&[raw::parse("s1", "SELECT 'A'"), raw::sync()]),
                cat(&[raw::close_statement("s1"), raw::sync()]),
                cat(&[run("s1"), raw::sync()]),
            ],
        ),
        (
            "another client's shared server statement, by its server name",
            vec![
                cat(&[run(&theirs), raw::sync()]),
                cat(&[raw::describe_statement(&theirs), raw::sync()]),
            ],
        ),
        (
            "an unnamed statement the client never prepared, described",
            vec![cat(&[raw::describe_statement(""), raw::sync()])],
        ),
        (
            "an error before a use of the unnamed statement",
            vec![cat(&[
                raw::parse("s1", "SELECT 1/0"),
                run("s1"),
                raw::describe_statement(""),
                raw::sync(),
            ])],
        ),
        (
            "another client's shared server statement deallocated",
            vec![raw::query(&format!("DEALLOCATE {theirs}"))],
        ),
        (
            "a name the client never prepared",
            vec![cat(&[run("mine"), raw::sync()])],
        ),
        (
            "a Close skipped after an error",
            vec![
                cat(&[raw::parse("s1", "SELECT 1/0"), raw::sync()]),
                cat(&[run("s1"), raw::close_statement("s1"), raw::sync()]),
                cat(&[run("s1"), raw::sync()]),
            ],
        ),
        (
            "a Parse that failed",
            vec![
                cat(&[raw::parse("s1", "SELEC 1"), raw::sync()]),
                cat(&[run("s1"), raw::sync()]),
            ],
        ),
        (
            "a Parse skipped after an error",
            vec![
                cat(&[
                    raw::parse("", "SELECT 1/0"),
                    run(""),
                    raw::parse("s2", "SELECT 2"),
                    raw::sync(),
                ]),
                cat(&[run("s2"), raw::sync()]),
            ],
        ),
        (
            "a failed Parse of the unnamed statement",
            vec![
                cat(&[raw::parse("", "SELECT 'A'"), raw::sync()]),
                cat(&[raw::parse("", "SELEC"), raw::sync()]),
                cat(&[run(""), raw::sync()]),
            ],
        ),
        (
            "a name prepared twice, behind a write in the same batch",
            vec![
                cat(&[raw::parse("s1", "SELECT 'A'"), raw::sync()]),
                cat(&[
                    raw::parse("", "INSERT INTO names_t VALUES (1)"),
                    run(""),
                    raw::parse("s1", "SELECT 'B'"),
                    run("s1"),
                    raw::sync(),
                ]),
                cat(&[run("s1"), raw::sync()]),
                // The error rolled the implicit transaction back.
                raw::query("SELECT count(*) FROM names_t"),
            ],
        ),
    ];
    let mut setup = Raw::connect(cluster().primary.port, "postgres", "protocol_names").await;
    let made = setup
        .simple("CREATE TABLE IF NOT EXISTS names_t (v int)")
        .await;
    assert!(
        !answer(&made).iter().any(|m| m.starts_with('E')),
        "{made:?}"
    );
    let mut differ = Vec::new();
    for (what, batches) in &scenarios {
        let mut direct = Raw::connect(cluster().primary.port, "postgres", "protocol_names").await;
        let want = run_batches(&mut direct, batches).await;
        // The previous client of signalbox's one server connection.
        let mut other = Raw::connect(port, "postgres", "protocol_names").await;
        other
            .send(&cat(&[
                raw::parse("mine", "SELECT 'theirs'"),
                run("mine"),
                raw::parse("", "SELECT pg_backend_pid()"),
                run(""),
                raw::parse("", "SELECT 'theirs too'"),
                run(""),
                raw::sync(),
            ]))
            .await;
        let msgs = other.until_ready().await;
        assert!(
            !answer(&msgs).iter().any(|m| m.starts_with('E')),
            "{what}: the other client's work runs: {msgs:?}"
        );
        let rows: Vec<_> = msgs.iter().filter(|m| m.0 == b'D').collect();
        let backend = data_row(&rows[1].1)[0].clone();
        drop(other);
        let mut c = Raw::connect(port, "postgres", "protocol_names").await;
        let got = run_batches(&mut c, batches).await;
        if got != want {
            differ.push(format!(
                "{what}:\n  signalbox  {got:?}\n  PostgreSQL {want:?}"
            ));
        }
        // The session works on, on the same server connection.
        let msgs = c.simple("SELECT pg_backend_pid()").await;
        assert_eq!(tags(&msgs), "TDCZ", "{what}");
        assert_eq!(
            data_row(&msgs[1].1)[0],
            backend,
            "{what}: connection retired"
        );
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

/// A batch of `signalbox.*` settings, which signalbox answers itself, is
/// answered as a server would: a Bind or Describe of a statement the client
/// lacks is an error (26000) that skips the rest up to Sync, and what was
/// skipped prepared nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_signalbox_settings_answers_as_a_server_would() {
    let server = one_connection("").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let cat = |parts: &[Vec<u8>]| parts.concat();
    c.send(&cat(&[
        raw::parse("on", "SET signalbox.trace = on"),
        raw::bind("", "nope"),
        raw::execute("", 0),
        raw::parse("show", "SHOW signalbox.trace"),
        raw::sync(),
    ]))
    .await;
    let msgs = c.until_ready().await;
    assert_eq!(answer(&msgs), ["1", "E 26000", "Z I"], "{msgs:?}");
    assert!(
        signalbox::wire::error_fields(&msgs[1].1)
            .1
            .contains("\"nope\""),
        "{msgs:?}"
    );
    c.send(&cat(&[raw::describe_statement("nope"), raw::sync()]))
        .await;
    assert_eq!(answer(&c.until_ready().await), ["E 26000", "Z I"]);
    // The Parse before the error stands; the one after it never ran.
    c.send(&cat(&[
        raw::bind("", "on"),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    assert_eq!(answer(&c.until_ready().await), ["2", "C SET\0", "Z I"]);
    c.send(&cat(&[
        raw::bind("", "show"),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    // (Not a statement of signalbox's: the server answers, and the trace
    // just turned on says where it ran.)
    assert_eq!(answer(&c.until_ready().await), ["N", "E 26000", "Z I"]);
    // An error in a batch ended by Flush: what follows up to the Sync is
    // skipped, as on a server.
    c.simple("SET signalbox.trace = off").await;
    c.send(&cat(&[
        raw::parse("x", "SHOW signalbox.trace"),
        raw::bind("", "nope"),
        raw::execute("", 0),
        raw::flush(),
    ]))
    .await;
    assert_eq!(answer(&[c.next().await, c.next().await]), ["1", "E 26000"]);
    c.send(&cat(&[
        raw::parse("", "SELECT 1"),
        raw::bind("", ""),
        raw::execute("", 0),
        raw::sync(),
    ]))
    .await;
    assert_eq!(answer(&c.until_ready().await), ["Z I"]);
}

/// One client cannot fill signalbox's memory with prepared statements: a
/// Parse beyond `[clients] statement_memory_mb` fails with 53400 at its
/// place in the batch (the server skips the rest, as after any error), the
/// session goes on, and closing statements makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_beyond_the_clients_memory_limit_are_refused() {
    let server = one_connection("[clients]\nstatement_memory_mb = 1\n").await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    // About 200 KB each in signalbox (text and its UTF-8 copy): the sixth
    // would pass 1 MB.
    let text = |i: usize| format!("SELECT {i}, '{}'", "x".repeat(100_000));
    for i in 0..5 {
        c.send(&[raw::parse(&format!("s{i}"), &text(i)), raw::sync()].concat())
            .await;
        assert_eq!(
            answer(&c.until_ready().await),
            ["1", "Z I"],
            "statement {i}"
        );
    }
    c.send(
        &[
            raw::parse("s5", &text(5)),
            raw::bind("", "s0"),
            raw::execute("", 1),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    let msgs = c.until_ready().await;
    // (Tags only: a row here would be 100 KB of text.)
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs[0].1), "53400");
    let message = signalbox::wire::error_fields(&msgs[0].1).1;
    assert!(message.contains("statement_memory_mb"), "{message}");
    // Still usable; and a Close makes room.
    c.send(&[raw::bind("", "s4"), raw::execute("", 0), raw::sync()].concat())
        .await;
    assert_eq!(tags(&c.until_ready().await), "2DCZ");
    c.send(
        &[
            raw::close_statement("s0"),
            raw::parse("s5", &text(5)),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(answer(&c.until_ready().await), ["3", "1", "Z I"]);
    // A refused Parse of the unnamed statement ends the one before it, as
    // a failed one does in PostgreSQL: it cannot run again behind it.
    c.send(&[raw::parse("", "SELECT 'small'"), raw::sync()].concat())
        .await;
    assert_eq!(answer(&c.until_ready().await), ["1", "Z I"]);
    c.send(
        &[
            raw::parse("", &text(6)),
            raw::sync(),
            raw::bind("", ""),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    let msgs = c.until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(sqlstate(&msgs[0].1), "53400");
    assert_eq!(answer(&c.until_ready().await), ["E 26000", "Z I"]);
    // Others have their own room.
    let mut other = Raw::connect(port, "postgres", "postgres").await;
    other
        .send(&[raw::parse("s0", &text(0)), raw::sync()].concat())
        .await;
    assert_eq!(answer(&other.until_ready().await), ["1", "Z I"]);
}

/// A relay in front of the node at `target` that holds every cancel request
/// back for `delay` (a slow network path to the server's postmaster) and
/// passes everything else through; its port.
async fn slow_cancel_relay(target: u16, delay: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CANCEL_REQUEST: i32 = 80877102;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listens");
    let port = listener.local_addr().expect("relay address").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if client.read_exact(&mut head).await.is_err() {
                    return;
                }
                if head[4..] == CANCEL_REQUEST.to_be_bytes() {
                    tokio::time::sleep(delay).await;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                if server.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// A relay to `target` that drops every connection it carries, with no
/// word to either side, each time the returned sender is bumped (it keeps
/// accepting new ones): a server connection lost without a FATAL, as when
/// a network path or a server process dies.
async fn cutting_relay(target: u16) -> (u16, tokio::sync::watch::Sender<u32>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("relay listens");
    let port = listener.local_addr().expect("relay address").port();
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let (cut, cuts) = tokio::sync::watch::channel(0u32);
    // On a runtime of its own: nothing the test's runtime does delays a cut.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("relay runtime");
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("relay listener");
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        })
    });
    (port, cut)
}

/// A server connection lost part-way through a batch: the client is told
/// (`08006`) and goes on, and the statements the server prepared before
/// the loss, whose ParseComplete the client received, still exist for it
/// (signalbox prepares them again on the next connection). A Parse the
/// server never answered did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_answered_before_a_lost_connection_still_exist() {
    let (relay, cut) = cutting_relay(cluster().primary.port).await;
    let server = one_connection_to(relay, "").await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    // (The server holds its answers back until a Sync or Flush, or until
    // its send buffer fills: the second statement's first row, larger than
    // the buffer, pushes out what came before it, then the statement
    // sleeps while its second row is made.)
    let mut bytes = raw::parse("kept", "SELECT 'kept'");
    bytes.extend(raw::bind("", "kept"));
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::parse(
        "",
        "SELECT repeat('x', 100000) UNION ALL SELECT pg_sleep(5)::text",
    ));
    bytes.extend(raw::bind("", ""));
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::parse("never", "SELECT 'never answered'"));
    bytes.extend(raw::sync());
    c.send(&bytes).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(c.next().await);
    }
    assert_eq!(tags(&got), "12DC12", "{got:?}");
    cut.send_modify(|n| *n += 1);
    // (A server that sends a row larger than its buffer in one piece, as
    // PostgreSQL 17 does, lets that row through before the cut.)
    let rest = c.until_ready().await;
    assert_eq!(tags(&rest).trim_start_matches('D'), "EZ", "{rest:?}");
    let [.., e, z] = &rest[..] else {
        unreachable!()
    };
    assert_eq!(sqlstate(&e.1), "08006", "{rest:?}");
    assert_eq!(z.1, b"I");

    // The statement the client was told is prepared runs, on a new
    // server connection.
    let mut bytes = raw::bind("", "kept");
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::sync());
    c.send(&bytes).await;
    let after = c.until_ready().await;
    assert_eq!(tags(&after), "2DCZ", "{after:?}");
    assert_eq!(data_row(&after[1].1), vec![Some("kept".to_owned())]);

    // The Parse the server never answered left no statement behind.
    let mut bytes = raw::parse("never", "SELECT 'parsed again'");
    bytes.extend(raw::bind("", "never"));
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::sync());
    c.send(&bytes).await;
    let again = c.until_ready().await;
    assert_eq!(tags(&again), "12DCZ", "{again:?}");
    assert_eq!(data_row(&again[2].1), vec![Some("parsed again".to_owned())]);
}

/// A Flush-ended batch whose last messages signalbox answers itself (a
/// Close of a named statement, a Parse the connection already has) gets
/// those answers at once, inside a transaction too, where nothing is held
/// back: the server owes nothing more, so nothing may wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_signalbox_makes_at_the_end_of_a_flushed_batch_are_sent() {
    let server = start(POOL1).await;
    let mut c = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    assert_eq!(tags(&c.simple("BEGIN").await), "CZ");
    let mut bytes = raw::parse("s1", "SELECT 'closed after use'");
    bytes.extend(raw::sync());
    c.send(&bytes).await;
    assert_eq!(tags(&c.until_ready().await), "1Z");
    // Run it, close it, and ask for the answers so far.
    let mut bytes = raw::bind("", "s1");
    bytes.extend(raw::execute("", 0));
    bytes.extend(raw::close_statement("s1"));
    bytes.extend(raw::flush());
    c.send(&bytes).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        match c.try_next().await {
            Some(m) => got.push(m),
            None => panic!("no answer within 10 s after {got:?}"),
        }
    }
    assert_eq!(tags(&got), "2DC3", "{got:?}");
    // Prepared again (the connection still has it), then Flush.
    let mut bytes = raw::parse("s2", "SELECT 'closed after use'");
    bytes.extend(raw::flush());
    c.send(&bytes).await;
    let m = c.try_next().await;
    assert_eq!(m.as_ref().map(|m| m.0), Some(b'1'), "{m:?}");
    c.send(&raw::sync()).await;
    let z = c.until_ready().await;
    assert_eq!((tags(&z).as_str(), z[0].1.as_slice()), ("Z", &b"T"[..]));
    assert_eq!(tags(&c.simple("COMMIT").await), "CZ");
}

/// A cancel that reaches the server late stops nothing but the statement
/// of the client that asked: the connection it was aimed at serves no other
/// client until the server has taken it. (A relay holds cancel requests
/// back for 2 s; the first client's statement ends before its cancel
/// arrives, and the next client's runs on signalbox's one connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_stops_no_other_clients_statement() {
    cancel_landing_after_the_statement(Duration::from_secs(2), 1, "late cancel").await;
}

/// Client A's statement (`pg_sleep(first_s)`) is cancelled through a relay
/// that holds cancel requests back for `delay`; it ends first, and client
/// B's statement then runs on signalbox's one connection while A's cancel
/// is still on its way. Neither may be cancelled.
async fn cancel_landing_after_the_statement(delay: Duration, first_s: u32, label: &str) {
    let relay = slow_cancel_relay(cluster().primary.port, delay).await;
    let server = one_connection_to(relay, "").await;
    let port = server.addr.port();
    let a = signalbox_tests::service::connect(port, "postgres").await;
    let b = signalbox_tests::service::connect(port, "postgres").await;
    let token = a.cancel_token();
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE query LIKE '%{label}, first client''' AND state = 'active'"
    );
    let canceller = tokio::spawn(async move {
        let seen = tokio::task::spawn_blocking(move || {
            signalbox_tests::wait_until(Duration::from_secs(10), || {
                let c = cluster();
                c.psql(c.primary.port, &running).unwrap_or_default().trim() == "1"
            })
        })
        .await
        .unwrap_or(false);
        assert!(seen, "the first client's statement never ran");
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let first = a
        .simple_query(&format!(
            "SELECT pg_sleep({first_s}), '{label}, first client'"
        ))
        .await;
    assert!(first.is_ok(), "the cancel was held back: {first:?}");
    let next = b
        .simple_query(&format!("SELECT pg_sleep(3), '{label}, next client'"))
        .await;
    assert!(
        next.is_ok(),
        "the first client's cancel stopped the next client's statement: {next:?}"
    );
    canceller
        .await
        .expect("canceller")
        .expect("cancel request sent");
}

/// A cancel that signalbox could not see through (the server did not confirm
/// it within signalbox's 5 s bound) may still land later: the connection it
/// was aimed at serves no other client. (A relay holds cancel requests back
/// for 7 s; the first client's statement ends after signalbox gave up on
/// its cancel and before the cancel arrives.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_cancel_stops_no_other_clients_statement() {
    cancel_landing_after_the_statement(Duration::from_secs(7), 6, "unconfirmed cancel").await;
}

/// A statement a client prepared with SQL `PREPARE` stays on its server
/// connection whatever becomes of the transaction (a rollback, an error in
/// a later statement): that connection serves no other client, which can
/// neither execute the statement by name nor bind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_with_sql_never_reach_another_client() {
    database("protocol_sql_prepare");
    let server = one_connection("").await;
    let port = server.addr.port();
    for (name, setup) in [
        (
            "rolled_back",
            "BEGIN; PREPARE rolled_back AS SELECT 'secret'; ROLLBACK",
        ),
        (
            "failed_after",
            "PREPARE failed_after AS SELECT 'secret'; SELECT 1/0",
        ),
    ] {
        let mut a = Raw::connect(port, "postgres", "protocol_sql_prepare").await;
        let msgs = a.simple(setup).await;
        // The client still has its statement, as on PostgreSQL (bound, as
        // `EXECUTE` would pin the session by itself).
        let mut bytes = raw::bind("", name);
        bytes.extend(raw::execute("", 0));
        bytes.extend(raw::sync());
        a.send(&bytes).await;
        let msgs2 = a.until_ready().await;
        assert_eq!(tags(&msgs2), "2DCZ", "{name}: {msgs:?} {msgs2:?}");
        drop(a);
        let mut b = Raw::connect(port, "postgres", "protocol_sql_prepare").await;
        b.send(&bytes).await;
        let got = b.until_ready().await;
        assert_eq!(tags(&got), "EZ", "{name}: bound by another client: {got:?}");
        assert_eq!(sqlstate(&got[0].1), "26000");
        let got = b.simple(&format!("EXECUTE {name}")).await;
        assert_eq!(
            tags(&got),
            "EZ",
            "{name}: executed by another client: {got:?}"
        );
        assert_eq!(sqlstate(&got[0].1), "26000");
    }
}

/// Failed work that would have dropped statements (a `DEALLOCATE` or
/// `DISCARD ALL` behind an error) leaves the connection's statements
/// unknown: signalbox retires it rather than re-preparing a statement the
/// server still has (which the server refuses with 42P05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_dropped_by_failed_work_are_not_forgotten() {
    database("protocol_failed_drop");
    let server = one_connection("").await;
    let port = server.addr.port();
    let prepare_and_run = || {
        [
            raw::parse("mine", "SELECT 'shared'"),
            raw::bind("", "mine"),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat()
    };
    let mut a = Raw::connect(port, "postgres", "protocol_failed_drop").await;
    a.send(&prepare_and_run()).await;
    assert_eq!(tags(&a.until_ready().await), "12DCZ");
    for drop_sql in ["DEALLOCATE ALL", "DISCARD ALL"] {
        // In a transaction, so that the statement goes to the server.
        let mut b = Raw::connect(port, "postgres", "protocol_failed_drop").await;
        let got = b
            .simple(&format!("BEGIN; SELECT 1/0; {drop_sql}; COMMIT"))
            .await;
        assert_eq!(
            sqlstate(&got.iter().find(|m| m.0 == b'E').expect("error").1),
            "22012"
        );
        assert_eq!(tags(&b.simple("ROLLBACK").await), "CZ");
        drop(b);
        let mut c = Raw::connect(port, "postgres", "protocol_failed_drop").await;
        c.send(&prepare_and_run()).await;
        let got = c.until_ready().await;
        assert_eq!(tags(&got), "12DCZ", "after a failed {drop_sql}: {got:?}");
    }
}
