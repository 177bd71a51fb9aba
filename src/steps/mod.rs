//! What a pipeline does with one event. A step returns an [`Outcome`] or a [`Failure`]; it never
//! decides about retries or dead-letter topics (the runtime does, through `failure`).

mod handlers;
mod http;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::contracts::AnyEvent;
use crate::failure::Failure;
use crate::pipeline::{Pipeline, Step};

pub use handlers::{Handlers, HANDLER_NAMES, ORDER_STATUS};
pub use http::HttpCaller;

/// What one input produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// New events, each published to the topic of its type.
    pub events: Vec<AnyEvent>,
    /// Topics (without prefix) that get a copy of the input record, key and headers kept.
    pub copies: Vec<String>,
}

/// A Rust handler for what no declared step can do. Its name (one a pipeline file can use:
/// `step: {custom: {handler: NAME}}`) is listed in `handlers.rs`; the app builder registers it.
pub trait Handler: Send + Sync {
    /// Handles one event; the returned events are published (with causation set by the caller).
    fn handle<'a>(&'a self, event: &'a AnyEvent) -> BoxFuture<'a, Result<Vec<AnyEvent>, Failure>>;
}

/// A pipeline's step, ready to run.
#[derive(Clone)]
pub enum StepRunner {
    Route(Vec<String>),
    Http(HttpCaller),
    Custom(Arc<dyn Handler>),
}

impl StepRunner {
    pub fn for_pipeline(pipeline: &Pipeline, handlers: &Handlers) -> StepRunner {
        match &pipeline.step {
            Step::Route { to } => StepRunner::Route(to.clone()),
            Step::Http(http) => StepRunner::Http(HttpCaller::new(http.clone(), &pipeline.name)),
            Step::Custom { handler } => StepRunner::Custom(
                handlers
                    .make(handler)
                    .expect("pipeline validation accepts registered handler names only"),
            ),
        }
    }

    /// Whether running the step again does something outside Kafka (a call, a database write).
    pub fn has_effects(&self) -> bool {
        !matches!(self, StepRunner::Route(_))
    }

    pub async fn run(&self, event: &AnyEvent) -> Result<Outcome, Failure> {
        match self {
            StepRunner::Route(to) => Ok(Outcome {
                events: Vec::new(),
                copies: to.clone(),
            }),
            StepRunner::Http(caller) => Ok(Outcome {
                events: vec![caller.call(event).await?],
                copies: Vec::new(),
            }),
            StepRunner::Custom(handler) => Ok(Outcome {
                events: handler.handle(event).await?,
                copies: Vec::new(),
            }),
        }
    }
}
