//! Batched forwarding of writes from a follower to the leader.
//!
//! A follower's clients write concurrently; forwarding each write as its own
//! RPC costs the leader one request (HTTP/2 frames, a task, a decode) per
//! write. Instead writes queue here and one task (`forward-writes`) sends
//! everything queued as one `Writes` request, up to
//! `ConsensusConfig::max_batch_commands` commands and `max_batch_bytes`
//! bytes, with at most `max_inflight_batches` requests in flight. At one
//! client a write is sent at once, alone; under load, writes that arrive
//! while requests are in flight share the next one, the way the leader's
//! group commit shares an entry. The leader submits the commands of one
//! request to its group commit together, so they usually share one entry.
//! When nothing is queued and a slot is free, the submitter sends its write
//! itself (it would leave alone anyway), so one client pays no hand-off.
//!
//! Every command keeps its own request id, response and error: a failed
//! request fails each of its commands the way a single forward would
//! (`Unavailable` when provably not sent, `Indeterminate` otherwise), and
//! routing retries them one by one.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::command::{Command, Response};
use crate::error::{ConsensusError, Result};
use crate::grouping::{GroupLimits, Queued, idle_slot, run_groups};
use crate::task::NamedTask;

/// Commands that may wait before submitters feel backpressure.
const QUEUE_DEPTH: usize = 16 * 1024;

/// Limits of one forwarded request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardLimits {
    pub max_commands: usize,
    pub max_bytes: usize,
    pub max_inflight: usize,
}

/// Forwards one group and answers each of its commands.
type SendGroup = Arc<dyn Fn(Vec<Command>) -> BoxFuture<'static, Result<Vec<Result<Response>>>> + Send + Sync>;

/// Handle to the forwarding task.
pub(crate) struct Forwarder {
    tx: mpsc::Sender<Queued>,
    /// Requests in flight, shared by the task and the idle fast path.
    slots: Arc<Semaphore>,
    send: SendGroup,
    task: NamedTask,
}

impl Forwarder {
    /// Starts the task; `send` forwards one group and answers each command.
    pub(crate) fn spawn<F, Fut>(limits: ForwardLimits, send: F) -> Self
    where
        F: Fn(Vec<Command>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<Response>>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let send: SendGroup = Arc::new(move |cmds| send(cmds).boxed());
        let slots = Arc::new(Semaphore::new(limits.max_inflight));
        let (task_send, task_slots) = (send.clone(), slots.clone());
        Self {
            tx,
            slots,
            send,
            task: NamedTask::spawn("forward-writes", |stop| run(limits, task_send, task_slots, rx, stop)),
        }
    }

    /// Forwards `cmd` (validated) to the leader with the writes queued
    /// beside it.
    pub(crate) async fn submit(&self, cmd: Command) -> Result<Response> {
        if self.task.is_stopped() {
            return Err(ConsensusError::ShuttingDown);
        }
        // Idle fast path: nothing queued and a request slot free, so the
        // write would leave alone anyway; send it from here, without the
        // hand-off to the task.
        if let Some(slot) = idle_slot(&self.tx, &self.slots) {
            metrics::histogram!("cell0_forward_batch_commands").record(1.0);
            let outcome = (self.send)(vec![cmd]).await;
            drop(slot);
            let mut results = outcome?;
            return match (results.pop(), results.is_empty()) {
                (Some(result), true) => result,
                _ => Err(ConsensusError::Internal(
                    "the leader did not answer the forwarded write once".into(),
                )),
            };
        }
        let (queued, rx) = Queued::new(cmd, None);
        self.tx.send(queued).await.map_err(|_| ConsensusError::ShuttingDown)?;
        rx.await
            .map_err(|_| ConsensusError::Indeterminate("the node stopped after it forwarded the write".into()))?
    }

    /// Stops taking writes; queued ones are answered `ShuttingDown`.
    pub(crate) fn stop(&self) {
        self.task.stop();
    }

    /// Waits up to `deadline` for the task to finish its requests in flight.
    pub(crate) async fn join(&self, deadline: Duration) {
        self.task.join(deadline).await;
    }
}

async fn run(
    limits: ForwardLimits,
    send: SendGroup,
    slots: Arc<Semaphore>,
    rx: mpsc::Receiver<Queued>,
    stop: watch::Receiver<bool>,
) {
    let group_limits = GroupLimits {
        max_commands: limits.max_commands,
        max_bytes: limits.max_bytes,
    };
    run_groups(
        rx,
        group_limits,
        slots,
        stop,
        "cell0_forward_batch_commands",
        |cmds, answers| {
            let request = send(cmds);
            async move { answers.send(request.await) }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn put(i: u8) -> Command {
        Command::Put {
            key: vec![i],
            value: vec![i],
        }
    }

    #[tokio::test]
    async fn queued_writes_share_a_request_and_each_gets_its_own_answer() {
        let sent: Arc<Mutex<Vec<usize>>> = Arc::default();
        let gate = Arc::new(Semaphore::new(0));
        let forwarder = Arc::new(Forwarder::spawn(
            ForwardLimits {
                max_commands: 3,
                max_bytes: 1 << 20,
                max_inflight: 1,
            },
            {
                let (sent, gate) = (sent.clone(), gate.clone());
                move |cmds: Vec<Command>| {
                    let (sent, gate) = (sent.clone(), gate.clone());
                    async move {
                        sent.lock().unwrap().push(cmds.len());
                        let _permit = gate.acquire().await;
                        Ok(cmds
                            .into_iter()
                            .map(|c| match c {
                                Command::Put { key, .. } if key == [2] => Err(ConsensusError::invalid("key", "two")),
                                _ => Ok(Response::Empty),
                            })
                            .collect())
                    }
                }
            },
        ));
        let submit = |i: u8| {
            let f = forwarder.clone();
            tokio::spawn(async move { f.submit(put(i)).await })
        };
        // The first write goes alone; the next four queue behind it and
        // leave in groups of at most three.
        let first = submit(0);
        while sent.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (1..5).map(submit).collect();
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(10);
        assert!(matches!(first.await.unwrap(), Ok(Response::Empty)));
        let answers: Vec<_> = futures::future::join_all(rest).await;
        assert!(matches!(answers[0], Ok(Ok(Response::Empty))));
        assert!(matches!(answers[1], Ok(Err(ConsensusError::InvalidArgument { .. }))));
        assert_eq!(*sent.lock().unwrap(), vec![1, 3, 1]);

        forwarder.stop();
        forwarder.join(Duration::from_secs(5)).await;
        assert!(matches!(
            forwarder.submit(put(9)).await,
            Err(ConsensusError::ShuttingDown)
        ));
    }
}
