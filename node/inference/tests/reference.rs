//! Both backends reproduce sentence-transformers' embeddings and token ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cell0_inference::{BackendKind, Embedder, TextEmbedder};

/// `singles`: how many cases to also embed one at a time (short batches take
/// the CPU engine's few-rows kernel).
fn check_backend(kind: BackendKind, singles: usize) {
    let reference = common::reference();
    let embedder = TextEmbedder::load(&common::source(), &common::config(kind)).expect("load model");
    assert_eq!(embedder.model_info().dim, 384);
    let info = embedder.info();
    assert_eq!(info.model.name, "all-minilm-l6-v2");
    assert_eq!(info.model.max_tokens, 256);
    assert_eq!(info.backend.backend, kind.to_string());
    let texts: Vec<&str> = reference.cases.iter().map(|c| c.text.as_str()).collect();
    let tokens = embedder.tokenize(&texts).expect("tokenize");
    for (case, ids) in reference.cases.iter().zip(&tokens) {
        assert_eq!(ids, &case.token_ids, "token ids of {:?}", case.text);
    }
    // One batch of mixed lengths (exercises padding/packing) ...
    let batch = embedder.embed(&texts).expect("embed batch");
    // ... and each text alone (no padding at all).
    for (i, case) in reference.cases.iter().enumerate() {
        common::assert_close(&format!("{kind} batch {:?}", case.text), &batch[i], &case.embedding);
    }
    for case in reference.cases.iter().take(singles) {
        let one = embedder.embed(&[case.text.as_str()]).expect("embed one");
        common::assert_close(&format!("{kind} single {:?}", case.text), &one[0], &case.embedding);
    }
}

#[test]
fn cpu_backend_matches_sentence_transformers() {
    check_backend(BackendKind::Cpu, usize::MAX);
}

#[test]
fn wgpu_backend_matches_sentence_transformers() {
    check_backend(BackendKind::Wgpu, 3);
}
