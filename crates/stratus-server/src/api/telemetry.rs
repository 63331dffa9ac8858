//! Telemetry over HTTP: ingestion (`POST /api/v1/telemetry`, a device's bearer token) and the
//! queries of `telemetry:read` applications — raw points with paging, aggregated buckets, and
//! the latest value of every series.
//!
//! Shapes:
//! - `POST /api/v1/telemetry` → 202 `{"accepted": RECORDS, "points": STORED, "duplicates":
//!   ALREADY_STORED}` (`points` is what a query returns that it did not before; `duplicates`
//!   are points whose series already held a value at that time, kept: a redelivery); 400
//!   `invalid_request` naming the record and field (also two values of one series at one
//!   time, or a time more than `max_future_skew_secs` ahead); 409 `replay`; 413
//!   `payload_too_large`; 429 over a quota or rate; 503 when the nonce memory is full. A body
//!   is CBOR when its content type says so, JSON otherwise.
//! - `GET /api/v1/devices/{id}/telemetry?key=K&from=T&to=T&limit=N&after=CURSOR&order=asc|desc`
//!   → `{"device", "key", "points": [{"ts": MS, "value": V}], "next": CURSOR|null}`;
//!   with `agg=avg|min|max|sum|count&interval=1m` → `{"device", "key", "agg", "interval_ms",
//!   "buckets": [{"ts": BUCKET_START_MS, "value": X, "count": N}]}`. Without `key`: every
//!   series of the device, `{"device", "series": {KEY: <the same per-key object>}}`.
//!   T is epoch milliseconds or RFC 3339; `from` defaults to 0, `to` to now + 1 day.
//! - `GET /api/v1/devices/{id}/telemetry/latest` → `{"device", "values": {KEY: {"ts": MS,
//!   "value": V}}}`.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use stratus_store::{Agg, AggregateQuery, PointQuery, StoreError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiState, Caller};
use crate::auth::{Kind, SCOPE_TELEMETRY_READ};
use crate::ingest::{parse_time_param, ContentFormat, IngestError};
use crate::pipeline::{Rejected, Source};

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(post_telemetry))
        .routes(routes!(get_telemetry))
        .routes(routes!(get_latest))
}

/// Most points per page.
const MAX_LIMIT: usize = 10_000;
/// Most buckets one answer holds (empty buckets are never listed); more set `truncated`.
const MAX_BUCKETS: usize = 100_000;

/// The answer to an accepted telemetry message.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct AcceptedBody {
    /// Records acknowledged.
    accepted: usize,
    /// Points newly stored: exactly what a query now returns that it did not before.
    points: usize,
    /// Points whose series already held a value at their time (kept; a redelivery).
    duplicates: usize,
}

/// Stores one telemetry message of the calling device: a record, an array of records, or an
/// envelope `{"sent", "nonce", "records"}` (SPEC "Telemetry record"). Answers once durable.
#[utoipa::path(
    post,
    path = "/api/v1/telemetry",
    tag = "telemetry",
    request_body(content = Object, description = "A record, an array of records or an envelope; nested objects become dotted series", content_type = "application/json"),
    responses(
        (status = 202, description = "Stored durably", body = AcceptedBody),
        (status = 400, description = "Invalid record (names index and field), two values of one series at one time, or a time too far ahead", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid device token", body = super::ErrorBody),
        (status = 403, description = "Not a device token", body = super::ErrorBody),
        (status = 409, description = "Replay: nonce reused or `sent` outside the window", body = super::ErrorBody),
        (status = 413, description = "Body too large", body = super::ErrorBody),
        (status = 429, description = "Over a quota or a rate (Retry-After when it passes)", body = super::ErrorBody),
        (status = 503, description = "Nonce memory full; retry later", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn post_telemetry(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    if caller.0.kind != Kind::Device {
        return Err(ApiError::insufficient_scope("device"));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            state.broker.metrics.telemetry_rejected("too_large");
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {} bytes", state.max_body),
            )
        } else {
            ApiError::bad_request(format!("could not read the body: {e}"))
        }
    })?;
    // CBOR when the client says so; anything else is read as JSON (curl's `-d` sends a form
    // content type, and a JSON body is what every other client means).
    let format = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(ContentFormat::from_media_type)
        .unwrap_or(ContentFormat::Json);
    let device = caller.0.id.clone();
    match state
        .ingest
        .ingest(&device, body, format, Source::Http)
        .await
    {
        Ok(a) => Ok((
            StatusCode::ACCEPTED,
            Json(AcceptedBody {
                accepted: a.records,
                points: a.points,
                duplicates: a.duplicates,
            }),
        )),
        Err(e) => Err(rejection(e)),
    }
}

/// The HTTP form of a refused message.
pub fn rejection(e: Rejected) -> ApiError {
    match e {
        Rejected::Invalid(IngestError::TooLarge { len, max }) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("{len} bytes is more than the {max} bytes allowed"),
        ),
        Rejected::Invalid(e) => ApiError::bad_request(e.to_string()),
        Rejected::Replay(r) if r.is_capacity() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            r.to_string(),
        ),
        Rejected::Replay(r) => ApiError::new(StatusCode::CONFLICT, "replay", r.to_string()),
        Rejected::Store(e @ StoreError::Invalid(_)) => ApiError::bad_request(e.to_string()),
        Rejected::Store(e) => ApiError::from(e),
        Rejected::Quota {
            why,
            retry_after_ms: Some(ms),
            ..
        } => ApiError::too_many_requests(why, ms),
        Rejected::Quota { why, .. } => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", why)
        }
    }
}

/// Query parameters of the telemetry query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TelemetryParams {
    /// Series key (all series when absent).
    key: Option<String>,
    /// Start (inclusive): epoch ms or RFC 3339.
    from: Option<String>,
    /// End (exclusive): epoch ms or RFC 3339.
    to: Option<String>,
    /// `avg`, `min`, `max`, `sum` or `count`.
    agg: Option<String>,
    /// Bucket width: `500ms`, `30s`, `1m`, `1h`, `1d` or milliseconds.
    interval: Option<String>,
    /// Most points per page (default 1000, at most 10000).
    limit: Option<usize>,
    /// Paging cursor: the `next` of the previous page.
    after: Option<i64>,
    /// `asc` (default) or `desc`.
    order: Option<String>,
}

/// Parses `500ms`, `30s`, `1m`, `1h`, `1d`, `1w` or plain milliseconds.
pub fn parse_interval(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().ok()?;
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return None,
    };
    n.checked_mul(factor).filter(|&v| v > 0)
}

fn time_param(name: &str, value: Option<&str>, default: i64) -> Result<i64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => parse_time_param(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name}: {v:?} is not epoch milliseconds or RFC 3339"
            ))
        }),
    }
}

/// Whether `caller` may read `device`'s telemetry: `telemetry:read` (or admin), or the device
/// itself.
fn may_read(caller: &Caller, device: &str) -> Result<(), ApiError> {
    if caller.0.is_device(device) {
        return Ok(());
    }
    caller.require(SCOPE_TELEMETRY_READ).map(|_| ())
}

/// Raw points, or buckets aggregated by `agg` over `interval`.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/telemetry",
    tag = "telemetry",
    params(("id" = String, Path, description = "Device id"), TelemetryParams),
    responses(
        (status = 200, description = "Points or buckets", body = Object),
        (status = 400, description = "Bad parameter", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid token", body = super::ErrorBody),
        (status = 403, description = "Needs telemetry:read", body = super::ErrorBody),
        (status = 404, description = "Unknown device", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_telemetry(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<TelemetryParams>,
) -> Result<Json<Value>, ApiError> {
    may_read(&caller, &id)?;
    if state.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("device {id:?} not found")));
    }
    let now = crate::persist::now_ms() as i64;
    let from = time_param("from", p.from.as_deref(), 0)?;
    let to = time_param("to", p.to.as_deref(), now + 86_400_000)?;
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    let agg = match p.agg.as_deref() {
        None => None,
        Some(a) => Some(a.parse::<Agg>().map_err(|_| {
            ApiError::bad_request(format!(
                "agg: {a:?} is not one of avg, min, max, sum, count"
            ))
        })?),
    };
    let interval = match (agg, p.interval.as_deref()) {
        (None, Some(_)) => return Err(ApiError::bad_request("interval needs agg")),
        (Some(_), None) => 60_000,
        (_, Some(i)) => parse_interval(i).ok_or_else(|| {
            ApiError::bad_request(format!(
                "interval: {i:?} is not a duration such as 30s, 1m, 1h"
            ))
        })?,
        (None, None) => 0,
    };
    let limit = p.limit.unwrap_or(1000).clamp(1, MAX_LIMIT);
    let descending = match p.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "order: {o:?} is not asc or desc"
            )))
        }
    };
    let keys = match &p.key {
        Some(k) => vec![k.clone()],
        None => state.store.keys(&id).await?,
    };
    let mut series = Map::new();
    for key in &keys {
        let body = if let Some(agg) = agg {
            let buckets = state
                .store
                .aggregate(AggregateQuery {
                    device_id: id.clone(),
                    key: key.clone(),
                    from_ms: from,
                    to_ms: to,
                    interval_ms: interval,
                    agg,
                })
                .await?;
            json!({
                "device": id,
                "key": key,
                "agg": p.agg,
                "interval_ms": interval,
                "truncated": buckets.len() > MAX_BUCKETS,
                "buckets": buckets.iter().take(MAX_BUCKETS).map(|b| json!({"ts": b.start_ms, "value": b.value, "count": b.count})).collect::<Vec<_>>(),
            })
        } else {
            let mut q = PointQuery::new(id.clone(), key.clone(), from, to).limit(limit);
            if descending {
                q = q.descending();
            }
            if let Some(after) = p.after {
                q = q.after(after);
            }
            let page = state.store.points(q).await?;
            json!({
                "device": id,
                "key": key,
                "points": page.points.iter().map(|v| json!({"ts": v.ts_ms, "value": v.value.to_json()})).collect::<Vec<_>>(),
                "next": page.next_after_ts,
            })
        };
        series.insert(key.clone(), body);
    }
    if p.key.is_some() {
        let (_, only) = series.into_iter().next().unwrap_or_default();
        return Ok(Json(only));
    }
    Ok(Json(json!({"device": id, "series": series})))
}

/// The last value of every series of a device.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/telemetry/latest",
    tag = "telemetry",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "Latest values by key", body = Object),
        (status = 401, description = "Missing or invalid token", body = super::ErrorBody),
        (status = 403, description = "Needs telemetry:read", body = super::ErrorBody),
        (status = 404, description = "Unknown device", body = super::ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_latest(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    may_read(&caller, &id)?;
    if state.store.device(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("device {id:?} not found")));
    }
    let latest = state.store.latest(&id).await?;
    let mut values = Map::new();
    for v in latest {
        values.insert(
            v.key.clone(),
            json!({"ts": v.ts_ms, "value": v.value.to_json()}),
        );
    }
    Ok(Json(json!({"device": id, "values": values})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1m"), Some(60_000));
        assert_eq!(parse_interval("30s"), Some(30_000));
        assert_eq!(parse_interval("250"), Some(250));
        assert_eq!(parse_interval("2h"), Some(7_200_000));
        assert_eq!(parse_interval("0s"), None);
        assert_eq!(parse_interval("1y"), None);
        assert_eq!(parse_interval("m"), None);
        assert_eq!(parse_interval("99999999999999999d"), None);
    }
}
