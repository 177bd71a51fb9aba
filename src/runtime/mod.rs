//! Runs a pipeline: one consumer (its group) over the input topics and the pipeline's own retry
//! topics, one idempotent producer (acks=all).
//!
//! For each record, in partition order:
//! 1. a retry record that is not due yet rewinds and pauses its partition until it is due; no
//!    other partition waits, and the consumer never sleeps;
//! 2. the record is decoded and validated, then the step runs; transient failures are retried
//!    at once a few times (jittered);
//! 3. the router writes the outputs, or the record to the next retry tier, or to the
//!    dead-letter topic, as `failure::Classifier` decides, with the failure context in headers;
//! 4. only when every record written for this input is acknowledged is its offset stored (and
//!    later committed). Writing does not wait for acks: up to `MAX_IN_FLIGHT` inputs may be
//!    awaiting theirs, and they are finished strictly in order, so an offset is never stored
//!    past an input that is not safely written. A write that keeps failing is retried without
//!    end and reported loudly, and no new record is read until it succeeds.
//!
//! With `delivery: exactly-once` each input is instead one transaction: its records and its
//! offset commit together or not at all.
//!
//! Delivery is at least once: a crash between writing and committing repeats the step, and
//! downstream HTTP services see the same `Idempotency-Key` again.

pub mod context;
pub mod dedup;
pub mod headers;
pub mod monitor;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::join_all;
use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::contracts::events::now_millis;
use crate::contracts::{AnyEvent, EventCodec, Naming};
use crate::failure::{ErrorClass, Failure};
use crate::kafka;
use crate::pipeline::{Delivery, Pipeline};
use crate::steps::{HandlerContext, StepRunner};
use crate::telemetry::{ProcessorEvent, Telemetry};
use context::MeteredContext;
use dedup::DedupStore;
use headers::FailureContext;

/// Longest error message written to a header.
const MAX_ERROR_MESSAGE: usize = 1000;
/// Partitions of an input topic the runtime has to create itself.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Inputs whose records may be awaiting acks at once (at-least-once mode). Offsets are still
/// stored strictly in order, and only once every record of an input is acknowledged.
const MAX_IN_FLIGHT: usize = 1000;
/// Longest a graceful stop waits for in-flight writes (the pod's grace period is 45 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// How often DLQ depth, retry backlog and readiness are measured.
const MONITOR_EVERY: Duration = Duration::from_secs(10);

/// What a subscribed topic is to this pipeline.
#[derive(Debug, Clone)]
enum Role {
    Input {
        event_type: String,
    },
    Retry {
        input_topic: String,
        event_type: String,
    },
}

/// A record to write, owned.
struct OutRecord {
    topic: String,
    partition: Option<i32>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

/// What processing one input gave.
enum Processed {
    Done {
        event_id: uuid::Uuid,
        occurred_at_ms: i64,
        records: Vec<OutRecord>,
    },
    Duplicate {
        event_id: uuid::Uuid,
    },
}

/// How one input ended, for telemetry once its records are acknowledged.
enum Ending {
    Succeeded {
        /// Topic of each record written.
        outputs: Vec<String>,
        event_id: uuid::Uuid,
        occurred_at_ms: i64,
    },
    Duplicate {
        event_id: uuid::Uuid,
    },
    Retried {
        tier: usize,
        class: ErrorClass,
        kind: &'static str,
        message: String,
    },
    DeadLettered {
        topic: String,
        class: ErrorClass,
        kind: &'static str,
        message: String,
    },
}

/// Per record: acknowledged, refused (why), or the producer went away.
type Acks = Vec<Result<Result<(), String>, futures::channel::oneshot::Canceled>>;

/// An input whose records are written but not all acknowledged yet.
struct InFlight {
    topic: String,
    partition: i32,
    offset: i64,
    ending: Ending,
    /// Records not yet acknowledged (all of them until the first acks arrive).
    pending: Vec<OutRecord>,
    acks: std::pin::Pin<Box<dyn std::future::Future<Output = Acks> + Send>>,
    /// Rounds of writing that had a failure.
    failed_rounds: u32,
}

/// Inputs written and awaiting their acks, in order, with the event ids of those that
/// succeeded: a repeat of one of them counts as handled. The set is kept as inputs come and go
/// (building it for every record cost more CPU than decoding it, with 1000 in flight).
#[derive(Default)]
struct InFlightQueue {
    queue: VecDeque<InFlight>,
    succeeded: HashSet<uuid::Uuid>,
}

impl InFlightQueue {
    fn push_back(&mut self, input: InFlight) {
        if let Ending::Succeeded { event_id, .. } = &input.ending {
            self.succeeded.insert(*event_id);
        }
        self.queue.push_back(input);
    }

    fn pop_front(&mut self) -> Option<InFlight> {
        let input = self.queue.pop_front()?;
        if let Ending::Succeeded { event_id, .. } = &input.ending {
            self.succeeded.remove(event_id);
        }
        Some(input)
    }

    fn front(&self) -> Option<&InFlight> {
        self.queue.front()
    }

    fn front_mut(&mut self) -> Option<&mut InFlight> {
        self.queue.front_mut()
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
enum TransactionError {
    /// Aborted (or abortable): redo the input.
    #[error("{0}")]
    Abortable(String),
    /// The producer cannot go on (e.g. fenced by a newer instance): stop the processor.
    #[error("fatal transaction error: {0}")]
    Fatal(anyhow::Error),
}

impl TransactionError {
    fn from_kafka(error: rdkafka::error::KafkaError) -> TransactionError {
        match &error {
            rdkafka::error::KafkaError::Transaction(e) if e.is_fatal() => {
                TransactionError::Fatal(anyhow::Error::new(error))
            }
            _ => TransactionError::Abortable(error.to_string()),
        }
    }
}

impl OutRecord {
    fn future_record(&self) -> FutureRecord<'_, Vec<u8>, Vec<u8>> {
        let mut record = FutureRecord::to(&self.topic).headers(self.headers.clone());
        if let Some(key) = &self.key {
            record = record.key(key);
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload);
        }
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        record
    }
}

/// A partition waiting for its head retry record to become due.
struct Paused {
    head_offset: i64,
}

pub struct Processor {
    pipeline: Pipeline,
    naming: Naming,
    group_id: String,
    bootstrap_servers: String,
    codec: Arc<EventCodec>,
    step: StepRunner,
    producer: FutureProducer<MeteredContext>,
    context: MeteredContext,
    telemetry: Telemetry,
    roles: HashMap<String, Role>,
    dedup: Option<Arc<DedupStore>>,
    /// Exactly-once: each input's records and offset are committed in one transaction.
    transactional: bool,
}

impl Processor {
    /// `dedup`: the store of handled event ids; `None` turns deduplication off.
    pub fn new(
        pipeline: Pipeline,
        naming: Naming,
        bootstrap_servers: &str,
        codec: Arc<EventCodec>,
        dedup: Option<Arc<DedupStore>>,
        handlers: &HandlerContext,
    ) -> anyhow::Result<Processor> {
        let mut roles = HashMap::new();
        for event_type in &pipeline.inputs {
            let input_topic = naming.topic(event_type);
            for tier in 1..=pipeline.retry.tiers.len() {
                roles.insert(
                    pipeline.retry_topic(&input_topic, tier),
                    Role::Retry {
                        input_topic: input_topic.clone(),
                        event_type: event_type.clone(),
                    },
                );
            }
            roles.insert(
                input_topic,
                Role::Input {
                    event_type: event_type.clone(),
                },
            );
        }
        let telemetry = Telemetry::new(
            &pipeline.name,
            &pipeline.group_id(&naming),
            pipeline.retry.tiers.len(),
        );
        let context = MeteredContext::new(telemetry.clone());
        let mut producer_config = kafka::producer_config(bootstrap_servers);
        // Each input waits for its outputs' acks, so a batching window would only add latency.
        producer_config.set("linger.ms", "1");
        producer_config.set("statistics.interval.ms", context::STATISTICS_INTERVAL_MS);
        let transactional = pipeline.delivery == Delivery::ExactlyOnce;
        if transactional {
            // A stable id per instance: a restarted instance fences its predecessor and aborts
            // the transaction it left open, instead of readers waiting for it to time out.
            producer_config
                .set(
                    "transactional.id",
                    format!("{}.{}", pipeline.group_id(&naming), instance_id()),
                )
                // A zombie that never comes back blocks read_committed readers at most this long.
                .set("transaction.timeout.ms", "10000")
                // librdkafka requires a record's delivery timeout within the transaction's.
                .set("message.timeout.ms", "10000");
        }
        Ok(Processor {
            group_id: pipeline.group_id(&naming),
            step: StepRunner::for_pipeline(&pipeline, handlers),
            producer: producer_config
                .create_with_context(context.clone())
                .context("creating the producer")?,
            context,
            telemetry,
            bootstrap_servers: bootstrap_servers.to_string(),
            pipeline,
            naming,
            codec,
            roles,
            dedup,
            transactional,
        })
    }

    pub fn telemetry(&self) -> Telemetry {
        self.telemetry.clone()
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Creates what the pipeline reads and writes when missing (see [`ensure_topics`]).
    pub async fn ensure_topics(&self, replication: i32) -> anyhow::Result<Vec<(String, i32)>> {
        ensure_topics(
            &self.bootstrap_servers,
            &self.naming,
            &self.pipeline,
            replication,
        )
        .await
    }

    /// Consumes until `shutdown` turns true, then finishes the record in hand, flushes the
    /// producer and commits what was stored.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut consumer_config = kafka::consumer_config(&self.bootstrap_servers, &self.group_id);
        if self.transactional {
            // Offsets are committed by the producer's transactions only.
            consumer_config.set("enable.auto.commit", "false");
            let producer = self.producer.clone();
            tokio::task::spawn_blocking(move || {
                producer.init_transactions(Duration::from_secs(30))
            })
            .await?
            .context("initialising transactions")?;
        }
        consumer_config.set("statistics.interval.ms", context::STATISTICS_INTERVAL_MS);
        let consumer: StreamConsumer<MeteredContext> = consumer_config
            .create_with_context(self.context.clone())
            .context("creating the consumer")?;
        let monitor = monitor::Monitor {
            pipeline: self.pipeline.clone(),
            naming: self.naming.clone(),
            group_id: self.group_id.clone(),
            bootstrap_servers: self.bootstrap_servers.clone(),
            telemetry: self.telemetry.clone(),
            context: self.context.clone(),
            codec: self.codec.clone(),
        };
        let monitoring = tokio::spawn(monitor.run(MONITOR_EVERY, shutdown.clone()));
        let topics: Vec<&str> = self.roles.keys().map(String::as_str).collect();
        consumer.subscribe(&topics).context("subscribing")?;
        tracing::info!(pipeline = %self.pipeline.name, group = %self.group_id, ?topics, "processor started");
        let (resume_tx, mut resume_rx) = mpsc::unbounded_channel::<(String, i32)>();
        let mut paused: HashMap<(String, i32), Paused> = HashMap::new();
        let mut in_flight = InFlightQueue::default();
        while !*shutdown.borrow() {
            let head_failing = in_flight.front().is_some_and(|h| h.failed_rounds > 0);
            let room = in_flight.len() < MAX_IN_FLIGHT && !head_failing;
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some((topic, partition)) = resume_rx.recv() => {
                    let key = (topic.clone(), partition);
                    let Some(p) = paused.remove(&key) else { continue };
                    let assigned = consumer
                        .assignment()
                        .map(|a| a.find_partition(&topic, partition).is_some())
                        .unwrap_or(false);
                    if !assigned {
                        continue; // revoked meanwhile: its new owner reads the record
                    }
                    // Seek to the waiting record again before resuming: had the first rewind
                    // failed, resuming alone would go past it.
                    if !rewind(&consumer, &topic, partition, p.head_offset, "before resuming (trying again)") {
                        paused.insert(key.clone(), p);
                        let tx = resume_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = tx.send(key);
                        });
                        continue;
                    }
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, partition);
                    if let Err(e) = consumer.resume(&tpl) {
                        tracing::debug!(%topic, partition, "resume after a rebalance: {e}");
                    }
                }
                acks = head_acks(&mut in_flight) => self.finish_head(&consumer, &mut in_flight, acks).await,
                message = consumer.recv(), if room => match message {
                    Ok(message) => self.handle(&consumer, &message, &mut paused, &resume_tx, &mut in_flight).await?,
                    Err(e) => tracing::warn!(pipeline = %self.pipeline.name, "consumer error: {e}"),
                },
            }
        }
        // Finish what is in flight, so its offsets can be committed below, but within a bound:
        // what is still unacknowledged then keeps its offset uncommitted and is read again.
        let drain_until = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(drain_until, head_acks(&mut in_flight)).await {
                Ok(acks) => self.finish_head(&consumer, &mut in_flight, acks).await,
                Err(_) => {
                    tracing::warn!(
                        pipeline = %self.pipeline.name,
                        unfinished = in_flight.len(),
                        "shutdown: inputs still unacknowledged after {DRAIN_TIMEOUT:?}; they stay uncommitted and will be read again"
                    );
                    break;
                }
            }
        }
        monitoring.abort();
        tracing::info!(pipeline = %self.pipeline.name, "stopping: flushing and committing");
        self.producer
            .flush(Duration::from_secs(10))
            .context("flushing the producer")?;
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => return Err(e).context("committing offsets"),
        }
        Ok(())
    }

    async fn handle(
        &self,
        consumer: &StreamConsumer<MeteredContext>,
        message: &BorrowedMessage<'_>,
        paused: &mut HashMap<(String, i32), Paused>,
        resume_tx: &mpsc::UnboundedSender<(String, i32)>,
        in_flight: &mut InFlightQueue,
    ) -> anyhow::Result<()> {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let key = (topic.to_string(), partition);
        if let Some(p) = paused.get(&key) {
            // Fetched before the pause took effect: rewind again, the timer still runs.
            rewind_and_pause(consumer, topic, partition, p.head_offset);
            return Ok(());
        }
        self.telemetry.emit(ProcessorEvent::Consumed {
            topic,
            partition,
            offset,
        });
        let Some(role) = self.roles.get(topic) else {
            tracing::error!(
                topic,
                "record from a topic this pipeline did not subscribe to"
            );
            return Ok(());
        };
        let (event_type, input_topic, context) = match role {
            Role::Input { event_type } => (event_type.as_str(), topic, None),
            Role::Retry {
                input_topic,
                event_type,
            } => match FailureContext::read(message.headers()) {
                Some(context) => {
                    let now = now_millis();
                    if let Some(due) = context.due_ms.filter(|due| *due > now) {
                        let wait = Duration::from_millis((due - now) as u64);
                        rewind_and_pause(consumer, topic, partition, offset);
                        paused.insert(
                            key.clone(),
                            Paused {
                                head_offset: offset,
                            },
                        );
                        let tx = resume_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = tx.send(key);
                        });
                        self.telemetry.emit(ProcessorEvent::Deferred {
                            topic,
                            partition,
                            wait_ms: wait.as_millis() as u64,
                        });
                        return Ok(());
                    }
                    if let Some(due) = context.due_ms {
                        self.telemetry.emit(ProcessorEvent::RetryLateness {
                            tier: context.tier,
                            late_ms: now - due,
                        });
                    }
                    (event_type.as_str(), input_topic.as_str(), Some(context))
                }
                None => (event_type.as_str(), input_topic.as_str(), None),
            },
        };
        let malformed_retry = matches!(role, Role::Retry { .. }) && context.is_none();
        let (records, ending) = if malformed_retry {
            let failure = Failure::BusinessRule(format!(
                "record on retry topic {topic} has missing or malformed {}* headers",
                headers::PREFIX
            ));
            self.failure_records(message, input_topic, None, ErrorClass::Permanent, &failure)
        } else {
            let started = std::time::Instant::now();
            let processed = self
                .process(event_type, message, &in_flight.succeeded)
                .await;
            self.telemetry.emit(ProcessorEvent::Handled {
                seconds: started.elapsed().as_secs_f64(),
            });
            match processed {
                Ok(Processed::Done {
                    event_id,
                    occurred_at_ms,
                    records,
                }) => {
                    let outputs = records.iter().map(|r| r.topic.clone()).collect();
                    (
                        records,
                        Ending::Succeeded {
                            outputs,
                            event_id,
                            occurred_at_ms,
                        },
                    )
                }
                Ok(Processed::Duplicate { event_id }) => {
                    (Vec::new(), Ending::Duplicate { event_id })
                }
                Err((class, failure)) => {
                    self.failure_records(message, input_topic, context, class, &failure)
                }
            }
        };
        if self.transactional {
            if let Err(e) = self.commit_in_transaction(consumer, message, records).await {
                if let TransactionError::Fatal(e) = e {
                    return Err(e);
                }
                // Aborted: nothing of it is visible; read the input again and redo it.
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    "transaction aborted, retrying the input: {e}"
                );
                rewind(
                    consumer,
                    topic,
                    partition,
                    offset,
                    "after an aborted transaction",
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(());
            }
        } else {
            // Written now, acknowledged later: the loop finishes inputs in order.
            in_flight.push_back(InFlight {
                topic: topic.to_string(),
                partition,
                offset,
                ending,
                acks: self.send_all(&records),
                pending: records,
                failed_rounds: 0,
            });
            return Ok(());
        }
        self.end(topic, ending).await;
        Ok(())
    }

    /// The dedup mark and telemetry for an input whose records are all acknowledged.
    async fn end(&self, topic: &str, ending: Ending) {
        if let Ending::Succeeded { event_id, .. } = &ending {
            self.mark_handled(&[*event_id]).await;
        }
        self.tell(topic, ending);
    }

    /// Telemetry for an input that is finished.
    fn tell(&self, topic: &str, ending: Ending) {
        match ending {
            Ending::Succeeded {
                outputs,
                event_id: _,
                occurred_at_ms,
            } => {
                self.telemetry.emit(ProcessorEvent::Succeeded {
                    topic,
                    outputs: &outputs,
                    occurred_at_ms,
                });
            }
            Ending::Duplicate { event_id } => self.telemetry.emit(ProcessorEvent::Duplicate {
                topic,
                event_id: &event_id.to_string(),
            }),
            Ending::Retried {
                tier,
                class,
                kind,
                message,
            } => self.telemetry.emit(ProcessorEvent::Retried {
                tier,
                class,
                kind,
                message: &message,
            }),
            Ending::DeadLettered {
                topic,
                class,
                kind,
                message,
            } => self.telemetry.emit(ProcessorEvent::DeadLettered {
                topic: &topic,
                class,
                kind,
                message: &message,
            }),
        }
    }

    /// Enqueues every record with the producer; the future resolves with all their acks.
    fn send_all(
        &self,
        records: &[OutRecord],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Acks> + Send>> {
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let mut future_record = record.future_record();
            let delivery = loop {
                match self.producer.send_result(future_record) {
                    Ok(delivery) => {
                        break delivery
                            .map(|ack| {
                                ack.map(|result| result.map(|_| ()).map_err(|(e, _)| e.to_string()))
                            })
                            .boxed()
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        // librdkafka's own threads drain the queue; wait a moment.
                        future_record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((error, _)) => {
                        // Reported like a failed delivery, and written again the same way.
                        break futures::future::ready(Ok(Err(error.to_string()))).boxed();
                    }
                }
            };
            deliveries.push(delivery);
        }
        Box::pin(join_all(deliveries))
    }

    /// The head's acks arrived: store its offset when all succeeded, else write the failed
    /// records again (the loop reads nothing new until they are written).
    async fn finish_head(
        &self,
        consumer: &StreamConsumer<MeteredContext>,
        in_flight: &mut InFlightQueue,
        acks: Acks,
    ) {
        let head = in_flight.front_mut().expect("acks come from the head");
        if !self.all_acknowledged(head, acks).await {
            return;
        }
        let mut done = vec![in_flight.pop_front().expect("head exists")];
        // Under load the next inputs' acks are often in already: finish them together, so
        // their dedup marks reach the store in one statement.
        while let Some(next) = in_flight.front_mut() {
            let Some(acks) = next.acks.as_mut().now_or_never() else {
                break;
            };
            if !self.all_acknowledged(next, acks).await {
                break;
            }
            done.push(in_flight.pop_front().expect("next exists"));
        }
        let succeeded: Vec<uuid::Uuid> = done
            .iter()
            .filter_map(|f| match &f.ending {
                Ending::Succeeded { event_id, .. } => Some(*event_id),
                _ => None,
            })
            .collect();
        self.mark_handled(&succeeded).await;
        for finished in done {
            self.tell(&finished.topic, finished.ending);
            if let Err(e) =
                consumer.store_offset(&finished.topic, finished.partition, finished.offset)
            {
                // The partition was revoked meanwhile: its new owner reads this record again.
                tracing::warn!(topic = %finished.topic, partition = finished.partition, offset = finished.offset, "offset not stored: {e}");
            }
        }
    }

    /// True when every record of `input` is acknowledged; otherwise reports the failures and
    /// writes the refused records again (after a growing pause).
    async fn all_acknowledged(&self, input: &mut InFlight, acks: Acks) -> bool {
        let mut failed = Vec::new();
        for (record, ack) in std::mem::take(&mut input.pending).into_iter().zip(acks) {
            let error = match ack {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(_) => "the producer went away".to_string(),
            };
            self.telemetry.emit(ProcessorEvent::ProduceFailed {
                topic: &record.topic,
                error: &error,
                attempt: input.failed_rounds + 1,
            });
            failed.push(record);
        }
        if failed.is_empty() {
            return true;
        }
        input.failed_rounds += 1;
        tokio::time::sleep(Duration::from_millis(
            200 * u64::from(input.failed_rounds.min(50)),
        ))
        .await;
        input.acks = self.send_all(&failed);
        input.pending = failed;
        false
    }

    /// Decode, run the step (with in-process retries of transient failures), encode outputs.
    async fn process(
        &self,
        event_type: &str,
        message: &BorrowedMessage<'_>,
        in_flight: &HashSet<uuid::Uuid>,
    ) -> Result<Processed, (ErrorClass, Failure)> {
        let classify = |failure: Failure| (self.pipeline.classifier.classify(&failure), failure);
        let event = AnyEvent::decode(&self.codec, event_type, message.payload())
            .await
            .map_err(|e| classify(Failure::Decode(e)))?;
        let event_id = event.envelope().event_id;
        // The same event still awaiting its acks counts as handled.
        if in_flight.contains(&event_id) {
            return Ok(Processed::Duplicate { event_id });
        }
        if let Some(dedup) = &self.dedup {
            match dedup.seen(&self.group_id, event_id).await {
                Ok(true) => return Ok(Processed::Duplicate { event_id }),
                Ok(false) => {}
                Err(e) => return Err(classify(Failure::Dependency(e.to_string()))),
            }
        }
        let mut attempt = 0;
        let outcome = loop {
            match self.step.run(&event).await {
                Ok(outcome) => break outcome,
                Err(failure) => {
                    let class = self.pipeline.classifier.classify(&failure);
                    if class == ErrorClass::Transient
                        && attempt < self.pipeline.retry.transient_attempts
                    {
                        attempt += 1;
                        self.telemetry.emit(ProcessorEvent::TransientRetry {
                            attempt,
                            kind: failure.kind(),
                            message: &failure.to_string(),
                        });
                        tokio::time::sleep(jittered_backoff(attempt)).await;
                        continue;
                    }
                    // Transient failures that outlast their attempts are treated as a service down.
                    let class = if class == ErrorClass::Transient {
                        ErrorClass::Service
                    } else {
                        class
                    };
                    return Err((class, failure));
                }
            }
        };
        let mut records = Vec::with_capacity(outcome.events.len() + outcome.copies.len());
        for event in &outcome.events {
            let topic = self.naming.topic(event.event_type());
            let payload = event
                .encode(&self.codec, &topic)
                .await
                .map_err(|e| classify(Failure::Encode(e)))?;
            records.push(OutRecord {
                headers: kafka::cloudevents_headers(event.envelope()),
                key: Some(event.key().into_bytes()),
                payload: Some(payload),
                partition: None,
                topic,
            });
        }
        for to in &outcome.copies {
            records.push(OutRecord {
                topic: self.naming.topic(to),
                partition: None,
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                headers: copy_headers(message),
            });
        }
        Ok(Processed::Done {
            event_id,
            occurred_at_ms: event.envelope().occurred_at,
            records,
        })
    }

    /// Records a handled event, after its outputs are acknowledged. A failure here cannot
    /// undo the outputs; it is retried briefly, then reported (a redelivery would repeat it).
    async fn mark_handled(&self, event_ids: &[uuid::Uuid]) {
        let Some(dedup) = &self.dedup else { return };
        if event_ids.is_empty() {
            return;
        }
        let mut last_error = None;
        for attempt in 0..3 {
            match dedup.mark_many(&self.group_id, event_ids).await {
                Ok(()) => return,
                Err(e) => {
                    last_error = Some(e.to_string());
                    tokio::time::sleep(jittered_backoff(attempt + 1)).await;
                }
            }
        }
        for event_id in event_ids {
            self.telemetry.emit(ProcessorEvent::DedupMarkFailed {
                event_id: &event_id.to_string(),
                error: last_error.as_deref().unwrap_or_default(),
            });
        }
    }

    /// The record for the next retry tier, or for the dead-letter topic.
    fn failure_records(
        &self,
        message: &BorrowedMessage<'_>,
        input_topic: &str,
        context: Option<FailureContext>,
        class: ErrorClass,
        failure: &Failure,
    ) -> (Vec<OutRecord>, Ending) {
        let now = now_millis();
        let previous = context.unwrap_or_else(|| FailureContext {
            attempt: 0,
            original_topic: message.topic().to_string(),
            original_partition: message.partition(),
            original_offset: message.offset(),
            original_timestamp: message.timestamp().to_millis(),
            first_failure_ms: now,
            tier: 0,
            due_ms: None,
        });
        let next_tier = previous.tier + 1;
        let tiers = &self.pipeline.retry.tiers;
        let to_retry = class == ErrorClass::Service && next_tier <= tiers.len();
        let (topic, tier, due_ms) = if to_retry {
            let due = now + tiers[next_tier - 1].as_millis() as i64;
            (
                self.pipeline.retry_topic(input_topic, next_tier),
                next_tier,
                Some(due),
            )
        } else {
            (self.pipeline.dlq_topic(input_topic), previous.tier, None)
        };
        let context = FailureContext {
            attempt: previous.attempt + 1,
            tier,
            due_ms,
            ..previous
        };
        let mut text = failure.to_string();
        if text.len() > MAX_ERROR_MESSAGE {
            let mut end = MAX_ERROR_MESSAGE;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let record = OutRecord {
            headers: headers::with_failure(
                message.headers(),
                &context,
                &self.group_id,
                class,
                failure.kind(),
                &text,
            ),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            partition: Some(context.original_partition),
            topic: topic.clone(),
        };
        let ending = if to_retry {
            Ending::Retried {
                tier,
                class,
                kind: failure.kind(),
                message: text,
            }
        } else {
            Ending::DeadLettered {
                topic,
                class,
                kind: failure.kind(),
                message: text,
            }
        };
        (vec![record], ending)
    }

    /// Writes the records, then the input's next offset, in one transaction. On an abortable
    /// error the transaction is aborted and the caller redoes the input.
    async fn commit_in_transaction(
        &self,
        consumer: &StreamConsumer<MeteredContext>,
        message: &BorrowedMessage<'_>,
        records: Vec<OutRecord>,
    ) -> Result<(), TransactionError> {
        let timeout = Duration::from_secs(30);
        self.producer
            .begin_transaction()
            .map_err(TransactionError::from_kafka)?;
        let sends = records.iter().map(|r| {
            self.producer
                .send(r.future_record(), Timeout::After(timeout))
        });
        let mut failed = None;
        for (record, result) in records.iter().zip(join_all(sends).await) {
            if let Err((error, _)) = result {
                self.telemetry.emit(ProcessorEvent::ProduceFailed {
                    topic: &record.topic,
                    error: &error.to_string(),
                    attempt: 1,
                });
                failed = Some(error);
            }
        }
        let mut offsets = TopicPartitionList::new();
        let committed = match failed {
            Some(error) => Err(error),
            None => offsets
                .add_partition_offset(
                    message.topic(),
                    message.partition(),
                    Offset::Offset(message.offset() + 1),
                )
                .and_then(|()| {
                    // A consumer that is in its group always has its metadata.
                    let metadata = consumer.group_metadata().ok_or(
                        rdkafka::error::KafkaError::ConsumerCommit(
                            rdkafka::types::RDKafkaErrorCode::State,
                        ),
                    )?;
                    tokio::task::block_in_place(|| {
                        self.producer
                            .send_offsets_to_transaction(&offsets, &metadata, timeout)?;
                        self.producer.commit_transaction(timeout)
                    })
                }),
        };
        match committed {
            Ok(()) => Ok(()),
            Err(error) => {
                let error = TransactionError::from_kafka(error);
                if !matches!(error, TransactionError::Fatal(_)) {
                    tokio::task::block_in_place(|| self.producer.abort_transaction(timeout))
                        .map_err(TransactionError::from_kafka)?;
                }
                Err(error)
            }
        }
    }
}

/// Creates what a pipeline reads and writes when missing: its inputs (3 partitions), their retry
/// and dead-letter topics (as many partitions as the input, so a record keeps its partition),
/// the dead-letter audit topics, and its declared outputs. Existing topics are left as they
/// are. Returns every topic with its partition count.
pub async fn ensure_topics(
    bootstrap_servers: &str,
    naming: &Naming,
    pipeline: &Pipeline,
    replication: i32,
) -> anyhow::Result<Vec<(String, i32)>> {
    let client: rdkafka::consumer::BaseConsumer =
        kafka::client_config(bootstrap_servers).create()?;
    let plan = pipeline.topics(naming);
    let mut partitions_of = HashMap::new();
    for input in plan.iter().filter(|t| t.role == "input") {
        kafka::ensure_topics(
            bootstrap_servers,
            &[(&input.topic, DEFAULT_PARTITIONS)],
            replication,
        )
        .await?;
        let metadata = client
            .fetch_metadata(Some(&input.topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of {}", input.topic))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_PARTITIONS);
        partitions_of.insert(input.topic.clone(), partitions);
    }
    let wanted: Vec<(String, i32)> = plan
        .into_iter()
        .map(|t| {
            let partitions = match (t.role, &t.input) {
                ("dlq-audit", _) => 1,
                (_, Some(input)) => partitions_of[input],
                ("input", None) => partitions_of[&t.topic],
                _ => DEFAULT_PARTITIONS,
            };
            (t.topic, partitions)
        })
        .collect();
    let refs: Vec<(&str, i32)> = wanted.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    kafka::ensure_topics(bootstrap_servers, &refs, replication).await?;
    Ok(wanted)
}

/// The head's acks; never resolves while nothing is in flight.
async fn head_acks(in_flight: &mut InFlightQueue) -> Acks {
    match in_flight.front_mut() {
        Some(head) => head.acks.as_mut().await,
        None => std::future::pending().await,
    }
}

/// This instance's name in transactional ids: `ORDERFLOW_INSTANCE_ID`, else the host name (a
/// pod's name in Kubernetes). Two live instances of one pipeline need different names.
pub fn instance_id() -> String {
    if let Ok(id) = std::env::var("ORDERFLOW_INSTANCE_ID") {
        return id;
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(host) if ok && !host.is_empty() => host.to_string(),
        _ => "orderflow".to_string(),
    }
}

/// Seeks a partition back to `offset`, so that record is read again; `why` goes in the log.
fn rewind(
    consumer: &StreamConsumer<MeteredContext>,
    topic: &str,
    partition: i32,
    offset: i64,
    why: &str,
) -> bool {
    match consumer.seek(
        topic,
        partition,
        Offset::Offset(offset),
        Duration::from_secs(5),
    ) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(topic, partition, offset, "rewinding {why} failed: {e}");
            false
        }
    }
}

fn rewind_and_pause(
    consumer: &StreamConsumer<MeteredContext>,
    topic: &str,
    partition: i32,
    offset: i64,
) {
    rewind(
        consumer,
        topic,
        partition,
        offset,
        "to a not-yet-due retry record",
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(topic, partition, "pausing failed: {e}");
    }
}

fn copy_headers(message: &BorrowedMessage<'_>) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(headers) = message.headers() {
        for h in headers.iter() {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    out
}

/// 50 ms, 100 ms, 200 ms, ... with +-50 % jitter, so retries of many records do not align.
fn jittered_backoff(attempt: u32) -> Duration {
    let base = 50u64 << attempt.min(6);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

/// Runs processors until SIGTERM or Ctrl-C, then stops them all and waits for each to flush
/// and commit.
/// A long-running part of the process (a processor, a saga orchestrator), by name.
pub type Task = (
    String,
    futures::future::BoxFuture<'static, anyhow::Result<()>>,
);

/// Runs the tasks `start` makes from the shutdown flag until SIGTERM or Ctrl-C, or until one
/// fails (then the others are stopped too).
pub async fn run_until_signal(
    start: impl FnOnce(watch::Receiver<bool>) -> Vec<Task>,
) -> anyhow::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (name, task) in start(stopped) {
        tasks.spawn(async move { (name, task.await) });
    }
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = &mut signal, if !*stop.borrow() => {
                tracing::info!("shutdown requested");
                let _ = stop.send(true);
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((name, Err(e)))) => {
                    tracing::error!(task = %name, "failed: {e:#}");
                    let _ = stop.send(true);
                    result = Err(e.context(name));
                }
                Some(Err(e)) => {
                    let _ = stop.send(true);
                    result = Err(anyhow::anyhow!("a task panicked: {e}"));
                }
            }
        }
    }
    result
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
