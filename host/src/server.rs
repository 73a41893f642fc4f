//! Assembling the service: cluster control plane, policy, router, proxy
//! listener and admin API, started in-process. `signalbox serve`, `signalbox
//! demo` and the end-to-end tests all start it this way.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, NodeCounters};
use crate::config::Config;
use crate::live::{Live, Reloader, Watchers};
use crate::policy::{PolicyManager, PolicySettings};
use crate::proxy::{self, Shared};
use crate::router::Router;

pub struct Server {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    /// Config reloads (SIGHUP, `POST /config/reload`).
    pub reloader: Arc<Reloader>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Start everything; returns once clients can connect.
    pub async fn start(config: Config) -> Result<Server> {
        let config = Arc::new(config);
        let routed = Arc::new(NodeCounters::default());
        let cluster = Cluster::new(&config, &routed).map_err(anyhow::Error::msg)?;
        cluster.probe_all().await;
        let base = config.base_dir();
        let (policy, active_watcher) =
            start_policy(config.policy.as_ref(), &base, "[policy]").await?;
        let policy =
            policy.unwrap_or_else(|| Arc::new(PolicyManager::empty(PolicySettings::new(""))));
        let (shadow, shadow_watcher) =
            start_policy(config.shadow_policy.as_ref(), &base, "[shadow_policy]").await?;
        let router = Arc::new(Router::new(policy));
        router.set_shadow(shadow);
        let tls = match &config.tls {
            Some(t) => {
                let tls =
                    crate::tls::client_tls(&base.join(&t.cert), &base.join(&t.key), t.require)
                        .with_context(|| "[tls]")?;
                Some(tls)
            }
            None => None,
        };
        let live = Live {
            config: config.clone(),
            cluster: cluster.clone(),
            generation: 1,
        };
        let shared = Shared::new(live, router, tls, routed);
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listen: cannot bind {}", config.listen))?;
        let addr = listener.local_addr()?;
        let reloader = Arc::new(Reloader::new(
            shared.clone(),
            cluster.spawn_health(),
            Watchers {
                active: active_watcher,
                shadow: shadow_watcher,
            },
        ));
        let mut registry = crate::telemetry::Registry::default();
        shared.register_metrics(&mut registry);
        shared.router.register_metrics(&mut registry);
        registry.register_collector(Box::new(reloader.clone()));
        let registry = Arc::new(registry);
        let mut tasks = vec![spawn_catalog_refresh(shared.clone())];
        let s = shared.clone();
        tasks.push(tokio::spawn(proxy::serve(listener, s)));
        let admin_addr = match config.admin_listen {
            Some(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .with_context(|| format!("admin_listen: cannot bind {a}"))?;
                let admin_addr = l.local_addr()?;
                let guard = crate::admin::Guard::new(config.admin_token.as_deref(), admin_addr);
                let app =
                    crate::admin::router(shared.clone(), reloader.clone(), registry.clone(), guard);
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, app).await {
                        tracing::error!(error = %e, "admin API failed");
                    }
                }));
                Some(admin_addr)
            }
            None => None,
        };
        tracing::info!(%addr, admin = ?admin_addr, nodes = cluster.nodes.len(), "signalbox is serving");
        Ok(Server {
            addr,
            admin_addr,
            shared,
            reloader,
            tasks,
        })
    }

    /// The active policy's manager.
    pub fn policy(&self) -> Arc<PolicyManager> {
        self.shared.router.policy()
    }

    /// Stop accepting clients and let each finish its transaction: a session
    /// ends (with PostgreSQL's 57P01 admin-shutdown error) as soon as it is
    /// between transactions. Returns whether every session ended within
    /// `drain`; the caller then exits, which closes whatever is left.
    pub async fn shutdown(&self, drain: std::time::Duration) -> bool {
        self.shared.begin_shutdown();
        let metrics = &self.shared.metrics;
        let active = || {
            metrics
                .sessions_active
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let deadline = tokio::time::Instant::now() + drain;
        while active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = active();
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "drain timeout: closing the remaining sessions"
            );
        }
        left == 0
    }

    /// Run until SIGTERM or SIGINT, then shut down gracefully within the
    /// configured drain time; a second signal exits at once.
    pub async fn run_until_signalled(&self) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let drain =
            std::time::Duration::from_secs(self.shared.live().config.clients.shutdown_drain_s);
        tracing::info!(
            drain_s = drain.as_secs(),
            "shutting down: no new clients; open transactions may finish"
        );
        tokio::select! {
            done = self.shutdown(drain) => {
                if done {
                    tracing::info!("every client finished; exiting");
                }
            }
            _ = term.recv() => tracing::warn!("second signal: exiting now"),
            _ = int.recv() => tracing::warn!("second signal: exiting now"),
        }
        Ok(())
    }

    /// Reload the configuration (and with it the policy) on SIGHUP until
    /// the process ends.
    pub fn reload_on_sighup(&mut self) -> Result<()> {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reloader = self.reloader.clone();
        self.tasks.push(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                reloader.reload("signal").await;
            }
        }));
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.reloader.stop();
    }
}

/// Refresh every served database's catalog facts on the configured interval
/// (both read from the configuration in force at each round).
fn spawn_catalog_refresh(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let period = shared.live().config.classifier.refresh_s.max(1);
            tokio::time::sleep(std::time::Duration::from_secs(period)).await;
            let live = shared.live();
            if !live.config.classifier.catalog {
                continue;
            }
            for db in shared.catalogs.databases() {
                let _ = shared
                    .catalogs
                    .refresh(&live.cluster, &live.config.classifier, &db)
                    .await;
            }
        }
    })
}

/// Load a policy section's first version (and watch its file if asked).
async fn start_policy(
    section: Option<&crate::config::PolicyConfig>,
    base: &std::path::Path,
    key: &str,
) -> Result<(
    Option<Arc<PolicyManager>>,
    Option<crate::policy::reload::Watcher>,
)> {
    let Some(p) = section else {
        return Ok((None, None));
    };
    let settings = p.settings(base);
    let watch = p.watch.enabled;
    let manager = tokio::task::spawn_blocking(move || PolicyManager::start(settings))
        .await?
        .with_context(|| format!("{key}: loading the routing policy"))?;
    let watcher = if watch { Some(manager.watch()?) } else { None };
    Ok((Some(manager), watcher))
}
