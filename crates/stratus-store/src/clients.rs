//! OAuth clients (applications and the admin) and the token revocation list, behind the
//! [`ClientStore`] trait. Devices are OAuth clients too (scope `device`) but live in the
//! device registry; the two share one id space, so the auth layer can look in either.

use crate::devices::check_secret_hash;
use crate::write::{Write, WriteBackend};
use crate::{check_id, check_text, StoreError};

/// Longest accepted token id (`jti`).
pub const MAX_JTI_LEN: usize = 256;

/// Longest accepted scope token.
pub const MAX_SCOPE_LEN: usize = 128;

/// An OAuth client (not a device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    /// Client id, `[A-Za-z0-9._-]{1,64}`.
    pub client_id: String,
    /// The argon2 hash of its secret.
    pub secret_hash: String,
    /// Scopes it may be granted (`telemetry:read`, `devices:write`, `firmware:write`, `admin`).
    pub scopes: Vec<String>,
    /// When it was registered, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

impl OAuthClient {
    /// Checks the rules: a valid id, a non-empty hash, RFC 6749 §3.3 scope tokens.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("client", &self.client_id)?;
        check_secret_hash(&self.secret_hash)?;
        for scope in &self.scopes {
            check_scope(scope)?;
        }
        Ok(())
    }
}

/// Checks one scope token: `1*( %x21 / %x23-5B / %x5D-7E )` (RFC 6749 §3.3).
pub fn check_scope(scope: &str) -> Result<(), StoreError> {
    let ok = !scope.is_empty()
        && scope.len() <= MAX_SCOPE_LEN
        && scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "scope {:?} is not an RFC 6749 scope token",
            crate::truncate(scope, 80)
        )))
    }
}

pub(crate) fn check_jti(jti: &str) -> Result<(), StoreError> {
    check_text("token id", jti, MAX_JTI_LEN)
}

/// OAuth clients and revoked tokens.
///
/// Reads are required methods; writes are provided on top of [`WriteBackend::commit_jobs`].
pub trait ClientStore: WriteBackend {
    /// The client with this id, if registered.
    fn client(&self, client_id: &str) -> Result<Option<OAuthClient>, StoreError>;

    /// Every client, ordered by id.
    fn list_clients(&self) -> Result<Vec<OAuthClient>, StoreError>;

    /// Whether the token id was revoked (and has not been purged since).
    fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError>;

    /// Every revoked token id still remembered, with when its token expires (Unix epoch ms),
    /// for a server to mirror the list in memory at start.
    fn revoked_tokens(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// Registers a client; [`StoreError::Conflict`] if the id is taken (by a client or device).
    fn create_client(&self, client: OAuthClient) -> Result<OAuthClient, StoreError> {
        self.write_one(Write::CreateClient(client))?.into_client()
    }

    /// Replaces a client's secret hash.
    fn set_client_secret(&self, client_id: &str, secret_hash: &str) -> Result<(), StoreError> {
        self.write_one(Write::SetClientSecret {
            client_id: client_id.into(),
            secret_hash: secret_hash.into(),
        })?
        .into_done()
    }

    /// Deletes a client.
    fn delete_client(&self, client_id: &str) -> Result<(), StoreError> {
        self.write_one(Write::DeleteClient {
            client_id: client_id.into(),
        })?
        .into_done()
    }

    /// Revokes a token id until `expires_at_ms` (revoking twice keeps the later expiry).
    fn revoke_token(&self, jti: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        self.write_one(Write::RevokeToken {
            jti: jti.into(),
            expires_at_ms,
        })?
        .into_done()
    }

    /// Forgets revocations whose token expired at or before `now_ms`; returns how many.
    fn purge_revoked_tokens(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write_one(Write::PurgeRevokedTokens { now_ms })?
            .into_count()
    }
}
