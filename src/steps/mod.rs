//! What a pipeline does with one event. A step returns an [`Outcome`] or a [`Failure`]; it never
//! decides about retries or dead-letter topics (the runtime does, through `failure`).

mod handlers;
mod http;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::contracts::AnyEvent;
use crate::failure::Failure;
use crate::pipeline::{Pipeline, Step};

pub use handlers::HANDLER_NAMES;
pub use http::HttpCaller;

/// What one input produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// New events, each published to the topic of its type.
    pub events: Vec<AnyEvent>,
    /// Topics (without prefix) that get a copy of the input record, key and headers kept.
    pub copies: Vec<String>,
}

/// A Rust handler for what no declared step can do. Register it in `handlers.rs` under a name a
/// pipeline file can use (`step: {custom: {handler: NAME}}`).
pub trait Handler: Send + Sync {
    /// Handles one event; the returned events are published (with causation set by the caller).
    fn handle<'a>(&'a self, event: &'a AnyEvent) -> BoxFuture<'a, Result<Vec<AnyEvent>, Failure>>;
}

/// What handlers may need from the process: the stores it was configured with.
#[derive(Debug, Clone, Default)]
pub struct HandlerContext {
    /// PostgreSQL, for handlers that keep state (the order-status read model).
    pub database_url: String,
}

/// A pipeline's step, ready to run.
#[derive(Clone)]
pub enum StepRunner {
    Route(Vec<String>),
    Http(HttpCaller),
    Custom(Arc<dyn Handler>),
}

impl StepRunner {
    pub fn for_pipeline(pipeline: &Pipeline, context: &HandlerContext) -> StepRunner {
        match &pipeline.step {
            Step::Route { to } => StepRunner::Route(to.clone()),
            Step::Http(http) => StepRunner::Http(HttpCaller::new(http.clone(), &pipeline.name)),
            Step::Custom { handler } => StepRunner::Custom(
                handlers::by_name(handler, context)
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
