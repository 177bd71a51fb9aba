//! Topic and subject names.
//!
//! Topics are named after the event type they carry (`order.created`), with an optional prefix
//! per environment (`staging.order.created`). Subjects follow one of Confluent's strategies.

use std::fmt;
use std::str::FromStr;

use super::catalog::EventSchema;

/// How a record's subject is derived (Confluent's `value.subject.name.strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SubjectStrategy {
    /// `<topic>-value`: one schema lineage per topic. The default, since each topic carries one
    /// event type.
    #[default]
    Topic,
    /// `<record full name>`: one lineage per record, shared by every topic carrying it.
    Record,
    /// `<topic>-<record full name>`: one lineage per record per topic.
    TopicRecord,
}

impl FromStr for SubjectStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "topic" | "TopicNameStrategy" => Ok(SubjectStrategy::Topic),
            "record" | "RecordNameStrategy" => Ok(SubjectStrategy::Record),
            "topic-record" | "TopicRecordNameStrategy" => Ok(SubjectStrategy::TopicRecord),
            other => Err(format!(
                "unknown subject strategy '{other}' (topic, record or topic-record)"
            )),
        }
    }
}

impl fmt::Display for SubjectStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubjectStrategy::Topic => "topic",
            SubjectStrategy::Record => "record",
            SubjectStrategy::TopicRecord => "topic-record",
        })
    }
}

/// Compatibility levels a subject can have, as the registry spells them.
pub const COMPATIBILITY_LEVELS: &[&str] = &[
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
];

/// Topic prefix and subject strategy, the two settings every name depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Naming {
    /// Prepended to every topic, e.g. `staging.`.
    pub topic_prefix: String,
    pub strategy: SubjectStrategy,
}

impl Naming {
    /// The topic an event type is published to.
    pub fn topic(&self, event_type: &str) -> String {
        format!("{}{event_type}", self.topic_prefix)
    }

    pub fn subject_for(&self, topic: &str, record_fullname: &str) -> String {
        match self.strategy {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::Record => record_fullname.to_string(),
            SubjectStrategy::TopicRecord => format!("{topic}-{record_fullname}"),
        }
    }

    /// The subject an event's schema is registered under.
    pub fn subject(&self, event: &EventSchema) -> String {
        self.subject_for(&self.topic(&event.event_type), &event.fullname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_name_subjects_like_confluent() {
        let mut naming = Naming {
            topic_prefix: "staging.".into(),
            strategy: "topic".parse().unwrap(),
        };
        let record = "orderflow.order.OrderCreated";
        assert_eq!(naming.topic("order.created"), "staging.order.created");
        assert_eq!(
            naming.subject_for("staging.order.created", record),
            "staging.order.created-value"
        );
        naming.strategy = "record".parse().unwrap();
        assert_eq!(naming.subject_for("t", record), record);
        naming.strategy = "TopicRecordNameStrategy".parse().unwrap();
        assert_eq!(
            naming.subject_for("t", record),
            "t-orderflow.order.OrderCreated"
        );
        assert!("bogus"
            .parse::<SubjectStrategy>()
            .unwrap_err()
            .contains("'bogus'"));
    }
}
