//! The firmware checks: metadata, campaigns, assignments and status history.

use serde_json::json;

use super::{expect_err, new_device};
use crate::firmware::{FirmwareRecord, NewCampaign};
use crate::{Store, StoreError};

/// Runs every firmware check.
pub fn run_firmware<S: Store>(open: impl Fn() -> S) {
    metadata_round_trips_and_conflicts(&open);
    campaigns_assign_and_track_status(&open);
}

fn record(id_byte: char, version: &str) -> FirmwareRecord {
    FirmwareRecord {
        id: id_byte.to_string().repeat(64),
        version: version.into(),
        size: 1 << 20,
        hardware: Some("board-a".into()),
        key_id: "0123456789abcdef".into(),
        manifest: json!({"version": version}),
        created_at_ms: 1_700_000_000_000,
    }
}

fn metadata_round_trips_and_conflicts<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let a = record('a', "1.0.0");
    s.put_firmware(a.clone()).expect("put firmware");
    expect_err(s.put_firmware(a.clone()), "the same image twice", |e| {
        matches!(
            e,
            StoreError::Conflict {
                kind: "firmware",
                ..
            }
        )
    });
    let mut bad = record('b', "1.0.0");
    bad.id = "XYZ".into();
    expect_err(s.put_firmware(bad), "a malformed id", |e| {
        matches!(e, StoreError::Invalid(_))
    });
    drop(s);
    let s = open();
    assert_eq!(s.firmware(&a.id).expect("get"), Some(a.clone()));
    assert_eq!(s.firmware(&"c".repeat(64)).expect("get"), None);
    assert_eq!(s.list_firmware().expect("list"), vec![a]);
}

fn campaigns_assign_and_track_status<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let fw1 = record('d', "2.0.0");
    let fw2 = record('e', "3.0.0");
    s.put_firmware(fw1.clone()).expect("put");
    s.put_firmware(fw2.clone()).expect("put");
    s.create_device(new_device("fw-1")).expect("device");
    s.create_device(new_device("fw-2")).expect("device");
    let campaign = |id: &str, fw: &str, devices: &[&str]| NewCampaign {
        id: id.into(),
        firmware_id: fw.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        selector: None,
        created_at_ms: 1_700_000_001_000,
    };
    expect_err(
        s.create_campaign(campaign("c-x", &fw1.id, &["fw-1", "nobody"])),
        "a campaign with an unknown device",
        |e| matches!(e, StoreError::NotFound { kind: "device", .. }),
    );
    assert_eq!(s.campaign("c-x").expect("get"), None, "all or nothing");
    assert_eq!(s.assignment("fw-1").expect("get"), None);
    expect_err(
        s.create_campaign(campaign("c-y", &"f".repeat(64), &["fw-1"])),
        "a campaign of an unknown firmware",
        |e| {
            matches!(
                e,
                StoreError::NotFound {
                    kind: "firmware",
                    ..
                }
            )
        },
    );
    s.create_campaign(campaign("c-1", &fw1.id, &["fw-1", "fw-2", "fw-1"]))
        .expect("campaign");
    expect_err(
        s.create_campaign(campaign("c-1", &fw1.id, &["fw-1"])),
        "a taken campaign id",
        |e| {
            matches!(
                e,
                StoreError::Conflict {
                    kind: "campaign",
                    ..
                }
            )
        },
    );
    let a = s.assignment("fw-1").expect("get").expect("assigned");
    assert_eq!(
        (
            a.campaign_id.as_str(),
            a.firmware_id.as_str(),
            a.state.as_str()
        ),
        ("c-1", fw1.id.as_str(), "assigned")
    );
    s.record_firmware_status("fw-1", &fw1.id, "downloading", None, 1_700_000_002_000)
        .expect("status");
    s.record_firmware_status("fw-1", &fw1.id, "installed", None, 1_700_000_003_000)
        .expect("status");
    s.record_firmware_status(
        "fw-2",
        &fw1.id,
        "failed",
        Some("hash mismatch"),
        1_700_000_004_000,
    )
    .expect("status");
    expect_err(
        s.record_firmware_status("fw-2", &fw1.id, "exploded", None, 0),
        "an unknown state",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    drop(s);
    let s = open();
    let c = s.campaign("c-1").expect("get").expect("campaign");
    let states: Vec<(&str, &str, Option<&str>)> = c
        .devices
        .iter()
        .map(|d| (d.device_id.as_str(), d.state.as_str(), d.reason.as_deref()))
        .collect();
    assert_eq!(
        states,
        vec![
            ("fw-1", "installed", None),
            ("fw-2", "failed", Some("hash mismatch"))
        ]
    );
    let history: Vec<String> = s
        .firmware_history("fw-1", 100)
        .expect("history")
        .into_iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(history, ["assigned", "downloading", "installed"]);
    let last = s.firmware_history("fw-1", 1).expect("history");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].state, "installed", "the limit keeps the newest");

    // a new campaign takes over the assignment; the old one keeps its record
    s.create_campaign(campaign("c-2", &fw2.id, &["fw-1"]))
        .expect("campaign");
    let a = s.assignment("fw-1").expect("get").expect("assigned");
    assert_eq!(
        (a.campaign_id.as_str(), a.state.as_str()),
        ("c-2", "assigned")
    );
    // a late report about the old firmware goes to history only
    s.record_firmware_status("fw-1", &fw1.id, "failed", Some("late"), 1_700_000_005_000)
        .expect("status");
    assert_eq!(
        s.assignment("fw-1").expect("get").expect("assigned").state,
        "assigned"
    );
    let ids: Vec<String> = s
        .list_campaigns()
        .expect("list")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["c-1", "c-2"]);
    s.delete_device("fw-1").expect("delete");
    assert_eq!(s.assignment("fw-1").expect("get"), None);
    s.delete_device("fw-2").expect("delete");
}
