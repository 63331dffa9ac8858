//! Device configuration: the desired configuration the cloud wants a device to have
//! (versioned, compare-and-set with `If-Match`, pushed as a retained MQTT message) and the
//! configuration the device reports back.
//!
//! ## The config document: one shape everywhere
//! ```json
//! {"version": 3, "config": {"interval": 5}, "updated_at": "2024-05-01T12:00:00.000Z"}
//! ```
//! - the body of `GET` and `PUT /api/v1/devices/{id}/config`, with `ETag: "3"`;
//! - the payload of the retained MQTT message on `devices/{id}/config` (QoS 1; MQTT 5
//!   subscribers also get payload format UTF-8 and content type `application/json`);
//! - what CoAP `/config` serves ([`config_payload`] makes the bytes).
//!
//! A device starts at version 0 with `{}` (published at registration, so a device that
//! subscribes always gets a document at once); every `PUT` adds one. `config` is always a JSON
//! object. The reported configuration is `{"config": {...}, "updated_at": "…"}`.
//!
//! ## Who may do what
//! - `GET …/config`: the device itself (a `device` token for that id), or a caller with
//!   `devices:write`, `telemetry:read` or `admin`. A device token for another id gets 403
//!   `insufficient_scope` whether that device exists or not. `If-None-Match` gives 304.
//! - `PUT …/config`: `devices:write`. `If-Match: "3"` (also `3`, `W/"3"` never matches, a
//!   list, or `*`) makes it a compare-and-set: 412 `precondition_failed` with the current
//!   `ETag` when the version differs. Answers 200 with the new document and `ETag`.
//! - `PUT …/config/reported`: the device itself; answers 200 with the reported document.
//!
//! ## Concurrency and the order of retained messages
//! Config changes of one device are serialised in the process (a lock per hash of the id),
//! so concurrent `PUT`s without `If-Match` all succeed, one version each; across processes the
//! store's compare-and-set catches the rest and the `PUT` retries. Each change writes its
//! retained message in the same store job as the change (so the retained state on disk
//! follows the versions exactly), then updates the live broker under the device's lock by
//! re-reading the stored document: whichever publish runs last publishes the latest version,
//! so concurrent `PUT`s can never leave an older version retained.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stratus_mqtt::{Message, MqttStr, PayloadFormat, PublishProperties, QoS};
use stratus_store::{
    DesiredConfig, MqttOp, Output, ReportedConfig, StoreError, StoreHandle, Write,
};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{json_body, now_ms, rfc3339_ms, valid_id};
use crate::api::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::{Principal, SCOPE_DEVICE, SCOPE_DEVICES_WRITE, SCOPE_TELEMETRY_READ};
use crate::broker::Broker;
use crate::pipeline::Source;
use crate::reported::{check_config, store_reported};

/// How often a `PUT` without `If-Match` retries when another change slips in between.
const PUT_TRIES: usize = 8;

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(get_config, put_config))
        .routes(routes!(put_reported))
}

/// A desired configuration: the HTTP body, the MQTT retained payload and the CoAP
/// representation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigDocument {
    /// 0 at registration, one more with every change; also the `ETag`.
    pub version: u64,
    /// The configuration (a JSON object).
    #[schema(value_type = Object)]
    pub config: Value,
    /// When it was set (RFC 3339, UTC).
    pub updated_at: String,
}

impl From<&DesiredConfig> for ConfigDocument {
    fn from(d: &DesiredConfig) -> Self {
        ConfigDocument {
            version: d.version,
            config: d.value.clone(),
            updated_at: rfc3339_ms(d.updated_at_ms),
        }
    }
}

/// The configuration a device reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportedDocument {
    /// The configuration (a JSON object).
    #[schema(value_type = Object)]
    pub config: Value,
    /// When it was reported (RFC 3339, UTC).
    pub updated_at: String,
}

impl From<&ReportedConfig> for ReportedDocument {
    fn from(r: &ReportedConfig) -> Self {
        ReportedDocument {
            config: r.value.clone(),
            updated_at: rfc3339_ms(r.updated_at_ms),
        }
    }
}

// ---- the MQTT side ---------------------------------------------------------------------

/// The topic a device's desired configuration is retained on.
pub fn config_topic(id: &str) -> String {
    format!("devices/{id}/config")
}

/// The bytes of the config document (MQTT payload, CoAP representation).
pub fn config_payload(desired: &DesiredConfig) -> Bytes {
    Bytes::from(serde_json::to_vec(&ConfigDocument::from(desired)).unwrap_or_default())
}

/// The retained QoS 1 message that carries `desired` to device `id`.
pub fn config_message(id: &str, desired: &DesiredConfig) -> Option<Message> {
    let topic = MqttStr::try_from(config_topic(id)).ok()?;
    let mut message = Message::new(topic, config_payload(desired), QoS::AtLeastOnce, true);
    message.properties = Some(std::sync::Arc::new(PublishProperties {
        payload_format: Some(PayloadFormat::Utf8),
        content_type: MqttStr::try_from("application/json").ok(),
        ..PublishProperties::default()
    }));
    Some(message)
}

/// The store write that keeps `desired` retained for device `id` (part of the change's job).
pub(crate) fn retained_write(id: &str, desired: &DesiredConfig) -> Option<Write> {
    let message = config_message(id, desired)?;
    Some(Write::Mqtt(vec![MqttOp::RetainSet(
        crate::persist::stored_retained(&message, None),
    )]))
}

/// Per-device locks (by hash of the id): config changes of one device are serialised in
/// this process, so a `PUT` never loses its compare-and-set to another `PUT` of the same
/// server, and the live broker's publications of one device happen in order.
static DEVICE_LOCKS: [tokio::sync::Mutex<()>; 64] =
    [const { tokio::sync::Mutex::const_new(()) }; 64];

fn device_lock(id: &str) -> &'static tokio::sync::Mutex<()> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    &DEVICE_LOCKS[(h.finish() % DEVICE_LOCKS.len() as u64) as usize]
}

/// Brings the live broker's retained `devices/{id}/config` up to date with the store: the
/// stored document, or nothing once the device is gone. Failures are logged: the store
/// already holds the retained message, so a restart repairs the broker.
pub async fn republish(broker: &Broker, store: &StoreHandle, id: &str) {
    let _order = device_lock(id).lock().await;
    match store.device(id).await {
        Ok(Some(device)) => {
            if let Some(message) = config_message(id, &device.desired) {
                broker.publish(message, None);
            }
        }
        Ok(None) => clear_retained(broker, &config_topic(id)),
        Err(e) => tracing::error!(device = %id, error = %e, "cannot read the config to publish it"),
    }
}

/// Removes the retained message of `topic` from the live broker, if it has one.
pub fn clear_retained(broker: &Broker, topic: &str) {
    if broker.retained_for(topic).is_empty() {
        return;
    }
    if let Ok(topic) = MqttStr::try_from(topic) {
        broker.publish(
            Message::new(topic, Bytes::new(), QoS::AtLeastOnce, true),
            None,
        );
    }
}

// ---- the operations --------------------------------------------------------------------

/// Sets device `id`'s desired configuration, audits it (`config.put`, detail
/// `{"version", "config"}`) and stores its retained message, in one job. With
/// `precondition` (`If-Match`), only while the current version matches
/// ([`StoreError::VersionMismatch`] otherwise). The live broker is not touched: call
/// [`republish`] after.
pub async fn put_desired(
    store: &StoreHandle,
    actor: &str,
    id: &str,
    value: Value,
    precondition: Option<&EntityTags>,
) -> Result<DesiredConfig, StoreError> {
    check_config(&value)?;
    // Only another server process (cluster mode) can slip in between read and write now.
    let _one_at_a_time = device_lock(id).lock().await;
    let mut last_seen = 0;
    for _ in 0..PUT_TRIES {
        let device = store
            .device(id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "device",
                id: id.to_string(),
            })?;
        let current = device.desired.version;
        last_seen = current;
        if precondition.is_some_and(|p| !p.matches_strong(current)) {
            return Err(StoreError::VersionMismatch { current });
        }
        let now = now_ms();
        let next = DesiredConfig {
            version: current + 1,
            value: value.clone(),
            updated_at_ms: now,
        };
        let mut job = vec![
            Write::PutDesiredConfig {
                id: id.to_string(),
                value: value.clone(),
                expected_version: Some(current),
                now_ms: now,
            },
            super::audit(
                actor,
                "config.put",
                id,
                json!({"version": next.version, "config": value}),
                now,
            ),
        ];
        job.extend(retained_write(id, &next));
        match store.write(job).await {
            Ok(outputs) => {
                return match outputs.into_iter().next() {
                    Some(Output::Desired(stored)) => Ok(stored),
                    _ => Err(StoreError::Internal(
                        "the store did not answer the desired config".into(),
                    )),
                }
            }
            // Another change slipped in between the read and the write: read again.
            Err(StoreError::VersionMismatch { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::VersionMismatch { current: last_seen })
}

// ---- entity tags -----------------------------------------------------------------------

/// The entity tags of an `If-Match` or `If-None-Match` header (RFC 9110 §13.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityTags {
    /// `*`: any current representation.
    Any,
    /// A list of tags: `(weak, opaque value without quotes)`.
    List(Vec<(bool, String)>),
}

impl EntityTags {
    /// Parses every value of the header (a comma-separated list each). Besides RFC 9110's
    /// quoted tags it takes a bare version number (`If-Match: 3`). `Ok(None)` when absent.
    pub fn parse<'a>(
        values: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<Option<EntityTags>, String> {
        let mut tags = Vec::new();
        let mut any = false;
        let mut seen = false;
        for value in values {
            seen = true;
            let text = value
                .to_str()
                .map_err(|_| "the entity tag is not visible ASCII".to_string())?;
            for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if item == "*" {
                    any = true;
                    continue;
                }
                let (weak, rest) = match item.strip_prefix("W/") {
                    Some(rest) => (true, rest),
                    None => (false, item),
                };
                let opaque = match rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                    Some(inner) if !inner.contains('"') => inner,
                    _ if !weak && !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => {
                        rest
                    }
                    _ => return Err(format!("{item:?} is not an entity tag such as \"3\"")),
                };
                tags.push((weak, opaque.to_string()));
            }
        }
        if !seen {
            return Ok(None);
        }
        if any {
            return Ok(Some(EntityTags::Any));
        }
        if tags.is_empty() {
            return Err("the header holds no entity tag".into());
        }
        Ok(Some(EntityTags::List(tags)))
    }

    /// `If-Match` (strong comparison): whether `version` is one of the tags.
    pub fn matches_strong(&self, version: u64) -> bool {
        match self {
            EntityTags::Any => true,
            EntityTags::List(tags) => tags
                .iter()
                .any(|(weak, tag)| !weak && tag.parse::<u64>().ok() == Some(version)),
        }
    }

    /// `If-None-Match` (weak comparison): whether `version` is one of the tags.
    pub fn matches_weak(&self, version: u64) -> bool {
        match self {
            EntityTags::Any => true,
            EntityTags::List(tags) => tags
                .iter()
                .any(|(_, tag)| tag.parse::<u64>().ok() == Some(version)),
        }
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

fn preconditions(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> Result<Option<EntityTags>, ApiError> {
    EntityTags::parse(headers.get_all(&name))
        .map_err(|why| ApiError::bad_request(format!("bad {name} header: {why}")))
}

// ---- handlers --------------------------------------------------------------------------

/// Who may read device `id`'s configuration (see the module docs).
fn may_read(p: &Principal, id: &str) -> Result<(), ApiError> {
    if p.is_device(id) || p.has_scope(SCOPE_DEVICES_WRITE) || p.has_scope(SCOPE_TELEMETRY_READ) {
        Ok(())
    } else {
        Err(ApiError::insufficient_scope(SCOPE_DEVICES_WRITE))
    }
}

/// The desired configuration of a device.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/config",
    tag = "config",
    params(
        ("id" = String, Path, description = "Device id"),
        ("If-None-Match" = Option<String>, Header, description = "304 when the version is still this one"),
    ),
    responses(
        (status = 200, description = "The desired configuration", body = ConfigDocument,
         headers(("ETag" = String, description = "The version, quoted"))),
        (status = 304, description = "Not modified"),
        (status = 400, description = "Bad id or header", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "Another device's token, or no suitable scope", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn get_config(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    may_read(&caller.0, &id)?;
    valid_id(&id)?;
    let unless = preconditions(&headers, header::IF_NONE_MATCH)?;
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id:?} not found")))?;
    let version = device.desired.version;
    if unless.is_some_and(|t| t.matches_weak(version)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag(version))]).into_response());
    }
    Ok((
        [(header::ETAG, etag(version))],
        Json(ConfigDocument::from(&device.desired)),
    )
        .into_response())
}

/// Sets the desired configuration of a device (a JSON object), optionally compare-and-set.
#[utoipa::path(
    put,
    path = "/api/v1/devices/{id}/config",
    tag = "config",
    params(
        ("id" = String, Path, description = "Device id"),
        ("If-Match" = Option<String>, Header, description = "Only if the current version is this one (\"3\", 3 or *)"),
    ),
    request_body(content = Object, description = "The new desired configuration"),
    responses(
        (status = 200, description = "The new desired configuration", body = ConfigDocument,
         headers(("ETag" = String, description = "The new version, quoted"))),
        (status = 400, description = "Bad id, header or body (not a JSON object)", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "The token lacks devices:write", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 412, description = "If-Match does not match the current version (its ETag is returned)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn put_config(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let actor = caller.require(SCOPE_DEVICES_WRITE)?.id.clone();
    valid_id(&id)?;
    let precondition = preconditions(&headers, header::IF_MATCH)?;
    let value = json_body(body)?;
    match put_desired(&state.store, &actor, &id, value, precondition.as_ref()).await {
        Ok(desired) => {
            republish(&state.broker, &state.store, &id).await;
            tracing::info!(device = %id, version = desired.version, by = %actor, "desired config set");
            Ok((
                [(header::ETAG, etag(desired.version))],
                Json(ConfigDocument::from(&desired)),
            )
                .into_response())
        }
        Err(StoreError::VersionMismatch { current }) => Ok((
            [(header::ETAG, etag(current))],
            ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                format!("the current version is {current}"),
            ),
        )
            .into_response()),
        Err(e) => Err(e.into()),
    }
}

/// Records the configuration a device reports (only the device itself may).
#[utoipa::path(
    put,
    path = "/api/v1/devices/{id}/config/reported",
    tag = "config",
    params(("id" = String, Path, description = "Device id")),
    request_body(content = Object, description = "The configuration the device runs"),
    responses(
        (status = 200, description = "Recorded", body = ReportedDocument),
        (status = 400, description = "Bad id or body (not a JSON object)", body = ErrorBody),
        (status = 401, description = "No valid access token", body = ErrorBody),
        (status = 403, description = "Not this device's token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn put_reported(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReportedDocument>, ApiError> {
    if !caller.0.is_device(&id) {
        return Err(ApiError::insufficient_scope(SCOPE_DEVICE));
    }
    valid_id(&id)?;
    let value = json_body(body)?;
    let rules = state.ingest.rules().map(|r| &**r);
    let reported = store_reported(&state.store, rules, &id, value, Source::Http).await?;
    Ok(Json(ReportedDocument::from(&reported)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> Result<Option<EntityTags>, String> {
        let values: Vec<HeaderValue> = values
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        EntityTags::parse(values.iter())
    }

    #[test]
    fn if_match_takes_quoted_bare_lists_and_star() {
        assert_eq!(parse(&[]).unwrap(), None);
        let quoted = parse(&["\"3\""]).unwrap().unwrap();
        assert!(quoted.matches_strong(3) && !quoted.matches_strong(4));
        let bare = parse(&["3"]).unwrap().unwrap();
        assert!(bare.matches_strong(3) && !bare.matches_strong(30));
        let list = parse(&["\"1\", \"5\"", "\"9\""]).unwrap().unwrap();
        assert!(list.matches_strong(5) && list.matches_strong(9) && !list.matches_strong(2));
        let any = parse(&["*"]).unwrap().unwrap();
        assert_eq!(any, EntityTags::Any);
        assert!(any.matches_strong(0) && any.matches_weak(7));
    }

    #[test]
    fn weak_tags_never_match_if_match_but_match_if_none_match() {
        let weak = parse(&["W/\"3\""]).unwrap().unwrap();
        assert!(!weak.matches_strong(3));
        assert!(weak.matches_weak(3));
        let foreign = parse(&["\"abc\""]).unwrap().unwrap();
        assert!(!foreign.matches_strong(0) && !foreign.matches_weak(0));
    }

    #[test]
    fn malformed_entity_tags_are_rejected() {
        for bad in ["abc", "\"3", "3\"", "W/3", "-1", "\"a\"b\"", ",", " "] {
            assert!(parse(&[bad]).is_err(), "{bad:?} accepted");
        }
    }

    /// One HTTP/1.1 request over a fresh connection: (status, headers, body).
    async fn http(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        token: &str,
        extra: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        };
        (status, head.to_ascii_lowercase(), body)
    }

    fn retained(server: &crate::Server, id: &str) -> Option<Value> {
        let found = server.broker.retained_for(&config_topic(id));
        assert!(found.len() <= 1);
        found.first().map(|m| {
            assert!(m.retain && m.qos == QoS::AtLeastOnce);
            serde_json::from_slice(&m.payload).unwrap()
        })
    }

    /// Through the real router: registration publishes version 0, every PUT republishes the
    /// stored document retained, concurrent PUTs leave the latest version retained, a failed
    /// precondition publishes nothing, deletion clears it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn desired_config_is_published_retained_in_version_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::Config::default();
        config.server.data_dir = dir.path().to_path_buf();
        config.server.bind = std::net::Ipv4Addr::LOCALHOST.into();
        config.http.port = 0;
        config.mqtt.port = 0;
        config.coap.port = 0;
        let server = crate::Server::start(config).await.unwrap();
        let admin = server.auth.principal("admin").unwrap();
        let token = server.auth.issue(&admin, None).unwrap().access_token;
        let addr = server.http_addr;

        let (status, _, created) = http(
            addr,
            "POST",
            "/api/v1/devices",
            &token,
            &[],
            r#"{"id": "d1"}"#,
        )
        .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["desired"]["version"], 0);
        assert_eq!(retained(&server, "d1").unwrap()["version"], 0);

        let (status, head, doc) = http(
            addr,
            "PUT",
            "/api/v1/devices/d1/config",
            &token,
            &[("If-Match", "\"0\"")],
            r#"{"interval": 5}"#,
        )
        .await;
        assert_eq!(status, 200, "{doc}");
        assert!(head.contains("etag: \"1\""), "{head}");
        assert_eq!(retained(&server, "d1").unwrap(), doc);
        assert_eq!(doc["config"], json!({"interval": 5}));

        let (status, head, err) = http(
            addr,
            "PUT",
            "/api/v1/devices/d1/config",
            &token,
            &[("If-Match", "0")],
            r#"{"interval": 9}"#,
        )
        .await;
        assert_eq!(status, 412, "{err}");
        assert_eq!(err["error"], "precondition_failed");
        assert!(head.contains("etag: \"1\""), "{head}");
        assert_eq!(retained(&server, "d1").unwrap()["version"], 1);

        let puts = (0..12).map(|i| {
            let token = token.clone();
            tokio::spawn(async move {
                let body = format!("{{\"n\": {i}}}");
                http(addr, "PUT", "/api/v1/devices/d1/config", &token, &[], &body).await
            })
        });
        for put in puts.collect::<Vec<_>>() {
            assert_eq!(put.await.unwrap().0, 200);
        }
        let (_, _, now) = http(addr, "GET", "/api/v1/devices/d1/config", &token, &[], "").await;
        assert_eq!(now["version"], 13);
        assert_eq!(retained(&server, "d1").unwrap(), now);

        let (status, _, _) = http(addr, "DELETE", "/api/v1/devices/d1", &token, &[], "").await;
        assert_eq!(status, 204);
        assert_eq!(retained(&server, "d1"), None);
        let (_, _, verdict) = http(addr, "GET", "/api/v1/audit/verify", &token, &[], "").await;
        assert_eq!(verdict["intact"], true, "{verdict}");
        let (_, _, page) = http(addr, "GET", "/api/v1/audit?limit=1000", &token, &[], "").await;
        let ours: Vec<&str> = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["target"] == "devices/d1")
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        // create, one put, twelve puts, delete; the failed precondition is not a change
        assert_eq!(ours.len(), 15, "{ours:?}");
        assert_eq!(ours.first(), Some(&"device.create"));
        assert_eq!(ours.last(), Some(&"device.delete"));
        server.shutdown(std::time::Duration::from_secs(2)).await;
    }

    #[test]
    fn the_config_message_is_retained_json_at_qos_1() {
        let desired = DesiredConfig {
            version: 4,
            value: json!({"interval": 5}),
            updated_at_ms: 1_000,
        };
        let m = config_message("d1", &desired).unwrap();
        assert_eq!(m.topic.as_str(), "devices/d1/config");
        assert!(m.retain);
        assert_eq!(m.qos, QoS::AtLeastOnce);
        let doc: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            doc,
            json!({"version": 4, "config": {"interval": 5}, "updated_at": "1970-01-01T00:00:01.000Z"})
        );
    }
}
