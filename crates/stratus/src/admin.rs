//! Talking to a running server as the admin: the `--server` / `--admin-secret-file` options
//! every admin subcommand shares, the admin secret lookup, the OAuth token (RFC 6749 §4.4
//! client credentials) and JSON requests whose errors carry the API's `error_description`.
//!
//! The HTTP client is `reqwest` (async, on the tokio runtime the store mode needs anyway; its
//! hyper, rustls and ring are the ones the server already builds, so it adds little): JSON
//! bodies, HTTPS with the webpki roots for a remote server, connection errors that can be told
//! apart from HTTP errors (the fallback to `--data-dir` needs that).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The server a subcommand talks to when `--server` is not given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
/// The data dir of `stratus serve` when neither `--data-dir` nor `STRATUS_SERVER__DATA_DIR`
/// is given.
pub const DEFAULT_DATA_DIR: &str = "./stratus-data";

/// The data dir `stratus serve` uses without `--data-dir`: `STRATUS_SERVER__DATA_DIR` when set
/// (as in the container image, where it is `/data`), else [`DEFAULT_DATA_DIR`]. The admin
/// tools look there for the admin secret and a store.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("STRATUS_SERVER__DATA_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    }
}
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A mistake in the command line or configuration: exit code 2 (everything else is 1).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The exit code for an error: 2 for a [`UsageError`], 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}

/// How to reach a running server as the admin.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's base URL [default: http://127.0.0.1:8080].
    #[arg(long, value_name = "URL", global = true)]
    pub server: Option<String>,
    /// File holding the admin secret, used when STRATUS_ADMIN_SECRET is not set
    /// [default: ./stratus-data/admin-secret, or in $STRATUS_SERVER__DATA_DIR when set].
    #[arg(long, value_name = "FILE", global = true)]
    pub admin_secret_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> String {
        self.server
            .as_deref()
            .unwrap_or(DEFAULT_SERVER)
            .trim_end_matches('/')
            .to_string()
    }

    /// The admin secret: `STRATUS_ADMIN_SECRET`, else the first line of the secret file.
    pub fn admin_secret(&self) -> anyhow::Result<String> {
        if let Ok(secret) = std::env::var("STRATUS_ADMIN_SECRET") {
            if !secret.is_empty() {
                return Ok(secret);
            }
        }
        let path = self
            .admin_secret_file
            .clone()
            .unwrap_or_else(|| default_data_dir().join("admin-secret"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            UsageError(format!(
                "no admin secret: STRATUS_ADMIN_SECRET is not set and {} cannot be read ({e}); \
                 pass --admin-secret-file (or --data-dir to work on a stopped server's data)",
                path.display()
            ))
        })?;
        let secret = text.lines().next().unwrap_or("").trim().to_string();
        if secret.is_empty() {
            return Err(
                UsageError(format!("admin secret file {} is empty", path.display())).into(),
            );
        }
        Ok(secret)
    }
}

/// Why a request failed.
#[derive(Debug)]
pub enum RequestError {
    /// The server could not be reached at all (nothing listening, DNS, TLS).
    Unreachable(String),
    /// The server answered with an error.
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The API's `error` code.
        code: String,
        /// The API's `error_description`.
        description: String,
    },
    /// Anything else (a broken answer, a timeout mid-way).
    Other(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Unreachable(why) => write!(f, "cannot reach the server: {why}"),
            RequestError::Api {
                status,
                code,
                description,
            } => write!(f, "{description} ({} {code})", status.as_u16()),
            RequestError::Other(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for RequestError {}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn request_error(e: reqwest::Error) -> RequestError {
    if e.is_connect() {
        RequestError::Unreachable(describe(&e))
    } else {
        RequestError::Other(describe(&e))
    }
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1 asks for it
/// on the client id and secret inside HTTP Basic).
pub fn form_encode(s: &str) -> String {
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

/// An authenticated admin session with a server.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// Gets an access token for the `admin` client (client credentials grant, HTTP Basic).
    pub async fn connect(base: String, secret: &str) -> Result<AdminClient, RequestError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("stratus-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RequestError::Other(describe(&e)))?;
        let response = http
            .post(format!("{base}/oauth/token"))
            .basic_auth(form_encode("admin"), Some(form_encode(secret)))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(request_error)?;
        let body = answer(response).await?;
        let token = body
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                RequestError::Other("the token endpoint answered no access_token".into())
            })?
            .to_string();
        Ok(AdminClient { http, base, token })
    }

    /// Sends a request with the admin token and an optional JSON body; the JSON answer
    /// (`Value::Null` for an empty one, such as 204).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, RequestError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(request_error)?;
        answer(response).await
    }
}

impl AdminClient {
    /// Sends a request with the admin token and a (streamed) body of `content_type` and
    /// `length` bytes (a multipart upload, say); the JSON answer.
    pub async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        length: u64,
        body: reqwest::Body,
    ) -> Result<Value, RequestError> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .timeout(Duration::from_secs(600))
            .body(body)
            .send()
            .await
            .map_err(request_error)?;
        answer(response).await
    }
}

/// The JSON of a successful answer, or the API error it carries.
async fn answer(response: reqwest::Response) -> Result<Value, RequestError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(request_error)?;
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    if status.is_success() {
        return match body {
            Some(v) => Ok(v),
            None if bytes.is_empty() => Ok(Value::Null),
            None => Err(RequestError::Other(format!(
                "the server answered {status} with a body that is not JSON"
            ))),
        };
    }
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Err(RequestError::Api {
        status,
        code: field("error").unwrap_or_else(|| "error".into()),
        description: field("error_description").unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            if text.is_empty() {
                format!("the server answered {status}")
            } else {
                text.chars().take(200).collect()
            }
        }),
    })
}

/// Adds context for a top-level failure.
pub fn with_server(e: RequestError, base: &str) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("server {base}"))
}

/// Runs `f` on a fresh single-threaded runtime.
pub fn block_on<T, F: std::future::Future<Output = anyhow::Result<T>>>(f: F) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_follows_rfc_6749_appendix_b() {
        assert_eq!(form_encode("admin"), "admin");
        assert_eq!(form_encode("a b+c:d%"), "a+b%2Bc%3Ad%25");
        assert_eq!(form_encode("é"), "%C3%A9");
        assert_eq!(form_encode("AZaz09-._*~"), "AZaz09-._*%7E");
    }

    #[test]
    fn usage_errors_exit_2_and_others_1() {
        assert_eq!(exit_code(&UsageError("x".into()).into()), 2);
        assert_eq!(
            exit_code(&anyhow::Error::from(UsageError("x".into())).context("c")),
            2
        );
        assert_eq!(exit_code(&anyhow::anyhow!("boom")), 1);
    }
}
