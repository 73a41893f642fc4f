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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use addr::NodeAddr;
use pool::{NodeLogin, PoolSettings, Pools};

use crate::config::{Config, HealthConfig, NodeRole};
use crate::lock;
use crate::route::{ClusterView, NodeId, NodeInfo, NodeState, Role};

/// A node's WAL insert position, as a number: after a commit, at or past
/// its commit record (even an asynchronous commit's). Every name is
/// schema-qualified or a keyword, as it also runs on clients' connections,
/// under their `search_path`.
pub const INSERT_LSN_SQL: &str =
    "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_insert_lsn(), '0/0')::bigint";

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
    /// The WAL timeline a primary writes on (0 for a node in recovery).
    timeline: u32,
}

/// Where a view reads the counters that change with every statement.
struct Counts {
    pools: Arc<Pools>,
    latency_us: Arc<[std::sync::atomic::AtomicU32]>,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("live pool counters")
    }
}

impl crate::route::LiveCounts for Counts {
    fn in_flight(&self, node: NodeId) -> u32 {
        self.pools.in_flight(node)
    }

    fn add_idle(&self, idle: &mut [u32]) {
        self.pools.add_idle(idle)
    }

    fn latency_us(&self, node: NodeId) -> u32 {
        self.latency_us
            .get(node as usize)
            .map_or(0, |l| l.load(Ordering::Relaxed))
    }
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
    /// The latest probe of each node (None: not probed yet).
    latest: std::sync::Mutex<Vec<Option<Result<Probe, String>>>>,
    /// A probe of the node is running (on-demand probes skip it then).
    probing: Vec<std::sync::atomic::AtomicBool>,
    /// Exchange time per node, an exponentially weighted moving average (µs).
    latency_us: Arc<[std::sync::atomic::AtomicU32]>,
    /// The view routers read, rebuilt when the probed states change.
    view: ArcSwap<ClusterView>,
    /// The primary's WAL position over time, for replicas' time lag.
    history: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
    publishing: std::sync::Mutex<()>,
    health: HealthConfig,
    fence: std::sync::Mutex<Fence>,
    /// Probe rounds that found more than one node claiming to be primary.
    pub split_brain_rounds: std::sync::atomic::AtomicU64,
    /// The generation of `nodes` (see [`crate::route::next_generation`]).
    generation: u64,
    /// Each node's metrics (shared by name across reloads).
    pub metrics: Vec<NodeMetrics>,
}

/// Per-node metrics that outlive a configuration: kept by node name, so a
/// reload that renumbers, adds or removes nodes keeps each series going.
/// A cluster takes its nodes' handles once; the data path never looks a
/// node up by name.
pub struct NodeCounters {
    routed: std::sync::Mutex<std::collections::BTreeMap<String, Arc<AtomicU64>>>,
    /// Time from sending a client's work to a node to its last reply.
    pub exchange: crate::telemetry::Histograms,
    /// Time a session waited for a pooled connection to a node.
    pub checkout_wait: crate::telemetry::Histograms,
    /// Backend connections opened, failed, broken, expired, discarded.
    pub connections: prometheus_client::metrics::family::Family<
        crate::telemetry::Labels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Default for NodeCounters {
    fn default() -> Self {
        Self {
            routed: std::sync::Mutex::default(),
            exchange: crate::telemetry::histograms(),
            checkout_wait: crate::telemetry::histograms(),
            connections: Default::default(),
        }
    }
}

impl NodeCounters {
    /// The routed-statement counter of `node`, created at zero on first use.
    pub fn get(&self, node: &str) -> Arc<AtomicU64> {
        let mut map = lock(&self.routed);
        map.entry(node.to_owned()).or_default().clone()
    }

    /// The routed count of `node` (0 if never seen).
    pub fn value(&self, node: &str) -> u64 {
        lock(&self.routed)
            .get(node)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every node ever routed to, by name.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        lock(&self.routed)
            .iter()
            .map(|(n, c)| (n.clone(), c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Register the histograms (the counts are read by the data path's
    /// collector).
    pub fn register(&self, registry: &mut crate::telemetry::Registry) {
        registry.register(
            "signalbox_exchange_seconds",
            "Time from sending a client's statement or batch to a node to its last reply, by node.",
            self.exchange.clone(),
        );
        registry.register(
            "signalbox_checkout_wait_seconds",
            "Time a session waited for a pooled connection, by node (includes connecting).",
            self.checkout_wait.clone(),
        );
        registry.register(
            "signalbox_backend_connections",
            "Backend connections by node and event: opened, connect_failed, broken (found dead before reuse), expired (idle or lifetime limit), discarded (not provably idle when given back), retired (its pool replaced by a config reload).",
            self.connections.clone(),
        );
    }
}

/// A node's handles into [`NodeCounters`].
pub struct NodeMetrics {
    pub routed: Arc<AtomicU64>,
    pub exchange: crate::telemetry::Histogram,
    pub checkout_wait: crate::telemetry::Histogram,
}

impl Cluster {
    /// Set up pools for every node (no connection is made yet).
    pub fn new(config: &Config, counters: &NodeCounters) -> Result<Arc<Self>, String> {
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
                    // sqlx retries a refused connect until this: a node
                    // that is down must fail its probe fast, not wait it out.
                    .acquire_timeout(Duration::from_millis(
                        config.health.probe_timeout_ms.min(500),
                    ))
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
                events: pool::ConnEvents::of(&counters.connections, &n.name),
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
        let cluster = Arc::new(Self {
            failures: std::sync::Mutex::new(vec![0; nodes.len()]),
            latest: std::sync::Mutex::new(vec![None; nodes.len()]),
            latency_us: (0..nodes.len())
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            view: ArcSwap::from_pointee(ClusterView::fixed(0, Arc::default(), Vec::new())),
            probing: (0..nodes.len())
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            history: std::sync::Mutex::default(),
            publishing: std::sync::Mutex::default(),
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
            metrics: config
                .nodes
                .iter()
                .map(|n| {
                    let labels = crate::telemetry::node(&n.name);
                    NodeMetrics {
                        routed: counters.get(&n.name),
                        exchange: counters.exchange.get_or_create_owned(&labels),
                        checkout_wait: counters.checkout_wait.get_or_create_owned(&labels),
                    }
                })
                .collect(),
        });
        cluster.rebuild_view();
        Ok(cluster)
    }

    /// A config reload replaced this cluster: its pools take no more
    /// checkouts and close connections as they come back.
    pub fn retire(&self) {
        self.pools.close();
    }

    /// Keep what the previous cluster learned about failovers: a former
    /// primary it fenced stays fenced under the new configuration.
    pub fn adopt_fence(&self, previous: &Cluster) {
        let newest = lock(&previous.fence).newest_timeline;
        let mut fence = lock(&self.fence);
        fence.newest_timeline = fence.newest_timeline.max(newest);
    }

    /// `node`'s WAL insert position, asked on the control plane (bounded
    /// by the probe timeout): a position at or past every commit that
    /// returned before the call.
    pub async fn insert_lsn(&self, node: NodeId) -> Option<u64> {
        let pool = self.control.get(node as usize)?;
        let q = sqlx::query_scalar::<_, i64>(INSERT_LSN_SQL).fetch_one(pool);
        let timeout = Duration::from_millis(self.health.probe_timeout_ms);
        match tokio::time::timeout(timeout, q).await {
            Ok(Ok(lsn)) => u64::try_from(lsn).ok(),
            _ => None,
        }
    }

    async fn probe(&self, node: usize) -> Result<Probe, String> {
        let timeout = Duration::from_millis(self.health.probe_timeout_ms);
        let q =
            sqlx::query_as::<_, (bool, i64, i64, i64)>(PROBE_SQL).fetch_one(&self.control[node]);
        match tokio::time::timeout(timeout, q).await {
            Ok(Ok((in_recovery, lsn, _replay_age, timeline))) => Ok(Probe {
                in_recovery,
                lsn: lsn.max(0) as u64,
                timeline: u32::try_from(timeline).unwrap_or(0),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }

    /// Probe every node once (concurrently) and publish the new states.
    pub async fn probe_all(&self) {
        let probes = futures::future::join_all((0..self.nodes.len()).map(|i| self.probe(i))).await;
        for (i, p) in probes.into_iter().enumerate() {
            self.record(i, p);
        }
        self.publish();
    }

    /// Probe one node and publish: a slow or dead node delays no other.
    /// A probe of the node already running makes this one a no-op.
    pub async fn probe_node(&self, node: usize) {
        use std::sync::atomic::Ordering;
        let Some(flag) = self.probing.get(node) else {
            return;
        };
        if flag.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut p = self.probe(node).await;
        // A node whose port refuses connections is down for sure: ban it at
        // this first failed probe instead of waiting for more (each waits
        // out the control pool's acquire timeout, as sqlx retries refused
        // connects).
        if let Err(why) = &p {
            if self.refuses_connections(node).await {
                p = Err(format!("{why} (connection refused)"));
                let mut failures = lock(&self.failures);
                let almost = self.health.failures_to_ban.saturating_sub(1);
                failures[node] = failures[node].max(almost);
            }
        }
        flag.store(false, Ordering::Release);
        self.record(node, p);
        self.publish();
    }

    /// Whether `node`'s address actively refuses a TCP connection (nothing
    /// listens there); a timeout or any other outcome is not proof.
    async fn refuses_connections(&self, node: usize) -> bool {
        let Some(addr) = self.addrs.get(node) else {
            return false;
        };
        let connect = tokio::net::TcpStream::connect(addr.socket());
        matches!(
            tokio::time::timeout(Duration::from_millis(200), connect).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    }

    /// Wait up to `limit` for a healthy replica to replay `lsn`, probing
    /// the replicas meanwhile; whether one has.
    pub async fn wait_for_replay(&self, lsn: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let view = self.view();
            let replicas: Vec<usize> = (0..view.states.len())
                .filter(|&i| view.states[i].role == Role::Replica && view.states[i].healthy)
                .collect();
            if replicas.iter().any(|&i| view.states[i].replay_lsn >= lsn) {
                return true;
            }
            if replicas.is_empty() || tokio::time::Instant::now() >= deadline {
                return false;
            }
            let probes = futures::future::join_all(replicas.iter().map(|&i| self.probe_node(i)));
            if tokio::time::timeout_at(deadline, probes).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn record(&self, node: usize, probe: Result<Probe, String>) {
        {
            let mut failures = lock(&self.failures);
            failures[node] = match probe {
                Ok(_) => 0,
                Err(_) => failures[node].saturating_add(1),
            };
        }
        lock(&self.latest)[node] = Some(probe);
    }

    /// The data path could not connect to `node`: ban it now rather than
    /// at the next failed probes (the next probe that answers lifts it).
    pub fn report_down(&self, node: NodeId, why: &str) {
        let i = node as usize;
        if i >= self.nodes.len() || !self.states.load()[i].healthy {
            return;
        }
        lock(&self.failures)[i] = self.health.failures_to_ban.max(1);
        lock(&self.latest)[i] = Some(Err(format!("data path: {why}")));
        self.publish();
    }

    /// Recompute every node's state from the latest probe of each.
    fn publish(&self) {
        let _one_at_a_time = lock(&self.publishing);
        let latest = lock(&self.latest).clone();
        let failures = lock(&self.failures).clone();
        let old = self.states.load_full();
        let primary_lsn = latest
            .iter()
            .filter_map(|p| p.as_ref().and_then(|p| p.as_ref().ok()))
            .filter(|p| !p.in_recovery)
            .map(|p| p.lsn)
            .max();
        let timelines: Vec<Option<u32>> = latest
            .iter()
            .map(|p| {
                p.as_ref()
                    .and_then(|p| p.as_ref().ok())
                    .filter(|p| !p.in_recovery)
                    .map(|p| p.timeline)
            })
            .collect();
        let history = {
            let mut h = lock(&self.history);
            if let Some(plsn) = primary_lsn {
                if h.back().is_none_or(|(_, last)| plsn > *last) {
                    h.push_back((std::time::Instant::now(), plsn));
                    if h.len() > 4096 {
                        h.pop_front();
                    }
                }
            }
            h.clone()
        };
        let mut states = Vec::with_capacity(latest.len());
        for (i, probe) in latest.into_iter().enumerate() {
            let prev = &old[i];
            let state = match probe {
                None => prev.clone(),
                Some(Ok(p)) => {
                    if !prev.healthy {
                        tracing::info!(node = %self.nodes[i].name, in_recovery = p.in_recovery, "node is up");
                    }
                    let role = if p.in_recovery {
                        Role::Replica
                    } else {
                        Role::Primary
                    };
                    if role == Role::Primary
                        && self.configured[i] == NodeRole::Replica
                        && prev.role != Role::Primary
                    {
                        tracing::warn!(node = %self.nodes[i].name, "node configured as replica reports it is a primary");
                    }
                    let lag_bytes = match (role, primary_lsn) {
                        (Role::Replica, Some(plsn)) => plsn.saturating_sub(p.lsn),
                        _ => 0,
                    };
                    NodeState {
                        role,
                        healthy: true,
                        lag_ms: (role == Role::Replica)
                            .then(|| lag_ms(p.lsn, primary_lsn, &history)),
                        lag_bytes,
                        replay_lsn: p.lsn,
                        in_flight: 0,
                        idle: 0,
                        latency_us: 0,
                    }
                }
                Some(Err(e)) => {
                    let banned = failures[i] >= self.health.failures_to_ban.max(1);
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
        self.rebuild_view();
    }

    /// Publish a view of the current states; the per-statement counters
    /// are read through it from the pools when a router asks.
    fn rebuild_view(&self) {
        let view = ClusterView {
            generation: self.generation,
            nodes: self.nodes.clone(),
            states: self.states.load().as_ref().clone(),
            live: Some(Arc::new(Counts {
                pools: self.pools.clone(),
                latency_us: self.latency_us.clone(),
            })),
        };
        self.view.store(Arc::new(view));
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

    /// Probe every node forever, each on its own clock every
    /// `health.interval_ms`: one slow or dead node delays no other's state.
    /// Aborting the returned task stops them all.
    pub fn spawn_health(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut probes = tokio::task::JoinSet::new();
            for i in 0..me.nodes.len() {
                let me = me.clone();
                probes.spawn(async move {
                    let mut tick =
                        tokio::time::interval(Duration::from_millis(me.health.interval_ms));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        me.probe_node(i).await;
                    }
                });
            }
            while probes.join_next().await.is_some() {}
        })
    }

    /// The view the router uses: probed states, with the pools' live
    /// counters behind it. One shared view per health update, not one per
    /// statement.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.load_full()
    }

    /// Fold one exchange's duration into `node`'s latency average (weight
    /// 1/8 for the new sample).
    pub fn observe_latency(&self, node: NodeId, took: Duration) {
        use std::sync::atomic::Ordering;
        let Some(avg) = self.latency_us.get(node as usize) else {
            return;
        };
        if let Some(m) = self.metrics.get(node as usize) {
            m.exchange.observe(took.as_secs_f64());
        }
        let sample = took.as_micros().min(u128::from(u32::MAX)) as u32;
        let _ = avg.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 {
                sample.max(1)
            } else {
                ((u64::from(old) * 7 + u64::from(sample)) / 8).max(1) as u32
            })
        });
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

/// A replica's time lag: how long ago the primary first stood beyond the
/// position the replica has replayed, i.e. the age of the oldest write it
/// has not replayed (to within one probe interval); 0 when caught up. Not
/// "time since the last replayed commit", which grows during quiet periods
/// on a replica that is fully caught up.
fn lag_ms(
    replayed: u64,
    primary: Option<u64>,
    history: &std::collections::VecDeque<(std::time::Instant, u64)>,
) -> u32 {
    match primary {
        Some(p) if replayed < p => history
            .iter()
            .find(|(_, lsn)| *lsn > replayed)
            .map(|(t, _)| t.elapsed().as_millis().min(u128::from(u32::MAX)) as u32)
            .unwrap_or(0),
        _ => 0,
    }
}
