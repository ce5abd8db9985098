//! Text embedding models behind a model-agnostic trait.
//!
//! [`Embedder`] is what the node and the batcher use: texts in, unit vectors
//! out, plus [`ModelInfo`]. It knows nothing of BERT, so a later model (or a
//! remote one) plugs in by implementing it. [`TextEmbedder`] is the
//! implementation for the catalogue's encoder models: tokenizer + [`Backend`].
//! Request limits are enforced here so every caller gets the same errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::cpu::CpuBackend;
use crate::backend::wgpu::WgpuBackend;
use crate::backend::{Backend, BackendInfo};
use crate::config::{BackendKind, InferenceConfig};
use crate::error::{InferenceError, Result};
use crate::model::{BertConfig, BertWeights, ModelFiles, model_spec, verify_sha256};
use crate::tokenize::TextTokenizer;

/// What a model is, for clients and `cell0 infer info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Catalogue name.
    pub name: String,
    /// Length of each embedding.
    pub dim: usize,
    /// Most tokens per text; longer texts are truncated.
    pub max_tokens: usize,
}

/// Model and backend together: what `cell0 infer info` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// The loaded model.
    pub model: ModelInfo,
    /// What it runs on.
    pub backend: BackendInfo,
}

/// A text embedding model.
pub trait Embedder: Send + Sync {
    /// The model's name and shape.
    fn model_info(&self) -> ModelInfo;

    /// Token ids of each text as the model sees them (after truncation).
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>>;

    /// Embeds already tokenized texts (from [`Embedder::tokenize`]); one unit vector each.
    /// Ids the model has no embedding for are an [`InferenceError::InvalidRequest`].
    fn embed_tokens(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;

    /// Embeds texts: one L2-normalized vector of `dim` floats per text.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let tokens = self.tokenize(texts)?;
        self.embed_tokens(&tokens)
    }
}

/// Where a model's files are and whether to check their digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// Catalogue name, e.g. [`crate::MINILM_L6_V2`].
    pub name: String,
    /// Directory laid out by `scripts/fetch-model.sh`.
    pub dir: PathBuf,
    /// Verify `model.safetensors` and `tokenizer.json` against the catalogue's sha256.
    pub verify_sha256: bool,
}

impl ModelSource {
    /// A source for `name` in `dir`, with digest verification on.
    pub fn new(name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            dir: dir.into(),
            verify_sha256: true,
        }
    }
}

/// Opens the backend `config` asks for: `auto` takes a hardware GPU when
/// wgpu finds one and the CPU engine otherwise.
pub fn open_backend(config: &InferenceConfig) -> Result<Box<dyn Backend>> {
    config.validate()?;
    match config.backend {
        BackendKind::Cpu => Ok(Box::new(CpuBackend::new(config.cpu_threads)?)),
        BackendKind::Wgpu => Ok(Box::new(WgpuBackend::new(config.adapter.as_deref(), false)?)),
        BackendKind::Auto => match WgpuBackend::new(config.adapter.as_deref(), true) {
            Ok(b) => Ok(Box::new(b)),
            Err(e) => {
                tracing::info!(reason = %e, "no hardware GPU adapter; using the CPU engine");
                Ok(Box::new(CpuBackend::new(config.cpu_threads)?))
            }
        },
    }
}

/// An encoder text-embedding model on a [`Backend`].
pub struct TextEmbedder {
    info: ModelInfo,
    tokenizer: TextTokenizer,
    backend: Box<dyn Backend>,
    limits: RequestLimits,
    /// Rows of the word embedding table: token ids must be below it.
    vocab: usize,
    /// Rows of the position embedding table: most tokens per sequence.
    positions: usize,
}

impl std::fmt::Debug for TextEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEmbedder")
            .field("info", &self.info)
            .field("backend", &self.backend.info())
            .finish_non_exhaustive()
    }
}

/// Per-request limits copied from [`InferenceConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most texts per request.
    pub max_texts: usize,
    /// Most UTF-8 bytes per text.
    pub max_text_bytes: usize,
    /// Most texts per forward pass.
    pub max_batch: usize,
}

impl RequestLimits {
    /// The limits of `config`.
    pub fn from_config(config: &InferenceConfig) -> Self {
        Self {
            max_texts: config.max_texts_per_request,
            max_text_bytes: config.max_text_bytes,
            max_batch: config.max_batch,
        }
    }

    /// Rejects a request over the limits, naming `texts` or `texts[i]`.
    pub fn check<S: AsRef<str>>(&self, texts: &[S]) -> Result<()> {
        if texts.len() > self.max_texts {
            return Err(InferenceError::InvalidRequest {
                field: "texts".into(),
                message: format!("{} texts; at most {} per request", texts.len(), self.max_texts),
            });
        }
        for (i, t) in texts.iter().enumerate() {
            let n = t.as_ref().len();
            if n > self.max_text_bytes {
                return Err(InferenceError::InvalidRequest {
                    field: format!("texts[{i}]"),
                    message: format!("{n} bytes; at most {} per text", self.max_text_bytes),
                });
            }
        }
        Ok(())
    }
}

impl TextEmbedder {
    /// Loads the model of `source` onto the backend chosen by `config`.
    pub fn load(source: &ModelSource, config: &InferenceConfig) -> Result<Self> {
        config.validate()?;
        let backend = open_backend(config)?;
        Self::load_on(source, config, backend)
    }

    /// Loads the model of `source` onto a given backend.
    pub fn load_on(source: &ModelSource, config: &InferenceConfig, mut backend: Box<dyn Backend>) -> Result<Self> {
        config.validate()?;
        let spec = model_spec(&source.name)?;
        let files = ModelFiles::in_dir(&source.dir)?;
        if source.verify_sha256 {
            verify_sha256(&files.weights, spec.weights_sha256)?;
            verify_sha256(&files.tokenizer, spec.tokenizer_sha256)?;
        }
        let bert = BertConfig::from_file(&files.config)?;
        let max_tokens = config.max_tokens.min(spec.max_tokens).min(bert.max_position_embeddings);
        let tokenizer = TextTokenizer::load(&files.tokenizer, max_tokens)?;
        let dim = bert.hidden_size;
        let (vocab, positions) = (bert.vocab_size, bert.max_position_embeddings);
        let weights = BertWeights::load(&files.weights, bert)?;
        backend.upload(Arc::new(weights))?;
        tracing::info!(model = spec.name, backend = %backend.info().backend, "model loaded");
        Ok(Self {
            info: ModelInfo {
                name: spec.name.to_string(),
                dim,
                max_tokens,
            },
            tokenizer,
            backend,
            limits: RequestLimits::from_config(config),
            vocab,
            positions,
        })
    }

    /// What the model runs on.
    pub fn backend_info(&self) -> BackendInfo {
        self.backend.info()
    }

    /// Model and backend, for `cell0 infer info`.
    pub fn info(&self) -> EngineInfo {
        EngineInfo {
            model: self.info.clone(),
            backend: self.backend.info(),
        }
    }

    /// The backend, for benchmarks.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The request limits enforced by [`Embedder::embed`].
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }
}

impl Embedder for TextEmbedder {
    fn model_info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        self.limits.check(texts)?;
        self.tokenizer.encode_batch(texts)
    }

    fn embed_tokens(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        // Checked here on the whole batch, so an error names the sequence by
        // its index in `batch` (the backend checks again, per chunk).
        crate::backend::check_token_ids(batch, self.vocab, self.positions)?;
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(self.limits.max_batch.max(1)) {
            out.extend(self.backend.embed(chunk)?);
        }
        Ok(out)
    }
}

/// Default model directory: `$CELL0_MODEL_DIR`, else `<root>/models/all-minilm-l6-v2`.
pub fn default_model_dir(root: &Path) -> PathBuf {
    std::env::var_os("CELL0_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models").join(crate::MINILM_L6_V2))
}

/// Cosine similarity of two vectors (0 when either is zero or lengths differ).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let d = (na * nb).sqrt();
    if d > 0.0 { dot / d } else { 0.0 }
}

/// The `k` vectors most cosine-similar to `query`, as `(index, score)`,
/// best first; ties keep the lower index first. Vectors whose length differs
/// from the query's score 0.
pub fn top_k_cosine(query: &[f32], vectors: &[Vec<f32>], k: usize) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = cosine(query, v);
            (i, if s.is_nan() { f32::NEG_INFINITY } else { s })
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}
