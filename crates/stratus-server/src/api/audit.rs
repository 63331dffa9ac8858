//! The audit log over HTTP (scope `admin`): `GET /api/v1/audit` lists entries,
//! `GET /api/v1/audit/verify` recomputes the keyed hash chain (see [`crate::audit`]) and holds
//! the log to the last head the server exported, so entries cut since then are reported.
//!
//! An entry: `{"seq": 7, "at": "2024-05-01T12:00:00.000Z", "actor": "admin",
//! "action": "device.create", "target": "pump-7", "detail": {…}, "prev_hash": "…", "hash": "…"}`;
//! a page: `{"entries": [...], "next": 8 | null}` (pass `next` as `?from=`). The verdict:
//! `{"intact": true, "entries": 7, "head_hash": "…" | null, "head": "7:…"}` (`head` is the
//! `SEQ:HASH` to keep for `stratus audit verify --head`) or
//! `{"intact": false, "broken_at": 4, "reason": "content does not match its hash"}`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stratus_store::{AuditCheck, AuditEntry, AuditVerdict};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::devices::rfc3339_ms;
use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::SCOPE_ADMIN;

/// Default page size.
const DEFAULT_PAGE: usize = 100;
/// Largest page size (larger asks are clamped).
const MAX_PAGE: usize = 1000;

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_audit))
        .routes(routes!(verify_audit))
}

/// An audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryView {
    /// Position in the log: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// When it happened (RFC 3339, UTC).
    pub at: String,
    /// Who did it (a client id).
    pub actor: String,
    /// What was done (`device.create`, `config.put`, …).
    pub action: String,
    /// What it was done to (a device id).
    pub target: String,
    /// What changed.
    #[schema(value_type = Object)]
    pub detail: Value,
    /// The previous entry's hash.
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

impl From<&AuditEntry> for AuditEntryView {
    fn from(e: &AuditEntry) -> Self {
        AuditEntryView {
            seq: e.seq,
            at: rfc3339_ms(e.ts_ms),
            actor: e.actor.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            detail: e.detail.clone(),
            prev_hash: e.prev_hash.clone(),
            hash: e.hash.clone(),
        }
    }
}

/// A page of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Entries in seq order.
    pub entries: Vec<AuditEntryView>,
    /// The `from` of the next page, or `null` when this is the last one.
    pub next: Option<u64>,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditVerification {
    /// Whether every entry verifies.
    pub intact: bool,
    /// How many entries there are (when intact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// The last entry's hash (when intact; `null` for an empty log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_hash: Option<Option<String>>,
    /// The head, `SEQ:HASH` (when intact; `0:000…` for an empty log): keep it elsewhere and
    /// pass it to `stratus audit verify --head` to detect entries cut later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The first entry that does not verify (when broken).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_at: Option<u64>,
    /// Why it does not (when broken).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&AuditVerdict> for AuditVerification {
    fn from(v: &AuditVerdict) -> Self {
        match v {
            AuditVerdict::Intact { entries, head_hash } => AuditVerification {
                intact: true,
                entries: Some(*entries),
                head_hash: Some(head_hash.clone()),
                head: v.head().map(|h| h.to_string()),
                broken_at: None,
                reason: None,
            },
            AuditVerdict::Broken(link) => AuditVerification {
                intact: false,
                entries: None,
                head_hash: None,
                head: None,
                broken_at: Some(link.seq),
                reason: Some(link.reason.to_string()),
            },
        }
    }
}

/// Paging of `GET /api/v1/audit`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The first seq to list (default 1).
    pub from: Option<u64>,
    /// Page size: 1 to 1000 (larger values are clamped), default 100.
    pub limit: Option<usize>,
}

/// Lists audit entries from a sequence number on.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of entries", body = AuditPage),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_audit(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    caller.require(SCOPE_ADMIN)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = match q.limit {
        Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
        Some(n) => n.min(MAX_PAGE),
        None => DEFAULT_PAGE,
    };
    let from = q.from.unwrap_or(1).max(1);
    let mut entries = state.store.list_audit(from, limit + 1).await?;
    let next = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|e| e.seq + 1)
    } else {
        None
    };
    Ok(Json(AuditPage {
        entries: entries.iter().map(AuditEntryView::from).collect(),
        next,
    }))
}

/// Recomputes the audit log's keyed hash chain, checks that it still reaches the last head the
/// server exported, and names the first entry that does not verify.
#[utoipa::path(
    get,
    path = "/api/v1/audit/verify",
    tag = "audit",
    responses(
        (status = 200, description = "The verdict", body = AuditVerification),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn verify_audit(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<AuditVerification>, ApiError> {
    caller.require(SCOPE_ADMIN)?;
    let heads = match &state.audit_heads {
        Some(exporter) => exporter.last().await.into_iter().collect(),
        None => Vec::new(),
    };
    let verdict = state
        .store
        .check_audit(AuditCheck {
            resume: None,
            heads,
        })
        .await?;
    Ok(Json(AuditVerification::from(&verdict)))
}
