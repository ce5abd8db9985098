//! The agent checker against hand-made histories and final states: a
//! correct one (with unknown and failed operations, a stopped agent's
//! queued task, a move between incarnations, an inference agent's memory)
//! must be `ok`, and each invariant has a known-bad variant it must reject
//! as `invalid` (a liveness failure is `unknown`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cell0_chaos::agents::{AgentOp, AgentOpKind, AgentView, FinalState, MEMO_AGENT, MemoryView, TaskView, echo_output};
use cell0_chaos::checker::Verdict;
use cell0_chaos::checker::agents::{AgentReport, check};
use cell0_chaos::history::Status;

const A0: &str = "chaos-agent-0";
const A1: &str = "chaos-agent-1";
const A2: &str = "chaos-agent-2";

fn op(client: u32, kind: AgentOpKind, target: &str, at: u64, status: Status) -> AgentOp {
    let mut op = AgentOp::new(client, kind, target);
    op.invoke_us = at;
    op.complete_us = at + 5;
    op.status = status;
    op
}

fn submit(agent: &str, n: u64, at: u64, status: Status, id: Option<u64>) -> AgentOp {
    let mut op = op(1, AgentOpKind::Submit, agent, at, status);
    op.key = Some(format!("{agent}/{n}"));
    op.input = Some(if agent == MEMO_AGENT {
        remember(n)
    } else {
        format!("task-{n}")
    });
    op.task = id.filter(|_| status == Status::Ok);
    op.existing = id.map(|_| false);
    op
}

fn remember(n: u64) -> String {
    format!(r#"{{"op":"remember","key":"m-{n}","text":"note {n}"}}"#)
}

fn get(agent: &str, at: u64, incarnation: u64) -> AgentOp {
    let mut op = op(9, AgentOpKind::Get, agent, at, Status::Ok);
    op.agent = Some(agent_view(agent, "running", Some(incarnation), "running"));
    op
}

fn wait(task: TaskView, at: u64) -> AgentOp {
    let mut op = op(1, AgentOpKind::Wait, &task.agent.clone(), at, Status::Ok);
    op.task = Some(task.id);
    op.result = Some(task);
    op
}

fn agent_view(name: &str, desired: &str, incarnation: Option<u64>, status: &str) -> AgentView {
    AgentView {
        name: name.into(),
        kind: if name == MEMO_AGENT { "inference" } else { "exec" }.into(),
        desired: desired.into(),
        generation: 1,
        incarnation,
        node: incarnation.map(|_| 7),
        status: incarnation.map(|_| status.to_string()),
        reason: String::new(),
    }
}

fn task(id: u64, agent: &str, n: u64, status: &str, incarnation: u64) -> TaskView {
    let input = if agent == MEMO_AGENT {
        remember(n)
    } else {
        format!("task-{n}")
    };
    TaskView {
        id,
        agent: agent.into(),
        output: match status {
            "succeeded" if agent == MEMO_AGENT => "{\"remembered\":true}".into(),
            "succeeded" => echo_output(agent, incarnation, &input),
            _ => String::new(),
        },
        input,
        key: format!("{agent}/{n}"),
        status: status.into(),
        error: if status == "failed" {
            "timed out".into()
        } else {
            String::new()
        },
        incarnation,
    }
}

/// A correct run: a0 runs, moves from incarnation 1 to 2 and completes
/// three tasks (one submitted twice after an unknown submit, one refused,
/// one unknown and never applied); a1 is stopped with a task queued; a2's
/// only Run is unknown and did not apply; the inference agent remembers two
/// keys, one of them after a move.
fn good() -> (Vec<AgentOp>, FinalState) {
    let ops = vec![
        op(9, AgentOpKind::Run, A0, 10, Status::Ok),
        op(9, AgentOpKind::Run, A1, 20, Status::Ok),
        op(9, AgentOpKind::Run, A2, 30, Status::Unknown),
        op(9, AgentOpKind::Run, MEMO_AGENT, 40, Status::Ok),
        submit(A0, 1, 100, Status::Ok, Some(1)),
        wait(task(1, A0, 1, "succeeded", 1), 110),
        get(A0, 120, 1),
        op(9, AgentOpKind::Migrate, A0, 130, Status::Ok),
        submit(A0, 2, 140, Status::Unknown, None),
        submit(A0, 2, 150, Status::Ok, Some(2)),
        get(A0, 160, 2),
        submit(A0, 3, 170, Status::Fail, None),
        submit(A0, 4, 180, Status::Unknown, None),
        submit(A0, 5, 190, Status::Ok, Some(6)),
        wait(task(6, A0, 5, "failed", 2), 195),
        submit(A1, 1, 200, Status::Ok, Some(3)),
        op(9, AgentOpKind::Stop, A1, 210, Status::Ok),
        op(9, AgentOpKind::Drain, "77", 215, Status::Ok),
        op(9, AgentOpKind::Undrain, "77", 216, Status::Unknown),
        submit(A1, 2, 220, Status::Fail, None),
        submit(MEMO_AGENT, 1, 230, Status::Ok, Some(4)),
        submit(MEMO_AGENT, 2, 240, Status::Ok, Some(5)),
        wait(task(5, MEMO_AGENT, 2, "succeeded", 3), 250),
    ];
    let end = FinalState {
        settled: true,
        settle_ms: 1200,
        agents: vec![
            agent_view(A0, "running", Some(2), "running"),
            agent_view(A1, "stopped", Some(1), "stopped"),
            agent_view(MEMO_AGENT, "running", Some(3), "running"),
        ],
        tasks: vec![
            task(1, A0, 1, "succeeded", 1),
            task(2, A0, 2, "succeeded", 2),
            task(6, A0, 5, "failed", 2),
            task(3, A1, 1, "queued", 0),
            task(4, MEMO_AGENT, 1, "succeeded", 2),
            task(5, MEMO_AGENT, 2, "succeeded", 3),
        ],
        memory: vec![
            MemoryView {
                agent: MEMO_AGENT.into(),
                key: "m-1".into(),
                value: "note 1".into(),
                incarnation: 2,
            },
            MemoryView {
                agent: MEMO_AGENT.into(),
                key: "m-2".into(),
                value: "note 2".into(),
                incarnation: 3,
            },
        ],
    };
    (ops, end)
}

fn invalid(ops: &[AgentOp], end: &FinalState) -> AgentReport {
    let report = check(ops, end);
    assert_eq!(report.verdict, Verdict::Invalid, "{report}");
    report
}

#[test]
fn a_correct_history_is_ok() {
    let (ops, end) = good();
    let report = check(&ops, &end);
    assert_eq!(report.verdict, Verdict::Ok, "{report}");
    let c = report.counts;
    assert_eq!((c.agents, c.running, c.incarnations), (3, 2, 6));
    assert_eq!((c.keys, c.acknowledged, c.unknown_keys), (9, 6, 1));
    assert_eq!((c.tasks, c.succeeded, c.failed, c.queued_stopped), (6, 4, 1, 1));
    assert_eq!((c.results_seen, c.gets, c.memory), (3, 2, 2));
    assert_eq!((c.migrations, c.drains, c.stops), (1, 1, 1));
    assert!(report.to_string().starts_with("agents: ok: 3 agents"), "{report}");

    // An unknown Run may also have taken effect.
    let (ops, mut end) = good();
    end.agents.push(agent_view(A2, "running", Some(1), "running"));
    assert_eq!(check(&ops, &end).verdict, Verdict::Ok);
}

#[test]
fn an_acknowledged_agent_that_is_gone_is_lost() {
    let (ops, mut end) = good();
    end.agents.retain(|a| a.name != A0);
    let report = invalid(&ops, &end);
    assert_eq!(report.lost_agents.len(), 1, "{report}");
    assert!(
        report.lost_agents[0].starts_with("chaos-agent-0 lost: absent at the end"),
        "{report}"
    );
}

#[test]
fn a_desired_status_no_operation_explains_is_caught() {
    // a1 was stopped (acknowledged, last): running again is wrong.
    let (ops, mut end) = good();
    end.agents[1].desired = "running".into();
    let report = invalid(&ops, &end);
    assert!(
        report.lost_agents[0].contains("chaos-agent-1 in the wrong state"),
        "{report}"
    );
    // a0 was never stopped: stopped is wrong.
    let (ops, mut end) = good();
    end.agents[0].desired = "stopped".into();
    assert!(invalid(&ops, &end).lost_agents[0].contains("chaos-agent-0 in the wrong state"));
    // An unknown Stop after the Run explains either.
    let (mut ops, mut end) = good();
    ops.push(op(9, AgentOpKind::Stop, A0, 300, Status::Unknown));
    end.agents[0].desired = "stopped".into();
    assert_eq!(check(&ops, &end).verdict, Verdict::Ok);
}

#[test]
fn an_agent_nobody_ran_is_a_phantom() {
    let (mut ops, mut end) = good();
    end.agents
        .push(agent_view("chaos-agent-7", "running", Some(1), "running"));
    let report = invalid(&ops, &end);
    assert_eq!(report.phantom_agents.len(), 1, "{report}");
    // A failed Run does not make one either.
    ops.push(op(9, AgentOpKind::Run, "chaos-agent-7", 400, Status::Fail));
    assert_eq!(invalid(&ops, &end).phantom_agents.len(), 1);
}

#[test]
fn an_incarnation_that_goes_back_is_caught() {
    let (mut ops, end) = good();
    ops.push(get(A0, 500, 1));
    let report = invalid(&ops, &end);
    assert!(
        report.incarnation_regressions[0].contains("incarnation 1 read at 500..505us after 2"),
        "{report}"
    );
    // Overlapping reads may see either.
    let (mut ops, end) = good();
    let mut slow = get(A0, 158, 1);
    slow.complete_us = 170;
    ops.push(slow);
    assert_eq!(check(&ops, &end).verdict, Verdict::Ok);
    // The final state below what was read during the run.
    let (ops, mut end) = good();
    end.agents[0].incarnation = Some(1);
    end.tasks.retain(|t| t.id != 2 && t.id != 6);
    let report = invalid(&ops, &end);
    assert!(
        report
            .incarnation_regressions
            .iter()
            .any(|r| r.contains("incarnation 1 at the end, 2 was read")),
        "{report}"
    );
}

#[test]
fn an_acknowledged_task_that_is_gone_or_changed_is_lost() {
    let (ops, mut end) = good();
    end.tasks.retain(|t| t.id != 2);
    let report = invalid(&ops, &end);
    assert_eq!(
        report.lost_tasks,
        ["chaos-agent-0 task 2 (key \"chaos-agent-0/2\"): acknowledged, absent"]
    );
    let (ops, mut end) = good();
    end.tasks[1].input = "task-99".into();
    end.tasks[1].output = echo_output(A0, 2, "task-99");
    assert!(invalid(&ops, &end).lost_tasks[0].contains("acknowledged, but the task is"));
    // A result seen by Wait whose task is gone.
    let (ops, mut end) = good();
    end.tasks.retain(|t| t.id != 6);
    let report = invalid(&ops, &end);
    assert!(
        report.lost_tasks.iter().any(|l| l.contains("its result was seen")),
        "{report}"
    );
}

#[test]
fn two_tasks_of_one_key_are_duplicates() {
    let (ops, mut end) = good();
    let mut again = task(9, A0, 1, "succeeded", 2);
    again.output = echo_output(A0, 2, &again.input);
    end.tasks.push(again);
    let report = invalid(&ops, &end);
    assert_eq!(
        report.duplicate_tasks,
        ["chaos-agent-0 key \"chaos-agent-0/1\": tasks 1, 9"]
    );
    // Two acknowledgements of one key naming two ids.
    let (mut ops, end) = good();
    ops.push(submit(A0, 1, 600, Status::Ok, Some(8)));
    let report = invalid(&ops, &end);
    assert!(
        report.duplicate_tasks[0].contains("acknowledged as tasks 1, 8"),
        "{report}"
    );
}

#[test]
fn a_task_nobody_submitted_or_whose_submits_failed_is_a_phantom() {
    let (ops, mut end) = good();
    end.tasks.push(task(10, A0, 3, "succeeded", 2));
    end.tasks.push(task(11, A0, 42, "succeeded", 2));
    let report = invalid(&ops, &end);
    assert_eq!(report.phantom_tasks.len(), 2, "{report}");
    assert!(
        report.phantom_tasks[0].contains("every submit of the key failed"),
        "{report}"
    );
    assert!(report.phantom_tasks[1].contains("never submitted"), "{report}");
    // The unknown submit's task may exist.
    let (ops, mut end) = good();
    end.tasks.push(task(12, A0, 4, "succeeded", 2));
    assert_eq!(check(&ops, &end).verdict, Verdict::Ok);
}

#[test]
fn a_result_not_from_its_task_or_its_credited_incarnation_is_wrong() {
    // The output says incarnation 1 ran it; the record credits 2.
    let (ops, mut end) = good();
    end.tasks[1].output = echo_output(A0, 1, "task-2");
    let report = invalid(&ops, &end);
    assert!(
        report.wrong_results[0].contains("expected \"chaos-agent-0 2 task-2\""),
        "{report}"
    );
    // Another task's output.
    let (ops, mut end) = good();
    end.tasks[1].output = echo_output(A0, 2, "task-1");
    assert_eq!(invalid(&ops, &end).wrong_results.len(), 1);
    // An incarnation the agent never had, and a failure without a reason.
    let (ops, mut end) = good();
    end.tasks[1].incarnation = 5;
    end.tasks[1].output = echo_output(A0, 5, "task-2");
    end.tasks[2].error.clear();
    let report = invalid(&ops, &end);
    assert_eq!(report.wrong_results.len(), 2, "{report}");
}

#[test]
fn a_result_that_changed_after_it_was_seen_was_committed_twice() {
    let (ops, mut end) = good();
    end.tasks[0].incarnation = 2;
    end.tasks[0].output = echo_output(A0, 2, "task-1");
    let report = invalid(&ops, &end);
    assert_eq!(report.changed_results.len(), 1, "{report}");
    assert!(
        report.changed_results[0].contains("succeeded by incarnation 1"),
        "{report}"
    );
}

#[test]
fn a_result_of_a_superseded_incarnation_is_stale() {
    // Task 2 (later) committed by incarnation 1 after task 1 had
    // incarnation 2's result; the waits saw nothing of task 1.
    let (mut ops, mut end) = good();
    ops.retain(|op| op.kind != AgentOpKind::Wait || op.task != Some(1));
    end.tasks[0].incarnation = 2;
    end.tasks[0].output = echo_output(A0, 2, "task-1");
    end.tasks[1].incarnation = 1;
    end.tasks[1].output = echo_output(A0, 1, "task-2");
    let report = invalid(&ops, &end);
    assert_eq!(
        report.stale_results,
        ["chaos-agent-0 task 2: result of incarnation 1 counted, after task 1 had one of incarnation 2"]
    );
}

#[test]
fn memory_not_written_by_an_accepted_result_is_caught() {
    // Written by the old incarnation, not the one whose result counted.
    let (ops, mut end) = good();
    end.memory[1].incarnation = 2;
    let report = invalid(&ops, &end);
    assert!(
        report.memory[0].contains("written by incarnation 2, but task 5 counted incarnation 3"),
        "{report}"
    );
    // An entry no task remembers, an exec agent's entry, a lost entry.
    let (ops, mut end) = good();
    end.memory.push(MemoryView {
        agent: MEMO_AGENT.into(),
        key: "m-9".into(),
        value: "note 9".into(),
        incarnation: 3,
    });
    end.memory.push(MemoryView {
        agent: A0.into(),
        key: "k".into(),
        value: "v".into(),
        incarnation: 2,
    });
    end.memory.remove(0);
    let report = invalid(&ops, &end);
    assert_eq!(report.memory.len(), 3, "{report}");
}

#[test]
fn an_unsettled_cluster_is_unknown_not_ok() {
    let (ops, mut end) = good();
    end.settled = false;
    end.agents[0].status = Some("pending".into());
    end.tasks.push(task(13, A0, 4, "queued", 0));
    let report = check(&ops, &end);
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert_eq!(report.stuck.len(), 2, "{report}");
    assert!(report.to_string().contains("not settled (liveness)"), "{report}");
}
