//! Shared helpers of the end-to-end tests: building real policies to wasm
//! (once per test process), placing them on disk, and waiting with a bound.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use signalbox::policy::build::{build_policy, BuildOptions};
use signalbox::route::{ClusterView, RouteInput, Session, Statement, StatementKind};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn built() -> &'static Mutex<HashMap<String, PathBuf>> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    BUILT.get_or_init(Mutex::default)
}

fn build_cached(key: &str, dir: &Path, features: &[&str]) -> PathBuf {
    let mut map = built().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(key) {
        return p.clone();
    }
    let out_dir = root().join("target").join("test-policies");
    std::fs::create_dir_all(&out_dir).expect("create target/test-policies");
    let opts = BuildOptions {
        out: Some(out_dir.join(format!("{key}.wasm"))),
        // A separate target dir: the outer `cargo test` may still hold target/'s lock.
        target_dir: Some(root().join("target").join("policy-build")),
        features: features.iter().map(|f| f.to_string()).collect(),
        quiet: true,
    };
    let built = build_policy(dir, &opts)
        .unwrap_or_else(|e| panic!("building policy {key} from {}: {e}", dir.display()));
    map.insert(key.to_owned(), built.path.clone());
    built.path
}

/// An example policy from `policies/NAME`, built to a component.
pub fn example(name: &str) -> PathBuf {
    build_cached(name, &root().join("policies").join(name), &[])
}

/// The misbehaving test policy with the given features.
pub fn faulty(features: &[&str]) -> PathBuf {
    let key = format!("faulty-{}", features.join("+"));
    build_cached(&key, &root().join("tests/policies/faulty"), features)
}

/// Poll `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Replace `dst` atomically the way editors do: write a temp file, rename it.
pub fn replace_by_rename(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("tmp~");
    std::fs::copy(src, &tmp).expect("copy to temp");
    std::fs::rename(&tmp, dst).expect("rename into place");
}

/// A statement input against `cluster`.
pub fn input(
    kind: StatementKind,
    read_only: bool,
    sql: &str,
    cluster: &Arc<ClusterView>,
) -> RouteInput {
    let mut statement = Statement::new(kind, read_only, sql);
    statement.hints = signalbox::sql::hints::parse(sql);
    RouteInput {
        statement: Arc::new(statement),
        session: Arc::new(Session {
            id: 7,
            user: "app".into(),
            database: "app".into(),
            ..Session::default()
        }),
        cluster: cluster.clone(),
    }
}

/// primary (0) and replicas 1 and 2, all healthy.
pub fn cluster() -> Arc<ClusterView> {
    Arc::new(
        signalbox::policy::fixtures::smoke_inputs()[0]
            .cluster
            .as_ref()
            .clone(),
    )
}

pub fn read(cluster: &Arc<ClusterView>) -> RouteInput {
    input(StatementKind::Select, true, "SELECT * FROM users", cluster)
}

pub fn write(cluster: &Arc<ClusterView>) -> RouteInput {
    input(
        StatementKind::Insert,
        false,
        "INSERT INTO users VALUES (1)",
        cluster,
    )
}

pub mod service {
    //! Starting signalbox in front of a real local cluster.

    use std::path::Path;
    use std::process::Command;
    use std::sync::OnceLock;

    use signalbox::config::Config;
    use signalbox::local::LocalCluster;
    use signalbox::server::Server;

    /// One primary + two streaming replicas, shared by the tests of a binary.
    pub fn cluster() -> &'static LocalCluster {
        static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            LocalCluster::start(2)
                .unwrap_or_else(|e| panic!("cannot start the PostgreSQL test cluster: {e:#}"))
        })
    }

    /// Config text for the shared cluster; `extra` is appended (pool, policy...).
    pub fn config_text(extra: &str) -> String {
        let c = cluster();
        let mut text =
            format!("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n");
        text.push_str(&c.nodes_toml());
        text
    }

    /// Start signalbox on the shared cluster with `extra` config.
    pub async fn start(extra: &str) -> Server {
        let text = config_text(extra);
        let config = Config::parse(&text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        Server::start(config).await.expect("signalbox starts")
    }

    /// The port of a node by name.
    pub fn port_of(name: &str) -> u16 {
        cluster()
            .all_nodes()
            .find(|n| n.name == name)
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn replica_ports() -> Vec<u16> {
        cluster().replicas.iter().map(|r| r.port).collect()
    }

    /// psql against `port` (through signalbox or direct); stdout+stderr and success.
    pub fn psql(port: u16, db: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut cmd = Command::new("psql");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-X",
            "-v",
            "ON_ERROR_STOP=0",
        ])
        .arg("-p")
        .arg(port.to_string())
        .arg("-d")
        .arg(db)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("run psql");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("psql output");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Connect tokio-postgres to `port`.
    pub async fn connect(port: u16, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname={db}"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap_or_else(|e| panic!("connect to {port}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Create a database on the primary (idempotent) and wait until replicas have it.
    pub fn database(name: &str) {
        let c = cluster();
        let exists = c
            .psql(
                c.primary.port,
                &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
            )
            .unwrap_or_default();
        if exists.trim() != "1" {
            let _ = c.psql(c.primary.port, &format!("CREATE DATABASE {name}"));
        }
        c.wait_replayed().expect("replicas replay");
    }
}
