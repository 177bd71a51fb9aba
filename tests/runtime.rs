//! The processor runtime against the real stack (`scripts/stack up`) and a real HTTP server
//! whose answers each test scripts per order. Topics and groups get a random prefix per test.
//! Every test checks that the counts balance: per consumer, inputs = succeeded + dead-lettered.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use orderflow::contracts::OrderCreated;
use orderflow::kafka;
use orderflow::kafka::headers;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

// ---- tests -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_with_every_error_class_on_its_path() {
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("fanout");
    let running = Running::start(&prefix, &dir).await;
    let (publisher, topic) = publisher(&prefix).await;

    let happy = OrderCreated::sample("test");
    let refused = OrderCreated::sample("test"); // payment 400: permanent, DLQ at once
    let flaky = OrderCreated::sample("test"); // payment 503 once: transient, retried in process
    let recovering = OrderCreated::sample("test"); // inventory 500 x3: tiers 1, 2, 3, then ok
    downstream.script("payments", &refused, &[400]);
    downstream.script("payments", &flaky, &[503]);
    downstream.script("reservations", &recovering, &[500, 500, 500]);
    let orders = [&happy, &refused, &flaky, &recovering];
    let mut delivered = HashMap::new();
    for order in orders {
        delivered.insert(
            order.data.order_id.to_string(),
            publisher.publish(&topic, order).await.unwrap(),
        );
    }

    let all = ["payment", "inventory", "notification", "analytics"];
    running.wait_done(&all, 4, Duration::from_secs(40)).await;
    for name in all {
        let s = running.telemetry[name].snapshot();
        assert_eq!(s.succeeded + s.dead_lettered, 4, "{name} balances: {s:?}");
    }
    let payment = running.telemetry["payment"].snapshot();
    assert_eq!(
        (
            payment.succeeded,
            payment.dead_lettered,
            payment.transient_retries
        ),
        (3, 1, 1),
        "{payment:?}"
    );
    assert_eq!(
        payment.retried.iter().sum::<u64>(),
        0,
        "no payment failure went through the tiers"
    );
    let inventory = running.telemetry["inventory"].snapshot();
    assert_eq!((inventory.succeeded, inventory.dead_lettered), (4, 0));
    assert_eq!(&inventory.retried[..3], &[1, 1, 1], "{inventory:?}");
    running.stop().await;

    // Fan-out: each group wrote its own results.
    assert_eq!(
        keys(&read_topic(&format!("{prefix}payment.charged"))).len(),
        3
    );
    assert_eq!(
        keys(&read_topic(&format!("{prefix}notification.sent"))).len(),
        4
    );
    let mut expected: Vec<String> = orders.iter().map(|o| o.data.order_id.to_string()).collect();
    expected.sort();
    // Tier 3 succeeded: exactly one reservation per order, the recovering one included.
    assert_eq!(
        keys(&read_topic(&format!("{prefix}inventory.reserved"))),
        expected
    );
    // Route: copies with key, value and headers kept.
    let copies = read_topic(&format!("{prefix}analytics.orders"));
    let originals = read_topic(&topic);
    assert_eq!(keys(&copies), expected);
    for copy in &copies {
        let original = originals.iter().find(|o| o.key() == copy.key()).unwrap();
        assert_eq!(copy.payload(), original.payload());
        assert_eq!(header(copy, "ce_id"), header(original, "ce_id"));
    }

    // Permanent: the DLQ record is the original plus why and where it came from.
    let dlq = read_topic(&format!("{topic}.payment.dlq"));
    assert_eq!(dlq.len(), 1);
    let dead = &dlq[0];
    let original = originals.iter().find(|o| o.key() == dead.key()).unwrap();
    let at = delivered[&refused.data.order_id.to_string()];
    assert_eq!(
        dead.key(),
        Some(refused.data.order_id.to_string().as_bytes())
    );
    assert_eq!(dead.payload(), original.payload());
    assert_eq!(
        header(dead, "ce_id"),
        Some(refused.envelope.event_id.to_string())
    );
    assert_eq!(
        header(dead, headers::ERROR_CLASS).as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header(dead, headers::ERROR_KIND).as_deref(),
        Some("http_status")
    );
    assert!(header(dead, headers::ERROR_MESSAGE)
        .unwrap()
        .contains("HTTP 400"));
    assert_eq!(header(dead, headers::ORIGINAL_TOPIC), Some(topic.clone()));
    assert_eq!(
        header(dead, headers::ORIGINAL_PARTITION),
        Some(at.partition.to_string())
    );
    assert_eq!(
        header(dead, headers::ORIGINAL_OFFSET),
        Some(at.offset.to_string())
    );
    assert_eq!(
        header(dead, headers::GROUP),
        Some(format!("{prefix}payment"))
    );
    assert_eq!(header(dead, headers::ATTEMPT).as_deref(), Some("1"));
    assert_eq!(
        dead.partition(),
        at.partition,
        "the DLQ record keeps its partition"
    );

    // Transient: retried at once with the same Idempotency-Key, never through a retry topic.
    let calls = downstream.calls("payments", &flaky);
    assert_eq!(calls.len(), 2);
    assert!(calls
        .iter()
        .all(|c| c.idempotency_key == flaky.envelope.event_id.to_string()));
    assert!(read_topic(&format!("{topic}.payment.retry.1")).is_empty());

    // Service: tiers 1 s, 2 s, 4 s between the calls, within tolerance.
    let calls = downstream.calls("reservations", &recovering);
    assert_eq!(calls.len(), 4, "{calls:?}");
    for (i, due) in [1000u128, 2000, 4000].into_iter().enumerate() {
        let gap = calls[i + 1].at.duration_since(calls[i].at).as_millis();
        assert!(
            gap + 50 >= due && gap <= due + 1500,
            "tier {}: call {gap} ms after the previous, due after {due} ms",
            i + 1
        );
    }
    let tier3 = read_topic(&format!("{topic}.inventory.retry.3"));
    assert_eq!(tier3.len(), 1);
    assert_eq!(header(&tier3[0], headers::ATTEMPT).as_deref(), Some("3"));
    assert_eq!(
        header(&tier3[0], headers::ERROR_CLASS).as_deref(),
        Some("service")
    );
    assert_eq!(header(&tier3[0], headers::RETRY_TIER).as_deref(), Some("3"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_downstream_does_not_delay_the_others() {
    let downstream = Downstream::default();
    downstream.delay("notifications", Duration::from_millis(1500));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("slow");
    let running = Running::start(&prefix, &dir).await;
    let (publisher, topic) = publisher(&prefix).await;
    let started = Instant::now();
    for _ in 0..6 {
        publisher
            .publish(&topic, &OrderCreated::sample("test"))
            .await
            .unwrap();
    }
    running
        .wait_done(
            &["payment", "inventory", "analytics"],
            6,
            Duration::from_secs(20),
        )
        .await;
    let fast = started.elapsed();
    let slow_done = running.done("notification");
    assert!(
        slow_done < 6,
        "notification (1.5 s per call) cannot have finished 6 calls in {fast:?}"
    );
    assert!(
        fast < Duration::from_secs(8),
        "the other consumers took {fast:?}"
    );
    // The slow one still gets everything, and nothing is lost.
    running
        .wait_done(&["notification"], 6, Duration::from_secs(30))
        .await;
    assert_eq!(
        running.telemetry["notification"].snapshot().dead_lettered,
        0
    );
    running.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_dlq_write_holds_the_offset_until_it_succeeds() {
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let dir = pipeline_files(&[(
        "payment.yaml",
        format!("name: payment\ngroup: payment\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/payments\n    emit: {{\"2xx\": payment.charged}}\n").as_str(),
    )]);
    let prefix = prefix("dlqfail");
    let (publisher, topic) = publisher(&prefix).await;
    // The input has one partition; its DLQ accepts no record of a realistic size.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let dlq = format!("{topic}.payment.dlq");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .create_topics(
            &[
                NewTopic::new(&topic, 1, TopicReplication::Fixed(1)),
                NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "100"),
            ],
            &options,
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let refused = OrderCreated::sample("test");
    let after = OrderCreated::sample("test");
    downstream.script("payments", &refused, &[400]);
    publisher.publish(&topic, &refused).await.unwrap();
    publisher.publish(&topic, &after).await.unwrap();

    let running = Running::start(&prefix, &dir).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while running.telemetry["payment"].snapshot().produce_failures < 3 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running.telemetry["payment"].snapshot()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stuck on the refused record: it is not dead-lettered and no offset is committed. The
    // record behind it (another key) may finish meanwhile, but its offset waits too.
    let s = running.telemetry["payment"].snapshot();
    assert_eq!(s.dead_lettered, 0, "{s:?}");
    assert!(s.succeeded <= 1, "{s:?}");
    let committed = |group: String| {
        let c: BaseConsumer = kafka::consumer_config(&bootstrap(), &group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        c.committed_offsets(tpl, Duration::from_secs(10))
            .unwrap()
            .find_partition(&topic, 0)
            .unwrap()
            .offset()
    };
    tokio::time::sleep(Duration::from_secs(6)).await; // longer than auto.commit.interval.ms
    assert_eq!(
        committed(format!("{prefix}payment")),
        Offset::Invalid,
        "nothing may be committed yet"
    );

    // Once the DLQ accepts it, the record lands there and processing moves on.
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(&dlq));
    config = config.set("max.message.bytes", "1048588");
    for result in admin.alter_configs(&[config], &options).await.unwrap() {
        result.unwrap();
    }
    running
        .wait_done(&["payment"], 2, Duration::from_secs(30))
        .await;
    let s = running.telemetry["payment"].snapshot();
    assert_eq!((s.succeeded, s.dead_lettered), (1, 1), "{s:?}");
    running.stop().await;
    assert_eq!(committed(format!("{prefix}payment")), Offset::Offset(2));
    assert_eq!(
        keys(&read_topic(&dlq)),
        vec![refused.data.order_id.to_string()]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

// A route step without the dedup store runs on the engine's own task: a write the broker
// refuses comes back through the producer's report and is written again by a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_route_write_holds_the_offset_until_it_succeeds() {
    let dir = pipeline_files(&[(
        "copy.yaml",
        "name: copy\ngroup: copy\ninputs: [order.created]\nstep: {route: {to: [order.copied]}}\n",
    )]);
    let prefix = prefix("routefail");
    let (publisher, topic) = publisher(&prefix).await;
    // The output accepts no record of a realistic size.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let output = format!("{prefix}order.copied");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin
        .create_topics(
            &[
                NewTopic::new(&topic, 1, TopicReplication::Fixed(1)),
                NewTopic::new(&output, 1, TopicReplication::Fixed(1))
                    .set("max.message.bytes", "100"),
            ],
            &options,
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let orders = [OrderCreated::sample("test"), OrderCreated::sample("test")];
    for order in &orders {
        publisher.publish(&topic, order).await.unwrap();
    }
    let running = Running::start_dedup(connect(&prefix), &dir, false).await;
    // Eight rounds of both refused: with pauses of 200 ms, 400 ms, ... between them, more than
    // 5 s (the auto-commit interval) have passed since the first.
    running
        .wait_until(
            "eight rounds of refused writes",
            Duration::from_secs(30),
            |t| t["copy"].snapshot().produce_failures >= 16,
        )
        .await;
    let s = running.telemetry["copy"].snapshot();
    assert_eq!((s.succeeded, s.dead_lettered), (0, 0), "{s:?}");
    let committed =
        || tokio::task::block_in_place(|| committed_inputs(&format!("{prefix}copy"), &topic));
    assert!(committed() <= 0, "nothing may be committed yet");

    // Once the topic accepts them, both land and the offset moves past them.
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(&output));
    config = config.set("max.message.bytes", "1048588");
    for result in admin.alter_configs(&[config], &options).await.unwrap() {
        result.unwrap();
    }
    running
        .wait_done(&["copy"], 2, Duration::from_secs(30))
        .await;
    running.stop().await;
    assert_eq!(committed(), 2);
    let mut copied = keys(&read_topic(&output));
    let mut published: Vec<String> = orders.iter().map(|o| o.data.order_id.to_string()).collect();
    copied.sort();
    published.sort();
    assert_eq!(copied, published, "each copied once");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_event_id_has_no_second_effect_even_after_a_restart() {
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("dedup");
    let (publisher, topic) = publisher(&prefix).await;
    let order = OrderCreated::sample("test");
    let all = ["payment", "inventory", "notification", "analytics"];

    let running = Running::start(&prefix, &dir).await;
    // A producer duplicate: the same event, id and all, twice.
    publisher.publish(&topic, &order).await.unwrap();
    publisher.publish(&topic, &order).await.unwrap();
    running
        .wait_until("one handled, one skipped", Duration::from_secs(20), |t| {
            all.iter().all(|p| {
                let s = t[*p].snapshot();
                (s.succeeded, s.duplicates) == (1, 1)
            })
        })
        .await;
    running.stop().await;

    // The dedup state outlives the processors: a new set skips the same event again.
    publisher.publish(&topic, &order).await.unwrap();
    let running = Running::start(&prefix, &dir).await;
    running
        .wait_until("skipped after the restart", Duration::from_secs(20), |t| {
            all.iter().all(|p| t[*p].snapshot().duplicates == 1)
        })
        .await;
    for p in all {
        let s = running.telemetry[p].snapshot();
        assert_eq!(
            (s.consumed, s.succeeded, s.dead_lettered, s.duplicates),
            (1, 0, 0, 1),
            "{p}: {s:?}"
        );
    }
    running.stop().await;

    for service in ["payments", "reservations", "notifications"] {
        assert_eq!(
            downstream.calls(service, &order).len(),
            1,
            "{service} was called once"
        );
    }
    assert_eq!(read_topic(&format!("{prefix}payment.charged")).len(), 1);
    assert_eq!(read_topic(&format!("{prefix}analytics.orders")).len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_and_dlq_topics_with_fewer_partitions_than_their_input_are_grown() {
    let prefix = prefix("grow");
    let topic = format!("{prefix}order.created");
    let retry = format!("{topic}.copy.retry.1");
    let dlq = format!("{topic}.copy.dlq");
    // The input gained partitions after its retry and dead-letter topics were made.
    kafka::ensure_topics(&bootstrap(), &[(&topic, 4), (&retry, 1), (&dlq, 2)], 1)
        .await
        .unwrap();
    let dir = pipeline_files(&[(
        "copy.yaml",
        "name: copy\ngroup: copy\ninputs: [order.created]\nstep: {route: {to: [copies]}}\nretry: {tiers: [1s]}\n",
    )]);
    let running = Running::start(&prefix, &dir).await;
    let client: BaseConsumer = kafka::client_config(&bootstrap()).create().unwrap();
    for t in [&retry, &dlq] {
        let metadata = client
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .unwrap();
        assert_eq!(metadata.topics()[0].partitions().len(), 4, "{t}");
    }
    running.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}
