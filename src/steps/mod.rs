//! What a pipeline does with one event. A step returns an [`Outcome`] or a [`Failure`]; it never
//! decides about retries or dead-letter topics (the runtime does, through `failure`).

mod handlers;
mod http;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::contracts::{AnyEvent, Naming};
use crate::failure::Failure;
use crate::pipeline::{Pipeline, Step};

pub use handlers::{Handlers, HANDLER_NAMES, ORDER_STATUS};
pub use http::HttpCaller;

/// What one input produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// New events, each published to the topic of its type.
    pub events: Vec<AnyEvent>,
    /// Topics (prefix included) that get a copy of the input record, key and headers kept.
    /// Shared with the step: routing allocates no name per record.
    pub copies: Arc<[Arc<str>]>,
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
    /// The topics to copy to, prefix included.
    Route(Arc<[Arc<str>]>),
    Http(HttpCaller),
    Custom(Arc<dyn Handler>),
}

impl StepRunner {
    pub fn for_pipeline(pipeline: &Pipeline, handlers: &Handlers, naming: &Naming) -> StepRunner {
        match &pipeline.step {
            Step::Route { to } => {
                StepRunner::Route(to.iter().map(|t| Arc::from(naming.topic(t))).collect())
            }
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

    /// Whether the step answers at once, never waiting on anything (a route): it may then run
    /// on the engine's own task.
    pub fn is_immediate(&self) -> bool {
        matches!(self, StepRunner::Route(_))
    }

    pub async fn run(&self, event: &AnyEvent) -> Result<Outcome, Failure> {
        match self {
            StepRunner::Route(to) => Ok(Outcome {
                events: Vec::new(),
                copies: to.clone(),
            }),
            StepRunner::Http(caller) => Ok(Outcome {
                events: vec![caller.call(event).await?],
                copies: Arc::new([]),
            }),
            StepRunner::Custom(handler) => Ok(Outcome {
                events: handler.handle(event).await?,
                copies: Arc::new([]),
            }),
        }
    }
}
