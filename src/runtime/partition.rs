//! One assigned partition's records in flight, and how a record starts: on the engine's task
//! when only the dedup store and the producer make it wait, else as a task of its own.
//!
//! Invariant: every record started reports its end exactly once, as a [`Done`] tagged with its
//! partition's generation, so the engine ignores the end of a record of a partition it has
//! since lost or reset. It never stores offsets or pauses partitions: the engine does.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::engine::TopicPartition;
use super::lanes::{LaneKey, Lanes};
use super::offsets::OffsetWindow;
use super::work::{Finished, Inline, Job, Staged, Worker};

/// A record's task has ended.
pub(super) struct Done {
    pub(super) tp: TopicPartition,
    pub(super) generation: u64,
    pub(super) offset: i64,
    pub(super) key: LaneKey,
    /// Its input's weight against the byte budget.
    pub(super) bytes: usize,
    pub(super) finished: Finished,
}

/// A record in its key's lane.
pub(super) struct Queued {
    pub(super) offset: i64,
    pub(super) bytes: usize,
    pub(super) job: Job,
}

/// One assigned partition's records in flight. A new state (a new generation) starts after a
/// revoke or a reset, so the end of an abandoned task is recognised and ignored.
pub(super) struct PartitionState {
    pub(super) generation: u64,
    pub(super) window: OffsetWindow<Option<Staged>>,
    pub(super) lanes: Lanes<Queued>,
    /// Records started: their task (aborted if the partition is abandoned), or none when it
    /// runs without one (its writes and mark then finish, unheeded).
    pub(super) tasks: HashMap<i64, Option<AbortHandle>, foldhash::fast::RandomState>,
    /// Bytes of its records whose tasks have not ended (waiting in a lane or running).
    pub(super) bytes: usize,
    /// Offset of a retry record not due yet: the partition is rewound to it and paused.
    pub(super) retry_pause: Option<i64>,
    /// Paused because its window or the budget was full.
    pub(super) room_paused: bool,
}

impl PartitionState {
    /// A partition's state under a new generation.
    pub(super) fn new(next_generation: &mut u64) -> PartitionState {
        *next_generation += 1;
        PartitionState {
            generation: *next_generation,
            window: OffsetWindow::default(),
            lanes: Lanes::default(),
            tasks: HashMap::default(),
            bytes: 0,
            retry_pause: None,
            room_paused: false,
        }
    }
}

/// Where started records go: run on the engine's task, or as tasks of their own.
pub(super) struct Starts<'a> {
    pub(super) worker: &'a Arc<Worker>,
    pub(super) done_tx: &'a mpsc::UnboundedSender<Done>,
}

impl Starts<'_> {
    /// Starts a record: without a task of its own when only the dedup store and the producer
    /// make it wait ([`Worker::try_inline`]), else as a task of its own. Its end comes back as a
    /// [`Done`].
    pub(super) fn start(
        &self,
        tp: &TopicPartition,
        state: &mut PartitionState,
        key: LaneKey,
        queued: Queued,
    ) {
        let Queued { offset, bytes, job } = queued;
        let (tp_owned, generation, done_tx) = (tp.clone(), state.generation, self.done_tx.clone());
        let on_end = move |finished| {
            let _ = done_tx.send(Done {
                tp: tp_owned,
                generation,
                offset,
                key,
                bytes,
                finished,
            });
        };
        let (job, on_end) = match self.worker.try_inline(job, on_end) {
            Inline::Started => {
                state.tasks.insert(offset, None);
                return;
            }
            Inline::Declined(job, on_end) => (job, on_end),
        };
        let worker = self.worker.clone();
        let task = tokio::spawn(async move { on_end(worker.run(job).await) });
        state.tasks.insert(offset, Some(task.abort_handle()));
    }
}
