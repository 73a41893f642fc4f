//! Read-your-writes across pooled connections, on a cluster of its own
//! (one replica with replay paused, one replaying normally): a row
//! inserted through one connection is read at once through another.

use signalbox_tests::example;
use signalbox_tests::service::{cluster, config_text, connect};

/// Insert on connection A, then read the row on connection B, `n` times;
/// how many reads did not see their row, and how many ran on a replica.
async fn stale_reads(port: u16, n: u32) -> (u32, u32) {
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
                "SELECT count(*), pg_is_in_recovery() FROM ryw WHERE v = $1",
                &[&(i as i32)],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            stale += 1;
        }
        if row.get::<_, bool>(1) {
            on_replica += 1;
        }
    }
    (stale, on_replica)
}

async fn start(extra: &str) -> signalbox::server::Server {
    let text = config_text(&format!("[health]\ninterval_ms = 100\n{extra}"));
    let config = signalbox::config::Config::parse(&text, std::path::Path::new("ryw.toml")).unwrap();
    signalbox::server::Server::start(config).await.unwrap()
}

fn policy(path: &std::path::Path, config: &str) -> String {
    format!(
        "[policy]\npath = {:?}\n[policy.config]\n{config}\n",
        path.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_writes_made_on_other_connections() {
    let c = cluster();
    c.psql(
        c.primary.port,
        "DROP TABLE IF EXISTS ryw; CREATE TABLE ryw (v int)",
    )
    .unwrap();
    c.wait_replayed().unwrap();
    let paused = c.replicas[1].port;
    c.psql(paused, "SELECT pg_wal_replay_pause()").unwrap();

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

    // On, waiting up to 50 ms for a replica to replay: still no stale
    // read, and reads land on the replica that keeps up.
    let waiting = start(&format!(
        "{}[read_your_writes]\nscopes = [\"user\"]\nwait_for_replay_ms = 50\n",
        policy(&example("read-your-writes"), "")
    ))
    .await;
    let (stale, on_replica) = stale_reads(waiting.addr.port(), 1000).await;
    eprintln!(
        "read-your-writes, user scope, wait_for_replay_ms = 50: {stale} stale of 1000; {on_replica} reads on a replica"
    );
    assert_eq!(stale, 0);
    assert!(
        on_replica > 0,
        "waiting for replay lets reads use the replica"
    );
    c.psql(paused, "SELECT pg_wal_replay_resume()").unwrap();
}
