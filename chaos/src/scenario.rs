//! Named scenarios: which faults a run injects, and what it must find.
//!
//! A nemesis round waits [`QUIET`], injects one fault drawn (by the run's
//! seed) from the scenario's list, holds it for [`HOLD`], then heals it.
//! Faults: kill -9 and restart, SIGSTOP and SIGCONT, a graceful leave and
//! a rejoin (of any node or of the leader), and partitions in a
//! [`crate::lab::Lab`] (isolate the leader, or a random minority from the
//! majority), which need root.

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
}

impl Fault {
    /// Whether the fault needs network namespaces (root).
    pub fn needs_lab(self) -> bool {
        matches!(self, Fault::IsolateLeader | Fault::SplitMinority)
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
}

impl Scenario {
    /// Whether the scenario needs root (a partition among its faults).
    pub fn needs_root(&self) -> bool {
        self.faults.iter().any(|f| f.needs_lab())
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
    },
    Scenario {
        name: "kill",
        about: "kill -9 a random node, restart it on its data dir",
        faults: &[Fault::Kill(Target::Any)],
        failpoints: "",
        expect: Expect::Valid,
    },
    Scenario {
        name: "kill-leader",
        about: "kill -9 the leader, restart it on its data dir",
        faults: &[Fault::Kill(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
    },
    Scenario {
        name: "pause",
        about: "SIGSTOP a random node or the leader, then SIGCONT",
        faults: &[Fault::Pause(Target::Any), Fault::Pause(Target::Leader)],
        failpoints: "",
        expect: Expect::Valid,
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
    },
    Scenario {
        name: "partition-leader",
        about: "cut the leader off from the other nodes (clients still reach it), then heal",
        faults: &[Fault::IsolateLeader],
        failpoints: "",
        expect: Expect::Valid,
    },
    Scenario {
        name: "partition-minority",
        about: "cut a random minority off from the majority, then heal",
        faults: &[Fault::SplitMinority],
        failpoints: "",
        expect: Expect::Valid,
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
    },
    Scenario {
        name: "broken-reads",
        about: "nodes with the stale-reads failpoint (linearizable reads served from the local replica without \
                a read index), the leader cut off: the checker must find stale reads",
        faults: &[Fault::IsolateLeader],
        failpoints: "stale-reads",
        expect: Expect::Violation,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}
