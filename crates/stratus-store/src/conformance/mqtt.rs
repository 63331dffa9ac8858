//! The broker-state checks: retained messages, sessions and everything they own.

use bytes::Bytes;

use crate::mqtt::*;

fn retained(topic: &str, payload: &'static str) -> StoredRetained {
    StoredRetained {
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos: 1,
        properties: Bytes::new(),
        expires_at_ms: None,
        origin: String::new(),
    }
}

fn message(seq: u64, payload: &'static str) -> StoredMessage {
    StoredMessage {
        seq,
        topic: "t/1".into(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos: 1,
        retain: false,
        properties: Bytes::from_static(&[0x01, 0x01]),
        packet_id: None,
        state: 0,
        expires_at_ms: Some(1_900_000_000_000),
    }
}

fn session(client_id: &str) -> MqttOp {
    MqttOp::SessionPut {
        client_id: client_id.into(),
        expiry_secs: Some(3600),
        last_seen_ms: 1_700_000_000_000,
        will: Bytes::from_static(b"will"),
        owner: "device:d-1".into(),
    }
}

/// Runs every MQTT-state check. `open` must return a new handle on the same, initially empty,
/// storage each time it is called.
pub fn run_mqtt<S: MqttStore>(open: impl Fn() -> S) {
    empty_store_loads_empty(&open);
    retained_set_replace_delete_survive_reopen(&open);
    sessions_round_trip_with_everything_they_own(&open);
    message_state_updates_and_deletes(&open);
    session_delete_removes_everything_it_owns(&open);
    binary_payloads_and_unicode_topics_round_trip(&open);
    many_ops_in_one_commit(&open);
}

fn empty_store_loads_empty<S: MqttStore>(open: &impl Fn() -> S) {
    let s = open();
    assert_eq!(
        s.load_mqtt().expect("load"),
        MqttSnapshot::default(),
        "a new store is empty"
    );
    s.commit_mqtt(&[]).expect("an empty commit is fine");
}

fn retained_set_replace_delete_survive_reopen<S: MqttStore>(open: &impl Fn() -> S) {
    let s = open();
    let by = |topic: &str, payload: &'static str, origin: &str| StoredRetained {
        origin: origin.into(),
        ..retained(topic, payload)
    };
    s.commit_mqtt(&[
        MqttOp::RetainSet(by("a/1", "one", "client-1")),
        MqttOp::RetainSet(retained("a/2", "two")),
        MqttOp::RetainSet(by("a/1", "uno", "client-2")),
    ])
    .expect("commit");
    drop(s);
    let s = open();
    let snap = s.load_mqtt().expect("load");
    assert_eq!(
        snap.retained,
        vec![by("a/1", "uno", "client-2"), retained("a/2", "two")],
        "replace by topic, with who set it"
    );
    s.commit_mqtt(&[
        MqttOp::RetainDelete {
            topic: "a/1".into(),
        },
        MqttOp::RetainDelete {
            topic: "a/2".into(),
        },
    ])
    .expect("commit");
    drop(s);
    assert!(
        open().load_mqtt().expect("load").retained.is_empty(),
        "deleted retained messages stay deleted"
    );
}

fn sessions_round_trip_with_everything_they_own<S: MqttStore>(open: &impl Fn() -> S) {
    let s = open();
    let sub = StoredSubscription {
        filter: "$share/g/t/#".into(),
        options: 0b0010_0110,
        subscription_id: Some(7),
    };
    s.commit_mqtt(&[
        session("c1"),
        MqttOp::SubscriptionPut {
            client_id: "c1".into(),
            subscription: sub.clone(),
        },
        MqttOp::MessagePut {
            client_id: "c1".into(),
            message: message(2, "b"),
        },
        MqttOp::MessagePut {
            client_id: "c1".into(),
            message: message(1, "a"),
        },
        MqttOp::InboundQos2Put {
            client_id: "c1".into(),
            packet_id: 9,
        },
        MqttOp::InboundQos2Put {
            client_id: "c1".into(),
            packet_id: 9,
        },
        MqttOp::SessionPut {
            client_id: "c0".into(),
            expiry_secs: None,
            last_seen_ms: 5,
            will: Bytes::new(),
            owner: String::new(),
        },
    ])
    .expect("commit");
    drop(s);
    let snap = open().load_mqtt().expect("load");
    assert_eq!(snap.sessions.len(), 2);
    let c0 = &snap.sessions[0];
    assert_eq!(
        (c0.client_id.as_str(), c0.expiry_secs, c0.last_seen_ms),
        ("c0", None, 5),
        "sessions by client id"
    );
    let c1 = &snap.sessions[1];
    assert_eq!(c1.expiry_secs, Some(3600));
    assert_eq!(c1.will, Bytes::from_static(b"will"));
    assert_eq!(c1.owner, "device:d-1", "the owner is kept");
    assert_eq!(c0.owner, "", "an empty owner reads back empty");
    assert_eq!(c1.subscriptions, vec![sub]);
    assert_eq!(
        c1.messages,
        vec![message(1, "a"), message(2, "b")],
        "messages in seq order"
    );
    assert_eq!(c1.inbound_qos2, vec![9], "an inbound id is kept once");
    let s = open();
    s.commit_mqtt(&[
        MqttOp::SubscriptionDelete {
            client_id: "c1".into(),
            filter: "$share/g/t/#".into(),
        },
        MqttOp::InboundQos2Delete {
            client_id: "c1".into(),
            packet_id: 9,
        },
        MqttOp::SessionDelete {
            client_id: "c0".into(),
        },
        MqttOp::SessionDelete {
            client_id: "c1".into(),
        },
    ])
    .expect("commit");
}

fn message_state_updates_and_deletes<S: MqttStore>(open: &impl Fn() -> S) {
    let s = open();
    s.commit_mqtt(&[
        session("c2"),
        MqttOp::MessagePut {
            client_id: "c2".into(),
            message: message(10, "x"),
        },
        MqttOp::MessagePut {
            client_id: "c2".into(),
            message: message(11, "y"),
        },
        MqttOp::MessageState {
            client_id: "c2".into(),
            seq: 10,
            packet_id: 77,
            state: 1,
        },
        MqttOp::MessageDelete {
            client_id: "c2".into(),
            seq: 11,
        },
    ])
    .expect("commit");
    drop(s);
    let snap = open().load_mqtt().expect("load");
    let m = &snap.sessions[0].messages;
    assert_eq!(m.len(), 1, "the deleted message is gone");
    assert_eq!(
        (m[0].seq, m[0].packet_id, m[0].state),
        (10, Some(77), 1),
        "state update is kept"
    );
    open()
        .commit_mqtt(&[MqttOp::SessionDelete {
            client_id: "c2".into(),
        }])
        .expect("commit");
}

fn session_delete_removes_everything_it_owns<S: MqttStore>(open: &impl Fn() -> S) {
    let s = open();
    s.commit_mqtt(&[
        session("c3"),
        MqttOp::SubscriptionPut {
            client_id: "c3".into(),
            subscription: StoredSubscription {
                filter: "x".into(),
                options: 1,
                subscription_id: None,
            },
        },
        MqttOp::MessagePut {
            client_id: "c3".into(),
            message: message(1, "m"),
        },
        MqttOp::InboundQos2Put {
            client_id: "c3".into(),
            packet_id: 1,
        },
    ])
    .expect("commit");
    s.commit_mqtt(&[
        MqttOp::SessionDelete {
            client_id: "c3".into(),
        },
        session("c3"),
    ])
    .expect("commit");
    drop(s);
    let snap = open().load_mqtt().expect("load");
    assert_eq!(snap.sessions.len(), 1);
    let c3 = &snap.sessions[0];
    assert!(
        c3.subscriptions.is_empty() && c3.messages.is_empty() && c3.inbound_qos2.is_empty(),
        "a deleted session leaves nothing behind for its successor: {c3:?}"
    );
    open()
        .commit_mqtt(&[MqttOp::SessionDelete {
            client_id: "c3".into(),
        }])
        .expect("commit");
}

fn binary_payloads_and_unicode_topics_round_trip<S: MqttStore>(open: &impl Fn() -> S) {
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let r = StoredRetained {
        topic: "température/über/🌡".into(),
        payload: Bytes::from(payload),
        qos: 2,
        properties: Bytes::from_static(&[0, 1, 2, 0xFF]),
        expires_at_ms: Some(u64::from(u32::MAX) * 1000),
        origin: String::new(),
    };
    open()
        .commit_mqtt(&[MqttOp::RetainSet(r.clone())])
        .expect("commit");
    assert_eq!(open().load_mqtt().expect("load").retained, vec![r]);
    open()
        .commit_mqtt(&[MqttOp::RetainDelete {
            topic: "température/über/🌡".into(),
        }])
        .expect("commit");
}

fn many_ops_in_one_commit<S: MqttStore>(open: &impl Fn() -> S) {
    let s = open();
    let mut ops = vec![session("bulk")];
    for seq in 0..5000u64 {
        ops.push(MqttOp::MessagePut {
            client_id: "bulk".into(),
            message: message(seq, "p"),
        });
    }
    s.commit_mqtt(&ops).expect("commit");
    drop(s);
    let snap = open().load_mqtt().expect("load");
    let seqs: Vec<u64> = snap.sessions[0].messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (0..5000).collect::<Vec<_>>());
    open()
        .commit_mqtt(&[MqttOp::SessionDelete {
            client_id: "bulk".into(),
        }])
        .expect("commit");
    assert_eq!(
        open().load_mqtt().expect("load"),
        MqttSnapshot::default(),
        "the suite leaves the store empty"
    );
}
