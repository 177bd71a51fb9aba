//! The fan-out benchmark: orderflow against the honest ceiling of its Kafka client and a JVM
//! peer, on the running broker; then latency at a fixed load, retry lateness while the main
//! topic runs at load, and the footprint of orderflow and the JVM peer as their own processes.
//! `scripts/bench` runs it (release build) and writes BENCHMARKS.md from its JSON.
//!
//! Per run (ORDERFLOW_BENCH_RUNS, default 3), N `order.created` events (ORDERFLOW_BENCH_EVENTS,
//! default 20000) are published to a fresh topic; then, back to back, each of these reads all N
//! with its own consumer group and writes each event to four topics (the raw passthrough and
//! orderflow's fan-out take turns going first, run by run: the one that follows the other's
//! 4 N writes shares the broker with their after-effects):
//! - Kafka's perf tools (`scripts/kafka-perf`: records of the same mean size, one topic, lz4,
//!   acks=all, a fresh JVM): they count records written once, not events written four times,
//!   and are shown for what they are, not as a ceiling;
//! - the raw passthrough: librdkafka alone, no decode, no validation; each record's key, value
//!   and headers to four topics, pipelined (up to 2,000 records in flight: faster for it than orderflow's
//!   budget of 10,000 on this machine),
//!   its offset stored only once its four writes are acknowledged (auto.offset.store off, in
//!   read order): the most a client of this library can do with the same delivery rule;
//! - orderflow's fan-out (`route` to four topics): decode, validate, four writes, offset at
//!   the watermark of acknowledged records; without and with the dedup store (the latter over
//!   the first ORDERFLOW_BENCH_DEDUP_EVENTS of them, default N; `scripts/bench` gives it all N,
//!   the same work as every other side);
//! - the JVM peer (`benches/jvm-peer`, kafka-clients + Avro): the same work, pipelined, commits
//!   after the acks, warmed up on up to 20,000 events under another group before its measured
//!   window.
//!
//! Each side's window runs from its first event read to the ack of its last event's writes;
//! CPU is of the measuring process over that window. Every figure of a run is recorded; the
//! generator (`scripts/bench-report`) takes medians, spreads and per-run ratios.
//!
//! Then, ORDERFLOW_BENCH_RUNS times each:
//! - latency: the fan-out at ORDERFLOW_BENCH_RATE events/s (1000) for ORDERFLOW_BENCH_SECONDS
//!   (10), publish to the record read from the first output;
//! - retries: an HTTP step at ORDERFLOW_BENCH_RETRY_RATE events/s (500) for
//!   ORDERFLOW_BENCH_RETRY_SECONDS (10), with 0 % and with 10 % of the events failing one to three
//!   times (tiers 1 s / 2 s / 4 s): lateness after each retry's due time, and the p99 of events
//!   that never failed;
//! - footprint: `orderflow run` and the JVM peer each as a process of its own, spawned with 100
//!   events waiting; start to first event is spawn to the first output record read by this
//!   process (the same reader for both); then RSS and CPU of that process while it handles
//!   ORDERFLOW_BENCH_RATE events/s for ORDERFLOW_BENCH_FOOTPRINT_SECONDS (30).
//!
//! Any participant that fails (a peer, a perf tool, a wrong count) panics: the run fails, no
//! figure is recorded. The JSON goes to the file ORDERFLOW_BENCH_JSON (else stdout).
//! ORDERFLOW_BENCH_RAW_WINDOW (2000) bounds the raw passthrough's records in flight.
//! ORDERFLOW_BENCH_THROUGHPUT_ONLY=1 stops after the throughput runs; ORDERFLOW_BENCH_PROFILE=plain
//! (or dedup) publishes N events and runs only orderflow's fan-out over them three times (raw:
//! the raw passthrough once), for
//! `perf record` (scripts/bench profiles it this way).

mod common;

use common::{env_or, free_port, rss_mib};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use futures::stream::{FuturesOrdered, StreamExt};
use orderflow::app::{processors, Connect};
use orderflow::contracts::{Catalog, EventCodec, OrderCreated};
use orderflow::kafka::Publisher;
use orderflow::pipeline;
use orderflow::telemetry::Telemetry;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Records in flight before the raw passthrough stops reading: its best here (10,000, orderflow's
/// budget, made it slower).
const RAW_WINDOW: usize = 2000;
/// Events the JVM peer handles under another group before its measured window.
const JVM_WARMUP: usize = 20_000;

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

/// CPU seconds of this process's threads, summed by thread name (tokio's workers, librdkafka's
/// broker threads, the producer's polling thread): where a side's CPU goes.
fn cpu_by_thread() -> HashMap<String, f64> {
    let mut by_name = HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // ended meanwhile
        };
        let (name, seconds) = stat_cpu_seconds(&stat);
        *by_name.entry(name.to_string()).or_insert(0.0) += seconds;
    }
    by_name
}

/// The command name and CPU seconds (user + system) of a /proc stat line.
fn stat_cpu_seconds(stat: &str) -> (&str, f64) {
    // The command name may hold spaces: the fields after it follow the last ')'.
    let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (stat[open + 1..close].trim(), ticks / hz)
}

/// The local Kafka broker's process (`scripts/stack` starts one, `kafka.Kafka`), if it runs on
/// this machine: its CPU per event is part of what a side costs.
fn local_broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == b"kafka.Kafka")
                .then_some(pid)
        })
}

/// CPU seconds of each local PostgreSQL process (`postgres`: the server and its backends) now.
fn postgres_cpu_by_pid() -> HashMap<u32, f64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (name, seconds) = stat_cpu_seconds(&stat);
            (name == "postgres").then_some((pid, seconds))
        })
        .collect()
}

/// A measuring window's start: wall time, the process's CPU and its split by thread, and the
/// CPU of the local broker and of PostgreSQL's processes.
struct Window {
    started: Instant,
    cpu: f64,
    threads: HashMap<String, f64>,
    broker: Option<(u32, f64)>,
    postgres: HashMap<u32, f64>,
}

impl Window {
    fn start() -> Self {
        Window {
            started: Instant::now(),
            cpu: cpu_seconds(),
            threads: cpu_by_thread(),
            broker: local_broker_pid().map(|pid| (pid, process_cpu_seconds(pid))),
            postgres: postgres_cpu_by_pid(),
        }
    }

    /// [`throughput`] over the window, with the CPU microseconds per event of each thread name
    /// (threads that ended inside the window are missing from it).
    fn finish(&self, events: usize) -> Value {
        let mut measured = throughput(
            events,
            self.started.elapsed().as_secs_f64(),
            cpu_seconds() - self.cpu,
        );
        let threads: serde_json::Map<String, Value> = cpu_by_thread()
            .into_iter()
            .map(|(name, t)| {
                let spent = t - self.threads.get(&name).copied().unwrap_or(0.0);
                (name, json!((spent / events as f64 * 1e7).round() / 10.0))
            })
            .filter(|(_, us)| us.as_f64() > Some(0.0))
            .collect();
        measured["cpu_microseconds_per_event_by_thread"] = Value::Object(threads);
        if let Some((pid, cpu)) = self.broker {
            let spent = process_cpu_seconds(pid) - cpu;
            measured["broker_cpu_microseconds_per_event"] =
                json!((spent / events as f64 * 1e7).round() / 10.0);
        }
        // A backend that started inside the window counts from zero; one that ended inside it
        // is missing.
        let postgres = postgres_cpu_by_pid();
        if !postgres.is_empty() {
            let spent: f64 = postgres
                .iter()
                .map(|(pid, t)| t - self.postgres.get(pid).copied().unwrap_or(0.0))
                .sum();
            measured["postgres_cpu_microseconds_per_event"] =
                json!((spent / events as f64 * 1e7).round() / 10.0);
        }
        measured
    }
}

/// CPU seconds (user + system, all threads) of another process, from /proc/PID/stat.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    stat_cpu_seconds(&stat).1
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
        for result in
            futures::future::join_all(chunk.iter().map(|o| publisher.publish(&topic, o))).await
        {
            result.expect("publishing the input");
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

/// Events/s from the first event read to the last one's acks, and CPU seconds of the measuring
/// process per million events over that window.
fn throughput(events: usize, seconds: f64, cpu: f64) -> Value {
    json!({
        "events": events,
        "seconds": seconds,
        "events_per_second": events as f64 / seconds,
        "cpu_seconds_per_million": cpu / events as f64 * 1e6,
    })
}

/// orderflow's fan-out over the first `events` of the already published input (its own group).
async fn fan_out(connect: &Connect, events: usize, dedup: bool, pass: usize) -> Value {
    let group = format!("fanout-{}-{pass}", if dedup { "dedup" } else { "plain" });
    let (telemetry, stop, task) =
        start(connect, &FANOUT_YAML.replace("GROUP", &group), dedup).await;
    let limit = Instant::now() + Duration::from_secs(300);
    while telemetry.snapshot().consumed == 0 {
        assert!(Instant::now() < limit, "orderflow read nothing in 300 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let window = Window::start();
    while telemetry.snapshot().succeeded < events as u64 {
        assert!(
            Instant::now() < limit,
            "orderflow fan-out stalled: {:?}",
            telemetry.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let measured = window.finish(events);
    stop.send(true).unwrap();
    task.await.unwrap();
    let s = telemetry.snapshot();
    assert!(
        s.succeeded >= events as u64 && s.dead_lettered == 0 && s.produced == 4 * s.succeeded,
        "orderflow fan-out: wrong counts: {s:?}"
    );
    measured
}

/// The ceiling of the client: see the file's comment.
async fn raw_passthrough(connect: &Connect, input: &str, events: usize) -> Value {
    // orderflow's consumer settings: auto-commit of offsets stored explicitly, after the acks.
    let config = orderflow::kafka::consumer_config(&connect.bootstrap_servers, "raw-passthrough");
    let consumer: StreamConsumer = config.create().unwrap();
    consumer.subscribe(&[input]).unwrap();
    // orderflow's producer settings (acks=all, idempotent, lz4) with its 1 ms linger.
    let mut producer_config = orderflow::kafka::producer_config(&connect.bootstrap_servers);
    producer_config.set("linger.ms", "1");
    let producer: FutureProducer = producer_config.create().unwrap();
    let outputs: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|o| format!("{input}.raw-{o}"))
        .collect();
    // Created up front with orderflow's partition count, as its processors create theirs.
    let wanted: Vec<(&str, i32)> = outputs.iter().map(|t| (t.as_str(), 3)).collect();
    orderflow::kafka::ensure_topics(&connect.bootstrap_servers, &wanted, 1)
        .await
        .unwrap();
    let window_size = env_or("ORDERFLOW_BENCH_RAW_WINDOW", RAW_WINDOW);
    let mut in_flight = FuturesOrdered::new();
    let (mut read, mut done) = (0, 0);
    let mut window = None;
    let limit = Instant::now() + Duration::from_secs(300);
    while done < events {
        assert!(Instant::now() < limit, "raw passthrough stalled at {done}");
        tokio::select! {
            Some((partition, offset)) = in_flight.next(), if !in_flight.is_empty() => {
                // In read order: every earlier record of the partition is acknowledged too.
                consumer.store_offset(input, partition, offset).expect("storing the offset");
                done += 1;
            }
            m = consumer.recv(), if read < events && in_flight.len() < window_size => {
                let m = m.expect("raw passthrough: reading");
                window.get_or_insert_with(Window::start);
                read += 1;
                let headers = m.headers().map(|h| h.detach());
                let mut acks = Vec::with_capacity(outputs.len());
                for topic in &outputs {
                    let mut record = FutureRecord::to(topic).payload(m.payload().unwrap_or_default());
                    if let Some(key) = m.key() {
                        record = record.key(key);
                    }
                    if let Some(headers) = &headers {
                        record = record.headers(headers.clone());
                    }
                    loop {
                        match producer.send_result(record) {
                            Ok(ack) => break acks.push(ack),
                            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                                record = r;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err((e, _)) => panic!("raw passthrough: producing: {e}"),
                        }
                    }
                }
                let (partition, offset) = (m.partition(), m.offset());
                in_flight.push_back(async move {
                    for ack in acks {
                        ack.await.expect("producer gone").expect("raw passthrough: ack");
                    }
                    (partition, offset)
                });
            }
        }
    }
    window.unwrap().finish(events)
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Runs a command printing one JSON line last; panics (the run fails) when it fails.
fn json_of(mut command: Command) -> Value {
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{command:?} did not start: {e}"));
    assert!(out.status.success(), "{command:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{command:?} printed no JSON line"))
}

/// `java ... orderflow.bench.FanOut`, built beforehand by `scripts/bench-jvm-peer` (the
/// script's own Java version check is left out of start-up times).
fn jvm_peer() -> Command {
    let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/jvm-peer");
    let classpath = std::fs::read_to_string(build.join("classpath.txt"))
        .expect("the JVM peer is built (scripts/bench-jvm-peer --help)");
    let mut command = Command::new(std::env::var("JAVA").unwrap_or_else(|_| "java".into()));
    command
        .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
        .arg("-cp")
        .arg(format!(
            "{}:{}",
            build.join("classes").display(),
            classpath.trim()
        ))
        .arg("orderflow.bench.FanOut");
    command
}

/// Run `index` (from 0) of the throughput comparison.
async fn one_run(index: usize, events: usize, dedup_events: usize) -> Value {
    let connect = Connect::local(&fresh_prefix());
    let (input, size) = publish(&connect, events).await;
    let mut perf = Command::new(script("kafka-perf"));
    perf.args(["--records", &events.to_string()])
        .args(["--record-size", &size.to_string()])
        .args(["--producer-props", "compression.type=lz4 linger.ms=1"])
        .env("ORDERFLOW_BOOTSTRAP_SERVERS", &connect.bootstrap_servers);
    let perf = tokio::task::spawn_blocking(move || json_of(perf))
        .await
        .unwrap();
    let (raw, plain) = if index.is_multiple_of(2) {
        let raw = raw_passthrough(&connect, &input, events).await;
        (raw, fan_out(&connect, events, false, 0).await)
    } else {
        let plain = fan_out(&connect, events, false, 0).await;
        (raw_passthrough(&connect, &input, events).await, plain)
    };
    let dedup = fan_out(&connect, dedup_events, true, 0).await;
    let warmup = events.min(JVM_WARMUP);
    let mut jvm = jvm_peer();
    jvm.args(["--input", &input, "--events", &events.to_string()])
        .args(["--warmup-events", &warmup.to_string()])
        .args(["--bootstrap", &connect.bootstrap_servers])
        .args(["--registry", &connect.registry_url]);
    let jvm = tokio::task::spawn_blocking(move || json_of(jvm))
        .await
        .unwrap();
    assert_eq!(
        (jvm["events"].as_u64(), jvm["invalid"].as_u64()),
        (Some(events as u64), Some(0)),
        "JVM peer: wrong counts: {jvm}"
    );
    let run = json!({
        "events": events,
        "event_bytes": size,
        "first": if index.is_multiple_of(2) { "raw_passthrough" } else { "orderflow" },
        "perf_tools": perf,
        "raw_passthrough": raw,
        "orderflow": plain,
        "orderflow_dedup": dedup,
        "jvm_peer": {
            "events": events,
            "seconds": jvm["seconds"],
            "events_per_second": jvm["events_per_second"],
            "cpu_seconds_per_million": jvm["cpu_seconds_first_to_last_per_million"],
            "rss_mib_end": jvm["rss_mib"],
            "warmup_events": warmup,
        },
    });
    eprintln!("  throughput run: {run}");
    run
}

/// Reads one output topic from its end, noting when each key arrived.
struct OutputReader {
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OutputReader {
    /// Reads the fresh topic `output` (3 partitions) from its beginning, assigned (no group
    /// join), and returns once its first fetches are under way.
    async fn start(connect: &Connect, output: &str) -> OutputReader {
        orderflow::kafka::ensure_topics(&connect.bootstrap_servers, &[(output, 3)], 1)
            .await
            .unwrap();
        let mut config = orderflow::kafka::consumer_config(
            &connect.bootstrap_servers,
            &format!("measure-{}", uuid::Uuid::new_v4().simple()),
        );
        config.set("fetch.wait.max.ms", "5");
        let consumer: StreamConsumer = config.create().unwrap();
        let mut partitions = rdkafka::TopicPartitionList::new();
        for p in 0..3 {
            partitions
                .add_partition_offset(output, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&partitions).unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await;
        let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let seen = arrivals.clone();
        let task = tokio::spawn(async move {
            loop {
                let m = consumer.recv().await.expect("reading the output");
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                seen.lock().unwrap().entry(key).or_insert_with(Instant::now);
            }
        });
        OutputReader { arrivals, task }
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    fn first(&self) -> Option<Instant> {
        self.arrivals.lock().unwrap().values().min().copied()
    }

    async fn wait_for(&self, count: usize, what: &str) {
        let limit = Instant::now() + Duration::from_secs(120);
        while self.count() < count {
            assert!(
                Instant::now() < limit,
                "{what}: {} of {count} records arrived",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes at `rate` for `seconds`; `on_publish` sees each order first. Returns when each
/// order was published, by order id.
async fn publish_paced(
    connect: &Connect,
    rate: usize,
    seconds: usize,
    mut on_publish: impl FnMut(&OrderCreated),
) -> HashMap<String, Instant> {
    let publisher = Arc::new(Publisher::new(&connect.bootstrap_servers, codec(connect)).unwrap());
    let topic = connect.naming().topic("order.created");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut pending = Vec::new();
    let mut sent = HashMap::new();
    for _ in 0..rate * seconds {
        tick.tick().await;
        let order = OrderCreated::sample("bench");
        on_publish(&order);
        sent.insert(order.data.order_id.to_string(), Instant::now());
        let (publisher, topic) = (publisher.clone(), topic.clone());
        pending.push(tokio::spawn(async move {
            publisher
                .publish(&topic, &order)
                .await
                .expect("publishing at the fixed rate");
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    sent
}

/// Milliseconds from each publish to its arrival in the reader's output.
fn latencies(sent: &HashMap<String, Instant>, reader: &OutputReader) -> HashMap<String, f64> {
    let arrivals = reader.arrivals.lock().unwrap();
    sent.iter()
        .filter_map(|(id, at)| {
            let arrived = arrivals.get(id)?;
            Some((id.clone(), (*arrived - *at).as_secs_f64() * 1000.0))
        })
        .collect()
}

fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "samples": ms.len(),
        "p50_ms": percentile(&ms, 0.5),
        "p99_ms": percentile(&ms, 0.99),
        "p999_ms": percentile(&ms, 0.999),
    })
}

/// End-to-end latency of the fan-out at a fixed offered load.
async fn latency_at(rate: usize, seconds: usize) -> Value {
    let connect = Connect::local(&fresh_prefix());
    let (_telemetry, stop, task) =
        start(&connect, &FANOUT_YAML.replace("GROUP", "latency"), false).await;
    let reader = OutputReader::start(&connect, &connect.naming().topic("a.orders")).await;
    let sent = publish_paced(&connect, rate, seconds, |_| {}).await;
    reader.wait_for(sent.len(), "fan-out latency").await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let mut result = summary(latencies(&sent, &reader).into_values().collect());
    result["rate"] = json!(rate);
    result["seconds"] = json!(seconds);
    result
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

/// An HTTP step at `rate` events/s for `seconds`, `retried_percent` of the events failing one
/// to three times first: the latency of events that never failed, lateness per retry tier.
async fn retries(rate: usize, seconds: usize, retried_percent: usize) -> Value {
    let connect = Connect::local(&fresh_prefix());
    let failures: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let app = Router::new()
        .route("/notify", post(flaky))
        .with_state(failures.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let yaml = format!(
        "name: lateness\ngroup: lateness\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/notify\n    emit: {{\"2xx\": notification.sent}}\nretry:\n  tiers: [1s, 2s, 4s, 8s, 16s]\n"
    );
    let (telemetry, stop, task) = start(&connect, &yaml, false).await;
    let reader = OutputReader::start(&connect, &connect.naming().topic("notification.sent")).await;
    let (mut i, mut clean) = (0, Vec::new());
    let scripted = failures.clone();
    let sent = publish_paced(&connect, rate, seconds, |order| {
        i += 1;
        let id = order.data.order_id.to_string();
        if retried_percent > 0 && i % (100 / retried_percent) == 0 {
            scripted.lock().unwrap().insert(id, 1 + (i / 10 % 3) as u32);
        } else {
            clean.push(id);
        }
    })
    .await;
    reader.wait_for(sent.len(), "retries").await;
    stop.send(true).unwrap();
    task.await.unwrap();
    server.abort();
    let latency = latencies(&sent, &reader);
    let main: Vec<f64> = clean
        .iter()
        .filter_map(|id| latency.get(id).copied())
        .collect();
    let tiers: Vec<Value> = (1..=3)
        .map(|tier| {
            let mut s = telemetry.retry_lateness_ms(tier);
            s.sort_unstable();
            json!({"tier": tier, "samples": s.len(), "p50_ms": percentile(&s, 0.5), "p99_ms": percentile(&s, 0.99), "max_ms": s.last().copied().unwrap_or(0)})
        })
        .collect();
    if retried_percent > 0 {
        assert!(
            tiers.iter().all(|t| t["samples"].as_u64() > Some(0)),
            "a retry tier saw no retries: {tiers:?}"
        );
    }
    json!({
        "rate": rate,
        "seconds": seconds,
        "retried_percent": retried_percent,
        "main": summary(main),
        "tiers": tiers,
    })
}

/// Kills a child on drop, so a failed run leaves no process behind.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// One side of the footprint comparison as its own process (see the file's comment).
async fn footprint(side: &str, rate: usize, seconds: usize) -> Value {
    const BACKLOG: usize = 100;
    let prefix = fresh_prefix();
    let connect = Connect::local(&prefix);
    let output = connect.naming().topic("a.orders");
    // Something to read at once, so "first event" is about starting, not about waiting.
    let (input, _) = publish(&connect, BACKLOG).await;
    let reader = OutputReader::start(&connect, &output).await;
    let port = free_port();
    let mut command = if side == "orderflow" {
        let dir = std::env::temp_dir().join(format!("bench-footprint-{}", &prefix[6..16]));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("fanout.yaml"),
            FANOUT_YAML.replace("GROUP", "footprint"),
        )
        .unwrap();
        common::orderflow_run(&connect, &dir, &["run", "fanout", "--no-dedup"], port)
    } else {
        let outputs: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|o| connect.naming().topic(&format!("{o}.orders")))
            .collect();
        let mut c = jvm_peer();
        c.args(["--input", &input])
            .args(["--events", &(BACKLOG + rate * seconds).to_string()])
            .args(["--outputs", &outputs.join(",")])
            .args(["--bootstrap", &connect.bootstrap_servers])
            .args(["--registry", &connect.registry_url]);
        c
    };
    let spawned = Instant::now();
    let child = Spawned(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{side} did not start: {e}")),
    );
    let pid = child.0.id();
    let limit = Instant::now() + Duration::from_secs(60);
    let client = reqwest::Client::new();
    let mut ready = None;
    while reader.first().is_none() || (side == "orderflow" && ready.is_none()) {
        assert!(Instant::now() < limit, "{side}: no first event in 60 s");
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_ok(),
            "{side} exited"
        );
        if side == "orderflow"
            && ready.is_none()
            && client
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        {
            ready = Some(spawned.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = (reader.first().unwrap() - spawned).as_secs_f64();
    reader.wait_for(BACKLOG, side).await;
    // At the fixed load: CPU over the publishing window, RSS sampled each second.
    let sampling = tokio::spawn(async move {
        let mut rss = Vec::new();
        for _ in 0..seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss.extend(rss_mib(pid));
        }
        rss
    });
    let (window, cpu_started) = (Instant::now(), process_cpu_seconds(pid));
    let sent = publish_paced(&connect, rate, seconds, |_| {}).await;
    reader.wait_for(BACKLOG + sent.len(), side).await;
    let cpu = process_cpu_seconds(pid) - cpu_started;
    let wall = window.elapsed().as_secs_f64();
    let rss = sampling.await.unwrap();
    assert!(!rss.is_empty(), "{side}: no RSS sample");
    drop(child);
    json!({
        "side": side,
        "rate": rate,
        "seconds": seconds,
        "start_to_first_event_s": first,
        "start_to_ready_s": ready,
        "rss_mib_median": median(rss.clone()),
        "rss_mib_max": rss.iter().copied().fold(0.0, f64::max),
        "cpu_percent_of_a_core": cpu / wall * 100.0,
        "cpu_seconds_per_million": cpu / sent.len() as f64 * 1e6,
    })
}

fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(async {
        let events = env_or("ORDERFLOW_BENCH_EVENTS", 20_000);
        let runs = env_or("ORDERFLOW_BENCH_RUNS", 3);
        let dedup_events = env_or("ORDERFLOW_BENCH_DEDUP_EVENTS", events).min(events);
        let rate = env_or("ORDERFLOW_BENCH_RATE", 1000);
        let seconds = env_or("ORDERFLOW_BENCH_SECONDS", 10);
        let retry_rate = env_or("ORDERFLOW_BENCH_RETRY_RATE", 500);
        let retry_seconds = env_or("ORDERFLOW_BENCH_RETRY_SECONDS", 10);
        let footprint_seconds = env_or("ORDERFLOW_BENCH_FOOTPRINT_SECONDS", 30);
        if let Ok(side) = std::env::var("ORDERFLOW_BENCH_PROFILE") {
            let connect = Connect::local(&fresh_prefix());
            let (input, _) = publish(&connect, events).await;
            if side == "raw" {
                let measured = raw_passthrough(&connect, &input, events).await;
                eprintln!("raw passthrough alone: {measured}");
                return json!({"profile": side, "raw_passthrough": measured});
            }
            // Three passes over the input, so the fan-out outweighs the publishing in a profile.
            let mut passes = Vec::new();
            for pass in 0..3 {
                passes.push(fan_out(&connect, events, side == "dedup", pass).await);
                eprintln!("fanout ({side}) alone: {}", passes[pass]);
            }
            return json!({"profile": side, "orderflow": passes});
        }
        eprintln!("fanout: {runs} run(s) of {events} events");
        let mut throughput = Vec::new();
        for index in 0..runs {
            throughput.push(one_run(index, events, dedup_events).await);
        }
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        let mut result = json!({
            "librdkafka": librdkafka,
            "throughput": throughput,
        });
        if env_or("ORDERFLOW_BENCH_THROUGHPUT_ONLY", 0) == 1 {
            return result;
        }
        let (mut latency, mut clean, mut retried, mut prints) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            eprintln!("fanout: latency, retries and footprint, run {}", run + 1);
            latency.push(latency_at(rate, seconds).await);
            clean.push(retries(retry_rate, retry_seconds, 0).await);
            retried.push(retries(retry_rate, retry_seconds, 10).await);
            prints.push(footprint("orderflow", rate, footprint_seconds).await);
            prints.push(footprint("jvm_peer", rate, footprint_seconds).await);
            eprintln!(
                "  {}\n  {}\n  {}\n  {}\n  {}",
                latency.last().unwrap(),
                clean.last().unwrap(),
                retried.last().unwrap(),
                prints[prints.len() - 2],
                prints.last().unwrap()
            );
        }
        result["latency"] = json!(latency);
        result["retries_clean"] = json!(clean);
        result["retries"] = json!(retried);
        result["footprint"] = json!(prints);
        result
    });
    common::write_result(&result);
}
