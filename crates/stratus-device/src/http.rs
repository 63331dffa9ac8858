//! The HTTP transport: `POST /api/v1/telemetry` with the device's bearer token, one batch at a
//! time; the desired configuration polled with `If-None-Match`; the reported configuration
//! sent with `PUT`.
//!
//! Answers and what they do: 202 settles the batch; 401 refreshes the token and retries once
//! (then the device is `Unauthorized` and retries slowly); 409 (a replay refusal: `sent` too
//! far from the server's clock, which the `Date` header of the answer corrects) resends with
//! a new envelope; 400 and 413 split the batch until the bad record is alone, then drop it;
//! 429, 5xx and network errors keep everything and back off.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};

use crate::poll::{self, Steps, Stop};
use crate::token::TokenError;
use crate::{record, DesiredConfig, Shared};

/// How many 409s a batch gets before it is split like an invalid one (a clock off by more
/// than the window that the `Date` header did not explain).
const REPLAYS: u8 = 3;

/// HTTP settings.
pub(crate) struct Settings {
    pub base: String,
    pub config_poll: Duration,
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

struct Worker {
    shared: Arc<Shared>,
    http: reqwest::Client,
    base: String,
    config_version: Option<u64>,
    max_records: usize,
}

/// The device task.
pub(crate) async fn run(shared: Arc<Shared>, http: reqwest::Client, s: Settings) {
    let mut w = Worker {
        max_records: shared.batch.max_records,
        shared,
        http,
        base: s.base,
        config_version: None,
    };
    poll::run(&mut w, s.config_poll).await;
}

impl Steps for Worker {
    const CONNECTED_ON_SUCCESS: bool = true;

    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    async fn poll_config(&mut self) -> Result<(), Stop> {
        Worker::poll_config(self).await
    }

    async fn send_report(&mut self) -> Result<(), Stop> {
        Worker::send_report(self).await
    }

    async fn send_batch(&mut self) -> Result<bool, Stop> {
        Worker::send_batch(self).await
    }
}

impl Worker {
    /// One request with the bearer token; a 401 refreshes the token and retries once.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        if_none_match: Option<String>,
    ) -> Result<Answer, Stop> {
        let tokens = &self.shared.tokens;
        for attempt in 0..2 {
            let token = tokens.get().await.map_err(|e| match e {
                TokenError::Refused(r) => Stop::Unauthorized(r),
                TokenError::Unavailable(r) => Stop::Transient(r),
            })?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&token);
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            if let Some(tag) = &if_none_match {
                req = req.header(reqwest::header::IF_NONE_MATCH, tag.as_str());
            }
            let response = req
                .send()
                .await
                .map_err(|e| Stop::Transient(crate::describe(&e)))?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response
                .bytes()
                .await
                .map_err(|e| Stop::Transient(crate::describe(&e)))?;
            if !status.is_server_error() && status != StatusCode::TOO_MANY_REQUESTS {
                // The server answers: online (before the caller settles anything, so that a
                // flush never returns before the status says so).
                self.shared.connected();
            }
            if status == StatusCode::UNAUTHORIZED {
                tokens.invalidate(&token);
                if attempt == 0 {
                    continue;
                }
                return Err(Stop::Unauthorized(crate::error_description(&body)));
            }
            return Ok(Answer {
                status,
                headers,
                body,
            });
        }
        Err(Stop::Unauthorized("401".into()))
    }

    async fn poll_config(&mut self) -> Result<(), Stop> {
        let path = format!("/api/v1/devices/{}/config", self.shared.id);
        let tag = self.config_version.map(|v| format!("\"{v}\""));
        let a = self.call(Method::GET, &path, None, tag).await?;
        match a.status {
            StatusCode::NOT_MODIFIED => Ok(()),
            s if s.is_success() => {
                match serde_json::from_slice::<DesiredConfig>(&a.body) {
                    Ok(doc) => {
                        self.config_version = Some(doc.version);
                        self.shared.desired(doc);
                    }
                    Err(e) => {
                        tracing::warn!(device = %self.shared.id, error = %e, "unreadable desired configuration")
                    }
                }
                Ok(())
            }
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
                Err(Stop::Unauthorized(crate::error_description(&a.body)))
            }
            s => Err(Stop::Transient(format!(
                "GET config answered {s}: {}",
                crate::error_description(&a.body)
            ))),
        }
    }

    async fn send_report(&mut self) -> Result<(), Stop> {
        let Some(report) = self.shared.take_report() else {
            return Ok(());
        };
        let path = format!("/api/v1/devices/{}/config/reported", self.shared.id);
        match self
            .call(Method::PUT, &path, Some(report.to_string()), None)
            .await
        {
            Ok(a) if a.status.is_success() => {
                self.shared.report_done();
                Ok(())
            }
            Ok(a) if a.status.is_client_error() && a.status != StatusCode::TOO_MANY_REQUESTS => {
                tracing::warn!(device = %self.shared.id, status = %a.status, "the server refused the reported configuration: {}", crate::error_description(&a.body));
                self.shared.report_done();
                Ok(())
            }
            Ok(a) => {
                self.shared.report_back(report);
                Err(Stop::Transient(format!(
                    "PUT reported answered {}",
                    a.status
                )))
            }
            Err(e) => {
                self.shared.report_back(report);
                Err(e)
            }
        }
    }

    /// Sends one batch; `Ok(true)` when more records wait.
    async fn send_batch(&mut self) -> Result<bool, Stop> {
        let shared = self.shared.clone();
        let batch = shared
            .buffer
            .lock()
            .take(self.max_records, shared.batch.max_bytes);
        if batch.is_empty() {
            return Ok(false);
        }
        let body = record::envelope(
            shared.tokens.server_now_ms(),
            batch.iter().map(|e| &*e.json),
        );
        shared
            .counters
            .messages
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let a = match self
            .call(Method::POST, "/api/v1/telemetry", Some(body), None)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                shared.requeue(batch);
                return Err(e);
            }
        };
        shared.tokens.learn_clock(&a.headers);
        match a.status {
            s if s.is_success() => {
                shared.acked(&batch);
                self.max_records = (self.max_records * 2).min(shared.batch.max_records);
            }
            StatusCode::CONFLICT => {
                // Not fresh (or the nonce seen): resend with a new envelope, the same records.
                let mut batch = batch;
                let stale = batch.iter().map(|e| e.refusals).max().unwrap_or(0);
                if stale + 1 >= REPLAYS {
                    self.max_records = shared.refused(batch, REPLAYS + 1, "409 replay");
                } else {
                    for e in &mut batch {
                        e.refusals += 1;
                    }
                    shared.requeue(batch);
                }
            }
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
                let why = format!("{}: {}", a.status, crate::error_description(&a.body));
                self.max_records = shared.refused(batch, 1, &why);
            }
            StatusCode::FORBIDDEN => {
                shared.requeue(batch);
                return Err(Stop::Unauthorized(crate::error_description(&a.body)));
            }
            s => {
                shared.requeue(batch);
                return Err(Stop::Transient(format!(
                    "POST telemetry answered {s}: {}",
                    crate::error_description(&a.body)
                )));
            }
        }
        let more = shared.buffer.lock().queued() > 0;
        Ok(more)
    }
}
