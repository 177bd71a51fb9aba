//! Key-ordered concurrency in the runtime, against the real stack: each key's events reach the
//! downstream in order while keys interleave; a slow key holds back neither other keys nor other
//! partitions' offsets; the byte budget stops reading while records wait, and nothing is lost
//! when it resumes; a rebalance and a SIGKILL mid-run lose nothing and never run an event
//! before its predecessor.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use orderflow::contracts::{NotificationSent, OrderCreated};
use orderflow::runtime::room::{record_bytes, Budget};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

// ---- a downstream that records each key's sequence -------------------------------------------

#[derive(Default)]
struct Seen {
    /// Every call, in arrival order: (order id, sequence number).
    calls: Vec<(String, u32)>,
    answered: usize,
    running: usize,
    max_running: usize,
    running_per_key: HashMap<String, usize>,
    /// Calls of one key that overlapped another call of the same key.
    same_key_overlaps: usize,
    /// Keys whose calls wait until the gate opens.
    held: HashSet<String>,
    delay_ms: (u64, u64),
}

#[derive(Clone)]
struct SeqDownstream {
    seen: Arc<Mutex<Seen>>,
    gate: watch::Sender<bool>,
}

impl SeqDownstream {
    fn new(delay_ms: (u64, u64)) -> SeqDownstream {
        SeqDownstream {
            seen: Arc::new(Mutex::new(Seen {
                delay_ms,
                ..Seen::default()
            })),
            gate: watch::channel(false).0,
        }
    }

    async fn start(&self) -> SocketAddr {
        serve(
            Router::new()
                .route("/{service}", post(answer))
                .with_state(self.clone()),
        )
        .await
    }

    fn calls(&self) -> Vec<(String, u32)> {
        self.seen.lock().unwrap().calls.clone()
    }

    fn in_flight(&self) -> usize {
        self.seen.lock().unwrap().running
    }
}

async fn answer(
    State(d): State<SeqDownstream>,
    UrlPath(_service): UrlPath<String>,
    Json(order): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let order_id = order["data"]["order_id"].as_str().unwrap().to_string();
    let seq: u32 = order["data"]["customer_id"]
        .as_str()
        .and_then(|c| c.strip_prefix("seq-"))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let (held, delay) = {
        let mut s = d.seen.lock().unwrap();
        s.calls.push((order_id.clone(), seq));
        s.running += 1;
        s.max_running = s.max_running.max(s.running);
        let per_key = s.running_per_key.entry(order_id.clone()).or_default();
        *per_key += 1;
        if *per_key > 1 {
            s.same_key_overlaps += 1;
        }
        let (lo, hi) = s.delay_ms;
        (
            s.held.contains(&order_id),
            Duration::from_millis(fastrand::u64(lo..=hi)),
        )
    };
    // A caller that goes away (a killed process) drops this future: the guard still counts the
    // call as no longer running.
    let running = CallGuard(d.seen.clone(), order_id.clone());
    if held {
        let mut gate = d.gate.subscribe();
        while !*gate.borrow_and_update() {
            gate.changed().await.unwrap();
        }
    }
    tokio::time::sleep(delay).await;
    d.seen.lock().unwrap().answered += 1;
    drop(running);
    let body = json!({"order_id": order_id, "channel": "email", "recipient": "a@example.com", "template": format!("seq-{seq}")});
    (StatusCode::OK, Json(body))
}

struct CallGuard(Arc<Mutex<Seen>>, String);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap();
        s.running -= 1;
        *s.running_per_key.get_mut(&self.1).unwrap() -= 1;
    }
}

// ---- inputs and outputs -----------------------------------------------------------------------

fn pipeline_dir(addr: SocketAddr, concurrency: usize) -> PathBuf {
    pipeline_files(&[(
        "notify.yaml",
        format!(
            "name: notify\ngroup: notify\ninputs: [order.created]\nconcurrency: {concurrency}\nstep:\n  http:\n    url: http://{addr}/notify\n    timeout: 30s\n    emit: {{\"2xx\": notification.sent}}\n"
        )
        .as_str(),
    )])
}

/// `keys` orders, each with events numbered 1..=per_key in customer_id, published key after key
/// interleaved (event n of every key, then n + 1). Returns each key's partition and offsets.
async fn publish_sequences(
    prefix: &str,
    keys: usize,
    per_key: u32,
) -> (Vec<Uuid>, HashMap<(i32, i64), (String, u32)>) {
    let (publisher, topic) = publisher(prefix).await;
    let ids: Vec<Uuid> = (0..keys).map(|_| Uuid::new_v4()).collect();
    let mut at = HashMap::new();
    for seq in 1..=per_key {
        for id in &ids {
            let mut order = OrderCreated::sample("test");
            order.data.order_id = *id;
            order.data.customer_id = format!("seq-{seq}");
            let d = publisher.publish(&topic, &order).await.unwrap();
            at.insert((d.partition, d.offset), (id.to_string(), seq));
        }
    }
    (ids, at)
}

/// Each key's sequence numbers in the output topic, in the order they were written.
fn output_sequences(prefix: &str) -> BTreeMap<String, Vec<u32>> {
    let (codec, _) = codec(prefix);
    let runtime = tokio::runtime::Handle::current();
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for m in read_topic(&format!("{prefix}notification.sent")) {
        let event: NotificationSent = tokio::task::block_in_place(|| {
            runtime.block_on(codec.decode::<NotificationSent>(m.payload()))
        })
        .unwrap();
        let seq = event
            .data
            .template
            .strip_prefix("seq-")
            .unwrap()
            .parse()
            .unwrap();
        out.entry(event.data.order_id.to_string())
            .or_default()
            .push(seq);
    }
    out
}

/// Calls per key, in arrival order.
fn by_key(calls: &[(String, u32)]) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (key, seq) in calls {
        out.entry(key.clone()).or_default().push(*seq);
    }
    out
}

/// Never before its predecessor: each call's number is at most one more than the highest
/// number of that key seen before it (a repeat after a crash may go back, never skip ahead).
fn never_ahead(key: &str, seqs: &[u32]) {
    let mut highest = 0;
    for seq in seqs {
        assert!(
            *seq <= highest + 1,
            "{key}: event {seq} ran before {} ({seqs:?})",
            highest + 1
        );
        highest = highest.max(*seq);
    }
}

fn committed_by_partition(group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            (e.partition(), offset)
        })
        .collect()
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

// ---- the tests --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_keys_sequence_stays_in_order_while_keys_interleave() {
    let downstream = SeqDownstream::new((0, 20));
    let addr = downstream.start().await;
    let dir = pipeline_dir(addr, 64);
    let prefix = prefix("keyorder");
    let running = Running::start(&prefix, &dir).await;
    let (keys, per_key) = (50, 12u32);
    let (ids, _) = publish_sequences(&prefix, keys, per_key).await;
    let total = keys as u64 * u64::from(per_key);
    running
        .wait_done(&["notify"], total, Duration::from_secs(120))
        .await;
    running.stop().await;

    let seen = downstream.seen.lock().unwrap();
    let expected: Vec<u32> = (1..=per_key).collect();
    let calls = by_key(&seen.calls);
    assert_eq!(calls.len(), keys);
    for id in &ids {
        assert_eq!(calls[&id.to_string()], expected, "calls of {id}");
    }
    assert_eq!(seen.same_key_overlaps, 0, "two calls of one key at once");
    eprintln!(
        "{} calls, at most {} at once",
        seen.calls.len(),
        seen.max_running
    );
    assert!(seen.max_running > 1, "keys never ran side by side");
    let outputs = output_sequences(&prefix);
    for id in &ids {
        assert_eq!(outputs[&id.to_string()], expected, "outputs of {id}");
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_key_holds_back_neither_other_keys_nor_other_partitions() {
    let downstream = SeqDownstream::new((0, 5));
    let addr = downstream.start().await;
    let dir = pipeline_dir(addr, 16);
    let prefix = prefix("slowkey");
    let (ids, at) = publish_sequences(&prefix, 40, 3).await;
    let slow = ids[0].to_string();
    downstream.seen.lock().unwrap().held.insert(slow.clone());
    let running = Running::start(&prefix, &dir).await;
    let others = 39 * 3;
    running
        .wait_done(&["notify"], others, Duration::from_secs(60))
        .await;
    // Every other key is done while the slow key's first call is still running, and its next
    // events wait in its lane.
    let slow_calls: Vec<u32> = by_key(&downstream.calls())
        .remove(&slow)
        .unwrap_or_default();
    assert_eq!(
        slow_calls,
        vec![1],
        "only the slow key's first event has started"
    );
    assert_eq!(running.done("notify"), others);
    let (slow_partition, slow_first) = at
        .iter()
        .filter(|(_, (k, seq))| *k == slow && *seq == 1)
        .map(|((p, o), _)| (*p, *o))
        .next()
        .unwrap();
    let topic = format!("{prefix}order.created");
    let group = format!("{prefix}notify");
    let ends: HashMap<i32, i64> = (0..3)
        .map(|p| {
            let end = at
                .keys()
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| o + 1)
                .max()
                .unwrap_or(0);
            (p, end)
        })
        .collect();
    // The other partitions commit everything; the slow key's partition stays at its record.
    wait_for(
        "the other partitions' offsets are committed",
        Duration::from_secs(30),
        || {
            let committed = committed_by_partition(&group, &topic, 3);
            (0..3)
                .filter(|p| *p != slow_partition)
                .all(|p| committed[&p] == ends[&p])
        },
    )
    .await;
    let committed = committed_by_partition(&group, &topic, 3);
    assert!(
        committed[&slow_partition] <= slow_first,
        "partition {slow_partition} committed {} past the unfinished record at {slow_first}",
        committed[&slow_partition]
    );
    downstream.gate.send(true).unwrap();
    running
        .wait_done(&["notify"], others + 3, Duration::from_secs(30))
        .await;
    running.stop().await;
    assert_eq!(by_key(&downstream.calls())[&slow], vec![1, 2, 3]);
    assert_eq!(output_sequences(&prefix)[&slow], vec![1, 2, 3]);
    let committed = committed_by_partition(&group, &topic, 3);
    assert_eq!(committed, ends, "everything committed once finished");
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_byte_budget_stops_reading_while_records_wait_and_loses_nothing() {
    let downstream = SeqDownstream::new((0, 0));
    let addr = downstream.start().await;
    let dir = pipeline_dir(addr, 16);
    let prefix = prefix("bytes");
    let (keys, per_key) = (3000, 2);
    let total = (keys * per_key as usize) as u64;
    let (ids, _) = publish_sequences(&prefix, keys, per_key).await;
    // Every call waits until the gate opens: whatever is read stays in flight.
    downstream
        .seen
        .lock()
        .unwrap()
        .held
        .extend(ids.iter().map(Uuid::to_string));
    // Only the byte budget can bind: the record budget and the window are far above the input.
    let budget = Budget {
        partition_window: 1_000_000,
        records: 1_000_000,
        bytes: 1 << 20,
    };
    let smallest = read_topic(&format!("{prefix}order.created"))
        .iter()
        .map(record_bytes)
        .min()
        .unwrap();
    // What fits under the budget, plus the one record per partition that finds it full.
    let bound = (budget.bytes / smallest) as u64 + 3;
    assert!(
        bound < total / 2,
        "records of {smallest} bytes: the budget would not bind"
    );
    let running = Running::start_budget(connect(&prefix), &dir, false, Some(budget)).await;
    let consumed = || running.telemetry["notify"].snapshot().consumed;
    let mut last = (u64::MAX, Instant::now());
    wait_for(
        "reading stops with the calls held",
        Duration::from_secs(60),
        || {
            let now = consumed();
            if now != last.0 {
                last = (now, Instant::now());
            }
            downstream.in_flight() == 16 && last.1.elapsed() >= Duration::from_secs(2)
        },
    )
    .await;
    let read = consumed();
    assert!(
        read <= bound,
        "{read} records read while none could finish: more than the {bound} that fit in {} bytes",
        budget.bytes
    );
    downstream.gate.send(true).unwrap();
    running
        .wait_done(&["notify"], total, Duration::from_secs(120))
        .await;
    running.stop().await;
    // Paused and resumed on bytes alone: every key's events arrive, once each, in order.
    let outputs = output_sequences(&prefix);
    assert_eq!(outputs.len(), keys);
    for (key, seqs) in &outputs {
        assert_eq!(seqs, &vec![1, 2], "{key}");
    }
    cleanup(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_mid_run_loses_nothing_and_keeps_each_keys_order() {
    // About 150 calls/s, so the work outlasts a join and a leave.
    let downstream = SeqDownstream::new((30, 70));
    let addr = downstream.start().await;
    let dir = pipeline_dir(addr, 8);
    let prefix = prefix("rebalance");
    let (keys, per_key) = (40, 25u32);
    let total = keys * per_key as usize;
    let (ids, _) = publish_sequences(&prefix, keys, per_key).await;
    let first = Running::start(&prefix, &dir).await;
    wait_for("progress before the join", Duration::from_secs(60), || {
        downstream.calls().len() >= total / 4
    })
    .await;
    let in_flight_at_join = downstream.in_flight();
    let calls_at_join = downstream.calls().len();
    let second = Running::start(&prefix, &dir).await;
    wait_for("progress before the leave", Duration::from_secs(60), || {
        downstream.calls().len() >= total * 3 / 5
    })
    .await;
    let in_flight_at_leave = downstream.in_flight();
    let calls_at_leave = downstream.calls().len();
    first.stop().await;
    let outputs_complete = || {
        let outputs = output_sequences(&prefix);
        ids.iter().all(|id| {
            outputs
                .get(&id.to_string())
                .is_some_and(|s| s.iter().collect::<HashSet<_>>().len() == per_key as usize)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !tokio::task::block_in_place(outputs_complete) {
        assert!(Instant::now() < deadline, "not every event was delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    second.stop().await;
    eprintln!(
        "join at {calls_at_join} calls ({in_flight_at_join} in flight), leave at {calls_at_leave} calls ({in_flight_at_leave} in flight)"
    );
    assert!(
        calls_at_join < total && calls_at_leave < total,
        "the rebalances came after the work"
    );
    let calls = by_key(&downstream.calls());
    let outputs = output_sequences(&prefix);
    let mut lost = 0;
    let mut repeated = 0;
    for id in &ids {
        let key = id.to_string();
        never_ahead(&key, &calls[&key]);
        never_ahead(&key, &outputs[&key]);
        let distinct: HashSet<&u32> = outputs[&key].iter().collect();
        lost += per_key as usize - distinct.len();
        repeated += calls[&key].len() - per_key as usize;
    }
    eprintln!("lost {lost}, repeated calls {repeated}");
    assert_eq!(lost, 0);
    // A repeat comes only from a record that was in flight when its partition moved.
    assert!(
        repeated <= in_flight_at_join + in_flight_at_leave + 2 * 8,
        "{repeated} repeated calls"
    );
    cleanup(&dir);
}

/// Like [`publish_sequences`] for the keys `ids`, each round of sequence numbers published at
/// once (a key's events still one after another): for inputs too large to publish one by one.
async fn publish_sequences_quickly(prefix: String, ids: Vec<Uuid>, per_key: u32) {
    let (publisher, topic) = publisher(&prefix).await;
    for seq in 1..=per_key {
        let round = ids.iter().map(|id| {
            let mut order = OrderCreated::sample("test");
            order.data.order_id = *id;
            order.data.customer_id = format!("seq-{seq}");
            let (publisher, topic) = (&publisher, &topic);
            async move { publisher.publish(topic, &order).await.unwrap() }
        });
        futures::future::join_all(round).await;
    }
}

/// Each key's sequence numbers in a topic of order.created copies, in the order they were
/// written.
fn copied_sequences(prefix: &str, topic: &str) -> BTreeMap<String, Vec<u32>> {
    let (codec, _) = codec(prefix);
    let runtime = tokio::runtime::Handle::current();
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for m in read_topic(topic) {
        let event: OrderCreated = tokio::task::block_in_place(|| {
            runtime.block_on(codec.decode::<OrderCreated>(m.payload()))
        })
        .unwrap();
        let seq = event.data.customer_id.strip_prefix("seq-").unwrap();
        out.entry(event.data.order_id.to_string())
            .or_default()
            .push(seq.parse().unwrap());
    }
    out
}

// A route step without the dedup store runs on the engine's own task, its acks counted by the
// producer: the same guarantees across a join and a leave as the tasks' path above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_without_dedup_keeps_each_keys_order_and_loses_nothing_across_a_rebalance() {
    let prefix = prefix("route-rebalance");
    let dir = pipeline_files(&[(
        "copy.yaml",
        "name: copy\ngroup: copy\ninputs: [order.created]\nconcurrency: 64\nstep: {route: {to: [order.copied]}}\n",
    )]);
    let (keys, per_key) = (50, 400u32);
    let total = keys * per_key as usize;
    let ids: Vec<Uuid> = (0..keys).map(|_| Uuid::new_v4()).collect();
    let budget = Budget {
        partition_window: 500,
        records: 500,
        bytes: 16 << 20,
    };
    let start = || Running::start_budget(connect(&prefix), &dir, false, Some(budget));
    let snapshot = |running: &Running| running.telemetry["copy"].snapshot();
    let first = start().await;
    // Published while the members copy, so the join and the leave land in a flowing stream.
    let publishing = tokio::spawn(publish_sequences_quickly(
        prefix.clone(),
        ids.clone(),
        per_key,
    ));
    wait_for("progress before the join", Duration::from_secs(60), || {
        snapshot(&first).succeeded as usize >= total / 4
    })
    .await;
    let done_at_join = snapshot(&first).succeeded;
    // Most records the first member held while the second joined (until it read its first).
    let mut in_flight_at_join = 0;
    let second = start().await;
    wait_for("the second member reads", Duration::from_secs(60), || {
        let s = snapshot(&first);
        in_flight_at_join = in_flight_at_join.max(s.consumed - s.succeeded);
        snapshot(&second).consumed > 0
    })
    .await;
    wait_for("progress before the leave", Duration::from_secs(60), || {
        (snapshot(&first).succeeded + snapshot(&second).succeeded) as usize >= total * 3 / 5
    })
    .await;
    let s = snapshot(&first);
    let in_flight_at_leave = s.consumed - s.succeeded;
    let done_at_leave = s.succeeded + snapshot(&second).succeeded;
    first.stop().await;
    publishing.await.unwrap();
    let output = format!("{prefix}order.copied");
    let complete = || {
        let copies = copied_sequences(&prefix, &output);
        ids.iter().all(|id| {
            copies
                .get(&id.to_string())
                .is_some_and(|s| s.iter().collect::<HashSet<_>>().len() == per_key as usize)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !tokio::task::block_in_place(complete) {
        assert!(Instant::now() < deadline, "not every event was copied");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    second.stop().await;
    eprintln!(
        "join at {done_at_join} copied ({in_flight_at_join} in flight), leave at {done_at_leave} ({in_flight_at_leave} in flight)"
    );
    assert!(
        (done_at_join as usize) < total && (done_at_leave as usize) < total,
        "the rebalances came after the work"
    );
    let copies = copied_sequences(&prefix, &output);
    let (mut lost, mut repeated) = (0, 0);
    for id in &ids {
        let key = id.to_string();
        never_ahead(&key, &copies[&key]);
        let distinct: HashSet<&u32> = copies[&key].iter().collect();
        lost += per_key as usize - distinct.len();
        repeated += copies[&key].len() - distinct.len();
    }
    eprintln!("lost {lost}, repeated copies {repeated}");
    assert_eq!(lost, 0);
    // A repeat comes only from a record in flight when its partition moved: at most what the
    // budget lets a member hold (plus the record per partition that finds it full), twice.
    let partitions = read_topic(&format!("{prefix}order.created"))
        .iter()
        .map(|m| m.partition())
        .collect::<HashSet<_>>()
        .len();
    assert!(
        repeated <= 2 * (budget.records + partitions),
        "{repeated} repeated copies"
    );
    cleanup(&dir);
}

/// The group's view once `members` members own every one of `partitions` partitions, each
/// exactly once, and the coordinator calls it stable.
async fn settled(group: &str, members: usize, partitions: usize, within: Duration) -> GroupView {
    let deadline = Instant::now() + within;
    loop {
        let view = tokio::task::block_in_place(|| describe_group(group));
        let owned: Vec<&(String, i32)> = view.members.iter().flat_map(|m| &m.partitions).collect();
        let distinct: HashSet<&(String, i32)> = owned.iter().copied().collect();
        if view.state == "Stable"
            && view.members.len() == members
            && view.members.iter().all(|m| !m.partitions.is_empty())
            && owned.len() == partitions
            && distinct.len() == partitions
        {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "{group}: not {members} members owning {partitions} partitions within {within:?}: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// Fails under the classic protocol's cooperative-sticky assignor, which balances the count of
// partitions, not each topic's (librdkafka #4044): twice in two runs the joining member got
// (input, all) = (0, 15) against (6, 15): only retry partitions. With the KIP-848 protocol and the
// broker's range assignor (commit e270ca8, reverted in the next) it passed with (3, 15) each,
// but that switch broke tests/processes.rs: a static member killed with SIGKILL holds its
// instance id until the broker's session timeout (the restart is refused with the fatal
// UNRELEASED_INSTANCE_ID), and even after joining again (10 s broker session) the restarted run
// made no progress within the tests' 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the cooperative-sticky assignor does not balance each topic (README: Scaling out); passes with KIP-848, reverted: see the comment"]
async fn a_second_replica_takes_half_of_the_input_partitions() {
    // A processor subscribes its input and its retry tiers: 6 + 4 x 6 partitions. A replica
    // that joins must take over half of the input, not just half of the partition count.
    let (input_partitions, tiers) = (6, 4);
    let downstream = SeqDownstream::new((0, 0));
    let addr = downstream.start().await;
    let dir = pipeline_files(&[(
        "notify.yaml",
        format!(
            "name: notify\ngroup: notify\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/notify\n    timeout: 30s\n    emit: {{\"2xx\": notification.sent}}\nretry:\n  tiers: [1s, 2s, 4s, 8s]\n"
        )
        .as_str(),
    )]);
    let prefix = prefix("scaleout");
    let input = format!("{prefix}order.created");
    // The input exists first with 6 partitions; the retry tiers follow its count.
    orderflow::kafka::ensure_topics(&bootstrap(), &[(&input, input_partitions)], 1)
        .await
        .unwrap();
    let group = format!("{prefix}notify");
    let all = input_partitions as usize * (1 + tiers);
    let first = Running::start(&prefix, &dir).await;
    settled(&group, 1, all, Duration::from_secs(60)).await;
    let second = Running::start(&prefix, &dir).await;
    let view = settled(&group, 2, all, Duration::from_secs(60)).await;
    let owned: Vec<(usize, usize)> = view
        .members
        .iter()
        .map(|m| (m.owns_of(&input), m.partitions.len()))
        .collect();
    eprintln!(
        "{} group, (input, all) partitions per member: {owned:?}",
        view.kind
    );
    for m in &view.members {
        eprintln!("  {}: {:?}", m.id, m.partitions);
    }
    second.stop().await;
    first.stop().await;
    cleanup(&dir);
    let half = input_partitions as usize / 2;
    assert!(
        owned.iter().all(|(input, _)| *input >= half),
        "each member should own at least {half} of the {input_partitions} input partitions: {owned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_sigkill_no_event_runs_before_its_predecessor() {
    let downstream = SeqDownstream::new((5, 40));
    let addr = downstream.start().await;
    let dir = pipeline_dir(addr, 64);
    let prefix = prefix("keykill");
    let log = dir.join("run.log");
    let (keys, per_key) = (40, 12u32);
    let total = keys * per_key as usize;
    let (ids, _) = publish_sequences(&prefix, keys, per_key).await;
    let spawn = || {
        spawn_orderflow(
            &["run", "notify"],
            &prefix,
            &dir,
            &log,
            &[("ORDERFLOW_DATABASE_URL", &database_url())],
        )
    };
    let mut run = spawn();
    let kills = 2;
    let mut in_flight_at_kills = Vec::new();
    for k in 1..=kills {
        let start = downstream.seen.lock().unwrap().answered;
        // Kill on progress since this run started, with calls in flight.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let progressed = {
                let s = downstream.seen.lock().unwrap();
                s.answered >= start + total * k / (kills + 2) && s.running > 0
            };
            if progressed {
                break;
            }
            still_running(&mut run, &log);
            assert!(
                Instant::now() < deadline,
                "no progress:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        signal(&run, libc::SIGKILL);
        in_flight_at_kills.push(downstream.in_flight());
        wait_exit(&mut run, Duration::from_secs(10));
        run = spawn();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let outputs = tokio::task::block_in_place(|| output_sequences(&prefix));
        let complete = ids.iter().all(|id| {
            outputs
                .get(&id.to_string())
                .is_some_and(|s| s.iter().collect::<HashSet<_>>().len() == per_key as usize)
        });
        if complete {
            break;
        }
        still_running(&mut run, &log);
        assert!(Instant::now() < deadline, "not every event was delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    signal(&run, libc::SIGTERM);
    assert!(wait_exit(&mut run, Duration::from_secs(30)).success());
    let calls = by_key(&downstream.calls());
    let outputs = output_sequences(&prefix);
    let mut repeated = 0;
    for id in &ids {
        let key = id.to_string();
        never_ahead(&key, &calls[&key]);
        never_ahead(&key, &outputs[&key]);
        repeated += calls[&key].len() - per_key as usize;
    }
    eprintln!(
        "{kills} kills with {in_flight_at_kills:?} calls in flight; {repeated} repeated calls"
    );
    assert!(
        in_flight_at_kills.iter().all(|n| *n > 0),
        "a kill landed with nothing in flight: {in_flight_at_kills:?}"
    );
    // With the dedup store, only what was in flight at a kill repeats: calls in their step, and
    // records whose outputs awaited their acks or mark (at most `concurrency` each).
    let bound: usize = in_flight_at_kills.iter().map(|n| n + 64).sum();
    assert!(
        repeated <= bound,
        "{repeated} repeated calls, bound {bound}"
    );
    cleanup(&dir);
}
