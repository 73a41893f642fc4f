//! `signalbox serve` and `signalbox demo`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::local::LocalCluster;
use crate::policy::build::{build_policy, BuildOptions};
use crate::server::Server;

fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = workers
        .filter(|n| *n > 0)
        .unwrap_or_else(|| default_workers(cores));
    tracing::info!(workers = n, cores, "worker threads");
    // One worker: the thread that starts the server runs every session
    // itself, with no work-stealing queue and no hand-off to another thread
    // (tpcb-like: 1.05x the TPS at 0.94x the CPU, `bench/RESULTS.md`).
    let mut builder = if n == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n);
        b
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Worker threads when the config does not say: half the cores, at least
/// one. Most of a statement's cost in the proxy is the kernel's network
/// stack, and every extra worker that parks is one more to wake when
/// another's sockets become ready. On a 2-core host one worker spent 0.78×
/// the CPU per `-S` transaction of two, at 1.2× their throughput (medians
/// of 15 rounds, `bench/RESULTS.md`).
fn default_workers(cores: usize) -> usize {
    (cores / 2).max(1)
}

pub fn serve(path: &Path) -> Result<ExitCode> {
    let config = Config::load(path)?;
    runtime(config.workers)?.block_on(async {
        let mut server = Server::start(config).await?;
        server.reload_on_sighup()?;
        println!("signalbox listening on {}", server.addr);
        server.run_until_signalled().await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Where the example policies are, when running from the source tree.
fn example_policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/rw-split")
}

pub fn demo(port: u16, admin_port: u16, workers: Option<usize>) -> Result<ExitCode> {
    println!("starting a local primary and two streaming replicas ...");
    let cluster = LocalCluster::start(2)?;
    let dir = cluster.dir.path().to_path_buf();
    cluster.psql(
        cluster.primary.port,
        "CREATE TABLE IF NOT EXISTS greetings (id serial PRIMARY KEY, msg text NOT NULL); \
         INSERT INTO greetings (msg) VALUES ('hello from the primary')",
    )?;
    let policy = if example_policy_dir().is_dir() {
        println!("building the rw-split policy ...");
        // A directory of its own: the watcher then never sees the nodes' logs.
        let out = dir.join("policy").join("rw-split.wasm");
        std::fs::create_dir_all(dir.join("policy"))?;
        let opts = BuildOptions {
            out: Some(out.clone()),
            quiet: true,
            ..Default::default()
        };
        build_policy(&example_policy_dir(), &opts)?;
        format!("[policy]\npath = {:?}\n", out.display().to_string())
    } else {
        println!("(policies/ not found next to this binary: using built-in routing)");
        String::new()
    };
    let mut text =
        format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n{}\n{policy}\n",
        workers.map(|w| format!("workers = {w}")).unwrap_or_default()
    );
    text.push_str(&cluster.nodes_toml());
    let config_path = dir.join("signalbox.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::load(&config_path)?;
    runtime(config.workers)?.block_on(async {
        let mut server = Server::start(config).await?;
        server.reload_on_sighup()?;
        println!();
        println!(
            "signalbox is routing on 127.0.0.1:{port}  (config: {})",
            config_path.display()
        );
        println!("  connect:  psql \"postgres://postgres@127.0.0.1:{port}/postgres\"");
        println!("  try:      SELECT inet_server_port(), pg_is_in_recovery(), * FROM greetings;");
        println!(
            "            INSERT INTO greetings (msg) VALUES ('hi') RETURNING inet_server_port();"
        );
        println!(
            "  nodes:    {}",
            cluster
                .all_nodes()
                .map(|n| format!("{}={}", n.name, n.port))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  status:   http://127.0.0.1:{admin_port}/  (live status page)");
        println!(
            "  admin:    curl 127.0.0.1:{admin_port}/status   curl 127.0.0.1:{admin_port}/metrics"
        );
        println!(
            "  reload:   edit {} and `kill -HUP {}`",
            config_path.display(),
            std::process::id()
        );
        println!("Ctrl-C stops everything and removes the cluster.");
        server.run_until_signalled().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    drop(cluster);
    println!("stopped; the throwaway cluster is gone");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::default_workers;

    #[test]
    fn default_workers_is_half_the_cores_and_at_least_one() {
        let got: Vec<usize> = [1, 2, 3, 4, 8, 16].map(default_workers).to_vec();
        assert_eq!(got, [1, 1, 1, 2, 4, 8]);
    }
}
