//! Decision tracing for one session: with `SET signalbox.trace = on`, each
//! routed statement is preceded by a NOTICE saying where it ran and why —
//! the node, the policy version and its reason, any guardrail override, and
//! the classifier's verdict with the catalog's causes. A configured share
//! of all decisions (`[logging] decision_sample`) is also logged as one
//! structured `debug` event each, target `signalbox::decision`.

use super::Session;
use crate::route::{NodeId, TxState};
use crate::router::Routing;
use crate::sql::classify::Classified;
use crate::wire;

impl Session {
    /// Queue the trace NOTICE for a statement routed to `node` (sent with
    /// the statement's own replies, before them).
    pub(super) fn trace_decision(
        &mut self,
        node: NodeId,
        routing: &Routing,
        class: &Classified,
        read_only: bool,
    ) {
        let view = self.live.cluster.view();
        let role = view
            .state(node)
            .map(|s| format!("{:?}", s.role).to_lowercase())
            .unwrap_or_default();
        let policy = match self.shared.router.policy().active() {
            Some(p) => format!(
                "{}@{}",
                p.info.name,
                p.info.sha256.get(..12).unwrap_or(&p.info.sha256)
            ),
            None => "built-in routing".into(),
        };
        let mut text = format!(
            "signalbox: ran on {} ({role}); policy {policy} chose {:?}",
            view.node_name(node),
            routing.target
        );
        if let Some(reason) = &routing.reason {
            text.push_str(&format!(" because \"{reason}\""));
        }
        if let Some(failure) = &routing.failure {
            text.push_str(&format!(" (policy failed: {failure})"));
        }
        if let Some(o) = routing.enforced.overridden {
            text.push_str(&format!("; guardrail override: {}", o.as_str()));
        }
        text.push_str(&format!("; classifier: {}", self.verdict(class, read_only)));
        wire::notice(&mut self.client.out, &text);
    }

    /// Queue the trace NOTICE for a statement that runs on the connection
    /// the session already holds: no routing decision is made for it.
    pub(super) fn trace_held(&mut self, node: NodeId, class: &Classified, read_only: bool) {
        let view = self.live.cluster.view();
        let role = view
            .state(node)
            .map(|s| format!("{:?}", s.role).to_lowercase())
            .unwrap_or_default();
        let why = match (self.pin_reason, self.session_pooling, self.tx) {
            (Some(reason), _, _) => format!("session pinned to its connection ({reason})"),
            (None, true, _) => "session pooling: the session's own connection".to_owned(),
            (None, false, TxState::Idle) => "the connection the statement began on".to_owned(),
            (None, false, _) => "inside a transaction: its connection".to_owned(),
        };
        let text = format!(
            "signalbox: ran on {} ({role}); {why}, no routing decision; classifier: {}",
            view.node_name(node),
            self.verdict(class, read_only)
        );
        wire::notice(&mut self.client.out, &text);
    }

    /// Log a sampled decision as one structured event (the session span
    /// adds who asked).
    pub(super) fn log_decision(
        &self,
        node: NodeId,
        routing: &Routing,
        class: &Classified,
        read_only: bool,
    ) {
        if !tracing::enabled!(target: "signalbox::decision", tracing::Level::DEBUG) {
            return;
        }
        let view = self.live.cluster.view();
        let policy = self.shared.router.policy().active();
        tracing::debug!(
            target: "signalbox::decision",
            node = view.node_name(node),
            role = ?view.state(node).map(|s| s.role),
            policy = policy.as_ref().map(|p| p.info.name.as_str()),
            policy_sha256 = policy.as_ref().map(|p| p.info.sha256.get(..12).unwrap_or_default()),
            target = ?routing.target,
            reason = routing.reason.as_deref(),
            failure = routing.failure.as_ref().map(|f| f.kind()),
            guardrail = routing.enforced.overridden.map(|o| o.as_str()),
            kind = ?class.kind,
            fingerprint = format_args!("{:016x}", class.fingerprint),
            verdict = %self.verdict(class, read_only),
            "routing decision"
        );
    }

    /// The classifier's verdict in words, with the catalog's causes.
    fn verdict(&self, class: &Classified, read_only: bool) -> String {
        let mut v = if read_only {
            "read-only".to_owned()
        } else if class.parse_error {
            "does not parse (primary)".to_owned()
        } else {
            format!("not read-only, {:?} (primary)", class.kind).to_lowercase()
        };
        let mut explained = false;
        if class.facts.catalog_candidate {
            if let Some(cat) = self.shared.catalogs.get(&self.database) {
                let judged = cat.judge(&class.facts);
                if !judged.reasons.is_empty() {
                    v.push_str(&format!(" [{}]", judged.reasons.join("; ")));
                    explained = true;
                }
            }
        }
        if !explained && !read_only && !class.functions.is_empty() {
            v.push_str(&format!(" calls {}", class.functions.join(", ")));
        }
        v
    }
}
