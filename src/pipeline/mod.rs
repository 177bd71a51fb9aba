//! Pipelines declared in `pipelines/*.yaml`: the model, its validation (every problem at once,
//! each naming the file, pipeline and field), and the names of the topics a pipeline uses.
//!
//! # Topics of a pipeline
//! For each input topic `T` and the pipeline's consumer group `G`:
//! - `T.G.retry.N` for retry tier N (1-based), one per configured delay;
//! - `T.G.dlq`, the dead-letter topic.
//!
//! So two groups reading one topic never share a retry or dead-letter topic, and a record's
//! topic alone says where it came from and who failed it. They have the input's partition
//! count, and a record keeps its partition on the way through them.

pub mod config;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config::{Delivery, HttpStepConfig, PipelineConfig, RetryConfig, StepConfig};

use crate::contracts::{Naming, EVENT_TYPES};
use crate::failure::{Classifier, ErrorClass};
use crate::topology;

/// A validated pipeline, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    /// Consumer group as written (before any prefix).
    pub group: String,
    /// Event types consumed.
    pub inputs: Vec<String>,
    pub step: Step,
    pub retry: RetryConfig,
    pub classifier: Classifier,
    pub delivery: Delivery,
    /// Records handled at once by one process (see [`PipelineConfig::concurrency`]).
    pub concurrency: usize,
    /// This pipeline's dedup window, when it has its own (see
    /// [`PipelineConfig::dedup_retention`] and [`check_dedup_windows`]).
    pub dedup_retention: Option<Duration>,
}

/// What a pipeline does with each event, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Route { to: Vec<String> },
    Http(HttpStep),
    Custom { handler: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpStep {
    pub url: String,
    pub timeout: Duration,
    /// Expected answers and the event type each becomes, most specific first.
    pub emit: Vec<(StatusMatch, String)>,
}

/// A status an HTTP answer is expected to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Exact(u16),
    /// `2xx` is `Class(2)`.
    Class(u16),
}

impl StatusMatch {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(s) => s == status,
            StatusMatch::Class(c) => status / 100 == c,
        }
    }

    fn parse(text: &str) -> Option<StatusMatch> {
        let bytes = text.as_bytes();
        if text.len() != 3 || !(b'1'..=b'5').contains(&bytes[0]) {
            return None;
        }
        if &text[1..] == "xx" {
            return Some(StatusMatch::Class(u16::from(bytes[0] - b'0')));
        }
        text.parse().ok().map(StatusMatch::Exact)
    }
}

impl HttpStep {
    /// The event type an answer with this status becomes, if it is an expected answer.
    pub fn emits(&self, status: u16) -> Option<&str> {
        self.emit
            .iter()
            .find(|(m, _)| m.matches(status))
            .map(|(_, t)| t.as_str())
    }
}

impl Step {
    /// Event types or topics this step writes to (before the prefix).
    pub fn outputs(&self) -> Vec<String> {
        match self {
            Step::Route { to } => to.clone(),
            Step::Http(http) => {
                let mut out: Vec<String> = http.emit.iter().map(|(_, t)| t.clone()).collect();
                out.dedup();
                out
            }
            Step::Custom { handler } => vec![format!("(handler {handler})")],
        }
    }
}

/// Names of every topic and the group of a pipeline, for one topic prefix (the rules are
/// [`crate::topology`]'s).
impl Pipeline {
    pub fn group_id(&self, naming: &Naming) -> String {
        topology::group_id(naming, &self.group)
    }

    pub fn input_topics(&self, naming: &Naming) -> Vec<String> {
        self.inputs
            .iter()
            .map(|t| topology::event_topic(naming, t))
            .collect()
    }

    /// `T.G.retry.N` for the (prefixed) input topic `T`, N from 1.
    pub fn retry_topic(&self, input_topic: &str, tier: usize) -> String {
        topology::retry_topic(input_topic, &self.group, tier)
    }

    /// `T.G.dlq` for the (prefixed) input topic `T`.
    pub fn dlq_topic(&self, input_topic: &str) -> String {
        topology::dlq_topic(input_topic, &self.group)
    }
}

/// A topic a pipeline uses, and what it is to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedTopic {
    pub topic: String,
    /// input, retry, dlq, dlq-audit or output
    pub role: &'static str,
    /// For retry, dlq and dlq-audit: the input topic it belongs to (same partition count,
    /// except the single-partition audit topic).
    pub input: Option<String>,
}

impl Pipeline {
    /// Every topic the pipeline reads or writes, with the naming rules above.
    pub fn topics(&self, naming: &Naming) -> Vec<PlannedTopic> {
        let mut out = Vec::new();
        for input in self.input_topics(naming) {
            let of = |topic: String, role| PlannedTopic {
                topic,
                role,
                input: Some(input.clone()),
            };
            out.push(PlannedTopic {
                topic: input.clone(),
                role: "input",
                input: None,
            });
            for tier in 1..=self.retry.tiers.len() {
                out.push(of(self.retry_topic(&input, tier), "retry"));
            }
            let dlq = self.dlq_topic(&input);
            out.push(of(topology::dlq_audit_topic(&dlq), "dlq-audit"));
            out.push(of(dlq, "dlq"));
        }
        for output in self.step.outputs() {
            if !output.starts_with('(') {
                out.push(PlannedTopic {
                    topic: topology::event_topic(naming, &output),
                    role: "output",
                    input: None,
                });
            }
        }
        out
    }
}

/// One problem in one pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// The pipeline's name, once known.
    pub pipeline: Option<String>,
    /// Dotted path of the field, e.g. `step.http.url`; empty for the file as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(name) = &self.pipeline {
            write!(f, " (pipeline {name})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the pipelines:\n  {}", .0.len(),
    .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct PipelineErrors(pub Vec<Problem>);

/// Loads and validates every `*.yaml` / `*.yml` in `dir`. `handlers` are the names custom steps
/// may use. All problems of all files are returned together.
pub fn load_dir(dir: &Path, handlers: &[&str]) -> Result<Vec<Pipeline>, PipelineErrors> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect(),
        Err(e) => {
            return Err(PipelineErrors(vec![Problem {
                file: dir.to_path_buf(),
                pipeline: None,
                field: String::new(),
                message: format!("cannot read the folder: {e}"),
            }]))
        }
    };
    files.sort();
    let mut problems = Vec::new();
    let mut pipelines = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                problems.push(Problem {
                    file,
                    pipeline: None,
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse(&file, &text, handlers) {
            Ok(p) => pipelines.push(p),
            Err(mut more) => problems.append(&mut more),
        }
    }
    if pipelines.is_empty() && problems.is_empty() {
        problems.push(Problem {
            file: dir.to_path_buf(),
            pipeline: None,
            field: String::new(),
            message: "no pipeline files (*.yaml) found".into(),
        });
    }
    let mut names = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for p in &pipelines {
        if let Some(other) = names.insert(p.name.clone(), p.file.clone()) {
            problems.push(problem(
                p,
                "name",
                format!(
                    "'{}' is also the name of the pipeline in {}",
                    p.name,
                    other.display()
                ),
            ));
        }
        if let Some(other) = groups.insert(p.group.clone(), p.file.clone()) {
            problems.push(problem(
                p,
                "group",
                format!(
                    "'{}' is also the group of {}; each pipeline needs its own group",
                    p.group,
                    other.display()
                ),
            ));
        }
    }
    if problems.is_empty() {
        Ok(pipelines)
    } else {
        Err(PipelineErrors(problems))
    }
}

fn problem(p: &Pipeline, field: &str, message: String) -> Problem {
    Problem {
        file: p.file.clone(),
        pipeline: Some(p.name.clone()),
        field: field.to_string(),
        message,
    }
}

/// Parses and validates one pipeline file.
pub fn parse(file: &Path, text: &str, handlers: &[&str]) -> Result<Pipeline, Vec<Problem>> {
    let config: PipelineConfig = serde_norway::from_str(text).map_err(|e| {
        vec![Problem {
            file: file.to_path_buf(),
            pipeline: None,
            field: String::new(),
            message: e.to_string(),
        }]
    })?;
    let mut problems = Vec::new();
    let mut report = |field: &str, message: String| {
        problems.push(Problem {
            file: file.to_path_buf(),
            pipeline: Some(config.name.clone()),
            field: field.to_string(),
            message,
        })
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if !name_ok(&config.name) {
        report(
            "name",
            format!(
                "'{}' must be lower-case letters, digits, '-' or '_'",
                config.name
            ),
        );
    }
    if !name_ok(&config.group.replace('.', "")) {
        report(
            "group",
            format!(
                "'{}' must be lower-case letters, digits, '.', '-' or '_'",
                config.group
            ),
        );
    }
    if config.inputs.is_empty() {
        report("inputs", "must name at least one event type".into());
    }
    let mut seen = HashSet::new();
    for (i, input) in config.inputs.iter().enumerate() {
        if !EVENT_TYPES.contains(&input.as_str()) {
            report(&format!("inputs[{i}]"), unknown_type(input));
        }
        if !seen.insert(input) {
            report(
                &format!("inputs[{i}]"),
                format!("'{input}' is listed twice"),
            );
        }
    }
    let step = match &config.step {
        StepConfig::Route { to } => {
            if to.is_empty() {
                report("step.route.to", "must name at least one topic".into());
            }
            for (i, topic) in to.iter().enumerate() {
                if topic.is_empty()
                    || topic.contains(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
                {
                    report(
                        &format!("step.route.to[{i}]"),
                        format!("'{topic}' is not a valid topic name"),
                    );
                }
                if config.inputs.contains(topic) {
                    report(
                        &format!("step.route.to[{i}]"),
                        format!("'{topic}' is also an input: the pipeline would feed itself"),
                    );
                }
            }
            Step::Route { to: to.clone() }
        }
        StepConfig::Http(http) => {
            let url = substitute_env(&http.url);
            match reqwest::Url::parse(&url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => report(
                    "step.http.url",
                    format!("'{url}' must be http or https, not {}", u.scheme()),
                ),
                Err(e) => report("step.http.url", format!("'{url}' is not a URL: {e}")),
            }
            if http.timeout.is_zero() || http.timeout > Duration::from_secs(300) {
                report(
                    "step.http.timeout",
                    format!("{:?} must be more than 0 and at most 5m", http.timeout),
                );
            }
            if http.emit.is_empty() {
                report(
                    "step.http.emit",
                    "must map at least one status (e.g. \"2xx\") to an event type".into(),
                );
            }
            let mut emit = Vec::new();
            for (status, event_type) in &http.emit {
                let field = format!("step.http.emit.{status}");
                match StatusMatch::parse(status) {
                    Some(m) => emit.push((m, event_type.clone())),
                    None => report(
                        &field,
                        format!("'{status}' is not an HTTP status such as 200 or 2xx"),
                    ),
                }
                if !EVENT_TYPES.contains(&event_type.as_str()) {
                    report(&field, unknown_type(event_type));
                }
            }
            // Exact statuses win over classes.
            emit.sort_by_key(|(m, _)| matches!(m, StatusMatch::Class(_)));
            Step::Http(HttpStep {
                url,
                timeout: http.timeout,
                emit,
            })
        }
        StepConfig::Custom { handler } => {
            if !handlers.contains(&handler.as_str()) {
                report(
                    "step.custom.handler",
                    format!(
                        "no handler '{handler}' is registered (registered: {})",
                        handlers.join(", ")
                    ),
                );
            }
            Step::Custom {
                handler: handler.clone(),
            }
        }
    };
    for (i, tier) in config.retry.tiers.iter().enumerate() {
        if tier.is_zero() || *tier > Duration::from_secs(3600) {
            report(
                &format!("retry.tiers[{i}]"),
                format!("{tier:?} must be more than 0 and at most 1h"),
            );
        }
    }
    if config.delivery == Delivery::ExactlyOnce && matches!(config.step, StepConfig::Http(_)) {
        report(
            "delivery",
            "exactly-once needs a step whose only effects are Kafka records (route or custom); \
             an HTTP call cannot be part of a Kafka transaction"
                .into(),
        );
    }
    if config.retry.tiers.len() > crate::telemetry::MAX_TIERS {
        report(
            "retry.tiers",
            format!(
                "{} tiers; at most {} are allowed",
                config.retry.tiers.len(),
                crate::telemetry::MAX_TIERS
            ),
        );
    }
    if !(1..=config::MAX_CONCURRENCY).contains(&config.concurrency) {
        report(
            "concurrency",
            format!(
                "{} must be from 1 to {}",
                config.concurrency,
                config::MAX_CONCURRENCY
            ),
        );
    }
    let dedup_retention = config.dedup_retention.as_deref().and_then(|text| {
        crate::database::retention::parse_window(DEDUP_RETENTION_FIELD, text)
            .map_err(|e| report(DEDUP_RETENTION_FIELD, e.to_string()))
            .ok()
    });
    if config.retry.transient_attempts > 10 {
        report(
            "retry.transient_attempts",
            format!("{} is more than 10", config.retry.transient_attempts),
        );
    }
    let mut overrides = BTreeMap::new();
    for (status, class) in &config.classify {
        let field = format!("classify.{status}");
        let code = match status.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Some(code),
            _ => {
                report(&field, format!("'{status}' is not an HTTP status"));
                None
            }
        };
        match class.parse::<ErrorClass>() {
            Ok(class) => {
                if let Some(code) = code {
                    overrides.insert(code, class);
                }
            }
            Err(e) => report(&field, e),
        }
    }
    if problems.is_empty() {
        Ok(Pipeline {
            name: config.name,
            description: config.description,
            file: file.to_path_buf(),
            group: config.group,
            inputs: config.inputs,
            step,
            retry: config.retry,
            classifier: Classifier::new(overrides),
            delivery: config.delivery,
            concurrency: config.concurrency,
            dedup_retention,
        })
    } else {
        Err(problems)
    }
}

/// The pipeline file's key for its own dedup window.
pub const DEDUP_RETENTION_FIELD: &str = "dedup_retention";

/// Refuses a pipeline whose own dedup window is longer than the global one (`global`, from
/// `global_setting`): partitions are dropped by the global window, so a longer one would not
/// hold. Every such pipeline is reported, naming both settings.
pub fn check_dedup_windows(
    pipelines: &[Pipeline],
    global_setting: &str,
    global: Duration,
) -> Result<(), PipelineErrors> {
    let problems: Vec<Problem> = pipelines
        .iter()
        .filter_map(|p| {
            let own = p.dedup_retention.filter(|own| *own > global)?;
            Some(problem(
                p,
                DEDUP_RETENTION_FIELD,
                format!(
                    "{} is longer than {global_setting}={}: marks are \
                     dropped with the global window's partitions, so it would not hold; shorten \
                     it or raise {global_setting}",
                    humantime::format_duration(own),
                    humantime::format_duration(global)
                ),
            ))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipelineErrors(problems))
    }
}

fn unknown_type(t: &str) -> String {
    format!(
        "'{t}' is not an event type (known: {})",
        EVENT_TYPES.join(", ")
    )
}

/// Replaces `${VAR}` and `${VAR:-default}` with the environment's value.
pub fn substitute_env(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &rest[start + 2..start + end];
        let (var, default) = inner.split_once(":-").unwrap_or((inner, ""));
        out.push_str(&std::env::var(var).unwrap_or_else(|_| default.to_string()));
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
