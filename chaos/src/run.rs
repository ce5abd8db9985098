//! One chaos run: start a cluster of real processes, run the register and
//! set workloads while the scenario's nemesis injects faults, heal, read
//! the set back, check the history, and write the history, the timeline
//! of faults and a summary.
//!
//! Invariants: the same seed draws the same faults, targets and client
//! choices (the timing, and so the history, still depends on the
//! machine); every process and namespace of the run is gone when it
//! returns, also on error; a run's verdict is `unknown`, never `ok`, when
//! a checker ran out of time.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use crate::checker::{self, Verdict};
use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::history::{self, HistoryError, Op, OpKind, Status};
use crate::lab::{Lab, LabError};
use crate::scenario::{Expect, Fault, HOLD, QUIET, Scenario, Target};
use crate::workload::{self, Clock, RegisterClient, SET_PREFIX};

/// What a run needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario.
    pub scenario: &'static Scenario,
    /// How long the workloads run.
    pub duration: Duration,
    /// Draws the faults, their targets and the clients' choices.
    pub seed: u64,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Register clients.
    pub clients: u32,
    /// Set clients.
    pub set_clients: u32,
    /// Register keys.
    pub keys: u32,
    /// Where the history, timeline, summary and node files go.
    pub out: PathBuf,
    /// The `cell0` binary.
    pub bin: PathBuf,
    /// How long the linearizability checker may take.
    pub check_budget: Duration,
}

/// What can stop a run before it has a verdict.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The network lab.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// The cluster.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Writing the files.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// One fault or heal, for the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Microseconds since the workloads started.
    pub at_us: u64,
    /// `kill`, `restart`, `pause`, `resume`, `partition`, `heal`, `leave`
    /// (or `leave-refused`), `stop` or `rejoin`.
    pub event: &'static str,
    /// The nodes it hit (node indexes).
    pub nodes: Vec<usize>,
}

/// Counts of a history.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Every operation.
    pub ops: usize,
    /// Ended `ok`.
    pub ok: usize,
    /// Ended `fail`.
    pub fail: usize,
    /// Ended `unknown`.
    pub unknown: usize,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The scenario.
    pub scenario: &'static str,
    /// Its seed.
    pub seed: u64,
    /// Register operations.
    pub register: Counts,
    /// Set writes.
    pub set: Counts,
    /// Faults injected.
    pub faults: usize,
    /// The linearizability checker's verdict on the register history.
    pub linearizable: Verdict,
    /// Its report, in words.
    pub linearizable_report: String,
    /// The set checker's verdict.
    pub set_verdict: Verdict,
    /// Its report, in words.
    pub set_report: String,
    /// Whether the verdicts are what the scenario expects.
    pub passed: bool,
    /// Where the files are.
    pub out: PathBuf,
}

fn counts(ops: &[Op]) -> Counts {
    let mut c = Counts {
        ops: ops.len(),
        ..Counts::default()
    };
    for op in ops {
        match op.status {
            Status::Ok => c.ok += 1,
            Status::Fail => c.fail += 1,
            Status::Unknown => c.unknown += 1,
        }
    }
    c
}

/// The nemesis: owns the cluster and the lab while the workloads run.
struct Nemesis {
    cluster: Cluster,
    lab: Option<Lab>,
    rng: StdRng,
    clock: Clock,
    timeline: Vec<Event>,
}

impl Nemesis {
    fn record(&mut self, event: &'static str, nodes: Vec<usize>) {
        tracing::info!(event, ?nodes, "nemesis");
        self.timeline.push(Event {
            at_us: self.clock.now_us(),
            event,
            nodes,
        });
    }

    async fn target(&mut self, target: Target) -> usize {
        let any = self.rng.random_range(0..self.cluster.len());
        match target {
            Target::Any => any,
            Target::Leader => self.cluster.any_leader().await.unwrap_or(any),
        }
    }

    /// Injects `fault`, holds it, heals it.
    async fn strike(&mut self, fault: Fault) -> Result<(), RunError> {
        match fault {
            Fault::Kill(target) => {
                let node = self.target(target).await;
                self.cluster.kill(node)?;
                self.record("kill", vec![node]);
                tokio::time::sleep(HOLD).await;
                self.cluster.restart(node)?;
                self.record("restart", vec![node]);
            }
            Fault::Pause(target) => {
                let node = self.target(target).await;
                self.cluster.pause(node)?;
                self.record("pause", vec![node]);
                tokio::time::sleep(HOLD).await;
                self.cluster.resume(node)?;
                self.record("resume", vec![node]);
            }
            Fault::LeaveRejoin(target) => {
                let node = self.target(target).await;
                match tokio::task::block_in_place(|| self.cluster.leave(node)) {
                    Ok(()) => self.record("leave", vec![node]),
                    Err(e) => {
                        tracing::warn!(node, error = %e, "leave refused");
                        self.record("leave-refused", vec![node]);
                    }
                }
                self.cluster.kill(node)?;
                self.record("stop", vec![node]);
                tokio::time::sleep(HOLD).await;
                self.cluster.restart(node)?;
                self.record("rejoin", vec![node]);
            }
            Fault::IsolateLeader | Fault::SplitMinority => {
                let n = self.cluster.len();
                let cut: Vec<usize> = if fault == Fault::IsolateLeader {
                    vec![self.target(Target::Leader).await]
                } else {
                    let mut all: Vec<usize> = (0..n).collect();
                    let size = self.rng.random_range(1..=(n - 1) / 2);
                    let mut cut = Vec::new();
                    for _ in 0..size {
                        cut.push(all.remove(self.rng.random_range(0..all.len())));
                    }
                    cut
                };
                let rest: Vec<usize> = (0..n).filter(|i| !cut.contains(i)).collect();
                let lab = self
                    .lab
                    .as_mut()
                    .ok_or_else(|| RunError::Other("a partition needs the network lab".into()))?;
                lab.partition(&[cut.clone(), rest])?;
                self.record("partition", cut.clone());
                tokio::time::sleep(HOLD).await;
                if let Some(lab) = self.lab.as_mut() {
                    lab.heal()?;
                }
                self.record("heal", cut);
            }
        }
        Ok(())
    }
}

/// Runs `options`: the summary, with the files written under `options.out`.
pub async fn run(options: RunOptions) -> Result<Summary, RunError> {
    let scenario = options.scenario;
    std::fs::create_dir_all(&options.out).map_err(|e| RunError::Other(format!("{}: {e}", options.out.display())))?;
    let lab = if scenario.needs_root() {
        Some(Lab::new(options.nodes)?)
    } else {
        None
    };
    let env = if scenario.failpoints.is_empty() {
        Vec::new()
    } else {
        vec![("CELL0_FAILPOINTS".to_string(), scenario.failpoints.to_string())]
    };
    let cluster = Cluster::start(
        ClusterOptions {
            bin: options.bin.clone(),
            dir: options.out.join("nodes"),
            env,
        },
        options.nodes,
        lab.as_ref(),
    )?;
    let clock = Clock::start();
    let until = Instant::now() + options.duration;
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..options.clients {
        let node = id as usize % options.nodes;
        let c = RegisterClient {
            id,
            node: node as u32,
            endpoint: cluster.endpoint(node),
            keys: options.keys,
            seed: options.seed ^ (u64::from(id) << 20),
        };
        clients.spawn(workload::register_client(c, clock, until));
    }
    for k in 0..options.set_clients {
        let id = options.clients + k;
        let node = id as usize % options.nodes;
        clients.spawn(workload::set_client(
            id,
            node as u32,
            cluster.endpoint(node),
            clock,
            until,
        ));
    }

    let mut nemesis = Nemesis {
        cluster,
        lab,
        rng: StdRng::seed_from_u64(options.seed),
        clock,
        timeline: Vec::new(),
    };
    let mut faults = 0;
    if !scenario.faults.is_empty() {
        loop {
            tokio::time::sleep(QUIET).await;
            if Instant::now() + HOLD > until {
                break;
            }
            let fault = scenario.faults[nemesis.rng.random_range(0..scenario.faults.len())];
            nemesis.strike(fault).await?;
            faults += 1;
        }
    }
    let mut ops: Vec<Op> = Vec::new();
    while let Some(done) = clients.join_next().await {
        ops.extend(done.map_err(|e| RunError::Other(format!("a client failed: {e}")))?);
    }
    ops.sort_by_key(|op| (op.complete_us, op.invoke_us, op.client));

    // Every node up and connected again before the set is read back.
    for i in 0..nemesis.cluster.len() {
        nemesis.cluster.wait_ready(i, Duration::from_secs(60))?;
    }
    let mut present: Option<BTreeSet<String>> = None;
    let scan_until = Instant::now() + Duration::from_secs(30);
    while present.is_none() && Instant::now() < scan_until {
        for i in 0..nemesis.cluster.len() {
            present = workload::scan(&nemesis.cluster.endpoint(i), SET_PREFIX).await;
            if present.is_some() {
                break;
            }
        }
    }
    let present = present.ok_or_else(|| RunError::Other("the set could not be read back within 30 s".into()))?;

    let (set_ops, register_ops): (Vec<Op>, Vec<Op>) = ops
        .into_iter()
        .partition(|op| op.kind == OpKind::Write && op.key.starts_with(SET_PREFIX));
    history::write(&options.out.join("history.jsonl"), &register_ops)?;
    history::write(&options.out.join("set-history.jsonl"), &set_ops)?;
    let timeline: Vec<String> = nemesis
        .timeline
        .iter()
        .filter_map(|e| serde_json::to_string(e).ok())
        .collect();
    std::fs::write(options.out.join("timeline.jsonl"), timeline.join("\n") + "\n")
        .map_err(|e| RunError::Other(format!("timeline: {e}")))?;

    let lin = checker::linearizable::check(&register_ops, options.check_budget);
    let set = checker::set::check(&set_ops, &present);
    let passed = match scenario.expect {
        Expect::Valid => lin.verdict == Verdict::Ok && set.verdict == Verdict::Ok,
        Expect::Violation => lin.verdict == Verdict::Invalid,
    };
    let summary = Summary {
        scenario: scenario.name,
        seed: options.seed,
        register: counts(&register_ops),
        set: counts(&set_ops),
        faults,
        linearizable: lin.verdict,
        linearizable_report: lin.to_string(),
        set_verdict: set.verdict,
        set_report: set.to_string(),
        passed,
        out: options.out.clone(),
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| RunError::Other(e.to_string()))?;
    std::fs::write(options.out.join("summary.json"), json).map_err(|e| RunError::Other(format!("summary: {e}")))?;
    Ok(summary)
}
