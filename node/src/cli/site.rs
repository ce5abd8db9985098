//! `cell0 site ...`: the federation catalog as the answering node sees it.

use cell0_proto::v1::sites_client::SitesClient;
use cell0_proto::v1::{self, SiteStatus};
use clap::Subcommand;
use serde::Serialize;

use super::{Output, connect, print_list, rpc_error};

/// `cell0 site` subcommands.
#[derive(Subcommand)]
pub enum SiteCommand {
    /// List the sites the answering node knows: its own, then the sites
    /// its site links heard from (alive or unreachable).
    Ls,
}

/// Runs a `cell0 site` subcommand against `endpoint`.
pub async fn run(endpoint: &str, output: Output, cmd: SiteCommand) -> anyhow::Result<()> {
    match cmd {
        SiteCommand::Ls => list(endpoint, output).await,
    }
}

#[derive(Serialize)]
struct SiteView {
    name: String,
    status: &'static str,
    cluster_id: String,
    leader: String,
    nodes: usize,
    voters: usize,
    cpu_millis: u64,
    memory_mb: u64,
    gpu_memory_mb: u64,
    version: String,
    gateways: Vec<String>,
    /// Round-trip time from the answering node, in milliseconds.
    rtt_ms: Option<f64>,
    /// Milliseconds since the answering node last heard from the site.
    last_heard_ms: Option<u64>,
}

fn status_name(status: i32) -> &'static str {
    match SiteStatus::try_from(status) {
        Ok(SiteStatus::Local) => "local",
        Ok(SiteStatus::Alive) => "alive",
        Ok(SiteStatus::Unreachable) => "unreachable",
        _ => "unknown",
    }
}

fn view(s: v1::SiteInfo) -> SiteView {
    let local = s.status == SiteStatus::Local as i32;
    SiteView {
        status: status_name(s.status),
        cluster_id: format!("{:016x}", s.cluster_id),
        leader: if s.leader_id == 0 {
            "none".into()
        } else {
            s.leader_name.clone()
        },
        voters: s.nodes.iter().filter(|n| n.voter).count(),
        nodes: s.nodes.len(),
        cpu_millis: s.cpu_millis,
        memory_mb: s.memory_mb,
        gpu_memory_mb: s.gpu_memory_mb,
        version: s.version,
        gateways: s.gateways,
        rtt_ms: (s.rtt_us > 0).then(|| s.rtt_us as f64 / 1000.0),
        last_heard_ms: (!local).then_some(s.last_heard_ms),
        name: s.name,
    }
}

async fn list(endpoint: &str, output: Output) -> anyhow::Result<()> {
    let mut client = SitesClient::new(connect(endpoint).await?);
    let r = client
        .list(v1::ListSitesRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let views: Vec<SiteView> = r.sites.into_iter().map(view).collect();
    print_list(
        output,
        views,
        &[
            "SITE",
            "STATUS",
            "LEADER",
            "NODES",
            "CPU",
            "MEMORY",
            "RTT",
            "LAST HEARD",
            "VERSION",
            "GATEWAYS",
        ],
        |v| {
            vec![
                v.name,
                v.status.into(),
                v.leader,
                format!("{} ({} voters)", v.nodes, v.voters),
                format!("{:.1} cores", v.cpu_millis as f64 / 1000.0),
                format!("{} MiB", v.memory_mb),
                v.rtt_ms.map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms")),
                v.last_heard_ms
                    .map_or_else(|| "-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
                v.version,
                if v.gateways.is_empty() {
                    "-".into()
                } else {
                    v.gateways.join(",")
                },
            ]
        },
    )
}
