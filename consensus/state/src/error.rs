//! Errors of the state machine.
//!
//! [`StateError`] is what reads and validation fail with; [`ApplyError`]
//! separates what apply may do with a command: refuse it deterministically
//! (every replica records the same refusal as the command's response) or
//! fail fatally (storage broke or a stored row cannot be decoded: the node
//! must stop rather than diverge).

/// Result alias of this crate.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// What reading, validating or applying can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The input breaks a limit or is malformed; `field` names the culprit.
    #[error("invalid argument: {field} {reason}")]
    InvalidArgument {
        /// The offending field, e.g. `key` or `batch[3].value`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The requested revision is older than the retained history.
    #[error("revision {requested} is compacted; the oldest retained revision is {oldest}")]
    Compacted {
        /// What was asked for.
        requested: u64,
        /// The oldest revision still retained.
        oldest: u64,
    },
    /// A stored row could not be decoded (corruption, or written by an
    /// incompatible version).
    #[error("corrupted {what}: {detail}")]
    Corrupt {
        /// Which row.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// A stored row was written in a layout newer than this build knows (a
    /// data dir or snapshot from a newer version).
    #[error("{what} has layout {version}; this build reads layouts up to {newest}: upgrade this node")]
    NewerLayout {
        /// Which row.
        what: &'static str,
        /// The row's layout.
        version: u8,
        /// The newest layout this build knows.
        newest: u8,
    },
    /// A value could not be encoded (a bug).
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's message.
        detail: String,
    },
    /// A response is not of the kind its command produces (a bug, or a
    /// leader of another version).
    #[error("expected the response to {expected}, got {got}")]
    UnexpectedResponse {
        /// The command whose response was expected.
        expected: &'static str,
        /// What came instead.
        got: String,
    },
    /// The storage under the transaction failed.
    #[error("storage failed: {0}")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StateError {
    /// An [`StateError::InvalidArgument`] for `field`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        StateError::InvalidArgument {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// An [`StateError::InvalidArgument`] for `field`, `len` bytes long
    /// where `limit` is the most allowed.
    pub fn too_long(field: &str, len: usize, limit: usize) -> Self {
        StateError::invalid(field, format!("is {len} bytes; the limit is {limit}"))
    }

    /// A storage failure with its typed source.
    pub fn storage(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StateError::Storage(Box::new(e))
    }
}

/// Why apply did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Storage or decoding failed: the node must stop applying (another
    /// replica may have applied the command, so continuing would diverge).
    #[error("apply failed: {0}")]
    Fatal(#[from] StateError),
}
