//! The crate's single error type.
//!
//! Every fallible operation in `cell0-inference` returns [`InferenceError`].
//! Messages name the file, tensor or request field at fault so that the node
//! can pass them to a client unchanged.

use std::path::PathBuf;

/// Errors produced by model loading, tokenization, the backends and the batcher.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A configuration value is out of range; `field` names it.
    #[error("invalid inference config: {field}: {message}")]
    InvalidConfig {
        /// The offending field, e.g. `max_batch`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A request is over a limit or malformed; `field` names the part, e.g. `texts[3]`.
    #[error("invalid request: {field}: {message}")]
    InvalidRequest {
        /// The offending part of the request, e.g. `texts` or `texts[3]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The model name is not one this crate knows.
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel {
        /// The requested name.
        name: String,
        /// Comma-separated list of supported names.
        known: String,
    },
    /// A model file is missing.
    #[error("model file {path} not found (run scripts/fetch-model.sh to fetch the model)")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file's sha256 does not match the expected one.
    #[error("sha256 mismatch for {path}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The file checked.
        path: PathBuf,
        /// The expected hex digest.
        expected: String,
        /// The digest computed from the file.
        actual: String,
    },
    /// The safetensors file is truncated, corrupted or lacks a tensor.
    #[error("invalid weights in {path}: {message}")]
    InvalidWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// config.json cannot be parsed or describes an unsupported model.
    #[error("invalid model config {path}: {message}")]
    InvalidModelConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer cannot be loaded or failed on an input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// No usable GPU adapter / device, or a GPU operation failed.
    #[error("wgpu backend: {0}")]
    Gpu(String),
    /// A backend was asked for an input it cannot handle (shape, length).
    #[error("backend: {0}")]
    Backend(String),
    /// The batcher has shut down and no longer accepts requests.
    #[error("the embedding batcher has shut down")]
    BatcherClosed,
}

/// Shorthand used across the crate.
pub type Result<T, E = InferenceError> = std::result::Result<T, E>;
