//! A throwaway local PostgreSQL cluster, for `signalbox demo` and the tests:
//! a primary and N streaming replicas made with `initdb` and
//! `pg_basebackup -R`, on free loopback ports in a temp dir, run as the
//! `postgres` OS user when started as root.
//!
//! Teardown: `Drop` stops every server; in addition a reaper process stops
//! them when this process exits (e.g. a test's statics are never dropped),
//! so no server outlives its owner.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The PostgreSQL server binaries (`initdb`, `pg_ctl`, ...).
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("SIGNALBOX_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|p| p.join("initdb").is_file());
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().context(
        "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin; install them \
         (Debian/Ubuntu: apt-get install postgresql) or set SIGNALBOX_PG_BIN to their directory",
    )
}

/// uid/gid to run the servers as: `postgres` when we are root, else ourselves.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam gets a valid NUL-terminated string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to a passwd record.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A free port on 127.0.0.1 (racy by nature, fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

pub struct Node {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
}

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub primary: Node,
    pub replicas: Vec<Node>,
    reaper: Option<std::process::Child>,
}

impl LocalCluster {
    /// Start a primary and `replicas` streaming replicas; waits until they stream.
    pub fn start(replicas: usize) -> Result<LocalCluster> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("signalbox-pg-").tempdir()?;
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            chown(dir.path(), uid, gid)?;
        }
        let primary = Node {
            name: "primary".into(),
            port: free_port(),
            data: dir.path().join("primary"),
        };
        let mut cluster = LocalCluster {
            bin,
            primary,
            replicas: Vec::new(),
            reaper: None,
            dir,
        };
        cluster.init_primary()?;
        cluster.start_reaper();
        for i in 1..=replicas {
            cluster.add_replica(&format!("replica-{i}"))?;
        }
        cluster.wait_streaming(replicas)?;
        Ok(cluster)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = run_as() {
            c.uid(uid).gid(gid);
        }
        c.env("PGHOST", "127.0.0.1").env_remove("PGPORT");
        c.current_dir(self.dir.path());
        c
    }

    fn run(&self, mut c: Command, what: &str) -> Result<Output> {
        let out = c.output().with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    fn init_primary(&self) -> Result<()> {
        let mut c = self.cmd("initdb");
        c.arg("-D").arg(&self.primary.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        self.run(c, "initdb")?;
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\nfsync = off\n\
             full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n\
             wal_keep_size = 256MB\nlog_min_messages = warning\nmax_prepared_transactions = 10\n",
            self.primary.port,
            self.dir.path().display()
        );
        append(&self.primary.data.join("postgresql.conf"), &conf)?;
        append(
            &self.primary.data.join("pg_hba.conf"),
            "\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        )?;
        self.pg_ctl_start(&self.primary)
    }

    fn pg_ctl_start(&self, node: &Node) -> Result<()> {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&node.data)
            .arg("-l")
            .arg(self.dir.path().join(format!("{}.log", node.name)))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null());
        self.run(c, &format!("pg_ctl start {}", node.name))
            .map(|_| ())
    }

    fn add_replica(&mut self, name: &str) -> Result<()> {
        let node = Node {
            name: name.into(),
            port: free_port(),
            data: self.dir.path().join(name),
        };
        let mut c = self.cmd("pg_basebackup");
        c.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--no-sync",
        ])
        .arg("-p")
        .arg(self.primary.port.to_string())
        .arg("-D")
        .arg(&node.data);
        self.run(c, "pg_basebackup")?;
        append(
            &node.data.join("postgresql.conf"),
            &format!("\nport = {}\n", node.port),
        )?;
        self.pg_ctl_start(&node)?;
        self.replicas.push(node);
        Ok(())
    }

    fn wait_streaming(&self, n: usize) -> Result<()> {
        for _ in 0..300 {
            let count = self.psql(
                self.primary.port,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )?;
            if count.trim() == n.to_string() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("replicas did not start streaming within 30 s")
    }

    /// Stop all servers when this process exits, whatever happens.
    fn start_reaper(&mut self) {
        let pid = std::process::id();
        let pg_ctl = self.bin.join("pg_ctl");
        let dir = self.dir.path().display().to_string();
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             for d in {dir}/primary {dir}/replica-*; do [ -f $d/postmaster.pid ] && {} -D $d -m immediate stop >/dev/null 2>&1; done; \
             rm -rf {dir}",
            pg_ctl.display()
        );
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = run_as() {
            c.uid(uid).gid(gid);
        }
        self.reaper = c.spawn().ok();
    }

    /// Run SQL with psql against a port; returns unaligned, tuples-only output.
    pub fn psql(&self, port: u16, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql -p {port} -c {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `[[nodes]]` entries describing this cluster for a signalbox config.
    pub fn nodes_toml(&self) -> String {
        let mut text = String::new();
        for n in self.all_nodes() {
            let role = if n.name == "primary" {
                "primary"
            } else {
                "replica"
            };
            text.push_str(&format!(
                "\n[[nodes]]\nname = \"{}\"\nurl = \"postgres://postgres@127.0.0.1:{}/postgres\"\nrole = \"{role}\"\n",
                n.name, n.port
            ));
        }
        text
    }

    pub fn all_nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.primary).chain(self.replicas.iter())
    }

    /// Stop a node abruptly (simulated crash).
    pub fn kill(&self, node: &Node) -> Result<()> {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&node.data)
            .args(["-m", "immediate", "stop"]);
        self.run(c, "pg_ctl stop").map(|_| ())
    }

    pub fn restart(&self, node: &Node) -> Result<()> {
        self.pg_ctl_start(node)
    }

    /// Pause WAL replay on the replica listening on `port`.
    pub fn pause_replay(&self, port: u16) -> Result<()> {
        self.set_replay(port, true)
    }

    /// Resume WAL replay on the replica listening on `port`.
    pub fn resume_replay(&self, port: u16) -> Result<()> {
        self.set_replay(port, false)
    }

    /// A standby cancels a query whose snapshot conflicts with the WAL it
    /// replays once `max_standby_streaming_delay` has run out, counted from
    /// when that WAL arrived: after a long pause, at once. The statement that
    /// resumed replay can itself be cancelled after it took effect, so the
    /// call is repeated, and the state read back, until it holds.
    fn set_replay(&self, port: u16, pause: bool) -> Result<()> {
        let call = if pause {
            "SELECT pg_wal_replay_pause()"
        } else {
            "SELECT pg_wal_replay_resume()"
        };
        self.set_replay_by(port, call, pause)
    }

    fn set_replay_by(&self, port: u16, call: &str, pause: bool) -> Result<()> {
        let mut last = None;
        for _ in 0..20 {
            match self.psql(port, call) {
                Ok(_) => return Ok(()),
                Err(e) if is_recovery_conflict(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
            // (True once a pause is requested; there since PostgreSQL 10.)
            if let Ok(state) = self.psql(port, "SELECT pg_is_wal_replay_paused()") {
                if (state.trim() == "t") == pause {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("replay state did not change")))
    }

    /// Wait until every replica has replayed the primary's current WAL position.
    pub fn wait_replayed(&self) -> Result<()> {
        let lsn = self.psql(self.primary.port, "SELECT pg_current_wal_lsn()")?;
        for r in &self.replicas {
            let q = format!(
                "SELECT pg_last_wal_replay_lsn() >= '{}'::pg_lsn",
                lsn.trim()
            );
            let mut ok = false;
            for _ in 0..200 {
                match self.psql(r.port, &q) {
                    Ok(out) if out.trim() == "t" => {
                        ok = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if is_recovery_conflict(&e) => {}
                    Err(e) => return Err(e),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !ok {
                bail!("{} did not replay {} within 10 s", r.name, lsn.trim());
            }
        }
        Ok(())
    }
}

/// psql's report of a query cancelled by a standby's WAL replay.
fn is_recovery_conflict(e: &anyhow::Error) -> bool {
    e.to_string().contains("conflict with recovery")
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in self.replicas.iter().chain(std::iter::once(&self.primary)) {
            let mut c = self.cmd("pg_ctl");
            c.arg("-D")
                .arg(&node.data)
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = c.status();
        }
        if let Some(mut r) = self.reaper.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        bail!(
            "chown {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statement that resumes replay holds a snapshot that the cleanup
    /// replayed next conflicts with; with no grace left the standby cancels
    /// it. Replay is resumed all the same, and the helper must say so. The
    /// sleep makes the cancellation certain instead of a race.
    #[test]
    fn a_resume_cancelled_by_what_it_replays_still_resumes() -> Result<()> {
        let c = LocalCluster::start(1)?;
        let replica = c.replicas[0].port;
        append(
            &c.replicas[0].data.join("postgresql.conf"),
            "\nmax_standby_streaming_delay = 0\n",
        )?;
        c.psql(replica, "SELECT pg_reload_conf()")?;
        c.psql(c.primary.port, "CREATE TABLE churn (v int)")?;
        c.psql(c.primary.port, "INSERT INTO churn VALUES (1)")?;
        c.wait_replayed()?;
        c.pause_replay(replica)?;
        c.psql(c.primary.port, "DELETE FROM churn")?;
        c.psql(c.primary.port, "VACUUM churn")?;
        std::thread::sleep(Duration::from_millis(200));
        c.set_replay_by(replica, "SELECT pg_wal_replay_resume(), pg_sleep(5)", false)?;
        c.wait_replayed()
    }
}
