//! `cell0 bench kv`: load against a running cluster through the public API.
//!
//! Clients run concurrently for a fixed time, each issuing one request after
//! another; latencies go into one HDR histogram. Progress is printed to
//! stderr once a second; the result goes to stdout as a table or JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_proto::v1::kv_client::KvClient;
use cell0_proto::v1::{self, Consistency};
use clap::{Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Output, connect, print_json, print_table};

/// Clients sharing one HTTP/2 connection.
const CLIENTS_PER_CONNECTION: usize = 16;
/// Most clients one bench may run.
const MAX_CLIENTS: usize = 4096;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Key-value throughput and latency.
    Kv(KvBench),
}

/// The operation a kv bench issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchOp {
    /// Puts of fresh keys.
    Put,
    /// Linearizable gets of pre-written keys.
    Get,
}

/// Options of `cell0 bench kv`.
#[derive(clap::Args)]
pub struct KvBench {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Operation.
    #[arg(long, value_enum, default_value_t = BenchOp::Put)]
    op: BenchOp,
    /// Keys written before a get bench.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
}

#[derive(Serialize)]
struct BenchResult {
    op: BenchOp,
    clients: usize,
    seconds: f64,
    value_size: usize,
    ops: u64,
    errors: u64,
    ops_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

/// Runs a benchmark command.
pub async fn run(endpoint: &str, output: Output, cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Kv(b) => kv(endpoint, output, b).await,
    }
}

fn bench_key(client: usize, i: u64) -> Vec<u8> {
    format!("bench/{client:05}/{i:012}").into_bytes()
}

async fn kv(endpoint: &str, output: Output, b: KvBench) -> anyhow::Result<()> {
    if b.clients == 0 || b.clients > MAX_CLIENTS {
        anyhow::bail!("--clients must be between 1 and {MAX_CLIENTS}");
    }
    if b.duration == 0 {
        anyhow::bail!("--duration must be at least 1 second");
    }
    if b.value_size > cell0_consensus::command::MAX_VALUE_BYTES {
        anyhow::bail!("--value-size must be at most {} bytes", cell0_consensus::command::MAX_VALUE_BYTES);
    }
    let connections = b.clients.div_ceil(CLIENTS_PER_CONNECTION);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(endpoint).await?);
    }
    let value = vec![b'x'; b.value_size];
    if b.op == BenchOp::Get {
        let mut client = KvClient::new(channels[0].clone());
        for i in 0..b.keys {
            client
                .put(v1::PutRequest {
                    key: bench_key(0, i).into(),
                    value: value.clone().into(),
                })
                .await
                .context("writing the keys for the get bench")?;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(b.clients);
    for c in 0..b.clients {
        let mut client = KvClient::new(channels[c % connections].clone());
        let (stop, done, errors, value) = (stop.clone(), done.clone(), errors.clone(), value.clone());
        let (op, keys) = (b.op, b.keys.max(1));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = match op {
                    BenchOp::Put => client
                        .put(v1::PutRequest {
                            key: bench_key(c, i).into(),
                            value: value.clone().into(),
                        })
                        .await
                        .is_ok(),
                    BenchOp::Get => client
                        .get(v1::GetRequest {
                            key: bench_key(0, (i * 7919 + c as u64) % keys).into(),
                            consistency: Consistency::Linearizable as i32,
                        })
                        .await
                        .is_ok(),
                };
                if ok {
                    hist.record(t.elapsed().as_micros() as u64)?;
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            anyhow::Ok(hist)
        }));
    }

    let total = Duration::from_secs(b.duration);
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < total {
        tick.tick().await;
        let now = done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs().min(b.duration);
        let filled = (secs * 30 / b.duration) as usize;
        eprint!(
            "\r[{}{}] {secs}/{} s  {} ops/s  ",
            "=".repeat(filled),
            " ".repeat(30 - filled),
            b.duration,
            now - last
        );
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    eprintln!();
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let result = BenchResult {
        op: b.op,
        clients: b.clients,
        seconds,
        value_size: b.value_size,
        ops: hist.len(),
        errors: errors.load(Ordering::Relaxed),
        ops_per_second: hist.len() as f64 / seconds,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
    };
    match output {
        Output::Json => print_json(&result),
        Output::Table => {
            print_table(
                &["OP", "CLIENTS", "OPS/S", "P50 MS", "P99 MS", "P999 MS", "ERRORS"],
                &[vec![
                    format!("{:?}", result.op).to_lowercase(),
                    result.clients.to_string(),
                    format!("{:.0}", result.ops_per_second),
                    format!("{:.2}", result.p50_ms),
                    format!("{:.2}", result.p99_ms),
                    format!("{:.2}", result.p999_ms),
                    result.errors.to_string(),
                ]],
            );
            Ok(())
        }
    }
}
