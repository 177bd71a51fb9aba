//! Reading topics as tools do, outside any consumer group's flow: a reader that commits
//! nothing, a topic's partitions, and reading partitions from given offsets up to their end as
//! of now (the high watermark when the read starts). Blocking: call from the blocking pool.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::client::consumer_config;

/// A consumer in `group` that commits nothing by itself and reports each partition's end.
pub fn reader(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let mut config = consumer_config(bootstrap, group);
    config
        .set("enable.auto.commit", "false")
        // Told when the read reaches a partition's end: a topic written in transactions ends
        // with a commit marker, which is never delivered, so the last record is not the end.
        .set("enable.partition.eof", "true")
        // The fetch that finds the end returns at once rather than after the broker's wait for
        // new data (otherwise up to that wait per partition read).
        .set("fetch.wait.max.ms", "10");
    Ok(config.create()?)
}

/// The partitions of `topic`; none when it does not exist.
pub fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// Reads `topic` from the given start offsets (per partition) to its end as of now.
pub fn read_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    starts: &HashMap<i32, i64>,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (partition, start) in starts {
        let (_, high) = consumer.fetch_watermarks(topic, *partition, timeout)?;
        if high > *start {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*start))?;
            ends.insert(*partition, high);
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last_error = None;
    while done.len() < ends.len() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic} did not reach its end within 60 s{}",
            last_error.map_or(String::new(), |e| format!(" (last error: {e})"))
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let p = m.partition();
                if m.offset() + 1 >= ends[&p] {
                    done.insert(p);
                }
                if m.offset() < ends[&p] {
                    out.push(m.detach());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                done.insert(p);
            }
            // librdkafka retries by itself (a broker restarting, a leader moving): reported,
            // and fatal only if the end is not reached by the deadline.
            Some(Err(e)) => {
                tracing::warn!(topic, "reading to the end: {e}");
                last_error = Some(e);
            }
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(out)
}
