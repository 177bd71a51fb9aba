//! The fault suite: a known set of events with unique ids goes through processors while
//! something breaks, then every id is reconciled against every consumer's output and
//! dead-letter topic. Lost must be 0, and an id both delivered and dead-lettered (without a
//! replay recorded in the DLQ's audit topic) fails the reconciliation too. Downstream calls are
//! counted per order: every order's calls carry one `Idempotency-Key` (its effect happens once),
//! and calls beyond the first are reported and bounded by what the faults left handled but not
//! recorded as handled.
//!
//! Every fault lands while work flows (a kill only after the victim has made progress since it
//! started and while it has a call out), and every wait is a condition with a deadline.
//!
//! Runs in CI at reduced size; `ORDERFLOW_FAULTS_SCALE=10 cargo test --test faults -- --nocapture
//! --test-threads=1` runs it larger. Each scenario prints one row of the README's fault table
//! (lines starting with `| `). The three-broker scenario runs against `scripts/kafka-cluster`
//! (ORDERFLOW_CLUSTER_BOOTSTRAP), which `scripts/test` starts beside the stack; the PostgreSQL
//! scenarios stop and freeze a throwaway server of their own (tests/pg), never the stack's.

mod common;
mod pg;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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

// ---- reconciliation ----------------------------------------------------------------------------

/// One consumer's reconciliation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    /// Ids neither in the output nor in the dead-letter topic.
    lost: usize,
    /// Output records beyond the first per key.
    duplicated: usize,
    /// Ids in the dead-letter topic (not replayed) and not in the output.
    in_dlq: usize,
    /// Ids in the output and in the dead-letter topic, with no replay of that dead letter
    /// recorded: delivered and dead-lettered at once, which must never happen.
    both: usize,
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
    let read = |topic: &str| read_topic_at(cluster, topic, "read_committed");
    let out = keys(&read(&format!("{prefix}{output}")));
    let dlq = format!("{prefix}{input}.{group}.dlq");
    // Dead letters replayed or discarded, by position (`dlq replay` records each one).
    let handled: HashSet<String> = keys(&read(&orderflow::topology::dlq_audit_topic(&dlq)))
        .into_iter()
        .collect();
    let dead: HashSet<String> = read(&dlq)
        .iter()
        .filter(|m| !handled.contains(&format!("{}:{}", m.partition(), m.offset())))
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).to_string())
        .collect();
    let out_set: HashSet<&String> = out.iter().collect();
    Tally {
        lost: ids
            .iter()
            .filter(|id| !out_set.contains(id) && !dead.contains(*id))
            .count(),
        duplicated: out.len() - out_set.len(),
        in_dlq: ids
            .iter()
            .filter(|id| dead.contains(*id) && !out_set.contains(id))
            .count(),
        both: ids
            .iter()
            .filter(|id| dead.contains(*id) && out_set.contains(id))
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

/// Lost 0, and no id both delivered and dead-lettered, for every consumer.
fn assert_reconciled(tallies: &[(&str, Tally)]) {
    for (consumer, t) in tallies {
        assert_eq!(t.lost, 0, "{consumer}: lost events: {tallies:?}");
        assert_eq!(
            t.both, 0,
            "{consumer}: events both delivered and dead-lettered: {tallies:?}"
        );
    }
}

fn sum(tallies: &[(&str, Tally)], f: impl Fn(&Tally) -> usize) -> usize {
    tallies.iter().map(|(_, t)| f(t)).sum()
}

// ---- downstream effects, per order ----------------------------------------------------------------

const SERVICES: [&str; 3] = ["payments", "reservations", "notifications"];

/// Per service: every order of `ids` was called, every call of an order carried the same
/// `Idempotency-Key` (so the service applies its effect once), no call was for another order.
/// Returns the calls beyond the first, per service and per order.
fn effects_once(
    downstream: &Downstream,
    services: &[&'static str],
    ids: &HashSet<String>,
) -> HashMap<&'static str, HashMap<String, usize>> {
    services
        .iter()
        .map(|service| {
            let per = downstream.calls_per_order(service);
            let called: HashSet<&String> = per.keys().collect();
            let missing = ids.iter().filter(|id| !called.contains(id)).count();
            assert_eq!(missing, 0, "{service}: {missing} orders never called");
            assert!(
                per.keys().all(|o| ids.contains(o)),
                "{service}: calls for orders never published"
            );
            for (order, (_, keys)) in &per {
                assert_eq!(
                    keys.len(),
                    1,
                    "{service}: order {order} called with several Idempotency-Keys: {keys:?}"
                );
            }
            let repeats = per
                .into_iter()
                .filter(|(_, (calls, _))| *calls > 1)
                .map(|(order, (calls, _))| (order, calls - 1))
                .collect();
            (*service, repeats)
        })
        .collect()
}

fn total_repeats(repeats: &HashMap<&'static str, HashMap<String, usize>>) -> usize {
    repeats.values().flat_map(|r| r.values()).sum()
}

// ---- the table ---------------------------------------------------------------------------------

/// One row of the README's fault table.
struct Row<'a> {
    scenario: &'a str,
    events: usize,
    faults: String,
    interrupted: String,
    lost: usize,
    duplicated: String,
    repeated_calls: String,
    dead_letters: String,
}

impl<'a> Row<'a> {
    /// A row whose outcome columns are the pipelines' tallies and the downstream's repeats.
    fn tallied(
        scenario: &'a str,
        events: usize,
        faults: String,
        interrupted: String,
        tallies: &[(&str, Tally)],
        repeats: &HashMap<&'static str, HashMap<String, usize>>,
    ) -> Row<'a> {
        Row {
            scenario,
            events,
            faults,
            interrupted,
            lost: sum(tallies, |t| t.lost),
            duplicated: sum(tallies, |t| t.duplicated).to_string(),
            repeated_calls: total_repeats(repeats).to_string(),
            dead_letters: sum(tallies, |t| t.in_dlq).to_string(),
        }
    }

    fn print(&self) {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.events,
            self.faults,
            self.interrupted,
            self.lost,
            self.duplicated,
            self.repeated_calls,
            self.dead_letters
        );
    }
}

// ---- events flowing while faults happen -------------------------------------------------------

/// Orders published to order.created in the background, one every `every`: `count` of them, or,
/// open-ended, on until [`Flow::finish`] (at least `count`), so the faults never run out of work.
struct Flow {
    orders: Arc<Mutex<Vec<OrderCreated>>>,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Flow {
    fn start(
        bootstrap: &str,
        prefix: &str,
        count: usize,
        every: Duration,
        open_ended: bool,
    ) -> Flow {
        let (codec, topic) = codec(prefix);
        let publisher = orderflow::kafka::Publisher::new(bootstrap, codec).unwrap();
        let orders: Arc<Mutex<Vec<OrderCreated>>> = Arc::default();
        let open = Arc::new(AtomicBool::new(open_ended));
        let task = {
            let (orders, open) = (orders.clone(), open.clone());
            tokio::spawn(async move {
                loop {
                    if orders.lock().unwrap().len() >= count && !open.load(Ordering::SeqCst) {
                        return;
                    }
                    let order = OrderCreated::sample("faults");
                    // Known before it can be handled: kills map handled event ids to orders.
                    orders.lock().unwrap().push(order.clone());
                    publisher.publish(&topic, &order).await.unwrap();
                    tokio::time::sleep(every).await;
                }
            })
        };
        Flow { orders, open, task }
    }

    fn published(&self) -> usize {
        self.orders.lock().unwrap().len()
    }

    /// Event id to order id of everything published so far.
    fn order_of(&self) -> HashMap<String, String> {
        self.orders
            .lock()
            .unwrap()
            .iter()
            .map(|o| (o.envelope.event_id.to_string(), o.data.order_id.to_string()))
            .collect()
    }

    async fn finish(self) -> Vec<OrderCreated> {
        self.open.store(false, Ordering::SeqCst);
        self.task.await.unwrap();
        std::mem::take(&mut *self.orders.lock().unwrap())
    }
}

/// Waits until `done` holds; fails with `what` and `state` after `within`.
async fn wait_for(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}: {}",
            state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inputs every pipeline of `running` has finished (the slowest pipeline's count).
fn finished(running: &Running) -> u64 {
    running
        .telemetry
        .keys()
        .map(|p| running.done(p))
        .min()
        .unwrap_or(0)
}

fn snapshots(running: &Running) -> String {
    format!(
        "{:?}",
        running
            .telemetry
            .iter()
            .map(|(n, t)| (n, t.snapshot()))
            .collect::<Vec<_>>()
    )
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

// ---- SIGKILL -------------------------------------------------------------------------------------

/// The at-least-once pipelines of `pipelines_dir`: group, the downstream service it calls, output.
const PIPELINES: [(&str, Option<&str>, &str); 4] = [
    ("payment", Some("payments"), "payment.charged"),
    ("inventory", Some("reservations"), "inventory.reserved"),
    ("notification", Some("notifications"), "notification.sent"),
    ("analytics", None, "analytics.orders"),
];

/// A fifth pipeline beside them in the kill test: exactly once.
const COPY_YAML: &str = "name: copy\ngroup: copy\ninputs: [order.created]\nstep: {route: {to: [faults.copy]}}\ndelivery: exactly-once\n";

fn millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_twenty_times_nothing_is_lost() {
    const KILLS: usize = 20;
    let at_least = 150 * scale();
    let downstream = Downstream::default();
    // Each payment call takes this long, so a run always has calls out while events flow.
    let call_time = Duration::from_millis(200);
    downstream.delay("payments", call_time);
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    std::fs::write(dir.join("copy.yaml"), COPY_YAML).unwrap();
    let prefix = prefix("faults-kill");
    let log = dir.join("run.log");
    // Events flow through all the kills: at least `at_least`, more if the kills take longer.
    let flow = Flow::start(
        &bootstrap(),
        &prefix,
        at_least,
        Duration::from_millis((30_000 / at_least as u64).max(1)),
        true,
    );
    // Per run: when it started (monotonic, and wall clock for output timestamps).
    let mut starts: Vec<(Instant, SystemTime)> = Vec::new();
    // Per kill and pipeline: the orders marked handled in the dedup store when the run died.
    let mut marked_at_kills: Vec<Vec<HashSet<String>>> = Vec::new();
    for _ in 0..KILLS {
        starts.push((Instant::now(), SystemTime::now()));
        let started = starts.last().unwrap().0;
        let mut run = spawn_run(&prefix, &dir, &log);
        // Kill on progress since this run started (payments answered) and while one of its
        // payment calls is out (the answer still waits downstream): mid-work by construction.
        let threshold = 1 + fastrand::usize(0..3);
        let deadline = started + Duration::from_secs(60);
        loop {
            still_running(&mut run, &log);
            let now = Instant::now();
            let calls = downstream.calls_at_since("payments", started);
            let answered = calls
                .iter()
                .filter(|(_, at)| now >= *at + call_time + Duration::from_millis(20))
                .count();
            let out = calls.iter().any(|(_, at)| now < *at + call_time / 2);
            if answered >= threshold && out {
                break;
            }
            assert!(
                now < deadline,
                "run {}: no progress to {threshold} answered payments with one out ({answered} answered):\n{}",
                starts.len(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        signal(&run, libc::SIGKILL);
        wait_exit(&mut run, Duration::from_secs(10));
        // Nothing writes marks until the next run starts: these are the marks at the kill.
        let order_of = flow.order_of();
        let mut marked = Vec::new();
        for (group, _, _) in PIPELINES {
            marked.push(marked_orders(&format!("{prefix}{group}"), &order_of).await);
        }
        marked_at_kills.push(marked);
    }
    starts.push((Instant::now(), SystemTime::now()));
    let mut run = spawn_run(&prefix, &dir, &log);
    let orders = flow.finish().await;
    let events = orders.len();
    let ids = ids_of(&orders);
    wait_reconciled(&prefix, &ids, Duration::from_secs(180), Some(&log)).await;
    let copy = reconcile(&prefix, &ids, "order.created", "copy", "faults.copy");
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(30)).success());
    let tallies = all_reconciled(&prefix, &ids);
    assert_reconciled(&tallies);
    assert_reconciled(&[("copy (exactly once)", copy)]);

    // What each kill left handled but not recorded as handled: per pipeline, the orders the
    // killed run called downstream or wrote an output for (by the output's timestamp) that the
    // dedup store did not hold when it died. Exactly these may be handled again.
    let outputs: HashMap<&str, Vec<(String, i64)>> = PIPELINES
        .iter()
        .map(|(_, _, output)| {
            let records = read_topic(&format!("{prefix}{output}"));
            let written = records
                .iter()
                .map(|m| {
                    (
                        String::from_utf8_lossy(m.key().unwrap()).to_string(),
                        m.timestamp().to_millis().unwrap(),
                    )
                })
                .collect();
            (*output, written)
        })
        .collect();
    let mut in_flight = vec![0usize; KILLS];
    let mut call_bound: HashMap<&str, HashMap<String, usize>> = HashMap::new();
    let mut output_bound: HashMap<&str, HashMap<String, usize>> = HashMap::new();
    for (kill, marked) in marked_at_kills.iter().enumerate() {
        let (from, until) = (starts[kill].0, starts[kill + 1].0);
        let (from_ms, until_ms) = (millis(starts[kill].1), millis(starts[kill + 1].1));
        for ((_, service, output), marked) in PIPELINES.iter().zip(marked) {
            let mut unmarked = HashSet::new();
            if let Some(service) = service {
                let called: HashSet<String> = downstream
                    .calls_at_since(service, from)
                    .into_iter()
                    .filter(|(_, at)| *at < until)
                    .map(|(order, _)| order)
                    .collect();
                for order in called.difference(marked) {
                    *call_bound
                        .entry(service)
                        .or_default()
                        .entry(order.clone())
                        .or_default() += 1;
                    unmarked.insert(order.clone());
                }
            }
            let written: HashSet<&String> = outputs[output]
                .iter()
                .filter(|(_, ts)| (from_ms..until_ms).contains(ts))
                .map(|(key, _)| key)
                .collect();
            for order in written.into_iter().filter(|o| !marked.contains(*o)) {
                *output_bound
                    .entry(output)
                    .or_default()
                    .entry(order.clone())
                    .or_default() += 1;
                unmarked.insert(order.clone());
            }
            in_flight[kill] += unmarked.len();
        }
    }
    let interrupted = in_flight.iter().filter(|n| **n > 0).count();
    eprintln!("handled but not marked at each kill (all pipelines): {in_flight:?}");
    assert_eq!(
        interrupted, KILLS,
        "a kill interrupted nothing: in flight at each kill {in_flight:?}"
    );

    // Repeats, per order: a call (or an output) again only for a kill that left it handled and
    // unmarked, at most once per such kill.
    let repeats = effects_once(&downstream, &SERVICES, &ids);
    let bounds = |b: &HashMap<&str, HashMap<String, usize>>, what: &str| -> usize {
        b.get(what).map_or(0, |m| m.values().sum())
    };
    let mut calls_note = Vec::new();
    for service in SERVICES {
        let bound = call_bound.get(service).cloned().unwrap_or_default();
        for (order, n) in &repeats[service] {
            let allowed = bound.get(order).copied().unwrap_or(0);
            assert!(
                *n <= allowed,
                "{service}: order {order} called {n} more time(s), unmarked at {allowed} kill(s)"
            );
        }
        let repeated: usize = repeats[service].values().sum();
        calls_note.push(format!(
            "{service} {repeated}/{}",
            bounds(&call_bound, service)
        ));
    }
    let mut duplicated_note = Vec::new();
    for (_, _, output) in PIPELINES {
        let mut per: HashMap<&String, usize> = HashMap::new();
        for (key, _) in &outputs[output] {
            *per.entry(key).or_default() += 1;
        }
        let bound = output_bound.get(output).cloned().unwrap_or_default();
        for (order, n) in per {
            let allowed = bound.get(order).copied().unwrap_or(0);
            assert!(
                n - 1 <= allowed,
                "{output}: order {order} written {n} times, unmarked at {allowed} kill(s)"
            );
        }
    }
    for (consumer, t) in &tallies {
        duplicated_note.push(format!("{consumer} {}", t.duplicated));
    }
    assert_eq!(copy.duplicated, 0, "exactly once: each order once");
    let repeated = total_repeats(&repeats);
    let call_bound_total: usize = call_bound.values().flat_map(|m| m.values()).sum();
    let output_bound_total: usize = output_bound.values().flat_map(|m| m.values()).sum();
    eprintln!(
        "repeated calls (repeated/bound) {calls_note:?}; duplicated outputs {duplicated_note:?} (bound {output_bound_total}), copy {}",
        copy.duplicated
    );
    Row {
        scenario: "processor SIGKILLed (`orderflow run`, 5 pipelines)",
        events,
        faults: format!("{KILLS} × SIGKILL, each after ≥1 payment answered since the run started and with one out"),
        interrupted: format!(
            "{interrupted} of {KILLS}: handled but not marked at each kill min {}, max {}, Σ {}",
            in_flight.iter().min().unwrap(),
            in_flight.iter().max().unwrap(),
            in_flight.iter().sum::<usize>()
        ),
        lost: sum(&tallies, |t| t.lost) + copy.lost,
        duplicated: format!(
            "{} at least once (bound {output_bound_total}); 0 exactly once",
            sum(&tallies, |t| t.duplicated)
        ),
        repeated_calls: format!("{repeated} (bound {call_bound_total}); one Idempotency-Key per order"),
        dead_letters: (sum(&tallies, |t| t.in_dlq) + copy.in_dlq).to_string(),
    }
    .print();
    assert_eq!(sum(&tallies, |t| t.in_dlq) + copy.in_dlq, 0);
}

// ---- the registry --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_outage_new_schema_ids_wait_in_retry_and_recover() {
    let prefix = prefix("faults-registry");
    let dir = pipeline_files(&[(
        "analytics.yaml",
        "name: analytics\ngroup: analytics\ninputs: [order.created]\nstep: {route: {to: [analytics.orders]}}\n",
    )]);
    let proxy = SwitchProxy::start(&registry_url()).await;
    let connect = orderflow::app::Connect {
        registry_url: proxy.url.clone(),
        ..connect(&prefix)
    };
    let running = Running::start_with(connect, &dir).await;
    let known = 40 * scale();
    let flow = Flow::start(
        &bootstrap(),
        &prefix,
        known,
        Duration::from_millis((5000 / known as u64).max(1)),
        true,
    );
    // The registry goes away while events flow: some handled, more coming.
    wait_for(
        "progress before the outage",
        Duration::from_secs(30),
        || running.done("analytics") >= (known / 4) as u64,
        || snapshots(&running),
    )
    .await;
    proxy.down();
    let (published_at_down, done_at_down) = (flow.published(), running.done("analytics"));

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
    let mut evolved_orders = Vec::new();
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
        evolved_orders.push(order);
    }
    // Down until every new-schema event has been deferred to the retry tiers and known schema
    // ids have gone on decoding from the cache.
    wait_for(
        "new schema ids retried, known ones handled during the outage",
        Duration::from_secs(30),
        || {
            let s = running.telemetry["analytics"].snapshot();
            s.retried[0] >= evolved as u64
                && s.succeeded + s.dead_lettered >= done_at_down + (known / 8) as u64
        },
        || snapshots(&running),
    )
    .await;
    let at_up = running.telemetry["analytics"].snapshot();
    proxy.up();
    let mut orders = flow.finish().await;
    orders.extend(evolved_orders);
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
    let from_cache = at_up.succeeded + at_up.dead_lettered - done_at_down;
    Row {
        scenario: "registry stopped mid-run",
        events: orders.len(),
        faults: format!("1 registry outage ({evolved} events of a new schema id published during it)"),
        interrupted: format!(
            "1 of 1: {} published, {done_at_down} handled at the stop; during it {from_cache} handled from the cache, {} deferred to the retry tiers ({} retries in all)",
            published_at_down,
            at_up.retried[0],
            s.retried.iter().sum::<u64>()
        ),
        lost: t.lost,
        duplicated: t.duplicated.to_string(),
        repeated_calls: "– (no downstream)".into(),
        dead_letters: t.in_dlq.to_string(),
    }
    .print();
    assert_reconciled(&[("analytics", t)]);
    assert_eq!(t, Tally::default(), "every event once, none in the DLQ");
    assert_eq!(s.dead_lettered, 0);
    assert!(from_cache > 0 && at_up.retried[0] >= evolved as u64);
    std::fs::remove_dir_all(v2_dir).unwrap();
}

// ---- a downstream down past the tiers, and replays ---------------------------------------------

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
    // Without the dedup store: a replay written twice would be handled, and called, twice.
    let running = Running::start_dedup(connect(&prefix), &dir, false).await;
    let (publisher, topic) = publisher(&prefix).await;
    for order in &orders {
        publisher.publish(&topic, order).await.unwrap();
    }
    running
        .wait_until("every event dead-lettered", Duration::from_secs(60), |t| {
            t["notification"].snapshot().dead_lettered >= events as u64
        })
        .await;
    let ids = ids_of(&orders);
    let before = reconcile(
        &prefix,
        &ids,
        "order.created",
        "notification",
        "notification.sent",
    );
    assert_eq!(before.in_dlq, events);
    // The service is back: one replay recovers everything.
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
    // A second replay writes nothing: no record to the retry tier it replays to (nor to the
    // input), no audit record. Its transaction is committed when the command returns.
    let dlq = format!("{topic}.notification.dlq");
    let written = || {
        [
            format!("{topic}.notification.retry.1"),
            topic.clone(),
            orderflow::topology::dlq_audit_topic(&dlq),
        ]
        .map(|t| read_topic(&t).len())
    };
    let before_second = written();
    let second = cli(
        &prefix,
        &dir,
        &["dlq", "replay", "--pipeline", "notification"],
    );
    let after_second = written();
    assert_eq!(
        after_second, before_second,
        "the second replay wrote records (retry.1, input, audit): {second}"
    );
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
    assert_reconciled(&[("notification", t)]);
    assert_eq!((t.lost, t.duplicated, t.in_dlq), (0, 0, 0));
    // Four calls per order: the three scripted 500s and the one that succeeded, one key.
    let repeats = effects_once(&downstream, &["notifications"], &ids);
    assert!(
        repeats["notifications"].values().all(|n| *n == 3)
            && repeats["notifications"].len() == events,
        "{:?}",
        repeats["notifications"]
    );
    Row {
        scenario: "downstream down past the tiers",
        events,
        faults: "HTTP 500 on all 3 attempts per event (first, 2 tiers); then 2 replays, dedup off"
            .into(),
        interrupted: format!("{events} of {events} events dead-lettered"),
        lost: t.lost,
        duplicated: t.duplicated.to_string(),
        repeated_calls: format!(
            "{} (the scripted 500s: 3 per event); second replay wrote {} records",
            total_repeats(&repeats),
            after_second.iter().sum::<usize>() - before_second.iter().sum::<usize>()
        ),
        dead_letters: format!("{} ({events} dead-lettered, all replayed)", t.in_dlq),
    }
    .print();
}

// ---- poison ------------------------------------------------------------------------------------

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
    Row {
        scenario: "poison inputs (one partition)",
        events: poison.len() + retry_poison.len() + 1,
        faults: format!(
            "{poisoned} kinds of poison (5 malformed or out-of-range retry headers), 1 repeated id"
        ),
        interrupted: "the valid records behind them got through".into(),
        lost: 0,
        duplicated: "0".into(),
        repeated_calls: "– (no downstream)".into(),
        dead_letters: dlq.len().to_string(),
    }
    .print();
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

// ---- PostgreSQL down and hung ------------------------------------------------------------------

/// Events flow through the four pipelines, whose dedup store is a throwaway PostgreSQL; once
/// every pipeline has made progress the server is stopped (`hung`: SIGSTOPped, so it accepts
/// connections and answers nothing), held out until the outage has deferred work, and brought
/// back. The same processors must finish everything, nothing lost, nothing called twice.
async fn postgres_outage(hung: bool) {
    let mut server = pg::Pg::start().await;
    let events = 100 * scale();
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(100));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    // Tiers that outlast the outage for analytics too (1 s + 2 s + 4 s).
    std::fs::write(
        dir.join("analytics.yaml"),
        "name: analytics\ngroup: analytics\ninputs: [order.created]\nstep: {route: {to: [analytics.orders]}}\nretry: {tiers: [1s, 2s, 4s]}\n",
    )
    .unwrap();
    let prefix = prefix(if hung {
        "faults-pg-hung"
    } else {
        "faults-pg-down"
    });
    let connect = orderflow::app::Connect {
        database_url: server.url.clone(),
        ..connect(&prefix)
    };
    let running = Running::start_with(connect, &dir).await;
    let flow = Flow::start(
        &bootstrap(),
        &prefix,
        events,
        Duration::from_millis((6000 / events as u64).max(1)),
        false,
    );
    wait_for(
        "progress before the outage",
        Duration::from_secs(30),
        || finished(&running) >= (events / 5) as u64,
        || snapshots(&running),
    )
    .await;
    let (published_at_fault, finished_at_fault) = (flow.published(), finished(&running));
    let fault_at = Instant::now();
    if hung {
        server.freeze();
    } else {
        server.down();
    }
    // Out until the outage has deferred work to the retry tiers, and at least 3 s.
    let deferred = |running: &Running| -> u64 {
        running
            .telemetry
            .values()
            .map(|t| t.snapshot().retried[0])
            .sum()
    };
    wait_for(
        "work deferred by the outage",
        Duration::from_secs(30),
        || deferred(&running) > 0 && fault_at.elapsed() >= Duration::from_secs(3),
        || snapshots(&running),
    )
    .await;
    let outage = fault_at.elapsed();
    if hung {
        server.thaw();
    } else {
        server.up().await;
    }
    let orders = flow.finish().await;
    let ids = ids_of(&orders);
    // The same processors, never restarted, finish everything.
    wait_reconciled(&prefix, &ids, Duration::from_secs(90), None).await;
    running
        .wait_until(
            "every pipeline finished every event",
            Duration::from_secs(30),
            |t| {
                t.values().all(|t| {
                    let s = t.snapshot();
                    s.succeeded + s.dead_lettered >= events as u64
                })
            },
        )
        .await;
    let snaps: Vec<_> = running.telemetry.values().map(|t| t.snapshot()).collect();
    running.stop().await;
    let tallies = all_reconciled(&prefix, &ids);
    let repeats = effects_once(&downstream, &SERVICES, &ids);
    let first_deferred: u64 = snaps.iter().map(|s| s.retried[0]).sum();
    let retries: u64 = snaps.iter().map(|s| s.retried.iter().sum::<u64>()).sum();
    Row::tallied(
        if hung {
            "PostgreSQL (dedup) hung mid-run (SIGSTOP)"
        } else {
            "PostgreSQL (dedup) stopped mid-run"
        },
        events,
        format!(
            "1 outage of {:.1} s, processors not restarted",
            outage.as_secs_f64()
        ),
        format!(
            "1 of 1: at the fault {published_at_fault} published, {finished_at_fault} finished by every pipeline; {first_deferred} records deferred to the retry tiers by it ({retries} retries in all)"
        ),
        &tallies,
        &repeats,
    )
    .print();
    assert_reconciled(&tallies);
    assert!(first_deferred > 0, "the outage deferred nothing");
    assert!(
        published_at_fault < events,
        "the fault landed after the publishing"
    );
    // The tiers outlast the outage: nothing dead-lettered, nothing repeated (a failed dedup
    // check defers the record before its step; a failed mark is stored again, not redone).
    assert_eq!(sum(&tallies, |t| t.in_dlq), 0, "{tallies:?}");
    assert_eq!(total_repeats(&repeats), 0, "{repeats:?}");
    assert_eq!(sum(&tallies, |t| t.duplicated), 0, "{tallies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_mid_run_processors_recover_by_themselves() {
    postgres_outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_hung_mid_run_processors_recover_by_themselves() {
    postgres_outage(true).await;
}

// ---- rebalances ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processors_joining_and_leaving_lose_nothing() {
    let at_least = 150 * scale();
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(100));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("faults-rebalance");
    let flow = Flow::start(
        &bootstrap(),
        &prefix,
        at_least,
        Duration::from_millis((5000 / at_least as u64).max(1)),
        true,
    );
    let progress = Duration::from_secs(60);
    // Each change once the group has made progress since the previous one (a newcomer may get
    // only retry-topic partitions: the assignment balances partitions, not load).
    type Members = HashMap<String, orderflow::telemetry::Telemetry>;
    let group_done = |members: &[&Members]| -> u64 {
        members[0]
            .keys()
            .map(|p| {
                members
                    .iter()
                    .map(|m| {
                        let s = m[p].snapshot();
                        s.succeeded + s.dead_lettered
                    })
                    .sum::<u64>()
            })
            .min()
            .unwrap_or(0)
    };
    let a = Running::start(&prefix, &dir).await;
    let a_t = a.telemetry.clone();
    wait_for(
        "a works",
        progress,
        || group_done(&[&a_t]) >= 5,
        || snapshots(&a),
    )
    .await;
    let mut at_changes = Vec::new();
    let b = Running::start(&prefix, &dir).await;
    let b_t = b.telemetry.clone();
    at_changes.push((flow.published(), group_done(&[&a_t])));
    let before = group_done(&[&a_t, &b_t]);
    wait_for(
        "progress with a and b",
        progress,
        || group_done(&[&a_t, &b_t]) >= before + 5,
        || snapshots(&b),
    )
    .await;
    at_changes.push((flow.published(), group_done(&[&a_t, &b_t])));
    a.stop().await;
    let c = Running::start(&prefix, &dir).await;
    let c_t = c.telemetry.clone();
    at_changes.push((flow.published(), group_done(&[&a_t, &b_t, &c_t])));
    let before = group_done(&[&a_t, &b_t, &c_t]);
    wait_for(
        "progress with b and c",
        progress,
        || group_done(&[&a_t, &b_t, &c_t]) >= before + 5,
        || snapshots(&c),
    )
    .await;
    at_changes.push((flow.published(), group_done(&[&a_t, &b_t, &c_t])));
    b.stop().await;
    let before = group_done(&[&a_t, &b_t, &c_t]);
    wait_for(
        "progress with c alone",
        progress,
        || group_done(&[&a_t, &b_t, &c_t]) >= before + 5,
        || snapshots(&c),
    )
    .await;
    let orders = flow.finish().await;
    let ids = ids_of(&orders);
    wait_reconciled(&prefix, &ids, Duration::from_secs(90), None).await;
    c.stop().await;
    let tallies = all_reconciled(&prefix, &ids);
    let repeats = effects_once(&downstream, &SERVICES, &ids);
    Row::tallied(
        "rebalances",
        orders.len(),
        "4 membership changes: b joins a, a leaves, c joins, b leaves (clean stops)".into(),
        format!(
            "4 of 4: (published, finished by the group) at each {at_changes:?}; progress after each"
        ),
        &tallies,
        &repeats,
    )
    .print();
    assert_reconciled(&tallies);
    assert_eq!(sum(&tallies, |t| t.in_dlq), 0, "{tallies:?}");
}

// ---- brokers -----------------------------------------------------------------------------------

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
    let at_least = 200 * scale();
    let downstream = Downstream::default();
    downstream.delay("payments", Duration::from_millis(100));
    let addr = downstream.start().await;
    let dir = pipelines_dir(addr);
    let prefix = prefix("faults-cluster");
    let connect = orderflow::app::Connect {
        bootstrap_servers: cluster_bootstrap.clone(),
        replication_factor: 3,
        ..connect(&prefix)
    };
    let running = Running::start_with(connect, &dir).await;
    let flow = Flow::start(
        &cluster_bootstrap,
        &prefix,
        at_least,
        Duration::from_millis((6000 / at_least as u64).max(1)),
        true,
    );
    // Each kill and restart once every pipeline has made progress since the previous one: a
    // broker that is not the controller leader dies and comes back; then the leader.
    let step = (at_least / 10) as u64;
    let progressed = |running: &Running, since: u64| finished(running) >= since + step;
    let within = Duration::from_secs(90);
    wait_for(
        "progress",
        within,
        || progressed(&running, 0),
        || snapshots(&running),
    )
    .await;
    let leader = cluster(&["leader"]);
    let broker = ["1", "2", "3"].into_iter().find(|n| *n != leader).unwrap();
    let mut at_faults = Vec::new();
    for (what, node) in [
        ("a broker", broker.to_string()),
        ("the controller leader", String::new()),
    ] {
        let node = if node.is_empty() {
            cluster(&["leader"])
        } else {
            node
        };
        at_faults.push((flow.published(), finished(&running)));
        cluster(&["kill", &node]);
        let at_kill = finished(&running);
        wait_for(
            &format!("progress with {what} down"),
            within,
            || progressed(&running, at_kill),
            || snapshots(&running),
        )
        .await;
        cluster(&["start", &node]);
        let at_start = finished(&running);
        wait_for(
            &format!("progress with {what} back"),
            within,
            || progressed(&running, at_start),
            || snapshots(&running),
        )
        .await;
    }
    let orders = flow.finish().await;
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
    let repeats = effects_once(&downstream, &SERVICES, &ids);
    Row::tallied(
        "broker, then controller leader SIGKILLed (3 brokers, RF 3, min ISR 2)",
        orders.len(),
        "2 × SIGKILL of a broker, each restarted".into(),
        format!(
            "2 of 2: (published, finished by every pipeline) at the kills {at_faults:?}; progress while each was down"
        ),
        &tallies,
        &repeats,
    )
    .print();
    assert_reconciled(&tallies);
    assert_eq!(sum(&tallies, |t| t.in_dlq), 0, "{tallies:?}");
}
