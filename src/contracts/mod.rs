//! Event contracts: the Avro schema files, the registry client, typed events and the
//! Confluent wire-format codec. Knows nothing of consumers, pipelines or retries.

pub mod catalog;
pub mod codec;
pub mod events;
pub mod registry;

pub use catalog::{Catalog, CatalogError, EventSchema};
pub use codec::{value_subject, CodecError, EventCodec};
pub use events::{Envelope, Event, OrderCreated};
pub use registry::{RegisteredSchema, RegistryClient, RegistryError};
