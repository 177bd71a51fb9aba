//! Typed events to and from the Confluent wire format: magic byte `0`, the schema id as a
//! big-endian u32, then the Avro binary body. `schema_registry_converter` talks to the registry
//! and caches schemas by subject (encode) and by id (decode).

use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use super::catalog::Catalog;
use super::events::Event;

/// Why an event could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("event type {0} has no schema in the local catalog (avro/)")]
    UnknownEventType(String),
    /// The registry could not be asked; the same input may work later.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("cannot encode {event_type}: {detail}")]
    Encode { event_type: String, detail: String },
    #[error("cannot decode record: {0}")]
    Decode(String),
    #[error("record holds {found}, expected {expected}")]
    WrongType { expected: String, found: String },
}

impl CodecError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable(_))
    }

    fn from_src(e: SRCError, during: impl FnOnce(String) -> CodecError) -> CodecError {
        let detail = match &e.cause {
            Some(cause) => format!("{}: {cause}", e.error),
            None => e.error.clone(),
        };
        let detail = without_schema_dump(&detail);
        if e.retriable {
            CodecError::RegistryUnavailable(detail)
        } else {
            during(detail)
        }
    }
}

/// apache-avro's serializer errors embed the whole parsed schema (`RecordSchema { ... }`, kilobytes
/// of it); the reason is what follows the last dump.
fn without_schema_dump(detail: &str) -> String {
    match (detail.find(" RecordSchema {"), detail.rfind("}: ")) {
        (Some(start), Some(end)) if start < end => {
            format!("{} …: {}", &detail[..start], &detail[end + 3..])
        }
        _ => detail.to_string(),
    }
}

/// The subject a topic's values are registered under (Confluent's TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Encodes and decodes typed events against one registry.
pub struct EventCodec {
    catalog: Arc<Catalog>,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
}

impl EventCodec {
    pub fn new(registry_url: &str, catalog: Arc<Catalog>) -> Result<EventCodec, CodecError> {
        let settings = || {
            SrSettings::new_builder(registry_url.to_string())
                .set_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| CodecError::RegistryUnavailable(e.to_string()))
        };
        Ok(EventCodec {
            catalog,
            encoder: AvroEncoder::new(settings()?),
            decoder: AvroDecoder::new(settings()?),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Encodes `event` with its schema from the local catalog, under `topic`'s value subject.
    /// The schema is looked up (and registered when new) once per topic, then cached.
    pub async fn encode<E: Event>(&self, topic: &str, event: &E) -> Result<Vec<u8>, CodecError> {
        let schema = self
            .catalog
            .event(E::EVENT_TYPE)
            .ok_or_else(|| CodecError::UnknownEventType(E::EVENT_TYPE.to_string()))?;
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_string(),
            false,
            SuppliedSchema::new(
                Some(schema.fullname.clone()),
                SchemaType::Avro,
                schema.expanded.clone(),
            ),
        );
        self.encoder
            .encode_struct(event, &strategy)
            .await
            .map_err(|e| {
                CodecError::from_src(e, |detail| CodecError::Encode {
                    event_type: E::EVENT_TYPE.to_string(),
                    detail,
                })
            })
    }

    /// Decodes a Confluent-framed payload with the writer schema named by its id.
    pub async fn decode_value(&self, payload: &[u8]) -> Result<(String, Value), CodecError> {
        let decoded = self
            .decoder
            .decode(Some(payload))
            .await
            .map_err(|e| CodecError::from_src(e, CodecError::Decode))?;
        let name = decoded
            .name
            .map(|n| n.fullname(None))
            .unwrap_or_else(|| "a value without a record name".into());
        Ok((name, decoded.value))
    }

    /// Decodes a payload into the typed event `E`, refusing records of another type.
    pub async fn decode<E: Event>(&self, payload: &[u8]) -> Result<E, CodecError> {
        let (name, value) = self.decode_value(payload).await?;
        let expected = self
            .catalog
            .event(E::EVENT_TYPE)
            .map(|s| s.fullname.clone())
            .ok_or_else(|| CodecError::UnknownEventType(E::EVENT_TYPE.to_string()))?;
        if name != expected {
            return Err(CodecError::WrongType {
                expected,
                found: name,
            });
        }
        apache_avro::from_value::<E>(&value).map_err(|e| CodecError::Decode(e.to_string()))
    }
}
