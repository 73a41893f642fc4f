//! A policy that misbehaves in the way its cargo feature says (see Cargo.toml).
//! Without features it answers `default` with reason `faulty-ok`.

use signalbox_policy::prelude::*;

pub struct Faulty {
    hoard: Vec<Vec<u8>>,
}

impl Policy for Faulty {
    fn new(_config: &Config) -> Result<Self, String> {
        if cfg!(feature = "init-fail") {
            return Err("this policy refuses to start".into());
        }
        Ok(Self { hoard: Vec::new() })
    }

    fn route(&mut self, stmt: &Statement, session: &Session, backends: &Backends) -> Decision {
        if cfg!(feature = "echo") && stmt.hint("echo-lsn").is_some() {
            // The session's write position as received, and which nodes
            // have replayed it (1) or not (0), in node order.
            let replayed: String = backends
                .iter()
                .map(|b| if b.replayed_last_write { '1' } else { '0' })
                .collect();
            return Decision::primary().because(format!(
                "lsn={:x} ago={} replayed={replayed}",
                session.write_lsn.unwrap_or(0),
                session.ms_since_last_write.is_some()
            ));
        }
        if cfg!(feature = "echo") {
            // The facts as the policy receives them, for the service tests.
            // (Reasons are at most 64 bytes: the primary's facts only.)
            let p = backends
                .primary()
                .map(|b| format!("lat={},idle={},fl={}", b.latency_us, b.idle, b.in_flight))
                .unwrap_or_default();
            let tx = if session.in_transaction() { "T" } else { "I" };
            return Decision::primary().because(format!("fp={:016x} {tx} {p}", stmt.fingerprint));
        }
        if cfg!(feature = "trap") {
            panic!("policy bug on every call");
        }
        if cfg!(feature = "spin") {
            let mut x = 0u64;
            while std::hint::black_box(x) != u64::MAX {
                x = x.wrapping_add(std::hint::black_box(2));
            }
        }
        if cfg!(feature = "hog") {
            loop {
                // Reserve without touching: only the memory cap can stop this.
                self.hoard.push(Vec::with_capacity(1 << 20));
            }
        }
        if cfg!(feature = "bad-id") {
            return Decision::replica(99).because("no such node");
        }
        if cfg!(feature = "trap-on-hint") && stmt.hint("boom").is_some() {
            panic!("policy bug on hinted statements");
        }
        if let Some(why) = stmt.hint("deny") {
            return Decision::reject(format!("denied by policy: {why}"));
        }
        if cfg!(feature = "all-primary") {
            return Decision::primary().because("all-primary");
        }
        if cfg!(feature = "garbage") {
            return Decision::reject("");
        }
        if cfg!(feature = "log-flood") {
            for i in 0..1000 {
                host::log(Level::Info, &format!("line {i}"));
            }
        }
        if cfg!(feature = "kv") {
            let n: u64 = kv::get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
            kv::set("n", &(n + 1).to_string(), None);
            let prefix = if cfg!(feature = "v2") { "v2 " } else { "" };
            return Decision::builtin().because(format!("{prefix}n={n}"));
        }
        Decision::builtin().because("faulty-ok")
    }
}

signalbox_policy::export!(Faulty);
