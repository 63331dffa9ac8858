//! The live event bus: telemetry, alarms, device status and firmware progress as they happen,
//! for `GET /api/v1/stream` (Server-Sent Events), the rules engine and the dashboard.
//!
//! Publishing never waits: the bus is a bounded [`tokio::sync::broadcast`] ring, so a slow
//! reader loses events (it sees [`broadcast::error::RecvError::Lagged`] and is dropped by the
//! stream with a notice) and can never slow ingestion. With no reader, an event costs one
//! atomic load.
//!
//! ## JSON shape (one `data:` line of the stream each)
//! ```json
//! {"type": "telemetry", "device": "d1", "ts": 1714564800000, "values": {"temperature": 21.5}}
//! {"type": "alarm", "alarm": {…the alarm as GET /api/v1/alarms shows it…}}
//! {"type": "device_status", "device": "d1", "online": true, "transport": "mqtt", "last_seen": 1714564800000}
//! {"type": "firmware", "device": "d1", "firmware": "sha256-hex", "campaign": "c1" | null,
//!  "state": "downloading" | "verified" | "installed" | "failed" | "assigned", "reason": null | "…", "at": 1714564800000}
//! ```
//! `ts`, `last_seen` and `at` are Unix epoch milliseconds.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Events kept for readers that fall behind before they are dropped.
pub const DEFAULT_CAPACITY: usize = 4096;

/// One live event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// One stored telemetry record.
    Telemetry {
        /// The device.
        device: String,
        /// Measurement time, epoch ms.
        ts: i64,
        /// Series values of the record.
        values: Map<String, Value>,
    },
    /// An alarm was raised, acknowledged or cleared (the alarm as the API shows it).
    Alarm {
        /// The alarm object.
        alarm: Value,
    },
    /// A device came online, went offline, or was heard from.
    DeviceStatus {
        /// The device.
        device: String,
        /// Whether it is connected (or was heard from recently, for HTTP/CoAP).
        online: bool,
        /// `mqtt`, `http`, `coap`, or `null` when it went offline.
        transport: Option<String>,
        /// When it was last heard from, epoch ms.
        last_seen: Option<i64>,
    },
    /// Firmware progress of a device.
    Firmware {
        /// The device.
        device: String,
        /// Firmware id.
        firmware: String,
        /// Campaign id, if the assignment came from one.
        campaign: Option<String>,
        /// `assigned`, `downloading`, `verified`, `installed` or `failed`.
        state: String,
        /// Why it failed, if it did.
        reason: Option<String>,
        /// When, epoch ms.
        at: i64,
    },
}

impl Event {
    /// The device the event is about, if any (alarms carry theirs inside `alarm.device`).
    pub fn device(&self) -> Option<&str> {
        match self {
            Event::Telemetry { device, .. }
            | Event::DeviceStatus { device, .. }
            | Event::Firmware { device, .. } => Some(device),
            Event::Alarm { alarm } => alarm.get("device").and_then(Value::as_str),
        }
    }
}

/// The bus: cheap to clone, publish from anywhere.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventBus {
    /// A bus keeping `capacity` events for each lagging reader.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus { tx }
    }

    /// Publishes `event` to every current reader; never blocks.
    pub fn publish(&self, event: Event) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(event));
        }
    }

    /// Whether anyone is listening (skip building events when not).
    pub fn has_readers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new reader seeing events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_their_type() {
        let mut values = Map::new();
        values.insert("t".into(), Value::from(1.5));
        let e = Event::Telemetry {
            device: "d1".into(),
            ts: 5,
            values,
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "telemetry", "device": "d1", "ts": 5, "values": {"t": 1.5}})
        );
        assert_eq!(e.device(), Some("d1"));
    }

    #[tokio::test]
    async fn a_lagging_reader_learns_it_lagged() {
        let bus = EventBus::new(2);
        let mut rx = bus.subscribe();
        for i in 0..5 {
            bus.publish(Event::DeviceStatus {
                device: format!("d{i}"),
                online: true,
                transport: None,
                last_seen: None,
            });
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
    }
}
