//! Runs a saga: one consumer in the saga's group over the start topic, the reply topics and the
//! dead-letter topics of the step pipelines; one transactional producer.
//!
//! Invariant: each batch of inputs is one Kafka transaction holding the commands and end events
//! its inputs decided, every saga state they changed (to the compacted state topic, on the
//! partition the input came from) and the offsets past its inputs. A crash anywhere leaves either
//! all of it or none, so no command is sent twice and no state is lost; an aborted batch is read
//! again from its first input. The states in memory are committed ones and those of the batch
//! being committed; when that commit aborts, every state is forgotten and loaded again.
//!
//! Batches are bounded by count ([`MAX_BATCH`] inputs) and by time ([`COMMIT_INTERVAL`] after
//! the first input, like Kafka Streams' `commit.interval.ms`, or when the previous commit ends if
//! that is later: the loop does not stop taking inputs to wait for a commit unless the batch is
//! full). Inputs are applied as they come; a due batch is committed by a background task (its
//! records sent, their delivery awaited, the offsets added, the commit round trip) while the next
//! batch builds on its states, so the loop's time goes to applying inputs, not to round trips.
//! At most one batch is being committed and one is open. Every call to librdkafka that waits for
//! the broker (`init_transactions`, `send_offsets_to_transaction`, `commit_transaction`,
//! `abort_transaction`, `seek`, reading the state topic) runs on the blocking pool, never on an
//! async worker.
//!
//! State lives in Kafka only. All inputs are keyed by order id, every topic has the same number
//! of partitions and the group uses the range assignor, so partition `p` of every input belongs
//! to one replica, which reads partition `p` of the state topic (up to the last committed
//! transaction) before handling its first input. A rebalance drops the open batch uncommitted
//! and every state in memory; the new assignment starts from the committed offsets. Membership
//! is static (`group.instance.id` from the instance id), so a restarted instance takes its
//! partitions back without a rebalance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::join_all;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use uuid::Uuid;

use super::batch::{Batch, Known};
use super::definition::{Saga, Source};
use super::state::{self, FailedBy, Happening, Input, Outcome, SagaState, Transition};
use crate::contracts::events::now_millis;
use crate::contracts::{AnyEvent, DecodeError, EventCodec, Naming, OrderCreated};
use crate::kafka;
use crate::kafka::headers;
use crate::kafka::transactions::TransactionError;
use crate::runtime::writer::{self, OutRecord};
use crate::telemetry::saga::{SagaEvent, SagaTelemetry};

/// Most inputs in one transaction.
pub const MAX_BATCH: usize = 1000;
/// Longest a batch stays open after its first input (Kafka Streams commits exactly-once tasks
/// every 100 ms by default): the cost of a commit is shared by every input of the interval.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How often overdue replies are looked for.
const TICK_EVERY: Duration = Duration::from_millis(500);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an orchestrator's time goes, counted as it runs (for benchmarks and `saga` tests):
/// every field only grows.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Transactions committed with at least one input or timeout.
    pub batches: AtomicU64,
    /// Inputs in those transactions.
    pub inputs: AtomicU64,
    /// Saga states written by them.
    pub states: AtomicU64,
    /// Spent applying inputs and handing their commands to the producer, in microseconds.
    pub apply_micros: AtomicU64,
    /// Spent committing (sending the records, offsets, the commit round trip) in the
    /// background while the next batch takes inputs, in microseconds.
    pub commit_micros: AtomicU64,
    /// Spent by the loop waiting for a commit to end before starting the next, in microseconds.
    pub commit_wait_micros: AtomicU64,
    /// Batches aborted and read again.
    pub aborted: AtomicU64,
}

impl BatchStats {
    /// One line: batches, inputs per batch, time per commit and where the time went.
    pub fn summary(&self, seconds: f64) -> String {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let batches = n(&self.batches).max(1) as f64;
        let apply = n(&self.apply_micros) as f64 / 1e6;
        let commit = n(&self.commit_micros) as f64 / 1e6;
        let wait = n(&self.commit_wait_micros) as f64 / 1e6;
        format!(
            "{} batches ({} aborted), {:.0} inputs and {:.0} states per batch, commit {:.1} ms per batch \
             in the background ({commit:.2} s in all); of {seconds:.1} s the loop spent {apply:.2} s \
             applying inputs, {wait:.2} s waiting for a commit to end and {:.2} s waiting for inputs",
            n(&self.batches),
            n(&self.aborted),
            n(&self.inputs) as f64 / batches,
            n(&self.states) as f64 / batches,
            commit * 1000.0 / batches,
            (seconds - apply - wait).max(0.0),
        )
    }
}

/// What the loop does next.
enum Next {
    Stop,
    /// The batch being committed is committed or aborted.
    Committed(Result<(), TransactionError>),
    /// The open batch is due.
    Commit,
    Tick,
    Input(Result<OwnedMessage, KafkaError>),
}

/// The batch taking inputs, and the records its inputs decided (sent when it is committed).
struct Open {
    batch: Batch,
    records: Vec<OutRecord>,
}

impl Open {
    fn new() -> Open {
        Open {
            batch: Batch::new(std::time::Instant::now()),
            records: Vec::new(),
        }
    }
}

/// The batch whose transaction is being committed in the background.
struct Committing {
    batch: Batch,
    states: u64,
    started: std::time::Instant,
    /// A rebalance came while it was being committed: if it aborts, a partition that cannot be
    /// sought back gets its position from the new assignment.
    rebalanced: bool,
    task: tokio::task::JoinHandle<Result<(), TransactionError>>,
}

/// The result of the commit in `committing` (which must be `Some`); a commit task that
/// panicked is fatal.
async fn committed(committing: &mut Option<Committing>) -> Result<(), TransactionError> {
    let c = committing.as_mut().expect("only called when committing");
    match (&mut c.task).await {
        Ok(result) => result,
        Err(e) => Err(Fatal(anyhow::anyhow!("the saga commit task failed: {e}"))),
    }
}

/// One batch's transaction: begins it, sends its records, waits for their delivery, adds the
/// input offsets and commits; aborts it on an abortable error. The calls that wait for the
/// broker run on the blocking pool.
async fn commit_transaction(
    producer: FutureProducer,
    mut records: Vec<OutRecord>,
    offsets: TopicPartitionList,
    metadata: Option<ConsumerGroupMetadata>,
) -> Result<(), TransactionError> {
    // Local to librdkafka: no round trip.
    producer
        .begin_transaction()
        .map_err(TransactionError::from_kafka)?;
    let mut deliveries = Vec::with_capacity(records.len());
    let mut failed = None;
    for r in &mut records {
        // A full queue is waited on, asynchronously.
        match writer::enqueue(&producer, r).await {
            Ok(delivery) => deliveries.push(delivery),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    // Awaited here rather than left to commit_transaction's own flush, which waits in steps of
    // 100 ms while the producer's polling thread serves the delivery reports.
    for delivery in join_all(deliveries).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => failed = failed.or(Some(e)),
            Err(_) => failed = failed.or(Some(KafkaError::Canceled)),
        }
    }
    tokio::task::spawn_blocking(move || {
        let result = match failed {
            Some(e) => Err(TransactionError::from_kafka(e)),
            None => (|| {
                if offsets.count() > 0 {
                    let metadata =
                        metadata.ok_or(KafkaError::ConsumerCommit(RDKafkaErrorCode::State))?;
                    producer.send_offsets_to_transaction(
                        &offsets,
                        &metadata,
                        TRANSACTION_TIMEOUT,
                    )?;
                }
                producer.commit_transaction(TRANSACTION_TIMEOUT)
            })()
            .map_err(TransactionError::from_kafka),
        };
        if let Err(Abortable(_)) = &result {
            if let Err(abort) = producer.abort_transaction(TRANSACTION_TIMEOUT) {
                return Err(Fatal(anyhow::anyhow!(
                    "aborting the saga transaction failed: {abort}"
                )));
            }
        }
        result
    })
    .await
    .unwrap_or_else(|e| Err(Fatal(anyhow::anyhow!("the saga commit failed: {e}"))))
}

fn add_micros(counter: &AtomicU64, since: std::time::Instant) {
    counter.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// Sleeps until `at`, or forever without it.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

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
    /// This instance in the group (`group.instance.id`) and in transactions.
    member_id: String,
    producer: FutureProducer,
    stats: Arc<BatchStats>,
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
        let member_id = format!("{group_id}.{}", crate::runtime::instance_id());
        let mut producer_config = kafka::producer_config(bootstrap_servers);
        producer_config
            // One id per instance: a restarted instance fences its predecessor and aborts what it
            // left open, so readers do not wait for the transaction timeout.
            .set("transactional.id", &member_id)
            // A zombie that never comes back blocks read_committed readers at most this long.
            .set("transaction.timeout.ms", "10000")
            // librdkafka requires a record's delivery timeout within the transaction's.
            .set("message.timeout.ms", "10000");
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
            member_id,
            stats: Arc::default(),
            saga,
            naming,
            codec,
        })
    }

    pub fn telemetry(&self) -> SagaTelemetry {
        self.telemetry.clone()
    }

    /// Where its time goes, shared with the running loop.
    pub fn stats(&self) -> Arc<BatchStats> {
        self.stats.clone()
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

    /// Orchestrates until `shutdown` turns true; the open batch is then committed.
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
            .set("partition.assignment.strategy", "range")
            // Static membership: a restarted instance (same ORDERFLOW_INSTANCE_ID, e.g. the same
            // pod after a crash or an OOM kill) takes its partitions back at once, without a
            // rebalance and without waiting out its predecessor's session. The price: an
            // instance that goes away for good (scale-down, a rollout that renames pods) holds
            // its partitions until session.timeout.ms (10 s) has passed, since static members
            // do not leave the group on close.
            .set("group.instance.id", &self.member_id);
        let consumer: Arc<StreamConsumer<RebalanceContext>> = Arc::new(
            config
                .create_with_context(context.clone())
                .context("creating the saga consumer")?,
        );
        let topics: Vec<&str> = self.sources.keys().map(String::as_str).collect();
        consumer.subscribe(&topics).context("subscribing")?;
        tracing::info!(saga = %self.saga.name, group = %self.group_id, member = %self.member_id, ?topics, "saga orchestrator started");
        let mut known = Known::default();
        let mut open: Option<Open> = None;
        let mut committing: Option<Committing> = None;
        let mut ready = None;
        let mut tick = tokio::time::interval(TICK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let due = open
                .as_ref()
                .map(|o| tokio::time::Instant::from_std(o.batch.opened + COMMIT_INTERVAL));
            let next = tokio::select! {
                biased;
                _ = shutdown.changed() => Next::Stop,
                result = committed(&mut committing), if committing.is_some() => Next::Committed(result),
                // While a commit runs the open batch keeps taking inputs; it is committed as
                // soon as that commit ends (or, full, waits for it).
                _ = sleep_until(due), if due.is_some() && committing.is_none() => Next::Commit,
                _ = tick.tick() => Next::Tick,
                message = consumer.recv() => Next::Input(message.map(|m| m.detach())),
            };
            // The rebalance callbacks run inside recv(). What was taken before a rebalance is
            // dropped uncommitted: the assignment that follows starts every partition at its
            // committed offset (eager range assignor; a transaction being committed is waited
            // for, as the consumer reads committed offsets only once they are stable), and every
            // state is loaded again.
            if context.rebalanced.swap(false, Ordering::SeqCst) {
                if let Some(o) = open.take() {
                    tracing::info!(saga = %self.saga.name, inputs = o.batch.inputs(), "rebalance: the open batch is dropped and read again");
                    self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(c) = committing.as_mut() {
                    c.rebalanced = true;
                }
                known.clear();
            }
            let in_group = context.in_group.load(Ordering::SeqCst);
            if ready != Some(in_group) {
                self.telemetry.emit(SagaEvent::Ready { ready: in_group });
                ready = Some(in_group);
            }
            match next {
                Next::Stop => break,
                Next::Committed(result) => {
                    let c = committing.take().expect("selected only when committing");
                    self.settle(&consumer, &mut known, &mut open, c, result)
                        .await?;
                    if open
                        .as_ref()
                        .is_some_and(|o| o.batch.opened.elapsed() >= COMMIT_INTERVAL)
                    {
                        self.start_commit(&consumer, &mut known, &mut open, &mut committing)
                            .await?;
                    }
                }
                Next::Commit => {
                    self.start_commit(&consumer, &mut known, &mut open, &mut committing)
                        .await?;
                }
                Next::Tick => {
                    if in_group {
                        let started = std::time::Instant::now();
                        let timed_out = self.time_out(&known, &mut open).await;
                        add_micros(&self.stats.apply_micros, started);
                        if let Err(e) = timed_out {
                            self.retry_later(&consumer, &mut known, &mut open, &mut committing, e)
                                .await?;
                        }
                    }
                }
                Next::Input(Ok(message)) => {
                    // Noted before anything can fail, so that a retried batch reads it again.
                    open.get_or_insert_with(Open::new).batch.take(
                        message.topic(),
                        message.partition(),
                        message.offset(),
                    );
                    if !known.is_loaded(message.partition()) && committing.is_some() {
                        // The state topic is read up to its last stable offset: the batch being
                        // committed must have ended, or its states would be missed.
                        self.finish_commit(&consumer, &mut known, &mut open, &mut committing)
                            .await?;
                    }
                    // Gone with an aborted commit: read again.
                    let Some(o) = open.as_mut() else { continue };
                    let started = std::time::Instant::now();
                    let taken = self.take(&mut known, o, &message).await;
                    add_micros(&self.stats.apply_micros, started);
                    if let Err(e) = taken {
                        self.retry_later(&consumer, &mut known, &mut open, &mut committing, e)
                            .await?;
                        continue;
                    }
                    if o.batch.inputs() >= MAX_BATCH {
                        self.start_commit(&consumer, &mut known, &mut open, &mut committing)
                            .await?;
                    }
                }
                Next::Input(Err(e)) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        anyhow::bail!("saga consumer failed for good ({code:?}): {reason}");
                    }
                    tracing::warn!(saga = %self.saga.name, "saga consumer error: {e}");
                }
            }
        }
        // The batch in hand is committed, after the one being committed.
        self.start_commit(&consumer, &mut known, &mut open, &mut committing)
            .await?;
        self.finish_commit(&consumer, &mut known, &mut open, &mut committing)
            .await?;
        self.telemetry.emit(SagaEvent::Ready { ready: false });
        tracing::info!(saga = %self.saga.name, "saga orchestrator stopping");
        Ok(())
    }

    /// Applies one input (already noted in the batch) on top of the batch and keeps what it
    /// decided for the batch's transaction. `Err` when it cannot be done yet (the registry or
    /// the state topic out of reach): the batch, this input included, is to be read again.
    async fn take(
        &self,
        known: &mut Known,
        open: &mut Open,
        message: &OwnedMessage,
    ) -> anyhow::Result<()> {
        let partition = message.partition();
        if !known.is_loaded(partition) {
            known.load(partition, self.load_partition(partition).await?);
        }
        let input = match self.decode(message).await? {
            Some(input) => input,
            None => {
                open.batch
                    .ignored
                    .push((message.topic().to_string(), "undecodable"));
                return Ok(());
            }
        };
        let order_id = input.order_id();
        let outcome = state::apply(
            &self.saga,
            open.batch.current(known, partition, &order_id),
            input.as_input(),
            now_millis(),
            &self.source,
        );
        match outcome {
            Outcome::Changed(t) => {
                let Transition {
                    state,
                    emit,
                    happenings,
                } = *t;
                self.encode_events(&emit, &mut open.records).await?;
                open.batch.change(partition, state, happenings);
            }
            Outcome::Ignored(reason) => open
                .batch
                .ignored
                .push((message.topic().to_string(), reason)),
        }
        Ok(())
    }

    /// Fails the steps whose reply is overdue, in the open batch.
    async fn time_out(&self, known: &Known, open: &mut Option<Open>) -> anyhow::Result<()> {
        let now = now_millis();
        let overdue: Vec<(i32, Uuid)> = known
            .unfinished()
            .filter(|(_, s)| state::next_deadline(s).is_some_and(|d| d <= now))
            .map(|(p, s)| (p, s.order_id))
            .collect();
        for (partition, order_id) in overdue {
            let o = open.get_or_insert_with(Open::new);
            let Some(current) = o.batch.current(known, partition, &order_id) else {
                continue;
            };
            if current.status.is_final() || state::next_deadline(current).is_none_or(|d| d > now) {
                continue;
            }
            if let Outcome::Changed(t) =
                state::apply(&self.saga, Some(current), Input::Tick, now, &self.source)
            {
                let Transition {
                    state,
                    emit,
                    happenings,
                } = *t;
                self.encode_events(&emit, &mut o.records).await?;
                o.batch.change(partition, state, happenings);
                o.batch.ticked = true;
            }
        }
        if open.as_ref().is_some_and(|o| o.batch.is_empty()) {
            *open = None;
        }
        Ok(())
    }

    /// Encodes `events` into records of the batch's transaction.
    async fn encode_events(
        &self,
        events: &[AnyEvent],
        records: &mut Vec<OutRecord>,
    ) -> anyhow::Result<()> {
        for event in events {
            records.push(
                OutRecord::event(event, &self.codec, &self.naming)
                    .await
                    .with_context(|| format!("encoding {}", event.event_type()))?,
            );
        }
        Ok(())
    }

    /// Starts committing the open batch in the background, once the batch being committed (if
    /// any) is settled: its states become the known ones at once, so the next batch builds on
    /// them while the commit runs.
    async fn start_commit(
        &self,
        consumer: &Arc<StreamConsumer<RebalanceContext>>,
        known: &mut Known,
        open: &mut Option<Open>,
        committing: &mut Option<Committing>,
    ) -> anyhow::Result<()> {
        self.finish_commit(consumer, known, open, committing)
            .await?;
        let Some(Open {
            mut batch,
            mut records,
        }) = open.take()
        else {
            return Ok(());
        };
        let changed = batch.take_changed();
        for ((partition, order_id), saga) in &changed {
            records.push(OutRecord {
                topic: self.state_topic.clone(),
                partition: Some(*partition),
                key: Some(order_id.to_string().into_bytes().into()),
                payload: Some(
                    serde_json::to_vec(saga)
                        .expect("saga state serializes")
                        .into(),
                ),
                headers: None,
            });
        }
        let states = changed.len() as u64;
        known.stage(changed);
        // Offsets: of the batch's inputs and, when it holds timeouts, the current positions of
        // the other partitions, so that the group's generation fences a replica that lost them.
        let mut offsets = TopicPartitionList::new();
        for (topic, partition, offset) in batch.next_offsets() {
            offsets.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        if batch.ticked {
            // Local to librdkafka: no round trip.
            if let Ok(positions) = consumer.position() {
                for e in positions.elements() {
                    if let (Offset::Offset(o), None) =
                        (e.offset(), offsets.find_partition(e.topic(), e.partition()))
                    {
                        offsets.add_partition_offset(
                            e.topic(),
                            e.partition(),
                            Offset::Offset(o),
                        )?;
                    }
                }
            }
        }
        let task = commit_transaction(
            self.producer.clone(),
            records,
            offsets,
            consumer.group_metadata(),
        );
        *committing = Some(Committing {
            batch,
            states,
            started: std::time::Instant::now(),
            rebalanced: false,
            task: tokio::spawn(task),
        });
        Ok(())
    }

    /// Waits for the batch being committed, if any, and settles it.
    async fn finish_commit(
        &self,
        consumer: &Arc<StreamConsumer<RebalanceContext>>,
        known: &mut Known,
        open: &mut Option<Open>,
        committing: &mut Option<Committing>,
    ) -> anyhow::Result<()> {
        if committing.is_none() {
            return Ok(());
        }
        let waited = std::time::Instant::now();
        let result = committed(committing).await;
        add_micros(&self.stats.commit_wait_micros, waited);
        let c = committing.take().expect("checked above");
        self.settle(consumer, known, open, c, result).await
    }

    /// A batch's commit ended. Committed: what happened is told. Aborted: this batch and the
    /// open one (built on it) are read again from their first inputs, and every state is loaded
    /// again.
    async fn settle(
        &self,
        consumer: &Arc<StreamConsumer<RebalanceContext>>,
        known: &mut Known,
        open: &mut Option<Open>,
        c: Committing,
        result: Result<(), TransactionError>,
    ) -> anyhow::Result<()> {
        self.stats
            .commit_micros
            .fetch_add(c.started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .inputs
                    .fetch_add(c.batch.inputs() as u64, Ordering::Relaxed);
                self.stats.states.fetch_add(c.states, Ordering::Relaxed);
                tracing::debug!(
                    saga = %self.saga.name,
                    inputs = c.batch.inputs(),
                    states = c.states,
                    open_ms = (c.started - c.batch.opened).as_millis() as u64,
                    commit_ms = c.started.elapsed().as_millis() as u64,
                    "saga batch committed"
                );
                for (topic, reason) in &c.batch.ignored {
                    self.telemetry.emit(SagaEvent::Ignored { topic, reason });
                }
                for (order_id, happening) in &c.batch.happenings {
                    self.tell(order_id, happening);
                }
                self.telemetry.emit(SagaEvent::Gauges {
                    in_flight: known.in_flight(),
                    stuck: known.stuck(),
                });
                Ok(())
            }
            Err(Fatal(e)) => Err(e),
            Err(Abortable(e)) => {
                tracing::warn!(saga = %self.saga.name, "saga transaction aborted, reading the batch again: {e}");
                self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                known.clear();
                let mut batches = vec![c.batch];
                if let Some(o) = open.take() {
                    self.stats.aborted.fetch_add(1, Ordering::Relaxed);
                    batches.push(o.batch);
                }
                // After a rebalance a partition may be between owners: the assignment sets its
                // position from the committed offsets.
                self.rewind(consumer, &batches, c.rebalanced).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(())
            }
        }
    }

    /// The open batch cannot be finished now: it is read again after a pause (the batch being
    /// committed, if any, is settled first).
    async fn retry_later(
        &self,
        consumer: &Arc<StreamConsumer<RebalanceContext>>,
        known: &mut Known,
        open: &mut Option<Open>,
        committing: &mut Option<Committing>,
        error: anyhow::Error,
    ) -> anyhow::Result<()> {
        tracing::warn!(saga = %self.saga.name, "reading the batch again in 1 s: {error:#}");
        self.finish_commit(consumer, known, open, committing)
            .await?;
        if let Some(o) = open.take() {
            self.stats.aborted.fetch_add(1, Ordering::Relaxed);
            self.rewind(consumer, &[o.batch], false).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    /// Seeks every partition the batches took inputs from back to its first one, so that they
    /// are read again (off the async workers: a seek waits for the fetcher). A partition that
    /// cannot be sought back is fatal if it is still assigned, unless a rebalance is under way
    /// (`rebalancing`), whose assignment sets the positions from the committed offsets.
    async fn rewind(
        &self,
        consumer: &Arc<StreamConsumer<RebalanceContext>>,
        batches: &[Batch],
        rebalancing: bool,
    ) -> anyhow::Result<()> {
        let mut firsts: HashMap<(String, i32), i64> = HashMap::new();
        for (topic, partition, offset) in batches.iter().flat_map(Batch::first_offsets) {
            let first = firsts
                .entry((topic.to_string(), partition))
                .or_insert(offset);
            *first = (*first).min(offset);
        }
        if firsts.is_empty() {
            return Ok(());
        }
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            // Local to librdkafka: no round trip.
            let assigned = consumer.assignment()?;
            for ((topic, partition), offset) in firsts {
                if let Err(e) = consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                ) {
                    // A partition no longer ours is read by its new owner from the committed
                    // offset; one still ours that cannot be read again would be skipped.
                    anyhow::ensure!(
                        rebalancing || assigned.find_partition(&topic, partition).is_none(),
                        "cannot seek {topic}/{partition} back to {offset}: {e}"
                    );
                    tracing::info!(
                        topic,
                        partition,
                        offset,
                        "not sought back ({e}): the assignment sets it"
                    );
                }
            }
            Ok(())
        })
        .await?
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

use TransactionError::{Abortable, Fatal};

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
