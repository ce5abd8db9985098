//! Broken model files and bad names give clear errors, never panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use std::sync::Arc;

use cell0_inference::backend::cpu::ops;
use cell0_inference::model::{BertConfig, BertWeights};
use cell0_inference::{Backend, BackendKind, CpuBackend, InferenceConfig, InferenceError, ModelSource, TextEmbedder};

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
    assert_invalid(&err, "tokens[0][1]", "999999");
    let err = e.embed_tokens(&[vec![101; 600]]).expect_err("too long");
    assert_invalid(&err, "tokens[0]", "512 positions");
    let err = e.embed_tokens(&[vec![]]).expect_err("empty sequence");
    assert_invalid(&err, "tokens[0]", "no tokens");
}

/// Asserts `err` is an invalid request naming `field`, its message containing `needle`.
fn assert_invalid(err: &InferenceError, want_field: &str, needle: &str) {
    match err {
        InferenceError::InvalidRequest { field, message } => {
            assert_eq!(field, want_field, "{err}");
            assert!(message.contains(needle), "{err}");
        }
        other => panic!("expected an invalid request naming {want_field}, got {other:?}"),
    }
}

/// A small random-weights encoder with `vocab` ids and `positions` positions.
fn tiny_weights(vocab: usize, positions: usize) -> BertWeights {
    let config = BertConfig {
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 64,
        vocab_size: vocab,
        max_position_embeddings: positions,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
    };
    BertWeights::random(config, 7)
}

#[test]
fn token_ids_past_the_vocabulary_are_invalid_requests_on_the_cpu_engine() {
    let mut cpu = CpuBackend::new(1).expect("cpu");
    cpu.upload(Arc::new(tiny_weights(50, 16))).expect("upload");
    let ok = cpu.embed(&[vec![1, 49, 2]]).expect("ids in range embed");
    assert_eq!(ok[0].len(), 32);
    // The first id past the table, the largest id, and an id in a later sequence.
    for (batch, field, id) in [
        (vec![vec![1, 50, 2]], "tokens[0][1]", "50"),
        (vec![vec![u32::MAX]], "tokens[0][0]", "4294967295"),
        (vec![vec![1, 2], vec![1, 2, 3, 1000]], "tokens[1][3]", "1000"),
    ] {
        let err = cpu.embed(&batch).expect_err("an id past the vocabulary");
        assert_invalid(&err, field, id);
        assert!(err.to_string().contains("vocabulary of 50"), "{err}");
    }
    // Position ids past the position table.
    let err = cpu.embed(&[vec![1; 17]]).expect_err("too long");
    assert_invalid(&err, "tokens[0]", "16 positions");
    // The reference kernel checks its ids as well.
    let w = tiny_weights(50, 16);
    let err = ops::embeddings(&w.word_emb, &w.pos_emb, &w.type_emb, &[3, 50], 2, 32).expect_err("id 50");
    assert_invalid(&err, "ids[1]", "50");
}

#[test]
fn the_real_model_names_the_sequence_with_the_bad_id_across_passes() {
    use cell0_inference::Embedder;
    // One text per forward pass: the error still names the sequence by its place in the request.
    let cfg = InferenceConfig {
        max_batch: 1,
        ..common::config(BackendKind::Cpu)
    };
    let e = TextEmbedder::load(&common::source(), &cfg).expect("load");
    let err = e
        .embed_tokens(&[vec![101, 102], vec![101, 2023, 102], vec![101, 30_522, 102]])
        .expect_err("30522 is past the vocabulary");
    assert_invalid(&err, "tokens[2][1]", "30522");
    assert!(err.to_string().contains("vocabulary of 30522"), "{err}");
    // The backend on its own checks as well.
    let err = e.backend().embed(&[vec![101, 30_522, 102]]).expect_err("backend check");
    assert_invalid(&err, "tokens[0][1]", "30522");
}

#[test]
fn weights_whose_tables_disagree_with_their_config_are_rejected_at_upload() {
    // The config claims 50 ids and 16 positions; the tables are a row short.
    let mut short_words = tiny_weights(50, 16);
    short_words.word_emb.truncate(49 * 32);
    let mut short_positions = tiny_weights(50, 16);
    short_positions.pos_emb.truncate(15 * 32);
    let mut no_types = tiny_weights(50, 16);
    no_types.type_emb.clear();
    for (w, name) in [
        (short_words, "word_embeddings"),
        (short_positions, "position_embeddings"),
        (no_types, "token_type_embeddings"),
    ] {
        let mut cpu = CpuBackend::new(1).expect("cpu");
        let err = cpu.upload(Arc::new(w)).expect_err("inconsistent weights");
        assert!(err.to_string().contains(name), "{err}");
        // Nothing was uploaded, so nothing indexes the short table.
        assert!(cpu.embed(&[vec![1, 49, 2]]).is_err());
    }
}
