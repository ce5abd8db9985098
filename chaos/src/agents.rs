//! The agent workload: agents, tasks and their lifecycle against a real
//! cluster's public gRPC API (`cell0.v1.Agents`, `Nodes`, `Tasks`), recorded
//! as a history for [`crate::checker::agents`].
//!
//! - **agents**: `exec` agents named [`AGENT_PREFIX`]`<i>` whose command,
//!   `sh -c 'printf "%s %s " "$CELL0_AGENT" "$CELL0_INCARNATION"; cat'`,
//!   answers a task with the agent's name, the incarnation that ran it and
//!   the input, so a result names the incarnation that produced it. With a
//!   model directory ([`AgentOptions::model`]) one `inference` agent,
//!   [`MEMO_AGENT`], is added: its tasks `remember` unique keys in its
//!   replicated memory.
//! - **task clients** (one per agent): submit tasks with idempotency keys
//!   `<agent>/<n>` and inputs `task-<n>` (or a `remember` of key `m-<n>`); a
//!   submit whose outcome is unknown is retried with the same key until it
//!   is acknowledged or refused; after each acknowledged submit the client
//!   waits (up to 1.5 s) for the result and reads its agent
//!   (`Agents.Get`, linearizable).
//! - **the lifecycle client**: runs every agent, then every 0.3 to 1.5 s does
//!   one of migrate an agent, drain a node (one agent at a time, the rest
//!   after 5 s), end that drain (`SetEligibility`), stop an agent, run a
//!   stopped one again, or read every agent, drawn by the seed; it ends
//!   every drain it started before it returns.
//!
//! After the nemesis healed, [`final_state`] ends every drain, waits (up to
//! a deadline, polling) until every agent meant to run runs and no task of
//! such an agent is queued, and reads back every agent, every task and the
//! agents' memory, each read linearizable.
//!
//! Invariants: one operation in flight per client; a mutation whose
//! outcome the client cannot know (a timeout, a lost connection) is
//! recorded `unknown`, never `fail`; `fail` only when the node refused it
//! before anything reached the log or no connection was made; a read that
//! did not return is `fail`. Times come from the run's [`Clock`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cell0_proto::v1;
use cell0_proto::v1::agents_client::AgentsClient;
use cell0_proto::v1::nodes_client::NodesClient;
use cell0_proto::v1::tasks_client::TasksClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::history::Status;
use crate::workload::{Clock, certainly_not_applied};

/// Name prefix of the workload's exec agents.
pub const AGENT_PREFIX: &str = "chaos-agent-";

/// Name of the inference agent (with a model).
pub const MEMO_AGENT: &str = "chaos-memo";

/// The model name the inference agent asks for.
pub const MODEL_NAME: &str = "chaos-minilm";

/// How long one request may take before it counts as timed out.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a task client waits for a result after submitting.
const WAIT_MS: u64 = 1500;

/// Pause after a failed operation, so that a node that is down is not
/// asked in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How long the lifecycle client waits between two actions.
const ACTION_PAUSE_MS: std::ops::Range<u64> = 300..1500;

/// How long a drain the lifecycle client starts moves one agent at a time
/// before the rest move at once.
const DRAIN_DEADLINE_MS: u64 = 5000;

/// The exec agents' command: the agent's name, its incarnation, the input.
const ECHO: &str = "printf '%s %s ' \"$CELL0_AGENT\" \"$CELL0_INCARNATION\"; cat";

/// What the agent workload needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Exec agents.
    pub agents: u32,
    /// A model directory (like `models/all-minilm-l6-v2`): adds the
    /// inference agent [`MEMO_AGENT`], whose tasks write its memory.
    pub model: Option<PathBuf>,
}

/// What can stop the workload's setup or its final read.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    /// A file or a process.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The model could not be added or did not reach every node.
    #[error("model: {0}")]
    Model(String),
    /// The final state could not be read.
    #[error("reading the agents back: {0}")]
    Read(String),
}

/// What an operation of the agent workload asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentOpKind {
    /// `Agents.Run` of the agent's spec.
    Run,
    /// `Agents.Stop`.
    Stop,
    /// `Agents.Migrate` to any other node.
    Migrate,
    /// `Nodes.Drain` of a node.
    Drain,
    /// `Nodes.SetEligibility(eligible)`: ends a drain.
    Undrain,
    /// `Tasks.Submit`.
    Submit,
    /// `Tasks.Wait` for a task's result.
    Wait,
    /// `Agents.Get` (linearizable).
    Get,
}

/// An agent as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Its name.
    pub name: String,
    /// `exec`, `process`, `inference` (empty: no kind).
    pub kind: String,
    /// `running` or `stopped`: what was asked for.
    pub desired: String,
    /// Its spec's generation.
    pub generation: u64,
    /// The allocation's incarnation (`None`: not placed).
    pub incarnation: Option<u64>,
    /// The allocation's node.
    pub node: Option<u64>,
    /// The allocation's status (`pending`, `running`, `stopped`, `failed`,
    /// `lost`).
    pub status: Option<String>,
    /// Why it is not placed, or the allocation's reason.
    pub reason: String,
}

/// A task as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    /// Its id.
    pub id: u64,
    /// Its agent.
    pub agent: String,
    /// Its input (UTF-8, lossy).
    pub input: String,
    /// Its idempotency key.
    pub key: String,
    /// `queued`, `succeeded` or `failed`.
    pub status: String,
    /// The output (UTF-8, lossy) of a succeeded task.
    pub output: String,
    /// The error of a failed task.
    pub error: String,
    /// The incarnation whose result counted (0 while queued).
    pub incarnation: u64,
}

/// One entry of an agent's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryView {
    /// The agent.
    pub agent: String,
    /// The key.
    pub key: String,
    /// The text.
    pub value: String,
    /// The incarnation that wrote it.
    pub incarnation: u64,
}

/// One operation of the agent workload's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOp {
    /// The client (one operation at a time).
    pub client: u32,
    /// What it asked.
    pub kind: AgentOpKind,
    /// The agent; for `drain` and `undrain` the node id, in decimal.
    pub target: String,
    /// Submits: the idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Submits: the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Submits: the task id returned; waits: the task asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u64>,
    /// Submits: whether the key named an earlier task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing: Option<bool>,
    /// Runs and stops: the generation returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Gets: the agent seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentView>,
    /// Waits: the task seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskView>,
    /// When the client sent it, microseconds since the workloads started.
    pub invoke_us: u64,
    /// When the answer (or the error) came.
    pub complete_us: u64,
    /// How it ended.
    pub status: Status,
    /// The node (index) the client talked to.
    pub node: u32,
    /// The error, when it failed or its outcome is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AgentOp {
    /// An operation of `client` on `target`, not yet sent.
    pub fn new(client: u32, kind: AgentOpKind, target: impl Into<String>) -> Self {
        AgentOp {
            client,
            kind,
            target: target.into(),
            key: None,
            input: None,
            task: None,
            existing: None,
            generation: None,
            agent: None,
            result: None,
            invoke_us: 0,
            complete_us: 0,
            status: Status::Ok,
            node: 0,
            error: None,
        }
    }
}

/// Everything the cluster holds of the workload at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Whether, before the read, every agent meant to run ran and no task
    /// of such an agent was queued (else the deadline passed).
    pub settled: bool,
    /// How long the wait for that took, in milliseconds.
    pub settle_ms: u64,
    /// Every agent, in name order.
    pub agents: Vec<AgentView>,
    /// Every task of every agent, by agent and id.
    pub tasks: Vec<TaskView>,
    /// Every agent's memory, by agent and key.
    pub memory: Vec<MemoryView>,
}

/// The exec agents' names.
pub fn agent_names(options: &AgentOptions) -> Vec<String> {
    let mut names: Vec<String> = (0..options.agents).map(|i| format!("{AGENT_PREFIX}{i}")).collect();
    if options.model.is_some() {
        names.push(MEMO_AGENT.to_string());
    }
    names
}

/// The spec the workload runs `name` with.
pub fn spec(name: &str) -> v1::AgentSpec {
    let kind = if name == MEMO_AGENT {
        v1::agent_spec::Kind::Inference(v1::InferenceConfig {})
    } else {
        v1::agent_spec::Kind::Exec(v1::ExecConfig {
            command: vec!["/bin/sh".into(), "-c".into(), ECHO.into()],
            timeout_ms: 20_000,
            max_output_bytes: 4096,
        })
    };
    v1::AgentSpec {
        name: name.into(),
        resources: Some(v1::AgentResources {
            cpu_millis: 25,
            memory_mb: 64,
            gpu_memory_mb: 0,
        }),
        constraints: (name == MEMO_AGENT).then(|| v1::AgentConstraints {
            model: MODEL_NAME.into(),
            ..Default::default()
        }),
        restart: String::new(),
        max_restarts: 0,
        kind: Some(kind),
        sites: Vec::new(),
    }
}

/// The expected output of an exec agent's task: what its command
/// prints (its name, its incarnation, then the input).
pub fn echo_output(agent: &str, incarnation: u64, input: &str) -> String {
    format!("{agent} {incarnation} {input}")
}

/// The input of task `n` of `agent`.
pub fn task_input(agent: &str, n: u64) -> String {
    if agent == MEMO_AGENT {
        format!(r#"{{"op":"remember","key":"m-{n}","text":"note {n} of the chaos run"}}"#)
    } else {
        format!("task-{n}")
    }
}

/// Prepares a run with agents, before the workloads start: makes `out`
/// traversable (agents run as `nobody` when the nodes run as root, under
/// the nodes' data dirs) and, with a model, adds it through node 0 with the
/// `cell0` CLI and waits until every node holds it.
pub async fn prepare(options: &AgentOptions, out: &Path, bin: &Path, endpoints: &[String]) -> Result<(), AgentsError> {
    let io = |what: String| move |source| AgentsError::Io { what, source };
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o711))
        .map_err(io(format!("chmod {}", out.display())))?;
    let Some(model) = &options.model else {
        return Ok(());
    };
    let endpoint = endpoints.first().cloned().unwrap_or_default();
    let added = tokio::process::Command::new(bin)
        .args(["--endpoint", &endpoint, "model", "add"])
        .arg(model)
        .args(["--name", MODEL_NAME, "--version", "1"])
        .output()
        .await
        .map_err(io(format!("{} model add", bin.display())))?;
    if !added.status.success() {
        return Err(AgentsError::Model(
            String::from_utf8_lossy(&added.stderr).trim().to_string(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ls = tokio::process::Command::new(bin)
            .args(["--endpoint", &endpoint, "model", "ls", "--output", "json"])
            .output()
            .await
            .map_err(io(format!("{} model ls", bin.display())))?;
        let listed: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap_or_default();
        let held = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["name"] == MODEL_NAME)
            .filter_map(|m| m["holders"].as_array())
            .any(|h| h.len() >= endpoints.len());
        if held {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(AgentsError::Model(format!(
                "not on every node within 120 s: {}",
                String::from_utf8_lossy(&ls.stdout).trim()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// Lazy connections to every node; a client uses one and moves to the next
/// after an error.
struct Conn {
    channels: Vec<Channel>,
    current: usize,
}

impl Conn {
    fn new(endpoints: &[String], first: usize) -> Self {
        let channels = endpoints
            .iter()
            .filter_map(|e| {
                tonic::transport::Endpoint::from_shared(format!("http://{e}"))
                    .ok()
                    .map(|e| e.connect_timeout(Duration::from_millis(500)).connect_lazy())
            })
            .collect::<Vec<_>>();
        let current = if channels.is_empty() { 0 } else { first % channels.len() };
        Conn { channels, current }
    }

    fn node(&self) -> u32 {
        self.current as u32
    }

    fn channel(&self) -> Option<Channel> {
        self.channels.get(self.current).cloned()
    }

    fn agents(&self) -> Option<AgentsClient<Channel>> {
        self.channel().map(AgentsClient::new)
    }

    fn nodes(&self) -> Option<NodesClient<Channel>> {
        self.channel().map(NodesClient::new)
    }

    fn tasks(&self) -> Option<TasksClient<Channel>> {
        self.channel().map(TasksClient::new)
    }

    fn next(&mut self) {
        if !self.channels.is_empty() {
            self.current = (self.current + 1) % self.channels.len();
        }
    }
}

/// Ends `op` with `answer`: `ok` with what `on_ok` records, else `fail` or
/// `unknown` (`mutation`: whether the request may have changed anything).
fn finish<T>(
    op: &mut AgentOp,
    clock: Clock,
    answer: Result<tonic::Response<T>, tonic::Status>,
    mutation: bool,
    on_ok: impl FnOnce(&mut AgentOp, T),
) {
    op.complete_us = clock.now_us();
    match answer {
        Ok(r) => on_ok(op, r.into_inner()),
        Err(s) => {
            op.status = if !mutation || certainly_not_applied(&s) {
                Status::Fail
            } else {
                Status::Unknown
            };
            op.error = Some(format!("{:?}: {}", s.code(), s.message()));
        }
    }
}

fn missing_connection(op: &mut AgentOp, clock: Clock) {
    op.invoke_us = clock.now_us();
    op.complete_us = op.invoke_us;
    op.status = Status::Fail;
    op.error = Some("no connection".into());
}

/// An agent as the API returns it, as a view.
pub fn agent_view(info: &v1::AgentInfo) -> AgentView {
    let spec = info.spec.as_ref();
    let kind = match spec.and_then(|s| s.kind.as_ref()) {
        Some(v1::agent_spec::Kind::Exec(_)) => "exec",
        Some(v1::agent_spec::Kind::Process(_)) => "process",
        Some(v1::agent_spec::Kind::Inference(_)) => "inference",
        None => "",
    };
    let alloc = info.allocation.as_ref();
    AgentView {
        name: spec.map(|s| s.name.clone()).unwrap_or_default(),
        kind: kind.into(),
        desired: info.desired.clone(),
        generation: info.generation,
        incarnation: alloc.map(|a| a.incarnation),
        node: alloc.map(|a| a.node),
        status: alloc.map(|a| a.status.clone()),
        reason: match alloc {
            Some(a) if info.pending_reason.is_empty() => a.reason.clone(),
            _ => info.pending_reason.clone(),
        },
    }
}

/// A task as the API returns it, as a view.
pub fn task_view(t: &v1::TaskInfo) -> TaskView {
    TaskView {
        id: t.id,
        agent: t.agent.clone(),
        input: String::from_utf8_lossy(&t.input).into_owned(),
        key: t.idempotency_key.clone(),
        status: t.status.clone(),
        output: String::from_utf8_lossy(&t.output).into_owned(),
        error: t.error.clone(),
        incarnation: t.incarnation,
    }
}

/// Records `op`; after one that did not end `ok` the client pauses and
/// moves to the next node.
async fn record(ops: &mut Vec<AgentOp>, conn: &mut Conn, op: AgentOp) -> Status {
    let status = op.status;
    ops.push(op);
    if status != Status::Ok {
        conn.next();
        tokio::time::sleep(ERROR_PAUSE).await;
    }
    status
}

async fn get(client: u32, conn: &mut Conn, clock: Clock, name: &str, ops: &mut Vec<AgentOp>) {
    let mut op = AgentOp::new(client, AgentOpKind::Get, name);
    op.node = conn.node();
    let Some(mut agents) = conn.agents() else {
        missing_connection(&mut op, clock);
        record(ops, conn, op).await;
        return;
    };
    op.invoke_us = clock.now_us();
    let answer = agents
        .get(request(v1::GetAgentRequest { name: name.into() }, OP_TIMEOUT))
        .await;
    finish(&mut op, clock, answer, false, |op, info| {
        op.agent = Some(agent_view(&info))
    });
    record(ops, conn, op).await;
}

async fn run_agent(client: u32, conn: &mut Conn, clock: Clock, name: &str, ops: &mut Vec<AgentOp>) -> Status {
    let mut op = AgentOp::new(client, AgentOpKind::Run, name);
    op.node = conn.node();
    let Some(mut agents) = conn.agents() else {
        missing_connection(&mut op, clock);
        return record(ops, conn, op).await;
    };
    op.invoke_us = clock.now_us();
    let answer = agents
        .run(request(v1::RunAgentRequest { spec: Some(spec(name)) }, OP_TIMEOUT))
        .await;
    finish(&mut op, clock, answer, true, |op, r| op.generation = Some(r.generation));
    record(ops, conn, op).await
}

async fn stop_agent(client: u32, conn: &mut Conn, clock: Clock, name: &str, ops: &mut Vec<AgentOp>) -> Status {
    let mut op = AgentOp::new(client, AgentOpKind::Stop, name);
    op.node = conn.node();
    let Some(mut agents) = conn.agents() else {
        missing_connection(&mut op, clock);
        return record(ops, conn, op).await;
    };
    op.invoke_us = clock.now_us();
    let answer = agents
        .stop(request(v1::StopAgentRequest { name: name.into() }, OP_TIMEOUT))
        .await;
    finish(&mut op, clock, answer, true, |op, r| op.generation = Some(r.generation));
    record(ops, conn, op).await
}

async fn migrate_agent(client: u32, conn: &mut Conn, clock: Clock, name: &str, ops: &mut Vec<AgentOp>) {
    let mut op = AgentOp::new(client, AgentOpKind::Migrate, name);
    op.node = conn.node();
    let Some(mut agents) = conn.agents() else {
        missing_connection(&mut op, clock);
        record(ops, conn, op).await;
        return;
    };
    op.invoke_us = clock.now_us();
    let answer = agents
        .migrate(request(
            v1::MigrateAgentRequest {
                name: name.into(),
                to_node: 0,
                ..Default::default()
            },
            OP_TIMEOUT,
        ))
        .await;
    finish(&mut op, clock, answer, true, |_, _| {});
    record(ops, conn, op).await;
}

/// Drains (`drain`) or ends the drain of node `id`.
async fn drain_node(
    client: u32,
    conn: &mut Conn,
    clock: Clock,
    id: u64,
    drain: bool,
    ops: &mut Vec<AgentOp>,
) -> Status {
    let kind = if drain {
        AgentOpKind::Drain
    } else {
        AgentOpKind::Undrain
    };
    let mut op = AgentOp::new(client, kind, id.to_string());
    op.node = conn.node();
    let Some(mut nodes) = conn.nodes() else {
        missing_connection(&mut op, clock);
        return record(ops, conn, op).await;
    };
    op.invoke_us = clock.now_us();
    if drain {
        let answer = nodes
            .drain(request(
                v1::DrainNodeRequest {
                    node: id,
                    max_parallel: 1,
                    deadline_ms: DRAIN_DEADLINE_MS,
                    reason: "chaos: agent workload".into(),
                },
                OP_TIMEOUT,
            ))
            .await;
        finish(&mut op, clock, answer, true, |_, _| {});
    } else {
        let answer = nodes
            .set_eligibility(request(
                v1::SetEligibilityRequest {
                    node: id,
                    eligible: true,
                },
                OP_TIMEOUT,
            ))
            .await;
        finish(&mut op, clock, answer, true, |_, _| {});
    }
    record(ops, conn, op).await
}

/// The ids of the nodes `Nodes.List` shows, with their states.
async fn list_nodes(conn: &mut Conn) -> Option<Vec<(u64, String)>> {
    let mut nodes = conn.nodes()?;
    match nodes.list(request(v1::ListNodesRequest {}, OP_TIMEOUT)).await {
        Ok(r) => Some(r.into_inner().nodes.into_iter().map(|n| (n.id, n.state)).collect()),
        Err(_) => {
            conn.next();
            None
        }
    }
}

/// Runs the task client of agent `name` until `until`: its operations.
pub async fn task_client(
    client: u32,
    name: String,
    endpoints: Vec<String>,
    clock: Clock,
    until: Instant,
) -> Vec<AgentOp> {
    let mut ops = Vec::new();
    let mut conn = Conn::new(&endpoints, client as usize);
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let key = format!("{name}/{n}");
        let input = task_input(&name, n);
        // The same key until the submit is acknowledged or refused.
        let mut id = None;
        while Instant::now() < until {
            let mut op = AgentOp::new(client, AgentOpKind::Submit, name.as_str());
            op.key = Some(key.clone());
            op.input = Some(input.clone());
            op.node = conn.node();
            let Some(mut tasks) = conn.tasks() else {
                missing_connection(&mut op, clock);
                record(&mut ops, &mut conn, op).await;
                break;
            };
            op.invoke_us = clock.now_us();
            let answer = tasks
                .submit(request(
                    v1::SubmitTaskRequest {
                        agent: name.clone(),
                        input: input.clone().into_bytes().into(),
                        idempotency_key: key.clone(),
                    },
                    OP_TIMEOUT,
                ))
                .await;
            finish(&mut op, clock, answer, true, |op, r| {
                op.task = Some(r.id);
                op.existing = Some(r.existing);
            });
            let (status, task) = (op.status, op.task);
            record(&mut ops, &mut conn, op).await;
            match status {
                Status::Ok => {
                    id = task;
                    break;
                }
                Status::Fail => break,
                Status::Unknown => {}
            }
        }
        if let Some(id) = id {
            let mut op = AgentOp::new(client, AgentOpKind::Wait, name.as_str());
            op.task = Some(id);
            op.node = conn.node();
            if let Some(mut tasks) = conn.tasks() {
                op.invoke_us = clock.now_us();
                let answer = tasks
                    .wait(request(
                        v1::WaitTaskRequest {
                            id,
                            timeout_ms: WAIT_MS,
                        },
                        OP_TIMEOUT + Duration::from_millis(WAIT_MS),
                    ))
                    .await;
                finish(&mut op, clock, answer, false, |op, t| op.result = Some(task_view(&t)));
            } else {
                missing_connection(&mut op, clock);
            }
            record(&mut ops, &mut conn, op).await;
        }
        get(client, &mut conn, clock, &name, &mut ops).await;
    }
    ops
}

/// Runs the lifecycle client until `until`: runs every agent in `names`,
/// then migrates, drains, stops and runs them at random (seeded by
/// `seed`); ends every drain it started before it returns.
pub async fn lifecycle_client(
    client: u32,
    names: Vec<String>,
    endpoints: Vec<String>,
    seed: u64,
    clock: Clock,
    until: Instant,
) -> Vec<AgentOp> {
    let mut ops = Vec::new();
    let mut conn = Conn::new(&endpoints, client as usize);
    let mut rng = StdRng::seed_from_u64(seed);
    for name in &names {
        while Instant::now() < until && run_agent(client, &mut conn, clock, name, &mut ops).await != Status::Ok {}
    }
    let mut stopped: Vec<String> = Vec::new();
    let mut drained: Vec<u64> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(ACTION_PAUSE_MS))).await;
        if Instant::now() >= until || names.is_empty() {
            break;
        }
        let name = names[rng.random_range(0..names.len())].clone();
        match rng.random_range(0..100) {
            0..30 => {
                migrate_agent(client, &mut conn, clock, &name, &mut ops).await;
                get(client, &mut conn, clock, &name, &mut ops).await;
            }
            30..45 if drained.is_empty() => {
                if let Some(nodes) = list_nodes(&mut conn).await {
                    let ready: Vec<u64> = nodes.iter().filter(|(_, s)| s == "ready").map(|(id, _)| *id).collect();
                    if !ready.is_empty() {
                        let id = ready[rng.random_range(0..ready.len())];
                        // Recorded as drained whatever the outcome: an
                        // unknown drain may have taken effect.
                        drained.push(id);
                        drain_node(client, &mut conn, clock, id, true, &mut ops).await;
                    }
                }
            }
            30..55 => {
                if let Some(id) = drained.first().copied()
                    && drain_node(client, &mut conn, clock, id, false, &mut ops).await == Status::Ok
                {
                    drained.retain(|d| *d != id);
                }
            }
            // At most half the agents stopped at once.
            55..75 if !stopped.contains(&name) && stopped.len() < names.len() / 2 => {
                if stop_agent(client, &mut conn, clock, &name, &mut ops).await != Status::Fail {
                    stopped.push(name.clone());
                }
                get(client, &mut conn, clock, &name, &mut ops).await;
            }
            55..85 => {
                if let Some(name) = stopped.first().cloned()
                    && run_agent(client, &mut conn, clock, &name, &mut ops).await == Status::Ok
                {
                    stopped.retain(|s| *s != name);
                    get(client, &mut conn, clock, &name, &mut ops).await;
                }
            }
            _ => {
                for name in &names {
                    get(client, &mut conn, clock, name, &mut ops).await;
                }
            }
        }
    }
    // End the drains this client started (the final read ends any left).
    let give_up = Instant::now() + Duration::from_secs(10);
    while let Some(id) = drained.first().copied()
        && Instant::now() < give_up
    {
        if drain_node(client, &mut conn, clock, id, false, &mut ops).await == Status::Ok {
            drained.remove(0);
        }
    }
    ops
}

/// Every item of a paged list: `page(after)` fetches the page after the
/// cursor `after` (its items, and whether more follow); `cursor` names the
/// item the next page starts after.
async fn every_page<C, T, F, Fut>(mut after: C, mut page: F, cursor: impl Fn(&T) -> C) -> Result<Vec<T>, String>
where
    F: FnMut(C) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, bool), tonic::Status>>,
{
    let mut out = Vec::new();
    loop {
        let (items, more) = page(after).await.map_err(|s| s.message().to_string())?;
        out.extend(items);
        match (more, out.last()) {
            (true, Some(last)) => after = cursor(last),
            _ => return Ok(out),
        }
    }
}

/// Every page of `Agents.List` through `conn`'s current node.
async fn read_agents(conn: &Conn) -> Result<Vec<AgentView>, String> {
    let agents = conn.agents().ok_or("no connection")?;
    every_page(
        String::new(),
        |start_after| {
            let mut agents = agents.clone();
            async move {
                let page = agents
                    .list(request(
                        v1::ListAgentsRequest {
                            start_after,
                            limit: 1000,
                        },
                        OP_TIMEOUT,
                    ))
                    .await?
                    .into_inner();
                Ok((page.agents.iter().map(agent_view).collect(), page.more))
            }
        },
        |last: &AgentView| last.name.clone(),
    )
    .await
}

/// Every task and memory entry of `agent` through `conn`'s current node.
async fn read_tasks(conn: &Conn, agent: &str) -> Result<(Vec<TaskView>, Vec<MemoryView>), String> {
    let tasks = conn.tasks().ok_or("no connection")?;
    let listed = every_page(
        0,
        |start_after| {
            let mut tasks = tasks.clone();
            let agent = agent.to_string();
            async move {
                let page = tasks
                    .list(request(
                        v1::ListTasksRequest {
                            agent,
                            start_after,
                            limit: 1000,
                        },
                        OP_TIMEOUT,
                    ))
                    .await?
                    .into_inner();
                Ok((page.tasks.iter().map(task_view).collect(), page.more))
            }
        },
        |last: &TaskView| last.id,
    )
    .await?;
    let memory = every_page(
        String::new(),
        |start_after| {
            let mut tasks = tasks.clone();
            let agent = agent.to_string();
            async move {
                let page = tasks
                    .list_memory(request(
                        v1::ListMemoryRequest {
                            agent: agent.clone(),
                            start_after,
                            limit: 1000,
                        },
                        OP_TIMEOUT,
                    ))
                    .await?
                    .into_inner();
                let entries = page
                    .entries
                    .iter()
                    .map(|e| MemoryView {
                        agent: agent.clone(),
                        key: e.key.clone(),
                        value: e.value.clone(),
                        incarnation: e.incarnation,
                    })
                    .collect();
                Ok((entries, page.more))
            }
        },
        |last: &MemoryView| last.key.clone(),
    )
    .await?;
    Ok((listed, memory))
}

/// One read of everything, through one node.
async fn read_all(conn: &Conn, names: &[String]) -> Result<FinalState, String> {
    let agents = read_agents(conn).await?;
    let mut state = FinalState::default();
    let mut all: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    all.extend(names.iter().cloned());
    all.sort();
    all.dedup();
    for name in &all {
        let (tasks, memory) = read_tasks(conn, name).await?;
        state.tasks.extend(tasks);
        state.memory.extend(memory);
    }
    state.agents = agents;
    Ok(state)
}

/// Whether every agent meant to run runs and none of their tasks is
/// queued.
pub fn is_settled(state: &FinalState) -> bool {
    let running: Vec<&str> = state
        .agents
        .iter()
        .filter(|a| a.desired == "running")
        .map(|a| a.name.as_str())
        .collect();
    state
        .agents
        .iter()
        .filter(|a| a.desired == "running")
        .all(|a| a.status.as_deref() == Some("running"))
        && state
            .tasks
            .iter()
            .all(|t| t.status != "queued" || !running.contains(&t.agent.as_str()))
}

/// Reads the final state after the nemesis healed: ends every drain, then
/// polls until the cluster [settled](is_settled) or `settle` passed, and
/// returns the last read (every agent, including `names` that do not
/// exist, their tasks and memory).
pub async fn final_state(endpoints: &[String], names: &[String], settle: Duration) -> Result<FinalState, AgentsError> {
    let started = Instant::now();
    let deadline = started + settle;
    let mut conn = Conn::new(endpoints, 0);
    // End every drain and ineligibility: the agents must find room.
    loop {
        let pending = match list_nodes(&mut conn).await {
            Some(nodes) => nodes
                .into_iter()
                .filter(|(_, s)| s == "draining" || s == "ineligible")
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
            None => vec![u64::MAX],
        };
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(AgentsError::Read(format!("nodes still draining: {pending:?}")));
        }
        for id in pending.into_iter().filter(|id| *id != u64::MAX) {
            if let Some(mut nodes) = conn.nodes() {
                let _ = nodes
                    .set_eligibility(request(
                        v1::SetEligibilityRequest {
                            node: id,
                            eligible: true,
                        },
                        OP_TIMEOUT,
                    ))
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last: Option<FinalState> = None;
    let mut last_error = String::new();
    loop {
        match read_all(&conn, names).await {
            Ok(mut state) => {
                state.settled = is_settled(&state);
                state.settle_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                if state.settled {
                    return Ok(state);
                }
                last = Some(state);
            }
            Err(e) => {
                last_error = e;
                conn.next();
            }
        }
        if Instant::now() > deadline {
            return last.ok_or(AgentsError::Read(last_error));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long the final read waits for the cluster to settle.
pub const SETTLE: Duration = Duration::from_secs(90);

/// The agent workload's part of a run's summary.
#[derive(Debug, Clone, Serialize)]
pub struct AgentsSummary {
    /// Operations recorded.
    pub ops: usize,
    /// Ended `ok`.
    pub ok: usize,
    /// Ended `fail`.
    pub fail: usize,
    /// Ended `unknown`.
    pub unknown: usize,
    /// What the checker counted.
    pub counts: crate::checker::agents::AgentCounts,
    /// How long the cluster took to settle after healing, in milliseconds.
    pub settle_ms: u64,
    /// The checker's verdict.
    pub verdict: crate::checker::Verdict,
    /// Its report, in words.
    pub report: String,
}

/// The agent workload of a run, its clients running.
pub struct AgentRun {
    names: Vec<String>,
    endpoints: Vec<String>,
    clients: tokio::task::JoinSet<Vec<AgentOp>>,
}

impl AgentRun {
    /// Starts a task client per agent and the lifecycle client (client
    /// numbers from `first_client`) until `until`; call [`prepare`] first.
    pub fn start(
        options: &AgentOptions,
        endpoints: Vec<String>,
        first_client: u32,
        seed: u64,
        clock: Clock,
        until: Instant,
    ) -> AgentRun {
        let names = agent_names(options);
        let mut clients = tokio::task::JoinSet::new();
        let mut id = first_client;
        for name in &names {
            clients.spawn(task_client(id, name.clone(), endpoints.clone(), clock, until));
            id += 1;
        }
        clients.spawn(lifecycle_client(
            id,
            names.clone(),
            endpoints.clone(),
            seed ^ 0xa6e7_5eed,
            clock,
            until,
        ));
        AgentRun {
            names,
            endpoints,
            clients,
        }
    }

    /// Once the clients' time is up and the nemesis healed: joins the
    /// clients, reads the [`final_state`], writes `agents-history.jsonl`
    /// and `agents-final.json` under `out` and checks them.
    pub async fn finish(mut self, out: &Path) -> Result<AgentsSummary, AgentsError> {
        let mut ops = Vec::new();
        while let Some(done) = self.clients.join_next().await {
            ops.extend(done.map_err(|e| AgentsError::Read(format!("a client failed: {e}")))?);
        }
        ops.sort_by_key(|op: &AgentOp| (op.complete_us, op.invoke_us, op.client));
        let end = final_state(&self.endpoints, &self.names, SETTLE).await?;
        write_history(&out.join("agents-history.jsonl"), &ops)?;
        let json = serde_json::to_string_pretty(&end).map_err(|e| AgentsError::Read(e.to_string()))?;
        std::fs::write(out.join("agents-final.json"), json).map_err(|source| AgentsError::Io {
            what: "writing agents-final.json".into(),
            source,
        })?;
        let report = crate::checker::agents::check(&ops, &end);
        let count = |s: Status| ops.iter().filter(|op| op.status == s).count();
        Ok(AgentsSummary {
            ops: ops.len(),
            ok: count(Status::Ok),
            fail: count(Status::Fail),
            unknown: count(Status::Unknown),
            counts: report.counts,
            settle_ms: end.settle_ms,
            verdict: report.verdict,
            report: report.to_string(),
        })
    }
}

/// Writes `ops` to `path`, one JSON object per line.
pub fn write_history(path: &Path, ops: &[AgentOp]) -> Result<(), AgentsError> {
    let lines: Vec<String> = ops.iter().filter_map(|op| serde_json::to_string(op).ok()).collect();
    std::fs::write(path, lines.join("\n") + "\n").map_err(|source| AgentsError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// Reads a history written by [`write_history`].
pub fn read_history(path: &Path) -> Result<Vec<AgentOp>, AgentsError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentsError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| AgentsError::Io {
                what: format!("{}:{}", path.display(), i + 1),
                source: std::io::Error::other(e),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_and_a_final_state_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents-history.jsonl");
        let mut submit = AgentOp::new(1, AgentOpKind::Submit, "chaos-agent-0");
        submit.key = Some("chaos-agent-0/1".into());
        submit.input = Some(task_input("chaos-agent-0", 1));
        submit.task = Some(7);
        submit.status = Status::Unknown;
        let mut wait = AgentOp::new(1, AgentOpKind::Wait, "chaos-agent-0");
        wait.result = Some(TaskView {
            id: 7,
            agent: "chaos-agent-0".into(),
            input: "task-1".into(),
            key: "chaos-agent-0/1".into(),
            status: "succeeded".into(),
            output: echo_output("chaos-agent-0", 2, "task-1"),
            error: String::new(),
            incarnation: 2,
        });
        let ops = vec![submit, wait];
        write_history(&path, &ops).unwrap();
        assert_eq!(read_history(&path).unwrap(), ops);
        let state = FinalState {
            settled: true,
            ..FinalState::default()
        };
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<FinalState>(&json).unwrap(), state);
    }

    #[test]
    fn specs_are_exec_agents_and_one_inference_agent_with_a_model() {
        let names = agent_names(&AgentOptions {
            agents: 2,
            model: Some("m".into()),
        });
        assert_eq!(names, ["chaos-agent-0", "chaos-agent-1", MEMO_AGENT]);
        let info = v1::AgentInfo {
            spec: Some(spec(MEMO_AGENT)),
            desired: "running".into(),
            ..Default::default()
        };
        assert_eq!(agent_view(&info).kind, "inference");
        assert_eq!(
            agent_view(&v1::AgentInfo {
                spec: Some(spec("chaos-agent-0")),
                ..Default::default()
            })
            .kind,
            "exec"
        );
        assert!(task_input(MEMO_AGENT, 3).contains("\"key\":\"m-3\""));
    }
}
