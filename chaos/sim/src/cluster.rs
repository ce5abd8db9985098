//! A simulated cluster: consensus members in this process, each on an
//! in-memory engine the cluster keeps ([`StorageBackend::Shared`]), with
//! its internal gRPC service served over the [simulated network](crate::net).
//!
//! Election timeouts: openraft 0.9 draws a member's election timeout once,
//! when its Raft starts, from `rand::thread_rng()` within
//! `[election_timeout_min, election_timeout_max)`. The simulator gives each
//! member a range one millisecond wide (`[t, t + 1)`), which leaves that
//! draw exactly one value: the timeouts are the seed's choice (distinct
//! values, a seeded permutation of the members), not the thread's, and a
//! restarted member gets its timeout again.
//!
//! Crashes and restarts: a crash ([`SimCluster::crash_as`]) takes the
//! member off the network (its connections reset, dials to it refused),
//! keeps a copy of its engine as it is at that instant
//! ([`MemEngine::fork`]), after a [`MemEngine::power_loss`] for a
//! [`Crash::PowerLoss`], and then shuts the old member down. The old
//! member keeps the original engine until its last task is gone, so
//! nothing it does after the crash reaches the storage a restart reads.
//! [`SimCluster::restart`] starts a new member with the same id, address,
//! configuration and snapshot directory on the copy, and puts it back on
//! the network: it recovers its vote, log, state machine and membership
//! from that storage, as a process restarted on its disk.
//!
//! Disks: in [`SimCluster::start`]'s runs each member's log syncs take a
//! time drawn from the seed (up to [`MAX_SYNC_LATENCY_US`]), on the
//! simulated clock: a leader replicates while its own write syncs, and a
//! power loss can take a leader's entries that its followers already hold.
//!
//! Builds: in half of the runs ([`SimCluster::start`] draws it) one member
//! serves the internal API of a build from before `Exchange` streams
//! ([`Build::WithoutExchange`]): it answers them UNIMPLEMENTED, so its
//! peers send it unary calls, as in a rolling upgrade.
//!
//! Invariants: at most one running member per id, and a member runs only
//! on its own engine; a member that is down is in neither the network's
//! servers nor the clients' [`Handles`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cell0_consensus::network::server_builder;
use cell0_consensus::{Consensus, ConsensusConfig, NodeId, NodeInfo, Role, StorageBackend};
use cell0_storage::MemEngine;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::SimError;
use crate::net::{SimNet, SimTransport, addr_of};
use crate::workload::Handles;

/// Greatest time a member's log sync takes in [`SimCluster::start`]'s
/// runs (each member's drawn from the seed, kept across its crashes).
pub const MAX_SYNC_LATENCY_US: u64 = 2_000;

/// Which internal API a member serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// This build's, `Exchange` streams included.
    Current,
    /// An older build's: `Exchange` answers UNIMPLEMENTED.
    WithoutExchange,
}

/// The member of an older build in a run, as [`SimCluster::older_build`]
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OlderBuild {
    /// The member.
    pub member: NodeId,
    /// Exchange streams its peers tried to open to it.
    pub refused_streams: u64,
}

/// What a crash keeps of a member's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The process dies, the machine runs on: every write the engine took
    /// is kept, synced or not (the OS still holds the unsynced ones).
    Process,
    /// The machine loses power: only what was synced is kept.
    PowerLoss,
}

/// One member.
struct SimNode {
    id: NodeId,
    /// The internal API it serves (kept across restarts).
    build: Build,
    /// Exchange streams it refused ([`Build::WithoutExchange`]).
    refused: Arc<AtomicU64>,
    config: ConsensusConfig,
    snapshot_dir: PathBuf,
    /// Its disk: the engine it runs on, or will restart on.
    engine: Arc<MemEngine>,
    /// `None` while it is down.
    consensus: Option<Consensus>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// The members of one simulation.
pub struct SimCluster {
    net: SimNet,
    nodes: Vec<SimNode>,
    handles: Handles,
    /// Snapshot directories (the in-memory engine still writes snapshot
    /// files; the simulation's configuration never builds one).
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("nodes", &self.nodes.iter().map(|n| n.id).collect::<Vec<_>>())
            .finish()
    }
}

/// The consensus configuration of a member of a cluster of `voters`
/// voters whose election timeout is `election_ms`.
pub fn member_config(voters: usize, election_ms: u64) -> ConsensusConfig {
    ConsensusConfig {
        voters,
        heartbeat_ms: 100,
        // One value: openraft's draw cannot choose (see the module notes).
        election_timeout_min_ms: election_ms,
        election_timeout_max_ms: election_ms + 1,
        // No snapshots: building and installing one runs on threads of
        // their own, outside the simulated schedule.
        snapshot_every: u64::MAX / 2,
        request_timeout_ms: 4_000,
        rpc_timeout_ms: 1_000,
        ..ConsensusConfig::default()
    }
}

impl SimCluster {
    /// Starts `n` members (ids 1..=n; 1, 3 or 5) on `net`, bootstraps the
    /// cluster on member 1 and joins the others as voters. Election
    /// timeouts are 300 ms and then a spacing (drawn from `rng`, 30 to 80
    /// ms) apart, given to the members in an order drawn from `rng`.
    pub async fn start(n: u64, net: SimNet, rng: &mut StdRng) -> Result<Self, SimError> {
        let mut order: Vec<u64> = (0..n).collect();
        order.shuffle(rng);
        // A jitter so that seeds also differ in how far apart the timeouts are.
        let spacing = rng.random_range(30..=80);
        let timeouts: Vec<u64> = order.iter().map(|rank| 300 + rank * spacing).collect();
        let older = rng.random_bool(0.5).then(|| rng.random_range(1..=n));
        let cluster = Self::start_members(net, &timeouts, older).await?;
        for node in &cluster.nodes {
            node.engine
                .set_sync_latency(Duration::from_micros(rng.random_range(0..=MAX_SYNC_LATENCY_US)));
        }
        Ok(cluster)
    }

    /// Starts one member per entry of `election_ms` (ids 1..; 1, 3 or 5),
    /// member *i* with the election timeout `election_ms[i - 1]` (its
    /// leader lease is that plus one millisecond, see the module notes), on
    /// `net`; bootstraps the cluster on member 1, which leads, and joins the
    /// others as voters.
    pub async fn start_with_timeouts(net: SimNet, election_ms: &[u64]) -> Result<Self, SimError> {
        Self::start_members(net, election_ms, None).await
    }

    /// [`SimCluster::start_with_timeouts`], member `older` (if any) serving
    /// [`Build::WithoutExchange`].
    async fn start_members(net: SimNet, election_ms: &[u64], older: Option<NodeId>) -> Result<Self, SimError> {
        let n = u64::try_from(election_ms.len()).unwrap_or(u64::MAX);
        let voters = election_ms.len();
        let dir = tempfile::tempdir().map_err(|e| SimError::Setup(format!("temp dir: {e}")))?;
        let mut nodes = Vec::new();
        for (i, &election_ms) in (1..=n).zip(election_ms) {
            let snapshot_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&snapshot_dir).map_err(|e| SimError::Setup(format!("snapshot dir: {e}")))?;
            let mut node = SimNode {
                id: i,
                build: if older == Some(i) {
                    Build::WithoutExchange
                } else {
                    Build::Current
                },
                refused: Arc::default(),
                config: member_config(voters, election_ms),
                snapshot_dir,
                engine: Arc::new(MemEngine::new()),
                consensus: None,
                stop: None,
                server: None,
            };
            node.start(&net).await?;
            nodes.push(node);
        }
        let handles = Handles::default();
        for node in &nodes {
            if let Some(c) = &node.consensus {
                handles.insert(node.id, c.clone());
            }
        }
        let cluster = SimCluster {
            net,
            nodes,
            handles,
            _dir: dir,
        };
        let first = cluster
            .consensus(1)
            .ok_or_else(|| SimError::Setup("no member 1".into()))?;
        first
            .initialize()
            .await
            .map_err(|e| SimError::Setup(format!("initialize: {e}")))?;
        for node in &cluster.nodes[1..] {
            if let Some(c) = &node.consensus {
                first
                    .join(node.id, c.info().clone())
                    .await
                    .map_err(|e| SimError::Setup(format!("join {}: {e}", node.id)))?;
            }
        }
        // Every member a voter before the workload starts.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let voters = first.members().iter().filter(|m| m.voter).count();
            if voters == cluster.nodes.len() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SimError::Setup(format!("only {voters} voters after 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(cluster)
    }

    /// The handles clients use (members that are up).
    pub fn handles(&self) -> Handles {
        self.handles.clone()
    }

    /// Member ids, in order.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Members that have not crashed.
    pub fn up(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.consensus.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Member `id`'s consensus, unless it crashed.
    pub fn consensus(&self, id: NodeId) -> Option<&Consensus> {
        self.nodes.iter().find(|n| n.id == id)?.consensus.as_ref()
    }

    /// The member that leads in the highest term, as the members that are
    /// up see themselves.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.consensus.as_ref().map(|c| c.status()))
            .filter(|s| s.role == Role::Leader)
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// The engine member `id` runs on or, while it is down, will restart on.
    pub fn engine(&self, id: NodeId) -> Option<Arc<MemEngine>> {
        Some(self.nodes.iter().find(|n| n.id == id)?.engine.clone())
    }

    /// Crashes member `id` with a power loss ([`Crash::PowerLoss`]).
    pub async fn crash(&mut self, id: NodeId) {
        self.crash_as(id, Crash::PowerLoss).await;
    }

    /// Crashes member `id`, keeping of its storage what `kind` keeps, for a
    /// [`SimCluster::restart`]: connections reset first (the process is
    /// gone), the disk is copied as it is at that instant, then the old
    /// member is shut down on the old engine. Nothing happens to a member
    /// that is down already.
    pub async fn crash_as(&mut self, id: NodeId, kind: Crash) {
        let Some(node) = self.nodes.iter_mut().find(|n| n.id == id) else {
            return;
        };
        if node.consensus.is_none() {
            return;
        }
        self.handles.remove(id);
        self.net.down(id);
        // No await since the member was cut off: this is its disk at the
        // instant of the crash.
        let disk = node.engine.fork();
        if kind == Crash::PowerLoss {
            disk.power_loss();
        }
        node.engine = Arc::new(disk);
        node.halt().await;
    }

    /// Starts member `id` again after a crash, on what the crash kept of
    /// its storage, with its id, address and configuration, and puts it
    /// back on the network and in the clients' handles.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), SimError> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| SimError::Setup(format!("no member {id}")))?;
        if node.consensus.is_some() {
            return Err(SimError::Setup(format!("member {id} is up")));
        }
        node.start(&self.net).await?;
        if let Some(c) = &node.consensus {
            self.handles.insert(id, c.clone());
        }
        Ok(())
    }

    /// The member serving [`Build::WithoutExchange`], if any, and how many
    /// Exchange streams it refused so far.
    pub fn older_build(&self) -> Option<OlderBuild> {
        self.nodes
            .iter()
            .find(|n| n.build == Build::WithoutExchange)
            .map(|n| OlderBuild {
                member: n.id,
                refused_streams: n.refused.load(Ordering::Relaxed),
            })
    }

    /// Stops every member (the end of a simulation).
    pub async fn stop(mut self) {
        for node in &mut self.nodes {
            self.handles.remove(node.id);
            self.net.down(node.id);
            node.halt().await;
        }
    }
}

impl SimNode {
    /// Starts the member on its engine and serves it on `net`.
    async fn start(&mut self, net: &SimNet) -> Result<(), SimError> {
        let consensus = start_member(
            self.id,
            net,
            self.config.clone(),
            self.engine.clone(),
            self.snapshot_dir.clone(),
        )
        .await?;
        let (stop, server) = serve(self.id, net, &consensus, self.build, self.refused.clone());
        self.consensus = Some(consensus);
        self.stop = Some(stop);
        self.server = Some(server);
        Ok(())
    }

    /// Stops the member (already off the network): its server, then its
    /// consensus and every task of it ([`Consensus::shutdown`] joins them).
    async fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(c) = self.consensus.take() {
            c.shutdown().await;
        }
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

async fn start_member(
    id: NodeId,
    net: &SimNet,
    config: ConsensusConfig,
    engine: Arc<MemEngine>,
    snapshot_dir: PathBuf,
) -> Result<Consensus, SimError> {
    let addr = addr_of(id);
    let info = NodeInfo {
        name: format!("n{id}"),
        site: "sim".into(),
        public_addr: addr.clone(),
        internal_addr: addr,
    };
    let transport = Arc::new(SimTransport {
        node: id,
        net: net.clone(),
        connect_timeout: config.connect_timeout(),
    });
    let storage = StorageBackend::Shared { engine, snapshot_dir };
    Consensus::start_with_transport(id, info, config, storage, transport)
        .await
        .map_err(|e| SimError::Setup(format!("starting member {id}: {e}")))
}

/// Serves `consensus`'s internal service, as `build` does, to connections
/// the network hands to member `id`; the sender stops it.
fn serve(
    id: NodeId,
    net: &SimNet,
    consensus: &Consensus,
    build: Build,
    refused: Arc<AtomicU64>,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
    let service = OfBuild {
        inner: consensus.internal_service(),
        build,
        refused,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let result = server_builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "simulated internal server failed");
        }
    });
    net.up(id, tx);
    (stop, server)
}

/// A member's internal service as `build` serves it: without `Exchange`,
/// its calls are answered UNIMPLEMENTED before they reach the service.
#[derive(Clone)]
struct OfBuild<S> {
    inner: S,
    build: Build,
    /// Exchange streams refused, for [`SimCluster::older_build`].
    refused: Arc<AtomicU64>,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S> tower::Service<HttpRequest> for OfBuild<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<HttpResponse, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        if self.build == Build::WithoutExchange && request.uri().path().ends_with("/Exchange") {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let response = tonic::Status::unimplemented("a build from before Exchange").into_http();
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.inner.call(request))
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for OfBuild<S> {
    const NAME: &'static str = S::NAME;
}
