//! The SDK against a real server, per transport: telemetry stored exactly once, the desired
//! configuration delivered and the reported one stored, tokens refreshed on expiry and on 401,
//! nothing lost or duplicated across a server restart or a device restart, MQTTS.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{eventually, TestServer};
use serde_json::{json, Value};
use stratus_device::{Device, MqttVersion, Record, Status, Transport};

const FLUSH: Duration = Duration::from_secs(20);

async fn device(srv: &TestServer, id: &str, secret: &str, transport: Transport) -> Device {
    Device::builder(srv.url(), id, secret)
        .mqtt(srv.mqtt_url())
        .coap(srv.coap_url())
        .transport(transport)
        .config_poll_interval(Duration::from_millis(200))
        .build()
        .await
        .expect("device builds")
}

/// The values of series `v`, which the tests number 0, 1, 2…
async fn stored_values(srv: &TestServer, id: &str) -> Vec<i64> {
    srv.points(id, "v")
        .await
        .into_iter()
        .map(|(_, v)| v.as_f64().expect("a number") as i64)
        .collect()
}

async fn round_trip(transport: Transport, version: MqttVersion) {
    let srv = TestServer::start().await;
    let id = format!("rt-{transport}-{version:?}").to_lowercase();
    let secret = srv.add_device(&id).await;
    let mut dev = Device::builder(srv.url(), &id, &secret)
        .mqtt(srv.mqtt_url())
        .coap(srv.coap_url())
        .transport(transport)
        .mqtt_version(version)
        .config_poll_interval(Duration::from_millis(200))
        .max_batch(7)
        .build()
        .await
        .expect("device builds");

    for v in 0..40 {
        dev.send(Record::new().with("v", v).with("ok", v % 2 == 0))
            .unwrap();
    }
    dev.flush(FLUSH).await.expect("all acknowledged");
    let stats = dev.stats();
    assert_eq!(stats.records_acked, 40, "{stats:?}");
    assert_eq!(stats.records_failed, 0);
    assert!(stats.messages_sent >= 6, "batches of 7: {stats:?}");
    assert_eq!(stored_values(&srv, &id).await, (0..40).collect::<Vec<_>>());
    assert_eq!(srv.points(&id, "ok").await.len(), 40);

    // Desired configuration: version 0 at once, then each change.
    let first = tokio::time::timeout(FLUSH, dev.next_config())
        .await
        .expect("config in time")
        .unwrap();
    assert_eq!(first.version, 0);
    srv.put_config(&id, json!({"interval_s": 5})).await;
    let next = tokio::time::timeout(FLUSH, dev.next_config())
        .await
        .expect("new config in time")
        .unwrap();
    assert_eq!(next.version, 1);
    assert_eq!(next.get("interval_s"), Some(&json!(5)));

    dev.report_config(next.config.clone()).unwrap();
    dev.flush(FLUSH).await.expect("report acknowledged");
    let view = srv.device_view(&id).await;
    assert_eq!(
        view["reported"]["config"],
        json!({"interval_s": 5}),
        "{view}"
    );
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_round_trip() {
    round_trip(Transport::Mqtt, MqttVersion::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_round_trip() {
    round_trip(Transport::Mqtt, MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_round_trip() {
    round_trip(Transport::Http, MqttVersion::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_round_trip() {
    round_trip(Transport::Coap, MqttVersion::V5).await;
}

/// A server with CoAPS (DTLS 1.2 PSK) on a free port.
async fn coaps_server() -> TestServer {
    TestServer::start_with(|c, _| {
        c.coap.dtls = true;
        c.coap.dtls_port = 0;
    })
    .await
}

async fn coaps_device(srv: &TestServer, id: &str, secret: &str) -> Device {
    Device::builder(srv.url(), id, secret)
        .coap(srv.coaps_url())
        .transport(Transport::Coap)
        .config_poll_interval(Duration::from_millis(200))
        .max_batch(7)
        .build()
        .await
        .expect("device builds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coaps_round_trip() {
    let srv = coaps_server().await;
    let id = "rt-coaps";
    let secret = srv.add_device(id).await;
    let mut dev = coaps_device(&srv, id, &secret).await;
    for v in 0..20 {
        dev.send(Record::new().with("v", v)).unwrap();
    }
    dev.flush(FLUSH).await.expect("all acknowledged over DTLS");
    assert_eq!(dev.stats().records_acked, 20);
    assert_eq!(stored_values(&srv, id).await, (0..20).collect::<Vec<_>>());
    assert_eq!(dev.status(), Status::Connected);

    let first = tokio::time::timeout(FLUSH, dev.next_config())
        .await
        .expect("config in time")
        .unwrap();
    assert_eq!(first.version, 0);
    srv.put_config(id, json!({"interval_s": 7})).await;
    let next = tokio::time::timeout(FLUSH, dev.next_config())
        .await
        .expect("new config in time")
        .unwrap();
    assert_eq!(next.get("interval_s"), Some(&json!(7)));
    dev.report_config(next.config.clone()).unwrap();
    dev.flush(FLUSH).await.expect("report acknowledged");
    let view = srv.device_view(id).await;
    assert_eq!(
        view["reported"]["config"],
        json!({"interval_s": 7}),
        "{view}"
    );
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coaps_refuses_a_wrong_secret_and_follows_a_rotation() {
    let srv = coaps_server().await;
    let id = "coaps-rot";
    let old = srv.add_device(id).await;

    // A wrong secret derives a wrong PSK: the handshake fails, nothing is stored.
    let dev = coaps_device(&srv, id, "not-the-secret").await;
    dev.send(Record::new().with("v", 1)).unwrap();
    let refused = eventually(Duration::from_secs(30), || async {
        matches!(dev.status(), Status::Unauthorized(_))
    })
    .await;
    assert!(refused, "{:?}", dev.status());
    assert_eq!(dev.stats().records_acked, 0);
    dev.close().await;

    // After a rotation the old secret's PSK is refused and the new one works.
    let new = srv.rotate_secret(id).await;
    let stale = coaps_device(&srv, id, &old).await;
    stale.send(Record::new().with("v", 2)).unwrap();
    let refused = eventually(Duration::from_secs(30), || async {
        matches!(stale.status(), Status::Unauthorized(_))
    })
    .await;
    assert!(refused, "{:?}", stale.status());
    stale.close().await;
    let fresh = coaps_device(&srv, id, &new).await;
    fresh.send(Record::new().with("v", 3)).unwrap();
    fresh
        .flush(FLUSH)
        .await
        .expect("acknowledged with the new PSK");
    assert_eq!(stored_values(&srv, id).await, vec![3]);
    fresh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coaps_refuses_an_unknown_identity_at_once() {
    let srv = coaps_server().await;
    let dev = coaps_device(&srv, "nobody-here", "whatever").await;
    dev.send(Record::new().with("v", 1)).unwrap();
    // The server's PSK callback fails: a fatal alert, not a timeout.
    let refused = eventually(Duration::from_secs(5), || async {
        matches!(dev.status(), Status::Unauthorized(_))
    })
    .await;
    assert!(refused, "{:?}", dev.status());
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_fail_the_build() {
    let srv = TestServer::start().await;
    srv.add_device("known").await;
    let err = Device::builder(srv.url(), "known", "wrong-secret")
        .transport(Transport::Http)
        .build()
        .await
        .err()
        .expect("refused");
    assert!(err.is_unauthorized(), "{err}");
    let err = Device::builder(srv.url(), "bad id!", "x")
        .build()
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("id"), "{err}");
}

/// Tokens that live 2 s: the HTTP device refreshes them before they run out and keeps
/// sending; a token the server rejects (401) is replaced at once; an MQTT device reconnecting
/// after its token expired gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_on_expiry_and_on_401() {
    let mut srv = TestServer::start_with(|c, _| c.auth.token_ttl_secs = 2).await;
    let secret = srv.add_device("tok-http").await;
    let dev = Device::builder(srv.url(), "tok-http", &secret)
        .transport(Transport::Http)
        // Starts with a token the server never issued: the first request gets 401.
        .access_token("not.a.token", Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let mut tokens = BTreeSet::new();
    for v in 0..25 {
        dev.send(Record::new().with("v", v)).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some((t, _)) = dev.access_token() {
            tokens.insert(t);
        }
    }
    dev.flush(FLUSH).await.unwrap();
    assert_eq!(dev.stats().records_acked, 25);
    assert!(
        tokens.len() >= 3,
        "5 s of 2 s tokens: {} distinct",
        tokens.len()
    );
    assert_eq!(
        stored_values(&srv, "tok-http").await,
        (0..25).collect::<Vec<_>>()
    );
    dev.close().await;

    let secret = srv.add_device("tok-mqtt").await;
    let dev = device(&srv, "tok-mqtt", &secret, Transport::Mqtt).await;
    dev.wait_connected(FLUSH).await.unwrap();
    dev.send(Record::new().with("v", 0)).unwrap();
    dev.flush(FLUSH).await.unwrap();
    // The token it connected with expires while the server is down.
    srv.stop().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    srv.restart().await;
    dev.send(Record::new().with("v", 1)).unwrap();
    dev.flush(FLUSH)
        .await
        .expect("reconnected with a fresh token");
    assert_eq!(stored_values(&srv, "tok-mqtt").await, vec![0, 1]);
    dev.close().await;
}

/// A device sends steadily while the server goes away and comes back: every record is stored
/// once.
async fn survives_a_server_restart(transport: Transport) {
    let mut srv = TestServer::start().await;
    let id = format!("restart-{transport}");
    let secret = srv.add_device(&id).await;
    let dev = device(&srv, &id, &secret, transport).await;
    dev.wait_connected(FLUSH).await.unwrap();
    let mut v = 0i64;
    let mut send_for = |dev: &Device, n: usize| {
        for _ in 0..n {
            dev.send(Record::new().with("v", v)).unwrap();
            v += 1;
        }
    };
    for _ in 0..10 {
        send_for(&dev, 5);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down mid-stream: what was in flight comes back to the buffer.
    let stop = srv.stop();
    send_for(&dev, 5);
    stop.await;
    for _ in 0..10 {
        send_for(&dev, 5);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            !matches!(dev.status(), Status::Connected) || transport != Transport::Mqtt
        })
        .await
    );
    assert!(dev.stats().records_buffered > 0, "{:?}", dev.stats());
    srv.restart().await;
    for _ in 0..10 {
        send_for(&dev, 5);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dev.flush(Duration::from_secs(60))
        .await
        .expect("everything acknowledged after the restart");
    let stats = dev.stats();
    assert_eq!(stats.records_acked, 155, "{stats:?}");
    assert_eq!(stats.records_failed + stats.records_dropped, 0, "{stats:?}");
    if transport == Transport::Mqtt {
        // UDP has no connection, and an HTTP client may just retry.
        assert!(stats.connects >= 2, "{stats:?}");
    }
    assert_eq!(
        stored_values(&srv, &id).await,
        (0..155).collect::<Vec<_>>(),
        "each record stored exactly once"
    );
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_buffers_across_a_server_restart() {
    survives_a_server_restart(Transport::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_buffers_across_a_server_restart() {
    survives_a_server_restart(Transport::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_buffers_across_a_server_restart() {
    survives_a_server_restart(Transport::Coap).await;
}

/// Records taken while the server is down survive a restart of the device itself through the
/// buffer file, and are sent by the next incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_file_survives_a_device_restart() {
    let mut srv = TestServer::start().await;
    let secret = srv.add_device("journal").await;
    let file = srv.dir.path().join("journal.buffer");
    let first = Device::builder(srv.url(), "journal", &secret)
        .mqtt(srv.mqtt_url())
        .buffer_file(&file)
        .build()
        .await
        .unwrap();
    first.send(Record::new().with("v", 0)).unwrap();
    first.flush(FLUSH).await.unwrap();
    srv.stop().await;
    for v in 1..30 {
        first.send(Record::new().with("v", v)).unwrap();
    }
    first.close().await;
    assert!(std::fs::metadata(&file).unwrap().len() > 0);

    srv.restart().await;
    let second = Device::builder(srv.url(), "journal", &secret)
        .mqtt(srv.mqtt_url())
        .buffer_file(&file)
        .build()
        .await
        .unwrap();
    assert_eq!(second.stats().records_buffered, 29);
    second.send(Record::new().with("v", 30)).unwrap();
    second.flush(FLUSH).await.unwrap();
    assert_eq!(
        stored_values(&srv, "journal").await,
        (0..31).collect::<Vec<_>>()
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "compacted");
    second.close().await;
}

/// MQTT over TLS with a CA given to the builder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_private_ca() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key_pem = ck.key_pair.serialize_pem();
    let srv = TestServer::start_with(|c, dir| {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &cert_pem).unwrap();
        std::fs::write(&key, &key_pem).unwrap();
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
    })
    .await;
    let secret = srv.add_device("tls-dev").await;
    let port = srv.mqtts.expect("mqtts listener").port();
    let dev = Device::builder(srv.url(), "tls-dev", &secret)
        .mqtt(format!("mqtts://localhost:{port}"))
        .root_certificate_pem(cert_pem.clone())
        .build()
        .await
        .unwrap();
    dev.send(Record::new().with("v", 7)).unwrap();
    dev.flush(FLUSH).await.expect("sent over TLS");
    assert_eq!(stored_values(&srv, "tls-dev").await, vec![7]);
    dev.close().await;

    // Without the CA the handshake fails and the device stays offline, keeping its record.
    let dev = Device::builder(srv.url(), "tls-dev", &secret)
        .mqtt(format!("mqtts://localhost:{port}"))
        .build()
        .await
        .unwrap();
    dev.send(Record::new().with("v", 8)).unwrap();
    assert!(dev.flush(Duration::from_secs(2)).await.is_err());
    assert!(
        matches!(dev.status(), Status::Offline(_)),
        "{:?}",
        dev.status()
    );
    dev.close().await;
}

/// Firmware assignments reach the handler (the retained assignment is published here by
/// the admin over MQTT: the firmware API is not part of this crate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_assignments_reach_the_handler() {
    let srv = TestServer::start().await;
    let secret = srv.add_device("fw").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let dev = Device::builder(srv.url(), "fw", &secret)
        .mqtt(srv.mqtt_url())
        .firmware_handler(move |_: &str, manifest: &Value| {
            let _ = tx.send(manifest.clone());
        })
        .build()
        .await
        .unwrap();
    dev.wait_connected(FLUSH).await.unwrap();

    let mut o = rumqttc::MqttOptions::new("fw-admin", srv.mqtt.ip().to_string(), srv.mqtt.port());
    o.set_credentials("admin", srv.admin_secret.clone());
    let (admin, mut el) = rumqttc::AsyncClient::new(o, 10);
    admin
        .publish(
            "devices/fw/firmware",
            rumqttc::QoS::AtLeastOnce,
            true,
            br#"{"version":"1.2.3"}"#.to_vec(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(FLUSH, async {
        loop {
            tokio::select! {
                m = rx.recv() => return m,
                e = el.poll() => { e.expect("admin MQTT connection"); }
            }
        }
    })
    .await
    .expect("in time")
    .expect("a manifest");
    assert_eq!(got["version"], "1.2.3");
    dev.close().await;
}
