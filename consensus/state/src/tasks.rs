//! Agents' tasks (inboxes and results) and their replicated memory.
//!
//! Tables (in the state column family), every row versioned:
//! - `tasks`: task id (big-endian) -> [`TaskRecord`] (input, idempotency
//!   key, status, result, the incarnation whose result counted);
//! - `task_keys`: agent ++ 0 ++ idempotency key -> task id, so the same key
//!   submitted again names the same task;
//! - `inbox`: agent ++ 0 ++ task id -> empty, the agent's tasks without a
//!   result, in submission order (what a running incarnation works on);
//! - `agent_tasks`: agent ++ 0 ++ task id -> empty, all of an agent's tasks;
//! - `task_counts`: agent -> [`Counts`] (tasks queued, memory entries);
//! - `memory`: agent ++ 0 ++ key -> [`MemoryEntry`];
//! - `task_meta`: `next_id` -> the last task id issued.
//!
//! Invariants (every apply keeps them; the tests check them):
//! - A task's result is committed exactly once: [`TaskCommand::Complete`]
//!   is accepted only for a queued task and only from the agent's current
//!   incarnation while its allocation holds resources; a task may run more
//!   than once (a move, a crash), its result counts once.
//! - Memory changes travel with a task's result and are fenced the same
//!   way: a write from an older incarnation never lands.
//! - `inbox` lists exactly the queued tasks; `task_counts` matches `inbox`
//!   and `memory`.
//! - Limits: [`MAX_TASK_INPUT_BYTES`], [`MAX_IDEMPOTENCY_KEY_BYTES`],
//!   [`MAX_QUEUED_TASKS`] per agent, [`MAX_MEMORY_KEY_BYTES`],
//!   [`MAX_MEMORY_VALUE_BYTES`], [`MAX_MEMORY_ENTRIES`] per agent,
//!   [`MAX_EMBEDDING_DIMS`]. Results are kept (there is no expiry yet).

use serde::{Deserialize, Serialize};

use crate::agents::{self, AgentKind, Desired, MAX_TASK_OUTPUT_BYTES, check_name};
use crate::codec::{decode_row, get_row, put_row};
use crate::error::{Result, StateError};
use crate::txn::{Txn, prefix_end};

const TASKS_TABLE: &str = "tasks";
const TASK_KEYS_TABLE: &str = "task_keys";
const INBOX_TABLE: &str = "inbox";
const AGENT_TASKS_TABLE: &str = "agent_tasks";
const COUNTS_TABLE: &str = "task_counts";
const MEMORY_TABLE: &str = "memory";
const META_TABLE: &str = "task_meta";
const NEXT_ID_KEY: &[u8] = b"next_id";

/// Largest task input, in bytes.
pub const MAX_TASK_INPUT_BYTES: usize = 64 * 1024;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Most tasks an agent may have queued (without a result).
pub const MAX_QUEUED_TASKS: u64 = 10_000;
/// Longest memory key, in bytes.
pub const MAX_MEMORY_KEY_BYTES: usize = 256;
/// Largest memory value (the text), in bytes.
pub const MAX_MEMORY_VALUE_BYTES: usize = 16 * 1024;
/// Most memory entries per agent.
pub const MAX_MEMORY_ENTRIES: u64 = 10_000;
/// Most dimensions of a stored embedding.
pub const MAX_EMBEDDING_DIMS: usize = 4096;
/// Most memory changes one task result may carry.
pub const MAX_MEMORY_CHANGES: usize = 64;
/// Longest error a failed task may carry, in bytes.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Waiting for a result.
    Queued,
    /// Done, with output.
    Succeeded,
    /// Done, with an error.
    Failed,
}

/// A task as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Cluster-wide id, issued in submission order.
    pub id: u64,
    /// The agent it is for.
    pub agent: String,
    /// Its input.
    pub input: Vec<u8>,
    /// The submitter's idempotency key (empty: none).
    pub idempotency_key: String,
    /// Where it stands.
    pub status: TaskStatus,
    /// The output, once succeeded.
    pub output: Vec<u8>,
    /// The error, once failed.
    pub error: String,
    /// The incarnation whose result counted (0 while queued).
    pub incarnation: u64,
    /// When it was submitted (proposing leader's clock, ms).
    pub submitted_at_ms: u64,
    /// When its result was committed (0 while queued).
    pub completed_at_ms: u64,
}

crate::row_v1!(TaskRecord, "task");

/// Per-agent counts kept in step with the tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Tasks queued.
    pub queued: u64,
    /// Memory entries.
    pub memory_entries: u64,
}

crate::row_v1!(Counts, "task counts");

/// One entry of an agent's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEntry {
    /// The stored text.
    pub value: String,
    /// Its embedding as little-endian f32s (empty when it has none).
    pub embedding: Vec<u8>,
    /// The incarnation that wrote it.
    pub incarnation: u64,
    /// When (proposing leader's clock, ms).
    pub written_at_ms: u64,
}

crate::row_v1!(MemoryEntry, "memory entry");

impl MemoryEntry {
    /// The embedding as floats.
    pub fn embedding(&self) -> Vec<f32> {
        decode_embedding(&self.embedding)
    }
}

/// `v` as the little-endian bytes a memory entry stores.
pub fn encode_embedding(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The floats of a stored embedding.
pub fn decode_embedding(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A change to an agent's memory. Frozen-variant rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryChange {
    /// Sets `key`.
    Put {
        /// The key.
        key: String,
        /// The text.
        value: String,
        /// Its embedding, little-endian f32s (may be empty).
        embedding: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// A task's result as a runtime reports it. Frozen-variant rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskResult {
    /// It succeeded with this output.
    Succeeded {
        /// At most [`MAX_TASK_OUTPUT_BYTES`].
        output: Vec<u8>,
    },
    /// It failed.
    Failed {
        /// Why, for people.
        error: String,
    },
}

/// A change to tasks or memory, carried in [`crate::Command`].
/// Frozen-variant rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskCommand {
    /// Queues a task for an agent; with an idempotency key already used for
    /// that agent, names the existing task instead.
    Submit {
        /// The agent.
        agent: String,
        /// The input.
        input: Vec<u8>,
        /// Empty for none.
        idempotency_key: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// A runtime's result for a task, with the memory changes it made;
    /// refused unless from the agent's current incarnation and the task
    /// is still queued.
    Complete {
        /// The agent.
        agent: String,
        /// The task.
        task: u64,
        /// The incarnation that ran it.
        incarnation: u64,
        /// The result.
        result: TaskResult,
        /// Memory changes, applied with the result or not at all.
        memory: Vec<MemoryChange>,
        /// The proposing leader's clock.
        at_ms: u64,
    },
}

/// What a [`TaskCommand`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    /// The task's id; `existing` when the idempotency key named one already.
    Submitted {
        /// The task.
        id: u64,
        /// Whether it was submitted before.
        existing: bool,
    },
    /// The result was committed.
    Completed,
    /// Refused, with the reason (unknown agent, full inbox, stale
    /// incarnation, a result already committed).
    Refused(String),
}

fn check_len(field: &str, len: usize, limit: usize) -> Result<()> {
    if len > limit {
        return Err(StateError::too_long(field, len, limit));
    }
    Ok(())
}

/// Checks a memory key; the error names `field`.
pub fn check_memory_key(field: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StateError::invalid(field, "must not be empty"));
    }
    check_len(field, key.len(), MAX_MEMORY_KEY_BYTES)
}

impl TaskCommand {
    /// The command carrying this change.
    pub fn into_command(self) -> crate::Command {
        crate::Command::Task(self)
    }

    /// Approximate encoded size, for batching decisions.
    pub fn approx_size(&self) -> usize {
        match self {
            TaskCommand::Submit {
                agent,
                input,
                idempotency_key,
                ..
            } => agent.len() + input.len() + idempotency_key.len() + 24,
            TaskCommand::Complete {
                agent, result, memory, ..
            } => {
                let result = match result {
                    TaskResult::Succeeded { output } => output.len(),
                    TaskResult::Failed { error } => error.len(),
                };
                let memory: usize = memory
                    .iter()
                    .map(|m| match m {
                        MemoryChange::Put { key, value, embedding } => key.len() + value.len() + embedding.len() + 8,
                        MemoryChange::Delete { key } => key.len() + 4,
                    })
                    .sum();
                agent.len() + result + memory + 32
            }
        }
    }

    /// Checks sizes and fields before proposing; the error names the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            TaskCommand::Submit {
                agent,
                input,
                idempotency_key,
                ..
            } => {
                check_name("agent", agent)?;
                check_len("input", input.len(), MAX_TASK_INPUT_BYTES)?;
                check_len("idempotency_key", idempotency_key.len(), MAX_IDEMPOTENCY_KEY_BYTES)
            }
            TaskCommand::Complete {
                agent, result, memory, ..
            } => {
                check_name("agent", agent)?;
                match result {
                    TaskResult::Succeeded { output } => {
                        check_len("result.output", output.len(), MAX_TASK_OUTPUT_BYTES as usize)?;
                    }
                    TaskResult::Failed { error } => check_len("result.error", error.len(), MAX_ERROR_BYTES)?,
                }
                if memory.len() > MAX_MEMORY_CHANGES {
                    return Err(StateError::invalid(
                        "memory",
                        format!("has {} changes; the limit is {MAX_MEMORY_CHANGES}", memory.len()),
                    ));
                }
                for (i, change) in memory.iter().enumerate() {
                    match change {
                        MemoryChange::Put { key, value, embedding } => {
                            check_memory_key(&format!("memory[{i}].key"), key)?;
                            check_len(&format!("memory[{i}].value"), value.len(), MAX_MEMORY_VALUE_BYTES)?;
                            if embedding.len() % 4 != 0 || embedding.len() / 4 > MAX_EMBEDDING_DIMS {
                                return Err(StateError::invalid(
                                    &format!("memory[{i}].embedding"),
                                    format!("must be at most {MAX_EMBEDDING_DIMS} little-endian f32s"),
                                ));
                            }
                        }
                        MemoryChange::Delete { key } => check_memory_key(&format!("memory[{i}].key"), key)?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// `agent` ++ 0 ++ `suffix`: the key layout of every per-agent table.
pub(crate) fn agent_key(agent: &str, suffix: &[u8]) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(suffix);
    key
}

/// The prefix of `agent`'s rows in a per-agent table.
pub(crate) fn agent_prefix(agent: &str) -> Vec<u8> {
    agent_key(agent, &[])
}

fn id_of(bytes: &[u8]) -> Result<u64> {
    crate::codec::be_u64("task id", bytes)
}

/// The task with `id`.
pub fn task(txn: &dyn Txn, id: u64) -> Result<Option<TaskRecord>> {
    get_row(txn, TASKS_TABLE, &id.to_be_bytes())
}

/// The counts of `agent`.
pub fn counts(txn: &dyn Txn, agent: &str) -> Result<Counts> {
    Ok(get_row(txn, COUNTS_TABLE, agent.as_bytes())?.unwrap_or_default())
}

fn task_ids(txn: &dyn Txn, table: &str, agent: &str, after: u64, limit: usize) -> Result<Vec<TaskRecord>> {
    let prefix = agent_prefix(agent);
    let start = agent_key(agent, &after.saturating_add(1).to_be_bytes());
    let end = prefix_end(&prefix);
    let mut out = Vec::new();
    for (key, _) in txn.scan(table, &start, end.as_deref(), limit)? {
        let id = id_of(&key[prefix.len()..])?;
        if let Some(t) = task(txn, id)? {
            out.push(t);
        }
    }
    Ok(out)
}

/// Up to `limit` of `agent`'s queued tasks with ids after `after`, oldest
/// first.
pub fn inbox(txn: &dyn Txn, agent: &str, after: u64, limit: usize) -> Result<Vec<TaskRecord>> {
    task_ids(txn, INBOX_TABLE, agent, after, limit)
}

/// Up to `limit` of `agent`'s tasks with ids after `after`, oldest first.
pub fn tasks_of(txn: &dyn Txn, agent: &str, after: u64, limit: usize) -> Result<Vec<TaskRecord>> {
    task_ids(txn, AGENT_TASKS_TABLE, agent, after, limit)
}

/// The memory entry `key` of `agent`.
pub fn memory_get(txn: &dyn Txn, agent: &str, key: &str) -> Result<Option<MemoryEntry>> {
    get_row(txn, MEMORY_TABLE, &agent_key(agent, key.as_bytes()))
}

/// Up to `limit` of `agent`'s memory entries with keys after `after`, in key
/// order.
pub fn memory_list(txn: &dyn Txn, agent: &str, after: &str, limit: usize) -> Result<Vec<(String, MemoryEntry)>> {
    let prefix = agent_prefix(agent);
    let mut start = agent_key(agent, after.as_bytes());
    if !after.is_empty() {
        start.push(0);
    }
    let end = prefix_end(&prefix);
    txn.scan(MEMORY_TABLE, &start, end.as_deref(), limit)?
        .into_iter()
        .map(|(k, v)| {
            let key = String::from_utf8(k[prefix.len()..].to_vec()).map_err(|e| StateError::Corrupt {
                what: "memory key",
                detail: e.to_string(),
            })?;
            Ok((key, decode_row(&v)?))
        })
        .collect()
}

/// Applies a validated task command.
pub(crate) fn apply(txn: &mut dyn Txn, cmd: &TaskCommand) -> Result<TaskOutcome> {
    match cmd {
        TaskCommand::Submit {
            agent,
            input,
            idempotency_key,
            at_ms,
        } => submit(txn, agent, input, idempotency_key, *at_ms),
        TaskCommand::Complete {
            agent,
            task: id,
            incarnation,
            result,
            memory,
            at_ms,
        } => complete(txn, agent, *id, *incarnation, result, memory, *at_ms),
    }
}

fn submit(txn: &mut dyn Txn, agent: &str, input: &[u8], idempotency_key: &str, at_ms: u64) -> Result<TaskOutcome> {
    if let Some(why) = crate::handoff::frozen(txn, agent)? {
        return Ok(TaskOutcome::Refused(why));
    }
    let key_row = agent_key(agent, idempotency_key.as_bytes());
    if !idempotency_key.is_empty()
        && let Some(id) = txn.get(TASK_KEYS_TABLE, &key_row)?
    {
        return Ok(TaskOutcome::Submitted {
            id: id_of(&id)?,
            existing: true,
        });
    }
    let Some(record) = agents::agent(txn, agent)? else {
        return Ok(TaskOutcome::Refused(format!("no agent named {agent:?}")));
    };
    if record.desired != Desired::Running {
        return Ok(TaskOutcome::Refused(format!("agent {agent:?} is stopped")));
    }
    if let AgentKind::Process { .. } = record.spec.kind {
        return Ok(TaskOutcome::Refused(format!(
            "agent {agent:?} is a process agent, which takes no tasks"
        )));
    }
    let mut counts = counts(txn, agent)?;
    if counts.queued >= MAX_QUEUED_TASKS {
        return Ok(TaskOutcome::Refused(format!(
            "agent {agent:?} has {MAX_QUEUED_TASKS} tasks queued, the limit"
        )));
    }
    let id = next_task_id(txn)?;
    let task = TaskRecord {
        id,
        agent: agent.to_string(),
        input: input.to_vec(),
        idempotency_key: idempotency_key.to_string(),
        status: TaskStatus::Queued,
        output: Vec::new(),
        error: String::new(),
        incarnation: 0,
        submitted_at_ms: at_ms,
        completed_at_ms: 0,
    };
    put_row(txn, TASKS_TABLE, &id.to_be_bytes(), &task)?;
    txn.put(INBOX_TABLE, &agent_key(agent, &id.to_be_bytes()), Vec::new())?;
    txn.put(AGENT_TASKS_TABLE, &agent_key(agent, &id.to_be_bytes()), Vec::new())?;
    if !idempotency_key.is_empty() {
        txn.put(TASK_KEYS_TABLE, &key_row, id.to_be_bytes().to_vec())?;
    }
    counts.queued += 1;
    put_row(txn, COUNTS_TABLE, agent.as_bytes(), &counts)?;
    Ok(TaskOutcome::Submitted { id, existing: false })
}

fn complete(
    txn: &mut dyn Txn,
    agent: &str,
    id: u64,
    incarnation: u64,
    result: &TaskResult,
    memory: &[MemoryChange],
    at_ms: u64,
) -> Result<TaskOutcome> {
    let Some(mut task) = task(txn, id)? else {
        return Ok(TaskOutcome::Refused(format!("no task {id}")));
    };
    if task.agent != agent {
        return Ok(TaskOutcome::Refused(format!("task {id} is not for agent {agent:?}")));
    }
    if task.status != TaskStatus::Queued {
        return Ok(TaskOutcome::Refused(format!(
            "task {id} already has its result (from incarnation {})",
            task.incarnation
        )));
    }
    let current = agents::allocation(txn, agent)?;
    if !current
        .as_ref()
        .is_some_and(|a| a.incarnation == incarnation && a.status.holds_resources())
    {
        let now = current.map_or(0, |a| a.incarnation);
        if now == incarnation {
            return Ok(TaskOutcome::Refused(format!(
                "incarnation {incarnation} of agent {agent:?} has ended"
            )));
        }
        return Ok(TaskOutcome::Refused(format!(
            "incarnation {incarnation} of agent {agent:?} is not current (the current one is {now})"
        )));
    }
    let mut counts = counts(txn, agent)?;
    let mut result = result.clone();
    if let Err(error) = apply_memory(txn, agent, incarnation, memory, at_ms, &mut counts)? {
        result = TaskResult::Failed { error };
    }
    match result {
        TaskResult::Succeeded { output } => {
            task.status = TaskStatus::Succeeded;
            task.output = output;
        }
        TaskResult::Failed { error } => {
            task.status = TaskStatus::Failed;
            task.error = error;
        }
    }
    task.incarnation = incarnation;
    task.completed_at_ms = at_ms;
    put_row(txn, TASKS_TABLE, &id.to_be_bytes(), &task)?;
    txn.delete(INBOX_TABLE, &agent_key(agent, &id.to_be_bytes()))?;
    counts.queued = counts.queued.saturating_sub(1);
    put_row(txn, COUNTS_TABLE, agent.as_bytes(), &counts)?;
    Ok(TaskOutcome::Completed)
}

/// Applies `changes` to `agent`'s memory unless they would exceed
/// [`MAX_MEMORY_ENTRIES`]; then none applies and the error says why.
fn apply_memory(
    txn: &mut dyn Txn,
    agent: &str,
    incarnation: u64,
    changes: &[MemoryChange],
    at_ms: u64,
    counts: &mut Counts,
) -> Result<std::result::Result<(), String>> {
    // First the count after every change, so a refusal changes nothing.
    let mut entries = counts.memory_entries;
    let mut present = std::collections::BTreeMap::new();
    for change in changes {
        let key = match change {
            MemoryChange::Put { key, .. } | MemoryChange::Delete { key } => key,
        };
        let was = match present.get(key) {
            Some(p) => *p,
            None => txn.get(MEMORY_TABLE, &agent_key(agent, key.as_bytes()))?.is_some(),
        };
        let is = matches!(change, MemoryChange::Put { .. });
        entries = entries + u64::from(is && !was) - u64::from(was && !is);
        present.insert(key, is);
    }
    if entries > MAX_MEMORY_ENTRIES {
        return Ok(Err(format!(
            "agent memory is full: {MAX_MEMORY_ENTRIES} entries is the limit"
        )));
    }
    for change in changes {
        match change {
            MemoryChange::Put { key, value, embedding } => {
                let entry = MemoryEntry {
                    value: value.clone(),
                    embedding: embedding.clone(),
                    incarnation,
                    written_at_ms: at_ms,
                };
                put_row(txn, MEMORY_TABLE, &agent_key(agent, key.as_bytes()), &entry)?;
            }
            MemoryChange::Delete { key } => txn.delete(MEMORY_TABLE, &agent_key(agent, key.as_bytes()))?,
        }
    }
    counts.memory_entries = entries;
    Ok(Ok(()))
}

fn next_task_id(txn: &mut dyn Txn) -> Result<u64> {
    let id = match txn.get(META_TABLE, NEXT_ID_KEY)? {
        Some(b) => id_of(&b)? + 1,
        None => 1,
    };
    txn.put(META_TABLE, NEXT_ID_KEY, id.to_be_bytes().to_vec())?;
    Ok(id)
}

/// The task `agent`'s idempotency key `key` names, if any.
pub(crate) fn task_by_key(txn: &dyn Txn, agent: &str, key: &str) -> Result<Option<u64>> {
    txn.get(TASK_KEYS_TABLE, &agent_key(agent, key.as_bytes()))?
        .map(|b| id_of(&b))
        .transpose()
}

/// Stores a task another site recorded for `task.agent` under a new id of
/// this site, as it stands there (queued or with its result): the inbox,
/// the agent's task list, its idempotency key and its counts follow.
/// Returns the new id; a key that already names a task here names that
/// task instead (nothing is stored).
pub(crate) fn import_task(txn: &mut dyn Txn, task: &TaskRecord) -> Result<u64> {
    let agent = task.agent.as_str();
    if !task.idempotency_key.is_empty()
        && let Some(id) = task_by_key(txn, agent, &task.idempotency_key)?
    {
        return Ok(id);
    }
    let id = next_task_id(txn)?;
    let record = TaskRecord { id, ..task.clone() };
    put_row(txn, TASKS_TABLE, &id.to_be_bytes(), &record)?;
    txn.put(AGENT_TASKS_TABLE, &agent_key(agent, &id.to_be_bytes()), Vec::new())?;
    if !task.idempotency_key.is_empty() {
        txn.put(
            TASK_KEYS_TABLE,
            &agent_key(agent, task.idempotency_key.as_bytes()),
            id.to_be_bytes().to_vec(),
        )?;
    }
    let mut counts = counts(txn, agent)?;
    if record.status == TaskStatus::Queued {
        txn.put(INBOX_TABLE, &agent_key(agent, &id.to_be_bytes()), Vec::new())?;
        counts.queued += 1;
    }
    put_row(txn, COUNTS_TABLE, agent.as_bytes(), &counts)?;
    Ok(id)
}

/// Stores a memory entry another site recorded for `agent`, as it was
/// written there; refused (with the reason) when it would exceed
/// [`MAX_MEMORY_ENTRIES`].
pub(crate) fn import_memory(
    txn: &mut dyn Txn,
    agent: &str,
    key: &str,
    entry: &MemoryEntry,
) -> Result<std::result::Result<(), String>> {
    let row = agent_key(agent, key.as_bytes());
    let mut counts = counts(txn, agent)?;
    if txn.get(MEMORY_TABLE, &row)?.is_none() {
        if counts.memory_entries >= MAX_MEMORY_ENTRIES {
            return Ok(Err(format!(
                "agent memory is full: {MAX_MEMORY_ENTRIES} entries is the limit"
            )));
        }
        counts.memory_entries += 1;
        put_row(txn, COUNTS_TABLE, agent.as_bytes(), &counts)?;
    }
    put_row(txn, MEMORY_TABLE, &row, entry)?;
    Ok(Ok(()))
}

/// Deletes every task and memory entry of `agent` (its name is about to be
/// taken by an agent arriving from another site); returns the ids of the
/// deleted tasks.
pub(crate) fn purge(txn: &mut dyn Txn, agent: &str) -> Result<Vec<u64>> {
    let prefix = agent_prefix(agent);
    let end = prefix_end(&prefix);
    let mut ids = Vec::new();
    for (key, _) in txn.scan(AGENT_TASKS_TABLE, &prefix, end.as_deref(), usize::MAX)? {
        let id = id_of(&key[prefix.len()..])?;
        if let Some(t) = task(txn, id)?
            && !t.idempotency_key.is_empty()
        {
            txn.delete(TASK_KEYS_TABLE, &agent_key(agent, t.idempotency_key.as_bytes()))?;
        }
        txn.delete(TASKS_TABLE, &id.to_be_bytes())?;
        txn.delete(INBOX_TABLE, &agent_key(agent, &id.to_be_bytes()))?;
        txn.delete(AGENT_TASKS_TABLE, &key)?;
        ids.push(id);
    }
    for (key, _) in txn.scan(MEMORY_TABLE, &prefix, end.as_deref(), usize::MAX)? {
        txn.delete(MEMORY_TABLE, &key)?;
    }
    txn.delete(COUNTS_TABLE, agent.as_bytes())?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::MemTxn;
    use crate::agents::{AgentCommand, AgentSpec, Constraints, Placement, Plan, Resources, RestartPolicy};
    use crate::nodes::{NodeCommand, NodeResources};

    fn setup(txn: &mut MemTxn) {
        let cmd = NodeCommand::SetResources {
            node: 7,
            resources: NodeResources {
                cpu_cores: 4,
                memory_bytes: 4 << 30,
                ..Default::default()
            },
        };
        crate::nodes::apply(txn, &cmd).unwrap();
        let spec = AgentSpec {
            name: "a".into(),
            kind: AgentKind::Inference,
            resources: Resources {
                cpu_millis: 100,
                memory_mb: 10,
                gpu_memory_mb: 0,
            },
            constraints: Constraints::default(),
            restart: RestartPolicy::Always,
        };
        agents::apply(txn, &AgentCommand::Run { spec, at_ms: 1 }).unwrap();
        place(txn, 1);
    }

    fn place(txn: &mut MemTxn, generation: u64) {
        let plan = Plan {
            placements: vec![Placement {
                agent: "a".into(),
                generation,
                node: 7,
            }],
            ..Default::default()
        };
        agents::apply(txn, &AgentCommand::Plan { plan, at_ms: 2 }).unwrap();
    }

    fn submit(txn: &mut MemTxn, key: &str) -> TaskOutcome {
        apply(
            txn,
            &TaskCommand::Submit {
                agent: "a".into(),
                input: b"in".to_vec(),
                idempotency_key: key.into(),
                at_ms: 3,
            },
        )
        .unwrap()
    }

    fn complete(txn: &mut MemTxn, task: u64, incarnation: u64, memory: Vec<MemoryChange>) -> TaskOutcome {
        apply(
            txn,
            &TaskCommand::Complete {
                agent: "a".into(),
                task,
                incarnation,
                result: TaskResult::Succeeded {
                    output: b"out".to_vec(),
                },
                memory,
                at_ms: 4,
            },
        )
        .unwrap()
    }

    fn put(key: &str) -> MemoryChange {
        MemoryChange::Put {
            key: key.into(),
            value: "v".into(),
            embedding: encode_embedding(&[1.0, 0.5]),
        }
    }

    #[test]
    fn an_idempotency_key_names_one_task() {
        let mut txn = MemTxn::default();
        setup(&mut txn);
        assert_eq!(submit(&mut txn, "k"), TaskOutcome::Submitted { id: 1, existing: false });
        assert_eq!(submit(&mut txn, "k"), TaskOutcome::Submitted { id: 1, existing: true });
        assert_eq!(submit(&mut txn, ""), TaskOutcome::Submitted { id: 2, existing: false });
        assert_eq!(submit(&mut txn, ""), TaskOutcome::Submitted { id: 3, existing: false });
        assert_eq!(inbox(&txn, "a", 0, 10).unwrap().len(), 3);
        assert_eq!(counts(&txn, "a").unwrap().queued, 3);
    }

    #[test]
    fn a_result_counts_once_and_only_from_the_current_incarnation() {
        let mut txn = MemTxn::default();
        setup(&mut txn);
        submit(&mut txn, "k");
        // A later placement supersedes incarnation 1.
        agents::apply(
            &mut txn,
            &AgentCommand::Migrate {
                agent: "a".into(),
                to: 0,
            },
        )
        .unwrap();
        place(&mut txn, 1);
        let stale = complete(&mut txn, 1, 1, vec![put("m")]);
        assert!(
            matches!(stale, TaskOutcome::Refused(ref r) if r.contains("not current")),
            "{stale:?}"
        );
        assert!(
            memory_get(&txn, "a", "m").unwrap().is_none(),
            "a stale write must not land"
        );
        assert_eq!(complete(&mut txn, 1, 2, vec![put("m")]), TaskOutcome::Completed);
        let again = complete(&mut txn, 1, 2, vec![]);
        assert!(
            matches!(again, TaskOutcome::Refused(ref r) if r.contains("already")),
            "{again:?}"
        );
        let t = task(&txn, 1).unwrap().unwrap();
        assert_eq!(
            (t.status, t.incarnation, t.output.as_slice()),
            (TaskStatus::Succeeded, 2, &b"out"[..])
        );
        assert!(inbox(&txn, "a", 0, 10).unwrap().is_empty());
        assert_eq!(
            counts(&txn, "a").unwrap(),
            Counts {
                queued: 0,
                memory_entries: 1
            }
        );
        assert_eq!(memory_get(&txn, "a", "m").unwrap().unwrap().embedding(), vec![1.0, 0.5]);
    }

    #[test]
    fn memory_past_its_limit_fails_the_task_and_changes_nothing() {
        let mut txn = MemTxn::default();
        setup(&mut txn);
        put_row(
            &mut txn,
            COUNTS_TABLE,
            b"a",
            &Counts {
                queued: 0,
                memory_entries: MAX_MEMORY_ENTRIES - 1,
            },
        )
        .unwrap();
        submit(&mut txn, "");
        assert_eq!(
            complete(&mut txn, 1, 1, vec![put("x"), put("y")]),
            TaskOutcome::Completed
        );
        let t = task(&txn, 1).unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert!(t.error.contains("memory is full"), "{}", t.error);
        assert!(memory_list(&txn, "a", "", 10).unwrap().is_empty());
    }

    #[test]
    fn process_agents_and_unknown_agents_take_no_tasks() {
        let mut txn = MemTxn::default();
        let out = submit(&mut txn, "");
        assert!(
            matches!(out, TaskOutcome::Refused(ref r) if r.contains("no agent")),
            "{out:?}"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let cmd = TaskCommand::Complete {
            agent: "a".into(),
            task: 1,
            incarnation: 1,
            result: TaskResult::Succeeded { output: vec![] },
            memory: vec![MemoryChange::Put {
                key: "k".repeat(MAX_MEMORY_KEY_BYTES + 1),
                value: String::new(),
                embedding: vec![],
            }],
            at_ms: 0,
        };
        assert!(cmd.validate().unwrap_err().to_string().contains("memory[0].key"));
        let cmd = TaskCommand::Submit {
            agent: "a".into(),
            input: vec![0; MAX_TASK_INPUT_BYTES + 1],
            idempotency_key: String::new(),
            at_ms: 0,
        };
        assert!(cmd.validate().unwrap_err().to_string().contains("input"));
    }
}
