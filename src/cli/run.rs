//! The long-running commands: `run` (pipelines and sagas, with metrics and a periodic
//! report), `serve` (the intake API), `simulate` (the downstreams) and `demo`. Each stops on
//! SIGTERM or Ctrl-C ([`super::shutdown_signal`]).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use super::{shutdown_signal, PipelinesDir};
use crate::app::{self, Connect};
use crate::demo;
use crate::pipeline::Pipeline;
use crate::saga::Saga;
use crate::simulate::{self, Behaviour};
use crate::telemetry::saga::SagaTelemetry;
use crate::telemetry::{self, Telemetry};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pipelines and sagas (of `<pipelines-dir>`/sagas) to run, by name.
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

pub(super) async fn run_pipelines(
    connect: &Connect,
    dir: &PipelinesDir,
    args: RunArgs,
) -> anyhow::Result<()> {
    let (all, all_sagas) = app::load_pipelines_and_sagas(&dir.pipelines_dir)?;
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
        app::processors(connect, chosen, !args.no_dedup).await?
    };
    let orchestrators = if sagas.is_empty() {
        Vec::new()
    } else {
        app::check_broker(connect).await?;
        app::orchestrators(connect, sagas, app::codec(connect)?).await?
    };
    let telemetry: Vec<(String, Telemetry)> = processors
        .iter()
        .map(|p| (p.pipeline().name.clone(), p.telemetry()))
        .collect();
    let checks = app::readiness_checks(&processors, &orchestrators);
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
    app::run(processors, orchestrators, shutdown_signal()).await
}

pub(super) async fn serve(connect: &Connect, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    app::check_broker(connect).await?;
    let (intake, topic) = app::intake(connect, app::codec(connect)?).await?;
    let (addr, task) = crate::intake::serve(listen, intake).await?;
    eprintln!("order intake on http://{addr}: POST /orders (to {topic}), GET /orders/{{id}}");
    tokio::select! {
        _ = shutdown_signal() => Ok(()),
        _ = task => bail!("the intake server stopped"),
    }
}

pub(super) async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let (addr, _, task) = simulate::serve(args.listen, args.faults.behaviour()).await?;
    eprintln!("simulated services on http://{addr}: POST /payments, /refunds, /reservations, /reservations/release, /shipments, /notifications");
    tokio::select! {
        _ = shutdown_signal() => Ok(()),
        _ = task => bail!("the simulated services stopped"),
    }
}

pub(super) async fn demo(
    connect: &Connect,
    dir: &PipelinesDir,
    args: DemoArgs,
) -> anyhow::Result<()> {
    let settings = demo::Settings {
        orders: args.orders,
        rate: args.rate,
        dedup: !args.no_dedup,
        timeout: args.timeout,
        downstreams: args.faults.behaviour(),
    };
    demo::run(connect, &dir.pipelines_dir, settings).await
}
