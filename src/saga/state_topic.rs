//! The saga state topic: compacted, keyed by order id, one partition per input partition.
//! Invariant: it is read only up to the last stable offset (committed transactions), and the
//! newest record of a key wins (a state of a higher version, or a tombstone); a state of a version
//! not above the one already read is stale and ignored. It writes nothing but the topic itself at
//! creation: states are written by the orchestrator's transactions.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::Message;
use uuid::Uuid;

use super::retention;
use super::state::SagaState;
use crate::kafka;

/// The state topic's settings at creation (an existing topic is left as it is: README,
/// Retention, says how to set them on one). Together they make compaction remove an expired
/// saga's states and then its tombstone within hours rather than weeks, so that a reload reads
/// the sagas in flight and those finished within the retention window, not the whole history.
pub const COMPACTION: [(&str, &str); 6] = [
    // Only each order's newest state matters.
    ("cleanup.policy", "compact"),
    // The active segment is never compacted: roll it hourly (default 7 days) and at 64 MiB
    // (default 1 GiB), so expired states become cleanable soon after their tombstone.
    ("segment.ms", "3600000"),
    ("segment.bytes", "67108864"),
    // Compact once a tenth of the log is dirty (default half): tombstones go sooner, for some
    // more cleaner work on a topic that is small once compacted.
    ("min.cleanable.dirty.ratio", "0.1"),
    // Whatever the dirty ratio, a record waits at most a day to be compacted.
    ("max.compaction.lag.ms", "86400000"),
    // A tombstone outlives its compaction by an hour (default a day): far more than a reload
    // takes (bounded to 60 s), so a reader that saw a state also sees its tombstone.
    ("delete.retention.ms", "3600000"),
];

/// Saga states of one partition, loaded from the state topic.
pub type PartitionStates = HashMap<Uuid, SagaState>;

/// A record's key and value.
pub type KeyValue = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Every (key, value) of one partition of `topic` up to its last stable offset.
pub fn read_partition(
    bootstrap_servers: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Vec<KeyValue>> {
    let consumer = kafka::read::reader(bootstrap_servers, "orderflow-saga-state-reader")?;
    // From offset 0: below a log start moved by deletion, `auto.offset.reset` starts at the
    // earliest record.
    let records = kafka::read::read_to_end(&consumer, topic, &HashMap::from([(partition, 0)]))
        .with_context(|| format!("reading {topic}/{partition}"))?;
    Ok(records
        .into_iter()
        .map(|m| (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)))
        .collect())
}

/// Creates the compacted state topic when missing, with [`COMPACTION`]'s settings.
pub async fn create_compacted(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> anyhow::Result<()> {
    kafka::admin::create_with_settings(
        bootstrap_servers,
        topic,
        partitions,
        replication,
        &COMPACTION,
    )
    .await
}

/// The newest stored state of one order's saga, if it has one.
pub async fn find_state(
    bootstrap_servers: &str,
    state_topic: &str,
    order_id: Uuid,
) -> anyhow::Result<Option<SagaState>> {
    let counts =
        kafka::admin::partition_counts(bootstrap_servers, &[state_topic.to_string()]).await?;
    let partitions = counts.get(state_topic).copied().unwrap_or(0);
    anyhow::ensure!(
        partitions > 0,
        "the saga state topic {state_topic} does not exist (has the saga run?)"
    );
    let key = order_id.to_string();
    let mut newest: Option<SagaState> = None;
    for partition in 0..partitions {
        let bootstrap = bootstrap_servers.to_string();
        let topic = state_topic.to_string();
        let records =
            tokio::task::spawn_blocking(move || read_partition(&bootstrap, &topic, partition))
                .await??;
        for (k, v) in records {
            if k.as_deref() != Some(key.as_bytes()) {
                continue;
            }
            // A tombstone: the saga expired (a state after it is a new saga of the same order).
            let Some(v) = v else {
                newest = None;
                continue;
            };
            let saga: SagaState = serde_json::from_slice(&v)
                .with_context(|| format!("the stored state of {order_id} is unreadable"))?;
            if newest.as_ref().is_none_or(|n| saga.version > n.version) {
                newest = Some(saga);
            }
        }
    }
    Ok(newest)
}
/// What reading one partition of the state topic found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The newest state of each order, unless deleted or expired.
    pub states: PartitionStates,
    /// Orders whose newest state is finished and past the retention window at load time: not
    /// held, and still to be tombstoned.
    pub expired: Vec<Uuid>,
    /// Orders whose newest record is a tombstone (until compaction removes them).
    pub deleted: usize,
    /// Records skipped as stale: (order, their version, the version already read).
    pub stale: Vec<(Uuid, u64, u64)>,
}

/// The newest state of each order among `records` (one partition, in offset order), leaving out
/// those deleted (a tombstone is their newest record) and those expired at `now` (ms since the
/// epoch) under `window`. Pure: the reload's rules, tested without Kafka.
pub fn fold(
    records: Vec<KeyValue>,
    now: i64,
    window: Duration,
    topic: &str,
    partition: i32,
) -> Loaded {
    let mut newest: HashMap<Uuid, Option<SagaState>> = HashMap::new();
    let mut stale = Vec::new();
    for (key, payload) in records {
        let Some(payload) = payload else {
            // A tombstone: what came before it for this key is gone.
            let order_id = key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| Uuid::parse_str(k).ok());
            match order_id {
                Some(id) => {
                    newest.insert(id, None);
                }
                None => {
                    tracing::warn!(topic, partition, "tombstone with an unreadable key skipped")
                }
            }
            continue;
        };
        let saga: SagaState = match serde_json::from_slice(&payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(topic, partition, "unreadable saga state skipped: {e}");
                continue;
            }
        };
        match newest.get(&saga.order_id) {
            Some(Some(known)) if known.version >= saga.version => {
                stale.push((saga.order_id, saga.version, known.version));
            }
            _ => {
                newest.insert(saga.order_id, Some(saga));
            }
        }
    }
    let mut loaded = Loaded {
        stale,
        ..Loaded::default()
    };
    for (order_id, state) in newest {
        match state {
            None => loaded.deleted += 1,
            Some(s) if retention::is_expired(&s, now, window) => loaded.expired.push(order_id),
            Some(s) => {
                loaded.states.insert(order_id, s);
            }
        }
    }
    loaded
}

/// Reads and folds partition `partition` of `topic` (off the async workers: it waits for the
/// broker).
pub async fn load(
    bootstrap_servers: &str,
    topic: &str,
    partition: i32,
    now: i64,
    window: Duration,
) -> anyhow::Result<Loaded> {
    let (bootstrap, owned) = (bootstrap_servers.to_string(), topic.to_string());
    let records =
        tokio::task::spawn_blocking(move || read_partition(&bootstrap, &owned, partition))
            .await??;
    Ok(fold(records, now, window, topic, partition))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::state::SagaStatus;

    const WINDOW: Duration = Duration::from_secs(60);

    fn state(status: SagaStatus, version: u64, updated_at: i64) -> SagaState {
        SagaState::sample(status, version, updated_at)
    }

    fn record(s: &SagaState) -> KeyValue {
        (
            Some(s.order_id.to_string().into_bytes()),
            Some(serde_json::to_vec(s).unwrap()),
        )
    }

    fn tombstone(s: &SagaState) -> KeyValue {
        (Some(s.order_id.to_string().into_bytes()), None)
    }

    fn again(s: &SagaState, status: SagaStatus, version: u64, updated_at: i64) -> SagaState {
        SagaState {
            status,
            version,
            updated_at,
            ..s.clone()
        }
    }

    #[test]
    fn a_reload_holds_the_live_and_the_young_finished_only() {
        let now = 1_000_000;
        let running = state(SagaStatus::Running, 2, 0);
        let young = state(SagaStatus::Confirmed, 4, now - 1_000);
        let old = state(SagaStatus::Cancelled, 5, now - 61_000);
        let deleted = state(SagaStatus::Confirmed, 4, 0);
        let reborn = state(SagaStatus::Confirmed, 4, 0);
        let records = vec![
            record(&again(&running, SagaStatus::Running, 1, 0)),
            record(&running),
            record(&young),
            record(&old),
            record(&deleted),
            tombstone(&deleted),
            // A tombstone, then a new saga of the same order (a repeated order.created).
            record(&reborn),
            tombstone(&reborn),
            record(&again(&reborn, SagaStatus::Running, 1, now)),
            // Stale: not newer than what was read.
            record(&again(&running, SagaStatus::Running, 2, 0)),
        ];
        let loaded = fold(records, now, WINDOW, "t", 0);
        let mut held: Vec<Uuid> = loaded.states.keys().copied().collect();
        held.sort();
        let mut expected = vec![running.order_id, young.order_id, reborn.order_id];
        expected.sort();
        assert_eq!(held, expected);
        assert_eq!(loaded.states[&running.order_id].version, 2);
        assert_eq!(loaded.states[&reborn.order_id].version, 1);
        assert_eq!(loaded.expired, [old.order_id]);
        assert_eq!(loaded.deleted, 1);
        assert_eq!(loaded.stale, [(running.order_id, 2, 2)]);
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let s = state(SagaStatus::Running, 1, 0);
        let records = vec![
            (Some(b"not a uuid".to_vec()), None),
            (
                Some(s.order_id.to_string().into_bytes()),
                Some(b"{".to_vec()),
            ),
            record(&s),
        ];
        let loaded = fold(records, 0, WINDOW, "t", 0);
        assert_eq!(loaded.states.len(), 1);
        assert_eq!(loaded.deleted, 0);
    }

    #[test]
    fn the_deployed_state_topics_have_the_compaction_settings() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/topics.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut states = 0;
        // A comment line, then JSON documents after each `---`.
        for doc in text.split("---\n").skip(1) {
            let topic: serde_json::Value = serde_json::from_str(doc).unwrap();
            if topic["metadata"]["labels"]["orderflow.dev/role"] != "state" {
                continue;
            }
            states += 1;
            for (name, value) in COMPACTION {
                assert_eq!(
                    topic["spec"]["config"][name], value,
                    "{name} of {} (scripts/gen-deploy)",
                    topic["metadata"]["name"]
                );
            }
        }
        assert!(states > 0, "no state topic in {path}");
    }
}
