//! Deterministic simulation (docs/chaos.md, "Simulation"): 200 seeds of a
//! three-member cluster under partitions, slow links, connection resets,
//! crashes and restarts, each checked for linearizability, lost acknowledged
//! writes, agreeing replicas and the scheduler's placements
//! (`cell0_sim::scheduling::check`), in eight tests of 25 seeds (so that the test runner
//! spreads them over the cores); the seeds beyond them that once failed;
//! a member of an older build; and a seed run twice fingerprints the same.
//!
//! A failing seed prints itself and how to rerun it: `CELL0_SIM_SEED=<seed>`
//! runs only that seed (in every test of this file) and prints its outcome;
//! `CELL0_SIM_SEEDS=<first>..<end>` runs another range instead of the CI's;
//! `CELL0_SIM_OUT=<dir>` writes each run's history, set history and
//! timeline under `<dir>/seed-<seed>-<hash>/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::Range;
use std::path::Path;

use cell0_sim::nemesis::FaultMix;
use cell0_sim::{SimConfig, SimOutcome, run_seed};

fn run(seed: u64, config: &SimConfig) -> SimOutcome {
    let outcome = run_seed(seed, config).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    if let Ok(dir) = std::env::var("CELL0_SIM_OUT") {
        let dir = Path::new(&dir).join(format!("seed-{seed}-{:016x}", outcome.hash));
        std::fs::create_dir_all(&dir).unwrap();
        cell0_chaos::history::write(&dir.join("history.jsonl"), &outcome.history).unwrap();
        cell0_chaos::history::write(&dir.join("set-history.jsonl"), &outcome.set_history).unwrap();
        let timeline: Vec<String> = outcome.timeline.iter().map(|(us, e)| format!("{us} {e}")).collect();
        std::fs::write(dir.join("timeline.txt"), timeline.join("\n")).unwrap();
    }
    outcome
}

/// The seeds the environment asks for, if it does.
fn env_seeds() -> Option<Range<u64>> {
    if let Ok(s) = std::env::var("CELL0_SIM_SEED") {
        let seed: u64 = s.parse().expect("CELL0_SIM_SEED is a number");
        return Some(seed..seed + 1);
    }
    let s = std::env::var("CELL0_SIM_SEEDS").ok()?;
    let (a, b) = s.split_once("..").expect("CELL0_SIM_SEEDS is <first>..<end>");
    Some(a.parse().unwrap()..b.parse().unwrap())
}

/// Runs `seeds` (or the environment's), panicking with the first failing
/// seed's outcome and how to rerun it.
fn run_seeds(seeds: Range<u64>) {
    let config = SimConfig::default();
    let seeds = env_seeds().unwrap_or(seeds);
    let single = seeds.end - seeds.start == 1;
    for seed in seeds {
        let outcome = run(seed, &config);
        if single {
            eprintln!("{outcome}");
        }
        assert!(
            outcome.passed(),
            "simulation seed {seed} failed:\n{outcome}\nrerun it alone: CELL0_SIM_SEED={seed} cargo nextest run --workspace -E 'package(cell0-sim)' --no-capture"
        );
    }
}

#[test]
fn seeds_000_to_024() {
    run_seeds(0..25);
}

#[test]
fn seeds_025_to_049() {
    run_seeds(25..50);
}

#[test]
fn seeds_050_to_074() {
    run_seeds(50..75);
}

#[test]
fn seeds_075_to_099() {
    run_seeds(75..100);
}

#[test]
fn seeds_100_to_124() {
    run_seeds(100..125);
}

#[test]
fn seeds_125_to_149() {
    run_seeds(125..150);
}

#[test]
fn seeds_150_to_174() {
    run_seeds(150..175);
}

#[test]
fn seeds_175_to_199() {
    run_seeds(175..200);
}

/// Seeds outside the ranges above that once failed, with what they found:
/// 720, a new leader's scheduler placed two agents again for a generation
/// its predecessor's plan had placed (its replica had not applied that
/// plan yet; rounds now read linearizably and propose only in their term);
/// 263, a leader that restarted before any other member stood led again
/// from its stored vote, and its read index missed a write it had
/// acknowledged (a restarted leader now leads again only through an
/// election); 364, a leader restarted as a follower stood at a higher term
/// before the leader elected meanwhile reached it, and unseated that leader
/// (it now waits as long as any restarted member before it stands).
const ONCE_FAILED: &[u64] = &[263, 364, 720];

#[test]
fn seeds_that_once_failed() {
    let config = SimConfig::default();
    for &seed in ONCE_FAILED {
        let outcome = run(seed, &config);
        assert!(outcome.passed(), "simulation seed {seed} failed:\n{outcome}");
    }
}

/// A member of a build from before `Exchange` streams (half of the seeds
/// have one): its peers' streams to it are refused, they send it unary
/// calls, and the run passes every check. The first such seed of the CI's
/// range, without faults so that it reruns the same.
#[test]
fn a_member_without_exchange_streams_is_sent_unary_calls() {
    let config = SimConfig {
        faults: FaultMix::NONE,
        ..SimConfig::default()
    };
    let outcome = (0..20)
        .map(|seed| run(seed, &config))
        .find(|outcome| outcome.older_build.is_some())
        .expect("a seed among the first 20 has a member of an older build");
    assert!(outcome.passed(), "{outcome}");
    let older = outcome.older_build.unwrap();
    assert!(
        older.refused_streams > 0,
        "no stream was tried with member {}: {outcome}",
        older.member
    );
}

/// Without injected faults (the network's latency and chunk losses remain)
/// a run is a function of its seed: the same history, timeline and final
/// state twice. Under partitions and crashes most seeds rerun identically
/// too, but not all: see "Simulation" in docs/chaos.md.
#[test]
fn a_seed_reruns_identically() {
    let config = SimConfig {
        faults: FaultMix::NONE,
        ..SimConfig::default()
    };
    let seeds = env_seeds().unwrap_or(0..3);
    for seed in seeds {
        let first = run(seed, &config);
        let second = run(seed, &config);
        assert!(first.passed(), "{first}");
        assert_eq!(
            first.hash, second.hash,
            "seed {seed} ran differently twice:\n{first}{second}"
        );
        assert_eq!(first.history, second.history);
    }
}
