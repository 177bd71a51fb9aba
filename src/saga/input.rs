//! What the orchestrator reads, decoded: an order that starts a saga, a reply, or a command
//! found in its pipeline's dead-letter topic. Invariant: an input is decoded by the type its
//! topic carries (never by what the payload claims), and whether an undecodable input is read
//! again later or ignored for good is decided by `failure.rs` (a `service` failure, such as the
//! registry out of reach, is read again; a `permanent` one is ignored and counted). It decides
//! nothing about sagas.

use std::collections::HashMap;

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use uuid::Uuid;

use super::definition::{Saga, Source};
use super::state::Input;
use crate::contracts::{AnyEvent, DecodeError, EventCodec, OrderCreated};
use crate::failure::{Classifier, ErrorClass, Failure};
use crate::kafka::headers;

/// An input, decoded.
pub enum Decoded {
    Started(OrderCreated),
    Reply(AnyEvent),
    DeadLettered { command: AnyEvent, error: String },
}

impl Decoded {
    pub fn order_id(&self) -> Uuid {
        match self {
            Decoded::Started(o) => o.data.order_id,
            Decoded::Reply(e) | Decoded::DeadLettered { command: e, .. } => {
                Uuid::parse_str(&e.key()).unwrap_or_default()
            }
        }
    }

    pub fn as_input(&self) -> Input<'_> {
        match self {
            Decoded::Started(o) => Input::Started(o),
            Decoded::Reply(e) => Input::Reply(e),
            Decoded::DeadLettered { command, error } => Input::DeadLettered {
                command,
                error: error.clone(),
            },
        }
    }
}

/// Decodes an input; `Ok(None)` for one that can never be decoded (logged; the caller counts
/// it) or that comes from a topic the saga does not read, `Err` for one that may decode later.
pub async fn decode(
    saga: &Saga,
    sources: &HashMap<String, Source>,
    codec: &EventCodec,
    message: &OwnedMessage,
) -> Result<Option<Decoded>, DecodeError> {
    let Some(source) = sources.get(message.topic()) else {
        return Ok(None);
    };
    let (event_type, dead) = match source {
        Source::Start => (saga.starts_on.as_str(), false),
        Source::Reply(t) => (t.as_str(), false),
        Source::DeadLetters { command } => (command.as_str(), true),
    };
    match AnyEvent::decode(codec, event_type, message.payload()).await {
        Ok(event) => Ok(Some(match (event, dead) {
            (AnyEvent::OrderCreated(order), false) => Decoded::Started(order),
            (event, false) => Decoded::Reply(event),
            (command, true) => Decoded::DeadLettered {
                command,
                error: dead_letter_error(message),
            },
        })),
        Err(e) => {
            let failure = Failure::Decode(e);
            // The saga has no retry tiers: what the runtime would retry, it reads again.
            if Classifier::default().classify(&failure) != ErrorClass::Permanent {
                let Failure::Decode(e) = failure else {
                    unreachable!("built above")
                };
                return Err(e);
            }
            tracing::warn!(
                saga = %saga.name,
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                "input ignored, it cannot be decoded: {failure}"
            );
            Ok(None)
        }
    }
}

/// The error a dead letter's header records, bounded (it lands in the saga's history).
fn dead_letter_error(message: &OwnedMessage) -> String {
    headers::error_message(message.headers()).unwrap_or_else(|| "no error recorded".into())
}
