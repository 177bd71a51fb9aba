//! How long a finished saga's state is kept, and which states are past it. Pure: no Kafka, so
//! every rule is tested here.
//!
//! Invariant: a saga in flight (running, compensating, stuck) never expires, whatever its age. A
//! finished one (confirmed or cancelled) expires one window after it settled: its last change,
//! or the deadline of a reply it still awaits (a late success undone after the cancellation),
//! whichever is later, so that late replies and `orderflow saga show` still find it within the
//! window. Expired states are found from the front of an index ordered by that time, never by
//! a pass over every state held.

use std::collections::BTreeSet;
use std::time::Duration;

use uuid::Uuid;

use super::state::{next_deadline, SagaState};
use crate::database::retention::{self as windows, RetentionError};

/// The setting (environment variable) of the window.
pub const SETTING: &str = "ORDERFLOW_SAGA_RETENTION";
/// Long enough for replies that come days late and for looking a saga up after the fact.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// The window `ORDERFLOW_SAGA_RETENTION` declares (default 7 days; 1 min ..= 365 d, parsed as
/// the other retention settings are; a refusal names the setting).
pub fn window_from_env() -> Result<Duration, RetentionError> {
    windows::window_from_env(SETTING, DEFAULT_WINDOW)
}

/// A window given through the API: 1 s ..= 365 d (tests and benchmarks shorten it).
pub fn check_window(window: Duration) -> Result<Duration, RetentionError> {
    if !(windows::MIN_WINDOW..=windows::MAX_WINDOW).contains(&window) {
        return Err(RetentionError(format!(
            "saga retention {} is out of bounds (1s to 365d)",
            humantime::format_duration(window)
        )));
    }
    Ok(window)
}

/// When a finished saga stopped waiting for anything (ms since the epoch); `None` while it is in
/// flight.
pub fn settled_at(state: &SagaState) -> Option<i64> {
    if !state.status.is_final() {
        return None;
    }
    Some(next_deadline(state).map_or(state.updated_at, |d| d.max(state.updated_at)))
}

/// Whether `state` may be forgotten at `now` (ms since the epoch).
pub fn is_expired(state: &SagaState, now: i64, window: Duration) -> bool {
    settled_at(state).is_some_and(|at| expires_at(at, window) <= now)
}

fn expires_at(settled_at: i64, window: Duration) -> i64 {
    settled_at.saturating_add(window.as_millis().min(i64::MAX as u128) as i64)
}

/// Finished sagas held in memory, ordered by when they settled: the expired ones are the front.
#[derive(Debug, Default)]
pub struct Finished {
    by_time: BTreeSet<(i64, i32, Uuid)>,
}

impl Finished {
    /// Notes that the saga of `order_id` went from settled at `before` to settled at `after`
    /// ([`settled_at`] of its old and new state; `None`: in flight or absent).
    pub fn change(
        &mut self,
        partition: i32,
        order_id: Uuid,
        before: Option<i64>,
        after: Option<i64>,
    ) {
        if let Some(at) = before {
            self.by_time.remove(&(at, partition, order_id));
        }
        if let Some(at) = after {
            self.by_time.insert((at, partition, order_id));
        }
    }

    pub fn len(&self) -> usize {
        self.by_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_time.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_time.clear();
    }

    /// The sagas expired at `now`, oldest first, at most `limit`.
    pub fn expired(
        &self,
        now: i64,
        window: Duration,
        limit: usize,
    ) -> impl Iterator<Item = (i32, Uuid)> + '_ {
        self.by_time
            .iter()
            .take_while(move |(at, _, _)| expires_at(*at, window) <= now)
            .take(limit)
            .map(|(_, p, id)| (*p, *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::state::{SagaStatus, StepState, StepStatus};

    const HOUR: Duration = Duration::from_secs(3600);
    const HOUR_MS: i64 = 3_600_000;

    fn state(status: SagaStatus, updated_at: i64) -> SagaState {
        SagaState::sample(status, 1, updated_at)
    }

    fn awaiting(mut s: SagaState, deadline: i64) -> SagaState {
        s.steps.push(StepState {
            name: "charge-payment".into(),
            status: StepStatus::Compensating,
            attempts: 2,
            command_id: None,
            compensation_id: None,
            requested_at: None,
            deadline: Some(deadline),
            reply: None,
            error: None,
        });
        s
    }

    #[test]
    fn a_saga_in_flight_never_expires() {
        for status in [
            SagaStatus::Running,
            SagaStatus::Compensating,
            SagaStatus::Stuck,
        ] {
            let s = state(status, 0);
            assert_eq!(settled_at(&s), None);
            assert!(
                !is_expired(&s, i64::MAX, Duration::from_secs(1)),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_finished_saga_expires_one_window_after_its_last_change() {
        for status in [SagaStatus::Confirmed, SagaStatus::Cancelled] {
            let s = state(status, 10 * HOUR_MS);
            assert!(!is_expired(&s, 11 * HOUR_MS - 1, HOUR), "{status:?}");
            assert!(is_expired(&s, 11 * HOUR_MS, HOUR), "{status:?}");
        }
    }

    #[test]
    fn a_finished_saga_awaiting_a_reply_expires_one_window_after_its_deadline() {
        let s = awaiting(state(SagaStatus::Cancelled, 10 * HOUR_MS), 12 * HOUR_MS);
        assert_eq!(settled_at(&s), Some(12 * HOUR_MS));
        assert!(!is_expired(&s, 12 * HOUR_MS, HOUR));
        assert!(is_expired(&s, 13 * HOUR_MS, HOUR));
        // A deadline before its last change does not shorten the window.
        let s = awaiting(state(SagaStatus::Cancelled, 10 * HOUR_MS), 0);
        assert_eq!(settled_at(&s), Some(10 * HOUR_MS));
    }

    #[test]
    fn the_index_yields_the_expired_front_only_and_follows_each_change() {
        let mut index = Finished::default();
        let old = state(SagaStatus::Confirmed, 0);
        let young = state(SagaStatus::Cancelled, 5 * HOUR_MS);
        let running = state(SagaStatus::Running, 0);
        let at = |s: &SagaState| settled_at(s);
        index.change(0, old.order_id, None, at(&old));
        index.change(1, young.order_id, None, at(&young));
        index.change(0, running.order_id, None, at(&running));
        assert_eq!(index.len(), 2, "a saga in flight is not indexed");
        let expired: Vec<_> = index.expired(2 * HOUR_MS, HOUR, 10).collect();
        assert_eq!(expired, [(0, old.order_id)]);
        assert_eq!(index.expired(10 * HOUR_MS, HOUR, 1).count(), 1, "limit");
        assert_eq!(index.expired(10 * HOUR_MS, HOUR, 10).count(), 2);
        // A late change moves it back; a tombstone removes it.
        let changed = state(SagaStatus::Confirmed, 9 * HOUR_MS);
        index.change(0, old.order_id, at(&old), at(&changed));
        assert_eq!(index.expired(2 * HOUR_MS, HOUR, 10).count(), 0);
        index.change(0, old.order_id, at(&changed), None);
        index.change(1, young.order_id, at(&young), None);
        assert!(index.is_empty());
    }

    #[test]
    fn api_windows_are_bounded() {
        assert!(check_window(Duration::from_secs(1)).is_ok());
        assert!(check_window(Duration::from_millis(999)).is_err());
        assert!(check_window(Duration::from_secs(366 * 86_400)).is_err());
        let e = windows::parse_window(SETTING, "10").unwrap_err();
        assert!(e.0.contains(SETTING), "{e}");
    }
}
