//! Server side of the internal gRPC service: Raft messages from peers and
//! requests forwarded by followers.
//!
//! Every request is checked against this node's wire identity before it is
//! decoded: one meant for another node or another cluster is refused with
//! FAILED_PRECONDITION, so a wrong address can never make this node answer
//! (and be counted) for another member.
//!
//! AppendEntries and Forward also arrive over `Exchange` streams
//! ([`crate::exchange`]); each request there is handled by the same code as
//! its unary call, and a refusal ends the stream with the same status.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cell0_proto::internal::raft_server::{Raft as RaftRpc, RaftServer};
use cell0_proto::internal::{Call, IdentifyRequest, IdentifyResponse, RaftMessage};
use futures::stream::BoxStream;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::inner::Inner;
use crate::network::{MAX_INTERNAL_MESSAGE_BYTES, PAIRLESS_ANSWER_FORMAT, decode, encode, sender_reads_format};
use crate::routing::ForwardRequest;
use crate::types::{NodeId, TypeConfig};

/// The `cell0.internal.v1.Raft` service of one node.
pub struct InternalService {
    inner: Arc<Inner>,
    /// Besides the member's own shutdown, ends Exchange streams when true.
    stop: Option<watch::Receiver<bool>>,
}

impl InternalService {
    pub(crate) fn server(inner: Arc<Inner>, stop: Option<watch::Receiver<bool>>) -> RaftServer<Self> {
        RaftServer::new(Self { inner, stop })
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
    }
}

fn bad_payload(e: crate::ConsensusError) -> Status {
    Status::invalid_argument(format!("malformed internal message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    encoded(v).map(Response::new)
}

fn encoded<T: serde::Serialize>(v: &T) -> Result<RaftMessage, Status> {
    encode(v).map_err(|e| Status::internal(e.to_string()))
}

/// Hands an AppendEntries request to the local Raft.
async fn append_entries(inner: &Inner, request: &RaftMessage) -> Result<RaftMessage, Status> {
    inner.identity.check(request)?;
    let rpc: AppendEntriesRequest<TypeConfig> = decode(request).map_err(bad_payload)?;
    // The commit index a leader reports is known to hold for this node's
    // log only up to what this request made match, and only once the
    // request was accepted.
    let commit = rpc.leader_commit.map(|c| c.index);
    let last = rpc
        .entries
        .last()
        .map(|e| e.log_id.index)
        .or(rpc.prev_log_id.map(|p| p.index));
    let result = inner.raft.append_entries(rpc).await;
    let matched = match &result {
        Ok(AppendEntriesResponse::Success) => last,
        Ok(AppendEntriesResponse::PartialSuccess(m)) => m.map(|m| m.index),
        _ => None,
    };
    // Accepted from a leader (a conflict too: only the logs differ):
    // this node's leader lease holds (prompt elections).
    if matches!(
        result,
        Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_) | AppendEntriesResponse::Conflict)
    ) {
        inner.elections.heard_from_leader();
    }
    if let (Some(commit), Some(matched)) = (commit, matched) {
        inner.leader_commit.fetch_max(commit.min(matched), Ordering::AcqRel);
    }
    encoded(&result)
}

/// Serves a request a follower forwarded to this node. A follower of an
/// older build shows the pair a put's answer reports as written, which
/// answers now leave out: it gets them put back.
async fn forward(inner: &Inner, request: &RaftMessage) -> Result<RaftMessage, Status> {
    inner.identity.check(request)?;
    let req: ForwardRequest = decode(request).map_err(bad_payload)?;
    let older = (sender_reads_format(request) < PAIRLESS_ANSWER_FORMAT).then(|| req.clone());
    let mut reply = inner.handle_local(req).await;
    if let (Some(req), Ok(answer)) = (&older, &mut reply) {
        answer.put_back_written_pairs(req);
    }
    encoded(&reply)
}

/// Serves one request of an Exchange stream, as its unary call would.
async fn exchange_one(inner: &Inner, request: &RaftMessage) -> Result<RaftMessage, Status> {
    match Call::try_from(request.call) {
        Ok(Call::AppendEntries) => append_entries(inner, request).await,
        Ok(Call::Forward) => forward(inner, request).await,
        // UNIMPLEMENTED, as for a node without Exchange: a newer caller
        // then sends this node unary calls.
        Ok(Call::Unspecified) | Err(_) => Err(Status::unimplemented(format!(
            "call {}: this node does not serve it over Exchange",
            request.call
        ))),
    }
}

/// Resolves once `rx` turns true or its sender is gone; never, for `None`.
async fn raised(rx: Option<&mut watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            let _ = rx.wait_for(|raised| *raised).await;
        }
        None => std::future::pending().await,
    }
}

/// The state of one Exchange stream.
struct ExchangeState {
    inner: Arc<Inner>,
    requests: Streaming<RaftMessage>,
    closing: watch::Receiver<bool>,
    stop: Option<watch::Receiver<bool>>,
    /// A refusal was sent: the stream ends.
    ended: bool,
}

/// The next reply of an Exchange stream: the answer to the next request,
/// or the end, when the caller closes its side, the member shuts down
/// between two requests, or a request was refused.
async fn next_reply(mut s: ExchangeState) -> Option<(Result<RaftMessage, Status>, ExchangeState)> {
    if s.ended {
        return None;
    }
    let request = tokio::select! {
        request = s.requests.message() => request,
        () = raised(Some(&mut s.closing)) => return None,
        () = raised(s.stop.as_mut()) => return None,
    };
    let request = match request {
        Ok(Some(request)) => request,
        Ok(None) | Err(_) => return None,
    };
    let reply = exchange_one(&s.inner, &request).await;
    s.ended = reply.is_err();
    Some((reply, s))
}

#[tonic::async_trait]
impl RaftRpc for InternalService {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        append_entries(&self.inner, request.get_ref()).await.map(Response::new)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.inner.identity.check(request.get_ref())?;
        let rpc: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad_payload)?;
        let candidate = rpc.vote.leader_id.node_id;
        let result = self.inner.raft.vote(rpc.clone()).await;
        if let Ok(resp) = &result {
            // A candidate this node refused for its shorter log, without
            // taking its term (openraft #2117): stand at once instead of
            // waiting for this node's own timer (`crate::elections`).
            let nudge = crate::elections::refused_shorter_candidate(candidate, &rpc, resp);
            self.inner.elections.nudge(nudge);
        }
        reply(&result)
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.inner.identity.check(request.get_ref())?;
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(request.get_ref()).map_err(bad_payload)?;
        if request.get_ref().format >= crate::network::SNAPSHOT_DATA_FORMAT {
            rpc.data = request.into_inner().data.into();
        }
        let vote = rpc.vote;
        let result = self.inner.raft.install_snapshot(rpc).await;
        if matches!(&result, Ok(resp) if resp.vote == vote) {
            self.inner.elections.heard_from_leader();
        }
        reply(&result)
    }

    async fn stream_snapshot(
        &self,
        request: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let result =
            crate::snapshot_stream::receive(&self.inner.raft, &self.inner.identity, request.into_inner()).await?;
        if result.is_ok() {
            self.inner.elections.heard_from_leader();
        }
        reply(&result)
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        forward(&self.inner, request.get_ref()).await.map(Response::new)
    }

    type ExchangeStream = BoxStream<'static, Result<RaftMessage, Status>>;

    async fn exchange(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let state = ExchangeState {
            inner: self.inner.clone(),
            requests: request.into_inner(),
            closing: self.inner.closing.subscribe(),
            stop: self.stop.clone(),
            ended: false,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(state, next_reply))))
    }

    async fn identify(&self, _request: Request<IdentifyRequest>) -> Result<Response<IdentifyResponse>, Status> {
        Ok(Response::new(IdentifyResponse {
            node_id: self.inner.id,
            cluster_id: self.inner.identity.cluster_id(),
        }))
    }
}
