//! The order saga against the real broker and registry, with the repository's saga and step
//! pipelines pointed at the simulated services: confirmation, cancellation with compensation in
//! reverse order, a step timing out, the orchestrator SIGKILLed at random points, and two
//! replicas sharing the work across rebalances.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use orderflow::app::{codec as codec_for, load_pipelines_and_sagas, orchestrators, processors};
use orderflow::contracts::{AnyEvent, OrderCreated};
use orderflow::saga::{find_state, SagaStatus};
use orderflow::simulate::{self, Behaviour};
use orderflow::telemetry::saga::SagaTelemetry;
use tokio::sync::watch;

/// The simulated services (1-5 ms per call) with `behaviour`, and the repository's pipelines
/// and saga pointed at them (see [`saga_dir`] for `edit`).
async fn simulated(
    behaviour: Behaviour,
    edit: impl Fn(&str, String) -> String,
) -> (PathBuf, tokio::task::JoinHandle<()>) {
    let behaviour = Behaviour {
        latency_ms: 1..=5,
        ..behaviour
    };
    let (addr, _, server) = simulate::serve("127.0.0.1:0".parse().unwrap(), behaviour)
        .await
        .unwrap();
    (saga_dir(addr, edit), server)
}

/// Pipelines of the folder that are not steps of the saga (left out where a test does not need
/// them: fewer topics on the shared broker).
const NOT_STEPS: [&str; 3] = ["analytics", "notification", "order-status"];

/// The step pipelines and the saga in this process.
struct SagaRun {
    saga: SagaTelemetry,
    pipelines: HashMap<String, orderflow::telemetry::Telemetry>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl SagaRun {
    /// Runs every pipeline of `dir` but those in `skip`, and (unless `with_saga` is false) the
    /// saga.
    async fn start(prefix: &str, dir: &Path, skip: &[&str], with_saga: bool) -> SagaRun {
        let connect = connect(prefix);
        let (pipelines, sagas) = load_pipelines_and_sagas(dir).unwrap();
        let pipelines = pipelines
            .into_iter()
            .filter(|p| !skip.contains(&p.name.as_str()))
            .collect();
        let processors = processors(&connect, pipelines, true).await.unwrap();
        let telemetry = processors
            .iter()
            .map(|p| (p.pipeline().name.clone(), p.telemetry()))
            .collect();
        let codec = codec_for(&connect).unwrap();
        let mut orchestrators = orchestrators(&connect, sagas, codec).await.unwrap();
        let saga = orchestrators[0].telemetry();
        if !with_saga {
            orchestrators.clear();
        }
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for p in processors {
            tasks.spawn(p.run(stopped.clone()));
        }
        for o in orchestrators {
            tasks.spawn(o.run(stopped.clone()));
        }
        SagaRun {
            saga,
            pipelines: telemetry,
            stop,
            tasks,
        }
    }

    fn ended(&self) -> u64 {
        let c = self.saga.counters();
        c.confirmed.load(std::sync::atomic::Ordering::Relaxed)
            + c.cancelled.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn wait_ended(&self, count: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.ended() < count {
            assert!(
                Instant::now() < deadline,
                "sagas not ended within {within:?}: {}",
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

/// How many events of `event_type` each order has.
async fn per_order(prefix: &str, event_type: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for e in events(prefix, event_type).await {
        *out.entry(e.key()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_succeeding_confirms_each_order() {
    let prefix = prefix("saga-happy");
    let (dir, _server) = simulated(Behaviour::default(), |_, t| t).await;
    let run = SagaRun::start(&prefix, &dir, &NOT_STEPS, true).await;
    let orders = publish_paced(&prefix, 10, Duration::ZERO).await;
    run.wait_ended(10, Duration::from_secs(60)).await;
    run.stop().await;

    let confirmed = per_order(&prefix, "order.confirmed").await;
    assert_eq!(confirmed.len(), 10);
    assert!(confirmed.values().all(|n| *n == 1), "{confirmed:?}");
    for t in [
        "inventory.reservation-requested",
        "payment.charge-requested",
        "shipment.scheduling-requested",
    ] {
        let commands = per_order(&prefix, t).await;
        assert_eq!(commands.len(), 10, "{t}");
        assert!(commands.values().all(|n| *n == 1), "{t}: {commands:?}");
    }
    assert!(events(&prefix, "order.cancelled").await.is_empty());
    assert!(events(&prefix, "payment.refund-requested").await.is_empty());
    assert!(events(&prefix, "inventory.release-requested")
        .await
        .is_empty());

    // The history, as `orderflow saga show` reads it.
    let state = find_state(
        &bootstrap(),
        &format!("{prefix}saga.order.state"),
        orders[0].data.order_id,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(state.status, SagaStatus::Confirmed);
    assert_eq!(state.version, 4);
    assert!(state.steps.iter().all(|s| s.attempts == 1));
    let show = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["saga", "show", &orders[0].data.order_id.to_string()])
        .env("ORDERFLOW_PIPELINES_DIR", &dir)
        .env("ORDERFLOW_TOPIC_PREFIX", &prefix)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(text.contains("status       confirmed"), "{text}");
    assert!(text.contains("sent payment.charge-requested"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declined_payment_releases_the_stock_and_cancels() {
    let prefix = prefix("saga-declined");
    let behaviour = Behaviour {
        rate_declined: 1.0,
        ..Behaviour::default()
    };
    let (dir, _server) = simulated(behaviour, |_, t| t).await;
    let run = SagaRun::start(&prefix, &dir, &NOT_STEPS, true).await;
    publish_paced(&prefix, 5, Duration::ZERO).await;
    run.wait_ended(5, Duration::from_secs(60)).await;
    run.stop().await;

    let cancelled = events(&prefix, "order.cancelled").await;
    assert_eq!(cancelled.len(), 5);
    for c in &cancelled {
        let AnyEvent::OrderCancelled(c) = c else {
            panic!()
        };
        assert_eq!(
            c.data.reason,
            "charge-payment: card declined: insufficient funds"
        );
    }
    assert_eq!(per_order(&prefix, "inventory.released").await.len(), 5);
    assert!(events(&prefix, "payment.refund-requested").await.is_empty());
    assert!(events(&prefix, "shipment.scheduling-requested")
        .await
        .is_empty());
    assert!(events(&prefix, "order.confirmed").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_shipment_refunds_then_releases() {
    let prefix = prefix("saga-unshippable");
    let behaviour = Behaviour {
        rate_unshippable: 1.0,
        ..Behaviour::default()
    };
    let (dir, _server) = simulated(behaviour, |_, t| t).await;
    let run = SagaRun::start(&prefix, &dir, &NOT_STEPS, true).await;
    let orders = publish_paced(&prefix, 5, Duration::ZERO).await;
    run.wait_ended(5, Duration::from_secs(60)).await;
    run.stop().await;

    assert_eq!(per_order(&prefix, "order.cancelled").await.len(), 5);
    // Per order: the refund was asked for before the release, and both were done.
    let refunds: HashMap<String, i64> = events(&prefix, "payment.refund-requested")
        .await
        .iter()
        .map(|e| (e.key(), e.envelope().occurred_at))
        .collect();
    let releases: HashMap<String, i64> = events(&prefix, "inventory.release-requested")
        .await
        .iter()
        .map(|e| (e.key(), e.envelope().occurred_at))
        .collect();
    assert_eq!((refunds.len(), releases.len()), (5, 5));
    for order in &orders {
        let id = order.data.order_id.to_string();
        assert!(
            refunds[&id] <= releases[&id],
            "order {id}: released before refunded"
        );
        let state = find_state(
            &bootstrap(),
            &format!("{prefix}saga.order.state"),
            order.data.order_id,
        )
        .await
        .unwrap()
        .unwrap();
        let compensated: Vec<&str> = state
            .history
            .iter()
            .filter(|h| {
                h.what.starts_with("sent")
                    && h.what.contains("-requested")
                    && (h.what.contains("refund") || h.what.contains("release"))
            })
            .map(|h| h.step.as_deref().unwrap())
            .collect();
        assert_eq!(compensated, ["charge-payment", "reserve-inventory"]);
    }
    assert_eq!(per_order(&prefix, "payment.refunded").await.len(), 5);
    assert_eq!(per_order(&prefix, "inventory.released").await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_without_reply_times_out_and_its_late_reply_changes_nothing() {
    let prefix = prefix("saga-timeout");
    // Shipping answers nothing for now (its pipeline is not running); its step times out in 3 s.
    let (dir, _server) = simulated(Behaviour::default(), |file, text| match file {
        "shipping.yaml" => format!("{text}retry:\n  tiers: [1s]\n"),
        "sagas/order.yaml" => {
            let (head, shipping) = text.split_once("  - name: schedule-shipment").unwrap();
            format!(
                "{head}  - name: schedule-shipment{}",
                shipping.replace("timeout: 60s", "timeout: 3s")
            )
        }
        _ => text,
    })
    .await;
    let run = SagaRun::start(
        &prefix,
        &dir,
        &[&NOT_STEPS[..], &["shipping"]].concat(),
        true,
    )
    .await;
    publish_paced(&prefix, 3, Duration::ZERO).await;
    run.wait_ended(3, Duration::from_secs(60)).await;
    assert_eq!(
        run.saga
            .counters()
            .timed_out
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    run.stop().await;
    let cancelled = events(&prefix, "order.cancelled").await;
    assert_eq!(cancelled.len(), 3);
    for c in &cancelled {
        let AnyEvent::OrderCancelled(c) = c else {
            panic!()
        };
        assert_eq!(c.data.reason, "schedule-shipment: no reply within 3s");
    }
    assert_eq!(per_order(&prefix, "payment.refunded").await.len(), 3);
    assert_eq!(per_order(&prefix, "inventory.released").await.len(), 3);

    // Shipping comes back and answers the old commands: noted, nothing else is sent.
    let late = SagaRun::start(&prefix, &dir, &NOT_STEPS, true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while per_order(&prefix, "shipment.scheduled").await.len() < 3 {
        assert!(Instant::now() < deadline, "shipping did not answer");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The saga has read and committed every late reply.
    let replies = events(&prefix, "shipment.scheduled").await.len() as i64;
    let (group, topic) = (
        format!("{prefix}order-saga"),
        format!("{prefix}shipment.scheduled"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (group, topic) = (group.clone(), topic.clone());
        let read = tokio::task::spawn_blocking(move || committed_inputs(&group, &topic))
            .await
            .unwrap();
        if read >= replies {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{read} of {replies} late replies read: {}",
            late.saga.summary()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    late.stop().await;
    assert_eq!(events(&prefix, "order.cancelled").await.len(), 3);
    assert!(events(&prefix, "order.confirmed").await.is_empty());
    assert_eq!(events(&prefix, "payment.refund-requested").await.len(), 3);
}

// ---- the orchestrator as a process -----------------------------------------------------------

fn spawn_saga(prefix: &str, dir: &Path, instance: &str, metrics: &str, log: &Path) -> Process {
    spawn_orderflow(
        &["run", "order", "--report-every", "0s"],
        prefix,
        dir,
        log,
        &[
            ("ORDERFLOW_INSTANCE_ID", instance),
            ("ORDERFLOW_METRICS_LISTEN", metrics),
        ],
    )
}

fn kill(child: &mut Child, how: i32) {
    signal(child, how);
    child.wait().unwrap();
}

/// Every order ended exactly once, no command was sent twice, and every finished step of a
/// cancelled order was undone.
async fn assert_consistent(prefix: &str, orders: &[OrderCreated]) -> (usize, usize) {
    let confirmed = per_order(prefix, "order.confirmed").await;
    let cancelled = per_order(prefix, "order.cancelled").await;
    for order in orders {
        let id = order.data.order_id.to_string();
        let ends =
            confirmed.get(&id).copied().unwrap_or(0) + cancelled.get(&id).copied().unwrap_or(0);
        assert_eq!(ends, 1, "order {id} ended {ends} times");
    }
    for t in [
        "inventory.reservation-requested",
        "payment.charge-requested",
        "shipment.scheduling-requested",
        "inventory.release-requested",
        "payment.refund-requested",
    ] {
        let commands = per_order(prefix, t).await;
        assert!(
            commands.values().all(|n| *n == 1),
            "{t} sent twice: {commands:?}"
        );
    }
    let charged = per_order(prefix, "payment.charged").await;
    let reserved = per_order(prefix, "inventory.reserved").await;
    let refunded = per_order(prefix, "payment.refunded").await;
    let released = per_order(prefix, "inventory.released").await;
    for id in cancelled.keys() {
        assert_eq!(
            charged.contains_key(id),
            refunded.contains_key(id),
            "order {id}: charge not refunded"
        );
        assert_eq!(
            reserved.contains_key(id),
            released.contains_key(id),
            "order {id}: stock not released"
        );
    }
    for id in confirmed.keys() {
        assert!(
            !refunded.contains_key(id) && !released.contains_key(id),
            "order {id} confirmed but undone"
        );
    }
    (confirmed.len(), cancelled.len())
}

async fn wait_all_ended(prefix: &str, count: usize, within: Duration, log: &Path) {
    let deadline = Instant::now() + within;
    loop {
        let ended = per_order(prefix, "order.confirmed").await.len()
            + per_order(prefix, "order.cancelled").await.len();
        if ended >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ended} of {count} sagas ended within {within:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One orchestrator process's own progress, read from its metrics: decisions committed since it
/// started (sagas started, steps ended, compensations sent: each wrote a command or an end
/// event) and sagas in flight in its partitions. `None` until its metrics answer.
async fn progress(port: u16) -> Option<(u64, u64)> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let (mut written, mut in_flight) = (0.0, 0.0);
    for line in text.lines().filter(|l| l.contains("saga=\"order\"")) {
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        if line.starts_with("orderflow_sagas_started_total")
            || line.starts_with("orderflow_saga_compensations_total")
            || line.starts_with("orderflow_saga_step_duration_seconds_count")
        {
            written += value;
        } else if line.starts_with("orderflow_sagas_in_flight") {
            in_flight = value;
        }
    }
    Some((written as u64, in_flight as u64))
}

/// What one SIGKILL interrupted.
struct Kill {
    /// From the (re)start to its first committed decision.
    to_first_progress: Duration,
    /// Decisions committed by the killed process since it started.
    written: u64,
    /// Sagas in flight in its partitions when it was killed.
    in_flight: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_at_random_points_every_saga_still_ends_once() {
    const MIN_ORDERS: usize = 150;
    const KILLS: usize = 8;
    let prefix = prefix("saga-kill");
    let behaviour = Behaviour {
        rate_declined: 0.3,
        rate_unshippable: 0.1,
        ..Behaviour::default()
    };
    let (dir, _server) = simulated(behaviour, |_, t| t).await;
    // The step pipelines run here; their topics and the saga's are created first.
    let steps = SagaRun::start(&prefix, &dir, &NOT_STEPS, false).await;
    let log = dir.join("saga.log");
    // Orders keep coming until the last kill, so that every kill finds work to interrupt.
    let (kills_done, mut until_done) = watch::channel(false);
    let publishing = {
        let prefix = prefix.clone();
        tokio::spawn(async move {
            let mut orders = Vec::new();
            while orders.len() < MIN_ORDERS || !*until_done.borrow_and_update() {
                orders.extend(publish_paced(&prefix, 5, Duration::from_millis(20)).await);
            }
            orders
        })
    };
    let mut kills = Vec::new();
    for _ in 0..KILLS {
        // The same instance id each time: static membership gives the partitions back at once.
        let port = free_port();
        let started = Instant::now();
        let mut child = spawn_saga(
            &prefix,
            &dir,
            "kill-test",
            &format!("127.0.0.1:{port}"),
            &log,
        );
        // Killed only once it has made progress since it started, at a random point after.
        let deadline = started + Duration::from_secs(60);
        loop {
            if progress(port).await.is_some_and(|(written, _)| written > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the restarted orchestrator made no progress within 60 s; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let to_first_progress = started.elapsed();
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
        let (written, in_flight) = progress(port).await.unwrap_or((0, 0));
        kill(&mut child, libc::SIGKILL);
        kills.push(Kill {
            to_first_progress,
            written,
            in_flight,
        });
    }
    kills_done.send(true).unwrap();
    let orders = publishing.await.unwrap();
    let mut child = spawn_saga(&prefix, &dir, "kill-test", "127.0.0.1:0", &log);
    wait_all_ended(&prefix, orders.len(), Duration::from_secs(120), &log).await;
    kill(&mut child, libc::SIGTERM);
    steps.stop().await;
    let (confirmed, cancelled) = assert_consistent(&prefix, &orders).await;
    for (i, k) in kills.iter().enumerate() {
        eprintln!(
            "kill {}: first progress {:.1} s after the restart, {} decisions committed, {} sagas in flight",
            i + 1,
            k.to_first_progress.as_secs_f64(),
            k.written,
            k.in_flight
        );
    }
    let interrupted = kills
        .iter()
        .filter(|k| k.written > 0 && k.in_flight > 0)
        .count();
    eprintln!(
        "{} sagas, {KILLS} SIGKILLs, {interrupted} of them mid-work: {confirmed} confirmed, {cancelled} cancelled",
        orders.len()
    );
    assert_eq!(interrupted, KILLS, "every kill must interrupt work");
    assert!(cancelled > 0 && confirmed > 0);
}

async fn sagas_started(port: u16) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("orderflow_sagas_started_total{saga=\"order\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_the_sagas_across_rebalances() {
    const ORDERS: usize = 120;
    let prefix = prefix("saga-replicas");
    let behaviour = Behaviour {
        rate_declined: 0.2,
        ..Behaviour::default()
    };
    let (dir, _server) = simulated(behaviour, |_, t| t).await;
    let steps = SagaRun::start(&prefix, &dir, &NOT_STEPS, false).await;
    let log = dir.join("saga.log");
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_saga(
        &prefix,
        &dir,
        "replica-a",
        &format!("127.0.0.1:{port_a}"),
        &log,
    );
    let first = publish_paced(&prefix, ORDERS / 2, Duration::from_millis(20)).await;
    // A second replica joins: the partitions are split between the two.
    let mut b = spawn_saga(
        &prefix,
        &dir,
        "replica-b",
        &format!("127.0.0.1:{port_b}"),
        &log,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{port_b}/readyz")).await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "replica b never got partitions");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = publish_paced(&prefix, ORDERS / 2, Duration::from_millis(20)).await;
    wait_all_ended(&prefix, ORDERS, Duration::from_secs(90), &log).await;
    // A process running only the saga is ready once it holds partitions.
    for port in [port_a, port_b] {
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    }
    let (started_a, started_b) = (sagas_started(port_a).await, sagas_started(port_b).await);
    assert!(
        started_a > 0.0 && started_b > 0.0,
        "a {started_a}, b {started_b}"
    );
    assert_eq!(started_a + started_b, ORDERS as f64);
    // A leaves: b takes over everything, including sagas a had started.
    kill(&mut a, libc::SIGTERM);
    let third = publish_paced(&prefix, 20, Duration::from_millis(20)).await;
    wait_all_ended(&prefix, ORDERS + 20, Duration::from_secs(90), &log).await;
    kill(&mut b, libc::SIGTERM);
    steps.stop().await;
    let all: Vec<OrderCreated> = first.into_iter().chain(second).chain(third).collect();
    assert_consistent(&prefix, &all).await;
}

// ---- the order-status read model -------------------------------------------------------------

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_order_placed_through_the_intake_converges_in_the_read_model() {
    const ORDERS: usize = 30;
    let prefix = prefix("read-model");
    let behaviour = Behaviour {
        rate_declined: 0.3,
        ..Behaviour::default()
    };
    let (dir, _server) = simulated(behaviour, |_, t| t).await;
    let run = SagaRun::start(&prefix, &dir, &NOT_STEPS[..2], true).await;
    let (publisher, topic) = publisher(&prefix).await;
    let intake = orderflow::intake::Intake::new(publisher, topic, &database_url())
        .await
        .unwrap();
    let (intake_addr, _intake) = orderflow::intake::serve("127.0.0.1:0".parse().unwrap(), intake)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut placed = Vec::new();
    for _ in 0..ORDERS {
        let order = OrderCreated::sample("test").data;
        let body = serde_json::json!({
            "customer_id": order.customer_id,
            "items": order.items,
            "shipping_address": order.shipping_address,
        });
        let response = client
            .post(format!("http://{intake_addr}/orders"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let accepted_at = Instant::now();
        let body: serde_json::Value = response.json().await.unwrap();
        // Read-your-writes: known at once, projected or not.
        let status: serde_json::Value = client
            .get(format!(
                "http://{intake_addr}{}",
                body["status_url"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let first = status["status"].as_str().unwrap().to_string();
        assert!(
            ["accepted", "placed", "processing"].contains(&first.as_str()),
            "{status}"
        );
        placed.push((body["order_id"].as_str().unwrap().to_string(), accepted_at));
    }
    // Poll each order until its status is final; the version only ever grows.
    let mut to_final = Vec::new();
    let mut finals: HashMap<String, String> = HashMap::new();
    let mut versions: HashMap<String, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while finals.len() < ORDERS {
        assert!(
            Instant::now() < deadline,
            "{} of {ORDERS} final: {}",
            finals.len(),
            run.saga.summary()
        );
        for (id, accepted_at) in &placed {
            if finals.contains_key(id) {
                continue;
            }
            let status: serde_json::Value = client
                .get(format!("http://{intake_addr}/orders/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let version = status["version"].as_i64().unwrap();
            let before = versions.insert(id.clone(), version).unwrap_or(0);
            assert!(
                version >= before,
                "order {id} went from version {before} to {version}"
            );
            let s = status["status"].as_str().unwrap();
            if s == "confirmed" || s == "cancelled" {
                assert_eq!(status["pending"], serde_json::json!([]));
                assert!(status["last_event_time"].is_string());
                to_final.push(accepted_at.elapsed().as_secs_f64() * 1000.0);
                finals.insert(id.clone(), s.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    run.stop().await;
    // The read model agrees with the saga's end events.
    let confirmed = per_order(&prefix, "order.confirmed").await;
    let cancelled = per_order(&prefix, "order.cancelled").await;
    for (id, status) in &finals {
        let expected = if confirmed.contains_key(id) {
            "confirmed"
        } else {
            assert!(cancelled.contains_key(id), "order {id} has no end event");
            "cancelled"
        };
        assert_eq!(status, expected, "order {id}");
    }
    to_final.sort_by(f64::total_cmp);
    eprintln!(
        "202 -> final status in the read model: p50 {:.0} ms, p99 {:.0} ms ({ORDERS} orders, {} cancelled)",
        percentile(&to_final, 0.5),
        percentile(&to_final, 0.99),
        cancelled.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_and_out_of_order_events_leave_the_right_final_status() {
    let prefix = prefix("read-model-order");
    let (dir, _server) = simulated(Behaviour::default(), |_, t| t).await;
    let producer: rdkafka::producer::FutureProducer<_> =
        orderflow::kafka::producer_config(&bootstrap())
            .create()
            .unwrap();
    let order = OrderCreated::sample("test");
    let id = order.data.order_id.to_string();
    let created = AnyEvent::OrderCreated(order.clone());
    let then = |t: &str, data: serde_json::Value| {
        std::thread::sleep(Duration::from_millis(2));
        AnyEvent::from_data(t, data, "test", created.envelope()).unwrap()
    };
    let reserved = then(
        "inventory.reserved",
        serde_json::json!({"order_id": id, "reservation_id": uuid::Uuid::now_v7().to_string(), "lines": [{"sku": "A", "quantity": 1}]}),
    );
    let charged = then(
        "payment.charged",
        serde_json::json!({"order_id": id, "payment_id": uuid::Uuid::now_v7().to_string(), "amount": order.data.total}),
    );
    let confirmed = then(
        "order.confirmed",
        serde_json::json!({"order_id": id, "total": order.data.total}),
    );
    // The newest events first, then (once they are projected) a repeat and the older
    // order.created: neither may change the view.
    let (codec, _) = codec(&prefix);
    let send = |event: &AnyEvent| {
        let (codec, producer, id) = (codec.clone(), producer.clone(), id.clone());
        let (prefix, event) = (prefix.clone(), event.clone());
        async move {
            let topic = format!("{prefix}{}", event.event_type());
            orderflow::kafka::ensure_topics(&bootstrap(), &[(&topic, 3)], 1)
                .await
                .unwrap();
            let payload = event.encode(&codec, &topic).await.unwrap();
            let record = rdkafka::producer::FutureRecord::to(&topic)
                .key(&id)
                .payload(&payload);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
    };
    for event in [&confirmed, &charged, &charged, &reserved] {
        send(event).await;
    }
    let run = SagaRun::start(
        &prefix,
        &dir,
        &[
            "analytics",
            "inventory",
            "inventory-release",
            "notification",
            "payment",
            "payment-refund",
            "shipping",
        ],
        false,
    )
    .await;
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let projected = |sources: usize| {
        let client = &client;
        let order_id = order.data.order_id;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let view = orderflow::projection::find(client, order_id)
                    .await
                    .ok()
                    .flatten();
                if let Some(v) = view.filter(|v| v.sources.len() == sources) {
                    return v;
                }
                assert!(Instant::now() < deadline, "not projected");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let before = projected(3).await;
    assert_eq!((before.status.as_str(), before.version), ("confirmed", 3));
    let consumed = run.pipelines["order-status"].snapshot().consumed;
    send(&created).await;
    send(&confirmed).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.pipelines["order-status"].snapshot().consumed < consumed + 2 {
        assert!(Instant::now() < deadline, "the late events were not read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = projected(3).await;
    run.stop().await;
    assert_eq!(view.status.as_str(), "confirmed");
    assert_eq!(view.sources["order"].event_type, "order.confirmed");
    assert_eq!(view.sources["payment"].event_type, "payment.charged");
    // The repeats (stopped by the dedup store before the handler) and the older order.created
    // (a conflict in the read model) changed nothing.
    assert_eq!(view, before);
    let metrics = orderflow::telemetry::metrics::encode();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "orderflow_read_model_conflicts_total{model=\"order-status\",reason=\"out_of_order\"}"
        ) && !l.ends_with(" 0")),
        "{metrics}"
    );
}
