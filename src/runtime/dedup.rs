//! Which events a consumer group has already handled, so a repeated event id (a producer
//! duplicate, a redelivery after a crash, a replay of an already-handled DLQ record) has no
//! second effect. Invariant: every call answers within a bound (a DedupError when PostgreSQL is
//! down or hung, never a hang), and concurrent callers share round trips instead of queueing
//! behind one connection.
//!
//! Kept in PostgreSQL (`orderflow_processed`, created by [`crate::database`]): it survives
//! restarts and every replica of a processor sees the same rows. An event is marked only after
//! all of its outputs are acknowledged, so a crash can at worst repeat work (at least once), never
//! skip it. Events that failed (retry tier or DLQ) are not marked: a replay handles them again.
//!
//! Batching: `seen` and `mark_many` put their request on a channel. A batcher task takes the
//! first request, waits for a free pooled connection, then takes whatever else is queued (no
//! added wait) and sends it as one statement per consumer group, pipelined on that connection;
//! while the pool is busy, requests pile up and go together next. No lock is held across a query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::database::{Conn, Database, DbError};

#[derive(Debug, Clone, thiserror::Error)]
#[error("dedup store at {url} is unavailable: {detail}")]
pub struct DedupError {
    pub url: String,
    pub detail: String,
}

impl From<DbError> for DedupError {
    fn from(e: DbError) -> Self {
        DedupError {
            url: e.url,
            detail: e.detail,
        }
    }
}

/// Requests per statement at most; more wait for the next round trip.
const MAX_SEEN_BATCH: usize = 2_000;
const MAX_MARK_BATCH: usize = 10_000;

const SEEN_SQL: &str =
    "SELECT event_id FROM orderflow_processed WHERE consumer_group = $1 AND event_id = ANY($2)";
const MARK_SQL: &str = "INSERT INTO orderflow_processed (consumer_group, event_id) \
     SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING";

pub struct DedupStore {
    db: Database,
    seen: mpsc::UnboundedSender<SeenRequest>,
    marks: mpsc::UnboundedSender<MarkRequest>,
    counters: Arc<Counters>,
    /// Longest a caller waits for its answer: a connection, then a statement, and a margin.
    call_limit: Duration,
}

struct SeenRequest {
    group: String,
    event_id: Uuid,
    reply: oneshot::Sender<Result<bool, DedupError>>,
}

struct MarkRequest {
    group: String,
    event_ids: Vec<Uuid>,
    reply: oneshot::Sender<Result<(), DedupError>>,
}

/// What the store has sent to PostgreSQL, for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DedupStats {
    pub seen_calls: u64,
    /// `SELECT` statements sent for them.
    pub seen_queries: u64,
    pub mark_calls: u64,
    /// `INSERT` statements sent for them.
    pub mark_statements: u64,
}

#[derive(Default)]
struct Counters {
    seen_calls: AtomicU64,
    seen_queries: AtomicU64,
    mark_calls: AtomicU64,
    mark_statements: AtomicU64,
}

impl DedupStore {
    /// Connects and creates the table when missing. Fails when the database cannot be reached,
    /// so a processor does not start without its dedup state.
    pub async fn connect(url: &str) -> Result<DedupStore, DedupError> {
        Ok(DedupStore::with_database(Database::connect(url).await?))
    }

    /// A store over a pool of the caller's (its timeouts bound every call).
    pub fn with_database(db: Database) -> DedupStore {
        let counters = Arc::new(Counters::default());
        let (seen, seen_rx) = mpsc::unbounded_channel();
        let (marks, marks_rx) = mpsc::unbounded_channel();
        tokio::spawn(seen_batcher(db.clone(), seen_rx, counters.clone()));
        tokio::spawn(mark_batcher(db.clone(), marks_rx, counters.clone()));
        let t = db.timeouts();
        DedupStore {
            call_limit: t.connect + t.statement + Duration::from_secs(1),
            db,
            seen,
            marks,
            counters,
        }
    }

    /// True when `group` has already handled `event_id`.
    pub async fn seen(&self, group: &str, event_id: Uuid) -> Result<bool, DedupError> {
        self.counters.seen_calls.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.seen
            .send(SeenRequest {
                group: group.to_string(),
                event_id,
                reply,
            })
            .map_err(|_| self.error("the dedup batcher has stopped"))?;
        self.wait(answer).await
    }

    /// Records that `group` has handled `event_id` (a repeat is a no-op).
    pub async fn mark(&self, group: &str, event_id: Uuid) -> Result<(), DedupError> {
        self.mark_many(group, &[event_id]).await
    }

    /// Records several handled event ids; concurrent calls share one statement per group.
    pub async fn mark_many(&self, group: &str, event_ids: &[Uuid]) -> Result<(), DedupError> {
        if event_ids.is_empty() {
            return Ok(());
        }
        self.counters.mark_calls.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.marks
            .send(MarkRequest {
                group: group.to_string(),
                event_ids: event_ids.to_vec(),
                reply,
            })
            .map_err(|_| self.error("the dedup batcher has stopped"))?;
        self.wait(answer).await
    }

    pub fn stats(&self) -> DedupStats {
        let c = &self.counters;
        DedupStats {
            seen_calls: c.seen_calls.load(Ordering::Relaxed),
            seen_queries: c.seen_queries.load(Ordering::Relaxed),
            mark_calls: c.mark_calls.load(Ordering::Relaxed),
            mark_statements: c.mark_statements.load(Ordering::Relaxed),
        }
    }

    async fn wait<T>(
        &self,
        answer: oneshot::Receiver<Result<T, DedupError>>,
    ) -> Result<T, DedupError> {
        match tokio::time::timeout(self.call_limit, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.error("the dedup batcher dropped the request")),
            // The batcher's own timeouts should answer first; this bounds the call regardless.
            Err(_) => Err(self.error(&format!("no answer within {:?}", self.call_limit))),
        }
    }

    fn error(&self, detail: &str) -> DedupError {
        DedupError {
            url: self.db.url(),
            detail: detail.to_string(),
        }
    }
}

/// Takes the first request, a connection, then everything queued meanwhile (up to `max`).
async fn next_batch<R>(
    db: &Database,
    requests: &mut mpsc::UnboundedReceiver<R>,
    max: usize,
) -> Option<(Result<Conn, DbError>, Vec<R>)> {
    let first = requests.recv().await?;
    // While every connection is busy, callers keep queueing: they go together below.
    let conn = db.get().await;
    let mut batch = vec![first];
    while batch.len() < max {
        match requests.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    Some((conn, batch))
}

async fn seen_batcher(
    db: Database,
    mut requests: mpsc::UnboundedReceiver<SeenRequest>,
    counters: Arc<Counters>,
) {
    while let Some((conn, batch)) = next_batch(&db, &mut requests, MAX_SEEN_BATCH).await {
        match conn {
            Err(e) => {
                let e = DedupError::from(e);
                for r in batch {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
            // The query runs beside the batcher, so the next batch can use another connection.
            Ok(conn) => {
                tokio::spawn(answer_seen(conn, batch, counters.clone()));
            }
        }
    }
}

async fn answer_seen(mut conn: Conn, batch: Vec<SeenRequest>, counters: Arc<Counters>) {
    let mut by_group: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for r in &batch {
        by_group.entry(&r.group).or_default().push(r.event_id);
    }
    let result = async {
        let statement = conn.prepared(SEEN_SQL).await?;
        counters
            .seen_queries
            .fetch_add(by_group.len() as u64, Ordering::Relaxed);
        // One statement per group, pipelined on the one connection.
        let queries = by_group.iter().map(|(group, ids)| {
            let statement = &statement;
            let client = conn.client();
            async move {
                let rows = client.query(statement, &[group, ids]).await?;
                Ok::<_, tokio_postgres::Error>((
                    *group,
                    rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>(),
                ))
            }
        });
        let found = conn.timed(futures::future::try_join_all(queries)).await?;
        Ok::<_, DbError>(
            found
                .into_iter()
                .flat_map(|(g, ids)| ids.into_iter().map(move |id| (g.to_string(), id)))
                .collect::<std::collections::HashSet<(String, Uuid)>>(),
        )
    }
    .await;
    drop(by_group);
    match result {
        Ok(found) => {
            for r in batch {
                let seen = found.contains(&(r.group, r.event_id));
                let _ = r.reply.send(Ok(seen));
            }
        }
        Err(e) => {
            let e = DedupError::from(e);
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
    }
}

async fn mark_batcher(
    db: Database,
    mut requests: mpsc::UnboundedReceiver<MarkRequest>,
    counters: Arc<Counters>,
) {
    while let Some((conn, batch)) = next_batch(&db, &mut requests, MAX_MARK_BATCH).await {
        match conn {
            Err(e) => {
                let e = DedupError::from(e);
                for r in batch {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
            Ok(conn) => {
                tokio::spawn(write_marks(conn, batch, counters.clone()));
            }
        }
    }
}

async fn write_marks(mut conn: Conn, batch: Vec<MarkRequest>, counters: Arc<Counters>) {
    let mut by_group: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for r in &batch {
        by_group
            .entry(&r.group)
            .or_default()
            .extend_from_slice(&r.event_ids);
    }
    let result = async {
        let statement = conn.prepared(MARK_SQL).await?;
        counters
            .mark_statements
            .fetch_add(by_group.len() as u64, Ordering::Relaxed);
        let inserts = by_group.iter().map(|(group, ids)| {
            let statement = &statement;
            let client = conn.client();
            async move { client.execute(statement, &[group, ids]).await }
        });
        conn.timed(futures::future::try_join_all(inserts)).await?;
        Ok::<_, DbError>(())
    }
    .await;
    drop(by_group);
    let result = result.map_err(DedupError::from);
    for r in batch {
        let _ = r.reply.send(result.clone());
    }
}
