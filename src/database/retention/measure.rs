//! What each retention holds, measured for its gauges: rows per table (PostgreSQL's statistics,
//! not a count, which would scan a large table) and the age of the oldest. Invariant: measuring
//! only reads, and never changes what is kept.

use super::rows::FINISHED;
use super::*;

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
