//! Quiet MQTT connections are parked (no task, no busy loop, no buffers) and every way back
//! works: input on the socket, mail for a subscriber, the keep-alive deadline, a take-over, the
//! shutdown, and none of them spins while parked.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use stratus_mqtt::*;
use stratus_server::{Config, Overrides, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const V: ProtocolVersion = ProtocolVersion::V311;

struct Client {
    stream: TcpStream,
    inbox: BytesMut,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, id: &str, keep_alive: u16) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut c = Client {
            stream,
            inbox: BytesMut::new(),
        };
        c.send(Packet::Connect(Connect {
            protocol: V,
            clean_session: true,
            keep_alive,
            client_id: MqttStr::try_from(id.to_string()).unwrap(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        }))
        .await;
        match c.next().await {
            Some(Packet::ConnAck(ack)) => assert!(!ack.session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        encode(&p, V, &mut b).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    /// The next packet within 5 s; `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Packet> {
        timeout(Duration::from_secs(5), async {
            loop {
                if let Some(p) = decode(&mut self.inbox, usize::MAX, V).unwrap() {
                    return Some(p);
                }
                if self.stream.read_buf(&mut self.inbox).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("no packet and no close within 5 s")
    }
}

/// CPU seconds this process (the in-process server) has used.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the ")".
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_wake_for_everything_and_never_spin() {
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
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    let mut sub = Client::connect(addr, "sub", 60).await;
    sub.send(Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            MqttStr::try_from("t/#".to_string()).unwrap(),
            SubscriptionOptions::new(QoS::AtMostOnce),
        )],
        properties: SubscribeProperties::default(),
    }))
    .await;
    assert!(matches!(sub.next().await, Some(Packet::SubAck(_))));
    let mut idle = Vec::new();
    for i in 0..50 {
        idle.push(Client::connect(addr, &format!("idle-{i}"), 60).await);
    }

    // Parked: a second of 51 quiet connections costs (almost) no CPU. A connection that
    // bounced between parking and its busy loop would burn a whole core.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // And none of them keeps a task (the lot has one for all).
    let tasks_parked = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks_parked < tasks_before + 5,
        "{tasks_before} tasks before 51 connections, {tasks_parked} once they were quiet"
    );
    let before = cpu_secs();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_secs() - before;
    assert!(
        used < 0.3,
        "{used} s of CPU in 1 s with every connection quiet"
    );

    // Mail wakes a parked subscriber.
    let mut publisher = Client::connect(addr, "pub", 60).await;
    publisher
        .send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: MqttStr::try_from("t/1".to_string()).unwrap(),
            packet_id: None,
            payload: Bytes::from_static(b"hello"),
            properties: PublishProperties::default(),
        }))
        .await;
    match sub.next().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"hello"),
        other => panic!("expected the PUBLISH, got {other:?}"),
    }

    // Input wakes a parked connection, again and again.
    for client in idle.iter_mut().take(5) {
        for _ in 0..3 {
            client.send(Packet::PingReq).await;
            assert_eq!(client.next().await, Some(Packet::PingResp));
        }
    }

    // A take-over closes the parked connection it replaces.
    let _again = Client::connect(addr, "idle-7", 60).await;
    assert_eq!(
        idle[7].next().await,
        None,
        "the taken-over connection is closed"
    );

    // The keep-alive deadline closes a parked connection that stays silent (1.5 × 1 s).
    let mut silent = Client::connect(addr, "silent", 1).await;
    let started = std::time::Instant::now();
    assert_eq!(silent.next().await, None);
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // The others are still served after all that.
    idle[0].send(Packet::PingReq).await;
    assert_eq!(idle[0].next().await, Some(Packet::PingResp));

    // The shutdown closes parked connections too, and waits for them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    server.shutdown(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the shutdown waited for its deadline"
    );
    for client in idle.iter_mut().skip(10) {
        assert_eq!(
            client.next().await,
            None,
            "a parked connection outlived the shutdown"
        );
    }
}
