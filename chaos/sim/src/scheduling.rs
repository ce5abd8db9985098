//! The scheduler in the simulation: synthetic nodes, an agent client, the
//! leader's scheduler round, and the checks of the placements it leaves.
//!
//! Agents here are records of the replicated state machine; nothing runs
//! them (no node runtime, no OS process), so an allocation stays `pending`
//! and no node ever reports or releases one.
//!
//! - **Nodes**: before the workload, [`register_nodes`] records
//!   [`AGENT_NODES`] nodes with [`NODE_CPU_CORES`] cores and
//!   [`NODE_MEMORY_MB`] MB each (`NodeCommand::SetResources`, what a node
//!   proposes when it joins). The pool of agents asks for more than they
//!   offer, so some agents cannot be placed.
//! - **Agent client** ([`agent_client`], one actor of
//!   [`Clock::sleep_in_slot`]): submits `Run` (a spec fixed per name for the
//!   seed) and `Stop` for agents of a pool of [`AGENTS`] names, seeded,
//!   to the member that leads (not forwarded: see [`agent_client`]), and
//!   records each with its outcome ([`AgentOp`]).
//! - **Scheduler** ([`scheduler`], another actor): every [`ROUND`], on the
//!   member that sees itself lead, one round as the node's scheduler task
//!   (`node/src/scheduling.rs`) runs it: read the pending evaluations with
//!   their agents and allocations and the nodes, from one point-in-time view
//!   of that member's replica after a linearizable read barrier; run the
//!   pure [`cell0_scheduler::process`]; propose the plan as one
//!   `AgentCommand::Plan`, only in the term it read in
//!   (`Consensus::propose_as_leader`), which the state machine validates
//!   again as it applies. That loop lives in the `cell0` binary
//!   crate (private to it, with metrics, drains and a watch on the agent
//!   table, and the node's whole dependency tree); the simulator repeats
//!   only its round, with the same public functions of `cell0_consensus`
//!   and `cell0_scheduler`, so that it stays a function of the simulated
//!   clock. Each acknowledged plan is kept ([`PlanCommit`]).
//! - **Checks** ([`check`]), on each member's replica ([`AgentState`])
//!   after the heal, once the scheduler settled ([`settle`]: the evaluation
//!   queue is empty and the allocations stay as they are over a few more
//!   rounds):
//!   - an agent that should run holds exactly one allocation, on one node,
//!     unless no node has room for it;
//!   - no node holds more than its capacity, and its recorded usage is the
//!     sum of what its allocations hold;
//!   - no agent that should be stopped holds resources;
//!   - an agent whose last operation was acknowledged (and none of whose
//!     operations has an unknown outcome) is in the state that operation
//!     asked for;
//!   - acknowledged plans never placed one agent twice in a plan, or for
//!     one generation twice, and no placement's incarnation was reused or
//!     lost.
//!
//! Invariants: at most one plan in flight (the scheduler is one actor);
//! every random choice comes from the seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cell0_consensus::agents::{
    self, AgentCommand, AgentKind, AgentOutcome, AgentRecord, AgentSpec, Allocation, Constraints, Desired, EvalTrigger,
    NodeState, Placement, PlanOutcome, Resources, RestartPolicy,
};
use cell0_consensus::{Consensus, Consistency, NodeCommand, NodeId, NodeResources, Response, Role, nodes, registry};
use cell0_scheduler::{ClusterView, Evaluation, NodeView, Options, RECHECK_LOOKS, RoomWatch, Trigger};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use cell0_chaos::history::Status;

use crate::workload::{Clock, Handles, OP_TIMEOUT};

/// The synthetic nodes agents are placed on.
pub const AGENT_NODES: u64 = 3;
/// The first synthetic node's id (the others follow).
pub const FIRST_AGENT_NODE: NodeId = 0x5100;
/// Cores of each synthetic node.
pub const NODE_CPU_CORES: u32 = 2;
/// Memory of each synthetic node, in MB.
pub const NODE_MEMORY_MB: u64 = 2048;
/// Agent names in the pool (`sim-agent-00` ..).
pub const AGENTS: usize = 12;
/// Pause between two scheduler rounds.
pub const ROUND: Duration = Duration::from_millis(100);
/// Most evaluations one round handles.
pub const EVALS_PER_PLAN: usize = 64;

/// Names of the agent pool.
pub fn agent_name(i: usize) -> String {
    format!("sim-agent-{i:02}")
}

/// The record of synthetic node `id`.
fn node_resources() -> NodeResources {
    NodeResources {
        cpu_cores: NODE_CPU_CORES,
        memory_bytes: NODE_MEMORY_MB * 1024 * 1024,
        inference_backend: "cpu".into(),
        device_type: "cpu".into(),
        ..NodeResources::default()
    }
}

/// Records every synthetic node through `c` (retrying for up to 30 s).
pub async fn register_nodes(c: &Consensus) -> Result<(), String> {
    for i in 0..AGENT_NODES {
        let cmd = NodeCommand::SetResources {
            node: FIRST_AGENT_NODE + i,
            resources: node_resources(),
        }
        .into_command();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout(OP_TIMEOUT, c.propose(cmd.clone())).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) if Instant::now() > deadline => return Err(format!("recording node {i}: {e}")),
                Err(_) if Instant::now() > deadline => return Err(format!("recording node {i}: timed out")),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// The spec of pool agent `i` for a seed: its resources drawn from `rng`.
fn agent_spec(i: usize, rng: &mut StdRng) -> AgentSpec {
    AgentSpec {
        name: agent_name(i),
        kind: AgentKind::Exec {
            command: vec!["/bin/true".into()],
            timeout_ms: 1_000,
            max_output_bytes: 1_024,
        },
        resources: Resources {
            cpu_millis: [250, 500, 1_000, 1_500, 2_000][rng.random_range(0..5)],
            memory_mb: rng.random_range(1..=8) * 128,
            gpu_memory_mb: 0,
        },
        constraints: Constraints::default(),
        restart: RestartPolicy::Always,
    }
}

/// What the agent client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentOpKind {
    /// `AgentCommand::Run`.
    Run,
    /// `AgentCommand::Stop`.
    Stop,
}

/// One operation of the agent client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOp {
    /// The agent.
    pub agent: String,
    /// Run or stop.
    pub kind: AgentOpKind,
    /// `ok` when applied, `fail` when certainly not, `unknown` otherwise.
    pub status: Status,
    /// What the state machine answered, when it was applied.
    pub outcome: Option<AgentOutcome>,
    /// Simulated microseconds when it was sent and when it returned.
    pub invoke_us: u64,
    /// See `invoke_us`.
    pub complete_us: u64,
}

/// The agent client.
#[derive(Debug, Clone, Copy)]
pub struct AgentClientSpec {
    /// The member it talks to while none is known to lead.
    pub home: NodeId,
    /// Its actor slot of [`Clock::sleep_in_slot`], and the number of slots.
    pub slot: (u64, u64),
    /// Longest pause between two operations.
    pub think: Duration,
    /// Its random choices (the pool's specs too).
    pub seed: u64,
}

/// Runs the agent client until `until`: about three runs for each stop.
///
/// It sends to the member that leads: when its requests were forwarded
/// through another member, they shared that member's connection to the
/// leader with the register clients' requests, and the order of the two
/// on it differed between runs of a seed (seed 2 without faults reran
/// differently one time in two).
pub async fn agent_client(spec: AgentClientSpec, handles: Handles, clock: Clock, until: Instant) -> Vec<AgentOp> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let specs: Vec<AgentSpec> = (0..AGENTS).map(|i| agent_spec(i, &mut rng)).collect();
    let mut out = Vec::new();
    while Instant::now() < until {
        let think = u64::try_from(spec.think.as_micros()).unwrap_or(u64::MAX).max(1);
        let think = Duration::from_micros(rng.random_range(0..think));
        clock.sleep_in_slot(think, spec.slot.0, spec.slot.1).await;
        // The member that leads, as a client following redirects reaches
        // it: a request forwarded by another member would share that
        // member's connection to the leader with the register clients'
        // requests, whose order on it tokio may draw differently per run.
        let Some(c) = leading(&handles).or_else(|| handles.pick(spec.home).map(|(_, c)| c)) else {
            continue;
        };
        let i = rng.random_range(0..AGENTS);
        let (kind, cmd) = if rng.random_range(0..4) < 3 {
            let cmd = AgentCommand::Run {
                spec: specs[i].clone(),
                at_ms: clock.now_us() / 1_000,
            };
            (AgentOpKind::Run, cmd)
        } else {
            let cmd = AgentCommand::Stop {
                agent: specs[i].name.clone(),
                at_ms: clock.now_us() / 1_000,
            };
            (AgentOpKind::Stop, cmd)
        };
        let invoke_us = clock.now_us();
        let answer = tokio::time::timeout(OP_TIMEOUT, c.propose(cmd.into_command())).await;
        let (status, outcome) = match answer {
            Ok(Ok(Response::Agent(o))) => (Status::Ok, Some(o)),
            Ok(Ok(_)) => (Status::Unknown, None),
            Ok(Err(cell0_consensus::ConsensusError::InvalidArgument { .. })) => (Status::Fail, None),
            Ok(Err(_)) | Err(_) => (Status::Unknown, None),
        };
        out.push(AgentOp {
            agent: specs[i].name.clone(),
            kind,
            status,
            outcome,
            invoke_us,
            complete_us: clock.now_us(),
        });
    }
    out
}

/// A plan the state machine applied, as the scheduler proposed it and as
/// the state machine answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanCommit {
    /// The placements proposed.
    pub placements: Vec<Placement>,
    /// The agents it left unplaced (no room, or no node that may take them).
    pub unplaced: Vec<String>,
    /// What applying the plan did.
    pub outcome: PlanOutcome,
}

/// What the scheduler actor did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerLog {
    /// Plans acknowledged, in order.
    pub commits: Vec<PlanCommit>,
    /// Plans whose proposal failed or timed out (applied or not).
    pub unknown: u64,
}

fn trigger(t: EvalTrigger) -> Trigger {
    match t {
        EvalTrigger::Changed | EvalTrigger::Unblocked => Trigger::Changed,
        EvalTrigger::NodeDown => Trigger::NodeDown,
        EvalTrigger::Drain => Trigger::Drain,
        EvalTrigger::Migrate { to } => Trigger::Migrate {
            to: (to != 0).then_some(to),
        },
    }
}

/// The nodes as the scheduler sees them (as `cluster_view` of the node's
/// scheduler builds them).
fn cluster_view(txn: &dyn cell0_state::Txn) -> cell0_state::Result<ClusterView> {
    let mut models: BTreeMap<NodeId, BTreeSet<String>> = BTreeMap::new();
    for entry in registry::list(txn)? {
        for holder in &entry.holders {
            models.entry(*holder).or_default().insert(entry.manifest.name.clone());
        }
    }
    let mut usages = agents::node_usages(txn)?;
    let mut statuses = agents::node_statuses(txn)?;
    let mut labels = nodes::labels(txn)?;
    let liveness = nodes::liveness(txn)?;
    let mut view = Vec::new();
    for (id, record) in nodes::resources(txn)? {
        view.push(NodeView {
            id,
            capacity: Resources::of_node(&record),
            usage: usages.remove(&id).unwrap_or_default(),
            state: statuses.remove(&id).map_or(NodeState::Ready, |s| s.state),
            unreachable: liveness.get(&id).is_some_and(|l| l.liveness == nodes::Liveness::Dead),
            gpu: record.gpu,
            labels: labels.remove(&id).unwrap_or_default(),
            models: models.remove(&id).unwrap_or_default(),
        });
    }
    Ok(ClusterView::new(view))
}

/// One round's input: the pending evaluations (with their agents and
/// allocations) and the nodes, from one view of the replica.
fn read_round(txn: &dyn cell0_state::Txn) -> cell0_state::Result<(Vec<Evaluation>, ClusterView)> {
    let mut evals = Vec::new();
    for (name, eval) in agents::pending_evals(txn, "", EVALS_PER_PLAN)? {
        let Some(record) = agents::agent(txn, &name)? else {
            continue;
        };
        evals.push(Evaluation {
            current: agents::allocation(txn, &name)?,
            generation: record.generation,
            desired: record.desired,
            spec: record.spec,
            trigger: trigger(eval.trigger),
        });
    }
    if evals.is_empty() {
        return Ok((evals, ClusterView::default()));
    }
    Ok((evals, cluster_view(txn)?))
}

/// The member that sees itself lead in the highest term, among those up.
fn leading(handles: &Handles) -> Option<Consensus> {
    handles
        .up()
        .into_iter()
        .filter_map(|id| handles.pick(id).filter(|(n, _)| *n == id).map(|(_, c)| c))
        .filter(|c| c.status().role == Role::Leader)
        .max_by_key(|c| c.status().term)
}

/// One scheduler round on `c`: whether it had evaluations to handle.
async fn round(c: &Consensus, clock: Clock, log: &mut SchedulerLog) -> bool {
    let term = c.status().term;
    let Ok((evals, view)) = c.read(Consistency::Linearizable, read_round).await else {
        return false;
    };
    if evals.is_empty() {
        return false;
    }
    let plan = cell0_scheduler::process(&evals, &view, Options::default());
    let placements = plan.placements.clone();
    let unplaced = plan.unplaced.iter().map(|u| u.agent.clone()).collect();
    let cmd = AgentCommand::Plan {
        plan,
        at_ms: clock.now_us() / 1_000,
    };
    match c.propose_as_leader(cmd.into_command(), term).await {
        Ok(Response::Agent(AgentOutcome::Planned(outcome))) => log.commits.push(PlanCommit {
            placements,
            unplaced,
            outcome,
        }),
        _ => log.unknown += 1,
    }
    true
}

/// After a round, as the node's loop does: [`AgentCommand::Unblock`] when
/// room was freed on a node while agents wait for it ([`RoomWatch`]).
async fn unblock_if_room_freed(c: &Consensus, clock: Clock, room: &mut RoomWatch) {
    let Ok(read) = c.read(Consistency::Serializable, agents::blocked_usage).await else {
        return;
    };
    let Some((blocked, usage)) = read else {
        room.reset();
        return;
    };
    let unblock = room.should_unblock(blocked, &usage);
    if unblock {
        let cmd = AgentCommand::Unblock {
            at_ms: clock.now_us() / 1_000,
        };
        if c.propose(cmd.into_command()).await.is_err() {
            // Not seen: the next round asks again.
            return;
        }
    }
    room.seen(usage, unblock);
}

/// Runs scheduler rounds on whichever member leads, one every [`ROUND`] in
/// actor slot `slot.0` of `slot.1`, until `stop` is set.
pub async fn scheduler(handles: Handles, clock: Clock, slot: (u64, u64), stop: Arc<AtomicBool>) -> SchedulerLog {
    let mut log = SchedulerLog::default();
    let mut room = RoomWatch::default();
    // The member the watch has seen lead: another one starts afresh.
    let mut leader = None;
    while !stop.load(Ordering::Relaxed) {
        clock.sleep_in_slot(ROUND, slot.0, slot.1).await;
        if let Some(c) = leading(&handles) {
            let now = Some((c.id(), c.status().term));
            if now != leader {
                room.reset();
                leader = now;
            }
            // Unblock first: the last step before a stop is then a round,
            // which evaluates what an unblock queued.
            unblock_if_room_freed(&c, clock, &mut room).await;
            round(&c, clock, &mut log).await;
        }
    }
    log
}

/// One member's replica of what the checks read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    /// Agent records, by name.
    pub records: BTreeMap<String, AgentRecord>,
    /// Current allocations, by agent.
    pub allocations: BTreeMap<String, Allocation>,
    /// What each node offers.
    pub capacity: BTreeMap<NodeId, Resources>,
    /// What each node's allocations hold, as recorded.
    pub usage: BTreeMap<NodeId, Resources>,
    /// The agents indexed on each node.
    pub on_node: BTreeMap<NodeId, Vec<String>>,
    /// Scheduling states other than ready.
    pub states: BTreeMap<NodeId, NodeState>,
    /// Evaluations pending.
    pub pending: u64,
}

impl AgentState {
    /// Agents placed, agents that should run but wait for room, and
    /// agents stopped.
    pub fn summary(&self) -> (usize, usize, usize) {
        let placed = self.allocations.values().filter(|a| a.status.holds_resources()).count();
        let stopped = self.records.values().filter(|r| r.desired == Desired::Stopped).count();
        (placed, self.records.len() - placed - stopped, stopped)
    }
}

fn read_state(txn: &dyn cell0_state::Txn) -> cell0_state::Result<AgentState> {
    let mut state = AgentState::default();
    for record in agents::agents_after(txn, "", usize::MAX)? {
        if let Some(a) = agents::allocation(txn, &record.spec.name)? {
            state.allocations.insert(record.spec.name.clone(), a);
        }
        state.records.insert(record.spec.name.clone(), record);
    }
    for (id, record) in nodes::resources(txn)? {
        state.capacity.insert(id, Resources::of_node(&record));
        state.on_node.insert(id, agents::agents_on(txn, id, usize::MAX)?);
    }
    state.usage = agents::node_usages(txn)?;
    state.states = agents::node_statuses(txn)?
        .into_iter()
        .map(|(id, s)| (id, s.state))
        .collect();
    state.pending = agents::pending_eval_count(txn)?;
    Ok(state)
}

/// `c`'s replica of the agent tables (serializable: the caller waited for
/// it to apply what the leader holds).
pub async fn agent_state(c: &Consensus) -> Result<AgentState, String> {
    tokio::time::timeout(OP_TIMEOUT, c.read(Consistency::Serializable, read_state))
        .await
        .map_err(|_| "reading the agent tables timed out".to_string())?
        .map_err(|e| format!("reading the agent tables: {e}"))
}

/// Waits (up to `limit`) until the member that leads has no evaluation
/// pending; whether it got there.
pub async fn quiesce(handles: &Handles, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(c) = leading(handles)
            && let Ok(Ok(0)) = tokio::time::timeout(
                OP_TIMEOUT,
                c.read(Consistency::Linearizable, agents::pending_eval_count),
            )
            .await
        {
            return true;
        }
        tokio::time::sleep(ROUND).await;
    }
    false
}

/// Most times [`settle`] looks whether the allocations stopped changing.
pub const SETTLE_LOOKS: usize = 5;

/// Lets the scheduler finish after the heal: waits until no evaluation is
/// pending, then `RECHECK_LOOKS` + 3 more rounds (time for the leader to see
/// room freed and unblock the agents waiting for it, [`RoomWatch`]), until the
/// allocations stop changing, at most [`SETTLE_LOOKS`] times.
pub async fn settle(handles: &Handles) -> Result<(), String> {
    let limit = Duration::from_secs(30);
    for _ in 0..SETTLE_LOOKS {
        if !quiesce(handles, limit).await {
            return Err("agent evaluations still pending 30 s after the heal".into());
        }
        let before = allocations(handles).await?;
        // Simulated time (the runtime's paused clock): enough scheduler
        // rounds for the leader to see room freed and unblock agents, also
        // room a placement hid from its usage totals (it asks again after
        // `RECHECK_LOOKS` quiet looks). Whether it did is the condition
        // checked below.
        tokio::time::sleep(ROUND * (RECHECK_LOOKS + 3)).await;
        if !quiesce(handles, limit).await {
            return Err("agent evaluations still pending 30 s after the heal".into());
        }
        if allocations(handles).await? == before {
            return Ok(());
        }
    }
    Err(format!("the allocations still changed after {SETTLE_LOOKS} looks"))
}

/// The allocations as the member that leads holds them.
async fn allocations(handles: &Handles) -> Result<BTreeMap<String, Allocation>, String> {
    let c = leading(handles).ok_or("no member leads")?;
    Ok(agent_state(&c).await?.allocations)
}

/// Checks one member's final `state` against the agent client's `ops` and
/// the scheduler's acknowledged plans (see the module notes); the
/// violations found, each prefixed with `who`.
pub fn check(who: &str, state: &AgentState, ops: &[AgentOp], plans: &[PlanCommit]) -> Vec<String> {
    let mut problems = Vec::new();
    let holding = |name: &str| state.allocations.get(name).filter(|a| a.status.holds_resources());
    // Capacity, and the usage index against the allocations.
    let mut held: BTreeMap<NodeId, Resources> = BTreeMap::new();
    for a in state.allocations.values().filter(|a| a.status.holds_resources()) {
        let sum = held.entry(a.node).or_default();
        *sum = sum.plus(a.resources);
    }
    for (node, sum) in &held {
        match state.capacity.get(node) {
            None => problems.push(format!("{who}: allocations on node {node:x}, which has no record")),
            Some(cap) => {
                if let Some(what) = sum.exceeds(cap) {
                    problems.push(format!(
                        "{who}: node {node:x} holds {sum:?}, over its capacity ({what})"
                    ));
                }
            }
        }
    }
    for node in state.capacity.keys() {
        let recorded = state.usage.get(node).copied().unwrap_or_default();
        let sum = held.get(node).copied().unwrap_or_default();
        if recorded != sum {
            problems.push(format!(
                "{who}: node {node:x}'s recorded usage {recorded:?} is not its allocations' {sum:?}"
            ));
        }
    }
    // Each agent on at most one node's index, the node of its allocation.
    let mut indexed: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for (node, names) in &state.on_node {
        for name in names {
            indexed.entry(name).or_default().push(*node);
        }
    }
    for (name, record) in &state.records {
        let on = indexed.remove(name.as_str()).unwrap_or_default();
        let alloc = holding(name);
        let expected: Vec<NodeId> = alloc.map(|a| a.node).into_iter().collect();
        if on != expected {
            problems.push(format!(
                "{who}: {name} is indexed on nodes {on:x?}, its allocation holds on {expected:x?}"
            ));
        }
        match record.desired {
            Desired::Stopped => {
                if let Some(a) = alloc {
                    problems.push(format!(
                        "{who}: {name} is stopped but holds an allocation on node {:x}",
                        a.node
                    ));
                }
            }
            Desired::Running if alloc.is_none() => {
                let fits = state.capacity.iter().find(|(node, cap)| {
                    state.states.get(node).is_none_or(|s| *s == NodeState::Ready)
                        && held
                            .get(node)
                            .copied()
                            .unwrap_or_default()
                            .plus(record.spec.resources)
                            .exceeds(cap)
                            .is_none()
                });
                if let Some((node, _)) = fits {
                    problems.push(format!(
                        "{who}: {name} should run and is not placed, though node {node:x} has room for it \
                         (generation {}, allocation {:?}, reason {:?})",
                        record.generation,
                        state.allocations.get(name),
                        record.pending_reason
                    ));
                } else if record.pending_reason.is_empty() {
                    problems.push(format!("{who}: {name} is not placed and no reason is recorded"));
                }
            }
            Desired::Running => {}
        }
    }
    for (name, nodes) in indexed {
        problems.push(format!(
            "{who}: {name} has no record but is indexed on nodes {nodes:x?}"
        ));
    }
    if state.pending != 0 {
        problems.push(format!("{who}: {} evaluations still pending", state.pending));
    }
    // Acknowledged operations.
    let mut by_agent: BTreeMap<&str, Vec<&AgentOp>> = BTreeMap::new();
    for op in ops {
        by_agent.entry(&op.agent).or_default().push(op);
    }
    for (name, ops) in by_agent {
        let Some(last) = ops.last() else { continue };
        if last.status != Status::Ok || ops.iter().any(|o| o.status == Status::Unknown) {
            continue;
        }
        let record = state.records.get(name);
        let refused = matches!(last.outcome, Some(AgentOutcome::Refused(_)));
        let ok = match (last.kind, record) {
            (AgentOpKind::Run, Some(r)) => r.desired == Desired::Running,
            (AgentOpKind::Stop, Some(r)) => r.desired == Desired::Stopped && !refused,
            (AgentOpKind::Stop, None) => refused,
            (AgentOpKind::Run, None) => false,
        };
        if !ok {
            problems.push(format!(
                "{who}: {name}'s last operation, an acknowledged {:?} ({:?}), left it {:?}",
                last.kind,
                last.outcome,
                record.map(|r| r.desired)
            ));
        }
    }
    // Acknowledged plans.
    let mut generations = BTreeSet::new();
    let mut incarnations = BTreeSet::new();
    for (i, plan) in plans.iter().enumerate() {
        let mut in_plan = BTreeSet::new();
        for p in &plan.placements {
            if !in_plan.insert(p.agent.as_str()) {
                problems.push(format!("plan {i} places {} twice", p.agent));
            }
        }
        for (agent, incarnation) in &plan.outcome.placed {
            let Some(p) = plan.placements.iter().find(|p| &p.agent == agent) else {
                problems.push(format!("plan {i} placed {agent}, which it did not propose"));
                continue;
            };
            if !generations.insert((agent.as_str(), p.generation)) {
                problems.push(format!("plan {i} placed {agent} again for generation {}", p.generation));
            }
            if !incarnations.insert((agent.as_str(), *incarnation)) {
                problems.push(format!("plan {i} gave {agent} incarnation {incarnation} again"));
            }
            if state.records.get(agent).is_none_or(|r| r.incarnation < *incarnation) {
                problems.push(format!(
                    "{who}: {agent}'s incarnation {incarnation} from plan {i} was lost"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cell0_consensus::agents::AllocStatus;

    use super::*;

    fn spec(i: usize, cpu_millis: u64) -> AgentSpec {
        let mut rng = StdRng::seed_from_u64(0);
        AgentSpec {
            resources: Resources {
                cpu_millis,
                memory_mb: 128,
                gpu_memory_mb: 0,
            },
            ..agent_spec(i, &mut rng)
        }
    }

    fn record(spec: AgentSpec, desired: Desired, incarnation: u64) -> AgentRecord {
        AgentRecord {
            spec,
            desired,
            generation: 1,
            incarnation,
            pending_reason: String::new(),
            created_at_ms: 0,
        }
    }

    fn alloc(node: NodeId, cpu_millis: u64, incarnation: u64) -> Allocation {
        Allocation {
            node,
            incarnation,
            status: AllocStatus::Pending,
            reason: String::new(),
            resources: Resources {
                cpu_millis,
                memory_mb: 128,
                gpu_memory_mb: 0,
            },
            generation: 1,
            updated_at_ms: 0,
        }
    }

    /// Two nodes of 2 cores; agent 0 (1.5 cores) on node 1, agent 1 (1.5
    /// cores) on node 2, agent 2 (1.5 cores) unplaced for want of room.
    fn healthy() -> AgentState {
        let cap = Resources::of_node(&node_resources());
        let mut s = AgentState::default();
        for node in [1, 2] {
            s.capacity.insert(node, cap);
        }
        for (i, node) in [(0, Some(1)), (1, Some(2)), (2, None)] {
            let mut r = record(spec(i, 1_500), Desired::Running, u64::from(node.is_some()));
            if let Some(node) = node {
                s.allocations.insert(agent_name(i), alloc(node, 1_500, 1));
                s.on_node.entry(node).or_default().push(agent_name(i));
                s.usage.insert(node, alloc(node, 1_500, 1).resources);
            } else {
                r.pending_reason = "2 nodes lack cpu".into();
            }
            s.records.insert(agent_name(i), r);
        }
        s
    }

    fn placed(agent: usize, generation: u64, incarnation: u64) -> PlanCommit {
        PlanCommit {
            placements: vec![Placement {
                agent: agent_name(agent),
                generation,
                node: 1,
            }],
            unplaced: Vec::new(),
            outcome: PlanOutcome {
                placed: vec![(agent_name(agent), incarnation)],
                ..PlanOutcome::default()
            },
        }
    }

    #[test]
    fn a_healthy_state_passes() {
        let run = AgentOp {
            agent: agent_name(0),
            kind: AgentOpKind::Run,
            status: Status::Ok,
            outcome: Some(AgentOutcome::Generation(1)),
            invoke_us: 0,
            complete_us: 1,
        };
        let problems = check("n1", &healthy(), &[run], &[placed(0, 1, 1)]);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn each_broken_invariant_is_reported() {
        // Over capacity: agent 2 placed on node 1 too.
        let mut s = healthy();
        s.allocations.insert(agent_name(2), alloc(1, 1_500, 1));
        s.on_node.entry(1).or_default().push(agent_name(2));
        s.usage.insert(1, alloc(1, 3_000, 1).resources);
        let problems = check("n1", &s, &[], &[]);
        assert!(problems.iter().any(|p| p.contains("over its capacity")), "{problems:?}");

        // Placed twice: agent 0 indexed on both nodes.
        let mut s = healthy();
        s.on_node.entry(2).or_default().push(agent_name(0));
        let problems = check("n1", &s, &[], &[]);
        assert!(problems.iter().any(|p| p.contains("indexed on nodes")), "{problems:?}");

        // A stopped agent holding its allocation.
        let mut s = healthy();
        if let Some(r) = s.records.get_mut(&agent_name(1)) {
            r.desired = Desired::Stopped;
        }
        let problems = check("n1", &s, &[], &[]);
        assert!(
            problems.iter().any(|p| p.contains("is stopped but holds")),
            "{problems:?}"
        );

        // Unplaced although a node has room.
        let mut s = healthy();
        s.capacity.insert(3, Resources::of_node(&node_resources()));
        let problems = check("n1", &s, &[], &[]);
        assert!(problems.iter().any(|p| p.contains("has room")), "{problems:?}");

        // An acknowledged stop that did not stick.
        let stop = AgentOp {
            agent: agent_name(0),
            kind: AgentOpKind::Stop,
            status: Status::Ok,
            outcome: Some(AgentOutcome::Generation(2)),
            invoke_us: 0,
            complete_us: 1,
        };
        let problems = check("n1", &healthy(), &[stop], &[]);
        assert!(problems.iter().any(|p| p.contains("acknowledged Stop")), "{problems:?}");

        // Two plans placing one generation twice.
        let problems = check("n1", &healthy(), &[], &[placed(0, 1, 1), placed(0, 1, 2)]);
        assert!(
            problems.iter().any(|p| p.contains("again for generation")),
            "{problems:?}"
        );
    }
}
