//! What a processor cannot see in its own records, measured every few seconds: dead-letter
//! depth and the oldest dead letter's age, retry backlog per tier, and readiness (in the group,
//! broker and registry answering).
//!
//! DLQ depth counts the records beyond the replay group's committed offset (`<group>.dlq-replay`,
//! advanced by `orderflow dlq replay` and `discard`), so a replayed or discarded record no
//! longer counts. Retry backlog counts the records beyond the processor group's own offsets.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use super::context::MeteredContext;
use crate::contracts::events::now_millis;
use crate::contracts::{EventCodec, Naming};
use crate::kafka;
use crate::kafka::read::partitions;
use crate::pipeline::Pipeline;
use crate::telemetry::{ProcessorEvent, Telemetry};
use crate::topology;

pub struct Monitor {
    pub pipeline: Pipeline,
    pub naming: Naming,
    pub group_id: String,
    pub bootstrap_servers: String,
    pub telemetry: Telemetry,
    pub context: MeteredContext,
    pub codec: Arc<EventCodec>,
}

struct Measured {
    dlq: Vec<(String, i64, f64)>,
    backlog: Vec<(usize, i64)>,
}

impl Monitor {
    pub async fn run(self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut reported_cache = (0, 0);
        loop {
            let (hits, misses) = self.codec.cache_lookups();
            self.telemetry.emit(ProcessorEvent::RegistryCache {
                hits: hits - reported_cache.0,
                misses: misses - reported_cache.1,
            });
            reported_cache = (hits, misses);

            let registry_ok = self.codec.registry().subjects().await.is_ok();
            let measured = {
                let (pipeline, naming, group, bootstrap) = (
                    self.pipeline.clone(),
                    self.naming.clone(),
                    self.group_id.clone(),
                    self.bootstrap_servers.clone(),
                );
                tokio::task::spawn_blocking(move || measure(&pipeline, &naming, &group, &bootstrap))
                    .await
            };
            let broker_ok = matches!(measured, Ok(Ok(_)));
            match measured {
                Ok(Ok(m)) => {
                    for (topic, depth, oldest_age_seconds) in &m.dlq {
                        self.telemetry.emit(ProcessorEvent::DlqDepth {
                            topic,
                            depth: *depth,
                            oldest_age_seconds: *oldest_age_seconds,
                        });
                    }
                    for (tier, records) in m.backlog {
                        self.telemetry
                            .emit(ProcessorEvent::RetryBacklog { tier, records });
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(pipeline = %self.pipeline.name, "measuring DLQ depth and retry backlog failed: {e:#}")
                }
                Err(e) => {
                    tracing::warn!(pipeline = %self.pipeline.name, "monitor task failed: {e}")
                }
            }
            let in_group = self.context.in_group.load(Ordering::Relaxed);
            let reason = match (in_group, broker_ok, registry_ok) {
                (true, true, true) => "ok",
                (false, _, _) => "not in the consumer group yet",
                (_, false, _) => "the broker does not answer",
                (_, _, false) => "the schema registry does not answer",
            };
            self.telemetry.emit(ProcessorEvent::Ready {
                ready: reason == "ok",
                reason,
            });
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
}

/// Records in each partition between `from` (or the start) and the end.
fn beyond(
    consumer: &BaseConsumer,
    topic: &str,
    group_offsets: &TopicPartitionList,
) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let timeout = Duration::from_secs(5);
    let mut out = Vec::new();
    for p in partitions(consumer, topic, timeout)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let committed = match group_offsets.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => low,
        };
        let start = committed.max(low);
        out.push((p, start, (high - start).max(0)));
    }
    Ok(out)
}

fn committed(consumer: &BaseConsumer, topics: &[String]) -> anyhow::Result<TopicPartitionList> {
    let timeout = Duration::from_secs(5);
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for p in partitions(consumer, topic, timeout)? {
            tpl.add_partition(topic, p);
        }
    }
    if tpl.count() == 0 {
        return Ok(tpl);
    }
    Ok(consumer.committed_offsets(tpl, timeout)?)
}

fn measure(
    pipeline: &Pipeline,
    naming: &Naming,
    group: &str,
    bootstrap: &str,
) -> anyhow::Result<Measured> {
    let reader = |group: &str| -> anyhow::Result<BaseConsumer> {
        let mut config = kafka::consumer_config(bootstrap, group);
        config.set("enable.auto.commit", "false");
        Ok(config.create()?)
    };
    let processor_group = reader(group)?;
    let replay = reader(&topology::dlq_replay_group(group))?;
    let mut measured = Measured {
        dlq: Vec::new(),
        backlog: Vec::new(),
    };
    let mut backlog = vec![0i64; pipeline.retry.tiers.len()];
    for input in pipeline.input_topics(naming) {
        let dlq = pipeline.dlq_topic(&input);
        let offsets = committed(&replay, std::slice::from_ref(&dlq))?;
        let pending = beyond(&replay, &dlq, &offsets)?;
        let depth: i64 = pending.iter().map(|(_, _, n)| n).sum();
        let oldest_ms = oldest_timestamp(&replay, &dlq, &pending)?;
        let age = oldest_ms
            .map(|ts| (now_millis() - ts).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        measured.dlq.push((dlq, depth, age));
        let retry_topics: Vec<String> = (1..=pipeline.retry.tiers.len())
            .map(|t| pipeline.retry_topic(&input, t))
            .collect();
        let offsets = committed(&processor_group, &retry_topics)?;
        for (i, topic) in retry_topics.iter().enumerate() {
            backlog[i] += beyond(&processor_group, topic, &offsets)?
                .iter()
                .map(|(_, _, n)| n)
                .sum::<i64>();
        }
    }
    measured.backlog = backlog
        .into_iter()
        .enumerate()
        .map(|(i, n)| (i + 1, n))
        .collect();
    Ok(measured)
}

/// The timestamp of the first pending record of each partition; the oldest of them.
fn oldest_timestamp(
    consumer: &BaseConsumer,
    topic: &str,
    pending: &[(i32, i64, i64)],
) -> anyhow::Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    for (partition, start, count) in pending {
        if *count > 0 {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*start))?;
        }
    }
    let wanted = tpl.count();
    if wanted == 0 {
        return Ok(None);
    }
    consumer.assign(&tpl)?;
    let mut oldest: Option<i64> = None;
    let mut seen = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while seen.len() < wanted && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            if seen.insert(message.partition()) {
                if let Some(ts) = message.timestamp().to_millis() {
                    oldest = Some(oldest.map_or(ts, |o: i64| o.min(ts)));
                }
            }
        }
    }
    consumer.unassign()?;
    Ok(oldest)
}
