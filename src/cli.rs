//! The `orderflow` command line. Uses only the library's public API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rdkafka::consumer::Consumer;
use rdkafka::message::Headers;
use rdkafka::Message;

use crate::contracts::compatibility;
use crate::contracts::subjects::COMPATIBILITY_LEVELS;
use crate::contracts::{
    Catalog, EventCodec, Naming, OrderCreated, RegistryClient, RegistryError, SubjectStrategy,
};
use crate::kafka::{self, Publisher};
use crate::pipeline::{self, Pipeline};
use crate::runtime::dedup::DedupStore;
use crate::saga::{self, Saga};
use crate::simulate::{self, Behaviour};
use crate::telemetry::saga::SagaTelemetry;
use crate::telemetry::{self, Telemetry};
use crate::{demo, dlq, runtime, steps};
use futures::FutureExt;

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
    /// PostgreSQL database of the processors' dedup store (handled event ids per group).
    #[arg(
        long,
        env = "ORDERFLOW_DATABASE_URL",
        default_value = "postgres://orderflow@127.0.0.1:15432/orderflow",
        global = true
    )]
    pub database_url: String,
    /// Replication factor of the topics orderflow creates when they are missing (3 in
    /// production; 1 on the local single-broker stack).
    #[arg(
        long,
        env = "ORDERFLOW_REPLICATION_FACTOR",
        default_value_t = 1,
        global = true
    )]
    pub replication_factor: i32,
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
    /// The connection the `ORDERFLOW_*` variables describe, else the local stack's defaults
    /// (`scripts/stack env`), with the repository's `avro/` and `topic_prefix`: for benchmarks.
    pub fn local(topic_prefix: &str) -> Connect {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        Connect {
            bootstrap_servers: var("ORDERFLOW_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
            registry_url: var(
                "ORDERFLOW_REGISTRY_URL",
                "http://127.0.0.1:18081/apis/ccompat/v7",
            ),
            database_url: var(
                "ORDERFLOW_DATABASE_URL",
                "postgres://orderflow@127.0.0.1:15432/orderflow",
            ),
            schemas_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/avro").into(),
            topic_prefix: topic_prefix.to_string(),
            subject_strategy: SubjectStrategy::Topic,
            replication_factor: 1,
        }
    }

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
    /// Check and list the pipelines of pipelines/.
    #[command(subcommand)]
    Pipelines(PipelinesCommand),
    /// Run pipelines until SIGTERM or Ctrl-C (then finish the record in hand, flush, commit).
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

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Create the dedup partitions ahead, drop those past the window, delete expired intake keys
    /// and finished orders in bounded batches; print what each table holds after.
    Run(RetentionWindows),
    /// Print what each table holds (rows, oldest age) and its window; changes nothing.
    Status(RetentionWindows),
}

/// The windows (each 1 min to 365 d). Processors and the CronJob must read the same ones.
#[derive(Debug, Clone, Args)]
pub struct RetentionWindows {
    /// How long a dedup mark counts: a duplicate older than this is handled again.
    #[arg(long, env = "ORDERFLOW_DEDUP_RETENTION", default_value = "7d", value_parser = |t: &str| window_setting("--dedup-retention / ORDERFLOW_DEDUP_RETENTION", t))]
    pub dedup_retention: Duration,
    /// How long an idempotency key holds its order (the window a client may retry in).
    #[arg(long, env = "ORDERFLOW_INTAKE_KEY_RETENTION", default_value = "24h", value_parser = |t: &str| window_setting("--intake-key-retention / ORDERFLOW_INTAKE_KEY_RETENTION", t))]
    pub intake_key_retention: Duration,
    /// How long a finished order stays in the read model after it became final.
    #[arg(long, env = "ORDERFLOW_READ_MODEL_RETENTION", default_value = "30d", value_parser = |t: &str| window_setting("--read-model-retention / ORDERFLOW_READ_MODEL_RETENTION", t))]
    pub read_model_retention: Duration,
}

fn window_setting(setting: &str, text: &str) -> Result<Duration, String> {
    crate::database::retention::parse_window(setting, text).map_err(|e| e.to_string())
}

async fn retention_command(connect: &Connect, cmd: RetentionCommand) -> anyhow::Result<()> {
    use crate::database::{retention as r, Database, Timeouts};
    let (run, w) = match cmd {
        RetentionCommand::Run(w) => (true, w),
        RetentionCommand::Status(w) => (false, w),
    };
    // Index builds and drops may take long on a large table: a long statement timeout here only.
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        statement: Duration::from_secs(600),
    };
    let db = Database::with(&connect.database_url, 1, timeouts)?;
    let conn = db.get().await?;
    let c = conn.client();
    if run {
        conn.timed(r::prepare_dedup(c, r::DEFAULT_BUCKET)).await?;
        let d = conn.timed(r::expire_dedup(c, w.dedup_retention)).await?;
        if d.skipped {
            println!(
                "{}: another process is expiring it now; skipped",
                r::DEDUP_TABLE
            );
        }
        println!(
            "{}: dropped {} partition(s) ({} rows){}, created {} ahead",
            r::DEDUP_TABLE,
            d.dropped.len(),
            d.rows_dropped,
            if d.legacy_dropped {
                " and the legacy table"
            } else {
                ""
            },
            d.created
        );
        let keys = conn
            .timed(r::expire_intake(c, w.intake_key_retention))
            .await?;
        println!("{}: deleted {keys} expired key(s)", r::INTAKE_TABLE);
        let orders = conn
            .timed(r::expire_read_model(c, w.read_model_retention))
            .await?;
        println!(
            "{}: deleted {orders} finished order(s)",
            r::READ_MODEL_TABLE
        );
    }
    let mut held = conn.timed(r::measure_dedup(c, w.dedup_retention)).await?;
    held.push(
        conn.timed(r::measure_intake(c, w.intake_key_retention))
            .await?,
    );
    held.push(
        conn.timed(r::measure_read_model(c, w.read_model_retention))
            .await?,
    );
    println!(
        "{:<28} {:>12} {:>14} {:>10}",
        "TABLE", "ROWS", "OLDEST", "WINDOW"
    );
    for h in held {
        let age = h.oldest_age_seconds.map_or("-".to_string(), |s| {
            humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
        });
        let window = humantime::format_duration(h.window).to_string();
        println!("{:<28} {:>12} {:>14} {:>10}", h.table, h.rows, age, window);
    }
    Ok(())
}

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

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead letters not yet replayed or discarded, one line each.
    List {
        #[command(flatten)]
        select: DlqSelect,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter: every header and the decoded event.
    Show {
        /// `<dlq topic>:<partition>:<offset>`, as `dlq list` prints it.
        position: String,
    },
    /// Write the selected dead letters back, keeping their event ids, and record it.
    Replay {
        #[command(flatten)]
        select: DlqSelect,
        /// retry: the group's first retry tier, history kept (only the failed consumer sees it);
        /// original: the original topic (every consumer reads it again).
        #[arg(long, default_value = "retry", value_parser = ["retry", "original"])]
        to: String,
        /// Records per second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// Say what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Mark the selected dead letters as handled without replaying them.
    Discard {
        #[command(flatten)]
        select: DlqSelect,
        /// Why; recorded in the audit topic.
        #[arg(long)]
        reason: String,
        /// Say what would be discarded, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which dead letters: every filter narrows the selection.
#[derive(Debug, Clone, Args)]
pub struct DlqSelect {
    /// Pipelines (by name); default: all.
    #[arg(long = "pipeline")]
    pub pipelines: Vec<String>,
    /// transient, service or permanent.
    #[arg(long, value_parser = ["transient", "service", "permanent"])]
    pub class: Option<String>,
    /// Event type, e.g. order.created.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Dead-lettered at or after: an RFC 3339 time or an age such as 2h.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// Dead-lettered at or before: an RFC 3339 time or an age such as 30m.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Only this partition of the dead-letter topic.
    #[arg(long)]
    pub partition: Option<i32>,
    /// First offset (inclusive).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Last offset (inclusive).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// Include dead letters already replayed or discarded (list only).
    #[arg(long)]
    pub all: bool,
}

impl DlqSelect {
    fn filter(&self) -> dlq::Filter {
        dlq::Filter {
            error_class: self.class.clone(),
            event_type: self.event_type.clone(),
            since_ms: self.since,
            until_ms: self.until,
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            include_handled: self.all,
        }
    }
}

/// An RFC 3339 time, or an age before now (`2h`), as ms since the epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_millis() as i64);
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(crate::contracts::events::now_millis() - age.as_millis() as i64),
        Err(_) => Err(format!(
            "'{text}' is neither an RFC 3339 time nor an age such as 2h"
        )),
    }
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

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipelines and sagas (of <pipelines-dir>/sagas) to run, by name.
    #[arg(required_unless_present = "all")]
    pub pipelines: Vec<String>,
    /// Run every pipeline and saga of the folder.
    #[arg(long, conflicts_with = "pipelines")]
    pub all: bool,
    /// Run without the dedup store: a repeated event id is handled again.
    #[arg(long)]
    pub no_dedup: bool,
    /// Address for /metrics, /healthz and /readyz (0.0.0.0:9464 in a pod).
    #[arg(
        long,
        env = "ORDERFLOW_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// Print each pipeline's counters this often (0s: never).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub report_every: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct Faults {
    /// Latency of each simulated call, e.g. 2ms..20ms.
    #[arg(long, default_value = "2ms..20ms", value_parser = parse_latency)]
    pub latency: (u64, u64),
    /// Share of calls answered 503 (transient: retried at once).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_503: f64,
    /// Share of calls answered 500 (service error: retried through the tiers).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_500: f64,
    /// Share of calls answered 400 (permanent: dead-letter topic).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_400: f64,
    /// Share of payments declined (402: the saga refunds nothing, releases stock, cancels).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub decline: f64,
    /// Share of reservations refused for missing stock (409: the saga cancels the order).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub out_of_stock: f64,
    /// Share of shipments that cannot be booked (422: the saga refunds, releases, cancels).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub unshippable: f64,
}

impl Faults {
    pub fn behaviour(&self) -> Behaviour {
        Behaviour {
            latency_ms: self.latency.0..=self.latency.1,
            rate_503: self.fail_503,
            rate_500: self.fail_500,
            rate_400: self.fail_400,
            rate_declined: self.decline,
            rate_out_of_stock: self.out_of_stock,
            rate_unshippable: self.unshippable,
        }
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18090")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub faults: Faults,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Orders to publish.
    #[arg(long, default_value_t = 200)]
    pub orders: u32,
    /// Orders published per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Run without the dedup store.
    #[arg(long)]
    pub no_dedup: bool,
    /// Give up waiting for the report to balance after this long.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub faults: Faults,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "'{text}' is not a share between 0 and 1 (e.g. 0.05)"
        )),
    }
}

fn parse_latency(text: &str) -> Result<(u64, u64), String> {
    let ms = |t: &str| {
        humantime::parse_duration(t.trim())
            .map(|d| d.as_millis() as u64)
            .map_err(|e| format!("'{t}': {e}"))
    };
    let (low, high) = match text.split_once("..") {
        Some((low, high)) => (ms(low)?, ms(high)?),
        None => (ms(text)?, ms(text)?),
    };
    if low > high {
        return Err(format!("'{text}': the lower bound is above the upper one"));
    }
    Ok((low, high))
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
    /// `check`, then `register` when every schema passes: the pre-deploy step in one command
    /// (the runtime image has no shell to chain two).
    Deploy {
        /// Compatibility level set on every subject before registering.
        #[arg(long, env = "ORDERFLOW_COMPATIBILITY", default_value = "BACKWARD_TRANSITIVE",
            value_parser = clap::builder::PossibleValuesParser::new(COMPATIBILITY_LEVELS))]
        compatibility: String,
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
        Command::Pipelines(cmd) => pipelines(&cli.connect, &cli.pipelines, cmd),
        Command::Run(args) => run_pipelines(&cli.connect, &cli.pipelines, args).await,
        Command::Dlq(cmd) => dead_letters(&cli.connect, &cli.pipelines, cmd).await,
        Command::Saga(cmd) => saga_command(&cli.connect, &cli.pipelines, cmd).await,
        Command::Topics(TopicsCommand::Plan { pipelines, json }) => {
            let naming = cli.connect.naming();
            let (_, sagas) = load_pipelines_and_sagas(&cli.pipelines.pipelines_dir)?;
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
                for p in select_pipelines(&cli.pipelines, &pipeline_filter)? {
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
                (saga_filter.is_empty() && pipeline_filter.is_empty())
                    || saga_filter.contains(&s.name)
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
        Command::Topics(TopicsCommand::Ensure { pipelines }) => {
            let chosen = select_pipelines(&cli.pipelines, &pipelines)?;
            let bootstrap = cli.connect.bootstrap_servers.clone();
            tokio::task::spawn_blocking(move || kafka::check_connection(&bootstrap)).await??;
            let naming = cli.connect.naming();
            let mut all = std::collections::BTreeMap::new();
            for p in &chosen {
                let topics = runtime::ensure_topics(
                    &cli.connect.bootstrap_servers,
                    &naming,
                    p,
                    cli.connect.replication_factor,
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
                cli.connect.replication_factor
            );
            Ok(())
        }
        Command::Serve { listen } => {
            let connect = &cli.connect;
            let bootstrap = connect.bootstrap_servers.clone();
            tokio::task::spawn_blocking(move || kafka::check_connection(&bootstrap)).await??;
            let codec = codec(connect)?;
            let publisher = Publisher::with_settings(
                &connect.bootstrap_servers,
                codec,
                crate::intake::PRODUCER_SETTINGS,
            )?;
            let topic = connect.naming().topic("order.created");
            let intake =
                crate::intake::Intake::new(publisher, topic.clone(), &connect.database_url).await?;
            let (addr, task) = crate::intake::serve(listen, intake).await?;
            eprintln!(
                "order intake on http://{addr}: POST /orders (to {topic}), GET /orders/{{id}}"
            );
            tokio::select! {
                _ = runtime::shutdown_signal() => Ok(()),
                _ = task => bail!("the intake server stopped"),
            }
        }
        Command::Simulate(args) => {
            let (addr, _, task) = simulate::serve(args.listen, args.faults.behaviour()).await?;
            eprintln!("simulated services on http://{addr}: POST /payments, /refunds, /reservations, /reservations/release, /shipments, /notifications");
            tokio::select! {
                _ = runtime::shutdown_signal() => Ok(()),
                _ = task => bail!("the simulated services stopped"),
            }
        }
        Command::Demo(args) => demo::run(&cli.connect, &cli.pipelines.pipelines_dir, args).await,
        Command::Retention(cmd) => retention_command(&cli.connect, cmd).await,
    }
}

fn load_pipelines(dir: &std::path::Path) -> anyhow::Result<Vec<Pipeline>> {
    Ok(pipeline::load_dir(dir, &steps::HANDLER_NAMES)?)
}

/// The pipelines of `dir` and the sagas of `dir/sagas`, every problem of both reported at once.
pub fn load_pipelines_and_sagas(
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<Pipeline>, Vec<Saga>)> {
    let pipelines = load_pipelines(dir)?;
    let sagas = saga::load_dir(&dir.join("sagas"), &pipelines).map_err(pipeline::PipelineErrors)?;
    for s in &sagas {
        if pipelines.iter().any(|p| p.name == s.name) {
            bail!(
                "saga '{}' ({}) has the name of a pipeline; `orderflow run` could not tell them apart",
                s.name,
                s.file.display()
            );
        }
    }
    Ok((pipelines, sagas))
}

/// The codec for the connection's registry and the catalog of `avro/`.
pub fn codec(connect: &Connect) -> anyhow::Result<Arc<EventCodec>> {
    let catalog = Arc::new(load_catalog(connect)?);
    Ok(Arc::new(EventCodec::with_naming(
        &connect.registry_url,
        catalog,
        connect.naming(),
    )?))
}

/// Orchestrators for `sagas`, their topics created.
pub async fn orchestrators(
    connect: &Connect,
    sagas: Vec<Saga>,
    codec: Arc<EventCodec>,
) -> anyhow::Result<Vec<saga::Orchestrator>> {
    let mut out = Vec::new();
    for s in sagas {
        let name = s.name.clone();
        let o = saga::Orchestrator::new(
            s,
            connect.naming(),
            &connect.bootstrap_servers,
            codec.clone(),
        )?;
        o.ensure_topics(runtime::DEFAULT_PARTITIONS, connect.replication_factor)
            .await
            .with_context(|| format!("creating the topics of saga {name}"))?;
        out.push(o);
    }
    Ok(out)
}

async fn saga_command(
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

fn pipelines(connect: &Connect, dir: &PipelinesDir, cmd: PipelinesCommand) -> anyhow::Result<()> {
    let pipelines = load_pipelines(&dir.pipelines_dir)?;
    let naming = connect.naming();
    match cmd {
        PipelinesCommand::Validate => {
            let (_, sagas) = load_pipelines_and_sagas(&dir.pipelines_dir)?;
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

fn select_pipelines(dir: &PipelinesDir, names: &[String]) -> anyhow::Result<Vec<Pipeline>> {
    let all = load_pipelines(&dir.pipelines_dir)?;
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

async fn dead_letters(
    connect: &Connect,
    dir: &PipelinesDir,
    cmd: DlqCommand,
) -> anyhow::Result<()> {
    let naming = connect.naming();
    let bootstrap = connect.bootstrap_servers.clone();
    let read = |pipelines: Vec<Pipeline>, filter: dlq::Filter| {
        let (bootstrap, naming) = (bootstrap.clone(), naming.clone());
        tokio::task::spawn_blocking(move || {
            dlq::read(&bootstrap, &naming, &pipelines, &filter).map(|letters| (pipelines, letters))
        })
    };
    // Replay and discard act on the selected dead letters not yet handled.
    let pending = |select: DlqSelect| {
        let chosen = select_pipelines(dir, &select.pipelines);
        let filter = dlq::Filter {
            include_handled: false,
            ..select.filter()
        };
        async move { read(chosen?, filter).await? }
    };
    match cmd {
        DlqCommand::List { select, limit } => {
            let pipelines = select_pipelines(dir, &select.pipelines)?;
            let (_, letters) = read(pipelines, select.filter()).await??;
            println!(
                "{:<44} {:<24} {:<16} {:<9} {:<16} {:>7}  MESSAGE",
                "DEAD LETTER", "TIME", "EVENT TYPE", "CLASS", "KIND", "ATTEMPT"
            );
            for l in letters.iter().take(limit) {
                let time = l
                    .record
                    .timestamp()
                    .to_millis()
                    .map(|ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(ms as u64),
                        )
                        .to_string()
                    })
                    .unwrap_or_default();
                let mut message = l
                    .header(runtime::headers::ERROR_MESSAGE)
                    .unwrap_or_default();
                message.truncate(
                    message
                        .char_indices()
                        .nth(70)
                        .map_or(message.len(), |(i, _)| i),
                );
                println!(
                    "{:<44} {time:<24} {:<16} {:<9} {:<16} {:>7}  {}{message}",
                    l.position(),
                    l.header("ce_type").unwrap_or_else(|| "?".into()),
                    l.header(runtime::headers::ERROR_CLASS)
                        .unwrap_or_else(|| "?".into()),
                    l.header(runtime::headers::ERROR_KIND)
                        .unwrap_or_else(|| "?".into()),
                    l.header(runtime::headers::ATTEMPT)
                        .unwrap_or_else(|| "?".into()),
                    if l.handled { "(handled) " } else { "" },
                );
            }
            eprintln!(
                "{} dead letter(s){}",
                letters.len(),
                if letters.len() > limit {
                    format!(", {limit} shown")
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        DlqCommand::Show { position } => {
            let (topic, partition, offset) = parse_position(&position)?;
            let pipelines = load_pipelines(&dir.pipelines_dir)?;
            let owner: Vec<Pipeline> = pipelines
                .into_iter()
                .filter(|p| {
                    p.input_topics(&naming)
                        .iter()
                        .any(|i| p.dlq_topic(i) == topic)
                })
                .collect();
            if owner.is_empty() {
                bail!(
                    "{topic} is not the dead-letter topic of any pipeline in {}",
                    dir.pipelines_dir.display()
                );
            }
            let filter = dlq::Filter {
                partition: Some(partition),
                from_offset: Some(offset),
                to_offset: Some(offset),
                include_handled: true,
                ..Default::default()
            };
            let (_, letters) = read(owner, filter).await??;
            let Some(letter) = letters.iter().find(|l| l.record.topic() == topic) else {
                bail!("no record at {position}");
            };
            println!(
                "dead letter {position}{}",
                if letter.handled {
                    " (already replayed or discarded)"
                } else {
                    ""
                }
            );
            println!(
                "key: {}",
                letter
                    .record
                    .key()
                    .map(|k| String::from_utf8_lossy(k).to_string())
                    .unwrap_or_else(|| "(none)".into())
            );
            if let Some(h) = letter.record.headers() {
                for h in h.iter() {
                    println!(
                        "header {}: {}",
                        h.key,
                        h.value
                            .map(|v| String::from_utf8_lossy(v).to_string())
                            .unwrap_or_default()
                    );
                }
            }
            let codec = codec(connect)?;
            match codec.decode_value(letter.record.payload()).await {
                Ok((name, value)) => {
                    let json: serde_json::Value =
                        value.try_into().unwrap_or(serde_json::Value::Null);
                    println!("event ({name}):\n{}", serde_json::to_string_pretty(&json)?);
                }
                Err(e) => println!("event: cannot be decoded ({}): {e}", e.kind()),
            }
            Ok(())
        }
        DlqCommand::Replay {
            select,
            to,
            rate,
            dry_run,
        } => {
            let (pipelines, letters) = pending(select).await?;
            let to = if to == "original" {
                dlq::ReplayTo::Original
            } else {
                dlq::ReplayTo::Retry
            };
            act(
                &bootstrap,
                &pipelines,
                &letters,
                dlq::Action::Replay(to),
                rate,
                dry_run,
                "replay",
            )
            .await
        }
        DlqCommand::Discard {
            select,
            reason,
            dry_run,
        } => {
            let (pipelines, letters) = pending(select).await?;
            act(
                &bootstrap,
                &pipelines,
                &letters,
                dlq::Action::Discard(&reason),
                1000,
                dry_run,
                "discard",
            )
            .await
        }
    }
}

fn parse_position(text: &str) -> anyhow::Result<(String, i32, i64)> {
    let mut parts = text.rsplitn(3, ':');
    let offset = parts.next().and_then(|o| o.parse().ok());
    let partition = parts.next().and_then(|p| p.parse().ok());
    let topic = parts.next();
    match (topic, partition, offset) {
        (Some(t), Some(p), Some(o)) => Ok((t.to_string(), p, o)),
        _ => bail!(
            "'{text}' is not <dlq topic>:<partition>:<offset>, e.g. order.created.payment.dlq:0:42"
        ),
    }
}

async fn act(
    bootstrap: &str,
    pipelines: &[Pipeline],
    letters: &[dlq::DeadLetter],
    action: dlq::Action<'_>,
    rate: u32,
    dry_run: bool,
    verb: &str,
) -> anyhow::Result<()> {
    if dry_run || letters.is_empty() {
        for l in letters {
            println!(
                "would {verb} {} ({})",
                l.position(),
                l.header("ce_id").unwrap_or_default()
            );
        }
        println!(
            "{} dead letter(s) to {verb}{}",
            letters.len(),
            if dry_run {
                " (dry run: nothing changed)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let done = dlq::handle(
        bootstrap,
        pipelines,
        letters,
        action,
        rate,
        |done, total| {
            if tty {
                let filled = done * 30 / total.max(1);
                eprint!(
                    "\r[{}{}] {done}/{total}",
                    "#".repeat(filled),
                    ".".repeat(30 - filled)
                );
            } else if done == total || done % 100 == 0 {
                eprintln!("{done}/{total}");
            }
        },
    )
    .await?;
    if tty {
        eprintln!();
    }
    println!("{verb}ed {} dead letter(s)", done.count);
    Ok(())
}

/// Builds a processor for each pipeline and creates the topics they need. With `dedup`, they
/// share one connection to the dedup store, which must be reachable.
pub async fn processors(
    connect: &Connect,
    pipelines: Vec<Pipeline>,
    dedup: bool,
) -> anyhow::Result<Vec<runtime::Processor>> {
    let bootstrap = connect.bootstrap_servers.clone();
    tokio::task::spawn_blocking(move || kafka::check_connection(&bootstrap)).await??;
    let dedup = if dedup {
        Some(Arc::new(DedupStore::connect(&connect.database_url).await.map_err(|e| {
            anyhow::anyhow!("{e}; start it with scripts/stack up, point --database-url at yours, or run with --no-dedup")
        })?))
    } else {
        tracing::warn!("deduplication is off: a repeated event id is handled again");
        None
    };
    let codec = codec(connect)?;
    let mut processors = Vec::new();
    for p in pipelines {
        let processor = runtime::Processor::new(
            p,
            connect.naming(),
            &connect.bootstrap_servers,
            codec.clone(),
            dedup.clone(),
            &steps::HandlerContext {
                database_url: connect.database_url.clone(),
            },
        )?;
        processor
            .ensure_topics(connect.replication_factor)
            .await
            .with_context(|| {
                format!(
                    "creating the topics of pipeline {}",
                    processor.pipeline().name
                )
            })?;
        processors.push(processor);
    }
    Ok(processors)
}

async fn run_pipelines(connect: &Connect, dir: &PipelinesDir, args: RunArgs) -> anyhow::Result<()> {
    let (all, all_sagas) = load_pipelines_and_sagas(&dir.pipelines_dir)?;
    let known: Vec<&str> = all
        .iter()
        .map(|p| p.name.as_str())
        .chain(all_sagas.iter().map(|s| s.name.as_str()))
        .collect();
    for name in &args.pipelines {
        if !known.contains(&name.as_str()) {
            bail!(
                "no pipeline or saga named '{name}' in {} (there are: {})",
                dir.pipelines_dir.display(),
                known.join(", ")
            );
        }
    }
    let chosen: Vec<Pipeline> = all
        .into_iter()
        .filter(|p| args.all || args.pipelines.contains(&p.name))
        .collect();
    let sagas: Vec<Saga> = all_sagas
        .into_iter()
        .filter(|s| args.all || args.pipelines.contains(&s.name))
        .collect();
    let processors = if chosen.is_empty() {
        Vec::new()
    } else {
        processors(connect, chosen, !args.no_dedup).await?
    };
    let orchestrators = if sagas.is_empty() {
        Vec::new()
    } else {
        let bootstrap = connect.bootstrap_servers.clone();
        tokio::task::spawn_blocking(move || kafka::check_connection(&bootstrap)).await??;
        orchestrators(connect, sagas, codec(connect)?).await?
    };
    let telemetry: Vec<(String, Telemetry)> = processors
        .iter()
        .map(|p| (p.pipeline().name.clone(), p.telemetry()))
        .collect();
    let mut checks: telemetry::server::ReadinessChecks = telemetry
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                Arc::new(t.clone()) as Arc<dyn telemetry::server::Readiness>,
            )
        })
        .collect();
    for o in &orchestrators {
        checks.push((format!("saga {}", o.saga().name), Arc::new(o.telemetry())));
    }
    let (addr, _server) = telemetry::server::serve(args.metrics_listen, checks)
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_listen))?;
    eprintln!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
    if !args.report_every.is_zero() {
        let sagas: Vec<(String, SagaTelemetry)> = orchestrators
            .iter()
            .map(|o| (o.saga().name.clone(), o.telemetry()))
            .collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(args.report_every);
            tick.tick().await;
            loop {
                tick.tick().await;
                for (name, t) in &telemetry {
                    let s = t.snapshot();
                    eprintln!(
                        "[{name}] consumed {} succeeded {} retried {:?} dead-lettered {} produce-failures {}",
                        s.consumed, s.succeeded, &s.retried[..5], s.dead_lettered, s.produce_failures
                    );
                }
                for (name, t) in &sagas {
                    eprintln!("[saga {name}] {}", t.summary());
                }
            }
        });
    }
    runtime::run_until_signal(move |stop| {
        let mut tasks: Vec<runtime::Task> = Vec::new();
        for p in processors {
            let name = format!("pipeline {}", p.pipeline().name);
            tasks.push((name, p.run(stop.clone()).boxed()));
        }
        for o in orchestrators {
            let name = format!("saga {}", o.saga().name);
            tasks.push((name, o.run(stop.clone()).boxed()));
        }
        tasks
    })
    .await
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
        SchemasCommand::Deploy { compatibility } => {
            Box::pin(schemas(connect, SchemasCommand::Check)).await?;
            let register = SchemasCommand::Register {
                dry_run: false,
                compatibility,
            };
            Box::pin(schemas(connect, register)).await
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
    let codec = codec(connect)?;
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
