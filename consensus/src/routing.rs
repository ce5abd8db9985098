//! Where a request runs: writes, read indexes and membership changes run on
//! the leader; a follower forwards them over the internal port.
//!
//! Invariants:
//! - A write carries a request id ([`crate::command::RequestId`]) that the
//!   state machine deduplicates, so it is retried with the same id after any
//!   failure until the request deadline and still applies once.
//! - A membership change (no request id) is retried only when it provably
//!   was not proposed.
//! - Once an attempt may have reached a log, the final error says the
//!   outcome is unknown (`Indeterminate`), never `Unavailable`.

use std::time::Duration;

use cell0_proto::internal::Call;
use openraft::error::{CheckIsLeaderError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::command::{Command, Response};
use crate::error::{ConsensusError, Result, UnavailableCause};
use crate::inner::{Inner, wrong_type};
use crate::network::{BASE_FORMAT, command_format, decode, encode, never_sent, readable_at};
use crate::types::{NodeId, NodeInfo};

/// Requests a follower sends to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardRequest {
    Write(Command),
    ReadIndex,
    Join {
        id: NodeId,
        info: NodeInfo,
    },
    Remove {
        id: NodeId,
    },
    /// Writes a follower queued together (see [`crate::forwarder`]).
    Writes(Vec<Command>),
}

impl ForwardRequest {
    /// The oldest message format whose receivers read this request.
    fn format(&self) -> u32 {
        match self {
            ForwardRequest::Write(cmd) => command_format(cmd),
            ForwardRequest::Writes(cmds) => cmds.iter().map(command_format).max().unwrap_or(BASE_FORMAT),
            ForwardRequest::ReadIndex | ForwardRequest::Join { .. } | ForwardRequest::Remove { .. } => BASE_FORMAT,
        }
    }

    /// This request as a leader that reads messages up to `format` reads
    /// it ([`readable_at`]).
    fn readable_at(self, format: u32) -> Self {
        match self {
            ForwardRequest::Write(cmd) => ForwardRequest::Write(readable_at(cmd, format)),
            ForwardRequest::Writes(cmds) => {
                ForwardRequest::Writes(cmds.into_iter().map(|c| readable_at(c, format)).collect())
            }
            other => other,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardResponse {
    Write(Response),
    ReadIndex(u64),
    Done,
    /// Each write's own outcome, in order.
    Writes(Vec<Result<Response>>),
}

impl ForwardResponse {
    /// Puts back the pairs the answers to `req`'s writes leave out
    /// ([`Response::put_back_written_pairs`]).
    pub(crate) fn put_back_written_pairs(&mut self, req: &ForwardRequest) {
        match (self, req) {
            (ForwardResponse::Write(answer), ForwardRequest::Write(cmd)) => answer.put_back_written_pairs(cmd),
            (ForwardResponse::Writes(answers), ForwardRequest::Writes(cmds)) => {
                for (answer, cmd) in answers.iter_mut().zip(cmds) {
                    if let Ok(answer) = answer {
                        answer.put_back_written_pairs(cmd);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Inner {
    /// Runs `req` on the leader, forwarding when this node is not it, and
    /// retries until the request deadline while [`may_retry`] allows it.
    pub(crate) async fn route(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        let deadline = Instant::now() + self.config.request_timeout();
        let mut metrics = self.raft.metrics();
        let deduplicated = matches!(req, ForwardRequest::Write(Command::Request { .. }));
        // Set once an attempt may have reached a log: the final error must
        // then say the outcome is unknown.
        let mut maybe_applied: Option<String> = None;
        loop {
            if self.batcher.is_stopped() {
                return Err(ConsensusError::ShuttingDown);
            }
            // The id alone: writes, the most of what is routed, need no
            // more of the leader's record here.
            let result = match (self.leader_id(), &req) {
                (Some(id), _) if id == self.id => self.handle_local(req.clone()).await,
                // Writes leave with the others queued on this node.
                (Some(_), ForwardRequest::Write(cmd)) => {
                    self.forwarder.submit(cmd.clone()).await.map(ForwardResponse::Write)
                }
                (Some(_), _) => match self.leader() {
                    // Boxed: rare (reads' leadership checks, membership
                    // changes), and inline it would make every write's
                    // future as large as its call.
                    Some((id, info)) if id != self.id => Box::pin(self.forward(id, &info, &req)).await,
                    // It changed meanwhile: retried like no leader.
                    _ => Err(ConsensusError::unavailable(
                        UnavailableCause::NoLeader,
                        "the leader changed while the request was routed",
                    )),
                },
                (None, _) => Err(ConsensusError::unavailable(
                    UnavailableCause::NoLeader,
                    "no leader is elected",
                )),
            };
            let error = match result {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if let ConsensusError::Indeterminate(m) = &error {
                maybe_applied = Some(m.clone());
            }
            if may_retry(&error, deduplicated) && Instant::now() < deadline {
                // Wait for news of the leader (or a short pause: a dead
                // leader stays "known" until the election timeout).
                let pause = Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
                metrics.borrow_and_update();
                let _ = tokio::time::timeout(pause, metrics.changed()).await;
                continue;
            }
            return Err(match (error, maybe_applied) {
                (ConsensusError::Unavailable { reason, .. }, Some(earlier)) => {
                    ConsensusError::Indeterminate(format!("{earlier}; then {reason}"))
                }
                (ConsensusError::Unavailable { cause, reason, .. }, None) => {
                    let leader = self.leader();
                    ConsensusError::Unavailable {
                        cause,
                        reason,
                        leader_id: leader.as_ref().map(|l| l.0),
                        leader_addr: leader.map(|l| l.1.public_addr),
                    }
                }
                (other, _) => other,
            });
        }
    }

    async fn forward(&self, leader: NodeId, info: &NodeInfo, req: &ForwardRequest) -> Result<ForwardResponse> {
        // Until the leader's replies say it reads the newest commands, it
        // gets what its build applies.
        let leader_reads = self.health.reads_format(leader);
        let older;
        let req = if req.format() > leader_reads {
            older = req.clone().readable_at(leader_reads);
            &older
        } else {
            req
        };
        let mut msg = encode(req)?;
        msg.format = req.format();
        let stamped = self.identity.stamp(msg, leader);
        let timeout = self.config.rpc_timeout();
        let streamed = self
            .pool
            .exchange(&info.internal_addr, Call::Forward, &stamped, timeout)
            .await;
        let reply = match streamed {
            Some(reply) => reply,
            None => {
                let mut client = self.pool.client(&info.internal_addr)?;
                let mut request = tonic::Request::new(stamped);
                request.set_timeout(timeout);
                client.forward(request).await.map(tonic::Response::into_inner)
            }
        };
        match reply {
            Ok(reply) => {
                self.health.record_format(leader, &reply);
                decode::<Result<ForwardResponse>>(&reply)?
            }
            Err(status) => {
                let idempotent = !matches!(req, ForwardRequest::Write(_) | ForwardRequest::Writes(_));
                if idempotent || never_sent(&status) {
                    Err(ConsensusError::Unavailable {
                        cause: UnavailableCause::LeaderUnreachable,
                        reason: format!("leader {leader} unreachable: {}", status.message()),
                        leader_id: Some(leader),
                        leader_addr: Some(info.public_addr.clone()),
                    })
                } else {
                    Err(ConsensusError::Indeterminate(format!(
                        "lost contact with leader {leader} after sending the write: {}",
                        status.message()
                    )))
                }
            }
        }
    }
}

/// Whether a failed attempt may be sent again. `Unavailable` proves the
/// request was not applied (no leader, or it was refused before proposing).
/// `Indeterminate` (the request may be in a log) allows a retry only for a
/// deduplicated write: the state machine applies its request id once.
pub(crate) fn may_retry(error: &ConsensusError, deduplicated: bool) -> bool {
    match error {
        ConsensusError::Unavailable { .. } => true,
        ConsensusError::Indeterminate(_) => deduplicated,
        _ => false,
    }
}

impl Inner {
    /// Sends writes queued together to the leader (the forwarder's one
    /// request), or applies them here if this node leads by now.
    pub(crate) async fn forward_writes(&self, cmds: Vec<Command>) -> Result<Vec<Result<Response>>> {
        let req = ForwardRequest::Writes(cmds);
        let reply = match self.leader() {
            Some((id, _)) if id == self.id => self.handle_local(req).await?,
            Some((id, info)) => self.forward(id, &info, &req).await?,
            None => {
                return Err(ConsensusError::unavailable(
                    UnavailableCause::NoLeader,
                    "no leader is elected",
                ));
            }
        };
        match reply {
            ForwardResponse::Writes(results) => Ok(results),
            _ => Err(wrong_type()),
        }
    }

    /// Serves a request that must run on the leader, without forwarding.
    pub(crate) async fn handle_local(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        match req {
            ForwardRequest::Write(cmd) => {
                cmd.validate(&self.limits)?;
                if !self.is_leader() {
                    return Err(ConsensusError::not_leader(None, None));
                }
                Ok(ForwardResponse::Write(self.batcher.submit(cmd).await?))
            }
            ForwardRequest::Writes(cmds) => {
                if !self.is_leader() {
                    return Err(ConsensusError::not_leader(None, None));
                }
                // Each checked on its own; the valid ones go to group
                // commit as one unit, so they share one entry.
                let checked: Vec<Result<()>> = cmds
                    .iter()
                    .map(|cmd| cmd.validate(&self.limits).map_err(ConsensusError::from))
                    .collect();
                let valid = cmds
                    .into_iter()
                    .zip(&checked)
                    .filter(|(_, c)| c.is_ok())
                    .map(|(cmd, _)| cmd);
                let mut answered = self.batcher.submit_many(valid.collect()).await.into_iter();
                let results = checked
                    .into_iter()
                    .map(|c| {
                        c.and_then(|()| {
                            answered.next().unwrap_or_else(|| {
                                Err(ConsensusError::Internal(
                                    "group commit left a forwarded write unanswered".into(),
                                ))
                            })
                        })
                    })
                    .collect();
                Ok(ForwardResponse::Writes(results))
            }
            // Boxed, like a write's proposal (`batcher::propose_one`).
            ForwardRequest::ReadIndex => match Box::pin(self.raft.get_read_log_id()).await {
                Ok((read, _)) => Ok(ForwardResponse::ReadIndex(read.map_or(0, |l| l.index))),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(ConsensusError::not_leader(f.leader_id, f.leader_node))
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => Err(ConsensusError::unavailable(
                    UnavailableCause::NoQuorum,
                    format!("leadership not confirmed by a quorum: {e}"),
                )),
                Err(RaftError::Fatal(_)) => Err(ConsensusError::ShuttingDown),
            },
            // Membership changes, rare: boxed so that their large futures
            // do not size every write's.
            ForwardRequest::Join { id, info } => Box::pin(self.join_local(id, info)).await,
            ForwardRequest::Remove { id } => Box::pin(self.remove_local(id)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_provably_unapplied_or_deduplicated_requests_are_retried() {
        let unavailable = ConsensusError::unavailable(UnavailableCause::NoLeader, "no leader");
        let unknown = ConsensusError::Indeterminate("lost the leader".into());
        assert!(may_retry(&unavailable, false));
        assert!(may_retry(&unavailable, true));
        assert!(!may_retry(&unknown, false), "a membership change may be in a log");
        assert!(may_retry(&unknown, true), "a request id makes a retry safe");
        assert!(!may_retry(&ConsensusError::invalid("key", "bad"), true));
        assert!(!may_retry(&ConsensusError::ShuttingDown, true));
    }

    #[test]
    fn an_older_followers_answers_get_each_writes_pair_back_in_order() {
        let put = |k: &str| Command::PutWithoutPrev {
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
        };
        let answer = |rev| Response::Put {
            kv: crate::KeyValue {
                key: Vec::new(),
                value: Vec::new(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
            },
            prev: None,
        };
        let req = ForwardRequest::Writes(vec![put("a"), put("b"), put("c")]);
        let mut reply = ForwardResponse::Writes(vec![
            Ok(answer(1)),
            Err(ConsensusError::invalid("key", "bad")),
            Ok(answer(2)),
        ]);
        reply.put_back_written_pairs(&req);
        let ForwardResponse::Writes(answers) = reply else {
            panic!()
        };
        let keys: Vec<Option<(Vec<u8>, u64)>> = answers
            .into_iter()
            .map(|a| match a {
                Ok(Response::Put { kv, .. }) => Some((kv.key, kv.mod_revision)),
                _ => None,
            })
            .collect();
        assert_eq!(keys, vec![Some((b"a".to_vec(), 1)), None, Some((b"c".to_vec(), 2))]);
    }
}
