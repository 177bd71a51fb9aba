//! The orchestrator's bookkeeping between two commits, with no Kafka calls: the known saga
//! states of the partitions it owns ([`Known`]) and the open batch of inputs on top of them
//! ([`Batch`]).
//!
//! Invariants kept here:
//! - [`Known`] holds committed states and, while a batch's transaction is being committed, that
//!   batch's changes ([`Known::stage`]): the next batch builds on them. When that commit fails,
//!   the orchestrator forgets every state ([`Known::clear`]) and loads them again. A batch that
//!   is dropped before its commit starts leaves [`Known`] as it was.
//! - An input is applied to the newest state of its saga: the batch's own change if it has one,
//!   else the known state. Each changed saga is written once per batch, at its newest version.
//! - The offsets a batch commits are one past its last input of each partition; the first input
//!   of each partition is where an aborted batch is read again from.
//! - `in_flight` and `stuck` are counted as states change, and ticks look only at sagas not
//!   finished, so neither costs a pass over every saga ever held.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use uuid::Uuid;

use super::state::{Happening, SagaState, SagaStatus};

/// Committed states of the partitions loaded since the last rebalance.
#[derive(Default)]
pub struct Known {
    partitions: HashMap<i32, HashMap<Uuid, SagaState>>,
    /// Sagas not finished (running, compensating or stuck): those a tick may time out.
    open: HashSet<(i32, Uuid)>,
    stuck: u64,
}

impl Known {
    pub fn is_loaded(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Takes the states read from partition `partition` of the state topic.
    pub fn load(&mut self, partition: i32, states: HashMap<Uuid, SagaState>) {
        self.forget(partition);
        for (order_id, state) in states {
            self.count(partition, order_id, None, Some(state.status));
            self.partitions
                .entry(partition)
                .or_default()
                .insert(order_id, state);
        }
        self.partitions.entry(partition).or_default();
    }

    pub fn get(&self, partition: i32, order_id: &Uuid) -> Option<&SagaState> {
        self.partitions.get(&partition)?.get(order_id)
    }

    /// Forgets every state: after a rebalance, partitions are loaded again before their inputs.
    pub fn clear(&mut self) {
        self.partitions.clear();
        self.open.clear();
        self.stuck = 0;
    }

    fn forget(&mut self, partition: i32) {
        if let Some(states) = self.partitions.remove(&partition) {
            for (order_id, state) in states {
                self.count(partition, order_id, Some(state.status), None);
            }
        }
    }

    /// Takes the changes of a batch whose transaction is being committed.
    pub fn stage(&mut self, changed: HashMap<(i32, Uuid), SagaState>) {
        for ((partition, order_id), state) in changed {
            let states = self.partitions.entry(partition).or_default();
            let before = states.get(&order_id).map(|s| s.status);
            let after = Some(state.status);
            states.insert(order_id, state);
            self.count(partition, order_id, before, after);
        }
    }

    fn count(
        &mut self,
        partition: i32,
        order_id: Uuid,
        before: Option<SagaStatus>,
        after: Option<SagaStatus>,
    ) {
        if before == Some(SagaStatus::Stuck) {
            self.stuck -= 1;
        }
        if after == Some(SagaStatus::Stuck) {
            self.stuck += 1;
        }
        match after {
            Some(status) if !status.is_final() => {
                self.open.insert((partition, order_id));
            }
            _ => {
                self.open.remove(&(partition, order_id));
            }
        }
    }

    /// Sagas not finished, by partition and order: the only ones a tick may change.
    pub fn unfinished(&self) -> impl Iterator<Item = (i32, &SagaState)> + '_ {
        self.open
            .iter()
            .filter_map(|(p, id)| Some((*p, self.partitions.get(p)?.get(id)?)))
    }

    /// Running or compensating.
    pub fn in_flight(&self) -> u64 {
        self.open.len() as u64 - self.stuck
    }

    pub fn stuck(&self) -> u64 {
        self.stuck
    }
}

/// Inputs taken since the last commit and what they changed, all written in one transaction.
pub struct Batch {
    /// When its first input (or timeout) came: the batch commits at most a commit interval later.
    pub opened: Instant,
    /// Newest state of each saga changed, by (partition, order).
    changed: HashMap<(i32, Uuid), SagaState>,
    pub happenings: Vec<(Uuid, Happening)>,
    /// Inputs that changed nothing: (topic, why).
    pub ignored: Vec<(String, &'static str)>,
    /// First and last offset of the inputs, by (topic, partition).
    offsets: HashMap<(String, i32), (i64, i64)>,
    inputs: usize,
    /// Holds timeouts: its commit also carries the consumer's positions, so that the group's
    /// generation fences a replica that lost these partitions.
    pub ticked: bool,
}

impl Batch {
    pub fn new(opened: Instant) -> Batch {
        Batch {
            opened,
            changed: HashMap::new(),
            happenings: Vec::new(),
            ignored: Vec::new(),
            offsets: HashMap::new(),
            inputs: 0,
            ticked: false,
        }
    }

    /// Inputs taken, applied or not.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Nothing to commit: no input taken and no state changed.
    pub fn is_empty(&self) -> bool {
        self.inputs == 0 && self.changed.is_empty()
    }

    /// Notes an input at `offset` of `topic`/`partition`, before it is applied (so that an input
    /// that cannot be decoded yet is read again with the batch).
    pub fn take(&mut self, topic: &str, partition: i32, offset: i64) {
        self.inputs += 1;
        match self.offsets.get_mut(&(topic.to_string(), partition)) {
            Some((first, last)) => {
                *first = (*first).min(offset);
                *last = (*last).max(offset);
            }
            None => {
                self.offsets
                    .insert((topic.to_string(), partition), (offset, offset));
            }
        }
    }

    /// The newest state of a saga: this batch's change, else the known one.
    pub fn current<'a>(
        &'a self,
        known: &'a Known,
        partition: i32,
        order_id: &Uuid,
    ) -> Option<&'a SagaState> {
        self.changed
            .get(&(partition, *order_id))
            .or_else(|| known.get(partition, order_id))
    }

    /// Records a saga's new state and what happened to it.
    pub fn change(
        &mut self,
        partition: i32,
        state: SagaState,
        happenings: impl IntoIterator<Item = Happening>,
    ) {
        let order_id = state.order_id;
        self.happenings
            .extend(happenings.into_iter().map(|h| (order_id, h)));
        self.changed.insert((partition, order_id), state);
    }

    /// Changed states, once each, at their newest version.
    pub fn changed(&self) -> impl Iterator<Item = (i32, &SagaState)> + '_ {
        self.changed.iter().map(|((p, _), s)| (*p, s))
    }

    pub fn changed_count(&self) -> usize {
        self.changed.len()
    }

    /// The changed states, for [`Known::stage`].
    pub fn take_changed(&mut self) -> HashMap<(i32, Uuid), SagaState> {
        std::mem::take(&mut self.changed)
    }

    /// Offsets to commit: one past the last input of each partition.
    pub fn next_offsets(&self) -> impl Iterator<Item = (&str, i32, i64)> + '_ {
        self.offsets
            .iter()
            .map(|((t, p), (_, last))| (t.as_str(), *p, last + 1))
    }

    /// Where each partition is read again from when the batch is aborted: its first input.
    pub fn first_offsets(&self) -> impl Iterator<Item = (&str, i32, i64)> + '_ {
        self.offsets
            .iter()
            .map(|((t, p), (first, _))| (t.as_str(), *p, *first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::OrderCreated;

    fn state(status: SagaStatus, version: u64) -> SagaState {
        let order = OrderCreated::sample("test");
        SagaState {
            saga: "order".into(),
            order_id: order.data.order_id,
            correlation_id: order.envelope.correlation_id,
            version,
            status,
            started_at: 0,
            updated_at: 0,
            reason: None,
            order: order.data,
            steps: Vec::new(),
            history: Vec::new(),
        }
    }

    fn with(mut s: SagaState, status: SagaStatus, version: u64) -> SagaState {
        s.status = status;
        s.version = version;
        s
    }

    #[test]
    fn an_input_sees_the_batch_change_before_the_known_state() {
        let mut known = Known::default();
        let a = state(SagaStatus::Running, 1);
        known.load(0, HashMap::from([(a.order_id, a.clone())]));
        let mut batch = Batch::new(Instant::now());
        assert_eq!(batch.current(&known, 0, &a.order_id).unwrap().version, 1);
        batch.change(0, with(a.clone(), SagaStatus::Running, 2), []);
        batch.change(0, with(a.clone(), SagaStatus::Confirmed, 3), []);
        assert_eq!(batch.current(&known, 0, &a.order_id).unwrap().version, 3);
        // Written once, at its newest version; the known state is untouched until staged.
        assert_eq!(batch.changed_count(), 1);
        assert_eq!(known.get(0, &a.order_id).unwrap().version, 1);
        assert_eq!(known.in_flight(), 1);
        known.stage(batch.take_changed());
        assert_eq!(known.get(0, &a.order_id).unwrap().version, 3);
        assert_eq!(known.in_flight(), 0);
        assert_eq!(known.unfinished().count(), 0);
    }

    #[test]
    fn a_dropped_batch_leaves_the_known_states_as_they_were() {
        let mut known = Known::default();
        known.load(1, HashMap::new());
        let a = state(SagaStatus::Running, 1);
        let mut batch = Batch::new(Instant::now());
        batch.change(1, a.clone(), [Happening::Started]);
        drop(batch);
        assert!(known.get(1, &a.order_id).is_none());
        assert_eq!(known.in_flight(), 0);
    }

    #[test]
    fn offsets_are_one_past_the_last_input_and_rewind_to_the_first() {
        let mut batch = Batch::new(Instant::now());
        assert!(batch.is_empty());
        for (topic, partition, offset) in [("a", 0, 7), ("a", 0, 5), ("a", 1, 9), ("b", 0, 2)] {
            batch.take(topic, partition, offset);
        }
        assert_eq!(batch.inputs(), 4);
        assert!(!batch.is_empty());
        let mut next: Vec<_> = batch.next_offsets().collect();
        next.sort();
        assert_eq!(next, [("a", 0, 8), ("a", 1, 10), ("b", 0, 3)]);
        let mut first: Vec<_> = batch.first_offsets().collect();
        first.sort();
        assert_eq!(first, [("a", 0, 5), ("a", 1, 9), ("b", 0, 2)]);
    }

    #[test]
    fn in_flight_and_stuck_follow_each_change_and_each_load() {
        let mut known = Known::default();
        let a = state(SagaStatus::Running, 1);
        let b = state(SagaStatus::Stuck, 4);
        let c = state(SagaStatus::Cancelled, 6);
        known.load(
            0,
            HashMap::from([
                (a.order_id, a.clone()),
                (b.order_id, b.clone()),
                (c.order_id, c.clone()),
            ]),
        );
        assert_eq!((known.in_flight(), known.stuck()), (1, 1));
        assert_eq!(known.unfinished().count(), 2);
        let mut batch = Batch::new(Instant::now());
        batch.change(0, with(a.clone(), SagaStatus::Stuck, 2), []);
        batch.change(0, with(b.clone(), SagaStatus::Cancelled, 5), []);
        known.stage(batch.take_changed());
        assert_eq!((known.in_flight(), known.stuck()), (0, 1));
        // Loading a partition again replaces what was counted for it.
        known.load(0, HashMap::from([(a.order_id, a.clone())]));
        assert_eq!((known.in_flight(), known.stuck()), (1, 0));
        known.load(2, HashMap::from([(b.order_id, b.clone())]));
        assert_eq!((known.in_flight(), known.stuck()), (1, 1));
        known.clear();
        assert_eq!((known.in_flight(), known.stuck()), (0, 0));
        assert!(!known.is_loaded(0));
    }
}
