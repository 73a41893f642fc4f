//! Helpers that make common routing choices one-liners.
//!
//! They are iterator adaptors over `&Backend`, so they compose:
//!
//! ```
//! # use signalbox_policy::prelude::*;
//! # let backends = Backends::new(vec![Backend::primary(0, "p"), Backend::replica(1, "r1")]);
//! let pick = backends
//!     .healthy_replicas()
//!     .max_lag_ms(200)
//!     .replayed_last_write()
//!     .least_outstanding();
//! let decision = Decision::replica_or_primary(pick);
//! ```

use crate::types::Backend;

/// Selection helpers on any iterator of backends.
pub trait BackendIterExt<'a>: Iterator<Item = &'a Backend> + Sized {
    /// Only healthy nodes.
    fn healthy(self) -> impl Iterator<Item = &'a Backend> {
        self.filter(|b| b.healthy)
    }

    /// Only nodes whose replay lag is known and at most `max` milliseconds.
    fn max_lag_ms(self, max: u32) -> impl Iterator<Item = &'a Backend> {
        self.filter(move |b| b.lag_ms.is_some_and(|lag| lag <= max))
    }

    /// Only nodes at most `max` bytes of WAL behind the primary.
    fn max_lag_bytes(self, max: u64) -> impl Iterator<Item = &'a Backend> {
        self.filter(move |b| b.lag_bytes <= max)
    }

    /// Only nodes that have replayed this session scope's last write.
    fn replayed_last_write(self) -> impl Iterator<Item = &'a Backend> {
        self.filter(|b| b.replayed_last_write)
    }

    /// Only nodes tagged `key=value` (key case-insensitive, value exact).
    fn tagged(self, key: &'a str, value: &'a str) -> impl Iterator<Item = &'a Backend> {
        self.filter(move |b| b.tag(key) == Some(value))
    }

    /// The node with the fewest in-flight statements per unit of weight
    /// (ties: lowest latency, then lowest id).
    fn least_outstanding(self) -> Option<&'a Backend> {
        self.filter(|b| b.weight() > 0).min_by(|a, b| {
            // Compare in_flight/weight without floats: a.f * b.w vs b.f * a.w.
            let left = u64::from(a.in_flight) * u64::from(b.weight());
            let right = u64::from(b.in_flight) * u64::from(a.weight());
            left.cmp(&right)
                .then(a.latency_us.cmp(&b.latency_us))
                .then(a.id.cmp(&b.id))
        })
    }

    /// A random node, proportional to weight, using `random` (e.g. `host::random()`).
    fn weighted_pick(self, random: u64) -> Option<&'a Backend> {
        let candidates: Vec<&Backend> = self.filter(|b| b.weight() > 0).collect();
        let total: u64 = candidates.iter().map(|b| u64::from(b.weight())).sum();
        if total == 0 {
            return None;
        }
        let mut point = random % total;
        for b in candidates {
            let w = u64::from(b.weight());
            if point < w {
                return Some(b);
            }
            point -= w;
        }
        None
    }

    /// Consistent (rendezvous) hashing: the same `key` maps to the same node as
    /// long as that node is a candidate, and removing a node only moves the keys
    /// that were on it. Weights are honoured.
    fn consistent_hash(self, key: &str) -> Option<&'a Backend> {
        rendezvous(self, stable_hash(key.as_bytes()))
    }

    /// Session affinity: the node this client session keeps using while
    /// it stays a candidate (rendezvous hashing on the session id, so
    /// sessions spread by weight and a node leaving moves only its own).
    /// Each client then reuses the same warm server connections and
    /// caches instead of rotating over every node.
    fn sticky(self, session: &crate::Session) -> Option<&'a Backend> {
        rendezvous(self, mix(session.id ^ 0x5bd1_e995_0000_0000))
    }
}

impl<'a, I: Iterator<Item = &'a Backend>> BackendIterExt<'a> for I {}

/// The candidate with the highest weighted rendezvous score for `key_hash`
/// (on a tie, the later one).
fn rendezvous<'a>(
    candidates: impl Iterator<Item = &'a Backend>,
    key_hash: u64,
) -> Option<&'a Backend> {
    let mut best: Option<(Draw, &'a Backend)> = None;
    for b in candidates.filter(|b| b.weight() > 0) {
        let mut draw = Draw::new(key_hash, b);
        let wins = match best.as_mut() {
            None => true,
            Some((top, _)) => draw.cmp(top) != std::cmp::Ordering::Less,
        };
        if wins {
            best = Some((draw, b));
        }
    }
    best.map(|(_, b)| b)
}

/// A node's draw for one key: a point `unit` in (0, 1) and the node's weight.
/// Its weighted rendezvous score is `-weight / ln(unit)`.
struct Draw {
    unit: f64,
    weight: u32,
    score: Option<f64>,
}

impl Draw {
    fn new(key_hash: u64, backend: &Backend) -> Self {
        let h = mix(key_hash ^ backend.name_hash);
        Self {
            unit: ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64,
            weight: backend.weight(),
            score: None,
        }
    }

    /// Order by score. The score grows with `unit` for a given weight, so
    /// draws of equal weight (the common case) compare their points: the
    /// logarithm, which a policy pays in software in wasm, is taken only
    /// between different weights, and at most once per draw.
    fn cmp(&mut self, other: &mut Self) -> std::cmp::Ordering {
        if self.weight == other.weight {
            self.point().total_cmp(&other.point())
        } else {
            self.score().total_cmp(&other.score())
        }
    }

    /// `unit`, ordered as the score orders it: a point rounded up to 1.0
    /// scores `-w / 0 = -inf`, the lowest.
    fn point(&self) -> f64 {
        if self.unit < 1.0 {
            self.unit
        } else {
            f64::NEG_INFINITY
        }
    }

    fn score(&mut self) -> f64 {
        let (weight, unit) = (self.weight, self.unit);
        *self
            .score
            .get_or_insert_with(|| -f64::from(weight) / unit.ln())
    }
}

/// A stable 64-bit hash (FNV-1a, finalised), identical natively and in wasm and
/// across releases — unlike `std`'s hasher, which may change.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Backends;

    fn cluster() -> Backends {
        Backends::new(vec![
            Backend::primary(0, "p"),
            Backend::replica(1, "r1").with_lag_ms(10).with_in_flight(3),
            Backend::replica(2, "r2").with_lag_ms(500).with_in_flight(0),
            Backend::replica(3, "r3")
                .with_lag_ms(20)
                .with_in_flight(1)
                .with_tag("zone", "b"),
            Backend::replica(4, "r4").unhealthy(),
        ])
    }

    #[test]
    fn filters_compose() {
        let b = cluster();
        let ids: Vec<u32> = b.healthy_replicas().max_lag_ms(100).map(|b| b.id).collect();
        assert_eq!(ids, vec![1, 3]);
        let pick = b.healthy_replicas().max_lag_ms(100).least_outstanding();
        assert_eq!(pick.map(|b| b.id), Some(3));
        let zone = b.healthy_replicas().tagged("zone", "b").next();
        assert_eq!(zone.map(|b| b.id), Some(3));
    }

    #[test]
    fn least_outstanding_honours_weight() {
        let b = Backends::new(vec![
            Backend::replica(1, "a").with_in_flight(2),
            Backend::replica(2, "b").with_in_flight(3).with_weight(4),
        ]);
        // 3/4 < 2/1
        assert_eq!(b.iter().least_outstanding().map(|b| b.id), Some(2));
    }

    #[test]
    fn weighted_pick_is_proportional() {
        let b = Backends::new(vec![
            Backend::replica(1, "a").with_weight(1),
            Backend::replica(2, "b").with_weight(3),
        ]);
        let mut counts = [0u32; 3];
        for r in 0..4000u64 {
            let id = b.iter().weighted_pick(r).map(|b| b.id).unwrap_or(0);
            counts[id as usize] += 1;
        }
        assert_eq!(counts, [0, 1000, 3000]);
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_only_removed_keys() {
        let all = cluster();
        let keys: Vec<String> = (0..300).map(|i| format!("tenant-{i}")).collect();
        let before: Vec<u32> = keys
            .iter()
            .map(|k| {
                all.healthy_replicas()
                    .consistent_hash(k)
                    .map(|b| b.id)
                    .unwrap_or(0)
            })
            .collect();
        // Every healthy replica gets some keys.
        for id in [1, 2, 3] {
            assert!(before.contains(&id), "replica {id} got no key");
        }
        // Dropping r2 moves only r2's keys.
        for (k, was) in keys.iter().zip(&before) {
            let now = all
                .healthy_replicas()
                .filter(|b| b.id != 2)
                .consistent_hash(k)
                .map(|b| b.id)
                .unwrap_or(0);
            if *was != 2 {
                assert_eq!(now, *was, "key {k} moved although its node stayed");
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    /// The placement rule as first released, written out on its own: the
    /// node with the highest `-w / ln(u)`, the later one on a tie.
    fn reference(nodes: &Backends, key_hash: u64) -> Option<u32> {
        nodes
            .iter()
            .filter(|b| b.weight() > 0)
            .map(|b| {
                let h = mix(key_hash ^ stable_hash(b.name().as_bytes()));
                let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                (-f64::from(b.weight()) / unit.ln(), b.id)
            })
            .max_by(|x, y| x.0.total_cmp(&y.0))
            .map(|(_, id)| id)
    }

    #[test]
    fn placement_is_the_highest_weighted_score() {
        // Equal weights skip the logarithm; the pick must still be the one
        // the score names, with equal and with mixed weights.
        for weights in [[1, 1, 1, 1], [2, 2, 2, 2], [1, 3, 1, 2], [5, 1, 1, 5]] {
            let b = Backends::new(
                (1..=4)
                    .map(|i| {
                        Backend::replica(i, &format!("r{i}")).with_weight(weights[i as usize - 1])
                    })
                    .collect(),
            );
            for k in 0..2000u64 {
                let key = mix(k);
                let pick = rendezvous(b.iter(), key).map(|n| n.id);
                assert_eq!(pick, reference(&b, key), "{weights:?} {k}");
            }
        }
        // A session whose draw on replica-1 rounds up to exactly 1.0: its
        // score is -inf, so replica-2 wins although its point is lower.
        let b = crate::testing::cluster();
        let id = 7_083_681_630_133_794_235;
        let pick = b.healthy_replicas().sticky(&crate::Session::new(id));
        assert_eq!(pick.map(|n| n.id), Some(2));
        assert_eq!(reference(&b, mix(id ^ 0x5bd1_e995_0000_0000)), Some(2));
    }

    /// Computed by the release before equal weights skipped the logarithm.
    const PINNED_KEYS: [u32; 12] = [2, 2, 1, 2, 2, 2, 2, 1, 2, 2, 1, 2];
    const PINNED_SESSIONS: [u32; 12] = [1, 2, 1, 2, 1, 1, 1, 2, 1, 2, 2, 2];

    #[test]
    fn placements_are_pinned() {
        // Where keys and sessions land on the testing cluster. A change here
        // moves tenants and sessions between replicas on upgrade.
        let b = crate::testing::cluster();
        let keys: Vec<u32> = (0..12)
            .map(|i| {
                b.healthy_replicas()
                    .consistent_hash(&format!("tenant-{i}"))
                    .map_or(0, |n| n.id)
            })
            .collect();
        let sessions: Vec<u32> = (1..=12)
            .map(|id| {
                b.healthy_replicas()
                    .sticky(&crate::Session::new(id))
                    .map_or(0, |n| n.id)
            })
            .collect();
        assert_eq!(keys, PINNED_KEYS);
        assert_eq!(sessions, PINNED_SESSIONS);
    }

    #[test]
    fn stable_hash_is_fixed() {
        // Pinned so that a change to the hash (which would reshuffle every
        // tenant's placement) cannot slip in unnoticed.
        assert_eq!(stable_hash(b"tenant-42"), stable_hash(b"tenant-42"));
        assert_ne!(stable_hash(b"tenant-42"), stable_hash(b"tenant-43"));
        assert_eq!(stable_hash(b""), mix(0xcbf2_9ce4_8422_2325));
    }

    #[test]
    fn sticky_keeps_a_session_and_spreads_sessions() {
        let b = Backends::new(vec![
            Backend::replica(1, "a"),
            Backend::replica(2, "b"),
            Backend::replica(3, "c"),
        ]);
        let mut counts = [0u32; 4];
        for id in 0..3000u64 {
            let s = crate::Session::new(id);
            let first = b.iter().sticky(&s).map(|b| b.id).unwrap();
            for _ in 0..3 {
                assert_eq!(b.iter().sticky(&s).map(|b| b.id), Some(first));
            }
            counts[first as usize] += 1;
        }
        // Roughly a third each.
        assert!(
            counts[1..].iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        // A node leaving moves only its own sessions.
        for id in 0..300u64 {
            let s = crate::Session::new(id);
            let was = b.iter().sticky(&s).map(|b| b.id).unwrap();
            let now = b
                .iter()
                .filter(|b| b.id != 3)
                .sticky(&s)
                .map(|b| b.id)
                .unwrap();
            if was != 3 {
                assert_eq!(now, was);
            }
        }
    }
}
