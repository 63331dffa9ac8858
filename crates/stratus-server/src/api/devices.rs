//! The device registry over HTTP: register, list, show, patch, delete and rotate the secret of
//! devices (`/api/v1/devices…`); the desired and reported configuration live in [`config`].
//!
//! ## JSON shapes
//! Times are RFC 3339 strings in UTC with milliseconds (`2024-05-01T12:00:00.000Z`) everywhere
//! in this module; telemetry keeps epoch milliseconds for `ts`, as the SPEC fixes.
//!
//! A device (`GET /api/v1/devices/{id}`, the elements of a list, the answer of `PATCH`):
//! ```json
//! {"id": "pump-7", "attributes": {"site": "north"}, "created_at": "…", "last_seen": "…" | null,
//!  "desired": {"version": 2, "config": {"interval": 5}, "updated_at": "…"},
//!  "reported": {"config": {"interval": 5}, "updated_at": "…"} | null,
//!  "firmware": {…} | null, "require_freshness": false}
//! ```
//! The secret is shown only in the answers of `POST /api/v1/devices` (201, the device above
//! plus `"secret"`) and `POST /api/v1/devices/{id}/secret` (200, `{"id", "secret"}`); its
//! argon2 hash is never shown. A list is `{"devices": [device…], "next": "last-id" | null}`:
//! pass `next` as `?after=` for the next page (`null` on the last page).
//!
//! `PATCH /api/v1/devices/{id}` is an RFC 7396 JSON merge patch of the device as shown above
//! (`application/merge-patch+json` or `application/json`); only `attributes` and
//! `require_freshness` may change, so a patch is
//! `{"attributes": {"site": "south", "old-key": null}}` (`"attributes": null` clears them all)
//! or `{"require_freshness": true}`, or both in one patch (one job, one audit entry).
//!
//! `require_freshness` is the device's own replay policy: when it is on, every telemetry
//! message of the device must carry `sent` and `nonce` (HTTP 409, CoAP 4.09, MQTT v5 0x99
//! otherwise), whatever `[telemetry] require_freshness` says for the others. The running
//! pipeline learns the change at once ([`crate::pipeline::Pipeline::set_device_requires_freshness`]).
//!
//! ## Who may do what
//! Every route here needs the scope `devices:write` (or `admin`): 401 `invalid_token` without
//! a valid bearer token, 403 `insufficient_scope` with another one. Checks run in this order:
//! token, scope, the id's syntax (400 naming it), the body (400), the device's existence (404).
//!
//! ## Every admin change is audited, atomically
//! The change and its audit entry (`device.create`, `device.update`, `device.delete`,
//! `device.secret.rotate`, `config.put`; actor = the caller's client id; target =
//! `devices/{id}`; detail = what changed, never a secret or its hash) are one store job: both are durable
//! or neither is. The same job writes the retained MQTT config message the change implies, so
//! it survives a crash right after the answer.
//!
//! ## CoAPS keys
//! Registration and secret rotation are the moments the server knows a device's secret in
//! clear: both also store the device's CoAPS pre-shared key (derived from the secret,
//! [`stratus_coap::psk::device_psk`]) sealed under `DATA_DIR/coap-psk.key`
//! ([`PskSealer`]) in the same job, so the DTLS handshake can look it up. A rotation replaces
//! it: the old PSK stops working with the old secret. A device registered before keys were
//! stored has none until its next rotation.
//!
//! The registry operations ([`register`], [`rotate_secret`], [`remove`], [`apply_patch`]) take only
//! a [`StoreHandle`] (and the [`PskSealer`]), so `stratus device --data-dir` runs the very same code on a stopped
//! server's store. The handlers add what a live server needs: the principal directory
//! ([`Auth`](crate::auth::Auth)) and the live broker's retained messages.

pub mod config;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use stratus_store::{
    AttributeUpdate, Device, MqttOp, NewAuditEntry, NewDevice, Output, StoreError, StoreHandle,
    Write,
};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::config::{ConfigDocument, ReportedDocument};
use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::{hash_secret, new_secret, SCOPE_DEVICES_WRITE};
use crate::coap::psk::PskSealer;

/// Default page size of `GET /api/v1/devices`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page size of `GET /api/v1/devices` (larger asks are clamped).
pub const MAX_PAGE: usize = 1000;

/// The routes of this module (and of [`config`]).
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_device, list_devices))
        .routes(routes!(get_device, patch_device, delete_device))
        .routes(routes!(rotate_device_secret))
        .merge(config::routes())
}

// ---- JSON shapes -----------------------------------------------------------------------

/// A device as the API shows it: never its secret or the secret's hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    /// Device id, `[A-Za-z0-9._-]{1,64}`; also its OAuth `client_id`.
    pub id: String,
    /// Free-form attributes (a JSON object).
    #[schema(value_type = Object)]
    pub attributes: Value,
    /// When it was registered (RFC 3339, UTC).
    pub created_at: String,
    /// When it was last heard from (RFC 3339, UTC), if ever.
    pub last_seen: Option<String>,
    /// The configuration the cloud wants it to have.
    pub desired: ConfigDocument,
    /// The configuration it last reported, if any.
    pub reported: Option<ReportedDocument>,
    /// Firmware state, kept by the firmware service, if any.
    #[schema(value_type = Option<Object>)]
    pub firmware: Option<Value>,
    /// Its own replay policy: every telemetry message must carry `sent` and `nonce` (the
    /// server-wide `[telemetry] require_freshness` applies on top).
    #[serde(default)]
    pub require_freshness: bool,
    /// Whether it is connected (MQTT) or was heard from recently (HTTP, CoAP).
    #[serde(default)]
    pub online: bool,
    /// When it was last heard from, Unix epoch milliseconds, if ever.
    #[serde(default)]
    pub last_seen_ms: Option<i64>,
    /// Its open (active or acknowledged) alarms.
    #[serde(default)]
    pub open_alarms: usize,
}

impl DeviceView {
    /// Adds what the rules runtime knows: online, the latest last seen, open alarms.
    pub fn with_status(mut self, state: &ApiState) -> Self {
        if let Some(rules) = state.ingest.rules() {
            let (online, seen) = rules.presence(&self.id);
            self.online = online;
            if seen > self.last_seen_ms {
                self.last_seen_ms = seen;
                self.last_seen = seen.map(rfc3339_ms);
            }
            self.open_alarms = rules.open_alarm_count(&self.id);
        }
        self
    }
}

impl From<&Device> for DeviceView {
    fn from(d: &Device) -> Self {
        DeviceView {
            id: d.id.clone(),
            attributes: d.attributes.clone(),
            created_at: rfc3339_ms(d.created_at_ms),
            last_seen: d.last_seen_ms.map(rfc3339_ms),
            desired: ConfigDocument::from(&d.desired),
            reported: d.reported.as_ref().map(ReportedDocument::from),
            firmware: d.firmware.clone(),
            require_freshness: d.require_freshness,
            online: false,
            last_seen_ms: d.last_seen_ms,
            open_alarms: 0,
        }
    }
}

/// The answer of `POST /api/v1/devices`: the device and, this once, its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedDevice {
    /// The device.
    #[serde(flatten)]
    pub device: DeviceView,
    /// Its secret (base64url, 43 characters): shown only here, stored only as a hash.
    pub secret: String,
}

/// The body of `POST /api/v1/devices`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeviceBody {
    /// Device id, `[A-Za-z0-9._-]{1,64}`, unique among devices and OAuth clients.
    pub id: String,
    /// Attributes (a JSON object; absent or `null` means none).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub attributes: Value,
}

/// One page of devices.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    /// Devices ordered by id.
    pub devices: Vec<DeviceView>,
    /// The `after` of the next page, or `null` when this is the last one.
    pub next: Option<String>,
}

/// A new secret (`POST /api/v1/devices/{id}/secret`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    /// The device id.
    pub id: String,
    /// The new secret: shown only here. The old one and the tokens issued with it stop working.
    pub secret: String,
}

/// The body of `PATCH /api/v1/devices/{id}`: an RFC 7396 merge patch of the device; members
/// left out do not change.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicePatchBody {
    /// Merged into the attributes (a member set to `null` is removed); `null` clears them all.
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Value>,
    /// The device's own replay policy (`true` or `false`).
    pub require_freshness: Option<bool>,
}

/// Paging of `GET /api/v1/devices`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only devices whose id sorts after this one (the `next` of the previous page).
    pub after: Option<String>,
    /// Page size: 1 to 1000 (larger values are clamped), default 100.
    pub limit: Option<usize>,
}

// ---- the registry operations (shared with `stratus device --data-dir`) -------------------

/// A device just registered and its secret (the only time the secret exists in clear).
#[derive(Debug, Clone)]
pub struct Registered {
    /// The device as stored.
    pub device: Device,
    /// Its secret.
    pub secret: String,
    /// Its CoAPS pre-shared key, sealed (as stored).
    pub coap_psk: Option<Vec<u8>>,
}

/// A new secret, its hash and the sealed CoAPS key derived from it (as stored).
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new secret (the only time it exists in clear).
    pub secret: String,
    /// Its argon2 hash.
    pub secret_hash: String,
    /// The new CoAPS pre-shared key, sealed.
    pub coap_psk: Option<Vec<u8>>,
}

/// Now, Unix epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// [`StoreError::Invalid`] naming `id` unless it is a valid device id: `[A-Za-z0-9._-]{1,64}`
/// except `.` and `..`, which no URL can carry as a path segment (clients resolve them away).
pub fn check_device_id(id: &str) -> Result<(), StoreError> {
    if id == "." || id == ".." {
        return Err(StoreError::Invalid(format!(
            "device id {id:?} is reserved: it cannot be a URL path segment"
        )));
    }
    if stratus_store::is_valid_id(id) {
        return Ok(());
    }
    let shown: String = id.chars().take(80).collect();
    Err(StoreError::Invalid(format!(
        "device id {shown:?} must match [A-Za-z0-9._-]{{1,64}}"
    )))
}

/// Hashes a new secret on the argon2 threads (argon2 takes tens of milliseconds on purpose).
async fn new_secret_and_hash() -> Result<(String, String), StoreError> {
    let secret = new_secret();
    let for_hash = secret.clone();
    let hash = crate::auth::run_argon2(move || hash_secret(&for_hash))
        .await
        .ok_or_else(|| StoreError::Internal("the hashing threads are gone".into()))?;
    if hash.is_empty() {
        return Err(StoreError::Internal("hashing the secret failed".into()));
    }
    Ok((secret, hash))
}

/// The audit entry of an admin change to device `id` (target `devices/{id}`, as the OAuth
/// module writes `clients/{id}`).
pub(crate) fn audit(actor: &str, action: &str, id: &str, detail: Value, now: i64) -> Write {
    Write::AppendAudit(NewAuditEntry {
        ts_ms: now,
        actor: actor.to_string(),
        action: action.to_string(),
        target: format!("devices/{id}"),
        detail,
    })
}

fn unexpected(what: &str) -> StoreError {
    StoreError::Internal(format!("the store did not answer {what}"))
}

/// Registers device `id` with a new secret, audits it (`device.create`, detail
/// `{"attributes": …}`) and stores the retained config message of version 0 (`{}`), all in one
/// job. Errors: [`StoreError::Invalid`] (bad id or attributes), [`StoreError::Conflict`].
pub async fn register(
    store: &StoreHandle,
    psk: &PskSealer,
    actor: &str,
    id: &str,
    attributes: Value,
) -> Result<Registered, StoreError> {
    check_device_id(id)?;
    if !(attributes.is_object() || attributes.is_null()) {
        return Err(StoreError::Invalid(
            "device attributes must be a JSON object".into(),
        ));
    }
    let attributes = match attributes {
        Value::Null => Value::Object(Map::new()),
        other => other,
    };
    let (secret, secret_hash) = new_secret_and_hash().await?;
    let coap_psk = psk.seal_for_secret(id, &secret);
    let now = now_ms();
    let initial = stratus_store::DesiredConfig {
        version: 0,
        value: Value::Object(Map::new()),
        updated_at_ms: now,
    };
    let mut job = vec![
        Write::CreateDevice(NewDevice {
            id: id.to_string(),
            secret_hash,
            attributes: attributes.clone(),
            created_at_ms: now,
        }),
        Write::SetCoapPsk {
            id: id.to_string(),
            sealed: coap_psk.clone(),
        },
        audit(
            actor,
            "device.create",
            id,
            json!({ "attributes": attributes }),
            now,
        ),
    ];
    job.extend(config::retained_write(id, &initial));
    let mut outputs = store.write(job).await?.into_iter();
    match outputs.next() {
        Some(Output::Device(device)) => Ok(Registered {
            device,
            secret,
            coap_psk,
        }),
        _ => Err(unexpected("the new device")),
    }
}

/// Gives device `id` a new secret and CoAPS key and audits it (`device.secret.rotate`, no
/// detail); returns the secret, its hash and the sealed key (for the principal directory).
pub async fn rotate_secret(
    store: &StoreHandle,
    psk: &PskSealer,
    actor: &str,
    id: &str,
) -> Result<Rotated, StoreError> {
    check_device_id(id)?;
    if store.device(id).await?.is_none() {
        return Err(StoreError::NotFound {
            kind: "device",
            id: id.to_string(),
        });
    }
    let (secret, hash) = new_secret_and_hash().await?;
    let coap_psk = psk.seal_for_secret(id, &secret);
    let now = now_ms();
    store
        .write(vec![
            Write::SetDeviceSecret {
                id: id.to_string(),
                secret_hash: hash.clone(),
            },
            Write::SetCoapPsk {
                id: id.to_string(),
                sealed: coap_psk.clone(),
            },
            audit(actor, "device.secret.rotate", id, Value::Null, now),
        ])
        .await?;
    Ok(Rotated {
        secret,
        secret_hash: hash,
        coap_psk,
    })
}

/// Deletes device `id` with its telemetry, audits it (`device.delete`), and removes its
/// retained `devices/{id}/config` and `devices/{id}/firmware` messages, in one job.
pub async fn remove(store: &StoreHandle, actor: &str, id: &str) -> Result<(), StoreError> {
    check_device_id(id)?;
    let now = now_ms();
    store
        .write(vec![
            Write::DeleteDevice { id: id.to_string() },
            audit(actor, "device.delete", id, Value::Null, now),
            Write::Mqtt(vec![
                MqttOp::RetainDelete {
                    topic: config::config_topic(id),
                },
                MqttOp::RetainDelete {
                    topic: format!("devices/{id}/firmware"),
                },
            ]),
        ])
        .await?;
    Ok(())
}

/// What a merge patch of the device representation changes; `None`s change nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DevicePatch {
    /// How the attributes change.
    pub attributes: Option<AttributeUpdate>,
    /// The device's own freshness policy.
    pub require_freshness: Option<bool>,
}

impl DevicePatch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.attributes.is_none() && self.require_freshness.is_none()
    }
}

/// Applies an RFC 7396 merge patch of the device representation (only `attributes` and
/// `require_freshness` may be in it) and audits it (`device.update`, detail = the patch), in
/// one job. An empty patch changes nothing and is not audited.
pub async fn apply_patch(
    store: &StoreHandle,
    actor: &str,
    id: &str,
    patch: Value,
) -> Result<Device, StoreError> {
    check_device_id(id)?;
    let change = device_patch(&patch)?;
    if change.is_empty() {
        return store.device(id).await?.ok_or_else(|| StoreError::NotFound {
            kind: "device",
            id: id.to_string(),
        });
    }
    let mut job = Vec::with_capacity(3);
    if let Some(on) = change.require_freshness {
        job.push(Write::SetRequireFreshness {
            id: id.to_string(),
            on,
        });
    }
    if let Some(update) = change.attributes {
        job.push(Write::UpdateAttributes {
            id: id.to_string(),
            update,
        });
    }
    job.push(audit(actor, "device.update", id, patch, now_ms()));
    // The last write that answers the device ran after the others: it shows them all.
    store
        .write(job)
        .await?
        .into_iter()
        .rev()
        .find_map(|o| match o {
            Output::Device(d) => Some(d),
            _ => None,
        })
        .ok_or_else(|| unexpected("the updated device"))
}

/// What a merge patch of the device representation does.
pub fn device_patch(patch: &Value) -> Result<DevicePatch, StoreError> {
    let Value::Object(members) = patch else {
        return Err(StoreError::Invalid(
            "a device merge patch must be a JSON object such as {\"attributes\": {…}}".into(),
        ));
    };
    if let Some(other) = members
        .keys()
        .find(|k| !matches!(k.as_str(), "attributes" | "require_freshness"))
    {
        return Err(StoreError::Invalid(format!(
            "{other:?} cannot be changed: only \"attributes\" and \"require_freshness\" may be patched"
        )));
    }
    let attributes = match members.get("attributes") {
        None => None,
        Some(Value::Null) => Some(AttributeUpdate::Replace(Value::Null)),
        Some(attrs @ Value::Object(_)) => Some(AttributeUpdate::Merge(attrs.clone())),
        Some(_) => {
            return Err(StoreError::Invalid(
                "\"attributes\" must be a JSON object or null".into(),
            ))
        }
    };
    let require_freshness = match members.get("require_freshness") {
        None => None,
        Some(Value::Bool(on)) => Some(*on),
        Some(_) => {
            return Err(StoreError::Invalid(
                "\"require_freshness\" must be true or false".into(),
            ))
        }
    };
    Ok(DevicePatch {
        attributes,
        require_freshness,
    })
}

// ---- helpers shared with the submodules ------------------------------------------------------

/// Epoch milliseconds as RFC 3339 in UTC with milliseconds: `2024-05-01T12:00:00.000Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The request body as JSON (any content type is read as JSON; 413 past the body limit).
pub(crate) fn json_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than the server accepts",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body must be a JSON document",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// 400 naming `id` unless it is a valid device id.
pub(crate) fn valid_id(id: &str) -> Result<(), ApiError> {
    check_device_id(id).map_err(ApiError::from)
}

fn device_not_found(id: &str) -> ApiError {
    ApiError::from(StoreError::NotFound {
        kind: "device",
        id: id.to_string(),
    })
}

// ---- handlers --------------------------------------------------------------------------

/// Registers a device and answers its secret, this once.
#[utoipa::path(
    post,
    path = "/api/v1/devices",
    tag = "devices",
    request_body = NewDeviceBody,
    responses(
        (status = 201, description = "Registered; the secret is shown only here", body = CreatedDevice,
         headers(("Location" = String, description = "The device's URL"))),
        (status = 400, description = "Bad id, attributes or body", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
        (status = 409, description = "The id is taken by a device or an OAuth client", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn create_device(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = caller.require(SCOPE_DEVICES_WRITE)?.id.clone();
    let body: NewDeviceBody = serde_json::from_value(json_body(body)?)
        .map_err(|e| ApiError::bad_request(format!("bad device: {e}")))?;
    valid_id(&body.id)?;
    let Registered {
        device,
        secret,
        coap_psk,
    } = register(
        &state.store,
        state.auth.psk_sealer(),
        &actor,
        &body.id,
        body.attributes,
    )
    .await?;
    state
        .auth
        .register_device(&device.id, &device.secret_hash, coap_psk);
    // The id is the device's MQTT client id from now on: a session someone else held under
    // it ends.
    let owner = crate::broker::Owner::Device(device.id.as_str().into());
    state.broker.end_sessions(&owner, Some(&device.id));
    if let Some(rules) = state.ingest.rules() {
        rules.device_attributes(&device.id, device.attributes.clone());
    }
    config::republish(&state.broker, &state.store, &device.id).await;
    tracing::info!(device = %device.id, by = %actor, "device registered");
    let location = HeaderValue::from_str(&format!("/api/v1/devices/{}", device.id))
        .unwrap_or_else(|_| HeaderValue::from_static("/api/v1/devices"));
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(CreatedDevice {
            device: DeviceView::from(&device),
            secret,
        }),
    )
        .into_response())
}

/// Lists devices by id, a page at a time.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of devices", body = DeviceList),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn list_devices(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<DeviceList>, ApiError> {
    caller.require(SCOPE_DEVICES_WRITE)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = match q.limit {
        Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
        Some(n) => n.min(MAX_PAGE),
        None => DEFAULT_PAGE,
    };
    let mut page = state
        .store
        .list_devices(q.after.as_deref().filter(|a| !a.is_empty()), limit + 1)
        .await?;
    let more = page.len() > limit;
    page.truncate(limit);
    let next = if more {
        page.last().map(|d| d.id.clone())
    } else {
        None
    };
    Ok(Json(DeviceList {
        devices: page
            .iter()
            .map(|d| DeviceView::from(d).with_status(&state))
            .collect(),
        next,
    }))
}

/// One device.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require(SCOPE_DEVICES_WRITE)?;
    valid_id(&id)?;
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| device_not_found(&id))?;
    Ok(Json(DeviceView::from(&device).with_status(&state)))
}

/// Changes a device's attributes or its own freshness policy with an RFC 7396 merge patch of
/// the device.
#[utoipa::path(
    patch,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    request_body(content = DevicePatchBody, content_type = "application/merge-patch+json",
        description = "`{\"attributes\": {…}, \"require_freshness\": true}`: attribute members set to \
            null are removed; with `require_freshness` on, the device's telemetry messages must carry \
            `sent` and `nonce` (409 / CoAP 4.09 / MQTT v5 0x99 otherwise)"),
    responses(
        (status = 200, description = "The device after the patch", body = DeviceView),
        (status = 400, description = "Bad id or patch", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 415, description = "Not a JSON merge patch", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn patch_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let actor = caller.require(SCOPE_DEVICES_WRITE)?.id.clone();
    valid_id(&id)?;
    check_merge_patch_type(&headers)?;
    let body = json_body(body)?;
    let device = apply_patch(&state.store, &actor, &id, body).await?;
    state
        .ingest
        .set_device_requires_freshness(&id, device.require_freshness);
    if let Some(rules) = state.ingest.rules() {
        rules.device_attributes(&id, device.attributes.clone());
    }
    Ok(Json(DeviceView::from(&device).with_status(&state)))
}

/// 415 unless the content type is absent, `application/json` or
/// `application/merge-patch+json`.
fn check_merge_patch_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if matches!(
        essence.as_str(),
        "application/json" | "application/merge-patch+json"
    ) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "PATCH takes an RFC 7396 merge patch: application/merge-patch+json or application/json",
        ))
    }
}

/// Deletes a device, its telemetry and its retained messages; its tokens stop working.
#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn delete_device(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let actor = caller.require(SCOPE_DEVICES_WRITE)?.id.clone();
    valid_id(&id)?;
    remove(&state.store, &actor, &id).await?;
    state.auth.forget(&id);
    // Its MQTT sessions end with it (a device re-created under the id starts afresh).
    state
        .broker
        .end_sessions(&crate::broker::Owner::Device(id.as_str().into()), None);
    state.ingest.set_device_requires_freshness(&id, false);
    if let Some(rules) = state.ingest.rules() {
        rules.forget_device(&id);
    }
    config::republish(&state.broker, &state.store, &id).await;
    config::clear_retained(&state.broker, &format!("devices/{id}/firmware"));
    tracing::info!(device = %id, by = %actor, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Gives a device a new secret; the old secret and every token issued before stop working.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/secret",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The new secret, shown only here", body = SecretView),
        (status = 400, description = "Bad id", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn rotate_device_secret(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SecretView>, ApiError> {
    let actor = caller.require(SCOPE_DEVICES_WRITE)?.id.clone();
    valid_id(&id)?;
    let rotated = rotate_secret(&state.store, state.auth.psk_sealer(), &actor, &id).await?;
    state
        .auth
        .register_device(&id, &rotated.secret_hash, rotated.coap_psk);
    tracing::info!(device = %id, by = %actor, "device secret rotated");
    Ok(Json(SecretView {
        id,
        secret: rotated.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_epoch_milliseconds_in_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(253_402_300_799_000), "9999-12-31T23:59:59.000Z");
    }

    #[test]
    fn a_device_patch_may_only_touch_attributes_and_require_freshness() {
        let merge = device_patch(&json!({"attributes": {"a": 1, "b": null}})).unwrap();
        assert_eq!(
            merge.attributes,
            Some(AttributeUpdate::Merge(json!({"a": 1, "b": null})))
        );
        assert_eq!(merge.require_freshness, None);
        assert_eq!(
            device_patch(&json!({"attributes": null}))
                .unwrap()
                .attributes,
            Some(AttributeUpdate::Replace(Value::Null))
        );
        assert!(device_patch(&json!({})).unwrap().is_empty());
        assert_eq!(
            device_patch(&json!({"require_freshness": true})).unwrap(),
            DevicePatch {
                attributes: None,
                require_freshness: Some(true)
            }
        );
        let both =
            device_patch(&json!({"require_freshness": false, "attributes": {"k": 1}})).unwrap();
        assert_eq!(both.require_freshness, Some(false));
        assert!(both.attributes.is_some());
        for bad in [
            json!({"id": "x"}),
            json!({"attributes": {}, "secret": "s"}),
            json!({"attributes": [1]}),
            json!({"require_freshness": "yes"}),
            json!({"require_freshness": null}),
            json!({"require_freshness": 1}),
            json!("attributes"),
            json!([]),
        ] {
            assert!(
                matches!(device_patch(&bad), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_ids_are_named() {
        assert!(check_device_id("pump-7.a_b").is_ok());
        let Err(StoreError::Invalid(why)) = check_device_id("no/slash") else {
            panic!("accepted a slash");
        };
        assert!(why.contains("\"no/slash\""), "{why}");
        assert!(check_device_id("").is_err());
        assert!(check_device_id(&"x".repeat(65)).is_err());
        assert!(check_device_id("..").is_err() && check_device_id(".").is_err());
        assert!(check_device_id("...").is_ok());
    }

    #[test]
    fn the_device_view_never_shows_the_hash() {
        let d = Device {
            id: "d1".into(),
            secret_hash: "$argon2id$v=19$secret-hash".into(),
            attributes: json!({"k": "v"}),
            created_at_ms: 0,
            desired: stratus_store::DesiredConfig {
                version: 2,
                value: json!({"x": 1}),
                updated_at_ms: 1000,
            },
            reported: None,
            firmware: None,
            last_seen_ms: None,
            require_freshness: false,
        };
        let text = serde_json::to_string(&DeviceView::from(&d)).unwrap();
        assert!(!text.contains("argon2"), "{text}");
        assert_eq!(
            serde_json::to_value(DeviceView::from(&d)).unwrap(),
            json!({
                "id": "d1", "attributes": {"k": "v"}, "created_at": "1970-01-01T00:00:00.000Z",
                "last_seen": null,
                "desired": {"version": 2, "config": {"x": 1}, "updated_at": "1970-01-01T00:00:01.000Z"},
                "reported": null, "firmware": null, "require_freshness": false,
                "online": false, "last_seen_ms": null, "open_alarms": 0
            })
        );
    }
}
