//! Coalesced linearizable reads (etcd's `linearizableReadLoop`).
//!
//! A linearizable read needs a read index: the leader's commit index,
//! confirmed by a quorum after the read arrived. One confirmation serves
//! every read that was waiting when it started, so readers queue here and
//! one task (`read-index`) runs rounds: it takes every queued reader, runs
//! one read-index request (on the leader, or forwarded to it), and answers
//! them all with the same index; each reader then waits until its replica
//! applied that index.
//!
//! Invariant (what keeps it linearizable): a reader is only answered by a
//! round that started after the reader was queued. Readers arriving while a
//! round runs stay queued for the next one, so the index always covers
//! every write acknowledged before the read began.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{ConsensusError, Result};
use crate::task::{NamedTask, stopped};

/// Readers that may wait for a round before new ones are refused.
const QUEUE_DEPTH: usize = 16 * 1024;

type Reader = oneshot::Sender<Result<u64>>;

/// Handle to the read-index task.
pub(crate) struct ReadIndexer {
    tx: mpsc::Sender<Reader>,
    task: NamedTask,
}

impl ReadIndexer {
    /// Starts the task; `round` obtains one read index.
    pub(crate) fn spawn<F, Fut>(round: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        Self {
            tx,
            task: NamedTask::spawn("read-index", |stop| run(round, rx, stop)),
        }
    }

    /// A read index obtained after this call began.
    pub(crate) async fn read_index(&self) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| ConsensusError::ShuttingDown)?;
        rx.await.map_err(|_| ConsensusError::ShuttingDown)?
    }

    /// Stops taking readers; queued ones are answered `ShuttingDown`.
    pub(crate) fn stop(&self) {
        self.task.stop();
    }

    /// Waits up to `deadline` for the task to end.
    pub(crate) async fn join(&self, deadline: Duration) {
        self.task.join(deadline).await;
    }
}

async fn run<F, Fut>(round: F, mut rx: mpsc::Receiver<Reader>, mut stop: watch::Receiver<bool>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
            () = stopped(&mut stop) => break,
        };
        // Everyone queued now; later arrivals wait for the next round.
        let mut readers = vec![first];
        while let Ok(r) = rx.try_recv() {
            readers.push(r);
        }
        metrics::histogram!("cell0_read_index_batch_reads").record(readers.len() as f64);
        let result = tokio::select! {
            r = round() => r,
            () = stopped(&mut stop) => Err(ConsensusError::ShuttingDown),
        };
        for reader in readers {
            let _ = reader.send(result.clone());
        }
    }
    rx.close();
    while let Ok(r) = rx.try_recv() {
        let _ = r.send(Err(ConsensusError::ShuttingDown));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::sync::Notify;

    use super::*;

    #[tokio::test]
    async fn readers_queued_during_a_round_wait_for_the_next_one() {
        // Each round returns its own number, and waits for `go` to finish.
        let rounds = Arc::new(AtomicU64::new(0));
        let go = Arc::new(Notify::new());
        let reads = {
            let (rounds, go) = (rounds.clone(), go.clone());
            Arc::new(ReadIndexer::spawn(move || {
                let (rounds, go) = (rounds.clone(), go.clone());
                async move {
                    let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                    go.notified().await;
                    Ok(n)
                }
            }))
        };
        let first = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read_index().await }
        });
        // Wait until the first round started, then queue two more readers.
        while rounds.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let later: Vec<_> = (0..2)
            .map(|_| {
                let reads = reads.clone();
                tokio::spawn(async move { reads.read_index().await })
            })
            .collect();
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        go.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        // Both later readers share the second round, started after they queued.
        while rounds.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        go.notify_one();
        for r in later {
            assert_eq!(r.await.unwrap().unwrap(), 2);
        }
        assert_eq!(rounds.load(Ordering::SeqCst), 2);

        reads.stop();
        reads.join(Duration::from_secs(5)).await;
        assert!(matches!(reads.read_index().await, Err(ConsensusError::ShuttingDown)));
    }
}
