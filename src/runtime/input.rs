//! A record read, owned by the runtime until it ends: what the engine keeps of librdkafka's
//! message once it has returned it.
//!
//! Invariant: its key and payload are copied out of librdkafka once, and shared (not copied)
//! with every output that carries them; its topic is the subscription's name, shared, not a
//! string per record.

use std::sync::Arc;

use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Message, OwnedHeaders};
use rdkafka::Timestamp;

use super::writer::OutRecord;

/// A record read from a subscribed topic.
#[derive(Debug)]
pub struct Input {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    key: Option<Arc<[u8]>>,
    payload: Option<Arc<[u8]>>,
    headers: Option<OwnedHeaders>,
}

impl Input {
    /// Copies `message` out of librdkafka; `topic` is its topic's shared name.
    pub fn read(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Input {
        debug_assert_eq!(&*topic, message.topic());
        Input {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp(),
            key: message.key().map(Arc::from),
            payload: message.payload().map(Arc::from),
            headers: message.headers().map(BorrowedHeaders::detach),
        }
    }

    /// A record built by hand (tests).
    #[cfg(test)]
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp: Timestamp,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Input {
        Input {
            topic: topic.into(),
            partition,
            offset,
            timestamp,
            key: key.map(Arc::from),
            payload: payload.map(Arc::from),
            headers,
        }
    }

    /// The topic's shared name.
    pub fn shared_topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// The key, shared (a lane is keyed by it).
    pub fn shared_key(&self) -> Option<Arc<[u8]>> {
        self.key.clone()
    }

    /// Its copies to `topics`, each with its key, payload and headers: the key and payload are
    /// shared, the last copy takes the headers (the others copy them), so none are left here.
    pub fn copy_to(&mut self, topics: &[Arc<str>], records: &mut Vec<OutRecord>) {
        for (n, topic) in topics.iter().enumerate() {
            let headers = if n + 1 == topics.len() {
                self.headers.take()
            } else {
                self.headers.clone()
            };
            records.push(OutRecord {
                topic: topic.clone(),
                partition: None,
                key: self.key.clone(),
                payload: self.payload.clone(),
                headers: Some(headers.unwrap_or_default()),
            });
        }
    }
}

impl Message for Input {
    type Headers = OwnedHeaders;

    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// Only while no output shares it.
    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        self.payload.as_mut().and_then(Arc::get_mut)
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    fn offset(&self) -> i64 {
        self.offset
    }

    fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    fn headers(&self) -> Option<&OwnedHeaders> {
        self.headers.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, Headers};

    fn headers_of(record: &OutRecord) -> Vec<(String, Vec<u8>)> {
        let headers = record.headers.as_ref().expect("a record's headers");
        headers
            .iter()
            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    #[test]
    fn every_copy_carries_the_key_payload_and_all_headers() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some("e-1"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("order.created"),
            });
        let mut input = Input::new(
            "in",
            0,
            7,
            Timestamp::NotAvailable,
            Some(b"k"),
            Some(b"v"),
            Some(headers),
        );
        let topics: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let mut records = Vec::new();
        input.copy_to(&topics, &mut records);
        assert_eq!(records.len(), 3);
        let expected = vec![
            ("ce_id".to_string(), b"e-1".to_vec()),
            ("ce_type".to_string(), b"order.created".to_vec()),
        ];
        for (record, topic) in records.iter().zip(&topics) {
            assert_eq!(&record.topic, topic);
            assert_eq!(record.key.as_deref(), Some(&b"k"[..]));
            assert_eq!(record.payload.as_deref(), Some(&b"v"[..]));
            assert_eq!(headers_of(record), expected, "copy to {topic}");
        }
        assert!(
            Arc::ptr_eq(
                records[0].payload.as_ref().unwrap(),
                records[2].payload.as_ref().unwrap()
            ),
            "the payload is shared, not copied"
        );
        assert!(input.headers().is_none(), "the last copy took the headers");
    }
}
