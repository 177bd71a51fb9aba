//! One order's saga state and how each input moves it: a pure function of (state, input, now),
//! so every path is tested without Kafka, and the orchestrator only stores what it returns.
//!
//! Replies are matched to the command they answer by the command's event id (their envelope's
//! `causation_id`), so a duplicate reply, a reply to a command that timed out, or one for another
//! saga is recognised and ignored, never applied twice.

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

/// One transition in progress.
struct Run<'a> {
    saga: &'a Saga,
    state: SagaState,
    now: i64,
    source: &'a str,
    emit: Vec<AnyEvent>,
    happenings: Vec<Happening>,
}

impl<'a> Run<'a> {
    fn start(saga: &'a Saga, order: &OrderCreated, now: i64, source: &'a str) -> Run<'a> {
        let steps = saga
            .steps
            .iter()
            .map(|s| StepState {
                name: s.name.clone(),
                status: StepStatus::Pending,
                attempts: 0,
                command_id: None,
                compensation_id: None,
                requested_at: None,
                deadline: None,
                reply: None,
                error: None,
            })
            .collect();
        Run {
            saga,
            state: SagaState {
                saga: saga.name.clone(),
                order_id: order.data.order_id,
                correlation_id: order.envelope.correlation_id,
                version: 0,
                status: SagaStatus::Running,
                started_at: now,
                updated_at: now,
                reason: None,
                order: order.data.clone(),
                steps,
                history: Vec::new(),
            },
            now,
            source,
            emit: Vec::new(),
            happenings: Vec::new(),
        }
    }

    fn resume(saga: &'a Saga, state: &SagaState, now: i64, source: &'a str) -> Run<'a> {
        Run {
            saga,
            state: state.clone(),
            now,
            source,
            emit: Vec::new(),
            happenings: Vec::new(),
        }
    }

    fn finish(mut self) -> Transition {
        self.state.version += 1;
        self.state.updated_at = self.now;
        let excess = self.state.history.len().saturating_sub(MAX_HISTORY);
        self.state.history.drain(..excess);
        Transition {
            state: self.state,
            emit: self.emit,
            happenings: self.happenings,
        }
    }

    fn happen(&mut self, h: Happening) {
        self.happenings.push(h);
    }

    fn note(&mut self, step: Option<usize>, what: String) {
        let step = step.map(|i| self.state.steps[i].name.clone());
        self.state.history.push(HistoryEntry {
            at: self.now,
            step,
            what,
        });
    }

    fn origin(&self, cause: Uuid) -> Origin<'a> {
        Origin {
            source: self.source,
            correlation_id: self.state.correlation_id,
            causation_id: cause,
        }
    }

    fn seconds_since(&self, at: Option<i64>) -> f64 {
        at.map(|t| (self.now - t).max(0) as f64 / 1000.0)
            .unwrap_or_default()
    }

    /// Running: sends the next step's command, or completes the saga.
    fn advance(&mut self, cause: Uuid) {
        if self.state.status != SagaStatus::Running {
            return;
        }
        let Some(i) = self
            .state
            .steps
            .iter()
            .position(|s| s.status != StepStatus::Succeeded)
        else {
            self.state.status = SagaStatus::Confirmed;
            let seconds = self.seconds_since(Some(self.state.started_at));
            self.happen(Happening::Confirmed { seconds });
            self.note(None, "confirmed".into());
            let origin = self.origin(cause);
            self.emit.push(AnyEvent::OrderConfirmed(OrderConfirmed {
                envelope: Envelope {
                    causation_id: Some(cause),
                    ..Envelope::new::<OrderConfirmed>(origin.source, origin.correlation_id, None)
                },
                data: OrderConfirmedData {
                    order_id: self.state.order_id,
                    total: self.state.order.total.clone(),
                },
            }));
            return;
        };
        if self.state.steps[i].status != StepStatus::Pending {
            return; // requested already: wait for its reply
        }
        let definition = &self.saga.steps[i];
        match commands::build(
            &definition.command,
            &self.state.order,
            None,
            &self.origin(cause),
        ) {
            Ok(command) => {
                let step = &mut self.state.steps[i];
                step.status = StepStatus::Requested;
                step.attempts += 1;
                step.command_id = Some(command.envelope().event_id);
                step.requested_at = Some(self.now);
                step.deadline = Some(self.now + definition.timeout.as_millis() as i64);
                let what = format!(
                    "sent {} {}",
                    definition.command,
                    command.envelope().event_id
                );
                self.emit.push(command);
                self.note(Some(i), what);
            }
            Err(e) => self.fail_step(
                i,
                FailedBy::Reply,
                format!("cannot build command: {e}"),
                cause,
            ),
        }
    }

    /// Step `i` failed for good: undo what is done.
    fn fail_step(&mut self, i: usize, why: FailedBy, reason: String, cause: Uuid) {
        let seconds = self.seconds_since(self.state.steps[i].requested_at);
        let step = &mut self.state.steps[i];
        step.status = StepStatus::Failed;
        step.deadline = None;
        step.error = Some(reason.clone());
        let name = step.name.clone();
        self.happen(Happening::StepFailed {
            step: name.clone(),
            seconds,
            why,
        });
        self.note(Some(i), format!("failed ({}): {reason}", why.as_str()));
        if self.state.status == SagaStatus::Running {
            self.state.status = SagaStatus::Compensating;
            self.state.reason = Some(format!("{name}: {reason}"));
        }
        self.compensate(cause);
    }

    /// Undoes the latest finished step not yet undone, one at a time, newest first; cancels
    /// the saga once none is left.
    fn compensate(&mut self, cause: Uuid) {
        if self.state.steps.iter().any(|s| {
            matches!(
                s.status,
                StepStatus::Compensating | StepStatus::CompensationFailed
            )
        }) {
            return; // one compensation at a time, in reverse order
        }
        let next = (0..self.state.steps.len()).rev().find(|&i| {
            self.state.steps[i].status == StepStatus::Succeeded
                && self.saga.steps[i].compensation.is_some()
        });
        let Some(i) = next else {
            if matches!(
                self.state.status,
                SagaStatus::Compensating | SagaStatus::Stuck
            ) {
                self.cancel(cause);
            }
            return;
        };
        self.send_compensation(i, cause);
    }

    fn send_compensation(&mut self, i: usize, cause: Uuid) {
        let compensation = self.saga.steps[i]
            .compensation
            .clone()
            .expect("only steps with a compensation are compensated");
        let built = commands::build(
            &compensation.command,
            &self.state.order,
            self.state.steps[i].reply.as_ref(),
            &self.origin(cause),
        );
        match built {
            Ok(command) => {
                let step = &mut self.state.steps[i];
                step.status = StepStatus::Compensating;
                step.attempts += 1;
                step.compensation_id = Some(command.envelope().event_id);
                step.deadline = Some(self.now + compensation.timeout.as_millis() as i64);
                let what = format!(
                    "sent {} {}",
                    compensation.command,
                    command.envelope().event_id
                );
                let name = step.name.clone();
                self.emit.push(command);
                self.happen(Happening::CompensationSent { step: name });
                self.note(Some(i), what);
                if self.state.status == SagaStatus::Stuck {
                    self.state.status = SagaStatus::Compensating;
                }
            }
            Err(e) => self.stuck(i, format!("cannot build the compensation: {e}")),
        }
    }

    fn stuck(&mut self, i: usize, reason: String) {
        let step = &mut self.state.steps[i];
        step.status = StepStatus::CompensationFailed;
        step.deadline = None;
        step.error = Some(reason.clone());
        let name = step.name.clone();
        if !self.state.status.is_final() {
            self.state.status = SagaStatus::Stuck;
        }
        self.happen(Happening::Stuck { step: name });
        self.note(Some(i), format!("compensation failed: {reason}"));
    }

    fn cancel(&mut self, cause: Uuid) {
        self.state.status = SagaStatus::Cancelled;
        let seconds = self.seconds_since(Some(self.state.started_at));
        self.happen(Happening::Cancelled { seconds });
        let reason = self
            .state
            .reason
            .clone()
            .unwrap_or_else(|| "a step failed".into());
        self.note(None, format!("cancelled: {reason}"));
        let origin = self.origin(cause);
        self.emit.push(AnyEvent::OrderCancelled(OrderCancelled {
            envelope: Envelope {
                causation_id: Some(cause),
                ..Envelope::new::<OrderCancelled>(origin.source, origin.correlation_id, None)
            },
            data: OrderCancelledData {
                order_id: self.state.order_id,
                reason,
            },
        }));
    }

    fn reply(&mut self, event: &AnyEvent) -> Result<(), &'static str> {
        let envelope = event.envelope();
        let Some(cause) = envelope.causation_id else {
            return Err("unrelated");
        };
        let event_type = event.event_type();
        if let Some(i) = self
            .state
            .steps
            .iter()
            .position(|s| s.command_id == Some(cause))
        {
            let definition = &self.saga.steps[i];
            let succeeded = event_type == definition.succeeded;
            let failed = definition.failed.iter().any(|f| f == event_type);
            if !succeeded && !failed {
                return Err("unrelated");
            }
            match (self.state.steps[i].status, succeeded) {
                (StepStatus::Requested, true) => {
                    let seconds = self.seconds_since(self.state.steps[i].requested_at);
                    let step = &mut self.state.steps[i];
                    step.status = StepStatus::Succeeded;
                    step.deadline = None;
                    step.reply = Some(data_of(event));
                    let name = step.name.clone();
                    self.happen(Happening::StepSucceeded {
                        step: name,
                        seconds,
                    });
                    self.note(Some(i), format!("{event_type} {}", envelope.event_id));
                    if self.state.status == SagaStatus::Running {
                        self.advance(envelope.event_id);
                    } else {
                        // Compensating already: a step that finished meanwhile is undone too.
                        self.compensate(envelope.event_id);
                    }
                    Ok(())
                }
                (StepStatus::Requested, false) => {
                    let reason = data_of(event)["reason"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| event_type.to_string());
                    self.fail_step(i, FailedBy::Reply, reason, envelope.event_id);
                    Ok(())
                }
                (StepStatus::Failed, true) => {
                    // It timed out or was dead-lettered, but happened after all: undo it.
                    self.note(
                        Some(i),
                        format!("late {event_type} {}: undoing it", envelope.event_id),
                    );
                    let step = &mut self.state.steps[i];
                    step.reply = Some(data_of(event));
                    if definition.compensation.is_some() {
                        step.status = StepStatus::Succeeded;
                        self.compensate(envelope.event_id);
                    }
                    Ok(())
                }
                _ => Err("duplicate"),
            }
        } else if let Some(i) = self
            .state
            .steps
            .iter()
            .position(|s| s.compensation_id == Some(cause))
        {
            let Some(compensation) = &self.saga.steps[i].compensation else {
                return Err("unrelated");
            };
            if event_type != compensation.succeeded {
                return Err("unrelated");
            }
            if !matches!(
                self.state.steps[i].status,
                StepStatus::Compensating | StepStatus::CompensationFailed
            ) {
                return Err("duplicate");
            }
            let was_stuck = self.state.status == SagaStatus::Stuck;
            let step = &mut self.state.steps[i];
            step.status = StepStatus::Compensated;
            step.deadline = None;
            let name = step.name.clone();
            self.happen(Happening::Compensated { step: name });
            self.note(Some(i), format!("{event_type} {}", envelope.event_id));
            if was_stuck {
                self.happen(Happening::Resumed);
                self.state.status = SagaStatus::Compensating;
            }
            if self.state.status.is_final() {
                // A late success undone after the order was cancelled: nothing more to do.
                return Ok(());
            }
            self.compensate(envelope.event_id);
            Ok(())
        } else {
            Err("late")
        }
    }

    fn dead_lettered(&mut self, command: &AnyEvent, error: &str) -> Result<(), &'static str> {
        let id = command.envelope().event_id;
        if let Some(i) = self
            .state
            .steps
            .iter()
            .position(|s| s.command_id == Some(id))
        {
            if self.state.steps[i].status != StepStatus::Requested {
                return Err("late");
            }
            self.fail_step(
                i,
                FailedBy::DeadLettered,
                format!("retries exhausted: {error}"),
                id,
            );
            return Ok(());
        }
        if let Some(i) = self
            .state
            .steps
            .iter()
            .position(|s| s.compensation_id == Some(id))
        {
            if self.state.steps[i].status != StepStatus::Compensating {
                return Err("late");
            }
            self.stuck(i, format!("retries exhausted: {error}"));
            return Ok(());
        }
        Err("unrelated")
    }

    fn tick(&mut self) -> Result<(), &'static str> {
        let now = self.now;
        let Some(i) = self
            .state
            .steps
            .iter()
            .position(|s| s.deadline.is_some_and(|d| d <= now))
        else {
            return Err("unrelated");
        };
        let cause = self.state.steps[i]
            .compensation_id
            .or(self.state.steps[i].command_id)
            .unwrap_or(self.state.order_id);
        match self.state.steps[i].status {
            StepStatus::Requested => {
                let timeout = self.saga.steps[i].timeout;
                self.fail_step(
                    i,
                    FailedBy::TimedOut,
                    format!("no reply within {}", humantime::format_duration(timeout)),
                    cause,
                );
            }
            StepStatus::Compensating => {
                let timeout = self.saga.steps[i]
                    .compensation
                    .as_ref()
                    .map(|c| c.timeout)
                    .unwrap_or_default();
                self.state.steps[i].deadline = None;
                let reason = format!(
                    "compensation not answered within {}",
                    humantime::format_duration(timeout)
                );
                self.stuck(i, reason);
                // Still awaiting the reply: a late one resumes the saga.
                self.state.steps[i].status = StepStatus::Compensating;
            }
            _ => self.state.steps[i].deadline = None,
        }
        Ok(())
    }
}

fn data_of(event: &AnyEvent) -> Value {
    event.to_json()["data"].clone()
}

/// When the earliest awaited reply of `state` is overdue, if one is awaited.
pub fn next_deadline(state: &SagaState) -> Option<i64> {
    state.steps.iter().filter_map(|s| s.deadline).min()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::pipeline;

    fn order_saga() -> Saga {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let pipelines = pipeline::load_dir(&dir, &crate::steps::HANDLER_NAMES).unwrap();
        let mut sagas = super::super::load_dir(&dir.join("sagas"), &pipelines).unwrap();
        sagas.remove(0)
    }

    /// A reply of `event_type` to `command`, with `data`.
    fn reply(command: &AnyEvent, event_type: &str, data: Value) -> AnyEvent {
        AnyEvent::from_data(event_type, data, "test", command.envelope()).unwrap()
    }

    struct Harness {
        saga: Saga,
        state: Option<SagaState>,
        now: i64,
        emitted: Vec<AnyEvent>,
        happenings: Vec<Happening>,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                saga: order_saga(),
                state: None,
                now: 1_000_000,
                emitted: Vec::new(),
                happenings: Vec::new(),
            }
        }

        fn apply(&mut self, input: Input<'_>) -> Result<Vec<AnyEvent>, &'static str> {
            match apply(&self.saga, self.state.as_ref(), input, self.now, "test") {
                Outcome::Changed(t) => {
                    let version = self.state.as_ref().map_or(0, |s| s.version);
                    assert_eq!(t.state.version, version + 1);
                    self.state = Some(t.state);
                    self.emitted.extend(t.emit.clone());
                    self.happenings.extend(t.happenings);
                    Ok(t.emit)
                }
                Outcome::Ignored(why) => Err(why),
            }
        }

        fn state(&self) -> &SagaState {
            self.state.as_ref().unwrap()
        }

        fn types(events: &[AnyEvent]) -> Vec<&'static str> {
            events.iter().map(AnyEvent::event_type).collect()
        }

        fn start(&mut self) -> AnyEvent {
            let order = OrderCreated::sample("test");
            let out = self.apply(Input::Started(&order)).unwrap();
            assert_eq!(Harness::types(&out), ["inventory.reservation-requested"]);
            out[0].clone()
        }

        fn reserved(&mut self, command: &AnyEvent) -> AnyEvent {
            let AnyEvent::InventoryReservationRequested(c) = command else {
                panic!("{command:?}")
            };
            let data = serde_json::json!({
                "order_id": c.data.order_id.to_string(),
                "reservation_id": Uuid::now_v7().to_string(),
                "lines": c.data.lines,
            });
            reply(command, "inventory.reserved", data)
        }

        fn charged(&mut self, command: &AnyEvent) -> AnyEvent {
            let AnyEvent::PaymentChargeRequested(c) = command else {
                panic!("{command:?}")
            };
            let data = serde_json::json!({
                "order_id": c.data.order_id.to_string(),
                "payment_id": Uuid::now_v7().to_string(),
                "amount": c.data.amount,
            });
            reply(command, "payment.charged", data)
        }
    }

    fn order_id(e: &AnyEvent) -> String {
        e.key()
    }

    #[test]
    fn every_step_succeeding_confirms_the_order() {
        let mut h = Harness::new();
        let reserve = h.start();
        let reserved = h.reserved(&reserve);
        let charge = h.apply(Input::Reply(&reserved)).unwrap();
        assert_eq!(Harness::types(&charge), ["payment.charge-requested"]);
        // The same reply again changes nothing.
        assert_eq!(h.apply(Input::Reply(&reserved)).unwrap_err(), "duplicate");
        let charged = h.charged(&charge[0]);
        let ship = h.apply(Input::Reply(&charged)).unwrap();
        assert_eq!(Harness::types(&ship), ["shipment.scheduling-requested"]);
        let scheduled = reply(
            &ship[0],
            "shipment.scheduled",
            serde_json::json!({"order_id": order_id(&ship[0]), "shipment_id": Uuid::now_v7().to_string(), "carrier": "dhl"}),
        );
        let end = h.apply(Input::Reply(&scheduled)).unwrap();
        assert_eq!(Harness::types(&end), ["order.confirmed"]);
        assert_eq!(h.state().status, SagaStatus::Confirmed);
        assert_eq!(h.state().version, 4);
        assert_eq!(end[0].envelope().correlation_id, h.state().correlation_id);
        assert_eq!(
            end[0].envelope().causation_id,
            Some(scheduled.envelope().event_id)
        );
        assert_eq!(h.apply(Input::Reply(&scheduled)).unwrap_err(), "duplicate");
        assert_eq!(h.apply(Input::Tick).unwrap_err(), "unrelated");
    }

    #[test]
    fn a_declined_payment_releases_the_stock_and_cancels() {
        let mut h = Harness::new();
        let reserve = h.start();
        let reserved = h.reserved(&reserve);
        let charge = h.apply(Input::Reply(&reserved)).unwrap();
        let AnyEvent::PaymentChargeRequested(c) = &charge[0] else {
            panic!()
        };
        let declined = reply(
            &charge[0],
            "payment.failed",
            serde_json::json!({"order_id": c.data.order_id.to_string(), "amount": c.data.amount, "reason": "card declined"}),
        );
        let release = h.apply(Input::Reply(&declined)).unwrap();
        assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
        let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
            panic!()
        };
        assert_eq!(
            serde_json::json!(r.data.reservation_id.to_string()),
            h.state().steps[0].reply.as_ref().unwrap()["reservation_id"]
        );
        assert_eq!(h.state().status, SagaStatus::Compensating);
        let released = reply(
            &release[0],
            "inventory.released",
            serde_json::to_value(&r.data).unwrap(),
        );
        let end = h.apply(Input::Reply(&released)).unwrap();
        assert_eq!(Harness::types(&end), ["order.cancelled"]);
        let AnyEvent::OrderCancelled(cancelled) = &end[0] else {
            panic!()
        };
        assert_eq!(cancelled.data.reason, "charge-payment: card declined");
        assert_eq!(h.state().status, SagaStatus::Cancelled);
        assert_eq!(h.state().steps[1].status, StepStatus::Failed);
        assert_eq!(h.state().steps[0].status, StepStatus::Compensated);
    }

    #[test]
    fn a_failed_shipment_refunds_then_releases() {
        let mut h = Harness::new();
        let reserve = h.start();
        let reserved = h.reserved(&reserve);
        let charge = h.apply(Input::Reply(&reserved)).unwrap();
        let charged = h.charged(&charge[0]);
        let ship = h.apply(Input::Reply(&charged)).unwrap();
        let failed = reply(
            &ship[0],
            "shipment.scheduling-failed",
            serde_json::json!({"order_id": order_id(&ship[0]), "reason": "no carrier"}),
        );
        // Newest first: the refund, and only once it is done, the release.
        let refund = h.apply(Input::Reply(&failed)).unwrap();
        assert_eq!(Harness::types(&refund), ["payment.refund-requested"]);
        let AnyEvent::PaymentRefundRequested(r) = &refund[0] else {
            panic!()
        };
        let refunded = reply(
            &refund[0],
            "payment.refunded",
            serde_json::to_value(&r.data).unwrap(),
        );
        let release = h.apply(Input::Reply(&refunded)).unwrap();
        assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
        assert_eq!(h.apply(Input::Reply(&refunded)).unwrap_err(), "duplicate");
        let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
            panic!()
        };
        let released = reply(
            &release[0],
            "inventory.released",
            serde_json::to_value(&r.data).unwrap(),
        );
        let end = h.apply(Input::Reply(&released)).unwrap();
        assert_eq!(Harness::types(&end), ["order.cancelled"]);
        let compensated: Vec<&Happening> = h
            .happenings
            .iter()
            .filter(|h| matches!(h, Happening::Compensated { .. }))
            .collect();
        assert_eq!(
            compensated,
            [
                &Happening::Compensated {
                    step: "charge-payment".into()
                },
                &Happening::Compensated {
                    step: "reserve-inventory".into()
                },
            ]
        );
    }

    #[test]
    fn a_step_without_reply_times_out_and_a_late_success_is_undone() {
        let mut h = Harness::new();
        let reserve = h.start();
        let reserved = h.reserved(&reserve);
        let charge = h.apply(Input::Reply(&reserved)).unwrap();
        h.now += 59_000;
        assert_eq!(h.apply(Input::Tick).unwrap_err(), "unrelated");
        h.now += 1_000;
        let release = h.apply(Input::Tick).unwrap();
        assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
        assert!(h.happenings.iter().any(|x| matches!(
            x,
            Happening::StepFailed {
                why: FailedBy::TimedOut,
                ..
            }
        )));
        let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
            panic!()
        };
        let released = reply(
            &release[0],
            "inventory.released",
            serde_json::to_value(&r.data).unwrap(),
        );
        let end = h.apply(Input::Reply(&released)).unwrap();
        assert_eq!(Harness::types(&end), ["order.cancelled"]);
        // The payment service answers after all: the charge is refunded, the order stays
        // cancelled.
        let charged = h.charged(&charge[0]);
        let refund = h.apply(Input::Reply(&charged)).unwrap();
        assert_eq!(Harness::types(&refund), ["payment.refund-requested"]);
        assert_eq!(h.state().status, SagaStatus::Cancelled);
        let AnyEvent::PaymentRefundRequested(r) = &refund[0] else {
            panic!()
        };
        let refunded = reply(
            &refund[0],
            "payment.refunded",
            serde_json::to_value(&r.data).unwrap(),
        );
        assert!(h.apply(Input::Reply(&refunded)).unwrap().is_empty());
        assert_eq!(h.state().steps[1].status, StepStatus::Compensated);
        assert_eq!(h.state().status, SagaStatus::Cancelled);
    }

    #[test]
    fn a_dead_lettered_compensation_makes_the_saga_stuck_until_its_reply_comes() {
        let mut h = Harness::new();
        let reserve = h.start();
        let reserved = h.reserved(&reserve);
        let charge = h.apply(Input::Reply(&reserved)).unwrap();
        // The charge command exhausted its retries.
        let release = h
            .apply(Input::DeadLettered {
                command: &charge[0],
                error: "http 500".into(),
            })
            .unwrap();
        assert_eq!(Harness::types(&release), ["inventory.release-requested"]);
        assert!(h
            .state()
            .reason
            .as_deref()
            .unwrap()
            .contains("retries exhausted: http 500"));
        // So did the release.
        let nothing = h
            .apply(Input::DeadLettered {
                command: &release[0],
                error: "http 500".into(),
            })
            .unwrap();
        assert!(nothing.is_empty());
        assert_eq!(h.state().status, SagaStatus::Stuck);
        // Its replay succeeded: the saga resumes and cancels.
        let AnyEvent::InventoryReleaseRequested(r) = &release[0] else {
            panic!()
        };
        let released = reply(
            &release[0],
            "inventory.released",
            serde_json::to_value(&r.data).unwrap(),
        );
        let end = h.apply(Input::Reply(&released)).unwrap();
        assert_eq!(Harness::types(&end), ["order.cancelled"]);
        assert!(h.happenings.contains(&Happening::Resumed));
    }

    #[test]
    fn unrelated_and_repeated_inputs_are_ignored() {
        let mut h = Harness::new();
        let order = OrderCreated::sample("test");
        h.apply(Input::Started(&order)).unwrap();
        assert_eq!(h.apply(Input::Started(&order)).unwrap_err(), "duplicate");
        // A reply to a command this saga never sent.
        let other = OrderCreated::sample("test");
        let stray = reply(
            &AnyEvent::OrderCreated(other),
            "payment.failed",
            serde_json::json!({"order_id": order.data.order_id.to_string(), "amount": order.data.total, "reason": "x"}),
        );
        assert_eq!(h.apply(Input::Reply(&stray)).unwrap_err(), "late");
        assert_eq!(h.state().version, 1);
        // No saga at all for a reply.
        let mut fresh = Harness::new();
        assert_eq!(fresh.apply(Input::Reply(&stray)).unwrap_err(), NO_SAGA);
    }
}
