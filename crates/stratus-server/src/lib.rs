//! # stratus-server
//!
//! The Stratus server process: it binds the listeners, wires the sans-IO protocol cores
//! (`stratus-mqtt`) to sockets and timers on tokio, keeps the broker hub that routes messages
//! between connections, and serves the HTTP API.
//!
//! A message's path: socket bytes → [`mqtt`] connection task → `stratus_mqtt::Connection`
//! (decode, QoS flow) → [`broker::Broker::publish`] (retained store, subscription tree) →
//! each subscriber's mailbox → that subscriber's connection task → its socket. See
//! `ARCHITECTURE.md` at the repository root.
//!
//! ## Dependencies
//! - `tokio`: the async runtime; one task per connection, no router thread.
//! - `axum`: the HTTP server (small, composable, built on hyper).
//! - `figment` + `serde`: layered configuration (defaults, TOML file, environment) whose errors
//!   name the offending key.
//! - `parking_lot`: small, fast locks for the short critical sections of routing.
//! - `prometheus-client`: the official Prometheus/OpenMetrics client for `/metrics`.
//! - `mio`, `slab`: the parking lot of idle MQTT connections (see `mqtt::parking`): one epoll
//!   set and one slab for thousands of quiet sockets, instead of a task and a tokio
//!   registration each (mio is what tokio itself is built on).
//! - `rand`: server-assigned client ids.
//! - `smallvec`: per-message subscriber lists without a heap allocation.
//! - `tracing`: structured logs.
//! - `stratus-coap`: the sans-IO CoAP endpoint behind the [`coap`] listeners.
//! - `openssl`: DTLS 1.2 PSK for CoAPS (rustls has no DTLS; see [`coap::dtls`] for why
//!   OpenSSL rather than a pure-Rust DTLS).
//! - `cel`, `reqwest`: rule conditions and webhooks (see [`rules`] for why these).
//! - `tokio-stream`: the broadcast-to-stream adapter behind `GET /api/v1/stream`.
//! - `socket2`: the socket options tokio does not expose (multicast groups, shared ports,
//!   receive buffer size) for the CoAP sockets.
//! - `stratus-firmware`: what a valid signed firmware is, shared with the CLI and the device
//!   SDK (see [`firmware`]).
//! - `multer`: streaming `multipart/form-data` parsing for firmware uploads (the parser behind
//!   axum's own `Multipart`, used directly so the image streams to disk under its own size
//!   limit instead of the API's body limit).
//! - `hyper`, `hyper-util`: the HTTP/1 connections under axum, driven by our own accept loop
//!   ([`http::listener`]) for its connection caps and timers.
//! - `rustix`: `RLIMIT_NOFILE`, raised at start ([`accept`]) — safe wrappers over the
//!   syscalls, already used by the binary.

// One audited exception, with its proof: registering the parking lot's epoll fd in
// `mqtt::parking`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod acl;
pub mod api;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod coap;
pub mod config;
pub mod dashboard;
pub mod data_dir;
pub mod events;
pub mod firmware;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod mqtt;
pub mod persist;
pub mod pipeline;
pub mod policy;
pub mod rate;
pub mod reported;
pub mod rules;
pub mod sys;
pub mod tls;
pub mod transport;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

pub use config::{Config, ConfigError, Overrides};

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// A running server: its bound addresses and the means to stop it.
pub struct Server {
    /// The admin secret when this start generated it (printed once; also in
    /// `DATA_DIR/admin-secret`).
    pub admin_secret: Option<String>,
    /// Credentials and tokens.
    pub auth: Arc<auth::Auth>,
    /// Where the MQTT listener is bound.
    pub mqtt_addr: SocketAddr,
    /// Where the HTTP listener is bound (MQTT over WebSocket at `/mqtt` too).
    pub http_addr: SocketAddr,
    /// Where the MQTTS listener is bound, when `[tls]` is configured.
    pub mqtts_addr: Option<SocketAddr>,
    /// Where the HTTPS listener is bound (WSS at `/mqtt`), when `[tls]` is configured.
    pub https_addr: Option<SocketAddr>,
    /// Where the CoAP (UDP) listener is bound.
    pub coap_addr: SocketAddr,
    /// Where the CoAPS (DTLS 1.2 PSK) listener is bound, when `[coap] dtls` is on.
    pub coaps_addr: Option<SocketAddr>,
    /// The broker hub (for in-process use and tests).
    pub broker: Arc<broker::Broker>,
    /// The rules engine (rules, alarms, device connectivity).
    pub rules: Arc<rules::Rules>,
    /// The firmware service.
    pub firmware: Arc<firmware::Firmware>,
    /// The audit log's head exporter.
    pub audit_heads: Arc<audit::AuditHeads>,
    /// Failed logins, aggregated before they reach the audit log.
    pub failures: Arc<audit::failures::FailureLog>,
    shutdown: watch::Sender<bool>,
    listeners: JoinSet<()>,
    connections: TaskTracker,
}

/// Who a stored session belongs to and what it may receive while it waits: its recorded owner
/// (a session stored before owners were recorded belongs to the device whose id it has, else
/// to the first principal allowed to use its id), and that owner's access now.
fn restored_owner(
    auth: &auth::Auth,
    client_id: &str,
    owner: broker::Owner,
) -> (broker::Owner, broker::Access) {
    use broker::{Access, Owner};
    let owner = match owner {
        Owner::Legacy if auth.is_device(client_id) => Owner::Device(client_id.into()),
        o => o,
    };
    let access = match &owner {
        Owner::Device(_) => Access::Device,
        Owner::Client(id) => auth.principal(id).map_or(Access::NoDevices, |p| {
            policy::Policy::for_principal(&p).access()
        }),
        Owner::Certificate(_) => Access::Full,
        Owner::Anonymous | Owner::Legacy => Access::NoDevices,
    };
    (owner, access)
}

async fn bind(what: &str, addr: std::net::IpAddr, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((addr, port))
        .await
        .with_context(|| format!("binding {what} listener on {addr}:{port}"))
}

impl Server {
    /// Binds every listener of `config` and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let fds = accept::FdBudget {
            limit: accept::raise_fd_limit(),
        };
        // TLS listeners on `server.bind`; the plain ones there too, or on loopback only under
        // `[tls] require_encryption`.
        let ip = config.server.bind;
        let plain_ip = config.plain_bind();
        if plain_ip != ip {
            tracing::info!(
                plain = %plain_ip,
                tls = %ip,
                "tls.require_encryption: plain MQTT, HTTP and CoAP serve this host only"
            );
        }
        let mqtt_listener = bind("MQTT", plain_ip, config.mqtt.port).await?;
        let http_listener = bind("HTTP", plain_ip, config.http.port).await?;
        let tls = if config.tls.enabled() {
            let mqtts = tls::acceptor(&config.tls, &[])?;
            let https = tls::acceptor(&config.tls, &[b"http/1.1"])?;
            let mqtts_listener = bind("MQTTS", ip, config.mqtt.tls_port).await?;
            let https_listener = bind("HTTPS", ip, config.http.tls_port).await?;
            Some((mqtts, mqtts_listener, https, https_listener))
        } else {
            None
        };

        let coap_socket = coap::bind_udp(plain_ip, config.coap.port, config.coap.multicast)
            .with_context(|| format!("binding CoAP listener on {plain_ip}:{}", config.coap.port))?;
        let coaps_socket = if config.coaps_enabled() {
            Some(
                coap::bind_udp(ip, config.coap.dtls_port, false).with_context(|| {
                    format!("binding CoAPS listener on {ip}:{}", config.coap.dtls_port)
                })?,
            )
        } else {
            None
        };

        let metrics = Arc::new(metrics::Metrics::new());
        let data_dir = &config.server.data_dir;
        let secured = crate::data_dir::secure(data_dir)
            .with_context(|| format!("securing the data dir {}", data_dir.display()))?;
        crate::data_dir::warn_about(data_dir, &secured);
        let (persistence, snapshot) =
            persist::Persistence::open_with(data_dir, config.telemetry.max_series_per_device)
                .with_context(|| format!("opening the store in {}", data_dir.display()))?;
        let broker = Arc::new(
            broker::Broker::with_persistence(config.mqtt.max_queued, metrics, persistence)
                .with_retain_quota(broker::RetainQuota {
                    per_client: config.mqtt.max_retained_per_client,
                    per_client_bytes: config.mqtt.max_retained_bytes_per_client,
                    total: config.mqtt.max_retained,
                    total_bytes: config.mqtt.max_retained_bytes,
                }),
        );
        let (store, audit_key) = broker
            .persistence()
            .map(|p| (p.store().clone(), p.audit_key().clone()))
            .context("the broker has no store")?;
        let audit_heads = Arc::new(audit::AuditHeads::open(store.clone(), audit_key, data_dir));
        let failures = Arc::new(audit::failures::FailureLog::new(
            store.clone(),
            config.audit.failures(),
        ));
        let auth = Arc::new(
            auth::Auth::open(store.clone(), data_dir)
                .await
                .context("loading identities")?
                .with_token_ttl(config.auth.token_ttl_secs)
                .with_throttle(config.auth.throttle),
        );
        let restored = broker.restore(snapshot, |client_id, owner| {
            restored_owner(&auth, client_id, owner)
        });
        tracing::info!(
            sessions = restored.len(),
            retained = broker.retained_count(),
            "broker state restored"
        );
        for r in restored {
            if let Some((will, delay)) = r.will {
                broker.schedule_will(r.handle.clone(), r.conn, will, delay);
            }
            if let Some(after) = r.expires_in {
                broker.schedule_expiry(r.handle, r.conn, after);
            }
        }
        let revoked = store.revoked_tokens().await?;
        auth.load_revocations(
            revoked
                .into_iter()
                .map(|(jti, exp_ms)| (jti, (exp_ms / 1000).max(0) as u64))
                .collect(),
        )
        .await;
        let admin_secret = auth
            .bootstrap_admin(data_dir, std::env::var("STRATUS_ADMIN_SECRET").ok())
            .await
            .context("creating the admin client")?;
        let rules = Arc::new(rules::Rules::new(
            store.clone(),
            broker.clone(),
            config.rules.clone(),
        ));
        rules.load().await.context("loading rules and alarms")?;
        let pipeline = Arc::new(
            pipeline::Pipeline::new(store.clone(), broker.clone(), config.telemetry.clone())
                .with_rules(rules.clone()),
        );
        pipeline
            .load_device_policies()
            .await
            .context("loading the devices' freshness policies")?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut listeners = JoinSet::new();
        let connections = TaskTracker::new();

        let ctx = Arc::new(mqtt::MqttContext {
            broker: broker.clone(),
            limits: Arc::new(config.mqtt_limits()),
            allow_anonymous: config.auth.allow_anonymous,
            max_connections: fds.mqtt_max_connections(config.mqtt.max_connections),
            open: AtomicUsize::new(0),
            slow_consumer_timeout: Duration::from_secs(config.mqtt.slow_consumer_timeout_secs),
            acl: acl::Acl::new(config.mqtt.acl.clone()),
            auth: auth.clone(),
            failures: failures.clone(),
            pipeline: pipeline.clone(),
            device_client_ids: config.mqtt.device_client_ids,
            credentials: Arc::new(mqtt::CredentialWatch::new()),
            quotas: mqtt::Quotas::new(
                config.mqtt.max_subscriptions,
                config.mqtt.max_connections_per_principal,
                config.mqtt.max_connections_per_address,
            ),
        });
        listeners.spawn(
            ctx.credentials
                .clone()
                .run(auth.clone(), shutdown_rx.clone()),
        );
        let mqtt_addr = mqtt_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        listeners.spawn(mqtt::serve(
            mqtt_listener,
            ctx.clone(),
            None,
            connections.clone(),
            shutdown_rx.clone(),
        ));
        listeners.spawn(
            pipeline
                .clone()
                .run_housekeeping(Duration::from_secs(300), shutdown_rx.clone()),
        );
        listeners.spawn(rules.clone().run(shutdown_rx.clone()));
        listeners.spawn(audit_heads.clone().run(
            Duration::from_secs(config.audit.head_interval_secs),
            shutdown_rx.clone(),
        ));
        listeners.spawn(failures.clone().run(shutdown_rx.clone()));
        listeners.spawn(sys::run(
            broker.clone(),
            Duration::from_secs(config.mqtt.sys_interval_secs),
            shutdown_rx.clone(),
        ));
        // Devices download over HTTPS when plain HTTP is not theirs to use.
        let (scheme, mut addr) = match &tls {
            Some((_, _, _, https)) if config.tls.require_encryption => {
                ("https", https.local_addr()?)
            }
            _ => ("http", http_addr),
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let firmware_base = config
            .firmware
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}"));
        let firmware = Arc::new(
            firmware::Firmware::open(
                store.clone(),
                broker.clone(),
                data_dir,
                config.firmware.trusted_keys()?,
                config.firmware.max_image_bytes,
                firmware_base.trim_end_matches('/').to_string(),
            )
            .context("creating the firmware directory")?,
        );
        let api_state = api::ApiState {
            firmware: Some(firmware.clone()),
            broker: broker.clone(),
            store: store.clone(),
            auth: auth.clone(),
            failures: failures.clone(),
            ingest: pipeline.clone(),
            max_body: config.http.max_body_bytes,
            audit_heads: Some(audit_heads.clone()),
        };
        let app = http::router(http::AppState {
            broker: broker.clone(),
            mqtt: ctx.clone(),
            tasks: connections.clone(),
            shutdown: shutdown_rx.clone(),
            api: api_state,
        });
        let http_limits =
            http::listener::Limits::new(&config.http, fds, if tls.is_some() { 2 } else { 1 });
        if ctx.max_connections < config.mqtt.max_connections
            || http_limits.max_connections < config.http.max_connections
        {
            tracing::info!(
                fd_limit = fds.limit,
                mqtt_max_connections = ctx.max_connections,
                http_max_connections = http_limits.max_connections,
                http_max_connections_per_address = http_limits.max_per_address,
                "connection caps lowered to fit the file descriptor limit"
            );
        }
        let admission = http::listener::Admission::new(http_limits, broker.metrics.clone());
        let (mut mqtts_addr, mut https_addr) = (None, None);
        if let Some((mqtts, mqtts_listener, https, https_listener)) = tls {
            mqtts_addr = Some(mqtts_listener.local_addr()?);
            https_addr = Some(https_listener.local_addr()?);
            listeners.spawn(mqtt::serve(
                mqtts_listener,
                ctx.clone(),
                Some(mqtts),
                connections.clone(),
                shutdown_rx.clone(),
            ));
            listeners.spawn(http::listener::serve(
                "https",
                https_listener,
                Some(https),
                http::with_hsts(app.clone(), config.tls.hsts_max_age_secs),
                admission.clone(),
                connections.clone(),
                shutdown_rx.clone(),
            ));
        }
        let coap_ctx = Arc::new(coap::CoapContext {
            auth: auth.clone(),
            failures: failures.clone(),
            pipeline: pipeline.clone(),
            store: store.clone(),
            broker: broker.clone(),
            config: config.coap.clone(),
            firmware: firmware.clone(),
        });
        let coap_addr = coap_socket.local_addr()?;
        if config.coap.multicast {
            match coap::bind_multicast(coap_addr.ip(), coap_addr.port()) {
                Ok(sockets) => {
                    for s in sockets {
                        listeners.spawn(coap::serve(
                            s,
                            coap_ctx.clone(),
                            coap::Mode::Multicast,
                            shutdown_rx.clone(),
                        ));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "CoAP multicast (224.0.1.187) unavailable"),
            }
        }
        listeners.spawn(coap::serve(
            coap_socket,
            coap_ctx.clone(),
            coap::Mode::Plain,
            shutdown_rx.clone(),
        ));
        let mut coaps_addr = None;
        if let Some(socket) = coaps_socket {
            coaps_addr = Some(socket.local_addr()?);
            let dtls = coap::dtls::DtlsServer::new(auth.clone(), config.coap.max_dtls_sessions)
                .context("setting up DTLS")?;
            listeners.spawn(coap::serve(
                socket,
                coap_ctx,
                coap::Mode::Dtls(dtls),
                shutdown_rx.clone(),
            ));
        }
        listeners.spawn(http::listener::serve(
            "http",
            http_listener,
            None,
            app,
            admission,
            connections.clone(),
            shutdown_rx.clone(),
        ));
        Ok(Server {
            admin_secret,
            auth,
            mqtt_addr,
            http_addr,
            mqtts_addr,
            https_addr,
            coap_addr,
            coaps_addr,
            broker,
            rules,
            firmware,
            audit_heads,
            failures,
            shutdown,
            listeners,
            connections,
        })
    }

    /// Stops accepting, closes every connection (publishing wills as for any server-side close)
    /// and waits up to `grace` for the tasks to finish.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        self.connections.close();
        let connections = self.connections.clone();
        let all = async {
            while self.listeners.join_next().await.is_some() {}
            connections.wait().await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("shutdown grace period over; abandoning remaining tasks");
            self.listeners.abort_all();
        }
        // Whatever the closing connections changed (parked sessions) reaches the disk.
        if let Err(e) = self.broker.flush().await {
            tracing::error!(error = %e, "final store flush failed");
        }
        // The failed logins of the open window (errors are logged by the flush).
        let _ = self.failures.flush_all().await;
        // The head of everything written, for `stratus audit verify` to hold the log to.
        if let Err(e) = self.audit_heads.export().await {
            tracing::error!(error = %e, "could not export the audit head at shutdown");
        }
    }
}
