//! Saga state retention against the real broker and registry (issue 19), with a 2 s window: a
//! finished saga is tombstoned in its state topic and evicted while one in flight is kept and
//! finishes later; a late reply for an expired saga changes nothing and is counted; after a
//! restart the reload holds only the live states.
//!
//! The shipping pipeline does not run: each saga waits at its shipping step until the test
//! answers its command itself, so which sagas finish, and when, is the test's choice.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use orderflow::app::{codec as codec_for, load_pipelines_and_sagas, orchestrators, processors};
use orderflow::contracts::events::now_millis;
use orderflow::contracts::{AnyEvent, Envelope, OrderCreated};
use orderflow::saga::{find_state, SagaStatus};
use orderflow::simulate::{self, Behaviour};
use orderflow::telemetry::saga::{SagaCounters, SagaTelemetry};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio::sync::watch;

const RETENTION: Duration = Duration::from_secs(2);
/// The saga's steps but shipping.
const STEPS: [&str; 4] = [
    "inventory",
    "inventory-release",
    "payment",
    "payment-refund",
];

/// The step pipelines but shipping, and the saga with a 2 s retention, in this process.
struct Run {
    saga: SagaTelemetry,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Run {
    async fn start(prefix: &str, dir: &Path) -> Run {
        let connect = connect(prefix);
        let (pipelines, sagas) = load_pipelines_and_sagas(dir).unwrap();
        let steps = pipelines
            .into_iter()
            .filter(|p| STEPS.contains(&p.name.as_str()))
            .collect();
        let processors = processors(&connect, steps, true).await.unwrap();
        let codec = codec_for(&connect).unwrap();
        let orchestrator = orchestrators(&connect, sagas, codec)
            .await
            .unwrap()
            .remove(0)
            .with_retention(RETENTION)
            .unwrap();
        let saga = orchestrator.telemetry();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for p in processors {
            tasks.spawn(p.run(stopped.clone()));
        }
        tasks.spawn(orchestrator.run(stopped));
        Run { saga, stop, tasks }
    }

    fn counters(&self) -> &SagaCounters {
        self.saga.counters()
    }

    /// Waits until `done` holds of the orchestrator's counters.
    async fn wait(&self, what: &str, done: impl Fn(&SagaCounters) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self.counters()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within 60 s ({})",
                self.saga.summary()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        self.stop.send(true).unwrap();
        while let Some(result) = self.tasks.join_next().await {
            result.unwrap().unwrap();
        }
    }
}

fn n(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

async fn saga_dir_simulated() -> (PathBuf, tokio::task::JoinHandle<()>) {
    let behaviour = Behaviour {
        latency_ms: 1..=5,
        ..Behaviour::default()
    };
    let (addr, _, server) = simulate::serve("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .unwrap();
    (saga_dir(addr, |_, t| t), server)
}

/// The shipping command of each order, once all of `orders` have one.
async fn shipping_commands(prefix: &str, orders: &[OrderCreated]) -> HashMap<String, AnyEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let commands: HashMap<String, AnyEvent> = events(prefix, "shipment.scheduling-requested")
            .await
            .into_iter()
            .map(|c| (c.key(), c))
            .collect();
        if orders
            .iter()
            .all(|o| commands.contains_key(&o.data.order_id.to_string()))
        {
            return commands;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} sagas reached shipping",
            commands.len(),
            orders.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Writes a `shipment.scheduled` for `order_id` caused by `cause` (its command, or any envelope
/// for a stray reply), to `partition` if given.
async fn ship(prefix: &str, order_id: &str, cause: &Envelope, partition: Option<i32>) {
    let reply = AnyEvent::from_data(
        "shipment.scheduled",
        serde_json::json!({
            "order_id": order_id,
            "shipment_id": uuid::Uuid::now_v7().to_string(),
            "carrier": "dhl",
        }),
        "test",
        cause,
    )
    .unwrap();
    let (codec, _) = codec(prefix);
    let topic = format!("{prefix}shipment.scheduled");
    let payload = reply.encode(&codec, &topic).await.unwrap();
    let producer: FutureProducer = orderflow::kafka::producer_config(&bootstrap())
        .create()
        .unwrap();
    let mut record = FutureRecord::to(&topic).key(order_id).payload(&payload);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap();
}

/// Whether the state topic's newest record for `order_id` is a tombstone.
async fn tombstoned(prefix: &str, order_id: &str) -> bool {
    let topic = format!("{prefix}saga.order.state");
    let records = tokio::task::spawn_blocking(move || read_topic(&topic))
        .await
        .unwrap();
    records
        .iter()
        .rfind(|r| r.key() == Some(order_id.as_bytes()))
        .is_some_and(|r| r.payload().is_none())
}

async fn stored(prefix: &str, order: &OrderCreated) -> Option<orderflow::saga::SagaState> {
    find_state(
        &bootstrap(),
        &format!("{prefix}saga.order.state"),
        order.data.order_id,
    )
    .await
    .unwrap()
}

/// Commands of every kind sent for `order_id`.
async fn commands_for(prefix: &str, order_id: &str) -> usize {
    let mut count = 0;
    for t in [
        "inventory.reservation-requested",
        "payment.charge-requested",
        "shipment.scheduling-requested",
        "inventory.release-requested",
        "payment.refund-requested",
    ] {
        count += events(prefix, t)
            .await
            .iter()
            .filter(|e| e.key() == order_id)
            .count();
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_saga_expires_one_in_flight_does_not_and_a_late_reply_changes_nothing() {
    let prefix = prefix("saga-retention");
    let (dir, _server) = saga_dir_simulated().await;
    let run = Run::start(&prefix, &dir).await;
    let orders = publish_paced(&prefix, 2, Duration::ZERO).await;
    let (done, held) = (&orders[0], &orders[1]);
    let (done_id, held_id) = (
        done.data.order_id.to_string(),
        held.data.order_id.to_string(),
    );
    let commands = shipping_commands(&prefix, &orders).await;

    // One saga finishes; the other waits for shipping.
    ship(&prefix, &done_id, commands[&done_id].envelope(), None).await;
    run.wait("one saga confirmed", |c| n(&c.confirmed) == 1)
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tombstoned(&prefix, &done_id).await {
        assert!(
            Instant::now() < deadline,
            "no tombstone for the finished saga ({})",
            run.saga.summary()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    run.wait("the finished saga evicted", |c| {
        n(&c.expired) == 1 && n(&c.held_finished) == 0 && n(&c.held_live) == 1
    })
    .await;
    assert!(stored(&prefix, done).await.is_none());
    let (found, text) = cli_output(&prefix, &dir, &["saga", "show", &done_id]);
    assert!(!found && text.contains("no saga order for order"), "{text}");
    // The saga in flight is older than the window, and kept.
    let kept = stored(&prefix, held).await.unwrap();
    assert_eq!(kept.status, SagaStatus::Running);
    assert!(now_millis() - kept.started_at > RETENTION.as_millis() as i64);

    // A late reply for the expired saga: counted, nothing else.
    let before = commands_for(&prefix, &done_id).await;
    ship(&prefix, &done_id, commands[&done_id].envelope(), None).await;
    run.wait("the late reply counted", |c| n(&c.late_replies) == 1)
        .await;
    assert!(stored(&prefix, done).await.is_none(), "state re-created");
    assert_eq!(commands_for(&prefix, &done_id).await, before);
    assert_eq!(n(&run.counters().started), 2);

    // The saga in flight finishes normally.
    ship(&prefix, &held_id, commands[&held_id].envelope(), None).await;
    run.wait("the other saga confirmed", |c| n(&c.confirmed) == 2)
        .await;
    run.stop().await;
    let confirmed: Vec<String> = events(&prefix, "order.confirmed")
        .await
        .iter()
        .map(AnyEvent::key)
        .collect();
    assert_eq!(confirmed.len(), 2, "{confirmed:?}");
    assert!(confirmed.contains(&done_id) && confirmed.contains(&held_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_restart_only_live_states_are_reloaded() {
    let prefix = prefix("saga-reload");
    let (dir, _server) = saga_dir_simulated().await;
    let run = Run::start(&prefix, &dir).await;
    let orders = publish_paced(&prefix, 4, Duration::ZERO).await;
    let commands = shipping_commands(&prefix, &orders).await;
    let (finished, live) = orders.split_at(2);
    for o in finished {
        let id = o.data.order_id.to_string();
        ship(&prefix, &id, commands[&id].envelope(), None).await;
    }
    run.wait("two sagas expired", |c| {
        n(&c.confirmed) == 2 && n(&c.expired) == 2
    })
    .await;
    run.stop().await;

    // Restarted: an input on every partition makes it reload them all.
    let run = Run::start(&prefix, &dir).await;
    let partitions = orderflow::runtime::DEFAULT_PARTITIONS;
    let stray = OrderCreated::sample("test").envelope;
    for p in 0..partitions {
        let id = uuid::Uuid::now_v7().to_string();
        ship(&prefix, &id, &stray, Some(p)).await;
    }
    run.wait("every partition reloaded", |c| {
        n(&c.reloads) == partitions as u64 && n(&c.late_replies) == partitions as u64
    })
    .await;
    let c = run.counters();
    assert_eq!(
        (
            n(&c.reloaded_live),
            n(&c.reloaded_finished),
            n(&c.reloaded_skipped)
        ),
        (2, 0, 2),
        "{}",
        run.saga.summary()
    );
    assert_eq!((n(&c.held_live), n(&c.held_finished)), (2, 0));

    // The live ones carry on from their reloaded state.
    for o in live {
        let id = o.data.order_id.to_string();
        ship(&prefix, &id, commands[&id].envelope(), None).await;
    }
    run.wait("the live sagas confirmed", |c| n(&c.confirmed) == 2)
        .await;
    run.stop().await;
    let mut confirmed: Vec<String> = events(&prefix, "order.confirmed")
        .await
        .iter()
        .map(AnyEvent::key)
        .collect();
    confirmed.sort();
    let mut all: Vec<String> = orders.iter().map(|o| o.data.order_id.to_string()).collect();
    all.sort();
    assert_eq!(confirmed, all, "each order confirmed once");
}
