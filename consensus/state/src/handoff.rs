//! Agent handoffs between sites: the replicated half of a two-phase
//! protocol that moves an agent, with its memory and its tasks, from the
//! site that owns it (the source) to another site (the target), each site
//! its own Raft group.
//!
//! The protocol, driven by the source leader (`node`'s handoff worker) and
//! made of steps that are each one command here and idempotent, so a new
//! leader on either side simply sends again what its log does not show as
//! done:
//! 1. **Begin** (source): the agent is fenced at once (its allocation
//!    ends, so no result or memory write of its incarnation counts any
//!    more) and frozen: no task is accepted, no spec change, no stop. Its
//!    row in `handoffs_out` says where it goes.
//! 2. **Import** (target): the spec, then the memory and the tasks in
//!    chunks, under the source's handoff id. The agent exists at the target
//!    but stays stopped and frozen (`handoffs_in`, phase `Preparing`). A
//!    chunk sent again changes nothing (`imported_tasks` maps each source
//!    task id to the id it got here).
//! 3. **Map** (source): the target's task ids, so that a client asking the
//!    source for a task is sent to the target (`task_moves`).
//! 4. **Commit** (source), once every incarnation of the agent at the
//!    source confirmed its stop: from here the target owns the agent and
//!    the handoff cannot be aborted. Before it, **Abort** (source) gives the
//!    agent back its desired status; the target's dormant copy never runs
//!    and is replaced by the next import from that site.
//! 5. **Activate** (target): the agent runs there (a new generation and an
//!    evaluation; its incarnations continue the source's numbers).
//! 6. **Finish** (source): the handoff row becomes a forwarding pointer
//!    (`moved_agents`), which every call about the agent follows.
//!
//! Tables (in the state column family), every row versioned:
//! - `handoffs_out`: agent -> [`Outgoing`], handoffs from this site that
//!   have not finished;
//! - `moved_agents`: agent -> [`Moved`], agents this site handed off;
//! - `handoffs_in`: agent -> [`Incoming`], agents that arrived or are
//!   arriving from another site;
//! - `task_moves`: task id (big-endian) -> [`MovedTask`], tasks of handed-off
//!   agents and the id each has at the target;
//! - `imported_tasks`: agent ++ 0 ++ source site ++ 0 ++ handoff id ++ source
//!   task id (big-endian) -> target task id;
//! - `handoff_meta`: `next_id` -> the last handoff id issued.
//!
//! Invariants (every apply keeps them; the tests check them):
//! - Never two sites running the agent: the target activates only after the
//!   source committed, the source commits only after its last incarnation
//!   stopped, and a committed handoff is never aborted.
//! - Nothing lost: from Begin to the end the agent's memory and tasks at the
//!   source do not change (submissions and results are refused), so what
//!   the target imported is all of it; a task queued at the source is
//!   queued at the target, a result committed at the source stays
//!   committed (with the incarnation that produced it), and a task runs to
//!   a committed result at most once per site.
//! - An agent has at most one of: an unfinished outgoing handoff, a moved
//!   pointer, a `Preparing` incoming handoff.

use serde::{Deserialize, Serialize};

use crate::agents::{self, AgentSpec, Desired, check_name, check_site};
use crate::codec::{be_u64, get_row, put_row};
use crate::error::{Result, StateError};
use crate::tasks::{self, MemoryEntry, TaskRecord, check_memory_key};
use crate::txn::{Txn, prefix_end};

const OUT_TABLE: &str = "handoffs_out";
const MOVED_TABLE: &str = "moved_agents";
const IN_TABLE: &str = "handoffs_in";
const TASK_MOVES_TABLE: &str = "task_moves";
const IMPORTED_TASKS_TABLE: &str = "imported_tasks";
const META_TABLE: &str = "handoff_meta";
const NEXT_ID_KEY: &[u8] = b"next_id";

/// Most memory entries or tasks one import command carries.
pub const MAX_IMPORT_ITEMS: usize = 1000;

/// Where an outgoing handoff stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutPhase {
    /// The agent is fenced here; the target is importing it.
    Begun,
    /// The target owns the agent; it is being activated there.
    Committed,
}

/// A handoff from this site that has not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// This site's id of the handoff (the target knows it by it).
    pub id: u64,
    /// The target site.
    pub to_site: String,
    /// Where it stands.
    pub phase: OutPhase,
    /// The agent's desired status before Begin, given back on Abort.
    pub resume: Desired,
    /// When it began (proposing leader's clock, ms).
    pub since_ms: u64,
}

crate::row_v1!(Outgoing, "outgoing handoff");

/// An agent this site handed off: the pointer calls about it follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    /// The site that owns it now.
    pub site: String,
    /// The handoff's id.
    pub id: u64,
    /// When the handoff finished (proposing leader's clock, ms).
    pub at_ms: u64,
}

crate::row_v1!(Moved, "moved agent");

/// Where an incoming handoff stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InPhase {
    /// Importing: the agent is stopped and frozen here.
    Preparing,
    /// The agent is this site's.
    Active,
}

/// An agent that arrived, or is arriving, from another site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The source site.
    pub from_site: String,
    /// The source's id of the handoff.
    pub id: u64,
    /// Where it stands.
    pub phase: InPhase,
    /// What the agent's desired status becomes when activated (what it was
    /// at the source).
    pub desired: Desired,
    /// When the import began (proposing leader's clock, ms).
    pub since_ms: u64,
}

crate::row_v1!(Incoming, "incoming handoff");

/// A task of a handed-off agent: where it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedTask {
    /// The site that has it now.
    pub site: String,
    /// Its id there.
    pub id: u64,
}

crate::row_v1!(MovedTask, "moved task");

/// A task's id at the source and the id the target gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMove {
    /// The id at the source.
    pub from: u64,
    /// The id at the target.
    pub to: u64,
}

/// A step of a handoff, carried in [`crate::Command`]. Frozen-variant rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffCommand {
    /// (Source) Fences and freezes `agent` and starts handing it to
    /// `to_site`.
    Begin {
        /// The agent.
        agent: String,
        /// The target site.
        to_site: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// (Source) Records where tasks went at the target.
    MapTasks {
        /// The agent.
        agent: String,
        /// The handoff.
        id: u64,
        /// Source id to target id.
        moved: Vec<TaskMove>,
    },
    /// (Source) The target owns the agent from now on.
    Commit {
        /// The agent.
        agent: String,
        /// The handoff.
        id: u64,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// (Source) Gives up a handoff that has not committed: the agent gets
    /// its desired status back.
    Abort {
        /// The agent.
        agent: String,
        /// The handoff.
        id: u64,
        /// Why, for people.
        reason: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// (Source) The target activated the agent: the handoff becomes a
    /// forwarding pointer.
    Finish {
        /// The agent.
        agent: String,
        /// The handoff.
        id: u64,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// (Target) Records the agent arriving from `from_site`, stopped.
    ImportBegin {
        /// The source site.
        from_site: String,
        /// The source's handoff id.
        id: u64,
        /// The agent's spec.
        spec: AgentSpec,
        /// The sites it may run in ([`agents::sites_of`]).
        sites: Vec<String>,
        /// Its desired status at the source before the handoff: it runs
        /// at the target once activated only if it ran at the source.
        desired: Desired,
        /// The agent's last incarnation at the source.
        incarnation: u64,
        /// When it was first submitted at the source.
        created_at_ms: u64,
        /// The proposing leader's clock.
        at_ms: u64,
    },
    /// (Target) Stores memory entries of the arriving agent.
    ImportMemory {
        /// The source site.
        from_site: String,
        /// The source's handoff id.
        id: u64,
        /// The agent.
        agent: String,
        /// Key and entry, as the source stored them.
        entries: Vec<(String, MemoryEntry)>,
    },
    /// (Target) Stores tasks of the arriving agent (their `id` is the
    /// source's).
    ImportTasks {
        /// The source site.
        from_site: String,
        /// The source's handoff id.
        id: u64,
        /// The agent.
        agent: String,
        /// The tasks as the source recorded them.
        tasks: Vec<TaskRecord>,
    },
    /// (Target) The source committed: the agent runs here.
    Activate {
        /// The source site.
        from_site: String,
        /// The source's handoff id.
        id: u64,
        /// The agent.
        agent: String,
        /// The proposing leader's clock.
        at_ms: u64,
    },
}

/// What a [`HandoffCommand`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffOutcome {
    /// A handoff began with this id.
    Begun {
        /// The handoff's id.
        id: u64,
    },
    /// The step was applied, or had been already.
    Done,
    /// Tasks were imported (or had been): their ids at the source and here.
    Imported(Vec<TaskMove>),
    /// Refused, with the reason; sending the step again is refused again.
    Refused(String),
}

fn check_items(field: &str, n: usize) -> Result<()> {
    if n > MAX_IMPORT_ITEMS {
        return Err(StateError::invalid(
            field,
            format!("has {n} items; the limit is {MAX_IMPORT_ITEMS}"),
        ));
    }
    Ok(())
}

impl HandoffCommand {
    /// The command carrying this step.
    pub fn into_command(self) -> crate::Command {
        crate::Command::Handoff(self)
    }

    /// Approximate encoded size, for batching decisions.
    pub fn approx_size(&self) -> usize {
        match self {
            HandoffCommand::MapTasks { moved, .. } => 64 + moved.len() * 16,
            HandoffCommand::ImportBegin { spec, sites, .. } => {
                agents::spec_size(spec) + sites.iter().map(|s| s.len() + 1).sum::<usize>() + 64
            }
            HandoffCommand::ImportMemory { entries, .. } => {
                64 + entries
                    .iter()
                    .map(|(k, e)| k.len() + e.value.len() + e.embedding.len() + 24)
                    .sum::<usize>()
            }
            HandoffCommand::ImportTasks { tasks, .. } => {
                64 + tasks
                    .iter()
                    .map(|t| t.input.len() + t.output.len() + t.error.len() + t.idempotency_key.len() + 64)
                    .sum::<usize>()
            }
            HandoffCommand::Begin { .. }
            | HandoffCommand::Commit { .. }
            | HandoffCommand::Abort { .. }
            | HandoffCommand::Finish { .. }
            | HandoffCommand::Activate { .. } => 160,
        }
    }

    /// Checks sizes and fields before proposing; the error names the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            HandoffCommand::Begin { agent, to_site, .. } => {
                check_name("agent", agent)?;
                check_site("to_site", to_site)
            }
            HandoffCommand::MapTasks { agent, moved, .. } => {
                check_name("agent", agent)?;
                check_items("moved", moved.len())
            }
            HandoffCommand::Commit { agent, .. } | HandoffCommand::Finish { agent, .. } => check_name("agent", agent),
            HandoffCommand::Abort { agent, reason, .. } => {
                check_name("agent", agent)?;
                if reason.len() > agents::MAX_REASON_BYTES {
                    return Err(StateError::too_long("reason", reason.len(), agents::MAX_REASON_BYTES));
                }
                Ok(())
            }
            HandoffCommand::ImportBegin {
                from_site, spec, sites, ..
            } => {
                check_site("from_site", from_site)?;
                agents::check_sites("sites", sites)?;
                spec.validate().map_err(|e| match e {
                    StateError::InvalidArgument { field, reason } => {
                        StateError::invalid(&format!("spec.{field}"), reason)
                    }
                    other => other,
                })
            }
            HandoffCommand::ImportMemory {
                from_site,
                agent,
                entries,
                ..
            } => {
                check_site("from_site", from_site)?;
                check_name("agent", agent)?;
                check_items("entries", entries.len())?;
                for (i, (key, entry)) in entries.iter().enumerate() {
                    check_memory_key(&format!("entries[{i}].key"), key)?;
                    if entry.value.len() > tasks::MAX_MEMORY_VALUE_BYTES {
                        return Err(StateError::too_long(
                            &format!("entries[{i}].value"),
                            entry.value.len(),
                            tasks::MAX_MEMORY_VALUE_BYTES,
                        ));
                    }
                    if entry.embedding.len() % 4 != 0 || entry.embedding.len() / 4 > tasks::MAX_EMBEDDING_DIMS {
                        return Err(StateError::invalid(
                            &format!("entries[{i}].embedding"),
                            format!("must be at most {} little-endian f32s", tasks::MAX_EMBEDDING_DIMS),
                        ));
                    }
                }
                Ok(())
            }
            HandoffCommand::ImportTasks {
                from_site,
                agent,
                tasks: list,
                ..
            } => {
                check_site("from_site", from_site)?;
                check_name("agent", agent)?;
                check_items("tasks", list.len())?;
                for (i, t) in list.iter().enumerate() {
                    if t.agent != *agent {
                        return Err(StateError::invalid(&format!("tasks[{i}].agent"), "must be the agent"));
                    }
                    let limits = [
                        ("input", t.input.len(), tasks::MAX_TASK_INPUT_BYTES),
                        (
                            "idempotency_key",
                            t.idempotency_key.len(),
                            tasks::MAX_IDEMPOTENCY_KEY_BYTES,
                        ),
                        ("output", t.output.len(), agents::MAX_TASK_OUTPUT_BYTES as usize),
                        ("error", t.error.len(), tasks::MAX_ERROR_BYTES),
                    ];
                    for (name, len, limit) in limits {
                        if len > limit {
                            return Err(StateError::too_long(&format!("tasks[{i}].{name}"), len, limit));
                        }
                    }
                }
                Ok(())
            }
            HandoffCommand::Activate { from_site, agent, .. } => {
                check_site("from_site", from_site)?;
                check_name("agent", agent)
            }
        }
    }
}

/// The unfinished handoff of `agent` from this site, if any.
pub fn outgoing(txn: &dyn Txn, agent: &str) -> Result<Option<Outgoing>> {
    get_row(txn, OUT_TABLE, agent.as_bytes())
}

/// Every unfinished handoff from this site, by agent name.
pub fn outgoing_all(txn: &dyn Txn) -> Result<Vec<(String, Outgoing)>> {
    txn.scan(OUT_TABLE, b"", None, usize::MAX)?
        .into_iter()
        .map(|(k, v)| {
            let name = String::from_utf8(k).map_err(|e| StateError::Corrupt {
                what: "agent name",
                detail: e.to_string(),
            })?;
            Ok((name, crate::codec::decode_row(&v)?))
        })
        .collect()
}

/// Where `agent` went, if this site handed it off.
pub fn moved(txn: &dyn Txn, agent: &str) -> Result<Option<Moved>> {
    get_row(txn, MOVED_TABLE, agent.as_bytes())
}

/// The handoff that brought (or is bringing) `agent` here, if any.
pub fn incoming(txn: &dyn Txn, agent: &str) -> Result<Option<Incoming>> {
    get_row(txn, IN_TABLE, agent.as_bytes())
}

/// The site that owns `agent` if it is not this one: it was handed off, or
/// its handoff committed. Calls about the agent are sent there.
pub fn owner_elsewhere(txn: &dyn Txn, agent: &str) -> Result<Option<String>> {
    if let Some(m) = moved(txn, agent)? {
        return Ok(Some(m.site));
    }
    Ok(outgoing(txn, agent)?
        .filter(|o| o.phase == OutPhase::Committed)
        .map(|o| o.to_site))
}

/// Where task `id` went, if its agent was handed off.
pub fn moved_task(txn: &dyn Txn, id: u64) -> Result<Option<MovedTask>> {
    get_row(txn, TASK_MOVES_TABLE, &id.to_be_bytes())
}

/// Why `agent` takes no tasks, spec changes or stops now, if a handoff
/// holds it (for people: "agent \"a\" is moving to site \"b\"").
pub fn frozen(txn: &dyn Txn, agent: &str) -> Result<Option<String>> {
    if let Some(o) = outgoing(txn, agent)? {
        return Ok(Some(format!("agent {agent:?} is moving to site {:?}", o.to_site)));
    }
    if let Some(m) = moved(txn, agent)? {
        return Ok(Some(format!("agent {agent:?} moved to site {:?}", m.site)));
    }
    if let Some(i) = incoming(txn, agent)?
        && i.phase == InPhase::Preparing
    {
        return Ok(Some(format!("agent {agent:?} is arriving from site {:?}", i.from_site)));
    }
    Ok(None)
}

fn imported_key(agent: &str, from_site: &str, id: u64, task: u64) -> Vec<u8> {
    let mut key = tasks::agent_key(agent, from_site.as_bytes());
    key.push(0);
    key.extend_from_slice(&id.to_be_bytes());
    key.extend_from_slice(&task.to_be_bytes());
    key
}

/// Applies a validated handoff step.
pub(crate) fn apply(txn: &mut dyn Txn, cmd: &HandoffCommand) -> Result<HandoffOutcome> {
    match cmd {
        HandoffCommand::Begin { agent, to_site, at_ms } => begin(txn, agent, to_site, *at_ms),
        HandoffCommand::MapTasks { agent, id, moved } => {
            let Some(out) = outgoing(txn, agent)?.filter(|o| o.id == *id && o.phase == OutPhase::Begun) else {
                return Ok(HandoffOutcome::Refused(format!(
                    "agent {agent:?} has no handoff {id} that is importing"
                )));
            };
            for m in moved {
                let row = MovedTask {
                    site: out.to_site.clone(),
                    id: m.to,
                };
                put_row(txn, TASK_MOVES_TABLE, &m.from.to_be_bytes(), &row)?;
            }
            Ok(HandoffOutcome::Done)
        }
        HandoffCommand::Commit { agent, id, .. } => match outgoing(txn, agent)? {
            Some(mut out) if out.id == *id => {
                if let Some((incarnation, row)) = agents::stopping_of(txn, agent)?.first() {
                    return Ok(HandoffOutcome::Refused(format!(
                        "incarnation {incarnation} of agent {agent:?} has not yet stopped on node {:016x}",
                        row.node
                    )));
                }
                out.phase = OutPhase::Committed;
                put_row(txn, OUT_TABLE, agent.as_bytes(), &out)?;
                Ok(HandoffOutcome::Done)
            }
            _ if moved(txn, agent)?.is_some_and(|m| m.id == *id) => Ok(HandoffOutcome::Done),
            _ => Ok(HandoffOutcome::Refused(format!("agent {agent:?} has no handoff {id}"))),
        },
        HandoffCommand::Abort { agent, id, reason, .. } => match outgoing(txn, agent)? {
            Some(out) if out.id == *id && out.phase == OutPhase::Begun => {
                txn.delete(OUT_TABLE, agent.as_bytes())?;
                for (from, _) in tasks_mapped(txn, agent)? {
                    txn.delete(TASK_MOVES_TABLE, &from.to_be_bytes())?;
                }
                let why = format!("the move to site {:?} was aborted: {reason}", out.to_site);
                agents::set_desired(txn, agent, out.resume, &why)?;
                Ok(HandoffOutcome::Done)
            }
            Some(out) if out.id == *id => Ok(HandoffOutcome::Refused(format!(
                "the move of agent {agent:?} to site {:?} committed; it cannot be aborted",
                out.to_site
            ))),
            _ => Ok(HandoffOutcome::Refused(format!("agent {agent:?} has no handoff {id}"))),
        },
        HandoffCommand::Finish { agent, id, at_ms } => match outgoing(txn, agent)? {
            Some(out) if out.id == *id && out.phase == OutPhase::Committed => {
                txn.delete(OUT_TABLE, agent.as_bytes())?;
                let row = Moved {
                    site: out.to_site,
                    id: *id,
                    at_ms: *at_ms,
                };
                put_row(txn, MOVED_TABLE, agent.as_bytes(), &row)?;
                Ok(HandoffOutcome::Done)
            }
            _ if moved(txn, agent)?.is_some_and(|m| m.id == *id) => Ok(HandoffOutcome::Done),
            _ => Ok(HandoffOutcome::Refused(format!(
                "agent {agent:?} has no committed handoff {id}"
            ))),
        },
        HandoffCommand::ImportBegin {
            from_site,
            id,
            spec,
            sites,
            desired,
            incarnation,
            created_at_ms,
            at_ms,
        } => {
            let arriving = Arriving {
                from_site,
                id: *id,
                spec,
                sites,
                desired: *desired,
                incarnation: *incarnation,
                created_at_ms: *created_at_ms,
            };
            import_begin(txn, &arriving, *at_ms)
        }
        HandoffCommand::ImportMemory {
            from_site,
            id,
            agent,
            entries,
        } => {
            if let Some(refused) = check_preparing(txn, agent, from_site, *id)? {
                return Ok(refused);
            }
            for (key, entry) in entries {
                if let Err(why) = tasks::import_memory(txn, agent, key, entry)? {
                    return Ok(HandoffOutcome::Refused(why));
                }
            }
            Ok(HandoffOutcome::Done)
        }
        HandoffCommand::ImportTasks {
            from_site,
            id,
            agent,
            tasks: list,
        } => {
            if let Some(refused) = check_preparing(txn, agent, from_site, *id)? {
                return Ok(refused);
            }
            let mut moved = Vec::with_capacity(list.len());
            for task in list {
                let key = imported_key(agent, from_site, *id, task.id);
                let to = match txn.get(IMPORTED_TASKS_TABLE, &key)? {
                    Some(b) => be_u64("imported task id", &b)?,
                    None => {
                        let to = tasks::import_task(txn, task)?;
                        txn.put(IMPORTED_TASKS_TABLE, &key, to.to_be_bytes().to_vec())?;
                        to
                    }
                };
                moved.push(TaskMove { from: task.id, to });
            }
            Ok(HandoffOutcome::Imported(moved))
        }
        HandoffCommand::Activate {
            from_site, id, agent, ..
        } => match incoming(txn, agent)? {
            Some(mut row) if row.from_site == *from_site && row.id == *id => {
                if row.phase == InPhase::Preparing {
                    row.phase = InPhase::Active;
                    put_row(txn, IN_TABLE, agent.as_bytes(), &row)?;
                    agents::set_desired(txn, agent, row.desired, "")?;
                }
                Ok(HandoffOutcome::Done)
            }
            _ => Ok(HandoffOutcome::Refused(format!(
                "agent {agent:?} has no handoff {id} from site {from_site:?}"
            ))),
        },
    }
}

fn begin(txn: &mut dyn Txn, agent: &str, to_site: &str, at_ms: u64) -> Result<HandoffOutcome> {
    if let Some(why) = frozen(txn, agent)? {
        return Ok(HandoffOutcome::Refused(why));
    }
    if agents::agent(txn, agent)?.is_none() {
        return Ok(HandoffOutcome::Refused(format!("no agent named {agent:?}")));
    }
    let sites = agents::sites_of(txn, agent)?;
    if !sites.is_empty() && !sites.iter().any(|s| s == to_site) {
        return Ok(HandoffOutcome::Refused(format!(
            "agent {agent:?} may run only in sites {sites:?}; {to_site:?} is not one of them"
        )));
    }
    let id = match txn.get(META_TABLE, NEXT_ID_KEY)? {
        Some(b) => be_u64("handoff id", &b)? + 1,
        None => 1,
    };
    txn.put(META_TABLE, NEXT_ID_KEY, id.to_be_bytes().to_vec())?;
    let reason = format!("moving to site {to_site:?}");
    let Some(resume) = agents::fence_for_handoff(txn, agent, &reason, at_ms)? else {
        return Ok(HandoffOutcome::Refused(format!("no agent named {agent:?}")));
    };
    // It may have arrived here from another site: that handoff is history.
    txn.delete(IN_TABLE, agent.as_bytes())?;
    let out = Outgoing {
        id,
        to_site: to_site.to_string(),
        phase: OutPhase::Begun,
        resume,
        since_ms: at_ms,
    };
    put_row(txn, OUT_TABLE, agent.as_bytes(), &out)?;
    Ok(HandoffOutcome::Begun { id })
}

/// The task moves recorded for `agent`'s tasks.
fn tasks_mapped(txn: &dyn Txn, agent: &str) -> Result<Vec<(u64, MovedTask)>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = tasks::tasks_of(txn, agent, after, 1000)?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = last.id;
        for t in &page {
            if let Some(m) = moved_task(txn, t.id)? {
                out.push((t.id, m));
            }
        }
    }
}

/// Refuses an import step unless `agent` is preparing for handoff `id`
/// from `from_site`.
fn check_preparing(txn: &dyn Txn, agent: &str, from_site: &str, id: u64) -> Result<Option<HandoffOutcome>> {
    Ok(match incoming(txn, agent)? {
        Some(row) if row.from_site == from_site && row.id == id && row.phase == InPhase::Preparing => None,
        Some(row) if row.from_site == from_site && row.id == id => Some(HandoffOutcome::Refused(format!(
            "agent {agent:?} already arrived from site {from_site:?}"
        ))),
        _ => Some(HandoffOutcome::Refused(format!(
            "agent {agent:?} is not arriving from site {from_site:?} in handoff {id}"
        ))),
    })
}

/// Deletes everything of `agent` here (record, allocation, tasks, memory,
/// handoff rows), so that an agent of that name can arrive; refused while
/// an incarnation of it may still run.
fn purge(txn: &mut dyn Txn, agent: &str) -> Result<std::result::Result<(), String>> {
    if let Err(why) = agents::remove_agent(txn, agent)? {
        return Ok(Err(why));
    }
    for id in tasks::purge(txn, agent)? {
        txn.delete(TASK_MOVES_TABLE, &id.to_be_bytes())?;
    }
    let prefix = tasks::agent_prefix(agent);
    let end = prefix_end(&prefix);
    for (key, _) in txn.scan(IMPORTED_TASKS_TABLE, &prefix, end.as_deref(), usize::MAX)? {
        txn.delete(IMPORTED_TASKS_TABLE, &key)?;
    }
    txn.delete(MOVED_TABLE, agent.as_bytes())?;
    txn.delete(IN_TABLE, agent.as_bytes())?;
    Ok(Ok(()))
}

/// What [`HandoffCommand::ImportBegin`] carries.
struct Arriving<'a> {
    from_site: &'a str,
    id: u64,
    spec: &'a AgentSpec,
    sites: &'a [String],
    desired: Desired,
    incarnation: u64,
    created_at_ms: u64,
}

fn import_begin(txn: &mut dyn Txn, arriving: &Arriving<'_>, at_ms: u64) -> Result<HandoffOutcome> {
    let Arriving {
        from_site,
        id,
        spec,
        sites,
        desired,
        incarnation,
        created_at_ms,
    } = *arriving;
    let agent = spec.name.as_str();
    match incoming(txn, agent)? {
        Some(row) if row.from_site == from_site && row.id == id => return Ok(HandoffOutcome::Done),
        // An earlier handoff from the same site that never committed (it
        // was aborted there): its dormant copy goes.
        Some(row) if row.from_site == from_site && row.phase == InPhase::Preparing => {}
        Some(row) if row.phase == InPhase::Preparing => {
            return Ok(HandoffOutcome::Refused(format!(
                "agent {agent:?} is arriving from site {:?}",
                row.from_site
            )));
        }
        _ => {}
    }
    if let Some(out) = outgoing(txn, agent)? {
        return Ok(HandoffOutcome::Refused(format!(
            "agent {agent:?} is moving to site {:?}",
            out.to_site
        )));
    }
    let exists = agents::agent(txn, agent)?.is_some();
    let returning = moved(txn, agent)?.is_some_and(|m| m.site == from_site);
    let dormant = incoming(txn, agent)?.is_some_and(|r| r.phase == InPhase::Preparing);
    if exists && !returning && !dormant {
        return Ok(HandoffOutcome::Refused(format!(
            "this site already has an agent named {agent:?}"
        )));
    }
    if exists && let Err(why) = purge(txn, agent)? {
        return Ok(HandoffOutcome::Refused(why));
    }
    let reason = format!("arriving from site {from_site:?}");
    agents::create_arriving(txn, spec, sites, incarnation, created_at_ms, &reason)?;
    let row = Incoming {
        from_site: from_site.to_string(),
        id,
        phase: InPhase::Preparing,
        desired,
        since_ms: at_ms,
    };
    put_row(txn, IN_TABLE, agent.as_bytes(), &row)?;
    Ok(HandoffOutcome::Done)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::MemTxn;
    use crate::agents::{AgentCommand, AgentKind, AllocStatus, Constraints, Placement, Plan, Resources, RestartPolicy};
    use crate::nodes::{NodeCommand, NodeResources};
    use crate::tasks::{MemoryChange, TaskCommand, TaskOutcome, TaskResult, TaskStatus};

    fn spec() -> AgentSpec {
        AgentSpec {
            name: "a".into(),
            kind: AgentKind::Inference,
            resources: Resources {
                cpu_millis: 100,
                memory_mb: 10,
                gpu_memory_mb: 0,
            },
            constraints: Constraints {
                model: "m".into(),
                ..Default::default()
            },
            restart: RestartPolicy::Always,
        }
    }

    /// A site with node 7 and agent "a" placed there.
    fn site() -> MemTxn {
        let mut txn = empty_site();
        agents::apply(&mut txn, &AgentCommand::Run { spec: spec(), at_ms: 1 }).unwrap();
        let generation = agents::agent(&txn, "a").unwrap().unwrap().generation;
        place(&mut txn, generation);
        txn
    }

    /// A site with node 7 and no agent.
    fn empty_site() -> MemTxn {
        let mut txn = MemTxn::new();
        let cmd = NodeCommand::SetResources {
            node: 7,
            resources: NodeResources {
                cpu_cores: 4,
                memory_bytes: 4 << 30,
                ..Default::default()
            },
        };
        crate::nodes::apply(&mut txn, &cmd).unwrap();
        txn
    }

    fn place(txn: &mut MemTxn, generation: u64) -> u64 {
        let plan = Plan {
            placements: vec![Placement {
                agent: "a".into(),
                generation,
                node: 7,
            }],
            ..Default::default()
        };
        let out = agents::apply(txn, &AgentCommand::Plan { plan, at_ms: 2 }).unwrap();
        let agents::AgentOutcome::Planned(p) = out else {
            panic!("{out:?}")
        };
        assert!(p.refused.is_empty(), "{p:?}");
        p.placed[0].1
    }

    fn submit(txn: &mut MemTxn, key: &str) -> TaskOutcome {
        let cmd = TaskCommand::Submit {
            agent: "a".into(),
            input: key.as_bytes().to_vec(),
            idempotency_key: key.into(),
            at_ms: 3,
        };
        tasks::apply(txn, &cmd).unwrap()
    }

    fn complete(txn: &mut MemTxn, task: u64, incarnation: u64, memory_key: &str) -> TaskOutcome {
        let cmd = TaskCommand::Complete {
            agent: "a".into(),
            task,
            incarnation,
            result: TaskResult::Succeeded { output: b"ok".to_vec() },
            memory: vec![MemoryChange::Put {
                key: memory_key.into(),
                value: format!("from task {task}"),
                embedding: vec![0; 8],
            }],
            at_ms: 4,
        };
        tasks::apply(txn, &cmd).unwrap()
    }

    fn step(txn: &mut MemTxn, cmd: HandoffCommand) -> HandoffOutcome {
        cmd.validate().unwrap();
        apply(txn, &cmd).unwrap()
    }

    /// Begins handing agent "a" to site west; the handoff's id.
    fn begin(txn: &mut MemTxn) -> u64 {
        let cmd = HandoffCommand::Begin {
            agent: "a".into(),
            to_site: "west".into(),
            at_ms: 5,
        };
        match step(txn, cmd) {
            HandoffOutcome::Begun { id } => id,
            other => panic!("{other:?}"),
        }
    }

    fn id_of(o: TaskOutcome) -> u64 {
        match o {
            TaskOutcome::Submitted { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    /// Everything the source sends the target, as the worker reads it.
    fn export(source: &MemTxn, id: u64) -> (HandoffCommand, HandoffCommand, HandoffCommand) {
        let record = agents::agent(source, "a").unwrap().unwrap();
        let begin = HandoffCommand::ImportBegin {
            from_site: "east".into(),
            id,
            spec: record.spec,
            sites: agents::sites_of(source, "a").unwrap(),
            desired: outgoing(source, "a").unwrap().map_or(Desired::Running, |o| o.resume),
            incarnation: record.incarnation,
            created_at_ms: record.created_at_ms,
            at_ms: 10,
        };
        let memory = HandoffCommand::ImportMemory {
            from_site: "east".into(),
            id,
            agent: "a".into(),
            entries: tasks::memory_list(source, "a", "", 100).unwrap(),
        };
        let tasks = HandoffCommand::ImportTasks {
            from_site: "east".into(),
            id,
            agent: "a".into(),
            tasks: tasks::tasks_of(source, "a", 0, 100).unwrap(),
        };
        (begin, memory, tasks)
    }

    #[test]
    fn a_handoff_moves_memory_and_tasks_and_never_lets_both_sites_run_the_agent() {
        let mut east = site();
        let inc = agents::agent(&east, "a").unwrap().unwrap().incarnation;
        let done = id_of(submit(&mut east, "t1"));
        assert_eq!(complete(&mut east, done, inc, "k1"), TaskOutcome::Completed);
        let queued = id_of(submit(&mut east, "t2"));

        let id = begin(&mut east);
        // Fenced at once: the running incarnation's result no longer counts,
        // nothing new is accepted, and the agent cannot be changed.
        assert!(matches!(
            complete(&mut east, queued, inc, "k2"),
            TaskOutcome::Refused(_)
        ));
        assert!(matches!(submit(&mut east, "t3"), TaskOutcome::Refused(r) if r.contains("moving to site \"west\"")));
        let alloc = agents::allocation(&east, "a").unwrap().unwrap();
        assert_eq!(alloc.status, AllocStatus::Stopped);
        assert!(matches!(
            step(
                &mut east,
                HandoffCommand::Begin {
                    agent: "a".into(),
                    to_site: "x".into(),
                    at_ms: 5
                }
            ),
            HandoffOutcome::Refused(_)
        ));

        let mut west = empty_site();
        let (begin, memory, tasks_cmd) = export(&east, id);
        for _ in 0..2 {
            // Every step twice: a new leader on either side sends again.
            assert_eq!(step(&mut west, begin.clone()), HandoffOutcome::Done);
            assert_eq!(step(&mut west, memory.clone()), HandoffOutcome::Done);
        }
        let HandoffOutcome::Imported(map) = step(&mut west, tasks_cmd.clone()) else {
            panic!()
        };
        assert_eq!(
            step(&mut west, tasks_cmd.clone()),
            HandoffOutcome::Imported(map.clone())
        );
        assert_eq!(map.len(), 2);
        // Arrived but dormant: stopped, taking nothing until activated.
        let arrived = agents::agent(&west, "a").unwrap().unwrap();
        assert_eq!(arrived.desired, Desired::Stopped);
        assert_eq!(arrived.incarnation, inc, "incarnations continue the source's");
        assert!(matches!(submit(&mut west, "t4"), TaskOutcome::Refused(r) if r.contains("arriving")));

        // Commit waits for the old incarnation to confirm its stop.
        let commit = HandoffCommand::Commit {
            agent: "a".into(),
            id,
            at_ms: 6,
        };
        assert!(matches!(step(&mut east, commit.clone()), HandoffOutcome::Refused(r) if r.contains("not yet stopped")));
        agents::apply(
            &mut east,
            &AgentCommand::Released {
                agent: "a".into(),
                incarnation: inc,
                node: 7,
            },
        )
        .unwrap();
        step(
            &mut east,
            HandoffCommand::MapTasks {
                agent: "a".into(),
                id,
                moved: map.clone(),
            },
        );
        assert_eq!(step(&mut east, commit.clone()), HandoffOutcome::Done);
        assert_eq!(step(&mut east, commit), HandoffOutcome::Done);
        assert!(matches!(
            step(&mut east, HandoffCommand::Abort { agent: "a".into(), id, reason: "late".into(), at_ms: 7 }),
            HandoffOutcome::Refused(r) if r.contains("cannot be aborted")
        ));
        assert_eq!(owner_elsewhere(&east, "a").unwrap().as_deref(), Some("west"));

        let activate = HandoffCommand::Activate {
            from_site: "east".into(),
            id,
            agent: "a".into(),
            at_ms: 8,
        };
        assert_eq!(step(&mut west, activate.clone()), HandoffOutcome::Done);
        assert_eq!(step(&mut west, activate), HandoffOutcome::Done);
        // A delayed import chunk of this handoff changes nothing now.
        assert!(matches!(step(&mut west, memory), HandoffOutcome::Refused(_)));
        let finish = HandoffCommand::Finish {
            agent: "a".into(),
            id,
            at_ms: 9,
        };
        assert_eq!(step(&mut east, finish.clone()), HandoffOutcome::Done);
        assert_eq!(step(&mut east, finish), HandoffOutcome::Done);
        assert_eq!(moved(&east, "a").unwrap().unwrap().site, "west");
        let to = |from: u64| map.iter().find(|m| m.from == from).unwrap().to;
        assert_eq!(moved_task(&east, queued).unwrap().unwrap().id, to(queued));

        // West runs it: the queued task runs there and its result counts
        // once; the result committed in east came along.
        let generation = agents::agent(&west, "a").unwrap().unwrap().generation;
        let west_inc = place(&mut west, generation);
        assert!(west_inc > inc);
        let old = tasks::task(&west, to(done)).unwrap().unwrap();
        assert_eq!((old.status, old.incarnation), (TaskStatus::Succeeded, inc));
        assert_eq!(complete(&mut west, to(queued), west_inc, "k2"), TaskOutcome::Completed);
        assert!(matches!(
            complete(&mut west, to(queued), west_inc, "k2"),
            TaskOutcome::Refused(_)
        ));
        let keys: Vec<String> = tasks::memory_list(&west, "a", "", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["k1", "k2"]);
        assert_eq!(tasks::counts(&west, "a").unwrap().memory_entries, 2);
        // A retried submission names the task that moved.
        assert_eq!(
            submit(&mut west, "t2"),
            TaskOutcome::Submitted {
                id: to(queued),
                existing: true
            }
        );
    }

    #[test]
    fn an_aborted_handoff_gives_the_agent_back_and_its_dormant_copy_is_replaced() {
        let mut east = site();
        let first = begin(&mut east);
        let mut west = empty_site();
        let (import, _, _) = export(&east, first);
        step(&mut west, import);
        assert_eq!(
            step(
                &mut east,
                HandoffCommand::Abort {
                    agent: "a".into(),
                    id: first,
                    reason: "site west refused".into(),
                    at_ms: 6
                }
            ),
            HandoffOutcome::Done
        );
        let record = agents::agent(&east, "a").unwrap().unwrap();
        assert_eq!(record.desired, Desired::Running);
        assert!(frozen(&east, "a").unwrap().is_none());
        assert_eq!(id_of(submit(&mut east, "t")), 1);

        // The next attempt replaces west's dormant copy of the first.
        let second = begin(&mut east);
        assert_ne!(first, second);
        let (import, _, tasks_cmd) = export(&east, second);
        assert_eq!(step(&mut west, import), HandoffOutcome::Done);
        assert!(matches!(step(&mut west, tasks_cmd), HandoffOutcome::Imported(m) if m.len() == 1));
        // A step of the first attempt is refused.
        let stale = HandoffCommand::Activate {
            from_site: "east".into(),
            id: first,
            agent: "a".into(),
            at_ms: 7,
        };
        assert!(matches!(step(&mut west, stale), HandoffOutcome::Refused(_)));
    }

    #[test]
    fn a_stopped_agent_arrives_stopped() {
        let mut east = site();
        agents::apply(
            &mut east,
            &AgentCommand::Stop {
                agent: "a".into(),
                at_ms: 4,
            },
        )
        .unwrap();
        let id = begin(&mut east);
        let mut west = empty_site();
        let (import, _, _) = export(&east, id);
        step(&mut west, import);
        let activate = HandoffCommand::Activate {
            from_site: "east".into(),
            id,
            agent: "a".into(),
            at_ms: 8,
        };
        assert_eq!(step(&mut west, activate), HandoffOutcome::Done);
        assert_eq!(agents::agent(&west, "a").unwrap().unwrap().desired, Desired::Stopped);
    }

    #[test]
    fn an_import_never_replaces_an_agent_the_target_owns() {
        let east = site();
        let mut west = site();
        let (import, _, _) = export(&east, 1);
        assert!(matches!(
            step(&mut west, import),
            HandoffOutcome::Refused(r) if r.contains("already has an agent named")
        ));
        assert_eq!(agents::agent(&west, "a").unwrap().unwrap().desired, Desired::Running);
    }

    #[test]
    fn imports_are_refused_naming_the_bad_field() {
        let task = TaskRecord {
            id: 1,
            agent: "b".into(),
            input: vec![],
            idempotency_key: String::new(),
            status: TaskStatus::Queued,
            output: vec![],
            error: String::new(),
            incarnation: 0,
            submitted_at_ms: 0,
            completed_at_ms: 0,
        };
        let cmd = HandoffCommand::ImportTasks {
            from_site: "east".into(),
            id: 1,
            agent: "a".into(),
            tasks: vec![task],
        };
        assert!(cmd.validate().unwrap_err().to_string().contains("tasks[0].agent"));
        let cmd = HandoffCommand::Begin {
            agent: "a".into(),
            to_site: String::new(),
            at_ms: 0,
        };
        assert!(cmd.validate().unwrap_err().to_string().contains("to_site"));
    }
}
