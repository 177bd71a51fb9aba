//! Simulated downstream services for the demo: payment, inventory, shipping and notification,
//! over HTTP on loopback, with latency, failure and decline rates as settings. Like a real payment API they are
//! idempotent: a request repeating an `Idempotency-Key` gets the first answer again, and only a
//! success is remembered (a failed attempt may be retried for real).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// How the simulated services behave. Each rate is the chance of that answer per request.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub latency_ms: RangeInclusive<u64>,
    /// 503: transient, retried at once.
    pub rate_503: f64,
    /// 500: service error, retried through the tiers.
    pub rate_500: f64,
    /// 400: permanent, straight to the dead-letter topic.
    pub rate_400: f64,
    /// Business answers, not errors: a payment declined (402), stock missing (409), no carrier
    /// for the address (422). The order saga compensates and cancels.
    pub rate_declined: f64,
    pub rate_out_of_stock: f64,
    pub rate_unshippable: f64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency_ms: 2..=20,
            rate_503: 0.0,
            rate_500: 0.0,
            rate_400: 0.0,
            rate_declined: 0.0,
            rate_out_of_stock: 0.0,
            rate_unshippable: 0.0,
        }
    }
}

/// Requests answered, by status class, for the demo's report.
#[derive(Debug, Default)]
pub struct Served {
    pub ok: AtomicU64,
    pub s503: AtomicU64,
    pub s500: AtomicU64,
    pub s400: AtomicU64,
    pub repeated: AtomicU64,
}

struct Shared {
    behaviour: Behaviour,
    served: Arc<Served>,
    answers: Mutex<HashMap<String, (StatusCode, Value)>>,
}

type Answer = (StatusCode, Json<Value>);

/// The environment variables the shipped pipeline files read their URLs from, each pointing at
/// the simulated service under `base` (e.g. `http://127.0.0.1:18090`).
pub fn pipeline_url_env(base: &str) -> Vec<(&'static str, String)> {
    [
        ("ORDERFLOW_PAYMENT_URL", "payments"),
        ("ORDERFLOW_REFUND_URL", "refunds"),
        ("ORDERFLOW_INVENTORY_URL", "reservations"),
        ("ORDERFLOW_RELEASE_URL", "reservations/release"),
        ("ORDERFLOW_SHIPPING_URL", "shipments"),
        ("ORDERFLOW_NOTIFICATION_URL", "notifications"),
    ]
    .into_iter()
    .map(|(var, path)| (var, format!("{base}/{path}")))
    .collect()
}

/// Serves until the returned handle's task is aborted. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    behaviour: Behaviour,
) -> std::io::Result<(SocketAddr, Arc<Served>, tokio::task::JoinHandle<()>)> {
    let served = Arc::new(Served::default());
    let shared = Arc::new(Shared {
        behaviour,
        served: served.clone(),
        answers: Mutex::default(),
    });
    let app = Router::new()
        .route("/payments", post(payments))
        .route("/reservations", post(reservations))
        .route("/reservations/release", post(releases))
        .route("/refunds", post(refunds))
        .route("/shipments", post(shipments))
        .route("/notifications", post(notifications))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("simulated downstreams stopped: {e}");
        }
    });
    Ok((addr, served, task))
}

/// Latency, injected failures and idempotency around one service's real answer.
async fn answer(
    shared: &Shared,
    service: &str,
    headers: &HeaderMap,
    ok: impl FnOnce() -> (StatusCode, Value),
) -> Answer {
    let b = &shared.behaviour;
    tokio::time::sleep(Duration::from_millis(fastrand::u64(b.latency_ms.clone()))).await;
    let key = headers
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("{service}/{k}"));
    if let Some(key) = &key {
        if let Some((status, body)) = shared.answers.lock().unwrap().get(key) {
            shared.served.repeated.fetch_add(1, Ordering::Relaxed);
            return (*status, Json(body.clone()));
        }
    }
    let roll = fastrand::f64();
    let served = &shared.served;
    if roll < b.rate_503 {
        served.s503.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "overloaded, try again"})),
        );
    }
    if roll < b.rate_503 + b.rate_500 {
        served.s500.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "database unavailable"})),
        );
    }
    if roll < b.rate_503 + b.rate_500 + b.rate_400 {
        served.s400.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{service} refuses this order")})),
        );
    }
    let (status, body) = ok();
    served.ok.fetch_add(1, Ordering::Relaxed);
    if let Some(key) = key {
        shared
            .answers
            .lock()
            .unwrap()
            .insert(key, (status, body.clone()));
    }
    (status, Json(body))
}

fn order_id(order: &Value) -> Value {
    order["data"]["order_id"].clone()
}

/// `payment.charge-requested` -> `payment.charged`, or 402 with the data of `payment.failed`.
async fn payments(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(command): Json<Value>,
) -> Answer {
    let declined = fastrand::f64() < shared.behaviour.rate_declined;
    answer(&shared, "payments", &headers, || {
        let data = &command["data"];
        if declined {
            return (
                StatusCode::PAYMENT_REQUIRED,
                json!({
                    "order_id": order_id(&command),
                    "amount": data["amount"],
                    "reason": "card declined: insufficient funds",
                }),
            );
        }
        (
            StatusCode::OK,
            json!({
                "order_id": order_id(&command),
                "payment_id": uuid::Uuid::now_v7().to_string(),
                "amount": data["amount"],
            }),
        )
    })
    .await
}

/// `payment.refund-requested` -> `payment.refunded`.
async fn refunds(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(command): Json<Value>,
) -> Answer {
    answer(&shared, "refunds", &headers, || {
        let data = &command["data"];
        (
            StatusCode::OK,
            json!({
                "order_id": order_id(&command),
                "payment_id": data["payment_id"],
                "amount": data["amount"],
            }),
        )
    })
    .await
}

/// `inventory.reservation-requested` -> `inventory.reserved`, or 409 with the data of
/// `inventory.reservation-failed`.
async fn reservations(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(command): Json<Value>,
) -> Answer {
    let out_of_stock = fastrand::f64() < shared.behaviour.rate_out_of_stock;
    answer(&shared, "reservations", &headers, || {
        let lines = command["data"]["lines"].clone();
        if out_of_stock {
            return (
                StatusCode::CONFLICT,
                json!({
                    "order_id": order_id(&command),
                    "reason": "out of stock",
                    "unavailable_skus": [lines[0]["sku"]],
                }),
            );
        }
        (
            StatusCode::OK,
            json!({
                "order_id": order_id(&command),
                "reservation_id": uuid::Uuid::now_v7().to_string(),
                "lines": lines,
            }),
        )
    })
    .await
}

/// `inventory.release-requested` -> `inventory.released`.
async fn releases(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(command): Json<Value>,
) -> Answer {
    answer(&shared, "releases", &headers, || {
        let data = &command["data"];
        (
            StatusCode::OK,
            json!({
                "order_id": order_id(&command),
                "reservation_id": data["reservation_id"],
                "lines": data["lines"],
            }),
        )
    })
    .await
}

/// `shipment.scheduling-requested` -> `shipment.scheduled`, or 422 with the data of
/// `shipment.scheduling-failed`.
async fn shipments(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(command): Json<Value>,
) -> Answer {
    let unshippable = fastrand::f64() < shared.behaviour.rate_unshippable;
    answer(&shared, "shipments", &headers, || {
        if unshippable {
            let postal = command["data"]["address"]["postal_code"]
                .as_str()
                .unwrap_or("?");
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "order_id": order_id(&command),
                    "reason": format!("no carrier serves postal code {postal}"),
                }),
            );
        }
        (
            StatusCode::OK,
            json!({
                "order_id": order_id(&command),
                "shipment_id": uuid::Uuid::now_v7().to_string(),
                "carrier": "dhl",
            }),
        )
    })
    .await
}

async fn notifications(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(order): Json<Value>,
) -> Answer {
    answer(&shared, "notifications", &headers, || {
        let customer = order["data"]["customer_id"].as_str().unwrap_or("customer");
        (
            StatusCode::OK,
            json!({
                "order_id": order_id(&order),
                "channel": "email",
                "recipient": format!("{customer}@example.com"),
                "template": "order-received",
            }),
        )
    })
    .await
}
