//! The device registry: identity and secret hash, attributes, desired (versioned) and reported
//! configuration, firmware state and last seen, behind the [`DeviceStore`] trait.

use serde_json::{Map, Value as Json};

use crate::write::{Write, WriteBackend};
use crate::{check_id, check_text, StoreError};

/// Longest accepted secret hash string (an argon2 PHC string is about 100 bytes).
pub const MAX_SECRET_HASH_LEN: usize = 1024;

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Id, `[A-Za-z0-9._-]{1,64}`; also its OAuth `client_id` (scope `device`).
    pub id: String,
    /// The argon2 hash of its secret (PHC string). Never render it.
    pub secret_hash: String,
    /// Free-form attributes, always a JSON object.
    pub attributes: Json,
    /// When it was registered, Unix epoch milliseconds.
    pub created_at_ms: i64,
    /// The configuration the cloud wants it to have.
    pub desired: DesiredConfig,
    /// The configuration it last reported, if any.
    pub reported: Option<ReportedConfig>,
    /// Firmware state (opaque JSON kept for the firmware service), if any.
    pub firmware: Option<Json>,
    /// When it was last heard from, Unix epoch milliseconds, if ever.
    pub last_seen_ms: Option<i64>,
    /// Its own replay policy: every message must carry `sent` and `nonce` (on top of the
    /// server-wide `[telemetry] require_freshness`). Off for a new device.
    pub require_freshness: bool,
}

/// The desired configuration of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredConfig {
    /// Starts at 0 (the empty object) and grows by one with every put; the HTTP `ETag`.
    pub version: u64,
    /// The configuration.
    pub value: Json,
    /// When it was last set, Unix epoch milliseconds (the creation time for version 0).
    pub updated_at_ms: i64,
}

/// The configuration a device reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedConfig {
    /// The configuration.
    pub value: Json,
    /// When it was reported, Unix epoch milliseconds.
    pub updated_at_ms: i64,
}

/// What it takes to register a device.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDevice {
    /// Id, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// The argon2 hash of its secret (hashing happens in the caller).
    pub secret_hash: String,
    /// Attributes: a JSON object (`Json::Null` is taken as the empty object).
    pub attributes: Json,
    /// Now, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

impl NewDevice {
    /// Checks the rules: a valid id, a non-empty hash, object attributes.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("device", &self.id)?;
        check_secret_hash(&self.secret_hash)?;
        check_attributes(&self.attributes)
    }

    /// The attributes to store (`Null` becomes `{}`).
    pub fn attributes_or_empty(&self) -> Json {
        match &self.attributes {
            Json::Null => Json::Object(Map::new()),
            other => other.clone(),
        }
    }
}

/// How to change a device's attributes.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeUpdate {
    /// Replace them with this object.
    Replace(Json),
    /// Apply this object as an RFC 7396 JSON merge patch (`null` removes a member).
    Merge(Json),
}

impl AttributeUpdate {
    /// Applies the update to `current`, checking that the result is an object.
    pub fn apply(&self, current: Json) -> Result<Json, StoreError> {
        match self {
            AttributeUpdate::Replace(new) => {
                check_attributes(new)?;
                Ok(match new {
                    Json::Null => Json::Object(Map::new()),
                    other => other.clone(),
                })
            }
            AttributeUpdate::Merge(patch) => {
                if !patch.is_object() {
                    return Err(StoreError::Invalid(
                        "an attribute merge patch must be a JSON object".into(),
                    ));
                }
                let mut target = current;
                merge_patch(&mut target, patch);
                Ok(target)
            }
        }
    }
}

/// Applies `patch` to `target` as RFC 7396 JSON Merge Patch.
pub fn merge_patch(target: &mut Json, patch: &Json) {
    let Json::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Json::Object(Map::new());
    }
    if let Json::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Json::Null), value);
            }
        }
    }
}

pub(crate) fn check_attributes(attributes: &Json) -> Result<(), StoreError> {
    if attributes.is_object() || attributes.is_null() {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "device attributes must be a JSON object".into(),
        ))
    }
}

pub(crate) fn check_secret_hash(hash: &str) -> Result<(), StoreError> {
    check_text("secret hash", hash, MAX_SECRET_HASH_LEN)
}

/// The device registry.
///
/// Reads are required methods; writes are provided on top of
/// [`WriteBackend::commit_jobs`] (each is one durable transaction; submit [`Write`]s through
/// the group committer or a [`StoreHandle`](crate::StoreHandle) to share commits).
pub trait DeviceStore: WriteBackend {
    /// The device with this id, if registered.
    fn device(&self, id: &str) -> Result<Option<Device>, StoreError>;

    /// Up to `limit` devices with ids greater than `after` (all when `None`), ordered by id.
    /// Page on with the last id returned.
    fn list_devices(&self, after: Option<&str>, limit: usize) -> Result<Vec<Device>, StoreError>;

    /// How many devices are registered.
    fn device_count(&self) -> Result<u64, StoreError>;

    /// Every device that has a sealed CoAPS pre-shared key, with it (see
    /// [`Write::SetCoapPsk`]).
    fn coap_psks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// The ids of every device whose own policy requires freshness (see
    /// [`Device::require_freshness`]), ordered by id.
    fn devices_requiring_freshness(&self) -> Result<Vec<String>, StoreError>;

    /// Registers a device; [`StoreError::Conflict`] if the id is taken (by a device or client).
    fn create_device(&self, new: NewDevice) -> Result<Device, StoreError> {
        self.write_one(Write::CreateDevice(new))?.into_device()
    }

    /// Replaces or merges attributes; [`StoreError::NotFound`] if there is no such device.
    fn update_device_attributes(
        &self,
        id: &str,
        update: AttributeUpdate,
    ) -> Result<Device, StoreError> {
        self.write_one(Write::UpdateAttributes {
            id: id.into(),
            update,
        })?
        .into_device()
    }

    /// Turns the device's own freshness requirement on or off; returns the device.
    fn set_require_freshness(&self, id: &str, on: bool) -> Result<Device, StoreError> {
        self.write_one(Write::SetRequireFreshness { id: id.into(), on })?
            .into_device()
    }

    /// Replaces the secret hash (rotation).
    fn set_device_secret(&self, id: &str, secret_hash: &str) -> Result<(), StoreError> {
        self.write_one(Write::SetDeviceSecret {
            id: id.into(),
            secret_hash: secret_hash.into(),
        })?
        .into_done()
    }

    /// Deletes a device and everything that belongs to it (telemetry, retention rules).
    fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        self.write_one(Write::DeleteDevice { id: id.into() })?
            .into_done()
    }

    /// Sets the desired configuration (compare-and-set with `expected_version`); returns it
    /// with its new version.
    fn put_desired_config(
        &self,
        id: &str,
        value: Json,
        expected_version: Option<u64>,
        now_ms: i64,
    ) -> Result<DesiredConfig, StoreError> {
        self.write_one(Write::PutDesiredConfig {
            id: id.into(),
            value,
            expected_version,
            now_ms,
        })?
        .into_desired()
    }

    /// Records the reported configuration.
    fn put_reported_config(
        &self,
        id: &str,
        value: Json,
        now_ms: i64,
    ) -> Result<ReportedConfig, StoreError> {
        self.write_one(Write::PutReportedConfig {
            id: id.into(),
            value,
            now_ms,
        })?
        .into_reported()
    }

    /// Replaces the firmware state.
    fn set_firmware_state(&self, id: &str, state: Option<Json>) -> Result<(), StoreError> {
        self.write_one(Write::SetFirmwareState {
            id: id.into(),
            state,
        })?
        .into_done()
    }

    /// Records that the device was heard from at `seen_at_ms` (an earlier time is ignored).
    fn touch_device(&self, id: &str, seen_at_ms: i64) -> Result<(), StoreError> {
        self.write_one(Write::TouchDevice {
            id: id.into(),
            seen_at_ms,
        })?
        .into_done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of RFC 7396 appendix A.
    #[test]
    fn merge_patch_follows_rfc_7396() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut got = target.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, want, "{target} + {patch}");
        }
    }
}
