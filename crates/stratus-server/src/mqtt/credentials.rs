//! The credentials live MQTT connections authenticated with, watched so that a rotated secret,
//! a revoked or expired access token, or a deleted principal ends its connections within a
//! second (SPEC "Identities"), with an MQTT 5.0 DISCONNECT whose reason code says why.
//!
//! A connection that authenticated as a device or an application registers here with the
//! [`Proof`] it gave. One task looks every 250 ms, and sweeps every registered connection only
//! when [`Auth::revision`] moved (a rotation, deletion or revocation somewhere) or the earliest
//! token expiry passed, so an idle fleet costs a few atomic loads per tick, not a walk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use stratus_mqtt::ReasonCode;
use tokio::sync::watch;

use crate::auth::{now_secs, Auth, Kind, Lapse, Principal, Proof};
use crate::broker::ClientHandle;

/// How often the watch looks.
const TICK: Duration = Duration::from_millis(250);

struct Watched {
    handle: Arc<ClientHandle>,
    id: String,
    kind: Kind,
    proof: Proof,
}

/// The connections to end when their credential stops holding.
#[derive(Default)]
pub struct CredentialWatch {
    /// By attachment number.
    live: Mutex<HashMap<u64, Watched>>,
    /// The earliest token expiry among `live` (Unix seconds; `u64::MAX`: none).
    next_expiry: AtomicU64,
}

/// The MQTT 5.0 reason code a connection is ended with when its credential lapsed.
pub fn reason_code(lapse: Lapse) -> ReasonCode {
    match lapse {
        Lapse::Expired => ReasonCode::MaximumConnectTime,
        Lapse::Revoked | Lapse::Rotated => ReasonCode::NotAuthorized,
        Lapse::Deleted => ReasonCode::AdministrativeAction,
    }
}

/// What an MQTT 5.0 client is told (DISCONNECT reason string) when it was evicted with `code`.
pub fn eviction_text(code: ReasonCode) -> &'static str {
    match code {
        ReasonCode::MaximumConnectTime => "the access token expired",
        ReasonCode::NotAuthorized => "the credential was revoked or rotated",
        ReasonCode::AdministrativeAction => "disconnected by an administrator",
        _ => "disconnected by the server",
    }
}

impl CredentialWatch {
    /// A watch with nothing to watch.
    pub fn new() -> CredentialWatch {
        CredentialWatch {
            live: Mutex::new(HashMap::new()),
            next_expiry: AtomicU64::new(u64::MAX),
        }
    }

    /// Watches the connection `conn` of `handle`, authenticated as `principal`.
    pub fn add(&self, conn: u64, handle: Arc<ClientHandle>, principal: &Principal) {
        if let Some((_, exp)) = &principal.proof.token {
            self.next_expiry.fetch_min(*exp, Ordering::AcqRel);
        }
        self.live.lock().insert(
            conn,
            Watched {
                handle,
                id: principal.id.clone(),
                kind: principal.kind,
                proof: principal.proof.clone(),
            },
        );
    }

    /// Stops watching `conn` (it closed).
    pub fn remove(&self, conn: u64) {
        self.live.lock().remove(&conn);
    }

    /// How many connections are watched.
    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every watched connection whose credential no longer holds at `now` (Unix
    /// seconds); returns how many it ended.
    pub fn sweep(&self, auth: &Auth, now: u64) -> usize {
        let mut ended = Vec::new();
        let mut next = u64::MAX;
        {
            let mut live = self.live.lock();
            live.retain(|conn, w| match auth.lapse(&w.id, w.kind, &w.proof, now) {
                Some(lapse) => {
                    ended.push((*conn, w.handle.clone(), w.id.clone(), lapse));
                    false
                }
                None => {
                    if let Some((_, exp)) = &w.proof.token {
                        next = next.min(*exp);
                    }
                    true
                }
            });
            self.next_expiry.store(next, Ordering::Release);
        }
        for (conn, handle, principal, lapse) in &ended {
            tracing::info!(
                client_id = %handle.id(),
                principal = %principal,
                why = lapse.describe(),
                "mqtt connection ended: its credential no longer holds"
            );
            handle.evict(*conn, reason_code(*lapse));
        }
        ended.len()
    }

    /// Looks every [`TICK`] until `shutdown`: sweeps when a credential changed somewhere or a
    /// watched token expired.
    pub async fn run(self: Arc<Self>, auth: Arc<Auth>, mut shutdown: watch::Receiver<bool>) {
        let mut seen = auth.revision();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = tick.tick() => {}
            }
            let revision = auth.revision();
            let now = now_secs();
            // `exp` is the last valid second: a token is expired once `now` passes it.
            if revision != seen || self.next_expiry.load(Ordering::Acquire) < now {
                seen = revision;
                self.sweep(&auth, now);
            }
        }
    }
}
