//! The `orderflow` command line: parses the arguments, hands each command to the file of its
//! group, and passes SIGTERM/Ctrl-C as the shutdown of what it runs. It only parses and
//! prints; what a command builds comes from [`crate::app`]. Nothing in the library depends on
//! this module.
//!
//! # Layout
//! - `schemas`: `schemas register|check|deploy|list`.
//! - `orders`: `orders publish|consume`.
//! - `pipelines`: `pipelines validate|list`, `topics plan|ensure`, `saga show`.
//! - `run`: `run`, `serve`, `simulate`, `demo`: the long-running commands.
//! - `dlq`: `dlq list|show|replay|discard`.
//! - `retention`: `retention run|status`.

mod dlq;
mod orders;
mod pipelines;
mod retention;
mod run;
mod schemas;

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::app::{self, Connect};
use crate::pipeline::Pipeline;

pub use dlq::{DlqCommand, DlqSelect};
pub use orders::OrdersCommand;
pub use pipelines::{PipelinesCommand, SagaCommand, TopicsCommand};
pub use retention::{RetentionCommand, RetentionWindows};
pub use run::{DemoArgs, Faults, RunArgs, SimulateArgs};
pub use schemas::SchemasCommand;

/// Kafka stream processing for order events: typed Avro contracts in a schema registry,
/// fan-out processors, tiered retries and a dead-letter topic.
#[derive(Debug, Parser)]
#[command(name = "orderflow", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connect: Connect,
    #[command(flatten)]
    pub pipelines: PipelinesDir,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register, list and inspect the event schemas of avro/ in the registry.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Publish sample orders and read them back, decoded (the demo's producer and consumer).
    #[command(subcommand)]
    Orders(OrdersCommand),
    /// Check and list the pipelines of pipelines/.
    #[command(subcommand)]
    Pipelines(PipelinesCommand),
    /// Run pipelines until SIGTERM or Ctrl-C (then finish the record in hand, flush, commit).
    #[command(
        after_help = "Memory: each processor pauses the partition it reads from once it \
holds ORDERFLOW_IN_FLIGHT_RECORDS records (default 10000, 100 to 1000000; one partition may \
hold half) or ORDERFLOW_IN_FLIGHT_BYTES of input keys, payloads and headers (default 16MiB, \
1MiB to 4GiB; a byte count or KiB, MiB, GiB). Each record costs about 10 KiB with four outputs \
queued, and librdkafka holds a copy of each output: size the pod's memory limit for both."
    )]
    Run(RunArgs),
    /// Inspect, replay and discard dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show what a saga did for one order.
    #[command(subcommand)]
    Saga(SagaCommand),
    /// Create the topics of the pipelines (for clusters without a topic operator).
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Serve the order intake API: POST /orders (202 once order.created is on its topic) and
    /// GET /orders/{id}.
    Serve {
        /// Address to listen on.
        #[arg(
            long,
            env = "ORDERFLOW_INTAKE_LISTEN",
            default_value = "127.0.0.1:8080"
        )]
        listen: std::net::SocketAddr,
    },
    /// Serve simulated payment, inventory and notification services on loopback.
    Simulate(SimulateArgs),
    /// The whole flow in one process: simulated downstreams, every pipeline, a stream of orders,
    /// a live summary and a final report that must balance.
    Demo(DemoArgs),
    /// Expire dedup marks, intake keys and finished orders past their windows (for a CronJob),
    /// or show what each table holds.
    #[command(subcommand)]
    Retention(RetentionCommand),
}

#[derive(Debug, Clone, Args)]
pub struct PipelinesDir {
    /// Folder of the pipeline files.
    #[arg(
        long,
        env = "ORDERFLOW_PIPELINES_DIR",
        default_value = "pipelines",
        global = true
    )]
    pub pipelines_dir: PathBuf,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let (connect, dir) = (&cli.connect, &cli.pipelines);
    match cli.command {
        Command::Schemas(cmd) => schemas::schemas(connect, cmd).await,
        Command::Orders(cmd) => orders::orders(connect, cmd).await,
        Command::Pipelines(cmd) => pipelines::pipelines(connect, dir, cmd),
        Command::Run(args) => run::run_pipelines(connect, dir, args).await,
        Command::Dlq(cmd) => dlq::dead_letters(connect, dir, cmd).await,
        Command::Saga(cmd) => pipelines::saga_command(connect, dir, cmd).await,
        Command::Topics(TopicsCommand::Plan { pipelines, json }) => {
            pipelines::topics_plan(connect, dir, pipelines, json)
        }
        Command::Topics(TopicsCommand::Ensure { pipelines }) => {
            pipelines::topics_ensure(connect, dir, pipelines).await
        }
        Command::Serve { listen } => run::serve(connect, listen).await,
        Command::Simulate(args) => run::simulate(args).await,
        Command::Demo(args) => run::demo(connect, dir, args).await,
        Command::Retention(cmd) => retention::retention_command(connect, cmd).await,
    }
}

fn select_pipelines(dir: &PipelinesDir, names: &[String]) -> anyhow::Result<Vec<Pipeline>> {
    let all = app::load_pipelines(&dir.pipelines_dir)?;
    for name in names {
        if !all.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
            bail!(
                "no pipeline named '{name}' in {} (there are: {})",
                dir.pipelines_dir.display(),
                known.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|p| names.is_empty() || names.contains(&p.name))
        .collect())
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C): the shutdown the CLI passes to what it
/// runs (a graceful drain: finish the records in hand, flush, commit).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
