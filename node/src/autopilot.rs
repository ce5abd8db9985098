//! Autopilot: on the Raft leader, keeps `raft.voters` voters by removing
//! voters that gossip has seen dead for `autopilot.dead_voter_cleanup_ms`
//! and promoting healthy learners.
//!
//! [`plan`] is the policy, pure over the membership and gossip's view;
//! [`run`] is the worker that applies it once a second through the same
//! membership calls an operator uses (`Consensus::remove`, and
//! `Consensus::join` for a learner, which promotes it when the cluster is
//! short of voters and it is caught up).
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

use std::collections::BTreeMap;
use std::time::Duration;

use cell0_consensus::{Consensus, Member, NodeId, Role};
use cell0_gossip::MemberState;
use tokio::sync::watch;

use crate::gossip::GossipView;
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
        if consensus.status().role != Role::Leader {
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
