//! The broker hub shared by all MQTT connection tasks: the subscription tree, the retained
//! store, and one [`ClientHandle`] per client id that holds its mailbox and, while the client
//! is offline, its persistent session.
//!
//! Routing takes a read lock on the tree and a short lock on each matched client's mailbox;
//! there is no lock that every message crosses for writing, and no router thread. Each
//! connection task then drains its own mailbox into its own `Connection` state machine.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;
use stratus_mqtt::session::{Outbound, OutboundState};
use stratus_mqtt::{
    Connection, Delivery, Message, MqttStr, QoS, ReasonCode, RetainedStore, Session, SessionChange,
    SubscriptionOptions, SubscriptionTree,
};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::persist::{self, Persistence};
use stratus_store::{MqttOp, MqttSnapshot, StoredSubscription};

/// One client id's presence in the broker.
pub struct ClientHandle {
    id: MqttStr,
    /// Which topics it may receive (an [`Access`] as `u8`).
    access: AtomicU8,
    /// With [`Access::Device`]: the device id is the first `device_len` bytes of the client id
    /// (all of it, or the `{id}` of an `{id}-…`/`{id}/…` client id).
    device_len: AtomicU8,
    mailbox: Mutex<Mailbox>,
    /// Signalled when the mailbox goes from empty to non-empty, or the client must be dropped.
    pub notify: MailSignal,
    /// Signalled to every waiter when the QoS 1/2 backlog falls back within bounds, the client
    /// goes away, its slot changes state, or an attach lets go (publishers, a take-over and the
    /// next attach wait on it; each re-checks its own condition).
    changed: Notify,
    /// Set when publishers waited too long for this client: its connection must close.
    overloaded: AtomicBool,
    state: Mutex<SlotState>,
    /// Held while a connection attaches to the client (see [`AttachGuard`]): one at a time.
    attaching: AtomicBool,
    /// The attachment number of the latest connection (see [`Broker::attach`]): a delayed will
    /// or a session expiry compares it to know whether the client came back.
    current_conn: AtomicU64,
    /// Whether a connection holds the client now (shared subscriptions prefer online members).
    online: AtomicBool,
    /// Whether the session is persisted: its QoS 1/2 messages, subscriptions and state are
    /// written to the store.
    durable: AtomicBool,
    /// The attachment number of a connection that was taken over or evicted (0: none): that
    /// connection closes when it sees it (see [`eviction`](Self::eviction)).
    kicked: AtomicU64,
    /// Why `kicked` must close: 0 for a take-over, else the MQTT 5.0 reason code of an
    /// eviction ([`evict`](Self::evict)).
    kick_code: AtomicU8,
    /// The parking-lot token of the client's connection while it is parked (0: not parked).
    parked: AtomicU64,
    /// Where [`signal`](Self::signal) sends that token.
    wakes: Arc<ParkWakes>,
}

/// Wakes the one task that serves a client: its connection, or an in-process subscriber.
///
/// A flag and one waker. A task waits on it every time its busy loop goes round, and a
/// tokio `Notify` there cost a lock to join its waiter list and another to leave it, each
/// time; this costs an atomic swap, and registering a waker only when nothing is pending.
/// One task waits at a time (the attach lock keeps two connections of a client apart); a
/// signal that comes while nobody waits is kept for the next wait, as `Notify::notify_one`
/// keeps a permit.
#[derive(Default)]
pub struct MailSignal {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl MailSignal {
    /// Sets the signal and wakes the waiting task, if any.
    pub fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Takes a pending signal without waiting; true if there was one.
    pub fn take(&self) -> bool {
        self.pending.load(Ordering::Relaxed) && self.pending.swap(false, Ordering::Acquire)
    }

    /// Ready (taking the signal) once it is set; registers the task's waker otherwise.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Set between the first look and the registration: the wake may have missed us.
        if self.take() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves (taking the signal) once it is set.
    pub fn notified(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_take(cx))
    }
}

/// Tokens of parked connections whose client was signalled (mail, a take-over, a slow
/// consumer): the MQTT listener's parking lot takes them and wakes those connections.
#[derive(Default)]
pub struct ParkWakes {
    tokens: Mutex<Vec<u64>>,
    /// A parking lot took these wake-ups (there is one per broker).
    claimed: AtomicBool,
    /// Signalled when a token is added.
    pub notify: Notify,
}

impl ParkWakes {
    /// Asks for the connection parked under `token` to be woken.
    pub fn push(&self, token: u64) {
        self.tokens.lock().push(token);
        self.notify.notify_one();
    }

    /// True for the first caller only: the one parking lot that serves this broker.
    pub fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    /// The tokens pushed since the last call.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.tokens.lock())
    }
}

/// Subscription Identifiers of one delivery (usually none or one).
type SubIds = SmallVec<[NonZeroU32; 1]>;

/// One message waiting in a mailbox.
struct Mail {
    message: Arc<Message>,
    qos: QoS,
    retain: bool,
    sub_ids: SubIds,
    share: Option<Arc<SharedGroup>>,
    /// The message's number in the store, when the session is persisted.
    seq: Option<u64>,
}

/// A member of a shared subscription group: its handle, granted QoS and Subscription Identifier.
type GroupMember = (Arc<ClientHandle>, QoS, Option<NonZeroU32>);

/// A shared subscription `$share/{group}/{filter}` (MQTT 5.0 §4.8.2): each message goes to
/// one member, round robin among the online ones.
pub struct SharedGroup {
    /// The whole `$share/{group}/{filter}`.
    key: MqttStr,
    /// The filter without the `$share/{group}/` prefix.
    filter: String,
    members: Mutex<Vec<GroupMember>>,
    next: AtomicU64,
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
    queue: VecDeque<Mail>,
    /// How many of `queue` are QoS 0 (the rest are QoS 1/2).
    qos0: usize,
    online: bool,
    gone: bool,
    /// The client's express lane while its connection waits (see [`Express`]).
    express: Option<Box<Express>>,
}

impl Mailbox {
    fn backlog(&self) -> usize {
        self.queue.len()
    }

    /// QoS 1/2 messages queued.
    fn qos12(&self) -> usize {
        self.queue.len() - self.qos0
    }

    fn push(&mut self, mail: Mail) {
        if mail.qos == QoS::AtMostOnce {
            self.qos0 += 1;
        }
        self.queue.push_back(mail);
    }

    fn pop(&mut self) -> Option<Mail> {
        let item = self.queue.pop_front()?;
        if item.qos == QoS::AtMostOnce {
            self.qos0 -= 1;
        }
        Some(item)
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.qos0 = 0;
    }
}

/// Which messages a client may receive, checked at delivery (see `policy.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Access {
    /// Every topic.
    Full = 0,
    /// Nothing under `devices/` (anonymous clients, applications without `telemetry:read`).
    NoDevices = 1,
    /// Under `devices/`, only `devices/+/telemetry`.
    TelemetryReader = 2,
    /// A device: only its own `devices/{id}/…` tree, whatever its session holds.
    Device = 3,
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
    Online { conn: u64 },
    /// The client is away; its session waits here (`conn` is the attachment that parked it).
    Offline { session: Box<Session>, conn: u64 },
    /// The session ended; the handle is out of the registry.
    Gone,
}

impl ClientHandle {
    fn new(id: MqttStr, wakes: Arc<ParkWakes>) -> Self {
        ClientHandle {
            id,
            access: AtomicU8::new(Access::NoDevices as u8),
            device_len: AtomicU8::new(0),
            mailbox: Mutex::new(Mailbox::default()),
            notify: MailSignal::default(),
            changed: Notify::new(),
            overloaded: AtomicBool::new(false),
            state: Mutex::new(SlotState::Fresh),
            attaching: AtomicBool::new(false),
            current_conn: AtomicU64::new(0),
            online: AtomicBool::new(false),
            durable: AtomicBool::new(false),
            kicked: AtomicU64::new(0),
            kick_code: AtomicU8::new(0),
            parked: AtomicU64::new(0),
            wakes,
        }
    }

    /// Wakes the client's connection: its mailbox has mail, it is taken over, or it must close.
    pub fn signal(&self) {
        self.notify.notify();
        // After the notify: a connection that parks checks for a notification after it
        // published its token, so one of the two sides always sees the other.
        let token = self.parked.load(Ordering::SeqCst);
        if token != 0 {
            self.wakes.push(token);
        }
    }

    /// Opens `lane` to publishers if the mailbox is empty and no other connection's lane is
    /// open; gives it back otherwise.
    pub fn open_express(&self, lane: Box<Express>) -> Result<(), Box<Express>> {
        let mut mb = self.mailbox.lock();
        if !mb.queue.is_empty() || mb.express.is_some() || !mb.online {
            return Err(lane);
        }
        mb.express = Some(lane);
        Ok(())
    }

    /// Takes back the lane that the connection with attachment number `conn` opened. Once
    /// this returns, no publisher writes to its socket.
    pub fn close_express(&self, conn: u64) -> Option<Box<Express>> {
        let mut mb = self.mailbox.lock();
        if mb.express.as_ref().is_some_and(|l| l.conn == conn) {
            mb.express.take()
        } else {
            None
        }
    }

    /// Sets which topics the client may receive; for [`Access::Device`] the device is
    /// `owner`'s (a prefix of the client id).
    fn set_access(&self, access: Access, owner: &Owner) {
        let len = match owner {
            Owner::Device(id) if self.id.as_str().starts_with(&**id) => {
                u8::try_from(id.len()).unwrap_or(0)
            }
            _ => 0,
        };
        self.device_len.store(len, Ordering::Relaxed);
        // A device's access without its device would let nothing through: say so plainly.
        let access = match (access, len) {
            (Access::Device, 0) => Access::NoDevices,
            (a, _) => a,
        };
        self.access.store(access as u8, Ordering::Relaxed);
    }

    /// With [`Access::Device`]: whether `topic` is in the device's own tree.
    fn device_tree_holds(&self, topic: &str) -> bool {
        let len = usize::from(self.device_len.load(Ordering::Relaxed));
        let Some(device) = self.id.as_str().get(..len).filter(|d| !d.is_empty()) else {
            return false;
        };
        topic
            .strip_prefix("devices/")
            .and_then(|rest| rest.strip_prefix(device))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Whether the connection with attachment number `conn` was taken over by a newer one or
    /// evicted (it is signalled when it is).
    pub fn taken_over(&self, conn: u64) -> bool {
        self.kicked.load(Ordering::Acquire) == conn
    }

    /// Why the connection with attachment number `conn` must close: `None` when it need not;
    /// `Some(None)` when a newer connection took the client over; `Some(Some(code))` when it
    /// was evicted with `code`.
    pub fn eviction(&self, conn: u64) -> Option<Option<ReasonCode>> {
        if self.kicked.load(Ordering::Acquire) != conn {
            return None;
        }
        Some(match self.kick_code.load(Ordering::Acquire) {
            0 => None,
            code => ReasonCode::from_u8(code),
        })
    }

    /// Ends the connection with attachment number `conn` from outside — its credential
    /// lapsed, an administrator disconnected it — with `code` (sent to MQTT 5.0 clients as
    /// the DISCONNECT reason code). Nothing happens when `conn` is no longer the client's.
    pub fn evict(&self, conn: u64, code: ReasonCode) {
        if self.current_conn.load(Ordering::Acquire) != conn {
            return;
        }
        self.kick_code.store(code as u8, Ordering::Release);
        if self.kicked.swap(conn, Ordering::AcqRel) != conn {
            self.signal();
        }
    }

    /// Publishes (or with 0 withdraws) the parking-lot token of the client's connection.
    pub fn set_parked(&self, token: u64) {
        self.parked.store(token, Ordering::SeqCst);
    }

    /// Whether the session is persisted.
    pub fn is_durable(&self) -> bool {
        self.durable.load(Ordering::Acquire)
    }

    /// Writes `op` when the session is persisted; returns whether it did.
    fn record(&self, persist: Option<&Persistence>, op: impl FnOnce() -> MqttOp) -> bool {
        match persist {
            Some(p) if self.is_durable() => {
                p.write(op());
                true
            }
            _ => false,
        }
    }

    /// The attachment number of the latest connection of this client.
    pub fn current_conn(&self) -> u64 {
        self.current_conn.load(Ordering::Acquire)
    }

    /// The client id.
    pub fn id(&self) -> &MqttStr {
        &self.id
    }

    /// Queues `message` for the client with the delivery `qos` (see [`Mailbox`] for the policy).
    /// A QoS 1/2 message for a persisted session is written to the store (under the mailbox
    /// lock, so its acknowledgement can never be written before it); `stored` is then set.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        self: &Arc<Self>,
        message: &Arc<Message>,
        qos: QoS,
        retain: bool,
        sub_ids: SubIds,
        share: Option<&Arc<SharedGroup>>,
        hub: Hub<'_>,
        stored: &mut bool,
    ) -> Accepted {
        let Hub {
            max_queued,
            metrics,
            persist,
            defer,
        } = hub;
        match self.access.load(Ordering::Relaxed) {
            a if a == Access::NoDevices as u8 && message.topic.starts_with("devices/") => {
                return Accepted::No;
            }
            a if a == Access::TelemetryReader as u8
                && message.topic.starts_with("devices/")
                && !stratus_mqtt::topic::matches("devices/+/telemetry", &message.topic) =>
            {
                return Accepted::No;
            }
            a if a == Access::Device as u8 && !self.device_tree_holds(&message.topic) => {
                return Accepted::No;
            }
            _ => {}
        }
        let mut mb = self.mailbox.lock();
        if mb.gone || (!mb.online && qos == QoS::AtMostOnce) {
            return Accepted::No;
        }
        let full = if mb.online {
            mb.backlog() >= max_queued.saturating_mul(HARD_BACKLOG_FACTOR)
        } else {
            mb.qos12() >= max_queued
        };
        if full {
            drop(mb);
            metrics.mqtt_messages_dropped.inc();
            return Accepted::No;
        }
        let was_empty = mb.queue.is_empty();
        if qos == QoS::AtMostOnce && was_empty {
            if let Some(lane) = mb.express.as_mut().filter(|l| !l.shut) {
                if defer.is_some_and(Deferred::take_express) {
                    match lane.write(message, retain, &sub_ids, metrics) {
                        LaneWrite::Done | LaneWrite::Dropped => return Accepted::Yes,
                        LaneWrite::Shut => {
                            drop(mb);
                            self.signal_or_defer(defer);
                            return Accepted::Yes;
                        }
                        LaneWrite::WouldBlock => {}
                    }
                }
            }
        }
        // An offline client's messages may wait long: keep them compact.
        let kept = if mb.online {
            message.clone()
        } else {
            Arc::new(message.compact())
        };
        let seq = if qos == QoS::AtMostOnce {
            None
        } else {
            self.store_delivery(persist, &kept, qos, retain, &sub_ids)
        };
        *stored |= seq.is_some();
        mb.push(Mail {
            message: kept,
            qos,
            retain,
            sub_ids,
            share: share.cloned(),
            seq,
        });
        let congested = mb.online && mb.backlog() > max_queued;
        drop(mb);
        if was_empty {
            self.signal_or_defer(defer);
        }
        if congested {
            Accepted::Congested
        } else {
            Accepted::Yes
        }
    }

    /// Signals the client now, or once the batch is routed when there is one.
    fn signal_or_defer(self: &Arc<Self>, defer: Option<&Deferred>) {
        match defer {
            Some(later) => later.push(self.clone()),
            None => self.signal(),
        }
    }

    /// Writes a QoS 1/2 delivery to a persisted session; returns its number.
    fn store_delivery(
        &self,
        persist: Option<&Persistence>,
        message: &Message,
        qos: QoS,
        retain: bool,
        sub_ids: &[NonZeroU32],
    ) -> Option<u64> {
        let p = persist.filter(|_| self.is_durable())?;
        let seq = p.next_seq();
        p.write(MqttOp::MessagePut {
            client_id: self.id.to_string(),
            message: persist::stored_message(seq, message, qos, retain, sub_ids),
        });
        Some(seq)
    }

    /// Moves waiting messages into `conn` while it has room: QoS 1/2 while the in-flight window
    /// has room, QoS 0 while the transmit buffer does. Returns how many it moved, and whether
    /// more could be moved right away (the batch limit was hit).
    pub fn drain_into(&self, conn: &mut Connection, max_queued: usize) -> (usize, bool) {
        let mut mb = self.mailbox.lock();
        let was_congested = mb.backlog() > max_queued;
        let mut moved = 0;
        let mut more = false;
        // Read once, and only when there is mail (most calls find none).
        let mut now = None;
        while let Some(Mail { qos, .. }) = mb.queue.front() {
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
            let Some(mail) = mb.pop() else {
                break;
            };
            let delivery = Delivery {
                qos: mail.qos,
                retain: mail.retain,
                subscription_ids: &mail.sub_ids,
                share: mail.share.as_ref().map(|g| &g.key),
                store_seq: mail.seq,
            };
            // Expired messages are dropped here (MQTT-3.3.2-5).
            conn.deliver_with(
                &mail.message,
                delivery,
                *now.get_or_insert_with(Instant::now),
            );
            moved += 1;
        }
        let relieved = was_congested && mb.backlog() <= max_queued;
        drop(mb);
        if relieved {
            self.changed.notify_waiters();
        }
        (moved, more)
    }

    /// Queues the retained messages for a new subscription (RETAIN set, `qos` capped by the
    /// granted QoS). They go through the mailbox so the in-flight window paces them like any
    /// other message; being already in memory they are never dropped for lack of room.
    pub fn enqueue_retained(
        &self,
        messages: Vec<Message>,
        granted: QoS,
        sub_id: Option<NonZeroU32>,
        persist: Option<&Persistence>,
    ) {
        if messages.is_empty() {
            return;
        }
        let mut mb = self.mailbox.lock();
        let was_empty = mb.queue.is_empty();
        for m in messages {
            let qos = m.qos.min(granted);
            let sub_ids: SubIds = sub_id.into_iter().collect();
            let seq = if qos == QoS::AtMostOnce {
                None
            } else {
                self.store_delivery(persist, &m, qos, true, &sub_ids)
            };
            mb.push(Mail {
                message: Arc::new(m),
                qos,
                retain: true,
                sub_ids,
                share: None,
                seq,
            });
        }
        drop(mb);
        if was_empty {
            self.signal();
        }
    }

    /// Takes up to `max` queued messages, oldest first, for an in-process subscriber that
    /// has no MQTT connection (see [`Broker::internal_subscriber`]). Wait on
    /// [`ClientHandle::notify`] for more.
    pub fn take_messages(&self, max: usize) -> Vec<Arc<Message>> {
        let mut mb = self.mailbox.lock();
        let n = max.min(mb.queue.len());
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match mb.pop() {
                Some(mail) => out.push(mail.message),
                None => break,
            }
        }
        out
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
            let space = self.changed.notified();
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
                    self.signal();
                }
                return false;
            }
        }
    }
}

/// The options of a subscription that routing needs (MQTT 5.0).
#[derive(Clone, Copy, Default)]
struct SubOptions {
    no_local: bool,
    retain_as_published: bool,
    id: Option<NonZeroU32>,
}

/// A subscriber in the tree: a client handle with its subscription's options, or a shared
/// subscription group; compared by identity.
#[derive(Clone)]
enum Subscriber {
    Client(Arc<ClientHandle>, SubOptions),
    Group(Arc<SharedGroup>),
}

impl Subscriber {
    fn key(&self) -> *const () {
        match self {
            Subscriber::Client(h, _) => Arc::as_ptr(h).cast(),
            Subscriber::Group(g) => Arc::as_ptr(g).cast(),
        }
    }
}

impl PartialEq for Subscriber {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

/// What routing needs of the broker besides the message.
#[derive(Clone, Copy)]
struct Hub<'a> {
    max_queued: usize,
    metrics: &'a Metrics,
    persist: Option<&'a Persistence>,
    /// Where to put clients to signal later instead of now (see [`Broker::publish_deferred`]).
    defer: Option<&'a Deferred>,
}

/// Clients whose mailboxes got their first message during a batch of publishes, to be
/// signalled once the batch is routed (see [`Broker::publish_deferred`]); and how many
/// deliveries of the batch may still take an express lane.
#[derive(Default)]
pub struct Deferred {
    signals: std::cell::RefCell<Vec<Arc<ClientHandle>>>,
    express: std::cell::Cell<u8>,
}

impl Deferred {
    /// A batch whose first `express` QoS 0 deliveries to idle subscribers may be written to
    /// their sockets at once (see [`Express`]).
    pub fn with_express(express: u8) -> Self {
        Deferred {
            signals: Default::default(),
            express: std::cell::Cell::new(express),
        }
    }

    /// The clients to signal now.
    pub fn take(&self) -> Vec<Arc<ClientHandle>> {
        std::mem::take(&mut *self.signals.borrow_mut())
    }

    fn push(&self, handle: Arc<ClientHandle>) {
        self.signals.borrow_mut().push(handle);
    }

    fn take_express(&self) -> bool {
        let left = self.express.get();
        self.express.set(left.saturating_sub(1));
        left > 0
    }
}

/// A subscriber's socket, open to publishers while its connection waits with nothing to send:
/// a QoS 0 delivery is then encoded and written by the publisher's task, under the mailbox
/// lock, instead of queued for the subscriber's task to wake, drain and write. That saves a
/// task wake-up and a busy-loop turn on the path from one socket to the other (the latency
/// Mosquitto gets by writing in the loop that read). The connection takes the lane back
/// whenever it runs, before it writes anything itself, so writes never interleave; only a
/// batch of one PUBLISH (a client that sends a message at a time) uses lanes, so bursts still
/// go through mailboxes and are written by each subscriber in one syscall.
pub struct Express {
    socket: Arc<tokio::net::tcp::OwnedWriteHalf>,
    encoder: stratus_mqtt::Qos0Encoder,
    /// The attachment number of the connection that opened the lane.
    conn: u64,
    /// Encoding room, kept across writes.
    buf: bytes::BytesMut,
    /// Deliveries written since the lane opened.
    packets: u32,
    /// No more writes until the connection takes the lane back: a write failed, or the socket
    /// took only part of a packet and `rest` must go first.
    shut: bool,
    rest: Bytes,
}

/// What a write through an [`Express`] lane did.
enum LaneWrite {
    /// The socket took the whole packet.
    Done,
    /// The message was not to be sent (expired, or larger than the client accepts), as the
    /// connection would have decided.
    Dropped,
    /// The socket took nothing: queue the message instead.
    WouldBlock,
    /// The lane shut (part written, or an error): the connection must run.
    Shut,
}

impl Express {
    /// A lane for the connection with attachment number `conn`.
    pub fn new(
        socket: Arc<tokio::net::tcp::OwnedWriteHalf>,
        encoder: stratus_mqtt::Qos0Encoder,
        conn: u64,
    ) -> Box<Express> {
        Box::new(Express {
            socket,
            encoder,
            conn,
            buf: bytes::BytesMut::new(),
            packets: 0,
            shut: false,
            rest: Bytes::new(),
        })
    }

    /// Opens again with a fresh encoder (the connection's limits may have changed).
    pub fn reset(&mut self, encoder: stratus_mqtt::Qos0Encoder) {
        self.encoder = encoder;
        self.packets = 0;
        self.shut = false;
        self.rest = Bytes::new();
    }

    /// Deliveries written since the lane opened.
    pub fn packets(&self) -> u32 {
        self.packets
    }

    /// The tail of a packet the socket took in part: it must be written before anything else.
    pub fn take_rest(&mut self) -> Bytes {
        std::mem::take(&mut self.rest)
    }

    fn write(
        &mut self,
        message: &Message,
        retain: bool,
        sub_ids: &[NonZeroU32],
        metrics: &Metrics,
    ) -> LaneWrite {
        self.buf.clear();
        if !self
            .encoder
            .encode(message, retain, sub_ids, Instant::now(), &mut self.buf)
        {
            return LaneWrite::Dropped;
        }
        match self.socket.try_write(&self.buf) {
            Ok(n) => {
                metrics.mqtt_bytes_sent.inc_by(n as u64);
                metrics.mqtt_express_deliveries.inc();
                self.packets += 1;
                if n == self.buf.len() {
                    LaneWrite::Done
                } else {
                    self.rest = Bytes::copy_from_slice(&self.buf[n..]);
                    self.shut = true;
                    LaneWrite::Shut
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => LaneWrite::WouldBlock,
            Err(_) => {
                // The connection's own next write meets the error and closes.
                self.shut = true;
                LaneWrite::Shut
            }
        }
    }
}

/// Where [`Broker::publish`] put a message.
#[derive(Default)]
pub struct Routed {
    /// Clients that took it.
    pub delivered: usize,
    /// Whether it was written to the store (retained, or queued for a persisted session): the
    /// publisher's acknowledgement waits for [`Persistence::durable`].
    pub stored: bool,
    /// Online clients whose backlog is over its bound: the publisher should wait for them
    /// ([`ClientHandle::wait_for_space`]): hold its acknowledgement, or stop reading (QoS 0).
    pub congested: Vec<Arc<ClientHandle>>,
    /// The message was refused (its retained copy would exceed a retained quota) and went
    /// nowhere.
    pub refused: bool,
}

/// A session handed to a new connection.
pub struct Attached {
    /// The client's handle (keep it for the connection's life).
    pub handle: Arc<ClientHandle>,
    /// The session to run.
    pub session: Session,
    /// Whether `session` is a resumed one (CONNACK Session Present).
    pub session_present: bool,
    /// This attachment's number, for [`Broker::detach`].
    pub conn: u64,
    /// A stored session ended with this attachment (Clean Start, or a session that will not
    /// outlive this connection): its deletion was written, and CONNACK should wait for it
    /// ([`Broker::flush`]) so that a crash cannot bring it back.
    pub ended_stored: bool,
}

/// Serialises the connections that attach to one client id, as a lock of one bit (an async
/// mutex would cost 40 bytes in every handle): waiters wait on [`ClientHandle::changed`].
struct AttachGuard<'a>(&'a ClientHandle);

impl<'a> AttachGuard<'a> {
    async fn acquire(handle: &'a ClientHandle) -> AttachGuard<'a> {
        loop {
            let changed = handle.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !handle.attaching.swap(true, Ordering::AcqRel) {
                return AttachGuard(handle);
            }
            changed.await;
        }
    }
}

impl Drop for AttachGuard<'_> {
    fn drop(&mut self) {
        self.0.attaching.store(false, Ordering::Release);
        self.0.changed.notify_waiters();
    }
}

/// The principal a client id's session belongs to (SPEC "Identities"): only it may resume,
/// take over or end that session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Clients without credentials (with `--allow-anonymous`): one principal, whatever user
    /// name they give.
    Anonymous,
    /// A registered device.
    Device(Box<str>),
    /// An application or the admin (an OAuth client).
    Client(Box<str>),
    /// A TLS client certificate, by its CN.
    Certificate(Box<str>),
    /// A session stored before sessions recorded their owner: the first principal allowed to
    /// use its client id adopts it.
    Legacy,
}

impl Owner {
    /// The stored form: `anonymous`, `device:ID`, `client:ID`, `cert:CN`, or empty (legacy).
    pub fn encode(&self) -> String {
        match self {
            Owner::Anonymous => "anonymous".into(),
            Owner::Device(id) => format!("device:{id}"),
            Owner::Client(id) => format!("client:{id}"),
            Owner::Certificate(cn) => format!("cert:{cn}"),
            Owner::Legacy => String::new(),
        }
    }

    /// Reads [`Owner::encode`]'s form; anything else is [`Owner::Legacy`].
    pub fn decode(s: &str) -> Owner {
        match s.split_once(':') {
            Some(("device", id)) => Owner::Device(id.into()),
            Some(("client", id)) => Owner::Client(id.into()),
            Some(("cert", cn)) => Owner::Certificate(cn.into()),
            _ if s == "anonymous" => Owner::Anonymous,
            _ => Owner::Legacy,
        }
    }
}

/// Bounds on retained messages (`[mqtt] max_retained…`): per client (by client id) and in
/// total, in count and payload bytes. The server's own retained messages (desired config,
/// firmware notices) and restored ones without a recorded setter are not bounded per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainQuota {
    /// Retained messages one client may have set.
    pub per_client: usize,
    /// Their payload bytes.
    pub per_client_bytes: usize,
    /// Retained messages clients may set in total.
    pub total: usize,
    /// Their payload bytes in total.
    pub total_bytes: usize,
}

impl Default for RetainQuota {
    fn default() -> Self {
        RetainQuota {
            per_client: usize::MAX,
            per_client_bytes: usize::MAX,
            total: usize::MAX,
            total_bytes: usize::MAX,
        }
    }
}

/// What one client's retained messages cost.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    count: usize,
    bytes: usize,
}

/// The retained messages, and what each client that set some of them uses.
#[derive(Default)]
struct Retained {
    store: RetainedStore,
    by_origin: HashMap<Box<str>, Usage>,
    /// What every client together uses (the server's own retained messages — `$SYS`, desired
    /// config, firmware notices — are not counted).
    clients: Usage,
}

impl Retained {
    /// Stores (or with an empty payload deletes) a retained message set by `origin`; `Err`
    /// when that would take `origin` or the clients together over `quota` (nothing changes
    /// then). Deleting is always allowed; without an origin (the server's own) nothing is
    /// bounded.
    fn set(
        &mut self,
        message: Message,
        origin: Option<&str>,
        quota: &RetainQuota,
    ) -> Result<(), ()> {
        let bytes = message.payload.len();
        if let (Some(o), true) = (origin, bytes > 0) {
            let old = self.store.usage_of(&message.topic);
            // What the message it replaces cost a client, and whether that client is `o`.
            let (old_count, old_bytes) = match &old.origin {
                Some(_) => (1, old.bytes),
                None => (0, 0),
            };
            let same = old.origin.as_deref() == Some(o);
            let count = (self.clients.count + 1).saturating_sub(old_count);
            let total_bytes = (self.clients.bytes + bytes).saturating_sub(old_bytes);
            let mine = self.by_origin.get(o).copied().unwrap_or_default();
            let my_count = mine.count + usize::from(!same);
            let my_bytes = (mine.bytes + bytes).saturating_sub(if same { old.bytes } else { 0 });
            if count > quota.total
                || total_bytes > quota.total_bytes
                || my_count > quota.per_client
                || my_bytes > quota.per_client_bytes
            {
                return Err(());
            }
        }
        let replaced = self.store.set_by(message, origin.filter(|_| bytes > 0));
        self.release(replaced);
        if let (Some(o), true) = (origin, bytes > 0) {
            let u = self.by_origin.entry(o.into()).or_default();
            u.count += 1;
            u.bytes += bytes;
            self.clients.count += 1;
            self.clients.bytes += bytes;
        }
        Ok(())
    }

    /// Deletes `topic`'s retained message (expired); returns whether there was one.
    fn remove(&mut self, topic: &str) -> bool {
        let replaced = self.store.remove_by(topic);
        let existed = replaced.existed;
        self.release(replaced);
        existed
    }

    /// Gives back what a replaced or removed message cost its setter.
    fn release(&mut self, replaced: stratus_mqtt::Replaced) {
        let Some(origin) = replaced.origin.filter(|_| replaced.existed) else {
            return;
        };
        self.clients.count = self.clients.count.saturating_sub(1);
        self.clients.bytes = self.clients.bytes.saturating_sub(replaced.bytes);
        if let Some(u) = self.by_origin.get_mut(&*origin) {
            u.count = u.count.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(replaced.bytes);
            if u.count == 0 {
                self.by_origin.remove(&*origin);
            }
        }
    }
}

/// Why [`Broker::attach_session`] refused a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachRefused {
    /// The client id's live or stored session belongs to another principal.
    #[error("the client id's session belongs to another principal")]
    NotOwner,
}

/// A handle in the client registry, found by its client id (the handle holds the id, so the
/// registry does not keep a second copy of it), with the principal its session belongs to.
struct Registered(Arc<ClientHandle>, Owner);

impl std::borrow::Borrow<[u8]> for Registered {
    fn borrow(&self) -> &[u8] {
        self.0.id.as_str().as_bytes()
    }
}

impl std::hash::Hash for Registered {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, so lookups by `&[u8]` agree (`Borrow` requires it).
        self.0.id.as_str().as_bytes().hash(state);
    }
}

impl PartialEq for Registered {
    fn eq(&self, other: &Self) -> bool {
        self.0.id.as_str().as_bytes() == other.0.id.as_str().as_bytes()
    }
}

impl Eq for Registered {}

/// The broker state shared by every connection.
pub struct Broker {
    clients: Mutex<HashSet<Registered>>,
    tree: RwLock<SubscriptionTree<Subscriber>>,
    groups: Mutex<HashMap<String, Arc<SharedGroup>>>,
    retained: RwLock<Retained>,
    retain_quota: RetainQuota,
    max_queued: usize,
    next_conn: AtomicU64,
    persist: Option<Persistence>,
    /// Metrics shared with the HTTP listener.
    pub metrics: Arc<Metrics>,
    /// When the broker started.
    pub started: Instant,
    /// Live events (telemetry, alarms, device status, firmware) for the stream and rules.
    pub events: crate::events::EventBus,
    /// Wake-ups for parked MQTT connections (see [`ClientHandle::signal`]).
    wakes: Arc<ParkWakes>,
}

impl Broker {
    /// A broker whose sessions queue at most `max_queued` messages, kept in memory only.
    pub fn new(max_queued: usize, metrics: Arc<Metrics>) -> Self {
        Broker {
            clients: Mutex::new(HashSet::new()),
            tree: RwLock::new(SubscriptionTree::new()),
            groups: Mutex::new(HashMap::new()),
            retained: RwLock::new(Retained::default()),
            retain_quota: RetainQuota::default(),
            max_queued,
            next_conn: AtomicU64::new(1),
            persist: None,
            metrics,
            started: Instant::now(),
            events: crate::events::EventBus::default(),
            wakes: Arc::default(),
        }
    }

    /// Takes `handle` out of the registry if it is the one registered for its client id.
    fn unregister(&self, handle: &Arc<ClientHandle>) {
        let mut clients = self.clients.lock();
        if clients
            .get(handle.id.as_str().as_bytes())
            .is_some_and(|r| Arc::ptr_eq(&r.0, handle))
        {
            clients.remove(handle.id.as_str().as_bytes());
        }
    }

    /// Where client handles send the tokens of parked connections to wake.
    pub fn park_wakes(&self) -> &Arc<ParkWakes> {
        &self.wakes
    }

    /// Bounds the retained messages clients may set (see [`RetainQuota`]).
    pub fn with_retain_quota(mut self, quota: RetainQuota) -> Self {
        self.retain_quota = quota;
        self
    }

    /// A broker that keeps retained messages and persistent sessions in `persist`.
    pub fn with_persistence(
        max_queued: usize,
        metrics: Arc<Metrics>,
        persist: Persistence,
    ) -> Self {
        Broker {
            persist: Some(persist),
            ..Broker::new(max_queued, metrics)
        }
    }

    /// The store, when the broker has one.
    pub fn persistence(&self) -> Option<&Persistence> {
        self.persist.as_ref()
    }

    fn hub(&self) -> Hub<'_> {
        Hub {
            max_queued: self.max_queued,
            metrics: &self.metrics,
            persist: self.persist.as_ref(),
            defer: None,
        }
    }

    /// Resolves once every change written so far is durable (at once without a store).
    pub async fn flush(&self) -> Result<(), Arc<stratus_store::StoreError>> {
        match &self.persist {
            Some(p) => p
                .durable()
                .await
                .unwrap_or(Err(Arc::new(stratus_store::StoreError::WriterStopped))),
            None => Ok(()),
        }
    }

    /// Attaches a new connection to `client_id`'s session: takes over (disconnects) a current
    /// connection with the same id, then resumes its session unless `clean_session`. The
    /// session is persisted when Clean Session is 0 (MQTT 3.1.1 semantics). For the hub's
    /// tests: every such client is [`Owner::Anonymous`].
    #[cfg(test)]
    pub(crate) async fn attach(
        &self,
        client_id: MqttStr,
        clean_session: bool,
        restricted: bool,
    ) -> Attached {
        let access = if restricted {
            Access::NoDevices
        } else {
            Access::Full
        };
        let expiry = if clean_session { 0 } else { u32::MAX };
        self.attach_session(client_id, &Owner::Anonymous, clean_session, access, expiry)
            .await
            .expect("the hub's tests attach anonymous clients only")
    }

    /// [`attach`](Self::attach) for the principal `owner`, with the Session Expiry Interval of
    /// the connection: a session that outlives its connection (`expiry` > 0) is persisted
    /// when the broker has a store. A client id whose live or stored session belongs to
    /// another principal is refused before anything of that session is touched: it is not
    /// resumed, taken over or ended.
    pub async fn attach_session(
        &self,
        client_id: MqttStr,
        owner: &Owner,
        clean_session: bool,
        access: Access,
        expiry: u32,
    ) -> Result<Attached, AttachRefused> {
        loop {
            let handle = {
                let mut clients = self.clients.lock();
                let key = client_id.as_str().as_bytes();
                match clients.get(key) {
                    Some(Registered(h, o)) if o == owner => h.clone(),
                    Some(Registered(_, Owner::Legacy)) => {
                        // A session stored before owners were recorded: adopted by the first
                        // principal allowed to use its client id.
                        match clients.take(key) {
                            Some(Registered(h, _)) => {
                                clients.insert(Registered(h.clone(), owner.clone()));
                                h
                            }
                            None => continue,
                        }
                    }
                    Some(_) => return Err(AttachRefused::NotOwner),
                    None => {
                        let h =
                            Arc::new(ClientHandle::new(client_id.compact(), self.wakes.clone()));
                        clients.insert(Registered(h.clone(), owner.clone()));
                        h
                    }
                }
            };
            let _serial = AttachGuard::acquire(&handle).await;
            self.take_over(&handle).await;
            let mut state = handle.state.lock();
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let previous = std::mem::replace(&mut *state, SlotState::Online { conn });
            let (session, present) = match previous {
                SlotState::Gone => {
                    // The previous connection ended its clean session while we waited; the
                    // handle left the registry, so start over with a fresh one.
                    *state = SlotState::Gone;
                    continue;
                }
                SlotState::Offline { session: old, .. } => {
                    self.metrics.mqtt_sessions_offline.dec();
                    if clean_session {
                        self.unsubscribe_all(&handle, &old);
                        handle.mailbox.lock().clear();
                        (Session::new(), false)
                    } else {
                        (*old, true)
                    }
                }
                SlotState::Online { .. } => {
                    // The old connection did not let go in time: its session is lost to it.
                    tracing::warn!(client_id = %client_id, "previous connection did not release its session");
                    (Session::new(), false)
                }
                SlotState::Fresh => (Session::new(), false),
            };
            drop(state);
            let durable = expiry != 0 && self.persist.is_some();
            let was_durable = handle.durable.swap(durable, Ordering::AcqRel);
            let ended_stored = was_durable && (!present || !durable);
            if ended_stored {
                // The stored session ended (Clean Start) or will end with this connection.
                if let Some(p) = &self.persist {
                    p.write(MqttOp::SessionDelete {
                        client_id: client_id.to_string(),
                    });
                }
            }
            handle.current_conn.store(conn, Ordering::Release);
            handle.online.store(true, Ordering::Release);
            handle.set_access(access, owner);
            handle.mailbox.lock().online = true;
            return Ok(Attached {
                handle: handle.clone(),
                session,
                session_present: present,
                conn,
                ended_stored,
            });
        }
    }

    /// Ends the sessions of client ids that `owner` holds (its principal was deleted), or with
    /// `client_id` given, the session of that client id unless `owner` holds it (the id became
    /// a device's: only that device may use it from now on). A parked session ends at once;
    /// a connected client is evicted with 0x98 Administrative action, and its connection
    /// ends the session as it closes. Returns how many it ended.
    pub fn end_sessions(&self, owner: &Owner, client_id: Option<&str>) -> usize {
        let handles: Vec<Arc<ClientHandle>> = {
            let clients = self.clients.lock();
            match client_id {
                Some(id) => clients
                    .get(id.as_bytes())
                    .filter(|r| &r.1 != owner)
                    .map(|r| r.0.clone())
                    .into_iter()
                    .collect(),
                None => clients
                    .iter()
                    .filter(|r| &r.1 == owner)
                    .map(|r| r.0.clone())
                    .collect(),
            }
        };
        for handle in &handles {
            let state = match &*handle.state.lock() {
                SlotState::Online { conn } => Some((true, *conn)),
                SlotState::Offline { conn, .. } => Some((false, *conn)),
                SlotState::Fresh | SlotState::Gone => None,
            };
            match state {
                Some((true, conn)) => handle.evict(conn, ReasonCode::AdministrativeAction),
                Some((false, conn)) => self.expire_session(handle, conn),
                None => {}
            }
        }
        handles.len()
    }

    /// The principal `handle`'s session belongs to, in its stored form.
    fn owner_of(&self, handle: &ClientHandle) -> String {
        self.clients
            .lock()
            .get(handle.id.as_str().as_bytes())
            .map_or_else(String::new, |r| r.1.encode())
    }

    /// Kicks the connection that holds `handle` now, and waits (bounded) until it lets go.
    async fn take_over(&self, handle: &ClientHandle) {
        let conn = match &*handle.state.lock() {
            SlotState::Online { conn } => *conn,
            _ => return,
        };
        handle.kick_code.store(0, Ordering::Release);
        if handle.kicked.swap(conn, Ordering::AcqRel) != conn {
            handle.signal();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let changed = handle.changed.notified();
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
    /// Messages it had from shared subscriptions and not yet completed go to another member.
    pub fn detach(
        &self,
        handle: &Arc<ClientHandle>,
        conn: u64,
        session: Option<Session>,
        clean_session: bool,
    ) {
        let expiry = if clean_session { 0 } else { u32::MAX };
        self.detach_session(handle, conn, session, expiry, Bytes::new());
    }

    /// [`detach`](Self::detach) with the Session Expiry Interval in force at the end and, for a
    /// persisted session, the will still pending (encoded; empty for none).
    pub fn detach_session(
        &self,
        handle: &Arc<ClientHandle>,
        conn: u64,
        session: Option<Session>,
        expiry: u32,
        pending_will: Bytes,
    ) {
        let clean_session = expiry == 0;
        let mut state = handle.state.lock();
        if !matches!(*state, SlotState::Online { conn: c, .. } if c == conn) {
            return;
        }
        handle.online.store(false, Ordering::Release);
        let mut session = session;
        if let Some(s) = session.as_mut() {
            self.redistribute_shared(handle, s);
        }
        match session {
            Some(mut session) if !clean_session => {
                for o in session.inflight.iter_mut() {
                    o.message = o.message.compact();
                }
                for m in session.queued.iter_mut() {
                    *m = m.compact();
                }
                let mut ops = Vec::new();
                {
                    let mut mb = handle.mailbox.lock();
                    mb.online = false;
                    // The session's queue keeps QoS 1/2 only, at most max_queued of them.
                    let waiting = std::mem::take(&mut mb.queue);
                    mb.clear();
                    let mut dropped = 0u64;
                    for mut mail in waiting.into_iter().filter(|m| m.qos != QoS::AtMostOnce) {
                        if mb.qos12() < self.max_queued {
                            mail.message = Arc::new(mail.message.compact());
                            mb.push(mail);
                        } else {
                            dropped += 1;
                            if let Some(seq) = mail.seq {
                                ops.push(MqttOp::MessageDelete {
                                    client_id: handle.id.to_string(),
                                    seq,
                                });
                            }
                        }
                    }
                    self.metrics.mqtt_messages_dropped.inc_by(dropped);
                }
                if let Some(p) = self.persist.as_ref().filter(|_| handle.is_durable()) {
                    ops.push(MqttOp::SessionPut {
                        client_id: handle.id.to_string(),
                        expiry_secs: (expiry != u32::MAX).then_some(expiry),
                        last_seen_ms: persist::now_ms(),
                        will: pending_will,
                        owner: self.owner_of(handle),
                    });
                    p.write_all(ops);
                }
                *state = SlotState::Offline {
                    session: Box::new(session),
                    conn,
                };
                self.metrics.mqtt_sessions_offline.inc();
            }
            session => {
                let waiting = {
                    let mut mb = handle.mailbox.lock();
                    mb.gone = true;
                    let w = std::mem::take(&mut mb.queue);
                    mb.clear();
                    w
                };
                if let Some(session) = &session {
                    self.unsubscribe_all(handle, session);
                }
                self.forget_session(handle);
                for mail in waiting {
                    if let Some(g) = &mail.share {
                        if mail.qos != QoS::AtMostOnce {
                            self.deliver_shared(g, &mail.message, Some(handle));
                        }
                    }
                }
                *state = SlotState::Gone;
                self.unregister(handle);
            }
        }
        drop(state);
        handle.changed.notify_waiters();
    }

    /// Ends the parked session of `handle` if it is still the one attachment `conn` parked
    /// (its Session Expiry Interval passed and the client did not come back).
    pub fn expire_session(&self, handle: &Arc<ClientHandle>, conn: u64) {
        let mut state = handle.state.lock();
        if !matches!(*state, SlotState::Offline { conn: c, .. } if c == conn) {
            return;
        }
        let SlotState::Offline { session, .. } = std::mem::replace(&mut *state, SlotState::Gone)
        else {
            return;
        };
        self.metrics.mqtt_sessions_offline.dec();
        self.unsubscribe_all(handle, &session);
        self.forget_session(handle);
        {
            let mut mb = handle.mailbox.lock();
            mb.gone = true;
            mb.clear();
        }
        self.unregister(handle);
        drop(state);
        tracing::debug!(client_id = %handle.id, "session expired");
        handle.changed.notify_waiters();
    }

    /// Deletes a persisted session from the store (it ended).
    fn forget_session(&self, handle: &ClientHandle) {
        if handle.durable.swap(false, Ordering::AcqRel) {
            if let Some(p) = &self.persist {
                p.write(MqttOp::SessionDelete {
                    client_id: handle.id.to_string(),
                });
            }
        }
    }

    /// Records a persisted session's own fields: its expiry, when it was last seen (0 while
    /// connected, see [`persist`]) and its will (encoded; empty for none). Returns whether it
    /// was written (the session is persisted).
    pub fn store_session(
        &self,
        handle: &ClientHandle,
        expiry: u32,
        last_seen_ms: u64,
        will: Bytes,
    ) -> bool {
        handle.record(self.persist.as_ref(), || MqttOp::SessionPut {
            client_id: handle.id.to_string(),
            expiry_secs: (expiry != u32::MAX).then_some(expiry),
            last_seen_ms,
            will,
            owner: self.owner_of(handle),
        })
    }

    /// Records an inbound QoS 2 packet id of a persisted session (until PUBREL).
    pub fn store_inbound_qos2(&self, handle: &ClientHandle, packet_id: u16) -> bool {
        handle.record(self.persist.as_ref(), || MqttOp::InboundQos2Put {
            client_id: handle.id.to_string(),
            packet_id,
        })
    }

    /// Records what a persisted session's connection reported about its messages.
    pub fn store_session_change(&self, handle: &ClientHandle, change: SessionChange) {
        let client_id = || handle.id.to_string();
        handle.record(self.persist.as_ref(), || match change {
            SessionChange::Sent { seq, packet_id } => MqttOp::MessageState {
                client_id: client_id(),
                seq,
                packet_id,
                state: 0,
            },
            SessionChange::Received { seq, packet_id } => MqttOp::MessageState {
                client_id: client_id(),
                seq,
                packet_id,
                state: 1,
            },
            SessionChange::Finished { seq } => MqttOp::MessageDelete {
                client_id: client_id(),
                seq,
            },
            SessionChange::InboundReleased { packet_id } => MqttOp::InboundQos2Delete {
                client_id: client_id(),
                packet_id,
            },
        });
    }

    /// Hands the unacknowledged QoS 1/2 messages a leaving member got through shared
    /// subscriptions to another member of the group (MQTT 5.0 §4.8.2); those no other member
    /// can take stay in the session.
    fn redistribute_shared(&self, handle: &Arc<ClientHandle>, session: &mut Session) {
        if session.inflight.iter().all(|o| o.message.share.is_none())
            && session.queued.iter().all(|m| m.share.is_none())
        {
            return;
        }
        let groups = self.groups.lock().clone();
        let reroute = |m: &Message| -> bool {
            let Some(g) = m.share.as_ref().and_then(|k| groups.get(k.as_str())) else {
                return false;
            };
            let mut copy = m.clone();
            copy.share = None;
            copy.subscription_ids.clear();
            copy.store_seq = None;
            let moved = self.deliver_shared(g, &Arc::new(copy), Some(handle));
            if let Some(seq) = m.store_seq.filter(|_| moved) {
                handle.record(self.persist.as_ref(), || MqttOp::MessageDelete {
                    client_id: handle.id.to_string(),
                    seq,
                });
            }
            moved
        };
        session
            .inflight
            .retain(|o| o.state == OutboundState::AwaitingPubComp || !reroute(&o.message));
        session.queued.retain(|m| !reroute(m));
    }

    fn unsubscribe_all(&self, handle: &Arc<ClientHandle>, session: &Session) {
        for filter in session.subscriptions.keys() {
            self.remove_subscription(handle, filter);
        }
    }

    /// Adds or replaces a subscription (the filter must be valid; a shared one
    /// `$share/{group}/{filter}` must have passed [`stratus_mqtt::topic::split_shared`]).
    /// Returns whether it existed already (for Retain Handling 1).
    pub fn subscribe(
        &self,
        handle: &Arc<ClientHandle>,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
    ) -> bool {
        handle.record(self.persist.as_ref(), || MqttOp::SubscriptionPut {
            client_id: handle.id.to_string(),
            subscription: StoredSubscription {
                filter: filter.to_string(),
                options: stratus_mqtt::persist::encode_subscription_options(options),
                subscription_id: id.map(NonZeroU32::get),
            },
        });
        self.add_subscription(handle, filter, options, id)
    }

    fn add_subscription(
        &self,
        handle: &Arc<ClientHandle>,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
    ) -> bool {
        if let Some(Ok((_, inner))) = stratus_mqtt::topic::split_shared(filter) {
            let Ok(key) = MqttStr::try_from(filter) else {
                return false;
            };
            let mut groups = self.groups.lock();
            let group = groups
                .entry(filter.to_string())
                .or_insert_with(|| {
                    let g = Arc::new(SharedGroup {
                        key,
                        filter: inner.to_string(),
                        members: Mutex::new(Vec::new()),
                        next: AtomicU64::new(0),
                    });
                    let mut tree = self.tree.write();
                    tree.insert(inner, Subscriber::Group(g.clone()), QoS::ExactlyOnce);
                    self.metrics.mqtt_subscriptions.set(tree.len() as i64);
                    g
                })
                .clone();
            drop(groups);
            let mut members = group.members.lock();
            let existed = match members.iter_mut().find(|m| Arc::ptr_eq(&m.0, handle)) {
                Some(m) => {
                    m.1 = options.qos;
                    m.2 = id;
                    true
                }
                None => {
                    members.push((handle.clone(), options.qos, id));
                    false
                }
            };
            return existed;
        }
        let opts = SubOptions {
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            id,
        };
        let mut tree = self.tree.write();
        let existed = tree.insert(
            filter,
            Subscriber::Client(handle.clone(), opts),
            options.qos,
        );
        self.metrics.mqtt_subscriptions.set(tree.len() as i64);
        existed
    }

    /// An in-process subscriber to `filter` (at QoS 0, with access to every topic) that is not
    /// in the client registry: no MQTT client id can take it over, nothing of it is persisted,
    /// and it is not counted as a client. Read it with [`ClientHandle::take_messages`];
    /// remove it with [`Broker::unsubscribe`]. `None` when `name` is not a valid MQTT string.
    pub fn internal_subscriber(&self, name: &str, filter: &str) -> Option<Arc<ClientHandle>> {
        let handle = Arc::new(ClientHandle::new(
            MqttStr::try_from(name).ok()?,
            self.wakes.clone(),
        ));
        handle.access.store(Access::Full as u8, Ordering::Relaxed);
        handle.online.store(true, Ordering::Release);
        handle.mailbox.lock().online = true;
        self.add_subscription(
            &handle,
            filter,
            SubscriptionOptions::new(QoS::AtMostOnce),
            None,
        );
        Some(handle)
    }

    /// Removes a subscription if present.
    pub fn unsubscribe(&self, handle: &Arc<ClientHandle>, filter: &str) {
        handle.record(self.persist.as_ref(), || MqttOp::SubscriptionDelete {
            client_id: handle.id.to_string(),
            filter: filter.to_string(),
        });
        self.remove_subscription(handle, filter);
    }

    /// Drops the queued messages of a resumed session (in `session` and in `handle`'s
    /// mailbox) that `may_receive` refuses — the session checked against its principal's
    /// current policy; persisted ones leave the store too. Returns how many it dropped.
    pub fn purge_unreadable(
        &self,
        handle: &ClientHandle,
        session: &mut Session,
        may_receive: impl Fn(&str) -> bool,
    ) -> usize {
        let mut dropped: Vec<Option<u64>> = Vec::new();
        session.queued.retain(|m| {
            let keep = may_receive(&m.topic);
            if !keep {
                dropped.push(m.store_seq);
            }
            keep
        });
        {
            let mut mb = handle.mailbox.lock();
            let mut kept = VecDeque::with_capacity(mb.queue.len());
            while let Some(mail) = mb.pop() {
                if may_receive(&mail.message.topic) {
                    kept.push_back(mail);
                } else {
                    dropped.push(mail.seq);
                }
            }
            for mail in kept {
                mb.push(mail);
            }
        }
        if let Some(p) = self.persist.as_ref().filter(|_| handle.is_durable()) {
            let ops: Vec<MqttOp> = dropped
                .iter()
                .flatten()
                .map(|&seq| MqttOp::MessageDelete {
                    client_id: handle.id.to_string(),
                    seq,
                })
                .collect();
            if !ops.is_empty() {
                p.write_all(ops);
            }
        }
        dropped.len()
    }

    fn remove_subscription(&self, handle: &Arc<ClientHandle>, filter: &str) {
        if let Some(shared) = stratus_mqtt::topic::split_shared(filter) {
            if shared.is_err() {
                return;
            }
            let mut groups = self.groups.lock();
            let Some(group) = groups.get(filter).cloned() else {
                return;
            };
            let mut members = group.members.lock();
            members.retain(|m| !Arc::ptr_eq(&m.0, handle));
            if members.is_empty() {
                groups.remove(filter);
                let mut tree = self.tree.write();
                tree.remove(&group.filter, &Subscriber::Group(group.clone()));
                self.metrics.mqtt_subscriptions.set(tree.len() as i64);
            }
            return;
        }
        let mut tree = self.tree.write();
        tree.remove(
            filter,
            &Subscriber::Client(handle.clone(), SubOptions::default()),
        );
        self.metrics.mqtt_subscriptions.set(tree.len() as i64);
    }

    /// Retained messages matching `filter`, for a new subscription; expired ones are removed.
    pub fn retained_for(&self, filter: &str) -> Vec<Message> {
        let mut out = Vec::new();
        let mut expired = Vec::new();
        let now = Instant::now();
        self.retained.read().store.for_each_match(filter, |m| {
            if m.is_expired(now) {
                expired.push(m.topic.clone());
            } else {
                out.push(m.clone())
            }
        });
        if !expired.is_empty() {
            let mut retained = self.retained.write();
            for t in expired {
                if retained.store.get(&t).is_some_and(|m| m.is_expired(now)) {
                    retained.remove(&t);
                    if let Some(p) = &self.persist {
                        p.write(MqttOp::RetainDelete {
                            topic: t.to_string(),
                        });
                    }
                }
            }
            self.metrics
                .mqtt_retained_messages
                .set(retained.store.len() as i64);
        }
        out
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.read().store.len()
    }

    /// Number of subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.tree.read().len()
    }

    /// Delivers `message` to one member of a shared subscription group: the next online one
    /// in round-robin order (not `except`), else any other member. Returns whether one took it.
    fn deliver_shared(
        &self,
        group: &Arc<SharedGroup>,
        message: &Arc<Message>,
        except: Option<&Arc<ClientHandle>>,
    ) -> bool {
        self.deliver_shared_routed(group, message, except, &mut Routed::default())
    }

    fn deliver_shared_routed(
        &self,
        group: &Arc<SharedGroup>,
        message: &Arc<Message>,
        except: Option<&Arc<ClientHandle>>,
        routed: &mut Routed,
    ) -> bool {
        let members = group.members.lock();
        let n = members.len();
        if n == 0 {
            return false;
        }
        let start = group.next.fetch_add(1, Ordering::Relaxed) as usize;
        let eligible = |h: &Arc<ClientHandle>| except.is_none_or(|e| !Arc::ptr_eq(e, h));
        let pick = (0..n)
            .map(|i| &members[(start + i) % n])
            .find(|m| eligible(&m.0) && m.0.online.load(Ordering::Acquire))
            .or_else(|| {
                (0..n)
                    .map(|i| &members[(start + i) % n])
                    .find(|m| eligible(&m.0))
            });
        let Some((h, granted, id)) = pick else {
            return false;
        };
        let qos = (*granted).min(message.qos);
        let sub_ids: SubIds = id.iter().copied().collect();
        match h.deliver(
            message,
            qos,
            false,
            sub_ids,
            Some(group),
            self.hub(),
            &mut routed.stored,
        ) {
            Accepted::Yes => {
                routed.delivered += 1;
                true
            }
            Accepted::Congested => {
                routed.delivered += 1;
                routed.congested.push(h.clone());
                true
            }
            Accepted::No => false,
        }
    }

    /// Routes a message from `origin` (the publishing client, for No Local): stores or clears
    /// it as retained when asked, then hands it to every matching subscriber once, at the
    /// highest QoS among its matching subscriptions capped by the message's QoS, with RETAIN
    /// cleared (MQTT-3.3.1-9) unless a subscription asked for Retain As Published, and with
    /// the Subscription Identifiers of the matching subscriptions; to one member of each
    /// matching shared subscription group.
    pub fn publish(&self, message: Message, origin: Option<&Arc<ClientHandle>>) -> Routed {
        self.publish_with(message, origin, None)
    }

    /// [`publish`](Self::publish) for one of a batch of messages (the PUBLISHes of one read):
    /// the subscribers whose mailboxes it made non-empty are added to `later` instead of being
    /// signalled; signal them ([`ClientHandle::signal`]) once the batch is routed. A subscriber
    /// then wakes once per batch and drains it in one write, instead of racing the publisher
    /// message by message.
    pub fn publish_deferred(
        &self,
        message: Message,
        origin: Option<&Arc<ClientHandle>>,
        later: &Deferred,
    ) -> Routed {
        self.publish_with(message, origin, Some(later))
    }

    fn publish_with(
        &self,
        message: Message,
        origin: Option<&Arc<ClientHandle>>,
        defer: Option<&Deferred>,
    ) -> Routed {
        let mut routed = Routed::default();
        if message.retain {
            let mut retained = self.retained.write();
            let by = origin.map(|h| h.id.as_str());
            if retained
                .set(message.clone(), by, &self.retain_quota)
                .is_err()
            {
                drop(retained);
                self.metrics.limit_hit("mqtt_retained", 1);
                routed.refused = true;
                return routed;
            }
            if let Some(p) = &self.persist {
                // Under the lock, so the store sees a topic's retained messages in order.
                p.write(if message.payload.is_empty() {
                    MqttOp::RetainDelete {
                        topic: message.topic.to_string(),
                    }
                } else {
                    MqttOp::RetainSet(persist::stored_retained(&message, by))
                });
                routed.stored = true;
            }
            self.metrics
                .mqtt_retained_messages
                .set(retained.store.len() as i64);
        }
        let was_retained = message.retain;
        let message = Arc::new(message);
        let origin = origin.map(Arc::as_ptr);
        let tree = self.tree.read();
        let hub = Hub {
            defer,
            ..self.hub()
        };
        let deliver = |h: &Arc<ClientHandle>,
                       qos: QoS,
                       retain: bool,
                       sub_ids: SubIds,
                       routed: &mut Routed| {
            match h.deliver(
                &message,
                qos,
                retain,
                sub_ids,
                None,
                hub,
                &mut routed.stored,
            ) {
                Accepted::Yes => routed.delivered += 1,
                Accepted::Congested => {
                    routed.delivered += 1;
                    routed.congested.push(h.clone());
                }
                Accepted::No => {}
            }
        };
        // Within one filter's list a client appears once; only several lists can repeat a
        // client (overlapping subscriptions), and only then is de-duplication needed.
        let mut lists: SmallVec<[&[(Subscriber, QoS)]; 4]> = SmallVec::new();
        tree.for_each_matching_list(&message.topic, |list| lists.push(list));
        let is_origin = |h: &Arc<ClientHandle>| origin == Some(Arc::as_ptr(h));
        if let [list] = lists[..] {
            for (s, granted) in list {
                match s {
                    Subscriber::Client(h, o) => {
                        if o.no_local && is_origin(h) {
                            continue;
                        }
                        let retain = o.retain_as_published && was_retained;
                        let ids: SubIds = o.id.iter().copied().collect();
                        deliver(h, (*granted).min(message.qos), retain, ids, &mut routed);
                    }
                    Subscriber::Group(g) => {
                        self.deliver_shared_routed(g, &message, None, &mut routed);
                    }
                }
            }
        } else if lists.len() > 1 {
            let mut targets: Vec<(&Arc<ClientHandle>, QoS, bool, SubIds)> = Vec::new();
            for list in &lists {
                for (s, granted) in list.iter() {
                    match s {
                        Subscriber::Client(h, o) => {
                            if o.no_local && is_origin(h) {
                                continue;
                            }
                            let ids: SubIds = o.id.iter().copied().collect();
                            targets.push((h, *granted, o.retain_as_published && was_retained, ids));
                        }
                        Subscriber::Group(g) => {
                            self.deliver_shared_routed(g, &message, None, &mut routed);
                        }
                    }
                }
            }
            targets.sort_unstable_by_key(|t| Arc::as_ptr(t.0));
            targets.dedup_by(|later, kept| {
                if Arc::ptr_eq(later.0, kept.0) {
                    kept.1 = kept.1.max(later.1);
                    kept.2 |= later.2;
                    kept.3.extend(later.3.drain(..));
                    true
                } else {
                    false
                }
            });
            for (h, granted, retain, ids) in targets {
                deliver(h, granted.min(message.qos), retain, ids, &mut routed);
            }
        }
        routed
    }

    /// The bound on each client's queue.
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Rebuilds the retained messages and the parked persistent sessions a store held at
    /// start. Sessions whose expiry passed while the server was down end here (their wills are
    /// returned due now); the others come back offline, waiting for their clients.
    ///
    /// `resolve` tells, for a stored session's client id and recorded owner, who owns it
    /// (a session stored before owners were recorded may be claimed by the device whose id
    /// it has) and what it may receive while it waits.
    pub fn restore(
        &self,
        snapshot: MqttSnapshot,
        resolve: impl Fn(&str, Owner) -> (Owner, Access),
    ) -> Vec<Restored> {
        let Some(p) = &self.persist else {
            return Vec::new();
        };
        let now = Instant::now();
        let now_ms = persist::now_ms();
        {
            let mut retained = self.retained.write();
            for r in snapshot.retained {
                let loaded = persist::load_message(
                    &r.topic,
                    r.payload,
                    r.qos,
                    true,
                    r.properties,
                    r.expires_at_ms,
                );
                match loaded {
                    Some((m, _)) if !m.is_expired(now) => {
                        // What it was set under stays counted (no quota: it was accepted).
                        let origin = Some(r.origin.as_str()).filter(|o| !o.is_empty());
                        let _ = retained.set(m, origin, &RetainQuota::default());
                    }
                    Some(_) => p.write(MqttOp::RetainDelete { topic: r.topic }),
                    None => {
                        tracing::warn!(topic = %r.topic, "unreadable stored retained message skipped")
                    }
                }
            }
            self.metrics
                .mqtt_retained_messages
                .set(retained.store.len() as i64);
        }
        let mut restored = Vec::new();
        for stored in snapshot.sessions {
            let Ok(id) = MqttStr::try_from(stored.client_id.as_str()) else {
                p.write(MqttOp::SessionDelete {
                    client_id: stored.client_id,
                });
                continue;
            };
            let will = if stored.will.is_empty() {
                None
            } else {
                match stratus_mqtt::persist::decode_will(stored.will.clone()) {
                    Ok(w) => {
                        let delay = w.properties.will_delay_interval.unwrap_or(0);
                        Some((Message::from_will(w, now), u64::from(delay)))
                    }
                    Err(e) => {
                        tracing::warn!(client_id = %id, error = %e, "unreadable stored will skipped");
                        None
                    }
                }
            };
            // Seconds left before the session expires (None: never).
            let expires_in = stored.expiry_secs.map(|secs| {
                let since = match stored.last_seen_ms {
                    0 => 0,
                    seen => now_ms.saturating_sub(seen),
                };
                (u64::from(secs) * 1000).saturating_sub(since)
            });
            if expires_in == Some(0) {
                p.write(MqttOp::SessionDelete {
                    client_id: stored.client_id,
                });
                if let Some((w, _)) = will {
                    restored.push(Restored {
                        handle: Arc::new(ClientHandle::new(id, self.wakes.clone())),
                        conn: 0,
                        expires_in: Some(Duration::ZERO),
                        will: Some((w, Duration::ZERO)),
                    });
                }
                continue;
            }
            let handle = Arc::new(ClientHandle::new(id.clone(), self.wakes.clone()));
            handle.durable.store(true, Ordering::Release);
            let (owner, access) = resolve(&stored.client_id, Owner::decode(&stored.owner));
            handle.set_access(access, &owner);
            let mut session = Session::new();
            for sub in &stored.subscriptions {
                let options = stratus_mqtt::persist::decode_subscription_options(sub.options);
                let (Some(options), Ok(filter)) = (options, MqttStr::try_from(sub.filter.as_str()))
                else {
                    tracing::warn!(client_id = %id, filter = %sub.filter, "unreadable stored subscription skipped");
                    continue;
                };
                let sub_id = sub.subscription_id.and_then(NonZeroU32::new);
                self.add_subscription(&handle, &filter, options, sub_id);
                session.subscriptions.insert(filter, options.qos);
            }
            {
                let mut mb = handle.mailbox.lock();
                for m in stored.messages {
                    let Some((mut message, sub_ids)) = persist::load_message(
                        &m.topic,
                        m.payload,
                        m.qos,
                        m.retain,
                        m.properties,
                        m.expires_at_ms,
                    ) else {
                        tracing::warn!(client_id = %id, seq = m.seq, "unreadable stored message skipped");
                        continue;
                    };
                    match m.packet_id {
                        Some(packet_id) => {
                            message.store_seq = Some(m.seq);
                            message.subscription_ids = sub_ids;
                            let state = match (message.qos, m.state) {
                                (QoS::ExactlyOnce, 1) => OutboundState::AwaitingPubComp,
                                (QoS::ExactlyOnce, _) => OutboundState::AwaitingPubRec,
                                _ => OutboundState::AwaitingPubAck,
                            };
                            session.inflight.push_back(Outbound {
                                packet_id,
                                message,
                                state,
                            });
                        }
                        None => {
                            let qos = message.qos;
                            let retain = message.retain;
                            mb.push(Mail {
                                message: Arc::new(message),
                                qos,
                                retain,
                                sub_ids: sub_ids.into_iter().collect(),
                                share: None,
                                seq: Some(m.seq),
                            });
                        }
                    }
                }
            }
            session.inbound_qos2.extend(stored.inbound_qos2);
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            handle.current_conn.store(conn, Ordering::Release);
            *handle.state.lock() = SlotState::Offline {
                session: Box::new(session),
                conn,
            };
            self.metrics.mqtt_sessions_offline.inc();
            self.clients
                .lock()
                .insert(Registered(handle.clone(), owner));
            let expires_in = expires_in.map(Duration::from_millis);
            let will = will.map(|(w, delay)| {
                let delay = Duration::from_secs(delay);
                (w, expires_in.map_or(delay, |e| delay.min(e)))
            });
            restored.push(Restored {
                handle,
                conn,
                expires_in,
                will,
            });
        }
        restored
    }

    /// Ends `handle`'s parked session after `after` unless its client came back (Session
    /// Expiry Interval).
    pub fn schedule_expiry(
        self: &Arc<Self>,
        handle: Arc<ClientHandle>,
        conn: u64,
        after: Duration,
    ) {
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            broker.expire_session(&handle, conn);
        });
    }

    /// Publishes `will` after `delay` unless the client reconnected since attachment `conn`
    /// (Will Delay Interval, MQTT 5.0 §3.1.3.2.2).
    pub fn schedule_will(
        self: &Arc<Self>,
        handle: Arc<ClientHandle>,
        conn: u64,
        will: Message,
        delay: Duration,
    ) {
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if handle.current_conn() == conn {
                tracing::debug!(topic = %will.topic, "publishing delayed will");
                broker.publish(will, Some(&handle));
            }
        });
    }
}

/// A persisted session brought back at start ([`Broker::restore`]): the server schedules its
/// expiry and its will.
pub struct Restored {
    /// The client's handle.
    pub handle: Arc<ClientHandle>,
    /// The attachment number that parked it.
    pub conn: u64,
    /// When the session expires from now; `None`: never.
    pub expires_in: Option<Duration>,
    /// A will that was pending when the server stopped, and when to publish it.
    pub will: Option<(Message, Duration)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn s(v: &str) -> MqttStr {
        MqttStr::try_from(v).unwrap()
    }

    fn msg(topic: &str, qos: QoS, retain: bool) -> Message {
        Message::new(s(topic), Bytes::from_static(b"p"), qos, retain)
    }

    fn drain(h: &ClientHandle) -> Vec<(Arc<Message>, QoS)> {
        let mut mb = h.mailbox.lock();
        std::iter::from_fn(|| mb.pop().map(|m| (m.message, m.qos))).collect()
    }

    fn broker(max_queued: usize) -> Broker {
        Broker::new(max_queued, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn publish_reaches_each_subscriber_once_at_the_highest_matching_qos() {
        let b = broker(100);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(
            &a.handle,
            "t/+",
            SubscriptionOptions::new(QoS::AtMostOnce),
            None,
        );
        b.subscribe(
            &a.handle,
            "t/#",
            SubscriptionOptions::new(QoS::AtLeastOnce),
            None,
        );
        b.subscribe(
            &a.handle,
            "other",
            SubscriptionOptions::new(QoS::ExactlyOnce),
            None,
        );
        assert_eq!(
            b.publish(msg("t/x", QoS::ExactlyOnce, false), None)
                .delivered,
            1
        );
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
        assert_eq!(
            b.publish(msg("t/x", QoS::AtMostOnce, false), None)
                .delivered,
            1
        );
        assert_eq!(drain(&a.handle)[0].1, QoS::AtMostOnce);
    }

    #[tokio::test]
    async fn internal_subscribers_take_messages_without_a_connection() {
        let b = broker(100);
        let h = b.internal_subscriber("$test", "d/+/c").unwrap();
        assert!(b.clients.lock().is_empty(), "not a registered client");
        b.publish(msg("d/1/c", QoS::AtLeastOnce, true), None);
        b.publish(msg("d/2/c", QoS::AtMostOnce, false), None);
        b.publish(msg("other", QoS::AtMostOnce, false), None);
        let got = h.take_messages(1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].topic.as_str(), "d/1/c");
        let rest = h.take_messages(10);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].topic.as_str(), "d/2/c");
        assert!(h.take_messages(10).is_empty());
        b.unsubscribe(&h, "d/+/c");
        b.publish(msg("d/3/c", QoS::AtMostOnce, false), None);
        assert!(h.take_messages(10).is_empty());
    }

    #[tokio::test]
    async fn retained_messages_are_stored_and_cleared() {
        let b = broker(100);
        b.publish(msg("r/1", QoS::AtLeastOnce, true), None);
        b.publish(msg("r/2", QoS::AtMostOnce, true), None);
        assert_eq!(b.retained_for("r/#").len(), 2);
        b.publish(
            Message {
                payload: Bytes::new(),
                ..msg("r/1", QoS::AtMostOnce, true)
            },
            None,
        );
        let left = b.retained_for("r/+");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].topic.as_str(), "r/2");
        assert!(left[0].retain);
    }

    #[tokio::test]
    async fn offline_persistent_sessions_queue_qos1_and_2_but_not_qos0() {
        let b = broker(100);
        let a = b.attach(s("p"), false, false).await;
        b.subscribe(
            &a.handle,
            "t",
            SubscriptionOptions::new(QoS::ExactlyOnce),
            None,
        );
        let mut session = Session::new();
        session.subscriptions.insert(s("t"), QoS::ExactlyOnce);
        b.detach(&a.handle, a.conn, Some(session), false);
        assert_eq!(b.metrics.mqtt_sessions_offline.get(), 1);
        assert_eq!(
            b.publish(msg("t", QoS::AtMostOnce, false), None).delivered,
            0
        );
        assert_eq!(
            b.publish(msg("t", QoS::AtLeastOnce, false), None).delivered,
            1
        );
        assert_eq!(
            b.publish(msg("t", QoS::ExactlyOnce, false), None).delivered,
            1
        );
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
        b.subscribe(
            &a.handle,
            "t",
            SubscriptionOptions::new(QoS::AtLeastOnce),
            None,
        );
        let mut session = Session::new();
        session.subscriptions.insert(s("t"), QoS::AtLeastOnce);
        b.detach(&a.handle, a.conn, Some(session), false);
        b.publish(msg("t", QoS::AtLeastOnce, false), None);
        let clean = b.attach(s("p"), true, false).await;
        assert!(!clean.session_present);
        assert!(clean.session.subscriptions.is_empty());
        assert!(
            drain(&clean.handle).is_empty(),
            "queued messages of the old session are gone"
        );
        assert_eq!(b.subscription_count(), 0);
        assert_eq!(
            b.publish(msg("t", QoS::AtLeastOnce, false), None).delivered,
            0
        );
    }

    #[tokio::test]
    async fn ending_a_clean_session_removes_its_subscriptions_and_handle() {
        let b = broker(100);
        let a = b.attach(s("c"), true, false).await;
        b.subscribe(
            &a.handle,
            "t",
            SubscriptionOptions::new(QoS::AtLeastOnce),
            None,
        );
        let mut session = Session::new();
        session.subscriptions.insert(s("t"), QoS::AtLeastOnce);
        b.detach(&a.handle, a.conn, Some(session), true);
        assert_eq!(b.subscription_count(), 0);
        assert!(b.clients.lock().is_empty());
        assert_eq!(
            b.publish(msg("t", QoS::AtLeastOnce, false), None).delivered,
            0
        );
    }

    #[tokio::test]
    async fn a_mail_signal_is_kept_until_taken_and_wakes_a_waiting_task() {
        let signal = Arc::new(MailSignal::default());
        // Nobody waits: the signal is kept, once.
        signal.notify();
        signal.notify();
        tokio::time::timeout(Duration::from_secs(1), signal.notified())
            .await
            .unwrap();
        assert!(!signal.take(), "two signals before a wait are one");
        // A task that waits is woken by a signal that comes later.
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.notified().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        signal.notify();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(!signal.take(), "the waiter took the signal");
    }

    #[tokio::test]
    async fn takeover_kicks_the_old_connection_and_inherits_its_session() {
        let b = Arc::new(broker(100));
        let first = b.attach(s("dup"), false, false).await;
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.attach(s("dup"), false, false).await });
        // The first connection is told, and hands back its session.
        tokio::time::timeout(Duration::from_secs(2), first.handle.notify.notified())
            .await
            .unwrap();
        assert!(first.handle.taken_over(first.conn));
        let mut session = Session::new();
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
        b.subscribe(
            &anon.handle,
            "#",
            SubscriptionOptions::new(QoS::AtMostOnce),
            None,
        );
        assert_eq!(
            b.publish(msg("devices/d1/telemetry", QoS::AtMostOnce, false), None)
                .delivered,
            0
        );
        assert_eq!(
            b.publish(msg("public/x", QoS::AtMostOnce, false), None)
                .delivered,
            1
        );
    }

    #[tokio::test]
    async fn online_qos0_backlog_congests_and_is_dropped_only_at_the_hard_cap() {
        let b = broker(2);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(
            &a.handle,
            "t",
            SubscriptionOptions::new(QoS::AtMostOnce),
            None,
        );
        let congested: Vec<usize> = (0..3)
            .map(|_| {
                b.publish(msg("t", QoS::AtMostOnce, false), None)
                    .congested
                    .len()
            })
            .collect();
        assert_eq!(congested, vec![0, 0, 1]);
        for _ in 0..(2 * HARD_BACKLOG_FACTOR) {
            b.publish(msg("t", QoS::AtMostOnce, false), None);
        }
        assert_eq!(drain(&a.handle).len(), 2 * HARD_BACKLOG_FACTOR);
        assert_eq!(b.metrics.mqtt_messages_dropped.get(), 3);
    }

    #[tokio::test]
    async fn online_qos1_backlog_congests_publishers_instead_of_dropping() {
        let b = broker(2);
        let a = b.attach(s("a"), true, false).await;
        b.subscribe(
            &a.handle,
            "t",
            SubscriptionOptions::new(QoS::AtLeastOnce),
            None,
        );
        let congested: Vec<usize> = (0..4)
            .map(|_| {
                b.publish(msg("t", QoS::AtLeastOnce, false), None)
                    .congested
                    .len()
            })
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
        conn.accept(Session::new(), false);
        assert!(!a.handle.drain_into(&mut conn, 2).1);
        assert!(
            waiter.await.unwrap(),
            "released by the drain, not by the deadline"
        );
        // ...and a subscriber that never catches up is marked as a slow consumer.
        for _ in 0..3 {
            b.publish(msg("t", QoS::AtLeastOnce, false), None);
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
        b.subscribe(
            &a.handle,
            "t",
            SubscriptionOptions::new(QoS::AtLeastOnce),
            None,
        );
        b.detach(&a.handle, a.conn, Some(Session::new()), false);
        let delivered: Vec<usize> = (0..3)
            .map(|_| b.publish(msg("t", QoS::AtLeastOnce, false), None).delivered)
            .collect();
        assert_eq!(delivered, vec![1, 1, 0]);
        assert_eq!(b.metrics.mqtt_messages_dropped.get(), 1);
    }

    fn opts(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions::new(qos)
    }

    fn drain_mail(h: &ClientHandle) -> Vec<Mail> {
        let mut mb = h.mailbox.lock();
        std::iter::from_fn(|| mb.pop()).collect()
    }

    #[tokio::test]
    async fn no_local_retain_as_published_and_subscription_ids() {
        let b = broker(100);
        let a = b.attach(s("a"), true, false).await;
        let nl = SubscriptionOptions {
            no_local: true,
            ..opts(QoS::AtLeastOnce)
        };
        b.subscribe(&a.handle, "t/#", nl, NonZeroU32::new(7));
        b.subscribe(&a.handle, "t/+", opts(QoS::AtMostOnce), NonZeroU32::new(9));
        // From itself: only the subscription without No Local matches.
        b.publish(msg("t/x", QoS::AtLeastOnce, false), Some(&a.handle));
        let got = drain_mail(&a.handle);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].qos, QoS::AtMostOnce);
        assert_eq!(&got[0].sub_ids[..], &[NonZeroU32::new(9).unwrap()]);
        // From someone else: one delivery with both identifiers.
        b.publish(msg("t/x", QoS::AtLeastOnce, true), None);
        let got = drain_mail(&a.handle);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
        assert_eq!(got[0].sub_ids.len(), 2);
        assert!(!got[0].retain, "RETAIN cleared without Retain As Published");
        let rap = SubscriptionOptions {
            retain_as_published: true,
            ..opts(QoS::AtMostOnce)
        };
        assert!(
            b.subscribe(&a.handle, "t/+", rap, None),
            "replaces the subscription"
        );
        b.publish(msg("t/y", QoS::AtMostOnce, true), None);
        assert!(
            drain_mail(&a.handle)[0].retain,
            "Retain As Published keeps RETAIN"
        );
    }

    #[tokio::test]
    async fn shared_subscriptions_round_robin_and_redeliver_when_a_member_leaves() {
        let b = broker(100);
        let a = b.attach(s("a"), true, false).await;
        let c = b.attach(s("c"), true, false).await;
        b.subscribe(&a.handle, "$share/g/s/#", opts(QoS::AtLeastOnce), None);
        b.subscribe(&c.handle, "$share/g/s/#", opts(QoS::AtLeastOnce), None);
        assert_eq!(b.subscription_count(), 1, "one group entry in the tree");
        for _ in 0..4 {
            assert_eq!(
                b.publish(msg("s/1", QoS::AtLeastOnce, false), None)
                    .delivered,
                1
            );
        }
        assert_eq!(drain_mail(&a.handle).len(), 2);
        let to_c = drain_mail(&c.handle);
        assert_eq!(to_c.len(), 2);
        // c leaves with one message in flight: it goes to a.
        let mut session = Session::new();
        session
            .subscriptions
            .insert(s("$share/g/s/#"), QoS::AtLeastOnce);
        let mut m = (*to_c[0].message).clone();
        m.share = Some(s("$share/g/s/#"));
        m.qos = QoS::AtLeastOnce;
        session.inflight.push_back(stratus_mqtt::session::Outbound {
            packet_id: 1,
            message: m,
            state: OutboundState::AwaitingPubAck,
        });
        b.detach(&c.handle, c.conn, Some(session), true);
        assert_eq!(
            drain_mail(&a.handle).len(),
            1,
            "redelivered to the other member"
        );
        b.unsubscribe(&a.handle, "$share/g/s/#");
        assert_eq!(b.subscription_count(), 0);
    }

    #[tokio::test]
    async fn expired_parked_sessions_end() {
        let b = broker(100);
        let a = b.attach(s("e"), false, false).await;
        b.subscribe(&a.handle, "t", opts(QoS::AtLeastOnce), None);
        let mut session = Session::new();
        session.subscriptions.insert(s("t"), QoS::AtLeastOnce);
        b.detach(&a.handle, a.conn, Some(session), false);
        b.expire_session(&a.handle, a.conn);
        assert_eq!(b.subscription_count(), 0);
        assert!(b.clients.lock().is_empty());
        assert!(!b.attach(s("e"), false, false).await.session_present);
    }

    #[tokio::test]
    async fn expired_retained_messages_are_not_sent() {
        let b = broker(100);
        let mut m = msg("r", QoS::AtMostOnce, true);
        m.expires_at = Some(Instant::now());
        b.publish(m, None);
        assert!(b.retained_for("r").is_empty());
        assert_eq!(b.retained_count(), 0);
    }

    #[tokio::test]
    async fn persisted_sessions_and_retained_messages_come_back_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (p, snapshot) = Persistence::open(dir.path()).unwrap();
            assert!(snapshot.sessions.is_empty() && snapshot.retained.is_empty());
            let b = Broker::with_persistence(100, Arc::new(Metrics::new()), p);
            let a = b.attach(s("p"), false, false).await;
            assert!(a.handle.is_durable());
            b.subscribe(
                &a.handle,
                "t/#",
                SubscriptionOptions::new(QoS::ExactlyOnce),
                NonZeroU32::new(9),
            );
            b.detach(&a.handle, a.conn, Some(a.session), false);
            let clean = b.attach(s("c"), true, false).await;
            assert!(!clean.handle.is_durable());
            b.subscribe(
                &clean.handle,
                "t/#",
                SubscriptionOptions::new(QoS::AtLeastOnce),
                None,
            );
            let routed = b.publish(msg("t/1", QoS::AtLeastOnce, false), None);
            assert!(routed.stored, "a persisted session took it");
            assert_eq!(routed.delivered, 2);
            assert!(b.publish(msg("r/1", QoS::AtMostOnce, true), None).stored);
            b.publish(msg("r/2", QoS::AtMostOnce, true), None);
            b.publish(
                Message {
                    payload: Bytes::new(),
                    ..msg("r/2", QoS::AtMostOnce, true)
                },
                None,
            );
            b.flush().await.unwrap();
        }
        let (p, snapshot) = Persistence::open(dir.path()).unwrap();
        let b = Broker::with_persistence(100, Arc::new(Metrics::new()), p);
        let restored = b.restore(snapshot, |_, o| (o, Access::Full));
        assert_eq!(restored.len(), 1, "only the persistent session");
        assert_eq!(restored[0].expires_in, None);
        assert_eq!(b.retained_count(), 1, "r/2 was cleared");
        let again = b.attach(s("p"), false, false).await;
        assert!(again.session_present);
        assert_eq!(
            again.session.subscriptions.get(&s("t/#")),
            Some(&QoS::ExactlyOnce)
        );
        let waiting = drain(&again.handle);
        assert_eq!(waiting.len(), 1);
        assert_eq!(
            (waiting[0].0.topic.as_str(), waiting[0].1),
            ("t/1", QoS::AtLeastOnce)
        );
        assert!(
            waiting[0].0.store_seq.is_none(),
            "the number rides in the mail"
        );
        // The restored subscription routes new messages.
        assert_eq!(
            b.publish(msg("t/2", QoS::ExactlyOnce, false), None)
                .delivered,
            1
        );
        assert!(!b.attach(s("c"), false, false).await.session_present);
    }
}

#[cfg(test)]
mod retained_quota_tests {
    use super::*;
    use bytes::Bytes;

    fn m(topic: &str, payload: &'static [u8]) -> Message {
        Message::new(
            MqttStr::try_from(topic).unwrap(),
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
            true,
        )
    }

    #[test]
    fn each_client_has_its_quota_within_the_total() {
        let quota = RetainQuota {
            per_client: 2,
            per_client_bytes: 10,
            total: 3,
            total_bytes: 100,
        };
        let mut r = Retained::default();
        assert!(r.set(m("a/1", b"x"), Some("a"), &quota).is_ok());
        assert!(r.set(m("a/2", b"x"), Some("a"), &quota).is_ok());
        assert!(
            r.set(m("a/3", b"x"), Some("a"), &quota).is_err(),
            "a's third"
        );
        assert!(
            r.set(m("a/1", b"yy"), Some("a"), &quota).is_ok(),
            "a replacement"
        );
        assert!(r.set(m("b/1", b"x"), Some("b"), &quota).is_ok());
        assert!(
            r.set(m("b/2", b"x"), Some("b"), &quota).is_err(),
            "the total"
        );
        assert!(r.set(m("a/2", b""), Some("a"), &quota).is_ok(), "deleting");
        assert!(
            r.set(m("b/2", b"x"), Some("b"), &quota).is_ok(),
            "room again"
        );
        // b overwrote nothing of a's: a holds one message, b two.
        assert_eq!(r.by_origin.get("a").map(|u| u.count), Some(1));
        assert_eq!(r.by_origin.get("b").map(|u| u.count), Some(2));
        // Taking over a's topic moves its cost to b (over b's quota: refused).
        assert!(r.set(m("a/1", b"z"), Some("b"), &quota).is_err());
        assert!(
            r.set(m("big", b"0123456789ab"), Some("c"), &quota).is_err(),
            "bytes"
        );
        // The server's own are not bounded, nor counted in the clients' total.
        for i in 0..5 {
            assert!(r.set(m(&format!("$SYS/{i}"), b"x"), None, &quota).is_ok());
        }
        assert!(
            r.set(m("b/2", b"w"), Some("b"), &quota).is_ok(),
            "replacing b's own"
        );
    }
}

#[cfg(test)]
mod retained_quota_broker_tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn a_client_over_its_retained_quota_is_refused_through_the_broker() {
        let quota = RetainQuota {
            per_client: 3,
            per_client_bytes: 16 << 20,
            total: 8,
            total_bytes: 256 << 20,
        };
        let b = Broker::new(100, Arc::new(Metrics::new())).with_retain_quota(quota);
        let a = b
            .attach(MqttStr::try_from("ra").unwrap(), true, false)
            .await;
        let refused: Vec<bool> = (0..4)
            .map(|i| {
                let m = Message::new(
                    MqttStr::try_from(format!("ret/a/{i}")).unwrap(),
                    Bytes::from_static(b"v"),
                    QoS::AtLeastOnce,
                    true,
                );
                b.publish(m, Some(&a.handle)).refused
            })
            .collect();
        assert_eq!(refused, vec![false, false, false, true]);
    }
}
