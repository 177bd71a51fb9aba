//! Saga files (`pipelines/sagas/*.yaml`): the steps of a saga, the events that answer each, and
//! the pipelines that carry out its commands. Unknown keys are refused; every problem of a file
//! is reported at once, naming the field.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::commands::COMMAND_TYPES;
use crate::contracts::{Naming, EVENT_TYPES};
use crate::pipeline::{config::duration, Pipeline, Problem, Step};
use crate::topology;

/// A saga as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaConfig {
    /// Unique name, used in logs, metrics and the state topic's name (e.g. `order`).
    pub name: String,
    /// What the saga is for, for people.
    #[serde(default)]
    pub description: String,
    /// Consumer group of the orchestrator; every replica shares it.
    pub group: String,
    /// The event that starts one saga per order (`order.created`).
    pub starts_on: String,
    /// Published when every step succeeded (`order.confirmed`).
    pub completes_with: String,
    /// Published, with the reason, once a failed saga is compensated (`order.cancelled`).
    pub cancels_with: String,
    /// The steps, in order. Finished steps are compensated in reverse order.
    pub steps: Vec<StepConfig>,
}

/// One step: a command, and the events that answer it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Unique within the saga, e.g. `charge-payment`.
    pub name: String,
    /// The command event sent to start the step (named as a request).
    pub command: String,
    /// The pipeline that carries the command out: a record in its dead-letter topic means the
    /// step failed for good (retries exhausted).
    pub pipeline: String,
    /// The reply that means the step is done.
    pub succeeded: String,
    /// Replies that mean the step failed for good (e.g. `payment.failed`).
    #[serde(default)]
    pub failed: Vec<String>,
    /// A reply that has not come after this long fails the step (longer than the pipeline's
    /// retry tiers, or a step still being retried times out).
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// How to undo the step once it succeeded; none for a last step or one that changes nothing.
    #[serde(default)]
    pub compensation: Option<CompensationConfig>,
}

/// The command that undoes a finished step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompensationConfig {
    /// The compensating command (e.g. `payment.refund-requested`).
    pub command: String,
    /// The pipeline that carries it out; its dead-letter topic means compensation failed for good
    /// and the saga is stuck (alerted on).
    pub pipeline: String,
    /// The reply that means the step is undone (e.g. `payment.refunded`).
    pub succeeded: String,
    /// A reply that has not come after this long marks the saga stuck (it resumes if the reply
    /// comes later).
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

/// A validated saga, with the groups of the pipelines it relies on resolved.
#[derive(Debug, Clone)]
pub struct Saga {
    pub file: PathBuf,
    pub name: String,
    pub description: String,
    pub group: String,
    pub starts_on: String,
    pub completes_with: String,
    pub cancels_with: String,
    pub steps: Vec<SagaStep>,
}

#[derive(Debug, Clone)]
pub struct SagaStep {
    pub name: String,
    pub command: String,
    /// The pipeline's consumer group (not prefixed), for its dead-letter topic's name.
    pub pipeline_group: String,
    pub succeeded: String,
    pub failed: Vec<String>,
    pub timeout: Duration,
    pub compensation: Option<SagaCompensation>,
}

#[derive(Debug, Clone)]
pub struct SagaCompensation {
    pub command: String,
    pub pipeline_group: String,
    pub succeeded: String,
    pub timeout: Duration,
}

/// What a topic the orchestrator reads is to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Start,
    /// A reply (success, failure or compensation done) of this event type.
    Reply(String),
    /// A dead-letter topic holding commands of this type that failed for good.
    DeadLetters {
        command: String,
    },
}

impl Saga {
    pub fn group_id(&self, naming: &Naming) -> String {
        topology::group_id(naming, &self.group)
    }

    /// The compacted topic holding each order's saga state, keyed by order id.
    pub fn state_topic(&self, naming: &Naming) -> String {
        topology::saga_state_topic(naming, &self.name)
    }

    /// Every topic the orchestrator reads, and what it is.
    pub fn sources(&self, naming: &Naming) -> Vec<(String, Source)> {
        let mut out = vec![(naming.topic(&self.starts_on), Source::Start)];
        let mut reply = |event_type: &str| {
            let topic = naming.topic(event_type);
            if !out.iter().any(|(t, _)| *t == topic) {
                out.push((topic, Source::Reply(event_type.to_string())));
            }
        };
        for step in &self.steps {
            reply(&step.succeeded);
            step.failed.iter().for_each(|f| reply(f));
            if let Some(c) = &step.compensation {
                reply(&c.succeeded);
            }
        }
        for step in &self.steps {
            let mut dlq = |command: &str, group: &str| {
                out.push((
                    topology::dlq_topic(&naming.topic(command), group),
                    Source::DeadLetters {
                        command: command.to_string(),
                    },
                ))
            };
            dlq(&step.command, &step.pipeline_group);
            if let Some(c) = &step.compensation {
                dlq(&c.command, &c.pipeline_group);
            }
        }
        out
    }

    /// Topics the orchestrator writes: commands, the end events and its state.
    pub fn outputs(&self, naming: &Naming) -> Vec<String> {
        let mut out: Vec<String> = self
            .steps
            .iter()
            .flat_map(|s| {
                std::iter::once(&s.command).chain(s.compensation.as_ref().map(|c| &c.command))
            })
            .chain([&self.completes_with, &self.cancels_with])
            .map(|t| naming.topic(t))
            .collect();
        out.push(self.state_topic(naming));
        out
    }
}

/// Loads every `*.yaml` of `dir` (a missing folder means no sagas). `pipelines` are the loaded
/// pipelines the steps refer to.
pub fn load_dir(dir: &Path, pipelines: &[Pipeline]) -> Result<Vec<Saga>, Vec<Problem>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(vec![Problem {
                file: dir.to_path_buf(),
                pipeline: None,
                field: String::new(),
                message: format!("cannot read the folder: {e}"),
            }])
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut sagas = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| e.to_string());
        match text.map(|t| parse(&file, &t, pipelines)) {
            Ok(Ok(saga)) => sagas.push(saga),
            Ok(Err(mut more)) => problems.append(&mut more),
            Err(e) => problems.push(Problem {
                file,
                pipeline: None,
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let mut names = HashSet::new();
    for saga in &sagas {
        if !names.insert(saga.name.clone()) {
            problems.push(Problem {
                file: saga.file.clone(),
                pipeline: Some(saga.name.clone()),
                field: "name".into(),
                message: format!("another saga is also named '{}'", saga.name),
            });
        }
    }
    if problems.is_empty() {
        Ok(sagas)
    } else {
        Err(problems)
    }
}

/// Parses and validates one saga file against the pipelines it uses.
pub fn parse(file: &Path, text: &str, pipelines: &[Pipeline]) -> Result<Saga, Vec<Problem>> {
    let config: SagaConfig = serde_norway::from_str(text).map_err(|e| {
        vec![Problem {
            file: file.to_path_buf(),
            pipeline: None,
            field: String::new(),
            message: e.to_string(),
        }]
    })?;
    let mut issues: Vec<(String, String)> = Vec::new();
    let report = |issues: &mut Vec<(String, String)>, field: String, message: String| {
        issues.push((field, message))
    };
    let known = |t: &str| EVENT_TYPES.contains(&t);
    for (field, t) in [
        ("starts_on", &config.starts_on),
        ("completes_with", &config.completes_with),
        ("cancels_with", &config.cancels_with),
    ] {
        if !known(t) {
            report(
                &mut issues,
                field.into(),
                format!("'{t}' is not a known event type"),
            );
        }
    }
    if config.starts_on != "order.created" {
        report(
            &mut issues,
            "starts_on".into(),
            "only order.created can start a saga (the commands are built from the order)".into(),
        );
    }
    if config.steps.is_empty() {
        report(
            &mut issues,
            "steps".into(),
            "a saga needs at least one step".into(),
        );
    }
    // The pipeline carrying out `command`, checked to read it and emit `replies`.
    let pipeline_group = |issues: &mut Vec<(String, String)>,
                          field: String,
                          name: &str,
                          command: &str,
                          replies: &[&String]| {
        let Some(p) = pipelines.iter().find(|p| p.name == name) else {
            report(issues, field, format!("no pipeline is named '{name}'"));
            return String::new();
        };
        if !p.inputs.iter().any(|i| i == command) {
            report(
                issues,
                field.clone(),
                format!("pipeline '{name}' does not consume {command}"),
            );
        }
        let emitted = match &p.step {
            Step::Http(http) => http.emit.iter().map(|(_, t)| t.clone()).collect(),
            _ => Vec::new(),
        };
        for reply in replies {
            if !emitted.contains(reply) {
                report(
                    issues,
                    field.clone(),
                    format!("pipeline '{name}' never emits {reply}"),
                );
            }
        }
        p.group.clone()
    };
    let mut names = HashSet::new();
    let mut steps = Vec::new();
    for (i, step) in config.steps.iter().enumerate() {
        let at = |f: &str| format!("steps[{i}].{f}");
        if !names.insert(step.name.clone()) {
            report(
                &mut issues,
                at("name"),
                format!("'{}' is used by two steps", step.name),
            );
        }
        if !COMMAND_TYPES.contains(&step.command.as_str()) {
            report(
                &mut issues,
                at("command"),
                format!(
                    "'{}' has no command builder; known: {}",
                    step.command,
                    COMMAND_TYPES.join(", ")
                ),
            );
        }
        let replies: Vec<&String> = std::iter::once(&step.succeeded)
            .chain(&step.failed)
            .collect();
        for reply in &replies {
            if !known(reply) {
                report(
                    &mut issues,
                    at("succeeded"),
                    format!("'{reply}' is not a known event type"),
                );
            }
        }
        let group = pipeline_group(
            &mut issues,
            at("pipeline"),
            &step.pipeline,
            &step.command,
            &replies,
        );
        if step.timeout.is_zero() {
            report(&mut issues, at("timeout"), "must be more than 0".into());
        }
        let compensation = step.compensation.as_ref().map(|c| {
            if !COMMAND_TYPES.contains(&c.command.as_str()) {
                report(
                    &mut issues,
                    at("compensation.command"),
                    format!("'{}' has no command builder", c.command),
                );
            }
            SagaCompensation {
                pipeline_group: pipeline_group(
                    &mut issues,
                    at("compensation.pipeline"),
                    &c.pipeline,
                    &c.command,
                    &[&c.succeeded],
                ),
                command: c.command.clone(),
                succeeded: c.succeeded.clone(),
                timeout: c.timeout,
            }
        });
        steps.push(SagaStep {
            name: step.name.clone(),
            command: step.command.clone(),
            pipeline_group: group,
            succeeded: step.succeeded.clone(),
            failed: step.failed.clone(),
            timeout: step.timeout,
            compensation,
        });
    }
    // A timeout shorter than the pipeline's retries would cancel orders still being retried.
    for (i, (step, config_step)) in steps.iter().zip(&config.steps).enumerate() {
        if let Some(p) = pipelines.iter().find(|p| p.name == config_step.pipeline) {
            let retries: Duration = p.retry.tiers.iter().sum();
            if step.timeout <= retries {
                report(
                    &mut issues,
                    format!("steps[{i}].timeout"),
                    format!(
                        "{:?} is not longer than pipeline '{}''s retry tiers ({retries:?}): the step would time out while still being retried",
                        step.timeout, p.name
                    ),
                );
            }
        }
    }
    if !issues.is_empty() {
        return Err(issues
            .into_iter()
            .map(|(field, message)| Problem {
                file: file.to_path_buf(),
                pipeline: Some(format!("saga {}", config.name)),
                field,
                message,
            })
            .collect());
    }
    Ok(Saga {
        file: file.to_path_buf(),
        name: config.name,
        description: config.description,
        group: config.group,
        starts_on: config.starts_on,
        completes_with: config.completes_with,
        cancels_with: config.cancels_with,
        steps,
    })
}
