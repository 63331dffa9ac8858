//! Group commit: one writer thread turns every batch submitted while the previous transaction
//! was syncing into the next transaction, so N concurrent publishers cost one `fsync`, not N.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::mqtt::{MqttOp, MqttStore};
use crate::StoreError;

/// Resolves when a submitted batch is durable (or failed). Await it before acknowledging.
pub type Completion = oneshot::Receiver<Result<(), Arc<StoreError>>>;

struct Job {
    ops: Vec<MqttOp>,
    done: Option<oneshot::Sender<Result<(), Arc<StoreError>>>>,
}

/// Counters of the writer, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Operations written.
    pub ops: u64,
    /// Batches submitted.
    pub batches: u64,
}

/// The writer thread in front of an [`MqttStore`].
pub struct GroupCommitter {
    tx: Option<mpsc::Sender<Job>>,
    writer: Option<thread::JoinHandle<()>>,
    stats: Arc<std::sync::Mutex<CommitStats>>,
}

impl GroupCommitter {
    /// Starts the writer. At most `max_ops` operations go into one transaction.
    pub fn start(store: Arc<dyn MqttStore>, max_ops: usize) -> Result<GroupCommitter, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(std::sync::Mutex::new(CommitStats::default()));
        let writer_stats = stats.clone();
        let writer = thread::Builder::new()
            .name("stratus-store-writer".into())
            .spawn(move || run_writer(store, rx, max_ops.max(1), writer_stats))?;
        Ok(GroupCommitter {
            tx: Some(tx),
            writer: Some(writer),
            stats,
        })
    }

    /// Queues `ops` (applied in submission order, atomically with whatever shares its
    /// transaction) and returns the completion to await for durability.
    pub fn submit(&self, ops: Vec<MqttOp>) -> Completion {
        let (done, completion) = oneshot::channel();
        self.send(Job {
            ops,
            done: Some(done),
        });
        completion
    }

    /// Queues `ops` without waiting for them (they are still written in order).
    pub fn submit_detached(&self, ops: Vec<MqttOp>) {
        self.send(Job { ops, done: None });
    }

    fn send(&self, mut job: Job) {
        let Some(tx) = &self.tx else {
            if let Some(done) = job.done.take() {
                let _ = done.send(Err(Arc::new(StoreError::WriterStopped)));
            }
            return;
        };
        if let Err(mpsc::SendError(mut job)) = tx.send(job) {
            if let Some(done) = job.done.take() {
                let _ = done.send(Err(Arc::new(StoreError::WriterStopped)));
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> CommitStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Writes everything queued and stops the writer.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_writer(
    store: Arc<dyn MqttStore>,
    rx: mpsc::Receiver<Job>,
    max_ops: usize,
    stats: Arc<std::sync::Mutex<CommitStats>>,
) {
    // Block for the first job, then take whatever else is already waiting.
    while let Ok(first) = rx.recv() {
        let mut ops = first.ops;
        let mut waiters = Vec::new();
        waiters.extend(first.done);
        let mut batches = 1;
        while ops.len() < max_ops {
            match rx.try_recv() {
                Ok(mut job) => {
                    ops.append(&mut job.ops);
                    waiters.extend(job.done);
                    batches += 1;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = store.commit_mqtt(&ops).map_err(Arc::new);
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = ops.len(), "store commit failed");
        } else {
            tracing::trace!(ops = ops.len(), batches, elapsed = ?started.elapsed(), "store commit");
        }
        if let Ok(mut s) = stats.lock() {
            s.transactions += 1;
            s.ops += ops.len() as u64;
            s.batches += batches;
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}
