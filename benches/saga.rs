//! Sagas per second through one orchestrator: N orders are published first, then the step
//! pipelines (in this process, against the simulated services at 0-1 ms per call) and one saga
//! orchestrator run until every saga is confirmed or cancelled (10 % of payments declined).
//!
//!     eval "$(scripts/stack up)" && cargo bench --bench saga
//!
//! ORDERFLOW_BENCH_SAGAS (default 2000).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use orderflow::cli::{codec, load_pipelines_and_sagas, orchestrators, processors, Connect};
use orderflow::contracts::OrderCreated;
use orderflow::simulate::{self, Behaviour};
use tokio::sync::watch;

#[tokio::main]
async fn main() {
    let sagas: u64 = std::env::var("ORDERFLOW_BENCH_SAGAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let prefix = format!(
        "bench-saga-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let connect = Connect::local(&prefix);
    let behaviour = Behaviour {
        latency_ms: 0..=1,
        rate_declined: 0.1,
        ..Behaviour::default()
    };
    let (addr, _, _server) = simulate::serve("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .unwrap();
    for (var, url) in simulate::pipeline_url_env(&format!("http://{addr}")) {
        std::env::set_var(var, url);
    }
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"));
    let (pipelines, saga_files) = load_pipelines_and_sagas(dir).unwrap();
    // The saga's steps only: the read model and the order.created fan-out are not measured.
    let steps: Vec<_> = pipelines
        .into_iter()
        .filter(|p| !p.inputs.iter().any(|i| i == "order.created"))
        .collect();
    let processors = processors(&connect, steps, true).await.unwrap();
    let codec = codec(&connect).unwrap();
    let orchestrators = orchestrators(&connect, saga_files, codec.clone())
        .await
        .unwrap();
    let telemetry = orchestrators[0].telemetry();

    let publisher = orderflow::kafka::Publisher::new(&connect.bootstrap_servers, codec).unwrap();
    let topic = format!("{prefix}order.created");
    let orders: Vec<OrderCreated> = (0..sagas).map(|_| OrderCreated::sample("bench")).collect();
    for chunk in orders.chunks(500) {
        for r in futures::future::join_all(chunk.iter().map(|o| publisher.publish(&topic, o))).await
        {
            r.unwrap();
        }
    }

    let (stop, stopped) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for p in processors {
        tasks.spawn(p.run(stopped.clone()));
    }
    for o in orchestrators {
        tasks.spawn(o.run(stopped.clone()));
    }
    let c = telemetry.counters();
    while c.started.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let ended = || c.confirmed.load(Ordering::Relaxed) + c.cancelled.load(Ordering::Relaxed);
    while ended() < sagas {
        assert!(Instant::now() < deadline, "{}", telemetry.summary());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    while tasks.join_next().await.is_some() {}
    println!(
        "{sagas} sagas (3 steps each, 10 % cancelled with compensation) in {seconds:.1} s: {:.0} sagas/s through one orchestrator; {}",
        sagas as f64 / seconds,
        telemetry.summary()
    );
}
