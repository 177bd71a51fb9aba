//! The dead-letter loop with the real binary against the real stack: dead letters are listed,
//! shown, replayed (a re-failure comes back with its attempt history), never replayed twice,
//! and discarded with a reason; the audit topic records every action.

mod common;

use std::time::Duration;

use common::*;
use orderflow::contracts::OrderCreated;
use rdkafka::message::Message;

fn dead_letter_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains(".payment.dlq:"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_show_replay_and_discard_dead_letters() {
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let dir = pipeline_files(&[(
        "payment.yaml",
        format!("name: payment\ngroup: payment\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/payments\n    emit: {{\"2xx\": payment.charged}}\nretry:\n  tiers: [1s]\n").as_str(),
    )]);
    let prefix = prefix("dlq");
    let running = Running::start(&prefix, &dir).await;
    let (publisher, topic) = publisher(&prefix).await;
    let orders: Vec<OrderCreated> = (0..4).map(|_| OrderCreated::sample("test")).collect();
    for order in &orders[..3] {
        downstream.script("payments", order, &[400]);
    }
    for order in &orders {
        publisher.publish(&topic, order).await.unwrap();
    }
    running
        .wait_done(&["payment"], 4, Duration::from_secs(20))
        .await;
    assert_eq!(running.telemetry["payment"].snapshot().dead_lettered, 3);

    // list: three permanent http_status dead letters of order.created, first attempt.
    let list = cli(&prefix, &dir, &["dlq", "list", "--pipeline", "payment"]);
    let lines = dead_letter_lines(&list);
    assert_eq!(lines.len(), 3, "{list}");
    for line in &lines {
        assert!(
            line.contains("order.created")
                && line.contains("permanent")
                && line.contains("http_status"),
            "{line}"
        );
        assert!(line.contains(" 1  HTTP 400"), "{line}");
    }
    let filtered = cli(
        &prefix,
        &dir,
        &["dlq", "list", "--pipeline", "payment", "--class", "service"],
    );
    assert!(dead_letter_lines(&filtered).is_empty(), "{filtered}");

    // show: every header and the decoded event.
    let position = lines[0].split_whitespace().next().unwrap();
    let show = cli(&prefix, &dir, &["dlq", "show", position]);
    assert!(
        show.contains("header orderflow.error.class: permanent"),
        "{show}"
    );
    assert!(
        show.contains(&format!("header orderflow.original.topic: {topic}")),
        "{show}"
    );
    assert!(
        show.contains("event (orderflow.order.OrderCreated)"),
        "{show}"
    );
    assert!(
        orders[..3]
            .iter()
            .any(|o| show.contains(&o.data.order_id.to_string())),
        "{show}"
    );

    // dry run changes nothing.
    let dry = cli(
        &prefix,
        &dir,
        &["dlq", "replay", "--pipeline", "payment", "--dry-run"],
    );
    assert!(
        dry.contains("3 dead letter(s) to replay (dry run: nothing changed)"),
        "{dry}"
    );
    assert_eq!(
        dead_letter_lines(&cli(&prefix, &dir, &["dlq", "list"])).len(),
        3
    );

    // replay: two succeed now, one fails again and comes back with its history.
    let still_failing = &orders[2];
    downstream.script("payments", still_failing, &[400]);
    let replay = cli(&prefix, &dir, &["dlq", "replay", "--pipeline", "payment"]);
    assert!(replay.contains("replayed 3 dead letter(s)"), "{replay}");
    running
        .wait_until("replayed records handled", Duration::from_secs(20), |t| {
            let s = t["payment"].snapshot();
            s.succeeded == 3 && s.dead_lettered == 4
        })
        .await;
    let again = cli(
        &prefix,
        &dir,
        &["dlq", "replay", "--pipeline", "payment", "--dry-run"],
    );
    assert!(
        again.contains("1 dead letter(s) to replay"),
        "only the new dead letter is pending: {again}"
    );
    let list = cli(&prefix, &dir, &["dlq", "list"]);
    let lines = dead_letter_lines(&list);
    assert_eq!(lines.len(), 1, "{list}");
    assert!(
        lines[0].contains(" 2  HTTP 400"),
        "attempt 2 after a replay: {}",
        lines[0]
    );
    let all = cli(&prefix, &dir, &["dlq", "list", "--all"]);
    assert_eq!(all.matches("(handled)").count(), 3, "{all}");

    // discard with a reason: nothing pending.
    let discard = cli(
        &prefix,
        &dir,
        &[
            "dlq",
            "discard",
            "--pipeline",
            "payment",
            "--reason",
            "customer cancelled",
        ],
    );
    assert!(discard.contains("discarded 1 dead letter(s)"), "{discard}");
    assert!(dead_letter_lines(&cli(&prefix, &dir, &["dlq", "list"])).is_empty());
    running.stop().await;

    // The effects: one payment per order that could be paid, each once.
    let mut paid = keys(&read_topic(&format!("{prefix}payment.charged")));
    paid.dedup();
    assert_eq!(paid.len(), 3);
    // The audit trail: three replays and a discard, each keyed by its dead letter's position.
    let audit = read_topic(&format!("{topic}.payment.dlq.audit"));
    let actions: Vec<String> = audit
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        actions.iter().filter(|a| *a == "replayed").count(),
        3,
        "{actions:?}"
    );
    assert_eq!(
        actions.iter().filter(|a| *a == "discarded").count(),
        1,
        "{actions:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
