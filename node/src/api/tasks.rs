//! `cell0.v1.Tasks`: submitting tasks to agents, reading and waiting for
//! their results, and reading agents' memory.
//!
//! Submit is a command through Raft (the leader's clock stamps it); reads
//! are linearizable. `Wait` reads once linearizably, then rereads the local
//! replica on every change to the task table until the result is there or
//! the timeout passes (it then answers the task as it stands, still
//! queued), so a result committed before the call is always seen.

use std::time::Duration;

use cell0_consensus::agents::check_name;
use cell0_consensus::tasks::{self, MemoryEntry, TaskCommand, TaskOutcome, TaskRecord, TaskStatus};
use cell0_consensus::{Consensus, Consistency, Response as Applied, Table, handoff};
use cell0_proto::v1;
use cell0_proto::v1::tasks_server::Tasks;
use tonic::{Request, Response, Status};

use super::agents::{Served, invalid, owner_after_refusal, page_limit, read_or_owner, split_page};
use super::forward::{Caller, SiteRouter};
use super::{ApiError, RequestGate};
use crate::scheduling::now_ms;

/// Longest `Wait`, in milliseconds.
pub const MAX_WAIT_MS: u64 = 300_000;
/// `Wait` without a timeout waits this long, in milliseconds.
const DEFAULT_WAIT_MS: u64 = 30_000;

/// How the API (and a handoff between sites) names a task status.
pub fn task_status_name(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Queued => "queued",
        TaskStatus::Succeeded => "succeeded",
        TaskStatus::Failed => "failed",
    }
}

/// A task of `site` as the API shows it.
pub fn task_to_proto(t: TaskRecord, site: &str) -> v1::TaskInfo {
    v1::TaskInfo {
        site: site.to_string(),
        id: t.id,
        agent: t.agent,
        input: t.input.into(),
        idempotency_key: t.idempotency_key,
        status: task_status_name(t.status).into(),
        output: t.output.into(),
        error: t.error,
        incarnation: t.incarnation,
        submitted_at_ms: t.submitted_at_ms,
        completed_at_ms: t.completed_at_ms,
    }
}

fn memory_to_proto(key: String, e: MemoryEntry) -> v1::MemoryEntry {
    v1::MemoryEntry {
        key,
        embedding_dims: u32::try_from(e.embedding.len() / 4).unwrap_or(u32::MAX),
        value: e.value,
        incarnation: e.incarnation,
        written_at_ms: e.written_at_ms,
    }
}

/// The Tasks service of one node.
#[derive(Clone)]
pub struct TasksApi {
    consensus: Consensus,
    gate: RequestGate,
    router: SiteRouter,
}

/// A task as this site knows it: here, or moved with its agent to another
/// site under another id.
enum Found {
    Here(TaskRecord),
    Moved(handoff::MovedTask),
}

impl TasksApi {
    /// The service over `consensus`, within the node's request budget
    /// `gate`; calls about agents (and tasks) another site owns go there
    /// through `router`.
    pub fn new(consensus: Consensus, gate: RequestGate, router: SiteRouter) -> Self {
        Self {
            consensus,
            gate,
            router,
        }
    }

    /// Task `id`, or where it went (linearizable).
    async fn find(&self, id: u64) -> Result<Found, ApiError> {
        self.find_at(id, Consistency::Linearizable).await
    }

    /// [`TasksApi::find`] from the local replica.
    async fn find_local(&self, id: u64) -> Result<Found, ApiError> {
        self.find_at(id, Consistency::Serializable).await
    }

    async fn find_at(&self, id: u64, consistency: Consistency) -> Result<Found, ApiError> {
        let (moved, task) = self
            .consensus
            .read(consistency, move |txn| {
                Ok((handoff::moved_task(txn, id)?, tasks::task(txn, id)?))
            })
            .await?;
        match (moved, task) {
            (Some(m), _) => Ok(Found::Moved(m)),
            (None, Some(t)) => Ok(Found::Here(t)),
            (None, None) => Err(ApiError::TaskNotFound { id }),
        }
    }
}

#[tonic::async_trait]
impl Tasks for TasksApi {
    async fn submit(
        &self,
        request: Request<v1::SubmitTaskRequest>,
    ) -> Result<Response<v1::SubmitTaskResponse>, Status> {
        self.gate
            .observe("Tasks/Submit", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                let command = TaskCommand::Submit {
                    agent: req.agent.clone(),
                    input: req.input.to_vec(),
                    idempotency_key: req.idempotency_key.clone(),
                    at_ms: now_ms(),
                };
                command.validate().map_err(|e| invalid("", e))?;
                match self.consensus.propose(command.into_command()).await? {
                    Applied::Task(TaskOutcome::Submitted { id, existing }) => {
                        Ok(Response::new(v1::SubmitTaskResponse {
                            id,
                            existing,
                            site: self.router.own_site().to_string(),
                        }))
                    }
                    Applied::Task(TaskOutcome::Refused(reason)) => {
                        let site =
                            owner_after_refusal(&self.consensus, &req.agent, ApiError::AgentRefused(reason)).await?;
                        Ok(Response::new(
                            self.router.call(&site, "/cell0.v1.Tasks/Submit", &req, &caller).await?,
                        ))
                    }
                    Applied::Rejected(reason) => Err(ApiError::invalid("request", reason)),
                    other => Err(ApiError::Internal(format!(
                        "unexpected answer to a task submit: {other:?}"
                    ))),
                }
            })
            .await
    }

    async fn get(&self, request: Request<v1::GetTaskRequest>) -> Result<Response<v1::TaskInfo>, Status> {
        self.gate
            .observe("Tasks/Get", async {
                let caller = Caller::of(request.metadata());
                match self.find(request.into_inner().id).await? {
                    Found::Here(t) => Ok(Response::new(task_to_proto(t, self.router.own_site()))),
                    Found::Moved(m) => Ok(Response::new(
                        self.router
                            .call(
                                &m.site,
                                "/cell0.v1.Tasks/Get",
                                &v1::GetTaskRequest { id: m.id },
                                &caller,
                            )
                            .await?,
                    )),
                }
            })
            .await
    }

    async fn wait(&self, request: Request<v1::WaitTaskRequest>) -> Result<Response<v1::TaskInfo>, Status> {
        let caller = Caller::of(request.metadata());
        let req = request.into_inner();
        let timeout = match req.timeout_ms {
            0 => DEFAULT_WAIT_MS,
            n if n > MAX_WAIT_MS => {
                return Err(ApiError::invalid("timeout_ms", format!("is {n}; the limit is {MAX_WAIT_MS}")).into());
            }
            n => n,
        };
        // Not counted in the request budget: a wait holds no resources
        // while it sleeps.
        let mut changes = self.consensus.watch_table(Table::Tasks);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
        let mut found = self.find(req.id).await?;
        loop {
            match found {
                Found::Here(task) if task.status == TaskStatus::Queued => {
                    tokio::select! {
                        Ok(()) = changes.changed() => {}
                        () = tokio::time::sleep_until(deadline) => {
                            return Ok(Response::new(task_to_proto(task, self.router.own_site())));
                        }
                    }
                    // The task may have moved with its agent meanwhile.
                    found = self.find_local(req.id).await?;
                }
                Found::Here(task) => return Ok(Response::new(task_to_proto(task, self.router.own_site()))),
                Found::Moved(m) => {
                    // What is left of the wait, at the site that has the task.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let caller = Caller {
                        timeout: caller.timeout.or(Some(left + Duration::from_secs(5))),
                        ..caller
                    };
                    let moved = v1::WaitTaskRequest {
                        id: m.id,
                        timeout_ms: u64::try_from(left.as_millis()).unwrap_or(MAX_WAIT_MS).max(1),
                    };
                    return Ok(Response::new(
                        self.router
                            .call(&m.site, "/cell0.v1.Tasks/Wait", &moved, &caller)
                            .await?,
                    ));
                }
            }
        }
    }

    async fn list(&self, request: Request<v1::ListTasksRequest>) -> Result<Response<v1::ListTasksResponse>, Status> {
        self.gate
            .observe("Tasks/List", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                check_name("agent", &req.agent).map_err(|e| invalid("", e))?;
                let limit = page_limit(req.limit)?;
                let (agent, after) = (req.agent.clone(), req.start_after);
                let read = read_or_owner(&self.consensus, &req.agent, move |txn| {
                    tasks::tasks_of(txn, &agent, after, limit + 1)
                });
                let rows = match read.await? {
                    Served::Here(rows) => rows,
                    Served::Elsewhere(site) => {
                        return Ok(Response::new(
                            self.router.call(&site, "/cell0.v1.Tasks/List", &req, &caller).await?,
                        ));
                    }
                };
                let (page, more) = split_page(rows, limit);
                Ok(Response::new(v1::ListTasksResponse {
                    tasks: page
                        .into_iter()
                        .map(|t| task_to_proto(t, self.router.own_site()))
                        .collect(),
                    more,
                }))
            })
            .await
    }

    async fn list_memory(
        &self,
        request: Request<v1::ListMemoryRequest>,
    ) -> Result<Response<v1::ListMemoryResponse>, Status> {
        self.gate
            .observe("Tasks/ListMemory", async {
                let caller = Caller::of(request.metadata());
                let req = request.into_inner();
                check_name("agent", &req.agent).map_err(|e| invalid("", e))?;
                let limit = page_limit(req.limit)?;
                let (agent, after) = (req.agent.clone(), req.start_after.clone());
                let read = read_or_owner(&self.consensus, &req.agent, move |txn| {
                    tasks::memory_list(txn, &agent, &after, limit + 1)
                });
                let rows = match read.await? {
                    Served::Here(rows) => rows,
                    Served::Elsewhere(site) => {
                        return Ok(Response::new(
                            self.router
                                .call(&site, "/cell0.v1.Tasks/ListMemory", &req, &caller)
                                .await?,
                        ));
                    }
                };
                let (page, more) = split_page(rows, limit);
                Ok(Response::new(v1::ListMemoryResponse {
                    entries: page.into_iter().map(|(k, e)| memory_to_proto(k, e)).collect(),
                    more,
                }))
            })
            .await
    }
}
