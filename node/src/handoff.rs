//! Agent handoffs between sites, the node's half: the source leader's
//! worker (task `handoff`) that drives every unfinished handoff of its site
//! step by step, and the target's [`Importer`] that applies the steps
//! another site sends (`cell0_state::handoff` holds the protocol, its
//! tables and its invariants).
//!
//! Worker, on the leader only, after every change to the agent tables and
//! at least every [`ROUND`]: for each handoff in `handoffs_out`,
//! - `Begun`: once the agent's last incarnation here confirmed its stop,
//!   send the agent's spec, then its memory and its tasks in chunks of at
//!   most [`CHUNK_BYTES`] (read from the local replica: the agent is
//!   frozen, so every read sees the same), record the target's task ids,
//!   and commit. A refusal from the target (FAILED_PRECONDITION) aborts the
//!   handoff; anything else (the site unreachable, no leader there) is
//!   tried again next round, from the spec on.
//! - `Committed`: activate the agent at the target, then finish (the
//!   forwarding pointer).
//!
//! Each step is idempotent on both sides, so a new leader simply starts
//! again from the phase its log shows. Steps go out over the site links as
//! forwarded calls with methods under [`METHOD_PREFIX`], which only the
//! nodes of a site send ([`crate::api::forward::SiteRouteLayer`] forwards
//! public methods only); the target takes the source site from the link's
//! certificate, never from the message.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use cell0_consensus::agents::{self, Desired};
use cell0_consensus::handoff::{self, HandoffCommand, HandoffOutcome, OutPhase, Outgoing, TaskMove};
use cell0_consensus::tasks::{self, MemoryEntry, TaskRecord, TaskStatus};
use cell0_consensus::{Consensus, ConsensusError, Consistency, Response as Applied, Role, Table, failpoints};
use cell0_federation::ForwardHandler;
use cell0_proto::federation::v1 as wire;
use cell0_proto::v1;
use prost::Message;
use tokio::sync::watch;
use tonic::Code;

use crate::api::ApiError;
use crate::api::agents::{sites_from_proto, spec_from_proto, spec_to_proto};
use crate::api::forward::{Caller, LocalReplay, SiteRouter};
use crate::api::tasks::task_status_name;
use crate::scheduling::now_ms;
use crate::supervisor::stopped;

/// Methods of handoff steps (`ForwardRequest.method`) start with this.
pub const METHOD_PREFIX: &str = "/cell0.federation.v1.Handoff/";
const BEGIN: &str = "/cell0.federation.v1.Handoff/Begin";
const MEMORY: &str = "/cell0.federation.v1.Handoff/Memory";
const TASKS: &str = "/cell0.federation.v1.Handoff/Tasks";
const ACTIVATE: &str = "/cell0.federation.v1.Handoff/Activate";

/// Longest pause between rounds while this node leads.
const ROUND: Duration = Duration::from_secs(1);
/// Most bytes of memory entries or tasks one step carries (a step with a
/// single larger item carries that item alone).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// How long one step may take at the target.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a step did not go through.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// The target refused it for good.
    #[error("site {site:?} refused: {why}")]
    Refused { site: String, why: String },
    /// Try again later.
    #[error("{0}")]
    Retry(String),
}

impl From<ConsensusError> for StepError {
    fn from(e: ConsensusError) -> Self {
        StepError::Retry(e.to_string())
    }
}

impl From<ApiError> for StepError {
    fn from(e: ApiError) -> Self {
        StepError::Retry(e.to_string())
    }
}

/// Runs the source side of this site's handoffs while this node leads,
/// until `stop` rises.
pub async fn run(consensus: Consensus, router: SiteRouter, mut stop: watch::Receiver<bool>) {
    let mut changed = consensus.watch_table(Table::Agents);
    // The last failure of each handoff: a new one is a warning, the same
    // one again (a site down for a while) only a debug line.
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    loop {
        if consensus.status().role == Role::Leader {
            // The leader's own replica: a row it has not applied yet is
            // picked up next round, and every step is idempotent.
            let pending = consensus.read(Consistency::Serializable, handoff::outgoing_all).await;
            match pending {
                Ok(pending) => {
                    failing.retain(|agent, _| pending.iter().any(|(a, _)| a == agent));
                    for (agent, out) in pending {
                        let step = tokio::select! {
                            r = drive(&consensus, &router, &agent, &out) => r,
                            () = stopped(&mut stop) => return,
                        };
                        match step {
                            Ok(()) => {
                                failing.remove(&agent);
                            }
                            Err(e) => {
                                metrics::counter!("cell0_handoff_steps_total", "result" => "retry").increment(1);
                                let error = e.to_string();
                                if failing.get(&agent) == Some(&error) {
                                    tracing::debug!(%agent, site = %out.to_site, handoff = out.id, %error, "a handoff step failed again; trying again");
                                } else {
                                    tracing::warn!(%agent, site = %out.to_site, handoff = out.id, %error, "a handoff step failed; trying again every second");
                                    failing.insert(agent, error);
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read the handoffs under way"),
            }
        }
        tokio::select! {
            Ok(()) = changed.changed() => {}
            () = tokio::time::sleep(ROUND) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Takes `agent`'s handoff as far as it can go now.
async fn drive(consensus: &Consensus, router: &SiteRouter, agent: &str, out: &Outgoing) -> Result<(), StepError> {
    if out.phase == OutPhase::Begun {
        match import(consensus, router, agent, out).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(StepError::Refused { site, why }) => {
                tracing::warn!(%agent, %site, handoff = out.id, %why, "the target site refused the agent; the move is aborted");
                metrics::counter!("cell0_handoffs_total", "result" => "aborted").increment(1);
                let abort = HandoffCommand::Abort {
                    agent: agent.to_string(),
                    id: out.id,
                    reason: truncate(format!("site {site:?} refused: {why}"), agents::MAX_REASON_BYTES),
                    at_ms: now_ms(),
                };
                propose(consensus, abort).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    let activate = wire::HandoffActivate {
        agent: agent.to_string(),
        handoff_id: out.id,
    };
    step(router, &out.to_site, ACTIVATE, &activate).await?;
    propose(
        consensus,
        HandoffCommand::Finish {
            agent: agent.to_string(),
            id: out.id,
            at_ms: now_ms(),
        },
    )
    .await?;
    metrics::counter!("cell0_handoffs_total", "result" => "moved").increment(1);
    tracing::info!(%agent, site = %out.to_site, handoff = out.id, "agent handed off");
    Ok(())
}

/// Once the agent's last incarnation here confirmed its stop, sends
/// everything of `agent` to the target and commits; false while the stop
/// is awaited (the import is sent once, after it: an agent may be large).
async fn import(consensus: &Consensus, router: &SiteRouter, agent: &str, out: &Outgoing) -> Result<bool, StepError> {
    let name = agent.to_string();
    let (record, sites, stopping) = consensus
        .read(Consistency::Linearizable, move |txn| {
            Ok((
                agents::agent(txn, &name)?,
                agents::sites_of(txn, &name)?,
                agents::stopping_of(txn, &name)?,
            ))
        })
        .await?;
    if let Some((incarnation, row)) = stopping.first() {
        tracing::debug!(%agent, incarnation, node = %format!("{:016x}", row.node), "the handoff waits for the agent to stop here");
        return Ok(false);
    }
    let Some(record) = record else {
        return Err(StepError::Retry(format!("agent {agent:?} has no record")));
    };
    let begin = wire::HandoffBegin {
        handoff_id: out.id,
        spec: Some(spec_to_proto(record.spec, sites)),
        incarnation: record.incarnation,
        created_at_ms: record.created_at_ms,
        stopped: out.resume == Desired::Stopped,
    };
    step(router, &out.to_site, BEGIN, &begin).await?;

    let mut after = String::new();
    loop {
        let (name, from) = (agent.to_string(), after.clone());
        let page = consensus
            .read(Consistency::Serializable, move |txn| {
                tasks::memory_list(txn, &name, &from, handoff::MAX_IMPORT_ITEMS)
            })
            .await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = last.clone();
        for chunk in chunks(page, |(k, e)| k.len() + e.value.len() + e.embedding.len() + 32) {
            let message = wire::HandoffMemory {
                agent: agent.to_string(),
                handoff_id: out.id,
                entries: chunk.into_iter().map(|(k, e)| memory_to_wire(k, e)).collect(),
            };
            step(router, &out.to_site, MEMORY, &message).await?;
        }
    }

    let mut after = 0;
    loop {
        let name = agent.to_string();
        let page = consensus
            .read(Consistency::Serializable, move |txn| {
                tasks::tasks_of(txn, &name, after, handoff::MAX_IMPORT_ITEMS)
            })
            .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.id;
        for chunk in chunks(page, |t| t.input.len() + t.output.len() + t.error.len() + 64) {
            let message = wire::HandoffTasks {
                agent: agent.to_string(),
                handoff_id: out.id,
                tasks: chunk.into_iter().map(task_to_wire).collect(),
            };
            let answer = step(router, &out.to_site, TASKS, &message).await?;
            let moved = answer
                .moved
                .iter()
                .map(|m| TaskMove { from: m.from, to: m.to })
                .collect();
            propose(
                consensus,
                HandoffCommand::MapTasks {
                    agent: agent.to_string(),
                    id: out.id,
                    moved,
                },
            )
            .await?;
        }
    }
    failpoints::crash_at("handoff-imported");

    let commit = HandoffCommand::Commit {
        agent: agent.to_string(),
        id: out.id,
        at_ms: now_ms(),
    };
    match consensus.propose(commit.into_command()).await? {
        Applied::Handoff(HandoffOutcome::Done) => {
            tracing::info!(%agent, site = %out.to_site, handoff = out.id, "handoff committed: the target site owns the agent");
            failpoints::crash_at("handoff-committed");
            Ok(true)
        }
        Applied::Handoff(HandoffOutcome::Refused(why)) => {
            tracing::debug!(%agent, %why, "the handoff waits to commit");
            Ok(false)
        }
        other => Err(StepError::Retry(format!("unexpected answer to a commit: {other:?}"))),
    }
}

/// Splits `items` into runs of at most [`CHUNK_BYTES`] by `size`, each
/// with at least one item.
fn chunks<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        match out.last_mut() {
            Some(last) if bytes + n <= CHUNK_BYTES => {
                bytes += n;
                last.push(item);
            }
            _ => {
                bytes = n;
                out.push(vec![item]);
            }
        }
    }
    out
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

async fn propose(consensus: &Consensus, cmd: HandoffCommand) -> Result<(), StepError> {
    match consensus.propose(cmd.into_command()).await? {
        Applied::Handoff(HandoffOutcome::Done) => Ok(()),
        Applied::Handoff(HandoffOutcome::Refused(why)) => Err(StepError::Retry(why)),
        other => Err(StepError::Retry(format!("unexpected answer: {other:?}"))),
    }
}

/// Sends one step to `site` and decodes its answer.
async fn step<M: Message>(
    router: &SiteRouter,
    site: &str,
    method: &str,
    message: &M,
) -> Result<wire::HandoffAnswer, StepError> {
    let caller = Caller {
        timeout: Some(STEP_TIMEOUT),
        ..Caller::default()
    };
    let answer = router
        .send(site, method, Bytes::from(message.encode_to_vec()), &caller)
        .await?;
    match Code::from_i32(i32::try_from(answer.code).unwrap_or(-1)) {
        Code::Ok => {
            metrics::counter!("cell0_handoff_steps_total", "result" => "ok").increment(1);
            wire::HandoffAnswer::decode(answer.body)
                .map_err(|e| StepError::Retry(format!("site {site:?} answered {method} with a bad message: {e}")))
        }
        Code::FailedPrecondition | Code::InvalidArgument => Err(StepError::Refused {
            site: site.to_string(),
            why: answer.message,
        }),
        code => Err(StepError::Retry(format!(
            "site {site:?} answered {method} with {code:?}: {}",
            answer.message
        ))),
    }
}

fn memory_to_wire(key: String, e: MemoryEntry) -> wire::HandoffMemoryEntry {
    wire::HandoffMemoryEntry {
        key,
        value: e.value,
        embedding: e.embedding.into(),
        incarnation: e.incarnation,
        written_at_ms: e.written_at_ms,
    }
}

fn memory_from_wire(e: wire::HandoffMemoryEntry) -> (String, MemoryEntry) {
    (
        e.key,
        MemoryEntry {
            value: e.value,
            embedding: e.embedding.to_vec(),
            incarnation: e.incarnation,
            written_at_ms: e.written_at_ms,
        },
    )
}

fn task_to_wire(t: TaskRecord) -> wire::HandoffTask {
    wire::HandoffTask {
        id: t.id,
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

fn task_from_wire(agent: &str, i: usize, t: wire::HandoffTask) -> Result<TaskRecord, ApiError> {
    let status = match t.status.as_str() {
        "queued" => TaskStatus::Queued,
        "succeeded" => TaskStatus::Succeeded,
        "failed" => TaskStatus::Failed,
        other => {
            return Err(ApiError::invalid(
                &format!("tasks[{i}].status"),
                format!("is {other:?}; use queued, succeeded or failed"),
            ));
        }
    };
    Ok(TaskRecord {
        id: t.id,
        agent: agent.to_string(),
        input: t.input.to_vec(),
        idempotency_key: t.idempotency_key,
        status,
        output: t.output.to_vec(),
        error: t.error,
        incarnation: t.incarnation,
        submitted_at_ms: t.submitted_at_ms,
        completed_at_ms: t.completed_at_ms,
    })
}

/// Applies the handoff steps other sites send to this one.
#[derive(Clone)]
pub struct Importer {
    consensus: Consensus,
}

impl Importer {
    /// Applies steps through `consensus`.
    pub fn new(consensus: Consensus) -> Self {
        Self { consensus }
    }

    /// The command `method` with `body` from `from_site` stands for.
    fn command(from_site: &str, method: &str, body: &[u8]) -> Result<HandoffCommand, ApiError> {
        let bad = |e: prost::DecodeError| ApiError::invalid("body", format!("does not decode: {e}"));
        let from_site = from_site.to_string();
        Ok(match method {
            BEGIN => {
                let m = wire::HandoffBegin::decode(body).map_err(bad)?;
                HandoffCommand::ImportBegin {
                    from_site,
                    id: m.handoff_id,
                    sites: sites_from_proto(m.spec.as_ref())?,
                    desired: if m.stopped { Desired::Stopped } else { Desired::Running },
                    spec: spec_from_proto(m.spec)?,
                    incarnation: m.incarnation,
                    created_at_ms: m.created_at_ms,
                    at_ms: now_ms(),
                }
            }
            MEMORY => {
                let m = wire::HandoffMemory::decode(body).map_err(bad)?;
                HandoffCommand::ImportMemory {
                    from_site,
                    id: m.handoff_id,
                    agent: m.agent,
                    entries: m.entries.into_iter().map(memory_from_wire).collect(),
                }
            }
            TASKS => {
                let m = wire::HandoffTasks::decode(body).map_err(bad)?;
                let tasks = m
                    .tasks
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| task_from_wire(&m.agent, i, t))
                    .collect::<Result<_, _>>()?;
                HandoffCommand::ImportTasks {
                    from_site,
                    id: m.handoff_id,
                    agent: m.agent,
                    tasks,
                }
            }
            ACTIVATE => {
                let m = wire::HandoffActivate::decode(body).map_err(bad)?;
                HandoffCommand::Activate {
                    from_site,
                    id: m.handoff_id,
                    agent: m.agent,
                    at_ms: now_ms(),
                }
            }
            other => return Err(ApiError::invalid("method", format!("{other:?} is no handoff step"))),
        })
    }

    async fn apply(&self, from_site: &str, method: &str, body: &[u8]) -> Result<wire::HandoffAnswer, ApiError> {
        let command = Self::command(from_site, method, body)?;
        command.validate().map_err(|e| crate::api::agents::invalid("", e))?;
        let tasks_step = matches!(command, HandoffCommand::ImportTasks { .. });
        let outcome = self.consensus.propose(command.into_command()).await?;
        if tasks_step {
            failpoints::crash_at("handoff-import-tasks");
        }
        match outcome {
            Applied::Handoff(HandoffOutcome::Done) => Ok(wire::HandoffAnswer::default()),
            Applied::Handoff(HandoffOutcome::Imported(moved)) => Ok(wire::HandoffAnswer {
                moved: moved
                    .into_iter()
                    .map(|m| wire::HandoffTaskMove { from: m.from, to: m.to })
                    .collect(),
            }),
            Applied::Handoff(HandoffOutcome::Refused(why)) => Err(ApiError::AgentRefused(why)),
            other => Err(ApiError::Internal(format!(
                "unexpected answer to a handoff step: {other:?}"
            ))),
        }
    }
}

/// What a node does with calls another site sends it: handoff steps go to
/// the [`Importer`], every other call is replayed on the public port.
pub struct SiteCalls {
    replay: LocalReplay,
    importer: Importer,
}

impl SiteCalls {
    /// Serves with `replay` and `importer`.
    pub fn new(replay: LocalReplay, importer: Importer) -> Self {
        Self { replay, importer }
    }
}

impl ForwardHandler for SiteCalls {
    fn serve(
        &self,
        from_site: &str,
        request: wire::ForwardRequest,
    ) -> Pin<Box<dyn Future<Output = wire::ForwardResponse> + Send>> {
        if !request.method.starts_with(METHOD_PREFIX) {
            return self.replay.serve(from_site, request);
        }
        let importer = self.importer.clone();
        let from_site = from_site.to_string();
        Box::pin(async move {
            let result = importer.apply(&from_site, &request.method, &request.body).await;
            match result {
                Ok(answer) => wire::ForwardResponse {
                    request_id: request.request_id,
                    code: 0,
                    message: String::new(),
                    body: Bytes::from(answer.encode_to_vec()),
                    details: Bytes::new(),
                },
                Err(e) => {
                    tracing::debug!(site = %from_site, method = %request.method, error = %e, "a handoff step from another site failed");
                    let status = tonic::Status::from(e);
                    wire::ForwardResponse {
                        request_id: request.request_id,
                        code: status.code() as u32,
                        message: status.message().to_string(),
                        body: Bytes::new(),
                        details: Bytes::copy_from_slice(status.details()),
                    }
                }
            }
        })
    }
}

/// Where calls about an agent go, as its handoffs decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Served here (no handoff holds it, or it arrived here).
    Here,
    /// Another site owns it: calls about it are sent there.
    Elsewhere(String),
    /// Being handed to or from `site`: nothing about it may change now.
    Moving {
        /// The other site of the handoff.
        site: String,
        /// For people.
        why: String,
    },
}

/// Where calls about `agent` go.
pub fn held(txn: &dyn cell0_state::Txn, agent: &str) -> cell0_state::Result<Held> {
    if let Some(site) = handoff::owner_elsewhere(txn, agent)? {
        return Ok(Held::Elsewhere(site));
    }
    let Some(why) = handoff::frozen(txn, agent)? else {
        return Ok(Held::Here);
    };
    let site = match (handoff::outgoing(txn, agent)?, handoff::incoming(txn, agent)?) {
        (Some(out), _) => out.to_site,
        (None, Some(i)) => i.from_site,
        (None, None) => String::new(),
    };
    Ok(Held::Moving { site, why })
}

/// The handoff of `agent` as the API shows it, if any.
pub fn info(txn: &dyn cell0_state::Txn, agent: &str) -> cell0_state::Result<Option<v1::AgentHandoff>> {
    if let Some(out) = handoff::outgoing(txn, agent)? {
        return Ok(Some(v1::AgentHandoff {
            state: "moving".into(),
            site: out.to_site,
            id: out.id,
        }));
    }
    if let Some(m) = handoff::moved(txn, agent)? {
        return Ok(Some(v1::AgentHandoff {
            state: "moved".into(),
            site: m.site,
            id: m.id,
        }));
    }
    Ok(handoff::incoming(txn, agent)?.map(|i| v1::AgentHandoff {
        state: match i.phase {
            handoff::InPhase::Preparing => "arriving",
            handoff::InPhase::Active => "arrived",
        }
        .into(),
        site: i.from_site,
        id: i.id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_stay_under_the_budget_and_never_drop_an_item() {
        let sizes = vec![10, CHUNK_BYTES, 5, CHUNK_BYTES - 5, 1];
        let out = chunks(sizes.clone(), |n| *n);
        assert_eq!(out.concat(), sizes);
        assert_eq!(
            out,
            vec![vec![10], vec![CHUNK_BYTES], vec![5, CHUNK_BYTES - 5], vec![1]]
        );
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }
}
