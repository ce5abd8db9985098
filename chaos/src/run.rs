//! One chaos run: start a cluster of real processes, run the register and
//! set workloads while the scenario's nemesis injects faults, heal, read
//! the set back, check the history, and write the history, the timeline
//! of faults and a summary. With [`run_with_agents`] the agent workload
//! ([`crate::agents`]) runs alongside and its final state is read back and
//! checked too.
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

use crate::agents::{AgentOptions, AgentRun, AgentsSummary};
use crate::checker::{self, Verdict};
use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::history::{self, HistoryError, Op, OpKind, Status};
use crate::lab::{Lab, LabError};
use crate::proxy::{LinkFault, Proxy};
use crate::scenario::{Expect, Fault, HOLD, Needs, QUIET, Scenario, Target};
use crate::workload::{self, Clock, RegisterClient, SET_PREFIX};

/// How long a node started on a full disk has to stop or become ready.
const FULL_DISK_START: Duration = Duration::from_secs(30);

/// The size of each node's tmpfs data dir in scenarios that fill disks.
const DISK_BYTES: u64 = 512 << 20;

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
    /// (or `leave-refused`), `stop`, `rejoin`; through the proxy `slow`,
    /// `cut-from` and `cut-to` (the leader's links), `bridge` (the bridge
    /// node), `ring` (the ring's order), `flapping` (the leader), `resets`;
    /// `skew` and `unskew` (the clock), `disk-full`, `exited` (a node that
    /// stopped on its own) or `ready` (one that came up on a full disk)
    /// and `disk-freed`.
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
    /// The agent workload, when it ran (`--agents`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agents: Option<AgentsSummary>,
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

    fn proxy(&self) -> Result<&Proxy, RunError> {
        self.cluster
            .proxy()
            .ok_or_else(|| RunError::Other("a link fault needs the fault proxy".into()))
    }

    /// Node indexes in an order drawn by the seed.
    fn shuffled(&mut self) -> Vec<usize> {
        let mut all: Vec<usize> = (0..self.cluster.len()).collect();
        for i in (1..all.len()).rev() {
            all.swap(i, self.rng.random_range(0..=i));
        }
        all
    }

    /// Holds a proxy fault for [`HOLD`], then heals every link.
    async fn hold_links(&mut self, nodes: Vec<usize>) -> Result<(), RunError> {
        tokio::time::sleep(HOLD).await;
        self.proxy()?.heal();
        self.record("heal", nodes);
        Ok(())
    }

    /// Injects a fault through the proxy, holds it, heals it.
    async fn strike_links(&mut self, fault: Fault) -> Result<(), RunError> {
        let n = self.cluster.len();
        match fault {
            Fault::SlowNode(target) => {
                let node = self.target(target).await;
                let slow = LinkFault {
                    delay: Duration::from_millis(50),
                    jitter: Duration::from_millis(50),
                    bandwidth: Some(1_000_000),
                    cut: false,
                };
                for other in (0..n).filter(|o| *o != node) {
                    self.proxy()?.set_both(node, other, slow);
                }
                self.record("slow", vec![node]);
                self.hold_links(vec![node]).await
            }
            Fault::CutFromLeader | Fault::CutToLeader => {
                let leader = self.target(Target::Leader).await;
                for other in (0..n).filter(|o| *o != leader) {
                    let (from, to) = if fault == Fault::CutFromLeader {
                        (leader, other)
                    } else {
                        (other, leader)
                    };
                    self.proxy()?.set(from, to, LinkFault::CUT);
                }
                let event = if fault == Fault::CutFromLeader {
                    "cut-from"
                } else {
                    "cut-to"
                };
                self.record(event, vec![leader]);
                self.hold_links(vec![leader]).await
            }
            Fault::Bridge => {
                let order = self.shuffled();
                let (bridge, rest) = (order[0], &order[1..]);
                let (left, right) = rest.split_at(rest.len() / 2);
                for a in left {
                    for b in right {
                        self.proxy()?.set_both(*a, *b, LinkFault::CUT);
                    }
                }
                self.record("bridge", vec![bridge]);
                self.hold_links(vec![bridge]).await
            }
            Fault::Ring => {
                let order = self.shuffled();
                for (i, a) in order.iter().enumerate() {
                    for (j, b) in order.iter().enumerate().skip(i + 1) {
                        let apart = j - i;
                        if apart != 1 && apart != n - 1 {
                            self.proxy()?.set_both(*a, *b, LinkFault::CUT);
                        }
                    }
                }
                self.record("ring", order.clone());
                self.hold_links(order).await
            }
            Fault::Flapping => {
                let leader = self.target(Target::Leader).await;
                let rest: Vec<usize> = (0..n).filter(|o| *o != leader).collect();
                self.record("flapping", vec![leader]);
                let until = Instant::now() + HOLD;
                while Instant::now() < until {
                    self.proxy()?.partition(&[vec![leader], rest.clone()]);
                    tokio::time::sleep(Duration::from_millis(self.rng.random_range(200..800))).await;
                    self.proxy()?.heal();
                    tokio::time::sleep(Duration::from_millis(self.rng.random_range(200..800))).await;
                }
                self.record("heal", vec![leader]);
                Ok(())
            }
            Fault::ResetLinks => {
                self.record("resets", (0..n).collect());
                let until = Instant::now() + HOLD;
                while Instant::now() < until {
                    for a in 0..n {
                        for b in (0..n).filter(|b| *b != a) {
                            self.proxy()?.reset(a, b);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                self.record("heal", (0..n).collect());
                Ok(())
            }
            _ => Err(RunError::Other(format!("{fault:?} is not a link fault"))),
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
            Fault::SkewClock(target) => {
                let node = self.target(target).await;
                let seconds = self.rng.random_range(5..=120i64);
                let offset = if self.rng.random() { seconds } else { -seconds };
                self.cluster.skew_clock(node, offset)?;
                tracing::info!(node, offset_s = offset, "clock skewed");
                self.record("skew", vec![node]);
                tokio::time::sleep(HOLD).await;
                self.cluster.skew_clock(node, 0)?;
                self.record("unskew", vec![node]);
            }
            Fault::FillDisk(target) => {
                let node = self.target(target).await;
                let bytes = tokio::task::block_in_place(|| self.cluster.fill_disk(node))?;
                tracing::info!(node, bytes, "disk filled");
                self.record("disk-full", vec![node]);
                // Running on, it writes into the space RocksDB set aside;
                // started again, it must open its files on a full disk.
                tokio::time::sleep(HOLD / 2).await;
                self.cluster.restart(node)?;
                self.record("restart", vec![node]);
                // It either stops on its own or comes up; wait for which.
                let deadline = Instant::now() + FULL_DISK_START;
                let mut ready = false;
                while self.cluster.is_running(node) && Instant::now() < deadline {
                    ready = tokio::task::block_in_place(|| self.cluster.is_ready(node));
                    if ready {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !self.cluster.is_running(node) {
                    self.record("exited", vec![node]);
                } else if ready {
                    self.record("ready", vec![node]);
                }
                self.cluster.free_disk(node)?;
                self.record("disk-freed", vec![node]);
                if !self.cluster.is_running(node) {
                    self.cluster.restart(node)?;
                    self.record("restart", vec![node]);
                }
            }
            Fault::SlowNode(_)
            | Fault::CutFromLeader
            | Fault::CutToLeader
            | Fault::Bridge
            | Fault::Ring
            | Fault::Flapping
            | Fault::ResetLinks => return self.strike_links(fault).await,
        }
        Ok(())
    }
}

/// Runs `options`: the summary, with the files written under `options.out`.
pub async fn run(options: RunOptions) -> Result<Summary, RunError> {
    run_with_agents(options, None).await
}

/// Runs `options` with the agent workload too when `agents` is given
/// ([`crate::agents`]; its verdict must be `ok` where the scenario expects
/// valid histories).
pub async fn run_with_agents(options: RunOptions, agents: Option<AgentOptions>) -> Result<Summary, RunError> {
    let scenario = options.scenario;
    std::fs::create_dir_all(&options.out).map_err(|e| RunError::Other(format!("{}: {e}", options.out.display())))?;
    if scenario.needs_root() && !crate::lab::is_root() {
        return Err(RunError::Other(format!(
            "{} needs root (network namespaces or tmpfs mounts); run as root or pick another scenario",
            scenario.name
        )));
    }
    let lab = if scenario.needs(Needs::Lab) {
        Some(Lab::new(options.nodes)?)
    } else {
        None
    };
    let env = if scenario.failpoints.is_empty() {
        Vec::new()
    } else {
        vec![("CELL0_FAILPOINTS".to_string(), scenario.failpoints.to_string())]
    };
    let faketime = if scenario.needs(Needs::Faketime) {
        let lib = PathBuf::from(crate::cluster::LIBFAKETIME);
        if !lib.exists() {
            return Err(RunError::Other(format!(
                "{} skews clocks with libfaketime, which is not at {}: run scripts/setup.sh",
                scenario.name,
                lib.display()
            )));
        }
        Some(lib)
    } else {
        None
    };
    let cluster = Cluster::start(
        ClusterOptions {
            env,
            proxy: scenario.needs(Needs::Proxy),
            faketime,
            disk_bytes: scenario.needs(Needs::Disk).then_some(DISK_BYTES),
            ..ClusterOptions::new(options.bin.clone(), options.out.join("nodes"))
        },
        options.nodes,
        lab.as_ref(),
    )?;
    let endpoints: Vec<String> = (0..cluster.len()).map(|i| cluster.endpoint(i)).collect();
    if let Some(a) = &agents {
        crate::agents::prepare(a, &options.out, &options.bin, &endpoints)
            .await
            .map_err(|e| RunError::Other(e.to_string()))?;
    }
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

    let agent_run = agents.as_ref().map(|a| {
        let first = options.clients + options.set_clients;
        AgentRun::start(a, endpoints.clone(), first, options.seed, clock, until)
    });

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
    let agents = match agent_run {
        Some(a) => Some(
            a.finish(&options.out)
                .await
                .map_err(|e| RunError::Other(e.to_string()))?,
        ),
        None => None,
    };

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
        Expect::Valid => {
            lin.verdict == Verdict::Ok
                && set.verdict == Verdict::Ok
                && agents.as_ref().is_none_or(|a| a.verdict == Verdict::Ok)
        }
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
        agents,
        out: options.out.clone(),
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| RunError::Other(e.to_string()))?;
    std::fs::write(options.out.join("summary.json"), json).map_err(|e| RunError::Other(format!("summary: {e}")))?;
    Ok(summary)
}
