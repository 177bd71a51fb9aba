//! A librdkafka client context that reports statistics and rebalances to telemetry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;

use crate::telemetry::{ProcessorEvent, Telemetry};

/// librdkafka emits statistics this often (`statistics.interval.ms`).
pub const STATISTICS_INTERVAL_MS: &str = "5000";

#[derive(Clone)]
pub struct MeteredContext {
    telemetry: Telemetry,
    /// True while the consumer holds an assignment from its group.
    pub in_group: Arc<AtomicBool>,
}

impl MeteredContext {
    pub fn new(telemetry: Telemetry) -> MeteredContext {
        MeteredContext {
            telemetry,
            in_group: Arc::default(),
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
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(_) => self.in_group.store(true, Ordering::Relaxed),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                self.in_group.store(false, Ordering::Relaxed);
                tracing::warn!("rebalance failed: {e}");
            }
        }
    }
}
