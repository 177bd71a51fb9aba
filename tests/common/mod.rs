//! Helpers shared by the integration tests that run processors: the stack's addresses, a
//! scripted HTTP downstream, pipeline files pointing at it, and reading whole topics.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use orderflow::app::{processors, Connect};
use orderflow::contracts::validate::Violations;
use orderflow::contracts::{
    Address, AnyEvent, Catalog, Envelope, Event, EventCodec, Money, Naming, OrderCreated,
    OrderItem, SubjectStrategy,
};
use orderflow::kafka::Publisher;
use orderflow::pipeline;
use orderflow::telemetry::Telemetry;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

pub fn bootstrap() -> String {
    std::env::var("ORDERFLOW_BOOTSTRAP_SERVERS")
        .expect("ORDERFLOW_BOOTSTRAP_SERVERS is not set: run the tests with scripts/test")
}

pub fn registry_url() -> String {
    std::env::var("ORDERFLOW_REGISTRY_URL")
        .expect("ORDERFLOW_REGISTRY_URL is not set: run the tests with scripts/test")
}

pub fn connect(prefix: &str) -> Connect {
    Connect {
        bootstrap_servers: bootstrap(),
        registry_url: registry_url(),
        schemas_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/avro").into(),
        topic_prefix: prefix.to_string(),
        subject_strategy: SubjectStrategy::Topic,
        replication_factor: 1,
        database_url: std::env::var("ORDERFLOW_DATABASE_URL")
            .expect("ORDERFLOW_DATABASE_URL is not set: run the tests with scripts/test"),
    }
}

/// A fresh topic prefix for one test. Its topics are deleted when the test binary exits: one
/// broker serves a whole run, and thousands of leftover partitions would exhaust its open files.
pub fn prefix(name: &str) -> String {
    let prefix = format!(
        "it-{name}-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut prefixes = PREFIXES.lock().unwrap();
    if prefixes.is_empty() {
        // SAFETY: registers a plain extern "C" function, run once at normal process exit.
        unsafe { libc::atexit(drop_test_topics) };
    }
    prefixes.push(prefix.clone());
    prefix
}

static PREFIXES: Mutex<Vec<String>> = Mutex::new(Vec::new());

extern "C" fn drop_test_topics() {
    let prefixes = std::mem::take(&mut *PREFIXES.lock().unwrap_or_else(|e| e.into_inner()));
    let Ok(bootstrap) = std::env::var("ORDERFLOW_BOOTSTRAP_SERVERS") else {
        return;
    };
    let cluster = std::env::var("ORDERFLOW_CLUSTER_BOOTSTRAP").ok();
    // A thread of its own: the test harness's runtime is gone by now.
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for servers in std::iter::once(bootstrap).chain(cluster) {
            runtime.block_on(delete_topics_with(&servers, &prefixes));
        }
    })
    .join();
}

async fn delete_topics_with(bootstrap: &str, prefixes: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let Ok(admin) = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let Ok(metadata) = admin.inner().fetch_metadata(None, Duration::from_secs(10)) else {
        return;
    };
    let names: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect();
    for chunk in names.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        if let Err(e) = admin.delete_topics(&refs, &options).await {
            eprintln!("deleting the test topics on {bootstrap}: {e}");
        }
    }
    eprintln!("deleted {} test topic(s) on {bootstrap}", names.len());
}

// ---- a scripted downstream -------------------------------------------------------------------

/// One call the downstream received.
#[derive(Debug, Clone)]
pub struct Call {
    pub order_id: String,
    pub idempotency_key: String,
    pub at: Instant,
}

#[derive(Default)]
struct Script {
    /// Per service and order: the statuses to answer, in order; then 200.
    answers: HashMap<(String, String), VecDeque<u16>>,
    /// Per service: delay of every answer.
    delay: HashMap<String, Duration>,
    calls: Vec<(String, Call)>,
    /// Per service: calls answered.
    answered: HashMap<String, usize>,
}

#[derive(Clone, Default)]
pub struct Downstream(Arc<Mutex<Script>>);

impl Downstream {
    pub fn script(&self, service: &str, order: &OrderCreated, statuses: &[u16]) {
        self.0.lock().unwrap().answers.insert(
            (service.to_string(), order.data.order_id.to_string()),
            statuses.iter().copied().collect(),
        );
    }

    pub fn delay(&self, service: &str, delay: Duration) {
        self.0
            .lock()
            .unwrap()
            .delay
            .insert(service.to_string(), delay);
    }

    pub fn calls(&self, service: &str, order: &OrderCreated) -> Vec<Call> {
        let id = order.data.order_id.to_string();
        self.0
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(s, c)| s == service && c.order_id == id)
            .map(|(_, c)| c.clone())
            .collect()
    }

    pub async fn start(&self) -> SocketAddr {
        serve(
            Router::new()
                .route("/{service}", post(answer))
                .with_state(self.clone()),
        )
        .await
    }
}

/// Serves `app` on a free loopback port, in the background.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn answer(
    State(downstream): State<Downstream>,
    UrlPath(service): UrlPath<String>,
    headers: HeaderMap,
    Json(order): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let order_id = order["data"]["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (status, delay) = {
        let mut script = downstream.0.lock().unwrap();
        script.calls.push((
            service.clone(),
            Call {
                order_id: order_id.clone(),
                idempotency_key: headers
                    .get("Idempotency-Key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                at: Instant::now(),
            },
        ));
        let status = script
            .answers
            .get_mut(&(service.clone(), order_id.clone()))
            .and_then(VecDeque::pop_front)
            .unwrap_or(200);
        (status, script.delay.get(&service).copied())
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    *downstream
        .0
        .lock()
        .unwrap()
        .answered
        .entry(service.clone())
        .or_default() += 1;
    let body = match (service.as_str(), status) {
        ("payments", 200) => {
            json!({"order_id": order_id, "payment_id": uuid::Uuid::now_v7().to_string(), "amount": order["data"]["total"]})
        }
        ("reservations", 200) => json!({
            "order_id": order_id,
            "reservation_id": uuid::Uuid::now_v7().to_string(),
            "lines": order["data"]["items"].as_array().unwrap().iter().map(|i| json!({"sku": i["sku"], "quantity": i["quantity"]})).collect::<Vec<_>>(),
        }),
        ("notifications", 200) => {
            json!({"order_id": order_id, "channel": "email", "recipient": "a@example.com", "template": "order-received"})
        }
        _ => json!({"error": format!("scripted {status}")}),
    };
    (StatusCode::from_u16(status).unwrap(), Json(body))
}

// ---- pipelines, processors, topics -----------------------------------------------------------

/// The four order.created consumers, pointing at the scripted downstream, with short tiers.
pub fn pipelines_dir(addr: SocketAddr) -> PathBuf {
    let http = |name: &str, path: &str, emit: &str| {
        format!(
            "name: {name}\ngroup: {name}\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/{path}\n    timeout: 5s\n    emit: {{\"2xx\": {emit}}}\nretry:\n  tiers: [1s, 2s, 4s]\n  transient_attempts: 2\n"
        )
    };
    pipeline_files(&[
        ("payment.yaml", &http("payment", "payments", "payment.charged")),
        ("inventory.yaml", &http("inventory", "reservations", "inventory.reserved")),
        ("notification.yaml", &http("notification", "notifications", "notification.sent")),
        (
            "analytics.yaml",
            "name: analytics\ngroup: analytics\ninputs: [order.created]\nstep: {route: {to: [analytics.orders]}}\nretry: {tiers: [1s]}\n",
        ),
    ])
}

/// The repository's contracts with topics under `prefix`, and the order.created topic.
pub fn codec(prefix: &str) -> (Arc<EventCodec>, String) {
    let naming = Naming {
        topic_prefix: prefix.to_string(),
        strategy: SubjectStrategy::Topic,
    };
    let catalog = Arc::new(Catalog::load(concat!(env!("CARGO_MANIFEST_DIR"), "/avro")).unwrap());
    let codec =
        Arc::new(EventCodec::with_naming(&registry_url(), catalog, naming.clone()).unwrap());
    (codec, naming.topic("order.created"))
}

pub async fn publisher(prefix: &str) -> (Publisher, String) {
    let (codec, topic) = codec(prefix);
    (Publisher::new(&bootstrap(), codec).unwrap(), topic)
}

/// A fresh temporary folder holding the given pipeline files (name, YAML).
pub fn pipeline_files(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("it-pipelines-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, yaml) in files {
        std::fs::write(dir.join(name), yaml).unwrap();
    }
    dir
}

/// Every event of `event_type` under `prefix`, decoded.
pub async fn events(prefix: &str, event_type: &str) -> Vec<AnyEvent> {
    let (codec, _) = codec(prefix);
    let topic = format!("{prefix}{event_type}");
    let records = tokio::task::spawn_blocking(move || read_topic(&topic))
        .await
        .unwrap();
    let mut out = Vec::new();
    for r in records {
        out.push(
            AnyEvent::decode(&codec, event_type, r.payload())
                .await
                .unwrap(),
        );
    }
    out
}

/// A local TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every committed record of a topic, from the beginning to the end as of now (empty when the
/// topic does not exist). Reads to each partition's end rather than counting up to the
/// watermarks, which also count aborted records and transaction markers.
pub fn read_topic(topic: &str) -> Vec<OwnedMessage> {
    read_topic_with(topic, "read_committed")
}

pub fn read_topic_with(topic: &str, isolation: &str) -> Vec<OwnedMessage> {
    read_topic_at(&bootstrap(), topic, isolation)
}

/// [`read_topic_with`] on another cluster.
pub fn read_topic_at(bootstrap: &str, topic: &str, isolation: &str) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("it-reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_error = None;
    while at_end.len() < partitions.len() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach the end within 30 s (last error: {last_error:?})"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => out.push(message.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            // A broker restarting (the fault suite): librdkafka reconnects; the deadline bounds it.
            Some(Err(e)) => last_error = Some(e.to_string()),
            None => {}
        }
    }
    out
}

pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).to_string())
}

pub fn keys(messages: &[OwnedMessage]) -> Vec<String> {
    let mut keys: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap()).to_string())
        .collect();
    keys.sort();
    keys
}

pub fn database_url() -> String {
    std::env::var("ORDERFLOW_DATABASE_URL")
        .expect("ORDERFLOW_DATABASE_URL is not set: run the tests with scripts/test")
}

impl Downstream {
    /// Order ids of the calls the service received since `since`.
    pub fn calls_since(&self, service: &str, since: Instant) -> Vec<String> {
        let script = self.0.lock().unwrap();
        script
            .calls
            .iter()
            .filter(|(s, c)| s == service && c.at >= since)
            .map(|(_, c)| c.order_id.clone())
            .collect()
    }

    /// Calls of the service not answered yet: in flight now.
    pub fn in_flight(&self, service: &str) -> usize {
        let script = self.0.lock().unwrap();
        let calls = script.calls.iter().filter(|(s, _)| s == service).count();
        calls - script.answered.get(service).copied().unwrap_or(0)
    }

    /// Distinct idempotency keys the service saw, and the number of calls.
    pub fn keys_and_calls(&self, service: &str) -> (usize, usize) {
        let script = self.0.lock().unwrap();
        let calls: Vec<&Call> = script
            .calls
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, c)| c)
            .collect();
        let keys: std::collections::HashSet<&str> =
            calls.iter().map(|c| c.idempotency_key.as_str()).collect();
        (keys.len(), calls.len())
    }
}

/// Sum of a group's committed offsets over a topic's partitions: how many inputs it has
/// finished (committed), when it started from the beginning. A broker request that times out
/// (the broker busy with the processes a test kills and restarts) is asked again, for a minute
/// at most: this reads the test's state, it is not what is tested.
pub fn committed_inputs(group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let again = |what: &str, e: rdkafka::error::KafkaError| {
        assert!(
            Instant::now() < deadline,
            "{what} of {topic} for {group}: still failing after a minute: {e}"
        );
    };
    let metadata = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(metadata) => break metadata,
            Err(e) => again("metadata", e),
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = loop {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => break committed,
            Err(e) => again("committed offsets", e),
        }
    };
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

pub struct Running {
    pub telemetry: HashMap<String, Telemetry>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Running {
    pub async fn start(prefix: &str, dir: &Path) -> Running {
        Running::start_with(connect(prefix), dir).await
    }

    pub fn done(&self, pipeline: &str) -> u64 {
        let s = self.telemetry[pipeline].snapshot();
        s.succeeded + s.dead_lettered
    }

    /// Waits until each named pipeline has ended `count` inputs (succeeded or dead-lettered).
    pub async fn wait_done(&self, pipelines: &[&str], count: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while pipelines.iter().any(|p| self.done(p) < count) {
            assert!(
                Instant::now() < deadline,
                "not done within {within:?}: {:?}",
                pipelines
                    .iter()
                    .map(|p| (p, self.telemetry[*p].snapshot()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) {
        self.stop.send(true).unwrap();
        while let Some(result) = self.tasks.join_next().await {
            result.unwrap().unwrap();
        }
    }
}

impl Running {
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&HashMap<String, Telemetry>) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !done(&self.telemetry) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}: {:?}",
                self.telemetry
                    .iter()
                    .map(|(n, t)| (n, t.snapshot()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---- `orderflow run` as a process ------------------------------------------------------------

/// `orderflow run --all` over the pipelines of `dir`, topics under `prefix`, stderr to `log`.
/// `orderflow run --all`; a restart (same prefix) is the same static member of its groups, so
/// it gets its partitions back at once, as a restarted container in its pod does.
pub fn spawn_run(prefix: &str, dir: &Path, log: &Path) -> Process {
    spawn_orderflow(
        &["run", "--all", "--report-every", "0s"],
        prefix,
        dir,
        log,
        &[("ORDERFLOW_INSTANCE_ID", &format!("{prefix}member"))],
    )
}

/// `orderflow <args>` as a process over the pipelines of `dir`, topics under `prefix`, stderr
/// appended to `log`, with `env` set besides.
pub fn spawn_orderflow(
    args: &[&str],
    prefix: &str,
    dir: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> Process {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    command
        .args(args)
        .env("ORDERFLOW_PIPELINES_DIR", dir)
        .env("ORDERFLOW_TOPIC_PREFIX", prefix)
        .env(
            "ORDERFLOW_SCHEMAS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/avro"),
        )
        // ORDERFLOW_TEST_LOG=debug (or a filter) makes the processes' logs more detailed.
        .env(
            "ORDERFLOW_LOG",
            std::env::var("ORDERFLOW_TEST_LOG").unwrap_or("info".into()),
        )
        // Several runs at once: each serves its metrics on a free port unless told otherwise.
        .env("ORDERFLOW_METRICS_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        command.env(k, v);
    }
    Process(command.stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// A spawned `orderflow` process, killed when dropped: a test that fails half-way leaves no
/// process behind to consume from its topics or hold its ports.
pub struct Process(pub Child);

impl std::ops::Deref for Process {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs an `orderflow` command to its end; fails the test when it fails. Returns its output.
pub fn cli(prefix: &str, dir: &Path, args: &[&str]) -> String {
    let (ok, text) = cli_output(prefix, dir, args);
    assert!(ok, "orderflow {args:?} failed:\n{text}");
    text
}

/// Runs an `orderflow` command to its end: whether it succeeded, and its output.
pub fn cli_output(prefix: &str, dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env("ORDERFLOW_TOPIC_PREFIX", prefix)
        .env("ORDERFLOW_PIPELINES_DIR", dir)
        .env(
            "ORDERFLOW_SCHEMAS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/avro"),
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Publishes `count` sample orders, pausing `every` between them.
pub async fn publish_paced(prefix: &str, count: usize, every: Duration) -> Vec<OrderCreated> {
    let (publisher, topic) = publisher(prefix).await;
    let mut orders = Vec::new();
    for _ in 0..count {
        let order = OrderCreated::sample("test");
        publisher.publish(&topic, &order).await.unwrap();
        orders.push(order);
        tokio::time::sleep(every).await;
    }
    orders
}

/// Fails the test at once, with the log, when the child has already exited.
pub fn still_running(child: &mut Child, log: &Path) {
    if let Some(status) = child.try_wait().unwrap() {
        panic!(
            "orderflow run exited with {status}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child we own and have not waited for.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "orderflow run did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- a TCP proxy that can be switched off -----------------------------------------------------

/// A TCP proxy to an HTTP service (the registry) that a test can switch off, open connections
/// included, and on again.
pub struct SwitchProxy {
    /// The target URL with the proxy's address instead of the target's.
    pub url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl SwitchProxy {
    pub async fn start(target_url: &str) -> SwitchProxy {
        let target = target_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let path = target_url
            .trim_start_matches("http://")
            .trim_start_matches(&target)
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{path}", listener.local_addr().unwrap());
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let live: Arc<Mutex<tokio::task::JoinSet<()>>> = Arc::default();
        let (accepting, connections) = (up.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                if !accepting.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let target = target.clone();
                connections.lock().unwrap().spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        SwitchProxy { url, up, live }
    }

    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.live.lock().unwrap().abort_all();
    }

    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Running {
    /// Like [`Running::start`], with a connection of the caller's (e.g. through a proxy).
    pub async fn start_with(connect: Connect, dir: &Path) -> Running {
        Running::start_dedup(connect, dir, true).await
    }
}

// ---- an evolved contract -----------------------------------------------------------------------

/// A copy of `avro/` in a temporary folder, with `edit` applied to order.created's data fields.
pub fn edited_avro(edit: impl FnOnce(&mut Vec<Value>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("it-avro-{}", uuid::Uuid::new_v4().simple()));
    copy_dir(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro")),
        &dir,
    );
    let file = dir.join("order/order.created.avsc");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let data = schema["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "data")
        .unwrap();
    edit(data["type"]["fields"].as_array_mut().unwrap());
    std::fs::write(&file, serde_json::to_string_pretty(&schema).unwrap()).unwrap();
    dir
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// order.created as a consumer built against a newer contract sees it: one optional field more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCreatedV2 {
    pub envelope: Envelope,
    pub data: OrderCreatedDataV2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCreatedDataV2 {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<OrderItem>,
    pub total: Money,
    pub shipping_address: Address,
    pub gift_message: Option<String>,
}

impl Event for OrderCreatedV2 {
    const EVENT_TYPE: &'static str = "order.created";
    const SCHEMA_VERSION: i32 = 2;
    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
    fn key(&self) -> String {
        self.data.order_id.clone()
    }
    fn check_data(&self, _: &mut Violations) {}
}

impl OrderCreatedV2 {
    pub fn from_v1(order: &OrderCreated, gift_message: Option<&str>) -> Self {
        let d = &order.data;
        OrderCreatedV2 {
            envelope: Envelope {
                schema_version: 2,
                ..order.envelope.clone()
            },
            data: OrderCreatedDataV2 {
                order_id: d.order_id.to_string(),
                customer_id: d.customer_id.clone(),
                items: d.items.clone(),
                total: d.total.clone(),
                shipping_address: d.shipping_address.clone(),
                gift_message: gift_message.map(str::to_string),
            },
        }
    }
}

pub fn with_gift_message(fields: &mut Vec<Value>) {
    fields.push(json!({"name": "gift_message", "type": ["null", "string"], "default": null}));
}

/// Frames an Avro value the way a producer that skipped our validation would.
pub async fn raw_payload(topic: &str, value: &impl serde::Serialize, event_type: &str) -> Vec<u8> {
    let catalog = Catalog::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro"))).unwrap();
    let schema = catalog.event(event_type).unwrap();
    let registered = orderflow::contracts::RegistryClient::new(&registry_url())
        .register(&format!("{topic}-value"), &schema.expanded)
        .await
        .unwrap();
    let value = apache_avro::to_value(value)
        .unwrap()
        .resolve(&schema.schema)
        .unwrap();
    let mut payload = vec![0];
    payload.extend_from_slice(&registered.id.to_be_bytes());
    payload.extend(
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema.schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap(),
    );
    payload
}

// ---- the repository's saga and its step pipelines (tests/saga.rs, tests/alerting.rs) ----------

/// The repository's pipelines and saga, their URLs pointing at `addr`; `edit` may change a
/// file's text (by file name) before it is written.
pub fn saga_dir(addr: SocketAddr, edit: impl Fn(&str, String) -> String) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let dir = pipeline_files(&[]);
    std::fs::create_dir_all(dir.join("sagas")).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&repo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.push(repo.join("sagas/order.yaml"));
    for file in files {
        let relative = file.strip_prefix(&repo).unwrap();
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(|line| match line.split_once("${") {
                // url: ${ORDERFLOW_X_URL:-http://127.0.0.1:18090/path}
                Some((head, rest)) if head.trim() == "url:" => {
                    let path = rest.split_once("18090/").unwrap().1.trim_end_matches('}');
                    format!("{head}http://{addr}/{path}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect();
        let text = edit(relative.to_str().unwrap(), text);
        std::fs::write(dir.join(relative), text).unwrap();
    }
    dir
}

// ---- the fault suite's helpers (tests/faults.rs) ---------------------------------------------

impl Downstream {
    /// Per order id: the calls the service received for it, and the distinct `Idempotency-Key`s
    /// they carried.
    pub fn calls_per_order(
        &self,
        service: &str,
    ) -> HashMap<String, (usize, std::collections::HashSet<String>)> {
        let script = self.0.lock().unwrap();
        let mut per: HashMap<String, (usize, std::collections::HashSet<String>)> = HashMap::new();
        for (_, call) in script.calls.iter().filter(|(s, _)| s == service) {
            let entry = per.entry(call.order_id.clone()).or_default();
            entry.0 += 1;
            entry.1.insert(call.idempotency_key.clone());
        }
        per
    }

    /// When each call of the service since `since` arrived, with its order id.
    pub fn calls_at_since(&self, service: &str, since: Instant) -> Vec<(String, Instant)> {
        let script = self.0.lock().unwrap();
        script
            .calls
            .iter()
            .filter(|(s, c)| s == service && c.at >= since)
            .map(|(_, c)| (c.order_id.clone(), c.at))
            .collect()
    }
}

impl Running {
    /// Like [`Running::start_with`]; `dedup: false` builds the processors without the dedup
    /// store (`orderflow run --no-dedup`), so a repeated event id is handled, and seen, again.
    pub async fn start_dedup(connect: Connect, dir: &Path, dedup: bool) -> Running {
        Running::start_budget(connect, dir, dedup, None).await
    }

    /// Like [`Running::start_dedup`]; each processor holds at most `budget` in flight when given.
    pub async fn start_budget(
        connect: Connect,
        dir: &Path,
        dedup: bool,
        budget: Option<orderflow::runtime::room::Budget>,
    ) -> Running {
        let pipelines = pipeline::load_dir(dir, &orderflow::steps::HANDLER_NAMES).unwrap();
        let mut processors = processors(&connect, pipelines, dedup).await.unwrap();
        if let Some(budget) = budget {
            processors = processors
                .into_iter()
                .map(|p| p.with_budget(budget))
                .collect();
        }
        let telemetry = processors
            .iter()
            .map(|p| (p.pipeline().name.clone(), p.telemetry()))
            .collect();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for p in processors {
            tasks.spawn(p.run(stopped.clone()));
        }
        Running {
            telemetry,
            stop,
            tasks,
        }
    }
}

/// The orders whose order.created event `group` has recorded as handled in the dedup store
/// (`order_of` maps event ids to order ids).
pub async fn marked_orders(group: &str, order_of: &HashMap<String, String>) -> HashSet<String> {
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query(
            "SELECT event_id FROM orderflow_processed WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|r| {
            order_of
                .get(&r.get::<_, uuid::Uuid>(0).to_string())
                .cloned()
        })
        .collect()
}

// ---- a consumer group as its coordinator sees it ----------------------------------------------

/// A consumer group as its coordinator describes it.
#[derive(Debug)]
pub struct GroupView {
    /// `Classic` or `Consumer` (KIP-848).
    pub kind: String,
    /// E.g. `Stable`, `PreparingRebalance`, `Reconciling`, `Empty`.
    pub state: String,
    pub members: Vec<GroupMember>,
}

#[derive(Debug)]
pub struct GroupMember {
    pub id: String,
    /// The partitions the coordinator holds the member to own.
    pub partitions: Vec<(String, i32)>,
}

impl GroupMember {
    /// How many of `topic`'s partitions the member owns.
    pub fn owns_of(&self, topic: &str) -> usize {
        self.partitions.iter().filter(|(t, _)| t == topic).count()
    }
}

/// Describes `group` (librdkafka's DescribeConsumerGroups: DescribeGroups for a classic group,
/// ConsumerGroupDescribe for a KIP-848 one). rust-rdkafka has no binding for it, so this calls
/// the C API.
pub fn describe_group(group: &str) -> GroupView {
    use rdkafka::admin::AdminClient;
    use rdkafka::bindings as rd;
    use rdkafka::client::DefaultClientContext;
    use std::ffi::{CStr, CString};

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let rk = admin.inner().native_ptr();
    let text = |s: *const std::ffi::c_char| {
        // SAFETY: librdkafka returns NUL-terminated strings that live as long as their event.
        (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
    };
    let name = CString::new(group).unwrap();
    // SAFETY: every pointer comes from librdkafka and is used before the event (which owns the
    // descriptions), the options and the queue are destroyed at the end.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
        );
        let mut errstr = [0 as std::ffi::c_char; 512];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            10_000,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let mut names = [name.as_ptr()];
        rd::rd_kafka_DescribeConsumerGroups(rk, names.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, 15_000);
        assert!(
            !event.is_null(),
            "describing {group}: no answer within 15 s"
        );
        let described = (|| {
            if rd::rd_kafka_event_error(event) as i32 != 0 {
                return Err(text(rd::rd_kafka_event_error_string(event)).unwrap_or_default());
            }
            let result = rd::rd_kafka_event_DescribeConsumerGroups_result(event);
            let mut count = 0;
            let groups = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut count);
            assert_eq!(count, 1);
            let g = *groups;
            let error = rd::rd_kafka_ConsumerGroupDescription_error(g);
            if !error.is_null() {
                return Err(text(rd::rd_kafka_error_string(error)).unwrap_or_default());
            }
            let mut members = Vec::new();
            for i in 0..rd::rd_kafka_ConsumerGroupDescription_member_count(g) {
                let m = rd::rd_kafka_ConsumerGroupDescription_member(g, i);
                let tpl = rd::rd_kafka_MemberAssignment_partitions(
                    rd::rd_kafka_MemberDescription_assignment(m),
                );
                let mut partitions = Vec::new();
                if !tpl.is_null() {
                    for j in 0..(*tpl).cnt as usize {
                        let e = &*(*tpl).elems.add(j);
                        partitions.push((text(e.topic).unwrap_or_default(), e.partition));
                    }
                }
                partitions.sort();
                members.push(GroupMember {
                    id: text(rd::rd_kafka_MemberDescription_consumer_id(m)).unwrap_or_default(),
                    partitions,
                });
            }
            Ok(GroupView {
                kind: text(rd::rd_kafka_consumer_group_type_name(
                    rd::rd_kafka_ConsumerGroupDescription_type(g),
                ))
                .unwrap_or_default(),
                state: text(rd::rd_kafka_consumer_group_state_name(
                    rd::rd_kafka_ConsumerGroupDescription_state(g),
                ))
                .unwrap_or_default(),
                members,
            })
        })();
        rd::rd_kafka_event_destroy(event);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_queue_destroy(queue);
        described.unwrap_or_else(|e| panic!("describing {group}: {e}"))
    }
}
