//! One transition of a saga's state, for [`super::apply`]: how a start, a reply, a dead letter
//! or a tick moves the steps forward or into compensation, what it emits and what happened.
//! Invariant: pure (no I/O, no clock but `now`), and a transition either changes the state
//! (a new version) or is ignored with a reason, never half applied.

use serde_json::Value;
use uuid::Uuid;

use super::*;

/// One transition in progress.
pub(super) struct Run<'a> {
    saga: &'a Saga,
    state: SagaState,
    now: i64,
    source: &'a str,
    emit: Vec<AnyEvent>,
    happenings: Vec<Happening>,
}

impl<'a> Run<'a> {
    pub(super) fn start(
        saga: &'a Saga,
        order: &OrderCreated,
        now: i64,
        source: &'a str,
    ) -> Run<'a> {
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

    pub(super) fn resume(saga: &'a Saga, state: &SagaState, now: i64, source: &'a str) -> Run<'a> {
        Run {
            saga,
            state: state.clone(),
            now,
            source,
            emit: Vec::new(),
            happenings: Vec::new(),
        }
    }

    pub(super) fn finish(mut self) -> Transition {
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

    pub(super) fn happen(&mut self, h: Happening) {
        self.happenings.push(h);
    }

    pub(super) fn note(&mut self, step: Option<usize>, what: String) {
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
    pub(super) fn advance(&mut self, cause: Uuid) {
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

    pub(super) fn reply(&mut self, event: &AnyEvent) -> Result<(), &'static str> {
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

    pub(super) fn dead_lettered(
        &mut self,
        command: &AnyEvent,
        error: &str,
    ) -> Result<(), &'static str> {
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

    pub(super) fn tick(&mut self) -> Result<(), &'static str> {
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
