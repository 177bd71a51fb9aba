//! Writing records: an owned record to write, and sending it without blocking the executor.
//!
//! Invariant: a full producer queue is waited out asynchronously (the task yields, the engine
//! keeps running and its in-flight budget pauses reading); no thread ever sleeps here. A
//! record's write is reported as acknowledged only on the broker's ack.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::context::MeteredContext;
use rdkafka::client::ClientContext;

/// How long to wait before offering a record to a full producer queue again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(2);

/// A record to write, owned. Key and payload are shared, not copied, between the records one
/// input fans out to (librdkafka copies them when it takes the record).
#[derive(Debug)]
pub struct OutRecord {
    /// Shared: a record's copies and its telemetry name the topic without a copy each.
    pub topic: Arc<str>,
    pub partition: Option<i32>,
    pub key: Option<Arc<[u8]>>,
    pub payload: Option<Arc<[u8]>>,
    /// Taken over by librdkafka when the producer accepts the record (so they are copied once,
    /// not once more per send); [`write_all`] gives them back to a record whose write failed.
    pub headers: Option<OwnedHeaders>,
}

impl OutRecord {
    fn future_record(&mut self) -> FutureRecord<'_, [u8], [u8]> {
        let mut record = FutureRecord::to(&self.topic);
        record.headers = self.headers.take();
        record.key = self.key.as_deref();
        record.payload = self.payload.as_deref();
        record.partition = self.partition;
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
            topic: topic.into(),
            headers: Some(crate::kafka::cloudevents_headers(event.envelope())),
            key: Some(event.key().into_bytes().into()),
            payload: Some(payload.into()),
            partition: None,
        })
    }
}

/// Copies every header of a record: librdkafka's own copy, one call for the whole set.
pub fn copy_headers(headers: Option<&OwnedHeaders>) -> OwnedHeaders {
    headers.map_or_else(OwnedHeaders::new, OwnedHeaders::clone)
}

/// Offers a record to the producer, waiting while its queue is full; the returned delivery
/// resolves with the ack. Errors other than a full queue are returned at once, the record's
/// headers given back to it.
pub async fn enqueue<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    record: &mut OutRecord,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    loop {
        let refused = match producer.send_result(record.future_record()) {
            Ok(delivery) => return Ok(delivery),
            Err((error, refused)) => (error, refused.headers),
        };
        record.headers = refused.1;
        match refused.0 {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            error => return Err(error),
        }
    }
}

/// Writes every record and waits for all their acks; returns the records refused, each with
/// why (and with its headers, ready to be written again).
pub async fn write_all(
    producer: &FutureProducer<MeteredContext>,
    records: Vec<OutRecord>,
) -> Vec<(OutRecord, String)> {
    let mut deliveries = Vec::with_capacity(records.len());
    let mut refused = Vec::new();
    for mut record in records {
        match enqueue(producer, &mut record).await {
            Ok(delivery) => deliveries.push((record, delivery)),
            Err(e) => refused.push((record, e.to_string())),
        }
    }
    let (records, futures): (Vec<_>, Vec<_>) = deliveries.into_iter().unzip();
    for (mut record, ack) in records.into_iter().zip(join_all(futures).await) {
        match ack {
            Ok(Ok(_)) => {}
            Ok(Err((e, mut message))) => {
                record.headers = message.detach_headers();
                refused.push((record, e.to_string()));
            }
            // Only when the producer is dropped, which cannot happen while it is borrowed here.
            Err(_) => refused.push((record, "the producer went away".to_string())),
        }
    }
    refused
}
