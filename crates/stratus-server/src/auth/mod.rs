//! Identities and credentials: device and application secrets (argon2), OAuth 2.0 access
//! tokens (HS256 JWTs), the revocation list, and the in-memory directory that keeps checking a
//! credential cheap on every MQTT CONNECT and HTTP request.
//!
//! ## Why these choices
//! - Secrets are 32 random bytes shown once (base64url) and stored only as argon2id PHC hashes
//!   (`argon2`: the RustCrypto implementation of the password-hashing winner). Verifying one
//!   costs tens of milliseconds on purpose, so a verified secret is remembered as a keyed
//!   SHA-256 digest (the key is random per process): a device reconnecting with the same
//!   secret costs one SHA-256, not one argon2.
//! - Access tokens are JWTs signed with HMAC-SHA-256 (`jsonwebtoken`) under a 256-bit key kept
//!   in `DATA_DIR/token.key` (mode 0600). Verifying one is a MAC and a few map lookups — no
//!   store read — so it stays cheap on the hot path, survives restarts, and a resource server
//!   needs nothing but the key. The price of self-contained tokens is revocation: revoked
//!   token ids (`jti`) are kept in the store until the token would have expired and mirrored
//!   in memory; a deleted principal's tokens stop working at once (the directory no longer
//!   knows it), a rotated secret invalidates the tokens issued before the rotation.
//! - The directory of principals (every device and client: id, kind, scopes, hash) is loaded
//!   at start and kept in step by the API; a fleet of 100,000 devices is a few tens of MiB.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::PasswordHash;
use argon2::Argon2;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stratus_store::{OAuthClient, StoreError, StoreHandle};

use crate::coap::psk::PskSealer;

/// Scope of a device's tokens.
pub const SCOPE_DEVICE: &str = "device";
/// Scope that reads telemetry (HTTP queries, the stream, MQTT `devices/+/telemetry`).
pub const SCOPE_TELEMETRY_READ: &str = "telemetry:read";
/// Scope that manages the device registry and desired configuration.
pub const SCOPE_DEVICES_WRITE: &str = "devices:write";
/// Scope that uploads and assigns firmware.
pub const SCOPE_FIRMWARE_WRITE: &str = "firmware:write";
/// Scope that may do everything.
pub const SCOPE_ADMIN: &str = "admin";
/// Every scope an application may hold.
pub const APPLICATION_SCOPES: [&str; 4] = [
    SCOPE_TELEMETRY_READ,
    SCOPE_DEVICES_WRITE,
    SCOPE_FIRMWARE_WRITE,
    SCOPE_ADMIN,
];

/// The id of the bootstrap administrator client.
pub const ADMIN_CLIENT: &str = "admin";

/// Default lifetime of an access token, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// Why a credential was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown id or wrong secret (never say which).
    #[error("invalid client credentials")]
    BadCredentials,
    /// The token is malformed, forged, expired, revoked, or its principal is gone.
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing the key file failed.
    #[error("token key: {0}")]
    Key(#[from] std::io::Error),
}

/// What kind of principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A device (scope `device`, confined to `devices/{id}/…`).
    Device,
    /// An application or the admin.
    Client,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Device id or client id.
    pub id: String,
    /// Device or client.
    pub kind: Kind,
    /// Granted scopes.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the principal holds `scope` (`admin` holds every scope).
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == SCOPE_ADMIN)
    }

    /// Whether this is the device `id`.
    pub fn is_device(&self, id: &str) -> bool {
        self.kind == Kind::Device && self.id == id
    }
}

/// A known principal in the directory.
#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    scopes: Vec<String>,
    secret_hash: String,
    /// Keyed digest of the last secret that verified against `secret_hash`.
    verified: Option<[u8; 32]>,
    /// Tokens issued before this (epoch seconds) are void (secret rotated).
    tokens_valid_from: u64,
    /// A device's CoAPS pre-shared key, sealed (see [`crate::coap::psk`]).
    coap_psk: Option<Vec<u8>>,
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: `stratus`.
    pub iss: String,
    /// The principal's id.
    pub sub: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Device or client.
    pub kind: Kind,
    /// Issued at (epoch seconds).
    pub iat: u64,
    /// Expires at (epoch seconds).
    pub exp: u64,
    /// Token id, for revocation.
    pub jti: String,
}

/// An issued access token.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The JWT.
    pub access_token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Granted scopes, space-separated.
    pub scope: String,
}

/// Credentials, tokens and the principal directory.
pub struct Auth {
    store: StoreHandle,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    digest_key: [u8; 32],
    directory: RwLock<HashMap<String, Entry>>,
    revoked: RwLock<HashMap<String, u64>>,
    token_ttl_secs: u64,
    psk: PskSealer,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Threads that run argon2. Each hash takes a 19 MiB working buffer; on tokio's blocking pool
/// every thread keeps its own freed buffer in its malloc arena, so registering many devices at
/// once grew the server by gigabytes. Two dedicated threads bound that to two buffers.
const ARGON2_THREADS: usize = 2;

type Argon2Job = Box<dyn FnOnce() + Send>;

fn argon2_pool() -> &'static std::sync::Mutex<std::sync::mpsc::Sender<Argon2Job>> {
    static POOL: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Argon2Job>>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Argon2Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for n in 0..ARGON2_THREADS {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("stratus-argon2-{n}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
        }
        std::sync::Mutex::new(tx)
    })
}

/// Runs an argon2 computation (`hash_secret`, a verification) on the bounded argon2 threads;
/// `None` if they are gone.
pub async fn run_argon2<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Argon2Job = Box::new(move || {
        let _ = tx.send(f());
    });
    argon2_pool().lock().ok()?.send(job).ok()?;
    rx.await.ok()
}

/// A new random secret: 32 bytes, base64url without padding (43 characters).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Runs argon2 into `out` with a working memory (19 MiB with the default parameters) allocated
/// for this hash and freed after it. Large enough that the allocator maps it from the kernel and
/// unmaps it on free (`stratus` pins glibc's mmap threshold at start-up, see its `main.rs`), so
/// no hash leaves memory behind: an earlier per-thread cache kept 19 MiB per thread that ever
/// hashed, the start-up admin hash alone doubled the idle server's RSS.
fn argon2_into(
    argon2: &Argon2<'_>,
    secret: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    let mut blocks = vec![argon2::Block::default(); argon2.params().block_count()];
    argon2.hash_password_into_with_memory(secret, salt, out, &mut blocks[..])
}

/// The argon2id PHC hash of `secret` (default parameters, 16-byte salt, 32-byte output).
pub fn hash_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let argon2 = Argon2::default();
    let mut out = [0u8; 32];
    // Default parameters with a 16-byte salt and a 32-byte output cannot fail.
    if argon2_into(&argon2, secret.as_bytes(), &salt, &mut out).is_err() {
        return String::new();
    }
    let p = argon2.params();
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        p.m_cost(),
        p.t_cost(),
        p.p_cost(),
        b64.encode(salt),
        b64.encode(out)
    )
}

fn verify_hash(secret: &str, hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(params), Some(salt), Some(expected)) =
        (argon2::Params::try_from(&parsed), parsed.salt, parsed.hash)
    else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = parsed
        .version
        .and_then(|v| argon2::Version::try_from(v).ok())
        .unwrap_or_default();
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let expected = expected.as_bytes();
    if expected.is_empty() || expected.len() > 64 {
        return false;
    }
    let mut out = [0u8; 64];
    let out = &mut out[..expected.len()];
    let argon2 = Argon2::new(algorithm, version, params);
    if argon2_into(&argon2, secret.as_bytes(), salt, out).is_err() {
        return false;
    }
    // Constant time in the contents.
    out.iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Reads the token key from `path`, creating it (mode 0600) on first start.
fn load_or_create_key(path: &Path) -> Result<Vec<u8>, std::io::Error> {
    match std::fs::read(path) {
        Ok(k) if k.len() >= 32 => return Ok(k),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is shorter than 32 bytes", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    write_private(path, &key)?;
    Ok(key)
}

/// Writes `data` to a new file readable by the owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), std::io::Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

impl Auth {
    /// Loads every principal and revocation from the store and the token key from `data_dir`.
    pub async fn open(store: StoreHandle, data_dir: &Path) -> Result<Auth, AuthError> {
        let key = load_or_create_key(&data_dir.join("token.key"))?;
        let psk = PskSealer::load_or_create(data_dir)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&["stratus"]);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let mut digest_key = [0u8; 32];
        rand::rng().fill_bytes(&mut digest_key);
        let auth = Auth {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            validation,
            digest_key,
            directory: RwLock::new(HashMap::new()),
            revoked: RwLock::new(HashMap::new()),
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            store,
            psk,
        };
        auth.reload().await?;
        Ok(auth)
    }

    /// Sets the lifetime of the tokens issued from now on (`[auth] token_ttl_secs`).
    pub fn with_token_ttl(mut self, secs: u64) -> Auth {
        self.token_ttl_secs = secs.max(1);
        self
    }

    /// Re-reads the directory from the store.
    pub async fn reload(&self) -> Result<(), AuthError> {
        let (devices, clients, psks) = self
            .store
            .read(|s| {
                let mut devices = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let page = s.list_devices(after.as_deref(), 1000)?;
                    let last = page.last().map(|d| d.id.clone());
                    devices.extend(page.into_iter().map(|d| (d.id, d.secret_hash)));
                    match last {
                        Some(l) => after = Some(l),
                        None => break,
                    }
                }
                Ok((devices, s.list_clients()?, s.coap_psks()?))
            })
            .await?;
        let mut dir = HashMap::with_capacity(devices.len() + clients.len());
        for (id, secret_hash) in devices {
            dir.insert(id, Entry::device(secret_hash));
        }
        for (id, sealed) in psks {
            if let Some(e) = dir.get_mut(&id) {
                e.coap_psk = Some(sealed);
            }
        }
        for c in clients {
            dir.insert(c.client_id, Entry::client(c.scopes, c.secret_hash));
        }
        *self.directory.write() = dir;
        Ok(())
    }

    /// The store behind the directory.
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// Creates the `admin` client on first start: with `STRATUS_ADMIN_SECRET` when given,
    /// else a generated secret written to `DATA_DIR/admin-secret` (mode 0600) and returned
    /// so it can be printed once. Later starts change nothing (`Ok(None)`).
    pub async fn bootstrap_admin(
        &self,
        data_dir: &Path,
        from_env: Option<String>,
    ) -> Result<Option<String>, AuthError> {
        if self.directory.read().contains_key(ADMIN_CLIENT) {
            return Ok(None);
        }
        let (secret, generated) = match from_env.filter(|s| !s.is_empty()) {
            Some(s) => (s, false),
            None => (new_secret(), true),
        };
        let client = OAuthClient {
            client_id: ADMIN_CLIENT.to_string(),
            secret_hash: hash_secret(&secret),
            scopes: vec![SCOPE_ADMIN.to_string()],
            created_at_ms: (now_secs() * 1000) as i64,
        };
        // The file first: a crash in between leaves a file that a later start overwrites,
        // never an admin whose generated secret was shown to no one.
        if generated {
            write_private(
                &data_dir.join("admin-secret"),
                format!("{secret}\n").as_bytes(),
            )?;
        }
        self.store.create_client(client.clone()).await?;
        self.register_client(&client);
        Ok(generated.then_some(secret))
    }

    /// Adds (or replaces) a device in the directory after it was stored, with its sealed
    /// CoAPS key when it has one.
    pub fn register_device(&self, id: &str, secret_hash: &str, coap_psk: Option<Vec<u8>>) {
        let mut dir = self.directory.write();
        let valid_from = dir.get(id).map_or(0, |_| now_secs());
        let mut e = Entry::device(secret_hash.to_string());
        e.tokens_valid_from = valid_from;
        e.coap_psk = coap_psk;
        dir.insert(id.to_string(), e);
    }

    /// Seals and opens the devices' CoAPS keys (`DATA_DIR/coap-psk.key`).
    pub fn psk_sealer(&self) -> &PskSealer {
        &self.psk
    }

    /// The CoAPS pre-shared key of device `id`: `None` for an unknown device, one without a
    /// stored key (registered before keys were stored and not rotated since), or a key that
    /// does not open.
    pub fn coap_psk(&self, id: &str) -> Option<String> {
        let sealed = {
            let dir = self.directory.read();
            let e = dir.get(id).filter(|e| e.kind == Kind::Device)?;
            e.coap_psk.clone()?
        };
        self.psk.open(id, &sealed)
    }

    /// Adds (or replaces) a client in the directory after it was stored.
    pub fn register_client(&self, client: &OAuthClient) {
        let mut dir = self.directory.write();
        let valid_from = dir.get(&client.client_id).map_or(0, |_| now_secs());
        let mut e = Entry::client(client.scopes.clone(), client.secret_hash.clone());
        e.tokens_valid_from = valid_from;
        dir.insert(client.client_id.clone(), e);
    }

    /// Removes a principal (deleted): its tokens stop working at once.
    pub fn forget(&self, id: &str) {
        self.directory.write().remove(id);
    }

    /// Whether `id` is a known device or client.
    pub fn is_known(&self, id: &str) -> bool {
        self.directory.read().contains_key(id)
    }

    /// Whether `id` is a known device.
    pub fn is_device(&self, id: &str) -> bool {
        self.directory
            .read()
            .get(id)
            .is_some_and(|e| e.kind == Kind::Device)
    }

    fn digest(&self, secret: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.digest_key);
        h.update(secret.as_bytes());
        h.finalize().into()
    }

    /// Checks a client id and secret (token endpoint, MQTT password).
    pub async fn authenticate_secret(
        &self,
        id: &str,
        secret: &str,
    ) -> Result<Principal, AuthError> {
        let digest = self.digest(secret);
        let (hash, principal) = {
            let dir = self.directory.read();
            let Some(e) = dir.get(id) else {
                return Err(AuthError::BadCredentials);
            };
            let principal = e.principal(id);
            if e.verified == Some(digest) {
                return Ok(principal);
            }
            (e.secret_hash.clone(), principal)
        };
        let secret = secret.to_string();
        let ok = run_argon2(move || verify_hash(&secret, &hash))
            .await
            .unwrap_or(false);
        if !ok {
            return Err(AuthError::BadCredentials);
        }
        if let Some(e) = self.directory.write().get_mut(id) {
            e.verified = Some(digest);
        }
        Ok(principal)
    }

    /// Issues an access token for `principal`, narrowed to `requested` scopes when given
    /// (`Err` names a scope the principal may not have: RFC 6749 `invalid_scope`).
    pub fn issue(&self, principal: &Principal, requested: Option<&str>) -> Result<Issued, String> {
        let scopes: Vec<String> = match requested.map(str::split_whitespace) {
            Some(asked) => {
                let mut out = Vec::new();
                for s in asked {
                    // `admin` holds every scope there is, not any word asked for.
                    let exists = match principal.kind {
                        Kind::Device => s == SCOPE_DEVICE,
                        Kind::Client => APPLICATION_SCOPES.contains(&s),
                    };
                    if !exists || !principal.has_scope(s) {
                        return Err(s.to_string());
                    }
                    if !out.iter().any(|o| o == s) {
                        out.push(s.to_string());
                    }
                }
                if out.is_empty() {
                    principal.scopes.clone()
                } else {
                    out
                }
            }
            None => principal.scopes.clone(),
        };
        let now = now_secs();
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let claims = Claims {
            iss: "stratus".into(),
            sub: principal.id.clone(),
            scope: scopes.join(" "),
            kind: principal.kind,
            iat: now,
            exp: now + self.token_ttl_secs,
            jti: hex::encode(jti),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| "token".to_string())?;
        Ok(Issued {
            access_token: token,
            expires_in: self.token_ttl_secs,
            scope: claims.scope,
        })
    }

    /// Verifies an access token: signature, issuer, expiry, revocation, and that its principal
    /// still exists with a secret older than the token.
    pub fn verify_token(&self, token: &str) -> Result<(Principal, Claims), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    AuthError::InvalidToken("the access token expired")
                }
                _ => AuthError::InvalidToken("the access token is malformed or not ours"),
            })?;
        let c = data.claims;
        self.check_claims(&c)?;
        let scopes = c.scope.split_whitespace().map(String::from).collect();
        Ok((
            Principal {
                id: c.sub.clone(),
                kind: c.kind,
                scopes,
            },
            c,
        ))
    }

    /// The checks of [`Auth::verify_token`] that can change during a token's life, for
    /// claims whose signature was verified before: expiry, revocation, and that its principal
    /// still exists with a secret older than the token. (The CoAP listener keeps the claims
    /// of the tokens it verified and runs only these per request.)
    pub fn check_claims(&self, c: &Claims) -> Result<(), AuthError> {
        // As `jsonwebtoken` with no leeway: expired once `exp` is in the past.
        if c.exp < now_secs() {
            return Err(AuthError::InvalidToken("the access token expired"));
        }
        if self.revoked.read().contains_key(&c.jti) {
            return Err(AuthError::InvalidToken("the access token was revoked"));
        }
        let dir = self.directory.read();
        let Some(e) = dir.get(&c.sub) else {
            return Err(AuthError::InvalidToken(
                "the token's client no longer exists",
            ));
        };
        if c.iat < e.tokens_valid_from || e.kind != c.kind {
            return Err(AuthError::InvalidToken(
                "the token predates a credential change",
            ));
        }
        Ok(())
    }

    /// MQTT: the user name is the id, the password its secret or an access token issued to it.
    pub async fn authenticate_password(
        &self,
        id: &str,
        password: &str,
    ) -> Result<Principal, AuthError> {
        if password.matches('.').count() == 2 {
            if let Ok((p, _)) = self.verify_token(password) {
                if p.id == id {
                    return Ok(p);
                }
                return Err(AuthError::BadCredentials);
            }
        }
        self.authenticate_secret(id, password).await
    }

    /// Revokes a token (RFC 7009): remembered until it would have expired. Unknown or invalid
    /// tokens are ignored, as the RFC asks. Only the token's own client (or an admin) may.
    pub async fn revoke(&self, token: &str, by: &Principal) -> Result<(), AuthError> {
        self.revoke_token(token, by).await.map(|_| ())
    }

    /// [`Auth::revoke`], telling which token it revoked: `None` when the token is not ours,
    /// has expired anyway, is already revoked, or is not `by`'s to revoke.
    pub async fn revoke_token(
        &self,
        token: &str,
        by: &Principal,
    ) -> Result<Option<Claims>, AuthError> {
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, &self.decoding, &{
            let mut v = self.validation.clone();
            v.validate_exp = false;
            v
        }) else {
            return Ok(None);
        };
        let c = data.claims;
        if c.sub != by.id && !by.has_scope(SCOPE_ADMIN) {
            return Ok(None);
        }
        if c.exp <= now_secs() || self.revoked.read().contains_key(&c.jti) {
            return Ok(None);
        }
        self.store
            .revoke_token(&c.jti, (c.exp * 1000) as i64)
            .await?;
        self.revoked.write().insert(c.jti.clone(), c.exp);
        Ok(Some(c))
    }

    /// Loads the revocation list (at start).
    pub async fn load_revocations(&self, jtis: Vec<(String, u64)>) {
        let mut r = self.revoked.write();
        for (jti, exp) in jtis {
            r.insert(jti, exp);
        }
    }

    /// Drops revocations of tokens that have expired anyway.
    pub fn prune_revocations(&self) {
        let now = now_secs();
        self.revoked.write().retain(|_, exp| *exp > now);
    }
}

impl Entry {
    fn device(secret_hash: String) -> Entry {
        Entry {
            kind: Kind::Device,
            scopes: vec![SCOPE_DEVICE.to_string()],
            secret_hash,
            verified: None,
            tokens_valid_from: 0,
            coap_psk: None,
        }
    }

    fn client(scopes: Vec<String>, secret_hash: String) -> Entry {
        Entry {
            kind: Kind::Client,
            scopes,
            secret_hash,
            verified: None,
            tokens_valid_from: 0,
            coap_psk: None,
        }
    }

    fn principal(&self, id: &str) -> Principal {
        Principal {
            id: id.to_string(),
            kind: self.kind,
            scopes: self.scopes.clone(),
        }
    }
}

/// Shared handle.
pub type SharedAuth = Arc<Auth>;

#[cfg(test)]
mod argon2_tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};

    #[test]
    fn own_hashes_verify_and_the_crates_own_phc_strings_too() {
        let h = hash_secret("s3cret");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_hash("s3cret", &h));
        assert!(!verify_hash("s3cret!", &h));
        assert!(!verify_hash("s3cret", "not a hash"));
        // A hash made by the argon2 crate's own PasswordHasher (what older data dirs hold).
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"other", &salt)
            .unwrap()
            .to_string();
        assert!(verify_hash("other", &theirs));
        assert!(!verify_hash("s3cret", &theirs));
        // Ours parses with the crate's verifier as well.
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(Argon2::default()
            .verify_password(b"s3cret", &parsed)
            .is_ok());
    }
}
