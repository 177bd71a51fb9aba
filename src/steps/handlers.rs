//! Custom handlers, by the name pipeline files use.

use std::sync::Arc;

use super::{Handler, HandlerContext};

/// Names a pipeline's `step.custom.handler` may use.
pub const HANDLER_NAMES: [&str; 1] = ["order-status"];

pub fn by_name(name: &str, context: &HandlerContext) -> Option<Arc<dyn Handler>> {
    match name {
        // The order-status read model (src/projection).
        "order-status" => Some(Arc::new(crate::projection::OrderStatusHandler::new(
            &context.database_url,
        ))),
        _ => None,
    }
}
