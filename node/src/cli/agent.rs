//! `cell0 agent ...` and `cell0 node ...`: agents and the nodes' scheduling
//! status.
//!
//! `agent run` reads a spec file (TOML, unknown keys refused with their
//! name):
//!
//! ```toml
//! name = "summarizer"
//! kind = "exec"              # exec, process or inference
//! restart = "on-failure"     # never, on-failure or always (default)
//! max_restarts = 3
//! sites = ["eu", "us"]       # optional: where it may run, in order of preference
//!
//! [resources]
//! cpu_millis = 500
//! memory_mb = 256
//! gpu_memory_mb = 0
//!
//! [constraints]              # all optional
//! gpu = false
//! model = "minilm"
//! labels = { zone = "a" }
//!
//! [config]                   # exec: command, timeout_ms, max_output_bytes
//! command = ["/usr/bin/wc", "-w"]   # process: command, grace_ms
//! timeout_ms = 10000
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cell0_proto::v1::agents_client::AgentsClient;
use cell0_proto::v1::nodes_client::NodesClient;
use cell0_proto::v1::{self, agent_spec::Kind};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use super::{Output, connect, connect_streaming, parse_node_id, print_json, print_list, rpc_error};

/// Longest spec file read, in bytes.
pub const MAX_SPEC_FILE_BYTES: u64 = 64 * 1024;
/// Default wall-clock limit of one `exec` task, in milliseconds.
const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Default output kept from one `exec` task, in bytes.
const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// Default time between SIGTERM and SIGKILL for `process` agents, in ms.
const DEFAULT_GRACE_MS: u64 = 10_000;

/// Agent commands.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Submit an agent from a spec file (or a new spec for it).
    Run {
        /// The spec file (TOML).
        spec: std::path::PathBuf,
    },
    /// List agents with where they run.
    Ls,
    /// Show one agent.
    Show {
        /// Its name.
        name: String,
    },
    /// Stop an agent; its allocation is released.
    Stop {
        /// Its name.
        name: String,
    },
    /// Move an agent to another node, or hand it off to another site.
    Migrate {
        /// Its name.
        name: String,
        /// The target node id, as `cell0 node ls` shows it (default: any
        /// other node).
        #[arg(long, conflicts_with = "to_site")]
        to: Option<String>,
        /// Hand the agent off to this site (as `cell0 site ls` lists it):
        /// that site imports its spec, memory and tasks and its scheduler
        /// places it; this site keeps a pointer, so calls about the agent
        /// here are served there.
        #[arg(long)]
        to_site: Option<String>,
        /// With --to-site: wait until the other site runs the agent (or
        /// the move is aborted), at most this many seconds.
        #[arg(long, value_name = "SECONDS", requires = "to_site")]
        wait: Option<u64>,
        /// Cancel the agent's move to another site, unless it committed
        /// (the other site owns it): the agent runs here again.
        #[arg(long, conflicts_with_all = ["to", "to_site"])]
        cancel: bool,
    },
    /// Follow an agent's lifecycle: one line per change until interrupted.
    Watch {
        /// Its name.
        name: String,
    },
}

/// Node scheduling commands.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes with their resources, usage and scheduling status.
    Ls,
    /// Drain a node: it takes no new agents and its agents move away.
    Drain {
        /// The node id, as `cell0 node ls` shows it.
        node: String,
        /// Move at most this many of its agents at once (0: all at once).
        #[arg(long, default_value_t = 0)]
        max_parallel: u32,
        /// After this long, move the rest at once: e.g. `90s`, `10m`, `2h`
        /// (default: no deadline).
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<std::time::Duration>,
    },
    /// Make a node eligible for new agents again, or not.
    Eligibility {
        /// The node id, as `cell0 node ls` shows it.
        node: String,
        /// Eligible (`--enable`) or not (`--disable`).
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        /// Not eligible: its agents stay but no new ones come.
        #[arg(long)]
        disable: bool,
    },
    /// The node at --endpoint leaves the cluster gracefully: its agents
    /// move to other nodes, then it is removed from the Raft group. Stop
    /// its process afterwards; started again with --join, it is added again.
    Leave {
        /// The node's agents move one at a time; after this long, those
        /// still on it move at once: e.g. `90s`, `10m`.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        drain_deadline: std::time::Duration,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    kind: String,
    #[serde(default)]
    restart: String,
    #[serde(default)]
    max_restarts: u32,
    #[serde(default)]
    sites: Vec<String>,
    resources: ResourcesFile,
    #[serde(default)]
    constraints: ConstraintsFile,
    #[serde(default)]
    config: ConfigFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    cpu_millis: i64,
    memory_mb: i64,
    #[serde(default)]
    gpu_memory_mb: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintsFile {
    #[serde(default)]
    gpu: bool,
    #[serde(default)]
    model: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    command: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    max_output_bytes: Option<u64>,
    grace_ms: Option<u64>,
}

/// A resource amount from the file: negative numbers are refused by name.
fn amount(field: &str, v: i64) -> anyhow::Result<u64> {
    u64::try_from(v).map_err(|_| anyhow::anyhow!("{field} is {v}; it must not be negative"))
}

/// Parses a spec file's text into the API's spec; errors name the field.
pub fn parse_spec(text: &str) -> anyhow::Result<v1::AgentSpec> {
    let file: SpecFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message().trim()))?;
    let config = file.config;
    let not_for = |field: &str, present: bool| {
        if present {
            anyhow::bail!("config.{field} is not a setting of {} agents", file.kind);
        }
        Ok(())
    };
    let command = || {
        config
            .command
            .clone()
            .ok_or_else(|| anyhow::anyhow!("config.command is missing: {} agents run a program", file.kind))
    };
    let kind = match file.kind.as_str() {
        "exec" => {
            not_for("grace_ms", config.grace_ms.is_some())?;
            Kind::Exec(v1::ExecConfig {
                command: command()?,
                timeout_ms: config.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
                max_output_bytes: config.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
            })
        }
        "process" => {
            not_for("timeout_ms", config.timeout_ms.is_some())?;
            not_for("max_output_bytes", config.max_output_bytes.is_some())?;
            Kind::Process(v1::ProcessConfig {
                command: command()?,
                grace_ms: config.grace_ms.unwrap_or(DEFAULT_GRACE_MS),
            })
        }
        "inference" => {
            for (field, present) in [
                ("command", config.command.is_some()),
                ("timeout_ms", config.timeout_ms.is_some()),
                ("max_output_bytes", config.max_output_bytes.is_some()),
                ("grace_ms", config.grace_ms.is_some()),
            ] {
                not_for(field, present)?;
            }
            Kind::Inference(v1::InferenceConfig {})
        }
        other => anyhow::bail!("kind is {other:?}; use exec, process or inference"),
    };
    Ok(v1::AgentSpec {
        name: file.name,
        resources: Some(v1::AgentResources {
            cpu_millis: amount("resources.cpu_millis", file.resources.cpu_millis)?,
            memory_mb: amount("resources.memory_mb", file.resources.memory_mb)?,
            gpu_memory_mb: amount("resources.gpu_memory_mb", file.resources.gpu_memory_mb)?,
        }),
        constraints: Some(v1::AgentConstraints {
            labels: file.constraints.labels.into_iter().collect(),
            gpu: file.constraints.gpu,
            model: file.constraints.model,
        }),
        restart: file.restart,
        max_restarts: file.max_restarts,
        kind: Some(kind),
        sites: file.sites,
    })
}

fn read_spec(path: &Path) -> anyhow::Result<v1::AgentSpec> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > MAX_SPEC_FILE_BYTES {
        anyhow::bail!(
            "{} is {len} bytes; a spec file may hold at most {MAX_SPEC_FILE_BYTES}",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_spec(&text).with_context(|| format!("{} is not a valid agent spec", path.display()))
}

/// One agent, as `ls`, `show` and JSON output give it.
#[derive(Debug, Serialize)]
struct AgentView {
    name: String,
    kind: &'static str,
    desired: String,
    generation: u64,
    /// The node it is placed on, as hex.
    node: Option<String>,
    incarnation: Option<u64>,
    status: String,
    reason: String,
    cpu_millis: u64,
    memory_mb: u64,
    /// Its handoff between sites, e.g. `moving to b`, `from a`.
    handoff: Option<String>,
}

impl From<v1::AgentInfo> for AgentView {
    fn from(a: v1::AgentInfo) -> Self {
        let spec = a.spec.unwrap_or_default();
        let resources = spec.resources.unwrap_or_default();
        let kind = match spec.kind {
            Some(Kind::Exec(_)) => "exec",
            Some(Kind::Process(_)) => "process",
            Some(Kind::Inference(_)) => "inference",
            None => "?",
        };
        let (node, incarnation, status, reason) = match a.allocation {
            Some(al) => (
                Some(format!("{:016x}", al.node)),
                Some(al.incarnation),
                al.status,
                al.reason,
            ),
            None => (None, None, "unplaced".into(), a.pending_reason),
        };
        let handoff = a.handoff.map(|h| match h.state.as_str() {
            "moving" | "moved" => format!("{} to {}", h.state, h.site),
            _ => format!("{} from {}", h.state, h.site),
        });
        AgentView {
            handoff,
            name: spec.name,
            kind,
            desired: a.desired,
            generation: a.generation,
            node,
            incarnation,
            status,
            reason,
            cpu_millis: resources.cpu_millis,
            memory_mb: resources.memory_mb,
        }
    }
}

fn agent_row(a: AgentView) -> Vec<String> {
    vec![
        a.name,
        a.kind.into(),
        a.desired,
        a.node.unwrap_or_else(|| "-".into()),
        a.incarnation.map_or_else(|| "-".into(), |i| i.to_string()),
        a.status,
        a.handoff.unwrap_or_else(|| "-".into()),
        a.reason,
    ]
}

const AGENT_HEADERS: [&str; 8] = [
    "NAME",
    "KIND",
    "DESIRED",
    "NODE",
    "INCARNATION",
    "STATUS",
    "SITE MOVE",
    "REASON",
];

/// Waits until `site` runs `name` (asking the node this client talks to,
/// which follows the agent's pointer once the handoff is done), or the
/// handoff was aborted, or `timeout` passed.
async fn wait_for_handoff(
    client: &mut AgentsClient<super::Conn>,
    name: &str,
    site: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let a = client
            .get(v1::GetAgentRequest { name: name.into() })
            .await
            .map_err(rpc_error)?
            .into_inner();
        let state = a.handoff.as_ref().map(|h| h.state.as_str()).unwrap_or_default();
        // An agent moved while stopped arrives stopped.
        let running = a.allocation.as_ref().is_some_and(|al| al.status == "running") || a.desired == "stopped";
        match (state, a.handoff.as_ref().map(|h| h.site.as_str())) {
            ("arrived", _) if running => {
                eprintln!("agent {name} is in site {site} now");
                return Ok(());
            }
            ("moving" | "arriving" | "arrived", _) => {}
            _ => anyhow::bail!(
                "the move of agent {name} to site {site} was aborted: {}",
                a.pending_reason
            ),
        }
        if state != last {
            eprintln!("  {state}");
            last = state.to_string();
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "agent {name} is still {state} after {} s; `cell0 agent show {name}` follows it",
                timeout.as_secs()
            );
        }
        // Polling: the handoff runs in two sites' leaders, and a person
        // waits on it (a watch would end when the agent's pointer moves).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs an agent command against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: AgentCommand) -> anyhow::Result<()> {
    let mut client = AgentsClient::new(connect(endpoint).await?);
    match cmd {
        AgentCommand::Run { spec } => {
            let spec = read_spec(&spec)?;
            let name = spec.name.clone();
            let r = client
                .run(v1::RunAgentRequest { spec: Some(spec) })
                .await
                .map_err(rpc_error)?
                .into_inner();
            match output {
                Output::Json => print_json(&serde_json::json!({"name": name, "generation": r.generation})),
                Output::Table => {
                    println!("agent {name} submitted (generation {})", r.generation);
                    Ok(())
                }
            }
        }
        AgentCommand::Ls => {
            let mut views = Vec::new();
            let mut after = String::new();
            loop {
                let page = client
                    .list(v1::ListAgentsRequest {
                        start_after: after.clone(),
                        limit: 1000,
                    })
                    .await
                    .map_err(rpc_error)?
                    .into_inner();
                if let Some(last) = page.agents.last().and_then(|a| a.spec.as_ref()) {
                    after = last.name.clone();
                }
                views.extend(page.agents.into_iter().map(AgentView::from));
                if !page.more {
                    break;
                }
            }
            print_list(output, views, &AGENT_HEADERS, agent_row)
        }
        AgentCommand::Show { name } => {
            let a = client
                .get(v1::GetAgentRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_list(output, vec![AgentView::from(a)], &AGENT_HEADERS, agent_row)
        }
        AgentCommand::Stop { name } => {
            let r = client
                .stop(v1::StopAgentRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            eprintln!("agent {name} stopping (generation {})", r.generation);
            Ok(())
        }
        AgentCommand::Migrate {
            name,
            to,
            to_site,
            wait,
            cancel,
        } => {
            let to_node = to.as_deref().map(parse_node_id).transpose()?.unwrap_or(0);
            let r = client
                .migrate(v1::MigrateAgentRequest {
                    name: name.clone(),
                    to_node,
                    to_site: to_site.clone().unwrap_or_default(),
                    cancel,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if cancel {
                eprintln!("the move of agent {name} (handoff {}) is cancelled", r.handoff_id);
                return Ok(());
            }
            let Some(site) = to_site else {
                eprintln!("agent {name} moving");
                return Ok(());
            };
            eprintln!("agent {name} moving to site {site} (handoff {})", r.handoff_id);
            if let Some(secs) = wait {
                wait_for_handoff(&mut client, &name, &site, Duration::from_secs(secs)).await?;
            }
            Ok(())
        }
        AgentCommand::Watch { name } => {
            let mut stream = AgentsClient::new(connect_streaming(endpoint).await?)
                .watch(v1::WatchAgentRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            while let Some(a) = stream.message().await.map_err(rpc_error)? {
                let view = AgentView::from(a);
                match output {
                    Output::Json => println!("{}", serde_json::to_string(&view)?),
                    Output::Table => println!("{}", agent_row(view).join("  ")),
                }
            }
            Ok(())
        }
    }
}

/// One node, as `node ls` gives it.
#[derive(Debug, Serialize)]
struct NodeView {
    id: String,
    state: String,
    reason: String,
    agents: u32,
    cpu_millis_used: u64,
    cpu_millis: u64,
    memory_mb_used: u64,
    memory_mb: u64,
    gpu: bool,
    labels: BTreeMap<String, String>,
}

/// Runs a node command against `endpoint`.
pub async fn run_node(endpoint: &str, output: Output, cmd: NodeCommand) -> anyhow::Result<()> {
    let conn = connect(endpoint).await?;
    let mut client = NodesClient::new(conn.clone());
    match cmd {
        NodeCommand::Ls => {
            let nodes = client
                .list(v1::ListNodesRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .nodes;
            let views = nodes
                .into_iter()
                .map(|n| {
                    let used = n.used.unwrap_or_default();
                    NodeView {
                        id: format!("{:016x}", n.id),
                        state: n.state,
                        reason: n.reason,
                        agents: n.agents,
                        cpu_millis_used: used.cpu_millis,
                        cpu_millis: u64::from(n.cpu_cores) * 1000,
                        memory_mb_used: used.memory_mb,
                        memory_mb: n.memory_mb,
                        gpu: n.gpu,
                        labels: n.labels.into_iter().collect(),
                    }
                })
                .collect();
            print_list(
                output,
                views,
                &[
                    "ID",
                    "STATE",
                    "AGENTS",
                    "CPU (millis)",
                    "MEMORY (MB)",
                    "GPU",
                    "LABELS",
                    "REASON",
                ],
                |n| {
                    vec![
                        n.id,
                        n.state,
                        n.agents.to_string(),
                        format!("{}/{}", n.cpu_millis_used, n.cpu_millis),
                        format!("{}/{}", n.memory_mb_used, n.memory_mb),
                        if n.gpu { "yes" } else { "no" }.into(),
                        n.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        n.reason,
                    ]
                },
            )
        }
        NodeCommand::Drain {
            node,
            max_parallel,
            deadline,
        } => {
            let node = parse_node_id(&node)?;
            let deadline_ms = deadline.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            client
                .drain(v1::DrainNodeRequest {
                    node,
                    max_parallel,
                    deadline_ms,
                    reason: String::new(),
                })
                .await
                .map_err(rpc_error)?;
            let pace = match max_parallel {
                0 => "all at once".to_string(),
                n => format!("{n} at a time"),
            };
            eprintln!("node {node:016x} draining: its agents move to other nodes, {pace}");
            Ok(())
        }
        NodeCommand::Eligibility { node, enable, .. } => {
            let node = parse_node_id(&node)?;
            client
                .set_eligibility(v1::SetEligibilityRequest { node, eligible: enable })
                .await
                .map_err(rpc_error)?;
            eprintln!(
                "node {node:016x} is {} for new agents",
                if enable { "eligible" } else { "ineligible" }
            );
            Ok(())
        }
        NodeCommand::Leave { drain_deadline } => super::leave::leave(conn, drain_deadline).await,
    }
}

/// A duration such as `500ms`, `90s`, `10m` or `2h` (a bare number is
/// seconds).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 10m or 2h"))?;
    let ms_per = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60 * 1000,
        "h" => 3600 * 1000,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use ms, s, m or h")),
    };
    n.checked_mul(ms_per)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90s").unwrap(), std::time::Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), std::time::Duration::from_secs(600));
        assert_eq!(parse_duration("2h").unwrap(), std::time::Duration::from_secs(7200));
        assert_eq!(parse_duration("250ms").unwrap(), std::time::Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), std::time::Duration::from_secs(30));
        assert!(parse_duration("10 minutes").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
    }

    const SPEC: &str = r#"
name = "wc"
kind = "exec"
[resources]
cpu_millis = 500
memory_mb = 64
[config]
command = ["/usr/bin/wc", "-w"]
"#;

    #[test]
    fn a_spec_file_parses_with_defaults() {
        let spec = parse_spec(SPEC).unwrap();
        assert_eq!(spec.name, "wc");
        match spec.kind {
            Some(Kind::Exec(c)) => {
                assert_eq!(c.command, vec!["/usr/bin/wc", "-w"]);
                assert_eq!(c.timeout_ms, DEFAULT_TIMEOUT_MS);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_spec_files_are_refused_naming_the_field() {
        let unknown = parse_spec(&SPEC.replace("[config]", "colour = \"red\"\n[config]")).unwrap_err();
        assert!(unknown.to_string().contains("colour"), "{unknown}");
        let negative = parse_spec(&SPEC.replace("cpu_millis = 500", "cpu_millis = -1")).unwrap_err();
        assert!(negative.to_string().contains("resources.cpu_millis"), "{negative}");
        let kind = parse_spec(&SPEC.replace("\"exec\"", "\"docker\"")).unwrap_err();
        assert!(kind.to_string().contains("kind"), "{kind}");
        let misplaced = parse_spec(&format!("{SPEC}grace_ms = 5\n")).unwrap_err();
        assert!(misplaced.to_string().contains("config.grace_ms"), "{misplaced}");
    }
}
