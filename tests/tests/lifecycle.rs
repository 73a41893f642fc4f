//! signalbox's own lifecycle against a real cluster: the client connection
//! limit, cancel keys that cannot name a real backend, and a graceful
//! shutdown that lets every open transaction finish.

use std::time::Duration;

use signalbox_tests::raw::{sqlstate, Raw};
use signalbox_tests::service::{database, port_of, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_answers_53300_and_frees_up() {
    let server = start("[clients]\nmax_connections = 3\n").await;
    let port = server.addr.port();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Raw::connect(port, "postgres", "postgres").await);
    }
    let (tag, body) = Raw::first_answer(port).await.expect("an answer");
    assert_eq!((tag, sqlstate(&body).as_str()), (b'E', "53300"));
    drop(held);
    // Their sessions notice the closed sockets and free their slots.
    let active = || {
        server
            .shared
            .metrics
            .sessions_active
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(tokio::task::block_in_place(|| {
        signalbox_tests::wait_until(Duration::from_secs(10), || active() == 0)
    }));
    let mut again = Raw::connect(port, "postgres", "postgres").await;
    let msgs = again.simple("SELECT 1").await;
    assert_eq!(msgs.last().unwrap().0, b'Z');
    let refused = server
        .shared
        .metrics
        .refused_connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keys_never_name_a_real_backend() {
    let server = start("").await;
    let port = server.addr.port();
    let mut pids = std::collections::HashSet::new();
    for _ in 0..20 {
        let raw = Raw::connect(port, "postgres", "postgres").await;
        let (_, key) = raw
            .login
            .iter()
            .find(|(t, _)| *t == b'K')
            .expect("BackendKeyData");
        let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        assert!(
            pid > 1 << 22,
            "pid {pid} is in the range of real process ids"
        );
        pids.insert(pid);
    }
    assert!(pids.len() >= 19, "pids repeat: {pids:?}");
}

/// Shutdown while clients run transactions: none is cut in the middle; each
/// client learns at a transaction boundary, with 57P01, that it must go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_transactions_finish() {
    database("lifecycle_drain");
    let server = start("[clients]\nshutdown_drain_s = 20\n").await;
    let port = server.addr.port();
    let setup = signalbox_tests::service::connect(port, "lifecycle_drain").await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS drained (client int, n int)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for client in 0..4i32 {
        tasks.push(tokio::spawn(async move {
            let c = signalbox_tests::service::connect(port, "lifecycle_drain").await;
            let (mut committed, mut cut) = (0, 0);
            for n in 0..10_000i32 {
                if c.batch_execute("BEGIN").await.is_err() {
                    break; // told to go between transactions
                }
                let body = async {
                    c.execute("INSERT INTO drained VALUES ($1, $2)", &[&client, &n])
                        .await?;
                    c.batch_execute("SELECT pg_sleep(0.02)").await?;
                    c.batch_execute("COMMIT").await
                };
                match body.await {
                    Ok(()) => committed += 1,
                    Err(_) => {
                        cut += 1;
                        break;
                    }
                }
            }
            (committed, cut)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        server.shutdown(Duration::from_secs(20)).await,
        "not drained"
    );
    let mut total = 0;
    for t in tasks {
        let (committed, cut) = t.await.unwrap();
        assert_eq!(cut, 0, "a transaction was cut by the shutdown");
        total += committed;
    }
    assert!(total > 0);
    // Every transaction a client saw commit is there.
    let direct = signalbox_tests::service::connect(port_of("primary"), "lifecycle_drain").await;
    let rows: i64 = direct
        .query_one("SELECT count(*) FROM drained", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, total as i64);
    // New clients are refused once shutdown began.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            || Raw::first_answer(port).await.is_none_or(|(t, _)| t == b'E')
    );
}

/// Shutdown with clients sitting idle: each is told at once (FATAL 57P01),
/// while one inside a transaction is left alone until it ends it, then told
/// too. Every idle client waits on its own stop signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_idle_clients_at_once_and_waits_for_a_transaction() {
    database("lifecycle_idle");
    let server = start("[clients]\nshutdown_drain_s = 20\n").await;
    let port = server.addr.port();
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut c = Raw::connect(port, "postgres", "lifecycle_idle").await;
        assert_eq!(c.simple("SELECT 1").await.last().map(|m| m.0), Some(b'Z'));
        idle.push(c);
    }
    let mut in_tx = Raw::connect(port, "postgres", "lifecycle_idle").await;
    in_tx.simple("BEGIN").await;
    in_tx.simple("SELECT 1").await;
    // Each session waits on a stop signal of its own. (Counted before the
    // shutdown starts: once it has, the idle ones end and deregister.)
    assert_eq!(server.shared.stop_signals(), 6);
    let server = std::sync::Arc::new(server);
    let draining = {
        let server = server.clone();
        tokio::spawn(async move { server.shutdown(Duration::from_secs(20)).await })
    };
    for (i, c) in idle.iter_mut().enumerate() {
        // Well before the 20 s drain: told, not left to time out.
        let m = c.next_within(Duration::from_secs(5)).await;
        let m = m.unwrap_or_else(|| panic!("idle client {i} was not told to go"));
        assert_eq!(
            (m.0, sqlstate(&m.1)),
            (b'E', "57P01".to_owned()),
            "client {i}"
        );
        assert!(
            c.try_next().await.is_none(),
            "client {i}: connection closed"
        );
    }
    // The transaction goes on, untouched, while the others are gone.
    let answer = in_tx.simple("SELECT 2").await;
    assert!(answer.iter().all(|m| m.0 != b'E'), "{answer:?}");
    let end = in_tx.simple("COMMIT").await;
    assert!(end.iter().all(|m| m.0 != b'E'), "{end:?}");
    let told = in_tx.try_next().await.expect("told to go after COMMIT");
    assert_eq!((told.0, sqlstate(&told.1)), (b'E', "57P01".to_owned()));
    assert!(draining.await.expect("shutdown task"), "not drained");
    assert_eq!(server.shared.stop_signals(), 0, "ended sessions deregister");
}

/// A Query of `n` bytes of SQL text: `SELECT length('xxx...')`.
fn big_query(n: usize) -> Vec<u8> {
    let sql = format!("SELECT length('{}')", "x".repeat(n));
    signalbox_tests::raw::query(&sql)
}

/// Large messages in flight count against one shared budget: beyond it a
/// client gets 53200 (out of memory) at once, others are unaffected, and the
/// room comes back when a message completes or its client vanishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_share_a_bounded_buffer_budget() {
    let server = start("[clients]\nbuffer_budget_mb = 1\nmax_message_mb = 8\n").await;
    let port = server.addr.port();
    let msg = big_query(600 * 1024);
    // B holds 600 KiB of the 1 MiB budget with a half-sent message.
    let mut b = Raw::connect(port, "postgres", "postgres").await;
    b.send(&msg[..msg.len() / 2]).await;
    let budget = server.shared.message_budget.clone();
    let whole = 1 << 20;
    let held_by_one = || {
        tokio::task::block_in_place(|| {
            signalbox_tests::wait_until(Duration::from_secs(10), || budget.free() < whole)
        })
    };
    assert!(held_by_one(), "B's message reserved no room");
    // C's 600 KiB message does not fit: refused at once.
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    c.send(&msg[..1024]).await;
    let (tag, body) = c.next().await;
    assert_eq!((tag, sqlstate(&body).as_str()), (b'E', "53200"));
    // A message larger than the whole budget never fits either.
    let mut d = Raw::connect(port, "postgres", "postgres").await;
    d.send(&big_query(2 << 20)[..4096]).await;
    let (tag, body) = d.next().await;
    assert_eq!((tag, sqlstate(&body).as_str()), (b'E', "53200"));
    // Small statements are never affected.
    let mut small = Raw::connect(port, "postgres", "postgres").await;
    assert_eq!(small.simple("SELECT 1").await.last().unwrap().0, b'Z');
    // B finishes its message: answered, and the room is back.
    b.send(&msg[msg.len() / 2..]).await;
    let msgs = b.until_ready().await;
    assert_eq!(
        signalbox_tests::raw::data_row(&msgs[1].1),
        [Some((600 * 1024).to_string())]
    );
    let mut e = Raw::connect(port, "postgres", "postgres").await;
    e.send(&msg[..msg.len() / 2]).await;
    assert!(held_by_one(), "E's message reserved no room");
    e.reset(); // vanishes mid-message: its share must come back too
    assert!(
        tokio::task::block_in_place(|| {
            signalbox_tests::wait_until(Duration::from_secs(10), || budget.free() == whole)
        }),
        "E's share did not come back"
    );
    let mut f = Raw::connect(port, "postgres", "postgres").await;
    f.send(&msg).await;
    let msgs = f.until_ready().await;
    assert_eq!(msgs[1].0, b'D', "{:?}", &msgs[..1]);
}

/// Complete messages count too while they wait for their batch's Sync: a
/// client that sends large Binds and no Sync cannot make signalbox hold
/// more than the budget (before, only messages still arriving counted, and
/// one client could pile up 64 MB messages until the process ran out of
/// memory). The room comes back once the batch has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_their_sync_hold_their_room() {
    use signalbox_tests::raw;
    let server = start("[clients]\nbuffer_budget_mb = 1\nmax_message_mb = 8\n").await;
    let port = server.addr.port();
    let budget = server.shared.message_budget.clone();
    let whole = 1 << 20;
    // A 600 KiB text parameter, bound and left waiting for its Sync.
    let mut a = Raw::connect(port, "postgres", "postgres").await;
    let mut batch = raw::parse("", "SELECT length($1)");
    batch.extend(&bind_600k());
    a.send(&batch).await;
    assert!(
        tokio::task::block_in_place(|| { wait_until_free(&budget, |free| free < whole) }),
        "the bound message reserved no room"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        budget.free() < whole,
        "the waiting batch gave its room back"
    );
    // Another client's 600 KiB message does not fit meanwhile.
    let mut b = Raw::connect(port, "postgres", "postgres").await;
    b.send(&big_query(600 * 1024)[..1024]).await;
    let (tag, body) = b.next().await;
    assert_eq!((tag, sqlstate(&body).as_str()), (b'E', "53200"));
    // The batch runs at its Sync; then the room is back.
    let mut rest = raw::execute("", 0);
    rest.extend(raw::sync());
    a.send(&rest).await;
    let msgs = a.until_ready().await;
    assert_eq!(
        raw::data_row(&msgs[2].1),
        [Some((600 * 1024).to_string())],
        "{:?}",
        msgs.iter().map(|m| m.0 as char).collect::<String>()
    );
    assert!(
        tokio::task::block_in_place(|| wait_until_free(&budget, |free| free == whole)),
        "the batch's room did not come back"
    );
    let mut c = Raw::connect(port, "postgres", "postgres").await;
    c.send(&big_query(600 * 1024)).await;
    let msgs = c.until_ready().await;
    assert_eq!(msgs[1].0, b'D', "{:?}", &msgs[..1]);
}

fn wait_until_free(
    budget: &signalbox::proxy::relay::MessageBudget,
    cond: impl Fn(usize) -> bool,
) -> bool {
    signalbox_tests::wait_until(Duration::from_secs(10), || cond(budget.free()))
}

/// A Bind of the unnamed statement with one 600 KiB text parameter.
fn bind_600k() -> Vec<u8> {
    let mut bind = vec![0u8, 0u8]; // unnamed portal, unnamed statement
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&(600 * 1024i32).to_be_bytes());
    bind.extend(std::iter::repeat_n(b'x', 600 * 1024));
    bind.extend_from_slice(&0i16.to_be_bytes());
    let mut frame = vec![b'B'];
    frame.extend_from_slice(&(bind.len() as i32 + 4).to_be_bytes());
    frame.extend_from_slice(&bind);
    frame
}

/// Held room is bounded in time like a message still arriving: a client
/// that leaves a large message waiting for a Sync longer than
/// `message_timeout_s` is disconnected with a clear error, and the room
/// comes back for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_left_waiting_for_its_sync_is_timed_out() {
    use signalbox_tests::raw;
    let server =
        start("[clients]\nbuffer_budget_mb = 1\nmax_message_mb = 8\nmessage_timeout_s = 1\n").await;
    let port = server.addr.port();
    let budget = server.shared.message_budget.clone();
    let mut a = Raw::connect(port, "postgres", "postgres").await;
    let mut batch = raw::parse("", "SELECT length($1)");
    batch.extend(&bind_600k());
    a.send(&batch).await;
    let (tag, body) = a.next().await;
    assert_eq!((tag, sqlstate(&body).as_str()), (b'E', "08P01"));
    let message = raw::field(&body, b'M');
    assert!(message.contains("Sync"), "{message}");
    assert!(a.try_next().await.is_none(), "the connection is closed");
    assert!(
        tokio::task::block_in_place(|| wait_until_free(&budget, |free| free == 1 << 20)),
        "the room did not come back"
    );
}

/// The deadline of held messages does not run while COPY data flows: a
/// COPY whose statement was a large message (here a long comment) may take
/// longer than `message_timeout_s`, as long as each message arrives in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_started_by_a_large_statement_may_outlast_the_message_timeout() {
    use signalbox_tests::raw;
    signalbox_tests::service::database("lifecycle_copy");
    let server = start("[clients]\nmessage_timeout_s = 1\n").await;
    let port = server.addr.port();
    let mut c = Raw::connect(port, "postgres", "lifecycle_copy").await;
    let got = c
        .simple("DROP TABLE IF EXISTS slow_copy; CREATE TABLE slow_copy (v int)")
        .await;
    assert!(got.iter().all(|m| m.0 != b'E'), "{got:?}");
    let sql = format!("COPY slow_copy FROM STDIN /* {} */", "x".repeat(100 * 1024));
    c.send(&raw::query(&sql)).await;
    let (tag, _) = c.next().await;
    assert_eq!(tag, b'G', "CopyInResponse");
    for v in 1..=3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.send(&raw::copy_data(format!("{v}\n").as_bytes())).await;
    }
    c.send(&raw::copy_done()).await;
    let got = c.until_ready().await;
    assert_eq!(
        got.iter().map(|m| m.0 as char).collect::<String>(),
        "CZ",
        "{got:?}"
    );
    assert_eq!(String::from_utf8_lossy(&got[0].1), "COPY 3\0");
}
