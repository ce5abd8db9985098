//! The [`Consensus`] handle: one node's Raft member with routing.
//!
//! It owns the openraft instance, the group-commit batcher and the read side
//! of the state machine, and decides where each request runs:
//! - writes and membership changes run on the leader; a follower forwards
//!   them over the internal port, retrying only when the request provably was
//!   not proposed (so a retry never applies a write twice);
//! - linearizable reads get a read index from the leader (which confirms its
//!   leadership with a quorum), wait until the local replica has applied it,
//!   then read locally; serializable reads read locally at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cell0_storage::{Engine, EngineTxn, LogStore, MemEngine, RocksEngine, StateMachineStore};
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::batcher::{BatchLimits, Batcher, map_write_error};
use crate::command::{Command, KeyValue, Limits, Response};
use crate::config::ConsensusConfig;
use crate::error::{ConsensusError, Result};
use crate::network::{ChannelPool, NetworkFactory, decode, encode, never_sent};
use crate::nodes::{self, NodeCommand, NodeResources};
use crate::registry::{self, ModelCommand, ModelEntry, ModelOutcome};
use crate::server::InternalService;
use crate::state::{self, Applied, KvStateMachine, StateEvent};
use crate::types::{NodeId, NodeInfo, Raft};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began.
    #[default]
    Linearizable,
    /// The local replica's state, possibly behind the leader.
    Serializable,
}

/// Where the node keeps its Raft log and state.
#[derive(Debug, Clone)]
pub enum StorageBackend {
    /// RocksDB in this directory (the real path).
    Rocks(PathBuf),
    /// In memory, lost on drop (tests and simulation only).
    Memory,
}

/// A member of the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Addresses and names.
    pub info: NodeInfo,
    /// Voter (true) or learner.
    pub voter: bool,
    /// Whether it is the current leader.
    pub leader: bool,
    /// Last log index known replicated to it (leader's view; 0 elsewhere).
    pub matched_index: u64,
}

/// Role of this node in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leader.
    Leader,
    /// Voting follower.
    Follower,
    /// Campaigning.
    Candidate,
    /// Non-voting member, or not yet a member.
    Learner,
    /// Stopped.
    Shutdown,
}

/// A snapshot of this node's consensus state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Role.
    pub role: Role,
    /// The known leader.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Highest log index known committed.
    pub commit_index: u64,
    /// Highest log index applied locally.
    pub applied_index: u64,
    /// Last log index stored locally.
    pub last_log_index: u64,
    /// Store revision of the local replica.
    pub revision: u64,
    /// Whether this node belongs to an initialized cluster.
    pub initialized: bool,
}

/// Requests a follower sends to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardRequest {
    Write(Command),
    ReadIndex,
    Join { id: NodeId, info: NodeInfo },
    Remove { id: NodeId },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardResponse {
    Write(Response),
    ReadIndex(u64),
    Done,
}

pub(crate) struct Inner {
    pub id: NodeId,
    pub info: NodeInfo,
    pub config: ConsensusConfig,
    pub raft: Raft,
    engine: Arc<dyn Engine>,
    sm: Arc<KvStateMachine>,
    batcher: Batcher,
    pool: Arc<ChannelPool>,
    limits: Limits,
    /// Highest commit index a leader has told this node about.
    pub leader_commit: AtomicU64,
}

/// One node's membership in the Raft group. Cheap to clone.
#[derive(Clone)]
pub struct Consensus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus").field("id", &self.inner.id).finish()
    }
}

fn wrong_type() -> ConsensusError {
    ConsensusError::Internal("the leader answered with a response of the wrong kind".into())
}

impl Consensus {
    /// Opens storage and starts the Raft member. The node takes part in a
    /// cluster once [`Consensus::initialize`] bootstraps one or a leader adds
    /// it.
    pub async fn start(id: NodeId, info: NodeInfo, config: ConsensusConfig, storage: StorageBackend) -> Result<Self> {
        config.validate()?;
        let raft_config = Arc::new(config.to_openraft()?);
        let sm = Arc::new(KvStateMachine::new(1024));
        let pool = Arc::new(ChannelPool::new(Duration::from_millis(
            config.rpc_timeout_ms.min(2_000),
        )));
        let network = NetworkFactory::new(pool.clone());
        let (raft, engine): (Raft, Arc<dyn Engine>) = match storage {
            StorageBackend::Rocks(path) => {
                let engine = Arc::new(RocksEngine::open(&path, id)?);
                (
                    start_raft(id, raft_config, network, engine.clone(), sm.clone()).await?,
                    engine,
                )
            }
            StorageBackend::Memory => {
                let engine = Arc::new(MemEngine::new());
                (
                    start_raft(id, raft_config, network, engine.clone(), sm.clone()).await?,
                    engine,
                )
            }
        };
        sm.load_revision(&EngineTxn::new(engine.as_ref()))?;
        let batcher = Batcher::spawn(
            raft.clone(),
            BatchLimits {
                max_commands: config.max_batch_commands,
                max_bytes: config.max_batch_bytes,
                max_inflight: config.max_inflight_batches,
                commit_timeout: config.request_timeout(),
            },
        );
        let limits = Limits {
            max_batch_commands: config.max_client_batch_commands,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                id,
                info,
                config,
                raft,
                engine,
                sm,
                batcher,
                pool,
                limits,
                leader_commit: AtomicU64::new(0),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's record.
    pub fn info(&self) -> &NodeInfo {
        &self.inner.info
    }

    /// The configuration in force.
    pub fn config(&self) -> &ConsensusConfig {
        &self.inner.config
    }

    /// The underlying openraft instance (metrics, tests).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The channel pool to other nodes' internal ports.
    pub fn channels(&self) -> &Arc<ChannelPool> {
        &self.inner.pool
    }

    /// The gRPC service to mount on the internal port.
    pub fn internal_service(&self) -> cell0_proto::internal::raft_server::RaftServer<InternalService> {
        InternalService::server(self.inner.clone())
    }

    /// Bootstraps a new single-member cluster with this node as its only
    /// voter. A node that already belongs to a cluster is left as it is.
    pub async fn initialize(&self) -> Result<()> {
        let members = BTreeMap::from([(self.inner.id, self.inner.info.clone())]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ConsensusError::Internal(format!("initialize: {e}"))),
        }
    }

    /// Whether this node belongs to a cluster (bootstrapped or added).
    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    /// Applies `cmd` through Raft and returns its response.
    pub async fn write(&self, cmd: Command) -> Result<Response> {
        cmd.validate(&self.inner.limits)?;
        let started = Instant::now();
        let result = match self.route(ForwardRequest::Write(cmd)).await? {
            ForwardResponse::Write(Response::Rejected(reason)) => Err(ConsensusError::invalid("command", reason)),
            ForwardResponse::Write(r) => Ok(r),
            _ => Err(wrong_type()),
        };
        metrics::histogram!("cell0_write_duration_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// Waits until a read at `consistency` may be served from the local
    /// replica.
    pub async fn read_barrier(&self, consistency: Consistency) -> Result<()> {
        if consistency == Consistency::Serializable {
            return Ok(());
        }
        let index = match self.route(ForwardRequest::ReadIndex).await? {
            ForwardResponse::ReadIndex(i) => i,
            _ => return Err(wrong_type()),
        };
        self.wait_applied(index).await
    }

    /// The pair stored under `key` and the replica's revision.
    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<(Option<KeyValue>, u64)> {
        let started = Instant::now();
        self.read_barrier(consistency).await?;
        let txn = EngineTxn::new(self.inner.engine.as_ref());
        let out = (state::get(&txn, key)?, state::revision(&txn)?);
        metrics::histogram!("cell0_read_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// A page of pairs under `prefix` after `start_after`, whether more
    /// match, and the replica's revision.
    pub async fn range(
        &self,
        prefix: &[u8],
        start_after: &[u8],
        limit: usize,
        consistency: Consistency,
    ) -> Result<(Vec<KeyValue>, bool, u64)> {
        self.read_barrier(consistency).await?;
        let txn = EngineTxn::new(self.inner.engine.as_ref());
        let (kvs, more) = state::range(&txn, prefix, start_after, limit)?;
        Ok((kvs, more, state::revision(&txn)?))
    }

    /// Subscribes to changes applied on this replica.
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.inner.sm.subscribe()
    }

    /// Every registered model version. Linearizable reads see every
    /// registration acknowledged before the call.
    pub async fn models(&self, consistency: Consistency) -> Result<Vec<ModelEntry>> {
        self.read_barrier(consistency).await?;
        registry::list(&EngineTxn::new(self.inner.engine.as_ref()))
    }

    /// A receiver that changes after each locally applied registry change.
    pub fn watch_registry(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.sm.watch_registry()
    }

    /// Proposes a registry change and returns what it did.
    pub async fn model_command(&self, cmd: ModelCommand) -> Result<ModelOutcome> {
        match self.write(Command::Model(cmd)).await? {
            Response::Model(outcome) => Ok(outcome),
            _ => Err(wrong_type()),
        }
    }

    /// Every node's reported resources, by node id.
    pub async fn node_resources(&self, consistency: Consistency) -> Result<BTreeMap<NodeId, NodeResources>> {
        self.read_barrier(consistency).await?;
        nodes::resources(&EngineTxn::new(self.inner.engine.as_ref()))
    }

    /// Records this node's resources through Raft.
    pub async fn set_resources(&self, resources: NodeResources) -> Result<()> {
        let cmd = Command::Node(NodeCommand::SetResources {
            node: self.inner.id,
            resources,
        });
        match self.write(cmd).await? {
            Response::Node { stored: true } => Ok(()),
            Response::Node { stored: false } => Err(ConsensusError::invalid(
                "resources",
                format!(
                    "cannot be stored: the cluster already has {} node records",
                    nodes::MAX_NODES
                ),
            )),
            _ => Err(wrong_type()),
        }
    }

    /// Retained changes under `prefix` from revision `from` on.
    pub fn history(&self, prefix: &[u8], from: u64, limit: usize) -> Result<Vec<StateEvent>> {
        state::history(&EngineTxn::new(self.inner.engine.as_ref()), prefix, from, limit)
    }

    /// The local replica's revision.
    pub fn revision(&self) -> Result<u64> {
        state::revision(&EngineTxn::new(self.inner.engine.as_ref()))
    }

    /// Adds node `id`: as a learner, then as a voter while the cluster has
    /// fewer than `raft.voters` voters. Calling it again for a member updates
    /// its addresses.
    pub async fn join(&self, id: NodeId, info: NodeInfo) -> Result<Vec<Member>> {
        if id == 0 {
            return Err(ConsensusError::invalid("node_id", "must not be 0"));
        }
        if info.internal_addr.is_empty() {
            return Err(ConsensusError::invalid("internal_addr", "must not be empty"));
        }
        self.route(ForwardRequest::Join { id, info }).await?;
        Ok(self.members())
    }

    /// Removes node `id` from the group.
    pub async fn remove(&self, id: NodeId) -> Result<()> {
        self.route(ForwardRequest::Remove { id }).await?;
        Ok(())
    }

    /// The members as this node knows them.
    pub fn members(&self) -> Vec<Member> {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched = metrics.replication.clone().unwrap_or_default();
        membership
            .nodes()
            .map(|(id, info)| Member {
                id: *id,
                info: info.clone(),
                voter: voters.contains(id),
                leader: metrics.current_leader == Some(*id),
                matched_index: if *id == self.inner.id && metrics.state == ServerState::Leader {
                    metrics.last_log_index.unwrap_or(0)
                } else {
                    matched.get(id).copied().flatten().map_or(0, |l| l.index)
                },
            })
            .collect()
    }

    /// This node's view of the group.
    pub fn status(&self) -> Status {
        let m = self.inner.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let applied = m.last_applied.map_or(0, |l| l.index);
        let commit_index = if role == Role::Leader {
            quorum_matched(&m, self.inner.id)
        } else {
            self.inner.leader_commit.load(Ordering::Acquire)
        };
        Status {
            id: self.inner.id,
            role,
            leader: m.current_leader,
            term: m.current_term,
            commit_index: commit_index.max(applied),
            applied_index: applied,
            last_log_index: m.last_log_index.unwrap_or(0),
            revision: self.inner.sm.cached_revision(),
            initialized: m.membership_config.membership().nodes().next().is_some(),
        }
    }

    /// The leader's id and record, if one is known.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let info = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, info))
    }

    /// Waits until some leader is known, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId> {
        let mut rx = self.inner.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Ok(l);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ConsensusError::ShuttingDown),
                Err(_) => return Err(ConsensusError::unavailable("no leader elected yet")),
            }
        }
    }

    /// Stops Raft and flushes storage. The database closes when the last
    /// handle is dropped.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.inner.engine.flush() {
            tracing::warn!(error = %e, "flushing storage");
        }
    }

    async fn wait_applied(&self, index: u64) -> Result<()> {
        self.inner
            .raft
            .wait(Some(self.inner.config.request_timeout()))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|e| ConsensusError::unavailable(format!("replica did not catch up with the leader: {e}")))
    }

    /// Runs `req` on the leader, forwarding when this node is not it, and
    /// retries while the failure guarantees the request was not applied.
    async fn route(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        let deadline = Instant::now() + self.inner.config.request_timeout();
        let mut metrics = self.inner.raft.metrics();
        loop {
            let leader = self.leader();
            let result = match &leader {
                Some((id, _)) if *id == self.inner.id => self.inner.handle_local(req.clone()).await,
                Some((id, info)) => self.forward(*id, info, &req).await,
                None => Err(ConsensusError::unavailable("no leader is elected")),
            };
            match result {
                Err(ConsensusError::Unavailable { .. }) if Instant::now() < deadline => {
                    // Wait for news of the leader (or a short pause: a dead
                    // leader stays "known" until the election timeout).
                    let pause = Duration::from_millis(50).min(deadline - Instant::now());
                    metrics.borrow_and_update();
                    let _ = tokio::time::timeout(pause, metrics.changed()).await;
                }
                Err(ConsensusError::Unavailable { reason, .. }) => {
                    let leader = self.leader();
                    return Err(ConsensusError::Unavailable {
                        reason,
                        leader_id: leader.as_ref().map(|l| l.0),
                        leader_addr: leader.map(|l| l.1.public_addr),
                    });
                }
                other => return other,
            }
        }
    }

    async fn forward(&self, leader: NodeId, info: &NodeInfo, req: &ForwardRequest) -> Result<ForwardResponse> {
        let mut client = self.inner.pool.client(&info.internal_addr)?;
        let mut request = tonic::Request::new(encode(req)?);
        request.set_timeout(self.inner.config.rpc_timeout());
        match client.forward(request).await {
            Ok(reply) => decode::<Result<ForwardResponse>>(reply.get_ref())?,
            Err(status) => {
                let idempotent = !matches!(req, ForwardRequest::Write(_));
                if idempotent || never_sent(&status) {
                    Err(ConsensusError::Unavailable {
                        reason: format!("leader {leader} unreachable: {}", status.message()),
                        leader_id: Some(leader),
                        leader_addr: Some(info.public_addr.clone()),
                    })
                } else {
                    Err(ConsensusError::Indeterminate(format!(
                        "lost contact with leader {leader} after sending the write: {}",
                        status.message()
                    )))
                }
            }
        }
    }
}

/// Starts openraft over `engine`, which holds both the log and the state.
async fn start_raft<E: Engine>(
    id: NodeId,
    config: Arc<openraft::Config>,
    network: NetworkFactory,
    engine: Arc<E>,
    sm: Arc<KvStateMachine>,
) -> Result<Raft> {
    let log = LogStore::new(engine.clone());
    let sm_store = StateMachineStore::new(engine, sm)?;
    Raft::new(id, config, network, log, sm_store)
        .await
        .map_err(|e| ConsensusError::Internal(format!("starting raft: {e}")))
}

/// The highest log index stored on a quorum of voters (leader only).
fn quorum_matched(m: &openraft::RaftMetrics<NodeId, NodeInfo>, me: NodeId) -> u64 {
    let replication = m.replication.clone().unwrap_or_default();
    let mut matched: Vec<u64> = m
        .membership_config
        .membership()
        .voter_ids()
        .map(|id| {
            if id == me {
                m.last_log_index.unwrap_or(0)
            } else {
                replication.get(&id).copied().flatten().map_or(0, |l| l.index)
            }
        })
        .collect();
    if matched.is_empty() {
        return 0;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2]
}

impl Inner {
    /// Serves a request that must run on the leader, without forwarding.
    pub(crate) async fn handle_local(&self, req: ForwardRequest) -> Result<ForwardResponse> {
        match req {
            ForwardRequest::Write(cmd) => {
                cmd.validate(&self.limits)?;
                if self.raft.metrics().borrow().state != ServerState::Leader {
                    return Err(ConsensusError::not_leader(None, None));
                }
                Ok(ForwardResponse::Write(self.batcher.submit(cmd).await?))
            }
            ForwardRequest::ReadIndex => match self.raft.get_read_log_id().await {
                Ok((read, _)) => Ok(ForwardResponse::ReadIndex(read.map_or(0, |l| l.index))),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(ConsensusError::not_leader(f.leader_id, f.leader_node))
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => Err(ConsensusError::unavailable(
                    format!("leadership not confirmed by a quorum: {e}"),
                )),
                Err(RaftError::Fatal(_)) => Err(ConsensusError::ShuttingDown),
            },
            ForwardRequest::Join { id, info } => self.join_local(id, info).await,
            ForwardRequest::Remove { id } => self.remove_local(id).await,
        }
    }

    async fn join_local(&self, id: NodeId, info: NodeInfo) -> Result<ForwardResponse> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Err(ConsensusError::not_leader(None, None));
        }
        let membership = metrics.membership_config.membership().clone();
        match membership.get_node(&id) {
            Some(existing) if *existing == info => {}
            Some(_) => {
                self.raft
                    .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, info.clone())])), false)
                    .await
                    .map_err(map_write_error)?;
            }
            None => {
                tracing::info!(node = id, %info, "adding learner");
                self.raft
                    .add_learner(id, info.clone(), true)
                    .await
                    .map_err(map_write_error)?;
            }
        }
        let voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if !voters.contains(&id) && voters.len() < self.config.voters {
            tracing::info!(node = id, "promoting learner to voter");
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(map_write_error)?;
        }
        Ok(ForwardResponse::Done)
    }

    async fn remove_local(&self, id: NodeId) -> Result<ForwardResponse> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Err(ConsensusError::not_leader(None, None));
        }
        let membership = metrics.membership_config.membership().clone();
        if membership.get_node(&id).is_none() {
            return Err(ConsensusError::NotFound(format!("node {id} is not a member")));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ConsensusError::invalid(
                    "node_id",
                    "is the last voter; it cannot be removed",
                ));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(map_write_error)?;
        Ok(ForwardResponse::Done)
    }
}
