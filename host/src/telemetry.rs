//! Telemetry: one Prometheus registry (`prometheus-client`) for the whole
//! process. Each part registers its own families when the server starts —
//! the data path its counters and the exchange-time histogram, the router
//! its decisions and the policy-call histogram, the cluster its node
//! gauges and the checkout-wait histogram — and `/metrics` only encodes
//! the registry. The encoder escapes label values; the one label fed by
//! policies (`reason`) is bounded where it is counted.
//!
//! Values that already live elsewhere (pool counts, probe results, policy
//! journals) are read at scrape time by small collectors built with
//! [`Rows`], instead of being copied into metrics on every change.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::encoding::{MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
pub use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Label pairs of one row.
pub type Labels = Vec<(&'static str, String)>;

/// A histogram per label set, with [`seconds_buckets`].
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// 20 µs to ~1.3 s, doubling: a loopback exchange to a slow query.
pub fn seconds_buckets() -> Histogram {
    Histogram::default()
}

/// Upper bound of the first bucket, in nanoseconds; each next one doubles.
const FIRST_BUCKET_NS: u64 = 20_000;
/// Finite buckets (20 µs · 2¹⁶ ≈ 1.3 s), plus one for +Inf.
const BUCKETS: usize = 17;

/// A seconds histogram observed on every statement by every worker: one
/// atomic counter per bucket and the sum in whole nanoseconds, so an
/// observation takes no lock (prometheus-client's own histogram locks a
/// mutex per observation, a lock all workers share).
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug, Default)]
struct HistogramInner {
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let ns = (seconds.max(0.0) * 1e9) as u64;
        self.inner.counts[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far (for tests and status pages).
    pub fn count(&self) -> u64 {
        self.inner
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// The bucket of an observation: the first whose upper bound holds it.
fn bucket_of(ns: u64) -> usize {
    if ns <= FIRST_BUCKET_NS {
        return 0;
    }
    // ceil(log2(ns / first)), found with integer arithmetic.
    let ratio = ns.div_ceil(FIRST_BUCKET_NS);
    let bucket = (u64::BITS - (ratio - 1).leading_zeros()) as usize;
    bucket.min(BUCKETS)
}

fn bucket_bound(i: usize) -> f64 {
    if i >= BUCKETS {
        f64::INFINITY
    } else {
        (FIRST_BUCKET_NS << i) as f64 / 1e9
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let buckets: Vec<(f64, u64)> = (0..=BUCKETS)
            .map(|i| {
                (
                    bucket_bound(i),
                    self.inner.counts[i].load(Ordering::Relaxed),
                )
            })
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub fn histograms() -> Histograms {
    Family::new_with_constructor(seconds_buckets)
}

/// The registry's text, in the Prometheus exposition format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Writes families read at scrape time. Counter names are given without
/// `_total` (the encoder adds it).
pub struct Rows<'a, 'b> {
    encoder: &'a mut DescriptorEncoder<'b>,
}

impl<'a, 'b> Rows<'a, 'b> {
    pub fn new(encoder: &'a mut DescriptorEncoder<'b>) -> Self {
        Self { encoder }
    }

    pub fn counter(&mut self, name: &str, help: &str, rows: Vec<(Labels, u64)>) -> fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    pub fn gauge(&mut self, name: &str, help: &str, rows: Vec<(Labels, i64)>) -> fmt::Result {
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in rows {
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A single unlabelled row.
pub fn one<T>(v: T) -> Vec<(Labels, T)> {
    vec![(Vec::new(), v)]
}

/// One row per value of a single label.
pub fn by<T>(label: &'static str, rows: impl IntoIterator<Item = (String, T)>) -> Vec<(Labels, T)> {
    rows.into_iter()
        .map(|(k, v)| (vec![(label, k)], v))
        .collect()
}

/// A `node` label set.
pub fn node(name: &str) -> Labels {
    vec![("node", name.to_owned())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Odd;

    impl prometheus_client::collector::Collector for Odd {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            Rows::new(&mut encoder).gauge("t_up", "Up.", vec![(node("a\"b\\c\nd"), 1)])
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut r = Registry::default();
        r.register_collector(Box::new(Odd));
        let text = encode(&r);
        assert!(text.contains(r#"t_up{node="a\"b\\c\nd"} 1"#), "{text}");
    }
    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(20_000), 0);
        assert_eq!(bucket_of(20_001), 1);
        assert_eq!(bucket_of(40_000), 1);
        assert_eq!(bucket_of(40_001), 2);
        assert_eq!(bucket_of(20_000 << 16), 16);
        assert_eq!(bucket_of((20_000 << 16) + 1), BUCKETS);
        assert_eq!(bucket_of(u64::MAX), BUCKETS);
        for i in 0..BUCKETS {
            let ns = FIRST_BUCKET_NS << i;
            assert!(bucket_bound(bucket_of(ns)) * 1e9 >= ns as f64 - 0.5);
        }
    }

    #[test]
    fn a_histogram_encodes_cumulative_buckets_sum_and_count() {
        let h = Histogram::default();
        let mut r = Registry::default();
        r.register("t_wait_seconds", "Wait.", h.clone());
        for s in [0.000_01, 0.000_03, 0.5, 3.0] {
            h.observe(s);
        }
        let text = encode(&r);
        for line in [
            "# TYPE t_wait_seconds histogram",
            "t_wait_seconds_count 4",
            "t_wait_seconds_bucket{le=\"2e-05\"} 1",
            "t_wait_seconds_bucket{le=\"4e-05\"} 2",
            "t_wait_seconds_bucket{le=\"1.31072\"} 3",
            "t_wait_seconds_bucket{le=\"+Inf\"} 4",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("t_wait_seconds_sum "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((sum - 3.50004).abs() < 1e-6, "{sum}");
        assert_eq!(h.count(), 4);
    }
}
