//! What each retention holds, per table: rows kept, the age of the oldest thing kept, the window
//! declared, and what expiry removed. Invariant: these families move only here, labelled by table
//! name (a fixed, small set), never by ids.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// orderflow_processed, orderflow_processed_legacy, orderflow_intake, orderflow_order_status
    pub table: String,
}

struct Families {
    rows: Family<TableLabels, Gauge>,
    oldest_age_seconds: Family<TableLabels, Gauge<f64, AtomicU64>>,
    window_seconds: Family<TableLabels, Gauge<f64, AtomicU64>>,
    expired_rows: Family<TableLabels, Counter>,
    partitions_dropped: Family<TableLabels, Counter>,
}

fn families() -> &'static Families {
    static FAMILIES: OnceLock<Families> = OnceLock::new();
    FAMILIES.get_or_init(|| Families {
        rows: Family::default(),
        oldest_age_seconds: Family::default(),
        window_seconds: Family::default(),
        expired_rows: Family::default(),
        partitions_dropped: Family::default(),
    })
}

/// Adds the families to the exported registry (called once, by `metrics`).
pub(super) fn register(r: &mut Registry) {
    let f = families();
    r.register(
        "retention_rows",
        "Rows a retained table holds (PostgreSQL's live-tuple statistics, not a count)",
        f.rows.clone(),
    );
    r.register(
        "retention_oldest_age_seconds",
        "Age of the oldest data a retained table can still hold (for partitions: the oldest one's start)",
        f.oldest_age_seconds.clone(),
    );
    r.register(
        "retention_window_seconds",
        "How long a retained table keeps what it holds, as declared",
        f.window_seconds.clone(),
    );
    r.register(
        "retention_expired_rows",
        "Rows removed by expiry (for dropped partitions: their row statistics)",
        f.expired_rows.clone(),
    );
    r.register(
        "retention_partitions_dropped",
        "Whole partitions (or a whole legacy table) dropped by expiry",
        f.partitions_dropped.clone(),
    );
}

fn labels(table: &str) -> TableLabels {
    TableLabels {
        table: table.to_string(),
    }
}

/// What one table holds now; `oldest_age_seconds` is None when it holds nothing (or it is unknown).
pub fn held(table: &str, window_seconds: f64, rows: i64, oldest_age_seconds: Option<f64>) {
    let f = families();
    f.rows.get_or_create(&labels(table)).set(rows.max(0));
    f.window_seconds
        .get_or_create(&labels(table))
        .set(window_seconds);
    f.oldest_age_seconds
        .get_or_create(&labels(table))
        .set(oldest_age_seconds.unwrap_or(0.0).max(0.0));
}

/// Expiry removed `rows` rows of `table`, in `partitions` whole partitions (0 for batched deletes).
pub fn expired(table: &str, rows: u64, partitions: u64) {
    let f = families();
    f.expired_rows.get_or_create(&labels(table)).inc_by(rows);
    f.partitions_dropped
        .get_or_create(&labels(table))
        .inc_by(partitions);
}
