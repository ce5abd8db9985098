//! The compute backends and the trait they share.
//!
//! A [`Backend`] receives a model's weights once ([`Backend::upload`]) and then
//! runs forward passes on batches of token-id sequences, returning one pooled,
//! L2-normalized embedding per sequence. Sequences arrive unpadded; each
//! backend lays them out as suits it (the CPU engine packs them, wgpu pads
//! to the longest one and masks). Backends also expose a plain matmul so the
//! bench can report GFLOP/s per backend.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::BertWeights;

pub mod cpu;
mod skinny;
pub mod wgpu;

/// What a backend runs on, for `cell0 infer info` and logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `cpu` or `wgpu`.
    pub backend: String,
    /// Adapter or CPU name.
    pub adapter: String,
    /// Driver name and version (empty for the CPU engine).
    pub driver: String,
    /// Device type: `cpu`, `discrete-gpu`, `integrated-gpu`, `virtual-gpu`, `software` (the CPU engine) or `other`.
    pub device_type: String,
    /// Graphics API (`vulkan`, `metal`, `dx12`) or `native`.
    pub api: String,
    /// Threads (CPU engine) or compute limits (wgpu), as `name=value` pairs.
    pub limits: Vec<(String, u64)>,
}

/// A compute engine for encoder (BERT-family) text embedding models.
pub trait Backend: Send + Sync {
    /// What the backend runs on.
    fn info(&self) -> BackendInfo;

    /// Makes `weights` the model of later [`Backend::embed`] calls (uploaded once).
    fn upload(&mut self, weights: Arc<BertWeights>) -> Result<()>;

    /// Runs the encoder on `batch` (token ids with `[CLS]`/`[SEP]`, each no
    /// longer than the model's positions) and returns, per sequence, the
    /// masked mean of the last hidden state, L2-normalized.
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;

    /// `a[m,k] · b[k,n]`, row-major, for benchmarks and kernel tests.
    fn matmul(&self, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>>;
}

/// Checks a batch against the model before a backend indexes tables with it.
pub(crate) fn check_batch(batch: &[Vec<u32>], w: &BertWeights) -> Result<()> {
    let c = &w.config;
    for (i, seq) in batch.iter().enumerate() {
        if seq.is_empty() || seq.len() > c.max_position_embeddings {
            return Err(crate::InferenceError::Backend(format!(
                "sequence {i} has {} tokens; must be 1..={}",
                seq.len(),
                c.max_position_embeddings
            )));
        }
        if let Some(&bad) = seq.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(crate::InferenceError::Backend(format!(
                "sequence {i} has token id {bad} outside the vocabulary of {}",
                c.vocab_size
            )));
        }
    }
    Ok(())
}
