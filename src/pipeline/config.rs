//! The pipeline files of `pipelines/`, as written. Unknown keys are refused.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One pipeline: one consumer group reading its input topics and doing one step per event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name, used in logs and metrics (e.g. `payment`).
    pub name: String,
    /// What the pipeline is for, for people.
    #[serde(default)]
    pub description: String,
    /// Event types to consume; each is a topic (with the topic prefix added).
    pub inputs: Vec<String>,
    /// Consumer group. Its own retry and dead-letter topics are named after it, so two groups
    /// never share them.
    pub group: String,
    /// What is done with each event: `{route: ...}`, `{http: ...}` or `{custom: ...}`.
    #[serde(with = "serde_norway::with::singleton_map")]
    pub step: StepConfig,
    /// Retries of failures classified as transient or service errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Overrides of the default error classification, by HTTP status: `"409": permanent`.
    #[serde(default)]
    pub classify: BTreeMap<String, String>,
    /// `at-least-once` (default: outputs may repeat after a crash, the dedup store skips
    /// repeated event ids) or `exactly-once` (route and custom steps only: outputs and the input
    /// offset are committed in one Kafka transaction).
    #[serde(default)]
    pub delivery: Delivery,
    /// Records handled at once by one process, across its partitions (1 to 1024, default 64).
    /// Records with the same key are always handled one after another, in order; records with
    /// different keys run side by side up to this bound. `1` handles one record at a time.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long this pipeline's dedup marks count (`2d`, `12h`; 1 min to 365 d), when shorter
    /// than the global `ORDERFLOW_DEDUP_RETENTION`: a duplicate older than it is handled again.
    /// Never longer than the global window (its partitions are dropped by that one); a process
    /// refuses to start otherwise. Unset: the global window.
    #[serde(default)]
    pub dedup_retention: Option<String>,
}

pub fn default_concurrency() -> usize {
    64
}

/// The most records one process may handle at once for one pipeline.
pub const MAX_CONCURRENCY: usize = 1024;

/// The delivery guarantee of a pipeline's outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

/// The one thing a pipeline does with an event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StepConfig {
    /// Copy the record, key and headers kept, to one or more topics (fan-out).
    Route {
        /// Destination topics (the topic prefix is added).
        to: Vec<String>,
    },
    /// POST the event as JSON to a downstream service and publish its answer as an event.
    Http(HttpStepConfig),
    /// Run a Rust handler registered under this name (see `steps::Handler`).
    Custom {
        /// Registered handler name.
        handler: String,
    },
}

/// A downstream HTTP call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStepConfig {
    /// Where to POST. `${VAR:-default}` is replaced from the environment when the pipeline loads.
    pub url: String,
    /// Give up on one call after this long (a timeout is a transient error).
    #[serde(default = "default_http_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Which event the answer becomes, by status (`"200"`, or a class such as `"2xx"`); the
    /// response body is that event's `data`. A status not listed here is an error, classified
    /// by `classify` and the defaults.
    pub emit: BTreeMap<String, String>,
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(2)
}

/// How failures are retried.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay of each retry tier, in order. A service error goes to tier 1, then 2, ...; after
    /// the last tier the event goes to the dead-letter topic.
    #[serde(default = "default_tiers", deserialize_with = "durations")]
    pub tiers: Vec<Duration>,
    /// Immediate in-process attempts after a transient error, before it counts as a service
    /// error.
    #[serde(default = "default_transient_attempts")]
    pub transient_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            tiers: default_tiers(),
            transient_attempts: default_transient_attempts(),
        }
    }
}

fn default_tiers() -> Vec<Duration> {
    [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec()
}

fn default_transient_attempts() -> u32 {
    3
}

/// `2s`, `500ms`, `1m 30s`.
pub(crate) fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!("'{text}' is not a duration like 2s or 500ms: {e}"))
    })
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            humantime::parse_duration(text).map_err(|e| {
                serde::de::Error::custom(format!(
                    "'{text}' is not a duration like 2s or 500ms: {e}"
                ))
            })
        })
        .collect()
}
