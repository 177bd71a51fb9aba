//! The work on one record, run once its lane lets it start (as its own task, or without one
//! when only the dedup store and the producer make it wait, see [`Worker::try_inline`]): wait
//! until due,
//! decode, claim its event id, skip it if already handled, run the step (transient failures
//! retried here, in its lane), encode the outputs; then, at least once, write them and wait for
//! every ack and store the dedup mark.
//!
//! Invariant: the step runs only under one of the pipeline's `concurrency` permits, at most
//! [`unrecorded_window`] records are between the start of their work and their dedup mark, and a
//! step never runs for an event id that another record in flight holds or has already handled.
//! At least once, the task ends only when its records are acknowledged and its mark stored, so
//! the engine may move the partition's offset past it; exactly once it hands its records back
//! unwritten, for the batch's transaction. It never touches the consumer or an offset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rdkafka::message::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::claims::{Claim, Claimed, Claims};
use super::dedup::{DedupError, DedupStore};
use super::gate::Admission;
use super::input::Input;
use super::route::{Ending, FailureRouting};
use super::writer::{self, Acks, OutRecord, Refused};
use crate::contracts::events::now_millis;
use crate::contracts::{AnyEvent, EventCodec, Naming};
use crate::failure::{self, ErrorClass, Failure, Route};
use crate::kafka::headers::FailureContext;
use crate::pipeline::Pipeline;
use crate::steps::StepRunner;
use crate::telemetry::{ProcessorEvent, Telemetry};

/// Records between the start of their work and their dedup mark, per processor: enough to keep
/// every step permit busy while earlier records wait for their acks and marks, few enough that a
/// crash repeats a bounded number of calls. A step without effects (a route: copies to topics)
/// has no call to repeat, so only the process's in-flight budget bounds it: holding it to the
/// effectful window would cap throughput at that window over the ack latency.
pub fn unrecorded_window(
    concurrency: usize,
    step_has_effects: bool,
    in_flight_budget: usize,
) -> usize {
    if step_has_effects {
        (concurrency * 4).max(256)
    } else {
        in_flight_budget
    }
}

/// Longest pause between two attempts to write refused records or to store a dedup mark.
const MAX_REPEAT_PAUSE: Duration = Duration::from_secs(5);

/// What every record's task shares.
pub struct Worker {
    pub pipeline: Pipeline,
    pub naming: Naming,
    pub group_id: String,
    pub codec: Arc<EventCodec>,
    pub step: StepRunner,
    pub producer: writer::Producer,
    /// Where tasks are started from the producer's polling thread (to write refused records
    /// again).
    pub runtime: tokio::runtime::Handle,
    pub telemetry: Telemetry,
    pub dedup: Option<Arc<DedupStore>>,
    pub claims: Claims,
    /// One per step allowed to run at once (the pipeline's `concurrency`).
    pub permits: Arc<Semaphore>,
    /// One per record between the start of its work and its dedup mark (at least once) or its
    /// staging (exactly once): what a crash can make run again is at most this many records.
    pub unrecorded: Arc<Semaphore>,
    /// Partition count of every topic the pipeline reads or writes.
    pub partitions: HashMap<String, i32>,
    /// Exactly once: records are handed back for the batch's transaction, not written here.
    pub transactional: bool,
    /// Stopping: a record whose step has not started yet is abandoned (read again later).
    pub stopping: AtomicBool,
    /// The step only routes: records may run without a task of their own
    /// ([`Worker::try_inline`]).
    pub runs_inline: bool,
}

/// One record, admitted by the gate (anything but a pause).
pub struct Job {
    pub message: Input,
    pub event_type: Arc<str>,
    pub input_topic: Arc<str>,
    pub admission: Admission,
}

/// What became of a record offered to [`Worker::try_inline`].
// Matched as soon as it is returned: boxing the job would cost every declined record an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Inline<F> {
    /// Under way on no task of its own: its `on_end` is called when it ends.
    Started,
    /// Something in it would wait: nothing of it is done, it runs as a task.
    Declined(Job, F),
}

/// How a record's task ended.
pub enum Finished {
    /// At least once: its records are acknowledged and its mark stored.
    Written,
    /// Exactly once: its records, to be written in the batch's transaction.
    Staged(Staged),
    /// The process is stopping and its step had not started: left unfinished, its offset is
    /// never passed, so it is read again.
    Abandoned,
}

/// A record's outputs waiting for the batch's transaction.
pub struct Staged {
    pub topic: Arc<str>,
    pub records: Vec<OutRecord>,
    pub ending: Ending,
    /// Held until the transaction commits and the mark is stored.
    pub claim: Option<Claim>,
}

/// A record decoded, its event id claimed: what its dedup check and step need.
struct Ready {
    event: AnyEvent,
    claim: Claim,
    context: Option<FailureContext>,
    /// Tier and milliseconds after its due time, told once the step has run.
    lateness: Option<(usize, i64)>,
    started: Instant,
}

/// What [`Worker::prepare`] came to.
// Matched as soon as it is returned, like [`Inline`].
#[allow(clippy::large_enum_variant)]
enum Prepared {
    /// Ended before its step: rejected by the gate, undecodable, or a repeat of an event that
    /// succeeded in a record still in flight.
    Ended(Processed),
    Ready(Ready),
}

/// What processing gave, before writing.
struct Processed {
    records: Vec<OutRecord>,
    ending: Ending,
    claim: Option<Claim>,
}

impl Worker {
    /// Runs one record to its end (see the module's comment).
    pub async fn run(self: Arc<Self>, mut job: Job) -> Finished {
        let unrecorded = self
            .unrecorded
            .clone()
            .acquire_owned()
            .await
            .expect("permits stay open");
        let Some(processed) = self.process(&mut job).await else {
            return Finished::Abandoned;
        };
        self.finish(job.message.shared_topic(), processed, unrecorded)
            .await
    }

    /// Runs a record's work without a task of its own when nothing in it waits but the dedup
    /// store: the step only routes (no call), the writer schema is cached, no other record holds
    /// its event id and a permit is free. Decode and claim run on the caller's task; with a
    /// dedup store the rest continues from the store's answer ([`DedupStore::seen_then`]), as
    /// it does from the producer's acks and the mark. `on_end` is called when the record ends
    /// (its writes acknowledged, refused ones written again by a task first, and its mark
    /// stored). Otherwise the job comes back with `on_end`, nothing of it done (claims and
    /// permits taken are given back), to run as a task.
    ///
    /// [`DedupStore::seen_then`]: super::dedup::DedupStore::seen_then
    pub fn try_inline<F>(self: &Arc<Self>, mut job: Job, on_end: F) -> Inline<F>
    where
        F: FnOnce(Finished) + Send + 'static,
    {
        if !self.runs_inline || matches!(job.admission, Admission::Hold { .. }) {
            return Inline::Declined(job, on_end);
        }
        let Ok(unrecorded) = self.unrecorded.clone().try_acquire_owned() else {
            return Inline::Declined(job, on_end);
        };
        let Some(prepared) = self.prepare(&job).now_or_never() else {
            return Inline::Declined(job, on_end);
        };
        let ready = match prepared {
            Prepared::Ended(processed) => {
                self.conclude(&job, Some(processed), unrecorded, on_end);
                return Inline::Started;
            }
            Prepared::Ready(ready) => ready,
        };
        let Some(dedup) = self.dedup.clone() else {
            let Some(processed) = self.complete(&mut job, ready, Ok(false)).now_or_never() else {
                return Inline::Declined(job, on_end);
            };
            self.conclude(&job, processed, unrecorded, on_end);
            return Inline::Started;
        };
        let (worker, event_id) = (self.clone(), ready.event.envelope().event_id);
        let (window, runtime) = (self.dedup_window(&dedup), self.runtime.clone());
        let after_seen = move |seen| {
            let mut completing = Box::pin(async move {
                let processed = worker.complete(&mut job, ready, seen).await;
                worker.conclude(&job, processed, unrecorded, on_end);
            });
            // A route never waits, but its permit may: then the rest runs as a task.
            if completing.as_mut().now_or_never().is_none() {
                runtime.spawn(completing);
            }
        };
        dedup.seen_then(&self.group_id, event_id, window, Box::new(after_seen));
        Inline::Started
    }

    /// A record run without a task of its own, processed: at least once its writes are offered,
    /// and the last ack (then the mark) ends it; exactly once it is staged.
    fn conclude<F>(
        self: &Arc<Self>,
        job: &Job,
        processed: Option<Processed>,
        unrecorded: OwnedSemaphorePermit,
        on_end: F,
    ) where
        F: FnOnce(Finished) + Send + 'static,
    {
        let Some(processed) = processed else {
            on_end(Finished::Abandoned);
            return;
        };
        let topic = job.message.shared_topic().clone();
        if self.transactional {
            on_end(self.stage(&topic, processed));
            return;
        }
        let Processed {
            records,
            ending,
            claim,
        } = processed;
        let mark = ending.handled_event().zip(self.dedup.clone());
        let told = move |worker: &Worker| {
            drop((claim, unrecorded));
            worker.tell(&topic, ending);
            on_end(Finished::Written);
        };
        // After the acks: the mark, then the end.
        let end = move |worker: &Arc<Worker>| match mark {
            Some((event_id, dedup)) => {
                let w = worker.clone();
                let after_mark = move |stored: Result<(), DedupError>| match stored {
                    Ok(()) => told(&w),
                    Err(e) => {
                        w.telemetry.emit(ProcessorEvent::DedupMarkFailed {
                            event_id: &event_id.to_string(),
                            error: &e.to_string(),
                        });
                        let runtime = w.runtime.clone();
                        runtime.spawn(async move {
                            tokio::time::sleep(repeat_pause(1)).await;
                            w.mark_until_stored(&[event_id]).await;
                            told(&w);
                        });
                    }
                };
                dedup.mark_then(&worker.group_id, vec![event_id], Box::new(after_mark));
            }
            None => told(worker),
        };
        if records.is_empty() {
            end(self);
            return;
        }
        let worker = self.clone();
        let acks = Acks::new(records.len(), move |refused| {
            if refused.is_empty() {
                return end(&worker);
            }
            let runtime = worker.runtime.clone();
            runtime.spawn(async move {
                worker.rewrite_until_acknowledged(refused).await;
                end(&worker);
            });
        });
        let waiting = writer::offer(&self.producer, records, &acks);
        if !waiting.is_empty() {
            // The producer's queue is full: a task offers the rest when there is room.
            let worker = self.clone();
            self.runtime.spawn(async move {
                writer::offer_all(&worker.producer, waiting, &acks).await;
            });
        }
    }

    /// After processing: at least once, write and wait for the acks, store the mark, tell;
    /// exactly once, hand the records back for the batch's transaction.
    async fn finish(
        &self,
        topic: &Arc<str>,
        processed: Processed,
        _unrecorded: OwnedSemaphorePermit,
    ) -> Finished {
        if self.transactional {
            return self.stage(topic, processed);
        }
        self.write_until_acknowledged(processed.records).await;
        if let Some(event_id) = processed.ending.handled_event() {
            self.mark_until_stored(&[event_id]).await;
        }
        drop(processed.claim);
        self.tell(topic, processed.ending);
        Finished::Written
    }

    fn stage(&self, topic: &Arc<str>, processed: Processed) -> Finished {
        Finished::Staged(Staged {
            topic: topic.clone(),
            records: processed.records,
            ending: processed.ending,
            claim: processed.claim,
        })
    }

    async fn process(&self, job: &mut Job) -> Option<Processed> {
        let ready = match self.prepare(job).await {
            Prepared::Ended(processed) => return Some(processed),
            Prepared::Ready(ready) => ready,
        };
        let seen = match &self.dedup {
            Some(dedup) => {
                let event_id = ready.event.envelope().event_id;
                (dedup.seen_within(&self.group_id, event_id, self.dedup_window(dedup))).await
            }
            None => Ok(false),
        };
        self.complete(job, ready, seen).await
    }

    /// Marks older than this do not make a repeat: the pipeline's window, else the store's.
    fn dedup_window(&self, dedup: &DedupStore) -> Duration {
        (self.pipeline.dedup_retention).unwrap_or(dedup.retention().window)
    }

    /// Up to the dedup check: the gate's word (waiting until due), decode, claim the event id.
    async fn prepare(&self, job: &Job) -> Prepared {
        let Job {
            message,
            event_type,
            input_topic,
            admission,
        } = job;
        // Lateness is told once the step has run, so a record whose inline attempt gave up
        // (and runs again as a task) is told once.
        let (context, lateness) = match admission {
            Admission::Run { context, late_ms } => {
                let lateness = context
                    .as_ref()
                    .zip(*late_ms)
                    .map(|(c, late)| (c.tier, late));
                (context.clone(), lateness)
            }
            Admission::Hold { context, wait } => {
                tokio::time::sleep(*wait).await;
                let lateness = context
                    .due_ms
                    .map(|due| (context.tier, now_millis().saturating_sub(due)));
                (Some(context.clone()), lateness)
            }
            Admission::Reject { reason } => {
                let failure = Failure::BadRetryHeaders(reason.clone());
                return Prepared::Ended(self.failed(
                    message,
                    input_topic,
                    None,
                    ErrorClass::Permanent,
                    &failure,
                    Route::DeadLetter,
                ));
            }
            Admission::Pause { .. } => unreachable!("the engine pauses, it does not dispatch"),
        };
        let started = Instant::now();
        let tier = context.as_ref().map_or(0, |c| c.tier);
        let event = match AnyEvent::decode(&self.codec, event_type, message.payload()).await {
            Ok(event) => event,
            Err(e) => {
                self.handled(lateness, started);
                let failure = Failure::Decode(e);
                let (class, route) = self.final_route(tier, &failure);
                return Prepared::Ended(self.failed(
                    message,
                    input_topic,
                    context,
                    class,
                    &failure,
                    route,
                ));
            }
        };
        let event_id = event.envelope().event_id;
        let claim = match self.claims.claim(event_id).await {
            Claimed::Mine(claim) => claim,
            Claimed::Duplicate => {
                self.handled(lateness, started);
                return Prepared::Ended(duplicate(event_id));
            }
        };
        Prepared::Ready(Ready {
            event,
            claim,
            context,
            lateness,
            started,
        })
    }

    /// From the dedup check's answer: the step (transient failures retried in this lane) and
    /// its outputs. None when stopping before the step started.
    async fn complete(
        &self,
        job: &mut Job,
        ready: Ready,
        seen: Result<bool, DedupError>,
    ) -> Option<Processed> {
        let Ready {
            event,
            claim,
            context,
            lateness,
            started,
        } = ready;
        let result = self
            .handle(&mut job.message, event, claim, context.as_ref(), seen)
            .await;
        self.handled(lateness, started);
        match result {
            Ok(processed) => Some(processed),
            Err(Unhandled::Abandoned) => None,
            Err(Unhandled::Failed(class, failure, route)) => Some(self.failed(
                &job.message,
                &job.input_topic,
                context,
                class,
                &failure,
                route,
            )),
        }
    }

    /// Telemetry once a record's step has run (or it ended before): its lateness after a
    /// retry's due time and how long it took.
    fn handled(&self, lateness: Option<(usize, i64)>, started: Instant) {
        if let Some((tier, late_ms)) = lateness {
            self.telemetry
                .emit(ProcessorEvent::RetryLateness { tier, late_ms });
        }
        self.telemetry.emit(ProcessorEvent::Handled {
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    fn failed(
        &self,
        message: &Input,
        input_topic: &str,
        context: Option<FailureContext>,
        class: ErrorClass,
        failure: &Failure,
        route: Route,
    ) -> Processed {
        let routing = FailureRouting {
            pipeline: &self.pipeline,
            group_id: &self.group_id,
            partitions: &self.partitions,
            now_ms: now_millis(),
        };
        let (record, ending) = routing.record(message, input_topic, context, class, failure, route);
        Processed {
            records: vec![record],
            ending,
            claim: None,
        }
    }

    /// How a failure that is not retried here is reported, and where it goes: the next tier
    /// or the dead-letter topic.
    fn final_route(&self, tier: usize, failure: &Failure) -> (ErrorClass, Route) {
        let tiers = self.pipeline.retry.tiers.len();
        let class = self.pipeline.classifier.classify(failure);
        let route = failure::route(class, u32::MAX, 0, tier, tiers);
        (failure::promoted(class), route)
    }

    fn final_failure(&self, tier: usize, failure: Failure) -> Unhandled {
        let (class, route) = self.final_route(tier, &failure);
        Unhandled::Failed(class, failure, route)
    }

    /// The dedup check's answer, the step (transient failures retried in this lane), encode.
    async fn handle(
        &self,
        message: &mut Input,
        event: AnyEvent,
        claim: Claim,
        context: Option<&FailureContext>,
        seen: Result<bool, DedupError>,
    ) -> Result<Processed, Unhandled> {
        let tier = context.map_or(0, |c| c.tier);
        let tiers = self.pipeline.retry.tiers.len();
        let event_id = event.envelope().event_id;
        match seen {
            Ok(true) => return Ok(duplicate(event_id)),
            Ok(false) => {}
            Err(e) => return Err(self.final_failure(tier, Failure::Dependency(e.to_string()))),
        }
        let mut attempts = 0;
        let outcome = loop {
            let result = {
                let _permit = self.permits.acquire().await.expect("permits stay open");
                if attempts == 0 && self.stopping.load(Ordering::Relaxed) {
                    return Err(Unhandled::Abandoned);
                }
                self.step.run(&event).await
            };
            match result {
                Ok(outcome) => break outcome,
                Err(failure) => {
                    let class = self.pipeline.classifier.classify(&failure);
                    attempts += 1;
                    let transient_attempts = self.pipeline.retry.transient_attempts;
                    match failure::route(class, attempts - 1, transient_attempts, tier, tiers) {
                        Route::RetryNow => {
                            self.telemetry.emit(ProcessorEvent::TransientRetry {
                                attempt: attempts,
                                kind: failure.kind(),
                                message: &failure.to_string(),
                            });
                            // Waits in this lane only, without a permit.
                            tokio::time::sleep(jittered_backoff(attempts)).await;
                        }
                        route => {
                            return Err(Unhandled::Failed(failure::promoted(class), failure, route))
                        }
                    }
                }
            }
        };
        let mut records = Vec::with_capacity(outcome.events.len() + outcome.copies.len());
        for event in &outcome.events {
            records.push(
                OutRecord::event(event, &self.codec, &self.naming)
                    .await
                    .map_err(|e| self.final_failure(tier, Failure::Encode(e)))?,
            );
        }
        // Last: it takes the input's headers, and nothing after it waits, so an inline attempt
        // that gives up (and runs again as a task) still has them.
        message.copy_to(&outcome.copies, &mut records);
        claim.succeeded();
        Ok(Processed {
            ending: Ending::Succeeded {
                outputs: records.iter().map(|r| r.topic.clone()).collect(),
                event_id,
                occurred_at_ms: event.envelope().occurred_at,
            },
            records,
            claim: Some(claim),
        })
    }

    /// Writes the records; refused ones are written again after a growing pause, until every
    /// one is acknowledged (the partition's offset waits, reading pauses when its window fills).
    async fn write_until_acknowledged(&self, records: Vec<OutRecord>) {
        let refused = writer::write_all(&self.producer, records).await;
        self.rewrite_until_acknowledged(refused).await;
    }

    /// Writes refused records again after a growing pause, until every one is acknowledged.
    async fn rewrite_until_acknowledged(&self, mut refused: Refused) {
        let mut round = 0u32;
        while !refused.is_empty() {
            round += 1;
            for (record, error) in &refused {
                self.telemetry.emit(ProcessorEvent::ProduceFailed {
                    topic: &record.topic,
                    error,
                    attempt: round,
                });
            }
            tokio::time::sleep(repeat_pause(round)).await;
            let records = refused.into_iter().map(|(r, _)| r).collect();
            refused = writer::write_all(&self.producer, records).await;
        }
    }

    /// Stores the dedup marks, trying again until the store takes them: the offset must not
    /// pass an event whose repeat the store would not recognise.
    pub async fn mark_until_stored(&self, event_ids: &[uuid::Uuid]) {
        let Some(dedup) = &self.dedup else { return };
        if event_ids.is_empty() {
            return;
        }
        let mut round = 0u32;
        loop {
            match dedup.mark_many(&self.group_id, event_ids).await {
                Ok(()) => return,
                Err(e) => {
                    round += 1;
                    for event_id in event_ids {
                        self.telemetry.emit(ProcessorEvent::DedupMarkFailed {
                            event_id: &event_id.to_string(),
                            error: &e.to_string(),
                        });
                    }
                    tokio::time::sleep(repeat_pause(round)).await;
                }
            }
        }
    }

    /// Telemetry for an input that is finished.
    pub fn tell(&self, topic: &str, ending: Ending) {
        match ending {
            Ending::Succeeded {
                outputs,
                event_id: _,
                occurred_at_ms,
            } => self.telemetry.emit(ProcessorEvent::Succeeded {
                topic,
                outputs: &outputs,
                occurred_at_ms,
            }),
            Ending::Duplicate { event_id } => self.telemetry.emit(ProcessorEvent::Duplicate {
                topic,
                event_id: &event_id.to_string(),
            }),
            Ending::Retried {
                tier,
                class,
                kind,
                message,
            } => self.telemetry.emit(ProcessorEvent::Retried {
                tier,
                class,
                kind,
                message: &message,
            }),
            Ending::DeadLettered {
                topic,
                class,
                kind,
                message,
            } => self.telemetry.emit(ProcessorEvent::DeadLettered {
                topic: &topic,
                class,
                kind,
                message: &message,
            }),
        }
    }
}

/// Why a record has no outputs of its own.
enum Unhandled {
    /// Failed: to the next tier or the dead-letter topic, with the class it is reported with.
    Failed(ErrorClass, Failure, Route),
    /// Stopping before its step started.
    Abandoned,
}

fn duplicate(event_id: uuid::Uuid) -> Processed {
    Processed {
        records: Vec::new(),
        ending: Ending::Duplicate { event_id },
        claim: None,
    }
}

/// 50 ms, 100 ms, 200 ms, ... with +-50 % jitter, so retries of many records do not align.
fn jittered_backoff(attempt: u32) -> Duration {
    let base = 50u64 << attempt.min(6);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base))
}

/// 200 ms, 400 ms, ... up to [`MAX_REPEAT_PAUSE`].
fn repeat_pause(round: u32) -> Duration {
    (Duration::from_millis(200) * round.min(50)).min(MAX_REPEAT_PAUSE)
}
