//! Firmware distribution state behind the [`FirmwareStore`] trait: uploaded images'
//! metadata (the bytes live in files, content-addressed, outside the database), campaigns
//! (one firmware assigned to a set of devices), each device's current assignment and the
//! history of the status reports.

use serde_json::Value as Json;

use crate::write::{Write, WriteBackend};
use crate::{check_id, check_text, StoreError};

/// The states of a device in a campaign, in the order a successful update goes through them.
pub const FIRMWARE_STATES: [&str; 5] =
    ["assigned", "downloading", "verified", "installed", "failed"];

/// Longest status reason kept.
pub const MAX_REASON_LEN: usize = 512;

/// An uploaded, verified firmware image (its metadata; the bytes are a file named by `id`).
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareRecord {
    /// The image's SHA-256, 64 lowercase hex digits.
    pub id: String,
    /// The manifest's version.
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// The hardware id it is for, or any.
    pub hardware: Option<String>,
    /// The id of the key that signed it.
    pub key_id: String,
    /// The signed manifest as uploaded.
    pub manifest: Json,
    /// When it was uploaded, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

/// What it takes to start a campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCampaign {
    /// Campaign id, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// The firmware to install.
    pub firmware_id: String,
    /// The devices (each must exist; duplicates count once).
    pub devices: Vec<String>,
    /// How the devices were chosen (kept for display), if by a selector.
    pub selector: Option<Json>,
    /// Now, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

/// A campaign with the state of each of its devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Campaign {
    /// Campaign id.
    pub id: String,
    /// The firmware it installs.
    pub firmware_id: String,
    /// How the devices were chosen, if by a selector.
    pub selector: Option<Json>,
    /// When it was created, Unix epoch milliseconds.
    pub created_at_ms: i64,
    /// Its devices by id.
    pub devices: Vec<CampaignDevice>,
}

/// One device's progress in a campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignDevice {
    /// Device id.
    pub device_id: String,
    /// One of [`FIRMWARE_STATES`].
    pub state: String,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// When the state last changed, Unix epoch milliseconds.
    pub updated_at_ms: i64,
}

/// A device's current assignment: the last campaign that included it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Device id.
    pub device_id: String,
    /// The campaign.
    pub campaign_id: String,
    /// The firmware.
    pub firmware_id: String,
    /// One of [`FIRMWARE_STATES`].
    pub state: String,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// When the state last changed, Unix epoch milliseconds.
    pub updated_at_ms: i64,
}

/// One entry of a device's firmware history (assignments and status reports).
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareEvent {
    /// Order of recording.
    pub seq: u64,
    /// Device id.
    pub device_id: String,
    /// The campaign the report was about, if any.
    pub campaign_id: Option<String>,
    /// The firmware.
    pub firmware_id: String,
    /// One of [`FIRMWARE_STATES`].
    pub state: String,
    /// The reason given, if any.
    pub reason: Option<String>,
    /// When, Unix epoch milliseconds.
    pub at_ms: i64,
}

/// Checks a firmware id: 64 lowercase hex digits.
pub fn check_firmware_id(id: &str) -> Result<(), StoreError> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "firmware id {:?} must be 64 lowercase hex digits (the image's sha256)",
            crate::truncate(id, 80)
        )))
    }
}

/// Checks a state name.
pub fn check_state(state: &str) -> Result<(), StoreError> {
    if FIRMWARE_STATES.contains(&state) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "firmware state {:?} must be one of {}",
            crate::truncate(state, 40),
            FIRMWARE_STATES.join(", ")
        )))
    }
}

impl FirmwareRecord {
    /// Checks the rules of each field.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_firmware_id(&self.id)?;
        check_text("firmware version", &self.version, 64)?;
        check_text("firmware key id", &self.key_id, 64)?;
        if let Some(h) = &self.hardware {
            check_text("firmware hardware", h, 64)?;
        }
        Ok(())
    }
}

impl NewCampaign {
    /// Checks the rules: valid ids, at least one device.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("campaign", &self.id)?;
        check_firmware_id(&self.firmware_id)?;
        if self.devices.is_empty() {
            return Err(StoreError::Invalid(
                "a campaign needs at least one device".into(),
            ));
        }
        for d in &self.devices {
            check_id("device", d)?;
        }
        Ok(())
    }
}

pub(crate) fn check_reason(reason: Option<&str>) -> Result<(), StoreError> {
    match reason {
        Some(r) if r.len() > MAX_REASON_LEN => Err(StoreError::Invalid(format!(
            "a firmware status reason must be at most {MAX_REASON_LEN} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Firmware metadata, campaigns, assignments and status history. Writes are provided on top
/// of [`WriteBackend`]; a backend implements the reads.
pub trait FirmwareStore: WriteBackend {
    /// One firmware's metadata.
    fn firmware(&self, id: &str) -> Result<Option<FirmwareRecord>, StoreError>;

    /// Every firmware, oldest first.
    fn list_firmware(&self) -> Result<Vec<FirmwareRecord>, StoreError>;

    /// One campaign with its devices' states.
    fn campaign(&self, id: &str) -> Result<Option<Campaign>, StoreError>;

    /// Every campaign (with its devices), oldest first.
    fn list_campaigns(&self) -> Result<Vec<Campaign>, StoreError>;

    /// A device's current assignment.
    fn assignment(&self, device_id: &str) -> Result<Option<Assignment>, StoreError>;

    /// A device's firmware history, oldest first, at most `limit` entries (the newest ones).
    fn firmware_history(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<FirmwareEvent>, StoreError>;

    /// Records an uploaded firmware ([`StoreError::Conflict`] when the id is stored).
    fn put_firmware(&self, record: FirmwareRecord) -> Result<(), StoreError> {
        self.write_one(Write::PutFirmware(record))?.into_done()
    }

    /// Starts a campaign: every device's assignment becomes it, in state `assigned`.
    fn create_campaign(&self, campaign: NewCampaign) -> Result<(), StoreError> {
        self.write_one(Write::CreateCampaign(campaign))?.into_done()
    }

    /// Records a status report (see [`Write::FirmwareStatus`]).
    fn record_firmware_status(
        &self,
        device_id: &str,
        firmware_id: &str,
        state: &str,
        reason: Option<&str>,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write_one(Write::FirmwareStatus {
            device_id: device_id.into(),
            firmware_id: firmware_id.into(),
            state: state.into(),
            reason: reason.map(Into::into),
            at_ms,
        })?
        .into_done()
    }
}
