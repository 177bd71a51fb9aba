//! Any of the order-domain events, chosen by event type at run time: what a pipeline decodes
//! from a topic, receives as JSON from a downstream service, or publishes as a result.

use uuid::Uuid;

use super::codec::{DecodeError, EncodeError, EventCodec};
use super::events::*;
use super::validate::ValidationError;

macro_rules! any_event {
    ($($variant:ident($data:ident)),+ $(,)?) => {
        /// One event of any type in `avro/`.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum AnyEvent {
            $($variant($variant)),+
        }

        /// Every event type orderflow knows, e.g. `order.created`.
        pub const EVENT_TYPES: &[&str] = &[$($variant::EVENT_TYPE),+];

        impl AnyEvent {
            pub fn event_type(&self) -> &'static str {
                match self { $(AnyEvent::$variant(_) => $variant::EVENT_TYPE),+ }
            }

            pub fn envelope(&self) -> &Envelope {
                match self { $(AnyEvent::$variant(e) => &e.envelope),+ }
            }

            pub fn key(&self) -> String {
                match self { $(AnyEvent::$variant(e) => e.key()),+ }
            }

            pub fn validate(&self) -> Result<(), ValidationError> {
                match self { $(AnyEvent::$variant(e) => e.validate()),+ }
            }

            /// The event as JSON, as it is POSTed to downstream services.
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    $(AnyEvent::$variant(e) => serde_json::to_value(e)
                        .expect("events serialize to JSON")),+
                }
            }

            /// Decodes a payload as the event type `event_type` (the topic's type).
            pub async fn decode(
                codec: &EventCodec,
                event_type: &str,
                payload: Option<&[u8]>,
            ) -> Result<AnyEvent, DecodeError> {
                match event_type {
                    $(t if t == $variant::EVENT_TYPE =>
                        codec.decode::<$variant>(payload).await.map(AnyEvent::$variant),)+
                    other => Err(DecodeError::NoReaderSchema(other.to_string())),
                }
            }

            pub async fn encode(&self, codec: &EventCodec, topic: &str) -> Result<Vec<u8>, EncodeError> {
                match self { $(AnyEvent::$variant(e) => codec.encode(topic, e).await),+ }
            }

            /// Builds an event of `event_type` from its `data` as JSON (a downstream's answer),
            /// with a fresh envelope caused by `cause`. The result is validated.
            pub fn from_data(
                event_type: &str,
                data: serde_json::Value,
                source: &str,
                cause: &Envelope,
            ) -> Result<AnyEvent, FromDataError> {
                let envelope = |t: &str, version: i32| Envelope {
                    event_id: Uuid::now_v7(),
                    event_type: t.to_string(),
                    occurred_at: now_millis(),
                    correlation_id: cause.correlation_id,
                    causation_id: Some(cause.event_id),
                    source: source.to_string(),
                    schema_version: version,
                };
                let event = match event_type {
                    $(t if t == $variant::EVENT_TYPE => {
                        let data: $data = serde_json::from_value(data).map_err(|e| {
                            FromDataError::Shape { event_type: t.to_string(), detail: e.to_string() }
                        })?;
                        AnyEvent::$variant($variant {
                            envelope: envelope(t, $variant::SCHEMA_VERSION),
                            data,
                        })
                    })+
                    other => return Err(FromDataError::UnknownType(other.to_string())),
                };
                event.validate()?;
                Ok(event)
            }
        }
    };
}

any_event!(
    OrderCreated(OrderCreatedData),
    OrderConfirmed(OrderConfirmedData),
    OrderCancelled(OrderCancelledData),
    PaymentCharged(PaymentChargedData),
    PaymentFailed(PaymentFailedData),
    PaymentRefunded(PaymentRefundedData),
    InventoryReserved(InventoryReservedData),
    InventoryReservationFailed(InventoryReservationFailedData),
    InventoryReleased(InventoryReleasedData),
    NotificationSent(NotificationSentData),
    InventoryReservationRequested(InventoryReservationRequestedData),
    InventoryReleaseRequested(InventoryReleaseRequestedData),
    PaymentChargeRequested(PaymentChargeRequestedData),
    PaymentRefundRequested(PaymentRefundRequestedData),
    ShipmentSchedulingRequested(ShipmentSchedulingRequestedData),
    ShipmentScheduled(ShipmentScheduledData),
    ShipmentSchedulingFailed(ShipmentSchedulingFailedData),
);

/// Why a downstream's answer is not a valid event.
#[derive(Debug, thiserror::Error)]
pub enum FromDataError {
    #[error("no event type {0}")]
    UnknownType(String),
    #[error("the answer is not the data of {event_type}: {detail}")]
    Shape { event_type: String, detail: String },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}
