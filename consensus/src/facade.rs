//! The [`Consensus`] facade: one node's Raft member, as the rest of the
//! node uses it.
//!
//! It owns the openraft instance, the group-commit batcher and the read side
//! of the state machine. Requests go through two entry points: writes
//! ([`Consensus::propose`], every command exactly once through its request id)
//! and reads ([`Consensus::read`] at a [`Consistency`], over one
//! point-in-time view). Where a request runs is [`crate::routing`]'s job;
//! membership decisions are [`crate::membership`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cell0_storage::{Engine, EngineTxn, LogStore, MemEngine, RocksEngine, StateMachineStore, Txn};
use openraft::ServerState;
use openraft::error::{InitializeError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::batcher::{BatchLimits, Batcher, Proposer};
use crate::command::{Command, KeyValue, Limits, RequestId, Response};
use crate::config::ConsensusConfig;
use crate::error::{ConsensusError, Result, UnavailableCause};
use crate::forwarder::{ForwardLimits, Forwarder};
use crate::inner::{Inner, random_u64, wrong_type};
use crate::network::{ChannelPool, NetworkFactory, PeerHealth, TcpTransport, Transport, WireIdentity};
use crate::reads::ReadIndexer;
use crate::routing::{ForwardRequest, ForwardResponse};
use crate::server::InternalService;
use crate::state::{self, Applied, KvStateMachine, StateEvent};
use crate::types::TypeConfig;
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
///
/// Whatever the backend, a member started on storage that a member with
/// the same id used before recovers from it: its vote and log (openraft
/// reads them through the log store), its state machine with the applied
/// index and membership (the state machine store), and the replica's
/// revision and cluster id (read once openraft has started).
#[derive(Debug, Clone)]
pub enum StorageBackend {
    /// RocksDB in this directory (the real path).
    Rocks(PathBuf),
    /// On a new, empty in-memory engine, lost with the member (tests and
    /// simulation only): [`StorageBackend::Shared`] on an engine no one
    /// else keeps. Snapshot files still go to a directory, this one.
    Memory {
        /// Where snapshot files are written.
        snapshot_dir: PathBuf,
    },
    /// On an in-memory engine the caller keeps (tests and simulation
    /// only): a member started again on the same engine and snapshot
    /// directory, once the previous one is shut down, sees what that one
    /// had stored, as a process restarted on its disk. What a crash keeps
    /// is the caller's choice: the engine as it is (a process crash), or a
    /// [`MemEngine::fork`] taken at the crash (so that the crashed member's
    /// late writes are lost), with [`MemEngine::power_loss`] for a machine
    /// that lost its unsynced writes. Never two running members on one
    /// engine.
    Shared {
        /// The engine, shared with the caller.
        engine: Arc<MemEngine>,
        /// Where snapshot files are written.
        snapshot_dir: PathBuf,
    },
}

/// A write's answer: its response, or the state machine's refusal as an
/// invalid argument.
fn write_response(r: ForwardResponse) -> Result<Response> {
    match r {
        ForwardResponse::Write(Response::Rejected(reason)) => Err(ConsensusError::invalid("command", reason)),
        ForwardResponse::Write(r) => Ok(r),
        _ => Err(wrong_type()),
    }
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

/// A snapshot written by [`Consensus::export_snapshot`].
#[derive(Debug)]
pub struct ExportedSnapshot {
    /// The file, open at its start (already unlinked).
    pub file: std::fs::File,
    /// The log index the state is at.
    pub index: u64,
    /// The term of that entry.
    pub term: u64,
    /// What the file holds (rows, size, checksum, cluster id).
    pub summary: cell0_storage::snapshot::FileSummary,
}

/// One node's membership in the Raft group. Cheap to clone.
#[derive(Clone)]
pub struct Consensus {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus").field("id", &self.inner.id).finish()
    }
}

impl Consensus {
    /// Opens storage and starts the Raft member. The node takes part in a
    /// cluster once [`Consensus::initialize`] bootstraps one or a leader adds
    /// it.
    pub async fn start(id: NodeId, info: NodeInfo, config: ConsensusConfig, storage: StorageBackend) -> Result<Self> {
        let transport = Arc::new(TcpTransport {
            connect_timeout: config.connect_timeout(),
            source: None,
        });
        Self::start_with_transport(id, info, config, storage, transport).await
    }

    /// [`Consensus::start`] with every connection to other nodes opened
    /// through `transport` (mutual TLS, a simulated network).
    pub async fn start_with_transport(
        id: NodeId,
        info: NodeInfo,
        config: ConsensusConfig,
        storage: StorageBackend,
        transport: Arc<dyn Transport>,
    ) -> Result<Self> {
        config.validate()?;
        let raft_config = Arc::new(config.to_openraft()?);
        let sm = Arc::new(KvStateMachine::new(state::NOTIFICATION_CAPACITY));
        let pool = Arc::new(ChannelPool::new(transport));
        let identity = WireIdentity {
            node: id,
            cluster: sm.cluster_id_cell(),
        };
        let health = Arc::new(PeerHealth::default());
        let (elections, nudges) = crate::elections::Elections::new(&config);
        let network = NetworkFactory::new(pool.clone(), identity.clone(), health.clone(), config.max_append_bytes)
            .with_elections(elections.clone());
        let read_budget = crate::network::append_read_budget(config.max_append_bytes);
        let parts = RaftParts {
            id,
            config: raft_config,
            read_budget,
            network,
            sm: sm.clone(),
        };
        let (raft, engine, snapshot_dir) = match storage {
            StorageBackend::Rocks(path) => {
                let engine = Arc::new(RocksEngine::open(&path, id)?);
                start_raft(parts, engine, path.join(cell0_storage::SNAPSHOT_DIR)).await?
            }
            StorageBackend::Memory { snapshot_dir } => {
                start_raft(parts, Arc::new(MemEngine::new()), snapshot_dir).await?
            }
            StorageBackend::Shared { engine, snapshot_dir } => start_raft(parts, engine, snapshot_dir).await?,
        };
        // Read once openraft has started: its start re-applies the committed
        // entries the state machine lacks (applies lost in a crash).
        sm.load_revision(&EngineTxn::new(engine.as_ref()))?;
        let batcher = Batcher::spawn(
            Proposer::new(raft.clone(), health.clone()),
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
        let prompt_elections = crate::elections::spawn(id, raft.clone(), elections.clone(), nudges);
        Ok(Self {
            inner: Arc::new_cyclic(|me: &std::sync::Weak<Inner>| Inner {
                forwarder: {
                    let me = me.clone();
                    Forwarder::spawn(
                        ForwardLimits {
                            max_commands: config.max_batch_commands,
                            max_bytes: config.max_batch_bytes,
                            max_inflight: config.max_inflight_batches.saturating_mul(2),
                        },
                        move |cmds| {
                            let me = me.clone();
                            async move {
                                let inner = me.upgrade().ok_or(ConsensusError::ShuttingDown)?;
                                inner.forward_writes(cmds).await
                            }
                        },
                    )
                },
                reads: {
                    let me = me.clone();
                    ReadIndexer::spawn(move || {
                        let me = me.clone();
                        async move {
                            let inner = me.upgrade().ok_or(ConsensusError::ShuttingDown)?;
                            // A round that does not end within a request's
                            // time (a leadership check that never returns)
                            // fails its readers, who may retry, instead of
                            // holding every later reader of this node.
                            let limit = inner.config.request_timeout();
                            match tokio::time::timeout(limit, inner.route(ForwardRequest::ReadIndex)).await {
                                Ok(routed) => match routed? {
                                    ForwardResponse::ReadIndex(i) => Ok(i),
                                    _ => Err(wrong_type()),
                                },
                                Err(_) => Err(ConsensusError::unavailable(
                                    UnavailableCause::NoQuorum,
                                    format!("no read index within {} ms", limit.as_millis()),
                                )),
                            }
                        }
                    })
                },
                snapshot_trigger: crate::snapshots::spawn(
                    raft.clone(),
                    sm.clone(),
                    snapshot_dir.clone(),
                    crate::snapshots::SnapshotRule {
                        every_entries: config.snapshot_every,
                        log_percent: config.snapshot_log_percent,
                    },
                ),
                elections,
                prompt_elections,
                id,
                info,
                config,
                raft,
                engine,
                snapshot_dir,
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
                closing: tokio::sync::watch::Sender::new(false),
                durations: crate::inner::Durations::new(),
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

    /// The channel pool to other nodes: every connection to another node
    /// (blob transfer and joins included) comes from it, over the node's
    /// transport.
    pub fn channels(&self) -> &Arc<ChannelPool> {
        &self.inner.pool
    }

    /// The gRPC service to mount on the internal port. Its Exchange
    /// streams end when this member shuts down.
    pub fn internal_service(&self) -> cell0_proto::internal::raft_server::RaftServer<InternalService> {
        InternalService::server(self.inner.clone(), None)
    }

    /// [`Consensus::internal_service`], whose Exchange streams also end
    /// once `stop` turns true: a server that drains its requests on `stop`
    /// before the member shuts down would otherwise wait for peers to close
    /// their long-lived streams.
    pub fn internal_service_until(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> cell0_proto::internal::raft_server::RaftServer<InternalService> {
        InternalService::server(self.inner.clone(), Some(stop))
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
        match self.propose(Command::InitCluster { cluster_id }).await? {
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

    /// Applies `cmd` through Raft exactly once and returns its response: the
    /// one way to change replicated state.
    /// The command gets a request id; a retry after a lost answer or a
    /// leader change reuses it, and the state machine answers a duplicate
    /// with the first response.
    pub async fn propose(&self, cmd: Command) -> Result<Response> {
        cmd.validate(&self.inner.limits)?;
        let started = Instant::now();
        let cmd = self.with_request_id(cmd);
        // Boxed, once per write: inline, routing's future (2.7 KB in a
        // release build) made every future awaiting a write large (the
        // public port's put handler's 6.1 KB, 0.8 KB with it boxed), and
        // the port moves a handler's future several times per request, each
        // move a copy (docs/benchmarks.md, "The handler's future boxed
        // once").
        let routed = Box::pin(self.inner.route(ForwardRequest::Write(cmd)));
        let result = write_response(routed.await?);
        self.inner.durations.write.record(started.elapsed().as_secs_f64());
        result
    }

    /// Proposes `cmd` only while this node leads in `term`: never forwarded
    /// and never retried. For decisions a leader makes from what only it
    /// saw in its term (a node lease it granted running out): forwarded,
    /// such a decision would be applied by a later leader that granted the
    /// node a new lease. An entry a deposed leader still appends in its old
    /// term is never committed, as a majority refuses that term; and this
    /// node cannot lead again in a later term between the check and the
    /// append, as standing for election takes an election timeout.
    pub async fn propose_as_leader(&self, cmd: Command, term: u64) -> Result<Response> {
        cmd.validate(&self.inner.limits)?;
        let status = self.status();
        if status.role != Role::Leader || status.term != term {
            return Err(ConsensusError::not_leader(None, None));
        }
        let cmd = self.with_request_id(cmd);
        write_response(self.inner.handle_local(ForwardRequest::Write(cmd)).await?)
    }

    /// `cmd` with this node's next request id, for deduplication.
    fn with_request_id(&self, cmd: Command) -> Command {
        let id = RequestId {
            client: self.inner.client_id,
            seq: self.inner.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        Command::Request { id, cmd: Box::new(cmd) }
    }

    /// Waits until a read at `consistency` may be served from the local
    /// replica.
    pub async fn read_barrier(&self, consistency: Consistency) -> Result<()> {
        if consistency == Consistency::Serializable {
            return Ok(());
        }
        if crate::failpoints::stale_reads() {
            // A deliberately broken read path, for the chaos tests to catch.
            return Ok(());
        }
        // Concurrent readers of this node share one read-index round.
        // Boxed, as a write's routing is: inline, the wait made every read's
        // future as large, serializable ones too.
        Box::pin(async {
            let index = self.inner.reads.read_index().await?;
            self.wait_applied(index, self.inner.config.request_timeout()).await
        })
        .await
    }

    /// The pair stored under `key` and the replica's revision, both from one
    /// point-in-time view.
    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<(Option<KeyValue>, u64)> {
        let started = Instant::now();
        self.read_barrier(consistency).await?;
        let out = self.read_view(|txn| Ok((state::get(txn, key)?, state::revision(txn)?)))?;
        self.inner.durations.read.record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Reads the local replica at `consistency` through `read` (a table's
    /// typed read helper, such as `registry::list` or `nodes::resources`),
    /// over one point-in-time view: the one way to read replicated state.
    pub async fn read<T>(
        &self,
        consistency: Consistency,
        read: impl FnOnce(&dyn Txn) -> cell0_state::Result<T>,
    ) -> Result<T> {
        self.read_barrier(consistency).await?;
        self.read_view(|txn| Ok(read(txn)?))
    }

    /// Runs `read` over one point-in-time view of the local replica, so
    /// everything it reads (data, revision, history) belongs to one state.
    pub(crate) fn read_view<T>(&self, read: impl FnOnce(&dyn Txn) -> Result<T>) -> Result<T> {
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

    /// Writes a consistent snapshot of the replicated state, as of a
    /// linearizable read now, into a new file (`cell0 snapshot save`). The
    /// file is returned open and already unlinked, so nothing is left behind
    /// whatever happens to the caller.
    pub async fn export_snapshot(&self) -> Result<ExportedSnapshot> {
        self.read_barrier(Consistency::Linearizable).await?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let n = inner.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // A `.part` name: removed at the next start if this process dies.
            let path = inner.snapshot_dir.join(format!("export-{}-{n}.part", inner.client_id));
            let (meta, summary) =
                cell0_storage::export_snapshot::<TypeConfig, _>(inner.engine.as_ref(), inner.sm.as_ref(), &path)?;
            let file = std::fs::File::open(&path)
                .map_err(|e| ConsensusError::Internal(format!("opening {}: {e}", path.display())))?;
            let _ = std::fs::remove_file(&path);
            Ok(ExportedSnapshot {
                file,
                index: meta.last_log_id.map_or(0, |l| l.index),
                term: meta.last_log_id.map_or(0, |l| l.leader_id.term),
                summary,
            })
        })
        .await
        .map_err(|e| ConsensusError::Internal(format!("snapshot export task: {e}")))?
    }

    /// Subscribes to changes applied on this replica.
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.inner.sm.subscribe()
    }

    /// A receiver whose generation changes after each locally applied
    /// change of `table` (and each snapshot install): wait on it instead of
    /// polling.
    pub fn watch_table(&self, table: crate::Table) -> state::TableWatch {
        self.inner.sm.watch_table(table)
    }

    /// Retained changes under `prefix` from revision `from` on, read from one
    /// point-in-time view (so a compaction in between is reported, not
    /// skipped).
    /// A page ends before [`state::MAX_RANGE_BYTES`] of keys and values.
    pub fn history(&self, prefix: &[u8], from: u64, limit: usize) -> Result<Vec<StateEvent>> {
        self.read_view(|txn| Ok(state::history(txn, prefix, from, limit, state::MAX_RANGE_BYTES)?))
    }

    /// The local replica's revision.
    pub fn revision(&self) -> Result<u64> {
        Ok(state::revision(&EngineTxn::new(self.inner.engine.as_ref()))?)
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
        self.inner.route(ForwardRequest::Join { id, info }).await?;
        Ok(self.members())
    }

    /// Removes node `id` from the group.
    pub async fn remove(&self, id: NodeId) -> Result<()> {
        self.inner.route(ForwardRequest::Remove { id }).await?;
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
        // Read under the borrow: a clone copies openraft's maps on every call.
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
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

    /// The current term, as [`Consensus::status`] reports it, without the
    /// rest (every KV response carries it).
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// The leader's id and record, if one is known.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        self.inner.leader()
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
                Err(_) => {
                    return Err(ConsensusError::unavailable(
                        UnavailableCause::NoLeader,
                        "no leader elected yet",
                    ));
                }
            }
        }
    }

    /// Stops taking writes, stops Raft, joins the group-commit task and
    /// flushes storage. The database closes when the last handle is dropped.
    pub async fn shutdown(&self) {
        self.inner.closing.send_replace(true);
        self.inner.pool.close_streams();
        self.inner.batcher.stop();
        self.inner.forwarder.stop();
        self.inner.reads.stop();
        self.inner.snapshot_trigger.stop();
        self.inner.prompt_elections.stop();
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.inner.batcher.join(self.inner.config.request_timeout()).await;
        self.inner.forwarder.join(self.inner.config.request_timeout()).await;
        self.inner.reads.join(self.inner.config.request_timeout()).await;
        self.inner
            .snapshot_trigger
            .join(self.inner.config.request_timeout())
            .await;
        self.inner
            .prompt_elections
            .join(self.inner.config.request_timeout())
            .await;
        if let Err(e) = self.inner.engine.flush() {
            tracing::warn!(error = %e, "flushing storage");
        }
    }

    /// Waits up to `timeout` until the local replica applied `index`
    /// (`Unavailable`, replica behind, when it did not).
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied index")
            .await
            .map(|_| ())
            .map_err(|e| {
                ConsensusError::unavailable(
                    UnavailableCause::ReplicaBehind,
                    format!("replica did not catch up with the leader: {e}"),
                )
            })
    }
}

/// What openraft starts with, whatever the engine.
struct RaftParts {
    id: NodeId,
    config: Arc<openraft::Config>,
    /// Bytes of entries one replication read gathers.
    read_budget: usize,
    network: NetworkFactory,
    sm: Arc<KvStateMachine>,
}

/// Starts openraft over `engine`, which holds both the log and the state;
/// returns it with the engine and the snapshot directory.
async fn start_raft<E: Engine>(
    parts: RaftParts,
    engine: Arc<E>,
    snapshot_dir: PathBuf,
) -> Result<(Raft, Arc<dyn Engine>, PathBuf)> {
    // Replication reads stop short of the AppendEntries byte bound (the
    // request's own fields take the rest), so a call is rarely cut after it
    // was read.
    let log = LogStore::new(engine.clone()).with_read_budget(parts.read_budget);
    let sm_store = StateMachineStore::new(engine.clone(), parts.sm, snapshot_dir.clone())?;
    let live = sm_store.live_snapshots();
    let network = parts.network.with_live_snapshots(live.clone());
    let raft = Raft::new(parts.id, parts.config, network, log, sm_store)
        .await
        .map_err(|e| ConsensusError::Internal(format!("starting raft: {e}")))?;
    // Lagging members get the state as of now, not the stored snapshot plus
    // every entry since (which they would replay).
    live.enable();
    Ok((raft, engine, snapshot_dir))
}

/// The highest log index stored on a quorum of voters (leader only).
fn quorum_matched(m: &openraft::RaftMetrics<NodeId, NodeInfo>, me: NodeId) -> u64 {
    let replication = m.replication.as_ref();
    let mut matched: Vec<u64> = m
        .membership_config
        .membership()
        .voter_ids()
        .map(|id| {
            if id == me {
                m.last_log_index.unwrap_or(0)
            } else {
                replication
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map_or(0, |l| l.index)
            }
        })
        .collect();
    if matched.is_empty() {
        return 0;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2]
}
