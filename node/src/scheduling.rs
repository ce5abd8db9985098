//! The leader's scheduler worker (task `scheduler`): pending evaluations in,
//! plans committed through Raft.
//!
//! Every node runs the task; only the one that is leader does work. A round
//! reads, after a linearizable read barrier, from one point-in-time view of
//! the local replica, up to
//! [`EVALS_PER_PLAN`] pending evaluations (from where the previous round
//! stopped, wrapping around: see [`Cursor`]) with their agents and
//! allocations, and the nodes (records, status, usage, models held); runs
//! `cell0_scheduler::process`; and proposes the plan as one command. The
//! state machine validates the plan again as it applies: a placement made
//! on a view that changed meanwhile is refused and its evaluation stays
//! pending for the next round. A round follows every change to agent or
//! node tables, and at least every [`IDLE_ROUND`] while evaluations are
//! pending. After each round the leader also ends the drains whose deadline
//! passed on its clock (the rest of their agents move at once), and when
//! room was freed on a node while agents wait for room it has them
//! evaluated again ([`RoomWatch`], `AgentCommand::Unblock`).
//!
//! Invariants:
//! - Only plans go through Raft; the scheduler itself holds no state, so a
//!   new leader simply picks up the evaluations that are still pending.
//! - The plan's time (`at_ms`) is the leader's clock when it proposes; apply
//!   never reads a clock.
//! - A plan is made on a view that holds every plan committed before its
//!   round (the read barrier; a new leader's replica may still be applying
//!   its predecessor's), and is committed only in the term it was read in
//!   (`Consensus::propose_as_leader`), so no later leader applies it on top
//!   of plans of its own. The state machine accepts a placement of an
//!   agent's current generation even when the agent is placed (a node lost,
//!   a drain), so these two rules are what keep a plan from placing an
//!   agent again for a generation another plan placed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cell0_consensus::agents::{self, AgentCommand, DrainSpec, EvalTrigger, Plan};
use cell0_consensus::{Consensus, Consistency, Role, Table, nodes, registry};
use cell0_scheduler::{ClusterView, Evaluation, NodeView, Options, RoomWatch, Trigger};
use tokio::sync::watch;

use crate::supervisor::{Backoff, stopped};

/// Most evaluations one plan handles.
pub const EVALS_PER_PLAN: usize = 5_000;
/// Longest pause between rounds while this node leads.
const IDLE_ROUND: Duration = Duration::from_secs(1);

/// The leader's clock as agent commands carry it (`at_ms`): milliseconds
/// since the Unix epoch, read when the command is proposed.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What one round read: the evaluations and the nodes.
struct Round {
    evals: Vec<Evaluation>,
    view: ClusterView,
    /// Evaluations pending in all (the queue depth).
    pending: u64,
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

/// Reads one round's input from `txn`: the pending evaluations of agents
/// named after `cursor` (from the start when there are none after it).
fn read_round(txn: &dyn cell0_state::Txn, cursor: &str) -> cell0_state::Result<Round> {
    let depth = agents::pending_eval_count(txn)?;
    let mut pending = agents::pending_evals(txn, cursor, EVALS_PER_PLAN)?;
    if pending.is_empty() && !cursor.is_empty() {
        pending = agents::pending_evals(txn, "", EVALS_PER_PLAN)?;
    }
    let mut evals = Vec::new();
    for (name, eval) in pending {
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
        // Nothing to decide: the nodes need not be read (this runs every
        // idle tick on the leader).
        return Ok(Round {
            evals,
            view: ClusterView::default(),
            pending: depth,
        });
    }
    Ok(Round {
        evals,
        view: cluster_view(txn)?,
        pending: depth,
    })
}

/// The nodes as the scheduler sees them: records, status, recorded
/// liveness, usage, labels and the models each holds.
fn cluster_view(txn: &dyn cell0_state::Txn) -> cell0_state::Result<ClusterView> {
    let mut models: BTreeMap<u64, std::collections::BTreeSet<String>> = BTreeMap::new();
    for entry in registry::list(txn)? {
        for holder in &entry.holders {
            models.entry(*holder).or_default().insert(entry.manifest.name.clone());
        }
    }
    // Each table in one scan: a read per node would cost 4 x 10,000 reads
    // per round on a large cluster.
    let mut usages = agents::node_usages(txn)?;
    let mut statuses = agents::node_statuses(txn)?;
    let mut labels = nodes::labels(txn)?;
    let liveness = nodes::liveness(txn)?;
    let mut view = Vec::new();
    for (id, record) in nodes::resources(txn)? {
        view.push(NodeView {
            id,
            capacity: agents::Resources::of_node(&record),
            usage: usages.remove(&id).unwrap_or_default(),
            state: statuses.remove(&id).map_or(agents::NodeState::Ready, |s| s.state),
            unreachable: liveness.get(&id).is_some_and(|l| l.liveness == nodes::Liveness::Dead),
            gpu: record.gpu,
            labels: labels.remove(&id).unwrap_or_default(),
            models: models.remove(&id).unwrap_or_default(),
        });
    }
    Ok(ClusterView::new(view))
}

/// Clusters up to this many node records get [`first_plan`] on `Run`.
pub(crate) const FIRST_PLAN_MAX_NODES: u64 = 1024;

/// The placement of `spec` as `Run` would leave it (its next generation),
/// computed on this replica's view, for `Agents.Run` to propose in the
/// same log entry as the agent: one commit instead of two. The state
/// machine validates it as it applies; when the view was stale the
/// placement is refused and the evaluation stays for the leader's
/// scheduler, which also handles everything this does not: an unchanged
/// spec, no room in this view (the leader then records why), and clusters
/// over [`FIRST_PLAN_MAX_NODES`] nodes (reading their view would cost more
/// than the commit it saves).
pub(crate) fn first_plan(
    txn: &dyn cell0_state::Txn,
    spec: &agents::AgentSpec,
    options: Options,
) -> cell0_state::Result<Option<Plan>> {
    if nodes::record_count(txn)? > FIRST_PLAN_MAX_NODES {
        return Ok(None);
    }
    let (generation, current) = match agents::agent(txn, &spec.name)? {
        Some(r) if r.spec == *spec && r.desired == agents::Desired::Running => return Ok(None),
        Some(r) => (r.generation + 1, agents::allocation(txn, &spec.name)?),
        None => (1, None),
    };
    let eval = Evaluation {
        current,
        generation,
        desired: agents::Desired::Running,
        spec: spec.clone(),
        trigger: Trigger::Changed,
    };
    let plan = cell0_scheduler::process(std::slice::from_ref(&eval), &cluster_view(txn)?, options);
    Ok((!plan.placements.is_empty()).then(|| Plan {
        placements: plan.placements,
        ..Plan::default()
    }))
}

/// Where the next round starts reading evaluations: after the last agent
/// the previous round handled. The queue is read in name order, and the
/// plans delete what they settle, so starting from the beginning every
/// time would walk over ever more deleted rows; evaluations before the
/// cursor are reached when the scan wraps around.
#[derive(Debug, Default)]
pub(crate) struct Cursor(String);

/// One round on the leader of `term`: how many evaluations it handled.
pub(crate) async fn round(
    consensus: &Consensus,
    options: Options,
    cursor: &mut Cursor,
    term: u64,
) -> cell0_consensus::Result<usize> {
    let started = Instant::now();
    let after = cursor.0.clone();
    // Linearizable: a new leader's replica may not have applied the plans
    // its predecessor committed yet, and a plan made on that view would
    // place their agents again (simulator seed 720).
    let input = consensus
        .read(Consistency::Linearizable, move |txn| read_round(txn, &after))
        .await?;
    let Some(last) = input.evals.last() else {
        cursor.0.clear();
        return Ok(0);
    };
    cursor.0 = last.spec.name.clone();
    metrics::gauge!("cell0_scheduler_pending_evaluations").set(input.pending as f64);
    let decision = cell0_scheduler::decide(&input.evals, &input.view, options);
    for (reason, n) in &decision.failures {
        metrics::counter!("cell0_scheduler_placement_failures_total", "reason" => *reason).increment(*n);
    }
    let plan = decision.plan;
    let (placed, unplaced) = (plan.placements.len(), plan.unplaced.len());
    let command = AgentCommand::Plan { plan, at_ms: now_ms() };
    // Only in the term the view was read in: forwarded to a later leader,
    // the plan would be applied on top of that leader's own plans.
    let outcome = consensus.propose_as_leader(command.into_command(), term).await?;
    let refused = count_plan(placed, &outcome);
    metrics::gauge!("cell0_scheduler_unplaced_agents").set(unplaced as f64);
    metrics::histogram!("cell0_scheduler_round_duration_seconds").record(started.elapsed().as_secs_f64());
    tracing::debug!(
        evaluations = input.evals.len(),
        placed,
        refused,
        unplaced,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "scheduler round"
    );
    Ok(input.evals.len())
}

/// Counts a committed plan of `proposed` placements in the scheduler's
/// metrics; returns how many the state machine refused.
pub(crate) fn count_plan(proposed: usize, outcome: &cell0_consensus::Response) -> usize {
    let refused = match outcome {
        cell0_consensus::Response::Agent(agents::AgentOutcome::Planned(p)) => p.refused.len(),
        _ => 0,
    };
    metrics::counter!("cell0_scheduler_placements_total").increment(proposed.saturating_sub(refused) as u64);
    metrics::counter!("cell0_scheduler_plan_refusals_total").increment(refused as u64);
    refused
}

/// Proposes again, with no limit, every drain whose deadline passed on this
/// leader's clock: the rest of its agents move at once.
async fn drain_deadlines(consensus: &Consensus) -> cell0_consensus::Result<()> {
    let now = now_ms();
    let due = consensus
        .read(Consistency::Serializable, move |txn| {
            Ok(agents::drains(txn)?
                .into_iter()
                .filter(|(_, d)| d.max_parallel != 0 && d.deadline_ms != 0 && d.deadline_ms <= now)
                .collect::<Vec<_>>())
        })
        .await?;
    for (node, drain) in due {
        tracing::info!(
            node = format_args!("{node:016x}"),
            "drain deadline passed: the rest of its agents move at once"
        );
        let command = AgentCommand::Drain {
            node,
            drain: DrainSpec {
                max_parallel: 0,
                ..drain
            },
            reason: "drain deadline passed: the rest move at once".into(),
            at_ms: now,
        };
        consensus.propose(command.into_command()).await?;
    }
    Ok(())
}

/// Proposes [`AgentCommand::Unblock`] when room was freed on a node while
/// agents wait for it ([`RoomWatch`]), then records the usage as seen.
/// With no agent blocked it reads no usage (this runs every idle tick on
/// the leader) and forgets what it saw.
async fn unblock_if_room_freed(consensus: &Consensus, room: &mut RoomWatch) -> cell0_consensus::Result<()> {
    let Some((blocked, usage)) = consensus.read(Consistency::Serializable, agents::blocked_usage).await? else {
        room.reset();
        return Ok(());
    };
    let unblock = room.should_unblock(blocked, &usage);
    if unblock {
        let command = AgentCommand::Unblock { at_ms: now_ms() };
        if let cell0_consensus::Response::Agent(agents::AgentOutcome::Unblocked(n)) =
            consensus.propose(command.into_command()).await?
        {
            metrics::counter!("cell0_scheduler_unblocked_agents_total").increment(n);
            tracing::debug!(agents = n, "room freed on a node: blocked agents evaluated again");
        }
    }
    room.seen(usage, unblock);
    Ok(())
}

/// Runs scheduler rounds while this node leads, until `stop` rises.
pub async fn run(consensus: Consensus, options: Options, mut stop: watch::Receiver<bool>) {
    let mut agents_changed = consensus.watch_table(Table::Agents);
    let mut backoff = Backoff::default();
    let mut cursor = Cursor::default();
    let mut room = RoomWatch::default();
    // The term the watch saw this node lead in: a new one starts afresh.
    let mut led_in = None;
    loop {
        let status = consensus.status();
        if status.role != Role::Leader {
            led_in = None;
        } else {
            if led_in != Some(status.term) {
                room.reset();
                led_in = Some(status.term);
            }
            let handled = tokio::select! {
                r = round(&consensus, options, &mut cursor, status.term) => r,
                () = stopped(&mut stop) => return,
            };
            if let Err(e) = drain_deadlines(&consensus).await {
                tracing::warn!(error = %e, "cannot end drains past their deadline; retrying");
            }
            if let Err(e) = unblock_if_room_freed(&consensus, &mut room).await {
                tracing::warn!(error = %e, "cannot evaluate the agents waiting for room again; retrying");
            }
            match handled {
                // A full batch: more may be pending.
                Ok(n) if n >= EVALS_PER_PLAN => continue,
                Ok(_) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler round failed; retrying");
                    if !backoff.wait(&mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            Ok(()) = agents_changed.changed() => {}
            () = tokio::time::sleep(IDLE_ROUND) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cell0_state::agents::{AgentKind, AgentOutcome, AgentSpec, Constraints, Resources, RestartPolicy};
    use cell0_state::nodes::{NodeCommand, NodeResources};
    use cell0_state::{Command, MemTxn, Response};

    use super::*;

    fn spec(name: &str, cpu_millis: u64) -> AgentSpec {
        AgentSpec {
            name: name.into(),
            kind: AgentKind::Exec {
                command: vec!["/bin/cat".into()],
                timeout_ms: 1000,
                max_output_bytes: 1024,
            },
            resources: Resources {
                cpu_millis,
                memory_mb: 16,
                gpu_memory_mb: 0,
            },
            constraints: Constraints::default(),
            restart: RestartPolicy::Always,
        }
    }

    fn apply(txn: &mut MemTxn, cmd: Command) -> Response {
        cell0_state::apply(txn, &cmd).unwrap().response
    }

    #[test]
    fn a_run_carries_its_first_placement_in_the_same_entry_when_there_is_room() {
        let mut txn = MemTxn::new();
        let node = NodeCommand::SetResources {
            node: 7,
            resources: NodeResources {
                cpu_cores: 2,
                memory_bytes: 1 << 30,
                ..NodeResources::default()
            },
        };
        apply(&mut txn, node.into_command());
        let a = spec("a", 1500);
        let plan = first_plan(&txn, &a, Options::default())
            .unwrap()
            .expect("room on node 7");
        assert_eq!(plan.placements.len(), 1);
        assert_eq!((plan.placements[0].node, plan.placements[0].generation), (7, 1));
        let batch = Command::Batch(vec![
            AgentCommand::Run {
                spec: a.clone(),
                at_ms: 1,
            }
            .into_command(),
            AgentCommand::Plan { plan, at_ms: 1 }.into_command(),
        ]);
        let Response::Batch(answers) = apply(&mut txn, batch) else {
            panic!("a batch answers a batch");
        };
        assert_eq!(answers[0], Response::Agent(AgentOutcome::Generation(1)));
        // Placed, and nothing left for the leader's scheduler.
        assert_eq!(agents::allocation(&txn, "a").unwrap().unwrap().node, 7);
        assert!(agents::pending_evals(&txn, "", 10).unwrap().is_empty());
        // Unchanged: nothing to place. No room: the leader's scheduler
        // records why.
        assert!(first_plan(&txn, &a, Options::default()).unwrap().is_none());
        assert!(
            first_plan(&txn, &spec("b", 1500), Options::default())
                .unwrap()
                .is_none()
        );
    }
}
