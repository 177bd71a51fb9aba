//! Everything orderflow asks of Kafka itself, one file per concern. Nothing here knows a
//! pipeline, a saga or a topic's name ([`crate::topology`] names them).
//!
//! # Layout
//! - [`client`]: librdkafka settings (security, idempotent producers, consumers committing only
//!   what was stored) and the connection check.
//! - [`publisher`]: the [`Publisher`] of typed events with CloudEvents headers, waiting for acks.
//! - [`admin`]: creating missing topics with their partition counts, growing partitions.
//! - [`transactions`]: transactional producer settings, the begin/commit/abort sequence and the
//!   classification of its errors.
//! - [`read`]: a reader that commits nothing, a topic's partitions, reading partitions up to
//!   their end (the dead-letter tools and the monitor).
//! - [`headers`]: the failure context on retry and dead-letter records: one writer, one reader.
//! - [`rebalance`]: applying a rebalance with the protocol the consumer names (never asking
//!   librdkafka, which can hang once the consumer is closing).

pub mod admin;
pub mod client;
pub mod headers;
pub mod publisher;
pub mod read;
pub mod rebalance;
pub mod transactions;

pub use admin::{ensure_topics, grow_partitions, MAX_PARTITIONS};
pub use client::{
    check_connection, client_config, consumer, consumer_config, producer_config, security_settings,
};
pub use publisher::{cloudevents_headers, Delivered, PublishError, Publisher};
