//! librdkafka settings shared by every producer and consumer, and the event publisher.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::contracts::{EncodeError, Envelope, Event, EventCodec};

/// Client security from the environment, so Kubernetes Secrets can feed it (as variables or
/// mounted files). Unset variables leave librdkafka's defaults (plaintext).
///
/// | variable | librdkafka setting |
/// |---|---|
/// | `ORDERFLOW_KAFKA_SECURITY_PROTOCOL` | `security.protocol` (plaintext, ssl, sasl_plaintext, sasl_ssl) |
/// | `ORDERFLOW_KAFKA_SASL_MECHANISM` | `sasl.mechanism` (default SCRAM-SHA-512 with SASL) |
/// | `ORDERFLOW_KAFKA_SASL_USERNAME` | `sasl.username` |
/// | `ORDERFLOW_KAFKA_SASL_PASSWORD` or `..._FILE` | `sasl.password` |
/// | `ORDERFLOW_KAFKA_SSL_CA_LOCATION` | `ssl.ca.location` |
/// | `ORDERFLOW_KAFKA_SSL_CERTIFICATE_LOCATION` | `ssl.certificate.location` |
/// | `ORDERFLOW_KAFKA_SSL_KEY_LOCATION` | `ssl.key.location` |
/// | `ORDERFLOW_KAFKA_SSL_KEY_PASSWORD` or `..._FILE` | `ssl.key.password` |
pub fn security_settings() -> Result<Vec<(&'static str, String)>, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let secret = |name: &str| -> Result<Option<String>, String> {
        if let Some(value) = var(name) {
            return Ok(Some(value));
        }
        let file_var = format!("{name}_FILE");
        match var(&file_var) {
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("{file_var}={path} cannot be read: {e}")),
            None => Ok(None),
        }
    };
    let mut settings = Vec::new();
    let protocol = var("ORDERFLOW_KAFKA_SECURITY_PROTOCOL").map(|p| p.to_lowercase());
    if let Some(protocol) = &protocol {
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()) {
            return Err(format!(
                "ORDERFLOW_KAFKA_SECURITY_PROTOCOL={protocol} is not plaintext, ssl, sasl_plaintext or sasl_ssl"
            ));
        }
        settings.push(("security.protocol", protocol.clone()));
        if protocol.starts_with("sasl") {
            settings.push((
                "sasl.mechanism",
                var("ORDERFLOW_KAFKA_SASL_MECHANISM").unwrap_or_else(|| "SCRAM-SHA-512".into()),
            ));
            let username = var("ORDERFLOW_KAFKA_SASL_USERNAME")
                .ok_or("ORDERFLOW_KAFKA_SASL_USERNAME is required with a SASL security protocol")?;
            let password = secret("ORDERFLOW_KAFKA_SASL_PASSWORD")?.ok_or(
                "ORDERFLOW_KAFKA_SASL_PASSWORD (or ORDERFLOW_KAFKA_SASL_PASSWORD_FILE) is required with a SASL security protocol",
            )?;
            settings.push(("sasl.username", username));
            settings.push(("sasl.password", password));
        }
    }
    for (name, key) in [
        ("ORDERFLOW_KAFKA_SSL_CA_LOCATION", "ssl.ca.location"),
        (
            "ORDERFLOW_KAFKA_SSL_CERTIFICATE_LOCATION",
            "ssl.certificate.location",
        ),
        ("ORDERFLOW_KAFKA_SSL_KEY_LOCATION", "ssl.key.location"),
    ] {
        if let Some(value) = var(name) {
            settings.push((key, value));
        }
    }
    if let Some(password) = secret("ORDERFLOW_KAFKA_SSL_KEY_PASSWORD")? {
        settings.push(("ssl.key.password", password));
    }
    Ok(settings)
}

/// A client config for `bootstrap_servers` with the security settings applied. Invalid
/// settings are reported by [`check_connection`], which every command runs first.
pub fn client_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap_servers);
    for (key, value) in security_settings().unwrap_or_default() {
        config.set(key, value);
    }
    config
}

/// Records the client's own error reports, so a failed connection can say why.
#[derive(Default)]
struct ErrorsSeen(std::sync::Mutex<Vec<String>>);

impl rdkafka::client::ClientContext for ErrorsSeen {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.0
            .lock()
            .expect("errors lock")
            .push(format!("{error}: {reason}"));
    }

    // Authentication and connection failures arrive as log lines (facility FAIL), not errors.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        if matches!(level, Emerg | Alert | Critical | Error | Warning) || fac == "FAIL" {
            self.0
                .lock()
                .expect("errors lock")
                .push(message.to_string());
        }
    }
}
impl rdkafka::consumer::ConsumerContext for ErrorsSeen {}

/// Asks the cluster for its metadata; on failure the error names the cause librdkafka saw
/// (e.g. `SASL authentication error: ... invalid credentials`), not just a timeout.
pub fn check_connection(bootstrap_servers: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    security_settings().map_err(|e| anyhow::anyhow!("Kafka client security settings: {e}"))?;
    let consumer: BaseConsumer<ErrorsSeen> = client_config(bootstrap_servers)
        .set("group.id", "orderflow-connection-check")
        .create_with_context(ErrorsSeen::default())?;
    match consumer.fetch_metadata(None, Duration::from_secs(10)) {
        Ok(_) => Ok(()),
        Err(e) => {
            // Error and log callbacks are served when the client is polled.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while consumer.context().0.lock().expect("errors lock").is_empty()
                && std::time::Instant::now() < deadline
            {
                let _ = consumer.poll(Duration::from_millis(100));
            }
            let seen = consumer.context().0.lock().expect("errors lock").clone();
            let cause = seen
                .last()
                .cloned()
                .unwrap_or_else(|| "no further detail from the client".into());
            anyhow::bail!("cannot use Kafka at {bootstrap_servers}: {e}; {cause}")
        }
    }
}

/// Settings for a producer whose acknowledged records are never lost or duplicated by retries.
pub fn producer_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = client_config(bootstrap_servers);
    config
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
    let mut config = client_config(bootstrap_servers);
    config
        .set("group.id", group_id)
        // A new group starts at the beginning, so nothing published before it is skipped.
        .set("auto.offset.reset", "earliest")
        // Offsets are committed in the background, but only those stored after processing.
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        // Notice topics created after subscribing (e.g. retry tiers) within 30 s, not 5 min.
        .set("topic.metadata.refresh.interval.ms", "30000")
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

/// More partitions than this in one topic is taken as a broken answer, not a size to follow.
pub const MAX_PARTITIONS: i32 = 10_000;

/// Grows `topic` to `partitions` partitions.
pub async fn grow_partitions(
    bootstrap_servers: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;

    anyhow::ensure!(
        (1..=MAX_PARTITIONS).contains(&partitions),
        "{partitions} partitions for {topic} is out of range"
    );
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let grow = NewPartitions::new(topic, partitions as usize);
    for result in admin.create_partitions(&[grow], &options).await? {
        if let Err((topic, code)) = result {
            anyhow::bail!("growing {topic} to {partitions} partitions failed: {code}");
        }
    }
    Ok(())
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

    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers).create()?;
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
    // A consumer that subscribes before a new topic shows in the metadata would not see it
    // until its next metadata refresh: wait until every topic is visible.
    let names: Vec<String> = topics.iter().map(|(t, _)| t.to_string()).collect();
    let bootstrap = bootstrap_servers.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = client_config(&bootstrap).create()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for name in &names {
            loop {
                let visible = client
                    .fetch_metadata(Some(name), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .first()
                            .map(|t| t.error().is_none() && !t.partitions().is_empty())
                    })
                    .unwrap_or(false);
                if visible {
                    break;
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "topic {name} was created but is not visible after 30 s"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    })
    .await??;
    Ok(())
}
