//! Throughput of one fan-out processor and the accuracy of retry tiers, against the running
//! stack (`eval "$(scripts/stack up)" && cargo bench --bench fanout`).
//!
//! 1. Fan-out: N `order.created` events are published first; then one processor decodes,
//!    validates and copies each to four topics, storing offsets after all four acks. Reported:
//!    events/s from the first to the last event, and CPU seconds per million events. Once
//!    without and once with the dedup store.
//! 2. Retry lateness: an HTTP step whose downstream answers 500 to a share of events one, two or
//!    three times; reported per tier: p50/p99 of handled time minus due time.
//!
//! ORDERFLOW_BENCH_EVENTS (default 20000), ORDERFLOW_BENCH_RETRY_EVENTS (default 300).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use futures::future::join_all;
use orderflow::cli::{processors, Connect};
use orderflow::contracts::{Catalog, EventCodec, OrderCreated, SubjectStrategy};
use orderflow::kafka::Publisher;
use orderflow::pipeline;
use orderflow::telemetry::Telemetry;
use serde_json::{json, Value};
use tokio::sync::watch;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn connect(prefix: &str) -> Connect {
    let var =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
    Connect {
        bootstrap_servers: var("ORDERFLOW_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        registry_url: var(
            "ORDERFLOW_REGISTRY_URL",
            "http://127.0.0.1:18081/apis/ccompat/v7",
        ),
        database_url: var(
            "ORDERFLOW_DATABASE_URL",
            "postgres://orderflow@127.0.0.1:15432/orderflow",
        ),
        schemas_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/avro").into(),
        topic_prefix: prefix.to_string(),
        subject_strategy: SubjectStrategy::Topic,
        replication_factor: 1,
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn publish(connect: &Connect, count: usize) -> String {
    let catalog = Arc::new(Catalog::load(&connect.schemas_dir).unwrap());
    let codec = Arc::new(
        EventCodec::with_naming(&connect.registry_url, catalog, connect.naming()).unwrap(),
    );
    let publisher = Publisher::new(&connect.bootstrap_servers, codec).unwrap();
    let topic = connect.naming().topic("order.created");
    let orders: Vec<OrderCreated> = (0..count).map(|_| OrderCreated::sample("bench")).collect();
    for chunk in orders.chunks(2000) {
        for result in join_all(chunk.iter().map(|o| publisher.publish(&topic, o))).await {
            result.unwrap();
        }
    }
    topic
}

async fn start(
    connect: &Connect,
    yaml: &str,
    dedup: bool,
) -> (Telemetry, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let p = pipeline::parse(
        Path::new("bench.yaml"),
        yaml,
        &orderflow::steps::HANDLER_NAMES,
    )
    .unwrap();
    let mut ps = processors(connect, vec![p], dedup).await.unwrap();
    let processor = ps.remove(0);
    let telemetry = processor.telemetry();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { processor.run(stopped).await.unwrap() });
    (telemetry, stop, task)
}

async fn fan_out(events: usize, dedup: bool) {
    let prefix = format!(
        "bench-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let connect = connect(&prefix);
    publish(&connect, events).await;
    let yaml = "name: fanout\ngroup: fanout\ninputs: [order.created]\nstep: {route: {to: [a.orders, b.orders, c.orders, d.orders]}}\n";
    let (telemetry, stop, task) = start(&connect, yaml, dedup).await;
    while telemetry.snapshot().consumed == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (started, cpu_started) = (Instant::now(), cpu_seconds());
    while telemetry.snapshot().succeeded < events as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_started);
    stop.send(true).unwrap();
    task.await.unwrap();
    let s = telemetry.snapshot();
    assert_eq!(
        (s.succeeded, s.dead_lettered, s.produced),
        (events as u64, 0, 4 * events as u64)
    );
    println!(
        "fan-out x4, dedup {:<3}: {events} events in {elapsed:.2} s = {:>7.0} events/s, {:.1} CPU s per million events (bench process)",
        if dedup { "on" } else { "off" },
        events as f64 / elapsed,
        cpu / events as f64 * 1e6,
    );
}

/// Answers 500 to an order as many times as its script says, then 200.
async fn flaky(
    State(failures): State<Arc<Mutex<HashMap<String, u32>>>>,
    Json(order): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let order_id = order["data"]["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut failures = failures.lock().unwrap();
    if let Some(left) = failures.get_mut(&order_id).filter(|left| **left > 0) {
        *left -= 1;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "scripted"})),
        );
    }
    (
        StatusCode::OK,
        Json(
            json!({"order_id": order_id, "channel": "email", "recipient": "a@example.com", "template": "t"}),
        ),
    )
}

async fn retry_lateness(events: usize) {
    let prefix = format!(
        "bench-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let connect = connect(&prefix);
    let failures: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let app = Router::new()
        .route("/notify", post(flaky))
        .with_state(failures.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let yaml = format!(
        "name: lateness\ngroup: lateness\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/notify\n    emit: {{\"2xx\": notification.sent}}\nretry:\n  tiers: [1s, 2s, 4s, 8s, 16s]\n"
    );
    let (telemetry, stop, task) = start(&connect, &yaml, false).await;
    // 10 % of the events fail once, twice or three times before they succeed.
    let catalog = Arc::new(Catalog::load(&connect.schemas_dir).unwrap());
    let codec = Arc::new(
        EventCodec::with_naming(&connect.registry_url, catalog, connect.naming()).unwrap(),
    );
    let publisher = Publisher::new(&connect.bootstrap_servers, codec).unwrap();
    let topic = connect.naming().topic("order.created");
    let mut retried = 0;
    for i in 0..events {
        let order = OrderCreated::sample("bench");
        if i % 10 == 0 {
            failures
                .lock()
                .unwrap()
                .insert(order.data.order_id.to_string(), 1 + (i / 10 % 3) as u32);
            retried += 1;
        }
        publisher.publish(&topic, &order).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while telemetry.snapshot().succeeded < events as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    let s = telemetry.snapshot();
    println!(
        "retry lateness: {events} events at 50/s, {retried} failing 1-3 times with 500; succeeded {}, DLQ {}, retried per tier {:?}",
        s.succeeded,
        s.dead_lettered,
        &s.retried[..3]
    );
    for tier in 1..=3 {
        let mut samples = telemetry.retry_lateness_ms(tier);
        samples.sort_unstable();
        println!(
            "  tier {tier}: {:>3} retries, lateness p50 {:>4} ms, p99 {:>4} ms, max {:>4} ms",
            samples.len(),
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            samples.last().copied().unwrap_or(0)
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let events = env_or("ORDERFLOW_BENCH_EVENTS", 20_000);
        fan_out(events, false).await;
        fan_out(events, true).await;
        retry_lateness(env_or("ORDERFLOW_BENCH_RETRY_EVENTS", 300)).await;
    });
}
