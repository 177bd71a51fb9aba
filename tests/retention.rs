//! Retention against real PostgreSQL (a throwaway server of each test's own, tests/pg, so the
//! shared stack's tables are never migrated or expired by a test) and, for the intake, the
//! stack's Kafka and registry. Invariant kept by every test: waits have deadlines (poll until a
//! condition holds or the deadline passes), never a sleep followed by an assertion.
//!
//! - a duplicate within the dedup window is skipped, one past it is handled again, and the
//!   window is exact before any partition is dropped;
//! - a pipeline with its own, shorter window handles a duplicate past that window again while
//!   another pipeline (the global window) skips it; a pipeline window longer than the global one
//!   is refused at start, naming both settings;
//! - expiry drops whole partitions (no row is ever deleted) while marks are being written, and
//!   every mark within the window stays seen throughout;
//! - a table of an earlier version is read after the migration, then dropped whole;
//! - an intake key past its retention places a new order; expired keys are deleted;
//! - the read model deletes finished orders past their window, never an order in flight;
//! - settings out of bounds are refused, naming the setting.

mod common;
mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use orderflow::database::retention::{self, DedupRetention};
use orderflow::database::Database;
use orderflow::runtime::dedup::DedupStore;
use uuid::Uuid;

/// Polls `check` every 100 ms until it gives Some, failing at `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn psql(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

fn short(window_secs: u64, bucket_secs: u64) -> DedupRetention {
    DedupRetention::new(
        Duration::from_secs(window_secs),
        Duration::from_secs(bucket_secs),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_within_the_window_is_skipped_and_one_past_it_is_handled_again() {
    let server = pg::Pg::start().await;
    // Daily partitions: nothing can be dropped during the test, so only `seen` makes it exact.
    let window = Duration::from_secs(3);
    let store = DedupStore::with_retention(
        &server.url,
        DedupRetention::new(window, retention::DEFAULT_BUCKET).unwrap(),
    )
    .await
    .unwrap();
    let group = "it-retention";
    let id = Uuid::now_v7();
    let before_mark = Instant::now();
    store.mark(group, id).await.unwrap();
    assert!(
        store.seen(group, id).await.unwrap(),
        "a duplicate within the window is skipped"
    );
    assert!(!store.seen("another-group", id).await.unwrap());
    let past = wait_for(
        "the mark to pass its window",
        Duration::from_secs(20),
        || async { (!store.seen(group, id).await.unwrap()).then(Instant::now) },
    )
    .await;
    assert!(
        past - before_mark >= window,
        "the mark stopped counting {:?} after it was made, before its window {window:?}",
        past - before_mark
    );
    // Its row is still there (its partition is today's): only the window decided.
    let db = psql(&server.url).await;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM orderflow_processed WHERE event_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    // Handled again, then marked again: a duplicate of it is skipped again.
    store.mark(group, id).await.unwrap();
    assert!(store.seen(group, id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_with_a_shorter_window_handles_a_duplicate_past_it_again() {
    use orderflow::contracts::OrderCreated;
    let server = pg::Pg::start().await;
    let prefix = common::prefix("retention-pipeline-window");
    let mut connect = common::connect(&prefix);
    connect.database_url = server.url.clone();
    let dir = common::pipeline_files(&[
        (
            "short.yaml",
            "name: short\ngroup: short\ninputs: [order.created]\nstep: {route: {to: [short.out]}}\n",
        ),
        (
            "global.yaml",
            "name: global\ngroup: global\ninputs: [order.created]\nstep: {route: {to: [global.out]}}\n",
        ),
    ]);
    let mut pipelines =
        orderflow::pipeline::load_dir(&dir, &orderflow::steps::HANDLER_NAMES).unwrap();
    // Longer than the global window (7 days by default): refused at start, naming both.
    let mut too_long = pipelines.clone();
    too_long[0].dedup_retention = Some(Duration::from_secs(8 * 86_400));
    let e = orderflow::app::processors(&connect, too_long, true)
        .await
        .err()
        .expect("a pipeline window longer than the global one is refused")
        .to_string();
    assert!(
        e.contains("dedup_retention") && e.contains("ORDERFLOW_DEDUP_RETENTION"),
        "{e}"
    );
    // A pipeline file's window is at least a minute; the runtime takes any shorter one.
    let window = Duration::from_secs(3);
    for p in pipelines.iter_mut().filter(|p| p.name == "short") {
        p.dedup_retention = Some(window);
    }
    let processors = orderflow::app::processors(&connect, pipelines, true)
        .await
        .unwrap();
    let telemetry: std::collections::HashMap<String, _> = processors
        .iter()
        .map(|p| (p.pipeline().name.clone(), p.telemetry()))
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for p in processors {
        tasks.spawn(p.run(stopped.clone()));
    }
    // Both pipelines have ended `n` inputs (handled or skipped as duplicates).
    let ended = |n: u64| {
        let telemetry = telemetry.clone();
        move || {
            let telemetry = telemetry.clone();
            async move {
                telemetry
                    .values()
                    .all(|t| {
                        let s = t.snapshot();
                        s.succeeded + s.duplicates >= n
                    })
                    .then_some(())
            }
        }
    };
    let (publisher, topic) = common::publisher(&prefix).await;
    let order = OrderCreated::sample("retention");
    let first = Instant::now();
    publisher.publish(&topic, &order).await.unwrap();
    wait_for("the first copy", Duration::from_secs(60), ended(1)).await;
    // The same event again, as often as needed until the short window has passed.
    let mut sent = 1;
    let again = loop {
        publisher.publish(&topic, &order).await.unwrap();
        sent += 1;
        wait_for("a copy to be ended", Duration::from_secs(30), ended(sent)).await;
        if telemetry["short"].snapshot().succeeded == 2 {
            break first.elapsed();
        }
        assert!(
            first.elapsed() < Duration::from_secs(30),
            "the short pipeline skipped every copy for 30 s"
        );
        // Pacing between copies, not a wait for a result.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let short = telemetry["short"].snapshot();
    let global = telemetry["global"].snapshot();
    assert!(
        sent >= 3,
        "a copy within the short window was sent and skipped"
    );
    assert_eq!(short.duplicates, sent - 2, "{short:?}");
    assert!(
        again >= window,
        "handled again after {again:?}, within {window:?}"
    );
    assert_eq!(
        (global.succeeded, global.duplicates),
        (1, sent - 1),
        "the global window skips every copy"
    );
    stop.send(true).unwrap();
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
}

/// Names of the dedup table's partitions.
async fn partition_names(db: &tokio_postgres::Client) -> HashSet<String> {
    db.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'orderflow_processed'::regclass",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_drops_whole_partitions_and_never_a_mark_within_the_window() {
    let server = pg::Pg::start().await;
    let (window, bucket) = (3, 1);
    let store = Arc::new(
        DedupStore::with_retention(&server.url, short(window, bucket))
            .await
            .unwrap(),
    );
    let db = psql(&server.url).await;
    let first = partition_names(&db).await;
    assert!(!first.is_empty(), "partitions are created ahead");

    // Writers mark batches and check at once that each is seen; expiry runs beside them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..3 {
        let (store, stop) = (store.clone(), stop.clone());
        writers.spawn(async move {
            let group = format!("it-writer-{w}");
            let mut recent: Vec<(Instant, Uuid)> = Vec::new();
            let mut marked = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ids: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
                store.mark_many(&group, &ids).await.unwrap();
                let at = Instant::now();
                marked += ids.len();
                recent.extend(ids.iter().map(|id| (at, *id)));
                // Every mark made less than (window - 1 s) ago must still count.
                recent.retain(|(t, _)| t.elapsed() < Duration::from_secs(window - 1));
                for (_, id) in recent.iter().step_by(17) {
                    assert!(
                        store.seen(&group, *id).await.unwrap(),
                        "a mark within the window was expired"
                    );
                }
            }
            marked
        });
    }
    let dropped = wait_for(
        "expiry to drop partitions older than the window",
        Duration::from_secs(30),
        || async {
            // A run that could not take its lock in time is retried.
            let e = store.expire_now().await.ok()?;
            let gone: HashSet<String> = first
                .difference(&partition_names(&db).await)
                .cloned()
                .collect();
            // Two buckets dropped while the writers went on.
            (gone.len() >= 2 && !e.skipped).then_some(gone)
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    while let Some(marked) = writers.join_next().await {
        total += marked.unwrap();
    }
    assert!(total > 0);
    // Whole tables went away; no row of any remaining partition was ever deleted.
    for name in &dropped {
        let exists: bool = db
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[name])
            .await
            .unwrap()
            .get(0);
        assert!(!exists, "{name} was dropped");
    }
    let deleted: i64 = db
        .query_one(
            "SELECT coalesce(sum(pg_stat_get_tuples_deleted(i.inhrelid)), 0)::int8 FROM pg_inherits i \
             WHERE i.inhparent = 'orderflow_processed'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deleted, 0, "expiry never deletes rows");
    // What is held follows the window: at most window/bucket partitions behind now, 3 ahead.
    let held = retention::partitions(&db).await.unwrap();
    assert!(
        held.len() as u64 <= window / bucket + 3 + 3,
        "{} partitions held: {:?}",
        held.len(),
        held.iter().map(|p| &p.name).collect::<Vec<_>>()
    );
    let metrics = orderflow::telemetry::metrics::encode();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "orderflow_retention_partitions_dropped_total{table=\"orderflow_processed\"}"
        )),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orderflow_retention_rows{table=\"orderflow_processed\"}")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_earlier_versions_table_is_read_after_the_migration_then_dropped_whole() {
    let server = pg::Pg::start().await;
    let db = psql(&server.url).await;
    // The table as earlier versions created it, with one mark.
    db.batch_execute(
        "CREATE TABLE orderflow_processed (
            consumer_group text NOT NULL,
            event_id uuid NOT NULL,
            processed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer_group, event_id)
        )",
    )
    .await
    .unwrap();
    let old = Uuid::now_v7();
    db.execute(
        "INSERT INTO orderflow_processed (consumer_group, event_id) VALUES ('g', $1)",
        &[&old],
    )
    .await
    .unwrap();
    let store = DedupStore::with_retention(&server.url, short(3, 1))
        .await
        .unwrap();
    assert!(
        store.seen("g", old).await.unwrap(),
        "a mark made before the migration still counts"
    );
    let new = Uuid::now_v7();
    store.mark("g", new).await.unwrap();
    let legacy_rows: i64 = db
        .query_one("SELECT count(*) FROM orderflow_processed_legacy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(legacy_rows, 1, "nothing is written to the legacy table");
    // A second store (another replica) does not migrate again.
    let other = DedupStore::with_retention(&server.url, short(3, 1))
        .await
        .unwrap();
    assert!(other.seen("g", new).await.unwrap() && other.seen("g", old).await.unwrap());
    wait_for(
        "the legacy table to be dropped one window after the migration",
        Duration::from_secs(20),
        // The stores' own periodic expiry may be the one that drops it.
        || async {
            store.expire_now().await.ok()?;
            let exists: bool = db
                .query_one(
                    "SELECT to_regclass('orderflow_processed_legacy') IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (!exists).then_some(())
        },
    )
    .await;
    // Both stores go on without it (the other one learns it is gone from its query).
    let next = Uuid::now_v7();
    other.mark("g", next).await.unwrap();
    assert!(other.seen("g", next).await.unwrap());
    assert!(store.seen("g", next).await.unwrap());
    assert!(!other.seen("g", old).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_read_model_deletes_finished_orders_past_their_window_never_one_in_flight() {
    let server = pg::Pg::start().await;
    let database = Database::connect(&server.url).await.unwrap();
    let db = psql(&server.url).await;
    let now_ms = orderflow::contracts::events::now_millis();
    let day = 86_400_000i64;
    let rows = [
        ("confirmed", now_ms - 40 * day, true),
        ("cancelled", now_ms - 31 * day, true),
        ("confirmed", now_ms - 29 * day, false),
        // In flight for long (stuck): never deleted by retention.
        ("processing", now_ms - 90 * day, false),
        ("cancelling", now_ms - 90 * day, false),
        ("placed", now_ms - 90 * day, false),
    ];
    let mut expected_gone = HashSet::new();
    let mut ids = Vec::new();
    for (status, since, gone) in rows {
        let id = Uuid::now_v7();
        db.execute(
            "INSERT INTO orderflow_order_status (order_id, status, version, sources, last_event_at, projected_at, status_since) \
             VALUES ($1, $2, 1, '{}', $3, $3, $3)",
            &[&id, &status, &since],
        )
        .await
        .unwrap();
        if gone {
            expected_gone.insert(id);
        }
        ids.push(id);
    }
    let window = Duration::from_secs(30 * 86_400);
    let deleted = orderflow::projection::expire_finished(&database, window)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    for id in ids {
        let there = db
            .query_opt(
                "SELECT 1 FROM orderflow_order_status WHERE order_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .is_some();
        assert_eq!(there, !expected_gone.contains(&id), "{id}");
    }
    assert_eq!(
        orderflow::projection::expire_finished(&database, window)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_intake_key_past_its_retention_places_a_new_order() {
    use orderflow::intake::{self, Intake};
    let server = pg::Pg::start().await;
    let prefix = common::prefix("retention-intake");
    let (codec, topic) = common::codec(&prefix);
    let publisher = orderflow::kafka::Publisher::with_settings(
        &common::bootstrap(),
        codec,
        intake::PRODUCER_SETTINGS,
    )
    .unwrap();
    orderflow::kafka::ensure_topics(&common::bootstrap(), &[(&topic, 1)], 1)
        .await
        .unwrap();
    let window = Duration::from_secs(3);
    let intake = Intake::new(publisher, topic.clone(), &server.url)
        .await
        .unwrap()
        .with_key_retention(window)
        .unwrap();
    let database = Database::connect(&server.url).await.unwrap();
    let (addr, _server) = intake::serve("127.0.0.1:0".parse().unwrap(), intake)
        .await
        .unwrap();
    let url = format!("http://{addr}/orders");
    let body = serde_json::json!({
        "customer_id": "customer-42",
        "items": [{"sku": "SKU-CABLE", "quantity": 1, "unit_price": {"amount_minor": 799, "currency": "EUR"}}],
        "shipping_address": {"line1": "1 Market Street", "line2": null, "city": "Berlin", "postal_code": "10115", "country": "DE"}
    });
    let http = reqwest::Client::new();
    let post = |key: &'static str| {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        async move {
            let r = http
                .post(&url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let v: serde_json::Value = r.json().await.unwrap();
            v["order_id"].as_str().unwrap().to_string()
        }
    };
    let before = Instant::now();
    let first = post("retry-me").await;
    assert_eq!(post("retry-me").await, first, "a retry within the window");
    let (second, at) = wait_for("the key to expire", Duration::from_secs(30), || async {
        let id = post("retry-me").await;
        (id != first).then(|| (id, Instant::now()))
    })
    .await;
    assert!(at - before >= window, "expired after {:?}", at - before);
    assert_eq!(
        post("retry-me").await,
        second,
        "the new order holds the key now"
    );
    // Expiry deletes a key past its window (in batches), never one within it.
    post("forgotten").await;
    let keys = |client: tokio_postgres::Client| async move {
        client
            .query("SELECT idempotency_key FROM orderflow_intake", &[])
            .await
            .unwrap()
            .iter()
            .any(|r| r.get::<_, String>(0).ends_with("|forgotten"))
    };
    let conn = database.get().await.unwrap();
    retention::expire_intake(conn.client(), window)
        .await
        .unwrap();
    assert!(
        keys(psql(&server.url).await).await,
        "a key within its window is kept"
    );
    wait_for(
        "the expired key to be deleted",
        Duration::from_secs(30),
        || async {
            retention::expire_intake(conn.client(), window)
                .await
                .unwrap();
            (!keys(psql(&server.url).await).await).then_some(())
        },
    )
    .await;
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("orderflow_retention_rows{table=\"orderflow_intake\"}"),
        "{metrics}"
    );
}

#[test]
fn settings_out_of_bounds_are_refused_naming_the_setting() {
    for (flag, value, setting) in [
        ("--dedup-retention", "30s", "ORDERFLOW_DEDUP_RETENTION"),
        ("--dedup-retention", "400d", "ORDERFLOW_DEDUP_RETENTION"),
        (
            "--intake-key-retention",
            "never",
            "ORDERFLOW_INTAKE_KEY_RETENTION",
        ),
        (
            "--read-model-retention",
            "0s",
            "ORDERFLOW_READ_MODEL_RETENTION",
        ),
    ] {
        let e = orderflow::cli::Cli::try_parse_from(["orderflow", "retention", "run", flag, value])
            .unwrap_err()
            .to_string();
        assert!(e.contains(setting), "{flag}={value}: {e}");
    }
    let ok = orderflow::cli::Cli::try_parse_from([
        "orderflow",
        "retention",
        "run",
        "--dedup-retention",
        "2d",
    ]);
    assert!(ok.is_ok(), "{ok:?}");
}
