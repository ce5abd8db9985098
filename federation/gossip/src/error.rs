//! Errors of the gossip crate.

/// What can go wrong in gossip.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// A heartbeat could not be encoded.
    #[error("encoding a heartbeat: {0}")]
    Encode(#[source] postcard::Error),
    /// Bytes from a peer are not a heartbeat this node understands.
    #[error("not a heartbeat: {0}")]
    Decode(#[source] postcard::Error),
    /// A heartbeat breaks a bound.
    #[error("invalid heartbeat: {0}")]
    Invalid(String),
    /// The cluster secret is malformed.
    #[error("cluster secret: {0}")]
    Secret(String),
    /// Reading or writing the node's key file failed.
    #[error("node key {path}: {source}")]
    KeyFile {
        /// The key file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The node's key file holds no valid key.
    #[error("node key {path}: not an ed25519 key ({detail})")]
    BadKey {
        /// The key file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}
