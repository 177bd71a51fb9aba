//! Where an order stands, modelled once: the statuses the read model stores (as text, in
//! `orderflow_order_status.status`) and serves on `GET /orders/{id}`, and which of them are
//! final. Their text is stored: renaming one is a data migration, not a refactor.
//!
//! How events move an order between them is the read model's ([`crate::projection`]); this
//! file only names the statuses.

use std::fmt;

/// An order's status in the read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    /// Created; no step has reported yet.
    Placed,
    /// At least one step (inventory, payment, shipment) has reported, none failed.
    Processing,
    /// A step failed or was undone: the saga is compensating.
    Cancelling,
    /// Every step succeeded (`order.confirmed`).
    Confirmed,
    /// Every finished step was undone (`order.cancelled`).
    Cancelled,
}

impl OrderStatus {
    /// The statuses after which an order changes no more (what retention may delete).
    pub const FINAL: [OrderStatus; 2] = [OrderStatus::Confirmed, OrderStatus::Cancelled];

    /// The stored and served text.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Placed => "placed",
            OrderStatus::Processing => "processing",
            OrderStatus::Cancelling => "cancelling",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        OrderStatus::FINAL.contains(&self)
    }

    /// The status stored as `text`; an unknown text reads as placed (the least advanced).
    pub fn from_stored(text: &str) -> OrderStatus {
        match text {
            "processing" => OrderStatus::Processing,
            "cancelling" => OrderStatus::Cancelling,
            "confirmed" => OrderStatus::Confirmed,
            "cancelled" => OrderStatus::Cancelled,
            _ => OrderStatus::Placed,
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for OrderStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_back_from_its_stored_text() {
        use OrderStatus::*;
        for status in [Placed, Processing, Cancelling, Confirmed, Cancelled] {
            assert_eq!(OrderStatus::from_stored(status.as_str()), status);
        }
        assert_eq!(OrderStatus::from_stored("unknown"), Placed);
        assert!(Confirmed.is_final() && Cancelled.is_final() && !Cancelling.is_final());
    }
}
