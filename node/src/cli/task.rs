//! `cell0 task ...`: tasks for agents, and `cell0 task memory`: an agent's
//! memory.
//!
//! `task submit AGENT --input TEXT` (or `--input-file PATH`, `-` for stdin)
//! queues a task; `--key` makes a retry name the same task; `--wait`
//! waits for its result. Output is shown as text when it is UTF-8.

use std::time::Duration;

use anyhow::Context;
use cell0_proto::v1;
use cell0_proto::v1::tasks_client::TasksClient;
use clap::Subcommand;
use serde::Serialize;

use super::{Output, connect, connect_streaming, print_list, rpc_error};

/// Default `--timeout` of `task wait`, in seconds.
const DEFAULT_WAIT_SECS: u64 = 60;

/// Task commands.
#[derive(Subcommand)]
pub enum TaskCommand {
    /// Queue a task for an agent.
    Submit {
        /// The agent.
        agent: String,
        /// The input, as text.
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// Read the input from a file (`-`: stdin).
        #[arg(long)]
        input_file: Option<std::path::PathBuf>,
        /// Idempotency key: submitting it again names the same task.
        #[arg(long, default_value = "")]
        key: String,
        /// Wait for the result.
        #[arg(long)]
        wait: bool,
    },
    /// Show a task.
    Show {
        /// The task id.
        id: u64,
    },
    /// Wait until a task has its result.
    Wait {
        /// The task id.
        id: u64,
        /// Give up after this many seconds (at most 300).
        #[arg(long, default_value_t = DEFAULT_WAIT_SECS)]
        timeout: u64,
    },
    /// List an agent's tasks.
    Ls {
        /// The agent.
        agent: String,
    },
    /// Show an agent's memory.
    Memory {
        /// The agent.
        agent: String,
    },
}

/// A task, as people and scripts read it.
#[derive(Debug, Serialize)]
struct TaskView {
    id: u64,
    agent: String,
    status: String,
    incarnation: u64,
    idempotency_key: String,
    input: String,
    output: String,
    error: String,
}

fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("<{} bytes>", bytes.len()),
    }
}

impl From<v1::TaskInfo> for TaskView {
    fn from(t: v1::TaskInfo) -> Self {
        TaskView {
            id: t.id,
            agent: t.agent,
            status: t.status,
            incarnation: t.incarnation,
            idempotency_key: t.idempotency_key,
            input: text(&t.input),
            output: text(&t.output),
            error: t.error,
        }
    }
}

const TASK_HEADERS: [&str; 6] = ["ID", "AGENT", "STATUS", "INCARNATION", "OUTPUT", "ERROR"];

fn task_row(t: TaskView) -> Vec<String> {
    vec![
        t.id.to_string(),
        t.agent,
        t.status,
        t.incarnation.to_string(),
        t.output.trim_end().to_string(),
        t.error,
    ]
}

#[derive(Debug, Serialize)]
struct MemoryView {
    key: String,
    value: String,
    embedding_dims: u32,
    incarnation: u64,
}

fn memory_row(m: MemoryView) -> Vec<String> {
    vec![m.key, m.value, m.embedding_dims.to_string(), m.incarnation.to_string()]
}

fn read_input(input: Option<String>, file: Option<std::path::PathBuf>) -> anyhow::Result<Vec<u8>> {
    match (input, file) {
        (Some(text), _) => Ok(text.into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("cannot read stdin")?;
            Ok(buf)
        }
        (None, Some(path)) => std::fs::read(&path).with_context(|| format!("cannot read {}", path.display())),
        (None, None) => Ok(Vec::new()),
    }
}

async fn wait(endpoint: &str, id: u64, timeout_secs: u64) -> anyhow::Result<v1::TaskInfo> {
    let mut client = TasksClient::new(connect_streaming(endpoint).await?);
    let mut request = tonic::Request::new(v1::WaitTaskRequest {
        id,
        timeout_ms: timeout_secs.saturating_mul(1000),
    });
    request.set_timeout(Duration::from_secs(timeout_secs + 10));
    Ok(client.wait(request).await.map_err(rpc_error)?.into_inner())
}

/// Runs a task command against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: TaskCommand) -> anyhow::Result<()> {
    let mut client = TasksClient::new(connect(endpoint).await?);
    match cmd {
        TaskCommand::Submit {
            agent,
            input,
            input_file,
            key,
            wait: and_wait,
        } => {
            let input = read_input(input, input_file)?;
            let r = client
                .submit(v1::SubmitTaskRequest {
                    agent,
                    input: input.into(),
                    idempotency_key: key,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if and_wait {
                let t = wait(endpoint, r.id, DEFAULT_WAIT_SECS).await?;
                return print_list(output, vec![TaskView::from(t)], &TASK_HEADERS, task_row);
            }
            match output {
                Output::Json => super::print_json(&serde_json::json!({"id": r.id, "existing": r.existing})),
                Output::Table => {
                    let note = if r.existing {
                        " (submitted before with this key)"
                    } else {
                        ""
                    };
                    println!("task {}{note}", r.id);
                    Ok(())
                }
            }
        }
        TaskCommand::Show { id } => {
            let t = client
                .get(v1::GetTaskRequest { id })
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_list(output, vec![TaskView::from(t)], &TASK_HEADERS, task_row)
        }
        TaskCommand::Wait { id, timeout } => {
            if timeout > 300 {
                anyhow::bail!("--timeout is {timeout}; the longest wait is 300 seconds");
            }
            let t = wait(endpoint, id, timeout).await?;
            print_list(output, vec![TaskView::from(t)], &TASK_HEADERS, task_row)
        }
        TaskCommand::Ls { agent } => {
            let mut views = Vec::new();
            let mut after = 0;
            loop {
                let page = client
                    .list(v1::ListTasksRequest {
                        agent: agent.clone(),
                        start_after: after,
                        limit: 1000,
                    })
                    .await
                    .map_err(rpc_error)?
                    .into_inner();
                after = page.tasks.last().map_or(after, |t| t.id);
                views.extend(page.tasks.into_iter().map(TaskView::from));
                if !page.more {
                    break;
                }
            }
            print_list(output, views, &TASK_HEADERS, task_row)
        }
        TaskCommand::Memory { agent } => {
            let mut views = Vec::new();
            let mut after = String::new();
            loop {
                let page = client
                    .list_memory(v1::ListMemoryRequest {
                        agent: agent.clone(),
                        start_after: after.clone(),
                        limit: 1000,
                    })
                    .await
                    .map_err(rpc_error)?
                    .into_inner();
                after = page.entries.last().map_or(after, |e| e.key.clone());
                views.extend(page.entries.into_iter().map(|e| MemoryView {
                    key: e.key,
                    value: e.value,
                    embedding_dims: e.embedding_dims,
                    incarnation: e.incarnation,
                }));
                if !page.more {
                    break;
                }
            }
            print_list(output, views, &["KEY", "VALUE", "DIMS", "INCARNATION"], memory_row)
        }
    }
}
