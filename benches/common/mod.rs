//! Helpers every benchmark binary shares: settings from the environment, where the result goes,
//! a free local port, a process's resident memory, processes spawned for a run and their
//! `/metrics`. No benchmark logic lives here.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The setting `name` from the environment, or `default` when unset or unreadable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes a benchmark's result as JSON to the file ORDERFLOW_BENCH_JSON (`scripts/bench` sets
/// it), else to stdout.
pub fn write_result(result: &serde_json::Value) {
    let text = serde_json::to_string_pretty(result).unwrap();
    match std::env::var("ORDERFLOW_BENCH_JSON") {
        Ok(path) => std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {path}: {e}")),
        Err(_) => println!("{text}"),
    }
}

/// Publishes `count` fresh `order.created` events (source `source`) to `connect`'s prefix, 2,000
/// at a time; panics on any failed write.
pub async fn publish_orders(connect: &orderflow::app::Connect, count: usize, source: &str) {
    use orderflow::contracts::{Catalog, EventCodec, OrderCreated};
    let catalog = std::sync::Arc::new(Catalog::load(&connect.schemas_dir).unwrap());
    let codec = std::sync::Arc::new(
        EventCodec::with_naming(&connect.registry_url, catalog, connect.naming()).unwrap(),
    );
    let publisher = orderflow::kafka::Publisher::new(&connect.bootstrap_servers, codec).unwrap();
    let topic = connect.naming().topic("order.created");
    for start in (0..count).step_by(2000) {
        let orders: Vec<OrderCreated> = (start..count.min(start + 2000))
            .map(|_| OrderCreated::sample(source))
            .collect();
        for result in
            futures::future::join_all(orders.iter().map(|o| publisher.publish(&topic, o))).await
        {
            result.expect("publishing the input");
        }
    }
}

/// A local TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resident memory of process `pid` in MiB (from /proc), if it is readable.
pub fn rss_mib(pid: u32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|kb| kb / 1024.0)
}

/// `orderflow <args>` (the binary cargo built for the bench: release under `cargo bench`) on
/// `connect`'s stack and topic prefix, with the pipeline files of `pipelines`, serving /metrics
/// on local `port`, logging warnings only and no periodic report.
pub fn orderflow_run(
    connect: &orderflow::app::Connect,
    pipelines: &Path,
    args: &[&str],
    port: u16,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    command
        .args(args)
        .args(["--report-every", "0s"])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("ORDERFLOW_PIPELINES_DIR", pipelines)
        .env("ORDERFLOW_TOPIC_PREFIX", &connect.topic_prefix)
        .env("ORDERFLOW_BOOTSTRAP_SERVERS", &connect.bootstrap_servers)
        .env("ORDERFLOW_REGISTRY_URL", &connect.registry_url)
        .env("ORDERFLOW_SCHEMAS_DIR", &connect.schemas_dir)
        .env("ORDERFLOW_DATABASE_URL", &connect.database_url)
        .env("ORDERFLOW_LOG", "warn");
    command
}

/// A process a benchmark runs, its stderr to a log file: stopped on drop (SIGTERM, then waits), so a
/// failed run leaves no process behind.
pub struct Process {
    name: &'static str,
    child: Child,
    log: std::path::PathBuf,
}

impl Process {
    pub fn spawn(name: &'static str, command: &mut Command) -> Process {
        let log = std::env::temp_dir().join(format!(
            "bench-{}.log",
            name.trim_start_matches("orderflow ")
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
                .trim_matches('-')
        ));
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Process { name, child, log }
    }

    /// `orderflow simulate` answering each call after `latency` (`50ms..50ms`, `0ms`) on local
    /// `port`, once it listens (30 s at most).
    pub async fn simulate(latency: &str, port: u16) -> Process {
        let simulator = Process::spawn(
            "orderflow simulate",
            Command::new(env!("CARGO_BIN_EXE_orderflow"))
                .args(["simulate", "--latency", latency])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env("ORDERFLOW_LOG", "warn"),
        );
        let limit = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            simulator.alive();
            assert!(
                Instant::now() < limit,
                "orderflow simulate not listening in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        simulator
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics when the process has exited (gone, or a zombie not yet waited for).
    pub fn alive(&self) {
        let running =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).is_ok_and(|stat| {
                // "pid (comm) STATE ...": the state follows the last parenthesis.
                !stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            });
        assert!(
            running,
            "{} exited (log: {})",
            self.name,
            self.log.display()
        );
    }

    /// Waits (90 s at most) for its /readyz, checking it and `others` are alive meanwhile.
    pub async fn ready(&self, client: &reqwest::Client, port: u16, others: &[&Process]) {
        let each = || others.iter().for_each(|p| p.alive());
        self.ready_every(client, port, Duration::from_millis(200), each)
            .await;
    }

    /// Waits (90 s at most) for its /readyz, checking it is alive and calling `each` every
    /// `period` meanwhile.
    pub async fn ready_every(
        &self,
        client: &reqwest::Client,
        port: u16,
        period: Duration,
        mut each: impl FnMut(),
    ) {
        let limit = Instant::now() + Duration::from_secs(90);
        while !client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            self.alive();
            each();
            assert!(Instant::now() < limit, "{} not ready in 90 s", self.name);
            tokio::time::sleep(period).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The samples of one `/metrics` text: `name{labels}` to value (comments skipped).
pub fn scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `name` whose labels contain `label` (e.g. `outcome="duplicate"`).
pub fn total(metrics: &HashMap<String, f64>, name: &str, label: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

/// The samples of the `/metrics` served on local `port`, if it answers.
pub async fn metrics(client: &reqwest::Client, port: u16) -> Option<HashMap<String, f64>> {
    let r = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?;
    Some(scrape(&r.text().await.ok()?))
}
