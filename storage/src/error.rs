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
    /// The data dir was written by a newer build, in a format this one
    /// cannot read.
    #[error("the data dir has format {found}; this build reads formats up to {newest}: upgrade cell0")]
    NewerFormat {
        /// The data dir's format.
        found: u32,
        /// The newest format this build knows.
        newest: u32,
    },
    /// A snapshot file could not be read or written.
    #[error("snapshot file {path}: {source}")]
    SnapshotIo {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A snapshot file is truncated, damaged, of an unknown format, or does
    /// not match what it is installed as.
    #[error("snapshot file {path} is refused: {detail}")]
    BadSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
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

/// Encodes a record for storage (through the one codec of `cell0-state`).
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(cell0_state::codec::encode("record", v)?)
}

/// Decodes a stored record, naming it in the error.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    Ok(cell0_state::codec::decode(what, bytes)?)
}

/// Decodes the first fields of a stored record, ignoring the rest.
pub(crate) fn decode_prefix<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    Ok(cell0_state::codec::decode_prefix(what, bytes)?)
}
