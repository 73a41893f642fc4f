//! What an operator sees through the admin API on a running service over
//! a real cluster: the shadow policy's disagreements, `/metrics` read by
//! the Prometheus project's own parser, the status page rendered by
//! headless Chromium, and a rejected policy reload named in `/status`.

use std::path::Path;
use std::time::Duration;

use signalbox::config::Config;
use signalbox::server::Server;
use signalbox_tests::service::{self, connect};
use signalbox_tests::{admin_call, example, faulty};

fn status(server: &Server) -> serde_json::Value {
    let url = format!("http://{}/status", server.admin_addr.unwrap());
    let (code, body) = tokio::task::block_in_place(|| admin_call("GET", &url, None));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The count of shadow (active, shadow) pairs matching `pick`.
fn pairs(status: &serde_json::Value, pick: impl Fn(&str, &str) -> bool) -> u64 {
    status["shadow"]["pairs"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| pick(p["active"].as_str().unwrap(), p["shadow"].as_str().unwrap()))
                .map(|p| p["count"].as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}

/// Resumes replay on a replica however the test ends.
struct Resume(u16);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = service::cluster().resume_replay(self.0);
    }
}

/// rw-split decides, lag-aware shadows it: with replay paused on
/// replica-1, the active policy keeps reading there while the shadow
/// would not, and `/status` counts exactly those disagreements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_policy_is_compared_without_deciding_anything() {
    let server = service::start(&format!(
        "[policy]\npath = {:?}\n[policy.config]\nspread = \"statement\"\n\
         [shadow_policy]\npath = {:?}\n[shadow_policy.config]\nmax_lag_ms = 300\n\
         [health]\ninterval_ms = 100\n",
        example("rw-split").display().to_string(),
        example("lag-aware").display().to_string(),
    ))
    .await;
    let c = connect(server.addr.port(), "postgres").await;
    for _ in 0..20 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let before = status(&server);
    assert_eq!(
        before["shadow"]["name"], "lag-aware",
        "{}",
        before["shadow"]
    );
    assert!(before["shadow"]["compared"].as_u64().unwrap() >= 20);

    let cluster = service::cluster();
    let paused = cluster.replicas[0].port;
    cluster.pause_replay(paused).unwrap();
    let _resume = Resume(paused);
    let primary = connect(cluster.primary.port, "postgres").await;
    primary
        .simple_query("CREATE TABLE IF NOT EXISTS shadow_writes (x int)")
        .await
        .unwrap();
    for i in 0..20 {
        primary
            .simple_query(&format!("INSERT INTO shadow_writes VALUES ({i})"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let routed_before = server.shared.metrics.routed.value("replica-1");
    for _ in 0..60 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let after = status(&server);
    // The shadow changed nothing: rw-split still spread reads onto replica-1.
    let routed = server.shared.metrics.routed.value("replica-1") - routed_before;
    assert!(
        routed >= 20,
        "rw-split sent {routed} of 60 reads to replica-1"
    );
    let moved = |s: &serde_json::Value| pairs(s, |a, sh| a == "replica-1" && sh != "replica-1");
    let chose_paused =
        |s: &serde_json::Value| pairs(s, |a, sh| a != "replica-1" && sh == "replica-1");
    assert!(
        moved(&after) - moved(&before) >= routed,
        "every read rw-split sent to the lagging replica is a disagreement: {}",
        after["shadow"]
    );
    assert_eq!(
        chose_paused(&after),
        chose_paused(&before),
        "lag-aware never picks the lagging replica: {}",
        after["shadow"]
    );
    assert!(after["shadow"]["rate"].as_f64().unwrap() > 0.0);
    assert!(!after["shadow"]["samples"].as_array().unwrap().is_empty());
}

/// A shadow that fails is counted as failing, not as disagreeing, never
/// touches the client's statement, and once its automatic rollback leaves
/// it without a version, `/status` says so and nothing is compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shadow_is_visible_and_harmless() {
    let server = service::start(&format!(
        "[shadow_policy]\npath = {:?}\n",
        faulty(&["trap-on-hint"]).display().to_string(),
    ))
    .await;
    let c = connect(server.addr.port(), "postgres").await;
    for _ in 0..5 {
        let rows = c
            .simple_query("/* signalbox: boom=1 */ SELECT 1")
            .await
            .expect("the shadow's trap never reaches the client");
        assert!(!rows.is_empty());
    }
    let s = status(&server);
    assert_eq!(s["shadow"]["failures"], 5, "{}", s["shadow"]);
    assert_eq!(s["shadow"]["compared"], 0, "{}", s["shadow"]);
    assert_eq!(s["shadow"]["active"], true);
    // 20 calls, all failing: the shadow's own rollback leaves it empty.
    for _ in 0..20 {
        c.simple_query("/* signalbox: boom=1 */ SELECT 1")
            .await
            .unwrap();
    }
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let s = status(&server);
    assert_eq!(s["shadow"]["active"], false, "{}", s["shadow"]);
    assert_eq!(s["shadow"]["compared"], 0, "{}", s["shadow"]);
    let url = format!("http://{}/metrics", server.admin_addr.unwrap());
    let (_, metrics) = tokio::task::block_in_place(|| admin_call("GET", &url, None));
    assert!(
        metrics.contains("signalbox_shadow_failures_total 20"),
        "{metrics}"
    );
}

/// Node names with quotes and backslashes come out escaped, and the whole
/// exposition parses with `prometheus_client.parser`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_the_prometheus_parser() {
    let weird = r#"re"pl\ica 1"#;
    let text = service::config_text("").replace("name = \"replica-1\"", "name = 're\"pl\\ica 1'");
    assert!(text.contains(weird), "{text}");
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    let server = Server::start(config).await.unwrap();
    let c = connect(server.addr.port(), "postgres").await;
    for _ in 0..40 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let url = format!("http://{}/metrics", server.admin_addr.unwrap());
    let (code, metrics) = tokio::task::block_in_place(|| admin_call("GET", &url, None));
    assert_eq!(code, 200);
    let parser = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let parsed = tokio::task::block_in_place(|| {
        use std::io::Write;
        let mut child = std::process::Command::new("python3")
            .args(["-c", parser])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (`cargo xtask setup` installs prometheus_client)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    });
    assert!(
        parsed.status.success(),
        "the Prometheus parser refused /metrics: {}\n{metrics}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let samples: Vec<(String, serde_json::Value, f64)> =
        serde_json::from_slice(&parsed.stdout).unwrap();
    let routed = |node: &str| {
        samples
            .iter()
            .find(|(n, l, _)| n == "signalbox_routed_total" && l["node"] == node)
            .map(|(_, _, v)| *v)
    };
    let to_replicas = routed(weird).unwrap_or_else(|| panic!("no {weird} row:\n{metrics}"))
        + routed("replica-2").unwrap();
    assert_eq!(to_replicas, 40.0, "{metrics}");
    assert!(samples
        .iter()
        .any(|(n, l, v)| n == "signalbox_node_up" && l["node"] == weird && *v == 1.0));
    assert!(
        samples
            .iter()
            .any(|(n, l, v)| n == "signalbox_backend_connections_total"
                && l["event"] == "opened"
                && *v >= 1.0),
        "{metrics}"
    );
    for family in [
        "signalbox_exchange_seconds",
        "signalbox_policy_call_seconds",
        "signalbox_checkout_wait_seconds",
    ] {
        assert!(
            samples
                .iter()
                .any(|(n, _, _)| n == &format!("{family}_count")),
            "no histogram {family}:\n{metrics}"
        );
    }
}

/// `GET /` in headless Chromium shows every node and a chart with a line
/// per node once traffic was sampled. With SIGNALBOX_SCREENSHOT set, a
/// screenshot is saved there (how docs/status-page.png is made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_nodes_and_traffic_in_a_browser() {
    let server = service::start(&format!(
        "[policy]\npath = {:?}\n",
        example("rw-split").display().to_string()
    ))
    .await;
    let c = connect(server.addr.port(), "postgres").await;
    // Traffic is sampled every 5 s: read for a while so that two samples
    // apart have something between them.
    let until = tokio::time::Instant::now() + Duration::from_millis(6500);
    while tokio::time::Instant::now() < until {
        c.simple_query("SELECT 1").await.unwrap();
        c.simple_query("SELECT pg_sleep(0.002)").await.unwrap();
    }
    let url = format!("http://{}/", server.admin_addr.unwrap());
    let chromium = |extra: &[&str]| {
        let out = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--virtual-time-budget=5000",
            ])
            .args(extra)
            .arg(&url)
            .stderr(std::process::Stdio::null())
            .output()
            .expect("chromium (`cargo xtask setup` installs it)");
        assert!(out.status.success(), "chromium failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = tokio::task::block_in_place(|| chromium(&["--dump-dom"]));
    let nodes = dom
        .split("id=\"nodes\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no nodes table:\n{dom}"));
    for name in ["primary", "replica-1", "replica-2"] {
        assert!(
            nodes.contains(&format!(">{name}<")),
            "{name} missing:\n{dom}"
        );
    }
    let lines: Vec<&str> = dom
        .split("<polyline")
        .skip(1)
        .filter(|l| l.contains("class=\"series\""))
        .collect();
    assert_eq!(lines.len(), 3, "one line per node:\n{dom}");
    let drawn = lines
        .iter()
        .filter_map(|l| l.split("points=\"").nth(1)?.split('"').next())
        .filter(|p| p.split_whitespace().count() >= 2)
        .count();
    assert_eq!(drawn, 3, "every line has points:\n{dom}");
    if let Ok(path) = std::env::var("SIGNALBOX_SCREENSHOT") {
        tokio::task::block_in_place(|| chromium(&[&format!("--screenshot={path}")]));
    }
}

/// A policy file that fails validation: the API answers 422 naming the
/// stage, `/status` shows it as the last reload, and routing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_policy_reload_is_named_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("policy.wasm");
    std::fs::copy(example("rw-split"), &live).unwrap();
    let server = service::start(&format!(
        "[policy]\npath = {:?}\n[policy.watch]\nenabled = false\n",
        live.display().to_string()
    ))
    .await;
    std::fs::write(&live, b"\0asm this is not a component").unwrap();
    let url = format!("http://{}/policy/reload", server.admin_addr.unwrap());
    let (code, body) = tokio::task::block_in_place(|| admin_call("POST", &url, None));
    assert_eq!(code, 422, "{body}");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    let stage = event["stage"].as_str().unwrap().to_owned();
    let s = status(&server);
    assert_eq!(s["policy"]["last_reload"]["result"], "rejected");
    assert_eq!(s["policy"]["last_reload"]["stage"], stage.as_str());
    assert_eq!(s["policy"]["reloads_failed"], 1);
    assert_eq!(s["policy"]["active"]["name"], "policy");
    let c = connect(server.addr.port(), "postgres").await;
    let rows = c.simple_query("SELECT 1").await.unwrap();
    assert!(!rows.is_empty());
}

/// Switching `[policy]` to another file by a config reload keeps the
/// manager's record: the reload history goes on, the previous version is
/// the rollback target, and a broken `[policy]` is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_switched_by_config_reload_keeps_history_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signalbox.toml");
    let section = |p: &Path| {
        format!(
            "[policy]\npath = {:?}\n[policy.watch]\nenabled = false\n",
            p.display().to_string()
        )
    };
    std::fs::write(&path, service::config_text(&section(&example("rw-split")))).unwrap();
    let server = Server::start(Config::load(&path).unwrap()).await.unwrap();
    let name = |s: &Server| {
        s.policy()
            .status()
            .active
            .map(|p| p.name)
            .unwrap_or_default()
    };
    assert_eq!(name(&server), "rw-split");

    std::fs::write(&path, service::config_text(&section(&example("lag-aware")))).unwrap();
    let event = server.reloader.reload("test").await;
    assert_eq!(event.result, "applied", "{event:?}");
    let status = server.policy().status();
    assert_eq!(name(&server), "lag-aware");
    assert_eq!(
        status.last_known_good.map(|p| p.name).as_deref(),
        Some("rw-split")
    );
    let triggers: Vec<String> = status.history.iter().map(|e| e.trigger.clone()).collect();
    assert_eq!(
        triggers,
        ["startup", "test"],
        "one journal across the switch"
    );
    assert_eq!(status.reloads_ok, 2);

    // A [policy] naming a file that is not a policy: refused whole.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    std::fs::write(&path, service::config_text(&section(&junk))).unwrap();
    let event = server.reloader.reload("test").await;
    assert_eq!(event.result, "rejected", "{event:?}");
    assert!(
        event.error.as_deref().unwrap_or("").starts_with("policy: "),
        "{event:?}"
    );
    assert_eq!(name(&server), "lag-aware");

    // The rollback target survived the switch.
    let url = format!("http://{}/policy/rollback", server.admin_addr.unwrap());
    let (code, body) = tokio::task::block_in_place(|| admin_call("POST", &url, None));
    assert_eq!(code, 200, "{body}");
    assert_eq!(name(&server), "rw-split");
    let c = connect(server.addr.port(), "postgres").await;
    assert!(!c.simple_query("SELECT 1").await.unwrap().is_empty());
}

/// Relay one client connection to `upstream`, holding back what the client
/// sends after its startup message until `go` fires; `spoke` fires once
/// the server has answered the startup message (the session exists).
async fn slow_login_relay(
    upstream: u16,
) -> (
    u16,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (spoke_tx, spoke_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
            .await
            .unwrap();
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut spoke = Some(spoke_tx);
            while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                if to_client.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                if let Some(s) = spoke.take() {
                    let _ = s.send(());
                }
            }
        });
        let mut buf = vec![0u8; 8192];
        let n = from_client.read(&mut buf).await.unwrap();
        to_server.write_all(&buf[..n]).await.unwrap();
        let _ = go_rx.await;
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
    });
    (port, spoke_rx, go_tx)
}

/// A client still authenticating when a config reload replaces the
/// cluster (its pools retired) logs in on the new cluster, in session and
/// in transaction pooling: a reload refuses no login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_under_way_survives_a_config_reload() {
    for mode in ["session", "transaction"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signalbox.toml");
        let text = |size: u32| {
            service::config_text(&format!(
                "[auth]\nmethod = \"scram-sha-256\"\n[[auth.users]]\nname = \"postgres\"\n\
                 password = \"pw\"\n[pool]\nmode = \"{mode}\"\nsize = {size}\n"
            ))
        };
        std::fs::write(&path, text(10)).unwrap();
        let server = Server::start(Config::load(&path).unwrap()).await.unwrap();
        let (port, spoke, go) = slow_login_relay(server.addr.port()).await;
        let login = tokio::spawn(async move {
            tokio_postgres::connect(
                &format!(
                    "host=127.0.0.1 port={port} user=postgres password=pw dbname=postgres sslmode=disable"
                ),
                tokio_postgres::NoTls,
            )
            .await
        });
        spoke.await.unwrap();
        // A [pool] change rebuilds the cluster and retires the old pools.
        std::fs::write(&path, text(9)).unwrap();
        let event = server.reloader.reload("test").await;
        assert_eq!(event.result, "applied", "{event:?}");
        go.send(()).unwrap();
        let (client, conn) = login
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode} pooling: a login across a reload failed: {e}"));
        tokio::spawn(conn);
        let rows = client.simple_query("SELECT 1").await.unwrap();
        assert!(rows.len() > 1, "{mode} pooling: {rows:?}");
        if mode == "session" {
            // Its own connection comes from the new configuration's pools
            // (not one born in the retired set, outside every count).
            let live = server.shared.live();
            let primary = live.cluster.view().primary().unwrap();
            assert_eq!(
                live.cluster.pools.in_flight(primary),
                1,
                "the session's connection belongs to the current cluster"
            );
        }
    }
}
