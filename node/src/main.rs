//! `cell0`: the Cell0 node and its command-line client, in one binary.
//!
//! `cell0 run` starts a node; every other command is a client of the public
//! gRPC API of any node (`--endpoint`, env `CELL0_ENDPOINT`).
//!
//! This file is the thin process shell around the `cell0` library: argument
//! parsing, logging, the pid file and signals. A node stops on the first
//! SIGTERM or SIGINT (the handlers are installed before the node starts, so
//! a signal during start-up also stops it cleanly); a second one exits at
//! once with status 130.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cell0::cli::{self, Output, acl, agent, bench, infer, kv, model, site, snapshot, task, tls};
use cell0::config::{LogFormat, NodeConfig};
use cell0::{server, telemetry};
use clap::{Args, Parser, Subcommand};

/// Cell0: a distributed cluster node for AI agents.
#[derive(Parser)]
#[command(name = "cell0", version, about, propagate_version = true)]
struct Cli {
    /// Public gRPC address of any node (host:port).
    #[arg(long, global = true, env = "CELL0_ENDPOINT", default_value = "127.0.0.1:7100")]
    endpoint: String,
    /// Output format of client commands.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Connect to the public port over TLS, trusting this CA certificate
    /// (the nodes run with --tls-public).
    #[arg(long, global = true, env = "CELL0_CA")]
    ca: Option<PathBuf>,
    /// ACL token sent with every call (`authorization: Bearer ...`), as
    /// `cell0 acl bootstrap` or `cell0 acl token create` printed it.
    #[arg(long, global = true, env = "CELL0_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Have every call served by this site: a node of another site
    /// forwards it over a site link (`cell0 --site B kv get k`; before the
    /// subcommand).
    #[arg(long)]
    site: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Run(Box<RunArgs>),
    /// Show the answering node's view of the cluster.
    Status,
    /// List the members of the cluster.
    Members,
    /// Print a new cluster secret for gossip (64 hex digits): give every
    /// node the same one (--gossip-secret or CELL0_GOSSIP_SECRET).
    Keygen,
    /// Make the cluster CA and node certificates for mutual TLS between
    /// nodes.
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Remove a member from the cluster (a voter only while the others keep
    /// a reachable quorum).
    Remove {
        /// The node id, as `cell0 members` shows it.
        node: String,
    },
    /// Read and write keys.
    #[command(subcommand)]
    Kv(kv::KvCommand),
    /// Access control: bootstrap, policies, tokens.
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// Manage the replicated model registry.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run, list, stop and move agents.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Nodes' scheduling status: list, drain, eligibility.
    #[command(subcommand)]
    Node(agent::NodeCommand),
    /// Submit tasks to agents, wait for results, read agents' memory.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// The sites this node's site is federated with (`site ls`).
    #[command(subcommand)]
    Site(site::SiteCommand),
    /// Embed texts and inspect the inference engine.
    #[command(subcommand)]
    Infer(infer::InferCommand),
    /// Measure the cluster.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Back up the replicated state and restore it.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Act on a stopped node's data (disaster recovery).
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Check this machine and the node its config describes (ports, data
    /// dir, free space, certificates, inference, cluster health, clocks)
    /// and print each problem with the fix; fails when one is found. Takes
    /// the config file and flags `cell0 run` gets.
    Doctor(Box<RunArgs>),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Save a consistent snapshot of the whole replicated state from the
    /// node at --endpoint into FILE (verified before it gets its name).
    Save {
        /// The file to write; must not exist.
        file: PathBuf,
    },
    /// Restore FILE into a new data dir (offline), as the only member of a
    /// new cluster; takes the flags `cell0 run` will get (--data-dir,
    /// --name, addresses).
    Restore {
        /// A file written by `cell0 snapshot save`.
        file: PathBuf,
        #[command(flatten)]
        node: Box<RunArgs>,
    },
    /// Check FILE and describe it.
    Inspect {
        /// A snapshot file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// After quorum is lost for good: make this stopped node the only
    /// member of its cluster, keeping every entry it has (like etcd's
    /// --force-new-cluster). See docs/operations.md before using it.
    Recover {
        /// The stopped node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// Only print the last log index and term the node has (to pick the
        /// most up-to-date survivor); change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Flags of `cell0 run`; each overrides the config file and its env var.
#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "CELL0_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "CELL0_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Node name.
    #[arg(long, env = "CELL0_NAME")]
    name: Option<String>,
    /// Site (region) name.
    #[arg(long, env = "CELL0_SITE")]
    site: Option<String>,
    /// Public gRPC listen address.
    #[arg(long, env = "CELL0_LISTEN_PUBLIC")]
    listen_public: Option<std::net::SocketAddr>,
    /// Internal gRPC listen address.
    #[arg(long, env = "CELL0_LISTEN_INTERNAL")]
    listen_internal: Option<std::net::SocketAddr>,
    /// HTTP (metrics, health) listen address.
    #[arg(long, env = "CELL0_LISTEN_HTTP")]
    listen_http: Option<std::net::SocketAddr>,
    /// Public address advertised to clients.
    #[arg(long, env = "CELL0_ADVERTISE_PUBLIC")]
    advertise_public: Option<String>,
    /// Internal address advertised to other nodes.
    #[arg(long, env = "CELL0_ADVERTISE_INTERNAL")]
    advertise_internal: Option<String>,
    /// Nodes to contact (host:port, comma-separated, repeatable; a DNS name
    /// may resolve to several): gossip addresses when gossip is on, else
    /// members' public or internal addresses.
    #[arg(long, env = "CELL0_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// Start a new cluster if this node is not in one yet.
    #[arg(long, env = "CELL0_BOOTSTRAP")]
    bootstrap: bool,
    /// Form the cluster once this many nodes see each other through gossip.
    #[arg(long, env = "CELL0_BOOTSTRAP_EXPECT")]
    bootstrap_expect: Option<usize>,
    /// Run a throwaway one-node cluster in a temporary directory.
    #[arg(long, conflicts_with_all = ["data_dir", "join"])]
    dev: bool,
    /// Log format.
    #[arg(long, env = "CELL0_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter (RUST_LOG syntax), e.g. "info" or "cell0=debug".
    #[arg(long, env = "CELL0_LOG_LEVEL")]
    log_level: Option<String>,
    /// Threads that run the node's async tasks (default: one per core);
    /// nodes sharing a machine should split its cores.
    #[arg(long, env = "CELL0_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Inference backend: auto (a hardware GPU if present, else the CPU
    /// engine), wgpu or cpu.
    #[arg(long, env = "CELL0_INFERENCE_BACKEND")]
    inference_backend: Option<cell0_inference::BackendKind>,
    /// Write the process id here while running.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Run gossip (discovery and failure detection) on this address
    /// (host:port; the default port is 7102).
    #[arg(long, env = "CELL0_LISTEN_GOSSIP")]
    listen_gossip: Option<std::net::SocketAddr>,
    /// Gossip address advertised to other nodes.
    #[arg(long, env = "CELL0_ADVERTISE_GOSSIP")]
    advertise_gossip: Option<String>,
    /// The cluster secret for gossip (64 hex digits from `cell0 keygen`).
    #[arg(long, env = "CELL0_GOSSIP_SECRET", hide_env_values = true)]
    gossip_secret: Option<String>,
    /// Run site links (federation with other sites) on this UDP address
    /// (host:port; the default port is 7104). Needs the --tls-* files.
    #[arg(long, env = "CELL0_LISTEN_WAN")]
    listen_wan: Option<std::net::SocketAddr>,
    /// Federation address advertised to other sites.
    #[arg(long, env = "CELL0_ADVERTISE_WAN")]
    advertise_wan: Option<String>,
    /// Federation address of a node of another site to link to
    /// (host:port, comma-separated, repeatable); turns site links on.
    #[arg(long, env = "CELL0_JOIN_WAN", value_delimiter = ',')]
    join_wan: Vec<String>,
    /// The cluster CA certificate for mutual TLS between nodes (PEM).
    #[arg(long, env = "CELL0_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's certificate, signed by the CA (PEM).
    #[arg(long, env = "CELL0_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "CELL0_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Plaintext between nodes: anyone who reaches the internal port can act
    /// as a node. For development only (--dev implies it).
    #[arg(long, env = "CELL0_INSECURE")]
    insecure: bool,
    /// Serve the public port over TLS too, with the node's certificate.
    #[arg(long, env = "CELL0_TLS_PUBLIC")]
    tls_public: bool,
    /// Requests per second one client address may send to the public port
    /// (0: no limit).
    #[arg(long, env = "CELL0_CLIENT_RATE")]
    client_rate: Option<u32>,
    /// Require an ACL token on every call but health checks (make the first
    /// with `cell0 acl bootstrap`).
    #[arg(long, env = "CELL0_ACL")]
    acl: bool,
    /// Requests per second one ACL token may send to this node (0: no
    /// limit).
    #[arg(long, env = "CELL0_TOKEN_RATE")]
    token_rate: Option<u32>,
    /// Write the audit log (one JSON line per mutating or denied call) to
    /// <data-dir>/audit/audit.log, or to --audit-file.
    #[arg(long, env = "CELL0_AUDIT")]
    audit: bool,
    /// The audit log's file (implies --audit).
    #[arg(long, env = "CELL0_AUDIT_FILE")]
    audit_file: Option<PathBuf>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<(NodeConfig, Option<tempfile::TempDir>)> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        let dev_dir = if self.dev {
            let dir = tempfile::Builder::new().prefix("cell0-dev-").tempdir()?;
            c.data_dir = dir.path().to_path_buf();
            Some(dir)
        } else {
            None
        };
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.name {
            c.name = Some(v);
        }
        if let Some(v) = self.site {
            c.site = v;
        }
        if let Some(v) = self.listen_public {
            c.listen.public = v;
        }
        if let Some(v) = self.listen_internal {
            c.listen.internal = v;
        }
        if let Some(v) = self.listen_http {
            c.listen.http = v;
        }
        if let Some(v) = self.advertise_public {
            c.advertise.public = Some(v);
        }
        if let Some(v) = self.advertise_internal {
            c.advertise.internal = Some(v);
        }
        if !self.join.is_empty() {
            c.join = self.join.into_iter().filter(|j| !j.is_empty()).collect();
        }
        c.bootstrap |= self.bootstrap;
        if let Some(v) = self.bootstrap_expect {
            c.bootstrap_expect = Some(v);
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = self.log_level {
            c.log_level = v;
        }
        if let Some(v) = self.worker_threads {
            c.worker_threads = Some(v);
        }
        if let Some(v) = self.inference_backend {
            c.inference.backend = v;
        }
        if let Some(v) = self.listen_gossip {
            c.gossip.enabled = true;
            c.gossip.listen = v;
        }
        if let Some(v) = self.advertise_gossip {
            c.gossip.advertise = Some(v);
        }
        if let Some(v) = self.gossip_secret {
            c.gossip.secret = Some(v);
        }
        c.gossip.allow_no_secret |= self.dev;
        if let Some(v) = self.listen_wan {
            c.federation.enabled = true;
            c.federation.listen = v;
        }
        if let Some(v) = self.advertise_wan {
            c.federation.advertise = Some(v);
        }
        if !self.join_wan.is_empty() {
            c.federation.enabled = true;
            c.federation.join = self.join_wan.into_iter().filter(|j| !j.is_empty()).collect();
        }
        if let Some(v) = self.tls_ca {
            c.tls.ca_file = Some(v);
        }
        if let Some(v) = self.tls_cert {
            c.tls.cert_file = Some(v);
        }
        if let Some(v) = self.tls_key {
            c.tls.key_file = Some(v);
        }
        c.tls.insecure |= self.insecure || self.dev;
        c.tls.public |= self.tls_public;
        if let Some(v) = self.client_rate {
            c.limits.client_rate = v;
        }
        c.acl.enabled |= self.acl;
        if let Some(v) = self.token_rate {
            c.limits.token_rate = v;
        }
        c.audit.enabled |= self.audit || self.audit_file.is_some();
        if let Some(v) = self.audit_file {
            c.audit.path = Some(v);
        }
        Ok((c, dev_dir))
    }
}

/// A future that resolves on the first SIGTERM or SIGINT, after which a
/// second one exits the process at once. The handlers are installed now.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
    })
}

/// Bounds glibc's malloc arenas to one per core (glibc allows eight per
/// core); glibc's malloc serves the C++ side (RocksDB) only. Measured on a
/// new member catching up on 512 MiB: with the default, memory freed by
/// one thread's arena (RocksDB memtables, decoded log entries) was not
/// reused by the others and its RSS grew to 520 MB; with two arenas on two
/// cores it stayed at 371 MB. Runs before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_malloc_arenas() {
    /// glibc's `M_ARENA_MAX` parameter of `mallopt`.
    const M_ARENA_MAX: i32 = -8;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets an allocator parameter; it is called before
    // any other thread exists, and a refusal (0) leaves the default.
    unsafe {
        mallopt(M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_malloc_arenas() {}

/// Rust's allocations go to mimalloc (RocksDB's C++ keeps glibc's malloc,
/// bounded below). Measured on this project's 2-core machine, 3-node
/// cluster, release builds, two rounds each: put at 256 clients 10,043 ->
/// 11,157 ops/s and 152 -> 135 µs of server CPU per put; linearizable get at
/// 64 clients 19,023 -> 21,084 ops/s (docs/benchmarks.md). glibc's malloc
/// and free were 17 % of all CPU samples at 256 clients.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    bound_malloc_arenas();
    let Cli {
        endpoint,
        output,
        ca,
        token,
        site,
        command,
    } = Cli::parse();
    let result = match command {
        Command::Run(args) => run_node(*args),
        command => new_runtime(None).and_then(|runtime| {
            runtime.block_on(async move {
                if let Some(ca) = &ca {
                    cli::trust_ca(ca)?;
                }
                if let Some(token) = token.as_deref().filter(|t| !t.is_empty()) {
                    cli::use_token(token)?;
                }
                if let Some(site) = site.as_deref() {
                    cli::use_site(site)?;
                }
                match command {
                    // Dispatched above: it sizes its runtime from its config.
                    Command::Run(_) => anyhow::bail!("`cell0 run` starts its own runtime"),
                    Command::Status => cli::status(&endpoint, output).await,
                    Command::Members => cli::members(&endpoint, output).await,
                    Command::Keygen => {
                        println!("{}", cell0_gossip::ClusterSecret::generate().to_hex());
                        Ok(())
                    }
                    Command::Tls(cmd) => tls::run(cmd),
                    Command::Remove { node } => cli::remove(&endpoint, &node).await,
                    Command::Kv(cmd) => kv::run(&endpoint, output, cmd).await,
                    Command::Acl(cmd) => acl::run(&endpoint, output, cmd).await,
                    Command::Model(cmd) => model::run(&endpoint, output, cmd).await,
                    Command::Agent(cmd) => agent::run(&endpoint, output, cmd).await,
                    Command::Node(cmd) => agent::run_node(&endpoint, output, cmd).await,
                    Command::Task(cmd) => task::run(&endpoint, output, cmd).await,
                    Command::Site(cmd) => site::run(&endpoint, output, cmd).await,
                    Command::Infer(cmd) => infer::run(&endpoint, output, cmd).await,
                    Command::Bench(cmd) => {
                        // In-process benchmarks (gossip, raft, schedule) log to
                        // stderr when asked, like a node.
                        if let Ok(filter) = std::env::var("RUST_LOG") {
                            telemetry::init_logging(LogFormat::Text, &filter)?;
                        }
                        bench::run(&endpoint, output, cmd).await
                    }
                    Command::Snapshot(SnapshotCommand::Save { file }) => snapshot::save(&endpoint, output, &file).await,
                    Command::Snapshot(SnapshotCommand::Inspect { file }) => snapshot::inspect(output, &file),
                    Command::Snapshot(SnapshotCommand::Restore { file, node }) => {
                        if node.data_dir.is_none() {
                            anyhow::bail!("--data-dir is required: the new data dir to restore into");
                        }
                        let (config, _) = node.into_config()?;
                        snapshot::restore(output, &file, &config).await
                    }
                    Command::Doctor(node) => {
                        let (config, _) = node.into_config()?;
                        cli::doctor::run(&config, output).await
                    }
                    Command::Operator(OperatorCommand::Recover { data_dir, dry_run }) => {
                        snapshot::recover(output, &data_dir, dry_run).await
                    }
                }
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: `worker_threads` workers, or one per core.
fn new_runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    builder.build().context("cannot start the async runtime")
}

/// `cell0 run`: reads the config first, since it sizes the runtime.
fn run_node(args: RunArgs) -> anyhow::Result<()> {
    let pid_file = args.pid_file.clone();
    let (config, dev_dir) = args.into_config()?;
    config.validate()?;
    let runtime = new_runtime(config.worker_threads)?;
    runtime.block_on(async move {
        telemetry::init_logging(config.log_format, &config.log_level)?;
        let shutdown = shutdown_signal()?;
        if let Some(p) = &pid_file {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write pid file {}", p.display()))?;
        }
        let result = server::run(config, shutdown).await;
        if let Some(p) = &pid_file {
            let _ = std::fs::remove_file(p);
        }
        drop(dev_dir);
        result
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
