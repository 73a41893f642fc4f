//! Read-your-writes for one session: the write positions it must see
//! (its own, its scopes', a token the client presented), recording a
//! committed write's position, and the `signalbox.*` settings through
//! which a client reads and presents its position as a token (answered
//! here, in the simple and the extended protocol).

use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{Session, SessionError};
use crate::config::RywScope;
use crate::proxy::message::{Kind, Message};
use crate::proxy::statements::Uses;
use crate::route::{NodeId, TxState};
use crate::sql::classify::{Classified, OwnSetting, SessionEffect};
use crate::wire;

/// How long recording a write's WAL position may take.
const RECORD_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The primary's WAL position once what ran before it on the connection
/// is done.
pub(super) use crate::cluster::INSERT_LSN_SQL as POSITION_SQL;

/// A WAL position as PostgreSQL prints a `pg_lsn`: `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parse a `pg_lsn` text (`16/B374D848`, case-insensitive).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let valid = |p: &str| !p.is_empty() && p.len() <= 8;
    if !valid(hi) || !valid(lo) {
        return None;
    }
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

impl Session {
    /// The newest write position this session's reads must see (and when
    /// it was written or presented): its own last commit, its scopes'
    /// (user, application, database), a `signalbox.min_lsn` token, and the
    /// current statement's `min_lsn` hint.
    pub(super) fn write_position(&self) -> Option<(u64, Instant)> {
        let scopes = &self.live.config.read_your_writes.scopes;
        let mut best = self.min_lsn;
        let mut consider = |candidate: Option<(u64, Instant)>| {
            if let Some((lsn, at)) = candidate {
                if best.is_none_or(|(b, _)| lsn > b) {
                    best = Some((lsn, at));
                }
            }
        };
        consider(self.statement_lsn);
        if scopes.contains(&RywScope::Session) {
            consider(self.own_write);
        }
        if !self.ryw_keys.is_empty() {
            let shared = self.shared.writes.lock().unwrap_or_else(|p| p.into_inner());
            for key in &self.ryw_keys {
                consider(shared.get(key).copied());
            }
        }
        best
    }

    /// Keys of the shared scopes this session writes under (computed once:
    /// user, application name and database are fixed at startup).
    pub(super) fn scope_keys(&self) -> Vec<String> {
        self.live
            .config
            .read_your_writes
            .scopes
            .iter()
            .filter_map(|s| match s {
                RywScope::Session => None,
                RywScope::User => Some(format!("user:{}", self.user)),
                RywScope::Application => Some(format!("application:{}", self.application_name)),
                RywScope::Database => Some(format!("database:{}", self.database)),
            })
            .collect()
    }

    /// The primary's WAL position after the work that ran before it on the
    /// same connection. `pipelined`: the query was already sent behind the
    /// client's work ([`POSITION_SQL`]), only its answer is read (it is owed
    /// on the connection whatever the work did); otherwise it is asked now,
    /// one more round trip. Bounded: a primary that stops answering costs
    /// this connection (discarded when released), not the session.
    pub(super) async fn write_lsn_after(&mut self, pipelined: bool) -> Option<u64> {
        let conn = self.lease.as_mut()?.conn();
        let (out, alias) = (&mut self.client.out, self.client.pid_alias);
        // A notification that arrives meanwhile still reaches the client.
        let pass = |f: &crate::wire::Frame| crate::proxy::relay::forward(f, alias, out);
        let ask = async {
            if !pipelined {
                let mut q = bytes::BytesMut::new();
                crate::wire::query(&mut q, POSITION_SQL);
                conn.send_frames(&q).await?;
            }
            conn.simple_reply(pass).await.map(|(_, value)| value)
        };
        match tokio::time::timeout(RECORD_WRITE_TIMEOUT, ask).await {
            Ok(Ok(value)) => value.and_then(|v| v.parse().ok()),
            Ok(Err(_)) | Err(_) => {
                // Whatever it still owes must never reach anyone: a held
                // connection that is broken ends its session at the next
                // statement, a pooled one is discarded when released.
                conn.mark_broken();
                None
            }
        }
    }

    /// A transaction that wrote committed on `node`, or may have (its
    /// connection was lost after the work was sent); `lsn` what the
    /// connection said the position was. Without that answer the primary
    /// is asked on the control plane instead (any later position will do,
    /// and one recorded for a write that did not commit costs nothing but
    /// a wait), so reads do not silently miss the write; failing that too,
    /// the loss is logged and counted.
    pub(super) async fn commit_recorded(&mut self, lsn: Option<u64>, node: NodeId) {
        let lsn = match lsn {
            Some(lsn) => Some(lsn),
            None => self.live.cluster.insert_lsn(node).await,
        };
        match lsn {
            Some(lsn) => self.remember_write(lsn),
            None => {
                self.shared.metrics.ryw_unrecorded();
                tracing::warn!(
                    session = self.id,
                    "read-your-writes: the primary did not say the position of a commit; reads may not see it"
                );
            }
        }
    }

    /// A transaction that wrote committed at `lsn`: record it for this
    /// session and under every configured scope.
    pub(super) fn remember_write(&mut self, lsn: u64) {
        let now = Instant::now();
        self.own_write = Some((lsn, now));
        let mut shared = self.shared.writes.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.ryw_keys {
            let e = shared.entry(key.clone()).or_insert((lsn, now));
            if lsn >= e.0 {
                *e = (lsn, now);
            }
        }
    }

    /// A `min_lsn` routing hint on the statement being routed.
    pub(super) fn hinted_lsn(hints: &[(String, String)]) -> Option<u64> {
        hints
            .iter()
            .find(|(k, _)| k == "min_lsn")
            .and_then(|(_, v)| parse_lsn(v))
    }

    /// Answer `SET`/`RESET`/`SHOW signalbox.*` (the reply is queued; the
    /// caller adds ReadyForQuery and flushes); `describe`: the simple
    /// protocol's RowDescription too. Whether it succeeded.
    pub(super) fn own_setting(&mut self, setting: &OwnSetting, describe: bool) -> bool {
        let reply = self.apply_own(setting);
        let out = &mut self.client.out;
        match reply {
            Ok(Own::Shown(name, value)) => {
                if describe {
                    wire::text_row_description(out, &format!("signalbox.{name}"));
                }
                wire::text_data_row(out, &value);
                wire::command_complete(out, "SHOW");
                true
            }
            Ok(Own::Set) => {
                wire::command_complete(out, "SET");
                true
            }
            Err((code, message)) => {
                wire::error_response(out, "ERROR", code, &message);
                false
            }
        }
    }

    /// An extended-protocol batch whose every statement is a
    /// `signalbox.*` one, answered message by message as a server would
    /// (after an error, nothing until Sync). Whether it was answered.
    pub(super) async fn own_batch(
        &mut self,
        batch: &[Message],
        uses: &Uses,
        classes: &[Arc<Classified>],
    ) -> Result<bool, SessionError> {
        let own = |c: &Classified| match c.effects.first() {
            Some(SessionEffect::Own(s)) if c.statements == 1 => Some(s.clone()),
            _ => None,
        };
        let simple_shape = batch.iter().all(|m| {
            matches!(
                m.kind,
                Kind::Parse { .. }
                    | Kind::Bind { .. }
                    | Kind::Describe { .. }
                    | Kind::Execute { .. }
                    | Kind::Sync
                    | Kind::Flush
            )
        });
        if classes.is_empty()
            || !simple_shape
            || self.tx == TxState::Failed
            || classes.iter().any(|c| own(c).is_none())
        {
            return Ok(false);
        }
        self.batch_answered = true;
        let mut bound: Option<OwnSetting> = None;
        let mut failed = false;
        let refusals = std::mem::take(&mut self.refused);
        let mut refused_at = refusals.iter().peekable();
        for (i, (m, used)) in batch.iter().zip(uses).enumerate() {
            // (Refusals of messages skipped after an error go unanswered.)
            while refused_at.next_if(|r| r.0 < i).is_some() {}
            if failed && m.kind != Kind::Sync {
                continue;
            }
            let missing = match &m.kind {
                Kind::Bind { statement, .. } if used.is_none() => Some(statement),
                Kind::Describe { kind: b'S', name } if used.is_none() => Some(name),
                _ => None,
            };
            let refused = refused_at.next_if(|r| r.0 == i).map(|r| &r.1);
            let error = match (missing, refused) {
                (_, Some(r)) => Some((r.code, r.message.clone())),
                (Some(name), _) => Some((
                    "26000",
                    format!("prepared statement \"{name}\" does not exist"),
                )),
                _ => None,
            };
            if let Some((code, message)) = error {
                wire::error_response(&mut self.client.out, "ERROR", code, &message);
                self.failed_messages.push(i);
                failed = true;
                continue;
            }
            match &m.kind {
                Kind::Parse { .. } => wire::parse_complete(&mut self.client.out),
                Kind::Bind { .. } => {
                    bound = used.as_ref().and_then(|p| own(&p.class));
                    wire::bind_complete(&mut self.client.out);
                }
                Kind::Describe { kind, .. } => {
                    let setting = if *kind == b'S' {
                        wire::no_parameters(&mut self.client.out);
                        used.as_ref().and_then(|p| own(&p.class))
                    } else {
                        bound.clone()
                    };
                    match setting {
                        Some(OwnSetting::Show { name }) => wire::text_row_description(
                            &mut self.client.out,
                            &format!("signalbox.{name}"),
                        ),
                        _ => wire::no_data(&mut self.client.out),
                    }
                }
                Kind::Execute { .. } => {
                    if let Some(setting) = bound.clone() {
                        failed = !self.own_setting(&setting, false);
                        if failed {
                            self.failed_messages.push(i);
                        }
                    }
                }
                Kind::Sync => {
                    failed = false;
                    let status = self.tx_status();
                    wire::ready_for_query(&mut self.client.out, status);
                }
                _ => {}
            }
        }
        self.refused = refusals;
        // An error with no Sync after it: what follows up to the client's
        // Sync is skipped, as a server would.
        self.skipping = failed;
        self.client.flush().await.map_err(SessionError::Client)?;
        Ok(true)
    }

    fn apply_own(&mut self, setting: &OwnSetting) -> Result<Own, (&'static str, String)> {
        match setting {
            OwnSetting::Show { name } if name == "trace" => Ok(Own::Shown(
                name.clone(),
                if self.trace { "on" } else { "off" }.into(),
            )),
            OwnSetting::Set { name, value } if name == "trace" => {
                self.trace = match value.as_deref() {
                    None => false,
                    Some("on" | "true" | "yes" | "1") => true,
                    Some("off" | "false" | "no" | "0") => false,
                    Some(v) => {
                        return Err((
                            "22023",
                            format!("parameter \"signalbox.trace\" requires a Boolean value, not \"{v}\""),
                        ))
                    }
                };
                Ok(Own::Set)
            }
            OwnSetting::Show { name } if name == "write_lsn" || name == "min_lsn" => {
                let lsn = match name.as_str() {
                    "write_lsn" => self.write_position().map(|(l, _)| l),
                    _ => self.min_lsn.map(|(l, _)| l),
                };
                Ok(Own::Shown(name.clone(), format_lsn(lsn.unwrap_or(0))))
            }
            OwnSetting::Set { name, value } if name == "min_lsn" => {
                self.min_lsn = match value.as_deref() {
                    None => None,
                    Some(v) => match parse_lsn(v) {
                        Some(0) => None,
                        Some(lsn) => Some((lsn, Instant::now())),
                        None => {
                            return Err((
                                "22023",
                                format!(
                                    "invalid value for parameter \"signalbox.min_lsn\": \"{v}\" (expected a WAL position such as 16/B374D848, from SHOW signalbox.write_lsn)"
                                ),
                            ))
                        }
                    },
                };
                self.refresh_route_session();
                Ok(Own::Set)
            }
            OwnSetting::Set { name, .. } | OwnSetting::Show { name } => Err((
                "42704",
                format!(
                    "unrecognized configuration parameter \"signalbox.{name}\" (signalbox knows signalbox.write_lsn, signalbox.min_lsn and signalbox.trace)"
                ),
            )),
        }
    }
}

/// What a `signalbox.*` statement answers.
enum Own {
    Shown(String, String),
    Set,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0, 1, 0x16_B374_D848, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/b374d848"), Some(0x16_B374_D848));
        for bad in ["", "16", "/1", "1/", "x/1", "1/123456789", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }
}
