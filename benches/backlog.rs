//! The backlog benchmark: a processor's memory while it catches up. A processor that meets a
//! backlog reads as fast as its in-flight budget and librdkafka's read-ahead let it
//! (`kafka::consumer_config`); if that outgrows the memory limit the Kubernetes manifests give
//! it, the pod is killed while catching up, restarts, meets the same backlog and is killed
//! again. This measures the peak against that limit, with the shipped defaults.
//!
//!     eval "$(scripts/stack up)" && cargo bench --bench backlog
//!
//! ORDERFLOW_BENCH_BACKLOG_EVENTS (200000) `order.created` events are published first. Then,
//! one after the other, each as `orderflow run` (the binary cargo built for this bench: release
//! under `cargo bench`) in a process of its own, with its default settings (dedup on, budget
//! 10,000 records):
//! - `slow step`: the repository's `pipelines/notification.yaml` (an HTTP step, default concurrency 64)
//!   against `orderflow simulate` answering each call after 50 ms, for
//!   ORDERFLOW_BENCH_BACKLOG_SECONDS (30) from its /readyz: it handles at most 64 / 50 ms =
//!   1,280 events/s, so the backlog outlasts the window and the budget stays full throughout;
//! - `fan-out`: a route of every event to four topics, until it has handled the whole backlog
//!   (300 s at most): its producer queues, not a step, hold it back.
//!
//! Every 100 ms it samples the processor's RSS (/proc) and (the slow step: every second) reads the
//! events handled from its /metrics. The limits are the notification processor's in the manifests: the base
//! (`deploy/base/pipelines.yaml`) and the dev and prod overlays' patches. A run fails, and no figure is recorded, when a process exits, an event is dead
//! lettered or retried, the slow step handles nothing or the whole backlog (then it was not
//! catching up for its whole window), or the fan-out does not finish. The JSON goes to the
//! file ORDERFLOW_BENCH_JSON (else stdout).

mod common;

use common::{env_or, free_port, metrics, orderflow_run, publish_orders, rss_mib, total, Process};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use orderflow::app::Connect;
use orderflow::simulate;
use serde_json::{json, Value};

/// The fixed latency of the slow step's service.
const LATENCY_MS: u64 = 50;
/// The longest a fan-out of the whole backlog may take.
const FAN_OUT_LIMIT: Duration = Duration::from_secs(300);

fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(backlog());
    common::write_result(&result);
}

async fn backlog() -> Value {
    let events = env_or("ORDERFLOW_BENCH_BACKLOG_EVENTS", 200_000);
    let seconds = env_or("ORDERFLOW_BENCH_BACKLOG_SECONDS", 30);
    let prefix = format!(
        "bench-backlog-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let connect = Connect::local(&prefix);
    let dir = std::env::temp_dir().join(format!("bench-backlog-{}", &prefix[14..22]));
    std::fs::create_dir_all(&dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let notification = std::fs::read_to_string(repo.join("pipelines/notification.yaml"))
        .expect("reading pipelines/notification.yaml");
    let concurrency = orderflow::pipeline::parse(
        Path::new("notification.yaml"),
        &notification,
        &orderflow::steps::HANDLER_NAMES,
    )
    .expect("pipelines/notification.yaml")
    .concurrency;
    std::fs::write(dir.join("notification.yaml"), notification).unwrap();
    std::fs::write(
        dir.join("fan-out.yaml"),
        "name: fan-out\ngroup: fan-out\ninputs: [order.created]\n\
         step: {route: {to: [backlog.a, backlog.b, backlog.c, backlog.d]}}\n",
    )
    .unwrap();
    // The limits the manifests give the notification processor.
    let limits_mib = json!({
        "dev": overlay_limit_mib(&repo.join("deploy/overlays/dev/kustomization.yaml")),
        "base": base_limit_mib(&repo.join("deploy/base/pipelines.yaml"), "orderflow-notification"),
        "prod": overlay_limit_mib(&repo.join("deploy/overlays/prod/kustomization.yaml")),
    });

    eprintln!("backlog: publishing {events} orders");
    publish_orders(&connect, events, "backlog").await;

    let sim_port = free_port();
    let simulator = Process::simulate(&format!("{LATENCY_MS}ms..{LATENCY_MS}ms"), sim_port).await;
    let run = |pipeline: &str, port: u16| {
        let mut command = orderflow_run(&connect, &dir, &["run", pipeline], port);
        command.envs(simulate::pipeline_url_env(&format!(
            "http://127.0.0.1:{sim_port}"
        )));
        command
    };

    eprintln!("backlog: slow step for {seconds} s");
    let port = free_port();
    let slow = catch_up(
        "orderflow run notification",
        &mut run("notification", port),
        port,
        events,
        Until::Seconds(seconds),
        &simulator,
    )
    .await;
    eprintln!("backlog: fan-out of all {events}");
    let port = free_port();
    let fan_out = catch_up(
        "orderflow run fan-out",
        &mut run("fan-out", port),
        port,
        events,
        Until::AllHandled,
        &simulator,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    json!({
        "backlog_events": events,
        "memory_limits_mib": limits_mib,
        "slow_step": {"latency_ms": LATENCY_MS, "concurrency": concurrency, "dedup": true, "result": slow},
        "fan_out": {"outputs": 4, "dedup": true, "result": fan_out},
    })
}

/// When a processor's measured window ends.
enum Until {
    /// This long after it is ready; it must still have events left.
    Seconds(u64),
    /// When it has handled every event of the backlog.
    AllHandled,
}

/// Runs one processor over the backlog (serving /metrics on `port`) and samples it; panics on
/// any failure named in the file comment.
async fn catch_up(
    name: &'static str,
    command: &mut Command,
    port: u16,
    events: usize,
    until: Until,
    simulator: &Process,
) -> Value {
    let client = reqwest::Client::new();
    let spawned = Instant::now();
    let processor = Process::spawn(name, command);
    let mut rss = Vec::new();
    let sample = |rss: &mut Vec<f64>| {
        processor.alive();
        simulator.alive();
        rss.extend(rss_mib(processor.pid()));
    };
    // Its start-up is sampled too: a peak then counts as much as one later.
    processor
        .ready_every(&client, port, Duration::from_millis(100), || {
            sample(&mut rss)
        })
        .await;
    let ready = Instant::now();
    let deadline = ready
        + match until {
            Until::Seconds(s) => Duration::from_secs(s),
            Until::AllHandled => FAN_OUT_LIMIT,
        };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut handled = 0.0;
    for n in 0u64.. {
        tick.tick().await;
        sample(&mut rss);
        let now = Instant::now();
        // The fan-out's end is looked for at every sample, the slow step's count once a second.
        if matches!(until, Until::AllHandled) || n % 10 == 0 || now >= deadline {
            handled = handled_without_failures(&client, port, name).await;
        }
        match until {
            Until::Seconds(_) if now >= deadline => break,
            Until::AllHandled if handled >= events as f64 => break,
            Until::AllHandled => assert!(
                now < deadline,
                "{name} handled {handled} of {events} in {FAN_OUT_LIMIT:?}"
            ),
            Until::Seconds(_) => {}
        }
    }
    let window = ready.elapsed().as_secs_f64();
    if let Until::Seconds(_) = until {
        assert!(handled > 0.0, "{name} handled nothing in {window:.0} s");
        assert!(
            handled < events as f64,
            "{name} handled the whole backlog ({events}) within its window: publish more"
        );
    }
    drop(processor);
    let mut sorted = rss;
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    json!({
        "seconds_to_ready": (ready - spawned).as_secs_f64(),
        "window_seconds": window,
        "handled": handled,
        "handled_per_second": handled / window,
        "rss_samples": sorted.len(),
        "rss_mib": {"median": at(0.5), "p90": at(0.9), "peak": at(1.0)},
    })
}

/// Events the processor on `port` has handled; panics if any was retried or dead-lettered.
async fn handled_without_failures(client: &reqwest::Client, port: u16, name: &str) -> f64 {
    let m = metrics(client, port)
        .await
        .unwrap_or_else(|| panic!("{name}: no /metrics"));
    for outcome in ["retried", "dead_lettered"] {
        let n = total(
            &m,
            "orderflow_events_processed_total",
            &format!("outcome=\"{outcome}\""),
        );
        assert_eq!(n, 0.0, "{name}: {n} events {outcome}");
    }
    total(
        &m,
        "orderflow_events_processed_total",
        "outcome=\"succeeded\"",
    )
}

/// A memory quantity of a manifest (`512Mi`, `1Gi`) in MiB.
fn mib(quantity: &str) -> f64 {
    let parsed = match quantity.trim().trim_matches('"') {
        q if q.ends_with("Mi") => q.trim_end_matches("Mi").parse::<f64>().ok(),
        q if q.ends_with("Gi") => q
            .trim_end_matches("Gi")
            .parse::<f64>()
            .ok()
            .map(|g| g * 1024.0),
        _ => None,
    };
    parsed.unwrap_or_else(|| panic!("memory quantity {quantity:?} is not in Mi or Gi"))
}

/// The memory limit of the processor container of Deployment `name` in the generated base
/// manifest (JSON documents separated by `---`).
fn base_limit_mib(manifest: &Path, name: &str) -> f64 {
    let text = std::fs::read_to_string(manifest)
        .unwrap_or_else(|e| panic!("reading {}: {e}", manifest.display()));
    let limit = text
        .split("\n---\n")
        .filter_map(|doc| serde_json::from_str::<Value>(doc).ok())
        .find(|doc| doc["kind"] == "Deployment" && doc["metadata"]["name"] == name)
        .and_then(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no memory limit for {name} in {}", manifest.display()));
    mib(&limit)
}

/// The memory limit an overlay's patch of every Deployment gives the processor container: the
/// `limits: {..., memory: X}` after its `target: {kind: Deployment}`.
fn overlay_limit_mib(kustomization: &Path) -> f64 {
    let text = std::fs::read_to_string(kustomization)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kustomization.display()));
    let quantity = text
        .lines()
        .skip_while(|l| !l.contains("target: {kind: Deployment}"))
        .find_map(|l| l.split("limits:").nth(1)?.split("memory:").nth(1))
        .map(|q| q.trim_end_matches(['}', ' ']))
        .unwrap_or_else(|| panic!("no Deployment memory limit in {}", kustomization.display()));
    mib(quantity)
}
