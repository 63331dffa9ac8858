//! The broker hub shared by all MQTT connection tasks: the subscription tree, the retained
//! store, and one [`ClientHandle`] per client id that holds its mailbox and, while the client
//! is offline, its persistent session.
//!
//! Routing takes a read lock on the tree and a short lock on each matched client's mailbox;
//! there is no lock that every message crosses for writing, and no router thread. Each
//! connection task then drains its own mailbox into its own `Connection` state machine.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use stratus_mqtt::{Message, MqttStr, QoS, RetainedStore, Session, SubscriptionTree};
use tokio::sync::{oneshot, Notify};

use crate::metrics::Metrics;

/// What a connection task is told when it must give up its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// A new connection with the same client id arrived.
    TakenOver,
}

/// One client id's presence in the broker.
pub struct ClientHandle {
    id: MqttStr,
    /// Anonymous clients may not read `devices/` topics.
    restricted: AtomicBool,
    mailbox: Mutex<Mailbox>,
    /// Signalled when the mailbox goes from empty to non-empty.
    pub notify: Notify,
    state: Mutex<SlotState>,
    state_changed: Notify,
    attach_lock: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<(Message, QoS)>,
    online: bool,
    gone: bool,
}

enum SlotState {
    /// Never attached.
    Fresh,
    /// A connection task owns the session.
    Online {
        conn: u64,
        kick: Option<oneshot::Sender<Kick>>,
    },
    /// The client is away; its session waits here.
    Offline(Session),
    /// The session ended; the handle is out of the registry.
    Gone,
}

impl ClientHandle {
    fn new(id: MqttStr) -> Self {
        ClientHandle {
            id,
            restricted: AtomicBool::new(true),
            mailbox: Mutex::new(Mailbox::default()),
            notify: Notify::new(),
            state: Mutex::new(SlotState::Fresh),
            state_changed: Notify::new(),
            attach_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The client id.
    pub fn id(&self) -> &MqttStr {
        &self.id
    }

    /// Hands `message` to the client with the delivery `qos`; false when it was not accepted
    /// (not permitted, offline QoS 0, session gone, or queue full — the last one counted).
    fn deliver(&self, message: &Message, qos: QoS, max_queued: usize, metrics: &Metrics) -> bool {
        if self.restricted.load(Ordering::Relaxed) && message.topic.starts_with("devices/") {
            return false;
        }
        let mut mb = self.mailbox.lock();
        if mb.gone || (!mb.online && qos == QoS::AtMostOnce) {
            return false;
        }
        if mb.queue.len() >= max_queued {
            drop(mb);
            metrics.mqtt_messages_dropped.inc();
            return false;
        }
        let was_empty = mb.queue.is_empty();
        // An offline client's messages may wait long: keep them compact.
        let kept = if mb.online {
            message.clone()
        } else {
            message.compact()
        };
        mb.queue.push_back((kept, qos));
        drop(mb);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Takes everything waiting in the mailbox.
    pub fn drain(&self) -> VecDeque<(Message, QoS)> {
        std::mem::take(&mut self.mailbox.lock().queue)
    }
}

/// A subscriber in the tree: a client handle compared by identity.
#[derive(Clone)]
struct Subscriber(Arc<ClientHandle>);

impl PartialEq for Subscriber {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A session handed to a new connection.
pub struct Attached {
    /// The client's handle (keep it for the connection's life).
    pub handle: Arc<ClientHandle>,
    /// The session to run.
    pub session: Session,
    /// Whether `session` is a resumed one (CONNACK Session Present).
    pub session_present: bool,
    /// Fires when another connection takes the client over.
    pub kicked: oneshot::Receiver<Kick>,
    /// This attachment's number, for [`Broker::detach`].
    pub conn: u64,
}

/// The broker state shared by every connection.
pub struct Broker {
    clients: Mutex<HashMap<MqttStr, Arc<ClientHandle>>>,
    tree: RwLock<SubscriptionTree<Subscriber>>,
    retained: RwLock<RetainedStore>,
    max_queued: usize,
    next_conn: AtomicU64,
    /// Metrics shared with the HTTP listener.
    pub metrics: Arc<Metrics>,
    /// When the broker started.
    pub started: Instant,
}

impl Broker {
    /// A broker whose sessions queue at most `max_queued` messages.
    pub fn new(max_queued: usize, metrics: Arc<Metrics>) -> Self {
        Broker {
            clients: Mutex::new(HashMap::new()),
            tree: RwLock::new(SubscriptionTree::new()),
            retained: RwLock::new(RetainedStore::new()),
            max_queued,
            next_conn: AtomicU64::new(1),
            metrics,
            started: Instant::now(),
        }
    }

    /// Attaches a new connection to `client_id`'s session: takes over (disconnects) a current
    /// connection with the same id, then resumes its session unless `clean_session`.
    pub async fn attach(
        &self,
        client_id: MqttStr,
        clean_session: bool,
        restricted: bool,
    ) -> Attached {
        loop {
            let handle = self
                .clients
                .lock()
                .entry(client_id.clone())
                .or_insert_with(|| Arc::new(ClientHandle::new(client_id.clone())))
                .clone();
            let _serial = handle.attach_lock.lock().await;
            self.take_over(&handle).await;
            let (tx, rx) = oneshot::channel();
            let mut state = handle.state.lock();
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let previous = std::mem::replace(
                &mut *state,
                SlotState::Online {
                    conn,
                    kick: Some(tx),
                },
            );
            let (session, present) = match previous {
                SlotState::Gone => {
                    // The previous connection ended its clean session while we waited; the
                    // handle left the registry, so start over with a fresh one.
                    *state = SlotState::Gone;
                    continue;
                }
                SlotState::Offline(old) => {
                    self.metrics.mqtt_sessions_offline.dec();
                    if clean_session {
                        self.unsubscribe_all(&handle, &old);
                        handle.mailbox.lock().queue.clear();
                        (Session::new(client_id.clone()), false)
                    } else {
                        (old, true)
                    }
                }
                SlotState::Online { .. } => {
                    // The old connection did not let go in time: its session is lost to it.
                    tracing::warn!(client_id = %client_id, "previous connection did not release its session");
                    (Session::new(client_id.clone()), false)
                }
                SlotState::Fresh => (Session::new(client_id.clone()), false),
            };
            drop(state);
            handle.restricted.store(restricted, Ordering::Relaxed);
            handle.mailbox.lock().online = true;
            return Attached {
                handle: handle.clone(),
                session,
                session_present: present,
                kicked: rx,
                conn,
            };
        }
    }

    /// Kicks the connection that holds `handle` now, and waits (bounded) until it lets go.
    async fn take_over(&self, handle: &ClientHandle) {
        let kick = match &mut *handle.state.lock() {
            SlotState::Online { kick, .. } => kick.take(),
            _ => return,
        };
        if let Some(kick) = kick {
            let _ = kick.send(Kick::TakenOver);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let changed = handle.state_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !matches!(*handle.state.lock(), SlotState::Online { .. }) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Detaches a closed connection: parks its session when it is persistent, or ends it.
    /// `conn` is [`Attached::conn`]; a connection that lost its client to a takeover changes nothing.
    pub fn detach(
        &self,
        handle: &Arc<ClientHandle>,
        conn: u64,
        session: Option<Session>,
        clean_session: bool,
    ) {
        let mut state = handle.state.lock();
        if !matches!(*state, SlotState::Online { conn: c, .. } if c == conn) {
            return;
        }
        match session {
            Some(mut session) if !clean_session => {
                for o in session.inflight.iter_mut() {
                    o.message = o.message.compact();
                }
                for m in session.queued.iter_mut() {
                    *m = m.compact();
                }
                {
                    let mut mb = handle.mailbox.lock();
                    mb.online = false;
                    mb.queue.retain(|(_, q)| *q != QoS::AtMostOnce);
                }
                *state = SlotState::Offline(session);
                self.metrics.mqtt_sessions_offline.inc();
            }
            session => {
                if let Some(session) = &session {
                    self.unsubscribe_all(handle, session);
                }
                {
                    let mut mb = handle.mailbox.lock();
                    mb.gone = true;
                    mb.queue.clear();
                }
                *state = SlotState::Gone;
                let mut clients = self.clients.lock();
                if clients
                    .get(&handle.id)
                    .is_some_and(|h| Arc::ptr_eq(h, handle))
                {
                    clients.remove(&handle.id);
                }
            }
        }
        drop(state);
        handle.state_changed.notify_waiters();
    }

    fn unsubscribe_all(&self, handle: &Arc<ClientHandle>, session: &Session) {
        let mut tree = self.tree.write();
        let key = Subscriber(handle.clone());
        for filter in session.subscriptions.keys() {
            tree.remove(filter, &key);
        }
        self.metrics.mqtt_subscriptions.set(tree.len() as i64);
    }

    /// Adds a subscription (the filter must be valid).
    pub fn subscribe(&self, handle: &Arc<ClientHandle>, filter: &str, qos: QoS) {
        let mut tree = self.tree.write();
        tree.insert(filter, Subscriber(handle.clone()), qos);
        self.metrics.mqtt_subscriptions.set(tree.len() as i64);
    }

    /// Removes a subscription if present.
    pub fn unsubscribe(&self, handle: &Arc<ClientHandle>, filter: &str) {
        let mut tree = self.tree.write();
        tree.remove(filter, &Subscriber(handle.clone()));
        self.metrics.mqtt_subscriptions.set(tree.len() as i64);
    }

    /// Retained messages matching `filter`, for a new subscription.
    pub fn retained_for(&self, filter: &str) -> Vec<Message> {
        let mut out = Vec::new();
        self.retained
            .read()
            .for_each_match(filter, |m| out.push(m.clone()));
        out
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Number of subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.tree.read().len()
    }

    /// Routes a message: stores or clears it as retained when asked, then hands it to every
    /// matching subscriber once, at the highest QoS among its matching subscriptions capped by
    /// the message's QoS, with RETAIN cleared (MQTT-3.3.1-9). Returns the number of deliveries.
    pub fn publish(&self, message: Message) -> usize {
        if message.retain {
            let mut retained = self.retained.write();
            retained.set(message.clone());
            self.metrics
                .mqtt_retained_messages
                .set(retained.len() as i64);
        }
        let mut message = message;
        message.retain = false;
        let tree = self.tree.read();
        let mut targets: Vec<(&Subscriber, QoS)> = Vec::new();
        tree.for_each_match(&message.topic, |s, q| targets.push((s, q)));
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|(s, _)| Arc::as_ptr(&s.0));
            targets.dedup_by(|later, kept| {
                if later.0 == kept.0 {
                    kept.1 = kept.1.max(later.1);
                    true
                } else {
                    false
                }
            });
        }
        let mut delivered = 0;
        for (s, granted) in targets {
            if s.0.deliver(
                &message,
                granted.min(message.qos),
                self.max_queued,
                &self.metrics,
            ) {
                delivered += 1;
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn s(v: &str) -> MqttStr {
        MqttStr::try_from(v).unwrap()
    }

    fn msg(topic: &str, qos: QoS, retain: bool) -> Message {
        Message {
            topic: s(topic),
            payload: Bytes::from_static(b"p"),
            qos,
            retain,
        }
    }

    fn broker(max_queued: usize) -> Broker {
        Broker::new(max_queued, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn publish_reaches_each_subscriber_once_at_the_highest_matching_qos() {
        let b = broker(100);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(&a.handle, "t/+", QoS::AtMostOnce);
        b.subscribe(&a.handle, "t/#", QoS::AtLeastOnce);
        b.subscribe(&a.handle, "other", QoS::ExactlyOnce);
        assert_eq!(b.publish(msg("t/x", QoS::ExactlyOnce, false)), 1);
        let got: Vec<_> = a.handle.drain().into_iter().collect();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].1,
            QoS::AtLeastOnce,
            "min(publish QoS, max granted QoS)"
        );
        assert!(
            !got[0].0.retain,
            "RETAIN is cleared for established subscriptions"
        );
        assert_eq!(b.publish(msg("t/x", QoS::AtMostOnce, false)), 1);
        assert_eq!(a.handle.drain()[0].1, QoS::AtMostOnce);
    }

    #[tokio::test]
    async fn retained_messages_are_stored_and_cleared() {
        let b = broker(100);
        b.publish(msg("r/1", QoS::AtLeastOnce, true));
        b.publish(msg("r/2", QoS::AtMostOnce, true));
        assert_eq!(b.retained_for("r/#").len(), 2);
        b.publish(Message {
            payload: Bytes::new(),
            ..msg("r/1", QoS::AtMostOnce, true)
        });
        let left = b.retained_for("r/+");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].topic.as_str(), "r/2");
        assert!(left[0].retain);
    }

    #[tokio::test]
    async fn offline_persistent_sessions_queue_qos1_and_2_but_not_qos0() {
        let b = broker(100);
        let a = b.attach(s("p"), false, false).await;
        b.subscribe(&a.handle, "t", QoS::ExactlyOnce);
        let mut session = Session::new(s("p"));
        session.subscriptions.insert(s("t"), QoS::ExactlyOnce);
        b.detach(&a.handle, a.conn, Some(session), false);
        assert_eq!(b.metrics.mqtt_sessions_offline.get(), 1);
        assert_eq!(b.publish(msg("t", QoS::AtMostOnce, false)), 0);
        assert_eq!(b.publish(msg("t", QoS::AtLeastOnce, false)), 1);
        assert_eq!(b.publish(msg("t", QoS::ExactlyOnce, false)), 1);
        let again = b.attach(s("p"), false, false).await;
        assert!(again.session_present);
        assert!(Arc::ptr_eq(&again.handle, &a.handle));
        assert_eq!(again.session.subscriptions.len(), 1);
        let queued: Vec<QoS> = again.handle.drain().into_iter().map(|(_, q)| q).collect();
        assert_eq!(queued, vec![QoS::AtLeastOnce, QoS::ExactlyOnce]);
        assert_eq!(b.metrics.mqtt_sessions_offline.get(), 0);
    }

    #[tokio::test]
    async fn a_clean_reconnect_discards_the_old_session() {
        let b = broker(100);
        let a = b.attach(s("p"), false, false).await;
        b.subscribe(&a.handle, "t", QoS::AtLeastOnce);
        let mut session = Session::new(s("p"));
        session.subscriptions.insert(s("t"), QoS::AtLeastOnce);
        b.detach(&a.handle, a.conn, Some(session), false);
        b.publish(msg("t", QoS::AtLeastOnce, false));
        let clean = b.attach(s("p"), true, false).await;
        assert!(!clean.session_present);
        assert!(clean.session.subscriptions.is_empty());
        assert!(
            clean.handle.drain().is_empty(),
            "queued messages of the old session are gone"
        );
        assert_eq!(b.subscription_count(), 0);
        assert_eq!(b.publish(msg("t", QoS::AtLeastOnce, false)), 0);
    }

    #[tokio::test]
    async fn ending_a_clean_session_removes_its_subscriptions_and_handle() {
        let b = broker(100);
        let a = b.attach(s("c"), true, false).await;
        b.subscribe(&a.handle, "t", QoS::AtLeastOnce);
        let mut session = Session::new(s("c"));
        session.subscriptions.insert(s("t"), QoS::AtLeastOnce);
        b.detach(&a.handle, a.conn, Some(session), true);
        assert_eq!(b.subscription_count(), 0);
        assert!(b.clients.lock().is_empty());
        assert_eq!(b.publish(msg("t", QoS::AtLeastOnce, false)), 0);
    }

    #[tokio::test]
    async fn takeover_kicks_the_old_connection_and_inherits_its_session() {
        let b = Arc::new(broker(100));
        let first = b.attach(s("dup"), false, false).await;
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.attach(s("dup"), false, false).await });
        // The first connection is told, and hands back its session.
        let kick = tokio::time::timeout(Duration::from_secs(2), first.kicked)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kick, Kick::TakenOver);
        let mut session = Session::new(s("dup"));
        session.subscriptions.insert(s("x"), QoS::AtMostOnce);
        b.detach(&first.handle, first.conn, Some(session), false);
        let second = tokio::time::timeout(Duration::from_secs(2), second)
            .await
            .unwrap()
            .unwrap();
        assert!(second.session_present);
        assert_eq!(second.session.subscriptions.len(), 1);
        assert_ne!(second.conn, first.conn);
        // A late detach from the old connection changes nothing.
        b.detach(&first.handle, first.conn, None, true);
        assert_eq!(b.clients.lock().len(), 1);
    }

    #[tokio::test]
    async fn restricted_clients_never_receive_device_topics() {
        let b = broker(100);
        let anon = b.attach(s("anon"), true, true).await;
        b.subscribe(&anon.handle, "#", QoS::AtMostOnce);
        assert_eq!(
            b.publish(msg("devices/d1/telemetry", QoS::AtMostOnce, false)),
            0
        );
        assert_eq!(b.publish(msg("public/x", QoS::AtMostOnce, false)), 1);
    }

    #[tokio::test]
    async fn full_queues_drop_and_count() {
        let b = broker(2);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(&a.handle, "t", QoS::AtLeastOnce);
        for _ in 0..3 {
            b.publish(msg("t", QoS::AtLeastOnce, false));
        }
        assert_eq!(a.handle.drain().len(), 2);
        assert_eq!(b.metrics.mqtt_messages_dropped.get(), 1);
    }
}
