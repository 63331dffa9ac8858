//! Group commit: one writer thread turns every job submitted while the previous transaction
//! was syncing into the next transaction, so N concurrent writers cost one `fsync`, not N.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::mqtt::{MqttOp, MqttStore};
use crate::write::{JobResults, Output, Write, WriteBackend};
use crate::StoreError;

/// Resolves when a submitted MQTT batch is durable (or failed). Await it before acknowledging.
pub type Completion = oneshot::Receiver<Result<(), Arc<StoreError>>>;

/// Resolves with the outputs of a submitted job once it is durable, or with its error. A
/// closed channel (`RecvError`) means the writer stopped.
pub type WriteCompletion = oneshot::Receiver<Result<Vec<Output>, StoreError>>;

enum Reply {
    None,
    Mqtt(oneshot::Sender<Result<(), Arc<StoreError>>>),
    Writes(oneshot::Sender<Result<Vec<Output>, StoreError>>),
}

impl Reply {
    fn send(self, result: Result<Vec<Output>, StoreError>) {
        match self {
            Reply::None => {}
            Reply::Mqtt(done) => {
                let _ = done.send(result.map(|_| ()).map_err(Arc::new));
            }
            Reply::Writes(done) => {
                let _ = done.send(result);
            }
        }
    }

    fn fail_shared(self, error: &Arc<StoreError>) {
        match self {
            Reply::None => {}
            Reply::Mqtt(done) => {
                let _ = done.send(Err(error.clone()));
            }
            Reply::Writes(done) => {
                let _ = done.send(Err(StoreError::CommitFailed(error.clone())));
            }
        }
    }

    fn fail_stopped(self) {
        self.fail_shared(&Arc::new(StoreError::WriterStopped));
    }
}

struct Job {
    writes: Vec<Write>,
    reply: Reply,
}

impl Job {
    fn weight(&self) -> usize {
        self.writes.iter().map(Write::weight).sum::<usize>().max(1)
    }
}

/// Counters of the writer, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    /// Transactions committed (or attempted).
    pub transactions: u64,
    /// Operations written (MQTT ops, telemetry points, other writes count one each).
    pub ops: u64,
    /// Jobs (batches) submitted.
    pub batches: u64,
    /// Transactions that failed as a whole.
    pub failed_transactions: u64,
    /// Jobs that failed on their own (a conflict, an invalid point) while others committed.
    pub failed_jobs: u64,
}

/// The writer thread in front of a backend.
///
/// Submitting never blocks; jobs are applied in submission order. Each job is atomic on its
/// own and independent of the jobs it shares a transaction with (see
/// [`WriteBackend::commit_jobs`]). Dropping or [`close`](GroupCommitter::close)-ing the
/// committer writes everything queued, then stops the thread.
pub struct GroupCommitter {
    tx: Option<mpsc::Sender<Job>>,
    writer: Option<thread::JoinHandle<()>>,
    stats: Arc<Mutex<CommitStats>>,
}

/// Lets a broker-only [`MqttStore`] sit behind the committer: MQTT jobs of one transaction go
/// to one `commit_mqtt` (and fail together); other writes are unsupported.
struct MqttOnly(Arc<dyn MqttStore>);

impl WriteBackend for MqttOnly {
    fn commit_jobs(&self, jobs: &[Vec<Write>]) -> JobResults {
        let mut ops = Vec::new();
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.iter().all(|w| matches!(w, Write::Mqtt(_))) {
                for write in job {
                    if let Write::Mqtt(batch) = write {
                        ops.extend(batch.iter().cloned());
                    }
                }
                results.push(Ok(vec![Output::Done; job.len()]));
            } else {
                results.push(Err(StoreError::Unsupported(
                    "this committer was started for MQTT state only",
                )));
            }
        }
        if !ops.is_empty() {
            self.0.commit_mqtt(&ops)?;
        }
        Ok(results)
    }
}

impl GroupCommitter {
    /// Starts the writer in front of the broker's store. At most `max_ops` operations go into
    /// one transaction (a single larger batch still goes in whole).
    pub fn start(store: Arc<dyn MqttStore>, max_ops: usize) -> Result<GroupCommitter, StoreError> {
        GroupCommitter::start_backend(Arc::new(MqttOnly(store)), max_ops)
    }

    /// Starts the writer in front of a full backend, for every kind of [`Write`].
    pub fn start_backend(
        backend: Arc<dyn WriteBackend>,
        max_ops: usize,
    ) -> Result<GroupCommitter, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(Mutex::new(CommitStats::default()));
        let writer_stats = stats.clone();
        let writer = thread::Builder::new()
            .name("stratus-store-writer".into())
            .spawn(move || run_writer(backend, rx, max_ops.max(1), writer_stats))?;
        Ok(GroupCommitter {
            tx: Some(tx),
            writer: Some(writer),
            stats,
        })
    }

    /// Queues `ops` (applied in submission order, atomically) and returns the completion to
    /// await for durability.
    pub fn submit(&self, ops: Vec<MqttOp>) -> Completion {
        let (done, completion) = oneshot::channel();
        self.send(Job {
            writes: vec![Write::Mqtt(ops)],
            reply: Reply::Mqtt(done),
        });
        completion
    }

    /// Queues `ops` without waiting for them (they are still written in order).
    pub fn submit_detached(&self, ops: Vec<MqttOp>) {
        self.send(Job {
            writes: vec![Write::Mqtt(ops)],
            reply: Reply::None,
        });
    }

    /// Queues a job (its writes apply atomically, in order) and returns the completion that
    /// resolves with its outputs once durable.
    pub fn submit_writes(&self, writes: Vec<Write>) -> WriteCompletion {
        let (done, completion) = oneshot::channel();
        self.send(Job {
            writes,
            reply: Reply::Writes(done),
        });
        completion
    }

    fn send(&self, job: Job) {
        let Some(tx) = &self.tx else {
            job.reply.fail_stopped();
            return;
        };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            job.reply.fail_stopped();
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> CommitStats {
        match self.stats.lock() {
            Ok(s) => *s,
            Err(poisoned) => *poisoned.into_inner(),
        }
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
    backend: Arc<dyn WriteBackend>,
    rx: mpsc::Receiver<Job>,
    max_ops: usize,
    stats: Arc<Mutex<CommitStats>>,
) {
    // Block for the first job, then take whatever else is already waiting.
    while let Ok(first) = rx.recv() {
        let mut weight = first.weight();
        let mut jobs = vec![first.writes];
        let mut replies = vec![first.reply];
        while weight < max_ops {
            match rx.try_recv() {
                Ok(job) => {
                    weight += job.weight();
                    jobs.push(job.writes);
                    replies.push(job.reply);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| backend.commit_jobs(&jobs)))
            .unwrap_or_else(|_| Err(StoreError::Internal("the store writer panicked".into())));
        let result = result.and_then(|results| {
            if results.len() == replies.len() {
                Ok(results)
            } else {
                Err(StoreError::Internal(
                    "the backend did not return one result per job".into(),
                ))
            }
        });
        // Count before answering, so that whoever awaited a completion sees it counted.
        {
            let mut s = match stats.lock() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            s.transactions += 1;
            s.ops += weight as u64;
            s.batches += jobs.len() as u64;
            match &result {
                Ok(results) => {
                    s.failed_jobs += results.iter().filter(|r| r.is_err()).count() as u64;
                }
                Err(_) => s.failed_transactions += 1,
            }
        }
        match result {
            Ok(results) => {
                tracing::trace!(ops = weight, jobs = jobs.len(), elapsed = ?started.elapsed(), "store commit");
                for (reply, result) in replies.into_iter().zip(results) {
                    if let Err(e) = &result {
                        tracing::debug!(error = %e, "store job failed");
                    }
                    reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = weight, jobs = jobs.len(), "store commit failed");
                let e = Arc::new(e);
                for reply in replies {
                    reply.fail_shared(&e);
                }
            }
        }
    }
}
