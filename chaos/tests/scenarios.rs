//! Chaos scenarios against real `cell0` processes (the binary the
//! workspace build puts next to this test's directory), the CI subset of
//! docs/chaos.md: a kill -9 loop, a leader partition, and pauses with
//! nodes leaving and being added again keep the register linearizable and
//! lose no acknowledged write (60 s of workload each), and a deliberately
//! broken read path (the `stale-reads` failpoint) under a leader partition
//! is caught by the checker (15 s).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use cell0_chaos::checker::Verdict;
use cell0_chaos::lab::is_root;
use cell0_chaos::run::{RunOptions, Summary, run};
use cell0_chaos::scenario;

/// The `cell0` binary of this build (target/<profile>/cell0).
fn cell0_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir.join("cell0");
    assert!(
        bin.exists(),
        "no cell0 binary at {}: build the workspace first",
        bin.display()
    );
    bin
}

fn run_scenario(name: &str, seed: u64, seconds: u64) -> (Summary, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let options = RunOptions {
        scenario: scenario::find(name).unwrap(),
        duration: Duration::from_secs(seconds),
        seed,
        nodes: 3,
        clients: 6,
        set_clients: 2,
        keys: 3,
        out: out.path().to_path_buf(),
        bin: cell0_bin(),
        check_budget: Duration::from_secs(60),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let summary = runtime.block_on(run(options)).unwrap();
    (summary, out)
}

#[test]
fn killing_nodes_keeps_the_register_linearizable_and_every_acknowledged_write() {
    let (summary, out) = run_scenario("kill", 7, 60);
    assert!(summary.faults >= 5, "{summary:#?}");
    assert!(
        summary.register.ok > 100 && summary.set.ok > 50,
        "too little work: {summary:#?}"
    );
    assert_eq!(summary.linearizable, Verdict::Ok, "{summary:#?}");
    assert_eq!(summary.set_verdict, Verdict::Ok, "{summary:#?}");
    assert!(summary.passed);
    for file in ["history.jsonl", "set-history.jsonl", "timeline.jsonl", "summary.json"] {
        assert!(out.path().join(file).exists(), "{file} missing");
    }
}

#[test]
fn a_broken_read_path_is_caught_under_a_leader_partition() {
    if !is_root() {
        eprintln!("skipped: partitions need root (network namespaces)");
        return;
    }
    let (summary, _out) = run_scenario("broken-reads", 11, 15);
    assert!(summary.faults >= 1, "{summary:#?}");
    assert_eq!(
        summary.linearizable,
        Verdict::Invalid,
        "the stale reads went unnoticed: {summary:#?}"
    );
    assert!(summary.passed);
}

#[test]
fn the_same_partition_without_the_failpoint_stays_linearizable() {
    if !is_root() {
        eprintln!("skipped: partitions need root (network namespaces)");
        return;
    }
    let (summary, _out) = run_scenario("partition-leader", 11, 60);
    assert!(summary.faults >= 5, "{summary:#?}");
    assert_eq!(summary.linearizable, Verdict::Ok, "{summary:#?}");
    assert_eq!(summary.set_verdict, Verdict::Ok, "{summary:#?}");
}

#[test]
fn pauses_and_nodes_leaving_and_rejoining_keep_the_register_linearizable() {
    let (summary, _out) = run_scenario("pause-membership", 3, 60);
    assert!(summary.faults >= 5, "{summary:#?}");
    assert_eq!(summary.linearizable, Verdict::Ok, "{summary:#?}");
    assert_eq!(summary.set_verdict, Verdict::Ok, "{summary:#?}");
}
