//! cell0-consensus: Cell0's replicated state, agreed through Raft.
//!
//! - [`types`]: openraft's type configuration and the member record.
//! - [`command`], [`registry`], [`nodes`]: the deterministic state machine's
//!   commands and tables, from [`cell0_state`] (re-exported).
//! - [`state`]: the state machine as openraft sees it: apply through
//!   [`cell0_state::apply`], notifications per table and for watchers.
//! - [`Consensus`]: one node's member: group commit on the leader, request
//!   forwarding, linearizable reads by coalesced read-index rounds,
//!   membership changes.
//! - [`network`]: the Raft transport over tonic and the internal service.
//! - [`offline`]: restore and forced recovery of a stopped node's store.
//! - [`bench`](mod@bench): apply measured alone, on a scratch store.
//!
//! Storage is [`cell0_storage`]; the API edge (gRPC, status codes) is the
//! node crate's.

mod batcher;
pub mod bench;
mod config;
mod elections;
mod error;
pub mod exchange;
mod facade;
pub mod failpoints;
mod forwarder;
mod grouping;
mod inner;
mod membership;
pub mod network;
pub mod offline;
mod reads;
mod routing;
mod server;
mod snapshot_stream;
mod snapshots;
pub mod state;
mod task;
pub mod testkit;
pub mod types;

pub use cell0_state::{Table, acl, agents, command, handoff, nodes, registry, tasks};

pub use command::{Command, KeyValue, RequestId, Response};
pub use config::ConsensusConfig;
pub use error::{ConsensusError, PreconditionCause, Result, UnavailableCause};
pub use facade::{Consensus, Consistency, ExportedSnapshot, Member, Role, Status, StorageBackend};
pub use membership::MAX_PROMOTION_LAG;
pub use nodes::{NodeCommand, NodeResources};
pub use registry::{MAX_MODEL_BYTES, ModelCommand, ModelEntry, ModelFile, ModelManifest, ModelOutcome, is_sha256_hex};
pub use server::InternalService;
pub use state::{Applied, EventKind, StateEvent};
pub use types::{NodeId, NodeInfo, SharedCommand, TypeConfig};
