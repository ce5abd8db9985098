//! Membership decisions, made one at a time on the leader.
//!
//! Invariants:
//! - A node is admitted only when its advertised internal address answers
//!   `Identify` with its own id (and no other cluster's id), no other member
//!   uses its addresses, and it does not mix loopback with other hosts.
//! - A learner is promoted to voter only when it is reachable and within
//!   [`MAX_PROMOTION_LAG`] entries of the leader; joining is idempotent on
//!   the node's state.
//! - A voter is removed only when the voters left keep a reachable quorum
//!   (etcd's strict reconfiguration check), so no change is proposed that
//!   could never commit.
//! - A voter is removed in two steps, voter to learner, then out, so a
//!   reachable one hears it no longer votes and never campaigns after.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::{ChangeMembers, ServerState};

use crate::batcher::map_write_error;
use crate::command::{Command, RequestId, Response};
use crate::error::{ConsensusError, PreconditionCause, Result, UnavailableCause};
use crate::inner::{Inner, random_u64, wrong_type};
use crate::network::identify;
use crate::routing::ForwardResponse;
use crate::types::{NodeId, NodeInfo};

/// How far behind the leader's last log index a learner may be and still be
/// promoted to voter. A further one would stall commits while it catches up.
pub const MAX_PROMOTION_LAG: u64 = 1_000;

/// How long the removal of a reachable voter waits for it to hear that it
/// became a learner before it is removed.
const DEMOTION_WAIT: Duration = Duration::from_secs(2);

/// Whether `addr` (host:port) names the local host.
pub(crate) fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses addresses that another member already uses, and a loopback
/// address in a membership that spans hosts (or the reverse): such a member
/// would be reached at the wrong process.
pub(crate) fn check_addresses<'a>(
    others: impl IntoIterator<Item = (&'a NodeId, &'a NodeInfo)>,
    id: NodeId,
    info: &NodeInfo,
) -> Result<()> {
    let joiner_loopback = is_loopback(&info.internal_addr);
    for (other_id, other) in others {
        if *other_id == id {
            continue;
        }
        if other.internal_addr == info.internal_addr {
            return Err(ConsensusError::invalid(
                "internal_addr",
                format!("{} is already the address of node {other_id:016x}", info.internal_addr),
            ));
        }
        if other.public_addr == info.public_addr {
            return Err(ConsensusError::invalid(
                "public_addr",
                format!("{} is already the address of node {other_id:016x}", info.public_addr),
            ));
        }
        if is_loopback(&other.internal_addr) != joiner_loopback {
            return Err(ConsensusError::invalid(
                "internal_addr",
                format!(
                    "{} is {} but node {other_id:016x} advertises {}: in a cluster that spans hosts every node must advertise an address the others can reach (set advertise.internal)",
                    info.internal_addr,
                    if joiner_loopback {
                        "a loopback address"
                    } else {
                        "not a loopback address"
                    },
                    other.internal_addr
                ),
            ));
        }
    }
    Ok(())
}

impl Inner {
    /// Whether `peer` is this node or answered within the election timeout.
    pub(crate) fn reachable(&self, peer: NodeId) -> bool {
        peer == self.id
            || self
                .health
                .reached_within(peer, Duration::from_millis(self.config.election_timeout_max_ms))
    }

    /// Records a cluster id if the cluster has none yet (a cluster formed by
    /// an older version). Leader only.
    async fn ensure_cluster_id(&self) -> Result<()> {
        if self.identity.cluster_id() != 0 {
            return Ok(());
        }
        let cluster_id = random_u64(self.id ^ 0x5eed);
        let id = RequestId {
            client: self.client_id,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        let cmd = Command::Request {
            id,
            cmd: Box::new(Command::InitCluster { cluster_id }),
        };
        match self.batcher.submit(cmd).await? {
            Response::ClusterId(_) => Ok(()),
            _ => Err(wrong_type()),
        }
    }

    /// Checks that `info.internal_addr` reaches node `id` of no other cluster.
    async fn verify_address(&self, id: NodeId, info: &NodeInfo) -> Result<()> {
        let answer = identify(&self.pool, &info.internal_addr, id, self.config.rpc_timeout())
            .await
            .map_err(|s| {
                ConsensusError::unavailable(
                    UnavailableCause::NodeUnreachable,
                    format!(
                        "node {id:016x} cannot be reached at its internal address {}: {}",
                        info.internal_addr,
                        s.message()
                    ),
                )
            })?;
        if answer.node_id != id {
            return Err(ConsensusError::invalid(
                "internal_addr",
                format!(
                    "{} reaches node {:016x}, not the joining node {id:016x}; advertise an internal address the other nodes reach this node at",
                    info.internal_addr, answer.node_id
                ),
            ));
        }
        let ours = self.identity.cluster_id();
        if answer.cluster_id != 0 && ours != 0 && answer.cluster_id != ours {
            return Err(ConsensusError::refused(
                PreconditionCause::OtherCluster,
                format!(
                    "node {id:016x} belongs to another cluster ({:016x}); start it with an empty data dir to join this one",
                    answer.cluster_id
                ),
            ));
        }
        Ok(())
    }

    /// Waits until learner `id` is reachable and within
    /// [`MAX_PROMOTION_LAG`] entries of the leader's log, up to the request
    /// timeout.
    async fn wait_caught_up(&self, id: NodeId) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout();
        let mut rx = self.raft.metrics();
        loop {
            let (matched, last) = {
                let m = rx.borrow_and_update();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map_or(0, |l| l.index);
                (matched, m.last_log_index.unwrap_or(0))
            };
            if self.reachable(id) && matched + MAX_PROMOTION_LAG >= last {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let (cause, state) = if self.reachable(id) {
                    (PreconditionCause::LearnerBehind, "is reachable")
                } else {
                    (PreconditionCause::UnreachableLearner, "does not answer")
                };
                return Err(ConsensusError::refused(
                    cause,
                    format!(
                        "learner {id:016x} is not ready to vote: it {state} and has {matched} of {last} log entries; it stays a learner, join again once it is up"
                    ),
                ));
            }
            let pause = Duration::from_millis(50);
            let _ = tokio::time::timeout(pause, rx.changed()).await;
        }
    }

    pub(crate) async fn join_local(&self, id: NodeId, info: NodeInfo) -> Result<ForwardResponse> {
        let _decision = self.membership.lock().await;
        if !self.is_leader() {
            return Err(ConsensusError::not_leader(None, None));
        }
        self.ensure_cluster_id().await?;
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        check_addresses(membership.nodes(), id, &info)?;
        match membership.get_node(&id) {
            Some(existing) if *existing == info => {}
            Some(_) => {
                self.verify_address(id, &info).await?;
                tracing::info!(node = id, %info, "updating member addresses");
                self.raft
                    .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, info.clone())])), false)
                    .await
                    .map_err(map_write_error)?;
            }
            None => {
                self.verify_address(id, &info).await?;
                tracing::info!(node = id, %info, "adding learner");
                self.raft
                    .add_learner(id, info.clone(), true)
                    .await
                    .map_err(map_write_error)?;
            }
        }
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if !voters.contains(&id) && voters.len() < self.config.voters {
            self.wait_caught_up(id).await?;
            tracing::info!(node = id, "promoting learner to voter");
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(map_write_error)?;
        }
        Ok(ForwardResponse::Done)
    }

    pub(crate) async fn remove_local(&self, id: NodeId) -> Result<ForwardResponse> {
        let _decision = self.membership.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Err(ConsensusError::not_leader(None, None));
        }
        let membership = metrics.membership_config.membership().clone();
        if membership.get_node(&id).is_none() {
            return Err(ConsensusError::NotFound(format!("node {id:016x} is not a member")));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ConsensusError::invalid(
                    "node_id",
                    "is the last voter; it cannot be removed",
                ));
            }
            let remaining: Vec<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
            let healthy = remaining.iter().filter(|v| self.reachable(**v)).count();
            let quorum = remaining.len() / 2 + 1;
            if healthy < quorum {
                return Err(ConsensusError::refused(
                    PreconditionCause::QuorumAtRisk,
                    format!(
                        "removing node {id:016x} would leave {healthy} reachable voters of {}, fewer than the quorum of {quorum} the change needs to commit; bring the unreachable voters back first",
                        remaining.len()
                    ),
                ));
            }
            // First a learner: it hears that it no longer votes while the
            // leader still replicates to it, so once cut off it never
            // campaigns (a removed voter that missed its removal would
            // keep calling elections and never learn it left).
            let demoted = self
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), true)
                .await
                .map_err(map_write_error)?;
            tracing::info!(node = id, "removed voter is now a learner");
            self.wait_matched(id, demoted.log_id.index, DEMOTION_WAIT).await;
            if !self.is_leader() {
                // The leader demoted itself: the next one removes it (the
                // caller's retry finds a learner).
                return Err(ConsensusError::not_leader(None, None));
            }
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(map_write_error)?;
        tracing::info!(node = id, "removed member");
        Ok(ForwardResponse::Done)
    }

    /// Waits until `id` holds log index `index`, for at most `limit`, and
    /// only while it is reachable: best effort, for a change it should hear.
    async fn wait_matched(&self, id: NodeId, index: u64, limit: Duration) {
        if id == self.id {
            return;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = self.raft.metrics();
        while self.reachable(id) && tokio::time::Instant::now() < deadline {
            let matched = rx
                .borrow_and_update()
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map_or(0, |l| l.index);
            if matched >= index {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(addr: &str, public: &str) -> NodeInfo {
        NodeInfo {
            name: "n".into(),
            site: "s".into(),
            public_addr: public.into(),
            internal_addr: addr.into(),
        }
    }

    #[test]
    fn loopback_and_duplicate_addresses_are_refused() {
        assert!(is_loopback("127.0.0.1:7101"));
        assert!(is_loopback("127.0.0.2:7101"));
        assert!(is_loopback("localhost:7101"));
        assert!(is_loopback("[::1]:7101"));
        assert!(!is_loopback("10.0.0.5:7101"));
        assert!(!is_loopback("node-a.example:7101"));

        let hosts = BTreeMap::from([(1, info("10.0.0.1:7101", "10.0.0.1:7100"))]);
        let err = check_addresses(&hosts, 2, &info("127.0.0.1:7101", "10.0.0.2:7100")).unwrap_err();
        assert!(err.to_string().contains("internal_addr"), "{err}");
        let err = check_addresses(&hosts, 2, &info("10.0.0.1:7101", "10.0.0.2:7100")).unwrap_err();
        assert!(
            err.to_string().contains("already the address of node 0000000000000001"),
            "{err}"
        );
        check_addresses(&hosts, 2, &info("10.0.0.2:7101", "10.0.0.2:7100")).unwrap();
        // A member updating its own record is not a duplicate of itself.
        check_addresses(&hosts, 1, &info("10.0.0.1:7101", "10.0.0.1:7100")).unwrap();

        let local = BTreeMap::from([(1, info("127.0.0.1:7101", "127.0.0.1:7100"))]);
        check_addresses(&local, 2, &info("127.0.0.2:7101", "127.0.0.2:7100")).unwrap();
        assert!(check_addresses(&local, 2, &info("10.0.0.2:7101", "10.0.0.2:7100")).is_err());
    }
}
