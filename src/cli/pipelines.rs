//! What the pipelines folder defines, printed: `pipelines validate|list`, `topics plan|ensure`
//! (every topic with its role; created when missing) and `saga show` (one order's saga from its
//! state topic).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use super::{select_pipelines, PipelinesDir};
use crate::app::{self, load_pipelines, load_pipelines_and_sagas, Connect};
use crate::{runtime, saga};

#[derive(Debug, Subcommand)]
pub enum PipelinesCommand {
    /// Load every pipeline file and report all problems at once (non-zero exit if any).
    Validate,
    /// Each pipeline with its group and every topic it reads and writes.
    List,
}

#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// An order's saga, from its state topic: status, each step with its attempts, replies and
    /// compensations, and the history.
    Show {
        /// The order id.
        order_id: uuid::Uuid,
        /// Saga name (default: the only saga of the folder).
        #[arg(long)]
        saga: Option<String>,
        /// Print the stored state as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create every missing input, retry, dead-letter, audit and output topic of the
    /// pipelines; existing topics are left as they are. Prints each topic.
    Ensure {
        /// Pipelines (by name); default: all.
        #[arg(long = "pipeline")]
        pipelines: Vec<String>,
    },
    /// Print every topic the pipelines and sagas use, with its role (a saga's `state` topic is
    /// compacted); needs no broker.
    Plan {
        /// Pipelines (by name); default: all.
        #[arg(long = "pipeline")]
        pipelines: Vec<String>,
        /// One JSON object per topic (kind, pipeline, group, topic, role, input).
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn topics_plan(
    connect: &Connect,
    dir: &PipelinesDir,
    pipelines: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    let naming = connect.naming();
    let (_, sagas) = load_pipelines_and_sagas(&dir.pipelines_dir)?;
    let saga_names: Vec<&String> = sagas.iter().map(|s| &s.name).collect();
    let (saga_filter, pipeline_filter): (Vec<String>, Vec<String>) =
        pipelines.into_iter().partition(|n| saga_names.contains(&n));
    let print = |kind: &str,
                 name: &str,
                 group: &str,
                 topic: &str,
                 role: &str,
                 input: Option<&str>| {
        if json {
            let line = serde_json::json!({"kind": kind, "pipeline": name, "group": group, "topic": topic, "role": role, "input": input});
            println!("{line}");
        } else {
            println!("{name:<18} {role:<10} {topic}");
        }
    };
    if saga_filter.is_empty() || !pipeline_filter.is_empty() {
        for p in select_pipelines(dir, &pipeline_filter)? {
            for t in p.topics(&naming) {
                print(
                    "pipeline",
                    &p.name,
                    &p.group_id(&naming),
                    &t.topic,
                    t.role,
                    t.input.as_deref(),
                );
            }
        }
    }
    for s in sagas.iter().filter(|s| {
        (saga_filter.is_empty() && pipeline_filter.is_empty()) || saga_filter.contains(&s.name)
    }) {
        let group = s.group_id(&naming);
        let state = s.state_topic(&naming);
        for (topic, source) in s.sources(&naming) {
            // Dead-letter topics are planned with the pipeline that writes them.
            if !matches!(source, saga::definition::Source::DeadLetters { .. }) {
                print("saga", &s.name, &group, &topic, "input", None);
            }
        }
        for topic in s.outputs(&naming) {
            let role = if topic == state { "state" } else { "output" };
            print("saga", &s.name, &group, &topic, role, None);
        }
    }
    Ok(())
}

pub(super) async fn topics_ensure(
    connect: &Connect,
    dir: &PipelinesDir,
    pipelines: Vec<String>,
) -> anyhow::Result<()> {
    let chosen = select_pipelines(dir, &pipelines)?;
    app::check_broker(connect).await?;
    let naming = connect.naming();
    let mut all = std::collections::BTreeMap::new();
    for p in &chosen {
        let topics = runtime::ensure_topics(
            &connect.bootstrap_servers,
            &naming,
            p,
            connect.replication_factor,
        )
        .await
        .with_context(|| format!("creating the topics of pipeline {}", p.name))?;
        all.extend(topics);
    }
    for (topic, partitions) in &all {
        println!("{topic:<60} {partitions:>3} partition(s)");
    }
    eprintln!(
        "{} topic(s) present (replication factor {} for the ones created)",
        all.len(),
        connect.replication_factor
    );
    Ok(())
}

pub(super) async fn saga_command(
    connect: &Connect,
    dir: &PipelinesDir,
    cmd: SagaCommand,
) -> anyhow::Result<()> {
    let SagaCommand::Show {
        order_id,
        saga: name,
        json,
    } = cmd;
    let (_, sagas) = load_pipelines_and_sagas(&dir.pipelines_dir)?;
    let chosen = match name {
        Some(name) => sagas.iter().find(|s| s.name == name).with_context(|| {
            format!(
                "no saga named '{name}' in {}/sagas",
                dir.pipelines_dir.display()
            )
        })?,
        None => match sagas.as_slice() {
            [one] => one,
            [] => bail!("no saga files in {}/sagas", dir.pipelines_dir.display()),
            _ => bail!("several sagas: choose one with --saga"),
        },
    };
    let topic = chosen.state_topic(&connect.naming());
    let Some(state) = saga::find_state(&connect.bootstrap_servers, &topic, order_id).await? else {
        bail!("no saga {} for order {order_id} in {topic}", chosen.name);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    let time = |ms: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    };
    println!("saga {} for order {order_id}", state.saga);
    println!("  status       {}", state.status.as_str());
    if let Some(reason) = &state.reason {
        println!("  reason       {reason}");
    }
    println!("  version      {}", state.version);
    println!("  started      {}", time(state.started_at));
    println!("  updated      {}", time(state.updated_at));
    println!("  correlation  {}", state.correlation_id);
    println!("steps:");
    for step in &state.steps {
        print!(
            "  {:<20} {:<20} attempts {}",
            step.name,
            format!("{:?}", step.status).to_lowercase(),
            step.attempts
        );
        if let Some(e) = &step.error {
            print!("  ({e})");
        }
        println!();
    }
    println!("history:");
    for h in &state.history {
        println!(
            "  {}  {:<20} {}",
            time(h.at),
            h.step.as_deref().unwrap_or("-"),
            h.what
        );
    }
    Ok(())
}

pub(super) fn pipelines(
    connect: &Connect,
    dir: &PipelinesDir,
    cmd: PipelinesCommand,
) -> anyhow::Result<()> {
    let pipelines = load_pipelines(&dir.pipelines_dir)?;
    let naming = connect.naming();
    match cmd {
        PipelinesCommand::Validate => {
            let (_, sagas) = load_pipelines_and_sagas(&dir.pipelines_dir)?;
            // The global dedup window this environment declares, as `run` reads it.
            use crate::database::retention::{DedupRetention, DEDUP_SETTING};
            let global = DedupRetention::from_env()?.window;
            crate::pipeline::check_dedup_windows(&pipelines, DEDUP_SETTING, global)?;
            println!(
                "{} pipeline(s) and {} saga(s) in {} are valid",
                pipelines.len(),
                sagas.len(),
                dir.pipelines_dir.display()
            );
        }
        PipelinesCommand::List => {
            for p in &pipelines {
                println!("{}  ({})", p.name, p.file.display());
                if !p.description.is_empty() {
                    println!("  {}", p.description);
                }
                println!("  group     {}", p.group_id(&naming));
                for input in p.input_topics(&naming) {
                    println!("  reads     {input}");
                    for (i, delay) in p.retry.tiers.iter().enumerate() {
                        println!(
                            "  retry {}   {} (after {})",
                            i + 1,
                            p.retry_topic(&input, i + 1),
                            humantime::format_duration(*delay)
                        );
                    }
                    println!("  dlq       {}", p.dlq_topic(&input));
                }
                for output in p.step.outputs() {
                    println!(
                        "  writes    {}",
                        if output.starts_with('(') {
                            output
                        } else {
                            naming.topic(&output)
                        }
                    );
                }
            }
            let (_, sagas) = load_pipelines_and_sagas(&dir.pipelines_dir)?;
            for s in &sagas {
                println!("saga {}  ({})", s.name, s.file.display());
                if !s.description.is_empty() {
                    println!("  {}", s.description);
                }
                println!("  group     {}", s.group_id(&naming));
                for step in &s.steps {
                    let undo = step
                        .compensation
                        .as_ref()
                        .map(|c| format!(", undone by {}", c.command))
                        .unwrap_or_default();
                    println!(
                        "  step      {}: {} -> {} (timeout {}{undo})",
                        step.name,
                        step.command,
                        step.succeeded,
                        humantime::format_duration(step.timeout)
                    );
                }
                for (topic, _) in s.sources(&naming) {
                    println!("  reads     {topic}");
                }
                for topic in s.outputs(&naming) {
                    println!("  writes    {topic}");
                }
            }
        }
    }
    Ok(())
}
