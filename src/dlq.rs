//! Dead-letter tooling: list, show, replay and discard the records of a pipeline's dead-letter
//! topics (`<input>.<group>.dlq`).
//!
//! What has been handled is recorded twice:
//! - the audit topic `<dlq>.audit` gets one JSON record per replayed or discarded dead letter,
//!   keyed `<partition>:<offset>`, so a replay is never applied twice, even with filters;
//! - the replay group `<group>.dlq-replay` commits, per partition, the offset below which every
//!   dead letter is handled. The DLQ depth metric counts from there.
//!
//! A replay writes the record back with its key, value and event id. By default it goes to the
//! group's first retry tier, due at once, keeping `orderflow.attempt` and the rest of its history,
//! so only the consumer that failed sees it again, and a re-failure lands in the DLQ with its
//! attempt count grown. `--to original` writes it to the original topic instead (every group
//! reads it again; their dedup stores skip what they already handled).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

use crate::contracts::events::now_millis;
use crate::contracts::Naming;
use crate::kafka;
use crate::pipeline::Pipeline;
use crate::runtime::headers;
use crate::runtime::monitor::replay_group;

/// Which dead letters a command applies to. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub error_class: Option<String>,
    pub event_type: Option<String>,
    /// Record time range, ms since the epoch.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub partition: Option<i32>,
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    /// Include records already replayed or discarded.
    pub include_handled: bool,
}

/// One dead letter as read from its topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub pipeline: String,
    pub group_id: String,
    pub input_topic: String,
    pub record: OwnedMessage,
    /// Already replayed or discarded (per the audit topic or the replay group).
    pub handled: bool,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<String> {
        self.record
            .headers()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).to_string())
    }

    pub fn position(&self) -> String {
        format!(
            "{}:{}:{}",
            self.record.topic(),
            self.record.partition(),
            self.record.offset()
        )
    }

    fn matches(&self, f: &Filter) -> bool {
        let ts = self.record.timestamp().to_millis().unwrap_or(0);
        let offset = self.record.offset();
        (f.include_handled || !self.handled)
            && f.error_class
                .as_deref()
                .is_none_or(|c| self.header(headers::ERROR_CLASS).as_deref() == Some(c))
            && f.event_type
                .as_deref()
                .is_none_or(|t| self.header("ce_type").as_deref() == Some(t))
            && f.since_ms.is_none_or(|s| ts >= s)
            && f.until_ms.is_none_or(|u| ts <= u)
            && f.partition.is_none_or(|p| self.record.partition() == p)
            && f.from_offset.is_none_or(|o| offset >= o)
            && f.to_offset.is_none_or(|o| offset <= o)
    }
}

pub fn audit_topic(dlq: &str) -> String {
    format!("{dlq}.audit")
}

fn reader(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let mut config = kafka::consumer_config(bootstrap, group);
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    Ok(config.create()?)
}

/// Reads `topic` from the given start offsets to its end as of now.
fn read_range(
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
    while done.len() < ends.len() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic} did not reach its end within 60 s"
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
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(out)
}

fn partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// Per partition of a dead-letter topic: (low watermark, the replay group's committed offset,
/// or the low watermark when it has none).
fn replay_positions(
    consumer: &BaseConsumer,
    dlq: &str,
) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
    let parts = partitions(consumer, dlq)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(dlq, *p);
    }
    let committed = if parts.is_empty() {
        tpl
    } else {
        consumer.committed_offsets(tpl, Duration::from_secs(10))?
    };
    let mut out = HashMap::new();
    for p in parts {
        let (low, _) = consumer.fetch_watermarks(dlq, p, Duration::from_secs(10))?;
        let handled_below = match committed.find_partition(dlq, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        out.insert(p, (low, handled_below));
    }
    Ok(out)
}

/// Positions (`partition:offset`) the audit topic records as handled.
fn audited(consumer: &BaseConsumer, dlq: &str) -> anyhow::Result<HashSet<String>> {
    let audit = audit_topic(dlq);
    let starts: HashMap<i32, i64> = partitions(consumer, &audit)?
        .into_iter()
        .map(|p| (p, 0))
        .collect();
    Ok(read_range(consumer, &audit, &starts)?
        .iter()
        .filter_map(|m| m.key().map(|k| String::from_utf8_lossy(k).to_string()))
        .collect())
}

/// The dead letters of these pipelines that match `filter`, oldest first per partition.
pub fn read(
    bootstrap: &str,
    naming: &Naming,
    pipelines: &[Pipeline],
    filter: &Filter,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    for pipeline in pipelines {
        let group_id = pipeline.group_id(naming);
        let consumer = reader(bootstrap, &replay_group(&group_id))?;
        for input in pipeline.input_topics(naming) {
            let dlq = pipeline.dlq_topic(&input);
            let positions = replay_positions(&consumer, &dlq)?;
            if positions.is_empty() {
                continue;
            }
            let handled_below: HashMap<i32, i64> =
                positions.iter().map(|(p, (_, h))| (*p, *h)).collect();
            let starts: HashMap<i32, i64> = positions
                .iter()
                .map(|(p, (low, handled))| {
                    (
                        *p,
                        if filter.include_handled {
                            *low
                        } else {
                            *handled
                        },
                    )
                })
                .collect();
            let audit = audited(&consumer, &dlq)?;
            for record in read_range(&consumer, &dlq, &starts)? {
                let handled = record.offset() < handled_below[&record.partition()]
                    || audit.contains(&format!("{}:{}", record.partition(), record.offset()));
                let letter = DeadLetter {
                    pipeline: pipeline.name.clone(),
                    group_id: group_id.clone(),
                    input_topic: input.clone(),
                    record,
                    handled,
                };
                if letter.matches(filter) {
                    out.push(letter);
                }
            }
        }
    }
    Ok(out)
}

/// Where `replay` writes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayTo {
    /// The group's first retry tier, due at once, history kept: only the failed consumer.
    Retry,
    /// The original topic: every consumer reads it again.
    Original,
}

/// What happened to the dead letters a command selected.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Handled {
    pub count: usize,
}

/// Replays or discards the selected dead letters. Each one is written (replay), then recorded in
/// the audit topic, then the replay group's offsets advance over the handled prefix.
pub async fn handle(
    bootstrap: &str,
    pipelines: &[Pipeline],
    letters: &[DeadLetter],
    action: Action<'_>,
    rate_per_second: u32,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Handled> {
    let producer: FutureProducer = kafka::producer_config(bootstrap).create()?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(rate_per_second.max(1)),
    ));
    let who = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    for (i, letter) in letters.iter().enumerate() {
        tick.tick().await;
        let record = &letter.record;
        let (verb, destination) = match action {
            Action::Replay(to) => {
                let pipeline = pipelines
                    .iter()
                    .find(|p| p.name == letter.pipeline)
                    .context("dead letter of an unknown pipeline")?;
                let (topic, out_headers) = replay_target(letter, pipeline, to);
                let partition = letter
                    .header(headers::ORIGINAL_PARTITION)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(record.partition());
                let mut out = FutureRecord::to(&topic)
                    .partition(partition)
                    .headers(out_headers);
                if let Some(key) = record.key() {
                    out = out.key(key);
                }
                if let Some(payload) = record.payload() {
                    out = out.payload(payload);
                }
                producer
                    .send(out, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| {
                        anyhow::anyhow!("replaying {} to {topic}: {e}", letter.position())
                    })?;
                ("replayed", topic)
            }
            Action::Discard(_) => ("discarded", String::new()),
        };
        let audit = json!({
            "action": verb,
            "dlq": record.topic(),
            "partition": record.partition(),
            "offset": record.offset(),
            "event_id": letter.header("ce_id"),
            "to": destination,
            "reason": match action { Action::Discard(reason) => reason, Action::Replay(_) => "" },
            "by": who,
            "at_ms": now_millis(),
        })
        .to_string();
        let key = format!("{}:{}", record.partition(), record.offset());
        let audit_topic = audit_topic(record.topic());
        producer
            .send(
                FutureRecord::to(&audit_topic).key(&key).payload(&audit),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| {
                anyhow::anyhow!("recording {} in {audit_topic}: {e}", letter.position())
            })?;
        progress(i + 1, letters.len());
    }
    advance_replay_groups(bootstrap, letters)?;
    Ok(Handled {
        count: letters.len(),
    })
}

/// What to do with the selected dead letters.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    Replay(ReplayTo),
    /// With a reason, recorded in the audit topic.
    Discard(&'a str),
}

fn replay_target(letter: &DeadLetter, pipeline: &Pipeline, to: ReplayTo) -> (String, OwnedHeaders) {
    let record = &letter.record;
    let mut out = OwnedHeaders::new();
    let replayed_from = letter.position();
    let now = now_millis().to_string();
    let (topic, out) = match to {
        ReplayTo::Retry => {
            let topic = pipeline.retry_topic(&letter.input_topic, 1);
            if let Some(h) = record.headers() {
                for h in h
                    .iter()
                    .filter(|h| h.key != headers::DUE_TIME && h.key != headers::RETRY_TIER)
                {
                    out = out.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            out = out
                .insert(Header {
                    key: headers::RETRY_TIER,
                    value: Some("1"),
                })
                .insert(Header {
                    key: headers::DUE_TIME,
                    value: Some(&now),
                });
            (topic, out)
        }
        ReplayTo::Original => {
            let topic = letter
                .header(headers::ORIGINAL_TOPIC)
                .unwrap_or_else(|| letter.input_topic.clone());
            if let Some(h) = record.headers() {
                for h in h.iter().filter(|h| !h.key.starts_with(headers::PREFIX)) {
                    out = out.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            (topic, out)
        }
    };
    let out = out
        .insert(Header {
            key: "orderflow.replayed.from",
            value: Some(&replayed_from),
        })
        .insert(Header {
            key: "orderflow.replayed.time",
            value: Some(&now),
        });
    (topic, out)
}

/// Commits, per DLQ partition, the offset below which every dead letter is now handled.
fn advance_replay_groups(bootstrap: &str, letters: &[DeadLetter]) -> anyhow::Result<()> {
    let mut groups: HashMap<&str, Vec<&DeadLetter>> = HashMap::new();
    for l in letters {
        groups.entry(&l.group_id).or_default().push(l);
    }
    for (group, letters) in groups {
        let consumer = reader(bootstrap, &replay_group(group))?;
        let mut dlqs: Vec<&str> = letters.iter().map(|l| l.record.topic()).collect();
        dlqs.sort_unstable();
        dlqs.dedup();
        for dlq in dlqs {
            // Re-read from the committed offsets: handled = audited now or before.
            let audit = audited(&consumer, dlq)?;
            let starts: HashMap<i32, i64> = replay_positions(&consumer, dlq)?
                .into_iter()
                .map(|(p, (_, handled))| (p, handled))
                .collect();
            let mut next = starts.clone();
            let mut blocked = HashSet::new();
            let mut records = read_range(&consumer, dlq, &starts)?;
            records.sort_by_key(|m| (m.partition(), m.offset()));
            for m in records {
                let p = m.partition();
                if blocked.contains(&p) {
                    continue;
                }
                if audit.contains(&format!("{p}:{}", m.offset())) {
                    next.insert(p, m.offset() + 1);
                } else {
                    blocked.insert(p);
                }
            }
            let mut commit = TopicPartitionList::new();
            for (p, offset) in &next {
                if starts[p] != *offset {
                    commit.add_partition_offset(dlq, *p, Offset::Offset(*offset))?;
                }
            }
            if commit.count() > 0 {
                consumer.commit(&commit, CommitMode::Sync)?;
            }
        }
    }
    Ok(())
}
