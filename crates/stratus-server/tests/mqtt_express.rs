//! The express lane: a QoS 0 message published one at a time to an idle subscriber is written
//! to the subscriber's socket by the publisher's task. What arrives must be exactly what the
//! subscriber's own task would have written: every message, whole, in order — also when the
//! subscriber stops reading, its socket fills, and a write through the lane goes in part.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use stratus_mqtt::*;
use stratus_server::{Config, Overrides, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const V: ProtocolVersion = ProtocolVersion::V311;

async fn connect(addr: std::net::SocketAddr, id: &str) -> (TcpStream, BytesMut) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut b = BytesMut::new();
    encode(
        &Packet::Connect(Connect {
            protocol: V,
            clean_session: true,
            keep_alive: 60,
            client_id: MqttStr::try_from(id.to_string()).unwrap(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        }),
        V,
        &mut b,
    )
    .unwrap();
    stream.write_all(&b).await.unwrap();
    let mut inbox = BytesMut::new();
    match next(&mut stream, &mut inbox).await {
        Some(Packet::ConnAck(_)) => {}
        other => panic!("expected CONNACK, got {other:?}"),
    }
    (stream, inbox)
}

async fn next(stream: &mut TcpStream, inbox: &mut BytesMut) -> Option<Packet> {
    timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = decode(inbox, usize::MAX, V).unwrap() {
                return Some(p);
            }
            if stream.read_buf(inbox).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    })
    .await
    .expect("no packet and no close within 10 s")
}

fn publish(topic: &str, payload: Bytes) -> BytesMut {
    let mut b = BytesMut::new();
    encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: MqttStr::try_from(topic.to_string()).unwrap(),
            packet_id: None,
            payload,
            properties: PublishProperties::default(),
        }),
        V,
        &mut b,
    )
    .unwrap();
    b
}

/// A payload of `len` bytes that names its sequence number in every byte it can.
fn payload(seq: u32, len: usize) -> Bytes {
    let tag = seq.to_be_bytes();
    Bytes::from(
        (0..len)
            .map(|i| tag[i % 4] ^ (i as u8))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_one_at_a_time_take_the_lane_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        mqtt_port: Some(0),
        http_port: Some(0),
        coap_port: Some(0),
        allow_anonymous: true,
        ..Default::default()
    };
    let server = Server::start(Config::load(None, &overrides).unwrap())
        .await
        .unwrap();
    let addr = server.mqtt_addr;
    let express = || server.broker.metrics.mqtt_express_deliveries.get();

    let (mut sub, mut inbox) = connect(addr, "sub").await;
    let mut b = BytesMut::new();
    encode(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                MqttStr::try_from("x/#".to_string()).unwrap(),
                SubscriptionOptions::new(QoS::AtMostOnce),
            )],
            properties: SubscribeProperties::default(),
        }),
        V,
        &mut b,
    )
    .unwrap();
    sub.write_all(&b).await.unwrap();
    assert!(matches!(
        next(&mut sub, &mut inbox).await,
        Some(Packet::SubAck(_))
    ));
    let (mut publisher, _) = connect(addr, "pub").await;

    // Small messages, one per write, read as they come: they take the lane.
    let before = express();
    for seq in 0..200u32 {
        publisher
            .write_all(&publish("x/small", payload(seq, 32)))
            .await
            .unwrap();
        match next(&mut sub, &mut inbox).await {
            Some(Packet::Publish(p)) => assert_eq!(p.payload, payload(seq, 32)),
            other => panic!("expected message {seq}, got {other:?}"),
        }
    }
    let through_lane = express() - before;
    assert!(
        through_lane >= 100,
        "only {through_lane} of 200 messages sent one at a time took the express lane"
    );

    // Now the subscriber stops reading while 64 KiB messages come one at a time: its socket
    // fills, a lane write goes in part, the rest must follow before anything else.
    let big = 64 * 1024;
    let count = 200u32;
    let before = express();
    for seq in 0..count {
        publisher
            .write_all(&publish("x/big", payload(seq, big)))
            .await
            .unwrap();
        // One PUBLISH per read on the broker's side.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(express() > before, "no big message took the lane");
    let mut seen = 0u32;
    while seen < count {
        match next(&mut sub, &mut inbox).await {
            Some(Packet::Publish(p)) => {
                assert_eq!(&p.topic[..], "x/big");
                // QoS 0 may be dropped under pressure, but never reordered or corrupted.
                let tag = u32::from_be_bytes([
                    p.payload[0],
                    p.payload[1] ^ 1,
                    p.payload[2] ^ 2,
                    p.payload[3] ^ 3,
                ]);
                assert!(tag >= seen, "message {tag} after {seen}");
                assert_eq!(p.payload, payload(tag, big), "message {tag} corrupted");
                seen = tag + 1;
            }
            other => panic!("expected a big message, got {other:?}"),
        }
    }
    // And the connection still works afterwards.
    publisher
        .write_all(&publish("x/small", payload(7, 32)))
        .await
        .unwrap();
    match next(&mut sub, &mut inbox).await {
        Some(Packet::Publish(p)) => assert_eq!(p.payload, payload(7, 32)),
        other => panic!("expected the last message, got {other:?}"),
    }
    server.shutdown(Duration::from_secs(5)).await;
}
