//! Runs a pipeline: one consumer (its group) over the input topics and the pipeline's own retry
//! topics, one idempotent producer (acks=all), and many records at once.
//!
//! # Stages
//! A record goes through these files in order; each opens with what it owns and must not do.
//! - [`engine`]: reads records (each an [`input::Input`]), keeps each partition's offset window
//!   and key lanes, pauses a partition when its window or an in-flight budget is full
//!   ([`room`]), handles rebalances, stores offsets at the contiguous finished watermark (or
//!   hands them to the batch's transaction). Each turn of its loop takes the records already
//!   fetched and the record ends already reported, up to a bound, and stores the turn's
//!   watermarks in one call. `partition` holds one partition's records in flight and starts
//!   each record (on the engine's task or as a task of its own).
//! - [`gate`]: the retry gate: run now, wait a moment in the lane, pause the partition until
//!   due, or dead-letter a record whose failure headers cannot be trusted.
//! - [`lanes`] and [`offsets`]: per-key order within a partition, and the watermark.
//! - [`work`]: one record's work: decode, [`claims`] on its event id, the [`dedup`] check, the
//!   step under the `concurrency` permits (transient retries wait in the lane), encode, write
//!   and wait for acks ([`writer`]: the producer counts each input's acks down), store the dedup
//!   mark. It runs as a task of its own, or without one when its step is a route: decode and
//!   claim on the engine's task, the rest from the dedup store's answer (if asked), and the
//!   producer's last ack (then the mark's reply) ends it.
//! - [`route`]: what a failure becomes: the next retry tier or the dead-letter topic, with
//!   [`crate::kafka::headers`] carrying its context.
//! - [`transactions`]: exactly once, a batch of inputs' outputs and offsets in one transaction.
//! - [`monitor`] measures what records cannot show (DLQ depth, retry backlog, readiness);
//!   [`context`] reports librdkafka statistics and rebalances.
//!
//! Delivery is at least once: a crash between writing and committing repeats the step, and
//! downstream HTTP services see the same `Idempotency-Key` again. With `delivery: exactly-once`
//! outputs and offsets commit together, a batch at a time.

pub mod claims;
pub mod context;
pub mod dedup;
pub mod engine;
pub mod gate;
pub mod input;
pub mod lanes;
pub mod monitor;
pub mod offsets;
mod partition;
pub mod room;
pub mod route;
pub mod transactions;
pub mod work;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::contracts::{EventCodec, Naming};
use crate::kafka;
use crate::pipeline::{Delivery, Pipeline};
use crate::steps::{Handlers, StepRunner};
use crate::telemetry::Telemetry;
use crate::topology;
use context::MeteredContext;
use dedup::DedupStore;
use engine::{Engine, Limits, Role};

/// Partitions of an input topic the runtime has to create itself.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Longest a graceful stop waits for in-flight writes (the pod's grace period is 45 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// How often DLQ depth, retry backlog and readiness are measured.
const MONITOR_EVERY: Duration = Duration::from_secs(10);

pub struct Processor {
    pipeline: Pipeline,
    naming: Naming,
    group_id: String,
    bootstrap_servers: String,
    codec: Arc<EventCodec>,
    step: StepRunner,
    producer: writer::Producer,
    context: MeteredContext,
    telemetry: Telemetry,
    roles: HashMap<Arc<str>, Role>,
    dedup: Option<Arc<DedupStore>>,
    /// Exactly-once: outputs and offsets are committed in transactions.
    transactional: bool,
    /// What it holds in flight ([`room::RECORDS_SETTING`], [`room::BYTES_SETTING`]).
    budget: room::Budget,
}

impl Processor {
    /// `dedup`: the store of handled event ids; `None` turns deduplication off.
    pub fn new(
        pipeline: Pipeline,
        naming: Naming,
        bootstrap_servers: &str,
        codec: Arc<EventCodec>,
        dedup: Option<Arc<DedupStore>>,
        handlers: &Handlers,
    ) -> anyhow::Result<Processor> {
        let mut roles = HashMap::new();
        for event_type in &pipeline.inputs {
            let input_topic = naming.topic(event_type);
            for tier in 1..=pipeline.retry.tiers.len() {
                roles.insert(
                    pipeline.retry_topic(&input_topic, tier).into(),
                    Role::Retry {
                        input_topic: input_topic.as_str().into(),
                        event_type: event_type.as_str().into(),
                        tier,
                    },
                );
            }
            roles.insert(
                input_topic.into(),
                Role::Input {
                    event_type: event_type.as_str().into(),
                },
            );
        }
        let telemetry = Telemetry::new(
            &pipeline.name,
            &pipeline.group_id(&naming),
            pipeline.retry.tiers.len(),
        );
        let context = MeteredContext::new(telemetry.clone());
        let mut producer_config = kafka::producer_config(bootstrap_servers);
        // Records finish only on their acks, so a long batching window would only add latency.
        producer_config.set("linger.ms", "1");
        producer_config.set("statistics.interval.ms", context::STATISTICS_INTERVAL_MS);
        let transactional = pipeline.delivery == Delivery::ExactlyOnce;
        if transactional {
            let id = topology::transactional_id(&pipeline.group_id(&naming), &instance_id());
            kafka::transactions::transactional(&mut producer_config, &id);
        }
        let budget = room::Budget::from_env().map_err(anyhow::Error::msg)?;
        Ok(Processor {
            budget,
            group_id: pipeline.group_id(&naming),
            step: StepRunner::for_pipeline(&pipeline, handlers, &naming),
            producer: producer_config
                .create_with_context(context.clone())
                .context("creating the producer")?,
            context,
            telemetry,
            bootstrap_servers: bootstrap_servers.to_string(),
            pipeline,
            naming,
            codec,
            roles,
            dedup,
            transactional,
        })
    }

    pub fn telemetry(&self) -> Telemetry {
        self.telemetry.clone()
    }

    /// Holds at most `budget` in flight instead of what the environment declares.
    pub fn with_budget(mut self, budget: room::Budget) -> Processor {
        self.budget = budget;
        self
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Creates what the pipeline reads and writes when missing (see [`ensure_topics`]).
    pub async fn ensure_topics(&self, replication: i32) -> anyhow::Result<Vec<(String, i32)>> {
        ensure_topics(
            &self.bootstrap_servers,
            &self.naming,
            &self.pipeline,
            replication,
        )
        .await
    }

    /// Consumes until `shutdown` turns true, then finishes what is in flight (within a bound),
    /// flushes the producer and commits what is finished.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut consumer_config = kafka::consumer_config(&self.bootstrap_servers, &self.group_id);
        if self.transactional {
            // Offsets are committed by the producer's transactions only.
            consumer_config.set("enable.auto.commit", "false");
            kafka::transactions::init(&self.producer)
                .await
                .context("initialising transactions")?;
        }
        consumer_config.set("statistics.interval.ms", context::STATISTICS_INTERVAL_MS);
        if let Some(id) = static_member_id() {
            // Static membership: a restarted instance (a container restarted in its pod) gets
            // its partitions back at once instead of after the dead one's session timeout.
            consumer_config.set("group.instance.id", id);
        }
        let (rebalance_tx, rebalances) = mpsc::unbounded_channel();
        let consumer: StreamConsumer<MeteredContext> = consumer_config
            .create_with_context(self.context.reporting_rebalances(rebalance_tx))
            .context("creating the consumer")?;
        let partitions = partition_counts(&self.bootstrap_servers, &self.naming, &self.pipeline)
            .await
            .context("reading the partition counts of the pipeline's topics")?;
        let monitor = monitor::Monitor {
            pipeline: self.pipeline.clone(),
            naming: self.naming.clone(),
            group_id: self.group_id.clone(),
            bootstrap_servers: self.bootstrap_servers.clone(),
            telemetry: self.telemetry.clone(),
            context: self.context.clone(),
            codec: self.codec.clone(),
        };
        let monitoring = tokio::spawn(monitor.run(MONITOR_EVERY, shutdown.clone()));
        let topics: Vec<&str> = self.roles.keys().map(|t| &**t).collect();
        consumer.subscribe(&topics).context("subscribing")?;
        tracing::info!(
            pipeline = %self.pipeline.name,
            group = %self.group_id,
            concurrency = self.pipeline.concurrency,
            ?topics,
            "processor started"
        );
        let runs_inline = self.step.is_immediate();
        let worker = Arc::new(work::Worker {
            permits: Arc::new(Semaphore::new(self.pipeline.concurrency)),
            unrecorded: Arc::new(Semaphore::new(work::unrecorded_window(
                self.pipeline.concurrency,
                self.step.has_effects(),
                self.budget.records,
            ))),
            pipeline: self.pipeline,
            naming: self.naming,
            group_id: self.group_id,
            codec: self.codec,
            step: self.step,
            producer: self.producer,
            telemetry: self.telemetry,
            dedup: self.dedup,
            claims: claims::Claims::default(),
            runtime: tokio::runtime::Handle::current(),
            runs_inline,
            partitions,
            transactional: self.transactional,
            stopping: Default::default(),
        });
        let engine = Engine {
            gate_rules: gate::GateRules {
                tiers: worker.pipeline.retry.tiers.clone(),
            },
            worker,
            consumer: Arc::new(consumer),
            roles: self.roles,
            limits: Limits {
                budget: self.budget,
                drain_timeout: DRAIN_TIMEOUT,
            },
            rebalances,
        };
        let result = engine.run(shutdown).await;
        monitoring.abort();
        result
    }
}

/// The partition count of every topic a pipeline reads and writes (0 for a missing one).
async fn partition_counts(
    bootstrap_servers: &str,
    naming: &Naming,
    pipeline: &Pipeline,
) -> anyhow::Result<HashMap<String, i32>> {
    let topics: Vec<String> = pipeline
        .topics(naming)
        .into_iter()
        .map(|t| t.topic)
        .collect();
    Ok(kafka::admin::partition_counts(bootstrap_servers, &topics)
        .await?
        .into_iter()
        .collect())
}

/// Creates what a pipeline reads and writes when missing: its inputs (3 partitions), their retry
/// and dead-letter topics (as many partitions as the input, so a record keeps its partition),
/// the dead-letter audit topics, and its declared outputs. Existing topics are left as they
/// are. Returns every topic with its partition count.
pub async fn ensure_topics(
    bootstrap_servers: &str,
    naming: &Naming,
    pipeline: &Pipeline,
    replication: i32,
) -> anyhow::Result<Vec<(String, i32)>> {
    let client: rdkafka::consumer::BaseConsumer =
        kafka::client_config(bootstrap_servers).create()?;
    let plan = pipeline.topics(naming);
    let mut partitions_of = HashMap::new();
    for input in plan.iter().filter(|t| t.role == "input") {
        kafka::ensure_topics(
            bootstrap_servers,
            &[(&input.topic, DEFAULT_PARTITIONS)],
            replication,
        )
        .await?;
        let metadata = client
            .fetch_metadata(Some(&input.topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of {}", input.topic))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len() as i32)
            .filter(|n| (1..=kafka::MAX_PARTITIONS).contains(n))
            .unwrap_or(DEFAULT_PARTITIONS);
        partitions_of.insert(input.topic.clone(), partitions);
    }
    // Retry and DLQ topics follow their input's partition count, so a record keeps its partition.
    let mut follow_input = Vec::new();
    let wanted: Vec<(String, i32)> = plan
        .into_iter()
        .map(|t| {
            let partitions = match (t.role, &t.input) {
                ("dlq-audit", _) => 1,
                (_, Some(input)) => {
                    follow_input.push((t.topic.clone(), input.clone(), partitions_of[input]));
                    partitions_of[input]
                }
                ("input", None) => partitions_of[&t.topic],
                _ => DEFAULT_PARTITIONS,
            };
            (t.topic, partitions)
        })
        .collect();
    let refs: Vec<(&str, i32)> = wanted.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    kafka::ensure_topics(bootstrap_servers, &refs, replication).await?;
    grow_to_inputs(bootstrap_servers, &client, &follow_input).await?;
    Ok(wanted)
}

/// Grows retry and DLQ topics that have fewer partitions than their input (an input that gained
/// partitions after them), or refuses to start, naming the topic and the command to run.
async fn grow_to_inputs(
    bootstrap_servers: &str,
    client: &rdkafka::consumer::BaseConsumer,
    follow_input: &[(String, String, i32)],
) -> anyhow::Result<()> {
    for (topic, input, want) in follow_input {
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let have = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len() as i32);
        if have >= *want {
            continue;
        }
        tracing::warn!(%topic, have, want, %input, "growing a retry/DLQ topic to its input's partition count");
        kafka::grow_partitions(bootstrap_servers, topic, *want)
            .await
            .with_context(|| {
                format!(
                    "{topic} has {have} partitions, fewer than its input {input} ({want}), and \
                     growing it failed; run: kafka-topics.sh --alter --topic {topic} --partitions {want}"
                )
            })?;
    }
    Ok(())
}

/// The consumers' `group.instance.id`: `ORDERFLOW_INSTANCE_ID` when set (the Kubernetes
/// manifests set it to the pod's name). Unset, members are dynamic: two processes on one host
/// must never share a static id, or one fences the other.
pub fn static_member_id() -> Option<String> {
    std::env::var("ORDERFLOW_INSTANCE_ID")
        .ok()
        .filter(|id| !id.is_empty())
}

/// This instance's name in transactional ids: `ORDERFLOW_INSTANCE_ID`, else the host name (a
/// pod's name in Kubernetes). Two live instances of one pipeline need different names.
pub fn instance_id() -> String {
    if let Ok(id) = std::env::var("ORDERFLOW_INSTANCE_ID") {
        return id;
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(host) if ok && !host.is_empty() => host.to_string(),
        _ => "orderflow".to_string(),
    }
}
