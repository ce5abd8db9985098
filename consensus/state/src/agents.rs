//! Replicated agents: their specs, where they run (allocations, each with an
//! incarnation number that fences older ones), and node scheduling status.
//!
//! Tables (in the state column family), every row versioned:
//! - `agents`: agent name -> [`AgentRecord`] (spec, desired status,
//!   generation, the last incarnation issued, why it is pending);
//! - `allocations`: agent name -> [`Allocation`] (node, incarnation, status);
//! - `node_allocs`: node id (big-endian) ++ agent name -> empty, the
//!   allocations on a node that hold resources (an index of `allocations`);
//! - `node_usage`: node id -> [`Resources`] held there (the sum of its
//!   indexed allocations' requests);
//! - `node_status`: node id -> [`NodeStatus`] (ready, draining, ineligible,
//!   down, with a reason);
//! - `evals`: agent name -> [`Eval`], the agents the scheduler must look at
//!   (Nomad's evaluations): written by every change that may need a new
//!   placement or a stop, removed by the plan that handles it;
//! - `blocked`: agent name -> [`Eval`], agents the last plan could not
//!   place; any change to nodes (a record, a status) moves them back to
//!   `evals`;
//! - `stopping`: agent name ++ 0 ++ incarnation (big-endian) -> [`Stopping`],
//!   incarnations the cluster ended (stopped, moved) whose node has not yet
//!   confirmed that they no longer run ([`AgentCommand::Released`]);
//! - `drains`: node id -> [`DrainSpec`], how a draining node's agents move
//!   (at most so many at once, the rest at a deadline);
//! - `agent_sites`: agent name -> [`AgentSites`], the sites an agent may run
//!   in, in order of preference (no row: the site it was submitted to);
//! - `drain_moves`: node id ++ agent name -> [`DrainMove`], the moves a
//!   drain started that have not ended: the agent is not yet running or
//!   failed on another node;
//! - in `meta`: the row counts of `evals`, `stopping` and `blocked`
//!   (`codec::Counted`: an empty table costs a read, not a scan over deleted
//!   keys), and per node the changes to what its runtime reads
//!   ([`node_changes`]).
//!
//! Invariants (every apply keeps them; the tests check them):
//! - An agent has at most one allocation, and its incarnation is the
//!   agent's `incarnation`: a placement issues the next one, so a result or
//!   a status from any earlier incarnation is refused ([`AgentCommand::Report`]).
//! - `node_usage` of a node is the sum of the requests of the allocations
//!   `node_allocs` lists for it, and those are exactly the allocations on
//!   that node whose status holds resources ([`AllocStatus::holds_resources`]).
//! - A plan is validated again when applied ([`AgentCommand::Plan`]): a
//!   placement for another generation of the agent, onto a node that is not
//!   ready or lacks capacity (counting the placements accepted before it in
//!   the same plan) is refused with its reason, and the rest still applies.
//! - Times come from the command (the leader's clock when it proposed), never
//!   from a clock inside apply.
//! - An agent whose desired status and allocation disagree (running but not
//!   placed on a usable node, or stopped but still holding resources) has an
//!   evaluation, pending or blocked, so no agent is forgotten. The one
//!   exception is an allocation its node reported failed: the node applied
//!   the restart policy already, so it stays failed until the agent is run
//!   again.
//! - Never two incarnations at once: an incarnation the cluster ends on a
//!   node that is not down gets a `stopping` row, and a node starts a new
//!   incarnation only once the agent has no `stopping` row left
//!   ([`stopping_of`]). The row goes when its node confirms the stop, or
//!   when the node is declared down (which happens only after its lease
//!   expired, and a node stops its agents before that).
//! - A drain with `max_parallel = n` has at most `n` rows in `drain_moves`;
//!   each row's agent has an evaluation or runs elsewhere, and it starts the
//!   next move when one ends ([`AgentCommand::Drain`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::codec::{Counted, decode_row, get_row, put_row, rows_by_node};
use crate::error::{Result, StateError};
use crate::kv;
use crate::nodes;
use crate::txn::{Txn, prefix_end};

const AGENTS_TABLE: &str = "agents";
const ALLOCATIONS_TABLE: &str = "allocations";
const NODE_ALLOCS_TABLE: &str = "node_allocs";
const NODE_USAGE_TABLE: &str = "node_usage";
const NODE_STATUS_TABLE: &str = "node_status";
const EVALS_TABLE: &str = "evals";
/// Pending evaluations, counted: the leader's scheduler looks after every
/// change.
const EVALS: Counted = Counted {
    table: EVALS_TABLE,
    count_key: b"evals_pending",
};
const BLOCKED_TABLE: &str = "blocked";
const STOPPING_TABLE: &str = "stopping";
/// Stopping incarnations, counted: every node's runtime looks after every
/// change.
const STOPPING: Counted = Counted {
    table: STOPPING_TABLE,
    count_key: b"stopping_rows",
};
/// Blocked agents, counted: every node change looks.
const BLOCKED: Counted = Counted {
    table: BLOCKED_TABLE,
    count_key: b"blocked_agents",
};
const DRAINS_TABLE: &str = "drains";
const AGENT_SITES_TABLE: &str = "agent_sites";
const DRAIN_MOVES_TABLE: &str = "drain_moves";

/// Longest agent name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest model name a constraint may require, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 256;
/// Most arguments of a command.
pub const MAX_ARGS: usize = 256;
/// Longest argument, in bytes.
pub const MAX_ARG_BYTES: usize = 4096;
/// Longest reason a report or a node status may carry, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most placements (and stops) one plan may carry.
pub const MAX_PLAN_ITEMS: usize = 20_000;
/// Most CPU an agent may request, in millicores.
pub const MAX_CPU_MILLIS: u32 = 1_024_000;
/// Most memory or GPU memory an agent may request, in MB.
pub const MAX_MEMORY_MB: u32 = 16 * 1024 * 1024;
/// Most sites an agent may name.
pub const MAX_SITES: usize = 16;
/// Longest site name, in bytes.
pub const MAX_SITE_BYTES: usize = 64;
/// Most moves a drain may run at once (0 means all at once).
pub const MAX_DRAIN_PARALLEL: u32 = 10_000;
/// Longest run time of an `exec` task, in milliseconds.
pub const MAX_TASK_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Most output an `exec` task may return, in bytes.
pub const MAX_TASK_OUTPUT_BYTES: u64 = 1024 * 1024;

/// What an agent asks of the node it runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU, in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory, in MB.
    pub memory_mb: u64,
    /// GPU memory, in MB.
    pub gpu_memory_mb: u64,
}

crate::row_v1!(Resources, "node usage");

impl Resources {
    /// The sum, dimension by dimension (saturating).
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
            gpu_memory_mb: self.gpu_memory_mb.saturating_add(other.gpu_memory_mb),
        }
    }

    /// The difference, dimension by dimension (saturating at 0).
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            gpu_memory_mb: self.gpu_memory_mb.saturating_sub(other.gpu_memory_mb),
        }
    }

    /// The first dimension in which `self` exceeds `capacity`, named as a
    /// person reads it.
    pub fn exceeds(&self, capacity: &Resources) -> Option<&'static str> {
        if self.cpu_millis > capacity.cpu_millis {
            Some("cpu")
        } else if self.memory_mb > capacity.memory_mb {
            Some("memory")
        } else if self.gpu_memory_mb > capacity.gpu_memory_mb {
            Some("gpu memory")
        } else {
            None
        }
    }

    /// What a node offers to agents, from its replicated record.
    pub fn of_node(r: &nodes::NodeResources) -> Resources {
        Resources {
            cpu_millis: u64::from(r.cpu_cores) * 1000,
            memory_mb: r.memory_bytes / (1024 * 1024),
            gpu_memory_mb: r.gpu_memory_bytes / (1024 * 1024),
        }
    }
}

/// Where an agent may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraints {
    /// Node labels that must be present with these values.
    pub labels: BTreeMap<String, String>,
    /// Whether the node must run its inference engine on a hardware GPU.
    pub gpu: bool,
    /// A model the node must hold, by name (empty: none).
    pub model: String,
}

/// When a stopped or failed agent is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// When it failed, up to `max_restarts` times in a row.
    OnFailure {
        /// Restarts allowed before it stays failed.
        max_restarts: u32,
    },
    /// Whenever it ends.
    #[default]
    Always,
}

/// What an agent runs, by kind. Frozen-variant rule: the variant index is
/// its tag; a change adds a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentKind {
    /// One command per task: input on stdin, output from stdout.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
        /// Wall-clock limit of one task, in milliseconds.
        timeout_ms: u64,
        /// Output kept from one task, in bytes.
        max_output_bytes: u64,
    },
    /// A supervised long-running process.
    Process {
        /// Program and arguments.
        command: Vec<String>,
        /// Between SIGTERM and SIGKILL, in milliseconds.
        grace_ms: u64,
    },
    /// Tasks answered by the node's inference engine (embed, remember,
    /// recall).
    Inference,
}

impl AgentKind {
    /// The kind's name, as specs write it.
    pub fn name(&self) -> &'static str {
        match self {
            AgentKind::Exec { .. } => "exec",
            AgentKind::Process { .. } => "process",
            AgentKind::Inference => "inference",
        }
    }
}

/// What a user asks to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// Unique name: 1..=[`MAX_NAME_BYTES`] of `a-z`, `0-9`, `-`, `_`, `.`.
    pub name: String,
    /// What it runs.
    pub kind: AgentKind,
    /// What it needs.
    pub resources: Resources,
    /// Where it may run.
    pub constraints: Constraints,
    /// When it is started again.
    pub restart: RestartPolicy,
}

/// Checks an agent name; the error names `field`.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(StateError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(StateError::too_long(field, name.len(), MAX_NAME_BYTES));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(StateError::invalid(
            field,
            format!("contains {c:?}; use a-z, 0-9, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

fn check_command(field: &str, command: &[String]) -> Result<()> {
    if command.is_empty() || command[0].is_empty() {
        return Err(StateError::invalid(field, "must name a program"));
    }
    if command.len() > MAX_ARGS {
        return Err(StateError::invalid(
            field,
            format!("has {} arguments; the limit is {MAX_ARGS}", command.len()),
        ));
    }
    for (i, arg) in command.iter().enumerate() {
        if arg.len() > MAX_ARG_BYTES {
            return Err(StateError::too_long(&format!("{field}[{i}]"), arg.len(), MAX_ARG_BYTES));
        }
    }
    Ok(())
}

fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<()> {
    if value < min || value > max {
        return Err(StateError::invalid(
            field,
            format!("is {value}; it must be between {min} and {max}"),
        ));
    }
    Ok(())
}

impl AgentSpec {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        check_name("name", &self.name)?;
        match &self.kind {
            AgentKind::Exec {
                command,
                timeout_ms,
                max_output_bytes,
            } => {
                check_command("config.command", command)?;
                check_range("config.timeout_ms", *timeout_ms, 1, MAX_TASK_TIMEOUT_MS)?;
                check_range("config.max_output_bytes", *max_output_bytes, 1, MAX_TASK_OUTPUT_BYTES)?;
            }
            AgentKind::Process { command, grace_ms } => {
                check_command("config.command", command)?;
                check_range("config.grace_ms", *grace_ms, 0, 3_600_000)?;
            }
            AgentKind::Inference => {
                if self.constraints.model.is_empty() {
                    return Err(StateError::invalid(
                        "constraints.model",
                        "must name the model an inference agent embeds with",
                    ));
                }
            }
        }
        let r = &self.resources;
        check_range("resources.cpu_millis", r.cpu_millis, 1, u64::from(MAX_CPU_MILLIS))?;
        check_range("resources.memory_mb", r.memory_mb, 1, u64::from(MAX_MEMORY_MB))?;
        check_range("resources.gpu_memory_mb", r.gpu_memory_mb, 0, u64::from(MAX_MEMORY_MB))?;
        let c = &self.constraints;
        // The labels an agent requires obey the same rules as a node's.
        nodes::check_labels("constraints.labels", &c.labels)?;
        if c.model.len() > MAX_MODEL_NAME_BYTES {
            return Err(StateError::too_long(
                "constraints.model",
                c.model.len(),
                MAX_MODEL_NAME_BYTES,
            ));
        }
        Ok(())
    }
}

/// Checks a site name; the error names `field`.
pub fn check_site(field: &str, site: &str) -> Result<()> {
    if site.is_empty() {
        return Err(StateError::invalid(field, "must not be empty"));
    }
    if site.len() > MAX_SITE_BYTES {
        return Err(StateError::too_long(field, site.len(), MAX_SITE_BYTES));
    }
    Ok(())
}

/// Checks the sites an agent may run in: at most [`MAX_SITES`], each named
/// once; the error names `field`.
pub fn check_sites(field: &str, sites: &[String]) -> Result<()> {
    if sites.len() > MAX_SITES {
        return Err(StateError::invalid(
            field,
            format!("names {} sites; the limit is {MAX_SITES}", sites.len()),
        ));
    }
    for (i, site) in sites.iter().enumerate() {
        check_site(&format!("{field}[{i}]"), site)?;
        if sites[..i].contains(site) {
            return Err(StateError::invalid(
                &format!("{field}[{i}]"),
                format!("names {site:?} twice"),
            ));
        }
    }
    Ok(())
}

/// The sites an agent may run in, in order of preference.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSites {
    /// Site names; never empty in a stored row.
    pub sites: Vec<String>,
}

crate::row_v1!(AgentSites, "agent sites");

/// The sites `agent` may run in, in order of preference (empty: no
/// restriction was given).
pub fn sites_of(txn: &dyn Txn, agent: &str) -> Result<Vec<String>> {
    Ok(get_row::<AgentSites>(txn, AGENT_SITES_TABLE, agent.as_bytes())?
        .map(|r| r.sites)
        .unwrap_or_default())
}

fn set_sites(txn: &mut dyn Txn, agent: &str, sites: &[String]) -> Result<()> {
    if sites.is_empty() {
        return txn.delete(AGENT_SITES_TABLE, agent.as_bytes());
    }
    put_row(
        txn,
        AGENT_SITES_TABLE,
        agent.as_bytes(),
        &AgentSites { sites: sites.to_vec() },
    )
}

/// What the user wants of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Desired {
    /// Placed and kept running.
    Running,
    /// Stopped, its allocation released.
    Stopped,
}

/// An agent as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The spec last submitted.
    pub spec: AgentSpec,
    /// What the user wants.
    pub desired: Desired,
    /// Bumped by every change of spec or desired status; a plan made for
    /// another generation is refused.
    pub generation: u64,
    /// The last incarnation issued (0: never placed).
    pub incarnation: u64,
    /// Why it is not placed, when it is not (for people: "2 nodes lack a
    /// GPU, 1 lacks memory").
    pub pending_reason: String,
    /// When it was first submitted (the proposing leader's clock, ms since
    /// the Unix epoch).
    pub created_at_ms: u64,
}

crate::row_v1!(AgentRecord, "agent record");

/// Where an allocation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocStatus {
    /// Placed; the node has not reported it running yet.
    Pending,
    /// Running on its node.
    Running,
    /// Stopped on purpose (the agent was stopped or moved).
    Stopped,
    /// Ended with an error.
    Failed,
    /// Its node was declared down.
    Lost,
}

impl AllocStatus {
    /// Whether an allocation in this status holds its node's resources.
    pub fn holds_resources(self) -> bool {
        matches!(self, AllocStatus::Pending | AllocStatus::Running)
    }
}

/// One incarnation of an agent on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The node it runs on.
    pub node: NodeId,
    /// Its fencing token: only this incarnation's reports count.
    pub incarnation: u64,
    /// Where it stands.
    pub status: AllocStatus,
    /// Why it is in that status (empty when there is nothing to say).
    pub reason: String,
    /// The resources it holds while [`AllocStatus::holds_resources`].
    pub resources: Resources,
    /// The generation of the agent it was placed for.
    pub generation: u64,
    /// When the status last changed (proposing leader's clock, ms).
    pub updated_at_ms: u64,
}

crate::row_v1!(Allocation, "allocation");

/// Whether a node takes new agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes new agents.
    Ready,
    /// Takes none; its agents are being moved away.
    Draining,
    /// Takes none; its agents stay.
    Ineligible,
    /// Declared down by the leader; its allocations are lost.
    Down,
}

/// A node's scheduling status. A node without one is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Whether it takes new agents.
    pub state: NodeState,
    /// Why (empty when ready).
    pub reason: String,
    /// Since when (proposing leader's clock, ms).
    pub since_ms: u64,
}

crate::row_v1!(NodeStatus, "node status");

/// How a draining node's agents move away (`cell0 node drain`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainSpec {
    /// Most of its agents moving at once: moved off the node and not yet
    /// running (or failed) elsewhere. 0: all at once.
    pub max_parallel: u32,
    /// From this time (ms since the Unix epoch, the leader's clock) the rest
    /// move at once: the leader then proposes the drain again with
    /// `max_parallel = 0`. 0: no deadline.
    pub deadline_ms: u64,
}

crate::row_v1!(DrainSpec, "drain");

/// A move a drain started that has not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainMove {
    /// When the drain started it (proposing leader's clock, ms).
    pub since_ms: u64,
}

crate::row_v1!(DrainMove, "drain move");

/// An ended incarnation whose node has not yet confirmed it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopping {
    /// The node it ran on.
    pub node: NodeId,
    /// When it was ended (proposing leader's clock, ms).
    pub since_ms: u64,
}

crate::row_v1!(Stopping, "stopping incarnation");

/// Why an agent must be looked at again. Frozen-variant rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvalTrigger {
    /// It was submitted, changed or stopped.
    Changed,
    /// Its node was declared down.
    NodeDown,
    /// Its node is draining.
    Drain,
    /// A user asked to move it (to `to`, when not 0).
    Migrate {
        /// The target node, 0 for any other.
        to: NodeId,
    },
    /// The nodes changed while it could not be placed.
    Unblocked,
}

/// A pending evaluation of one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eval {
    /// Why.
    pub trigger: EvalTrigger,
    /// The agent's generation when it was queued.
    pub generation: u64,
}

crate::row_v1!(Eval, "evaluation");

/// One agent placed onto one node by a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The agent.
    pub agent: String,
    /// The generation the scheduler saw.
    pub generation: u64,
    /// The chosen node.
    pub node: NodeId,
}

/// An agent the scheduler could not place, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// The agent.
    pub agent: String,
    /// The generation the scheduler saw.
    pub generation: u64,
    /// For people: what the nodes lack.
    pub reason: String,
}

/// An evaluation that needed nothing (the agent runs where it may, or is
/// stopped and holds nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// The agent.
    pub agent: String,
    /// The generation the scheduler saw.
    pub generation: u64,
}

/// What the scheduler decided for a set of evaluations, committed as one
/// command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// New allocations (a placed agent's old allocation is stopped).
    pub placements: Vec<Placement>,
    /// Allocations to stop (agents whose desired status is stopped).
    pub stops: Vec<String>,
    /// Agents left pending.
    pub unplaced: Vec<Unplaced>,
    /// Evaluations that needed nothing.
    pub settled: Vec<Settled>,
}

/// A change to agents, carried in [`crate::Command`]. Frozen-variant rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentCommand {
    /// Submits an agent, or a new spec for it (a new generation); the same
    /// spec again changes nothing.
    Run {
        /// The spec.
        spec: AgentSpec,
        /// The proposing leader's clock, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Asks for an agent to be stopped.
    Stop {
        /// The agent.
        agent: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// The scheduler's decisions, validated again as they apply.
    Plan {
        /// What to do.
        plan: Plan,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// A node reports an allocation's status; refused unless it comes from
    /// the agent's current incarnation.
    Report {
        /// The agent.
        agent: String,
        /// The reporting incarnation.
        incarnation: u64,
        /// Its new status.
        status: AllocStatus,
        /// Why.
        reason: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// Sets a node's scheduling status. `Down` marks its holding
    /// allocations lost and releases their resources; `Down` and `Draining`
    /// queue an evaluation for each agent that was on it.
    SetNodeState {
        /// The node.
        node: NodeId,
        /// Its new state.
        state: NodeState,
        /// Why.
        reason: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// Asks for an agent to be moved: to `to`, or to any other node when 0.
    Migrate {
        /// The agent.
        agent: String,
        /// The target node, 0 for any other.
        to: NodeId,
    },
    /// A node confirms that an incarnation the cluster ended no longer runs
    /// there (its `stopping` row goes, and the next incarnation may start).
    Released {
        /// The agent.
        agent: String,
        /// The ended incarnation.
        incarnation: u64,
        /// The confirming node (only the node it ran on may release it).
        node: NodeId,
    },
    /// Drains a node: it takes no new agents, and its agents move away at
    /// most `drain.max_parallel` at a time (each move queues an evaluation;
    /// the next starts when one ends). Proposed again, it replaces the
    /// drain's settings and keeps the moves under way.
    Drain {
        /// The node.
        node: NodeId,
        /// How its agents move.
        drain: DrainSpec,
        /// Why (shown with the node's status).
        reason: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// Evaluates every agent blocked for want of room again. The leader
    /// proposes it when room was freed on a node (an allocation stopped,
    /// was lost or moved away) while agents wait: the state machine itself
    /// unblocks them only on changes to node records or status.
    Unblock {
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// [`AgentCommand::Run`] with the sites the agent may run in, in order
    /// of preference (empty: no restriction). A handoff to a site not in a
    /// non-empty list is refused.
    RunIn {
        /// The spec.
        spec: AgentSpec,
        /// At most [`MAX_SITES`] site names.
        sites: Vec<String>,
        /// The proposing leader's clock, ms since the Unix epoch.
        at_ms: u64,
    },
}

/// What an [`AgentCommand`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentOutcome {
    /// The agent's generation after a run or stop (unchanged when nothing
    /// changed).
    Generation(u64),
    /// What a plan did.
    Planned(PlanOutcome),
    /// A report was recorded.
    Reported,
    /// The command was refused, with the reason (an unknown agent, a stale
    /// incarnation).
    Refused(String),
    /// A node state was recorded.
    NodeState,
    /// This many blocked agents were queued for evaluation again.
    Unblocked(u64),
}

/// What applying a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOutcome {
    /// Placements made, with the incarnation each received.
    pub placed: Vec<(String, u64)>,
    /// Placements refused, with the reason (evaluate these again).
    pub refused: Vec<(String, String)>,
    /// Allocations stopped.
    pub stopped: Vec<String>,
}

impl AgentCommand {
    /// The command carrying this change.
    pub fn into_command(self) -> crate::Command {
        crate::Command::Agent(self)
    }

    /// Approximate encoded size, for batching decisions.
    pub fn approx_size(&self) -> usize {
        let names = |n: &[String]| n.iter().map(|a| a.len() + 1).sum::<usize>();
        match self {
            AgentCommand::Run { spec, .. } => spec_size(spec),
            AgentCommand::RunIn { spec, sites, .. } => spec_size(spec) + names(sites),
            AgentCommand::Plan { plan, .. } => {
                let placed: usize = plan
                    .placements
                    .iter()
                    .map(|p| p.agent.len() + 20)
                    .chain(plan.settled.iter().map(|d| d.agent.len() + 10))
                    .sum();
                let unplaced: usize = plan.unplaced.iter().map(|u| u.agent.len() + u.reason.len() + 12).sum();
                16 + placed + names(&plan.stops) + unplaced
            }
            AgentCommand::Stop { agent, .. } => agent.len() + 16,
            AgentCommand::Report { agent, reason, .. } => agent.len() + reason.len() + 32,
            AgentCommand::SetNodeState { reason, .. } => reason.len() + 32,
            AgentCommand::Drain { reason, .. } => reason.len() + 48,
            AgentCommand::Migrate { agent, .. } | AgentCommand::Released { agent, .. } => agent.len() + 24,
            AgentCommand::Unblock { .. } => 16,
        }
    }

    /// Checks sizes and fields before proposing; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let reason_len = |reason: &str| {
            if reason.len() > MAX_REASON_BYTES {
                return Err(StateError::too_long("reason", reason.len(), MAX_REASON_BYTES));
            }
            Ok(())
        };
        match self {
            AgentCommand::Run { spec, .. } => spec.validate(),
            AgentCommand::RunIn { spec, sites, .. } => {
                spec.validate()?;
                check_sites("sites", sites)
            }
            AgentCommand::Stop { agent, .. } => check_name("agent", agent),
            AgentCommand::Plan { plan, .. } => {
                let items = plan.placements.len() + plan.stops.len() + plan.unplaced.len() + plan.settled.len();
                if items > MAX_PLAN_ITEMS {
                    return Err(StateError::invalid(
                        "plan",
                        format!("has {items} items; the limit is {MAX_PLAN_ITEMS}"),
                    ));
                }
                for (i, p) in plan.placements.iter().enumerate() {
                    check_name(&format!("plan.placements[{i}].agent"), &p.agent)?;
                }
                for (i, a) in plan.stops.iter().enumerate() {
                    check_name(&format!("plan.stops[{i}]"), a)?;
                }
                for (i, u) in plan.unplaced.iter().enumerate() {
                    check_name(&format!("plan.unplaced[{i}].agent"), &u.agent)?;
                    reason_len(&u.reason)?;
                }
                for (i, d) in plan.settled.iter().enumerate() {
                    check_name(&format!("plan.settled[{i}].agent"), &d.agent)?;
                }
                Ok(())
            }
            AgentCommand::Report { agent, reason, .. } => {
                check_name("agent", agent)?;
                reason_len(reason)
            }
            AgentCommand::SetNodeState { node, reason, .. } => {
                if *node == 0 {
                    return Err(StateError::invalid("node", "must not be 0"));
                }
                reason_len(reason)
            }
            AgentCommand::Drain {
                node, drain, reason, ..
            } => {
                if *node == 0 {
                    return Err(StateError::invalid("node", "must not be 0"));
                }
                if drain.max_parallel > MAX_DRAIN_PARALLEL {
                    return Err(StateError::invalid(
                        "max_parallel",
                        format!("is {}; the limit is {MAX_DRAIN_PARALLEL}", drain.max_parallel),
                    ));
                }
                reason_len(reason)
            }
            AgentCommand::Migrate { agent, .. } | AgentCommand::Released { agent, .. } => check_name("agent", agent),
            AgentCommand::Unblock { .. } => Ok(()),
        }
    }
}

/// Approximate encoded size of `spec`.
pub(crate) fn spec_size(spec: &AgentSpec) -> usize {
    let names = |n: &[String]| n.iter().map(|a| a.len() + 1).sum::<usize>();
    let command = match &spec.kind {
        AgentKind::Exec { command, .. } | AgentKind::Process { command, .. } => names(command),
        AgentKind::Inference => 0,
    };
    let labels: usize = spec.constraints.labels.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    128 + spec.name.len() + command + labels + spec.constraints.model.len()
}

fn node_key(node: NodeId) -> [u8; 8] {
    node.to_be_bytes()
}

fn node_alloc_key(node: NodeId, agent: &str) -> Vec<u8> {
    let mut key = node_key(node).to_vec();
    key.extend_from_slice(agent.as_bytes());
    key
}

/// The agent named `name`.
pub fn agent(txn: &dyn Txn, name: &str) -> Result<Option<AgentRecord>> {
    get_row(txn, AGENTS_TABLE, name.as_bytes())
}

/// The current allocation of the agent named `name`.
pub fn allocation(txn: &dyn Txn, name: &str) -> Result<Option<Allocation>> {
    get_row(txn, ALLOCATIONS_TABLE, name.as_bytes())
}

/// Up to `limit` agents with names after `after`, in name order.
pub fn agents_after(txn: &dyn Txn, after: &str, limit: usize) -> Result<Vec<AgentRecord>> {
    let mut start = after.as_bytes().to_vec();
    if !start.is_empty() {
        start.push(0);
    }
    txn.scan(AGENTS_TABLE, &start, None, limit)?
        .into_iter()
        .map(|(_, v)| decode_row(&v))
        .collect()
}

/// The scheduling status of `node` (ready when none was recorded).
pub fn node_status(txn: &dyn Txn, node: NodeId) -> Result<NodeStatus> {
    Ok(get_row(txn, NODE_STATUS_TABLE, &node_key(node))?.unwrap_or(NodeStatus {
        state: NodeState::Ready,
        reason: String::new(),
        since_ms: 0,
    }))
}

/// Every recorded scheduling status, by node id (ready nodes may be
/// absent).
pub fn node_statuses(txn: &dyn Txn) -> Result<BTreeMap<NodeId, NodeStatus>> {
    rows_by_node(txn, NODE_STATUS_TABLE)
}

/// The resources held on every node that holds any, by node id.
pub fn node_usages(txn: &dyn Txn) -> Result<BTreeMap<NodeId, Resources>> {
    rows_by_node(txn, NODE_USAGE_TABLE)
}

/// The resources held on `node` by its allocations.
pub fn node_usage(txn: &dyn Txn, node: NodeId) -> Result<Resources> {
    Ok(get_row(txn, NODE_USAGE_TABLE, &node_key(node))?.unwrap_or_default())
}

/// Names of the agents whose allocations hold resources on `node`, in name
/// order, up to `limit`.
pub fn agents_on(txn: &dyn Txn, node: NodeId, limit: usize) -> Result<Vec<String>> {
    names_under(txn, NODE_ALLOCS_TABLE, node, limit)
}

/// The agent names of `table`'s keys (node id ++ agent name) under `node`,
/// in name order, up to `limit`.
fn names_under(txn: &dyn Txn, table: &str, node: NodeId, limit: usize) -> Result<Vec<String>> {
    let start = node_key(node);
    let end = prefix_end(&start);
    txn.scan(table, &start, end.as_deref(), limit)?
        .into_iter()
        .map(|(k, _)| {
            String::from_utf8(k[8..].to_vec()).map_err(|e| StateError::Corrupt {
                what: "node ++ agent key",
                detail: e.to_string(),
            })
        })
        .collect()
}

/// How many evaluations are pending (the scheduler's queue depth).
pub fn pending_eval_count(txn: &dyn Txn) -> Result<u64> {
    EVALS.count(txn)
}

/// Up to `limit` pending evaluations of agents named after `after` (all
/// when empty), in agent name order.
pub fn pending_evals(txn: &dyn Txn, after: &str, limit: usize) -> Result<Vec<(String, Eval)>> {
    if EVALS.count(txn)? == 0 {
        return Ok(Vec::new());
    }
    let mut start = after.as_bytes().to_vec();
    if !start.is_empty() {
        start.push(0);
    }
    txn.scan(EVALS_TABLE, &start, None, limit)?
        .into_iter()
        .map(|(k, v)| {
            let name = String::from_utf8(k).map_err(|e| StateError::Corrupt {
                what: "evaluation key",
                detail: e.to_string(),
            })?;
            Ok((name, decode_row(&v)?))
        })
        .collect()
}

fn stopping_key(agent: &str, incarnation: u64) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&incarnation.to_be_bytes());
    key
}

fn parse_stopping_key(key: &[u8]) -> Result<(String, u64)> {
    let corrupt = |detail: &str| StateError::Corrupt {
        what: "stopping key",
        detail: detail.to_string(),
    };
    let split = key.len().checked_sub(9).ok_or_else(|| corrupt("too short"))?;
    let name = std::str::from_utf8(&key[..split]).map_err(|e| corrupt(&e.to_string()))?;
    let mut inc = [0u8; 8];
    inc.copy_from_slice(&key[split + 1..]);
    Ok((name.to_string(), u64::from_be_bytes(inc)))
}

/// The ended incarnations of `agent` that may still run, with their nodes,
/// oldest first. A new incarnation starts only when this is empty.
pub fn stopping_of(txn: &dyn Txn, agent: &str) -> Result<Vec<(u64, Stopping)>> {
    if STOPPING.count(txn)? == 0 {
        return Ok(Vec::new());
    }
    let mut start = agent.as_bytes().to_vec();
    start.push(0);
    let end = prefix_end(&start);
    txn.scan(STOPPING_TABLE, &start, end.as_deref(), usize::MAX)?
        .into_iter()
        .map(|(k, v)| Ok((parse_stopping_key(&k)?.1, decode_row(&v)?)))
        .collect()
}

/// The ended incarnations that `node` has not confirmed stopped, as
/// (agent, incarnation), in agent order.
pub fn stopping_on(txn: &dyn Txn, node: NodeId) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    if STOPPING.count(txn)? == 0 {
        return Ok(out);
    }
    for (key, value) in txn.scan(STOPPING_TABLE, b"", None, usize::MAX)? {
        let row: Stopping = decode_row(&value)?;
        if row.node == node {
            out.push(parse_stopping_key(&key)?);
        }
    }
    Ok(out)
}

/// Whether `agent` waits for nodes to change before it is evaluated again.
pub fn is_blocked(txn: &dyn Txn, agent: &str) -> Result<bool> {
    Ok(txn.get(BLOCKED_TABLE, agent.as_bytes())?.is_some())
}

/// How many agents wait, blocked for want of room, for nodes to change.
pub fn blocked_count(txn: &dyn Txn) -> Result<u64> {
    BLOCKED.count(txn)
}

/// When agents are blocked: how many, and what each node's allocations
/// hold ([`node_usages`]); `None` (one read, no scan) when none is.
pub fn blocked_usage(txn: &dyn Txn) -> Result<Option<(u64, BTreeMap<NodeId, Resources>)>> {
    match blocked_count(txn)? {
        0 => Ok(None),
        blocked => Ok(Some((blocked, node_usages(txn)?))),
    }
}

/// Queues an evaluation of `agent` (replacing a pending one, which the new
/// one covers) and takes it off the blocked list.
fn queue_eval(txn: &mut dyn Txn, agent: &str, trigger: EvalTrigger, generation: u64) -> Result<()> {
    BLOCKED.delete(txn, agent.as_bytes())?;
    EVALS.put(txn, agent.as_bytes(), &Eval { trigger, generation })
}

/// Moves every blocked agent back to the pending evaluations: the nodes
/// changed, so it may fit now. Called by every change to node records or
/// node status.
pub(crate) fn unblock_all(txn: &mut dyn Txn) -> Result<()> {
    while BLOCKED.count(txn)? > 0 {
        let batch = txn.scan(BLOCKED_TABLE, b"", None, 1024)?;
        if batch.is_empty() {
            break;
        }
        for (key, value) in batch {
            let blocked: Eval = decode_row(&value)?;
            BLOCKED.delete(txn, &key)?;
            if txn.get(EVALS_TABLE, &key)?.is_none() {
                EVALS.put(
                    txn,
                    &key,
                    &Eval {
                        trigger: EvalTrigger::Unblocked,
                        generation: blocked.generation,
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// Sets `agent`'s allocation to `alloc`, keeping the node index and usage
/// in step with what it holds before and after.
fn set_allocation(txn: &mut dyn Txn, agent: &str, alloc: &Allocation) -> Result<()> {
    for node in write_allocation(txn, agent, alloc)?.into_iter().flatten() {
        touch_node(txn, node)?;
    }
    Ok(())
}

/// [`set_allocation`] without counting the change: returns the nodes whose
/// runtime views changed, for a caller that counts once per node.
fn write_allocation(txn: &mut dyn Txn, agent: &str, alloc: &Allocation) -> Result<[Option<NodeId>; 2]> {
    let old = allocation(txn, agent)?;
    let held = old.as_ref().filter(|o| o.status.holds_resources());
    // A status change on the same node keeps its index row and usage (a
    // delete and a put of the same key would leave versions for scans of
    // the node's index to step over).
    let kept =
        held.is_some_and(|o| alloc.status.holds_resources() && o.node == alloc.node && o.resources == alloc.resources);
    if !kept {
        if let Some(o) = held {
            release(txn, agent, o)?;
        }
        if alloc.status.holds_resources() {
            let usage = node_usage(txn, alloc.node)?.plus(alloc.resources);
            put_row(txn, NODE_USAGE_TABLE, &node_key(alloc.node), &usage)?;
            txn.put(NODE_ALLOCS_TABLE, &node_alloc_key(alloc.node, agent), Vec::new())?;
        }
    }
    put_row(txn, ALLOCATIONS_TABLE, agent.as_bytes(), alloc)?;
    Ok([old.map(|o| o.node), Some(alloc.node)])
}

/// The `meta` key counting changes to what `node`'s runtime reads.
fn node_changes_key(node: NodeId) -> Vec<u8> {
    let mut key = b"node_changes/".to_vec();
    key.extend_from_slice(&node_key(node));
    key
}

/// Counts a change to what `node`'s runtime reads (its allocations, the
/// stopping incarnations it must confirm or wait for).
fn touch_node(txn: &mut dyn Txn, node: NodeId) -> Result<()> {
    let key = node_changes_key(node);
    let n = kv::meta_u64(txn, &key)?;
    kv::put_meta_u64(txn, &key, n.wrapping_add(1))
}

/// How many changes there were to what `node`'s runtime reads: while it is
/// the same, so is that view ([`agents_on`], [`stopping_on`], and
/// [`stopping_of`] for the agents on the node), and a runtime need not read
/// it again.
pub fn node_changes(txn: &dyn Txn, node: NodeId) -> Result<u64> {
    kv::meta_u64(txn, &node_changes_key(node))
}

/// Deletes a stopping row, telling the nodes whose view it was part of:
/// the node it ran on and the node of the agent's current allocation.
fn remove_stopping(txn: &mut dyn Txn, agent: &str, incarnation: u64, ran_on: NodeId) -> Result<()> {
    STOPPING.delete(txn, &stopping_key(agent, incarnation))?;
    touch_node(txn, ran_on)?;
    if let Some(alloc) = allocation(txn, agent)? {
        touch_node(txn, alloc.node)?;
    }
    Ok(())
}

fn release(txn: &mut dyn Txn, agent: &str, alloc: &Allocation) -> Result<()> {
    let usage = node_usage(txn, alloc.node)?.minus(alloc.resources);
    put_row(txn, NODE_USAGE_TABLE, &node_key(alloc.node), &usage)?;
    txn.delete(NODE_ALLOCS_TABLE, &node_alloc_key(alloc.node, agent))
}

/// Ends `agent`'s allocation with `status` if it still holds resources.
/// Unless it is lost (its node is down), its node must confirm the stop
/// before a next incarnation starts: a `stopping` row says so.
fn end_allocation(txn: &mut dyn Txn, agent: &str, status: AllocStatus, reason: &str, at_ms: u64) -> Result<bool> {
    let Some(mut alloc) = allocation(txn, agent)? else {
        return Ok(false);
    };
    if !alloc.status.holds_resources() {
        return Ok(false);
    }
    if status != AllocStatus::Lost {
        let row = Stopping {
            node: alloc.node,
            since_ms: at_ms,
        };
        STOPPING.put(txn, &stopping_key(agent, alloc.incarnation), &row)?;
    }
    alloc.status = status;
    alloc.reason = reason.to_string();
    alloc.updated_at_ms = at_ms;
    set_allocation(txn, agent, &alloc)?;
    Ok(true)
}

/// Why `node` cannot take `resources` now, if it cannot.
fn refuse_node(txn: &dyn Txn, node: NodeId, resources: Resources) -> Result<Option<String>> {
    let Some(record) = nodes::resources_of(txn, node)? else {
        return Ok(Some(format!("node {node:016x} is unknown")));
    };
    let status = node_status(txn, node)?;
    if status.state != NodeState::Ready {
        return Ok(Some(format!("node {node:016x} is {:?}", status.state).to_lowercase()));
    }
    let wanted = node_usage(txn, node)?.plus(resources);
    Ok(wanted
        .exceeds(&Resources::of_node(&record))
        .map(|what| format!("node {node:016x} lacks {what}")))
}

/// Submits `spec` (a new generation unless it and `sites` are what the
/// agent has, running).
fn run(txn: &mut dyn Txn, spec: &AgentSpec, sites: &[String], at_ms: u64) -> Result<AgentOutcome> {
    let record = match agent(txn, &spec.name)? {
        Some(r) if r.spec == *spec && r.desired == Desired::Running && sites_of(txn, &spec.name)? == sites => {
            return Ok(AgentOutcome::Generation(r.generation));
        }
        Some(r) => AgentRecord {
            spec: spec.clone(),
            desired: Desired::Running,
            generation: r.generation + 1,
            ..r
        },
        None => AgentRecord {
            spec: spec.clone(),
            desired: Desired::Running,
            generation: 1,
            incarnation: 0,
            pending_reason: String::new(),
            created_at_ms: at_ms,
        },
    };
    put_row(txn, AGENTS_TABLE, spec.name.as_bytes(), &record)?;
    set_sites(txn, &spec.name, sites)?;
    queue_eval(txn, &spec.name, EvalTrigger::Changed, record.generation)?;
    Ok(AgentOutcome::Generation(record.generation))
}

/// Applies a validated agent command.
pub(crate) fn apply(txn: &mut dyn Txn, cmd: &AgentCommand) -> Result<AgentOutcome> {
    let held = match cmd {
        AgentCommand::Run { spec, .. } | AgentCommand::RunIn { spec, .. } => crate::handoff::frozen(txn, &spec.name)?,
        AgentCommand::Stop { agent, .. } | AgentCommand::Migrate { agent, .. } => crate::handoff::frozen(txn, agent)?,
        _ => None,
    };
    if let Some(why) = held {
        return Ok(AgentOutcome::Refused(why));
    }
    match cmd {
        AgentCommand::Run { spec, at_ms } => run(txn, spec, &[], *at_ms),
        AgentCommand::RunIn { spec, sites, at_ms } => run(txn, spec, sites, *at_ms),
        AgentCommand::Stop { agent: name, at_ms } => {
            let Some(mut record) = agent(txn, name)? else {
                return Ok(AgentOutcome::Refused(format!("no agent named {name:?}")));
            };
            if record.desired != Desired::Stopped {
                record.desired = Desired::Stopped;
                record.generation += 1;
                put_row(txn, AGENTS_TABLE, name.as_bytes(), &record)?;
                queue_eval(txn, name, EvalTrigger::Changed, record.generation)?;
                end_drain_moves(txn, name, None, *at_ms)?;
            }
            Ok(AgentOutcome::Generation(record.generation))
        }
        AgentCommand::Migrate { agent: name, to } => {
            let Some(record) = agent(txn, name)? else {
                return Ok(AgentOutcome::Refused(format!("no agent named {name:?}")));
            };
            if record.desired != Desired::Running {
                return Ok(AgentOutcome::Refused(format!("agent {name:?} is stopped")));
            }
            queue_eval(txn, name, EvalTrigger::Migrate { to: *to }, record.generation)?;
            Ok(AgentOutcome::Generation(record.generation))
        }
        AgentCommand::Released {
            agent: name,
            incarnation,
            node,
        } => {
            let key = stopping_key(name, *incarnation);
            match get_row::<Stopping>(txn, STOPPING_TABLE, &key)? {
                Some(row) if row.node == *node => {
                    remove_stopping(txn, name, *incarnation, row.node)?;
                    Ok(AgentOutcome::Reported)
                }
                _ => Ok(AgentOutcome::Refused(format!(
                    "incarnation {incarnation} of agent {name:?} is not stopping on node {node:016x}"
                ))),
            }
        }
        AgentCommand::Plan { plan, at_ms } => Ok(AgentOutcome::Planned(apply_plan(txn, plan, *at_ms)?)),
        AgentCommand::Report {
            agent: name,
            incarnation,
            status,
            reason,
            at_ms,
        } => {
            let Some(mut alloc) = allocation(txn, name)? else {
                return Ok(AgentOutcome::Refused(format!("agent {name:?} has no allocation")));
            };
            if alloc.incarnation != *incarnation {
                return Ok(AgentOutcome::Refused(format!(
                    "incarnation {incarnation} of agent {name:?} is superseded by {}",
                    alloc.incarnation
                )));
            }
            if !alloc.status.holds_resources() {
                return Ok(AgentOutcome::Refused(format!(
                    "incarnation {incarnation} of agent {name:?} already ended ({:?})",
                    alloc.status
                )));
            }
            alloc.status = *status;
            alloc.reason = reason.clone();
            alloc.updated_at_ms = *at_ms;
            set_allocation(txn, name, &alloc)?;
            if matches!(status, AllocStatus::Running | AllocStatus::Failed) {
                // Running (or failed) on its new node: a drain's move ended.
                end_drain_moves(txn, name, Some(alloc.node), *at_ms)?;
            }
            Ok(AgentOutcome::Reported)
        }
        AgentCommand::SetNodeState {
            node,
            state,
            reason,
            at_ms,
        } => {
            let status = NodeStatus {
                state: *state,
                reason: reason.clone(),
                since_ms: *at_ms,
            };
            put_row(txn, NODE_STATUS_TABLE, &node_key(*node), &status)?;
            // A drain with settings ends (this command's own `Draining`
            // moves every agent at once).
            clear_drain(txn, *node)?;
            if *state == NodeState::Down {
                // A node is declared down only after its lease expired, and
                // it stops its agents before then: nothing of it still runs.
                for (name, incarnation) in stopping_on(txn, *node)? {
                    remove_stopping(txn, &name, incarnation, *node)?;
                }
            }
            let trigger = match state {
                NodeState::Down => Some(EvalTrigger::NodeDown),
                NodeState::Draining => Some(EvalTrigger::Drain),
                NodeState::Ready | NodeState::Ineligible => None,
            };
            if let Some(trigger) = trigger {
                for name in agents_on(txn, *node, usize::MAX)? {
                    if *state == NodeState::Down {
                        end_allocation(txn, &name, AllocStatus::Lost, &format!("node down: {reason}"), *at_ms)?;
                    }
                    if let Some(record) = agent(txn, &name)? {
                        queue_eval(txn, &name, trigger, record.generation)?;
                    }
                }
            }
            unblock_all(txn)?;
            Ok(AgentOutcome::NodeState)
        }
        AgentCommand::Drain {
            node,
            drain,
            reason,
            at_ms,
        } => {
            let status = NodeStatus {
                state: NodeState::Draining,
                reason: reason.clone(),
                since_ms: *at_ms,
            };
            put_row(txn, NODE_STATUS_TABLE, &node_key(*node), &status)?;
            put_row(txn, DRAINS_TABLE, &node_key(*node), drain)?;
            drain_step(txn, *node, *at_ms)?;
            unblock_all(txn)?;
            Ok(AgentOutcome::NodeState)
        }
        AgentCommand::Unblock { .. } => {
            let blocked = BLOCKED.count(txn)?;
            unblock_all(txn)?;
            Ok(AgentOutcome::Unblocked(blocked))
        }
    }
}

/// Fences `name` for a handoff to another site: its desired status becomes
/// stopped (a new generation, with an evaluation), its allocation ends at
/// once (so no result or memory write of it counts from here on) and its
/// drain moves end. Returns the desired status it had, to restore if the
/// handoff is aborted.
pub(crate) fn fence_for_handoff(txn: &mut dyn Txn, name: &str, reason: &str, at_ms: u64) -> Result<Option<Desired>> {
    let Some(mut record) = agent(txn, name)? else {
        return Ok(None);
    };
    let had = record.desired;
    record.desired = Desired::Stopped;
    record.generation += 1;
    record.pending_reason = reason.to_string();
    put_row(txn, AGENTS_TABLE, name.as_bytes(), &record)?;
    queue_eval(txn, name, EvalTrigger::Changed, record.generation)?;
    end_allocation(txn, name, AllocStatus::Stopped, reason, at_ms)?;
    end_drain_moves(txn, name, None, at_ms)?;
    Ok(Some(had))
}

/// Sets `name`'s desired status (a new generation, with an evaluation) and
/// its pending reason: a handoff ended (aborted: back to what it was;
/// arrived: running).
pub(crate) fn set_desired(txn: &mut dyn Txn, name: &str, desired: Desired, reason: &str) -> Result<()> {
    let Some(mut record) = agent(txn, name)? else {
        return Ok(());
    };
    record.desired = desired;
    record.generation += 1;
    record.pending_reason = reason.to_string();
    put_row(txn, AGENTS_TABLE, name.as_bytes(), &record)?;
    queue_eval(txn, name, EvalTrigger::Changed, record.generation)
}

/// Records an agent that arrives from another site: stopped (it holds
/// nothing and needs no evaluation) until its handoff is activated, with
/// `incarnation` as its last one, so the incarnations it gets here
/// continue the other site's.
pub(crate) fn create_arriving(
    txn: &mut dyn Txn,
    spec: &AgentSpec,
    sites: &[String],
    incarnation: u64,
    created_at_ms: u64,
    reason: &str,
) -> Result<()> {
    set_sites(txn, &spec.name, sites)?;
    let record = AgentRecord {
        spec: spec.clone(),
        desired: Desired::Stopped,
        generation: 1,
        incarnation,
        pending_reason: reason.to_string(),
        created_at_ms,
    };
    put_row(txn, AGENTS_TABLE, spec.name.as_bytes(), &record)
}

/// Removes `name`'s record, allocation and evaluations, so that its name
/// can be taken again by an agent that arrives from another site. Refused
/// (with the reason) while an incarnation of it may still run: its
/// allocation holds resources or a node has not confirmed a stop.
pub(crate) fn remove_agent(txn: &mut dyn Txn, name: &str) -> Result<std::result::Result<(), String>> {
    if let Some(alloc) = allocation(txn, name)?
        && alloc.status.holds_resources()
    {
        return Ok(Err(format!(
            "agent {name:?} still has incarnation {} on node {:016x}",
            alloc.incarnation, alloc.node
        )));
    }
    if let Some((incarnation, row)) = stopping_of(txn, name)?.first() {
        return Ok(Err(format!(
            "incarnation {incarnation} of agent {name:?} has not yet stopped on node {:016x}",
            row.node
        )));
    }
    EVALS.delete(txn, name.as_bytes())?;
    BLOCKED.delete(txn, name.as_bytes())?;
    txn.delete(ALLOCATIONS_TABLE, name.as_bytes())?;
    txn.delete(AGENT_SITES_TABLE, name.as_bytes())?;
    txn.delete(AGENTS_TABLE, name.as_bytes())?;
    Ok(Ok(()))
}

/// Starts moves of `node`'s agents, in name order, while its drain has room
/// for them.
fn drain_step(txn: &mut dyn Txn, node: NodeId, at_ms: u64) -> Result<()> {
    let Some(drain) = get_row::<DrainSpec>(txn, DRAINS_TABLE, &node_key(node))? else {
        return Ok(());
    };
    let moving = names_under(txn, DRAIN_MOVES_TABLE, node, usize::MAX)?;
    let limit = match drain.max_parallel {
        0 => usize::MAX,
        n => n as usize,
    };
    let mut room = limit.saturating_sub(moving.len());
    // Among the first `moving + room` agents on the node, at least `room`
    // are not moving yet.
    for name in agents_on(txn, node, moving.len().saturating_add(room))? {
        if room == 0 {
            break;
        }
        if moving.binary_search(&name).is_ok() {
            continue;
        }
        let Some(record) = agent(txn, &name)? else {
            continue;
        };
        put_row(
            txn,
            DRAIN_MOVES_TABLE,
            &node_alloc_key(node, &name),
            &DrainMove { since_ms: at_ms },
        )?;
        queue_eval(txn, &name, EvalTrigger::Drain, record.generation)?;
        room -= 1;
    }
    Ok(())
}

/// Ends `agent`'s drain moves (from every draining node but `except`,
/// where it still is) and lets those drains start their next moves.
fn end_drain_moves(txn: &mut dyn Txn, agent: &str, except: Option<NodeId>, at_ms: u64) -> Result<()> {
    for (node, _) in drains(txn)? {
        let key = node_alloc_key(node, agent);
        if Some(node) != except && txn.get(DRAIN_MOVES_TABLE, &key)?.is_some() {
            txn.delete(DRAIN_MOVES_TABLE, &key)?;
            drain_step(txn, node, at_ms)?;
        }
    }
    Ok(())
}

/// Ends `node`'s drain settings and moves (its state changed).
fn clear_drain(txn: &mut dyn Txn, node: NodeId) -> Result<()> {
    txn.delete(DRAINS_TABLE, &node_key(node))?;
    for name in names_under(txn, DRAIN_MOVES_TABLE, node, usize::MAX)? {
        txn.delete(DRAIN_MOVES_TABLE, &node_alloc_key(node, &name))?;
    }
    Ok(())
}

/// The drains with settings, by node id.
pub fn drains(txn: &dyn Txn) -> Result<BTreeMap<NodeId, DrainSpec>> {
    rows_by_node(txn, DRAINS_TABLE)
}

/// The agents whose move `node`'s drain started and that has not ended, in
/// name order.
pub fn drain_moves(txn: &dyn Txn, node: NodeId) -> Result<Vec<String>> {
    names_under(txn, DRAIN_MOVES_TABLE, node, usize::MAX)
}

fn apply_plan(txn: &mut dyn Txn, plan: &Plan, at_ms: u64) -> Result<PlanOutcome> {
    let mut out = PlanOutcome::default();
    let mut touched = std::collections::BTreeSet::new();
    for name in &plan.stops {
        if end_allocation(txn, name, AllocStatus::Stopped, "stopped", at_ms)? {
            out.stopped.push(name.clone());
        }
        if agent(txn, name)?.is_some_and(|r| r.desired == Desired::Stopped) {
            EVALS.delete(txn, name.as_bytes())?;
        }
    }
    for p in &plan.placements {
        let Some(mut record) = agent(txn, &p.agent)? else {
            out.refused.push((p.agent.clone(), "the agent is gone".into()));
            continue;
        };
        if record.generation != p.generation || record.desired != Desired::Running {
            out.refused.push((
                p.agent.clone(),
                format!(
                    "planned for generation {}, the agent is at {}",
                    p.generation, record.generation
                ),
            ));
            continue;
        }
        let resources = record.spec.resources;
        // Its own allocation on the same node frees what it holds there.
        let current = allocation(txn, &p.agent)?;
        let held_here = current
            .as_ref()
            .filter(|a| a.node == p.node && a.status.holds_resources())
            .map(|a| a.resources)
            .unwrap_or_default();
        if let Some(reason) = refuse_node(txn, p.node, resources.minus(held_here))? {
            out.refused.push((p.agent.clone(), reason));
            continue;
        }
        if current.is_some() {
            end_allocation(
                txn,
                &p.agent,
                AllocStatus::Stopped,
                "replaced by a new placement",
                at_ms,
            )?;
        }
        record.incarnation += 1;
        record.pending_reason.clear();
        let alloc = Allocation {
            node: p.node,
            incarnation: record.incarnation,
            status: AllocStatus::Pending,
            reason: String::new(),
            resources,
            generation: record.generation,
            updated_at_ms: at_ms,
        };
        // Counted once per node below: a plan places thousands.
        touched.extend(write_allocation(txn, &p.agent, &alloc)?.into_iter().flatten());
        put_row(txn, AGENTS_TABLE, p.agent.as_bytes(), &record)?;
        settle_eval(txn, &p.agent, record.generation)?;
        out.placed.push((p.agent.clone(), record.incarnation));
    }
    for node in touched {
        touch_node(txn, node)?;
    }
    for d in &plan.settled {
        settle_eval(txn, &d.agent, d.generation)?;
        // Placed where it may run: a reason left by an earlier plan (a move
        // that found no room) no longer holds.
        if let Some(mut record) = agent(txn, &d.agent)?
            && !record.pending_reason.is_empty()
            && allocation(txn, &d.agent)?.is_some_and(|a| a.status.holds_resources())
        {
            record.pending_reason.clear();
            put_row(txn, AGENTS_TABLE, d.agent.as_bytes(), &record)?;
        }
    }
    for u in &plan.unplaced {
        let Some(mut record) = agent(txn, &u.agent)? else {
            continue;
        };
        if record.generation != u.generation {
            continue;
        }
        if record.pending_reason != u.reason {
            record.pending_reason = u.reason.clone();
            put_row(txn, AGENTS_TABLE, u.agent.as_bytes(), &record)?;
        }
        if settle_eval(txn, &u.agent, record.generation)? {
            let blocked = Eval {
                trigger: EvalTrigger::Changed,
                generation: record.generation,
            };
            BLOCKED.put(txn, u.agent.as_bytes(), &blocked)?;
        }
    }
    Ok(out)
}

/// Removes `agent`'s pending evaluation if it was queued for `generation`
/// (a newer one stays); whether it was removed.
fn settle_eval(txn: &mut dyn Txn, agent: &str, generation: u64) -> Result<bool> {
    let Some(eval) = get_row::<Eval>(txn, EVALS_TABLE, agent.as_bytes())? else {
        return Ok(false);
    };
    if eval.generation != generation {
        return Ok(false);
    }
    EVALS.delete(txn, agent.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::MemTxn;
    use crate::nodes::{NodeCommand, NodeResources};

    fn spec(name: &str, cpu_millis: u64, memory_mb: u64) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            kind: AgentKind::Exec {
                command: vec!["/bin/cat".into()],
                timeout_ms: 1000,
                max_output_bytes: 1024,
            },
            resources: Resources {
                cpu_millis,
                memory_mb,
                gpu_memory_mb: 0,
            },
            constraints: Constraints::default(),
            restart: RestartPolicy::Always,
        }
    }

    fn add_node(txn: &mut MemTxn, node: NodeId, cores: u32, memory_mb: u64) {
        let cmd = NodeCommand::SetResources {
            node,
            resources: NodeResources {
                cpu_cores: cores,
                memory_bytes: memory_mb * 1024 * 1024,
                ..Default::default()
            },
        };
        crate::nodes::apply(txn, &cmd).unwrap();
    }

    fn run(txn: &mut MemTxn, spec: AgentSpec) -> u64 {
        match apply(txn, &AgentCommand::Run { spec, at_ms: 1 }).unwrap() {
            AgentOutcome::Generation(g) => g,
            other => panic!("{other:?}"),
        }
    }

    fn plan(txn: &mut MemTxn, placements: &[(&str, u64, NodeId)]) -> PlanOutcome {
        let plan = Plan {
            placements: placements
                .iter()
                .map(|(agent, generation, node)| Placement {
                    agent: (*agent).into(),
                    generation: *generation,
                    node: *node,
                })
                .collect(),
            ..Default::default()
        };
        match apply(txn, &AgentCommand::Plan { plan, at_ms: 2 }).unwrap() {
            AgentOutcome::Planned(p) => p,
            other => panic!("{other:?}"),
        }
    }

    /// The usage and index invariants of the module docs.
    fn check_invariants(txn: &MemTxn, nodes: &[NodeId]) {
        for node in nodes {
            let mut sum = Resources::default();
            for name in agents_on(txn, *node, usize::MAX).unwrap() {
                let alloc = allocation(txn, &name).unwrap().unwrap();
                assert_eq!(alloc.node, *node);
                assert!(alloc.status.holds_resources());
                sum = sum.plus(alloc.resources);
            }
            assert_eq!(node_usage(txn, *node).unwrap(), sum, "usage of node {node}");
        }
        for counted in [EVALS, STOPPING, BLOCKED] {
            let rows = txn.scan(counted.table, b"", None, usize::MAX).unwrap().len() as u64;
            assert_eq!(counted.count(txn).unwrap(), rows, "count of {}", counted.table);
        }
    }

    #[test]
    fn a_plan_is_validated_again_and_never_overcommits_a_node() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 2, 1024);
        let a = run(&mut txn, spec("a", 1500, 100));
        let b = run(&mut txn, spec("b", 1000, 100));
        let out = plan(&mut txn, &[("a", a, 1), ("b", b, 1), ("c", 1, 1)]);
        assert_eq!(out.placed, vec![("a".to_string(), 1)]);
        assert_eq!(out.refused.len(), 2, "{out:?}");
        assert!(out.refused[0].1.contains("lacks cpu"), "{out:?}");
        assert!(out.refused[1].1.contains("gone"), "{out:?}");
        assert_eq!(node_usage(&txn, 1).unwrap().cpu_millis, 1500);
        check_invariants(&txn, &[1]);
    }

    #[test]
    fn a_stale_generation_or_an_unready_node_is_refused() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 4, 1024);
        add_node(&mut txn, 2, 4, 1024);
        let g1 = run(&mut txn, spec("a", 100, 10));
        let g2 = run(&mut txn, spec("a", 200, 10));
        assert_eq!(g2, g1 + 1);
        assert_eq!(run(&mut txn, spec("a", 200, 10)), g2, "the same spec changes nothing");
        let out = plan(&mut txn, &[("a", g1, 1)]);
        assert!(out.refused[0].1.contains("generation"), "{out:?}");
        apply(
            &mut txn,
            &AgentCommand::SetNodeState {
                node: 1,
                state: NodeState::Draining,
                reason: "maintenance".into(),
                at_ms: 3,
            },
        )
        .unwrap();
        let out = plan(&mut txn, &[("a", g2, 1), ("a", g2, 9)]);
        assert!(out.refused[0].1.contains("draining"), "{out:?}");
        assert!(out.refused[1].1.contains("unknown"), "{out:?}");
        assert!(out.placed.is_empty());
    }

    #[test]
    fn each_placement_issues_the_next_incarnation_and_fences_the_older_ones() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 4, 1024);
        add_node(&mut txn, 2, 4, 1024);
        let g = run(&mut txn, spec("a", 1000, 100));
        assert_eq!(plan(&mut txn, &[("a", g, 1)]).placed, vec![("a".into(), 1)]);
        // Moved to node 2: incarnation 2; node 1 is free again.
        assert_eq!(plan(&mut txn, &[("a", g, 2)]).placed, vec![("a".into(), 2)]);
        assert_eq!(node_usage(&txn, 1).unwrap(), Resources::default());
        check_invariants(&txn, &[1, 2]);

        let report = |incarnation, status| AgentCommand::Report {
            agent: "a".into(),
            incarnation,
            status,
            reason: String::new(),
            at_ms: 5,
        };
        let stale = apply(&mut txn, &report(1, AllocStatus::Running)).unwrap();
        assert!(
            matches!(stale, AgentOutcome::Refused(ref r) if r.contains("superseded")),
            "{stale:?}"
        );
        assert_eq!(
            apply(&mut txn, &report(2, AllocStatus::Running)).unwrap(),
            AgentOutcome::Reported
        );
        assert_eq!(allocation(&txn, "a").unwrap().unwrap().status, AllocStatus::Running);
    }

    #[test]
    fn a_node_declared_down_loses_its_allocations_and_their_resources() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 4, 1024);
        for name in ["a", "b"] {
            let g = run(&mut txn, spec(name, 1000, 100));
            plan(&mut txn, &[(name, g, 1)]);
        }
        apply(
            &mut txn,
            &AgentCommand::SetNodeState {
                node: 1,
                state: NodeState::Down,
                reason: "lease expired".into(),
                at_ms: 9,
            },
        )
        .unwrap();
        for name in ["a", "b"] {
            let alloc = allocation(&txn, name).unwrap().unwrap();
            assert_eq!(alloc.status, AllocStatus::Lost);
            assert!(alloc.reason.contains("lease expired"));
        }
        assert!(agents_on(&txn, 1, 10).unwrap().is_empty());
        check_invariants(&txn, &[1]);
        // A late report of the lost incarnation is refused.
        let late = apply(
            &mut txn,
            &AgentCommand::Report {
                agent: "a".into(),
                incarnation: 1,
                status: AllocStatus::Running,
                reason: String::new(),
                at_ms: 10,
            },
        )
        .unwrap();
        assert!(matches!(late, AgentOutcome::Refused(_)), "{late:?}");
    }

    fn evals(txn: &MemTxn) -> Vec<(String, EvalTrigger)> {
        pending_evals(txn, "", 100)
            .unwrap()
            .into_iter()
            .map(|(name, e)| (name, e.trigger))
            .collect()
    }

    #[test]
    fn a_nodes_change_count_moves_with_every_change_to_its_runtimes_view() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 4, 1024);
        add_node(&mut txn, 2, 4, 1024);
        add_node(&mut txn, 3, 4, 1024);
        let changes = |txn: &MemTxn| [1, 2, 3].map(|n| node_changes(txn, n).unwrap());
        let g = run(&mut txn, spec("a", 1000, 100));
        let before = changes(&txn);
        plan(&mut txn, &[("a", g, 1)]);
        let placed = changes(&txn);
        assert!(placed[0] > before[0] && placed[1] == before[1], "{before:?} {placed:?}");
        // Moved to node 2: both nodes' views change; node 3's does not.
        plan(&mut txn, &[("a", g, 2)]);
        let moved = changes(&txn);
        assert!(moved[0] > placed[0] && moved[1] > placed[1] && moved[2] == placed[2]);
        assert_eq!(stopping_of(&txn, "a").unwrap().len(), 1, "node 2 waits");
        // Node 1 confirms the stop: node 2 may start it now, so its view
        // changed too.
        apply(
            &mut txn,
            &AgentCommand::Released {
                agent: "a".into(),
                incarnation: 1,
                node: 1,
            },
        )
        .unwrap();
        let released = changes(&txn);
        assert!(released[0] > moved[0] && released[1] > moved[1] && released[2] == moved[2]);
        // A report changes only its own node's view.
        apply(
            &mut txn,
            &AgentCommand::Report {
                agent: "a".into(),
                incarnation: 2,
                status: AllocStatus::Running,
                reason: String::new(),
                at_ms: 5,
            },
        )
        .unwrap();
        let reported = changes(&txn);
        assert!(reported[1] > released[1] && reported[0] == released[0]);
        check_invariants(&txn, &[1, 2, 3]);
    }

    #[test]
    fn a_drain_moves_at_most_max_parallel_agents_at_once_and_the_rest_at_its_deadline() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 8, 4096);
        add_node(&mut txn, 2, 8, 4096);
        let names = ["a", "b", "c", "d", "e"];
        let mut generation = BTreeMap::new();
        for name in names {
            let g = run(&mut txn, spec(name, 100, 10));
            plan(&mut txn, &[(name, g, 1)]);
            generation.insert(name, g);
        }
        let drain = |max_parallel, at_ms| AgentCommand::Drain {
            node: 1,
            drain: DrainSpec {
                max_parallel,
                deadline_ms: 1_000,
            },
            reason: "maintenance".into(),
            at_ms,
        };
        apply(&mut txn, &drain(2, 10)).unwrap();
        assert_eq!(node_status(&txn, 1).unwrap().state, NodeState::Draining);
        // Two moves at once, in name order.
        assert_eq!(
            evals(&txn),
            vec![("a".into(), EvalTrigger::Drain), ("b".into(), EvalTrigger::Drain)]
        );
        assert_eq!(drain_moves(&txn, 1).unwrap(), vec!["a", "b"]);
        plan(&mut txn, &[("a", generation["a"], 2), ("b", generation["b"], 2)]);
        assert!(evals(&txn).is_empty(), "no third move while two are under way");
        let running = |agent: &str, incarnation| AgentCommand::Report {
            agent: agent.into(),
            incarnation,
            status: AllocStatus::Running,
            reason: String::new(),
            at_ms: 20,
        };
        // "a" runs on node 2: its move ended and "c" starts.
        apply(&mut txn, &running("a", 2)).unwrap();
        assert_eq!(drain_moves(&txn, 1).unwrap(), vec!["b", "c"]);
        assert_eq!(evals(&txn), vec![("c".into(), EvalTrigger::Drain)]);
        // Stopping an agent whose move is under way ends it too.
        apply(
            &mut txn,
            &AgentCommand::Stop {
                agent: "b".into(),
                at_ms: 21,
            },
        )
        .unwrap();
        assert_eq!(drain_moves(&txn, 1).unwrap(), vec!["c", "d"]);
        // The deadline: the leader proposes the drain again with no limit.
        apply(&mut txn, &drain(0, 1_000)).unwrap();
        assert_eq!(drain_moves(&txn, 1).unwrap(), vec!["c", "d", "e"]);
        let queued: Vec<String> = evals(&txn).into_iter().map(|(n, _)| n).collect();
        assert_eq!(queued, vec!["b", "c", "d", "e"]);
        // Made ready again, the node's drain and its moves are gone.
        apply(
            &mut txn,
            &AgentCommand::SetNodeState {
                node: 1,
                state: NodeState::Ready,
                reason: String::new(),
                at_ms: 30,
            },
        )
        .unwrap();
        assert!(drains(&txn).unwrap().is_empty());
        assert!(drain_moves(&txn, 1).unwrap().is_empty());
        check_invariants(&txn, &[1, 2]);
    }

    /// `agent` left unplaced by a plan for want of CPU.
    fn lacking_cpu(agent: &str, generation: u64) -> Unplaced {
        Unplaced {
            agent: agent.into(),
            generation,
            reason: "1 node lacks CPU".into(),
        }
    }

    #[test]
    fn unblock_queues_every_blocked_agent_again_and_nothing_else() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 1, 1024);
        let big = run(&mut txn, spec("big", 4000, 10));
        let plan = Plan {
            unplaced: vec![lacking_cpu("big", big)],
            ..Plan::default()
        };
        apply(&mut txn, &AgentCommand::Plan { plan, at_ms: 2 }).unwrap();
        assert_eq!(blocked_count(&txn).unwrap(), 1);
        assert!(evals(&txn).is_empty());

        let outcome = apply(&mut txn, &AgentCommand::Unblock { at_ms: 3 }).unwrap();
        assert_eq!(outcome, AgentOutcome::Unblocked(1));
        assert_eq!(evals(&txn), vec![("big".into(), EvalTrigger::Unblocked)]);
        assert_eq!(blocked_count(&txn).unwrap(), 0);
        // Nothing blocked: nothing changes.
        let outcome = apply(&mut txn, &AgentCommand::Unblock { at_ms: 4 }).unwrap();
        assert_eq!(outcome, AgentOutcome::Unblocked(0));
        assert_eq!(evals(&txn), vec![("big".into(), EvalTrigger::Unblocked)]);
    }

    #[test]
    fn every_change_queues_an_evaluation_and_the_plan_that_handles_it_settles_it() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 1, 1024);
        let g = run(&mut txn, spec("a", 500, 10));
        let big = run(&mut txn, spec("big", 4000, 10));
        assert_eq!(
            evals(&txn),
            vec![("a".into(), EvalTrigger::Changed), ("big".into(), EvalTrigger::Changed)]
        );

        // a is placed; big does not fit anywhere and is blocked.
        let plan = Plan {
            placements: vec![Placement {
                agent: "a".into(),
                generation: g,
                node: 1,
            }],
            unplaced: vec![lacking_cpu("big", big)],
            ..Plan::default()
        };
        apply(&mut txn, &AgentCommand::Plan { plan, at_ms: 2 }).unwrap();
        assert!(evals(&txn).is_empty());
        assert!(is_blocked(&txn, "big").unwrap());
        assert_eq!(agent(&txn, "big").unwrap().unwrap().pending_reason, "1 node lacks CPU");

        // A new node unblocks it.
        add_node(&mut txn, 2, 8, 1024);
        unblock_all(&mut txn).unwrap();
        assert_eq!(evals(&txn), vec![("big".into(), EvalTrigger::Unblocked)]);
        assert!(!is_blocked(&txn, "big").unwrap());

        // Draining node 1 queues its agent; a migration queues one too.
        for (state, trigger) in [
            (NodeState::Draining, EvalTrigger::Drain),
            (NodeState::Down, EvalTrigger::NodeDown),
        ] {
            apply(
                &mut txn,
                &AgentCommand::SetNodeState {
                    node: 1,
                    state,
                    reason: String::new(),
                    at_ms: 3,
                },
            )
            .unwrap();
            assert!(evals(&txn).contains(&("a".into(), trigger)), "{:?}", evals(&txn));
        }
        apply(
            &mut txn,
            &AgentCommand::Migrate {
                agent: "big".into(),
                to: 2,
            },
        )
        .unwrap();
        assert!(evals(&txn).contains(&("big".into(), EvalTrigger::Migrate { to: 2 })));

        // A plan that finds nothing to do settles the evaluation.
        let plan = Plan {
            settled: vec![Settled {
                agent: "a".into(),
                generation: g,
            }],
            ..Plan::default()
        };
        apply(&mut txn, &AgentCommand::Plan { plan, at_ms: 4 }).unwrap();
        assert_eq!(evals(&txn), vec![("big".into(), EvalTrigger::Migrate { to: 2 })]);
    }

    #[test]
    fn a_move_that_found_no_room_leaves_a_reason_until_the_agent_is_settled() {
        let mut txn = MemTxn::new();
        add_node(&mut txn, 1, 1, 1024);
        let g = run(&mut txn, spec("a", 500, 10));
        plan(&mut txn, &[("a", g, 1)]);
        apply(
            &mut txn,
            &AgentCommand::Migrate {
                agent: "a".into(),
                to: 0,
            },
        )
        .unwrap();
        let no_room = Plan {
            unplaced: vec![Unplaced {
                agent: "a".into(),
                generation: g,
                reason: "1 node is where it runs now".into(),
            }],
            ..Plan::default()
        };
        apply(
            &mut txn,
            &AgentCommand::Plan {
                plan: no_room,
                at_ms: 3,
            },
        )
        .unwrap();
        assert_eq!(
            agent(&txn, "a").unwrap().unwrap().pending_reason,
            "1 node is where it runs now"
        );
        assert_eq!(
            allocation(&txn, "a").unwrap().unwrap().status,
            AllocStatus::Pending,
            "it still runs"
        );
        // A node change unblocks it; the scheduler finds it fine where it is.
        add_node(&mut txn, 2, 1, 1024);
        unblock_all(&mut txn).unwrap();
        let settled = Plan {
            settled: vec![Settled {
                agent: "a".into(),
                generation: g,
            }],
            ..Plan::default()
        };
        apply(
            &mut txn,
            &AgentCommand::Plan {
                plan: settled,
                at_ms: 4,
            },
        )
        .unwrap();
        assert_eq!(agent(&txn, "a").unwrap().unwrap().pending_reason, "");
        assert!(evals(&txn).is_empty());
    }

    #[test]
    fn specs_are_refused_naming_the_bad_field() {
        let mut bad = spec("UPPER", 1, 1);
        assert!(bad.validate().unwrap_err().to_string().contains("name"));
        bad = spec("ok", 0, 1);
        assert!(bad.validate().unwrap_err().to_string().contains("resources.cpu_millis"));
        bad = spec("ok", 1, 0);
        assert!(bad.validate().unwrap_err().to_string().contains("resources.memory_mb"));
        bad = spec("ok", 1, 1);
        bad.kind = AgentKind::Exec {
            command: vec![],
            timeout_ms: 1,
            max_output_bytes: 1,
        };
        assert!(bad.validate().unwrap_err().to_string().contains("config.command"));
        bad = spec("ok", 1, 1);
        bad.constraints.labels.insert(String::new(), "x".into());
        assert!(bad.validate().unwrap_err().to_string().contains("constraints.labels"));
        spec("ok", 1, 1).validate().unwrap();
    }
}
