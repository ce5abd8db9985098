//! Models on a node: the content-addressed file store ([`store`]), the
//! transfer of files between nodes ([`transfer`]) and the manager that keeps
//! the node's files and loaded engines in line with the replicated registry
//! ([`manager`]).

pub mod manager;
pub mod store;
pub mod transfer;

use cell0_consensus::ConsensusError;
use cell0_inference::InferenceError;

pub use manager::ModelManager;

/// What model operations on a node can fail with. The API edge maps each
/// variant to one gRPC code and reason (`api::error::ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Nothing is registered yet.
    #[error("no model is registered; add one with `cell0 model add DIR --name NAME --version N`")]
    NoModels,
    /// The request named no model and several are registered.
    #[error("model: several models are registered ({names}); name one")]
    Ambiguous {
        /// The registered names, comma-separated.
        names: String,
    },
    /// No model has this name.
    #[error("model: no model named {name:?} is registered")]
    UnknownModel {
        /// The requested name.
        name: String,
    },
    /// The model has no such version.
    #[error("version: model {name:?} has no version {version}")]
    UnknownVersion {
        /// Model name.
        name: String,
        /// Requested version.
        version: u32,
    },
    /// The version is registered but not loaded here yet (or failed to).
    #[error("model {name} version {version} is not ready on this node: {detail}")]
    NotReady {
        /// Model name.
        name: String,
        /// Version.
        version: u32,
        /// Fetch progress or the failure.
        detail: String,
    },
    /// A request field is malformed; `field` names it.
    #[error("{field} {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `model add` named a file that was not uploaded to this node.
    #[error("file {path} ({sha256}) was not uploaded to this node; upload every file before adding")]
    NotUploaded {
        /// Path in the manifest.
        path: String,
        /// Its digest.
        sha256: String,
    },
    /// Bytes do not hash to the expected digest (or have the wrong size).
    #[error("blob {sha256} failed verification: {detail}")]
    Corrupt {
        /// Expected digest.
        sha256: String,
        /// What was found instead.
        detail: String,
    },
    /// A peer could not deliver a blob.
    #[error("fetching from {addr}: {detail}")]
    Peer {
        /// The peer's internal address.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// No other node holds a blob this node needs.
    #[error("no other node holds {sha256} yet")]
    NoHolder {
        /// The blob.
        sha256: String,
    },
    /// A local file operation failed.
    #[error("model store: {0}")]
    Io(String),
    /// The engine refused a request or failed to load a model.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// The registry could not be read or written.
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
}

impl ModelError {
    /// An [`ModelError::Invalid`] for `field`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ModelError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
