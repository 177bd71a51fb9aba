//! The fault suite: a known set of events with unique ids goes through processors while
//! something breaks, then every id is reconciled against every consumer's output and
//! dead-letter topic: lost must be 0; duplicates on the at-least-once paths are counted (and
//! downstream effects, keyed by `Idempotency-Key`, must be one per event).
//!
//! Runs in CI at reduced size; `ORDERFLOW_FAULTS_SCALE=10 cargo test --test faults -- --nocapture`
//! runs it larger. Each scenario prints a line of the table in the closing note.
//! The three-broker scenario runs against `scripts/kafka-cluster` (ORDERFLOW_CLUSTER_BOOTSTRAP),
//! which `scripts/test` starts beside the stack.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use orderflow::contracts::{EventCodec, OrderCreated, PaymentCharged};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

fn scale() -> usize {
    std::env::var("ORDERFLOW_FAULTS_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// One consumer's reconciliation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    lost: usize,
    duplicated: usize,
    in_dlq: usize,
}

/// Every id of `ids` in `output` or the group's dead-letter topic of `input`?
fn reconcile(prefix: &str, ids: &HashSet<String>, input: &str, group: &str, output: &str) -> Tally {
    reconcile_at(&bootstrap(), prefix, ids, input, group, output)
}

fn reconcile_at(
    cluster: &str,
    prefix: &str,
    ids: &HashSet<String>,
    input: &str,
    group: &str,
    output: &str,
) -> Tally {
    let read = |topic: String| keys(&read_topic_at(cluster, &topic, "read_committed"));
    let out = read(format!("{prefix}{output}"));
    let dlq = read(format!("{prefix}{input}.{group}.dlq"));
    let out_set: HashSet<&String> = out.iter().collect();
    let dlq_set: HashSet<&String> = dlq.iter().collect();
    Tally {
        lost: ids
            .iter()
            .filter(|id| !out_set.contains(id) && !dlq_set.contains(id))
            .count(),
        duplicated: out.len() - out_set.len(),
        in_dlq: ids
            .iter()
            .filter(|id| dlq_set.contains(id) && !out_set.contains(id))
            .count(),
    }
}

/// The four consumers of `common::pipelines_dir`: (group, output).
const CONSUMERS: [(&str, &str); 4] = [
    ("payment", "payment.charged"),
    ("inventory", "inventory.reserved"),
    ("notification", "notification.sent"),
    ("analytics", "analytics.orders"),
];

fn all_reconciled(prefix: &str, ids: &HashSet<String>) -> Vec<(&'static str, Tally)> {
    all_reconciled_at(&bootstrap(), prefix, ids)
}

fn all_reconciled_at(
    cluster: &str,
    prefix: &str,
    ids: &HashSet<String>,
) -> Vec<(&'static str, Tally)> {
    CONSUMERS
        .iter()
        .map(|(group, output)| {
            let t = reconcile_at(cluster, prefix, ids, "order.created", group, output);
            (*group, t)
        })
        .collect()
}

fn report(scenario: &str, events: usize, faults: &str, tallies: &[(&str, Tally)], replayed: usize) {
    for (consumer, t) in tallies {
        eprintln!(
            "| {scenario} | {consumer} | {events} | {faults} | {} | {} | {} | {replayed} |",
            t.lost, t.duplicated, t.in_dlq
        );
    }
}

/// Where the missing events are: their input partition and offset, each group's committed
/// offsets against the partitions' ends, and what waits in the retry topics.
fn diagnose(prefix: &str, ids: &HashSet<String>) -> String {
    let input = format!("{prefix}order.created");
    let records = read_topic(&input);
    let mut out = String::new();
    for (group, output) in CONSUMERS {
        let t = reconcile(prefix, ids, "order.created", group, output);
        if t.lost == 0 {
            continue;
        }
        let seen: HashSet<String> = keys(&read_topic(&format!("{prefix}{output}")))
            .into_iter()
            .chain(keys(&read_topic(&format!("{input}.{group}.dlq"))))
            .collect();
        for m in &records {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
            if ids.contains(&key) && !seen.contains(&key) {
                out += &format!(
                    "{group}: missing {key} at {}/{}\n",
                    m.partition(),
                    m.offset()
                );
            }
        }
        out += &format!(
            "{group}: committed {} of {} input records\n",
            committed_inputs(&format!("{prefix}{group}"), &input),
            records.len()
        );
        for tier in 1..=3 {
            let retry = format!("{input}.{group}.retry.{tier}");
            out += &format!(
                "{group}: {retry} holds {} record(s), committed {}\n",
                read_topic(&retry).len(),
                committed_inputs(&format!("{prefix}{group}"), &retry)
            );
        }
    }
    out
}

async fn wait_reconciled(
    prefix: &str,
    ids: &HashSet<String>,
    within: Duration,
    log: Option<&Path>,
) {
    let deadline = Instant::now() + within;
    loop {
        let tallies = all_reconciled(prefix, ids);
        if tallies.iter().all(|(_, t)| t.lost == 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every event reached every consumer within {within:?}: {tallies:?}\n{}\n{}",
            diagnose(prefix, ids),
            log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn ids_of(orders: &[OrderCreated]) -> HashSet<String> {
    orders.iter().map(|o| o.data.order_id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_twenty_times_nothing_is_lost() {
    const KILLS: usize = 20;
    let events = 150 * scale();
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(10));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("faults-kill");
    let log = dir.join("run.log");
    let publishing = {
        let prefix = prefix.clone();
        let every = Duration::from_millis((6000 / events as u64).max(1));
        tokio::spawn(async move { publish_paced(&prefix, events, every).await })
    };
    let mut run = spawn_run(&prefix, &dir, &log);
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..700))).await;
        signal(&run, libc::SIGKILL);
        wait_exit(&mut run, Duration::from_secs(10));
        run = spawn_run(&prefix, &dir, &log);
    }
    let orders = publishing.await.unwrap();
    let ids = ids_of(&orders);
    wait_reconciled(&prefix, &ids, Duration::from_secs(120), Some(&log)).await;
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(30)).success());
    let tallies = all_reconciled(&prefix, &ids);
    report("processor SIGKILLed", events, "20 x SIGKILL", &tallies, 0);
    for (consumer, t) in &tallies {
        assert_eq!((t.lost, t.in_dlq), (0, 0), "{consumer}");
    }
    // At-least-once: a record may be written again after a kill, but each event's effect
    // downstream happens once (one idempotency key per event).
    for service in ["payments", "reservations", "notifications"] {
        assert_eq!(downstream.keys_and_calls(service).0, events, "{service}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_outage_new_schema_ids_wait_in_retry_and_recover() {
    let prefix = prefix("faults-registry");
    let dir = pipeline_files(&[(
        "analytics.yaml",
        "name: analytics\ngroup: analytics\ninputs: [order.created]\nstep: {route: {to: [analytics.orders]}}\n",
    )]);
    let proxy = SwitchProxy::start(&registry_url()).await;
    let connect = orderflow::cli::Connect {
        registry_url: proxy.url.clone(),
        ..connect(&prefix)
    };
    let running = Running::start_with(connect, &dir).await;
    let warm = 20 * scale();
    let mut orders = publish_paced(&prefix, warm, Duration::ZERO).await;
    running
        .wait_done(&["analytics"], warm as u64, Duration::from_secs(30))
        .await;

    proxy.down();
    // Known schema id: decoded from the cache while the registry is away.
    orders.extend(publish_paced(&prefix, warm, Duration::ZERO).await);
    running
        .wait_done(&["analytics"], 2 * warm as u64, Duration::from_secs(30))
        .await;
    // A new schema id (an evolved producer) cannot be resolved now: retried, not dead-lettered.
    let v2_dir = edited_avro(with_gift_message);
    let naming = orderflow::contracts::Naming {
        topic_prefix: prefix.clone(),
        strategy: orderflow::contracts::SubjectStrategy::Topic,
    };
    let v2 = EventCodec::with_naming(
        &registry_url(),
        std::sync::Arc::new(orderflow::contracts::Catalog::load(&v2_dir).unwrap()),
        naming,
    )
    .unwrap();
    let producer: FutureProducer = orderflow::kafka::producer_config(&bootstrap())
        .create()
        .unwrap();
    let topic = format!("{prefix}order.created");
    let evolved = 10 * scale();
    for _ in 0..evolved {
        let order = OrderCreated::sample("faults");
        let payload = v2
            .encode(
                &topic,
                &OrderCreatedV2::from_v1(&order, Some("happy birthday")),
            )
            .await
            .unwrap();
        let key = order.data.order_id.to_string();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        orders.push(order);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.telemetry["analytics"].snapshot().retried[0] == 0 {
        assert!(
            Instant::now() < deadline,
            "the new schema id was not retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running.telemetry["analytics"].snapshot().dead_lettered, 0);
    proxy.up();
    let total = orders.len() as u64;
    running
        .wait_done(&["analytics"], total, Duration::from_secs(60))
        .await;
    let s = running.telemetry["analytics"].snapshot();
    running.stop().await;
    let ids = ids_of(&orders);
    let t = reconcile(
        &prefix,
        &ids,
        "order.created",
        "analytics",
        "analytics.orders",
    );
    report(
        "registry stopped mid-run",
        orders.len(),
        &format!(
            "registry down, {evolved} events of a new schema id; {} retries",
            s.retried.iter().sum::<u64>()
        ),
        &[("analytics", t)],
        0,
    );
    assert_eq!(t, Tally::default(), "every event once, none in the DLQ");
    assert_eq!(s.dead_lettered, 0);
    std::fs::remove_dir_all(v2_dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_downstream_down_past_the_tiers_is_recovered_by_one_replay() {
    let events = 30 * scale();
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let prefix = prefix("faults-down");
    let dir = pipeline_files(&[(
        "notification.yaml",
        &format!("name: notification\ngroup: notification\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/notifications\n    emit: {{\"2xx\": notification.sent}}\nretry:\n  tiers: [1s, 1s]\n  transient_attempts: 1\n"),
    )]);
    let orders: Vec<OrderCreated> = (0..events)
        .map(|_| OrderCreated::sample("faults"))
        .collect();
    // Down for every attempt the tiers allow (the first, two retries), up afterwards.
    for order in &orders {
        downstream.script("notifications", order, &[500, 500, 500]);
    }
    let running = Running::start(&prefix, &dir).await;
    let (publisher, topic) = publisher(&prefix).await;
    for order in &orders {
        publisher.publish(&topic, order).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while running.telemetry["notification"].snapshot().dead_lettered < events as u64 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running.telemetry["notification"].snapshot()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids = ids_of(&orders);
    let before = reconcile(
        &prefix,
        &ids,
        "order.created",
        "notification",
        "notification.sent",
    );
    assert_eq!(before.in_dlq, events);
    // The service is back: one replay recovers everything, a second changes nothing.
    cli(
        &prefix,
        &dir,
        &["dlq", "replay", "--pipeline", "notification"],
    );
    running
        .wait_done(
            &["notification"],
            2 * events as u64,
            Duration::from_secs(60),
        )
        .await;
    let second = cli(
        &prefix,
        &dir,
        &["dlq", "replay", "--pipeline", "notification"],
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = running.telemetry["notification"].snapshot();
    running.stop().await;
    assert_eq!(s.succeeded, events as u64, "{second}");
    let out = keys(&read_topic(&format!("{prefix}notification.sent")));
    assert_eq!(out.len(), events, "each event once after two replays");
    assert_eq!(out.iter().collect::<HashSet<_>>().len(), events);
    let t = reconcile(
        &prefix,
        &ids,
        "order.created",
        "notification",
        "notification.sent",
    );
    report(
        "downstream down past the tiers",
        events,
        "HTTP 500 for 3 attempts each; 2 replays",
        &[("notification", Tally { in_dlq: 0, ..t })],
        events,
    );
    assert_eq!((t.lost, t.duplicated), (0, 0));
    assert_eq!(downstream.keys_and_calls("notifications").0, events);
}

/// A record to publish: key, payload, headers, and the error kind expected for it in the DLQ
/// (`None`: it must succeed).
type Input = (String, Option<Vec<u8>>, OwnedHeaders, Option<&'static str>);

fn with_headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(*v),
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_inputs_land_in_the_dlq_and_the_partition_moves_on() {
    let prefix = prefix("faults-poison");
    let topic = format!("{prefix}order.created");
    // One partition: a stalled record would stop everything behind it.
    orderflow::kafka::ensure_topics(&bootstrap(), &[(&topic, 1)], 1)
        .await
        .unwrap();
    let dir = pipeline_files(&[(
        "analytics.yaml",
        "name: analytics\ngroup: analytics\ninputs: [order.created]\nstep: {route: {to: [analytics.orders]}}\nretry: {tiers: [1s]}\n",
    )]);
    let (codec, _) = codec(&prefix);
    let producer: FutureProducer = orderflow::kafka::producer_config(&bootstrap())
        .create()
        .unwrap();
    let valid = |order: &OrderCreated| {
        let (codec, topic) = (codec.clone(), topic.clone());
        let order = order.clone();
        async move { codec.encode(&topic, &order).await.unwrap() }
    };
    let first = OrderCreated::sample("faults");
    let no_headers = OrderCreated::sample("faults");
    let last = OrderCreated::sample("faults");
    let good = valid(&first).await;
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 12);
    let mut oversized = good[..5].to_vec();
    oversized.extend(std::iter::repeat_n(0xff, 900 * 1024));
    let wrong_type = codec
        .encode(&format!("{prefix}payment.charged"), &payment_charged())
        .await
        .unwrap();
    let mut invalid = OrderCreated::sample("faults");
    invalid.data.items.clear();
    invalid.data.total.amount_minor = -5;
    let invalid_payload = raw_payload(&topic, &invalid, "order.created").await;
    let mut unknown_id = vec![0, 0x7f, 0xff, 0xff, 0xf0];
    unknown_id.extend_from_slice(&good[5..]);
    let ce = with_headers(&[("ce_type", "order.created")]);
    let poison: Vec<Input> = vec![
        (
            first.data.order_id.to_string(),
            Some(good.clone()),
            ce.clone(),
            None,
        ),
        (
            "garbage".into(),
            Some(b"not avro at all".to_vec()),
            ce.clone(),
            Some("wrong_magic_byte"),
        ),
        (
            "magic".into(),
            Some([&[1u8][..], &good[1..]].concat()),
            ce.clone(),
            Some("wrong_magic_byte"),
        ),
        (
            "short".into(),
            Some(vec![0, 1]),
            ce.clone(),
            Some("short_payload"),
        ),
        (
            "unknown-id".into(),
            Some(unknown_id),
            ce.clone(),
            Some("unknown_schema_id"),
        ),
        (
            "truncated".into(),
            Some(truncated),
            ce.clone(),
            Some("corrupt_body"),
        ),
        (
            "wrong-type".into(),
            Some(wrong_type),
            ce.clone(),
            Some("incompatible_writer"),
        ),
        ("tombstone".into(), None, ce.clone(), Some("empty_payload")),
        (
            "oversized".into(),
            Some(oversized),
            ce.clone(),
            Some("corrupt_body"),
        ),
        (
            "invalid".into(),
            Some(invalid_payload),
            ce.clone(),
            Some("validation_failed"),
        ),
        // A repeated event id: handled once.
        (
            first.data.order_id.to_string(),
            Some(good.clone()),
            ce.clone(),
            None,
        ),
        // No headers at all: headers are information on an input topic, not required.
        (
            no_headers.data.order_id.to_string(),
            Some(valid(&no_headers).await),
            OwnedHeaders::new(),
            None,
        ),
        (
            last.data.order_id.to_string(),
            Some(valid(&last).await),
            ce.clone(),
            None,
        ),
    ];
    for (key, payload, headers, _) in &poison {
        let mut record = FutureRecord::to(&topic).key(key).headers(headers.clone());
        if let Some(p) = payload {
            record = record.payload(p);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Malformed failure headers on the pipeline's own retry topic.
    let retry_topic = format!("{topic}.analytics.retry.1");
    orderflow::kafka::ensure_topics(&bootstrap(), &[(&retry_topic, 1)], 1)
        .await
        .unwrap();
    let running = Running::start(&prefix, &dir).await;
    // Well-formed headers whose numbers are out of range: each used to abort the process, pause
    // the partition for ever or address a partition that does not exist. Then a valid, due retry
    // record, which must get through behind them.
    let now = orderflow::contracts::events::now_millis();
    let (now_text, far) = (now.to_string(), (now + 10 * 86_400_000).to_string());
    let retried = OrderCreated::sample("faults");
    let retried_key = retried.data.order_id.to_string();
    let failure_headers = |attempt: &str, tier: &str, partition: &str, due: &str| {
        with_headers(&[
            ("orderflow.attempt", attempt),
            ("orderflow.original.topic", &topic),
            ("orderflow.original.partition", partition),
            ("orderflow.original.offset", "0"),
            ("orderflow.first-failure.time", &now_text),
            ("orderflow.retry.tier", tier),
            ("orderflow.due.time", due),
        ])
    };
    let retry_poison = [
        (
            "bad-headers",
            with_headers(&[("orderflow.attempt", "many"), ("orderflow.retry.tier", "x")]),
        ),
        (
            "tier-huge",
            failure_headers("1", "4000000000", "0", &now_text),
        ),
        ("due-far", failure_headers("1", "1", "0", &far)),
        ("no-partition", failure_headers("1", "1", "7", &now_text)),
        (
            "attempts-absurd",
            failure_headers("4000000000", "1", "0", &now_text),
        ),
    ];
    for (key, headers) in &retry_poison {
        producer
            .send(
                FutureRecord::to(&retry_topic)
                    .key(*key)
                    .payload(&good)
                    .headers(headers.clone()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    producer
        .send(
            FutureRecord::to(&retry_topic)
                .key(&retried_key)
                .payload(&valid(&retried).await)
                .headers(failure_headers("1", "1", "0", &now_text)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let poisoned = poison.iter().filter(|p| p.3.is_some()).count() + retry_poison.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = running.telemetry["analytics"].snapshot();
        if s.succeeded == 4 && s.dead_lettered == poisoned as u64 && s.duplicates == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop().await; // Ok: the process never failed
    let out = keys(&read_topic(&format!("{prefix}analytics.orders")));
    let mut expected = vec![
        first.data.order_id.to_string(),
        no_headers.data.order_id.to_string(),
        last.data.order_id.to_string(),
        retried_key,
    ];
    expected.sort();
    assert_eq!(
        out, expected,
        "the valid ones, each once, the last one too (no stall)"
    );
    let dlq = read_topic(&format!("{topic}.analytics.dlq"));
    let kinds: HashMap<String, String> = dlq
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().unwrap()).to_string(),
                header(m, "orderflow.error.kind").unwrap_or_default(),
            )
        })
        .collect();
    for (key, _, _, kind) in &poison {
        if let Some(kind) = kind {
            assert_eq!(
                kinds.get(key).map(String::as_str),
                Some(*kind),
                "{key}: {kinds:?}"
            );
        }
    }
    for (key, _) in &retry_poison {
        assert_eq!(
            kinds.get(*key).map(String::as_str),
            Some("bad_retry_headers"),
            "{key}: {kinds:?}"
        );
    }
    for m in &dlq {
        assert!(header(m, "orderflow.error.message").is_some_and(|t| !t.is_empty()));
        assert!(header(m, "orderflow.original.topic").is_some());
    }
    eprintln!(
        "| poison inputs | analytics | {} | {} kinds of poison, 1 repeated id | 0 | 0 | {} | 0 |",
        poison.len() + retry_poison.len() + 1,
        poisoned,
        dlq.len()
    );
}

fn payment_charged() -> PaymentCharged {
    let order = OrderCreated::sample("faults");
    PaymentCharged {
        envelope: orderflow::contracts::Envelope::new::<PaymentCharged>(
            "faults",
            order.envelope.correlation_id,
            Some(order.envelope.event_id),
        ),
        data: orderflow::contracts::PaymentChargedData {
            order_id: order.data.order_id,
            payment_id: uuid::Uuid::now_v7(),
            amount: order.data.total,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processors_joining_and_leaving_lose_nothing() {
    let events = 150 * scale();
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(5));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("faults-rebalance");
    let publishing = {
        let prefix = prefix.clone();
        let every = Duration::from_millis((8000 / events as u64).max(1));
        tokio::spawn(async move { publish_paced(&prefix, events, every).await })
    };
    let a = Running::start(&prefix, &dir).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = Running::start(&prefix, &dir).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.stop().await;
    let c = Running::start(&prefix, &dir).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.stop().await;
    let orders = publishing.await.unwrap();
    let ids = ids_of(&orders);
    wait_reconciled(&prefix, &ids, Duration::from_secs(90), None).await;
    c.stop().await;
    let tallies = all_reconciled(&prefix, &ids);
    report(
        "rebalances",
        events,
        "3 processors joining and leaving",
        &tallies,
        0,
    );
    for (consumer, t) in &tallies {
        assert_eq!((t.lost, t.in_dlq), (0, 0), "{consumer}");
    }
    for service in ["payments", "reservations", "notifications"] {
        assert_eq!(downstream.keys_and_calls(service).0, events, "{service}");
    }
}

fn cluster(args: &[&str]) -> String {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/kafka-cluster"
    ))
    .args(args)
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "kafka-cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_and_the_controller_leader_killed_mid_run_lose_nothing() {
    let cluster_bootstrap = std::env::var("ORDERFLOW_CLUSTER_BOOTSTRAP")
        .expect("ORDERFLOW_CLUSTER_BOOTSTRAP is not set: run the tests with scripts/test");
    let events = 200 * scale();
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("faults-cluster");
    let connect = orderflow::cli::Connect {
        bootstrap_servers: cluster_bootstrap.clone(),
        replication_factor: 3,
        ..connect(&prefix)
    };
    let running = Running::start_with(connect, &dir).await;
    let publishing = {
        let (prefix, cluster_bootstrap) = (prefix.clone(), cluster_bootstrap.clone());
        let every = Duration::from_millis((10_000 / events as u64).max(1));
        tokio::spawn(async move {
            let (codec, topic) = codec(&prefix);
            let publisher = orderflow::kafka::Publisher::new(&cluster_bootstrap, codec).unwrap();
            let mut orders = Vec::new();
            for _ in 0..events {
                let order = OrderCreated::sample("faults");
                publisher.publish(&topic, &order).await.unwrap();
                orders.push(order);
                tokio::time::sleep(every).await;
            }
            orders
        })
    };
    // A broker that is not the controller leader dies and comes back; then the leader dies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cluster(&["leader"]);
    let broker = ["1", "2", "3"].into_iter().find(|n| *n != leader).unwrap();
    cluster(&["kill", broker]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster(&["start", broker]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster(&["leader"]);
    cluster(&["kill", &leader]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster(&["start", &leader]);
    let orders = publishing.await.unwrap();
    let ids = ids_of(&orders);
    let deadline = Instant::now() + Duration::from_secs(120);
    let tallies = loop {
        let tallies = all_reconciled_at(&cluster_bootstrap, &prefix, &ids);
        if tallies.iter().all(|(_, t)| t.lost == 0) || Instant::now() > deadline {
            break tallies;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    running.stop().await;
    report(
        "broker and controller leader killed (3 brokers, RF 3, min ISR 2)",
        events,
        "SIGKILL a broker, then the controller leader",
        &tallies,
        0,
    );
    for (consumer, t) in &tallies {
        assert_eq!((t.lost, t.in_dlq), (0, 0), "{consumer}");
    }
    for service in ["payments", "reservations", "notifications"] {
        assert_eq!(downstream.keys_and_calls(service).0, events, "{service}");
    }
}
