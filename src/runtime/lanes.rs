//! Per-key lanes of one partition: records with the same key run one after another, in offset
//! order; records with different keys may run at once.
//!
//! Invariant: at most one job per key is running, and a key's jobs start in the order they
//! were admitted. Records without a key share one lane, so they keep partition order. It
//! knows nothing of Kafka or of how many jobs may run process-wide (the engine's semaphore
//! bounds that).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A record's key (shared with the record, not copied); `None` for records without one.
pub type LaneKey = Option<Arc<[u8]>>;

#[derive(Debug)]
pub struct Lanes<J> {
    /// Keys with a running job, and the jobs waiting behind it.
    /// Hashed with foldhash (seeded per process, as SipHash is; several times faster for a
    /// record's key), four lookups per record.
    busy: HashMap<LaneKey, VecDeque<J>, foldhash::quality::RandomState>,
    waiting: usize,
}

impl<J> Default for Lanes<J> {
    fn default() -> Self {
        Lanes {
            busy: HashMap::default(),
            waiting: 0,
        }
    }
}

impl<J> Lanes<J> {
    /// Admits a job: returns it when it may start now, or keeps it behind its key's running job.
    pub fn admit(&mut self, key: LaneKey, job: J) -> Option<J> {
        match self.busy.get_mut(&key) {
            Some(queue) => {
                queue.push_back(job);
                self.waiting += 1;
                None
            }
            None => {
                self.busy.insert(key, VecDeque::new());
                Some(job)
            }
        }
    }

    /// The running job of `key` is done: returns the next job of that key, which starts now.
    pub fn finish(&mut self, key: &LaneKey) -> Option<J> {
        let queue = self.busy.get_mut(key)?;
        match queue.pop_front() {
            Some(next) => {
                self.waiting -= 1;
                Some(next)
            }
            None => {
                self.busy.remove(key);
                None
            }
        }
    }

    /// Jobs admitted and not started yet.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Keys with a running job.
    pub fn running(&self) -> usize {
        self.busy.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> LaneKey {
        Some(k.as_bytes().into())
    }

    #[test]
    fn one_job_per_key_runs_and_the_rest_wait_in_order() {
        let mut lanes = Lanes::default();
        assert_eq!(lanes.admit(key("a"), 1), Some(1));
        assert_eq!(
            lanes.admit(key("b"), 2),
            Some(2),
            "another key runs at once"
        );
        assert_eq!(lanes.admit(key("a"), 3), None);
        assert_eq!(lanes.admit(key("a"), 4), None);
        assert_eq!((lanes.running(), lanes.waiting()), (2, 2));
        assert_eq!(lanes.finish(&key("a")), Some(3));
        assert_eq!(lanes.finish(&key("b")), None);
        assert_eq!(lanes.finish(&key("a")), Some(4));
        assert_eq!(lanes.finish(&key("a")), None);
        assert_eq!((lanes.running(), lanes.waiting()), (0, 0));
        assert_eq!(
            lanes.admit(key("a"), 5),
            Some(5),
            "an idle key starts at once"
        );
    }

    #[test]
    fn records_without_a_key_keep_partition_order() {
        let mut lanes = Lanes::default();
        assert_eq!(lanes.admit(None, 1), Some(1));
        assert_eq!(lanes.admit(None, 2), None);
        assert_eq!(lanes.finish(&None), Some(2));
    }

    #[test]
    fn random_finishing_keeps_each_keys_sequence() {
        for seed in 0..100u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut lanes = Lanes::default();
            let mut running: Vec<(LaneKey, u32)> = Vec::new();
            let mut started: HashMap<LaneKey, Vec<u32>> = HashMap::new();
            let mut next_seq: HashMap<LaneKey, u32> = HashMap::new();
            for _ in 0..300 {
                if rng.bool() || running.is_empty() {
                    let k = key(&rng.u8(0..5).to_string());
                    let seq = next_seq.entry(k.clone()).or_default();
                    *seq += 1;
                    if let Some(job) = lanes.admit(k.clone(), *seq) {
                        running.push((k, job));
                    }
                } else {
                    let (k, job) = running.swap_remove(rng.usize(..running.len()));
                    started.entry(k.clone()).or_default().push(job);
                    if let Some(next) = lanes.finish(&k) {
                        running.push((k, next));
                    }
                }
                let keys: std::collections::HashSet<_> = running.iter().map(|r| &r.0).collect();
                assert_eq!(keys.len(), running.len(), "two jobs of one key running");
            }
            for seqs in started.values() {
                assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{seqs:?}");
            }
        }
    }
}
