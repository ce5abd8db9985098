//! `cell0 bench agents`: spawn latency and migration downtime of agents on a
//! running cluster, through the public API.
//!
//! One `exec` agent at a time (so the figures are latencies, not queueing):
//! - spawn: `Agents.Run` until the allocation is reported running, as the
//!   cluster records it: the node's clock when its runtime started the
//!   agent minus the leader's clock when `Run` committed (the process's own
//!   start-up is not included: an exec agent starts its command per task);
//! - migration: `Agents.Migrate` until the next incarnation is reported
//!   running (the node's clock) minus the client's clock before the call,
//!   which bounds the downtime (old stopped, new running) from above.
//!
//! Run it on a machine of the cluster: the clocks compared are then one
//! clock. The client follows each agent with `Agents.Watch` rather than
//! polling, so it adds no load of its own. The agents are stopped afterwards.

use std::time::Duration;

use cell0_proto::v1;
use cell0_proto::v1::agents_client::AgentsClient;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Output, connect, print_json, rpc_error};
use crate::scheduling::now_ms;

/// Options of `cell0 bench agents`.
#[derive(Args)]
pub struct AgentsBench {
    /// Agents to start (and move), one at a time; at most 10,000.
    #[arg(long, default_value_t = 100)]
    agents: usize,
}

/// What `bench agents` measured, in ms.
#[derive(Debug, Serialize)]
struct AgentsResult {
    agents: usize,
    spawn_p50_ms: u64,
    spawn_p99_ms: u64,
    spawn_max_ms: u64,
    migrate_p50_ms: u64,
    migrate_p99_ms: u64,
    migrate_max_ms: u64,
}

/// How long one agent may take to run before the bench gives up.
const WAIT: Duration = Duration::from_secs(30);

fn spec(name: &str) -> v1::AgentSpec {
    v1::AgentSpec {
        name: name.into(),
        resources: Some(v1::AgentResources {
            cpu_millis: 1,
            memory_mb: 1,
            gpu_memory_mb: 0,
        }),
        constraints: None,
        restart: String::new(),
        max_restarts: 0,
        kind: Some(v1::agent_spec::Kind::Exec(v1::ExecConfig {
            command: vec!["/bin/cat".into()],
            timeout_ms: 1000,
            max_output_bytes: 1024,
        })),
        sites: Vec::new(),
    }
}

/// Waits, on the agent's watch stream (no polling load on the cluster),
/// until `name` runs with an incarnation above `after`: the agent.
async fn running(client: &mut AgentsClient<super::Conn>, name: &str, after: u64) -> anyhow::Result<v1::AgentInfo> {
    let mut stream = client
        .watch(v1::WatchAgentRequest { name: name.into() })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let wait = async {
        let mut last = None;
        while let Some(a) = stream.message().await.map_err(rpc_error)? {
            if a.allocation
                .as_ref()
                .is_some_and(|al| al.status == "running" && al.incarnation > after)
            {
                return Ok(a);
            }
            last = Some(a);
        }
        anyhow::bail!("the watch of agent {name} ended before it ran: {last:?}")
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .map_err(|_| anyhow::anyhow!("agent {name} did not run within {} s", WAIT.as_secs()))?
}

/// Runs the bench against `endpoint`.
pub async fn run(endpoint: &str, output: Output, b: AgentsBench) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&b.agents) {
        anyhow::bail!("--agents is {}; use 1 to 10000", b.agents);
    }
    let mut client = AgentsClient::new(connect(endpoint).await?);
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let mut spawn = Histogram::<u64>::new(3)?;
    let mut migrate = Histogram::<u64>::new(3)?;
    let names: Vec<String> = (0..b.agents).map(|i| format!("{prefix}-{i}")).collect();
    let outcome = async {
        for (i, name) in names.iter().enumerate() {
            client
                .run(v1::RunAgentRequest { spec: Some(spec(name)) })
                .await
                .map_err(rpc_error)?;
            let a = running(&mut client, name, 0).await?;
            let started = a.allocation.as_ref().map_or(0, |al| al.updated_at_ms);
            spawn.record(started.saturating_sub(a.created_at_ms))?;
            if (i + 1) % 100 == 0 {
                eprintln!("spawned {} of {}", i + 1, b.agents);
            }
        }
        for (i, name) in names.iter().enumerate() {
            let before = client
                .get(v1::GetAgentRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .allocation
                .map_or(0, |al| al.incarnation);
            let asked = now_ms();
            client
                .migrate(v1::MigrateAgentRequest {
                    name: name.clone(),
                    to_node: 0,
                    ..Default::default()
                })
                .await
                .map_err(rpc_error)?;
            let a = running(&mut client, name, before).await?;
            let started = a.allocation.as_ref().map_or(0, |al| al.updated_at_ms);
            migrate.record(started.saturating_sub(asked))?;
            if (i + 1) % 100 == 0 {
                eprintln!("moved {} of {}", i + 1, b.agents);
            }
        }
        anyhow::Ok(())
    }
    .await;
    for name in &names {
        let _ = client.stop(v1::StopAgentRequest { name: name.clone() }).await;
    }
    outcome?;
    let result = AgentsResult {
        agents: b.agents,
        spawn_p50_ms: spawn.value_at_quantile(0.5),
        spawn_p99_ms: spawn.value_at_quantile(0.99),
        spawn_max_ms: spawn.max(),
        migrate_p50_ms: migrate.value_at_quantile(0.5),
        migrate_p99_ms: migrate.value_at_quantile(0.99),
        migrate_max_ms: migrate.max(),
    };
    match output {
        Output::Json => print_json(&result),
        Output::Table => {
            println!("agents {}", result.agents);
            println!(
                "spawn (Run committed to running)      p50 {} ms  p99 {} ms  max {} ms",
                result.spawn_p50_ms, result.spawn_p99_ms, result.spawn_max_ms
            );
            println!(
                "migration (Migrate asked to running)  p50 {} ms  p99 {} ms  max {} ms",
                result.migrate_p50_ms, result.migrate_p99_ms, result.migrate_max_ms
            );
            Ok(())
        }
    }
}
