//! Prompt elections (`prompt-elections`): the node whose log can win stands
//! at once instead of waiting out openraft's timers (issue #24).
//!
//! # Why
//!
//! A leader dies under write load and its followers often differ by the
//! last entry. openraft 0.9 then elects slowly when the follower with the
//! shorter log times out first:
//!
//! - the other one refuses its vote request by log and does *not* take its
//!   term (the early return in `Engine::handle_vote_req`, openraft issue
//!   #2117), so it stands only when its own timer fires, `leader_lease +
//!   election_timeout` after its last heartbeat, up to `2 x
//!   election_timeout_max`;
//! - when it does stand, it stands at the term the refused candidate already
//!   holds, and loses there on node id if the candidate's id is higher
//!   (leader ids order term, then node id): it stands again one
//!   `election_timeout` later;
//! - the refused candidate remembers the longer log it saw and adds `2 x
//!   election_timeout_max` to its next timer election, a mark it keeps until
//!   it next stands on its own timer, so it slows a later failover too.
//!
//! At the defaults that made failover p50 1.1 s and p99 3.2 s
//! (docs/benchmarks.md, "Failover").
//!
//! # What this does
//!
//! Three triggers, all through `raft.trigger().elect()`, which makes this
//! node a candidate at once at its vote's term + 1 (`Engine::elect`,
//! bypassing the election timer and its penalty):
//!
//! 1. [`Reason::RefusedShorterCandidate`] (server side): this node refused a
//!    vote request because the candidate's log is shorter than its own, at a
//!    term above its own (the term it did not take).
//! 2. [`Reason::LostToShorterLog`] (client side): this node's own vote
//!    request was refused by a rival candidate (it voted for itself, in the
//!    same or a higher term, not yet as a leader) whose log is shorter than
//!    this node's. That rival can never get this node's vote, so waiting for
//!    it only wastes an election timeout; this node stands again one term
//!    above it, where the rival grants it.
//! 3. [`Reason::Watchdog`]: no leader heard from for `2 x
//!    election_timeout_max`, the latest an unpenalised openraft timer fires,
//!    and no term change for `election_timeout_max` (no election under way):
//!    the cap on the sticky penalty. Once per leaderless stretch: after it
//!    fired, it fires again only once a leader was heard from, so on an
//!    overloaded network where elections keep failing, openraft's own timer
//!    with its back-off paces them (a CI run at load 15 showed the watchdog
//!    standing every 1.2 s for a minute, keeping terms rising).
//!
//! # Why it cannot cause election storms, nor weaken safety
//!
//! Every election is a normal openraft election (a quorum of votes, the log
//! check). One rule below also carries safety: a node never stands within
//! the leader lease (`election_timeout_max`) after it accepted a leader's
//! AppendEntries, as openraft's own timer never does. A leader serving reads
//! from its lease (`ConsensusConfig::lease_reads`, half that span after a
//! quorum acknowledged it) relies on every voter that acknowledged it
//! neither voting for another node nor standing itself for the whole span.
//! The rest is liveness: a prompt election never unseats a working leader
//! nor keeps nodes campaigning. Each trigger stands only when all of these
//! still hold after a settle time of half a heartbeat:
//!
//! - this node's leader lease ran out: it accepted no AppendEntries (or
//!   snapshot) from a leader, and was not the leader itself, for
//!   `election_timeout_max` (the span in which openraft's voters refuse all
//!   votes anyway). A node that follows a live leader never stands early;
//! - its term is still the one the trigger saw (nothing happened since; in
//!   particular no new leader, whose first AppendEntries arrives within the
//!   settle time, nor another election of this node);
//! - it is a voter and not the leader;
//! - it has not stood through this module at that term + 1 already: at most
//!   one prompt election per term.
//!
//! Triggers 1 and 2 need a rival with a strictly shorter log, which can
//! never win this node's vote: only the node with the longer log stands, so
//! two nodes never push each other's terms up. Trigger 3 fires at most once
//! per stretch without a leader.
//!
//! Invariants: this task only asks openraft to elect; it never changes a
//! vote or a log itself. It sees the member's stop signal and is joined at
//! shutdown. The failpoint `no-prompt-elections` ([`crate::failpoints`])
//! turns it off, to measure the difference.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use openraft::raft::{VoteRequest, VoteResponse};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::ConsensusConfig;
use crate::task::NamedTask;
use crate::types::{NodeId, Raft};

/// Why this node stands for election at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// It refused a candidate with a shorter log that stood at a newer term.
    RefusedShorterCandidate,
    /// Its own election was refused by a rival candidate with a shorter log.
    LostToShorterLog,
    /// No leader for `2 x election_timeout_max` and no election under way.
    Watchdog,
}

impl Reason {
    /// The `reason` label of `cell0_raft_prompt_elections_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::RefusedShorterCandidate => "refused_shorter_candidate",
            Reason::LostToShorterLog => "lost_to_shorter_log",
            Reason::Watchdog => "watchdog",
        }
    }
}

/// A trigger: stand at `term + 1` if this node is still at `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nudge {
    pub(crate) reason: Reason,
    /// The node whose vote exchange triggered it (this node for the
    /// watchdog).
    pub(crate) peer: NodeId,
    /// The term this node must still be at.
    pub(crate) term: u64,
}

/// Trigger 1: this node answered `req` with `resp`. A nudge if it refused
/// the candidate for its shorter log, at a term above this node's own.
pub(crate) fn refused_shorter_candidate(
    candidate: NodeId,
    req: &VoteRequest<NodeId>,
    resp: &VoteResponse<NodeId>,
) -> Option<Nudge> {
    let mine = resp.vote.leader_id.term;
    let refused_for_log = !resp.vote_granted && resp.last_log_id > req.last_log_id;
    (refused_for_log && req.vote.leader_id.term > mine).then_some(Nudge {
        reason: Reason::RefusedShorterCandidate,
        peer: candidate,
        term: mine,
    })
}

/// Trigger 2: this node's vote request `req` to `target` got `resp`. A
/// nudge if `target` refused it as a rival candidate (its vote for itself,
/// not committed, at `req`'s term or above) with a shorter log: openraft
/// then moves this node to that vote, so it is at `resp`'s term.
pub(crate) fn lost_to_shorter_log(
    target: NodeId,
    req: &VoteRequest<NodeId>,
    resp: &VoteResponse<NodeId>,
) -> Option<Nudge> {
    let rival = !resp.vote.committed && resp.vote.leader_id.node_id == target;
    let shorter = resp.last_log_id < req.last_log_id;
    let term = resp.vote.leader_id.term;
    (!resp.vote_granted && rival && shorter && term >= req.vote.leader_id.term).then_some(Nudge {
        reason: Reason::LostToShorterLog,
        peer: target,
        term,
    })
}

/// What the decision needs to know about this node now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    pub(crate) term: u64,
    pub(crate) leader: bool,
    pub(crate) voter: bool,
    /// Since it last accepted AppendEntries from a leader or was the leader.
    pub(crate) since_leader: Duration,
    /// The highest term it stood at through this module (0: none).
    pub(crate) prompted_term: u64,
}

/// Whether a nudge at `nudge_term` makes this node stand now, at which
/// term; or why not.
pub(crate) fn decide(facts: Facts, nudge_term: u64, lease: Duration) -> Result<u64, &'static str> {
    if facts.leader {
        return Err("this node leads");
    }
    if !facts.voter {
        return Err("this node is not a voter");
    }
    if facts.term != nudge_term {
        return Err("the term moved on");
    }
    if facts.since_leader < lease {
        return Err("a leader was heard from within the leader lease");
    }
    let target = nudge_term.saturating_add(1);
    if target <= facts.prompted_term {
        return Err("already stood promptly at this term");
    }
    Ok(target)
}

/// The timings, from the configuration.
#[derive(Debug, Clone, Copy)]
struct Timings {
    /// openraft's leader lease: `election_timeout_max`.
    lease: Duration,
    /// How long a trigger waits before it looks again: half a heartbeat.
    settle: Duration,
    /// How often the watchdog looks: half a heartbeat.
    tick: Duration,
    /// No leader for this long stands (`2 x election_timeout_max`).
    watchdog: Duration,
}

/// The side of prompt elections that the Raft service and the network see:
/// they report AppendEntries accepted and vote exchanges here; the task
/// decides.
#[derive(Debug)]
pub(crate) struct Elections {
    /// When this node last accepted AppendEntries or a snapshot from a
    /// leader, or was the leader.
    last_leader: Mutex<Instant>,
    tx: mpsc::Sender<Nudge>,
    timings: Timings,
}

/// Nudges waiting for the task; more are dropped (they are hints, and the
/// task takes at most one per term).
const QUEUE: usize = 16;

impl Elections {
    /// The shared side and the receiver its task reads.
    pub(crate) fn new(config: &ConsensusConfig) -> (Arc<Self>, mpsc::Receiver<Nudge>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let half_heartbeat = Duration::from_millis((config.heartbeat_ms / 2).max(1));
        let lease = Duration::from_millis(config.election_timeout_max_ms);
        let shared = Arc::new(Self {
            last_leader: Mutex::new(Instant::now()),
            tx,
            timings: Timings {
                lease,
                settle: half_heartbeat,
                tick: half_heartbeat,
                watchdog: lease.saturating_mul(2),
            },
        });
        (shared, rx)
    }

    /// This node accepted AppendEntries or a snapshot from a leader (or is
    /// the leader).
    pub(crate) fn heard_from_leader(&self) {
        *self.last_leader.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn since_leader(&self) -> Duration {
        self.last_leader.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }

    /// Hands `nudge` to the task (dropped if its queue is full or it ended).
    pub(crate) fn nudge(&self, nudge: Option<Nudge>) {
        if let Some(nudge) = nudge
            && !crate::failpoints::no_prompt_elections()
        {
            tracing::debug!(?nudge, "prompt election: trigger");
            let _ = self.tx.try_send(nudge);
        }
    }
}

/// Starts the task of member `id`.
pub(crate) fn spawn(id: NodeId, raft: Raft, shared: Arc<Elections>, rx: mpsc::Receiver<Nudge>) -> NamedTask {
    NamedTask::spawn("prompt-elections", move |stop| run(id, raft, shared, rx, stop))
}

/// This node's facts as its Raft metrics say now.
fn facts(id: NodeId, raft: &Raft, shared: &Elections, prompted_term: u64) -> Facts {
    let m = raft.metrics();
    let m = m.borrow();
    Facts {
        term: m.current_term,
        leader: m.state == ServerState::Leader,
        voter: m.membership_config.membership().voter_ids().any(|v| v == id),
        since_leader: shared.since_leader(),
        prompted_term,
    }
}

/// Whether the watchdog may fire again: it never fired, or a leader was
/// heard from after it last did (`since_fired` ago; the last leader
/// `since_leader` ago).
fn watchdog_rearmed(since_fired: Option<Duration>, since_leader: Duration) -> bool {
    since_fired.is_none_or(|fired| since_leader < fired)
}

async fn run(
    id: NodeId,
    raft: Raft,
    shared: Arc<Elections>,
    mut rx: mpsc::Receiver<Nudge>,
    mut stop: watch::Receiver<bool>,
) {
    let t = shared.timings;
    let mut prompted_term = 0u64;
    let mut tick = tokio::time::interval(t.tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The watchdog's view: when the term last changed, when it last fired.
    let mut term = raft.metrics().borrow().current_term;
    let mut term_since = Instant::now();
    let mut watchdog_at: Option<Instant> = None;
    loop {
        // `biased`: the order does not come from tokio's generator, so the
        // simulator's runs repeat.
        let nudge = tokio::select! {
            biased;
            _ = stop.changed() => return,
            nudge = rx.recv() => match nudge {
                Some(nudge) => nudge,
                None => return,
            },
            _ = tick.tick() => {
                let now = facts(id, &raft, &shared, prompted_term);
                if now.leader {
                    shared.heard_from_leader();
                }
                if now.term != term {
                    term = now.term;
                    term_since = Instant::now();
                }
                let quiet = term_since.elapsed() >= t.lease
                    && now.since_leader >= t.watchdog
                    && watchdog_rearmed(watchdog_at.map(|at| at.elapsed()), now.since_leader);
                if !quiet || crate::failpoints::no_prompt_elections() {
                    continue;
                }
                Nudge { reason: Reason::Watchdog, peer: id, term: now.term }
            }
        };
        if nudge.reason != Reason::Watchdog {
            // A new leader's first AppendEntries, openraft's handling of the
            // vote response: let them land before looking.
            tokio::select! {
                biased;
                _ = stop.changed() => return,
                () = tokio::time::sleep(t.settle) => {}
            }
        }
        let now = facts(id, &raft, &shared, prompted_term);
        let target = match decide(now, nudge.term, t.lease) {
            Ok(target) => target,
            Err(why) => {
                tracing::debug!(
                    reason = nudge.reason.as_str(),
                    peer = nudge.peer,
                    term = nudge.term,
                    why,
                    "prompt election: not standing"
                );
                continue;
            }
        };
        prompted_term = target;
        if nudge.reason == Reason::Watchdog {
            watchdog_at = Some(Instant::now());
        }
        tracing::info!(
            reason = nudge.reason.as_str(),
            peer = nudge.peer,
            term = target,
            since_leader_ms = u64::try_from(now.since_leader.as_millis()).unwrap_or(u64::MAX),
            "standing for election at once (prompt election)"
        );
        metrics::counter!("cell0_raft_prompt_elections_total", "reason" => nudge.reason.as_str()).increment(1);
        if let Err(e) = raft.trigger().elect().await {
            tracing::warn!(error = %e, "prompt election: raft has stopped");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn log(term: u64, leader: NodeId, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, leader), index))
    }

    fn uncommitted(term: u64, node: NodeId) -> Vote<NodeId> {
        Vote::new(term, node)
    }

    #[test]
    fn a_refusal_for_a_shorter_log_at_a_newer_term_nudges() {
        // This node (2) follows the dead leader 1 at term 5; 3 stands at 6
        // one entry behind.
        let req = VoteRequest::new(uncommitted(6, 3), log(5, 1, 9));
        let resp = VoteResponse::new(Vote::new_committed(5, 1), log(5, 1, 10), false);
        assert_eq!(
            refused_shorter_candidate(3, &req, &resp),
            Some(Nudge {
                reason: Reason::RefusedShorterCandidate,
                peer: 3,
                term: 5
            })
        );
        // Granted, an equal log, or a candidate not ahead in term: nothing.
        let granted = VoteResponse::new(uncommitted(6, 3), log(5, 1, 10), true);
        assert_eq!(refused_shorter_candidate(3, &req, &granted), None);
        let equal = VoteResponse::new(Vote::new_committed(5, 1), log(5, 1, 9), false);
        assert_eq!(refused_shorter_candidate(3, &req, &equal), None);
        let same_term = VoteResponse::new(uncommitted(6, 2), log(5, 1, 10), false);
        assert_eq!(refused_shorter_candidate(3, &req, &same_term), None);
    }

    #[test]
    fn losing_to_a_rival_with_a_shorter_log_nudges_and_nothing_else_does() {
        // This node (2) stands at 6 with the longer log; 3 stood at 6 too.
        let req = VoteRequest::new(uncommitted(6, 2), log(5, 1, 10));
        let lost = VoteResponse::new(uncommitted(6, 3), log(5, 1, 9), false);
        assert_eq!(
            lost_to_shorter_log(3, &req, &lost),
            Some(Nudge {
                reason: Reason::LostToShorterLog,
                peer: 3,
                term: 6
            })
        );
        // A rival already at a higher term: this node moves there, then stands above.
        let ahead = VoteResponse::new(uncommitted(9, 3), log(5, 1, 9), false);
        assert_eq!(lost_to_shorter_log(3, &req, &ahead).map(|n| n.term), Some(9));
        // Refused by a leader, by a node that voted for a third one, by an
        // equal or longer log, by a stale vote, or granted: nothing.
        let leader = VoteResponse::new(Vote::new_committed(6, 3), log(6, 3, 9), false);
        assert_eq!(lost_to_shorter_log(3, &req, &leader), None);
        let third = VoteResponse::new(uncommitted(6, 1), log(5, 1, 9), false);
        assert_eq!(lost_to_shorter_log(3, &req, &third), None);
        let equal = VoteResponse::new(uncommitted(6, 3), log(5, 1, 10), false);
        assert_eq!(lost_to_shorter_log(3, &req, &equal), None);
        let longer = VoteResponse::new(uncommitted(6, 3), log(6, 3, 10), false);
        assert_eq!(lost_to_shorter_log(3, &req, &longer), None);
        let stale = VoteResponse::new(uncommitted(5, 3), log(5, 1, 9), false);
        assert_eq!(lost_to_shorter_log(3, &req, &stale), None);
        let granted = VoteResponse::new(uncommitted(6, 2), log(5, 1, 9), true);
        assert_eq!(lost_to_shorter_log(3, &req, &granted), None);
    }

    #[test]
    fn the_watchdog_fires_once_per_stretch_without_a_leader() {
        let s = Duration::from_secs;
        assert!(watchdog_rearmed(None, s(5)), "never fired");
        assert!(!watchdog_rearmed(Some(s(2)), s(5)), "no leader since it fired");
        assert!(!watchdog_rearmed(Some(s(60)), s(61)), "however long ago");
        assert!(watchdog_rearmed(Some(s(5)), s(2)), "a leader was heard since");
    }

    #[test]
    fn a_node_stands_once_per_term_and_only_without_a_leader() {
        let lease = Duration::from_millis(600);
        let ok = Facts {
            term: 6,
            leader: false,
            voter: true,
            since_leader: Duration::from_millis(700),
            prompted_term: 0,
        };
        assert_eq!(decide(ok, 6, lease), Ok(7));
        assert!(decide(Facts { leader: true, ..ok }, 6, lease).is_err());
        assert!(decide(Facts { voter: false, ..ok }, 6, lease).is_err());
        assert!(decide(ok, 5, lease).is_err(), "the term moved on");
        assert!(
            decide(
                Facts {
                    since_leader: Duration::from_millis(599),
                    ..ok
                },
                6,
                lease
            )
            .is_err(),
            "a leader within its lease"
        );
        assert!(
            decide(Facts { prompted_term: 7, ..ok }, 6, lease).is_err(),
            "once per term"
        );
        assert_eq!(decide(Facts { prompted_term: 6, ..ok }, 6, lease), Ok(7));
    }
}
