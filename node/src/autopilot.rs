//! Autopilot: on the Raft leader, keeps `raft.voters` voters by removing
//! voters that gossip has seen dead for `autopilot.dead_voter_cleanup_ms`
//! and promoting healthy learners, and records what the leader's gossip
//! says of each node in the replicated state (`nodes::NodeLiveness`, which
//! `cell0 members` shows and placement respects).
//!
//! [`plan`] and [`verdicts`] are the policy, pure over the membership,
//! gossip's view and the recorded liveness; [`run`] is the worker that
//! applies them once a second through the same membership calls an
//! operator uses (`Consensus::remove`, and `Consensus::join` for a
//! learner, which promotes it when the cluster is short of voters and it
//! is caught up) and through leader-only proposals for the verdicts.
//!
//! Invariants:
//! - Only the leader acts; one change per round, so each is logged, counted
//!   and visible before the next.
//! - A voter is removed only when gossip has seen it dead for the cleanup
//!   time and the voters left that gossip hears alive (the leader counts)
//!   form a quorum of the voters left; `Consensus::remove` checks the same
//!   against Raft's own view and refuses a change that could not commit.
//! - A member gossip has not heard is never acted on: no news is not death.
//! - Learners are promoted only while gossip hears them alive.
//! - Verdicts are proposed only in the term of the leader that reached
//!   them (`Consensus::propose_as_leader`), so a node cut off from the
//!   majority never records the majority down: it cannot commit, and its
//!   verdict never reaches the next leader. A verdict changes only on a
//!   transition (alive to dead or back); suspicion records nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cell0_consensus::nodes::{Liveness, NodeCommand, NodeLiveness};
use cell0_consensus::{Consensus, Consistency, Member, NodeId, Role, nodes};
use cell0_gossip::MemberState;
use tokio::sync::watch;

use crate::gossip::GossipView;
use crate::scheduling::now_ms;
use crate::supervisor::stopped;

/// How often the leader looks.
const ROUND: Duration = Duration::from_secs(1);

/// What gossip says of one member, for [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Its gossip state.
    pub state: MemberState,
    /// Milliseconds since gossip last heard it.
    pub silent_ms: u64,
}

/// One membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Remove a voter that has been dead for the cleanup time.
    RemoveDeadVoter(NodeId),
    /// Promote a healthy learner to voter.
    PromoteLearner(NodeId),
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Self::RemoveDeadVoter(_) => "remove_dead_voter",
            Self::PromoteLearner(_) => "promote_learner",
        }
    }
}

/// The next change for leader `leader`, if any: members as Raft knows them,
/// `health` as gossip knows them, `target` voters wanted.
pub fn plan(
    leader: NodeId,
    members: &[Member],
    health: &BTreeMap<NodeId, Health>,
    target: usize,
    cleanup_ms: u64,
) -> Option<Action> {
    let alive = |id: NodeId| id == leader || health.get(&id).is_some_and(|h| h.state == MemberState::Alive);
    let voters: Vec<NodeId> = members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    let dead_voter = voters.iter().copied().find(|id| {
        *id != leader
            && health
                .get(id)
                .is_some_and(|h| h.state == MemberState::Dead && h.silent_ms >= cleanup_ms)
    });
    if let Some(dead) = dead_voter {
        let left: Vec<NodeId> = voters.iter().copied().filter(|v| *v != dead).collect();
        let quorum = left.len() / 2 + 1;
        if left.iter().filter(|v| alive(**v)).count() >= quorum {
            return Some(Action::RemoveDeadVoter(dead));
        }
    }
    if voters.len() < target {
        return members
            .iter()
            .filter(|m| !m.voter && alive(m.id))
            .map(|m| m.id)
            .min()
            .map(Action::PromoteLearner);
    }
    None
}

/// A verdict for the leader to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The node.
    pub node: NodeId,
    /// What gossip says of it.
    pub liveness: Liveness,
    /// Why, in words.
    pub reason: String,
}

/// The verdicts leader `leader` should record for the nodes with a record
/// (`records`), given `health` from its gossip and what is `recorded`: a
/// node gossip hears dead and not recorded dead, or recorded dead and
/// heard alive again (the leader itself is alive). Suspect or unheard
/// nodes get none.
pub fn verdicts(
    leader: NodeId,
    records: &BTreeSet<NodeId>,
    health: &BTreeMap<NodeId, Health>,
    recorded: &BTreeMap<NodeId, NodeLiveness>,
) -> Vec<Verdict> {
    let is_dead = |id: &NodeId| recorded.get(id).is_some_and(|l| l.liveness == Liveness::Dead);
    records
        .iter()
        .filter_map(|id| {
            let verdict = |liveness, reason: String| Verdict {
                node: *id,
                liveness,
                reason,
            };
            if *id == leader {
                return is_dead(id).then(|| verdict(Liveness::Alive, "leads the cluster".into()));
            }
            let h = health.get(id)?;
            match h.state {
                MemberState::Dead if !is_dead(id) => Some(verdict(
                    Liveness::Dead,
                    format!("the leader's gossip has not heard it for {} ms", h.silent_ms),
                )),
                MemberState::Alive if is_dead(id) => {
                    Some(verdict(Liveness::Alive, "the leader's gossip hears it again".into()))
                }
                _ => None,
            }
        })
        .collect()
}

/// Records the verdicts this leader (in `term`) reaches now.
async fn record_verdicts(
    consensus: &Consensus,
    term: u64,
    health: &BTreeMap<NodeId, Health>,
) -> cell0_consensus::Result<()> {
    let (records, recorded) = consensus
        .read(Consistency::Serializable, |txn| {
            Ok((
                nodes::resources(txn)?.into_keys().collect::<BTreeSet<_>>(),
                nodes::liveness(txn)?,
            ))
        })
        .await?;
    for v in verdicts(consensus.id(), &records, health, &recorded) {
        let label = match v.liveness {
            Liveness::Dead => {
                tracing::warn!(node = %format!("{:016x}", v.node), reason = %v.reason, "autopilot: recording a node dead");
                "record_dead"
            }
            Liveness::Alive => {
                tracing::info!(node = %format!("{:016x}", v.node), reason = %v.reason, "autopilot: recording a node alive again");
                "record_alive"
            }
        };
        let command = NodeCommand::SetLiveness {
            node: v.node,
            liveness: NodeLiveness {
                liveness: v.liveness,
                reason: v.reason,
                since_ms: now_ms(),
            },
        };
        let result = consensus.propose_as_leader(command.into_command(), term).await;
        let outcome = if result.is_ok() { "done" } else { "failed" };
        metrics::counter!("cell0_autopilot_actions_total", "action" => label, "result" => outcome).increment(1);
        result?;
    }
    Ok(())
}

/// Runs autopilot until `stop`.
pub async fn run(
    consensus: Consensus,
    gossip: GossipView,
    target: usize,
    cleanup: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            _ = round.tick() => {}
        }
        let status = consensus.status();
        if status.role != Role::Leader {
            continue;
        }
        let health: BTreeMap<NodeId, Health> = gossip
            .members()
            .into_iter()
            .map(|m| {
                (
                    m.heartbeat.node_id,
                    Health {
                        state: m.state,
                        silent_ms: m.last_heard_ms_ago,
                    },
                )
            })
            .collect();
        if let Err(e) = record_verdicts(&consensus, status.term, &health).await {
            tracing::warn!(error = %e, "autopilot: cannot record liveness; will look again");
        }
        let members = consensus.members();
        let Some(action) = plan(consensus.id(), &members, &health, target, cleanup.as_millis() as u64) else {
            continue;
        };
        let result = match action {
            Action::RemoveDeadVoter(id) => {
                tracing::warn!(node = %format!("{id:016x}"), silent_ms = health.get(&id).map_or(0, |h| h.silent_ms), "autopilot: removing a voter gossip has seen dead");
                consensus.remove(id).await
            }
            Action::PromoteLearner(id) => {
                tracing::info!(node = %format!("{id:016x}"), "autopilot: promoting a healthy learner to keep the voter count");
                match members.iter().find(|m| m.id == id) {
                    Some(m) => consensus.join(id, m.info.clone()).await.map(|_| ()),
                    None => Ok(()),
                }
            }
        };
        let outcome = match &result {
            Ok(()) => "done",
            Err(e) => {
                tracing::warn!(action = action.label(), error = %e, "autopilot: change refused or failed; will look again");
                "failed"
            }
        };
        metrics::counter!("cell0_autopilot_actions_total", "action" => action.label(), "result" => outcome)
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use cell0_consensus::NodeInfo;

    use super::*;

    fn member(id: NodeId, voter: bool) -> Member {
        Member {
            id,
            info: NodeInfo {
                name: format!("n{id}"),
                site: "s".into(),
                public_addr: format!("127.0.0.{id}:7100"),
                internal_addr: format!("127.0.0.{id}:7101"),
            },
            voter,
            leader: id == 1,
            matched_index: 0,
            reachable: true,
        }
    }

    fn health(entries: &[(NodeId, MemberState, u64)]) -> BTreeMap<NodeId, Health> {
        entries
            .iter()
            .map(|&(id, state, silent_ms)| (id, Health { state, silent_ms }))
            .collect()
    }

    const CLEANUP: u64 = 30_000;

    fn recorded(entries: &[(NodeId, Liveness)]) -> BTreeMap<NodeId, NodeLiveness> {
        entries
            .iter()
            .map(|&(id, liveness)| {
                (
                    id,
                    NodeLiveness {
                        liveness,
                        reason: String::new(),
                        since_ms: 0,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn verdicts_change_only_on_transitions_and_never_on_no_news() {
        use MemberState::*;
        let records: BTreeSet<NodeId> = [1, 2, 3, 4, 5].into();
        let h = health(&[(2, Dead, 9_000), (3, Suspect, 4_000), (4, Alive, 10), (5, Dead, 9_000)]);
        // 5 is already recorded dead; 1 (the leader) and unheard nodes get
        // nothing; a suspect is not dead.
        let v = verdicts(1, &records, &h, &recorded(&[(5, Liveness::Dead), (4, Liveness::Alive)]));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].node, v[0].liveness), (2, Liveness::Dead));
        assert!(v[0].reason.contains("9000 ms"), "{}", v[0].reason);
        // Heard again: alive; the leader recorded dead by an earlier leader
        // is alive.
        let h = health(&[(2, Alive, 10)]);
        let v = verdicts(1, &records, &h, &recorded(&[(1, Liveness::Dead), (2, Liveness::Dead)]));
        let got: Vec<(NodeId, Liveness)> = v.iter().map(|v| (v.node, v.liveness)).collect();
        assert_eq!(got, vec![(1, Liveness::Alive), (2, Liveness::Alive)]);
        // Only nodes with a record.
        let h = health(&[(9, Dead, 9_000)]);
        assert!(verdicts(1, &records, &h, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_voter_dead_long_enough_is_removed_then_a_learner_promoted() {
        use MemberState::*;
        let members = [member(1, true), member(2, true), member(3, true), member(4, false)];
        let h = health(&[(2, Alive, 100), (3, Dead, CLEANUP), (4, Alive, 100)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), Some(Action::RemoveDeadVoter(3)));
        // Dead, but not for long enough: nothing yet.
        let h = health(&[(2, Alive, 100), (3, Dead, CLEANUP - 1), (4, Alive, 100)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), None);
        // After the removal the cluster is short of a voter.
        let members = [member(1, true), member(2, true), member(4, false)];
        let h = health(&[(2, Alive, 100), (4, Alive, 100)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), Some(Action::PromoteLearner(4)));
    }

    #[test]
    fn never_a_change_that_could_lose_quorum_or_acts_on_no_news() {
        use MemberState::*;
        // Two of three voters dead: removing one would leave one alive of two.
        let members = [member(1, true), member(2, true), member(3, true)];
        let h = health(&[(2, Dead, CLEANUP), (3, Dead, CLEANUP)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), None);
        // A voter gossip never heard is not dead.
        let h = health(&[(2, Alive, 100)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), None);
        // The leader never removes itself, whatever gossip says.
        let h = health(&[(1, Dead, CLEANUP), (2, Alive, 1), (3, Alive, 1)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), None);
        // Suspect or unheard learners are not promoted.
        let members = [member(1, true), member(2, true), member(4, false), member(5, false)];
        let h = health(&[(2, Alive, 100), (4, Suspect, 3_000)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), None);
        // Enough voters: nothing to do.
        let members = [member(1, true), member(2, true), member(3, true), member(4, false)];
        let h = health(&[(2, Alive, 1), (3, Alive, 1), (4, Alive, 1)]);
        assert_eq!(plan(1, &members, &h, 3, CLEANUP), None);
    }
}
