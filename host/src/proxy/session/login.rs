//! Logging a client in: authentication (trust or SCRAM-SHA-256), the server
//! parameters a real login reported, and the greeting with our cancel key.

use super::{Session, SessionError};
use crate::cluster::pool::Lease;
use crate::route::NodeId;
use crate::wire::{self, WireError};

impl Session {
    /// Authenticate, report server parameters, issue our cancel key.
    pub(super) async fn startup(&mut self) -> Result<(), SessionError> {
        if self.live.config.auth.method == crate::config::AuthMethod::ScramSha256 {
            let password = self.live.config.password_for(&self.user).map(str::to_owned);
            let end_point = match &self.shared.tls {
                Some(t) if self.tls => t.end_point.clone(),
                _ => None,
            };
            // Before authentication a message may be as large as a
            // password or SASL message can be, as in PostgreSQL: no stranger
            // can make signalbox hold (or reserve) megabytes.
            let max = self.client.limits.max_message;
            self.client.limits.max_message = max.min(crate::proxy::auth::MAX_AUTH_MESSAGE);
            let verdict = match crate::proxy::auth::scram(
                &mut self.client,
                &self.user,
                password.as_deref(),
                end_point.as_deref(),
            )
            .await
            {
                Ok(v) => v,
                Err(e @ WireError::Protocol(_)) => {
                    self.fatal("08P01", &e.to_string()).await;
                    return Err(SessionError::Client(e));
                }
                Err(e) => return Err(SessionError::Client(e)),
            };
            self.client.limits.max_message = max;
            if let crate::proxy::auth::Verdict::Refused(code, msg) = verdict {
                self.fatal(code, &msg).await;
                return Err(SessionError::Client(WireError::Closed));
            }
        }
        let asked = crate::proxy::state::startup_value(&self.startup_params, "client_encoding");
        if let Some(asked) = asked {
            match crate::proxy::encoding::ClientEncoding::lookup(&asked) {
                Some(e) => {
                    self.encoding = e;
                    self.startup_encoding = e;
                }
                None => {
                    let msg =
                        format!("invalid value for parameter \"client_encoding\": \"{asked}\"");
                    self.fatal("22023", &msg).await;
                    return Err(SessionError::Client(WireError::Closed));
                }
            }
        }
        if self.session_pooling {
            return self.session_login().await;
        }
        let cache_key = (self.user.clone(), self.database.clone());
        let cached = self
            .shared
            .server_params
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
            .cloned();
        let params = match cached {
            Some(p) => p,
            None => {
                let p = self.first_login().await?;
                self.shared
                    .server_params
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cache_key, p.clone());
                p
            }
        };
        self.greet(&params).await
    }

    /// The first session of a (user, database) logs in to a node for real:
    /// PostgreSQL checks the user and database and reports its parameters.
    pub(super) async fn first_login(&mut self) -> Result<Vec<(String, String)>, SessionError> {
        let mut lease = self.login_checkout(false).await?;
        Ok(lease.conn().params().to_vec())
    }

    /// A server connection for logging in: on the primary, or (`any`) on
    /// any healthy node when there is no primary. The configuration may
    /// have been reloaded while the client authenticated (a client can
    /// take seconds to answer): a retired cluster's closed pool is no
    /// reason to refuse the login, the current cluster is asked instead.
    async fn login_checkout(&mut self, primary_only: bool) -> Result<Lease, SessionError> {
        let mut failure = None;
        for _ in 0..3 {
            self.refresh_live();
            let view = self.live.cluster.view();
            let node = view.primary().or_else(|| {
                (!primary_only)
                    .then(|| view.states.iter().position(|s| s.healthy))
                    .flatten()
                    .map(|i| i as NodeId)
            });
            let Some(node) = node else {
                let what = if primary_only {
                    "no primary"
                } else {
                    "no healthy node"
                };
                let msg = match self.live.cluster.fence_reason() {
                    Some(f) => format!("signalbox: {what} to serve this session ({f})"),
                    None => format!("signalbox: {what} to serve this session"),
                };
                failure = Some(("57P03".to_owned(), msg));
                break;
            };
            match self.checkout(node).await {
                Ok(lease) => return Ok(lease),
                Err(e) => failure = Some(e),
            }
            if self.live_is_current() {
                break;
            }
        }
        let (code, msg) = failure.unwrap_or_else(|| {
            (
                "08006".to_owned(),
                "signalbox: the configuration kept changing during login".to_owned(),
            )
        });
        self.fatal(&code, &msg).await;
        Err(SessionError::Backend(WireError::Closed))
    }

    /// Session mode: the client gets its own server connection (on the
    /// primary) now, and is told that backend's real process id and cancel
    /// key, so `pg_backend_pid()`, `pg_terminate_backend()` and cancel
    /// requests mean exactly what they mean on PostgreSQL.
    async fn session_login(&mut self) -> Result<(), SessionError> {
        self.lease = Some(self.login_checkout(true).await?);
        let failed = match self.sync_state().await {
            Ok(None) => None,
            Ok(Some((code, msg))) => Some((code, format!("signalbox: {msg}"))),
            Err(e) => Some((
                "08006".to_owned(),
                format!("signalbox: lost the server connection while applying the session's settings: {e}"),
            )),
        };
        if let Some((code, msg)) = failed {
            self.release(true);
            self.fatal(&code, &msg).await;
            return Err(SessionError::Backend(WireError::Closed));
        }
        let Some(lease) = self.lease.as_mut() else {
            return Err(SessionError::Backend(WireError::Closed));
        };
        let (addr, key) = (lease.addr(), lease.key());
        let params = lease.conn().params().to_vec();
        self.shared.cancel.forget(self.key);
        self.key = key;
        self.shared.cancel.register(key, self.cancel.clone());
        self.cancel.set(addr, key);
        self.greet(&params).await
    }

    pub(super) async fn greet(&mut self, params: &[(String, String)]) -> Result<(), SessionError> {
        let out = &mut self.client.out;
        wire::auth_ok(out);
        for (name, value) in params {
            // What the client asked for at startup is what PostgreSQL would report.
            let asked = self
                .startup_params
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            // (client_encoding as PostgreSQL names it: `UTF8` for `utf8`.)
            if name == "client_encoding" {
                wire::parameter_status(out, name, self.encoding.name);
                continue;
            }
            wire::parameter_status(out, name, asked.unwrap_or(value));
        }
        wire::backend_key_data(out, self.key.0, self.key.1);
        wire::ready_for_query(out, b'I');
        self.client.flush().await.map_err(SessionError::Client)
    }
}
