//! Named scenarios: which faults a run injects, and what it must find.
//!
//! A nemesis round waits [`QUIET`], injects one fault drawn (by the run's
//! seed) from the scenario's list, holds it for [`HOLD`], then heals it.
//! Faults: kill -9 and restart, SIGSTOP and SIGCONT, a graceful leave and
//! a rejoin (of any node or of the leader), and partitions in a
//! [`crate::lab::Lab`] (isolate the leader, or a random minority from the
//! majority), which need root. Through the harness's fault proxy
//! ([`crate::proxy`], no root): slow links (delay, jitter, bandwidth),
//! one-way cuts to or from the leader, bridge and ring partitions, a
//! flapping partition, and connection resets. With libfaketime: a node's
//! wall clock skewed by up to two minutes either way. On tmpfs data dirs
//! (root): a node's disk filled to the last byte.
//!
//! Invariant: a scenario's faults use the lab or the proxy, never both
//! (the proxy's traffic would bypass the lab's cuts).

use std::time::Duration;

/// How long the cluster runs unharmed between faults.
pub const QUIET: Duration = Duration::from_secs(2);

/// How long a fault lasts.
pub const HOLD: Duration = Duration::from_secs(4);

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Any node, drawn by the seed.
    Any,
    /// The current leader.
    Leader,
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then start again on the same data dir.
    Kill(Target),
    /// SIGSTOP, then SIGCONT.
    Pause(Target),
    /// Cut the leader off from every other node (clients still reach it).
    IsolateLeader,
    /// Cut a random minority off from the majority.
    SplitMinority,
    /// `cell0 node leave`, stop the node, then start it again with its
    /// join list, so it is added again (a membership change each way).
    LeaveRejoin(Target),
    /// Every link to and from the node delayed by 50 ms plus up to 50 ms
    /// of jitter, at most 1 MB/s each way (proxy).
    SlowNode(Target),
    /// The leader's requests to every other node are lost; theirs to it
    /// still pass (proxy).
    CutFromLeader,
    /// Every other node's requests to the leader are lost; the leader's to
    /// them still pass (proxy).
    CutToLeader,
    /// Two halves that reach each other only through one bridge node
    /// (proxy).
    Bridge,
    /// Each node reaches only its two neighbours on a ring (proxy; with
    /// fewer than 5 nodes this is no partition).
    Ring,
    /// The leader cut off and healed again every 200 to 800 ms (proxy).
    Flapping,
    /// Every connection between nodes reset every 300 ms (proxy).
    ResetLinks,
    /// The node's wall clock 5 to 120 s ahead or behind (libfaketime).
    SkewClock(Target),
    /// The node's data dir (a tmpfs) filled to the last byte (root); half
    /// way through, the node is killed and started on the full disk; a node
    /// that exited is started again once the space is back.
    FillDisk(Target),
}

/// What a fault needs from the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing beyond processes.
    Processes,
    /// Network namespaces (root).
    Lab,
    /// The fault proxy.
    Proxy,
    /// libfaketime.
    Faketime,
    /// A tmpfs data dir per node (root).
    Disk,
}

impl Fault {
    /// What the fault needs.
    pub fn needs(self) -> Needs {
        match self {
            Fault::Kill(_) | Fault::Pause(_) | Fault::LeaveRejoin(_) => Needs::Processes,
            Fault::IsolateLeader | Fault::SplitMinority => Needs::Lab,
            Fault::SlowNode(_)
            | Fault::CutFromLeader
            | Fault::CutToLeader
            | Fault::Bridge
            | Fault::Ring
            | Fault::Flapping
            | Fault::ResetLinks => Needs::Proxy,
            Fault::SkewClock(_) => Needs::Faketime,
            Fault::FillDisk(_) => Needs::Disk,
        }
    }

    /// Whether the fault needs network namespaces (root).
    pub fn needs_lab(self) -> bool {
        self.needs() == Needs::Lab
    }
}

/// What a run of the scenario must conclude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Every checker finds the history valid.
    Valid,
    /// The linearizability checker finds a violation (a deliberately
    /// broken node).
    Violation,
}

/// A named scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name (`cell0-chaos run --scenario NAME`).
    pub name: &'static str,
    /// What it does, in words.
    pub about: &'static str,
    /// The faults drawn from.
    pub faults: &'static [Fault],
    /// `CELL0_FAILPOINTS` for the nodes (empty: none).
    pub failpoints: &'static str,
    /// What the run must conclude.
    pub expect: Expect,
    /// Nodes in its cluster, unless the run asks for another number.
    pub nodes: u8,
}

impl Scenario {
    /// Whether the scenario needs `needs` for one of its faults.
    pub fn needs(&self, needs: Needs) -> bool {
        self.faults.iter().any(|f| f.needs() == needs)
    }

    /// Whether the scenario needs root (network namespaces or tmpfs
    /// mounts).
    pub fn needs_root(&self) -> bool {
        self.needs(Needs::Lab) || self.needs(Needs::Disk)
    }
}

/// Every scenario, in the order `cell0-chaos list` shows them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "none",
        about: "no faults: the workloads alone (a baseline)",
        faults: &[],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "kill",
        about: "kill -9 a random node, restart it on its data dir",
        faults: &[Fault::Kill(Target::Any)],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "kill-leader",
        about: "kill -9 the leader, restart it on its data dir",
        faults: &[Fault::Kill(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "pause",
        about: "SIGSTOP a random node or the leader, then SIGCONT",
        faults: &[Fault::Pause(Target::Any), Fault::Pause(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "pause-membership",
        about: "SIGSTOP and SIGCONT, and nodes (the leader too) leaving the cluster and being added again",
        faults: &[
            Fault::Pause(Target::Any),
            Fault::Pause(Target::Leader),
            Fault::LeaveRejoin(Target::Any),
            Fault::LeaveRejoin(Target::Leader),
        ],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "partition-leader",
        about: "cut the leader off from the other nodes (clients still reach it), then heal",
        faults: &[Fault::IsolateLeader],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "partition-minority",
        about: "cut a random minority off from the majority, then heal",
        faults: &[Fault::SplitMinority],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "mixed",
        about: "all of the above, drawn at random",
        faults: &[
            Fault::Kill(Target::Any),
            Fault::Kill(Target::Leader),
            Fault::Pause(Target::Any),
            Fault::Pause(Target::Leader),
            Fault::IsolateLeader,
            Fault::SplitMinority,
            Fault::LeaveRejoin(Target::Any),
        ],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "slow-links",
        about: "every link of a random node or of the leader delayed 50-100 ms and held to 1 MB/s, then healed",
        faults: &[Fault::SlowNode(Target::Any), Fault::SlowNode(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "one-way",
        about: "the leader's requests to the others lost (theirs pass), or theirs to it lost (its pass)",
        faults: &[Fault::CutFromLeader, Fault::CutToLeader],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "bridge-ring",
        about: "5 nodes: two halves joined by one bridge node, or a ring where each node reaches only its \
                neighbours",
        faults: &[Fault::Bridge, Fault::Ring],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 5,
    },
    Scenario {
        name: "flapping",
        about: "the leader cut off and healed every 200-800 ms, and every connection between nodes reset \
                every 300 ms",
        faults: &[Fault::Flapping, Fault::ResetLinks],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "clock-skew",
        about: "a random node's or the leader's wall clock 5-120 s ahead or behind (libfaketime)",
        faults: &[Fault::SkewClock(Target::Any), Fault::SkewClock(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "disk-full",
        about: "a random node's or the leader's data dir (a tmpfs) filled to the last byte, then freed",
        faults: &[Fault::FillDisk(Target::Any), Fault::FillDisk(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "mixed-links",
        about: "kill -9, pause, leave and rejoin, slow and one-way links, bridges, flapping, resets and \
                clock skew, drawn at random (no root needed)",
        faults: &[
            Fault::Kill(Target::Any),
            Fault::Kill(Target::Leader),
            Fault::Pause(Target::Leader),
            Fault::LeaveRejoin(Target::Any),
            Fault::SlowNode(Target::Leader),
            Fault::CutFromLeader,
            Fault::CutToLeader,
            Fault::Bridge,
            Fault::Flapping,
            Fault::ResetLinks,
            Fault::SkewClock(Target::Any),
        ],
        failpoints: "",
        expect: Expect::Valid,
        nodes: 3,
    },
    Scenario {
        name: "broken-reads",
        about: "nodes with the stale-reads failpoint (linearizable reads served from the local replica without \
                a read index), the leader cut off: the checker must find stale reads",
        faults: &[Fault::IsolateLeader],
        failpoints: "stale-reads",
        expect: Expect::Violation,
        nodes: 3,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_scenario_needs_both_the_lab_and_the_proxy() {
        for s in SCENARIOS {
            assert!(
                !(s.needs(Needs::Lab) && s.needs(Needs::Proxy)),
                "{} needs both the lab and the proxy",
                s.name
            );
        }
    }

    #[test]
    fn scenario_names_are_unique_and_found() {
        for s in SCENARIOS {
            assert_eq!(find(s.name).map(|f| f.name), Some(s.name));
        }
        let mut names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
    }
}
