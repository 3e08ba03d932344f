//! The operator's HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive and not stuck: no reconcile has run for longer than [`crate::metrics::STUCK`]) and
//! `/readyz` (it has checked the CRD and serves; a standby replica is ready too).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the Prometheus text exposition.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether the process does its work (`Err(why)`: `/healthz` answers 500 with it).
pub type Live = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Always live (the webhook: a stuck admission fails its own request, nothing else).
pub fn always_live() -> Live {
    Arc::new(|| Ok(()))
}

/// `/metrics`, `/healthz` and `/readyz` (also used by the webhook).
pub fn router(metrics: RenderMetrics, ready: Arc<AtomicBool>, live: Live) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let live = live();
                async move {
                    match live {
                        Ok(()) => (StatusCode::OK, "ok\n".to_owned()).into_response(),
                        Err(why) => {
                            tracing::error!(%why, "not live");
                            (StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n")).into_response()
                        }
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
                    }
                }
            }),
        )
}

pub async fn serve(
    listener: TcpListener,
    metrics: RenderMetrics,
    ready: Arc<AtomicBool>,
    live: Live,
    shutdown: CancellationToken,
) {
    let app = router(metrics, ready, live);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "the HTTP listener failed");
    }
}
