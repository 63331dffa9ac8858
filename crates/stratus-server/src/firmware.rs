//! The firmware service shared by HTTP, MQTT and CoAP: where images live, the assignment
//! notice, campaigns (with their retained MQTT notices) and status reports.
//!
//! ## Images
//! An image is a file `DATA_DIR/firmware/<sha256>` (content-addressed: the firmware id is
//! the image's SHA-256). An upload streams into `DATA_DIR/firmware/tmp/<random>` while it is
//! hashed, is fsynced, and is renamed into place only once its manifest verified; anything
//! else removes the temporary file. Temporary files left by a crash are removed at start.
//!
//! ## The assignment notice
//! ```json
//! {"firmware": "<sha256>", "campaign": "<id>" | null, "manifest": {…signed manifest…},
//!  "url": "http://HOST:PORT/api/v1/firmware/<sha256>", "coap": "/firmware/<sha256>",
//!  "version": …, "size": …, "sha256": …, "signature": …, "key_id": …, "hardware": …}
//! ```
//! (the manifest's own fields are repeated at the top level: the notice reads as the
//! manifest JSON the SPEC's topic table announces, with the distribution details added)
//! retained (QoS 1) on `devices/{id}/firmware` — written in the same store job as the
//! campaign, so it survives a crash — served by `GET /api/v1/devices/{id}/firmware` and by
//! CoAP `GET /firmware` (observable).
//!
//! ## Status reports
//! `downloading`, `verified`, `installed` or `failed` (with a reason), from MQTT
//! `devices/{id}/firmware/status`, CoAP `POST /firmware/status` or HTTP
//! `POST /api/v1/devices/{id}/firmware`. The payload is a bare state word (about the current
//! assignment) or JSON `{"firmware": ID?, "status" | "state": S, "reason": R?}`. Each report is
//! one store job: the history entry, the campaign's entry for the device, the device's
//! `firmware` state (shown in the device JSON) and its last-seen time; then an
//! `events::Event::Firmware` on the broker's event bus.
//!
//! The device's `firmware` state is
//! `{"firmware", "version", "campaign", "state", "reason", "updated_at", "installed_version"}`;
//! `installed_version` (else the device attribute `firmware_version`) is what a new
//! assignment must exceed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use stratus_firmware::{TrustedKeys, Version};
use stratus_mqtt::{Message, MqttStr, PayloadFormat, PublishProperties, QoS};
use stratus_store::{
    Assignment, Device, FirmwareRecord, MqttOp, NewCampaign, StoreError, StoreHandle, Write,
};

use crate::api::devices::{now_ms, rfc3339_ms};
use crate::broker::Broker;
use crate::events::Event;

/// The device attribute naming its hardware.
pub const HARDWARE_ATTRIBUTE: &str = "hardware";
/// The device attribute naming the version it runs, when no installation was reported.
pub const VERSION_ATTRIBUTE: &str = "firmware_version";
/// Status words a device may report.
pub const REPORTABLE_STATES: [&str; 4] = ["downloading", "verified", "installed", "failed"];

/// The firmware service of a running server.
pub struct Firmware {
    /// The store.
    pub store: StoreHandle,
    /// The broker (retained notices, events).
    pub broker: Arc<Broker>,
    /// `DATA_DIR/firmware`.
    pub dir: PathBuf,
    /// Keys whose signatures are accepted.
    pub trusted: TrustedKeys,
    /// Largest image accepted.
    pub max_image_bytes: u64,
    /// The HTTP base URL put in notices (`http://HOST:PORT`).
    pub base_url: String,
}

impl Firmware {
    /// Creates the image directory (and its `tmp/`, emptied of what a crash left).
    pub fn open(
        store: StoreHandle,
        broker: Arc<Broker>,
        data_dir: &Path,
        trusted: TrustedKeys,
        max_image_bytes: u64,
        base_url: String,
    ) -> std::io::Result<Firmware> {
        let dir = data_dir.join("firmware");
        let tmp = dir.join("tmp");
        crate::data_dir::create_private_dir(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Firmware {
            store,
            broker,
            dir,
            trusted,
            max_image_bytes,
            base_url,
        })
    }

    /// Where the image of firmware `id` is (`id` must be a valid firmware id).
    pub fn image_path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// A new temporary file path for an upload.
    pub fn temp_path(&self) -> PathBuf {
        self.dir
            .join("tmp")
            .join(format!("{:032x}", rand::random::<u128>()))
    }

    /// The notice of an assignment of `record`: the manifest's fields (so the SPEC's
    /// "manifest JSON" reading holds), plus `firmware`, `campaign`, the manifest itself under
    /// `manifest`, and the download locations `url` and `coap`.
    pub fn notice_for(&self, campaign: Option<&str>, record: &FirmwareRecord) -> Value {
        let mut notice = match &record.manifest {
            Value::Object(fields) => fields.clone(),
            _ => serde_json::Map::new(),
        };
        notice.insert("firmware".into(), record.id.clone().into());
        notice.insert("campaign".into(), campaign.into());
        notice.insert("manifest".into(), record.manifest.clone());
        notice.insert(
            "url".into(),
            format!("{}/api/v1/firmware/{}", self.base_url, record.id).into(),
        );
        notice.insert("coap".into(), format!("/firmware/{}", record.id).into());
        Value::Object(notice)
    }

    /// Device `id`'s current notice, if it has an assignment.
    pub async fn notice(&self, device_id: &str) -> Result<Option<Value>, StoreError> {
        let Some(a) = self.store.assignment(device_id).await? else {
            return Ok(None);
        };
        Ok(self
            .store
            .firmware(&a.firmware_id)
            .await?
            .map(|r| self.notice_for(Some(&a.campaign_id), &r)))
    }

    /// Whether firmware `id` is assigned to device `device_id` now (it may download it).
    pub async fn is_assigned(&self, device_id: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .store
            .assignment(device_id)
            .await?
            .is_some_and(|a| a.firmware_id == id))
    }

    /// Starts `campaign` (audited as `firmware.assign` by `actor`): one store job with the
    /// retained notices and each device's firmware state, then the live broker's notices and
    /// `assigned` events.
    pub async fn start_campaign(
        &self,
        actor: &str,
        campaign: NewCampaign,
        record: &FirmwareRecord,
        devices: &[Device],
    ) -> Result<(), StoreError> {
        let now = campaign.created_at_ms;
        let notice = self.notice_for(Some(&campaign.id), record);
        let mut job = vec![
            Write::CreateCampaign(campaign.clone()),
            Write::AppendAudit(stratus_store::NewAuditEntry {
                ts_ms: now,
                actor: actor.to_string(),
                action: "firmware.assign".into(),
                target: format!("campaigns/{}", campaign.id),
                detail: json!({"firmware": record.id, "version": record.version,
                               "devices": campaign.devices}),
            }),
        ];
        let mut messages = Vec::new();
        for device in devices {
            let state = device_state(device, record, Some(&campaign.id), "assigned", None, now);
            job.push(Write::SetFirmwareState {
                id: device.id.clone(),
                state: Some(state),
            });
            if let Some(message) = notice_message(&device.id, &notice) {
                job.push(Write::Mqtt(vec![MqttOp::RetainSet(
                    crate::persist::stored_retained(&message, None),
                )]));
                messages.push(message);
            }
        }
        self.store.write(job).await?;
        for message in messages {
            self.broker.publish(message, None);
        }
        for device in devices {
            self.broker.events.publish(Event::Firmware {
                device: device.id.clone(),
                firmware: record.id.clone(),
                campaign: Some(campaign.id.clone()),
                state: "assigned".into(),
                reason: None,
                at: now,
            });
        }
        Ok(())
    }
}

/// The topic of device `id`'s notice.
pub fn notice_topic(id: &str) -> String {
    format!("devices/{id}/firmware")
}

/// The retained QoS 1 JSON message carrying `notice` to device `id`.
pub fn notice_message(id: &str, notice: &Value) -> Option<Message> {
    let topic = MqttStr::try_from(notice_topic(id)).ok()?;
    let payload = Bytes::from(serde_json::to_vec(notice).ok()?);
    let mut message = Message::new(topic, payload, QoS::AtLeastOnce, true);
    message.properties = Some(Arc::new(PublishProperties {
        payload_format: Some(PayloadFormat::Utf8),
        content_type: MqttStr::try_from("application/json").ok(),
        ..PublishProperties::default()
    }));
    Some(message)
}

/// The version device `d` runs, as far as the server knows.
pub fn installed_version(d: &Device) -> Option<Version> {
    let from_state = d
        .firmware
        .as_ref()
        .and_then(|f| f.get("installed_version"))
        .and_then(Value::as_str);
    let from_attr = d.attributes.get(VERSION_ATTRIBUTE).and_then(Value::as_str);
    from_state
        .or(from_attr)
        .and_then(|v| Version::parse(v).ok())
}

/// The hardware attribute of device `d`.
pub fn hardware_of(d: &Device) -> Option<&str> {
    d.attributes.get(HARDWARE_ATTRIBUTE).and_then(Value::as_str)
}

fn device_state(
    d: &Device,
    record: &FirmwareRecord,
    campaign: Option<&str>,
    state: &str,
    reason: Option<&str>,
    now: i64,
) -> Value {
    let installed = if state == "installed" {
        Some(record.version.clone())
    } else {
        d.firmware
            .as_ref()
            .and_then(|f| f.get("installed_version"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    json!({
        "firmware": record.id,
        "version": record.version,
        "campaign": campaign,
        "state": state,
        "reason": reason,
        "updated_at": rfc3339_ms(now),
        "installed_version": installed,
    })
}

/// A parsed status report.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// The firmware it is about (`None`: the current assignment).
    pub firmware: Option<String>,
    /// One of [`REPORTABLE_STATES`].
    pub state: String,
    /// Why, for `failed`.
    pub reason: Option<String>,
}

fn invalid(why: impl Into<String>) -> StoreError {
    StoreError::Invalid(why.into())
}

/// Parses a status payload: a bare state word, or JSON `{"firmware"?, "status"|"state",
/// "reason"?}` (a JSON string is a bare word too).
pub fn parse_status(payload: &[u8]) -> Result<StatusReport, StoreError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| invalid("a firmware status must be UTF-8"))?
        .trim();
    let report = if text.starts_with('{') || text.starts_with('"') {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| invalid(format!("a firmware status must be a word or JSON: {e}")))?;
        match value {
            Value::String(s) => StatusReport {
                firmware: None,
                state: s,
                reason: None,
            },
            Value::Object(o) => {
                let field = |k: &str| -> Result<Option<String>, StoreError> {
                    match o.get(k) {
                        None | Some(Value::Null) => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s.clone())),
                        Some(_) => Err(invalid(format!("firmware status: {k} must be a string"))),
                    }
                };
                StatusReport {
                    firmware: field("firmware")?,
                    state: field("status")?
                        .or(field("state")?)
                        .ok_or_else(|| invalid("firmware status: status is missing"))?,
                    reason: field("reason")?,
                }
            }
            _ => return Err(invalid("a firmware status must be a word or a JSON object")),
        }
    } else {
        StatusReport {
            firmware: None,
            state: text.to_string(),
            reason: None,
        }
    };
    if !REPORTABLE_STATES.contains(&report.state.as_str()) {
        return Err(invalid(format!(
            "firmware status {:?}: expected one of {}",
            report.state.chars().take(40).collect::<String>(),
            REPORTABLE_STATES.join(", ")
        )));
    }
    if let Some(r) = &report.reason {
        if r.len() > stratus_store::firmware::MAX_REASON_LEN {
            return Err(invalid("firmware status: reason is too long"));
        }
    }
    Ok(report)
}

/// Records device `device_id`'s status report (see the module docs); the assignment it was
/// about, as it is now.
pub async fn report(
    store: &StoreHandle,
    broker: &Broker,
    device_id: &str,
    report: StatusReport,
) -> Result<Option<Assignment>, StoreError> {
    let device = store
        .device(device_id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "device",
            id: device_id.into(),
        })?;
    let assignment = store.assignment(device_id).await?;
    let firmware_id = match (&report.firmware, &assignment) {
        (Some(id), _) => id.clone(),
        (None, Some(a)) => a.firmware_id.clone(),
        (None, None) => {
            return Err(invalid(
                "the device has no firmware assignment; name the firmware",
            ))
        }
    };
    stratus_store::firmware::check_firmware_id(&firmware_id)?;
    let record = store
        .firmware(&firmware_id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "firmware",
            id: firmware_id.clone(),
        })?;
    let campaign = assignment
        .as_ref()
        .filter(|a| a.firmware_id == firmware_id)
        .map(|a| a.campaign_id.clone());
    let now = now_ms();
    let state = device_state(
        &device,
        &record,
        campaign.as_deref(),
        &report.state,
        report.reason.as_deref(),
        now,
    );
    store
        .write(vec![
            Write::FirmwareStatus {
                device_id: device_id.into(),
                firmware_id: firmware_id.clone(),
                state: report.state.clone(),
                reason: report.reason.clone(),
                at_ms: now,
            },
            Write::SetFirmwareState {
                id: device_id.into(),
                state: Some(state),
            },
            Write::TouchDevice {
                id: device_id.into(),
                seen_at_ms: now,
            },
        ])
        .await?;
    tracing::info!(device = %device_id, firmware = %firmware_id, state = %report.state,
        reason = report.reason.as_deref().unwrap_or(""), "firmware status");
    broker.events.publish(Event::Firmware {
        device: device_id.into(),
        firmware: firmware_id,
        campaign,
        state: report.state,
        reason: report.reason,
        at: now,
    });
    store.assignment(device_id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Server};

    async fn server(dir: &Path) -> Server {
        let mut c = Config::default();
        c.server.data_dir = dir.to_path_buf();
        c.mqtt.port = 0;
        c.http.port = 0;
        c.coap.port = 0;
        Server::start(c).await.unwrap()
    }

    fn record(id: &str) -> FirmwareRecord {
        FirmwareRecord {
            id: id.into(),
            version: "2.0.0".into(),
            size: 3,
            hardware: None,
            key_id: "0123456789abcdef".into(),
            manifest: json!({"version": "2.0.0"}),
            created_at_ms: 1,
        }
    }

    /// A campaign writes the retained notice durably (it is back after a restart), and a
    /// status report updates history, campaign, device state and the event bus.
    #[tokio::test]
    async fn campaigns_notices_reports_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        {
            let srv = server(dir.path()).await;
            let fw = srv.firmware.clone();
            let store = fw.store.clone();
            crate::api::devices::register(
                &store,
                srv.auth.psk_sealer(),
                "admin",
                "d1",
                Value::Null,
            )
            .await
            .unwrap();
            store
                .write(vec![Write::PutFirmware(record(&id))])
                .await
                .unwrap();
            let device = store.device("d1").await.unwrap().unwrap();
            let campaign = NewCampaign {
                id: "c1".into(),
                firmware_id: id.clone(),
                devices: vec!["d1".into()],
                selector: None,
                created_at_ms: 5,
            };
            let mut events = srv.broker.events.subscribe();
            fw.start_campaign("admin", campaign, &record(&id), &[device])
                .await
                .unwrap();
            let retained = srv.broker.retained_for("devices/d1/firmware");
            assert_eq!(retained.len(), 1);
            let notice: Value = serde_json::from_slice(&retained[0].payload).unwrap();
            assert_eq!(notice["firmware"], id);
            assert_eq!(notice["campaign"], "c1");
            assert_eq!(Some(notice.clone()), fw.notice("d1").await.unwrap());
            let first = events.recv().await.unwrap();
            assert!(matches!(&*first, Event::Firmware { state, .. } if state == "assigned"));

            let report_in = parse_status(b"installed").unwrap();
            let a = report(&store, &srv.broker, "d1", report_in)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (a.campaign_id.as_str(), a.state.as_str()),
                ("c1", "installed")
            );
            let e = events.recv().await.unwrap();
            match &*e {
                Event::Firmware {
                    device,
                    firmware,
                    campaign,
                    state,
                    ..
                } => {
                    assert_eq!(
                        (
                            device.as_str(),
                            firmware.as_str(),
                            campaign.as_deref(),
                            state.as_str()
                        ),
                        ("d1", id.as_str(), Some("c1"), "installed")
                    );
                }
                other => panic!("unexpected event {other:?}"),
            }
            let d = store.device("d1").await.unwrap().unwrap();
            let state = d.firmware.clone().unwrap();
            assert_eq!(state["state"], "installed");
            assert_eq!(installed_version(&d).unwrap().to_string(), "2.0.0");
            // unknown firmware, no assignment
            let err = report(
                &store,
                &srv.broker,
                "d1",
                parse_status(
                    format!(
                        "{{\"firmware\": \"{}\", \"status\": \"failed\"}}",
                        "b".repeat(64)
                    )
                    .as_bytes(),
                )
                .unwrap(),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::NotFound {
                        kind: "firmware",
                        ..
                    }
                ),
                "{err}"
            );
            srv.shutdown(std::time::Duration::from_secs(4)).await;
        }
        let srv = server(dir.path()).await;
        let retained = srv.broker.retained_for("devices/d1/firmware");
        assert_eq!(retained.len(), 1, "the notice survives a restart");
        srv.shutdown(std::time::Duration::from_secs(4)).await;
    }

    #[test]
    fn status_payloads_are_words_or_json() {
        assert_eq!(parse_status(b"installed").unwrap().state, "installed");
        assert_eq!(parse_status(b" verified\n").unwrap().state, "verified");
        assert_eq!(
            parse_status(b"\"downloading\"").unwrap().state,
            "downloading"
        );
        let r =
            parse_status(br#"{"firmware": "ab", "status": "failed", "reason": "hash"}"#).unwrap();
        assert_eq!(
            r,
            StatusReport {
                firmware: Some("ab".into()),
                state: "failed".into(),
                reason: Some("hash".into())
            }
        );
        assert_eq!(
            parse_status(br#"{"state": "installed"}"#).unwrap().state,
            "installed"
        );
        for bad in [
            &b"assigned"[..],
            b"",
            b"{}",
            b"{\"status\": 3}",
            b"[1]",
            b"\xff",
            b"{\"status\": \"installed\", \"reason\": 7}",
        ] {
            assert!(parse_status(bad).is_err(), "{bad:?} accepted");
        }
    }
}
