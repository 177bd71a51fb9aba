//! Writing records: an owned record to write, and sending it without blocking the executor.
//!
//! Invariant: a full producer queue is waited out asynchronously (the task yields, the engine
//! keeps running and its in-flight budget pauses reading); no thread ever sleeps here. A
//! record's write is reported as acknowledged only on the broker's ack.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::context::MeteredContext;
use rdkafka::client::ClientContext;

/// How long to wait before offering a record to a full producer queue again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(2);

/// A record to write, owned.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

impl OutRecord {
    pub fn future_record(&self) -> FutureRecord<'_, Vec<u8>, Vec<u8>> {
        let mut record = FutureRecord::to(&self.topic).headers(self.headers.clone());
        if let Some(key) = &self.key {
            record = record.key(key);
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload);
        }
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        record
    }
}

impl OutRecord {
    /// An event as a record of its type's topic: keyed by its aggregate, encoded with the
    /// registry's schema, its envelope as CloudEvents headers.
    pub async fn event(
        event: &crate::contracts::AnyEvent,
        codec: &crate::contracts::EventCodec,
        naming: &crate::contracts::Naming,
    ) -> Result<OutRecord, crate::contracts::EncodeError> {
        let topic = naming.topic(event.event_type());
        let payload = event.encode(codec, &topic).await?;
        Ok(OutRecord {
            headers: crate::kafka::cloudevents_headers(event.envelope()),
            key: Some(event.key().into_bytes()),
            payload: Some(payload),
            partition: None,
            topic,
        })
    }
}

/// Copies every header of a record.
pub fn copy_headers(headers: Option<&rdkafka::message::OwnedHeaders>) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(headers) = headers {
        for h in headers.iter() {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    out
}

/// Offers a record to the producer, waiting while its queue is full; the returned delivery
/// resolves with the ack. Errors other than a full queue are returned at once.
pub async fn enqueue<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    record: &OutRecord,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record.future_record()) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Writes every record and waits for all their acks; returns the records refused, each with
/// why.
pub async fn write_all(
    producer: &FutureProducer<MeteredContext>,
    records: Vec<OutRecord>,
) -> Vec<(OutRecord, String)> {
    let mut deliveries = Vec::with_capacity(records.len());
    let mut refused = Vec::new();
    for record in records {
        match enqueue(producer, &record).await {
            Ok(delivery) => deliveries.push((record, delivery)),
            Err(e) => refused.push((record, e.to_string())),
        }
    }
    let (records, futures): (Vec<_>, Vec<_>) = deliveries.into_iter().unzip();
    for (record, ack) in records.into_iter().zip(join_all(futures).await) {
        match ack {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => refused.push((record, e.to_string())),
            Err(_) => refused.push((record, "the producer went away".to_string())),
        }
    }
    refused
}
