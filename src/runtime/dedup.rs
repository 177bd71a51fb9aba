//! Which events a consumer group has already handled, so a repeated event id (a producer
//! duplicate, a redelivery after a crash, a replay of an already-handled DLQ record) has no
//! second effect.
//!
//! Kept in PostgreSQL: it survives restarts, every replica of a processor sees the same rows,
//! and `INSERT ... ON CONFLICT DO NOTHING` is one round trip. An event is marked only after all
//! of its outputs are acknowledged, so a crash can at worst repeat work (at least once), never
//! skip it. Events that failed (retry tier or DLQ) are not marked: a replay handles them again.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
#[error("dedup store at {url} is unavailable: {detail}")]
pub struct DedupError {
    pub url: String,
    pub detail: String,
}

pub struct DedupStore {
    url: String,
    client: Mutex<Option<Connection>>,
}

/// A connection and its prepared statements: one round trip per query instead of two.
struct Connection {
    client: Client,
    seen: tokio_postgres::Statement,
    mark: tokio_postgres::Statement,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orderflow_processed (
    consumer_group text NOT NULL,
    event_id uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
)";

impl DedupStore {
    /// Connects and creates the table when missing. Fails when the database cannot be reached,
    /// so a processor does not start without its dedup state.
    pub async fn connect(url: &str) -> Result<DedupStore, DedupError> {
        let store = DedupStore {
            url: url.to_string(),
            client: Mutex::new(None),
        };
        let client = store.open(url).await?;
        create_table(&client, SCHEMA)
            .await
            .map_err(|e| store.error(e))?;
        *store.client.lock().await = Some(store.prepare(client).await?);
        Ok(store)
    }

    async fn open(&self, url: &str) -> Result<Client, DedupError> {
        let connecting = tokio_postgres::connect(url, NoTls);
        let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| DedupError {
                url: redact(url),
                detail: "no answer within 5 s".into(),
            })?
            .map_err(|e| self.error(e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("dedup store connection ended: {e}");
            }
        });
        Ok(client)
    }

    fn error(&self, e: tokio_postgres::Error) -> DedupError {
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        DedupError {
            url: redact(&self.url),
            detail: if cause.to_string().is_empty() {
                e.to_string()
            } else {
                cause.to_string()
            },
        }
    }

    async fn prepare(&self, client: Client) -> Result<Connection, DedupError> {
        let seen = client
            .prepare(
                "SELECT 1 FROM orderflow_processed WHERE consumer_group = $1 AND event_id = $2",
            )
            .await
            .map_err(|e| self.error(e))?;
        let mark = client
            .prepare(
                "INSERT INTO orderflow_processed (consumer_group, event_id) \
                 SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(Connection { client, seen, mark })
    }

    /// A connected client, reconnecting when the previous connection broke.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Connection>>, DedupError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            let client = self.open(&self.url).await?;
            *guard = Some(self.prepare(client).await?);
        }
        Ok(guard)
    }

    /// True when `group` has already handled `event_id`.
    pub async fn seen(&self, group: &str, event_id: Uuid) -> Result<bool, DedupError> {
        let guard = self.client().await?;
        let c = guard.as_ref().expect("client() connects");
        let row = c
            .client
            .query_opt(&c.seen, &[&group, &event_id])
            .await
            .map_err(|e| self.error(e))?;
        Ok(row.is_some())
    }

    /// Records that `group` has handled `event_id` (a repeat is a no-op).
    pub async fn mark(&self, group: &str, event_id: Uuid) -> Result<(), DedupError> {
        self.mark_many(group, &[event_id]).await
    }

    /// Records several handled event ids in one statement.
    pub async fn mark_many(&self, group: &str, event_ids: &[Uuid]) -> Result<(), DedupError> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let guard = self.client().await?;
        let c = guard.as_ref().expect("client() connects");
        c.client
            .execute(&c.mark, &[&group, &event_ids])
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

/// Runs a `CREATE TABLE IF NOT EXISTS`. Two sessions doing so at once can make the loser fail
/// with a unique violation on PostgreSQL's catalog even though the table now exists: that
/// counts as done.
pub async fn create_table(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::error::SqlState;
    match client.batch_execute(sql).await {
        Err(e) if matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::DUPLICATE_TABLE) => {
            Ok(())
        }
        other => other,
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            super::redact("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(super::redact("postgres://u@h:1/db"), "postgres://u@h:1/db");
    }
}
