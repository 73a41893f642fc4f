//! The backends: data-path pools (`pool`, `backend`) and the control plane
//! (this file): per node, a small `sqlx` pool probes health, the role the node
//! reports (`pg_is_in_recovery()`) and its WAL position, from which replica
//! lag is derived. The result is published as the states of a
//! [`ClusterView`], which the router reads once per statement.

pub mod addr;
pub mod backend;
pub mod cancel;
pub mod pool;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use addr::NodeAddr;
use pool::{NodeLogin, PoolSettings, Pools};

use crate::config::{Config, HealthConfig, NodeRole};
use crate::route::{ClusterView, NodeId, NodeInfo, NodeState, Role};

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
    (CASE WHEN pg_is_in_recovery() THEN COALESCE(pg_last_wal_replay_lsn(), '0/0'::pg_lsn) \
          ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint, \
    COALESCE((EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, 0), \
    CASE WHEN pg_is_in_recovery() THEN 0 \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END";

/// What one probe saw.
#[derive(Clone, Copy, Debug)]
struct Probe {
    in_recovery: bool,
    lsn: u64,
    replay_age_ms: u64,
    /// The WAL timeline a primary writes on (0 for a node in recovery).
    timeline: u32,
}

/// Who may take writes when nodes disagree about being the primary.
#[derive(Debug, Default)]
struct Fence {
    /// The newest timeline any primary has been seen writing on: a node
    /// claiming to be primary on an older one is a former primary that came
    /// back (its writes would be lost), and never takes writes.
    newest_timeline: u32,
    /// Why writes are fenced now (for errors, `/health`, `/status`).
    reason: Option<String>,
}

pub struct Cluster {
    pub nodes: Arc<Vec<NodeInfo>>,
    pub addrs: Vec<NodeAddr>,
    pub pools: Arc<Pools>,
    configured: Vec<NodeRole>,
    control: Vec<PgPool>,
    /// How the control plane connects to each node (catalog fetches use
    /// them with another database).
    control_options: Vec<PgConnectOptions>,
    states: ArcSwap<Vec<NodeState>>,
    failures: std::sync::Mutex<Vec<u32>>,
    health: HealthConfig,
    fence: std::sync::Mutex<Fence>,
    /// Probe rounds that found more than one node claiming to be primary.
    pub split_brain_rounds: std::sync::atomic::AtomicU64,
    /// The generation of `nodes` (see [`crate::route::next_generation`]).
    generation: u64,
}

impl Cluster {
    /// Set up pools for every node (no connection is made yet).
    pub fn new(config: &Config) -> Result<Arc<Self>, String> {
        let mut addrs = Vec::new();
        let mut control = Vec::new();
        let mut control_options = Vec::new();
        for (i, n) in config.nodes.iter().enumerate() {
            let addr = NodeAddr::parse(&n.url).map_err(|e| format!("nodes[{i}].url: {e}"))?;
            let opts = PgConnectOptions::from_str(&n.url)
                .map_err(|e| format!("nodes[{i}].url: {e}"))?
                .application_name("signalbox-control")
                .disable_statement_logging();
            control.push(
                PgPoolOptions::new()
                    .max_connections(2)
                    .min_connections(0)
                    .acquire_timeout(Duration::from_millis(config.health.probe_timeout_ms))
                    .connect_lazy_with(opts.clone()),
            );
            control_options.push(opts);
            addrs.push(addr);
        }
        let nodes: Vec<NodeInfo> = config
            .nodes
            .iter()
            .map(|n| NodeInfo::new(&n.name, n.weight, &n.tags))
            .collect();
        let mut logins = Vec::new();
        for (i, (n, a)) in config.nodes.iter().zip(&addrs).enumerate() {
            let base = config.base_dir();
            let root = a.sslrootcert.as_ref().map(|p| base.join(p));
            let tls = crate::tls::connector(a.sslmode, root.as_deref())
                .map_err(|e| format!("nodes[{i}].url: {e}"))?
                .map(|connector| {
                    crate::tls::server_name(&a.host).map(|name| crate::tls::NodeTls {
                        connector,
                        name,
                        required: a.sslmode != crate::tls::SslMode::Prefer,
                    })
                })
                .transpose()
                .map_err(|e| format!("nodes[{i}].url: {e}"))?;
            logins.push(NodeLogin {
                name: n.name.clone(),
                addr: a.socket(),
                tls,
            });
        }
        let pools = Pools::new(
            logins,
            PoolSettings {
                size: config.pool.size,
                checkout_timeout: Duration::from_millis(config.pool.checkout_timeout_ms),
                connect_timeout: Duration::from_millis(config.pool.connect_timeout_ms),
                idle_timeout: Duration::from_secs(config.pool.idle_timeout_s),
                max_lifetime: Duration::from_secs(config.pool.max_lifetime_s),
            },
        );
        let configured: Vec<NodeRole> = config.nodes.iter().map(|n| n.role).collect();
        // Until the first probe, trust the configuration but call nothing healthy.
        let states = configured
            .iter()
            .map(|r| NodeState {
                healthy: false,
                ..NodeState::up(match r {
                    NodeRole::Primary => Role::Primary,
                    NodeRole::Replica => Role::Replica,
                    NodeRole::Auto => Role::Unknown,
                })
            })
            .collect();
        Ok(Arc::new(Self {
            failures: std::sync::Mutex::new(vec![0; nodes.len()]),
            nodes: Arc::new(nodes),
            addrs,
            pools: Arc::new(pools),
            configured,
            control,
            control_options,
            states: ArcSwap::from_pointee(states),
            health: config.health.clone(),
            fence: std::sync::Mutex::default(),
            split_brain_rounds: std::sync::atomic::AtomicU64::new(0),
            generation: crate::route::next_generation(),
        }))
    }

    async fn probe(&self, node: usize) -> Result<Probe, String> {
        let timeout = Duration::from_millis(self.health.probe_timeout_ms);
        let q =
            sqlx::query_as::<_, (bool, i64, i64, i64)>(PROBE_SQL).fetch_one(&self.control[node]);
        match tokio::time::timeout(timeout, q).await {
            Ok(Ok((in_recovery, lsn, age, timeline))) => Ok(Probe {
                in_recovery,
                lsn: lsn.max(0) as u64,
                replay_age_ms: age.max(0) as u64,
                timeline: u32::try_from(timeline).unwrap_or(0),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }

    /// Probe every node once and publish the new states.
    pub async fn probe_all(&self) {
        let probes = futures::future::join_all((0..self.nodes.len()).map(|i| self.probe(i))).await;
        let old = self.states.load_full();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let primary_lsn = probes
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .filter(|p| !p.in_recovery)
            .map(|p| p.lsn)
            .max();
        let timelines: Vec<Option<u32>> = probes
            .iter()
            .map(|p| {
                p.as_ref()
                    .ok()
                    .filter(|p| !p.in_recovery)
                    .map(|p| p.timeline)
            })
            .collect();
        let mut states = Vec::with_capacity(probes.len());
        for (i, probe) in probes.into_iter().enumerate() {
            let prev = &old[i];
            let state = match probe {
                Ok(p) => {
                    if failures[i] >= self.health.failures_to_ban || !prev.healthy {
                        tracing::info!(node = %self.nodes[i].name, in_recovery = p.in_recovery, "node is up");
                    }
                    failures[i] = 0;
                    let role = if p.in_recovery {
                        Role::Replica
                    } else {
                        Role::Primary
                    };
                    if role == Role::Primary && self.configured[i] == NodeRole::Replica {
                        tracing::warn!(node = %self.nodes[i].name, "node configured as replica reports it is a primary");
                    }
                    let lag_bytes = match (role, primary_lsn) {
                        (Role::Replica, Some(plsn)) => plsn.saturating_sub(p.lsn),
                        _ => 0,
                    };
                    NodeState {
                        role,
                        healthy: true,
                        lag_ms: (role == Role::Replica).then(|| {
                            if lag_bytes == 0 {
                                0
                            } else {
                                p.replay_age_ms.min(u64::from(u32::MAX)) as u32
                            }
                        }),
                        lag_bytes,
                        replay_lsn: p.lsn,
                        in_flight: 0,
                        idle: 0,
                        latency_us: 0,
                    }
                }
                Err(e) => {
                    failures[i] = failures[i].saturating_add(1);
                    let banned = failures[i] >= self.health.failures_to_ban;
                    if banned && prev.healthy {
                        tracing::warn!(node = %self.nodes[i].name, error = %e, "node is down; banned until it answers again");
                        self.pools.drop_idle(|n, _| n == i as NodeId);
                    }
                    NodeState {
                        healthy: prev.healthy && !banned,
                        ..prev.clone()
                    }
                }
            };
            states.push(state);
        }
        self.fence_split_brain(&mut states, &timelines);
        self.states.store(Arc::new(states));
    }

    /// More than one node claims to be the primary (a promotion, then the
    /// old primary restarted; or two promotions). A claimant on an older
    /// timeline than the newest one seen is a former primary: it is fenced
    /// (no writes, no reads). Two claimants on the newest timeline cannot
    /// be told apart: all of them are fenced and writes go nowhere until
    /// exactly one remains. Fenced nodes show as unhealthy.
    fn fence_split_brain(&self, states: &mut [NodeState], timelines: &[Option<u32>]) {
        let mut fence = self.fence.lock().unwrap_or_else(|p| p.into_inner());
        let claimants: Vec<usize> = (0..states.len())
            .filter(|&i| states[i].healthy && timelines[i].is_some())
            .collect();
        let newest = claimants
            .iter()
            .filter_map(|&i| timelines[i])
            .max()
            .unwrap_or(0)
            .max(fence.newest_timeline);
        fence.newest_timeline = newest;
        let name = |i: usize| self.nodes[i].name.clone();
        let stale: Vec<usize> = claimants
            .iter()
            .copied()
            .filter(|&i| timelines[i].unwrap_or(0) < newest)
            .collect();
        let current: Vec<usize> = claimants
            .iter()
            .copied()
            .filter(|&i| timelines[i].unwrap_or(0) >= newest)
            .collect();
        let mut reasons = Vec::new();
        for &i in &stale {
            reasons.push(format!(
                "{} claims to be primary on timeline {} but a primary was seen on timeline {newest}: a former primary, fenced",
                name(i),
                timelines[i].unwrap_or(0)
            ));
            states[i].healthy = false;
        }
        if current.len() > 1 {
            let names: Vec<String> = current.iter().map(|&i| name(i)).collect();
            reasons.push(format!(
                "split brain: {} all claim to be primary on timeline {newest}; writes are refused until one remains",
                names.join(" and ")
            ));
            for &i in &current {
                states[i].healthy = false;
            }
        }
        if claimants.len() > 1 {
            self.split_brain_rounds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
        if reason != fence.reason {
            match &reason {
                Some(r) => tracing::error!(reason = %r, "fencing nodes that claim to be primary"),
                None if fence.reason.is_some() => {
                    tracing::info!("one primary again: fence lifted")
                }
                None => {}
            }
            fence.reason = reason;
        }
    }

    /// Why some node is fenced now, if one is.
    pub fn fence_reason(&self) -> Option<String> {
        self.fence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reason
            .clone()
    }

    /// Probe forever, every `health.interval_ms`.
    pub fn spawn_health(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(me.health.interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.probe_all().await;
            }
        })
    }

    /// The view the router uses: probed states plus live pool counters.
    pub fn view(&self) -> Arc<ClusterView> {
        let states = self.states.load();
        let mut states: Vec<NodeState> = states.as_ref().clone();
        for (i, s) in states.iter_mut().enumerate() {
            s.in_flight = self.pools.in_flight(i as NodeId);
        }
        Arc::new(ClusterView {
            generation: self.generation,
            nodes: self.nodes.clone(),
            states,
        })
    }

    /// Control-plane connection options for `node`, on `database`.
    pub fn control_options(&self, node: NodeId, database: &str) -> Option<PgConnectOptions> {
        self.control_options
            .get(node as usize)
            .map(|o| o.clone().database(database))
    }

    pub fn states(&self) -> Arc<Vec<NodeState>> {
        self.states.load_full()
    }
}
