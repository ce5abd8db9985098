//! The simulated faults: a seeded schedule of partitions, slow links,
//! connection resets and crashes against a [`SimCluster`].
//!
//! The nemesis alternates a quiet spell (0.2 to 1.5 s) and one fault held
//! for 0.3 to 3 s, then healed, until the workload's time is up. Each
//! fault and heal is a line of the timeline, with its simulated time.
//!
//! Invariant: crashes are permanent and at most a minority of the members
//! ever crash (one of three, two of five), so the cluster can always make
//! progress once every link is healed.

use std::time::Duration;

use cell0_consensus::NodeId;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use tokio::time::Instant;

use crate::cluster::SimCluster;
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
    /// Crash a member (the leader or a random one) for good.
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

/// Injects faults from `mix` into `cluster` until `until`, recording them in
/// `timeline`; leaves every link healed. It acts only in its own
/// milliseconds, those of actor `slot` of `slots` ([`Clock::sleep_in_slot`]).
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
) {
    let ids = cluster.ids();
    let max_crashes = (ids.len().saturating_sub(1)) / 2;
    let mut crashed = 0usize;
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
    loop {
        let quiet = Duration::from_millis(rng.random_range(200..1_500));
        clock.sleep_in_slot(quiet, slot, slots).await;
        if Instant::now() >= until {
            break;
        }
        let Some(&kind) = kinds.choose(rng) else {
            continue;
        };
        let hold = Duration::from_millis(rng.random_range(300..3_000));
        // Targets among the members still up (a crashed one is cut off
        // already).
        let up = cluster.up();
        let mut event = |what: String| timeline.push((clock.now_us(), what));
        match kind {
            Fault::IsolateLeader | Fault::IsolateOne => {
                let target = match kind {
                    Fault::IsolateLeader => cluster.leader(),
                    _ => up.choose(rng).copied(),
                };
                let Some(target) = target else { continue };
                for &other in &ids {
                    if other != target {
                        net.cut(target, other);
                    }
                }
                event(format!("isolate n{target} for {} ms", hold.as_millis()));
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
                event(format!("cut {minority:?} from the rest for {} ms", hold.as_millis()));
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
                event(format!(
                    "slow n{a}-n{b} by {} ms for {} ms",
                    extra.as_millis(),
                    hold.as_millis()
                ));
            }
            Fault::ResetAll => {
                net.reset_all();
                event("reset every connection".into());
                continue;
            }
            Fault::Crash => {
                if crashed >= max_crashes {
                    continue;
                }
                let target = if rng.random_bool(0.5) {
                    cluster.leader()
                } else {
                    up.choose(rng).copied()
                };
                let Some(target) = target else { continue };
                event(format!("crash n{target}"));
                cluster.crash(target).await;
                crashed += 1;
                continue;
            }
        }
        clock.sleep_in_slot(hold, slot, slots).await;
        net.heal_all();
        timeline.push((clock.now_us(), "heal".into()));
    }
    net.heal_all();
}
