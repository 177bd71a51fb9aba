//! `/metrics` (Prometheus text format), `/healthz` (the process is serving) and `/readyz` (every
//! processor and saga orchestrator is in its group, and a processor's broker and registry answer).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Telemetry;

/// Something `/readyz` asks.
pub trait Readiness: Send + Sync {
    fn is_ready(&self) -> bool;
}

impl Readiness for Telemetry {
    fn is_ready(&self) -> bool {
        Telemetry::is_ready(self)
    }
}

impl Readiness for super::saga::SagaTelemetry {
    fn is_ready(&self) -> bool {
        super::saga::SagaTelemetry::is_ready(self)
    }
}

/// What `/readyz` checks, by name.
pub type ReadinessChecks = Vec<(String, Arc<dyn Readiness>)>;

/// Serves until the returned task is aborted. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    processors: ReadinessChecks,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Arc::new(processors));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok((addr, task))
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::encode(),
    )
}

async fn ready(State(processors): State<Arc<ReadinessChecks>>) -> impl IntoResponse {
    let not_ready: Vec<&str> = processors
        .iter()
        .filter(|(_, t)| !t.is_ready())
        .map(|(name, _)| name.as_str())
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", not_ready.join(", ")),
        )
    }
}
