//! Broken model files and bad names give clear errors, never panics.

mod common;

use std::path::Path;

use cell0_inference::{BackendKind, InferenceError, ModelSource, TextEmbedder};

/// A copy of the model directory in a temp dir, with `weights` as model.safetensors.
fn model_copy(weights: &[u8], with_tokenizer: bool) -> tempfile::TempDir {
    let src = common::model_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy config");
    if with_tokenizer {
        std::fs::copy(src.join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy tokenizer");
    }
    std::fs::write(dir.path().join("model.safetensors"), weights).expect("write weights");
    dir
}

fn real_weights() -> Vec<u8> {
    std::fs::read(common::model_dir().join("model.safetensors")).expect("read weights")
}

fn load(dir: &Path, verify: bool) -> Result<TextEmbedder, InferenceError> {
    let mut source = ModelSource::new(cell0_inference::MINILM_L6_V2, dir);
    source.verify_sha256 = verify;
    TextEmbedder::load(&source, &common::config(BackendKind::Cpu))
}

#[test]
fn truncated_weights_are_rejected() {
    let w = real_weights();
    let dir = model_copy(&w[..w.len() / 2], true);
    let err = load(dir.path(), false).expect_err("truncated file must fail");
    assert!(matches!(err, InferenceError::InvalidWeights { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A file shorter than the 8-byte header length.
    let dir = model_copy(&w[..5], true);
    let err = load(dir.path(), false).expect_err("tiny file must fail");
    assert!(matches!(err, InferenceError::InvalidWeights { .. }), "{err}");
}

#[test]
fn corrupted_header_is_rejected() {
    let mut w = real_weights();
    for b in &mut w[8..64] {
        *b = b'#';
    }
    let dir = model_copy(&w, true);
    let err = load(dir.path(), false).expect_err("corrupt header must fail");
    assert!(matches!(err, InferenceError::InvalidWeights { .. }), "{err}");
}

#[test]
fn wrong_sha256_is_rejected() {
    let mut w = real_weights();
    let last = w.len() - 1;
    w[last] ^= 0x55;
    let dir = model_copy(&w, true);
    let err = load(dir.path(), true).expect_err("checksum must fail");
    match &err {
        InferenceError::ChecksumMismatch { expected, .. } => {
            assert_eq!(
                expected,
                cell0_inference::model_spec("all-minilm-l6-v2")
                    .expect("spec")
                    .weights_sha256
            )
        }
        other => panic!("expected ChecksumMismatch, got {other}"),
    }
}

#[test]
fn missing_tokenizer_is_reported() {
    let dir = model_copy(b"unused", false);
    let err = load(dir.path(), false).expect_err("missing tokenizer must fail");
    assert!(matches!(err, InferenceError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(err.to_string().contains("fetch-model.sh"), "{err}");
}

#[test]
fn unknown_model_name_is_reported() {
    let source = ModelSource::new("no-such-model", common::model_dir());
    let err = TextEmbedder::load(&source, &common::config(BackendKind::Cpu)).expect_err("unknown model");
    assert!(matches!(err, InferenceError::UnknownModel { .. }), "{err}");
    assert!(
        err.to_string().contains("all-minilm-l6-v2"),
        "lists known models: {err}"
    );
}

#[test]
fn out_of_vocabulary_ids_are_rejected_by_both_paths() {
    let e = TextEmbedder::load(&common::source(), &common::config(BackendKind::Cpu)).expect("load");
    use cell0_inference::Embedder;
    let err = e.embed_tokens(&[vec![101, 999_999, 102]]).expect_err("bad id");
    assert!(matches!(err, InferenceError::Backend(_)), "{err}");
    let err = e.embed_tokens(&[vec![101; 600]]).expect_err("too long");
    assert!(matches!(err, InferenceError::Backend(_)), "{err}");
    assert!(e.embed_tokens(&[vec![]]).is_err(), "empty sequence");
}
