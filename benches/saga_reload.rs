//! Saga reload after a restart or a rebalance, before and after state retention (issue 19): how
//! long the orchestrator takes to reload its partitions of the state topic when it holds N
//! finished sagas (default 100,000), and how many states it then holds.
//!
//! The N finished states are written straight to the state topic, each a confirmed saga of the
//! repository's order saga encoded as the orchestrator encodes it (JSON, keyed by order id,
//! finished an hour before the run), rather than run through the steps. Then, three phases:
//! - before: retention 7 days (all N are within it): the reload holds all N;
//! - tombstoned: the real orchestrator runs with a 1 s retention (one input on each partition
//!   makes it reload them); it skips the N expired states and writes their tombstones in its
//!   transactions. The reload now reads N states and N tombstones and holds none;
//! - compacted: the topic's segment and cleaner settings are lowered for the bench so Kafka's log
//!   cleaner removes the states, then the tombstones; the reload reads what is left.
//!
//! Each reload is `Orchestrator::load_partition` (what the orchestrator runs on an assignment)
//! for every partition in turn, timed as a whole, `ORDERFLOW_BENCH_RUNS` times. If the cleaner
//! has not compacted the topic within `ORDERFLOW_BENCH_COMPACTION_SECONDS` (default 180), the
//! last phase is measured anyway and marked not compacted.
//!
//!     eval "$(scripts/stack up)" && cargo bench --bench saga_reload
//!
//! ORDERFLOW_BENCH_SAGA_STATES (default 100000), ORDERFLOW_BENCH_RUNS (default 3),
//! ORDERFLOW_BENCH_PARTITIONS (default 3). The JSON goes to the file ORDERFLOW_BENCH_JSON (else
//! stdout).

mod common;

use common::env_or;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use orderflow::app::{codec, load_pipelines_and_sagas, Connect};
use orderflow::contracts::events::now_millis;
use orderflow::contracts::{AnyEvent, EventCodec, OrderCreated};
use orderflow::saga::state::{self, Input, Outcome, SagaStatus, StepStatus};
use orderflow::saga::state_topic::{read_partition, COMPACTION};
use orderflow::saga::{Orchestrator, Saga, SagaState};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;

const WEEK: Duration = Duration::from_secs(7 * 86_400);

#[tokio::main]
async fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let states: usize = env_or("ORDERFLOW_BENCH_SAGA_STATES", 100_000);
    let runs: usize = env_or("ORDERFLOW_BENCH_RUNS", 3);
    let partitions: i32 = env_or("ORDERFLOW_BENCH_PARTITIONS", 3);
    let compaction_seconds: u64 = env_or("ORDERFLOW_BENCH_COMPACTION_SECONDS", 180);
    let prefix = format!(
        "bench-saga-reload-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let connect = Connect::local(&prefix);
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"));
    let (_, sagas) = load_pipelines_and_sagas(dir).unwrap();
    let saga = sagas[0].clone();
    let codec = codec(&connect).unwrap();
    let orchestrator = |retention: Duration| {
        Orchestrator::new(
            saga.clone(),
            connect.naming(),
            &connect.bootstrap_servers,
            codec.clone(),
        )
        .unwrap()
        .with_retention(retention)
        .unwrap()
    };
    orchestrator(WEEK)
        .ensure_topics(partitions, connect.replication_factor)
        .await
        .unwrap();
    let state_topic = saga.state_topic(&connect.naming());
    let at = (connect.bootstrap_servers.as_str(), state_topic.as_str());

    // --- N finished sagas, written as the orchestrator writes them ---------------------------
    let template = finished_state(&saga);
    let state_bytes = serde_json::to_vec(&template).unwrap().len();
    let producer: FutureProducer = orderflow::kafka::producer_config(&connect.bootstrap_servers)
        .create()
        .unwrap();
    let written = Instant::now();
    let ids: Vec<uuid::Uuid> = (0..states).map(|_| uuid::Uuid::now_v7()).collect();
    for chunk in ids.chunks(5_000) {
        let sends = chunk.iter().map(|id| {
            let mut s = template.clone();
            s.order_id = *id;
            s.order.order_id = *id;
            let (key, payload) = (id.to_string(), serde_json::to_vec(&s).unwrap());
            let producer = producer.clone();
            let topic = state_topic.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&payload),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
    eprintln!(
        "{states} finished saga states of {state_bytes} bytes written to {partitions} partitions in {:.1} s",
        written.elapsed().as_secs_f64()
    );

    // --- before: all within the window -------------------------------------------------------
    let before = reloads(&orchestrator(WEEK), at, partitions, runs, "before").await;

    // --- tombstoned: the orchestrator expires them -------------------------------------------
    let expiring = orchestrator(Duration::from_secs(1));
    let telemetry = expiring.telemetry();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(expiring.run(stopped));
    let expire_started = Instant::now();
    for p in 0..partitions {
        stray_reply(&codec, &prefix, &producer, p).await;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while telemetry.counters().expired.load(Ordering::Relaxed) < states as u64 {
        assert!(
            Instant::now() < deadline,
            "not every state expired within 600 s: {} of {states}",
            telemetry.counters().expired.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expire_seconds = expire_started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    eprintln!("the orchestrator tombstoned {states} expired states in {expire_seconds:.1} s");
    let tombstoned = reloads(&orchestrator(WEEK), at, partitions, runs, "tombstoned").await;

    // --- compacted: the log cleaner removes them ---------------------------------------------
    let waited = Instant::now();
    let compacted = compact(
        &connect.bootstrap_servers,
        &state_topic,
        partitions,
        &producer,
        states,
        Duration::from_secs(compaction_seconds),
    )
    .await;
    let waited = waited.elapsed().as_secs_f64();
    eprintln!(
        "state topic {} after {waited:.0} s",
        if compacted {
            "compacted"
        } else {
            "NOT compacted"
        }
    );
    let after = reloads(&orchestrator(WEEK), at, partitions, runs, "compacted").await;

    let result = serde_json::json!({
        "states": states,
        "partitions": partitions,
        "state_bytes": state_bytes,
        "before": before,
        "expire_seconds": expire_seconds,
        "tombstoned": tombstoned,
        "compacted": after,
        "compaction": {"done": compacted, "waited_seconds": waited},
    });
    common::write_result(&result);
}

/// `runs` reloads of every partition, each timed as a whole: seconds, records read, states held.
async fn reloads(
    orchestrator: &Orchestrator,
    (bootstrap, topic): (&str, &str),
    partitions: i32,
    runs: usize,
    phase: &str,
) -> serde_json::Value {
    let mut seconds = Vec::new();
    let (mut held, mut skipped) = (0, 0);
    for _ in 0..runs {
        let started = Instant::now();
        (held, skipped) = (0, 0);
        for p in 0..partitions {
            let loaded = orchestrator.load_partition(p).await.unwrap();
            held += loaded.states.len();
            skipped += loaded.expired.len() + loaded.deleted;
        }
        seconds.push(started.elapsed().as_secs_f64());
    }
    let records = records_in(bootstrap, topic, partitions);
    eprintln!("{phase}: reload {seconds:.3?} s, {records} records read, {held} states held, {skipped} keys skipped");
    serde_json::json!({"seconds": seconds, "records": records, "held": held, "skipped": skipped})
}

/// Records (states and tombstones) the state topic holds now, over `partitions`.
fn records_in(bootstrap: &str, topic: &str, partitions: i32) -> usize {
    (0..partitions)
        .map(|p| read_partition(bootstrap, topic, p).unwrap().len())
        .sum()
}

/// A `shipment.scheduled` for an order no saga knows, on `partition`: an input that makes the
/// orchestrator reload that partition (and is counted as a late reply).
async fn stray_reply(codec: &EventCodec, prefix: &str, producer: &FutureProducer, partition: i32) {
    let cause = OrderCreated::sample("bench").envelope;
    let id = uuid::Uuid::now_v7().to_string();
    let reply = AnyEvent::from_data(
        "shipment.scheduled",
        serde_json::json!({"order_id": id, "shipment_id": uuid::Uuid::now_v7().to_string(), "carrier": "dhl"}),
        "bench",
        &cause,
    )
    .unwrap();
    let topic = format!("{prefix}shipment.scheduled");
    let payload = reply.encode(codec, &topic).await.unwrap();
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&id)
                .payload(&payload)
                .partition(partition),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// Lowers the topic's segment and cleaner settings so the log cleaner compacts it within the
/// bench, and appends a tombstone of a new key to each partition every second (a segment rolls
/// only on an append) until at most 1 % of the states' records are left, or `within` passes.
async fn compact(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    producer: &FutureProducer,
    states: usize,
    within: Duration,
) -> bool {
    let admin: AdminClient<DefaultClientContext> =
        orderflow::kafka::client_config(bootstrap).create().unwrap();
    // alter_configs replaces the topic's whole set: the production settings, then the bench's.
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (name, value) in COMPACTION {
        config = config.set(name, value);
    }
    let config = config
        .set("segment.ms", "1000")
        .set("min.cleanable.dirty.ratio", "0.01")
        .set("max.compaction.lag.ms", "1000")
        .set("delete.retention.ms", "0");
    for r in admin
        .alter_configs([&config], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let deadline = Instant::now() + within;
    let mut appended = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for p in 0..partitions {
            let key = uuid::Uuid::now_v7().to_string();
            producer
                .send(
                    FutureRecord::<String, [u8]>::to(topic)
                        .key(&key)
                        .partition(p),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            appended += 1;
        }
        let (b, t) = (bootstrap.to_string(), topic.to_string());
        let left: usize = tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| read_partition(&b, &t, p).unwrap().len())
                .sum()
        })
        .await
        .unwrap();
        if left <= states / 100 + appended {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// A confirmed saga of `saga`, as the state machine leaves it: started by `state::apply`, then
/// every step succeeded with a reply and the history the orchestrator writes, finished an hour
/// ago.
fn finished_state(saga: &Saga) -> SagaState {
    let order = OrderCreated::sample("bench");
    let now = now_millis();
    let Outcome::Changed(t) = state::apply(saga, None, Input::Started(&order), now, "bench") else {
        panic!("a new order starts a saga")
    };
    let mut s = t.state;
    for step in &mut s.steps {
        step.status = StepStatus::Succeeded;
        step.attempts = 1;
        step.command_id = Some(uuid::Uuid::now_v7());
        step.requested_at = Some(now);
        step.deadline = None;
        step.reply = Some(serde_json::json!({
            "order_id": order.data.order_id.to_string(),
            "id": uuid::Uuid::now_v7().to_string(),
        }));
        s.history.push(state::HistoryEntry {
            at: now,
            step: Some(step.name.clone()),
            what: format!("sent {} {}", step.name, uuid::Uuid::now_v7()),
        });
        s.history.push(state::HistoryEntry {
            at: now,
            step: Some(step.name.clone()),
            what: format!("succeeded {}", uuid::Uuid::now_v7()),
        });
    }
    s.status = SagaStatus::Confirmed;
    s.version = 1 + 2 * s.steps.len() as u64;
    s.updated_at = now - 3_600_000;
    s.started_at = s.updated_at - 1_000;
    s
}
