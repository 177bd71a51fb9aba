//! Row-by-row expiry where a table cannot be partitioned by age: intake keys past their window,
//! and finished orders of the read model past theirs, deleted in bounded batches by an indexed
//! column. Invariant: an order in flight is never deleted, whatever its age, and no run deletes
//! more than [`MAX_BATCHES`] batches of [`DELETE_BATCH`] rows per table.

use super::*;

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
pub(super) const FINISHED: &str = "status IN ('confirmed', 'cancelled')";

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
