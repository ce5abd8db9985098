//! Runtime configuration of the inference engine.
//!
//! [`InferenceConfig`] is what the node reads from its config file. Defaults
//! live in code ([`Default`]) and [`InferenceConfig::validate`] rejects values
//! that would make the engine misbehave, naming the offending field.

use serde::{Deserialize, Serialize};

use crate::error::{InferenceError, Result};

/// Which compute backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A hardware GPU (discrete or integrated) through wgpu when one exists,
    /// otherwise the native CPU engine.
    #[default]
    Auto,
    /// Always wgpu (on a machine without a GPU: a software Vulkan adapter such as lavapipe).
    Wgpu,
    /// Always the native CPU engine.
    Cpu,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cpu => "cpu",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendKind::Auto),
            "wgpu" => Ok(BackendKind::Wgpu),
            "cpu" => Ok(BackendKind::Cpu),
            _ => Err(format!("{s:?} is not a backend; use auto, wgpu or cpu")),
        }
    }
}

/// Configuration of the local inference engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// Backend selection: `auto`, `wgpu` or `cpu`.
    pub backend: BackendKind,
    /// Pick the wgpu adapter whose name contains this substring (case-insensitive);
    /// `None` takes the first suitable adapter.
    pub adapter: Option<String>,
    /// Most texts run in one forward pass by the batcher.
    pub max_batch: usize,
    /// Longest time in milliseconds the batcher waits for more requests before
    /// running a partial batch. 0 (the default) runs at once with whatever is
    /// queued: under load, requests queue while a pass runs, so batches still
    /// fill, and a lone request pays no wait.
    pub max_wait_ms: u64,
    /// Most texts accepted in one embed request.
    pub max_texts_per_request: usize,
    /// Largest text accepted, in UTF-8 bytes.
    pub max_text_bytes: usize,
    /// Most tokens per text, `[CLS]` and `[SEP]` included; longer texts are truncated.
    pub max_tokens: usize,
    /// Number of threads of the CPU engine; 0 uses every core.
    pub cpu_threads: usize,
    /// Capacity of the batcher's request queue (requests, not texts).
    pub queue_capacity: usize,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Auto,
            adapter: None,
            max_batch: 32,
            max_wait_ms: 0,
            max_texts_per_request: 256,
            max_text_bytes: 64 * 1024,
            max_tokens: 256,
            cpu_threads: 0,
            queue_capacity: 1024,
        }
    }
}

impl InferenceConfig {
    /// Checks every field, returning an error that names the first bad one.
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &'static str, message: impl Into<String>) -> Result<()> {
            Err(InferenceError::InvalidConfig {
                field,
                message: message.into(),
            })
        }
        if let Some(a) = &self.adapter
            && a.trim().is_empty()
        {
            return bad("adapter", "must not be empty when set");
        }
        if self.max_batch == 0 || self.max_batch > 1024 {
            return bad("max_batch", format!("must be in 1..=1024, got {}", self.max_batch));
        }
        if self.max_wait_ms > 10_000 {
            return bad(
                "max_wait_ms",
                format!("must be at most 10000, got {}", self.max_wait_ms),
            );
        }
        if self.max_texts_per_request == 0 {
            return bad("max_texts_per_request", "must be at least 1");
        }
        if self.max_text_bytes == 0 {
            return bad("max_text_bytes", "must be at least 1");
        }
        if self.max_tokens < 2 || self.max_tokens > 512 {
            return bad("max_tokens", format!("must be in 2..=512, got {}", self.max_tokens));
        }
        if self.cpu_threads > 1024 {
            return bad("cpu_threads", format!("must be at most 1024, got {}", self.cpu_threads));
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity", "must be at least 1");
        }
        Ok(())
    }
}
