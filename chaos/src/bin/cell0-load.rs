//! `cell0-load`: closed-loop KV load against a Cell0 or an etcd cluster.
//!
//! ```text
//! cell0-load --target cell0|etcd --endpoints a,b,c --op put|get --clients N --duration SECS \
//!            [--value-size 256] [--keys 100000] [--consistency linearizable|serializable] \
//!            [--pids p1,p2,p3] [--prefill] [--output json|table]
//! cell0-load compare RESULTS.jsonl...
//! ```
//!
//! A run prints one JSON object (one line) or a table; `compare` reads such
//! lines and prints the side-by-side markdown table with medians and
//! Cell0/etcd ratios. `scripts/bench-vs-etcd.sh` drives both.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cell0_chaos::config::{LoadArgs, OutputFormat};
use cell0_chaos::{load, report};
use clap::{Parser, Subcommand};

/// Closed-loop KV load against a Cell0 or an etcd cluster: one connection per
/// client, client i on endpoint i mod n, latency percentiles, errors and the
/// CPU seconds of the server processes per operation.
#[derive(Parser)]
#[command(name = "cell0-load", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Reads runs (JSON lines from `--output json`) and prints one markdown
    /// table: medians per operation and client count, Cell0/etcd ratios.
    Compare {
        /// Files of JSON lines; `-` reads stdin.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn compare(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for f in files {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")?
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        };
        runs.extend(report::parse_runs(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?);
    }
    print!("{}", report::compare(&runs));
    Ok(())
}

async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
    let report = load::run(&config).await?;
    if let Some(e) = &report.first_error {
        eprintln!("{} requests failed; the first: {e}", report.errors);
    }
    match args.output {
        OutputFormat::Json => println!("{}", report.to_json_line()?),
        OutputFormat::Table => print!("{}", report.to_table()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Compare { files }) => compare(&files),
        None => run(cli.load).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
