//! The order intake against the real stack: 202 only once order.created is on its topic,
//! idempotent POSTs, field-naming 400/422 answers, a bounded 503 when Kafka is down (and nothing
//! accepted lost), and read-your-writes on GET /orders/{id}.

mod common;
mod pg;

use std::time::{Duration, Instant};

use common::*;
use orderflow::intake::{self, Intake};
use orderflow::kafka::Publisher;
use rdkafka::message::Message;
use serde_json::{json, Value};

async fn start(prefix: &str, bootstrap: &str) -> (String, String) {
    start_with(prefix, bootstrap, &database_url()).await
}

async fn start_with(prefix: &str, bootstrap: &str, database_url: &str) -> (String, String) {
    let (codec, topic) = codec(prefix);
    let publisher = Publisher::with_settings(bootstrap, codec, intake::PRODUCER_SETTINGS).unwrap();
    orderflow::kafka::ensure_topics(&bootstrap_or_default(bootstrap), &[(&topic, 3)], 1)
        .await
        .ok();
    let intake = Intake::new(publisher, topic.clone(), database_url)
        .await
        .unwrap();
    let (addr, _) = intake::serve("127.0.0.1:0".parse().unwrap(), intake)
        .await
        .unwrap();
    (format!("http://{addr}"), topic)
}

/// Topic creation needs a live broker even when the intake under test points at a dead one.
fn bootstrap_or_default(bootstrap: &str) -> String {
    if bootstrap.ends_with(":1") {
        common::bootstrap()
    } else {
        bootstrap.to_string()
    }
}

fn order() -> Value {
    json!({
        "customer_id": "customer-42",
        "items": [
            {"sku": "SKU-KEYBOARD", "quantity": 2, "unit_price": {"amount_minor": 4999, "currency": "EUR"}},
            {"sku": "SKU-CABLE", "quantity": 1, "unit_price": {"amount_minor": 799, "currency": "EUR"}}
        ],
        "shipping_address": {"line1": "1 Market Street", "line2": null, "city": "Berlin", "postal_code": "10115", "country": "DE"}
    })
}

async fn post(
    url: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/orders"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_means_on_the_topic_and_idempotent_posts_publish_once() {
    let prefix = prefix("intake");
    let (url, topic) = start(&prefix, &bootstrap()).await;

    let key = format!("checkout-{}", uuid::Uuid::new_v4().simple());
    let (status, headers, body) = post(&url, &order().to_string(), Some(&key)).await;
    assert_eq!(status, 202, "{body}");
    let order_id = body["order_id"].as_str().unwrap().to_string();
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["status_url"], format!("/orders/{order_id}"));
    assert_eq!(headers["location"], format!("/orders/{order_id}").as_str());
    assert!(
        body["correlation_id"].is_string() && body["event_id"].is_string(),
        "{body}"
    );
    // The 202 came after the ack: the record is already there, with the total computed.
    let records = read_topic(&topic);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key(), Some(order_id.as_bytes()));

    // The same key again: the same order, nothing new published.
    let (status, headers, again) = post(&url, &order().to_string(), Some(&key)).await;
    assert_eq!(status, 202);
    assert_eq!(again["order_id"], body["order_id"]);
    assert_eq!(again["event_id"], body["event_id"]);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(read_topic(&topic).len(), 1);
    // The same key with another order is refused.
    let mut other = order();
    other["customer_id"] = json!("customer-43");
    let (status, _, refused) = post(&url, &other.to_string(), Some(&key)).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["field"], "Idempotency-Key");
    // Without a key, two POSTs are two orders.
    let (_, _, first) = post(&url, &order().to_string(), None).await;
    let (_, _, second) = post(&url, &order().to_string(), None).await;
    assert_ne!(first["order_id"], second["order_id"]);
    assert_eq!(read_topic(&topic).len(), 3);

    // Read-your-writes: the caller sees its order as accepted at once; unknown ids are 404.
    let status = reqwest::get(format!("{url}/orders/{order_id}"))
        .await
        .unwrap();
    assert_eq!(status.status().as_u16(), 200);
    let view: Value = status.json().await.unwrap();
    assert_eq!(view["status"], "accepted");
    assert!(view["last_event_time"].is_string());
    let missing = reqwest::get(format!("{url}/orders/{}", uuid::Uuid::now_v7()))
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let bad = reqwest::get(format!("{url}/orders/not-a-uuid"))
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_names_its_field() {
    let prefix = prefix("intake-bad");
    let (url, topic) = start(&prefix, &bootstrap()).await;

    let (status, _, body) = post(&url, "{\"customer_id\": ", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("EOF"), "{body}");

    let mut missing = order();
    missing.as_object_mut().unwrap().remove("customer_id");
    let (status, _, body) = post(&url, &missing.to_string(), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("missing field `customer_id`"),
        "{body}"
    );

    let mut wrong_type = order();
    wrong_type["items"][1]["quantity"] = json!("one");
    let (status, _, body) = post(&url, &wrong_type.to_string(), None).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "items[1].quantity", "{body}");

    let mut unknown = order();
    unknown["coupon"] = json!("FREE");
    let (status, _, body) = post(&url, &unknown.to_string(), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `coupon`"),
        "{body}"
    );

    let mut invalid = order();
    invalid["items"][0]["quantity"] = json!(0);
    invalid["items"][1]["unit_price"]["currency"] = json!("USD");
    invalid["shipping_address"]["country"] = json!("Germany");
    let (status, _, body) = post(&url, &invalid.to_string(), None).await;
    assert_eq!(status, 422, "{body}");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for expected in [
        "items[0].quantity",
        "items[1].unit_price.currency",
        "shipping_address.country",
    ] {
        assert!(fields.contains(&expected), "{expected} not in {fields:?}");
    }
    let mut empty = order();
    empty["items"] = json!([]);
    let (status, _, body) = post(&url, &empty.to_string(), None).await;
    assert_eq!(status, 422);
    assert!(body["errors"].to_string().contains("\"items\""), "{body}");
    // Nothing of it reached the topic.
    assert!(read_topic(&topic).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_is_a_bounded_503_and_nothing_is_accepted() {
    let prefix = prefix("intake-down");
    // A broker address where nothing listens.
    let (url, _) = start(&prefix, "127.0.0.1:1").await;
    let started = Instant::now();
    let (status, headers, body) = post(&url, &order().to_string(), Some("down-1")).await;
    let waited = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "5");
    assert!(
        body["error"].as_str().unwrap().contains("not accepted"),
        "{body}"
    );
    assert!(
        waited < intake::PUBLISH_TIMEOUT + Duration::from_secs(2),
        "answered after {waited:?}"
    );
    // Not accepted: the order reads as not (yet) accepted, never as accepted.
    let key_order = reqwest::Client::new()
        .get(format!("{url}/orders/{}", uuid::Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(key_order.status().as_u16(), 404);
}

/// POSTs a fresh order; returns the status, the Retry-After header and how long it took.
async fn timed_post(url: &str) -> (u16, Option<String>, Duration) {
    let started = Instant::now();
    let (status, headers, _) = post(url, &order().to_string(), None).await;
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, retry_after, started.elapsed())
}

/// POSTs until one is accepted (30 s at most); returns how long that took.
async fn until_accepted(url: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (status, _, _) = timed_post(url).await;
        if status == 202 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still {status} 30 s after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_or_frozen_is_a_503_within_5_s_and_202_once_it_is_back() {
    let mut server = pg::Pg::start().await;
    let prefix = prefix("intake-db");
    let (url, topic) = start_with(&prefix, &bootstrap(), &server.url).await;
    let (status, _, _) = timed_post(&url).await;
    assert_eq!(status, 202);

    let mut report = Vec::new();
    for phase in ["down", "frozen"] {
        match phase {
            "down" => server.down(),
            _ => server.freeze(),
        }
        // Several in a row: the first finds pooled connections, the later ones connect afresh.
        for _ in 0..3 {
            let (status, retry_after, took) = timed_post(&url).await;
            assert_eq!(status, 503, "{phase}");
            assert_eq!(retry_after.as_deref(), Some("5"), "{phase}");
            assert!(
                took < Duration::from_secs(5),
                "{phase}: answered after {took:?}"
            );
            report.push(format!("{phase} 503 after {took:?}"));
        }
        let (status, took) = {
            let started = Instant::now();
            let r = reqwest::get(format!("{url}/orders/{}", uuid::Uuid::now_v7()))
                .await
                .unwrap();
            (r.status().as_u16(), started.elapsed())
        };
        assert_eq!(status, 503, "GET while {phase}");
        assert!(took < Duration::from_secs(5), "GET while {phase}: {took:?}");
        match phase {
            "down" => server.up().await,
            _ => server.thaw(),
        }
        report.push(format!(
            "202 again {:?} after the database was back",
            until_accepted(&url).await
        ));
    }
    eprintln!("{}", report.join("; "));
    // Only the accepted orders reached the topic: the first, and one after each outage.
    assert_eq!(read_topic(&topic).len(), 3);
}
