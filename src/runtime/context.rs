//! A librdkafka client context that reports statistics to telemetry and rebalances to the
//! engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;

use crate::kafka::{self, rebalance::Protocol};
use crate::telemetry::{ProcessorEvent, Telemetry};

/// librdkafka emits statistics this often (`statistics.interval.ms`).
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// Partitions taken from or given to this consumer, for the engine.
#[derive(Debug)]
pub enum RebalanceEvent {
    Revoked(Vec<(Arc<str>, i32)>),
    Assigned(Vec<(Arc<str>, i32)>),
}

#[derive(Clone)]
pub struct MeteredContext {
    telemetry: Telemetry,
    /// True while the consumer holds an assignment from its group.
    pub in_group: Arc<AtomicBool>,
    rebalances: Option<mpsc::UnboundedSender<RebalanceEvent>>,
}

impl MeteredContext {
    pub fn new(telemetry: Telemetry) -> MeteredContext {
        MeteredContext {
            telemetry,
            in_group: Arc::default(),
            rebalances: None,
        }
    }

    /// A context for a consumer whose rebalances go to `to` (sent from librdkafka's callback,
    /// before any record of a new assignment is delivered).
    pub fn reporting_rebalances(&self, to: mpsc::UnboundedSender<RebalanceEvent>) -> Self {
        MeteredContext {
            rebalances: Some(to),
            ..self.clone()
        }
    }

    fn report(
        &self,
        event: impl FnOnce(Vec<(Arc<str>, i32)>) -> RebalanceEvent,
        tpl: &TopicPartitionList,
    ) {
        if let Some(to) = &self.rebalances {
            let tps = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().into(), e.partition()))
                .collect();
            let _ = to.send(event(tps));
        }
    }
}

impl ClientContext for MeteredContext {
    fn stats(&self, statistics: Statistics) {
        if statistics.client_type == "producer" {
            let rtts: Vec<i64> = statistics
                .brokers
                .values()
                .filter_map(|b| b.rtt.as_ref().map(|w| w.avg))
                .filter(|avg| *avg > 0)
                .collect();
            let rtt_us = if rtts.is_empty() {
                0
            } else {
                rtts.iter().sum::<i64>() / rtts.len() as i64
            };
            self.telemetry.emit(ProcessorEvent::ProducerStats {
                queue_messages: statistics.msg_cnt as i64,
                broker_rtt_seconds: rtt_us as f64 / 1e6,
            });
            return;
        }
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal UA partition; a negative lag means not known yet.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.telemetry.emit(ProcessorEvent::ConsumerLag {
                        topic,
                        partition: *partition,
                        lag: p.consumer_lag,
                    });
                }
            }
        }
    }
}

impl ConsumerContext for MeteredContext {
    /// Processors use the `cooperative-sticky` assignor (`kafka::consumer_config`).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        kafka::rebalance::apply(self, consumer, Protocol::Cooperative, err, tpl);
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.report(RebalanceEvent::Revoked, tpl);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.in_group.store(true, Ordering::Relaxed);
                self.report(RebalanceEvent::Assigned, tpl);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                self.in_group.store(false, Ordering::Relaxed);
                tracing::warn!("rebalance failed: {e}");
            }
        }
    }
}
