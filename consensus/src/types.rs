//! The openraft type configuration of Cell0 and the node record every member
//! carries in the Raft membership.
//!
//! A log entry's command is shared ([`SharedCommand`]): the log store keeps
//! the newest entries in memory (`cell0_storage::LogStore`), and apply and
//! every replication stream take them from there by reference count instead
//! of decoding each one again. Its encoding is the command's own, so the log
//! and wire formats are those of [`Command`].

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// The command a log entry carries, shared between the copies of the entry
/// a node holds (the log store's recent entries, apply, replication).
/// Encoded exactly as the [`Command`] inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCommand(Arc<Command>);

impl From<Command> for SharedCommand {
    fn from(cmd: Command) -> Self {
        Self(Arc::new(cmd))
    }
}

impl std::ops::Deref for SharedCommand {
    type Target = Command;

    fn deref(&self) -> &Command {
        &self.0
    }
}

impl Serialize for SharedCommand {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedCommand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Command::deserialize(deserializer).map(Self::from)
    }
}

openraft::declare_raft_types!(
    /// Cell0's Raft types: commands in, responses out, snapshots as files.
    pub TypeConfig:
        D = SharedCommand,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = cell0_storage::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft instance type.
pub type Raft = openraft::Raft<TypeConfig>;
