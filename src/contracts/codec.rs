//! Typed events to and from the Confluent wire format: magic byte `0`, the writer schema's id as
//! a big-endian u32, then the Avro binary body.
//!
//! Encoding goes through `schema_registry_converter` with the event's schema from the local
//! catalog. Decoding is explicit: the header is parsed here so every malformed input gets its own
//! error, writer schemas come from [`super::writers`] (cached by id, fetched once), and the body
//! is resolved from the writer schema to the local reader schema, so a consumer on v1 reads v2
//! data and the reverse, where the two are compatible.
//!
//! When the writer schema is the reader's (the same canonical form: the usual case), the body
//! is read straight into the typed event by `serde_avro_fast`, with no generic `Value` in between;
//! any other writer goes through apache-avro's resolution. Both refuse bytes left over.

use std::sync::Arc;
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use super::catalog::{Catalog, EventSchema};
use super::events::Event;
use super::registry::RegistryClient;
use super::subjects::{Naming, SubjectStrategy};
use super::validate::ValidationError;
use super::writers::{WriterSchema, WriterSchemas};

/// The Confluent wire format's first byte.
pub const MAGIC_BYTE: u8 = 0;
const HEADER_LEN: usize = 5;

/// Why an event was not encoded. Only `RegistryUnavailable` may succeed on a later try.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("event type {0} has no schema in the local catalog (avro/)")]
    UnknownEventType(String),
    #[error("schema registry unavailable while encoding {event_type}: {detail}")]
    RegistryUnavailable { event_type: String, detail: String },
    #[error("cannot encode {event_type}: {detail}")]
    Encode { event_type: String, detail: String },
}

impl EncodeError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, EncodeError::RegistryUnavailable { .. })
    }
}

/// Why a record could not be turned into a typed event. Each malformed input has its own
/// variant; only `RegistryUnavailable` is retryable, everything else is permanent.
// Clone: every record waiting for one writer-schema fetch gets its error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value (a tombstone or an empty payload)")]
    Empty,
    #[error("payload of {len} byte(s) is too short for the Confluent wire format (magic byte, 4-byte schema id, body)")]
    TooShort { len: usize },
    #[error("payload starts with byte {found:#04x}, not the Confluent magic byte 0x00")]
    WrongMagicByte { found: u8 },
    #[error("schema id {id} is not known to the registry")]
    UnknownSchemaId { id: u32 },
    #[error("schema id {id} could not be fetched, the registry is unavailable: {detail}")]
    RegistryUnavailable { id: u32, detail: String },
    #[error("schema id {id} is not a usable Avro schema: {detail}")]
    UnusableSchema { id: u32, detail: String },
    #[error("body is truncated or corrupt for writer schema {id} ({writer}): {detail}")]
    CorruptBody {
        id: u32,
        writer: String,
        detail: String,
    },
    #[error("writer schema {id} ({writer}) cannot be read as {reader}: {detail}")]
    IncompatibleWriter {
        id: u32,
        writer: String,
        reader: String,
        detail: String,
    },
    #[error("event type {0} has no schema in the local catalog (avro/)")]
    NoReaderSchema(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl DecodeError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable { .. })
    }

    /// A short stable name for the kind of failure, for logs, headers and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_payload",
            DecodeError::TooShort { .. } => "short_payload",
            DecodeError::WrongMagicByte { .. } => "wrong_magic_byte",
            DecodeError::UnknownSchemaId { .. } => "unknown_schema_id",
            DecodeError::RegistryUnavailable { .. } => "registry_unavailable",
            DecodeError::UnusableSchema { .. } => "unusable_schema",
            DecodeError::CorruptBody { .. } => "corrupt_body",
            DecodeError::IncompatibleWriter { .. } => "incompatible_writer",
            DecodeError::NoReaderSchema(_) => "no_reader_schema",
            DecodeError::Invalid(_) => "validation_failed",
        }
    }
}

/// Splits a Confluent-framed payload into the writer schema id and the Avro body.
pub fn split_wire_format(payload: Option<&[u8]>) -> Result<(u32, &[u8]), DecodeError> {
    let payload = match payload {
        None | Some([]) => return Err(DecodeError::Empty),
        Some(p) => p,
    };
    if payload[0] != MAGIC_BYTE {
        return Err(DecodeError::WrongMagicByte { found: payload[0] });
    }
    if payload.len() <= HEADER_LEN {
        return Err(DecodeError::TooShort { len: payload.len() });
    }
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Ok((id, &payload[HEADER_LEN..]))
}

/// The most items one array or map of a body may claim: a bound on the decoder's loop, far above
/// what fits in a Kafka record (each item takes at least a byte in every orderflow contract).
const MAX_ITEMS: usize = 1 << 20;

/// Encodes and decodes typed events against one registry.
pub struct EventCodec {
    catalog: Arc<Catalog>,
    naming: Naming,
    encoder: AvroEncoder,
    registry: RegistryClient,
    writers: WriterSchemas,
}

impl EventCodec {
    pub fn new(registry_url: &str, catalog: Arc<Catalog>) -> Result<EventCodec, EncodeError> {
        Self::with_naming(registry_url, catalog, Naming::default())
    }

    pub fn with_naming(
        registry_url: &str,
        catalog: Arc<Catalog>,
        naming: Naming,
    ) -> Result<EventCodec, EncodeError> {
        let mut builder = SrSettings::new_builder(registry_url.to_string());
        builder.set_timeout(Duration::from_secs(5));
        if let Some((user, password)) = super::registry::credentials_from_env() {
            builder.set_basic_authorization(&user, Some(&password));
        }
        let settings = builder
            .build()
            .map_err(|e| EncodeError::RegistryUnavailable {
                event_type: "any".into(),
                detail: e.to_string(),
            })?;
        Ok(EventCodec {
            catalog,
            naming,
            encoder: AvroEncoder::new(settings),
            registry: RegistryClient::new(registry_url),
            writers: WriterSchemas::default(),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// Writer-schema lookups so far: (served from the cache or by a fetch already under way,
    /// fetched from the registry).
    pub fn cache_lookups(&self) -> (u64, u64) {
        self.writers.lookups()
    }

    fn local_schema<E: Event>(&self) -> Option<&EventSchema> {
        self.catalog.event(E::EVENT_TYPE)
    }

    /// Validates `event`, then encodes it with its schema from the local catalog under the
    /// subject the naming strategy gives for `topic`. Like Confluent's serializers with
    /// `auto.register.schemas=true`, the schema is registered when the subject lacks it (the
    /// registry still enforces its compatibility rule), then cached per subject.
    pub async fn encode<E: Event>(&self, topic: &str, event: &E) -> Result<Vec<u8>, EncodeError> {
        event.validate()?;
        let schema = self
            .local_schema::<E>()
            .ok_or_else(|| EncodeError::UnknownEventType(E::EVENT_TYPE.to_string()))?;
        let supplied = SuppliedSchema::new(
            Some(schema.fullname.clone()),
            SchemaType::Avro,
            schema.expanded.clone(),
        );
        let strategy = match self.naming.strategy {
            SubjectStrategy::Topic => {
                SubjectNameStrategy::TopicNameStrategyWithSchema(topic.to_string(), false, supplied)
            }
            SubjectStrategy::Record => SubjectNameStrategy::RecordNameStrategyWithSchema(supplied),
            SubjectStrategy::TopicRecord => {
                SubjectNameStrategy::TopicRecordNameStrategyWithSchema(topic.to_string(), supplied)
            }
        };
        self.encoder
            .encode_struct(event, &strategy)
            .await
            .map_err(|e| encode_error(e, E::EVENT_TYPE))
    }

    /// Puts a writer schema in the cache under `id`, as if fetched from the registry: for
    /// tools and tests that decode without a registry.
    pub fn preload_writer_schema(&self, id: u32, schema: &str) -> Result<(), DecodeError> {
        let schema = Schema::parse_str(schema).map_err(|e| DecodeError::UnusableSchema {
            id,
            detail: e.to_string(),
        })?;
        self.writers.insert(id, schema);
        Ok(())
    }

    /// Decodes a payload into the typed event `E`: wire header, writer schema by id (cached),
    /// Avro body, resolution to `E`'s local schema, then the semantic checks.
    pub async fn decode<E: Event>(&self, payload: Option<&[u8]>) -> Result<E, DecodeError> {
        let (id, body) = split_wire_format(payload)?;
        let reader = self
            .local_schema::<E>()
            .ok_or_else(|| DecodeError::NoReaderSchema(E::EVENT_TYPE.to_string()))?;
        let writer = self.writers.get(id, &self.registry).await?;
        let incompatible = |detail: String| DecodeError::IncompatibleWriter {
            id,
            writer: writer.name.clone(),
            reader: reader.fullname.clone(),
            detail,
        };
        if writer.name != reader.fullname {
            return Err(incompatible("the record names differ".into()));
        }
        let event: E = match &writer.direct {
            Some(direct) if writer.canonical == reader.canonical => {
                decode_direct(id, &writer, direct, body)?
            }
            _ => {
                // Avro's schema resolution fills defaults for fields the writer lacks and drops
                // the ones the reader does not know.
                let value = decode_body(id, &writer, body)?;
                let value = if writer.canonical == reader.canonical {
                    value
                } else {
                    value
                        .resolve(&reader.schema)
                        .map_err(|e| incompatible(e.to_string()))?
                };
                apache_avro::from_value(&value).map_err(|e| incompatible(e.to_string()))?
            }
        };
        event.validate()?;
        Ok(event)
    }

    /// Decodes a payload with its writer schema only, for tools that print any event.
    pub async fn decode_value(
        &self,
        payload: Option<&[u8]>,
    ) -> Result<(String, Value), DecodeError> {
        let (id, body) = split_wire_format(payload)?;
        let writer = self.writers.get(id, &self.registry).await?;
        Ok((writer.name.clone(), decode_body(id, &writer, body)?))
    }
}

/// Reads `body` written with `writer` straight into `E`, whose schema is the writer's. A field
/// that does not parse as its type (e.g. a uuid that is not one) is a corrupt body here.
fn decode_direct<E: Event>(
    id: u32,
    writer: &WriterSchema,
    direct: &serde_avro_fast::Schema,
    body: &[u8],
) -> Result<E, DecodeError> {
    use std::io::BufRead;
    let corrupt = |detail: String| DecodeError::CorruptBody {
        id,
        writer: writer.name.clone(),
        detail,
    };
    let mut config = serde_avro_fast::de::DeserializerConfig::new(direct);
    config.max_seq_size = MAX_ITEMS;
    let mut state = serde_avro_fast::de::DeserializerState::with_config(
        serde_avro_fast::de::read::SliceRead::new(body),
        config,
    );
    let event = E::deserialize(state.deserializer()).map_err(|e| corrupt(e.to_string()))?;
    let left = state
        .into_reader()
        .fill_buf()
        .map(|rest| rest.len())
        .unwrap_or_default();
    if left > 0 {
        return Err(corrupt(format!(
            "{left} byte(s) left over after the record"
        )));
    }
    Ok(event)
}

fn decode_body(id: u32, writer: &WriterSchema, body: &[u8]) -> Result<Value, DecodeError> {
    let corrupt = |detail: String| DecodeError::CorruptBody {
        id,
        writer: writer.name.clone(),
        detail,
    };
    let mut rest = body;
    let value = GenericDatumReader::builder(&writer.schema)
        .build()
        .and_then(|reader| reader.read_value(&mut rest))
        .map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} byte(s) left over after the record",
            rest.len()
        )));
    }
    Ok(value)
}

fn encode_error(e: SRCError, event_type: &str) -> EncodeError {
    let detail = match &e.cause {
        Some(cause) => format!("{}: {cause}", e.error),
        None => e.error.clone(),
    };
    let detail = without_schema_dump(&detail);
    if e.retriable {
        EncodeError::RegistryUnavailable {
            event_type: event_type.to_string(),
            detail,
        }
    } else {
        EncodeError::Encode {
            event_type: event_type.to_string(),
            detail,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_header_errors_are_distinct() {
        assert!(matches!(split_wire_format(None), Err(DecodeError::Empty)));
        assert!(matches!(
            split_wire_format(Some(b"")),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            split_wire_format(Some(b"\x00\x00\x01")),
            Err(DecodeError::TooShort { len: 3 })
        ));
        assert!(matches!(
            split_wire_format(Some(b"\x00\x00\x00\x00\x07")),
            Err(DecodeError::TooShort { len: 5 })
        ));
        assert!(matches!(
            split_wire_format(Some(b"{\"json\":1}")),
            Err(DecodeError::WrongMagicByte { found: b'{' })
        ));
        let (id, body) = split_wire_format(Some(b"\x00\x00\x00\x01\x02body")).unwrap();
        assert_eq!((id, body), (258, &b"body"[..]));
    }

    use crate::contracts::OrderCreated;
    use proptest::prelude::*;

    /// order.created's schema as a cached writer, a sample event and its body (built once).
    fn order_created() -> &'static (WriterSchema, OrderCreated, Vec<u8>) {
        static BUILT: std::sync::OnceLock<(WriterSchema, OrderCreated, Vec<u8>)> =
            std::sync::OnceLock::new();
        BUILT.get_or_init(|| {
            let avro = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro"));
            let catalog = Catalog::load(avro).unwrap();
            let schema = catalog.event("order.created").unwrap().schema.clone();
            let event = OrderCreated::sample("codec-test");
            let value = apache_avro::to_value(&event)
                .unwrap()
                .resolve(&schema)
                .unwrap();
            let body = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap();
            (WriterSchema::new(1, schema), event, body)
        })
    }

    fn generic(writer: &WriterSchema, body: &[u8]) -> Result<OrderCreated, String> {
        let value = decode_body(1, writer, body).map_err(|e| e.to_string())?;
        apache_avro::from_value(&value).map_err(|e| e.to_string())
    }

    fn direct(writer: &WriterSchema, body: &[u8]) -> Result<OrderCreated, String> {
        let schema = writer
            .direct
            .as_ref()
            .expect("the direct parser reads the contract");
        decode_direct(1, writer, schema, body).map_err(|e| e.to_string())
    }

    #[test]
    fn the_direct_decoder_reads_a_valid_body_as_the_generic_one_does() {
        let (writer, event, body) = order_created();
        let read = direct(writer, body).unwrap();
        assert_eq!(&read, event);
        assert_eq!(Ok(read), generic(writer, body));
        let mut longer = body.clone();
        longer.push(0);
        let err = direct(writer, &longer).unwrap_err();
        assert!(err.contains("1 byte(s) left over"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        /// Whatever the bytes, the direct path accepts what the generic one accepts, and reads
        /// the same event: it changes the cost of decoding, never its answer.
        #[test]
        fn the_direct_and_generic_decoders_agree_on_mutated_bodies(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
            extra in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let (writer, _, body) = order_created();
            let mut body = body.clone();
            for (at, byte) in flips {
                let i = at.index(body.len());
                body[i] = byte;
            }
            if truncate {
                body.truncate(cut.index(body.len()));
            }
            body.extend(extra);
            match (direct(writer, &body), generic(writer, &body)) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "direct {:?} but generic {:?}", a, b),
            }
        }
    }
}
