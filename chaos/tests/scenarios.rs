//! Chaos scenarios against real `cell0` processes (the binary the
//! workspace build puts next to this test's directory), the CI subset of
//! docs/chaos.md: a kill -9 loop, a leader partition, and pauses with
//! nodes leaving and being added again keep the register linearizable and
//! lose no acknowledged write (60 s of workload each), and a deliberately
//! broken read path (the `stale-reads` failpoint) under a leader partition
//! is caught by the checker (15 s). Through the fault proxy and
//! libfaketime (no root): slow, one-way, bridged, flapping and reset links
//! and skewed clocks among kills and pauses (45 s); on tmpfs data dirs
//! (root): full disks (20 s). With the agent workload: the kill -9 loop
//! with four exec agents taking tasks while they are migrated, drained,
//! stopped and run again loses no agent and no acknowledged task, and
//! commits every result once and only from the current incarnation (40 s,
//! docs/chaos.md, "The agent workload").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use cell0_chaos::agents::AgentOptions;
use cell0_chaos::checker::Verdict;
use cell0_chaos::lab::is_root;
use cell0_chaos::run::{RunOptions, Summary, run_with_agents};
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

/// The options of a run of scenario `name` writing under `out`.
fn options(name: &str, seed: u64, seconds: u64, out: &tempfile::TempDir) -> RunOptions {
    RunOptions {
        scenario: scenario::find(name).unwrap(),
        duration: Duration::from_secs(seconds),
        seed,
        nodes: usize::from(scenario::find(name).unwrap().nodes),
        clients: 6,
        set_clients: 2,
        keys: 3,
        out: out.path().to_path_buf(),
        bin: cell0_bin(),
        check_budget: Duration::from_secs(60),
    }
}

fn run_scenario(name: &str, seed: u64, seconds: u64) -> (Summary, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let summary = run_options(options(name, seed, seconds, &out), None);
    (summary, out)
}

fn run_options(options: RunOptions, agents: Option<AgentOptions>) -> Summary {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run_with_agents(options, agents)).unwrap()
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

#[test]
fn link_faults_and_skewed_clocks_among_kills_keep_the_register_linearizable() {
    let (summary, out) = run_scenario("mixed-links", 5, 45);
    assert!(summary.faults >= 5, "{summary:#?}");
    assert_eq!(summary.linearizable, Verdict::Ok, "{summary:#?}");
    assert_eq!(summary.set_verdict, Verdict::Ok, "{summary:#?}");
    let timeline = std::fs::read_to_string(out.path().join("timeline.jsonl")).unwrap();
    let proxy_events = ["slow", "cut-from", "cut-to", "bridge", "flapping", "resets"];
    assert!(
        proxy_events
            .iter()
            .any(|e| timeline.contains(&format!("\"event\":\"{e}\""))),
        "no link fault was drawn:\n{timeline}"
    );
}

#[test]
fn a_full_disk_loses_no_acknowledged_write_and_the_node_comes_back() {
    if !is_root() {
        eprintln!("skipped: tmpfs data dirs need root");
        return;
    }
    let (summary, out) = run_scenario("disk-full", 2, 20);
    assert!(summary.faults >= 2, "{summary:#?}");
    assert_eq!(summary.linearizable, Verdict::Ok, "{summary:#?}");
    assert_eq!(summary.set_verdict, Verdict::Ok, "{summary:#?}");
    // Started on a full disk, the node stopped on its own; with the space
    // back it was started again and was ready for the final read.
    let timeline = std::fs::read_to_string(out.path().join("timeline.jsonl")).unwrap();
    assert!(timeline.contains("\"event\":\"exited\""), "{timeline}");
}

#[test]
fn killing_nodes_loses_no_agent_or_task_and_counts_only_current_incarnations() {
    let out = tempfile::tempdir().unwrap();
    // Fewer register and set clients leave the agents room on a small machine.
    let options = RunOptions {
        clients: 2,
        set_clients: 1,
        ..options("kill", 7, 40, &out)
    };
    let summary = run_options(options, Some(AgentOptions { agents: 4, model: None }));
    let a = summary.agents.as_ref().expect("the agent workload ran");
    eprintln!("{}", a.report);
    assert!(summary.faults >= 3, "{summary:#?}");
    assert_eq!(a.verdict, Verdict::Ok, "{}", a.report);
    assert_eq!(a.counts.agents, 4, "{}", a.report);
    assert!(
        a.counts.succeeded > 50 && a.counts.results_seen > 50,
        "too little work: {}",
        a.report
    );
    assert!(
        a.counts.migrations + a.counts.drains >= 1 && a.counts.incarnations > 4,
        "no agent moved: {}",
        a.report
    );
    assert_eq!(summary.linearizable, Verdict::Ok, "{summary:#?}");
    assert_eq!(summary.set_verdict, Verdict::Ok, "{summary:#?}");
    assert!(summary.passed);
    for file in ["agents-history.jsonl", "agents-final.json", "summary.json"] {
        assert!(out.path().join(file).exists(), "{file} missing");
    }
    let json = std::fs::read_to_string(out.path().join("summary.json")).unwrap();
    assert!(json.contains("\"agents\""), "{json}");
}
