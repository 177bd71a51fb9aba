//! Kafka transactions: the producer settings they need, the sequence that ends one (offsets
//! sent, then commit; abort on an abortable error) and how its errors are classified. Every
//! blocking librdkafka call runs on the blocking pool, never on the executor. What a
//! transaction holds (the batch) is its caller's.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::producer::{Producer, ProducerContext};
use rdkafka::TopicPartitionList;

/// Bound of each transactional call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    /// Aborted (or abortable): read its inputs again.
    #[error("{0}")]
    Abortable(String),
    /// The producer cannot go on (e.g. fenced by a newer instance): stop the processor.
    #[error("fatal transaction error: {0}")]
    Fatal(anyhow::Error),
}

impl TransactionError {
    pub fn from_kafka(error: rdkafka::error::KafkaError) -> TransactionError {
        match &error {
            rdkafka::error::KafkaError::Transaction(e) if e.is_fatal() => {
                TransactionError::Fatal(anyhow::Error::new(error))
            }
            _ => TransactionError::Abortable(error.to_string()),
        }
    }
}

/// Settings of a transactional producer under `transactional_id` (stable per instance: a
/// restarted instance fences its predecessor and aborts the transaction it left open, instead
/// of readers waiting for it to time out).
pub fn transactional<'a>(
    config: &'a mut ClientConfig,
    transactional_id: &str,
) -> &'a mut ClientConfig {
    config
        .set("transactional.id", transactional_id)
        // A zombie that never comes back blocks read_committed readers at most this long.
        .set("transaction.timeout.ms", "10000")
        // librdkafka requires a record's delivery timeout within the transaction's.
        .set("message.timeout.ms", "10000")
}

/// Registers the transactional id with the broker, fencing an earlier producer of that id and
/// aborting the transaction it left open. Once per producer, before its first transaction.
pub async fn init<C, P>(producer: &P) -> Result<(), TransactionError>
where
    C: ProducerContext,
    P: Producer<C> + Clone + Send + 'static,
{
    let producer = producer.clone();
    blocking(move || producer.init_transactions(CALL_TIMEOUT)).await
}

/// Begins a transaction.
pub async fn begin<C, P>(producer: &P) -> Result<(), TransactionError>
where
    C: ProducerContext,
    P: Producer<C> + Clone + Send + 'static,
{
    let producer = producer.clone();
    blocking(move || producer.begin_transaction()).await
}

/// Adds the consumer's `offsets` to the open transaction and commits it. No offsets: commits
/// the records alone (the group's metadata is needed only to add offsets).
pub async fn commit<C, P>(
    producer: &P,
    offsets: TopicPartitionList,
    metadata: Option<ConsumerGroupMetadata>,
) -> Result<(), TransactionError>
where
    C: ProducerContext,
    P: Producer<C> + Clone + Send + 'static,
{
    let producer = producer.clone();
    blocking(move || {
        if offsets.count() > 0 {
            let metadata = metadata.ok_or(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::State,
            ))?;
            producer.send_offsets_to_transaction(&offsets, &metadata, CALL_TIMEOUT)?;
        }
        producer.commit_transaction(CALL_TIMEOUT)
    })
    .await
}

/// Aborts the open transaction.
pub async fn abort<C, P>(producer: &P) -> Result<(), TransactionError>
where
    C: ProducerContext,
    P: Producer<C> + Clone + Send + 'static,
{
    let producer = producer.clone();
    blocking(move || producer.abort_transaction(CALL_TIMEOUT)).await
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking(
    call: impl FnOnce() -> Result<(), rdkafka::error::KafkaError> + Send + 'static,
) -> Result<(), TransactionError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(TransactionError::from_kafka),
        Err(e) => Err(TransactionError::Fatal(anyhow::anyhow!(
            "transaction call panicked: {e}"
        ))),
    }
}
