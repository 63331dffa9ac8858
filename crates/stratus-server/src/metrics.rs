//! Server metrics: one registry of Prometheus counters and gauges, read by `GET /metrics` and
//! by the `$SYS/broker/...` publisher alike.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram as PromHistogram};
use prometheus_client::registry::Registry;

/// Label of a protocol error counter: what the peer did wrong.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Short reason name.
    pub reason: String,
}

/// Label of a denial counter: what was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// `connect`, `publish` or `subscribe`.
    pub action: &'static str,
}

/// Every counter and gauge the server keeps.
#[derive(Default)]
pub struct Metrics {
    registry: Registry,
    /// MQTT clients connected now.
    pub mqtt_clients_connected: Gauge,
    /// MQTT connections accepted since start.
    pub mqtt_connections: Counter,
    /// Persistent sessions kept while their client is offline.
    pub mqtt_sessions_offline: Gauge,
    /// PUBLISH packets received.
    pub mqtt_messages_received: Counter,
    /// PUBLISH packets sent.
    pub mqtt_messages_sent: Counter,
    /// MQTT control packets of any type received.
    pub mqtt_packets_received: Counter,
    /// MQTT control packets of any type sent.
    pub mqtt_packets_sent: Counter,
    /// Bytes received on MQTT connections.
    pub mqtt_bytes_received: Counter,
    /// Bytes sent on MQTT connections.
    pub mqtt_bytes_sent: Counter,
    /// Messages dropped because a queue or buffer was full.
    pub mqtt_messages_dropped: Counter,
    /// QoS 0 deliveries the publisher's task wrote to an idle subscriber's socket (the express
    /// lane) instead of queueing them for the subscriber's task.
    pub mqtt_express_deliveries: Counter,
    /// Connections closed for a protocol error, by reason.
    pub mqtt_protocol_errors: Family<ReasonLabel, Counter>,
    /// Operations refused by authentication or topic policy.
    pub mqtt_denied: Family<ActionLabel, Counter>,
    /// Subscriptions in the subscription tree.
    pub mqtt_subscriptions: Gauge,
    /// Retained messages.
    pub mqtt_retained_messages: Gauge,
    /// Seconds since start (set when scraped).
    pub uptime_seconds: Gauge,
    /// Credentials refused, by transport (`mqtt`, `http`, `coap`, `oauth`).
    pub auth_failures: Family<TransportLabel, Counter>,
    /// Telemetry records stored.
    pub telemetry_records: Counter,
    /// Telemetry points (one value of one series) stored.
    pub telemetry_points: Counter,
    /// Telemetry messages refused, by reason (`invalid`, `replay`, `unknown_device`, `too_large`).
    pub telemetry_rejected: Family<ReasonLabel, Counter>,
    /// Time from submitting a write to the store until it is durable, in seconds.
    pub store_write_seconds: Histogram,
    /// CoAP requests answered, by response code class (`2.xx`, `4.xx`, `5.xx`).
    pub coap_requests: Family<CodeClassLabel, Counter>,
    /// CoAP datagrams received (plain and decrypted DTLS).
    pub coap_datagrams_received: Counter,
    /// CoAP datagrams that were not valid CoAP (format errors, other versions), or DTLS
    /// records that did not decrypt.
    pub coap_bad_datagrams: Counter,
    /// Retransmitted CoAP requests answered from the deduplication cache.
    pub coap_duplicates: Counter,
    /// CoAP observers registered now.
    pub coap_observers: Gauge,
    /// Notifications sent to CoAP observers.
    pub coap_notifications: Counter,
    /// DTLS handshakes that failed (bad PSK identity or key, protocol errors).
    pub coap_dtls_handshake_failures: Counter,
    /// Rule conditions evaluated on telemetry records.
    pub rules_evaluations: Counter,
    /// Rule actions dropped because the action queue was full.
    pub rules_actions_dropped: Counter,
    /// Rule actions carried out (alarm writes, republishes, webhooks, config changes).
    pub rules_actions_done: Counter,
    /// Webhook attempts that failed (each retry counts).
    pub rules_webhook_attempt_failures: Counter,
    /// Webhooks given up after their last retry.
    pub rules_webhook_failures: Counter,
    /// Alarms raised.
    pub alarms_raised: Counter,
    /// Alarms open (active or acknowledged) now.
    pub alarms_open: Gauge,
    /// Live stream (SSE) readers connected now.
    pub stream_readers: Gauge,
    /// Live stream readers dropped for falling behind.
    pub stream_dropped: Counter,
    /// Requests refused by a configured limit or quota, by limit (see [`Metrics::limit_hit`]).
    pub limit_hits: Family<LimitLabel, Counter>,
    /// HTTP connections open now, by listener (WebSocket and SSE included).
    pub http_connections: Family<ListenerLabel, Gauge>,
    /// Connections refused at accept, by listener and reason (HTTP `listener_full`: 503,
    /// `address_limit`: 429; MQTT `fd_budget`: closed at once, see [`crate::accept`]).
    pub connections_refused: Family<RefusalLabel, Counter>,
    /// HTTP connections or requests cut by a timer, by listener and kind (`header`, `idle`,
    /// `body`).
    pub http_timeouts: Family<HttpTimeoutLabel, Counter>,
    /// Failed `accept` calls (e.g. out of file descriptors), by listener.
    pub accept_errors: Family<ListenerLabel, Counter>,
}

/// Label of the limit counter: which limit refused something.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// The limit's name, e.g. `mqtt_publish_rate`, `mqtt_subscriptions`, `auth_throttle`.
    pub limit: &'static str,
}

/// Label of a per-listener metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `http`, `https`, `mqtt` or `mqtts`.
    pub listener: &'static str,
}

/// Label of the refused-connections counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// `http`, `https`, `mqtt` or `mqtts`.
    pub listener: &'static str,
    /// `listener_full`, `address_limit` or `fd_budget`.
    pub reason: &'static str,
}

/// Label of the HTTP timeout counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpTimeoutLabel {
    /// `http` or `https`.
    pub listener: &'static str,
    /// `header`, `idle` or `body`.
    pub kind: &'static str,
}

/// Label of a CoAP response counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeClassLabel {
    /// `2.xx`, `4.xx` or `5.xx`.
    pub class: &'static str,
}

/// Label of a counter by transport.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `mqtt`, `http`, `coap` or `oauth`.
    pub transport: &'static str,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram(PromHistogram::new(exponential_buckets(0.0001, 2.0, 16)))
    }
}

/// A latency histogram (100 µs to ~3 s buckets).
pub struct Histogram(pub PromHistogram);

impl Histogram {
    /// Records one observation in seconds.
    pub fn observe(&self, secs: f64) {
        self.0.observe(secs);
    }
}

impl Metrics {
    /// Metrics registered under the `stratus_` prefix.
    pub fn new() -> Metrics {
        let mut m = Metrics::default();
        let r = &mut m.registry;
        r.register(
            "stratus_mqtt_clients_connected",
            "MQTT clients connected now",
            m.mqtt_clients_connected.clone(),
        );
        r.register(
            "stratus_mqtt_connections",
            "MQTT connections accepted",
            m.mqtt_connections.clone(),
        );
        r.register(
            "stratus_mqtt_sessions_offline",
            "Persistent MQTT sessions whose client is offline",
            m.mqtt_sessions_offline.clone(),
        );
        r.register(
            "stratus_mqtt_messages_received",
            "MQTT PUBLISH packets received",
            m.mqtt_messages_received.clone(),
        );
        r.register(
            "stratus_mqtt_messages_sent",
            "MQTT PUBLISH packets sent",
            m.mqtt_messages_sent.clone(),
        );
        r.register(
            "stratus_mqtt_packets_received",
            "MQTT control packets received",
            m.mqtt_packets_received.clone(),
        );
        r.register(
            "stratus_mqtt_packets_sent",
            "MQTT control packets sent",
            m.mqtt_packets_sent.clone(),
        );
        r.register(
            "stratus_mqtt_bytes_received",
            "Bytes received on MQTT connections",
            m.mqtt_bytes_received.clone(),
        );
        r.register(
            "stratus_mqtt_bytes_sent",
            "Bytes sent on MQTT connections",
            m.mqtt_bytes_sent.clone(),
        );
        r.register(
            "stratus_mqtt_messages_dropped",
            "MQTT messages dropped because a queue or buffer was full",
            m.mqtt_messages_dropped.clone(),
        );
        r.register(
            "stratus_mqtt_express_deliveries",
            "QoS 0 deliveries written straight to an idle subscriber's socket by the publisher's task",
            m.mqtt_express_deliveries.clone(),
        );
        r.register(
            "stratus_mqtt_protocol_errors",
            "MQTT connections closed for a protocol error",
            m.mqtt_protocol_errors.clone(),
        );
        r.register(
            "stratus_mqtt_denied",
            "MQTT operations refused by authentication or topic policy",
            m.mqtt_denied.clone(),
        );
        r.register(
            "stratus_mqtt_subscriptions",
            "MQTT subscriptions",
            m.mqtt_subscriptions.clone(),
        );
        r.register(
            "stratus_mqtt_retained_messages",
            "MQTT retained messages",
            m.mqtt_retained_messages.clone(),
        );
        r.register(
            "stratus_auth_failures",
            "Credentials refused, by transport",
            m.auth_failures.clone(),
        );
        r.register(
            "stratus_rules_evaluations",
            "Rule conditions evaluated on telemetry records",
            m.rules_evaluations.clone(),
        );
        r.register(
            "stratus_rules_actions_dropped",
            "Rule actions dropped because the action queue was full",
            m.rules_actions_dropped.clone(),
        );
        r.register(
            "stratus_rules_actions_done",
            "Rule actions carried out",
            m.rules_actions_done.clone(),
        );
        r.register(
            "stratus_rules_webhook_attempt_failures",
            "Webhook attempts that failed, retries included",
            m.rules_webhook_attempt_failures.clone(),
        );
        r.register(
            "stratus_rules_webhook_failures",
            "Webhooks given up after their last retry",
            m.rules_webhook_failures.clone(),
        );
        r.register(
            "stratus_alarms_raised",
            "Alarms raised",
            m.alarms_raised.clone(),
        );
        r.register(
            "stratus_alarms_open",
            "Alarms open (active or acknowledged)",
            m.alarms_open.clone(),
        );
        r.register(
            "stratus_stream_readers",
            "Live stream (SSE) readers connected",
            m.stream_readers.clone(),
        );
        r.register(
            "stratus_stream_dropped",
            "Live stream readers dropped for falling behind",
            m.stream_dropped.clone(),
        );
        r.register(
            "stratus_telemetry_records_stored",
            "Telemetry records stored",
            m.telemetry_records.clone(),
        );
        r.register(
            "stratus_telemetry_points_stored",
            "Telemetry points (one value of one series) stored",
            m.telemetry_points.clone(),
        );
        r.register(
            "stratus_telemetry_rejected",
            "Telemetry messages refused, by reason",
            m.telemetry_rejected.clone(),
        );
        r.register(
            "stratus_store_write_seconds",
            "Time until a store write is durable",
            m.store_write_seconds.0.clone(),
        );
        r.register(
            "stratus_coap_requests",
            "CoAP requests answered, by response code class",
            m.coap_requests.clone(),
        );
        r.register(
            "stratus_coap_datagrams_received",
            "CoAP datagrams received",
            m.coap_datagrams_received.clone(),
        );
        r.register(
            "stratus_coap_bad_datagrams",
            "CoAP datagrams that were not valid CoAP or did not decrypt",
            m.coap_bad_datagrams.clone(),
        );
        r.register(
            "stratus_coap_duplicates",
            "Retransmitted CoAP requests answered from the deduplication cache",
            m.coap_duplicates.clone(),
        );
        r.register(
            "stratus_coap_observers",
            "CoAP observers registered now",
            m.coap_observers.clone(),
        );
        r.register(
            "stratus_coap_notifications",
            "Notifications sent to CoAP observers",
            m.coap_notifications.clone(),
        );
        r.register(
            "stratus_coap_dtls_handshake_failures",
            "DTLS handshakes that failed",
            m.coap_dtls_handshake_failures.clone(),
        );
        r.register(
            "stratus_http_connections",
            "HTTP connections open, by listener (WebSocket and SSE included)",
            m.http_connections.clone(),
        );
        r.register(
            "stratus_connections_refused",
            "Connections refused at accept, by listener and reason",
            m.connections_refused.clone(),
        );
        r.register(
            "stratus_http_timeouts",
            "HTTP connections or requests cut by a timer, by listener and kind",
            m.http_timeouts.clone(),
        );
        r.register(
            "stratus_accept_errors",
            "Failed accept calls (e.g. out of file descriptors), by listener",
            m.accept_errors.clone(),
        );
        r.register(
            "stratus_uptime_seconds",
            "Seconds since the server started",
            m.uptime_seconds.clone(),
        );
        r.register(
            "stratus_limit_hits",
            "Requests refused by a configured limit or quota, by limit",
            m.limit_hits.clone(),
        );
        m
    }

    /// Counts `n` requests refused by the limit `limit`.
    pub fn limit_hit(&self, limit: &'static str, n: u64) {
        if n > 0 {
            self.limit_hits
                .get_or_create(&LimitLabel { limit })
                .inc_by(n);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a protocol error by reason.
    pub fn protocol_error(&self, reason: &str) {
        self.mqtt_protocol_errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts refused credentials.
    pub fn auth_failure(&self, transport: &'static str) {
        self.auth_failures
            .get_or_create(&TransportLabel { transport })
            .inc();
    }

    /// Counts a refused telemetry message.
    pub fn telemetry_rejected(&self, reason: &str) {
        self.telemetry_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a CoAP response by its code class (`class` 2, 4 or 5).
    pub fn coap_response(&self, class: u8) {
        let class = match class {
            2 => "2.xx",
            4 => "4.xx",
            _ => "5.xx",
        };
        self.coap_requests
            .get_or_create(&CodeClassLabel { class })
            .inc();
    }

    /// Counts a connection refused at accept.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusalLabel { listener, reason })
            .inc();
    }

    /// Counts a denial.
    pub fn denied(&self, action: &'static str) {
        self.mqtt_denied
            .get_or_create(&ActionLabel { action })
            .inc();
    }
}
