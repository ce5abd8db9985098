//! cell0-consensus: Cell0's replicated state, agreed through Raft.
//!
//! - [`types`]: openraft's type configuration and the member record.
//! - [`command`]: the versioned commands carried in log entries, their
//!   responses and limits.
//! - [`state`]: the deterministic KV state machine with etcd-style revisions
//!   and the change history watchers resume from.
//! - [`registry`]: the replicated model registry (manifests and holders).
//! - [`nodes`]: replicated node records (resources for placement).
//! - [`Consensus`]: one node's member: group commit on the leader, request
//!   forwarding, linearizable reads by read index, membership changes.
//! - [`network`]: the Raft transport over tonic and the internal service.
//!
//! Storage is [`cell0_storage`]; the API edge (gRPC, status codes) is the
//! node crate's.

mod batcher;
pub mod command;
mod config;
mod error;
pub mod network;
mod node;
pub mod nodes;
pub mod registry;
mod server;
pub mod state;
pub mod testkit;
pub mod types;

pub use command::{Command, KeyValue, RequestId, Response};
pub use config::ConsensusConfig;
pub use error::{ConsensusError, Result};
pub use node::{Consensus, Consistency, MAX_PROMOTION_LAG, Member, Role, Status, StorageBackend};
pub use nodes::{NodeCommand, NodeResources};
pub use registry::{MAX_MODEL_BYTES, ModelCommand, ModelEntry, ModelFile, ModelManifest, ModelOutcome, is_sha256_hex};
pub use server::InternalService;
pub use state::{Applied, EventKind, StateEvent};
pub use types::{NodeId, NodeInfo, TypeConfig};
