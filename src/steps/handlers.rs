//! Custom handlers, by the name pipeline files use.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Handler, HandlerContext};
use crate::contracts::{AnyEvent, Envelope, OrderConfirmed, OrderConfirmedData};
use crate::failure::Failure;

/// Names a pipeline's `step.custom.handler` may use.
pub const HANDLER_NAMES: [&str; 2] = ["confirm-order", "order-status"];

pub fn by_name(name: &str, pipeline: &str, context: &HandlerContext) -> Option<Arc<dyn Handler>> {
    match name {
        "confirm-order" => Some(Arc::new(ConfirmOrder {
            source: format!("orderflow/{pipeline}"),
        })),
        "order-status" => Some(Arc::new(crate::projection::OrderStatusHandler::new(
            &context.database_url,
        ))),
        _ => None,
    }
}

/// A charged payment confirms its order: `payment.charged` -> `order.confirmed`.
struct ConfirmOrder {
    source: String,
}

impl Handler for ConfirmOrder {
    fn handle<'a>(&'a self, event: &'a AnyEvent) -> BoxFuture<'a, Result<Vec<AnyEvent>, Failure>> {
        async move {
            let AnyEvent::PaymentCharged(charged) = event else {
                return Err(Failure::BusinessRule(format!(
                    "confirm-order handles payment.charged, not {}",
                    event.event_type()
                )));
            };
            let cause = &charged.envelope;
            let confirmed = OrderConfirmed {
                envelope: Envelope {
                    causation_id: Some(cause.event_id),
                    ..Envelope::new::<OrderConfirmed>(&self.source, cause.correlation_id, None)
                },
                data: OrderConfirmedData {
                    order_id: charged.data.order_id,
                    total: charged.data.amount.clone(),
                },
            };
            Ok(vec![AnyEvent::OrderConfirmed(confirmed)])
        }
        .boxed()
    }
}
