//! Errors of the consensus layer.
//!
//! Each variant corresponds to one client-visible outcome, so the API edge can
//! map them to gRPC codes in one place. The enum is serializable because a
//! follower receives it from the leader when it forwards a request.

use serde::{Deserialize, Serialize};

use crate::types::{NodeId, NodeInfo};

/// What a consensus operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ConsensusError {
    /// The request breaks a limit or is malformed; `field` names the culprit.
    #[error("invalid argument: {field} {reason}")]
    InvalidArgument {
        /// The offending field, e.g. `key` or `batch[3].value`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No leader is reachable, or quorum is lost; retrying later may succeed.
    /// Carries the leader's public address when one is known.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
        /// Known leader, if any.
        leader_id: Option<NodeId>,
        /// The known leader's public API address, if any.
        leader_addr: Option<String>,
    },
    /// The outcome of a write is unknown: it was proposed but leadership was
    /// lost before it was acknowledged. It may or may not have been applied.
    #[error("write outcome unknown: {0}")]
    Indeterminate(String),
    /// The requested revision is older than the retained history.
    #[error("revision {requested} is compacted; the oldest retained revision is {oldest}")]
    Compacted {
        /// What was asked for.
        requested: u64,
        /// The oldest revision still retained.
        oldest: u64,
    },
    /// A membership operation named an unknown node.
    #[error("not found: {0}")]
    NotFound(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Storage or another internal component failed.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request is valid but the cluster's state does not allow it now
    /// (for example a removal that would leave too few healthy voters).
    #[error("refused: {0}")]
    FailedPrecondition(String),
}

impl ConsensusError {
    /// An [`ConsensusError::InvalidArgument`] for `field`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ConsensusError::InvalidArgument {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The retryable answer of a node that is not the leader, with the
    /// leader it knows of.
    pub fn not_leader(leader_id: Option<NodeId>, leader: Option<NodeInfo>) -> Self {
        ConsensusError::Unavailable {
            reason: "this node is not the leader".into(),
            leader_id,
            leader_addr: leader.map(|n| n.public_addr),
        }
    }

    /// An [`ConsensusError::Unavailable`] without a leader hint.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        ConsensusError::Unavailable {
            reason: reason.into(),
            leader_id: None,
            leader_addr: None,
        }
    }
}

impl From<cell0_state::StateError> for ConsensusError {
    fn from(e: cell0_state::StateError) -> Self {
        match e {
            cell0_state::StateError::InvalidArgument { field, reason } => {
                ConsensusError::InvalidArgument { field, reason }
            }
            cell0_state::StateError::Compacted { requested, oldest } => ConsensusError::Compacted { requested, oldest },
            other => ConsensusError::Internal(other.to_string()),
        }
    }
}

impl From<cell0_storage::Error> for ConsensusError {
    fn from(e: cell0_storage::Error) -> Self {
        ConsensusError::Internal(e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = ConsensusError> = std::result::Result<T, E>;
