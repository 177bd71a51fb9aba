//! Dead-letter tooling: list, show, replay and discard the records of a pipeline's dead-letter
//! topics (`<input>.<group>.dlq`). Invariant: each dead letter is replayed (or discarded) once,
//! whatever crashes or concurrent runs: its replayed record, its audit record and the replay
//! group's offsets are written in one Kafka transaction, and runs on one DLQ share a
//! transactional id, so a new run fences an older one before reading what is handled.
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
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

use crate::contracts::events::now_millis;
use crate::contracts::Naming;
use crate::kafka;
use crate::kafka::headers;
use crate::kafka::read::{partitions, read_to_end, reader};
use crate::pipeline::Pipeline;
use crate::topology::{self, dlq_audit_topic, dlq_replay_group};

/// Bound of each metadata request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

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
        headers::text(self.record.headers(), name)
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

/// Per partition of a dead-letter topic: (low watermark, the replay group's committed offset,
/// or the low watermark when it has none).
fn replay_positions(
    consumer: &BaseConsumer,
    dlq: &str,
) -> anyhow::Result<HashMap<i32, (i64, i64)>> {
    let parts = partitions(consumer, dlq, METADATA_TIMEOUT)?;
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
    let audit = dlq_audit_topic(dlq);
    let starts: HashMap<i32, i64> = partitions(consumer, &audit, METADATA_TIMEOUT)?
        .into_iter()
        .map(|p| (p, 0))
        .collect();
    Ok(read_to_end(consumer, &audit, &starts)?
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
        let consumer = reader(bootstrap, &dlq_replay_group(&group_id))?;
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
            for record in read_to_end(&consumer, &dlq, &starts)? {
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
    /// Replayed or discarded by this run.
    pub count: usize,
    /// Selected, but found handled once this run held the DLQ (by a run before it or beside it).
    pub already_handled: usize,
}

/// Dead letters per transaction at most; a transaction also closes after [`BATCH_TIME`].
const BATCH_SIZE: usize = 100;
const BATCH_TIME: Duration = Duration::from_secs(1);
/// Bounds every blocking transactional call.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// The transactional id of every replay or discard of `dlq`: one per DLQ, so a second run
/// fences the first (and aborts what it left open) instead of both writing.
pub fn transactional_id(dlq: &str) -> String {
    topology::dlq_replay_transactional_id(dlq)
}

/// Replays or discards the selected dead letters, one DLQ at a time. Per DLQ, each transaction
/// holds the replayed records, their audit records and the replay group's new offsets, so a
/// dead letter is handled exactly when it is recorded as handled. The transactional id is
/// per DLQ: starting fences any earlier run (its open transaction is aborted), and then what is
/// already handled is read again and skipped. A run fenced by a newer one stops with an error.
pub async fn handle(
    bootstrap: &str,
    pipelines: &[Pipeline],
    letters: &[DeadLetter],
    action: Action<'_>,
    rate_per_second: u32,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<Handled> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(rate_per_second.max(1)),
    ));
    let who = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let mut dlqs: Vec<(&str, &str)> = letters
        .iter()
        .map(|l| (l.record.topic(), l.group_id.as_str()))
        .collect();
    dlqs.sort_unstable();
    dlqs.dedup();
    let mut handled = Handled::default();
    for (dlq, group) in dlqs {
        let selected: Vec<&DeadLetter> = letters
            .iter()
            .filter(|l| l.record.topic() == dlq && l.group_id == group)
            .collect();
        let mut run = DlqRun::start(bootstrap, dlq, group)?;
        let pending: Vec<&DeadLetter> = selected
            .iter()
            .copied()
            .filter(|l| !run.is_handled(l.record.partition(), l.record.offset()))
            .collect();
        handled.already_handled += selected.len() - pending.len();
        progress(handled.count + handled.already_handled, letters.len());
        let mut rest = pending.as_slice();
        while !rest.is_empty() {
            run.begin()?;
            let opened = std::time::Instant::now();
            let mut in_batch = 0;
            while in_batch < rest.len()
                && in_batch < BATCH_SIZE
                && (in_batch == 0 || opened.elapsed() < BATCH_TIME)
            {
                tick.tick().await;
                let letter = rest[in_batch];
                let destination = match action {
                    Action::Replay(to) => {
                        let pipeline = pipelines
                            .iter()
                            .find(|p| p.name == letter.pipeline)
                            .context("dead letter of an unknown pipeline")?;
                        let (topic, out_headers) = replay_target(letter, pipeline, to);
                        run.replay(letter, &topic, out_headers)?;
                        topic
                    }
                    Action::Discard(_) => String::new(),
                };
                let audit = json!({
                    "action": match action { Action::Replay(_) => "replayed", Action::Discard(_) => "discarded" },
                    "dlq": letter.record.topic(),
                    "partition": letter.record.partition(),
                    "offset": letter.record.offset(),
                    "event_id": letter.header("ce_id"),
                    "to": destination,
                    "reason": match action { Action::Discard(reason) => reason, Action::Replay(_) => "" },
                    "by": who,
                    "at_ms": now_millis(),
                })
                .to_string();
                run.audit(letter, &audit)?;
                in_batch += 1;
            }
            run.commit()?;
            handled.count += in_batch;
            rest = &rest[in_batch..];
            progress(handled.count + handled.already_handled, letters.len());
        }
    }
    Ok(handled)
}

/// One DLQ held by this run: its transactional producer and what is handled so far.
struct DlqRun {
    dlq: String,
    /// Polled by its own thread, so deliveries are served while a commit waits for them.
    producer: ThreadedProducer<DefaultProducerContext>,
    /// A member of the replay group in name only: its metadata goes with the offsets.
    group: BaseConsumer,
    /// Per partition, the replay group's committed offset (or the low watermark).
    committed: HashMap<i32, i64>,
    /// Positions `partition:offset` at or beyond the committed offsets recorded as handled.
    audited: HashSet<(i32, i64)>,
    /// Every dead letter at or beyond the committed offsets, in order, to move the offsets over
    /// the handled prefix.
    beyond: Vec<(i32, i64)>,
    /// Partition counts of the topics written to, to check a header's partition.
    partitions: HashMap<String, i32>,
}

impl DlqRun {
    fn start(bootstrap: &str, dlq: &str, group: &str) -> anyhow::Result<DlqRun> {
        let mut config = kafka::producer_config(bootstrap);
        config
            .set("transactional.id", transactional_id(dlq))
            // A run killed mid-transaction holds read_committed readers back at most this long
            // (the next run aborts it at once).
            .set("transaction.timeout.ms", "10000")
            // librdkafka requires a record's delivery timeout within the transaction's.
            .set("message.timeout.ms", "10000");
        let producer: ThreadedProducer<DefaultProducerContext> = config.create()?;
        blocking(|| producer.init_transactions(KAFKA_TIMEOUT)).with_context(|| {
            format!(
                "taking hold of {dlq} (transactional id {})",
                transactional_id(dlq)
            )
        })?;
        // Fenced now: whatever an earlier run committed is visible, nothing more will be.
        let group_reader = reader(bootstrap, &dlq_replay_group(group))?;
        let (committed, audited, beyond) = blocking(|| -> anyhow::Result<_> {
            let committed: HashMap<i32, i64> = replay_positions(&group_reader, dlq)?
                .into_iter()
                .map(|(p, (_, handled))| (p, handled))
                .collect();
            let audited = audited(&group_reader, dlq)?
                .iter()
                .filter_map(|k| {
                    let (p, o) = k.split_once(':')?;
                    Some((p.parse().ok()?, o.parse().ok()?))
                })
                .collect();
            let mut beyond: Vec<(i32, i64)> = read_to_end(&group_reader, dlq, &committed)?
                .iter()
                .map(|m| (m.partition(), m.offset()))
                .collect();
            beyond.sort_unstable();
            Ok((committed, audited, beyond))
        })?;
        Ok(DlqRun {
            dlq: dlq.to_string(),
            producer,
            group: group_reader,
            committed,
            audited,
            beyond,
            partitions: HashMap::new(),
        })
    }

    fn is_handled(&self, partition: i32, offset: i64) -> bool {
        self.committed.get(&partition).is_some_and(|c| offset < *c)
            || self.audited.contains(&(partition, offset))
    }

    fn begin(&self) -> anyhow::Result<()> {
        self.producer
            .begin_transaction()
            .map_err(|e| self.fail("beginning a transaction", e))
    }

    fn replay(
        &mut self,
        letter: &DeadLetter,
        topic: &str,
        out_headers: OwnedHeaders,
    ) -> anyhow::Result<()> {
        let record = &letter.record;
        // The header's partition, only if the target has it (else the key decides).
        let count = match self.partitions.get(topic) {
            Some(n) => *n,
            None => {
                let n = blocking(|| partitions(&self.group, topic, METADATA_TIMEOUT))?.len() as i32;
                self.partitions.insert(topic.to_string(), n);
                n
            }
        };
        let partition = letter
            .header(headers::ORIGINAL_PARTITION)
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or(record.partition());
        let mut out = BaseRecord::to(topic).headers(out_headers);
        if (0..count).contains(&partition) {
            out = out.partition(partition);
        }
        if let Some(key) = record.key() {
            out = out.key(key);
        }
        if let Some(payload) = record.payload() {
            out = out.payload(payload);
        }
        self.send(out)
            .map_err(|e| self.fail(&format!("replaying {} to {topic}", letter.position()), e))
    }

    fn audit(&mut self, letter: &DeadLetter, audit: &str) -> anyhow::Result<()> {
        let key = format!("{}:{}", letter.record.partition(), letter.record.offset());
        let topic = dlq_audit_topic(&self.dlq);
        let out = BaseRecord::to(&topic)
            .key(key.as_bytes())
            .payload(audit.as_bytes());
        self.send(out)
            .map_err(|e| self.fail(&format!("recording {} in {topic}", letter.position()), e))?;
        self.audited
            .insert((letter.record.partition(), letter.record.offset()));
        Ok(())
    }

    /// Enqueues a record, waiting (bounded) while the producer's queue is full.
    fn send(&self, record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        let deadline = std::time::Instant::now() + KAFKA_TIMEOUT;
        let mut record = record;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if std::time::Instant::now() < deadline =>
                {
                    blocking(|| std::thread::sleep(Duration::from_millis(50)));
                    record = r;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Moves the replay group over the handled prefix of each partition and commits the
    /// transaction: records, audit and offsets become visible together, or not at all.
    fn commit(&mut self) -> anyhow::Result<()> {
        let mut next = self.committed.clone();
        let mut blocked = HashSet::new();
        for (p, o) in &self.beyond {
            if blocked.contains(p) {
                continue;
            }
            if self.audited.contains(&(*p, *o)) {
                next.insert(*p, o + 1);
            } else {
                blocked.insert(*p);
            }
        }
        let mut offsets = TopicPartitionList::new();
        for (p, o) in &next {
            if self.committed.get(p) != Some(o) {
                offsets.add_partition_offset(&self.dlq, *p, Offset::Offset(*o))?;
            }
        }
        if offsets.count() > 0 {
            let metadata = self
                .group
                .group_metadata()
                .context("the replay group's metadata")?;
            blocking(|| {
                self.producer
                    .send_offsets_to_transaction(&offsets, &metadata, KAFKA_TIMEOUT)
            })
            .map_err(|e| self.fail("moving the replay group", e))?;
        }
        blocking(|| self.producer.commit_transaction(KAFKA_TIMEOUT))
            .map_err(|e| self.fail("committing", e))?;
        self.committed = next;
        Ok(())
    }

    /// Explains a failed step; aborts the open transaction when that is still possible.
    fn fail(&self, what: &str, e: KafkaError) -> anyhow::Error {
        let is_fencing = |c: Option<RDKafkaErrorCode>| {
            matches!(
                c,
                Some(
                    RDKafkaErrorCode::Fenced
                        | RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                )
            )
        };
        // A send reports only "fatal"; the client knows which fatal error it was.
        let fenced = is_fencing(e.rdkafka_error_code())
            || is_fencing(self.producer.client().fatal_error().map(|(c, _)| c));
        if fenced {
            return anyhow::anyhow!(
                "{what} in {}: another replay or discard of this DLQ started and took it over \
                 (this run was fenced; nothing of its open transaction is kept, and the other run \
                 handles what is left)",
                self.dlq
            );
        }
        if !matches!(&e, KafkaError::Transaction(t) if t.is_fatal()) {
            let _ = blocking(|| self.producer.abort_transaction(KAFKA_TIMEOUT));
        }
        anyhow::anyhow!(
            "{what} in {}: {e} (nothing of the open transaction is kept)",
            self.dlq
        )
    }
}

/// A blocking librdkafka call; on a multi-threaded runtime the worker hands its tasks over first.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
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
    let replayed_from = letter.position();
    let now = now_millis().to_string();
    let (topic, out) = match to {
        ReplayTo::Retry => {
            let topic = pipeline.retry_topic(&letter.input_topic, 1);
            let out = headers::without(record.headers(), |key| {
                key == headers::DUE_TIME || key == headers::RETRY_TIER
            })
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
            let out = headers::without(record.headers(), |key| key.starts_with(headers::PREFIX));
            (topic, out)
        }
    };
    let out = out
        .insert(Header {
            key: headers::REPLAYED_FROM,
            value: Some(&replayed_from),
        })
        .insert(Header {
            key: headers::REPLAYED_TIME,
            value: Some(&now),
        });
    (topic, out)
}
