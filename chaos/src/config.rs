//! Options of a load run: the command-line arguments ([`LoadArgs`]) and
//! their validation into a [`LoadConfig`].
//!
//! Validation never panics: every bad value gives a [`ConfigError`] whose
//! message names the option and the accepted range.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most concurrent clients (and so connections) one run may open.
pub const MAX_CLIENTS: usize = 4096;
/// Largest value a run may write: Cell0's limit (1 MiB); etcd accepts
/// requests up to 1.5 MiB by default.
pub const MAX_VALUE_SIZE: usize = 1 << 20;
/// Largest key space: keys are `load/` and twelve decimal digits.
pub const MAX_KEYS: u64 = 1_000_000_000_000;

/// The system a run loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Cell0's public KV API, `cell0.v1.Kv`.
    Cell0,
    /// etcd's v3 KV API, `etcdserverpb.KV`.
    Etcd,
}

impl Target {
    /// The name used on the command line and in JSON (`cell0`, `etcd`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Cell0 => "cell0",
            Target::Etcd => "etcd",
        }
    }
}

/// The operation every request of a run performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Writes a random key of the key space (Cell0 `Put`, etcd `Put`).
    Put,
    /// Reads a random key of the key space (Cell0 `Get`, etcd `Range` of one
    /// key).
    Get,
}

impl Op {
    /// The name used on the command line and in JSON (`put`, `get`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
        }
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Through the leader's read index: Cell0 `CONSISTENCY_LINEARIZABLE`,
    /// etcd `Range` with `serializable = false` (both the default).
    Linearizable,
    /// From the answering node's replica: Cell0 `CONSISTENCY_SERIALIZABLE`,
    /// etcd `Range` with `serializable = true`.
    Serializable,
}

impl Consistency {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Linearizable => "linearizable",
            Consistency::Serializable => "serializable",
        }
    }
}

/// How the result of a run is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON object on one line.
    Json,
    /// Aligned columns for people.
    Table,
}

/// Command-line arguments of a load run, as parsed; [`LoadArgs::validate`]
/// checks them.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// System to load.
    #[arg(long, value_enum)]
    pub target: Option<Target>,
    /// Public gRPC addresses of the nodes (host:port, comma-separated);
    /// client i connects to endpoint i mod n.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Operation.
    #[arg(long, value_enum, default_value_t = Op::Put)]
    pub op: Op,
    /// Concurrent clients, each with its own connection and one request in
    /// flight (closed loop).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Value size in bytes (pseudo-random, incompressible bytes).
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Keys in the key space; every request picks one uniformly at random.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Read consistency of `--op get` (default linearizable).
    #[arg(long, value_enum)]
    pub consistency: Option<Consistency>,
    /// Server process ids whose CPU time (utime + stime from /proc) is
    /// measured over the run, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Write every key of the key space once before the measured interval
    /// (not measured), so that gets find their keys.
    #[arg(long)]
    pub prefill: bool,
    /// Seconds before one request counts as failed.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// A validated load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// System to load.
    pub target: Target,
    /// Node addresses as `http://host:port` URIs, in the order given.
    pub endpoints: Vec<String>,
    /// Operation.
    pub op: Op,
    /// Read consistency; `None` for puts.
    pub consistency: Option<Consistency>,
    /// Concurrent clients (connections).
    pub clients: usize,
    /// Measured interval.
    pub duration: Duration,
    /// Value size in bytes.
    pub value_size: usize,
    /// Keys in the key space.
    pub keys: u64,
    /// Server process ids to measure.
    pub pids: Vec<u32>,
    /// Write the key space before measuring.
    pub prefill: bool,
    /// Deadline of one request.
    pub timeout: Duration,
    /// Print progress to stderr once a second.
    pub progress: bool,
}

/// An invalid option; the message names it and says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

impl LoadArgs {
    /// Checks every option and returns the run they describe.
    pub fn validate(&self) -> Result<LoadConfig, ConfigError> {
        let Some(target) = self.target else {
            return invalid("--target is required: cell0 or etcd");
        };
        if self.endpoints.is_empty() {
            return invalid("--endpoints is required: the nodes' gRPC addresses, e.g. 127.0.0.1:2379,127.0.0.1:22379");
        }
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| endpoint_uri(e))
            .collect::<Result<Vec<_>, _>>()?;
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return invalid(format!(
                "--clients must be between 1 and {MAX_CLIENTS}, not {}",
                self.clients
            ));
        }
        if self.duration == 0 {
            return invalid("--duration must be at least 1 second");
        }
        if self.value_size > MAX_VALUE_SIZE {
            return invalid(format!(
                "--value-size must be at most {MAX_VALUE_SIZE} bytes (Cell0's value limit), not {}",
                self.value_size
            ));
        }
        if self.keys == 0 || self.keys > MAX_KEYS {
            return invalid(format!("--keys must be between 1 and {MAX_KEYS}, not {}", self.keys));
        }
        let consistency = match (self.op, self.consistency) {
            (Op::Put, Some(_)) => return invalid("--consistency applies to --op get only"),
            (Op::Put, None) => None,
            (Op::Get, c) => Some(c.unwrap_or(Consistency::Linearizable)),
        };
        if let Some(pid) = self.pids.iter().find(|p| **p == 0) {
            return invalid(format!("--pids must list process ids greater than 0, not {pid}"));
        }
        if self.timeout == 0 {
            return invalid("--timeout must be at least 1 second");
        }
        Ok(LoadConfig {
            target,
            endpoints,
            op: self.op,
            consistency,
            clients: self.clients,
            duration: Duration::from_secs(self.duration),
            value_size: self.value_size,
            keys: self.keys,
            pids: self.pids.clone(),
            prefill: self.prefill,
            timeout: Duration::from_secs(self.timeout),
            progress: true,
        })
    }
}

/// Checks one `host:port` (or `http://host:port`) endpoint and returns it
/// as an `http://` URI.
pub fn endpoint_uri(endpoint: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| invalid(format!("--endpoints: {endpoint:?} {why} (expected host:port)"));
    if endpoint.starts_with("https://") {
        return bad("uses TLS, which the harness does not speak");
    }
    let rest = endpoint.strip_prefix("http://").unwrap_or(endpoint);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return bad("has no port");
    };
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return bad("has no valid host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{rest}")),
        _ => bad("has no valid port"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadArgs,
    }

    fn parse(args: &[&str]) -> Result<LoadConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("cell0-load").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args.validate().map_err(|e| e.to_string())
    }

    const BASE: [&str; 4] = ["--target", "etcd", "--endpoints", "127.0.0.1:2379,localhost:22379"];

    fn with(extra: &[&str]) -> Result<LoadConfig, String> {
        let mut args = BASE.to_vec();
        args.extend_from_slice(extra);
        parse(&args)
    }

    #[test]
    fn defaults() {
        let c = with(&[]).unwrap();
        assert_eq!(c.target, Target::Etcd);
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379", "http://localhost:22379"]);
        assert_eq!(c.op, Op::Put);
        assert_eq!(c.consistency, None);
        assert_eq!(c.clients, 16);
        assert_eq!(c.duration, Duration::from_secs(10));
        assert_eq!(c.value_size, 256);
        assert_eq!(c.keys, 100_000);
        assert!(c.pids.is_empty());
        assert!(!c.prefill);
    }

    #[test]
    fn full_command_line() {
        let c = parse(&[
            "--target",
            "cell0",
            "--endpoints",
            "http://127.0.0.1:7100,127.0.0.1:7200,127.0.0.1:7300",
            "--op",
            "get",
            "--clients",
            "64",
            "--duration",
            "8",
            "--value-size",
            "0",
            "--keys",
            "1000",
            "--consistency",
            "serializable",
            "--pids",
            "10,20,30",
            "--prefill",
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(c.target, Target::Cell0);
        assert_eq!(c.endpoints.len(), 3);
        assert_eq!(c.endpoints[0], "http://127.0.0.1:7100");
        assert_eq!(c.op, Op::Get);
        assert_eq!(c.consistency, Some(Consistency::Serializable));
        assert_eq!(c.clients, 64);
        assert_eq!(c.pids, [10, 20, 30]);
        assert!(c.prefill);
    }

    #[test]
    fn get_defaults_to_linearizable() {
        assert_eq!(
            with(&["--op", "get"]).unwrap().consistency,
            Some(Consistency::Linearizable)
        );
    }

    #[test]
    fn missing_target_and_endpoints() {
        assert!(
            parse(&["--endpoints", "a:1"])
                .unwrap_err()
                .contains("--target is required")
        );
        assert!(
            parse(&["--target", "cell0"])
                .unwrap_err()
                .contains("--endpoints is required")
        );
    }

    #[test]
    fn out_of_range_numbers() {
        assert!(
            with(&["--clients", "0"])
                .unwrap_err()
                .contains("--clients must be between 1 and 4096")
        );
        assert!(with(&["--clients", "4097"]).unwrap_err().contains("not 4097"));
        assert!(with(&["--duration", "0"]).unwrap_err().contains("--duration"));
        assert!(with(&["--value-size", "1048577"]).unwrap_err().contains("--value-size"));
        assert!(with(&["--keys", "0"]).unwrap_err().contains("--keys"));
        assert!(with(&["--timeout", "0"]).unwrap_err().contains("--timeout"));
        assert!(with(&["--pids", "1,0"]).unwrap_err().contains("--pids"));
    }

    #[test]
    fn malformed_values_are_clap_errors() {
        assert!(with(&["--clients", "-3"]).is_err());
        assert!(with(&["--pids", "12,abc"]).unwrap_err().contains("abc"));
        assert!(with(&["--op", "delete"]).unwrap_err().contains("delete"));
        assert!(parse(&["--target", "zookeeper"]).unwrap_err().contains("zookeeper"));
    }

    #[test]
    fn consistency_only_for_gets() {
        assert!(
            with(&["--consistency", "linearizable"])
                .unwrap_err()
                .contains("--op get only")
        );
    }

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(endpoint_uri("127.0.0.1:7100").unwrap(), "http://127.0.0.1:7100");
        assert_eq!(endpoint_uri("http://node1:2379/").unwrap(), "http://node1:2379");
        assert_eq!(endpoint_uri("[::1]:2379").unwrap(), "http://[::1]:2379");
        for bad in [
            "127.0.0.1",
            ":2379",
            "host:0",
            "host:99999",
            "host:port",
            "https://a:1",
            "a b:1",
            "",
        ] {
            let err = endpoint_uri(bad).unwrap_err().to_string();
            assert!(err.starts_with("--endpoints:"), "{bad}: {err}");
        }
        assert!(with(&["--endpoints", "127.0.0.1:2379,,x:1"]).is_err());
    }
}
