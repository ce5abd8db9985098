//! The shared state of one member, behind every [`crate::Consensus`]
//! handle: what the facade, routing, membership and the internal service
//! all work on. It depends on none of them, so they depend on it and not on
//! each other.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use cell0_storage::Engine;

use crate::batcher::Batcher;
use crate::command::Limits;
use crate::config::ConsensusConfig;
use crate::error::ConsensusError;
use crate::forwarder::Forwarder;
use crate::network::{ChannelPool, PeerHealth, WireIdentity};
use crate::reads::ReadIndexer;
use crate::state::KvStateMachine;
use crate::types::{NodeId, NodeInfo, Raft};

/// One member's state.
pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) info: NodeInfo,
    pub(crate) config: ConsensusConfig,
    pub(crate) raft: Raft,
    pub(crate) engine: Arc<dyn Engine>,
    /// Where snapshot files (and exports being sent) live.
    pub(crate) snapshot_dir: std::path::PathBuf,
    pub(crate) sm: Arc<KvStateMachine>,
    pub(crate) batcher: Batcher,
    /// Sends this node's writes to the leader in groups (on a follower).
    pub(crate) forwarder: Forwarder,
    /// Coalesces this node's linearizable reads into read-index rounds.
    pub(crate) reads: ReadIndexer,
    /// Decides when to build snapshots.
    pub(crate) snapshot_trigger: crate::task::NamedTask,
    /// What the Raft service reports for prompt elections.
    pub(crate) elections: Arc<crate::elections::Elections>,
    /// Stands for election at once when waiting cannot help (see
    /// [`crate::elections`]).
    pub(crate) prompt_elections: crate::task::NamedTask,
    pub(crate) pool: Arc<ChannelPool>,
    pub(crate) limits: Limits,
    /// Highest commit index a leader has told this node about.
    pub(crate) leader_commit: AtomicU64,
    /// This node's id and cluster id on the wire.
    pub(crate) identity: WireIdentity,
    /// When each peer last answered (meaningful on the leader).
    pub(crate) health: Arc<PeerHealth>,
    /// Serialises membership decisions on the leader.
    pub(crate) membership: tokio::sync::Mutex<()>,
    /// This process's client id for request ids: random per start.
    pub(crate) client_id: u64,
    /// The next request sequence number.
    pub(crate) next_seq: AtomicU64,
    /// Raised when this member shuts down: its Exchange streams end (see
    /// [`crate::exchange`]) and idle ones to peers are dropped.
    pub(crate) closing: tokio::sync::watch::Sender<bool>,
    /// Where writes' and reads' durations are recorded.
    pub(crate) durations: Durations,
}

/// The request-duration histograms, found in the metrics recorder once:
/// finding one by name hashes its key, on every request.
pub(crate) struct Durations {
    /// `cell0_write_duration_seconds`.
    pub(crate) write: metrics::Histogram,
    /// `cell0_read_duration_seconds`.
    pub(crate) read: metrics::Histogram,
}

impl Durations {
    pub(crate) fn new() -> Self {
        Self {
            write: metrics::histogram!("cell0_write_duration_seconds"),
            read: metrics::histogram!("cell0_read_duration_seconds"),
        }
    }
}

impl Inner {
    /// Whether this node is the leader, as its Raft metrics say now.
    pub(crate) fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == openraft::ServerState::Leader
    }

    /// The leader's id, if one is known. Called on every routed request:
    /// it reads the metrics in place and copies no record.
    pub(crate) fn leader_id(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The leader's id and record, if one is known.
    pub(crate) fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let id = m.current_leader?;
        let info = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, info))
    }
}

/// The error for a response of another kind than its request's.
pub(crate) fn wrong_type() -> ConsensusError {
    ConsensusError::Internal("the leader answered with a response of the wrong kind".into())
}

/// A random u64 from the OS-seeded hasher keys of the standard library,
/// mixed with `salt` and the time; never 0.
pub(crate) fn random_u64(salt: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(salt);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish().max(1)
}
