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
//! - Access tokens are MACed with a 256-bit key kept in `DATA_DIR/token.key` (mode 0600), so
//!   verifying one is a MAC and a few map lookups — no store read — and survives restarts. A
//!   device gets a compact token of 59 characters ([`token`]: fits one CoAP `?token=` with
//!   every client); an application gets an HS256 JWT (`jsonwebtoken`), which carries its
//!   scopes. Both carry the *fingerprint of the credential* they were issued under (a MAC of
//!   the principal's kind, id and secret hash): rotating a secret, deleting a principal or
//!   re-creating it under the same id changes the fingerprint, so every earlier token is void
//!   at once, across restarts, with no clock window. Revoked token ids (`jti`, RFC 7009) are
//!   kept in the store until the token would have expired and mirrored in memory.
//! - An unknown id costs the same argon2 verification as a wrong secret for a known one (a
//!   dummy hash made at start), so the answer's timing does not tell which ids exist.
//! - Sessions that outlive one request (MQTT connections, CoAP observations, SSE streams) keep
//!   the [`Proof`] of their principal and ask [`Auth::lapse`] when [`Auth::revision`] moves or
//!   their token's expiry passes, so a rotation, revocation or deletion ends them too.
//! - The directory of principals (every device and client: id, kind, scopes, hash) is loaded
//!   at start and kept in step by the API; a fleet of 100,000 devices is a few tens of MiB.

pub mod throttle;
pub mod token;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::data_dir::{load_or_create_key, write_private};

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
    /// Too many failures from this address or for this identity: retry after the wait.
    #[error("too many failed attempts; retry in {} s", retry_after_ms.div_ceil(1000))]
    Throttled {
        /// How long the ban lasts, in milliseconds.
        retry_after_ms: u64,
    },
    /// The argon2 threads have more work queued than they take: try again shortly.
    #[error("the server is busy verifying credentials")]
    Busy,
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
    /// What it proved (for sessions that must end when that stops holding).
    pub proof: Proof,
}

/// What a caller proved: the credential (by fingerprint) and, when it showed an access token,
/// that token's id and expiry. A long-lived session keeps it and asks [`Auth::lapse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proof {
    /// Fingerprint of the credential (see [`token::fingerprint`]).
    pub credential: [u8; 8],
    /// `(jti, exp)` of the access token, when one was shown.
    pub token: Option<(String, u64)>,
}

/// Why a credential that once held no longer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapse {
    /// The access token's `exp` passed.
    Expired,
    /// The access token was revoked (RFC 7009).
    Revoked,
    /// The principal's secret was rotated (or the principal re-created under the same id).
    Rotated,
    /// The principal was deleted.
    Deleted,
}

impl Lapse {
    /// A short explanation, for logs, reason strings and diagnostics.
    pub fn describe(self) -> &'static str {
        match self {
            Lapse::Expired => "the access token expired",
            Lapse::Revoked => "the access token was revoked",
            Lapse::Rotated => "the credential was rotated",
            Lapse::Deleted => "the principal was deleted",
        }
    }
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
    /// Fingerprint of the credential: tokens carry it (see [`token::fingerprint`]).
    credential: [u8; 8],
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
    /// Fingerprint of the credential it was issued under (hex); a token without one predates
    /// fingerprints and is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cred: Option<String>,
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

/// Every known principal, by id and by credential fingerprint.
#[derive(Default)]
struct Directory {
    by_id: HashMap<String, Entry>,
    by_credential: HashMap<[u8; 8], String>,
}

impl Directory {
    /// Adds or replaces `id`; returns whether it replaced an entry.
    fn insert(&mut self, id: &str, entry: Entry) -> bool {
        let old = self.remove(id);
        self.by_credential.insert(entry.credential, id.to_string());
        self.by_id.insert(id.to_string(), entry);
        old
    }

    /// Removes `id`; returns whether it was there.
    fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(old) => {
                if self
                    .by_credential
                    .get(&old.credential)
                    .is_some_and(|i| i == id)
                {
                    self.by_credential.remove(&old.credential);
                }
                true
            }
            None => false,
        }
    }
}

/// Credentials, tokens and the principal directory.
pub struct Auth {
    store: StoreHandle,
    key: Vec<u8>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    digest_key: [u8; 32],
    directory: RwLock<Directory>,
    revoked: RwLock<HashMap<String, u64>>,
    token_ttl_secs: u64,
    psk: PskSealer,
    /// Moves on every rotation, deletion and revocation (see [`Auth::revision`]).
    revision: AtomicU64,
    /// An argon2 hash of a random secret: an unknown id is verified against it.
    dummy_hash: String,
    /// Failed attempts, per source and identity (see [`throttle`]).
    throttle: throttle::Throttle,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

/// Verifications waiting for an argon2 thread at most: beyond them a verification is refused
/// at once ([`AuthError::Busy`]), so a flood of guesses builds no queue and costs the clients
/// whose secrets are already verified (a digest, no argon2) nothing.
const ARGON2_MAX_WAITING: usize = 64;

/// Verifications submitted and not yet started.
static ARGON2_WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What [`verify_argon2`] came to.
enum Argon2Outcome<T> {
    Done(T),
    /// [`ARGON2_MAX_WAITING`] verifications wait already.
    Busy,
    /// The argon2 threads are gone.
    Gone,
}

/// [`run_argon2`] for verifications (what an attacker can ask for): refused when
/// [`ARGON2_MAX_WAITING`] wait already.
async fn verify_argon2<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Argon2Outcome<T> {
    if ARGON2_WAITING.fetch_add(1, Ordering::AcqRel) >= ARGON2_MAX_WAITING {
        ARGON2_WAITING.fetch_sub(1, Ordering::AcqRel);
        return Argon2Outcome::Busy;
    }
    let started = run_argon2(move || {
        ARGON2_WAITING.fetch_sub(1, Ordering::AcqRel);
        f()
    })
    .await;
    match started {
        Some(v) => Argon2Outcome::Done(v),
        None => Argon2Outcome::Gone,
    }
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
        let dummy_hash = run_argon2(|| hash_secret(&new_secret()))
            .await
            .unwrap_or_default();
        let auth = Auth {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            key,
            validation,
            digest_key,
            directory: RwLock::new(Directory::default()),
            revoked: RwLock::new(HashMap::new()),
            token_ttl_secs: DEFAULT_TOKEN_TTL_SECS,
            store,
            psk,
            revision: AtomicU64::new(0),
            dummy_hash,
            throttle: throttle::Throttle::default(),
        };
        auth.reload().await?;
        Ok(auth)
    }

    /// Sets how failed authentications back off (`[auth.throttle]`).
    pub fn with_throttle(mut self, config: throttle::ThrottleConfig) -> Auth {
        self.throttle = throttle::Throttle::new(config);
        self
    }

    /// `Err(Throttled)` when `source` (or `identity`) is banned for failing too often.
    pub fn check_throttle(
        &self,
        source: Option<std::net::IpAddr>,
        identity: Option<&str>,
    ) -> Result<(), AuthError> {
        self.throttle
            .check(source, identity, now_ms())
            .map_err(|retry_after_ms| AuthError::Throttled { retry_after_ms })
    }

    /// Records a failed authentication of `identity` (when one was claimed) from `source`.
    pub fn record_failure(&self, source: Option<std::net::IpAddr>, identity: Option<&str>) {
        self.throttle.failed(source, identity, now_ms());
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
        let mut psks: HashMap<String, Vec<u8>> = psks.into_iter().collect();
        let mut dir = Directory::default();
        for (id, secret_hash) in devices {
            let mut e = self.entry(Kind::Device, &id, secret_hash, Vec::new());
            e.coap_psk = psks.remove(&id);
            dir.insert(&id, e);
        }
        for c in clients {
            let e = self.entry(Kind::Client, &c.client_id, c.secret_hash, c.scopes);
            dir.insert(&c.client_id, e);
        }
        *self.directory.write() = dir;
        self.revision.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn entry(&self, kind: Kind, id: &str, secret_hash: String, scopes: Vec<String>) -> Entry {
        let (kind_name, scopes) = match kind {
            Kind::Device => ("device", vec![SCOPE_DEVICE.to_string()]),
            Kind::Client => ("client", scopes),
        };
        Entry {
            kind,
            scopes,
            credential: token::fingerprint(&self.key, kind_name, id, &secret_hash),
            secret_hash,
            verified: None,
            coap_psk: None,
        }
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
        if self.directory.read().by_id.contains_key(ADMIN_CLIENT) {
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
    /// CoAPS key when it has one. Replacing one (a rotated secret) voids its earlier tokens.
    pub fn register_device(&self, id: &str, secret_hash: &str, coap_psk: Option<Vec<u8>>) {
        let mut e = self.entry(Kind::Device, id, secret_hash.to_string(), Vec::new());
        e.coap_psk = coap_psk;
        let replaced = self.directory.write().insert(id, e);
        if replaced {
            self.revision.fetch_add(1, Ordering::AcqRel);
        }
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
            let e = dir.by_id.get(id).filter(|e| e.kind == Kind::Device)?;
            e.coap_psk.clone()?
        };
        self.psk.open(id, &sealed)
    }

    /// The [`Proof`] a device gives by its CoAPS key (the key is derived from its secret, so
    /// it proves the current credential).
    pub fn device_proof(&self, id: &str) -> Option<Proof> {
        let dir = self.directory.read();
        let e = dir.by_id.get(id).filter(|e| e.kind == Kind::Device)?;
        Some(Proof {
            credential: e.credential,
            token: None,
        })
    }

    /// Adds (or replaces) a client in the directory after it was stored. Replacing one (a
    /// rotated secret) voids its earlier tokens.
    pub fn register_client(&self, client: &OAuthClient) {
        let e = self.entry(
            Kind::Client,
            &client.client_id,
            client.secret_hash.clone(),
            client.scopes.clone(),
        );
        let replaced = self.directory.write().insert(&client.client_id, e);
        if replaced {
            self.revision.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Removes a principal (deleted): its tokens stop working at once.
    pub fn forget(&self, id: &str) {
        if self.directory.write().remove(id) {
            self.revision.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A number that moves whenever a credential stops holding (a rotation, a deletion, a
    /// revocation): sessions that keep a [`Proof`] re-check it with [`Auth::lapse`] when it
    /// moved.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Whether what `id` proved still holds: `None` when it does, else why not (the token
    /// expired or was revoked, the secret rotated, the principal was deleted). `now` is Unix
    /// seconds.
    pub fn lapse(&self, id: &str, kind: Kind, proof: &Proof, now: u64) -> Option<Lapse> {
        if let Some((jti, exp)) = &proof.token {
            if *exp < now {
                return Some(Lapse::Expired);
            }
            if self.revoked.read().contains_key(jti) {
                return Some(Lapse::Revoked);
            }
        }
        let dir = self.directory.read();
        match dir.by_id.get(id) {
            Some(e) if e.kind != kind => Some(Lapse::Deleted),
            Some(e) if e.credential != proof.credential => Some(Lapse::Rotated),
            Some(_) => None,
            None => Some(Lapse::Deleted),
        }
    }

    /// The principal `id` as it stands now, holding its current credential (for in-process
    /// callers that act for it, such as the simulator and tests); `None` when unknown.
    pub fn principal(&self, id: &str) -> Option<Principal> {
        self.directory.read().by_id.get(id).map(|e| e.principal(id))
    }

    /// Whether `id` is a known device or client.
    pub fn is_known(&self, id: &str) -> bool {
        self.directory.read().by_id.contains_key(id)
    }

    /// Whether `id` is a known device.
    pub fn is_device(&self, id: &str) -> bool {
        self.directory
            .read()
            .by_id
            .get(id)
            .is_some_and(|e| e.kind == Kind::Device)
    }

    fn digest(&self, secret: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.digest_key);
        h.update(secret.as_bytes());
        h.finalize().into()
    }

    /// Checks a client id and secret (token endpoint, MQTT password). An unknown id costs
    /// the same argon2 verification as a wrong secret.
    pub async fn authenticate_secret(
        &self,
        id: &str,
        secret: &str,
    ) -> Result<Principal, AuthError> {
        self.authenticate_secret_from(id, secret, None).await
    }

    /// [`authenticate_secret`](Self::authenticate_secret) by a caller at `source`: a secret
    /// that verified before in this process is recognised at once; otherwise a banned source
    /// or identity is refused before any argon2 work ([`throttle`]), and a failure counts
    /// against both.
    pub async fn authenticate_secret_from(
        &self,
        id: &str,
        secret: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<Principal, AuthError> {
        let digest = self.digest(secret);
        let (hash, principal) = {
            let dir = self.directory.read();
            match dir.by_id.get(id) {
                Some(e) => {
                    let principal = e.principal(id);
                    if e.verified == Some(digest) {
                        return Ok(principal);
                    }
                    (e.secret_hash.clone(), Some(principal))
                }
                None => (self.dummy_hash.clone(), None),
            }
        };
        self.check_throttle(source, Some(id))?;
        let secret = secret.to_string();
        let ok = match verify_argon2(move || verify_hash(&secret, &hash)).await {
            Argon2Outcome::Done(ok) => ok,
            Argon2Outcome::Busy => return Err(AuthError::Busy),
            Argon2Outcome::Gone => false,
        };
        let Some(principal) = principal.filter(|_| ok) else {
            self.throttle.failed(source, Some(id), now_ms());
            return Err(AuthError::BadCredentials);
        };
        self.throttle.succeeded(id);
        if let Some(e) = self.directory.write().by_id.get_mut(id) {
            // Only while the secret that verified is still the one on record.
            if e.credential == principal.proof.credential {
                e.verified = Some(digest);
            }
        }
        Ok(principal)
    }

    /// Issues an access token for `principal`, narrowed to `requested` scopes when given
    /// (`Err` names a scope the principal may not have: RFC 6749 `invalid_scope`). A device
    /// gets a compact token ([`token`]), an application a JWT; both are bound to the
    /// credential `principal` proved.
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
        let exp = now + self.token_ttl_secs;
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let access_token = match principal.kind {
            Kind::Device => {
                let mut short = [0u8; 8];
                short.copy_from_slice(&jti[..8]);
                token::Compact {
                    iat: u32::try_from(now).unwrap_or(u32::MAX),
                    exp: u32::try_from(exp).unwrap_or(u32::MAX),
                    jti: short,
                    credential: principal.proof.credential,
                }
                .encode(&self.key)
            }
            Kind::Client => {
                let claims = Claims {
                    iss: "stratus".into(),
                    sub: principal.id.clone(),
                    scope: scopes.join(" "),
                    kind: principal.kind,
                    iat: now,
                    exp,
                    jti: hex::encode(jti),
                    cred: Some(hex::encode(principal.proof.credential)),
                };
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
                    .map_err(|_| "token".to_string())?
            }
        };
        Ok(Issued {
            access_token,
            expires_in: self.token_ttl_secs,
            scope: scopes.join(" "),
        })
    }

    /// The claims of a token whose signature or MAC verifies, without any check of its
    /// expiry, revocation or principal. `None` for anything else, with why.
    fn authentic_claims(&self, token: &str, check_exp: bool) -> Result<Claims, AuthError> {
        if token::looks_compact(token) {
            let c = token::Compact::decode(token, &self.key).map_err(|e| {
                AuthError::InvalidToken(match e {
                    token::TokenError::Truncated(_) => {
                        "the access token is cut short (a device token has 59 characters)"
                    }
                    token::TokenError::Malformed => "the access token is malformed",
                    token::TokenError::Forged => "the access token is not ours",
                })
            })?;
            let dir = self.directory.read();
            let (sub, kind) = match dir.by_credential.get(&c.credential) {
                Some(id) => (id.clone(), dir.by_id.get(id).map(|e| e.kind)),
                None => (String::new(), None),
            };
            return Ok(Claims {
                iss: "stratus".into(),
                sub,
                scope: SCOPE_DEVICE.into(),
                kind: kind.unwrap_or(Kind::Device),
                iat: u64::from(c.iat),
                exp: u64::from(c.exp),
                jti: hex::encode(c.jti),
                cred: Some(hex::encode(c.credential)),
            });
        }
        let mut validation = self.validation.clone();
        validation.validate_exp = check_exp;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    AuthError::InvalidToken("the access token expired")
                }
                _ => AuthError::InvalidToken("the access token is malformed or not ours"),
            })
    }

    /// Verifies an access token: signature, issuer, expiry, revocation, and that its principal
    /// still exists with the credential it was issued under.
    pub fn verify_token(&self, token: &str) -> Result<(Principal, Claims), AuthError> {
        let c = self.authentic_claims(token, true)?;
        let credential = self.check_claims(&c)?;
        let scopes = c.scope.split_whitespace().map(String::from).collect();
        Ok((
            Principal {
                id: c.sub.clone(),
                kind: c.kind,
                scopes,
                proof: Proof {
                    credential,
                    token: Some((c.jti.clone(), c.exp)),
                },
            },
            c,
        ))
    }

    /// The checks of [`Auth::verify_token`] that can change during a token's life, for
    /// claims whose signature was verified before: expiry, revocation, and that its principal
    /// still exists with the credential the token was issued under. (The CoAP listener keeps
    /// the claims of the tokens it verified and runs only these per request.) Returns that
    /// credential's fingerprint.
    pub fn check_claims(&self, c: &Claims) -> Result<[u8; 8], AuthError> {
        // As `jsonwebtoken` with no leeway: expired once `exp` is in the past.
        if c.exp < now_secs() {
            return Err(AuthError::InvalidToken("the access token expired"));
        }
        if self.revoked.read().contains_key(&c.jti) {
            return Err(AuthError::InvalidToken("the access token was revoked"));
        }
        let dir = self.directory.read();
        let Some(e) = dir.by_id.get(&c.sub) else {
            return Err(AuthError::InvalidToken(
                "the token's client no longer exists",
            ));
        };
        let issued_under = c.cred.as_deref().and_then(|h| {
            let mut fp = [0u8; 8];
            hex::decode_to_slice(h, &mut fp).ok().map(|()| fp)
        });
        if issued_under != Some(e.credential) || e.kind != c.kind {
            return Err(AuthError::InvalidToken(
                "the token predates a credential change",
            ));
        }
        Ok(e.credential)
    }

    /// MQTT: the user name is the id, the password its secret or an access token issued to it.
    pub async fn authenticate_password(
        &self,
        id: &str,
        password: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<Principal, AuthError> {
        if token::looks_compact(password) || password.matches('.').count() == 2 {
            if let Ok((p, _)) = self.verify_token(password) {
                if p.id == id {
                    return Ok(p);
                }
                self.record_failure(source, Some(id));
                return Err(AuthError::BadCredentials);
            }
        }
        self.authenticate_secret_from(id, password, source).await
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
        let Ok(c) = self.authentic_claims(token, false) else {
            return Ok(None);
        };
        if c.sub.is_empty() || (c.sub != by.id && !by.has_scope(SCOPE_ADMIN)) {
            return Ok(None);
        }
        if c.exp <= now_secs() || self.revoked.read().contains_key(&c.jti) {
            return Ok(None);
        }
        self.store
            .revoke_token(&c.jti, (c.exp * 1000) as i64)
            .await?;
        self.revoked.write().insert(c.jti.clone(), c.exp);
        self.revision.fetch_add(1, Ordering::AcqRel);
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
    fn principal(&self, id: &str) -> Principal {
        Principal {
            id: id.to_string(),
            kind: self.kind,
            scopes: self.scopes.clone(),
            proof: Proof {
                credential: self.credential,
                token: None,
            },
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
