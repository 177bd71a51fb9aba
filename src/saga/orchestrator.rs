//! Runs a saga: one consumer in the saga's group over the start topic, the reply topics and the
//! dead-letter topics of the step pipelines; one transactional producer. This file owns the
//! loop: taking inputs, applying them (`state::apply`) on top of the open batch, timeouts, and
//! when a batch is due. Committing is `commit.rs`, the state topic `state_topic.rs`, decoding
//! `input.rs`, rebalance callbacks `rebalance.rs`.
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
//! full). Inputs are applied as they come; a due batch is committed in the background while the
//! next batch builds on its states, so the loop's time goes to applying inputs, not to round
//! trips. At most one batch is being committed and one is open. Every call to librdkafka that
//! waits for the broker (`init_transactions`, reading the state topic, and those of `commit.rs`)
//! runs on the blocking pool, never on an async worker.
//!
//! State lives in Kafka only. All inputs are keyed by order id, every topic has the same number
//! of partitions and the group uses the range assignor, so partition `p` of every input belongs
//! to one replica, which reads partition `p` of the state topic (up to the last committed
//! transaction) before handling its first input. A rebalance drops the open batch uncommitted
//! and every state in memory; the new assignment starts from the committed offsets. Membership
//! is static (`group.instance.id` from the instance id), so a restarted instance takes its
//! partitions back without a rebalance.
//!
//! Retention (`retention.rs`): each tick also tombstones, in the open batch, the finished sagas
//! past the window (and the expired ones a reload skipped); they leave memory when that batch
//! is staged, and their tombstones are committed with it like any other state.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use tokio::sync::watch;
use uuid::Uuid;

use super::batch::{Batch, Known};
use super::commit::{add_micros, committed, BatchStats, Committing};
use super::definition::{Saga, Source};
use super::input;
use super::rebalance::RebalanceContext;
use super::retention;
use super::state::{self, FailedBy, Happening, Input, Outcome, SagaStatus, Transition};
use super::state_topic::{self, create_compacted};
use crate::contracts::events::now_millis;
use crate::contracts::{AnyEvent, EventCodec, Naming};
use crate::kafka;
use crate::kafka::admin::partition_counts;
use crate::kafka::transactions::TransactionError;
use crate::runtime::writer::OutRecord;
use crate::telemetry::saga::{SagaEvent, SagaTelemetry};
use crate::topology;

/// Most inputs in one transaction.
pub const MAX_BATCH: usize = 1000;
/// Longest a batch stays open after its first input (Kafka Streams commits exactly-once tasks
/// every 100 ms by default): the cost of a commit is shared by every input of the interval.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How often overdue replies are looked for.
const TICK_EVERY: Duration = Duration::from_millis(500);

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
pub(super) struct Open {
    pub batch: Batch,
    pub records: Vec<OutRecord>,
}

impl Open {
    pub fn new() -> Open {
        Open {
            batch: Batch::new(std::time::Instant::now()),
            records: Vec::new(),
        }
    }
}

/// Sleeps until `at`, or forever without it.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub struct Orchestrator {
    pub(super) saga: Saga,
    pub(super) naming: Naming,
    pub(super) bootstrap_servers: String,
    pub(super) codec: Arc<EventCodec>,
    pub(super) telemetry: SagaTelemetry,
    /// `source` of the events it publishes.
    pub(super) source: String,
    pub(super) sources: HashMap<String, Source>,
    pub(super) state_topic: String,
    pub(super) group_id: String,
    /// This instance in the group (`group.instance.id`) and in transactions.
    pub(super) member_id: String,
    pub(super) producer: FutureProducer,
    pub(super) stats: Arc<BatchStats>,
    /// How long a finished saga's state is kept (`retention.rs`).
    retention: Duration,
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
        let member_id = topology::transactional_id(&group_id, &crate::runtime::instance_id());
        let mut producer_config = kafka::producer_config(bootstrap_servers);
        kafka::transactions::transactional(&mut producer_config, &member_id);
        let retention = retention::window_from_env()?;
        Ok(Orchestrator {
            retention,
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

    /// Keeps finished sagas for `window` (1 s ..= 365 d) instead of `ORDERFLOW_SAGA_RETENTION`.
    pub fn with_retention(mut self, window: Duration) -> anyhow::Result<Orchestrator> {
        self.retention = retention::check_window(window)?;
        Ok(self)
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
        kafka::transactions::init(&self.producer)
            .await
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
                        self.expire(&mut known, &mut open);
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
            let loaded = self.load_partition(partition).await?;
            known.load(partition, loaded.states, loaded.expired);
            self.tell_gauges(known);
        }
        let input = match input::decode(&self.saga, &self.sources, &self.codec, message).await? {
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

    pub(super) fn tell(&self, order_id: &Uuid, happening: &Happening) {
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
                outcome: SagaStatus::Confirmed.as_str(),
                seconds: *seconds,
            },
            Happening::Cancelled { seconds } => SagaEvent::Ended {
                order_id,
                outcome: SagaStatus::Cancelled.as_str(),
                seconds: *seconds,
            },
            Happening::Stuck { step } => SagaEvent::Stuck { order_id, step },
            Happening::Resumed => return,
        };
        self.telemetry.emit(event);
    }

    /// Reads partition `partition` of the state topic up to its last committed record: the
    /// newest state of each order, newer versions winning, without the deleted and the expired
    /// ones. Its duration and what it found are told.
    pub async fn load_partition(&self, partition: i32) -> anyhow::Result<state_topic::Loaded> {
        let started = std::time::Instant::now();
        let loaded = state_topic::load(
            &self.bootstrap_servers,
            &self.state_topic,
            partition,
            now_millis(),
            self.retention,
        )
        .await?;
        for (order_id, version, known) in &loaded.stale {
            self.telemetry.emit(SagaEvent::StaleState {
                order_id: &order_id.to_string(),
                version: *version,
                known: *known,
            });
        }
        let finished = loaded
            .states
            .values()
            .filter(|s| s.status.is_final())
            .count() as u64;
        self.telemetry.emit(SagaEvent::Reloaded {
            partition,
            seconds: started.elapsed().as_secs_f64(),
            live: loaded.states.len() as u64 - finished,
            finished,
            expired: loaded.expired.len() as u64,
            deleted: loaded.deleted as u64,
        });
        Ok(loaded)
    }

    /// Tombstones the finished sagas past the retention window (at most [`MAX_BATCH`] a tick),
    /// in the open batch: they are evicted once it is staged, and written with its transaction.
    fn expire(&self, known: &mut Known, open: &mut Option<Open>) {
        let now = now_millis();
        for (partition, order_id) in known.expired(now, self.retention, MAX_BATCH) {
            let o = open.get_or_insert_with(Open::new);
            // A change in the batch is newer than what expired: it is judged once staged.
            if o.batch.has_changed(partition, &order_id) {
                continue;
            }
            o.batch.expire(partition, order_id);
            o.batch.ticked = true;
        }
        if open.as_ref().is_some_and(|o| o.batch.is_empty()) {
            *open = None;
        }
    }

    /// The gauges of the sagas this instance holds.
    pub(super) fn tell_gauges(&self, known: &Known) {
        let (live, finished) = known.held();
        self.telemetry.emit(SagaEvent::Gauges {
            in_flight: known.in_flight(),
            stuck: known.stuck(),
            held_live: live,
            held_finished: finished,
        });
    }
}
