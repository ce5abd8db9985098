//! `cell0 bench disk`: what one durable write costs on the disk under a
//! directory, the floor of every write's latency (each node syncs its Raft
//! log once per appended batch). Three ways, one after another, each
//! `--writes` times with `--bytes` of payload:
//! - `file append`: append to a file, then `fdatasync` (the file grows, so
//!   the sync also commits its new size);
//! - `file overwrite`: rewrite blocks of a file written and synced before,
//!   then `fdatasync` (no metadata changes: the cheapest durable write);
//! - `rocksdb log row`: one synced write of a Raft-log-sized row through the
//!   node's own storage engine (same RocksDB options as a node).
//!
//! Everything lives in a fresh directory under `--dir`, removed at the end.
//! Run it on the disk that holds the data dir, on an otherwise idle machine.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use cell0_storage::{Cf, Durability, Engine, RocksEngine, WriteBatch};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Output, print_json, print_table};

/// Most writes per way.
const MAX_WRITES: u64 = 1_000_000;
/// Largest payload of one write, in bytes.
const MAX_BYTES: usize = 1 << 20;

/// Options of `cell0 bench disk`.
#[derive(Args)]
pub struct DiskBench {
    /// Directory on the disk to measure (a fresh subdirectory is made in it
    /// and removed afterwards).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Synced writes per way.
    #[arg(long, default_value_t = 2_000)]
    writes: u64,
    /// Payload bytes of one write (a one-put Raft entry is about 300).
    #[arg(long, default_value_t = 300)]
    bytes: usize,
}

/// One way of writing durably, measured.
#[derive(Debug, Serialize)]
struct WayReport {
    way: &'static str,
    writes: u64,
    writes_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct DiskReport {
    dir: PathBuf,
    bytes: usize,
    ways: Vec<WayReport>,
}

/// Runs the benchmark.
pub async fn run(output: Output, b: DiskBench) -> anyhow::Result<()> {
    if !(1..=MAX_WRITES).contains(&b.writes) {
        anyhow::bail!("--writes must be 1 to {MAX_WRITES}");
    }
    if !(1..=MAX_BYTES).contains(&b.bytes) {
        anyhow::bail!("--bytes must be 1 to {MAX_BYTES}");
    }
    let work = tempfile::Builder::new()
        .prefix("cell0-bench-disk-")
        .tempdir_in(&b.dir)
        .with_context(|| format!("cannot make a directory under --dir {}", b.dir.display()))?;
    let root = work.path().to_path_buf();
    let (writes, bytes) = (b.writes, b.bytes);
    let ways = tokio::task::spawn_blocking(move || measure_all(&root, writes, bytes))
        .await
        .context("the disk benchmark's thread failed")??;
    let report = DiskReport {
        dir: b.dir,
        bytes: b.bytes,
        ways,
    };
    match output {
        Output::Json => print_json(&report),
        Output::Table => {
            let rows: Vec<Vec<String>> = report
                .ways
                .iter()
                .map(|w| {
                    vec![
                        w.way.to_string(),
                        w.writes.to_string(),
                        format!("{:.0}", w.writes_per_second),
                        format!("{:.3}", w.p50_ms),
                        format!("{:.3}", w.p99_ms),
                        format!("{:.3}", w.max_ms),
                    ]
                })
                .collect();
            print_table(&["WAY", "WRITES", "WRITES/s", "P50 ms", "P99 ms", "MAX ms"], &rows);
            Ok(())
        }
    }
}

fn measure_all(root: &Path, writes: u64, bytes: usize) -> anyhow::Result<Vec<WayReport>> {
    let payload = vec![0x5a_u8; bytes];
    let mut ways = Vec::new();

    let path = root.join("append");
    let mut file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    ways.push(measure("file append", writes, |_| write_synced(&mut file, &payload))?);

    // The blocks exist and are synced, so the overwrites change no metadata.
    let path = root.join("overwrite");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..writes {
        file.write_all(&payload)?;
    }
    file.sync_all()?;
    file.seek(SeekFrom::Start(0))?;
    ways.push(measure("file overwrite", writes, |_| {
        write_synced(&mut file, &payload)
    })?);

    let path = root.join("rocksdb");
    std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
    let engine = RocksEngine::open(&path, 1).with_context(|| format!("opening a store in {}", path.display()))?;
    ways.push(measure("rocksdb log row", writes, |i| {
        let mut batch = WriteBatch::new();
        batch.put(Cf::Log, i.to_be_bytes().to_vec(), payload.clone());
        engine.write(batch, Durability::Sync)?;
        Ok(())
    })?);
    Ok(ways)
}

/// Writes `payload` at the file's position, then `fdatasync`.
fn write_synced(file: &mut File, payload: &[u8]) -> anyhow::Result<()> {
    file.write_all(payload)?;
    file.sync_data()?;
    Ok(())
}

/// Runs `write(i)` for every `i` below `writes` and records each one's time.
fn measure(
    way: &'static str,
    writes: u64,
    mut write: impl FnMut(u64) -> anyhow::Result<()>,
) -> anyhow::Result<WayReport> {
    let mut hist = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for i in 0..writes {
        let t = Instant::now();
        write(i).with_context(|| format!("{way}: write {i}"))?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    let secs = started.elapsed().as_secs_f64().max(f64::EPSILON);
    let ms = |us: u64| us as f64 / 1_000.0;
    tracing::info!(way, writes, "measured");
    Ok(WayReport {
        way,
        writes,
        writes_per_second: writes as f64 / secs,
        p50_ms: ms(hist.value_at_quantile(0.5)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
    })
}
