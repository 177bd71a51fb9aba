//! Rust types of the events in `avro/`. Field names and shapes mirror the `.avsc` files; the
//! tests in `contracts::tests` encode each type with its file's schema so they cannot drift.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validate::{check_envelope, Check, ValidationError, Violations};

/// What every event carries besides its data (`avro/common/envelope.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUIDv7: unique, and sorts by creation time.
    #[serde(with = "uuid_string")]
    pub event_id: Uuid,
    /// The event type, e.g. `order.created`.
    pub event_type: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub occurred_at: i64,
    /// Shared by every event of one order's flow.
    #[serde(with = "uuid_string")]
    pub correlation_id: Uuid,
    /// `event_id` of the event that caused this one; `None` for a request from outside.
    #[serde(with = "uuid_string::option")]
    pub causation_id: Option<Uuid>,
    /// Publishing service, e.g. `orderflow/intake`.
    pub source: String,
    /// Contract version of the event's `.avsc` the producer was built against.
    pub schema_version: i32,
}

impl Envelope {
    /// A fresh envelope for an event of type `E`, stamped now.
    pub fn new<E: Event>(source: &str, correlation_id: Uuid, causation_id: Option<Uuid>) -> Self {
        Envelope {
            event_id: Uuid::now_v7(),
            event_type: E::EVENT_TYPE.to_string(),
            occurred_at: now_millis(),
            correlation_id,
            causation_id,
            source: source.to_string(),
            schema_version: E::SCHEMA_VERSION,
        }
    }
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Money in integer minor units plus an ISO 4217 currency (`avro/common/money.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: String,
}

/// `avro/common/address.avsc`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// `avro/common/order-item.avsc`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub sku: String,
    pub quantity: i32,
    pub unit_price: Money,
}

/// A quantity of one product, as inventory counts it (`avro/common/stock-line.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    pub sku: String,
    pub quantity: i32,
}

/// A typed event: its type name, contract version, envelope, partition key and the semantic
/// checks of its data.
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Past-tense type, e.g. `order.created`; also the topic it is published to.
    const EVENT_TYPE: &'static str;
    /// Contract version of the `.avsc` this type mirrors.
    const SCHEMA_VERSION: i32;
    fn envelope(&self) -> &Envelope;
    /// The Kafka record key: the id of the aggregate (the order), so one order keeps its order.
    fn key(&self) -> String;
    /// Adds a violation for every field of the data that breaks a business rule.
    fn check_data(&self, violations: &mut Violations);

    /// Checks envelope and data; every violation is reported, each naming its field.
    fn validate(&self) -> Result<(), ValidationError> {
        let mut violations = Violations::default();
        check_envelope::<Self>(self.envelope(), &mut violations);
        self.check_data(&mut violations);
        violations.into_result(Self::EVENT_TYPE, self.envelope().event_id)
    }
}

/// Declares an event: `{ envelope, data }` with `data.order_id` as the key.
macro_rules! order_event {
    ($(#[$doc:meta])* $name:ident, $data:ident, $event_type:literal, version $version:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            pub envelope: Envelope,
            pub data: $data,
        }

        impl Event for $name {
            const EVENT_TYPE: &'static str = $event_type;
            const SCHEMA_VERSION: i32 = $version;
            fn envelope(&self) -> &Envelope {
                &self.envelope
            }
            fn key(&self) -> String {
                self.data.order_id.to_string()
            }
            fn check_data(&self, violations: &mut Violations) {
                self.data.check(violations)
            }
        }
    };
}

order_event!(
    /// `avro/order/order.created.avsc`
    OrderCreated, OrderCreatedData, "order.created", version 1
);
order_event!(
    /// `avro/order/order.confirmed.avsc`
    OrderConfirmed, OrderConfirmedData, "order.confirmed", version 1
);
order_event!(
    /// `avro/order/order.cancelled.avsc`
    OrderCancelled, OrderCancelledData, "order.cancelled", version 1
);
order_event!(
    /// `avro/payment/payment.charged.avsc`
    PaymentCharged, PaymentChargedData, "payment.charged", version 1
);
order_event!(
    /// `avro/payment/payment.failed.avsc`
    PaymentFailed, PaymentFailedData, "payment.failed", version 1
);
order_event!(
    /// `avro/payment/payment.refunded.avsc`
    PaymentRefunded, PaymentRefundedData, "payment.refunded", version 1
);
order_event!(
    /// `avro/inventory/inventory.reserved.avsc`
    InventoryReserved, InventoryReservedData, "inventory.reserved", version 1
);
order_event!(
    /// `avro/inventory/inventory.reservation-failed.avsc`
    InventoryReservationFailed, InventoryReservationFailedData, "inventory.reservation-failed", version 1
);
order_event!(
    /// `avro/inventory/inventory.released.avsc`
    InventoryReleased, InventoryReleasedData, "inventory.released", version 1
);
order_event!(
    /// `avro/notification/notification.sent.avsc`
    NotificationSent, NotificationSentData, "notification.sent", version 1
);

order_event!(
    /// `avro/inventory/inventory.reservation-requested.avsc` (a saga command)
    InventoryReservationRequested, InventoryReservationRequestedData, "inventory.reservation-requested", version 1
);
order_event!(
    /// `avro/inventory/inventory.release-requested.avsc` (a saga compensation)
    InventoryReleaseRequested, InventoryReleaseRequestedData, "inventory.release-requested", version 1
);
order_event!(
    /// `avro/payment/payment.charge-requested.avsc` (a saga command)
    PaymentChargeRequested, PaymentChargeRequestedData, "payment.charge-requested", version 1
);
order_event!(
    /// `avro/payment/payment.refund-requested.avsc` (a saga compensation)
    PaymentRefundRequested, PaymentRefundRequestedData, "payment.refund-requested", version 1
);
order_event!(
    /// `avro/shipment/shipment.scheduling-requested.avsc` (a saga command)
    ShipmentSchedulingRequested, ShipmentSchedulingRequestedData, "shipment.scheduling-requested", version 1
);
order_event!(
    /// `avro/shipment/shipment.scheduled.avsc`
    ShipmentScheduled, ShipmentScheduledData, "shipment.scheduled", version 1
);
order_event!(
    /// `avro/shipment/shipment.scheduling-failed.avsc`
    ShipmentSchedulingFailed, ShipmentSchedulingFailedData, "shipment.scheduling-failed", version 1
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreatedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub customer_id: String,
    pub items: Vec<OrderItem>,
    pub total: Money,
    pub shipping_address: Address,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub total: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelledData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentChargedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub payment_id: Uuid,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefundedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub payment_id: Uuid,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReservedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub reservation_id: Uuid,
    pub lines: Vec<StockLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReservationFailedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub reason: String,
    pub unavailable_skus: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleasedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub reservation_id: Uuid,
    pub lines: Vec<StockLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationSentData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub channel: String,
    pub recipient: String,
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReservationRequestedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub lines: Vec<StockLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleaseRequestedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub reservation_id: Uuid,
    pub lines: Vec<StockLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentChargeRequestedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub customer_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefundRequestedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub payment_id: Uuid,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentSchedulingRequestedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub address: Address,
    pub lines: Vec<StockLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentScheduledData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    #[serde(with = "uuid_string")]
    pub shipment_id: Uuid,
    pub carrier: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentSchedulingFailedData {
    #[serde(with = "uuid_string")]
    pub order_id: Uuid,
    pub reason: String,
}

impl OrderCreated {
    /// A plausible order with 1-3 items, for the demo and tests.
    pub fn sample(source: &str) -> OrderCreated {
        const SKUS: &[(&str, i64)] = &[
            ("SKU-KEYBOARD", 4_999),
            ("SKU-MOUSE", 1_999),
            ("SKU-MONITOR", 18_900),
            ("SKU-CABLE", 799),
            ("SKU-DOCK", 12_450),
        ];
        const CITIES: &[(&str, &str, &str)] = &[
            ("Berlin", "10115", "DE"),
            ("Lyon", "69001", "FR"),
            ("Utrecht", "3511", "NL"),
        ];
        let items: Vec<OrderItem> = (0..fastrand::usize(1..=3))
            .map(|_| {
                let (sku, price) = SKUS[fastrand::usize(..SKUS.len())];
                OrderItem {
                    sku: sku.to_string(),
                    quantity: fastrand::i32(1..=4),
                    unit_price: Money {
                        amount_minor: price,
                        currency: "EUR".into(),
                    },
                }
            })
            .collect();
        let total = items
            .iter()
            .map(|i| i64::from(i.quantity) * i.unit_price.amount_minor)
            .sum();
        let (city, postal_code, country) = CITIES[fastrand::usize(..CITIES.len())];
        let order_id = Uuid::now_v7();
        OrderCreated {
            envelope: Envelope::new::<OrderCreated>(source, order_id, None),
            data: OrderCreatedData {
                order_id,
                customer_id: format!("customer-{}", fastrand::u32(1..10_000)),
                items,
                total: Money {
                    amount_minor: total,
                    currency: "EUR".into(),
                },
                shipping_address: Address {
                    line1: format!("{} Market Street", fastrand::u32(1..200)),
                    line2: None,
                    city: city.into(),
                    postal_code: postal_code.into(),
                    country: country.into(),
                },
            },
        }
    }
}

/// Avro's `uuid` logical type annotates a string; apache-avro's serializer would write
/// `uuid::Uuid` as 16 bytes, so ids go through their hyphenated text form.
pub(crate) mod uuid_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(d)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(id: &Option<Uuid>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.serialize_some(&id.hyphenated().to_string()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| Uuid::parse_str(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
