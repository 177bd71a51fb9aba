//! Every topic and consumer-group name orderflow derives, in one place: a pipeline's group, its
//! retry tiers and dead-letter topic per input, the dead-letter audit topic and replay group, a
//! saga's group and state topic, and the instance-scoped transactional ids. Nothing else
//! formats such a name, so a name written by one part is the name read by another.
//!
//! Event topics (an event type with the topic prefix) are [`Naming::topic`], next to the
//! subjects derived from them. This module only names things: it creates nothing (topics are
//! created by [`crate::kafka`]) and knows no pipeline or saga file.

use crate::contracts::Naming;

/// The topic an event type is published to: pipeline inputs and outputs, saga commands and
/// replies.
pub fn event_topic(naming: &Naming, event_type: &str) -> String {
    naming.topic(event_type)
}

/// A consumer group (a pipeline's or a saga's `group`), with the topic prefix, so two
/// environments sharing a cluster never share a group.
pub fn group_id(naming: &Naming, group: &str) -> String {
    format!("{}{group}", naming.topic_prefix)
}

/// `T.G.retry.N`: retry tier `tier` (from 1) of group `G` for the (prefixed) input topic `T`.
pub fn retry_topic(input_topic: &str, group: &str, tier: usize) -> String {
    format!("{input_topic}.{group}.retry.{tier}")
}

/// `T.G.dlq`: the dead-letter topic of group `G` for the (prefixed) input topic `T`.
pub fn dlq_topic(input_topic: &str, group: &str) -> String {
    format!("{input_topic}.{group}.dlq")
}

/// `<dlq>.audit`: the record of every replay and discard of a dead-letter topic.
pub fn dlq_audit_topic(dlq_topic: &str) -> String {
    format!("{dlq_topic}.audit")
}

/// The consumer group whose committed offsets mark a processor group's dead letters as
/// replayed or discarded (`<group id>.dlq-replay`).
pub fn dlq_replay_group(group_id: &str) -> String {
    format!("{group_id}.dlq-replay")
}

/// `<prefix>saga.<name>.state`: the compacted topic holding each order's saga state.
pub fn saga_state_topic(naming: &Naming, saga: &str) -> String {
    format!("{}saga.{saga}.state", naming.topic_prefix)
}

/// The transactional id of every replay or discard of dead-letter topic `dlq`.
pub fn dlq_replay_transactional_id(dlq: &str) -> String {
    format!("orderflow-dlq-replay.{dlq}")
}

/// A producer's `transactional.id`: its group's id and this instance's name, so a restarted
/// instance fences its predecessor while two live instances never share an id.
pub fn transactional_id(group_id: &str, instance: &str) -> String {
    format!("{group_id}.{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::SubjectStrategy;

    #[test]
    fn names_follow_the_documented_shapes() {
        let naming = Naming {
            topic_prefix: "stage.".into(),
            strategy: SubjectStrategy::Topic,
        };
        let input = event_topic(&naming, "order.created");
        assert_eq!(input, "stage.order.created");
        assert_eq!(group_id(&naming, "payment"), "stage.payment");
        assert_eq!(
            retry_topic(&input, "payment", 2),
            "stage.order.created.payment.retry.2"
        );
        let dlq = dlq_topic(&input, "payment");
        assert_eq!(dlq, "stage.order.created.payment.dlq");
        assert_eq!(
            dlq_audit_topic(&dlq),
            "stage.order.created.payment.dlq.audit"
        );
        assert_eq!(
            dlq_replay_group("stage.payment"),
            "stage.payment.dlq-replay"
        );
        assert_eq!(saga_state_topic(&naming, "order"), "stage.saga.order.state");
        assert_eq!(
            transactional_id("stage.payment", "pod-0"),
            "stage.payment.pod-0"
        );
    }
}
