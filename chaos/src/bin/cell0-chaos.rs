//! `cell0-chaos`: fault injection against a cluster of real `cell0`
//! processes, with a recorded history and checkers.
//!
//! ```text
//! cell0-chaos list
//! cell0-chaos run --scenario NAME [--duration 60s] [--seed S] [--nodes N] [--clients 8]
//!                 [--set-clients 2] [--keys 4] [--out DIR] [--cell0-bin PATH]
//!                 [--agents N [--agent-model DIR]]
//! ```
//!
//! `run` prints a summary (operations, faults, verdicts) and writes the
//! history, the timeline of faults and the summary under `--out`; it exits
//! non-zero when the verdicts are not what the scenario expects.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cell0_chaos::run::{self, RunOptions};
use cell0_chaos::scenario::{self, SCENARIOS};
use clap::{Parser, Subcommand};

/// Fault injection against real cell0 processes, with linearizability and
/// set checkers.
#[derive(Parser)]
#[command(name = "cell0-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the scenarios.
    List,
    /// Runs one scenario.
    Run {
        /// The scenario (`cell0-chaos list`).
        #[arg(long)]
        scenario: String,
        /// How long the workloads run: e.g. `60s`, `5m` (10 s to 1 h).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// Draws the faults and the clients' choices (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Nodes in the cluster, 3 to 7 (default: the scenario's, 3 or 5).
        #[arg(long, value_parser = clap::value_parser!(u8).range(3..=7))]
        nodes: Option<u8>,
        /// Register clients (1 to 64).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
        clients: u32,
        /// Set clients (0 to 16).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=16))]
        set_clients: u32,
        /// Register keys (1 to 64).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        keys: u32,
        /// Where the history, timeline, summary and node files go (default:
        /// a new directory under the system's temporary directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The cell0 binary (default: `cell0` next to this program).
        #[arg(long, env = "CELL0_BIN")]
        cell0_bin: Option<PathBuf>,
        /// How long the linearizability checker may take, in seconds.
        #[arg(long, default_value_t = 60)]
        check_seconds: u64,
        /// Also run the agent workload with this many exec agents (0 to 32;
        /// 0: off): tasks, migrations, drains and stops, checked for lost
        /// agents and tasks and for results of superseded incarnations.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=32))]
        agents: u32,
        /// With `--agents`: a model directory (e.g. models/all-minilm-l6-v2)
        /// for an inference agent whose tasks write its memory.
        #[arg(long, requires = "agents")]
        agent_model: Option<PathBuf>,
    },
    /// Kills the leader of a 3-node Cell0 or etcd cluster under write load,
    /// again and again, and reports how long writes took to succeed again
    /// (docs/chaos.md, "Failover"); `--compare` pools earlier results.
    Failover(cell0_chaos::failover::FailoverArgs),
}

/// A duration such as `90s`, `10m` or `1h` (a bare number is seconds),
/// from 10 s to 1 h.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 60s or 5m"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: use s, m or h")),
    };
    if !(10..=3600).contains(&seconds) {
        return Err(format!("{text:?}: use 10 s to 1 h"));
    }
    Ok(Duration::from_secs(seconds))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run_cli() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_cli() -> anyhow::Result<bool> {
    match Cli::parse().command {
        Command::Failover(args) => Ok(cell0_chaos::failover::command(args)?),
        Command::List => {
            for s in SCENARIOS {
                let root = if s.needs_root() { " (needs root)" } else { "" };
                let nodes = if s.nodes == 3 {
                    String::new()
                } else {
                    format!(" ({} nodes)", s.nodes)
                };
                println!("{:<20} {}{nodes}{root}", s.name, s.about);
            }
            Ok(true)
        }
        Command::Run {
            scenario,
            duration,
            seed,
            nodes,
            clients,
            set_clients,
            keys,
            out,
            cell0_bin,
            check_seconds,
            agents,
            agent_model,
        } => {
            let scenario = scenario::find(&scenario)
                .with_context(|| format!("no scenario {scenario:?}: `cell0-chaos list` shows them"))?;
            let nodes = nodes.unwrap_or(scenario.nodes);
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
            let bin = match cell0_bin {
                Some(b) => b,
                None => std::env::current_exe()?
                    .parent()
                    .context("this program's directory")?
                    .join("cell0"),
            };
            anyhow::ensure!(bin.exists(), "no cell0 binary at {} (give --cell0-bin)", bin.display());
            let out = match out {
                Some(o) => o,
                None => std::env::temp_dir().join(format!("cell0-chaos-{}-{seed}", scenario.name)),
            };
            eprintln!(
                "cell0-chaos: scenario {} seed {seed}, {} s, {nodes} nodes; files in {}",
                scenario.name,
                duration.as_secs(),
                out.display()
            );
            let runtime = tokio::runtime::Runtime::new()?;
            let agents = (agents > 0 || agent_model.is_some()).then_some(cell0_chaos::agents::AgentOptions {
                agents,
                model: agent_model,
            });
            let summary = runtime.block_on(run::run_with_agents(
                RunOptions {
                    scenario,
                    duration,
                    seed,
                    nodes: usize::from(nodes),
                    clients,
                    set_clients,
                    keys,
                    out,
                    bin,
                    check_budget: Duration::from_secs(check_seconds),
                },
                agents,
            ))?;
            println!(
                "scenario {} seed {}: {} faults; register {} ops ({} ok, {} fail, {} unknown); set {} writes ({} ok, {} unknown)",
                summary.scenario,
                summary.seed,
                summary.faults,
                summary.register.ops,
                summary.register.ok,
                summary.register.fail,
                summary.register.unknown,
                summary.set.ops,
                summary.set.ok,
                summary.set.unknown
            );
            println!("linearizable: {}", summary.linearizable_report);
            println!("set: {}", summary.set_report);
            if let Some(a) = &summary.agents {
                println!(
                    "agent workload: {} ops ({} ok, {} fail, {} unknown), settled in {} ms",
                    a.ops, a.ok, a.fail, a.unknown, a.settle_ms
                );
                print!("{}", a.report);
            }
            println!(
                "{}: the verdicts are {}what scenario {} expects; rerun with --seed {}",
                if summary.passed { "PASS" } else { "FAIL" },
                if summary.passed { "" } else { "not " },
                summary.scenario,
                summary.seed
            );
            Ok(summary.passed)
        }
    }
}
