//! `orderflow demo`: the whole flow in one process, against the real broker and registry.
//! Simulated downstreams, every pipeline of the folder, a stream of orders, a live summary and
//! a final report whose counts must add up: for every consumer of `order.created`,
//! published = succeeded + dead-lettered.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::app::{self, Connect};
use crate::contracts::events::now_millis;
use crate::contracts::OrderCreated;
use crate::intake;
use crate::simulate::{self, Behaviour};
use crate::telemetry::saga::SagaTelemetry;
use crate::telemetry::{Snapshot, Telemetry};

/// What the demo runs: how many orders, how fast, and how the simulated downstreams answer.
#[derive(Debug, Clone)]
pub struct Settings {
    pub orders: u32,
    /// Orders published per second.
    pub rate: u32,
    /// Processors use the dedup store.
    pub dedup: bool,
    /// Give up waiting for the report to balance after this long.
    pub timeout: Duration,
    pub downstreams: Behaviour,
}

pub async fn run(connect: &Connect, pipelines_dir: &Path, args: Settings) -> anyhow::Result<()> {
    // A fresh prefix per run: the counts below are this run's alone.
    let run_id = format!("demo-{}", now_millis() / 1000);
    let connect = Connect {
        topic_prefix: format!("{}{run_id}.", connect.topic_prefix),
        ..connect.clone()
    };

    let (addr, served, simulator) =
        simulate::serve("127.0.0.1:0".parse()?, args.downstreams.clone()).await?;
    for (var, url) in simulate::pipeline_url_env(&format!("http://{addr}")) {
        std::env::set_var(var, url);
    }
    let (pipelines, sagas) = app::load_pipelines_and_sagas(pipelines_dir)?;
    let order_consumers: Vec<String> = pipelines
        .iter()
        // One input record per order: the balance below counts them. (order-status reads every
        // event type, so it is not one of them.)
        .filter(|p| p.inputs == ["order.created"])
        .map(|p| p.name.clone())
        .collect();
    eprintln!(
        "demo {run_id}: {} orders at {}/s; pipelines {}; sagas {}; downstreams on http://{addr} (latency {}..{} ms, 503 {:.0}%, 500 {:.0}%, 400 {:.0}%, payment declined {:.0}%, out of stock {:.0}%, unshippable {:.0}%)",
        args.orders,
        args.rate,
        pipelines.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
        sagas.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
        args.downstreams.latency_ms.start(),
        args.downstreams.latency_ms.end(),
        args.downstreams.rate_503 * 100.0,
        args.downstreams.rate_500 * 100.0,
        args.downstreams.rate_400 * 100.0,
        args.downstreams.rate_declined * 100.0,
        args.downstreams.rate_out_of_stock * 100.0,
        args.downstreams.rate_unshippable * 100.0,
    );

    let processors = app::processors(&connect, pipelines, args.dedup).await?;
    let telemetry: Vec<(String, Telemetry)> = processors
        .iter()
        .map(|p| (p.pipeline().name.clone(), p.telemetry()))
        .collect();
    let codec = app::codec(&connect)?;
    let orchestrators = app::orchestrators(&connect, sagas, codec.clone()).await?;
    let saga_telemetry: Vec<(String, SagaTelemetry)> = orchestrators
        .iter()
        .map(|o| (o.saga().name.clone(), o.telemetry()))
        .collect();
    // Stopped once the report balances (or the timeout passes).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app::run(processors, orchestrators, async {
        let _ = stopped.await;
    }));
    // Orders come in through the intake API, as customers' would.
    let (intake_api, topic) = app::intake(&connect, codec).await?;
    let (intake_addr, intake_server) = intake::serve("127.0.0.1:0".parse()?, intake_api).await?;
    eprintln!("intake on http://{intake_addr}/orders");
    let published = Arc::new(AtomicU64::new(0));
    let intake_latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let publishing = {
        let (published, latencies, orders, rate) = (
            published.clone(),
            intake_latencies.clone(),
            args.orders,
            args.rate.max(1),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let url = format!("http://{intake_addr}/orders");
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            for _ in 0..orders {
                tick.tick().await;
                let order = OrderCreated::sample("orderflow/demo").data;
                let body = serde_json::json!({
                    "customer_id": order.customer_id,
                    "items": order.items,
                    "shipping_address": order.shipping_address,
                });
                let key = uuid::Uuid::new_v4().to_string();
                // A 503 asks to come back later; the same Idempotency-Key makes that safe.
                let mut attempts = 0;
                loop {
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .header("Idempotency-Key", &key)
                        .json(&body)
                        .send()
                        .await?;
                    let status = response.status().as_u16();
                    if status == 202 {
                        latencies
                            .lock()
                            .expect("latencies")
                            .push(started.elapsed().as_secs_f64() * 1000.0);
                        break;
                    }
                    attempts += 1;
                    if status != 503 || attempts == 5 {
                        bail!(
                            "the intake answered {status}: {}",
                            response.text().await.unwrap_or_default()
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };

    let expected = u64::from(args.orders) * order_consumers.len() as u64;
    let sagas_ended = || -> u64 {
        saga_telemetry
            .iter()
            .map(|(_, t)| {
                let c = t.counters();
                c.confirmed.load(Ordering::Relaxed) + c.cancelled.load(Ordering::Relaxed)
            })
            .sum()
    };
    let expected_sagas = u64::from(args.orders) * saga_telemetry.len() as u64;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_consumed = (0u64, Instant::now());
    let balanced = loop {
        tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 2000 })).await;
        let snapshots: Vec<(&str, Snapshot)> = telemetry
            .iter()
            .map(|(n, t)| (n.as_str(), t.snapshot()))
            .collect();
        let done: u64 = snapshots
            .iter()
            .filter(|(n, _)| order_consumers.iter().any(|c| c == n))
            .map(|(_, s)| s.succeeded + s.dead_lettered)
            .sum();
        let consumed: u64 = snapshots.iter().map(|(_, s)| s.consumed).sum();
        if consumed != last_consumed.0 {
            last_consumed = (consumed, Instant::now());
        }
        print_progress(
            tty,
            published.load(Ordering::Relaxed),
            done,
            expected,
            &snapshots,
        );
        // Finished when every order consumer accounted for every order and the chained
        // pipelines (e.g. confirmation) have been quiet for two seconds.
        let stuck: u64 = saga_telemetry
            .iter()
            .map(|(_, t)| t.counters().stuck_now.load(Ordering::Relaxed))
            .sum();
        if done >= expected
            && sagas_ended() + stuck >= expected_sagas
            && last_consumed.1.elapsed() > Duration::from_secs(2)
        {
            break true;
        }
        if started.elapsed() > args.timeout {
            break false;
        }
    };
    if tty {
        eprintln!();
    }
    let _ = stop.send(());
    running.await??;
    publishing.await??;
    simulator.abort();
    intake_server.abort();

    let published = published.load(Ordering::Relaxed);
    println!(
        "\n{:<18} {:>9} {:>9} {:>9} {:>22} {:>9}",
        "PIPELINE", "CONSUMED", "SUCCEEDED", "TRANSIENT", "RETRIED (tier 1..5)", "DLQ"
    );
    let (mut succeeded, mut dead) = (0, 0);
    for (name, t) in &telemetry {
        let s = t.snapshot();
        println!(
            "{name:<18} {:>9} {:>9} {:>9} {:>22} {:>9}",
            s.consumed,
            s.succeeded,
            s.transient_retries,
            format!("{:?}", &s.retried[..5]),
            s.dead_lettered
        );
        if order_consumers.contains(name) {
            succeeded += s.succeeded;
            dead += s.dead_lettered;
        }
    }
    println!(
        "downstream answers: {} ok, {} x 503, {} x 500, {} x 400, {} repeated idempotency keys",
        served.ok.load(Ordering::Relaxed),
        served.s503.load(Ordering::Relaxed),
        served.s500.load(Ordering::Relaxed),
        served.s400.load(Ordering::Relaxed),
        served.repeated.load(Ordering::Relaxed),
    );
    let mut latencies = intake_latencies.lock().expect("latencies").clone();
    latencies.sort_by(|a, b| a.total_cmp(b));
    if !latencies.is_empty() {
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        println!(
            "intake: {} orders accepted (202), response time p50 {:.1} ms, p99 {:.1} ms",
            latencies.len(),
            at(0.5),
            at(0.99)
        );
    }
    for (name, t) in &saga_telemetry {
        println!("saga {name}: {}", t.summary());
        let c = t.counters();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let stuck = n(&c.stuck_now);
        let ended = n(&c.confirmed) + n(&c.cancelled) + stuck;
        println!(
            "saga {name} balance: published {published} = confirmed {} + cancelled {} + stuck {stuck} = {ended}  {}",
            n(&c.confirmed),
            n(&c.cancelled),
            if ended == published { "OK" } else { "MISMATCH" }
        );
        if stuck > 0 {
            println!("  stuck sagas need a person: `orderflow saga show <order-id>`, then replay the compensation's dead letters");
        }
        if ended != published {
            bail!("saga {name} did not account for every order");
        }
    }
    let consumers = order_consumers.len() as u64;
    println!(
        "balance: published {published} x {consumers} consumers = {} ; succeeded {succeeded} + in DLQ {dead} = {}  {}",
        published * consumers,
        succeeded + dead,
        if published * consumers == succeeded + dead { "OK" } else { "MISMATCH" }
    );
    println!(
        "topics: {topic} (kcat -b {} -C -t {topic} -e), dead letters in <topic>.<group>.dlq",
        connect.bootstrap_servers
    );
    if !balanced || published * consumers != succeeded + dead {
        bail!(
            "the counts did not add up within {}",
            humantime::format_duration(args.timeout)
        );
    }
    Ok(())
}

fn print_progress(
    tty: bool,
    published: u64,
    done: u64,
    expected: u64,
    snapshots: &[(&str, Snapshot)],
) {
    let width = 30;
    let filled = (done * width as u64)
        .checked_div(expected)
        .map_or(width, |f| f as usize)
        .min(width);
    let per_pipeline: Vec<String> = snapshots
        .iter()
        .map(|(n, s)| {
            let retried: u64 = s.retried.iter().sum();
            format!("{n} {}ok/{}r/{}dlq", s.succeeded, retried, s.dead_lettered)
        })
        .collect();
    let line = format!(
        "[{}{}] {done}/{expected} published {published} | {}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        per_pipeline.join(" | ")
    );
    if tty {
        eprint!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
}
