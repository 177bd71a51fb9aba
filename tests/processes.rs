//! `orderflow run` as a real process, stopped with SIGTERM and killed with SIGKILL mid-stream,
//! then restarted: every published order must reach every consumer's output, and downstream
//! services must see each event's effect once.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const OUTPUTS: [&str; 4] = [
    "payment.charged",
    "inventory.reserved",
    "notification.sent",
    "analytics.orders",
];

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
    let orders = publish_paced(&prefix, 60, Duration::ZERO).await;

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
    let orders = publish_paced(&prefix, 60, Duration::ZERO).await;

    let kills = 3;
    let mut run = spawn_run(&prefix, &dir, &log);
    let mut paid_at_kills = Vec::new();
    for k in 1..=kills {
        // Kill on progress, not on time: a restarted member first waits out the dead one's
        // session (10 s) before it gets partitions back.
        let threshold = k * orders.len() / (kills + 1) + fastrand::usize(0..5);
        let deadline = Instant::now() + Duration::from_secs(60);
        while downstream.keys_and_calls("payments").0 < threshold {
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
        paid_at_kills.push(downstream.keys_and_calls("payments").0);
        run = spawn_run(&prefix, &dir, &log);
    }
    assert!(
        paid_at_kills
            .iter()
            .any(|paid| (1..orders.len()).contains(paid)),
        "no kill landed mid-stream: orders paid at each kill {paid_at_kills:?}"
    );
    let done = wait_complete(&prefix, orders.len(), Duration::from_secs(90), &log);
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(20)).success());

    eprintln!("after {kills} kills at {paid_at_kills:?} orders paid: (topic, records, distinct keys) {done:?}");
    // A kill repeats the events that were handled but not yet recorded as handled: the one in
    // its step, and the few whose outputs were still awaiting acks (an at-least-once window,
    // bounded per kill). Their HTTP calls repeat with the same Idempotency-Key.
    let bound = 3 * kills;
    for (topic, all, distinct) in done {
        assert_eq!(distinct, orders.len(), "{topic}: no order lost");
        assert!(
            all - distinct <= bound,
            "{topic}: {} repeated records after {kills} kills",
            all - distinct
        );
    }
    for service in ["payments", "reservations", "notifications"] {
        let (keys, calls) = downstream.keys_and_calls(service);
        eprintln!("{service}: {calls} calls for {keys} distinct events");
        assert_eq!(
            keys,
            orders.len(),
            "{service}: every order's event was sent"
        );
        assert!(
            calls - keys <= bound,
            "{service}: {calls} calls for {keys} events after {kills} kills"
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
    let orders = publish_paced(&prefix, 600, Duration::ZERO).await;
    let copies = |topic: &str| read_topic(&format!("{prefix}{topic}")).len();

    let kills = 3;
    let mut run = spawn_run(&prefix, &dir, &log);
    let mut copied_at_kills = Vec::new();
    for k in 1..=kills {
        let threshold = k * orders.len() / (kills + 1);
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
        run = spawn_run(&prefix, &dir, &log);
    }
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
