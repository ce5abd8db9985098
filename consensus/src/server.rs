//! Server side of the internal gRPC service: Raft messages from peers and
//! requests forwarded by followers.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cell0_proto::internal::RaftMessage;
use cell0_proto::internal::raft_server::{Raft as RaftRpc, RaftServer};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::network::{MAX_INTERNAL_MESSAGE_BYTES, decode, encode};
use crate::node::{ForwardRequest, Inner};
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
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request.get_ref()).map_err(bad_payload)?;
        if let Some(commit) = rpc.leader_commit {
            self.inner.leader_commit.fetch_max(commit.index, Ordering::AcqRel);
        }
        reply(&self.inner.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.inner.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.inner.raft.install_snapshot(rpc).await)
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: ForwardRequest = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.inner.handle_local(req).await)
    }
}
