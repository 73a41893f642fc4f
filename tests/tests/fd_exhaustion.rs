//! Running out of file descriptors must not end signalbox's accept loop: once
//! the pressure is gone, new clients are served again. Its own test binary,
//! because it lowers the limit of the whole process.

use std::process::Command;
use std::time::Duration;

use signalbox_tests::raw::Raw;
use signalbox_tests::service::start;

fn set_nofile(limit: u64) {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}:"),
        ])
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The soft limit now in force.
fn soft_nofile() -> u64 {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--nofile",
            "--output=SOFT",
            "--noheadings",
        ])
        .output()
        .expect("run prlimit (util-linux)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(1024)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_survives_descriptor_exhaustion() {
    let server = start("[clients]\nmax_connections = 100000\n").await;
    let port = server.addr.port();
    // Warm one session so later ones need no new node connection.
    let mut warm = Raw::connect(port, "postgres", "postgres").await;
    warm.simple("SELECT 1").await;
    let original = soft_nofile();
    set_nofile(open_fds() + 40);
    let mut clients = Vec::new();
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => clients.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors = server
        .shared
        .metrics
        .accept_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(clients);
    set_nofile(original);
    assert!(errors > 0, "the test never exhausted descriptors");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..5 {
        let mut c = tokio::time::timeout(
            Duration::from_secs(10),
            Raw::connect(port, "postgres", "postgres"),
        )
        .await
        .unwrap_or_else(|_| panic!("client {i} not served after the pressure went away"));
        let msgs = c.simple("SELECT 'back', 1").await;
        assert_eq!(msgs.last().unwrap().0, b'Z', "{msgs:?}");
    }
}
