//! `$SYS/broker/...` statistics, published retained every few seconds under Mosquitto's names
//! so that existing dashboards and `mosquitto_sub -t '$SYS/#'` habits keep working.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use stratus_mqtt::{Message, MqttStr, QoS};
use tokio::sync::watch;

use crate::broker::Broker;

/// The version string published at `$SYS/broker/version`.
pub fn version_string() -> String {
    format!("stratus version {}", env!("CARGO_PKG_VERSION"))
}

/// Publishes the statistics now and every `interval` until `shutdown` turns true.
pub async fn run(broker: Arc<Broker>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    let mut maximum = 0;
    loop {
        tokio::select! {
            _ = crate::stopped(&mut shutdown) => return,
            _ = ticker.tick() => publish(&broker, &mut maximum),
        }
    }
}

/// One round of `$SYS` messages. `maximum` tracks the most clients connected at once.
pub fn publish(broker: &Broker, maximum: &mut i64) {
    let m = &broker.metrics;
    let connected = m.mqtt_clients_connected.get();
    let offline = m.mqtt_sessions_offline.get();
    *maximum = (*maximum).max(connected);
    let uptime = broker.started.elapsed().as_secs();
    m.uptime_seconds.set(uptime as i64);
    let values: [(&str, String); 17] = [
        ("version", version_string()),
        ("uptime", format!("{uptime} seconds")),
        ("clients/connected", connected.to_string()),
        ("clients/active", connected.to_string()),
        ("clients/disconnected", offline.to_string()),
        ("clients/inactive", offline.to_string()),
        ("clients/total", (connected + offline).to_string()),
        ("clients/maximum", maximum.to_string()),
        (
            "messages/received",
            m.mqtt_packets_received.get().to_string(),
        ),
        ("messages/sent", m.mqtt_packets_sent.get().to_string()),
        (
            "publish/messages/received",
            m.mqtt_messages_received.get().to_string(),
        ),
        (
            "publish/messages/sent",
            m.mqtt_messages_sent.get().to_string(),
        ),
        (
            "publish/messages/dropped",
            m.mqtt_messages_dropped.get().to_string(),
        ),
        ("bytes/received", m.mqtt_bytes_received.get().to_string()),
        ("bytes/sent", m.mqtt_bytes_sent.get().to_string()),
        (
            "retained messages/count",
            broker.retained_count().to_string(),
        ),
        (
            "subscriptions/count",
            broker.subscription_count().to_string(),
        ),
    ];
    for (name, value) in values {
        let Ok(topic) = MqttStr::try_from(format!("$SYS/broker/{name}")) else {
            continue;
        };
        broker.publish(
            Message::new(topic, Bytes::from(value), QoS::AtMostOnce, true),
            None,
        );
    }
}
