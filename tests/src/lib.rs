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
    statement.hints = signalbox::sql::hints::parse(sql).into();
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

/// `curl` the admin API: (status code, body).
pub fn admin_call(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "20",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
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

pub mod raw {
    //! A raw protocol-v3 client for adversarial tests: it sends exactly the
    //! messages it is told to, reads single messages with a bound, and can
    //! vanish with a TCP reset at any point.

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub struct Raw {
        pub stream: TcpStream,
        /// What the server sent during login (ParameterStatus, BackendKeyData ...).
        pub login: Vec<Msg>,
    }

    /// One backend message: type byte and body.
    pub type Msg = (u8, Vec<u8>);

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        frame(b'Q', &b)
    }

    /// A Query whose text is given as raw bytes (e.g. not UTF-8).
    pub fn query_bytes(sql: &[u8]) -> Vec<u8> {
        let mut b = sql.to_vec();
        b.push(0);
        frame(b'Q', &b)
    }

    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        parse_bytes(name, sql.as_bytes())
    }

    /// A Parse whose text is given as raw bytes (e.g. LATIN9).
    pub fn parse_bytes(name: &str, sql: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        b.extend_from_slice(sql);
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        frame(b'P', &b)
    }

    /// Bind `stmt` to `portal` without parameters, text results.
    pub fn bind(portal: &str, stmt: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, stmt);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        frame(b'B', &b)
    }

    pub fn describe_portal(portal: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        cstr(&mut b, portal);
        frame(b'D', &b)
    }

    pub fn describe_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        frame(b'D', &b)
    }

    pub fn close_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        frame(b'C', &b)
    }

    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&max_rows.to_be_bytes());
        frame(b'E', &b)
    }

    pub fn sync() -> Vec<u8> {
        frame(b'S', &[])
    }

    pub fn flush() -> Vec<u8> {
        frame(b'H', &[])
    }

    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        frame(b'd', data)
    }

    pub fn copy_done() -> Vec<u8> {
        frame(b'c', &[])
    }

    /// A protocol-3.0 StartupMessage.
    pub fn startup(user: &str, database: &str) -> Vec<u8> {
        startup_with(user, database, &[])
    }

    /// A StartupMessage with more parameters (`client_encoding`, `options` …).
    pub fn startup_with(user: &str, database: &str, params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&196_608i32.to_be_bytes());
        cstr(&mut b, "user");
        cstr(&mut b, user);
        cstr(&mut b, "database");
        cstr(&mut b, database);
        for (k, v) in params {
            cstr(&mut b, k);
            cstr(&mut b, v);
        }
        b.push(0);
        let mut out = (b.len() as i32 + 4).to_be_bytes().to_vec();
        out.extend_from_slice(&b);
        out
    }

    /// The SQLSTATE (`C` field) of an ErrorResponse body.
    pub fn sqlstate(body: &[u8]) -> String {
        field(body, b'C')
    }

    /// A field of an ErrorResponse/NoticeResponse body.
    pub fn field(body: &[u8], code: u8) -> String {
        let mut rest = body;
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            if c == code {
                return String::from_utf8_lossy(&tail[..end]).into_owned();
            }
            rest = &tail[(end + 1).min(tail.len())..];
        }
        String::new()
    }

    /// The columns of a DataRow body as bytes (NULL as None).
    pub fn data_row_bytes(body: &[u8]) -> Vec<Option<Vec<u8>>> {
        let n = i16::from_be_bytes([body[0], body[1]]) as usize;
        let mut pos = 2;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = i32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
            pos += 4;
            if len < 0 {
                out.push(None);
            } else {
                out.push(Some(body[pos..pos + len as usize].to_vec()));
                pos += len as usize;
            }
        }
        out
    }

    /// The text columns of a DataRow body (NULL as None).
    pub fn data_row(body: &[u8]) -> Vec<Option<String>> {
        data_row_bytes(body)
            .into_iter()
            .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .collect()
    }

    impl Raw {
        /// Connect and log in (trust); returns after the first ReadyForQuery.
        pub async fn connect(port: u16, user: &str, database: &str) -> Raw {
            Self::connect_with(port, user, database, &[]).await
        }

        /// Connect with more startup parameters.
        pub async fn connect_with(
            port: u16,
            user: &str,
            database: &str,
            params: &[(&str, &str)],
        ) -> Raw {
            let stream = TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap_or_else(|e| panic!("connect to {port}: {e}"));
            let mut raw = Raw {
                stream,
                login: Vec::new(),
            };
            raw.send(&startup_with(user, database, params)).await;
            let msgs = raw.until_ready().await;
            assert!(
                msgs.iter().all(|(t, _)| *t != b'E'),
                "login failed: {msgs:?}"
            );
            raw.login = msgs;
            raw
        }

        pub async fn send(&mut self, bytes: &[u8]) {
            self.stream
                .write_all(bytes)
                .await
                .expect("send to signalbox");
        }

        /// The next message, or None when the connection closed or nothing
        /// arrived within 10 s.
        pub async fn try_next(&mut self) -> Option<Msg> {
            self.next_within(Duration::from_secs(10)).await
        }

        pub async fn next_within(&mut self, limit: Duration) -> Option<Msg> {
            let read = async {
                let tag = self.stream.read_u8().await.ok()?;
                let len = self.stream.read_i32().await.ok()?;
                let mut body = vec![0u8; (len as usize).saturating_sub(4)];
                self.stream.read_exact(&mut body).await.ok()?;
                Some((tag, body))
            };
            tokio::time::timeout(limit, read).await.ok().flatten()
        }

        pub async fn next(&mut self) -> Msg {
            self.try_next()
                .await
                .expect("a message from signalbox within 10 s")
        }

        /// Every message up to and including the next ReadyForQuery.
        pub async fn until_ready(&mut self) -> Vec<Msg> {
            let mut out = Vec::new();
            loop {
                let m = self.next().await;
                let done = m.0 == b'Z';
                out.push(m);
                if done {
                    return out;
                }
            }
        }

        /// Run one simple query; the messages it produced.
        pub async fn simple(&mut self, sql: &str) -> Vec<Msg> {
            self.send(&query(sql)).await;
            self.until_ready().await
        }

        /// Read about `n` bytes of whatever the server is sending.
        pub async fn read_some(&mut self, n: usize) {
            let mut buf = vec![0u8; n];
            let _ = tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut buf))
                .await;
        }

        /// Send a StartupMessage on a fresh connection and return the first
        /// answer (an ErrorResponse when signalbox refuses the client).
        pub async fn first_answer(port: u16) -> Option<Msg> {
            let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            let mut raw = Raw {
                stream,
                login: Vec::new(),
            };
            raw.send(&startup("postgres", "postgres")).await;
            raw.try_next().await
        }

        /// Vanish: close with a TCP reset (SO_LINGER 0), as a killed client does.
        pub fn reset(self) {
            // Linger 0 closes at once with a reset; nothing blocks.
            #[allow(deprecated)]
            let _ = self.stream.set_linger(Some(Duration::ZERO));
            drop(self.stream);
        }
    }
}
