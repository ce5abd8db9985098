//! cell0-sim: simulation of consensus and the state machine of a whole
//! cluster in one process, on one thread, under simulated time, a
//! simulated network and a seeded schedule of faults.
//!
//! One simulation ([`run_seed`], or [`simulate`] on a runtime of your own)
//! starts [`SimConfig::nodes`] consensus members with in-memory storage
//! ([`cluster`]), connected by an in-memory network that delays, loses
//! (resets), partitions and slows their connections ([`net`]) through the
//! consensus crate's `Transport` seam, so every byte between members goes
//! through the real gRPC code. Clients ([`workload`]) run the register and
//! set workloads of the chaos tests through `Consensus`'s own API, an agent
//! client submits and stops agents on synthetic nodes while a scheduler
//! actor places them from whichever member leads ([`scheduling`]), and a
//! nemesis ([`nemesis`]) injects faults; then every link is healed, each
//! register key is read once more, the set is read back, the scheduler
//! settles, and the replicas are compared. The verdicts are the chaos
//! checkers': the register history must be linearizable
//! ([`cell0_chaos::checker::linearizable`]), no acknowledged set write may
//! be lost ([`cell0_chaos::checker::set`]), and every member that is up
//! must hold the same state; and the scheduler's
//! ([`scheduling::check`]): every agent that should run is placed exactly
//! once unless no node has room, no node holds more than its capacity, no
//! stopped agent holds an allocation, and no plan placed an agent twice.
//!
//! # Reproducibility
//!
//! [`run_seed`] runs a simulation on a current-thread tokio runtime with
//! time paused (`start_paused`, from tokio's `test-util` feature, which is
//! why this is a crate of its own): time moves only when every task waits,
//! straight to the next timer, so the schedule does not depend on the
//! machine's speed or load, and five simulated seconds take about half a
//! second of CPU. Every random choice of the simulator comes from the seed:
//! faults from the nemesis's generator, each client's operations from its
//! own, latencies and losses from a hash of the seed, the link and the
//! simulated instant ([`net`]). openraft 0.9 draws each member's election
//! timeout once per start from the thread's generator (`rand::thread_rng`);
//! the members get one-millisecond-wide ranges, which leave that draw a
//! single value, so the timeouts are the seed's too ([`cluster`]).
//!
//! What the simulator cannot control is tokio's own generator, which is
//! seeded from the OS per runtime (`Builder::rng_seed` exists only with
//! `--cfg tokio_unstable`, which would rebuild every crate): it orders the
//! branches of a `tokio::select!` without `biased`, and it picks which of
//! eight wait lists a `watch` receiver waits on, so receivers woken by one
//! change run in a random order. Consensus waits on openraft's metrics
//! `watch` (a request waiting for a leader, a read waiting for its index to
//! be applied), so when two clients' requests wait there together, which
//! goes first can differ between two runs of a seed, and so can the rest
//! of the run. The simulator keeps such ties rare: clients and the nemesis
//! act at milliseconds of their own ([`workload::Clock::sleep_in_slot`]),
//! the network's draws do not depend on the order of tasks at one instant,
//! and its own waits use `Notify`, which wakes in order. Measured (35 seeds
//! run twice each): without injected faults every seed reran identically
//! (the CI test asserts it for three); with slow links and resets 33 did;
//! with every fault, crashes and restarts included, 28; with crashes and
//! restarts alone 27. Request ids and
//! the cluster id are random too (`std`'s hasher keys and the wall clock),
//! as is hyper's `date` header; they change bytes on the wire, not the
//! schedule.
//!
//! [`SimOutcome::hash`] fingerprints the history, the timeline and the
//! final pairs; running a seed twice and comparing the two fingerprints is
//! how a run's reproducibility is checked.
//!
//! Crashes: a crashed member restarts on what the crash left of its
//! storage, a copy of its in-memory engine taken at the crash, with the
//! writes that were not synced dropped when the crash is a power loss
//! ([`cluster`], [`nemesis`]).
//!
//! Not simulated: snapshots (built and installed on threads of their own),
//! membership changes during faults, disks (only their durability model:
//! `cell0_storage::MemEngine`), clocks; nor the node side of agents (no
//! runtime starts, reports or releases them: an allocation stays
//! `pending`), nor the scheduler's drains, node-down moves and migrations.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cell0_consensus::{Consistency, Role};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use cell0_chaos::checker::Verdict;
use cell0_chaos::checker::linearizable::{self, Report};
use cell0_chaos::checker::set::{self, SetReport};
use cell0_chaos::history::{Op, ReadConsistency, Status};

pub mod cluster;
pub mod nemesis;
pub mod net;
pub mod scheduling;
pub mod workload;

use cluster::SimCluster;
use nemesis::{Event, FaultMix};
use net::{NetCounts, NetParams, SimNet};
use scheduling::{AgentClientSpec, AgentState, PlanCommit, SchedulerLog};
use workload::{ClientSpec, Clock, Handles, REGISTER_PREFIX, SET_PREFIX};

/// Client ids from this one on are the final reads after the heal.
pub const FINAL_READER: u32 = 1_000_000;

/// What one simulation runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Members (1, 3 or 5), all voters.
    pub nodes: u64,
    /// Clients; client *i* talks to member *i* mod `nodes` + 1.
    pub clients: u32,
    /// Register keys per key generation.
    pub keys: u32,
    /// Longest pause of a client between two operations.
    pub think: Duration,
    /// Simulated time of workload and faults.
    pub duration: Duration,
    /// The faults the nemesis injects.
    pub faults: FaultMix,
    /// The network's latency and losses.
    pub net: NetParams,
    /// Wall-clock budget of the linearizability search.
    pub check_budget: Duration,
    /// Longest pause of the agent client between two operations; `None`:
    /// no agents, no scheduler ([`scheduling`]).
    pub agents: Option<Duration>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 3,
            clients: 5,
            keys: 3,
            think: Duration::from_millis(40),
            duration: Duration::from_secs(5),
            faults: FaultMix::ALL,
            net: NetParams::default(),
            check_budget: Duration::from_secs(20),
            agents: Some(Duration::from_millis(200)),
        }
    }
}

/// Why a simulation could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The cluster could not be set up.
    #[error("setting up the simulated cluster: {0}")]
    Setup(String),
}

/// What one simulation found.
#[derive(Debug, Clone)]
pub struct SimOutcome {
    /// Its seed.
    pub seed: u64,
    /// The register history (final reads included), in client order and
    /// each client's completion order.
    pub history: Vec<Op>,
    /// The set writes, likewise.
    pub set_history: Vec<Op>,
    /// The set keys present at the end (empty if the final read failed).
    pub set_present: BTreeSet<String>,
    /// Faults and heals.
    pub timeline: Vec<Event>,
    /// The linearizability checker's report.
    pub linearizable: Report,
    /// The set checker's report.
    pub set: SetReport,
    /// The agent client's operations, in order.
    pub agent_ops: Vec<scheduling::AgentOp>,
    /// What the scheduler actor committed.
    pub plans: scheduling::SchedulerLog,
    /// The agent tables at the end, as the leader holds them (`None`
    /// without agents, or when they could not be read).
    pub agents: Option<AgentState>,
    /// What went wrong after the heal: no leader, a final read that never
    /// returned, a member that did not catch up, replicas that differ, and
    /// the scheduler's checks ([`scheduling::check`]).
    pub problems: Vec<String>,
    /// What the network did.
    pub net: NetCounts,
    /// The member that served a build without `Exchange` streams, if one
    /// did (half of the seeds).
    pub older_build: Option<cluster::OlderBuild>,
    /// Simulated time the whole run took.
    pub simulated: Duration,
    /// A fingerprint of the history, timeline, final state and network
    /// counts: equal for two runs of a seed that behaved the same.
    pub hash: u64,
}

impl SimOutcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.linearizable.verdict == Verdict::Ok && self.set.verdict == Verdict::Ok && self.problems.is_empty()
    }
}

impl fmt::Display for SimOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ok = self.history.iter().filter(|o| o.status == Status::Ok).count();
        writeln!(
            f,
            "seed {}: {} ({} register ops, {} ok; {} set writes; {} agent ops, {} plans; {} faults; \
             {:.1} s simulated; net: {} connections, {} resets, {} chunks; hash {:016x})",
            self.seed,
            if self.passed() { "passed" } else { "FAILED" },
            self.history.len(),
            ok,
            self.set_history.len(),
            self.agent_ops.len(),
            self.plans.commits.len(),
            self.timeline
                .iter()
                .filter(|(_, e)| e != "heal" && !e.starts_with("restart"))
                .count(),
            self.simulated.as_secs_f64(),
            self.net.connections,
            self.net.resets,
            self.net.chunks,
            self.hash,
        )?;
        if let Some(older) = &self.older_build {
            writeln!(
                f,
                "  member {} served a build without Exchange streams: it refused {} and got unary calls",
                older.member, older.refused_streams
            )?;
        }
        if let Some(a) = &self.agents {
            let (placed, waiting, stopped) = a.summary();
            writeln!(
                f,
                "  agents: {placed} placed, {waiting} waiting for room, {stopped} stopped; {} plans unacknowledged",
                self.plans.unknown
            )?;
        }
        if self.passed() {
            return Ok(());
        }
        write!(f, "{}", self.linearizable)?;
        write!(f, "{}", self.set)?;
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        writeln!(f, "timeline:")?;
        for (us, what) in &self.timeline {
            writeln!(f, "  {:>9.3} s  {what}", *us as f64 / 1e6)?;
        }
        Ok(())
    }
}

/// FNV-1a, 64 bits: a fingerprint that does not depend on the process.
#[derive(Debug, Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Runs simulation `seed` of `config` on a runtime of its own: one thread,
/// time paused.
pub fn run_seed(seed: u64, config: &SimConfig) -> Result<SimOutcome, SimError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| SimError::Setup(format!("building the runtime: {e}")))?;
    runtime.block_on(simulate(seed, config))
}

/// Runs simulation `seed` of `config` on the current runtime, which must be
/// a current-thread one with paused time for the run to be reproducible
/// (see the crate documentation); returns when the cluster is stopped and
/// the checks have run.
pub async fn simulate(seed: u64, config: &SimConfig) -> Result<SimOutcome, SimError> {
    let started = Instant::now();
    let mut seeds = StdRng::seed_from_u64(seed);
    let net = SimNet::new(seeds.random(), config.net);
    let mut cluster_rng = StdRng::seed_from_u64(seeds.random());
    let mut nemesis_rng = StdRng::seed_from_u64(seeds.random());
    let mut cluster = SimCluster::start(config.nodes, net.clone(), &mut cluster_rng).await?;
    let agent_seed: u64 = seeds.random();
    if config.agents.is_some() {
        let first = cluster
            .consensus(1)
            .ok_or_else(|| SimError::Setup("no member 1".into()))?;
        scheduling::register_nodes(first).await.map_err(SimError::Setup)?;
    }

    let clock = Clock::start();
    let until = Instant::now() + config.duration;
    let handles = cluster.handles();
    // Clients are actors 0.., then the agent client and the scheduler, the
    // nemesis the last one (`Clock::sleep_in_slot`).
    let slots = u64::from(config.clients) + 3;
    let clients: Vec<_> = (0..config.clients)
        .map(|id| {
            let spec = ClientSpec {
                id,
                home: u64::from(id) % config.nodes.max(1) + 1,
                keys: config.keys,
                slots,
                think: config.think,
                seed: seeds.random(),
            };
            tokio::spawn(workload::client(spec, handles.clone(), clock, until))
        })
        .collect();
    let stop_scheduler = Arc::new(AtomicBool::new(false));
    let agent_actors = config.agents.map(|think| {
        let spec = AgentClientSpec {
            home: agent_seed % config.nodes.max(1) + 1,
            slot: (slots - 3, slots),
            think,
            seed: agent_seed,
        };
        let client = tokio::spawn(scheduling::agent_client(spec, handles.clone(), clock, until));
        let scheduler = tokio::spawn(scheduling::scheduler(
            handles.clone(),
            clock,
            (slots - 2, slots),
            stop_scheduler.clone(),
        ));
        (client, scheduler)
    });
    let mut timeline = Vec::new();
    let nemesis_problems = nemesis::run(
        &mut nemesis_rng,
        config.faults,
        &mut cluster,
        &net,
        clock,
        (slots - 1, slots),
        until,
        &mut timeline,
    )
    .await;
    let mut history = Vec::new();
    let mut set_history = Vec::new();
    for c in clients {
        if let Ok(h) = c.await {
            history.extend(h.register);
            set_history.extend(h.set);
        }
    }
    let mut agent_ops = Vec::new();
    let mut scheduler = None;
    if let Some((client, sched)) = agent_actors {
        agent_ops = client.await.unwrap_or_default();
        scheduler = Some(sched);
    }

    // Healed, and the crashed members that were to come back are back: the
    // cluster must recover, and its state must hold every acknowledged
    // write.
    let mut problems = nemesis_problems;
    let mut set_present = BTreeSet::new();
    let mut final_state = Vec::new();
    let mut plans = scheduling::SchedulerLog::default();
    let mut agent_state = None;
    match wait_for_leader(&cluster, Duration::from_secs(30)).await {
        None => problems.push("no leader within 30 s of the heal".into()),
        Some(leader) => {
            final_reads(&handles, leader, clock, &mut history, &mut problems).await;
            match read_prefix(&handles, leader, SET_PREFIX, Consistency::Linearizable).await {
                Ok(kvs) => {
                    set_present = kvs
                        .into_iter()
                        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                        .collect();
                }
                Err(e) => problems.push(format!("the final read of the set failed: {e}")),
            }
            if let Some(sched) = scheduler.take() {
                plans = settle_scheduler(&handles, sched, &stop_scheduler, &mut problems).await;
            }
            match compare_replicas(&cluster, leader).await {
                Ok(state) => {
                    final_state = state;
                    if config.agents.is_some() {
                        let (state, mut found) =
                            compare_agent_replicas(&cluster, leader, &agent_ops, &plans.commits).await;
                        agent_state = state;
                        problems.append(&mut found);
                    }
                }
                Err(e) => problems.push(e),
            }
        }
    }
    if let Some(sched) = scheduler {
        stop_scheduler.store(true, Ordering::Relaxed);
        plans = sched.await.unwrap_or_default();
    }
    let simulated = started.elapsed();
    let counts = net.counts();
    let older_build = cluster.older_build();
    cluster.stop().await;

    let linearizable = linearizable::check(&history, config.check_budget);
    let set = set::check(&set_history, &set_present);
    let mut hash = fingerprint(seed, &history, &set_history, &timeline, &final_state, counts);
    if config.agents.is_some() {
        let mut h = Fnv(hash);
        h.write(format!("{agent_ops:?}").as_bytes());
        h.write(format!("{plans:?}").as_bytes());
        h.write(format!("{agent_state:?}").as_bytes());
        hash = h.0;
    }
    Ok(SimOutcome {
        seed,
        history,
        set_history,
        set_present,
        timeline,
        linearizable,
        set,
        agent_ops,
        plans,
        agents: agent_state,
        problems,
        net: counts,
        older_build,
        simulated,
        hash,
    })
}

fn fingerprint(
    seed: u64,
    history: &[Op],
    set_history: &[Op],
    timeline: &[Event],
    final_state: &[cell0_consensus::KeyValue],
    counts: NetCounts,
) -> u64 {
    let mut h = Fnv::new();
    h.write(&seed.to_le_bytes());
    for op in history.iter().chain(set_history) {
        h.write(serde_json::to_string(op).unwrap_or_default().as_bytes());
    }
    for (us, what) in timeline {
        h.write(&us.to_le_bytes());
        h.write(what.as_bytes());
    }
    for kv in final_state {
        h.write(&kv.key);
        h.write(&kv.value);
    }
    for n in [counts.connections, counts.resets, counts.chunks, counts.refused] {
        h.write(&n.to_le_bytes());
    }
    h.0
}

/// The leader once one is known to the members that are up.
async fn wait_for_leader(cluster: &SimCluster, limit: Duration) -> Option<cell0_consensus::NodeId> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(leader) = cluster.leader() {
            return Some(leader);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Reads every register key of `history` once more, linearizably, through
/// `leader`, appending the reads to the history (a lost acknowledged write
/// then shows as a stale final read).
async fn final_reads(
    handles: &Handles,
    leader: cell0_consensus::NodeId,
    clock: Clock,
    history: &mut Vec<Op>,
    problems: &mut Vec<String>,
) {
    let keys: BTreeSet<String> = history
        .iter()
        .filter(|o| o.key.starts_with(REGISTER_PREFIX))
        .map(|o| o.key.clone())
        .collect();
    for (i, key) in keys.into_iter().enumerate() {
        let client = FINAL_READER + u32::try_from(i).unwrap_or(0);
        let mut done = false;
        for _ in 0..20 {
            let Some((node, c)) = handles.pick(leader) else { break };
            let mut op = Op {
                key: key.clone(),
                consistency: Some(ReadConsistency::Linearizable),
                ..Op::blank(client, u32::try_from(node).unwrap_or(u32::MAX))
            };
            workload::read(&c, &mut op, clock).await;
            done = op.status == Status::Ok;
            history.push(op);
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !done {
            problems.push(format!("the final read of {key} never returned"));
        }
    }
}

/// Every pair under `prefix`, read through `node` at `consistency`.
async fn read_prefix(
    handles: &Handles,
    node: cell0_consensus::NodeId,
    prefix: &str,
    consistency: Consistency,
) -> Result<Vec<cell0_consensus::KeyValue>, String> {
    let (_, c) = handles.pick(node).ok_or("no member is up")?;
    let mut out = Vec::new();
    let mut after = Vec::new();
    loop {
        let (kvs, more, _) = tokio::time::timeout(
            workload::OP_TIMEOUT,
            c.range(prefix.as_bytes(), &after, 1_000, consistency),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
        if let Some(last) = kvs.last() {
            after = last.key.clone();
        }
        let empty = kvs.is_empty();
        out.extend(kvs);
        if !more || empty {
            return Ok(out);
        }
    }
}

/// Waits until every member that is up applied the leader's last entry,
/// then compares their replicas of the workloads' keys; the leader's, when
/// all agree.
async fn compare_replicas(
    cluster: &SimCluster,
    leader: cell0_consensus::NodeId,
) -> Result<Vec<cell0_consensus::KeyValue>, String> {
    let handles = cluster.handles();
    let lead = cluster.consensus(leader).ok_or("the leader crashed")?;
    if lead.status().role != Role::Leader {
        return Err(format!("n{leader} no longer leads"));
    }
    let target = lead.status().last_log_index;
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in cluster.up() {
        let c = cluster.consensus(id).ok_or("a member crashed")?;
        while c.status().applied_index < target {
            if Instant::now() > deadline {
                return Err(format!(
                    "n{id} applied only up to {} of {target} within 30 s of the heal",
                    c.status().applied_index
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let reference = read_prefix(&handles, leader, "sim/", Consistency::Serializable).await?;
    for id in cluster.up() {
        let state = read_prefix(&handles, id, "sim/", Consistency::Serializable).await?;
        if state != reference {
            let differ = reference
                .iter()
                .zip(&state)
                .find(|(a, b)| a != b)
                .map(|(a, _)| String::from_utf8_lossy(&a.key).into_owned())
                .unwrap_or_else(|| format!("{} pairs against {}", state.len(), reference.len()));
            return Err(format!(
                "n{id}'s replica differs from the leader n{leader}'s at {differ}"
            ));
        }
    }
    Ok(reference)
}

/// Lets the scheduler actor finish the agents' evaluations after the heal
/// ([`scheduling::settle`]), then stops it and returns its log.
async fn settle_scheduler(
    handles: &Handles,
    scheduler: tokio::task::JoinHandle<SchedulerLog>,
    stop: &AtomicBool,
    problems: &mut Vec<String>,
) -> SchedulerLog {
    if let Err(e) = scheduling::settle(handles).await {
        problems.push(e);
    }
    stop.store(true, Ordering::Relaxed);
    scheduler.await.unwrap_or_default()
}

/// Reads every member's replica of the agent tables (they applied the
/// leader's last entry: [`compare_replicas`] waited for it), checks each
/// ([`scheduling::check`]) and that they agree: the leader's, and every
/// problem found.
async fn compare_agent_replicas(
    cluster: &SimCluster,
    leader: cell0_consensus::NodeId,
    ops: &[scheduling::AgentOp],
    plans: &[PlanCommit],
) -> (Option<AgentState>, Vec<String>) {
    let Some(lead) = cluster.consensus(leader) else {
        return (None, vec!["the leader crashed".to_string()]);
    };
    let reference = match scheduling::agent_state(lead).await {
        Ok(state) => state,
        Err(e) => return (None, vec![e]),
    };
    let mut problems = scheduling::check(&format!("n{leader}"), &reference, ops, plans);
    for id in cluster.up() {
        let Some(c) = cluster.consensus(id) else { continue };
        if id == leader {
            continue;
        }
        match scheduling::agent_state(c).await {
            Ok(state) if state == reference => {}
            Ok(state) => {
                problems.push(format!(
                    "n{id}'s replica of the agent tables differs from the leader n{leader}'s"
                ));
                problems.extend(scheduling::check(&format!("n{id}"), &state, ops, &[]));
            }
            Err(e) => problems.push(format!("n{id}: {e}")),
        }
    }
    (Some(reference), problems)
}
