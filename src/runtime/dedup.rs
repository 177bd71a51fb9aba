//! Which events a consumer group has already handled, so a repeated event id (a producer
//! duplicate, a redelivery after a crash, a replay of an already-handled DLQ record) has no
//! second effect. Invariant: every call answers within a bound (a DedupError when PostgreSQL is
//! down or hung, never a hang), and concurrent callers share round trips instead of queueing
//! behind one connection.
//!
//! Kept in PostgreSQL (`orderflow_processed`, created by [`crate::database::retention`]): it
//! survives restarts and every replica of a processor sees the same rows. An event is marked only
//! after all of its outputs are acknowledged, so a crash can at worst repeat work (at least once),
//! never skip it. Events that failed (retry tier or DLQ) are not marked: a replay handles them
//! again.
//!
//! Retention: a mark counts for a declared window ([`DedupRetention`], 7 days unless
//! `ORDERFLOW_DEDUP_RETENTION` says otherwise): `seen` ignores older marks, so a duplicate that
//! comes back after the window is handled again. The table is partitioned by time (a width that
//! follows the window when the store creates it: about seven partitions per window) and the store
//! runs its own expiry every quarter partition, at most every five minutes (whole partitions
//! dropped, never rows deleted; the `retention run` command does the same), so its size follows
//! the window, not the history.
//!
//! Batching: `seen` and `mark_many` put their request on a channel. A batcher task takes the
//! first request, waits for a free pooled connection, then takes whatever else is queued (no
//! added wait) and sends it as one statement per consumer group, pipelined on that connection;
//! while the pool is busy, requests pile up and go together next. No lock is held across a query.
//! An answer goes to a caller waiting on it, or to a continuation ([`DedupStore::seen_then`],
//! [`DedupStore::mark_then`]) run where the batch is answered, once its connection is given back:
//! then no task waits per request. A continuation dropped unanswered is called with an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::database::retention::{self, DedupLayout};
pub use crate::database::retention::{DedupExpiry, DedupRetention};
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

/// The `seen` statement, with `more` marks (a `UNION ALL` of rows for the same id) looked at
/// after the current table's: one text for both statements, so their windows cannot drift apart.
macro_rules! seen_sql {
    ($more:literal) => {
        concat!(
            "SELECT ids.event_id FROM unnest($2::uuid[]) AS ids(event_id) \
             CROSS JOIN LATERAL (SELECT 1 FROM orderflow_processed p WHERE p.consumer_group = $1 \
             AND p.event_id = ids.event_id AND p.processed_at > now() - $3 * interval '1 second' \
             AND p.processed_at < now() + interval '1 hour'",
            $more,
            " LIMIT 1) AS mark"
        )
    };
}

/// `$3`: the window in seconds; older marks do not count (their partition may not be dropped
/// yet). The partitions wholly before the window are pruned at execution, and so are those the
/// store creates ahead, wholly more than an hour from now: a mark is dated by the server's clock
/// as it is written, so none is in the future but by a clock stepped back (which an hour
/// covers).
///
/// Each id is looked up on its own, by a `LATERAL` subquery with `LIMIT 1` (which the planner
/// cannot turn into a join): whatever the statistics say, that is one descent of the primary key
/// per id and partition. With `event_id = ANY($2)`, a partition without statistics (every new
/// day's, until it is analyzed; a new database's) got a plan that read all of the group's marks
/// in it and filtered them by id, and a connection keeps its plan: each batch then cost as much
/// as the group's day so far. Public for the test that holds this.
pub const SEEN_SQL: &str = seen_sql!("");
/// The same, also reading the table of an earlier version until it is dropped.
pub const SEEN_LEGACY_SQL: &str = seen_sql!(
    " UNION ALL SELECT 1 FROM orderflow_processed_legacy l WHERE l.consumer_group = $1 \
     AND l.event_id = ids.event_id AND l.processed_at > now() - $3 * interval '1 second'"
);
/// Without `ON CONFLICT`, which doubled an insert's cost (a speculative insert per row): the key
/// holds the time of the writing transaction, so two marks of one id conflict only within one
/// statement (a batch's ids are made distinct first) or from two transactions begun in the same
/// microsecond. Such a conflict fails the statement, and its callers store their marks again, at
/// another time.
const MARK_SQL: &str = "INSERT INTO orderflow_processed (consumer_group, event_id) \
     SELECT $1, unnest($2::uuid[])";

pub struct DedupStore {
    db: Database,
    seen: mpsc::UnboundedSender<SeenRequest>,
    marks: mpsc::UnboundedSender<MarkRequest>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
    /// Longest a caller waits for its answer: a connection, then a statement, and a margin.
    call_limit: Duration,
    /// The periodic expiry, stopped with the store.
    expiry: tokio::task::AbortHandle,
    /// The database's URL (redacted), for errors that do not come from it.
    url: Arc<str>,
}

/// What the batchers and the expiry task share.
struct Shared {
    retention: DedupRetention,
    /// The table as prepared on first use (created or migrated).
    layout: tokio::sync::OnceCell<Layout>,
}

struct Layout {
    bucket_secs: i64,
    /// The table of an earlier version is still there and read.
    legacy: AtomicBool,
}

impl Shared {
    /// The layout, preparing the table on `conn` the first time.
    async fn layout(&self, conn: &Conn) -> Result<&Layout, DbError> {
        self.layout
            .get_or_try_init(|| async {
                let l: DedupLayout = conn
                    .timed(retention::prepare_dedup(
                        conn.client(),
                        self.retention.bucket,
                    ))
                    .await?;
                Ok(Layout {
                    bucket_secs: l.bucket_secs,
                    legacy: AtomicBool::new(l.legacy),
                })
            })
            .await
    }
}

struct SeenRequest {
    group: String,
    event_id: Uuid,
    /// Marks older than this do not count (the store's window or a pipeline's shorter one).
    window: Duration,
    reply: Reply<bool>,
}

struct MarkRequest {
    group: String,
    event_ids: Vec<Uuid>,
    reply: Reply<()>,
}

/// A continuation given an answer of the store.
pub type Then<T> = Box<dyn FnOnce(Result<T, DedupError>) + Send>;

/// Where a request's answer goes.
enum Reply<T> {
    /// A caller waiting for it.
    Waiting(Option<oneshot::Sender<Result<T, DedupError>>>),
    /// A continuation, run where the batch is answered. Dropped unanswered (a batch's task
    /// ended early), it is called with an error, so nothing waits for ever.
    Then(Option<Then<T>>),
}

impl<T> Reply<T> {
    fn send(mut self, answer: Result<T, DedupError>) {
        match &mut self {
            Reply::Waiting(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(answer);
                }
            }
            Reply::Then(then) => {
                if let Some(then) = then.take() {
                    then(answer);
                }
            }
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Reply::Then(then) = self {
            if let Some(then) = then.take() {
                then(Err(DedupError {
                    url: String::new(),
                    detail: "the dedup batcher dropped the request".to_string(),
                }));
            }
        }
    }
}

/// An error of a dropped request, which knows no URL, given the store's.
fn named(mut e: DedupError, url: &str) -> DedupError {
    if e.url.is_empty() {
        e.url = url.to_string();
    }
    e
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
    /// Connects and creates (or migrates) the table when needed, with the window of
    /// `ORDERFLOW_DEDUP_RETENTION` (default 7 days). Fails when the database cannot be reached or
    /// the setting is out of bounds, so a processor does not start without its dedup state.
    pub async fn connect(url: &str) -> Result<DedupStore, DedupError> {
        let db = Database::new(url)?;
        // The pool redacts the URL: the one place that does.
        let retention = DedupRetention::from_env().map_err(|e| DedupError {
            url: db.url(),
            detail: e.to_string(),
        })?;
        DedupStore::connected(db, retention).await
    }

    /// [`DedupStore::connect`] with a retention of the caller's (e.g. a window shortened for a
    /// test; the partition width applies only if the table is created now).
    pub async fn with_retention(
        url: &str,
        retention: DedupRetention,
    ) -> Result<DedupStore, DedupError> {
        DedupStore::connected(Database::new(url)?, retention).await
    }

    /// A store over `db` once it answers, its table created or migrated.
    async fn connected(db: Database, retention: DedupRetention) -> Result<DedupStore, DedupError> {
        db.get().await?;
        let store = DedupStore::with_database_and_retention(db, retention);
        let conn = store.db.get().await?;
        store.shared.layout(&conn).await?;
        Ok(store)
    }

    /// A store over a pool of the caller's (its timeouts bound every call), default retention.
    pub fn with_database(db: Database) -> DedupStore {
        DedupStore::with_database_and_retention(db, DedupRetention::default())
    }

    /// A store over a pool of the caller's with a retention of the caller's. The table is
    /// prepared on first use; the store expires its own marks every few minutes.
    pub fn with_database_and_retention(db: Database, retention: DedupRetention) -> DedupStore {
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            retention,
            layout: tokio::sync::OnceCell::new(),
        });
        let (seen, seen_rx) = mpsc::unbounded_channel();
        let (marks, marks_rx) = mpsc::unbounded_channel();
        let (c, sh) = (counters.clone(), shared.clone());
        tokio::spawn(batcher(
            db.clone(),
            seen_rx,
            MAX_SEEN_BATCH,
            move |conn, batch| answer_seen(conn, batch, c.clone(), sh.clone()),
        ));
        let (c, sh) = (counters.clone(), shared.clone());
        tokio::spawn(batcher(
            db.clone(),
            marks_rx,
            MAX_MARK_BATCH,
            move |conn, batch| write_marks(conn, batch, c.clone(), sh.clone()),
        ));
        let expiry = tokio::spawn(expire_periodically(db.clone(), shared.clone())).abort_handle();
        let t = db.timeouts();
        DedupStore {
            call_limit: t.connect + t.statement + Duration::from_secs(1),
            url: db.url().into(),
            db,
            seen,
            marks,
            counters,
            shared,
            expiry,
        }
    }

    /// The window and partition width this store was given.
    pub fn retention(&self) -> DedupRetention {
        self.shared.retention
    }

    /// Runs expiry now (what the store does by itself every few minutes): creates the
    /// partitions ahead, drops those wholly older than the window, updates the gauges.
    pub async fn expire_now(&self) -> Result<DedupExpiry, DedupError> {
        Ok(expire_once(&self.db, &self.shared).await?)
    }

    /// True when `group` has already handled `event_id` within the store's window.
    pub async fn seen(&self, group: &str, event_id: Uuid) -> Result<bool, DedupError> {
        self.seen_within(group, event_id, self.shared.retention.window)
            .await
    }

    /// True when `group` has handled `event_id` within `window` (a pipeline's own window; the
    /// store's window when `window` is longer: older marks may be gone already).
    pub async fn seen_within(
        &self,
        group: &str,
        event_id: Uuid,
        window: Duration,
    ) -> Result<bool, DedupError> {
        self.counters.seen_calls.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        self.seen
            .send(SeenRequest {
                group: group.to_string(),
                event_id,
                window: window.min(self.shared.retention.window),
                reply: Reply::Waiting(Some(reply)),
            })
            .map_err(|_| self.error("the dedup batcher has stopped"))?;
        let answer = self.wait(answer).await;
        crate::telemetry::dedup::seen(started.elapsed().as_secs_f64());
        answer
    }

    /// [`DedupStore::seen_within`] without a waiting task: `then` is given the answer where the
    /// batch is answered (within the pool's connect and statement timeouts).
    pub fn seen_then(&self, group: &str, event_id: Uuid, window: Duration, then: Then<bool>) {
        self.counters.seen_calls.fetch_add(1, Ordering::Relaxed);
        let (started, url) = (std::time::Instant::now(), self.url.clone());
        let then: Then<bool> = Box::new(move |answer| {
            crate::telemetry::dedup::seen(started.elapsed().as_secs_f64());
            then(answer.map_err(|e| named(e, &url)))
        });
        let request = SeenRequest {
            group: group.to_string(),
            event_id,
            window: window.min(self.shared.retention.window),
            reply: Reply::Then(Some(then)),
        };
        if let Err(refused) = self.seen.send(request) {
            refused.0.fail(self.error("the dedup batcher has stopped"));
        }
    }

    /// Records that `group` has handled `event_id` (a repeat is a mark of its own time; either
    /// makes `seen` true).
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
                reply: Reply::Waiting(Some(reply)),
            })
            .map_err(|_| self.error("the dedup batcher has stopped"))?;
        self.wait(answer).await
    }

    /// [`DedupStore::mark_many`] without a waiting task: `then` is given the outcome where the
    /// batch is answered.
    pub fn mark_then(&self, group: &str, event_ids: Vec<Uuid>, then: Then<()>) {
        if event_ids.is_empty() {
            return then(Ok(()));
        }
        self.counters.mark_calls.fetch_add(1, Ordering::Relaxed);
        let url = self.url.clone();
        let then: Then<()> = Box::new(move |stored| then(stored.map_err(|e| named(e, &url))));
        let request = MarkRequest {
            group: group.to_string(),
            event_ids,
            reply: Reply::Then(Some(then)),
        };
        if let Err(refused) = self.marks.send(request) {
            refused.0.fail(self.error("the dedup batcher has stopped"));
        }
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

impl Drop for DedupStore {
    fn drop(&mut self) {
        self.expiry.abort();
    }
}

/// One expiry run on a pooled connection, then the gauges.
async fn expire_once(db: &Database, shared: &Shared) -> Result<DedupExpiry, DbError> {
    let conn = db.get().await?;
    shared.layout(&conn).await?;
    let window = shared.retention.window;
    let expiry = conn
        .timed(retention::expire_dedup(conn.client(), window))
        .await?;
    conn.timed(retention::measure_dedup(conn.client(), window))
        .await?;
    Ok(expiry)
}

/// The store's own expiry: at start, then every [`retention::period`] of its bucket or window.
/// Only one process at a time does the work (an advisory lock); failures are retried next time.
async fn expire_periodically(db: Database, shared: Arc<Shared>) {
    let span = shared.retention.bucket.min(shared.retention.window);
    let mut tick = tokio::time::interval(retention::period(span));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = expire_once(&db, &shared).await {
            tracing::warn!(
                "dedup expiry did not run (next attempt in {:?}): {e}",
                tick.period()
            );
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

/// A request a batch answers; without a connection it is answered with the error.
trait Request: Send + 'static {
    fn fail(self, e: DedupError);
}

impl Request for SeenRequest {
    fn fail(self, e: DedupError) {
        self.reply.send(Err(e));
    }
}

impl Request for MarkRequest {
    fn fail(self, e: DedupError) {
        self.reply.send(Err(e));
    }
}

/// Takes the queued requests a batch at a time, as connections free up, and answers each batch
/// with `answer` beside the batcher, so the next batch can use another connection.
async fn batcher<R, F, Fut>(
    db: Database,
    mut requests: mpsc::UnboundedReceiver<R>,
    max: usize,
    answer: F,
) where
    R: Request,
    F: Fn(Conn, Vec<R>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some((conn, batch)) = next_batch(&db, &mut requests, max).await {
        match conn {
            Err(e) => {
                let e = DedupError::from(e);
                for r in batch {
                    r.fail(e.clone());
                }
            }
            Ok(conn) => {
                tokio::spawn(answer(conn, batch));
            }
        }
    }
}

async fn answer_seen(
    mut conn: Conn,
    batch: Vec<SeenRequest>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
) {
    let mut by_group: HashMap<(&str, Duration), Vec<Uuid>> = HashMap::new();
    for r in &batch {
        by_group
            .entry((&r.group, r.window))
            .or_default()
            .push(r.event_id);
    }
    let mut result = seen_query(&mut conn, &by_group, &counters, &shared).await;
    if let Err(e) = &result {
        // Another process dropped the legacy table between our look and our query.
        let layout = shared.layout.get();
        if e.server && e.detail.contains(retention::LEGACY_DEDUP_TABLE) {
            if let Some(layout) = layout {
                layout.legacy.store(false, Ordering::Relaxed);
                result = seen_query(&mut conn, &by_group, &counters, &shared).await;
            }
        }
    }
    drop(by_group);
    // Continuations run below: the connection goes back to the pool first.
    drop(conn);
    match result {
        Ok(found) => {
            for r in batch {
                let seen = found.contains(&(r.group, r.event_id));
                r.reply.send(Ok(seen));
            }
        }
        Err(e) => {
            let e = DedupError::from(e);
            for r in batch {
                r.reply.send(Err(e.clone()));
            }
        }
    }
}

/// The `(group, event id)` pairs of `by_group` marked within the window of their key.
async fn seen_query(
    conn: &mut Conn,
    by_group: &HashMap<(&str, Duration), Vec<Uuid>>,
    counters: &Counters,
    shared: &Shared,
) -> Result<std::collections::HashSet<(String, Uuid)>, DbError> {
    {
        let legacy = shared.layout(conn).await?.legacy.load(Ordering::Relaxed);
        let sql = if legacy { SEEN_LEGACY_SQL } else { SEEN_SQL };
        let statement = conn.prepared(sql).await?;
        counters
            .seen_queries
            .fetch_add(by_group.len() as u64, Ordering::Relaxed);
        // One statement per group (and window), pipelined on the one connection.
        let queries = by_group.iter().map(|((group, window), ids)| {
            let statement = &statement;
            let client = conn.client();
            let window = window.as_secs_f64();
            async move {
                let rows = client.query(statement, &[group, ids, &window]).await?;
                Ok::<_, tokio_postgres::Error>((
                    *group,
                    rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>(),
                ))
            }
        });
        let found = conn.timed(futures::future::try_join_all(queries)).await?;
        Ok(found
            .into_iter()
            .flat_map(|(g, ids)| ids.into_iter().map(move |id| (g.to_string(), id)))
            .collect())
    }
}

async fn write_marks(
    mut conn: Conn,
    batch: Vec<MarkRequest>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
) {
    let mut by_group: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for r in &batch {
        by_group
            .entry(&r.group)
            .or_default()
            .extend_from_slice(&r.event_ids);
    }
    // Distinct ids: a statement conflicts with itself otherwise (see MARK_SQL).
    for ids in by_group.values_mut() {
        ids.sort_unstable();
        ids.dedup();
    }
    let mut result = insert_marks(&mut conn, &by_group, &counters, &shared).await;
    if let (Err(e), Some(layout)) = (&result, shared.layout.get()) {
        // No partition for now (the store's expiry had not run for a while): create it, again.
        if e.server && e.detail.contains("no partition") {
            let created = conn
                .timed(retention::create_partitions(
                    conn.client(),
                    layout.bucket_secs,
                ))
                .await;
            if created.is_ok() {
                result = insert_marks(&mut conn, &by_group, &counters, &shared).await;
            }
        }
    }
    drop(by_group);
    drop(conn);
    let result = result.map_err(DedupError::from);
    for r in batch {
        r.reply.send(result.clone());
    }
}

/// One `INSERT` per group, pipelined on `conn`.
async fn insert_marks(
    conn: &mut Conn,
    by_group: &HashMap<&str, Vec<Uuid>>,
    counters: &Counters,
    shared: &Shared,
) -> Result<(), DbError> {
    shared.layout(conn).await?;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Given = Arc<Mutex<Vec<Result<bool, DedupError>>>>;

    /// A continuation and what it was given.
    fn recorded() -> (Then<bool>, Given) {
        let given = Arc::new(Mutex::new(Vec::new()));
        let g = given.clone();
        (
            Box::new(move |answer| g.lock().unwrap().push(answer)),
            given,
        )
    }

    #[test]
    fn a_continuation_is_given_its_answer_once() {
        let (then, given) = recorded();
        Reply::Then(Some(then)).send(Ok(true));
        let given = given.lock().unwrap();
        assert_eq!(given.len(), 1);
        assert!(matches!(given[0], Ok(true)));
    }

    #[test]
    fn a_continuation_dropped_unanswered_is_given_an_error() {
        let (then, given) = recorded();
        let request = SeenRequest {
            group: "g".into(),
            event_id: Uuid::new_v4(),
            window: Duration::from_secs(1),
            reply: Reply::Then(Some(then)),
        };
        drop(request); // as a batch's task ending before it answers
        let given = given.lock().unwrap();
        assert_eq!(given.len(), 1, "called once, not left waiting");
        let Err(e) = &given[0] else {
            panic!("an error, not an answer")
        };
        assert!(e.detail.contains("dropped"), "{e}");
    }
}
