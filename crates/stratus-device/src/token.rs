//! OAuth 2.0 access tokens for the device (RFC 6749 §4.4 client credentials: HTTP Basic with
//! the device id and secret, `grant_type=client_credentials`), refreshed before they expire,
//! and the server's clock as seen from the token endpoint's `Date` header.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Deserialize;

/// Why no token could be had.
#[derive(Debug)]
pub(crate) enum TokenError {
    /// The server refused the credentials (`invalid_client`).
    Refused(String),
    /// The server could not be reached or answered something unexpected: retry later.
    Unavailable(String),
}

#[derive(Clone)]
struct Cached {
    token: String,
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

/// A device's token source (one per device; cheap to share behind an `Arc`).
pub(crate) struct Tokens {
    http: reqwest::Client,
    endpoint: String,
    id: String,
    secret: String,
    cached: Mutex<Option<Cached>>,
    /// Server clock minus ours, in ms, when they differ by more than the `Date` header's
    /// one-second resolution; else 0.
    clock_offset_ms: AtomicI64,
}

/// Epoch milliseconds of our clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `application/x-www-form-urlencoded` of one value (RFC 6749 §2.3.1 asks for it inside
/// HTTP Basic).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A token is refreshed when 80% of its lifetime has passed (at least 1 s before expiry).
fn refresh_after(expires_in: Duration) -> Duration {
    let early = (expires_in / 5).max(Duration::from_secs(1)).min(expires_in);
    expires_in - early
}

impl Tokens {
    pub fn new(http: reqwest::Client, base: &str, id: &str, secret: &str) -> Tokens {
        Tokens {
            http,
            endpoint: format!("{base}/oauth/token"),
            id: id.to_string(),
            secret: secret.to_string(),
            cached: Mutex::new(None),
            clock_offset_ms: AtomicI64::new(0),
        }
    }

    /// A token from before, when given to the builder (e.g. cached by a fleet simulator).
    pub fn seed(&self, token: String, valid_for: Duration) {
        let now = Instant::now();
        *self.cached.lock() = Some(Cached {
            token,
            refresh_at: now + refresh_after(valid_for),
            expires_at: now + valid_for,
        });
    }

    /// The device secret (the MQTT password when tokens are not used).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The current token and when it expires, for callers that want to cache it.
    pub fn current(&self) -> Option<(String, Instant)> {
        self.cached
            .lock()
            .as_ref()
            .filter(|c| c.expires_at > Instant::now())
            .map(|c| (c.token.clone(), c.expires_at))
    }

    /// A token valid for a while: the cached one until its refresh time, else a new one.
    pub async fn get(&self) -> Result<String, TokenError> {
        if let Some(c) = self.cached.lock().as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        match self.fetch().await {
            Ok(t) => Ok(t),
            // Refreshing early failed but the old token still works: use it meanwhile.
            Err(TokenError::Unavailable(why)) => match self.cached.lock().as_ref() {
                Some(c) if Instant::now() + Duration::from_secs(1) < c.expires_at => {
                    Ok(c.token.clone())
                }
                _ => Err(TokenError::Unavailable(why)),
            },
            Err(e) => Err(e),
        }
    }

    /// Forgets the cached token (the server said 401 to it).
    pub fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock();
        if cached.as_ref().is_some_and(|c| c.token == token) {
            *cached = None;
        }
    }

    /// Epoch milliseconds of the server's clock, as best known.
    pub fn server_now_ms(&self) -> i64 {
        now_ms() + self.clock_offset_ms.load(Ordering::Relaxed)
    }

    async fn fetch(&self) -> Result<String, TokenError> {
        let asked = Instant::now();
        let response = self
            .http
            .post(&self.endpoint)
            .basic_auth(form_encode(&self.id), Some(form_encode(&self.secret)))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(crate::describe(&e)))?;
        let status = response.status();
        self.learn_clock(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| TokenError::Unavailable(crate::describe(&e)))?;
        if status.is_success() {
            let answer: TokenAnswer = serde_json::from_slice(&bytes).map_err(|e| {
                TokenError::Unavailable(format!("the token endpoint answered bad JSON: {e}"))
            })?;
            let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600).max(1));
            *self.cached.lock() = Some(Cached {
                token: answer.access_token.clone(),
                refresh_at: asked + refresh_after(lifetime),
                expires_at: asked + lifetime,
            });
            tracing::debug!(device = %self.id, expires_in = ?lifetime, "access token obtained");
            return Ok(answer.access_token);
        }
        let description = crate::error_description(&bytes);
        // RFC 6749 §5.2: invalid_client is 401 (or 400); anything else is the server's trouble.
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
        if status == reqwest::StatusCode::UNAUTHORIZED
            || code.as_deref() == Some("invalid_client")
            || code.as_deref() == Some("unauthorized_client")
        {
            Err(TokenError::Refused(description))
        } else {
            Err(TokenError::Unavailable(format!(
                "token endpoint answered {status}: {description}"
            )))
        }
    }

    pub fn learn_clock(&self, headers: &reqwest::header::HeaderMap) {
        let Some(date) = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
        else {
            return;
        };
        let server_ms = date
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // The header has whole seconds: only a difference beyond that is a skew.
        let diff = server_ms + 500 - now_ms();
        let offset = if diff.abs() > 2000 { diff } else { 0 };
        if offset != 0 {
            tracing::warn!(device = %self.id, offset_ms = offset, "this clock differs from the server's; correcting `sent`");
        }
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(2880)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(refresh_after(Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn basic_auth_parts_are_form_encoded() {
        assert_eq!(form_encode("sim-0001"), "sim-0001");
        assert_eq!(form_encode("a b+c"), "a+b%2Bc");
    }
}
