//! Many connections per task: futures split over a few tokio tasks, each polling its share
//! with `FuturesUnordered` (only woken futures are polled), aborted together on drop.

use std::future::Future;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;

/// Tasks the generator spreads connections over: one per runtime worker.
pub const TASKS: usize = 2;

/// A set of futures running on a few tasks. Dropping it aborts them.
#[derive(Debug)]
pub struct Group<T: Send + 'static> {
    handles: Vec<JoinHandle<Vec<anyhow::Result<T>>>>,
}

impl<T: Send + 'static> Group<T> {
    /// Spreads `futures` round-robin over `tasks` tasks (fewer when there are fewer futures).
    pub fn spawn<F>(futures: Vec<F>, tasks: usize) -> Group<T>
    where
        F: Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let tasks = tasks.clamp(1, futures.len().max(1));
        let mut shares: Vec<Vec<F>> = (0..tasks).map(|_| Vec::new()).collect();
        for (i, f) in futures.into_iter().enumerate() {
            shares[i % tasks].push(f);
        }
        let handles = shares
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|share| {
                tokio::spawn(async move {
                    let mut running: FuturesUnordered<F> = share.into_iter().collect();
                    let mut out = Vec::with_capacity(running.len());
                    while let Some(result) = running.next().await {
                        out.push(result);
                    }
                    out
                })
            })
            .collect();
        Group { handles }
    }

    /// Whether every task has ended.
    pub fn is_finished(&self) -> bool {
        self.handles.iter().all(|h| h.is_finished())
    }

    /// Waits for every future; the values in completion order, or the first error.
    pub async fn join(mut self) -> anyhow::Result<Vec<T>> {
        let mut values = Vec::new();
        let mut first_error = None;
        for handle in std::mem::take(&mut self.handles) {
            match handle.await {
                Ok(results) => {
                    for r in results {
                        match r {
                            Ok(v) => values.push(v),
                            Err(e) => {
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(anyhow::anyhow!("connection task failed: {e}"));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(values),
        }
    }

    /// Waits for the tasks if they have all ended (returning their errors), otherwise aborts
    /// them: receivers still waiting for messages that will not come are simply stopped.
    pub async fn finish_or_abort(self) -> anyhow::Result<Vec<T>> {
        if self.is_finished() {
            self.join().await
        } else {
            self.abort();
            Ok(Vec::new())
        }
    }

    /// Aborts every task.
    pub fn abort(&self) {
        for h in &self.handles {
            h.abort();
        }
    }
}

impl<T: Send + 'static> Drop for Group<T> {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Runs `make(i)` for `i in 0..n` with at most `concurrency` in flight per task, over
/// [`TASKS`] tasks; returns the values (any order) or the first error. Used to open
/// thousands of connections without thousands of simultaneous handshakes.
pub async fn bounded<T, F, M>(n: usize, concurrency: usize, make: M) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>> + Send + 'static,
    M: Fn(usize) -> F + Send + Sync + Clone + 'static,
{
    let tasks = TASKS.min(n.max(1));
    let handles: Vec<JoinHandle<anyhow::Result<Vec<T>>>> = (0..tasks)
        .map(|t| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut todo = (t..n).step_by(tasks);
                let mut running = FuturesUnordered::new();
                let mut out = Vec::new();
                for i in todo.by_ref().take(concurrency.max(1)) {
                    running.push(make(i));
                }
                while let Some(r) = running.next().await {
                    out.push(r?);
                    if let Some(i) = todo.next() {
                        running.push(make(i));
                    }
                }
                Ok(out)
            })
        })
        .collect();
    // Dropping the guard (on an error, or when the caller's timeout drops this future)
    // aborts every task; aborting one that has ended is harmless.
    let mut tasks = AbortOnDrop(handles);
    let mut all = Vec::with_capacity(n);
    for handle in tasks.0.iter_mut() {
        match handle.await {
            Ok(Ok(v)) => all.extend(v),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(anyhow::anyhow!("connection task failed: {e}")),
        }
    }
    Ok(all)
}

/// Aborts its tasks when dropped.
struct AbortOnDrop<T>(Vec<JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_joins_every_future_and_reports_errors() {
        let futures: Vec<_> = (0..10u32).map(|i| async move { Ok(i) }).collect();
        let mut got = Group::spawn(futures, TASKS).join().await.unwrap();
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<_>>());

        let futures: Vec<_> = (0..4u32)
            .map(|i| async move {
                if i == 2 {
                    anyhow::bail!("two")
                }
                Ok(i)
            })
            .collect();
        let err = Group::spawn(futures, TASKS).join().await.unwrap_err();
        assert_eq!(err.to_string(), "two");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bounded_keeps_concurrency_under_the_limit() {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (live.clone(), peak.clone());
        let got = bounded(100, 3, move |i| {
            let (live, peak) = (l.clone(), p.clone());
            async move {
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                live.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            }
        })
        .await
        .unwrap();
        assert_eq!(got.len(), 100);
        assert!(peak.load(Ordering::SeqCst) <= 3 * TASKS);
    }
}
