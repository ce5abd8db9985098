//! In-process clusters on loopback for tests and benchmarks.
//!
//! Each [`LocalNode`] is a complete member: its own RocksDB directory and its
//! own internal gRPC server on 127.0.0.1, talking to the others over real
//! sockets. Only the processes are shared; nothing is faked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::network::{TcpTransport, Transport, plain_incoming};
use crate::{Consensus, ConsensusConfig, ConsensusError, NodeId, NodeInfo, Result, StorageBackend};

/// One running member.
pub struct LocalNode {
    /// Its consensus handle.
    pub consensus: Consensus,
    /// Where its internal server listens.
    pub addr: SocketAddr,
    /// Its RocksDB directory.
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

/// What is left of a stopped node, enough to start it again.
#[derive(Debug, Clone)]
pub struct StoppedNode {
    /// Node id.
    pub id: NodeId,
    /// RocksDB directory.
    pub dir: PathBuf,
    /// The address it listened on.
    pub addr: SocketAddr,
}

impl LocalNode {
    /// Starts node `id` on `dir`, listening on `addr` (an ephemeral loopback
    /// port when `None`).
    pub async fn start(id: NodeId, dir: PathBuf, addr: Option<SocketAddr>, config: ConsensusConfig) -> Result<Self> {
        let transport = Arc::new(TcpTransport {
            connect_timeout: Duration::from_secs(2),
            source: None,
        });
        Self::start_with_transport(id, dir, addr, config, transport).await
    }

    /// [`LocalNode::start`] with its connections to other nodes opened
    /// through `transport`.
    pub async fn start_with_transport(
        id: NodeId,
        dir: PathBuf,
        addr: Option<SocketAddr>,
        config: ConsensusConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Self> {
        let bind = addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|e| ConsensusError::Internal(format!("bind {bind}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ConsensusError::Internal(e.to_string()))?;
        let info = NodeInfo {
            name: format!("n{id}"),
            site: "local".into(),
            public_addr: addr.to_string(),
            internal_addr: addr.to_string(),
        };
        let consensus =
            Consensus::start_with_transport(id, info, config, StorageBackend::Rocks(dir.clone()), transport).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = consensus.internal_service();
        let server = tokio::spawn(async move {
            let result = crate::network::server_builder()
                .add_service(service)
                .serve_with_incoming_shutdown(plain_incoming(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "internal server failed");
            }
        });
        Ok(LocalNode {
            consensus,
            addr,
            dir,
            stop: Some(stop),
            server,
        })
    }

    /// Node id.
    pub fn id(&self) -> NodeId {
        self.consensus.id()
    }

    /// Stops Raft and the server, keeping the data.
    pub async fn stop(mut self) -> StoppedNode {
        self.consensus.shutdown().await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.server).await;
        StoppedNode {
            id: self.consensus.id(),
            dir: self.dir.clone(),
            addr: self.addr,
        }
    }

    /// Starts a stopped node again on its directory and address.
    pub async fn restart(stopped: StoppedNode, config: ConsensusConfig) -> Result<Self> {
        Self::start(stopped.id, stopped.dir, Some(stopped.addr), config).await
    }
}

/// Starts `n` members with ids 1..=n under `root`, bootstraps the cluster on
/// node 1 and joins the others through it.
pub async fn local_cluster(root: &Path, n: u64, config: ConsensusConfig) -> Result<Vec<LocalNode>> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        nodes.push(LocalNode::start(id, root.join(format!("n{id}")), None, config.clone()).await?);
    }
    let first = &nodes[0].consensus;
    first.initialize().await?;
    first.wait_for_leader(Duration::from_secs(30)).await?;
    for node in &nodes[1..] {
        first.join(node.id(), node.consensus.info().clone()).await?;
    }
    Ok(nodes)
}
