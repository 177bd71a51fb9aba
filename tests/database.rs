//! The database module and the dedup store over it, against real PostgreSQL: a server that is
//! down or frozen (SIGSTOP) makes every call fail within a bound, and calls work again once it is
//! back, without a new store; concurrent `seen` calls are answered right and share round trips;
//! a `seen` batch reads only the marks it asks for, even without statistics; the read model
//! keeps both of an order's first events when they are applied at once.
//! The down and frozen servers are throwaway ones of the test's own (tests/pg), never the stack's.

mod common;
mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::runtime::dedup::{DedupError, DedupStore};
use uuid::Uuid;

/// Longest a dedup call may take when the database is down or frozen: a connection (2 s) and a
/// statement (2 s plus margin), as the store's own caller-side bound.
const BOUND: Duration = Duration::from_secs(6);

/// `calls` concurrent `seen` calls; each must fail within [`BOUND`]. Returns the slowest.
async fn all_fail_fast(
    store: &Arc<DedupStore>,
    group: &str,
    calls: usize,
    phase: &str,
) -> Duration {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let (store, group) = (store.clone(), group.to_string());
        tasks.spawn(async move {
            let at = Instant::now();
            let r: Result<bool, DedupError> = store.seen(&group, Uuid::now_v7()).await;
            (r, at.elapsed())
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(done) = tasks.join_next().await {
        let (result, took) = done.unwrap();
        let e = result.expect_err(phase);
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(took < BOUND, "a call took {took:?}: {e}");
        slowest = slowest.max(took);
    }
    assert!(started.elapsed() < BOUND + Duration::from_secs(1));
    slowest
}

/// Waits (30 s at most) until `seen` works again; returns how long that took.
async fn until_it_works(store: &DedupStore, group: &str, marked: Uuid) -> Duration {
    let started = Instant::now();
    loop {
        match store.seen(group, marked).await {
            Ok(seen) => {
                assert!(seen, "the mark made before the outage is still there");
                return started.elapsed();
            }
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "not working 30 s after the database came back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedup_fails_fast_while_the_database_is_down_or_frozen_and_recovers_by_itself() {
    let mut server = pg::Pg::start().await;
    let store = Arc::new(DedupStore::connect(&server.url).await.unwrap());
    let group = format!("it-dedup-{}", Uuid::new_v4().simple());
    let marked = Uuid::now_v7();
    store.mark(&group, marked).await.unwrap();
    assert!(store.seen(&group, marked).await.unwrap());
    assert!(!store.seen(&group, Uuid::now_v7()).await.unwrap());

    // Down: connections refused.
    server.down();
    let down = all_fail_fast(&store, &group, 20, "down").await;
    let started = Instant::now();
    let mark = store.mark_many(&group, &[Uuid::now_v7()]).await;
    assert!(mark.is_err() && started.elapsed() < BOUND, "{mark:?}");
    server.up().await;
    let back_after_down = until_it_works(&store, &group, marked).await;

    // Frozen: the server accepts TCP connections (the kernel does) but answers nothing.
    server.freeze();
    let frozen = all_fail_fast(&store, &group, 20, "frozen").await;
    let again = all_fail_fast(&store, &group, 5, "still frozen").await;
    let started = Instant::now();
    let mark = store.mark_many(&group, &[Uuid::now_v7()]).await;
    let mark_frozen = started.elapsed();
    assert!(mark.is_err() && mark_frozen < BOUND, "{mark:?}");
    server.thaw();
    let back_after_frozen = until_it_works(&store, &group, marked).await;
    let fresh = Uuid::now_v7();
    store.mark(&group, fresh).await.unwrap();
    assert!(store.seen(&group, fresh).await.unwrap());
    eprintln!(
        "slowest failing call: down {down:?}, frozen {frozen:?} then {again:?}, mark while frozen \
         {mark_frozen:?}; working again {back_after_down:?} after the restart, \
         {back_after_frozen:?} after SIGCONT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seen_from_200_concurrent_callers_is_right_and_shares_round_trips() {
    let store = Arc::new(DedupStore::connect(&common::database_url()).await.unwrap());
    let group = format!("it-dedup-batch-{}", Uuid::new_v4().simple());
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    // Every other id handled, marked by 20 concurrent calls.
    let handled: HashSet<Uuid> = ids.iter().step_by(2).copied().collect();
    let chunks: Vec<Vec<Uuid>> = handled
        .iter()
        .copied()
        .collect::<Vec<_>>()
        .chunks(5)
        .map(<[Uuid]>::to_vec)
        .collect();
    let marks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let (store, group) = (store.clone(), group.clone());
            tokio::spawn(async move { store.mark_many(&group, &chunk).await })
        })
        .collect();
    for m in marks {
        m.await.unwrap().unwrap();
    }
    let before = store.stats();

    let calls: Vec<_> = ids
        .iter()
        .map(|id| {
            let (store, group, id) = (store.clone(), group.clone(), *id);
            tokio::spawn(async move { (id, store.seen(&group, id).await) })
        })
        .collect();
    for call in calls {
        let (id, seen) = call.await.unwrap();
        assert_eq!(seen.unwrap(), handled.contains(&id), "{id}");
    }
    let after = store.stats();
    let queries = after.seen_queries - before.seen_queries;
    eprintln!(
        "200 concurrent seen calls: {queries} SELECT statement(s); 20 concurrent mark_many \
         calls: {} INSERT statement(s)",
        before.mark_statements
    );
    assert_eq!(after.seen_calls - before.seen_calls, 200);
    assert!(queries <= 20, "{queries} statements for 200 calls");
    assert!(before.mark_statements <= 20);
    // Another group's marks are not this group's.
    let other = format!("{group}-other");
    assert!(!store.seen(&other, ids[0]).await.unwrap());
}

/// A `seen` batch looks each of its ids up in the primary key whatever the statistics say. Run
/// in a database of its own, whose marks have no statistics at all, as every day's partition
/// until it is analyzed: a plan for `event_id = ANY($2)` read all of a group's marks there and
/// filtered them by id, and a connection keeps its plan. Both statements (with and without the
/// table of an earlier version) are checked as the store prepares them, on a connection of the
/// pool as the store gets it; the partitions created ahead are not read. An id twice in one mark
/// call is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seen_batch_looks_each_id_up_in_the_index_even_without_statistics() {
    use orderflow::database::Database;
    use orderflow::runtime::dedup::{SEEN_LEGACY_SQL, SEEN_SQL};

    let admin = Database::new(&common::database_url()).unwrap();
    let admin = admin.get().await.unwrap();
    // Left by a run that failed before its end.
    let stale: Vec<String> = admin
        .client()
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'it_dedup_plan_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for name in stale {
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        admin.client().batch_execute(&drop).await.unwrap();
    }
    let name = format!(
        "it_dedup_plan_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let create = format!("CREATE DATABASE {name}");
    admin.client().batch_execute(&create).await.unwrap();
    let url = orderflow::database::url_of_database(&common::database_url(), &name);

    let store = DedupStore::connect(&url).await.unwrap();
    let db = Database::new(&url).unwrap();
    let conn = db.get().await.unwrap();
    // No statistics for as long as the test runs, and a table of the earlier layout.
    let setup = "DO $$ DECLARE p regclass; BEGIN \
        FOR p IN SELECT inhrelid::regclass FROM pg_inherits \
        WHERE inhparent = 'orderflow_processed'::regclass LOOP \
        EXECUTE format('ALTER TABLE %s SET (autovacuum_enabled = false)', p); END LOOP; END $$; \
        CREATE TABLE orderflow_processed_legacy (consumer_group text NOT NULL, \
        event_id uuid NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(), \
        PRIMARY KEY (consumer_group, event_id))";
    conn.client().batch_execute(setup).await.unwrap();

    let group = "it-dedup-plan";
    let marked: Vec<Uuid> = (0..5_000).map(|_| Uuid::now_v7()).collect();
    store.mark_many(group, &marked).await.unwrap();
    // Asked: 500 marked ids and 500 others.
    let asked: Vec<Uuid> = marked[..500]
        .iter()
        .copied()
        .chain((0..500).map(|_| Uuid::now_v7()))
        .collect();
    let array = format!(
        "{{{}}}",
        asked
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    for (n, sql) in [SEEN_SQL, SEEN_LEGACY_SQL].into_iter().enumerate() {
        let prepare = format!("PREPARE it_seen_{n}(text, uuid[], double precision) AS {sql}");
        conn.client().batch_execute(&prepare).await.unwrap();
        let explain = format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) \
             EXECUTE it_seen_{n}('{group}', '{array}', 3600)"
        );
        let plan: Vec<String> = conn
            .client()
            .query(&explain, &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect();
        let plan = plan.join("\n");
        eprintln!("{plan}");
        // Every scan of the marks is led by the group and the id, and nothing is filtered out
        // after reading: no mark but the asked ones is read.
        let conditions: Vec<&str> = plan
            .lines()
            .filter(|l| l.contains("Index Cond:") || l.contains("Recheck Cond:"))
            .collect();
        assert!(!conditions.is_empty(), "no index used:\n{plan}");
        for condition in &conditions {
            assert!(
                condition.contains("event_id"),
                "a scan not keyed by the id: {condition}\n{plan}"
            );
        }
        assert!(
            !plan.contains("Seq Scan")
                && !plan.contains("Rows Removed by Filter")
                && !plan.contains("Rows Removed by Index Recheck"),
            "marks read and filtered out:\n{plan}"
        );
        // Of the partitions created ahead, only one beginning within the hour is read.
        let partitions_read = plan
            .lines()
            .filter(|l| l.contains(" Scan ") && l.contains("orderflow_processed_p"))
            .count();
        assert!(
            partitions_read <= 2,
            "{partitions_read} partitions read for marks of today:\n{plan}"
        );
        let returned = plan
            .lines()
            .next()
            .and_then(|l| l.split("rows=").nth(1))
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<usize>().ok());
        assert_eq!(
            returned,
            Some(500),
            "the 500 marked of the 1,000 asked:\n{plan}"
        );
    }

    // Through the store: its answers, and an id marked twice in one call, then again.
    assert!(store.seen(group, asked[0]).await.unwrap());
    assert!(!store.seen(group, asked[999]).await.unwrap());
    let again = Uuid::now_v7();
    store
        .mark_many(group, &[again, marked[0], again])
        .await
        .unwrap();
    assert!(store.seen(group, again).await.unwrap());

    drop((conn, db, store));
    let drop = format!("DROP DATABASE {name} WITH (FORCE)");
    admin.client().batch_execute(&drop).await.unwrap();
}

/// Two first events of one order (on different topics, so handled at once by the read model's
/// pipeline) must both be in its view: neither insert may erase the other's source. Run on many
/// new orders at once so the two applies do overlap; the store's lock is what this checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_two_events_of_an_order_applied_at_once_both_stay_in_its_view() {
    use orderflow::contracts::{AnyEvent, OrderCreated};
    use orderflow::projection::{find, OrderStatusStore};
    let url = common::database_url();
    let store = Arc::new(OrderStatusStore::new(&url));
    let mut orders = Vec::new();
    let mut applies = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let order = OrderCreated::sample("test");
        let id = order.data.order_id;
        let created = AnyEvent::OrderCreated(order);
        let reserved = AnyEvent::from_data(
            "inventory.reserved",
            serde_json::json!({"order_id": id.to_string(), "reservation_id": Uuid::now_v7().to_string(), "lines": [{"sku": "A", "quantity": 1}]}),
            "test",
            created.envelope(),
        )
        .unwrap();
        orders.push(id);
        for event in [created, reserved] {
            let store = store.clone();
            applies.spawn(async move { store.apply(&event).await });
        }
    }
    while let Some(applied) = applies.join_next().await {
        applied.unwrap().unwrap();
    }
    let db = orderflow::database::Database::new(&url).unwrap();
    let conn = db.get().await.unwrap();
    let mut missing = Vec::new();
    for id in &orders {
        let view = find(conn.client(), *id).await.unwrap().expect("projected");
        let sources: Vec<&str> = view.sources.keys().map(String::as_str).collect();
        if view.version != 2 || sources.len() != 2 {
            missing.push((*id, view.version, sources.join(",")));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} orders lost a first event: {missing:?}",
        missing.len(),
        orders.len()
    );
}
