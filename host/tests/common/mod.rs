//! What the tests that run the `signalbox` binary share: pgbench, and a
//! throwaway cluster initialised for it.

use std::process::{Child, Command, Stdio};

use signalbox::local::LocalCluster;

/// pgbench against `port` (database `postgres`), output captured.
pub fn pgbench(port: u16, args: &[&str]) -> Child {
    Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(args)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgbench (postgresql-contrib; `cargo xtask setup` installs it)")
}

/// A primary and `replicas` streaming replicas with pgbench's tables
/// (scale 1), replayed everywhere.
pub fn bench_cluster(replicas: usize) -> LocalCluster {
    let cluster = LocalCluster::start(replicas).expect("start a PostgreSQL cluster");
    let init = pgbench(cluster.primary.port, &["-i", "-q", "-s", "1"])
        .wait_with_output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    cluster
        .wait_replayed()
        .expect("replicas replay pgbench's tables");
    cluster
}
