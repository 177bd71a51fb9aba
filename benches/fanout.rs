//! orderflow against the limit and a JVM peer, on the running broker, in one run
//! (`scripts/bench`, or `eval "$(scripts/stack up)" && cargo bench --bench fanout`).
//!
//! Per run, N `order.created` events are published to a fresh topic; then, back to back, each
//! of these reads all N with its own group:
//! 1. limit: Kafka's perf tools from the broker's jars (`scripts/kafka-perf`, same count and
//!    record size) and a raw rdkafka passthrough (consume, produce to four topics, no decode);
//! 2. orderflow fan-out: decode + validate + four outputs + offset after the acks, without and
//!    with the dedup store;
//! 3. the JVM peer: the same fan-out with kafka-clients and Avro (`scripts/bench-jvm-peer`).
//!
//! Then, once: end-to-end latency of the fan-out at a fixed offered load below saturation
//! (p50/p99/p999); retry lateness per tier and the main topic's p99 with 0 % and 10 % of the
//! events going through retries; the footprint of `orderflow run` as its own process (start to
//! ready, start to first event, resident memory at steady load).
//! Figures are medians of the runs; ratios compare figures of the same runs.
//!
//! ORDERFLOW_BENCH_EVENTS (default 20000), ORDERFLOW_BENCH_RUNS (3), ORDERFLOW_BENCH_RATE
//! (offered load, events/s, 1000), ORDERFLOW_BENCH_SECONDS (10), ORDERFLOW_BENCH_RETRY_EVENTS
//! (300), ORDERFLOW_BENCH_JVM (1; 0 skips the JVM peer and the perf tools),
//! ORDERFLOW_BENCH_THROUGHPUT_ONLY (0; 1 stops after the throughput runs, for profiling).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use futures::future::join_all;
use orderflow::cli::{processors, Connect};
use orderflow::contracts::{Catalog, EventCodec, OrderCreated};
use orderflow::kafka::Publisher;
use orderflow::pipeline;
use orderflow::telemetry::Telemetry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::{json, Value};
use tokio::sync::watch;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn connect(prefix: &str) -> Connect {
    Connect::local(prefix)
}

fn fresh_prefix() -> String {
    format!(
        "bench-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

fn codec(connect: &Connect) -> Arc<EventCodec> {
    let catalog = Arc::new(Catalog::load(&connect.schemas_dir).unwrap());
    Arc::new(EventCodec::with_naming(&connect.registry_url, catalog, connect.naming()).unwrap())
}

/// Publishes `count` orders; returns the topic and the mean encoded value size in bytes.
async fn publish(connect: &Connect, count: usize) -> (String, usize) {
    let codec = codec(connect);
    let publisher = Publisher::new(&connect.bootstrap_servers, codec.clone()).unwrap();
    let topic = connect.naming().topic("order.created");
    let orders: Vec<OrderCreated> = (0..count).map(|_| OrderCreated::sample("bench")).collect();
    let mut bytes = 0;
    for o in orders.iter().take(100) {
        bytes += codec.encode(&topic, o).await.unwrap().len();
    }
    for chunk in orders.chunks(2000) {
        for result in join_all(chunk.iter().map(|o| publisher.publish(&topic, o))).await {
            result.unwrap();
        }
    }
    (topic, bytes / count.clamp(1, 100))
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

const FANOUT_YAML: &str = "name: fanout\ngroup: GROUP\ninputs: [order.created]\nstep: {route: {to: [a.orders, b.orders, c.orders, d.orders]}}\n";

/// Throughput of one consumer: events/s from its first to its last event, and CPU seconds of
/// this process per million events over that window.
#[derive(Debug, Clone, Copy, Default)]
struct Throughput {
    events_per_second: f64,
    cpu_per_million: f64,
}

/// orderflow's fan-out over the already published input (its own group).
async fn fan_out(connect: &Connect, events: usize, dedup: bool) -> Throughput {
    let group = format!("fanout-{}", if dedup { "dedup" } else { "plain" });
    let (telemetry, stop, task) =
        start(connect, &FANOUT_YAML.replace("GROUP", &group), dedup).await;
    while telemetry.snapshot().consumed == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (started, cpu_started) = (Instant::now(), cpu_seconds());
    while telemetry.snapshot().succeeded < events as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_started);
    stop.send(true).unwrap();
    task.await.unwrap();
    let s = telemetry.snapshot();
    assert_eq!(
        (s.succeeded, s.dead_lettered, s.produced),
        (events as u64, 0, 4 * events as u64)
    );
    Throughput {
        events_per_second: events as f64 / elapsed,
        cpu_per_million: cpu / events as f64 * 1e6,
    }
}

/// The limit on the client side: consume and produce each record to four topics with
/// librdkafka alone (no decode, no validation), storing offsets once the batch is acknowledged.
async fn raw_passthrough(connect: &Connect, input: &str, events: usize) -> Throughput {
    let mut config =
        orderflow::kafka::consumer_config(&connect.bootstrap_servers, "raw-passthrough");
    config.set("enable.auto.offset.store", "true");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[input]).unwrap();
    let mut producer_config = orderflow::kafka::producer_config(&connect.bootstrap_servers);
    producer_config.set("linger.ms", "1");
    let producer: FutureProducer = producer_config.create().unwrap();
    let outputs: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|o| format!("{input}.raw-{o}"))
        .collect();
    let mut acks = Vec::with_capacity(4000);
    let mut done = 0;
    let mut window = None;
    while done < events {
        let m = consumer.recv().await.unwrap();
        window.get_or_insert_with(|| (Instant::now(), cpu_seconds()));
        for topic in &outputs {
            let mut record = FutureRecord::to(topic).payload(m.payload().unwrap_or_default());
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            acks.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        done += 1;
        if acks.len() >= 4000 || done == events {
            for ack in join_all(acks.drain(..)).await {
                ack.unwrap().unwrap();
            }
        }
    }
    let (started, cpu_started) = window.unwrap();
    Throughput {
        events_per_second: events as f64 / started.elapsed().as_secs_f64(),
        cpu_per_million: (cpu_seconds() - cpu_started) / events as f64 * 1e6,
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Runs a script printing one JSON line; `None` (with the reason) when it fails.
fn json_of(mut command: Command) -> Option<Value> {
    let out = command.stderr(Stdio::inherit()).output().ok()?;
    if !out.status.success() {
        eprintln!("  {command:?} failed: {}", out.status);
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

/// What one run measured.
#[derive(Debug, Default, Clone)]
struct Run {
    perf_producer: f64,
    perf_consumer: f64,
    raw: Throughput,
    orderflow: Throughput,
    orderflow_dedup: Throughput,
    jvm: Throughput,
    jvm_rss_mib: f64,
    jvm_start_to_first_s: f64,
}

async fn one_run(events: usize, with_jvm: bool) -> Run {
    let connect = connect(&fresh_prefix());
    let (input, size) = publish(&connect, events).await;
    let mut run = Run::default();
    if with_jvm {
        let mut perf = Command::new(script("kafka-perf"));
        perf.args([
            "--records",
            &events.to_string(),
            "--record-size",
            &size.to_string(),
        ])
        .env("ORDERFLOW_BOOTSTRAP_SERVERS", &connect.bootstrap_servers);
        if let Some(v) = json_of(perf) {
            run.perf_producer = v["producer_records_per_second"].as_f64().unwrap_or(0.0);
            run.perf_consumer = v["consumer_fetch_records_per_second"]
                .as_f64()
                .unwrap_or(0.0);
        }
    }
    run.raw = raw_passthrough(&connect, &input, events).await;
    run.orderflow = fan_out(&connect, events, false).await;
    run.orderflow_dedup = fan_out(&connect, events, true).await;
    if with_jvm {
        let mut jvm = Command::new(script("bench-jvm-peer"));
        jvm.args(["--input", &input, "--events", &events.to_string()])
            .args(["--bootstrap", &connect.bootstrap_servers])
            .args(["--registry", &connect.registry_url]);
        if let Some(v) = json_of(jvm) {
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            run.jvm = Throughput {
                events_per_second: f("events_per_second"),
                cpu_per_million: f("cpu_seconds_first_to_last_per_million"),
            };
            run.jvm_rss_mib = f("rss_mib");
            run.jvm_start_to_first_s = f("start_to_first_event_seconds");
        }
    }
    eprintln!("  run: {run:?}");
    run
}

/// End-to-end latency of the fan-out at a fixed offered load: publish time to the record in
/// the first output, read by a consumer of its own. Returns (p50, p99, p999) in ms.
async fn latency_at(rate: usize, seconds: usize) -> (f64, f64, f64) {
    let connect = connect(&fresh_prefix());
    let (telemetry, stop, task) =
        start(&connect, &FANOUT_YAML.replace("GROUP", "latency"), false).await;
    let output = connect.naming().topic("a.orders");
    let samples = measure_output(&connect, &output, rate, seconds, |_| {}).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let _ = telemetry;
    let mut ms: Vec<f64> = samples.into_values().collect();
    ms.sort_by(f64::total_cmp);
    (
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        percentile(&ms, 0.999),
    )
}

/// Publishes at `rate` for `seconds` (`on_publish` sees each order first, e.g. to script its
/// downstream) and reads `output` until every order arrived; returns the latency of each order
/// (publish to read, ms) by order id.
async fn measure_output(
    connect: &Connect,
    output: &str,
    rate: usize,
    seconds: usize,
    mut on_publish: impl FnMut(&OrderCreated),
) -> HashMap<String, f64> {
    orderflow::kafka::ensure_topics(&connect.bootstrap_servers, &[(output, 3)], 1)
        .await
        .unwrap();
    let mut config = orderflow::kafka::consumer_config(
        &connect.bootstrap_servers,
        &format!("measure-{}", uuid::Uuid::new_v4().simple()),
    );
    config
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "5");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[output]).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // joined, positioned at the end
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let total = rate * seconds;
    let reader = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut latency = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 120);
            while latency.len() < total && Instant::now() < deadline {
                let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
                else {
                    continue;
                };
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                if let Some(at) = sent.lock().unwrap().get(&key) {
                    latency.insert(key, at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latency
        })
    };
    let publisher = Arc::new(Publisher::new(&connect.bootstrap_servers, codec(connect)).unwrap());
    let topic = connect.naming().topic("order.created");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut pending = Vec::new();
    for _ in 0..total {
        tick.tick().await;
        let order = OrderCreated::sample("bench");
        on_publish(&order);
        sent.lock()
            .unwrap()
            .insert(order.data.order_id.to_string(), Instant::now());
        let publisher = publisher.clone();
        let topic = topic.clone();
        pending.push(tokio::spawn(async move {
            publisher.publish(&topic, &order).await.unwrap();
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    reader.await.unwrap()
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

/// Retry accuracy: an HTTP step at 50 events/s; with `retried_share` of the events failing one
/// to three times first. Returns the p99 latency (ms) of the events that never failed, and the
/// lateness samples per tier.
async fn retries(events: usize, retried_share: usize) -> (f64, Vec<Vec<i64>>) {
    let connect = connect(&fresh_prefix());
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
    let output = connect.naming().topic("notification.sent");
    let mut i = 0;
    let mut clean = Vec::new();
    let scripted = failures.clone();
    let latency = measure_output(&connect, &output, 50, events / 50, |order| {
        i += 1;
        let id = order.data.order_id.to_string();
        if retried_share > 0 && i % (100 / retried_share) == 0 {
            scripted.lock().unwrap().insert(id, 1 + (i / 10 % 3) as u32);
        } else {
            clean.push(id);
        }
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let mut main: Vec<f64> = clean
        .iter()
        .filter_map(|id| latency.get(id).copied())
        .collect();
    main.sort_by(f64::total_cmp);
    let lateness = (1..=3)
        .map(|tier| {
            let mut s = telemetry.retry_lateness_ms(tier);
            s.sort_unstable();
            s
        })
        .collect();
    (percentile(&main, 0.99), lateness)
}

/// `orderflow run` as its own process: seconds to /readyz 200, seconds to its first event, and
/// resident memory (MiB, median of samples) while it handles `rate` events/s.
async fn footprint(rate: usize, seconds: usize) -> (f64, f64, f64) {
    let prefix = fresh_prefix();
    let connect = connect(&prefix);
    let dir =
        std::env::temp_dir().join(format!("bench-footprint-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("fanout.yaml"),
        FANOUT_YAML.replace("GROUP", "footprint"),
    )
    .unwrap();
    // Something to read at once, so "first event" is about starting, not about waiting.
    publish(&connect, 100).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spawned = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["run", "fanout", "--report-every", "0s", "--no-dedup"])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("ORDERFLOW_PIPELINES_DIR", &dir)
        .env("ORDERFLOW_TOPIC_PREFIX", &prefix)
        .env("ORDERFLOW_BOOTSTRAP_SERVERS", &connect.bootstrap_servers)
        .env("ORDERFLOW_REGISTRY_URL", &connect.registry_url)
        .env("ORDERFLOW_SCHEMAS_DIR", &connect.schemas_dir)
        .env("ORDERFLOW_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let (mut ready, mut first) = (None, None);
    while ready.is_none() || first.is_none() {
        assert!(
            spawned.elapsed() < Duration::from_secs(60),
            "orderflow run did not get ready"
        );
        if ready.is_none()
            && client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        {
            ready = Some(spawned.elapsed().as_secs_f64());
        }
        if first.is_none() {
            if let Ok(r) = client.get(format!("{url}/metrics")).send().await {
                let text = r.text().await.unwrap_or_default();
                let succeeded = text.lines().any(|l| {
                    l.starts_with("orderflow_events_processed_total{")
                        && l.contains("outcome=\"succeeded\"")
                        && !l.ends_with(" 0")
                });
                if succeeded {
                    first = Some(spawned.elapsed().as_secs_f64());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id();
    let sampling = tokio::spawn(async move {
        let mut rss = Vec::new();
        for _ in 0..seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(kb) = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
            {
                rss.push(kb / 1024.0);
            }
        }
        rss
    });
    measure_output(
        &connect,
        &connect.naming().topic("a.orders"),
        rate,
        seconds,
        |_| {},
    )
    .await;
    let rss = sampling.await.unwrap();
    // SAFETY: kill(2) on a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    (ready.unwrap(), first.unwrap(), median(rss))
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let events = env_or("ORDERFLOW_BENCH_EVENTS", 20_000);
        let runs = env_or("ORDERFLOW_BENCH_RUNS", 3);
        let rate = env_or("ORDERFLOW_BENCH_RATE", 1000);
        let seconds = env_or("ORDERFLOW_BENCH_SECONDS", 10);
        let retry_events = env_or("ORDERFLOW_BENCH_RETRY_EVENTS", 300);
        let with_jvm = env_or("ORDERFLOW_BENCH_JVM", 1) == 1;
        eprintln!("{runs} run(s) of {events} events; latency at {rate}/s for {seconds} s");
        let mut all = Vec::new();
        for _ in 0..runs {
            all.push(one_run(events, with_jvm).await);
        }
        let m = |f: &dyn Fn(&Run) -> f64| median(all.iter().map(f).collect());
        // Ratios per run, then their median: comparisons within one run only.
        let ratio = |a: &dyn Fn(&Run) -> f64, b: &dyn Fn(&Run) -> f64| {
            median(all.iter().filter(|r| b(r) > 0.0).map(|r| a(r) / b(r)).collect())
        };
        if env_or("ORDERFLOW_BENCH_THROUGHPUT_ONLY", 0) == 1 {
            for r in &all {
                println!(
                    "raw {:.0}/s, orderflow {:.0}/s ({:.1} CPU s/M), with dedup {:.0}/s ({:.1} CPU s/M)",
                    r.raw.events_per_second,
                    r.orderflow.events_per_second,
                    r.orderflow.cpu_per_million,
                    r.orderflow_dedup.events_per_second,
                    r.orderflow_dedup.cpu_per_million
                );
            }
            return;
        }
        let (p50, p99, p999) = latency_at(rate, seconds).await;
        let (main_p99_clean, _) = retries(retry_events, 0).await;
        let (main_p99_retried, lateness) = retries(retry_events, 10).await;
        let (ready_s, first_s, rss) = footprint(rate, seconds).await;

        let of = |r: &Run| r.orderflow.events_per_second;
        println!("\n| scenario | events/s | CPU s per million events | vs raw passthrough | vs JVM peer |");
        println!("|---|---:|---:|---:|---:|");
        println!("| kafka-producer-perf-test | {:.0} | | | |", m(&|r| r.perf_producer));
        println!("| kafka-consumer-perf-test (fetch) | {:.0} | | | |", m(&|r| r.perf_consumer));
        println!(
            "| raw rdkafka passthrough x4 (no decode) | {:.0} | {:.1} | 1.00 | {:.2} |",
            m(&|r| r.raw.events_per_second),
            m(&|r| r.raw.cpu_per_million),
            ratio(&|r| r.raw.events_per_second, &|r| r.jvm.events_per_second),
        );
        println!(
            "| orderflow fan-out x4 (decode, validate, commit) | {:.0} | {:.1} | {:.2} | {:.2} |",
            m(&of),
            m(&|r| r.orderflow.cpu_per_million),
            ratio(&of, &|r| r.raw.events_per_second),
            ratio(&of, &|r| r.jvm.events_per_second),
        );
        println!(
            "| orderflow fan-out x4 + dedup store | {:.0} | {:.1} | {:.2} | {:.2} |",
            m(&|r| r.orderflow_dedup.events_per_second),
            m(&|r| r.orderflow_dedup.cpu_per_million),
            ratio(&|r| r.orderflow_dedup.events_per_second, &|r| r.raw.events_per_second),
            ratio(&|r| r.orderflow_dedup.events_per_second, &|r| r.jvm.events_per_second),
        );
        println!(
            "| JVM peer x4 (kafka-clients + Avro) | {:.0} | {:.1} | {:.2} | 1.00 |",
            m(&|r| r.jvm.events_per_second),
            m(&|r| r.jvm.cpu_per_million),
            ratio(&|r| r.jvm.events_per_second, &|r| r.raw.events_per_second),
        );
        println!("\n| footprint | orderflow | JVM peer |");
        println!("|---|---:|---:|");
        println!("| start to ready (s) | {ready_s:.2} | |");
        println!("| start to first event (s) | {first_s:.2} | {:.2} |", m(&|r| r.jvm_start_to_first_s));
        println!("| resident memory (MiB) | {rss:.0} (at {rate}/s) | {:.0} (end of run) |", m(&|r| r.jvm_rss_mib));
        println!("\nfan-out end-to-end latency at {rate} events/s for {seconds} s: p50 {p50:.1} ms, p99 {p99:.1} ms, p999 {p999:.1} ms");
        println!("main topic p99 (HTTP step, 50/s): {main_p99_clean:.1} ms with 0 % retried, {main_p99_retried:.1} ms with 10 % retried");
        for (i, s) in lateness.iter().enumerate() {
            println!(
                "retry tier {}: {} retries, lateness p50 {} ms, p99 {} ms",
                i + 1,
                s.len(),
                percentile(s, 0.5),
                percentile(s, 0.99)
            );
        }
    });
}
