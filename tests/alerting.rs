//! The operator's loop against a real Prometheus (Debian's package): processors serve /metrics,
//! Prometheus scrapes them with orderflow's alert rules loaded, poison events fill a
//! dead-letter topic, the DLQ alert goes pending then firing, every dashboard panel's query
//! returns data, and after a replay the DLQ depth is back to zero.
//!
//! The rules are the shipped ones with every `for:` shortened to 5 s so the test does not wait
//! an hour; `promtool test rules` covers the real durations.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use orderflow::contracts::OrderCreated;
use orderflow::telemetry;
use serde_json::Value;

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let processors: telemetry::server::ReadinessChecks = running
        .telemetry
        .iter()
        .map(|(n, t)| {
            let check: std::sync::Arc<dyn telemetry::server::Readiness> =
                std::sync::Arc::new(t.clone());
            (n.clone(), check)
        })
        .collect();
    let (metrics_addr, _server) =
        telemetry::server::serve("127.0.0.1:0".parse().unwrap(), processors)
            .await
            .unwrap();
    let prometheus_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let prometheus = start_prometheus(&prometheus_dir, &metrics_addr.to_string());

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
    running
        .wait_done(&["payment"], 12, Duration::from_secs(30))
        .await;

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

    // Every panel of every dashboard parses and returns data.
    let mut checked = 0;
    for name in ["overview.json", "retries-dlq.json", "pipeline.json"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("grafana/dashboards")
            .join(name);
        let board: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for panel in board["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$pipeline", "payment")
                    .replace("$group", ".*")
                    .replace("$topic", ".*")
                    .replace("$__rate_interval", "1m");
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
                checked += 1;
            }
        }
    }
    assert!(checked >= 24, "{checked} panel queries checked");

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
    drop(prometheus);
    std::fs::remove_dir_all(dir).unwrap();
}
