//! Server configuration: defaults, `stratus.toml`, `STRATUS_SECTION__KEY` environment
//! variables and command-line flags, merged in that order of increasing precedence.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::acl::AclConfig;

/// Everything `stratus serve` can be told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: where to listen and keep data.
    pub server: ServerConfig,
    /// `[auth]`: who may connect.
    pub auth: AuthConfig,
    /// `[http]`: the HTTP listener.
    pub http: HttpConfig,
    /// `[mqtt]`: the MQTT listener and broker limits.
    pub mqtt: MqttConfig,
    /// `[coap]`: the CoAP listener.
    pub coap: CoapConfig,
    /// `[tls]`: certificates for MQTTS, HTTPS and WSS.
    pub tls: TlsConfig,
    /// `[telemetry]`: freshness and parsing limits of telemetry ingestion.
    pub telemetry: crate::pipeline::TelemetryConfig,
    /// `[rules]`: the rules engine's action queue and device connectivity.
    pub rules: crate::rules::service::RulesConfig,
    /// `[firmware]`: trusted signing keys and upload limits.
    pub firmware: FirmwareConfig,
    /// `[audit]`: the export of the audit log's head; failed logins.
    pub audit: AuditConfig,
}

/// `[audit]` (see [`crate::audit`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// How often the audit log's head is checked and, when it moved, written to
    /// `DATA_DIR/audit.head` and logged (also at shutdown).
    pub head_interval_secs: u64,
    /// How long the entries of failed logins are kept, in days (fractions allowed: 0.5 is
    /// twelve hours); 0 keeps them forever. Admin actions are always kept.
    pub failure_retention_days: f64,
    /// Failed logins are aggregated over windows this long: one entry per source address,
    /// claimed identity and endpoint in each.
    pub failure_window_secs: u64,
    /// Keys (source, identity, endpoint) held at once; the attempts beyond are counted in
    /// one overflow entry per window.
    pub failure_max_keys: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        use crate::audit::failures as f;
        AuditConfig {
            head_interval_secs: crate::audit::DEFAULT_HEAD_INTERVAL_SECS,
            failure_retention_days: f::DEFAULT_RETENTION_DAYS,
            failure_window_secs: f::DEFAULT_WINDOW_SECS,
            failure_max_keys: f::DEFAULT_MAX_KEYS,
        }
    }
}

impl AuditConfig {
    /// How failed logins are aggregated and kept.
    pub fn failures(&self) -> crate::audit::failures::FailureConfig {
        crate::audit::failures::FailureConfig {
            window_ms: self.failure_window_secs.saturating_mul(1000),
            max_keys: self.failure_max_keys,
            retention: crate::audit::failures::retention_from_days(self.failure_retention_days),
        }
    }
}

/// `[firmware]` (see [`crate::api::firmware`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirmwareConfig {
    /// Public key files (PEM or base64 of 32 bytes) whose signatures are trusted;
    /// `--firmware-pubkey` replaces the list. Without any, every upload is refused.
    pub pubkeys: Vec<PathBuf>,
    /// Largest firmware image accepted, in bytes (413 beyond).
    pub max_image_bytes: u64,
    /// The HTTP base URL devices download from, put in assignment notices
    /// [default: `http://` + the HTTP listener's address; `https://` + the HTTPS listener's
    /// under `tls.require_encryption`].
    pub public_url: Option<String>,
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        FirmwareConfig {
            pubkeys: Vec::new(),
            max_image_bytes: 64 * 1024 * 1024,
            public_url: None,
        }
    }
}

impl FirmwareConfig {
    /// Reads every configured key file; the error names the key and the file.
    pub fn trusted_keys(&self) -> Result<stratus_firmware::TrustedKeys, ConfigError> {
        let mut keys = stratus_firmware::TrustedKeys::new();
        for path in &self.pubkeys {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("firmware.pubkeys: {}: {e}", path.display())))?;
            let key = stratus_firmware::parse_public_key(&text)
                .map_err(|e| ConfigError(format!("firmware.pubkeys: {}: {e}", path.display())))?;
            keys.add(key);
        }
        Ok(keys)
    }
}

/// `[tls]`. Setting `cert_file` and `key_file` starts the MQTTS and HTTPS listeners
/// (`stratus tls init` makes both and sets them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle: clients may authenticate with a certificate it signed; the certificate's
    /// CN is the client's identity.
    pub client_ca_file: Option<PathBuf>,
    /// Devices may only use MQTTS, WSS, HTTPS and CoAPS: the plain listeners (MQTT, HTTP with
    /// its WebSocket, CoAP) bind loopback only (127.0.0.1, or ::1 for an IPv6 `server.bind`)
    /// whatever `server.bind` says, the TLS listeners bind `server.bind`, and CoAPS starts
    /// even without `coap.dtls`. Needs `cert_file` and `key_file`.
    pub require_encryption: bool,
    /// `Strict-Transport-Security: max-age=N` on every HTTPS answer (RFC 6797); 0 sends none.
    pub hsts_max_age_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_encryption: false,
            hsts_max_age_secs: 31_536_000,
        }
    }
}

impl TlsConfig {
    /// Whether the TLS listeners start.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address every listener binds to.
    pub bind: IpAddr,
    /// Directory for all persistent state.
    pub data_dir: PathBuf,
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// MQTT clients without credentials may connect and use topics outside `devices/`.
    pub allow_anonymous: bool,
    /// Lifetime of the access tokens the token endpoint issues, in seconds (`expires_in`).
    pub token_ttl_secs: u64,
    /// `[auth.throttle]`: back-off of failed authentications.
    pub throttle: crate::auth::throttle::ThrottleConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            token_ttl_secs: crate::auth::DEFAULT_TOKEN_TTL_SECS,
            throttle: crate::auth::throttle::ThrottleConfig::default(),
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// TCP port; 0 picks a free one.
    pub port: u16,
    /// HTTPS port (when `[tls]` is configured); 0 picks a free one.
    pub tls_port: u16,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Open connections per listener (HTTP and HTTPS each), WebSocket and SSE included; more
    /// are answered 503 and closed. Lowered at start to fit the fd limit (see
    /// [`crate::accept::FdBudget`]).
    pub max_connections: usize,
    /// Open connections from one source address; more are answered 429 with `Retry-After`
    /// and closed. At most a quarter of the listener's cap, so one address never fills it.
    pub max_connections_per_address: usize,
    /// Seconds a client has to send a request's head (request line and headers), counted
    /// from the accept (TLS handshake included) or, between keep-alive requests, from its
    /// first byte; then the connection closes.
    pub header_read_timeout_secs: u64,
    /// Seconds a keep-alive connection may wait for its next request; then it closes. SSE
    /// streams and WebSocket connections are exempt.
    pub idle_timeout_secs: u64,
    /// Seconds a request body has to arrive, extended by one second for every
    /// `body_min_bytes_per_sec` bytes received; a body that trickles slower gets 408.
    pub body_timeout_secs: u64,
    /// The slowest average rate, in bytes per second, at which a long body keeps its
    /// deadline moving (0: the deadline is `body_timeout_secs` whatever the size).
    pub body_min_bytes_per_sec: u64,
    /// Largest request head (request line and headers), in bytes; larger ones get 431.
    pub max_header_bytes: usize,
}

/// `[coap]` (see [`crate::coap`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// UDP port; 0 picks a free one.
    pub port: u16,
    /// Start the CoAPS (DTLS 1.2 PSK) listener.
    pub dtls: bool,
    /// CoAPS UDP port (when `dtls` is on); 0 picks a free one.
    pub dtls_port: u16,
    /// Also answer `GET /.well-known/core` sent to 224.0.1.187 (and ff02::fd) on `port`.
    pub multicast: bool,
    /// Longest random delay before answering a multicast request, in milliseconds
    /// (RFC 7252 §8.2 Leisure).
    pub multicast_leisure_ms: u64,
    /// Largest request body, whole or reassembled from Block1 (4.13 with Size1 beyond).
    pub max_body_bytes: usize,
    /// Largest datagram sent to a peer that has not authenticated (RFC 7252 §11.3); larger
    /// bodies go out in smaller Block2 blocks. 0 turns the guard off.
    pub unverified_response_limit: usize,
    /// Requests being handled at once; more are answered 5.03.
    pub max_pending_requests: usize,
    /// Observers in total.
    pub max_observers: usize,
    /// Observers of one device (`/config` and `/firmware` together); a registration beyond
    /// is answered as a plain GET, without Observe (RFC 7641 §4.1), and counted.
    pub max_observers_per_device: usize,
    /// DTLS sessions kept at once (handshaking or established); the least recently used
    /// goes first.
    pub max_dtls_sessions: usize,
}

/// Which MQTT client ids a device may use (`[mqtt] device_client_ids`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClientIds {
    /// Its device id and nothing else (AWS IoT's "thing name as client id").
    #[default]
    Exact,
    /// Its device id, or one that starts with it followed by `-` or `/` (several
    /// connections of one device); such ids are then reserved for that device.
    Prefix,
}

impl DeviceClientIds {
    /// Whether device `device` may connect with `client_id`.
    pub fn allows(self, device: &str, client_id: &str) -> bool {
        match client_id.strip_prefix(device) {
            Some("") => true,
            Some(rest) => self == DeviceClientIds::Prefix && rest.starts_with(['-', '/']),
            None => false,
        }
    }

    /// The device ids `client_id` would belong to under this rule: itself, and with
    /// [`Prefix`](Self::Prefix) every part before a `-` or `/`.
    pub fn candidates(self, client_id: &str) -> impl Iterator<Item = &str> {
        let prefixes = client_id
            .char_indices()
            .filter(move |&(_, c)| self == DeviceClientIds::Prefix && (c == '-' || c == '/'))
            .map(move |(i, _)| &client_id[..i]);
        std::iter::once(client_id).chain(prefixes)
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// TCP port; 0 picks a free one.
    pub port: u16,
    /// MQTTS port (when `[tls]` is configured); 0 picks a free one.
    pub tls_port: u16,
    /// Largest packet accepted from a client, in bytes (fixed header included).
    pub max_packet_size: usize,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Outbound QoS 1/2 messages in flight per client.
    pub max_inflight: u16,
    /// Messages queued per session beyond the in-flight window or while offline; more are dropped and counted.
    pub max_queued: usize,
    /// Simultaneous connections; more are refused with CONNACK 0x03.
    pub max_connections: usize,
    /// Seconds between `$SYS/broker/...` updates.
    pub sys_interval_secs: u64,
    /// Most levels a topic name or filter may have.
    pub max_topic_levels: usize,
    /// Seconds publishers wait for an online subscriber whose QoS 1/2 backlog exceeds
    /// `max_queued`; after that the subscriber is disconnected as a slow consumer.
    pub slow_consumer_timeout_secs: u64,
    /// Longest keep alive (seconds) an MQTT 5.0 client may ask for; a longer one, or 0, is
    /// answered with Server Keep Alive set to this. 0: no limit.
    pub max_keepalive: u16,
    /// Receive Maximum advertised to MQTT 5.0 clients: their unacknowledged QoS 1/2 PUBLISHes
    /// at once; more is a protocol error (DISCONNECT 0x93).
    pub receive_maximum: u16,
    /// Topic Alias Maximum advertised to MQTT 5.0 clients (0: no topic aliases).
    pub topic_alias_maximum: u16,
    /// Which client ids a device may connect with: its own id only, or also `{id}-…`/`{id}/…`.
    pub device_client_ids: DeviceClientIds,
    /// PUBLISH packets per second per client (0: no limit); more get PUBACK 0x97 (3.1.1:
    /// dropped and counted).
    pub max_publish_rate: u32,
    /// Payload bytes per second per client (0: no limit).
    pub max_publish_bytes_rate: u32,
    /// Consecutive seconds over a publish rate before the client is disconnected (0x96).
    pub rate_sustain_secs: u8,
    /// Subscriptions per client; more get SUBACK 0x97 (3.1.1: 0x80).
    pub max_subscriptions: usize,
    /// Retained messages a client may have set; more get PUBACK 0x97 (3.1.1: dropped).
    pub max_retained_per_client: usize,
    /// Payload bytes of the retained messages a client may have set.
    pub max_retained_bytes_per_client: usize,
    /// Retained messages in the broker; more get PUBACK 0x97 (3.1.1: dropped).
    pub max_retained: usize,
    /// Payload bytes of every retained message in the broker.
    pub max_retained_bytes: usize,
    /// Simultaneous connections of one device or application (anonymous clients are bounded
    /// by address only); more are refused with CONNACK 0x97 (3.1.1: 0x03).
    pub max_connections_per_principal: usize,
    /// Simultaneous connections from one IP address; more are refused with CONNACK 0x9F
    /// Connection rate exceeded (3.1.1: 0x03).
    pub max_connections_per_address: usize,
    /// `[mqtt.acl]`: topic access rules (see [`crate::acl`]).
    pub acl: AclConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: IpAddr::from([127, 0, 0, 1]),
            data_dir: PathBuf::from("./stratus-data"),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            port: 8080,
            tls_port: 8443,
            max_body_bytes: 4 * 1024 * 1024,
            max_connections: 10_000,
            max_connections_per_address: 128,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 75,
            body_timeout_secs: 30,
            body_min_bytes_per_sec: 500,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            port: 5683,
            dtls: false,
            dtls_port: 5684,
            multicast: false,
            multicast_leisure_ms: 2000,
            max_body_bytes: 1024 * 1024,
            unverified_response_limit: 256,
            max_pending_requests: 4096,
            max_observers: 4096,
            max_observers_per_device: 8,
            max_dtls_sessions: 4096,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            port: 1883,
            tls_port: 8883,
            max_packet_size: 1024 * 1024,
            connect_timeout_secs: 10,
            max_inflight: 256,
            max_queued: 1000,
            max_connections: 100_000,
            sys_interval_secs: 5,
            max_topic_levels: 128,
            slow_consumer_timeout_secs: 3,
            max_keepalive: 0,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            device_client_ids: DeviceClientIds::Exact,
            max_publish_rate: 1000,
            max_publish_bytes_rate: 16 * 1024 * 1024,
            rate_sustain_secs: 10,
            max_subscriptions: 1000,
            max_retained_per_client: 1000,
            max_retained_bytes_per_client: 16 * 1024 * 1024,
            max_retained: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            max_connections_per_principal: 64,
            max_connections_per_address: 1000,
            acl: AclConfig::default(),
        }
    }
}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--bind`.
    pub bind: Option<IpAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--http-port`.
    pub http_port: Option<u16>,
    /// `--mqtt-port`.
    pub mqtt_port: Option<u16>,
    /// `--coap-port`.
    pub coap_port: Option<u16>,
    /// `--allow-anonymous` (only `true` overrides).
    pub allow_anonymous: bool,
    /// `--firmware-pubkey` (repeatable; when given, replaces `firmware.pubkeys`).
    pub firmware_pubkeys: Vec<PathBuf>,
}

/// A configuration that cannot be used; its message names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads defaults < `file` (when given; it must exist) < environment < `overrides`, and validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from_env(file, overrides, Env::prefixed("STRATUS_"))
    }

    fn load_from_env(file: Option<&Path>, o: &Overrides, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only SECTION__KEY variables are configuration; others (e.g. STRATUS_ADMIN_SECRET) are not.
        figment = figment.merge(env.filter(|k| k.as_str().contains("__")).split("__"));
        let mut set = |key: &str, value: Option<figment::value::Value>| {
            if let Some(v) = value {
                figment = std::mem::take(&mut figment).merge(Serialized::default(key, v));
            }
        };
        set("server.bind", o.bind.map(|b| b.to_string().into()));
        set(
            "server.data_dir",
            o.data_dir.as_ref().map(|d| d.display().to_string().into()),
        );
        set("http.port", o.http_port.map(Into::into));
        set("mqtt.port", o.mqtt_port.map(Into::into));
        set("coap.port", o.coap_port.map(Into::into));
        set(
            "auth.allow_anonymous",
            o.allow_anonymous.then_some(true.into()),
        );
        if !o.firmware_pubkeys.is_empty() {
            let paths: Vec<String> = o
                .firmware_pubkeys
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            figment = figment.merge(Serialized::default("firmware.pubkeys", paths));
        }
        let config: Config = figment.extract().map_err(|e| {
            let mut msg = String::new();
            for err in e {
                if !msg.is_empty() {
                    msg.push_str("; ");
                }
                let key = err.path.join(".");
                if key.is_empty() {
                    msg.push_str(&err.kind.to_string());
                } else {
                    msg.push_str(&format!("{key}: {}", err.kind));
                }
                if let Some(source) = err.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    msg.push_str(&format!(" (in {source})"));
                } else if let Some(m) = err.metadata.as_ref() {
                    msg.push_str(&format!(" (from {})", m.name));
                }
            }
            ConfigError(msg)
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.tls.enabled() && (self.tls.cert_file.is_none() || self.tls.key_file.is_none()) {
            return bad(
                "tls.cert_file",
                "tls.cert_file and tls.key_file must be given together",
            );
        }
        if self.tls.client_ca_file.is_some() && !self.tls.enabled() {
            return bad("tls.client_ca_file", "needs tls.cert_file and tls.key_file");
        }
        if self.tls.require_encryption && !self.tls.enabled() {
            return bad(
                "tls.require_encryption",
                "needs tls.cert_file and tls.key_file (`stratus tls init` makes them)",
            );
        }
        if m.max_packet_size < 64
            || m.max_packet_size > stratus_mqtt::codec::MAX_REMAINING_LENGTH + 5
        {
            return bad("mqtt.max_packet_size", "must be between 64 and 268435460");
        }
        if m.max_inflight == 0 || m.max_inflight == u16::MAX {
            return bad("mqtt.max_inflight", "must be between 1 and 65534");
        }
        if m.receive_maximum == 0 {
            return bad("mqtt.receive_maximum", "must be between 1 and 65535");
        }
        if m.connect_timeout_secs == 0 {
            return bad("mqtt.connect_timeout_secs", "must be at least 1");
        }
        if m.sys_interval_secs == 0 {
            return bad("mqtt.sys_interval_secs", "must be at least 1");
        }
        if m.max_topic_levels == 0 || m.max_topic_levels > 1024 {
            return bad("mqtt.max_topic_levels", "must be between 1 and 1024");
        }
        if m.slow_consumer_timeout_secs == 0 {
            return bad("mqtt.slow_consumer_timeout_secs", "must be at least 1");
        }
        if self.http.max_body_bytes < 1024 {
            return bad("http.max_body_bytes", "must be at least 1024");
        }
        self.validate_http()?;
        if m.max_connections == 0 {
            return bad("mqtt.max_connections", "must be at least 1");
        }
        if !(1..=31_536_000).contains(&self.auth.token_ttl_secs) {
            return bad(
                "auth.token_ttl_secs",
                "must be between 1 and 31536000 (a year)",
            );
        }
        let c = &self.coap;
        if c.max_body_bytes < 64 {
            return bad("coap.max_body_bytes", "must be at least 64");
        }
        if c.unverified_response_limit != 0 && c.unverified_response_limit < 64 {
            return bad(
                "coap.unverified_response_limit",
                "must be 0 (off) or at least 64",
            );
        }
        if c.max_pending_requests == 0 || c.max_observers == 0 || c.max_dtls_sessions == 0 {
            return bad(
                "coap.max_pending_requests",
                "coap.max_pending_requests, max_observers and max_dtls_sessions must be at least 1",
            );
        }
        if c.multicast_leisure_ms > 60_000 {
            return bad("coap.multicast_leisure_ms", "must be at most 60000");
        }
        if self.firmware.max_image_bytes < 1024 {
            return bad("firmware.max_image_bytes", "must be at least 1024");
        }
        if self.audit.head_interval_secs == 0 || self.audit.head_interval_secs > 86_400 {
            return bad(
                "audit.head_interval_secs",
                "must be between 1 and 86400 (a day)",
            );
        }
        let days = self.audit.failure_retention_days;
        if !(0.0..=36_500.0).contains(&days) {
            return bad(
                "audit.failure_retention_days",
                "must be between 0 (forever) and 36500 days",
            );
        }
        if self.audit.failure_window_secs == 0 || self.audit.failure_window_secs > 3600 {
            return bad(
                "audit.failure_window_secs",
                "must be between 1 and 3600 (an hour)",
            );
        }
        if self.audit.failure_max_keys == 0 || self.audit.failure_max_keys > 1_000_000 {
            return bad("audit.failure_max_keys", "must be between 1 and 1000000");
        }
        self.firmware.trusted_keys()?;
        m.acl.validate().map_err(ConfigError)?;
        Ok(())
    }

    /// The address the plain listeners (MQTT, HTTP and WebSocket, CoAP) bind: `server.bind`,
    /// or loopback of its family under `[tls] require_encryption` (so only this host can use
    /// them). The TLS listeners always bind `server.bind`.
    pub fn plain_bind(&self) -> IpAddr {
        let bind = self.server.bind;
        if !self.tls.require_encryption || bind.is_loopback() {
            return bind;
        }
        match bind {
            IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    }

    /// Whether the CoAPS (DTLS) listener starts: `coap.dtls`, or `tls.require_encryption`.
    pub fn coaps_enabled(&self) -> bool {
        self.coap.dtls || self.tls.require_encryption
    }

    fn validate_http(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        let bad = |key: &str, why: &str| Err(ConfigError(format!("http.{key}: {why}")));
        if h.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if h.max_connections_per_address == 0 {
            return bad("max_connections_per_address", "must be at least 1");
        }
        for (key, secs) in [
            ("header_read_timeout_secs", h.header_read_timeout_secs),
            ("idle_timeout_secs", h.idle_timeout_secs),
            ("body_timeout_secs", h.body_timeout_secs),
        ] {
            if !(1..=86_400).contains(&secs) {
                return bad(key, "must be between 1 and 86400 (a day)");
            }
        }
        if !(1024..=1024 * 1024).contains(&h.max_header_bytes) {
            return bad("max_header_bytes", "must be between 1024 and 1048576");
        }
        Ok(())
    }

    /// The per-connection limits for the MQTT state machine.
    pub fn mqtt_limits(&self) -> stratus_mqtt::Limits {
        stratus_mqtt::Limits {
            max_packet_size: self.mqtt.max_packet_size,
            connect_timeout: Duration::from_secs(self.mqtt.connect_timeout_secs),
            max_inflight: self.mqtt.max_inflight,
            max_queued: self.mqtt.max_queued,
            max_transmit_buffer: self.mqtt.max_packet_size.max(1024 * 1024),
            max_topic_levels: self.mqtt.max_topic_levels,
            max_keepalive: self.mqtt.max_keepalive,
            receive_maximum: self.mqtt.receive_maximum,
            topic_alias_maximum: self.mqtt.topic_alias_maximum,
            max_publish_rate: self.mqtt.max_publish_rate,
            max_publish_bytes_rate: self.mqtt.max_publish_bytes_rate,
            rate_sustain_secs: self.mqtt.rate_sustain_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        // Figment reads the process environment; tests use a private prefix per case so
        // they do not interfere with each other or with the real environment.
        let prefix = format!("STRATUS_TEST_{}_", rand::random::<u32>());
        for (k, v) in vars {
            std::env::set_var(format!("{prefix}{k}"), v);
        }
        Env::prefixed(&prefix)
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::load_from_env(None, &Overrides::default(), env(&[])).unwrap();
        assert_eq!(c.http.port, 8080);
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.coap.port, 5683);
        assert_eq!(c.server.bind.to_string(), "127.0.0.1");
        assert_eq!(c.server.data_dir, PathBuf::from("./stratus-data"));
        assert!(!c.auth.allow_anonymous);
    }

    #[test]
    fn http_limits_have_safe_defaults_and_name_a_bad_key() {
        let h = Config::load_from_env(None, &Overrides::default(), env(&[]))
            .unwrap()
            .http;
        assert_eq!(
            (
                h.header_read_timeout_secs,
                h.idle_timeout_secs,
                h.body_timeout_secs
            ),
            (10, 75, 30)
        );
        assert_eq!(h.body_min_bytes_per_sec, 500);
        assert_eq!(h.max_header_bytes, 16 * 1024);
        assert_eq!(
            (h.max_connections, h.max_connections_per_address),
            (10_000, 128)
        );
        for (var, key) in [
            ("HTTP__IDLE_TIMEOUT_SECS", "http.idle_timeout_secs"),
            (
                "HTTP__MAX_CONNECTIONS_PER_ADDRESS",
                "http.max_connections_per_address",
            ),
            ("HTTP__MAX_HEADER_BYTES", "http.max_header_bytes"),
        ] {
            let err = Config::load_from_env(None, &Overrides::default(), env(&[(var, "0")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratus.toml");
        std::fs::write(
            &file,
            "[mqtt]\nport = 1000\nmax_queued = 7\n[http]\nport = 1001\n[coap]\nport = 1002\n",
        )
        .unwrap();
        let e = env(&[
            ("MQTT__PORT", "2000"),
            ("HTTP__PORT", "2001"),
            ("ADMIN_SECRET", "x"),
        ]);
        let o = Overrides {
            mqtt_port: Some(3000),
            ..Default::default()
        };
        let c = Config::load_from_env(Some(&file), &o, e).unwrap();
        assert_eq!(c.mqtt.port, 3000);
        assert_eq!(c.http.port, 2001);
        assert_eq!(c.coap.port, 1002);
        assert_eq!(c.mqtt.max_queued, 7);
    }

    #[test]
    fn errors_name_the_key() {
        let e = env(&[("MQTT__MAX_PACKET_SIZE", "notanumber")]);
        let err = Config::load_from_env(None, &Overrides::default(), e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_packet_size"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratus.toml");
        std::fs::write(&file, "[mqtt]\nbogus_key = 1\n").unwrap();
        let err = Config::load_from_env(Some(&file), &Overrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus_key"), "{err}");

        let e = env(&[("MQTT__MAX_INFLIGHT", "0")]);
        let err = Config::load_from_env(None, &Overrides::default(), e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mqtt.max_inflight"), "{err}");
    }

    #[test]
    fn failure_retention_takes_whole_and_fractional_days() {
        use std::time::Duration;
        let c = Config::load_from_env(None, &Overrides::default(), env(&[])).unwrap();
        let f = c.audit.failures();
        assert_eq!(f.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!((f.window_ms, f.max_keys), (60_000, 10_000));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratus.toml");
        std::fs::write(&file, "[audit]\nfailure_retention_days = 7\n").unwrap();
        let c = Config::load_from_env(Some(&file), &Overrides::default(), env(&[])).unwrap();
        assert_eq!(
            c.audit.failures().retention,
            Some(Duration::from_secs(7 * 86_400))
        );
        let e = env(&[("AUDIT__FAILURE_RETENTION_DAYS", "0.5")]);
        let c = Config::load_from_env(None, &Overrides::default(), e).unwrap();
        assert_eq!(
            c.audit.failures().retention,
            Some(Duration::from_secs(43_200))
        );
        let e = env(&[("AUDIT__FAILURE_RETENTION_DAYS", "0")]);
        let c = Config::load_from_env(None, &Overrides::default(), e).unwrap();
        assert_eq!(c.audit.failures().retention, None, "0 keeps them forever");
        for (key, value) in [
            ("AUDIT__FAILURE_RETENTION_DAYS", "-1"),
            ("AUDIT__FAILURE_RETENTION_DAYS", "nan"),
            ("AUDIT__FAILURE_WINDOW_SECS", "0"),
            ("AUDIT__FAILURE_MAX_KEYS", "0"),
        ] {
            let err = Config::load_from_env(None, &Overrides::default(), env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&key[7..].to_lowercase()),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn require_encryption_keeps_the_plain_listeners_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratus.toml");
        std::fs::write(&file, "[tls]\nrequire_encryption = true\n").unwrap();
        let err = Config::load_from_env(Some(&file), &Overrides::default(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.require_encryption"), "{err}");

        std::fs::write(
            &file,
            "[tls]\nrequire_encryption = true\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n",
        )
        .unwrap();
        let bound = |bind: &str| {
            let o = Overrides {
                bind: Some(bind.parse().unwrap()),
                ..Default::default()
            };
            let c = Config::load_from_env(Some(&file), &o, env(&[])).unwrap();
            assert!(c.coaps_enabled(), "CoAPS starts");
            (c.plain_bind().to_string(), c.server.bind.to_string())
        };
        assert_eq!(bound("0.0.0.0"), ("127.0.0.1".into(), "0.0.0.0".into()));
        assert_eq!(
            bound("192.168.1.10"),
            ("127.0.0.1".into(), "192.168.1.10".into())
        );
        assert_eq!(bound("::"), ("::1".into(), "::".into()));
        assert_eq!(bound("127.0.0.1"), ("127.0.0.1".into(), "127.0.0.1".into()));

        // Without it nothing moves; HSTS defaults to a year.
        let c = Config::load_from_env(None, &Overrides::default(), env(&[])).unwrap();
        assert_eq!(c.plain_bind(), c.server.bind);
        assert!(!c.coaps_enabled());
        assert_eq!(c.tls.hsts_max_age_secs, 31_536_000);
    }

    #[test]
    fn firmware_keys_come_from_the_file_or_the_flag_and_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let key = stratus_firmware::generate_key().unwrap();
        let pem = dir.path().join("a.pub");
        std::fs::write(
            &pem,
            stratus_firmware::public_key_pem(&key.verifying_key()).unwrap(),
        )
        .unwrap();
        let file = dir.path().join("stratus.toml");
        std::fs::write(
            &file,
            format!("[firmware]\npubkeys = [{:?}]\n", pem.display().to_string()),
        )
        .unwrap();
        let c = Config::load_from_env(Some(&file), &Overrides::default(), env(&[])).unwrap();
        assert_eq!(c.firmware.pubkeys, vec![pem.clone()]);
        assert_eq!(c.firmware.max_image_bytes, 64 * 1024 * 1024);
        let ids: Vec<String> = c
            .firmware
            .trusted_keys()
            .unwrap()
            .ids()
            .map(str::to_string)
            .collect();
        assert_eq!(ids, vec![stratus_firmware::key_id(&key.verifying_key())]);

        let missing = Overrides {
            firmware_pubkeys: vec![dir.path().join("nope.pub")],
            ..Default::default()
        };
        let err = Config::load_from_env(Some(&file), &missing, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("firmware.pubkeys") && err.contains("nope.pub"),
            "{err}"
        );

        let junk = dir.path().join("junk.pub");
        std::fs::write(&junk, "not a key").unwrap();
        let o = Overrides {
            firmware_pubkeys: vec![junk],
            ..Default::default()
        };
        let err = Config::load_from_env(None, &o, env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("firmware.pubkeys"), "{err}");
    }
}

#[cfg(test)]
mod quota_config_tests {
    use super::*;

    #[test]
    fn quota_keys_keep_their_defaults_beside_set_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stratus.toml");
        std::fs::write(
            &file,
            "[mqtt]\nmax_retained_per_client = 3\nmax_retained = 8\n",
        )
        .unwrap();
        let c = Config::load_from_env(
            Some(&file),
            &Overrides::default(),
            figment::providers::Env::prefixed("STRATUS_TEST_NONE_"),
        )
        .unwrap();
        assert_eq!(c.mqtt.max_retained_per_client, 3);
        assert_eq!(c.mqtt.max_retained, 8);
        assert_eq!(c.mqtt.max_retained_bytes_per_client, 16 << 20);
        assert_eq!(c.mqtt.max_retained_bytes, 256 << 20);
    }
}
