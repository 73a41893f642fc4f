//! Routing: what the router knows when a statement arrives, and how a policy's
//! decision becomes the node that runs it.
//!
//! The flow per statement is: build a [`RouteInput`] (classified statement,
//! session, cluster view) → ask the policy ([`crate::policy`]) → pass its
//! decision through [`guardrails::enforce`], which guarantees correctness
//! whatever the policy said → run on the chosen node.

pub mod builtin;
pub mod guardrails;

use std::sync::Arc;

use serde::Serialize;
pub use signalbox_policy::{Role, StatementKind, Target, TxState};

/// Index of a node in the cluster view (also its id in the policy contract).
pub type NodeId = u32;

/// A statement as the classifier describes it.
#[derive(Clone, Debug)]
pub struct Statement {
    pub kind: StatementKind,
    /// Proven safe for a hot standby (see the classifier); false when unsure.
    pub read_only: bool,
    pub fingerprint: u64,
    pub sql: Arc<str>,
    /// Shared with the classification cache: routing a statement copies
    /// no strings.
    pub tables: Arc<[String]>,
    pub functions: Arc<[String]>,
    pub hints: Arc<[(String, String)]>,
}

impl Statement {
    /// Let go of the text and the names (shared, empty ones instead): for
    /// a statement slot kept between statements.
    pub fn forget(&mut self) {
        type Empty = (Arc<str>, Arc<[String]>, Arc<[(String, String)]>);
        static EMPTY: std::sync::LazyLock<Empty> =
            std::sync::LazyLock::new(|| (Arc::from(""), Arc::default(), Arc::default()));
        self.sql = EMPTY.0.clone();
        self.tables = EMPTY.1.clone();
        self.functions = EMPTY.1.clone();
        self.hints = EMPTY.2.clone();
    }

    pub fn new(kind: StatementKind, read_only: bool, sql: &str) -> Self {
        Self {
            kind,
            read_only,
            fingerprint: signalbox_policy::stable_hash(sql.as_bytes()),
            sql: Arc::from(sql),
            tables: Arc::default(),
            functions: Arc::default(),
            hints: Arc::default(),
        }
    }
}

/// The client session a statement belongs to.
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub client_addr: String,
    pub attributes: Vec<(String, String)>,
    pub tx_state: TxState,
    /// The current transaction (or the session's default) is read-only.
    pub read_only_tx: bool,
    pub ms_since_last_write: Option<u64>,
    /// WAL position of the last write of this session's scope.
    pub last_write_lsn: Option<u64>,
    /// The node the open transaction runs on.
    pub pinned: Option<NodeId>,
}

/// Static description of a node (changes only with configuration).
#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub weight: u32,
    pub tags: Vec<(String, String)>,
}

impl NodeInfo {
    pub fn new<'a>(
        name: &str,
        weight: u32,
        tags: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            weight,
            tags: tags
                .into_iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// Live state of a node, as the control plane last saw it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeState {
    pub role: Role,
    pub healthy: bool,
    pub lag_ms: Option<u32>,
    pub lag_bytes: u64,
    /// Last WAL position this node has replayed (or written, for the primary).
    pub replay_lsn: u64,
    pub in_flight: u32,
    pub idle: u32,
    pub latency_us: u32,
}

impl NodeState {
    pub fn up(role: Role) -> Self {
        Self {
            role,
            healthy: true,
            lag_ms: (role == Role::Replica).then_some(0),
            lag_bytes: 0,
            replay_lsn: 0,
            in_flight: 0,
            idle: 0,
            latency_us: 0,
        }
    }
}

/// A cluster generation no other view in this process has: every set of
/// node descriptions (the live cluster, each validation and fixture view)
/// takes its own, so a policy's per-generation cache can never serve one
/// cluster's nodes for another.
pub fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Clusters up to this size are described to a policy without allocating.
pub const STACK_NODES: usize = 16;

/// Counters that change with every statement (pool use, exchange times):
/// read from their source when asked, not copied into each view.
pub trait LiveCounts: Send + Sync + std::fmt::Debug {
    fn in_flight(&self, node: NodeId) -> u32;
    /// Add every node's idle connections to `idle` (indexed by node).
    fn add_idle(&self, idle: &mut [u32]);
    fn latency_us(&self, node: NodeId) -> u32;
}

/// The cluster as seen at one instant. Node ids index both vectors. The
/// service builds one view per health update and shares it by reference;
/// the per-statement counters come from `live` when present (else from
/// `states`, as in fixtures and tests).
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// Changes whenever `nodes` changes, and differs between any two sets
    /// of nodes ([`next_generation`]), so policies can cache by it.
    pub generation: u64,
    pub nodes: Arc<Vec<NodeInfo>>,
    pub states: Vec<NodeState>,
    pub live: Option<Arc<dyn LiveCounts>>,
}

impl ClusterView {
    /// A view whose counters are the ones in `states`.
    pub fn fixed(generation: u64, nodes: Arc<Vec<NodeInfo>>, states: Vec<NodeState>) -> Self {
        Self {
            generation,
            nodes,
            states,
            live: None,
        }
    }

    /// Backend connections of node `id` checked out now.
    pub fn in_flight(&self, id: NodeId) -> u32 {
        match &self.live {
            Some(l) => l.in_flight(id),
            None => self.state(id).map_or(0, |s| s.in_flight),
        }
    }

    /// Idle pooled connections of every node, into `idle` (indexed by
    /// node, zeroed first).
    pub fn idle_into(&self, idle: &mut [u32]) {
        idle.fill(0);
        match &self.live {
            Some(l) => l.add_idle(idle),
            None => {
                for (slot, s) in idle.iter_mut().zip(&self.states) {
                    *slot = s.idle;
                }
            }
        }
    }

    /// Moving average of node `id`'s exchange time.
    pub fn latency_us(&self, id: NodeId) -> u32 {
        match &self.live {
            Some(l) => l.latency_us(id),
            None => self.state(id).map_or(0, |s| s.latency_us),
        }
    }

    pub fn primary(&self) -> Option<NodeId> {
        self.states
            .iter()
            .position(|s| s.role == Role::Primary && s.healthy)
            .map(|i| i as NodeId)
    }

    pub fn state(&self, id: NodeId) -> Option<&NodeState> {
        self.states.get(id as usize)
    }

    pub fn node_name(&self, id: NodeId) -> &str {
        self.nodes
            .get(id as usize)
            .map(|n| n.name.as_str())
            .unwrap_or("?")
    }

    /// Every node's live state as the policy contract carries it.
    pub fn contract_states(&self, session: &Session) -> Vec<signalbox_policy::packed::State> {
        let mut states = Vec::with_capacity(self.states.len());
        self.each_contract_state(session, |s| states.push(s));
        states
    }

    /// [`Self::contract_states`] one by one, allocating nothing for the
    /// clusters of up to [`STACK_NODES`] nodes (a policy call asks for them
    /// on every statement).
    pub fn each_contract_state(
        &self,
        session: &Session,
        mut each: impl FnMut(signalbox_policy::packed::State),
    ) {
        let mut stack = [0u32; STACK_NODES];
        let mut heap = Vec::new();
        let idle = match stack.get_mut(..self.states.len()) {
            Some(idle) => idle,
            None => {
                heap.resize(self.states.len(), 0);
                &mut heap[..]
            }
        };
        self.idle_into(idle);
        for (i, s) in self.states.iter().enumerate() {
            let id = i as NodeId;
            each(signalbox_policy::packed::State {
                id,
                role: s.role,
                healthy: s.healthy,
                replayed_last_write: self.replayed(id, session),
                lag_ms: s.lag_ms,
                latency_us: self.latency_us(id),
                lag_bytes: s.lag_bytes,
                in_flight: self.in_flight(id),
                idle: idle[i],
            });
        }
    }

    /// Whether node `id` has replayed `session`'s last write.
    pub fn replayed(&self, id: NodeId, session: &Session) -> bool {
        match (self.state(id), session.last_write_lsn) {
            (_, None) => true,
            (Some(s), Some(lsn)) => s.role == Role::Primary || s.replay_lsn >= lsn,
            (None, Some(_)) => false,
        }
    }
}

/// Everything a routing decision reads, shared cheaply with the policy sandbox.
#[derive(Clone, Debug)]
pub struct RouteInput {
    pub statement: Arc<Statement>,
    pub session: Arc<Session>,
    pub cluster: Arc<ClusterView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live counters where node `n` has `10 * n` idle connections, spread
    /// over two pools each.
    #[derive(Debug)]
    struct Counted;

    impl LiveCounts for Counted {
        fn in_flight(&self, node: NodeId) -> u32 {
            node + 1
        }
        fn add_idle(&self, idle: &mut [u32]) {
            for _pool in 0..2 {
                for (n, slot) in idle.iter_mut().enumerate() {
                    *slot += 5 * n as u32;
                }
            }
        }
        fn latency_us(&self, node: NodeId) -> u32 {
            100 + node
        }
    }

    fn view(nodes: usize) -> ClusterView {
        let info = (0..nodes)
            .map(|i| NodeInfo::new(&format!("n{i}"), 1, []))
            .collect();
        let mut states = vec![NodeState::up(Role::Replica); nodes];
        states[0] = NodeState::up(Role::Primary);
        let mut v = ClusterView::fixed(1, Arc::new(info), states);
        v.live = Some(Arc::new(Counted));
        v
    }

    #[test]
    fn each_node_is_described_with_its_own_live_counts_at_any_cluster_size() {
        // Up to STACK_NODES the idle counts are gathered on the stack;
        // beyond, on the heap: both must describe every node.
        for nodes in [1, 3, STACK_NODES, STACK_NODES + 1, 40] {
            let states = view(nodes).contract_states(&Session::default());
            assert_eq!(states.len(), nodes);
            for (i, s) in states.iter().enumerate() {
                assert_eq!(s.id, i as NodeId);
                assert_eq!(s.idle, 10 * i as u32, "{nodes} nodes, node {i}");
                assert_eq!(s.in_flight, i as u32 + 1);
                assert_eq!(s.latency_us, 100 + i as u32);
            }
            assert_eq!(states[0].role, Role::Primary);
        }
    }
}
