//! The queue-and-group loop shared by group commit (`batcher`) and write
//! forwarding (`forwarder`).
//!
//! Commands queue in a channel. The loop takes the first waiting command,
//! waits for a free in-flight slot, then drains everything else that queued
//! meanwhile, up to a count and a byte limit, into one group, and hands the
//! group to its sender as a task holding the slot. At low load a group is one
//! command; under load commands pile up while earlier groups are in flight,
//! so one round serves many.
//!
//! When the stop signal comes, commands never handed on are answered
//! `ShuttingDown` (provably not applied), and the groups in flight finish.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::command::{Command, Response};
use crate::error::{ConsensusError, Result};
use crate::task::stopped;

/// One queued command and where its answer goes.
pub(crate) struct Queued {
    pub cmd: Command,
    /// `cmd.approx_size()`.
    pub size: usize,
    pub reply: oneshot::Sender<Result<Response>>,
    /// A share of a byte budget, released when the command's group is done.
    pub _room: Option<OwnedSemaphorePermit>,
}

impl Queued {
    /// `cmd` with a fresh reply channel.
    pub(crate) fn new(cmd: Command, room: Option<OwnedSemaphorePermit>) -> (Self, oneshot::Receiver<Result<Response>>) {
        let (reply, rx) = oneshot::channel();
        let size = cmd.approx_size();
        (
            Self {
                cmd,
                size,
                reply,
                _room: room,
            },
            rx,
        )
    }
}

/// Size limits of one group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupLimits {
    pub max_commands: usize,
    pub max_bytes: usize,
}

/// A free in-flight slot when nothing is queued: then no group could form,
/// and a submitter may do the work of its group of one itself, without the
/// hand-off to the loop's task.
pub(crate) fn idle_slot(tx: &mpsc::Sender<Queued>, slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    if tx.capacity() < tx.max_capacity() {
        return None;
    }
    slots.clone().try_acquire_owned().ok()
}

/// Runs the loop until `stop` or until every sender is gone. `send` starts
/// the work of one group (it answers every command of it); `metric` names
/// the histogram of group sizes.
pub(crate) async fn run_groups<F, Fut>(
    mut rx: mpsc::Receiver<Queued>,
    limits: GroupLimits,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    metric: &'static str,
    send: F,
) where
    F: Fn(Vec<Queued>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut in_flight = JoinSet::new();
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
                () = stopped(&mut stop) => break,
            },
        };
        // The semaphore is never closed, so acquiring only fails if that
        // invariant breaks; then stop rather than spin.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stopped(&mut stop) => {
                carry = Some(first);
                break;
            }
        };
        let group;
        (group, carry) = form_group(first, &mut rx, &limits);
        metrics::histogram!(metric).record(group.len() as f64);
        let work = send(group);
        in_flight.spawn(async move {
            work.await;
            drop(slot);
        });
        // Reap finished groups so the set stays small.
        while in_flight.try_join_next().is_some() {}
    }
    rx.close();
    for p in carry.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
        let _ = p.reply.send(Err(ConsensusError::ShuttingDown));
    }
    while in_flight.join_next().await.is_some() {}
}

/// The group that starts with `first`: every command already queued, up to
/// the count and byte limits. A queued command that would pass the byte
/// limit is returned to start the next group.
pub(crate) fn form_group(
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    limits: &GroupLimits,
) -> (Vec<Queued>, Option<Queued>) {
    let mut bytes = first.size;
    let mut group = vec![first];
    while group.len() < limits.max_commands {
        match rx.try_recv() {
            Ok(p) if bytes + p.size > limits.max_bytes => return (group, Some(p)),
            Ok(p) => {
                bytes += p.size;
                group.push(p);
            }
            Err(_) => break,
        }
    }
    (group, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(value_bytes: usize) -> Queued {
        Queued::new(
            Command::Put {
                key: b"k".to_vec(),
                value: vec![0; value_bytes],
            },
            None,
        )
        .0
    }

    #[test]
    fn queued_commands_form_one_group_within_the_limits() {
        let limits = GroupLimits {
            max_commands: 4,
            max_bytes: 1000,
        };
        let (tx, mut rx) = mpsc::channel(16);
        for _ in 0..6 {
            tx.try_send(queued(10)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (group, carry) = form_group(first, &mut rx, &limits);
        assert_eq!((group.len(), carry.is_none()), (4, true), "capped by count");
        let first = rx.try_recv().unwrap();
        let (group, _) = form_group(first, &mut rx, &limits);
        assert_eq!(group.len(), 2, "everything left queued");

        for size in [400, 400, 400] {
            tx.try_send(queued(size)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (group, carry) = form_group(first, &mut rx, &limits);
        assert_eq!(group.len(), 2, "capped by bytes");
        assert!(carry.is_some(), "the command that did not fit starts the next group");
        assert!(rx.try_recv().is_err());
    }
}
