//! `orderflow run` as a real process, stopped with SIGTERM and killed with SIGKILL mid-stream,
//! then restarted: every published order must reach every consumer's output, and downstream
//! services must see each event's effect once.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const OUTPUTS: [&str; 4] = [
    "payment.charged",
    "inventory.reserved",
    "notification.sent",
    "analytics.orders",
];

/// The pipelines of `pipelines_dir`: group, the downstream service it calls, its output.
const PIPELINES: [(&str, Option<&str>, &str); 4] = [
    ("payment", Some("payments"), "payment.charged"),
    ("inventory", Some("reservations"), "inventory.reserved"),
    ("notification", Some("notifications"), "notification.sent"),
    ("analytics", None, "analytics.orders"),
];

/// The keys on each output topic (by its name without the prefix).
fn outputs_by_key(prefix: &str) -> HashMap<&'static str, HashSet<String>> {
    OUTPUTS
        .iter()
        .map(|t| {
            (
                *t,
                keys(&read_topic(&format!("{prefix}{t}")))
                    .into_iter()
                    .collect(),
            )
        })
        .collect()
}

/// Records per output topic (all, and distinct keys).
fn outputs(prefix: &str) -> Vec<(String, usize, usize)> {
    OUTPUTS
        .iter()
        .map(|t| {
            let topic = format!("{prefix}{t}");
            let records = read_topic(&topic);
            let mut keys = keys(&records);
            let all = keys.len();
            keys.dedup();
            (topic, all, keys.len())
        })
        .collect()
}

fn wait_complete(
    prefix: &str,
    orders: usize,
    within: Duration,
    log: &Path,
) -> Vec<(String, usize, usize)> {
    let deadline = Instant::now() + within;
    loop {
        let now = outputs(prefix);
        if now.iter().all(|(_, _, distinct)| *distinct >= orders) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "not every order reached every output within {within:?}: {now:?}\n--- log\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_stream_loses_and_repeats_nothing() {
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(40));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("sigterm");
    let log = dir.join("run.log");
    // More orders than one process runs at once (concurrency 64), so the stop lands mid-stream.
    let orders = publish_paced(&prefix, 300, Duration::ZERO).await;

    let mut run = spawn_run(&prefix, &dir, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while downstream.keys_and_calls("payments").0 < 10 {
        assert!(
            Instant::now() < deadline,
            "no progress:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&run, libc::SIGTERM);
    let status = wait_exit(&mut run, Duration::from_secs(20));
    assert!(
        status.success(),
        "SIGTERM must end in a clean exit, got {status}"
    );
    let (paid_before_restart, _) = downstream.keys_and_calls("payments");
    assert!(
        paid_before_restart < orders.len(),
        "stopped mid-stream ({paid_before_restart} of {} paid)",
        orders.len()
    );

    let mut run = spawn_run(&prefix, &dir, &log);
    let done = wait_complete(&prefix, orders.len(), Duration::from_secs(60), &log);
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(20)).success());

    for (topic, all, distinct) in done {
        assert_eq!(
            (all, distinct),
            (orders.len(), orders.len()),
            "{topic}: every order once"
        );
    }
    for service in ["payments", "reservations", "notifications"] {
        assert_eq!(
            downstream.keys_and_calls(service),
            (orders.len(), orders.len()),
            "{service}: one call per order"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_and_restart_loses_nothing() {
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(50));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("sigkill");
    let log = dir.join("run.log");
    // Several times what one run calls at once (concurrency 64), so every kill lands mid-work.
    let orders = publish_paced(&prefix, 400, Duration::ZERO).await;

    let order_of: HashMap<String, String> = orders
        .iter()
        .map(|o| (o.envelope.event_id.to_string(), o.data.order_id.to_string()))
        .collect();
    let kills = 3;
    let mut run_started = Instant::now();
    let mut run = spawn_run(&prefix, &dir, &log);
    let mut paid_at_kills = Vec::new();
    // Per kill and pipeline: what the kill left handled but not recorded as handled (no dedup
    // mark): orders the killed run called, and outputs on the topic, without a mark.
    let mut unmarked_calls_at_kills = Vec::new();
    let mut unmarked_outputs_at_kills = Vec::new();
    for _ in 1..=kills {
        // Kill on progress since this run started (its payments answered), not on time.
        let threshold = 20 + fastrand::usize(0..40);
        let deadline = Instant::now() + Duration::from_secs(60);
        let answered_since = |downstream: &Downstream| {
            (downstream.calls_since("payments", run_started).len())
                .saturating_sub(downstream.in_flight("payments"))
        };
        while answered_since(&downstream) < threshold {
            still_running(&mut run, &log);
            assert!(
                Instant::now() < deadline,
                "no progress to {threshold}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(&run, libc::SIGKILL);
        wait_exit(&mut run, Duration::from_secs(10));
        let delivered = outputs_by_key(&prefix);
        let mut calls = [0; 4];
        let mut outputs = [0; 4];
        for (i, (group, service, output)) in PIPELINES.iter().enumerate() {
            let marked = marked_orders(&format!("{prefix}{group}"), &order_of).await;
            if let Some(service) = service {
                let called: HashSet<String> = downstream
                    .calls_since(service, run_started)
                    .into_iter()
                    .collect();
                calls[i] = called.difference(&marked).count();
            }
            outputs[i] = delivered[output].difference(&marked).count();
        }
        unmarked_calls_at_kills.push(calls);
        unmarked_outputs_at_kills.push(outputs);
        paid_at_kills.push(downstream.keys_and_calls("payments").0);
        run_started = Instant::now();
        run = spawn_run(&prefix, &dir, &log);
    }
    let done = wait_complete(&prefix, orders.len(), Duration::from_secs(90), &log);
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(20)).success());

    eprintln!(
        "after {kills} kills at {paid_at_kills:?} orders paid; unmarked calls {unmarked_calls_at_kills:?} and outputs {unmarked_outputs_at_kills:?} at each kill (payment, inventory, notification, analytics): (topic, records, distinct keys) {done:?}"
    );
    assert!(
        paid_at_kills
            .iter()
            .all(|paid| (1..orders.len()).contains(paid)),
        "a kill landed after the work: orders paid at each kill {paid_at_kills:?}"
    );
    assert!(
        unmarked_calls_at_kills
            .iter()
            .all(|n| n.iter().sum::<usize>() > 0),
        "a kill interrupted nothing: {unmarked_calls_at_kills:?}"
    );
    // A kill repeats exactly the events handled but not yet recorded as handled: their HTTP
    // calls repeat with the same Idempotency-Key, and an output already written is written again.
    // Anything else repeated would be a bug.
    for (i, (_, service, output)) in PIPELINES.iter().enumerate() {
        if let Some(service) = service {
            let (keys, calls) = downstream.keys_and_calls(service);
            let bound: usize = unmarked_calls_at_kills.iter().map(|n| n[i]).sum();
            eprintln!(
                "{service}: {calls} calls for {keys} events, {} repeated (bound {bound})",
                calls - keys
            );
            assert_eq!(
                keys,
                orders.len(),
                "{service}: every order's event was sent"
            );
            assert!(
                calls - keys <= bound,
                "{service}: {calls} calls for {keys} events, bound {bound}"
            );
        }
        let (topic, all, distinct) = done.iter().find(|(t, _, _)| t.ends_with(output)).unwrap();
        let bound: usize = unmarked_outputs_at_kills.iter().map(|n| n[i]).sum();
        assert_eq!(*distinct, orders.len(), "{topic}: no order lost");
        assert!(
            all - distinct <= bound,
            "{topic}: {} repeated records, bound {bound}",
            all - distinct
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_copies_appear_once_through_kills() {
    let prefix = prefix("eos");
    let dir = pipeline_files(&[(
        "copy.yaml",
        "name: copy\ngroup: copy\ninputs: [order.created]\nstep: {route: {to: [eos.a, eos.b]}}\ndelivery: exactly-once\n",
    )]);
    let log = dir.join("run.log");
    // Published while the kills happen, so each kill lands mid-stream.
    let total = 3000;
    let publishing = {
        let prefix = prefix.clone();
        tokio::spawn(async move { publish_paced(&prefix, total, Duration::from_millis(2)).await })
    };
    let copies = |topic: &str| read_topic(&format!("{prefix}{topic}")).len();

    let kills = 3;
    let mut run = spawn_run(&prefix, &dir, &log);
    let mut copied_at_kills = Vec::new();
    let mut committed_at_start = 0;
    for _ in 1..=kills {
        // Kill on progress since this run started (a restarted member first waits out the dead
        // one's session), and well before the end.
        let threshold = committed_at_start + total / 10;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < threshold {
            // Committed with the copies in one transaction: exactly the inputs finished.
            seen = committed_inputs(&format!("{prefix}copy"), &format!("{prefix}order.created"))
                as usize;
            still_running(&mut run, &log);
            assert!(
                Instant::now() < deadline,
                "no progress to {threshold}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&run, libc::SIGKILL);
        wait_exit(&mut run, Duration::from_secs(10));
        copied_at_kills.push(seen);
        committed_at_start =
            committed_inputs(&format!("{prefix}copy"), &format!("{prefix}order.created")) as usize;
        run = spawn_run(&prefix, &dir, &log);
    }
    let orders = publishing.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while copies("eos.a") < orders.len() || copies("eos.b") < orders.len() {
        still_running(&mut run, &log);
        assert!(
            Instant::now() < deadline,
            "copies: {} / {}\n{}",
            copies("eos.a"),
            copies("eos.b"),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(20)).success());
    assert!(
        copied_at_kills
            .iter()
            .all(|c| (1..orders.len()).contains(c)),
        "kills mid-stream: {copied_at_kills:?}"
    );

    let mut expected: Vec<String> = orders.iter().map(|o| o.data.order_id.to_string()).collect();
    expected.sort();
    for topic in ["eos.a", "eos.b"] {
        let committed = read_topic(&format!("{prefix}{topic}"));
        let written = read_topic_with(&format!("{prefix}{topic}"), "read_uncommitted");
        eprintln!(
            "{topic}: {} committed copies, {} written including aborted transactions",
            committed.len(),
            written.len()
        );
        assert_eq!(
            keys(&committed),
            expected,
            "{topic}: each order exactly once"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
