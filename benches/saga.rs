//! Sagas per second through one orchestrator: N orders are published first, then the step
//! pipelines (in this process, against the simulated services at 0-1 ms per call) and one saga
//! orchestrator run until every saga is confirmed or cancelled (10 % of payments declined).
//! It measures the orchestrator, so the steps should not be what limits it: they run without
//! the dedup store by default, leaving the two cores to the orchestrator, the steps and the broker
//! rather than PostgreSQL too (ORDERFLOW_BENCH_SAGA_DEDUP=1 runs them with it). The bench also
//! prints where the orchestrator's own time went (batches, inputs per batch, commit time,
//! applying inputs, waiting for commits or for inputs) and the rate it would reach if it never
//! waited for inputs. More partitions and step replicas (ORDERFLOW_BENCH_PARTITIONS,
//! ORDERFLOW_BENCH_STEP_REPLICAS) spread the steps; on two shared cores, more replicas only add
//! polling threads.
//!
//! N is 10,000 by default: a run of 2,000 sagas lasted 1.4-2.7 s, so one slow commit (they take
//! 20-400 ms while the broker shares the cores) moved the figure by a quarter.
//!
//!     eval "$(scripts/stack up)" && cargo bench --bench saga
//!
//! ORDERFLOW_BENCH_SAGAS (default 10000), ORDERFLOW_BENCH_PARTITIONS (default 3),
//! ORDERFLOW_BENCH_STEP_REPLICAS (default 1), ORDERFLOW_BENCH_SAGA_DEDUP (default 0).

mod common;

use common::env_or;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use orderflow::app::{codec, load_pipelines_and_sagas, orchestrators, processors, Connect};
use orderflow::contracts::OrderCreated;
use orderflow::simulate::{self, Behaviour};
use tokio::sync::watch;

#[tokio::main]
async fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let sagas: u64 = env_or("ORDERFLOW_BENCH_SAGAS", 10_000);
    let partitions: i32 = env_or("ORDERFLOW_BENCH_PARTITIONS", 3);
    let replicas: usize = env_or("ORDERFLOW_BENCH_STEP_REPLICAS", 1);
    let dedup = env_or("ORDERFLOW_BENCH_SAGA_DEDUP", 0) == 1;
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
    let codec = codec(&connect).unwrap();
    // The saga's topics first, with `partitions` each; the step pipelines' retry and dead-letter
    // topics follow their inputs.
    orderflow::saga::Orchestrator::new(
        saga_files[0].clone(),
        connect.naming(),
        &connect.bootstrap_servers,
        codec.clone(),
    )
    .unwrap()
    .ensure_topics(partitions, connect.replication_factor)
    .await
    .unwrap();
    // The saga's steps only: the read model and the order.created fan-out are not measured.
    let steps: Vec<_> = pipelines
        .into_iter()
        .filter(|p| !p.inputs.iter().any(|i| i == "order.created"))
        .collect();
    let mut step_processors = Vec::new();
    for _ in 0..replicas {
        step_processors.extend(processors(&connect, steps.clone(), dedup).await.unwrap());
    }
    let orchestrators = orchestrators(&connect, saga_files, codec.clone())
        .await
        .unwrap();
    let telemetry = orchestrators[0].telemetry();
    let stats = orchestrators[0].stats();

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
    for p in step_processors {
        tasks.spawn(p.run(stopped.clone()));
    }
    let run_started = Instant::now();
    for o in orchestrators {
        tasks.spawn(o.run(stopped.clone()));
    }
    let c = telemetry.counters();
    let deadline = Instant::now() + Duration::from_secs(600);
    while c.started.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no saga started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let ended = || c.confirmed.load(Ordering::Relaxed) + c.cancelled.load(Ordering::Relaxed);
    while ended() < sagas {
        assert!(Instant::now() < deadline, "{}", telemetry.summary());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let profile = stats.summary(run_started.elapsed().as_secs_f64());
    let busy = (stats.apply_micros.load(Ordering::Relaxed)
        + stats.commit_wait_micros.load(Ordering::Relaxed)) as f64
        / 1e6;
    stop.send(true).unwrap();
    while tasks.join_next().await.is_some() {}
    println!(
        "{sagas} sagas (3 steps each, 10 % cancelled with compensation) in {seconds:.1} s: {:.0} sagas/s through one orchestrator; {}",
        sagas as f64 / seconds,
        telemetry.summary()
    );
    println!(
        "steps: {partitions} partitions, {replicas} replica(s) per step pipeline, dedup {}; orchestrator: {profile}",
        if dedup { "on" } else { "off" }
    );
    println!(
        "orchestrator busy {busy:.2} s in all: {:.0} sagas/s if it never waited for inputs",
        sagas as f64 / busy.max(1e-3)
    );
}
