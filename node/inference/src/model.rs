//! Model catalogue, file layout and weight loading.
//!
//! Owns the mapping from a model name to its expected files and digests, the
//! parsing of `config.json`, and the loading of a BERT encoder's weights from
//! `model.safetensors` (memory-mapped) into [`BertWeights`]. Linear weights are
//! stored transposed, `[in, out]` row-major, and Q/K/V are fused into one
//! `[hidden, 3*hidden]` matrix so that both backends run one GEMM per linear
//! step. Every tensor's dtype and shape is checked here, so the backends can
//! index the weights without further checks.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{InferenceError, Result};

/// Name of the only model shipped today.
pub const MINILM_L6_V2: &str = "all-minilm-l6-v2";

/// Static facts about a model this crate can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Catalogue name, e.g. `all-minilm-l6-v2`.
    pub name: &'static str,
    /// sha256 of `model.safetensors`.
    pub weights_sha256: &'static str,
    /// sha256 of `tokenizer.json`.
    pub tokenizer_sha256: &'static str,
    /// Default maximum number of tokens per text (sentence-transformers' `max_seq_length`).
    pub max_tokens: usize,
}

const CATALOGUE: &[ModelSpec] = &[ModelSpec {
    name: MINILM_L6_V2,
    weights_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    tokenizer_sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    max_tokens: 256,
}];

/// Looks up a model by catalogue name (case-insensitive).
pub fn model_spec(name: &str) -> Result<&'static ModelSpec> {
    CATALOGUE
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| InferenceError::UnknownModel {
            name: name.to_string(),
            known: CATALOGUE.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })
}

/// The files of a model directory as laid out by `scripts/fetch-model.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json` (Hugging Face model config).
    pub config: PathBuf,
    /// `tokenizer.json` (Hugging Face tokenizers format).
    pub tokenizer: PathBuf,
    /// `model.safetensors`.
    pub weights: PathBuf,
}

impl ModelFiles {
    /// Names the files in `dir` and checks that each exists.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let files = Self {
            config: dir.join("config.json"),
            tokenizer: dir.join("tokenizer.json"),
            weights: dir.join("model.safetensors"),
        };
        for p in [&files.config, &files.tokenizer, &files.weights] {
            if !p.is_file() {
                return Err(InferenceError::MissingFile { path: p.clone() });
            }
        }
        Ok(files)
    }
}

/// Computes the hex sha256 of a file, streaming it.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| InferenceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fails with [`InferenceError::ChecksumMismatch`] unless `path` hashes to `expected`.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(InferenceError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        })
    }
}

/// Hyper-parameters of a BERT encoder, read from `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Number of learned positions.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f32,
    /// Activation of the feed-forward layer; only exact `gelu` is supported.
    pub hidden_act: String,
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| InferenceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| InferenceError::InvalidModelConfig {
            path: path.to_path_buf(),
            message,
        };
        let c: BertConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if c.hidden_act != "gelu" {
            return Err(bad(format!("unsupported hidden_act {:?}", c.hidden_act)));
        }
        let dims = [
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.vocab_size,
            c.max_position_embeddings,
            c.type_vocab_size,
        ];
        if dims.iter().any(|&d| d == 0 || d > 1 << 20) {
            return Err(bad("a dimension is zero or absurdly large".into()));
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(bad("hidden_size is not a multiple of num_attention_heads".into()));
        }
        if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps >= 0.0) {
            return Err(bad("layer_norm_eps must be finite and non-negative".into()));
        }
        Ok(c)
    }

    /// The shape of all-MiniLM-L6-v2 (its `config.json`), for benchmarks on
    /// machines without the model files.
    pub fn minilm_l6_v2() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            vocab_size: 30522,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Weights of one transformer layer; matrices are `[in, out]` row-major.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// Fused Q, K, V projection, `[hidden, 3*hidden]`; columns are Q then K then V.
    pub qkv_w: Vec<f32>,
    /// Bias of the fused projection, `[3*hidden]`.
    pub qkv_b: Vec<f32>,
    /// Attention output projection, `[hidden, hidden]`.
    pub attn_out_w: Vec<f32>,
    /// Its bias.
    pub attn_out_b: Vec<f32>,
    /// Layer norm after attention: scale.
    pub ln1_g: Vec<f32>,
    /// Layer norm after attention: shift.
    pub ln1_b: Vec<f32>,
    /// Feed-forward up projection, `[hidden, intermediate]`.
    pub ff_in_w: Vec<f32>,
    /// Its bias.
    pub ff_in_b: Vec<f32>,
    /// Feed-forward down projection, `[intermediate, hidden]`.
    pub ff_out_w: Vec<f32>,
    /// Its bias.
    pub ff_out_b: Vec<f32>,
    /// Layer norm after the feed-forward block: scale.
    pub ln2_g: Vec<f32>,
    /// Layer norm after the feed-forward block: shift.
    pub ln2_b: Vec<f32>,
}

/// All weights of a BERT encoder, checked against its [`BertConfig`].
#[derive(Debug, Clone)]
pub struct BertWeights {
    /// The model's hyper-parameters.
    pub config: BertConfig,
    /// Word embeddings, `[vocab, hidden]`.
    pub word_emb: Vec<f32>,
    /// Position embeddings, `[max_positions, hidden]`.
    pub pos_emb: Vec<f32>,
    /// Token-type embeddings, `[type_vocab, hidden]`.
    pub type_emb: Vec<f32>,
    /// Embedding layer norm: scale.
    pub emb_ln_g: Vec<f32>,
    /// Embedding layer norm: shift.
    pub emb_ln_b: Vec<f32>,
    /// The transformer layers, in order.
    pub layers: Vec<LayerWeights>,
}

struct TensorReader<'a> {
    st: SafeTensors<'a>,
    path: &'a Path,
    prefix: &'static str,
}

impl TensorReader<'_> {
    fn bad(&self, message: String) -> InferenceError {
        InferenceError::InvalidWeights {
            path: self.path.to_path_buf(),
            message,
        }
    }

    /// Reads an f32 tensor of exactly `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .st
            .tensor(&full)
            .map_err(|e| self.bad(format!("tensor {full}: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(self.bad(format!("tensor {full}: dtype {:?}, expected F32", t.dtype())));
        }
        if t.shape() != shape {
            return Err(self.bad(format!("tensor {full}: shape {:?}, expected {shape:?}", t.shape())));
        }
        // The data may sit at any byte offset in the mmap, so decode bytewise
        // rather than casting the slice.
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if v.iter().any(|x| !x.is_finite()) {
            return Err(self.bad(format!("tensor {full}: contains NaN or infinity")));
        }
        Ok(v)
    }

    /// Reads a PyTorch `[out, in]` linear weight and returns it as `[in, out]`.
    fn linear_t(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
        let w = self.get(name, &[out_dim, in_dim])?;
        Ok(transpose(&w, out_dim, in_dim))
    }
}

/// Transposes a `[rows, cols]` row-major matrix.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// `n` deterministic pseudo-random values in `[-scale, scale)` (xorshift; no
/// RNG dependency, the same on every machine).
pub fn pseudo_random(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            ((s % 2000) as f32 / 1000.0 - 1.0) * scale
        })
        .collect()
}

impl BertWeights {
    /// Weights of `config`'s shapes with pseudo-random values (±0.05, layer
    /// norm scales 1), for timing a backend where the model files are not
    /// available. Not a model: its embeddings mean nothing.
    pub fn random(config: BertConfig, seed: u32) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut seed = seed;
        let mut next = |n: usize| {
            seed = seed.wrapping_add(1);
            pseudo_random(n, seed, 0.05)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| LayerWeights {
                qkv_w: next(h * 3 * h),
                qkv_b: next(3 * h),
                attn_out_w: next(h * h),
                attn_out_b: next(h),
                ln1_g: vec![1.0; h],
                ln1_b: vec![0.0; h],
                ff_in_w: next(h * i),
                ff_in_b: next(i),
                ff_out_w: next(i * h),
                ff_out_b: next(h),
                ln2_g: vec![1.0; h],
                ln2_b: vec![0.0; h],
            })
            .collect();
        Self {
            word_emb: next(config.vocab_size * h),
            pos_emb: next(config.max_position_embeddings * h),
            type_emb: next(config.type_vocab_size * h),
            emb_ln_g: vec![1.0; h],
            emb_ln_b: vec![0.0; h],
            layers,
            config,
        }
    }

    /// Memory-maps `path` and reads every tensor, checking names, dtypes and shapes.
    pub fn load(path: &Path, config: BertConfig) -> Result<Self> {
        let file = File::open(path).map_err(|source| InferenceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the mapping is read-only and lives only for this function;
        // every tensor is copied out before it is dropped. Another process
        // truncating the file meanwhile would be a deployment error that
        // `fetch-model.sh`'s atomic renames avoid.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| InferenceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| InferenceError::InvalidWeights {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        // Checkpoints saved from BertForX carry a `bert.` prefix; bare BertModel ones do not.
        let prefix = if st.names().iter().any(|n| n.starts_with("bert.embeddings.")) {
            "bert."
        } else {
            ""
        };
        let r = TensorReader { st, path, prefix };
        let c = &config;
        let h = c.hidden_size;
        let i = c.intermediate_size;
        let emb = "embeddings.";
        let word_emb = r.get(&format!("{emb}word_embeddings.weight"), &[c.vocab_size, h])?;
        let pos_emb = r.get(
            &format!("{emb}position_embeddings.weight"),
            &[c.max_position_embeddings, h],
        )?;
        let type_emb = r.get(&format!("{emb}token_type_embeddings.weight"), &[c.type_vocab_size, h])?;
        let emb_ln_g = r.get(&format!("{emb}LayerNorm.weight"), &[h])?;
        let emb_ln_b = r.get(&format!("{emb}LayerNorm.bias"), &[h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let q = r.linear_t(&format!("{p}attention.self.query.weight"), h, h)?;
            let k = r.linear_t(&format!("{p}attention.self.key.weight"), h, h)?;
            let v = r.linear_t(&format!("{p}attention.self.value.weight"), h, h)?;
            let mut qkv_w = Vec::with_capacity(h * 3 * h);
            for row in 0..h {
                for m in [&q, &k, &v] {
                    qkv_w.extend_from_slice(&m[row * h..(row + 1) * h]);
                }
            }
            let mut qkv_b = r.get(&format!("{p}attention.self.query.bias"), &[h])?;
            qkv_b.extend(r.get(&format!("{p}attention.self.key.bias"), &[h])?);
            qkv_b.extend(r.get(&format!("{p}attention.self.value.bias"), &[h])?);
            layers.push(LayerWeights {
                qkv_w,
                qkv_b,
                attn_out_w: r.linear_t(&format!("{p}attention.output.dense.weight"), h, h)?,
                attn_out_b: r.get(&format!("{p}attention.output.dense.bias"), &[h])?,
                ln1_g: r.get(&format!("{p}attention.output.LayerNorm.weight"), &[h])?,
                ln1_b: r.get(&format!("{p}attention.output.LayerNorm.bias"), &[h])?,
                ff_in_w: r.linear_t(&format!("{p}intermediate.dense.weight"), i, h)?,
                ff_in_b: r.get(&format!("{p}intermediate.dense.bias"), &[i])?,
                ff_out_w: r.linear_t(&format!("{p}output.dense.weight"), h, i)?,
                ff_out_b: r.get(&format!("{p}output.dense.bias"), &[h])?,
                ln2_g: r.get(&format!("{p}output.LayerNorm.weight"), &[h])?,
                ln2_b: r.get(&format!("{p}output.LayerNorm.bias"), &[h])?,
            });
        }
        Ok(Self {
            config,
            word_emb,
            pos_emb,
            type_emb,
            emb_ln_g,
            emb_ln_b,
            layers,
        })
    }
}
