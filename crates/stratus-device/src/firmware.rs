//! Over-the-air updates on the device side: given an assignment notice (from the retained
//! `devices/{id}/firmware` MQTT message, CoAP `GET /firmware` or HTTP
//! `GET /api/v1/devices/{id}/firmware`), [`FirmwareUpdater::apply`]
//!
//! 1. checks the manifest before downloading anything: signed by a trusted key, for this
//!    hardware (or any), newer than the installed version — otherwise it reports `failed`
//!    with the reason and refuses;
//! 2. reports `downloading` and downloads the image to `DIR/<id>.part`, hashing as it
//!    writes: over HTTP with `Range` requests that resume where a dropped connection left off
//!    (`If-Range` with the firmware's ETag), or over CoAP with Block2 blocks of 1024 bytes
//!    read one by one (each retried on its own);
//! 3. verifies size, SHA-256 and signature (`stratus-firmware`, the same code as the server)
//!    and reports `verified` — a tampered image is reported `failed` and removed;
//! 4. hands the verified file to the install callback, then reports `installed` (or `failed`
//!    with the callback's reason) and remembers the new version.
//!
//! A notice for the version already installed (the retained notice again after a reconnect)
//! is a no-op. [`FirmwareUpdater::handler`] plugs an updater into
//! [`DeviceBuilder::firmware_handler`](crate::DeviceBuilder::firmware_handler) so MQTT
//! notices are applied on their own.
//!
//! Reports go over the transport used for the download: HTTP
//! `POST /api/v1/devices/{id}/firmware` or CoAP `POST /firmware/status` — unless the updater
//! is tied to an MQTT [`Device`](crate::Device) with [`FirmwareUpdater::report_over`]: then
//! they are published (QoS 1, JSON `{"firmware", "status", "reason"}`) on
//! `devices/{id}/firmware/status` over the device's own connection, and go over HTTP/CoAP
//! only when that connection is down or does not acknowledge within 10 s.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use stratus_coap::{BlockOption, Code, Request};
use stratus_firmware::{ImageHasher, Policy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

pub use stratus_firmware::{
    parse_public_key, Manifest, TrustedKeys, VerifyError, VerifyingKey, Version,
};

use crate::token::{TokenError, Tokens};

/// How long a status report waits for its MQTT PUBACK before going over HTTP/CoAP instead.
const MQTT_REPORT_WAIT: Duration = Duration::from_secs(10);

/// Attempts at a download (HTTP: requests; CoAP: per block) before giving up.
const ATTEMPTS: u32 = 8;
/// CoAP block size exponent: 1024-byte blocks.
const BLOCK_SZX: u8 = 6;

/// An assignment notice, as the server publishes it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FirmwareNotice {
    /// The firmware id (the image's SHA-256).
    pub firmware: String,
    /// The campaign, if any.
    #[serde(default)]
    pub campaign: Option<String>,
    /// The signed manifest.
    pub manifest: Manifest,
    /// The HTTP download URL.
    pub url: String,
    /// The CoAP path of the image.
    pub coap: String,
}

impl FirmwareNotice {
    /// Parses a notice (the MQTT payload, or what a [`FirmwareHandler`](crate::FirmwareHandler)
    /// receives).
    pub fn from_json(value: &serde_json::Value) -> Result<FirmwareNotice, FirmwareError> {
        serde_json::from_value(value.clone())
            .map_err(|e| FirmwareError::Notice(format!("unreadable firmware notice: {e}")))
    }
}

/// How the image is downloaded (and the status reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareTransport {
    /// HTTP `GET` of the notice's `url`, resumed with `Range`.
    Http,
    /// CoAP Block2 `GET` of the notice's `coap` path from this server.
    Coap(SocketAddr),
}

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareError {
    /// The notice is malformed.
    #[error("{0}")]
    Notice(String),
    /// The manifest or the image failed verification (bad signature, unknown key, wrong
    /// hardware, downgrade, size or hash mismatch); reported as `failed`.
    #[error("refused: {0}")]
    Refused(#[from] VerifyError),
    /// The image could not be downloaded after several attempts.
    #[error("download failed: {0}")]
    Download(String),
    /// The install callback failed (its reason).
    #[error("install failed: {0}")]
    Install(String),
    /// The server refused the device's credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A local file could not be written.
    #[error("{0}")]
    Io(String),
}

impl FirmwareError {
    /// The verification failure, if that is what this is.
    pub fn verify_error(&self) -> Option<&VerifyError> {
        match self {
            FirmwareError::Refused(e) => Some(e),
            _ => None,
        }
    }
}

/// A status report queued for the MQTT connection, and who waits for its acknowledgement
/// (`Ok` on PUBACK success, `Err` with the reason on a refusal).
pub(crate) struct StatusJob {
    pub payload: Vec<u8>,
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// A device's MQTT connection as a way to send firmware status reports (from
/// [`Device::firmware_status_link`](crate::Device::firmware_status_link)).
#[derive(Clone)]
pub struct StatusLink {
    shared: std::sync::Weak<crate::Shared>,
}

impl std::fmt::Debug for StatusLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusLink").finish_non_exhaustive()
    }
}

/// Why a report did not go over MQTT.
enum MqttReport {
    /// The device is gone, not connected, or did not get an answer in time: try HTTP/CoAP.
    Unavailable,
    /// The server refused it (an MQTT 5 PUBACK error code).
    Refused(String),
}

impl StatusLink {
    pub(crate) fn new(shared: std::sync::Weak<crate::Shared>) -> StatusLink {
        StatusLink { shared }
    }

    /// Publishes `body` on `devices/{id}/firmware/status` and waits for the PUBACK.
    async fn send(&self, body: &serde_json::Value) -> Result<(), MqttReport> {
        let rx = {
            let Some(shared) = self.shared.upgrade() else {
                return Err(MqttReport::Unavailable);
            };
            if shared.cancel.is_cancelled() || *shared.status.borrow() != crate::Status::Connected {
                return Err(MqttReport::Unavailable);
            }
            let (done, rx) = tokio::sync::oneshot::channel();
            shared.firmware_status.lock().push_back(StatusJob {
                payload: body.to_string().into_bytes(),
                done,
            });
            shared.wake.notify_one();
            rx
        };
        match tokio::time::timeout(MQTT_REPORT_WAIT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(MqttReport::Refused(why)),
            // Dropped unsent (the device closed) or no PUBACK in time.
            Ok(Err(_)) | Err(_) => Err(MqttReport::Unavailable),
        }
    }
}

/// Downloads, verifies and installs firmware for one device (see the module docs).
pub struct FirmwareUpdater {
    id: String,
    http: reqwest::Client,
    base: String,
    tokens: Tokens,
    trusted: TrustedKeys,
    hardware: Option<String>,
    installed: Mutex<Option<Version>>,
    dir: PathBuf,
    cancel: CancellationToken,
    /// One update at a time.
    busy: tokio::sync::Mutex<()>,
    /// The MQTT device connection reports go over first, if any.
    mqtt: Mutex<Option<StatusLink>>,
}

/// Builds a [`FirmwareUpdater`].
pub struct FirmwareUpdaterBuilder {
    server: String,
    id: String,
    secret: String,
    trusted: TrustedKeys,
    hardware: Option<String>,
    installed: Option<String>,
    dir: PathBuf,
}

impl FirmwareUpdaterBuilder {
    /// Trusts firmware signed by `key` (at least one key is needed).
    pub fn trusted_key(mut self, key: VerifyingKey) -> Self {
        self.trusted.add(key);
        self
    }

    /// Trusts the public key in `pem_or_base64` (a `firmware.pub` file's text).
    pub fn trusted_key_text(mut self, pem_or_base64: &str) -> Result<Self, crate::Error> {
        let key = parse_public_key(pem_or_base64)
            .map_err(|e| crate::Error::config("trusted_key_text", e.to_string()))?;
        self.trusted.add(key);
        Ok(self)
    }

    /// This device's hardware id: firmware for other hardware is refused.
    pub fn hardware(mut self, hardware: impl Into<String>) -> Self {
        self.hardware = Some(hardware.into());
        self
    }

    /// The version running now: only newer firmware is accepted.
    pub fn installed_version(mut self, version: impl Into<String>) -> Self {
        self.installed = Some(version.into());
        self
    }

    /// Where images are downloaded to [default: the system temp dir].
    pub fn download_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// The updater.
    pub fn build(self) -> Result<FirmwareUpdater, crate::Error> {
        if self.trusted.is_empty() {
            return Err(crate::Error::config(
                "trusted_key",
                "no trusted firmware key: every firmware would be refused",
            ));
        }
        let installed = match &self.installed {
            Some(v) => Some(
                Version::parse(v)
                    .map_err(|e| crate::Error::config("installed_version", e.to_string()))?,
            ),
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .user_agent(concat!("stratus-device/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::Error::config("server", e.to_string()))?;
        let base = self.server.trim_end_matches('/').to_string();
        Ok(FirmwareUpdater {
            tokens: Tokens::new(http.clone(), &base, &self.id, &self.secret),
            id: self.id,
            http,
            base,
            trusted: self.trusted,
            hardware: self.hardware,
            installed: Mutex::new(installed),
            dir: self.dir,
            cancel: CancellationToken::new(),
            busy: tokio::sync::Mutex::new(()),
            mqtt: Mutex::new(None),
        })
    }
}

fn token_error(e: TokenError) -> FirmwareError {
    match e {
        TokenError::Refused(why) => FirmwareError::Unauthorized(why),
        TokenError::Unavailable(why) => FirmwareError::Download(why),
    }
}

impl FirmwareUpdater {
    /// An updater for device `id` of the server at `server` (its HTTP base URL).
    pub fn builder(
        server: impl Into<String>,
        id: impl Into<String>,
        secret: impl Into<String>,
    ) -> FirmwareUpdaterBuilder {
        FirmwareUpdaterBuilder {
            server: server.into(),
            id: id.into(),
            secret: secret.into(),
            trusted: TrustedKeys::new(),
            hardware: None,
            installed: None,
            dir: std::env::temp_dir(),
        }
    }

    /// The version installed, as far as this updater knows.
    pub fn installed_version(&self) -> Option<Version> {
        self.installed.lock().clone()
    }

    fn policy(&self) -> Policy {
        Policy {
            hardware: self.hardware.clone(),
            installed: self.installed_version(),
        }
    }

    /// The device's current notice over HTTP (`None` without an assignment).
    pub async fn poll_notice(&self) -> Result<Option<FirmwareNotice>, FirmwareError> {
        let token = self.tokens.get().await.map_err(token_error)?;
        let r = self
            .http
            .get(format!("{}/api/v1/devices/{}/firmware", self.base, self.id))
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| FirmwareError::Download(e.to_string()))?;
        match r.status().as_u16() {
            200 => {
                let v: serde_json::Value = r
                    .json()
                    .await
                    .map_err(|e| FirmwareError::Notice(e.to_string()))?;
                FirmwareNotice::from_json(&v).map(Some)
            }
            404 => Ok(None),
            401 => {
                self.tokens.invalidate(&token);
                Err(FirmwareError::Unauthorized(
                    "the server refused the token".into(),
                ))
            }
            s => Err(FirmwareError::Download(format!("the server answered {s}"))),
        }
    }

    /// Sends the status reports over `device`'s MQTT connection from now on (see the module
    /// docs); a device on HTTP or CoAP changes nothing. Returns whether it will.
    pub fn report_over(&self, device: &crate::Device) -> bool {
        let link = device.firmware_status_link();
        let over_mqtt = link.is_some();
        *self.mqtt.lock() = link;
        over_mqtt
    }

    /// Reports a state (`downloading`, `verified`, `installed`, `failed`) about `firmware`:
    /// over the MQTT device given to [`report_over`](Self::report_over) when it is connected,
    /// otherwise over `via`.
    pub async fn report(
        &self,
        via: FirmwareTransport,
        firmware: &str,
        state: &str,
        reason: Option<&str>,
    ) -> Result<(), FirmwareError> {
        let body = json!({"firmware": firmware, "status": state, "reason": reason});
        let link = self.mqtt.lock().clone();
        if let Some(link) = link {
            match link.send(&body).await {
                Ok(()) => return Ok(()),
                Err(MqttReport::Refused(why)) => {
                    return Err(FirmwareError::Download(format!(
                        "the status report was refused ({why})"
                    )))
                }
                Err(MqttReport::Unavailable) => {
                    tracing::debug!(device = %self.id, "MQTT is down; reporting {state} over {via:?}")
                }
            }
        }
        for _ in 0..3 {
            let token = self.tokens.get().await.map_err(token_error)?;
            let status = match via {
                FirmwareTransport::Http => self
                    .http
                    .post(format!("{}/api/v1/devices/{}/firmware", self.base, self.id))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string()),
                FirmwareTransport::Coap(peer) => {
                    let mut request = Request::new(Code::POST, "/firmware/status")
                        .with_payload(body.to_string().into_bytes());
                    crate::coap::add_token(&mut request.options, &token);
                    match self.coap_exchange(peer, request).await {
                        Ok(m) if m.code.is_success() => Ok(200),
                        Ok(m) if m.code == Code::UNAUTHORIZED => Ok(401),
                        Ok(m) => Ok(u16::from(m.code.class()) * 100 + u16::from(m.code.detail())),
                        Err(e) => Err(e),
                    }
                }
            };
            match status {
                Ok(s) if (200..300).contains(&s) => return Ok(()),
                Ok(401) => self.tokens.invalidate(&token),
                Ok(s) => {
                    return Err(FirmwareError::Download(format!(
                        "the status report was refused ({s})"
                    )))
                }
                Err(e) => {
                    tracing::warn!(device = %self.id, error = %e, "firmware status report failed")
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(FirmwareError::Download(format!(
            "could not report {state} for {firmware}"
        )))
    }

    async fn fail(
        &self,
        via: FirmwareTransport,
        firmware: &str,
        e: FirmwareError,
    ) -> FirmwareError {
        let reason = e.to_string();
        if let Err(r) = self.report(via, firmware, "failed", Some(&reason)).await {
            tracing::warn!(device = %self.id, error = %r, "cannot report the failure");
        }
        tracing::warn!(device = %self.id, firmware, "firmware update failed: {reason}");
        e
    }

    /// Applies `notice`: check, download over `via`, verify, `install`, report (see the
    /// module docs). Returns the version now installed.
    pub async fn apply<F>(
        &self,
        notice: &FirmwareNotice,
        via: FirmwareTransport,
        install: F,
    ) -> Result<Version, FirmwareError>
    where
        F: FnOnce(&Path, &Manifest) -> Result<(), String>,
    {
        let _one_at_a_time = self.busy.lock().await;
        let m = &notice.manifest;
        let id = notice.firmware.as_str();
        // The retained notice comes again after every reconnect: what is installed is done.
        if let (Ok(offered), Some(installed)) = (m.parsed_version(), self.installed_version()) {
            if offered == installed {
                tracing::debug!(device = %self.id, firmware = id, "firmware already installed");
                return Ok(installed);
            }
        }
        if m.sha256 != notice.firmware || !is_firmware_id(id) {
            let e = FirmwareError::Notice("the notice's firmware id is not its sha256".into());
            return Err(self.fail(via, id, e).await);
        }
        // Before a byte is downloaded: signature, hardware, version.
        let checked = stratus_firmware::verify_signature(m, &self.trusted)
            .map(|_| ())
            .and_then(|()| self.policy().check(m));
        if let Err(e) = checked {
            return Err(self.fail(via, id, e.into()).await);
        }
        let version = m
            .parsed_version()
            .map_err(|e| FirmwareError::Refused(e.into()))?;
        self.report(via, id, "downloading", None).await?;
        let part = self.dir.join(format!("{id}.part"));
        let downloaded = match via {
            FirmwareTransport::Http => self.download_http(notice, &part).await,
            FirmwareTransport::Coap(peer) => self.download_coap(notice, peer, &part).await,
        };
        let digest = match downloaded {
            Ok(d) => d,
            Err(e) => return Err(self.fail(via, id, e).await),
        };
        if let Err(e) = stratus_firmware::verify(m, &digest, &self.trusted, &self.policy()) {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(self.fail(via, id, e.into()).await);
        }
        self.report(via, id, "verified", None).await?;
        if let Err(why) = install(&part, m) {
            return Err(self.fail(via, id, FirmwareError::Install(why)).await);
        }
        let _ = tokio::fs::remove_file(&part).await;
        *self.installed.lock() = Some(version.clone());
        self.report(via, id, "installed", None).await?;
        tracing::info!(device = %self.id, firmware = id, version = %version, "firmware installed");
        Ok(version)
    }

    /// Hashes what an earlier attempt left in `part`, to resume after it.
    async fn resume_state(
        &self,
        part: &Path,
        size: u64,
    ) -> Result<(tokio::fs::File, ImageHasher), FirmwareError> {
        let io = |e: std::io::Error| FirmwareError::Io(format!("{}: {e}", part.display()));
        let mut hasher = ImageHasher::new();
        if let Ok(mut f) = tokio::fs::File::open(part).await {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        if hasher.size() > size {
            let _ = tokio::fs::remove_file(part).await;
            hasher = ImageHasher::new();
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .await
            .map_err(io)?;
        Ok((file, hasher))
    }

    async fn download_http(
        &self,
        notice: &FirmwareNotice,
        part: &Path,
    ) -> Result<stratus_firmware::ImageDigest, FirmwareError> {
        let size = notice.manifest.size;
        let io = |e: std::io::Error| FirmwareError::Io(format!("{}: {e}", part.display()));
        let (mut file, mut hasher) = self.resume_state(part, size).await?;
        let mut failures = 0;
        let mut last_error = String::new();
        while hasher.size() < size {
            if failures >= ATTEMPTS {
                return Err(FirmwareError::Download(format!(
                    "{failures} attempts failed; last: {last_error}"
                )));
            }
            let token = self.tokens.get().await.map_err(token_error)?;
            let have = hasher.size();
            let mut request = self.http.get(&notice.url).bearer_auth(&token);
            if have > 0 {
                request = request
                    .header(reqwest::header::RANGE, format!("bytes={have}-"))
                    .header(
                        reqwest::header::IF_RANGE,
                        format!("\"{}\"", notice.firmware),
                    );
            }
            let mut response = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    failures += 1;
                    last_error = e.to_string();
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            };
            match response.status().as_u16() {
                206 if have > 0 => {}
                200 => {
                    if have > 0 {
                        // The server sends it all again: start over.
                        file.set_len(0).await.map_err(io)?;
                        hasher = ImageHasher::new();
                    }
                }
                401 => {
                    self.tokens.invalidate(&token);
                    failures += 1;
                    last_error = "401".into();
                    continue;
                }
                s => {
                    return Err(FirmwareError::Download(format!(
                        "GET {} answered {s}",
                        notice.url
                    )))
                }
            }
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        if hasher.size() + chunk.len() as u64 > size {
                            return Err(FirmwareError::Refused(VerifyError::SizeMismatch {
                                expected: size,
                                actual: hasher.size() + chunk.len() as u64,
                            }));
                        }
                        file.write_all(&chunk).await.map_err(io)?;
                        hasher.update(&chunk);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failures += 1;
                        last_error = e.to_string();
                        tracing::info!(device = %self.id, have = hasher.size(), size,
                            "firmware download interrupted ({e}); resuming with Range");
                        break;
                    }
                }
            }
            file.flush().await.map_err(io)?;
            if hasher.size() < size && last_error.is_empty() {
                failures += 1;
                last_error = "the connection closed early".into();
            }
        }
        file.sync_all().await.map_err(io)?;
        Ok(hasher.finish())
    }

    async fn coap_exchange(
        &self,
        peer: SocketAddr,
        request: Request,
    ) -> Result<stratus_coap::Message, String> {
        let mut client = crate::coap::Client::new(peer, None).await?;
        client
            .exchange(&self.cancel, request)
            .await
            .map_err(|e| match e {
                crate::poll::Stop::Transient(why) | crate::poll::Stop::Unauthorized(why) => why,
                crate::poll::Stop::Closed => "closed".into(),
            })
    }

    async fn download_coap(
        &self,
        notice: &FirmwareNotice,
        peer: SocketAddr,
        part: &Path,
    ) -> Result<stratus_firmware::ImageDigest, FirmwareError> {
        let size = notice.manifest.size;
        let io = |e: std::io::Error| FirmwareError::Io(format!("{}: {e}", part.display()));
        let block_size = 1u64 << (BLOCK_SZX + 4);
        let (mut file, mut hasher) = self.resume_state(part, size).await?;
        if hasher.size() % block_size != 0 {
            // Resume on a block boundary.
            file.set_len(0).await.map_err(io)?;
            hasher = ImageHasher::new();
        }
        let mut client = crate::coap::Client::new(peer, None)
            .await
            .map_err(FirmwareError::Download)?;
        let mut failures = 0;
        loop {
            let num = u32::try_from(hasher.size() / block_size)
                .map_err(|_| FirmwareError::Download("the image is too large for Block2".into()))?;
            let block = BlockOption::new(num, false, BLOCK_SZX).ok_or_else(|| {
                FirmwareError::Download("the image is too large for Block2".into())
            })?;
            let token = self.tokens.get().await.map_err(token_error)?;
            let mut request = Request::get(&notice.coap);
            crate::coap::add_token(&mut request.options, &token);
            request.options.set_block2(block);
            let answer = match client.exchange(&self.cancel, request).await {
                Ok(m) => m,
                Err(_) if failures + 1 < ATTEMPTS => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
                Err(_) => return Err(FirmwareError::Download(format!("block {num}: no answer"))),
            };
            if answer.code == Code::UNAUTHORIZED && failures + 1 < ATTEMPTS {
                self.tokens.invalidate(&token);
                failures += 1;
                continue;
            }
            if answer.code != Code::CONTENT {
                return Err(FirmwareError::Download(format!(
                    "block {num}: {} {}",
                    answer.code,
                    String::from_utf8_lossy(&answer.payload)
                )));
            }
            let got = answer.options.block2().ok().flatten();
            let more = match got {
                Some(b) if b.num == num && b.szx == BLOCK_SZX => b.more,
                Some(b) => {
                    return Err(FirmwareError::Download(format!(
                        "asked for block {num}, got {}",
                        b.num
                    )))
                }
                None if num == 0 => false,
                None => return Err(FirmwareError::Download("the server dropped Block2".into())),
            };
            if hasher.size() + answer.payload.len() as u64 > size {
                return Err(FirmwareError::Refused(VerifyError::SizeMismatch {
                    expected: size,
                    actual: hasher.size() + answer.payload.len() as u64,
                }));
            }
            file.write_all(&answer.payload).await.map_err(io)?;
            hasher.update(&answer.payload);
            failures = 0;
            if !more {
                break;
            }
        }
        file.sync_all().await.map_err(io)?;
        Ok(hasher.finish())
    }
}

impl FirmwareUpdater {
    /// A [`FirmwareHandler`](crate::FirmwareHandler) for
    /// [`DeviceBuilder::firmware_handler`](crate::DeviceBuilder::firmware_handler): every notice
    /// that arrives over MQTT is applied in a task of its own (one at a time), downloading
    /// over `via` and installing with `install`.
    pub fn handler<F>(
        self: std::sync::Arc<Self>,
        via: FirmwareTransport,
        install: F,
    ) -> impl crate::FirmwareHandler
    where
        F: Fn(&Path, &Manifest) -> Result<(), String> + Send + Sync + 'static,
    {
        let install = std::sync::Arc::new(install);
        move |_: &str, notice: &serde_json::Value| {
            let notice = match FirmwareNotice::from_json(notice) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a firmware notice");
                    return;
                }
            };
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                tracing::warn!("no tokio runtime to apply a firmware notice on");
                return;
            };
            let updater = self.clone();
            let install = install.clone();
            runtime.spawn(async move {
                if let Err(e) = updater
                    .apply(&notice, via, |path, m| install(path, m))
                    .await
                {
                    tracing::warn!(firmware = %notice.firmware, error = %e, "firmware update failed");
                }
            });
        }
    }
}

impl Drop for FirmwareUpdater {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100 * u64::from(failures.min(10)))
}

fn is_firmware_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
