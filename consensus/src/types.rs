//! The openraft type configuration of Cell0 and the node record every member
//! carries in the Raft membership.

use serde::{Deserialize, Serialize};

use crate::command::{Command, Response};

pub use cell0_state::NodeId;

/// What the cluster knows of a member; stored in the replicated membership, so
/// every node can reach every other one and show it to clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Human-readable node name, unique by convention.
    pub name: String,
    /// The site (region) the node runs in.
    pub site: String,
    /// host:port of the public gRPC API.
    pub public_addr: String,
    /// host:port of the internal gRPC API (Raft, forwarding).
    pub internal_addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.internal_addr)
    }
}

openraft::declare_raft_types!(
    /// Cell0's Raft types: commands in, responses out, snapshots as files.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = cell0_storage::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft instance type.
pub type Raft = openraft::Raft<TypeConfig>;
