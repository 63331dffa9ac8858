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
use smallvec::SmallVec;
use stratus_mqtt::{Connection, Message, MqttStr, QoS, RetainedStore, Session, SubscriptionTree};
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
    /// Signalled when the mailbox goes from empty to non-empty, or the client must be dropped.
    pub notify: Notify,
    /// Signalled when the QoS 1/2 backlog falls back within bounds or the client goes away.
    space: Notify,
    /// Set when publishers waited too long for this client: its connection must close.
    overloaded: AtomicBool,
    state: Mutex<SlotState>,
    state_changed: Notify,
    attach_lock: tokio::sync::Mutex<()>,
}

/// Messages on their way to one client, in order.
///
/// While the client is online this is a transit queue that its connection task drains as its
/// in-flight window allows. When it holds more than `max_queued` messages, publishers are told
/// to wait ([`Routed::congested`]); only far beyond that (`HARD_BACKLOG_FACTOR`), which flow
/// control prevents, are messages dropped. While the client is offline it is the session's
/// queue: QoS 1/2 only, at most `max_queued`, further ones dropped and counted.
#[derive(Default)]
struct Mailbox {
    /// Shared, so a message routed to many clients is one allocation with one reference count.
    queue: VecDeque<(Arc<Message>, QoS)>,
    qos0: usize,
    qos12: usize,
    online: bool,
    gone: bool,
}

impl Mailbox {
    fn backlog(&self) -> usize {
        self.qos0 + self.qos12
    }

    fn pop(&mut self) -> Option<(Arc<Message>, QoS)> {
        let item = self.queue.pop_front()?;
        if item.1 == QoS::AtMostOnce {
            self.qos0 -= 1;
        } else {
            self.qos12 -= 1;
        }
        Some(item)
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.qos0 = 0;
        self.qos12 = 0;
    }
}

/// What [`ClientHandle::deliver`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepted {
    /// Queued for the client.
    Yes,
    /// Queued, but the client's QoS 1/2 backlog is over its bound: the publisher should wait.
    Congested,
    /// Not queued.
    No,
}

/// The backlog, in multiples of `max_queued`, at which an online client's messages are dropped
/// after all (only a client publishing to itself faster than it reads gets there: other
/// publishers are throttled long before).
const HARD_BACKLOG_FACTOR: usize = 8;

/// Most messages moved from a mailbox to a connection per wake-up, to bound lock hold time.
const DRAIN_BATCH: usize = 1024;

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
            space: Notify::new(),
            overloaded: AtomicBool::new(false),
            state: Mutex::new(SlotState::Fresh),
            state_changed: Notify::new(),
            attach_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The client id.
    pub fn id(&self) -> &MqttStr {
        &self.id
    }

    /// Queues `message` for the client with the delivery `qos` (see [`Mailbox`] for the policy).
    fn deliver(
        &self,
        message: &Arc<Message>,
        qos: QoS,
        max_queued: usize,
        metrics: &Metrics,
    ) -> Accepted {
        if self.restricted.load(Ordering::Relaxed) && message.topic.starts_with("devices/") {
            return Accepted::No;
        }
        let mut mb = self.mailbox.lock();
        if mb.gone || (!mb.online && qos == QoS::AtMostOnce) {
            return Accepted::No;
        }
        let full = if mb.online {
            mb.backlog() >= max_queued.saturating_mul(HARD_BACKLOG_FACTOR)
        } else {
            mb.qos12 >= max_queued
        };
        if full {
            drop(mb);
            metrics.mqtt_messages_dropped.inc();
            return Accepted::No;
        }
        let was_empty = mb.queue.is_empty();
        // An offline client's messages may wait long: keep them compact.
        let kept = if mb.online {
            message.clone()
        } else {
            Arc::new(message.compact())
        };
        mb.queue.push_back((kept, qos));
        if qos == QoS::AtMostOnce {
            mb.qos0 += 1;
        } else {
            mb.qos12 += 1;
        }
        let congested = mb.online && mb.backlog() > max_queued;
        drop(mb);
        if was_empty {
            self.notify.notify_one();
        }
        if congested {
            Accepted::Congested
        } else {
            Accepted::Yes
        }
    }

    /// Moves waiting messages into `conn` while it has room: QoS 1/2 while the in-flight window
    /// has room, QoS 0 while the transmit buffer does. Returns true when more could be moved
    /// right away (the batch limit was hit).
    pub fn drain_into(&self, conn: &mut Connection, max_queued: usize) -> bool {
        let mut mb = self.mailbox.lock();
        let was_congested = mb.backlog() > max_queued;
        let mut moved = 0;
        let mut more = false;
        while let Some((_, qos)) = mb.queue.front() {
            let room = if *qos == QoS::AtMostOnce {
                conn.has_transmit_room()
            } else {
                conn.has_window_room()
            };
            if !room {
                break;
            }
            if moved == DRAIN_BATCH {
                more = true;
                break;
            }
            let Some((message, qos)) = mb.pop() else {
                break;
            };
            // RETAIN is set only on retained messages sent for a new subscription.
            conn.deliver(&message, qos, message.retain);
            moved += 1;
        }
        let relieved = was_congested && mb.backlog() <= max_queued;
        drop(mb);
        if relieved {
            self.space.notify_waiters();
        }
        more
    }

    /// Queues the retained messages for a new subscription (RETAIN set, `qos` capped by the
    /// granted QoS). They go through the mailbox so the in-flight window paces them like any
    /// other message; being already in memory they are never dropped for lack of room.
    pub fn enqueue_retained(&self, messages: Vec<Message>, granted: QoS) {
        if messages.is_empty() {
            return;
        }
        let mut mb = self.mailbox.lock();
        let was_empty = mb.queue.is_empty();
        for m in messages {
            let qos = m.qos.min(granted);
            if qos == QoS::AtMostOnce {
                mb.qos0 += 1;
            } else {
                mb.qos12 += 1;
            }
            mb.queue.push_back((Arc::new(m), qos));
        }
        drop(mb);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// True (once) when publishers gave up waiting for this client: close its connection.
    pub fn take_overloaded(&self) -> bool {
        self.overloaded.swap(false, Ordering::AcqRel)
    }

    /// Waits until the client's backlog is within `max_queued`, or it went away, or
    /// `deadline` passes; in the last case the client is marked overloaded (its connection
    /// closes as a slow consumer) and false is returned.
    pub async fn wait_for_space(&self, max_queued: usize, deadline: tokio::time::Instant) -> bool {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mb = self.mailbox.lock();
                if mb.backlog() <= max_queued || !mb.online || mb.gone {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, space).await.is_err() {
                if !self.overloaded.swap(true, Ordering::AcqRel) {
                    tracing::warn!(client_id = %self.id, "subscriber too slow for its publishers; disconnecting it");
                    self.notify.notify_one();
                }
                return false;
            }
        }
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

/// Where [`Broker::publish`] put a message.
#[derive(Default)]
pub struct Routed {
    /// Clients that took it.
    pub delivered: usize,
    /// Online clients whose backlog is over its bound: the publisher should wait for them
    /// ([`ClientHandle::wait_for_space`]): hold its acknowledgement, or stop reading (QoS 0).
    pub congested: Vec<Arc<ClientHandle>>,
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
                        handle.mailbox.lock().clear();
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
                    // The session's queue keeps QoS 1/2 only, at most max_queued of them.
                    let waiting = std::mem::take(&mut mb.queue);
                    mb.clear();
                    let mut dropped = 0u64;
                    for (m, q) in waiting.into_iter().filter(|(_, q)| *q != QoS::AtMostOnce) {
                        if mb.qos12 < self.max_queued {
                            mb.qos12 += 1;
                            mb.queue.push_back((Arc::new(m.compact()), q));
                        } else {
                            dropped += 1;
                        }
                    }
                    self.metrics.mqtt_messages_dropped.inc_by(dropped);
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
                    mb.clear();
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
        handle.space.notify_waiters();
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
    /// the message's QoS, with RETAIN cleared (MQTT-3.3.1-9).
    pub fn publish(&self, message: Message) -> Routed {
        if message.retain {
            let mut retained = self.retained.write();
            retained.set(message.clone());
            self.metrics
                .mqtt_retained_messages
                .set(retained.len() as i64);
        }
        let mut message = message;
        message.retain = false;
        let message = Arc::new(message);
        let tree = self.tree.read();
        let mut routed = Routed::default();
        let mut deliver = |s: &Subscriber, granted: QoS| {
            let qos = granted.min(message.qos);
            match s.0.deliver(&message, qos, self.max_queued, &self.metrics) {
                Accepted::Yes => routed.delivered += 1,
                Accepted::Congested => {
                    routed.delivered += 1;
                    routed.congested.push(s.0.clone());
                }
                Accepted::No => {}
            }
        };
        // Within one filter's list a client appears once; only several lists can repeat a
        // client (overlapping subscriptions), and only then is de-duplication needed.
        let mut lists: SmallVec<[&[(Subscriber, QoS)]; 4]> = SmallVec::new();
        tree.for_each_matching_list(&message.topic, |list| lists.push(list));
        if let [list] = lists[..] {
            for (s, granted) in list {
                deliver(s, *granted);
            }
        } else if lists.len() > 1 {
            let mut targets: Vec<(&Subscriber, QoS)> = lists
                .iter()
                .flat_map(|l| l.iter().map(|(s, q)| (s, *q)))
                .collect();
            targets.sort_unstable_by_key(|(s, _)| Arc::as_ptr(&s.0));
            targets.dedup_by(|later, kept| {
                if later.0 == kept.0 {
                    kept.1 = kept.1.max(later.1);
                    true
                } else {
                    false
                }
            });
            for (s, granted) in targets {
                deliver(s, granted);
            }
        }
        routed
    }

    /// The bound on each client's queue.
    pub fn max_queued(&self) -> usize {
        self.max_queued
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

    fn drain(h: &ClientHandle) -> Vec<(Arc<Message>, QoS)> {
        let mut mb = h.mailbox.lock();
        std::iter::from_fn(|| mb.pop()).collect()
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
        assert_eq!(b.publish(msg("t/x", QoS::ExactlyOnce, false)).delivered, 1);
        let got: Vec<_> = drain(&a.handle).into_iter().collect();
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
        assert_eq!(b.publish(msg("t/x", QoS::AtMostOnce, false)).delivered, 1);
        assert_eq!(drain(&a.handle)[0].1, QoS::AtMostOnce);
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
        assert_eq!(b.publish(msg("t", QoS::AtMostOnce, false)).delivered, 0);
        assert_eq!(b.publish(msg("t", QoS::AtLeastOnce, false)).delivered, 1);
        assert_eq!(b.publish(msg("t", QoS::ExactlyOnce, false)).delivered, 1);
        let again = b.attach(s("p"), false, false).await;
        assert!(again.session_present);
        assert!(Arc::ptr_eq(&again.handle, &a.handle));
        assert_eq!(again.session.subscriptions.len(), 1);
        let queued: Vec<QoS> = drain(&again.handle).into_iter().map(|(_, q)| q).collect();
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
            drain(&clean.handle).is_empty(),
            "queued messages of the old session are gone"
        );
        assert_eq!(b.subscription_count(), 0);
        assert_eq!(b.publish(msg("t", QoS::AtLeastOnce, false)).delivered, 0);
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
        assert_eq!(b.publish(msg("t", QoS::AtLeastOnce, false)).delivered, 0);
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
            b.publish(msg("devices/d1/telemetry", QoS::AtMostOnce, false))
                .delivered,
            0
        );
        assert_eq!(
            b.publish(msg("public/x", QoS::AtMostOnce, false)).delivered,
            1
        );
    }

    #[tokio::test]
    async fn online_qos0_backlog_congests_and_is_dropped_only_at_the_hard_cap() {
        let b = broker(2);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(&a.handle, "t", QoS::AtMostOnce);
        let congested: Vec<usize> = (0..3)
            .map(|_| b.publish(msg("t", QoS::AtMostOnce, false)).congested.len())
            .collect();
        assert_eq!(congested, vec![0, 0, 1]);
        for _ in 0..(2 * HARD_BACKLOG_FACTOR) {
            b.publish(msg("t", QoS::AtMostOnce, false));
        }
        assert_eq!(drain(&a.handle).len(), 2 * HARD_BACKLOG_FACTOR);
        assert_eq!(b.metrics.mqtt_messages_dropped.get(), 3);
    }

    #[tokio::test]
    async fn online_qos1_backlog_congests_publishers_instead_of_dropping() {
        let b = broker(2);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(&a.handle, "t", QoS::AtLeastOnce);
        let congested: Vec<usize> = (0..4)
            .map(|_| b.publish(msg("t", QoS::AtLeastOnce, false)).congested.len())
            .collect();
        assert_eq!(
            congested,
            vec![0, 0, 1, 1],
            "over max_queued, publishers are told to wait"
        );
        assert_eq!(b.metrics.mqtt_messages_dropped.get(), 0);
        // A waiting publisher is released as soon as the subscriber catches up...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let handle = a.handle.clone();
        let waiter = tokio::spawn(async move { handle.wait_for_space(2, deadline).await });
        tokio::task::yield_now().await;
        let mut conn = Connection::new(stratus_mqtt::Limits::default(), Instant::now());
        conn.handle_bytes(
            &mut bytes::BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01a"[..]),
            Instant::now(),
        );
        conn.accept(Session::new(s("a")), false);
        assert!(!a.handle.drain_into(&mut conn, 2));
        assert!(
            waiter.await.unwrap(),
            "released by the drain, not by the deadline"
        );
        // ...and a subscriber that never catches up is marked as a slow consumer.
        for _ in 0..3 {
            b.publish(msg("t", QoS::AtLeastOnce, false));
        }
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(!a.handle.wait_for_space(2, soon).await);
        assert!(a.handle.take_overloaded());
        assert!(!a.handle.take_overloaded(), "reported once");
    }

    #[tokio::test]
    async fn offline_queue_beyond_the_bound_is_dropped_and_counted() {
        let b = broker(2);
        let a = b.attach(s("a"), false, false).await;
        b.subscribe(&a.handle, "t", QoS::AtLeastOnce);
        b.detach(&a.handle, a.conn, Some(Session::new(s("a"))), false);
        let delivered: Vec<usize> = (0..3)
            .map(|_| b.publish(msg("t", QoS::AtLeastOnce, false)).delivered)
            .collect();
        assert_eq!(delivered, vec![1, 1, 0]);
        assert_eq!(b.metrics.mqtt_messages_dropped.get(), 1);
    }
}
