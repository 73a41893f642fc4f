//! `signalbox serve` reloading its config file while pgbench (`-S`) runs
//! through it: SIGHUP adds a third replica, which starts taking reads, and
//! no transaction fails; invalid files (on SIGHUP and on
//! `POST /config/reload`) change nothing and are reported. The sampled
//! decision log is checked on the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use signalbox::local::free_port;

mod common;
use common::{bench_cluster, pgbench, serve};

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `signalbox_routed_total` of `node`, from `/metrics`.
fn routed(admin: u16, node: &str) -> u64 {
    let text = curl(&[&format!("http://127.0.0.1:{admin}/metrics")]);
    let prefix = format!("signalbox_routed_total{{node=\"{node}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `POST /config/reload`: the body, then a line with the HTTP status.
fn post_reload(admin: u16) -> String {
    curl(&[
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
        &format!("http://127.0.0.1:{admin}/config/reload"),
    ])
}

fn status(admin: u16) -> serde_json::Value {
    let text = curl(&[&format!("http://127.0.0.1:{admin}/status")]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("/status: {e}: {text}"))
}

/// The newest config reload in `/status`, once there are `n`.
fn nth_reload(admin: u16, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let history = status(admin)["config"]["history"].clone();
        if let Some(list) = history.as_array().filter(|l| l.len() >= n) {
            return list[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "config reload {n} never showed up: {history}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn config_text(port: u16, admin: u16, nodes: &str, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{extra}\n[logging]\ndecision_sample = 0.25\n{nodes}"
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn sighup_adds_a_replica_under_load_and_invalid_files_change_nothing() {
    let cluster = bench_cluster(3);

    let all = cluster.nodes_toml();
    // The same text without the last replica's [[nodes]] entry.
    let cut = all.rfind("\n[[nodes]]").unwrap();
    let (two, _) = all.split_at(cut);
    let (port, admin) = (free_port(), free_port());
    let path = cluster.dir.path().join("signalbox.toml");
    let log = cluster.dir.path().join("signalbox.log");
    write(&path, &config_text(port, admin, two, ""));
    let mut sb = serve(
        &path,
        Some((&log, "info,sqlx=warn,signalbox::decision=debug")),
    );

    // Long enough to outlast every step below on a slow machine.
    let bench = pgbench(port, &["-n", "-S", "-c", "4", "-j", "2", "-T", "25"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(routed(admin, "replica-3"), 0);
    // A client inside a transaction while the configuration changes.
    let mut open_tx = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut tx_in = open_tx.stdin.take().unwrap();
    {
        use std::io::Write;
        writeln!(
            tx_in,
            "BEGIN;\nSELECT 'before ' || count(*) FROM pgbench_branches;"
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));

    // 1. SIGHUP with a third replica added.
    write(&path, &config_text(port, admin, &all, ""));
    hup(sb.id());
    let added = nth_reload(admin, 1);
    assert_eq!(added["result"], "applied", "{added}");
    assert!(
        added["changes"]
            .to_string()
            .contains("node replica-3 added"),
        "{added}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while routed(admin, "replica-3") == 0 {
        assert!(Instant::now() < deadline, "no read reached the new replica");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(admin)["nodes"].as_array().unwrap().len(), 4);
    {
        use std::io::Write;
        writeln!(
            tx_in,
            "SELECT 'after ' || count(*) FROM pgbench_branches;\nCOMMIT;"
        )
        .unwrap();
    }
    drop(tx_in);
    let tx_out = open_tx.wait_with_output().unwrap();
    let tx_text = String::from_utf8_lossy(&tx_out.stdout).into_owned()
        + &String::from_utf8_lossy(&tx_out.stderr);
    assert!(
        tx_out.status.success() && tx_text.contains("before 1") && tx_text.contains("after 1"),
        "the transaction open across the reload: {tx_text}"
    );

    // 2. SIGHUP with an invalid file: rejected whole, naming file and key.
    write(&path, &config_text(port, admin, &all, "[pool]\nsize = 0\n"));
    hup(sb.id());
    let bad = nth_reload(admin, 2);
    assert_eq!(bad["result"], "rejected", "{bad}");
    let error = bad["error"].as_str().unwrap();
    assert!(
        error.contains("pool.size") && error.contains("signalbox.toml"),
        "{error}"
    );

    // 3. The API with a key that needs a restart: 422, nothing applied.
    write(&path, &config_text(free_port(), admin, &all, ""));
    let answer = post_reload(admin);
    assert!(answer.ends_with("422"), "{answer}");
    assert!(
        answer.contains("listen") && answer.contains("restart"),
        "{answer}"
    );

    // Still four nodes, and the new replica still takes reads.
    let before = routed(admin, "replica-3");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        routed(admin, "replica-3") > before,
        "the rejected files changed routing"
    );
    assert_eq!(status(admin)["nodes"].as_array().unwrap().len(), 4);

    // 3b. Removing the primary's entry would leave every write failing.
    let no_primary = all.replacen(
        &format!(
            "\n[[nodes]]\nname = \"primary\"\nurl = \"postgres://postgres@127.0.0.1:{}/postgres\"\nrole = \"primary\"\n",
            cluster.primary.port
        ),
        "",
        1,
    );
    assert_ne!(no_primary, all);
    write(&path, &config_text(port, admin, &no_primary, ""));
    let answer = post_reload(admin);
    assert!(
        answer.ends_with("422") && answer.contains("writable primary"),
        "{answer}"
    );

    // 4. The API removing replica-1 under load: it stops taking reads.
    let without = all.replacen(
        &format!(
            "\n[[nodes]]\nname = \"replica-1\"\nurl = \"postgres://postgres@127.0.0.1:{}/postgres\"\nrole = \"replica\"\n",
            cluster.replicas[0].port
        ),
        "",
        1,
    );
    assert_ne!(without, all);
    write(&path, &config_text(port, admin, &without, ""));
    let answer = post_reload(admin);
    assert!(
        answer.ends_with("200") && answer.contains("node replica-1 removed"),
        "{answer}"
    );
    // Statements routed just before the swap finish counting first.
    std::thread::sleep(Duration::from_millis(1000));
    let gone = routed(admin, "replica-1");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        routed(admin, "replica-1"),
        gone,
        "a removed node still took reads"
    );
    assert!(routed(admin, "replica-3") > before);

    let out = bench.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("number of failed transactions: 0"),
        "transactions failed across the reloads:\n{text}"
    );

    assert!(
        text.contains("number of transactions actually processed"),
        "{text}"
    );

    // The sampled decision log: about a quarter of the decisions.
    let decisions: u64 = ["primary", "replica-1", "replica-2", "replica-3"]
        .iter()
        .map(|n| routed(admin, n))
        .sum();
    let _ = Command::new("kill")
        .args(["-TERM", &sb.id().to_string()])
        .status();
    let _ = sb.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    let logged = log
        .lines()
        .filter(|l| l.contains("routing decision") && l.contains("node="))
        .count() as f64;
    let share = logged / decisions as f64;
    assert!(
        decisions > 1000 && (0.15..0.35).contains(&share),
        "{logged} decisions logged of {decisions}: the sample rate is 0.25; log starts:\n{}",
        log.lines().take(5).collect::<Vec<_>>().join("\n")
    );
}

/// Sessions queued for a pooled connection when a reload retires the pool
/// (pool size 1, eight clients) route again under the new configuration:
/// no transaction fails.
#[test]
fn reloads_while_clients_wait_for_connections_fail_no_transaction() {
    let cluster = bench_cluster(1);
    let (port, admin) = (free_port(), free_port());
    let path = cluster.dir.path().join("signalbox.toml");
    let nodes = cluster.nodes_toml();
    let sized = |n: u32| config_text(port, admin, &nodes, &format!("[pool]\nsize = {n}\n"));
    write(&path, &sized(1));
    let mut sb = serve(&path, None);
    let reads = pgbench(port, &["-n", "-S", "-c", "8", "-j", "2", "-T", "8"]);
    let writes = pgbench(port, &["-n", "-c", "8", "-j", "2", "-T", "8"]);
    for i in 0..12u32 {
        std::thread::sleep(Duration::from_millis(500));
        write(&path, &sized(1 + i % 2));
        let answer = post_reload(admin);
        assert!(answer.ends_with("200"), "{answer}");
    }
    for (name, bench) in [("-S", reads), ("tpcb", writes)] {
        let out = bench.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("number of failed transactions: 0"),
            "{name}: transactions failed across reloads of the pool:\n{text}"
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &sb.id().to_string()])
        .status();
    let _ = sb.wait();
}
