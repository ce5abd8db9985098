//! Task `agents`: runs this node's share of the agents, the bridge between
//! the replicated allocations and the runtime (`cell0-agents`).
//!
//! Each round reads, from the local replica, the allocations placed on this
//! node and the incarnations it must confirm stopped, then:
//! 1. stops every local incarnation that is no longer wanted: superseded,
//!    ended, or all of them while this node holds no lease
//!    ([`crate::leases`]);
//! 2. confirms (`Released`) each ended incarnation that no longer runs
//!    here, so its successor may start elsewhere;
//! 3. starts every allocation of this node that is not running yet, unless
//!    an earlier incarnation of the agent is still stopping somewhere
//!    (`agents::stopping_of`), and reports it running;
//! 4. gives each running `exec` or `inference` agent its oldest queued task
//!    (one at a time per agent, at most `agents.max_parallel_tasks` on the
//!    node) and commits the result with the incarnation, so a result from a
//!    superseded incarnation is refused by the state machine.
//!
//! A round follows every change to the agent or task tables, to the lease,
//! and every end of a task or a process; and at least every second.
//!
//! Invariants: an incarnation starts only while the node holds its lease,
//! from a view read linearizably since that grant of the lease (a node that
//! gets its lease back after a freeze has not yet applied the reassignment
//! of its agents), and while no other incarnation of the agent may still
//! run; a lapse of the lease stops every local incarnation, also one seen
//! only as a new grant (the lease lapsed and came back during a round);
//! every start and stop is journaled (`DATA/agents/journal.jsonl`,
//! monotonic clock) at the moment the runtime starts it and after its
//! processes are gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cell0_agents::journal::Journal;
use cell0_agents::process::{self, End, Restart};
use cell0_agents::{Limits, Sandbox, exec, inference};
use cell0_consensus::agents::{self, AgentCommand, AgentKind, AgentSpec, AllocStatus, RestartPolicy};
use cell0_consensus::tasks::{self, MemoryChange, TaskCommand, TaskOutcome, TaskRecord, TaskResult};
use cell0_consensus::{Consensus, Consistency, NodeId, Response, Table};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::leases::LeaseState;
use crate::models::ModelManager;
use crate::scheduling::now_ms;
use crate::supervisor::{Backoff, stopped};

/// Longest pause between rounds.
const IDLE_ROUND: Duration = Duration::from_secs(1);
/// Tries to commit one task's result before leaving the task queued (it
/// then runs again).
const RESULT_ATTEMPTS: u32 = 8;

/// An allocation of this node, as one round reads it.
#[derive(Debug, Clone)]
struct Wanted {
    incarnation: u64,
    status: AllocStatus,
    spec: AgentSpec,
    /// An earlier incarnation may still run somewhere.
    blocked: bool,
}

/// What one round reads from the replica.
#[derive(Debug, Default, Clone)]
struct View {
    wanted: BTreeMap<String, Wanted>,
    /// Ended incarnations this node must confirm stopped.
    to_release: Vec<(String, u64)>,
}

fn read_view(txn: &dyn cell0_state::Txn, me: NodeId) -> cell0_state::Result<View> {
    let mut view = View::default();
    for name in agents::agents_on(txn, me, usize::MAX)? {
        let (Some(record), Some(alloc)) = (agents::agent(txn, &name)?, agents::allocation(txn, &name)?) else {
            continue;
        };
        if alloc.node != me || !alloc.status.holds_resources() {
            continue;
        }
        let blocked = !agents::stopping_of(txn, &name)?.is_empty();
        view.wanted.insert(
            name,
            Wanted {
                incarnation: alloc.incarnation,
                status: alloc.status,
                spec: record.spec,
                blocked,
            },
        );
    }
    view.to_release = agents::stopping_on(txn, me)?;
    Ok(view)
}

/// Something a spawned piece of work tells the runner.
#[derive(Debug)]
enum Event {
    /// A task's run ended (committed or not).
    TaskDone { agent: String, incarnation: u64, task: u64 },
    /// A process agent ended on its own.
    ProcessEnded { agent: String, incarnation: u64, end: End },
}

/// One incarnation running here.
#[derive(Debug)]
struct Local {
    incarnation: u64,
    spec: AgentSpec,
    /// Its working directory, made when it started.
    workdir: Arc<std::path::Path>,
    /// The process supervisor (process agents).
    process: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The task in flight (exec and inference agents).
    task: Option<(u64, JoinHandle<()>)>,
    /// The last task this incarnation finished, so a replica that has not
    /// applied its result yet does not hand it out again.
    last_done: u64,
    /// Whether its start was reported (or needed no report).
    reported: bool,
}

/// The runner's parts shared with spawned work.
struct Shared {
    consensus: Consensus,
    sandbox: Sandbox,
    journal: Journal,
    models: ModelManager,
    slots: Semaphore,
    events: mpsc::UnboundedSender<Event>,
}

/// Runs this node's agents until `stop` rises, then stops them all.
pub async fn run(
    consensus: Consensus,
    models: ModelManager,
    root: std::path::PathBuf,
    max_parallel_tasks: usize,
    mut lease: watch::Receiver<LeaseState>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let sandbox = Sandbox::new(&root.join("work"))?;
    let journal = Journal::open(&root.join("journal.jsonl"))?;
    let (events, mut inbox) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        consensus: consensus.clone(),
        sandbox,
        journal,
        models,
        slots: Semaphore::new(max_parallel_tasks),
        events,
    });
    let me = consensus.id();
    let mut agents_changed = consensus.watch_table(Table::Agents);
    let mut tasks_changed = consensus.watch_table(Table::Tasks);
    let mut local: BTreeMap<String, Local> = BTreeMap::new();
    let mut backoff = Backoff::default();
    // The last view read, with the node's change count it was read at: most
    // changes in the cluster do not touch this node, and reading the view
    // scans its allocation index.
    let mut cached: Option<(u64, View)> = None;
    // The grant of the lease since which a view was read linearizably. A
    // node that lost its lease (frozen, cut off) may get it back before its
    // replica has applied the reassignments of its agents; the first view
    // after each grant must include them, or it would start superseded
    // incarnations.
    let mut caught_up: Option<u64> = None;
    loop {
        let state = *lease.borrow_and_update();
        let (held, grant) = (state.held, state.grant);
        let next = next_read(state, caught_up, !local.is_empty());
        if next.stop_all {
            // Agents still run from an earlier grant: the lease lapsed and
            // came back while a round ran, unseen. Stop them as the lapse
            // would have; the next view starts what is still placed here.
            tracing::warn!(
                grant,
                "the lease lapsed and came back between rounds: stopping this node's agents"
            );
            round(&shared, &mut local, View::default(), false).await;
        }
        let consistency = next.consistency;
        let known = cached.as_ref().map(|(changes, _)| *changes);
        match consensus
            .read(consistency, move |txn| {
                let changes = agents::node_changes(txn, me)?;
                if known == Some(changes) {
                    return Ok(None);
                }
                Ok(Some((changes, read_view(txn, me)?)))
            })
            .await
        {
            Ok(fresh) => {
                if held {
                    caught_up = Some(grant);
                }
                if fresh.is_some() {
                    cached = fresh;
                }
                let view = cached.as_ref().map(|(_, v)| v.clone()).unwrap_or_default();
                round(&shared, &mut local, view, held).await;
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's allocations");
                if !backoff.wait(&mut stop).await {
                    break;
                }
            }
        }
        metrics::gauge!("cell0_agents_running").set(local.len() as f64);
        tokio::select! {
            Ok(()) = agents_changed.changed() => {}
            Ok(()) = tasks_changed.changed() => {}
            Ok(()) = lease.changed() => {}
            Some(event) = inbox.recv() => handle_event(&shared, &mut local, event).await,
            () = tokio::time::sleep(IDLE_ROUND) => {}
            () = stopped(&mut stop) => break,
        }
    }
    for (name, l) in std::mem::take(&mut local) {
        stop_local(&shared, &name, l).await;
    }
    Ok(())
}

/// How a round reads its view, given the lease.
#[derive(Debug, PartialEq, Eq)]
struct NextRead {
    /// Stop every local incarnation before reading.
    stop_all: bool,
    consistency: Consistency,
}

/// The read a round makes after seeing `lease`, when a view was last read
/// linearizably under grant `caught_up` and agents are `running` here: the
/// first view of each grant is linearizable, and a new grant found with
/// agents still running means a lapse went unseen.
fn next_read(lease: LeaseState, caught_up: Option<u64>, running: bool) -> NextRead {
    let fresh_grant = lease.held && caught_up != Some(lease.grant);
    NextRead {
        stop_all: fresh_grant && running,
        consistency: if fresh_grant {
            Consistency::Linearizable
        } else {
            Consistency::Serializable
        },
    }
}

async fn handle_event(shared: &Shared, local: &mut BTreeMap<String, Local>, event: Event) {
    match event {
        Event::TaskDone {
            agent,
            incarnation,
            task,
        } => {
            if let Some(l) = local.get_mut(&agent)
                && l.incarnation == incarnation
                && l.task.as_ref().is_some_and(|(t, _)| *t == task)
            {
                l.task = None;
                l.last_done = task;
            }
        }
        Event::ProcessEnded {
            agent,
            incarnation,
            end,
        } => {
            if local.get(&agent).is_some_and(|l| l.incarnation == incarnation) {
                local.remove(&agent);
                shared.journal.record(&agent, incarnation, "stopped");
                let (status, reason) = match end {
                    End::Failed(reason) => (AllocStatus::Failed, reason),
                    End::Completed | End::Stopped => (AllocStatus::Stopped, "exited".to_string()),
                };
                let _ = report(shared, &agent, incarnation, status, reason).await;
            }
        }
    }
}

async fn round(shared: &Arc<Shared>, local: &mut BTreeMap<String, Local>, view: View, held: bool) {
    // 1. Stop what is no longer wanted here.
    let unwanted: Vec<String> = local
        .iter()
        .filter(|(name, l)| !held || view.wanted.get(*name).is_none_or(|w| w.incarnation != l.incarnation))
        .map(|(name, _)| name.clone())
        .collect();
    for name in unwanted {
        if let Some(l) = local.remove(&name) {
            stop_local(shared, &name, l).await;
        }
    }
    // 2. Confirm the ended incarnations that no longer run here.
    for (name, incarnation) in &view.to_release {
        if local.get(name).is_some_and(|l| l.incarnation == *incarnation) {
            continue;
        }
        let command = AgentCommand::Released {
            agent: name.clone(),
            incarnation: *incarnation,
            node: shared.consensus.id(),
        };
        if let Err(e) = shared.consensus.propose(command.into_command()).await {
            tracing::warn!(agent = %name, incarnation, error = %e, "cannot confirm a stop; will retry");
        }
        shared
            .sandbox
            .remove_workdirs(name, view.wanted.get(name).map(|w| w.incarnation));
    }
    if !held {
        return;
    }
    // 3. Start what is placed here.
    for (name, w) in &view.wanted {
        if let Some(l) = local.get_mut(name) {
            // Started, but its report failed: say it again.
            if !l.reported && l.incarnation == w.incarnation && w.status == AllocStatus::Pending {
                l.reported = report(shared, name, w.incarnation, AllocStatus::Running, String::new()).await;
            }
            continue;
        }
        if w.blocked {
            continue;
        }
        match start(shared, name, w) {
            Ok(mut l) => {
                if w.status == AllocStatus::Pending {
                    l.reported = report(shared, name, w.incarnation, AllocStatus::Running, String::new()).await;
                }
                local.insert(name.clone(), l);
            }
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "cannot start an agent");
                let _ = report(shared, name, w.incarnation, AllocStatus::Failed, e).await;
            }
        }
    }
    // 4. Hand out tasks.
    for (name, l) in local.iter_mut() {
        if l.task.is_some() || matches!(l.spec.kind, AgentKind::Process { .. }) {
            continue;
        }
        let (agent, after) = (name.clone(), l.last_done);
        let next = shared
            .consensus
            .read(Consistency::Serializable, move |txn| {
                tasks::inbox(txn, &agent, after, 1)
            })
            .await;
        let Ok(Some(task)) = next.map(|mut t| t.pop()) else {
            continue;
        };
        let id = task.id;
        let handle = tokio::spawn(run_task(
            shared.clone(),
            l.incarnation,
            l.spec.clone(),
            l.workdir.clone(),
            task,
        ));
        l.task = Some((id, handle));
    }
}

fn start(shared: &Arc<Shared>, name: &str, w: &Wanted) -> Result<Local, String> {
    let workdir = shared
        .sandbox
        .workdir(name, w.incarnation)
        .map_err(|e| format!("cannot create the working directory: {e}"))?;
    shared.journal.record(name, w.incarnation, "started");
    tracing::info!(
        agent = name,
        incarnation = w.incarnation,
        kind = w.spec.kind.name(),
        "agent started"
    );
    let mut l = Local {
        incarnation: w.incarnation,
        spec: w.spec.clone(),
        workdir: Arc::from(workdir.as_path()),
        process: None,
        task: None,
        last_done: 0,
        reported: true,
    };
    if let AgentKind::Process { command, grace_ms } = &w.spec.kind {
        let (tx, rx) = watch::channel(false);
        let (shared2, name2, command, grace) = (
            shared.clone(),
            name.to_string(),
            command.clone(),
            Duration::from_millis(*grace_ms),
        );
        let incarnation = w.incarnation;
        let restart = match w.spec.restart {
            RestartPolicy::Never => Restart::Never,
            RestartPolicy::OnFailure { max_restarts } => Restart::OnFailure(max_restarts),
            RestartPolicy::Always => Restart::Always,
        };
        let limits = Limits {
            memory_mb: w.spec.resources.memory_mb,
            cpu_seconds: 0,
        };
        let handle = tokio::spawn(async move {
            let spec = process::Spec {
                command: &command,
                restart,
                grace,
                limits,
            };
            let end = process::supervise(&shared2.sandbox, &workdir, &name2, incarnation, spec, || {}, rx).await;
            if end != End::Stopped {
                let _ = shared2.events.send(Event::ProcessEnded {
                    agent: name2,
                    incarnation,
                    end,
                });
            }
        });
        l.process = Some((tx, handle));
    }
    Ok(l)
}

/// Stops a local incarnation and waits until nothing of it runs.
async fn stop_local(shared: &Shared, name: &str, l: Local) {
    if let Some((_, handle)) = l.task {
        // Dropping the task's future kills its process group.
        handle.abort();
        let _ = handle.await;
    }
    if let Some((tx, handle)) = l.process {
        let _ = tx.send(true);
        let _ = handle.await;
    }
    shared.journal.record(name, l.incarnation, "stopped");
    tracing::info!(agent = name, incarnation = l.incarnation, "agent stopped");
}

/// Reports an allocation's status; whether the report was committed.
async fn report(shared: &Shared, agent: &str, incarnation: u64, status: AllocStatus, reason: String) -> bool {
    let command = AgentCommand::Report {
        agent: agent.to_string(),
        incarnation,
        status,
        reason,
        at_ms: now_ms(),
    };
    match shared.consensus.propose(command.into_command()).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(agent, incarnation, error = %e, "cannot report an agent's status");
            false
        }
    }
}

/// Runs one task and commits its result; tells the runner when done.
async fn run_task(
    shared: Arc<Shared>,
    incarnation: u64,
    spec: AgentSpec,
    workdir: Arc<std::path::Path>,
    task: TaskRecord,
) {
    let Ok(_slot) = shared.slots.acquire().await else {
        return;
    };
    let started = Instant::now();
    let (result, memory) = execute(&shared, incarnation, &spec, &workdir, &task).await;
    let outcome = match &result {
        TaskResult::Succeeded { .. } => "succeeded",
        TaskResult::Failed { .. } => "failed",
    };
    metrics::histogram!("cell0_agent_task_duration_seconds").record(started.elapsed().as_secs_f64());
    let command = TaskCommand::Complete {
        agent: spec.name.clone(),
        task: task.id,
        incarnation,
        result,
        memory,
        at_ms: now_ms(),
    };
    let mut backoff = Backoff::default();
    for attempt in 1..=RESULT_ATTEMPTS {
        match shared.consensus.propose(command.clone().into_command()).await {
            Ok(Response::Task(TaskOutcome::Completed)) => {
                metrics::counter!("cell0_agent_tasks_total", "result" => outcome).increment(1);
                break;
            }
            Ok(Response::Task(TaskOutcome::Refused(reason))) => {
                metrics::counter!("cell0_agent_task_results_rejected_total").increment(1);
                tracing::info!(agent = %spec.name, task = task.id, incarnation, %reason, "task result refused");
                break;
            }
            Ok(other) => {
                tracing::warn!(?other, "unexpected answer to a task result");
                break;
            }
            Err(e) => {
                tracing::warn!(agent = %spec.name, task = task.id, attempt, error = %e, "cannot commit a task result");
                // Not a loop of the node: an incarnation's stop aborts it.
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
    let _ = shared.events.send(Event::TaskDone {
        agent: spec.name,
        incarnation,
        task: task.id,
    });
}

/// Runs `task` with its agent's driver: the result and memory changes.
async fn execute(
    shared: &Shared,
    incarnation: u64,
    spec: &AgentSpec,
    workdir: &std::path::Path,
    task: &TaskRecord,
) -> (TaskResult, Vec<MemoryChange>) {
    let failed = |error: String| (TaskResult::Failed { error }, Vec::new());
    match &spec.kind {
        AgentKind::Exec {
            command,
            timeout_ms,
            max_output_bytes,
        } => {
            let run = exec::Task {
                command,
                input: &task.input,
                timeout: Duration::from_millis(*timeout_ms),
                max_output_bytes: *max_output_bytes,
                limits: Limits {
                    memory_mb: spec.resources.memory_mb,
                    cpu_seconds: timeout_ms.div_ceil(1000),
                },
            };
            match exec::run(&shared.sandbox, workdir, &spec.name, incarnation, run).await {
                Ok(output) => (TaskResult::Succeeded { output }, Vec::new()),
                Err(error) => failed(error),
            }
        }
        AgentKind::Inference => {
            let model = spec.constraints.model.clone();
            let agent = spec.name.clone();
            let consensus = shared.consensus.clone();
            let read_memory = async || memory_entries(&consensus, &agent).await;
            let embed = async |text: String| {
                shared
                    .models
                    .embed(&model, 0, &[text])
                    .await
                    .map_err(|e| e.to_string())?
                    .vectors
                    .pop()
                    .ok_or_else(|| "the engine returned no vector".to_string())
            };
            match inference::answer(&task.input, read_memory, embed).await {
                Ok(answer) => {
                    let memory = answer
                        .changes
                        .into_iter()
                        .map(|c| match c {
                            inference::Change::Put { key, text, embedding } => MemoryChange::Put {
                                key,
                                value: text,
                                embedding: tasks::encode_embedding(&embedding),
                            },
                            inference::Change::Delete { key } => MemoryChange::Delete { key },
                        })
                        .collect();
                    (TaskResult::Succeeded { output: answer.output }, memory)
                }
                Err(error) => failed(error),
            }
        }
        AgentKind::Process { .. } => failed("process agents take no tasks".into()),
    }
}

/// The agent's memory as recall reads it, from the local replica.
async fn memory_entries(consensus: &Consensus, agent: &str) -> Result<Vec<inference::Entry>, String> {
    let agent = agent.to_string();
    let limit = usize::try_from(tasks::MAX_MEMORY_ENTRIES).unwrap_or(usize::MAX);
    let rows = consensus
        .read(Consistency::Serializable, move |txn| {
            tasks::memory_list(txn, &agent, "", limit)
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .map(|(key, e)| inference::Entry {
            embedding: e.embedding(),
            key,
            text: e.value,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(held: bool, grant: u64) -> LeaseState {
        LeaseState { held, grant }
    }

    #[test]
    fn the_first_view_of_every_grant_is_linearizable() {
        // First grant, nothing read yet.
        let first = next_read(lease(true, 1), None, false);
        assert_eq!(first.consistency, Consistency::Linearizable);
        assert!(!first.stop_all);
        // Caught up under that grant: steady rounds read serializably.
        assert_eq!(
            next_read(lease(true, 1), Some(1), true).consistency,
            Consistency::Serializable
        );
        // Without a lease nothing starts, so no linearizable read is needed.
        assert_eq!(
            next_read(lease(false, 1), Some(1), false).consistency,
            Consistency::Serializable
        );
        // The lease came back after a lapse the runner saw (it stopped all).
        let back = next_read(lease(true, 2), Some(1), false);
        assert_eq!(back.consistency, Consistency::Linearizable);
        assert!(!back.stop_all);
    }

    #[test]
    fn a_lapse_seen_only_as_a_new_grant_stops_the_agents_first() {
        // `held` was true at both rounds, but the grant moved on: the lease
        // lapsed in between, and the agents of the old grant still run.
        let next = next_read(lease(true, 3), Some(2), true);
        assert!(next.stop_all);
        assert_eq!(next.consistency, Consistency::Linearizable);
    }
}
