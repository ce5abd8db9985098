//! The simulated faults: a seeded schedule of partitions, slow links,
//! connection resets, crashes and restarts against a [`SimCluster`].
//!
//! The nemesis alternates a quiet spell (0.2 to 1.5 s) and one fault held
//! for 0.3 to 3 s, then healed, until the workload's time is up. A crash is
//! not healed with the links: the member comes back on its own storage
//! ([`SimCluster::restart`]) 0.2 to 3 s later, whatever the nemesis is
//! doing then, or (one crash in four) never. Half the crashes are power
//! losses, which lose the member's writes that were not synced; the others
//! keep them ([`Crash`]). Each fault, heal and restart is a line of the
//! timeline, with its simulated time.
//!
//! Invariants: at most a minority of the members is down at any time (one
//! of three, two of five; members crashed for good count for good), so the
//! cluster can always make progress once every link is healed; when
//! [`run`] returns, every link is healed and every member that crashed with
//! a restart due is up again.

use std::time::Duration;

use cell0_consensus::NodeId;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use tokio::time::Instant;

use crate::cluster::{Crash, SimCluster};
use crate::net::SimNet;
use crate::workload::Clock;

/// Which kinds of fault the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultMix {
    /// Cut links: the leader or a random member isolated, or a random
    /// minority cut off from the majority.
    pub partitions: bool,
    /// Slow links (an extra 20 to 300 ms one way).
    pub slow_links: bool,
    /// Reset every open connection at once.
    pub resets: bool,
    /// Crash a member (the leader or a random one), and restart it on its
    /// storage after a while, or not at all.
    pub crashes: bool,
}

impl FaultMix {
    /// Every kind of fault.
    pub const ALL: FaultMix = FaultMix {
        partitions: true,
        slow_links: true,
        resets: true,
        crashes: true,
    };

    /// No faults (the network's own latency and chunk losses remain).
    pub const NONE: FaultMix = FaultMix {
        partitions: false,
        slow_links: false,
        resets: false,
        crashes: false,
    };
}

/// One line of the timeline: when, in simulated microseconds since the
/// workload started, and what.
pub type Event = (u64, String);

#[derive(Debug, Clone, Copy)]
enum Fault {
    IsolateLeader,
    IsolateOne,
    SplitMinority,
    Slow,
    ResetAll,
    Crash,
}

/// A member that is down, to be restarted at its time.
type Restart = (Instant, NodeId);

/// What the nemesis acts on, and where it writes down what it did.
struct Nemesis<'a> {
    cluster: &'a mut SimCluster,
    clock: Clock,
    slot: u64,
    slots: u64,
    timeline: &'a mut Vec<Event>,
    /// Crashed members due back, in crash order.
    restarts: Vec<Restart>,
    /// Restarts that failed.
    problems: Vec<String>,
}

impl Nemesis<'_> {
    fn event(&mut self, what: String) {
        self.timeline.push((self.clock.now_us(), what));
    }

    /// Sleeps at least `delay`, until a millisecond of the nemesis's own,
    /// restarting on the way every member whose time has come.
    async fn sleep(&mut self, delay: Duration) {
        let end = Instant::now() + delay;
        loop {
            let next = self.restarts.iter().map(|(at, _)| *at).min();
            match next {
                Some(at) if at < end => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.clock.sleep_in_slot(wait, self.slot, self.slots).await;
                    self.restart_due(Instant::now()).await;
                }
                _ => {
                    let wait = end.saturating_duration_since(Instant::now());
                    self.clock.sleep_in_slot(wait, self.slot, self.slots).await;
                    return;
                }
            }
        }
    }

    /// Restarts every member due back by `now`, earliest first.
    async fn restart_due(&mut self, now: Instant) {
        let mut due: Vec<Restart> = self.restarts.iter().copied().filter(|(at, _)| *at <= now).collect();
        self.restarts.retain(|(at, _)| *at > now);
        due.sort();
        for (_, id) in due {
            match self.cluster.restart(id).await {
                Ok(()) => self.event(format!("restart n{id}")),
                Err(e) => {
                    self.event(format!("restart n{id} failed"));
                    self.problems.push(format!("restarting n{id}: {e}"));
                }
            }
        }
    }
}

/// Injects faults from `mix` into `cluster` until `until`, recording them in
/// `timeline`; leaves every link healed and every member that is not down
/// for good restarted. It acts only in its own milliseconds, those of actor
/// `slot` of `slots` ([`Clock::sleep_in_slot`]). Returns what went wrong
/// (restarts that failed).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    rng: &mut StdRng,
    mix: FaultMix,
    cluster: &mut SimCluster,
    net: &SimNet,
    clock: Clock,
    (slot, slots): (u64, u64),
    until: Instant,
    timeline: &mut Vec<Event>,
) -> Vec<String> {
    let ids = cluster.ids();
    let max_down = (ids.len().saturating_sub(1)) / 2;
    let mut kinds = Vec::new();
    if mix.partitions {
        kinds.extend([Fault::IsolateLeader, Fault::IsolateOne, Fault::SplitMinority]);
    }
    if mix.slow_links {
        kinds.push(Fault::Slow);
    }
    if mix.resets {
        kinds.push(Fault::ResetAll);
    }
    if mix.crashes {
        kinds.push(Fault::Crash);
    }
    let mut n = Nemesis {
        cluster,
        clock,
        slot,
        slots,
        timeline,
        restarts: Vec::new(),
        problems: Vec::new(),
    };
    loop {
        let quiet = Duration::from_millis(rng.random_range(200..1_500));
        n.sleep(quiet).await;
        if Instant::now() >= until {
            break;
        }
        let Some(&kind) = kinds.choose(rng) else {
            continue;
        };
        let hold = Duration::from_millis(rng.random_range(300..3_000));
        // Targets among the members still up (a crashed one is cut off
        // already).
        let up = n.cluster.up();
        match kind {
            Fault::IsolateLeader | Fault::IsolateOne => {
                let target = match kind {
                    Fault::IsolateLeader => n.cluster.leader(),
                    _ => up.choose(rng).copied(),
                };
                let Some(target) = target else { continue };
                for &other in &ids {
                    if other != target {
                        net.cut(target, other);
                    }
                }
                n.event(format!("isolate n{target} for {} ms", hold.as_millis()));
            }
            Fault::SplitMinority => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(rng);
                let minority: Vec<NodeId> = shuffled[..ids.len() / 2].to_vec();
                for &a in &minority {
                    for &b in &ids {
                        if !minority.contains(&b) {
                            net.cut(a, b);
                        }
                    }
                }
                n.event(format!("cut {minority:?} from the rest for {} ms", hold.as_millis()));
            }
            Fault::Slow => {
                let (Some(&a), Some(&b)) = (up.choose(rng), up.choose(rng)) else {
                    continue;
                };
                if a == b {
                    continue;
                }
                let extra = Duration::from_millis(rng.random_range(20..300));
                net.slow(a, b, extra);
                n.event(format!(
                    "slow n{a}-n{b} by {} ms for {} ms",
                    extra.as_millis(),
                    hold.as_millis()
                ));
            }
            Fault::ResetAll => {
                net.reset_all();
                n.event("reset every connection".into());
                continue;
            }
            Fault::Crash => {
                if ids.len() - up.len() >= max_down {
                    continue;
                }
                let target = if rng.random_bool(0.5) {
                    n.cluster.leader()
                } else {
                    up.choose(rng).copied()
                };
                let Some(target) = target else { continue };
                let crash = if rng.random_bool(0.5) {
                    Crash::PowerLoss
                } else {
                    Crash::Process
                };
                let what = match crash {
                    Crash::PowerLoss => "power loss",
                    Crash::Process => "process",
                };
                if rng.random_bool(0.25) {
                    n.event(format!("crash n{target} ({what}) for good"));
                } else {
                    let back_in = Duration::from_millis(rng.random_range(200..3_000));
                    n.event(format!("crash n{target} ({what}), back in {} ms", back_in.as_millis()));
                    n.restarts.push((Instant::now() + back_in, target));
                }
                n.cluster.crash_as(target, crash).await;
                continue;
            }
        }
        n.sleep(hold).await;
        net.heal_all();
        n.event("heal".into());
    }
    net.heal_all();
    // Every member due back comes back now, however long it had left.
    n.restart_due(Instant::now() + Duration::from_secs(3_600)).await;
    n.problems
}
