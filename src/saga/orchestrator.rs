//! Runs a saga: one consumer in the saga's group over the start topic, the reply topics and the
//! dead-letter topics of the step pipelines; one transactional producer.
//!
//! Inputs are taken in small batches. For each batch, in one Kafka transaction: the commands
//! and end events decided, every changed saga state (to the compacted state topic, on the
//! partition the input came from) and the input offsets. A crash anywhere leaves either all of
//! it or none, so no command is sent twice and no state is lost; an aborted batch is read again.
//!
//! State lives in Kafka only. All inputs are keyed by order id, every topic has the same number
//! of partitions and the group uses the range assignor, so partition `p` of every input belongs
//! to one replica, which reads partition `p` of the state topic (up to the last committed
//! transaction) before handling its first input, and forgets it at the next rebalance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use uuid::Uuid;

use super::definition::{Saga, Source};
use super::state::{self, FailedBy, Happening, Input, Outcome, SagaState, SagaStatus};
use crate::contracts::events::now_millis;
use crate::contracts::{AnyEvent, DecodeError, EventCodec, Naming, OrderCreated};
use crate::kafka;
use crate::runtime::headers;
use crate::telemetry::saga::{SagaEvent, SagaTelemetry};

/// Most inputs in one transaction.
const MAX_BATCH: usize = 500;
/// How long a batch waits for more inputs once it has one.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// How often overdue replies are looked for.
const TICK_EVERY: Duration = Duration::from_millis(500);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Notes rebalances, so the loop forgets the states of partitions it may no longer own.
#[derive(Clone, Default)]
struct RebalanceContext {
    rebalanced: Arc<AtomicBool>,
    in_group: Arc<AtomicBool>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            self.rebalanced.store(true, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalanced.store(true, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(_) => self.in_group.store(true, Ordering::SeqCst),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!("saga rebalance failed: {e}"),
        }
    }
}

/// Saga states of one partition, loaded from the state topic.
type PartitionStates = HashMap<Uuid, SagaState>;

/// A record to write in the batch's transaction.
struct OutRecord {
    topic: String,
    partition: Option<i32>,
    key: String,
    payload: Vec<u8>,
    headers: OwnedHeaders,
}

pub struct Orchestrator {
    saga: Saga,
    naming: Naming,
    bootstrap_servers: String,
    codec: Arc<EventCodec>,
    telemetry: SagaTelemetry,
    /// `source` of the events it publishes.
    source: String,
    sources: HashMap<String, Source>,
    state_topic: String,
    group_id: String,
    producer: FutureProducer,
}

impl Orchestrator {
    pub fn new(
        saga: Saga,
        naming: Naming,
        bootstrap_servers: &str,
        codec: Arc<EventCodec>,
    ) -> anyhow::Result<Orchestrator> {
        let group_id = saga.group_id(&naming);
        let steps: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
        let telemetry = SagaTelemetry::new(&saga.name, &group_id, &steps);
        let mut producer_config = kafka::producer_config(bootstrap_servers);
        producer_config
            // One id per instance: a restarted instance fences its predecessor and aborts what it
            // left open, so readers do not wait for the transaction timeout.
            .set(
                "transactional.id",
                format!("{group_id}.{}", crate::runtime::instance_id()),
            )
            // A zombie that never comes back blocks read_committed readers at most this long.
            .set("transaction.timeout.ms", "10000")
            // librdkafka requires a record's delivery timeout within the transaction's.
            .set("message.timeout.ms", "10000")
            // Commands go out with the batch's commit; no extra batching window.
            .set("linger.ms", "1");
        Ok(Orchestrator {
            source: format!("orderflow/saga-{}", saga.name),
            sources: saga.sources(&naming).into_iter().collect(),
            state_topic: saga.state_topic(&naming),
            producer: producer_config
                .create()
                .context("creating the saga producer")?,
            telemetry,
            bootstrap_servers: bootstrap_servers.to_string(),
            group_id,
            saga,
            naming,
            codec,
        })
    }

    pub fn telemetry(&self) -> SagaTelemetry {
        self.telemetry.clone()
    }

    pub fn saga(&self) -> &Saga {
        &self.saga
    }

    /// Creates the saga's topics when missing: inputs, commands and end events with
    /// `partitions`, the state topic compacted with the same count. Refuses to start when the
    /// topics it reads do not all have the same partition count (co-partitioning).
    pub async fn ensure_topics(&self, partitions: i32, replication: i32) -> anyhow::Result<()> {
        let mut topics: Vec<String> = self.sources.keys().cloned().collect();
        topics.extend(self.saga.outputs(&self.naming));
        topics.retain(|t| *t != self.state_topic);
        let plain: Vec<(&str, i32)> = topics.iter().map(|t| (t.as_str(), partitions)).collect();
        kafka::ensure_topics(&self.bootstrap_servers, &plain, replication).await?;
        create_compacted(
            &self.bootstrap_servers,
            &self.state_topic,
            partitions,
            replication,
        )
        .await?;
        let mut read: Vec<String> = self.sources.keys().cloned().collect();
        read.push(self.state_topic.clone());
        let counts = partition_counts(&self.bootstrap_servers, &read).await?;
        let first = counts.values().next().copied().unwrap_or(partitions);
        if counts.values().any(|c| *c != first) {
            let listed: Vec<String> = counts.iter().map(|(t, c)| format!("{t}: {c}")).collect();
            anyhow::bail!(
                "saga {}: every topic it reads and its state topic must have the same partition \
                 count, so one order's events meet in one replica; found {}",
                self.saga.name,
                listed.join(", ")
            );
        }
        Ok(())
    }

    /// Orchestrates until `shutdown` turns true; the batch in hand is committed or aborted.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.init_transactions(TRANSACTION_TIMEOUT))
            .await?
            .context("initialising the saga producer's transactions")?;
        let context = RebalanceContext::default();
        let mut config = kafka::consumer_config(&self.bootstrap_servers, &self.group_id);
        config
            // Offsets are committed by the transactions only.
            .set("enable.auto.commit", "false")
            // Only committed commands, replies and states are read.
            .set("isolation.level", "read_committed")
            // Partition p of every topic to the same replica: one order's events meet there.
            .set("partition.assignment.strategy", "range");
        let consumer: StreamConsumer<RebalanceContext> = config
            .create_with_context(context.clone())
            .context("creating the saga consumer")?;
        let topics: Vec<&str> = self.sources.keys().map(String::as_str).collect();
        consumer.subscribe(&topics).context("subscribing")?;
        tracing::info!(saga = %self.saga.name, group = %self.group_id, ?topics, "saga orchestrator started");
        let mut loaded: HashMap<i32, PartitionStates> = HashMap::new();
        let mut tick = tokio::time::interval(TICK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let batch: Vec<OwnedMessage> = tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tick.tick() => Vec::new(),
                first = consumer.recv() => match first {
                    Ok(m) => {
                        let mut batch = vec![m.detach()];
                        let until = tokio::time::Instant::now() + BATCH_WINDOW;
                        while batch.len() < MAX_BATCH {
                            match tokio::time::timeout_at(until, consumer.recv()).await {
                                Ok(Ok(m)) => batch.push(m.detach()),
                                Ok(Err(e)) => { tracing::warn!("saga consumer error: {e}"); break }
                                Err(_) => break,
                            }
                        }
                        batch
                    }
                    Err(e) => { tracing::warn!("saga consumer error: {e}"); continue }
                },
            };
            if context.rebalanced.swap(false, Ordering::SeqCst) {
                loaded.clear();
            }
            self.telemetry.emit(SagaEvent::Ready {
                ready: context.in_group.load(Ordering::SeqCst),
            });
            if batch.is_empty() && !context.in_group.load(Ordering::SeqCst) {
                continue;
            }
            self.handle_batch(&consumer, &context, &mut loaded, batch)
                .await?;
        }
        self.telemetry.emit(SagaEvent::Ready { ready: false });
        tracing::info!(saga = %self.saga.name, "saga orchestrator stopping");
        Ok(())
    }

    /// Applies a batch (or, when empty, the timeouts) and commits the result in one transaction.
    async fn handle_batch(
        &self,
        consumer: &StreamConsumer<RebalanceContext>,
        context: &RebalanceContext,
        loaded: &mut HashMap<i32, PartitionStates>,
        batch: Vec<OwnedMessage>,
    ) -> anyhow::Result<()> {
        let now = now_millis();
        // Changed states by (partition, order), and everything to publish.
        let mut changed: HashMap<(i32, Uuid), SagaState> = HashMap::new();
        let mut emitted: Vec<(i32, AnyEvent)> = Vec::new();
        let mut happenings: Vec<(Uuid, Happening)> = Vec::new();
        let mut ignored: Vec<(String, &'static str)> = Vec::new();
        let mut offsets: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        for message in &batch {
            let partition = message.partition();
            if let std::collections::hash_map::Entry::Vacant(e) = loaded.entry(partition) {
                e.insert(self.load_partition(partition).await?);
            }
            let input = match self.decode(message).await {
                Ok(Some(input)) => input,
                Ok(None) => {
                    ignored.push((message.topic().to_string(), "undecodable"));
                    note_offset(&mut offsets, message);
                    continue;
                }
                Err(e) => {
                    // The registry is out of reach and the schema not cached: read it again.
                    tracing::warn!(saga = %self.saga.name, "cannot decode yet, retrying the batch: {e}");
                    self.rewind(consumer, &batch, loaded);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Ok(());
                }
            };
            note_offset(&mut offsets, message);
            let order_id = input.order_id();
            let states = loaded.get_mut(&partition).expect("loaded above");
            let current = changed
                .get(&(partition, order_id))
                .or_else(|| states.get(&order_id));
            match state::apply(&self.saga, current, input.as_input(), now, &self.source) {
                Outcome::Changed(t) => {
                    emitted.extend(t.emit.into_iter().map(|e| (partition, e)));
                    happenings.extend(t.happenings.into_iter().map(|h| (order_id, h)));
                    changed.insert((partition, order_id), t.state);
                }
                Outcome::Ignored(reason) => ignored.push((message.topic().to_string(), reason)),
            }
        }
        if batch.is_empty() {
            // Timeouts: only of sagas this instance still owns.
            for (partition, states) in loaded.iter() {
                for (order_id, saga) in states {
                    if saga.status.is_final() || state::next_deadline(saga).is_none_or(|d| d > now)
                    {
                        continue;
                    }
                    if let Outcome::Changed(t) =
                        state::apply(&self.saga, Some(saga), Input::Tick, now, &self.source)
                    {
                        emitted.extend(t.emit.into_iter().map(|e| (*partition, e)));
                        happenings.extend(t.happenings.into_iter().map(|h| (*order_id, h)));
                        changed.insert((*partition, *order_id), t.state);
                    }
                }
            }
            if changed.is_empty() {
                return Ok(());
            }
        }
        let mut records = Vec::new();
        for ((partition, order_id), saga) in &changed {
            records.push(OutRecord {
                topic: self.state_topic.clone(),
                partition: Some(*partition),
                key: order_id.to_string(),
                payload: serde_json::to_vec(saga).expect("saga state serializes"),
                headers: OwnedHeaders::new(),
            });
        }
        for (_, event) in &emitted {
            let topic = self.naming.topic(event.event_type());
            let payload = match event.encode(&self.codec, &topic).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(saga = %self.saga.name, "cannot encode {} yet, retrying the batch: {e}", event.event_type());
                    self.rewind(consumer, &batch, loaded);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Ok(());
                }
            };
            records.push(OutRecord {
                topic,
                partition: None,
                key: event.key(),
                payload,
                headers: kafka::cloudevents_headers(event.envelope()),
            });
        }
        // Offsets: of the batch's inputs, or (timeouts) the current positions, so the group's
        // generation fences a replica that lost these partitions.
        let mut tpl = TopicPartitionList::new();
        if batch.is_empty() {
            if let Ok(positions) = consumer.position() {
                for e in positions.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        let _ =
                            tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
                    }
                }
            }
        } else {
            for ((topic, partition), (_, last)) in &offsets {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(last + 1));
            }
        }
        match self.commit(consumer, &records, &tpl).await {
            Ok(()) => {}
            Err(Fatal(e)) => return Err(e),
            Err(Abortable(e)) => {
                tracing::warn!(saga = %self.saga.name, "saga transaction aborted, reading the batch again: {e}");
                self.rewind(consumer, &batch, loaded);
                loaded.clear();
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(());
            }
        }
        // Committed: the new states are the known ones, and what happened is told.
        for ((partition, order_id), saga) in changed {
            loaded.entry(partition).or_default().insert(order_id, saga);
        }
        for (topic, reason) in &ignored {
            self.telemetry.emit(SagaEvent::Ignored { topic, reason });
        }
        for (order_id, happening) in &happenings {
            self.tell(order_id, happening);
        }
        if context.rebalanced.load(Ordering::SeqCst) {
            loaded.clear();
        }
        let (mut in_flight, mut stuck) = (0, 0);
        for saga in loaded.values().flat_map(|p| p.values()) {
            match saga.status {
                SagaStatus::Confirmed | SagaStatus::Cancelled => {}
                SagaStatus::Stuck => stuck += 1,
                _ => in_flight += 1,
            }
        }
        self.telemetry.emit(SagaEvent::Gauges { in_flight, stuck });
        Ok(())
    }

    fn tell(&self, order_id: &Uuid, happening: &Happening) {
        let order_id = &order_id.to_string();
        let event = match happening {
            Happening::Started => SagaEvent::Started { order_id },
            Happening::StepSucceeded { step, seconds } => SagaEvent::StepEnded {
                order_id,
                step,
                result: "succeeded",
                seconds: *seconds,
            },
            Happening::StepFailed { step, seconds, why } => SagaEvent::StepEnded {
                order_id,
                step,
                result: match why {
                    FailedBy::Reply => "failed",
                    FailedBy::DeadLettered => "dead_lettered",
                    FailedBy::TimedOut => "timed_out",
                },
                seconds: *seconds,
            },
            Happening::CompensationSent { step } => SagaEvent::CompensationSent { order_id, step },
            Happening::Compensated { step } => SagaEvent::Compensated { order_id, step },
            Happening::Confirmed { seconds } => SagaEvent::Ended {
                order_id,
                outcome: "confirmed",
                seconds: *seconds,
            },
            Happening::Cancelled { seconds } => SagaEvent::Ended {
                order_id,
                outcome: "cancelled",
                seconds: *seconds,
            },
            Happening::Stuck { step } => SagaEvent::Stuck { order_id, step },
            Happening::Resumed => return,
        };
        self.telemetry.emit(event);
    }

    /// Decodes an input; `Ok(None)` for one that can never be decoded (logged and counted),
    /// `Err` for one that may decode later (registry unreachable).
    async fn decode(&self, message: &OwnedMessage) -> Result<Option<Decoded>, DecodeError> {
        let Some(source) = self.sources.get(message.topic()) else {
            return Ok(None);
        };
        let (event_type, dead) = match source {
            Source::Start => (self.saga.starts_on.as_str(), false),
            Source::Reply(t) => (t.as_str(), false),
            Source::DeadLetters { command } => (command.as_str(), true),
        };
        match AnyEvent::decode(&self.codec, event_type, message.payload()).await {
            Ok(event) => Ok(Some(match (event, dead) {
                (AnyEvent::OrderCreated(order), false) => Decoded::Started(order),
                (event, false) => Decoded::Reply(event),
                (command, true) => {
                    let error = message
                        .headers()
                        .and_then(|h| {
                            h.iter()
                                .find(|h| h.key == headers::ERROR_MESSAGE)
                                .and_then(|h| h.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                        .unwrap_or_else(|| "no error recorded".into());
                    Decoded::DeadLettered { command, error }
                }
            })),
            Err(e) if e.is_retryable() => Err(e),
            Err(e) => {
                tracing::warn!(
                    saga = %self.saga.name,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    "input ignored, it cannot be decoded: {e}"
                );
                Ok(None)
            }
        }
    }

    /// Seeks every partition of the batch back to its first input, and forgets their states
    /// (they may hold changes that were not committed).
    fn rewind(
        &self,
        consumer: &StreamConsumer<RebalanceContext>,
        batch: &[OwnedMessage],
        loaded: &mut HashMap<i32, PartitionStates>,
    ) {
        let mut first: HashMap<(&str, i32), i64> = HashMap::new();
        for m in batch {
            first
                .entry((m.topic(), m.partition()))
                .or_insert(m.offset());
            loaded.remove(&m.partition());
        }
        for ((topic, partition), offset) in first {
            if let Err(e) = consumer.seek(
                topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                tracing::warn!(topic, partition, offset, "cannot seek back: {e}");
            }
        }
    }

    async fn commit(
        &self,
        consumer: &StreamConsumer<RebalanceContext>,
        records: &[OutRecord],
        offsets: &TopicPartitionList,
    ) -> Result<(), TransactionError> {
        self.producer.begin_transaction().map_err(classify)?;
        let sends = records.iter().map(|r| {
            let mut record = FutureRecord::to(&r.topic)
                .key(&r.key)
                .payload(&r.payload)
                .headers(r.headers.clone());
            if let Some(p) = r.partition {
                record = record.partition(p);
            }
            self.producer
                .send(record, Timeout::After(TRANSACTION_TIMEOUT))
        });
        let mut failed = None;
        for result in join_all(sends).await {
            if let Err((e, _)) = result {
                failed = Some(e);
            }
        }
        let result = match failed {
            Some(e) => Err(e),
            None => tokio::task::block_in_place(|| {
                if offsets.count() > 0 {
                    let metadata = consumer.group_metadata().ok_or(
                        rdkafka::error::KafkaError::ConsumerCommit(
                            rdkafka::types::RDKafkaErrorCode::State,
                        ),
                    )?;
                    self.producer.send_offsets_to_transaction(
                        offsets,
                        &metadata,
                        TRANSACTION_TIMEOUT,
                    )?;
                }
                self.producer.commit_transaction(TRANSACTION_TIMEOUT)
            }),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let error = classify(e);
                if let Abortable(_) = &error {
                    if let Err(abort) = tokio::task::block_in_place(|| {
                        self.producer.abort_transaction(TRANSACTION_TIMEOUT)
                    }) {
                        return Err(Fatal(anyhow::anyhow!(
                            "aborting the saga transaction failed: {abort}"
                        )));
                    }
                }
                Err(error)
            }
        }
    }

    /// Reads partition `partition` of the state topic up to its last committed record: the
    /// newest state of each order, newer versions winning.
    async fn load_partition(&self, partition: i32) -> anyhow::Result<PartitionStates> {
        let bootstrap = self.bootstrap_servers.clone();
        let topic = self.state_topic.clone();
        let records =
            tokio::task::spawn_blocking(move || read_partition(&bootstrap, &topic, partition))
                .await??;
        let mut states = PartitionStates::new();
        for (_, payload) in records {
            let Some(payload) = payload else { continue };
            let saga: SagaState = match serde_json::from_slice(&payload) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(topic = %self.state_topic, partition, "unreadable saga state skipped: {e}");
                    continue;
                }
            };
            match states.get(&saga.order_id) {
                Some(known) if known.version >= saga.version => {
                    self.telemetry.emit(SagaEvent::StaleState {
                        order_id: &saga.order_id.to_string(),
                        version: saga.version,
                        known: known.version,
                    });
                }
                _ => {
                    states.insert(saga.order_id, saga);
                }
            }
        }
        tracing::debug!(saga = %self.saga.name, partition, sagas = states.len(), "saga states loaded");
        Ok(states)
    }
}

/// An input, decoded.
enum Decoded {
    Started(OrderCreated),
    Reply(AnyEvent),
    DeadLettered { command: AnyEvent, error: String },
}

impl Decoded {
    fn order_id(&self) -> Uuid {
        match self {
            Decoded::Started(o) => o.data.order_id,
            Decoded::Reply(e) | Decoded::DeadLettered { command: e, .. } => {
                Uuid::parse_str(&e.key()).unwrap_or_default()
            }
        }
    }

    fn as_input(&self) -> Input<'_> {
        match self {
            Decoded::Started(o) => Input::Started(o),
            Decoded::Reply(e) => Input::Reply(e),
            Decoded::DeadLettered { command, error } => Input::DeadLettered {
                command,
                error: error.clone(),
            },
        }
    }
}

fn note_offset(offsets: &mut HashMap<(String, i32), (i64, i64)>, m: &OwnedMessage) {
    let entry = offsets
        .entry((m.topic().to_string(), m.partition()))
        .or_insert((m.offset(), m.offset()));
    entry.1 = entry.1.max(m.offset());
}

enum TransactionError {
    Abortable(String),
    Fatal(anyhow::Error),
}
use TransactionError::{Abortable, Fatal};

fn classify(error: rdkafka::error::KafkaError) -> TransactionError {
    match &error {
        rdkafka::error::KafkaError::Transaction(e) if e.is_fatal() => {
            Fatal(anyhow::Error::new(error))
        }
        _ => Abortable(error.to_string()),
    }
}

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
async fn create_compacted(
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
async fn partition_counts(
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
