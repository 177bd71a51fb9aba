//! The application builder: what a connection ([`Connect`]) and a pipelines folder become:
//! the codec, the pipelines and sagas, processors and orchestrators with their topics created,
//! the intake, and [`run`], which runs them until a shutdown future resolves.
//!
//! The command line ([`crate::cli`]), the demo, the tests and the benchmarks all build through
//! here. It must not parse arguments, print or wait for signals: shutdown is a future passed in,
//! so whoever starts something can stop it (the CLI passes SIGTERM/Ctrl-C).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

use crate::contracts::{Catalog, EventCodec, Naming, SubjectStrategy};
use crate::intake::{self, Intake};
use crate::kafka::{self, Publisher};
use crate::pipeline::{self, Pipeline};
use crate::projection::OrderStatusHandler;
use crate::runtime::dedup::DedupStore;
use crate::runtime::{self, Processor};
use crate::saga::{self, Orchestrator, Saga};
use crate::steps;
use crate::telemetry::server::{Readiness, ReadinessChecks};

/// Where the broker, the registry, the database and the schemas are. The same struct is the
/// command line's global flags (clap `Args`; flags win over environment variables), so the CLI
/// and the builder share one description of a connection.
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

/// The pipelines of `dir`, every problem reported at once.
pub fn load_pipelines(dir: &Path) -> anyhow::Result<Vec<Pipeline>> {
    Ok(pipeline::load_dir(dir, &steps::HANDLER_NAMES)?)
}

/// The pipelines of `dir` and the sagas of `dir/sagas`, every problem of both reported at once.
pub fn load_pipelines_and_sagas(dir: &Path) -> anyhow::Result<(Vec<Pipeline>, Vec<Saga>)> {
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
) -> anyhow::Result<Vec<Orchestrator>> {
    let mut out = Vec::new();
    for s in sagas {
        let name = s.name.clone();
        let o = Orchestrator::new(
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

/// The event schemas of `connect.schemas_dir`.
pub fn load_catalog(connect: &Connect) -> anyhow::Result<Catalog> {
    Ok(Catalog::load(&connect.schemas_dir)?)
}

/// Builds a processor for each pipeline and creates the topics they need. With `dedup`, they
/// share one connection to the dedup store, which must be reachable.
pub async fn processors(
    connect: &Connect,
    pipelines: Vec<Pipeline>,
    dedup: bool,
) -> anyhow::Result<Vec<Processor>> {
    check_broker(connect).await?;
    let dedup = if dedup {
        let store = DedupStore::connect(&connect.database_url).await.map_err(|e| {
            anyhow::anyhow!("{e}; start it with scripts/stack up, point --database-url at yours, or run with --no-dedup")
        })?;
        // A pipeline's own window may only be shorter than the one its partitions follow.
        pipeline::check_dedup_windows(
            &pipelines,
            crate::database::retention::DEDUP_SETTING,
            store.retention().window,
        )?;
        Some(Arc::new(store))
    } else {
        tracing::warn!("deduplication is off: a repeated event id is handled again");
        None
    };
    let codec = codec(connect)?;
    let handlers = handlers(connect);
    let mut processors = Vec::new();
    for p in pipelines {
        let processor = Processor::new(
            p,
            connect.naming(),
            &connect.bootstrap_servers,
            codec.clone(),
            dedup.clone(),
            &handlers,
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

/// The custom handlers pipelines may name, each built with what it needs from the connection.
pub fn handlers(connect: &Connect) -> steps::Handlers {
    let database_url = connect.database_url.clone();
    steps::Handlers::default().register(steps::ORDER_STATUS, move || {
        Arc::new(OrderStatusHandler::new(&database_url))
    })
}

/// Fails, naming the cause librdkafka saw, when the broker cannot be reached: whatever needs the
/// broker checks it first, so a wrong address or credentials fail at once and clearly.
pub async fn check_broker(connect: &Connect) -> anyhow::Result<()> {
    let bootstrap = connect.bootstrap_servers.clone();
    tokio::task::spawn_blocking(move || kafka::check_connection(&bootstrap)).await?
}

/// The order intake: publishes `order.created` with the intake's producer settings and keeps
/// its idempotency keys in the connection's database. Returned with the topic it publishes to.
pub async fn intake(connect: &Connect, codec: Arc<EventCodec>) -> anyhow::Result<(Intake, String)> {
    let publisher =
        Publisher::with_settings(&connect.bootstrap_servers, codec, intake::PRODUCER_SETTINGS)?;
    let topic = connect.naming().topic("order.created");
    let intake = Intake::new(publisher, topic.clone(), &connect.database_url).await?;
    Ok((intake, topic))
}

/// What `/readyz` asks: every processor (by pipeline name) and every orchestrator (`saga <name>`).
pub fn readiness_checks(
    processors: &[Processor],
    orchestrators: &[Orchestrator],
) -> ReadinessChecks {
    let mut checks: ReadinessChecks = processors
        .iter()
        .map(|p| {
            (
                p.pipeline().name.clone(),
                Arc::new(p.telemetry()) as Arc<dyn Readiness>,
            )
        })
        .collect();
    for o in orchestrators {
        checks.push((format!("saga {}", o.saga().name), Arc::new(o.telemetry())));
    }
    checks
}

/// A long-running part of the process (a processor, a saga orchestrator), by name.
type Task = (String, BoxFuture<'static, anyhow::Result<()>>);

/// Runs `processors` and `orchestrators` until `shutdown` resolves (then each finishes the
/// records in hand, flushes and commits), or until one fails (then the others are stopped too).
pub async fn run(
    processors: Vec<Processor>,
    orchestrators: Vec<Orchestrator>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop, stopped) = watch::channel(false);
    let mut tasks: Vec<Task> = Vec::new();
    for p in processors {
        let name = format!("pipeline {}", p.pipeline().name);
        tasks.push((name, p.run(stopped.clone()).boxed()));
    }
    for o in orchestrators {
        let name = format!("saga {}", o.saga().name);
        tasks.push((name, o.run(stopped.clone()).boxed()));
    }
    let mut running = tokio::task::JoinSet::new();
    for (name, task) in tasks {
        running.spawn(async move { (name, task.await) });
    }
    tokio::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown, if !*stop.borrow() => {
                tracing::info!("shutdown requested");
                let _ = stop.send(true);
            }
            joined = running.join_next() => match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((name, Err(e)))) => {
                    tracing::error!(task = %name, "failed: {e:#}");
                    let _ = stop.send(true);
                    result = Err(e.context(name));
                }
                Some(Err(e)) => {
                    let _ = stop.send(true);
                    result = Err(anyhow::anyhow!("a task panicked: {e}"));
                }
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_handler_name_a_pipeline_may_use_is_registered() {
        let registered = handlers(&Connect::local(""));
        assert_eq!(registered.names(), steps::HANDLER_NAMES);
    }
}
