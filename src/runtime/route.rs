//! Routing of outcomes: how an input ended, and the record a failure becomes (the next retry
//! tier, or the dead-letter topic) with its failure context in headers.
//!
//! Invariant: the tier is decided by `failure::route` (the caller passes its answer), and a record is addressed only to a
//! partition its target topic has; anything else is left to the partitioner (by key). Pure: it
//! builds records, it does not write them.

use std::collections::HashMap;
use std::sync::Arc;

use rdkafka::message::Message;

use super::input::Input;
use super::writer::OutRecord;
use crate::failure::{ErrorClass, Failure, Route};
use crate::kafka::headers::{self, truncate, FailureContext, MAX_ERROR_MESSAGE};
use crate::pipeline::Pipeline;

/// How one input ended, for telemetry once its records are written.
#[derive(Debug)]
pub enum Ending {
    Succeeded {
        /// Topic of each record written.
        outputs: Vec<Arc<str>>,
        event_id: uuid::Uuid,
        occurred_at_ms: i64,
    },
    Duplicate {
        event_id: uuid::Uuid,
    },
    Retried {
        tier: usize,
        class: ErrorClass,
        kind: &'static str,
        message: String,
    },
    DeadLettered {
        topic: String,
        class: ErrorClass,
        kind: &'static str,
        message: String,
    },
}

impl Ending {
    /// The event id to mark as handled once the input's records are written.
    pub fn handled_event(&self) -> Option<uuid::Uuid> {
        match self {
            Ending::Succeeded { event_id, .. } => Some(*event_id),
            _ => None,
        }
    }
}

/// What a failed input becomes: its record for the next retry tier or the dead-letter topic.
pub struct FailureRouting<'a> {
    pub pipeline: &'a Pipeline,
    pub group_id: &'a str,
    /// Partition count of each topic the pipeline writes failures to.
    pub partitions: &'a HashMap<String, i32>,
    /// Now, ms since the epoch.
    pub now_ms: i64,
}

impl FailureRouting<'_> {
    pub fn record(
        &self,
        message: &Input,
        input_topic: &str,
        previous: Option<FailureContext>,
        class: ErrorClass,
        failure: &Failure,
        route: Route,
    ) -> (OutRecord, Ending) {
        let now_ms = self.now_ms;
        let previous = previous.unwrap_or_else(|| FailureContext {
            attempt: 0,
            original_topic: message.topic().to_string(),
            original_partition: message.partition(),
            original_offset: message.offset(),
            original_timestamp: message.timestamp().to_millis(),
            first_failure_ms: now_ms,
            tier: 0,
            due_ms: None,
        });
        let tiers = &self.pipeline.retry.tiers;
        let (topic, tier, due_ms) = match route {
            Route::Tier(tier) if (1..=tiers.len()).contains(&tier) => (
                self.pipeline.retry_topic(input_topic, tier),
                tier,
                Some(now_ms.saturating_add(tiers[tier - 1].as_millis() as i64)),
            ),
            _ => (self.pipeline.dlq_topic(input_topic), previous.tier, None),
        };
        let context = FailureContext {
            attempt: previous.attempt.saturating_add(1),
            tier,
            due_ms,
            ..previous
        };
        let text = truncate(failure.to_string(), MAX_ERROR_MESSAGE);
        let partition = Some(context.original_partition)
            .filter(|p| *p >= 0 && self.partitions.get(&topic).is_some_and(|count| p < count));
        let record = OutRecord {
            headers: Some(headers::with_failure(
                message.headers(),
                &context,
                self.group_id,
                class,
                failure.kind(),
                &text,
            )),
            key: message.key().map(Into::into),
            payload: message.payload().map(Into::into),
            partition,
            topic: topic.as_str().into(),
        };
        let ending = if due_ms.is_some() {
            Ending::Retried {
                tier,
                class,
                kind: failure.kind(),
                message: text,
            }
        } else {
            Ending::DeadLettered {
                topic,
                class,
                kind: failure.kind(),
                message: text,
            }
        };
        (record, ending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn pipeline() -> Pipeline {
        let text = "name: p\ngroup: g\ninputs: [order.created]\nstep: {route: {to: [x]}}\nretry: {tiers: [1s, 2s]}\n";
        crate::pipeline::parse(std::path::Path::new("p.yaml"), text, &[]).unwrap()
    }

    fn message(partition: i32) -> Input {
        Input::new(
            "in",
            partition,
            42,
            Timestamp::CreateTime(5),
            Some(b"key"),
            Some(b"payload"),
            None,
        )
    }

    #[test]
    fn service_failures_climb_the_tiers_then_dead_letter() {
        let p = pipeline();
        let partitions: HashMap<String, i32> = [
            (p.retry_topic("in", 1), 3),
            (p.retry_topic("in", 2), 3),
            (p.dlq_topic("in"), 3),
        ]
        .into();
        let routing = FailureRouting {
            pipeline: &p,
            group_id: "g",
            partitions: &partitions,
            now_ms: 4000,
        };
        let failure = Failure::Dependency("down".into());
        let (first, ending) = routing.record(
            &message(1),
            "in",
            None,
            ErrorClass::Service,
            &failure,
            Route::Tier(1),
        );
        assert_eq!(&*first.topic, p.retry_topic("in", 1));
        assert_eq!(first.partition, Some(1));
        assert!(matches!(ending, Ending::Retried { tier: 1, .. }));
        let context = FailureContext {
            tier: 2,
            attempt: 2,
            original_topic: "in".into(),
            original_partition: 1,
            original_offset: 42,
            original_timestamp: Some(5),
            first_failure_ms: 1000,
            due_ms: Some(3000),
        };
        let (last, ending) = routing.record(
            &message(1),
            "in",
            Some(context),
            ErrorClass::Service,
            &failure,
            Route::DeadLetter,
        );
        assert_eq!(&*last.topic, p.dlq_topic("in"));
        assert!(matches!(ending, Ending::DeadLettered { .. }));
    }

    #[test]
    fn a_partition_the_target_lacks_is_left_to_the_partitioner() {
        let p = pipeline();
        let partitions: HashMap<String, i32> = [(p.dlq_topic("in"), 2)].into();
        let routing = FailureRouting {
            pipeline: &p,
            group_id: "g",
            partitions: &partitions,
            now_ms: 4000,
        };
        let failure = Failure::BusinessRule("no".into());
        let (record, _) = routing.record(
            &message(5),
            "in",
            None,
            ErrorClass::Permanent,
            &failure,
            Route::DeadLetter,
        );
        assert_eq!(&*record.topic, p.dlq_topic("in"));
        assert_eq!(record.partition, None);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let text = "é".repeat(MAX_ERROR_MESSAGE);
        let cut = truncate(text, MAX_ERROR_MESSAGE);
        assert!(cut.len() <= MAX_ERROR_MESSAGE && cut.chars().all(|c| c == 'é'));
    }
}
