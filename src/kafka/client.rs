//! Kafka clients: librdkafka settings shared by every producer and consumer (security from the
//! environment, idempotent producers, consumers that commit only what was stored), and the
//! connection check every command runs first. Creates no topic and writes no record.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;

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
        // librdkafka's read-ahead, bounded: its defaults queue up to 100,000 records (64 MiB)
        // ahead of the application, and each queued record costs far more than its bytes. A
        // processor holds its own in-flight budget besides; on a backlog it went past its pod's
        // 256 MiB with the defaults (figures in the message of the commit that set these).
        .set("queued.min.messages", "10000")
        .set("queued.max.messages.kbytes", "16384")
        // Past those bounds, look again after 10 ms rather than 1 s: at 1 s the queue ran dry
        // between looks and the fan-out benchmark lost half its throughput.
        .set("fetch.queue.backoff.ms", "10")
        // Rebalances move partitions one at a time instead of stopping the whole group.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000");
    config
}

pub fn consumer(bootstrap_servers: &str, group_id: &str) -> anyhow::Result<StreamConsumer> {
    Ok(consumer_config(bootstrap_servers, group_id).create()?)
}
