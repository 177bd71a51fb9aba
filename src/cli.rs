//! The `orderflow` command line. Uses only the library's public API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rdkafka::consumer::Consumer;
use rdkafka::Message;

use crate::contracts::{value_subject, Catalog, EventCodec, OrderCreated, RegistryClient};
use crate::kafka::{self, Publisher};

/// Kafka stream processing for order events: typed Avro contracts in a schema registry,
/// fan-out processors, tiered retries and a dead-letter topic.
#[derive(Debug, Parser)]
#[command(name = "orderflow", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connect: Connect,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the broker and the registry are. Flags win over environment variables.
#[derive(Debug, Clone, Args)]
pub struct Connect {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(
        long,
        env = "ORDERFLOW_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092",
        global = true
    )]
    pub bootstrap_servers: String,
    /// Confluent-compatible schema registry API root (for Apicurio: .../apis/ccompat/v7).
    #[arg(
        long,
        env = "ORDERFLOW_REGISTRY_URL",
        default_value = "http://127.0.0.1:18081/apis/ccompat/v7",
        global = true
    )]
    pub registry_url: String,
    /// Folder of the .avsc contract files.
    #[arg(
        long,
        env = "ORDERFLOW_SCHEMAS_DIR",
        default_value = "avro",
        global = true
    )]
    pub schemas_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register, list and inspect the event schemas of avro/ in the registry.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Publish sample orders and read them back, decoded (the demo's producer and consumer).
    #[command(subcommand)]
    Orders(OrdersCommand),
}

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Register every event schema under its topic's value subject (`<event-type>-value`).
    /// Idempotent: an unchanged schema keeps its id and version.
    Register {
        /// Show what would be registered without changing the registry.
        #[arg(long)]
        dry_run: bool,
        /// Prefix for topic (and so subject) names, e.g. `staging.`; tests use a random one.
        #[arg(long, env = "ORDERFLOW_TOPIC_PREFIX", default_value = "")]
        topic_prefix: String,
    },
    /// List the registry's subjects with their latest id and version.
    List,
}

#[derive(Debug, Subcommand)]
pub enum OrdersCommand {
    /// Publish sample `order.created` events (acks=all) and print where each landed.
    Publish {
        /// How many orders to publish.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Topic to publish to.
        #[arg(long, default_value = "order.created")]
        topic: String,
    },
    /// Consume `order.created` events, decode them by schema id and print one JSON line each.
    Consume {
        /// Topic to read.
        #[arg(long, default_value = "order.created")]
        topic: String,
        /// Consumer group; offsets are committed for it.
        #[arg(long, default_value = "orderflow-cli")]
        group: String,
        /// Stop after this many events.
        #[arg(long, default_value_t = 10)]
        max: u32,
        /// Stop when no event arrives for this long (e.g. 10s, 1m).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Schemas(cmd) => schemas(&cli.connect, cmd).await,
        Command::Orders(cmd) => orders(&cli.connect, cmd).await,
    }
}

fn subject_width(subjects: &[String]) -> usize {
    subjects
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("SUBJECT".len())
}

fn load_catalog(connect: &Connect) -> anyhow::Result<Catalog> {
    Ok(Catalog::load(&connect.schemas_dir)?)
}

async fn schemas(connect: &Connect, cmd: SchemasCommand) -> anyhow::Result<()> {
    let registry = RegistryClient::new(&connect.registry_url);
    match cmd {
        SchemasCommand::Register {
            dry_run,
            topic_prefix,
        } => {
            let catalog = load_catalog(connect)?;
            let subjects: Vec<String> = catalog
                .events
                .iter()
                .map(|e| value_subject(&format!("{topic_prefix}{}", e.event_type)))
                .collect();
            let w = subject_width(&subjects);
            println!("{:<w$} {:>6} {:>8}  STATUS", "SUBJECT", "ID", "VERSION");
            for (event, subject) in catalog.events.iter().zip(subjects) {
                let existing = registry.lookup(&subject, &event.expanded).await?;
                let (registered, status) = match (existing, dry_run) {
                    (Some(found), _) => (Some(found), "unchanged"),
                    (None, true) => (None, "would register"),
                    (None, false) => (
                        Some(
                            registry
                                .register(&subject, &event.expanded)
                                .await
                                .with_context(|| format!("registering {}", event.file.display()))?,
                        ),
                        "registered",
                    ),
                };
                let (id, version) = registered
                    .map(|r| (r.id.to_string(), r.version.to_string()))
                    .unwrap_or(("-".into(), "-".into()));
                println!("{subject:<w$} {id:>6} {version:>8}  {status}");
            }
            Ok(())
        }
        SchemasCommand::List => {
            let subjects = registry.subjects().await?;
            let w = subject_width(&subjects);
            println!("{:<w$} {:>6} {:>8}", "SUBJECT", "ID", "VERSION");
            for subject in subjects {
                match registry.latest(&subject).await? {
                    Some(latest) => {
                        println!("{subject:<w$} {:>6} {:>8}", latest.id, latest.version)
                    }
                    None => println!("{subject:<w$} {:>6} {:>8}", "-", "-"),
                }
            }
            Ok(())
        }
    }
}

async fn orders(connect: &Connect, cmd: OrdersCommand) -> anyhow::Result<()> {
    let catalog = Arc::new(load_catalog(connect)?);
    let codec = Arc::new(EventCodec::new(&connect.registry_url, catalog)?);
    match cmd {
        OrdersCommand::Publish { count, topic } => {
            let publisher = Publisher::new(&connect.bootstrap_servers, codec)?;
            let started = Instant::now();
            for _ in 0..count {
                let order = OrderCreated::sample("orderflow/cli");
                let at = publisher.publish(&topic, &order).await?;
                println!(
                    "published order.created {} order {} total {} {} -> {topic}[{}]@{}",
                    order.envelope.event_id,
                    order.data.order_id,
                    order.data.total.amount_minor,
                    order.data.total.currency,
                    at.partition,
                    at.offset
                );
            }
            eprintln!(
                "{count} orders published to {topic} in {:.2?}",
                started.elapsed()
            );
            Ok(())
        }
        OrdersCommand::Consume {
            topic,
            group,
            max,
            idle_timeout,
        } => {
            let consumer = kafka::consumer(&connect.bootstrap_servers, &group)?;
            consumer.subscribe(&[&topic])?;
            let mut seen = 0;
            while seen < max {
                let message = match tokio::time::timeout(idle_timeout, consumer.recv()).await {
                    Ok(message) => message?,
                    Err(_) => bail!(
                        "no event on {topic} for {} after {seen} of {max}",
                        humantime::format_duration(idle_timeout)
                    ),
                };
                let payload = message.payload().unwrap_or_default();
                let order: OrderCreated = codec.decode(payload).await.with_context(|| {
                    format!(
                        "record {}[{}]@{}",
                        message.topic(),
                        message.partition(),
                        message.offset()
                    )
                })?;
                println!("{}", serde_json::to_string(&order)?);
                consumer.store_offset_from_message(&message)?;
                seen += 1;
            }
            consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync)?;
            eprintln!("{seen} orders read from {topic}");
            Ok(())
        }
    }
}
