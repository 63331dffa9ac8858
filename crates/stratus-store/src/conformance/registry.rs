//! The registry checks: device CRUD, conflicts, configuration compare-and-set, OAuth clients
//! and the token revocation list.

use serde_json::json;

use super::{expect_err, new_device};
use crate::telemetry::{Point, PointQuery, Value};
use crate::{AttributeUpdate, OAuthClient, Store, StoreError};

/// Runs every device-registry check.
pub fn run_devices<S: Store>(open: impl Fn() -> S) {
    create_get_and_conflict(&open);
    ids_are_validated(&open);
    list_pages_by_id(&open);
    attributes_replace_and_merge(&open);
    secret_rotation(&open);
    require_freshness_per_device(&open);
    desired_config_compare_and_set(&open);
    reported_config_firmware_and_last_seen(&open);
    delete_removes_the_device_and_its_telemetry(&open);
    devices_and_clients_share_one_id_space(&open);
}

/// Runs every OAuth-client and revocation check.
pub fn run_clients<S: Store>(open: impl Fn() -> S) {
    clients_crud(&open);
    revocation_list(&open);
}

fn create_get_and_conflict<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let created = s.create_device(new_device("dev-a")).expect("create");
    assert_eq!(created.id, "dev-a");
    assert_eq!(created.attributes, json!({ "model": "t-1000" }));
    assert_eq!(created.created_at_ms, 1_700_000_000_000);
    assert_eq!(
        (
            created.desired.version,
            &created.desired.value,
            created.desired.updated_at_ms
        ),
        (0, &json!({}), 1_700_000_000_000),
        "a new device wants the empty config at version 0"
    );
    assert_eq!(
        (&created.reported, &created.firmware, created.last_seen_ms),
        (&None, &None, None)
    );
    drop(s);
    let s = open();
    assert_eq!(
        s.device("dev-a").expect("get"),
        Some(created.clone()),
        "what create returned is what is stored"
    );
    assert_eq!(s.device("dev-none").expect("get"), None);
    expect_err(
        s.create_device(new_device("dev-a")),
        "a taken id",
        |e| matches!(e, StoreError::Conflict { kind: "device", id } if id == "dev-a"),
    );
    let mut null_attrs = new_device("dev-null-attrs");
    null_attrs.attributes = serde_json::Value::Null;
    assert_eq!(
        s.create_device(null_attrs).expect("create").attributes,
        json!({}),
        "null attributes are the empty object"
    );
    s.delete_device("dev-null-attrs").expect("delete");
    s.delete_device("dev-a").expect("delete");
}

fn ids_are_validated<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let long = "x".repeat(65);
    for bad in ["", "a/b", "a b", "héllo", "a+b", long.as_str()] {
        expect_err(s.create_device(new_device(bad)), bad, |e| {
            matches!(e, StoreError::Invalid(_))
        });
    }
    let max = "A-z_0.9".repeat(9) + "x";
    assert_eq!(max.len(), 64);
    s.create_device(new_device(&max))
        .expect("64 characters of [A-Za-z0-9._-] are a valid id");
    s.delete_device(&max).expect("delete");
    let mut array_attrs = new_device("dev-bad-attrs");
    array_attrs.attributes = json!([1, 2]);
    expect_err(s.create_device(array_attrs), "array attributes", |e| {
        matches!(e, StoreError::Invalid(_))
    });
    let mut no_hash = new_device("dev-no-hash");
    no_hash.secret_hash = String::new();
    expect_err(s.create_device(no_hash), "an empty secret hash", |e| {
        matches!(e, StoreError::Invalid(_))
    });
    assert_eq!(s.device("dev-bad-attrs").expect("get"), None);
}

fn list_pages_by_id<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let before = s.device_count().expect("count");
    for id in ["list-3", "list-1", "list-5", "list-2", "list-4"] {
        s.create_device(new_device(id)).expect("create");
    }
    assert_eq!(s.device_count().expect("count"), before + 5);
    let ids = |after: Option<&str>, limit| -> Vec<String> {
        s.list_devices(after, limit)
            .expect("list")
            .into_iter()
            .map(|d| d.id)
            .filter(|id| id.starts_with("list-"))
            .collect()
    };
    assert_eq!(
        ids(Some("list-"), 2),
        ["list-1", "list-2"],
        "first page, by id"
    );
    assert_eq!(ids(Some("list-2"), 2), ["list-3", "list-4"], "next page");
    assert_eq!(ids(Some("list-4"), 2), ["list-5"], "last page");
    assert!(ids(Some("list-5"), 2).is_empty(), "after the last");
    assert!(s.list_devices(None, 0).expect("list").is_empty(), "limit 0");
    let all = s.list_devices(None, 1000).expect("list");
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "listed in id order"
    );
    for i in 1..=5 {
        s.delete_device(&format!("list-{i}")).expect("delete");
    }
    assert_eq!(s.device_count().expect("count"), before);
}

fn attributes_replace_and_merge<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("dev-attrs")).expect("create");
    let d = s
        .update_device_attributes(
            "dev-attrs",
            AttributeUpdate::Replace(json!({ "room": "lab", "pos": { "x": 1, "y": 2 } })),
        )
        .expect("replace");
    assert_eq!(
        d.attributes,
        json!({ "room": "lab", "pos": { "x": 1, "y": 2 } })
    );
    let d = s
        .update_device_attributes(
            "dev-attrs",
            AttributeUpdate::Merge(json!({ "room": null, "pos": { "y": 3 }, "floor": 2 })),
        )
        .expect("merge");
    assert_eq!(
        d.attributes,
        json!({ "pos": { "x": 1, "y": 3 }, "floor": 2 }),
        "RFC 7396: null removes, objects merge"
    );
    drop(s);
    let s = open();
    assert_eq!(
        s.device("dev-attrs").expect("get").map(|d| d.attributes),
        Some(json!({ "pos": { "x": 1, "y": 3 }, "floor": 2 }))
    );
    expect_err(
        s.update_device_attributes("dev-attrs", AttributeUpdate::Merge(json!(7))),
        "a non-object patch",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    expect_err(
        s.update_device_attributes("dev-attrs", AttributeUpdate::Replace(json!("x"))),
        "non-object attributes",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    expect_err(
        s.update_device_attributes("dev-none", AttributeUpdate::Replace(json!({}))),
        "a missing device",
        |e| matches!(e, StoreError::NotFound { kind: "device", .. }),
    );
    s.delete_device("dev-attrs").expect("delete");
}

fn secret_rotation<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("dev-secret")).expect("create");
    s.set_device_secret("dev-secret", "$argon2id$rotated")
        .expect("rotate");
    drop(s);
    let s = open();
    assert_eq!(
        s.device("dev-secret").expect("get").map(|d| d.secret_hash),
        Some("$argon2id$rotated".to_owned())
    );
    expect_err(
        s.set_device_secret("dev-secret", ""),
        "an empty hash",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    expect_err(
        s.set_device_secret("dev-none", "$argon2id$x"),
        "a missing device",
        |e| matches!(e, StoreError::NotFound { .. }),
    );
    s.delete_device("dev-secret").expect("delete");
}

fn require_freshness_per_device<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let a = s.create_device(new_device("fresh-a")).expect("create");
    s.create_device(new_device("fresh-b")).expect("create");
    assert!(!a.require_freshness, "off for a new device");
    assert_eq!(
        s.devices_requiring_freshness().expect("list"),
        Vec::<String>::new()
    );
    let on = s.set_require_freshness("fresh-b", true).expect("set");
    assert!(on.require_freshness, "the answer shows the new policy");
    assert_eq!(
        on.attributes,
        json!({ "model": "t-1000" }),
        "nothing else changes"
    );
    drop(s);
    let s = open();
    assert!(
        s.device("fresh-b")
            .expect("get")
            .expect("there")
            .require_freshness,
        "the policy is stored"
    );
    assert!(
        !s.device("fresh-a")
            .expect("get")
            .expect("there")
            .require_freshness,
        "only for that device"
    );
    assert_eq!(
        s.devices_requiring_freshness().expect("list"),
        vec!["fresh-b".to_string()]
    );
    let listed = s.list_devices(Some("fresh-"), 10).expect("list");
    assert_eq!(
        listed
            .iter()
            .map(|d| (d.id.as_str(), d.require_freshness))
            .collect::<Vec<_>>(),
        [("fresh-a", false), ("fresh-b", true)]
    );
    assert!(
        !s.set_require_freshness("fresh-b", false)
            .expect("unset")
            .require_freshness
    );
    assert_eq!(
        s.devices_requiring_freshness().expect("list"),
        Vec::<String>::new()
    );
    expect_err(
        s.set_require_freshness("fresh-none", true),
        "an unknown device",
        |e| matches!(e, StoreError::NotFound { kind: "device", .. }),
    );
    s.set_require_freshness("fresh-a", true).expect("set");
    s.delete_device("fresh-a").expect("delete");
    assert_eq!(
        s.devices_requiring_freshness().expect("list"),
        Vec::<String>::new(),
        "a deleted device takes its policy with it"
    );
    s.delete_device("fresh-b").expect("delete");
}

fn desired_config_compare_and_set<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("dev-cfg")).expect("create");
    let v1 = s
        .put_desired_config("dev-cfg", json!({ "rate": 10 }), None, 2_000)
        .expect("unconditional put");
    assert_eq!((v1.version, v1.updated_at_ms), (1, 2_000));
    let v2 = s
        .put_desired_config("dev-cfg", json!({ "rate": 20 }), Some(1), 3_000)
        .expect("put with the current version");
    assert_eq!(v2.version, 2);
    expect_err(
        s.put_desired_config("dev-cfg", json!({ "rate": 30 }), Some(1), 4_000),
        "a stale version",
        |e| matches!(e, StoreError::VersionMismatch { current: 2 }),
    );
    drop(s);
    let s = open();
    let desired = s.device("dev-cfg").expect("get").expect("exists").desired;
    assert_eq!(
        (desired.version, desired.value, desired.updated_at_ms),
        (2, json!({ "rate": 20 }), 3_000),
        "a failed compare-and-set changes nothing"
    );
    expect_err(
        s.put_desired_config("dev-none", json!({}), None, 1),
        "a missing device",
        |e| matches!(e, StoreError::NotFound { .. }),
    );
    s.create_device(new_device("dev-cfg-2")).expect("create");
    assert_eq!(
        s.put_desired_config("dev-cfg-2", json!([1]), Some(0), 5)
            .expect("version 0 is the initial version")
            .version,
        1
    );
    s.delete_device("dev-cfg").expect("delete");
    s.delete_device("dev-cfg-2").expect("delete");
}

fn reported_config_firmware_and_last_seen<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("dev-rep")).expect("create");
    let reported = s
        .put_reported_config("dev-rep", json!({ "rate": 10, "fw": "1.2" }), 7_000)
        .expect("report");
    assert_eq!(reported.updated_at_ms, 7_000);
    s.set_firmware_state(
        "dev-rep",
        Some(json!({ "status": "installed", "version": "1.2" })),
    )
    .expect("firmware");
    s.touch_device("dev-rep", 100).expect("touch");
    s.touch_device("dev-rep", 50).expect("touch");
    drop(s);
    let s = open();
    let d = s.device("dev-rep").expect("get").expect("exists");
    assert_eq!(d.reported, Some(reported));
    assert_eq!(
        d.firmware,
        Some(json!({ "status": "installed", "version": "1.2" }))
    );
    assert_eq!(
        d.last_seen_ms,
        Some(100),
        "an earlier time does not go back"
    );
    s.touch_device("dev-rep", 200).expect("touch");
    s.set_firmware_state("dev-rep", None).expect("clear");
    let d = s.device("dev-rep").expect("get").expect("exists");
    assert_eq!((d.last_seen_ms, d.firmware), (Some(200), None));
    for result in [
        s.put_reported_config("dev-none", json!({}), 1).map(|_| ()),
        s.set_firmware_state("dev-none", None),
        s.touch_device("dev-none", 1),
    ] {
        expect_err(result, "a missing device", |e| {
            matches!(e, StoreError::NotFound { .. })
        });
    }
    s.delete_device("dev-rep").expect("delete");
}

fn delete_removes_the_device_and_its_telemetry<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("dev-del")).expect("create");
    s.append_telemetry(vec![
        Point::new("dev-del", "temp", 60_000, Value::Number(1.0)),
        Point::new("dev-del", "on", 60_000, Value::Bool(true)),
    ])
    .expect("append");
    s.put_desired_config("dev-del", json!({ "a": 1 }), None, 1)
        .expect("config");
    s.delete_device("dev-del").expect("delete");
    drop(s);
    let s = open();
    assert_eq!(s.device("dev-del").expect("get"), None);
    expect_err(s.delete_device("dev-del"), "deleting twice", |e| {
        matches!(e, StoreError::NotFound { kind: "device", .. })
    });
    let again = s.create_device(new_device("dev-del")).expect("re-create");
    assert_eq!(again.desired.version, 0, "a new device starts afresh");
    assert!(
        s.keys("dev-del").expect("keys").is_empty(),
        "a deleted device's telemetry went with it"
    );
    assert!(s
        .points(&PointQuery::new("dev-del", "temp", i64::MIN, i64::MAX))
        .expect("points")
        .points
        .is_empty());
    s.delete_device("dev-del").expect("delete");
}

fn devices_and_clients_share_one_id_space<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_client(client("shared-1", &["admin"]))
        .expect("create client");
    expect_err(
        s.create_device(new_device("shared-1")),
        "a device with a client's id",
        |e| matches!(e, StoreError::Conflict { .. }),
    );
    s.create_device(new_device("shared-2")).expect("create");
    expect_err(
        s.create_client(client("shared-2", &[])),
        "a client with a device's id",
        |e| matches!(e, StoreError::Conflict { kind: "client", .. }),
    );
    s.delete_client("shared-1").expect("delete");
    s.delete_device("shared-2").expect("delete");
}

fn client(id: &str, scopes: &[&str]) -> OAuthClient {
    OAuthClient {
        client_id: id.into(),
        secret_hash: format!("$argon2id$hash-of-{id}"),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        created_at_ms: 1_700_000_000_123,
    }
}

fn clients_crud<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let admin = client("cl-admin", &["admin"]);
    let app = client("cl-app", &["telemetry:read", "devices:write"]);
    let bare = client("cl-bare", &[]);
    for c in [&admin, &app, &bare] {
        assert_eq!(&s.create_client(c.clone()).expect("create"), c);
    }
    drop(s);
    let s = open();
    assert_eq!(s.client("cl-app").expect("get"), Some(app.clone()));
    assert_eq!(s.client("cl-none").expect("get"), None);
    let listed: Vec<OAuthClient> = s
        .list_clients()
        .expect("list")
        .into_iter()
        .filter(|c| c.client_id.starts_with("cl-"))
        .collect();
    assert_eq!(listed, vec![admin.clone(), app, bare], "listed by id");
    expect_err(s.create_client(admin.clone()), "a taken id", |e| {
        matches!(e, StoreError::Conflict { kind: "client", .. })
    });
    for scopes in [["a b"], ["quote\"d"], [""], ["back\\slash"]] {
        expect_err(
            s.create_client(client("cl-bad-scope", &scopes)),
            "a bad scope",
            |e| matches!(e, StoreError::Invalid(_)),
        );
    }
    expect_err(s.create_client(client("cl/bad", &[])), "a bad id", |e| {
        matches!(e, StoreError::Invalid(_))
    });
    s.set_client_secret("cl-admin", "$argon2id$rotated")
        .expect("rotate");
    assert_eq!(
        s.client("cl-admin").expect("get").map(|c| c.secret_hash),
        Some("$argon2id$rotated".to_owned())
    );
    expect_err(
        s.set_client_secret("cl-none", "$argon2id$x"),
        "a missing client",
        |e| matches!(e, StoreError::NotFound { kind: "client", .. }),
    );
    for id in ["cl-admin", "cl-app", "cl-bare"] {
        s.delete_client(id).expect("delete");
    }
    assert_eq!(s.client("cl-admin").expect("get"), None);
    expect_err(s.delete_client("cl-admin"), "deleting twice", |e| {
        matches!(e, StoreError::NotFound { .. })
    });
}

fn revocation_list<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.revoke_token("jti-1", 1_000).expect("revoke");
    s.revoke_token("jti-2", 2_000).expect("revoke");
    s.revoke_token("jti-1", 3_000)
        .expect("revoking again is fine");
    s.revoke_token("jti-1", 500)
        .expect("an earlier expiry does not shorten it");
    drop(s);
    let s = open();
    assert!(s.is_token_revoked("jti-1").expect("check"));
    assert!(s.is_token_revoked("jti-2").expect("check"));
    assert!(!s.is_token_revoked("jti-3").expect("check"));
    assert_eq!(
        s.revoked_tokens().expect("list"),
        vec![("jti-1".to_string(), 3_000), ("jti-2".to_string(), 2_000)]
    );
    assert_eq!(s.purge_revoked_tokens(1_500).expect("purge"), 0);
    assert_eq!(
        s.purge_revoked_tokens(2_500).expect("purge"),
        1,
        "jti-2 expired"
    );
    assert!(!s.is_token_revoked("jti-2").expect("check"));
    assert!(s.is_token_revoked("jti-1").expect("check"));
    assert_eq!(
        s.purge_revoked_tokens(3_000).expect("purge"),
        1,
        "expired at its expiry time"
    );
    assert!(!s.is_token_revoked("jti-1").expect("check"));
    expect_err(s.revoke_token("", 1), "an empty token id", |e| {
        matches!(e, StoreError::Invalid(_))
    });
}
