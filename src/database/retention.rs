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

/// The dedup table as found (or made) in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLayout {
    /// Partition width in seconds (as stored, whatever this process asked for).
    pub bucket_secs: i64,
    /// `orderflow_processed_legacy` exists and must be read too.
    pub legacy: bool,
}

/// One partition of the dedup table, from its name `orderflow_processed_p<lower>_<upper>`
/// (bounds in Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub lower: i64,
    pub upper: i64,
    /// PostgreSQL's live-tuple statistics (close to a count, updated within about a second).
    pub rows: i64,
}

fn partition_name(lower: i64, upper: i64) -> String {
    format!("{DEDUP_TABLE}_p{lower}_{upper}")
}

fn parse_partition(name: &str) -> Option<(i64, i64)> {
    let rest = name.strip_prefix(&format!("{DEDUP_TABLE}_p"))?;
    let (lower, upper) = rest.split_once('_')?;
    Some((lower.parse().ok()?, upper.parse().ok()?))
}

/// Creates the partitioned dedup table when missing, migrating a non-partitioned one of an
/// earlier version (renamed [`LEGACY_DEDUP_TABLE`]), and the current partitions. Idempotent;
/// safe to run from many processes at once (an advisory lock serialises them).
pub async fn prepare_dedup(
    client: &Client,
    bucket: Duration,
) -> Result<DedupLayout, tokio_postgres::Error> {
    transaction(client, prepare_dedup_in(client, bucket)).await
}

async fn prepare_dedup_in(
    tx: &Client,
    bucket: Duration,
) -> Result<DedupLayout, tokio_postgres::Error> {
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS orderflow_retention (
            table_name text PRIMARY KEY,
            bucket_seconds bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let kind: Option<i8> = tx
        .query_opt(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass($1)",
            &[&DEDUP_TABLE],
        )
        .await?
        .map(|r| r.get(0));
    if kind == Some(b'r' as i8) {
        // An earlier version's table: kept under another name, read until it is dropped.
        let legacy_exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&LEGACY_DEDUP_TABLE])
            .await?
            .get(0);
        if legacy_exists {
            tx.batch_execute(&format!(
                "INSERT INTO {LEGACY_DEDUP_TABLE} SELECT * FROM {DEDUP_TABLE} ON CONFLICT DO NOTHING; \
                 DROP TABLE {DEDUP_TABLE}"
            ))
            .await?;
        } else {
            tx.batch_execute(&format!(
                "ALTER TABLE {DEDUP_TABLE} RENAME TO {LEGACY_DEDUP_TABLE}; \
                 ALTER INDEX IF EXISTS {DEDUP_TABLE}_pkey RENAME TO {LEGACY_DEDUP_TABLE}_pkey"
            ))
            .await?;
        }
        tx.execute(
            "INSERT INTO orderflow_retention (table_name, bucket_seconds) VALUES ($1, 0) \
             ON CONFLICT (table_name) DO UPDATE SET created_at = now()",
            &[&LEGACY_DEDUP_TABLE],
        )
        .await?;
        tracing::info!(
            "dedup marks of an earlier version kept in {LEGACY_DEDUP_TABLE} (read, never written, dropped one window from now)"
        );
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {DEDUP_TABLE} (
            consumer_group text NOT NULL,
            event_id uuid NOT NULL,
            processed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer_group, event_id, processed_at)
        ) PARTITION BY RANGE (processed_at)"
    ))
    .await?;
    let bucket_secs = bucket.as_secs().max(1) as i64;
    tx.execute(
        "INSERT INTO orderflow_retention (table_name, bucket_seconds) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&DEDUP_TABLE, &bucket_secs],
    )
    .await?;
    let bucket_secs: i64 = tx
        .query_one(
            "SELECT bucket_seconds FROM orderflow_retention WHERE table_name = $1",
            &[&DEDUP_TABLE],
        )
        .await?
        .get(0);
    let legacy: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&LEGACY_DEDUP_TABLE])
        .await?
        .get(0);
    ensure_partitions(tx, bucket_secs).await?;
    Ok(DedupLayout {
        bucket_secs,
        legacy,
    })
}

/// The partitions of the dedup table, oldest first.
pub async fn partitions(client: &Client) -> Result<Vec<Partition>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname::text, pg_stat_get_live_tuples(c.oid) FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass($1)",
            &[&DEDUP_TABLE],
        )
        .await?;
    let mut found: Vec<Partition> = rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            let (lower, upper) = parse_partition(&name)?;
            Some(Partition {
                name,
                lower,
                upper,
                rows: r.get(1),
            })
        })
        .collect();
    found.sort_by_key(|p| p.lower);
    Ok(found)
}

async fn db_now(client: &Client) -> Result<f64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT extract(epoch FROM now())::float8", &[])
        .await?
        .get(0))
}

/// Creates the current partition and [`AHEAD`] more when missing (call under [`LOCK_KEY`]).
async fn ensure_partitions(
    client: &Client,
    bucket_secs: i64,
) -> Result<u32, tokio_postgres::Error> {
    let now = db_now(client).await? as i64;
    let existing = partitions(client).await?;
    let first = now.div_euclid(bucket_secs) * bucket_secs;
    let mut created = 0;
    for k in 0..=AHEAD {
        let lower = first + k * bucket_secs;
        let upper = lower + bucket_secs;
        if existing.iter().any(|p| p.lower == lower) {
            continue;
        }
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF {DEDUP_TABLE} \
                 FOR VALUES FROM (to_timestamp({lower})) TO (to_timestamp({upper}))",
                partition_name(lower, upper)
            ))
            .await?;
        created += 1;
    }
    Ok(created)
}

/// Creates missing partitions now (a mark found none for its time).
pub async fn create_partitions(
    client: &Client,
    bucket_secs: i64,
) -> Result<u32, tokio_postgres::Error> {
    transaction(client, async {
        client
            .batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            .await?;
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await?;
        ensure_partitions(client, bucket_secs).await
    })
    .await
}

/// Runs `work` (statements on `client`) in one transaction: committed when it succeeds, rolled
/// back when it fails (a caller that gives up half-way must discard the connection).
async fn transaction<T>(
    client: &Client,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    match work.await {
        Ok(value) => {
            client.batch_execute("COMMIT").await?;
            Ok(value)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// What one expiry run did to the dedup table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DedupExpiry {
    /// Names of the partitions dropped.
    pub dropped: Vec<String>,
    pub rows_dropped: i64,
    pub created: u32,
    pub legacy_dropped: bool,
    /// Another process held the lock: nothing done this time.
    pub skipped: bool,
}

/// Creates the partitions ahead, then drops every partition whose upper bound is at least
/// `window` old (and the legacy table one window after the migration). A partition that may
/// hold a mark younger than the window is never dropped: its upper bound is in the window.
pub async fn expire_dedup(
    client: &Client,
    window: Duration,
) -> Result<DedupExpiry, tokio_postgres::Error> {
    let out = transaction(client, expire_dedup_in(client, window)).await?;
    let partitions = out.dropped.len() as u64 + u64::from(out.legacy_dropped);
    if partitions > 0 {
        metrics::expired(DEDUP_TABLE, out.rows_dropped as u64, partitions);
        tracing::info!(
            dropped = ?out.dropped,
            legacy = out.legacy_dropped,
            rows = out.rows_dropped,
            "expired dedup marks older than {}",
            humantime::format_duration(window)
        );
    }
    Ok(out)
}

async fn expire_dedup_in(
    tx: &Client,
    window: Duration,
) -> Result<DedupExpiry, tokio_postgres::Error> {
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?
        .get(0);
    if !locked {
        return Ok(DedupExpiry {
            skipped: true,
            ..DedupExpiry::default()
        });
    }
    let bucket_secs: i64 = match tx
        .query_opt(
            "SELECT bucket_seconds FROM orderflow_retention WHERE table_name = $1",
            &[&DEDUP_TABLE],
        )
        .await
    {
        Ok(Some(r)) => r.get(0),
        // Not prepared yet: nothing to expire.
        _ => return Ok(DedupExpiry::default()),
    };
    let mut out = DedupExpiry {
        created: ensure_partitions(tx, bucket_secs).await?,
        ..DedupExpiry::default()
    };
    let now = db_now(tx).await?;
    let horizon = now - window.as_secs_f64();
    for p in partitions(tx).await? {
        if (p.upper as f64) <= horizon {
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {}", p.name))
                .await?;
            out.rows_dropped += p.rows.max(0);
            out.dropped.push(p.name);
        }
    }
    let legacy_since: Option<f64> = tx
        .query_opt(
            "SELECT extract(epoch FROM created_at)::float8 FROM orderflow_retention \
             WHERE table_name = $1 AND to_regclass($1) IS NOT NULL",
            &[&LEGACY_DEDUP_TABLE],
        )
        .await?
        .map(|r| r.get(0));
    // Nothing is written to the legacy table after the migration: once a window has passed,
    // every mark in it is expired.
    if legacy_since.is_some_and(|at| at <= horizon) {
        let rows: i64 = tx
            .query_one(
                "SELECT pg_stat_get_live_tuples(to_regclass($1))",
                &[&LEGACY_DEDUP_TABLE],
            )
            .await?
            .get(0);
        tx.batch_execute(&format!("DROP TABLE IF EXISTS {LEGACY_DEDUP_TABLE}"))
            .await?;
        tx.execute(
            "DELETE FROM orderflow_retention WHERE table_name = $1",
            &[&LEGACY_DEDUP_TABLE],
        )
        .await?;
        out.rows_dropped += rows.max(0);
        out.legacy_dropped = true;
    }
    Ok(out)
}

/// Deletes, in batches of [`DELETE_BATCH`] and at most [`MAX_BATCHES`] of them, the rows `pick`
/// selects (a `SELECT <key> ... LIMIT $2` with the horizon as `$1`, in Unix seconds). Returns the
/// rows deleted.
async fn delete_batches(
    client: &Client,
    table: &str,
    key: &str,
    pick: &str,
    horizon: f64,
) -> Result<u64, tokio_postgres::Error> {
    let sql = format!("DELETE FROM {table} WHERE {key} IN ({pick})");
    let mut deleted = 0;
    for _ in 0..MAX_BATCHES {
        let n = client.execute(&sql, &[&horizon, &DELETE_BATCH]).await?;
        deleted += n;
        if n < DELETE_BATCH as u64 {
            break;
        }
    }
    Ok(deleted)
}

/// Creates an index without blocking writers; an invalid one (a build that was interrupted) is
/// dropped and built again. A large table may take longer than a pool's statement timeout: the
/// `retention run` command (long timeout) builds it then.
async fn ensure_index(
    client: &Client,
    name: &str,
    definition: &str,
) -> Result<(), tokio_postgres::Error> {
    let valid: Option<bool> = client
        .query_opt(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
            &[&name],
        )
        .await?
        .map(|r| r.get(0));
    match valid {
        Some(true) => Ok(()),
        Some(false) => {
            client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .await?;
            client
                .batch_execute(&format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}"
                ))
                .await
        }
        None => {
            match client
                .batch_execute(&format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}"
                ))
                .await
            {
                // Another process is building it at the same moment.
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
                other => other,
            }
        }
    }
}

/// Deletes intake keys older than `window` (they are free again anyway: the intake takes an
/// expired key as new), in bounded batches. Returns the rows deleted.
pub async fn expire_intake(
    client: &Client,
    window: Duration,
) -> Result<u64, tokio_postgres::Error> {
    ensure_index(
        client,
        "orderflow_intake_received_at",
        "ON orderflow_intake (received_at)",
    )
    .await?;
    let horizon = db_now(client).await? - window.as_secs_f64();
    let deleted = delete_batches(
        client,
        INTAKE_TABLE,
        "idempotency_key",
        "SELECT idempotency_key FROM orderflow_intake WHERE received_at < to_timestamp($1) \
         ORDER BY received_at LIMIT $2",
        horizon,
    )
    .await?;
    if deleted > 0 {
        metrics::expired(INTAKE_TABLE, deleted, 0);
        tracing::info!(
            deleted,
            "expired intake keys older than {}",
            humantime::format_duration(window)
        );
    }
    Ok(deleted)
}

/// The finished orders, in the read model's SQL: [`OrderStatus::FINAL`] (a test keeps them
/// equal), spelled out so the partial index and the queries match it word for word.
///
/// [`OrderStatus::FINAL`]: crate::contracts::OrderStatus::FINAL
const FINISHED: &str = "status IN ('confirmed', 'cancelled')";

/// Deletes finished orders (confirmed or cancelled) whose status became final more than
/// `window` ago, in bounded batches; an order in flight is never deleted. Returns the rows
/// deleted.
pub async fn expire_read_model(
    client: &Client,
    window: Duration,
) -> Result<u64, tokio_postgres::Error> {
    ensure_index(
        client,
        "orderflow_order_status_finished",
        &format!("ON orderflow_order_status (status_since) WHERE {FINISHED}"),
    )
    .await?;
    let horizon = db_now(client).await? - window.as_secs_f64();
    let deleted = delete_batches(
        client,
        READ_MODEL_TABLE,
        "order_id",
        &format!(
            "SELECT order_id FROM orderflow_order_status WHERE {FINISHED} \
             AND status_since < ($1::float8 * 1000)::bigint ORDER BY status_since LIMIT $2"
        ),
        horizon,
    )
    .await?;
    if deleted > 0 {
        metrics::expired(READ_MODEL_TABLE, deleted, 0);
        tracing::info!(
            deleted,
            "expired finished orders older than {}",
            humantime::format_duration(window)
        );
    }
    Ok(deleted)
}

/// What a table holds: rows (statistics) and the age of its oldest retained data, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub table: &'static str,
    pub window: Duration,
    pub rows: i64,
    pub oldest_age_seconds: Option<f64>,
}

/// Measures the dedup table (and the legacy one, if any) and sets the gauges.
pub async fn measure_dedup(
    client: &Client,
    window: Duration,
) -> Result<Vec<Held>, tokio_postgres::Error> {
    let now = db_now(client).await?;
    let parts = partitions(client).await?;
    let mut rows: i64 = parts.iter().map(|p| p.rows.max(0)).sum();
    if parts.is_empty() {
        // Not migrated yet (a table of an earlier version under this name): its rows.
        rows = client
            .query_one(
                "SELECT coalesce(pg_stat_get_live_tuples(to_regclass($1)), 0)",
                &[&DEDUP_TABLE],
            )
            .await?
            .get(0);
    }
    let oldest = parts
        .iter()
        .filter(|p| p.rows > 0)
        .map(|p| now - p.lower as f64)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    let mut held = vec![Held {
        table: DEDUP_TABLE,
        window,
        rows,
        oldest_age_seconds: oldest,
    }];
    let legacy = client
        .query_opt(
            "SELECT pg_stat_get_live_tuples(to_regclass($1)), extract(epoch FROM created_at)::float8 \
             FROM orderflow_retention WHERE table_name = $1 AND to_regclass($1) IS NOT NULL",
            &[&LEGACY_DEDUP_TABLE],
        )
        .await
        .ok()
        .flatten();
    // The legacy table's marks are at least as old as the migration (not scanned: no index).
    held.push(Held {
        table: LEGACY_DEDUP_TABLE,
        window,
        rows: legacy.as_ref().map_or(0, |r| r.get(0)),
        oldest_age_seconds: legacy.map(|r| now - r.get::<_, f64>(1)),
    });
    publish(&held);
    Ok(held)
}

/// Measures the intake keys and sets the gauges.
pub async fn measure_intake(
    client: &Client,
    window: Duration,
) -> Result<Held, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_stat_get_live_tuples(to_regclass($1)), \
             extract(epoch FROM now() - (SELECT min(received_at) FROM orderflow_intake))::float8",
            &[&INTAKE_TABLE],
        )
        .await?;
    let held = Held {
        table: INTAKE_TABLE,
        window,
        rows: row.get(0),
        oldest_age_seconds: row.get(1),
    };
    publish(std::slice::from_ref(&held));
    Ok(held)
}

/// Measures the read model (rows: all orders; oldest: the finished order final the longest).
pub async fn measure_read_model(
    client: &Client,
    window: Duration,
) -> Result<Held, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT pg_stat_get_live_tuples(to_regclass($1)), \
                 extract(epoch FROM now())::float8 - (SELECT min(status_since) FROM orderflow_order_status \
                   WHERE {FINISHED})::float8 / 1000.0"
            ),
            &[&READ_MODEL_TABLE],
        )
        .await?;
    let held = Held {
        table: READ_MODEL_TABLE,
        window,
        rows: row.get(0),
        oldest_age_seconds: row.get(1),
    };
    publish(std::slice::from_ref(&held));
    Ok(held)
}

fn publish(held: &[Held]) {
    for h in held {
        metrics::held(
            h.table,
            h.window.as_secs_f64(),
            h.rows,
            h.oldest_age_seconds,
        );
    }
}

/// How often a process runs its own expiry for a window or bucket of `span`: often enough
/// that partitions ahead always exist, rarely enough to cost nothing.
pub fn period(span: Duration) -> Duration {
    (span / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
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
