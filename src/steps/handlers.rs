//! Custom handlers by the name pipeline files use: the names a file may use, and the registry of
//! their implementations. Steps know no handler: each lives with what it owns (the read model's
//! in [`crate::projection`]) and the app builder ([`crate::app`]) registers it here, so `steps`
//! never reaches up into the modules that implement [`Handler`].

use std::sync::Arc;

use super::Handler;

/// The order-status read model (`src/projection`).
pub const ORDER_STATUS: &str = "order-status";

/// Names a pipeline's `step.custom.handler` may use; each is registered by the app builder.
pub const HANDLER_NAMES: [&str; 1] = [ORDER_STATUS];

/// Builds a fresh handler: each pipeline using a name gets its own.
type MakeHandler = Arc<dyn Fn() -> Arc<dyn Handler> + Send + Sync>;

/// The custom handlers a process can run, by name.
#[derive(Clone, Default)]
pub struct Handlers {
    by_name: Vec<(&'static str, MakeHandler)>,
}

impl Handlers {
    /// Registers `make` under `name` (one of [`HANDLER_NAMES`]).
    pub fn register(
        mut self,
        name: &'static str,
        make: impl Fn() -> Arc<dyn Handler> + Send + Sync + 'static,
    ) -> Handlers {
        self.by_name.push((name, Arc::new(make)));
        self
    }

    /// The registered names.
    pub fn names(&self) -> Vec<&'static str> {
        self.by_name.iter().map(|(name, _)| *name).collect()
    }

    /// A new handler of `name`, if one is registered.
    pub fn make(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.by_name
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, make)| make())
    }
}
