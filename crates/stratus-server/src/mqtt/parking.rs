//! The parking lot: quiet plain-TCP MQTT connections kept as a bare socket and their state,
//! with no task and no tokio registration each — one epoll set and one deadline heap for all,
//! and one task that wakes a connection on input, mail, a take-over, its deadline or the
//! shutdown.
//!
//! Why: a tokio task per idle connection, with its socket registration and timer, costs about
//! 2.5 KiB; thousands of sensors that send a reading a minute are idle nearly all the time. A
//! parked connection costs its [`Driver`] (boxed, a few hundred bytes), a 32-byte slab slot and
//! a kernel epoll entry (not in the process's memory).
//!
//! A parked connection is found by its token, `generation << 32 | slab key`: the epoll entry
//! carries it, and the client's [`ClientHandle`] publishes it so [`ClientHandle::signal`] can
//! send it here. A token whose slot was emptied or reused (its generation differs) is ignored,
//! so stale wake-ups cost nothing. Deadlines (keep-alive expiry) sit in the slots and are
//! scanned every [`SCAN_EVERY`] while anything is parked: a contiguous pass over the slab costs
//! microseconds per ten thousand connections, less than a timer heap's memory.
//!
//! [`ClientHandle`]: crate::broker::ClientHandle
//! [`ClientHandle::signal`]: crate::broker::ClientHandle::signal

use std::io;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Registry, Token};
use parking_lot::Mutex;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio_util::task::TaskTracker;

use super::{Driver, PARK_AFTER};
use crate::broker::ParkWakes;

/// Events taken from the epoll set per call.
const EVENTS: usize = 1024;

/// How often the deadlines of parked connections are checked: a keep-alive expires at most
/// this late.
const SCAN_EVERY: Duration = Duration::from_millis(100);

/// Idle connections waiting for something to do; see the module docs.
pub(super) struct ParkingLot {
    /// Registers parked sockets in the lot's epoll set (usable from any thread).
    registry: Registry,
    state: Mutex<Lot>,
    /// Wakes the lot's task when the first connection parks (it scans deadlines only while
    /// something is parked).
    first: Notify,
    /// Tokens of parked connections whose client was signalled.
    wakes: Arc<ParkWakes>,
    /// Where woken connections run; the server waits on it at shutdown.
    tasks: TaskTracker,
    shutdown: watch::Receiver<bool>,
}

struct Lot {
    slots: Slab<Slot>,
    generation: u32,
    /// Set at shutdown: nothing parks any more.
    closed: bool,
    /// What [`Slot::since`] counts from.
    epoch: Instant,
}

impl Lot {
    /// Milliseconds since the lot started, wrapping every 49 days; two readings compare with
    /// wrapping arithmetic, which holds for spans under 24 days (a keep-alive is at most
    /// 65,535 s × 1.5, 27 hours).
    fn clock(&self) -> u32 {
        self.ms_since_epoch(Instant::now())
    }

    fn ms_since_epoch(&self, at: Instant) -> u32 {
        at.saturating_duration_since(self.epoch).as_millis() as u32
    }
}

/// Whether the clock reading `deadline` has come at reading `now`.
fn due(deadline: u32, now: u32) -> bool {
    (now.wrapping_sub(deadline) as i32) >= 0
}

/// A parked connection: 24 bytes besides its driver. Times are ms since the lot started,
/// wrapping (see [`Lot::clock`]).
struct Slot {
    driver: Box<Driver>,
    socket: MioStream,
    /// The token's upper half.
    generation: u32,
    /// When it parked: one woken soon after lingers before it parks again.
    since: u32,
    /// When it must run (its keep-alive or connect deadline), if ever.
    deadline: Option<NonZeroU32>,
}

impl Slot {
    fn token(&self, key: usize) -> u64 {
        u64::from(self.generation) << 32 | key as u64
    }
}

/// What [`ParkingLot::park`] did with a connection.
pub(super) enum Parked {
    /// It is parked; the lot wakes it.
    Yes,
    /// The lot is closed (shutdown): the caller keeps running it.
    No(Box<Driver>, TcpStream),
    /// Its socket was lost on the way in: the caller ends it.
    Broken(Box<Driver>),
}

impl ParkingLot {
    /// A lot whose woken connections run on `tasks`, with its own task there too. `None` (no
    /// parking, connections keep their task) when the epoll set cannot be made or `wakes`
    /// already serves another lot.
    pub(super) fn start(
        wakes: Arc<ParkWakes>,
        tasks: TaskTracker,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<Arc<ParkingLot>> {
        if !wakes.claim() {
            return Err(io::Error::other("the broker already has a parking lot"));
        }
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: `register_with_interest` needs the fd that `poll.as_raw_fd()` returns to stay
        // open and the same for the AsyncFd's whole life. A mio `Poll` owns its epoll fd (an
        // `OwnedFd` it closes only when dropped) and always returns that one; the AsyncFd owns
        // the `Poll`, so the fd is closed only after the AsyncFd deregistered it.
        #[allow(unsafe_code)]
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }?;
        let lot = Arc::new(ParkingLot {
            registry,
            state: Mutex::new(Lot {
                slots: Slab::new(),
                generation: 0,
                closed: false,
                epoch: Instant::now(),
            }),
            first: Notify::new(),
            wakes,
            tasks: tasks.clone(),
            shutdown,
        });
        tasks.spawn(lot.clone().run(poll));
        Ok(lot)
    }

    /// Parks a quiet connection: its socket joins the epoll set, and its client learns the
    /// token that wakes it. The caller has released the driver's idle memory
    /// ([`Driver::release_idle_memory`]).
    pub(super) fn park(&self, driver: Box<Driver>, stream: TcpStream) -> Parked {
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "mqtt socket could not leave the runtime");
                return Parked::Broken(driver);
            }
        };
        let mut socket = MioStream::from_std(std);
        let deadline = driver.conn.poll_timeout();
        let mut lot = self.state.lock();
        if lot.closed || lot.slots.vacant_key() > u32::MAX as usize {
            drop(lot);
            return self.back(driver, socket);
        }
        lot.generation = lot.generation.wrapping_add(1).max(1);
        let generation = lot.generation;
        let token = u64::from(generation) << 32 | lot.slots.vacant_key() as u64;
        // Registered while the lot is locked: an event for the token finds its slot.
        if let Err(e) =
            self.registry
                .register(&mut socket, Token(token as usize), Interest::READABLE)
        {
            tracing::debug!(error = %e, "mqtt socket could not be parked");
            drop(lot);
            return self.back(driver, socket);
        }
        // Still under the lock, so the lot cannot wake the connection before this is done.
        if let Some(c) = &driver.client {
            c.handle.set_parked(token);
            // A signal that came before the token was published left a notification: take it
            // and wake at once (the woken connection then looks at its mailbox, where a
            // take-over or slow-consumer mark is seen too).
            if c.handle.notify.take() {
                self.wakes.push(token);
            }
        }
        let since = lot.clock();
        // 0 stands for "none": a deadline that falls on it moves a millisecond later.
        let deadline =
            deadline.map(|at| NonZeroU32::new(lot.ms_since_epoch(at)).unwrap_or(NonZeroU32::MIN));
        let first = lot.slots.is_empty();
        lot.slots.insert(Slot {
            driver,
            socket,
            generation,
            since,
            deadline,
        });
        drop(lot);
        if first {
            self.first.notify_one();
        }
        Parked::Yes
    }

    /// Hands a connection that could not park back to its caller.
    fn back(&self, driver: Box<Driver>, mut socket: MioStream) -> Parked {
        let _ = self.registry.deregister(&mut socket);
        match TcpStream::from_std(socket.into()) {
            Ok(stream) => Parked::No(driver, stream),
            Err(e) => {
                tracing::debug!(error = %e, "mqtt socket could not rejoin the runtime");
                Parked::Broken(driver)
            }
        }
    }

    /// Takes the connection parked under `token` out and runs it again in a task of its own;
    /// nothing when it is not parked (any more).
    fn unpark(self: &Arc<Self>, token: u64, readable: bool) {
        let key = (token & u64::from(u32::MAX)) as usize;
        let slot = {
            let mut lot = self.state.lock();
            match lot.slots.get(key) {
                Some(s) if s.token(key) == token => (lot.slots.remove(key), lot.clock()),
                _ => return,
            }
        };
        let (
            Slot {
                mut socket,
                mut driver,
                since,
                ..
            },
            now,
        ) = slot;
        let rested = Duration::from_millis(u64::from(now.wrapping_sub(since)));
        let linger = if rested < PARK_AFTER {
            PARK_AFTER
        } else {
            Duration::ZERO
        };
        if let Some(c) = &driver.client {
            c.handle.set_parked(0);
        }
        // Whatever woke it, it looks at its mailbox first: a signal's notification may have
        // been taken while it parked, and a take-over or slow-consumer mark is seen there.
        driver.more_mail = true;
        let _ = self.registry.deregister(&mut socket);
        match TcpStream::from_std(socket.into()) {
            Ok(stream) => {
                let run = super::run_tcp(
                    driver,
                    stream,
                    self.shutdown.clone(),
                    readable,
                    linger,
                    self.clone(),
                );
                self.tasks.spawn(run);
            }
            Err(e) => {
                tracing::debug!(error = %e, "parked mqtt socket could not rejoin the runtime");
                self.tasks.spawn(driver.close_broken());
            }
        }
    }

    /// Wakes every parked connection whose deadline has come. Returns whether anything is
    /// still parked (so the scans go on).
    fn expire(self: &Arc<Self>) -> bool {
        let due_now: Vec<u64> = {
            let lot = self.state.lock();
            let now = lot.clock();
            lot.slots
                .iter()
                .filter(|(_, s)| s.deadline.is_some_and(|d| due(d.get(), now)))
                .map(|(key, s)| s.token(key))
                .collect()
        };
        for token in due_now {
            self.unpark(token, false);
        }
        // Read after the wake-ups: a connection that parks from now on into an empty lot
        // notifies `first`.
        !self.state.lock().slots.is_empty()
    }

    /// The lot's task: waits on the epoll set, the wake-ups, the soonest deadline and the
    /// shutdown; at shutdown, wakes every parked connection so each closes (wills published).
    async fn run(self: Arc<Self>, mut poll: AsyncFd<Poll>) {
        let mut events = Events::with_capacity(EVENTS);
        let mut shutdown = self.shutdown.clone();
        // The next deadline scan; none while nothing is parked.
        let mut scan: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                ready = poll.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            tracing::error!(error = %e, "mqtt parking lot failed");
                            break;
                        }
                    };
                    // Until the set is drained: tokio sees the epoll fd's readiness as an edge.
                    loop {
                        if let Err(e) = guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                            if e.kind() != io::ErrorKind::Interrupted {
                                tracing::error!(error = %e, "mqtt parking lot poll failed");
                            }
                            break;
                        }
                        if events.is_empty() {
                            guard.clear_ready();
                            break;
                        }
                        for event in events.iter() {
                            self.unpark(event.token().0 as u64, true);
                        }
                    }
                }
                _ = self.wakes.notify.notified() => {
                    for token in self.wakes.take() {
                        self.unpark(token, false);
                    }
                }
                _ = self.first.notified() => {
                    scan.get_or_insert_with(|| Instant::now() + SCAN_EVERY);
                }
                _ = super::sleep_until(scan) => {
                    scan = self.expire().then(|| Instant::now() + SCAN_EVERY);
                }
            }
        }
        let tokens: Vec<u64> = {
            let mut lot = self.state.lock();
            lot.closed = true;
            lot.slots.iter().map(|(key, s)| s.token(key)).collect()
        };
        for token in tokens {
            self.unpark(token, false);
        }
    }
}
