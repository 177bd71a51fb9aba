//! librdkafka settings shared by every producer and consumer, and the event publisher.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::contracts::{EncodeError, Envelope, Event, EventCodec};

/// Settings for a producer whose acknowledged records are never lost or duplicated by retries.
pub fn producer_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        // Acknowledged only once every in-sync replica has the record.
        .set("acks", "all")
        // Broker-side dedup of the producer's own retries; keeps per-partition order.
        .set("enable.idempotence", "true")
        // Give up (and report) after 30 s instead of retrying forever.
        .set("message.timeout.ms", "30000")
        // Small batching window: latency stays in milliseconds, throughput gains a lot.
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    config
}

/// Settings for a consumer that commits only what the caller has stored explicitly.
pub fn consumer_config(bootstrap_servers: &str, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", group_id)
        // A new group starts at the beginning, so nothing published before it is skipped.
        .set("auto.offset.reset", "earliest")
        // Offsets are committed in the background, but only those stored after processing.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        // A fetch waits at most 100 ms for data: a retry partition resumed at its due time is read
        // again promptly (librdkafka's default is 500 ms).
        .set("fetch.wait.max.ms", "100")
        // Rebalances move partitions one at a time instead of stopping the whole group.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000");
    config
}

pub fn consumer(bootstrap_servers: &str, group_id: &str) -> anyhow::Result<StreamConsumer> {
    Ok(consumer_config(bootstrap_servers, group_id).create()?)
}

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
        Ok(Publisher {
            producer: producer_config(bootstrap_servers).create()?,
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

/// Creates each topic that does not exist yet (an existing one is left as it is).
pub async fn ensure_topics(
    bootstrap_servers: &str,
    topics: &[(&str, i32)],
    replication: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(replication))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic} failed: {code}"),
        }
    }
    Ok(())
}
