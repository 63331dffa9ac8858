//! Over-the-air updates end to end against a real server: one device learns of a campaign
//! over MQTT and downloads 1 MiB over CoAP Block2, another polls over HTTP and downloads
//! through a proxy that cuts the connection halfway, resuming with Range; both verify and
//! report `installed`, and the campaign counts 2. The SDK refuses an image altered in
//! transit, firmware for other hardware and a downgrade, and reports why. An updater tied to
//! an MQTT device reports on `devices/{id}/firmware/status` over that connection (seen by an
//! admin subscriber), and over HTTP once the device is closed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, TestServer};
use parking_lot::Mutex;
use serde_json::{json, Value};
use stratus_device::firmware::{FirmwareTransport, FirmwareUpdater, VerifyError};
use stratus_device::{Device, Transport};
use stratus_firmware::{ImageDigest, SigningKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;
const HARDWARE: &str = "board-e2e";

fn image(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(u32::from(seed)) as u8
        })
        .collect()
}

/// What the proxy does to the server's answer on its first connection.
#[derive(Clone, Copy)]
enum Mischief {
    /// Close both sides after this many bytes of the answer.
    CutAfter(usize),
    /// Flip one bit of the answer's byte at this offset.
    FlipAt(usize),
}

/// A TCP proxy in front of the HTTP listener, misbehaving on its first connection; it keeps
/// the request heads it forwarded.
struct Proxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

async fn proxy(upstream: SocketAddr, mischief: Mischief) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (h, c) = (heads.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let first = c.fetch_add(1, Ordering::SeqCst) == 0;
            let heads = h.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Ok(text) = std::str::from_utf8(&buf[..n]) {
                            if text.starts_with("GET ") || text.starts_with("POST ") {
                                heads.lock().push(text.to_string());
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0u8; 16 * 1024];
                let mut sent = 0usize;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    if first {
                        match mischief {
                            Mischief::CutAfter(limit) if sent + n >= limit => {
                                let _ = cw.write_all(&chunk[..limit - sent]).await;
                                break;
                            }
                            Mischief::FlipAt(at) if (sent..sent + n).contains(&at) => {
                                chunk[at - sent] ^= 0x10;
                            }
                            _ => {}
                        }
                    }
                    if cw.write_all(chunk).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                up.abort();
            });
        }
    });
    Proxy {
        addr,
        heads,
        connections,
    }
}

struct Fixture {
    srv: TestServer,
    key: SigningKey,
    http: reqwest::Client,
    admin: String,
}

impl Fixture {
    async fn start() -> Fixture {
        let key = SigningKey::from_bytes(&[42; 32]);
        let public = stratus_firmware::public_key_pem(&key.verifying_key()).unwrap();
        let srv = TestServer::start_with(|config, dir| {
            let path = dir.join("firmware.pub");
            std::fs::write(&path, &public).unwrap();
            config.firmware.pubkeys = vec![path];
        })
        .await;
        let admin = srv.admin().await;
        Fixture {
            srv,
            key,
            http: reqwest::Client::new(),
            admin,
        }
    }

    /// Signs and uploads an image (multipart, manifest first); the firmware id.
    async fn upload(&self, bytes: &[u8], version: &str) -> String {
        let manifest = stratus_firmware::sign(
            &self.key,
            &ImageDigest::of_bytes(bytes),
            version,
            Some(HARDWARE),
        )
        .unwrap();
        let boundary = "e2e-boundary-7c1f";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i\"\r\n\r\n",
            manifest.to_json_pretty()
        )
        .into_bytes();
        body.extend_from_slice(bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let r = self
            .http
            .post(format!("{}/api/v1/firmware", self.srv.url()))
            .bearer_auth(&self.admin)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn admin_json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.srv.url()))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    fn updater(&self, id: &str, secret: &str, hardware: &str) -> FirmwareUpdater {
        FirmwareUpdater::builder(self.srv.url(), id, secret)
            .trusted_key(self.key.verifying_key())
            .hardware(hardware)
            .installed_version("1.0.0")
            .download_dir(self.srv.dir.path())
            .build()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_update_over_mqtt_coap_and_resumed_http() {
    let f = Fixture::start().await;
    let data = image(MIB, 3);
    let fid = f.upload(&data, "2.0.0").await;
    let secret_a = f.srv.add_device("ota-a").await;
    let secret_b = f.srv.add_device("ota-b").await;

    // Device A runs the SDK over MQTT; its updater applies each notice it gets there,
    // downloading over CoAP Block2.
    let updater_a = Arc::new(f.updater("ota-a", &secret_a, HARDWARE));
    let installed = Arc::new(Mutex::new(Vec::new()));
    let sink = installed.clone();
    let dev_a = Device::builder(f.srv.url(), "ota-a", &secret_a)
        .mqtt(f.srv.mqtt_url())
        .transport(Transport::Mqtt)
        .firmware_handler(updater_a.clone().handler(
            FirmwareTransport::Coap(f.srv.coap),
            move |path, m| {
                if m.version != "2.0.0" {
                    return Err(format!("unexpected version {}", m.version));
                }
                sink.lock()
                    .push(std::fs::read(path).map_err(|e| e.to_string())?);
                Ok(())
            },
        ))
        .build()
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let campaign = f
        .admin_json(
            reqwest::Method::POST,
            "/api/v1/campaigns",
            Some(json!({"id": "e2e", "firmware": fid, "devices": ["ota-a", "ota-b"]})),
        )
        .await;
    assert_eq!(campaign["counts"]["assigned"], 2);

    // A: the notice over MQTT, the image over CoAP Block2, installed without help.
    let a_installed = eventually(Duration::from_secs(30), || async {
        updater_a.installed_version().map(|v| v.to_string()) == Some("2.0.0".into())
    })
    .await;
    assert!(a_installed, "A installed 2.0.0 from its MQTT notice");
    eprintln!(
        "A: MQTT notice + 1 MiB over CoAP Block2 (1024-byte blocks) + verify + install: {:?}",
        started.elapsed()
    );
    assert!(
        installed.lock()[0] == data,
        "the installed image is the uploaded one"
    );
    let notice = updater_a.poll_notice().await.unwrap().expect("assigned");
    assert_eq!(
        (notice.firmware.as_str(), notice.campaign.as_deref()),
        (fid.as_str(), Some("e2e"))
    );

    // B: polls over HTTP; the first download connection is cut after 300 KB.
    let updater_b = f.updater("ota-b", &secret_b, HARDWARE);
    let mut notice_b = updater_b.poll_notice().await.unwrap().expect("assigned");
    assert_eq!(notice_b.firmware, fid);
    let cut = proxy(f.srv.http, Mischief::CutAfter(300_000)).await;
    notice_b.url = format!("http://{}/api/v1/firmware/{fid}", cut.addr);
    let sink = installed.clone();
    updater_b
        .apply(&notice_b, FirmwareTransport::Http, |path, _| {
            sink.lock()
                .push(std::fs::read(path).map_err(|e| e.to_string())?);
            Ok(())
        })
        .await
        .expect("B installs over HTTP after a resume");
    assert!(installed.lock()[1] == data);
    assert!(
        cut.connections.load(Ordering::SeqCst) >= 2,
        "it reconnected"
    );
    let heads = cut.heads.lock().clone();
    let resumed = heads
        .iter()
        .skip(1)
        .find(|h| h.to_ascii_lowercase().contains("range: bytes="))
        .expect("a Range request after the cut");
    let from: usize = resumed
        .to_ascii_lowercase()
        .split("range: bytes=")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(from > 100_000 && from < 300_000, "resumed at {from}");

    let c = f
        .admin_json(reqwest::Method::GET, "/api/v1/campaigns/e2e", None)
        .await;
    assert_eq!(c["counts"]["installed"], 2, "{c}");
    for d in c["devices"].as_array().unwrap() {
        let states: Vec<&str> = d["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["assigned", "downloading", "verified", "installed"]);
    }
    let shown = f.srv.device_view("ota-a").await;
    assert_eq!(shown["firmware"]["installed_version"], "2.0.0");

    // The same notice again (as after a reconnect) is a no-op: nothing downloaded or reported.
    let v = updater_a
        .apply(&notice, FirmwareTransport::Coap(f.srv.coap), |_, _| {
            panic!("must not install twice")
        })
        .await
        .expect("already installed");
    assert_eq!(v.to_string(), "2.0.0");
    let c = f
        .admin_json(reqwest::Method::GET, "/api/v1/campaigns/e2e", None)
        .await;
    assert_eq!(c["counts"]["installed"], 2, "{c}");
    assert_eq!(installed.lock().len(), 2);
    dev_a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_refuses_tampered_foreign_and_older_firmware() {
    let f = Fixture::start().await;
    let data = image(200_000, 5);
    let fid = f.upload(&data, "3.0.0").await;
    let secret = f.srv.add_device("ota-c").await;
    f.admin_json(
        reqwest::Method::POST,
        "/api/v1/devices/ota-c/firmware",
        Some(json!({"firmware": fid})),
    )
    .await;

    // Foreign hardware: refused without downloading, reported failed.
    let foreign = f.updater("ota-c", &secret, "board-other");
    let mut notice = foreign.poll_notice().await.unwrap().unwrap();
    let watch = proxy(f.srv.http, Mischief::CutAfter(usize::MAX)).await;
    notice.url = format!("http://{}/api/v1/firmware/{fid}", watch.addr);
    let err = foreign
        .apply(&notice, FirmwareTransport::Http, |_, _| {
            panic!("no install")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.verify_error(), Some(VerifyError::WrongHardware { .. })),
        "{err}"
    );
    assert_eq!(
        watch.connections.load(Ordering::SeqCst),
        0,
        "nothing downloaded"
    );
    let view = f.srv.device_view("ota-c").await;
    assert_eq!(view["firmware"]["state"], "failed");
    assert!(view["firmware"]["reason"]
        .as_str()
        .unwrap()
        .contains("wrong hardware"));

    // Older than installed: refused.
    let newer_installed = FirmwareUpdater::builder(f.srv.url(), "ota-c", &secret)
        .trusted_key(f.key.verifying_key())
        .installed_version("3.0.1")
        .build()
        .unwrap();
    let err = newer_installed
        .apply(&notice, FirmwareTransport::Http, |_, _| {
            panic!("no install")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.verify_error(), Some(VerifyError::Downgrade { .. })),
        "{err}"
    );

    // An untrusted signer: refused.
    let other = FirmwareUpdater::builder(f.srv.url(), "ota-c", &secret)
        .trusted_key(SigningKey::from_bytes(&[9; 32]).verifying_key())
        .build()
        .unwrap();
    let err = other
        .apply(&notice, FirmwareTransport::Http, |_, _| {
            panic!("no install")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.verify_error(), Some(VerifyError::UnknownKey(_))),
        "{err}"
    );

    // A byte flipped in transit: downloaded, refused by the hash, reported failed.
    let flip = proxy(f.srv.http, Mischief::FlipAt(150_000)).await;
    notice.url = format!("http://{}/api/v1/firmware/{fid}", flip.addr);
    let honest = f.updater("ota-c", &secret, HARDWARE);
    let err = honest
        .apply(&notice, FirmwareTransport::Http, |_, _| {
            panic!("no install")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.verify_error(), Some(VerifyError::HashMismatch { .. })),
        "{err}"
    );
    let ok = eventually(Duration::from_secs(5), || async {
        let v = f.srv.device_view("ota-c").await;
        v["firmware"]["state"] == "failed"
            && v["firmware"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("hash mismatch"))
    })
    .await;
    assert!(ok, "the hash mismatch is reported");
    assert!(
        !f.srv.dir.path().join(format!("{fid}.part")).exists(),
        "the tampered download is removed"
    );

    // And the honest download then succeeds (the proxy misbehaves only once).
    honest
        .apply(&notice, FirmwareTransport::Http, |path, _| {
            assert_eq!(std::fs::read(path).unwrap(), data);
            Ok(())
        })
        .await
        .expect("installs");
    let v = f.srv.device_view("ota-c").await;
    assert_eq!(v["firmware"]["state"], "installed");
}

/// What an admin subscriber sees on `topic`: the payloads, in order.
async fn watch(
    srv: &TestServer,
    topic: &str,
) -> (Arc<Mutex<Vec<Value>>>, tokio::task::JoinHandle<()>) {
    let mut o = rumqttc::MqttOptions::new("fw-watch", srv.mqtt.ip().to_string(), srv.mqtt.port());
    o.set_credentials("admin", srv.admin_secret.clone());
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    client
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(e) = el.poll().await {
            match e {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        out.lock().push(v);
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK in time")
        .expect("subscribed");
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updater_tied_to_an_mqtt_device_reports_over_mqtt() {
    let f = Fixture::start().await;
    let data = image(100_000, 7);
    let fid = f.upload(&data, "2.0.0").await;
    let secret = f.srv.add_device("ota-m").await;
    let (seen, watcher) = watch(&f.srv, "devices/ota-m/firmware/status").await;

    let updater = f.updater("ota-m", &secret, HARDWARE);
    let dev = Device::builder(f.srv.url(), "ota-m", &secret)
        .mqtt(f.srv.mqtt_url())
        .transport(Transport::Mqtt)
        .build()
        .await
        .unwrap();
    dev.wait_connected(Duration::from_secs(10)).await.unwrap();
    assert!(
        updater.report_over(&dev),
        "an MQTT device carries the reports"
    );

    f.admin_json(
        reqwest::Method::POST,
        "/api/v1/devices/ota-m/firmware",
        Some(json!({"firmware": fid})),
    )
    .await;
    let notice = updater.poll_notice().await.unwrap().expect("assigned");
    updater
        .apply(&notice, FirmwareTransport::Http, |_, _| Ok(()))
        .await
        .expect("installed");

    // Every report went over MQTT (routed to the admin subscriber), and only once each.
    let all_seen = eventually(Duration::from_secs(10), || async { seen.lock().len() >= 3 }).await;
    assert!(all_seen, "seen over MQTT: {:?}", seen.lock());
    let states: Vec<String> = seen
        .lock()
        .iter()
        .map(|v| {
            assert_eq!(v["firmware"], fid.as_str());
            v["status"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(states, ["downloading", "verified", "installed"]);
    let history = |v: &Value| -> Vec<String> {
        v["devices"][0]["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"].as_str().unwrap().to_string())
            .collect()
    };
    let campaign = notice.campaign.clone().expect("a campaign");
    let c = f
        .admin_json(
            reqwest::Method::GET,
            &format!("/api/v1/campaigns/{campaign}"),
            None,
        )
        .await;
    assert_eq!(
        history(&c),
        ["assigned", "downloading", "verified", "installed"],
        "{c}"
    );

    // With the device closed, a report goes over HTTP instead (not seen on the topic).
    dev.close().await;
    updater
        .report(FirmwareTransport::Http, &fid, "failed", Some("rolled back"))
        .await
        .expect("reported over HTTP");
    let c = f
        .admin_json(
            reqwest::Method::GET,
            &format!("/api/v1/campaigns/{campaign}"),
            None,
        )
        .await;
    assert_eq!(
        history(&c).last().map(String::as_str),
        Some("failed"),
        "{c}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.lock().len(),
        3,
        "the HTTP report is not an MQTT message"
    );

    // A device on HTTP does not carry reports.
    let http_dev = Device::builder(f.srv.url(), "ota-m", &secret)
        .transport(Transport::Http)
        .build()
        .await
        .unwrap();
    assert!(!f.updater("ota-m", &secret, HARDWARE).report_over(&http_dev));
    http_dev.close().await;
    watcher.abort();
}
