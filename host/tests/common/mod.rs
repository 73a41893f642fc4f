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

/// A running `signalbox serve`, killed when dropped, so a failing test
/// leaves no server behind.
pub struct Served(pub Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Served {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Served {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// `signalbox serve --config path`, returned once it listens. `log`: where
/// its stderr goes (none: discarded), with `SIGNALBOX_LOG` set to `filter`.
pub fn serve(path: &std::path::Path, log: Option<(&std::path::Path, &str)>) -> Served {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_signalbox"));
    cmd.args(["serve", "--config"])
        .arg(path)
        .stdout(Stdio::piped());
    match log {
        Some((file, filter)) => {
            let f = std::fs::File::create(file).expect("create the log file");
            cmd.env("SIGNALBOX_LOG", filter).stderr(f);
        }
        None => {
            cmd.stderr(Stdio::null());
        }
    }
    let mut sb = Served(cmd.spawn().expect("run signalbox"));
    let mut line = String::new();
    if let Some(out) = sb.0.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    assert!(
        line.contains("listening"),
        "signalbox did not start: {line}"
    );
    sb
}
