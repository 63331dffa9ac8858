//! A real Stratus server in the test process (`stratus_server::Server`, the code `stratus
//! serve` runs) on loopback ports picked by the OS, with a private data dir, restartable on
//! the same ports; and the admin calls the tests need.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use stratus_server::{Config, Server};

pub struct TestServer {
    pub server: Option<Server>,
    pub config: Config,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub mqtts: Option<SocketAddr>,
    pub coap: SocketAddr,
    pub coaps: Option<SocketAddr>,
    pub admin_secret: String,
    pub dir: tempfile::TempDir,
    client: reqwest::Client,
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_, _| {}).await
    }

    /// Starts a server on free ports; `tweak` adjusts the configuration first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> TestServer {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.server.data_dir = dir.path().join("data");
        config.http.port = 0;
        config.mqtt.port = 0;
        config.coap.port = 0;
        config.mqtt.tls_port = 0;
        config.http.tls_port = 0;
        tweak(&mut config, dir.path());
        let server = Server::start(config.clone()).await.expect("server starts");
        let admin_secret = server
            .admin_secret
            .clone()
            .or_else(|| std::env::var("STRATUS_ADMIN_SECRET").ok())
            .expect("a generated admin secret");
        // Restarts bind the same ports.
        config.http.port = server.http_addr.port();
        config.mqtt.port = server.mqtt_addr.port();
        config.coap.port = server.coap_addr.port();
        if let Some(a) = server.coaps_addr {
            config.coap.dtls_port = a.port();
        }
        if let Some(a) = server.mqtts_addr {
            config.mqtt.tls_port = a.port();
        }
        if let Some(a) = server.https_addr {
            config.http.tls_port = a.port();
        }
        TestServer {
            http: server.http_addr,
            mqtt: server.mqtt_addr,
            mqtts: server.mqtts_addr,
            coap: server.coap_addr,
            coaps: server.coaps_addr,
            server: Some(server),
            config,
            admin_secret,
            dir,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn mqtt_url(&self) -> String {
        format!("mqtt://{}", self.mqtt)
    }

    pub fn coap_url(&self) -> String {
        format!("coap://{}", self.coap)
    }

    /// `coaps://…` (the server must have been started with `[coap] dtls` on).
    pub fn coaps_url(&self) -> String {
        format!("coaps://{}", self.coaps.expect("CoAPS is on"))
    }

    /// Rotates a device's secret; the new one.
    pub async fn rotate_secret(&self, id: &str) -> String {
        let admin = self.admin().await;
        let r = self
            .client
            .post(format!("{}/api/v1/devices/{id}/secret", self.url()))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("rotate");
        assert_eq!(r.status().as_u16(), 200, "rotate {id}");
        let v: Value = r.json().await.expect("json");
        v["secret"].as_str().expect("secret").to_string()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.server.data_dir.clone()
    }

    /// Stops the server (connections closed, state flushed).
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(4)).await;
        }
    }

    /// Starts it again on the same ports and data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last = None;
        for _ in 0..50 {
            match Server::start(self.config.clone()).await {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("server did not restart: {last:?}");
    }

    pub async fn token(&self, id: &str, secret: &str) -> String {
        let r = self
            .client
            .post(format!("{}/oauth/token", self.url()))
            .basic_auth(id, Some(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .expect("token request");
        assert!(r.status().is_success(), "token: {}", r.status());
        let v: Value = r.json().await.expect("token json");
        v["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    pub async fn admin(&self) -> String {
        self.token("admin", &self.admin_secret).await
    }

    /// Registers a device; its secret.
    pub async fn add_device(&self, id: &str) -> String {
        let admin = self.admin().await;
        let r = self
            .client
            .post(format!("{}/api/v1/devices", self.url()))
            .bearer_auth(&admin)
            .json(&json!({"id": id}))
            .send()
            .await
            .expect("register");
        assert_eq!(r.status().as_u16(), 201, "register {id}");
        let v: Value = r.json().await.expect("json");
        v["secret"].as_str().expect("secret").to_string()
    }

    /// Every stored point of one series, in time order: (ts, value).
    pub async fn points(&self, id: &str, key: &str) -> Vec<(i64, Value)> {
        let admin = self.admin().await;
        let mut out = Vec::new();
        let mut after: Option<i64> = None;
        loop {
            let mut url = format!(
                "{}/api/v1/devices/{id}/telemetry?key={key}&limit=10000",
                self.url()
            );
            if let Some(a) = after {
                url.push_str(&format!("&after={a}"));
            }
            let r = self
                .client
                .get(url)
                .bearer_auth(&admin)
                .send()
                .await
                .expect("query");
            assert!(r.status().is_success(), "query: {}", r.status());
            let v: Value = r.json().await.expect("json");
            for p in v["points"].as_array().cloned().unwrap_or_default() {
                out.push((p["ts"].as_i64().unwrap_or(0), p["value"].clone()));
            }
            match v["next"].as_i64() {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
    }

    pub async fn put_config(&self, id: &str, config: Value) -> Value {
        let admin = self.admin().await;
        let r = self
            .client
            .put(format!("{}/api/v1/devices/{id}/config", self.url()))
            .bearer_auth(&admin)
            .json(&config)
            .send()
            .await
            .expect("put config");
        assert!(r.status().is_success(), "put config: {}", r.status());
        r.json().await.expect("json")
    }

    pub async fn device_view(&self, id: &str) -> Value {
        let admin = self.admin().await;
        let r = self
            .client
            .get(format!("{}/api/v1/devices/{id}", self.url()))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("get device");
        assert!(r.status().is_success(), "get device: {}", r.status());
        r.json().await.expect("json")
    }
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
