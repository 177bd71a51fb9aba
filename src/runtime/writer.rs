//! Writing records: an owned record to write, sending it without blocking the executor, and
//! counting its acks down.
//!
//! Invariant: a full producer queue is waited out asynchronously (the task yields, the engine
//! keeps running and its in-flight budget pauses reading); no thread ever sleeps here. A
//! record's write is reported as acknowledged only on the broker's ack, and every record
//! offered is reported exactly once to the [`Acks`] of its input, acknowledged or refused.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;

use super::context::MeteredContext;
use rdkafka::client::ClientContext;

/// The runtime's producer: librdkafka reports each record's ack to the [`Acks`] of its input,
/// from the producer's polling thread.
pub type Producer = ThreadedProducer<MeteredContext>;

/// Records refused by the producer or the broker, each with why, ready to be written again.
pub type Refused = Vec<(OutRecord, String)>;

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

/// Offers a record to a future producer (the saga's), waiting while its queue is full; the
/// returned delivery resolves with the ack. Errors other than a full queue are returned at
/// once, the record's headers given back to it.
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

/// What waits for one input's writes (or one transaction's): run once, when the last of them
/// is acknowledged or refused, with those refused.
type AfterAcks = Box<dyn FnOnce(Refused) + Send>;

/// The writes of one input, counted down as librdkafka reports each of them.
pub struct Acks {
    unsettled: AtomicUsize,
    refused: Mutex<Refused>,
    after: Mutex<Option<AfterAcks>>,
}

impl Acks {
    /// For `count` writes (at least one); `after` runs on the thread that reports the last.
    pub fn new(count: usize, after: impl FnOnce(Refused) + Send + 'static) -> Arc<Acks> {
        debug_assert!(count > 0, "nothing would ever settle");
        Arc::new(Acks {
            unsettled: AtomicUsize::new(count),
            refused: Mutex::new(Vec::new()),
            after: Mutex::new(Some(Box::new(after))),
        })
    }

    /// One write is acknowledged (`None`) or refused.
    fn settle(&self, refused: Option<(OutRecord, String)>) {
        if let Some(refused) = refused {
            self.refused.lock().expect("acks lock").push(refused);
        }
        if self.unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
            let refused = std::mem::take(&mut *self.refused.lock().expect("acks lock"));
            if let Some(after) = self.after.lock().expect("acks lock").take() {
                after(refused);
            }
        }
    }
}

impl ProducerContext for MeteredContext {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        match result {
            Ok(_) => acks.settle(None),
            Err((error, message)) => {
                acks.settle(Some((refused_record(message), error.to_string())))
            }
        }
    }
}

/// A record refused by the broker, rebuilt from librdkafka's report to be written again (to the
/// partition it was given, if any: the partitioner gives a key the same one again).
fn refused_record(message: &rdkafka::message::BorrowedMessage<'_>) -> OutRecord {
    OutRecord {
        topic: message.topic().into(),
        partition: Some(message.partition()).filter(|p| *p >= 0),
        key: message.key().map(Arc::from),
        payload: message.payload().map(Arc::from),
        headers: message.headers().map(|h| h.detach()),
    }
}

/// Offers records to the producer, each reporting to `acks`, until its queue is full; returns
/// the records not offered yet, to be offered again later. A record the producer refuses for
/// another reason is reported to `acks` as refused at once.
pub fn offer(producer: &Producer, records: Vec<OutRecord>, acks: &Arc<Acks>) -> Vec<OutRecord> {
    let mut records = records.into_iter();
    while let Some(mut record) = records.next() {
        let mut base = BaseRecord::with_opaque_to(&record.topic, acks.clone());
        base.headers = record.headers.take();
        base.key = record.key.as_deref();
        base.payload = record.payload.as_deref();
        base.partition = record.partition;
        let (error, headers) = match producer.send(base) {
            Ok(()) => continue,
            Err((error, refused)) => (error, refused.headers),
        };
        record.headers = headers;
        if let KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) = error {
            let mut waiting = vec![record];
            waiting.extend(records);
            return waiting;
        }
        acks.settle(Some((record, error.to_string())));
    }
    Vec::new()
}

/// Offers every record, waiting while the producer's queue is full.
pub async fn offer_all(producer: &Producer, mut records: Vec<OutRecord>, acks: &Arc<Acks>) {
    loop {
        records = offer(producer, records, acks);
        if records.is_empty() {
            return;
        }
        tokio::time::sleep(QUEUE_FULL_PAUSE).await;
    }
}

/// Writes every record and waits for all their acks; returns the records refused, each with
/// why (and with its headers, ready to be written again).
pub async fn write_all(producer: &Producer, records: Vec<OutRecord>) -> Refused {
    if records.is_empty() {
        return Vec::new();
    }
    let (count, (tx, rx)) = (records.len(), tokio::sync::oneshot::channel());
    let acks = Acks::new(count, move |refused| {
        let _ = tx.send(refused);
    });
    offer_all(producer, records, &acks).await;
    drop(acks);
    // librdkafka reports every record it took, even when it is destroyed (as refused).
    rx.await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str) -> OutRecord {
        OutRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            payload: None,
            headers: None,
        }
    }

    #[test]
    fn what_waits_runs_once_after_the_last_report_with_the_refused_ones() {
        let (tx, rx) = std::sync::mpsc::channel();
        let acks = Acks::new(3, move |refused: Refused| {
            let topics: Vec<String> = refused.iter().map(|(r, _)| r.topic.to_string()).collect();
            tx.send(topics).unwrap();
        });
        acks.settle(None);
        acks.settle(Some((record("b"), "too large".into())));
        assert!(rx.try_recv().is_err(), "one write is still unsettled");
        acks.settle(None);
        assert_eq!(rx.try_recv().unwrap(), vec!["b".to_string()]);
        assert!(rx.try_recv().is_err(), "and only once");
    }
}
