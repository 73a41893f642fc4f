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
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

/// Label pairs of one row.
pub type Labels = Vec<(&'static str, String)>;

/// A histogram per label set, with [`seconds_buckets`].
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// 20 µs to ~1.3 s, doubling: a loopback exchange to a slow query.
pub fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_02, 2.0, 17))
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
}
