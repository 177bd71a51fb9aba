//! What happens to events, emitted from one type ([`ProcessorEvent`]) so logs and counters
//! never disagree. Every counter moves here and nowhere else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::failure::ErrorClass;

/// One thing that happened in a processor.
#[derive(Debug)]
pub enum ProcessorEvent<'a> {
    /// A record was read from an input or retry topic.
    Consumed {
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
    /// The step succeeded and every output is acknowledged.
    Succeeded { topic: &'a str, outputs: usize },
    /// A failure was retried in process (transient class).
    TransientRetry {
        attempt: u32,
        kind: &'a str,
        message: &'a str,
    },
    /// A record was sent to retry tier `tier` (1-based).
    Retried {
        tier: usize,
        class: ErrorClass,
        kind: &'a str,
        message: &'a str,
    },
    /// A record was sent to the dead-letter topic.
    DeadLettered {
        topic: &'a str,
        class: ErrorClass,
        kind: &'a str,
        message: &'a str,
    },
    /// A retry record is not due yet: its partition waits, nothing else does.
    Deferred {
        topic: &'a str,
        partition: i32,
        wait_ms: u64,
    },
    /// A retried record was handled this late after its due time.
    RetryLateness { tier: usize, late_ms: i64 },
    /// The event id was already handled by this group: skipped, no second effect.
    Duplicate { topic: &'a str, event_id: &'a str },
    /// Recording a handled event in the dedup store failed (its outputs are written).
    DedupMarkFailed { event_id: &'a str, error: &'a str },
    /// Producing failed; the input's offset does not advance until it succeeds.
    ProduceFailed {
        topic: &'a str,
        error: &'a str,
        attempt: u32,
    },
}

/// Running totals of one processor, read by the CLI's summary and by tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub consumed: AtomicU64,
    pub succeeded: AtomicU64,
    pub produced: AtomicU64,
    pub transient_retries: AtomicU64,
    /// Index 0 is tier 1.
    pub retried: [AtomicU64; 8],
    pub dead_lettered: AtomicU64,
    pub deferred: AtomicU64,
    pub produce_failures: AtomicU64,
    pub duplicates: AtomicU64,
    pub dedup_mark_failures: AtomicU64,
    /// How late retried records were handled after their due time, per tier (index 0 is tier
    /// 1), in ms; the newest `MAX_LATENESS_SAMPLES` of each.
    pub retry_lateness_ms: Mutex<Vec<Vec<i64>>>,
}

const MAX_LATENESS_SAMPLES: usize = 100_000;

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub consumed: u64,
    pub succeeded: u64,
    pub produced: u64,
    pub transient_retries: u64,
    pub retried: Vec<u64>,
    pub dead_lettered: u64,
    pub produce_failures: u64,
    pub duplicates: u64,
}

/// Emits a processor's events: a log line and its counters.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pipeline: Arc<str>,
    counters: Arc<Counters>,
}

impl Telemetry {
    pub fn new(pipeline: &str) -> Telemetry {
        Telemetry {
            pipeline: pipeline.into(),
            counters: Arc::default(),
        }
    }

    pub fn emit(&self, event: ProcessorEvent<'_>) {
        let c = &self.counters;
        let p = &*self.pipeline;
        match event {
            ProcessorEvent::Consumed {
                topic,
                partition,
                offset,
            } => {
                c.consumed.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(pipeline = p, topic, partition, offset, "consumed");
            }
            ProcessorEvent::Succeeded { topic, outputs } => {
                c.succeeded.fetch_add(1, Ordering::Relaxed);
                c.produced.fetch_add(outputs as u64, Ordering::Relaxed);
                tracing::debug!(pipeline = p, topic, outputs, "succeeded");
            }
            ProcessorEvent::TransientRetry {
                attempt,
                kind,
                message,
            } => {
                c.transient_retries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    pipeline = p,
                    attempt,
                    kind,
                    message,
                    "transient failure, retrying at once"
                );
            }
            ProcessorEvent::Retried {
                tier,
                class,
                kind,
                message,
            } => {
                if let Some(counter) = c.retried.get(tier.saturating_sub(1)) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    pipeline = p,
                    tier,
                    class = class.as_str(),
                    kind,
                    message,
                    "sent to retry tier"
                );
            }
            ProcessorEvent::DeadLettered {
                topic,
                class,
                kind,
                message,
            } => {
                c.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    pipeline = p,
                    dlq = topic,
                    class = class.as_str(),
                    kind,
                    message,
                    "sent to the dead-letter topic"
                );
            }
            ProcessorEvent::Deferred {
                topic,
                partition,
                wait_ms,
            } => {
                c.deferred.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    pipeline = p,
                    topic,
                    partition,
                    wait_ms,
                    "retry not due; partition paused"
                );
            }
            ProcessorEvent::RetryLateness { tier, late_ms } => {
                if let Some(index) = tier.checked_sub(1) {
                    let mut samples = c.retry_lateness_ms.lock().expect("lateness lock");
                    if samples.len() <= index {
                        samples.resize_with(index + 1, Vec::new);
                    }
                    let tier_samples = &mut samples[index];
                    if tier_samples.len() == MAX_LATENESS_SAMPLES {
                        tier_samples.remove(0);
                    }
                    tier_samples.push(late_ms);
                }
                tracing::debug!(
                    pipeline = p,
                    tier,
                    late_ms,
                    "retry handled after its due time"
                );
            }
            ProcessorEvent::Duplicate { topic, event_id } => {
                c.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(pipeline = p, topic, event_id, "duplicate event id: skipped");
            }
            ProcessorEvent::DedupMarkFailed { event_id, error } => {
                c.dedup_mark_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    pipeline = p,
                    event_id,
                    error,
                    "could not record a handled event; a redelivery would repeat it"
                );
            }
            ProcessorEvent::ProduceFailed {
                topic,
                error,
                attempt,
            } => {
                c.produce_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    pipeline = p, topic, error, attempt,
                    "PRODUCE FAILED: the input offset will not advance until this record is written"
                );
            }
        }
    }

    /// Lateness samples (ms after the due time) of retry tier `tier` (1-based).
    pub fn retry_lateness_ms(&self, tier: usize) -> Vec<i64> {
        let samples = self
            .counters
            .retry_lateness_ms
            .lock()
            .expect("lateness lock");
        samples
            .get(tier.wrapping_sub(1))
            .cloned()
            .unwrap_or_default()
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            consumed: load(&c.consumed),
            succeeded: load(&c.succeeded),
            produced: load(&c.produced),
            transient_retries: load(&c.transient_retries),
            retried: c.retried.iter().map(load).collect(),
            dead_lettered: load(&c.dead_lettered),
            produce_failures: load(&c.produce_failures),
            duplicates: load(&c.duplicates),
        }
    }
}
