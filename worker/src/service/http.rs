//! `/healthz` (live), `/readyz` (model loaded, queue reachable, not draining) and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::metrics::Metrics;

/// What the probes report, updated by the service.
#[derive(Default)]
pub struct Health {
    pub model_loaded: AtomicBool,
    pub queue_reachable: AtomicBool,
    pub draining: AtomicBool,
    /// Cleared if the inference thread dies: the pod is then not alive and gets restarted.
    pub inference_alive: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.model_loaded.load(Ordering::Relaxed)
            && self.queue_reachable.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }

    pub fn alive(&self) -> bool {
        // Before the model is loaded the inference thread has not started: that is alive.
        !self.model_loaded.load(Ordering::Relaxed) || self.inference_alive.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The router for the worker's HTTP port.
pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(clip_contract::HEALTHZ_PATH, get(healthz))
        .route(clip_contract::READYZ_PATH, get(readyz))
        .route(clip_contract::METRICS_PATH, get(metrics_text))
        .with_state(AppState { health, metrics })
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "inference thread stopped\n",
        )
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    if h.ready() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let mut why = Vec::new();
    if !h.model_loaded.load(Ordering::Relaxed) {
        why.push("model loading");
    }
    if !h.queue_reachable.load(Ordering::Relaxed) {
        why.push("queue not reachable");
    }
    if h.draining.load(Ordering::Relaxed) {
        why.push("draining");
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}\n", why.join(", ")),
    )
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(s.health.ready()));
    (
        [(header::CONTENT_TYPE, clip_contract::metrics::CONTENT_TYPE)],
        s.metrics.encode(),
    )
}
