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
        let key_hash = stable_hash(key.as_bytes());
        self.filter(|b| b.weight() > 0)
            .map(|b| (rendezvous_score(key_hash, b), b))
            .max_by(|(x, _), (y, _)| x.total_cmp(y))
            .map(|(_, b)| b)
    }

    /// Session affinity: the node this client session keeps using while
    /// it stays a candidate (rendezvous hashing on the session id, so
    /// sessions spread by weight and a node leaving moves only its own).
    /// Each client then reuses the same warm server connections and
    /// caches instead of rotating over every node.
    fn sticky(self, session: &crate::Session) -> Option<&'a Backend> {
        let key_hash = mix(session.id ^ 0x5bd1_e995_0000_0000);
        self.filter(|b| b.weight() > 0)
            .map(|b| (rendezvous_score(key_hash, b), b))
            .max_by(|(x, _), (y, _)| x.total_cmp(y))
            .map(|(_, b)| b)
    }
}

impl<'a, I: Iterator<Item = &'a Backend>> BackendIterExt<'a> for I {}

fn rendezvous_score(key_hash: u64, backend: &Backend) -> f64 {
    let h = mix(key_hash ^ stable_hash(backend.name().as_bytes()));
    // Map to (0, 1) and apply weighted rendezvous: score = -w / ln(u).
    let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(backend.weight()) / unit.ln()
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
