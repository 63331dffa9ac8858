//! The OAuth 2.0 authorization server: client-credentials tokens (RFC 6749 §4.4), revocation
//! (RFC 7009), introspection (RFC 7662), and the admin's registry of application clients.
//!
//! ## Shape
//! Every endpoint reads its request with the pure functions at the top of this file
//! ([`parse_form`], [`parse_basic`], [`credentials`]) and only then does anything expensive:
//! an argon2 verification happens once the request is known to be well formed, so a malformed
//! flood costs a parse, not a hash. Verdicts use the RFC 6749 §5.2 codes in the API's error
//! shape (`{"error", "error_description"}`); every failed authentication is counted
//! (`stratus_auth_failures_total{transport="oauth"}`) and recorded for the audit log with the
//! claimed id and the peer address (aggregated per source, identity and minute:
//! [`crate::audit::failures`]).
//!
//! ## Client authentication (RFC 6749 §2.3.1)
//! HTTP Basic with the form-urlencoded id and secret, or the form fields `client_id` and
//! `client_secret`; one method per request. Many clients send Basic credentials without the
//! form encoding the RFC asks for, so when the decoded pair does not verify and the raw pair
//! differs from it, the raw pair is tried too (a secret such as `a+b` works either way);
//! Basic credentials that are not UTF-8 are read as ISO-8859-1 (what `requests` sends).
//! Introspection also accepts a bearer token (RFC 7662 §2.1).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use stratus_store::{NewAuditEntry, OAuthClient};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, ApiState, Caller, ErrorBody};
use crate::auth::{self, Auth, AuthError, Claims, Principal};

/// The media type of every OAuth request body.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// The grant type this server issues tokens for.
pub const CLIENT_CREDENTIALS: &str = "client_credentials";

/// The challenge of an `invalid_client` answer (RFC 6749 §5.2, RFC 7617).
const BASIC_CHALLENGE: &str = "Basic realm=\"stratus\"";

/// Standard base64 that accepts the padding or its absence (clients differ).
const BASIC_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

// ---- reading requests (pure) ------------------------------------------------------------

/// Why a form body was refused (`invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The body is not UTF-8.
    #[error("the body is not UTF-8")]
    NotUtf8,
    /// A `%` not followed by two hex digits, or an escape that decodes to invalid UTF-8.
    #[error("the body is not valid form-urlencoding")]
    BadEncoding,
    /// A parameter appears more than once (RFC 6749 §3.1).
    #[error("the parameter {0} is repeated")]
    Repeated(String),
}

/// The parameters of a form body. As RFC 6749 §3.1 asks, a parameter sent without a value
/// counts as absent and one sent twice is an error.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    /// The value of `name`, if present and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Whether a `Content-Type` value is `application/x-www-form-urlencoded` (any parameters).
pub fn is_form(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(FORM_CONTENT_TYPE))
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space, `%XX` a byte;
/// `None` for a malformed escape or a result that is not UTF-8.
pub fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| char::from(*b).to_digit(16))?;
                let lo = bytes.get(i + 2).and_then(|b| char::from(*b).to_digit(16))?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a form body into its parameters.
pub fn parse_form(body: &[u8]) -> Result<Params, FormError> {
    let text = std::str::from_utf8(body).map_err(|_| FormError::NotUtf8)?;
    let mut params = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = form_decode(name).ok_or(FormError::BadEncoding)?;
        let value = form_decode(value).ok_or(FormError::BadEncoding)?;
        if name.is_empty() || value.is_empty() {
            continue;
        }
        if params.contains_key(&name) {
            return Err(FormError::Repeated(printable(&name, "a parameter")));
        }
        params.insert(name, value);
    }
    Ok(Params(params))
}

/// Why an HTTP Basic header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BasicError {
    /// Not base64.
    #[error("the Basic credentials are not base64")]
    Base64,
    /// No `:` between id and secret.
    #[error("the Basic credentials have no colon between id and secret")]
    MissingColon,
    /// The id is empty.
    #[error("the Basic credentials have an empty client id")]
    EmptyId,
}

/// Client credentials from an HTTP Basic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    /// The client id, form-decoded (as sent when it does not decode).
    pub id: String,
    /// The secret, form-decoded (as sent when it does not decode).
    pub secret: String,
    /// The pair as sent, when it differs from the decoded pair (a client that skipped the
    /// RFC 6749 §2.3.1 encoding).
    pub raw: Option<(String, String)>,
}

/// Parses the credentials of `Authorization: Basic <credentials>` (RFC 7617, with the
/// form-urlencoded id and secret of RFC 6749 §2.3.1).
pub fn parse_basic(credentials: &str) -> Result<BasicCredentials, BasicError> {
    let bytes = BASIC_BASE64
        .decode(credentials.trim())
        .map_err(|_| BasicError::Base64)?;
    // RFC 7617 leaves the charset open: UTF-8, else ISO-8859-1 (what `requests` sends).
    let text = String::from_utf8(bytes)
        .unwrap_or_else(|e| e.into_bytes().into_iter().map(char::from).collect());
    let (raw_id, raw_secret) = text.split_once(':').ok_or(BasicError::MissingColon)?;
    let (id, secret) = match (form_decode(raw_id), form_decode(raw_secret)) {
        (Some(id), Some(secret)) => (id, secret),
        _ => (raw_id.to_string(), raw_secret.to_string()),
    };
    if id.is_empty() {
        return Err(BasicError::EmptyId);
    }
    let raw = (id != raw_id || secret != raw_secret)
        .then(|| (raw_id.to_string(), raw_secret.to_string()));
    Ok(BasicCredentials { id, secret, raw })
}

/// How a request says who sent it (nothing is verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Authorization: Basic`.
    Basic(BasicCredentials),
    /// `client_id` and `client_secret` in the form.
    Form {
        /// Client id.
        id: String,
        /// Client secret.
        secret: String,
    },
    /// `Authorization: Bearer` (introspection only).
    Bearer(String),
}

impl Credentials {
    /// The id the caller claims, for the audit log (a bearer token claims none until verified).
    pub fn claimed(&self) -> Option<&str> {
        match self {
            Credentials::Basic(b) => Some(&b.id),
            Credentials::Form { id, .. } => Some(id),
            Credentials::Bearer(_) => None,
        }
    }
}

/// Why the credentials of a request were refused before any was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request is malformed (`invalid_request`, 400; not an authentication failure).
    InvalidRequest(&'static str),
    /// Client authentication failed (`invalid_client`, 401).
    InvalidClient {
        /// What was wrong.
        reason: &'static str,
        /// The id the caller claimed, if any.
        claimed: Option<String>,
    },
    /// The bearer token is unusable (`invalid_token`, 401, RFC 6750).
    InvalidToken(&'static str),
}

/// Reads the client's credentials from the `Authorization` header and the form
/// (RFC 6749 §2.3). `allow_bearer`: a bearer token is accepted instead (introspection).
/// `Ok(None)`: the request carries no credentials at all.
pub fn credentials(
    authorization: Option<&HeaderValue>,
    params: &Params,
    allow_bearer: bool,
) -> Result<Option<Credentials>, Refusal> {
    let form_id = params.get("client_id");
    let form_secret = params.get("client_secret");
    let from_header = match authorization {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| Refusal::InvalidClient {
                reason: "the Authorization header is not readable",
                claimed: None,
            })?;
            let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
            let rest = rest.trim();
            if scheme.eq_ignore_ascii_case("basic") {
                let basic = parse_basic(rest).map_err(|e| Refusal::InvalidClient {
                    reason: match e {
                        BasicError::Base64 => "the Basic credentials are not base64",
                        BasicError::MissingColon => "the Basic credentials have no colon",
                        BasicError::EmptyId => "the Basic credentials have an empty client id",
                    },
                    claimed: None,
                })?;
                Some(Credentials::Basic(basic))
            } else if scheme.eq_ignore_ascii_case("bearer") && allow_bearer {
                if rest.is_empty() {
                    return Err(Refusal::InvalidToken("the bearer token is empty"));
                }
                Some(Credentials::Bearer(rest.to_string()))
            } else {
                return Err(Refusal::InvalidClient {
                    reason: if allow_bearer {
                        "unsupported authentication scheme: use HTTP Basic, Bearer or the form fields"
                    } else {
                        "unsupported authentication scheme: use HTTP Basic or client_id and client_secret"
                    },
                    claimed: None,
                });
            }
        }
    };
    match from_header {
        Some(found) => {
            if form_secret.is_some() {
                return Err(Refusal::InvalidRequest(
                    "the client used more than one authentication method",
                ));
            }
            if let (Credentials::Basic(b), Some(id)) = (&found, form_id) {
                if b.id != id {
                    return Err(Refusal::InvalidRequest(
                        "client_id differs from the client of the Basic credentials",
                    ));
                }
            }
            Ok(Some(found))
        }
        None => match (form_id, form_secret) {
            (Some(id), Some(secret)) => Ok(Some(Credentials::Form {
                id: id.to_string(),
                secret: secret.to_string(),
            })),
            (Some(id), None) => Err(Refusal::InvalidClient {
                reason: "client_secret is missing (every client is confidential)",
                claimed: Some(id.to_string()),
            }),
            (None, Some(_)) => Err(Refusal::InvalidRequest("client_secret without client_id")),
            (None, None) => Ok(None),
        },
    }
}

/// `s` when it is short and made of RFC 6749 error-description-safe characters, else `other`
/// (descriptions must not echo arbitrary input, RFC 6749 §5.2).
fn printable(s: &str, other: &str) -> String {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b));
    if ok {
        s.to_string()
    } else {
        other.to_string()
    }
}

/// The grant asked for: the requested scope (RFC 6749 §4.4.2), or the error to answer.
pub fn grant(params: &Params) -> Result<Option<&str>, ApiError> {
    match params.get("grant_type") {
        None => Err(ApiError::bad_request("grant_type is missing")),
        Some(CLIENT_CREDENTIALS) => Ok(params.get("scope")),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only the client_credentials grant is supported",
        )),
    }
}

// ---- responses ----------------------------------------------------------------------------

/// `invalid_client` (401) with the Basic challenge (RFC 6749 §5.2), plus `Bearer` where a
/// bearer token would also do.
fn invalid_client(description: &str, bearer_too: bool) -> ApiError {
    ApiError {
        challenge: Some(if bearer_too {
            format!("{BASIC_CHALLENGE}, Bearer realm=\"stratus\"")
        } else {
            BASIC_CHALLENGE.to_string()
        }),
        ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
}

/// Marks a response as not cacheable (RFC 6749 §5.1; RFC 7662 §4 for introspection).
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn respond(result: Result<Response, ApiError>) -> Response {
    no_store(result.unwrap_or_else(IntoResponse::into_response))
}

/// A successful token response (RFC 6749 §5.1).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// The access token (a JWT; opaque to clients).
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
    /// Granted scopes, space-separated.
    pub scope: String,
}

/// The body of `POST /oauth/token` (form-urlencoded).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// Must be `client_credentials`.
    pub grant_type: String,
    /// Space-separated scopes to narrow the token to (default: all of the client's).
    pub scope: Option<String>,
    /// Client id, when not authenticating with HTTP Basic.
    pub client_id: Option<String>,
    /// Client secret, when not authenticating with HTTP Basic.
    pub client_secret: Option<String>,
}

/// The body of `POST /oauth/revoke` and `POST /oauth/introspect` (form-urlencoded).
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenParam {
    /// The access token.
    pub token: String,
    /// `access_token` (the only kind there is; ignored).
    pub token_type_hint: Option<String>,
    /// Client id, when not authenticating with HTTP Basic (or a bearer token).
    pub client_id: Option<String>,
    /// Client secret, when not authenticating with HTTP Basic (or a bearer token).
    pub client_secret: Option<String>,
}

/// An introspection answer (RFC 7662 §2.2): only `active` when the token is not.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Introspection {
    /// Whether the token is valid now.
    pub active: bool,
    /// Its scopes, space-separated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The client it was issued to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Its subject (the same client or device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// `Bearer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// Expiry, epoch seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Issue time, epoch seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Token id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

impl Introspection {
    fn active(c: Claims) -> Introspection {
        Introspection {
            active: true,
            scope: Some(c.scope),
            client_id: Some(c.sub.clone()),
            sub: Some(c.sub),
            token_type: Some("Bearer".into()),
            exp: Some(c.exp),
            iat: Some(c.iat),
            jti: Some(c.jti),
            iss: Some(c.iss),
        }
    }
}

/// What `caller` may learn about `token`: the admin learns about every token, anyone else
/// only about its own; an invalid, expired, revoked or foreign token is just inactive.
pub fn introspection(auth: &Auth, caller: &Principal, token: &str) -> Introspection {
    match auth.verify_token(token) {
        Ok((_, c)) if c.sub == caller.id || caller.has_scope(auth::SCOPE_ADMIN) => {
            Introspection::active(c)
        }
        _ => Introspection::default(),
    }
}

// ---- the shared steps of the handlers ----------------------------------------------------

pub(crate) type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

/// Reads a form body (400 `invalid_request` for anything else).
fn read_form(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Params, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !is_form(content_type) {
        return Err(ApiError::bad_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(e.status(), "invalid_request", "the body is too large")
        } else {
            ApiError::new(e.status(), "invalid_request", "the body could not be read")
        }
    })?;
    parse_form(&body).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Counts a failed authentication and records it for the audit log (aggregated, see
/// [`crate::audit::failures`]); returns `error`.
fn auth_failed(
    state: &ApiState,
    peer: &Peer,
    endpoint: &'static str,
    claimed: Option<&str>,
    error: ApiError,
) -> ApiError {
    state.broker.metrics.auth_failure("oauth");
    let remote = peer.as_ref().map(|Extension(ConnectInfo(addr))| *addr);
    tracing::info!(
        endpoint,
        client = claimed.unwrap_or("-"),
        remote = %remote.map_or_else(|| "-".to_string(), |r| r.to_string()),
        reason = %error.description,
        "oauth authentication failed"
    );
    state.failures.record(crate::audit::failures::Failure {
        transport: "oauth",
        target: endpoint,
        remote,
        identity: claimed,
        reason: &error.description,
        throttled: false,
    });
    error
}

/// Appends to the audit log; a failure is logged, never shown to the caller.
async fn audit(
    state: &ApiState,
    actor: String,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    let entry = NewAuditEntry {
        ts_ms: crate::persist::now_ms() as i64,
        actor,
        action: action.to_string(),
        target: target.to_string(),
        detail,
    };
    if let Err(e) = state.store.append_audit(entry).await {
        tracing::error!(error = %e, action, "could not append to the audit log");
    }
}

/// The credentials of a request, with refusals counted and audited.
async fn read_credentials(
    state: &ApiState,
    peer: &Peer,
    endpoint: &'static str,
    headers: &HeaderMap,
    params: &Params,
    allow_bearer: bool,
) -> Result<Option<Credentials>, ApiError> {
    match credentials(headers.get(header::AUTHORIZATION), params, allow_bearer) {
        Ok(c) => Ok(c),
        Err(Refusal::InvalidRequest(why)) => Err(ApiError::bad_request(why)),
        Err(Refusal::InvalidClient { reason, claimed }) => Err(auth_failed(
            state,
            peer,
            endpoint,
            claimed.as_deref(),
            invalid_client(reason, allow_bearer),
        )),
        Err(Refusal::InvalidToken(why)) => Err(auth_failed(
            state,
            peer,
            endpoint,
            None,
            ApiError::invalid_token(why),
        )),
    }
}

/// The answer to a request without credentials (counted and audited).
fn missing_credentials(
    state: &ApiState,
    peer: &Peer,
    endpoint: &'static str,
    allow_bearer: bool,
) -> ApiError {
    let error = invalid_client("client authentication is required", allow_bearer);
    auth_failed(state, peer, endpoint, None, error)
}

/// Verifies credentials; failures are counted and audited (also the dashboard's sign-in).
pub(crate) async fn authenticate(
    state: &ApiState,
    peer: &Peer,
    endpoint: &'static str,
    credentials: Credentials,
    allow_bearer: bool,
) -> Result<Principal, ApiError> {
    let source = peer.as_ref().map(|Extension(ConnectInfo(addr))| addr.ip());
    let verdict = match &credentials {
        Credentials::Basic(b) => match state
            .auth
            .authenticate_secret_from(&b.id, &b.secret, source)
            .await
        {
            Err(AuthError::BadCredentials) if b.raw.is_some() => {
                let (id, secret) = b.raw.as_ref().map_or(("", ""), |(i, s)| (i, s));
                state
                    .auth
                    .authenticate_secret_from(id, secret, source)
                    .await
            }
            other => other,
        },
        Credentials::Form { id, secret } => {
            state
                .auth
                .authenticate_secret_from(id, secret, source)
                .await
        }
        Credentials::Bearer(token) => {
            state
                .auth
                .verify_token(token)
                .map(|(p, _)| p)
                .map_err(|e| match e {
                    AuthError::InvalidToken(why) => {
                        state.auth.record_failure(source, None);
                        // A source that keeps showing bad tokens is told to slow down.
                        match state.auth.check_throttle(source, None) {
                            Err(throttled) => throttled,
                            Ok(()) => AuthError::InvalidToken(why),
                        }
                    }
                    other => other,
                })
        }
    };
    match verdict {
        Ok(p) => Ok(p),
        Err(AuthError::BadCredentials) => Err(auth_failed(
            state,
            peer,
            endpoint,
            credentials.claimed(),
            invalid_client("invalid client credentials", allow_bearer),
        )),
        Err(AuthError::InvalidToken(why)) => Err(auth_failed(
            state,
            peer,
            endpoint,
            None,
            ApiError::invalid_token(why),
        )),
        Err(e) => match ApiError::from_auth_backoff(&e) {
            Some(refusal) => {
                state.broker.metrics.limit_hit("auth_throttle", 1);
                if let AuthError::Throttled { .. } = e {
                    // Refused by the back-off: still a failed login, counted as throttled.
                    state.failures.record(crate::audit::failures::Failure {
                        transport: "oauth",
                        target: endpoint,
                        remote: peer.as_ref().map(|Extension(ConnectInfo(addr))| *addr),
                        identity: credentials.claimed(),
                        reason: &refusal.description,
                        throttled: true,
                    });
                }
                Err(refusal)
            }
            None => Err(ApiError::internal("client authentication", &e)),
        },
    }
}

// ---- the OAuth endpoints -----------------------------------------------------------------

/// Issues an access token to an authenticated client (RFC 6749 §4.4).
#[utoipa::path(
    post,
    path = "/oauth/token",
    tag = "oauth",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    security(("client_basic" = []), ()),
    responses(
        (status = 200, description = "Token issued (Cache-Control: no-store)", body = TokenResponse),
        (status = 400, description = "invalid_request, unsupported_grant_type, invalid_scope or unauthorized_client", body = ErrorBody),
        (status = 401, description = "invalid_client, with WWW-Authenticate: Basic", body = ErrorBody),
    )
)]
async fn token(
    State(state): State<ApiState>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(token_inner(&state, &peer, &headers, body).await)
}

async fn token_inner(
    state: &ApiState,
    peer: &Peer,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    const ENDPOINT: &str = "oauth/token";
    let params = read_form(headers, body)?;
    let creds = read_credentials(state, peer, ENDPOINT, headers, &params, false).await?;
    let scope = grant(&params)?;
    let Some(creds) = creds else {
        return Err(missing_credentials(state, peer, ENDPOINT, false));
    };
    let principal = authenticate(state, peer, ENDPOINT, creds, false).await?;
    if principal.scopes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "this client holds no scope to issue a token for",
        ));
    }
    let issued = state.auth.issue(&principal, scope).map_err(|s| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!(
                "the client may not have the scope {}",
                printable(&s, "it asked for")
            ),
        )
    })?;
    Ok(Json(TokenResponse {
        access_token: issued.access_token,
        token_type: "Bearer".into(),
        expires_in: issued.expires_in,
        scope: issued.scope,
    })
    .into_response())
}

/// Revokes an access token (RFC 7009). A client may revoke its own tokens, the admin any;
/// the answer is 200 whether or not the token was valid, known or revocable by the caller.
#[utoipa::path(
    post,
    path = "/oauth/revoke",
    tag = "oauth",
    request_body(content = TokenParam, content_type = "application/x-www-form-urlencoded"),
    security(("client_basic" = []), ()),
    responses(
        (status = 200, description = "Done (or nothing to do); empty body"),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 401, description = "invalid_client, with WWW-Authenticate: Basic", body = ErrorBody),
    )
)]
async fn revoke(
    State(state): State<ApiState>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(revoke_inner(&state, &peer, &headers, body).await)
}

async fn revoke_inner(
    state: &ApiState,
    peer: &Peer,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    const ENDPOINT: &str = "oauth/revoke";
    let params = read_form(headers, body)?;
    let creds = read_credentials(state, peer, ENDPOINT, headers, &params, false).await?;
    let Some(creds) = creds else {
        return Err(missing_credentials(state, peer, ENDPOINT, false));
    };
    let token = params
        .get("token")
        .ok_or_else(|| ApiError::bad_request("token is missing"))?;
    let principal = authenticate(state, peer, ENDPOINT, creds, false).await?;
    let revoked = state
        .auth
        .revoke_token(token, &principal)
        .await
        .map_err(|e| ApiError::internal("revocation", &e))?;
    if let Some(c) = revoked {
        audit(
            state,
            principal.id.clone(),
            "token.revoke",
            &format!("token/{}", c.jti),
            json!({"sub": c.sub, "exp": c.exp}),
        )
        .await;
    }
    Ok(StatusCode::OK.into_response())
}

/// Tells whether a token is active, and its claims (RFC 7662). The caller authenticates as a
/// client (Basic or form) or with a bearer token; the admin may introspect any token, anyone
/// else only its own.
#[utoipa::path(
    post,
    path = "/oauth/introspect",
    tag = "oauth",
    request_body(content = TokenParam, content_type = "application/x-www-form-urlencoded"),
    security(("client_basic" = []), ("bearer" = []), ()),
    responses(
        (status = 200, description = "The token's state", body = Introspection),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 401, description = "invalid_client (WWW-Authenticate: Basic) or invalid_token (WWW-Authenticate: Bearer)", body = ErrorBody),
    )
)]
async fn introspect(
    State(state): State<ApiState>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(introspect_inner(&state, &peer, &headers, body).await)
}

async fn introspect_inner(
    state: &ApiState,
    peer: &Peer,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    const ENDPOINT: &str = "oauth/introspect";
    let params = read_form(headers, body)?;
    let creds = read_credentials(state, peer, ENDPOINT, headers, &params, true).await?;
    // Refuse anonymous callers before saying anything about their parameters.
    let Some(creds) = creds else {
        return Err(missing_credentials(state, peer, ENDPOINT, true));
    };
    let token = params
        .get("token")
        .ok_or_else(|| ApiError::bad_request("token is missing"))?;
    let caller = authenticate(state, peer, ENDPOINT, creds, true).await?;
    Ok(Json(introspection(&state.auth, &caller, token)).into_response())
}

// ---- application clients (admin) ---------------------------------------------------------

/// A new application client.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewClient {
    /// Its id, `[A-Za-z0-9._-]{1,64}`, unique among clients and devices.
    pub client_id: String,
    /// Scopes it may be granted, from `telemetry:read`, `devices:write`, `firmware:write`,
    /// `admin`.
    pub scopes: Vec<String>,
}

/// A registered application client.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientView {
    /// Its id.
    pub client_id: String,
    /// Scopes it may be granted.
    pub scopes: Vec<String>,
    /// When it was registered, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

/// A client just registered: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedClient {
    /// Its id.
    pub client_id: String,
    /// Its secret (stored only as an argon2 hash).
    pub client_secret: String,
    /// Scopes it may be granted.
    pub scopes: Vec<String>,
    /// When it was registered, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

impl From<OAuthClient> for ClientView {
    fn from(c: OAuthClient) -> Self {
        ClientView {
            client_id: c.client_id,
            scopes: c.scopes,
            created_at_ms: c.created_at_ms,
        }
    }
}

/// The scopes of a new client: known application scopes, each once, at least one.
pub fn client_scopes(asked: &[String]) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for s in asked {
        if !auth::APPLICATION_SCOPES.contains(&s.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown scope {}; use {}",
                printable(s, "(unprintable)"),
                auth::APPLICATION_SCOPES.join(", ")
            )));
        }
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad_request("scopes must name at least one scope"));
    }
    Ok(out)
}

/// Registers an application client and shows its secret once.
#[utoipa::path(
    post,
    path = "/api/v1/clients",
    tag = "clients",
    request_body = NewClient,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered; the secret is shown only now", body = CreatedClient),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 403, description = "insufficient_scope (needs admin)", body = ErrorBody),
        (status = 409, description = "conflict: the id is taken by a client or device", body = ErrorBody),
    )
)]
async fn create_client(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Json<NewClient>, JsonRejection>,
) -> Result<Response, ApiError> {
    let by = caller.require(auth::SCOPE_ADMIN)?;
    let Json(new) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let scopes = client_scopes(&new.scopes)?;
    let secret = auth::new_secret();
    let hashed = secret.clone();
    let secret_hash = auth::run_argon2(move || auth::hash_secret(&hashed))
        .await
        .ok_or_else(|| ApiError::internal("hashing the secret", &"the hashing threads are gone"))?;
    let client = state
        .store
        .create_client(OAuthClient {
            client_id: new.client_id,
            secret_hash,
            scopes,
            created_at_ms: crate::persist::now_ms() as i64,
        })
        .await?;
    state.auth.register_client(&client);
    audit(
        &state,
        by.id.clone(),
        "client.create",
        &format!("clients/{}", client.client_id),
        json!({"scopes": client.scopes}),
    )
    .await;
    let location = HeaderValue::from_str(&format!("/api/v1/clients/{}", client.client_id)).ok();
    let mut response = (
        StatusCode::CREATED,
        Json(CreatedClient {
            client_id: client.client_id,
            client_secret: secret,
            scopes: client.scopes,
            created_at_ms: client.created_at_ms,
        }),
    )
        .into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(no_store(response))
}

/// Every application client (and the admin), ordered by id.
#[utoipa::path(
    get,
    path = "/api/v1/clients",
    tag = "clients",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The clients", body = [ClientView]),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 403, description = "insufficient_scope (needs admin)", body = ErrorBody),
    )
)]
async fn list_clients(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<ClientView>>, ApiError> {
    caller.require(auth::SCOPE_ADMIN)?;
    let clients = state.store.list_clients().await?;
    Ok(Json(clients.into_iter().map(ClientView::from).collect()))
}

/// One application client.
#[utoipa::path(
    get,
    path = "/api/v1/clients/{id}",
    tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The client", body = ClientView),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 403, description = "insufficient_scope (needs admin)", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    )
)]
async fn get_client(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ClientView>, ApiError> {
    caller.require(auth::SCOPE_ADMIN)?;
    match state.store.client(&id).await? {
        Some(c) => Ok(Json(c.into())),
        None => Err(ApiError::not_found("no such client")),
    }
}

/// Gives a client a new secret, shown once: the old secret and every token issued before stop
/// working at once, and its MQTT connections end.
#[utoipa::path(
    post,
    path = "/api/v1/clients/{id}/secret",
    tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new secret, shown only now", body = CreatedClient),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 403, description = "insufficient_scope (needs admin)", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    )
)]
async fn rotate_client_secret(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let by = caller.require(auth::SCOPE_ADMIN)?;
    let Some(mut client) = state.store.client(&id).await? else {
        return Err(ApiError::not_found("no such client"));
    };
    let secret = auth::new_secret();
    let hashed = secret.clone();
    client.secret_hash = auth::run_argon2(move || auth::hash_secret(&hashed))
        .await
        .ok_or_else(|| ApiError::internal("hashing the secret", &"the hashing threads are gone"))?;
    state
        .store
        .set_client_secret(&client.client_id, &client.secret_hash)
        .await?;
    state.auth.register_client(&client);
    audit(
        &state,
        by.id.clone(),
        "client.rotate_secret",
        &format!("clients/{id}"),
        serde_json::Value::Null,
    )
    .await;
    tracing::info!(client = %id, by = %by.id, "client secret rotated");
    Ok(no_store(
        Json(CreatedClient {
            client_id: client.client_id,
            client_secret: secret,
            scopes: client.scopes,
            created_at_ms: client.created_at_ms,
        })
        .into_response(),
    ))
}

/// Deletes an application client; its tokens stop working at once. The bootstrap admin
/// cannot be deleted.
#[utoipa::path(
    delete,
    path = "/api/v1/clients/{id}",
    tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 403, description = "insufficient_scope (needs admin)", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 409, description = "conflict: the bootstrap admin", body = ErrorBody),
    )
)]
async fn delete_client(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let by = caller.require(auth::SCOPE_ADMIN)?;
    if id == auth::ADMIN_CLIENT {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the bootstrap admin client cannot be deleted",
        ));
    }
    state.store.delete_client(&id).await?;
    state.auth.forget(&id);
    // Its MQTT sessions end with it.
    state
        .broker
        .end_sessions(&crate::broker::Owner::Client(id.as_str().into()), None);
    audit(
        &state,
        by.id.clone(),
        "client.delete",
        &format!("clients/{id}"),
        serde_json::Value::Null,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// ---- routes ------------------------------------------------------------------------------

#[derive(OpenApi)]
#[openapi(
    tags(
        (name = "oauth", description = "OAuth 2.0: client credentials (RFC 6749 §4.4), revocation (RFC 7009), introspection (RFC 7662)"),
        (name = "clients", description = "Application clients (admin)"),
    ),
    modifiers(&ClientBasicScheme)
)]
struct OAuthDoc;

struct ClientBasicScheme;

impl utoipa::Modify for ClientBasicScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "client_basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "Client id and secret, each form-urlencoded (RFC 6749 §2.3.1)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The routes of this module.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(OAuthDoc::openapi())
        .routes(routes!(token))
        .routes(routes!(revoke))
        .routes(routes!(introspect))
        .routes(routes!(list_clients, create_client))
        .routes(routes!(get_client, delete_client))
        .routes(routes!(rotate_client_secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(raw: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    fn params(body: &str) -> Params {
        parse_form(body.as_bytes()).unwrap_or_default()
    }

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%20c").as_deref(), Some("a b c"));
        assert_eq!(form_decode("%2B%25%3a").as_deref(), Some("+%:"));
        assert_eq!(form_decode("%C3%A9t%C3%A9").as_deref(), Some("été"));
        assert_eq!(form_decode("plain").as_deref(), Some("plain"));
        assert_eq!(form_decode(""), Some(String::new()));
        assert_eq!(form_decode("100%"), None);
        assert_eq!(form_decode("%4"), None);
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%FF"), None, "not UTF-8");
    }

    #[test]
    fn form_parsing() {
        let p = params("grant_type=client_credentials&scope=telemetry%3Aread+admin");
        assert_eq!(p.get("grant_type"), Some("client_credentials"));
        assert_eq!(p.get("scope"), Some("telemetry:read admin"));
        assert_eq!(p.get("missing"), None);
        // Empty values and empty pieces count as absent (RFC 6749 §3.1).
        let p = params("&scope=&grant_type=x&&flag");
        assert_eq!(p.get("scope"), None);
        assert_eq!(p.get("flag"), None);
        assert_eq!(p.get("grant_type"), Some("x"));
        assert_eq!(parse_form(b""), Ok(Params::default()));
        // A value may contain '='.
        assert_eq!(params("token=a.b=c").get("token"), Some("a.b=c"));
        // Encoded names.
        assert_eq!(params("client%5Fid=x").get("client_id"), Some("x"));
    }

    #[test]
    fn form_errors() {
        assert_eq!(
            parse_form(b"scope=a&scope=b"),
            Err(FormError::Repeated("scope".into()))
        );
        assert_eq!(
            parse_form(b"sc%0Ape=a&sc%0Ape=b"),
            Err(FormError::Repeated("a parameter".into()))
        );
        // An empty repetition is no repetition (the empty one is absent).
        assert!(parse_form(b"scope=&scope=b").is_ok());
        assert_eq!(parse_form(b"token=%zz"), Err(FormError::BadEncoding));
        assert_eq!(parse_form(b"token=\xff"), Err(FormError::NotUtf8));
    }

    #[test]
    fn content_types() {
        assert!(is_form(Some("application/x-www-form-urlencoded")));
        assert!(is_form(Some(
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8"
        )));
        assert!(!is_form(Some("application/json")));
        assert!(!is_form(Some("multipart/form-data; boundary=x")));
        assert!(!is_form(None));
    }

    #[test]
    fn basic_plain_and_encoded() {
        let b = parse_basic(&basic("admin:s3cret")).ok();
        assert_eq!(
            b,
            Some(BasicCredentials {
                id: "admin".into(),
                secret: "s3cret".into(),
                raw: None
            })
        );
        // RFC 6749 §2.3.1: both halves are form-urlencoded; the raw pair is kept as well.
        let b = parse_basic(&basic("my%20app:a%2Bb+c%3Ad")).ok();
        assert_eq!(
            b,
            Some(BasicCredentials {
                id: "my app".into(),
                secret: "a+b c:d".into(),
                raw: Some(("my%20app".into(), "a%2Bb+c%3Ad".into())),
            })
        );
        // The secret may contain ':' (only the first one splits).
        let b = parse_basic(&basic("id:x:y")).ok().map(|b| b.secret);
        assert_eq!(b.as_deref(), Some("x:y"));
        // Not decodable: taken as sent.
        let b = parse_basic(&basic("id:100%")).ok();
        assert_eq!(
            b,
            Some(BasicCredentials {
                id: "id".into(),
                secret: "100%".into(),
                raw: None
            })
        );
        // Padding is optional.
        let unpadded = basic("ab:c").trim_end_matches('=').to_string();
        assert_eq!(
            parse_basic(&unpadded).ok().map(|b| b.id).as_deref(),
            Some("ab")
        );
        // An empty secret is a secret (that will not verify).
        assert_eq!(
            parse_basic(&basic("id:")).ok().map(|b| b.secret),
            Some(String::new())
        );
    }

    #[test]
    fn basic_malformed() {
        assert_eq!(parse_basic("!!!not base64"), Err(BasicError::Base64));
        assert_eq!(parse_basic(""), Err(BasicError::MissingColon));
        assert_eq!(
            parse_basic(&basic("nocolon")),
            Err(BasicError::MissingColon)
        );
        assert_eq!(parse_basic(&basic(":secret")), Err(BasicError::EmptyId));
    }

    #[test]
    fn basic_latin1_fallback() {
        // Not UTF-8: read as ISO-8859-1, as `requests` encodes str credentials.
        let latin1 = base64::engine::general_purpose::STANDARD.encode(b"id:caf\xe9");
        assert_eq!(
            parse_basic(&latin1).ok().map(|b| b.secret).as_deref(),
            Some("café")
        );
        let utf8 = basic("id:café");
        assert_eq!(
            parse_basic(&utf8).ok().map(|b| b.secret).as_deref(),
            Some("café")
        );
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("x"))
    }

    #[test]
    fn credentials_methods() {
        let none = Params::default();
        assert_eq!(credentials(None, &none, false), Ok(None));
        let form = params("client_id=app&client_secret=s");
        assert_eq!(
            credentials(None, &form, false),
            Ok(Some(Credentials::Form {
                id: "app".into(),
                secret: "s".into()
            }))
        );
        let h = header(&format!("Basic {}", basic("app:s")));
        assert!(matches!(
            credentials(Some(&h), &none, false),
            Ok(Some(Credentials::Basic(_)))
        ));
        let h = header(&format!("basic   {}", basic("app:s")));
        assert!(matches!(
            credentials(Some(&h), &none, false),
            Ok(Some(Credentials::Basic(_)))
        ));
        // Basic plus the same client_id in the form is fine (some clients always send it).
        let same = params("client_id=app");
        let h = header(&format!("Basic {}", basic("app:s")));
        assert!(matches!(
            credentials(Some(&h), &same, false),
            Ok(Some(Credentials::Basic(_)))
        ));
        let t = header("Bearer abc.def.ghi");
        assert_eq!(
            credentials(Some(&t), &none, true),
            Ok(Some(Credentials::Bearer("abc.def.ghi".into())))
        );
    }

    #[test]
    fn credentials_refusals() {
        let none = Params::default();
        let h = header(&format!("Basic {}", basic("app:s")));
        assert!(matches!(
            credentials(Some(&h), &params("client_id=app&client_secret=s"), false),
            Err(Refusal::InvalidRequest(_))
        ));
        assert!(matches!(
            credentials(Some(&h), &params("client_id=other"), false),
            Err(Refusal::InvalidRequest(_))
        ));
        assert!(matches!(
            credentials(None, &params("client_secret=s"), false),
            Err(Refusal::InvalidRequest(_))
        ));
        assert_eq!(
            credentials(None, &params("client_id=app"), false).err(),
            Some(Refusal::InvalidClient {
                reason: "client_secret is missing (every client is confidential)",
                claimed: Some("app".into())
            })
        );
        assert!(matches!(
            credentials(Some(&header("Basic %%%")), &none, false),
            Err(Refusal::InvalidClient { claimed: None, .. })
        ));
        assert!(matches!(
            credentials(Some(&header("Bearer abc")), &none, false),
            Err(Refusal::InvalidClient { .. })
        ));
        assert!(matches!(
            credentials(Some(&header("Digest x")), &none, true),
            Err(Refusal::InvalidClient { .. })
        ));
        assert!(matches!(
            credentials(Some(&header("Bearer")), &none, true),
            Err(Refusal::InvalidToken(_))
        ));
        let opaque =
            HeaderValue::from_bytes(b"Basic \xff").unwrap_or(HeaderValue::from_static("x"));
        assert!(matches!(
            credentials(Some(&opaque), &none, false),
            Err(Refusal::InvalidClient { .. })
        ));
    }

    #[test]
    fn grants() {
        assert_eq!(
            grant(&params("grant_type=client_credentials")).ok(),
            Some(None)
        );
        assert_eq!(
            grant(&params("grant_type=client_credentials&scope=admin")).ok(),
            Some(Some("admin"))
        );
        assert_eq!(
            grant(&params("scope=admin")).err().map(|e| e.code),
            Some("invalid_request")
        );
        assert_eq!(
            grant(&params("grant_type=password")).err().map(|e| e.code),
            Some("unsupported_grant_type")
        );
    }

    #[test]
    fn descriptions() {
        assert_eq!(printable("telemetry:read", "x"), "telemetry:read");
        assert_eq!(printable("a\"b", "x"), "x");
        assert_eq!(printable("é", "x"), "x");
    }

    #[test]
    fn scopes_of_new_clients() {
        let ok = client_scopes(&["telemetry:read".into(), "telemetry:read".into()]);
        assert_eq!(ok.ok(), Some(vec!["telemetry:read".to_string()]));
        assert!(client_scopes(&[]).is_err());
        assert!(client_scopes(&["device".into()]).is_err());
        assert!(client_scopes(&["bogus".into()]).is_err());
    }

    /// The token, revocation and introspection rules against a real store and directory.
    #[tokio::test]
    async fn introspection_rules() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = stratus_store::StoreHandle::open_sqlite(&dir.path().join("store.db"))?;
        let auth = Auth::open(store.clone(), dir.path()).await?;
        assert_eq!(
            auth.bootstrap_admin(dir.path(), Some("pw".into())).await?,
            None
        );
        let admin = auth.authenticate_secret("admin", "pw").await?;
        let app = OAuthClient {
            client_id: "app".into(),
            secret_hash: auth::hash_secret("app-secret"),
            scopes: vec![auth::SCOPE_TELEMETRY_READ.into()],
            created_at_ms: 0,
        };
        store.create_client(app.clone()).await?;
        auth.register_client(&app);
        let app = auth.authenticate_secret("app", "app-secret").await?;

        let admin_token = auth.issue(&admin, None)?.access_token;
        let app_token = auth.issue(&app, None)?.access_token;
        assert_eq!(
            auth.issue(&app, Some("admin")).err().as_deref(),
            Some("admin")
        );
        // The admin holds every scope there is, and only those.
        assert_eq!(
            auth.issue(&admin, Some("bogus")).err().as_deref(),
            Some("bogus")
        );
        assert_eq!(
            auth.issue(&admin, Some("device")).err().as_deref(),
            Some("device")
        );
        let narrowed = auth.issue(&admin, Some("telemetry:read  devices:write"))?;
        assert_eq!(narrowed.scope, "telemetry:read devices:write");

        // Its own token: active, with every claim.
        let own = introspection(&auth, &app, &app_token);
        assert!(own.active);
        assert_eq!(own.sub.as_deref(), Some("app"));
        assert_eq!(own.client_id.as_deref(), Some("app"));
        assert_eq!(own.scope.as_deref(), Some("telemetry:read"));
        assert_eq!(own.token_type.as_deref(), Some("Bearer"));
        assert_eq!(own.iss.as_deref(), Some("stratus"));
        // Someone else's: inactive for a client, active for the admin.
        assert_eq!(
            introspection(&auth, &app, &admin_token),
            Introspection::default()
        );
        assert!(introspection(&auth, &admin, &app_token).active);
        // Garbage: inactive, and serialized as just {"active": false}.
        let garbage = introspection(&auth, &admin, "not.a.token");
        assert_eq!(serde_json::to_value(&garbage)?, json!({"active": false}));

        // A client cannot revoke another's token; the owner can.
        assert!(auth.revoke_token(&admin_token, &app).await?.is_none());
        assert!(introspection(&auth, &admin, &admin_token).active);
        assert!(auth.revoke_token(&app_token, &app).await?.is_some());
        assert!(!introspection(&auth, &admin, &app_token).active);
        // Unknown tokens are ignored.
        assert!(auth.revoke_token("garbage", &admin).await?.is_none());
        Ok(())
    }

    /// A generated admin secret is saved with mode 0600 and created only once.
    #[tokio::test]
    async fn generated_admin_secret() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let store = stratus_store::StoreHandle::open_sqlite(&dir.path().join("store.db"))?;
        let auth = Auth::open(store.clone(), dir.path()).await?;
        let secret = auth
            .bootstrap_admin(dir.path(), None)
            .await?
            .ok_or("no secret generated")?;
        let file = dir.path().join("admin-secret");
        assert_eq!(std::fs::read_to_string(&file)?.trim(), secret);
        assert_eq!(
            std::fs::metadata(&file)?.permissions().mode() & 0o777,
            0o600
        );
        assert!(auth.authenticate_secret("admin", &secret).await.is_ok());
        // A second start (a fresh directory over the same store) changes nothing.
        let again = Auth::open(store, dir.path()).await?;
        assert_eq!(again.bootstrap_admin(dir.path(), None).await?, None);
        assert_eq!(std::fs::read_to_string(&file)?.trim(), secret);
        assert!(again.authenticate_secret("admin", &secret).await.is_ok());
        Ok(())
    }
}
