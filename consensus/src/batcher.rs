//! Group commit on the leader.
//!
//! Client commands queue and are grouped by the loop of [`crate::grouping`]
//! (up to the configured count and bytes) into one `Command::Batch` entry.
//! At low load a command is proposed at once; under load, commands pile up
//! while earlier groups are being fsynced and replicated, so one fsync serves
//! many writers.
//!
//! The queue is bounded in bytes ([`MAX_QUEUED_BYTES`]) as well as in count:
//! a submitter waits for room, so a burst of large writes cannot grow memory
//! without bound. Once a group was handed to Raft, any failure is reported as
//! `Indeterminate`: the entry may still commit under a later leader.
//!
//! When nothing is queued and a group slot is free, a submitter proposes its
//! command itself (a group of one could not have formed anyway), so one
//! client pays no task hand-offs; under load the slots are taken and
//! commands queue for the task as above.
//!
//! The writes a follower forwarded in one request are submitted as one unit
//! ([`Batcher::submit_many`]): one queue slot, one byte share and one reply
//! for them all, and they share an entry unless they pass the group limits.
//!
//! The task is named `raft-batcher`, sees the stop signal of
//! [`Batcher::stop`] and is joined there: commands still queued are answered
//! `ShuttingDown` (never proposed), groups already proposed finish (Raft's
//! shutdown fails them as `Indeterminate`).

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::command::{Command, Response};
use crate::error::{ConsensusError, Result, UnavailableCause};
use crate::grouping::{GroupLimits, Queued, idle_slot, per_command, run_groups, within_limits};
use crate::network::{GROUPED_HISTORY_FORMAT, INTERNAL_FORMAT, PeerHealth, REQUEST_V2_FORMAT, readable_at};
use crate::task::NamedTask;
use crate::types::{NodeId, NodeInfo, Raft};

/// Commands that may wait for a slot before submitters feel backpressure.
const QUEUE_DEPTH: usize = 16 * 1024;
/// Bytes of commands queued or being proposed at most; submitters wait for
/// room beyond it.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Limits of one group, from [`crate::ConsensusConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_commands: usize,
    pub max_bytes: usize,
    pub max_inflight: usize,
    pub commit_timeout: Duration,
}

/// Handle to the group-commit task.
pub(crate) struct Batcher {
    tx: mpsc::Sender<Queued>,
    room: Arc<Semaphore>,
    /// Groups in flight, shared by the task and the idle fast path.
    slots: Arc<Semaphore>,
    proposer: Proposer,
    limits: GroupLimits,
    commit_timeout: Duration,
    task: NamedTask,
}

/// Raft, and what the leader knows of the log format its members read.
#[derive(Clone)]
pub(crate) struct Proposer {
    raft: Raft,
    peers: Arc<PeerHealth>,
}

impl Proposer {
    /// Proposes through `raft`; `peers` says which format each member reads.
    pub fn new(raft: Raft, peers: Arc<PeerHealth>) -> Self {
        Self { raft, peers }
    }

    /// `cmd` in the newest log format every member reads, so a node of an
    /// older build never receives an entry it cannot apply during a rolling
    /// upgrade: its requests become `Command::RequestV2` once every other
    /// member of the current membership said it reads
    /// [`REQUEST_V2_FORMAT`], `Command::RequestV3` once all said they read
    /// [`GROUPED_HISTORY_FORMAT`], and its `Command::PutWithoutPrev`s stay
    /// only once all said they read
    /// [`crate::network::PUT_WITHOUT_PREV_FORMAT`].
    fn readable(&self, cmd: Command) -> Command {
        let metrics = self.raft.metrics();
        let oldest = {
            let m = metrics.borrow();
            let me = m.id;
            m.membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != me)
                .map(|(id, _)| self.peers.reads_format(*id))
                .min()
                .unwrap_or(INTERNAL_FORMAT)
        };
        let cmd = if oldest >= GROUPED_HISTORY_FORMAT {
            cmd.into_request_v3()
        } else if oldest >= REQUEST_V2_FORMAT {
            cmd.into_request_v2()
        } else {
            cmd
        };
        readable_at(cmd, oldest)
    }
}

impl Batcher {
    /// Starts the task proposing through `proposer`.
    pub fn spawn(proposer: Proposer, limits: BatchLimits) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let slots = Arc::new(Semaphore::new(limits.max_inflight));
        let task_slots = slots.clone();
        let task_proposer = proposer.clone();
        Self {
            tx,
            room: Arc::new(Semaphore::new(MAX_QUEUED_BYTES)),
            slots,
            proposer,
            limits: limits.group(),
            commit_timeout: limits.commit_timeout,
            task: NamedTask::spawn("raft-batcher", |stop| run(task_proposer, rx, limits, task_slots, stop)),
        }
    }

    /// Tells the task to stop taking commands; [`Batcher::join`] waits for it.
    pub fn stop(&self) {
        self.task.stop();
        self.room.close();
    }

    /// Whether [`Batcher::stop`] was called (the node is shutting down).
    pub fn is_stopped(&self) -> bool {
        self.task.is_stopped()
    }

    /// Waits up to `deadline` for the stopped task to finish its proposed
    /// groups.
    pub async fn join(&self, deadline: Duration) {
        self.task.join(deadline).await;
    }

    /// A share of the queue's byte budget for `size` bytes of commands.
    async fn room_for(&self, size: usize) -> Result<OwnedSemaphorePermit> {
        let share = u32::try_from(size.min(MAX_QUEUED_BYTES)).unwrap_or(u32::MAX);
        self.room
            .clone()
            .acquire_many_owned(share)
            .await
            .map_err(|_| ConsensusError::ShuttingDown)
    }

    /// Proposes `cmd` (already validated) and waits for its applied response.
    pub async fn submit(&self, cmd: Command) -> Result<Response> {
        let room = self.room_for(cmd.approx_size()).await?;
        // Idle fast path: nothing queued and a group slot free, so no group
        // could form; propose here instead of handing the command to the
        // task (two fewer task hops at one client).
        if let Some(slot) = idle_slot(&self.tx, &self.slots) {
            metrics::histogram!("cell0_raft_batch_commands").record(1.0);
            let result = propose_one(&self.proposer, cmd, self.commit_timeout).await;
            drop((slot, room));
            return result;
        }
        let (queued, rx) = Queued::new(cmd, Some(room));
        self.tx.send(queued).await.map_err(|_| ConsensusError::ShuttingDown)?;
        // The command may be in a Raft entry already when the batcher stops.
        rx.await.map_err(|_| stopped_after_accepting())?
    }

    /// Proposes `cmds` (each already validated) together and waits for
    /// their applied responses, one result each, in order. They share one
    /// entry unless together they pass the group limits; then they are
    /// proposed in consecutive parts that fit.
    pub async fn submit_many(&self, cmds: Vec<Command>) -> Vec<Result<Response>> {
        let mut parts = within_limits(cmds, &self.limits);
        match parts.len() {
            0 => Vec::new(),
            1 => match parts.pop() {
                Some((cmds, size)) => self.submit_part(cmds, size).await,
                None => Vec::new(),
            },
            _ => futures::future::join_all(parts.into_iter().map(|(cmds, size)| self.submit_part(cmds, size)))
                .await
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    /// [`Batcher::submit_many`] for commands within the group limits, of
    /// `size` bytes together.
    async fn submit_part(&self, cmds: Vec<Command>, size: usize) -> Vec<Result<Response>> {
        let n = cmds.len();
        let room = match self.room_for(size).await {
            Ok(room) => room,
            Err(e) => return per_command(Err(e), n),
        };
        if let Some(slot) = idle_slot(&self.tx, &self.slots) {
            metrics::histogram!("cell0_raft_batch_commands").record(n as f64);
            let outcome = propose_commands(&self.proposer, cmds, self.commit_timeout).await;
            drop((slot, room));
            return per_command(outcome, n);
        }
        let (queued, rx) = Queued::many(cmds, size, Some(room));
        if self.tx.send(queued).await.is_err() {
            return per_command(Err(ConsensusError::ShuttingDown), n);
        }
        match rx.await {
            Ok(results) => results,
            Err(_) => per_command(Err(stopped_after_accepting()), n),
        }
    }
}

/// The outcome of a write whose answer never came because the node stopped
/// (it may be in a Raft entry already).
fn stopped_after_accepting() -> ConsensusError {
    ConsensusError::Indeterminate("the node stopped after it accepted the write".into())
}

impl BatchLimits {
    /// The limits of one group.
    fn group(&self) -> GroupLimits {
        GroupLimits {
            max_commands: self.max_commands,
            max_bytes: self.max_bytes,
        }
    }
}

async fn run(
    proposer: Proposer,
    rx: mpsc::Receiver<Queued>,
    limits: BatchLimits,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    run_groups(
        rx,
        limits.group(),
        slots,
        stop,
        "cell0_raft_batch_commands",
        |cmds, answers| {
            let proposer = proposer.clone();
            async move { answers.send(propose_commands(&proposer, cmds, limits.commit_timeout).await) }
        },
    )
    .await;
}

/// Proposes `cmds` as one entry (the command itself when alone, else a
/// `Command::Batch`) and waits for its applied response, one result per
/// command.
async fn propose_commands(
    proposer: &Proposer,
    mut cmds: Vec<Command>,
    timeout: Duration,
) -> Result<Vec<Result<Response>>> {
    let n = cmds.len();
    let cmd = match cmds.pop() {
        Some(only) if n == 1 => only,
        Some(last) => {
            cmds.push(last);
            Command::Batch(cmds)
        }
        None => return Ok(Vec::new()),
    };
    match propose_one(proposer, cmd, timeout).await? {
        resp if n == 1 => Ok(vec![Ok(resp)]),
        Response::Batch(parts) => Ok(parts.into_iter().map(Ok).collect()),
        Response::Rejected(reason) => Ok(vec![Ok(Response::Rejected(reason)); n]),
        other => Err(ConsensusError::Internal(format!(
            "group response does not match its commands: {other:?}"
        ))),
    }
}

/// Proposes one entry and waits for its applied response.
///
/// openraft's write future is boxed: it is about 2 KiB, and held inline it
/// made every future that awaits a write as large (the public port's
/// handlers, routing, group commit), each moved by copying on every request
/// (docs/benchmarks.md, "Forwarded writes as one unit, and smaller
/// futures"). One allocation per entry instead.
async fn propose_one(proposer: &Proposer, cmd: Command, timeout: Duration) -> Result<Response> {
    let cmd = proposer.readable(cmd);
    match tokio::time::timeout(timeout, Box::pin(proposer.raft.client_write(cmd.into()))).await {
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(e)) => Err(after_proposal(map_write_error(e))),
        Err(_) => Err(ConsensusError::Indeterminate(format!(
            "not committed within {} ms (quorum lost?)",
            timeout.as_millis()
        ))),
    }
}

/// A failure of a write that was handed to Raft. openraft answers
/// `ForwardToLeader` both when it refused the entry and when it appended it
/// and then lost leadership, and an appended entry may still commit under
/// the next leader, so neither "not leader" nor "stopped" proves the write
/// was not applied.
fn after_proposal(e: ConsensusError) -> ConsensusError {
    match e {
        ConsensusError::Unavailable { reason, .. } => {
            ConsensusError::Indeterminate(format!("{reason} (after the write was proposed)"))
        }
        ConsensusError::ShuttingDown => {
            ConsensusError::Indeterminate("the node stopped after the write was proposed".into())
        }
        other => other,
    }
}

/// Maps openraft's write errors. For membership changes (which are not
/// deduplicated) `ForwardToLeader` becomes the retryable `Unavailable`;
/// client writes pass the result through [`after_proposal`].
pub(crate) fn map_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> ConsensusError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ConsensusError::not_leader(f.leader_id, f.leader_node)
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ConsensusError::Unavailable {
            cause: UnavailableCause::MembershipChangeRefused,
            reason: format!("membership change refused: {e}"),
            leader_id: None,
            leader_addr: None,
        },
        RaftError::Fatal(openraft::error::Fatal::Stopped) => ConsensusError::ShuttingDown,
        RaftError::Fatal(f) => ConsensusError::Internal(format!("raft stopped: {f}")),
    }
}
