//! How long orderflow keeps what it remembers in PostgreSQL, and the expiry that keeps it so.
//! Invariant: the cost of each table follows its window, never its history, and expiry never
//! removes anything still in use: a dedup mark or an idempotency key younger than its window, or
//! an order of the read model that is not finished.
//!
//! - Dedup marks (`orderflow_processed`): range-partitioned by `processed_at` into buckets of a
//!   width fixed when the table is created and stored in `orderflow_retention` (a table keeps
//!   its stored width whatever later processes ask). Unless given, the width follows the window
//!   ([`bucket_for`]: a seventh of it, in whole seconds, between 1 s and 1 day: 7 d gives daily
//!   partitions, 1 min gives 8 s ones), so about eight partitions hold a window whatever its
//!   length. Expiry drops a whole partition once its upper bound is older than
//!   the window: never a row-by-row delete. `seen` ignores marks older than the window, so the
//!   window is exact even before the partition goes. A table of an earlier version (not
//!   partitioned) is renamed `orderflow_processed_legacy` once, read beside the new one, never
//!   written again, and dropped whole one window after the migration.
//! - Intake keys (`orderflow_intake`): a key older than its window is free again (the intake
//!   takes it as new) and is deleted in bounded batches by `received_at` (indexed).
//! - The read model (`orderflow_order_status`): a finished order (confirmed or cancelled) is kept
//!   for its window after it became final, then deleted in bounded batches; an order in flight is
//!   never deleted, whatever its age.
//!
//! Files: `dedup` (the partitioned dedup table), `rows` (batched deletes of intake keys and
//! finished orders), `measure` (the gauges); this file holds the settings and windows.
//!
//! Windows come from settings bounded to [`MIN_SETTING`]..=[`MAX_WINDOW`] (a refusal names the
//! setting); the library API accepts windows down to one second, for tests, and so do the
//! settings when [`SHORT_WINDOWS_SETTING`] is `1` (benchmarks only: the soak's 20 s window).

use std::time::Duration;

use std::future::Future;
use tokio_postgres::error::SqlState;

use tokio_postgres::Client;

use crate::telemetry::retention as metrics;

/// The dedup table (partitioned) and the table of an earlier version it replaced.
pub const DEDUP_TABLE: &str = "orderflow_processed";
pub const LEGACY_DEDUP_TABLE: &str = "orderflow_processed_legacy";
pub const INTAKE_TABLE: &str = "orderflow_intake";
pub const READ_MODEL_TABLE: &str = "orderflow_order_status";

/// The settings (environment variables; the `retention run` flags read the same ones).
pub const DEDUP_SETTING: &str = "ORDERFLOW_DEDUP_RETENTION";
pub const INTAKE_SETTING: &str = "ORDERFLOW_INTAKE_KEY_RETENTION";
pub const READ_MODEL_SETTING: &str = "ORDERFLOW_READ_MODEL_RETENTION";

pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 86_400);
pub const DEFAULT_INTAKE_WINDOW: Duration = Duration::from_secs(86_400);
pub const DEFAULT_READ_MODEL_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Width of a dedup partition of the default window (see [`bucket_for`]).
pub const DEFAULT_BUCKET: Duration = Duration::from_secs(86_400);
/// Partitions a window spans when the width follows it ([`bucket_for`]).
pub const BUCKETS_PER_WINDOW: u32 = 7;

/// Bounds of a window read from a setting.
pub const MIN_SETTING: Duration = Duration::from_secs(60);
pub const MAX_WINDOW: Duration = Duration::from_secs(365 * 86_400);
/// Bounds of a window or bucket given through the API (tests shorten them).
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
pub const MAX_BUCKET: Duration = Duration::from_secs(86_400);

/// Partitions created ahead of the current one (a mark that finds none creates its own anyway).
const AHEAD: i64 = 3;
/// Rows per delete statement, and statements per run at most (per table).
pub const DELETE_BATCH: i64 = 1_000;
pub const MAX_BATCHES: u32 = 100;
/// Serialises migrations and partition changes between processes.
const LOCK_KEY: i64 = 0x6f72_6465_7266_6c6f; // "orderflo"
/// Longest DDL waits for a table lock: the hot path queues behind a waiting DROP/CREATE.
const LOCK_TIMEOUT: &str = "1s";

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RetentionError(pub String);

/// Benchmarks only: `1` lets a window setting go down to [`MIN_WINDOW`] (one second) instead of
/// [`MIN_SETTING`], so a soak of a minute sees several windows pass. Nothing else changes: the
/// setting is read, the width derived and the table expired by the same code.
pub const SHORT_WINDOWS_SETTING: &str = "ORDERFLOW_BENCH_SHORT_WINDOWS";

/// Reads a window from a setting's text (`7d`, `24h`, `90min`), bounded.
pub fn parse_window(setting: &str, text: &str) -> Result<Duration, RetentionError> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        RetentionError(format!(
            "{setting}='{text}' is not a duration (e.g. 7d, 24h, 90min): {e}"
        ))
    })?;
    let short = std::env::var(SHORT_WINDOWS_SETTING).is_ok_and(|v| v == "1");
    let min = if short { MIN_WINDOW } else { MIN_SETTING };
    if short && d < MIN_SETTING {
        tracing::warn!("{setting}={text}: below the 1 min minimum, allowed by {SHORT_WINDOWS_SETTING}=1 (benchmarks only)");
    }
    // The value as written (humantime would print 400d as a year, a month and four days).
    check(setting, d, min, MAX_WINDOW).map_err(|_| {
        RetentionError(format!(
            "{setting}='{}' is out of bounds: between {} and {}",
            text.trim(),
            plain(min),
            plain(MAX_WINDOW)
        ))
    })
}

fn check(
    what: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, RetentionError> {
    if d < min || d > max {
        return Err(RetentionError(format!(
            "{what}={} is out of bounds: between {} and {}",
            humantime::format_duration(d),
            plain(min),
            plain(max)
        )));
    }
    Ok(d)
}

/// A bound as people write it (`365d`, not humantime's months).
fn plain(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s => humantime::format_duration(Duration::from_secs(s)).to_string(),
    }
}

/// The window a setting declares: the environment variable, else `default`.
pub fn window_from_env(setting: &str, default: Duration) -> Result<Duration, RetentionError> {
    match std::env::var(setting) {
        Ok(text) if !text.trim().is_empty() => parse_window(setting, &text),
        _ => Ok(default),
    }
}

/// The partition width a dedup table created for `window` gets unless one is given: a
/// [`BUCKETS_PER_WINDOW`]th of the window in whole seconds, clamped to 1 s ..= 1 day (7 d gives
/// one day, as before the width followed the window; 1 min gives 8 s).
pub fn bucket_for(window: Duration) -> Duration {
    let secs = window.as_secs() / u64::from(BUCKETS_PER_WINDOW);
    Duration::from_secs(secs).clamp(MIN_WINDOW, MAX_BUCKET)
}

/// How long dedup marks live, and the partition width used if the table is created now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupRetention {
    pub window: Duration,
    pub bucket: Duration,
}

impl Default for DedupRetention {
    fn default() -> Self {
        DedupRetention {
            window: DEFAULT_DEDUP_WINDOW,
            bucket: DEFAULT_BUCKET,
        }
    }
}

impl DedupRetention {
    /// A window (1 s ..= 365 d) and a bucket (1 s ..= 1 d).
    pub fn new(window: Duration, bucket: Duration) -> Result<DedupRetention, RetentionError> {
        Ok(DedupRetention {
            window: check("dedup retention window", window, MIN_WINDOW, MAX_WINDOW)?,
            bucket: check("dedup partition width", bucket, MIN_WINDOW, MAX_BUCKET)?,
        })
    }

    /// A window (1 s ..= 365 d) and the partition width that follows it ([`bucket_for`]).
    pub fn for_window(window: Duration) -> Result<DedupRetention, RetentionError> {
        DedupRetention::new(window, bucket_for(window))
    }

    /// The window of [`DEDUP_SETTING`] (default 7 days) and the width that follows it.
    pub fn from_env() -> Result<DedupRetention, RetentionError> {
        let window = window_from_env(DEDUP_SETTING, DEFAULT_DEDUP_WINDOW)?;
        Ok(DedupRetention {
            window,
            bucket: bucket_for(window),
        })
    }
}

mod dedup;
mod measure;
mod rows;

pub use dedup::*;
pub use measure::*;
pub use rows::*;

pub(super) async fn db_now(client: &Client) -> Result<f64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT extract(epoch FROM now())::float8", &[])
        .await?
        .get(0))
}

/// How often a process runs its own expiry for a window or bucket of `span`: often enough
/// that partitions ahead always exist, rarely enough to cost nothing.
pub fn period(span: Duration) -> Duration {
    (span / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::dedup::{parse_partition, partition_name};
    use super::rows::FINISHED;
    use super::*;

    #[test]
    fn the_finished_filter_names_the_final_order_statuses() {
        let statuses: Vec<String> = crate::contracts::OrderStatus::FINAL
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        assert_eq!(FINISHED, format!("status IN ({})", statuses.join(", ")));
    }

    #[test]
    fn settings_are_bounded_and_refusals_name_the_setting() {
        assert_eq!(
            parse_window(DEDUP_SETTING, "7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            parse_window(INTAKE_SETTING, "90min").unwrap(),
            Duration::from_secs(5_400)
        );
        for bad in ["30s", "366d", "soon", ""] {
            let e = parse_window(DEDUP_SETTING, bad).unwrap_err().to_string();
            assert!(e.contains(DEDUP_SETTING), "{e}");
        }
        assert!(DedupRetention::new(Duration::ZERO, DEFAULT_BUCKET).is_err());
        assert!(DedupRetention::new(Duration::from_secs(5), Duration::from_secs(2)).is_ok());
        assert!(
            DedupRetention::new(DEFAULT_DEDUP_WINDOW, Duration::from_secs(2 * 86_400)).is_err()
        );
    }

    #[test]
    fn the_partition_width_follows_the_window() {
        let secs = Duration::from_secs;
        assert_eq!(bucket_for(DEFAULT_DEDUP_WINDOW), DEFAULT_BUCKET);
        assert_eq!(
            DedupRetention::default(),
            DedupRetention::for_window(DEFAULT_DEDUP_WINDOW).unwrap()
        );
        assert_eq!(bucket_for(secs(60)), secs(8));
        assert_eq!(bucket_for(secs(20)), secs(2));
        assert_eq!(bucket_for(secs(86_400)), secs(12_342));
        // Clamped: never under a second, never over a day.
        assert_eq!(bucket_for(secs(3)), secs(1));
        assert_eq!(bucket_for(MIN_WINDOW), secs(1));
        assert_eq!(bucket_for(secs(30 * 86_400)), DEFAULT_BUCKET);
        assert_eq!(bucket_for(MAX_WINDOW), DEFAULT_BUCKET);
        // Always a width DedupRetention accepts, and about seven per window.
        for w in [1, 59, 60, 3_600, 86_400, 7 * 86_400, 365 * 86_400] {
            let r = DedupRetention::for_window(secs(w)).unwrap();
            assert!(r.bucket <= r.window, "{w}");
            assert!(w < 7 * 86_400 || r.bucket == DEFAULT_BUCKET, "{w}");
        }
    }

    #[test]
    fn partition_names_carry_their_bounds() {
        let name = partition_name(86_400, 172_800);
        assert_eq!(name, "orderflow_processed_p86400_172800");
        assert!(name.len() <= 63);
        assert_eq!(parse_partition(&name), Some((86_400, 172_800)));
        assert_eq!(parse_partition("orderflow_processed_legacy"), None);
    }
}
