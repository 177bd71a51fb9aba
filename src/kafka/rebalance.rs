//! Applying a rebalance inside librdkafka's callback. Invariant: it never asks librdkafka which
//! protocol is in use. rust-rdkafka's default callback calls `rd_kafka_rebalance_protocol`,
//! which can wait forever once the consumer is closing (librdkafka #4041): a test process hung
//! that way dropping the saga's consumer at shutdown. Each consumer names the protocol its
//! assignor implies instead, and its context's `pre_rebalance`/`post_rebalance` run around the
//! change as before.

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::TopicPartitionList;

/// How a consumer's assignor hands partitions over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `range`, `roundrobin`: every partition is revoked, then the new set assigned.
    Eager,
    /// `cooperative-sticky`: only the partitions that move are revoked or added.
    Cooperative,
}

/// What rust-rdkafka's default `ConsumerContext::rebalance` does, with `protocol` given.
pub fn apply<C: ConsumerContext>(
    context: &C,
    consumer: &BaseConsumer<C>,
    protocol: Protocol,
    err: RDKafkaRespErr,
    tpl: &mut TopicPartitionList,
) {
    let rebalance = match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
        other => Rebalance::Error(KafkaError::Rebalance(RDKafkaErrorCode::from(other))),
    };
    context.pre_rebalance(consumer, &rebalance);
    let assign = matches!(rebalance, Rebalance::Assign(_));
    let applied = match (protocol, assign) {
        (Protocol::Cooperative, true) => consumer.incremental_assign(tpl),
        (Protocol::Cooperative, false) => consumer.incremental_unassign(tpl),
        (Protocol::Eager, true) => consumer.assign(tpl),
        (Protocol::Eager, false) => consumer.unassign(),
    };
    if let Err(e) = applied {
        tracing::warn!(?protocol, assign, "applying a rebalance failed: {e}");
    }
    context.post_rebalance(consumer, &rebalance);
}
