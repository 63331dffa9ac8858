//! Tests of the CoAP listener over real UDP sockets on loopback, and of the multicast rules on
//! the driver itself (no multicast traffic leaves the test).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_coap::{decode, encode, Code, ContentFormat, Message, MessageType, Token};
use tokio::net::UdpSocket;

use super::*;

use crate::{Config, Server};

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    token: String,
}

async fn start(config: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.server.data_dir = dir.path().to_path_buf();
    c.mqtt.port = 0;
    c.http.port = 0;
    c.coap.port = 0;
    config(&mut c);
    let server = Server::start(c).await.unwrap();
    let store = server.broker.persistence().unwrap().store().clone();
    let reg = crate::api::devices::register(
        &store,
        server.auth.psk_sealer(),
        "admin",
        "dev-1",
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    server
        .auth
        .register_device("dev-1", &reg.device.secret_hash, reg.coap_psk);
    let token = server
        .auth
        .issue(&server.auth.principal("dev-1").unwrap(), None)
        .unwrap()
        .access_token;
    Fixture {
        _dir: dir,
        server,
        token,
    }
}

/// `token=…` items longer than a Uri-Query option may be, split into several.
fn split_tokens(query: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for q in query {
        match q.strip_prefix("token=") {
            Some(t) => {
                for chunk in t.as_bytes().chunks(200) {
                    out.push(format!("token={}", String::from_utf8_lossy(chunk)));
                }
            }
            None => out.push((*q).to_string()),
        }
    }
    out
}

struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    mid: u16,
}

impl Client {
    async fn new(server: SocketAddr) -> Client {
        Client {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            mid: 100,
        }
    }

    fn request(&mut self, code: Code, path: &str, query: &[&str]) -> Message {
        let query = split_tokens(query);
        self.mid += 1;
        let mut m = Message::request(
            MessageType::Confirmable,
            code,
            self.mid,
            Token::from_u64(u64::from(self.mid), 4),
            path,
        );
        for q in query {
            m.options.add_uri_query(&q);
        }
        m
    }

    async fn send_raw(&self, data: &[u8]) {
        self.socket.send_to(data, self.server).await.unwrap();
    }

    async fn recv(&self) -> Message {
        let mut buf = vec![0u8; 65_535];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), self.socket.recv_from(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        decode(&buf[..n]).unwrap()
    }

    async fn exchange(&self, m: &Message) -> Message {
        self.send_raw(&encode(m).unwrap()).await;
        self.recv().await
    }
}

#[tokio::test]
async fn discovery_errors_telemetry_and_deduplication() {
    let f = start(|_| {}).await;
    let mut c = Client::new(f.server.coap_addr).await;
    let token = format!("token={}", f.token);

    let m = c.request(Code::GET, "/.well-known/core", &[]);
    let r = c.exchange(&m).await;
    assert_eq!(r.code, Code::CONTENT);
    // The amplification guard splits the document for this unverified client.
    assert!(r.options.block2().unwrap().is_some_and(|b| b.more));
    let m = c.request(Code::GET, "/.well-known/core", &["rt=stratus.config"]);
    let r = c.exchange(&m).await;
    assert_eq!(
        r.options.content_format().unwrap(),
        Some(ContentFormat::LINK_FORMAT)
    );
    assert!(String::from_utf8_lossy(&r.payload).starts_with("</config>;rt=\"stratus.config\""));

    let m = c.request(Code::GET, "/nope", &[&token]);
    assert_eq!(c.exchange(&m).await.code, Code::NOT_FOUND);
    let m = c.request(Code::GET, "/telemetry", &[&token]);
    assert_eq!(c.exchange(&m).await.code, Code::METHOD_NOT_ALLOWED);
    let m = c
        .request(Code::POST, "/telemetry", &[])
        .with_payload(&b"{\"t\":1}"[..]);
    assert_eq!(c.exchange(&m).await.code, Code::UNAUTHORIZED);
    let m = c
        .request(Code::POST, "/telemetry", &["token=forged.token.value"])
        .with_payload(&b"{\"t\":1}"[..]);
    assert_eq!(c.exchange(&m).await.code, Code::UNAUTHORIZED);

    let m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(&b"{\"t\":\"x\",\"bad\":[1]}"[..]);
    let r = c.exchange(&m).await;
    assert_eq!(r.code, Code::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.payload).contains("bad"), "{r:?}");

    // Hostile datagrams in between change nothing.
    for junk in [
        &b""[..],
        &[0xff][..],
        &[0x80, 0x01, 0x00, 0x01][..],
        &[0x40, 0x01][..],
        &[0x4f, 0x01, 0x00, 0x01, 1, 2, 3][..],
    ] {
        c.send_raw(junk).await;
    }
    // A CON with a format error gets a RST (§4.2).
    let rst = c.recv().await;
    assert_eq!(rst.message_type, MessageType::Reset);

    let metrics = &f.server.broker.metrics;
    let before = metrics.telemetry_records.get();
    let m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(&b"{\"temperature\":20.5}"[..]);
    let data = encode(&m).unwrap();
    c.send_raw(&data).await;
    let first = c.recv().await;
    assert_eq!(first.code, Code::CHANGED);
    assert_eq!(first.message_id, m.message_id);
    // The same CON again (a retransmission): the same answer, stored once.
    c.send_raw(&data).await;
    let again = c.recv().await;
    assert_eq!(again, first);
    assert_eq!(metrics.telemetry_records.get(), before + 1);
    assert!(metrics.coap_duplicates.get() >= 1);
    assert!(metrics.coap_bad_datagrams.get() >= 4);

    // CBOR by Content-Format; an unknown format is refused.
    let mut m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(vec![0xa1, 0x61, 0x76, 0x01]);
    m.options.set_content_format(ContentFormat::CBOR);
    assert_eq!(c.exchange(&m).await.code, Code::CHANGED);
    let mut m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(&b"x"[..]);
    m.options.set_content_format(ContentFormat::XML);
    assert_eq!(c.exchange(&m).await.code, Code::UNSUPPORTED_CONTENT_FORMAT);

    // A replayed nonce is 4.09.
    let now = crate::persist::now_ms();
    let body = format!("{{\"sent\":{now},\"nonce\":\"n-1\",\"v\":1}}");
    let m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(body.clone().into_bytes());
    assert_eq!(c.exchange(&m).await.code, Code::CHANGED);
    let m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(body.into_bytes());
    assert_eq!(c.exchange(&m).await.code, Code::CONFLICT);

    // Reported config.
    let m = c
        .request(Code::PUT, "/config/reported", &[&token])
        .with_payload(&b"{\"interval\":5}"[..]);
    assert_eq!(c.exchange(&m).await.code, Code::CHANGED);
    let m = c
        .request(Code::PUT, "/config/reported", &[&token])
        .with_payload(&b"[1]"[..]);
    assert_eq!(c.exchange(&m).await.code, Code::BAD_REQUEST);
    let store = f.server.broker.persistence().unwrap().store().clone();
    let dev = store.device("dev-1").await.unwrap().unwrap();
    assert_eq!(
        dev.reported.unwrap().value,
        serde_json::json!({"interval": 5})
    );

    // Firmware: none yet.
    let m = c.request(Code::GET, "/firmware/fw-1", &[&token]);
    assert_eq!(c.exchange(&m).await.code, Code::NOT_FOUND);
    f.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn application_tokens_are_forbidden() {
    let f = start(|_| {}).await;
    let mut c = Client::new(f.server.coap_addr).await;
    let app = f
        .server
        .auth
        .issue(&f.server.auth.principal("admin").unwrap(), None)
        .unwrap()
        .access_token;
    let q = format!("token={app}");
    // The second time, from the listener's memory of verified tokens.
    for _ in 0..2 {
        let m = c.request(Code::GET, "/config", &[&q]);
        assert_eq!(c.exchange(&m).await.code, Code::FORBIDDEN);
    }
    f.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn remembered_tokens_are_checked_again_on_every_request() {
    let f = start(|_| {}).await;
    let mut c = Client::new(f.server.coap_addr).await;
    let token = format!("token={}", f.token);
    // Expiry is checked on remembered claims as well.
    let (_, mut claims) = f.server.auth.verify_token(&f.token).unwrap();
    assert!(f.server.auth.check_claims(&claims).is_ok());
    claims.exp = crate::auth::now_secs() - 1;
    assert!(matches!(
        f.server.auth.check_claims(&claims),
        Err(crate::auth::AuthError::InvalidToken(why)) if why.contains("expired")
    ));
    for _ in 0..2 {
        let m = c
            .request(Code::POST, "/telemetry", &[&token])
            .with_payload(&b"{\"v\":1}"[..]);
        assert_eq!(c.exchange(&m).await.code, Code::CHANGED);
    }
    let device = f.server.auth.principal("dev-1").unwrap();
    f.server.auth.revoke(&f.token, &device).await.unwrap();
    let m = c
        .request(Code::POST, "/telemetry", &[&token])
        .with_payload(&b"{\"v\":1}"[..]);
    let r = c.exchange(&m).await;
    assert_eq!(r.code, Code::UNAUTHORIZED);
    assert!(
        String::from_utf8_lossy(&r.payload).contains("revoked"),
        "{r:?}"
    );

    // A second token of the device, remembered, then the device is gone.
    let other = f.server.auth.issue(&device, None).unwrap().access_token;
    let q = format!("token={other}");
    let m = c.request(Code::GET, "/firmware", &[&q]);
    assert_eq!(c.exchange(&m).await.code, Code::CONTENT);
    f.server.auth.forget("dev-1");
    let m = c.request(Code::GET, "/firmware", &[&q]);
    assert_eq!(c.exchange(&m).await.code, Code::UNAUTHORIZED);

    f.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn observers_of_config_get_every_change() {
    let f = start(|_| {}).await;
    let mut c = Client::new(f.server.coap_addr).await;
    let token = format!("token={}", f.token);
    let mut m = c.request(Code::GET, "/config", &[&token]);
    m.options.set_observe(0);
    let r = c.exchange(&m).await;
    assert_eq!(r.code, Code::CONTENT);
    assert!(r.options.observe().unwrap().is_some());
    assert_eq!(r.options.etag(), Some(&[0u8][..]));
    let doc: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(doc["version"], 0);

    let store = f.server.broker.persistence().unwrap().store().clone();
    crate::api::devices::config::put_desired(
        &store,
        "admin",
        "dev-1",
        serde_json::json!({"interval": 7}),
        None,
    )
    .await
    .unwrap();
    crate::api::devices::config::republish(&f.server.broker, &store, "dev-1").await;
    let n = c.recv().await;
    assert_eq!(n.code, Code::CONTENT);
    assert_eq!(n.token, m.token);
    assert!(n.options.observe().unwrap().is_some());
    assert_eq!(n.options.etag(), Some(&[1u8][..]));
    let doc: serde_json::Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(doc["config"]["interval"], 7);
    assert_eq!(f.server.broker.metrics.coap_observers.get(), 1);

    // A GET with the current ETag is 2.03 Valid.
    let mut m = c.request(Code::GET, "/config", &[&token]);
    m.options.set_etag(&[1]);
    assert_eq!(c.exchange(&m).await.code, Code::VALID);
    f.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn block1_uploads_are_ingested_and_bounded() {
    let f = start(|c| c.coap.max_body_bytes = 4096).await;
    let mut c = Client::new(f.server.coap_addr).await;
    let token = format!("token={}", f.token);
    let records: Vec<String> = (0..60)
        .map(|i| format!("{{\"ts\":{},\"v\":{i}}}", 1_000 + i))
        .collect();
    let body = format!("[{}]", records.join(","));
    assert!(body.len() > 1024 && body.len() < 4096);
    let before = f.server.broker.metrics.telemetry_records.get();
    let chunks: Vec<&[u8]> = body.as_bytes().chunks(256).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let more = i + 1 < chunks.len();
        let mut m = c
            .request(Code::POST, "/upload", &[&token])
            .with_payload(chunk.to_vec());
        m.options
            .set_block1(stratus_coap::BlockOption::new(i as u32, more, 4).unwrap());
        let r = c.exchange(&m).await;
        if more {
            assert_eq!(r.code, Code::CONTINUE, "block {i}");
        } else {
            assert_eq!(r.code, Code::CREATED);
        }
    }
    assert_eq!(f.server.broker.metrics.telemetry_records.get(), before + 60);

    // Announced too large: 4.13 with Size1.
    let mut m = c
        .request(Code::PUT, "/upload", &[&token])
        .with_payload(vec![b' '; 256]);
    m.options
        .set_block1(stratus_coap::BlockOption::new(0, true, 4).unwrap());
    m.options.set_size1(100_000);
    let r = c.exchange(&m).await;
    assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(r.options.size1().unwrap(), Some(4096));
    f.server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn multicast_answers_only_discovery_and_never_errors() {
    let f = start(|_| {}).await;
    let store = f.server.broker.persistence().unwrap().store().clone();
    let cfg = CoapConfig {
        multicast_leisure_ms: 0,
        ..CoapConfig::default()
    };
    let ctx = Arc::new(CoapContext {
        auth: f.server.auth.clone(),
        failures: f.server.failures.clone(),
        pipeline: Arc::new(crate::pipeline::Pipeline::new(
            store.clone(),
            f.server.broker.clone(),
            Default::default(),
        )),
        store,
        broker: f.server.broker.clone(),
        config: cfg,
        firmware: f.server.firmware.clone(),
    });
    let ep = Endpoint::new(endpoint_config(&ctx.config, &Mode::Multicast), 1).unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut d = Driver::new(ctx, ep, Mode::Multicast, tx);
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let now = Instant::now();
    let get = |mid: u16, path: &str, q: &[&str]| {
        let mut m = Message::request(
            MessageType::NonConfirmable,
            Code::GET,
            mid,
            Token::from_u64(7, 2),
            path,
        );
        for x in q {
            m.options.add_uri_query(x);
        }
        encode(&m).unwrap()
    };
    d.on_datagram(now, peer, &get(1, "/.well-known/core", &[]));
    d.on_timers(now + Duration::from_millis(1));
    d.pump(now);
    assert_eq!(d.outgoing.len(), 1);
    let r = decode(&d.outgoing[0].1).unwrap();
    assert_eq!(r.code, Code::CONTENT);
    d.outgoing.clear();
    for data in [
        get(2, "/telemetry", &[]).to_vec(),
        get(3, "/.well-known/core", &["rt=nothing-matches"]).to_vec(),
        // A CON with a format error would get a RST on unicast.
        vec![0x40, 0x01, 0x00],
        vec![0x80],
    ] {
        d.on_datagram(now, peer, &data);
    }
    d.on_timers(now + Duration::from_millis(1));
    d.pump(now);
    assert!(d.outgoing.is_empty(), "{:?}", d.outgoing);
    f.server.shutdown(Duration::from_secs(5)).await;
}

#[test]
fn multicast_is_joined_on_the_interface_of_the_bind_address() {
    use MulticastJoin::{V4, V6};
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // A LAN address: the membership names that address, so the kernel joins on its interface.
    assert_eq!(
        multicast_joins(ip("192.168.1.10")).unwrap(),
        [V4(v4("192.168.1.10"))]
    );
    // Loopback: loopback only, and no IPv6 group for an IPv4 bind.
    assert_eq!(
        multicast_joins(ip("127.0.0.1")).unwrap(),
        [V4(Ipv4Addr::LOCALHOST)]
    );
    assert_eq!(
        multicast_joins(ip("::ffff:10.0.0.7")).unwrap(),
        [V4(v4("10.0.0.7"))]
    );
    // The wildcard: the kernel's default interface, both families.
    assert_eq!(
        multicast_joins(ip("0.0.0.0")).unwrap(),
        [V4(Ipv4Addr::UNSPECIFIED), V6(0)]
    );
    assert_eq!(
        multicast_joins(ip("::")).unwrap(),
        [V4(Ipv4Addr::UNSPECIFIED), V6(0)]
    );
    // An IPv6 address: the index of the interface that has it.
    let table = "fe80000000000000021122fffe334455 02 40 20 80     eth0\n\
                 00000000000000000000000000000001 01 80 10 80       lo\n\
                 fd000000000000000000000000000002 0a 40 00 82     wlan0\n";
    assert_eq!(interface_of_v6(table, "::1".parse().unwrap()), Some(1));
    assert_eq!(interface_of_v6(table, "fd00::2".parse().unwrap()), Some(10));
    assert_eq!(interface_of_v6(table, "fd00::3".parse().unwrap()), None);
    assert_eq!(interface_of_v6("garbage\n\n", "::1".parse().unwrap()), None);
}

/// The interfaces `/proc/net/igmp` lists the group 224.0.1.187 on (`None` without the file).
fn interfaces_with_coap_group() -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/net/igmp").ok()?;
    // Groups are in hex of the address as stored (little-endian on the hosts we run on).
    let group = format!("{:08X}", u32::from_ne_bytes(MULTICAST_V4.octets()));
    let mut out = Vec::new();
    let mut device = String::new();
    for line in text.lines().skip(1) {
        if !line.starts_with('\t') {
            device = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .trim_end_matches(':')
                .to_string();
        } else if line.split_whitespace().next() == Some(group.as_str()) {
            out.push(device.clone());
        }
    }
    Some(out)
}

#[tokio::test]
async fn a_loopback_bind_joins_the_group_on_loopback_and_nowhere_else() {
    let Some(before) = interfaces_with_coap_group() else {
        return; // not Linux
    };
    let sockets = bind_multicast(IpAddr::V4(Ipv4Addr::LOCALHOST), 0).unwrap();
    assert_eq!(sockets.len(), 1, "an IPv4 bind joins no IPv6 group");
    assert_eq!(
        sockets[0].local_addr().unwrap().ip(),
        IpAddr::V4(MULTICAST_V4)
    );
    let after = interfaces_with_coap_group().unwrap();
    assert!(after.iter().any(|d| d == "lo"), "{after:?}");
    let new: Vec<_> = after.iter().filter(|d| !before.contains(d)).collect();
    assert!(new.iter().all(|d| *d == "lo"), "joined on {new:?}");
    drop(sockets);
}
