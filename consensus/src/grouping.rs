//! The queue-and-group loop shared by group commit (`batcher`) and write
//! forwarding (`forwarder`).
//!
//! Work queues in a channel: one command, or the commands of one request a
//! follower forwarded, which stay together. The loop takes the first
//! waiting unit, waits for a free in-flight slot, then drains everything
//! else that queued meanwhile, up to a count of commands and a byte limit,
//! into one group, and hands the group's commands to its sender as a task
//! holding the slot. At low load a group is one command; under load
//! commands pile up while earlier groups are in flight, so one round serves
//! many.
//!
//! Invariants:
//! - Every command of a formed group gets exactly one answer, in the order
//!   of the group's commands ([`Answers::send`]): its own result, or the
//!   whole group's failure.
//! - A group passes its limits only when its first unit alone does.
//! - When the stop signal comes, work never handed on is answered
//!   `ShuttingDown` (provably not applied), and the groups in flight finish.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::command::{Command, Response};
use crate::error::{ConsensusError, Result};
use crate::task::stopped;

/// What one queued unit holds, and where its answers go.
// Most units are one command, held inline as the queue always held it;
// boxing it would add an allocation to every queued write.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Work {
    /// One command.
    One(Command, oneshot::Sender<Result<Response>>),
    /// Commands that are answered together, one result each, in order.
    Many(Vec<Command>, oneshot::Sender<Vec<Result<Response>>>),
}

/// One queued unit of work.
pub(crate) struct Queued {
    pub work: Work,
    /// `approx_size()` of its commands, together.
    pub size: usize,
    /// A share of a byte budget, released when the unit's group is answered.
    pub room: Option<OwnedSemaphorePermit>,
}

impl Queued {
    /// `cmd` with a fresh reply channel.
    pub(crate) fn new(cmd: Command, room: Option<OwnedSemaphorePermit>) -> (Self, oneshot::Receiver<Result<Response>>) {
        let (reply, rx) = oneshot::channel();
        let size = cmd.approx_size();
        let work = Work::One(cmd, reply);
        (Self { work, size, room }, rx)
    }

    /// `cmds`, of `size` bytes together, answered together on a fresh
    /// channel.
    pub(crate) fn many(
        cmds: Vec<Command>,
        size: usize,
        room: Option<OwnedSemaphorePermit>,
    ) -> (Self, oneshot::Receiver<Vec<Result<Response>>>) {
        let (reply, rx) = oneshot::channel();
        let work = Work::Many(cmds, reply);
        (Self { work, size, room }, rx)
    }

    /// How many commands the unit holds.
    fn commands(&self) -> usize {
        match &self.work {
            Work::One(..) => 1,
            Work::Many(cmds, _) => cmds.len(),
        }
    }
}

/// Where the answers of a formed group go: [`split`] makes it, and
/// [`Answers::send`] answers every command once.
pub(crate) struct Answers {
    replies: Vec<Reply>,
    /// The group's commands, counted.
    commands: usize,
    /// The units' shares of their byte budget, held until they are answered.
    _rooms: Vec<OwnedSemaphorePermit>,
}

/// One unit's reply channel.
enum Reply {
    One(oneshot::Sender<Result<Response>>),
    Many(usize, oneshot::Sender<Vec<Result<Response>>>),
}

/// A group's commands in queue order, and where their answers go.
pub(crate) fn split(group: Vec<Queued>) -> (Vec<Command>, Answers) {
    let mut cmds = Vec::with_capacity(group.iter().map(Queued::commands).sum());
    let mut replies = Vec::with_capacity(group.len());
    let mut rooms = Vec::new();
    for unit in group {
        match unit.work {
            Work::One(cmd, reply) => {
                cmds.push(cmd);
                replies.push(Reply::One(reply));
            }
            Work::Many(many, reply) => {
                replies.push(Reply::Many(many.len(), reply));
                cmds.extend(many);
            }
        }
        rooms.extend(unit.room);
    }
    let commands = cmds.len();
    (
        cmds,
        Answers {
            replies,
            commands,
            _rooms: rooms,
        },
    )
}

impl Answers {
    /// Hands each command its result from `outcome` (see [`per_command`]).
    pub(crate) fn send(self, outcome: Result<Vec<Result<Response>>>) {
        let mut results = per_command(outcome, self.commands).into_iter();
        for reply in self.replies {
            match reply {
                Reply::One(tx) => {
                    if let Some(result) = results.next() {
                        let _ = tx.send(result);
                    }
                }
                Reply::Many(n, tx) => {
                    let _ = tx.send(results.by_ref().take(n).collect());
                }
            }
        }
    }
}

/// The outcome of `n` commands sent together as one result per command: a
/// failure of them all, or an answer with the wrong number of results,
/// fails each.
pub(crate) fn per_command(outcome: Result<Vec<Result<Response>>>, n: usize) -> Vec<Result<Response>> {
    let e = match outcome {
        Ok(results) if results.len() == n => return results,
        Ok(results) => ConsensusError::Internal(format!("{} answers to {n} commands", results.len())),
        Err(e) => e,
    };
    (0..n).map(|_| Err(e.clone())).collect()
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
/// the work of one group's commands (it answers every command of it through
/// the [`Answers`]); `metric` names the histogram of group sizes, in
/// commands.
pub(crate) async fn run_groups<F, Fut>(
    mut rx: mpsc::Receiver<Queued>,
    limits: GroupLimits,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    metric: &'static str,
    send: F,
) where
    F: Fn(Vec<Command>, Answers) -> Fut,
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
        let (cmds, answers) = split(group);
        metrics::histogram!(metric).record(cmds.len() as f64);
        let work = send(cmds, answers);
        in_flight.spawn(async move {
            work.await;
            drop(slot);
        });
        // Reap finished groups so the set stays small.
        while in_flight.try_join_next().is_some() {}
    }
    rx.close();
    let unsent: Vec<Queued> = carry
        .into_iter()
        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        .collect();
    let (_, answers) = split(unsent);
    answers.send(Err(ConsensusError::ShuttingDown));
    while in_flight.join_next().await.is_some() {}
}

/// The group that starts with `first`: every unit already queued, up to
/// the limits on commands and bytes. A queued unit that would pass either
/// is returned to start the next group.
pub(crate) fn form_group(
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    limits: &GroupLimits,
) -> (Vec<Queued>, Option<Queued>) {
    let (mut bytes, mut commands) = (first.size, first.commands());
    let mut group = vec![first];
    while commands < limits.max_commands {
        match rx.try_recv() {
            Ok(p) if bytes + p.size > limits.max_bytes || commands + p.commands() > limits.max_commands => {
                return (group, Some(p));
            }
            Ok(p) => {
                bytes += p.size;
                commands += p.commands();
                group.push(p);
            }
            Err(_) => break,
        }
    }
    (group, None)
}

/// `cmds` in consecutive parts that each fit `limits` (a command larger
/// than the byte limit is a part alone), with each part's bytes.
pub(crate) fn within_limits(cmds: Vec<Command>, limits: &GroupLimits) -> Vec<(Vec<Command>, usize)> {
    let mut parts: Vec<(Vec<Command>, usize)> = Vec::new();
    for cmd in cmds {
        let size = cmd.approx_size();
        match parts.last_mut() {
            Some((part, bytes)) if part.len() < limits.max_commands && *bytes + size <= limits.max_bytes => {
                part.push(cmd);
                *bytes += size;
            }
            _ => parts.push((vec![cmd], size)),
        }
    }
    parts
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

    fn put(i: u8) -> Command {
        Command::Put {
            key: vec![i],
            value: vec![i],
        }
    }

    fn answer(cmds: &[Command]) -> Vec<Result<Response>> {
        cmds.iter()
            .map(|c| match c {
                Command::Put { key, .. } if key[0] % 2 == 1 => Err(ConsensusError::invalid("key", "odd")),
                Command::Put { key, .. } => Ok(Response::ClusterId(u64::from(key[0]))),
                _ => Ok(Response::Empty),
            })
            .collect()
    }

    #[test]
    fn units_of_many_commands_count_every_command_and_get_their_own_answers() {
        let limits = GroupLimits {
            max_commands: 5,
            max_bytes: 1 << 20,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let (one, mut one_rx) = Queued::new(put(0), None);
        let (many, mut many_rx) = Queued::many(vec![put(1), put(2), put(3)], 30, None);
        let (late, _late_rx) = Queued::many(vec![put(4), put(5)], 20, None);
        for unit in [one, many, late] {
            tx.try_send(unit).unwrap();
        }
        let first = rx.try_recv().unwrap();
        let (group, carry) = form_group(first, &mut rx, &limits);
        assert_eq!(group.len(), 2, "two more commands would pass the limit of five");
        assert_eq!(carry.map(|c| c.commands()), Some(2));

        let (cmds, answers) = split(group);
        assert_eq!(cmds, vec![put(0), put(1), put(2), put(3)]);
        answers.send(Ok(answer(&cmds)));
        assert_eq!(one_rx.try_recv().unwrap(), Ok(Response::ClusterId(0)));
        let many = many_rx.try_recv().unwrap();
        assert_eq!(many.len(), 3);
        assert!(matches!(many[0], Err(ConsensusError::InvalidArgument { .. })));
        assert_eq!(many[1], Ok(Response::ClusterId(2)));
        assert!(matches!(many[2], Err(ConsensusError::InvalidArgument { .. })));
    }

    #[test]
    fn a_failed_or_miscounted_outcome_fails_every_command() {
        let (one, mut one_rx) = Queued::new(put(0), None);
        let (many, mut many_rx) = Queued::many(vec![put(2), put(4)], 20, None);
        let (_, answers) = split(vec![one, many]);
        answers.send(Ok(vec![Ok(Response::Empty), Ok(Response::Empty)]));
        assert!(matches!(one_rx.try_recv().unwrap(), Err(ConsensusError::Internal(_))));
        let many = many_rx.try_recv().unwrap();
        assert_eq!(many.len(), 2);
        assert!(many.iter().all(|r| matches!(r, Err(ConsensusError::Internal(_)))));

        let (many, mut many_rx) = Queued::many(vec![put(2), put(4)], 20, None);
        let (_, answers) = split(vec![many]);
        answers.send(Err(ConsensusError::ShuttingDown));
        assert_eq!(many_rx.try_recv().unwrap(), vec![Err(ConsensusError::ShuttingDown); 2]);
    }

    #[test]
    fn commands_are_cut_into_parts_within_the_limits() {
        let limits = GroupLimits {
            max_commands: 2,
            max_bytes: 1000,
        };
        let sizes = |parts: &[(Vec<Command>, usize)]| parts.iter().map(|(c, _)| c.len()).collect::<Vec<_>>();
        assert_eq!(sizes(&within_limits((0..5).map(put).collect(), &limits)), vec![2, 2, 1]);
        let big = |n: usize| Command::Put {
            key: b"k".to_vec(),
            value: vec![0; n],
        };
        let parts = within_limits(vec![big(400), big(400), big(2000), big(10)], &limits);
        assert_eq!(sizes(&parts), vec![2, 1, 1], "a command over the byte limit goes alone");
        assert!(
            parts
                .iter()
                .all(|(cmds, bytes)| *bytes == cmds.iter().map(Command::approx_size).sum::<usize>())
        );
    }
}
