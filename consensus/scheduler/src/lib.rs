//! cell0-scheduler: where agents run, decided the way Nomad's scheduler
//! decides it.
//!
//! [`process`] takes evaluations (an agent to look at again, and why) and an
//! immutable [`ClusterView`], and returns a [`Plan`]: placements, stops and
//! the agents left pending with a reason a person can act on. It does no
//! I/O, reads no clock and draws no random number, so the same input gives
//! the same plan. The leader builds the view from the replicated state,
//! runs this, and commits the plan as one Raft command, which the state
//! machine validates again (`cell0_state::agents`): a plan computed on a
//! stale view is refused in part, and those agents are evaluated again.
//!
//! For each evaluation:
//! 1. **Reconcile**: an agent that should be stopped has its allocation
//!    stopped; one that runs on a node that still takes it, and is not being
//!    moved, is left alone.
//! 2. **Feasibility**: a node must be ready, hold the labels, GPU and model
//!    the spec requires, and have room for its resources (counting what this
//!    plan already placed there). Nodes that fail are counted by reason.
//! 3. **Ranking**: among up to [`Options::candidates`] feasible nodes, found
//!    from a start point that depends on the agent's name (so agents do not
//!    all probe the same nodes first), the best by bin-packing (the fullest
//!    node after placing; the default) or spread (the emptiest); ties go to
//!    the lower node id. Nomad likewise limits the nodes it ranks, so a
//!    placement costs about the same on ten thousand nodes as on ten.
//!
//! Invariants:
//! - A plan never places more on a node than the view says it has room for,
//!   counting its own earlier placements.
//! - An agent appears at most once in a plan.

use std::collections::{BTreeMap, BTreeSet};

use cell0_state::NodeId;
use cell0_state::agents::{AgentSpec, Allocation, Desired, NodeState, Placement, Plan, Resources, Settled, Unplaced};

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its id.
    pub id: NodeId,
    /// What it offers agents.
    pub capacity: Resources,
    /// What its allocations hold.
    pub usage: Resources,
    /// Whether it takes new agents.
    pub state: NodeState,
    /// Whether the leader's failure detector last recorded it dead: it
    /// takes no new agents until heard again (its running agents stay
    /// until its lease says otherwise).
    pub unreachable: bool,
    /// Whether its inference engine runs on a hardware GPU.
    pub gpu: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The models it holds, by name.
    pub models: BTreeSet<String>,
}

/// The nodes, as of one point of the replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    nodes: Vec<NodeView>,
}

impl ClusterView {
    /// A view of `nodes` (any order).
    pub fn new(mut nodes: Vec<NodeView>) -> Self {
        nodes.sort_by_key(|n| n.id);
        Self { nodes }
    }

    /// The nodes, by id.
    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }
}

/// Why an agent is looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// It was submitted, changed or stopped.
    Changed,
    /// Its node was declared down.
    NodeDown,
    /// Its node is draining: move it.
    Drain,
    /// A user asked to move it, to a given node or anywhere else.
    Migrate {
        /// The node to move it to, if one was named.
        to: Option<NodeId>,
    },
}

/// One agent to decide about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// Its spec.
    pub spec: AgentSpec,
    /// Its generation (a plan for another one is refused).
    pub generation: u64,
    /// What the user wants.
    pub desired: Desired,
    /// Its current allocation, if any.
    pub current: Option<Allocation>,
    /// Why it is evaluated.
    pub trigger: Trigger,
}

/// How feasible nodes are ranked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ranking {
    /// Fill the fullest node that fits (fewer nodes busy).
    #[default]
    BinPack,
    /// Use the emptiest node (load spread out).
    Spread,
}

/// How [`process`] chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// How feasible nodes are ranked.
    pub ranking: Ranking,
    /// How many feasible nodes are ranked per placement (at least 1).
    pub candidates: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ranking: Ranking::BinPack,
            candidates: 8,
        }
    }
}

/// Why a node cannot take an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Why {
    Draining,
    Ineligible,
    Down,
    Unreachable,
    NoGpu,
    NoModel,
    NoLabels,
    NoCpu,
    NoMemory,
    NoGpuMemory,
    CurrentNode,
}

impl Why {
    /// A short stable name, for metrics.
    fn label(self) -> &'static str {
        match self {
            Why::Draining => "draining",
            Why::Ineligible => "ineligible",
            Why::Down => "down",
            Why::Unreachable => "unreachable",
            Why::NoGpu => "no_gpu",
            Why::NoModel => "no_model",
            Why::NoLabels => "no_labels",
            Why::NoCpu => "no_cpu",
            Why::NoMemory => "no_memory",
            Why::NoGpuMemory => "no_gpu_memory",
            Why::CurrentNode => "current_node",
        }
    }

    /// What `n` nodes do, in words.
    fn phrase(self, n: usize) -> String {
        let (noun, is, lack) = if n == 1 {
            ("node", "is", "lacks")
        } else {
            ("nodes", "are", "lack")
        };
        let rest = match self {
            Why::Draining => format!("{is} draining"),
            Why::Ineligible => format!("{is} ineligible"),
            Why::Down => format!("{is} down"),
            Why::Unreachable => format!("{is} unreachable"),
            Why::NoGpu => format!("{lack} a GPU"),
            Why::NoModel => format!("{lack} the model"),
            Why::NoLabels => format!("{lack} the labels"),
            Why::NoCpu => format!("{lack} CPU"),
            Why::NoMemory => format!("{lack} memory"),
            Why::NoGpuMemory => format!("{lack} GPU memory"),
            Why::CurrentNode => format!("{is} where it runs now"),
        };
        format!("{n} {noun} {rest}")
    }
}

/// Why nodes could not take an agent, counted by reason.
#[derive(Debug, Default)]
struct Refusals {
    counts: BTreeMap<Why, usize>,
}

impl Refusals {
    fn add(&mut self, why: Why) {
        *self.counts.entry(why).or_default() += 1;
    }

    /// "2 nodes lack a GPU, 1 node lacks memory", most common first, and
    /// the most common reason's label.
    fn describe(&self) -> Unplaceable {
        let mut counts: Vec<_> = self.counts.iter().collect();
        counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let Some((main, _)) = counts.first() else {
            return Unplaceable {
                reason: "no node has reported its resources".into(),
                label: "no_nodes",
            };
        };
        Unplaceable {
            label: main.label(),
            reason: counts
                .iter()
                .map(|(why, n)| why.phrase(**n))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Why `node` cannot take `spec`, with `planned` already placed on it by
/// this plan.
fn infeasible(node: &NodeView, planned: Resources, spec: &AgentSpec) -> Option<Why> {
    match node.state {
        NodeState::Ready => {}
        NodeState::Draining => return Some(Why::Draining),
        NodeState::Ineligible => return Some(Why::Ineligible),
        NodeState::Down => return Some(Why::Down),
    }
    if node.unreachable {
        return Some(Why::Unreachable);
    }
    let c = &spec.constraints;
    if c.gpu && !node.gpu {
        return Some(Why::NoGpu);
    }
    if !c.model.is_empty() && !node.models.contains(&c.model) {
        return Some(Why::NoModel);
    }
    if c.labels.iter().any(|(k, v)| node.labels.get(k) != Some(v)) {
        return Some(Why::NoLabels);
    }
    let wanted = node.usage.plus(planned).plus(spec.resources);
    if wanted.cpu_millis > node.capacity.cpu_millis {
        Some(Why::NoCpu)
    } else if wanted.memory_mb > node.capacity.memory_mb {
        Some(Why::NoMemory)
    } else if wanted.gpu_memory_mb > node.capacity.gpu_memory_mb {
        Some(Why::NoGpuMemory)
    } else {
        None
    }
}

/// How full `node` would be with `used`, in parts per million of its
/// scarcest dimension (CPU or memory).
fn fullness(used: Resources, capacity: &Resources) -> u64 {
    let part = |u: u64, c: u64| u.saturating_mul(1_000_000).checked_div(c).unwrap_or(0);
    part(used.cpu_millis, capacity.cpu_millis).max(part(used.memory_mb, capacity.memory_mb))
}

/// A start point in `0..n` derived from `name` (FNV-1a), so evaluations
/// spread their probes over the nodes deterministically.
fn start_point(name: &str, n: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    usize::try_from(hash % n.max(1) as u64).unwrap_or(0)
}

/// Whether `current` still runs on a node that takes it.
fn stays(current: &Allocation, view: &ClusterView) -> bool {
    current.status.holds_resources()
        && view
            .nodes
            .binary_search_by_key(&current.node, |n| n.id)
            .is_ok_and(|i| matches!(view.nodes[i].state, NodeState::Ready | NodeState::Ineligible))
}

/// Why an agent fits no node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unplaceable {
    /// For people: "3 nodes lack a GPU, 1 node lacks memory".
    reason: String,
    /// For metrics: the most common reason, e.g. `no_gpu`.
    label: &'static str,
}

/// A plan, and how many agents it could not place by their most common
/// reason (`no_gpu`, `no_cpu`, `draining`, ...: [`Decision::failures`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// What to commit.
    pub plan: Plan,
    /// Agents left unplaced, by the label of the reason most nodes gave.
    pub failures: BTreeMap<&'static str, u64>,
}

/// Decides about `evals` over `view` (see the crate docs): the plan only.
pub fn process(evals: &[Evaluation], view: &ClusterView, options: Options) -> Plan {
    decide(evals, view, options).plan
}

/// Decides about `evals` over `view`, counting placement failures.
pub fn decide(evals: &[Evaluation], view: &ClusterView, options: Options) -> Decision {
    let mut plan = Plan::default();
    let mut failures = BTreeMap::new();
    // What this plan placed on each node (index into view.nodes).
    let mut planned = vec![Resources::default(); view.nodes.len()];
    let mut seen = BTreeSet::new();
    for eval in evals {
        let name = &eval.spec.name;
        if !seen.insert(name.clone()) {
            continue;
        }
        let holding = eval.current.as_ref().filter(|a| a.status.holds_resources());
        let settled = || Settled {
            agent: name.clone(),
            generation: eval.generation,
        };
        if eval.desired == Desired::Stopped {
            if holding.is_some() {
                plan.stops.push(name.clone());
            } else {
                plan.settled.push(settled());
            }
            continue;
        }
        let moving = matches!(eval.trigger, Trigger::Drain | Trigger::Migrate { .. });
        if let Some(current) = holding
            && !moving
            && current.generation == eval.generation
            && stays(current, view)
        {
            plan.settled.push(settled());
            continue;
        }
        let avoid = holding.filter(|_| moving).map(|a| a.node);
        match choose(eval, view, &planned, avoid, options) {
            Ok(i) => {
                planned[i] = planned[i].plus(eval.spec.resources);
                plan.placements.push(Placement {
                    agent: name.clone(),
                    generation: eval.generation,
                    node: view.nodes[i].id,
                });
            }
            Err(why) => {
                *failures.entry(why.label).or_default() += 1;
                plan.unplaced.push(Unplaced {
                    agent: name.clone(),
                    generation: eval.generation,
                    reason: why.reason,
                });
            }
        }
    }
    Decision { plan, failures }
}

/// The index of the node to place `eval` on, or why there is none.
fn choose(
    eval: &Evaluation,
    view: &ClusterView,
    planned: &[Resources],
    avoid: Option<NodeId>,
    options: Options,
) -> Result<usize, Unplaceable> {
    let nodes = &view.nodes;
    let spec = &eval.spec;
    if let Trigger::Migrate { to: Some(to) } = eval.trigger {
        let Ok(i) = nodes.binary_search_by_key(&to, |n| n.id) else {
            return Err(Unplaceable {
                reason: format!("node {to:016x} is unknown"),
                label: "unknown_node",
            });
        };
        return match infeasible(&nodes[i], planned[i], spec) {
            None => Ok(i),
            Some(why) => Err(Unplaceable {
                reason: format!("the named node: {}", why.phrase(1)),
                label: why.label(),
            }),
        };
    }
    let mut refusals = Refusals::default();
    let mut best: Option<(u64, usize)> = None;
    let mut feasible = 0;
    let start = start_point(&spec.name, nodes.len());
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        let node = &nodes[i];
        if Some(node.id) == avoid {
            refusals.add(Why::CurrentNode);
            continue;
        }
        if let Some(why) = infeasible(node, planned[i], spec) {
            refusals.add(why);
            continue;
        }
        let after = node.usage.plus(planned[i]).plus(spec.resources);
        let full = fullness(after, &node.capacity);
        let score = match options.ranking {
            Ranking::BinPack => full,
            Ranking::Spread => 1_000_000u64.saturating_sub(full),
        };
        let better = match best {
            None => true,
            Some((s, j)) => score > s || (score == s && node.id < nodes[j].id),
        };
        if better {
            best = Some((score, i));
        }
        feasible += 1;
        if feasible >= options.candidates.max(1) {
            break;
        }
    }
    best.map(|(_, i)| i).ok_or_else(|| refusals.describe())
}

/// When the leader should evaluate the agents blocked for want of room
/// again ([`cell0_state::agents::AgentCommand::Unblock`]).
///
/// The state machine unblocks them when node records or status change.
/// It does not when an allocation stops, is lost or moves away, and a plan
/// does not count the room its own moves free. So the leader compares each
/// node's usage with the last it saw and asks for an unblock when some
/// node holds less in any dimension while agents are blocked. A leader
/// that has seen nothing yet (new in its term, or no agent was blocked at
/// its last look, when it need not read the usage) asks once, as room may
/// have been freed while it was not watching.
///
/// Usage totals can hide freed room: an allocation that stops between two
/// looks while a placement on the same node takes as much or more leaves
/// no dimension lower, yet an agent blocked on a view that still counted
/// the stopped allocation may fit now. So after [`RECHECK_LOOKS`] looks in
/// a row with agents blocked and no unblock, it asks anyway: an agent
/// waits at most that many looks past the room it needs.
///
/// Invariants: pure logic, no clock and no I/O; a spurious unblock only
/// costs one more evaluation of each blocked agent, which blocks it again
/// if it still does not fit; while usage only grows it asks at most once
/// every [`RECHECK_LOOKS`] looks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoomWatch {
    /// Each node's usage when last seen; `None` before the first look.
    seen: Option<BTreeMap<NodeId, Resources>>,
    /// Looks in a row, with agents blocked, that asked for no unblock.
    quiet_looks: u32,
}

/// Looks with agents blocked after which [`RoomWatch`] asks for an unblock
/// even though no node's usage fell.
pub const RECHECK_LOOKS: u32 = 10;

impl RoomWatch {
    /// Whether the `blocked` agents should be evaluated again, given each
    /// node's `usage` now (a node without a row holds nothing).
    pub fn should_unblock(&self, blocked: u64, usage: &BTreeMap<NodeId, Resources>) -> bool {
        if blocked == 0 {
            return false;
        }
        let Some(seen) = &self.seen else {
            return true;
        };
        self.quiet_looks >= RECHECK_LOOKS
            || seen.iter().any(|(node, before)| {
                let now = usage.get(node).copied().unwrap_or_default();
                now.cpu_millis < before.cpu_millis
                    || now.memory_mb < before.memory_mb
                    || now.gpu_memory_mb < before.gpu_memory_mb
            })
    }

    /// Records `usage` as seen at a look with agents blocked, after an
    /// unblock was committed (`unblocked`) or when none was asked for.
    pub fn seen(&mut self, usage: BTreeMap<NodeId, Resources>, unblocked: bool) {
        self.seen = Some(usage);
        self.quiet_looks = if unblocked {
            0
        } else {
            self.quiet_looks.saturating_add(1)
        };
    }

    /// Forgets what was seen: a new term began, or no agent is blocked.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use cell0_state::agents::{AgentKind, AllocStatus, Constraints, RestartPolicy};

    use super::*;

    fn node(id: NodeId, cores: u64, memory_mb: u64) -> NodeView {
        NodeView {
            id,
            capacity: Resources {
                cpu_millis: cores * 1000,
                memory_mb,
                gpu_memory_mb: 0,
            },
            usage: Resources::default(),
            state: NodeState::Ready,
            unreachable: false,
            gpu: false,
            labels: BTreeMap::new(),
            models: BTreeSet::new(),
        }
    }

    fn eval(name: &str, cpu_millis: u64, memory_mb: u64) -> Evaluation {
        Evaluation {
            spec: AgentSpec {
                name: name.into(),
                kind: AgentKind::Inference,
                resources: Resources {
                    cpu_millis,
                    memory_mb,
                    gpu_memory_mb: 0,
                },
                constraints: Constraints::default(),
                restart: RestartPolicy::Always,
            },
            generation: 1,
            desired: Desired::Running,
            current: None,
            trigger: Trigger::Changed,
        }
    }

    fn placed_on(plan: &Plan) -> Vec<(String, NodeId)> {
        plan.placements.iter().map(|p| (p.agent.clone(), p.node)).collect()
    }

    #[test]
    fn bin_packing_fills_one_node_before_the_next_and_never_overcommits() {
        let view = ClusterView::new(vec![node(2, 2, 1024), node(1, 2, 1024)]);
        let evals: Vec<_> = (0..5).map(|i| eval(&format!("a{i}"), 1000, 100)).collect();
        let plan = process(&evals, &view, Options::default());
        let mut per_node = BTreeMap::new();
        for (_, n) in placed_on(&plan) {
            *per_node.entry(n).or_insert(0) += 1;
        }
        assert_eq!(per_node, BTreeMap::from([(1, 2), (2, 2)]), "{plan:?}");
        assert_eq!(plan.unplaced.len(), 1);
        assert_eq!(plan.unplaced[0].reason, "2 nodes lack CPU");
    }

    #[test]
    fn spread_uses_the_emptiest_node() {
        let mut busy = node(1, 4, 1024);
        busy.usage.cpu_millis = 3000;
        let view = ClusterView::new(vec![busy, node(2, 4, 1024)]);
        let options = Options {
            ranking: Ranking::Spread,
            ..Options::default()
        };
        assert_eq!(
            placed_on(&process(&[eval("a", 500, 10)], &view, options)),
            vec![("a".to_string(), 2)]
        );
        assert_eq!(
            placed_on(&process(&[eval("a", 500, 10)], &view, Options::default())),
            vec![("a".to_string(), 1)],
            "bin-packing picks the fuller node"
        );
    }

    #[test]
    fn an_unplaceable_agent_says_what_the_nodes_lack() {
        let mut gpu = node(1, 1, 64);
        gpu.gpu = true;
        let mut drained = node(4, 8, 8192);
        drained.state = NodeState::Draining;
        let view = ClusterView::new(vec![gpu, node(2, 8, 8192), node(3, 8, 8192), drained]);
        let mut e = eval("a", 2000, 100);
        e.spec.constraints.gpu = true;
        let decision = decide(&[e], &view, Options::default());
        // Counted for metrics by the most common reason.
        assert_eq!(decision.failures, BTreeMap::from([("no_gpu", 1)]));
        let plan = decision.plan;
        assert!(plan.placements.is_empty());
        assert_eq!(
            plan.unplaced[0].reason,
            "2 nodes lack a GPU, 1 node is draining, 1 node lacks CPU"
        );
    }

    #[test]
    fn a_node_recorded_unreachable_takes_no_new_agent() {
        let mut unreachable = node(1, 8, 8192);
        unreachable.unreachable = true;
        let view = ClusterView::new(vec![unreachable.clone(), node(2, 1, 64)]);
        assert_eq!(
            placed_on(&process(&[eval("a", 500, 10)], &view, Options::default())),
            vec![("a".to_string(), 2)]
        );
        let view = ClusterView::new(vec![unreachable]);
        let plan = process(&[eval("a", 500, 10)], &view, Options::default());
        assert_eq!(plan.unplaced[0].reason, "1 node is unreachable");
    }

    #[test]
    fn labels_models_and_gpus_are_required_where_asked() {
        let mut labelled = node(1, 4, 1024);
        labelled.labels.insert("zone".into(), "b".into());
        labelled.models.insert("minilm".into());
        let view = ClusterView::new(vec![labelled, node(2, 4, 1024)]);
        let mut e = eval("a", 100, 10);
        e.spec.constraints.labels.insert("zone".into(), "b".into());
        e.spec.constraints.model = "minilm".into();
        assert_eq!(
            placed_on(&process(&[e.clone()], &view, Options::default())),
            vec![("a".to_string(), 1)]
        );
        e.spec.constraints.labels.insert("zone".into(), "c".into());
        let plan = process(&[e], &view, Options::default());
        assert_eq!(
            plan.unplaced[0].reason,
            "1 node lacks the model, 1 node lacks the labels"
        );
    }

    #[test]
    fn running_agents_stay_unless_moved_and_stopped_ones_are_stopped() {
        let view = ClusterView::new(vec![node(1, 4, 1024), node(2, 4, 1024)]);
        let alloc = Allocation {
            node: 1,
            incarnation: 3,
            status: AllocStatus::Running,
            reason: String::new(),
            resources: Resources {
                cpu_millis: 100,
                memory_mb: 10,
                gpu_memory_mb: 0,
            },
            generation: 1,
            updated_at_ms: 0,
        };
        let mut running = eval("a", 100, 10);
        running.current = Some(alloc.clone());
        let plan = process(&[running.clone()], &view, Options::default());
        assert!(plan.placements.is_empty() && plan.stops.is_empty(), "{plan:?}");
        assert_eq!(plan.settled.len(), 1, "the evaluation is settled with nothing to do");

        let mut drained = running.clone();
        drained.trigger = Trigger::Drain;
        assert_eq!(
            placed_on(&process(&[drained], &view, Options::default())),
            vec![("a".to_string(), 2)]
        );

        let mut migrate = running.clone();
        migrate.trigger = Trigger::Migrate { to: Some(2) };
        assert_eq!(
            placed_on(&process(&[migrate], &view, Options::default())),
            vec![("a".to_string(), 2)]
        );

        let mut stopped = running;
        stopped.desired = Desired::Stopped;
        let plan = process(&[stopped], &view, Options::default());
        assert_eq!(plan.stops, vec!["a".to_string()]);
        assert!(plan.placements.is_empty());
    }

    #[test]
    fn a_large_cluster_places_each_agent_after_a_bounded_probe() {
        let view = ClusterView::new((1..=10_000).map(|id| node(id, 16, 65_536)).collect());
        let evals: Vec<_> = (0..2_000).map(|i| eval(&format!("agent-{i}"), 250, 256)).collect();
        let plan = process(&evals, &view, Options::default());
        assert_eq!(plan.placements.len(), 2_000);
        // Never more on a node than it holds.
        let mut used: BTreeMap<NodeId, u64> = BTreeMap::new();
        for p in &plan.placements {
            *used.entry(p.node).or_default() += 250;
        }
        assert!(used.values().all(|cpu| *cpu <= 16_000), "{used:?}");
    }

    fn usage(cpu_millis: u64, memory_mb: u64) -> Resources {
        Resources {
            cpu_millis,
            memory_mb,
            gpu_memory_mb: 0,
        }
    }

    #[test]
    fn room_watch_asks_for_an_unblock_only_when_room_was_freed_while_agents_wait() {
        let mut watch = RoomWatch::default();
        let busy = BTreeMap::from([(1, usage(1000, 512)), (2, usage(500, 256))]);
        // Nothing blocked: never.
        assert!(!watch.should_unblock(0, &busy));
        // A new leader with blocked agents asks once.
        assert!(watch.should_unblock(3, &busy));
        watch.seen(busy.clone(), true);
        assert!(!watch.should_unblock(3, &busy));
        // More placed: no new room.
        let fuller = BTreeMap::from([(1, usage(1500, 512)), (2, usage(500, 256))]);
        assert!(!watch.should_unblock(3, &fuller));
        watch.seen(fuller.clone(), false);
        // Memory freed on one node, CPU unchanged: room.
        let freed = BTreeMap::from([(1, usage(1500, 256)), (2, usage(500, 256))]);
        assert!(watch.should_unblock(3, &freed));
        // A node's last allocation gone (no usage row): room.
        let emptied = BTreeMap::from([(1, usage(1500, 512))]);
        assert!(watch.should_unblock(1, &emptied));
        // After leadership is lost, the next look asks again.
        watch.seen(fuller.clone(), false);
        watch.reset();
        assert!(watch.should_unblock(1, &fuller));
    }

    #[test]
    fn room_watch_asks_again_after_quiet_looks_when_a_placement_hid_the_freed_room() {
        let mut watch = RoomWatch::default();
        let before = BTreeMap::from([(1, usage(2000, 1280))]);
        assert!(watch.should_unblock(2, &before));
        watch.seen(before, true);
        // Between two looks one allocation stopped (1,000 millicores, 384 MB)
        // and a placement took 1,000 millicores and 768 MB: no dimension
        // fell, yet a blocked agent may fit where the stopped one was.
        let after = BTreeMap::from([(1, usage(2000, 1664))]);
        for _ in 0..RECHECK_LOOKS {
            assert!(!watch.should_unblock(2, &after));
            watch.seen(after.clone(), false);
        }
        assert!(
            watch.should_unblock(2, &after),
            "asks after {RECHECK_LOOKS} quiet looks"
        );
        watch.seen(after.clone(), true);
        assert!(!watch.should_unblock(2, &after), "and then waits as many again");
        // Nothing blocked resets the count.
        watch.reset();
        assert!(!watch.should_unblock(0, &after));
    }
}
