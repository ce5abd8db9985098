//! Server side of the internal gRPC service: Raft messages from peers and
//! requests forwarded by followers.
//!
//! Every request is checked against this node's wire identity before it is
//! decoded: one meant for another node or another cluster is refused with
//! FAILED_PRECONDITION, so a wrong address can never make this node answer
//! (and be counted) for another member.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cell0_proto::internal::raft_server::{Raft as RaftRpc, RaftServer};
use cell0_proto::internal::{IdentifyRequest, IdentifyResponse, RaftMessage};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::inner::Inner;
use crate::network::{MAX_INTERNAL_MESSAGE_BYTES, decode, encode};
use crate::routing::ForwardRequest;
use crate::types::{NodeId, TypeConfig};

/// The `cell0.internal.v1.Raft` service of one node.
pub struct InternalService {
    inner: Arc<Inner>,
}

impl InternalService {
    pub(crate) fn server(inner: Arc<Inner>) -> RaftServer<Self> {
        RaftServer::new(Self { inner })
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
    }
}

fn bad_payload(e: crate::ConsensusError) -> Status {
    Status::invalid_argument(format!("malformed internal message: {e}"))
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    encode(v)
        .map(Response::new)
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl RaftRpc for InternalService {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.inner.identity.check(request.get_ref())?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request.get_ref()).map_err(bad_payload)?;
        // The commit index a leader reports is known to hold for this node's
        // log only up to what this request made match, and only once the
        // request was accepted.
        let commit = rpc.leader_commit.map(|c| c.index);
        let last = rpc
            .entries
            .last()
            .map(|e| e.log_id.index)
            .or(rpc.prev_log_id.map(|p| p.index));
        let result = self.inner.raft.append_entries(rpc).await;
        let matched = match &result {
            Ok(AppendEntriesResponse::Success) => last,
            Ok(AppendEntriesResponse::PartialSuccess(m)) => m.map(|m| m.index),
            _ => None,
        };
        // Accepted from a leader (a conflict too: only the logs differ):
        // this node's leader lease holds (prompt elections).
        if matches!(
            result,
            Ok(AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict)
        ) {
            self.inner.elections.heard_from_leader();
        }
        if let (Some(commit), Some(matched)) = (commit, matched) {
            self.inner
                .leader_commit
                .fetch_max(commit.min(matched), Ordering::AcqRel);
        }
        reply(&result)
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
        self.inner.identity.check(request.get_ref())?;
        let req: ForwardRequest = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.inner.handle_local(req).await)
    }

    async fn identify(&self, _request: Request<IdentifyRequest>) -> Result<Response<IdentifyResponse>, Status> {
        Ok(Response::new(IdentifyResponse {
            node_id: self.inner.id,
            cluster_id: self.inner.identity.cluster_id(),
        }))
    }
}
