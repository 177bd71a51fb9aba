//! Every Prometheus metric orderflow exports, registered once. Only `telemetry` moves them.
//!
//! Names follow Prometheus conventions (`orderflow_<noun>_<unit>`, `_total` on counters,
//! `_seconds` on durations); labels come from small fixed sets: pipeline, group, topic,
//! partition, tier, error class, outcome. Never ids or messages.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub pipeline: String,
    pub group: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub pipeline: String,
    pub group: String,
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub pipeline: String,
    pub group: String,
    /// succeeded, retried, dead_lettered, duplicate
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub pipeline: String,
    pub group: String,
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub pipeline: String,
    pub group: String,
    pub error_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// hit or miss
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaLabels {
    pub saga: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaOutcomeLabels {
    pub saga: String,
    /// confirmed or cancelled
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaStepLabels {
    pub saga: String,
    /// A step name of the saga file.
    pub step: String,
    /// succeeded, failed, dead_lettered or timed_out
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaIgnoredLabels {
    pub saga: String,
    /// duplicate, late, unrelated or undecodable
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaHeldLabels {
    pub saga: String,
    /// live (running, compensating or stuck) or finished (confirmed or cancelled, within the
    /// retention window)
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaReloadedLabels {
    pub saga: String,
    /// live or finished (held), expired or deleted (skipped)
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadModelConflictLabels {
    pub model: String,
    /// duplicate or out_of_order
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// A reload reads a partition of the state topic: milliseconds when small, up to the 60 s it is
/// bounded to.
fn reload_buckets() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

fn lateness_buckets() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

pub struct Metrics {
    pub consumed: Family<TopicLabels, Counter>,
    pub processed: Family<OutcomeLabels, Counter>,
    pub produced: Family<TopicLabels, Counter>,
    pub retries: Family<TierLabels, Counter>,
    pub dead_lettered: Family<ClassLabels, Counter>,
    pub transient_retries: Family<PipelineLabels, Counter>,
    pub produce_failures: Family<PipelineLabels, Counter>,
    pub handler_seconds: HistogramFamily<PipelineLabels>,
    pub end_to_end_seconds: HistogramFamily<PipelineLabels>,
    pub retry_lateness_seconds: HistogramFamily<TierLabels>,
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    pub dlq_depth: Family<TopicLabels, Gauge>,
    pub dlq_oldest_age_seconds: Family<TopicLabels, Gauge<f64, AtomicU64>>,
    pub retry_backlog: Family<TierLabels, Gauge>,
    pub registry_cache: Family<CacheLabels, Counter>,
    pub ready: Family<PipelineLabels, Gauge>,
    pub producer_queue_messages: Family<PipelineLabels, Gauge>,
    pub broker_rtt_seconds: Family<PipelineLabels, Gauge<f64, AtomicU64>>,
    pub sagas_started: Family<SagaLabels, Counter>,
    pub sagas_ended: Family<SagaOutcomeLabels, Counter>,
    pub saga_compensations: Family<SagaLabels, Counter>,
    pub sagas_stuck: Family<SagaLabels, Gauge>,
    pub sagas_in_flight: Family<SagaLabels, Gauge>,
    pub saga_step_seconds: HistogramFamily<SagaStepLabels>,
    pub saga_inputs_ignored: Family<SagaIgnoredLabels, Counter>,
    pub saga_stale_states: Family<SagaLabels, Counter>,
    pub saga_late_replies: Family<SagaLabels, Counter>,
    pub saga_states_expired: Family<SagaLabels, Counter>,
    pub saga_states_held: Family<SagaHeldLabels, Gauge>,
    pub saga_state_reload_seconds: HistogramFamily<SagaLabels>,
    pub saga_states_reloaded: Family<SagaReloadedLabels, Counter>,
    pub read_model_conflicts: Family<ReadModelConflictLabels, Counter>,
    pub read_model_lag_seconds: HistogramFamily<ReadModelLabels>,
}

struct Exported {
    metrics: Metrics,
    registry: Registry,
}

fn exported() -> &'static Exported {
    static EXPORTED: OnceLock<Exported> = OnceLock::new();
    EXPORTED.get_or_init(|| {
        let m = Metrics {
            consumed: Family::default(),
            processed: Family::default(),
            produced: Family::default(),
            retries: Family::default(),
            dead_lettered: Family::default(),
            transient_retries: Family::default(),
            produce_failures: Family::default(),
            handler_seconds: Family::new_with_constructor(latency_buckets),
            end_to_end_seconds: Family::new_with_constructor(latency_buckets),
            retry_lateness_seconds: Family::new_with_constructor(lateness_buckets),
            consumer_lag: Family::default(),
            dlq_depth: Family::default(),
            dlq_oldest_age_seconds: Family::default(),
            retry_backlog: Family::default(),
            registry_cache: Family::default(),
            ready: Family::default(),
            producer_queue_messages: Family::default(),
            broker_rtt_seconds: Family::default(),
            sagas_started: Family::default(),
            sagas_ended: Family::default(),
            saga_compensations: Family::default(),
            sagas_stuck: Family::default(),
            sagas_in_flight: Family::default(),
            saga_step_seconds: Family::new_with_constructor(latency_buckets),
            saga_inputs_ignored: Family::default(),
            saga_stale_states: Family::default(),
            saga_late_replies: Family::default(),
            saga_states_expired: Family::default(),
            saga_states_held: Family::default(),
            saga_state_reload_seconds: Family::new_with_constructor(reload_buckets),
            saga_states_reloaded: Family::default(),
            read_model_conflicts: Family::default(),
            read_model_lag_seconds: Family::new_with_constructor(latency_buckets),
        };
        let mut r = Registry::with_prefix("orderflow");
        r.register(
            "events_consumed",
            "Records read from input and retry topics",
            m.consumed.clone(),
        );
        r.register(
            "events_processed",
            "Inputs finished, by outcome (succeeded, retried, dead_lettered, duplicate)",
            m.processed.clone(),
        );
        r.register(
            "records_produced",
            "Output records written and acknowledged, per topic",
            m.produced.clone(),
        );
        r.register("retries", "Records sent to a retry tier", m.retries.clone());
        r.register(
            "dlq_records",
            "Records sent to the dead-letter topic, by error class",
            m.dead_lettered.clone(),
        );
        r.register(
            "transient_retries",
            "Immediate in-process retries after transient failures",
            m.transient_retries.clone(),
        );
        r.register(
            "produce_failures",
            "Failed writes (retried until they succeed; the offset waits)",
            m.produce_failures.clone(),
        );
        r.register(
            "handler_duration_seconds",
            "Time to decode and run the step for one input",
            m.handler_seconds.clone(),
        );
        r.register(
            "end_to_end_latency_seconds",
            "From the event's occurred_at to its input being finished",
            m.end_to_end_seconds.clone(),
        );
        r.register(
            "retry_lateness_seconds",
            "How late a retried record was handled after its due time",
            m.retry_lateness_seconds.clone(),
        );
        r.register(
            "consumer_lag",
            "Records between the group's position and the end of each partition",
            m.consumer_lag.clone(),
        );
        r.register(
            "dlq_depth",
            "Records in the dead-letter topic not yet replayed or discarded",
            m.dlq_depth.clone(),
        );
        r.register(
            "dlq_oldest_age_seconds",
            "Age of the oldest dead-letter record not yet replayed or discarded",
            m.dlq_oldest_age_seconds.clone(),
        );
        r.register(
            "retry_backlog",
            "Records waiting in each retry tier",
            m.retry_backlog.clone(),
        );
        r.register(
            "registry_cache_lookups",
            "Writer schema lookups by id, from the cache (hit) or the registry (miss)",
            m.registry_cache.clone(),
        );
        r.register(
            "ready",
            "1 when the processor is in its group and the broker and registry answer",
            m.ready.clone(),
        );
        r.register(
            "kafka_producer_queue_messages",
            "Messages in librdkafka's producer queue",
            m.producer_queue_messages.clone(),
        );
        r.register(
            "kafka_broker_rtt_seconds",
            "Average broker round-trip time seen by the producer",
            m.broker_rtt_seconds.clone(),
        );
        r.register("sagas_started", "Sagas started", m.sagas_started.clone());
        r.register(
            "sagas_ended",
            "Sagas ended, by outcome (confirmed, cancelled)",
            m.sagas_ended.clone(),
        );
        r.register(
            "saga_compensations",
            "Compensating commands sent",
            m.saga_compensations.clone(),
        );
        r.register(
            "sagas_stuck",
            "Sagas whose compensation failed for good or went unanswered (owned by this instance)",
            m.sagas_stuck.clone(),
        );
        r.register(
            "sagas_in_flight",
            "Sagas started and not yet confirmed or cancelled (owned by this instance)",
            m.sagas_in_flight.clone(),
        );
        r.register(
            "saga_step_duration_seconds",
            "From a step's command to its answer (or timeout), by step and result",
            m.saga_step_seconds.clone(),
        );
        r.register(
            "saga_inputs_ignored",
            "Replies and events the orchestrator ignored (duplicate, late, unrelated, undecodable)",
            m.saga_inputs_ignored.clone(),
        );
        r.register(
            "saga_stale_states",
            "Stored saga states not newer than the one already known (stale updates)",
            m.saga_stale_states.clone(),
        );
        r.register(
            "saga_late_replies",
            "Replies and dead letters for an order with no saga state (expired, or never started \
             here): ignored, never starting a saga",
            m.saga_late_replies.clone(),
        );
        r.register(
            "saga_states_expired",
            "Finished sagas past the retention window, tombstoned and evicted from memory",
            m.saga_states_expired.clone(),
        );
        r.register(
            "saga_states_held",
            "Saga states this instance holds in memory, live or finished (within the retention window)",
            m.saga_states_held.clone(),
        );
        r.register(
            "saga_state_reload_seconds",
            "Time to reload one partition of the saga state topic after an assignment",
            m.saga_state_reload_seconds.clone(),
        );
        r.register(
            "saga_states_reloaded",
            "Keys read by reloads: held (live, finished) or skipped (expired, deleted)",
            m.saga_states_reloaded.clone(),
        );
        r.register(
            "read_model_conflicts",
            "Events not applied to a read model: duplicates, or older than what it shows",
            m.read_model_conflicts.clone(),
        );
        r.register(
            "read_model_lag_seconds",
            "From an event's occurred_at to its change being in the read model",
            m.read_model_lag_seconds.clone(),
        );
        super::retention::register(&mut r);
        super::dedup::register(&mut r);
        Exported {
            metrics: m,
            registry: r,
        }
    })
}

pub fn metrics() -> &'static Metrics {
    &exported().metrics
}

/// The text exposition format, for `/metrics`.
pub fn encode() -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &exported().registry)
        .expect("writing to a String cannot fail");
    out
}
