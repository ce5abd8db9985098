//! The [`Consensus`] handle: one node's Raft member with routing.
//!
//! It owns the openraft instance, the group-commit batcher and the read side
//! of the state machine, and decides where each request runs:
//! - writes and membership changes run on the leader; a follower forwards
//!   them over the internal port. Every write carries a request id
//!   ([`RequestId`]) that the state machine deduplicates, so a write is
//!   retried (with the same id) after any failure until the request
//!   deadline and still applies once; membership changes are retried only
//!   when they provably were not proposed;
//! - membership decisions are serialised on the leader: a joining node must
//!   prove its advertised internal address reaches it (Identify), a learner
//!   is promoted only when it is reachable and caught up, and a removal must
//!   leave a quorum of healthy voters in the new configuration (etcd's
//!   strict reconfiguration check);
//! - linearizable reads get a read index from the leader (which confirms its
//!   leadership with a quorum), wait until the local replica has applied it,
//!   then read locally; serializable reads read locally at once. Every read
//!   takes its data and the revision it reports from one point-in-time view.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cell0_storage::{Engine, EngineTxn, LogStore, MemEngine, RocksEngine, StateMachineStore, Txn};
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::batcher::{BatchLimits, Batcher, map_write_error};
use crate::command::{Command, KeyValue, Limits, RequestId, Response};
use crate::config::ConsensusConfig;
use crate::error::{ConsensusError, Result};
use crate::network::{ChannelPool, NetworkFactory, PeerHealth, WireIdentity, decode, encode, identify, never_sent};
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
    /// Whether it answered a Raft call within the election timeout (leader's
    /// view; on other nodes only the node itself counts as reachable).
    pub reachable: bool,
}

/// How far behind the leader's last log index a learner may be and still be
/// promoted to voter. A further one would stall commits while it catches up.
pub const MAX_PROMOTION_LAG: u64 = 1_000;

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
    /// This node's id and cluster id on the wire.
    pub identity: WireIdentity,
    /// When each peer last answered (meaningful on the leader).
    health: Arc<PeerHealth>,
    /// Serialises membership decisions on the leader.
    membership: tokio::sync::Mutex<()>,
    /// This process's client id for request ids: random per start.
    client_id: u64,
    /// The next request sequence number.
    next_seq: AtomicU64,
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
        let sm = Arc::new(KvStateMachine::new(state::NOTIFICATION_CAPACITY));
        let pool = Arc::new(ChannelPool::new(Duration::from_millis(
            config.rpc_timeout_ms.min(2_000),
        )));
        let identity = WireIdentity {
            node: id,
            cluster: sm.cluster_id_cell(),
        };
        let health = Arc::new(PeerHealth::default());
        let network = NetworkFactory::new(pool.clone(), identity.clone(), health.clone(), config.max_append_bytes);
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
                identity,
                health,
                membership: tokio::sync::Mutex::new(()),
                client_id: random_u64(id),
                next_seq: AtomicU64::new(1),
            }),
        })
    }

    /// The cluster's id, 0 until this replica has applied it.
    pub fn cluster_id(&self) -> u64 {
        self.inner.identity.cluster_id()
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
    /// voter and records a new cluster id. A node that already belongs to a
    /// cluster is left as it is.
    pub async fn initialize(&self) -> Result<()> {
        let members = BTreeMap::from([(self.inner.id, self.inner.info.clone())]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => return Ok(()),
            Err(e) => return Err(ConsensusError::Internal(format!("initialize: {e}"))),
        }
        self.wait_for_leader(self.inner.config.request_timeout()).await?;
        let cluster_id = random_u64(self.inner.id ^ 0x5eed);
        match self.write(Command::InitCluster { cluster_id }).await? {
            Response::ClusterId(id) => {
                tracing::info!(cluster_id = format!("{id:016x}"), "cluster formed");
                Ok(())
            }
            _ => Err(wrong_type()),
        }
    }

    /// Whether this node belongs to a cluster (bootstrapped or added).
    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    /// Applies `cmd` through Raft exactly once and returns its response.
    /// The command gets a request id; a retry after a lost answer or a
    /// leader change reuses it, and the state machine answers a duplicate
    /// with the first response.
    pub async fn write(&self, cmd: Command) -> Result<Response> {
        cmd.validate(&self.inner.limits)?;
        let started = Instant::now();
        let id = RequestId {
            client: self.inner.client_id,
            seq: self.inner.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        let cmd = Command::Request { id, cmd: Box::new(cmd) };
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

    /// The pair stored under `key` and the replica's revision, both from one
    /// point-in-time view.
    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<(Option<KeyValue>, u64)> {
        let started = Instant::now();
        self.read_barrier(consistency).await?;
        let out = self.read_view(|txn| Ok((state::get(txn, key)?, state::revision(txn)?)))?;
        metrics::histogram!("cell0_read_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Runs `read` over one point-in-time view of the local replica, so
    /// everything it reads (data, revision, history) belongs to one state.
    pub fn read_view<T>(&self, read: impl FnOnce(&dyn Txn) -> Result<T>) -> Result<T> {
        let mut read = Some(read);
        let mut out = None;
        self.inner.engine.with_view(&mut |view| {
            if let Some(read) = read.take() {
                out = Some(read(&EngineTxn::new(view)));
            }
            Ok(())
        })?;
        out.unwrap_or_else(|| Err(ConsensusError::Internal("the storage view was not read".into())))
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
        self.read_view(|txn| {
            let (kvs, more) = state::range(txn, prefix, start_after, limit)?;
            Ok((kvs, more, state::revision(txn)?))
        })
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

    /// Retained changes under `prefix` from revision `from` on, read from one
    /// point-in-time view (so a compaction in between is reported, not
    /// skipped).
    /// A page ends before [`state::MAX_RANGE_BYTES`] of keys and values.
    pub fn history(&self, prefix: &[u8], from: u64, limit: usize) -> Result<Vec<StateEvent>> {
        self.read_view(|txn| state::history(txn, prefix, from, limit, state::MAX_RANGE_BYTES))
    }

    /// The local replica's revision.
    pub fn revision(&self) -> Result<u64> {
        state::revision(&EngineTxn::new(self.inner.engine.as_ref()))
    }

    /// Adds node `id`: as a learner, then as a voter while the cluster has
    /// fewer than `raft.voters` voters and the learner is reachable and
    /// caught up. Calling it again for a member updates its addresses or
    /// finishes its promotion: the outcome depends on the node's state, not
    /// on how often it was asked.
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
                reachable: self.inner.reachable(*id),
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
        let deduplicated = matches!(req, ForwardRequest::Write(Command::Request { .. }));
        // Set once an attempt may have reached a log: the final error must
        // then say the outcome is unknown.
        let mut maybe_applied: Option<String> = None;
        loop {
            let leader = self.leader();
            let result = match &leader {
                Some((id, _)) if *id == self.inner.id => self.inner.handle_local(req.clone()).await,
                Some((id, info)) => self.forward(*id, info, &req).await,
                None => Err(ConsensusError::unavailable("no leader is elected")),
            };
            let error = match result {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if let ConsensusError::Indeterminate(m) = &error {
                maybe_applied = Some(m.clone());
            }
            if may_retry(&error, deduplicated) && Instant::now() < deadline {
                // Wait for news of the leader (or a short pause: a dead
                // leader stays "known" until the election timeout).
                let pause = Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
                metrics.borrow_and_update();
                let _ = tokio::time::timeout(pause, metrics.changed()).await;
                continue;
            }
            return Err(match (error, maybe_applied) {
                (ConsensusError::Unavailable { reason, .. }, Some(earlier)) => {
                    ConsensusError::Indeterminate(format!("{earlier}; then {reason}"))
                }
                (ConsensusError::Unavailable { reason, .. }, None) => {
                    let leader = self.leader();
                    ConsensusError::Unavailable {
                        reason,
                        leader_id: leader.as_ref().map(|l| l.0),
                        leader_addr: leader.map(|l| l.1.public_addr),
                    }
                }
                (other, _) => other,
            });
        }
    }

    async fn forward(&self, leader: NodeId, info: &NodeInfo, req: &ForwardRequest) -> Result<ForwardResponse> {
        let mut client = self.inner.pool.client(&info.internal_addr)?;
        let mut request = tonic::Request::new(self.inner.identity.stamp(encode(req)?, leader));
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

/// Whether a failed attempt may be sent again. `Unavailable` proves the
/// request was not applied (no leader, or it was refused before proposing).
/// `Indeterminate` (the request may be in a log) allows a retry only for a
/// deduplicated write: the state machine applies its request id once.
pub(crate) fn may_retry(error: &ConsensusError, deduplicated: bool) -> bool {
    match error {
        ConsensusError::Unavailable { .. } => true,
        ConsensusError::Indeterminate(_) => deduplicated,
        _ => false,
    }
}

/// A random u64 from the OS-seeded hasher keys of the standard library,
/// mixed with `salt` and the time; never 0.
fn random_u64(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish().max(1)
}

/// Whether `addr` (host:port) names the local host.
pub(crate) fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses addresses that another member already uses, and a loopback
/// address in a membership that spans hosts (or the reverse): such a member
/// would be reached at the wrong process.
pub(crate) fn check_addresses<'a>(
    others: impl IntoIterator<Item = (&'a NodeId, &'a NodeInfo)>,
    id: NodeId,
    info: &NodeInfo,
) -> Result<()> {
    let joiner_loopback = is_loopback(&info.internal_addr);
    for (other_id, other) in others {
        if *other_id == id {
            continue;
        }
        if other.internal_addr == info.internal_addr {
            return Err(ConsensusError::invalid(
                "internal_addr",
                format!("{} is already the address of node {other_id}", info.internal_addr),
            ));
        }
        if other.public_addr == info.public_addr {
            return Err(ConsensusError::invalid(
                "public_addr",
                format!("{} is already the address of node {other_id}", info.public_addr),
            ));
        }
        if is_loopback(&other.internal_addr) != joiner_loopback {
            return Err(ConsensusError::invalid(
                "internal_addr",
                format!(
                    "{} is {} but node {other_id} advertises {}: in a cluster that spans hosts every node must advertise an address the others can reach (set advertise.internal)",
                    info.internal_addr,
                    if joiner_loopback {
                        "a loopback address"
                    } else {
                        "not a loopback address"
                    },
                    other.internal_addr
                ),
            ));
        }
    }
    Ok(())
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

    /// Whether `peer` is this node or answered within the election timeout.
    fn reachable(&self, peer: NodeId) -> bool {
        peer == self.id
            || self
                .health
                .reached_within(peer, Duration::from_millis(self.config.election_timeout_max_ms))
    }

    /// Records a cluster id if the cluster has none yet (a cluster formed by
    /// an older version). Leader only.
    async fn ensure_cluster_id(&self) -> Result<()> {
        if self.identity.cluster_id() != 0 {
            return Ok(());
        }
        let cluster_id = random_u64(self.id ^ 0x5eed);
        let id = RequestId {
            client: self.client_id,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        let cmd = Command::Request {
            id,
            cmd: Box::new(Command::InitCluster { cluster_id }),
        };
        match self.batcher.submit(cmd).await? {
            Response::ClusterId(_) => Ok(()),
            _ => Err(wrong_type()),
        }
    }

    /// Checks that `info.internal_addr` reaches node `id` of no other cluster.
    async fn verify_address(&self, id: NodeId, info: &NodeInfo) -> Result<()> {
        let answer = identify(&self.pool, &info.internal_addr, id, self.config.rpc_timeout())
            .await
            .map_err(|s| {
                ConsensusError::unavailable(format!(
                    "node {id} cannot be reached at its internal address {}: {}",
                    info.internal_addr,
                    s.message()
                ))
            })?;
        if answer.node_id != id {
            return Err(ConsensusError::invalid(
                "internal_addr",
                format!(
                    "{} reaches node {}, not the joining node {id}; advertise an internal address the other nodes reach this node at",
                    info.internal_addr, answer.node_id
                ),
            ));
        }
        let ours = self.identity.cluster_id();
        if answer.cluster_id != 0 && ours != 0 && answer.cluster_id != ours {
            return Err(ConsensusError::FailedPrecondition(format!(
                "node {id} belongs to another cluster ({:016x}); start it with an empty data dir to join this one",
                answer.cluster_id
            )));
        }
        Ok(())
    }

    /// Waits until learner `id` is reachable and within
    /// [`MAX_PROMOTION_LAG`] entries of the leader's log, up to the request
    /// timeout.
    async fn wait_caught_up(&self, id: NodeId) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout();
        let mut rx = self.raft.metrics();
        loop {
            let (matched, last) = {
                let m = rx.borrow_and_update();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map_or(0, |l| l.index);
                (matched, m.last_log_index.unwrap_or(0))
            };
            if self.reachable(id) && matched + MAX_PROMOTION_LAG >= last {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ConsensusError::FailedPrecondition(format!(
                    "learner {id} is not ready to vote: it {} and has {matched} of {last} log entries; it stays a learner, join again once it is up",
                    if self.reachable(id) {
                        "is reachable"
                    } else {
                        "does not answer"
                    }
                )));
            }
            let pause = Duration::from_millis(50);
            let _ = tokio::time::timeout(pause, rx.changed()).await;
        }
    }

    async fn join_local(&self, id: NodeId, info: NodeInfo) -> Result<ForwardResponse> {
        let _decision = self.membership.lock().await;
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(ConsensusError::not_leader(None, None));
        }
        self.ensure_cluster_id().await?;
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        check_addresses(membership.nodes(), id, &info)?;
        match membership.get_node(&id) {
            Some(existing) if *existing == info => {}
            Some(_) => {
                self.verify_address(id, &info).await?;
                tracing::info!(node = id, %info, "updating member addresses");
                self.raft
                    .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, info.clone())])), false)
                    .await
                    .map_err(map_write_error)?;
            }
            None => {
                self.verify_address(id, &info).await?;
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
            self.wait_caught_up(id).await?;
            tracing::info!(node = id, "promoting learner to voter");
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(map_write_error)?;
        }
        Ok(ForwardResponse::Done)
    }

    async fn remove_local(&self, id: NodeId) -> Result<ForwardResponse> {
        let _decision = self.membership.lock().await;
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
            let remaining: Vec<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
            let healthy = remaining.iter().filter(|v| self.reachable(**v)).count();
            let quorum = remaining.len() / 2 + 1;
            if healthy < quorum {
                return Err(ConsensusError::FailedPrecondition(format!(
                    "removing node {id} would leave {healthy} reachable voters of {}, fewer than the quorum of {quorum} the change needs to commit; bring the unreachable voters back first",
                    remaining.len()
                )));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(addr: &str, public: &str) -> NodeInfo {
        NodeInfo {
            name: "n".into(),
            site: "s".into(),
            public_addr: public.into(),
            internal_addr: addr.into(),
        }
    }

    #[test]
    fn only_provably_unapplied_or_deduplicated_requests_are_retried() {
        let unavailable = ConsensusError::unavailable("no leader");
        let unknown = ConsensusError::Indeterminate("lost the leader".into());
        assert!(may_retry(&unavailable, false));
        assert!(may_retry(&unavailable, true));
        assert!(!may_retry(&unknown, false), "a membership change may be in a log");
        assert!(may_retry(&unknown, true), "a request id makes a retry safe");
        assert!(!may_retry(&ConsensusError::invalid("key", "bad"), true));
        assert!(!may_retry(&ConsensusError::ShuttingDown, true));
    }

    #[test]
    fn loopback_and_duplicate_addresses_are_refused() {
        assert!(is_loopback("127.0.0.1:7101"));
        assert!(is_loopback("127.0.0.2:7101"));
        assert!(is_loopback("localhost:7101"));
        assert!(is_loopback("[::1]:7101"));
        assert!(!is_loopback("10.0.0.5:7101"));
        assert!(!is_loopback("node-a.example:7101"));

        let hosts = BTreeMap::from([(1, info("10.0.0.1:7101", "10.0.0.1:7100"))]);
        let err = check_addresses(&hosts, 2, &info("127.0.0.1:7101", "10.0.0.2:7100")).unwrap_err();
        assert!(err.to_string().contains("internal_addr"), "{err}");
        let err = check_addresses(&hosts, 2, &info("10.0.0.1:7101", "10.0.0.2:7100")).unwrap_err();
        assert!(err.to_string().contains("already the address of node 1"), "{err}");
        check_addresses(&hosts, 2, &info("10.0.0.2:7101", "10.0.0.2:7100")).unwrap();
        // A member updating its own record is not a duplicate of itself.
        check_addresses(&hosts, 1, &info("10.0.0.1:7101", "10.0.0.1:7100")).unwrap();

        let local = BTreeMap::from([(1, info("127.0.0.1:7101", "127.0.0.1:7100"))]);
        check_addresses(&local, 2, &info("127.0.0.2:7101", "127.0.0.2:7100")).unwrap();
        assert!(check_addresses(&local, 2, &info("10.0.0.2:7101", "10.0.0.2:7100")).is_err());
    }
}
