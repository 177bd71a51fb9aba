//! One order's saga state and how each input moves it: a pure function of (state, input, now),
//! so every path is tested without Kafka, and the orchestrator only stores what it returns.
//!
//! Replies are matched to the command they answer by the command's event id (their envelope's
//! `causation_id`), so a duplicate reply, a reply to a command that timed out, or one for another
//! saga is recognised and ignored, never applied twice.
//!
//! This file holds the state, the inputs and [`apply`]; `run.rs` the transition itself (each
//! input's effect on the steps, compensation and timeouts); `tests.rs` every path.

mod run;
#[cfg(test)]
mod tests;

use run::Run;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::commands::{self, Origin};
use super::definition::Saga;
use crate::contracts::events::uuid_string;
use crate::contracts::*;

/// Most history entries kept per saga (a saga has a few dozen at most).
const MAX_HISTORY: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SagaStatus {
    /// Steps are being done in order.
    Running,
    /// A step failed for good; finished steps are being undone in reverse order.
    Compensating,
    /// Every step succeeded; the completion event is published.
    Confirmed,
    /// Every finished step is undone; the cancellation event is published.
    Cancelled,
    /// A compensation failed for good or was not answered in time: needs a person (alerted on).
    /// A compensation reply that comes later resumes it.
    Stuck,
}

impl SagaStatus {
    pub fn is_final(self) -> bool {
        matches!(self, SagaStatus::Confirmed | SagaStatus::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Confirmed => "confirmed",
            SagaStatus::Cancelled => "cancelled",
            SagaStatus::Stuck => "stuck",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Pending,
    Requested,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub status: StepStatus,
    /// Commands sent for this step, compensation included.
    pub attempts: u32,
    #[serde(with = "uuid_string::option", default)]
    pub command_id: Option<Uuid>,
    #[serde(with = "uuid_string::option", default)]
    pub compensation_id: Option<Uuid>,
    pub requested_at: Option<i64>,
    /// When the awaited reply (to the command or the compensation) is overdue.
    pub deadline: Option<i64>,
    /// The data of the success reply: what a compensation needs (payment id, reservation id).
    pub reply: Option<Value>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Milliseconds since the epoch.
    pub at: i64,
    pub step: Option<String>,
    pub what: String,
}

/// What the state topic holds per order (JSON, keyed by order id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub saga: String,
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub correlation_id: Uuid,
    /// One more on every change; a stored state with a version not above the known one is a
    /// stale update (e.g. from a fenced replica) and is ignored.
    pub version: u64,
    pub status: SagaStatus,
    pub started_at: i64,
    pub updated_at: i64,
    pub reason: Option<String>,
    pub order: OrderCreatedData,
    pub steps: Vec<StepState>,
    pub history: Vec<HistoryEntry>,
}

#[cfg(test)]
impl SagaState {
    /// A state of a sample order, for unit tests: no steps, no history.
    pub fn sample(status: SagaStatus, version: u64, updated_at: i64) -> SagaState {
        let order = crate::contracts::OrderCreated::sample("test");
        SagaState {
            saga: "order".into(),
            order_id: order.data.order_id,
            correlation_id: order.envelope.correlation_id,
            version,
            status,
            started_at: 0,
            updated_at,
            reason: None,
            order: order.data,
            steps: Vec::new(),
            history: Vec::new(),
        }
    }
}

/// What reached the orchestrator.
#[derive(Debug)]
pub enum Input<'a> {
    Started(&'a OrderCreated),
    /// Any reply: success, failure or compensation done.
    Reply(&'a AnyEvent),
    /// A command found in its pipeline's dead-letter topic: it failed for good.
    DeadLettered {
        command: &'a AnyEvent,
        error: String,
    },
    /// Time passed: overdue replies fail their step.
    Tick,
}

/// Something worth a metric or a log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Happening {
    Started,
    StepSucceeded {
        step: String,
        seconds: f64,
    },
    StepFailed {
        step: String,
        seconds: f64,
        why: FailedBy,
    },
    CompensationSent {
        step: String,
    },
    Compensated {
        step: String,
    },
    Confirmed {
        seconds: f64,
    },
    Cancelled {
        seconds: f64,
    },
    Stuck {
        step: String,
    },
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedBy {
    Reply,
    DeadLettered,
    TimedOut,
}

impl FailedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailedBy::Reply => "failed",
            FailedBy::DeadLettered => "dead_lettered",
            FailedBy::TimedOut => "timed_out",
        }
    }
}

/// A change to store, and what to publish with it (in the same transaction).
#[derive(Debug)]
pub struct Transition {
    pub state: SagaState,
    pub emit: Vec<AnyEvent>,
    pub happenings: Vec<Happening>,
}

#[derive(Debug)]
pub enum Outcome {
    Changed(Box<Transition>),
    /// Nothing to do; why, for the ignored-inputs metric: duplicate, late, unrelated.
    Ignored(&'static str),
}

/// Why a reply or a dead letter for an order with no saga state is ignored: its saga finished
/// and expired (see `retention.rs`), or it never started here. It never starts one.
pub const NO_SAGA: &str = "no_saga";

/// Applies `input` to the saga of one order (`current`: its stored state, if any).
pub fn apply(
    saga: &Saga,
    current: Option<&SagaState>,
    input: Input<'_>,
    now: i64,
    source: &str,
) -> Outcome {
    let mut run = match (current, &input) {
        (None, Input::Started(order)) => Run::start(saga, order, now, source),
        (Some(_), Input::Started(_)) => return Outcome::Ignored("duplicate"),
        (None, _) => return Outcome::Ignored(NO_SAGA),
        (Some(state), _) => Run::resume(saga, state, now, source),
    };
    let changed = match input {
        Input::Started(order) => {
            run.happen(Happening::Started);
            run.note(None, format!("started by {}", order.envelope.event_id));
            run.advance(order.envelope.event_id);
            Ok(())
        }
        Input::Reply(event) => run.reply(event),
        Input::DeadLettered { command, error } => run.dead_lettered(command, &error),
        Input::Tick => run.tick(),
    };
    match changed {
        Ok(()) => Outcome::Changed(Box::new(run.finish())),
        Err(why) => Outcome::Ignored(why),
    }
}

/// When the earliest awaited reply of `state` is overdue, if one is awaited.
pub fn next_deadline(state: &SagaState) -> Option<i64> {
    state.steps.iter().filter_map(|s| s.deadline).min()
}
