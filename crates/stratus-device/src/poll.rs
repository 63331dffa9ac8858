//! The loop of the request/response transports (HTTP, CoAP): poll the desired config when it is
//! due, send a pending config report, send a batch; wait for records or the next poll; back off
//! after a failure.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Backoff, Shared, Status};

/// Why a step could not finish.
pub(crate) enum Stop {
    /// The server is unreachable or busy: keep everything, back off.
    Transient(String),
    /// The credentials are refused.
    Unauthorized(String),
    /// The device is closing.
    Closed,
}

/// One transport's steps.
pub(crate) trait Steps {
    /// Whether a successful round marks the device connected (a transport may rather do it
    /// per answered request).
    const CONNECTED_ON_SUCCESS: bool;
    /// The device's shared state.
    fn shared(&self) -> &Arc<Shared>;
    /// Fetches the desired config.
    async fn poll_config(&mut self) -> Result<(), Stop>;
    /// Sends the pending reported config, if any.
    async fn send_report(&mut self) -> Result<(), Stop>;
    /// Sends one batch of buffered records; `true` when more are waiting.
    async fn send_batch(&mut self) -> Result<bool, Stop>;
}

/// Runs `w` until the device is closed.
pub(crate) async fn run<W: Steps>(w: &mut W, config_poll: Duration) {
    let mut backoff = Backoff::new();
    let mut next_poll = Instant::now();
    loop {
        if w.shared().cancel.is_cancelled() {
            break;
        }
        let result = async {
            if Instant::now() >= next_poll {
                w.poll_config().await?;
                next_poll = Instant::now() + config_poll;
            }
            w.send_report().await?;
            w.send_batch().await
        }
        .await;
        let shared = w.shared().clone();
        match result {
            Ok(more) => {
                backoff.reset();
                if W::CONNECTED_ON_SUCCESS {
                    shared.connected();
                }
                if more {
                    continue;
                }
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(next_poll) => {}
                }
            }
            Err(Stop::Closed) => break,
            Err(stop) => {
                let delay = match stop {
                    Stop::Transient(reason) => {
                        shared.set_status(Status::Offline(reason));
                        backoff.next_delay()
                    }
                    Stop::Unauthorized(reason) => {
                        shared.set_status(Status::Unauthorized(reason));
                        backoff.next_delay().max(Duration::from_secs(5))
                    }
                    Stop::Closed => break,
                };
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    w.shared().set_status(Status::Closed);
}
