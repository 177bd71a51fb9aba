//! The dedup table's partitions: created ahead of time with the table's stored width, and
//! expired a whole partition at a time once its upper bound is older than the window (never a
//! row-by-row delete); the legacy unpartitioned table read beside it until it is dropped whole.
//! Invariant: no mark younger than its window is ever dropped, and every change of partitions
//! is serialised between processes by one advisory lock.

use super::*;

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

pub(super) fn partition_name(lower: i64, upper: i64) -> String {
    format!("{DEDUP_TABLE}_p{lower}_{upper}")
}

pub(super) fn parse_partition(name: &str) -> Option<(i64, i64)> {
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
pub(super) async fn transaction<T>(
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
