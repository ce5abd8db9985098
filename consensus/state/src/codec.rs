//! The one encoding of rows, log payloads and internal messages: postcard,
//! with errors that name what was being read or written. Every crate
//! encodes through here.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, StateError};

/// Encodes `v`; naming `what` if it fails (a bug).
pub fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| StateError::Encode {
        what,
        detail: e.to_string(),
    })
}

/// Decodes a stored `what`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StateError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// Decodes a `what` from the front of `bytes`, ignoring what follows it
/// (postcard writes struct fields in order with no framing, so this reads
/// the first fields of a larger record).
pub fn decode_prefix<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::take_from_bytes(bytes)
        .map(|(v, _rest)| v)
        .map_err(|e| StateError::Corrupt {
            what,
            detail: e.to_string(),
        })
}
