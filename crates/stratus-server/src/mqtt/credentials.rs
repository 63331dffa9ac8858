//! The credentials live MQTT connections authenticated with, watched so that a rotated secret,
//! a revoked or expired access token, or a deleted principal ends its connections within a
//! second (SPEC "Identities"), with an MQTT 5.0 DISCONNECT whose reason code says why.
//!
//! A connection that authenticated as a device or an application registers here with the
//! [`Proof`] it gave; the watch also counts each principal's connections
//! (`[mqtt] max_connections_per_principal`). One task looks every 250 ms, and sweeps every registered connection only
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
    /// Already evicted: not checked again; it leaves when its connection closes.
    evicted: bool,
}

#[derive(Default)]
struct Live {
    /// By attachment number.
    conns: HashMap<u64, Watched>,
    /// Connections admitted per principal id.
    by_principal: HashMap<String, usize>,
}

/// The connections to end when their credential stops holding.
#[derive(Default)]
pub struct CredentialWatch {
    live: Mutex<Live>,
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
            live: Mutex::new(Live::default()),
            next_expiry: AtomicU64::new(u64::MAX),
        }
    }

    /// Admits one more connection of the principal `id` if it has fewer than `max`; an
    /// admitted connection is then [`add`](Self::add)ed, or [`release`](Self::release)d if it
    /// does not attach after all.
    pub fn admit(&self, id: &str, max: usize) -> bool {
        let mut live = self.live.lock();
        let n = live.by_principal.get(id).copied().unwrap_or(0);
        if n >= max {
            return false;
        }
        live.by_principal.insert(id.to_string(), n + 1);
        true
    }

    /// Gives back an admission of `id` that did not become a connection.
    pub fn release(&self, id: &str) {
        Self::release_in(&mut self.live.lock(), id);
    }

    fn release_in(live: &mut Live, id: &str) {
        if let Some(n) = live.by_principal.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                live.by_principal.remove(id);
            }
        }
    }

    /// Watches the (admitted) connection `conn` of `handle`, authenticated as `principal`.
    pub fn add(&self, conn: u64, handle: Arc<ClientHandle>, principal: &Principal) {
        if let Some((_, exp)) = &principal.proof.token {
            self.next_expiry.fetch_min(*exp, Ordering::AcqRel);
        }
        self.live.lock().conns.insert(
            conn,
            Watched {
                handle,
                id: principal.id.clone(),
                kind: principal.kind,
                proof: principal.proof.clone(),
                evicted: false,
            },
        );
    }

    /// Stops watching `conn` (it closed) and gives back its admission.
    pub fn remove(&self, conn: u64) {
        let mut live = self.live.lock();
        if let Some(w) = live.conns.remove(&conn) {
            Self::release_in(&mut live, &w.id);
        }
    }

    /// How many connections are watched.
    pub fn len(&self) -> usize {
        self.live.lock().conns.len()
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
            for (conn, w) in live.conns.iter_mut().filter(|(_, w)| !w.evicted) {
                match auth.lapse(&w.id, w.kind, &w.proof, now) {
                    Some(lapse) => {
                        w.evicted = true;
                        ended.push((*conn, w.handle.clone(), w.id.clone(), lapse));
                    }
                    None => {
                        if let Some((_, exp)) = &w.proof.token {
                            next = next.min(*exp);
                        }
                    }
                }
            }
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
