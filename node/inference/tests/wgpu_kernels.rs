//! Every wgpu kernel against the CPU reference kernels on random shapes,
//! including sizes that are not multiples of the 64×64 matmul tile.
//! A machine without a wgpu adapter fails these tests: lavapipe is always
//! installed where they run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cell0_inference::backend::cpu::ops;
use cell0_inference::backend::wgpu::MatmulTile;
use std::sync::Arc;

use cell0_inference::model::{BertConfig, BertWeights};
use cell0_inference::{Backend, InferenceError, WgpuBackend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn backend() -> WgpuBackend {
    let b = WgpuBackend::new(None, false).expect("a wgpu adapter (lavapipe is required for these tests)");
    assert_eq!(b.api(), "vulkan", "expected the Vulkan backend, got {}", b.api());
    b
}

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn adapter_is_vulkan_and_reports_info() {
    let b = backend();
    let info = b.info();
    assert_eq!(info.backend, "wgpu");
    assert_eq!(info.api, "vulkan");
    assert!(!info.adapter.is_empty());
    assert!(
        info.limits
            .iter()
            .any(|(k, v)| k == "max_storage_buffer_binding_size" && *v > 0)
    );
}

#[test]
fn matmul_matches_cpu_on_ragged_shapes() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(7);
    // Tolerance: K products of values in [-1, 1], f32 accumulation in a different order.
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 7),
        (64, 64, 64),
        (65, 17, 130),
        (100, 384, 66),
        (37, 200, 129),
    ] {
        let a = rand_vec(&mut rng, m * k, 1.0);
        let w = rand_vec(&mut rng, k * n, 1.0);
        let bias = rand_vec(&mut rng, n, 1.0);
        for gelu in [false, true] {
            let got = b.kernel_matmul(&a, &w, Some(&bias), m, k, n, gelu).expect("gpu matmul");
            let mut want = ops::matmul_bias(&a, &w, Some(&bias), m, k, n).expect("cpu matmul");
            if gelu {
                want.iter_mut().for_each(|v| *v = ops::gelu(*v));
            }
            let err = max_abs(&got, &want);
            assert!(
                err <= 1e-4 * (k as f32).sqrt(),
                "matmul {m}x{k}x{n} gelu={gelu}: max abs err {err}"
            );
        }
    }
    // Both register-block shapes, whichever this adapter uses.
    for tile in [MatmulTile::GPU, MatmulTile::CPU_ADAPTER] {
        for &(m, k, n) in &[(1, 3, 1), (13, 37, 70), (150, 64, 260)] {
            let a = rand_vec(&mut rng, m * k, 1.0);
            let w = rand_vec(&mut rng, k * n, 1.0);
            let got = b
                .kernel_matmul_with_tile(tile, &a, &w, None, m, k, n, true)
                .expect("gpu matmul");
            let mut want = ops::matmul_bias(&a, &w, None, m, k, n).expect("cpu matmul");
            want.iter_mut().for_each(|v| *v = ops::gelu(*v));
            let err = max_abs(&got, &want);
            assert!(
                err <= 1e-4 * (k as f32).sqrt(),
                "{tile:?} {m}x{k}x{n}: max abs err {err}"
            );
        }
    }
    let plain = b
        .matmul(&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], 2, 2, 2)
        .expect("matmul");
    assert_eq!(plain, vec![19.0, 22.0, 43.0, 50.0]);
}

#[test]
fn gelu_erf_is_exact_to_f32_precision() {
    // Known values of the exact GELU (x·Φ(x)), computed in f64.
    for &(x, want) in &[
        (-3.0f32, -0.004_049_694_f32),
        (-1.0, -0.158_655_25),
        (-0.5, -0.154_268_77),
        (0.0, 0.0),
        (0.5, 0.345_731_23),
        (1.0, 0.841_344_8),
        (2.5, 2.484_475_8),
        (6.0, 6.0),
    ] {
        assert!((ops::gelu(x) - want).abs() < 1e-6, "cpu gelu({x})");
    }
    let b = backend();
    let xs: Vec<f32> = (0..200).map(|i| -8.0 + i as f32 * 0.08).collect();
    let got = b
        .kernel_matmul(&xs, &[1.0], None, xs.len(), 1, 1, true)
        .expect("gpu gelu");
    let want: Vec<f32> = xs.iter().map(|&x| ops::gelu(x)).collect();
    assert!(max_abs(&got, &want) < 1e-6);
}

#[test]
fn layer_norm_matches_cpu() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(11);
    for &(rows, cols) in &[(1, 1), (3, 384), (17, 100), (5, 1000)] {
        let x = rand_vec(&mut rng, rows * cols, 3.0);
        let r = rand_vec(&mut rng, rows * cols, 3.0);
        let g = rand_vec(&mut rng, cols, 1.0);
        let beta = rand_vec(&mut rng, cols, 1.0);
        for residual in [None, Some(r.as_slice())] {
            let got = b
                .kernel_layer_norm(&x, residual, &g, &beta, cols, 1e-12)
                .expect("gpu ln");
            let mut want = x.clone();
            ops::layer_norm(&mut want, residual, &g, &beta, cols, 1e-12);
            let err = max_abs(&got, &want);
            assert!(err < 1e-4, "layer norm {rows}x{cols}: {err}");
        }
    }
}

#[test]
fn embedding_lookup_matches_cpu() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(3);
    let (vocab, max_pos, hidden, batch, seq) = (50, 20, 36, 3, 7);
    let word = rand_vec(&mut rng, vocab * hidden, 1.0);
    let pos = rand_vec(&mut rng, max_pos * hidden, 1.0);
    let typ = rand_vec(&mut rng, 2 * hidden, 1.0);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.random_range(0..vocab as u32)).collect();
    let got = b.kernel_embed(&word, &pos, &typ, &ids, seq, hidden).expect("gpu embed");
    let want = ops::embeddings(&word, &pos, &typ, &ids, seq, hidden).expect("cpu embed");
    assert!(max_abs(&got, &want) < 1e-6);
    match b.kernel_embed(&word, &pos, &typ, &[vocab as u32], 1, hidden) {
        Err(InferenceError::InvalidRequest { field, .. }) => assert_eq!(field, "ids[0]"),
        other => panic!("expected an invalid id error, got {other:?}"),
    }
}

#[test]
fn token_ids_past_the_vocabulary_are_rejected_before_dispatch() {
    let config = BertConfig {
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 64,
        vocab_size: 50,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
    };
    let mut b = backend();
    b.upload(Arc::new(BertWeights::random(config.clone(), 7)))
        .expect("upload");
    let ok = b.embed(&[vec![1, 49, 2]]).expect("ids in range embed");
    assert_eq!(ok[0].len(), 32);
    for (batch, want) in [
        (vec![vec![1, 50, 2]], "tokens[0][1]"),
        (vec![vec![1, 2], vec![u32::MAX]], "tokens[1][0]"),
        (vec![vec![1; 17]], "tokens[0]"),
    ] {
        match b.embed(&batch) {
            Err(e @ InferenceError::InvalidRequest { .. }) => {
                assert!(
                    matches!(&e, InferenceError::InvalidRequest { field, .. } if field == want),
                    "{e}"
                )
            }
            other => panic!("expected an invalid request naming {want}, got {other:?}"),
        }
    }
    // The backend still works after rejecting them.
    assert_eq!(b.embed(&[vec![1, 49, 2]]).expect("embed again"), ok);
    // Tables shorter than the config says never reach the GPU.
    let mut short = BertWeights::random(config, 7);
    short.word_emb.truncate(49 * 32);
    let err = b.upload(Arc::new(short)).expect_err("short word table");
    assert!(err.to_string().contains("word_embeddings"), "{err}");
}

#[test]
fn attention_with_padding_mask_matches_cpu() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(5);
    for &(batch, seq, heads, hd) in &[(1, 1, 1, 4), (2, 5, 3, 8), (3, 13, 12, 32), (2, 70, 2, 64)] {
        let hidden = heads * hd;
        let qkv = rand_vec(&mut rng, batch * seq * 3 * hidden, 1.0);
        let mut mask = vec![0u32; batch * seq];
        for bi in 0..batch {
            let len = if bi == 0 { seq } else { rng.random_range(1..=seq) };
            mask[bi * seq..bi * seq + len].fill(1);
        }
        let got = b
            .kernel_attention(&qkv, &mask, batch, seq, heads, hd)
            .expect("gpu attention");
        let want = ops::attention_padded(&qkv, &mask, batch, seq, heads, hd);
        // Padded query rows are don't-care (the kernel writes zeros); compare real rows.
        for t in 0..batch * seq {
            if mask[t] == 1 {
                let err = max_abs(&got[t * hidden..(t + 1) * hidden], &want[t * hidden..(t + 1) * hidden]);
                assert!(err < 1e-5, "attention {batch}x{seq}x{heads}x{hd} row {t}: {err}");
            }
        }
    }
    assert!(
        b.kernel_attention(&[0.0; 3 * 6], &[1], 1, 1, 1, 6).is_err(),
        "head_dim 6 is rejected"
    );
}

#[test]
fn pooling_matches_cpu() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(9);
    let (batch, seq, hidden) = (4, 9, 300);
    let x = rand_vec(&mut rng, batch * seq * hidden, 2.0);
    let mut mask = vec![0u32; batch * seq];
    for (bi, len) in [9usize, 1, 4, 7].iter().enumerate() {
        mask[bi * seq..bi * seq + len].fill(1);
    }
    let got = b
        .kernel_mean_pool_normalize(&x, &mask, batch, seq, hidden)
        .expect("gpu pool");
    let want = ops::mean_pool_normalize(&x, &mask, batch, seq, hidden);
    assert!(max_abs(&got, &want) < 1e-6);
}
