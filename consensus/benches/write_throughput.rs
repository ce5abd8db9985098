//! Write throughput and latency of a 3-node in-process cluster (RocksDB with
//! fsync, real gRPC on loopback) at several concurrency levels.
//!
//! Run: `cargo bench -p cell0-consensus --bench write_throughput`
//! Options (env): `BENCH_SECONDS` per level (default 5), `BENCH_VALUE_BYTES`
//! (default 100), `BENCH_LEVELS` (default "1,16,64,256").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cell0_consensus::testkit::local_cluster;
use cell0_consensus::{Command, ConsensusConfig};
use hdrhistogram::Histogram;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let seconds: u64 = env("BENCH_SECONDS", 5);
    let value_bytes: usize = env("BENCH_VALUE_BYTES", 100);
    let levels: Vec<usize> = env("BENCH_LEVELS", "1,16,64,256".to_string())
        .split(',')
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let root = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("temp dir for the bench cluster");
    let nodes = local_cluster(root.path(), 3, ConsensusConfig::default())
        .await
        .expect("start a 3-node cluster");
    let leader_id = nodes[0].consensus.leader().expect("leader").0;
    let leader = nodes
        .iter()
        .find(|n| n.id() == leader_id)
        .expect("leader is a local node")
        .consensus
        .clone();
    println!("3-node cluster, RocksDB fsync on, value {value_bytes} B, {seconds} s per level, writes to the leader");
    println!("{:>8} {:>12} {:>10} {:>10} {:>10} {:>14}", "writers", "writes/s", "p50 ms", "p99 ms", "p999 ms", "entries/write");
    for &writers in &levels {
        let stop = Arc::new(AtomicBool::new(false));
        let before = leader.status().last_log_index;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let c = leader.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).expect("histogram");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let cmd = Command::Put {
                        key: format!("bench/{w}/{i}").into_bytes(),
                        value: vec![b'x'; value_bytes],
                    };
                    let t = Instant::now();
                    c.write(cmd).await.expect("write");
                    hist.record(t.elapsed().as_micros() as u64).expect("record");
                    i += 1;
                }
                hist
            }));
        }
        // The measurement window: writers run until it closes.
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut hist = Histogram::<u64>::new(3).expect("histogram");
        for t in tasks {
            hist.add(t.await.expect("writer")).expect("merge");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let entries = leader.status().last_log_index - before;
        println!(
            "{:>8} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>14.3}",
            writers,
            hist.len() as f64 / elapsed,
            hist.value_at_quantile(0.50) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.value_at_quantile(0.999) as f64 / 1000.0,
            entries as f64 / hist.len() as f64,
        );
    }
    for n in nodes {
        n.stop().await;
    }
}
