//! Failover without split brain, on a cluster of its own: a replica is
//! promoted and the primary killed under a write loop; writes follow the
//! promotion without a restart. Then the old primary comes back as a
//! primary (on its old timeline): no write ever lands on it, and the
//! service says why. And a read that a replica cancels for a conflict with
//! recovery runs again on another node.

use std::time::{Duration, Instant};

use signalbox::local::LocalCluster;
use signalbox_tests::raw::{data_row, Raw};

/// One write through signalbox on a fresh connection: the port of the node
/// that took it, or None when it was refused or failed.
async fn write(port: u16, i: u32) -> Option<u16> {
    let connect = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
    })
    .await;
    if !matches!(connect, Ok(Ok(_))) {
        return None;
    }
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    c.send(&signalbox_tests::raw::query(&format!(
        "INSERT INTO fo (v) VALUES ({i}) RETURNING inet_server_port()"
    )))
    .await;
    let mut port = None;
    while let Some(m) = c.try_next().await {
        match m.0 {
            b'D' => port = data_row(&m.1)[0].as_deref().and_then(|p| p.parse().ok()),
            b'E' => return None,
            b'Z' => break,
            _ => {}
        }
    }
    port
}

/// A primary and one replica of their own with table `fo`, and signalbox
/// in front probing every 200 ms (`health` adds to `[health]`).
async fn primary_replica_and_signalbox(health: &str) -> (LocalCluster, signalbox::server::Server) {
    let c = tokio::task::block_in_place(|| LocalCluster::start(1))
        .unwrap_or_else(|e| panic!("cannot start the PostgreSQL test cluster: {e:#}"));
    c.psql(c.primary.port, "CREATE TABLE fo (id serial, v int)")
        .unwrap();
    c.wait_replayed().unwrap();
    // Roles are not configured: signalbox asks each node (`role = "auto"`).
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[health]\ninterval_ms = 200\n{health}{}",
        c.nodes_toml()
            .replace("role = \"primary\"", "role = \"auto\"")
            .replace("role = \"replica\"", "role = \"auto\"")
    );
    let config =
        signalbox::config::Config::parse(&text, std::path::Path::new("failover.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    (c, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_is_followed_and_a_returning_old_primary_is_fenced() {
    let (c, server) = primary_replica_and_signalbox("probe_timeout_ms = 3000\n").await;
    let port = server.addr.port();
    let (old, new) = (c.primary.port, c.replicas[0].port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        assert_eq!(write(port, i).await, Some(old));
    }
    // Promote the replica, kill the primary; keep writing.
    let promoted = Instant::now();
    c.psql(new, "SELECT pg_promote()").unwrap();
    tokio::task::block_in_place(|| c.kill(&c.primary)).unwrap();
    let killed = promoted;
    let mut first_on_new = None;
    for i in 100..400 {
        match write(port, i).await {
            Some(p) if p == new => {
                first_on_new = Some(killed.elapsed());
                break;
            }
            Some(p) => panic!("a write landed on {p} after the primary was killed"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let gap = first_on_new.expect("writes resume on the promoted replica");
    eprintln!("failover: writes resumed on the new primary {gap:?} after pg_promote() was called");
    let rows_on_old = || c.psql(old, "SELECT count(*) FROM fo").unwrap();
    // The old primary comes back, as a primary on its old timeline.
    tokio::task::block_in_place(|| c.restart(&c.primary)).unwrap();
    let before = rows_on_old();
    let until = Instant::now() + Duration::from_secs(4);
    let mut i = 1000;
    while Instant::now() < until {
        i += 1;
        let took = write(port, i).await;
        assert_eq!(took, Some(new), "write {i} went to {took:?}");
    }
    assert_eq!(rows_on_old(), before, "no write landed on the old primary");
    let reason = server.shared.live().cluster.fence_reason().expect("fenced");
    assert!(reason.contains("former primary"), "{reason}");
    // `/health` says why (a primary still takes writes: 200), and the
    // gauge shows the fence.
    let admin = server.admin_addr.unwrap();
    let (code, body) = tokio::task::block_in_place(|| {
        signalbox_tests::admin_call("GET", &format!("http://{admin}/health"), None)
    });
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("former primary"), "{body}");
    let (_, metrics) = tokio::task::block_in_place(|| {
        signalbox_tests::admin_call("GET", &format!("http://{admin}/metrics"), None)
    });
    assert!(metrics.lines().any(|l| l == "signalbox_writes_fenced 1"));
    assert!(
        server
            .shared
            .live()
            .cluster
            .split_brain_rounds
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Stop the old primary: the fence lifts, the new primary keeps writing.
    tokio::task::block_in_place(|| c.kill(&c.primary)).unwrap();
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(5),
        || server.shared.live().cluster.fence_reason().is_none()
    )));
    assert_eq!(write(port, 9999).await, Some(new));
}

/// A killed replica is banned fast (each node is probed on its own clock,
/// and a data-path connect failure bans at once); a paused replica's time
/// lag is the age of its oldest unreplayed write, not the quiet time before
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_ban_and_time_lag() {
    let (c, server) = primary_replica_and_signalbox("").await;
    let cluster = server.shared.live().cluster.clone();
    let replica = || cluster.view().states[1].clone();
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(5),
        || replica().healthy && replica().lag_ms == Some(0)
    )));
    // Pause replay; stay quiet for 3 s; then write once and wait 1 s.
    c.pause_replay(c.replicas[0].port).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.psql(c.primary.port, "INSERT INTO fo (v) VALUES (1)")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let lag = replica().lag_ms.unwrap();
    eprintln!("lag of a replica paused 4 s, 1 s after the first write it missed: {lag} ms");
    assert!(
        lag > 0 && lag < 3000,
        "the quiet time does not count: {lag} ms"
    );
    assert!(replica().lag_bytes > 0);
    c.resume_replay(c.replicas[0].port).unwrap();
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(5),
        || replica().lag_ms == Some(0)
    )));
    // Kill the replica: banned quickly.
    tokio::task::block_in_place(|| c.kill(&c.replicas[0])).unwrap();
    let killed = Instant::now();
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(5),
        || !replica().healthy
    )));
    eprintln!("replica banned {:?} after it was killed", killed.elapsed());
    // Reads still work (on the primary).
    let mut r = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    let msgs = r.simple("SELECT pg_is_in_recovery()").await;
    assert_eq!(data_row(&msgs[1].1)[0].as_deref(), Some("f"));
}

/// Log in and try a write: the error the client gets, at login or for
/// the statement.
async fn refusal(port: u16) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&signalbox_tests::raw::startup("postgres", "postgres"))
        .await
        .unwrap();
    let mut sent = false;
    loop {
        let tag = s.read_u8().await.expect("a message");
        let len = s.read_i32().await.expect("a length");
        let mut body = vec![0u8; (len as usize).saturating_sub(4)];
        s.read_exact(&mut body).await.expect("a body");
        match tag {
            b'E' => return body,
            b'Z' if !sent => {
                s.write_all(&signalbox_tests::raw::query(
                    "INSERT INTO fo (v) VALUES (1)",
                ))
                .await
                .unwrap();
                sent = true;
            }
            b'Z' => panic!("the write was not refused"),
            _ => {}
        }
    }
}

/// Two nodes both claim to be the primary on the same timeline (two
/// independent servers, both on timeline 1): they cannot be told apart, so
/// writes go nowhere — a clear 57P03 naming both, `/health` 503, the
/// `signalbox_writes_fenced` gauge at 1 — until exactly one remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_primaries_on_one_timeline_fence_all_writes() {
    let start = || {
        tokio::task::block_in_place(|| LocalCluster::start(0))
            .unwrap_or_else(|e| panic!("cannot start a PostgreSQL test server: {e:#}"))
    };
    let (a, b) = (start(), start());
    for c in [&a, &b] {
        c.psql(c.primary.port, "CREATE TABLE fo (id serial, v int)")
            .unwrap();
    }
    let node = |name: &str, port: u16| {
        format!(
            "[[nodes]]\nname = \"{name}\"\nurl = \"postgres://postgres@127.0.0.1:{port}/postgres\"\nrole = \"auto\"\n"
        )
    };
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[health]\ninterval_ms = 200\n\
         probe_timeout_ms = 3000\n{}{}",
        node("east", a.primary.port),
        node("west", b.primary.port)
    );
    let config =
        signalbox::config::Config::parse(&text, std::path::Path::new("split.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let port = server.addr.port();
    let admin = server.admin_addr.unwrap();
    let fenced = tokio::task::block_in_place(|| {
        signalbox_tests::wait_until(Duration::from_secs(5), || {
            server.shared.live().cluster.fence_reason().is_some()
        })
    });
    assert!(fenced, "two primaries on one timeline were not fenced");

    // A write is refused with a clear error naming both nodes (at login
    // when no node can serve one, else for the statement).
    let err = tokio::time::timeout(Duration::from_secs(10), refusal(port))
        .await
        .expect("an answer within 10 s");
    assert_eq!(signalbox_tests::raw::field(&err, b'C'), "57P03");
    let text = signalbox_tests::raw::field(&err, b'M');
    assert!(
        text.contains("split brain") && text.contains("east") && text.contains("west"),
        "{text}"
    );
    for c in [&a, &b] {
        let rows = c.psql(c.primary.port, "SELECT count(*) FROM fo").unwrap();
        assert_eq!(
            rows.trim(),
            "0",
            "a write landed on port {}",
            c.primary.port
        );
    }
    let (code, body) = tokio::task::block_in_place(|| {
        signalbox_tests::admin_call("GET", &format!("http://{admin}/health"), None)
    });
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("split brain"), "{body}");
    let (_, metrics) = tokio::task::block_in_place(|| {
        signalbox_tests::admin_call("GET", &format!("http://{admin}/metrics"), None)
    });
    assert!(
        metrics.lines().any(|l| l == "signalbox_writes_fenced 1"),
        "{metrics}"
    );

    // One of them goes away: exactly one primary remains, writes go there.
    tokio::task::block_in_place(|| b.kill(&b.primary)).unwrap();
    let lifted = tokio::task::block_in_place(|| {
        signalbox_tests::wait_until(Duration::from_secs(5), || {
            server.shared.live().cluster.fence_reason().is_none()
        })
    });
    assert!(lifted, "the fence stayed with one primary left");
    assert_eq!(write(port, 2).await, Some(a.primary.port));
    let (code, body) = tokio::task::block_in_place(|| {
        signalbox_tests::admin_call("GET", &format!("http://{admin}/health"), None)
    });
    assert_eq!(code, 200, "{body}");
}

/// A read the replica cancels for a conflict with recovery runs again on
/// another node, and the client gets its answer, never the `40001`. The
/// replica has no grace for conflicts (`max_standby_streaming_delay = 0`),
/// replay is paused while rows are deleted and vacuumed on the primary, and
/// resumed while the read (which can still see those rows) runs. `EXPLAIN
/// ANALYZE` sends nothing until it is done, so the cancel always comes
/// before any of the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cancelled_for_a_recovery_conflict_runs_again_elsewhere() {
    let (c, server) = primary_replica_and_signalbox("").await;
    let (primary, replica) = (c.primary.port, c.replicas[0].port);
    let conf = c.replicas[0].data.join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .unwrap();
    std::io::Write::write_all(&mut f, b"\nmax_standby_streaming_delay = 0\n").unwrap();
    c.psql(replica, "SELECT pg_reload_conf()").unwrap();
    c.psql(primary, "CREATE TABLE churn (v int)").unwrap();
    c.psql(primary, "INSERT INTO churn SELECT generate_series(1, 1000)")
        .unwrap();
    c.wait_replayed().unwrap();
    c.pause_replay(replica).unwrap();
    c.psql(primary, "DELETE FROM churn").unwrap();
    c.psql(primary, "VACUUM churn").unwrap();
    // The replica has received the cleanup, not replayed it.
    let lsn = c.psql(primary, "SELECT pg_current_wal_lsn()").unwrap();
    let received = format!("SELECT pg_last_wal_receive_lsn() >= '{}'", lsn.trim());
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(10),
        || c.psql(replica, &received).unwrap_or_default().trim() == "t"
    )));
    let mut resume = Raw::connect(replica, "postgres", "postgres").await;
    let mut reader = Raw::connect(server.addr.port(), "postgres", "postgres").await;
    reader
        .send(&signalbox_tests::raw::query(
            "EXPLAIN ANALYZE SELECT count(*), pg_sleep(1) FROM churn",
        ))
        .await;
    // Resume once the read runs on the replica (its snapshot taken), so
    // that the cleanup replayed next conflicts with it.
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE query LIKE 'EXPLAIN ANALYZE%' AND state = 'active'";
    assert!(tokio::task::block_in_place(|| signalbox_tests::wait_until(
        Duration::from_secs(10),
        || c.psql(replica, running).unwrap_or_default().trim() == "1"
    )));
    resume
        .send(&signalbox_tests::raw::query(
            "SELECT pg_wal_replay_resume()",
        ))
        .await;
    let mut tags = String::new();
    let mut error = None;
    loop {
        let m = reader.next().await;
        tags.push(m.0 as char);
        if m.0 == b'E' {
            error = Some(signalbox_tests::raw::sqlstate(&m.1));
        }
        if m.0 == b'Z' {
            break;
        }
    }
    let retries = server
        .shared
        .metrics
        .conflict_retries
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("answer {tags}, error {error:?}, retries {retries}");
    assert_eq!(error, None, "the client got the replica's cancel: {tags}");
    assert!(tags.starts_with('T') && tags.ends_with("CZ"), "{tags}");
    assert_eq!(retries, 1);
    // Replay went on: the replica caught up.
    c.wait_replayed().unwrap();
}
