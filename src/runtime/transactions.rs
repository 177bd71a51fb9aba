//! Exactly once: the batch of finished records whose outputs and input offsets are committed
//! together in one Kafka transaction, bounded by count and by time (like Kafka Streams'
//! `commit.interval.ms`).
//!
//! Invariant: a record joins the batch only once every earlier record of its partition has
//! (the engine hands over each window's contiguous finished prefix), so a committed offset never
//! passes a record whose outputs are not in this or an earlier transaction. The transactional
//! calls themselves (begin, send offsets and commit, abort) are [`crate::kafka::transactions`].

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use super::context::MeteredContext;
use super::engine::TopicPartition;
use super::work::{Staged, Worker};
use super::writer;
use crate::kafka::transactions::{self, TransactionError};
use crate::telemetry::ProcessorEvent;

/// Most inputs in one transaction.
pub const MAX_INPUTS: usize = 500;
/// Longest a finished input waits for its transaction.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// One partition's part of the batch.
struct Part {
    /// Where the batch began in this partition: a new owner, or a retry, reads from here.
    first_offset: i64,
    last_offset: i64,
    staged: Vec<Staged>,
}

#[derive(Default)]
pub struct Batch {
    parts: HashMap<TopicPartition, Part>,
    inputs: usize,
    started: Option<Instant>,
}

impl Batch {
    pub fn add(&mut self, tp: &TopicPartition, offset: i64, staged: Staged) {
        let part = self.parts.entry(tp.clone()).or_insert(Part {
            first_offset: offset,
            last_offset: offset,
            staged: Vec::new(),
        });
        part.last_offset = offset;
        part.staged.push(staged);
        self.inputs += 1;
        self.started.get_or_insert_with(Instant::now);
    }

    /// Drops a revoked partition's part: its outputs are never written.
    pub fn remove(&mut self, tp: &TopicPartition) {
        if let Some(part) = self.parts.remove(tp) {
            self.inputs -= part.staged.len();
        }
        if self.parts.is_empty() {
            self.started = None;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inputs == 0
    }

    pub fn is_full(&self) -> bool {
        self.inputs >= MAX_INPUTS
    }

    /// When the batch must be committed at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|at| at + COMMIT_INTERVAL)
    }

    /// Writes every staged record and the offsets past the batch in one transaction. Returns
    /// the staged inputs once committed; on failure, each partition's first offset, to read
    /// the batch again from.
    pub async fn commit(
        self,
        worker: &Worker,
        consumer: &StreamConsumer<MeteredContext>,
    ) -> Result<Vec<Staged>, (TransactionError, Vec<(TopicPartition, i64)>)> {
        let starts: Vec<(TopicPartition, i64)> = self
            .parts
            .iter()
            .map(|(tp, part)| (tp.clone(), part.first_offset))
            .collect();
        let mut offsets = TopicPartitionList::new();
        for (tp, part) in &self.parts {
            if let Err(e) =
                offsets.add_partition_offset(&tp.0, tp.1, Offset::Offset(part.last_offset + 1))
            {
                return Err((TransactionError::from_kafka(e), starts));
            }
        }
        // A consumer in its group always has its metadata.
        let Some(metadata) = consumer.group_metadata() else {
            return Err((
                TransactionError::Abortable("the consumer has no group metadata".into()),
                starts,
            ));
        };
        if let Err(e) = transactions::begin(&worker.producer).await {
            return Err((e, starts));
        }
        let mut staged: Vec<Staged> = self.parts.into_values().flat_map(|p| p.staged).collect();
        let records = staged
            .iter_mut()
            .flat_map(|s| s.records.drain(..))
            .collect();
        let mut failed = None;
        for (record, error) in writer::write_all(&worker.producer, records).await {
            worker.telemetry.emit(ProcessorEvent::ProduceFailed {
                topic: &record.topic,
                error: &error,
                attempt: 1,
            });
            failed = Some(error);
        }
        let committed = match failed {
            Some(error) => Err(TransactionError::Abortable(error)),
            None => transactions::commit(&worker.producer, offsets, Some(metadata)).await,
        };
        match committed {
            Ok(()) => Ok(staged),
            Err(error) => {
                if !matches!(error, TransactionError::Fatal(_)) {
                    if let Err(abort) = transactions::abort(&worker.producer).await {
                        return Err((abort, starts));
                    }
                }
                Err((error, starts))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::route::Ending;

    fn staged() -> Staged {
        Staged {
            topic: "in".into(),
            records: Vec::new(),
            ending: Ending::Duplicate {
                event_id: uuid::Uuid::new_v4(),
            },
            claim: None,
        }
    }

    #[test]
    fn a_batch_is_bounded_by_count_and_a_revoked_partition_leaves_it_whole() {
        let mut batch = Batch::default();
        assert!(batch.is_empty() && batch.deadline().is_none());
        let (a, b) = (("in".into(), 0), ("in".into(), 1));
        batch.add(&a, 10, staged());
        batch.add(&a, 11, staged());
        batch.add(&b, 3, staged());
        assert!(
            batch.deadline().is_some(),
            "the interval runs from the first input"
        );
        assert_eq!(batch.parts[&a].first_offset, 10);
        assert_eq!(batch.parts[&a].last_offset, 11);
        batch.remove(&a);
        assert_eq!(batch.inputs, 1, "only b's input is left");
        batch.remove(&b);
        assert!(batch.is_empty() && batch.deadline().is_none());
        for offset in 0..MAX_INPUTS as i64 {
            assert!(!batch.is_full());
            batch.add(&a, offset, staged());
        }
        assert!(batch.is_full());
    }
}
