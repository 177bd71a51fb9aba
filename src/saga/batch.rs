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
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::retention::{self, Finished};
use super::state::{Happening, SagaState, SagaStatus};

/// Committed states of the partitions loaded since the last rebalance.
#[derive(Default)]
pub struct Known {
    partitions: HashMap<i32, HashMap<Uuid, SagaState>>,
    /// Sagas not finished (running, compensating or stuck): those a tick may time out.
    open: HashSet<(i32, Uuid)>,
    /// Finished sagas, by when they settled: those that expire.
    finished: Finished,
    /// Keys whose stored state was already expired when its partition was loaded (not held):
    /// their tombstones are still to be written.
    unwritten: Vec<(i32, Uuid)>,
    stuck: u64,
}

impl Known {
    pub fn is_loaded(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Takes the states read from partition `partition` of the state topic, and the keys found
    /// expired there (to be tombstoned).
    pub fn load(
        &mut self,
        partition: i32,
        states: HashMap<Uuid, SagaState>,
        expired: impl IntoIterator<Item = Uuid>,
    ) {
        self.forget(partition);
        for (order_id, state) in states {
            self.count(partition, order_id, None, Some(Counted::of(&state)));
            self.partitions
                .entry(partition)
                .or_default()
                .insert(order_id, state);
        }
        self.partitions.entry(partition).or_default();
        self.unwritten
            .extend(expired.into_iter().map(|id| (partition, id)));
    }

    pub fn get(&self, partition: i32, order_id: &Uuid) -> Option<&SagaState> {
        self.partitions.get(&partition)?.get(order_id)
    }

    /// Forgets every state: after a rebalance, partitions are loaded again before their inputs.
    pub fn clear(&mut self) {
        self.partitions.clear();
        self.open.clear();
        self.finished.clear();
        self.unwritten.clear();
        self.stuck = 0;
    }

    fn forget(&mut self, partition: i32) {
        if let Some(states) = self.partitions.remove(&partition) {
            for (order_id, state) in states {
                self.count(partition, order_id, Some(Counted::of(&state)), None);
            }
        }
        self.unwritten.retain(|(p, _)| *p != partition);
    }

    /// Takes the changes of a batch whose transaction is being committed (`None`: a tombstone,
    /// the state is evicted).
    pub fn stage(&mut self, changed: HashMap<(i32, Uuid), Option<SagaState>>) {
        for ((partition, order_id), state) in changed {
            let after = state.as_ref().map(Counted::of);
            let states = self.partitions.entry(partition).or_default();
            let before = match state {
                Some(state) => states.insert(order_id, state),
                None => states.remove(&order_id),
            };
            self.count(partition, order_id, before.as_ref().map(Counted::of), after);
        }
    }

    fn count(
        &mut self,
        partition: i32,
        order_id: Uuid,
        before: Option<Counted>,
        after: Option<Counted>,
    ) {
        let (was, is) = (before.map(|c| c.status), after.map(|c| c.status));
        if was == Some(SagaStatus::Stuck) {
            self.stuck -= 1;
        }
        if is == Some(SagaStatus::Stuck) {
            self.stuck += 1;
        }
        match is {
            Some(status) if !status.is_final() => {
                self.open.insert((partition, order_id));
            }
            _ => {
                self.open.remove(&(partition, order_id));
            }
        }
        self.finished.change(
            partition,
            order_id,
            before.and_then(|c| c.settled_at),
            after.and_then(|c| c.settled_at),
        );
    }

    /// Sagas not finished, by partition and order: the only ones a tick may change.
    pub fn unfinished(&self) -> impl Iterator<Item = (i32, &SagaState)> + '_ {
        self.open
            .iter()
            .filter_map(|(p, id)| Some((*p, self.partitions.get(p)?.get(id)?)))
    }

    /// Up to `limit` keys whose state is to be tombstoned at `now`: those found expired when
    /// loaded (handed over once), then the finished sagas past `window`, oldest first (still
    /// held until their tombstone is staged).
    pub fn expired(&mut self, now: i64, window: Duration, limit: usize) -> Vec<(i32, Uuid)> {
        let unwritten = self.unwritten.len().min(limit);
        let mut out: Vec<(i32, Uuid)> = self.unwritten.drain(..unwritten).collect();
        out.extend(self.finished.expired(now, window, limit - out.len()));
        out
    }

    /// Running or compensating.
    pub fn in_flight(&self) -> u64 {
        self.open.len() as u64 - self.stuck
    }

    pub fn stuck(&self) -> u64 {
        self.stuck
    }

    /// States held: (in flight or stuck, finished).
    pub fn held(&self) -> (u64, u64) {
        (self.open.len() as u64, self.finished.len() as u64)
    }
}

/// What the counts and the expiry index need of a state.
#[derive(Clone, Copy)]
struct Counted {
    status: SagaStatus,
    settled_at: Option<i64>,
}

impl Counted {
    fn of(state: &SagaState) -> Counted {
        Counted {
            status: state.status,
            settled_at: retention::settled_at(state),
        }
    }
}

/// Inputs taken since the last commit and what they changed, all written in one transaction.
pub struct Batch {
    /// When its first input (or timeout) came: the batch commits at most a commit interval later.
    pub opened: Instant,
    /// Newest state of each saga changed, by (partition, order); `None`: expired, a tombstone.
    changed: HashMap<(i32, Uuid), Option<SagaState>>,
    /// Tombstones in `changed`.
    pub expired: u64,
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
            expired: 0,
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

    /// The newest state of a saga: this batch's change (none if it expired in this batch), else
    /// the known one.
    pub fn current<'a>(
        &'a self,
        known: &'a Known,
        partition: i32,
        order_id: &Uuid,
    ) -> Option<&'a SagaState> {
        match self.changed.get(&(partition, *order_id)) {
            Some(change) => change.as_ref(),
            None => known.get(partition, order_id),
        }
    }

    /// Whether this batch changed (or expired) a saga.
    pub fn has_changed(&self, partition: i32, order_id: &Uuid) -> bool {
        self.changed.contains_key(&(partition, *order_id))
    }

    /// Expires a saga: its tombstone is written with the batch, and it is evicted once staged.
    pub fn expire(&mut self, partition: i32, order_id: Uuid) {
        if self.changed.insert((partition, order_id), None).is_none() {
            self.expired += 1;
        }
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
        if let Some(None) = self.changed.insert((partition, order_id), Some(state)) {
            self.expired -= 1; // expired and started again within the batch
        }
    }

    pub fn changed_count(&self) -> usize {
        self.changed.len()
    }

    /// The changed states (`None`: a tombstone), for [`Known::stage`].
    pub fn take_changed(&mut self) -> HashMap<(i32, Uuid), Option<SagaState>> {
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

    fn state(status: SagaStatus, version: u64) -> SagaState {
        SagaState::sample(status, version, 0)
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
        known.load(0, HashMap::from([(a.order_id, a.clone())]), []);
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
        known.load(1, HashMap::new(), []);
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
            [],
        );
        assert_eq!((known.in_flight(), known.stuck()), (1, 1));
        assert_eq!(known.unfinished().count(), 2);
        let mut batch = Batch::new(Instant::now());
        batch.change(0, with(a.clone(), SagaStatus::Stuck, 2), []);
        batch.change(0, with(b.clone(), SagaStatus::Cancelled, 5), []);
        known.stage(batch.take_changed());
        assert_eq!((known.in_flight(), known.stuck()), (0, 1));
        // Loading a partition again replaces what was counted for it.
        known.load(0, HashMap::from([(a.order_id, a.clone())]), []);
        assert_eq!((known.in_flight(), known.stuck()), (1, 0));
        known.load(2, HashMap::from([(b.order_id, b.clone())]), []);
        assert_eq!((known.in_flight(), known.stuck()), (1, 1));
        known.clear();
        assert_eq!((known.in_flight(), known.stuck()), (0, 0));
        assert!(!known.is_loaded(0));
    }

    #[test]
    fn an_expired_saga_is_tombstoned_by_a_batch_and_evicted_once_staged() {
        let window = Duration::from_secs(1);
        let mut known = Known::default();
        let mut done = state(SagaStatus::Confirmed, 4);
        done.updated_at = 1_000;
        let running = state(SagaStatus::Running, 1);
        let unwritten = Uuid::now_v7();
        known.load(
            0,
            HashMap::from([
                (done.order_id, done.clone()),
                (running.order_id, running.clone()),
            ]),
            [unwritten],
        );
        assert_eq!(known.held(), (1, 1));
        // Not yet: only the key found expired at load time is handed over (once).
        assert_eq!(known.expired(1_999, window, 10), [(0, unwritten)]);
        assert!(known.expired(1_999, window, 10).is_empty());
        let expired = known.expired(2_000, window, 10);
        assert_eq!(expired, [(0, done.order_id)]);
        let mut batch = Batch::new(Instant::now());
        batch.expire(0, done.order_id);
        assert!(batch.current(&known, 0, &done.order_id).is_none());
        assert!(!batch.is_empty());
        assert_eq!(batch.expired, 1);
        // Held until the tombstone is staged; the saga in flight is never handed over.
        assert_eq!(known.held(), (1, 1));
        known.stage(batch.take_changed());
        assert!(known.get(0, &done.order_id).is_none());
        assert_eq!(known.held(), (1, 0));
        assert!(known.expired(i64::MAX, window, 10).is_empty());
        assert_eq!(known.get(0, &running.order_id).unwrap().version, 1);
    }

    #[test]
    fn a_saga_started_again_in_the_batch_that_expired_it_is_written_not_tombstoned() {
        let mut known = Known::default();
        let done = state(SagaStatus::Cancelled, 3);
        known.load(0, HashMap::from([(done.order_id, done.clone())]), []);
        let mut batch = Batch::new(Instant::now());
        batch.expire(0, done.order_id);
        batch.change(0, with(done.clone(), SagaStatus::Running, 1), []);
        assert_eq!(batch.expired, 0);
        known.stage(batch.take_changed());
        assert_eq!(known.held(), (1, 0));
    }
}
