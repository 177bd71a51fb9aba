//! What happens in a saga orchestrator, emitted from one type ([`SagaEvent`]): log lines, the
//! orchestrator's counters (read by the CLI and tests) and the Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::metrics::{
    metrics, PipelineLabels, SagaHeldLabels, SagaIgnoredLabels, SagaLabels, SagaOutcomeLabels,
    SagaReloadedLabels, SagaStepLabels,
};

#[derive(Debug)]
pub enum SagaEvent<'a> {
    Started {
        order_id: &'a str,
    },
    StepEnded {
        order_id: &'a str,
        step: &'a str,
        /// succeeded, failed, dead_lettered or timed_out
        result: &'static str,
        seconds: f64,
    },
    CompensationSent {
        order_id: &'a str,
        step: &'a str,
    },
    Compensated {
        order_id: &'a str,
        step: &'a str,
    },
    Ended {
        order_id: &'a str,
        /// confirmed or cancelled
        outcome: &'static str,
        seconds: f64,
    },
    Stuck {
        order_id: &'a str,
        step: &'a str,
    },
    Ignored {
        topic: &'a str,
        reason: &'static str,
    },
    StaleState {
        order_id: &'a str,
        version: u64,
        known: u64,
    },
    /// In its group (partitions assigned) or not.
    Ready {
        ready: bool,
    },
    /// A reply or dead letter for an order with no saga state: its saga expired (or never
    /// started here). Ignored.
    LateReply {
        topic: &'a str,
    },
    /// Finished sagas tombstoned and evicted by a committed batch.
    Expired {
        count: u64,
    },
    /// One partition of the state topic read after an assignment: how long it took, the states
    /// held (live, finished) and the keys skipped (expired, deleted).
    Reloaded {
        partition: i32,
        seconds: f64,
        live: u64,
        finished: u64,
        expired: u64,
        deleted: u64,
    },
    /// Counted over the sagas this instance owns, after each batch and each reload.
    Gauges {
        in_flight: u64,
        stuck: u64,
        /// States held in memory: in flight or stuck, and finished within the window.
        held_live: u64,
        held_finished: u64,
    },
}

/// Running totals of one orchestrator, for the CLI's summary and tests.
#[derive(Debug, Default)]
pub struct SagaCounters {
    pub started: AtomicU64,
    pub confirmed: AtomicU64,
    pub cancelled: AtomicU64,
    pub compensations: AtomicU64,
    pub compensated: AtomicU64,
    pub stuck: AtomicU64,
    pub timed_out: AtomicU64,
    pub ignored: AtomicU64,
    pub stale: AtomicU64,
    pub in_flight: AtomicU64,
    /// Stuck right now (the gauge), unlike `stuck`, which counts every time one got stuck.
    pub stuck_now: AtomicU64,
    pub late_replies: AtomicU64,
    pub expired: AtomicU64,
    /// Partitions reloaded, and what those reloads held and skipped.
    pub reloads: AtomicU64,
    pub reloaded_live: AtomicU64,
    pub reloaded_finished: AtomicU64,
    pub reloaded_skipped: AtomicU64,
    /// States held now (the gauges).
    pub held_live: AtomicU64,
    pub held_finished: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct SagaTelemetry {
    saga: String,
    /// For `orderflow_ready`, shared with the processors: `saga-<name>` and the group.
    ready_labels: PipelineLabels,
    counters: Arc<SagaCounters>,
}

impl SagaTelemetry {
    /// Creates the saga's series at zero, so they read 0 rather than being absent.
    pub fn new(saga: &str, group: &str, steps: &[&str]) -> SagaTelemetry {
        let t = SagaTelemetry {
            saga: saga.to_string(),
            ready_labels: PipelineLabels {
                pipeline: format!("saga-{saga}"),
                group: group.to_string(),
            },
            counters: Arc::default(),
        };
        let _ = metrics().ready.get_or_create(&t.ready_labels);
        let m = metrics();
        let l = t.labels();
        let _ = m.sagas_started.get_or_create(&l);
        let _ = m.saga_compensations.get_or_create(&l);
        let _ = m.sagas_stuck.get_or_create(&l);
        let _ = m.sagas_in_flight.get_or_create(&l);
        let _ = m.saga_stale_states.get_or_create(&l);
        let _ = m.saga_late_replies.get_or_create(&l);
        let _ = m.saga_states_expired.get_or_create(&l);
        let _ = m.saga_state_reload_seconds.get_or_create(&l);
        for status in ["live", "finished"] {
            let _ = m.saga_states_held.get_or_create(&SagaHeldLabels {
                saga: t.saga.clone(),
                status,
            });
        }
        for result in ["live", "finished", "expired", "deleted"] {
            let _ = m.saga_states_reloaded.get_or_create(&SagaReloadedLabels {
                saga: t.saga.clone(),
                result,
            });
        }
        for outcome in ["confirmed", "cancelled"] {
            let _ = m.sagas_ended.get_or_create(&SagaOutcomeLabels {
                saga: t.saga.clone(),
                outcome,
            });
        }
        for reason in ["duplicate", "late", "unrelated", "undecodable"] {
            let _ = m.saga_inputs_ignored.get_or_create(&SagaIgnoredLabels {
                saga: t.saga.clone(),
                reason,
            });
        }
        for step in steps {
            for result in ["succeeded", "failed", "dead_lettered", "timed_out"] {
                let _ = m.saga_step_seconds.get_or_create(&SagaStepLabels {
                    saga: t.saga.clone(),
                    step: step.to_string(),
                    result,
                });
            }
        }
        t
    }

    fn labels(&self) -> SagaLabels {
        SagaLabels {
            saga: self.saga.clone(),
        }
    }

    /// True once the orchestrator has its partitions (and until it loses them).
    pub fn is_ready(&self) -> bool {
        metrics().ready.get_or_create(&self.ready_labels).get() == 1
    }

    pub fn counters(&self) -> &SagaCounters {
        &self.counters
    }

    /// One line of the counters, for the CLI.
    pub fn summary(&self) -> String {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "started {} confirmed {} cancelled {} compensations {} timed-out {} stuck {} in-flight {} ignored {}",
            n(&c.started),
            n(&c.confirmed),
            n(&c.cancelled),
            n(&c.compensations),
            n(&c.timed_out),
            n(&c.stuck),
            n(&c.in_flight),
            n(&c.ignored)
        )
    }

    pub fn emit(&self, event: SagaEvent<'_>) {
        let c = &self.counters;
        let m = metrics();
        let saga = self.saga.as_str();
        match event {
            SagaEvent::Started { order_id } => {
                c.started.fetch_add(1, Ordering::Relaxed);
                m.sagas_started.get_or_create(&self.labels()).inc();
                tracing::debug!(saga, order_id, "saga started");
            }
            SagaEvent::StepEnded {
                order_id,
                step,
                result,
                seconds,
            } => {
                if result == "timed_out" {
                    c.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                m.saga_step_seconds
                    .get_or_create(&SagaStepLabels {
                        saga: saga.to_string(),
                        step: step.to_string(),
                        result,
                    })
                    .observe(seconds);
                if result == "succeeded" {
                    tracing::debug!(saga, order_id, step, seconds, "step succeeded");
                } else {
                    tracing::info!(
                        saga,
                        order_id,
                        step,
                        result,
                        seconds,
                        "step failed for good"
                    );
                }
            }
            SagaEvent::CompensationSent { order_id, step } => {
                c.compensations.fetch_add(1, Ordering::Relaxed);
                m.saga_compensations.get_or_create(&self.labels()).inc();
                tracing::info!(saga, order_id, step, "compensating");
            }
            SagaEvent::Compensated { order_id, step } => {
                c.compensated.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(saga, order_id, step, "compensated");
            }
            SagaEvent::Ended {
                order_id,
                outcome,
                seconds,
            } => {
                let counter = if outcome == "confirmed" {
                    &c.confirmed
                } else {
                    &c.cancelled
                };
                counter.fetch_add(1, Ordering::Relaxed);
                m.sagas_ended
                    .get_or_create(&SagaOutcomeLabels {
                        saga: saga.to_string(),
                        outcome,
                    })
                    .inc();
                tracing::debug!(saga, order_id, outcome, seconds, "saga ended");
            }
            SagaEvent::Stuck { order_id, step } => {
                c.stuck.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    saga,
                    order_id,
                    step,
                    "saga stuck: compensation failed for good or went unanswered; see `orderflow saga show {order_id}`"
                );
            }
            SagaEvent::Ignored { topic, reason } => {
                c.ignored.fetch_add(1, Ordering::Relaxed);
                m.saga_inputs_ignored
                    .get_or_create(&SagaIgnoredLabels {
                        saga: saga.to_string(),
                        reason,
                    })
                    .inc();
                tracing::debug!(saga, topic, reason, "input ignored");
            }
            SagaEvent::StaleState {
                order_id,
                version,
                known,
            } => {
                c.stale.fetch_add(1, Ordering::Relaxed);
                m.saga_stale_states.get_or_create(&self.labels()).inc();
                tracing::warn!(saga, order_id, version, known, "stale saga state ignored");
            }
            SagaEvent::Ready { ready } => {
                let gauge = metrics().ready.get_or_create(&self.ready_labels);
                if (gauge.get() == 1) != ready {
                    tracing::info!(saga, ready, "saga orchestrator readiness changed");
                }
                gauge.set(i64::from(ready));
            }
            SagaEvent::LateReply { topic } => {
                c.late_replies.fetch_add(1, Ordering::Relaxed);
                m.saga_late_replies.get_or_create(&self.labels()).inc();
                tracing::debug!(saga, topic, "reply for an order with no saga state ignored");
            }
            SagaEvent::Expired { count } => {
                c.expired.fetch_add(count, Ordering::Relaxed);
                m.saga_states_expired
                    .get_or_create(&self.labels())
                    .inc_by(count);
                tracing::debug!(saga, count, "finished sagas expired");
            }
            SagaEvent::Reloaded {
                partition,
                seconds,
                live,
                finished,
                expired,
                deleted,
            } => {
                c.reloads.fetch_add(1, Ordering::Relaxed);
                c.reloaded_live.fetch_add(live, Ordering::Relaxed);
                c.reloaded_finished.fetch_add(finished, Ordering::Relaxed);
                c.reloaded_skipped
                    .fetch_add(expired + deleted, Ordering::Relaxed);
                m.saga_state_reload_seconds
                    .get_or_create(&self.labels())
                    .observe(seconds);
                for (result, n) in [
                    ("live", live),
                    ("finished", finished),
                    ("expired", expired),
                    ("deleted", deleted),
                ] {
                    m.saga_states_reloaded
                        .get_or_create(&SagaReloadedLabels {
                            saga: saga.to_string(),
                            result,
                        })
                        .inc_by(n);
                }
                tracing::info!(
                    saga,
                    partition,
                    seconds,
                    live,
                    finished,
                    expired,
                    deleted,
                    "saga states reloaded"
                );
            }
            SagaEvent::Gauges {
                in_flight,
                stuck,
                held_live,
                held_finished,
            } => {
                c.in_flight.store(in_flight, Ordering::Relaxed);
                c.stuck_now.store(stuck, Ordering::Relaxed);
                c.held_live.store(held_live, Ordering::Relaxed);
                c.held_finished.store(held_finished, Ordering::Relaxed);
                for (status, n) in [("live", held_live), ("finished", held_finished)] {
                    m.saga_states_held
                        .get_or_create(&SagaHeldLabels {
                            saga: saga.to_string(),
                            status,
                        })
                        .set(n as i64);
                }
                m.sagas_in_flight
                    .get_or_create(&self.labels())
                    .set(in_flight as i64);
                m.sagas_stuck
                    .get_or_create(&self.labels())
                    .set(stuck as i64);
            }
        }
    }
}
