//! Semantic checks of events, run before publishing and after decoding. Avro only proves the
//! shape; these prove the content: ids present, the type matching, money and quantities in
//! range, orders not empty and adding up. Every violation is reported, each naming its field.

use std::fmt::{self, Display};

use uuid::Uuid;

use super::events::*;

/// Largest amount accepted, in minor units (10 billion in major units): beyond this an amount
/// is a bug, not an order.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;
/// Largest quantity of one line.
pub const MAX_QUANTITY: i32 = 10_000;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `data.items[2].quantity`.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// An event that breaks one or more rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event_type} {event_id} is invalid: {}",
    .violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationError {
    pub event_type: String,
    pub event_id: Uuid,
    pub violations: Vec<Violation>,
}

#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(Violation {
            field: field.into(),
            problem: problem.into(),
        });
    }

    /// Field and problem are formatted only when the rule is broken: checking a valid event
    /// (every event on the hot path) allocates nothing.
    fn require(&mut self, ok: bool, field: impl Display, problem: impl Display) {
        if !ok {
            self.add(field.to_string(), problem.to_string());
        }
    }

    pub fn into_result(self, event_type: &str, event_id: Uuid) -> Result<(), ValidationError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                event_type: event_type.to_string(),
                event_id,
                violations: self.0,
            })
        }
    }

    fn id(&mut self, field: impl Display, id: &Uuid) {
        self.require(!id.is_nil(), field, "must be set (it is the nil UUID)");
    }

    fn text(&mut self, field: impl Display, value: &str) {
        self.require(!value.trim().is_empty(), field, "must not be empty");
    }

    fn money(&mut self, field: impl Display, money: &Money) {
        self.require(
            (0..=MAX_AMOUNT_MINOR).contains(&money.amount_minor),
            format_args!("{field}.amount_minor"),
            format_args!(
                "must be between 0 and {MAX_AMOUNT_MINOR} minor units, is {}",
                money.amount_minor
            ),
        );
        self.require(
            money.currency.len() == 3 && money.currency.bytes().all(|b| b.is_ascii_uppercase()),
            format_args!("{field}.currency"),
            format_args!(
                "must be an ISO 4217 code of three capital letters, is {:?}",
                money.currency
            ),
        );
    }

    fn quantity(&mut self, field: impl Display, quantity: i32) {
        self.require(
            (1..=MAX_QUANTITY).contains(&quantity),
            field,
            format_args!("must be between 1 and {MAX_QUANTITY}, is {quantity}"),
        );
    }

    fn stock_lines(&mut self, field: &str, lines: &[StockLine]) {
        self.require(!lines.is_empty(), field, "must hold at least one line");
        for (i, line) in lines.iter().enumerate() {
            self.text(format_args!("{field}[{i}].sku"), &line.sku);
            self.quantity(format_args!("{field}[{i}].quantity"), line.quantity);
        }
    }
}

/// The envelope's rules, the same for every event type `E`.
pub fn check_envelope<E: Event>(envelope: &Envelope, v: &mut Violations) {
    v.id("envelope.event_id", &envelope.event_id);
    v.id("envelope.correlation_id", &envelope.correlation_id);
    if let Some(causation_id) = &envelope.causation_id {
        v.id("envelope.causation_id", causation_id);
    }
    v.require(
        envelope.event_type == E::EVENT_TYPE,
        "envelope.event_type",
        format_args!("must be {}, is {:?}", E::EVENT_TYPE, envelope.event_type),
    );
    v.require(
        envelope.occurred_at > 0,
        "envelope.occurred_at",
        "must be a time after 1970 in milliseconds",
    );
    v.text("envelope.source", &envelope.source);
    v.require(
        envelope.schema_version >= 1,
        "envelope.schema_version",
        "must be 1 or more",
    );
}

/// The data-specific rules of one event.
pub trait Check {
    fn check(&self, v: &mut Violations);
}

impl Check for OrderCreatedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.text("data.customer_id", &self.customer_id);
        v.require(
            !self.items.is_empty(),
            "data.items",
            "must hold at least one item",
        );
        let mut sum: Option<i64> = Some(0);
        for (i, item) in self.items.iter().enumerate() {
            v.text(format_args!("data.items[{i}].sku"), &item.sku);
            v.quantity(format_args!("data.items[{i}].quantity"), item.quantity);
            v.money(format_args!("data.items[{i}].unit_price"), &item.unit_price);
            v.require(
                item.unit_price.currency == self.total.currency,
                format_args!("data.items[{i}].unit_price.currency"),
                format_args!(
                    "must be the order's currency {}, is {}",
                    self.total.currency, item.unit_price.currency
                ),
            );
            sum = sum.and_then(|s| {
                item.unit_price
                    .amount_minor
                    .checked_mul(i64::from(item.quantity))
                    .and_then(|line| s.checked_add(line))
            });
        }
        v.money("data.total", &self.total);
        match sum {
            Some(sum) if sum == self.total.amount_minor => {}
            Some(sum) => v.add(
                "data.total.amount_minor",
                format!(
                    "must equal the sum of the items ({sum}), is {}",
                    self.total.amount_minor
                ),
            ),
            None => v.add("data.items", "the sum of the items overflows"),
        }
        let address = &self.shipping_address;
        v.text("data.shipping_address.line1", &address.line1);
        v.text("data.shipping_address.city", &address.city);
        v.text("data.shipping_address.postal_code", &address.postal_code);
        v.require(
            address.country.len() == 2 && address.country.bytes().all(|b| b.is_ascii_uppercase()),
            "data.shipping_address.country",
            format_args!(
                "must be an ISO 3166-1 alpha-2 code, is {:?}",
                address.country
            ),
        );
    }
}

impl Check for OrderConfirmedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.money("data.total", &self.total);
    }
}

impl Check for OrderCancelledData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.text("data.reason", &self.reason);
    }
}

impl Check for PaymentChargedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.payment_id", &self.payment_id);
        v.money("data.amount", &self.amount);
    }
}

impl Check for PaymentFailedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.money("data.amount", &self.amount);
        v.text("data.reason", &self.reason);
    }
}

impl Check for PaymentRefundedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.payment_id", &self.payment_id);
        v.money("data.amount", &self.amount);
    }
}

impl Check for InventoryReservedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.reservation_id", &self.reservation_id);
        v.stock_lines("data.lines", &self.lines);
    }
}

impl Check for InventoryReservationFailedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.text("data.reason", &self.reason);
    }
}

impl Check for InventoryReleasedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.reservation_id", &self.reservation_id);
        v.stock_lines("data.lines", &self.lines);
    }
}

impl Check for NotificationSentData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.require(
            matches!(self.channel.as_str(), "email" | "sms" | "push"),
            "data.channel",
            format_args!("must be email, sms or push, is {:?}", self.channel),
        );
        v.text("data.recipient", &self.recipient);
        v.text("data.template", &self.template);
    }
}

impl Check for InventoryReservationRequestedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.stock_lines("data.lines", &self.lines);
    }
}

impl Check for InventoryReleaseRequestedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.reservation_id", &self.reservation_id);
        v.stock_lines("data.lines", &self.lines);
    }
}

impl Check for PaymentChargeRequestedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.text("data.customer_id", &self.customer_id);
        v.money("data.amount", &self.amount);
    }
}

impl Check for PaymentRefundRequestedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.payment_id", &self.payment_id);
        v.money("data.amount", &self.amount);
    }
}

impl Check for ShipmentSchedulingRequestedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.text("data.address.line1", &self.address.line1);
        v.text("data.address.city", &self.address.city);
        v.text("data.address.postal_code", &self.address.postal_code);
        v.stock_lines("data.lines", &self.lines);
    }
}

impl Check for ShipmentScheduledData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.id("data.shipment_id", &self.shipment_id);
        v.text("data.carrier", &self.carrier);
    }
}

impl Check for ShipmentSchedulingFailedData {
    fn check(&self, v: &mut Violations) {
        v.id("data.order_id", &self.order_id);
        v.text("data.reason", &self.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_order_is_valid() {
        for _ in 0..50 {
            OrderCreated::sample("test").validate().unwrap();
        }
    }

    #[test]
    fn every_violation_names_its_field() {
        let mut order = OrderCreated::sample("test");
        order.envelope.event_type = "order.confirmed".into();
        order.envelope.correlation_id = Uuid::nil();
        order.data.items.clear();
        order.data.total.amount_minor = -5;
        order.data.total.currency = "eur".into();
        order.data.shipping_address.country = "Germany".into();
        let err = order.validate().unwrap_err();
        let fields: Vec<&str> = err.violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "envelope.correlation_id",
                "envelope.event_type",
                "data.items",
                "data.total.amount_minor",
                "data.total.currency",
                "data.total.amount_minor",
                "data.shipping_address.country",
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("order.created "), "{text}");
        assert!(
            text.contains("data.total.amount_minor: must be between 0 and"),
            "{text}"
        );
        assert!(
            text.contains("must equal the sum of the items (0), is -5"),
            "{text}"
        );
    }

    #[test]
    fn item_rules_are_checked_per_line() {
        let mut order = OrderCreated::sample("test");
        order.data.items[0].quantity = 0;
        order.data.items[0].unit_price.currency = "USD".into();
        let err = order.validate().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("data.items[0].quantity: must be between 1 and 10000, is 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "data.items[0].unit_price.currency: must be the order's currency EUR, is USD"
            ),
            "{text}"
        );
        assert!(
            text.contains("data.total.amount_minor: must equal the sum of the items"),
            "{text}"
        );
    }
}
