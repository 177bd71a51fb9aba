//! Event contracts: the Avro schema files, the registry client, typed events, their semantic
//! checks and the Confluent wire-format codec. Knows nothing of consumers, pipelines or retries.

pub mod any;
pub mod catalog;
pub mod codec;
pub mod compatibility;
pub mod events;
pub mod registry;
pub mod status;
pub mod subjects;
pub mod validate;
pub mod writers;

pub use any::{AnyEvent, FromDataError, EVENT_TYPES};
pub use catalog::{Catalog, CatalogError, EventSchema};
pub use codec::{DecodeError, EncodeError, EventCodec};
pub use events::*;
pub use registry::{RegisteredSchema, RegistryClient, RegistryError};
pub use status::OrderStatus;
pub use subjects::{Naming, SubjectStrategy};
pub use validate::{ValidationError, Violation};
