//! Errors of the storage crate.
//!
//! Every variant names what failed and where, so a node that cannot open its
//! data dir tells its operator why in one line instead of panicking.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong below Raft.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB refused to open the directory (locked by another process,
    /// corrupted files, unreadable permissions...).
    #[cfg(feature = "rocksdb")]
    #[error("cannot open data dir {path}: {source}")]
    Open {
        /// The data directory.
        path: PathBuf,
        /// The engine's own error.
        source: rocksdb::Error,
    },
    /// The directory holds a database that is not a Cell0 store, or one of
    /// another node.
    #[error("data dir {path} {reason}; point --data-dir at this node's own directory or an empty one")]
    ForeignDataDir {
        /// The data directory.
        path: PathBuf,
        /// Why it is considered foreign.
        reason: String,
    },
    /// A stored record could not be decoded: the data dir is corrupted or was
    /// written by an incompatible version.
    #[error("corrupted record in {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// A read or write of the engine failed.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// A table name is not usable (empty or containing a NUL byte).
    #[error("invalid table name {0:?}")]
    InvalidTable(String),
    /// The state machine failed while applying or reading.
    #[error(transparent)]
    State(#[from] cell0_state::StateError),
}

#[cfg(feature = "rocksdb")]
impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// Encodes a record for storage; encoding plain serde structs cannot fail
/// except on bugs, which are surfaced as [`Error::Io`].
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| Error::Io(format!("encode: {e}")))
}

/// Decodes a stored record, naming it in the error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// Decodes the first field of a stored record, ignoring the rest (postcard
/// writes struct fields in order with no framing), naming it in the error.
pub(crate) fn decode_prefix<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::take_from_bytes(bytes)
        .map(|(v, _rest)| v)
        .map_err(|e| Error::Corrupt {
            what,
            detail: e.to_string(),
        })
}
