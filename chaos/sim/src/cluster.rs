//! A simulated cluster: consensus members in this process, each with
//! in-memory storage ([`StorageBackend::Memory`]) and its internal gRPC
//! service served over the [simulated network](crate::net).
//!
//! Election timeouts: openraft 0.9 draws a member's election timeout once,
//! when its Raft starts, from `rand::thread_rng()` within
//! `[election_timeout_min, election_timeout_max)`. The simulator gives each
//! member a range one millisecond wide (`[t, t + 1)`), which leaves that
//! draw exactly one value: the timeouts are the seed's choice (distinct
//! values, a seeded permutation of the members), not the thread's.
//!
//! A crash stops a member for good: its connections are reset, its
//! consensus is shut down and its in-memory storage dropped. Restarting it
//! on the same storage would need `Consensus` to start on an existing
//! engine, which [`StorageBackend`] cannot express yet (it opens a new
//! `cell0_storage::MemEngine` each time).

use std::sync::Arc;
use std::time::Duration;

use cell0_consensus::network::server_builder;
use cell0_consensus::{Consensus, ConsensusConfig, NodeId, NodeInfo, Role, StorageBackend};
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

/// One member.
struct SimNode {
    id: NodeId,
    /// `None` once it crashed.
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
        let voters = usize::try_from(n).unwrap_or(usize::MAX);
        let dir = tempfile::tempdir().map_err(|e| SimError::Setup(format!("temp dir: {e}")))?;
        let mut order: Vec<u64> = (0..n).collect();
        order.shuffle(rng);
        // A jitter so that seeds also differ in how far apart the timeouts are.
        let spacing = rng.random_range(30..=80);
        let mut nodes = Vec::new();
        for (i, rank) in (1..=n).zip(order) {
            let election_ms = 300 + rank * spacing;
            let snapshot_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&snapshot_dir).map_err(|e| SimError::Setup(format!("snapshot dir: {e}")))?;
            let consensus = start_member(i, &net, member_config(voters, election_ms), snapshot_dir).await?;
            let (stop, server) = serve(i, &net, &consensus);
            nodes.push(SimNode {
                id: i,
                consensus: Some(consensus),
                stop: Some(stop),
                server: Some(server),
            });
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

    /// Crashes member `id` for good: connections reset first (the process
    /// is gone), then its consensus stops and its storage is dropped.
    pub async fn crash(&mut self, id: NodeId) {
        self.handles.remove(id);
        self.net.down(id);
        let Some(node) = self.nodes.iter_mut().find(|n| n.id == id) else {
            return;
        };
        if let Some(stop) = node.stop.take() {
            let _ = stop.send(());
        }
        if let Some(c) = node.consensus.take() {
            c.shutdown().await;
        }
        if let Some(server) = node.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Stops every member (the end of a simulation).
    pub async fn stop(mut self) {
        for id in self.ids() {
            self.crash(id).await;
        }
    }
}

async fn start_member(
    id: NodeId,
    net: &SimNet,
    config: ConsensusConfig,
    snapshot_dir: std::path::PathBuf,
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
    Consensus::start_with_transport(id, info, config, StorageBackend::Memory { snapshot_dir }, transport)
        .await
        .map_err(|e| SimError::Setup(format!("starting member {id}: {e}")))
}

/// Serves `consensus`'s internal service to connections the network hands
/// to member `id`; the sender stops it.
fn serve(id: NodeId, net: &SimNet, consensus: &Consensus) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
    let service = consensus.internal_service();
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
