//! Runs the inference benchmark and prints a table (and, with `--json`, the
//! report). Usage:
//!
//! `cargo run --release -p cell0-inference --example bench -- [--backend cpu|wgpu|auto|all]
//! [--batch 1,32] [--tokens 12,128,256] [--matmul 256,512,1024,2048] [--no-matmul] [--no-embed]
//! [--cpu-threads N] [--quick] [--json]`
//!
//! The model is found via `CELL0_MODEL_DIR` or `<repo>/models/all-minilm-l6-v2`.

use std::path::PathBuf;

use cell0_inference::bench::{BenchOptions, run};
use cell0_inference::{BackendKind, MINILM_L6_V2, ModelSource, default_model_dir};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = BenchOptions::default();
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--backend" => {
                i += 1;
                opts.backends = match args.get(i).map(String::as_str) {
                    Some("cpu") => vec![BackendKind::Cpu],
                    Some("wgpu") => vec![BackendKind::Wgpu],
                    Some("auto") => vec![BackendKind::Auto],
                    Some("all") => vec![BackendKind::Cpu, BackendKind::Wgpu],
                    other => {
                        return Err(format!("--backend: expected cpu|wgpu|auto|all, got {other:?}").into());
                    }
                };
            }
            "--quick" => opts.min_seconds = 0.0,
            "--cpu-threads" => {
                i += 1;
                opts.cpu_threads = args
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or("--cpu-threads needs a number")?;
            }
            "--no-matmul" => opts.matmul_sizes.clear(),
            "--no-embed" => {
                opts.batch_sizes.clear();
                opts.token_lengths.clear();
            }
            "--batch" | "--tokens" | "--matmul" => {
                let flag = args[i].clone();
                i += 1;
                let list: Vec<usize> = args
                    .get(i)
                    .ok_or(format!("{flag} needs a comma-separated list"))?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{flag}: {e}"))?;
                match flag.as_str() {
                    "--batch" => opts.batch_sizes = list,
                    "--tokens" => opts.token_lengths = list,
                    _ => opts.matmul_sizes = list,
                }
            }
            "--json" => json = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
        i += 1;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let source = ModelSource::new(MINILM_L6_V2, default_model_dir(&root));
    let report = run(&source, &opts, &mut |msg| eprintln!("  {msg}"))?;
    if !report.optimized_build {
        eprintln!("warning: debug build; figures are not representative (use --release)");
    }
    println!("model {} on {} CPUs", report.model, report.cpus);
    for b in &report.backends {
        println!(
            "\n{} backend: {} ({}, {})",
            b.requested, b.info.adapter, b.info.device_type, b.info.api
        );
        println!("  {:>6} {:>7} {:>14}", "batch", "tokens", "embeddings/s");
        for e in &b.embed {
            println!("  {:>6} {:>7} {:>14.1}", e.batch, e.tokens, e.embeddings_per_sec);
        }
        println!("  {:>6} {:>10}", "matmul", "GFLOP/s");
        for m in &b.matmul {
            println!("  {:>6} {:>10.1}", m.size, m.gflops);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
