//! HTTP/1.1 keep-alive connections of the generator: hyper's bare client connection (no
//! pool, no retries, no redirects), one per load loop, driven in the same future as the loop
//! so an answer wakes one task, not two. Also the few API calls of the setup: OAuth tokens
//! (RFC 6749 §4.4 client credentials) and device registration.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{bail, Context};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The request body type of every request.
pub type Body = Full<Bytes>;

/// A connected, not yet driven HTTP/1.1 connection.
pub struct Link {
    sender: SendRequest<Body>,
    conn: Connection<TokioIo<TcpStream>, Body>,
}

impl Link {
    /// Connects to `addr` (TCP_NODELAY on) and does hyper's client handshake.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Link> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {addr}"))?;
        Ok(Link { sender, conn })
    }

    /// Runs `work` with the connection's sender, driving the connection in the same future.
    /// When the connection ends first (the server closed it), `work` goes on and sees the
    /// failure in its next request.
    pub async fn run<T, F, Fut>(self, work: F) -> T
    where
        F: FnOnce(SendRequest<Body>) -> Fut,
        Fut: Future<Output = T>,
    {
        let Link { sender, mut conn } = self;
        let work = work(sender);
        tokio::pin!(work);
        let mut conn_done = false;
        loop {
            // The connection first: it reads an answer and hands it over, then the work sees
            // it in the same round.
            tokio::select! {
                biased;
                _ = &mut conn, if !conn_done => conn_done = true,
                out = &mut work => return out,
            }
        }
    }

    /// Drives the connection on its own task and returns a [`Client`] for one-off calls.
    pub fn spawn(self) -> Client {
        let Link { sender, conn } = self;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { sender, driver }
    }
}

/// An answer: status and the whole body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// `"STATUS: BODY"` with the body cut to 200 bytes, for error messages.
    pub fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
        format!("{} {}", self.status.as_u16(), text.trim())
    }
}

/// Sends `request` once the connection is ready and reads the whole answer.
pub async fn exchange(
    sender: &mut SendRequest<Body>,
    request: Request<Body>,
) -> Result<Answer, hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer { status, body })
}

/// The fixed part of a request sent over and over: method, path and headers.
#[derive(Debug, Clone)]
pub struct Proto {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Proto {
    /// `method path` with `Host: host` and, when given, `Authorization: Bearer token` and
    /// `Content-Type: application/json`.
    pub fn new(
        method: Method,
        path: &str,
        host: &str,
        bearer: Option<&str>,
        json: bool,
    ) -> anyhow::Result<Proto> {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host)?);
        if let Some(token) = bearer {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            );
        }
        if json {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        Ok(Proto {
            method,
            uri: path.parse().with_context(|| format!("path {path:?}"))?,
            headers,
        })
    }

    /// Adds a header.
    pub fn header(mut self, name: header::HeaderName, value: &str) -> anyhow::Result<Proto> {
        self.headers.insert(name, HeaderValue::from_str(value)?);
        Ok(self)
    }

    /// The request with `body` (hyper adds `Content-Length`).
    pub fn request(&self, body: Bytes) -> Request<Body> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// A connection for the setup's one-off calls; its driver task ends with it.
pub struct Client {
    sender: SendRequest<Body>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        Ok(Link::connect(addr).await?.spawn())
    }

    /// Sends one request.
    pub async fn send(&mut self, proto: &Proto, body: Bytes) -> anyhow::Result<Answer> {
        Ok(exchange(&mut self.sender, proto.request(body)).await?)
    }
}

/// `application/x-www-form-urlencoded` escaping of one value: everything but RFC 3986's
/// unreserved characters is percent-encoded (RFC 6749 §2.3.1 asks this of Basic credentials).
pub fn form_urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An access token of client `id` (RFC 6749 §4.4, HTTP Basic client authentication).
pub async fn access_token(
    client: &mut Client,
    host: &str,
    id: &str,
    secret: &str,
) -> anyhow::Result<String> {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        form_urlencode(id),
        form_urlencode(secret)
    ));
    let proto = Proto::new(Method::POST, "/oauth/token", host, None, false)?
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")?
        .header(header::AUTHORIZATION, &format!("Basic {basic}"))?;
    let answer = client
        .send(&proto, Bytes::from_static(b"grant_type=client_credentials"))
        .await
        .with_context(|| format!("POST /oauth/token for {id}"))?;
    if answer.status != StatusCode::OK {
        bail!("POST /oauth/token for {id}: {}", answer.describe());
    }
    let v: serde_json::Value = serde_json::from_slice(&answer.body)
        .with_context(|| format!("POST /oauth/token for {id}: the answer is not JSON"))?;
    match v["access_token"].as_str() {
        Some(t) if !t.is_empty() => Ok(t.to_string()),
        _ => bail!("POST /oauth/token for {id}: no access_token in {v}"),
    }
}

/// Registers device `id` with the admin token; returns its secret.
pub async fn register_device(
    client: &mut Client,
    host: &str,
    admin_token: &str,
    id: &str,
) -> anyhow::Result<String> {
    let proto = Proto::new(
        Method::POST,
        "/api/v1/devices",
        host,
        Some(admin_token),
        true,
    )?;
    let body = serde_json::json!({"id": id, "attributes": {"bench": true}}).to_string();
    let answer = client
        .send(&proto, Bytes::from(body))
        .await
        .with_context(|| format!("POST /api/v1/devices {id}"))?;
    if answer.status != StatusCode::CREATED {
        bail!("POST /api/v1/devices {id}: {}", answer.describe());
    }
    let v: serde_json::Value = serde_json::from_slice(&answer.body)
        .with_context(|| format!("POST /api/v1/devices {id}: the answer is not JSON"))?;
    match v["secret"].as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => bail!("POST /api/v1/devices {id}: no secret in the answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_escape_all_but_unreserved() {
        assert_eq!(form_urlencode("bench-1a2b.c_d~"), "bench-1a2b.c_d~");
        assert_eq!(form_urlencode("a b+c:d%"), "a%20b%2Bc%3Ad%25");
        assert_eq!(form_urlencode("é"), "%C3%A9");
    }

    #[test]
    fn a_proto_makes_identical_requests() {
        let p = Proto::new(
            Method::POST,
            "/api/v1/telemetry",
            "127.0.0.1:8080",
            Some("tok"),
            true,
        )
        .unwrap();
        let r = p.request(Bytes::from_static(b"{}"));
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri().path(), "/api/v1/telemetry");
        assert_eq!(r.headers()[header::AUTHORIZATION], "Bearer tok");
        assert_eq!(r.headers()[header::HOST], "127.0.0.1:8080");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert!(Proto::new(Method::GET, "/x", "h", Some("bad\ntoken"), false).is_err());
    }
}
