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
use cell0_consensus::{Consensus, Consistency, Response as Applied, Table};
use cell0_proto::v1;
use cell0_proto::v1::tasks_server::Tasks;
use tonic::{Request, Response, Status};

use super::agents::{invalid, page_limit, split_page};
use super::{ApiError, RequestGate};
use crate::scheduling::now_ms;

/// Longest `Wait`, in milliseconds.
pub const MAX_WAIT_MS: u64 = 300_000;
/// `Wait` without a timeout waits this long, in milliseconds.
const DEFAULT_WAIT_MS: u64 = 30_000;

/// A task as the API shows it.
pub fn task_to_proto(t: TaskRecord) -> v1::TaskInfo {
    v1::TaskInfo {
        id: t.id,
        agent: t.agent,
        input: t.input.into(),
        idempotency_key: t.idempotency_key,
        status: match t.status {
            TaskStatus::Queued => "queued",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
        }
        .into(),
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
}

impl TasksApi {
    /// The service over `consensus`, within the node's request budget `gate`.
    pub fn new(consensus: Consensus, gate: RequestGate) -> Self {
        Self { consensus, gate }
    }

    async fn task(&self, id: u64, consistency: Consistency) -> Result<TaskRecord, ApiError> {
        self.consensus
            .read(consistency, move |txn| tasks::task(txn, id))
            .await?
            .ok_or(ApiError::TaskNotFound { id })
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
                let req = request.into_inner();
                let command = TaskCommand::Submit {
                    agent: req.agent,
                    input: req.input.to_vec(),
                    idempotency_key: req.idempotency_key,
                    at_ms: now_ms(),
                };
                command.validate().map_err(|e| invalid("", e))?;
                match self.consensus.propose(command.into_command()).await? {
                    Applied::Task(TaskOutcome::Submitted { id, existing }) => {
                        Ok(Response::new(v1::SubmitTaskResponse { id, existing }))
                    }
                    Applied::Task(TaskOutcome::Refused(reason)) => Err(ApiError::AgentRefused(reason)),
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
                let id = request.into_inner().id;
                Ok(Response::new(task_to_proto(
                    self.task(id, Consistency::Linearizable).await?,
                )))
            })
            .await
    }

    async fn wait(&self, request: Request<v1::WaitTaskRequest>) -> Result<Response<v1::TaskInfo>, Status> {
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
        let mut task = self.task(req.id, Consistency::Linearizable).await?;
        while task.status == TaskStatus::Queued {
            tokio::select! {
                Ok(()) = changes.changed() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
            task = self.task(req.id, Consistency::Serializable).await?;
        }
        Ok(Response::new(task_to_proto(task)))
    }

    async fn list(&self, request: Request<v1::ListTasksRequest>) -> Result<Response<v1::ListTasksResponse>, Status> {
        self.gate
            .observe("Tasks/List", async {
                let req = request.into_inner();
                check_name("agent", &req.agent).map_err(|e| invalid("", e))?;
                let limit = page_limit(req.limit)?;
                let (agent, after) = (req.agent, req.start_after);
                let rows = self
                    .consensus
                    .read(Consistency::Linearizable, move |txn| {
                        tasks::tasks_of(txn, &agent, after, limit + 1)
                    })
                    .await?;
                let (page, more) = split_page(rows, limit);
                Ok(Response::new(v1::ListTasksResponse {
                    tasks: page.into_iter().map(task_to_proto).collect(),
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
                let req = request.into_inner();
                check_name("agent", &req.agent).map_err(|e| invalid("", e))?;
                let limit = page_limit(req.limit)?;
                let (agent, after) = (req.agent, req.start_after);
                let rows = self
                    .consensus
                    .read(Consistency::Linearizable, move |txn| {
                        tasks::memory_list(txn, &agent, &after, limit + 1)
                    })
                    .await?;
                let (page, more) = split_page(rows, limit);
                Ok(Response::new(v1::ListMemoryResponse {
                    entries: page.into_iter().map(|(k, e)| memory_to_proto(k, e)).collect(),
                    more,
                }))
            })
            .await
    }
}
