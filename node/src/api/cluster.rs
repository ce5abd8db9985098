//! `cell0.v1.Cluster`: status, membership and admission of new nodes.

use std::collections::BTreeMap;
use std::io::Read;
use std::pin::Pin;

use cell0_consensus::nodes::NodeLiveness;
use cell0_consensus::{Consensus, Consistency, Member, NodeId, NodeInfo, NodeResources, Role, nodes};
use cell0_proto::v1::cluster_server::Cluster;
use cell0_proto::v1::{self, RaftRole};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{ApiError, RequestGate, auth};
use crate::gossip::{GossipView, MemberStatus};

/// The Cluster service of one node.
pub struct ClusterApi {
    consensus: Consensus,
    gate: RequestGate,
    gossip: GossipView,
}

impl ClusterApi {
    /// A service answering through `consensus`, within the node's request
    /// budget `gate`; members carry what `gossip` knows of them.
    pub fn new(consensus: Consensus, gate: RequestGate, gossip: GossipView) -> Self {
        Self {
            consensus,
            gate,
            gossip,
        }
    }
}

fn gossip_to_proto(m: &MemberStatus) -> v1::GossipStatus {
    v1::GossipStatus {
        state: m.state.as_str().to_string(),
        last_heard_ms_ago: m.last_heard_ms_ago,
        version: m.heartbeat.version.clone(),
        gossip_addr: m.heartbeat.addresses.gossip.clone(),
        incarnation: m.heartbeat.incarnation,
        peer_id: m.heartbeat.peer_id.clone(),
    }
}

/// The Raft members with what gossip knows of each, then the nodes only
/// gossip knows (with their recorded liveness, from `records`), in id
/// order.
fn with_gossip(mut members: Vec<v1::Member>, gossip: Vec<MemberStatus>, records: &mut Records) -> Vec<v1::Member> {
    let mut heard: BTreeMap<u64, MemberStatus> = gossip.into_iter().map(|m| (m.heartbeat.node_id, m)).collect();
    for m in &mut members {
        if let Some(g) = heard.remove(&m.id) {
            m.gossip = Some(gossip_to_proto(&g));
        }
    }
    members.extend(heard.into_values().map(|g| v1::Member {
        liveness: records.liveness.remove(&g.heartbeat.node_id).map(liveness_to_proto),
        id: g.heartbeat.node_id,
        gossip: Some(gossip_to_proto(&g)),
        name: g.heartbeat.name,
        site: g.heartbeat.site,
        public_addr: g.heartbeat.addresses.public,
        internal_addr: g.heartbeat.addresses.internal,
        gossip_only: true,
        ..v1::Member::default()
    }));
    members
}

fn resources_to_proto(r: NodeResources) -> v1::NodeResources {
    v1::NodeResources {
        cpu_cores: r.cpu_cores,
        memory_bytes: r.memory_bytes,
        inference_backend: r.inference_backend,
        adapter: r.adapter,
        device_type: r.device_type,
        gpu: r.gpu,
        gpu_memory_bytes: r.gpu_memory_bytes,
    }
}

fn liveness_to_proto(l: NodeLiveness) -> v1::NodeLiveness {
    v1::NodeLiveness {
        state: l.liveness.as_str().to_string(),
        reason: l.reason,
        since_ms: l.since_ms,
    }
}

/// What the replicated state records of the nodes, for members.
#[derive(Default)]
struct Records {
    resources: BTreeMap<NodeId, NodeResources>,
    liveness: BTreeMap<NodeId, NodeLiveness>,
}

/// A member on the wire, with its resources and liveness when `records`
/// has them.
fn member_to_proto(m: Member, records: &mut Records) -> v1::Member {
    v1::Member {
        resources: records.resources.remove(&m.id).map(resources_to_proto),
        liveness: records.liveness.remove(&m.id).map(liveness_to_proto),
        gossip: None,
        gossip_only: false,
        id: m.id,
        name: m.info.name,
        site: m.info.site,
        public_addr: m.info.public_addr,
        internal_addr: m.info.internal_addr,
        voter: m.voter,
        leader: m.leader,
        matched_index: m.matched_index,
    }
}

fn role_to_proto(r: Role) -> RaftRole {
    match r {
        Role::Leader => RaftRole::Leader,
        Role::Follower => RaftRole::Follower,
        Role::Candidate => RaftRole::Candidate,
        Role::Learner => RaftRole::Learner,
        Role::Shutdown => RaftRole::Unknown,
    }
}

fn check_text(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.len() > max {
        return Err(ApiError::invalid(field, format!("is longer than {max} bytes")));
    }
    Ok(())
}

/// Bytes of a snapshot file per `SaveSnapshot` message.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<v1::SaveSnapshotResponse, Status>> + Send>>;

/// Sends `file` in chunks, `info` with the first; stops when the client
/// goes away.
fn send_file(
    mut file: std::fs::File,
    info: v1::SnapshotInfo,
    tx: mpsc::Sender<Result<v1::SaveSnapshotResponse, Status>>,
) {
    let mut info = Some(info);
    loop {
        let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        let mut filled = 0;
        while filled < data.len() {
            match file.read(&mut data[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::from(ApiError::Internal(format!(
                        "reading the snapshot file: {e}"
                    )))));
                    return;
                }
            }
        }
        if filled == 0 && info.is_none() {
            return;
        }
        data.truncate(filled);
        let last = filled < SNAPSHOT_CHUNK_BYTES;
        let msg = v1::SaveSnapshotResponse {
            info: info.take(),
            data: data.into(),
        };
        if tx.blocking_send(Ok(msg)).is_err() || last {
            return;
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    type SaveSnapshotStream = SnapshotStream;

    async fn save_snapshot(
        &self,
        _request: Request<v1::SaveSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.gate
            .observe("Cluster/SaveSnapshot", async {
                let exported = self.consensus.export_snapshot().await?;
                let info = v1::SnapshotInfo {
                    index: exported.index,
                    term: exported.term,
                    cluster_id: exported.summary.header.cluster_id,
                    size_bytes: exported.summary.file_bytes,
                    rows: exported.summary.rows,
                    sha256: exported.summary.sha256.clone(),
                    created_unix_ms: exported.summary.header.created_unix_ms,
                };
                tracing::info!(
                    index = info.index,
                    bytes = info.size_bytes,
                    trace_id = %auth::current_trace_id(),
                    "sending a snapshot to a client"
                );
                let (tx, rx) = mpsc::channel(4);
                tokio::task::spawn_blocking(move || send_file(exported.file, info, tx));
                Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as SnapshotStream))
            })
            .await
    }

    async fn status(&self, _request: Request<v1::StatusRequest>) -> Result<Response<v1::StatusResponse>, Status> {
        self.gate
            .observe("Cluster/Status", async {
                let s = self.consensus.status();
                let info = self.consensus.info();
                Ok(Response::new(v1::StatusResponse {
                    node_id: s.id,
                    node_name: info.name.clone(),
                    site: info.site.clone(),
                    role: role_to_proto(s.role) as i32,
                    leader_id: s.leader.unwrap_or(0),
                    term: s.term,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    revision: s.revision,
                    unix_time_ms: crate::scheduling::now_ms(),
                }))
            })
            .await
    }

    async fn members(&self, _request: Request<v1::MembersRequest>) -> Result<Response<v1::MembersResponse>, Status> {
        self.gate
            .observe("Cluster/Members", async {
                let mut records = self
                    .consensus
                    .read(Consistency::Serializable, |txn| {
                        Ok(Records {
                            resources: nodes::resources(txn)?,
                            liveness: nodes::liveness(txn)?,
                        })
                    })
                    .await?;
                let members = self
                    .consensus
                    .members()
                    .into_iter()
                    .map(|m| member_to_proto(m, &mut records))
                    .collect();
                Ok(Response::new(v1::MembersResponse {
                    members: with_gossip(members, self.gossip.members(), &mut records),
                    leader_id: self.consensus.status().leader.unwrap_or(0),
                }))
            })
            .await
    }

    async fn join(&self, request: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        self.gate
            .observe("Cluster/Join", async {
                let r = request.into_inner();
                check_text("name", &r.name, 64)?;
                check_text("site", &r.site, 64)?;
                check_text("public_addr", &r.public_addr, 256)?;
                check_text("internal_addr", &r.internal_addr, 256)?;
                let info = NodeInfo {
                    name: r.name,
                    site: r.site,
                    public_addr: r.public_addr,
                    internal_addr: r.internal_addr,
                };
                let members = self.consensus.join(r.node_id, info).await?;
                Ok(Response::new(v1::JoinResponse {
                    members: members
                        .into_iter()
                        .map(|m| member_to_proto(m, &mut Records::default()))
                        .collect(),
                }))
            })
            .await
    }

    async fn remove(&self, request: Request<v1::RemoveRequest>) -> Result<Response<v1::RemoveResponse>, Status> {
        self.gate
            .observe("Cluster/Remove", async {
                self.consensus.remove(request.into_inner().node_id).await?;
                Ok(Response::new(v1::RemoveResponse {}))
            })
            .await
    }
}
