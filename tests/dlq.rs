//! The dead-letter loop with the real binary against the real stack: dead letters are listed,
//! shown, replayed (a re-failure comes back with its attempt history), never replayed twice,
//! and discarded with a reason; the audit topic records every action. A replay killed mid-way
//! and run again, or two replays at once, replay each dead letter exactly once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A pipeline's topics with `count` dead letters written straight to its DLQ (three
/// partitions), as the runtime writes them; no processor runs, so nothing consumes the replays.
struct Letters {
    prefix: String,
    dir: std::path::PathBuf,
    dlq: String,
    target: String,
    audit: String,
    count: usize,
}

async fn dead_letters(name: &str, count: usize) -> Letters {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let prefix = prefix(name);
    let dir = pipeline_files(&[(
        "payment.yaml",
        "name: payment\ngroup: payment\ninputs: [order.created]\nstep:\n  http:\n    url: http://127.0.0.1:1/payments\n    emit: {\"2xx\": payment.charged}\nretry:\n  tiers: [1s]\n",
    )]);
    let input = format!("{prefix}order.created");
    let (dlq, target) = (
        format!("{input}.payment.dlq"),
        format!("{input}.payment.retry.1"),
    );
    let audit = format!("{dlq}.audit");
    orderflow::kafka::ensure_topics(
        &bootstrap(),
        &[(&input, 3), (&dlq, 3), (&target, 3), (&audit, 1)],
        1,
    )
    .await
    .unwrap();
    let producer: FutureProducer = orderflow::kafka::producer_config(&bootstrap())
        .create()
        .unwrap();
    for i in 0..count {
        let partition = (i % 3) as i32;
        let (id, partition_text) = (uuid::Uuid::now_v7().to_string(), partition.to_string());
        let headers = [
            ("ce_id", id.as_str()),
            ("ce_type", "order.created"),
            ("orderflow.error.class", "permanent"),
            ("orderflow.error.kind", "http_status"),
            ("orderflow.original.topic", input.as_str()),
            ("orderflow.original.partition", partition_text.as_str()),
            ("orderflow.attempt", "1"),
        ]
        .iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(*value),
            })
        });
        let payload = format!("dead letter {i}");
        producer
            .send(
                FutureRecord::to(&dlq)
                    .partition(partition)
                    .key(&id)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    Letters {
        prefix,
        dir,
        dlq,
        target,
        audit,
        count,
    }
}

/// `orderflow <args>` to its end, failing or not: (succeeded, output).
fn orderflow(letters: &Letters, args: &[&str]) -> (bool, String) {
    cli_output(&letters.prefix, &letters.dir, args)
}

/// Every dead letter is on the target exactly once (records counted, not ids), audited exactly
/// once, and the replay group's offsets are past all of them.
fn replayed_exactly_once(letters: &Letters) {
    let records = read_topic(&letters.target);
    let from: std::collections::HashSet<String> = records
        .iter()
        .map(|m| header(m, "orderflow.replayed.from").unwrap())
        .collect();
    assert_eq!(
        records.len(),
        letters.count,
        "records on {}",
        letters.target
    );
    assert_eq!(from.len(), letters.count, "distinct dead letters replayed");
    let audit = read_topic(&letters.audit);
    let audited: std::collections::HashSet<Vec<u8>> =
        audit.iter().map(|m| m.key().unwrap().to_vec()).collect();
    assert_eq!(audit.len(), letters.count, "audit records");
    assert_eq!(audited.len(), letters.count);
    let group = format!("{}payment.dlq-replay", letters.prefix);
    assert_eq!(
        committed_inputs(&group, &letters.dlq),
        letters.count as i64,
        "the replay group's offsets"
    );
    let (ok, dry) = orderflow(
        letters,
        &["dlq", "replay", "--pipeline", "payment", "--dry-run"],
    );
    assert!(ok && dry.contains("0 dead letter(s) to replay"), "{dry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_and_run_again_replays_each_dead_letter_once() {
    let letters = dead_letters("dlq-kill", 60).await;
    let log = std::env::temp_dir().join(format!("it-dlq-kill-{}.log", letters.prefix));
    // 10 a second, a transaction a second: the kill lands after a commit, before the end.
    let mut child = spawn_orderflow(
        &["dlq", "replay", "--pipeline", "payment", "--rate", "10"],
        &letters.prefix,
        &letters.dir,
        &log,
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_topic(&letters.audit).is_empty() {
        still_running(&mut child, &log);
        assert!(
            Instant::now() < deadline,
            "no transaction committed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_running(&mut child, &log);
    signal(&child, libc::SIGKILL);
    wait_exit(&mut child, Duration::from_secs(10));
    let committed = read_topic(&letters.target).len();
    let written = read_topic_with(&letters.target, "read_uncommitted").len();
    assert!(
        committed > 0 && committed < letters.count,
        "killed mid-way: {committed} of {} committed",
        letters.count
    );
    assert_eq!(read_topic(&letters.audit).len(), committed);

    let (ok, again) = orderflow(
        &letters,
        &["dlq", "replay", "--pipeline", "payment", "--rate", "1000"],
    );
    assert!(ok, "{again}");
    assert!(
        again.contains(&format!(
            "replayed {} dead letter(s)",
            letters.count - committed
        )),
        "{again}"
    );
    eprintln!(
        "killed after {committed} committed replays ({} written in its open transaction, \
         aborted); the second run replayed {}",
        written - committed,
        letters.count - committed
    );
    replayed_exactly_once(&letters);
    std::fs::remove_file(log).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_of_one_dlq_at_once_replay_each_dead_letter_once() {
    let letters = Arc::new(dead_letters("dlq-two", 60).await);
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let letters = letters.clone();
            std::thread::spawn(move || {
                orderflow(
                    &letters,
                    &["dlq", "replay", "--pipeline", "payment", "--rate", "30"],
                )
            })
        })
        .collect();
    let outcomes: Vec<(bool, String)> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(
        outcomes.iter().any(|(ok, _)| *ok),
        "neither replay finished: {outcomes:?}"
    );
    for (ok, text) in &outcomes {
        assert!(*ok || text.contains("took it over"), "{text}");
        eprintln!(
            "replay {}: {}",
            if *ok { "finished" } else { "fenced" },
            text.lines()
                .find(|l| l.starts_with("replayed") || l.starts_with("error"))
                .unwrap_or_default()
        );
    }
    replayed_exactly_once(&letters);
}
