//! `cell0-inference`: the local inference engine of a cell0 node.
//!
//! It turns texts into embeddings with a sentence-transformers model
//! (all-MiniLM-L6-v2 today) on one of two backends: WGSL compute kernels on
//! wgpu (a GPU, or lavapipe's software Vulkan) or a native multi-threaded CPU
//! engine. It knows nothing of Raft or gRPC: the node wraps
//! [`EmbedBatcher`] (request coalescing) around a [`TextEmbedder`] and calls
//! [`bench::run`] for `cell0 bench infer`.
//!
//! Invariants: nothing is downloaded at run time (models come from
//! `scripts/fetch-model.sh`, verified by sha256); no input panics; every
//! embedding is L2-normalized and `ModelInfo::dim` long.

pub mod backend;
pub mod batcher;
pub mod bench;
pub mod config;
pub mod embedder;
pub mod error;
pub mod model;
pub mod tokenize;

pub use backend::cpu::CpuBackend;
pub use backend::wgpu::WgpuBackend;
pub use backend::{Backend, BackendInfo};

pub use batcher::{BATCH_SIZE_METRIC, BatchObserver, BatchStats, BatchWorker, EmbedBatcher, REQUESTS_ABANDONED_METRIC};
pub use config::{BackendKind, InferenceConfig};
pub use embedder::{
    Embedder, EngineInfo, ModelInfo, ModelSource, RequestLimits, TextEmbedder, cosine, default_model_dir, open_backend,
    top_k_cosine,
};
pub use error::{InferenceError, Result};
pub use model::{MINILM_L6_V2, model_spec};
