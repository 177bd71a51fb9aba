//! The engine: one consumer feeding per-key lanes, offsets stored at each partition's
//! contiguous finished watermark.
//!
//! For each record read: the retry gate admits it (or pauses its partition until it is due, or
//! dead-letters it), it enters its partition's offset window and its key's lane, and when the
//! lane lets it start its work runs (`work`): without a task of its own when its step is a
//! route (decode and claim here, the rest from the dedup store's answer and the producer's
//! acks), else as a task of its own. When a record's work ends the engine finishes it in
//! the window, starts the next record of its key, and stores the partition's new watermark (at
//! least once) or moves the finished prefix into the batch's transaction (exactly once).
//!
//! Invariants: an offset is stored only past records that are finished (written and
//! acknowledged); a partition whose window is full is paused, not the process; while the
//! in-flight budget is full nothing is read, for a bounded time, then the partitions read from
//! are paused (`room`); a revoked partition's tasks are abandoned and nothing of it is stored or
//! committed afterwards (its new owner reads them again). It owns the consumer; no blocking
//! librdkafka call runs on an executor thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::context::{MeteredContext, RebalanceEvent};
use super::gate::{self, Admission, GateRules, Source};
use super::input::Input;
use super::lanes::LaneKey;
use super::offsets::Unstored;
use super::partition::{Done, PartitionState, Queued, Starts};
use super::room::{self, Budget, Reading, Room};
use super::transactions::Batch;
use super::work::{Finished, Job, Staged, Worker};
use crate::contracts::events::now_millis;
use crate::kafka::headers::FailureContext;
use crate::kafka::transactions::TransactionError;
use crate::telemetry::ProcessorEvent;

/// Records read, at most, in one turn of the engine's loop when they are already fetched:
/// the loop's own cost (its branches looked at, their wakers set) is paid once for them all.
const READ_PER_TURN: usize = 64;
/// Ends of records taken, at most, in one turn; their watermarks are stored together.
const DONE_PER_TURN: usize = 256;

/// A partition of a subscribed topic (its name shared, not copied per record).
pub type TopicPartition = (Arc<str>, i32);

/// What a subscribed topic is to this pipeline.
#[derive(Debug, Clone)]
pub enum Role {
    Input {
        event_type: Arc<str>,
    },
    Retry {
        input_topic: Arc<str>,
        event_type: Arc<str>,
        tier: usize,
    },
}

/// How much the engine holds at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Records and bytes in flight before the partition read from is paused.
    pub budget: Budget,
    /// Longest a graceful stop waits for records in flight.
    pub drain_timeout: Duration,
}

pub struct Engine {
    pub worker: Arc<Worker>,
    pub consumer: Arc<StreamConsumer<MeteredContext>>,
    pub roles: HashMap<Arc<str>, Role>,
    pub limits: Limits,
    pub rebalances: mpsc::UnboundedReceiver<RebalanceEvent>,
    pub gate_rules: GateRules,
}

struct State {
    /// Hashed with foldhash, not SipHash: looked up twice per record; the names are ours.
    partitions: HashMap<TopicPartition, PartitionState, foldhash::fast::RandomState>,
    next_generation: u64,
    room: Room,
    /// Reading stops while the budget is full, for a bounded time.
    reading: Reading,
    /// Partitions paused for room: resuming is looked at only while there are some.
    room_paused: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    resume_tx: mpsc::UnboundedSender<(TopicPartition, u64)>,
    batch: Batch,
    /// At least once: watermarks reached this turn, stored at its end.
    unstored: Unstored<TopicPartition>,
    /// Stopping: records already running finish, none starts.
    draining: bool,
}

impl Engine {
    /// Consumes until `shutdown` turns true, then finishes what is in flight (within the drain
    /// timeout) and commits what is finished.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let (resume_tx, mut resume_rx) = mpsc::unbounded_channel();
        let mut s = State {
            partitions: HashMap::default(),
            next_generation: 0,
            room: Room::default(),
            reading: Reading::default(),
            room_paused: 0,
            done_tx,
            resume_tx,
            batch: Batch::default(),
            unstored: Unstored::default(),
            draining: false,
        };
        let transactional = self.worker.transactional;
        // One stream for the whole run: a stream per record would register a waker each time.
        let consumer = self.consumer.clone();
        let mut messages = consumer.stream();
        while !*shutdown.borrow() {
            let commit_at = s.batch.deadline();
            let read_at = s
                .reading
                .wait(&s.room, &self.limits.budget, std::time::Instant::now)
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(event) = self.rebalances.recv() => self.rebalanced(&mut s, event),
                Some(done) = done_rx.recv() => {
                    self.finished(&mut s, done);
                    for _ in 1..DONE_PER_TURN {
                        if s.batch.is_full() {
                            break;
                        }
                        let Ok(done) = done_rx.try_recv() else { break };
                        self.finished(&mut s, done);
                    }
                    self.store_watermarks(&mut s);
                    if s.batch.is_full() {
                        self.commit_batch(&mut s).await?;
                    }
                }
                _ = sleep_until(commit_at), if transactional && commit_at.is_some() => {
                    self.commit_batch(&mut s).await?;
                }
                Some((tp, generation)) = resume_rx.recv() => self.resume_due(&mut s, tp, generation).await,
                // The budget stayed full this long: read again (and pause what is read from).
                _ = sleep_until(read_at), if read_at.is_some() => {}
                Some(message) = messages.next(), if read_at.is_none() => {
                    self.read(&mut s, message).await?;
                    // Already fetched ones too, while there is room (looked at before each).
                    for _ in 1..READ_PER_TURN {
                        if *shutdown.borrow() || s.reading.wait(&s.room, &self.limits.budget, std::time::Instant::now).is_some() {
                            break;
                        }
                        let Some(Some(message)) = messages.next().now_or_never() else { break };
                        self.read(&mut s, message).await?;
                    }
                }
            }
        }
        drop(messages);
        self.drain(&mut s, &mut done_rx).await?;
        Ok(())
    }

    /// A record read (or the consumer's error): into its window and lane.
    async fn read(
        &mut self,
        s: &mut State,
        message: KafkaResult<BorrowedMessage<'_>>,
    ) -> anyhow::Result<()> {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                // A fatal error (e.g. fenced: another member took this static id) stops the
                // consumer for good: end the processor so its process restarts, rather than
                // look alive while reading nothing.
                if let Some((code, reason)) = self.consumer.client().fatal_error() {
                    anyhow::bail!("the consumer stopped with a fatal error ({code:?}): {reason}");
                }
                tracing::warn!(pipeline = %self.worker.pipeline.name, "consumer error: {e}");
                return Ok(());
            }
        };
        // librdkafka ran any rebalance callback inside this read, before the message: apply
        // those first, so the message meets its new assignment.
        while let Ok(event) = self.rebalances.try_recv() {
            self.rebalanced(s, event);
        }
        let Some((topic, role)) = self.roles.get_key_value(message.topic()) else {
            tracing::error!(
                topic = message.topic(),
                "record from a topic this pipeline did not subscribe to"
            );
            return Ok(());
        };
        let message = Input::read(&message, topic.clone());
        self.admit(s, message, role).await;
        Ok(())
    }

    /// Finishes what is in flight within the drain timeout; what is not finished then stays
    /// uncommitted and is read again.
    async fn drain(
        &mut self,
        s: &mut State,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
    ) -> anyhow::Result<()> {
        // Records waiting in a lane stay unstarted: their offsets are not stored, and whoever
        // owns the partition next reads them.
        s.draining = true;
        self.worker
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let until = tokio::time::Instant::now() + self.limits.drain_timeout;
        while s.partitions.values().any(|p| !p.tasks.is_empty()) {
            tokio::select! {
                biased;
                Some(event) = self.rebalances.recv() => self.rebalanced(s, event),
                Some(done) = done_rx.recv() => {
                    self.finished(s, done);
                    self.store_watermarks(s);
                }
                _ = tokio::time::sleep_until(until) => {
                    let unfinished: usize = s.partitions.values().map(|p| p.window.len()).sum();
                    tracing::warn!(
                        pipeline = %self.worker.pipeline.name,
                        unfinished,
                        "shutdown: records still in flight after {:?}; they stay uncommitted and will be read again",
                        self.limits.drain_timeout
                    );
                    break;
                }
            }
        }
        self.commit_batch(s).await?;
        for state in s.partitions.values() {
            for task in state.tasks.values().flatten() {
                task.abort();
            }
        }
        tracing::info!(pipeline = %self.worker.pipeline.name, "stopping: flushing and committing");
        let producer = self.worker.producer.clone();
        let consumer = self.consumer.clone();
        let transactional = self.worker.transactional;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            use rdkafka::producer::Producer;
            producer
                .flush(Duration::from_secs(10))
                .context("flushing the producer")?;
            if transactional {
                return Ok(()); // offsets went with the transactions
            }
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(())
                | Err(rdkafka::error::KafkaError::ConsumerCommit(
                    rdkafka::types::RDKafkaErrorCode::NoOffset,
                )) => Ok(()),
                Err(e) => Err(e).context("committing offsets"),
            }
        })
        .await?
    }

    /// A record read from a topic of `role`: through the gate, into its window and lane.
    async fn admit(&self, s: &mut State, message: Input, role: &Role) {
        let (topic, partition, offset) = (
            message.shared_topic().clone(),
            message.partition(),
            message.offset(),
        );
        let tp = (topic.clone(), partition);
        let generation = &mut s.next_generation;
        let state = s
            .partitions
            .entry(tp.clone())
            .or_insert_with(|| PartitionState::new(generation));
        if let Some(head) = state.retry_pause {
            // Fetched before the pause took effect: it is read again after the waiting record.
            if offset >= head {
                self.rewind_and_pause(&tp, head).await;
                return;
            }
        }
        self.worker.telemetry.emit(ProcessorEvent::Consumed {
            topic: &topic,
            partition,
            offset,
        });
        let (event_type, input_topic, source, context) = match role {
            Role::Input { event_type } => (event_type, &topic, Source::Input, None),
            Role::Retry {
                input_topic,
                event_type,
                tier,
            } => (
                event_type,
                input_topic,
                Source::Retry {
                    tier: *tier,
                    input_topic,
                    input_partitions: self
                        .worker
                        .partitions
                        .get(&**input_topic)
                        .copied()
                        .unwrap_or(0),
                },
                FailureContext::read(message.headers()),
            ),
        };
        let admission = gate::admit(source, context, now_millis(), &self.gate_rules);
        if let Admission::Pause { resume_in } = admission {
            state.retry_pause = Some(offset);
            let generation = state.generation;
            self.rewind_and_pause(&tp, offset).await;
            self.worker.telemetry.emit(ProcessorEvent::Deferred {
                topic: &topic,
                partition,
                wait_ms: resume_in.as_millis() as u64,
            });
            let resume = s.resume_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(resume_in).await;
                let _ = resume.send((tp, generation));
            });
            return;
        }
        if let Err(e) = state.window.push(offset) {
            // A record already in flight, delivered again: its first delivery finishes it.
            tracing::debug!(%topic, partition, "record not taken: {e:?}");
            return;
        }
        let bytes = room::record_bytes(&message);
        s.room.take(bytes);
        state.bytes += bytes;
        let job = Job {
            event_type: event_type.clone(),
            input_topic: input_topic.clone(),
            admission,
            message,
        };
        let key: LaneKey = job.message.shared_key();
        let queued = Queued { offset, bytes, job };
        if let Some(queued) = state.lanes.admit(key.clone(), queued) {
            let starts = Starts {
                worker: &self.worker,
                done_tx: &s.done_tx,
            };
            starts.start(&tp, state, key, queued);
        }
        let overdue =
            s.room.is_over(&self.limits.budget) && s.reading.is_overdue(std::time::Instant::now());
        if !state.room_paused
            && s.room
                .is_full(&self.limits.budget, state.window.len(), overdue)
        {
            state.room_paused = true;
            s.room_paused += 1;
            self.pause(&tp);
        }
    }

    /// A task ended: finish it in its window, start its key's next record, store or stage.
    fn finished(&self, s: &mut State, done: Done) {
        let Some(state) = s.partitions.get_mut(&done.tp) else {
            return; // revoked: abandoned
        };
        if state.generation != done.generation {
            return; // reset since: abandoned
        }
        state.tasks.remove(&done.offset);
        state.bytes -= done.bytes;
        s.room.release_bytes(done.bytes);
        if let Some(queued) = state.lanes.finish(&done.key).filter(|_| !s.draining) {
            let starts = Starts {
                worker: &self.worker,
                done_tx: &s.done_tx,
            };
            starts.start(&done.tp, state, done.key, queued);
        }
        let staged = match done.finished {
            Finished::Written => None,
            Finished::Staged(staged) => Some(staged),
            // Left unfinished in the window: no offset passes it.
            Finished::Abandoned => return,
        };
        if let Err(e) = state.window.finish(done.offset, staged) {
            tracing::error!(topic = %done.tp.0, partition = done.tp.1, "finished record not in flight: {e:?}");
            return;
        }
        let finished = state.window.take_finished();
        let Some((last, _)) = finished.last() else {
            // Its bytes alone may have made room.
            self.resume_if_room(s);
            return;
        };
        let last = *last;
        s.room.release_records(finished.len());
        if self.worker.transactional {
            for (offset, staged) in finished {
                s.batch
                    .add(&done.tp, offset, staged.expect("exactly once stages"));
            }
        } else {
            s.unstored.note(done.tp, last);
        }
        self.resume_if_room(s);
    }

    /// Stores the watermarks reached this turn, all in one call (the next offset to read of
    /// each: one past its last finished record).
    fn store_watermarks(&self, s: &mut State) {
        if s.unstored.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), last) in s.unstored.take() {
            if let Err(e) = list.add_partition_offset(&topic, partition, Offset::Offset(last + 1)) {
                tracing::error!(%topic, partition, offset = last, "offset not stored: {e}");
            }
        }
        if let Err(e) = self.consumer.store_offsets(&list) {
            // Revoked meanwhile: its new owner reads these records again.
            tracing::warn!("offsets not stored: {e}");
        }
    }

    /// Resumes partitions paused for room once they and the budgets have room again.
    fn resume_if_room(&self, s: &mut State) {
        if s.room_paused == 0 || !s.room.has_room(&self.limits.budget) {
            return;
        }
        let mut resume = Vec::new();
        for (tp, state) in s.partitions.iter_mut() {
            if state.room_paused && s.room.may_resume(&self.limits.budget, state.window.len()) {
                state.room_paused = false;
                s.room_paused -= 1;
                if state.retry_pause.is_none() {
                    resume.push(tp.clone());
                }
            }
        }
        for tp in resume {
            self.resume(&tp);
        }
    }

    /// A paused retry record is (nearly) due: read it again.
    async fn resume_due(&self, s: &mut State, tp: TopicPartition, generation: u64) {
        let Some(state) = s.partitions.get_mut(&tp) else {
            return;
        };
        let Some(head) = state.retry_pause.filter(|_| state.generation == generation) else {
            return;
        };
        // Seek to the waiting record again before resuming: had the first rewind failed,
        // resuming alone would go past it.
        if !self.seek(&tp, head).await {
            let resume = s.resume_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = resume.send((tp, generation));
            });
            return;
        }
        let state = s.partitions.get_mut(&tp).expect("present above");
        state.retry_pause = None;
        if !state.room_paused {
            self.resume(&tp);
        }
    }

    fn rebalanced(&self, s: &mut State, event: RebalanceEvent) {
        match event {
            RebalanceEvent::Revoked(tps) => {
                for tp in tps {
                    if let Some(state) = s.partitions.remove(&tp) {
                        self.abandon(s, &tp, state);
                    }
                    self.worker
                        .telemetry
                        .emit(ProcessorEvent::PartitionRevoked {
                            topic: &tp.0,
                            partition: tp.1,
                        });
                }
            }
            RebalanceEvent::Assigned(tps) => {
                // Revokes come first, so a newly assigned partition has no state yet; one that
                // has (an eager assignment lists partitions kept) keeps it and its pauses.
                for tp in tps.iter().filter(|tp| !s.partitions.contains_key(*tp)) {
                    // A partition paused under an earlier assignment must not stay paused.
                    self.resume(tp);
                }
            }
        }
    }

    /// Drops a partition's records in flight: their tasks stop, their offsets stay where they
    /// are, their staged outputs are never written.
    fn abandon(&self, s: &mut State, tp: &TopicPartition, state: PartitionState) {
        s.unstored.forget(tp);
        for task in state.tasks.values().flatten() {
            task.abort();
        }
        s.room.release_records(state.window.len());
        s.room.release_bytes(state.bytes);
        if state.room_paused {
            s.room_paused -= 1;
        }
        s.batch.remove(tp);
    }

    /// Commits the batch: its records and the offsets past them in one transaction. On an
    /// abortable failure every partition of the batch is rewound to where the batch began.
    async fn commit_batch(&mut self, s: &mut State) -> anyhow::Result<()> {
        if s.batch.is_empty() {
            return Ok(());
        }
        // Take in revokes first, so no revoked partition's offset joins the transaction.
        while let Ok(event) = self.rebalances.try_recv() {
            self.rebalanced(s, event);
        }
        let batch = std::mem::take(&mut s.batch);
        if batch.is_empty() {
            return Ok(());
        }
        match batch.commit(&self.worker, &self.consumer).await {
            Ok(finished) => {
                let worker = self.worker.clone();
                // Marks and telemetry after the commit; claims held until the marks are stored.
                tokio::spawn(async move {
                    let ids: Vec<uuid::Uuid> = finished
                        .iter()
                        .filter_map(|f| f.ending.handled_event())
                        .collect();
                    worker.mark_until_stored(&ids).await;
                    for staged in finished {
                        let Staged {
                            topic,
                            ending,
                            claim,
                            ..
                        } = staged;
                        drop(claim);
                        worker.tell(&topic, ending);
                    }
                });
                Ok(())
            }
            Err((TransactionError::Fatal(e), _)) => Err(e),
            Err((TransactionError::Abortable(e), starts)) => {
                tracing::warn!(pipeline = %self.worker.pipeline.name, "transaction aborted, reading its inputs again: {e}");
                for (tp, offset) in starts {
                    if let Some(state) = s.partitions.remove(&tp) {
                        self.abandon(s, &tp, state);
                    }
                    self.seek(&tp, offset).await;
                }
                Ok(())
            }
        }
    }

    async fn rewind_and_pause(&self, tp: &TopicPartition, offset: i64) {
        self.seek(tp, offset).await;
        self.pause(tp);
    }

    /// Seeks a partition to `offset`, off the executor; false when it failed.
    async fn seek(&self, tp: &TopicPartition, offset: i64) -> bool {
        let consumer = self.consumer.clone();
        let (topic, partition) = tp.clone();
        let sought = tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            )
        })
        .await;
        match sought {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(topic = %tp.0, partition = tp.1, offset, "seek failed: {e}");
                false
            }
            Err(e) => {
                tracing::warn!(topic = %tp.0, partition = tp.1, offset, "seek task failed: {e}");
                false
            }
        }
    }

    fn pause(&self, tp: &TopicPartition) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::debug!(topic = %tp.0, partition = tp.1, "pause: {e}");
        }
    }

    fn resume(&self, tp: &TopicPartition) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = self.consumer.resume(&tpl) {
            tracing::debug!(topic = %tp.0, partition = tp.1, "resume: {e}");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
