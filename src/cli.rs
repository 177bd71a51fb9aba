//! The `orderflow` command line. Uses only the library's public API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rdkafka::consumer::Consumer;
use rdkafka::Message;

use crate::contracts::compatibility;
use crate::contracts::subjects::COMPATIBILITY_LEVELS;
use crate::contracts::{
    Catalog, EventCodec, Naming, OrderCreated, RegistryClient, RegistryError, SubjectStrategy,
};
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
    /// Prefix for every topic (and so subject) name, e.g. `staging.`.
    #[arg(
        long,
        env = "ORDERFLOW_TOPIC_PREFIX",
        default_value = "",
        global = true
    )]
    pub topic_prefix: String,
    /// Subject naming: topic (`<topic>-value`), record (`<record full name>`) or topic-record.
    #[arg(
        long,
        env = "ORDERFLOW_SUBJECT_STRATEGY",
        default_value = "topic",
        global = true
    )]
    pub subject_strategy: SubjectStrategy,
}

impl Connect {
    pub fn naming(&self) -> Naming {
        Naming {
            topic_prefix: self.topic_prefix.clone(),
            strategy: self.subject_strategy,
        }
    }
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
        /// Compatibility level set on every subject before registering.
        #[arg(long, env = "ORDERFLOW_COMPATIBILITY", default_value = "BACKWARD_TRANSITIVE",
            value_parser = clap::builder::PossibleValuesParser::new(COMPATIBILITY_LEVELS))]
        compatibility: String,
    },
    /// Ask the registry whether every local schema may become its subject's next version.
    /// Exits non-zero naming the subject, field and rule of each breaking change, so CI can
    /// block a deploy.
    Check,
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
        /// Topic to publish to (default: the event type, with the topic prefix).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Consume `order.created` events, decode them by schema id and print one JSON line each.
    Consume {
        /// Topic to read (default: the event type, with the topic prefix).
        #[arg(long)]
        topic: Option<String>,
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
    let naming = connect.naming();
    match cmd {
        SchemasCommand::Register {
            dry_run,
            compatibility,
        } => {
            let catalog = load_catalog(connect)?;
            let subjects: Vec<String> = catalog.events.iter().map(|e| naming.subject(e)).collect();
            let w = subject_width(&subjects);
            println!("{:<w$} {:>6} {:>8}  STATUS", "SUBJECT", "ID", "VERSION");
            let mut refused = 0;
            for (event, subject) in catalog.events.iter().zip(subjects) {
                let existing = registry.lookup(&subject, &event.expanded).await?;
                if !dry_run {
                    registry.set_compatibility(&subject, &compatibility).await?;
                }
                let (registered, status) = match (existing, dry_run) {
                    (Some(found), _) => (Some(found), "unchanged".to_string()),
                    (None, true) => (None, "would register".to_string()),
                    (None, false) => match registry.register(&subject, &event.expanded).await {
                        Ok(r) => (Some(r), "registered".to_string()),
                        Err(RegistryError::Refused {
                            status: 409,
                            message,
                            ..
                        }) => {
                            refused += 1;
                            (
                                None,
                                format!("REFUSED ({}): {message}", event.file.display()),
                            )
                        }
                        Err(e) => return Err(e.into()),
                    },
                };
                let (id, version) = registered
                    .map(|r| (r.id.to_string(), r.version.to_string()))
                    .unwrap_or(("-".into(), "-".into()));
                println!("{subject:<w$} {id:>6} {version:>8}  {status}");
            }
            if refused > 0 {
                bail!("the registry refused {refused} schema(s); `orderflow schemas check` names the fields");
            }
            Ok(())
        }
        SchemasCommand::Check => {
            let catalog = load_catalog(connect)?;
            let subjects: Vec<String> = catalog.events.iter().map(|e| naming.subject(e)).collect();
            let w = subject_width(&subjects);
            println!("{:<w$}  RESULT", "SUBJECT");
            let mut incompatible = 0;
            for (event, subject) in catalog.events.iter().zip(subjects) {
                if let Some(found) = registry.lookup(&subject, &event.expanded).await? {
                    println!("{subject:<w$}  unchanged (version {})", found.version);
                    continue;
                }
                match registry.is_compatible(&subject, &event.expanded).await? {
                    None => println!("{subject:<w$}  new subject"),
                    Some(true) => println!("{subject:<w$}  compatible"),
                    Some(false) => {
                        incompatible += 1;
                        let rule = registry.compatibility(&subject).await?;
                        println!(
                            "{subject:<w$}  INCOMPATIBLE under {rule} ({})",
                            event.file.display()
                        );
                        let mut versions = Vec::new();
                        for v in registry.versions(&subject).await? {
                            if let Some(text) = registry.version_schema(&subject, v).await? {
                                versions.push((v, apache_avro::Schema::parse_str(&text)?));
                            }
                        }
                        let breaches = compatibility::explain(&rule, &event.schema, &versions);
                        if breaches.is_empty() {
                            println!("  {subject}: the registry refuses it under {rule}");
                        }
                        for breach in breaches {
                            println!("  {subject}: {breach}");
                        }
                    }
                }
            }
            if incompatible > 0 {
                bail!(
                    "{incompatible} schema(s) in {} would break their subject's compatibility rule",
                    catalog.dir.display()
                );
            }
            Ok(())
        }
        SchemasCommand::List => {
            let subjects = registry.subjects().await?;
            let w = subject_width(&subjects);
            println!(
                "{:<w$} {:>6} {:>8}  COMPATIBILITY",
                "SUBJECT", "ID", "VERSION"
            );
            for subject in subjects {
                let level = registry.compatibility(&subject).await?;
                match registry.latest(&subject).await? {
                    Some(latest) => println!(
                        "{subject:<w$} {:>6} {:>8}  {level}",
                        latest.id, latest.version
                    ),
                    None => println!("{subject:<w$} {:>6} {:>8}  {level}", "-", "-"),
                }
            }
            Ok(())
        }
    }
}

async fn orders(connect: &Connect, cmd: OrdersCommand) -> anyhow::Result<()> {
    let catalog = Arc::new(load_catalog(connect)?);
    let codec = Arc::new(EventCodec::with_naming(
        &connect.registry_url,
        catalog,
        connect.naming(),
    )?);
    match cmd {
        OrdersCommand::Publish { count, topic } => {
            let topic = topic.unwrap_or_else(|| connect.naming().topic("order.created"));
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
            let topic = topic.unwrap_or_else(|| connect.naming().topic("order.created"));
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
                let order: OrderCreated =
                    codec.decode(message.payload()).await.with_context(|| {
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
