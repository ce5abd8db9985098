//! Raft transport over tonic on the internal port.
//!
//! Client side: one lazily connected HTTP/2 channel per peer address, shared
//! by replication, votes, snapshots and forwarded requests. Server side: the
//! `cell0.internal.v1.Raft` service, which hands openraft messages to the
//! local Raft and forwarded client requests to the [`crate::Consensus`]
//! handle. Payloads are postcard-encoded openraft types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_proto::internal::RaftMessage;
use cell0_proto::internal::raft_client::RaftClient;
use futures::Stream;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint};

use crate::error::ConsensusError;
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// Largest internal gRPC message. Snapshot chunks and append batches are
/// bounded well below it (see [`crate::ConsensusConfig`]).
pub const MAX_INTERNAL_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Accepted connections of `listener` with `TCP_NODELAY` set.
///
/// tonic's `serve_with_incoming` ignores `Server::tcp_nodelay`, and without
/// it a small request waits about 40 ms for Nagle and delayed ACKs. Accept
/// errors (such as running out of file descriptors) are logged and skipped so
/// that one bad moment does not stop the server.
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).filter_map(|conn| match conn.and_then(|s| s.set_nodelay(true).map(|()| s)) {
        Ok(s) => Some(Ok(s)),
        Err(e) => {
            tracing::warn!(error = %e, "accepting a connection failed");
            None
        }
    })
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<RaftMessage, ConsensusError> {
    postcard::to_stdvec(v)
        .map(|payload| RaftMessage {
            payload: payload.into(),
        })
        .map_err(|e| ConsensusError::Internal(format!("encode: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(m: &RaftMessage) -> Result<T, ConsensusError> {
    postcard::from_bytes(&m.payload).map_err(|e| ConsensusError::Internal(format!("decode: {e}")))
}

/// Channels to peers, one per address, created lazily and reused.
#[derive(Debug)]
pub struct ChannelPool {
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
}

impl ChannelPool {
    /// A pool whose connection attempts give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// The channel to `addr` (host:port).
    pub fn channel(&self, addr: &str) -> Result<Channel, ConsensusError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ConsensusError::invalid("internal_addr", format!("{addr:?} is not host:port ({e})")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// A Raft-service client for `addr`.
    pub fn client(&self, addr: &str) -> Result<RaftClient<Channel>, ConsensusError> {
        Ok(RaftClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES))
    }
}

/// Whether a failed call provably never reached the peer (the connection was
/// refused), which makes even a non-idempotent retry safe.
pub(crate) fn never_sent(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Creates [`PeerNetwork`]s for openraft.
#[derive(Clone)]
pub struct NetworkFactory {
    pool: Arc<ChannelPool>,
}

impl NetworkFactory {
    /// A factory sharing `pool` with the rest of the node.
    pub fn new(pool: Arc<ChannelPool>) -> Self {
        Self { pool }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            target,
            addr: node.internal_addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerNetwork {
    target: NodeId,
    addr: String,
    pool: Arc<ChannelPool>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerNetwork {
    async fn call<Req, Resp, E>(&self, method: Method, req: &Req, timeout: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let net_err = |e: &dyn std::error::Error| RPCError::Network(NetworkError::new(&AnyErr(e.to_string())));
        let mut client = self.pool.client(&self.addr).map_err(|e| net_err(&e))?;
        let msg = encode(req).map_err(|e| net_err(&e))?;
        let mut request = tonic::Request::new(msg);
        request.set_timeout(timeout);
        let reply = match method {
            Method::Append => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&AnyErr(status.to_string()))));
            }
            Err(status) => return Err(net_err(&status)),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&reply).map_err(|e| net_err(&e))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Method {
    Append,
    Vote,
    Snapshot,
}

/// A transport error as a plain message, for openraft's error wrappers.
#[derive(Debug)]
struct AnyErr(String);

impl std::fmt::Display for AnyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AnyErr {}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Method::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Method::Vote, &rpc, option.hard_ttl()).await
    }
}
