//! What happens in a read-model projection, emitted from one type ([`ProjectionEvent`]).

use super::metrics::{metrics, ReadModelConflictLabels, ReadModelLabels};

#[derive(Debug)]
pub enum ProjectionEvent<'a> {
    /// An event changed an order's view.
    Applied { status: &'static str, lag_ms: i64 },
    /// An event was not applied: a duplicate, or older than what its source already shows.
    Conflict {
        reason: &'static str,
        event_type: &'a str,
    },
}

#[derive(Debug, Clone)]
pub struct ProjectionTelemetry {
    model: String,
}

impl ProjectionTelemetry {
    /// Creates the model's series at zero.
    pub fn new(model: &str) -> ProjectionTelemetry {
        let t = ProjectionTelemetry {
            model: model.to_string(),
        };
        for reason in ["duplicate", "out_of_order"] {
            let _ = metrics()
                .read_model_conflicts
                .get_or_create(&t.conflict(reason));
        }
        let _ = metrics().read_model_lag_seconds.get_or_create(&t.labels());
        t
    }

    fn labels(&self) -> ReadModelLabels {
        ReadModelLabels {
            model: self.model.clone(),
        }
    }

    fn conflict(&self, reason: &'static str) -> ReadModelConflictLabels {
        ReadModelConflictLabels {
            model: self.model.clone(),
            reason,
        }
    }

    pub fn emit(&self, event: ProjectionEvent<'_>) {
        match event {
            ProjectionEvent::Applied { status, lag_ms } => {
                metrics()
                    .read_model_lag_seconds
                    .get_or_create(&self.labels())
                    .observe(lag_ms.max(0) as f64 / 1000.0);
                tracing::trace!(model = %self.model, status, lag_ms, "projected");
            }
            ProjectionEvent::Conflict { reason, event_type } => {
                metrics()
                    .read_model_conflicts
                    .get_or_create(&self.conflict(reason))
                    .inc();
                tracing::debug!(model = %self.model, reason, event_type, "event not applied");
            }
        }
    }
}
