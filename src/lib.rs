//! orderflow: Kafka stream processing for order events.
//!
//! # Layout
//! Every module, in the order one order flows through them (`docs/architecture.md` follows an
//! order through the files):
//! - [`contracts`]: the event contracts, knowing nothing of consumers or pipelines.
//!   - [`contracts::catalog`]: the `.avsc` files of `avro/`, references expanded.
//!   - [`contracts::events`] and [`contracts::validate`]: typed events and their rules.
//!   - [`contracts::codec`]: Confluent wire format; validated encoding, classified decoding;
//!     [`contracts::writers`]: the writer schemas it decodes with, fetched once per id.
//!   - [`contracts::registry`], [`contracts::compatibility`], [`contracts::subjects`]: the
//!     registry's API, why a change breaks a rule, and topic/subject names.
//!   - [`contracts::status`]: an order's status ([`contracts::OrderStatus`]), as stored and served.
//! - [`pipeline`]: the pipeline files of `pipelines/`, validated (every problem at once).
//! - [`topology`]: every topic and group name (inputs, retry tiers, dead letters and their audit
//!   topic and replay group, a saga's group and state topic); nothing else formats one.
//! - [`kafka`]: everything asked of Kafka itself, a file per concern (its own `# Layout`):
//!   client settings, the [`kafka::Publisher`], topic administration, transactions, reading
//!   partitions to their end, and the failure headers of retry and dead-letter records.
//! - [`database`]: the PostgreSQL pool (timeouts, reconnection), the schema of every table and
//!   how long each keeps what it remembers ([`database::retention`]).
//! - [`intake`]: `POST /orders`: validated, remembered under its idempotency key, published, 202.
//! - [`saga`]: the order saga: its files, its pure state machine, and the orchestrator that
//!   commits each batch of inputs' commands, states and offsets in one transaction.
//! - [`runtime`]: runs a pipeline; its stages are listed in its own `# Stages` (engine and the
//!   input it reads, gate, lanes and offsets, work, route, transactions).
//! - [`steps`]: what a pipeline does with one event (route, HTTP call, custom handler).
//! - [`failure`]: the classification of every failure and the route it takes (retry now, a
//!   retry tier, the dead-letter topic).
//! - [`projection`]: the order-status read model, a custom handler of the `order-status`
//!   pipeline, read by `GET /orders/{id}`.
//! - [`dlq`]: the dead-letter tools: list, show, replay and discard, each audited, once.
//! - [`telemetry`]: one type per metric and log event, served on `/metrics` with readiness.
//! - [`simulate`]: the simulated downstream services (latency, failures) for the demo and tests.
//! - [`demo`]: the demo: orders through every pipeline and the saga, balanced at the end.
//! - [`app`]: the application builder: a connection and a pipelines folder become processors,
//!   orchestrators and the intake, run until a shutdown future resolves. The demo, the tests and
//!   the benchmarks build through it.
//! - [`allocator`]: mimalloc, the allocator of every binary, with transparent huge pages off.
//! - [`cli`]: the `orderflow` command: parses, prints, passes SIGTERM/Ctrl-C as the shutdown.
//!   Nothing depends on it.

pub mod allocator;
pub mod app;
pub mod cli;
pub mod contracts;
pub mod database;
pub mod demo;
pub mod dlq;
pub mod failure;
pub mod intake;
pub mod kafka;
pub mod pipeline;
pub mod projection;
pub mod runtime;
pub mod saga;
pub mod simulate;
pub mod steps;
pub mod telemetry;
pub mod topology;
