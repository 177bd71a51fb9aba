//! Throughput that follows the work: an HTTP-step pipeline (`http` to the simulated notification
//! service, emitting `notification.sent`, dedup store on) against `orderflow simulate` running
//! as its own process with a fixed latency per call, at several `concurrency:` settings of the
//! pipeline file. `scripts/bench` runs it (release build) and writes BENCHMARKS.md from its JSON.
//!
//! Per run (ORDERFLOW_BENCH_RUNS, default 3):
//! - the CPU cost: the same pipeline at concurrency 256 against a second simulate process that
//!   answers at once (`--latency 0ms..0ms`): orderflow's CPU seconds per event when waiting
//!   costs nothing, and the events/s the whole machine then gives (orderflow, the simulated
//!   service, Kafka and PostgreSQL share its cores);
//! - then, against the service at ORDERFLOW_BENCH_HTTP_LATENCY_MS (50) per call, each concurrency
//!   of ORDERFLOW_BENCH_HTTP_CONCURRENCY (1,8,64,256): events/s from the first event read to the
//!   last one's acks and dedup mark, and orderflow's CPU per event.
//!
//! `scripts/bench-report` sets each beside the ideal `min(concurrency / latency, CPU limit)`, the
//! CPU limit being one core's worth of orderflow: 1 / (CPU seconds per event) of the same run.
//! A first, unmeasured pass (200 events) warms up what the first pipeline of a process does
//! once. Events per measurement: ORDERFLOW_BENCH_HTTP_EVENTS (5000), but never more than
//! `concurrency / latency` x ORDERFLOW_BENCH_HTTP_MAX_SECONDS (12.5) at the ideal rate, so
//! concurrency 1 (20 events/s) takes 250 events instead of 250 s; the JSON says how many.
//! Every event must succeed once (no retry, no dead letter), else the run fails.
//! The JSON goes to the file ORDERFLOW_BENCH_JSON (else stdout).

mod common;

use common::env_or;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orderflow::app::{processors, Connect};
use serde_json::{json, Value};
use tokio::sync::watch;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// `orderflow simulate` as its own process; killed on drop.
struct Simulate {
    child: Child,
    url: String,
}

impl Simulate {
    async fn start(latency_ms: u64) -> Simulate {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--latency", &format!("{latency_ms}ms..{latency_ms}ms")])
            .env("ORDERFLOW_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting orderflow simulate");
        let limit = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < limit, "orderflow simulate did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Simulate {
            child,
            url: format!("http://127.0.0.1:{port}/notifications"),
        }
    }
}

impl Drop for Simulate {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Publishes `events` orders to a fresh prefix, then runs the HTTP-step pipeline over them.
async fn measure(url: &str, concurrency: usize, events: usize) -> Value {
    let prefix = format!(
        "bench-http-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let connect = Connect::local(&prefix);
    common::publish_orders(&connect, events, "bench").await;
    let yaml = format!(
        "name: http-step\ngroup: http-step\ninputs: [order.created]\nconcurrency: {concurrency}\n\
         step:\n  http:\n    url: {url}\n    timeout: 5s\n    emit: {{\"2xx\": notification.sent}}\n\
         retry:\n  tiers: [1s]\n"
    );
    let pipeline = orderflow::pipeline::parse(
        Path::new("http-step.yaml"),
        &yaml,
        &orderflow::steps::HANDLER_NAMES,
    )
    .unwrap();
    assert_eq!(pipeline.concurrency, concurrency);
    let processor = processors(&connect, vec![pipeline], true)
        .await
        .unwrap()
        .remove(0);
    let telemetry = processor.telemetry();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { processor.run(stopped).await.unwrap() });
    let limit = Instant::now() + Duration::from_secs(600);
    while telemetry.snapshot().consumed == 0 {
        assert!(Instant::now() < limit, "the HTTP step read nothing");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (started, cpu_started) = (Instant::now(), cpu_seconds());
    while telemetry.snapshot().succeeded < events as u64 {
        let s = telemetry.snapshot();
        assert!(
            Instant::now() < limit && s.dead_lettered == 0 && s.retried.iter().all(|r| *r == 0),
            "HTTP step at concurrency {concurrency}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (seconds, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_started);
    stop.send(true).unwrap();
    task.await.unwrap();
    let s = telemetry.snapshot();
    assert_eq!(
        (s.succeeded, s.dead_lettered, s.duplicates),
        (events as u64, 0, 0),
        "HTTP step at concurrency {concurrency}: wrong counts"
    );
    json!({
        "concurrency": concurrency,
        "events": events,
        "seconds": seconds,
        "events_per_second": events as f64 / seconds,
        "cpu_seconds_per_event": cpu / events as f64,
    })
}

#[tokio::main]
async fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let runs = env_or("ORDERFLOW_BENCH_RUNS", 3.0) as usize;
    let latency_ms = env_or("ORDERFLOW_BENCH_HTTP_LATENCY_MS", 50.0) as u64;
    let max_events = env_or("ORDERFLOW_BENCH_HTTP_EVENTS", 5000.0) as usize;
    let max_seconds = env_or("ORDERFLOW_BENCH_HTTP_MAX_SECONDS", 12.5);
    let concurrencies: Vec<usize> = std::env::var("ORDERFLOW_BENCH_HTTP_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,64,256".into())
        .split(',')
        .map(|c| c.trim().parse().expect("a concurrency"))
        .collect();
    let slow = Simulate::start(latency_ms).await;
    let instant = Simulate::start(0).await;
    // Not measured: the first pipeline of the process registers `notification.sent`'s schema,
    // opens the dedup store's connection and warms the broker's new-topic paths.
    measure(&instant.url, 256, 200).await;
    let mut result_runs = Vec::new();
    for run in 0..runs {
        eprintln!("http_step: run {}", run + 1);
        let zero_latency = measure(&instant.url, 256, max_events).await;
        eprintln!("  CPU cost (latency 0, concurrency 256): {zero_latency}");
        let mut points = Vec::new();
        for &c in &concurrencies {
            let waiting_limit = c as f64 * 1000.0 / latency_ms as f64;
            let events = max_events.min((waiting_limit * max_seconds).ceil() as usize);
            let point = measure(&slow.url, c, events).await;
            eprintln!("  {point}");
            points.push(point);
        }
        result_runs.push(json!({"zero_latency": zero_latency, "points": points}));
    }
    let result = json!({"latency_ms": latency_ms, "runs": result_runs});
    common::write_result(&result);
}
