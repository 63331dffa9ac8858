//! The audit log over HTTP (scope `admin`): `GET /api/v1/audit` lists entries,
//! `GET /api/v1/audit/failures` the failed logins kept beside the chain (aggregated, pruned
//! after `[audit] failure_retention_days`: see [`crate::audit::failures`]),
//! `GET /api/v1/audit/verify` recomputes the keyed hash chain (see [`crate::audit`]), checks the
//! failure entries against it, and holds the log to the last head the server exported, so
//! entries cut since then are reported.
//!
//! An entry: `{"seq": 7, "at": "2024-05-01T12:00:00.000Z", "actor": "admin",
//! "action": "device.create", "target": "pump-7", "detail": {…}, "prev_hash": "…", "hash": "…"}`;
//! a page: `{"entries": [...], "next": 8 | null}` (pass `next` as `?from=`). A failure entry:
//! `{"id": 3, "batch": 7, "at": "…", "actor": "mallory", "action": "auth.failure",
//! "target": "oauth/token", "detail": {"count": 212, "throttled": 202, "first": "…",
//! "last": "…", "source": "192.0.2.7", "remote": "192.0.2.7:51234", "transport": "oauth",
//! "reason": "…"}}`, paged the same way by `id`. The verdict:
//! `{"intact": true, "entries": 7, "head_hash": "…" | null, "head": "7:…"}` (`head` is the
//! `SEQ:HASH` to keep for `stratus audit verify --head`) or
//! `{"intact": false, "broken_at": 4, "reason": "content does not match its hash"}`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stratus_store::{AuditCheck, AuditEntry, AuditVerdict, FailureEntry};
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
        .routes(routes!(list_audit_failures))
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

/// A failure entry: the failed logins of one source, identity and endpoint in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailureEntryView {
    /// Position among failure entries (increasing; gaps where entries were pruned).
    pub id: u64,
    /// The seq of the chain entry (`auth.failures`) that commits to it.
    pub batch: u64,
    /// The first attempt (RFC 3339, UTC).
    pub at: String,
    /// The claimed identity, or `anonymous` (`*` for the overflow entry).
    pub actor: String,
    /// `auth.failure`.
    pub action: String,
    /// The endpoint: `api`, `oauth/token`, `oauth/introspect`, `oauth/revoke`,
    /// `dashboard/login`, `mqtt`, `coap`, `coaps` (`overflow` for the overflow entry).
    pub target: String,
    /// `count`, `throttled`, `first`, `last`, `source`, `remote`, `transport`, `reason`.
    #[schema(value_type = Object)]
    pub detail: Value,
}

impl From<&FailureEntry> for FailureEntryView {
    fn from(e: &FailureEntry) -> Self {
        FailureEntryView {
            id: e.id,
            batch: e.batch,
            at: rfc3339_ms(e.ts_ms),
            actor: e.actor.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// A page of failure entries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailurePage {
    /// Entries in id order.
    pub entries: Vec<FailureEntryView>,
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

/// Paging of `GET /api/v1/audit` and `GET /api/v1/audit/failures`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The first seq (failure entries: id) to list (default 1).
    pub from: Option<u64>,
    /// Page size: 1 to 1000 (larger values are clamped), default 100.
    pub limit: Option<usize>,
}

impl AuditQuery {
    /// The first position and the page size.
    fn page(query: Result<Query<AuditQuery>, QueryRejection>) -> Result<(u64, usize), ApiError> {
        let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = match q.limit {
            Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
            Some(n) => n.min(MAX_PAGE),
            None => DEFAULT_PAGE,
        };
        Ok((q.from.unwrap_or(1).max(1), limit))
    }
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
    let (from, limit) = AuditQuery::page(query)?;
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

/// Lists the failed logins kept beside the chain (one entry per source, identity, endpoint and
/// window), from an id on.
#[utoipa::path(
    get,
    path = "/api/v1/audit/failures",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of failure entries", body = FailurePage),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks admin", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_audit_failures(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<FailurePage>, ApiError> {
    caller.require(SCOPE_ADMIN)?;
    let (from, limit) = AuditQuery::page(query)?;
    let mut entries = state.store.list_audit_failures(from, limit + 1).await?;
    let next = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|e| e.id + 1)
    } else {
        None
    };
    Ok(Json(FailurePage {
        entries: entries.iter().map(FailureEntryView::from).collect(),
        next,
    }))
}

/// Recomputes the audit log's keyed hash chain, checks the failure entries against it and that
/// it still reaches the last head the server exported, and names the first entry that does not
/// verify.
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
