//! Order intake. Invariant: every answer comes within a bound (503 with `Retry-After` when a
//! dependency is down or hung), and a 202 only once the order is on its topic.
//!
//! `POST /orders` answers `202 Accepted` as soon as `order.created` is on its topic
//! (acks=all), without calling any downstream; the work converges behind it.
//!
//! - A request is validated first: malformed JSON is a 400 naming the field or position, an
//!   order that breaks a rule is a 422 listing every field.
//! - Each accepted request is remembered in PostgreSQL (`orderflow_intake`) under its
//!   `Idempotency-Key` (or its order id when the client sends none), with the event itself,
//!   *before* it is published. A repeated key returns the same order and publishes nothing new;
//!   if the first attempt never got its ack, the retry publishes the very same event (same event
//!   id, which consumers deduplicate), so a timed-out publish cannot turn into two orders.
//! - Kafka, the registry or the database unavailable: 503 with `Retry-After`, after at most
//!   `PUBLISH_TIMEOUT` (Kafka) or `DATABASE_BUDGET` (PostgreSQL, through the pool of
//!   [`crate::database`], which reconnects by itself); never a hang, and never a 202 for an
//!   order that is not on the topic.
//! - `GET /orders/{id}`: what the intake knows (read-your-writes for the caller that placed it).
//! - Key retention: a key is remembered for the window a client may retry in
//!   (`ORDERFLOW_INTAKE_KEY_RETENTION`, default 24 h). A key older than that is free again: the
//!   same key then places a new order. The intake deletes expired keys itself, in bounded batches
//!   (see [`crate::database::retention`]), and serves their gauges on `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::contracts::{
    Address, Envelope, Event, Money, OrderCreated, OrderCreatedData, OrderItem,
};
use crate::database::retention::{self, DEFAULT_INTAKE_WINDOW, INTAKE_SETTING};
use crate::database::Database;
use crate::kafka::{PublishError, Publisher};

/// Longest a POST waits for Kafka before answering 503.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// librdkafka gives a record up before the answer is due, so a 503 means "not written" in all
/// but the rarest cases (and a retry with the same key republishes the same event anyway).
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[("message.timeout.ms", "4500")];
/// Longest a request waits for PostgreSQL (a connection and its statements) before a 503:
/// with Kafka's answer, the whole request stays within what clients are told (5 s per phase).
pub const DATABASE_BUDGET: Duration = Duration::from_secs(4);
const RETRY_AFTER_SECONDS: u64 = 5;
/// Longest a 202 waits for its order to be marked accepted.
const MARK_WAIT: Duration = Duration::from_secs(1);

/// An order as a client sends it: no ids, no envelope, no total (computed here).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub customer_id: String,
    pub items: Vec<OrderItem>,
    pub shipping_address: Address,
}

pub struct Intake {
    publisher: Publisher,
    topic: String,
    db: Database,
    /// How long an idempotency key holds its order.
    key_retention: Duration,
}

impl Intake {
    /// Connects to the database (creating the tables when missing): the intake does not start
    /// without it, but once started it survives the database going away and coming back.
    pub async fn new(
        publisher: Publisher,
        topic: String,
        database_url: &str,
    ) -> anyhow::Result<Intake> {
        let key_retention = retention::window_from_env(INTAKE_SETTING, DEFAULT_INTAKE_WINDOW)?;
        let db = Database::connect(database_url).await?;
        Ok(Intake {
            publisher,
            topic,
            db,
            key_retention,
        })
    }

    /// How long a key holds its order (1 s ..= 365 d; the setting allows 1 min at least).
    pub fn with_key_retention(mut self, window: Duration) -> anyhow::Result<Intake> {
        if !(retention::MIN_WINDOW..=retention::MAX_WINDOW).contains(&window) {
            anyhow::bail!(
                "intake key retention {} is out of bounds (1s to 365d)",
                humantime::format_duration(window)
            );
        }
        self.key_retention = window;
        Ok(self)
    }

    /// Deletes the keys past their retention now (what the server does by itself every few
    /// minutes) and updates the gauges; returns the keys deleted.
    pub async fn expire_keys(&self) -> Result<u64, crate::database::DbError> {
        expire_keys(&self.db, self.key_retention).await
    }
}

async fn expire_keys(db: &Database, window: Duration) -> Result<u64, crate::database::DbError> {
    let conn = db.get().await?;
    let deleted = conn
        .timed(retention::expire_intake(conn.client(), window))
        .await?;
    conn.timed(retention::measure_intake(conn.client(), window))
        .await?;
    Ok(deleted)
}

/// Aborts a task when dropped: the expiry lives as long as the server.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves until the returned task is aborted. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    intake: Intake,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let (db, window) = (intake.db.clone(), intake.key_retention);
    let app = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(order_status))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    crate::telemetry::metrics::encode(),
                )
            }),
        )
        .with_state(Arc::new(intake));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let expiry = tokio::spawn(async move {
        let mut tick = tokio::time::interval(retention::period(window));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = expire_keys(&db, window).await {
                tracing::warn!("intake key expiry did not run: {e}");
            }
        }
    });
    let expiry = AbortOnDrop(expiry.abort_handle());
    let task = tokio::spawn(async move {
        let _expiry = expiry;
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("intake server stopped: {e}");
        }
    });
    Ok((addr, task))
}

fn problem(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn unavailable(what: &str, detail: String) -> Response {
    let mut response = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": format!("{what} is unavailable; the order was not accepted, try again"), "detail": detail}),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
    response
}

fn accepted(order: &OrderCreated, replayed: bool) -> Response {
    let order_id = order.data.order_id;
    let url = format!("/orders/{order_id}");
    let mut response = problem(
        StatusCode::ACCEPTED,
        json!({
            "order_id": order_id,
            "correlation_id": order.envelope.correlation_id,
            "event_id": order.envelope.event_id,
            "status": "accepted",
            "status_url": url,
        }),
    );
    response.headers_mut().insert(
        header::LOCATION,
        url.parse().expect("a path is a header value"),
    );
    if replayed {
        response
            .headers_mut()
            .insert("Idempotent-Replayed", "true".parse().expect("ascii"));
    }
    response
}

async fn create_order(
    State(intake): State<Arc<Intake>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // 400: not JSON, or not the shape of an order; the error names the field (path) or position.
    let deserializer = &mut serde_json::Deserializer::from_slice(&body);
    let request: OrderRequest = match serde_path_to_error::deserialize(deserializer) {
        Ok(request) => request,
        Err(e) => {
            let field = e.path().to_string();
            return problem(
                StatusCode::BAD_REQUEST,
                json!({"error": e.inner().to_string(), "field": field}),
            );
        }
    };
    let key = headers
        .get("Idempotency-Key")
        .map(|v| v.to_str().map(str::to_string))
        .transpose();
    let key = match key {
        Ok(key) => key,
        Err(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                json!({"error": "Idempotency-Key must be visible ASCII", "field": "Idempotency-Key"}),
            )
        }
    };
    if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 255) {
        return problem(
            StatusCode::BAD_REQUEST,
            json!({"error": "Idempotency-Key must be 1 to 255 characters", "field": "Idempotency-Key"}),
        );
    }
    let order = new_order(request);
    // 422: the order breaks a rule; every violation is listed with its field.
    if let Err(invalid) = order.validate() {
        let errors: Vec<Value> = invalid
            .violations
            .iter()
            .map(|v| json!({"field": v.field.trim_start_matches("data."), "problem": v.problem}))
            .collect();
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": "the order is invalid", "errors": errors}),
        );
    }
    let canonical_request =
        serde_json::to_string(&serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
            .unwrap_or_default();
    // Keys are scoped to the topic, so environments sharing a database never collide.
    let key = format!(
        "{}|{}",
        intake.topic,
        key.unwrap_or_else(|| order.data.order_id.to_string())
    );

    // Remember the event under its key before publishing it.
    let event = serde_json::to_string(&order).expect("events serialize");
    let remembered = tokio::time::timeout(
        DATABASE_BUDGET,
        remember(
            &intake.db,
            &key,
            &order,
            &canonical_request,
            &event,
            intake.key_retention,
        ),
    )
    .await;
    let (order, state) = match remembered {
        Ok(Ok(Remembered::New)) => (order, "pending".to_string()),
        Ok(Ok(Remembered::Known {
            request,
            event,
            state,
        })) => {
            if request != canonical_request {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"error": "this Idempotency-Key was used with a different order", "field": "Idempotency-Key"}),
                );
            }
            match serde_json::from_str::<OrderCreated>(&event) {
                Ok(stored) => (stored, state),
                Err(e) => {
                    return unavailable("the intake store", format!("stored event unreadable: {e}"))
                }
            }
        }
        Ok(Err(e)) => return unavailable("the intake database", e.to_string()),
        Err(_) => {
            return unavailable(
                "the intake database",
                format!("no answer within {DATABASE_BUDGET:?}"),
            )
        }
    };
    if state == "accepted" {
        return accepted(&order, true);
    }
    // Publish (or publish again: the same event id, deduplicated downstream), bounded in time.
    match tokio::time::timeout(
        PUBLISH_TIMEOUT,
        intake.publisher.publish(&intake.topic, &order),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(PublishError::Encode(e))) if !e.is_retryable() => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": e.to_string()}),
            );
        }
        Ok(Err(e)) => return unavailable("Kafka or the schema registry", e.to_string()),
        Err(_) => {
            return unavailable(
                "Kafka",
                format!("no acknowledgement within {PUBLISH_TIMEOUT:?}"),
            )
        }
    }
    // The order is on the topic. Marked accepted before answering (read-your-writes), but a
    // database that hangs now delays the 202 by MARK_WAIT at most: the mark goes on in the
    // background (and a retry with the same key republishes the same event if it is lost).
    let (db, order_id) = (intake.db.clone(), order.data.order_id);
    let mark = tokio::spawn(async move {
        let marked = async {
            let conn = db.get().await?;
            conn.timed(conn.client().execute(
                "UPDATE orderflow_intake SET state = 'accepted', accepted_at = now() WHERE idempotency_key = $1",
                &[&key],
            ))
            .await
        };
        if let Err(e) = marked.await {
            tracing::warn!(%order_id, "accepted order not marked in the intake store: {e}");
        }
    });
    let _ = tokio::time::timeout(MARK_WAIT, mark).await;
    accepted(&order, false)
}

enum Remembered {
    New,
    Known {
        request: String,
        event: String,
        state: String,
    },
}

/// Inserts the request under its key, or returns what the key already holds. A key past its
/// retention (not deleted yet) is taken as new: the row is replaced.
async fn remember(
    db: &Database,
    key: &str,
    order: &OrderCreated,
    request: &str,
    event: &str,
    retention: Duration,
) -> Result<Remembered, crate::database::DbError> {
    let conn = db.get().await?;
    let window = retention.as_secs_f64();
    let inserted = conn
        .timed(conn.client().execute(
            "INSERT INTO orderflow_intake (idempotency_key, order_id, request, event, state) \
             VALUES ($1, $2, $3, $4, 'pending') ON CONFLICT (idempotency_key) DO UPDATE SET \
             order_id = EXCLUDED.order_id, request = EXCLUDED.request, event = EXCLUDED.event, \
             state = 'pending', received_at = now(), accepted_at = NULL \
             WHERE orderflow_intake.received_at < now() - $5 * interval '1 second'",
            &[&key, &order.data.order_id, &request, &event, &window],
        ))
        .await?;
    if inserted == 1 {
        return Ok(Remembered::New);
    }
    let row = conn
        .timed(conn.client().query_one(
            "SELECT request, event, state FROM orderflow_intake WHERE idempotency_key = $1",
            &[&key],
        ))
        .await?;
    Ok(Remembered::Known {
        request: row.get(0),
        event: row.get(1),
        state: row.get(2),
    })
}

/// Builds the `order.created` event: new ids, the total from the items.
fn new_order(request: OrderRequest) -> OrderCreated {
    let order_id = Uuid::now_v7();
    let currency = request
        .items
        .first()
        .map(|i| i.unit_price.currency.clone())
        .unwrap_or_default();
    let total = request
        .items
        .iter()
        .try_fold(0i64, |sum, i| {
            i.unit_price
                .amount_minor
                .checked_mul(i64::from(i.quantity))
                .and_then(|line| sum.checked_add(line))
        })
        .unwrap_or(-1);
    OrderCreated {
        envelope: Envelope::new::<OrderCreated>("orderflow/intake", order_id, None),
        data: OrderCreatedData {
            order_id,
            customer_id: request.customer_id,
            items: request.items,
            total: Money {
                amount_minor: total,
                currency,
            },
            shipping_address: request.shipping_address,
        },
    }
}

async fn order_status(State(intake): State<Arc<Intake>>, Path(id): Path<String>) -> Response {
    let Ok(order_id) = Uuid::parse_str(&id) else {
        return problem(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("'{id}' is not an order id (a UUID)"), "field": "id"}),
        );
    };
    match tokio::time::timeout(DATABASE_BUDGET, status_of(&intake.db, order_id)).await {
        Ok(Ok(response)) => response,
        Ok(Err(response)) => response,
        Err(_) => unavailable(
            "the intake database",
            format!("no answer within {DATABASE_BUDGET:?}"),
        ),
    }
}

/// The read model's view of an order, else the intake's own record of it.
async fn status_of(db: &Database, order_id: Uuid) -> Result<Response, Response> {
    let time = |ms: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    };
    let conn = db
        .get()
        .await
        .map_err(|e| unavailable("the intake database", e.to_string()))?;
    // The read model first; an order it has not seen yet but the intake accepted is `accepted`.
    let view = conn
        .timed(async { Ok(crate::projection::find(conn.client(), order_id).await) })
        .await
        .map_err(|e| unavailable("the order-status read model", e.to_string()))?;
    match view {
        Ok(Some(view)) => {
            let steps: serde_json::Map<String, Value> = view
                .sources
                .iter()
                .map(|(source, e)| (source.clone(), json!(e.event_type)))
                .collect();
            let now = crate::contracts::events::now_millis();
            return Ok(problem(
                StatusCode::OK,
                json!({
                    "order_id": order_id,
                    "status": view.status.as_str(),
                    "version": view.version,
                    "pending": view.pending(),
                    "steps": steps,
                    "last_event_time": time(view.last_event_at),
                    "projected_at": time(view.projected_at),
                    "status_since": time(view.status_since),
                    "status_since_ms": view.status_since,
                    "staleness_seconds": (now - view.last_event_at).max(0) as f64 / 1000.0,
                }),
            ));
        }
        Ok(None) => {}
        Err(e) => return Err(unavailable("the order-status read model", e)),
    }
    let row = conn
        .timed(conn.client().query_opt(
            "SELECT state, extract(epoch from coalesce(accepted_at, received_at))::float8 FROM orderflow_intake WHERE order_id = $1",
            &[&order_id],
        ))
        .await;
    match row {
        Ok(Some(row)) => {
            let state: String = row.get(0);
            let at: f64 = row.get(1);
            let status = if state == "accepted" {
                "accepted"
            } else {
                "accepting"
            };
            Ok(problem(
                StatusCode::OK,
                json!({
                    "order_id": order_id,
                    "status": status,
                    "version": 0,
                    "pending": crate::projection::STEPS,
                    "steps": {},
                    "last_event_time": time((at * 1000.0) as i64),
                }),
            ))
        }
        Ok(None) => Ok(problem(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no order {order_id}")}),
        )),
        Err(e) => Err(unavailable("the intake database", e.to_string())),
    }
}
