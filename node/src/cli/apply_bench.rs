//! `cell0 bench apply`: what applying one put costs a replica, alone
//! (`cell0_consensus::bench`): grouped puts applied to a scratch store
//! through a node's own state machine store, no cluster. It prints the time
//! inside apply calls per put and this process's CPU per put, which also
//! counts RocksDB's flush and compaction threads.
//!
//! The store lives in a fresh directory under `--dir`, removed at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_consensus::bench::{ApplyLoad, ApplyRun};
use clap::Args;
use serde::Serialize;

use super::{Output, print_json, print_table};

/// Most keys in the key space.
const MAX_KEYS: u64 = 10_000_000;
/// Most puts per entry (a leader groups at most `max_batch_commands`).
const MAX_BATCH: usize = 10_000;
/// Most timed entries.
const MAX_ENTRIES: u64 = 1_000_000;
/// Largest value, in bytes.
const MAX_VALUE_BYTES: usize = 1 << 20;

/// Options of `cell0 bench apply`.
#[derive(Args)]
pub struct ApplyBench {
    /// Directory for the scratch store (a fresh subdirectory is made in it
    /// and removed afterwards).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keys in the key space; each is written once before the timed part.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Puts per log entry (a leader's group commit puts about 80 in one
    /// under a load of 256 clients).
    #[arg(long, default_value_t = 80)]
    batch: usize,
    /// Bytes of each value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Entries applied and timed after the prefill.
    #[arg(long, default_value_t = 5_000)]
    entries: u64,
}

#[derive(Debug, Serialize)]
struct ApplyReport {
    keys: u64,
    batch: usize,
    value_size: usize,
    puts: u64,
    puts_per_second: f64,
    /// Time inside apply calls per put.
    apply_us_per_put: f64,
    /// This process's CPU per put (apply and RocksDB's background threads).
    cpu_us_per_put: f64,
}

/// CPU time of every thread of this process so far (`/proc/self/task/*/schedstat`).
fn process_cpu() -> anyhow::Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").context("reading /proc/self/task")? {
        let path = task?.path().join("schedstat");
        // A thread that ended meanwhile has no file any more.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns = stat.split_whitespace().next().and_then(|f| f.parse::<u64>().ok());
        total += ns.with_context(|| format!("{} is not as expected", path.display()))?;
    }
    Ok(Duration::from_nanos(total))
}

/// Runs the benchmark.
pub async fn run(output: Output, b: ApplyBench) -> anyhow::Result<()> {
    if !(1..=MAX_KEYS).contains(&b.keys) {
        anyhow::bail!("--keys must be 1 to {MAX_KEYS}");
    }
    if !(1..=MAX_BATCH).contains(&b.batch) {
        anyhow::bail!("--batch must be 1 to {MAX_BATCH}");
    }
    if !(1..=MAX_ENTRIES).contains(&b.entries) {
        anyhow::bail!("--entries must be 1 to {MAX_ENTRIES}");
    }
    if b.value_size > MAX_VALUE_BYTES {
        anyhow::bail!("--value-size must be at most {MAX_VALUE_BYTES}");
    }
    let work = tempfile::Builder::new()
        .prefix("cell0-bench-apply-")
        .tempdir_in(&b.dir)
        .with_context(|| format!("cannot make a directory under --dir {}", b.dir.display()))?;
    let load = ApplyLoad {
        keys: b.keys,
        batch: b.batch,
        value_size: b.value_size,
        entries: b.entries,
    };
    let mut next_report = Instant::now() + Duration::from_secs(1);
    let mut progress = |done: u64, total: u64| {
        if Instant::now() >= next_report {
            eprintln!("bench apply: {done}/{total} entries");
            next_report += Duration::from_secs(1);
        }
    };
    eprintln!("bench apply: writing {} keys", b.keys);
    let run = ApplyRun::prefill(work.path(), load).await?;
    let cpu_before = process_cpu()?;
    let m = run.run(&mut progress).await?;
    let cpu = process_cpu()?.saturating_sub(cpu_before);
    tracing::info!(puts = m.puts, "measured");
    let puts = m.puts as f64;
    let report = ApplyReport {
        keys: b.keys,
        batch: b.batch,
        value_size: b.value_size,
        puts: m.puts,
        puts_per_second: puts / m.elapsed.as_secs_f64().max(f64::EPSILON),
        apply_us_per_put: m.apply_time.as_secs_f64() * 1e6 / puts,
        cpu_us_per_put: cpu.as_secs_f64() * 1e6 / puts,
    };
    match output {
        Output::Json => print_json(&report),
        Output::Table => {
            print_table(
                &[
                    "KEYS",
                    "BATCH",
                    "VALUE B",
                    "PUTS",
                    "PUTS/s",
                    "APPLY us/put",
                    "CPU us/put",
                ],
                &[vec![
                    report.keys.to_string(),
                    report.batch.to_string(),
                    report.value_size.to_string(),
                    report.puts.to_string(),
                    format!("{:.0}", report.puts_per_second),
                    format!("{:.2}", report.apply_us_per_put),
                    format!("{:.2}", report.cpu_us_per_put),
                ]],
            );
            Ok(())
        }
    }
}
