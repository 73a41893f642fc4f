//! Pools of authenticated backend connections, one per (node, user,
//! database), on `deadpool`: checkout with a timeout, size limits, recycling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult, Timeouts};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::backend::{BackendConn, BackendError, LoginSpec};
use crate::route::NodeId;

/// What happened to one node's backend connections (metrics).
#[derive(Clone, Debug, Default)]
pub struct ConnEvents {
    pub opened: Counter,
    pub connect_failed: Counter,
    /// Found closed or not idle when about to be reused.
    pub broken: Counter,
    /// Closed for idle time or age.
    pub expired: Counter,
    /// Closed when given back (not provably idle, or failed mid-exchange).
    pub discarded: Counter,
    /// Closed because a config reload retired its pool.
    pub retired: Counter,
}

impl ConnEvents {
    /// The counters of `node` in `family` (labels `node`, `event`).
    pub fn of(family: &Family<crate::telemetry::Labels, Counter>, node: &str) -> Self {
        let get = |event: &str| {
            family.get_or_create_owned(&vec![
                ("node", node.to_owned()),
                ("event", event.to_owned()),
            ])
        };
        Self {
            opened: get("opened"),
            connect_failed: get("connect_failed"),
            broken: get("broken"),
            expired: get("expired"),
            discarded: get("discarded"),
            retired: get("retired"),
        }
    }
}

pub struct Manager {
    node: NodeId,
    events: ConnEvents,
    spec: LoginSpec,
    idle_timeout: Duration,
    max_lifetime: Duration,
}

impl managed::Manager for Manager {
    type Type = BackendConn;
    type Error = BackendError;

    async fn create(&self) -> Result<BackendConn, BackendError> {
        // Boxed: connecting (TLS, authentication) is a large future, and
        // it would otherwise sit inside every checkout's.
        let conn = Box::pin(BackendConn::connect(self.node, &self.spec)).await;
        match &conn {
            Ok(_) => self.events.opened.inc(),
            Err(_) => self.events.connect_failed.inc(),
        };
        conn
    }

    async fn recycle(
        &self,
        conn: &mut BackendConn,
        metrics: &Metrics,
    ) -> RecycleResult<BackendError> {
        // No round trip: a non-blocking look at the socket catches a server
        // that closed the connection (restart, pg_terminate_backend, dropped
        // database) before a client is handed a dead connection.
        if !conn.still_usable() {
            self.events.broken.inc();
            return Err(RecycleError::message(
                "connection is not idle or was closed",
            ));
        }
        if metrics.last_used() > self.idle_timeout || conn.age() > self.max_lifetime {
            self.events.expired.inc();
        }
        if metrics.last_used() > self.idle_timeout {
            return Err(RecycleError::message("idle too long"));
        }
        if conn.age() > self.max_lifetime {
            return Err(RecycleError::message("reached its maximum lifetime"));
        }
        Ok(())
    }
}

pub type Pool = managed::Pool<Manager>;
pub type Pooled = Object<Manager>;

/// Why no connection could be checked out.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no connection to node {node} became free within {waited_ms} ms (pool size {size})")]
    Exhausted {
        node: String,
        waited_ms: u64,
        size: usize,
    },
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("pool for node {0} is closed")]
    Closed(String),
}

impl CheckoutError {
    /// The node did not accept a connection at all (refused, timed out):
    /// it is down, as far as anyone can tell.
    pub fn node_unreachable(&self) -> bool {
        matches!(
            self,
            CheckoutError::Backend(BackendError::Connect { .. })
                | CheckoutError::Backend(BackendError::ConnectTimeout { .. })
        )
    }

    pub fn sqlstate(&self) -> &str {
        match self {
            // too_many_connections
            CheckoutError::Exhausted { .. } => "53300",
            CheckoutError::Backend(e) => e.sqlstate(),
            CheckoutError::Closed(_) => "08006",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub size: usize,
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
}

/// Where and how to log in to one node.
#[derive(Clone, Debug)]
pub struct NodeLogin {
    pub name: String,
    pub addr: String,
    pub tls: Option<crate::tls::NodeTls>,
    pub events: ConnEvents,
}

/// All data-path pools, plus live per-node counters the router reads.
pub struct Pools {
    nodes: Vec<NodeLogin>,
    settings: PoolSettings,
    pools: Mutex<HashMap<(NodeId, String, String), Pool>>,
    /// Every pool by node, replaced when one is added (rare): counting idle
    /// connections for each statement reads this without the map's lock.
    listed: arc_swap::ArcSwap<Vec<(NodeId, Pool)>>,
    in_flight: Arc<[AtomicU32]>,
    /// Closed by a config reload: a pool asked for afterwards is born
    /// closed (set under the map's lock, so none slips in between).
    retired: std::sync::atomic::AtomicBool,
}

impl Pools {
    pub fn new(nodes: Vec<NodeLogin>, settings: PoolSettings) -> Self {
        let in_flight: Arc<[AtomicU32]> = nodes.iter().map(|_| AtomicU32::new(0)).collect();
        Self {
            nodes,
            settings,
            pools: Mutex::default(),
            listed: arc_swap::ArcSwap::from_pointee(Vec::new()),
            in_flight,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The pool for (node, user, database), created on first use. Sessions
    /// keep the handle so later checkouts skip this lookup.
    pub fn pool(&self, node: NodeId, user: &str, password: Option<&str>, database: &str) -> Pool {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node, user.to_owned(), database.to_owned());
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let login = &self.nodes[node as usize];
        let manager = Manager {
            node,
            events: login.events.clone(),
            spec: LoginSpec {
                node_name: login.name.clone(),
                addr: login.addr.clone(),
                user: user.to_owned(),
                password: password.map(str::to_owned),
                database: database.to_owned(),
                connect_timeout: self.settings.connect_timeout,
                tls: login.tls.clone(),
            },
            idle_timeout: self.settings.idle_timeout,
            max_lifetime: self.settings.max_lifetime,
        };
        let pool = Pool::builder(manager)
            .max_size(self.settings.size)
            // The most recently released connection first: one client
            // running one statement at a time stays on one warm connection,
            // and surplus connections age out by the idle timeout.
            .queue_mode(managed::QueueMode::Lifo)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime and a positive size always builds");
        if self.retired.load(Ordering::Relaxed) {
            // A session still on the replaced configuration: it gets no
            // connection here and goes to the current one.
            pool.close();
            return pool;
        }
        pools.insert(key, pool.clone());
        let mut listed: Vec<(NodeId, Pool)> = self.listed.load().as_ref().clone();
        listed.push((node, pool.clone()));
        self.listed.store(Arc::new(listed));
        pool
    }

    /// A connection to `node` as `user` on `database`, waiting at most the
    /// checkout timeout.
    pub async fn checkout(
        &self,
        node: NodeId,
        user: &str,
        password: Option<&str>,
        database: &str,
    ) -> Result<Lease, CheckoutError> {
        let pool = self.pool(node, user, password, database);
        self.checkout_from(&pool, node).await
    }

    /// A connection from `pool` (of `node`), waiting at most the checkout timeout.
    pub async fn checkout_from(&self, pool: &Pool, node: NodeId) -> Result<Lease, CheckoutError> {
        let timeouts = Timeouts {
            wait: Some(self.settings.checkout_timeout),
            create: Some(self.settings.connect_timeout),
            recycle: Some(Duration::from_secs(1)),
        };
        let name = || self.nodes[node as usize].name.clone();
        match pool.timeout_get(&timeouts).await {
            Ok(conn) => {
                self.in_flight[node as usize].fetch_add(1, Ordering::Relaxed);
                Ok(Lease {
                    conn: Some(conn),
                    counters: self.in_flight.clone(),
                    discarded: self.nodes[node as usize].events.discarded.clone(),
                    node,
                    discard: false,
                })
            }
            Err(PoolError::Timeout(managed::TimeoutType::Wait)) => Err(CheckoutError::Exhausted {
                node: name(),
                waited_ms: self.settings.checkout_timeout.as_millis() as u64,
                size: self.settings.size,
            }),
            Err(PoolError::Backend(e)) => Err(e.into()),
            Err(PoolError::Timeout(_)) => {
                Err(CheckoutError::Backend(BackendError::ConnectTimeout {
                    node: name(),
                    addr: self.nodes[node as usize].addr.clone(),
                }))
            }
            Err(PoolError::Closed) => Err(CheckoutError::Closed(name())),
            Err(e) => Err(CheckoutError::Backend(BackendError::Protocol {
                node: name(),
                detail: e.to_string(),
            })),
        }
    }

    pub fn in_flight(&self, node: NodeId) -> u32 {
        self.in_flight[node as usize].load(Ordering::Relaxed)
    }

    /// Idle connections per node.
    pub fn idle(&self) -> Vec<u32> {
        let mut idle = vec![0u32; self.nodes.len()];
        self.add_idle(&mut idle);
        idle
    }

    /// [`Self::idle`] added into a slice (indexed by node).
    pub fn add_idle(&self, idle: &mut [u32]) {
        for (node, p) in self.listed.load().iter() {
            if let Some(slot) = idle.get_mut(*node as usize) {
                *slot += p.status().available as u32;
            }
        }
    }

    /// Close every pool: idle connections now, checked-out ones when they
    /// come back, and no new checkouts (a config reload replaced them).
    pub fn close(&self) {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        self.retired.store(true, Ordering::Relaxed);
        for ((node, _, _), p) in pools.iter() {
            // Idle ones close now, checked-out ones when they come back.
            let open = p.status().size as u64;
            if let Some(login) = self.nodes.get(*node as usize) {
                login.events.retired.inc_by(open);
            }
            p.close();
        }
    }

    /// Close idle connections to `database` (so `DROP DATABASE` is not
    /// blocked by our pool) and to a node that went down.
    pub fn drop_idle(&self, filter: impl Fn(NodeId, &str) -> bool) {
        let pools: Vec<Pool> = {
            let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            pools
                .iter()
                .filter(|((n, _, db), _)| filter(*n, db))
                .map(|(_, p)| p.clone())
                .collect()
        };
        for p in pools {
            p.retain(|_, _| false);
        }
    }

    pub fn node_name(&self, node: NodeId) -> &str {
        &self.nodes[node as usize].name
    }
}

/// A checked-out connection. Dropping the lease returns the connection to
/// its pool only when the connection proves it is idle (everything answered,
/// no transaction, no COPY); any other connection is closed, after a cancel
/// request if results may still be coming, so no later client can ever read
/// what was meant for this one.
pub struct Lease {
    conn: Option<Pooled>,
    counters: Arc<[AtomicU32]>,
    discarded: Counter,
    node: NodeId,
    discard: bool,
}

impl Lease {
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The backend's cancel key.
    pub fn key(&self) -> (i32, i32) {
        self.conn.as_ref().map(|c| c.key()).unwrap_or_default()
    }

    /// The backend's address.
    pub fn addr(&self) -> Arc<str> {
        self.conn
            .as_ref()
            .map(|c| c.addr().clone())
            .unwrap_or_else(|| Arc::from(""))
    }

    pub fn conn(&mut self) -> &mut BackendConn {
        self.conn
            .as_mut()
            .expect("lease holds a connection until dropped")
    }

    /// Close the connection instead of returning it to the pool.
    pub fn discard(mut self) {
        self.discard = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.counters[self.node as usize].fetch_sub(1, Ordering::Relaxed);
        let Some(c) = self.conn.take() else { return };
        if c.is_idle() && !self.discard {
            return; // back to the pool (recycle checks again)
        }
        let conn = Object::take(c);
        self.discarded.inc();
        if conn.is_busy() && !conn.is_broken() {
            let (addr, key) = (conn.addr().clone(), conn.key());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(super::cancel::send_until_stopped(addr, key));
            }
        }
        drop(conn);
    }
}

/// Shared handle.
pub type SharedPools = Arc<Pools>;
