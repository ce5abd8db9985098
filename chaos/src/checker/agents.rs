//! The agent workload's checker: what the recorded history of
//! [`crate::agents`] and the cluster's final state (read linearizably after
//! the nemesis healed) prove about agents, tasks and memory.
//!
//! The API shows, at the end, every agent (desired status, generation, its
//! one allocation: node, incarnation, status), every task (id, input,
//! idempotency key, status, output or error, **the incarnation whose result
//! counted**) and every memory entry (key, text, **the incarnation that
//! wrote it**); during the run, linearizable reads of agents (`Get`) and
//! the results `Wait` returned. The exec agents answer with their own
//! `$CELL0_AGENT $CELL0_INCARNATION INPUT`, so a result names the
//! incarnation that produced it. From these, each check below is **Invalid**
//! (a proof, given the history's promises: `ok` took effect, `fail`
//! certainly did not, `unknown` may have at any time after its call; times
//! from one monotonic clock; the final read came after every operation):
//!
//! - **lost agent**: an agent whose `Run` was acknowledged is absent at the
//!   end (nothing deletes agents), or its desired status is not one an
//!   acknowledged or unknown `Run`/`Stop` explains: the effect of an `ok`
//!   one that no other `ok` one followed, or of any `unknown` one (so a
//!   running agent stopped unasked, or a stopped one running, is caught).
//! - **phantom agent**: a present agent of the workload (its names start
//!   with [`crate::agents::AGENT_PREFIX`] or are [`crate::agents::MEMO_AGENT`])
//!   that no `ok` or `unknown` `Run` named.
//! - **incarnation went back**: a `Get` that began after another `Get` of
//!   the same agent ended saw a lower incarnation, or the final incarnation
//!   is lower than one seen during the run (incarnations are fencing
//!   tokens: they only grow).
//! - **lost task**: an acknowledged `Submit`'s task is not in its agent's
//!   list at the end, or is there with another idempotency key or input.
//! - **duplicate task**: two tasks of an agent with one idempotency key, or
//!   two acknowledged submits of one key that returned different ids.
//! - **phantom task**: a task whose key no `ok` or `unknown` submit used
//!   (every submit of it failed, or none was made).
//! - **wrong result**: a completed task with incarnation 0 or above its
//!   agent's final incarnation; a failed one without a reason; a succeeded
//!   exec task whose output is not `AGENT INCARNATION INPUT` of that very
//!   task and incarnation (a result of another task, or of an incarnation
//!   other than the one the record credits).
//! - **result changed**: a result `Wait` saw (succeeded or failed, with its
//!   output, error and incarnation) differs from the task's final record:
//!   a result is committed exactly once and never replaced.
//! - **stale incarnation's result**: by the API's contract the agent's
//!   current incarnation runs its tasks one at a time in submission order
//!   (task ids grow with submission) and results are accepted only from the
//!   current incarnation, so along an agent's tasks in id order the
//!   incarnations of their results never go down; one that does was
//!   committed by an incarnation already superseded.
//! - **memory**: an exec agent has memory (its tasks write none); an entry
//!   of the inference agent has no succeeded `remember` task of that key,
//!   has another text, or was written by another incarnation than the one
//!   whose result counted (memory changes are fenced and committed with
//!   the result, so a write from a refused old incarnation shows up as
//!   exactly that); a succeeded `remember` whose key is absent.
//!
//! Not proofs, so **Unknown** when nothing is Invalid: the final read found
//! the cluster not settled — an agent meant to run not running, or a task
//! of such an agent still queued after the settle deadline (liveness). A
//! task still queued whose agent is stopped is fine (a stopped agent runs
//! nothing; its tasks wait for it), as is a task that failed with a reason.
//!
//! Not observable through the API, so not checked: two incarnations
//! *running* at once (only their accepted effects are visible; the node
//! tests check the runtimes' journals), and results refused by fencing
//! (they leave no trace but the refusal).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{Verdict, capped_list};
use crate::agents::{AGENT_PREFIX, AgentOp, AgentOpKind, FinalState, MEMO_AGENT, TaskView, echo_output};
use crate::history::Status;

/// Counts of what the history and the final state hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AgentCounts {
    /// Agents at the end.
    pub agents: usize,
    /// Of those, meant to run.
    pub running: usize,
    /// Runs, stops, migrations, drains and ends of drains acknowledged.
    pub lifecycle_ok: usize,
    /// Migrations acknowledged.
    pub migrations: usize,
    /// Drains acknowledged.
    pub drains: usize,
    /// Stops acknowledged.
    pub stops: usize,
    /// Incarnations issued, summed over the agents (the final incarnations).
    pub incarnations: u64,
    /// Idempotency keys submitted.
    pub keys: usize,
    /// Keys acknowledged.
    pub acknowledged: usize,
    /// Keys whose submit's outcome is unknown.
    pub unknown_keys: usize,
    /// Tasks at the end.
    pub tasks: usize,
    /// Succeeded.
    pub succeeded: usize,
    /// Failed with a reason.
    pub failed: usize,
    /// Queued, their agent stopped.
    pub queued_stopped: usize,
    /// Results seen by `Wait` during the run.
    pub results_seen: usize,
    /// Linearizable reads of agents during the run.
    pub gets: usize,
    /// Memory entries at the end.
    pub memory: usize,
}

/// The verdict on an agent workload's history and final state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentReport {
    /// `Invalid` iff a list below other than `stuck` is not empty; else
    /// `Unknown` iff `stuck` is not; else `Ok`.
    pub verdict: Verdict,
    /// Acknowledged agents absent, or in a desired status nothing explains.
    pub lost_agents: Vec<String>,
    /// Agents nobody ran.
    pub phantom_agents: Vec<String>,
    /// Incarnations seen going down.
    pub incarnation_regressions: Vec<String>,
    /// Acknowledged tasks missing or changed.
    pub lost_tasks: Vec<String>,
    /// Keys with two tasks, or two ids.
    pub duplicate_tasks: Vec<String>,
    /// Tasks nobody submitted (or whose submits all failed).
    pub phantom_tasks: Vec<String>,
    /// Results that are not the task's or not the credited incarnation's.
    pub wrong_results: Vec<String>,
    /// Results seen during the run that the final state replaced.
    pub changed_results: Vec<String>,
    /// Results committed by a superseded incarnation.
    pub stale_results: Vec<String>,
    /// Memory entries nothing accepted wrote, or accepted writes missing.
    pub memory: Vec<String>,
    /// Liveness: agents not running or tasks queued after the deadline.
    pub stuck: Vec<String>,
    /// What the history and the final state hold.
    pub counts: AgentCounts,
}

impl AgentReport {
    fn violations(&self) -> [(&'static str, &Vec<String>); 10] {
        [
            ("lost agents", &self.lost_agents),
            ("phantom agents", &self.phantom_agents),
            ("incarnations went back", &self.incarnation_regressions),
            ("lost tasks", &self.lost_tasks),
            ("duplicate tasks", &self.duplicate_tasks),
            ("phantom tasks", &self.phantom_tasks),
            ("wrong results", &self.wrong_results),
            ("results changed", &self.changed_results),
            ("results of superseded incarnations", &self.stale_results),
            ("memory", &self.memory),
        ]
    }
}

impl fmt::Display for AgentReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "agents: {}: {} agents ({} running, {} incarnations; {} migrations, {} drains, {} stops acknowledged), \
             {} task keys ({} acknowledged, {} unknown): {} tasks, {} succeeded, {} failed, {} queued on stopped \
             agents; {} results and {} agents read during the run; {} memory entries",
            self.verdict,
            c.agents,
            c.running,
            c.incarnations,
            c.migrations,
            c.drains,
            c.stops,
            c.keys,
            c.acknowledged,
            c.unknown_keys,
            c.tasks,
            c.succeeded,
            c.failed,
            c.queued_stopped,
            c.results_seen,
            c.gets,
            c.memory
        )?;
        for (what, items) in self.violations() {
            if !items.is_empty() {
                writeln!(f, "  {what}: {}", capped_list(items))?;
            }
        }
        if !self.stuck.is_empty() {
            writeln!(f, "  not settled (liveness): {}", capped_list(&self.stuck))?;
        }
        Ok(())
    }
}

/// The desired status of an agent, as the final state shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Desired {
    Absent,
    Running,
    Stopped,
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Desired::Absent => "absent",
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        })
    }
}

fn is_workload_agent(name: &str) -> bool {
    name.starts_with(AGENT_PREFIX) || name == MEMO_AGENT
}

/// The key and text of a `remember` task's input.
fn remembered(input: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(input).ok()?;
    if v["op"] != "remember" {
        return None;
    }
    Some((v["key"].as_str()?.to_string(), v["text"].as_str()?.to_string()))
}

/// Checks the agent workload's history `ops` against the final state.
pub fn check(ops: &[AgentOp], end: &FinalState) -> AgentReport {
    let mut r = AgentReport {
        verdict: Verdict::Ok,
        lost_agents: Vec::new(),
        phantom_agents: Vec::new(),
        incarnation_regressions: Vec::new(),
        lost_tasks: Vec::new(),
        duplicate_tasks: Vec::new(),
        phantom_tasks: Vec::new(),
        wrong_results: Vec::new(),
        changed_results: Vec::new(),
        stale_results: Vec::new(),
        memory: Vec::new(),
        stuck: Vec::new(),
        counts: AgentCounts::default(),
    };
    let agents: BTreeMap<&str, &crate::agents::AgentView> = end.agents.iter().map(|a| (a.name.as_str(), a)).collect();
    count_ops(ops, end, &mut r);
    check_agents(ops, &agents, &mut r);
    check_incarnations(ops, &agents, &mut r);
    check_tasks(ops, end, &agents, &mut r);
    check_memory(end, &agents, &mut r);
    check_settled(end, &agents, &mut r);
    r.verdict = if r.violations().iter().any(|(_, v)| !v.is_empty()) {
        Verdict::Invalid
    } else if !r.stuck.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Ok
    };
    r
}

fn count_ops(ops: &[AgentOp], end: &FinalState, r: &mut AgentReport) {
    let c = &mut r.counts;
    c.agents = end.agents.len();
    c.running = end.agents.iter().filter(|a| a.desired == "running").count();
    c.incarnations = end.agents.iter().filter_map(|a| a.incarnation).sum();
    c.tasks = end.tasks.len();
    c.succeeded = end.tasks.iter().filter(|t| t.status == "succeeded").count();
    c.failed = end.tasks.iter().filter(|t| t.status == "failed").count();
    c.memory = end.memory.len();
    for op in ops {
        let ok = op.status == Status::Ok;
        match op.kind {
            AgentOpKind::Run | AgentOpKind::Undrain if ok => c.lifecycle_ok += 1,
            AgentOpKind::Stop if ok => {
                c.lifecycle_ok += 1;
                c.stops += 1;
            }
            AgentOpKind::Migrate if ok => {
                c.lifecycle_ok += 1;
                c.migrations += 1;
            }
            AgentOpKind::Drain if ok => {
                c.lifecycle_ok += 1;
                c.drains += 1;
            }
            AgentOpKind::Get if ok => c.gets += 1,
            AgentOpKind::Wait if ok && op.result.as_ref().is_some_and(|t| t.status != "queued") => {
                c.results_seen += 1;
            }
            _ => {}
        }
    }
}

/// Lost and phantom agents, and desired statuses nothing explains.
fn check_agents(ops: &[AgentOp], agents: &BTreeMap<&str, &crate::agents::AgentView>, r: &mut AgentReport) {
    let mut lifecycle: BTreeMap<&str, Vec<&AgentOp>> = BTreeMap::new();
    for op in ops {
        if matches!(op.kind, AgentOpKind::Run | AgentOpKind::Stop) {
            lifecycle.entry(op.target.as_str()).or_default().push(op);
        }
    }
    for (&name, ops) in &lifecycle {
        let effect = |op: &AgentOp| match op.kind {
            AgentOpKind::Stop => Desired::Stopped,
            _ => Desired::Running,
        };
        let oks: Vec<&AgentOp> = ops.iter().copied().filter(|op| op.status == Status::Ok).collect();
        let mut allowed = BTreeSet::new();
        // An `ok` one that no other `ok` one certainly followed may be last.
        for op in &oks {
            if !oks.iter().any(|later| later.invoke_us > op.complete_us) {
                allowed.insert(effect(op));
            }
        }
        for op in ops.iter().filter(|op| op.status == Status::Unknown) {
            allowed.insert(effect(op));
        }
        let run_ok = oks.iter().any(|op| op.kind == AgentOpKind::Run);
        if !run_ok {
            allowed.insert(Desired::Absent);
        }
        let found = match agents.get(name).map(|a| a.desired.as_str()) {
            None => Desired::Absent,
            Some("running") => Desired::Running,
            Some("stopped") => Desired::Stopped,
            Some(other) => {
                r.lost_agents.push(format!("{name}: desired status {other:?}"));
                continue;
            }
        };
        if allowed.contains(&found) {
            continue;
        }
        let allowed: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        let last = oks.last().map_or_else(String::new, |op| {
            format!(
                "; last acknowledged {:?} at {}..{}us",
                op.kind, op.invoke_us, op.complete_us
            )
        });
        let what = if found == Desired::Absent {
            "lost"
        } else {
            "in the wrong state"
        };
        r.lost_agents.push(format!(
            "{name} {what}: {found} at the end, only {} explained{last}",
            allowed.join(" or ")
        ));
    }
    for (&name, _) in agents.iter() {
        if !is_workload_agent(name) {
            continue;
        }
        let ran = lifecycle.get(name).is_some_and(|ops| {
            ops.iter()
                .any(|op| op.kind == AgentOpKind::Run && op.status != Status::Fail)
        });
        if !ran {
            r.phantom_agents
                .push(format!("{name}: present, no Run of it took effect"));
        }
    }
}

/// Incarnations never go down between linearizable reads, nor before the
/// final read.
fn check_incarnations(ops: &[AgentOp], agents: &BTreeMap<&str, &crate::agents::AgentView>, r: &mut AgentReport) {
    let mut seen: BTreeMap<&str, Vec<(u64, u64, u64)>> = BTreeMap::new();
    for op in ops {
        if op.kind == AgentOpKind::Get
            && op.status == Status::Ok
            && let Some(inc) = op.agent.as_ref().and_then(|a| a.incarnation)
        {
            seen.entry(op.target.as_str())
                .or_default()
                .push((op.invoke_us, op.complete_us, inc));
        }
    }
    for (name, mut reads) in seen {
        // Sweep: reads by invocation; every read that ended before one
        // began bounds it from below.
        let mut by_end = reads.clone();
        by_end.sort_by_key(|&(_, end, _)| end);
        reads.sort_by_key(|&(start, _, _)| start);
        let mut ended = 0;
        let mut highest: Option<(u64, u64, u64)> = None;
        for &(start, end, inc) in &reads {
            while ended < by_end.len() && by_end[ended].1 < start {
                if highest.is_none_or(|h| by_end[ended].2 > h.2) {
                    highest = Some(by_end[ended]);
                }
                ended += 1;
            }
            if let Some((hs, he, hi)) = highest
                && inc < hi
            {
                r.incarnation_regressions.push(format!(
                    "{name}: incarnation {inc} read at {start}..{end}us after {hi} was read at {hs}..{he}us"
                ));
            }
        }
        let max = reads.iter().map(|&(_, _, inc)| inc).max().unwrap_or(0);
        let last = agents.get(name).and_then(|a| a.incarnation).unwrap_or(0);
        if last < max {
            r.incarnation_regressions.push(format!(
                "{name}: incarnation {last} at the end, {max} was read during the run"
            ));
        }
    }
}

/// Lost, duplicate and phantom tasks; results that are wrong, changed or
/// from a superseded incarnation.
fn check_tasks(
    ops: &[AgentOp],
    end: &FinalState,
    agents: &BTreeMap<&str, &crate::agents::AgentView>,
    r: &mut AgentReport,
) {
    // Per (agent, key): the submits' best status, the ids acknowledged and
    // the input.
    struct Key<'a> {
        fate: u8,
        ids: BTreeSet<u64>,
        input: &'a str,
    }
    let rank = |s: Status| match s {
        Status::Fail => 0,
        Status::Unknown => 1,
        Status::Ok => 2,
    };
    let mut keys: BTreeMap<(&str, &str), Key> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.kind == AgentOpKind::Submit) {
        let Some(key) = op.key.as_deref() else { continue };
        let k = keys.entry((op.target.as_str(), key)).or_insert(Key {
            fate: 0,
            ids: BTreeSet::new(),
            input: op.input.as_deref().unwrap_or(""),
        });
        k.fate = k.fate.max(rank(op.status));
        if op.status == Status::Ok
            && let Some(id) = op.task
        {
            k.ids.insert(id);
        }
    }
    r.counts.keys = keys.len();
    r.counts.acknowledged = keys.values().filter(|k| k.fate == 2).count();
    r.counts.unknown_keys = keys.values().filter(|k| k.fate == 1).count();

    let by_id: BTreeMap<u64, &TaskView> = end.tasks.iter().map(|t| (t.id, t)).collect();
    let mut by_key: BTreeMap<(&str, &str), Vec<&TaskView>> = BTreeMap::new();
    for t in &end.tasks {
        by_key.entry((t.agent.as_str(), t.key.as_str())).or_default().push(t);
    }
    for ((agent, key), tasks) in &by_key {
        if tasks.len() > 1 {
            let ids: Vec<String> = tasks.iter().map(|t| t.id.to_string()).collect();
            r.duplicate_tasks
                .push(format!("{agent} key {key:?}: tasks {}", ids.join(", ")));
        }
        match keys.get(&(*agent, *key)) {
            Some(k) if k.fate > 0 => {}
            Some(_) => r.phantom_tasks.push(format!(
                "{agent} task {} (key {key:?}): present, every submit of the key failed",
                tasks[0].id
            )),
            None => r.phantom_tasks.push(format!(
                "{agent} task {} (key {key:?}): present, never submitted",
                tasks[0].id
            )),
        }
    }
    for ((agent, key), k) in &keys {
        if k.ids.len() > 1 {
            let ids: Vec<String> = k.ids.iter().map(ToString::to_string).collect();
            r.duplicate_tasks
                .push(format!("{agent} key {key:?}: acknowledged as tasks {}", ids.join(", ")));
        }
        for id in &k.ids {
            match by_id.get(id) {
                None => r
                    .lost_tasks
                    .push(format!("{agent} task {id} (key {key:?}): acknowledged, absent")),
                Some(t) if t.agent != *agent || t.key != *key || t.input != k.input => r.lost_tasks.push(format!(
                    "{agent} task {id} (key {key:?}, input {:?}): acknowledged, but the task is {} {:?} {:?}",
                    k.input, t.agent, t.key, t.input
                )),
                Some(_) => {}
            }
        }
    }

    // Every completed task's result.
    for t in &end.tasks {
        if t.status == "queued" {
            if agents.get(t.agent.as_str()).is_some_and(|a| a.desired == "stopped") {
                r.counts.queued_stopped += 1;
            }
            continue;
        }
        let last = agents.get(t.agent.as_str()).and_then(|a| a.incarnation).unwrap_or(0);
        if t.incarnation == 0 || t.incarnation > last {
            r.wrong_results.push(format!(
                "{} task {}: {} by incarnation {}, the agent's latest is {last}",
                t.agent, t.id, t.status, t.incarnation
            ));
        }
        match t.status.as_str() {
            "failed" if t.error.is_empty() => r
                .wrong_results
                .push(format!("{} task {}: failed without a reason", t.agent, t.id)),
            "succeeded" if agents.get(t.agent.as_str()).is_some_and(|a| a.kind == "exec") => {
                let expected = echo_output(&t.agent, t.incarnation, &t.input);
                if t.output != expected {
                    r.wrong_results.push(format!(
                        "{} task {}: output {:?}, expected {expected:?} (incarnation {})",
                        t.agent, t.id, t.output, t.incarnation
                    ));
                }
            }
            "failed" | "succeeded" => {}
            other => r
                .wrong_results
                .push(format!("{} task {}: status {other:?}", t.agent, t.id)),
        }
    }

    // A result seen during the run is the final one.
    for op in ops {
        let (AgentOpKind::Wait, Status::Ok, Some(seen)) = (op.kind, op.status, op.result.as_ref()) else {
            continue;
        };
        if seen.status == "queued" {
            continue;
        }
        match by_id.get(&seen.id) {
            None => r.lost_tasks.push(format!(
                "{} task {}: its result was seen at {}us, the task is absent",
                seen.agent, seen.id, op.complete_us
            )),
            Some(t)
                if (&t.status, &t.output, &t.error, t.incarnation)
                    != (&seen.status, &seen.output, &seen.error, seen.incarnation) =>
            {
                r.changed_results.push(format!(
                    "{} task {}: {} by incarnation {} ({:?}) seen at {}us, {} by incarnation {} ({:?}) at the end",
                    seen.agent,
                    seen.id,
                    seen.status,
                    seen.incarnation,
                    if seen.error.is_empty() {
                        &seen.output
                    } else {
                        &seen.error
                    },
                    op.complete_us,
                    t.status,
                    t.incarnation,
                    if t.error.is_empty() { &t.output } else { &t.error },
                ))
            }
            Some(_) => {}
        }
    }

    // Along each agent's tasks, the incarnations of results never go down.
    let mut per_agent: BTreeMap<&str, Vec<&TaskView>> = BTreeMap::new();
    for t in end.tasks.iter().filter(|t| t.status != "queued") {
        per_agent.entry(t.agent.as_str()).or_default().push(t);
    }
    for (agent, mut tasks) in per_agent {
        tasks.sort_by_key(|t| t.id);
        let mut highest: Option<&TaskView> = None;
        for t in tasks {
            if let Some(h) = highest
                && t.incarnation < h.incarnation
            {
                r.stale_results.push(format!(
                    "{agent} task {}: result of incarnation {} counted, after task {} had one of incarnation {}",
                    t.id, t.incarnation, h.id, h.incarnation
                ));
            }
            if highest.is_none_or(|h| t.incarnation > h.incarnation) {
                highest = Some(t);
            }
        }
    }
}

/// Memory entries against the tasks whose results wrote them.
fn check_memory(end: &FinalState, agents: &BTreeMap<&str, &crate::agents::AgentView>, r: &mut AgentReport) {
    // (agent, memory key) -> the succeeded remember task and its text.
    let mut writes: BTreeMap<(&str, String), (&TaskView, String)> = BTreeMap::new();
    for t in end.tasks.iter().filter(|t| t.status == "succeeded") {
        if let Some((key, text)) = remembered(&t.input) {
            writes.insert((t.agent.as_str(), key), (t, text));
        }
    }
    let mut present = BTreeSet::new();
    for e in &end.memory {
        present.insert((e.agent.as_str(), e.key.clone()));
        if agents.get(e.agent.as_str()).is_some_and(|a| a.kind == "exec") {
            r.memory.push(format!(
                "{} key {:?}: written by incarnation {}, but exec agents write no memory",
                e.agent, e.key, e.incarnation
            ));
            continue;
        }
        match writes.get(&(e.agent.as_str(), e.key.clone())) {
            None => r.memory.push(format!(
                "{} key {:?}: written by incarnation {}, no succeeded task remembers it",
                e.agent, e.key, e.incarnation
            )),
            Some((t, text)) if e.incarnation != t.incarnation || e.value != *text => r.memory.push(format!(
                "{} key {:?}: {:?} written by incarnation {}, but task {} counted incarnation {} with {text:?}",
                e.agent, e.key, e.value, e.incarnation, t.id, t.incarnation
            )),
            Some(_) => {}
        }
    }
    for ((agent, key), (t, _)) in &writes {
        if !present.contains(&(*agent, key.clone())) {
            r.memory.push(format!(
                "{agent} key {key:?}: task {} succeeded by incarnation {}, the entry is absent",
                t.id, t.incarnation
            ));
        }
    }
}

/// Liveness after healing: agents meant to run are running, their tasks
/// done.
fn check_settled(end: &FinalState, agents: &BTreeMap<&str, &crate::agents::AgentView>, r: &mut AgentReport) {
    if end.settled {
        return;
    }
    for a in end.agents.iter().filter(|a| a.desired == "running") {
        if a.status.as_deref() != Some("running") {
            r.stuck.push(format!(
                "{} not running after {} ms ({}{})",
                a.name,
                end.settle_ms,
                a.status.as_deref().unwrap_or("not placed"),
                if a.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", a.reason)
                }
            ));
        }
    }
    for t in end.tasks.iter().filter(|t| t.status == "queued") {
        if agents.get(t.agent.as_str()).is_some_and(|a| a.desired == "running") {
            r.stuck
                .push(format!("{} task {} queued after {} ms", t.agent, t.id, end.settle_ms));
        }
    }
    if r.stuck.is_empty() {
        r.stuck.push(format!("not settled after {} ms", end.settle_ms));
    }
}
