//! The JSON HTTP API under `/oauth` and `/api/v1` (see `SPEC.md`): shared state, the error
//! shape, bearer authentication (RFC 6750) and the OpenAPI document built from the handlers.
//!
//! Each submodule contributes its routes as a `utoipa_axum` [`OpenApiRouter`], so the
//! OpenAPI 3 document at `/api/openapi.json` is generated from the handlers' own annotations
//! and cannot drift from what is served.

pub mod audit;
pub mod devices;
pub mod firmware;
pub mod oauth;
pub mod rules;
pub mod stream;
pub mod telemetry;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use stratus_store::{StoreError, StoreHandle};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::{Auth, AuthError, Principal};
use crate::broker::Broker;

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The broker (config and telemetry are published to MQTT subscribers).
    pub broker: Arc<Broker>,
    /// The store.
    pub store: StoreHandle,
    /// Credentials and tokens.
    pub auth: Arc<Auth>,
    /// Failed logins, aggregated for the audit log.
    pub failures: Arc<crate::audit::failures::FailureLog>,
    /// The telemetry pipeline.
    pub ingest: Arc<crate::pipeline::Pipeline>,
    /// Largest request body accepted, in bytes (more: 413).
    pub max_body: usize,
    /// The firmware service (`None`: the firmware routes answer 503).
    pub firmware: Option<Arc<crate::firmware::Firmware>>,
    /// The audit head exporter: verification also holds the log to its last head.
    pub audit_heads: Option<Arc<crate::audit::AuditHeads>>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stratus API",
        description = "Devices, OAuth 2.0, telemetry, configuration and firmware of a Stratus IoT cloud."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every API route with its OpenAPI description.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(oauth::routes())
        .merge(devices::routes())
        .merge(audit::routes())
        .merge(telemetry::routes())
        .merge(rules::routes())
        .merge(stream::routes())
        .merge(firmware::routes())
}

/// The error body of every API failure.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code (RFC 6749 §5.2 / RFC 6750 §3.1 codes where they apply).
    pub error: String,
    /// Human-readable explanation.
    pub error_description: String,
}

/// An API failure: status, code, description, and for bearer failures the
/// `WWW-Authenticate` challenge (RFC 6750 §3).
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable description.
    pub description: String,
    /// `WWW-Authenticate` value, if any.
    pub challenge: Option<String>,
    /// `Retry-After` in seconds, if any (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`, `code` and `description`.
    pub fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            description: description.into(),
            challenge: None,
            retry_after: None,
        }
    }

    /// 429 `too_many_requests` with `Retry-After` (at least a second).
    pub fn too_many_requests(description: impl Into<String>, retry_after_ms: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after_ms.div_ceil(1000).max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                description,
            )
        }
    }

    /// The answer to an authentication that was not verified: a ban (429) or a full argon2
    /// queue (503, retry in a second); `None` for every other error.
    pub fn from_auth_backoff(e: &crate::auth::AuthError) -> Option<Self> {
        match e {
            crate::auth::AuthError::Throttled { retry_after_ms } => Some(Self::too_many_requests(
                "too many failed attempts from this address or for this client; retry later",
                *retry_after_ms,
            )),
            crate::auth::AuthError::Busy => Some(ApiError {
                retry_after: Some(1),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "the server is busy verifying credentials; retry in a second",
                )
            }),
            _ => None,
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// 404 `not_found`.
    pub fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", description)
    }

    /// 401 `invalid_token` with its challenge (RFC 6750 §3.1).
    pub fn invalid_token(description: impl Into<String>) -> Self {
        let description = description.into();
        ApiError {
            challenge: Some(format!(
                "Bearer realm=\"stratus\", error=\"invalid_token\", error_description=\"{}\"",
                description.replace('"', "'")
            )),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_token", description)
        }
    }

    /// 403 `insufficient_scope` naming the scope needed (RFC 6750 §3.1).
    pub fn insufficient_scope(scope: &str) -> Self {
        ApiError {
            challenge: Some(format!(
                "Bearer realm=\"stratus\", error=\"insufficient_scope\", scope=\"{scope}\""
            )),
            ..Self::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this needs the scope {scope}"),
            )
        }
    }

    /// 500 `server_error` (details go to the log, not the client).
    pub fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("{what} failed"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { kind, id } => {
                ApiError::not_found(format!("{kind} {id:?} not found"))
            }
            StoreError::Conflict { kind, id } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{kind} {id:?} already exists"),
            ),
            StoreError::VersionMismatch { current } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                format!("the current version is {current}"),
            ),
            StoreError::Invalid(why) => ApiError::bad_request(why),
            other => ApiError::internal("the store", &other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": self.code, "error_description": self.description})),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        response
    }
}

/// The caller of a request, authenticated by `Authorization: Bearer <token>` (RFC 6750 §2.1)
/// or, without that header, by the dashboard's session cookie (then a state-changing method
/// must pass the CSRF check of [`crate::dashboard::check_csrf`], else 403).
/// A missing, malformed, expired, revoked or foreign token is a 401 `invalid_token`.
pub struct Caller(pub Principal);

impl Caller {
    /// The principal, if it holds `scope` (else 403 `insufficient_scope`).
    pub fn require(&self, scope: &str) -> Result<&Principal, ApiError> {
        if self.0.has_scope(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::insufficient_scope(scope))
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        // Without `Authorization`, the dashboard's session cookie (CSRF-checked) will do.
        let (token, from_cookie) = match parts.headers.get(header::AUTHORIZATION) {
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| {
                        let (scheme, rest) = v.split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
                    })
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        ApiError::invalid_token("expected Authorization: Bearer <token>")
                    })?;
                (token, false)
            }
            None => match crate::dashboard::session_token(&parts.headers) {
                Some(token) => (token, true),
                None => return Err(ApiError::invalid_token("an access token is required")),
            },
        };
        let remote = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0);
        let source = remote.map(|r| r.ip());
        match state.auth.verify_token(token) {
            Ok((principal, _)) => {
                if from_cookie {
                    crate::dashboard::check_csrf(&parts.method, &parts.headers, token)?;
                }
                Ok(Caller(principal))
            }
            Err(AuthError::InvalidToken(why)) => {
                state.auth.record_failure(source, None);
                let backoff = state.auth.check_throttle(source, None).err();
                state.failures.record(crate::audit::failures::Failure {
                    transport: "http",
                    target: "api",
                    remote,
                    identity: None,
                    reason: why,
                    throttled: backoff.is_some(),
                });
                if let Some(e) = backoff {
                    // A source that keeps showing bad tokens is told to slow down.
                    state.broker.metrics.limit_hit("auth_throttle", 1);
                    if let Some(refusal) = ApiError::from_auth_backoff(&e) {
                        return Err(refusal);
                    }
                }
                state.broker.metrics.auth_failure("http");
                Err(ApiError::invalid_token(why))
            }
            Err(e) => Err(ApiError::internal("token verification", &e)),
        }
    }
}
