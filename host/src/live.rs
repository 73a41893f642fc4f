//! The configuration in force and the cluster built from it, and the config
//! reload that swaps both whole (SIGHUP, `POST /config/reload`).
//!
//! A session takes a snapshot ([`Live`]) whenever it begins work holding no
//! server connection, so one transaction always runs under one
//! configuration. A reload builds and probes the new cluster before anyone
//! sees it; the old one is retired: its pools take no more checkouts and
//! close connections as sessions give them back. Sessions that keep a
//! connection across transactions (session pooling, a pinned session) go
//! on under the configuration they started with until they let it go.
//!
//! What cannot change without a restart (listen addresses, admin token,
//! worker threads, client TLS, the message buffer budget) makes the whole
//! reload fail with an error naming the key; so does anything invalid. A
//! rejected reload changes nothing.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::config::{Config, NodeConfig};
use crate::lock;
use crate::policy::{reload::Watcher, PolicyManager, PolicySettings};
use crate::proxy::Shared;

/// One configuration and the cluster built from it.
pub struct Live {
    pub config: Arc<Config>,
    pub cluster: Arc<Cluster>,
    /// Counts reloads that changed something (1 at startup).
    pub generation: u64,
}

/// What one config reload attempt did.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigEvent {
    pub at_ms: u64,
    pub trigger: String,
    /// `applied`, `unchanged` or `rejected`.
    pub result: &'static str,
    pub changes: Vec<String>,
    pub error: Option<String>,
}

/// The config file, the journal of reloads, and what a reload replaces.
/// Its collector reports the nodes of the cluster in force.
pub struct Reloader {
    shared: Arc<Shared>,
    path: PathBuf,
    health: Mutex<Option<JoinHandle<()>>>,
    watchers: Mutex<Watchers>,
    journal: Mutex<VecDeque<ConfigEvent>>,
    /// Reloads applied and rejected since start.
    counts: [std::sync::atomic::AtomicU64; 2],
    serial: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// The policy file watchers, replaced with their managers.
#[derive(Default)]
pub struct Watchers {
    pub active: Option<Watcher>,
    pub shadow: Option<Watcher>,
}

/// The reload journal's length.
const HISTORY: usize = 32;

/// `/status`: the config file and its reloads, newest last.
#[derive(Serialize)]
pub struct ConfigStatus {
    pub path: PathBuf,
    pub generation: u64,
    pub history: Vec<ConfigEvent>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>, health: JoinHandle<()>, watchers: Watchers) -> Self {
        let path = shared.live().config.origin.clone();
        Self {
            shared,
            path,
            health: Mutex::new(Some(health)),
            watchers: Mutex::new(watchers),
            journal: Mutex::default(),
            counts: Default::default(),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// The server is going away: stop probing and watching.
    pub fn stop(&self) {
        if let Some(h) = lock(&self.health).take() {
            h.abort();
        }
        *lock(&self.watchers) = Watchers::default();
    }

    pub fn status(&self) -> ConfigStatus {
        ConfigStatus {
            path: self.path.clone(),
            generation: self.shared.live().generation,
            history: lock(&self.journal).iter().cloned().collect(),
        }
    }

    /// Read the config file again and apply it whole, or reject it whole.
    pub async fn reload(&self, trigger: &str) -> ConfigEvent {
        let _serial = self.serial.lock().await;
        let (result, changes, error) = match self.try_reload(trigger).await {
            Ok(changes) if changes.is_empty() => ("unchanged", changes, None),
            Ok(changes) => ("applied", changes, None),
            Err(e) => ("rejected", Vec::new(), Some(e)),
        };
        match &error {
            Some(e) => {
                tracing::error!(trigger, path = %self.path.display(), error = %e, "config reload rejected; the running configuration stays")
            }
            None => {
                tracing::info!(trigger, path = %self.path.display(), ?changes, "config reloaded")
            }
        }
        let event = ConfigEvent {
            at_ms: crate::policy::kv::now_ms(),
            trigger: trigger.to_owned(),
            result,
            changes,
            error,
        };
        if result != "unchanged" {
            let i = usize::from(result == "rejected");
            self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut journal = lock(&self.journal);
        if journal.len() == HISTORY {
            journal.pop_front();
        }
        journal.push_back(event.clone());
        event
    }

    async fn try_reload(&self, trigger: &str) -> Result<Vec<String>, String> {
        let new = Config::load(&self.path).map_err(|e| e.to_string())?;
        let old = self.shared.live();
        needs_restart(&old.config, &new)?;
        let mut changes = node_changes(&old.config.nodes, &new.nodes);
        let rebuild = !changes.is_empty()
            || differs(&old.config.pool, &new.pool)
            || differs(&old.config.health, &new.health);
        for (key, changed) in [
            ("pool", differs(&old.config.pool, &new.pool)),
            ("health", differs(&old.config.health, &new.health)),
            ("clients", differs(&old.config.clients, &new.clients)),
            ("auth", differs(&old.config.auth, &new.auth)),
            (
                "classifier",
                differs(&old.config.classifier, &new.classifier),
            ),
            (
                "read_your_writes",
                differs(&old.config.read_your_writes, &new.read_your_writes),
            ),
            ("policy", differs(&old.config.policy, &new.policy)),
            (
                "shadow_policy",
                differs(&old.config.shadow_policy, &new.shadow_policy),
            ),
            ("logging", differs(&old.config.logging, &new.logging)),
        ] {
            if changed {
                changes.push(format!("[{key}] changed"));
            }
        }
        // Everything that can fail is done before anything is swapped.
        let base = new.base_dir();
        // A changed [policy] that stays configured is a reconfiguration of
        // the running manager (history, rollback target and key/value store
        // kept); one added or removed needs a new manager.
        let policy_changed = differs(&old.config.policy, &new.policy);
        let reconfigure = match (&old.config.policy, &new.policy) {
            (Some(_), Some(p)) if policy_changed => Some(p.settings(&base)),
            _ => None,
        };
        let policy = if policy_changed && reconfigure.is_none() {
            let m = start_manager(new.policy.as_ref().map(|p| p.settings(&base)), "policy").await?;
            Some(m.unwrap_or_else(|| Arc::new(PolicyManager::empty(PolicySettings::new("")))))
        } else {
            None
        };
        let shadow = if differs(&old.config.shadow_policy, &new.shadow_policy) {
            Some(
                start_manager(
                    new.shadow_policy.as_ref().map(|p| p.settings(&base)),
                    "shadow_policy",
                )
                .await?,
            )
        } else {
            None
        };
        let cluster = if rebuild {
            let c = Cluster::new(&new, &self.shared.metrics.routed)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            c.adopt_fence(&old.cluster);
            c.probe_all().await;
            // A new cluster's first probes open new connections, and under
            // load one can miss its connect budget: look again (about a
            // second in all) before concluding no node is the primary.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            while c.view().primary().is_none()
                && old.cluster.view().primary().is_some()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                let _ = tokio::time::timeout_at(deadline, c.probe_all()).await;
            }
            refuses_losing_the_primary(&old.cluster, &c, &self.path)?;
            Some(c)
        } else {
            None
        };
        let new = Arc::new(new);
        self.swap_policies(&new, reconfigure, policy, shadow, trigger)
            .await?;
        let cluster = match cluster {
            Some(c) => {
                let handle = c.spawn_health();
                if let Some(old_health) = lock(&self.health).replace(handle) {
                    old_health.abort();
                }
                c
            }
            None => old.cluster.clone(),
        };
        let retired = (!Arc::ptr_eq(&cluster, &old.cluster)).then(|| old.cluster.clone());
        self.shared.live.store(Arc::new(Live {
            config: new,
            cluster,
            generation: old.generation + u64::from(!changes.is_empty()),
        }));
        if let Some(c) = retired {
            c.retire();
        }
        Ok(changes)
    }

    /// Install new policy managers (and their watchers). An unchanged
    /// `[policy]` still re-reads its file, as `POST /policy/reload` would
    /// (a file refused before is tried again). Only the reconfiguration of
    /// the running manager can fail here, and it comes first; a watcher
    /// that cannot start is logged (the file is then reloaded only on
    /// request), not a reason to reject what already validated.
    async fn swap_policies(
        &self,
        config: &Config,
        reconfigure: Option<PolicySettings>,
        policy: Option<Arc<PolicyManager>>,
        shadow: Option<Option<Arc<PolicyManager>>>,
        trigger: &str,
    ) -> Result<(), String> {
        let current = self.shared.router.policy();
        let t = trigger.to_owned();
        if let Some(settings) = reconfigure {
            let m = current.clone();
            tokio::task::spawn_blocking(move || m.reconfigure(settings, &t))
                .await
                .map_err(|e| format!("policy: {e}"))?
                .map_err(|e| format!("policy: {}: {}", e.stage.as_str(), e.message))?;
            let on = config.policy.as_ref().is_some_and(|p| p.watch.enabled);
            lock(&self.watchers).active = watch(&current, on);
        } else if policy.is_none() {
            let _ = tokio::task::spawn_blocking(move || current.reload(&t)).await;
        }
        let mut watchers = lock(&self.watchers);
        if let Some(m) = policy {
            let on = config.policy.as_ref().is_some_and(|p| p.watch.enabled);
            watchers.active = watch(&m, on);
            self.shared.router.set_policy(m);
        }
        if let Some(s) = shadow {
            let on = config
                .shadow_policy
                .as_ref()
                .is_some_and(|p| p.watch.enabled);
            watchers.shadow = s.as_ref().and_then(|m| watch(m, on));
            self.shared.router.set_shadow(s);
        }
        Ok(())
    }
}

/// A watcher for `manager`'s file when `on`; a failure to start one is
/// logged (the file is then reloaded only on request).
fn watch(manager: &Arc<PolicyManager>, on: bool) -> Option<Watcher> {
    if !on {
        return None;
    }
    match manager.watch() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, path = %manager.settings().path.display(), "cannot watch the policy file; it is reloaded only on request (SIGHUP, POST /policy/reload)");
            None
        }
    }
}

/// A manager for a changed `[policy]`/`[shadow_policy]` section, its first
/// version validated (none: the section was removed). For `[policy]` an
/// empty manager means built-in routing.
async fn start_manager(
    settings: Option<PolicySettings>,
    key: &'static str,
) -> Result<Option<Arc<PolicyManager>>, String> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    tokio::task::spawn_blocking(move || PolicyManager::start(settings))
        .await
        .map_err(|e| format!("{key}: {e}"))?
        .map(Some)
        .map_err(|e| format!("{key}: {e}"))
}

/// A reload must not turn a cluster with a writable primary into one
/// without (the primary's entry removed, or its URL pointing at a replica):
/// every write would fail. During an outage (no primary now) it may.
fn refuses_losing_the_primary(
    old: &Cluster,
    new: &Cluster,
    path: &std::path::Path,
) -> Result<(), String> {
    let before = old.view();
    let Some(primary) = before.primary() else {
        return Ok(());
    };
    if new.view().primary().is_some() {
        return Ok(());
    }
    Err(format!(
        "{}: no node of the new configuration answers as a writable primary (now: {}); every write would fail, so nothing was applied",
        path.display(),
        before.node_name(primary)
    ))
}

fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// Keys a running process cannot change: the reload is refused, naming them.
fn needs_restart(old: &Config, new: &Config) -> Result<(), String> {
    let fixed = [
        ("listen", differs(&old.listen, &new.listen)),
        (
            "admin_listen",
            differs(&old.admin_listen, &new.admin_listen),
        ),
        ("admin_token", old.admin_token != new.admin_token),
        ("workers", old.workers != new.workers),
        ("tls", differs(&old.tls, &new.tls)),
        (
            "clients.buffer_budget_mb",
            old.clients.buffer_budget_mb != new.clients.buffer_budget_mb,
        ),
    ];
    let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}: {} cannot change while signalbox runs (restart it); nothing was applied",
        new.origin.display(),
        changed.join(", ")
    ))
}

/// Nodes added, removed and changed, by name.
fn node_changes(old: &[NodeConfig], new: &[NodeConfig]) -> Vec<String> {
    let mut changes = Vec::new();
    for n in new {
        match old.iter().find(|o| o.name == n.name) {
            None => changes.push(format!("node {} added", n.name)),
            Some(o) if differs(o, n) => changes.push(format!("node {} changed", n.name)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|n| n.name == o.name) {
            changes.push(format!("node {} removed", o.name));
        }
    }
    let order = |ns: &[NodeConfig]| ns.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    if changes.is_empty() && order(old) != order(new) {
        changes.push("node order changed".into());
    }
    changes
}

impl prometheus_client::collector::Collector for Reloader {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        use crate::telemetry::{by, node, one};
        use std::sync::atomic::Ordering;
        let live = self.shared.live();
        let view = live.cluster.view();
        let per_node = |v: &dyn Fn(usize) -> i64| {
            (0..view.nodes.len())
                .map(|i| (node(&view.nodes[i].name), v(i)))
                .collect::<Vec<_>>()
        };
        let idle = live.cluster.pools.idle();
        let mut r = crate::telemetry::Rows::new(&mut encoder);
        r.gauge(
            "signalbox_node_up",
            "1 if the node answers health probes.",
            per_node(&|i| i64::from(view.states[i].healthy)),
        )?;
        r.gauge(
            "signalbox_node_primary",
            "1 if the node reports it is a primary.",
            per_node(&|i| i64::from(view.states[i].role == crate::route::Role::Primary)),
        )?;
        r.gauge(
            "signalbox_node_lag_bytes",
            "WAL bytes the node has not replayed yet.",
            per_node(&|i| view.states[i].lag_bytes as i64),
        )?;
        r.gauge(
            "signalbox_node_lag_ms",
            "Replay lag in milliseconds.",
            per_node(&|i| i64::from(view.states[i].lag_ms.unwrap_or(0))),
        )?;
        r.gauge(
            "signalbox_node_in_flight",
            "Backend connections checked out.",
            per_node(&|i| i64::from(view.in_flight(i as u32))),
        )?;
        r.gauge(
            "signalbox_node_idle",
            "Idle pooled backend connections.",
            per_node(&|i| i64::from(idle.get(i).copied().unwrap_or(0))),
        )?;
        r.counter(
            "signalbox_split_brain_probe_rounds",
            "Probe rounds in which more than one node claimed to be the primary (since the last config reload).",
            one(live.cluster.split_brain_rounds.load(Ordering::Relaxed)),
        )?;
        r.gauge(
            "signalbox_writes_fenced",
            "1 while a node claiming to be primary is fenced (former primary, or split brain).",
            one(i64::from(live.cluster.fence_reason().is_some())),
        )?;
        r.gauge(
            "signalbox_config_generation",
            "Configurations applied since start (1: the one it started with).",
            one(live.generation as i64),
        )?;
        r.counter(
            "signalbox_config_reloads",
            "Config reloads that changed something or were rejected, by result.",
            by(
                "result",
                [
                    ("applied".to_owned(), self.counts[0].load(Ordering::Relaxed)),
                    (
                        "rejected".to_owned(),
                        self.counts[1].load(Ordering::Relaxed),
                    ),
                ],
            ),
        )
    }
}
