//! Rules and alarms over HTTP (scope `admin`; reads also `telemetry:read`):
//! `POST /api/v1/rules` (create or replace; 201 new, 200 replaced), `GET /api/v1/rules` →
//! `{"rules": [...]}`, `GET`/`DELETE /api/v1/rules/{id}`, `GET /api/v1/alarms?state=open|
//! active|acknowledged|cleared&device=D&rule=R&limit=N` → `{"alarms": [...]}` newest first,
//! `POST /api/v1/alarms/{id}/ack` → the alarm. A rule or alarm JSON is described in
//! [`crate::rules`]. A bad rule is a 400 `invalid_rule` whose description names the line and
//! column of a bad condition.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use stratus_store::{AlarmFilter, AlarmQuery, AlarmState};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::{SCOPE_ADMIN, SCOPE_TELEMETRY_READ};
use crate::rules::engine::alarm_json;
use crate::rules::service::{AckError, RuleError};
use crate::rules::{RuleDef, Rules};

/// Default alarm page.
const DEFAULT_LIMIT: usize = 100;
/// Largest alarm page.
const MAX_LIMIT: usize = 1000;

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_rule, list_rules))
        .routes(routes!(get_rule, delete_rule))
        .routes(routes!(list_alarms))
        .routes(routes!(ack_alarm))
}

fn rules(state: &ApiState) -> Result<&std::sync::Arc<Rules>, ApiError> {
    state.ingest.rules().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the rules engine is not running",
        )
    })
}

fn invalid_rule(why: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_rule", why)
}

/// Creates a rule, or replaces the rule with the same id.
#[utoipa::path(
    post,
    path = "/api/v1/rules",
    tag = "rules",
    request_body(content = Object, description = "The rule (see the rules section of the README)"),
    responses(
        (status = 201, description = "Created: the stored rule", body = Object),
        (status = 200, description = "Replaced: the stored rule", body = Object),
        (status = 400, description = "invalid_rule: what is wrong (line and column of a bad condition)", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create_rule(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = caller.require(SCOPE_ADMIN)?.id.clone();
    let rules = rules(&state)?;
    let value = super::devices::json_body(body)?;
    let def: RuleDef =
        serde_json::from_value(value).map_err(|e| invalid_rule(format!("invalid rule: {e}")))?;
    let (def, created) = rules.put(def).await.map_err(|e| match e {
        RuleError::Invalid(e) => invalid_rule(e.0),
        RuleError::Store(e) => ApiError::from(e),
    })?;
    let id = def.id.clone().unwrap_or_default();
    crate::audit::record(
        &state.store,
        &actor,
        if created {
            "rule.create"
        } else {
            "rule.replace"
        },
        &id,
        json!({ "condition": def.condition }),
    );
    tracing::info!(rule = %id, by = %actor, created, "rule stored");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(def)).into_response())
}

/// Lists the rules, by id: `{"rules": [...]}`.
#[utoipa::path(
    get,
    path = "/api/v1/rules",
    tag = "rules",
    responses(
        (status = 200, description = "`{\"rules\": [...]}`", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin or telemetry:read", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_rules(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(SCOPE_TELEMETRY_READ)?;
    Ok(Json(json!({ "rules": rules(&state)?.rules() })))
}

/// One rule.
#[utoipa::path(
    get,
    path = "/api/v1/rules/{id}",
    tag = "rules",
    params(("id" = String, Path, description = "Rule id")),
    responses(
        (status = 200, description = "The rule", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin or telemetry:read", body = ErrorBody),
        (status = 404, description = "No such rule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_rule(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RuleDef>, ApiError> {
    caller.require(SCOPE_TELEMETRY_READ)?;
    rules(&state)?
        .rule(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("rule {id:?} not found")))
}

/// Deletes a rule; its open alarms clear (the alarm history stays).
#[utoipa::path(
    delete,
    path = "/api/v1/rules/{id}",
    tag = "rules",
    params(("id" = String, Path, description = "Rule id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin", body = ErrorBody),
        (status = 404, description = "No such rule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn delete_rule(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let actor = caller.require(SCOPE_ADMIN)?.id.clone();
    rules(&state)?.delete(&id).await?;
    crate::audit::record(&state.store, &actor, "rule.delete", &id, Value::Null);
    tracing::info!(rule = %id, by = %actor, "rule deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The query of `GET /api/v1/alarms`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlarmParams {
    /// `open` (active or acknowledged), `active`, `acknowledged` or `cleared`; all when absent.
    pub state: Option<String>,
    /// Only this device's.
    pub device: Option<String>,
    /// Only this rule's.
    pub rule: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// Lists alarms, newest first: `{"alarms": [...]}`.
#[utoipa::path(
    get,
    path = "/api/v1/alarms",
    tag = "rules",
    params(AlarmParams),
    responses(
        (status = 200, description = "`{\"alarms\": [...]}`", body = Object),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin or telemetry:read", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_alarms(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<AlarmParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.require(SCOPE_TELEMETRY_READ)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = match q.state.as_deref() {
        None | Some("") | Some("all") => AlarmFilter::Any,
        Some("open") => AlarmFilter::Open,
        Some(s) => AlarmFilter::State(AlarmState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state must be open, active, acknowledged or cleared (got {s:?})"
            ))
        })?),
    };
    let limit = match q.limit {
        Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
        Some(n) => n.min(MAX_LIMIT),
        None => DEFAULT_LIMIT,
    };
    let alarms = state
        .store
        .alarms(AlarmQuery {
            filter,
            device: q.device.filter(|d| !d.is_empty()),
            rule: q.rule.filter(|r| !r.is_empty()),
            limit,
        })
        .await?;
    let alarms: Vec<Value> = alarms.iter().map(alarm_json).collect();
    Ok(Json(json!({ "alarms": alarms })))
}

/// Acknowledges an alarm: active → acknowledged (acknowledging again changes nothing).
#[utoipa::path(
    post,
    path = "/api/v1/alarms/{id}/ack",
    tag = "rules",
    params(("id" = String, Path, description = "Alarm id")),
    responses(
        (status = 200, description = "The alarm", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin", body = ErrorBody),
        (status = 404, description = "No such alarm", body = ErrorBody),
        (status = 409, description = "The alarm is cleared", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn ack_alarm(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let actor = caller.require(SCOPE_ADMIN)?.id.clone();
    let alarm = rules(&state)?.ack(&id).await.map_err(|e| match e {
        AckError::NotFound(_) => ApiError::not_found(e.to_string()),
        AckError::Cleared(_) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
        AckError::Store(e) => ApiError::from(e),
    })?;
    crate::audit::record(&state.store, &actor, "alarm.ack", &id, Value::Null);
    Ok(Json(alarm_json(&alarm)))
}
