//! Event ids in flight in this process: two records with one event id never run their step at
//! the same time, and a repeat of an event that already succeeded (its outputs written or
//! staged, its dedup mark not yet stored) counts as a duplicate.
//!
//! Invariant: an id has at most one [`Claim`]; a second record with that id waits until the
//! first one ends, then is told whether it succeeded. Knows nothing of Kafka or PostgreSQL: the
//! dedup store answers for ids no longer in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Succeeded,
}

/// An id in flight: its phase, and whom to wake when it changes (only once someone waits, so
/// the common case, an id nobody repeats, allocates nothing but its map slot).
#[derive(Debug)]
struct Held {
    phase: Phase,
    waiting: Option<Arc<Notify>>,
}

/// The ids in flight; cheap to clone and share between tasks.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// foldhash (seeded per process): a claim and its release hash the id twice per record.
    inner: Arc<Mutex<HashMap<Uuid, Held, foldhash::quality::RandomState>>>,
}

/// The right to run one event id's step; dropping it without [`Claim::succeeded`] (a failure,
/// an abandoned record) frees the id for the next record that carries it.
#[derive(Debug)]
pub struct Claim {
    claims: Claims,
    id: Uuid,
}

/// What [`Claims::claim`] found.
#[derive(Debug)]
pub enum Claimed {
    Mine(Claim),
    /// The same id succeeded in a record still in flight.
    Duplicate,
}

impl Claims {
    /// Claims `id`, waiting while another record with it is running.
    pub async fn claim(&self, id: Uuid) -> Claimed {
        loop {
            let changed = {
                let mut map = self.inner.lock().expect("claims lock");
                match map.get_mut(&id) {
                    Some(held) if held.phase == Phase::Succeeded => return Claimed::Duplicate,
                    // Registered under the lock: a change after it is not missed.
                    Some(held) => held
                        .waiting
                        .get_or_insert_with(Default::default)
                        .clone()
                        .notified_owned(),
                    None => {
                        map.insert(
                            id,
                            Held {
                                phase: Phase::Running,
                                waiting: None,
                            },
                        );
                        return Claimed::Mine(Claim {
                            claims: self.clone(),
                            id,
                        });
                    }
                }
            };
            // Ends when the holder succeeds (a duplicate, seen above) or lets go (try again).
            changed.await;
        }
    }

    /// Ids in flight.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("claims lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Claim {
    /// The step succeeded: until this claim is dropped (after the dedup mark), a repeat of the
    /// id is a duplicate.
    pub fn succeeded(&self) {
        let mut map = self.claims.inner.lock().expect("claims lock");
        if let Some(held) = map.get_mut(&self.id) {
            held.phase = Phase::Succeeded;
            if let Some(waiting) = &held.waiting {
                waiting.notify_waiters();
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let held = self
            .claims
            .inner
            .lock()
            .expect("claims lock")
            .remove(&self.id);
        if let Some(waiting) = held.and_then(|h| h.waiting) {
            waiting.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_waits_and_learns_the_outcome() {
        let claims = Claims::default();
        let id = Uuid::new_v4();
        let Claimed::Mine(first) = claims.claim(id).await else {
            panic!("first claim")
        };
        let c = claims.clone();
        let second = tokio::spawn(async move { c.claim(id).await });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "waits while the first runs");
        first.succeeded();
        assert!(matches!(second.await.unwrap(), Claimed::Duplicate));
        drop(first);
        assert!(claims.is_empty());
    }

    #[tokio::test]
    async fn a_failed_holder_lets_the_next_record_run() {
        let claims = Claims::default();
        let id = Uuid::new_v4();
        let Claimed::Mine(first) = claims.claim(id).await else {
            panic!("first claim")
        };
        let c = claims.clone();
        let second = tokio::spawn(async move { c.claim(id).await });
        tokio::task::yield_now().await;
        drop(first);
        assert!(matches!(second.await.unwrap(), Claimed::Mine(_)));
    }

    #[tokio::test]
    async fn of_many_racing_claims_one_runs_at_a_time() {
        let claims = Claims::default();
        let id = Uuid::new_v4();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (claims, running) = (claims.clone(), running.clone());
            tasks.push(tokio::spawn(async move {
                if let Claimed::Mine(claim) = claims.claim(id).await {
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(now, 0, "two holders at once");
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    drop(claim); // failed: the next one runs
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(claims.is_empty());
    }
}
