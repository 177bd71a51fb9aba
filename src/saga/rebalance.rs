//! The saga consumer's rebalance callbacks. Invariant: every revocation or assignment is noted
//! (`rebalanced`) before the loop takes its next input, so the loop drops the open batch and
//! every state in memory of partitions it may no longer own. It only notes: it never seeks,
//! commits or loads anything from inside librdkafka's callback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::kafka::{self, rebalance::Protocol};

/// Notes rebalances, so the loop forgets the states of partitions it may no longer own.
#[derive(Clone, Default)]
pub struct RebalanceContext {
    pub rebalanced: Arc<AtomicBool>,
    pub in_group: Arc<AtomicBool>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    /// The saga's consumer uses the `range` assignor (orchestrator.rs): eager.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        kafka::rebalance::apply(self, consumer, Protocol::Eager, err, tpl);
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            self.rebalanced.store(true, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalanced.store(true, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(_) => self.in_group.store(true, Ordering::SeqCst),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!("saga rebalance failed: {e}"),
        }
    }
}
