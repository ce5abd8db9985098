//! Shared helpers of the integration tests: locating the model and the
//! reference embeddings made by `scripts/inference/make_reference.py`.
#![allow(dead_code)]

use std::path::PathBuf;

use cell0_inference::{InferenceConfig, ModelSource};
use serde::Deserialize;

/// The workspace root (two levels above this crate). The runner's
/// `CARGO_MANIFEST_DIR` comes first: a test binary reused from a build in
/// another checkout still looks in the checkout it runs in.
pub fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../..")
}

/// The model directory; panics with instructions when it is missing, so a
/// test without the model fails instead of passing vacuously.
pub fn model_dir() -> PathBuf {
    let dir = cell0_inference::default_model_dir(&workspace_root());
    assert!(
        dir.join("model.safetensors").is_file(),
        "model not found in {} (set CELL0_MODEL_DIR or run scripts/fetch-model.sh)",
        dir.display()
    );
    dir
}

/// Source for the shipped model.
pub fn source() -> ModelSource {
    ModelSource::new(cell0_inference::MINILM_L6_V2, model_dir())
}

/// A config for the given backend.
pub fn config(backend: cell0_inference::BackendKind) -> InferenceConfig {
    InferenceConfig {
        backend,
        ..InferenceConfig::default()
    }
}

#[derive(Deserialize)]
pub struct Reference {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

/// The reference file.
pub fn reference() -> Reference {
    let path = workspace_root().join("node/inference/tests/data/reference.json");
    let text = std::fs::read_to_string(&path).expect("read reference.json");
    serde_json::from_str(&text).expect("parse reference.json")
}

/// Asserts `got` matches `want` within the acceptance tolerance.
pub fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let cos = cell0_inference::cosine(got, want);
    let max_abs = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(cos >= 0.99999, "{label}: cosine {cos} < 0.99999");
    assert!(max_abs <= 1e-4, "{label}: max abs diff {max_abs} > 1e-4");
}
