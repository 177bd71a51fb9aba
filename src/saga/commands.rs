//! The commands a saga can send, built from the order and the replies of finished steps. A saga
//! file names commands; each needs a builder here, since a command's data comes from events a
//! file cannot describe.

use std::collections::BTreeMap;

use serde_json::Value;
use uuid::Uuid;

use crate::contracts::*;

/// Command event types with a builder.
pub const COMMAND_TYPES: &[&str] = &[
    InventoryReservationRequested::EVENT_TYPE,
    PaymentChargeRequested::EVENT_TYPE,
    ShipmentSchedulingRequested::EVENT_TYPE,
    InventoryReleaseRequested::EVENT_TYPE,
    PaymentRefundRequested::EVENT_TYPE,
];

/// Who sends a command and what caused it.
pub struct Origin<'a> {
    pub source: &'a str,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
}

impl Origin<'_> {
    fn envelope<E: Event>(&self) -> Envelope {
        Envelope::new::<E>(self.source, self.correlation_id, Some(self.causation_id))
    }
}

/// Builds `command` for `order`. `reply` is the data of the success reply of the step being
/// compensated (compensations only). The result is validated.
pub fn build(
    command: &str,
    order: &OrderCreatedData,
    reply: Option<&Value>,
    origin: &Origin<'_>,
) -> Result<AnyEvent, String> {
    let order_id = order.order_id;
    let from_reply = |field: &str| -> Result<Value, String> {
        reply
            .and_then(|r| r.get(field))
            .cloned()
            .ok_or_else(|| format!("{command} needs {field} from the step's reply, which lacks it"))
    };
    let id = |field: &str| -> Result<Uuid, String> {
        from_reply(field)?
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| format!("{field} of the step's reply is not a UUID"))
    };
    let lines_of_reply = || -> Result<Vec<StockLine>, String> {
        serde_json::from_value(from_reply("lines")?).map_err(|e| format!("lines: {e}"))
    };
    let event = match command {
        InventoryReservationRequested::EVENT_TYPE => {
            AnyEvent::InventoryReservationRequested(InventoryReservationRequested {
                envelope: origin.envelope::<InventoryReservationRequested>(),
                data: InventoryReservationRequestedData {
                    order_id,
                    lines: stock_lines(order),
                },
            })
        }
        PaymentChargeRequested::EVENT_TYPE => {
            AnyEvent::PaymentChargeRequested(PaymentChargeRequested {
                envelope: origin.envelope::<PaymentChargeRequested>(),
                data: PaymentChargeRequestedData {
                    order_id,
                    customer_id: order.customer_id.clone(),
                    amount: order.total.clone(),
                },
            })
        }
        ShipmentSchedulingRequested::EVENT_TYPE => {
            AnyEvent::ShipmentSchedulingRequested(ShipmentSchedulingRequested {
                envelope: origin.envelope::<ShipmentSchedulingRequested>(),
                data: ShipmentSchedulingRequestedData {
                    order_id,
                    address: order.shipping_address.clone(),
                    lines: stock_lines(order),
                },
            })
        }
        InventoryReleaseRequested::EVENT_TYPE => {
            AnyEvent::InventoryReleaseRequested(InventoryReleaseRequested {
                envelope: origin.envelope::<InventoryReleaseRequested>(),
                data: InventoryReleaseRequestedData {
                    order_id,
                    reservation_id: id("reservation_id")?,
                    lines: lines_of_reply()?,
                },
            })
        }
        PaymentRefundRequested::EVENT_TYPE => {
            AnyEvent::PaymentRefundRequested(PaymentRefundRequested {
                envelope: origin.envelope::<PaymentRefundRequested>(),
                data: PaymentRefundRequestedData {
                    order_id,
                    payment_id: id("payment_id")?,
                    amount: serde_json::from_value(from_reply("amount")?)
                        .map_err(|e| format!("amount: {e}"))?,
                },
            })
        }
        other => return Err(format!("no builder for the command {other}")),
    };
    event.validate().map_err(|e| e.to_string())?;
    Ok(event)
}

/// The order's items as stock lines, one per SKU.
fn stock_lines(order: &OrderCreatedData) -> Vec<StockLine> {
    let mut by_sku: BTreeMap<&str, i32> = BTreeMap::new();
    for item in &order.items {
        *by_sku.entry(&item.sku).or_default() += item.quantity;
    }
    by_sku
        .into_iter()
        .map(|(sku, quantity)| StockLine {
            sku: sku.to_string(),
            quantity,
        })
        .collect()
}
