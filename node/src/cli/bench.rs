//! `cell0 bench ...`: measured figures, printed as a table or JSON.
//!
//! `bench kv` loads a running cluster through the public API: clients run
//! concurrently for a fixed time, each issuing one request after another;
//! latencies go into one HDR histogram and progress goes to stderr once a
//! second. `bench raft` does the same against an in-process Raft cluster,
//! `bench schedule` places agents through the real scheduler and Raft on
//! one, `bench infer` measures the local inference engine, `bench disk`
//! one synced write on a disk and `bench apply` a replica's apply of puts
//! (no cluster for those three).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_inference::bench::BenchModel;
use cell0_inference::model::BertConfig;
use cell0_proto::v1::inference_client::InferenceClient;
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
    /// Key-value throughput and latency against a running cluster.
    Kv(KvBench),
    /// Write throughput of the Raft core alone: a 3-node cluster inside this
    /// process (RocksDB with fsync, real gRPC on loopback), no client API.
    Raft(RaftBench),
    /// Embeddings/s and matmul GFLOP/s of the local inference engine, per
    /// backend (no cluster needed).
    Infer(InferBench),
    /// Agent placement: a 3-node cluster inside this process (RocksDB with
    /// fsync, real gRPC on loopback), synthetic node records, agents
    /// submitted in batches and placed by the real scheduler, each plan a
    /// real Raft commit.
    Schedule(ScheduleBench),
    /// Embed throughput and latency of one node through the public API
    /// (concurrent requests share forward passes).
    Embed(EmbedBench),
    /// Agent spawn latency and migration downtime on a running cluster,
    /// one agent at a time.
    Agents(super::agent_bench::AgentsBench),
    /// Gossip convergence and failure detection: N gossip services in this
    /// process on loopback (the real libp2p stack), no cluster needed.
    Gossip(super::gossip_bench::GossipBench),
    /// Site links: two sites' link ends in this process (real QUIC and
    /// mutual TLS) through a UDP relay adding a delay each way; the round
    /// trip, how fast a changed summary reaches the other site, and the
    /// latency of a forwarded call.
    Sites(super::sites_bench::SitesBench),
    /// What one durable write costs on the disk under a directory: a file
    /// append with fdatasync, an overwrite with fdatasync, and a synced
    /// RocksDB write of a Raft log row (no cluster needed).
    Disk(super::disk_bench::DiskBench),
    /// What applying one put costs a replica, alone: grouped puts applied
    /// to a scratch store through a node's own state machine store (RocksDB,
    /// no cluster needed).
    Apply(super::apply_bench::ApplyBench),
}

/// Options of `cell0 bench embed`.
#[derive(clap::Args)]
pub struct EmbedBench {
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Texts per request.
    #[arg(long, default_value_t = 1)]
    texts: usize,
    /// Tokens per text, counting the CLS and SEP markers.
    #[arg(long, default_value_t = 12)]
    tokens: usize,
}

/// Options of `cell0 bench infer`.
#[derive(clap::Args)]
pub struct InferBench {
    /// Model directory (as laid out by scripts/fetch-model.sh).
    #[arg(long, env = "CELL0_MODEL_DIR", default_value = "models/all-minilm-l6-v2")]
    model_dir: std::path::PathBuf,
    /// Backends to measure, comma-separated (cpu, wgpu, auto).
    #[arg(long, value_delimiter = ',', default_value = "cpu,wgpu")]
    backend: Vec<cell0_inference::BackendKind>,
    /// Texts per call, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Tokens per text, counting the CLS and SEP markers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "12,128,256")]
    tokens: Vec<usize>,
    /// Square matmul sizes, comma-separated (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    matmul: Vec<usize>,
    /// Least seconds measured per case (each case also runs once to warm up).
    #[arg(long, default_value_t = 2.0)]
    min_seconds: f64,
    /// Threads of the CPU engine (0: every core).
    #[arg(long, default_value_t = 0)]
    cpu_threads: usize,
    /// Random weights of all-MiniLM-L6-v2's shapes instead of the model
    /// files: times the forward pass on token ids (no tokenizer), for a
    /// machine that has only this binary.
    #[arg(long)]
    random_weights: bool,
}

/// Options of `cell0 bench raft`.
#[derive(clap::Args)]
pub struct RaftBench {
    /// Concurrent writers per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    writers: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Directory for the nodes' databases (a temporary directory inside it is
    /// removed afterwards). Use a real disk: fsync on tmpfs costs nothing.
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
}

/// Arguments of `bench schedule`.
#[derive(clap::Args)]
pub struct ScheduleBench {
    /// Synthetic node records (64 cores and 256 GiB each), at most the
    /// cluster's node-record limit.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Agents to place (100 millicores and 128 MB each).
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    /// Directory for the nodes' databases (a temporary directory inside it is
    /// removed afterwards).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
}

/// What `bench schedule` measured.
#[derive(Debug, Serialize)]
struct ScheduleResult {
    nodes: usize,
    agents: usize,
    submit_seconds: f64,
    place_seconds: f64,
    placements_per_second: f64,
    plans: u64,
    placed: usize,
    peak_rss_mb: u64,
}

/// The operation a kv bench issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
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
    op: String,
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
        BenchCommand::Raft(b) => raft(output, b).await,
        BenchCommand::Infer(b) => infer(output, b).await,
        BenchCommand::Schedule(b) => schedule(output, b).await,
        BenchCommand::Embed(b) => embed(endpoint, output, b).await,
        BenchCommand::Agents(b) => super::agent_bench::run(endpoint, output, b).await,
        BenchCommand::Gossip(b) => super::gossip_bench::run(output, b).await,
        BenchCommand::Sites(b) => super::sites_bench::run(output, b).await,
        BenchCommand::Disk(b) => super::disk_bench::run(output, b).await,
        BenchCommand::Apply(b) => super::apply_bench::run(output, b).await,
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
        anyhow::bail!(
            "--value-size must be at most {} bytes",
            cell0_consensus::command::MAX_VALUE_BYTES
        );
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
                    prev_kv: false,
                })
                .await
                .context("writing the keys for the get bench")?;
        }
    }

    let op = b.op;
    let keys = b.keys.max(1);
    let result = load(b.clients, b.duration, move |c| {
        let client = KvClient::new(channels[c % connections].clone());
        let value = value.clone();
        move |i: u64| {
            let mut client = client.clone();
            let value = value.clone();
            async move {
                match op {
                    BenchOp::Put => client
                        .put(v1::PutRequest {
                            key: bench_key(c, i).into(),
                            value: value.into(),
                            prev_kv: false,
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
                }
            }
        }
    })
    .await?;
    let result = BenchResult {
        op: format!("{op:?}").to_lowercase(),
        value_size: b.value_size,
        ..result
    };
    print_results(output, &[result])
}

async fn embed(endpoint: &str, output: Output, b: EmbedBench) -> anyhow::Result<()> {
    if b.clients == 0 || b.clients > MAX_CLIENTS {
        anyhow::bail!("--clients must be between 1 and {MAX_CLIENTS}");
    }
    if b.duration == 0 {
        anyhow::bail!("--duration must be at least 1 second");
    }
    if b.texts == 0 || !(2..=512).contains(&b.tokens) {
        anyhow::bail!("--texts must be at least 1 and --tokens between 2 and 512");
    }
    let connections = b.clients.div_ceil(CLIENTS_PER_CONNECTION);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(endpoint).await?);
    }
    let texts = vec![cell0_inference::bench::text_of_tokens(b.tokens); b.texts];
    // One request first, so a missing model fails with its message.
    InferenceClient::new(channels[0].clone())
        .embed(v1::EmbedRequest {
            texts: texts.clone(),
            ..Default::default()
        })
        .await
        .map_err(super::rpc_error)?;
    let result = load(b.clients, b.duration, move |c| {
        let client = InferenceClient::new(channels[c % connections].clone());
        let texts = texts.clone();
        move |_| {
            let mut client = client.clone();
            let request = v1::EmbedRequest {
                texts: texts.clone(),
                ..Default::default()
            };
            async move { client.embed(request).await.is_ok() }
        }
    })
    .await?;
    let result = BenchResult {
        op: format!("embed {} x {} tokens", b.texts, b.tokens),
        ..result
    };
    print_results(output, &[result])
}

/// Runs `clients` concurrent loops for `seconds`, each calling the operation
/// `make(client)` returns with an increasing counter, and reports throughput
/// and latency percentiles. Progress goes to stderr once a second.
async fn load<M, O, F>(clients: usize, seconds: u64, make: M) -> anyhow::Result<BenchResult>
where
    M: Fn(usize) -> O,
    O: Fn(u64) -> F + Send + 'static,
    F: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let op = make(c);
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if op(i).await {
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

    let total = Duration::from_secs(seconds);
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < total {
        tick.tick().await;
        let now = done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs().min(seconds);
        let filled = (secs * 30 / seconds) as usize;
        eprint!(
            "\r{clients:>5} clients [{}{}] {secs}/{seconds} s  {} ops/s  ",
            "=".repeat(filled),
            " ".repeat(30 - filled),
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
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(BenchResult {
        op: String::new(),
        clients,
        seconds: elapsed,
        value_size: 0,
        ops: hist.len(),
        errors: errors.load(Ordering::Relaxed),
        ops_per_second: hist.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
    })
}

fn print_results(output: Output, results: &[BenchResult]) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&results),
        Output::Table => {
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    vec![
                        r.op.clone(),
                        r.clients.to_string(),
                        format!("{:.0}", r.ops_per_second),
                        format!("{:.2}", r.p50_ms),
                        format!("{:.2}", r.p99_ms),
                        format!("{:.2}", r.p999_ms),
                        r.errors.to_string(),
                    ]
                })
                .collect();
            print_table(
                &["OP", "CLIENTS", "OPS/S", "P50 MS", "P99 MS", "P999 MS", "ERRORS"],
                &rows,
            );
            Ok(())
        }
    }
}

/// A 3-node cluster inside this process, its databases in a temporary
/// directory under `dir` (removed when the returned guard drops), and a
/// handle on its leader.
async fn local_cluster(
    dir: &std::path::Path,
) -> anyhow::Result<(
    tempfile::TempDir,
    Vec<cell0_consensus::testkit::LocalNode>,
    cell0_consensus::Consensus,
)> {
    let root = tempfile::Builder::new()
        .prefix("cell0-bench-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot create a directory under {}", dir.display()))?;
    eprintln!("starting a 3-node cluster under {}", root.path().display());
    let nodes = cell0_consensus::testkit::local_cluster(root.path(), 3, cell0_consensus::ConsensusConfig::default())
        .await
        .context("starting the in-process cluster")?;
    let leader_id = nodes[0].consensus.leader().context("no leader")?.0;
    let leader = nodes
        .iter()
        .find(|n| n.id() == leader_id)
        .context("the leader is not local")?
        .consensus
        .clone();
    Ok((root, nodes, leader))
}

async fn raft(output: Output, b: RaftBench) -> anyhow::Result<()> {
    if b.writers.is_empty() || b.writers.iter().any(|w| *w == 0 || *w > MAX_CLIENTS) {
        anyhow::bail!("--writers must list numbers between 1 and {MAX_CLIENTS}");
    }
    if b.duration == 0 {
        anyhow::bail!("--duration must be at least 1 second");
    }
    let (_root, nodes, leader) = local_cluster(&b.dir).await?;
    let mut results = Vec::new();
    for &writers in &b.writers {
        let before = leader.status().last_log_index;
        let value = vec![b'x'; b.value_size];
        let target = leader.clone();
        let mut r = load(writers, b.duration, move |w| {
            let leader = target.clone();
            let value = value.clone();
            move |i: u64| {
                let leader = leader.clone();
                let cmd = cell0_consensus::Command::PutWithoutPrev {
                    key: format!("bench/{writers}/{w}/{i}").into_bytes(),
                    value: value.clone(),
                };
                async move { leader.propose(cmd).await.is_ok() }
            }
        })
        .await?;
        let entries = leader.status().last_log_index - before;
        r.op = format!("put ({:.3} entries/write)", entries as f64 / r.ops.max(1) as f64);
        r.value_size = b.value_size;
        results.push(r);
    }
    for n in nodes {
        n.stop().await;
    }
    print_results(output, &results)
}

/// Peak resident memory of this process (VmHWM), in MB; 0 where unknown.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// Proposes `commands` through `leader` in batches of at most 1,024.
async fn propose_batched(
    leader: &cell0_consensus::Consensus,
    commands: impl Iterator<Item = cell0_consensus::Command>,
    what: &str,
    total: usize,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(1024);
    let mut done = 0;
    let mut next_report = Instant::now() + Duration::from_secs(1);
    let mut commands = commands.peekable();
    while commands.peek().is_some() {
        batch.extend(commands.by_ref().take(1024));
        done += batch.len();
        leader
            .propose(cell0_consensus::Command::Batch(std::mem::take(&mut batch)))
            .await
            .with_context(|| format!("proposing {what}"))?;
        if Instant::now() >= next_report {
            eprintln!("{what}: {done}/{total}");
            next_report = Instant::now() + Duration::from_secs(1);
        }
    }
    Ok(())
}

async fn schedule(output: Output, b: ScheduleBench) -> anyhow::Result<()> {
    use cell0_consensus::agents::{AgentCommand, AgentKind, AgentSpec, Constraints, Resources, RestartPolicy};
    use cell0_consensus::{NodeCommand, NodeResources};
    if b.nodes == 0 || b.nodes > cell0_consensus::nodes::MAX_NODES {
        anyhow::bail!("--nodes must be between 1 and {}", cell0_consensus::nodes::MAX_NODES);
    }
    if b.agents == 0 {
        anyhow::bail!("--agents must be at least 1");
    }
    let (_root, nodes, leader) = local_cluster(&b.dir).await?;
    let records = (0..b.nodes).map(|i| {
        NodeCommand::SetResources {
            node: 1_000_000 + i as u64,
            resources: NodeResources {
                cpu_cores: 64,
                memory_bytes: 256 << 30,
                inference_backend: "cpu".into(),
                ..NodeResources::default()
            },
        }
        .into_command()
    });
    propose_batched(&leader, records, "node records", b.nodes).await?;

    let started = Instant::now();
    let now_ms = crate::scheduling::now_ms();
    let runs = (0..b.agents).map(|i| {
        AgentCommand::Run {
            spec: AgentSpec {
                name: format!("agent-{i:07}"),
                kind: AgentKind::Exec {
                    command: vec!["/bin/cat".into()],
                    timeout_ms: 1000,
                    max_output_bytes: 1024,
                },
                resources: Resources {
                    cpu_millis: 100,
                    memory_mb: 128,
                    gpu_memory_mb: 0,
                },
                constraints: Constraints::default(),
                restart: RestartPolicy::Always,
            },
            at_ms: now_ms,
        }
        .into_command()
    });
    propose_batched(&leader, runs, "agents submitted", b.agents).await?;
    let submit_seconds = started.elapsed().as_secs_f64();

    let placing = Instant::now();
    let mut plans = 0u64;
    let mut handled = 0usize;
    let mut cursor = crate::scheduling::Cursor::default();
    loop {
        let term = leader.status().term;
        let n = crate::scheduling::round(&leader, cell0_scheduler::Options::default(), &mut cursor, term).await?;
        if n == 0 {
            break;
        }
        plans += 1;
        handled += n;
        eprintln!("evaluations handled: {handled}/{}", b.agents);
    }
    let place_seconds = placing.elapsed().as_secs_f64();
    let placed = leader
        .read(cell0_consensus::Consistency::Linearizable, |txn| {
            let mut placed = 0;
            for node in 0..b.nodes {
                placed += cell0_consensus::agents::agents_on(txn, 1_000_000 + node as u64, usize::MAX)?.len();
            }
            Ok(placed)
        })
        .await?;
    let result = ScheduleResult {
        nodes: b.nodes,
        agents: b.agents,
        submit_seconds,
        place_seconds,
        placements_per_second: placed as f64 / place_seconds.max(1e-9),
        plans,
        placed,
        peak_rss_mb: peak_rss_mb(),
    };
    for n in nodes {
        n.stop().await;
    }
    match output {
        Output::Json => print_json(&result),
        Output::Table => {
            print_table(
                &[
                    "NODES",
                    "AGENTS",
                    "SUBMIT s",
                    "PLACE s",
                    "PLACEMENTS/s",
                    "PLANS",
                    "PLACED",
                    "PEAK RSS MB",
                ],
                &[vec![
                    result.nodes.to_string(),
                    result.agents.to_string(),
                    format!("{:.2}", result.submit_seconds),
                    format!("{:.2}", result.place_seconds),
                    format!("{:.0}", result.placements_per_second),
                    result.plans.to_string(),
                    result.placed.to_string(),
                    result.peak_rss_mb.to_string(),
                ]],
            );
            Ok(())
        }
    }
}

async fn infer(output: Output, b: InferBench) -> anyhow::Result<()> {
    let opts = cell0_inference::bench::BenchOptions {
        backends: b.backend,
        batch_sizes: b.batch,
        token_lengths: b.tokens,
        matmul_sizes: b.matmul,
        min_seconds: b.min_seconds,
        cpu_threads: b.cpu_threads,
    };
    let cases = opts.backends.len() * (opts.batch_sizes.len() * opts.token_lengths.len() + opts.matmul_sizes.len() + 2);
    let source = cell0_inference::ModelSource::new(cell0_inference::MINILM_L6_V2, &b.model_dir);
    let random = b.random_weights;
    let report = tokio::task::spawn_blocking(move || {
        let mut step = 0;
        let model = if random {
            BenchModel::Random(BertConfig::minilm_l6_v2())
        } else {
            BenchModel::Files(&source)
        };
        cell0_inference::bench::run(&model, &opts, &mut |msg| {
            step += 1;
            eprintln!("[{step:>2}/{cases}] {msg}");
        })
    })
    .await?
    .with_context(|| format!("benchmarking the model in {}", b.model_dir.display()))?;
    if !report.optimized_build {
        eprintln!("warning: debug build; figures are not representative (build with --release)");
    }
    match output {
        Output::Json => print_json(&report),
        Output::Table => {
            let mut rows = Vec::new();
            for r in &report.backends {
                let device = format!("{} ({})", r.info.adapter, r.info.device_type);
                for e in &r.embed {
                    rows.push(vec![
                        r.info.backend.clone(),
                        device.clone(),
                        format!("embed {} x {} tokens", e.batch, e.tokens),
                        format!("{:.1} embeddings/s", e.embeddings_per_sec),
                    ]);
                }
                for m in &r.matmul {
                    rows.push(vec![
                        r.info.backend.clone(),
                        device.clone(),
                        format!("matmul {0}x{0}", m.size),
                        format!("{:.1} GFLOP/s", m.gflops),
                    ]);
                }
            }
            println!("model {} on {} CPUs", report.model, report.cpus);
            print_table(&["BACKEND", "DEVICE", "CASE", "RESULT"], &rows);
            Ok(())
        }
    }
}
