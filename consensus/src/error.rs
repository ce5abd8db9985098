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
        /// Why, for clients to branch on.
        cause: UnavailableCause,
        /// Why, for people.
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
    #[error("refused: {message}")]
    FailedPrecondition {
        /// Why, for clients to branch on.
        cause: PreconditionCause,
        /// Why, for people.
        message: String,
    },
}

/// Why a request could not be served now; retrying later may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnavailableCause {
    /// This node is not the leader and the leader did not take the request.
    NotLeader,
    /// No leader is elected, or none is known to this node.
    NoLeader,
    /// The leader is known but did not answer.
    LeaderUnreachable,
    /// The leader could not confirm its leadership with a quorum.
    NoQuorum,
    /// This replica did not catch up with the leader in time for a read.
    ReplicaBehind,
    /// A joining node cannot be reached at its internal address.
    NodeUnreachable,
    /// Raft refused a membership change (another one is in progress).
    MembershipChangeRefused,
}

/// Why the cluster's state refuses a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreconditionCause {
    /// A learner does not answer, so it is not promoted.
    UnreachableLearner,
    /// A learner answers but is too far behind to vote.
    LearnerBehind,
    /// Removing the voter would leave too few reachable voters.
    QuorumAtRisk,
    /// The node belongs to another cluster.
    OtherCluster,
    /// Another node sent a message in a format newer than this node reads
    /// (a newer build): upgrade this node.
    NewerMessageFormat,
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
            cause: UnavailableCause::NotLeader,
            reason: "this node is not the leader".into(),
            leader_id,
            leader_addr: leader.map(|n| n.public_addr),
        }
    }

    /// An [`ConsensusError::Unavailable`] without a leader hint.
    pub fn unavailable(cause: UnavailableCause, reason: impl Into<String>) -> Self {
        ConsensusError::Unavailable {
            cause,
            reason: reason.into(),
            leader_id: None,
            leader_addr: None,
        }
    }
}

impl ConsensusError {
    /// A [`ConsensusError::FailedPrecondition`].
    pub fn refused(cause: PreconditionCause, message: impl Into<String>) -> Self {
        ConsensusError::FailedPrecondition {
            cause,
            message: message.into(),
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
