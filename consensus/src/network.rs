//! Raft transport over tonic on the internal port.
//!
//! Client side: one lazily connected HTTP/2 channel per peer address, shared
//! by replication, votes, snapshots and forwarded requests. Server side: the
//! `cell0.internal.v1.Raft` service, which hands openraft messages to the
//! local Raft and forwarded client requests to the [`crate::Consensus`]
//! handle. Payloads are postcard-encoded openraft types.
//!
//! Wire identity: every request names the sender's cluster id and the node
//! it is meant for ([`WireIdentity`]); the receiver refuses a mismatch, so a
//! stale or wrong address never makes one node answer for another.
//! AppendEntries calls are bounded in bytes ([`entries_that_fit`]) so one
//! call fits openraft's AppendEntries timeout (the heartbeat interval) at the
//! configured link speed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use cell0_proto::internal::raft_client::RaftClient;
use cell0_proto::internal::{Call, IdentifyRequest, IdentifyResponse, RaftMessage};
use cell0_proto::wire::SmallFrameIo;
use cell0_storage::LiveSnapshots;
use futures::Stream;
use futures::StreamExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::command::Command;
use crate::elections::Elections;
use crate::error::{ConsensusError, PreconditionCause};
use crate::exchange::Streams;
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// Largest internal gRPC message. Snapshot chunks and append batches are
/// bounded well below it (see [`crate::ConsensusConfig`]).
pub const MAX_INTERNAL_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control window of one stream between nodes. hyper's default
/// (64 KiB) lets a 1 MiB snapshot chunk or append batch cross only after
/// sixteen window updates, each a round trip; measured on loopback, that
/// capped snapshot transfers near 150 MB/s.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// HTTP/2 flow-control window of one connection between nodes (all its
/// streams together).
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// Largest HTTP/2 frame a node accepts (hyper's default is 16 KiB: 256
/// frames per 4 MiB snapshot chunk).
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// A gRPC server builder for a node's ports, with the flow-control windows
/// of [`STREAM_WINDOW_BYTES`] and [`CONNECTION_WINDOW_BYTES`] and frames up
/// to [`MAX_FRAME_BYTES`].
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
}

/// How long the accept loop pauses after a failed accept (such as running
/// out of file descriptors) before it tries again, instead of spinning.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepted connections of `listener` for a plaintext gRPC server: those of
/// [`nodelay_incoming`], each in [`SmallFrameIo`].
pub fn plain_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<SmallFrameIo<TcpStream>>> {
    nodelay_incoming(listener).map(|conn| conn.map(SmallFrameIo))
}

/// Accepted connections of `listener` with `TCP_NODELAY` set.
///
/// tonic's `serve_with_incoming` ignores `Server::tcp_nodelay`, and without
/// it a small request waits about 40 ms for Nagle and delayed ACKs. Accept
/// errors (such as EMFILE, out of file descriptors) are logged, counted in
/// `cell0_accept_errors_total`, and followed by a pause of
/// [`ACCEPT_ERROR_PAUSE`]: the failing accept would fail again at once, and
/// retrying it in a tight loop burns a core while connections close.
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    Box::pin(TcpListenerStream::new(listener).filter_map(|conn| async move {
        match conn.and_then(|s| s.set_nodelay(true).map(|()| s)) {
            Ok(s) => Some(Ok(s)),
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed; pausing accepts");
                metrics::counter!("cell0_accept_errors_total").increment(1);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                None
            }
        }
    }))
}

/// The newest internal message format this build reads (the `format` field
/// of every [`RaftMessage`]). Message payloads are postcard enums whose
/// variants are frozen (see `cell0_state::codec`); a change that an older
/// node could misread instead bumps this, and the older node refuses it
/// cleanly. Formats: 1, everything in `payload`; 2, as 1 but an
/// InstallSnapshot chunk's bytes travel in `data` ([`SNAPSHOT_DATA_FORMAT`]).
/// 3, as 2 but log entries may carry `Command::RequestV2`
/// ([`REQUEST_V2_FORMAT`]). 4, as 3 but log entries and forwarded writes
/// may carry `Command::PutWithoutPrev` ([`PUT_WITHOUT_PREV_FORMAT`]). 5,
/// as 4 but the answer to a forwarded put may leave the written pair out
/// ([`PAIRLESS_ANSWER_FORMAT`]). 6, as 5 but log entries may carry
/// `Command::RequestV3` ([`GROUPED_HISTORY_FORMAT`]). A sender writes the
/// oldest format that carries its message, so nodes of the previous build
/// still read everything but snapshot chunks and entries they cannot apply.
pub const INTERNAL_FORMAT: u32 = GROUPED_HISTORY_FORMAT;

/// The format of AppendEntries requests whose entries carry
/// `Command::RequestV2`. The leader proposes that variant only once every
/// member has said it reads this format ([`PeerHealth::reads_format`]).
pub const REQUEST_V2_FORMAT: u32 = 3;

/// The format of AppendEntries requests and forwarded writes that carry
/// `Command::PutWithoutPrev`. The leader proposes, and a follower forwards,
/// that variant only to nodes that said they read this format; others get
/// the same write as the `Command::Put` their build knows.
pub const PUT_WITHOUT_PREV_FORMAT: u32 = 4;

/// The format of a forwarding node that reads answers to puts without the
/// written pair (`Response::Put` leaves the key and value out; the node
/// has them in its own request). A leader puts the pair back into the
/// answer for nodes that did not say they read this format.
pub const PAIRLESS_ANSWER_FORMAT: u32 = 5;

/// The format of AppendEntries requests whose entries carry
/// `Command::RequestV3`, whose first one switches the watch history to
/// groups. The leader proposes that variant only once every member has
/// said it reads this format; older members get `Command::RequestV2`.
pub const GROUPED_HISTORY_FORMAT: u32 = 6;

/// The oldest message format whose receivers apply `cmd`.
pub(crate) fn command_format(cmd: &Command) -> u32 {
    if cmd.carries_request_v3() {
        GROUPED_HISTORY_FORMAT
    } else if cmd.carries_put_without_prev() {
        PUT_WITHOUT_PREV_FORMAT
    } else if cmd.carries_request_v2() {
        REQUEST_V2_FORMAT
    } else {
        BASE_FORMAT
    }
}

/// `cmd` as nodes that read messages up to `format` apply it: the same
/// writes, with each `Command::RequestV3` as a `Command::RequestV2` and
/// each `Command::PutWithoutPrev` as the `Command::Put` older builds know
/// (answered with the previous pair, which the API leaves out).
pub(crate) fn readable_at(cmd: Command, format: u32) -> Command {
    let cmd = if format < GROUPED_HISTORY_FORMAT && cmd.carries_request_v3() {
        cmd.into_request_v2()
    } else {
        cmd
    };
    if format >= PUT_WITHOUT_PREV_FORMAT {
        cmd
    } else {
        cmd.with_prev_puts()
    }
}

/// What a `reads_format` of 0 means: a sender from before the field, which
/// reads formats up to 2.
const READS_FORMAT_BEFORE_FIELD: u32 = SNAPSHOT_DATA_FORMAT;

/// The format of every message but snapshot chunks.
pub const BASE_FORMAT: u32 = 1;

/// The format of InstallSnapshot requests: chunk bytes in `data`, not
/// encoded into the payload byte by byte (measured: that encoding and its
/// decoding held snapshot transfers near 150 MB/s).
pub const SNAPSHOT_DATA_FORMAT: u32 = 2;

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<RaftMessage, ConsensusError> {
    Ok(RaftMessage {
        payload: cell0_state::codec::encode("internal message", v)?.into(),
        format: BASE_FORMAT,
        reads_format: INTERNAL_FORMAT,
        ..Default::default()
    })
}

/// Who this node is on the wire: its id and its cluster's id (0 until the
/// local replica has applied it), stamped on every request it sends.
#[derive(Debug, Clone)]
pub struct WireIdentity {
    /// This node.
    pub node: NodeId,
    /// The cluster id as applied locally; 0 while unknown.
    pub cluster: Arc<AtomicU64>,
}

impl WireIdentity {
    /// The cluster id, 0 while unknown.
    pub fn cluster_id(&self) -> u64 {
        self.cluster.load(Ordering::Acquire)
    }

    /// `msg` addressed to node `to`.
    pub(crate) fn stamp(&self, mut msg: RaftMessage, to: NodeId) -> RaftMessage {
        msg.cluster_id = self.cluster_id();
        msg.to_node = to;
        msg.from_node = self.node;
        msg
    }

    /// Refuses a request meant for another node or another cluster. A zero
    /// field (a sender that does not know yet) is not checked.
    pub(crate) fn check(&self, msg: &RaftMessage) -> Result<(), tonic::Status> {
        if msg.to_node != 0 && msg.to_node != self.node {
            return Err(tonic::Status::failed_precondition(format!(
                "this is node {}, not node {}: node {} has a wrong internal address for node {}",
                self.node, msg.to_node, msg.from_node, msg.to_node
            )));
        }
        let mine = self.cluster_id();
        if msg.cluster_id != 0 && mine != 0 && msg.cluster_id != mine {
            return Err(tonic::Status::failed_precondition(format!(
                "node {} belongs to cluster {:016x}, but this node belongs to cluster {mine:016x}",
                msg.from_node, msg.cluster_id
            )));
        }
        Ok(())
    }
}

/// The newest format the sender of `msg` reads.
pub(crate) fn sender_reads_format(msg: &RaftMessage) -> u32 {
    match msg.reads_format {
        0 => READS_FORMAT_BEFORE_FIELD,
        n => n,
    }
}

/// When the leader last heard back from each peer, so membership decisions
/// can tell a live member from a dead one, and the newest internal format
/// each peer said it reads.
#[derive(Debug, Default)]
pub struct PeerHealth {
    last_reply: Mutex<HashMap<NodeId, tokio::time::Instant>>,
    reads_format: Mutex<HashMap<NodeId, u32>>,
}

impl PeerHealth {
    fn record(&self, peer: NodeId) {
        let mut map = self.last_reply.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(peer, tokio::time::Instant::now());
    }

    /// Notes the format `reply` says its sender reads.
    pub(crate) fn record_format(&self, peer: NodeId, reply: &RaftMessage) {
        let reads = sender_reads_format(reply);
        let mut map = self.reads_format.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(peer, reads);
    }

    /// The newest format `peer`'s latest reply said it reads; the base
    /// format before any reply.
    pub fn reads_format(&self, peer: NodeId) -> u32 {
        let map = self.reads_format.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&peer).copied().unwrap_or(BASE_FORMAT)
    }

    /// Whether `peer` answered a Raft call within the last `within`.
    pub fn reached_within(&self, peer: NodeId, within: Duration) -> bool {
        let map = self.last_reply.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&peer).is_some_and(|t| t.elapsed() <= within)
    }
}

/// How many of the leading entries, of encoded sizes `sizes`, fit in one
/// call of at most `budget` bytes: at least one (a single entry always goes,
/// the group-commit limit keeps it below the budget).
pub fn entries_that_fit(sizes: impl IntoIterator<Item = usize>, budget: usize) -> u64 {
    let mut total = 0usize;
    let mut n = 0u64;
    for size in sizes {
        total = total.saturating_add(size);
        if total > budget && n > 0 {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// How many leading entries of a call to cut down go in the next one: as
/// many entries, of encoded sizes `sizes`, as fit in `budget` beside the
/// message's own bytes (its fields and the framing of each entry:
/// `payload_bytes` less the entries' sizes), and always fewer than the call
/// had, so that openraft's retries with the hint make progress; at least
/// one.
pub fn entries_to_retry(sizes: &[usize], payload_bytes: usize, budget: usize) -> u64 {
    let entries: usize = sizes.iter().fold(0usize, |a, b| a.saturating_add(*b));
    let framing = payload_bytes.saturating_sub(entries);
    let fit = entries_that_fit(sizes.iter().copied(), budget.saturating_sub(framing));
    let fewer = u64::try_from(sizes.len()).unwrap_or(u64::MAX).saturating_sub(1).max(1);
    fit.min(fewer)
}

/// Room for an AppendEntries request's own fields (vote, previous log id,
/// commit index, framing) beside its entries.
const APPEND_FIELDS_BYTES: usize = 64 * 1024;

/// Bytes of encoded entries a replication read gathers for one
/// AppendEntries call of at most `max_append_bytes`.
pub(crate) fn append_read_budget(max_append_bytes: usize) -> usize {
    max_append_bytes.saturating_sub(APPEND_FIELDS_BYTES).max(1)
}

/// Asks the node at `addr` who it is.
pub(crate) async fn identify(
    pool: &ChannelPool,
    addr: &str,
    expected: NodeId,
    timeout: Duration,
) -> Result<IdentifyResponse, tonic::Status> {
    let mut client = pool
        .client(addr)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let mut request = tonic::Request::new(IdentifyRequest {
        expected_node: expected,
    });
    request.set_timeout(timeout);
    Ok(client.identify(request).await?.into_inner())
}

/// Decodes a message of any format up to [`INTERNAL_FORMAT`] (0 is a sender
/// from before the field existed, format 1); a newer one is refused with an
/// error that says which node to upgrade.
pub(crate) fn decode<T: DeserializeOwned>(m: &RaftMessage) -> Result<T, ConsensusError> {
    if m.format > INTERNAL_FORMAT {
        return Err(ConsensusError::refused(
            PreconditionCause::NewerMessageFormat,
            format!(
                "node {} sent internal message format {}; this node reads formats up to {INTERNAL_FORMAT}: upgrade it",
                m.from_node, m.format
            ),
        ));
    }
    Ok(cell0_state::codec::decode("internal message", &m.payload)?)
}

/// How this node opens a channel to another node: the seam where mutual TLS
/// or a simulated, fault-injecting network plug in. Everything that talks
/// to another node (replication, votes, snapshots, forwarding, the join
/// handshake, joins through a seed, blob transfer) gets its channel from
/// the [`ChannelPool`] over this, so routing and replication code never
/// change with the transport.
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// A lazily connecting channel to `addr` (host:port).
    fn connect(&self, addr: &str) -> Result<Channel, ConsensusError>;
}

/// Plain HTTP/2 over TCP with `TCP_NODELAY` and keep-alives.
#[derive(Debug, Clone, Copy)]
pub struct TcpTransport {
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// The address connections come from (the node's internal listen
    /// address, so that peers and anything between them see which node
    /// connects); `None`: the operating system picks.
    pub source: Option<std::net::IpAddr>,
}

impl Transport for TcpTransport {
    fn connect(&self, addr: &str) -> Result<Channel, ConsensusError> {
        Ok(endpoint(addr, self.connect_timeout)?.connect_with_connector_lazy(PlainConnector::new(self)))
    }
}

/// What a [`TcpTransport`] channel dials through: hyper-util's TCP connector
/// (tonic's own, with `TCP_NODELAY`, the connect timeout and the source
/// address), each connection in [`SmallFrameIo`].
#[derive(Debug, Clone)]
struct PlainConnector(HttpConnector);

impl PlainConnector {
    fn new(transport: &TcpTransport) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(transport.connect_timeout));
        http.set_local_address(transport.source);
        Self(http)
    }
}

impl tonic::codegen::Service<Uri> for PlainConnector {
    type Response = TokioIo<SmallFrameIo<TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let tcp = connecting.await?;
            Ok(TokioIo::new(SmallFrameIo(tcp.into_inner())))
        })
    }
}

/// The HTTP/2 settings of every channel between nodes, for `addr`
/// (host:port), whatever transport dials it: `TCP_NODELAY`, the
/// flow-control windows, frames up to [`MAX_FRAME_BYTES`], keep-alives.
pub fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, ConsensusError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConsensusError::invalid("internal_addr", format!("{addr:?} is not host:port ({e})")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Channels to peers, one per address, created lazily through the node's
/// [`Transport`] and reused, and the Exchange streams over them
/// ([`crate::exchange`]).
#[derive(Debug)]
pub struct ChannelPool {
    channels: Mutex<HashMap<String, Channel>>,
    transport: Arc<dyn Transport>,
    pub(crate) streams: Streams,
}

impl ChannelPool {
    /// A pool opening channels through `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            transport,
            streams: Streams::default(),
        }
    }

    /// Sends `request` (stamped) as `call` to `addr` over an Exchange
    /// stream and waits up to `timeout` for the reply. `None`: send it as
    /// a unary call instead (the peer lacks Exchange, or `addr` is not an
    /// address a channel opens to, which the unary call reports).
    pub(crate) async fn exchange(
        &self,
        addr: &str,
        call: Call,
        request: &RaftMessage,
        timeout: Duration,
    ) -> Option<Result<RaftMessage, tonic::Status>> {
        let client = self.client(addr).ok()?;
        self.streams.call(client, addr, call, request, timeout).await
    }

    /// Closes every idle Exchange stream (the member shutting down).
    pub(crate) fn close_streams(&self) {
        self.streams.close();
    }

    /// The channel to `addr` (host:port).
    pub fn channel(&self, addr: &str) -> Result<Channel, ConsensusError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self.transport.connect(addr)?;
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
    identity: WireIdentity,
    health: Arc<PeerHealth>,
    max_append_bytes: usize,
    live: LiveSnapshots,
    elections: Option<Arc<Elections>>,
}

impl NetworkFactory {
    /// A factory sharing `pool` with the rest of the node, stamping requests
    /// with `identity`, recording replies in `health`, and bounding each
    /// AppendEntries call to `max_append_bytes`.
    pub fn new(
        pool: Arc<ChannelPool>,
        identity: WireIdentity,
        health: Arc<PeerHealth>,
        max_append_bytes: usize,
    ) -> Self {
        Self {
            pool,
            identity,
            health,
            max_append_bytes,
            live: LiveSnapshots::default(),
            elections: None,
        }
    }

    /// The same factory, reporting the answers to this node's vote requests
    /// to `elections` (prompt elections, see `crate::elections`).
    pub(crate) fn with_elections(mut self, elections: Arc<Elections>) -> Self {
        self.elections = Some(elections);
        self
    }

    /// The same factory, turning `live` off when a peer cannot take a live
    /// snapshot (see `snapshot_stream`).
    pub fn with_live_snapshots(mut self, live: LiveSnapshots) -> Self {
        self.live = live;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            target,
            addr: node.internal_addr.clone(),
            pool: self.pool.clone(),
            identity: self.identity.clone(),
            health: self.health.clone(),
            append_budget: AppendBudget::new(self.max_append_bytes),
            live: self.live.clone(),
            elections: self.elections.clone(),
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerNetwork {
    target: NodeId,
    addr: String,
    pool: Arc<ChannelPool>,
    identity: WireIdentity,
    health: Arc<PeerHealth>,
    append_budget: AppendBudget,
    live: LiveSnapshots,
    elections: Option<Arc<Elections>>,
}

/// Smallest byte budget an AppendEntries call to a slow peer shrinks to.
const MIN_APPEND_BUDGET_BYTES: usize = 64 * 1024;

/// How many bytes the next AppendEntries call to one peer may carry:
/// `max_append_bytes` at first, halved after a call that did not finish
/// within openraft's timeout (it drops the call, so the next call sees the
/// previous one unfinished), grown back by a quarter after each full call
/// that finished. A peer too slow for full calls (a loaded machine, a debug
/// build) is then sent smaller ones instead of the same call timing out
/// forever.
#[derive(Debug)]
struct AppendBudget {
    bytes: usize,
    max: usize,
    /// A call with entries went out and has not returned.
    in_flight: bool,
}

impl AppendBudget {
    fn new(max: usize) -> Self {
        Self {
            bytes: max,
            max,
            in_flight: false,
        }
    }

    /// The budget for the next call with entries.
    fn begin(&mut self) -> usize {
        if std::mem::replace(&mut self.in_flight, true) {
            self.bytes = (self.bytes / 2).max(MIN_APPEND_BUDGET_BYTES.min(self.max));
            metrics::counter!("cell0_raft_append_shrink_total").increment(1);
        }
        self.bytes
    }

    /// A call of `sent` bytes returned (whatever its result).
    fn end(&mut self, sent: usize) {
        self.in_flight = false;
        if sent >= self.bytes / 2 {
            self.bytes = (self.bytes + self.bytes / 4).min(self.max);
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl PeerNetwork {
    /// The peer this connection reaches.
    pub(crate) fn target(&self) -> NodeId {
        self.target
    }

    /// This node's identity on the wire.
    /// The switch of live snapshots, turned off for peers of older builds.
    pub(crate) fn live_snapshots(&self) -> &LiveSnapshots {
        &self.live
    }

    pub(crate) fn identity(&self) -> &WireIdentity {
        &self.identity
    }

    /// A client of the peer's internal service.
    pub(crate) fn client(&self) -> Result<RaftClient<Channel>, ConsensusError> {
        self.pool.client(&self.addr)
    }

    /// Notes that the peer answered a Raft call.
    pub(crate) fn record_reply(&self) {
        self.health.record(self.target);
    }

    async fn call<Req, Resp, E>(&self, method: Method, req: &Req, timeout: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let net_err = |e: &dyn std::error::Error| RPCError::Network(NetworkError::new(&AnyErr(e.to_string())));
        let msg = encode(req).map_err(|e| net_err(&e))?;
        self.send(method, msg, timeout).await
    }

    async fn send<Resp, E>(&self, method: Method, msg: RaftMessage, timeout: Duration) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let net_err = |e: &dyn std::error::Error| RPCError::Network(NetworkError::new(&AnyErr(e.to_string())));
        let stamped = self.identity.stamp(msg, self.target);
        let streamed = match method {
            Method::Append => {
                self.pool
                    .exchange(&self.addr, Call::AppendEntries, &stamped, timeout)
                    .await
            }
            Method::Vote | Method::Snapshot => None,
        };
        let reply = match streamed {
            Some(reply) => reply,
            None => {
                let mut client = self.pool.client(&self.addr).map_err(|e| net_err(&e))?;
                let mut request = tonic::Request::new(stamped);
                request.set_timeout(timeout);
                match method {
                    Method::Append => client.append_entries(request).await,
                    Method::Vote => client.vote(request).await,
                    Method::Snapshot => client.install_snapshot(request).await,
                }
                .map(tonic::Response::into_inner)
            }
        };
        let reply = match reply {
            Ok(r) => r,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&AnyErr(status.to_string()))));
            }
            Err(status) => return Err(net_err(&status)),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&reply).map_err(|e| net_err(&e))?;
        self.health.record(self.target);
        self.health.record_format(self.target, &reply);
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
pub(crate) struct AnyErr(pub(crate) String);

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
        let net_err = |e: &dyn std::error::Error| RPCError::Network(NetworkError::new(&AnyErr(e.to_string())));
        let mut msg = encode(&rpc).map_err(|e| net_err(&e))?;
        let entry_format = |e: &openraft::Entry<TypeConfig>| match &e.payload {
            openraft::EntryPayload::Normal(c) => command_format(c),
            _ => BASE_FORMAT,
        };
        msg.format = rpc.entries.iter().map(entry_format).max().unwrap_or(BASE_FORMAT);
        if rpc.entries.is_empty() {
            return self.send(Method::Append, msg, option.hard_ttl()).await;
        }
        let budget = self.append_budget.begin();
        if msg.payload.len() > budget && rpc.entries.len() > 1 {
            // Too large to arrive within the AppendEntries timeout: openraft
            // retries at once with as many entries as fit.
            let sizes: Vec<usize> = rpc
                .entries
                .iter()
                .map(|e| cell0_state::codec::encoded_len("log entry", e).unwrap_or(usize::MAX))
                .collect();
            let fit = entries_to_retry(&sizes, msg.payload.len(), budget);
            self.append_budget.in_flight = false;
            metrics::counter!("cell0_raft_append_split_total").increment(1);
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        let sent = msg.payload.len();
        let result = self.send(Method::Append, msg, option.hard_ttl()).await;
        self.append_budget.end(sent);
        result
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let data = std::mem::take(&mut rpc.data);
        let mut msg = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&AnyErr(e.to_string()))))?;
        msg.data = data.into();
        msg.format = SNAPSHOT_DATA_FORMAT;
        self.send(Method::Snapshot, msg, option.hard_ttl()).await
    }

    /// One streaming call per snapshot (`StreamSnapshot`, module
    /// `snapshot_stream`); chunks for peers of older builds.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        crate::snapshot_stream::send(self, vote, snapshot, cancel, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        let result = self.call(Method::Vote, &rpc, option.hard_ttl()).await;
        if let (Ok(resp), Some(elections)) = (&result, &self.elections) {
            // Refused by a rival that can never win this node's vote: stand
            // again above it (`crate::elections`, trigger 2).
            elections.nudge(crate::elections::lost_to_shorter_log(self.target, &rpc, resp));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_calls_are_cut_to_the_byte_budget() {
        assert_eq!(entries_that_fit([100, 100, 100], 250), 2);
        assert_eq!(entries_that_fit([100, 100, 100], 300), 3);
        assert_eq!(entries_that_fit([500, 100], 250), 1, "one entry always goes");
        assert_eq!(entries_that_fit([usize::MAX, 1], 250), 1);
        assert_eq!(entries_that_fit([], 250), 1);
    }

    #[test]
    fn a_cut_call_is_retried_with_fewer_entries_even_when_they_fit_but_for_the_framing() {
        // Found by the soak: 796 entries whose sizes summed under the budget
        // made a message over it; the hint was 796 again, forever.
        assert_eq!(entries_to_retry(&[100; 10], 1_064, 1_000), 9);
        assert_eq!(entries_to_retry(&[100; 10], 1_000, 1_000), 9, "always fewer than sent");
        assert_eq!(entries_to_retry(&[100; 10], 1_200, 700), 5);
        assert_eq!(entries_to_retry(&[100, 100], 5_000, 10), 1, "at least one");
        // Cutting again and again reaches a call that fits.
        let mut n = 800usize;
        while n > 1 {
            let hint = entries_to_retry(&vec![80; n], 64 + 82 * n, 65_536);
            assert!((hint as usize) < n);
            if 64 + 82 * (hint as usize) <= 65_536 {
                break;
            }
            n = hint as usize;
        }
    }

    #[test]
    fn the_append_budget_halves_after_an_unfinished_call_and_grows_back() {
        let max = 4 << 20;
        let mut budget = AppendBudget::new(max);
        assert_eq!(budget.begin(), max);
        // That call never returned (openraft's timeout dropped it).
        assert_eq!(budget.begin(), max / 2);
        assert_eq!(budget.begin(), max / 4);
        budget.end(max / 4);
        assert_eq!(budget.begin(), max / 4 + max / 16, "a full call that finished grows it");
        budget.end(10);
        assert_eq!(budget.begin(), max / 4 + max / 16, "a small one does not");
        for _ in 0..40 {
            budget.begin();
        }
        assert_eq!(budget.bytes, MIN_APPEND_BUDGET_BYTES, "never below the floor");
        for _ in 0..40 {
            budget.end(max);
            budget.begin();
        }
        assert_eq!(budget.bytes, max, "never above max_append_bytes");
    }

    #[tokio::test]
    async fn an_append_over_the_byte_budget_is_cut_before_it_is_sent() {
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

        // The address is never dialled: the call is cut before it is sent.
        let pool = Arc::new(ChannelPool::new(Arc::new(TcpTransport {
            connect_timeout: Duration::from_millis(10),
            source: None,
        })));
        let identity = WireIdentity {
            node: 1,
            cluster: Arc::new(AtomicU64::new(0)),
        };
        let mut factory = NetworkFactory::new(pool, identity, Arc::new(PeerHealth::default()), 2 << 20);
        let mut peer = factory
            .new_client(
                2,
                &NodeInfo {
                    internal_addr: "127.0.0.1:9".into(),
                    ..NodeInfo::default()
                },
            )
            .await;
        let entries: Vec<Entry<TypeConfig>> = (1..=40)
            .map(|index| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Normal(
                    crate::Command::Put {
                        key: b"k".to_vec(),
                        value: vec![7; 1 << 20],
                    }
                    .into(),
                ),
            })
            .collect();
        let rpc = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries,
        };
        let option = RPCOption::new(Duration::from_millis(150));
        match peer.append_entries(rpc, option).await {
            Err(RPCError::PayloadTooLarge(e)) => assert_eq!(e.entries_hint(), 1, "{e}"),
            other => panic!("a 40 MiB call must be cut, got {other:?}"),
        }
    }

    #[test]
    fn requests_for_another_node_or_cluster_are_refused() {
        let identity = WireIdentity {
            node: 1,
            cluster: Arc::new(AtomicU64::new(0xc1)),
        };
        let msg = |cluster_id, to_node| RaftMessage {
            payload: Vec::new().into(),
            cluster_id,
            to_node,
            from_node: 9,
            format: BASE_FORMAT,
            data: Vec::new().into(),
            reads_format: INTERNAL_FORMAT,
            call: 0,
        };
        identity.check(&msg(0xc1, 1)).unwrap();
        let err = identity.check(&msg(0xc1, 2)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("not node 2"), "{}", err.message());
        let err = identity.check(&msg(0xc2, 1)).unwrap_err();
        assert!(err.message().contains("cluster"), "{}", err.message());
        // A sender that does not know the cluster yet is not refused for it.
        identity.check(&msg(0, 1)).unwrap();
        let stamped = identity.stamp(msg(0, 0), 3);
        assert_eq!((stamped.cluster_id, stamped.to_node, stamped.from_node), (0xc1, 3, 1));
    }

    #[test]
    fn a_peer_reads_the_format_its_latest_reply_names() {
        let health = PeerHealth::default();
        assert_eq!(health.reads_format(2), BASE_FORMAT, "nothing heard yet");
        let mut reply = encode(&7u64).unwrap();
        health.record_format(2, &reply);
        assert_eq!(health.reads_format(2), INTERNAL_FORMAT);
        assert_eq!(health.reads_format(3), BASE_FORMAT);
        // The same node restarted on a build from before the field.
        reply.reads_format = 0;
        health.record_format(2, &reply);
        assert_eq!(health.reads_format(2), SNAPSHOT_DATA_FORMAT);
    }

    #[test]
    fn puts_without_the_previous_pair_reach_only_nodes_that_read_them() {
        let request = |cmd| crate::Command::Request {
            id: crate::command::RequestId { client: 1, seq: 2 },
            cmd: Box::new(cmd),
        };
        let quiet = crate::Command::Batch(vec![
            request(crate::Command::PutWithoutPrev {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            }),
            crate::Command::Delete { key: b"d".to_vec() },
        ]);
        let put = crate::Command::Batch(vec![
            request(crate::Command::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            }),
            crate::Command::Delete { key: b"d".to_vec() },
        ]);
        assert_eq!(command_format(&quiet), PUT_WITHOUT_PREV_FORMAT);
        assert_eq!(
            command_format(&quiet.clone().into_request_v2()),
            PUT_WITHOUT_PREV_FORMAT
        );
        assert_eq!(command_format(&put), BASE_FORMAT);
        assert_eq!(command_format(&put.clone().into_request_v2()), REQUEST_V2_FORMAT);
        assert_eq!(readable_at(quiet.clone(), PUT_WITHOUT_PREV_FORMAT), quiet);
        assert_eq!(readable_at(quiet.clone(), REQUEST_V2_FORMAT), put);
        assert_eq!(
            readable_at(quiet.clone().into_request_v2(), REQUEST_V2_FORMAT),
            put.clone().into_request_v2()
        );
        // Requests that switch the history to groups reach only nodes that
        // read them; older ones get the same writes as `RequestV2`.
        let grouped = quiet.clone().into_request_v3();
        assert_eq!(command_format(&grouped), GROUPED_HISTORY_FORMAT);
        assert_eq!(readable_at(grouped.clone(), GROUPED_HISTORY_FORMAT), grouped);
        assert_eq!(
            readable_at(grouped.clone(), PAIRLESS_ANSWER_FORMAT),
            quiet.into_request_v2()
        );
        assert_eq!(readable_at(grouped, REQUEST_V2_FORMAT), put.into_request_v2());
    }

    #[test]
    fn messages_of_older_formats_decode_and_newer_ones_are_refused() {
        let mut msg = encode(&7u64).unwrap();
        assert_eq!(msg.format, BASE_FORMAT);
        assert_eq!(decode::<u64>(&msg).unwrap(), 7);
        // Senders from before the field existed leave it 0.
        msg.format = 0;
        assert_eq!(decode::<u64>(&msg).unwrap(), 7);
        msg.format = INTERNAL_FORMAT + 1;
        msg.from_node = 4;
        let err = decode::<u64>(&msg).unwrap_err();
        assert!(
            matches!(
                err,
                ConsensusError::FailedPrecondition {
                    cause: PreconditionCause::NewerMessageFormat,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("node 4"), "{err}");
    }
}
