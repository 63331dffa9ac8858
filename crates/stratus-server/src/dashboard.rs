//! The web dashboard at `/`: its embedded assets and its cookie session (sign-in with an
//! OAuth client, CSRF protection) that the API's bearer extractor also accepts.
//!
//! ## Assets
//! Plain HTML, CSS and ES modules under `crates/stratus-server/dashboard/`, embedded with
//! `include_bytes!`, so the binary serves a complete dashboard offline. The chart library
//! (uPlot) comes from the npm registry pinned by `dashboard/package-lock.json`;
//! `dashboard/vendor.sh` copies its dist files into `dashboard/vendor/` (committed; CI checks
//! they are byte-identical to the lockfile's), so a Cargo build needs no node. Every answer
//! carries a strict Content-Security-Policy (`default-src 'self'`, no inline script or
//! style element), `nosniff`, `no-referrer` and frame denial; assets have an `ETag` and
//! `Cache-Control: no-cache` (revalidated, 304 when unchanged).
//!
//! ## Session
//! `POST /dashboard/login` (form or JSON: `client_id`, `client_secret`) verifies the
//! credentials with the very code of `/oauth/token` (failures counted and audited), refuses
//! devices and clients without `telemetry:read`/`admin`, issues an access token and puts it in
//! the cookie `stratus_session` (`HttpOnly; SameSite=Strict; Path=/`, `Secure` over HTTPS,
//! `Max-Age` = the token's lifetime): the token never reaches JavaScript, and the session is
//! exactly as valid as the token (it survives restarts, dies with a revocation, a rotated
//! secret or a deleted client). `GET /dashboard/session` answers `{"who", "scopes", "csrf",
//! "expires_at"}`; `POST /dashboard/logout` revokes the token and clears the cookie.
//!
//! CSRF: a request authenticated by the cookie with a method other than GET/HEAD/OPTIONS must
//! carry `X-CSRF-Token` equal to the session's `csrf` (a SHA-256 derivation of the token, so
//! knowing it reveals nothing of the token) and, when the browser sends `Origin`, an origin
//! equal to the request's own; otherwise 403 `invalid_csrf_token`. `SameSite=Strict` is the
//! second line. Requests with `Authorization: Bearer` are unaffected.

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::{ApiError, ApiState};
use crate::auth::{Kind, SCOPE_TELEMETRY_READ};

/// The session cookie's name.
pub const COOKIE: &str = "stratus_session";

/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The Content-Security-Policy of every dashboard answer.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// Marks requests that arrived over HTTPS (the HTTPS listener adds it), so the cookie is
/// `Secure` there.
#[derive(Debug, Clone, Copy)]
pub struct Https;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $ct:expr) => {
        Asset {
            path: $path,
            content_type: $ct,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/", $file)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

static ASSETS: [Asset; 12] = [
    asset!("/", "index.html", "text/html; charset=utf-8"),
    asset!("/app.css", "app.css", CSS),
    asset!("/app.js", "app.js", JS),
    asset!("/api.js", "api.js", JS),
    asset!("/util.js", "util.js", JS),
    asset!("/fleet.js", "fleet.js", JS),
    asset!("/device.js", "device.js", JS),
    asset!("/alarms.js", "alarms.js", JS),
    asset!("/rules.js", "rules.js", JS),
    asset!("/firmware.js", "firmware.js", JS),
    asset!("/vendor/uPlot.iife.min.js", "vendor/uPlot.iife.min.js", JS),
    asset!("/vendor/uPlot.min.css", "vendor/uPlot.min.css", CSS),
];

/// The strong ETag of each asset (a prefix of its SHA-256), computed once.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..32]))
        .collect()
});

/// The dashboard's routes: the assets and `/dashboard/{login,session,logout}`.
pub fn routes() -> Router<ApiState> {
    let mut router = Router::new()
        .route("/dashboard/login", post(login))
        .route("/dashboard/session", get(session))
        .route("/dashboard/logout", post(logout));
    for (i, asset) in ASSETS.iter().enumerate() {
        router = router.route(asset.path, get(move |h: HeaderMap| serve_asset(i, h)));
    }
    router
}

fn security_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

async fn serve_asset(index: usize, request: HeaderMap) -> Response {
    let (Some(asset), Some(etag)) = (ASSETS.get(index), ETAGS.get(index)) else {
        return ApiError::not_found("no such resource").into_response();
    };
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    security_headers(headers);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    response
}

// ---- the session ------------------------------------------------------------------------

/// The session token (the cookie's value) of a request, if it carries one.
pub fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The CSRF token of the session whose token is `token`.
pub fn csrf_token(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"stratus dashboard csrf\0");
    h.update(token.as_bytes());
    hex::encode(h.finalize())
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request comes from a page of this very origin, as far as the browser says:
/// an `Origin` must equal `scheme://Host`; without `Origin`, `Sec-Fetch-Site` (when sent)
/// must not be `cross-site`/`same-site`.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match headers.get(header::ORIGIN).map(|v| v.to_str()) {
        Some(Ok(origin)) => host.is_some_and(|host| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host))
        }),
        Some(Err(_)) => false,
        None => !matches!(
            headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()),
            Some("cross-site" | "same-site")
        ),
    }
}

/// The CSRF check of a request authenticated by the session cookie whose token is `token`
/// (safe methods pass; see the module docs).
pub fn check_csrf(method: &Method, headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if !same_origin(headers) {
        return Err(csrf_refused("the request's Origin is not this server"));
    }
    let sent = headers.get(CSRF_HEADER).map(HeaderValue::as_bytes);
    match sent {
        Some(sent) if constant_time_eq(sent, csrf_token(token).as_bytes()) => Ok(()),
        Some(_) => Err(csrf_refused("the X-CSRF-Token does not match the session")),
        None => Err(csrf_refused(
            "a request authenticated by the session cookie needs X-CSRF-Token",
        )),
    }
}

fn csrf_refused(why: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "invalid_csrf_token", why)
}

/// The `Set-Cookie` value carrying `token` for `max_age` seconds (0 clears it).
fn cookie(token: &str, max_age: u64, https: bool) -> String {
    format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{}",
        if https { "; Secure" } else { "" }
    )
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(headers);
    response
}

/// The body of `POST /dashboard/login` as JSON (a form uses the same names).
#[derive(Debug, Deserialize)]
struct LoginBody {
    client_id: String,
    client_secret: String,
}

fn read_login(headers: &HeaderMap, body: &[u8]) -> Result<(String, String), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let (id, secret) = if crate::api::oauth::is_form(content_type) {
        let params = crate::api::oauth::parse_form(body)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        (
            params.get("client_id").unwrap_or_default().to_string(),
            params.get("client_secret").unwrap_or_default().to_string(),
        )
    } else {
        let b: LoginBody = serde_json::from_slice(body).map_err(|_| {
            ApiError::bad_request("expected a form or JSON body with client_id and client_secret")
        })?;
        (b.client_id, b.client_secret)
    };
    if id.is_empty() || secret.is_empty() {
        return Err(ApiError::bad_request(
            "client_id and client_secret are required",
        ));
    }
    Ok((id, secret))
}

/// Signs in: verifies a client's credentials and sets the session cookie.
async fn login(
    State(state): State<ApiState>,
    peer: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    https: Option<Extension<Https>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    no_store(
        match login_inner(&state, &peer, https.is_some(), &headers, body).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
    )
}

async fn login_inner(
    state: &ApiState,
    peer: &Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    https: bool,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    const ENDPOINT: &str = "dashboard/login";
    // Login CSRF: another site must not sign a browser in to its own account.
    if !same_origin(headers) {
        return Err(csrf_refused("the request's Origin is not this server"));
    }
    let body = body.map_err(|e| ApiError::new(e.status(), "invalid_request", "unreadable body"))?;
    let (id, secret) = read_login(headers, &body)?;
    let creds = crate::api::oauth::Credentials::Form { id, secret };
    let principal = crate::api::oauth::authenticate(state, peer, ENDPOINT, creds, false)
        .await
        .map_err(|mut e| {
            // No `WWW-Authenticate: Basic` here: the browser would open its own sign-in box.
            e.challenge = None;
            e
        })?;
    if principal.kind != Kind::Client || !principal.has_scope(SCOPE_TELEMETRY_READ) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the dashboard needs a client with the scope telemetry:read or admin",
        ));
    }
    let issued = state
        .auth
        .issue(&principal, None)
        .map_err(|e| ApiError::internal("issuing a session token", &e))?;
    tracing::info!(client = %principal.id, "dashboard sign-in");
    let mut response = Json(json!({
        "who": principal.id,
        "scopes": principal.scopes,
        "csrf": csrf_token(&issued.access_token),
        "expires_at": (crate::auth::now_secs() + issued.expires_in) * 1000,
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie(&issued.access_token, issued.expires_in, https)) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(response)
}

/// Who is signed in, and the session's CSRF token.
async fn session(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let answer = match session_token(&headers) {
        None => Err(ApiError::invalid_token("not signed in")),
        Some(token) => match state.auth.verify_token(token) {
            Ok((principal, claims)) => Ok(Json(json!({
                "who": principal.id,
                "scopes": principal.scopes,
                "csrf": csrf_token(token),
                "expires_at": claims.exp * 1000,
            }))
            .into_response()),
            Err(_) => Err(ApiError::invalid_token("the session expired or was ended")),
        },
    };
    no_store(answer.unwrap_or_else(IntoResponse::into_response))
}

/// Signs out: revokes the session's token and clears the cookie.
async fn logout(
    State(state): State<ApiState>,
    https: Option<Extension<Https>>,
    headers: HeaderMap,
) -> Response {
    let https = https.is_some();
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Some(token) = session_token(&headers) {
        if let Ok((principal, _)) = state.auth.verify_token(token) {
            if let Err(e) = check_csrf(&Method::POST, &headers, token) {
                return no_store(e.into_response());
            }
            if let Err(e) = state.auth.revoke_token(token, &principal).await {
                return no_store(ApiError::internal("ending the session", &e).into_response());
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&cookie("", 0, https)) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    no_store(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; stratus_session=tok; b=2")]);
        assert_eq!(session_token(&h), Some("tok"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "stratus_session=x")]);
        assert_eq!(session_token(&h), Some("x"));
        assert_eq!(
            session_token(&headers(&[("cookie", "stratus_session=")])),
            None
        );
        assert_eq!(
            session_token(&headers(&[("cookie", "xstratus_session=1")])),
            None
        );
    }

    #[test]
    fn csrf_needs_the_token_and_the_origin() {
        let token = "tok";
        let good = csrf_token(token);
        let post = Method::POST;
        assert!(check_csrf(&Method::GET, &HeaderMap::new(), token).is_ok());
        let e = check_csrf(&post, &headers(&[("host", "h:1")]), token).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let ok = headers(&[
            ("host", "h:1"),
            ("origin", "http://h:1"),
            ("x-csrf-token", &good),
        ]);
        assert!(check_csrf(&post, &ok, token).is_ok());
        let wrong = headers(&[("host", "h:1"), ("x-csrf-token", "00")]);
        assert!(check_csrf(&post, &wrong, token).is_err());
        let foreign = headers(&[
            ("host", "h:1"),
            ("origin", "http://evil"),
            ("x-csrf-token", &good),
        ]);
        assert!(check_csrf(&post, &foreign, token).is_err());
        let cross = headers(&[
            ("host", "h:1"),
            ("sec-fetch-site", "cross-site"),
            ("x-csrf-token", &good),
        ]);
        assert!(check_csrf(&post, &cross, token).is_err());
        assert_ne!(csrf_token("other"), good);
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let c = cookie("t", 60, false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
        assert!(!c.contains("Secure"));
        assert!(cookie("t", 60, true).ends_with("; Secure"));
    }

    #[test]
    fn every_asset_has_an_etag_and_the_index_is_html() {
        assert_eq!(ETAGS.len(), ASSETS.len());
        assert!(ASSETS[0].body.starts_with(b"<!doctype html>"));
        assert!(ASSETS.iter().all(|a| !a.body.is_empty()));
    }
}
