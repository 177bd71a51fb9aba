//! The saga state topic: compacted, keyed by order id, one partition per input partition.
//! Invariant: it is read only up to the last stable offset (committed transactions), and the
//! newest record of a key wins (a state of a higher version, or a tombstone); a state of a version
//! not above the one already read is stale and ignored. It writes nothing but the topic itself at
//! creation: states are written by the orchestrator's transactions.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use uuid::Uuid;

use super::state::SagaState;
use crate::kafka;

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
    let mut config = kafka::client_config(bootstrap_servers);
    config
        .set("group.id", "orderflow-saga-state-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create()?;
    // With read_committed the high watermark reported is the last stable offset.
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let position = consumer
            .position()?
            .find_partition(topic, partition)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(-1);
        if position >= high {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic}/{partition} up to offset {high} took over 60 s (at {position})"
        );
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                out.push((m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
                if m.offset() + 1 >= high {
                    break;
                }
            }
            Some(Err(e)) => tracing::warn!(topic, partition, "reading saga state: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Creates a compacted topic when missing (an existing one is left as it is).
pub async fn create_compacted(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;

    let admin: AdminClient<DefaultClientContext> =
        kafka::client_config(bootstrap_servers).create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
        // Only each order's newest state matters.
        .set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic} failed: {code}"),
        }
    }
    // Waits until it is visible, as for the other topics.
    kafka::ensure_topics(bootstrap_servers, &[(topic, partitions)], replication).await
}

/// Partition count of each topic.
pub async fn partition_counts(
    bootstrap_servers: &str,
    topics: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, i32>> {
    let bootstrap = bootstrap_servers.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = kafka::client_config(&bootstrap).create()?;
        let mut out = std::collections::BTreeMap::new();
        for topic in topics {
            let metadata = client.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            let count = metadata
                .topics()
                .first()
                .map(|t| t.partitions().len() as i32)
                .unwrap_or(0);
            out.insert(topic, count);
        }
        Ok(out)
    })
    .await?
}

/// The newest stored state of one order's saga, if it has one.
pub async fn find_state(
    bootstrap_servers: &str,
    state_topic: &str,
    order_id: Uuid,
) -> anyhow::Result<Option<SagaState>> {
    let counts = partition_counts(bootstrap_servers, &[state_topic.to_string()]).await?;
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
            let Some(v) = v else { continue };
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
    /// The newest state of each order.
    pub states: PartitionStates,
    /// Records skipped as stale: (order, their version, the version already read).
    pub stale: Vec<(Uuid, u64, u64)>,
}

/// The newest state of each order among `records` (one partition, in offset order). Pure: the
/// reload's rules, tested without Kafka.
pub fn fold(records: Vec<KeyValue>, topic: &str, partition: i32) -> Loaded {
    let mut loaded = Loaded::default();
    for (_, payload) in records {
        let Some(payload) = payload else { continue };
        let saga: SagaState = match serde_json::from_slice(&payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(topic, partition, "unreadable saga state skipped: {e}");
                continue;
            }
        };
        match loaded.states.get(&saga.order_id) {
            Some(known) if known.version >= saga.version => {
                loaded
                    .stale
                    .push((saga.order_id, saga.version, known.version));
            }
            _ => {
                loaded.states.insert(saga.order_id, saga);
            }
        }
    }
    loaded
}

/// Reads and folds partition `partition` of `topic` (off the async workers: it waits for the
/// broker).
pub async fn load(bootstrap_servers: &str, topic: &str, partition: i32) -> anyhow::Result<Loaded> {
    let (bootstrap, owned) = (bootstrap_servers.to_string(), topic.to_string());
    let records =
        tokio::task::spawn_blocking(move || read_partition(&bootstrap, &owned, partition))
            .await??;
    Ok(fold(records, topic, partition))
}
