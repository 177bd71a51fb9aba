//! A batch's transaction, committed in the background while the next batch takes inputs.
//! Invariant: one transaction holds a batch's commands and end events, every saga state it
//! changed and the offsets past its inputs; at most one batch is being committed at a time. A
//! committed batch is told (metrics, logs); an aborted one, and the open batch built on it, are
//! read again from their first inputs and every state in memory is forgotten (loaded again).
//! Every call that waits for the broker (`send_offsets_to_transaction`, `commit_transaction`,
//! `abort_transaction`, `seek`) runs on the blocking pool. It decides nothing about sagas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use super::batch::{Batch, Known};
use super::orchestrator::{Open, Orchestrator};
use super::rebalance::RebalanceContext;
use super::state;
use crate::kafka::transactions::{self, TransactionError};
use crate::runtime::writer::{self, OutRecord};
use crate::telemetry::saga::SagaEvent;

use TransactionError::{Abortable, Fatal};

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

/// The batch whose transaction is being committed in the background.
pub struct Committing {
    pub batch: Batch,
    pub states: u64,
    pub started: std::time::Instant,
    /// A rebalance came while it was being committed: if it aborts, a partition that cannot be
    /// sought back gets its position from the new assignment.
    pub rebalanced: bool,
    pub task: tokio::task::JoinHandle<Result<(), TransactionError>>,
}

/// The result of the commit in `committing` (which must be `Some`); a commit task that
/// panicked is fatal.
pub async fn committed(committing: &mut Option<Committing>) -> Result<(), TransactionError> {
    let c = committing.as_mut().expect("only called when committing");
    match (&mut c.task).await {
        Ok(result) => result,
        Err(e) => Err(Fatal(anyhow::anyhow!("the saga commit task failed: {e}"))),
    }
}

/// One batch's transaction: begins it, sends its records, waits for their delivery, adds the
/// input offsets and commits; aborts it on an abortable error. The sequence and its error
/// classes are [`kafka::transactions`]'s, as for exactly-once pipelines.
async fn commit_transaction(
    producer: FutureProducer,
    mut records: Vec<OutRecord>,
    offsets: TopicPartitionList,
    metadata: Option<ConsumerGroupMetadata>,
) -> Result<(), TransactionError> {
    transactions::begin(&producer).await?;
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
    let result = match failed {
        Some(e) => Err(TransactionError::from_kafka(e)),
        None => transactions::commit(&producer, offsets, metadata).await,
    };
    if let Err(Abortable(_)) = &result {
        if let Err(abort) = transactions::abort(&producer).await {
            return Err(Fatal(anyhow::anyhow!(
                "aborting the saga transaction failed: {abort}"
            )));
        }
    }
    result
}

pub fn add_micros(counter: &AtomicU64, since: std::time::Instant) {
    counter.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
}

impl Orchestrator {
    /// Starts committing the open batch in the background, once the batch being committed (if
    /// any) is settled: its states become the known ones at once, so the next batch builds on
    /// them while the commit runs.
    pub(super) async fn start_commit(
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
                topic: self.state_topic.as_str().into(),
                partition: Some(*partition),
                key: Some(order_id.to_string().into_bytes().into()),
                // None: the saga expired, a tombstone for compaction to remove it.
                payload: saga
                    .as_ref()
                    .map(|s| serde_json::to_vec(s).expect("saga state serializes").into()),
                headers: None,
            });
        }
        let states = changed.len() as u64;
        known.stage(changed);
        // Offsets: of the batch's inputs and, when it holds timeouts or expiries, the current
        // positions of the other partitions, so that the group's generation fences a replica
        // that lost them.
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
    pub(super) async fn finish_commit(
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
    pub(super) async fn settle(
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
                    self.telemetry.emit(if *reason == state::NO_SAGA {
                        SagaEvent::LateReply { topic }
                    } else {
                        SagaEvent::Ignored { topic, reason }
                    });
                }
                if c.batch.expired > 0 {
                    self.telemetry.emit(SagaEvent::Expired {
                        count: c.batch.expired,
                    });
                }
                for (order_id, happening) in &c.batch.happenings {
                    self.tell(order_id, happening);
                }
                self.tell_gauges(known);
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
    pub(super) async fn retry_later(
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
}
