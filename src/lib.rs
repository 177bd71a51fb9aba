//! orderflow: Kafka stream processing for order events.
//!
//! # Layout
//! - [`contracts`]: the event contracts. Avro files of `avro/` ([`contracts::Catalog`]), the
//!   registry client, typed events and the Confluent wire-format codec. Knows nothing of
//!   consumers or pipelines.
//! - [`kafka`]: librdkafka settings shared by producers and consumers, and the
//!   [`kafka::Publisher`] that encodes, adds CloudEvents headers and waits for acks.
//! - [`cli`]: the `orderflow` command; uses only the modules above.

pub mod cli;
pub mod contracts;
pub mod kafka;
