//! Throughput benchmarks for `cell0 bench infer`.
//!
//! [`run`] loads the model on each requested backend and measures
//! embeddings per second for fixed batch sizes and token lengths (texts that
//! tokenize to exactly that many tokens, tokenization included, as
//! sentence-transformers' `encode` does), and matmul GFLOP/s on square
//! matrices (for wgpu: upload and readback included). With
//! [`BenchModel::Random`] it needs no model files: random weights of the
//! model's shapes, forward passes on token ids (a machine that is lent only a
//! binary, such as a GPU host, can run it). Results are plain
//! serde structs; progress goes to a callback so the CLI can print as it goes.
//! Each case runs one warm-up pass, then repeats until `min_seconds` have
//! passed (at least once).

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendInfo};
use crate::config::{BackendKind, InferenceConfig};
use crate::embedder::{Embedder, ModelSource, TextEmbedder, open_backend};
use crate::error::{InferenceError, Result};
use crate::model::{BertConfig, BertWeights, pseudo_random};

/// What to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchOptions {
    /// Backends to measure (`auto` is measured as whatever it picks).
    pub backends: Vec<BackendKind>,
    /// Batch sizes of the embedding cases.
    pub batch_sizes: Vec<usize>,
    /// Token counts per text (`[CLS]`/`[SEP]` included) of the embedding cases.
    pub token_lengths: Vec<usize>,
    /// Square matmul sizes.
    pub matmul_sizes: Vec<usize>,
    /// Minimum measuring time per case, in seconds.
    pub min_seconds: f64,
    /// CPU engine threads (0: every core).
    pub cpu_threads: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            backends: vec![BackendKind::Cpu, BackendKind::Wgpu],
            batch_sizes: vec![1, 32],
            token_lengths: vec![12, 128, 256],
            matmul_sizes: vec![256, 512, 1024, 2048],
            min_seconds: 2.0,
            cpu_threads: 0,
        }
    }
}

impl BenchOptions {
    /// Checks the options, naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message: &str| {
            Err(InferenceError::InvalidConfig {
                field,
                message: message.into(),
            })
        };
        if self.batch_sizes.iter().any(|&b| b == 0 || b > 1024) {
            return bad("batch_sizes", "each must be in 1..=1024");
        }
        if self.token_lengths.iter().any(|&t| !(2..=512).contains(&t)) {
            return bad("token_lengths", "each must be in 2..=512");
        }
        if self.matmul_sizes.iter().any(|&s| s == 0 || s > 8192) {
            return bad("matmul_sizes", "each must be in 1..=8192");
        }
        if !(self.min_seconds.is_finite() && self.min_seconds >= 0.0) {
            return bad("min_seconds", "must be finite and non-negative");
        }
        Ok(())
    }
}

/// One embedding case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedResult {
    /// Texts per call.
    pub batch: usize,
    /// Tokens per text.
    pub tokens: usize,
    /// Timed calls.
    pub iterations: usize,
    /// Total timed seconds.
    pub seconds: f64,
    /// Texts embedded per second.
    pub embeddings_per_sec: f64,
}

/// One matmul case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatmulResult {
    /// m = k = n.
    pub size: usize,
    /// Timed calls.
    pub iterations: usize,
    /// Total timed seconds.
    pub seconds: f64,
    /// 2·n³ floating-point operations per second, in billions.
    pub gflops: f64,
}

/// Results for one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendResult {
    /// The backend as requested.
    pub requested: BackendKind,
    /// What it ran on.
    pub info: BackendInfo,
    /// Embedding cases.
    pub embed: Vec<EmbedResult>,
    /// Matmul cases.
    pub matmul: Vec<MatmulResult>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Model measured.
    pub model: String,
    /// Logical CPUs of the machine.
    pub cpus: usize,
    /// Whether this binary was built with optimizations.
    pub optimized_build: bool,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    /// Per-backend results.
    pub backends: Vec<BackendResult>,
}

/// A text that tokenizes to exactly `tokens` tokens with the MiniLM
/// vocabulary: `[CLS]`, `tokens - 2` × "hello", `[SEP]`.
pub fn text_of_tokens(tokens: usize) -> String {
    vec!["hello"; tokens.saturating_sub(2)].join(" ")
}

fn timed<F: FnMut() -> Result<()>>(min_seconds: f64, mut f: F) -> Result<(usize, f64)> {
    f()?;
    let start = Instant::now();
    let mut iters = 0;
    loop {
        f()?;
        iters += 1;
        let s = start.elapsed().as_secs_f64();
        if s >= min_seconds {
            return Ok((iters, s));
        }
    }
}

/// Measures matmul GFLOP/s of one backend.
pub fn bench_matmul(
    backend: &dyn Backend,
    sizes: &[usize],
    min_seconds: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<MatmulResult>> {
    let mut out = Vec::new();
    for &n in sizes {
        let a = pseudo_random(n * n, 1, 1.0);
        let b = pseudo_random(n * n, 2, 1.0);
        let (iterations, seconds) = timed(min_seconds, || backend.matmul(&a, &b, n, n, n).map(drop))?;
        let gflops = 2.0 * (n as f64).powi(3) * iterations as f64 / seconds / 1e9;
        progress(&format!("{} matmul {n}: {gflops:.1} GFLOP/s", backend.info().backend));
        out.push(MatmulResult {
            size: n,
            iterations,
            seconds,
            gflops,
        });
    }
    Ok(out)
}

/// Times `run(batch, tokens)` for every case of `opts`.
fn embed_cases(
    name: &str,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
    mut run: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<EmbedResult>> {
    let mut out = Vec::new();
    for &tokens in &opts.token_lengths {
        for &batch in &opts.batch_sizes {
            let (iterations, seconds) = timed(opts.min_seconds, || run(batch, tokens))?;
            let eps = (batch * iterations) as f64 / seconds;
            progress(&format!(
                "{name} embed batch {batch} x {tokens} tokens: {eps:.1} embeddings/s"
            ));
            out.push(EmbedResult {
                batch,
                tokens,
                iterations,
                seconds,
                embeddings_per_sec: eps,
            });
        }
    }
    Ok(out)
}

/// Measures embeddings/s of one loaded model, tokenization included.
pub fn bench_embed(
    embedder: &TextEmbedder,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<EmbedResult>> {
    let mut texts = std::collections::BTreeMap::new();
    for &tokens in &opts.token_lengths {
        let text = text_of_tokens(tokens);
        let got = embedder.tokenize(&[text.as_str()])?[0].len();
        if got != tokens {
            return Err(InferenceError::Backend(format!(
                "bench text tokenizes to {got} tokens, wanted {tokens} (model max {})",
                embedder.model_info().max_tokens
            )));
        }
        texts.insert(tokens, text);
    }
    let name = embedder.backend_info().backend;
    embed_cases(&name, opts, progress, |batch, tokens| {
        let text = texts.get(&tokens).map_or("", String::as_str);
        embedder.embed(&vec![text; batch]).map(drop)
    })
}

/// Measures embeddings/s of a backend's forward pass on token ids
/// (`[CLS]`, pseudo-random ids, `[SEP]`): no tokenizer, so no model files.
pub fn bench_forward(
    backend: &dyn Backend,
    vocab: usize,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<EmbedResult>> {
    const CLS: u32 = 101;
    const SEP: u32 = 102;
    let name = backend.info().backend;
    embed_cases(&name, opts, progress, |batch, tokens| {
        // Spread over the vocabulary past its special tokens.
        let span = (vocab as u32).saturating_sub(1000).max(1);
        let ids = (0..tokens.saturating_sub(2) as u32).map(|j| 1000 + j.wrapping_mul(7919) % span);
        let seq: Vec<u32> = std::iter::once(CLS).chain(ids).chain(std::iter::once(SEP)).collect();
        backend.embed(&vec![seq; batch]).map(drop)
    })
}

/// What the benchmark runs.
#[derive(Debug, Clone)]
pub enum BenchModel<'a> {
    /// A model's files: tokenizer and trained weights.
    Files(&'a ModelSource),
    /// Random weights of a model's shapes, for machines that get only a binary.
    Random(BertConfig),
}

/// Runs the whole benchmark on every backend of `opts`.
pub fn run(model: &BenchModel<'_>, opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    opts.validate()?;
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut backends = Vec::new();
    for &kind in &opts.backends {
        let config = InferenceConfig {
            backend: kind,
            cpu_threads: opts.cpu_threads,
            max_batch: opts.batch_sizes.iter().copied().max().unwrap_or(1),
            max_tokens: opts.token_lengths.iter().copied().max().unwrap_or(256).max(256),
            ..InferenceConfig::default()
        };
        let (info, embed, matmul) = match model {
            BenchModel::Random(shape) => {
                progress(&format!("uploading random weights on {kind}"));
                let mut backend = open_backend(&config)?;
                backend.upload(Arc::new(BertWeights::random(shape.clone(), 1)))?;
                let info = backend.info();
                progress(&format!(
                    "{kind}: {} ({}, {})",
                    info.adapter, info.device_type, info.api
                ));
                let embed = bench_forward(backend.as_ref(), shape.vocab_size, opts, progress)?;
                let matmul = bench_matmul(backend.as_ref(), &opts.matmul_sizes, opts.min_seconds, progress)?;
                (info, embed, matmul)
            }
            BenchModel::Files(source) => {
                progress(&format!("loading {} on {kind}", source.name));
                let embedder = TextEmbedder::load_on(source, &config, open_backend(&config)?)?;
                let info = embedder.backend_info();
                progress(&format!(
                    "{kind}: {} ({}, {})",
                    info.adapter, info.device_type, info.api
                ));
                let embed = bench_embed(&embedder, opts, progress)?;
                let matmul = bench_matmul(embedder.backend(), &opts.matmul_sizes, opts.min_seconds, progress)?;
                (info, embed, matmul)
            }
        };
        backends.push(BackendResult {
            requested: kind,
            info,
            embed,
            matmul,
        });
    }
    Ok(BenchReport {
        model: match model {
            BenchModel::Files(source) => source.name.clone(),
            BenchModel::Random(_) => "random weights of the model's shape".into(),
        },
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        optimized_build: !cfg!(debug_assertions),
        started_unix,
        backends,
    })
}
