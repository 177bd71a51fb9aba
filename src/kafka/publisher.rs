//! The event publisher: validates and encodes a typed event, writes its envelope as CloudEvents
//! binary-mode headers, and answers once Kafka has acknowledged the record.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::client::producer_config;
use crate::contracts::{EncodeError, Envelope, Event, EventCodec};

/// Where an acknowledged record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("kafka did not acknowledge {event_type} {event_id} on {topic}: {source}")]
    Kafka {
        topic: String,
        event_type: &'static str,
        event_id: uuid::Uuid,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

/// The envelope as CloudEvents Kafka binary-mode headers, so tools can route and trace an
/// event without decoding its Avro body.
pub fn cloudevents_headers(envelope: &Envelope) -> OwnedHeaders {
    let event_id = envelope.event_id.to_string();
    let correlation_id = envelope.correlation_id.to_string();
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(envelope.occurred_at.max(0) as u64),
    )
    .to_string();
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
        .insert(Header {
            key: "ce_id",
            value: Some(&event_id),
        })
        .insert(Header {
            key: "ce_type",
            value: Some(&envelope.event_type),
        })
        .insert(Header {
            key: "ce_source",
            value: Some(&envelope.source),
        })
        .insert(Header {
            key: "ce_time",
            value: Some(&time),
        })
        .insert(Header {
            key: "ce_correlationid",
            value: Some(&correlation_id),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/avro"),
        });
    if let Some(causation_id) = envelope.causation_id {
        let causation_id = causation_id.to_string();
        headers = headers.insert(Header {
            key: "ce_causationid",
            value: Some(&causation_id),
        });
    }
    headers
}

/// Publishes typed events: encodes with the registry schema, writes the envelope as CloudEvents
/// binary-mode headers, and returns once Kafka has acknowledged the record.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    codec: Arc<EventCodec>,
}

impl Publisher {
    pub fn new(bootstrap_servers: &str, codec: Arc<EventCodec>) -> anyhow::Result<Publisher> {
        Self::with_settings(bootstrap_servers, codec, &[])
    }

    /// A publisher whose producer has these librdkafka settings on top of the defaults.
    pub fn with_settings(
        bootstrap_servers: &str,
        codec: Arc<EventCodec>,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<Publisher> {
        let mut config = producer_config(bootstrap_servers);
        for (key, value) in settings {
            config.set(*key, *value);
        }
        Ok(Publisher {
            producer: config.create()?,
            codec,
        })
    }

    pub async fn publish<E: Event>(
        &self,
        topic: &str,
        event: &E,
    ) -> Result<Delivered, PublishError> {
        let payload = self.codec.encode(topic, event).await?;
        let key = event.key();
        let envelope = event.envelope();
        let headers = cloudevents_headers(envelope);
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(delivery) => Ok(Delivered {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((source, _)) => Err(PublishError::Kafka {
                topic: topic.to_string(),
                event_type: E::EVENT_TYPE,
                event_id: envelope.event_id,
                source,
            }),
        }
    }
}
