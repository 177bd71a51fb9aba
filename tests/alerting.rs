//! The operator's loop against a real Prometheus (Debian's package): processors and the order
//! saga serve /metrics, Prometheus scrapes them with orderflow's alert rules loaded, poison
//! events fill a dead-letter topic, the DLQ alert goes pending then firing, every panel query of
//! every dashboard (sagas.json included) returns data, and after a replay the DLQ depth is back
//! to zero.
//!
//! The rules are the shipped ones with every `for:` shortened to 5 s so the test does not wait
//! an hour; `promtool test rules` covers the real durations.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use common::*;
use orderflow::app::{codec as codec_for, load_pipelines_and_sagas, orchestrators, processors};
use orderflow::contracts::OrderCreated;
use orderflow::simulate::{self, Behaviour};
use orderflow::telemetry;
use orderflow::telemetry::saga::SagaTelemetry;
use orderflow::telemetry::server::{Readiness, ReadinessChecks};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;
use serde_json::Value;
use tokio::sync::watch;

struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(dir: &Path, target: &str) -> Prometheus {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/monitoring/alerts.rules.yaml"
    ))
    .unwrap();
    let rules: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for: ") {
                format!("{}for: 5s", &l[..l.len() - l.trim_start().len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("rules.yaml"), rules).unwrap();
    std::fs::write(
        dir.join("prometheus.yaml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: orderflow\n    static_configs: [{{targets: ['{target}']}}]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yaml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus is installed by scripts/setup (Debian's package)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn api(prometheus: &Prometheus, path: &str, query: &[(&str, &str)]) -> Value {
    let url = reqwest::Url::parse_with_params(&format!("{}{path}", prometheus.url), query).unwrap();
    let response = reqwest::Client::new().get(url).send().await;
    match response {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn alert_state(prometheus: &Prometheus, name: &str, pipeline: &str) -> Option<String> {
    let alerts = api(prometheus, "/api/v1/alerts", &[]).await;
    alerts["data"]["alerts"].as_array()?.iter().find_map(|a| {
        (a["labels"]["alertname"] == name && a["labels"]["pipeline"] == pipeline)
            .then(|| a["state"].as_str().unwrap_or_default().to_string())
    })
}

async fn query_value(prometheus: &Prometheus, query: &str) -> Option<f64> {
    let result = api(prometheus, "/api/v1/query", &[("query", query)]).await;
    result["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

// ---- the order saga, for sagas.json -----------------------------------------------------------

/// The simulated services behind one address, each call (by URL path and order id) sent to the
/// normal ones, to ones declining every payment (402), or to ones refusing everything (400).
#[derive(Clone)]
struct Fates {
    normal: String,
    declining: String,
    refusing: String,
    chosen: Arc<Mutex<HashMap<(String, String), String>>>,
}

impl Fates {
    async fn start() -> (SocketAddr, Fates) {
        let mut bases = Vec::new();
        for behaviour in [
            Behaviour::default(),
            Behaviour {
                rate_declined: 1.0,
                ..Behaviour::default()
            },
            Behaviour {
                rate_400: 1.0,
                ..Behaviour::default()
            },
        ] {
            // 100-300 ms per call: a saga is in flight for a second or more, over a scrape.
            let behaviour = Behaviour {
                latency_ms: 100..=300,
                ..behaviour
            };
            let (addr, _, _) = simulate::serve("127.0.0.1:0".parse().unwrap(), behaviour)
                .await
                .unwrap();
            bases.push(format!("http://{addr}"));
        }
        let fates = Fates {
            refusing: bases.pop().unwrap(),
            declining: bases.pop().unwrap(),
            normal: bases.pop().unwrap(),
            chosen: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(forward))
            .with_state(fates.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, fates)
    }

    fn set(&self, path: &str, order: &OrderCreated, base: &str) {
        self.chosen.lock().unwrap().insert(
            (path.to_string(), order.data.order_id.to_string()),
            base.to_string(),
        );
    }
}

async fn forward(
    State(fates): State<Fates>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    Json(command): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let order_id = command["data"]["order_id"].as_str().unwrap_or_default();
    let base = (fates.chosen.lock().unwrap())
        .get(&(path.clone(), order_id.to_string()))
        .unwrap_or(&fates.normal)
        .clone();
    let mut request = reqwest::Client::new()
        .post(format!("{base}/{path}"))
        .json(&command);
    if let Some(key) = headers.get("Idempotency-Key") {
        request = request.header("Idempotency-Key", key.to_str().unwrap());
    }
    let response = request.send().await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    (status, Json(response.json().await.unwrap_or(Value::Null)))
}

/// The order saga and the pipelines of its steps and compensations (the repository's files,
/// calling `addr`), in this process, topics under `prefix`.
struct Sagas {
    telemetry: SagaTelemetry,
    readiness: ReadinessChecks,
    dir: PathBuf,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
}

impl Sagas {
    async fn start(prefix: &str, addr: SocketAddr) -> Sagas {
        let dir = saga_dir(addr, |_, text| text);
        let connect = connect(prefix);
        let (pipelines, sagas) = load_pipelines_and_sagas(&dir).unwrap();
        let groups: Vec<&str> = (sagas[0].steps.iter())
            .flat_map(|s| {
                let compensation = s.compensation.as_ref().map(|c| c.pipeline_group.as_str());
                [Some(s.pipeline_group.as_str()), compensation]
            })
            .flatten()
            .collect();
        let pipelines = (pipelines.into_iter())
            .filter(|p| groups.contains(&p.group.as_str()))
            .collect();
        let processors = processors(&connect, pipelines, true).await.unwrap();
        let codec = codec_for(&connect).unwrap();
        let orchestrators = orchestrators(&connect, sagas, codec).await.unwrap();
        let telemetry = orchestrators[0].telemetry();
        let mut readiness: ReadinessChecks = (processors.iter())
            .map(|p| {
                let check: Arc<dyn Readiness> = Arc::new(p.telemetry());
                (format!("saga step {}", p.pipeline().name), check)
            })
            .collect();
        readiness.push(("saga order".into(), Arc::new(telemetry.clone())));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for p in processors {
            tasks.spawn(p.run(stopped.clone()));
        }
        for o in orchestrators {
            tasks.spawn(o.run(stopped.clone()));
        }
        Sagas {
            telemetry,
            readiness,
            dir,
            stop,
            tasks,
        }
    }

    /// Waits until the counters read (confirmed, cancelled, stuck now, ignored as duplicate).
    async fn wait_for(&self, confirmed: u64, cancelled: u64, stuck: u64, within: Duration) {
        let c = self.telemetry.counters();
        let deadline = Instant::now() + within;
        while (c.confirmed.load(Relaxed), c.cancelled.load(Relaxed)) != (confirmed, cancelled)
            || c.stuck_now.load(Relaxed) != stuck
            || c.ignored.load(Relaxed) == 0
        {
            assert!(
                Instant::now() < deadline,
                "sagas: not {confirmed} confirmed, {cancelled} cancelled, {stuck} stuck and one \
                 duplicate ignored within {within:?}: {}",
                self.telemetry.summary()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        self.stop.send(true).unwrap();
        while let Some(result) = self.tasks.join_next().await {
            result.unwrap().unwrap();
        }
        std::fs::remove_dir_all(self.dir).unwrap();
    }
}

/// Each dashboard variable's value in the queries: the payment pipeline of the DLQ scenario, the
/// order saga, all of the rest (`namespace` included: a Prometheus outside Kubernetes attaches
/// none, and `=~".*"` matches the empty label).
fn variable(name: &str) -> &'static str {
    match name {
        "datasource" => "prometheus",
        "pipeline" => "payment",
        "saga" => "order",
        "namespace" | "group" | "topic" | "step" => ".*",
        other => panic!("a dashboard has a new variable ${other}: give it a value here"),
    }
}

/// A panel's query with the dashboard's variables (from its `templating` list) substituted.
fn substituted(board: &Value, expr: &str) -> String {
    let mut expr = expr.replace("$__rate_interval", "1m");
    for v in board["templating"]["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        expr = expr
            .replace(&format!("${{{name}}}"), variable(name))
            .replace(&format!("${name}"), variable(name));
    }
    assert!(!expr.contains('$'), "a variable is left in {expr}");
    expr
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dlq_alert_fires_dashboards_have_data_and_replay_empties_the_dlq() {
    let downstream = Downstream::default();
    let addr = downstream.start().await;
    let dir = std::env::temp_dir().join(format!("it-alerting-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("payment.yaml"),
        format!("name: payment\ngroup: payment\ninputs: [order.created]\nstep:\n  http:\n    url: http://{addr}/payments\n    emit: {{\"2xx\": payment.charged}}\nretry:\n  tiers: [1s, 2s]\n"),
    )
    .unwrap();
    let prefix = prefix("alert");
    let running = Running::start(&prefix, &dir).await;
    // The order saga under its own prefix (its payment pipeline reads payment.charge-requested,
    // not the order.created this test's payment pipeline reads).
    let saga_prefix = common::prefix("alert-saga");
    let (fates_addr, fates) = Fates::start().await;
    let sagas = Sagas::start(&saga_prefix, fates_addr).await;
    let mut processors: ReadinessChecks = running
        .telemetry
        .iter()
        .map(|(n, t)| {
            let check: Arc<dyn Readiness> = Arc::new(t.clone());
            (n.clone(), check)
        })
        .collect();
    processors.extend(sagas.readiness.iter().cloned());
    let (metrics_addr, _server) =
        telemetry::server::serve("127.0.0.1:0".parse().unwrap(), processors)
            .await
            .unwrap();
    let prometheus_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let prometheus = start_prometheus(&prometheus_dir, &metrics_addr.to_string());

    // Prometheus scrapes the processors and the saga before any traffic, so that it sees the
    // counters rise.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_value(
        &prometheus,
        "sum(orderflow_sagas_started_total{saga=\"order\"})",
    )
    .await
        != Some(0.0)
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus does not scrape orderflow"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Traffic touching every path: successes, a transient 503, a service 500 retried once,
    // and poison (400) for the DLQ.
    let (publisher, topic) = publisher(&prefix).await;
    let orders: Vec<OrderCreated> = (0..12).map(|_| OrderCreated::sample("test")).collect();
    for order in &orders[..4] {
        downstream.script("payments", order, &[400]);
    }
    downstream.script("payments", &orders[4], &[503]);
    downstream.script("payments", &orders[5], &[500]);
    for order in &orders {
        publisher.publish(&topic, order).await.unwrap();
    }
    // Sagas: 0-3 confirmed (0 twice: the second start is ignored as a duplicate); 4 and 5 have
    // their payment declined, so the stock is released and they are cancelled; 6 too, but its
    // release is refused (400, dead-lettered), so it is stuck; 7's reservation is refused
    // (dead-lettered step), so it is cancelled with nothing to undo.
    let saga_orders: Vec<OrderCreated> = (0..8).map(|_| OrderCreated::sample("test")).collect();
    for order in &saga_orders[4..7] {
        fates.set("payments", order, &fates.declining);
    }
    fates.set("reservations/release", &saga_orders[6], &fates.refusing);
    fates.set("reservations", &saga_orders[7], &fates.refusing);
    let (saga_publisher, saga_topic) = common::publisher(&saga_prefix).await;
    let saga_start = unix_now();
    for order in saga_orders.iter().chain([&saga_orders[0]]) {
        saga_publisher.publish(&saga_topic, order).await.unwrap();
    }
    running
        .wait_done(&["payment"], 12, Duration::from_secs(30))
        .await;
    sagas.wait_for(4, 3, 1, Duration::from_secs(60)).await;

    // The DLQ alert: pending first, then firing.
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while states.last().map(String::as_str) != Some("firing") {
        assert!(
            Instant::now() < deadline,
            "OrderflowDeadLettersNotEmpty did not fire: states seen {states:?}\n{}",
            std::fs::read_to_string(prometheus_dir.join("prometheus.log")).unwrap_or_default()
        );
        if let Some(state) =
            alert_state(&prometheus, "OrderflowDeadLettersNotEmpty", "payment").await
        {
            if states.last() != Some(&state) {
                states.push(state);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        states,
        ["pending", "firing"],
        "the alert goes pending, then firing"
    );
    let depth =
        format!("sum(orderflow_dlq_depth{{pipeline=\"payment\", group=\"{prefix}payment\"}})");
    assert_eq!(query_value(&prometheus, &depth).await, Some(4.0));

    // Prometheus has the sagas' ends and the stuck one.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (
        query_value(
            &prometheus,
            "sum(orderflow_sagas_ended_total{saga=\"order\"})",
        )
        .await,
        query_value(&prometheus, "sum(orderflow_sagas_stuck{saga=\"order\"})").await,
    ) != (Some(7.0), Some(1.0))
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus lacks the sagas' ends"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A stale saga state: the oldest state record written again (as a fenced replica's late
    // write would be), then a restarted orchestrator loads that partition, for the repeated
    // start of the record's order, and finds a version older than one before it.
    let state_topic = format!("{saga_prefix}saga.order.state");
    let oldest = tokio::task::spawn_blocking(move || read_topic(&state_topic).remove(0))
        .await
        .unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let key = String::from_utf8(oldest.key().unwrap().to_vec()).unwrap();
    producer
        .send(
            BaseRecord::to(oldest.topic())
                .partition(oldest.partition())
                .key(&key)
                .payload(oldest.payload().unwrap()),
        )
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    sagas.stop().await;
    let sagas = Sagas::start(&saga_prefix, fates_addr).await;
    let again = saga_orders
        .iter()
        .find(|o| o.data.order_id.to_string() == key);
    (saga_publisher.publish(&saga_topic, again.unwrap()).await).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while sagas.telemetry.counters().stale.load(Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the restarted orchestrator found no stale state: {}",
            sagas.telemetry.summary()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every panel query of every dashboard parses and returns data now; the sagas' ones also
    // show a real (finite, non-zero) value at some point since the sagas started, as a Grafana
    // panel over that range would.
    let mut checked = HashMap::new();
    for name in [
        "overview.json",
        "retries-dlq.json",
        "pipeline.json",
        "sagas.json",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("grafana/dashboards")
            .join(name);
        let board: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for panel in board["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = substituted(&board, target["expr"].as_str().unwrap());
                let result = api(&prometheus, "/api/v1/query", &[("query", &expr)]).await;
                assert_eq!(
                    result["status"], "success",
                    "{name} / {}: {expr}: {result}",
                    panel["title"]
                );
                let series = result["data"]["result"].as_array().map_or(0, Vec::len);
                assert!(
                    series > 0,
                    "{name} / {} returns no data: {expr}",
                    panel["title"]
                );
                if name == "sagas.json" {
                    let range = api(
                        &prometheus,
                        "/api/v1/query_range",
                        &[
                            ("query", &expr),
                            ("start", &saga_start.to_string()),
                            ("end", &unix_now().to_string()),
                            ("step", "1"),
                        ],
                    )
                    .await;
                    let shown = range["data"]["result"].as_array().is_some_and(|series| {
                        series.iter().any(|s| {
                            s["values"].as_array().unwrap().iter().any(|v| {
                                let v: f64 = v[1].as_str().unwrap().parse().unwrap();
                                v.is_finite() && v != 0.0
                            })
                        })
                    });
                    assert!(
                        shown,
                        "{name} / {} shows nothing but zero or NaN: {expr}: {range}",
                        panel["title"]
                    );
                }
                *checked.entry(name).or_insert(0) += 1;
            }
        }
    }
    eprintln!("panel queries with data, by dashboard: {checked:?}");
    assert_eq!(checked.values().sum::<usize>(), 44, "{checked:?}");

    // The loop closes: the cause is fixed, the dead letters are replayed, the depth is zero.
    let output = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["dlq", "replay", "--pipeline", "payment"])
        .env("ORDERFLOW_TOPIC_PREFIX", &prefix)
        .env("ORDERFLOW_PIPELINES_DIR", &dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("replayed 4 dead letter(s)"));
    let deadline = Instant::now() + Duration::from_secs(40);
    while query_value(&prometheus, &depth).await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the DLQ depth did not return to zero"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while alert_state(&prometheus, "OrderflowDeadLettersNotEmpty", "payment")
        .await
        .is_some()
    {
        assert!(Instant::now() < deadline, "the alert did not resolve");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(running.telemetry["payment"].snapshot().succeeded, 12);
    running.stop().await;
    sagas.stop().await;
    drop(prometheus);
    std::fs::remove_dir_all(dir).unwrap();
}
