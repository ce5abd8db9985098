//! The membership table: what this node knows of every other node, from
//! their heartbeats and its own failure detector. Pure logic over an
//! injected clock (milliseconds).
//!
//! A member is
//! - **dead** when this node's own detector says so (phi at or above
//!   `dead_phi`);
//! - **suspect** when its own detector says so, or when a member that is
//!   itself alive reports suspecting it at its current incarnation;
//! - **alive** otherwise.
//!
//! Invariants:
//! - A heartbeat with a lower incarnation than the one known is stale (it
//!   was relayed late) and changes nothing.
//! - A suspicion only counts for the incarnation it names: a heartbeat with
//!   a higher incarnation clears every suspicion of the old one. When this
//!   node hears itself suspected at its own incarnation, it raises its
//!   incarnation above the suspected one (refutation), and its next
//!   heartbeat carries the new one.
//! - Events come out only on changes (a member heard first, its state or
//!   its advertised fields changing), never once per heartbeat.
//! - Members are kept in a `BTreeMap`, so every listing is in id order.

use std::collections::BTreeMap;

use crate::detector::{DetectorConfig, Liveness, PhiDetector};
use crate::heartbeat::{Heartbeat, Limits, Suspicion};

/// The state of a member, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberState {
    /// Heard recently, suspected by no live member.
    Alive,
    /// Silent for longer than usual, or suspected by a live member.
    Suspect,
    /// Silent for so long that it is taken for dead.
    Dead,
}

impl MemberState {
    /// Lower-case name, as shown by `cell0 members`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Dead => "dead",
        }
    }
}

/// Why a member's state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A heartbeat was heard.
    Heard,
    /// The member was silent (this node's own detector).
    Silent,
    /// Another member reported suspecting it.
    Reported,
    /// A higher incarnation refuted a suspicion.
    Refuted,
}

/// A change in the membership table.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    /// A member was heard for the first time (or again after it was
    /// forgotten).
    Joined(Box<Heartbeat>),
    /// A member advertises other fields than before (addresses, version,
    /// cluster id, name, site).
    Updated(Box<Heartbeat>),
    /// A member's state changed.
    StateChanged {
        /// The member.
        node_id: u64,
        /// Its state before.
        from: MemberState,
        /// Its state now.
        to: MemberState,
        /// Why.
        reason: Reason,
    },
    /// This node heard itself suspected and raised its incarnation.
    Refuted {
        /// The new incarnation.
        incarnation: u64,
    },
}

/// What this node knows of one member.
#[derive(Debug, Clone)]
pub struct MemberView {
    /// The member's latest heartbeat.
    pub heartbeat: Heartbeat,
    /// Its state.
    pub state: MemberState,
    /// When it was last heard (this node's clock, ms).
    pub last_heard_ms: u64,
    /// The detector's suspicion level now.
    pub phi: f64,
}

#[derive(Debug, Clone)]
struct Entry {
    heartbeat: Heartbeat,
    detector: PhiDetector,
    state: MemberState,
    /// Members that report suspecting this one, with the incarnation.
    reported_by: BTreeMap<u64, u64>,
}

/// The membership table of one node.
#[derive(Debug, Clone)]
pub struct Members {
    local_id: u64,
    incarnation: u64,
    config: DetectorConfig,
    members: BTreeMap<u64, Entry>,
}

impl Members {
    /// An empty table for node `local_id`.
    pub fn new(local_id: u64, config: DetectorConfig) -> Self {
        Self {
            local_id,
            incarnation: 0,
            config,
            members: BTreeMap::new(),
        }
    }

    /// This node's current incarnation (for its own heartbeats).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Takes in `hb`, heard at `now_ms`.
    pub fn observe(&mut self, hb: Heartbeat, now_ms: u64) -> Vec<MembershipEvent> {
        let mut events = Vec::new();
        if hb.node_id == self.local_id {
            return events;
        }
        if let Some(s) = hb.suspects.iter().find(|s| s.node_id == self.local_id)
            && s.incarnation >= self.incarnation
        {
            self.incarnation = s.incarnation + 1;
            events.push(MembershipEvent::Refuted {
                incarnation: self.incarnation,
            });
        }
        let reporter = hb.node_id;
        let suspects = hb.suspects.clone();
        match self.members.get_mut(&hb.node_id) {
            None => {
                let mut detector = PhiDetector::new(self.config);
                detector.heartbeat(now_ms);
                events.push(MembershipEvent::Joined(Box::new(hb.clone())));
                self.members.insert(
                    hb.node_id,
                    Entry {
                        heartbeat: hb,
                        detector,
                        state: MemberState::Alive,
                        reported_by: BTreeMap::new(),
                    },
                );
            }
            Some(entry) => {
                if hb.incarnation < entry.heartbeat.incarnation {
                    return events;
                }
                if hb.incarnation > entry.heartbeat.incarnation {
                    entry.reported_by.retain(|_, inc| *inc >= hb.incarnation);
                }
                if entry.state == MemberState::Dead {
                    // Back from the dead: its silence says nothing of its rhythm.
                    entry.detector = PhiDetector::new(self.config);
                }
                entry.detector.heartbeat(now_ms);
                if advertised_fields_differ(&entry.heartbeat, &hb) {
                    events.push(MembershipEvent::Updated(Box::new(hb.clone())));
                }
                entry.heartbeat = hb;
            }
        }
        // The reporter's current suspicions replace its earlier ones.
        for (id, entry) in &mut self.members {
            if *id == reporter {
                continue;
            }
            match suspects.iter().find(|s| s.node_id == *id) {
                Some(s) if s.incarnation >= entry.heartbeat.incarnation => {
                    entry.reported_by.insert(reporter, s.incarnation);
                }
                _ => {
                    entry.reported_by.remove(&reporter);
                }
            }
        }
        self.evaluate(now_ms, Reason::Heard, &mut events);
        events
    }

    /// Re-evaluates every member at `now_ms` (call about every 100 ms).
    pub fn tick(&mut self, now_ms: u64) -> Vec<MembershipEvent> {
        let mut events = Vec::new();
        self.evaluate(now_ms, Reason::Silent, &mut events);
        events
    }

    /// The members this node's own detector doubts, for its heartbeat: at
    /// most [`Limits::MAX_SUSPECTS`], lowest ids first.
    pub fn suspects(&self, now_ms: u64) -> Vec<Suspicion> {
        self.members
            .iter()
            .filter(|(_, e)| e.detector.liveness(now_ms) != Liveness::Alive)
            .take(Limits::MAX_SUSPECTS)
            .map(|(id, e)| Suspicion {
                node_id: *id,
                incarnation: e.heartbeat.incarnation,
            })
            .collect()
    }

    /// Every member known, in id order.
    pub fn members(&self, now_ms: u64) -> Vec<MemberView> {
        self.members
            .values()
            .map(|e| MemberView {
                heartbeat: e.heartbeat.clone(),
                state: e.state,
                last_heard_ms: e.detector.last_heard_ms().unwrap_or(0),
                phi: e.detector.phi(now_ms),
            })
            .collect()
    }

    /// One member, if known.
    pub fn get(&self, node_id: u64) -> Option<(&Heartbeat, MemberState)> {
        self.members.get(&node_id).map(|e| (&e.heartbeat, e.state))
    }

    /// Forgets `node_id` (it left the cluster); heard again, it joins again.
    pub fn forget(&mut self, node_id: u64) {
        self.members.remove(&node_id);
        for entry in self.members.values_mut() {
            entry.reported_by.remove(&node_id);
        }
    }

    /// Recomputes every state; `heard` names the reason for a change that
    /// is not due to silence or reports.
    fn evaluate(&mut self, now_ms: u64, heard: Reason, events: &mut Vec<MembershipEvent>) {
        let alive_reporters: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, e)| e.state == MemberState::Alive)
            .map(|(id, _)| *id)
            .collect();
        for (id, entry) in &mut self.members {
            let own = entry.detector.liveness(now_ms);
            let reported = entry
                .reported_by
                .iter()
                .any(|(by, inc)| *inc >= entry.heartbeat.incarnation && alive_reporters.binary_search(by).is_ok());
            let (state, reason) = match own {
                Liveness::Dead => (MemberState::Dead, Reason::Silent),
                Liveness::Suspect => (MemberState::Suspect, Reason::Silent),
                Liveness::Alive if reported => (MemberState::Suspect, Reason::Reported),
                Liveness::Alive if entry.state == MemberState::Suspect && heard == Reason::Heard => {
                    (MemberState::Alive, Reason::Refuted)
                }
                Liveness::Alive => (MemberState::Alive, heard),
            };
            if state != entry.state {
                events.push(MembershipEvent::StateChanged {
                    node_id: *id,
                    from: entry.state,
                    to: state,
                    reason,
                });
                entry.state = state;
            }
        }
    }
}

/// Whether `b` advertises anything other than `a` beyond its liveness data
/// (incarnation, load and suspicions change all the time).
fn advertised_fields_differ(a: &Heartbeat, b: &Heartbeat) -> bool {
    a.peer_id != b.peer_id
        || a.name != b.name
        || a.site != b.site
        || a.cluster_id != b.cluster_id
        || a.addresses != b.addresses
        || a.version != b.version
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::tests::heartbeat;

    fn state(m: &Members, id: u64) -> MemberState {
        m.get(id).unwrap().1
    }

    #[test]
    fn a_member_heard_joins_once_and_dies_when_silent() {
        let mut m = Members::new(1, DetectorConfig::default());
        let events = m.observe(heartbeat(2, 0), 0);
        assert!(matches!(&events[..], [MembershipEvent::Joined(hb)] if hb.node_id == 2));
        let mut t = 0;
        for _ in 0..20 {
            t += 1_000;
            assert!(m.observe(heartbeat(2, 0), t).is_empty(), "a steady beat is no event");
        }
        // Silence: suspect, then dead, each reported once.
        let mut changes = Vec::new();
        for step in 1..=50 {
            changes.extend(m.tick(t + step * 100));
        }
        assert_eq!(
            changes,
            vec![
                MembershipEvent::StateChanged {
                    node_id: 2,
                    from: MemberState::Alive,
                    to: MemberState::Suspect,
                    reason: Reason::Silent
                },
                MembershipEvent::StateChanged {
                    node_id: 2,
                    from: MemberState::Suspect,
                    to: MemberState::Dead,
                    reason: Reason::Silent
                },
            ]
        );
        // Heard again: alive, with a fresh rhythm.
        let events = m.observe(heartbeat(2, 0), t + 10_000);
        assert!(events.iter().any(|e| matches!(
            e,
            MembershipEvent::StateChanged {
                to: MemberState::Alive,
                ..
            }
        )));
        assert_eq!(m.suspects(t + 10_500), vec![]);
    }

    #[test]
    fn own_heartbeats_and_stale_ones_change_nothing() {
        let mut m = Members::new(1, DetectorConfig::default());
        assert!(m.observe(heartbeat(1, 0), 0).is_empty());
        assert!(m.get(1).is_none());
        m.observe(heartbeat(2, 5), 0);
        let mut stale = heartbeat(2, 4);
        stale.version = "0.0.9".into();
        assert!(m.observe(stale, 100).is_empty());
        assert_eq!(m.get(2).unwrap().0.version, "0.1.0");
    }

    #[test]
    fn hearing_itself_suspected_raises_the_incarnation() {
        let mut m = Members::new(1, DetectorConfig::default());
        let mut hb = heartbeat(2, 0);
        hb.suspects.push(Suspicion {
            node_id: 1,
            incarnation: 0,
        });
        let events = m.observe(hb.clone(), 0);
        assert!(events.contains(&MembershipEvent::Refuted { incarnation: 1 }));
        assert_eq!(m.incarnation(), 1);
        // The same (now old) suspicion again refutes nothing more.
        let events = m.observe(hb, 1_000);
        assert!(!events.iter().any(|e| matches!(e, MembershipEvent::Refuted { .. })));
        assert_eq!(m.incarnation(), 1);
    }

    #[test]
    fn a_reported_suspicion_holds_until_a_higher_incarnation_refutes_it() {
        let mut m = Members::new(1, DetectorConfig::default());
        m.observe(heartbeat(2, 0), 0);
        m.observe(heartbeat(3, 0), 0);
        // Node 3 suspects node 2 at incarnation 0.
        let mut from3 = heartbeat(3, 0);
        from3.suspects.push(Suspicion {
            node_id: 2,
            incarnation: 0,
        });
        let events = m.observe(from3.clone(), 500);
        assert!(events.contains(&MembershipEvent::StateChanged {
            node_id: 2,
            from: MemberState::Alive,
            to: MemberState::Suspect,
            reason: Reason::Reported
        }));
        // Node 2 refutes with incarnation 1: alive again, and node 3's old
        // suspicion no longer counts.
        let events = m.observe(heartbeat(2, 1), 900);
        assert!(events.contains(&MembershipEvent::StateChanged {
            node_id: 2,
            from: MemberState::Suspect,
            to: MemberState::Alive,
            reason: Reason::Refuted
        }));
        m.observe(from3, 1_000);
        assert_eq!(state(&m, 2), MemberState::Alive);
    }

    #[test]
    fn suspicions_from_a_dead_member_do_not_count() {
        let mut m = Members::new(1, DetectorConfig::default());
        m.observe(heartbeat(2, 0), 0);
        let mut from3 = heartbeat(3, 0);
        from3.suspects.push(Suspicion {
            node_id: 2,
            incarnation: 0,
        });
        m.observe(from3, 0);
        assert_eq!(state(&m, 2), MemberState::Suspect);
        // Node 2 keeps beating, node 3 goes silent and dies: its suspicion
        // of node 2 is dropped.
        let mut t = 0;
        while state(&m, 3) != MemberState::Dead {
            t += 500;
            assert!(t < 20_000, "node 3 never died");
            m.observe(heartbeat(2, 0), t);
            m.tick(t);
        }
        m.tick(t);
        assert_eq!(state(&m, 2), MemberState::Alive);
    }

    #[test]
    fn updated_fields_are_an_event_and_forgotten_members_join_again() {
        let mut m = Members::new(1, DetectorConfig::default());
        m.observe(heartbeat(2, 0), 0);
        let mut moved = heartbeat(2, 0);
        moved.addresses.public = "10.0.0.2:7100".into();
        let events = m.observe(moved, 1_000);
        assert!(matches!(&events[..], [MembershipEvent::Updated(hb)] if hb.addresses.public == "10.0.0.2:7100"));
        m.forget(2);
        assert!(m.get(2).is_none());
        assert!(matches!(
            &m.observe(heartbeat(2, 0), 2_000)[..],
            [MembershipEvent::Joined(_)]
        ));
    }

    #[test]
    fn the_heartbeat_carries_what_the_own_detector_doubts() {
        let mut m = Members::new(1, DetectorConfig::default());
        m.observe(heartbeat(2, 3), 0);
        m.observe(heartbeat(3, 0), 0);
        for t in (1_000..=10_000).step_by(1_000) {
            m.observe(heartbeat(3, 0), t);
        }
        assert_eq!(
            m.suspects(10_000),
            vec![Suspicion {
                node_id: 2,
                incarnation: 3
            }]
        );
    }
}
