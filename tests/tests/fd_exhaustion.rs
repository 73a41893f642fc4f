//! Running out of file descriptors must not end signalbox's accept loop: once
//! the pressure is gone, new clients are served again. Its own test binary,
//! because it lowers the limit of the whole process.

use std::process::Command;
use std::time::Duration;

use signalbox_tests::raw::Raw;
use signalbox_tests::service::start;

/// Sets this process's soft descriptor limit. A direct call, not `prlimit`:
/// restoring must work while descriptors are exhausted.
fn set_nofile(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value this function owns.
    let rc = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = soft.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim)
    };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// The soft limit now in force.
fn soft_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    lim.rlim_cur
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Opens `n` connections to `port` from a separate process, so that only the
/// server's accepts (not the clients' sockets) count against this process's
/// lowered limit; the connections stay open until the child is killed.
fn spawn_clients(port: u16, n: u32) -> std::process::Child {
    let script = format!(
        "sleep 0.3; for i in $(seq {n}); do exec {{fd}}<>/dev/tcp/127.0.0.1/{port} || break; done; sleep 30"
    );
    Command::new("bash")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run bash")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_survives_descriptor_exhaustion() {
    let server = start("[clients]\nmax_connections = 100000\n").await;
    let port = server.addr.port();
    // Warm one session so later ones need no new node connection.
    let mut warm = Raw::connect(port, "postgres", "postgres").await;
    warm.simple("SELECT 1").await;
    let original = soft_nofile();
    // The child is started before the limit drops: spawning needs descriptors.
    let mut clients = spawn_clients(port, 200);
    set_nofile(open_fds() + 20);
    let errors = || {
        server
            .shared
            .metrics
            .accept_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for _ in 0..100 {
        if errors() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = errors();
    let _ = clients.kill();
    let _ = clients.wait();
    set_nofile(original);
    assert!(seen > 0, "the test never exhausted descriptors");
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
