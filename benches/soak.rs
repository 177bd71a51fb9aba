//! The soak benchmark (issue 19, cost that does not grow with history): a long steady stream
//! through `orderflow run` (the binary cargo built for this bench: release under `cargo bench`)
//! as its own process, dedup on, with a short dedup window on a fresh PostgreSQL database
//! created for the run (so the dedup table is created with the width that follows the short
//! window) and dropped after. The processor expires its own partitions, as in production
//! (every quarter partition: `retention::period`); nothing here expires anything.
//!
//!     eval "$(scripts/stack up)" && cargo bench --bench soak
//!
//! The pipeline routes every `order.created` to one topic (`route`, dedup on). This process
//! publishes ORDERFLOW_BENCH_SOAK_RATE events/s (default 300) for ORDERFLOW_BENCH_SOAK_SECONDS
//! (300), every 25th event followed by a copy of an event published ten before (a duplicate
//! within the window, which must be skipped), with ORDERFLOW_DEDUP_RETENTION set to
//! ORDERFLOW_BENCH_SOAK_WINDOW (60s; below the setting's 1 min minimum the bench-only
//! ORDERFLOW_BENCH_SHORT_WINDOWS=1 is set, which changes nothing but that bound).
//!
//! The same `order.created` events start the order saga (`pipelines/sagas/order.yaml`): its
//! orchestrator runs as a process of its own (`orderflow run order`) with
//! ORDERFLOW_SAGA_RETENTION set to the same window, so sagas start, finish and expire during the
//! run. Its steps run in a third process (`orderflow run inventory inventory-release payment
//! payment-refund shipping --no-dedup`: their marks would share the soak's dedup table) against
//! `orderflow simulate` (a fourth, 0 ms, no failures). Every saga confirms; a copy of an order
//! starts no second saga.
//!
//! Every ORDERFLOW_BENCH_SOAK_SAMPLE seconds (5) it samples: the processor's RSS (/proc), the
//! dedup table's rows (`count(*)`) and partitions, and from the processor's /metrics the
//! cumulative `orderflow_dedup_seen_seconds` buckets, the events handled and skipped, the
//! partitions dropped; the orchestrator's RSS and, from its /metrics, the saga states held (live,
//! finished), sagas started and ended, saga states expired. `scripts/bench-report` computes the
//! quantiles, first vs last span and the verdict.
//!
//! A processor, orchestrator, step process or simulator that exits, an event not handled (or a
//! duplicate not skipped) within 120 s of the stream's end, or a run longer than two windows in
//! which no partition was dropped or no saga state expired fails the run: no figure is recorded.
//! The JSON goes to the file ORDERFLOW_BENCH_JSON (else stdout).

mod common;

use common::{env_or, free_port, metrics, orderflow_run, rss_mib, total, Process};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::app::Connect;
use orderflow::contracts::{Catalog, EventCodec, OrderCreated};
use orderflow::database::retention;
use orderflow::kafka::Publisher;
use orderflow::saga::retention as saga_retention;
use orderflow::simulate;
use serde_json::{json, Value};

async fn psql(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to PostgreSQL: {e}"));
    tokio::spawn(connection);
    client
}

/// The fresh database of one run: created at start, dropped (connections and all) on drop.
struct FreshDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl FreshDatabase {
    async fn create(admin_url: &str) -> FreshDatabase {
        let name = format!(
            "orderflow_soak_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        psql(admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("creating the soak's database {name}: {e}"));
        FreshDatabase {
            admin_url: admin_url.to_string(),
            url: orderflow::database::url_of_database(admin_url, &name),
            name,
        }
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Dropped from a thread of its own: this may run inside the runtime.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                psql(&admin)
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("soak: could not drop database {}: {dropped:?}", self.name);
        }
    }
}

/// The step pipelines of the order saga (`pipelines/*.yaml`), run in one process.
const STEPS: [&str; 5] = [
    "inventory",
    "inventory-release",
    "payment",
    "payment-refund",
    "shipping",
];

/// The `seen` histogram's cumulative buckets, `[upper bound in seconds, count]`, +Inf last.
fn seen_buckets(metrics: &HashMap<String, f64>) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("orderflow_dedup_seen_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// What the dedup table holds now: exact rows and partitions.
async fn table(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM orderflow_processed), \
             (SELECT count(*) FROM pg_inherits WHERE inhparent = 'orderflow_processed'::regclass)",
            &[],
        )
        .await
        .expect("counting the dedup table");
    (row.get(0), row.get(1))
}

fn main() {
    // As the binary does: measured with the same memory from the kernel.
    orderflow::allocator::without_transparent_huge_pages();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(soak());
    common::write_result(&result);
}

async fn soak() -> Value {
    let rate = env_or("ORDERFLOW_BENCH_SOAK_RATE", 300);
    let seconds = env_or("ORDERFLOW_BENCH_SOAK_SECONDS", 300);
    let sample_every = env_or("ORDERFLOW_BENCH_SOAK_SAMPLE", 5);
    let window_text = std::env::var("ORDERFLOW_BENCH_SOAK_WINDOW").unwrap_or_else(|_| "60s".into());
    let window = humantime::parse_duration(&window_text).expect("ORDERFLOW_BENCH_SOAK_WINDOW");
    let prefix = format!(
        "bench-soak-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let connect = Connect::local(&prefix);
    let database = FreshDatabase::create(&connect.database_url).await;
    let dir = std::env::temp_dir().join(format!("bench-soak-{}", &prefix[11..19]));
    std::fs::create_dir_all(dir.join("sagas")).unwrap();
    std::fs::write(
        dir.join("soak.yaml"),
        "name: soak\ngroup: soak\ninputs: [order.created]\nstep: {route: {to: [soak.orders]}}\n",
    )
    .unwrap();
    // The order saga and its steps, as the repository defines them.
    let repo = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines"));
    for file in STEPS
        .iter()
        .map(|s| format!("{s}.yaml"))
        .chain(["sagas/order.yaml".into()])
    {
        std::fs::copy(repo.join(&file), dir.join(&file))
            .unwrap_or_else(|e| panic!("copying pipelines/{file}: {e}"));
    }
    let run = |args: &[&str], port: u16| {
        let mut command = orderflow_run(&connect, &dir, args, port);
        command
            .env("ORDERFLOW_DATABASE_URL", &database.url)
            .env(retention::DEDUP_SETTING, &window_text)
            .env(saga_retention::SETTING, &window_text);
        if window < retention::MIN_SETTING {
            command.env(retention::SHORT_WINDOWS_SETTING, "1");
        }
        command
    };
    let client = reqwest::Client::new();

    // The downstreams, then the orchestrator (it creates the saga's topics), its steps, and
    // the processor measured.
    let sim_port = free_port();
    let simulator = Process::simulate("0ms", sim_port).await;
    let orchestrator_port = free_port();
    let orchestrator = Process::spawn(
        "orderflow run order",
        &mut run(&["run", "order"], orchestrator_port),
    );
    orchestrator.ready(&client, orchestrator_port, &[]).await;
    let steps_port = free_port();
    let mut steps_command = run(&[&["run", "--no-dedup"][..], &STEPS].concat(), steps_port);
    for (var, url) in simulate::pipeline_url_env(&format!("http://127.0.0.1:{sim_port}")) {
        steps_command.env(var, url);
    }
    let steps = Process::spawn("orderflow run (saga steps)", &mut steps_command);
    steps.ready(&client, steps_port, &[&orchestrator]).await;
    let port = free_port();
    let processor = Process::spawn("orderflow run soak", &mut run(&["run", "soak"], port));
    processor
        .ready(&client, port, &[&orchestrator, &steps, &simulator])
        .await;
    let alive = || {
        for p in [&processor, &orchestrator, &steps, &simulator] {
            p.alive();
        }
    };
    let (pid, orchestrator_pid) = (processor.pid(), orchestrator.pid());
    let db = psql(&database.url).await;
    let bucket_seconds: i64 = db
        .query_one(
            "SELECT bucket_seconds FROM orderflow_retention WHERE table_name = 'orderflow_processed'",
            &[],
        )
        .await
        .expect("the processor created the dedup table")
        .get(0);
    eprintln!(
        "soak: {rate} events/s for {seconds} s, dedup window {window_text}, partitions of {bucket_seconds} s, database {}",
        database.name
    );

    // The stream, in a task of its own; this one samples.
    let catalog = Arc::new(Catalog::load(&connect.schemas_dir).unwrap());
    let codec = Arc::new(
        EventCodec::with_naming(&connect.registry_url, catalog, connect.naming()).unwrap(),
    );
    let publisher = Arc::new(Publisher::new(&connect.bootstrap_servers, codec).unwrap());
    let topic = connect.naming().topic("order.created");
    let started = Instant::now();
    let stream = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        let mut recent: Vec<OrderCreated> = Vec::new();
        let (mut published, mut copies) = (0u64, 0u64);
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..rate * seconds {
            tick.tick().await;
            let order = OrderCreated::sample("soak");
            recent.push(order.clone());
            let mut send = vec![order];
            if i % 25 == 24 {
                send.push(recent[recent.len() - 11].clone());
                copies += 1;
            }
            if recent.len() > 20 {
                recent.remove(0);
            }
            published += 1;
            for order in send {
                let (publisher, topic) = (publisher.clone(), topic.clone());
                pending.spawn(async move {
                    publisher
                        .publish(&topic, &order)
                        .await
                        .expect("publishing the stream")
                });
            }
            while pending.try_join_next().is_some() {}
        }
        while let Some(done) = pending.join_next().await {
            done.unwrap();
        }
        (published, copies)
    });

    let mut samples = Vec::new();
    let mut next = Duration::ZERO;
    let (published, copies) = loop {
        next += Duration::from_secs(sample_every);
        tokio::time::sleep_until((started + next).into()).await;
        alive();
        let m = metrics(&client, port)
            .await
            .expect("the processor's /metrics answers");
        let o = metrics(&client, orchestrator_port)
            .await
            .expect("the orchestrator's /metrics answers");
        let (rows, partitions) = table(&db).await;
        let sample = json!({
            "t": started.elapsed().as_secs_f64(),
            "rss_mib": rss_mib(pid),
            "rows": rows,
            "partitions": partitions,
            "handled": total(&m, "orderflow_events_processed_total", "outcome=\"succeeded\""),
            "duplicates": total(&m, "orderflow_events_processed_total", "outcome=\"duplicate\""),
            "partitions_dropped": total(&m, "orderflow_retention_partitions_dropped_total", "orderflow_processed\""),
            "seen_buckets": seen_buckets(&m),
            "orchestrator_rss_mib": rss_mib(orchestrator_pid),
            "sagas_live": total(&o, "orderflow_saga_states_held", "status=\"live\""),
            "sagas_finished": total(&o, "orderflow_saga_states_held", "status=\"finished\""),
            "sagas_started": total(&o, "orderflow_sagas_started_total", "saga=\"order\""),
            "sagas_ended": total(&o, "orderflow_sagas_ended_total", "saga=\"order\""),
            "saga_states_expired": total(&o, "orderflow_saga_states_expired_total", "saga=\"order\""),
        });
        eprintln!(
            "  t {:>5.0} s  rss {:>6.1} MiB  rows {:>7}  partitions {:>3}  handled {:>8}  \
             | orchestrator rss {:>6.1} MiB  held live {:>5} finished {:>6}  started {:>7} ended {:>7} expired {:>7}",
            sample["t"].as_f64().unwrap(),
            sample["rss_mib"].as_f64().unwrap_or(0.0),
            rows,
            partitions,
            sample["handled"],
            sample["orchestrator_rss_mib"].as_f64().unwrap_or(0.0),
            sample["sagas_live"],
            sample["sagas_finished"],
            sample["sagas_started"],
            sample["sagas_ended"],
            sample["saga_states_expired"],
        );
        samples.push(sample);
        if stream.is_finished() {
            break stream.await.expect("the stream");
        }
    };
    // Everything published is handled, every copy skipped.
    let limit = Instant::now() + Duration::from_secs(120);
    let last = loop {
        alive();
        let m = metrics(&client, port).await.expect("/metrics");
        let handled = total(
            &m,
            "orderflow_events_processed_total",
            "outcome=\"succeeded\"",
        );
        let skipped = total(
            &m,
            "orderflow_events_processed_total",
            "outcome=\"duplicate\"",
        );
        if handled as u64 >= published && skipped as u64 >= copies {
            break m;
        }
        assert!(
            Instant::now() < limit,
            "120 s after the stream: {handled} of {published} handled, {skipped} of {copies} copies skipped"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let handled = total(
        &last,
        "orderflow_events_processed_total",
        "outcome=\"succeeded\"",
    );
    let skipped = total(
        &last,
        "orderflow_events_processed_total",
        "outcome=\"duplicate\"",
    );
    assert_eq!(
        (handled as u64, skipped as u64),
        (published, copies),
        "each event handled once, each copy skipped"
    );
    let dropped = total(
        &last,
        "orderflow_retention_partitions_dropped_total",
        "orderflow_processed\"",
    );
    if started.elapsed() > 2 * window {
        assert!(
            dropped > 0.0,
            "no partition dropped in {:?} with a {window_text} window",
            started.elapsed()
        );
    }
    let o = metrics(&client, orchestrator_port)
        .await
        .expect("the orchestrator's /metrics answers");
    let started_sagas = total(&o, "orderflow_sagas_started_total", "saga=\"order\"");
    let ended_sagas = total(&o, "orderflow_sagas_ended_total", "saga=\"order\"");
    let expired = total(&o, "orderflow_saga_states_expired_total", "saga=\"order\"");
    assert!(started_sagas > 0.0, "no saga started");
    if started.elapsed() > 2 * window {
        assert!(
            expired > 0.0,
            "no saga state expired in {:?} with a {window_text} window",
            started.elapsed()
        );
    }
    alive();
    drop(processor);
    drop(steps);
    drop(orchestrator);
    drop(simulator);
    drop(db);
    drop(database);
    let _ = std::fs::remove_dir_all(&dir);
    json!({
        "rate": rate,
        "seconds": seconds,
        "window_seconds": window.as_secs_f64(),
        "bucket_seconds": bucket_seconds,
        "expiry_period_seconds": retention::period(Duration::from_secs(bucket_seconds as u64).min(window)).as_secs_f64(),
        "sample_every_seconds": sample_every,
        "published": published,
        "duplicates_published": copies,
        "handled": handled,
        "duplicates_skipped": skipped,
        "partitions_dropped": dropped,
        "orchestrator": {
            "saga": "order",
            "retention_seconds": window.as_secs_f64(),
            "steps": STEPS,
            "sagas_started": started_sagas,
            "sagas_ended": ended_sagas,
            "saga_states_expired": expired,
        },
        "samples": samples,
    })
}
