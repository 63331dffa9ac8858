//! What an MQTT client may publish, subscribe to and receive, by who it authenticated as
//! (SPEC "MQTT topics"): a device only under `devices/{its id}/`; an application with
//! `telemetry:read` also receives `devices/+/telemetry`; anonymous clients and other
//! applications stay outside `devices/`; admins and TLS client-certificate identities may use
//! any topic. Nobody publishes to `$` topics, and a device does not publish to its
//! cloud → device topics (`devices/{id}/config`, `devices/{id}/firmware`: the desired config
//! and the firmware notice are the server's to retain). The config's topic ACL rules apply
//! on top.

use stratus_mqtt::topic::{filter_covers, matches};

use crate::auth::{Kind, Principal, SCOPE_ADMIN, SCOPE_TELEMETRY_READ};
use crate::broker::Access;

/// The topic policy of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Anonymous (with `--allow-anonymous`) or an application without `telemetry:read`:
    /// anything outside `devices/`.
    Outsider,
    /// A device: only `devices/{id}/…`.
    Device(String),
    /// An application with `telemetry:read`: outside `devices/`, and `devices/+/telemetry`.
    TelemetryReader,
    /// An admin or a TLS client-certificate identity: every topic.
    Full,
}

const TELEMETRY_FILTER: &str = "devices/+/telemetry";

/// The topics under `devices/{id}` that only the cloud publishes (SPEC "MQTT topics").
const CLOUD_TO_DEVICE: [&str; 2] = ["/config", "/firmware"];

fn under_devices(topic: &str) -> bool {
    topic == "devices" || topic.starts_with("devices/")
}

impl Policy {
    /// The policy of an authenticated principal.
    pub fn for_principal(p: &Principal) -> Policy {
        match p.kind {
            Kind::Device => Policy::Device(p.id.clone()),
            Kind::Client if p.has_scope(SCOPE_ADMIN) => Policy::Full,
            Kind::Client if p.has_scope(SCOPE_TELEMETRY_READ) => Policy::TelemetryReader,
            Kind::Client => Policy::Outsider,
        }
    }

    /// The device id, for a device.
    pub fn device(&self) -> Option<&str> {
        match self {
            Policy::Device(id) => Some(id),
            _ => None,
        }
    }

    /// May the client publish to `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        if topic.starts_with('$') {
            return false;
        }
        match self {
            Policy::Full => true,
            Policy::Outsider | Policy::TelemetryReader => !under_devices(topic),
            Policy::Device(id) => topic
                .strip_prefix("devices/")
                .and_then(|rest| rest.strip_prefix(id.as_str()))
                .is_some_and(|rest| rest.starts_with('/') && !CLOUD_TO_DEVICE.contains(&rest)),
        }
    }

    /// May the client subscribe to `filter` (without a `$share/{group}/` prefix)? Wildcard
    /// filters that reach into `devices/` are allowed for outsiders and telemetry readers;
    /// what they may not receive is filtered at delivery ([`may_receive`](Self::may_receive)).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let first = filter.split('/').next().unwrap_or("");
        match self {
            Policy::Full => true,
            Policy::Outsider => first != "devices",
            Policy::TelemetryReader => {
                first != "devices" || filter_covers(TELEMETRY_FILTER, filter)
            }
            Policy::Device(id) => filter_covers(&format!("devices/{id}/#"), filter),
        }
    }

    /// May the client receive a message on `topic`?
    pub fn may_receive(&self, topic: &str) -> bool {
        match self {
            Policy::Full => true,
            Policy::Outsider => !under_devices(topic),
            Policy::TelemetryReader => !under_devices(topic) || matches(TELEMETRY_FILTER, topic),
            Policy::Device(id) => topic
                .strip_prefix("devices/")
                .and_then(|rest| rest.strip_prefix(id.as_str()))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }

    /// How the broker filters deliveries to this client.
    pub fn access(&self) -> Access {
        match self {
            Policy::Full => Access::Full,
            Policy::Outsider => Access::NoDevices,
            Policy::TelemetryReader => Access::TelemetryReader,
            // Its subscriptions are confined to its own tree; deliveries are too, whatever a
            // resumed session holds.
            Policy::Device(_) => Access::Device,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_confined_to_their_tree() {
        let p = Policy::Device("d1".into());
        assert!(p.may_publish("devices/d1/telemetry"));
        assert!(!p.may_publish("devices/d10/telemetry"));
        assert!(!p.may_publish("devices/d1"));
        assert!(!p.may_publish("other"));
        // The cloud → device topics are the server's; their device → cloud neighbours are not.
        assert!(!p.may_publish("devices/d1/config"));
        assert!(!p.may_publish("devices/d1/firmware"));
        assert!(p.may_publish("devices/d1/config/reported"));
        assert!(p.may_publish("devices/d1/firmware/status"));
        assert!(p.may_subscribe("devices/d1/config"));
        assert!(p.may_subscribe("devices/d1/#"));
        assert!(!p.may_subscribe("devices/+/config"));
        assert!(!p.may_subscribe("#"));
        assert!(p.may_receive("devices/d1/config"));
        assert!(!p.may_receive("devices/d2/config"));
    }

    #[test]
    fn telemetry_readers_see_telemetry_and_nothing_else_of_devices() {
        let p = Policy::TelemetryReader;
        assert!(p.may_subscribe("devices/+/telemetry"));
        assert!(p.may_subscribe("devices/d1/telemetry"));
        assert!(!p.may_subscribe("devices/+/config"));
        assert!(!p.may_subscribe("devices/#"));
        assert!(p.may_subscribe("#"));
        assert!(p.may_receive("devices/d1/telemetry"));
        assert!(!p.may_receive("devices/d1/config"));
        assert!(!p.may_publish("devices/d1/telemetry"));
        assert!(p.may_publish("apps/x"));
    }

    #[test]
    fn outsiders_stay_out_of_devices_and_nobody_publishes_to_dollar_topics() {
        let p = Policy::Outsider;
        assert!(!p.may_subscribe("devices/+/telemetry"));
        assert!(p.may_subscribe("#"));
        assert!(!p.may_receive("devices/d1/telemetry"));
        assert!(!p.may_publish("devices/x"));
        assert!(!Policy::Full.may_publish("$SYS/x"));
        assert!(Policy::Full.may_publish("devices/d1/config"));
    }
}
