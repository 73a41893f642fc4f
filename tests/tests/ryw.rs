//! Read-your-writes across pooled connections, on a cluster of its own
//! (one replica with replay paused, one replaying normally): a row
//! inserted through one connection is read at once through another.

use std::sync::atomic::Ordering;

use signalbox_tests::service::{cluster, config_text, connect};
use signalbox_tests::{example, root};

/// Insert on connection A, then read the row on connection B, `n` times;
/// how many reads did not see their row, and how many ran on a replica.
async fn stale_reads(port: u16, n: u32) -> (u32, u32) {
    stale_reads_with(port, n, "").await
}

/// [`stale_reads`] with `prefix` (a hint comment) before each read.
async fn stale_reads_with(port: u16, n: u32, prefix: &str) -> (u32, u32) {
    let a = connect(port, "postgres").await;
    let b = connect(port, "postgres").await;
    let (mut stale, mut on_replica) = (0, 0);
    for i in 0..n {
        // Every other write inside an explicit transaction: its COMMIT
        // records the position.
        if i % 2 == 0 {
            a.execute("INSERT INTO ryw (v) VALUES ($1)", &[&(i as i32)])
                .await
                .unwrap();
        } else {
            a.batch_execute("BEGIN").await.unwrap();
            a.execute("INSERT INTO ryw (v) VALUES ($1)", &[&(i as i32)])
                .await
                .unwrap();
            a.batch_execute("COMMIT").await.unwrap();
        }
        let row = b
            .query_one(
                &format!(
                    "{prefix}SELECT count(*), pg_is_in_recovery(), inet_server_port(), \
                     pg_last_wal_replay_lsn()::text FROM ryw WHERE v = $1"
                ),
                &[&(i as i32)],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            stale += 1;
            // Which node answered, and how far it had replayed: what a
            // failure report needs (the first few; "off" has hundreds).
            if stale <= 3 {
                eprintln!(
                    "stale read {i}: node port {:?}, replayed {:?}",
                    row.get::<_, Option<i32>>(2),
                    row.get::<_, Option<String>>(3)
                );
            }
        }
        if row.get::<_, bool>(1) {
            on_replica += 1;
        }
    }
    (stale, on_replica)
}

async fn start(extra: &str) -> signalbox::server::Server {
    start_with_health("interval_ms = 100", extra).await
}

async fn start_with_health(health: &str, extra: &str) -> signalbox::server::Server {
    let text = config_text(&format!("[health]\n{health}\n{extra}"));
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("ryw.toml")).unwrap();
    signalbox::server::Server::start(config).await.unwrap()
}

fn policy(path: &std::path::Path, config: &str) -> String {
    format!(
        "[policy]\npath = {:?}\n[policy.config]\n{config}\n",
        path.display().to_string()
    )
}

/// The tests of this file pause and resume replay on the shared cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The one value a simple query returns.
async fn value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// How a read on the second instance is told the position to wait for.
#[derive(Clone, Copy)]
enum Token {
    None,
    Hint,
    Set,
}

/// Insert through instance A, then read the row through instance B,
/// carrying A's `signalbox.write_lsn` as `token`; (stale, on a replica).
async fn stale_across(a_port: u16, b_port: u16, n: u32, token: Token) -> (u32, u32) {
    let a = connect(a_port, "postgres").await;
    let b = connect(b_port, "postgres").await;
    let (mut stale, mut on_replica) = (0, 0);
    for i in 0..n {
        let v = 1_000_000 + i as i32;
        a.execute("INSERT INTO ryw (v) VALUES ($1)", &[&v])
            .await
            .unwrap();
        let lsn = value(&a, "SHOW signalbox.write_lsn").await;
        let select = "SELECT count(*), pg_is_in_recovery() FROM ryw WHERE v = $1";
        let sql = match token {
            Token::None => select.to_owned(),
            Token::Hint => format!("/* signalbox: min_lsn={lsn} */ {select}"),
            Token::Set => {
                b.batch_execute(&format!("SET signalbox.min_lsn = '{lsn}'"))
                    .await
                    .unwrap();
                select.to_owned()
            }
        };
        let row = b.query_one(&sql, &[&v]).await.unwrap();
        stale += u32::from(row.get::<_, i64>(0) == 0);
        on_replica += u32::from(row.get::<_, bool>(1));
        b.execute("DELETE FROM ryw WHERE v = $1", &[&v])
            .await
            .unwrap();
    }
    (stale, on_replica)
}

/// Run `sql` (a table's creation) on the primary, wait until both replicas
/// have it, then pause replica-2's replay. Returns replica-2's port.
fn table_then_pause(c: &signalbox::local::LocalCluster, sql: &str) -> u16 {
    c.psql(c.primary.port, sql).unwrap();
    c.wait_replayed().unwrap();
    let paused = c.replicas[1].port;
    c.pause_replay(paused).unwrap();
    paused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_carries_a_write_to_another_instance() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let paused = table_then_pause(c, "CREATE TABLE IF NOT EXISTS ryw (v int)");

    // A records its sessions' positions; B knows nothing of A's writes.
    // B's policy waits up to 1 s for a replica to replay the token (it
    // takes milliseconds; the bound is generous for a stalled CI machine).
    let policy = policy(&example("read-your-writes"), "wait_ms = 1000");
    let a = start(&format!(
        "{policy}[read_your_writes]\nscopes = [\"session\"]\n"
    ))
    .await;
    let b = start(&policy).await;
    let (a_port, b_port) = (a.addr.port(), b.addr.port());

    // The position reads back as PostgreSQL prints a pg_lsn.
    let client = connect(a_port, "postgres").await;
    assert_eq!(value(&client, "SHOW signalbox.write_lsn").await, "0/0");
    client
        .execute("INSERT INTO ryw (v) VALUES (-1)", &[])
        .await
        .unwrap();
    let lsn = value(&client, "SHOW signalbox.write_lsn").await;
    let primary_lsn = c
        .psql(
            c.primary.port,
            &format!("SELECT pg_current_wal_insert_lsn() >= '{lsn}'::pg_lsn"),
        )
        .unwrap_or_default();
    assert!(
        lsn != "0/0" && primary_lsn.contains('t'),
        "{lsn}: {primary_lsn}"
    );
    // A bad token is a clear error, and the session goes on.
    let err = client
        .batch_execute("SET signalbox.min_lsn = 'yesterday'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err}");
    let err = client
        .batch_execute("SHOW signalbox.nonsense")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42704"), "{err}");
    client
        .batch_execute("SET signalbox.min_lsn = '1/0'")
        .await
        .unwrap();
    assert_eq!(value(&client, "SHOW signalbox.min_lsn").await, "1/0");
    client
        .batch_execute("RESET signalbox.min_lsn")
        .await
        .unwrap();
    assert_eq!(value(&client, "SHOW signalbox.min_lsn").await, "0/0");
    // The same through the extended protocol (what most drivers use).
    let row = client
        .query_one("SHOW signalbox.write_lsn", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), lsn);
    client
        .execute("SET signalbox.min_lsn = '2/0'", &[])
        .await
        .unwrap();
    let row = client
        .query_one("SHOW signalbox.min_lsn", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "2/0");
    let err = client
        .execute("SET signalbox.min_lsn = 'nope'", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22023"), "{err}");
    client
        .execute("RESET signalbox.min_lsn", &[])
        .await
        .unwrap();
    assert_eq!(value(&client, "SHOW signalbox.min_lsn").await, "0/0");

    // Without the token, B's reads miss rows: the loop can fail.
    let (stale, _) = stale_across(a_port, b_port, 200, Token::None).await;
    assert!(stale > 0, "without a token the loop must see stale reads");
    for token in [Token::Hint, Token::Set] {
        let (stale, on_replica) = stale_across(a_port, b_port, 1000, token).await;
        let how = match token {
            Token::Hint => "a min_lsn hint",
            _ => "SET signalbox.min_lsn",
        };
        eprintln!("across two instances with {how}: {stale} stale of 1000; {on_replica} reads on a replica");
        assert_eq!(stale, 0, "{how}");
        assert!(
            on_replica > 500,
            "{how}: reads wait for the replica that keeps up"
        );
    }
    c.resume_replay(paused).unwrap();
    // Caught up before the next test uses the replica (a backlog replayed
    // at once can cancel the next fixture query for a recovery conflict).
    c.wait_replayed().unwrap();
}

/// A `pg_lsn` text as a number, to compare positions.
fn lsn(text: &str) -> u64 {
    signalbox::proxy::session::parse_lsn(text).unwrap_or_else(|| panic!("not an LSN: {text}"))
}

/// A commit's position is recorded under its scopes before the client
/// hears that it committed: another connection that asks at once must
/// already find it (a read sent right after a commit was routed on the
/// previous position and could miss the row). Each way a write commits:
/// simple and extended protocol, autocommit and explicit transactions
/// (the position is asked behind the client's own work, or after it).
/// Failed writes and COPY FROM STDIN leave the connection in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_recorded_before_the_client_hears_of_it() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    c.psql(c.primary.port, "CREATE TABLE IF NOT EXISTS ryw (v int)")
        .unwrap();
    let server = start(&format!(
        "{}[read_your_writes]\nscopes = [\"user\"]\n",
        policy(&example("read-your-writes"), "")
    ))
    .await;
    let port = server.addr.port();
    let a = connect(port, "postgres").await;
    let b = connect(port, "postgres").await;
    let mut late = [0u32; 4];
    for round in 0..200 {
        match round % 4 {
            0 => a.batch_execute("INSERT INTO ryw (v) VALUES (-2)").await,
            1 => a
                .execute("INSERT INTO ryw (v) VALUES ($1)", &[&-2i32])
                .await
                .map(drop),
            2 => {
                a.batch_execute("BEGIN").await.unwrap();
                a.execute("INSERT INTO ryw (v) VALUES ($1)", &[&-2i32])
                    .await
                    .unwrap();
                a.batch_execute("COMMIT").await
            }
            _ => {
                a.batch_execute("BEGIN; INSERT INTO ryw (v) VALUES (-2); COMMIT")
                    .await
            }
        }
        .unwrap();
        let seen = value(&b, "SHOW signalbox.write_lsn").await;
        let recorded = value(&a, "SHOW signalbox.write_lsn").await;
        late[round % 4] += u32::from(lsn(&seen) < lsn(&recorded));
    }
    assert_eq!(
        late,
        [0; 4],
        "commits (simple, extended, explicit, one message) whose position another connection did not find yet, of 50 each"
    );

    // A write that fails records nothing, and the connection stays in step.
    let before = lsn(&value(&a, "SHOW signalbox.write_lsn").await);
    for sql in [
        "INSERT INTO ryw (v) VALUES (1/0)",
        "INSERT INTO ryw (v) VALUES (1/$1)",
    ] {
        let err = if sql.contains('$') {
            a.execute(sql, &[&0i32]).await.unwrap_err()
        } else {
            a.batch_execute(sql).await.unwrap_err()
        };
        assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
        assert_eq!(lsn(&value(&a, "SHOW signalbox.write_lsn").await), before);
        let row = a.query_one("SELECT 41 + 1", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    }

    // COPY FROM STDIN: the server reads the client's data after the
    // statement; the position is asked once the COPY is done.
    let mut raw = signalbox_tests::raw::Raw::connect(port, "postgres", "postgres").await;
    raw.send(&signalbox_tests::raw::query("COPY ryw FROM STDIN"))
        .await;
    loop {
        let m = raw.next().await;
        assert_ne!(m.0, b'E', "COPY refused");
        if m.0 == b'G' {
            break;
        }
    }
    raw.send(
        &[
            signalbox_tests::raw::copy_data(b"-3\n-3\n"),
            signalbox_tests::raw::copy_done(),
        ]
        .concat(),
    )
    .await;
    let mut tags = Vec::new();
    loop {
        let m = raw.next().await;
        assert_ne!(m.0, b'E', "COPY failed");
        if m.0 == b'C' {
            tags.push(
                String::from_utf8_lossy(&m.1)
                    .trim_end_matches('\0')
                    .to_owned(),
            );
        }
        if m.0 == b'Z' {
            break;
        }
    }
    assert_eq!(tags, ["COPY 2"]);
    let after_copy = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    assert!(after_copy > before, "the COPY's commit is recorded");
    let copied = raw.simple("SELECT count(*) FROM ryw WHERE v = -3").await;
    assert!(copied.iter().any(|m| m.0 == b'D'), "{copied:?}");

    // A COMMIT, then an error in the same message: the write committed,
    // so its position is recorded although the message ended in an error.
    let before = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    let err = a
        .batch_execute("INSERT INTO ryw (v) VALUES (-5); COMMIT; SELECT 1/0")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
    let recorded = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    assert!(
        recorded > before,
        "a commit followed by an error is recorded"
    );

    // COMMIT AND CHAIN commits and opens the next transaction at once.
    let before = recorded;
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("INSERT INTO ryw (v) VALUES ($1)", &[&-7i32])
        .await
        .unwrap();
    a.batch_execute("COMMIT AND CHAIN").await.unwrap();
    let chained = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    a.batch_execute("COMMIT").await.unwrap();
    assert!(chained > before, "a COMMIT AND CHAIN is recorded");

    // Two-phase commit: the writes become visible at COMMIT PREPARED, which
    // writes nothing itself; its position is recorded all the same.
    a.batch_execute("BEGIN; INSERT INTO ryw (v) VALUES (-8); PREPARE TRANSACTION 'ryw_2pc'")
        .await
        .unwrap();
    let prepared = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    a.batch_execute("COMMIT PREPARED 'ryw_2pc'").await.unwrap();
    let committed = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    assert!(committed > prepared, "COMMIT PREPARED is recorded");

    // COPY FROM STDIN through a portal bound in an earlier, Flush-ended
    // message: nothing of signalbox's may follow the Execute (the server
    // would take it for COPY data and abort the COPY).
    use signalbox_tests::raw;
    let mut r = raw::Raw::connect(port, "postgres", "postgres").await;
    r.send(
        &[
            raw::parse("", "COPY ryw FROM STDIN"),
            raw::bind("", ""),
            raw::flush(),
        ]
        .concat(),
    )
    .await;
    assert_eq!(r.next().await.0, b'1');
    assert_eq!(r.next().await.0, b'2');
    r.send(&[raw::execute("", 0), raw::sync()].concat()).await;
    let m = r.next().await;
    assert_eq!(m.0, b'G', "COPY IN expected: {m:?}");
    r.send(&[raw::copy_data(b"-6\n"), raw::copy_done(), raw::sync()].concat())
        .await;
    let mut tags = String::new();
    loop {
        let m = r.next().await;
        assert_ne!(m.0, b'E', "COPY broken: {}", raw::field(&m.1, b'M'));
        tags.push(m.0 as char);
        if m.0 == b'Z' {
            break;
        }
    }
    assert!(tags.starts_with('C'), "{tags}");
    let copied = c
        .psql(c.primary.port, "SELECT count(*) FROM ryw WHERE v = -6")
        .unwrap();
    assert_eq!(copied.trim(), "1");

    // A COMMIT answered, then the connection lost (here the backend ends
    // itself: FATAL 57P01 before ReadyForQuery). The write did commit, so
    // its position must still be recorded (asked on the control plane).
    let before = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    let mut doomed = signalbox_tests::raw::Raw::connect(port, "postgres", "postgres").await;
    doomed
        .send(&signalbox_tests::raw::query(
            "INSERT INTO ryw (v) VALUES (-4); COMMIT; SELECT pg_terminate_backend(pg_backend_pid())",
        ))
        .await;
    let mut seen = Vec::new();
    while let Some(m) = doomed.try_next().await {
        seen.push(m);
    }
    assert!(
        seen.iter()
            .any(|m| m.0 == b'E' && signalbox_tests::raw::field(&m.1, b'C') == "57P01"),
        "the backend ended: {seen:?}"
    );
    let committed = c
        .psql(c.primary.port, "SELECT count(*) FROM ryw WHERE v = -4")
        .unwrap();
    assert_eq!(committed.trim(), "1", "the write committed");
    let after = lsn(&value(&b, "SHOW signalbox.write_lsn").await);
    assert!(
        after > before,
        "a commit whose connection died before ReadyForQuery is recorded too"
    );
    c.psql(
        c.primary.port,
        "DELETE FROM ryw WHERE v IN (-2, -3, -4, -5, -6, -7, -8)",
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_writes_made_on_other_connections() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let paused = table_then_pause(c, "DROP TABLE IF EXISTS ryw; CREATE TABLE ryw (v int)");

    // Off: reads sent to the paused replica (rw-split, read = replica-2)
    // miss every row — the loop can see stale reads.
    let off = start(&policy(&example("rw-split"), "read = [\"replica-2\"]")).await;
    let (stale, _) = stale_reads(off.addr.port(), 200).await;
    assert!(stale > 0, "the loop must be able to fail");
    drop(off);

    // On, user scope: 1,000 round trips, no stale read.
    let on = start(&format!(
        "{}[read_your_writes]\nscopes = [\"user\"]\n",
        policy(&example("read-your-writes"), "")
    ))
    .await;
    let (stale, on_replica) = stale_reads(on.addr.port(), 1000).await;
    eprintln!(
        "read-your-writes, user scope: {stale} stale of 1000; {on_replica} reads on a replica"
    );
    assert_eq!(stale, 0);
    drop(on);

    // On, waiting up to 1 s for a replica to replay: still no stale read,
    // and reads land on the replica that keeps up. (It replays in a few
    // milliseconds; the generous bound keeps a stall of the shared CI
    // machine from sending reads to the primary: with 50 ms, a stalled
    // stretch of one CI run sent 37 % of them there.)
    let waiting = start(&format!(
        "{}[read_your_writes]\nscopes = [\"user\"]\nwait_for_replay_ms = 1000\n",
        policy(&example("read-your-writes"), "")
    ))
    .await;
    let (stale, on_replica) = stale_reads(waiting.addr.port(), 1000).await;
    eprintln!(
        "read-your-writes, user scope, wait_for_replay_ms = 1000: {stale} stale of 1000; {on_replica} reads on a replica"
    );
    assert_eq!(stale, 0);
    assert!(
        on_replica > 900,
        "waiting for replay lets reads use the replica; decisions: {:?}",
        waiting.shared.metrics.reasons.snapshot()
    );
    drop(waiting);

    // The policy chooses to wait (contract 0.2.0 `caught-up-replica`, here
    // up to 1 s) instead of the operator's global wait: the same result.
    let policy_waits = start(&format!(
        "{}[read_your_writes]\nscopes = [\"user\"]\n",
        policy(&example("read-your-writes"), "wait_ms = 1000")
    ))
    .await;
    let (stale, on_replica) = stale_reads(policy_waits.addr.port(), 1000).await;
    eprintln!(
        "read-your-writes, user scope, the policy waiting up to 1 s: {stale} stale of 1000; {on_replica} reads on a replica"
    );
    assert_eq!(stale, 0);
    assert!(
        on_replica > 900,
        "the wait lets reads use the replica that keeps up; decisions: {:?}",
        policy_waits.shared.metrics.reasons.snapshot()
    );
    c.resume_replay(paused).unwrap();
    // Caught up before the next test uses the replica (a backlog replayed
    // at once can cancel the next fixture query for a recovery conflict).
    c.wait_replayed().unwrap();
}

/// A policy call that fails (here: the policy panics on every read, which
/// carries a hint) falls back to the built-in routing, and that keeps
/// read-your-writes too: the session's reads never reach the paused
/// replica. (Before, the fallback sent them to any replica.) After a few
/// failures the version is rolled back; with no version before it, that
/// leaves the built-in routing, which must keep it as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_policy_call_still_reads_your_writes() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let paused = table_then_pause(c, "DROP TABLE IF EXISTS ryw; CREATE TABLE ryw (v int)");
    let failing = start(&format!(
        "{}[read_your_writes]\nscopes = [\"user\"]\n",
        policy(&signalbox_tests::faulty(&["trap-on-hint"]), "")
    ))
    .await;
    let (stale, on_replica) =
        stale_reads_with(failing.addr.port(), 300, "/* signalbox: boom=1 */ ").await;
    let decisions = failing.shared.metrics.reasons.snapshot();
    eprintln!("a trapping policy, user scope: {stale} stale of 300; {on_replica} reads on a replica; {decisions:?}");
    assert!(
        decisions
            .iter()
            .any(|(reason, n)| reason == "fallback:trap" && *n > 0),
        "the policy calls did not fail: {decisions:?}"
    );
    assert_eq!(stale, 0);
    c.resume_replay(paused).unwrap();
    c.wait_replayed().unwrap();
}

/// Run the Sequelize application of `tests/drivers/sequelize_ryw.js`
/// through `server`; its JSON report, and how many statements each node ran.
async fn sequelize_app(
    server: &signalbox::server::Server,
    iterations: u32,
) -> (serde_json::Value, Vec<u64>) {
    let drivers = root().join("tests/drivers");
    assert!(
        drivers.join("node_modules/sequelize").is_dir(),
        "node packages missing: run `cargo xtask setup` (or `npm ci --prefix tests/drivers`)"
    );
    // By name: primary, replica-1, replica-2.
    let routed = |s: &signalbox::server::Server| -> Vec<u64> {
        s.shared
            .metrics
            .routed
            .snapshot()
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    };
    let before = routed(server);
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        server.addr.port()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(drivers.join("sequelize_ryw.js"))
            .env("SB_URL", url)
            .env("ITERATIONS", iterations.to_string())
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| {
        panic!("cannot run node: {e}. `cargo xtask setup` installs it; this test does not skip.")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "node sequelize_ryw.js failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let after = routed(server);
    (
        report,
        after.iter().zip(&before).map(|(a, b)| a - b).collect(),
    )
}

/// An application written for one PostgreSQL (Sequelize with its own pool,
/// no replication settings) runs unchanged with read-your-writes on, one
/// replica replaying 500 ms late: every read sees the write before it, and
/// most reads still run on a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequelize_reads_its_writes_from_replicas() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let late = c.replicas[1].port;
    c.psql(late, "ALTER SYSTEM SET recovery_min_apply_delay = '500ms'")
        .unwrap();
    c.psql(late, "SELECT pg_reload_conf()").unwrap();

    // Off (reads to the late replica): the application sees stale data.
    let off = start(&policy(&example("rw-split"), "read = [\"replica-2\"]")).await;
    let (report, _) = sequelize_app(&off, 20).await;
    assert!(
        report["stale"].as_u64().unwrap() > 0,
        "the app must be able to see stale reads: {report}"
    );
    drop(off);

    let on = start(&format!(
        "{}[read_your_writes]\nscopes = [\"session\", \"user\"]\n",
        policy(&example("read-your-writes"), "wait_ms = 1000")
    ))
    .await;
    let (report, routed) = sequelize_app(&on, 200).await;
    let reads = report["reads"].as_u64().unwrap();
    let on_replicas = routed[1] + routed[2];
    eprintln!(
        "Sequelize, read-your-writes on (session+user, policy waits up to 1 s, replica-2 500 ms late): {} stale of {reads} reads; {on_replicas} statements on replicas ({:.0} % of reads), {} on the primary",
        report["stale"], 100.0 * on_replicas as f64 / reads as f64, routed[0]
    );
    assert_eq!(report["stale"], 0, "{report}");
    assert!(
        on_replicas * 2 > reads,
        "most reads run on a replica: {on_replicas} of {reads}"
    );
    drop(on);
    c.psql(late, "ALTER SYSTEM RESET recovery_min_apply_delay")
        .unwrap();
    c.psql(late, "SELECT pg_reload_conf()").unwrap();
}

/// `lag-aware` (max 200 ms, probes every 100 ms) under a steady write load:
/// replay paused on its replica, reads leave it within about the bound plus
/// two probe intervals; resumed, they come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_aware_leaves_a_paused_replica_and_returns() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    c.psql(
        c.primary.port,
        "CREATE TABLE IF NOT EXISTS lag_load (v int)",
    )
    .unwrap();
    c.wait_replayed().unwrap();
    // replica-1 takes no reads (weight 0), so every read is replica-2's to lose.
    let nodes = c.nodes_toml().replace(
        "name = \"replica-1\"\n",
        "name = \"replica-1\"\nweight = 0\n",
    );
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[health]\ninterval_ms = 100\n{}{nodes}",
        policy(&example("lag-aware"), "max_lag_ms = 200")
    );
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("lag.toml")).unwrap();
    let server = signalbox::server::Server::start(config).await.unwrap();
    let (primary, late) = (c.primary.port, c.replicas[1].port);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let w = connect(primary, "postgres").await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                w.execute("INSERT INTO lag_load VALUES (1)", &[])
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    };
    let reader = connect(server.addr.port(), "postgres").await;
    let port = || async {
        value(&reader, "SELECT inet_server_port()")
            .await
            .parse::<u16>()
            .unwrap()
    };
    let deadline = |s| tokio::time::Instant::now() + std::time::Duration::from_secs(s);

    // Caught up: reads run on replica-2.
    let until = deadline(15);
    while port().await != late {
        assert!(
            tokio::time::Instant::now() < until,
            "reads never reached replica-2"
        );
    }
    c.pause_replay(late).unwrap();
    let paused = std::time::Instant::now();
    // Reads leave it; then none returns while it stays paused.
    let mut last_on_late = std::time::Duration::ZERO;
    let until = deadline(3);
    while tokio::time::Instant::now() < until {
        if port().await == late {
            last_on_late = paused.elapsed();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    eprintln!("lag-aware: last read on the paused replica {last_on_late:?} after the pause (bound 200 ms, probes every 100 ms)");
    assert!(
        last_on_late < std::time::Duration::from_millis(2000),
        "reads kept going to the paused replica for {last_on_late:?}"
    );
    c.resume_replay(late).unwrap();
    let resumed = std::time::Instant::now();
    let until = deadline(15);
    while port().await != late {
        assert!(
            tokio::time::Instant::now() < until,
            "reads never came back to replica-2"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    eprintln!(
        "lag-aware: reads back on the replica {:?} after resuming",
        resumed.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

/// The replica the policy chose for a read is dead (its node stopped and
/// signalbox has not banned it yet): the read moves to another node, and
/// that node too must have replayed the session's writes — not the paused
/// replica, which lacks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_moved_off_a_dead_replica_still_sees_the_sessions_writes() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    table_then_pause(
        c,
        "DROP TABLE IF EXISTS ryw_moved; CREATE TABLE ryw_moved (v int)",
    );
    let (live, paused) = (&c.replicas[0], &c.replicas[1]);
    // Probes slow to ban (10 failures, 300 ms apart): the read below runs
    // while the view still calls the dead replica healthy, as it would
    // between two probes.
    let sb = start_with_health(
        "interval_ms = 300\nfailures_to_ban = 10",
        &format!(
            "{}[read_your_writes]\nscopes = [\"user\"]\n",
            policy(&example("read-your-writes"), "")
        ),
    )
    .await;
    let a = connect(sb.addr.port(), "postgres").await;
    let b = connect(sb.addr.port(), "postgres").await;
    a.batch_execute("INSERT INTO ryw_moved VALUES (1)")
        .await
        .unwrap();
    // Until signalbox sees the live replica caught up, reads stay on the
    // primary; then they go there (and leave a pooled connection to it).
    let read = "SELECT count(*)::int, inet_server_port() FROM ryw_moved";
    let mut on_live = false;
    for _ in 0..100 {
        let row = b.query_one(read, &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1, "a read missed the write");
        if row.get::<_, Option<i32>>(1) == Some(i32::from(live.port)) {
            on_live = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(on_live, "reads never reached the caught-up replica");
    tokio::task::block_in_place(|| c.kill(live)).unwrap();
    // At once, before the probes ban it: the policy still picks it. (One
    // simple Query: a prepared read would be routed twice, its Execute
    // after the failed connection got the node banned.)
    let answer = value(
        &b,
        "SELECT count(*) || ',' || inet_server_port() FROM ryw_moved",
    )
    .await;
    let (count, port) = answer.split_once(',').unwrap();
    let served_by: Option<i32> = port.parse().ok();
    eprintln!(
        "read after the replica died: served by port {served_by:?} (primary {}, live {}, paused {})",
        c.primary.port, live.port, paused.port
    );
    let fresh = count == "1";
    drop((a, b, sb));
    tokio::task::block_in_place(|| c.restart(live)).unwrap();
    c.resume_replay(paused.port).unwrap();
    c.wait_replayed().unwrap();
    assert!(
        fresh,
        "the read moved to a node that had not replayed the session's write (port {served_by:?}, paused replica {})",
        paused.port
    );
}
