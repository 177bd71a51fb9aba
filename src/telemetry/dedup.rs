//! How long the dedup store takes to answer: `orderflow_dedup_seen_seconds`, from a `seen` call
//! to its answer (the wait for a batch and a connection included: what a record waits). Invariant:
//! the family moves only here, with no label (one store per process, shared by its pipelines).

use std::sync::OnceLock;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

fn seen_seconds() -> &'static Histogram {
    static SEEN: OnceLock<Histogram> = OnceLock::new();
    // 0.25 ms to about 4 s, doubling.
    SEEN.get_or_init(|| Histogram::new(exponential_buckets(0.000_25, 2.0, 15)))
}

/// Adds the family to the exported registry (called once, by `metrics`).
pub(super) fn register(r: &mut Registry) {
    r.register(
        "dedup_seen_seconds",
        "From a dedup `seen` call to its answer (batching and the connection wait included)",
        seen_seconds().clone(),
    );
}

/// One `seen` call answered (or failed) after `seconds`.
pub fn seen(seconds: f64) {
    seen_seconds().observe(seconds);
}
