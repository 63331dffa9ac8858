//! The HTTP listener (axum): health, Prometheus metrics, and the JSON error shape of the API.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::broker::Broker;

/// An API error rendered as `{"error": CODE, "error_description": TEXT}` with its status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable description.
    pub description: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "error_description": self.description})),
        )
            .into_response()
    }
}

/// The router for the HTTP listener.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(broker)
}

async fn healthz(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": broker.started.elapsed().as_secs(),
    }))
}

async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    broker
        .metrics
        .uptime_seconds
        .set(broker.started.elapsed().as_secs() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        broker.metrics.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        description: "no such resource".into(),
    }
}
