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

use crate::error::{InferenceError, Result};
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
    /// masked mean of the last hidden state, L2-normalized. A token id
    /// outside the vocabulary, or a sequence empty or longer than the
    /// model's positions, is an [`InferenceError::InvalidRequest`] naming
    /// `tokens[i][j]` or `tokens[i]`, found before anything is computed.
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;

    /// `a[m,k] · b[k,n]`, row-major, for benchmarks and kernel tests.
    fn matmul(&self, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>>;
}

/// Rows of a row-major `[rows, width]` table (0 when `width` is 0).
fn table_rows(table: &[f32], width: usize) -> usize {
    table.len().checked_div(width).unwrap_or(0)
}

/// Checks token-id sequences against the embedding tables a forward pass
/// indexes with them: every id below `vocab` (the word table's rows) and
/// every sequence 1..=`positions` tokens long (its position ids are
/// `0..len`, rows of the position table). A bad sequence is an
/// [`InferenceError::InvalidRequest`] naming `tokens[i]`, a bad id one
/// naming `tokens[i][j]`.
pub(crate) fn check_token_ids(batch: &[Vec<u32>], vocab: usize, positions: usize) -> Result<()> {
    for (i, seq) in batch.iter().enumerate() {
        if seq.is_empty() {
            return Err(InferenceError::InvalidRequest {
                field: format!("tokens[{i}]"),
                message: "no tokens; a sequence needs at least one".into(),
            });
        }
        if seq.len() > positions {
            return Err(InferenceError::InvalidRequest {
                field: format!("tokens[{i}]"),
                message: format!(
                    "{} tokens, so position ids up to {}; the model has {positions} positions",
                    seq.len(),
                    seq.len() - 1
                ),
            });
        }
        if let Some((j, &bad)) = seq.iter().enumerate().find(|&(_, &t)| t as usize >= vocab) {
            return Err(InferenceError::InvalidRequest {
                field: format!("tokens[{i}][{j}]"),
                message: format!("token id {bad} is outside the vocabulary of {vocab} ids"),
            });
        }
    }
    Ok(())
}

/// Checks a batch against the model's embedding tables (their actual
/// lengths as well as the config) before a backend indexes them with it.
/// Every token has token type 0, so the type table needs that row.
pub(crate) fn check_batch(batch: &[Vec<u32>], w: &BertWeights) -> Result<()> {
    let c = &w.config;
    let h = c.hidden_size;
    if h == 0 || w.type_emb.len() < h {
        return Err(InferenceError::Backend(
            "the token type embedding table has no row for token type 0".into(),
        ));
    }
    let vocab = c.vocab_size.min(table_rows(&w.word_emb, h));
    let positions = c.max_position_embeddings.min(table_rows(&w.pos_emb, h));
    check_token_ids(batch, vocab, positions)
}

/// Checks the inputs of a padded embedding lookup (`ids` a `[batch, seq]`
/// grid, tables `[rows, hidden]`): shapes are backend errors, an id past the
/// word table an [`InferenceError::InvalidRequest`] naming `ids[t]`.
pub(crate) fn check_embedding_lookup(
    word: &[f32],
    pos: &[f32],
    typ: &[f32],
    ids: &[u32],
    seq: usize,
    hidden: usize,
) -> Result<()> {
    if hidden == 0 || seq == 0 || !ids.len().is_multiple_of(seq) || typ.len() < hidden {
        return Err(InferenceError::Backend("embed: bad shapes".into()));
    }
    if table_rows(pos, hidden) < seq {
        return Err(InferenceError::InvalidRequest {
            field: "seq".into(),
            message: format!("{seq} positions; the position table has {}", table_rows(pos, hidden)),
        });
    }
    let vocab = table_rows(word, hidden);
    if let Some((t, &bad)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
        return Err(InferenceError::InvalidRequest {
            field: format!("ids[{t}]"),
            message: format!("token id {bad} is outside the vocabulary of {vocab} ids"),
        });
    }
    Ok(())
}

/// Checks that every tensor of `w` has the length its config implies, so a
/// backend can index them by the config (weights built by hand, rather than
/// by [`BertWeights::load`] or [`BertWeights::random`], may not).
pub(crate) fn check_weights(w: &BertWeights) -> Result<()> {
    let c = &w.config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    if h == 0 || i == 0 || c.num_attention_heads == 0 || !h.is_multiple_of(c.num_attention_heads) {
        return Err(InferenceError::Backend(
            "weights: hidden_size, intermediate_size and num_attention_heads must be non-zero and heads divide hidden_size"
                .into(),
        ));
    }
    if w.layers.len() != c.num_hidden_layers {
        return Err(InferenceError::Backend(format!(
            "weights: {} layers, the config says {}",
            w.layers.len(),
            c.num_hidden_layers
        )));
    }
    let mut tensors: Vec<(String, usize, usize)> = vec![
        (
            "word_embeddings".into(),
            w.word_emb.len(),
            c.vocab_size.saturating_mul(h),
        ),
        (
            "position_embeddings".into(),
            w.pos_emb.len(),
            c.max_position_embeddings.saturating_mul(h),
        ),
        (
            "token_type_embeddings".into(),
            w.type_emb.len(),
            c.type_vocab_size.saturating_mul(h),
        ),
        ("embeddings.LayerNorm.weight".into(), w.emb_ln_g.len(), h),
        ("embeddings.LayerNorm.bias".into(), w.emb_ln_b.len(), h),
    ];
    for (n, l) in w.layers.iter().enumerate() {
        let parts = [
            ("qkv_w", l.qkv_w.len(), h.saturating_mul(3).saturating_mul(h)),
            ("qkv_b", l.qkv_b.len(), h.saturating_mul(3)),
            ("attn_out_w", l.attn_out_w.len(), h.saturating_mul(h)),
            ("attn_out_b", l.attn_out_b.len(), h),
            ("ln1_g", l.ln1_g.len(), h),
            ("ln1_b", l.ln1_b.len(), h),
            ("ff_in_w", l.ff_in_w.len(), h.saturating_mul(i)),
            ("ff_in_b", l.ff_in_b.len(), i),
            ("ff_out_w", l.ff_out_w.len(), i.saturating_mul(h)),
            ("ff_out_b", l.ff_out_b.len(), h),
            ("ln2_g", l.ln2_g.len(), h),
            ("ln2_b", l.ln2_b.len(), h),
        ];
        tensors.extend(
            parts
                .iter()
                .map(|&(name, got, want)| (format!("layers[{n}].{name}"), got, want)),
        );
    }
    if c.type_vocab_size == 0 {
        return Err(InferenceError::Backend(
            "weights: type_vocab_size is 0; token type 0 needs a row".into(),
        ));
    }
    match tensors.into_iter().find(|(_, got, want)| got != want) {
        Some((name, got, want)) => Err(InferenceError::Backend(format!(
            "weights: {name} has {got} values; the config implies {want}"
        ))),
        None => Ok(()),
    }
}
