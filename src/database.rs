//! The one place orderflow connects to PostgreSQL. Invariant: no caller waits on the database
//! longer than a known bound (a connect timeout, a statement timeout set on the session and
//! enforced again on the client, because a SIGSTOPped server answers nothing at all), and a
//! broken or hung connection is never handed out again: the next caller connects afresh, so
//! users recover by themselves when the server is back.
//!
//! It also owns the schema of every table orderflow keeps (dedup marks, intake keys, the
//! order-status read model), created once per [`Database`] on its first good connection, and the
//! redaction of the URL's password in every message. How long each table keeps its rows, and the
//! expiry that keeps it so, is [`retention`].

pub mod retention;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio_postgres::{Client, NoTls, Statement};

/// How long a caller may wait, per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Waiting for a free connection plus opening one (TCP and the start-up handshake).
    pub connect: Duration,
    /// One statement (or one [`Conn::timed`] block): `statement_timeout` on the session, and
    /// on the client a little more, so a live server reports its own error first.
    pub statement: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            statement: Duration::from_secs(2),
        }
    }
}

/// Connections a [`Database`] keeps at most: a few; the dedup store batches its queries.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// The tables orderflow owns, each `CREATE ... IF NOT EXISTS` (and additive `ALTER`s), except
/// the dedup marks (partitioned: see [`retention::prepare_dedup`]).
pub const SCHEMA: &[&str] = &[
    // Dedup marks (`orderflow_processed`) are partitioned by time: [`retention::prepare_dedup`]
    // creates (or migrates) them, with the width of their partitions.
    // Intake: each accepted request under its idempotency key, with its event.
    "CREATE TABLE IF NOT EXISTS orderflow_intake (
        idempotency_key text PRIMARY KEY,
        order_id uuid NOT NULL UNIQUE,
        request text NOT NULL,
        event text NOT NULL,
        state text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        accepted_at timestamptz
    )",
    // The order-status read model.
    "CREATE TABLE IF NOT EXISTS orderflow_order_status (
        order_id uuid PRIMARY KEY,
        status text NOT NULL,
        version bigint NOT NULL,
        sources text NOT NULL,
        last_event_at bigint NOT NULL,
        projected_at bigint NOT NULL
    )",
    "ALTER TABLE orderflow_order_status ADD COLUMN IF NOT EXISTS status_since bigint NOT NULL DEFAULT 0",
];

/// The database could not be used; the message never holds the password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("database at {url} is unavailable: {detail}")]
pub struct DbError {
    /// The URL, password redacted.
    pub url: String,
    pub detail: String,
    /// The server answered with an error of its own (e.g. a constraint), as opposed to not
    /// answering, refusing or timing out.
    pub server: bool,
}

/// A small pool of connections to one database. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    config: tokio_postgres::Config,
    timeouts: Timeouts,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Pooled>>,
    schema_ready: AtomicBool,
}

/// An open connection: its client, the task driving its socket, its prepared statements.
struct Pooled {
    client: Client,
    driver: AbortHandle,
    statements: Vec<(&'static str, Statement)>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // A connection to a hung server would otherwise wait on its socket for ever.
        self.driver.abort();
    }
}

impl Database {
    /// A pool for `url` that connects on first use (nothing is checked here but the URL).
    pub fn new(url: &str) -> Result<Database, DbError> {
        Database::with(url, DEFAULT_POOL_SIZE, Timeouts::default())
    }

    /// [`Database::new`] with a pool size and timeouts of the caller's.
    pub fn with(url: &str, size: usize, timeouts: Timeouts) -> Result<Database, DbError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| DbError {
            url: redact(url),
            detail: format!("not a PostgreSQL URL: {e}"),
            server: false,
        })?;
        config.connect_timeout(timeouts.connect);
        Ok(Database {
            inner: Arc::new(Inner {
                url: url.to_string(),
                config,
                timeouts,
                permits: Arc::new(Semaphore::new(size.max(1))),
                idle: Mutex::new(Vec::new()),
                schema_ready: AtomicBool::new(false),
            }),
        })
    }

    /// [`Database::new`], then one connection (creating the schema): fails when the database
    /// cannot be reached, for callers that must not start without it.
    pub async fn connect(url: &str) -> Result<Database, DbError> {
        let db = Database::new(url)?;
        db.get().await?;
        Ok(db)
    }

    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    /// The URL with its password redacted.
    pub fn url(&self) -> String {
        redact(&self.inner.url)
    }

    /// A connection, within [`Timeouts::connect`]: an idle one, or a new one.
    pub async fn get(&self) -> Result<Conn, DbError> {
        let inner = &self.inner;
        let permit = tokio::time::timeout(
            inner.timeouts.connect,
            inner.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| {
            self.error(format!(
                "no free connection within {:?}",
                inner.timeouts.connect
            ))
        })?
        .expect("the semaphore is never closed");
        let reused = {
            let mut idle = inner.idle.lock().unwrap_or_else(|e| e.into_inner());
            let mut found = None;
            while let Some(p) = idle.pop() {
                if !p.client.is_closed() {
                    found = Some(p);
                    break;
                }
            }
            found
        };
        let pooled = match reused {
            Some(p) => p,
            None => tokio::time::timeout(inner.timeouts.connect, self.open())
                .await
                .map_err(|_| {
                    self.error(format!("no answer within {:?}", inner.timeouts.connect))
                })??,
        };
        Ok(Conn {
            pooled: Some(pooled),
            db: self.clone(),
            broken: AtomicBool::new(false),
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<Pooled, DbError> {
        let inner = &self.inner;
        let (client, connection) = inner
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.pg_error(e))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("database connection ended: {e}");
            }
        })
        .abort_handle();
        let pooled = Pooled {
            client,
            driver,
            statements: Vec::new(),
        };
        let setup = async {
            let ms = inner.timeouts.statement.as_millis();
            // Generic plans, made once per connection: every statement orderflow prepares looks
            // rows up by their key, and is written so that its plan does so whatever the
            // statistics say (see `runtime::dedup::SEEN_SQL`). A plan made for each call's values
            // was made again for each dedup batch, at milliseconds for its array of ids.
            pooled
                .client
                .batch_execute(&format!(
                    "SET statement_timeout = {ms}; SET plan_cache_mode = force_generic_plan"
                ))
                .await?;
            if !inner.schema_ready.load(Ordering::Acquire) {
                for sql in SCHEMA {
                    create_table(&pooled.client, sql).await?;
                }
                inner.schema_ready.store(true, Ordering::Release);
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        setup.await.map_err(|e| self.pg_error(e))?;
        Ok(pooled)
    }

    /// Drops every idle connection: after a timeout they likely lead to the same hung server.
    fn forget_idle(&self) {
        let idle = std::mem::take(&mut *self.inner.idle.lock().unwrap_or_else(|e| e.into_inner()));
        drop(idle);
    }

    fn error(&self, detail: String) -> DbError {
        DbError {
            url: self.url(),
            detail,
            server: false,
        }
    }

    fn pg_error(&self, e: tokio_postgres::Error) -> DbError {
        let server = e.as_db_error().is_some();
        // The innermost cause says what happened ("Connection refused"), not just "error connecting".
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let detail = if cause.to_string().is_empty() {
            e.to_string()
        } else {
            cause.to_string()
        };
        DbError {
            url: self.url(),
            detail,
            server,
        }
    }
}

/// A connection lent by the pool; back to the pool when dropped, unless it broke or timed out.
pub struct Conn {
    pooled: Option<Pooled>,
    db: Database,
    broken: AtomicBool,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    pub fn client(&self) -> &Client {
        &self.pooled.as_ref().expect("present until dropped").client
    }

    /// `sql` prepared once per connection: later uses are one round trip.
    pub async fn prepared(&mut self, sql: &'static str) -> Result<Statement, DbError> {
        let pooled = self.pooled.as_ref().expect("present until dropped");
        if let Some((_, s)) = pooled.statements.iter().find(|(q, _)| *q == sql) {
            return Ok(s.clone());
        }
        let statement = self.timed(self.client().prepare(sql)).await?;
        let pooled = self.pooled.as_mut().expect("present until dropped");
        pooled.statements.push((sql, statement.clone()));
        Ok(statement)
    }

    /// Runs `work` (statements on [`Conn::client`]) within [`Timeouts::statement`] plus a
    /// margin. A timeout or a lost connection retires this connection and the idle ones.
    pub async fn timed<T>(
        &self,
        work: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        let limit = self.db.inner.timeouts.statement + Duration::from_millis(500);
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.as_db_error().is_none() || e.is_closed() {
                    self.discard();
                }
                Err(self.db.pg_error(e))
            }
            Err(_) => {
                self.discard();
                self.db.forget_idle();
                Err(self.db.error(format!("no answer within {limit:?}")))
            }
        }
    }

    /// Not back to the pool: e.g. after an error in the middle of a transaction.
    pub fn discard(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(p) = self.pooled.take() {
            if !self.broken.load(Ordering::Relaxed) && !p.client.is_closed() {
                self.db
                    .inner
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(p);
            }
        }
    }
}

/// Runs a `CREATE TABLE IF NOT EXISTS`. Two sessions doing so at once can make the loser fail
/// with a unique violation on PostgreSQL's catalog even though the table now exists: that
/// counts as done.
async fn create_table(client: &Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    use tokio_postgres::error::SqlState;
    match client.batch_execute(sql).await {
        Err(e) if matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::DUPLICATE_TABLE) => {
            Ok(())
        }
        other => other,
    }
}

/// `url` naming the database `name` instead of its own, on the same server with the same user
/// and parameters (a database of its own for a test or a benchmark).
pub fn url_of_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (server, _) = base.rsplit_once('/').expect("a database URL ends in /NAME");
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
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
    use super::*;

    #[test]
    fn another_database_on_the_same_server_keeps_user_and_parameters() {
        assert_eq!(
            url_of_database("postgres://u:p@h:5432/orderflow?sslmode=disable", "other"),
            "postgres://u:p@h:5432/other?sslmode=disable"
        );
        assert_eq!(
            url_of_database("postgres://u@h/orderflow", "other"),
            "postgres://u@h/other"
        );
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(redact("postgres://u@h:1/db"), "postgres://u@h:1/db");
        let e = Database::new("postgres://u:secret@h:1/db")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_none(), "a valid URL: {e:?}");
        let bad = Database::new("postgres://u:secret@h:notaport/db")
            .err()
            .unwrap();
        assert!(!bad.to_string().contains("secret"), "{bad}");
    }

    #[tokio::test]
    async fn a_server_that_refuses_is_an_error_within_the_connect_timeout() {
        // Port 1 on loopback: nothing listens.
        let db = Database::with(
            "postgres://u:secret@127.0.0.1:1/db",
            2,
            Timeouts {
                connect: Duration::from_millis(500),
                statement: Duration::from_millis(500),
            },
        )
        .unwrap();
        let started = std::time::Instant::now();
        let e = db.get().await.err().expect("nothing listens");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!e.server && !e.to_string().contains("secret"), "{e}");
    }
}
