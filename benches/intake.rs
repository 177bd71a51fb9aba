//! Immediate response, eventual consistency, measured side by side: `orderflow serve`,
//! `orderflow run --all` (pipelines, saga, read model) and `orderflow simulate` run as their
//! own processes (the binary cargo built for this bench: release under `cargo bench`); this
//! process offers POST /orders at a fixed rate (open loop: a slow answer does not delay the next
//! request) and then polls GET /orders/{id} until each order is confirmed or cancelled.
//!
//!     eval "$(scripts/stack up)" && cargo bench --bench intake
//!
//! ORDERFLOW_BENCH_RATE (requests/s, default 20), ORDERFLOW_BENCH_SECONDS (default 15) per
//! window, ORDERFLOW_BENCH_RUNS (default 3) windows one after another against the same services.
//! Per window: intake response time p50/p99 (202), and p50/p99 from the 202 to the final status
//! in the read model. An answer other than 202, an order that never reaches a final status or a
//! service that exits fails the run. The JSON goes to the file ORDERFLOW_BENCH_JSON (else
//! stdout); `scripts/bench` writes BENCHMARKS.md from it.

mod common;

use common::{env_or, free_port};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orderflow::contracts::OrderCreated;

fn spawn(args: &[&str], prefix: &str, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env("ORDERFLOW_TOPIC_PREFIX", prefix)
        .env(
            "ORDERFLOW_PIPELINES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"),
        )
        .env(
            "ORDERFLOW_SCHEMAS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/avro"),
        )
        .env("ORDERFLOW_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Milliseconds to the 202, and from the 202 to the final status (if it came).
type Timing = (f64, Option<f64>);

fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

#[tokio::main]
async fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let rate = env_or("ORDERFLOW_BENCH_RATE", 20);
    let seconds = env_or("ORDERFLOW_BENCH_SECONDS", 15);
    let runs = env_or("ORDERFLOW_BENCH_RUNS", 3);
    let prefix = format!(
        "bench-intake-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let logs = std::env::temp_dir();
    let (sim_port, intake_port) = (free_port(), free_port());
    let mut children = vec![spawn(
        &[
            "simulate",
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--decline",
            "0.1",
        ],
        &prefix,
        &logs.join("bench-intake-simulate.log"),
    )];
    let base = format!("http://127.0.0.1:{sim_port}");
    for (var, url) in orderflow::simulate::pipeline_url_env(&base) {
        std::env::set_var(var, url);
    }
    children.push(spawn(
        &[
            "run",
            "--all",
            "--report-every",
            "0s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &prefix,
        &logs.join("bench-intake-run.log"),
    ));
    children.push(spawn(
        &["serve", "--listen", &format!("127.0.0.1:{intake_port}")],
        &prefix,
        &logs.join("bench-intake-serve.log"),
    ));
    let url = format!("http://127.0.0.1:{intake_port}");
    let client = reqwest::Client::new();
    let ready = Instant::now();
    while client.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(60),
            "the intake did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the processors join their groups before the clock starts.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let mut windows = Vec::new();
    for run in 0..runs {
        let results = window(&client, &url, rate, seconds).await;
        for child in children.iter_mut() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "a service exited (logs: {}/bench-intake-*.log)",
                logs.display()
            );
        }
        let (p50, p99) = percentiles(results.iter().map(|r| r.0).collect());
        let to_final: Vec<f64> = results.iter().filter_map(|r| r.1).collect();
        assert_eq!(
            to_final.len(),
            results.len(),
            "not every order reached a final status"
        );
        let (f50, f99) = percentiles(to_final);
        eprintln!("intake window {}: {} orders at {rate} req/s for {seconds} s: 202 p50 {p50:.1} ms p99 {p99:.1} ms; to final p50 {f50:.1} ms p99 {f99:.1} ms", run + 1, results.len());
        windows.push(serde_json::json!({
            "orders": results.len(),
            "accepted_p50_ms": p50,
            "accepted_p99_ms": p99,
            "final_p50_ms": f50,
            "final_p99_ms": f99,
        }));
    }
    for mut child in children {
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    let result = serde_json::json!({"rate": rate, "seconds": seconds, "windows": windows});
    common::write_result(&result);
}

/// Offers `rate` orders/s for `seconds` and follows each to its final status.
async fn window(client: &reqwest::Client, url: &str, rate: u64, seconds: u64) -> Vec<Timing> {
    let total = (rate * seconds) as usize;
    // Per order: the POST's response time, and from its 202 to the final status in the read
    // model.
    let results: Arc<Mutex<Vec<Timing>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut orders = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let (client, url, results) = (client.clone(), url.to_string(), results.clone());
        orders.spawn(async move {
            let order = OrderCreated::sample("bench").data;
            let body = serde_json::json!({
                "customer_id": order.customer_id,
                "items": order.items,
                "shipping_address": order.shipping_address,
            });
            let started = Instant::now();
            let response = client
                .post(format!("{url}/orders"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(
                response.status(),
                202,
                "{}",
                response.text().await.unwrap_or_default()
            );
            let body: serde_json::Value = response.json().await.unwrap();
            let status_url = format!("{url}{}", body["status_url"].as_str().unwrap());
            let accepted_ms = orderflow::contracts::events::now_millis();
            // Polled lazily (every 500 ms, not to load the intake); the read model says when the
            // status became final.
            let mut final_ms = None;
            let until = Instant::now() + Duration::from_secs(120);
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let status: serde_json::Value = client
                    .get(&status_url)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if matches!(status["status"].as_str(), Some("confirmed" | "cancelled")) {
                    let since = status["status_since_ms"].as_i64().unwrap();
                    final_ms = Some((since - accepted_ms) as f64);
                    break;
                }
            }
            results.lock().unwrap().push((ms, final_ms));
        });
    }
    while let Some(order) = orders.join_next().await {
        order.expect("an order failed");
    }
    let timings = results.lock().unwrap().clone();
    timings
}
