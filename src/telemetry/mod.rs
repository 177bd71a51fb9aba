//! What happens to events, emitted from one type ([`ProcessorEvent`]) so logs, the processor's
//! own counters (read by the demo and tests) and the Prometheus metrics never disagree. Every
//! counter, gauge and histogram moves here and nowhere else.
//!
//! - `metrics`: the Prometheus families and their text exposition.
//! - [`server`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`retention`]: what each retained table holds (dedup marks, intake keys, read model).
//! - [`dedup`]: how long the dedup store's `seen` takes to answer.

pub mod dedup;
pub mod metrics;
pub mod projection;
pub mod retention;
pub mod saga;
pub mod server;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::failure::ErrorClass;
use metrics::{
    metrics, CacheLabels, ClassLabels, OutcomeLabels, PartitionLabels, PipelineLabels, TierLabels,
    TopicLabels,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// One thing that happened in a processor.
#[derive(Debug)]
pub enum ProcessorEvent<'a> {
    /// A record was read from an input or retry topic.
    Consumed {
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
    /// Decoding and the step took this long for one input.
    Handled { seconds: f64 },
    /// The step succeeded and every output is acknowledged.
    Succeeded {
        topic: &'a str,
        outputs: &'a [std::sync::Arc<str>],
        occurred_at_ms: i64,
    },
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
    /// Producing failed; the input's offset does not advance until it succeeds.
    ProduceFailed {
        topic: &'a str,
        error: &'a str,
        attempt: u32,
    },
    /// The event id was already handled by this group: skipped, no second effect.
    Duplicate { topic: &'a str, event_id: &'a str },
    /// Recording a handled event in the dedup store failed (its outputs are written).
    DedupMarkFailed { event_id: &'a str, error: &'a str },
    /// librdkafka's view of the group's lag on one assigned partition.
    ConsumerLag {
        topic: &'a str,
        partition: i32,
        lag: i64,
    },
    /// A partition left this consumer: its lag is no longer this replica's to report.
    PartitionRevoked { topic: &'a str, partition: i32 },
    /// Dead-letter records not yet replayed or discarded, and the oldest one's age.
    DlqDepth {
        topic: &'a str,
        depth: i64,
        oldest_age_seconds: f64,
    },
    /// Records waiting in a retry tier.
    RetryBacklog { tier: usize, records: i64 },
    /// Readiness changed (in the group, broker and registry answering).
    Ready { ready: bool, reason: &'a str },
    /// Producer statistics from librdkafka.
    ProducerStats {
        queue_messages: i64,
        broker_rtt_seconds: f64,
    },
    /// Writer-schema lookups since the last report.
    RegistryCache { hits: u64, misses: u64 },
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
/// Most retry tiers a pipeline may declare (pipeline validation enforces it).
pub const MAX_TIERS: usize = 8;

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

/// Emits a processor's events: a log line, its counters and its Prometheus metrics.
#[derive(Debug, Clone)]
pub struct Telemetry {
    labels: PipelineLabels,
    counters: Arc<Counters>,
    hot: Arc<HotSeries>,
}

/// Handles on the series every record touches, so a record costs no label building or
/// label-set hashing (a handle shares its series' value). Per-topic handles are kept for the
/// pipeline's own topics only, a set fixed by its file.
#[derive(Debug)]
struct HotSeries {
    handler_seconds: Histogram,
    end_to_end_seconds: Histogram,
    succeeded: Counter,
    duplicate: Counter,
    consumed: RwLock<HashMap<String, Counter>>,
    produced: RwLock<HashMap<String, Counter>>,
}

impl Telemetry {
    /// Creates every fixed label set of the pipeline at zero, so a series reads 0 rather than
    /// being absent before its first event (alerts and dashboards can tell the two apart).
    pub fn new(pipeline: &str, group: &str, retry_tiers: usize) -> Telemetry {
        let labels = PipelineLabels {
            pipeline: pipeline.to_string(),
            group: group.to_string(),
        };
        let m = metrics();
        let outcome = |outcome| OutcomeLabels {
            pipeline: labels.pipeline.clone(),
            group: labels.group.clone(),
            outcome,
        };
        // One statement per handle: a family's lock guard lives to the end of its statement,
        // and a second lookup in the same family while it is held would deadlock.
        let handler_seconds = m.handler_seconds.get_or_create(&labels).clone();
        let end_to_end_seconds = m.end_to_end_seconds.get_or_create(&labels).clone();
        let succeeded = m.processed.get_or_create(&outcome("succeeded")).clone();
        let duplicate = m.processed.get_or_create(&outcome("duplicate")).clone();
        let hot = HotSeries {
            handler_seconds,
            end_to_end_seconds,
            succeeded,
            duplicate,
            consumed: RwLock::default(),
            produced: RwLock::default(),
        };
        let telemetry = Telemetry {
            labels,
            counters: Arc::default(),
            hot: Arc::new(hot),
        };
        let l = &telemetry.labels;
        for outcome in ["succeeded", "retried", "dead_lettered", "duplicate"] {
            let labels = OutcomeLabels {
                pipeline: l.pipeline.clone(),
                group: l.group.clone(),
                outcome,
            };
            let _ = m.processed.get_or_create(&labels);
        }
        for class in ErrorClass::ALL {
            let labels = ClassLabels {
                pipeline: l.pipeline.clone(),
                group: l.group.clone(),
                error_class: class.as_str(),
            };
            let _ = m.dead_lettered.get_or_create(&labels);
        }
        for tier in 1..=retry_tiers {
            let _ = m.retries.get_or_create(&telemetry.tier(tier));
            let _ = m
                .retry_lateness_seconds
                .get_or_create(&telemetry.tier(tier));
            let _ = m.retry_backlog.get_or_create(&telemetry.tier(tier));
        }
        let _ = m.transient_retries.get_or_create(l);
        let _ = m.produce_failures.get_or_create(l);
        let _ = m.handler_seconds.get_or_create(l);
        let _ = m.end_to_end_seconds.get_or_create(l);
        let _ = m.ready.get_or_create(l);
        for result in ["hit", "miss"] {
            let _ = m.registry_cache.get_or_create(&CacheLabels { result });
        }
        telemetry
    }

    fn topic(&self, topic: &str) -> TopicLabels {
        TopicLabels {
            pipeline: self.labels.pipeline.clone(),
            group: self.labels.group.clone(),
            topic: topic.to_string(),
        }
    }

    /// Increments `family`'s series for `topic` through the handle cache `cache`.
    fn count_topic(
        &self,
        cache: &RwLock<HashMap<String, Counter>>,
        family: &Family<TopicLabels, Counter>,
        topic: &str,
    ) {
        if let Some(counter) = cache.read().expect("series lock").get(topic) {
            counter.inc();
            return;
        }
        let counter = family.get_or_create(&self.topic(topic)).clone();
        counter.inc();
        cache
            .write()
            .expect("series lock")
            .insert(topic.to_string(), counter);
    }

    fn outcome(&self, outcome: &'static str) {
        let labels = OutcomeLabels {
            pipeline: self.labels.pipeline.clone(),
            group: self.labels.group.clone(),
            outcome,
        };
        metrics().processed.get_or_create(&labels).inc();
    }

    fn tier(&self, tier: usize) -> TierLabels {
        TierLabels {
            pipeline: self.labels.pipeline.clone(),
            group: self.labels.group.clone(),
            tier: tier.to_string(),
        }
    }

    pub fn emit(&self, event: ProcessorEvent<'_>) {
        let c = &self.counters;
        let m = metrics();
        let p = self.labels.pipeline.as_str();
        match event {
            ProcessorEvent::Consumed {
                topic,
                partition,
                offset,
            } => {
                c.consumed.fetch_add(1, Ordering::Relaxed);
                self.count_topic(&self.hot.consumed, &m.consumed, topic);
                tracing::trace!(pipeline = p, topic, partition, offset, "consumed");
            }
            ProcessorEvent::Handled { seconds } => {
                self.hot.handler_seconds.observe(seconds);
            }
            ProcessorEvent::Succeeded {
                topic,
                outputs,
                occurred_at_ms,
            } => {
                c.succeeded.fetch_add(1, Ordering::Relaxed);
                c.produced
                    .fetch_add(outputs.len() as u64, Ordering::Relaxed);
                self.hot.succeeded.inc();
                for output in outputs {
                    self.count_topic(&self.hot.produced, &m.produced, output);
                }
                let age = (crate::contracts::events::now_millis() - occurred_at_ms).max(0) as f64
                    / 1000.0;
                self.hot.end_to_end_seconds.observe(age);
                tracing::debug!(pipeline = p, topic, outputs = outputs.len(), "succeeded");
            }
            ProcessorEvent::TransientRetry {
                attempt,
                kind,
                message,
            } => {
                c.transient_retries.fetch_add(1, Ordering::Relaxed);
                m.transient_retries.get_or_create(&self.labels).inc();
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
                self.outcome("retried");
                m.retries.get_or_create(&self.tier(tier)).inc();
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
                self.outcome("dead_lettered");
                let labels = ClassLabels {
                    pipeline: self.labels.pipeline.clone(),
                    group: self.labels.group.clone(),
                    error_class: class.as_str(),
                };
                m.dead_lettered.get_or_create(&labels).inc();
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
                // The gate has checked the tier against the pipeline's; this bound only keeps a
                // caller's mistake from sizing an allocation.
                if let Some(index) = tier.checked_sub(1).filter(|i| *i < MAX_TIERS) {
                    let mut samples = c.retry_lateness_ms.lock().expect("lateness lock");
                    if samples.len() <= index {
                        samples.resize_with(index + 1, Vec::new);
                    }
                    let tier_samples = &mut samples[index];
                    if tier_samples.len() == MAX_LATENESS_SAMPLES {
                        tier_samples.remove(0);
                    }
                    tier_samples.push(late_ms);
                    m.retry_lateness_seconds
                        .get_or_create(&self.tier(tier))
                        .observe(late_ms.max(0) as f64 / 1000.0);
                }
                tracing::debug!(
                    pipeline = p,
                    tier,
                    late_ms,
                    "retry handled after its due time"
                );
            }
            ProcessorEvent::ProduceFailed {
                topic,
                error,
                attempt,
            } => {
                c.produce_failures.fetch_add(1, Ordering::Relaxed);
                m.produce_failures.get_or_create(&self.labels).inc();
                tracing::error!(
                    pipeline = p, topic, error, attempt,
                    "PRODUCE FAILED: the input offset will not advance until this record is written"
                );
            }
            ProcessorEvent::Duplicate { topic, event_id } => {
                c.duplicates.fetch_add(1, Ordering::Relaxed);
                self.hot.duplicate.inc();
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
            ProcessorEvent::ConsumerLag {
                topic,
                partition,
                lag,
            } => {
                let labels = PartitionLabels {
                    pipeline: self.labels.pipeline.clone(),
                    group: self.labels.group.clone(),
                    topic: topic.to_string(),
                    partition: partition.to_string(),
                };
                m.consumer_lag.get_or_create(&labels).set(lag);
            }
            ProcessorEvent::PartitionRevoked { topic, partition } => {
                m.consumer_lag.remove(&PartitionLabels {
                    pipeline: self.labels.pipeline.clone(),
                    group: self.labels.group.clone(),
                    topic: topic.to_string(),
                    partition: partition.to_string(),
                });
                tracing::debug!(pipeline = p, topic, partition, "partition revoked");
            }
            ProcessorEvent::DlqDepth {
                topic,
                depth,
                oldest_age_seconds,
            } => {
                m.dlq_depth.get_or_create(&self.topic(topic)).set(depth);
                m.dlq_oldest_age_seconds
                    .get_or_create(&self.topic(topic))
                    .set(oldest_age_seconds);
            }
            ProcessorEvent::RetryBacklog { tier, records } => {
                m.retry_backlog.get_or_create(&self.tier(tier)).set(records);
            }
            ProcessorEvent::Ready { ready, reason } => {
                let previous = m.ready.get_or_create(&self.labels).set(i64::from(ready));
                if previous != i64::from(ready) {
                    tracing::info!(pipeline = p, ready, reason, "readiness changed");
                }
            }
            ProcessorEvent::ProducerStats {
                queue_messages,
                broker_rtt_seconds,
            } => {
                m.producer_queue_messages
                    .get_or_create(&self.labels)
                    .set(queue_messages);
                m.broker_rtt_seconds
                    .get_or_create(&self.labels)
                    .set(broker_rtt_seconds);
            }
            ProcessorEvent::RegistryCache { hits, misses } => {
                m.registry_cache
                    .get_or_create(&CacheLabels { result: "hit" })
                    .inc_by(hits);
                m.registry_cache
                    .get_or_create(&CacheLabels { result: "miss" })
                    .inc_by(misses);
            }
        }
    }

    /// True when the processor last reported itself ready.
    pub fn is_ready(&self) -> bool {
        metrics().ready.get_or_create(&self.labels).get() == 1
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

#[cfg(test)]
mod tests {
    use super::*;

    fn series(text: &str, name: &str, pipeline: &str, extra: &str) -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains(&format!("pipeline=\"{pipeline}\""))
                    && l.contains(extra)
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} series with {extra} for {pipeline}"))
    }

    #[test]
    fn handles_kept_for_the_hot_path_count_in_the_registry() {
        // Twice for one pipeline: a second processor shares the series, and creating it must
        // not wait on a lock its first lookups still hold.
        let first = Telemetry::new("hot-series-test", "g", 1);
        let second = Telemetry::new("hot-series-test", "g", 1);
        for telemetry in [&first, &second] {
            telemetry.emit(ProcessorEvent::Consumed {
                topic: "in",
                partition: 0,
                offset: 0,
            });
            telemetry.emit(ProcessorEvent::Succeeded {
                topic: "in",
                outputs: &["a".into(), "b".into(), "a".into()],
                occurred_at_ms: 0,
            });
        }
        let text = metrics::encode();
        let p = "hot-series-test";
        assert_eq!(
            series(&text, "orderflow_events_consumed_total", p, "topic=\"in\""),
            2.0
        );
        assert_eq!(
            series(&text, "orderflow_records_produced_total", p, "topic=\"a\""),
            4.0
        );
        assert_eq!(
            series(&text, "orderflow_records_produced_total", p, "topic=\"b\""),
            2.0
        );
        assert_eq!(
            series(
                &text,
                "orderflow_events_processed_total",
                p,
                "outcome=\"succeeded\""
            ),
            2.0
        );
        assert_eq!(first.snapshot().produced, 3);
    }
}
