//! The one encoding of rows and payloads: postcard, with errors that name
//! what was being read or written.

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
