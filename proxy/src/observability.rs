//! The observability HTTP listener: `/metrics` (Prometheus text), `/filter` (change the log
//! filter live), `/ready` (200 once every source listens) and `/live`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::FilterHandle;

pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct AppState {
    filter: FilterHandle,
    ready: Arc<AtomicBool>,
}

/// Binds the listener; serving starts with [`serve`].
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the observability interface {addr}"))
}

pub async fn serve(
    listener: TcpListener,
    filter: FilterHandle,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/",
            get(|| async { "shotover: try /metrics, /config, /ready, /live or PUT /filter\n" }),
        )
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .route("/filter", put(set_filter))
        .route("/ready", get(ready_check))
        .route("/live", get(|| async { "live\n" }))
        .with_state(AppState { filter, ready });
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the observability listener stopped");
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        crate::metrics::global().render(),
    )
}

/// The running config: its hash, generation, sources, and the last refused reload.
async fn config() -> impl IntoResponse {
    let body = serde_json::to_string_pretty(&crate::reload::status()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body + "\n")
}

/// Whether a peer may change the proxy (`PUT /filter`): only from the same host or Pod,
/// whatever interface the listener is on (on Kubernetes it is `0.0.0.0`, for the probes and
/// the metrics scrapes).
pub fn may_change(peer: std::net::SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

async fn set_filter(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    body: String,
) -> (StatusCode, String) {
    if !may_change(peer) {
        tracing::warn!(%peer, "PUT /filter refused: not from localhost");
        return (
            StatusCode::FORBIDDEN,
            "PUT /filter is accepted from localhost only (from the Pod: kubectl exec, or kubectl port-forward)\n".into(),
        );
    }
    match state.filter.set(body.trim()) {
        Ok(()) => {
            tracing::info!(filter = body.trim(), "log filter changed");
            (StatusCode::OK, "log filter changed\n".into())
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e:#}\n")),
    }
}

async fn ready_check(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: sources are not listening yet, or shutting down\n",
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_local_peers_may_change_the_proxy() {
        for local in [
            "127.0.0.1:5000",
            "127.8.9.1:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(
                super::may_change(local.parse().expect("address")),
                "{local}"
            );
        }
        for remote in [
            "10.244.0.5:5000",
            "192.168.1.2:5000",
            "[fd00::1]:5000",
            "[::ffff:10.0.0.1]:5000",
        ] {
            assert!(
                !super::may_change(remote.parse().expect("address")),
                "{remote}"
            );
        }
    }
}
