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
//! - `rand`: server-assigned client ids.
//! - `smallvec`: per-message subscriber lists without a heap allocation.
//! - `tracing`: structured logs.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod config;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod sys;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::{Config, ConfigError, Overrides};

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// A running server: its bound addresses and the means to stop it.
pub struct Server {
    /// Where the MQTT listener is bound.
    pub mqtt_addr: SocketAddr,
    /// Where the HTTP listener is bound.
    pub http_addr: SocketAddr,
    /// The broker hub (for in-process use and tests).
    pub broker: Arc<broker::Broker>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Binds every listener of `config` and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let bind = config.server.bind;
        let mqtt_listener = TcpListener::bind((bind, config.mqtt.port))
            .await
            .with_context(|| format!("binding MQTT listener on {bind}:{}", config.mqtt.port))?;
        let http_listener = TcpListener::bind((bind, config.http.port))
            .await
            .with_context(|| format!("binding HTTP listener on {bind}:{}", config.http.port))?;
        let mqtt_addr = mqtt_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let metrics = Arc::new(metrics::Metrics::new());
        let broker = Arc::new(broker::Broker::new(config.mqtt.max_queued, metrics));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let ctx = Arc::new(mqtt::MqttContext {
            broker: broker.clone(),
            limits: config.mqtt_limits(),
            allow_anonymous: config.auth.allow_anonymous,
            max_connections: config.mqtt.max_connections,
            open: AtomicUsize::new(0),
            slow_consumer_timeout: Duration::from_secs(config.mqtt.slow_consumer_timeout_secs),
        });
        tasks.spawn(mqtt::serve(mqtt_listener, ctx, shutdown_rx.clone()));
        tasks.spawn(sys::run(
            broker.clone(),
            Duration::from_secs(config.mqtt.sys_interval_secs),
            shutdown_rx.clone(),
        ));
        let app = http::router(broker.clone());
        let mut http_shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            let result = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    crate::stopped(&mut http_shutdown).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "http listener failed");
            }
        });
        Ok(Server {
            mqtt_addr,
            http_addr,
            broker,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, closes every connection (publishing wills as for any server-side close)
    /// and waits up to `grace` for the tasks to finish.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("shutdown grace period over; abandoning remaining tasks");
            self.tasks.abort_all();
        }
    }
}
