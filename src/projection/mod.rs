//! The order-status read model. Invariant: an order's view never moves backwards, and no
//! update or read waits on PostgreSQL beyond the pool's timeouts ([`crate::database`]).
//!
//! Per order, where it stands (status, the latest event of each
//! source, what is pending) and a version, in PostgreSQL (`orderflow_order_status`), kept by the
//! `order-status` pipeline and read by `GET /orders/{id}`.
//!
//! Updates never move an order backwards: each source (order, inventory, payment, shipment,
//! notification) keeps only its newest event, compared by (lifecycle rank, occurred_at, event
//! id), so a duplicate or an out-of-order event changes nothing and is counted as a conflict.
//! The rank puts e.g. `payment.refunded` after `payment.charged` even if clocks disagree.
//!
//! Why PostgreSQL: one row per order read by id, a compare-and-set update under a row lock
//! (`SELECT ... FOR UPDATE`) so replicas of the pipeline cannot overwrite each other, and it is
//! already the store of the dedup marks and the intake's idempotency keys.
//!
//! Retention: a finished order (confirmed or cancelled) is kept for a window after it became
//! final (`ORDERFLOW_READ_MODEL_RETENTION`, default 30 days), then deleted in bounded batches by
//! the pipeline itself (every few minutes) or `orderflow retention run`. An order in flight is
//! never deleted. A setting out of bounds is logged and nothing is deleted (keeping is the safe
//! side); `retention run` refuses it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contracts::events::now_millis;
use crate::contracts::{AnyEvent, OrderStatus};
use crate::database::{retention, Database};
use crate::failure::Failure;
use crate::steps::Handler;
use crate::telemetry::projection::{ProjectionEvent, ProjectionTelemetry};

/// The steps an order goes through before it is confirmed.
pub const STEPS: [&str; 3] = ["inventory", "payment", "shipment"];

/// The newest event of one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEvent {
    pub event_type: String,
    pub event_id: Uuid,
    pub occurred_at: i64,
}

/// One order as the read model holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub order_id: Uuid,
    pub status: OrderStatus,
    pub version: i64,
    /// By source: order, inventory, payment, shipment, notification.
    pub sources: BTreeMap<String, SourceEvent>,
    pub last_event_at: i64,
    pub projected_at: i64,
    /// When the status last changed (projection time, ms): e.g. when it became final.
    pub status_since: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Merge {
    Applied(OrderView),
    /// The same event again.
    Duplicate,
    /// Older than what its source already shows.
    Stale,
}

/// Where an event stands in its source's lifecycle: a compensation comes after what it undoes,
/// an end after the start, whatever the clocks say.
fn rank(event_type: &str) -> u8 {
    match event_type {
        "order.confirmed" | "order.cancelled" => 2,
        "inventory.released" | "payment.refunded" => 1,
        _ => 0,
    }
}

fn source_of(event_type: &str) -> &str {
    event_type.split('.').next().unwrap_or(event_type)
}

/// Applies `event` to `current` (the stored view, if any).
pub fn merge(current: Option<&OrderView>, event: &AnyEvent, now: i64) -> Merge {
    let envelope = event.envelope();
    let event_type = event.event_type();
    let order_id = Uuid::parse_str(&event.key()).unwrap_or_default();
    let mut view = current.cloned().unwrap_or(OrderView {
        order_id,
        status: OrderStatus::Placed,
        version: 0,
        sources: BTreeMap::new(),
        last_event_at: 0,
        projected_at: now,
        status_since: now,
    });
    let source = source_of(event_type).to_string();
    let incoming = SourceEvent {
        event_type: event_type.to_string(),
        event_id: envelope.event_id,
        occurred_at: envelope.occurred_at,
    };
    if let Some(known) = view.sources.get(&source) {
        if known.event_id == incoming.event_id {
            return Merge::Duplicate;
        }
        let key = |e: &SourceEvent| (rank(&e.event_type), e.occurred_at, e.event_id);
        if key(&incoming) < key(known) {
            return Merge::Stale;
        }
    }
    view.sources.insert(source, incoming);
    view.version += 1;
    view.last_event_at = view.last_event_at.max(envelope.occurred_at);
    view.projected_at = now;
    let status = status_of(&view.sources);
    if status != view.status {
        view.status = status;
        view.status_since = now;
    }
    Merge::Applied(view)
}

fn status_of(sources: &BTreeMap<String, SourceEvent>) -> OrderStatus {
    let latest = |s: &str| sources.get(s).map(|e| e.event_type.as_str());
    match latest("order") {
        Some("order.confirmed") => return OrderStatus::Confirmed,
        Some("order.cancelled") => return OrderStatus::Cancelled,
        _ => {}
    }
    let failed = sources.values().any(|e| {
        matches!(
            e.event_type.as_str(),
            "inventory.reservation-failed"
                | "payment.failed"
                | "shipment.scheduling-failed"
                | "inventory.released"
                | "payment.refunded"
        )
    });
    if failed {
        OrderStatus::Cancelling
    } else if STEPS.iter().any(|s| sources.contains_key(*s)) {
        OrderStatus::Processing
    } else {
        OrderStatus::Placed
    }
}

impl OrderView {
    /// The steps not done yet (none once the order is confirmed or cancelled).
    pub fn pending(&self) -> Vec<&'static str> {
        match self.status {
            OrderStatus::Confirmed | OrderStatus::Cancelled => Vec::new(),
            OrderStatus::Cancelling => vec!["cancellation"],
            _ => STEPS
                .into_iter()
                .filter(|s| !self.sources.contains_key(*s))
                .collect(),
        }
    }
}

/// The read model's table (`orderflow_order_status`, created by [`crate::database`]).
pub struct OrderStatusStore {
    db: Result<Database, String>,
}

impl OrderStatusStore {
    /// Connects on first use; a bad URL is reported by every call.
    pub fn new(url: &str) -> OrderStatusStore {
        OrderStatusStore {
            db: Database::new(url).map_err(|e| e.to_string()),
        }
    }

    /// Applies one event under the row's lock, in one transaction bounded by the pool's
    /// statement timeout; returns how it went.
    pub async fn apply(&self, event: &AnyEvent) -> Result<Merge, String> {
        let db = self.db.as_ref().map_err(Clone::clone)?;
        let order_id = Uuid::parse_str(&event.key()).map_err(|e| e.to_string())?;
        let conn = db.get().await.map_err(|e| e.to_string())?;
        let client = conn.client();
        let work = async {
            client.batch_execute("BEGIN").await?;
            // FOR UPDATE locks nothing while the order has no row yet: two first events of one
            // order (on different topics, handled at once) would each insert their own view and
            // the later would erase the earlier's source. This lock serialises them.
            client
                .execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))",
                    &[&order_id.to_string()],
                )
                .await?;
            let row = client
                .query_opt(
                    "SELECT status, version, sources, last_event_at, projected_at, status_since FROM orderflow_order_status WHERE order_id = $1 FOR UPDATE",
                    &[&order_id],
                )
                .await?;
            let current = match row.map(|r| view_of(order_id, &r)).transpose() {
                Ok(current) => current,
                Err(e) => return Ok(Err(e)),
            };
            let merged = merge(current.as_ref(), event, now_millis());
            if let Merge::Applied(view) = &merged {
                let sources = serde_json::to_string(&view.sources).expect("sources serialize");
                client.execute(
                    "INSERT INTO orderflow_order_status (order_id, status, version, sources, last_event_at, projected_at, status_since) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (order_id) DO UPDATE SET \
                     status = $2, version = $3, sources = $4, last_event_at = $5, projected_at = $6, status_since = $7",
                    &[&order_id, &view.status.as_str(), &view.version, &sources, &view.last_event_at, &view.projected_at, &view.status_since],
                )
                .await?;
            }
            client.batch_execute("COMMIT").await?;
            Ok(Ok(merged))
        };
        match conn.timed(work).await {
            Ok(Ok(merged)) => Ok(merged),
            // Left inside a transaction: the connection is not reused.
            Ok(Err(e)) => {
                conn.discard();
                Err(e)
            }
            Err(e) => {
                conn.discard();
                Err(e.to_string())
            }
        }
    }
}

fn view_of(order_id: Uuid, row: &tokio_postgres::Row) -> Result<OrderView, String> {
    let status: String = row.get(0);
    let sources: String = row.get(2);
    Ok(OrderView {
        order_id,
        status: OrderStatus::from_stored(&status),
        version: row.get(1),
        sources: serde_json::from_str(&sources)
            .map_err(|e| format!("stored sources of {order_id} are unreadable: {e}"))?,
        last_event_at: row.get(3),
        projected_at: row.get(4),
        status_since: row.get(5),
    })
}

/// Reads one order's view with `client` (bound it with [`crate::database::Conn::timed`]);
/// `None` when not projected.
pub async fn find(
    client: &tokio_postgres::Client,
    order_id: Uuid,
) -> Result<Option<OrderView>, String> {
    let row = client
        .query_opt(
            "SELECT status, version, sources, last_event_at, projected_at, status_since FROM orderflow_order_status WHERE order_id = $1",
            &[&order_id],
        )
        .await
        .map_err(|e| e.to_string())?;
    row.map(|r| view_of(order_id, &r)).transpose()
}

/// The `order-status` custom handler: projects each event, publishes nothing.
pub struct OrderStatusHandler {
    store: Arc<OrderStatusStore>,
    telemetry: ProjectionTelemetry,
    /// How long finished orders are kept; None: kept for ever (the setting was refused).
    retention: Option<Duration>,
    /// The periodic expiry, started by the first event (inside the runtime), stopped on drop.
    expiry: std::sync::OnceLock<tokio::task::AbortHandle>,
}

impl OrderStatusHandler {
    /// Finished orders kept for `ORDERFLOW_READ_MODEL_RETENTION` (default 30 days).
    pub fn new(database_url: &str) -> OrderStatusHandler {
        let retention = match retention::window_from_env(
            retention::READ_MODEL_SETTING,
            retention::DEFAULT_READ_MODEL_WINDOW,
        ) {
            Ok(window) => Some(window),
            Err(e) => {
                tracing::error!("{e}; finished orders are kept until the setting is fixed");
                None
            }
        };
        OrderStatusHandler::with_retention(database_url, retention)
    }

    /// Finished orders kept for `retention` after they became final (None: for ever).
    pub fn with_retention(database_url: &str, retention: Option<Duration>) -> OrderStatusHandler {
        OrderStatusHandler {
            store: Arc::new(OrderStatusStore::new(database_url)),
            telemetry: ProjectionTelemetry::new("order-status"),
            retention,
            expiry: std::sync::OnceLock::new(),
        }
    }

    fn start_expiry(&self) {
        let (Some(window), Ok(db)) = (self.retention, self.store.db.clone()) else {
            return;
        };
        self.expiry.get_or_init(|| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(retention::period(window));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = expire_finished(&db, window).await {
                        tracing::warn!("read-model expiry did not run: {e}");
                    }
                }
            })
            .abort_handle()
        });
    }
}

impl Drop for OrderStatusHandler {
    fn drop(&mut self) {
        if let Some(expiry) = self.expiry.get() {
            expiry.abort();
        }
    }
}

/// Deletes the finished orders past `window` (bounded batches), then updates the gauges.
pub async fn expire_finished(
    db: &Database,
    window: Duration,
) -> Result<u64, crate::database::DbError> {
    let conn = db.get().await?;
    let deleted = conn
        .timed(retention::expire_read_model(conn.client(), window))
        .await?;
    conn.timed(retention::measure_read_model(conn.client(), window))
        .await?;
    Ok(deleted)
}

impl Handler for OrderStatusHandler {
    fn handle<'a>(&'a self, event: &'a AnyEvent) -> BoxFuture<'a, Result<Vec<AnyEvent>, Failure>> {
        async move {
            self.start_expiry();
            match self.store.apply(event).await.map_err(Failure::Dependency)? {
                Merge::Applied(view) => self.telemetry.emit(ProjectionEvent::Applied {
                    status: view.status.as_str(),
                    lag_ms: view.projected_at - event.envelope().occurred_at,
                }),
                Merge::Duplicate => self.telemetry.emit(ProjectionEvent::Conflict {
                    reason: "duplicate",
                    event_type: event.event_type(),
                }),
                Merge::Stale => self.telemetry.emit(ProjectionEvent::Conflict {
                    reason: "out_of_order",
                    event_type: event.event_type(),
                }),
            }
            Ok(Vec::new())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::OrderCreated;

    fn after(cause: &AnyEvent, event_type: &str, data: serde_json::Value) -> AnyEvent {
        AnyEvent::from_data(event_type, data, "test", cause.envelope()).unwrap()
    }

    /// order.created and the events of a confirmed order, in the order they happen.
    fn confirmed_flow() -> Vec<AnyEvent> {
        let order = AnyEvent::OrderCreated(OrderCreated::sample("test"));
        let AnyEvent::OrderCreated(o) = &order else {
            unreachable!()
        };
        let id = o.data.order_id.to_string();
        let mut events = vec![order.clone()];
        let mut next = |t: &str, data: serde_json::Value| {
            std::thread::sleep(Duration::from_millis(2));
            let e = after(&order, t, data);
            events.push(e);
        };
        next(
            "inventory.reserved",
            serde_json::json!({"order_id": id, "reservation_id": Uuid::now_v7().to_string(), "lines": [{"sku": "A", "quantity": 1}]}),
        );
        next(
            "payment.charged",
            serde_json::json!({"order_id": id, "payment_id": Uuid::now_v7().to_string(), "amount": o.data.total}),
        );
        next(
            "shipment.scheduled",
            serde_json::json!({"order_id": id, "shipment_id": Uuid::now_v7().to_string(), "carrier": "dhl"}),
        );
        next(
            "order.confirmed",
            serde_json::json!({"order_id": id, "total": o.data.total}),
        );
        events
    }

    fn project(events: &[&AnyEvent]) -> (OrderView, usize) {
        let mut view: Option<OrderView> = None;
        let mut conflicts = 0;
        for e in events {
            match merge(view.as_ref(), e, now_millis()) {
                Merge::Applied(v) => view = Some(v),
                Merge::Duplicate | Merge::Stale => conflicts += 1,
            }
        }
        (view.unwrap(), conflicts)
    }

    #[test]
    fn in_order_the_status_follows_the_events() {
        let flow = confirmed_flow();
        let mut view = None;
        let mut statuses = Vec::new();
        for e in &flow {
            let Merge::Applied(v) = merge(view.as_ref(), e, now_millis()) else {
                panic!()
            };
            statuses.push(v.status.as_str());
            view = Some(v);
        }
        assert_eq!(
            statuses,
            [
                "placed",
                "processing",
                "processing",
                "processing",
                "confirmed"
            ]
        );
        let view = view.unwrap();
        assert_eq!(view.version, 5);
        assert!(view.pending().is_empty());
    }

    #[test]
    fn duplicates_and_out_of_order_events_cannot_move_an_order_backwards() {
        let flow = confirmed_flow();
        // Every permutation-ish shuffle with duplicates ends confirmed with the same sources.
        let (expected, _) = project(&flow.iter().collect::<Vec<_>>());
        for _ in 0..200 {
            let mut shuffled: Vec<&AnyEvent> = flow.iter().chain(flow.iter().take(3)).collect();
            fastrand::shuffle(&mut shuffled);
            let (view, conflicts) = project(&shuffled);
            assert_eq!(view.status, OrderStatus::Confirmed);
            assert_eq!(view.sources, expected.sources);
            assert!(conflicts >= 3, "the three repeats at least");
        }
        // The confirmation first, then an older order.created: still confirmed.
        let (view, conflicts) = project(&[&flow[4], &flow[0]]);
        assert_eq!((view.status, conflicts), (OrderStatus::Confirmed, 1));
    }

    #[test]
    fn a_compensation_wins_over_what_it_undoes_whatever_the_clocks() {
        let flow = confirmed_flow();
        let AnyEvent::InventoryReserved(r) = &flow[1] else {
            panic!()
        };
        let mut released = after(
            &flow[0],
            "inventory.released",
            serde_json::to_value(&r.data).unwrap(),
        );
        if let AnyEvent::InventoryReleased(e) = &mut released {
            e.envelope.occurred_at = flow[1].envelope().occurred_at - 60_000; // a slow clock
        }
        let (view, conflicts) = project(&[&flow[0], &released, &flow[1]]);
        assert_eq!(view.sources["inventory"].event_type, "inventory.released");
        assert_eq!((view.status, conflicts), (OrderStatus::Cancelling, 1));
        assert_eq!(view.pending(), ["cancellation"]);
    }
}
