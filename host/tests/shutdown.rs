//! `signalbox serve` receiving SIGTERM while pgbench (tpcb-like) runs
//! through it: no transaction is cut in the middle, every transaction
//! pgbench saw commit is in the database, and the process exits cleanly.

use std::process::Command;
use std::time::{Duration, Instant};

use signalbox::local::free_port;

mod common;
use common::{bench_cluster, pgbench, serve};

/// The command numbers of pgbench's built-in tpcb-like script: 0-3 are
/// `\set`, 4 is `BEGIN`, 5-9 the statements, 10 `END`.
const BEGIN_COMMAND: u32 = 4;

#[test]
fn sigterm_during_pgbench_cuts_no_transaction() {
    let cluster = bench_cluster(1);

    let port = free_port();
    let config = cluster.dir.path().join("signalbox.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[clients]\nshutdown_drain_s = 20\n{}",
            cluster.nodes_toml()
        ),
    )
    .unwrap();
    let mut sb = serve(&config, None);

    let bench = pgbench(
        port,
        &["-n", "-b", "tpcb-like", "-c", "4", "-j", "2", "-T", "30"],
    );
    std::thread::sleep(Duration::from_secs(3));
    let term = Command::new("kill")
        .args(["-TERM", &sb.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = sb.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "signalbox did not exit within its drain time"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "signalbox exited with {status}");

    let out = bench.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every client was told to go at a transaction boundary: the command it
    // could not run is the next BEGIN, never a statement inside a transaction.
    let aborted: Vec<u32> = text
        .lines()
        .filter_map(|l| l.split("aborted in command ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(
        aborted.len(),
        4,
        "every client ends with the shutdown:\n{text}"
    );
    assert!(
        aborted.iter().all(|c| *c == BEGIN_COMMAND),
        "a transaction was cut: {aborted:?}\n{text}"
    );
    let processed: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(['/', ' ']).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in:\n{text}"));
    assert!(processed > 0, "{text}");
    let history = cluster
        .psql(cluster.primary.port, "SELECT count(*) FROM pgbench_history")
        .unwrap();
    assert_eq!(
        history.trim().parse::<i64>().unwrap(),
        processed,
        "committed transactions differ from what pgbench saw commit"
    );
}
