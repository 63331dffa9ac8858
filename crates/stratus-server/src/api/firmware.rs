//! Firmware over HTTP: signed image upload, listing and download (Range, ETag), assignment
//! to a device or to a campaign, the device's notice and its status reports.
//!
//! ## Routes
//! - `POST /api/v1/firmware` (`firmware:write`): `multipart/form-data` with a part `manifest`
//!   (the signed manifest JSON) and a part `image` (the bytes), in either order. The image is
//!   streamed to a temporary file while it is hashed, never held in memory, and is limited by
//!   `[firmware] max_image_bytes` (413). It is kept only when the manifest verifies against a
//!   trusted key (`--firmware-pubkey`), the size and SHA-256 match and the version is newer
//!   than every stored firmware for the same hardware; otherwise 422
//!   `{"error": "invalid_firmware", "error_description": "<reason>: …"}` where the reason is one
//!   of `malformed`, `unknown key`, `bad signature`, `size mismatch`, `hash mismatch`,
//!   `downgrade`. An upload whose body ends early is 400 and leaves nothing behind; the same
//!   image twice is 409. Answer: 201 with the firmware JSON
//!   `{"id", "version", "size", "sha256", "hardware", "key_id", "created"}`.
//! - `GET /api/v1/firmware` (`firmware:write` or `telemetry:read`): `{"firmware": [...]}`.
//! - `GET /api/v1/firmware/{id}`: the image (`application/octet-stream`, `ETag: "<sha256>"`,
//!   `Accept-Ranges: bytes`; one `Range` → 206 with `Content-Range`, unsatisfiable → 416,
//!   `If-None-Match` → 304, `If-Range`), streamed from the file; the firmware JSON instead
//!   when `Accept` prefers `application/json`. Readable with `firmware:write` and by a device
//!   the firmware is assigned to. `GET /api/v1/firmware/{id}/manifest`: the manifest.
//! - `POST /api/v1/devices/{id}/firmware`: with `firmware:write`, `{"firmware": ID}` assigns
//!   it (a one-device campaign; 422 when the device's `hardware` attribute differs or the
//!   version is not newer than the installed one); with the device's own token,
//!   `{"firmware": ID?, "status": S, "reason": R?}` reports progress.
//!   `GET /api/v1/devices/{id}/firmware`: the device's current notice (404 without one).
//! - `POST /api/v1/campaigns` (`firmware:write`): `{"firmware": ID, "devices": [ids]}` or
//!   `{"firmware": ID, "selector": {"attributes": {"k": "v"}}}` (devices whose hardware or
//!   version rule out the firmware are skipped and listed), optional `"id"` → 201;
//!   `GET /api/v1/campaigns`, `GET /api/v1/campaigns/{id}`: counts per state (`assigned`,
//!   `downloading`, `verified`, `installed`, `failed`) and each device's state and history.

use std::io::SeekFrom;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Map, Value};
use stratus_firmware::{ImageHasher, Manifest, Policy, VerifyError};
use stratus_store::{
    Campaign, Device, FirmwareRecord, NewAuditEntry, NewCampaign, StoreError, Write,
    FIRMWARE_STATES,
};
use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::devices::{json_body, now_ms, rfc3339_ms, valid_id};
use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::{Principal, SCOPE_FIRMWARE_WRITE, SCOPE_TELEMETRY_READ};
use crate::firmware::{hardware_of, installed_version, parse_status, Firmware};

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(upload_firmware, list_firmware))
        .routes(routes!(get_firmware))
        .routes(routes!(get_manifest))
        .routes(routes!(device_firmware_post, device_firmware_get))
        .routes(routes!(create_campaign, list_campaigns))
        .routes(routes!(get_campaign))
}

/// A stored firmware as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FirmwareView {
    /// The firmware id: the image's SHA-256.
    pub id: String,
    /// Version.
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the image (= id).
    pub sha256: String,
    /// Hardware id, or null for any.
    pub hardware: Option<String>,
    /// Id of the key that signed it.
    pub key_id: String,
    /// When it was uploaded (RFC 3339).
    pub created: String,
}

impl From<&FirmwareRecord> for FirmwareView {
    fn from(r: &FirmwareRecord) -> Self {
        FirmwareView {
            id: r.id.clone(),
            version: r.version.clone(),
            size: r.size,
            sha256: r.id.clone(),
            hardware: r.hardware.clone(),
            key_id: r.key_id.clone(),
            created: rfc3339_ms(r.created_at_ms),
        }
    }
}

fn firmware_service(state: &ApiState) -> Result<&Firmware, ApiError> {
    state.firmware.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "firmware is not enabled on this server",
        )
    })
}

fn invalid_firmware(e: &VerifyError) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_firmware",
        e.to_string(),
    )
}

fn require_firmware_write(caller: &Caller) -> Result<&Principal, ApiError> {
    caller.require(SCOPE_FIRMWARE_WRITE)
}

fn valid_firmware_id(id: &str) -> Result<(), ApiError> {
    stratus_store::firmware::check_firmware_id(id).map_err(ApiError::from)
}

async fn record_of(state: &ApiState, id: &str) -> Result<FirmwareRecord, ApiError> {
    valid_firmware_id(id)?;
    state
        .store
        .firmware(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("firmware {id:?} not found")))
}

// ---- upload ----------------------------------------------------------------------------

/// A temporary file removed when dropped unless it was moved into place.
struct TempImage {
    path: std::path::PathBuf,
    kept: bool,
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn multipart_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamReadFailed(_)
        | multer::Error::IncompleteStream
        | multer::Error::IncompleteFieldData { .. }
        | multer::Error::IncompleteHeaders => ApiError::bad_request(format!(
            "the upload ended early or could not be read ({e}); nothing was stored"
        )),
        other => ApiError::bad_request(format!("malformed multipart body: {other}")),
    }
}

/// Uploads a signed firmware image (multipart: `manifest` and `image`).
#[utoipa::path(
    post,
    path = "/api/v1/firmware",
    tag = "firmware",
    request_body(content_type = "multipart/form-data", description = "Parts `manifest` (JSON) and `image` (bytes), in either order"),
    responses(
        (status = 201, description = "Stored", body = FirmwareView),
        (status = 400, description = "Not multipart, a part missing, or the body ended early", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks firmware:write", body = ErrorBody),
        (status = 409, description = "This image is already stored", body = ErrorBody),
        (status = 413, description = "The image is larger than firmware.max_image_bytes", body = ErrorBody),
        (status = 422, description = "The manifest does not verify (error invalid_firmware; the description names the reason)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn upload_firmware(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let actor = require_firmware_write(&caller)?.id.clone();
    let fw = firmware_service(&state)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "expected multipart/form-data with a boundary",
        )
    })?;
    let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut image: Option<(TempImage, stratus_firmware::ImageDigest)> = None;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("manifest") => {
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > stratus_firmware::MAX_MANIFEST_BYTES {
                        return Err(invalid_firmware(&VerifyError::Malformed(
                            stratus_firmware::ManifestError("larger than 4096 bytes".into()),
                        )));
                    }
                }
                manifest_bytes = Some(bytes);
            }
            Some("image") if image.is_some() => {
                return Err(ApiError::bad_request("more than one part \"image\""));
            }
            Some("image") => {
                let temp = TempImage {
                    path: fw.temp_path(),
                    kept: false,
                };
                // Owner-only whatever the umask; the rename keeps the mode.
                let mut file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(crate::data_dir::FILE_MODE)
                    .open(&temp.path)
                    .await
                    .map_err(|e| ApiError::internal("creating the image file", &e))?;
                let mut hasher = ImageHasher::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    hasher.update(&chunk);
                    if hasher.size() > fw.max_image_bytes {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "payload_too_large",
                            format!(
                                "the image is larger than {} bytes (firmware.max_image_bytes)",
                                fw.max_image_bytes
                            ),
                        ));
                    }
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| ApiError::internal("writing the image file", &e))?;
                }
                file.sync_all()
                    .await
                    .map_err(|e| ApiError::internal("syncing the image file", &e))?;
                image = Some((temp, hasher.finish()));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected part {:?}: expected \"manifest\" and \"image\"",
                    other.unwrap_or("")
                )))
            }
        }
    }
    let manifest_bytes =
        manifest_bytes.ok_or_else(|| ApiError::bad_request("the part \"manifest\" is missing"))?;
    let (mut temp, digest) =
        image.ok_or_else(|| ApiError::bad_request("the part \"image\" is missing"))?;
    let manifest = Manifest::parse(&manifest_bytes)
        .map_err(|e| invalid_firmware(&VerifyError::Malformed(e)))?;
    // Newer than every stored firmware for the same hardware.
    let stored = state.store.list_firmware().await?;
    let newest = stored
        .iter()
        .filter(|r| r.hardware == manifest.hardware)
        .filter_map(|r| stratus_firmware::Version::parse(&r.version).ok())
        .max();
    if stored.iter().any(|r| r.id == digest.sha256_hex()) {
        return Err(ApiError::from(StoreError::Conflict {
            kind: "firmware",
            id: digest.sha256_hex(),
        }));
    }
    let policy = Policy {
        hardware: None,
        installed: newest,
    };
    if let Err(e) = stratus_firmware::verify(&manifest, &digest, &fw.trusted, &policy) {
        tracing::warn!(reason = e.code(), "firmware upload refused: {e}");
        return Err(invalid_firmware(&e));
    }
    let id = digest.sha256_hex();
    let path = fw.image_path(&id);
    tokio::fs::rename(&temp.path, &path)
        .await
        .map_err(|e| ApiError::internal("storing the image file", &e))?;
    temp.kept = true;
    if let Ok(dir) = tokio::fs::File::open(&fw.dir).await {
        let _ = dir.sync_all().await;
    }
    let now = now_ms();
    let record = FirmwareRecord {
        id: id.clone(),
        version: manifest.version.clone(),
        size: manifest.size,
        hardware: manifest.hardware.clone(),
        key_id: manifest.key_id.clone(),
        manifest: serde_json::to_value(&manifest).unwrap_or(Value::Null),
        created_at_ms: now,
    };
    let job = vec![
        Write::PutFirmware(record.clone()),
        Write::AppendAudit(NewAuditEntry {
            ts_ms: now,
            actor,
            action: "firmware.upload".into(),
            target: format!("firmware/{id}"),
            detail: json!({"version": record.version, "size": record.size,
                           "hardware": record.hardware, "key_id": record.key_id}),
        }),
    ];
    if let Err(e) = state.store.write(job).await {
        // A concurrent upload of the same image stored it first: the file is that image.
        if !matches!(e, StoreError::Conflict { .. }) {
            let _ = tokio::fs::remove_file(&path).await;
        }
        return Err(e.into());
    }
    tracing::info!(firmware = %id, version = %record.version, size = record.size, "firmware stored");
    Ok((StatusCode::CREATED, Json(FirmwareView::from(&record))).into_response())
}

// ---- list and download -----------------------------------------------------------------

/// Lists the stored firmware, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/firmware",
    tag = "firmware",
    responses(
        (status = 200, description = "`{\"firmware\": [...]}`", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks firmware:write and telemetry:read", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_firmware(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    if !caller.0.has_scope(SCOPE_TELEMETRY_READ) {
        require_firmware_write(&caller)?;
    }
    let all = state.store.list_firmware().await?;
    let views: Vec<FirmwareView> = all.iter().map(FirmwareView::from).collect();
    Ok(Json(json!({ "firmware": views })))
}

/// Whether `accept` prefers JSON to octets.
fn prefers_json(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut json_q = 0.0f32;
    let mut octet_q = 0.0f32;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/json" => json_q = json_q.max(q),
            "application/octet-stream" | "application/*" | "*/*" => octet_q = octet_q.max(q),
            _ => {}
        }
    }
    json_q > 0.0 && json_q > octet_q
}

async fn may_download(state: &ApiState, p: &Principal, id: &str) -> Result<(), ApiError> {
    if p.has_scope(SCOPE_FIRMWARE_WRITE) {
        return Ok(());
    }
    if p.kind == crate::auth::Kind::Device {
        let fw = firmware_service(state)?;
        if fw.is_assigned(&p.id, id).await? {
            return Ok(());
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "this firmware is not assigned to this device",
        ));
    }
    Err(ApiError::insufficient_scope(SCOPE_FIRMWARE_WRITE))
}

/// A byte range request's outcome.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    /// Serve everything (no Range, several ranges, or a syntax we ignore per RFC 9110 §14.2).
    Full,
    /// Serve `start..=end`.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Interprets a `Range` header for a representation of `size` bytes (one range only).
pub(crate) fn parse_range(value: &str, size: u64) -> RangeAnswer {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // suffix: the last N bytes
        let Ok(n) = b.parse::<u64>() else {
            return RangeAnswer::Full;
        };
        if n == 0 || size == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        return RangeAnswer::Part(size.saturating_sub(n), size - 1);
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeAnswer::Full;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(end) if end >= start => end,
            _ => return RangeAnswer::Full,
        }
    };
    if start >= size {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part(start, end.min(size - 1))
}

fn etag_of(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{id}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

fn etag_matches(header_value: &str, id: &str) -> bool {
    header_value.split(',').any(|t| {
        let t = t.trim();
        t == "*" || t.trim_start_matches("W/") == format!("\"{id}\"")
    })
}

/// Downloads a firmware image (or its JSON with `Accept: application/json`).
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{id}",
    tag = "firmware",
    params(
        ("id" = String, Path, description = "Firmware id (the image's sha256)"),
        ("Range" = Option<String>, Header, description = "One byte range, e.g. bytes=1000-"),
        ("If-None-Match" = Option<String>, Header, description = "304 when it is this ETag"),
        ("If-Range" = Option<String>, Header, description = "Honour Range only for this ETag"),
    ),
    responses(
        (status = 200, description = "The image, or its JSON", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range"),
        (status = 304, description = "Not modified"),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "Not assigned to this device, or no firmware:write", body = ErrorBody),
        (status = 404, description = "No such firmware", body = ErrorBody),
        (status = 416, description = "Range not satisfiable"),
    ),
    security(("bearer" = []))
)]
async fn get_firmware(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    valid_firmware_id(&id)?;
    may_download(&state, &caller.0, &id).await?;
    let record = record_of(&state, &id).await?;
    if prefers_json(&headers) {
        return Ok(Json(FirmwareView::from(&record)).into_response());
    }
    let fw = firmware_service(&state)?;
    let etag = etag_of(&id);
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if etag_matches(inm, &id) {
            return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
        }
    }
    let size = record.size;
    let mut range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(RangeAnswer::Full, |r| parse_range(r, size));
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        // Only a strong ETag validator can match (RFC 9110 §13.1.5).
        if if_range.trim() != format!("\"{id}\"") {
            range = RangeAnswer::Full;
        }
    }
    let (status, start, len) = match range {
        RangeAnswer::Full => (StatusCode::OK, 0, size),
        RangeAnswer::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeAnswer::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [
                    (header::CONTENT_RANGE, format!("bytes */{size}")),
                    (header::ACCEPT_RANGES, "bytes".to_string()),
                ],
            )
                .into_response())
        }
    };
    let mut file = tokio::fs::File::open(fw.image_path(&id))
        .await
        .map_err(|e| ApiError::internal("opening the image", &e))?;
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal("reading the image", &e))?;
    }
    use tokio::io::AsyncReadExt as _;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 64 * 1024);
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ETAG, etag);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

/// The signed manifest of a firmware.
#[utoipa::path(
    get,
    path = "/api/v1/firmware/{id}/manifest",
    tag = "firmware",
    params(("id" = String, Path, description = "Firmware id")),
    responses(
        (status = 200, description = "The manifest", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "Not assigned to this device, or no firmware:write", body = ErrorBody),
        (status = 404, description = "No such firmware", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_manifest(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    valid_firmware_id(&id)?;
    may_download(&state, &caller.0, &id).await?;
    Ok(Json(record_of(&state, &id).await?.manifest))
}

// ---- assignment, notices and status ----------------------------------------------------

/// Why `record` cannot go to device `d`, if it cannot.
fn incompatible(d: &Device, record: &FirmwareRecord) -> Option<VerifyError> {
    let policy = Policy {
        hardware: hardware_of(d).map(str::to_string),
        installed: installed_version(d),
    };
    let manifest: Manifest = serde_json::from_value(record.manifest.clone()).ok()?;
    policy.check(&manifest).err()
}

fn new_campaign_id() -> String {
    format!("c-{:016x}", rand::random::<u64>())
}

/// Assigns a firmware to the device (`firmware:write`), or reports the device's progress
/// (the device's own token).
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/firmware",
    tag = "firmware",
    params(("id" = String, Path, description = "Device id")),
    request_body(content = Object, description = "`{\"firmware\": ID}` to assign; `{\"firmware\"?, \"status\", \"reason\"?}` from the device"),
    responses(
        (status = 201, description = "Assigned: the notice", body = Object),
        (status = 200, description = "Status recorded: the assignment", body = Object),
        (status = 400, description = "Bad id or body", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "Neither firmware:write nor this device", body = ErrorBody),
        (status = 404, description = "No such device or firmware", body = ErrorBody),
        (status = 422, description = "Wrong hardware or a downgrade (error invalid_firmware)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn device_firmware_post(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    if caller.0.is_device(&id) {
        let bytes = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let report = parse_status(&bytes)?;
        let assignment = crate::firmware::report(&state.store, &state.broker, &id, report).await?;
        return Ok(Json(json!({
            "device": id,
            "assignment": assignment.map(|a| json!({
                "firmware": a.firmware_id, "campaign": a.campaign_id,
                "state": a.state, "reason": a.reason,
            })),
        }))
        .into_response());
    }
    let actor = require_firmware_write(&caller)?.id.clone();
    let fw = firmware_service(&state)?;
    let body = json_body(body)?;
    let firmware_id = body
        .get("firmware")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("expected {\"firmware\": ID}"))?
        .to_string();
    let record = record_of(&state, &firmware_id).await?;
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id:?} not found")))?;
    if let Some(why) = incompatible(&device, &record) {
        return Err(invalid_firmware(&why));
    }
    let campaign = NewCampaign {
        id: new_campaign_id(),
        firmware_id: firmware_id.clone(),
        devices: vec![id.clone()],
        selector: None,
        created_at_ms: now_ms(),
    };
    let campaign_id = campaign.id.clone();
    fw.start_campaign(&actor, campaign, &record, std::slice::from_ref(&device))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(fw.notice_for(Some(&campaign_id), &record)),
    )
        .into_response())
}

/// The device's current firmware notice.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/firmware",
    tag = "firmware",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The notice: firmware, campaign, manifest, url, coap", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "Neither firmware:write nor this device", body = ErrorBody),
        (status = 404, description = "No assignment", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn device_firmware_get(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    valid_id(&id)?;
    if !caller.0.is_device(&id) {
        require_firmware_write(&caller)?;
    }
    let fw = firmware_service(&state)?;
    fw.notice(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no firmware is assigned to {id:?}")))
}

// ---- campaigns -------------------------------------------------------------------------

fn counts(c: &Campaign) -> Map<String, Value> {
    let mut counts = Map::new();
    for s in FIRMWARE_STATES {
        let n = c.devices.iter().filter(|d| d.state == s).count();
        counts.insert(s.to_string(), n.into());
    }
    counts
}

async fn campaign_json(
    state: &ApiState,
    c: &Campaign,
    with_history: bool,
) -> Result<Value, ApiError> {
    let mut devices = Vec::new();
    for d in &c.devices {
        let mut entry = json!({
            "device": d.device_id,
            "state": d.state,
            "reason": d.reason,
            "updated": rfc3339_ms(d.updated_at_ms),
        });
        if with_history {
            let history: Vec<Value> = state
                .store
                .firmware_history(&d.device_id, 1000)
                .await?
                .into_iter()
                .filter(|e| e.campaign_id.as_deref() == Some(c.id.as_str()))
                .map(|e| json!({"state": e.state, "reason": e.reason, "at": rfc3339_ms(e.at_ms)}))
                .collect();
            entry["history"] = Value::Array(history);
        }
        devices.push(entry);
    }
    Ok(json!({
        "id": c.id,
        "firmware": c.firmware_id,
        "selector": c.selector,
        "created": rfc3339_ms(c.created_at_ms),
        "total": c.devices.len(),
        "counts": counts(c),
        "devices": devices,
    }))
}

/// Starts a campaign: a firmware for a list of devices or for those matching attributes.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns",
    tag = "firmware",
    request_body(content = Object, description = "`{\"firmware\": ID, \"devices\": [ids]}` or `{\"firmware\": ID, \"selector\": {\"attributes\": {…}}}`, optional `\"id\"`"),
    responses(
        (status = 201, description = "The campaign (and the devices skipped by a selector)", body = Object),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks firmware:write", body = ErrorBody),
        (status = 404, description = "No such firmware or device", body = ErrorBody),
        (status = 409, description = "The campaign id is taken", body = ErrorBody),
        (status = 422, description = "A listed device cannot take this firmware, or no device matches", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create_campaign(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = require_firmware_write(&caller)?.id.clone();
    let fw = firmware_service(&state)?;
    let body = json_body(body)?;
    let firmware_id = body
        .get("firmware")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("\"firmware\" (a firmware id) is required"))?
        .to_string();
    let id = match body.get("id") {
        None | Some(Value::Null) => new_campaign_id(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::bad_request("\"id\" must be a string")),
    };
    if !stratus_store::is_valid_id(&id) {
        return Err(ApiError::bad_request(
            "the campaign id must match [A-Za-z0-9._-]{1,64}",
        ));
    }
    let record = record_of(&state, &firmware_id).await?;
    let mut chosen: Vec<Device> = Vec::new();
    let mut skipped = Vec::new();
    let selector = body.get("selector").cloned();
    match (body.get("devices"), &selector) {
        (Some(Value::Array(ids)), None) => {
            for v in ids {
                let d = v
                    .as_str()
                    .ok_or_else(|| ApiError::bad_request("\"devices\" must be device ids"))?;
                valid_id(d)?;
                let device = state
                    .store
                    .device(d)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("device {d:?} not found")))?;
                if let Some(why) = incompatible(&device, &record) {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_firmware",
                        format!("device {d}: {why}"),
                    ));
                }
                if !chosen.iter().any(|c| c.id == device.id) {
                    chosen.push(device);
                }
            }
        }
        (None, Some(sel)) => {
            let wanted = sel
                .get("attributes")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ApiError::bad_request("\"selector\" must be {\"attributes\": {…}}")
                })?;
            let mut after: Option<String> = None;
            loop {
                let page = state.store.list_devices(after.as_deref(), 1000).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                for device in page {
                    let matches = wanted
                        .iter()
                        .all(|(k, v)| device.attributes.get(k) == Some(v));
                    if !matches {
                        continue;
                    }
                    match incompatible(&device, &record) {
                        Some(why) => {
                            skipped.push(json!({"device": device.id, "reason": why.to_string()}))
                        }
                        None => chosen.push(device),
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either \"devices\" (a list of ids) or \"selector\"",
            ))
        }
    }
    if chosen.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_firmware",
            "no device can take this firmware",
        ));
    }
    let campaign = NewCampaign {
        id: id.clone(),
        firmware_id,
        devices: chosen.iter().map(|d| d.id.clone()).collect(),
        selector,
        created_at_ms: now_ms(),
    };
    fw.start_campaign(&actor, campaign, &record, &chosen)
        .await?;
    let stored = state
        .store
        .campaign(&id)
        .await?
        .ok_or_else(|| ApiError::internal("reading the campaign", &"it is gone"))?;
    let mut answer = campaign_json(&state, &stored, false).await?;
    answer["skipped"] = Value::Array(skipped);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Lists the campaigns with their counts per state.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns",
    tag = "firmware",
    responses(
        (status = 200, description = "`{\"campaigns\": [...]}`", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks firmware:write and telemetry:read", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_campaigns(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    if !caller.0.has_scope(SCOPE_TELEMETRY_READ) {
        require_firmware_write(&caller)?;
    }
    let mut out = Vec::new();
    for c in state.store.list_campaigns().await? {
        out.push(campaign_json(&state, &c, false).await?);
    }
    Ok(Json(json!({ "campaigns": out })))
}

/// One campaign: counts per state and each device's state and history.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns/{id}",
    tag = "firmware",
    params(("id" = String, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "The campaign", body = Object),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks firmware:write and telemetry:read", body = ErrorBody),
        (status = 404, description = "No such campaign", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_campaign(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !caller.0.has_scope(SCOPE_TELEMETRY_READ) {
        require_firmware_write(&caller)?;
    }
    let c = state
        .store
        .campaign(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("campaign {id:?} not found")))?;
    Ok(Json(campaign_json(&state, &c, true).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-99", 1000), RangeAnswer::Part(0, 99));
        assert_eq!(parse_range("bytes=500-", 1000), RangeAnswer::Part(500, 999));
        assert_eq!(parse_range("bytes=-100", 1000), RangeAnswer::Part(900, 999));
        assert_eq!(parse_range("bytes=-5000", 1000), RangeAnswer::Part(0, 999));
        assert_eq!(
            parse_range("bytes=900-5000", 1000),
            RangeAnswer::Part(900, 999)
        );
        assert_eq!(parse_range("bytes=1000-", 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), RangeAnswer::Full);
        assert_eq!(parse_range("bytes=9-3", 1000), RangeAnswer::Full);
        assert_eq!(parse_range("items=0-1", 1000), RangeAnswer::Full);
        assert_eq!(parse_range("bytes=x-", 1000), RangeAnswer::Full);
    }

    #[test]
    fn accept_negotiation() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(prefers_json(&h("application/json")));
        assert!(!prefers_json(&h("*/*")));
        assert!(!prefers_json(&h(
            "application/octet-stream, application/json;q=0.5"
        )));
        assert!(prefers_json(&h("application/json, */*;q=0.1")));
        assert!(!prefers_json(&HeaderMap::new()));
    }
}
