//! Config validation, backend selection, the similarity helper and the
//! random-weight bench.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cell0_inference::{BackendKind, InferenceConfig, InferenceError, cosine, open_backend, top_k_cosine};

#[test]
fn default_config_is_valid_and_bad_fields_are_named() {
    InferenceConfig::default().validate().expect("defaults are valid");
    let cases: Vec<(InferenceConfig, &str)> = vec![
        (
            InferenceConfig {
                max_batch: 0,
                ..Default::default()
            },
            "max_batch",
        ),
        (
            InferenceConfig {
                max_wait_ms: 60_000,
                ..Default::default()
            },
            "max_wait_ms",
        ),
        (
            InferenceConfig {
                max_texts_per_request: 0,
                ..Default::default()
            },
            "max_texts_per_request",
        ),
        (
            InferenceConfig {
                max_text_bytes: 0,
                ..Default::default()
            },
            "max_text_bytes",
        ),
        (
            InferenceConfig {
                max_tokens: 1,
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            InferenceConfig {
                adapter: Some(" ".into()),
                ..Default::default()
            },
            "adapter",
        ),
        (
            InferenceConfig {
                queue_capacity: 0,
                ..Default::default()
            },
            "queue_capacity",
        ),
    ];
    for (cfg, field) in cases {
        match cfg.validate() {
            Err(e @ InferenceError::InvalidConfig { .. }) => {
                assert!(e.to_string().contains(field), "{e}")
            }
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn config_parses_from_json_with_defaults() {
    let cfg: InferenceConfig = serde_json::from_str(r#"{"backend":"wgpu","adapter":"llvmpipe"}"#).expect("parse");
    assert_eq!(cfg.backend, BackendKind::Wgpu);
    assert_eq!(cfg.max_batch, InferenceConfig::default().max_batch);
    assert!(serde_json::from_str::<InferenceConfig>(r#"{"bogus":1}"#).is_err());
}

#[test]
fn auto_without_a_hardware_gpu_picks_cpu_and_wgpu_forces_an_adapter() {
    let auto = open_backend(&InferenceConfig::default()).expect("auto");
    let info = auto.info();
    // This machine class has no hardware GPU; on one that does, auto picks it.
    assert!(
        info.backend == "cpu" || matches!(info.device_type.as_str(), "discrete-gpu" | "integrated-gpu"),
        "{info:?}"
    );
    let forced = open_backend(&InferenceConfig {
        backend: BackendKind::Wgpu,
        ..Default::default()
    })
    .expect("wgpu adapter (lavapipe) required");
    assert_eq!(forced.info().backend, "wgpu");
    let none = open_backend(&InferenceConfig {
        backend: BackendKind::Wgpu,
        adapter: Some("no-such-adapter-name".into()),
        ..Default::default()
    });
    assert!(
        matches!(none, Err(InferenceError::Gpu(_))),
        "unmatched adapter name is an error"
    );
}

#[test]
fn top_k_cosine_orders_by_similarity() {
    let vs = vec![
        vec![1.0, 0.0],
        vec![0.0, 1.0],
        vec![0.7, 0.7],
        vec![-1.0, 0.0],
        vec![1.0],
    ];
    let top = top_k_cosine(&[1.0, 0.1], &vs, 3);
    assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 2, 1]);
    assert!(top[0].1 > top[1].1 && top[1].1 > top[2].1);
    assert_eq!(top_k_cosine(&[1.0, 0.0], &vs, 100).len(), vs.len());
    assert!(top_k_cosine(&[1.0, 0.0], &[], 3).is_empty());
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0, "length mismatch scores 0");
}

#[test]
fn the_random_weight_bench_needs_no_model_files_and_matches_the_model_shape() {
    use cell0_inference::bench::{BenchModel, BenchOptions, run};
    use cell0_inference::model::BertConfig;

    let shipped = BertConfig::from_file(&common::model_dir().join("config.json")).unwrap();
    assert_eq!(BertConfig::minilm_l6_v2(), shipped);
    let opts = BenchOptions {
        backends: vec![BackendKind::Cpu],
        batch_sizes: vec![2],
        token_lengths: vec![12],
        matmul_sizes: vec![16],
        min_seconds: 0.0,
        cpu_threads: 1,
    };
    let mut lines = 0;
    let report = run(&BenchModel::Random(shipped), &opts, &mut |_| lines += 1).unwrap();
    let cpu = &report.backends[0];
    assert_eq!((cpu.embed.len(), cpu.matmul.len()), (1, 1));
    assert!(cpu.embed[0].embeddings_per_sec > 0.0 && cpu.matmul[0].gflops > 0.0);
    assert!(lines >= 3, "progress is reported");
}
