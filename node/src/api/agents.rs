//! `cell0.v1.Agents` and `cell0.v1.Nodes`: submitting, listing, stopping and
//! moving agents, and the nodes' scheduling status.
//!
//! Writes are commands through Raft (the leader's clock stamps them); reads
//! are linearizable. A spec is checked field by field before it is proposed
//! (`InvalidArgument` naming the field, e.g. `spec.resources.cpu_millis`).
//! Placement is the leader scheduler's job (`crate::scheduling`): `Run`
//! returns once the agent is recorded, and `Get` shows where it went.

use cell0_consensus::agents::{
    self, AgentCommand, AgentKind, AgentOutcome, AgentRecord, AgentSpec, AllocStatus, Allocation, Constraints, Desired,
    DrainSpec, NodeState, Resources, RestartPolicy,
};
use std::pin::Pin;
use std::sync::Arc;

use cell0_consensus::{Consensus, ConsensusError, Consistency, Response as Applied, Table, nodes};
use cell0_proto::v1::agents_server::Agents;
use cell0_proto::v1::nodes_server::Nodes;
use cell0_proto::v1::{self, agent_spec::Kind};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::forward::{Caller, SiteRouter};
use super::kv::MAX_WATCHES;
use super::{ApiError, RequestGate, auth};
use crate::handoff::{self, Held};
use crate::scheduling::{self, now_ms};
use crate::supervisor::{Supervisor, stopped};

/// Most items one `List` page returns (agents, tasks, memory entries).
pub const MAX_LIST_PAGE: u32 = 1000;
/// Items a `List` page returns when the request names no limit.
const DEFAULT_LIST_PAGE: u32 = 100;
/// Longest drain deadline, in milliseconds (30 days).
pub const MAX_DRAIN_DEADLINE_MS: u64 = 30 * 24 * 3600 * 1000;

/// The longest reason a drain may give.
pub const MAX_DRAIN_REASON_BYTES: usize = 256;

/// The page size a request's `limit` asks for, checked.
pub(super) fn page_limit(limit: u32) -> Result<usize, ApiError> {
    match limit {
        0 => Ok(DEFAULT_LIST_PAGE as usize),
        n if n > MAX_LIST_PAGE => Err(ApiError::invalid(
            "limit",
            format!("is {n}; the limit is {MAX_LIST_PAGE}"),
        )),
        n => Ok(n as usize),
    }
}

/// A page read with one row beyond `limit`: at most `limit` rows, and
/// whether more follow.
pub(super) fn split_page<T>(mut rows: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// A validation error of the state crate, as the API answers it, its field
/// under `prefix`.
pub(crate) fn invalid(prefix: &str, e: cell0_state::StateError) -> ApiError {
    match e {
        cell0_state::StateError::InvalidArgument { field, reason } => {
            ApiError::invalid(&format!("{prefix}{field}"), reason)
        }
        other => ApiError::Consensus(ConsensusError::from(other)),
    }
}

/// The spec of a request, checked.
pub fn spec_from_proto(spec: Option<v1::AgentSpec>) -> Result<AgentSpec, ApiError> {
    let spec = spec.ok_or_else(|| ApiError::invalid("spec", "is missing"))?;
    let kind = match spec.kind {
        Some(Kind::Exec(c)) => AgentKind::Exec {
            command: c.command,
            timeout_ms: c.timeout_ms,
            max_output_bytes: c.max_output_bytes,
        },
        Some(Kind::Process(c)) => AgentKind::Process {
            command: c.command,
            grace_ms: c.grace_ms,
        },
        Some(Kind::Inference(_)) => AgentKind::Inference,
        None => return Err(ApiError::invalid("spec.kind", "is missing: exec, process or inference")),
    };
    let restart = match spec.restart.as_str() {
        "" | "always" => RestartPolicy::Always,
        "never" => RestartPolicy::Never,
        "on-failure" => RestartPolicy::OnFailure {
            max_restarts: spec.max_restarts,
        },
        other => {
            return Err(ApiError::invalid(
                "spec.restart",
                format!("is {other:?}; use never, on-failure or always"),
            ));
        }
    };
    let resources = spec.resources.unwrap_or_default();
    let constraints = spec.constraints.unwrap_or_default();
    let spec = AgentSpec {
        name: spec.name,
        kind,
        resources: Resources {
            cpu_millis: resources.cpu_millis,
            memory_mb: resources.memory_mb,
            gpu_memory_mb: resources.gpu_memory_mb,
        },
        constraints: Constraints {
            labels: constraints.labels.into_iter().collect(),
            gpu: constraints.gpu,
            model: constraints.model,
        },
        restart,
    };
    spec.validate().map_err(|e| invalid("spec.", e))?;
    Ok(spec)
}

/// The sites a request's spec may run in, checked.
pub fn sites_from_proto(spec: Option<&v1::AgentSpec>) -> Result<Vec<String>, ApiError> {
    let sites = spec.map(|s| s.sites.clone()).unwrap_or_default();
    agents::check_sites("spec.sites", &sites).map_err(|e| invalid("", e))?;
    Ok(sites)
}

/// `spec`, which may run in `sites`, as the API shows it.
pub fn spec_to_proto(spec: AgentSpec, sites: Vec<String>) -> v1::AgentSpec {
    let (restart, max_restarts) = match spec.restart {
        RestartPolicy::Never => ("never", 0),
        RestartPolicy::OnFailure { max_restarts } => ("on-failure", max_restarts),
        RestartPolicy::Always => ("always", 0),
    };
    let kind = match spec.kind {
        AgentKind::Exec {
            command,
            timeout_ms,
            max_output_bytes,
        } => Kind::Exec(v1::ExecConfig {
            command,
            timeout_ms,
            max_output_bytes,
        }),
        AgentKind::Process { command, grace_ms } => Kind::Process(v1::ProcessConfig { command, grace_ms }),
        AgentKind::Inference => Kind::Inference(v1::InferenceConfig {}),
    };
    v1::AgentSpec {
        name: spec.name,
        resources: Some(resources_to_proto(spec.resources)),
        constraints: Some(v1::AgentConstraints {
            labels: spec.constraints.labels.into_iter().collect(),
            gpu: spec.constraints.gpu,
            model: spec.constraints.model,
        }),
        restart: restart.into(),
        max_restarts,
        kind: Some(kind),
        sites,
    }
}

fn resources_to_proto(r: Resources) -> v1::AgentResources {
    v1::AgentResources {
        cpu_millis: r.cpu_millis,
        memory_mb: r.memory_mb,
        gpu_memory_mb: r.gpu_memory_mb,
    }
}

/// How the API names an allocation status.
pub fn status_name(status: AllocStatus) -> &'static str {
    match status {
        AllocStatus::Pending => "pending",
        AllocStatus::Running => "running",
        AllocStatus::Stopped => "stopped",
        AllocStatus::Failed => "failed",
        AllocStatus::Lost => "lost",
    }
}

/// How the API names a node state.
pub fn node_state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Ready => "ready",
        NodeState::Draining => "draining",
        NodeState::Ineligible => "ineligible",
        NodeState::Down => "down",
    }
}

fn allocation_to_proto(a: Allocation) -> v1::Allocation {
    v1::Allocation {
        node: a.node,
        incarnation: a.incarnation,
        status: status_name(a.status).into(),
        reason: a.reason,
        updated_at_ms: a.updated_at_ms,
    }
}

/// An agent as the replica records it: its record, allocation, sites and
/// handoff.
struct AgentRows {
    record: AgentRecord,
    allocation: Option<Allocation>,
    sites: Vec<String>,
    handoff: Option<v1::AgentHandoff>,
}

impl AgentRows {
    /// The rows of `name`, if it exists.
    fn read(txn: &dyn cell0_state::Txn, name: &str) -> cell0_state::Result<Option<AgentRows>> {
        agents::agent(txn, name)?.map(|r| Self::of(txn, r)).transpose()
    }

    /// The rows of the agent `record` is.
    fn of(txn: &dyn cell0_state::Txn, record: AgentRecord) -> cell0_state::Result<AgentRows> {
        let name = record.spec.name.clone();
        Ok(AgentRows {
            record,
            allocation: agents::allocation(txn, &name)?,
            sites: agents::sites_of(txn, &name)?,
            handoff: handoff::info(txn, &name)?,
        })
    }
}

fn agent_to_proto(rows: AgentRows) -> v1::AgentInfo {
    let AgentRows {
        record,
        allocation,
        sites,
        handoff,
    } = rows;
    v1::AgentInfo {
        handoff,
        desired: match record.desired {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
        .into(),
        generation: record.generation,
        allocation: allocation.map(allocation_to_proto),
        pending_reason: record.pending_reason,
        created_at_ms: record.created_at_ms,
        spec: Some(spec_to_proto(record.spec, sites)),
    }
}

/// Where calls about `name` go, as its handoffs between sites decide.
pub(crate) async fn held_by(consensus: &Consensus, name: &str) -> Result<Held, ApiError> {
    let lookup = name.to_string();
    Ok(consensus
        .read(Consistency::Linearizable, move |txn| handoff::held(txn, &lookup))
        .await?)
}

/// A read about an agent: served here, or by the site that owns it.
pub(crate) enum Served<T> {
    /// What the read returned here.
    Here(T),
    /// The site that owns the agent: send the call there.
    Elsewhere(String),
}

/// Runs `read` (linearizable) unless another site owns agent `name`, in
/// one point-in-time view.
pub(crate) async fn read_or_owner<T>(
    consensus: &Consensus,
    name: &str,
    read: impl FnOnce(&dyn cell0_state::Txn) -> cell0_state::Result<T>,
) -> Result<Served<T>, ApiError> {
    let lookup = name.to_string();
    Ok(consensus
        .read(Consistency::Linearizable, move |txn| {
            if let Some(site) = cell0_consensus::handoff::owner_elsewhere(txn, &lookup)? {
                return Ok(Served::Elsewhere(site));
            }
            Ok(Served::Here(read(txn)?))
        })
        .await?)
}

/// After `refusal` of a call about `name`: the site that owns the agent now
/// (send the call there), or why not now ([`ApiError::AgentMoving`]), or
/// the refusal itself when no handoff explains it.
pub(crate) async fn owner_after_refusal(
    consensus: &Consensus,
    name: &str,
    refusal: ApiError,
) -> Result<String, ApiError> {
    if !matches!(refusal, ApiError::AgentRefused(_)) {
        return Err(refusal);
    }
    match held_by(consensus, name).await? {
        Held::Elsewhere(site) => Ok(site),
        Held::Moving { site, why } => Err(ApiError::AgentMoving {
            agent: name.to_string(),
            site,
            why,
        }),
        Held::Here => Err(refusal),
    }
}

/// The outcome of an agent command, or the refusal it carries.
fn outcome(response: Applied) -> Result<AgentOutcome, ApiError> {
    match response {
        Applied::Agent(AgentOutcome::Refused(reason)) => Err(ApiError::AgentRefused(reason)),
        Applied::Agent(o) => Ok(o),
        Applied::Rejected(reason) => Err(ApiError::invalid("request", reason)),
        other => Err(ApiError::Internal(format!(
            "unexpected answer to an agent command: {other:?}"
        ))),
    }
}

fn generation(o: AgentOutcome) -> Result<u64, ApiError> {
    match o {
        AgentOutcome::Generation(g) => Ok(g),
        other => Err(ApiError::Internal(format!("unexpected agent outcome {other:?}"))),
    }
}

/// The Agents and Nodes services of one node.
#[derive(Clone)]
pub struct AgentsApi {
    consensus: Consensus,
    gate: RequestGate,
    router: SiteRouter,
    tasks: Supervisor,
    /// `Watch` streams open at once (at most [`MAX_WATCHES`]).
    watches: Arc<Semaphore>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::AgentInfo, Status>> + Send>>;

/// The agent named `name` as the API shows it, from the local replica.
async fn read_agent(consensus: &Consensus, name: &str, consistency: Consistency) -> Result<v1::AgentInfo, ApiError> {
    let lookup = name.to_string();
    let rows = consensus
        .read(consistency, move |txn| AgentRows::read(txn, &lookup))
        .await?
        .ok_or_else(|| ApiError::AgentNotFound { name: name.to_string() })?;
    Ok(agent_to_proto(rows))
}

impl AgentsApi {
    /// The services over `consensus`, within the node's request budget
    /// `gate`; watch streams run as transient tasks of `tasks`; calls about
    /// agents another site owns go there through `router`.
    pub fn new(consensus: Consensus, gate: RequestGate, tasks: Supervisor, router: SiteRouter) -> Self {
        Self {
            consensus,
            gate,
            router,
            tasks,
            watches: Arc::new(Semaphore::new(MAX_WATCHES)),
        }
    }

    async fn propose(&self, command: AgentCommand) -> Result<AgentOutcome, ApiError> {
        command.validate().map_err(|e| invalid("", e))?;
        outcome(self.consensus.propose(command.into_command()).await?)
    }

    /// Records the agent and, in the same log entry, its first placement
    /// where this replica's view has room for it
    /// ([`scheduling::first_plan`]).
    async fn run_agent(&self, spec: AgentSpec, sites: Vec<String>) -> Result<AgentOutcome, ApiError> {
        let at_ms = now_ms();
        let lookup = spec.clone();
        let run = AgentCommand::RunIn { spec, sites, at_ms };
        run.validate().map_err(|e| invalid("", e))?;
        let plan = self
            .consensus
            .read(Consistency::Serializable, move |txn| {
                scheduling::first_plan(txn, &lookup, cell0_scheduler::Options::default())
            })
            .await?;
        let Some(plan) = plan else {
            return outcome(self.consensus.propose(run.into_command()).await?);
        };
        let proposed = plan.placements.len();
        let batch = cell0_consensus::Command::Batch(vec![
            run.into_command(),
            AgentCommand::Plan { plan, at_ms }.into_command(),
        ]);
        // The run's answer; a refused placement leaves the evaluation to
        // the leader's scheduler.
        let answer = self.consensus.propose(batch).await?;
        if let Applied::Batch(answers) = &answer
            && let [run, plan] = answers.as_slice()
        {
            scheduling::count_plan(proposed, plan);
            return outcome(run.clone());
        }
        Err(ApiError::Internal(format!("unexpected answer to a run: {answer:?}")))
    }

    /// The other site that should take `Run` of agent `name` which may run
    /// in `sites` (None: this one): the site that owns the agent if it
    /// moved; else, for a new agent, the first of `sites` that is this
    /// node's own site or linked and alive. A call another site forwarded
    /// here (`hops` > 0) that names this site is served here.
    async fn site_to_run(&self, name: &str, sites: &[String], hops: u32) -> Result<Option<String>, ApiError> {
        let own = self.router.own_site().to_string();
        let lookup = name.to_string();
        let (held, exists) = self
            .consensus
            .read(Consistency::Linearizable, move |txn| {
                Ok((handoff::held(txn, &lookup)?, agents::agent(txn, &lookup)?.is_some()))
            })
            .await?;
        match held {
            Held::Elsewhere(site) => return Ok(Some(site)),
            Held::Moving { site, why } => {
                return Err(ApiError::AgentMoving {
                    agent: name.to_string(),
                    site,
                    why,
                });
            }
            Held::Here => {}
        }
        if sites.is_empty() || (sites.contains(&own) && (exists || hops > 0)) {
            return Ok(None);
        }
        if exists {
            return Err(ApiError::AgentRefused(format!(
                "agent {name:?} runs in this site ({own:?}), which its new sites {sites:?} do not include; \
                 move it first with `cell0 agent migrate {name} --to-site SITE`"
            )));
        }
        let alive: Vec<String> = self
            .router
            .federation()
            .map(|f| {
                f.sites()
                    .into_iter()
                    .filter(|v| v.status == cell0_federation::SiteStatus::Alive)
                    .map(|v| v.summary.site)
                    .collect()
            })
            .unwrap_or_default();
        for site in sites {
            if *site == own {
                return Ok(None);
            }
            if alive.contains(site) {
                return Ok(Some(site.clone()));
            }
        }
        Err(ApiError::SiteUnreachable {
            site: sites.join(","),
            why: "the spec's sites are neither this node's own site nor linked and alive here".into(),
        })
    }

    /// Aborts `req.name`'s handoff to another site, which must not have
    /// committed; the handoff's id.
    async fn cancel_handoff(&self, req: &v1::MigrateAgentRequest) -> Result<u64, ApiError> {
        if req.to_node != 0 || !req.to_site.is_empty() {
            return Err(ApiError::invalid(
                "cancel",
                "goes alone: leave to_node and to_site empty to cancel a handoff",
            ));
        }
        agents::check_name("name", &req.name).map_err(|e| invalid("", e))?;
        let name = req.name.clone();
        let (out, moved) = self
            .consensus
            .read(Consistency::Linearizable, move |txn| {
                Ok((
                    cell0_consensus::handoff::outgoing(txn, &name)?,
                    cell0_consensus::handoff::moved(txn, &name)?,
                ))
            })
            .await?;
        let Some(out) = out else {
            return Err(ApiError::AgentRefused(match moved {
                Some(m) => format!("agent {:?} moved to site {:?} already", req.name, m.site),
                None => format!("agent {:?} is not being moved to another site", req.name),
            }));
        };
        let abort = cell0_consensus::handoff::HandoffCommand::Abort {
            agent: req.name.clone(),
            id: out.id,
            reason: "cancelled by an operator".into(),
            at_ms: now_ms(),
        };
        match self.consensus.propose(abort.into_command()).await? {
            Applied::Handoff(cell0_consensus::handoff::HandoffOutcome::Done) => {
                tracing::info!(
                    agent = %req.name,
                    site = %out.to_site,
                    handoff = out.id,
                    trace_id = %auth::current_trace_id(),
                    "handoff cancelled"
                );
                Ok(out.id)
            }
            Applied::Handoff(cell0_consensus::handoff::HandoffOutcome::Refused(why)) => {
                Err(ApiError::AgentRefused(why))
            }
            other => Err(ApiError::Internal(format!("unexpected answer to a cancel: {other:?}"))),
        }
    }

    /// Begins handing `req.name` off to `req.to_site`; the handoff's id.
    async fn hand_off(&self, req: &v1::MigrateAgentRequest) -> Result<u64, ApiError> {
        let site = req.to_site.as_str();
        if req.to_node != 0 {
            return Err(ApiError::invalid(
                "to_node",
                "names a node of this site; leave it 0 with to_site (that site's scheduler places the agent)",
            ));
        }
        if site == self.router.own_site() {
            return Err(ApiError::invalid(
                "to_site",
                format!("{site:?} is this node's own site; move within a site with to_node"),
            ));
        }
        let Some(links) = self.router.federation() else {
            return Err(ApiError::SiteUnreachable {
                site: site.to_string(),
                why: "this node runs no site links (federation.enabled)".into(),
            });
        };
        match links.sites().into_iter().find(|v| v.summary.site == site) {
            Some(v) if v.status == cell0_federation::SiteStatus::Alive => {}
            Some(v) => {
                return Err(ApiError::SiteUnreachable {
                    site: site.to_string(),
                    why: format!("nothing heard from it for {:.1} s", v.last_heard.as_secs_f64()),
                });
            }
            None => {
                return Err(ApiError::invalid(
                    "to_site",
                    format!("{site:?} is not a site this one is linked to (cell0 site ls lists them)"),
                ));
            }
        }
        let begin = cell0_consensus::handoff::HandoffCommand::Begin {
            agent: req.name.clone(),
            to_site: site.to_string(),
            at_ms: now_ms(),
        };
        begin.validate().map_err(|e| invalid("", e))?;
        match self.consensus.propose(begin.into_command()).await? {
            Applied::Handoff(cell0_consensus::handoff::HandoffOutcome::Begun { id }) => {
                tracing::info!(
                    agent = %req.name,
                    %site,
                    handoff = id,
                    trace_id = %auth::current_trace_id(),
                    "handing an agent off to another site"
                );
                Ok(id)
            }
            Applied::Handoff(cell0_consensus::handoff::HandoffOutcome::Refused(why)) => {
                Err(ApiError::AgentRefused(why))
            }
            other => Err(ApiError::Internal(format!("unexpected answer to a handoff: {other:?}"))),
        }
    }

    async fn set_node_state(&self, node: u64, state: NodeState, reason: &str) -> Result<(), ApiError> {
        self.check_node(node).await?;
        self.propose(AgentCommand::SetNodeState {
            node,
            state,
            reason: reason.into(),
            at_ms: now_ms(),
        })
        .await?;
        Ok(())
    }

    /// Refuses a node id that is not a node of this cluster.
    async fn check_node(&self, node: u64) -> Result<(), ApiError> {
        let known = self
            .consensus
            .read(Consistency::Linearizable, move |txn| nodes::resources_of(txn, node))
            .await?;
        if node == 0 || known.is_none() {
            return Err(ApiError::invalid(
                "node",
                format!("{node:016x} is not a node of this cluster"),
            ));
        }
        Ok(())
    }

    async fn drain_node(&self, req: v1::DrainNodeRequest) -> Result<(), ApiError> {
        if req.max_parallel > agents::MAX_DRAIN_PARALLEL {
            return Err(ApiError::invalid(
                "max_parallel",
                format!("is {}; the limit is {}", req.max_parallel, agents::MAX_DRAIN_PARALLEL),
            ));
        }
        if req.deadline_ms > MAX_DRAIN_DEADLINE_MS {
            return Err(ApiError::invalid(
                "deadline_ms",
                format!("is {}; the limit is {MAX_DRAIN_DEADLINE_MS} (30 days)", req.deadline_ms),
            ));
        }
        if req.reason.len() > MAX_DRAIN_REASON_BYTES {
            return Err(ApiError::invalid(
                "reason",
                format!("is {} bytes; the limit is {MAX_DRAIN_REASON_BYTES}", req.reason.len()),
            ));
        }
        self.check_node(req.node).await?;
        let now = now_ms();
        let mut reason = req.reason;
        if reason.is_empty() {
            reason.push_str("drained by an operator");
            if req.max_parallel > 0 {
                reason.push_str(&format!(", {} at a time", req.max_parallel));
            }
            if req.deadline_ms > 0 {
                reason.push_str(&format!(", the rest after {} s", req.deadline_ms / 1000));
            }
        }
        self.propose(AgentCommand::Drain {
            node: req.node,
            drain: DrainSpec {
                max_parallel: req.max_parallel,
                deadline_ms: if req.deadline_ms == 0 { 0 } else { now + req.deadline_ms },
            },
            reason,
            at_ms: now,
        })
        .await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Agents for AgentsApi {
    async fn run(&self, request: Request<v1::RunAgentRequest>) -> Result<Response<v1::RunAgentResponse>, Status> {
        self.gate
            .observe("Agents/Run", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                let spec = spec_from_proto(req.spec.clone())?;
                let sites = sites_from_proto(req.spec.as_ref())?;
                let name = spec.name.clone();
                if let Some(site) = self.site_to_run(&name, &sites, caller.hops).await? {
                    return Ok(Response::new(
                        self.router.call(&site, "/cell0.v1.Agents/Run", &req, &caller).await?,
                    ));
                }
                match self.run_agent(spec, sites).await {
                    Ok(o) => Ok(Response::new(v1::RunAgentResponse {
                        generation: generation(o)?,
                    })),
                    Err(e) => {
                        let site = owner_after_refusal(&self.consensus, &name, e).await?;
                        Ok(Response::new(
                            self.router.call(&site, "/cell0.v1.Agents/Run", &req, &caller).await?,
                        ))
                    }
                }
            })
            .await
    }

    async fn get(&self, request: Request<v1::GetAgentRequest>) -> Result<Response<v1::AgentInfo>, Status> {
        self.gate
            .observe("Agents/Get", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                agents::check_name("name", &req.name).map_err(|e| invalid("", e))?;
                let lookup = req.name.clone();
                match read_or_owner(&self.consensus, &req.name, move |txn| AgentRows::read(txn, &lookup)).await? {
                    Served::Here(Some(rows)) => Ok(Response::new(agent_to_proto(rows))),
                    Served::Here(None) => Err(ApiError::AgentNotFound { name: req.name }),
                    Served::Elsewhere(site) => Ok(Response::new(
                        self.router.call(&site, "/cell0.v1.Agents/Get", &req, &caller).await?,
                    )),
                }
            })
            .await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<v1::WatchAgentRequest>) -> Result<Response<WatchStream>, Status> {
        self.gate
            .observe("Agents/Watch", async {
                let name = request.into_inner().name;
                agents::check_name("name", &name).map_err(|e| invalid("", e))?;
                let permit = self
                    .watches
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| ApiError::TooManyWatches)?;
                // Subscribe before the first read so no change falls between.
                let mut changes = self.consensus.watch_table(Table::Agents);
                let mut last = read_agent(&self.consensus, &name, Consistency::Linearizable).await?;
                let (tx, rx) = mpsc::channel(16);
                let consensus = self.consensus.clone();
                let mut stop = self.tasks.stop_signal();
                let started = self.tasks.spawn_transient("agent-watch", async move {
                    let _permit = permit;
                    if tx.send(Ok(last.clone())).await.is_err() {
                        return;
                    }
                    loop {
                        tokio::select! {
                            changed = changes.changed() => if changed.is_err() { return },
                            () = tx.closed() => return,
                            () = stopped(&mut stop) => {
                                let _ = tx.send(Err(Status::from(ApiError::ShuttingDown))).await;
                                return;
                            }
                        }
                        match read_agent(&consensus, &name, Consistency::Serializable).await {
                            Ok(now) if now == last => {}
                            Ok(now) => {
                                last = now;
                                if tx.send(Ok(last.clone())).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(Status::from(e))).await;
                                return;
                            }
                        }
                    }
                });
                if !started {
                    return Err(ApiError::ShuttingDown);
                }
                Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as WatchStream))
            })
            .await
    }

    async fn list(&self, request: Request<v1::ListAgentsRequest>) -> Result<Response<v1::ListAgentsResponse>, Status> {
        self.gate
            .observe("Agents/List", async {
                let req = request.into_inner();
                let limit = page_limit(req.limit)?;
                let after = req.start_after;
                let page = self
                    .consensus
                    .read(Consistency::Linearizable, move |txn| {
                        let records = agents::agents_after(txn, &after, limit + 1)?;
                        records.into_iter().map(|r| AgentRows::of(txn, r)).collect()
                    })
                    .await?;
                let (page, more) = split_page(page, limit);
                let agents = page.into_iter().map(agent_to_proto).collect();
                Ok(Response::new(v1::ListAgentsResponse { agents, more }))
            })
            .await
    }

    async fn stop(&self, request: Request<v1::StopAgentRequest>) -> Result<Response<v1::StopAgentResponse>, Status> {
        self.gate
            .observe("Agents/Stop", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                let stop = AgentCommand::Stop {
                    agent: req.name.clone(),
                    at_ms: now_ms(),
                };
                match self.propose(stop).await {
                    Ok(o) => Ok(Response::new(v1::StopAgentResponse {
                        generation: generation(o)?,
                    })),
                    Err(e) => {
                        let site = owner_after_refusal(&self.consensus, &req.name, e).await?;
                        Ok(Response::new(
                            self.router.call(&site, "/cell0.v1.Agents/Stop", &req, &caller).await?,
                        ))
                    }
                }
            })
            .await
    }

    async fn migrate(
        &self,
        request: Request<v1::MigrateAgentRequest>,
    ) -> Result<Response<v1::MigrateAgentResponse>, Status> {
        self.gate
            .observe("Agents/Migrate", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                if req.cancel {
                    let handoff_id = self.cancel_handoff(&req).await?;
                    return Ok(Response::new(v1::MigrateAgentResponse { handoff_id }));
                }
                if let Held::Elsewhere(site) = held_by(&self.consensus, &req.name).await? {
                    return Ok(Response::new(
                        self.router
                            .call(&site, "/cell0.v1.Agents/Migrate", &req, &caller)
                            .await?,
                    ));
                }
                let moved = if req.to_site.is_empty() {
                    self.propose(AgentCommand::Migrate {
                        agent: req.name.clone(),
                        to: req.to_node,
                    })
                    .await
                    .map(|_| 0)
                } else {
                    self.hand_off(&req).await
                };
                match moved {
                    Ok(handoff_id) => Ok(Response::new(v1::MigrateAgentResponse { handoff_id })),
                    Err(e) => {
                        let site = owner_after_refusal(&self.consensus, &req.name, e).await?;
                        Ok(Response::new(
                            self.router
                                .call(&site, "/cell0.v1.Agents/Migrate", &req, &caller)
                                .await?,
                        ))
                    }
                }
            })
            .await
    }
}

#[tonic::async_trait]
impl Nodes for AgentsApi {
    async fn list(&self, _request: Request<v1::ListNodesRequest>) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.gate
            .observe("Nodes/List", async {
                let nodes = self
                    .consensus
                    .read(Consistency::Linearizable, |txn| {
                        nodes::resources(txn)?
                            .into_iter()
                            .map(|(id, r)| {
                                let status = agents::node_status(txn, id)?;
                                let used = agents::node_usage(txn, id)?;
                                let count = agents::agents_on(txn, id, usize::MAX)?.len();
                                Ok(v1::NodeInfo {
                                    id,
                                    cpu_cores: r.cpu_cores,
                                    memory_mb: r.memory_bytes / (1024 * 1024),
                                    gpu: r.gpu,
                                    used: Some(resources_to_proto(used)),
                                    state: node_state_name(status.state).into(),
                                    reason: status.reason,
                                    agents: u32::try_from(count).unwrap_or(u32::MAX),
                                    labels: nodes::labels_of(txn, id)?.into_iter().collect(),
                                })
                            })
                            .collect::<cell0_state::Result<Vec<_>>>()
                    })
                    .await?;
                Ok(Response::new(v1::ListNodesResponse { nodes }))
            })
            .await
    }

    async fn drain(&self, request: Request<v1::DrainNodeRequest>) -> Result<Response<v1::DrainNodeResponse>, Status> {
        self.gate
            .observe("Nodes/Drain", async {
                self.drain_node(request.into_inner()).await?;
                Ok(Response::new(v1::DrainNodeResponse {}))
            })
            .await
    }

    async fn set_eligibility(
        &self,
        request: Request<v1::SetEligibilityRequest>,
    ) -> Result<Response<v1::SetEligibilityResponse>, Status> {
        self.gate
            .observe("Nodes/SetEligibility", async {
                let req = request.into_inner();
                let (state, reason) = if req.eligible {
                    (NodeState::Ready, "")
                } else {
                    (NodeState::Ineligible, "marked ineligible by an operator")
                };
                self.set_node_state(req.node, state, reason).await?;
                Ok(Response::new(v1::SetEligibilityResponse {}))
            })
            .await
    }
}
